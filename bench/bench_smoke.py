"""Does the smoke preset learn on every draw? Final val mIoU per seed x CPU path x thread count.

    python -m bench.bench_smoke [--seeds 0 1 ... 9] [--paths fp32 bf16 avx2-fp32 onednn-avx2 mkl-avx2]
        [--threads 1 2] [--jobs N] [--set KEY=VALUE ...]

The test suite's learning test (tests/test_trial.py) trains the smoke preset once and asserts a margin
over the all-background prediction; this measures how much margin every draw has. A CPU path is what
changes the floats of a trial between machines (all but bf16 with train.cpu_amp=off, the preset's precision):
    fp32         the kernels this CPU picks
    bf16         train.cpu_amp=on; skipped where the CPU has no native bf16 (AVX512-BF16 or AMX)
    avx2-fp32    ATEN_CPU_CAPABILITY=avx2: ATen's own kernels of a CPU without AVX512
    onednn-avx2  and ONEDNN_MAX_CPU_ISA=AVX2: oneDNN's convolutions capped too, the nearest a Xeon comes to
                 an AMD EPYC without AVX512 (no emulation reproduces one: README "Test suite")
    mkl-avx2     and MKL_ENABLE_INSTRUCTIONS=AVX2: MKL's matrix products capped too (not in the default set)
Each trial runs in its own process (`python -m core.trial`), `--jobs` of them at once (default: one per
core at 1 thread, one at a time at 2 threads), with eval.post off (the final mIoU does not use it).

Prints one line per trial, then the table of final val mIoU (%) per seed, the all-background floor, each
column's minimum, median and trial time, and checks the target: every trial >= floor + 5 points and
every column's median >= floor + 8. Exits 1 when a trial misses it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.bench_seeds import run_one
from core.config import ConfigError, make_config
from core.data import VOCDataset
from core.environment import cpu_model, kernel_caps
from core.metrics import all_background_miou
from core.records import Status
from core.train import cpu_bf16_supported

PATHS = {
    "fp32": (["train.cpu_amp=off"], {}),
    "bf16": (["train.cpu_amp=on"], {}),
    "avx2-fp32": (["train.cpu_amp=off"], {"ATEN_CPU_CAPABILITY": "avx2"}),
}
PATHS["onednn-avx2"] = (["train.cpu_amp=off"], {**PATHS["avx2-fp32"][1], "ONEDNN_MAX_CPU_ISA": "AVX2"})
PATHS["mkl-avx2"] = (["train.cpu_amp=off"], {**PATHS["onednn-avx2"][1], "MKL_ENABLE_INSTRUCTIONS": "AVX2"})
MIN_MARGIN, MEDIAN_MARGIN = 0.05, 0.08  # issue #27's target, in mIoU fractions


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_smoke", description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument(
        "--paths", nargs="+", choices=list(PATHS), default=["fp32", "bf16", "avx2-fp32", "onednn-avx2"]
    )
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--jobs", type=int, default=0, help="trials at once (0: cores // threads)")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()
    paths = [p for p in a.paths if p != "bf16" or cpu_bf16_supported()]
    if len(paths) < len(a.paths):
        print("bf16: skipped, this CPU has no native bf16 (AVX512-BF16 or AMX)")
    common = [*a.overrides, "eval.post=false", "eval.gallery_images=0"]
    try:
        cfg = make_config("smoke", common)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    columns = [(p, t) for p in paths for t in a.threads]
    jobs = [(seed, p, t) for seed in a.seeds for p, t in columns]
    cores = os.cpu_count() or 1
    values: dict[tuple[str, int], dict[int, float]] = {c: {} for c in columns}
    seconds: dict[tuple[str, int], list[float]] = {c: [] for c in columns}
    roots: set[str] = set()
    print(f"smoke preset, {len(jobs)} trials, overrides {' '.join(a.overrides) or '(none)'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:

        def one(job):
            seed, path, threads = job
            ov, env = PATHS[path]
            t0 = time.time()
            out = Path(tmp) / f"{path}-{threads}-{seed}"
            r = run_one("smoke", [*common, *ov, f"train.threads={threads}", f"seed={seed}"], env, out)
            return job, r, time.time() - t0

        for threads in sorted(set(a.threads)):  # one thread count at a time, so trials never share a core
            batch = [j for j in jobs if j[2] == threads]
            n = a.jobs or max(1, cores // threads)
            with ThreadPoolExecutor(n) as pool:
                for (seed, path, th), r, dt in pool.map(one, batch):
                    if r["status"] != Status.COMPLETE:
                        print(f"seed {seed} {path} {th} threads: {r['status']}: {r['error']}")
                        return 1
                    e, caps = r["environment"], kernel_caps({**os.environ, **PATHS[path][1]})
                    if (
                        (e["precision"], e["cpu_capability"]) == ("bf16", "AVX2")
                        or ("ATEN_CPU_CAPABILITY" in PATHS[path][1] and e["cpu_capability"] != "AVX2")
                        or e["kernel_caps"] != caps
                    ):
                        print(
                            f"seed {seed} {path}: ran {e['precision']} on {e['cpu_capability']} "
                            f"with caps '{e['kernel_caps']}', expected '{caps}'",
                            file=sys.stderr,
                        )
                        return 1
                    values[(path, th)][seed] = r["final"]["miou"]
                    seconds[(path, th)].append(dt)
                    roots.add(r["dataset"]["root"])
                    stages = " ".join(f"{100 * s['val']['miou']:.1f}" for s in r["stages"])
                    print(
                        f"seed {seed} {path:<11} {th} thr  final mIoU {100 * r['final']['miou']:5.1f}  "
                        f"stages {stages}  "
                        f"[{e['precision']}, {e['cpu_capability']}{', ' + caps if caps else ''}]  {dt:.0f} s",
                        flush=True,
                    )
    (root,) = roots  # every seed trains on the same generated data set
    val = VOCDataset(root, cfg.data.val_split)
    floor = all_background_miou([val.mask(i) for i in range(len(val))], val.num_classes)
    cpu = cpu_model()
    print(f"\nfinal val mIoU (%), smoke preset, {cpu}, {cores} cores; all-background {100 * floor:.1f}")
    print("| seed | " + " | ".join(f"{p}, {t} thr" for p, t in columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for seed in a.seeds:
        print(f"| {seed} | " + " | ".join(f"{100 * values[c][seed]:.1f}" for c in columns) + " |")
    for name, fn in (("min", min), ("median", statistics.median)):
        print(f"| {name} | " + " | ".join(f"{100 * fn(values[c].values()):.1f}" for c in columns) + " |")
    print("| s / trial | " + " | ".join(f"{statistics.fmean(seconds[c]):.0f}" for c in columns) + " |")
    every = np.array([v for c in columns for v in values[c].values()])
    medians = [statistics.median(values[c].values()) for c in columns]
    ok = every.min() >= floor + MIN_MARGIN and min(medians) >= floor + MEDIAN_MARGIN
    print(
        f"\nmin {100 * (every.min() - floor):+.1f} points over all-background "
        f"(target +{100 * MIN_MARGIN:.0f}), "
        f"lowest median {100 * (min(medians) - floor):+.1f} (target +{100 * MEDIAN_MARGIN:.0f}), "
        f"{int((every < floor + MIN_MARGIN).sum())}/{every.size} trials below the minimum: "
        + ("target met" if ok else "TARGET MISSED")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
