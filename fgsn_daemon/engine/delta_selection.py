"""Selection for delta-aware scores: neuron units under a global parameter budget, and entry units.

The activation scorings pick the top-q % of every band layer. Delta attribution measures what
reverting a unit buys (``gain``: how much the refusal loss drops) and costs (``cost``: how much the
benign/task loss rises) on one scale, so units of different layers and spaces compete directly:
candidates are ranked by gain per parameter across all scored (layer, space) pairs, the top-p % by
cost are excluded (FGSN's benign filter), and units are taken until the budget is spent. Candidates
depend only on the scores; frozen units are then skipped, as in :func:`select_neurons`.

Entry units do the same per weight entry: the entries with the largest positive gain, minus the
top-p % by cost, up to the budget. All functions are pure.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from fgsn_daemon.core.errors import ConfigError
from fgsn_daemon.core.records import LayerCount, NeuronId, ScoredNeuron, SkippedNeuron
from fgsn_daemon.engine.localisation import Selection
from fgsn_daemon.engine.scorings import NeuronScores


def _cost_cutoff(costs: torch.Tensor, p: float) -> float:
    """The smallest cost inside the top-p % (``inf`` when p = 0: nothing is excluded)."""
    k = math.ceil(costs.numel() * p / 100.0)
    if k <= 0:
        return math.inf
    return float(torch.topk(costs.flatten().double(), k).values[-1])


def select_global(
    scores: Mapping[tuple[int, str], NeuronScores],
    unit_size: Mapping[tuple[int, str], int],
    budget: int,
    p: float,
    frozen: Mapping[NeuronId, str] | None = None,
) -> Selection:
    """Candidates: units with positive gain (``scores[k].harmful``), best gain per parameter first,
    not in the top-p % by cost (``scores[k].benign``, pooled over all units), until their
    parameters reach ``budget``; then frozen units are skipped (recorded with their owner)."""
    if budget < 0 or not 0 <= p <= 100:
        raise ConfigError(f"budget must be >= 0 and p in [0, 100] (got {budget}, {p})")
    keys = sorted(scores)
    if not keys:
        return Selection([], [], [], [])
    cutoff = _cost_cutoff(torch.cat([scores[k].benign.double() for k in keys]), p)
    gains, order_keys, order_idx = [], [], []
    for k in keys:
        sc = scores[k]
        ok = (sc.harmful > 0) & (sc.benign.double() < cutoff)
        kept = torch.nonzero(ok).flatten()
        gains.append(sc.harmful.double()[kept] / unit_size[k])
        order_keys += [k] * len(kept)
        order_idx.append(kept)
    per_param = torch.cat(gains)
    flat_idx = torch.cat(order_idx)
    # stable sort on (−gain per parameter); ties keep (layer, space, index) order: deterministic
    order = torch.argsort(-per_param, stable=True).tolist()
    frozen = frozen or {}
    candidates: list[ScoredNeuron] = []
    selected: list[ScoredNeuron] = []
    skipped: list[SkippedNeuron] = []
    spent = 0
    for rank, j in enumerate(order):
        layer, space = order_keys[j]
        size = unit_size[(layer, space)]
        if spent + size > budget:
            break
        idx = int(flat_idx[j])
        rec = ScoredNeuron(
            layer=layer,
            space=space,
            index=idx,
            harmful_score=float(scores[(layer, space)].harmful[idx]),
            benign_score=float(scores[(layer, space)].benign[idx]),
            harmful_rank=rank,
        )
        candidates.append(rec)
        spent += size
        owner = frozen.get(rec.id)
        if owner is not None:
            skipped.append(SkippedNeuron(layer=layer, space=space, index=idx, owner=owner))
        else:
            selected.append(rec)
    n_cand = Counter((c.layer, c.space) for c in candidates)
    n_skip = Counter((s.layer, s.space) for s in skipped)
    counts = [
        LayerCount(
            layer=k[0],
            space=k[1],
            total=len(scores[k].harmful),
            harmful_top=int((scores[k].harmful > 0).sum()),
            benign_top=int((scores[k].benign.double() >= cutoff).sum()),
            candidates=n_cand[k],
            skipped=n_skip[k],
            selected=n_cand[k] - n_skip[k],
        )
        for k in keys
    ]
    return Selection(candidates, selected, skipped, counts)


def _top_values(chunks: Iterable[torch.Tensor], k: int) -> torch.Tensor:
    """The k largest values over all ``chunks`` (1-D; fewer if there are fewer), largest first,
    holding at most about 2k values at a time instead of concatenating everything."""
    best: torch.Tensor | None = None
    for chunk in chunks:
        part = chunk if chunk.numel() <= k else torch.topk(chunk, k).values
        best = part if best is None else torch.cat([best, part])
        if best.numel() > k:
            best = torch.topk(best, k).values
    if best is None:
        return torch.empty(0)
    return torch.sort(best, descending=True).values


def _entry_scorer(
    cost: Mapping[str, torch.Tensor],
    names: Sequence[str],
    budget: int,
    p: float,
    penalty: Mapping[str, torch.Tensor] | None,
    contrast: float,
) -> Callable[[Mapping[str, torch.Tensor], str], torch.Tensor]:
    """Checks the selection's arguments and returns ``score(gain, name)``: one tensor's flat
    float32 scores, ``gain − contrast × penalty`` (or ``gain``) where the gain is positive and the
    entry is not among the top-p % by cost over all ``names``, else 0. Float32 throughout: a k-th
    value is one of these scores, so comparisons with it are exact."""
    if budget < 0 or not 0 <= p <= 100 or contrast < 0:
        raise ConfigError(
            f"budget and contrast must be >= 0 and p in [0, 100] (got {budget}, {contrast}, {p})"
        )
    if contrast > 0 and penalty is None:
        raise ConfigError("a refusal contrast needs the benign-refusal effects (penalty)")
    n_excluded = math.ceil(sum(cost[n].numel() for n in names) * p / 100.0)
    cutoff = (
        float(_top_values((cost[n].flatten() for n in names), n_excluded)[-1]) if n_excluded > 0 else math.inf
    )

    def score(gain: Mapping[str, torch.Tensor], n: str) -> torch.Tensor:
        g = gain[n].float()
        s = g - contrast * penalty[n].float() if contrast > 0 and penalty is not None else g
        return torch.where((cost[n] < cutoff) & (g > 0), s, torch.zeros_like(s)).flatten()

    return score


def select_entries(
    gain: Mapping[str, torch.Tensor],
    cost: Mapping[str, torch.Tensor],
    budget: int,
    p: float,
    penalty: Mapping[str, torch.Tensor] | None = None,
    contrast: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Boolean masks (per tensor name) of the ``budget`` entries with the largest positive score,
    skipping the top-p % by cost over all scored entries. Ties are broken by position (tensors in
    name order, entries in row-major order).

    The score is ``gain`` or, with a refusal contrast, ``gain − contrast × penalty`` (``penalty``:
    how much reverting the entry makes benign prompts refused) over entries whose gain is positive.

    Memory: one tensor's scores at a time plus O(budget) values (two passes over the tensors), so
    a model's worth of scores is never concatenated."""
    names = sorted(gain)
    scorer = _entry_scorer(cost, names, budget, p, penalty, contrast)
    if not names or budget == 0:
        return {n: torch.zeros_like(gain[n], dtype=torch.bool) for n in names}

    def score(n: str) -> torch.Tensor:
        return scorer(gain, n)

    # pass 1: the best ``budget`` positive scores (every score above the k-th is among them)
    best = _top_values((v[v > 0] for v in map(score, names)), budget)
    k = best.numel()  # min(budget, number of positive scores)
    if k == 0:
        return {n: torch.zeros_like(gain[n], dtype=torch.bool) for n in names}
    # pass 2: topk is not guaranteed stable: take the k-th value, then every entry above it and
    # the first (by position) entries equal to it
    kth = float(best[k - 1])
    need = k - int((best > kth).sum())
    out: dict[str, torch.Tensor] = {}
    for n in names:
        flat = score(n)
        mask = flat > kth
        if need > 0:
            ties = torch.nonzero(flat == kth).flatten()[:need]
            mask[ties] = True
            need -= len(ties)
        out[n] = mask.reshape(gain[n].shape)
    return out


