"""``projector``: the idempotent ``U_r U_rᵀ`` onto V's top-r left singular subspace."""

from __future__ import annotations

from typing import Any

import torch

from fgsn_daemon.engine.operators.base import Operator, register


@register
class Projector(Operator):
    name = "projector"
    summary = "U_r U_r^T onto the top-r left singular vectors of V"

    def prepare(self, v: torch.Tensor, delta: torch.Tensor, rank: int) -> Any:
        u, s, _ = torch.linalg.svd(v, full_matrices=False)
        keep = min(rank, int((s > s.max() * 1e-12).sum()) if s.numel() and s.max() > 0 else 0)
        return u[:, :keep]

    def block(
        self, state: Any, v: torch.Tensor, delta: torch.Tensor, axis: int, lo: int, hi: int
    ) -> torch.Tensor:
        u_r = state
        if axis == 0:
            return u_r[lo:hi] @ (u_r.T @ delta)
        return u_r @ (u_r.T @ delta[:, lo:hi])
