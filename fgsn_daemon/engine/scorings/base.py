"""The scoring registry: every unit scoring is a small class registered by name.

A scoring turns what was measured for one (layer, space) into two scores per neuron: ``harmful``
(how much the neuron matters for the dimension's refusal) and ``benign`` (how much it matters for
general use); selection then takes the top-q % by the first minus the top-p % by the second.
*Activation* scorings compute them from activation statistics (``score``); *gradient* scorings
(``attribution``) are computed by the ``Localiser`` from backward passes and only declare
themselves here, so that every name the settings, the policy overrides, the CLI and the harnesses
accept comes from this one registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from fgsn_daemon.core.errors import ConfigError
from fgsn_daemon.core.named import NamedRegistry

if TYPE_CHECKING:
    import torch

    from fgsn_daemon.engine.activations import NeuronStats


@dataclass(frozen=True)
class NeuronScores:
    harmful: torch.Tensor
    benign: torch.Tensor


class Scoring:
    """Base class: subclass, set ``name``, implement ``score`` (activation scorings) and decorate
    with ``@register``."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    uses_activation_stats: ClassVar[bool] = True

    def score(
        self, harmful: NeuronStats, benign: NeuronStats, out_weight_col_l1: torch.Tensor, positions: str
    ) -> NeuronScores:
        """Scores from the harmful and benign statistics of one (layer, space); ``out_weight_col_l1``
        is the L1 norm of each neuron's output weights; ``positions`` is "all" or "last"."""
        raise ConfigError(f"scoring {self.name!r} is computed from gradients, not activation statistics")


SCORINGS: NamedRegistry[Scoring] = NamedRegistry("scoring")


def register(cls: type[Scoring]) -> type[Scoring]:
    """Class decorator: make ``cls`` available under ``cls.name`` everywhere a scoring is chosen."""
    return SCORINGS.register(cls)


def unregister(name: str) -> None:
    SCORINGS.unregister(name)


def get_scoring(name: str) -> Scoring:
    return SCORINGS.get(name)


def scoring_names(where: Callable[[Scoring], Any] | None = None) -> list[str]:
    """Registered names, sorted; ``where`` filters (e.g. ``lambda s: s.uses_activation_stats``)."""
    return SCORINGS.names(where)
