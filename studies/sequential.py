"""Adaptive seed counts: how many seeds each ablation row needs, decided by a group-sequential paired t rule.

    rule = SeedRule(initial=(0, 1, 2), max=8, rope=0.5, alpha=0.05)     # study.yaml `seeds: {initial, max}`
    dec = decide_study(rule, rows, baseline, direction, trials)           # trials: {row, seed, status, value}
    dec.rows["seg+sal"].status -> a Decision: better | worse | equivalent | unresolved | unresolved at max
    dec.wanted -> {(row, seed), ...}   the grid points the study needs now (studies.plan claims only these)

The rule (`row_decision`). For a row and the baseline row, d_s = metric(row, s) − metric(baseline, s) over
the seeds both have, in the study's seed order (the initial seeds, then the integers after them). The study
looks at a row after its initial seeds and after every added seed, up to `max`: a design fixed before any
data. After n paired seeds the row's interval is mean ± c_n · sd / √n (sd with ddof 1), where c_n is the
group-sequential boundary for exactly those looks (`group_sequential_boundary`): the first look whose
interval
  - excludes 0 decides *better* or *worse* (in the study's direction),
  - else lies inside ±rope decides *equivalent* (both one-sided tests of ±rope cross the same boundary: TOST),
and the row stops there; otherwise it gets one more seed, and so does the baseline (same seed, same warm-up),
until `max` seeds: *unresolved at max*.

Why it holds: under normal paired differences the joint law of the t statistics (t_n0, ..., t_max) does
not depend on the sd, so c_n can be calibrated once per (alpha, initial, max) such that P(|t_n(mu)| > c_n
at some look) = alpha exactly, where t_n(mu) = (mean − mu) / (sd / √n). The intervals above are then
*repeated confidence intervals* (Jennison & Turnbull, "Group Sequential Methods with Applications to Clinical
Trials", 2000, ch. 9 and 11.1): they cover the true mean at every look at once with probability 1 − alpha,
so every decision read from them is right together with that probability, whenever the row stops. The shape
of c_n is O'Brien-Fleming's on the nominal p scale (Wang-Tsiatis with Δ = 0; bench/bench_sequential.py
measures it against Pocock and the family between): little alpha at the first looks, most at `max`, which
keeps the power close to a fixed-n t-test read once at `max`.

`method: confseq` keeps the rule of earlier versions: `t_mixture_interval`, a confidence sequence valid over
any number of looks (so `max` may be raised later without voiding it), about 3x less powerful at 8 seeds.

Multiplicity over rows: Bonferroni. Each of the m compared rows (every row but the baseline) gets its
interval at level alpha/m, so all m hold together with probability >= 1 − alpha: every better / worse /
equivalent of a study is right at once with that probability (family-wise). Recycling a decided row's alpha
to the open rows (Maurer & Bretz 2013) was measured in bench_sequential and left out (README, Results).

What it assumes: the paired differences of a row are independent normal draws with unknown mean and unknown
sd. bench_sequential measures how far the error rate bends under heavy tails, skew and collapsed seeds.

An unresolved row carries a forecast (`Forecast`): if the observed mean and sd held, about how many seeds the
rule would need to decide, and its conditional power (the chance to decide by `max`, simulated from there).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from scipy import optimize
from scipy import stats as sps

from core.records import FINAL_STATUSES, Status


class Decision(StrEnum):
    """A row's state under the rule (RowDecision.status): decided, or waiting for seeds, or out of them."""

    BETTER = "better"
    WORSE = "worse"
    EQUIVALENT = "equivalent"
    UNRESOLVED = "unresolved"  # another seed is coming
    UNRESOLVED_AT_MAX = "unresolved at max"  # the seeds are used up

    @property
    def is_decided(self) -> bool:
        return self in (Decision.BETTER, Decision.WORSE, Decision.EQUIVALENT)


class Method(StrEnum):
    """study.yaml `seeds: {method: ...}`: which boundary a row's interval uses."""

    GROUP_SEQUENTIAL = "group-sequential"  # calibrated for the design's looks (initial .. max): the default
    CONFSEQ = "confseq"  # the t-mixture confidence sequence: valid for any number of looks

    @property
    def title(self) -> str:
        return {
            Method.GROUP_SEQUENTIAL: "group-sequential paired t, O'Brien-Fleming-shaped boundary calibrated "
            "for its looks (Jennison & Turnbull 2000)",
            Method.CONFSEQ: "t-mixture confidence sequence (Wang & Ramdas 2023; Howard et al. 2021)",
        }[self]


