"""studies/: study.yaml validation, Optuna and Ray backends end to end with REAL smoke trials, resume after
SIGKILL, parallel workers with a concurrent reader on SQLite, and the store's own API."""

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
from tests.conftest import ROOT, TINY_SET, kill_when, trials_now

PY = sys.executable
TINY = {**TINY_SET, "train.threads": 1}


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
def shared_runs(runs):
    """One runs/ folder (dataset + warm-up cache) for the whole file; the trial function records results."""
    old = os.environ.get("PYTHONPATH")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIES_TRIAL_FN", "tests.test_studies:recording_trial")
        mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT)] + ([old] if old else [])))
        yield runs


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    d = tmp_path / "results"
    monkeypatch.setenv("STUDIES_TEST_RESULTS", str(d))
    return d


def write_study(
    tmp_path: Path, rows: int = 2, seeds: tuple = (0, 1), extra_rows: str = ""
) -> tuple[Path, str]:
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    base = ", ".join(f"{k}: {json.dumps(v)}" for k, v in TINY.items())
    all_rows = [
        "      - {label: seg, set: {model.branches: [seg], model.affinity: none, model.constraints: []}}",
        "      - {label: full, set: {}}",
        "      - {label: seg+sal, set: {model.branches: [seg, sal], model.affinity: none,"
        " model.constraints: []}}",
    ][:rows]
    text = f"""storage: {db}
base:
  preset: smoke
  set: {{{base}}}
studies:
  g:
    kind: ablation
    description: test grid
    metric: final.miou
    seeds: {list(seeds)}
    baseline: seg
    rows:
{chr(10).join(all_rows)}
{extra_rows}
  t:
    kind: tuning
    n_trials: 2
    params:
      loss.cls: {{type: float, low: 0.1, high: 10.0, log: true}}
"""
    p = tmp_path / "study.yaml"
    p.write_text(text)
    return p, db


