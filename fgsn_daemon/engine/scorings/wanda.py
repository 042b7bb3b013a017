"""``wanda``: Wanda importance collapsed to a neuron, ``‖W_out[:, i]‖₁ · RMS(a_i)``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fgsn_daemon.engine.scorings.base import NeuronScores, Scoring, register

if TYPE_CHECKING:
    import torch

    from fgsn_daemon.engine.activations import NeuronStats


@register
class Wanda(Scoring):
    name = "wanda"
    summary = "|W_out[:, i]|_1 x RMS of the activation (the paper's reading)"

    def score(
        self, harmful: NeuronStats, benign: NeuronStats, out_weight_col_l1: torch.Tensor, positions: str
    ) -> NeuronScores:
        w = out_weight_col_l1
        return NeuronScores(w * harmful.rms(positions), w * benign.rms(positions))
