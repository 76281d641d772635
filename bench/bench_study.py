"""Time to table: one study of study.yaml run cold (empty warm-up cache, fresh store) and then cached
(same cache, fresh store), under two settings in the same run: the new one and a baseline.

    python -m bench.bench_study ablation_tasks [--preset default] [--workers N] [--set KEY=VALUE ...]
        [--baseline-workers 1] [--baseline-set KEY=VALUE ...] [--only new|baseline] [--n-trials N]
        [--baseline-runs cold cached] [--keep DIR]

Each run is a real `python -m studies.run` with its own store and warm-up cache in a temporary folder;
the generated benchmark images (runs/data) are shared, so they are generated at most once.
Printed per setting and run: wall time, trials per minute, core utilisation (CPU time of the run's
processes / (wall x cores)), and the share of trial time spent in warm-up, train, learning-curve eval,
val eval and label updates (from each trial's stored timings); then new / baseline ratios, and each row's
paired difference new - baseline (same row, same seed): what the new settings do to the numbers.
Without --workers the new setting lets studies.run choose (one single-threaded trial per core on the CPU).
--baseline-runs cold skips the baseline's cached run (it repeats the cold run's trials less the warm-ups).
--keep DIR copies each run's store to DIR/<setting>-<run>.db (a report: python -m reports NAME --storage).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.environment import cpu_model

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("warmup", "initial_labels", "train", "curve", "eval", "label_update", "gallery")


def run_once(
    name: str, preset: str, workers: int | None, sets: list[str], folder: Path, n_trials: int | None
) -> dict:
    db = folder / f"store-{time.time_ns()}.db"
    cmd = [sys.executable, "-m", "studies.run", name, "--preset", preset]
    cmd += ["--workers", str(workers)] if workers else []
    cmd += ["--storage", f"sqlite:///{db}", "--no-report", "--artifacts", str(folder / "artifacts")]
    cmd += (["--n-trials", str(n_trials)] if n_trials else []) + (["--set", *sets] if sets else [])
    env = {**os.environ, "AUXSEG_RUNS": str(folder / "runs"), "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    from studies.records import Status
    from studies.store import Store

    trials = Store(f"sqlite:///{db}").trials(name, Status.COMPLETE)
    phases = {k: 0.0 for k in PHASES}
    for t in trials:
        for k, v in ((t.result or {}).get("timings") or {}).items():
            if k in phases:
                phases[k] += v
    total = sum(t.seconds or 0.0 for t in trials)
    return {
        "wall": wall,
        "trials": len(trials),
        "per_min": 60 * len(trials) / wall,
        "util": cpu / (wall * (os.cpu_count() or 1)),
        "share": {k: v / total if total else 0.0 for k, v in phases.items()},
        "metric": {t.key: t.final_miou for t in trials},
        "db": db,
    }


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_study", description=__doc__.split("\n")[0])
    ap.add_argument("name")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--workers", type=int, default=None, help="default: studies.run's choice")
    ap.add_argument("--set", dest="sets", nargs="*", default=[])
    ap.add_argument("--baseline-workers", type=int, default=1)
    ap.add_argument("--baseline-set", nargs="*", default=[])
    ap.add_argument("--only", choices=("new", "baseline"), default=None)
    ap.add_argument("--n-trials", type=int, default=None, help="cap the trials (a quick look)")
    ap.add_argument("--baseline-runs", nargs="+", choices=("cold", "cached"), default=["cold", "cached"])
    ap.add_argument("--keep", type=Path, default=None, help="copy each run's store into this folder")
    a = ap.parse_args()
    if a.keep:
        a.keep.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}")
    settings = {"new": (a.workers, a.sets), "baseline": (a.baseline_workers, a.baseline_set)}
    if a.only:
        settings = {a.only: settings[a.only]}
    rows = {}
    for label, (workers, sets) in settings.items():
        with tempfile.TemporaryDirectory(prefix=f"bench-study-{label}-") as tmp:
            # The generated benchmark is shared (runs/data): cold means no warm-up cache and no store.
            (Path(tmp) / "runs").mkdir()
            (ROOT / "runs" / "data").mkdir(parents=True, exist_ok=True)
            (Path(tmp) / "runs" / "data").symlink_to(ROOT / "runs" / "data")
            for run in ("cold", "cached"):
                if label == "baseline" and run not in a.baseline_runs:
                    continue
                r = run_once(a.name, a.preset, workers, sets, Path(tmp), a.n_trials)
                rows[(label, run)] = r
                if a.keep:
                    shutil.copyfile(r["db"], a.keep / f"{label}-{run}.db")
                share = "  ".join(f"{k} {100 * v:4.1f}%" for k, v in r["share"].items() if v)
                print(
                    f"{label:<8} {run:<6} workers {workers or 'auto'} set [{' '.join(sets)}]: "
                    f"wall {r['wall'] / 60:5.1f} min, {r['trials']} trials, {r['per_min']:.2f} trials/min, "
                    f"cores {100 * r['util']:.0f}% | {share}",
                    flush=True,
                )
    from reports.paired import delta_cell, paired_delta
    from studies.spec import load_spec

    study = load_spec(ROOT / "study.yaml").study(a.name)
    if study.kind.is_grid:  # the table's conclusions under each setting: paired delta per row
        for label in settings:
            m = (rows.get((label, "cached")) or rows[(label, "cold")])["metric"]
            base = {k[2]: v for k, v in m.items() if k[0] == study.baseline}
            print(f"{label}: paired delta vs {study.baseline} (percent points, 95% CI):")
            for r in study.rows:
                vals = {k[2]: v for k, v in m.items() if k[0] == r.label}
                seeds = " / ".join(f"{100 * vals[k]:.1f}" for k in sorted(vals))
                print(f"  {r.label:<34} {delta_cell(paired_delta(vals, base)):<22} seeds {seeds}")
    if len(settings) == 2:
        new_m = (rows.get(("new", "cached")) or rows[("new", "cold")])["metric"]
        old_m = (rows.get(("baseline", "cached")) or rows[("baseline", "cold")])["metric"]
        print("new - baseline, same row and seed (percent points, 95% CI):")
        for r in study.rows:
            pick = lambda m, lab=r.label: {k[2]: v for k, v in m.items() if k[0] == lab}  # noqa: E731
            print(f"  {r.label:<34} {delta_cell(paired_delta(pick(new_m), pick(old_m)))}")
        print(f"  {'all rows, pairs (row, seed)':<34} {delta_cell(paired_delta(new_m, old_m))}")
        for run in ("cold", "cached"):
            if ("baseline", run) not in rows or ("new", run) not in rows:
                continue
            n, b = rows[("new", run)], rows[("baseline", run)]
            ratio = n["per_min"] / b["per_min"]
            print(f"{run}: new / baseline wall {n['wall'] / b['wall']:.2f}x, trials/min {ratio:.2f}x")
        print(
            json.dumps(
                {
                    f"{k[0]}-{k[1]}": {kk: vv for kk, vv in v.items() if kk not in ("metric", "db")}
                    for k, v in rows.items()
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
