"""Does the embedded benchmark behave like WSSS? The three checks of the pipeline issue, measured.

    python -m bench.bench_signature [--preset default] [--seeds 0 1 2] [--set key=value ...]

1. initial pseudo labels: precision clearly above recall (CAMs under-activate);
2. pseudo-label recall and mIoU improve from the initial labels to stage 1 (affinity-refined CAMs);
3. the full model (all branches, cross_task, both constraints) beats the seg-only baseline on val
   mIoU averaged over the seeds.
Prints every trial's numbers and PASS / FAIL per check; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from core.config import ConfigError, make_config
from core.records import Status
from core.trial import run_trial

SEG_ONLY = ["model.branches=seg", "model.affinity=none", "model.constraints=[]"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for both models (e.g. to try a schedule before changing the preset)",
    )
    args = ap.parse_args()
    try:  # a bad --set is one line, before any trial spends minutes
        for extra in ([], SEG_ONLY):
            make_config(args.preset, [*args.overrides, *extra])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pct = lambda v: f"{100 * v:5.1f}"  # noqa: E731
    full, base = [], []
    for seed in args.seeds:
        for label, extra, out in (("full", [], full), ("seg-only", SEG_ONLY, base)):
            res = run_trial(
                make_config(args.preset, [*args.overrides, f"seed={seed}", "eval.post=false", *extra])
            )
            if res.status != Status.COMPLETE:
                print(f"seed {seed} {label}: {res.status}: {res.error}")
                return 1
            out.append(res)
            p0 = res.initial_pgt
            stages = " ".join(
                f"s{st['stage']}: val {pct(st['val']['miou'])} pgt P/R/mIoU {pct(st['pgt']['precision'])}/"
                f"{pct(st['pgt']['recall'])}/{pct(st['pgt']['miou'])}"
                for st in res.stages
            )
            print(
                f"seed {seed} {label:<8} initial P/R/mIoU "
                f"{pct(p0['precision'])}/{pct(p0['recall'])}/{pct(p0['miou'])} "
                f"| {stages} | {res.seconds:.0f}s (warm-up cached: {res.warmup['cached']})",
                flush=True,
            )

    ok = True
    prec = [r.initial_pgt["precision"] for r in full]
    rec = [r.initial_pgt["recall"] for r in full]
    c1 = all(p > r + 0.05 for p, r in zip(prec, rec))
    print(
        f"\n1. initial precision {pct(statistics.mean(prec))} vs recall {pct(statistics.mean(rec))}: "
        f"{'PASS' if c1 else 'FAIL'}"
    )
    ok &= c1
    if all(len(r.stages) > 1 for r in full):
        d_rec = [r.stages[1]["pgt"]["recall"] - r.initial_pgt["recall"] for r in full]
        d_miou = [r.stages[1]["pgt"]["miou"] - r.initial_pgt["miou"] for r in full]
        c2 = statistics.mean(d_rec) > 0 and statistics.mean(d_miou) > 0
        print(
            f"2. stage-1 labels vs initial: recall {100 * statistics.mean(d_rec):+.1f}, "
            f"mIoU {100 * statistics.mean(d_miou):+.1f}: {'PASS' if c2 else 'FAIL'}"
        )
        ok &= c2
    else:
        print("2. needs train.stages >= 2: skipped")
    m_full = statistics.mean(r.final["miou"] for r in full)
    m_base = statistics.mean(r.final["miou"] for r in base)
    c3 = m_full > m_base
    print(
        f"3. val mIoU full {pct(m_full)} vs seg-only {pct(m_base)} ({100 * (m_full - m_base):+.1f}) over "
        f"{len(args.seeds)} seeds: {'PASS' if c3 else 'FAIL'}"
    )
    ok &= c3
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
