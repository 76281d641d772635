"""How do grid-point claims and the results store scale with processes, on SQLite and on PostgreSQL?

    python -m bench.bench_claims [--points 1000] [--run-points N] [--procs 8 32]
        [--backends sqlite postgresql] [--sleep-ms 5] [--modes run store] [--timeout 600]
        [--no-barrier] [--keep]

Runs one generated ablation grid (rows x seeds; 1000 points = 50 rows x 20 seeds) to completion with N
concurrent processes, for every backend x N, with a stub trial that sleeps --sleep-ms and reports one
stage. Two layers of the real code path:

  run    N real `python -m studies.run` processes on a generated study file (STUDIES_TRIAL_FN points at
         the stub): claims, Optuna's ask/tell and every harness table write, as in production. Their
         first trials wait until all N have come up (their imports take seconds), unless --no-barrier:
         then each starts as soon as it is up, like machines joining a running study.
  store  N spawned processes doing what the Optuna backend does per grid point, less Optuna:
         ClaimKeeper.claim_next (reads the study's trials, then Store.claim_point) and
         studies.execute.execute (begin_trial, claim_started, record_stage, finish_trial, release_claim).

PostgreSQL is a throwaway server (testkit/pgserver.py, one fresh database per measurement), stopped at
the end; SQLite is a temp file (WAL). Per backend x N it prints: wall (launch to the last exit, with the
processes' start-up), work (first trial start to last trial end, from the stub's own log), claims/s
(points / work), the store overhead per trial (N x work / points - sleep: what each process spends per
trial beyond the stub's sleep), and three counts that must be 0: dup (points the stub ran more than once,
or with more than one harness row), lock (a "database is locked"-like error that reached a trial or a
process: locked/busy/deadlock/serialization/lock timeout), lost (points with no complete trial, in the
harness tables, or for `run` in Optuna). Any other error that reached a trial or a process (a failed
trial, a non-zero exit, "too many clients") is counted as err. Exit 1 when dup, lock, lost or err is not 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from studies.records import Status
from testkit.stand_ins import stand_in_result, write_grid

ROOT = Path(__file__).resolve().parents[1]
STUDY = "bench_claims"
SLEEP_ENV, LOG_ENV, PROCS_ENV = "BENCH_CLAIMS_SLEEP_MS", "BENCH_CLAIMS_LOG", "BENCH_CLAIMS_PROCS"
BARRIER_S = 240.0  # how long a `run` process's first trial waits for the others to come up
_waited = False
MAX_SEEDS = 20
LOCK_RE = re.compile(
    r"database is locked|database is busy|database table is locked|deadlock detected|could not serialize"
    r"|lock timeout|lock not available",
    re.IGNORECASE,
)
ERROR_RE = re.compile(r"Traceback|Error\b|Exception\b|: failed\b|interrupted|too many clients|FATAL")


# ------------------------------------------------------------------------------------ the stub trial
def _barrier(log: str, procs: int) -> None:
    """A `run` process's first trial waits here until every process has reached its first trial (each
    studies.run process takes seconds to import and open the study), so that N processes really run
    trials together; a file per process, polled."""
    global _waited
    if _waited:
        return
    _waited = True
    Path(log, f"ready-{os.getpid()}").touch()
    deadline = time.time() + BARRIER_S
    while len(list(Path(log).glob("ready-*"))) < procs and time.time() < deadline:
        time.sleep(0.1)


def _stub(cfg, row_index: int, seed: int, report) -> dict:
    """Sleep, report one stage, log (row, seed, start, end) to this process's file; a result.json shape."""
    log, procs = os.environ.get(LOG_ENV), int(os.environ.get(PROCS_ENV) or 0)
    if log and procs:
        _barrier(log, procs)
    t0 = time.time()
    try:
        time.sleep(float(os.environ.get(SLEEP_ENV, "5")) / 1000)
        return stand_in_result(cfg, 0.0, report, miou=0.3 + 0.001 * row_index + 0.01 * seed)
    finally:
        if log:
            with open(Path(log) / f"{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps([row_index, seed, t0, time.time()]) + "\n")


def stub_trial(cfg, report=None, **_hooks) -> dict:
    """STUDIES_TRIAL_FN: the point is (loss.cls - 1, seed), as the generated grid sets them; other hooks of
    core.trial.run_trial (on_epoch) are accepted and not called."""
    return _stub(cfg, round(cfg.loss.cls) - 1, int(cfg.seed), report)


# ------------------------------------------------------------------------------------------ the grid
def grid(points: int) -> tuple[int, int]:
    """(rows, seeds) with rows x seeds == points, at most MAX_SEEDS seeds (1000 -> 50 x 20)."""
    seeds = math.gcd(points, MAX_SEEDS)
    return points // seeds, seeds


def row_label(i: int) -> str:
    return f"r{i:03d}"


def write_study(folder: Path, url: str, points: int) -> Path:
    rows, seeds = grid(points)
    return write_grid(folder, url, rows, seeds, STUDY, row_label, "bench.bench_claims: a stub grid")


# -------------------------------------------------------------------------------------- store layer
def store_worker(url: str, study_file: str, log: str, out: str, barrier) -> None:
    """One process of `store`: what studies.optuna_backend's Dispatcher and run_optuna_job do per grid
    point, less Optuna: ClaimKeeper.claim_next (reads the study's trials, then Store.claim_point) and
    studies.execute.execute (begin_trial, claim_started, the stub reporting record_stage, finish_trial,
    release_claim). Writes a summary to out."""
    os.environ[LOG_ENV] = log
    os.environ.pop(PROCS_ENV, None)  # the spawn barrier below starts them together
    os.environ["STUDIES_TRIAL_FN"] = "bench.bench_claims:stub_trial"
    from studies.execute import ClaimKeeper, execute, get_store, job_for_point, one_line
    from studies.plan import make_plan
    from studies.spec import load_spec

    plan = make_plan(load_spec(study_file), STUDY)
    store = get_store(url)
    keeper = ClaimKeeper(store)
    handed: set = set()
    won, errors = 0, []
    barrier.wait(timeout=300)
    while True:
        try:
            got = keeper.claim_next(plan, False, skip=handed)
        except Exception as e:
            errors.append(f"claim_next: {one_line(e)}")
            break
        if got is None:
            break
        point, owner = got
        handed.add(point.key)
        job = job_for_point(plan, point, point.grid_index, url=url, code_version="bench", claim_owner=owner)
        try:
            o = execute(job)
        except Exception as e:
            keeper.release(owner, None)
            errors.append(f"trial {point.row}/{point.seed}: {one_line(e)}")
            continue
        won += 1
        if o.status != Status.COMPLETE:
            errors.append(f"trial {point.row}/{point.seed}: {o.status} {o.error}")
    keeper.close()
    store.close()
    Path(out).write_text(json.dumps({"pid": os.getpid(), "won": won, "errors": errors}))


def measure_store(url: str, procs: int, points: int, work: Path, timeout: float) -> dict:
    import multiprocessing as mp

    from studies.optuna_adapter import study_spec_record
    from studies.plan import make_plan
    from studies.spec import load_spec
    from studies.store import Store

    study = write_study(work, url, points)
    store = Store(url)  # the tables, and the study row, as open_study makes them
    store.upsert_study(STUDY, study_spec_record(make_plan(load_spec(study), STUDY)), "smoke")
    store.close()
    log, outs = work / "log", work / "out"
    log.mkdir()
    outs.mkdir()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs + 1)
    ps = [
        ctx.Process(target=store_worker, args=(url, str(study), str(log), str(outs / f"{i}.json"), barrier))
        for i in range(procs)
    ]
    t_launch = time.time()
    for p in ps:
        p.start()
    errors: list[str] = []
    try:
        barrier.wait(timeout=300)  # every worker has imported and read the study file
    except Exception as e:
        errors.append(f"workers did not start: {type(e).__name__}")
    t0 = time.time()
    deadline = t0 + timeout
    for p in ps:
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join()
            errors.append(f"worker {p.pid} killed after the {timeout:.0f} s timeout")
        elif p.exitcode != 0:
            errors.append(f"worker {p.pid} exit {p.exitcode}")
    wall = time.time() - t0
    for f in outs.glob("*.json"):
        errors += json.loads(f.read_text())["errors"]
    return {"wall": wall, "startup": t0 - t_launch, "errors": errors, "log": log}


