"""How much does the seed move a trial's result, and what does a change do to that, paired by seed?

    python -m bench.bench_seeds [--preset default] [--seeds 0 1 2] [--jobs N]
        [--variant LABEL KEY=VALUE ...] ... [--env LABEL VAR=VALUE ...] [--set KEY=VALUE ...]

Runs the full model (all branches, cross-task affinity, both constraints) for one stage (--stages N: N
stages, the last one's val mIoU is the metric) without post-processing, over the seeds, once per
variant. The first variant is the baseline; with no --variant given the baselines are "scratch"
(model.init_weights="", the pre-pretraining setting) and "pretrained" (the preset as it is). Each trial
runs in its own process (`python -m core.trial`), so --env can change what a trial's process sees, e.g.
`--env avx2 ATEN_CPU_CAPABILITY=avx2` runs the preset with another CPU kernel level: the closest this
machine gets to running on another machine. `--jobs N` runs N trials at once (with `--set train.threads=1`,
one per core, as studies.run does).

Prints per seed the last stage's val mIoU of every variant, mean +- std per variant, and per variant the
paired differences to the baseline with a Student-t 95% interval.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from core.config import ConfigError, make_config
from core.records import Status
from reports.paired import delta_cell, paired_delta

FULL = ["model.branches=seg,cls,sal", "model.affinity=cross_task", "model.constraints=seg,sal"]


def run_one(preset: str, overrides: list[str], env: dict[str, str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "core.trial", "--preset", preset, "--set", *overrides, "--out", str(out)]
    p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=False)
    if p.returncode != 0 and not (out / "result.json").exists():
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads((out / "result.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_seeds", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar=("LABEL", "KEY=VALUE"),
        help="a labelled set of config overrides (repeatable; the first is the baseline)",
    )
    ap.add_argument(
        "--env",
        nargs="+",
        action="append",
        default=[],
        metavar=("LABEL", "VAR=VALUE"),
        help="a labelled variant that runs the preset with these environment variables",
    )
    ap.add_argument(
        "--stages",
        type=int,
        default=1,
        help="stages per trial; the metric is the last stage's val mIoU (default 1: stage 0)",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="overrides for every variant",
    )
    ap.add_argument("--jobs", type=int, default=1, help="trials at once (default 1)")
    a = ap.parse_args()
    variants: list[tuple[str, list[str], dict[str, str]]] = [(v[0], v[1:], {}) for v in a.variant]
    variants += [(e[0], [], dict(kv.split("=", 1) for kv in e[1:])) for e in a.env]
    if not variants:
        variants = [("scratch", ["model.init_weights="], {}), ("pretrained", [], {})]
    common = [*a.overrides, *FULL, f"train.stages={a.stages}", "eval.post=false"]
    try:  # a bad override is one line, before any trial spends minutes
        for _, ov, _ in variants:
            make_config(a.preset, [*common, *ov])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    values: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(a.jobs) as pool:

        def one(job):
            seed, (label, ov, env) = job
            t0 = time.time()
            r = run_one(a.preset, [*common, *ov, f"seed={seed}"], env, Path(tmp) / f"{label}-{seed}")
            return seed, label, r, time.time() - t0

        for seed, label, r, dt in pool.map(one, [(seed, v) for seed in a.seeds for v in variants]):
            if r["status"] != Status.COMPLETE:
                print(f"seed {seed} {label}: {r['status']}: {r['error']}")
                return 1
            v = r["stages"][-1]["val"]["miou"]
            values[label].append(v)
            e = r.get("environment") or {}
            print(
                f"seed {seed} {label:<12} stage-{a.stages - 1} val mIoU {100 * v:5.1f}  initial pgt P/R "
                f"{100 * r['initial_pgt']['precision']:.1f}/{100 * r['initial_pgt']['recall']:.1f}  "
                f"warm-up {'cached' if r['warmup']['cached'] else 'trained'} "
                f"{r['warmup']['seconds']:.0f}s  "
                f"trial {dt:.0f}s  [{e.get('cpu_capability')}, {e.get('precision')}, "
                f"{e.get('threads')} threads]",
                flush=True,
            )
    base = variants[0][0]
    print(f"\n{'variant':<12} {'mean':>6} +- {'std':<5}  per seed {a.seeds}  paired delta vs {base} [95% CI]")
    for label, vals in values.items():
        sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        delta = (
            "(baseline)"
            if label == base
            else delta_cell(paired_delta(dict(enumerate(vals)), dict(enumerate(values[base]))))
        )
        print(
            f"{label:<12} {100 * statistics.fmean(vals):6.1f} +- {100 * sd:<5.1f}  "
            f"{' '.join(f'{100 * v:.1f}' for v in vals)}  {delta}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
