"""The Optuna backend (default, `--backend optuna`): trials in this process or in a local process pool,
on the Optuna study that studies.optuna_adapter opens.

Ablations: this process claims the next grid point in the database (studies.execute: exactly once
across processes and machines), then creates its Optuna trial with the point's params fixed
(PartialFixedSampler), so no enqueued trial can be picked up by another process. Tuning: TPE (seeded)
+ a pruner fed with the per-stage metric. `workers` > 1 runs trials in that many spawned processes;
each process writes its trial to both Optuna's and the harness tables, so a killed parent loses
nothing finished.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import io
import multiprocessing as mp
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

import optuna
from optuna.trial import TrialState

from core.parallel import die_with_parent
from studies.db import code_version, retry_locked
from studies.execute import (
    STOPPED_BY_USER,
    ClaimKeeper,
    Job,
    Outcome,
    TrialEvents,
    execute,
    finished_count,
    get_store,
    job_for_params,
    job_for_point,
    one_line,
    signals_held,
)
from studies.optuna_adapter import OptunaStudy, make_pruner, tell
from studies.plan import GridPoint, Plan
from studies.quality import result_collapsed
from studies.records import Status
from studies.store import Store


def ask_point(ot: OptunaStudy, plan: Plan, point: GridPoint) -> optuna.Trial:
    """A new RUNNING Optuna trial with the point's params. A WAITING trial left by an older harness
    (which enqueued points) would be popped first: such trials are failed and skipped."""
    ot.fix(point)
    study = ot.study
    for _ in range(100):
        trial = retry_locked(study.ask, plan.search_space())
        if trial.params == point.params:
            return trial
        retry_locked(study._storage.set_trial_user_attr, trial._trial_id, "error", "stale enqueued trial")
        retry_locked(study._storage.set_trial_state_values, trial._trial_id, TrialState.FAIL)
    raise RuntimeError(f"study {plan.study.name}: too many stale enqueued trials")


def run_optuna_job(job: Job) -> Outcome:
    """One trial in this process: report stages to Optuna (pruning), record everything, tell."""
    store = get_store(job.url)
    study = optuna.load_study(
        study_name=job.study, storage=store.optuna_storage(), pruner=make_pruner(job.pruner)
    )
    trial = optuna.trial.Trial(study, job.optuna_trial_id)

    def on_stage(step: int, value: float | None, metrics: dict) -> None:
        if value is None:
            return
        retry_locked(trial.report, value * job.value_scale, step)
        if job.pruner != "none" and trial.should_prune():
            what = "val.miou on the curve subset" if metrics.get("curve") else job.stage_metric
            raise optuna.TrialPruned(f"pruned at epoch {step} ({what} {100 * value:.2f} %)")

    global _TRIAL_RUNNING
    _TRIAL_RUNNING = True
    try:
        out = execute(job, on_stage)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (studies.run; a trial process: from its parent)
        out = Outcome(optuna_number=job.optuna_number, status=Status.INTERRUPTED, error=STOPPED_BY_USER)
        with signals_held():
            tell(study, job, out)
        if not _IN_WORKER:
            raise
        if orphaned():  # nobody reads the outcome, and the pool's pipes would block this process forever
            os._exit(1)
        return out  # a trial process: the parent stopped it and reads the outcome
    except Exception as e:  # config/store trouble outside the trial itself: still close the Optuna trial
        out = Outcome(optuna_number=job.optuna_number, status=Status.FAILED, error=one_line(e))
    finally:
        _TRIAL_RUNNING = False
    tell(study, job, out)
    out.collapsed = result_collapsed(out.result)
    out.result = None  # it stays in the store; do not pickle it back to the parent
    return out


class Dispatcher:
    """Hands out the next trial: a claimed grid point (exactly once across processes), or the next
    sampled tuning trial."""

    def __init__(
        self,
        ot: OptunaStudy,
        cv: str,
        n_trials: int | None,
        retry_failed: bool,
        artifacts: str | None = None,
    ):
        plan, store = ot.plan, ot.store
        self.ot, self.plan, self.store, self.cv, self.artifacts = ot, plan, store, cv, artifacts
        self.retry_failed = retry_failed
        self.handed: set = (
            set()
        )  # never twice in one invocation (a point whose worker died waits for the next)
        self.keeper = ClaimKeeper(store) if plan.is_grid else None
        if plan.is_grid:
            self.budget = n_trials if n_trials is not None else len(plan.points)
        else:
            target = n_trials if n_trials is not None else plan.study.n_trials
            self.budget = max(0, target - finished_count(plan, store))
            if self.budget:
                ot.enqueue_interrupted()

    def next_job(self) -> Job | None:
        if self.budget <= 0:
            return None
        kw = {
            "url": self.store.url,
            "code_version": self.cv,
            "value_scale": self.ot.value_scale,
            "artifacts": self.artifacts,
        }
        plan = self.plan
        if not plan.is_grid:
            trial = retry_locked(self.ot.study.ask, plan.search_space())
            self.ot.own(trial)
            self.budget -= 1
            job = job_for_params(plan, trial.params, trial.number, optuna_trial_id=trial._trial_id, **kw)
            self.ot.label(trial, job)
            return job
        got = self.keeper.claim_next(plan, self.retry_failed, skip=self.handed)
        if got is None:
            return None
        point, owner = got
        try:
            trial = ask_point(self.ot, plan, point)
            self.ot.own(trial)
        except BaseException:
            self.keeper.release(owner, None)
            raise
        self.handed.add(point.key)
        self.budget -= 1
        job = job_for_point(
            plan, point, trial.number, optuna_trial_id=trial._trial_id, claim_owner=owner, **kw
        )
        self.ot.label(trial, job)
        return job

    def lost(self, job: Job) -> None:
        """The process running job died: free its claim (the point reruns on the next invocation)."""
        if self.keeper is not None:
            self.keeper.release(job.claim_owner, None)

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.close()


_IN_WORKER = False  # this process is one of run_study's trial processes
_TRIAL_RUNNING = False  # run_optuna_job is running a trial in this process


_PARENT = 0  # a trial process: the pid of the studies.run process that started it


def orphaned() -> bool:
    """This trial process's parent is gone (killed): no one reads its outcome or gives it work."""
    return _IN_WORKER and os.getppid() != _PARENT


