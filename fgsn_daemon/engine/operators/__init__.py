"""Projection operators, one module each, registered by name (see ``base``).

To add one, copy ``per_neuron.py`` into a new module of this package: an ``Operator`` subclass with
a ``name`` and a ``block`` method, decorated with ``@register``. Every module here is imported
below, so the settings, ``fgsn apply`` and the harnesses accept the new name with no other file
touched."""

import importlib
import pkgutil

from fgsn_daemon.engine.operators.base import Operator, get_operator, operator_names, register, unregister

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Operator", "get_operator", "operator_names", "register", "unregister"]
