"""Shared test setup: the repository root, the fast smoke variant, VOC settings that validate without the
data, a fresh runs/ folder per test module (study_runs: with the repository on $PYTHONPATH, for studies.run
in subprocesses), a helper that runs a module's CLI in a subprocess (run_cli: studies.run from a folder), a
small two-study study.yaml on the fast variant (write_study), one that kills a process once something happened
(kill_when), and a real throwaway PostgreSQL server (testkit.pgserver): pg_server for the session, pg_url a
fresh database per test. Stand-in trials and their study files are in testkit.stand_ins."""

from __future__ import annotations

import json
import os
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


def run_module(
    module: str, args: list[str], env: dict | None = None, timeout: float | None = None, cwd: Path = ROOT
):
    """`python -m module args...` from cwd (the repository root unless told), output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_cli(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m studies.run args...` from cwd (a test's folder: needs study_runs' $PYTHONPATH)."""
    return run_module("studies.run", args, timeout=timeout, cwd=cwd)


def write_study(
    tmp_path: Path, rows: int = 2, seeds: tuple = (0, 1), extra_rows: str = ""
) -> tuple[Path, str]:
    """tmp_path/study.yaml with an ablation grid `g` (the first `rows` of seg, full, seg+sal, then
    extra_rows, times seeds) and a two-trial tuning study `t`, on the fast smoke variant with one thread, the
    store in tmp_path/studies.db: (the file, the storage URL)."""
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    base = ", ".join(f"{k}: {json.dumps(v)}" for k, v in {**TINY_SET, "train.threads": 1}.items())
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


@pytest.fixture(scope="module")
def study_runs(runs):
    """runs/ (as the runs fixture) with the repository root on $PYTHONPATH, for `python -m studies.run` from
    a test's folder (run_cli) and the trial processes it starts."""
    old = os.environ.get("PYTHONPATH")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT)] + ([old] if old else [])))
        yield runs


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


def process_tree(root: int) -> set[int]:
    """root and every descendant, from /proc."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, grew = {root}, True
    while grew:
        kids = {pid for pid, pp in parent.items() if pp in tree} - tree
        grew = bool(kids)
        tree |= kids
    return tree


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited: only its exit status waits to be read


def sigkill_leaves_nothing(p: subprocess.Popen, at_least: int, grace_s: float = 30.0) -> None:
    """SIGKILL p and assert that its descendants (at least `at_least` of them before the kill: a count that
    proves the children under test were there) exit within grace_s of it; any still running are killed, so
    that they do not disturb the other tests."""
    tree = process_tree(p.pid) - {p.pid}
    p.send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    p.wait()
    while any(alive(pid) for pid in tree) and time.monotonic() - t_kill < grace_s:
        time.sleep(0.2)
    left = [pid for pid in tree if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert len(tree) >= at_least, tree
    assert not left, f"still running {time.monotonic() - t_kill:.0f} s after the kill: {left}"
