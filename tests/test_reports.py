"""reports/: tables and figures built from a store filled through the real Store API with known numbers."""

import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import optuna
import pytest

from reports import ReportError, build_report
from reports.__main__ import main
from studies.store import Store

ROOT = Path(__file__).resolve().parents[1]


def result(final, post=None, stages=None, init=(0.8, 0.4, 0.38)):
    """A result.json with the given final mIoU and stages [(val_miou, (p, r, m)), ...]."""
    stages = stages or [(final, init)]
    return {
        "status": "complete",
        "error": None,
        "config": {"seed": 0, "data": {"name": "synthetic", "root": "/data/synth", "preset": "smoke"}},
        "initial_pgt": dict(zip(("precision", "recall", "miou"), init)),
        "stages": [
            {
                "stage": s,
                "val": {"miou": v, "miou_post": None, "per_class_iou": [v, v]},
                "pgt": dict(zip(("precision", "recall", "miou"), p)),
                "seconds": 1.0,
            }
            for s, (v, p) in enumerate(stages)
        ],
        "final": {"miou": final, "miou_post": post},
        "warmup": {"cached": True, "seconds": 0.0},
        "seconds": 10.0,
        "timings": {},
        "dataset": {
            "root": "/data/synth",
            "n_train": 40,
            "n_val": 12,
            "num_classes": 5,
            "saliency": "spectral",
        },
    }


def add(store, study, number, row, seed, res=None, status="complete", variant=None, params=None):
    tid = store.begin_trial(
        study=study,
        number=number,
        row=row,
        variant=variant,
        seed=seed,
        params=params or {},
        config={"seed": seed},
        code_version="abc123",
    )
    for st in (res or {}).get("stages", []):
        store.record_stage(tid, st)
    if status != "running":
        store.finish_trial(
            tid, status, result=res, error="Traceback\nRuntimeError: boom" if status == "failed" else None
        )
    return tid


def table_row(md: str, first_cell: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in:\n{md}")


def pngs_ok(md: str, out: Path, n_min: int):
    links = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert len(links) >= n_min, md
    for f in links:
        assert (out / f).stat().st_size > 1000, f


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'studies.db'}"


@pytest.fixture(scope="module")
def store(url):
    s = Store(url)
    yield s
    s.close()


def test_ablation_table_checkmarks_paper_and_partial(store, url, tmp_path):
    rows = [
        {"label": "Baseline", "columns": {"Seg.": True, "Cls.": False, "Sal.": False}, "paper": 56.9},
        {"label": "w/ seg., cls.", "columns": {"Seg.": True, "Cls.": True}, "paper": 57.6},
        {"label": "w/ seg., sal.", "columns": {"Seg.": True, "Sal.": True}, "paper": 59.8},
        {"label": "w/ seg., cls., sal.", "columns": {"Seg.": True, "Cls.": True, "Sal.": True, "Aff.": "CT"}},
    ]
    spec = {
        "kind": "ablation",
        "description": "auxiliary tasks",
        "paper_table": 3,
        "metric": "final.miou",
        "seeds": [0, 1, 2],
        "baseline": "Baseline",
        "columns": ["Seg.", "Cls.", "Sal.", "Aff."],
        "rows": rows,
    }
    store.upsert_study("tasks", spec, "smoke")
    n = iter(range(100))
    for seed, v in enumerate([0.50, 0.52, 0.54]):
        add(store, "tasks", next(n), "Baseline", seed, result(v))
    for seed, v in enumerate([0.55, 0.56, 0.57]):
        add(store, "tasks", next(n), "w/ seg., cls.", seed, result(v))
    for seed, v in enumerate([0.60, 0.62]):  # partial: 2/3 seeds, third still running
        add(store, "tasks", next(n), "w/ seg., sal.", seed, result(v))
    add(store, "tasks", next(n), "w/ seg., sal.", 2, status="running")
    add(store, "tasks", next(n), "w/ seg., cls., sal.", 0, result(0.65))
    add(store, "tasks", next(n), "w/ seg., cls., sal.", 1, status="failed")

    md = build_report("tasks", url, tmp_path).read_text()
    assert table_row(md, "Config")[:8] == [
        "Config",
        "Seg.",
        "Cls.",
        "Sal.",
        "Aff.",
        "mIoU (%)",
        "n",
        "Δ vs Baseline",
    ]
    assert table_row(md, "Config")[-1] == "Paper (VOC val)"
    assert table_row(md, "Baseline") == ["Baseline", "✓", "", "", "", "52.0 ± 2.0", "3", "(baseline)", "56.9"]
    assert table_row(md, "w/ seg., cls.") == [
        "w/ seg., cls.",
        "✓",
        "✓",
        "",
        "",
        "56.0 ± 1.0",
        "3",
        "+4.0",
        "57.6",
    ]
    r = table_row(md, "w/ seg., sal.")
    assert r[5:] == ["61.0 ± 1.4", "2/3 (incomplete; 1 running)", "+9.0", "59.8"]
    r = table_row(md, "w/ seg., cls., sal.")
    assert r[1:5] == ["✓", "✓", "✓", "CT"] and r[5:] == [
        "65.0 ± –",
        "1/3 (incomplete; 1 failed)",
        "+13.0",
        "–",
    ]
    assert "not a result of this harness" in md
    # provenance
    assert "11 (9 complete / 1 failed / 0 pruned / 1 running)" in md and "abc123" in md
    assert "n_train=40, n_val=12" in md and "synthetic at /data/synth" in md
    assert f"python -m studies.run tasks --preset smoke --storage {url}" in md
    assert "RuntimeError: boom" in md  # failed trials listed
    assert "Pseudo-label quality" not in md  # single-stage trials: no Fig. 6 table
    pngs_ok(md, tmp_path, 1)


