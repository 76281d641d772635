"""PostgreSQL as a store, against a real throwaway server (testkit/pgserver.py; .ci/run installs them):
the Store API and Optuna's tables in one database, `studies.run` end to end with a stub trial, URL mapping
to psycopg 3, and one-line StoreErrors for unreachable servers, bad credentials and malformed URLs."""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa

from studies.db import StoreError, check_reachable, normalize_url
from studies.records import Status
from testkit import pgserver
from testkit.pgserver import free_port
from tests.conftest import ROOT


def stub_trial(cfg, report=None, on_epoch=None, artifacts_dir=None, checkpoint_dir=None):
    """A fast stand-in for core.trial.run_trial: two stages, a metric that depends on the seed."""
    miou = 0.5 + 0.01 * cfg.seed
    stages = []
    for k in (1, 2):
        st = {"stage": k, "val": {"miou": miou - 0.1 / k, "per_class_iou": [miou, miou]}, "seconds": 0.01}
        stages.append(st)
        if report is not None:
            report(k, st)
    return {
        "final": {"miou": miou, "miou_post": None},
        "initial_pgt": {"precision": 0.8, "recall": 0.7, "miou": 0.6},
        "stages": stages,
        "seconds": 0.02,
        "config": cfg.to_dict(),
    }


def plain(url: str, scheme: str = "postgresql") -> str:
    """The URL as a user writes it: postgresql:// (or postgres://) without a driver."""
    return url.replace("postgresql+psycopg://", f"{scheme}://", 1)


def one_line_error(url: str) -> str:
    with pytest.raises(StoreError) as ei:
        check_reachable(url)
    msg = str(ei.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------ URL mapping
def test_plain_postgresql_urls_map_to_psycopg3():
    assert normalize_url("postgresql://u:p@h:5432/db") == "postgresql+psycopg://u:p@h:5432/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert normalize_url("postgres+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    for same in ("postgresql+psycopg://u@h/db", "sqlite:///runs/studies.db", "sqlite://", "nonsense"):
        assert normalize_url(same) == same


# ------------------------------------------------------------------------------------ the Store
def test_store_round_trip_with_optuna_tables_in_the_same_database(pg_url):
    import optuna

    from studies.store import Store

    check_reachable(pg_url)
    store = Store(pg_url)
    try:
        sid = store.upsert_study("s", {"kind": "ablation", "seeds": [0], "rows": [{"label": "seg"}]}, "smoke")
        spec = {"kind": "ablation", "seeds": [3], "rows": [{"label": "seg"}], "_cli_set": {"train.lr": 0.1}}
        assert store.upsert_study("s", spec, "paper") == sid
        stored = store.study("s")
        assert (stored.spec.seeds, stored.spec.baseline, stored.preset) == ((3,), "seg", "paper")
        assert stored.cli_overrides == {"train.lr": 0.1}
        hid = store.begin_trial(
            study="s",
            optuna_number=0,
            row="seg",
            variant=None,
            seed=3,
            params={"loss.cls": 0.5},
            config={"seed": 3},
            code_version="abc",
        )
        store.record_stage(
            hid, {"stage": 1, "val": {"miou": 0.25, "per_class_iou": [0.1, 0.4]}, "seconds": 1.5}
        )
        store.record_stage(hid, {"stage": 1, "val": {"miou": 0.3}, "pgt": {"miou": float("nan")}})  # replaces
        store.finish_trial(
            hid, Status.COMPLETE, result={"final": {"miou": 0.42}, "seconds": 9.0, "stages": []}
        )
        [t] = store.trials("s")
        assert (t.harness_id, t.status, t.row, t.variant, t.seed) == (hid, Status.COMPLETE, "seg", None, 3)
        assert t.params == {"loss.cls": 0.5} and t.config == {"seed": 3}
        assert t.final_miou == pytest.approx(0.42) and t.seconds == pytest.approx(9.0)
        assert t.result["final"] == {"miou": 0.42} and t.value("final.miou") == pytest.approx(0.42)
        [st] = store.stages(hid)
        assert st.val_miou == pytest.approx(0.3) and st.pgt_miou is None  # NaN is stored as NULL
        assert st.per_class_iou is None  # the replacing stage record had none
        assert [s.stage for s in store.study_stages("s")] == [1]

        study = optuna.create_study(study_name="s", storage=store.optuna_storage())
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.42))
        tables = set(sa.inspect(store.engine).get_table_names())
        assert {"harness_studies", "harness_trials", "harness_stages"} <= tables
        assert {"studies", "trials", "trial_values"} <= tables  # Optuna's, beside ours
        with store.engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT count(*) FROM trials")) == 1
            assert conn.scalar(sa.text("SELECT current_database()")) == sa.engine.make_url(pg_url).database
    finally:
        store.close()


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_plain_url_opens_the_harness_tables(pg_url, scheme):
    from studies.store import Store

    check_reachable(plain(pg_url, scheme))
    store = Store(plain(pg_url, scheme))
    try:
        assert store.engine.url.drivername == "postgresql+psycopg"
        store.upsert_study("p", {}, "smoke")
        assert store.study_names() == ["p"]
    finally:
        store.close()


