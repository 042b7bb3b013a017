"""Unit scorings, one module each, registered by name (see ``base``).

To add one, copy ``contrast.py`` into a new module of this package: a ``Scoring`` subclass with a
``name`` and a ``score`` method, decorated with ``@register``. Every module here is imported below,
so the settings, policy overrides, ``fgsn apply`` and the harnesses accept the new name with no
other file touched."""

import importlib
import pkgutil

from fgsn_daemon.engine.scorings.base import (
    NeuronScores,
    Scoring,
    get_scoring,
    register,
    scoring_names,
    unregister,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["NeuronScores", "Scoring", "get_scoring", "register", "scoring_names", "unregister"]