def test_stages_table_and_pseudo_label_quality(store, url, tmp_path):
    spec = {
        "kind": "ablation",
        "description": "stages",
        "paper_table": 5,
        "seeds": [0, 1],
        "stage_metric": "val.miou",
        "baseline": "AuxSegNet",
        "rows": [
            {"label": "AuxSegNet", "set": {"train.stages": 2}, "paper": {0: 64.1, 1: 65.6, 2: 66.0, 3: 66.1}}
        ],
    }
    store.upsert_study("stages", spec, "smoke")
    add(
        store,
        "stages",
        0,
        "AuxSegNet",
        0,
        result(
            0.62, stages=[(0.50, (0.80, 0.40, 0.38)), (0.56, (0.82, 0.48, 0.44)), (0.62, (0.84, 0.50, 0.46))]
        ),
    )
    add(
        store,
        "stages",
        1,
        "AuxSegNet",
        1,
        result(
            0.60, stages=[(0.52, (0.80, 0.40, 0.38)), (0.58, (0.84, 0.52, 0.46)), (0.60, (0.86, 0.54, 0.48))]
        ),
    )
    md = build_report("stages", url, tmp_path).read_text()
    assert table_row(md, "Config")[:4] == ["Config", "Stage 0", "Stage 1", "Stage 2"]
    assert table_row(md, "AuxSegNet") == ["AuxSegNet", "51.0 ± 1.4", "57.0 ± 1.4", "61.0 ± 1.4", "2"]
    assert table_row(md, "Paper (VOC val)") == ["Paper (VOC val)", "64.1", "65.6", "66.0", ""]
    rows = [r for r in md.splitlines() if r.startswith("| AuxSegNet |") and "stage" in r]
    assert [c.strip() for c in rows[0].split("|")[2:7]] == [
        "initial (stage 0)",
        "80.0 ± 0.0",
        "40.0 ± 0.0",
        "38.0 ± 0.0",
        "2",
    ]
    assert [c.strip() for c in rows[2].split("|")[2:7]] == [
        "stage 2",
        "85.0 ± 1.4",
        "52.0 ± 2.8",
        "47.0 ± 1.4",
        "2",
    ]
    assert "stages_stages.png" in md and "stages_metric.png" in md
    pngs_ok(md, tmp_path, 2)


