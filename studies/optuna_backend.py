"""The Optuna backend (default): one study = one Optuna study in the same database as the harness tables.

Ablations: a GridSampler over {row, variant, seed}; this process enqueues each missing grid point and
asks for it right away, so with resume and N workers every point runs exactly once (Optuna's own
GridSampler may hand out duplicates under concurrency or resume). Tuning: TPE (seeded) + a pruner fed
with the per-stage metric. `workers` > 1 runs trials in that many spawned processes; each process
writes its trial to both Optuna's and the harness tables, so a killed parent loses nothing finished.

Shared with the Ray backend: Job, execute() (one trial: config -> run_trial -> store), recover().
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import math
import multiprocessing as mp
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from core.config import make_config
from studies.quality import COLLAPSED_MEANING, result_collapsed
from studies.spec import Plan
from studies.store import Store, code_version, pid_alive, retry_locked

# The trial function: core.trial.run_trial unless injected (a test double: set TRIAL_FN, or
# STUDIES_TRIAL_FN="module:function" so that worker processes pick it up too).
TRIAL_FN: Callable | None = None
HEARTBEAT_S = 30.0
INTERRUPTED = "interrupted (its process died while the trial was running)"


def trial_fn() -> Callable:
    if TRIAL_FN is not None:
        return TRIAL_FN
    spec = os.environ.get("STUDIES_TRIAL_FN")
    if spec:
        mod, _, name = spec.partition(":")
        return getattr(importlib.import_module(mod), name)
    from core.trial import run_trial

    return run_trial


def dig(d: Any, path: str) -> Any:
    """result.json leaf by dotted path ("final.miou"); None when missing."""
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")


@dataclass
class Job:
    """Everything one trial needs (picklable: it crosses into worker processes and Ray actors)."""

    study: str
    url: str
    preset: str
    number: int
    row: str
    variant: str | None
    seed: int
    params: dict
    overrides: dict
    metric: str
    stage_metric: str
    code_version: str
    pruner: str = "none"
    optuna_trial_id: int | None = None


@dataclass
class Outcome:
    number: int
    status: str  # complete | failed | pruned
    value: float | None
    error: str | None = None
    harness_id: int | None = None
    result: dict | None = field(default=None, repr=False)
    collapsed: bool = False  # IoU 0 on every foreground class (studies.quality); set where result is dropped


_STORES: dict[str, Store] = {}


def get_store(url: str) -> Store:
    """One Store (engine + optuna storage) per process and URL."""
    if url not in _STORES:
        _STORES[url] = Store(url)
    return _STORES[url]


class _Heartbeat:
    def __init__(self, store: Store, tid: int):
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(store, tid), daemon=True)
        self._t.start()

    def _run(self, store: Store, tid: int) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                store.heartbeat(tid)
            except Exception:  # a missed heartbeat is not worth failing a trial for
                pass

    def stop(self) -> None:
        self._stop.set()


def execute(
    job: Job,
    on_stage: Callable[[int, float | None, dict], None] | None = None,
    pruned_types: tuple[type[BaseException], ...] = (optuna.TrialPruned,),
    on_begin: Callable[[int], None] | None = None,
) -> Outcome:
    """Run one trial and record it in the harness tables. on_stage(stage, stage_metric, metrics) may raise
    one of pruned_types to stop the trial (recorded as pruned)."""
    store = get_store(job.url)
    cfg = make_config(job.preset, job.overrides)
    tid = store.begin_trial(
        study=job.study,
        number=job.number,
        row=job.row,
        variant=job.variant,
        seed=job.seed,
        params=job.params,
        config=cfg.to_dict(),
        code_version=job.code_version,
    )
    hb = _Heartbeat(store, tid)
    if on_begin is not None:
        on_begin(tid)

    def report(stage: int, metrics: dict) -> None:
        store.record_stage(tid, metrics)
        if on_stage is not None:
            on_stage(stage, finite(dig(metrics, job.stage_metric)), metrics)

    try:
        try:
            res = trial_fn()(cfg, report=report)
        except pruned_types as e:
            store.finish_trial(tid, "pruned", error=str(e) or "pruned")
            return Outcome(job.number, "pruned", None, str(e) or "pruned", tid)
        except Exception as e:
            err = one_line(e)
            store.finish_trial(tid, "failed", error=err)
            return Outcome(job.number, "failed", None, err, tid)
        d = res.to_dict() if hasattr(res, "to_dict") else dict(res)
        value = finite(dig(d, job.metric))
        status, err = d.get("status", "complete"), d.get("error")
        if status == "complete" and value is None:
            status, err = "failed", f"metric {job.metric} is missing or not finite"
        store.finish_trial(tid, status, result=d, error=err)
        return Outcome(job.number, status, value, err, tid, d)
    finally:
        hb.stop()


# ------------------------------------------------------------------------------------ optuna glue
class HarnessGridSampler(optuna.samplers.GridSampler):
    """GridSampler whose points are always enqueued by the harness: an enqueued trial gets the grid id of
    its fixed params (so Optuna's view of the grid stays right), and the sampler never stops a study."""

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        fixed = trial.system_attrs.get("fixed_params")
        if fixed is not None and "grid_id" not in trial.system_attrs:
            key = tuple(fixed.get(n) for n in self._param_names)
            if key in self._all_grids:
                study._storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
                study._storage.set_trial_system_attr(trial._trial_id, "grid_id", self._all_grids.index(key))
            return
        super().before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:  # the harness decides when a grid is done
        return None


def make_sampler(plan: Plan) -> optuna.samplers.BaseSampler:
    s = plan.study
    if plan.is_grid:
        return HarnessGridSampler(plan.grid_values(), seed=0)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.sampler_seed)
    return optuna.samplers.TPESampler(seed=s.sampler_seed, n_startup_trials=min(10, max(2, s.n_trials // 4)))


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def open_study(plan: Plan, store: Store) -> optuna.Study:
    s = plan.study
    study = retry_locked(
        optuna.create_study,
        study_name=s.name,
        storage=store.optuna_storage(),
        sampler=make_sampler(plan),
        pruner=make_pruner("none" if plan.is_grid else s.pruner),
        direction=s.direction,
        load_if_exists=True,
    )
    for k, v in {
        "kind": s.kind,
        "metric": s.metric,
        "stage_metric": s.stage_metric,
        "preset": plan.preset,
        "description": s.description,
        "paper_table": s.paper_table,
    }.items():
        retry_locked(study.set_user_attr, k, v)
    return study


def trial_attrs(job: Job, out: Outcome) -> dict[str, Any]:
    """Optuna user attributes: the metrics that are not the objective (visible in the dashboard)."""
    r = out.result or {}
    last = (r.get("stages") or [{}])[-1] if r else {}
    attrs: dict[str, Any] = {
        "status": out.status,
        "error": out.error,
        "harness_trial_id": out.harness_id,
        "row": job.row,
        "variant": job.variant,
        "seed": job.seed,
        "host": socket.gethostname(),
        "collapsed": result_collapsed(r),
    }
    if r:
        attrs.update(
            {
                "final_miou": finite(dig(r, "final.miou")),
                "miou_post": finite(dig(r, "final.miou_post")),
                "initial_pgt_precision": finite(dig(r, "initial_pgt.precision")),
                "initial_pgt_recall": finite(dig(r, "initial_pgt.recall")),
                "initial_pgt_miou": finite(dig(r, "initial_pgt.miou")),
                "pgt_precision": finite(dig(last, "pgt.precision")),
                "pgt_recall": finite(dig(last, "pgt.recall")),
                "pgt_miou": finite(dig(last, "pgt.miou")),
                "warmup_cached": dig(r, "warmup.cached"),
                "warmup_seconds": finite(dig(r, "warmup.seconds")),
                "seconds": finite(r.get("seconds")),
            }
        )
    return attrs


def tell(study: optuna.Study, job: Job, out: Outcome) -> None:
    storage = study._storage
    tid = job.optuna_trial_id
    for k, v in trial_attrs(job, out).items():
        retry_locked(storage.set_trial_user_attr, tid, k, v)
    if out.status == "complete":
        retry_locked(study.tell, job.number, out.value, skip_if_finished=True)
    else:
        state = TrialState.PRUNED if out.status == "pruned" else TrialState.FAIL
        retry_locked(study.tell, job.number, state=state, skip_if_finished=True)


def run_optuna_job(job: Job) -> Outcome:
    """One trial in this process: report stages to Optuna (pruning), record everything, tell."""
    store = get_store(job.url)
    study = optuna.load_study(
        study_name=job.study, storage=store.optuna_storage(), pruner=make_pruner(job.pruner)
    )
    trial = optuna.trial.Trial(study, job.optuna_trial_id)

    def on_stage(stage: int, value: float | None, metrics: dict) -> None:
        if value is None:
            return
        retry_locked(trial.report, value, stage)
        if job.pruner != "none" and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at stage {stage} ({job.stage_metric} {value:.4f})")

    try:
        out = execute(job, on_stage)
    except Exception as e:  # config/store trouble outside the trial itself: still close the Optuna trial
        out = Outcome(job.number, "failed", None, one_line(e))
    tell(study, job, out)
    return Outcome(
        out.number,
        out.status,
        out.value,
        out.error,
        out.harness_id,  # result stays in the DB
        collapsed=result_collapsed(out.result),
    )


# ------------------------------------------------------------------------------- resume / faults
def recover(plan: Plan, store: Store, study: optuna.Study, grace_s: float = 120.0) -> list[int]:
    """Fail what a killed process left running (harness + Optuna); return the Optuna numbers failed."""
    name = plan.study.name
    live = store.live_running(name, grace_s=grace_s)
    store.mark_stale_running(name, keep=live)
    by_number = {t["optuna_number"]: t for t in store.trials(name)}
    host, now, failed = socket.gethostname(), time.time(), []
    for ft in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        h = by_number.get(ft.number)
        if h is not None and h["status"] == "running":
            continue  # alive (checked above)
        if h is not None and h["status"] in ("complete", "pruned") and ft.state == TrialState.RUNNING:
            # finished in the harness, killed before telling Optuna: tell now
            value = finite(dig(h["result"], plan.study.metric)) if h["status"] == "complete" else None
            job = Job(
                name,
                store.url,
                plan.preset,
                ft.number,
                h["row"],
                h["variant"],
                h["seed"],
                {},
                {},
                plan.study.metric,
                plan.study.stage_metric,
                h["code_version"],
                optuna_trial_id=ft._trial_id,
            )
            tell(study, job, Outcome(ft.number, h["status"], value, h["error"], h["id"], h["result"]))
            continue
        if h is None:  # asked but never started: whose was it?
            owner_host, owner_pid = ft.user_attrs.get("owner_host"), ft.user_attrs.get("owner_pid")
            if owner_host == host and owner_pid is not None:
                if pid_alive(owner_pid):
                    continue
            elif ft.datetime_start is None or (now - ft.datetime_start.timestamp()) < grace_s:
                continue
        retry_locked(study._storage.set_trial_user_attr, ft._trial_id, "error", INTERRUPTED)
        retry_locked(study._storage.set_trial_user_attr, ft._trial_id, "status", "failed")
        retry_locked(study._storage.set_trial_state_values, ft._trial_id, TrialState.FAIL)
        failed.append(ft.number)
    return failed


def point_states(plan: Plan, store: Store, retry_failed: bool = False) -> tuple[set, set]:
    """(done, running) grid keys from the harness table. Interrupted trials count as not done; other
    failures count as done unless retry_failed."""
    done, running = set(), set()
    for t in store.trials(plan.study.name):
        key = (t["row"], t["variant"], t["seed"])
        if t["status"] in ("complete", "pruned"):
            done.add(key)
        elif t["status"] == "running":
            running.add(key)
        elif (
            t["status"] == "failed" and not retry_failed and not (t["error"] or "").startswith("interrupted")
        ):
            done.add(key)
    return done, running


def finished_count(plan: Plan, store: Store) -> int:
    """Tuning trials that count towards n_trials (everything but interrupted ones)."""
    return sum(
        1
        for t in store.trials(plan.study.name)
        if t["status"] != "failed" or not (t["error"] or "").startswith("interrupted")
    )


class Dispatcher:
    """Hands out the next trial: asks Optuna for it in this process only, so no point is handed out twice."""

    def __init__(
        self, plan: Plan, store: Store, study: optuna.Study, cv: str, n_trials: int | None, retry_failed: bool
    ):
        self.plan, self.store, self.study, self.cv = plan, store, study, cv
        self.retry_failed = retry_failed
        self.space = plan.search_space()
        self.handed: set = set()
        if plan.is_grid:
            self.budget = n_trials if n_trials is not None else len(plan.points)
        else:
            target = n_trials if n_trials is not None else plan.study.n_trials
            self.budget = max(0, target - finished_count(plan, store))

    def next_job(self) -> Job | None:
        if self.budget <= 0:
            return None
        plan = self.plan
        if plan.is_grid:
            done, running = point_states(plan, self.store, self.retry_failed)
            todo = [p for p in plan.points if p.key not in done | running | self.handed]
            if not todo:
                return None
            retry_locked(self.study.enqueue_trial, todo[0].params)
        trial = retry_locked(self.study.ask, self.space)
        for k, v in {"owner_host": socket.gethostname(), "owner_pid": os.getpid()}.items():
            retry_locked(trial.set_user_attr, k, v)
        self.budget -= 1
        if plan.is_grid:
            point = plan.point_for_params(trial.params)  # ours, or another process's enqueued point
            self.handed.add(point.key)
            row, variant, seed, overrides = point.row, point.variant, point.seed, point.overrides
            pruner = "none"
        else:
            row, variant, seed = "trial", None, plan.study.seed
            overrides = plan.overrides_for_params(trial.params)
            pruner = plan.study.pruner
        return Job(
            plan.study.name,
            self.store.url,
            plan.preset,
            trial.number,
            row,
            variant,
            seed,
            dict(trial.params),
            overrides,
            plan.study.metric,
            plan.study.stage_metric,
            self.cv,
            pruner,
            trial._trial_id,
        )


def _worker_init(env: dict[str, str]) -> None:
    os.environ.update(env)


def run_study(
    plan: Plan,
    url: str,
    workers: int = 1,
    n_trials: int | None = None,
    retry_failed: bool = False,
    log: Callable[[str], None] = print,
) -> list[Outcome]:
    """Run (or resume) a study with Optuna; returns this invocation's outcomes."""
    store = get_store(url)
    store.upsert_study(
        plan.study.name,
        {**{k: v for k, v in plan.study.raw.items() if k != "__lines__"}, "_name": plan.study.name},
        plan.preset,
    )
    study = open_study(plan, store)
    failed = recover(plan, store, study)
    if failed:
        log(
            f"[studies] marked {len(failed)} interrupted trial(s) failed: #{', #'.join(map(str, failed))}; rerunning them"
        )
    disp = Dispatcher(plan, store, study, code_version(), n_trials, retry_failed)
    outcomes: list[Outcome] = []

    def done(out: Outcome, job: Job) -> None:
        outcomes.append(out)
        v = "" if out.value is None else f" {plan.study.metric}={out.value:.4f}"
        extra = f" ({out.error})" if out.error else ""
        extra += f" [collapsed: {COLLAPSED_MEANING}]" if out.collapsed else ""
        label = job.row + (f"/{job.variant}" if job.variant else "")
        log(f"[studies] trial #{job.number} {label} seed {job.seed}: {out.status}{v}{extra}")

    if workers <= 1:
        while (job := disp.next_job()) is not None:
            done(run_optuna_job(job), job)
        return outcomes

    env = {k: v for k, v in os.environ.items() if k in ("STUDIES_TRIAL_FN", "AUXSEG_RUNS", "PYTHONPATH")}
    with cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(env,)
    ) as pool:
        running: dict[cf.Future, Job] = {}
        while True:
            while len(running) < workers and (job := disp.next_job()) is not None:
                running[pool.submit(run_optuna_job, job)] = job
            if not running:
                break
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                try:
                    out = fut.result()
                except Exception as e:  # the worker process died: close the trial here
                    out = Outcome(job.number, "failed", None, one_line(e))
                    recover(plan, store, study, grace_s=0.0)
                done(out, job)
    return outcomes