# ---------------------------------------------------------------------------------------- run layer
def measure_run(
    url: str, procs: int, points: int, sleep_ms: float, work: Path, timeout: float, barrier: bool
) -> dict:
    study = write_study(work, url, points)
    log, outs = work / "log", work / "out"
    log.mkdir()
    outs.mkdir()
    env = {
        **os.environ,
        "STUDIES_TRIAL_FN": "bench.bench_claims:stub_trial",
        "PYTHONPATH": os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x),
        SLEEP_ENV: str(sleep_ms),
        LOG_ENV: str(log),
        PROCS_ENV: str(procs if barrier else 0),
    }
    cmd = [
        sys.executable,
        "-m",
        "studies.run",
        STUDY,
        "--study-file",
        str(study),
        "--no-report",
        "--workers",
        "1",
    ]
    t0 = time.time()
    ps = []
    for i in range(procs):
        with open(outs / f"{i}.txt", "wb") as f:
            ps.append(subprocess.Popen(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT))
    errors: list[str] = []
    deadline = t0 + timeout
    for p in ps:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()  # only the processes started here, by their own handle
            p.wait()
            errors.append(f"studies.run {p.pid} killed after the {timeout:.0f} s timeout")
    wall = time.time() - t0
    for p in ps:
        if p.returncode not in (0, -9):
            errors.append(f"studies.run {p.pid} exit {p.returncode}")
    warnings: Counter = Counter()
    if barrier and len(list(log.glob("ready-*"))) < procs:
        errors.append(f"only {len(list(log.glob('ready-*')))} of {procs} processes reached a trial")
    for f in sorted(outs.glob("*.txt")):
        for line in f.read_text(errors="replace").splitlines():
            if LOCK_RE.search(line) or ERROR_RE.search(line):
                errors.append(line.strip())
            elif "warning" in line.lower():
                warnings[line.strip()[:200]] += 1
    return {"wall": wall, "startup": None, "errors": errors, "log": log, "warnings": warnings}


