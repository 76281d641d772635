"""Shared test setup: the repository root, the fast smoke variant, VOC settings that validate without the
data, a fresh runs/ folder per test module, a helper that runs a module's CLI in a subprocess, and a real
throwaway PostgreSQL server (testkit.pgserver): pg_server for the session, pg_url a fresh database per test.
Stand-in trials and their study files are in testkit.stand_ins."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
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
