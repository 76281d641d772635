"""Adaptive seed counts: how many seeds each ablation row needs, decided by an anytime-valid paired interval.

    rule = SeedRule(initial=(0, 1, 2), max=8, rope=0.5, alpha=0.05)     # study.yaml `seeds: {initial, max}`
    dec = decide_study(rule, rows, baseline, direction, trials)           # trials: {row, seed, status, value}
    dec.rows["seg+sal"].status -> "better" | "worse" | "equivalent" | "unresolved" | "unresolved at max"
    dec.wanted -> {(row, seed), ...}   the grid points the study needs now (studies.plan claims only these)

The rule (`row_decision`). For a row and the baseline row, d_s = metric(row, s) − metric(baseline, s) over
the seeds both have, in the study's seed order (the initial seeds, then the integers after them). After
every seed the row's interval for the mean paired difference is `t_mixture_interval`, a confidence sequence:
it covers the true mean at every seed count at once with probability >= 1 − alpha/m, so looking after each
seed and stopping when it decides does not inflate the error rate (a Student-t interval looked at after each
seed does: bench/bench_sequential.py measures both). The first seed count at which the interval
  - excludes 0 decides *better* or *worse* (in the study's direction),
  - else lies inside ±rope decides *equivalent* (the difference is smaller than the user cares about),
and the row stops there; otherwise it gets one more seed, and so does the baseline (same seed, same warm-up),
until `max` seeds: *unresolved at max*.

Multiplicity over rows: Bonferroni. Each of the m compared rows (every row but the baseline) gets its
interval at level alpha/m, so all m confidence sequences hold together, at every seed count, with
probability >= 1 − alpha: every better / worse / equivalent of a study is right at once with that
probability (family-wise). Holm would need p-values and one common decision time; rows here stop at
different seed counts and equivalence is read from the interval, which Bonferroni keeps simple.

What the interval assumes: the paired differences of a row are independent draws (one per seed) from a
normal distribution with unknown mean and unknown sd. The sd is not estimated and plugged in (that is not
valid at 3 seeds); the interval is valid for every sd, which is why it is wider than a one-look Student-t
interval at the same n (about 2-3x at 4-10 seeds, and unbounded at 3 for the usual alphas).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from core.records import Status

METHOD = "t-mixture confidence sequence"
STATUSES = ("better", "worse", "equivalent", "unresolved", "unresolved at max")


@dataclass(frozen=True)
class SeedRule:
    """study.yaml `seeds: {initial: [0, 1, 2], max: 10, rope: 0.5, alpha: 0.05}` (rope in percent points)."""

    initial: tuple[int, ...]
    max: int
    rope: float = 0.5
    alpha: float = 0.05

    def sequence(self) -> tuple[int, ...]:
        """The seeds in the order they are added: the initial ones, then the integers after the largest."""
        start = max(self.initial) + 1
        return tuple(self.initial) + tuple(range(start, start + self.max - len(self.initial)))

    def record(self) -> dict:
        return {"initial": list(self.initial), "max": self.max, "rope": self.rope, "alpha": self.alpha}

    def describe(self, m: int) -> str:
        """One line naming the method, alpha and rope, for the report, the dashboard note and the CLI."""
        return (
            f"Adaptive seeds ({METHOD}, Wang & Ramdas 2023; Howard et al. 2021): initial "
            f"{len(self.initial)} seeds, at most {self.max}; alpha {self.alpha:g} family-wise over {m} "
            f"row{'' if m == 1 else 's'} (Bonferroni: {self.alpha / max(m, 1):.4g} per row); "
            f"rope ±{self.rope:g} points. better / worse: the interval excludes 0; "
            "equivalent: it lies inside ±rope."
        )


def t_mixture_radius(t: np.ndarray, alpha: float, c: float) -> np.ndarray:
    """Half-width of the confidence sequence in units of sqrt(V), V = mean((d - mean d)^2), at n = t.

    # Wang & Ramdas (2023, "Anytime-valid t-tests and confidence sequences for Gaussian means with unknown
    # variance", the scale-invariant test martingale: a N(0, 1/c) mixture over the standardised effect, right
    # Haar over sigma): M_t(mu) = sqrt(c/(t+c)) * (1 - S^2 / ((t+c) * sum y^2))^(-t/2), y = d - mu, S = sum y;
    # Ville's inequality P(exists t: M_t(mu) >= 1/alpha) <= alpha; solving M_t(mu) < 1/alpha for mu gives
    # |mean - mu| < sqrt((1-q)(t+c) V / (t - (1-q)(t+c))), q = (alpha sqrt(c/(t+c)))^(2/t) (inf when <= 0).
    """
    t = np.asarray(t, dtype=float)
    q = (alpha * np.sqrt(c / (t + c))) ** (2.0 / t)
    k = t - (1.0 - q) * (t + c)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sqrt((1.0 - q) * (t + c) / k)
    return np.where(k > 0, r, np.inf)


@functools.lru_cache(maxsize=64)
def mixture_precision(alpha: float, n_initial: int, n_max: int) -> float:
    """The mixture's prior precision c, fixed by the design before any data (a c chosen from the data would
    void the guarantee): the c that maximises the mean of 1 / half-width over the looks n_initial..n_max, so
    that the interval is as tight as it can be on average where the rule decides."""
    t = np.arange(max(n_initial, 2), max(n_max, n_initial, 2) + 1)
    res = optimize.minimize_scalar(
        lambda logc: -float(np.mean(1.0 / t_mixture_radius(t, alpha, math.exp(logc)))),
        bounds=(math.log(1e-5), math.log(10.0)),
        method="bounded",
    )
    return math.exp(res.x)


def t_mixture_interval(d: np.ndarray, alpha: float, c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, lo, hi) of the confidence sequence after each of the first 1..n differences; d has shape
    (..., n), the results (..., n). lo / hi are ∓inf while the interval is unbounded (few seeds)."""
    d = np.asarray(d, dtype=float)
    t = np.arange(1, d.shape[-1] + 1, dtype=float)
    mean = np.cumsum(d, axis=-1) / t
    v = np.maximum(np.cumsum(d * d, axis=-1) / t - mean**2, 0.0)  # mean squared deviation
    r = t_mixture_radius(t, alpha, c)
    half = np.where(np.isinf(r), np.inf, np.where(np.isinf(r), 0.0, r) * np.sqrt(v))
    return mean, mean - half, mean + half