def _stop_trial(signum: int, frame: object) -> None:
    """A trial process's SIGTERM, from its parent or from the kernel when the parent died: stop the
    running trial as a Ctrl-C would (it is closed as interrupted in both stores; its checkpoint stays for
    the rerun). An orphan then exits: between trials at once, after a trial within STOP_GRACE_S at most."""
    if orphaned():
        if not _TRIAL_RUNNING:
            os._exit(1)
        threading.Timer(STOP_GRACE_S, os._exit, (1,)).start()
    if _TRIAL_RUNNING:
        raise KeyboardInterrupt


class _LineRelay(io.TextIOBase):
    """A trial process's stdout and stderr while the parent draws its live progress: each whole line goes to
    the parent (a queue that run_study drains into `log`), which prints it above its bars, so that a trial's
    "resuming from ..." or a warning never lands inside a bar's line. No terminal to whoever asks, so core's
    own tqdm bars (disable=None) stay off instead of overwriting the parent's lines."""

    def __init__(self, queue, under):
        super().__init__()
        self._queue, self._under, self._part = queue, under, ""

    def write(self, text: str) -> int:
        *lines, self._part = (self._part + text).split("\n")
        for line in lines:
            self._queue.put(line.rsplit("\r", 1)[-1])
        return len(text)

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._under.fileno()


def _worker_init(env: dict[str, str], parent: int, relay=None) -> None:
    """A trial process: the parent's environment for trials, lines flushed as they are written (or relayed
    to the parent while it draws bars), and the parent in charge of stopping: Ctrl-C in a terminal reaches
    every process of the group, so trial processes ignore SIGINT and stop on the SIGTERM their parent sends
    (stop_trial_processes)."""
    global _IN_WORKER, _PARENT
    _IN_WORKER, _PARENT = True, parent
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_trial)
    die_with_parent(parent, signal.SIGTERM)  # a parent killed outright: this process stops too
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    if relay is not None:
        sys.stdout, sys.stderr = _LineRelay(relay, sys.stdout), _LineRelay(relay, sys.stderr)


