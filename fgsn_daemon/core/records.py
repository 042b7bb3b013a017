"""Plain data records produced by the engine and stored by the registry.

A *neuron* is identified by ``(layer, space, index)``: ``space`` names a neuron space of the
architecture spec (``mlp`` = intermediate unit, ``attn`` = query/output unit), ``index`` is the
position along that space's neuron axis.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field


class NeuronId(NamedTuple):
    layer: int
    space: str
    index: int  # type: ignore[assignment]  # shadows tuple.index, which no caller uses

    def key(self) -> str:
        return f"{self.layer}:{self.space}:{self.index}"

    @classmethod
    def parse(cls, text: str) -> NeuronId:
        layer, space, index = text.split(":")
        return cls(int(layer), space, int(index))


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LayerCurve(_Record):
    """Last-token cosine similarity per decoder layer (index = layer)."""

    benign_benign: list[float]
    benign_harmful: list[float]
    gap: list[float]


class Band(_Record):
    start: int = Field(ge=0)
    end: int = Field(ge=0)  # inclusive
    source: str  # "auto" or "override"

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.end + 1))


class ScoredNeuron(_Record):
    layer: int
    space: str
    index: int
    harmful_score: float
    benign_score: float
    harmful_rank: int  # 0 = highest harmful score within (layer, space)

    @property
    def id(self) -> NeuronId:
        return NeuronId(self.layer, self.space, self.index)


class SkippedNeuron(_Record):
    layer: int
    space: str
    index: int
    owner: str  # the dimension (or other label) that froze it earlier

    @property
    def id(self) -> NeuronId:
        return NeuronId(self.layer, self.space, self.index)


class LayerCount(_Record):
    layer: int
    space: str
    total: int
    harmful_top: int
    benign_top: int
    candidates: int
    skipped: int
    selected: int


class ModificationRatio(_Record):
    """Share of parameters modified. ``denominator`` says what is counted below the line."""

    modified_parameters: int  # entries inside the selected neurons' slices
    changed_parameters: int  # of those, entries whose value actually differs from the fine-tuned one
    total_parameters: int
    band_parameters: int  # parameters of the band layers' neuron-space tensors
    ratio: float  # modified_parameters / total_parameters
    band_ratio: float  # modified_parameters / band_parameters
    denominator: str = "all parameters stored in the fine-tuned checkpoint"


class ApplyParams(_Record):
    scoring: str
    positions: str
    operator: str
    q: float
    p: float
    spaces: list[str]
    score_model: str
    rank: int
    band_override: tuple[int, int] | None
    allocation: str = "per_layer"
    budget: float | None = None
    unit: str = "neuron"
    scope: str = "band"
    guard: float | None = None
    contrast: float = 0.0
    contrast_kind: str = "refusal"
    steps: int = 1
    hard_rounds: int = 0
    hard_weight: float = 0.0
    hard_positive_weight: float = 0.0
    hard_at: str = "finetuned"  # recorded before the option existed: finetuned
    hard_target: float | None = None  # None: the fixed hard_weight (or recorded before the option)
    calibration_max: int | None = None  # None: recorded before the cap existed
    path_steps: int = 1
    target_tokens: int | None = None  # None: recorded before the target length was recorded
    max_length: int | None = None  # prompts are cut to this many tokens; None: recorded before
    use_chat_template: bool | None = None  # None (here and below): recorded before
    guard_prompts: int | None = None


class PromptSet(_Record):
    """A prompt set by its content: how many prompts, and the sha256 of their UTF-8 text in order,
    each followed by a NUL byte (compare it with ``PromptSet.of(load_prompts(file))``; a recorded
    calibration set, which is capped, with ``PromptSet.of(spread(load_prompts(file), calibration_max))``)."""

    count: int
    sha256: str

    @classmethod
    def of(cls, prompts: Sequence[str]) -> PromptSet:
        digest = hashlib.sha256()
        for prompt in prompts:
            digest.update(prompt.encode() + b"\0")
        return cls(count=len(prompts), sha256=digest.hexdigest())


class ApplyResult(_Record):
    params: ApplyParams
    curve: LayerCurve
    band: Band
    layer_counts: list[LayerCount]
    candidates: list[ScoredNeuron]  # every candidate, frozen ones included
    selected: list[ScoredNeuron]
    skipped: list[SkippedNeuron]
    modification: ModificationRatio
    output: str | None
    edited_tensors: list[str]
    # entry units: sha256 of the revision's candidate-entry mask file (fgsn_daemon.engine.entry_masks)
    entry_masks: str | None = None
    entries: int | None = None  # candidate entries in that mask
    # the benign prompts the benign cost was scored on: a dimension's own set when it brings one
    # (None: recorded before this field)
    benign: PromptSet | None = None
    # the benign prompts the refusal contrast paired with refusals: always the shared benign set,
    # even when a dimension brings its own (the log-odds kind also adds the benign cost, measured
    # on ``benign``; None: no contrast, or recorded before this field)
    contrast: PromptSet | None = None
    # the prompts the over-refusal hard rounds judged, after the calibration_max cap (None: no
    # hard rounds, or recorded before this field)
    calibration: PromptSet | None = None


def parse_band(text: str | None) -> tuple[int, int] | None:
    """``START:END`` (or ``START-END``), inclusive layer indices; None or empty means automatic."""
    if not text:
        return None
    from fgsn_daemon.core.errors import ConfigError

    try:
        start, end = (int(x) for x in text.replace("-", ":").split(":"))
    except ValueError:
        raise ConfigError(
            f"--band must look like START:END (inclusive layer indices), got {text!r}"
        ) from None
    return start, end