def select_entries_union(
    gains: Sequence[Mapping[str, torch.Tensor]],
    cost: Mapping[str, torch.Tensor],
    budget: int,
    p: float,
    penalty: Mapping[str, torch.Tensor] | None = None,
    contrast: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The union of every dimension's own top-t entries (each ranked as in ``select_entries`` by
    its own gain), with t the largest count whose union fits ``budget``: each dimension gets its
    best entries, whatever the scale of its loss, instead of one ranking by the summed gain.

    Entries tied with a dimension's t-th score come in together (no positional tie-break), so a
    dimension may bring more than t. Searches t by bisection over per-dimension thresholds (each
    dimension's top-``budget`` scores are found once), so it costs O(log budget) passes over the
    scores; it holds one score table per dimension, so it is meant for the harness's few
    dimensions, not for streaming a large model's scores as ``select_entries`` does."""
    if not gains:
        raise ConfigError("no dimensions to select for")
    names = sorted(gains[0])
    scorer = _entry_scorer(cost, names, budget, p, penalty, contrast)
    if budget == 0:
        return {n: torch.zeros_like(gains[0][n], dtype=torch.bool) for n in names}
    # held once: one score table per dimension
    scores = [{n: scorer(g, n) for n in names} for g in gains]
    tops = [_top_values((s[n][s[n] > 0] for n in names), budget) for s in scores]

    def union(t: int) -> dict[str, torch.Tensor]:
        out = {n: torch.zeros(cost[n].numel(), dtype=torch.bool) for n in names}
        for s, top in zip(scores, tops, strict=True):
            if t == 0 or top.numel() == 0:
                continue
            kth = float(top[min(t, top.numel()) - 1])
            for n in names:
                out[n] |= (s[n] >= kth) & (s[n] > 0)
        return out

    lo, hi = 0, budget  # union(lo) fits; find the largest t that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(int(m.sum()) for m in union(mid).values()) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return {n: m.reshape(gains[0][n].shape) for n, m in union(lo).items()}


def neurons_of_entries(
    masks: Mapping[str, torch.Tensor], tensor_units: Mapping[str, tuple[int, str, int]]
) -> dict[NeuronId, int]:
    """Neurons touched by entry masks, with how many of their entries are selected.
    ``tensor_units`` maps a tensor name to (layer, space, neuron axis)."""
    out: dict[NeuronId, int] = {}
    for name, mask in masks.items():
        layer, space, axis = tensor_units[name]
        m = mask if mask.dim() == 2 else mask.reshape(-1, 1)
        per_unit = m.sum(dim=1 - axis)
        for idx in torch.nonzero(per_unit).flatten().tolist():
            key = NeuronId(layer, space, idx)
            out[key] = out.get(key, 0) + int(per_unit[idx])
    return out


def calibrated_weight(
    rate_at: Callable[[float], float],
    start: float,
    limit: float,
    max_moves: int = 6,
    refine: int = 2,
) -> tuple[float, list[tuple[float, float]]]:
    """The smallest hard-negative weight whose edit keeps the calibration refusal rate within
    ``limit``: from ``start``, halve while the rate stays within it (or double until it does), at
    most ``max_moves`` times, then ``refine`` bisections in log space between the last weight over
    the limit and the first within it. A smaller weight leaves more of the budget to the harmful
    gain, so the smallest passing weight spends the over-refusal allowance on safety.

    Returns the weight and every (weight, rate) tried, in order. If no weight tried is within the
    limit, the one with the lowest rate (the smaller on a tie) is returned."""
    if start <= 0:
        raise ConfigError(f"the calibrated hard weight starts from hard_weight > 0 (got {start})")
    tried: list[tuple[float, float]] = []

    def within(weight: float) -> bool:
        rate = rate_at(weight)
        tried.append((weight, rate))
        return rate <= limit + 1e-12

    passing: float | None = start if within(start) else None
    failing: float | None = None if passing is not None else start
    for _ in range(max_moves):
        if passing is not None and failing is not None:
            break
        # within the limit: try a smaller weight; over it: a larger one
        weight = passing / 2 if passing is not None else 2 * failing  # type: ignore[operator]
        if within(weight):
            passing = weight
        else:
            failing = weight
    if passing is None:
        return min(tried, key=lambda t: (t[1], t[0]))[0], tried
    if failing is not None:
        for _ in range(refine):
            weight = math.sqrt(failing * passing)
            if within(weight):
                passing = weight
            else:
                failing = weight
    return passing, tried
