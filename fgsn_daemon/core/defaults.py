"""The FGSN settings, in one place: named presets and the default one. The engine, the daemon's
settings, ``fgsn apply`` and the experiment harnesses all read them.

- ``attribution`` (delta attribution; README "Efficacy"): single weight entries whose revert to the
  aligned value most lowers the refusal loss, ranked over all layers by gain − 1 × the refusal
  contrast (how much reverting the entry brings refusal back on benign prompts), under a global
  budget of 0.5 % of the parameters, then one round of over-refusal hard negatives (the entries
  behind the benign calibration prompts the edited model refuses are penalised and the budget
  selected again) whose weight calibrates itself: the smallest weight, searched from 0.05, whose
  edit refuses at most 1 point more calibration prompts than the fine-tuned model (no hard
  negatives when the first selection is already within it). The setting was chosen on the SmolLM2
  trio's selection half (over-refusal measured on held-out-phrase benign prompts) by the declared
  rule (``efficacy.choose_setting``): the lowest ASR among the settings within 5 points of the
  fine-tuned over-refusal and 2 points of its utility (none reached the aligned ASR + 5), with the
  fixed weight 0.05. The target of 1 point was then chosen by the same limits over two builds of
  the trio: its search finds 0.05 on the first and 0.2 on the second, where the fixed 0.05
  over-refused by 27 points; 2 points over-refused on the first (README "A self-calibrating hard
  weight").
- ``activation``: the previous default (contrast scoring, restore, q = 10 % per band layer over MLP
  and attention neurons), chosen on the tiny organism; no better than random units on SmolLM2.
- ``paper``: the FGSN paper's reading (Wanda scores, Safe-LoRA operator, q = p = 5 %, MLP neurons).
"""

from __future__ import annotations

from typing import Any

from fgsn_daemon.core.errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    "attribution": {
        "scoring": "attribution",
        "operator": "restore",
        "q": 10.0,
        "p": 0.0,
        "spaces": ("mlp", "attn"),
        "allocation": "global",
        "budget": 0.5,
        "unit": "entry",
        "scope": "all",
        "guard": None,
        "contrast": 1.0,
        "contrast_kind": "refusal",
        "steps": 1,
        "hard_rounds": 1,
        "hard_weight": 0.05,
        "hard_target": 1.0,
    },
    "activation": {
        "scoring": "contrast",
        "operator": "restore",
        "q": 10.0,
        "p": 5.0,
        "spaces": ("mlp", "attn"),
        "allocation": "per_layer",
        "budget": 1.0,
        "unit": "neuron",
        "scope": "all",
        "guard": None,
        "contrast": 0.0,
        "contrast_kind": "refusal",
        "steps": 1,
        "hard_rounds": 0,
        "hard_weight": 0.05,
        "hard_target": None,
    },
    "paper": {
        "scoring": "wanda",
        "operator": "safe_lora",
        "q": 5.0,
        "p": 5.0,
        "spaces": ("mlp",),
        "allocation": "per_layer",
        "budget": 1.0,
        "unit": "neuron",
        "scope": "all",
        "guard": None,
        "contrast": 0.0,
        "contrast_kind": "refusal",
        "steps": 1,
        "hard_rounds": 0,
        "hard_weight": 0.05,
        "hard_target": None,
    },
}
# the path-integrated score (README "Path-integrated attribution"): the declared rule's pick on the
# LoRA trio's selection half among the integrated settings; it repairs the benign-only fine-tune
# (100 → 34 % ASR on the report half) where the default cannot, but loses on the full fine-tune
# and the tiny organism, and costs path_steps backward passes per prompt
PRESETS["integrated"] = {
    **PRESETS["attribution"],
    "contrast": 0.78,
    "hard_rounds": 0,
    "hard_target": None,
    "path_steps": 3,
}
DEFAULT_PRESET = "attribution"


def preset(name: str) -> dict[str, Any]:
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise ConfigError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})") from None


_DEFAULT = PRESETS[DEFAULT_PRESET]
SCORING: str = _DEFAULT["scoring"]
OPERATOR: str = _DEFAULT["operator"]
Q: float = _DEFAULT["q"]  # top-q % of neurons by harmful score, per (layer, space) (per-layer allocation)
P: float = _DEFAULT["p"]  # minus the top-p % by benign score
SPACES: tuple[str, ...] = _DEFAULT["spaces"]
ALLOCATION: str = _DEFAULT["allocation"]  # attribution: per_layer (q % of each band layer) | global
BUDGET: float = _DEFAULT["budget"]  # global allocation / entry units: percent of all parameters
UNIT: str = _DEFAULT["unit"]  # attribution: neuron | entry (single weight entries, restored to aligned)
SCOPE: str = _DEFAULT["scope"]  # global allocation: all layers compete, or the band only
GUARD: float | None = _DEFAULT["guard"]  # over-refusal guard (points), None = off
STEPS: int = _DEFAULT["steps"]  # attribution entries: iterative selection steps (1 = one shot)
# attribution entries: over-refusal hard negatives, rounds of (edit, find the calibration prompts the
# edited model refuses, penalise the entries that drive those refusals, select again), and the weight
HARD_ROUNDS: int = _DEFAULT["hard_rounds"]
HARD_WEIGHT: float = _DEFAULT["hard_weight"]
# the calibration prompts a hard-negative round generates answers for, at most (evenly spread over
# the benign set): the default was chosen with the 200 bundled benign prompts
CALIBRATION_MAX = 200
HARD_POSITIVE_WEIGHT: float = _DEFAULT.get("hard_positive_weight", 0.0)
# where the hard rounds take their gradients: finetuned (as the scores) | edited (the round's edit)
HARD_AT: str = _DEFAULT.get("hard_at", "finetuned")
# self-calibrating hard weight: points of calibration refusal above the fine-tuned model's that the
# hard rounds' weight search aims for (None: the fixed hard_weight)
HARD_TARGET: float | None = _DEFAULT.get("hard_target")
# attribution: points on the path from the fine-tuned to the aligned weights where the gradients are
# taken (1 = first order at the fine-tuned weights; k > 1 = integrated gradients, k midpoints)
PATH_STEPS: int = _DEFAULT.get("path_steps", 1)
CONTRAST: float = _DEFAULT["contrast"]
CONTRAST_KIND: str = _DEFAULT[
    "contrast_kind"
]  # refusal | odds  # attribution: weight of the benign-refusal effect in the ranking
