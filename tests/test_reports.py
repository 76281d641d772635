"""reports/: tables and figures built from a store filled through the real Store API with known numbers."""

import os
import re
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import optuna
import pytest

from reports import ReportError, build_report, report_path, report_stem
from reports.__main__ import main
from studies.records import Status
from studies.store import DEFAULT_URL, Store
from tests.conftest import run_module


def result(final, post=None, stages=None, init=(0.8, 0.4, 0.38), iou=None, env=None, names=None):
    """A result.json with the given final mIoU and stages [(val_miou, (p, r, m)), ...]; iou = the last
    stage's per-class IoU (default [v, v]), env = result.environment, names = dataset.class_names."""
    stages = stages or [(final, init)]
    res = {
        "status": "complete",
        "error": None,
        "config": {"seed": 0, "data": {"name": "synthetic", "root": "/data/synth", "preset": "smoke"}},
        "initial_pgt": dict(zip(("precision", "recall", "miou"), init)),
        "stages": [
            {
                "stage": s,
                "val": {
                    "miou": v,
                    "miou_post": None,
                    "per_class_iou": iou if iou is not None and s == len(stages) - 1 else [v, v],
                },
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
    if env is not None:
        res["environment"] = env
    if names is not None:
        res["dataset"]["class_names"] = names
    return res


def add(store, study, number, row, seed, res=None, status="complete", variant=None, params=None):
    tid = store.begin_trial(
        study=study,
        optuna_number=number,
        row=row,
        variant=variant,
        seed=seed,
        params=params or {},
        config={"seed": seed},
        code_version="abc123",
    )
    for st in (res or {}).get("stages", []):
        store.record_stage(tid, st)
    if status != Status.RUNNING:
        store.finish_trial(
            tid,
            status,
            result=res,
            error="Traceback\nRuntimeError: boom" if status == Status.FAILED else None,
        )
    return tid


def table_rows(md: str, first_cell: str) -> list[list[str]]:
    """Every markdown table row whose first cell is first_cell, in order."""
    rows = []
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def table_row(md: str, first_cell: str) -> list[str]:
    rows = table_rows(md, first_cell)
    if not rows:
        raise AssertionError(f"no table row {first_cell!r} in:\n{md}")
    return rows[0]


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
        "Δ of means vs Baseline",
    ]
    assert table_row(md, "Config")[8:] == ["Δ paired (95% CI)", "seeds better", "Paper (VOC val)"]
    assert table_row(md, "Baseline") == [
        "Baseline",
        "✓",
        "",
        "",
        "",
        "52.0 ± 2.0",
        "3",
        "(baseline)",
        "(baseline)",
        "(baseline)",
        "56.9",
    ]
    assert table_row(md, "w/ seg., cls.") == [
        "w/ seg., cls.",
        "✓",
        "✓",
        "",
        "",
        "56.0 ± 1.0",
        "3",
        "+4.0",
        "+4.0 [+1.5, +6.5]",  # diffs 5, 4, 3: 4.0 ± t(0.975, 2) · 1.0 / √3 = 4.0 ± 2.48
        "3/3",
        "57.6",
    ]
    r = table_row(md, "w/ seg., sal.")
    assert r[5:] == [
        "61.0 ± 1.4",
        "2/3 (incomplete; 1 running)",
        "+9.0",
        "+10.0 [+10.0, +10.0]",
        "2/2",
        "59.8",
    ]
    r = table_row(md, "w/ seg., cls., sal.")
    assert r[1:5] == ["✓", "✓", "✓", "CT"] and r[5:] == [
        "65.0 ± –",
        "1/3 (incomplete; 1 failed, 1 not started)",
        "+13.0",
        "+15.0 (n = 1, no CI)",  # paired with seed 0 only: 65 − 50, where the means differ by 13
        "1/1",
        "–",
    ]
    # the per-seed table below the main one
    assert table_rows(md, "Config")[1] == ["Config", "seed 0", "seed 1", "seed 2"]
    assert table_rows(md, "Baseline")[1] == ["Baseline", "50.0", "52.0", "54.0"]
    assert table_rows(md, "w/ seg., sal.")[1] == ["w/ seg., sal.", "60.0", "62.0", "–"]
    assert "not a result of this harness" in md
    # partial: a trial still runs, one point failed, one never started
    assert md.splitlines()[0] == "# Study report: tasks (partial: 9/12 points complete, 1 running)"
    assert "- **Progress:** 9/12 points complete (1 running, 1 failed, 1 not started)" in md
    # provenance
    assert f"- **Store:** `{url}` (this report: `{report_stem('tasks', url)}.md`)" in md
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
    assert md.splitlines()[0] == "# Study report: stages"  # every point complete: not partial
    stem = report_stem("stages", url)
    assert f"{stem}_stages.png" in md and f"{stem}_metric.png" in md
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
    assert table_row(md, "Config")[:10] == [
        "Config",
        "Baseline",
        "Final*",
        "Δ of means",
        "Δ paired (95% CI)",
        "seeds better",
        "Final",
        "n (baseline/full)",
        "Final* Δ paired vs spectral (95% CI)",
        "seeds better vs spectral",
    ]
    # t(0.975, 1) = 12.71: two seeds give wide intervals, e.g. diffs 10, 12 -> 11.0 ± 12.71 · 1.41 / √2
    assert table_row(md, "spectral") == [
        "spectral",
        "41.0 ± 1.4",
        "52.0 ± 2.8",
        "+11.0",
        "+11.0 [-1.7, +23.7]",
        "2/2",
        "56.0 ± 1.4",
        "2 / 2",
        "(baseline)",
        "(baseline)",
        "53.0 / 63.7 / 10.7 / 66.5",
    ]
    assert table_row(md, "ft")[1:] == [
        "45.0 ± 0.0",
        "51.0 ± 1.4",
        "+6.0",
        "+6.0 [-6.7, +18.7]",
        "2/2",
        "59.0 ± 1.4",
        "2 / 2",
        "-1.0 [-39.1, +37.1]",  # Final* vs spectral's Final*, same seed: 52 − 50, 50 − 54
        "1/2",
        "– / – / – / –",
    ]
    assert table_rows(md, "Config")[1] == ["Config", "Variant", "seed 0", "seed 1"]
    assert table_rows(md, "ft")[1:3] == [["ft", "baseline", "45.0", "45.0"], ["ft", "full", "52.0", "50.0"]]
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
    assert md.splitlines()[0] == "# Study report: tune"  # 6 of n_trials 6: not partial
    assert "- **Progress:** 6/6 trials complete" in md
    stem = report_stem("tune", url)
    assert f"{stem}_history.png" in md and f"{stem}_params.png" in md
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
    proc = run_module("reports", ["nope", "--storage", empty, "--out", str(tmp_path)], timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
    store.upsert_study("bare", {"kind": "ablation", "seeds": [0, 1], "rows": [{"label": "a"}]}, "smoke")
    assert (
        main(["bare", "--storage", url, "--out", str(tmp_path / "o")]) == 0
    )  # no trials yet: still a report
    md = report_path("bare", url, tmp_path / "o").read_text()
    assert table_row(md, "a")[1:3] == ["–", "0/2 (incomplete; 2 not started)"]
    assert md.splitlines()[0] == "# Study report: bare (partial: 0/2 points complete)"


@pytest.mark.parametrize("storage", ["notaurl", "foo://x"])
def test_cli_bad_storage_url_is_one_line(storage, tmp_path, capsys):
    assert main(["tasks", "--storage", storage, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "malformed store URL" in err if storage == "notaurl" else "unknown database kind" in err


def test_interrupted_trials_listed_never_complete(store, url, tmp_path):
    store.upsert_study("crash", {"kind": "ablation", "seeds": [0, 1], "rows": [{"label": "a"}]}, "smoke")
    add(store, "crash", 0, "a", 0, result(0.5))
    tid = add(store, "crash", 1, "a", 1, status="running")
    assert store.mark_stale_running("crash") == [tid]  # its process died: status interrupted
    md = build_report("crash", url, tmp_path).read_text()
    assert "2 (1 complete / 0 failed / 0 pruned / 0 running / 1 interrupted)" in md
    assert table_row(md, "a")[1:3] == ["50.0 ± –", "1/2 (incomplete; 1 interrupted)"]
    assert table_row(md, "Trial") == ["Trial", "Config", "Variant", "Seed", "Status", "Error"]
    assert table_row(md, "1")[:5] == ["1", "a", "", "1", Status.INTERRUPTED]


# ----------------------------------------------------------------------------------- paired statistics
def test_paired_delta_against_a_hand_computation():
    from reports.paired import better_cell, delta_cell, paired_delta

    base = {0: 0.50, 1: 0.60, 2: 0.70, 3: 0.80}  # seed 3 has no partner, seed 4 no baseline: both skipped
    row = {0: 0.51, 1: 0.62, 2: 0.73, 4: 0.99}
    p = paired_delta(row, base)
    half = 4.302652729911275 * 0.01 / 3**0.5  # t.ppf(0.975, 2) · sd(0.01, 0.02, 0.03) / √3 = 0.02484
    assert (p.n, p.better) == (3, 3)
    assert p.mean == pytest.approx(0.02) and (p.hi - p.mean) == pytest.approx(half)
    assert (p.lo, p.hi) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    assert delta_cell(p) == "+2.0 [-0.5, +4.5]" and better_cell(p) == "3/3"
    nan = paired_delta({0: 0.5, 1: float("nan"), 2: None}, {0: 0.4, 1: 0.4, 2: 0.4})
    assert (nan.n, delta_cell(nan), better_cell(nan)) == (1, "+10.0 (n = 1, no CI)", "1/1")
    none = paired_delta({0: 0.5}, {1: 0.5})
    assert (none.n, delta_cell(none), better_cell(none)) == (0, "– (no paired seeds)", "–")


def test_paired_delta_seeds_better_respects_direction():
    from reports.paired import better_cell, paired_delta

    row, base = {0: 0.30, 1: 0.50, 2: 0.40}, {0: 0.40, 1: 0.45, 2: 0.40}  # lower, higher, tie
    assert better_cell(paired_delta(row, base)) == "1/3"
    assert better_cell(paired_delta(row, base, direction="minimize")) == "1/3"
    assert paired_delta({0: 0.1, 1: 0.2}, {0: 0.3, 1: 0.4}, direction="minimize").better == 2
    assert paired_delta({0: 0.1, 1: 0.2}, {0: 0.3, 1: 0.4}).better == 0


def test_minimize_study_counts_lower_as_better(store, url, tmp_path):
    spec = {"kind": "ablation", "seeds": [0, 1], "baseline": "a", "direction": "minimize",
            "rows": [{"label": "a"}, {"label": "b"}]}  # fmt: skip
    store.upsert_study("lower", spec, "smoke")
    for i, (row, seed, v) in enumerate([("a", 0, 0.5), ("a", 1, 0.5), ("b", 0, 0.4), ("b", 1, 0.6)]):
        add(store, "lower", i, row, seed, result(v))
    md = build_report("lower", url, tmp_path).read_text()
    assert table_row(md, "b")[-2:] == ["+0.0 [-127.1, +127.1]", "1/2"]
    assert "(minimize)" in md


def test_one_seed_study_still_reports(store, url, tmp_path):
    spec = {"kind": "ablation", "seeds": [0], "baseline": "a", "rows": [{"label": "a"}, {"label": "b"}]}
    store.upsert_study("oneseed", spec, "smoke")
    add(store, "oneseed", 0, "a", 0, result(0.40))
    add(store, "oneseed", 1, "b", 0, result(0.45))
    md = build_report("oneseed", url, tmp_path).read_text()
    assert table_row(md, "a")[1:] == ["40.0 ± –", "1", "(baseline)", "(baseline)", "(baseline)"]
    assert table_row(md, "b")[1:] == ["45.0 ± –", "1", "+5.0", "+5.0 (n = 1, no CI)", "1/1"]
    pngs_ok(md, tmp_path, 2)  # metric bars + per-class heat map


# ----------------------------------------------------------------------------------- collapsed trials
def test_is_collapsed_edge_cases():
    from studies.quality import is_collapsed, result_collapsed

    nan = float("nan")
    assert is_collapsed([0.9, 0.0, 0.0])
    assert is_collapsed([0.9, 0.0, None, nan, 0])  # absent classes skipped, the present ones all 0
    assert is_collapsed([0.0, 0.0])  # background IoU does not matter
    assert not is_collapsed([0.9, 0.0, 0.01])
    assert not is_collapsed([0.9, None, nan])  # no foreground value: cannot decide
    assert not is_collapsed([0.9]) and not is_collapsed([]) and not is_collapsed(None)
    assert result_collapsed(
        result(0.05, stages=[(0.3, (0.8, 0.4, 0.38)), (0.05, (0.8, 0.4, 0.38))], iou=[0.9, 0])
    )
    # the last stage decides: collapsed early, recovered later
    early = result(0.3, stages=[(0.0, (0.8, 0.4, 0.38)), (0.3, (0.8, 0.4, 0.38))])
    early["stages"][0]["val"]["per_class_iou"] = [0.9, 0.0]
    assert not result_collapsed(early) and not result_collapsed(None) and not result_collapsed({"stages": []})


@pytest.fixture(scope="module")
def collapse(store):
    """Study 'collapse': rows A (baseline) and B, 3 seeds, 4 classes without names; B seed 1 (trial 4) has
    IoU 0 on every foreground class present in val."""
    spec = {"kind": "ablation", "seeds": [0, 1, 2], "baseline": "A", "paper_table": 4,
            "rows": [{"label": "A"}, {"label": "B"}]}  # fmt: skip
    store.upsert_study("collapse", spec, "smoke")
    for seed in range(3):
        add(store, "collapse", seed, "A", seed, result(0.40 + 0.01 * seed, iou=[0.8, 0.3, 0.1, None]))
        iou = [0.7, 0.0, None, 0.0] if seed == 1 else [0.8, 0.4, 0.2, float("nan")]
        add(store, "collapse", 3 + seed, "B", seed, result(0.17 if seed == 1 else 0.45, iou=iou))
    return "collapse"


def test_collapsed_trial_marked_and_listed(collapse, url, tmp_path, monkeypatch):
    from reports import figures

    drawn, real_save = {}, figures._save

    def save(fig, out_dir, filename):
        drawn[filename] = fig
        return real_save(fig, out_dir, filename)

    monkeypatch.setattr(figures, "_save", save)
    md = build_report("collapse", url, tmp_path).read_text()
    assert table_row(md, "A")[0] == "A"
    assert table_row(md, "B ⚠ collapsed (1/3 seeds)")[1:3] == ["35.7 ± 16.2", "3"]
    assert md.index("## Warnings") < md.index("## Results (Table 4 layout)")
    warn = table_row(md, "4")  # the Warnings table: trial number, row, variant, seed, metric, meaning
    assert warn == [
        "4",
        "B",
        "",
        "1",
        "17.0",
        "predicts background everywhere on val (IoU 0 on every foreground class)",
    ]
    assert "1 collapsed trial**" in md
    assert table_rows(md, "B")[0] == ["B", "45.0", "17.0 ⚠", "45.0"]  # per-seed table
    # the figure joins each seed's dots across rows and crosses out the collapsed one
    fig = drawn[f"{report_stem('collapse', url)}_metric.png"]
    ax = {a.get_label(): a for a in fig.axes}["per seed"]
    assert {line.get_label() for line in ax.get_lines()} >= {"seed 0", "seed 1", "seed 2"}
    assert "collapsed" in [t.get_text() for t in fig.legends[0].get_texts()]
    (cross,) = ax.collections  # the collapsed trial's x, at B's value for seed 1
    assert cross.get_offsets()[0][0] == pytest.approx(17.0)


def test_run_summary_and_trial_attrs_carry_collapsed(collapse, store, url):
    from types import SimpleNamespace

    from core.config import Config
    from studies.execute import Job, Outcome
    from studies.optuna_adapter import trial_attrs
    from studies.summary import study_summary as summary

    plan = SimpleNamespace(
        is_grid=True,
        adaptive=False,
        study=SimpleNamespace(name="collapse", metric="final.miou", rows=[SimpleNamespace(label="A"),
                              SimpleNamespace(label="B")], variants=(), direction="maximize"),
        points=[SimpleNamespace(key=(r, None, s)) for r in "AB" for s in range(3)],
    )  # fmt: skip
    lines = summary(plan, store).splitlines()
    assert lines[3].startswith("B ") and lines[3].endswith("1 collapsed") and "collapsed" not in lines[2]
    assert lines[-1] == "6/6 points complete"
    job = Job(study="collapse", url=url, preset="smoke", optuna_number=4, row="B", seed=1, config=Config(),
              metric="final.miou", stage_metric="val.miou", code_version="abc123")  # fmt: skip
    bad = result(0.17, iou=[0.7, 0.0, None])
    done = {"optuna_number": 4, "status": "complete"}
    assert trial_attrs(job, Outcome(**done, value=0.17, result=bad))["collapsed"] is True
    assert trial_attrs(job, Outcome(**done, value=0.45, result=result(0.45)))["collapsed"] is False
    assert trial_attrs(job, Outcome(optuna_number=4, status="failed", error="boom"))["collapsed"] is False


# ----------------------------------------------------------------------------- per-class IoU, provenance
def test_per_class_table_and_heat_map(store, url, tmp_path):
    names = ["background", "cat", "dog"]
    spec = {"kind": "ablation", "seeds": [0, 1], "baseline": "a", "rows": [{"label": "a"}, {"label": "b"}]}
    store.upsert_study("classes", spec, "smoke")
    add(store, "classes", 0, "a", 0, result(0.5, iou=[0.90, 0.40, None], names=names))
    add(store, "classes", 1, "a", 1, result(0.5, iou=[0.80, 0.20, None], names=names))
    add(store, "classes", 2, "b", 0, result(0.6, iou=[0.90, 0.50, 0.30], names=names))
    add(store, "classes", 3, "b", 1, result(0.6, iou=[0.70, 0.60, float("nan")], names=names))
    md = build_report("classes", url, tmp_path).read_text()
    assert table_row(md, "Class") == ["Class", "a", "b"]
    assert table_row(md, "background") == ["background", "85.0", "80.0"]
    assert table_row(md, "cat") == ["cat", "30.0", "55.0"]
    assert table_row(md, "dog") == ["dog", "–", "30.0"]  # absent from val in every seed of a
    stem = report_stem("classes", url)
    assert f"![per-class IoU (%), mean over seeds]({stem}_per_class.png)" in md
    assert (tmp_path / f"{stem}_per_class.png").stat().st_size > 1000


def test_per_class_names_fallback(collapse, store, url):
    from reports.load import load_study
    from reports.per_class import per_class_frame

    frame = per_class_frame(load_study("collapse", url))  # 4 classes, no dataset.class_names
    assert list(frame.index) == ["background", "class 1", "class 2", "class 3"]
    store.upsert_study("voc21", {"kind": "ablation", "seeds": [0], "rows": [{"label": "a"}]}, "smoke")
    add(store, "voc21", 0, "a", 0, result(0.5, iou=[0.5] * 21))
    frame = per_class_frame(load_study("voc21", url))
    assert list(frame.index)[:3] == ["background", "aeroplane", "bicycle"] and frame.index[-1] == "tvmonitor"


def test_provenance_environment(store, url, tmp_path):
    env = {"torch": "2.13.0+cpu", "python": "3.11.7", "threads": 1, "device": "cpu",
           "cpu": "Intel(R) Xeon(R) Processor", "cpu_capability": "AVX512", "gpu": None}  # fmt: skip
    gpu = {**env, "torch": "2.13.0+cu126", "threads": 16, "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"}
    capped = {**env, "cpu_capability": "AVX2", "kernel_caps": "ONEDNN_MAX_CPU_ISA=AVX2"}
    store.upsert_study(
        "env", {"kind": "ablation", "seeds": [0, 1, 2, 3, 4], "rows": [{"label": "a"}]}, "smoke"
    )
    for seed, e in enumerate([env, env, gpu, None, capped]):
        add(store, "env", seed, "a", seed, result(0.5, env=e))
    md = build_report("env", url, tmp_path).read_text()
    line = next(x for x in md.splitlines() if x.startswith("- **Environment:**"))
    assert line == (
        "- **Environment:** torch 2.13.0+cpu, 1 thread, CPU Intel(R) Xeon(R) Processor (AVX512), "
        "Python 3.11.7 (2 trials); torch 2.13.0+cu126, 16 threads, CPU Intel(R) Xeon(R) Processor (AVX512), "
        "GPU NVIDIA H100 80GB HBM3, Python 3.11.7 (1 trial); – (not recorded) (1 trial); torch 2.13.0+cpu, "
        "1 thread, CPU Intel(R) Xeon(R) Processor (AVX2) [ONEDNN_MAX_CPU_ISA=AVX2], Python 3.11.7 (1 trial)"
    )
    assert "Metrics are bit-identical only for the same machine (CPU model and kernel level)" in md
    old = build_report("tasks", url, tmp_path).read_text()  # a store written before result.environment
    assert "- **Environment:** – (not recorded) (9 trials)" in old


# ------------------------------------------------------------------------------------------------ figures
def test_the_readme_reads_results_in_python(collapse, url, capsys):
    """The README's "Reading results in Python" snippet, run as written on a study of this store."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("## Reading results in Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("sqlite:///runs/studies.db", url).replace('"ablation_tasks"', repr(collapse))
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and lines[0].split()[1:4] == ["A", "None", "0"]
    assert float(lines[0].split()[4]) == pytest.approx(0.40)


@pytest.fixture(scope="module")
def forest(store):
    """Study 'forest': baseline A, rows B, C (3 seeds each) and D (seed 0 only); B beats A by 1-3 points."""
    spec = {"kind": "ablation", "seeds": [0, 1, 2], "baseline": "A",
            "rows": [{"label": x} for x in "ABCD"]}  # fmt: skip
    store.upsert_study("forest", spec, "smoke")
    values = {"A": [0.325, 0.338, 0.331], "B": [0.335, 0.349, 0.361], "C": [0.320, 0.341, 0.330], "D": [0.34]}
    n = iter(range(100))
    for row, vs in values.items():
        for seed, v in enumerate(vs):
            add(store, "forest", next(n), row, seed, result(v))
    return "forest"


def test_metric_figure_points_per_seed_no_bars_and_forest_plot(forest, url):
    from matplotlib.patches import Rectangle

    from reports import figures
    from reports.format import seed_values
    from reports.load import load_study
    from reports.paired import paired_delta

    study = load_study("forest", url)
    fig = figures.draw_metric(study)
    axes = {a.get_label(): a for a in fig.axes}
    seeds, delta = axes["per seed"], axes["paired Δ"]
    assert not [p for a in fig.axes for p in a.patches if isinstance(p, Rectangle)]  # no bars, no band
    assert seeds.get_xlabel() == "final val mIoU (%)" and "percent points" in delta.get_xlabel()
    assert [t.get_text() for t in seeds.get_yticklabels()] == ["A", "B", "C", "D"]
    lines = {line.get_gid(): line for line in seeds.get_lines()}
    # seed 1 across A, B, C (D has no seed 1)
    assert list(lines["seed 1"].get_xdata()[:3]) == pytest.approx([33.8, 34.9, 34.1])
    assert list(lines["row mean"].get_xdata()) == pytest.approx([33.133, 34.833, 33.033, 34.0], abs=1e-3)
    # forest: a zero line, the baseline marked, one interval per row with >= 2 paired seeds (D has one)
    (zero,) = [x for x in delta.get_lines() if x.get_gid() == "zero line"]
    assert list(zero.get_xdata()) == [0, 0]
    (base,) = [x for x in delta.get_lines() if x.get_gid() == "baseline"]
    assert list(base.get_ydata()) == [0]  # row A
    intervals = {
        c.lines[0].get_gid(): c
        for c in delta.containers
        if (c.lines[0].get_gid() or "").startswith("interval")
    }
    assert sorted(intervals) == ["interval B", "interval C"]
    done = study.complete
    p = paired_delta(seed_values(done[done.row == "B"]), seed_values(done[done.row == "A"]))
    (lo, hi), _ = intervals["interval B"].lines[2][0].get_segments()[0].T  # the table's numbers, in points
    assert (lo, hi) == (pytest.approx(100 * p.lo), pytest.approx(100 * p.hi))
    assert intervals["interval B"].lines[0].get_xdata()[0] == pytest.approx(100 * p.mean)
    texts = [t.get_text() for t in delta.texts]
    assert "+1.7 [-1.1, +4.5]  3/3" in texts and "+1.5 (n = 1, no CI)  1/1" in texts
    # the region of practical equivalence, in the store's unit (a fraction): 0.005 = ±0.5 percent points
    (band,) = [x for x in figures.draw_metric(study, rope=0.005).axes[1].patches if x.get_gid() == "rope"]
    assert (band.get_x(), band.get_width()) == (pytest.approx(-0.5), pytest.approx(1.0))
    assert "ROPE ±0.5 pp" in [t.get_text() for t in figures.draw_metric(study, rope=0.005).legends[0].texts]


def test_metric_figure_with_only_the_baseline_row_is_one_panel(store, url):
    from reports import figures
    from reports.load import load_study

    spec = {"kind": "ablation", "seeds": [0, 1], "rows": [{"label": "a"}]}  # a is the baseline: no Δ
    store.upsert_study("nobase", spec, "smoke")
    add(store, "nobase", 0, "a", 0, result(0.4))
    add(store, "nobase", 1, "a", 1, result(0.5))
    fig = figures.draw_metric(load_study("nobase", url))
    assert [a.get_label() for a in fig.axes] == ["per seed"]


def test_per_class_heat_map_labels_a_class_absent_from_val(store, url, tmp_path):
    from reports import figures
    from reports.load import load_study
    from reports.per_class import per_class_frame

    names = ["background", "cat", "dog", "sofa"]
    spec = {"kind": "ablation", "seeds": [0, 1], "rows": [{"label": "a"}, {"label": "b"}]}
    store.upsert_study("absent", spec, "smoke")
    for i, (row, seed, iou) in enumerate(
        [("a", 0, [0.9, 0.4, None, None]), ("a", 1, [0.8, 0.2, None, None]),
         ("b", 0, [0.9, 0.5, 0.3, None]), ("b", 1, [0.7, 0.6, 0.1, float("nan")])]
    ):  # fmt: skip
        add(store, "absent", i, row, seed, result(0.5, iou=iou, names=names))
    fig = figures.draw_per_class_heatmap(per_class_frame(load_study("absent", url)), "absent")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["background", "cat", "dog", "sofa (absent from val)"]
    hatched = [p for p in ax.patches if p.get_gid() == "absent from val"]
    assert sorted((p.get_x(), p.get_y()) for p in hatched) == [(0, 2), (0, 3), (1, 3)]  # dog in a; sofa
    assert "absent from val" in [t.get_text() for t in ax.texts]  # written across sofa's row
    md = build_report("absent", url, tmp_path).read_text()
    assert table_row(md, "sofa (absent from val)") == ["sofa (absent from val)", "–", "–"]
    assert table_row(md, "dog") == ["dog", "–", "20.0"]


# ----------------------------------------------------------------------------- report paths per store
def test_reports_of_two_stores_do_not_overwrite_each_other(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = f"sqlite:///{tmp_path / 'elsewhere' / 'studies.db'}"
    spec = {"kind": "ablation", "seeds": [0], "rows": [{"label": "a"}]}
    for u, v in ((DEFAULT_URL, 0.4), (other, 0.6)):
        s = Store(u)
        s.upsert_study("x", spec, "smoke")
        add(s, "x", 0, "a", 0, result(v))
        s.close()
    mine = build_report("x", DEFAULT_URL)  # the README's path for the default store
    assert mine == Path("runs/reports/x.md")
    theirs = build_report("x", other)
    assert theirs.parent == mine.parent and theirs.name.startswith("x--studies-") and theirs != mine
    assert table_row(mine.read_text(), "a")[1] == "40.0 ± –"  # not overwritten by the other store's report
    assert table_row(theirs.read_text(), "a")[1] == "60.0 ± –"
    assert f"- **Store:** `{DEFAULT_URL}` (this report: `x.md`)" in mine.read_text()
    assert f"- **Store:** `{other}` (this report: `{theirs.name}`)" in theirs.read_text()
    assert (mine.parent / "x_metric.png").exists() and (mine.parent / f"{theirs.stem}_metric.png").exists()
    # `python -m reports --out` follows the same rule; the same store by another spelling: the same name
    assert main(["x", "--storage", other, "--out", "o"]) == 0 and (tmp_path / "o" / theirs.name).exists()
    assert report_stem("x", "sqlite:///./runs/../runs/studies.db") == "x"
    assert report_stem("x", f"sqlite:///{tmp_path}/elsewhere/studies.db") == theirs.stem
    # a server: host and database are readable, the password takes no part
    pg = report_stem("x", "postgresql://me:secret@dbhost:5432/studies")
    assert pg.startswith("x--dbhost_studies-") and "secret" not in pg
    assert pg == report_stem("x", "postgres://me:other@dbhost:5432/studies")
    assert pg != report_stem("x", "postgresql://me:secret@dbhost:5432/other")


# --------------------------------------------------------------------------- points done vs attempts
def test_progress_counts_points_not_attempts():
    from studies.progress import progress

    grid = [(r, None, s) for r in "ab" for s in (0, 1)]

    def t(row, seed, status):
        return (row, None, seed), Status(status)

    rerun = [t("a", 0, "interrupted"), t("a", 0, "complete"), t("a", 1, "interrupted"), t("a", 1, "complete"),
             t("b", 0, "complete"), t("b", 1, "complete")]  # fmt: skip
    p = progress(rerun, grid)
    assert not p.partial and p.line() == "4/4 points complete; 2 earlier attempts interrupted"
    p = progress(
        [t("a", 0, "interrupted"), t("a", 1, "failed"), t("a", 1, "interrupted"), t("b", 0, "running")], grid
    )
    assert p.partial
    assert p.line() == "0/4 points complete (1 running, 1 failed, 1 interrupted, 1 not started); " + (
        "1 earlier attempt interrupted"
    )
    tuning = [(("trial", None, 0), Status(s)) for s in ["complete", "pruned", "interrupted", "complete"]]
    assert (
        progress(tuning, budget=3).line() == "3/3 trials finished (1 pruned); 1 earlier attempt interrupted"
    )
    assert progress(tuning[:2], budget=3).partial


def test_counts_after_interrupted_then_completed_attempts(store, url, tmp_path):
    from types import SimpleNamespace

    from studies.summary import study_summary

    spec = {"kind": "ablation", "seeds": [0, 1], "baseline": "a", "rows": [{"label": "a"}, {"label": "b"}]}
    store.upsert_study("rerun", spec, "smoke")
    first = [add(store, "rerun", i, "a", i, status="running") for i in (0, 1)]
    assert sorted(store.mark_stale_running("rerun")) == sorted(first)  # a killed run: two attempts lost
    for i, (row, seed) in enumerate([("a", 0), ("a", 1), ("b", 0), ("b", 1)]):  # the rerun completes them all
        add(store, "rerun", 2 + i, row, seed, result(0.5 + 0.01 * i))
    md = build_report("rerun", url, tmp_path).read_text()
    assert md.splitlines()[0] == "# Study report: rerun"  # complete, not partial
    assert "- **Progress:** 4/4 points complete; 2 earlier attempts interrupted" in md
    assert table_row(md, "a")[1:3] == ["50.5 ± 0.7", "2 (2 earlier attempts interrupted)"]
    assert table_row(md, "0")[4] == "interrupted; rerun complete"  # Failed trials: the lost attempt, resolved
    plan = SimpleNamespace(
        is_grid=True,
        adaptive=False,
        study=SimpleNamespace(name="rerun", metric="final.miou", rows=[SimpleNamespace(label="a"),
                              SimpleNamespace(label="b")], variants=(), direction="maximize"),
        points=[SimpleNamespace(key=(r, None, s)) for r in "ab" for s in (0, 1)],
    )  # fmt: skip
    out = study_summary(plan, store)
    assert out.splitlines()[-1] == "4/4 points complete; 2 earlier attempts interrupted"
    assert out.splitlines()[2].endswith("2 earlier attempts interrupted") and " 2 interrupted" not in out


def test_a_partial_studys_figure_says_partial_and_keeps_rows_without_pairs(store, url, tmp_path):
    """A partial store (issue #37): baseline A complete on seeds 0-1, B only on seed 2 (no pair with A), C
    still running, D not started. The figure's title says partial as the report's title does, every row
    keeps its place (C and D marked 'no complete trial yet'; B, C, D 'no paired seeds yet'), and the forest
    axis spans at least ±1 percent point instead of matplotlib's ±0.04 around the lone baseline."""
    import reports
    from reports import figures
    from reports.load import load_study

    spec = {"kind": "ablation", "seeds": [0, 1, 2], "baseline": "A", "rows": [{"label": x} for x in "ABCD"]}
    store.upsert_study("partial", spec, "smoke")
    add(store, "partial", 0, "A", 0, result(0.33))
    add(store, "partial", 1, "A", 1, result(0.34))
    add(store, "partial", 2, "B", 2, result(0.36))
    add(store, "partial", 3, "C", 0, status="running")
    study = load_study("partial", url)
    fig = figures.draw_metric(study)
    assert (
        fig._suptitle.get_text() == "partial: final val mIoU (%) (partial: 3/12 points complete, 1 running)"
    )
    axes = {a.get_label(): a for a in fig.axes}
    seeds, delta = axes["per seed"], axes["paired Δ"]
    assert [t.get_text() for t in seeds.get_yticklabels()] == ["A", "B", "C", "D"]
    no_values = [t.get_position()[1] for t in seeds.texts if t.get_gid() == "no values"]
    assert no_values == [2, 3] and {t.get_text() for t in seeds.texts if t.get_gid() == "no values"} == {
        "no complete trial yet"
    }
    no_pairs = [t for t in delta.texts if t.get_gid() == "no pairs"]
    assert [t.get_position()[1] for t in no_pairs] == [1, 2, 3]
    assert {t.get_text() for t in no_pairs} == {"no paired seeds yet"}
    lo, hi = delta.get_xlim()
    assert lo <= -1.0 and hi >= 1.0, (lo, hi)
    lo, hi = figures.draw_metric(study, rope=0.01).axes[1].get_xlim()  # a rope of 1 pp: ±1.5 pp at least
    assert lo <= -1.5 and hi >= 1.5, (lo, hi)
    md = reports.build_report("partial", url, out_dir=tmp_path).read_text()
    assert md.splitlines()[0] == "# Study report: partial (partial: 3/12 points complete, 1 running)"
    (png,) = tmp_path.glob("partial*_metric.png")  # named by study and store (reports.report_stem)
    assert png.stat().st_size > 10_000 and f"]({png.name})" in md


def test_an_adaptive_studys_figure_table_and_note_show_one_deciding_interval_per_row(store, url, tmp_path):
    """Adaptive seeds: the forest plot draws each row's deciding interval (the table's), not a Student-t one,
    names it in the legend, and clips the first looks' wide ends to arrow heads; an unresolved row's status
    carries its forecast in the table and in the dashboard note built from it."""
    from reports import figures
    from reports.dashboard import note_body
    from reports.load import load_study

    spec = {"kind": "ablation", "seeds": {"initial": [0, 1, 2], "max": 4}, "baseline": "A",
            "rows": [{"label": x} for x in "ABC"]}  # fmt: skip
    store.upsert_study("adapt", spec, "smoke")
    a = [0.30, 0.31, 0.32]
    values = {"A": a, "B": [x + 0.05 + e for x, e in zip(a, (0.001, -0.001, 0.0005))],
              "C": [x + e for x, e in zip(a, (0.04, -0.04, 0.02))]}  # fmt: skip
    n = iter(range(100))
    for row, vs in values.items():
        for seed, v in enumerate(vs):
            add(store, "adapt", next(n), row, seed, result(v))
    study = load_study("adapt", url)
    dec = study.decisions().rows
    assert dec["B"].status == "better" and dec["C"].status == "unresolved" and dec["C"].forecast
    fig = figures.draw_metric(study, rope=0.005)
    delta = {ax.get_label(): ax for ax in fig.axes}["paired Δ"]
    bars = {
        c.lines[0].get_gid(): c
        for c in delta.containers
        if (c.lines[0].get_gid() or "").startswith("interval")
    }
    (lo, hi), _ = bars["interval B"].lines[2][0].get_segments()[0].T
    assert (lo, hi) == (pytest.approx(100 * dec["B"].lo), pytest.approx(100 * dec["B"].hi))
    (clo, chi), _ = bars["interval C"].lines[2][0].get_segments()[0].T
    assert 100 * dec["C"].lo < clo and chi < 100 * dec["C"].hi  # clipped, with its true ends in the label
    assert len([x for x in delta.get_lines() if x.get_gid() == "clipped end"]) == 2
    legend = [t.get_text() for t in fig.legends[0].texts]
    assert "mean Δ, deciding interval (group-sequential)" in legend and "mean Δ, 95% CI" not in legend
    md_path = build_report("adapt", url, tmp_path)
    md = md_path.read_text()
    row_c = table_row(md, "C")
    assert row_c[-1] == f"{100 * dec['C'].mean:+.1f} [{100 * dec['C'].lo:+.1f}, {100 * dec['C'].hi:+.1f}]"
    assert "unresolved (seed 3 next): at " in row_c[-3] and "it would need about" in row_c[-3]
    assert "conditional power" in row_c[-3] and "group-sequential" in md
    assert "it would need about" in note_body(md, md_path)
    assert report_path("adapt", url, tmp_path) == md_path


def test_bench_redecide_applies_both_rules_to_a_stored_fixed_seed_study(store):
    """A fixed 6-seed study re-decided as if adaptive (3 initial seeds, at most 6): a 1.2-point effect with sd
    0.3 is better under both rules, the group-sequential one at no more seeds than the confidence sequence."""
    from bench.bench_redecide import redecide

    spec = {
        "kind": "ablation",
        "seeds": list(range(6)),
        "baseline": "A",
        "rows": [{"label": "A"}, {"label": "B"}],
    }
    store.upsert_study("fixed6", spec, "smoke")
    n = iter(range(100))
    for seed, e in enumerate((0.2, -0.3, 0.4, -0.1, 0.3, -0.5)):
        add(store, "fixed6", next(n), "A", seed, result(0.30 + 0.01 * e))
        add(store, "fixed6", next(n), "B", seed, result(0.312 + 0.01 * e + 0.003 * (-1) ** seed))
    text = redecide(store, "fixed6", initial=3, n_max=None, alpha=0.05, rope=0.5)
    cells = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| B")]
    rows = {(c[0].strip(), c[1].strip()): c[2:] for c in cells}
    gs, cs = rows[("B", "group-sequential")], rows[("B", "confseq")]
    assert gs[0].strip() == "better" and cs[0].strip() == "better", text
    assert int(gs[1]) <= int(cs[1]) and "+1.2 [" in gs[2]
    assert rows[("B", "Student-t 95 %, read once")][1].strip() == "6"