def test_postgres_scheme_opens_optuna_storage(pg_url):
    import optuna

    from studies.store import Store

    store = Store(plain(pg_url, "postgres"))
    try:
        storage = store.optuna_storage()
        optuna.create_study(storage=storage, study_name="o").enqueue_trial({"x": 1.0})
        assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["o"]
        assert storage.get_all_trials(storage.get_study_id_from_name("o"))[0].system_attrs[
            "fixed_params"
        ] == {"x": 1.0}
    finally:
        store.close()


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_studies_run_end_to_end_on_postgresql(pg_url, tmp_path, monkeypatch, capsys):
    import optuna

    from studies.run import main
    from studies.store import Store

    monkeypatch.setenv("STUDIES_TRIAL_FN", "tests.test_postgres:stub_trial")
    monkeypatch.setenv("AUXSEG_RUNS", str(tmp_path / "runs"))
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT)] + ([old] if old else [])))
    (tmp_path / "study.yaml").write_text(
        """storage: sqlite:///not-this-one.db
base:
  preset: smoke
studies:
  g:
    kind: ablation
    description: two rows, two seeds
    metric: final.miou
    seeds: [0, 1]
    baseline: seg
    rows:
      - {label: seg, set: {model.branches: [seg], model.affinity: none, model.constraints: []}}
      - {label: full, set: {}}
"""
    )
    monkeypatch.chdir(tmp_path)
    rc = main(["g", "--storage", pg_url, "--no-report"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert not (tmp_path / "not-this-one.db").exists()

    store = Store(pg_url)
    try:
        trials = store.trials("g")
        assert sorted((t.row, t.seed, t.status) for t in trials) == [
            ("full", 0, Status.COMPLETE),
            ("full", 1, Status.COMPLETE),
            ("seg", 0, Status.COMPLETE),
            ("seg", 1, Status.COMPLETE),
        ]
        for t in trials:
            assert t.final_miou == pytest.approx(0.5 + 0.01 * t.seed)
            assert [s.stage for s in store.stages(t.harness_id)] == [1, 2]
        ot = optuna.load_study(study_name="g", storage=store.optuna_storage()).get_trials(deepcopy=False)
        assert sorted(t.value for t in ot) == pytest.approx([50.0, 50.0, 51.0, 51.0])  # percent
    finally:
        store.close()
    # a second run finds every grid point done
    assert main(["g", "--storage", pg_url, "--no-report"]) == 0
    store = Store(pg_url)
    assert len(store.trials("g")) == 4
    store.close()


# ------------------------------------------------------------------------------------ one-line errors
def test_closed_port_is_one_line_naming_host_and_port(pg_server):
    port = free_port()  # bound and released: nothing listens there
    url = f"postgresql://nouser:secret@127.0.0.1:{port}/db"
    msg = one_line_error(url)
    assert msg == f"cannot reach PostgreSQL at 127.0.0.1:{port} (connection refused)"
    assert "secret" not in msg


def test_bad_credentials_and_missing_database_are_one_line(pg_server):
    u = sa.engine.make_url(pg_server)
    where = f"{u.host}:{u.port}"
    check_reachable(plain(pg_server))  # the right password

    def url(**kw) -> str:
        return plain(u.set(**kw).render_as_string(hide_password=False))

    msg = one_line_error(url(password="wrong-pw"))
    assert msg == f"PostgreSQL at {where} rejected user 'postgres' for database 'postgres' " + (
        "(password authentication failed)"
    )
    assert "wrong-pw" not in msg
    msg = one_line_error(url(username="nouser", database="somedb"))
    assert msg.startswith(f"PostgreSQL at {where} rejected user 'nouser' for database 'somedb' ("), msg
    msg = one_line_error(url(database="nodb"))
    assert msg.startswith(f"PostgreSQL at {where} has no database 'nodb'"), msg


def test_malformed_url_and_unwritable_sqlite_folder_are_one_line(tmp_path):
    assert one_line_error("nonsense").startswith("malformed store URL 'nonsense'")
    msg = one_line_error("postgresql://u:secret@h:notaport/db")
    assert msg.startswith("malformed store URL 'postgresql://u:***@h:notaport/db'") and "secret" not in msg
    assert one_line_error("nosuchdb://x").startswith("unknown database kind 'nosuchdb'")
    blocker = tmp_path / "file"
    blocker.write_text("")
    msg = one_line_error(f"sqlite:///{blocker}/sub/studies.db")
    assert msg.startswith(f"cannot create the folder {blocker}/sub for the SQLite store"), msg
    check_reachable(f"sqlite:///{tmp_path}/new/studies.db")
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / "studies.db").exists()


def test_missing_binaries_fail_with_a_pointer_to_ci_run(monkeypatch):
    monkeypatch.setattr(pgserver.glob, "glob", lambda _pattern: [])
    monkeypatch.setattr(pgserver.shutil, "which", lambda _name: None)
    with pytest.raises(pgserver.PgServerError, match=r"\.ci/run installs them"):
        pgserver.find_bin()
