"""How the adaptive seed rule behaves when the truth is known: paired differences simulated per cell.

    python -m bench.bench_sequential [--reps 100000] [--initial 3] [--max 10] [--rope 0.5] [--alpha 0.05]
                                     [--seed 0] [--deltas 0 0.25 0.5 1 2] [--sigmas 0.4 0.8 1.5] [--rows 1]

One JSON line per (rule, true Δ, paired sd σ) cell, in percent points, for one row against its baseline
(--rows M: the row's share alpha/M of a study comparing M rows, Bonferroni as the study does; default 1, the
whole alpha): each repetition draws max paired differences d ~ N(Δ, σ²) and
applies the rule after the initial seeds and after each added seed, stopping at the first decision.
  - rule "t-mixture": studies.sequential (the study's rule: the confidence sequence, its c for this design);
  - rule "naive": the same stopping rule on the Student-t 95% interval (reports.paired's interval,
    mean ± t(1−alpha/2, n−1)·sd/√n), recomputed after each seed as a user who adds seeds and looks again.
Fields: false_resolution = share of runs whose decision contradicts the truth (Δ = 0: better or worse;
Δ > 0: worse, or equivalent when Δ >= rope); power = share decided correctly (Δ = 0: equivalent; Δ > 0:
better); mean_seeds and p95_seeds = seeds the row used; the shares of each status; mc_se = the Monte-Carlo
standard error of a share equal to the row's alpha. Exit status 1 when the t-mixture rule's false_resolution
at Δ = 0 exceeds the row's alpha by more than 3 Monte-Carlo standard errors.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
from scipy import stats as sps

from studies.sequential import classify, mixture_precision, t_mixture_interval


def student_t_interval(d: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """reports.paired.paired_delta's interval after each of the first 1..n differences, vectorised over the
    leading axes: mean ± t(1 − alpha/2, n − 1) · sd(ddof=1) / √n (NaN-free: ±inf at n = 1)."""
    t = np.arange(1, d.shape[-1] + 1, dtype=float)
    mean = np.cumsum(d, axis=-1) / t
    ss = np.maximum(np.cumsum(d * d, axis=-1) - t * mean**2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        half = sps.t.ppf(1 - alpha / 2, np.maximum(t - 1, 1)) * np.sqrt(ss / np.maximum(t - 1, 1) / t)
    half = np.where(t < 2, np.inf, half)
    return mean - half, mean + half


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
) -> dict:
    d = rng.normal(delta, sigma, size=(reps, n_max))
    alpha = alpha / rows  # the row's share (studies.sequential: Bonferroni over the compared rows)
    if rule == "t-mixture":
        _, lo, hi = t_mixture_interval(d, alpha, mixture_precision(alpha, n0, n_max))
    else:
        lo, hi = student_t_interval(d, alpha)
    codes = classify(lo, hi, rope)[:, n0 - 1 :]  # looks after the initial seeds, then after each added one
    decided = codes != 0
    first = np.where(decided.any(axis=1), decided.argmax(axis=1), codes.shape[1] - 1)
    status = np.where(decided.any(axis=1), codes[np.arange(reps), first], 0)
    seeds = first + n0
    better, worse, equivalent = (status == 1).mean(), (status == -1).mean(), (status == 2).mean()
    if delta == 0:
        false, power = better + worse, equivalent
    else:
        false, power = worse + (equivalent if delta >= rope else 0.0), better
    return {
        "rule": rule,
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
        "reps": reps,
        "initial": n0,
        "max": n_max,
        "rope": rope,
        "alpha": alpha * rows,
        "rows": rows,
        "mc_se": round(math.sqrt(alpha * (1 - alpha) / reps), 4),  # of a share equal to the row's alpha
    }


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
    a = p.parse_args(argv)
    if not 2 <= a.initial <= a.max:
        p.error("need 2 <= --initial <= --max")
    rng = np.random.default_rng(a.seed)
    start, bad = time.time(), []
    for rule in ("t-mixture", "naive"):
        for delta in a.deltas:
            for sigma in a.sigmas:
                r = simulate(rule, delta, sigma, a.reps, a.initial, a.max, a.rope, a.alpha, rng, a.rows)
                print(json.dumps(r), flush=True)
                limit = a.alpha / a.rows + 3 * r["mc_se"]
                if rule == "t-mixture" and delta == 0 and r["false_resolution"] > limit:
                    bad.append(r)
    print(f"[bench_sequential] {time.time() - start:.1f} s", file=sys.stderr)
    if bad:
        print(f"[bench_sequential] false_resolution above alpha: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
