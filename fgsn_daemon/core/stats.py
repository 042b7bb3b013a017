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
    values.sort()
    tail = (1 - level) / 2
    lo = values[math.floor(tail * (draws - 1))]
    hi = values[math.ceil((1 - tail) * (draws - 1))]
    return lo, hi
