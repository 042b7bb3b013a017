"""``per_neuron``: keep only the component of each neuron's delta along its own slice of V."""

from __future__ import annotations

from typing import Any

import torch

from fgsn_daemon.engine.operators.base import Operator, register


@register
class PerNeuron(Operator):
    name = "per_neuron"
    summary = "each neuron's delta projected on its own slice of V"

    def block(
        self, state: Any, v: torch.Tensor, delta: torch.Tensor, axis: int, lo: int, hi: int
    ) -> torch.Tensor:
        dim = 1 if axis == 0 else 0
        vb = v[lo:hi] if axis == 0 else v[:, lo:hi]
        db = delta[lo:hi] if axis == 0 else delta[:, lo:hi]
        vv = (vb * vb).sum(dim=dim, keepdim=True)
        coef = torch.where(vv > 0, (vb * db).sum(dim=dim, keepdim=True) / vv.clamp_min(1e-300), 0.0)
        return coef * vb