# ------------------------------------------------------------------------------------------ checking
def check(url: str, mode: str, points: int, log: Path) -> dict:
    """dup, lost and the stub's work span, from the stub's log and the store (and Optuna for `run`)."""
    from studies.store import Store

    rows, seeds = grid(points)
    expected = {(row_label(r), s) for r in range(rows) for s in range(seeds)}
    runs: Counter = Counter()
    starts, ends = [], []
    for f in log.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            r, s, t0, t1 = json.loads(line)
            runs[(row_label(r), s)] += 1
            starts.append(t0)
            ends.append(t1)
    store = Store(url, create=False)
    store.trials(STUDY)  # warm the connection
    t = time.perf_counter()
    trials = store.trials(STUDY)  # what ClaimKeeper.claim_next (point_states) reads before every claim
    scan_ms = 1000 * (time.perf_counter() - t)
    rows_per_key = Counter((t.row, t.seed) for t in trials)
    complete = {(t.row, t.seed) for t in trials if t.status == Status.COMPLETE}
    failed = [f"trial {t.row}/{t.seed} {t.status}: {t.error}" for t in trials if t.status != Status.COMPLETE]
    dup = {k for k, n in runs.items() if n > 1} | {k for k, n in rows_per_key.items() if n > 1}
    lost = expected - complete
    notes = []
    claims = store.claims(STUDY)
    not_done = [c for c in claims if c.state != Status.DONE]
    if len(claims) != points or not_done:
        notes.append(f"{len(claims)} claim rows, {len(not_done)} not done")
    if mode == "run":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        ot = optuna.load_study(study_name=STUDY, storage=store.optuna_storage()).get_trials(deepcopy=False)
        states = Counter(t.state.name for t in ot)
        done_o = {(t.params.get("row"), t.params.get("seed")) for t in ot if t.state.name == "COMPLETE"}
        lost |= expected - done_o
        if len(ot) != points or states["COMPLETE"] != points:
            notes.append(f"optuna trials {len(ot)}: {dict(states)}")
    store.close()
    span = (max(ends) - min(starts)) if starts else float("nan")
    return {
        "dup": dup,
        "lost": lost,
        "failed": failed,
        "span": span,
        "scan_ms": scan_ms,
        "ran": sum(runs.values()),
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------- driver
def machine() -> str:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"{model}, {os.cpu_count()} cores, load average {load} at start; Python {platform.python_version()}"
    )


def one(mode: str, backend: str, url: str, procs: int, a, work: Path) -> dict:
    work.mkdir(parents=True)
    points = a.run_points if mode == "run" and a.run_points else a.points
    if mode == "store":
        os.environ[SLEEP_ENV] = str(a.sleep_ms)  # the spawned workers inherit it
        m = measure_store(url, procs, points, work, a.timeout)
    else:
        m = measure_run(url, procs, points, a.sleep_ms, work, a.timeout, not a.no_barrier)
    c = check(url, mode, points, m["log"])
    errors = m["errors"] + c["failed"]
    lock = [e for e in errors if LOCK_RE.search(e)]
    other = [e for e in errors if not LOCK_RE.search(e)]
    span = c["span"]
    return {
        "mode": mode,
        "backend": backend,
        "procs": procs,
        "points": points,
        "wall": m["wall"],
        "work": span,
        "rate": points / span if span > 0 else float("nan"),
        "overhead_ms": 1000 * procs * span / points - a.sleep_ms if span > 0 else float("nan"),
        "scan_ms": c["scan_ms"],
        "dup": len(c["dup"]),
        "lock": len(lock),
        "err": len(other),
        "lost": len(c["lost"]),
        "examples": (lock + other)[:5],
        "dup_examples": sorted(c["dup"])[:5],
        "lost_examples": sorted(c["lost"])[:5],
        "notes": c["notes"] + [f"{n} x {w}" for w, n in m.get("warnings", Counter()).most_common(3)],
    }


