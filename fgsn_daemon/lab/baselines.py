"""Post-hoc safety baselines, written with the same streaming checkpoint writer as FGSN.

Each baseline is a pure function of the three immutable checkpoints (base, aligned, fine-tuned)
and writes a loadable model folder; untouched tensors are copied byte for byte, so the share of
parameters modified is counted the same way for every method (denominator: all parameters
stored in the fine-tuned checkpoint).

- :func:`safe_lora` — Safe LoRA (Hsu et al., NeurIPS 2024) applied to full weights, per linear
  module: project the fine-tuning delta with ``C = V Vᵀ / ‖V‖_F`` where it points away from the
  alignment direction.
- :func:`resta` — RESTA (Bhardwaj et al., ACL 2024): add back a scaled safety vector everywhere.
- :func:`random_neurons` — the same per-layer neuron count and band as an FGSN run, with random
  indices, projected with the same operator (the control FGSN must beat).
- :func:`restore_band` — every neuron of the band set back to its aligned value.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from fgsn_daemon.core.errors import ConfigError
from fgsn_daemon.core.precision import round_to
from fgsn_daemon.core.records import Band, NeuronId
from fgsn_daemon.engine.io.checkpoint import write_checkpoint
from fgsn_daemon.engine.pipeline import ModelTrio, prepare_output_dir, publish, write_edited_checkpoint

# The linear modules Safe LoRA targets (its default LoRA targets are q/v; full FT touches all).
DEFAULT_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModuleCosine(_Record):
    name: str
    cosine: float | None  # None when ΔW or V is zero (nothing to compare)
    projected: bool


class BaselineResult(_Record):
    method: str
    params: dict[str, float | int | str | list[str] | list[int] | None]
    output: str
    edited_tensors: list[str]
    modified_parameters: int  # entries inside the edited tensors or slices
    changed_parameters: int  # of those, entries whose value differs from the fine-tuned one
    total_parameters: int
    share_modified: float  # modified_parameters / total_parameters
    denominator: str = "all parameters stored in the fine-tuned checkpoint"
    modules: list[ModuleCosine] = []  # Safe LoRA: every candidate module and its decision
    neurons: dict[str, list[int]] = {}  # neuron baselines: "layer:space" -> indices


# ------------------------------------------------------------------------------------- math


def safe_lora_update(
    finetuned: torch.Tensor, aligned: torch.Tensor, base: torch.Tensor
) -> tuple[torch.Tensor | None, float | None]:
    """``(C·ΔW, cos(C·ΔW, ΔW))`` in float64 with ``C = V Vᵀ/‖V‖_F``; ``(None, None)`` when V or
    ΔW is zero. C is never formed: the d×d intermediate is ``Vᵀ ΔW`` or ``V Vᵀ``, whichever has
    the smaller side, so memory stays at most min(d_out, d_in)² beyond the weights."""
    al = aligned.to(torch.float64)
    v = al - base.to(torch.float64)
    delta = finetuned.to(torch.float64) - al
    v_norm, d_norm = torch.linalg.norm(v), torch.linalg.norm(delta)
    if v_norm == 0 or d_norm == 0:
        return None, None
    d_out, d_in = v.shape
    cd = v @ (v.T @ delta) / v_norm if d_in <= d_out else (v @ v.T) @ delta / v_norm
    cd_norm = torch.linalg.norm(cd)
    cos = float((cd * delta).sum() / (cd_norm * d_norm)) if cd_norm > 0 else 0.0
    return cd, cos


def resta_tensor(
    finetuned: torch.Tensor, aligned: torch.Tensor, base: torch.Tensor, beta: float
) -> torch.Tensor:
    """``θ_ft + β(θ_al − θ_base)`` in float64, rounded once to the fine-tuned dtype."""
    safety = aligned.to(torch.float64) - base.to(torch.float64)
    return round_to(finetuned.to(torch.float64) + beta * safety, finetuned.dtype)


def random_indices(size: int, count: int, seed: int, layer: int, space: str) -> list[int]:
    """Sorted random neuron indices; the stream depends only on (seed, layer, space), so the pick
    for one layer does not change when another layer's count does."""
    if not 0 <= count <= size:
        raise ConfigError(f"cannot pick {count} of {size} neurons in layer {layer} {space}")
    return sorted(random.Random(f"{seed}:{layer}:{space}").sample(range(size), count))