CALIBRATION_DRAWS = (
    500_000  # Monte-Carlo draws of the boundary: its alpha to about ±1.3 % (relative) at 0.0125
)
CALIBRATION_SEED = 20211010  # fixed: the boundary, and so every decision, is a function of the design alone
FORECAST_DRAWS = 4000  # simulated continuations of a row for its conditional power
FORECAST_CAP = 1000  # a forecast beyond this many seeds reads "more than 1000"


@dataclass(frozen=True)
class SeedRule:
    """study.yaml `seeds: {initial: [0, 1, 2], max: 10, rope: 0.5, alpha: 0.05, method: group-sequential}`
    (rope in percent points, alpha family-wise)."""

    initial: tuple[int, ...]
    max: int
    rope: float = 0.5
    alpha: float = 0.05
    method: Method = Method.GROUP_SEQUENTIAL

    def sequence(self) -> tuple[int, ...]:
        """The seeds in the order they are added: the initial ones, then the integers after the largest."""
        start = max(self.initial) + 1
        return tuple(self.initial) + tuple(range(start, start + self.max - len(self.initial)))

    def record(self) -> dict:
        return {"initial": list(self.initial), "max": self.max, "rope": self.rope, "alpha": self.alpha,
                "method": str(self.method)}  # fmt: skip

    def describe(self, m: int) -> str:
        """One line naming the method, alpha and rope, for the report, the dashboard note and the CLI."""
        return (
            f"Adaptive seeds ({self.method.title}): initial {len(self.initial)} seeds, at most {self.max}; "
            f"alpha {self.alpha:g} family-wise over {m} row{'' if m == 1 else 's'} (Bonferroni: "
            f"{self.alpha / max(m, 1):.4g} per row); rope ±{self.rope:g} points. better / worse: the "
            "interval excludes 0; equivalent: it lies inside ±rope."
        )

    def intervals(self, d: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, lo, hi) of this rule's interval after each of the first 1..n differences (d: (..., n)) at
        the row's level alpha; ∓inf where the rule does not look (before the initial seeds, or past max)."""
        if self.method is Method.CONFSEQ:
            return t_mixture_interval(d, alpha, mixture_precision(alpha, len(self.initial), self.max))
        c = np.full(max(np.shape(d)[-1], self.max), np.inf)
        c[len(self.initial) - 1 : self.max] = group_sequential_boundary(alpha, len(self.initial), self.max)
        return repeated_interval(d, c[: np.shape(d)[-1]])


@functools.lru_cache(maxsize=64)
def group_sequential_boundary(
    alpha: float, n_initial: int, n_max: int, shape: float = 0.0
) -> tuple[float, ...]:
    """Two-sided critical values c_n of the paired t statistic at the looks n = n_initial .. n_max.

    # Jennison & Turnbull (2000), "Group Sequential Methods with Applications to Clinical Trials", §2.7.1 and
    # §11.1: a Wang-Tsiatis boundary (Δ = shape; 0 O'Brien-Fleming, 0.5 Pocock) on the nominal p scale,
    # p_n = 2 Φ(−C (n_max/n)^(1/2 − Δ)), c_n = t_(n−1)^(−1)(1 − p_n/2), with C calibrated so that under H0
    # P(|t_n| > c_n for some look) = alpha. The t statistics' joint law is free of the sd, so C is found once
    # by simulation: for each draw the largest C that still rejects is max_n z_n (n/n_max)^(1/2 − Δ), z_n the
    # normal deviate with t_n's two-sided p; C is its (1 − alpha) quantile.
    """
    if not 2 <= n_initial <= n_max:
        raise ValueError(f"need 2 <= initial ({n_initial}) <= max ({n_max})")
    rng = np.random.default_rng(CALIBRATION_SEED)
    looks = np.arange(n_initial, n_max + 1)
    w = (looks / n_max) ** (0.5 - shape)
    best = np.zeros(CALIBRATION_DRAWS)
    for lo in range(0, CALIBRATION_DRAWS, 100_000):  # in blocks: bounded memory for a large max
        d = rng.standard_normal((min(100_000, CALIBRATION_DRAWS - lo), n_max))
        t = paired_t(d)[:, looks - 1]
        z = sps.norm.isf(sps.t.sf(np.abs(t), looks - 1))
        best[lo : lo + len(d)] = (z * w).max(axis=1)
    big_c = float(np.quantile(best, 1.0 - alpha))
    return tuple(float(x) for x in nominal_to_t(big_c / w, looks))


