"""``contrast``: how far a neuron's mean activation moves on harmful prompts,
``|mean_harmful(a_i) − mean_benign(a_i)|``, against its benign RMS."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fgsn_daemon.engine.scorings.base import NeuronScores, Scoring, register

if TYPE_CHECKING:
    import torch

    from fgsn_daemon.engine.activations import NeuronStats


@register
class ActivationContrast(Scoring):
    name = "contrast"
    summary = "|mean harmful - mean benign activation|, against the benign RMS"

    def score(
        self, harmful: NeuronStats, benign: NeuronStats, out_weight_col_l1: torch.Tensor, positions: str
    ) -> NeuronScores:
        return NeuronScores((harmful.mean(positions) - benign.mean(positions)).abs(), benign.rms(positions))