def test_saliency_variants_table(store, url, tmp_path):
    rows = [
        {"label": "spectral", "paper": {"baseline": 53.0, "final_star": 63.7, "final": 66.5}},
        {"label": "ft", "set": {"data.saliency": "ft"}},
    ]
    spec = {
        "kind": "ablation",
        "paper_table": 6,
        "seeds": [0, 1],
        "rows": rows,
        "baseline": "spectral",
        "variants": [{"label": "baseline", "set": {}}, {"label": "full", "set": {}}],
        "paper_reference": [
            {"label": "PoolNet", "baseline": 55.7, "final_star": 65.7, "delta": 10.0, "final": 68.4}
        ],
    }
    store.upsert_study("saliency", spec, "smoke")
    n = iter(range(100))
    for row, base, full, post in [
        ("spectral", (0.40, 0.42), (0.50, 0.54), (0.55, 0.57)),
        ("ft", (0.45, 0.45), (0.52, 0.50), (0.60, 0.58)),
    ]:
        for seed in (0, 1):
            add(store, "saliency", next(n), row, seed, result(base[seed]), variant="baseline")
            add(store, "saliency", next(n), row, seed, result(full[seed], post[seed]), variant="full")
    md = build_report("saliency", url, tmp_path).read_text()
    assert table_row(md, "Config")[:6] == ["Config", "Baseline", "Final*", "Δ", "Final", "n (baseline/full)"]
    assert table_row(md, "spectral") == [
        "spectral",
        "41.0 ± 1.4",
        "52.0 ± 2.8",
        "+11.0",
        "56.0 ± 1.4",
        "2 / 2",
        "53.0 / 63.7 / 10.7 / 66.5",
    ]
    assert table_row(md, "ft")[1:] == [
        "45.0 ± 0.0",
        "51.0 ± 1.4",
        "+6.0",
        "59.0 ± 1.4",
        "2 / 2",
        "– / – / – / –",
    ]
    assert table_row(md, "Paper's configuration") == [
        "Paper's configuration",
        "Baseline",
        "Final*",
        "Δ",
        "Final",
    ]
    assert table_row(md, "PoolNet") == ["PoolNet", "55.7", "65.7", "10.0", "68.4"]
    pngs_ok(md, tmp_path, 1)


def _tuning(store, url, name, n_trials):
    spec = {
        "kind": "tuning",
        "metric": "final.miou",
        "direction": "maximize",
        "n_trials": n_trials,
        "params": {
            "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "loss.sal": {"type": "float", "low": 0.1, "high": 2.0},
        },
    }
    store.upsert_study(name, spec, "smoke")
    study = optuna.create_study(
        study_name=name,
        storage=store.optuna_storage(),
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )

    def objective(trial):
        p = {
            "train.lr": trial.suggest_float("train.lr", 1e-4, 1e-2, log=True),
            "loss.sal": trial.suggest_float("loss.sal", 0.1, 2.0),
        }
        v = 0.3 + 0.1 * p["loss.sal"] + trial.number * 1e-3
        add(store, name, trial.number, f"trial {trial.number}", 0, result(v), params=p)
        return v

    study.optimize(objective, n_trials=n_trials)
    return study


def test_tuning_top_k_importances_and_figures(store, url, tmp_path):
    study = _tuning(store, url, "tune", 6)
    md = build_report("tune", url, tmp_path).read_text()
    best = study.best_trial
    r = table_row(md, "1")
    assert r[1] == str(best.number) and r[2] == f"{100 * best.value:.1f}"
    header = table_row(md, "Rank")
    assert header[:3] == ["Rank", "Trial", "mIoU (%)"] and set(header[3:5]) == {"train.lr", "loss.sal"}
    assert [r[header.index(k)] for k in best.params] == [f"{v:.4g}" for v in best.params.values()]
    assert "Top 6 of 6 complete trials" in md
    assert table_row(md, "Parameter") == ["Parameter", "Importance"]
    assert {table_row(md, k)[0] for k in ("train.lr", "loss.sal")} == {"train.lr", "loss.sal"}
    assert "tune_history.png" in md and "tune_params.png" in md
    pngs_ok(md, tmp_path, 2)


def test_tuning_too_few_trials_for_importances(store, url, tmp_path):
    _tuning(store, url, "tune1", 1)
    md = build_report("tune1", url, tmp_path).read_text()
    assert "Parameter importances unavailable" in md and "Top 1 of 1" in md


def test_unknown_study_empty_store_and_cli(store, url, tmp_path):
    with pytest.raises(ReportError, match="unknown study 'nope'"):
        build_report("nope", url, tmp_path)
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    Store(empty).close()
    with pytest.raises(ReportError, match="holds no studies"):
        build_report("tasks", empty, tmp_path)
    with pytest.raises(ReportError, match="no results store"):
        build_report("tasks", f"sqlite:///{tmp_path / 'missing.db'}", tmp_path)
    assert not (tmp_path / "missing.db").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "reports", "nope", "--storage", empty, "--out", str(tmp_path)],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
    store.upsert_study("bare", {"kind": "ablation", "seeds": 2, "rows": [{"label": "a"}]}, "smoke")
    assert (
        main(["bare", "--storage", url, "--out", str(tmp_path / "o")]) == 0
    )  # no trials yet: still a report
    md = (tmp_path / "o" / "bare.md").read_text()
    assert table_row(md, "a")[1:3] == ["–", "0/2 (incomplete)"]
