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

import torch

from fgsn_daemon.core.precision import round_to
from fgsn_daemon.engine.operators import Operator, get_operator

BLOCK = 256


def parse_operator(name: str) -> Operator:
    """The registered operator called ``name`` (``fgsn_daemon.engine.operators``)."""
    return get_operator(name)


@dataclass(frozen=True)
class TensorTriple:
    """One tensor from the three inputs, as 2-D (a 1-D bias becomes a column vector)."""

    finetuned: torch.Tensor
    aligned: torch.Tensor
    base: torch.Tensor | None  # not needed (None) when the operator copies the aligned slices


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, 1) if t.dim() == 1 else t


def _blocks(indices: Sequence[int], size: int) -> dict[int, list[int]]:
    by_block: dict[int, list[int]] = {}
    for i in sorted(set(indices)):
        if not 0 <= i < size:
            raise IndexError(f"neuron index {i} outside 0..{size - 1}")
        by_block.setdefault(i // BLOCK, []).append(i)
    return by_block


def project_tensor(
    operator: str | Operator,
    tensors: TensorTriple,
    axis: int,
    indices: Sequence[int],
    rank: int = 8,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Return the fine-tuned tensor with the slices ``indices`` (along ``axis``) replaced."""
    op = get_operator(operator) if isinstance(operator, str) else operator
    out = tensors.finetuned.clone()
    if not indices:
        return out
    dtype = tensors.finetuned.dtype
    ft2, al2 = _as_2d(tensors.finetuned), _as_2d(tensors.aligned)
    out2 = _as_2d(out)
    size = ft2.shape[axis]
    blocks = _blocks(indices, size)
    if op.copies_aligned:
        idx = [i for rows in blocks.values() for i in rows]
        if axis == 0:
            out2[idx] = al2[idx].to(dtype)
        else:
            out2[:, idx] = al2[:, idx].to(dtype)
        return out

    if tensors.base is None:
        raise ValueError(f"operator {op.name!r} needs the base tensor")
    dev = torch.device(device)
    ft = ft2.to(dev, torch.float64)
    al = al2.to(dev, torch.float64)
    v = al - _as_2d(tensors.base).to(dev, torch.float64)
    delta = ft - al
    state = op.prepare(v, delta, rank)
    for block, chosen in blocks.items():
        lo, hi = block * BLOCK, min((block + 1) * BLOCK, size)
        new_block = op.block(state, v, delta, axis, lo, hi)
        local = [i - lo for i in chosen]
        if axis == 0:
            out2[chosen] = round_to((al[chosen] + new_block[local]).cpu(), dtype)
        else:
            out2[:, chosen] = round_to((al[:, chosen] + new_block[:, local]).cpu(), dtype)
    return out