@contextlib.contextmanager
def relayed_lines(log: Callable[[str], None], on: bool) -> Iterator[object]:
    """A queue for the trial processes' lines (_LineRelay) and a thread that hands each to log, while the
    block runs; None when off (the trial processes then write to the terminal or log file themselves)."""
    if not on:
        yield None
        return
    queue = mp.get_context("spawn").Queue()

    def drain() -> None:
        while (line := queue.get()) is not None:
            try:
                log(line)
            except Exception:  # a line that cannot be shown must not stop the others
                pass

    thread = threading.Thread(target=drain, name="trial-lines", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        queue.put(None)
        thread.join(5)


STOP_GRACE_S = 15.0  # how long stopped trial processes get to close their trials before they are killed


def stop_trial_processes(
    pool: cf.ProcessPoolExecutor, running: dict[cf.Future, Job], store: Store, study: str
) -> None:
    """Stop this process's trial processes: no new trial starts, each process running a trial gets
    SIGTERM (its trial closes itself as interrupted), and what is still alive after STOP_GRACE_S is
    killed (close_stopped then closes its trial)."""
    workers = list(mp.active_children())  # the pool's processes (spawned by multiprocessing)
    pool.shutdown(wait=False, cancel_futures=True)
    optuna_numbers = {job.optuna_number for fut, job in running.items() if not fut.done()}
    ours = {p.pid for p in workers}
    for t in store.trial_progress(study):
        if t.status == Status.RUNNING and t.optuna_number in optuna_numbers and t.pid in ours:
            try:
                os.kill(t.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    cf.wait([f for f in running if not f.done()], timeout=STOP_GRACE_S)
    for p in workers:
        if p.is_alive() and any(not f.done() for f in running):
            p.kill()
    for p in workers:
        p.join(5)


def run_study(
    plan: Plan,
    url: str,
    *,
    workers: int | None = 1,
    n_trials: int | None = None,
    retry_failed: bool = False,
    artifacts: str | None = None,
    log: Callable[[str], None] = print,
    events: TrialEvents | None = None,
) -> list[Outcome]:
    """Run (or resume) a study with Optuna (the studies.backend.Backend contract); returns this invocation's
    outcomes. workers: trials at once, each in its own process when more than 1 (1 or None: in this
    process). artifacts: the Optuna
    artifact store folder for the trials' galleries (None: no galleries). events: told when each trial
    starts and ends (studies.live). On KeyboardInterrupt (Ctrl-C; SIGTERM through studies.run) the trials
    of this process are stopped and closed as interrupted in both stores, their lines logged, and the
    KeyboardInterrupt re-raised."""
    store = get_store(url)
    ot = OptunaStudy.open(plan, store, log)
    disp = Dispatcher(ot, code_version(), n_trials, retry_failed, artifacts)
    outcomes: list[Outcome] = []
    active: dict[int, Job] = {}  # handed out, not ended: optuna_number -> job

    def start(job: Job) -> Job:
        active[job.optuna_number] = job
        if events is not None:
            events.started(job)
        return job

    def done(out: Outcome, job: Job) -> None:
        active.pop(job.optuna_number, None)
        outcomes.append(out)
        ot.logged(job, out)
        if events is not None:
            events.ended(job, out)

    try:
        if workers is None or workers <= 1:
            while (job := disp.next_job()) is not None:
                done(run_optuna_job(start(job)), job)
            return outcomes

        env = {k: v for k, v in os.environ.items() if k in ("STUDIES_TRIAL_FN", "AUXSEG_RUNS", "PYTHONPATH")}
        bars = bool(getattr(events, "terminal", False))  # the parent draws bars: the trials' lines go above
        with (
            relayed_lines(log, bars) as relay,
            cf.ProcessPoolExecutor(
                max_workers=workers,
                mp_context=mp.get_context("spawn"),
                initializer=_worker_init,
                initargs=(env, os.getpid(), relay),
            ) as pool,
        ):
            running: dict[cf.Future, Job] = {}
            try:
                while True:
                    while len(running) < workers and (job := disp.next_job()) is not None:
                        running[pool.submit(run_optuna_job, start(job))] = job
                    if not running:
                        break
                    finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                    for fut in finished:
                        job = running.pop(fut)
                        try:
                            out = fut.result()
                        except Exception as e:  # the worker process died: close the trial here
                            out = Outcome(
                                optuna_number=job.optuna_number, status=Status.INTERRUPTED, error=one_line(e)
                            )
                            ot.recover(quiet=True)  # its pid is dead: only its trial
                            disp.lost(job)
                        done(out, job)
            except KeyboardInterrupt:  # (another error waits for the running trials, which record themselves)
                with signals_held():
                    stop_trial_processes(pool, running, store, plan.study.name)
                raise
        return outcomes
    except KeyboardInterrupt:
        if active:
            with signals_held():
                for job, out in ot.close_stopped(list(active.values())):
                    done(out, job)
        raise
    finally:
        disp.close()
