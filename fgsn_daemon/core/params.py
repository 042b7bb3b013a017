"""The FGSN parameters' one declaration: every tunable field with its type, bounds and default.

The daemon's settings (``service.settings.FGSNParams``) extend this model with presets and the
engine's registries; a policy's per-dimension ``[fgsn]`` overrides (``core.policy.FGSNOverrides``)
are generated from the same fields, so a bound cannot drift between the two; the engine's
``FGSNParams`` takes every one of these fields from the settings (``service.daemon.engine_params``)
and checks its values against them (``FGSNParams.validate``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic_settings import NoDecode

from fgsn_daemon.core import defaults

Space = Literal["mlp", "attn"]
# method names are checked against the engine's registries by the service (core cannot see them)
MethodName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]


def _default_spaces() -> list[Space]:
    return list(defaults.SPACES)  # type: ignore[arg-type]


class FGSNFields(BaseModel):
    """Parameters of one FGSN application (scoring, selection and projection)."""

    model_config = ConfigDict(extra="forbid")

    q: float = Field(default=defaults.Q, gt=0, le=100, description="top-q% neurons by harmful score")
    p: float = Field(default=defaults.P, ge=0, le=100, description="top-p% neurons by benign score, excluded")
    scoring: MethodName = defaults.SCORING  # a registered scoring (fgsn_daemon.engine.scorings)
    positions: Literal["all", "last"] = "all"
    operator: MethodName = defaults.OPERATOR  # a registered operator (fgsn_daemon.engine.operators)
    spaces: Annotated[list[Space], NoDecode] = Field(default_factory=_default_spaces, min_length=1)
    score_model: Literal["aligned", "finetuned"] = "aligned"  # whose activations are scored
    band: tuple[int, int] | None = None  # inclusive [start, end]; None = found automatically
    rank: int = Field(default=8, ge=1, description="subspace rank of the projector operator")
    batch_size: int = Field(default=16, ge=1)
    max_length: int = Field(default=256, ge=8)
    # delta attribution (scoring = "attribution") only:
    allocation: Literal["per_layer", "global"] = defaults.ALLOCATION  # type: ignore[assignment]
    budget: float = Field(default=defaults.BUDGET, gt=0, le=100, description="global: % of all parameters")
    scope: Literal["all", "band"] = defaults.SCOPE  # type: ignore[assignment]
    unit: Literal["neuron", "entry"] = defaults.UNIT  # type: ignore[assignment]
    target_tokens: int = Field(default=16, ge=1, description="length of the attribution targets")
    guard: float | None = Field(
        default=defaults.GUARD, ge=0, le=100, description="over-refusal guard (points)"
    )
    steps: int = Field(default=defaults.STEPS, ge=1, le=64, description="iterative selection steps (entries)")
    hard_rounds: int = Field(default=defaults.HARD_ROUNDS, ge=0, le=8, description="hard-negative rounds")
    hard_weight: float = Field(default=defaults.HARD_WEIGHT, ge=0, le=100)
    hard_positive_weight: float = Field(
        default=defaults.HARD_POSITIVE_WEIGHT, ge=0, le=100, description="hard positives' weight"
    )
    hard_at: Literal["finetuned", "edited"] = defaults.HARD_AT  # type: ignore[assignment]
    hard_target: float | None = Field(
        default=defaults.HARD_TARGET,
        ge=0,
        le=100,
        description="calibrated hard weight: refusal target (points)",
    )
    path_steps: int = Field(
        default=defaults.PATH_STEPS, ge=1, le=32, description="attribution: gradient points along the revert"
    )
    calibration_max: int = Field(
        default=defaults.CALIBRATION_MAX, ge=1, description="calibration prompts per hard-negative round"
    )
    contrast_kind: Literal["refusal", "odds"] = defaults.CONTRAST_KIND  # type: ignore[assignment]
    contrast: float = Field(
        default=defaults.CONTRAST, ge=0, le=100, description="weight of the benign-refusal effect"
    )

    @field_validator("spaces", mode="before")
    @classmethod
    def _split_spaces(cls, value: object) -> object:
        # Environment variables give a string: accept a JSON list or "mlp,attn".
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("spaces")
    @classmethod
    def _unique_spaces(cls, value: list[Space]) -> list[Space]:
        if len(set(value)) != len(value):
            raise ValueError("spaces must not repeat")
        return value

    @field_validator("hard_target", mode="before")
    @classmethod
    def _hard_target_off(cls, value: object) -> object:
        return off_as_none(value)

    @field_validator("band")
    @classmethod
    def _ordered_band(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 0 <= value[0] <= value[1]:
            raise ValueError("band must be [start, end] with 0 <= start <= end")
        return value


def off_as_none(value: object) -> object:
    """``"off"`` / ``"none"`` (any case) → None, anything else unchanged: TOML and command lines have
    no null, so this is how a setting such as ``hard_target`` is switched off."""
    if isinstance(value, str) and value.strip().lower() in ("off", "none"):
        return None
    return value


# What a policy's [fgsn] table may override for its own dimension (plus max_prompts, which only
# a dimension has: how many of its harmful prompts are scored).
OVERRIDABLE = ("q", "p", "scoring", "positions", "budget", "contrast")


def _optional(name: str) -> Any:
    info = FGSNFields.model_fields[name]
    bounded: Any = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return (bounded | None, None)


def overrides_model() -> type[BaseModel]:
    """The ``[fgsn]`` table's model: the overridable fields with the same bounds, all optional,
    strict (a policy file is typed TOML), frozen."""
    return create_model(  # type: ignore[call-overload,no-any-return]
        "FGSNOverrides",
        __config__=ConfigDict(extra="forbid", frozen=True, strict=True),
        __doc__="Per-dimension overrides of the daemon's FGSN parameters (``[fgsn]`` table).",
        **{name: _optional(name) for name in OVERRIDABLE},
        max_prompts=(Annotated[int, Field(ge=1)] | None, None),
    )
