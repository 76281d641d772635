"""Paired statistics: a configuration against its baseline, seed by seed.

Two configurations run with the same seed share that seed's randomness (initialisation, data order), so
the per-seed difference usually varies less than the metric itself, and its interval is the honest one for
"is this row better than the baseline". The tables print it beside the difference of the means.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

from scipy import stats as sps

from studies.records import finite


@dataclass(frozen=True)
class PairedDelta:
    mean: float  # mean of a[s] - b[s] over the paired seeds (fraction, NaN when n = 0)
    lo: float  # 95% Student-t interval (NaN when n < 2)
    hi: float
    n: int  # paired seeds
    better: int  # pairs where a beats b in the study's direction (ties are not better)


def paired_delta(
    a: Mapping[Hashable, float], b: Mapping[Hashable, float], direction: str = "maximize"
) -> PairedDelta:
    """Paired difference a - b over the seeds present (with a finite value) in both mappings seed -> metric.

    mean = mean of the n per-seed differences d_s = a[s] - b[s]; the 95% interval is
    mean ± t.ppf(0.975, n - 1) · sd(d, ddof=1) / sqrt(n) (Student t; needs n >= 2, else lo = hi = NaN).
    better = number of seeds where a is better than b: a > b for direction "maximize", a < b for "minimize".
    """
    d = []
    for seed, x in a.items():
        x, y = finite(x), finite(b.get(seed))
        if x is not None and y is not None:
            d.append(x - y)
    n = len(d)
    sign = -1.0 if direction == "minimize" else 1.0
    better = sum(1 for v in d if sign * v > 0)
    if n == 0:
        return PairedDelta(math.nan, math.nan, math.nan, 0, 0)
    mean = sum(d) / n
    if n < 2:
        return PairedDelta(mean, math.nan, math.nan, n, better)
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    half = float(sps.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return PairedDelta(mean, mean - half, mean + half, n, better)


def _pp(x: float) -> str:
    """A fraction as signed percent points, one decimal ("+1.2"); ±∞ for an unbounded end."""
    return ("+∞" if x > 0 else "−∞") if math.isinf(x) else f"{100 * x:+.1f}"


def delta_cell(p: PairedDelta) -> str:
    """'+1.2 [+0.4, +2.0]' (percent points, 95% CI); '+1.2 (n = 1, no CI)'; '– (no paired seeds)'."""
    if p.n == 0:
        return "– (no paired seeds)"
    if p.n == 1:
        return f"{_pp(p.mean)} (n = 1, no CI)"
    return f"{_pp(p.mean)} [{_pp(p.lo)}, {_pp(p.hi)}]"


def better_cell(p: PairedDelta) -> str:
    """'3/3': seeds where the row beats the baseline, of the paired seeds; '–' when none are paired."""
    return "–" if p.n == 0 else f"{p.better}/{p.n}"
