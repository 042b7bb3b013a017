"""The FGSN pipeline for one safety dimension, as a library.

``ModelTrio`` opens and validates the three checkpoints. ``Localiser`` keeps the scoring model
resident and caches what does not depend on the dimension (benign statistics, layer curve).
``write_edited_checkpoint`` turns a set of neurons into a new checkpoint from the immutable
inputs. ``apply_dimension`` chains them for the one-shot ``fgsn apply`` command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
    group_by_layer_space,
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
    ScoredNeuron,
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
    # Delta attribution only (scoring="attribution"):
    allocation: str = defaults.ALLOCATION  # per_layer: top-q % of each band layer | global: a budget over all
    budget: float = defaults.BUDGET  # global / entry units: percent of all parameters that may be restored
    unit: str = defaults.UNIT  # neuron | entry (single weight entries, restore operator only)
    scope: str = defaults.SCOPE  # global / entry units: which layers compete: all | band
    target_tokens: int = 16  # length of the greedy responses the attribution losses are taken on
    # over-refusal guard (global / entry units): the budget is cut, along a halving ladder, to the
    # largest step whose refusal rate on benign calibration prompts stays within this many points
    # of the fine-tuned model's; None = no guard
    guard: float | None = defaults.GUARD
    guard_prompts: int = 64  # benign calibration prompts (from the scoring set, never the report set)

    def __post_init__(self) -> None:
        # allocation and unit belong to the attribution scoring; the activation scorings always
        # select whole neurons per band layer (so a preset's attribution values do not leak in)
        if self.scoring in ("wanda", "contrast"):
            object.__setattr__(self, "allocation", "per_layer")
            object.__setattr__(self, "unit", "neuron")

    def validate(self) -> None:
        scoring = parse_scoring(self.scoring)
        parse_operator(self.operator)
        if self.allocation not in ("per_layer", "global") or self.unit not in ("neuron", "entry"):
            raise ConfigError(
                f"allocation must be per_layer or global and unit neuron or entry "
                f"(got {self.allocation!r}, {self.unit!r})"
            )
        if self.scope not in ("all", "band"):
            raise ConfigError(f"scope must be 'all' or 'band' (got {self.scope!r})")
        if scoring.uses_activation_stats and (self.allocation != "per_layer" or self.unit != "neuron"):
            raise ConfigError("global allocation and entry units need scoring='attribution'")
        if self.unit == "entry" and self.operator != "restore":
            raise ConfigError("entry units are restored to their aligned values: use operator='restore'")
        if self.guard is not None and not 0 <= self.guard <= 100:
            raise ConfigError(f"guard must be in [0, 100] points (got {self.guard})")
        if not 0 < self.budget <= 100 or self.target_tokens < 1:
            raise ConfigError(f"budget must be in (0, 100] and target_tokens >= 1 (got {self.budget})")
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
            allocation=self.allocation,
            budget=self.budget,
            unit=self.unit,
            scope=self.scope,
            guard=self.guard,
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


def unit_tensors(
    trio: ModelTrio, layers: Iterable[int], spaces: Sequence[str]
) -> dict[str, tuple[int, str, int]]:
    """Tensor name -> (layer, space, neuron axis) of every unit tensor in ``layers`` × ``spaces``."""
    return {
        name: (layer, space, axis)
        for layer in layers
        for space in spaces
        for name, axis in trio.space_tensors(layer, space)
    }


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
    _aligned_model: Any = None
    _ft_model: Any = None
    _benign_effects: tuple[Any, Any] | None = None
    last_effects: tuple[Any, Any, dict[str, tuple[int, str, int]]] | None = None
    guard_trace: list[dict[str, float]] = field(default_factory=list)

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

    # ------------------------------------------------------------------ delta attribution

    def _aligned(self) -> Any:
        """The aligned model (for refusal targets): the scoring model when it is the aligned one."""
        self.ensure_model()
        if self.params.score_model == "aligned":
            return self.model
        if self._aligned_model is None:
            self._aligned_model = load_scoring_model(self.trio, "aligned", self.device)
        return self._aligned_model

    def _finetuned(self) -> Any:
        """The fine-tuned model (immutable weights; gradients are taken here)."""
        self.ensure_model()
        if self.params.score_model == "finetuned":
            return self.model
        if self._ft_model is None:
            self.progress("loading the fine-tuned model (attribution)")
            self._ft_model = load_scoring_model(self.trio, "finetuned", self.device)
        return self._ft_model

    def attribution_layers(self) -> list[int]:
        """Layers whose units compete: the band (per-layer allocation or scope=band), else all."""
        if self.params.allocation == "per_layer" or self.params.scope == "band":
            if self.band is None:
                raise FGSNError("the band is not established yet")
            return self.band.layers
        return list(range(self.trio.num_layers))

    def scored_tensors(self, layers: Sequence[int]) -> dict[str, tuple[int, str, int]]:
        """Tensor name -> (layer, space, neuron axis) of every unit tensor in ``layers``."""
        return unit_tensors(self.trio, layers, self.params.spaces)

    def revert_deltas(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """``W_aligned − W_finetuned`` from the immutable inputs."""
        return {
            n: (self.trio.aligned.read(n).double() - self.trio.finetuned.read(n).double()).float()
            for n in names
        }

    def _effects(
        self, prompts: Sequence[str], responses: Sequence[str], names: Sequence[str], what: str
    ) -> Any:
        from fgsn_daemon.attribution import delta_effects

        self.progress(f"attribution: {what} ({len(prompts)} prompts, backward passes)")
        return delta_effects(
            self._finetuned(),
            self.tokenizer,
            prompts,
            responses,
            self.revert_deltas(names),
            entries=self.params.unit == "entry",
            batch_size=max(1, self.params.batch_size // 2),
            max_length=self.params.max_length,
            use_chat_template=self.params.use_chat_template,
            desc=what,
            progress=self.progress,
        )

    def _generate(self, model: Any, prompts: Sequence[str], what: str) -> list[str]:
        from fgsn_daemon.evaluation import generate_responses

        self.progress(f"attribution: {what} ({len(prompts)} prompts, greedy)")
        return generate_responses(
            model,
            self.tokenizer,
            prompts,
            self.params.target_tokens,
            batch_size=self.params.batch_size,
            use_chat_template=self.params.use_chat_template,
        )

    def benign_effects(self, names: Sequence[str], prompts: Sequence[str] | None = None) -> Any:
        """Effects on the fine-tuned model's own answers to the benign/task prompts; the shared
        set's are computed once per tensor list and reused for every dimension."""
        shared = prompts is None
        key = (tuple(names), self.params.unit)
        if shared and self._benign_effects is not None and self._benign_effects[0] == key:
            return self._benign_effects[1]
        texts = list(self.benign_prompts if prompts is None else prompts)
        answers = self._generate(self._finetuned(), texts, "fine-tuned answers to benign/task prompts")
        effects = self._effects(texts, answers, names, "benign/task loss")
        if shared:
            self._benign_effects = (key, effects)
        return effects

    def harmful_effects(self, harmful_prompts: Sequence[str], names: Sequence[str]) -> Any:
        refusals = self._generate(self._aligned(), harmful_prompts, "aligned responses to harmful prompts")
        return self._effects(harmful_prompts, refusals, names, "refusal loss")

    def attribution_scores(
        self, harmful_prompts: Sequence[str], benign_prompts: Sequence[str] | None = None
    ) -> dict[tuple[int, str], NeuronScores]:
        """Per-unit gain (refusal-loss drop of reverting the unit) and cost (benign-loss rise)."""
        tensors = self.scored_tensors(self.attribution_layers())
        names = sorted(tensors)
        harm = self.harmful_effects(harmful_prompts, names)
        benign = self.benign_effects(names, benign_prompts)
        self.last_effects = (harm, benign, tensors)
        out: dict[tuple[int, str], NeuronScores] = {}
        for name, (layer, space, axis) in tensors.items():
            g = -harm.along(name, axis)
            c = benign.along(name, axis)
            prev = out.get((layer, space))
            out[(layer, space)] = (
                NeuronScores(g, c) if prev is None else NeuronScores(prev.harmful + g, prev.benign + c)
            )
        return out

    def unit_sizes(self, keys: Sequence[tuple[int, str]]) -> dict[tuple[int, str], int]:
        """Parameters one unit of each (layer, space) holds."""
        sizes: dict[tuple[int, str], int] = {}
        for layer, space in keys:
            size = 0
            for name, axis in self.trio.space_tensors(layer, space):
                info = self.trio.aligned.info(name)
                size += info.numel // info.shape[axis]
            sizes[(layer, space)] = size
        return sizes

    def budget_parameters(self) -> int:
        return int(self.trio.aligned.total_parameters() * self.params.budget / 100.0)

    def score_prompts(
        self,
        harmful_prompts: Sequence[str],
        scoring_name: str | None = None,
        positions: str | None = None,
        benign: ActivationStats | None = None,
        benign_prompts: Sequence[str] | None = None,
    ) -> dict[tuple[int, str], NeuronScores]:
        """Unit scores of one dimension, whichever family the scoring belongs to."""
        scoring = parse_scoring(scoring_name or self.params.scoring)
        if not scoring.uses_activation_stats:
            return self.attribution_scores(harmful_prompts, benign_prompts)
        assert self.band is not None
        if benign is None and benign_prompts is not None:
            benign = self.collect(benign_prompts, self.band.layers)
        harmful = self.collect(harmful_prompts, self.band.layers)
        return self.score(harmful, benign, scoring.value, positions)

    def select(
        self,
        scores: Mapping[tuple[int, str], NeuronScores],
        q: float,
        p: float,
        frozen: Mapping[NeuronId, str] | None = None,
    ) -> Selection:
        if self.params.allocation == "global":
            from fgsn_daemon.delta_selection import select_global

            sizes = self.unit_sizes(sorted(scores))

            def candidate_slices(budget: int) -> dict[str, tuple[int, list[int]]]:
                sel = select_global(scores, sizes, budget, p)
                return neuron_slices(self.trio, group_by_layer_space(sel.candidates))

            budget = self.guarded_budget(self.budget_parameters(), slices_at=candidate_slices)
            return select_global(scores, sizes, budget, p, frozen)
        return select_neurons(scores, q, p, frozen)

    def refusal_rate(self, model: Any, prompts: Sequence[str]) -> float:
        from fgsn_daemon.evaluation import generate_responses
        from fgsn_daemon.refusal import KeywordJudge

        answers = generate_responses(
            model, self.tokenizer, prompts, 12, self.params.batch_size, self.params.use_chat_template
        )
        return sum(KeywordJudge().judge(list(prompts), answers)) / max(1, len(prompts))

    def guarded_budget(
        self,
        budget: int,
        masks_at: Callable[[int], Mapping[str, torch.Tensor]] | None = None,
        slices_at: Callable[[int], Mapping[str, tuple[int, list[int]]]] | None = None,
    ) -> int:
        """The over-refusal guard: try budget/16, /8, /4, /2 and the full budget in turn, each edit
        made in memory on the fine-tuned model, and keep the largest whose refusal rate on the
        calibration prompts stays within ``guard`` points of the unedited model's. Every step
        depends only on the immutable inputs and this dimension's prompts (rollback stays exact)."""
        if self.params.guard is None:
            return budget
        model = self._finetuned()
        n = self.params.guard_prompts
        texts = list(self.benign_prompts)
        prompts = [texts[i * len(texts) // n] for i in range(n)] if len(texts) > n else texts
        limit = self.refusal_rate(model, prompts) + self.params.guard / 100.0
        chosen = 0
        self.guard_trace = []
        for step in (budget // 16, budget // 8, budget // 4, budget // 2, budget):
            if step <= chosen:
                continue
            masks = masks_at(step) if masks_at is not None else None
            slices = slices_at(step) if slices_at is not None else None
            with restored_in_memory(model, self.trio, masks=masks, slices=slices):
                rate = self.refusal_rate(model, prompts)
            self.guard_trace.append({"budget": step, "over_refusal": rate, "limit": limit})
            self.progress(f"over-refusal guard: {step} parameters -> {rate:.3f} (limit {limit:.3f})")
            if rate > limit + 1e-12:
                break
            chosen = step
        return chosen

    def localise(
        self, harmful_prompts: Sequence[str], frozen: Mapping[NeuronId, str] | None = None
    ) -> Selection:
        fresh_band = self.band is None
        self.establish_band(harmful_prompts)
        if not parse_scoring(self.params.scoring).uses_activation_stats:
            return self.select(self.attribution_scores(harmful_prompts), self.params.q, self.params.p, frozen)
        harmful = self.harmful_stats(harmful_prompts, reuse_curve_pass=fresh_band)
        return select_neurons(self.score(harmful), self.params.q, self.params.p, frozen)

    def localise_entries(
        self, harmful_prompts: Sequence[str], benign_prompts: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Entry units: boolean masks of the entries to restore, per tensor name."""
        from fgsn_daemon.delta_selection import select_entries

        self.establish_band(harmful_prompts)
        tensors = self.scored_tensors(self.attribution_layers())
        names = sorted(tensors)
        harm = self.harmful_effects(harmful_prompts, names)
        benign = self.benign_effects(names, benign_prompts)
        self.last_effects = (harm, benign, tensors)
        gain = {n: -harm.entries[n] for n in names if n in harm.entries}
        cost = {n: benign.entries[n] for n in gain}

        def masks_at(budget: int) -> dict[str, torch.Tensor]:
            return select_entries(gain, cost, budget, self.params.p)

        return masks_at(self.guarded_budget(self.budget_parameters(), masks_at=masks_at))


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


def neuron_slices(
    trio: ModelTrio, neurons: Mapping[tuple[int, str], Sequence[int]]
) -> dict[str, tuple[int, list[int]]]:
    """Tensor name -> (neuron axis, indices) for a neuron selection."""
    out: dict[str, tuple[int, list[int]]] = {}
    for (layer, space), idx in neurons.items():
        if idx:
            for name, axis in trio.space_tensors(layer, space):
                out[name] = (axis, sorted(idx))
    return out


@contextlib.contextmanager
def restored_in_memory(
    model: Any,
    trio: ModelTrio,
    masks: Mapping[str, torch.Tensor] | None = None,
    slices: Mapping[str, tuple[int, Sequence[int]]] | None = None,
) -> Iterator[None]:
    """Restore entries (``masks``) or neuron slices (``slices``) of a loaded fine-tuned model to
    their aligned values in place; put the fine-tuned values back on exit."""
    masks, slices = masks or {}, slices or {}
    params = dict(model.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in {*masks, *slices}:
            p = params[name]
            saved[name] = p.detach().clone()
            aligned = trio.aligned.read(name).to(device=p.device, dtype=p.dtype)
            if name in masks:
                p.copy_(torch.where(masks[name].to(p.device), aligned, p))
            else:
                axis, idx = slices[name]
                ix = torch.tensor(list(idx), dtype=torch.long, device=p.device)
                if p.dim() == 1 or axis == 0:
                    p[ix] = aligned[ix]
                else:
                    p[:, ix] = aligned[:, ix]
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def restore_entries(finetuned: torch.Tensor, aligned: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entry units: the masked entries take their aligned values, the rest stay fine-tuned (a copy
    either way, so the result does not depend on which other entries are selected)."""
    return torch.where(mask, aligned.to(finetuned.dtype), finetuned)


def write_entry_restored_checkpoint(
    trio: ModelTrio,
    masks: Mapping[str, torch.Tensor],
    out_dir: Path,
    band: Band,
    spaces: Sequence[str],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    reuse_from: Path | None = None,
) -> EditOutcome:
    """Write fine-tuned weights with the masked entries restored to aligned."""
    edited = sorted(n for n, m in masks.items() if bool(m.any()))
    changed = 0

    def editor(name: str) -> Callable[[], torch.Tensor]:
        def compute() -> torch.Tensor:
            nonlocal changed
            ft = trio.finetuned.read(name)
            new = restore_entries(ft, trio.aligned.read(name), masks[name])
            changed += int((new != ft).sum())
            return new

        return compute

    edit_group = set(band_tensor_names(trio, band, spaces)) | set(edited)
    write_checkpoint(
        out_dir,
        trio.finetuned,
        {n: editor(n) for n in edited},
        sorted(edit_group),
        aux_dirs=[trio.finetuned.path, trio.aligned.path],
        max_shard_bytes=max_shard_bytes,
        reuse_from=reuse_from,
    )
    modified = sum(int(masks[n].sum()) for n in edited)
    total = trio.aligned.total_parameters()
    band_params = sum(trio.aligned.info(n).numel for n in band_tensor_names(trio, band, spaces))
    return EditOutcome(
        ModificationRatio(
            modified_parameters=modified,
            changed_parameters=changed,
            total_parameters=total,
            band_parameters=band_params,
            ratio=modified / total if total else 0.0,
            band_ratio=modified / band_params if band_params else 0.0,
        ),
        edited,
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
        masks: dict[str, torch.Tensor] | None = None
        if params.unit == "entry":
            if frozen:
                raise ConfigError("entry units are not combined with frozen neurons in a one-shot apply")
            masks = loc.localise_entries(harmful_prompts)
            selection = entry_selection(loc, masks)
        else:
            selection = loc.localise(harmful_prompts, frozen)
        assert loc.curve is not None and loc.band is not None
        neurons: dict[tuple[int, str], list[int]] = {}
        for n in selection.selected:
            neurons.setdefault((n.layer, n.space), []).append(n.index)
        edited: list[str] = []
        if staging is not None and out_path is not None:
            try:
                if masks is not None:
                    outcome = write_entry_restored_checkpoint(
                        trio, masks, staging, loc.band, params.spaces, max_shard_bytes=max_shard_bytes
                    )
                else:
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
        elif masks is not None:
            modification = count_entry_modification(trio, masks, loc.band, params.spaces)
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


def entry_selection(loc: Localiser, masks: Mapping[str, torch.Tensor]) -> Selection:
    """Neuron records for entry units: every neuron with a selected entry, scored by the summed
    gain and cost of its selected entries (ranked by gain)."""
    assert loc.last_effects is not None
    harm, benign, tensors = loc.last_effects
    gain: dict[NeuronId, float] = {}
    cost: dict[NeuronId, float] = {}
    for name, mask in masks.items():
        layer, space, axis = tensors[name]
        m = mask if mask.dim() == 2 else mask.reshape(-1, 1)
        g = (-harm.entries[name] * m).reshape(m.shape).sum(dim=1 - axis)
        c = (benign.entries[name] * m).reshape(m.shape).sum(dim=1 - axis)
        for idx in torch.nonzero(m.sum(dim=1 - axis)).flatten().tolist():
            nid = NeuronId(layer, space, idx)
            gain[nid] = gain.get(nid, 0.0) + float(g[idx])
            cost[nid] = cost.get(nid, 0.0) + float(c[idx])
    ranked = sorted(gain, key=lambda n: (-gain[n], n))
    records = [
        ScoredNeuron(
            layer=n.layer,
            space=n.space,
            index=n.index,
            harmful_score=gain[n],
            benign_score=cost[n],
            harmful_rank=r,
        )
        for r, n in enumerate(ranked)
    ]
    return Selection(records, records, [], [])


def count_entry_modification(
    trio: ModelTrio, masks: Mapping[str, torch.Tensor], band: Band, spaces: Sequence[str]
) -> ModificationRatio:
    modified = sum(int(m.sum()) for m in masks.values())
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
