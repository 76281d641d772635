"""The Optuna backend (default): one study = one Optuna study in the same database as the harness tables.

Ablations: this process claims the next grid point in the database (studies.execute: exactly once
across processes and machines), then creates its Optuna trial with the point's params fixed
(PartialFixedSampler), so no enqueued trial can be picked up by another process. Tuning: TPE (seeded)
+ a pruner fed with the per-stage metric. `workers` > 1 runs trials in that many spawned processes;
each process writes its trial to both Optuna's and the harness tables, so a killed parent loses
nothing finished.

The Optuna study glue here (open_study, tell, recover_optuna, make_sampler) is also the Ray backend's:
Ray Tune drives the same Optuna study through OptunaSearch.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from datetime import timezone
from typing import Any

import optuna
from optuna.trial import TrialState

from core.parallel import die_with_parent
from studies.db import code_version, pid_alive, retry_locked
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
    recover_harness,
    signals_held,
)
from studies.models import Status
from studies.plan import GridPoint, Plan
from studies.quality import COLLAPSED_MEANING, result_collapsed
from studies.store import Store, dig, finite


# ------------------------------------------------------------------------------------ optuna glue
def make_sampler(plan: Plan) -> optuna.samplers.BaseSampler:
    """The study's sampler. A grid trial's params are fixed per ask (fixed_sampler); this is its base."""
    s = plan.study
    if plan.is_grid:
        return optuna.samplers.RandomSampler(seed=0)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.sampler_seed)
    return optuna.samplers.TPESampler(seed=s.sampler_seed, n_startup_trials=min(10, max(2, s.n_trials // 4)))


def fixed_sampler(point: GridPoint) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():  # "experimental" since Optuna 2.4; its interface has not changed since
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.PartialFixedSampler(point.params, optuna.samplers.RandomSampler(seed=0))


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def study_spec_record(plan: Plan) -> dict:
    """What the store keeps of the study's spec: the YAML mapping, its name, and the last run's --set and
    --study-file (so that a report's reproduce line carries them, e.g. data.root)."""
    s = plan.study
    resolved = {"baseline": s.baseline} if s.kind == "ablation" else {}  # the YAML may leave it implicit
    where = {} if plan.study_file == "study.yaml" else {"_study_file": os.path.abspath(plan.study_file)}
    return {**s.raw, **resolved, "_name": s.name, "_cli_set": dict(plan.user_set), **where}


def open_study(plan: Plan, store: Store) -> optuna.Study:
    s = plan.study
    store.upsert_study(s.name, study_spec_record(plan), plan.preset)
    study = retry_locked(
        optuna.create_study,
        study_name=s.name,
        storage=store.optuna_storage(),
        sampler=make_sampler(plan),
        pruner=make_pruner("none" if plan.is_grid else s.pruner),
        direction=s.direction,
        load_if_exists=True,
    )
    attrs = {
        "kind": s.kind,
        "metric": s.metric,
        "stage_metric": s.stage_metric,
        "preset": plan.preset,
        "description": s.description,
        "paper_table": s.paper_table,
    }
    if "value_unit" not in study.user_attrs:
        # A study started before values were percent keeps fractions, so one study never mixes units.
        attrs["value_unit"] = "fraction" if study.get_trials(deepcopy=False) else PERCENT
    for k, v in attrs.items():
        if v is not None and v != "":
            retry_locked(study.set_user_attr, k, v)
    unit = "%" if attrs.get("value_unit", study.user_attrs.get("value_unit")) == PERCENT else "fraction"
    with warnings.catch_warnings():  # experimental since Optuna 3.2, unchanged since
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry_locked(study.set_metric_names, [f"{s.metric} ({unit})"])
    return study


PERCENT = "percent"


def value_scale(study: optuna.Study) -> float:
    """Optuna values (objective, intermediate values, metric user attributes) are percent, as in the
    CLI summary and the report; studies begun before that keep fractions (user attr value_unit)."""
    return 100.0 if study.user_attrs.get("value_unit", PERCENT) == PERCENT else 1.0


def ask_point(study: optuna.Study, plan: Plan, point: GridPoint) -> optuna.Trial:
    """A new RUNNING Optuna trial with the point's params. A WAITING trial left by an older harness
    (which enqueued points) would be popped first: such trials are failed and skipped."""
    study.sampler = fixed_sampler(point)
    for _ in range(100):
        trial = retry_locked(study.ask, plan.search_space())
        if trial.params == point.params:
            return trial
        retry_locked(study._storage.set_trial_user_attr, trial._trial_id, "error", "stale enqueued trial")
        retry_locked(study._storage.set_trial_state_values, trial._trial_id, TrialState.FAIL)
    raise RuntimeError(f"study {plan.study.name}: too many stale enqueued trials")


METRIC_ATTRS = {  # user attribute -> result.json leaf ("last." = the last stage's entry)
    "final_miou": "final.miou",
    "final_miou_post": "final.miou_post",
    "initial_pgt_precision": "initial_pgt.precision",
    "initial_pgt_recall": "initial_pgt.recall",
    "initial_pgt_miou": "initial_pgt.miou",
    "pgt_precision": "last.pgt.precision",
    "pgt_recall": "last.pgt.recall",
    "pgt_miou": "last.pgt.miou",
}


def trial_attrs(job: Job, out: Outcome) -> dict[str, Any]:
    """Optuna user attributes (what the dashboard shows beside the objective): the status, the error,
    whether the trial collapsed, the other metrics in the study's unit, and the timing. Nothing that is
    None, nothing that repeats a param (row, variant, seed of a grid point)."""
    r = out.result or {}
    scale = job.value_scale
    attrs: dict[str, Any] = {"status": out.status, "error": out.error, "collapsed": result_collapsed(r)}
    if not job.params.get("seed") and job.row == "trial":
        attrs["seed"] = job.seed  # a tuning trial's training seed is not one of its params
    if r:
        leaves = {"last": (r.get("stages") or [{}])[-1], **r}
        for name, path in METRIC_ATTRS.items():
            v = finite(dig(leaves, path))
            attrs[name] = None if v is None else round(v * scale, 4)
        for st in r.get("stages") or []:  # the whole-val value of every stage (the curve is the subset's)
            v = finite(dig(st, "val.miou"))
            if v is not None and "stage" in st:
                attrs[f"stage{int(st['stage'])}_val_miou"] = round(v * scale, 4)
        attrs["warmup_cached"] = dig(r, "warmup.cached")
        attrs["warmup_seconds"] = finite(dig(r, "warmup.seconds"))
        attrs["seconds"] = finite(r.get("seconds"))
    return {k: v for k, v in attrs.items() if v is not None}


def system_attrs(out: Outcome) -> dict[str, Any]:
    """Bookkeeping the dashboard need not show: the harness row of this trial and the host it ran on."""
    return {
        k: v for k, v in {"harness_id": out.harness_id, "host": socket.gethostname()}.items() if v is not None
    }


def tell(study: optuna.Study, job: Job, out: Outcome) -> None:
    """Close the Optuna trial (attributes first: Optuna refuses them on a finished trial). A trial that
    another process already closed (recover_optuna of a concurrent run) is left as it is."""
    try:
        _tell(study, job, out)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass


def _tell(study: optuna.Study, job: Job, out: Outcome) -> None:
    storage = study._storage
    for k, v in trial_attrs(job, out).items():
        retry_locked(storage.set_trial_user_attr, job.optuna_trial_id, k, v)
    for k, v in system_attrs(out).items():
        retry_locked(storage.set_trial_system_attr, job.optuna_trial_id, k, v)
    if out.status == Status.COMPLETE:
        retry_locked(study.tell, job.optuna_number, out.value * job.value_scale, skip_if_finished=True)
    else:
        state = TrialState.PRUNED if out.status == Status.PRUNED else TrialState.FAIL
        retry_locked(study.tell, job.optuna_number, state=state, skip_if_finished=True)


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


# ------------------------------------------------------------------------------- resume / faults
def recover_optuna(plan: Plan, store: Store, study: optuna.Study, grace_s: float | None = None) -> list[int]:
    """Close what a killed process left open, in the harness tables and in Optuna; return the Optuna
    numbers of the trials that were interrupted."""
    name = plan.study.name
    recover_harness(plan, store, grace_s)
    grace = 120.0 if grace_s is None else grace_s
    by_number = {t["optuna_number"]: t for t in store.trials(name)}
    host, now, failed = socket.gethostname(), time.time(), []
    for ft in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        h = by_number.get(ft.number)
        if h is not None and h["status"] == Status.RUNNING:
            continue  # alive (recover_harness kept it)
        owner = {**ft.user_attrs, **ft.system_attrs}  # user attrs: trials asked before this version
        if owner.get("owner_host") == host and owner.get("owner_pid") is not None:
            if pid_alive(owner["owner_pid"]):
                continue  # its process will tell Optuna itself
        else:  # another host's (or unknown) trial: leave it alone while it is recent
            if h is not None and h["finished_at"] is not None:  # the store keeps naive UTC
                last = h["finished_at"].replace(tzinfo=timezone.utc).timestamp()
            else:  # Optuna keeps naive local time
                last = ft.datetime_start.timestamp() if ft.datetime_start is not None else None
            if last is None or now - last < grace:
                continue
        if h is not None and h["status"] != Status.INTERRUPTED and ft.state == TrialState.RUNNING:
            # finished in the harness, its process killed before telling Optuna: tell now
            value = finite(dig(h["result"], plan.study.metric)) if h["status"] == Status.COMPLETE else None
            job = job_for_params(
                plan,
                ft.params,
                ft.number,
                url=store.url,
                optuna_trial_id=ft._trial_id,
                value_scale=value_scale(study),
            )
            out = Outcome(
                optuna_number=ft.number,
                status=h["status"],
                value=value,
                error=h["error"],
                harness_id=h["id"],
                result=h["result"],
            )
            tell(study, job, out)
            continue
        why = (h or {}).get("error") or "its process died before the trial started"
        if mark_interrupted(study, ft._trial_id, why):
            failed.append(ft.number)
    return failed


def mark_interrupted(study: optuna.Study, optuna_trial_id: int, why: str) -> bool:
    """Close a running Optuna trial as interrupted: FAIL, with user attributes status=interrupted and the
    error. False when it was closed meanwhile (by its own process)."""
    try:
        retry_locked(study._storage.set_trial_user_attr, optuna_trial_id, "error", why)
        retry_locked(study._storage.set_trial_user_attr, optuna_trial_id, "status", Status.INTERRUPTED)
        retry_locked(study._storage.set_trial_state_values, optuna_trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True


def close_stopped(
    plan: Plan, store: Store, study: optuna.Study, jobs: list[Job], why: str = STOPPED_BY_USER
) -> list[tuple[Job, Outcome]]:
    """After this process stopped its own trials (Ctrl-C, SIGTERM): close in both stores what they left
    open, as recover_optuna does for a dead process's trials on the next run. A harness trial still running
    becomes interrupted and its grid point is freed; an Optuna trial still running is told its harness
    trial's end (FAIL with status=interrupted, or the result of a trial that finished but was not told).
    Trials that closed themselves are left as they are. Returns each job's outcome."""
    rows = {t["optuna_number"]: t for t in store.trial_states(plan.study.name)}
    out = []
    for job in jobs:
        h = rows.get(job.optuna_number)
        status, error = (h["status"], h["error"]) if h is not None else (Status.INTERRUPTED, why)
        if h is not None and status == Status.RUNNING:
            store.finish_trial(h["id"], Status.INTERRUPTED, error=why)
            status, error = Status.INTERRUPTED, why
        if status == Status.INTERRUPTED and job.claim_owner is not None:
            store.release_claim(job.claim_owner, None)  # the point runs again on the next invocation
        o = Outcome(optuna_number=job.optuna_number, status=status, error=error,
                    harness_id=h["id"] if h is not None else None)  # fmt: skip
        if job.optuna_trial_id is not None:
            ft = retry_locked(study._storage.get_trial, job.optuna_trial_id)
            if ft.state == TrialState.RUNNING and status == Status.INTERRUPTED:
                mark_interrupted(study, ft._trial_id, error or why)
            elif ft.state == TrialState.RUNNING:  # finished in the harness, stopped before telling Optuna
                full = next(t for t in store.trials(plan.study.name) if t["id"] == o.harness_id)
                o.result = full["result"]
                o.value = finite(dig(o.result, plan.study.metric)) if status == Status.COMPLETE else None
                tell(study, job, o)
                o.result = None
        out.append((job, o))
    return out


def label_trial(trial: optuna.Trial, job: Job) -> None:
    """The trial's row and seed as its optuna-dashboard note, the first thing on its page: the dashboard's
    trial list shows only "Trial N" and its state, whatever the trial carries (its params row / variant /
    seed show on its page and in the trial table). A note that cannot be written is no error."""
    try:
        import optuna_dashboard

        text = f"seed {job.seed}" if job.row == "trial" else f"**{job.label}**, seed {job.seed}"
        retry_locked(optuna_dashboard.save_note, trial, text)
    except Exception:
        pass


def mark_owner(study: optuna.Study, optuna_trial_id: int) -> None:
    """Who asked for this trial (recover_optuna: is a trial that never started still someone's?)."""
    for k, v in {"owner_host": socket.gethostname(), "owner_pid": os.getpid()}.items():
        retry_locked(study._storage.set_trial_system_attr, optuna_trial_id, k, v)


def enqueue_interrupted(plan: Plan, store: Store, study: optuna.Study) -> None:
    """Tuning: each interrupted trial's parameters are asked again before any new ones (Optuna's
    RetryFailedTrialCallback idiom), so that the rerun resumes from the checkpoint that its parameters
    and seed name (execute.checkpoint_dir). Enqueued once across processes: a claim on
    ["resume", number] in the claims table."""
    name = plan.study.name
    for t in store.trials(name, status=Status.INTERRUPTED):
        if t["row"] != "trial":  # a grid point (e.g. a confirmation seed) reruns through its claim
            continue
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        if store.claim_point(name, json.dumps(["resume", t["optuna_number"]]), owner):
            retry_locked(study.enqueue_trial, t["params"], user_attrs={"resumes": t["optuna_number"]})
            store.release_claim(owner, Status.COMPLETE)


class Dispatcher:
    """Hands out the next trial: a claimed grid point (exactly once across processes), or the next
    sampled tuning trial."""

    def __init__(
        self,
        plan: Plan,
        store: Store,
        study: optuna.Study,
        cv: str,
        n_trials: int | None,
        retry_failed: bool,
        artifacts: str | None = None,
    ):
        self.plan, self.store, self.study, self.cv, self.artifacts = plan, store, study, cv, artifacts
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
                enqueue_interrupted(plan, store, study)

    def _mark_owner(self, trial: optuna.Trial) -> None:
        mark_owner(self.study, trial._trial_id)

    def next_job(self) -> Job | None:
        if self.budget <= 0:
            return None
        kw = {
            "url": self.store.url,
            "code_version": self.cv,
            "value_scale": value_scale(self.study),
            "artifacts": self.artifacts,
        }
        plan = self.plan
        if not plan.is_grid:
            trial = retry_locked(self.study.ask, plan.search_space())
            self._mark_owner(trial)
            self.budget -= 1
            job = job_for_params(plan, trial.params, trial.number, optuna_trial_id=trial._trial_id, **kw)
            label_trial(trial, job)
            return job
        got = self.keeper.claim_next(plan, self.retry_failed, skip=self.handed)
        if got is None:
            return None
        point, owner = got
        try:
            trial = ask_point(self.study, plan, point)
            self._mark_owner(trial)
        except BaseException:
            self.keeper.release(owner, None)
            raise
        self.handed.add(point.key)
        self.budget -= 1
        job = job_for_point(
            plan, point, trial.number, optuna_trial_id=trial._trial_id, claim_owner=owner, **kw
        )
        label_trial(trial, job)
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


class _NoTerminal:
    """A trial process's stderr while the parent draws its live progress: core's own tqdm bars
    (disable=None) see no terminal and stay off instead of overwriting the parent's lines; warnings and
    errors still go through."""

    def __init__(self, stream):
        self._stream = stream

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _worker_init(env: dict[str, str], parent: int, quiet: bool = False) -> None:
    """A trial process: the parent's environment for trials, lines flushed as they are written, and the
    parent in charge of stopping: Ctrl-C in a terminal reaches every process of the group, so trial
    processes ignore SIGINT and stop on the SIGTERM their parent sends (stop_trial_processes)."""
    global _IN_WORKER, _PARENT
    _IN_WORKER, _PARENT = True, parent
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_trial)
    die_with_parent(parent, signal.SIGTERM)  # a parent killed outright: this process stops too
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    if quiet:
        sys.stderr = _NoTerminal(sys.stderr)


STOP_GRACE_S = 15.0  # how long stopped trial processes get to close their trials before they are killed


def stop_trial_processes(
    pool: cf.ProcessPoolExecutor, running: dict[cf.Future, Job], store: Store, study: str
) -> None:
    """Stop this process's trial processes: no new trial starts, each process running a trial gets
    SIGTERM (its trial closes itself as interrupted), and what is still alive after STOP_GRACE_S is
    killed (close_stopped then closes its trial)."""
    workers = list(mp.active_children())  # the pool's processes (spawned by multiprocessing)
    pool.shutdown(wait=False, cancel_futures=True)
    numbers = {job.optuna_number for fut, job in running.items() if not fut.done()}
    ours = {p.pid for p in workers}
    for t in store.trial_states(study):
        if t["status"] == Status.RUNNING and t["optuna_number"] in numbers and t["pid"] in ours:
            try:
                os.kill(t["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
    cf.wait([f for f in running if not f.done()], timeout=STOP_GRACE_S)
    for p in workers:
        if p.is_alive() and any(not f.done() for f in running):
            p.kill()
    for p in workers:
        p.join(5)


def log_outcome(log: Callable[[str], None], metric: str, job: Job, out: Outcome) -> None:
    v = "" if out.value is None else f" {metric} {100 * out.value:.2f} %"
    extra = f" ({out.error})" if out.error else ""
    extra += f" [collapsed: {COLLAPSED_MEANING}]" if out.collapsed else ""
    log(f"[studies] trial #{job.optuna_number} {job.label} seed {job.seed}: {out.status}{v}{extra}")


def log_recovered(log: Callable[[str], None], numbers: list[int]) -> None:
    if numbers:
        log(
            f"[studies] marked {len(numbers)} interrupted trial(s): #{', #'.join(map(str, numbers))}; "
            "rerunning them"
        )


def run_study(
    plan: Plan,
    url: str,
    workers: int = 1,
    n_trials: int | None = None,
    retry_failed: bool = False,
    log: Callable[[str], None] = print,
    artifacts: str | None = None,
    events: TrialEvents | None = None,
) -> list[Outcome]:
    """Run (or resume) a study with Optuna; returns this invocation's outcomes. artifacts: the Optuna
    artifact store folder for the trials' galleries (None: no galleries). events: told when each trial
    starts and ends (studies.live). On KeyboardInterrupt (Ctrl-C; SIGTERM through studies.run) the trials
    of this process are stopped and closed as interrupted in both stores, their lines logged, and the
    KeyboardInterrupt re-raised."""
    store = get_store(url)
    study = open_study(plan, store)
    log_recovered(log, recover_optuna(plan, store, study))
    disp = Dispatcher(plan, store, study, code_version(), n_trials, retry_failed, artifacts)
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
        log_outcome(log, plan.study.metric, job, out)
        if events is not None:
            events.ended(job, out)

    try:
        if workers <= 1:
            while (job := disp.next_job()) is not None:
                done(run_optuna_job(start(job)), job)
            return outcomes

        env = {k: v for k, v in os.environ.items() if k in ("STUDIES_TRIAL_FN", "AUXSEG_RUNS", "PYTHONPATH")}
        quiet = bool(getattr(events, "terminal", False))  # the parent draws bars: the trials draw none
        with cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=mp.get_context("spawn"),
            initializer=_worker_init,
            initargs=(env, os.getpid(), quiet),
        ) as pool:
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
                            recover_optuna(plan, store, study)  # its pid is dead: only its trial
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
                for job, out in close_stopped(plan, store, study, list(active.values())):
                    done(out, job)
        raise
    finally:
        disp.close()
