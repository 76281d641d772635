"""Shared test setup: the repository root, the fast smoke variant, VOC settings that validate without the
data, a fresh runs/ folder per test module, a helper that runs a module's CLI in a subprocess, one that kills
a process once something happened (kill_when), and a real throwaway PostgreSQL server (testkit.pgserver):
pg_server for the session, pg_url a fresh database per test. Stand-in trials and their study files are in
testkit.stand_ins."""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testkit.pgserver import PgServerError, create_database, postgres_server

ROOT = Path(__file__).resolve().parents[1]

# The fast variant of the smoke preset: one warm-up epoch, one short stage, no post-processing.
TINY_SET = {
    "train.warmup_epochs": 1,
    "train.stage_epochs": 1,
    "train.stages": 1,
    "eval.post": False,
    "train.workers": 1,
}
TINY = [f"{k}={json.dumps(v)}" for k, v in TINY_SET.items()]  # as --set overrides

# A VOC config that passes validation without the data on disk.
VOC = ["data.root=/voc", "data.saliency=sr"]


def run_module(module: str, args: list[str], env: dict | None = None, timeout: float | None = None):
    """`python -m module args...` from the repository root, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def kill_when(
    proc: subprocess.Popen,
    predicate: Callable[[], bool],
    timeout: float,
    sig: int = signal.SIGKILL,
    *,
    never: str,
    poll_s: float = 0.05,
) -> None:
    """Poll predicate() every poll_s seconds until it holds, then send sig to proc and wait for proc to end.
    The test fails when proc ends first (with its stderr, when that is a pipe) or, naming `never`, when
    timeout seconds pass; proc is then killed, so that it does not outlive the test."""
    deadline = time.monotonic() + timeout
    sent = False
    try:
        while not predicate():
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr is not None else b""
                err = err.decode(errors="replace") if isinstance(err, bytes) else err
                why = "the study finished before it could be killed"
                pytest.fail(f"{why}:\n{err[-3000:]}" if err else why)
            if time.monotonic() >= deadline:
                pytest.fail(never)
            time.sleep(poll_s)
        proc.send_signal(sig)
        sent = True
    finally:
        if not sent and proc.poll() is None:
            proc.kill()
        proc.wait(30)


def trials_now(store, study: str) -> list:
    """store.trials(study), or [] while the store cannot be read yet (the process is still creating it)."""
    try:
        return store.trials(study)
    except Exception:
        return []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A fresh runs/ folder (datasets, warm-up cache) for one test module, as $AUXSEG_RUNS."""
    with pytest.MonkeyPatch.context() as mp:
        d = tmp_path_factory.mktemp("runs")
        mp.setenv("AUXSEG_RUNS", str(d))
        yield d


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A PostgreSQL server for the whole session: its superuser URL. Fails (never skips) without binaries."""
    try:
        with postgres_server() as url:
            yield url
    except PgServerError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def pg_url(pg_server: str, request) -> str:
    """A fresh, empty database on the session's server, as a postgresql+psycopg:// URL."""
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    return create_database(pg_server, f"t_{name}_{secrets.token_hex(3)}")
