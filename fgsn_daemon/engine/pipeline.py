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
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fgsn_daemon.core import defaults
from fgsn_daemon.core.errors import ConfigError, FGSNError
from fgsn_daemon.core.prompts import spread
from fgsn_daemon.core.records import (
    ApplyParams,
    ApplyResult,
    Band,
    LayerCurve,
    ModificationRatio,
    NeuronId,
    PromptSet,
    ScoredNeuron,
)
from fgsn_daemon.engine.activations import (
    ActivationStats,
    Placement,
    collect_stats,
    load_model,
    load_tokenizer,
    offloaded_parameters,
    resolve_device,
)
from fgsn_daemon.engine.architectures import ArchitectureSpec, spec_for_config
from fgsn_daemon.engine.io.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    Checkpoint,
    LoraFinetuned,
    TensorSource,
    check_compatible,
    open_finetuned,
    write_checkpoint,
)
from fgsn_daemon.engine.localisation import (
    Selection,
    choose_band,
    group_by_layer_space,
    layer_curve,
    select_neurons,
)
from fgsn_daemon.engine.projection import TensorTriple, parse_operator, project_tensor
from fgsn_daemon.engine.scorings import NeuronScores, get_scoring

LOG = logging.getLogger(__name__)


def is_activation_scoring(name: str) -> bool:
    """True for a registered activation scoring (unknown names are left to ``validate``)."""
    try:
        return get_scoring(name).uses_activation_stats
    except ConfigError:
        return False


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
    # refusal contrast (attribution): rank units by gain − contrast × (how much reverting them makes
    # the model refuse *benign* prompts), so units that carry refusal in general, not harm-specific
    # refusal, lose their place; 0 = off
    contrast: float = defaults.CONTRAST
    # what the contrast penalises: "refusal" = the refusal's NLL drop on benign prompts; "odds" = the
    # refusal's log-odds against the fine-tuned answer (that drop plus the answer's NLL rise)
    contrast_kind: str = defaults.CONTRAST_KIND
    # iterative selection (entry units): spend the budget in this many steps, re-scoring at the
    # edited weights after each (as Yang et al.'s gradient-guided rollback); 1 = one shot
    steps: int = defaults.STEPS
    # over-refusal hard negatives (entry units): after selecting, find the calibration prompts the
    # edited model refuses, add the effect of each entry on those refusals (the edited model's own
    # words, measured at the fine-tuned weights) times hard_weight to the penalty, select again
    hard_rounds: int = defaults.HARD_ROUNDS
    hard_weight: float = defaults.HARD_WEIGHT
    # at most this many calibration prompts (evenly spread) are answered per hard-negative round
    calibration_max: int = defaults.CALIBRATION_MAX
    # hard positives (in the same rounds): weight of the gain on the dimension's harmful prompts the
    # edited model still answers; 0 = off
    hard_positive_weight: float = defaults.HARD_POSITIVE_WEIGHT
    # where the hard rounds take their gradients: "finetuned" (first order or path-integrated at the
    # fine-tuned weights, as the scores) or "edited" (first order at the round's edited weights:
    # the entries behind the refusals the edit itself causes, with the other chosen entries in)
    hard_at: str = defaults.HARD_AT
    # self-calibrating hard weight: per round, search the smallest weight (from hard_weight, halving
    # or doubling, then bisecting) whose edit refuses at most this many points more calibration
    # prompts than the fine-tuned model; a round whose edit is already within it adds no hard
    # negatives (hard positives still apply). None = the fixed hard_weight; hard_weight 0 = no hard
    # negatives, nothing to search
    hard_target: float | None = defaults.HARD_TARGET
    # attribution: the effects are the mean of the gradients at this many points along the straight
    # path from the current weights to the reverted ones (integrated gradients; 1 = first order at
    # the current weights). Costs that many backward passes per prompt.
    path_steps: int = defaults.PATH_STEPS

    def __post_init__(self) -> None:
        # allocation and unit belong to the attribution scoring; the activation scorings always
        # select whole neurons per band layer (so a preset's attribution values do not leak in)
        if is_activation_scoring(self.scoring):
            object.__setattr__(self, "allocation", "per_layer")
            object.__setattr__(self, "unit", "neuron")
        # hard negatives belong to one-shot entry selection: another unit or iterative steps leave
        # them out (so the default preset's value does not block --unit neuron or --steps N)
        if self.unit != "entry" or self.steps > 1:
            object.__setattr__(self, "hard_rounds", 0)

    def validate(self) -> None:
        """Every field within the bounds of the parameters' one declaration (``core.params``),
        then what only the engine knows: registered methods and which combinations make sense."""
        from pydantic import ValidationError

        from fgsn_daemon.core.params import FGSNFields

        shared = {name: getattr(self, name) for name in FGSNFields.model_fields}
        shared["spaces"] = list(self.spaces)
        try:
            FGSNFields.model_validate(shared)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))} must be in its bounds: {e['msg']} (got {e['input']!r})"
                for e in exc.errors()
            )
            raise ConfigError(problems) from None
        scoring = get_scoring(self.scoring)
        parse_operator(self.operator)
        if scoring.uses_activation_stats and (self.allocation != "per_layer" or self.unit != "neuron"):
            raise ConfigError("global allocation and entry units need scoring='attribution'")
        if self.unit == "entry" and self.operator != "restore":
            raise ConfigError("entry units are restored to their aligned values: use operator='restore'")
        if self.steps > 1 and (self.unit != "entry" or self.guard is not None):
            raise ConfigError(
                f"iterative selection (steps > 1) is for entry units without a guard "
                f"(got steps={self.steps}, unit={self.unit!r}, guard={self.guard})"
            )
        if self.guard_prompts < 1:
            raise ConfigError(f"guard_prompts must be >= 1 (got {self.guard_prompts})")

    def record(self) -> ApplyParams:
        """What a revision records: every field of the record model, read from these parameters
        (the record names the band override ``band_override``), so a new parameter reaches the
        record by being declared there."""
        values = {name: getattr(self, name) for name in ApplyParams.model_fields if name != "band_override"}
        values["spaces"] = list(self.spaces)
        return ApplyParams(band_override=self.band, **values)


