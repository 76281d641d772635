"""A real 2-node Ray cluster on this machine (two `ray start --block` processes, token authentication on,
a token of the test's own), `python -m studies.run --backend ray --address` against it with a real
PostgreSQL store (testkit/pgserver.py) and a stub trial: trials spread over both nodes and each records its
node, a request no node can hold is one line and exit 2, and a node killed mid-trial leaves an interrupted
trial that the next run reruns."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.records import Status
from studies.store import Store
from testkit.pgserver import free_port
from testkit.stand_ins import stand_in_result, write_grid
from tests.conftest import ROOT

PY = sys.executable
RAY = str(Path(PY).with_name("ray"))
STUDY = "g"
FAST_S = 1.0  # a stub trial's sleep
SLOW_S = 120.0  # ... on the node named in <control dir>/slow_node (killed long before it ends)
NODES_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0


def cluster_trial(cfg, report=None, on_epoch=None, artifacts_dir=None, checkpoint_dir=None):
    """A stand-in trial run by Ray on some node: sleeps, reports one stage, returns a result shaped like
    core.trial's. On the node named in $RAY_CLUSTER_TEST_DIR/slow_node it writes slow_started and sleeps
    long (so that the test can kill that node mid-trial), checkpointing its seconds slept each second in
    checkpoint_dir as core.trial checkpoints its epochs; a trial that finds a checkpoint there says so in
    resumed_from, and removes it when it ends."""
    import ray

    sleep_s = FAST_S
    progress = Path(checkpoint_dir or ".", "progress.json")
    resumed = json.loads(progress.read_text())["seconds"] if checkpoint_dir and progress.exists() else None
    ctrl = os.environ.get("RAY_CLUSTER_TEST_DIR")
    if ctrl and ray.is_initialized():
        slow = Path(ctrl, "slow_node")
        if slow.exists() and slow.read_text().strip() == ray.get_runtime_context().get_node_id():
            Path(ctrl, "slow_started").write_text(json.dumps({"seed": cfg.seed}))
            sleep_s = SLOW_S
    for k in range(int(sleep_s / FAST_S)):
        time.sleep(FAST_S)
        if checkpoint_dir is not None and sleep_s == SLOW_S:
            progress.parent.mkdir(parents=True, exist_ok=True)
            progress.write_text(json.dumps({"seconds": (k + 1) * FAST_S}))
    res = stand_in_result(cfg, sleep_s, report)
    if resumed is not None:
        res["resumed_from"] = [{"stage": 0, "epoch": resumed}]
    if checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return res


# ------------------------------------------------------------------------------------ the cluster
class Cluster:
    """Two Ray nodes on this machine, each a `ray start --block` in its own session, kept by PID."""

    def __init__(self, base: Path):
        self.base = base  # ray start's output (head.log, worker.log), the token, the control files
        # the nodes' --temp-dir (sessions, logs, sockets; nothing under /tmp/ray). Ray's Unix sockets lie
        # 64 bytes below it and a socket path may have 107: a short folder of /tmp if base is deep
        self.temp = base / "t"
        self.own_temp = len(str(self.temp)) > 40
        if self.own_temp:
            self.temp = Path(tempfile.mkdtemp(prefix="raytest-", dir="/tmp"))
        self.ctrl = base / "ctrl"  # cluster_trial's control files
        self.ctrl.mkdir(parents=True)
        self.token = base / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.head_id = self.worker_id = ""

    def env(self) -> dict[str, str]:
        """Token authentication with this cluster's token, for nodes and drivers alike."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token),
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONPATH=str(ROOT),
            RAY_CLUSTER_TEST_DIR=str(self.ctrl),
        )
        return env

    def _start(self, name: str, args: list[str]) -> None:
        env = self.env()
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # SIGTERM stops the node now, not after 30 s
        log = open(self.base / f"{name}.log", "ab")
        with log:
            self.procs[name] = subprocess.Popen(
                [RAY, "start", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                 "--temp-dir", str(self.temp), "--disable-usage-stats", "--block", *args],
                cwd=self.base, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the node's processes, killed together
            )  # fmt: skip

    def start_head(self) -> None:
        self._start("head", ["--head", "--port", str(self.port), "--include-dashboard", "false"])

    def start_worker(self) -> None:
        self._start("worker", ["--address", self.address])

    def nodes(self, alive: int, gone: str = "") -> list[dict]:
        """The cluster's alive nodes, once there are `alive` of them and node `gone` is not among them
        (a short-lived driver polls)."""
        code = (
            "import json, sys, time, ray\n"
            "ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)\n"
            "end = time.monotonic() + float(sys.argv[3])\n"
            "while True:\n"
            "    ns = [n for n in ray.nodes() if n['Alive']]\n"
            "    ok = len(ns) == int(sys.argv[2]) and sys.argv[4] not in [n['NodeID'] for n in ns]\n"
            "    if ok or time.monotonic() > end: break\n"
            "    time.sleep(0.2)\n"
            "print(json.dumps([{'id': n['NodeID'], 'resources': n['Resources']} for n in ns]))\n"
        )
        for name, p in self.procs.items():
            assert p.poll() is None, f"ray start ({name}) exited: {self.log_tail(name)}"
        r = subprocess.run(
            [PY, "-c", code, self.address, str(alive), str(NODES_TIMEOUT_S), gone],
            env=self.env(), capture_output=True, text=True, timeout=NODES_TIMEOUT_S + 60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        ns = json.loads(r.stdout.strip().splitlines()[-1])
        assert len(ns) == alive and gone not in [n["id"] for n in ns], (ns, self.log_tail("worker"))
        return ns

    def wait_for_two_nodes(self, gone: str = "") -> None:
        ns = self.nodes(alive=2, gone=gone)
        head = [n["id"] for n in ns if "node:__internal_head__" in n["resources"]]
        assert len(head) == 1, ns
        self.head_id = head[0]
        self.worker_id = next(n["id"] for n in ns if n["id"] != self.head_id)

    def kill_worker(self) -> None:
        """The worker machine dies: SIGKILL to every process of its node (raylet, its trial workers)."""
        p = self.procs.pop("worker")
        _killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        """SIGTERM each `ray start` (it stops its node's processes); SIGKILL to what is left of its
        process group after STOP_TIMEOUT_S."""
        procs = [self.procs.pop(name) for name in ("worker", "head") if name in self.procs]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while any(_group_alive(p.pid) for p in procs) and time.monotonic() < deadline:
            for p in procs:
                p.poll()  # reap: a zombie leader would keep its group alive
            time.sleep(0.2)
        for p in procs:
            _killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=STOP_TIMEOUT_S)
        if self.own_temp:
            shutil.rmtree(self.temp, ignore_errors=True)

    def log_tail(self, name: str, n: int = 20) -> str:
        try:
            return "\n".join((self.base / f"{name}.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("ray"))
    try:
        c.start_head()
        c.start_worker()
        c.wait_for_two_nodes()
        yield c
    finally:
        c.stop()


# ------------------------------------------------------------------------------------ running studies
def studies_run(cluster: Cluster, tmp_path: Path, url: str, *extra: str) -> subprocess.Popen:
    env = cluster.env()
    env.update(STUDIES_TRIAL_FN="tests.test_ray_cluster:cluster_trial", AUXSEG_RUNS=str(tmp_path / "runs"))
    cmd = [PY, "-m", "studies.run", STUDY, "--study-file", str(tmp_path / "study.yaml"), "--backend", "ray",
           "--address", cluster.address, "--storage", url, "--no-report", *extra]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(p: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"studies.run did not end within {timeout:.0f} s; stderr:\n{err[-3000:]}")
    return p.returncode, out, err


def optuna_trials(url: str) -> list:
    import optuna

    store = Store(url)
    try:
        return optuna.load_study(study_name=STUDY, storage=store.optuna_storage()).get_trials(deepcopy=False)
    finally:
        store.close()


def harness_trials(url: str) -> list[dict]:
    store = Store(url)
    try:
        return store.trials(STUDY)
    finally:
        store.close()


def key(t) -> tuple:
    return t.key


# ------------------------------------------------------------------------------------ the cases
@pytest.mark.slow
def test_trials_spread_over_both_nodes_each_point_once(cluster, pg_url, tmp_path):
    write_grid(tmp_path, pg_url, study=STUDY, rows=2, seeds=2)
    rc, out, err = finish(studies_run(cluster, tmp_path, pg_url))
    assert rc == 0, err[-3000:]
    assert "1 CPU per trial, 2 at once on 2 node(s)" in out and "could not tell Optuna" not in out, out
    trials = harness_trials(pg_url)
    assert len(trials) == 4 and len({key(t) for t in trials}) == 4, trials
    assert all(t.status == Status.COMPLETE for t in trials)
    ot = optuna_trials(pg_url)
    assert len(ot) == 4 and all(t.state.name == "COMPLETE" for t in ot)
    assert {t.number for t in ot} == {t.optuna_number for t in trials}
    nodes = [t.user_attrs.get("ray_node") for t in ot]
    assert set(nodes) == {cluster.head_id, cluster.worker_id}, nodes


@pytest.mark.slow
def test_a_request_no_node_can_hold_is_one_line_and_exit_2(cluster, pg_url, tmp_path):
    write_grid(tmp_path, pg_url, study=STUDY, rows=1, seeds=2)
    t0 = time.monotonic()
    rc, out, err = finish(studies_run(cluster, tmp_path, pg_url, "--cpus-per-trial", "4"), timeout=120)
    took = time.monotonic() - t0
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err  # the cluster is checked before the study opens
    msg = lines[-1]
    assert msg.startswith(f"studies.run: no node of the Ray cluster at {cluster.address} "), msg
    assert "trial of 4 CPU (nodes: 1 CPU, 1 CPU)" in msg, msg
    assert took < 60, took
    assert harness_trials(pg_url) == []
    import optuna

    store = Store(pg_url)  # no Optuna study was created, no grid point claimed
    assert STUDY not in [x.study_name for x in optuna.get_all_study_summaries(store.optuna_storage())]
    assert store.claims(STUDY) == []
    store.close()


@pytest.mark.slow
def test_a_node_killed_mid_trial_is_interrupted_and_rerun(cluster, pg_url, tmp_path):
    write_grid(tmp_path, pg_url, study=STUDY, rows=1, seeds=3)
    started = cluster.ctrl / "slow_started"
    started.unlink(missing_ok=True)
    (cluster.ctrl / "slow_node").write_text(cluster.worker_id)
    dead = cluster.worker_id
    t0 = time.monotonic()
    p = studies_run(cluster, tmp_path, pg_url)
    try:
        # a trial runs on the worker node: the stub says so and its harness row is running
        deadline = time.monotonic() + 120
        victim = None
        while victim is None and time.monotonic() < deadline and p.poll() is None:
            if started.exists():
                seed = json.loads(started.read_text())["seed"]
                on_it = [t for t in harness_trials(pg_url) if t.status == Status.RUNNING and t.seed == seed]
                victim = on_it[0] if on_it else None
            time.sleep(0.2)
        assert victim is not None, f"no trial started on the worker node; driver rc {p.poll()}"
        cluster.kill_worker()
        t_kill = time.monotonic()
        rc, out, err = finish(p, timeout=150)
    finally:
        (cluster.ctrl / "slow_node").unlink(missing_ok=True)
        if p.poll() is None:
            p.kill()
    now = time.monotonic()
    print(f"driver ended {now - t_kill:.1f} s after the kill, {now - t0:.1f} s after its start")
    assert rc == 1 and "could not tell Optuna" not in out, (out, err[-3000:])
    trials = harness_trials(pg_url)
    by_id = {t.harness_id: t for t in trials}
    assert by_id[victim.harness_id].status == Status.INTERRUPTED, by_id[victim.harness_id]
    assert "node died" in by_id[victim.harness_id].error, by_id[victim.harness_id]
    others = [t for t in trials if t.harness_id != victim.harness_id]
    assert len(others) == 2 and all(t.status == Status.COMPLETE for t in others), trials
    ot = {t.number: t for t in optuna_trials(pg_url)}
    assert ot[victim.optuna_number].state.name == "FAIL"
    assert all(ot[t.optuna_number].state.name == "COMPLETE" for t in others)
    assert all(ot[t.optuna_number].user_attrs.get("ray_node") == cluster.head_id for t in others)

    # a new worker node joins; the same command reruns the interrupted point only
    cluster.start_worker()
    t0 = time.monotonic()
    cluster.wait_for_two_nodes(gone=dead)  # the cluster has seen the old node die, the new one join
    print(f"the old node was dead and the new one alive {time.monotonic() - t0:.1f} s after its start")
    rc, out, err = finish(studies_run(cluster, tmp_path, pg_url))
    assert rc == 0 and "could not tell Optuna" not in out, (out, err[-3000:])
    trials = harness_trials(pg_url)
    complete = [key(t) for t in trials if t.status == Status.COMPLETE]
    assert len(complete) == 3 and len(set(complete)) == 3, trials
    assert [t.harness_id for t in trials if t.status != Status.COMPLETE] == [victim.harness_id]
    assert {t.harness_id for t in others} <= {t.harness_id for t in trials if t.status == Status.COMPLETE}
    ot = {t.number: t for t in optuna_trials(pg_url)}
    assert sorted(t.state.name for t in ot.values()) == ["COMPLETE"] * 3 + ["FAIL"]
    failed, rerun = ot[victim.optuna_number], ot[max(ot)]
    assert rerun.state.name == "COMPLETE" and rerun.params == failed.params, (rerun, failed)
    assert rerun.user_attrs["ray_node"] in (cluster.head_id, cluster.worker_id)
    # the rerun found the killed trial's checkpoint (runs/checkpoints/, reached by both nodes) and removed it
    again = [t for t in trials if t.optuna_number == rerun.number][0]
    assert again.result["resumed_from"][0]["epoch"] >= 1, again.result
    assert not any((tmp_path / "runs" / "checkpoints" / STUDY).glob("store-*/*/progress.json"))
