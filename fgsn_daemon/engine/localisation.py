"""Safety layers (cosine-gap curve and band) and fine-grained safety neurons (scores, selection).

All functions here are pure: they take statistics and weights and return records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fgsn_daemon.core.errors import ConfigError
from fgsn_daemon.core.records import Band, LayerCount, LayerCurve, NeuronId, ScoredNeuron, SkippedNeuron
from fgsn_daemon.engine.activations import ActivationStats
from fgsn_daemon.engine.scorings import NeuronScores

# The band is where the benign–harmful gap *opens*: from the first layer reaching BAND_LOW of the
# largest gap to the first reaching BAND_HIGH (Li et al.'s "safety layers" reading).
BAND_LOW = 0.2
BAND_HIGH = 0.8


def layer_curve(benign: ActivationStats, harmful: ActivationStats) -> LayerCurve:
    """Mean pairwise cosine per layer from sums of unit vectors: for unit vectors u_k with sum S,
    Σ_{j≠k} u_j·u_k = ‖S‖² − n, and Σ_{j∈N,k∈M} u_j·u_k = S_N·S_M."""
    n, m = benign.prompts_seen, harmful.prompts_seen
    if n < 2 or m < 1:
        raise ConfigError("the layer curve needs at least 2 benign and 1 harmful prompt")
    layers = sorted(benign.unit_sums)
    nn_, nm = [], []
    for layer in layers:
        s_n, s_m = benign.unit_sums[layer], harmful.unit_sums[layer]
        nn_.append(float((s_n @ s_n - n) / (n * (n - 1))))
        nm.append(float(s_n @ s_m / (n * m)))
    return LayerCurve(benign_benign=nn_, benign_harmful=nm, gap=[a - b for a, b in zip(nn_, nm, strict=True)])


def choose_band(curve: LayerCurve, override: tuple[int, int] | None = None) -> Band:
    n_layers = len(curve.gap)
    if override is not None:
        start, end = override
        if not 0 <= start <= end < n_layers:
            raise ConfigError(f"band {start}-{end} is outside the model's layers 0-{n_layers - 1}")
        return Band(start=start, end=end, source="override")
    gap = curve.gap
    peak = max(gap)
    if peak <= 0:
        # No layer separates harmful from benign prompts: fall back to the steepest rise.
        rises = [gap[0]] + [gap[i] - gap[i - 1] for i in range(1, n_layers)]
        start = end = max(range(n_layers), key=lambda i: rises[i])
    else:
        start = next(i for i, g in enumerate(gap) if g >= BAND_LOW * peak)
        end = next(i for i, g in enumerate(gap) if g >= BAND_HIGH * peak)
    end = max(end, start)
    min_width = max(1, math.ceil(n_layers / 8))
    while end - start + 1 < min_width:
        if end + 1 < n_layers:
            end += 1
        elif start > 0:
            start -= 1
        else:
            break
    return Band(start=start, end=end, source="auto")


def top_fraction(scores: torch.Tensor, percent: float) -> list[int]:
    """Indices of the top ``percent`` % (rounded up), ties broken by index for determinism."""
    k = math.ceil(len(scores) * percent / 100.0)
    order = torch.argsort(-scores, stable=True)
    return order[:k].tolist()


@dataclass(frozen=True)
class Selection:
    candidates: list[ScoredNeuron]
    selected: list[ScoredNeuron]
    skipped: list[SkippedNeuron]
    counts: list[LayerCount]


def select_neurons(
    scores: Mapping[tuple[int, str], NeuronScores],
    q: float,
    p: float,
    frozen: Mapping[NeuronId, str] | None = None,
) -> Selection:
    """Candidates = top-q % by harmful score minus top-p % by benign score, per (layer, space);
    selection = candidates minus neurons frozen earlier (recorded with their owner)."""
    if not 0 < q <= 100 or not 0 <= p <= 100:
        raise ConfigError(f"q must be in (0, 100] and p in [0, 100] (got q={q}, p={p})")
    frozen = frozen or {}
    candidates: list[ScoredNeuron] = []
    selected: list[ScoredNeuron] = []
    skipped: list[SkippedNeuron] = []
    counts: list[LayerCount] = []
    for (layer, space), sc in sorted(scores.items()):
        harm_top = top_fraction(sc.harmful, q)
        benign_top = set(top_fraction(sc.benign, p)) if p > 0 else set()
        n_cand = n_skip = n_sel = 0
        for rank, idx in enumerate(harm_top):
            if idx in benign_top:
                continue
            rec = ScoredNeuron(
                layer=layer,
                space=space,
                index=idx,
                harmful_score=float(sc.harmful[idx]),
                benign_score=float(sc.benign[idx]),
                harmful_rank=rank,
            )
            candidates.append(rec)
            n_cand += 1
            owner = frozen.get(NeuronId(layer, space, idx))
            if owner is not None:
                skipped.append(SkippedNeuron(layer=layer, space=space, index=idx, owner=owner))
                n_skip += 1
            else:
                selected.append(rec)
                n_sel += 1
        counts.append(
            LayerCount(
                layer=layer,
                space=space,
                total=len(sc.harmful),
                harmful_top=len(harm_top),
                benign_top=len(benign_top),
                candidates=n_cand,
                skipped=n_skip,
                selected=n_sel,
            )
        )
    return Selection(candidates, selected, skipped, counts)


def group_by_layer_space(neurons: Sequence[ScoredNeuron | NeuronId]) -> dict[tuple[int, str], list[int]]:
    grouped: dict[tuple[int, str], list[int]] = {}
    for n in neurons:
        grouped.setdefault((n.layer, n.space), []).append(n.index)
    return {k: sorted(v) for k, v in grouped.items()}
