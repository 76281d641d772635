"""studies/: the Optuna and Ray backends end to end with REAL smoke trials (each stored trial equals the
TrialResult it recorded), resume after SIGKILL, and parallel workers with a concurrent reader on SQLite."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from studies.records import Status
from tests.conftest import kill_when, run_cli, trials_now, write_study

PY = sys.executable


def recording_trial(cfg, report=None, on_epoch=None, artifacts_dir=None, checkpoint_dir=None):
    """The real core.trial.run_trial, plus a copy of each result in $STUDIES_TEST_RESULTS (to compare)."""
    from core.trial import run_trial

    res = run_trial(
        cfg, report=report, on_epoch=on_epoch, artifacts_dir=artifacts_dir, checkpoint_dir=checkpoint_dir
    )
    out = Path(os.environ["STUDIES_TEST_RESULTS"])
    out.mkdir(parents=True, exist_ok=True)
    d = res.to_dict()
    name = f"{time.time_ns()}-{os.getpid()}.json"
    (out / name).write_text(json.dumps(d))
    return res


@pytest.fixture(scope="module", autouse=True)
def shared_runs(study_runs):
    """One runs/ folder (dataset + warm-up cache) for the whole file; the trial function records results."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIES_TRIAL_FN", "tests.test_backends:recording_trial")
        yield study_runs


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    d = tmp_path / "results"
    monkeypatch.setenv("STUDIES_TEST_RESULTS", str(d))
    return d


def recorded(results_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]


def check_store_matches(db: str, study: str, results: list[dict], n: int) -> list[dict]:
    """Every complete harness trial equals one recorded TrialResult, column by column."""
    from studies.store import Store

    store = Store(db)
    trials = store.trials(study)
    complete = [t for t in trials if t.status == Status.COMPLETE]
    assert len(complete) == n
    by_cfg = {json.dumps(r["config"], sort_keys=True): r for r in results}
    for t in complete:
        r = by_cfg[json.dumps(t.config, sort_keys=True)]
        stored, recorded_ = dict(t.result), json.loads(json.dumps(r))
        gallery = stored.pop("artifacts")["gallery"]  # uploaded: now a file of the artifact store
        assert Path(gallery).is_file() and Path(gallery).parent.name == "artifacts"
        assert recorded_.pop("artifacts")["gallery"].endswith("gallery.png")
        assert stored == recorded_
        assert t.final_miou == pytest.approx(r["final"]["miou"])
        assert t.initial_precision == pytest.approx(r["initial_pgt"]["precision"])
        assert t.initial_recall == pytest.approx(r["initial_pgt"]["recall"])
        assert t.initial_miou == pytest.approx(r["initial_pgt"]["miou"])
        assert t.warmup_cached == r["warmup"]["cached"]
        assert t.seconds == pytest.approx(r["seconds"])
        assert t.config["seed"] == t.seed
        assert t.code_version
        stages = store.stages(t.harness_id)
        assert [s.stage for s in stages] == [s["stage"] for s in r["stages"]]
        for s, rs in zip(stages, r["stages"]):
            assert s.val_miou == pytest.approx(rs["val"]["miou"])
            assert s.per_class_iou == pytest.approx(rs["val"]["per_class_iou"])
            assert s.pgt_miou == pytest.approx(rs["pgt"]["miou"])
    keys = [t.key for t in complete]
    assert len(set(keys)) == len(keys), "a grid point ran twice"
    return complete


def optuna_trials(db: str, study: str):
    import optuna

    return optuna.load_study(study_name=study, storage=db).get_trials(deepcopy=False)


@pytest.mark.slow
def test_grid_optuna_end_to_end(tmp_path, results_dir, capsys):
    import optuna
    from optuna.trial import TrialState

    from studies.run import main

    y, db = write_study(tmp_path, extra_rows="      - {label: nan, set: {train.lr: 1000000000000.0}}")
    rc = main(["g", "--study-file", str(y), "--no-report", "--artifacts", str(tmp_path / "artifacts")])
    out = capsys.readouterr()
    assert rc == 1, out.err  # the NaN row failed; the study went on
    assert "seg " in out.out and "full" in out.out
    complete = check_store_matches(db, "g", recorded(results_dir), n=4)
    assert {(t.row, t.seed) for t in complete} == {("seg", 0), ("seg", 1), ("full", 0), ("full", 1)}
    from studies.store import Store

    failed = Store(db).trials("g", status=Status.FAILED)
    assert len(failed) == 2 and all("non-finite loss" in t.error for t in failed)
    ts = optuna_trials(db, "g")
    assert len(ts) == 6
    assert (
        sum(t.state == TrialState.COMPLETE for t in ts) == 4
        and sum(t.state == TrialState.FAIL for t in ts) == 2
    )
    for t in ts:
        assert set(t.params) == {"row", "seed"}
        if t.state == TrialState.COMPLETE:
            assert list(t.intermediate_values) == [0]  # the curve subset after the one epoch
            assert {"final_miou", "pgt_miou", "warmup_cached", "seconds"} <= set(t.user_attrs)  # no nulls
    # re-running changes nothing (failed-by-NaN points are not rerun unless --retry-failed)
    assert main(["g", "--study-file", str(y), "--no-report", "--artifacts", str(tmp_path / "artifacts")]) == 0
    assert len(optuna_trials(db, "g")) == 6
    # the dashboard's view: Optuna's tables readable from another process beside the harness tables
    code = (
        "import optuna,sys; s=optuna.get_all_study_summaries(sys.argv[1]); "
        "print([(x.study_name, x.n_trials) for x in s])"
    )
    p = subprocess.run([PY, "-c", code, db], capture_output=True, text=True, timeout=60)
    assert "('g', 6)" in p.stdout, p.stderr
    assert {"harness_trials", "harness_stages", "harness_studies", "trials", "studies"} <= {
        r[0] for r in sqlite3.connect(tmp_path / "studies.db").execute("select name from sqlite_master")
    }
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard._app import create_app  # the dashboard builds its app on this storage

    app = create_app(optuna.storages.RDBStorage(db))
    env: dict = {}
    setup_testing_defaults(env)
    env.update(PATH_INFO="/api/studies", REQUEST_METHOD="GET")
    status: list = []
    body = b"".join(app(env, lambda s, h, *a: status.append(s)))
    assert status[0].startswith("200") and b'"study_name": "g"' in body.replace(b'":"', b'": "'), body[:300]