HEADER = (
    f"{'layer':<6} {'backend':<10} {'procs':>5} {'points':>6} {'wall s':>7} {'work s':>7} {'claims/s':>8} "
    f"{'ovh ms/trial':>12} {'scan ms':>7} {'dup':>4} {'lock':>4} {'lost':>4} {'err':>4}"
)


def fmt(r: dict) -> str:
    return (
        f"{r['mode']:<6} {r['backend']:<10} {r['procs']:>5} {r['points']:>6} "
        f"{r['wall']:>7.1f} {r['work']:>7.1f} "
        f"{r['rate']:>8.1f} {r['overhead_ms']:>12.1f} {r['scan_ms']:>7.0f} "
        f"{r['dup']:>4} {r['lock']:>4} {r['lost']:>4} {r['err']:>4}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_claims", description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=1000, help="grid points (rows x up to 20 seeds)")
    ap.add_argument("--procs", type=int, nargs="+", default=[8, 32], help="concurrent processes")
    ap.add_argument(
        "--backends", nargs="+", choices=("sqlite", "postgresql"), default=["sqlite", "postgresql"]
    )
    ap.add_argument("--modes", nargs="+", choices=("run", "store"), default=["run", "store"])
    ap.add_argument("--sleep-ms", type=float, default=5.0, help="the stub trial's sleep")
    ap.add_argument("--timeout", type=float, default=600.0, help="per measurement, seconds")
    ap.add_argument(
        "--run-points", type=int, default=None, help="grid points of the run layer (default --points)"
    )
    ap.add_argument(
        "--no-barrier",
        action="store_true",
        help="run layer: each process starts trials as soon as it is up (as machines joining a running study "
        "do) instead of waiting for all N",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (process logs, SQLite files)")
    a = ap.parse_args(argv)
    if a.points < 1 or min(a.procs) < 1:
        ap.error("--points and --procs must be >= 1")
    print(f"machine: {machine()}", flush=True)
    for layer, n in [("store", a.points), ("run", a.run_points or a.points)]:
        if layer in a.modes:
            rows, seeds = grid(n)
            print(f"{layer} grid: {n} points = {rows} rows x {seeds} seeds", flush=True)
    start = "all together (a barrier before the first trial)" if not a.no_barrier else "as each comes up"
    print(
        f"stub trial sleeps {a.sleep_ms:g} ms; run processes start trials {start}; "
        f"sqlite {sqlite3.sqlite_version}",
        flush=True,
    )
    results: list[dict] = []
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bench-claims-"))
    try:
        for backend in a.backends:
            with contextlib.ExitStack() as stack:
                server = None
                if backend == "postgresql":
                    from testkit.pgserver import create_database, postgres_server

                    server = stack.enter_context(postgres_server())  # stopped when this backend is done
                for mode in a.modes:
                    for procs in a.procs:
                        work = tmp / f"{backend}-{mode}-{procs}"
                        if server is not None:
                            url = create_database(server, f"bench_{mode}_{procs}")
                        else:
                            url = f"sqlite:///{work / 'studies.db'}"
                        r = one(mode, backend, url, procs, a, work)
                        results.append(r)
                        print(fmt(r), flush=True)
    finally:
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.time() - t_start
    print()
    print(HEADER)
    for r in results:
        print(fmt(r))
    print(
        "wall: launch to last exit (run: with each process's imports and Optuna setup; store: after all "
        "workers opened the store); work: first to last stub trial; claims/s = points / work;\n"
        "ovh = procs x work / points - sleep; scan ms: one Store.trials() of the finished study (what every "
        "claim_next reads before it claims)"
    )
    bad = False
    for r in results:
        if r["dup"] or r["lock"] or r["lost"] or r["err"]:
            bad = True
            print(
                f"FAIL {r['mode']} {r['backend']} {r['procs']}: "
                f"dup {r['dup_examples']} lost {r['lost_examples']}"
            )
            for e in r["examples"]:
                print(f"  {e[:300]}")
        for n in r["notes"]:
            print(f"note {r['mode']} {r['backend']} {r['procs']}: {n}")
    print(f"total {total:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
