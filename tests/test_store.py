"""studies/store.py, the store's own API: a stored study reads back as the study that ran (a confirmation
study too), trials begin and finish with their stages, running trials whose process died are marked
interrupted, and SQLite runs in WAL mode."""

from __future__ import annotations

import pytest

from studies.records import Status
from tests.conftest import ROOT


def test_every_stored_study_reads_back_as_the_study_that_ran(tmp_path):
    """The store's read model: a study stored as studies.run stores it comes back as the same spec.Study
    (defaults applied once, by studies.spec), with the run's --set and preset; a confirmation study too; a
    stored definition that no longer parses is a one-line StoreError naming the study."""
    from studies.db import StoreError
    from studies.optuna_adapter import study_spec_record
    from studies.plan import confirm_plan, make_plan
    from studies.records import StoredTrial
    from studies.spec import load_spec
    from studies.store import Store

    spec = load_spec(ROOT / "study.yaml")
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    for name in spec.studies:
        plan = make_plan(spec, name, preset="smoke", cli_overrides={"train.lr": 0.02})
        store.upsert_study(name, study_spec_record(plan), plan.preset)
        stored = store.study(name)
        assert stored.spec == spec.study(name), name
        assert (stored.preset, stored.cli_overrides) == ("smoke", {"train.lr": 0.02})
        assert stored.study_file == str(ROOT / "study.yaml")  # not ./study.yaml: the report names it
    plan = make_plan(spec, "tune_loss_weights", preset="smoke")
    best = StoredTrial(
        harness_id=1, optuna_number=7, row="trial", variant=None, seed=0, status=Status.COMPLETE, error=None,
        params={"loss.cls": 2.0, "loss.sal": 1.0, "loss.seg": 0.5}, config={},
        result={"final": {"miou": 0.3}},
        started_at=None, finished_at=None, seconds=1.0, warmup_cached=None, warmup_seconds=None,
        code_version="x", host="h", pid=None, heartbeat_at=None, final_miou=0.3, final_miou_post=None,
        initial_precision=None, initial_recall=None, initial_miou=None,
    )  # fmt: skip
    conf = confirm_plan(plan, [best])
    store.upsert_study(conf.study.name, study_spec_record(conf), conf.preset)
    again = store.study(conf.study.name).spec
    assert again == conf.study and [r.label for r in again.rows] == ["preset", "#7"]
    assert again.rows[1].overrides == best.params
    store.upsert_study("old", {"kind": "ablation", "rows": [{"label": "a"}]}, "smoke")  # no seeds
    with pytest.raises(StoreError, match=r"^study 'old' in sqlite:///.*: its stored definition: .*seeds"):
        store.study("old")


def test_store_api_and_stale_trials(tmp_path):
    import pandas as pd

    from studies.db import code_version
    from studies.store import Store

    store = Store(f"sqlite:///{tmp_path / 'sub' / 's.db'}")  # creates the folder
    sid = store.upsert_study("x", {"kind": "ablation"}, "smoke")
    assert store.upsert_study("x", {"kind": "ablation", "v": 2}, "smoke") == sid
    stage = {
        "stage": 0,
        "val": {"miou": 0.5, "miou_post": None, "per_class_iou": [0.4, 0.6]},
        "pgt": {"precision": 0.9, "recall": 0.4, "miou": 0.35},
        "seconds": 1.5,
    }
    result = {
        "status": "complete",
        "error": None,
        "config": {"seed": 3},
        "stages": [stage],
        "initial_pgt": {"precision": 0.8, "recall": 0.3, "miou": 0.25},
        "final": {"miou": 0.5, "miou_post": None},
        "warmup": {"cached": False, "seconds": 2.0},
        "seconds": 4.0,
    }
    tid = store.begin_trial(
        study="x",
        optuna_number=0,
        row="seg",
        variant=None,
        seed=3,
        params={"row": "seg"},
        config={"seed": 3},
        code_version=code_version(),
    )
    store.finish_trial(tid, "complete", result=result)  # stages not reported live are filled in
    t = store.trials("x")[0]
    assert (t.status, t.final_miou, t.final_miou_post, t.initial_recall, t.warmup_cached) == (
        Status.COMPLETE,
        0.5,
        None,
        0.3,
        False,
    )
    assert store.stages(tid)[0].pgt_precision == 0.9
    live, dead = (
        store.begin_trial(
            study="x",
            optuna_number=n,
            row="seg",
            variant=None,
            seed=n + 3,
            params={},
            config={},
            code_version="?",
        )
        for n in (1, 2)
    )
    assert store.live_running("x") == {live, dead}  # this process is alive
    assert store.mark_stale_running("x", keep={live}) == [dead]
    assert "died" in store.trials("x", status=Status.INTERRUPTED)[0].error
    df = pd.read_sql("harness_trials", store.engine)
    assert list(df["status"]) == [Status.COMPLETE, Status.RUNNING, Status.INTERRUPTED]
    assert store.engine.connect().exec_driver_sql("pragma journal_mode").scalar() == "wal"