@dataclass
class ModelTrio:
    base: Checkpoint
    aligned: Checkpoint
    finetuned: Checkpoint | LoraFinetuned
    spec: ArchitectureSpec

    @classmethod
    def open(cls, base: str | Path, aligned: str | Path, finetuned: str | Path) -> ModelTrio:
        """Open and validate the trio: one architecture, and the same tensor names, shapes and
        dtypes in all three (edits are written in that dtype; mixed precision is refused, a LoRA
        adapter takes the aligned model's dtype; see ``check_compatible``)."""
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


def contrast_penalty(
    refusal: Any, benign: Any, names: Sequence[str], kind: str
) -> dict[str, torch.Tensor] | None:
    """Per-entry penalty of the refusal contrast: how much reverting the entry makes benign prompts
    refused (``refusal``: effects on the refusal NLL given benign prompts; ``benign``: effects on the
    fine-tuned answers' NLL, added for the log-odds kind). None without refusal effects."""
    if refusal is None:
        return None
    if kind == "odds":
        return {n: benign.entries[n] - refusal.entries[n] for n in names}
    return {n: -refusal.entries[n] for n in names}


def unit_attribution_scores(
    harm: Any,
    benign: Any,
    refusal: Any | None,
    tensors: Mapping[str, tuple[int, str, int]],
    contrast: float = 0.0,
    kind: str = "refusal",
) -> dict[tuple[int, str], NeuronScores]:
    """Per-unit gain (refusal-loss drop of reverting the unit) and cost (benign-loss rise), summed
    over each unit's tensors. With a refusal contrast, only positive-gain units score, ranked by
    gain − contrast × penalty (the penalty as in ``contrast_penalty``, along the unit axis)."""
    out: dict[tuple[int, str], NeuronScores] = {}
    for name, (layer, space, axis) in tensors.items():
        g = -harm.along(name, axis)
        c = benign.along(name, axis)
        if refusal is not None and contrast:
            pen = -refusal.along(name, axis) + (c if kind == "odds" else 0)
            g = torch.where(g > 0, g - contrast * pen, torch.zeros_like(g))
        prev = out.get((layer, space))
        out[(layer, space)] = (
            NeuronScores(g, c) if prev is None else NeuronScores(prev.harmful + g, prev.benign + c)
        )
    return out


def benign_refusal_targets(
    benign_prompts: Sequence[str], harmful_prompts: Sequence[str], responses: Sequence[str]
) -> list[tuple[str, str]]:
    """(benign prompt, refusal) pairs: the responses judged refusals, assigned round robin."""
    from fgsn_daemon.engine.refusal import KeywordJudge

    refusals = [
        r
        for r, refused in zip(
            responses, KeywordJudge().judge(list(harmful_prompts), list(responses)), strict=True
        )
        if refused
    ]
    if not refusals:
        raise FGSNError(
            "refusal contrast: the aligned model refused none of the dimension's harmful prompts, so "
            "there is no refusal to contrast with (set contrast = 0)"
        )
    return [(p, refusals[i % len(refusals)]) for i, p in enumerate(benign_prompts)]


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


def _resident(model: Any, what: str) -> None:
    """In-place edits need every weight in device memory; offloaded ones live elsewhere."""
    offloaded = offloaded_parameters(model)
    if offloaded:
        raise ConfigError(
            f"{what} edits weights in memory, but the device map offloaded {len(offloaded)} of them "
            f"(e.g. {offloaded[0]}) to CPU or disk: give the model more devices or max_memory"
        )


