"""Projection operators: new values for selected neuron slices of one weight tensor.

Every operator has the form ``W_new[M] = W_aligned[M] + Op(ΔW)[M]`` with the fine-tuning delta
``ΔW = W_finetuned − W_aligned`` and the safety direction ``V = W_aligned − W_base``, all taken from
the immutable inputs. ``M`` indexes the neuron axis (rows for axis 0, columns for axis 1).

Determinism matters more than a few flops: the value written for neuron ``i`` must not depend on
which other neurons are selected, or rolling a dimension back would not equal re-running the
rest from scratch bit for bit. Results are therefore computed in float64 over fixed blocks of
``BLOCK`` neurons (the block containing ``i`` is always the same matmul of the same shape) and
then the selected slices are taken, rounded once to the fine-tuned tensor's dtype (bfloat16 and
float16 included, see ``precision.round_to``). No ``d_out × d_out`` matrix is ever formed: the Safe-LoRA
operator ``C = V Vᵀ / ‖V‖_F`` is applied as ``(V[B] Vᵀ) ΔW`` for row blocks and ``V (Vᵀ ΔW[:, B])``
for column blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch

from fgsn_daemon.errors import ConfigError
from fgsn_daemon.precision import round_to

BLOCK = 256


class Operator(StrEnum):
    SAFE_LORA = "safe_lora"  # the paper's reading: C = V Vᵀ / ‖V‖_F on the output side
    PROJECTOR = "projector"  # idempotent U_r U_rᵀ onto V's top-r left singular subspace
    PER_NEURON = "per_neuron"  # keep only the component of each neuron's delta along its own V slice
    RESTORE = "restore"  # put the selected slices back to their aligned values


def parse_operator(name: str) -> Operator:
    try:
        return Operator(name)
    except ValueError:
        known = ", ".join(o.value for o in Operator)
        raise ConfigError(f"unknown projection operator {name!r} (choose from {known})") from None


@dataclass(frozen=True)
class TensorTriple:
    """One tensor from the three inputs, as 2-D (a 1-D bias becomes a column vector)."""

    finetuned: torch.Tensor
    aligned: torch.Tensor
    base: torch.Tensor


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, 1) if t.dim() == 1 else t


def _blocks(indices: Sequence[int], size: int) -> dict[int, list[int]]:
    by_block: dict[int, list[int]] = {}
    for i in sorted(set(indices)):
        if not 0 <= i < size:
            raise IndexError(f"neuron index {i} outside 0..{size - 1}")
        by_block.setdefault(i // BLOCK, []).append(i)
    return by_block


def _top_left_singular(v: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(v, full_matrices=False)
    keep = min(rank, int((s > s.max() * 1e-12).sum()) if s.numel() and s.max() > 0 else 0)
    return u[:, :keep]


def project_tensor(
    operator: Operator,
    tensors: TensorTriple,
    axis: int,
    indices: Sequence[int],
    rank: int = 8,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Return the fine-tuned tensor with the slices ``indices`` (along ``axis``) replaced."""
    out = tensors.finetuned.clone()
    if not indices:
        return out
    dtype = tensors.finetuned.dtype
    ft2, al2 = _as_2d(tensors.finetuned), _as_2d(tensors.aligned)
    out2 = _as_2d(out)
    size = ft2.shape[axis]
    blocks = _blocks(indices, size)
    if operator is Operator.RESTORE:
        idx = [i for rows in blocks.values() for i in rows]
        if axis == 0:
            out2[idx] = al2[idx].to(dtype)
        else:
            out2[:, idx] = al2[:, idx].to(dtype)
        return out

    dev = torch.device(device)
    ft = ft2.to(dev, torch.float64)
    al = al2.to(dev, torch.float64)
    v = al - _as_2d(tensors.base).to(dev, torch.float64)
    delta = ft - al
    u_r = _top_left_singular(v, rank) if operator is Operator.PROJECTOR else None
    v_norm = torch.linalg.norm(v)
    for block, chosen in blocks.items():
        lo, hi = block * BLOCK, min((block + 1) * BLOCK, size)
        new_block = _project_block(operator, v, delta, v_norm, u_r, axis, lo, hi)
        local = [i - lo for i in chosen]
        if axis == 0:
            out2[chosen] = round_to((al[chosen] + new_block[local]).cpu(), dtype)
        else:
            out2[:, chosen] = round_to((al[:, chosen] + new_block[:, local]).cpu(), dtype)
    return out


def _project_block(
    operator: Operator,
    v: torch.Tensor,
    delta: torch.Tensor,
    v_norm: torch.Tensor,
    u_r: torch.Tensor | None,
    axis: int,
    lo: int,
    hi: int,
) -> torch.Tensor:
    """Op(ΔW) restricted to neurons lo..hi-1, as rows (axis 0) or columns (axis 1)."""
    if operator is Operator.SAFE_LORA:
        if v_norm == 0:
            return torch.zeros_like(delta[lo:hi] if axis == 0 else delta[:, lo:hi])
        if axis == 0:
            return (v[lo:hi] @ v.T) @ delta / v_norm
        return v @ (v.T @ delta[:, lo:hi]) / v_norm
    if operator is Operator.PROJECTOR:
        assert u_r is not None
        if axis == 0:
            return u_r[lo:hi] @ (u_r.T @ delta)
        return u_r @ (u_r.T @ delta[:, lo:hi])
    if operator is Operator.PER_NEURON:
        dim = 1 if axis == 0 else 0
        vb = v[lo:hi] if axis == 0 else v[:, lo:hi]
        db = delta[lo:hi] if axis == 0 else delta[:, lo:hi]
        vv = (vb * vb).sum(dim=dim, keepdim=True)
        coef = torch.where(vv > 0, (vb * db).sum(dim=dim, keepdim=True) / vv.clamp_min(1e-300), 0.0)
        return coef * vb
    raise ConfigError(f"operator {operator} has no block form")