def classify(lo: np.ndarray, hi: np.ndarray, rope: float, sign: float = 1.0) -> np.ndarray:
    """Status code per interval: 1 better, -1 worse, 2 equivalent, 0 unresolved. `sign` is -1 when lower is
    better (direction minimize). better / worse first: an interval that excludes 0 decides the direction."""
    lo, hi = np.asarray(lo), np.asarray(hi)
    up, down = lo > 0, hi < 0
    out = np.where(up, 1, np.where(down, -1, 0)) * int(sign)
    return np.where((out == 0) & (lo > -rope) & (hi < rope), 2, out)


@dataclass(frozen=True)
class RowDecision:
    row: str
    status: str  # one of STATUSES
    n: int  # paired seeds the decision used
    seeds: tuple[int, ...]  # those seeds, in order
    mean: float  # mean paired difference (fraction), NaN when n = 0
    lo: float  # the deciding interval (fraction; -inf / inf while unbounded)
    hi: float
    next_seed: int | None = (
        None  # the seed this row (and the baseline) needs next; None when decided / at max
    )


CODES = {1: "better", -1: "worse", 2: "equivalent"}


def row_decision(
    rule: SeedRule, row: str, pairs: list[tuple[int, float]], next_seed: int | None, m: int, sign: float = 1.0
) -> RowDecision:
    """The rule for one row (see the module docstring). pairs: (seed, row − baseline as a fraction) in the
    study's seed order, as far as both trials have ended; next_seed: the first seed of the sequence after
    them (None: the sequence is used up). The row is decided at the first seed count whose interval decides;
    otherwise it wants next_seed, or is unresolved at max."""
    alpha = rule.alpha / max(m, 1)
    seeds = tuple(s for s, _ in pairs)
    last = (math.nan, -math.inf, math.inf)
    if pairs:
        mean, lo, hi = t_mixture_interval(
            np.array([x for _, x in pairs]), alpha, mixture_precision(alpha, len(rule.initial), rule.max)
        )
        codes = classify(lo, hi, rule.rope / 100.0, sign)
        hit = np.flatnonzero(codes != 0)
        if hit.size:
            i = int(hit[0])
            return RowDecision(row, CODES[int(codes[i])], i + 1, seeds[: i + 1], float(mean[i]), float(lo[i]),
                               float(hi[i]))  # fmt: skip
        last = (float(mean[-1]), float(lo[-1]), float(hi[-1]))
    status = "unresolved" if next_seed is not None else "unresolved at max"
    return RowDecision(row, status, len(pairs), seeds, *last, next_seed=next_seed)