def nominal_to_t(z: np.ndarray, n: np.ndarray) -> np.ndarray:
    """The t critical value (n − 1 degrees of freedom) with the same two-sided p as the normal deviate z."""
    return sps.t.isf(sps.norm.sf(z), np.asarray(n) - 1)


def paired_t(d: np.ndarray) -> np.ndarray:
    """The one-sample t statistic of the first 1..n differences (d: (..., n)); NaN at n = 1."""
    mean, se = mean_se(d)
    with np.errstate(divide="ignore", invalid="ignore"):
        return mean / se


def mean_se(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error (sd with ddof 1, over √n) of the first 1..n differences; se NaN at n = 1."""
    d = np.asarray(d, dtype=float)
    n = np.arange(1, d.shape[-1] + 1, dtype=float)
    mean = np.cumsum(d, axis=-1) / n
    ss = np.maximum(np.cumsum(d * d, axis=-1) - n * mean**2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.where(n > 1, np.sqrt(ss / np.maximum(n - 1, 1) / n), np.nan)
    return mean, se


def repeated_interval(d: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, lo, hi) after each of the first 1..n differences: mean ± c_n · se (Jennison & Turnbull §9.1,
    the repeated confidence interval of the boundary c); ∓inf where c_n is inf (no look there)."""
    mean, se = mean_se(d)
    c = np.broadcast_to(np.asarray(c, dtype=float), mean.shape)
    with np.errstate(invalid="ignore"):
        half = np.where(np.isinf(c), np.inf, np.nan_to_num(c * se, nan=np.inf))
    return mean, mean - half, mean + half


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
class Forecast:
    """What an unresolved row would need if its observed paired mean and sd held (fractions)."""

    mean: float
    sd: float
    seeds: (
        int | None
    )  # about how many paired seeds the rule would need to decide; None: more than FORECAST_CAP
    conditional_power: float | None  # P(the rule decides by max | the seeds so far, mean and sd as observed)


@dataclass(frozen=True)
class RowDecision:
    row: str
    status: Decision
    n: int  # paired seeds the decision used
    seeds: tuple[int, ...]  # those seeds, in order
    mean: float  # mean paired difference (fraction), NaN when n = 0
    lo: float  # the deciding interval (fraction; -inf / inf while unbounded)
    hi: float
    next_seed: int | None = (
        None  # the seed this row (and the baseline) needs next; None when decided / at max
    )
    forecast: Forecast | None = None  # unresolved rows the rule has looked at (the initial seeds paired)


CODES = {1: Decision.BETTER, -1: Decision.WORSE, 2: Decision.EQUIVALENT}


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
    d = np.array([x for _, x in pairs], dtype=float)
    if pairs:
        mean, lo, hi = rule.intervals(d, alpha)
        codes = classify(lo, hi, rule.rope / 100.0, sign)
        hit = np.flatnonzero(codes != 0)
        if hit.size:
            i = int(hit[0])
            return RowDecision(row, CODES[int(codes[i])], i + 1, seeds[: i + 1], float(mean[i]), float(lo[i]),
                               float(hi[i]))  # fmt: skip
        last = (float(mean[-1]), float(lo[-1]), float(hi[-1]))
    status = Decision.UNRESOLVED if next_seed is not None else Decision.UNRESOLVED_AT_MAX
    fc = forecast(rule, d, alpha, sign) if len(pairs) >= max(2, len(rule.initial)) else None  # from 1st look
    return RowDecision(row, status, len(pairs), seeds, *last, next_seed=next_seed, forecast=fc)


def forecast(rule: SeedRule, d: np.ndarray, alpha: float, sign: float = 1.0) -> Forecast:
    """If the observed mean and sd of the paired differences d held: about how many seeds the rule needs, and
    its conditional power at max.

    Seeds: the smallest n at which an interval of half-width h_n · sd around the observed mean decides
    (excludes 0, or lies inside ±rope), h_n the rule's own half-width factor up to max; past max, that of a
    design whose last look is n (group-sequential: the t value at max's nominal level, O'Brien-Fleming's last
    look moving little with the number of looks; confseq: its radius at n). Conditional power (Jennison &
    Turnbull §10.2, here by simulation): the share of continuations, the remaining seeds drawn N(mean, sd²)
    after the observed ones, in which the rule decides by max."""
    n, mean, sd = len(d), float(np.mean(d)), float(np.std(d, ddof=1))
    rope = rule.rope / 100.0
    need = None
    if sd == 0.0:
        need = n
    else:
        cs = np.arange(max(n, 2), FORECAST_CAP + 1)
        half = half_width_factor(rule, alpha, cs) * sd
        ok = (abs(mean) > half) | (abs(mean) + half < rope)
        need = int(cs[np.argmax(ok)]) if ok.any() else None
    power = None
    if n < rule.max:
        rng = np.random.default_rng(CALIBRATION_SEED)
        fut = rng.normal(mean, sd, size=(FORECAST_DRAWS, rule.max - n))
        paths = np.concatenate([np.broadcast_to(d, (FORECAST_DRAWS, n)), fut], axis=1)
        _, lo, hi = rule.intervals(paths, alpha)
        power = float((classify(lo, hi, rope, sign)[:, n:] != 0).any(axis=1).mean())
    return Forecast(mean, sd, need, power)


def half_width_factor(rule: SeedRule, alpha: float, n: np.ndarray) -> np.ndarray:
    """The rule's interval half-width over the sample sd (ddof 1) at n paired seeds; past max (for a
    forecast), that of a design stopped at n (see `forecast`)."""
    n = np.asarray(n, dtype=float)
    if rule.method is Method.CONFSEQ:
        c = mixture_precision(alpha, len(rule.initial), rule.max)
        return t_mixture_radius(n, alpha, c) * np.sqrt((n - 1) / n)  # its V is the ddof-0 variance
    bound = np.array(group_sequential_boundary(alpha, len(rule.initial), rule.max))
    z_last = sps.norm.isf(sps.t.sf(bound[-1], rule.max - 1))  # max's nominal level as a normal deviate
    c = nominal_to_t(np.full(n.shape, z_last), n)
    inside = (n >= len(rule.initial)) & (n <= rule.max)
    c[inside] = bound[(n[inside] - len(rule.initial)).astype(int)]
    c[n < len(rule.initial)] = np.inf
    return c / np.sqrt(n)


@dataclass
class StudyDecision:
    rows: dict[str, RowDecision] = field(default_factory=dict)  # every row but the baseline
    wanted: set[tuple[str, int]] = field(default_factory=set)  # (row, seed) the study needs now


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
        if t["status"] in FINAL_STATUSES:  # interrupted or running: the point is still pending
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


def forecast_text(d: RowDecision, rule: SeedRule) -> str:
    """'at +0.3 ± 0.6 it would need about 34 seeds; max is 8' (mean ± sd of the paired differences, percent
    points), with '; conditional power 12 % by max' while seeds may still be added; '' without a forecast."""
    f = d.forecast
    if f is None:
        return ""
    need = f"more than {FORECAST_CAP}" if f.seeds is None else f"about {f.seeds}"
    text = f"at {_pp(f.mean)} ± {100 * f.sd:.1f} it would need {need} seeds; max is {rule.max}"
    if f.conditional_power is not None:
        text += f"; conditional power {100 * f.conditional_power:.0f} % by max"
    return text


def status_text(d: RowDecision, rule: SeedRule, with_forecast: bool = False) -> str:
    """'better', 'equivalent within ±0.5', 'unresolved at max', 'unresolved (seed 4 next)', or 'waiting for
    the initial seeds' before the row has them; an unresolved row's forecast follows after a colon."""
    if d.status == Decision.EQUIVALENT:
        return f"equivalent within ±{rule.rope:g}"
    if d.status == Decision.UNRESOLVED and d.next_seed in rule.initial:
        return "waiting for the initial seeds"
    text = str(d.status)
    if d.status == Decision.UNRESOLVED and d.next_seed is not None:
        text = f"unresolved (seed {d.next_seed} next)"
    fc = forecast_text(d, rule) if with_forecast else ""
    return f"{text}: {fc}" if fc else text