def neuron_counts(
    selection: Mapping[int, int] | Mapping[tuple[int, str], int | Sequence[int]] | Iterable[NeuronId],
    default_space: str = "mlp",
) -> dict[tuple[int, str], int]:
    """Per (layer, space) counts from ``{layer: n}``, ``{(layer, space): n or indices}`` or an
    iterable of neuron ids (e.g. an FGSN result's ``selected``)."""
    counts: dict[tuple[int, str], int] = {}
    if isinstance(selection, Mapping):
        for key, value in selection.items():
            layer, space = (key, default_space) if isinstance(key, int) else key
            n = value if isinstance(value, int) else len(set(value))
            counts[(int(layer), str(space))] = counts.get((int(layer), str(space)), 0) + n
        return counts
    for neuron in selection:
        key = (neuron.layer, neuron.space)
        counts[key] = counts.get(key, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------- I/O


def _staged(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Write into a staging folder next to ``out`` and rename it into place (nothing half-written)."""
    out_path = Path(out)
    staging = prepare_output_dir(out_path)
    try:
        write(staging)
        publish(staging, out_path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_path


def linear_modules(trio: ModelTrio, modules: Sequence[str]) -> list[str]:
    """2-D ``<module>.weight`` tensors of the decoder layers whose module name is in ``modules``."""
    wanted = set(modules)
    out = []
    for name in trio.aligned.names():
        parts = name.split(".")
        if (
            name.endswith(".weight")
            and len(parts) >= 3
            and parts[-2] in wanted
            and ".layers." in name
            and len(trio.aligned.info(name).shape) == 2
        ):
            out.append(name)
    return sorted(out)


def _changed(new: torch.Tensor, ft: torch.Tensor) -> int:
    return int((new != ft).sum())


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
        _, cosines[name] = safe_lora_update(*_triple(trio, name))
    scored = {n: c for n, c in cosines.items() if c is not None}
    if top_k is not None:
        chosen = set(sorted(scored, key=lambda n: (scored[n], n))[: max(0, top_k)])
    else:
        chosen = {n for n, c in scored.items() if c <= tau}
    changed = 0

    def editor(name: str) -> Callable[[], torch.Tensor]:
        def compute() -> torch.Tensor:  # pass 2: recompute rather than hold every result
            nonlocal changed
            ft, al, base = _triple(trio, name)
            cd, _ = safe_lora_update(ft, al, base)
            assert cd is not None
            new = round_to(al.to(torch.float64) + cd, ft.dtype)
            changed += _changed(new, ft)
            return new

        return compute

    def write(staging: Path) -> None:
        edited = {n: editor(n) for n in sorted(chosen)}
        write_checkpoint(staging, trio.finetuned, edited, sorted(chosen), _aux(trio))

    path = _staged(out, write)
    modified = sum(trio.aligned.info(n).numel for n in chosen)
    return _result(
        trio,
        "safe_lora",
        {"tau": tau, "top_k": top_k, "modules": list(modules)},
        path,
        sorted(chosen),
        modified,
        changed,
        modules=[ModuleCosine(name=n, cosine=cosines[n], projected=n in chosen) for n in names],
    )


def resta(trio: ModelTrio, out: str | Path, beta: float = 0.5) -> BaselineResult:
    """RESTA: ``θ = θ_ft + β·(θ_al − θ_unaligned)`` on every floating tensor.

    The paper's unaligned model is the aligned one *harmfully fine-tuned*; we have no such model
    and use the base instead, as SafeTune's ``ReStaTrainer`` does (no DARE: the safety vector is
    added densely)."""
    names = [n for n in trio.finetuned.names() if _is_float(trio, n)]
    changed = 0

    def editor(name: str) -> Callable[[], torch.Tensor]:
        def compute() -> torch.Tensor:
            nonlocal changed
            ft, al, base = _triple(trio, name)
            new = resta_tensor(ft, al, base, beta)
            changed += _changed(new, ft)
            return new

        return compute

    def write(staging: Path) -> None:
        write_checkpoint(staging, trio.finetuned, {n: editor(n) for n in names}, names, _aux(trio))

    path = _staged(out, write)
    modified = sum(trio.aligned.info(n).numel for n in names)
    return _result(trio, "resta", {"beta": beta, "unaligned": "base"}, path, names, modified, changed)


def random_neurons(
    trio: ModelTrio,
    out: str | Path,
    selection: Mapping[int, int] | Mapping[tuple[int, str], int | Sequence[int]] | Iterable[NeuronId],
    band: Band,
    operator: str = "safe_lora",
    seed: int = 0,
    rank: int = 8,
) -> BaselineResult:
    """Random neurons at FGSN's budget: for each (layer, space) of ``selection`` (counts, or the
    FGSN selection itself), as many random neurons of that layer and space, projected with the
    same ``operator`` through the engine's writer. Deterministic for a given ``seed``."""
    counts = neuron_counts(selection)
    neurons: dict[tuple[int, str], list[int]] = {}
    for (layer, space), count in sorted(counts.items()):
        if layer not in band.layers:
            raise ConfigError(f"layer {layer} of the selection is outside the band {band.start}-{band.end}")
        neurons[(layer, space)] = random_indices(_space_size(trio, layer, space), count, seed, layer, space)
    spaces = sorted({s for _, s in neurons})
    return _neuron_baseline(
        trio,
        out,
        "random_neurons",
        neurons,
        operator,
        band,
        spaces,
        rank,
        {"operator": operator, "seed": seed, "band": [band.start, band.end]},
    )


