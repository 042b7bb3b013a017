"""``safe_lora``: the paper's reading, ``C = V Vᵀ / ‖V‖_F`` on the output side, applied as
``(V[B] Vᵀ) ΔW`` for row blocks and ``V (Vᵀ ΔW[:, B])`` for column blocks (no d×d matrix)."""

from __future__ import annotations

from typing import Any

import torch

from fgsn_daemon.engine.operators.base import Operator, register


@register
class SafeLora(Operator):
    name = "safe_lora"
    summary = "C = V V^T / ||V||_F applied to the delta (Safe LoRA's projection)"

    def prepare(self, v: torch.Tensor, delta: torch.Tensor, rank: int) -> Any:
        return torch.linalg.norm(v)

    def block(
        self, state: Any, v: torch.Tensor, delta: torch.Tensor, axis: int, lo: int, hi: int
    ) -> torch.Tensor:
        v_norm = state
        if v_norm == 0:
            return torch.zeros_like(delta[lo:hi] if axis == 0 else delta[:, lo:hi])
        if axis == 0:
            return (v[lo:hi] @ v.T) @ delta / v_norm
        return v @ (v.T @ delta[:, lo:hi]) / v_norm
