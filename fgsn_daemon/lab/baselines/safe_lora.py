"""Safe LoRA (Hsu et al., NeurIPS 2024) applied to full weights, per linear module: project the
fine-tuning delta with ``C = V Vᵀ / ‖V‖_F`` where it points away from the alignment direction."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fgsn_daemon.core.errors import ConfigError
from fgsn_daemon.core.precision import round_to
from fgsn_daemon.engine.io.checkpoint import write_checkpoint
from fgsn_daemon.engine.pipeline import ModelTrio
from fgsn_daemon.lab.baselines.common import (
    DEFAULT_MODULES,
    Baseline,
    BaselineInputs,
    BaselineResult,
    ModuleCosine,
    aux_files,
    changed_entries,
    linear_modules,
    register,
    result_record,
    safe_lora_update,
    tensor_triple,
    write_staged,
)


def safe_lora(
    trio: ModelTrio,
    out: str | Path,
    tau: float = 0.5,
    modules: Sequence[str] = DEFAULT_MODULES,
    top_k: int | None = None,
) -> BaselineResult:
    """Safe LoRA on full weights: per module, ``V = W_al − W_base``, ``ΔW = W_ft − W_al``; where
    ``cos(C·ΔW, ΔW) ≤ τ`` (the update lies far from the alignment subspace; ``≤`` as in IBM's
    code) set ``W = W_al + C·ΔW``. ``top_k`` instead projects the k lowest-cosine modules (Safe
    LoRA's ``number`` mode). Modules whose V or ΔW is zero are left as fine-tuned."""
    names = linear_modules(trio, modules)
    if not names:
        raise ConfigError(f"no linear modules named {', '.join(modules)} in the checkpoint")
    cosines: dict[str, float | None] = {}
    for name in names:  # pass 1: decide (one module in memory at a time)
        _, cosines[name] = safe_lora_update(*tensor_triple(trio, name))
    scored = {n: c for n, c in cosines.items() if c is not None}
    if top_k is not None:
        chosen = set(sorted(scored, key=lambda n: (scored[n], n))[: max(0, top_k)])
    else:
        chosen = {n for n, c in scored.items() if c <= tau}
    changed = 0

    def editor(name: str) -> Callable[[], torch.Tensor]:
        def compute() -> torch.Tensor:  # pass 2: recompute rather than hold every result
            nonlocal changed
            ft, al, base = tensor_triple(trio, name)
            cd, _ = safe_lora_update(ft, al, base)
            assert cd is not None
            new = round_to(al.to(torch.float64) + cd, ft.dtype)
            changed += changed_entries(new, ft)
            return new

        return compute

    def write(staging: Path) -> None:
        edited = {n: editor(n) for n in sorted(chosen)}
        write_checkpoint(staging, trio.finetuned, edited, sorted(chosen), aux_files(trio))

    path = write_staged(out, write)
    modified = sum(trio.aligned.info(n).numel for n in chosen)
    return result_record(
        trio,
        "safe_lora",
        {"tau": tau, "top_k": top_k, "modules": list(modules)},
        path,
        sorted(chosen),
        modified,
        changed,
        modules=[ModuleCosine(name=n, cosine=cosines[n], projected=n in chosen) for n in names],
    )


@register
class SafeLoRA(Baseline):
    name = "safe_lora"
    label = "Safe LoRA"

    def write(self, inputs: BaselineInputs, out: Path) -> BaselineResult:
        return safe_lora(inputs.trio, out, tau=float(inputs.options.get("tau", 0.5)))
