"""Rounding float64 results to a checkpoint's dtype exactly once.

Edits are computed in float64 and written in the checkpoint's own dtype. torch converts float64
to bfloat16 / float16 through float32, i.e. it rounds twice, and now and then lands on the wrong
neighbour: ``1 + 2⁻⁸ + 2⁻³⁰`` becomes 1.0 in bfloat16 instead of ``1 + 2⁻⁷``. Rounding to float32
with round-to-odd first makes the second rounding the only one that matters (float32 keeps at
least two more significand bits than either half format), so the result is the correctly
rounded value (nearest, ties to even) on any device.
"""

from __future__ import annotations

import torch


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` converted to ``dtype``; a float64 ``x`` is rounded once to the nearest value."""
    if x.dtype != torch.float64 or not dtype.is_floating_point or torch.finfo(dtype).bits >= 32:
        return x.to(dtype)  # no intermediate rounding on these paths
    f = x.to(torch.float32)
    wide = f.to(torch.float64)
    # round-to-odd: an inexact result with an even last bit moves to its other neighbour of x
    inexact = wide != x
    even = (f.view(torch.int32) & 1) == 0
    toward = torch.where(x > wide, f.new_tensor(float("inf")), f.new_tensor(float("-inf")))
    odd = torch.where(inexact & even, torch.nextafter(f, toward), f)
    return odd.to(dtype)
