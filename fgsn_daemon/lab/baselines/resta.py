"""RESTA (Bhardwaj et al., ACL 2024): add back a scaled safety vector everywhere."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from fgsn_daemon.engine.io.checkpoint import write_checkpoint
from fgsn_daemon.engine.pipeline import ModelTrio
from fgsn_daemon.lab.baselines.common import (
    Baseline,
    BaselineInputs,
    BaselineResult,
    aux_files,
    changed_entries,
    is_float_tensor,
    register,
    resta_tensor,
    result_record,
    tensor_triple,
    write_staged,
)


def resta(trio: ModelTrio, out: str | Path, beta: float = 0.5) -> BaselineResult:
    """RESTA: ``θ = θ_ft + β·(θ_al − θ_unaligned)`` on every floating tensor.

    The paper's unaligned model is the aligned one *harmfully fine-tuned*; we have no such model
    and use the base instead, as SafeTune's ``ReStaTrainer`` does (no DARE: the safety vector is
    added densely)."""
    names = [n for n in trio.finetuned.names() if is_float_tensor(trio, n)]
    changed = 0

    def editor(name: str) -> Callable[[], torch.Tensor]:
        def compute() -> torch.Tensor:
            nonlocal changed
            ft, al, base = tensor_triple(trio, name)
            new = resta_tensor(ft, al, base, beta)
            changed += changed_entries(new, ft)
            return new

        return compute

    def write(staging: Path) -> None:
        write_checkpoint(staging, trio.finetuned, {n: editor(n) for n in names}, names, aux_files(trio))

    path = write_staged(out, write)
    modified = sum(trio.aligned.info(n).numel for n in names)
    return result_record(trio, "resta", {"beta": beta, "unaligned": "base"}, path, names, modified, changed)


@register
class Resta(Baseline):
    name = "resta"
    label = "RESTA"

    def write(self, inputs: BaselineInputs, out: Path) -> BaselineResult:
        return resta(inputs.trio, out, beta=float(inputs.options.get("beta", 0.5)))
