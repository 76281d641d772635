"""bench.bench_variance: its val draws extend the benchmark's own val split, its analysis recovers known
variance components, and one of its jobs evaluates the trial's own final network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.bench_variance import components, data_root, decompose, main, run_job
from core.data import VOCDataset, ensure_generated

ROOT = Path(__file__).resolve().parents[1]


def test_components_recover_a_known_design():
    rng = np.random.default_rng(0)
    s, k = 1000, 200
    seed, draw, inter = 1.0, 0.25, 0.5  # variances
    d = (
        rng.normal(0, seed**0.5, (s, 1))
        + rng.normal(0, draw**0.5, (1, k))
        + rng.normal(0, inter**0.5, (s, k))
        + 2.0
    )
    c = components(d)
    assert c["seed"] == pytest.approx(seed, rel=0.08)
    assert c["eval"] == pytest.approx(inter, rel=0.05)
    assert c["eval_shared"] == pytest.approx(draw, rel=0.3)


def test_decompose_splits_the_cam_network_from_training():
    rng = np.random.default_rng(1)
    seeds, draws, w = list(range(60)), 4, 0
    recs = []
    for s in seeds:
        cam = rng.normal(0, 2.0)  # moves the row only when the warm-up is the seed's own
        train = rng.normal(0, 1.0)
        for mode in ("per-seed", "shared"):
            if mode == "shared" and s == w:
                continue
            gain = 1.0 + train + (cam if mode == "per-seed" and s != w else 0.0)
            base = 40 + rng.normal(0, 0.01, draws)
            noise = rng.normal(0, 0.3, draws)
            recs.append({"mode": mode, "seed": s, "row": "seg", "miou": list(base / 100)})
            recs.append({"mode": mode, "seed": s, "row": "full", "miou": list((base + gain + noise) / 100)})
    e = decompose(recs, "seg", "full", seeds, w)
    p = e["point"]
    assert p["training"] == pytest.approx(1.0, rel=0.4)
    assert p["cam"] == pytest.approx(4.0, rel=0.4)
    assert p["eval"] == pytest.approx(0.09, rel=0.3)
    assert p["sd_shared"] < p["sd_per_seed"]
    assert e["ci90"]["cam"][0] > 0
    assert e["per_seed"][w] == e["shared"][w]  # trial seed W is one computation in both modes


@pytest.mark.slow
def test_val_draw_0_is_the_benchmark_val_split_and_a_job_evaluates_the_final_network(runs):
    root = data_root("smoke", 0, 2)
    std = ensure_generated(runs / "data" / "synthetic-smoke-seed0", preset="smoke", seed=0)
    assert std["splits"]["val"]["images"] == 40
    own = VOCDataset(runs / "data" / "synthetic-smoke-seed0", "val")
    d0, d1 = VOCDataset(root, "val_d0"), VOCDataset(root, "val_d1")
    assert d0.names == own.names and len(d1) == 40 and not set(d1.names) & set(d0.names)
    for i in (0, 39):
        assert np.array_equal(d0.image(i), own.image(i)) and np.array_equal(d0.mask(i), own.mask(i))
    assert (root / "JPEGImages" / "train_00159.jpg").read_bytes() == (
        runs / "data" / "synthetic-smoke-seed0" / "JPEGImages" / "train_00159.jpg"
    ).read_bytes()
    tiny = {"train.warmup_epochs": 1, "train.stage_epochs": 1, "train.stages": 1, "eval.post": False}
    job = {"mode": "shared", "seed": 1, "row": "seg", "preset": "smoke", "root": str(root), "draws": 2,
           "warmup_seed": 0, "set": {**tiny, "train.threads": 1}}  # fmt: skip
    rec = run_job(job)  # raises unless val draw 0, re-evaluated, equals the trial's final mIoU
    assert rec["mode"] == "shared" and len(rec["miou"]) == 2 and rec["threads"] == 1
    assert all(0 <= m <= 1 for m in rec["miou"])


def test_bad_input_is_a_one_line_error_and_a_file_of_other_draws_is_not_resumed(tmp_path):
    with pytest.raises(SystemExit, match="--n-val: expected a positive image count, got 0"):
        main(["--n-val", "0", "--analyse"])
    with pytest.raises(SystemExit, match="--preset: expected one of"):
        main(["--preset", "tiny", "--analyse"])
    out = tmp_path / "v.jsonl"
    rec = {"mode": "per-seed", "seed": 0, "row": "seg", "miou": [0.3, 0.31], "n_val": 150}
    out.write_text(json.dumps(rec) + "\n")
    args = ["--study-yaml", str(ROOT / "study.yaml"), "--out", str(out), "--n-val", "150", "--analyse"]
    with pytest.raises(SystemExit, match="holds networks evaluated on 2 draws of 150 images, not 4 of 150"):
        main(args)
    assert out.read_text() == json.dumps(rec) + "\n"  # refused, not rewritten
