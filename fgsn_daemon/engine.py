"""The FGSN pipeline for one safety dimension, as a library.

``ModelTrio`` opens and validates the three checkpoints. ``Localiser`` keeps the scoring model
resident and caches what does not depend on the dimension (benign statistics, layer curve).
``write_edited_checkpoint`` turns a set of neurons into a new checkpoint from the immutable
inputs. ``apply_dimension`` chains them for the one-shot ``fgsn apply`` command.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fgsn_daemon import defaults
from fgsn_daemon.activations import (
    ActivationStats,
    collect_stats,
    load_model,
    load_tokenizer,
    resolve_device,
)
from fgsn_daemon.architectures import ArchitectureSpec, spec_for_config
from fgsn_daemon.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    Checkpoint,
    LoraFinetuned,
    TensorSource,
    check_compatible,
    open_finetuned,
    write_checkpoint,
)
from fgsn_daemon.errors import ConfigError, FGSNError
from fgsn_daemon.localisation import (
    NeuronScores,
    Selection,
    choose_band,
    layer_curve,
    parse_scoring,
    score_neurons,
    select_neurons,
)
from fgsn_daemon.projection import TensorTriple, parse_operator, project_tensor
from fgsn_daemon.records import (
    ApplyParams,
    ApplyResult,
    Band,
    LayerCurve,
    ModificationRatio,
    NeuronId,
)

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class FGSNParams:
    scoring: str = defaults.SCORING
    positions: str = "all"  # which token positions feed the neuron statistics: all | last
    operator: str = defaults.OPERATOR
    q: float = defaults.Q  # top-q % of neurons by harmful score, per layer
    p: float = defaults.P  # minus top-p % by benign score
    spaces: tuple[str, ...] = defaults.SPACES
    score_model: str = "aligned"  # whose activations and weights are scored: aligned | finetuned
    rank: int = 8  # for the projector operator
    band: tuple[int, int] | None = None  # override of the automatic safety band
    batch_size: int = 16
    max_length: int = 256
    use_chat_template: bool = True

    def validate(self) -> None:
        parse_scoring(self.scoring)
        parse_operator(self.operator)
        if self.positions not in ("all", "last"):
            raise ConfigError(f"positions must be 'all' or 'last' (got {self.positions!r})")
        if self.score_model not in ("aligned", "finetuned"):
            raise ConfigError(f"score_model must be 'aligned' or 'finetuned' (got {self.score_model!r})")
        if not 0 < self.q <= 100 or not 0 <= self.p <= 100:
            raise ConfigError(f"q must be in (0, 100] and p in [0, 100] (got q={self.q}, p={self.p})")
        if self.rank < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ConfigError("rank and batch_size must be >= 1 and max_length >= 2")
        if not self.spaces:
            raise ConfigError("at least one neuron space is needed")

    def record(self) -> ApplyParams:
        return ApplyParams(
            scoring=self.scoring,
            positions=self.positions,
            operator=self.operator,
            q=self.q,
            p=self.p,
            spaces=list(self.spaces),
            score_model=self.score_model,
            rank=self.rank,
            band_override=self.band,
        )


@dataclass
class ModelTrio:
    base: Checkpoint
    aligned: Checkpoint
    finetuned: Checkpoint | LoraFinetuned
    spec: ArchitectureSpec

    @classmethod
    def open(cls, base: str | Path, aligned: str | Path, finetuned: str | Path) -> ModelTrio:
        b = Checkpoint(base)
        a = Checkpoint(aligned)
        f = open_finetuned(finetuned, a)
        spec = spec_for_config(a.config)
        check_compatible({"base": b, "aligned": a, "finetuned": f})
        trio = cls(b, a, f, spec)
        for space in spec.neuron_spaces:
            for layer in range(trio.num_layers):
                for slot in spec.space(space).tensors:
                    a.info(spec.tensor_name(layer, slot.name))  # raises if a required tensor is absent
        return trio

    @property
    def num_layers(self) -> int:
        return int(self.aligned.config["num_hidden_layers"])

    def close(self) -> None:
        for c in (self.base, self.aligned, self.finetuned):
            c.close()

    def space_tensors(self, layer: int, space: str) -> list[tuple[str, int]]:
        """(tensor name, neuron axis) of every tensor present in the checkpoint for this unit."""
        sp = self.spec.space(space)
        present = set(self.aligned.names())
        out = []
        for slot in [*sp.tensors, *sp.optional_tensors]:
            name = self.spec.tensor_name(layer, slot.name)
            if name in present:
                out.append((name, slot.axis))
        return out

    def scoring_source(self, which: str) -> TensorSource:
        return self.aligned if which == "aligned" else self.finetuned


def load_scoring_model(trio: ModelTrio, which: str, device: torch.device) -> Any:
    """The model whose activations are scored; a LoRA fine-tune is merged in memory."""
    if which == "aligned" or not isinstance(trio.finetuned, LoraFinetuned):
        path = trio.aligned.path if which == "aligned" else trio.finetuned.path
        return load_model(path, device)
    model = load_model(trio.aligned.path, device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in trio.finetuned.modules:
            if name not in params:
                raise FGSNError(f"LoRA target {name} is not a parameter of the loaded model")
            params[name].copy_(trio.finetuned.read(name).to(params[name].device))
    return model


@dataclass
class Localiser:
    """Scoring model kept resident between dimensions, plus dimension-independent caches."""

    trio: ModelTrio
    params: FGSNParams
    device: torch.device
    benign_prompts: Sequence[str]
    model: Any = None
    tokenizer: Any = None
    _benign: ActivationStats | None = None
    _curve_harmful: ActivationStats | None = None
    curve: LayerCurve | None = None
    band: Band | None = None
    progress: Callable[[str], None] = field(default=lambda _msg: None)

    def ensure_model(self) -> None:
        if self.model is None:
            self.progress("loading scoring model")
            self.model = load_scoring_model(self.trio, self.params.score_model, self.device)
            self.tokenizer = load_tokenizer(self.trio.aligned.path)

    def collect(self, prompts: Sequence[str], layers: Sequence[int], curve: bool = False) -> ActivationStats:
        self.ensure_model()
        return collect_stats(
            self.model,
            self.tokenizer,
            self.trio.spec,
            prompts,
            layers,
            self.params.spaces,
            curve=curve,
            batch_size=self.params.batch_size,
            max_length=self.params.max_length,
            use_chat_template=self.params.use_chat_template,
        )

    def establish_band(self, harmful_prompts: Sequence[str]) -> Band:
        """Curve and band from the benign set and these harmful prompts (done once per lineage).
        Neuron stats for all layers ride along on the same forward pass, so nothing is run twice."""
        if self.band is not None:
            return self.band
        every_layer = list(range(self.trio.num_layers))
        self.progress("benign forward pass (layer curve + neuron statistics)")
        self._benign = self.collect(self.benign_prompts, every_layer, curve=True)
        self.progress("harmful forward pass (layer curve + neuron statistics)")
        self._curve_harmful = self.collect(harmful_prompts, every_layer, curve=True)
        self.curve = layer_curve(self._benign, self._curve_harmful)
        self.band = choose_band(self.curve, self.params.band)
        return self.band

    def set_benign(self, stats: ActivationStats) -> None:
        """Reuse benign statistics computed earlier (the daemon's cache)."""
        self._benign = stats

    def has_benign(self, keys: set[tuple[int, str]]) -> bool:
        return self._benign is not None and keys <= set(self._benign.neurons)

    @property
    def benign_stats(self) -> ActivationStats:
        if self._benign is None:
            raise FGSNError("benign statistics are not computed yet")
        return self._benign

    def harmful_stats(self, harmful_prompts: Sequence[str], reuse_curve_pass: bool) -> ActivationStats:
        if reuse_curve_pass and self._curve_harmful is not None:
            stats, self._curve_harmful = self._curve_harmful, None
            return stats
        assert self.band is not None
        self.progress("harmful forward pass (band only)")
        return self.collect(harmful_prompts, self.band.layers, curve=False)

    def score(
        self,
        harmful: ActivationStats,
        benign: ActivationStats | None = None,
        scoring_name: str | None = None,
        positions: str | None = None,
    ) -> dict[tuple[int, str], NeuronScores]:
        assert self.band is not None
        benign = benign or self.benign_stats
        scoring = parse_scoring(scoring_name or self.params.scoring)
        positions = positions or self.params.positions
        source = self.trio.scoring_source(self.params.score_model)
        out: dict[tuple[int, str], NeuronScores] = {}
        for layer in self.band.layers:
            for space in self.params.spaces:
                key = (layer, space)
                w_out = source.read(
                    self.trio.spec.tensor_name(layer, self.trio.spec.space(space).output_tensor)
                )
                col_l1 = w_out.to(torch.float64).abs().sum(0)
                out[key] = score_neurons(
                    scoring,
                    harmful.neurons[key],
                    benign.neurons[key],
                    col_l1,
                    positions,
                )
        return out

    def localise(
        self, harmful_prompts: Sequence[str], frozen: Mapping[NeuronId, str] | None = None
    ) -> Selection:
        fresh_band = self.band is None
        self.establish_band(harmful_prompts)
        harmful = self.harmful_stats(harmful_prompts, reuse_curve_pass=fresh_band)
        return select_neurons(self.score(harmful), self.params.q, self.params.p, frozen)


@dataclass(frozen=True)
class EditOutcome:
    modification: ModificationRatio
    edited_tensors: list[str]


def band_tensor_names(trio: ModelTrio, band: Band, spaces: Sequence[str]) -> list[str]:
    return [name for layer in band.layers for space in spaces for name, _ in trio.space_tensors(layer, space)]


def write_edited_checkpoint(
    trio: ModelTrio,
    neurons: Mapping[tuple[int, str], Sequence[int]],
    operator: str,
    out_dir: Path,
    band: Band,
    spaces: Sequence[str],
    rank: int = 8,
    device: torch.device | str = "cpu",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    reuse_from: Path | None = None,
) -> EditOutcome:
    """Write fine-tuned weights with ``neurons`` projected, computed only from the three inputs."""
    op = parse_operator(operator)
    per_tensor: dict[str, tuple[int, list[int]]] = {}
    for (layer, space), indices in neurons.items():
        if indices:
            for name, axis in trio.space_tensors(layer, space):
                per_tensor[name] = (axis, sorted(indices))
    changed = 0

    def editor(name: str) -> Callable[[], torch.Tensor]:
        axis, indices = per_tensor[name]

        def compute() -> torch.Tensor:
            nonlocal changed
            ft = trio.finetuned.read(name)
            triple = TensorTriple(ft, trio.aligned.read(name), trio.base.read(name))
            new = project_tensor(op, triple, axis, indices, rank=rank, device=device)
            changed += int((new != ft).sum())
            return new

        return compute

    edit_group = set(band_tensor_names(trio, band, spaces)) | set(per_tensor)
    write_checkpoint(
        out_dir,
        trio.finetuned,
        {n: editor(n) for n in per_tensor},
        sorted(edit_group),
        aux_dirs=[trio.finetuned.path, trio.aligned.path],
        max_shard_bytes=max_shard_bytes,
        reuse_from=reuse_from,
    )
    counts = count_modification(trio, neurons, band, spaces)
    return EditOutcome(
        counts.model_copy(update={"changed_parameters": changed}),
        sorted(per_tensor),
    )


def prepare_output_dir(out: Path) -> Path:
    """Refuse to overwrite; return a staging folder beside ``out`` (published by rename)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FGSNError(f"{out}: output exists and is not an empty folder; choose a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent / f".{out.name}.staging-{os.getpid()}"


def publish(staging: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()
    os.rename(staging, out)


def apply_dimension(
    base: str | Path,
    aligned: str | Path,
    finetuned: str | Path,
    harmful_prompts: Sequence[str],
    benign_prompts: Sequence[str],
    out: str | Path | None,
    params: FGSNParams | None = None,
    frozen: Mapping[NeuronId, str] | None = None,
    device: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[str], None] | None = None,
) -> ApplyResult:
    """The one-shot pipeline: localise this dimension's neurons, project them, write ``out``."""
    params = params or FGSNParams()
    params.validate()
    dev = resolve_device(device)
    out_path = Path(out) if out is not None else None
    staging = prepare_output_dir(out_path) if out_path is not None else None
    trio = ModelTrio.open(base, aligned, finetuned)
    try:
        loc = Localiser(trio, params, dev, benign_prompts, progress=progress or (lambda _m: None))
        selection = loc.localise(harmful_prompts, frozen)
        assert loc.curve is not None and loc.band is not None
        neurons: dict[tuple[int, str], list[int]] = {}
        for n in selection.selected:
            neurons.setdefault((n.layer, n.space), []).append(n.index)
        edited: list[str] = []
        if staging is not None and out_path is not None:
            try:
                outcome = write_edited_checkpoint(
                    trio,
                    neurons,
                    params.operator,
                    staging,
                    loc.band,
                    params.spaces,
                    rank=params.rank,
                    device=dev,
                    max_shard_bytes=max_shard_bytes,
                )
                publish(staging, out_path)
            finally:
                if staging.exists():
                    shutil.rmtree(staging)
            modification, edited = outcome.modification, outcome.edited_tensors
        else:
            modification = count_modification(trio, neurons, loc.band, params.spaces)
        return ApplyResult(
            params=params.record(),
            curve=loc.curve,
            band=loc.band,
            layer_counts=selection.counts,
            candidates=selection.candidates,
            selected=selection.selected,
            skipped=selection.skipped,
            modification=modification,
            output=str(out_path) if out_path else None,
            edited_tensors=edited,
        )
    finally:
        trio.close()


def count_modification(
    trio: ModelTrio, neurons: Mapping[tuple[int, str], Sequence[int]], band: Band, spaces: Sequence[str]
) -> ModificationRatio:
    """The structural share of parameters a selection would modify (no output written)."""
    modified = 0
    for (layer, space), indices in neurons.items():
        for name, axis in trio.space_tensors(layer, space):
            info = trio.aligned.info(name)
            modified += info.numel // info.shape[axis] * len(indices)
    total = trio.aligned.total_parameters()
    band_params = sum(trio.aligned.info(n).numel for n in band_tensor_names(trio, band, spaces))
    return ModificationRatio(
        modified_parameters=modified,
        changed_parameters=0,
        total_parameters=total,
        band_parameters=band_params,
        ratio=modified / total if total else 0.0,
        band_ratio=modified / band_params if band_params else 0.0,
    )