def restore_band(
    trio: ModelTrio, out: str | Path, band: Band, spaces: Sequence[str] = ("mlp",)
) -> BaselineResult:
    """Every neuron of ``spaces`` in the band layers set back to its aligned value."""
    neurons = {
        (layer, space): list(range(_space_size(trio, layer, space)))
        for layer in band.layers
        for space in spaces
    }
    return _neuron_baseline(
        trio,
        out,
        "restore_band",
        neurons,
        "restore",
        band,
        spaces,
        8,
        {"band": [band.start, band.end], "spaces": list(spaces)},
    )


def _neuron_baseline(
    trio: ModelTrio,
    out: str | Path,
    method: str,
    neurons: dict[tuple[int, str], list[int]],
    operator: str,
    band: Band,
    spaces: Sequence[str],
    rank: int,
    params: dict[str, float | int | str | list[str] | list[int] | None],
) -> BaselineResult:
    outcome = None

    def write(staging: Path) -> None:
        nonlocal outcome
        outcome = write_edited_checkpoint(trio, neurons, operator, staging, band, spaces, rank=rank)

    path = _staged(out, write)
    assert outcome is not None
    mod = outcome.modification
    return _result(
        trio,
        method,
        params,
        path,
        outcome.edited_tensors,
        mod.modified_parameters,
        mod.changed_parameters,
        neurons={f"{layer}:{space}": idx for (layer, space), idx in sorted(neurons.items())},
    )


def _space_size(trio: ModelTrio, layer: int, space: str) -> int:
    tensors = trio.space_tensors(layer, space)
    if not tensors:
        raise ConfigError(f"neuron space {space!r} has no tensors in layer {layer}")
    name, axis = tensors[0]
    return trio.aligned.info(name).shape[axis]


def _triple(trio: ModelTrio, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return trio.finetuned.read(name), trio.aligned.read(name), trio.base.read(name)


def _is_float(trio: ModelTrio, name: str) -> bool:
    from fgsn_daemon.engine.io.safetensors_io import DTYPE_NAMES

    float_names = {DTYPE_NAMES[d] for d in FLOAT_DTYPES if d in DTYPE_NAMES}
    return trio.finetuned.info(name).dtype in float_names


def _aux(trio: ModelTrio) -> list[Path]:
    return [trio.finetuned.path, trio.aligned.path]


def _result(
    trio: ModelTrio,
    method: str,
    params: dict[str, float | int | str | list[str] | list[int] | None],
    path: Path,
    edited: list[str],
    modified: int,
    changed: int,
    modules: list[ModuleCosine] | None = None,
    neurons: dict[str, list[int]] | None = None,
) -> BaselineResult:
    total = sum(trio.finetuned.info(n).numel for n in trio.finetuned.names())
    return BaselineResult(
        method=method,
        params=params,
        output=str(path),
        edited_tensors=edited,
        modified_parameters=modified,
        changed_parameters=changed,
        total_parameters=total,
        share_modified=modified / total if total else 0.0,
        modules=modules or [],
        neurons=neurons or {},
    )
