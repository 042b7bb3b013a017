"""Projection operators, one module each, registered by name (see ``base``).

To add one, copy ``per_neuron.py`` into a new module of this package: an ``Operator`` subclass with
a ``name`` and a ``block`` method, decorated with ``@register``. Every module here is imported
below, so the settings, ``fgsn apply`` and the harnesses accept the new name with no other file
touched."""

from fgsn_daemon.core.named import import_members
from fgsn_daemon.engine.operators.base import Operator, get_operator, operator_names, register, unregister

import_members(__name__, __path__, skip="base")

__all__ = ["Operator", "get_operator", "operator_names", "register", "unregister"]