def load_scoring_model(
    trio: ModelTrio,
    which: str,
    device: torch.device,
    placement: Placement | None = None,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """The model whose activations are scored (in ``dtype``); a LoRA fine-tune is merged in memory."""
    if which == "aligned" or not isinstance(trio.finetuned, LoraFinetuned):
        path = trio.aligned.path if which == "aligned" else trio.finetuned.path
        return load_model(path, device, dtype, placement)
    model = load_model(trio.aligned.path, device, dtype, placement)
    _resident(model, "merging a LoRA fine-tune")
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
    _refusals: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    _ft_answers: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    last_effects: tuple[Any, Any, dict[str, tuple[int, str, int]]] | None = None
    guard_trace: list[dict[str, float]] = field(default_factory=list)
    placement: Placement | None = None  # spread the models over devices (accelerate device_map)
    # benign prompts the hard-negative rounds check for refusals (None: the benign prompts)
    calibration_prompts: Sequence[str] | None = None
    hard_trace: list[dict[str, Any]] = field(default_factory=list)
    # harmful prompts whose aligned refusals are the refusal contrast's targets for every dimension
    # (None: each dimension's own). A fixed per-lineage set makes the contrast's backward passes a
    # lineage cost, like the benign ones, instead of a per-dimension one.
    refusal_reference: Sequence[str] | None = None
    _contrast: tuple[Any, Any] | None = None
    # the scoring models' compute dtype (bfloat16 halves GPU memory; effects accumulate in float32)
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.calibration_prompts is not None and not self.calibration_prompts:
            raise ConfigError("the calibration prompts are empty (give none to use the benign prompts)")

    def ensure_model(self) -> None:
        if self.model is None:
            self.progress("loading scoring model")
            self.model = load_scoring_model(
                self.trio, self.params.score_model, self.device, self.placement, self.dtype
            )
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
        scoring = get_scoring(scoring_name or self.params.scoring)
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
                out[key] = scoring.score(
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
            self._aligned_model = load_scoring_model(
                self.trio, "aligned", self.device, self.placement, self.dtype
            )
        return self._aligned_model

    def _finetuned(self) -> Any:
        """The fine-tuned model (immutable weights; gradients are taken here)."""
        self.ensure_model()
        if self.params.score_model == "finetuned":
            return self.model
        if self._ft_model is None:
            self.progress("loading the fine-tuned model (attribution)")
            self._ft_model = load_scoring_model(
                self.trio, "finetuned", self.device, self.placement, self.dtype
            )
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
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        names: Sequence[str],
        what: str,
        deltas: Mapping[str, torch.Tensor] | None = None,
        first_order: bool = False,
    ) -> Any:
        """Effects of the reverts ``deltas`` (default: aligned − fine-tuned) from the fine-tuned
        model's current weights: first order there (always with ``first_order``), or integrated
        along the revert (``path_steps``)."""
        from fgsn_daemon.engine.attribution import delta_effects, path_effects

        model = self._finetuned()
        revert = self.revert_deltas(names) if deltas is None else deltas
        self.progress(f"attribution: {what} ({len(prompts)} prompts, backward passes)")

        def effects_at(where: str) -> Any:
            return delta_effects(
                model,
                self.tokenizer,
                prompts,
                responses,
                revert,
                entries=self.params.unit == "entry",
                batch_size=max(1, self.params.batch_size // 2),
                max_length=self.params.max_length,
                use_chat_template=self.params.use_chat_template,
                desc=what + where,
                progress=self.progress,
            )

        if first_order:
            return effects_at("")
        if self.params.path_steps > 1:
            _resident(model, "path-integrated attribution (the weights move along the revert)")
        return path_effects(model, revert, self.params.path_steps, effects_at)

    def _generate(self, model: Any, prompts: Sequence[str], what: str) -> list[str]:
        from fgsn_daemon.engine.evaluation import generate_responses

        self.progress(f"attribution: {what} ({len(prompts)} prompts, greedy)")
        return generate_responses(
            model,
            self.tokenizer,
            prompts,
            self.params.target_tokens,
            batch_size=self.params.batch_size,
            use_chat_template=self.params.use_chat_template,
        )

    def finetuned_answers(self, prompts: Sequence[str]) -> list[str]:
        """The unedited fine-tuned model's greedy answers (the benign/task targets), kept per list:
        later calls, even while entries are restored in memory, get the same targets."""
        key = tuple(prompts)
        if key not in self._ft_answers:
            texts = self._generate(self._finetuned(), prompts, "fine-tuned answers to benign/task prompts")
            self._ft_answers[key] = texts
        return self._ft_answers[key]

    def benign_effects(
        self,
        names: Sequence[str],
        prompts: Sequence[str] | None = None,
        deltas: Mapping[str, torch.Tensor] | None = None,
    ) -> Any:
        """Effects on the fine-tuned model's own answers to the benign/task prompts; the shared
        set's (at the unedited weights) are computed once per tensor list and reused for every
        dimension."""
        shared = prompts is None and deltas is None
        key = (tuple(names), self.params.unit)
        if shared and self._benign_effects is not None and self._benign_effects[0] == key:
            return self._benign_effects[1]
        texts = list(self.benign_prompts if prompts is None else prompts)
        effects = self._effects(texts, self.finetuned_answers(texts), names, "benign/task loss", deltas)
        if shared:
            self._benign_effects = (key, effects)
        return effects

    def aligned_responses(self, harmful_prompts: Sequence[str]) -> list[str]:
        """The aligned model's greedy responses to harmful prompts (the refusal targets), kept per
        prompt list."""
        key = tuple(harmful_prompts)
        if key not in self._refusals:
            texts = self._generate(self._aligned(), harmful_prompts, "aligned responses to harmful prompts")
            self._refusals[key] = texts
        return self._refusals[key]

    def harmful_effects(
        self,
        harmful_prompts: Sequence[str],
        names: Sequence[str],
        deltas: Mapping[str, torch.Tensor] | None = None,
    ) -> Any:
        refusals = self.aligned_responses(harmful_prompts)
        return self._effects(harmful_prompts, refusals, names, "refusal loss", deltas)

    def benign_refusal_effects(
        self,
        harmful_prompts: Sequence[str],
        names: Sequence[str],
        deltas: Mapping[str, torch.Tensor] | None = None,
        benign_prompts: Sequence[str] | None = None,
    ) -> Any:
        """Effects on the NLL of a refusal given a *benign* prompt: each benign scoring prompt (or
        each of ``benign_prompts``) is paired (round robin) with one of the aligned model's refusals
        of this dimension's harmful prompts. A unit whose revert lowers this loss restores refusal
        in general (over-refusal), not refusal of harm."""
        targets = benign_refusal_targets(
            self.benign_prompts if benign_prompts is None else benign_prompts,
            harmful_prompts,
            self.aligned_responses(harmful_prompts),
        )
        return self._effects(
            [p for p, _ in targets], [r for _, r in targets], names, "refusal loss on benign prompts", deltas
        )

    def aligned_overrefusal_effects(self, names: Sequence[str]) -> Any:
        """Effects on the NLL of the aligned model's own refusals of the benign scoring prompts it
        refuses (its over-refusals): reverting a unit that lowers this loss brings them back."""
        from fgsn_daemon.engine.refusal import KeywordJudge

        texts = list(self.benign_prompts)
        answers = self._generate(self._aligned(), texts, "aligned responses to benign prompts")
        refused = KeywordJudge().judge(texts, answers)
        pairs = [(p, a) for p, a, r in zip(texts, answers, refused, strict=True) if r]
        if not pairs:
            raise FGSNError("the aligned model refuses none of the benign scoring prompts")
        return self._effects(
            [p for p, _ in pairs], [a for _, a in pairs], names, "aligned over-refusals of benign prompts"
        )

    def contrast_effects(
        self,
        harmful_prompts: Sequence[str],
        names: Sequence[str],
        deltas: Mapping[str, torch.Tensor] | None = None,
    ) -> Any:
        """The benign-refusal effects when a refusal contrast is set, else None. With a
        ``refusal_reference`` the targets are its refusals and the effects at the unedited weights
        are computed once and reused for every dimension."""
        if not self.params.contrast:
            return None
        if self.refusal_reference is None:
            return self.benign_refusal_effects(harmful_prompts, names, deltas)
        if deltas is not None:
            return self.benign_refusal_effects(self.refusal_reference, names, deltas)
        key = (tuple(names), self.params.unit, tuple(self.refusal_reference), tuple(self.benign_prompts))
        if self._contrast is None or self._contrast[0] != key:
            self._contrast = (key, self.benign_refusal_effects(self.refusal_reference, names))
        return self._contrast[1]

    def attribution_scores(
        self, harmful_prompts: Sequence[str], benign_prompts: Sequence[str] | None = None
    ) -> dict[tuple[int, str], NeuronScores]:
        """Per-unit gain (refusal-loss drop of reverting the unit) and cost (benign-loss rise)."""
        tensors = self.scored_tensors(self.attribution_layers())
        names = sorted(tensors)
        harm = self.harmful_effects(harmful_prompts, names)
        benign = self.benign_effects(names, benign_prompts)
        refusal = self.contrast_effects(harmful_prompts, names)
        self.last_effects = (harm, benign, tensors)
        return unit_attribution_scores(
            harm, benign, refusal, tensors, self.params.contrast, self.params.contrast_kind
        )

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
        scoring = get_scoring(scoring_name or self.params.scoring)
        if not scoring.uses_activation_stats:
            return self.attribution_scores(harmful_prompts, benign_prompts)
        assert self.band is not None
        if benign is None and benign_prompts is not None:
            benign = self.collect(benign_prompts, self.band.layers)
        harmful = self.collect(harmful_prompts, self.band.layers)
        return self.score(harmful, benign, scoring.name, positions)

    def select(
        self,
        scores: Mapping[tuple[int, str], NeuronScores],
        q: float,
        p: float,
        frozen: Mapping[NeuronId, str] | None = None,
    ) -> Selection:
        if self.params.allocation == "global":
            from fgsn_daemon.engine.delta_selection import select_global

            sizes = self.unit_sizes(sorted(scores))

            def candidate_slices(budget: int) -> dict[str, tuple[int, list[int]]]:
                sel = select_global(scores, sizes, budget, p)
                return neuron_slices(self.trio, group_by_layer_space(sel.candidates))

            budget = self.guarded_budget(self.budget_parameters(), slices_at=candidate_slices)
            return select_global(scores, sizes, budget, p, frozen)
        return select_neurons(scores, q, p, frozen)

    def refusal_rate(self, model: Any, prompts: Sequence[str]) -> float:
        from fgsn_daemon.engine.evaluation import generate_responses
        from fgsn_daemon.engine.refusal import KeywordJudge

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
        prompts = spread(list(self.benign_prompts), self.params.guard_prompts)
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
        if not get_scoring(self.params.scoring).uses_activation_stats:
            return self.select(self.attribution_scores(harmful_prompts), self.params.q, self.params.p, frozen)
        harmful = self.harmful_stats(harmful_prompts, reuse_curve_pass=fresh_band)
        return select_neurons(self.score(harmful), self.params.q, self.params.p, frozen)

    def localise_entries(
        self, harmful_prompts: Sequence[str], benign_prompts: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Entry units: boolean masks of the entries to restore, per tensor name."""
        from fgsn_daemon.engine.delta_selection import select_entries

        self.establish_band(harmful_prompts)
        tensors = self.scored_tensors(self.attribution_layers())
        names = sorted(tensors)
        if self.params.steps > 1:
            return self.iterative_entry_masks(
                harmful_prompts, names, self.budget_parameters(), benign_prompts
            )
        harm = self.harmful_effects(harmful_prompts, names)
        benign = self.benign_effects(names, benign_prompts)
        refusal = self.contrast_effects(harmful_prompts, names)
        self.last_effects = (harm, benign, tensors)
        gain = {n: -harm.entries[n] for n in names if n in harm.entries}
        cost = {n: benign.entries[n] for n in gain}
        penalty = contrast_penalty(refusal, benign, list(gain), self.params.contrast_kind)

        def masks_at(budget: int) -> dict[str, torch.Tensor]:
            return select_entries(gain, cost, budget, self.params.p, penalty, self.params.contrast)

        budget = self.guarded_budget(self.budget_parameters(), masks_at=masks_at)
        started = time.perf_counter()
        masks = masks_at(budget)
        # the trace separates the global ranking from the hard rounds' generations (GPU runs)
        self.progress(f"entry selection: {budget} entries ranked in {time.perf_counter() - started:.1f} s")
        if self.params.hard_rounds:
            masks = self.hard_negative_masks(masks, gain, cost, penalty, budget, names, harmful_prompts)
        return masks

    def calibration_set(self) -> list[str]:
        """The benign prompts the hard rounds judge: the calibration prompts (default: the benign
        ones), at most ``calibration_max`` of them, evenly spread."""
        given = self.calibration_prompts
        return spread(list(given if given is not None else self.benign_prompts), self.params.calibration_max)

    def prompt_sets(
        self, benign_prompts: Sequence[str] | None = None
    ) -> tuple[PromptSet, PromptSet | None, PromptSet | None]:
        """What an ``ApplyResult`` records of the prompt sets a selection used: the benign cost's
        prompts (``benign_prompts``: a dimension's own set, when it replaces the shared one), the
        refusal contrast's (the shared set; None without a contrast) and the calibration prompts the
        hard rounds judged (None without hard rounds)."""
        hard = self.params.unit == "entry" and self.params.hard_rounds > 0
        contrasted = not is_activation_scoring(self.params.scoring) and self.params.contrast > 0
        benign = PromptSet.of(list(self.benign_prompts if benign_prompts is None else benign_prompts))
        contrast = PromptSet.of(list(self.benign_prompts)) if contrasted else None
        return benign, contrast, PromptSet.of(self.calibration_set()) if hard else None

    def hard_negative_masks(
        self,
        masks: dict[str, torch.Tensor],
        gain: Mapping[str, torch.Tensor],
        cost: Mapping[str, torch.Tensor],
        penalty: Mapping[str, torch.Tensor] | None,
        budget: int,
        names: Sequence[str],
        harmful_prompts: Sequence[str] = (),
    ) -> dict[str, torch.Tensor]:
        """Over-refusal hard negatives: edit in memory, find the calibration prompts the edited model
        refuses, add ``hard_weight`` × the first-order effect of reverting each entry on *those*
        refusals (the edited model's own words; gradients at the fine-tuned weights, or first order at
        the round's edited weights with ``hard_at = "edited"``) to the penalty, select again at the
        same budget; ``hard_rounds`` times, or until none is refused. With ``hard_target``, the weight
        is searched per round (``calibrated_weight``): the smallest whose edit refuses at most that
        many points more calibration prompts than the fine-tuned model. A round whose edit is within
        it adds no hard negatives (hard positives still apply). If no weight tried is within it and
        the best refuses no less than the round's own edit, the round keeps its edit.

        With ``hard_positive_weight`` > 0, the same rounds also look for the dimension's harmful
        ``harmful_prompts`` the edited model still answers, and add that weight × the gain on *their*
        refusal targets to the gain (the refusals the selection misses get more say).

        Depends only on the immutable inputs, this dimension's prompts and the shared calibration
        set, so rollback stays exact."""
        from fgsn_daemon.engine.delta_selection import calibrated_weight, select_entries
        from fgsn_daemon.engine.evaluation import generate_responses
        from fgsn_daemon.engine.refusal import KeywordJudge

        model = self._finetuned()
        calibration = self.calibration_set()
        harmful = list(harmful_prompts) if self.params.hard_positive_weight > 0 else []
        contrast = self.params.contrast if penalty is not None else 0.0
        hard: dict[str, torch.Tensor] = {}
        boost: dict[str, torch.Tensor] = {}
        self.hard_trace = []
        local = self.params.hard_at == "edited"
        where = " at the edited weights" if local else ""

        def answer(prompts: Sequence[str]) -> list[str]:
            return generate_responses(
                model,
                self.tokenizer,
                prompts,
                self.params.target_tokens,
                self.params.batch_size,
                self.params.use_chat_template,
            )

        def penalise(pairs: list[tuple[str, str]], missed: list[str]) -> None:
            """Add the effects on this round's refusals (hard) and misses (boost), at the model's
            current weights."""
            if pairs:
                prompts, words = [p for p, _ in pairs], [a for _, a in pairs]
                eff = self._effects(prompts, words, names, "hard negatives" + where, None, local)
                for n in gain:
                    hard[n] = hard.get(n, torch.zeros_like(gain[n])) - eff.entries[n]
            if missed:
                target = dict(zip(harmful, self.aligned_responses(harmful), strict=True))
                words = [target[p] for p in missed]
                eff = self._effects(missed, words, names, "hard positives" + where, None, local)
                for n in gain:
                    boost[n] = boost.get(n, torch.zeros_like(gain[n])) - eff.entries[n]

        def refusal_share(answers: Sequence[str]) -> float:
            return sum(KeywordJudge().judge(calibration, list(answers))) / max(1, len(calibration))

        def masks_for(w: float, gains: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            """The selection with the hard penalty at weight ``w`` (plus the contrast's)."""
            combined = {
                n: w * hard.get(n, torch.zeros_like(gain[n]))
                + (contrast * penalty[n] if penalty is not None else 0)
                for n in gain
            }
            return select_entries(gains, cost, budget, self.params.p, combined, 1.0)

        # the fine-tuned model's own calibration refusal plus the target; its answers are the kept
        # unedited ones (shared with the benign targets when the sets agree), taken before any edit
        limit = (
            None
            if self.params.hard_target is None
            else refusal_share(self.finetuned_answers(calibration)) + self.params.hard_target / 100.0
        )
        weight = self.params.hard_weight
        # the calibration answers of the next round's edit, when the weight search already made them
        known: list[str] | None = None
        for r in range(self.params.hard_rounds):
            with restored_in_memory(model, self.trio, masks=masks):
                answers = known if known is not None else answer(calibration)
                harmful_answers = answer(harmful) if harmful else []
                refused = KeywordJudge().judge(calibration, answers)
                pairs = [(p, a) for p, a, f in zip(calibration, answers, refused, strict=True) if f]
                stopped = KeywordJudge().judge(harmful, harmful_answers) if harmful else []
                missed = [p for p, f in zip(harmful, stopped, strict=True) if not f]
                trace: dict[str, Any] = {"round": r + 1, "refused": len(pairs), "prompts": len(calibration)}
                if harmful:
                    trace |= {"complied": len(missed), "harmful": len(harmful)}
                self.hard_trace.append(trace)
                self.progress(
                    f"hard negatives, round {r + 1}: {len(pairs)} of {len(calibration)} refused"
                    + (f"; {len(missed)} of {len(harmful)} harmful prompts still answered" if harmful else "")
                )
                if limit is not None and len(pairs) / max(1, len(calibration)) <= limit + 1e-12:
                    pairs = []  # within the target: these refusals need no penalty
                    trace["limit"] = limit
                if not pairs and not missed:
                    break
                if local:  # at this round's edit, while it is in place (one restore per round)
                    penalise(pairs, missed)
            if not local:
                penalise(pairs, missed)
            boosted = (
                {n: gain[n] + self.params.hard_positive_weight * boost[n] for n in gain} if boost else gain
            )

            known = None
            if limit is not None and hard and weight > 0:
                searched: dict[float, list[str]] = {}

                def rate_at(
                    w: float,
                    gains: Mapping[str, torch.Tensor] = boosted,
                    answered: dict[float, list[str]] = searched,
                ) -> float:
                    with restored_in_memory(model, self.trio, masks=masks_for(w, gains)):
                        answered[w] = answer(calibration)
                        rate = refusal_share(answered[w])
                    self.progress(f"hard weight {w:.4g}: calibration refusal {rate:.3f} (limit {limit:.3f})")
                    return rate

                weight, tried = calibrated_weight(rate_at, weight, limit)
                rate = dict(tried)[weight]
                within = rate <= limit + 1e-12
                self.hard_trace[-1] |= {"limit": limit, "weight": weight, "search": tried, "within": within}
                if not within and rate >= len(pairs) / max(1, len(calibration)) and not boost:
                    self.hard_trace[-1]["kept"] = True  # no weight helped: keep the round's own edit
                    break
                known = searched[weight]  # greedy answers of masks_for(weight, boosted), reused
            masks = masks_for(weight, boosted)
        return masks

    def iterative_entry_masks(
        self,
        harmful_prompts: Sequence[str],
        names: Sequence[str],
        budget: int,
        benign_prompts: Sequence[str] | None = None,
        first: tuple[Any, Any, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Iterative entry selection (``steps`` > 1): the budget is spent in equal steps; after each
        step the chosen entries are restored in memory and every effect is measured again at the
        edited weights (reverts of chosen entries are zero), so later steps see what earlier ones
        did. Every step depends only on the immutable inputs and this dimension's prompts, so a
        rollback still equals a run without the dimension. ``first``: effects at the unedited
        weights (harm, benign, contrast) when the caller already has them."""
        from fgsn_daemon.engine.delta_selection import select_entries

        steps, p, contrast = self.params.steps, self.params.p, self.params.contrast
        model = self._finetuned()
        texts = list(self.benign_prompts if benign_prompts is None else benign_prompts)
        with_benign = p > 0 or (contrast > 0 and self.params.contrast_kind == "odds")
        if with_benign:
            self.finetuned_answers(texts)  # targets from the unedited model, before any edit
        self.aligned_responses(harmful_prompts)
        full = self.revert_deltas(names)
        matrices = [n for n in names if full[n].dim() == 2]  # entry units live in weight matrices
        chosen = {n: torch.zeros(full[n].shape, dtype=torch.bool) for n in matrices}
        if first is None:  # step 1 is the one-shot scoring at the unedited weights
            first = (
                self.harmful_effects(harmful_prompts, names),
                self.benign_effects(names, benign_prompts),
                self.contrast_effects(harmful_prompts, names),
            )
        # neuron records (entry_selection) report the one-shot effects of the chosen entries
        self.last_effects = (first[0], first[1], self.scored_tensors(self.attribution_layers()))
        for step in range(steps):
            if step == 0:
                harm, benign, refusal = first
            else:
                deltas = {
                    n: torch.where(chosen[n], torch.zeros_like(d), d) if n in chosen else d
                    for n, d in full.items()
                }
                with restored_in_memory(model, self.trio, masks=chosen):
                    self.progress(f"iterative selection: step {step + 1}/{steps}")
                    harm = self.harmful_effects(harmful_prompts, names, deltas)
                    benign = self.benign_effects(names, texts, deltas) if with_benign else None
                    refusal = self.contrast_effects(harmful_prompts, names, deltas)
            gain = {
                n: torch.where(chosen[n], torch.zeros_like(harm.entries[n]), -harm.entries[n])
                for n in matrices
            }
            cost = {
                n: benign.entries[n] if benign is not None else torch.zeros_like(gain[n]) for n in matrices
            }
            penalty = contrast_penalty(refusal, benign, matrices, self.params.contrast_kind)
            spent = sum(int(m.sum()) for m in chosen.values())
            new = select_entries(gain, cost, budget * (step + 1) // steps - spent, p, penalty, contrast)
            for n in matrices:
                chosen[n] |= new[n]
        return chosen


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
            # restore needs no base tensor: one fewer full tensor held at the largest matrices
            base = None if op.copies_aligned else trio.base.read(name)
            triple = TensorTriple(ft, trio.aligned.read(name), base)
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
    strength: float = 1.0,
    safety: float = 0.0,
) -> Iterator[None]:
    """Restore entries (``masks``) or neuron slices (``slices``) of a loaded fine-tuned model to
    their aligned values in place; put the fine-tuned values back on exit.

    ``strength`` and ``safety`` (entries only; lab levers) change the value the masked entries
    take: ``W_ft + strength·(W_aligned − W_ft) + safety·(W_aligned − W_base)``; the defaults give
    the aligned values."""
    masks, slices = masks or {}, slices or {}
    if slices and (strength != 1.0 or safety != 0.0):
        raise ConfigError("strength and safety apply to entry masks, not neuron slices")
    if masks or slices:
        _resident(model, "an in-memory restore (over-refusal guard, iterative steps, evaluation)")
    params = dict(model.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in {*masks, *slices}:
            p = params[name]
            saved[name] = p.detach().clone()
            stored = trio.aligned.read(name)
            aligned = stored.to(device=p.device, dtype=p.dtype)
            if name in masks:
                target = aligned
                if strength != 1.0 or safety:
                    # in float32 (or wider), cast once: a bfloat16 model would round each step
                    wide = torch.promote_types(p.dtype, torch.float32)
                    ft, al = p.to(wide), stored.to(device=p.device, dtype=wide)
                    value = al if strength == 1.0 else ft + strength * (al - ft)
                    if safety:
                        value = value + safety * (al - trio.base.read(name).to(device=p.device, dtype=wide))
                    target = value.to(p.dtype)
                p.copy_(torch.where(masks[name].to(p.device), target, p))
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
    """Write fine-tuned weights with the masked entries restored to aligned. ``masks`` may unpack
    each tensor's mask on access (``StoredMaskUnion``): only one is held at a time."""
    counts = {n: int(m.sum()) for n, m in masks.items()}
    edited = sorted(n for n, c in counts.items() if c)
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
    modified = sum(counts[n] for n in edited)
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


@dataclass(frozen=True)
class CheckpointEdit:
    """Everything an edited checkpoint is computed from: the trio and the units to edit (neurons
    per (layer, space), or entry masks), with the edit settings. Equal inputs give bit-identical
    files; the daemon's versions and a one-shot ``apply`` are both written by ``write``."""

    trio: ModelTrio
    neurons: Mapping[tuple[int, str], Sequence[int]]
    operator: str
    band: Band
    spaces: Sequence[str]
    rank: int
    device: torch.device | str
    max_shard_bytes: int
    entry_masks: Mapping[str, torch.Tensor] | None = None

    def write(self, out: Path, reuse: Path | None = None) -> EditOutcome:
        if self.entry_masks is not None:
            return write_entry_restored_checkpoint(
                self.trio,
                self.entry_masks,
                out,
                self.band,
                self.spaces,
                max_shard_bytes=self.max_shard_bytes,
                reuse_from=reuse,
            )
        return write_edited_checkpoint(
            self.trio,
            self.neurons,
            self.operator,
            out,
            self.band,
            self.spaces,
            rank=self.rank,
            device=self.device,
            max_shard_bytes=self.max_shard_bytes,
            reuse_from=reuse,
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
    placement: Placement | None = None,
    dtype: torch.dtype = torch.float32,
    calibration_prompts: Sequence[str] | None = None,
) -> ApplyResult:
    """The one-shot pipeline: localise this dimension's neurons, project them, write ``out``.
    ``calibration_prompts``: the benign prompts the over-refusal hard rounds look for refusals in
    (default: ``benign_prompts``)."""
    params = params or FGSNParams()
    params.validate()
    dev = resolve_device(device)
    out_path = Path(out) if out is not None else None
    staging = prepare_output_dir(out_path) if out_path is not None else None
    trio = ModelTrio.open(base, aligned, finetuned)
    try:
        loc = Localiser(
            trio,
            params,
            dev,
            benign_prompts,
            progress=progress or (lambda _m: None),
            placement=placement,
            dtype=dtype,
            calibration_prompts=calibration_prompts,
        )
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
                edit = CheckpointEdit(
                    trio,
                    neurons,
                    params.operator,
                    loc.band,
                    params.spaces,
                    params.rank,
                    dev,
                    max_shard_bytes,
                    entry_masks=masks,
                )
                outcome = edit.write(staging)
                publish(staging, out_path)
            finally:
                if staging.exists():
                    shutil.rmtree(staging)
            modification, edited = outcome.modification, outcome.edited_tensors
        elif masks is not None:
            modification = count_entry_modification(trio, masks, loc.band, params.spaces)
        else:
            modification = count_modification(trio, neurons, loc.band, params.spaces)
        benign_set, contrast_set, calibration_set = loc.prompt_sets()
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
            benign=benign_set,
            contrast=contrast_set,
            calibration=calibration_set,
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
