"""The Optuna adapter that both backends use: one study = one Optuna study in the same database as the
harness tables.

Opening the study (sampler, pruner, user attributes, the value unit), closing trials the harness way
(tell: attributes, then the value or the state), recovering what a killed process left open
(recover_optuna, close_stopped), re-asking interrupted tuning trials (enqueue_interrupted), and the
per-trial log lines. studies.optuna_backend runs trials in a local process pool on it (`--backend
optuna`); studies.ray_backend has Ray Tune drive the same Optuna study through OptunaSearch
(`--backend ray`), so the dashboard and the report see one study whichever backend ran it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timezone
from typing import Any

import optuna
from optuna.trial import TrialState

from studies.db import pid_alive, retry_locked
from studies.execute import STOPPED_BY_USER, Job, Outcome, job_for_params, recover_harness
from studies.plan import GridPoint, Plan
from studies.quality import COLLAPSED_MEANING, result_collapsed
from studies.records import Status, dig, finite
from studies.store import Store


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
    resolved = {"baseline": s.baseline} if s.kind.is_grid else {}  # the YAML may leave it implicit
    where = {} if plan.study_file == "study.yaml" else {"_study_file": os.path.abspath(plan.study_file)}
    return {**s.raw, **resolved, "_name": s.name, "_cli_set": dict(plan.cli_overrides), **where}


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
        "kind": s.kind.value,
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


# ------------------------------------------------------------------------------- resume / faults
def recover_optuna(plan: Plan, store: Store, study: optuna.Study, grace_s: float | None = None) -> list[int]:
    """Close what a killed process left open, in the harness tables and in Optuna; return the Optuna
    numbers of the trials that were interrupted."""
    name = plan.study.name
    recover_harness(plan, store, grace_s)
    grace = 120.0 if grace_s is None else grace_s
    by_optuna_number = {t.optuna_number: t for t in store.trials(name)}
    host, now, failed = socket.gethostname(), time.time(), []
    for ft in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        h = by_optuna_number.get(ft.number)
        if h is not None and h.status == Status.RUNNING:
            continue  # alive (recover_harness kept it)
        owner = {**ft.user_attrs, **ft.system_attrs}  # user attrs: trials asked before this version
        if owner.get("owner_host") == host and owner.get("owner_pid") is not None:
            if pid_alive(owner["owner_pid"]):
                continue  # its process will tell Optuna itself
        else:  # another host's (or unknown) trial: leave it alone while it is recent
            if h is not None and h.finished_at is not None:  # the store keeps naive UTC
                last = h.finished_at.replace(tzinfo=timezone.utc).timestamp()
            else:  # Optuna keeps naive local time
                last = ft.datetime_start.timestamp() if ft.datetime_start is not None else None
            if last is None or now - last < grace:
                continue
        if h is not None and h.status != Status.INTERRUPTED and ft.state == TrialState.RUNNING:
            # finished in the harness, its process killed before telling Optuna: tell now
            value = finite(dig(h.result, plan.study.metric)) if h.status == Status.COMPLETE else None
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
                status=h.status,
                value=value,
                error=h.error,
                harness_id=h.harness_id,
                result=h.result,
            )
            tell(study, job, out)
            continue
        why = (h.error if h is not None else None) or "its process died before the trial started"
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
    rows = {t.optuna_number: t for t in store.trial_progress(plan.study.name)}
    out = []
    for job in jobs:
        h = rows.get(job.optuna_number)
        status, error = (h.status, h.error) if h is not None else (Status.INTERRUPTED, why)
        if h is not None and status == Status.RUNNING:
            store.finish_trial(h.harness_id, Status.INTERRUPTED, error=why)
            status, error = Status.INTERRUPTED, why
        if status == Status.INTERRUPTED and job.claim_owner is not None:
            store.release_claim(job.claim_owner, None)  # the point runs again on the next invocation
        o = Outcome(optuna_number=job.optuna_number, status=status, error=error,
                    harness_id=h.harness_id if h is not None else None)  # fmt: skip
        if job.optuna_trial_id is not None:
            ft = retry_locked(study._storage.get_trial, job.optuna_trial_id)
            if ft.state == TrialState.RUNNING and status == Status.INTERRUPTED:
                mark_interrupted(study, ft._trial_id, error or why)
            elif ft.state == TrialState.RUNNING:  # finished in the harness, stopped before telling Optuna
                full = next(t for t in store.trials(plan.study.name) if t.harness_id == o.harness_id)
                o.result = full.result
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
        if t.row != "trial":  # a grid point (e.g. a confirmation seed) reruns through its claim
            continue
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        if store.claim_point(name, json.dumps(["resume", t.optuna_number]), owner):
            retry_locked(study.enqueue_trial, t.params, user_attrs={"resumes": t.optuna_number})
            store.release_claim(owner, Status.COMPLETE)


def log_outcome(log: Callable[[str], None], metric: str, job: Job, out: Outcome) -> None:
    v = "" if out.value is None else f" {metric} {100 * out.value:.2f} %"
    extra = f" ({out.error})" if out.error else ""
    extra += f" [collapsed: {COLLAPSED_MEANING}]" if out.collapsed else ""
    log(f"[studies] trial #{job.optuna_number} {job.label} seed {job.seed}: {out.status}{v}{extra}")


def log_recovered(log: Callable[[str], None], optuna_numbers: list[int]) -> None:
    if optuna_numbers:
        log(
            f"[studies] marked {len(optuna_numbers)} interrupted trial(s): "
            f"#{', #'.join(map(str, optuna_numbers))}; "
            "rerunning them"
        )


@dataclass
class OptunaStudy:
    """A plan's Optuna study in its store, with what both backends do to it: opened with what a killed run
    left open recovered (open); each trial handed out owned (own) and labelled (label); each outcome told
    (tell) and logged (logged); this process's open trials closed after a stop (close_stopped)."""

    plan: Plan
    store: Store
    study: optuna.Study
    log: Callable[[str], None] = print

    @classmethod
    def open(cls, plan: Plan, store: Store, log: Callable[[str], None] = print) -> OptunaStudy:
        ot = cls(plan, store, open_study(plan, store), log)
        ot.recover()
        return ot

    def recover(self, quiet: bool = False) -> None:
        """Close what a dead process left open, in both stores, and log which trials run again (quiet: a
        worker this process saw die, whose trial its own line reports)."""
        numbers = recover_optuna(self.plan, self.store, self.study)
        if not quiet:
            log_recovered(self.log, numbers)

    @property
    def value_scale(self) -> float:
        return value_scale(self.study)

    def fix(self, point: GridPoint) -> None:
        """The next ask gets the grid point's params."""
        self.study.sampler = fixed_sampler(point)

    def own(self, trial: optuna.Trial) -> None:
        mark_owner(self.study, trial._trial_id)

    def label(self, trial: optuna.Trial, job: Job) -> None:
        label_trial(trial, job)

    def tell(self, job: Job, out: Outcome) -> None:
        tell(self.study, job, out)

    def logged(self, job: Job, out: Outcome) -> None:
        log_outcome(self.log, self.plan.study.metric, job, out)

    def enqueue_interrupted(self) -> None:
        enqueue_interrupted(self.plan, self.store, self.study)

    def close_stopped(self, jobs: list[Job]) -> list[tuple[Job, Outcome]]:
        return close_stopped(self.plan, self.store, self.study, jobs)
