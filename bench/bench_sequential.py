"""How the adaptive seed rules behave when the truth is known: paired differences simulated per cell.

    python -m bench.bench_sequential [--reps 100000] [--initial 3] [--max 10] [--rope 0.5] [--alpha 0.05]
                                     [--rows 1] [--seed 0] [--deltas 0 0.25 0.5 1 2] [--sigmas 0.4 0.8 1.5]
                                     [--dists normal t3 lognormal-0.5 lognormal-1 collapse]
                                     [--dist-deltas 0 1] [--shapes] [--family]

One JSON line per (rule, distribution, true Δ, paired sd σ) cell, in percent points, for one row against its
baseline (--rows M: the row's share alpha/M of a study comparing M rows, Bonferroni as the study does;
default 1, the whole alpha). Each repetition draws max paired differences and applies the rule after the
initial seeds and after each added seed, stopping at the first decision. Rules:
  - "group-sequential": studies.sequential's default, the boundary calibrated for these looks;
  - "confseq": the t-mixture confidence sequence (`seeds: {method: confseq}`);
  - "naive": the same stopping rule on the one-look Student-t interval at the row's level, recomputed after
    each seed, as a user who adds seeds and looks again;
  - "fixed-n": the oracle, a paired t-test (and TOST) at `max` seeds read once.
Distributions of the paired differences (each with mean Δ and sd σ): "normal"; "t3" (Student t with 3
degrees of freedom, heavy tails); "lognormal-0.5" and "lognormal-1" (centred log-normals with log-sd 0.5 and
1: skewness 1.75 and 6.2); "collapse" (normal, but each seed with probability 0.1 drops by 5σ: a collapsed
trial; the cell's Δ is the effect without collapses). The non-normal ones run at --dist-deltas only.
Fields: false_resolution = share of runs whose decision contradicts the truth (Δ = 0: better or worse; Δ > 0:
worse, or equivalent when Δ >= rope); power = share decided correctly (Δ = 0: equivalent; Δ > 0: better);
mean_seeds and p95_seeds = seeds the row used; the shares of each status; alpha = the family-wise level,
rows = the compared rows (one row's share is alpha / rows), reps; mc_se = the Monte-Carlo standard error of
a share equal to the row's alpha.
--shapes adds lines for the group-sequential boundary's other shapes (Wang-Tsiatis Δ_WT 0.25 and Pocock's
0.5, on the nominal p scale; the rule uses 0, O'Brien-Fleming's). --family adds the family-wise lines: M rows
(--rows, at least 2) against one shared baseline (so their differences correlate, 0.5), Bonferroni against
recycling a rejected row's alpha to the open rows (the graphical approach, Maurer & Bretz 2013, Holm's graph).
Exit status 1 when a valid rule's (group-sequential, confseq) false_resolution at Δ = 0 under normal
differences exceeds the row's alpha by more than 3 Monte-Carlo standard errors.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
from scipy import stats as sps

from studies.sequential import (
    Method,
    SeedRule,
    classify,
    group_sequential_boundary,
    repeated_interval,
)

RULES = ("group-sequential", "confseq", "naive", "fixed-n")
DISTS = ("normal", "t3", "lognormal-0.5", "lognormal-1", "collapse")


def student_t_interval(d: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """reports.paired.paired_delta's interval after each of the first 1..n differences, vectorised over the
    leading axes: mean ± t(1 − alpha/2, n − 1) · sd(ddof=1) / √n (±inf at n = 1)."""
    n = np.arange(1, d.shape[-1] + 1)
    c = np.where(n > 1, sps.t.isf(alpha / 2, np.maximum(n - 1, 1)), np.inf)
    _, lo, hi = repeated_interval(d, c)
    return lo, hi


def draw(dist: str, delta: float, sigma: float, shape: tuple[int, int], rng) -> np.ndarray:
    """Paired differences with mean delta and sd sigma (collapse: before its drops) of one distribution."""
    if dist == "normal":
        return rng.normal(delta, sigma, size=shape)
    if dist == "t3":  # Var t_3 = 3
        return delta + sigma * rng.standard_t(3, size=shape) / math.sqrt(3)
    if dist.startswith("lognormal"):  # log-sd s: mean e^(s²/2), variance (e^(s²) − 1) e^(s²)
        s = float(dist.split("-")[1])
        x = rng.lognormal(0.0, s, size=shape)
        return delta + sigma * (x - math.exp(s * s / 2)) / math.sqrt((math.exp(s * s) - 1) * math.exp(s * s))
    if dist == "collapse":
        return rng.normal(delta, sigma, size=shape) - 5 * sigma * (rng.random(shape) < 0.1)
    raise ValueError(dist)


def intervals(rule: str, d: np.ndarray, alpha: float, n0: int, n_max: int, shape: float = 0.0):
    """(lo, hi) of a rule after each seed (∓inf where it does not look)."""
    if rule == "group-sequential":
        c = np.full(n_max, np.inf)
        c[n0 - 1 :] = group_sequential_boundary(alpha, n0, n_max, shape)
        return repeated_interval(d, c)[1:]
    if rule == "confseq":
        return SeedRule(tuple(range(n0)), n_max, method=Method.CONFSEQ).intervals(d, alpha)[1:]
    if rule == "naive":
        return student_t_interval(d, alpha)
    if rule == "fixed-n":  # one look, at max
        c = np.full(n_max, np.inf)
        c[-1] = sps.t.isf(alpha / 2, n_max - 1)
        return repeated_interval(d, c)[1:]
    raise ValueError(rule)


def decide(lo: np.ndarray, hi: np.ndarray, n0: int, rope: float) -> tuple[np.ndarray, np.ndarray]:
    """(status code, seeds used) per repetition: the first look from n0 on that decides, else 0 at max."""
    codes = classify(lo, hi, rope)[:, n0 - 1 :]
    decided = codes != 0
    first = np.where(decided.any(axis=1), decided.argmax(axis=1), codes.shape[1] - 1)
    status = np.where(decided.any(axis=1), codes[np.arange(len(codes)), first], 0)
    return status, first + n0


def simulate(
    rule: str,
    delta: float,
    sigma: float,
    reps: int,
    n0: int,
    n_max: int,
    rope: float,
    alpha: float,
    rng,
    rows: int = 1,
    dist: str = "normal",
    shape: float = 0.0,
) -> dict:
    d = draw(dist, delta, sigma, (reps, n_max), rng)
    a_row = alpha / rows  # the row's share (studies.sequential: Bonferroni over the compared rows)
    lo, hi = intervals(rule, d, a_row, n0, n_max, shape)
    status, seeds = decide(lo, hi, n0 if rule != "fixed-n" else n_max, rope)
    better, worse, equivalent = (status == 1).mean(), (status == -1).mean(), (status == 2).mean()
    if delta == 0:
        false, power = better + worse, equivalent
    else:
        false, power = worse + (equivalent if delta >= rope else 0.0), better
    out = {"rule": rule}
    if shape:
        out["shape"] = shape
    return out | {
        "dist": dist,
        "delta": delta,
        "sigma": sigma,
        "false_resolution": round(float(false), 4),
        "power": round(float(power), 4),
        "mean_seeds": round(float(seeds.mean()), 2),
        "p95_seeds": int(np.percentile(seeds, 95, method="higher")),
        "better": round(float(better), 4),
        "worse": round(float(worse), 4),
        "equivalent": round(float(equivalent), 4),
        "unresolved_at_max": round(float((status == 0).mean()), 4),
        "alpha": alpha,
        "rows": rows,
        "reps": reps,
        "initial": n0,
        "max": n_max,
        "rope": rope,
        "mc_se": round(math.sqrt(a_row * (1 - a_row) / reps), 4),  # of a share equal to the row's alpha
    }


def family(
    effects: list[float], sigma: float, reps: int, n0: int, n_max: int, rope: float, alpha: float, rng
) -> dict:
    """M rows against one shared baseline (per-seed metrics N(effect, σ²/2), so each row's paired
    difference has sd σ and two rows' differences correlate 0.5), under the group-sequential rule with
    Bonferroni and with Holm's graph (Maurer & Bretz 2013): a row declared better or worse passes its level to
    the open rows, which are decided again at the larger level on the seeds they have (every row's max seeds
    here: an upper bound on what recycling can add, since a row that stopped early would need its seeds
    added back)."""
    m = len(effects)
    base = rng.normal(0.0, sigma / math.sqrt(2), size=(reps, 1, n_max))
    x = rng.normal(np.array(effects)[None, :, None], sigma / math.sqrt(2), size=(reps, m, n_max))
    d = x - base
    # each row's status at the levels alpha/m, alpha/(m-1), ..., alpha (k rows rejected -> level alpha/(m-k))
    status = np.stack(
        [
            np.stack(
                [
                    decide(*intervals("group-sequential", d[:, r], alpha / (m - k), n0, n_max), n0, rope)[0]
                    for r in range(m)
                ],
                axis=1,
            )  # fmt: skip
            for k in range(m)
        ]
    )  # (level k, reps, rows)
    bonf = status[0]
    rejected = np.zeros_like(bonf)  # the status a row was rejected with (better / worse), 0 while open
    for _ in range(m):  # Holm's graph: levels only grow, so rejections only grow; m passes reach the end
        k = (rejected != 0).sum(axis=1)
        at_level = status[np.minimum(k, m - 1), np.arange(reps)]
        rejected = np.where((rejected == 0) & (np.abs(at_level) == 1), at_level, rejected)
    recycled = np.where(rejected != 0, rejected, bonf)  # open rows keep their Bonferroni status
    null = np.array(effects) == 0
    out = {
        "family": f"{int((~null).sum())} real + {int(null.sum())} null",
        "effects": effects,
        "sigma": sigma,
    }
    for name, st in (("bonferroni", bonf), ("recycled", recycled)):
        false = (np.abs(st[:, null]) == 1).any(axis=1) | ((st[:, ~null] == -1).any(axis=1))
        out[f"{name}_fwer"] = round(float(false.mean()), 4)
        if (~null).any():
            out[f"{name}_power"] = round(float((st[:, ~null] == 1).mean()), 4)  # per real row
    return out | {"alpha": alpha, "rows": m, "reps": reps, "initial": n0, "max": n_max,
                  "mc_se": round(math.sqrt(alpha * (1 - alpha) / reps), 4)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=100_000)
    p.add_argument("--initial", type=int, default=3)
    p.add_argument("--max", type=int, default=10)
    p.add_argument("--rope", type=float, default=0.5)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deltas", type=float, nargs="+", default=[0, 0.25, 0.5, 1, 2])
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.4, 0.8, 1.5])
    p.add_argument("--rows", type=int, default=1, help="compared rows sharing alpha (Bonferroni)")
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    p.add_argument("--dists", nargs="+", default=list(DISTS), choices=DISTS)
    p.add_argument("--dist-deltas", type=float, nargs="+", default=[0, 1], help="Δ of the non-normal cells")
    p.add_argument("--shapes", action="store_true", help="also the boundary shapes Δ_WT 0.25 and 0.5")
    p.add_argument("--family", action="store_true", help="family-wise lines: Bonferroni vs recycling")
    a = p.parse_args(argv)
    if not 2 <= a.initial <= a.max:
        p.error("need 2 <= --initial <= --max")
    rng = np.random.default_rng(a.seed)
    start, bad = time.time(), []
    cells = [(rule, 0.0) for rule in a.rules] + [("group-sequential", s) for s in (0.25, 0.5) if a.shapes]
    for dist in a.dists:
        for rule, shape in cells:
            for delta in a.deltas if dist == "normal" else a.dist_deltas:
                for sigma in a.sigmas:
                    r = simulate(rule, delta, sigma, a.reps, a.initial, a.max, a.rope, a.alpha, rng, a.rows,
                                 dist, shape)  # fmt: skip
                    print(json.dumps(r), flush=True)
                    limit = a.alpha / a.rows + 3 * r["mc_se"]
                    valid = rule in ("group-sequential", "confseq") and not shape and dist == "normal"
                    if valid and delta == 0 and r["false_resolution"] > limit:
                        bad.append(r)
    if a.family and a.rows >= 2:
        m = a.rows
        families = [[0.0] * m, [1.0] + [0.0] * (m - 1), [1.0, 1.0] + [0.0] * (m - 2), [1.0] * m]
        for effects, sigma in [(f, 0.8) for f in families] + [([2.0] * m, 1.5)]:
            print(
                json.dumps(family(effects, sigma, a.reps, a.initial, a.max, a.rope, a.alpha, rng)), flush=True
            )
    print(f"[bench_sequential] {time.time() - start:.1f} s", file=sys.stderr)
    if bad:
        print(f"[bench_sequential] false_resolution above alpha: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
