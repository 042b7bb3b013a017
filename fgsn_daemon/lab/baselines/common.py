"""What every baseline shares: its result record, the math helpers with their dense references in
the tests, staged writing, and the registry (one module per baseline in this package)."""

from __future__ import annotations

import random
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from fgsn_daemon.core.errors import ConfigError
from fgsn_daemon.core.named import NamedRegistry
from fgsn_daemon.core.precision import round_to
from fgsn_daemon.core.records import Band, NeuronId
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


def write_staged(out: str | Path, write: Callable[[Path], None]) -> Path:
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


def changed_entries(new: torch.Tensor, ft: torch.Tensor) -> int:
    return int((new != ft).sum())


def neuron_baseline(
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

    path = write_staged(out, write)
    assert outcome is not None
    mod = outcome.modification
    return result_record(
        trio,
        method,
        params,
        path,
        outcome.edited_tensors,
        mod.modified_parameters,
        mod.changed_parameters,
        neurons={f"{layer}:{space}": idx for (layer, space), idx in sorted(neurons.items())},
    )


def space_size(trio: ModelTrio, layer: int, space: str) -> int:
    tensors = trio.space_tensors(layer, space)
    if not tensors:
        raise ConfigError(f"neuron space {space!r} has no tensors in layer {layer}")
    name, axis = tensors[0]
    return trio.aligned.info(name).shape[axis]


def tensor_triple(trio: ModelTrio, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return trio.finetuned.read(name), trio.aligned.read(name), trio.base.read(name)


def is_float_tensor(trio: ModelTrio, name: str) -> bool:
    from fgsn_daemon.engine.io.safetensors_io import DTYPE_NAMES

    float_names = {DTYPE_NAMES[d] for d in FLOAT_DTYPES if d in DTYPE_NAMES}
    return trio.finetuned.info(name).dtype in float_names


def aux_files(trio: ModelTrio) -> list[Path]:
    return [trio.finetuned.path, trio.aligned.path]


def result_record(
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


# ------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BaselineInputs:
    """What a baseline may use: the trio and, for the neuron baselines, FGSN's band, spaces,
    operator and selection (the random control draws the same per-(layer, space) counts)."""

    trio: ModelTrio
    band: Band | None = None
    spaces: Sequence[str] = ("mlp",)
    operator: str = "safe_lora"
    rank: int = 8
    neurons: Mapping[tuple[int, str], Sequence[int]] | None = None
    seed: int = 0
    options: Mapping[str, float] = field(default_factory=dict)  # per-method knobs: tau, beta


class Baseline(ABC):
    """A post-hoc safety method FGSN is compared with: one module of this package, registered."""

    name: ClassVar[str]
    label: ClassVar[str]  # how tables name it
    seeded: ClassVar[bool] = False  # rows are run per seed and averaged

    @abstractmethod
    def write(self, inputs: BaselineInputs, out: Path) -> BaselineResult:
        """Write the repaired checkpoint to ``out`` (staged, then renamed into place)."""

    @staticmethod
    def need_band(inputs: BaselineInputs) -> Band:
        if inputs.band is None:
            raise ConfigError("this baseline needs FGSN's safety band")
        return inputs.band


BASELINES: NamedRegistry[Baseline] = NamedRegistry("baseline")
register = BASELINES.register
get_baseline = BASELINES.get
baseline_names = BASELINES.names
