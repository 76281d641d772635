"""Where does a Table 3 row's paired variance come from: evaluation sampling, the CAM network, or training?

    python -m bench.bench_variance [--preset default] [--seeds 0 1 2 3 4 5] [--draws 4] [--n-val N]
        [--warmup-seed 0] [--rows seg seg+sal "seg+cls+sal + CT affinity"] [--jobs 2]
        [--out runs/bench/variance.jsonl] [--set KEY=VALUE ...] [--analyse]

Rows are study.yaml's ablation_tasks rows with its settings (one stage, no post-processing, final.miou); the
first is the baseline every other row is paired against, seed by seed. Every (row, seed) trains twice:

- per-seed warm-up (train.warmup_seed empty): each trial seed trains its own classification warm-up, so the
  seed redraws the CAM network, the initial pseudo labels and the backbone start, as the harness did before;
- shared warm-up (train.warmup_seed=W): every seed starts from the one warm-up of seed W, as the released
  pipeline's one CAM network. Trial seed W is the same computation either way and is trained once.

Each trained network is evaluated on `--draws` disjoint val sets of `--n-val` images (default: the benchmark's
val size), each an independent draw of its distribution: val draw 0 is the benchmark's own val split, or its
first --n-val images (the first of a longer val split generated with the same seed), draws 1.. the images
after it. The paired differences d[seed, draw] of one row then split (two-way analysis of variance, seeds x
val draws) into

- evaluation, per seed: the seed-by-draw interaction, the part of the val sample's error that differs
  between networks; it adds to the paired variance a study sees on one val set;
- evaluation, shared: the part every seed shares on one val set (a bias of that val sample that no number
  of seeds averages away, so it widens no interval);
- seed: what the trial seed moves with the val set fixed; with per-seed warm-ups the CAM network plus
  training, with a shared warm-up training alone. Their difference is the CAM network's share.

Writes one JSON line per trained network to --out (a rerun skips the ones there, so a killed run resumes;
a file scored on other val draws is refused) and prints the table; `--analyse` prints it from --out without
training. Intervals are percentile bootstraps over seeds (2,000 resamples, fixed generator). Deterministic
for a given machine and thread count: every trial runs single-threaded, --jobs at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROWS = ["seg", "seg+sal", "seg+cls+sal + CT affinity"]
MODES = ("per-seed", "shared")


def data_root(preset: str, data_seed: int, draws: int, n_val: int | None = None) -> Path:
    """The benchmark with `draws` times n_val val images (default: the preset's val size), and split files
    val_d0.. of n_val images each."""
    from core.build import runs_dir
    from core.data.synthetic import PRESETS, generate

    n = n_val or PRESETS[preset]["n_val"]
    # named by both: the same total split another way (150 x 4, 300 x 2) must not reuse these split files
    root = runs_dir() / "data" / f"variance-{preset}-seed{data_seed}-val{n}x{draws}"
    if not (root / "summary.json").is_file():
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        generate(tmp, preset, data_seed, n_val=n * draws)
        names = (tmp / "ImageSets/Segmentation/val.txt").read_text().split()
        for k in range(draws):
            part = names[k * n : (k + 1) * n]
            (tmp / f"ImageSets/Segmentation/val_d{k}.txt").write_text("".join(f"{x}\n" for x in part))
        os.replace(tmp, root)
    return root


def row_overrides(study_yaml: str, rows: list[str]) -> tuple[dict, dict[str, dict]]:
    """(the study's set:, {row label: its set:}) from study.yaml's ablation_tasks."""
    from studies.spec import load_spec

    study = load_spec(study_yaml).study("ablation_tasks")
    by_label = {r.label: dict(r.overrides) for r in study.rows}
    missing = [r for r in rows if r not in by_label]
    if missing:
        raise SystemExit(f"--rows: {missing} not in ablation_tasks (rows: {list(by_label)})")
    return dict(study.overrides), {r: by_label[r] for r in rows}


def run_job(job: dict) -> dict:
    """Train one (row, seed, warm-up mode) network as the study would and evaluate it on every val draw."""
    import torch

    from core.build import build_net
    from core.checkpoint import LAST
    from core.config import make_config
    from core.data import VOCDataset
    from core.evaluate import evaluate
    from core.records import Status
    from core.train import autocast, resolve_device, to_device
    from core.trial import run_trial

    overrides = {
        **job["set"],
        "seed": job["seed"],
        "data.root": job["root"],
        "data.val_split": "val_d0",
        "train.warmup_seed": "" if job["mode"] == "per-seed" else str(job["warmup_seed"]),
        "train.keep_checkpoint": True,
        "eval.curve_images": 0,
        "eval.gallery_images": 0,
    }
    cfg = make_config(job["preset"], {"train.checkpoint_every": 10**6, **overrides})
    with tempfile.TemporaryDirectory(prefix="variance-") as tmp:
        t0 = time.time()
        res = run_trial(cfg, checkpoint_dir=tmp)
        if res.status != Status.COMPLETE:
            raise RuntimeError(f"{job['row']} seed {job['seed']} ({job['mode']}): {res.error}")
        device = resolve_device(cfg)
        net = build_net(cfg, res.dataset["num_classes"])
        net.load_state_dict(torch.load(Path(tmp) / LAST, weights_only=True)["net"])
        net = to_device(net, cfg, device)
        miou = []
        for k in range(job["draws"]):
            val = VOCDataset(job["root"], f"val_d{k}", num_classes=res.dataset["num_classes"])
            m = evaluate(net, val, cfg, device, False, None, lambda: autocast(cfg, device), desc=f"draw {k}")
            miou.append(m["miou"])
    assert res.final is not None
    if miou[0] != res.final["miou"]:  # the network evaluated is the trial's final one
        raise RuntimeError(f"re-evaluated val draw 0 gives {miou[0]}, the trial {res.final['miou']}")
    env = res.environment or {}
    return {
        "mode": job["mode"],
        "seed": job["seed"],
        "row": job["row"],
        "miou": miou,
        "n_val": len(val),  # images per draw
        "seconds": time.time() - t0,
        "warmup_cached": bool(res.warmup and res.warmup["cached"]),
        "warmup_seconds": res.warmup["seconds"] if res.warmup else None,
        "precision": env.get("precision"),
        "threads": env.get("threads"),
    }


def components(d: np.ndarray) -> dict[str, float]:
    """Variance components of the paired differences d (seeds x val draws), two-way ANOVA without replication
    (method-of-moments estimates, negative ones kept: clipping would bias the sums)."""
    s, k = d.shape
    grand = d.mean()
    ms_seed = k * d.mean(1).var(ddof=1)
    ms_draw = s * d.mean(0).var(ddof=1)
    resid = d - d.mean(1, keepdims=True) - d.mean(0, keepdims=True) + grand
    ms_res = float((resid**2).sum() / ((s - 1) * (k - 1)))
    return {"seed": (ms_seed - ms_res) / k, "eval": ms_res, "eval_shared": (ms_draw - ms_res) / s}


def decompose(records: list[dict], baseline: str, row: str, seeds: list[int], warmup_seed: int) -> dict:
    """The row's variance table entry (points^2 and points), with bootstrap intervals over seeds."""

    def table(mode: str) -> np.ndarray:
        got = {}
        for r in records:
            m = "per-seed" if r["seed"] == warmup_seed else r["mode"]  # trial seed W: one computation
            got.setdefault((m, r["row"], r["seed"]), r["miou"])
            if r["seed"] == warmup_seed:
                got.setdefault(("shared", r["row"], r["seed"]), r["miou"])
        return 100 * np.array(
            [np.subtract(got[(mode, row, s)], got[(mode, baseline, s)]) for s in seeds], dtype=float
        )

    per_seed, shared = table("per-seed"), table("shared")

    def parts(ps: np.ndarray, sh: np.ndarray) -> dict[str, float]:
        a, b = components(ps), components(sh)
        ev = (a["eval"] + b["eval"]) / 2
        total = ps[:, 0].var(ddof=1)
        return {
            "training": b["seed"],
            "cam": a["seed"] - b["seed"],
            "eval": ev,
            "eval_shared": (a["eval_shared"] + b["eval_shared"]) / 2,
            "total_one_draw": total,
            "sd_per_seed": float(np.sqrt(ps[:, 0].var(ddof=1))),
            "sd_shared": float(np.sqrt(sh[:, 0].var(ddof=1))),
            "sd_shared_all_draws": float(np.sqrt(sh.mean(1).var(ddof=1))),
            "sd_per_seed_all_draws": float(np.sqrt(ps.mean(1).var(ddof=1))),
        }

    point = parts(per_seed, shared)
    rng = np.random.default_rng(0)
    boot: dict[str, list[float]] = {k: [] for k in point}
    n = len(seeds)
    for _ in range(2000):
        idx = rng.integers(0, n, n)
        if len(set(idx.tolist())) < 2:
            continue
        for k, v in parts(per_seed[idx], shared[idx]).items():
            boot[k].append(v)
    ci = {k: (float(np.percentile(v, 5)), float(np.percentile(v, 95))) for k, v in boot.items()}
    return {
        "row": row,
        "mean_per_seed": float(per_seed[:, 0].mean()),
        "mean_shared": float(shared[:, 0].mean()),
        "point": point,
        "ci90": ci,
        "per_seed": per_seed.round(3).tolist(),
        "shared": shared.round(3).tolist(),
    }


def print_table(entries: list[dict], baseline: str, draws: int, n_val: int) -> None:
    def f(x: float) -> str:
        return f"{x:+.2f}" if x < 0 else f"{x:.2f}"

    print(
        f"\npaired variance of a row against {baseline} (points², final val mIoU on {n_val} images; "
        f"90% bootstrap interval over seeds)\n"
    )
    print(
        "| row vs " + baseline + " | total, one val set | training | CAM network | evaluation (per seed) "
        "| evaluation shared by seeds (bias) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for e in entries:
        p, c = e["point"], e["ci90"]

        def cell(k: str, share: bool = True) -> str:
            s = f" ({p[k] / p['total_one_draw']:.0%})" if share and p["total_one_draw"] > 0 else ""
            return f"{f(p[k])}{s} [{f(c[k][0])}, {f(c[k][1])}]"

        print(
            f"| {e['row']} | {f(p['total_one_draw'])} | {cell('training')} | {cell('cam')} | {cell('eval')} "
            f"| {cell('eval_shared', False)} |"
        )
    print(
        f"\npaired sd (points): one val set of {n_val} images / all {draws} draws ({draws * n_val} images)\n"
    )
    print(
        "| row vs "
        + baseline
        + " | mean Δ per-seed warm-up | mean Δ shared | per-seed warm-up | shared warm-up |"
    )
    print("| --- | --- | --- | --- | --- |")
    for e in entries:
        p = e["point"]
        print(
            f"| {e['row']} | {e['mean_per_seed']:+.2f} | {e['mean_shared']:+.2f} "
            f"| {p['sd_per_seed']:.2f} / {p['sd_per_seed_all_draws']:.2f} "
            f"| {p['sd_shared']:.2f} / {p['sd_shared_all_draws']:.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_variance", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument(
        "--rows", nargs="+", default=ROWS, help="ablation_tasks row labels; the first is the baseline"
    )
    ap.add_argument("--draws", type=int, default=4, help="independent val sets of --n-val images each")
    ap.add_argument(
        "--n-val", type=int, default=None, help="images per val draw (default: the preset's val size)"
    )
    ap.add_argument("--warmup-seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="single-threaded trials at once")
    ap.add_argument("--study-yaml", default="study.yaml")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help="JSON lines (default runs/bench/variance-PRESET.jsonl)")
    ap.add_argument("--analyse", action="store_true", help="print the table from --out; train nothing")
    ap.add_argument("--job", help=argparse.SUPPRESS)  # one trained network, in a child process
    a = ap.parse_args(argv)
    if a.job:
        print(json.dumps(run_job(json.loads(a.job))))
        return 0

    from core.build import runs_dir
    from core.config import parse_overrides
    from core.data.synthetic import PRESETS

    if a.draws < 2 or len(a.seeds) < 3 or len(a.rows) < 2:
        raise SystemExit("need --draws >= 2, >= 3 --seeds and >= 2 --rows (a baseline and a row)")
    if a.preset not in PRESETS:  # the benchmark's presets: a generated data set with val draws
        raise SystemExit(f"--preset: expected one of {sorted(PRESETS)}, got {a.preset!r}")
    if a.n_val is not None and a.n_val < 1:
        raise SystemExit(f"--n-val: expected a positive image count, got {a.n_val}")
    n_val = a.n_val or PRESETS[a.preset]["n_val"]
    study_set, rows = row_overrides(a.study_yaml, a.rows)
    extra = parse_overrides(a.set)
    out = Path(a.out) if a.out else runs_dir() / "bench" / f"variance-{a.preset}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    records = [json.loads(x) for x in out.read_text().splitlines() if x.strip()] if out.exists() else []
    other = {(len(r["miou"]), r.get("n_val", n_val)) for r in records} - {(a.draws, n_val)}
    if other:  # a resumed file must hold one measurement, not networks scored on other val draws
        (k, n), *_ = sorted(other)
        raise SystemExit(
            f"--out {out}: holds networks evaluated on {k} draws of {n} images, not {a.draws} of {n_val}"
        )
    done = {(r["mode"], r["seed"], r["row"]) for r in records}
    if not a.analyse:
        root = data_root(a.preset, a.data_seed, a.draws, n_val)
        jobs = []
        # Seed-major, two seeds interleaved: two workers train two different warm-ups at once, never one
        # waiting on the other's cache entry.
        for mode in MODES:
            seeds = [s for s in a.seeds if mode == "per-seed" or s != a.warmup_seed]
            for i in range(0, len(seeds), 2):
                for row in a.rows:
                    for s in seeds[i : i + 2]:
                        if (mode, s, row) not in done:
                            jobs.append(
                                {
                                    "mode": mode,
                                    "seed": s,
                                    "row": row,
                                    "preset": a.preset,
                                    "root": str(root),
                                    "draws": a.draws,
                                    "warmup_seed": a.warmup_seed,
                                    "set": {**study_set, **rows[row], **extra, "train.threads": 1},
                                }
                            )
        lock = threading.Lock()
        t0 = time.time()

        def child(job: dict) -> None:
            cmd = [sys.executable, "-m", "bench.bench_variance", "--job", json.dumps(job)]
            p = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if p.returncode != 0:
                raise RuntimeError(
                    f"{job['row']} seed {job['seed']} ({job['mode']}): {p.stderr.strip()[-500:]}"
                )
            rec = json.loads(p.stdout.strip().splitlines()[-1])
            with lock:
                with out.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                records.append(rec)
                print(
                    f"[{time.time() - t0:6.0f}s] {rec['mode']:8s} seed {rec['seed']} {rec['row']}: "
                    + " ".join(f"{100 * m:.2f}" for m in rec["miou"]),
                    file=sys.stderr,
                    flush=True,
                )

        print(f"{len(jobs)} networks to train ({len(done)} in {out}), {a.jobs} at once", file=sys.stderr)
        with ThreadPoolExecutor(a.jobs) as ex:
            for f in [ex.submit(child, j) for j in jobs]:
                f.result()
        print(f"trained in {time.time() - t0:.0f} s", file=sys.stderr)
    baseline = a.rows[0]
    entries = [decompose(records, baseline, r, a.seeds, a.warmup_seed) for r in a.rows[1:]]
    print_table(entries, baseline, a.draws, n_val)
    for e in entries:
        print(json.dumps(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