@pytest.mark.slow
def test_grid_ray_end_to_end(tmp_path, results_dir, capsys):
    import ray
    from optuna.trial import TrialState

    from studies.run import main

    y, db = write_study(tmp_path)
    env = {
        k: os.environ[k] for k in ("AUXSEG_RUNS", "STUDIES_TRIAL_FN", "STUDIES_TEST_RESULTS", "PYTHONPATH")
    }
    env["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        rc = main(
            [
                "g",
                "--study-file",
                str(y),
                "--backend",
                "ray",
                "--workers",
                "2",
                "--cpus-per-trial",
                "1",
                "--no-report",
            ]
        )
    finally:
        os.chdir(old)
        ray.shutdown()
    out = capsys.readouterr()
    assert rc == 0, out.err
    check_store_matches(db, "g", recorded(results_dir), n=4)
    ts = optuna_trials(db, "g")
    assert len(ts) == 4 and all(t.state == TrialState.COMPLETE for t in ts)
    assert all(t.intermediate_values for t in ts)
    assert sorted((t.params["row"], t.params["seed"]) for t in ts) == [
        ("full", 0),
        ("full", 1),
        ("seg", 0),
        ("seg", 1),
    ]


@pytest.mark.slow
def test_sigkill_mid_study_then_resume(tmp_path, results_dir):
    from studies.store import Store

    y, db = write_study(tmp_path)
    store = Store(db)
    # One trial at a time, in the killed process itself: automatic workers would run the trial in a child
    # process that outlives its parent and records the trial complete (nothing lost either way).
    proc = subprocess.Popen(
        [PY, "-m", "studies.run", "g", "--study-file", str(y), "--no-report", "--workers", "1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def one_complete_one_running() -> bool:
        ts = trials_now(store, "g")
        return any(t.status == Status.COMPLETE for t in ts) and any(t.status == Status.RUNNING for t in ts)

    kill_when(proc, one_complete_one_running, 150, never="never saw one complete and one running trial")
    before = {t.harness_id: t for t in store.trials("g")}
    done_before = {k: t for k, t in before.items() if t.status == Status.COMPLETE}
    killed = [t for t in before.values() if t.status == Status.RUNNING]
    assert done_before and len(killed) == 1

    p = run_cli(["g", "--study-file", str(y), "--no-report"], tmp_path)
    assert p.returncode == 0, p.stderr
    after = store.trials("g")
    complete = check_store_matches(db, "g", recorded(results_dir), n=4)
    # no completed trial lost or changed; the killed one is interrupted and its point rerun
    for tid, t in done_before.items():
        a = [x for x in after if x.harness_id == tid][0]
        assert a.status == Status.COMPLETE and a.finished_at == t.finished_at
    k = [x for x in after if x.harness_id == killed[0].harness_id][0]
    assert k.status == Status.INTERRUPTED and "died" in k.error
    assert (k.row, k.seed) in {(t.row, t.seed) for t in complete}
    assert len(after) == 5
    from optuna.trial import TrialState

    states = [t.state for t in optuna_trials(db, "g")]
    assert states.count(TrialState.COMPLETE) == 4 and states.count(TrialState.FAIL) == 1
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states


@pytest.mark.slow
def test_two_workers_and_a_concurrent_reader(tmp_path, results_dir):
    import pandas as pd

    from studies.store import Store

    y, db = write_study(tmp_path, rows=3)
    errors: list[str] = []
    stop = threading.Event()
    reads = [0]

    def reader() -> None:
        import optuna

        store = Store(db)
        while not stop.is_set():
            try:
                store.trials("g")
                pd.read_sql("select * from harness_stages", store.engine)
                try:
                    optuna.load_study(study_name="g", storage=store.optuna_storage()).get_trials(
                        deepcopy=False
                    )
                except KeyError:
                    pass  # the study is not created yet
                reads[0] += 1
            except Exception as e:  # anything, "database is locked" above all
                errors.append(f"{type(e).__name__}: {e}")
            time.sleep(0.02)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        p = run_cli(["g", "--study-file", str(y), "--workers", "2", "--no-report"], tmp_path, timeout=200)
    finally:
        stop.set()
        th.join(10)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "locked" not in p.stderr + p.stdout
    assert not errors, errors[:3]
    assert reads[0] > 10
    trials = Store(db).trials("g")
    assert len(trials) == 6 and all(t.status == Status.COMPLETE for t in trials)
    assert len({t.pid for t in trials}) == 2, "two worker processes should have shared the grid"
    check_store_matches(db, "g", recorded(results_dir), n=6)
