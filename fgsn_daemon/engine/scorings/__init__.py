"""Unit scorings, one module each, registered by name (see ``base``).

To add one, copy ``contrast.py`` into a new module of this package: a ``Scoring`` subclass with a
``name`` and a ``score`` method, decorated with ``@register``. Every module here is imported below,
so the settings, policy overrides, ``fgsn apply`` and the harnesses accept the new name with no
other file touched."""

from fgsn_daemon.core.named import import_members
from fgsn_daemon.engine.scorings.base import (
    NeuronScores,
    Scoring,
    get_scoring,
    register,
    scoring_names,
    unregister,
)

import_members(__name__, __path__, skip="base")

__all__ = ["NeuronScores", "Scoring", "get_scoring", "register", "scoring_names", "unregister"]