@dataclass
class StudyDecision:
    rows: dict[str, RowDecision] = field(default_factory=dict)  # every row but the baseline
    wanted: set[tuple[str, int]] = field(default_factory=set)  # (row, seed) the study needs now

    @property
    def settled(self) -> bool:
        """No row wants another seed."""
        return all(d.status != "unresolved" for d in self.rows.values())


# A trial that will not run again (interrupted / running: pending).
ENDED = (Status.COMPLETE, Status.FAILED, Status.PRUNED)


def decide_study(
    rule: SeedRule, rows: list[str], baseline: str, direction: str, trials: Iterable[Mapping]
) -> StudyDecision:
    """Every row's decision and the grid points the study wants now, from trial records (mappings with row,
    seed, status and value: the metric as a fraction, None when missing). A seed whose trial ended without a
    value (failed) for the row or the baseline is skipped; a row's sequence stops at the first seed that has
    not ended for both. Wanted: every row's initial seeds, and each unresolved row's next seed, for the row
    and the baseline."""
    seq = rule.sequence()
    values: dict[tuple[str, int], float] = {}
    ended: set[tuple[str, int]] = set()
    for t in trials:
        key = (str(t["row"]), int(t["seed"]))
        if t["status"] in ENDED:
            ended.add(key)
            v = t.get("value")
            if t["status"] == Status.COMPLETE and v is not None and math.isfinite(v):
                values[key] = float(v)
    sign = -1.0 if direction == "minimize" else 1.0
    out = StudyDecision(wanted={(r, s) for r in rows for s in rule.initial})
    for r in rows:
        if r == baseline:
            continue
        pairs, nxt = [], None
        for s in seq:
            if (r, s) not in ended or (baseline, s) not in ended:
                nxt = s
                break
            if (r, s) in values and (baseline, s) in values:
                pairs.append((s, values[(r, s)] - values[(baseline, s)]))
        dec = row_decision(rule, r, pairs, nxt, len(rows) - 1, sign)
        if dec.next_seed is not None:
            out.wanted |= {(r, dec.next_seed), (baseline, dec.next_seed)}
        out.rows[r] = dec
    return out


def _pp(x: float) -> str:
    """A fraction as signed percent points, one decimal; ±∞ for an unbounded end."""
    return ("+∞" if x > 0 else "−∞") if math.isinf(x) else f"{100 * x:+.1f}"


def interval_text(d: RowDecision) -> str:
    """'+1.0 [+0.2, +1.8]' (percent points), '– (no paired seeds)' when the row has none yet."""
    return "– (no paired seeds)" if d.n == 0 else f"{_pp(d.mean)} [{_pp(d.lo)}, {_pp(d.hi)}]"


def status_text(d: RowDecision, rule: SeedRule) -> str:
    """'better', 'equivalent within ±0.5', 'unresolved at max', 'unresolved (seed 4 next)', or 'waiting for
    the initial seeds' before the row has them."""
    if d.status == "equivalent":
        return f"equivalent within ±{rule.rope:g}"
    if d.status == "unresolved" and d.next_seed in rule.initial:
        return "waiting for the initial seeds"
    if d.status == "unresolved" and d.next_seed is not None:
        return f"unresolved (seed {d.next_seed} next)"
    return d.status
