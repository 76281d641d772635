"""Exactly-once grid points: the store's claim API (unique insert, takeover of dead or silent claimants,
compare-and-set races) and several real `studies.run` processes on one study, each point run once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from studies.records import Status
from studies.store import Store, point_key
from testkit.stand_ins import write_grid
from tests.conftest import ROOT

PY = sys.executable


def dead_pid() -> int:
    p = subprocess.Popen([PY, "-c", "pass"])
    p.wait()
    return p.pid


def test_claim_is_exclusive_and_taken_over_only_from_a_dead_or_silent_claimant(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.upsert_study("g", {}, "smoke")
    key = point_key("seg", None, 0)
    assert store.claim_point("g", key, "A")
    assert not store.claim_point("g", key, "B")  # A is alive (this pid) and fresh
    # A's process died (same host): B takes over at once
    with store._session.begin() as s:
        s.execute(__import__("sqlalchemy").text("UPDATE harness_claims SET pid = :p"), {"p": dead_pid()})
    assert store.claim_point("g", key, "B")
    # B on another host went silent: C takes over after the stale timeout only
    with store._session.begin() as s:
        s.execute(__import__("sqlalchemy").text("UPDATE harness_claims SET host = 'elsewhere'"))
    assert not store.claim_point("g", key, "C", stale_s=60)
    with store._session.begin() as s:
        s.execute(
            __import__("sqlalchemy").text("UPDATE harness_claims SET heartbeat_at = :t"),
            {"t": time.time() - 61},
        )
    assert store.claim_point("g", key, "C", stale_s=60)
    # done: never retaken, unless its trial failed and the caller asked to retry failed points
    hid = store.begin_trial(
        study="g", optuna_number=0, row="seg", variant=None, seed=0, params={}, config={}, code_version="x"
    )
    store.claim_started("C", hid)
    store.finish_trial(hid, "failed", error="boom")
    store.release_claim("C", "failed")
    assert not store.claim_point("g", key, "D")
    assert store.claim_point("g", key, "D", retake_failed=True)
    # an interrupted trial frees its point for anyone
    store.release_claim("D", "interrupted")
    assert store.claims("g") == []
    assert store.claim_point("g", key, "E")


def test_takeover_race_has_one_winner(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    store.upsert_study("g", {}, "smoke")
    key = point_key("seg", None, 1)
    assert store.claim_point("g", key, "A")
    with store._session.begin() as s:
        s.execute(__import__("sqlalchemy").text("UPDATE harness_claims SET pid = :p"), {"p": dead_pid()})
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def grab(i: int) -> None:
        other = Store(store.url)
        barrier.wait()
        wins.append(other.claim_point("g", key, f"T{i}"))

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(wins) == 1, wins


def run_concurrently(tmp_path: Path, url: str, procs: int = 3) -> list[subprocess.CompletedProcess]:
    study = write_grid(tmp_path, url)
    env = {
        **os.environ,
        "STUDIES_TRIAL_FN": "testkit.stand_ins:sleepy_trial",
        "PYTHONPATH": str(ROOT),
        "CLAIMS_TEST_SLEEP": "0.3",
    }
    cmd = [PY, "-m", "studies.run", "g", "--study-file", str(study), "--no-report"]
    ps = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(procs)
    ]
    out = []
    for p in ps:
        so, se = p.communicate(timeout=240)
        out.append(subprocess.CompletedProcess(cmd, p.returncode, so, se))
    return out


def assert_exactly_once(url: str, n_points: int) -> None:
    import optuna

    store = Store(url)
    trials = store.trials("g")
    keys = [t.key for t in trials]
    assert len(keys) == n_points and len(set(keys)) == n_points, sorted(keys)
    assert all(t.status == Status.COMPLETE for t in trials)
    ot = optuna.load_study(study_name="g", storage=store.optuna_storage()).get_trials(deepcopy=False)
    assert len(ot) == n_points and all(t.state.name == "COMPLETE" for t in ot)
    assert {t.number for t in ot} == {t.optuna_number for t in trials}
    claims = store.claims("g")
    assert len(claims) == n_points and {c.state for c in claims} == {Status.DONE}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_three_processes_on_one_grid_run_each_point_once(tmp_path, backend, request):
    url = f"sqlite:///{tmp_path / 'studies.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    results = run_concurrently(tmp_path, url)
    for r in results:
        assert r.returncode == 0, r.stderr[-2000:]
    assert_exactly_once(url, 12)
    ran = [r.stdout.count(": complete") for r in results]
    assert sum(ran) == 12 and sum(1 for n in ran if n) >= 2, ran  # the work was shared


def test_a_store_written_before_interrupted_was_a_status_reads_the_same(tmp_path):
    """Old stores kept an interrupted trial as failed + error text: opening them migrates it, and
    reading an unmigrated one (create=False) normalises it."""
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = Store(url)
    store.upsert_study("g", {}, "smoke")
    hid = store.begin_trial(study="g", optuna_number=0, row="seg", variant=None, seed=0, params={},
                            config={}, code_version="x")  # fmt: skip
    with store._session.begin() as s:
        s.execute(
            sa.text("UPDATE harness_trials SET status='failed', error=:e"),
            {"e": "interrupted (its process died while the trial was running)"},
        )
    assert Store(url, create=False).trials("g")[0].status == Status.INTERRUPTED
    Store(url)  # opened for writing: migrated in the table itself
    with store.engine.connect() as c:
        assert c.execute(sa.text("SELECT status FROM harness_trials WHERE id=:i"), {"i": hid}).scalar() == (
            Status.INTERRUPTED
        )