def run_cli(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "studies.run", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def recorded(results_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]


def check_store_matches(db: str, study: str, results: list[dict], n: int) -> list[dict]:
    """Every complete harness trial equals one recorded TrialResult, column by column."""
    from studies.store import Store

    store = Store(db)
    trials = store.trials(study)
    complete = [t for t in trials if t.status == "complete"]
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


# ------------------------------------------------------------------------------ validation
def one_line_error(capsys, argv, cwd) -> str:
    from studies.run import main

    old = os.getcwd()
    os.chdir(cwd)
    try:
        rc = main(argv)
    finally:
        os.chdir(old)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def test_dry_run_lists_every_grid_point_once(tmp_path, capsys):
    from studies.run import main

    y, _ = write_study(tmp_path, rows=3, seeds=(0, 1, 2))
    assert main(["g", "--study-file", str(y), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    pts = [
        line.split()[:4]
        for line in out
        if line.split() and line.split()[0].isdigit() and "trials" not in line
    ]
    assert [p[0] for p in pts] == [str(i) for i in range(9)]
    assert {(p[1], p[3]) for p in pts} == {(r, str(s)) for r in ("seg", "full", "seg+sal") for s in range(3)}
    assert not (tmp_path / "studies.db").exists(), "--dry-run must not touch the store"


def test_real_study_yaml_validates_and_grids_are_complete():
    from studies.plan import make_plan
    from studies.spec import load_spec

    spec = load_spec(ROOT / "study.yaml")
    for name in (
        "ablation_tasks",
        "ablation_affinity",
        "ablation_stages",
        "ablation_saliency",
        "tune_loss_weights",
        "tune_label_thresholds",
    ):
        plan = make_plan(spec, name, preset="smoke")
        s = plan.study
        if s.kind == "ablation":
            assert len(s.seeds) >= 3
            keys = [p.key for p in plan.points]
            assert len(keys) == len(set(keys)) == len(s.rows) * max(1, len(s.variants)) * len(s.seeds)
            assert s.baseline in [r.label for r in s.rows]
        else:
            assert plan.search_space()
    from core.data.saliency import SALIENCY_SOURCES

    assert {r.label for r in spec.study("ablation_saliency").rows} == set(SALIENCY_SOURCES)


@pytest.mark.parametrize(
    "case,edit,expect",
    [
        ("malformed", lambda t: t.replace("kind: ablation", "kind: [ablation"), "malformed YAML"),
        (
            "unknown_key",
            lambda t: t.replace("    description: test grid", "    descriptoin: test grid"),
            "unknown key 'descriptoin'",
        ),
        (
            "unknown_config_key",
            lambda t: t.replace("{label: full, set: {}}", "{label: full, set: {model.affinty: seg}}"),
            "unknown config key 'model.affinty'",
        ),
        (
            "bad_value",
            lambda t: t.replace("{label: full, set: {}}", "{label: full, set: {model.affinity: bogus}}"),
            "model.affinity",
        ),
        (
            "low_ge_high",
            lambda t: t.replace("low: 0.1, high: 10.0", "low: 10.0, high: 0.1"),
            "must be < high",
        ),
        (
            "log_low_le_0",
            lambda t: t.replace("low: 0.1, high: 10.0", "low: 0.0, high: 10.0"),
            "log scale needs low > 0",
        ),
    ],
)
def test_bad_study_yaml_is_one_line_exit_2(tmp_path, capsys, case, edit, expect):
    y, _ = write_study(tmp_path)
    text = y.read_text()
    y.write_text(edit(text))
    name = "t" if "low" in case else "g"
    err = one_line_error(capsys, [name, "--study-file", str(y)], tmp_path)
    assert expect in err
    assert err.startswith(f"{y}:") and err.split(":")[1].isdigit(), f"no line number: {err}"
    # the line number points at the offending line
    line = int(err.split(":")[1])
    if case == "malformed":  # YAML notices an unclosed bracket on the next line; the message names both
        assert "at line 7" in err
        line = 7
    bad = y.read_text().splitlines()[line - 1]
    assert any(w in bad for w in ("kind", "descriptoin", "affinty", "bogus", "low", "10.0")), (line, bad)
    assert not (tmp_path / "studies.db").exists(), "nothing may run on a bad study file"


def test_unknown_study_and_bad_cli(tmp_path, capsys):
    y, _ = write_study(tmp_path)
    err = one_line_error(capsys, ["nope", "--study-file", str(y)], tmp_path)
    assert "unknown study 'nope'" in err and "g, t" in err
    err = one_line_error(capsys, ["g", "--study-file", str(y), "--set", "train.stagez=2"], tmp_path)
    assert "--set" in err and "train.stagez" in err
    err = one_line_error(capsys, ["g", "--study-file", str(y), "--bogus-flag"], tmp_path)
    assert "unrecognized arguments" in err
    # as a real subprocess: one line on stderr, exit 2, no traceback
    p = run_cli(["nope", "--study-file", str(y)], tmp_path)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr


def test_paper_preset_on_a_missing_voc_folder_is_one_line_before_any_trial(tmp_path, capsys):
    from studies.run import main

    y, _ = write_study(tmp_path)
    voc = [
        "--preset",
        "paper",
        "--set",
        f"data.root={tmp_path / 'novoc'}",
        "data.saliency=sr",
        "model.init_weights=none",
    ]
    # the paper preset needs data.root from --set: the plan must judge them together
    assert main(["g", "--study-file", str(y), *voc, "--dry-run"]) == 0
    capsys.readouterr()
    err = one_line_error(capsys, ["g", "--study-file", str(y), *voc], tmp_path)
    assert "novoc" in err and "not found" in err
    assert not (tmp_path / "studies.db").exists(), "nothing may run on a missing data folder"
    err = one_line_error(capsys, ["g", "--study-file", str(y), "--preset", "paper", "--dry-run"], tmp_path)
    assert err.startswith("--preset:") and "data.root" in err


# --------------------------------------------------------------------------------- end to end
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
        return any(t.status == "complete" for t in ts) and any(t.status == "running" for t in ts)

    kill_when(proc, one_complete_one_running, 150, never="never saw one complete and one running trial")
    before = {t.harness_id: t for t in store.trials("g")}
    done_before = {k: t for k, t in before.items() if t.status == "complete"}
    killed = [t for t in before.values() if t.status == "running"]
    assert done_before and len(killed) == 1

    p = run_cli(["g", "--study-file", str(y), "--no-report"], tmp_path)
    assert p.returncode == 0, p.stderr
    after = store.trials("g")
    complete = check_store_matches(db, "g", recorded(results_dir), n=4)
    # no completed trial lost or changed; the killed one is interrupted and its point rerun
    for tid, t in done_before.items():
        a = [x for x in after if x.harness_id == tid][0]
        assert a.status == "complete" and a.finished_at == t.finished_at
    k = [x for x in after if x.harness_id == killed[0].harness_id][0]
    assert k.status == "interrupted" and "died" in k.error
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
    assert len(trials) == 6 and all(t.status == "complete" for t in trials)
    assert len({t.pid for t in trials}) == 2, "two worker processes should have shared the grid"
    check_store_matches(db, "g", recorded(results_dir), n=6)


# ------------------------------------------------------------------------------------- store
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
        "complete",
        0.5,
        None,
        0.3,
        False,
    )
    assert store.stages(tid)[0].pgt_precision == 0.9
    live = store.begin_trial(
        study="x",
        optuna_number=1,
        row="seg",
        variant=None,
        seed=4,
        params={},
        config={},
        code_version="unknown",
    )
    dead = store.begin_trial(
        study="x",
        optuna_number=2,
        row="seg",
        variant=None,
        seed=5,
        params={},
        config={},
        code_version="unknown",
    )
    assert store.live_running("x") == {live, dead}  # this process is alive
    assert store.mark_stale_running("x", keep={live}) == [dead]
    assert "died" in store.trials("x", status=Status.INTERRUPTED)[0].error
    df = pd.read_sql("harness_trials", store.engine)
    assert list(df["status"]) == ["complete", "running", "interrupted"]
    assert store.engine.connect().exec_driver_sql("pragma journal_mode").scalar() == "wal"


def test_grid_points_are_claimed_longest_trial_first(tmp_path):
    from studies.plan import make_plan
    from studies.spec import parse_spec

    text = """
storage: sqlite:///x.db
base: {preset: smoke}
studies:
  t:
    kind: ablation
    metric: final.miou
    seeds: [0, 1]
    set: {train.stages: 1}
    rows:
      - {label: seg, set: {model.branches: [seg], model.affinity: none, model.constraints: []}}
      - {label: full, set: {}}
      - {label: full-2, set: {train.stages: 2}}
"""
    plan = make_plan(parse_spec(text, "t.yaml"), "t")
    order = [(p.row, p.seed) for p in plan.claim_order]
    assert order == [("full-2", 0), ("full-2", 1), ("full", 0), ("full", 1), ("seg", 0), ("seg", 1)]
    assert [p.grid_index for p in plan.points] == list(range(6))  # the grid itself keeps its order
