"""Intervals for the evaluation's rates and margins (pure functions, no model)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping

Z95 = 1.959963984540054


def wilson_interval(hits: int, n: int, z: float = Z95) -> dict[str, float]:
    """A rate with its Wilson score interval (sound at 0 and 1, unlike the normal approximation)."""
    if n <= 0:
        return {"rate": 0.0, "low": 0.0, "high": 1.0, "n": 0}
    rate = hits / n
    denom = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denom
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denom
    return {"rate": rate, "low": max(0.0, centre - half), "high": min(1.0, centre + half), "n": n}


def paired_bootstrap_diff(
    statistic: Callable[[Mapping[str, list[int]]], float],
    sizes: Mapping[str, int],
    seed: int = 0,
    draws: int = 2000,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``statistic`` over resamples of item indices drawn with replacement
    within each stratum (``sizes``: stratum -> item count); both arms of a paired comparison see
    the same draw because ``statistic`` evaluates them on the same indices."""
    rng = random.Random(seed)
    values = []
    for _ in range(draws):
        idx = {k: [rng.randrange(n) for _ in range(n)] for k, n in sizes.items()}
        values.append(statistic(idx))
    return _percentiles(values, level)


def _percentiles(values: list[float], level: float) -> tuple[float, float]:
    """The two-sided percentile interval of bootstrap ``values`` at ``level``."""
    values = sorted(values)
    tail = (1 - level) / 2
    return values[math.floor(tail * (len(values) - 1))], values[math.ceil((1 - tail) * (len(values) - 1))]


def cluster_bootstrap_interval(
    hits: list[bool], clusters: list[str], seed: int = 0, draws: int = 2000, level: float = 0.95
) -> dict[str, float]:
    """A rate with a percentile interval that resamples whole clusters (e.g. prompts built from the
    same question frame) with replacement: prompts of one cluster fail together, so an interval
    that treats them as independent (Wilson) is too narrow. Singleton clusters give the ordinary
    bootstrap."""
    if len(hits) != len(clusters):
        raise ValueError(f"{len(hits)} outcomes but {len(clusters)} cluster labels")
    if not hits:
        return {"rate": 0.0, "low": 0.0, "high": 1.0, "n": 0, "clusters": 0}
    by: dict[str, list[bool]] = {}
    for cluster, hit in zip(clusters, hits, strict=True):
        by.setdefault(cluster, []).append(hit)
    groups = [(sum(v), len(v)) for _, v in sorted(by.items())]
    rng = random.Random(seed)
    rates = []
    for _ in range(draws):
        drawn = [groups[rng.randrange(len(groups))] for _ in groups]
        rates.append(sum(h for h, _ in drawn) / sum(n for _, n in drawn))
    low, high = _percentiles(rates, level)
    return {"rate": sum(hits) / len(hits), "low": low, "high": high, "n": len(hits), "clusters": len(groups)}
