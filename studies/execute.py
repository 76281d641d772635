"""What every backend shares: one trial from config to store, its heartbeat, grid-point claims, recovery.

    job = Job(study=..., url=..., preset=..., optuna_number=..., row=..., ...)   # keywords only
    out = execute(job, on_stage)          # config -> core.trial.run_trial -> harness tables -> Outcome
    owner = claim_next(plan, store, ...)  # exactly-once grid points across processes and machines

A grid point (row, variant, seed) runs only after its runner has taken the point's claim row in the
database (studies.store.Store.claim_point: a unique insert, or a compare-and-set takeover of a dead
claimant). The claimant's process keeps its claims fresh with a ClaimKeeper thread; the trial's own
process keeps the trial row fresh with a Heartbeat thread. Identifiers: `harness_id` is the row id of
harness_trials, `optuna_number` the trial's number in its Optuna study, `optuna_trial_id` Optuna's
storage id, `grid_index` a point's position in the study's grid.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna

from core.config import Config
from core.errors import HarnessError
from studies.plan import GridPoint, Plan
from studies.records import Status, dig, finite, group_label
from studies.store import Store, point_key

# The trial function: core.trial.run_trial unless injected (a test double: set TRIAL_FN, or
# STUDIES_TRIAL_FN="module:function" so that worker processes pick it up too).
TRIAL_FN: Callable | None = None
HEARTBEAT_S = 30.0


def trial_fn() -> Callable:
    if TRIAL_FN is not None:
        return TRIAL_FN
    spec = os.environ.get("STUDIES_TRIAL_FN")
    if spec:
        mod, _, name = spec.partition(":")
        return getattr(importlib.import_module(mod), name)
    from core.trial import run_trial

    return run_trial


class ClusterError(HarnessError):
    """The cluster cannot run the study as asked, e.g. no node holds one trial (one line, exit 2)."""


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")


@dataclass(kw_only=True)
class Job:
    """Everything one trial needs (picklable: it crosses into worker processes and Ray actors)."""

    study: str
    url: str
    preset: str
    optuna_number: int
    row: str
    variant: str | None = None
    seed: int
    params: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    config: Config  # the trial's config, as planning built it (studies.plan)
    metric: str
    stage_metric: str
    code_version: str = ""
    pruner: str = "none"
    optuna_trial_id: int | None = None
    claim_owner: str | None = None  # set for grid points: the claim this trial runs under
    value_scale: float = 100.0  # metric (a fraction) -> Optuna value (optuna_adapter.value_scale)
    artifacts: str | None = None  # Optuna artifact store folder for the trial's gallery (None: no gallery)

    @property
    def label(self) -> str:
        return group_label(self.row, self.variant)


@dataclass(kw_only=True)
class Outcome:
    optuna_number: int
    status: str  # complete | failed | pruned | interrupted
    value: float | None = None
    error: str | None = None
    harness_id: int | None = None
    result: dict | None = field(default=None, repr=False)
    collapsed: bool = False  # IoU 0 on every foreground class (studies.quality); set where result is dropped


def job_for_point(plan: Plan, point: GridPoint, optuna_number: int, **kw: Any) -> Job:
    s = plan.study
    return Job(
        study=s.name,
        preset=plan.preset,
        optuna_number=optuna_number,
        row=point.row,
        variant=point.variant,
        seed=point.seed,
        params=point.params,
        overrides=point.overrides,
        config=point.config,
        metric=s.metric,
        stage_metric=s.stage_metric,
        **kw,
    )


def job_for_params(plan: Plan, params: dict, optuna_number: int, **kw: Any) -> Job:
    """A tuning trial's job (or a grid trial's, found from its params)."""
    if plan.is_grid:
        return job_for_point(plan, plan.point_for_params(params), optuna_number, **kw)
    s = plan.study
    return Job(
        study=s.name,
        preset=plan.preset,
        optuna_number=optuna_number,
        row="trial",
        seed=s.seed,
        params=dict(params),
        overrides=plan.overrides_for_params(params),
        config=plan.config_for_params(params),
        metric=s.metric,
        stage_metric=s.stage_metric,
        pruner=s.pruner,
        **kw,
    )


_STORES: dict[str, Store] = {}


def get_store(url: str) -> Store:
    """One Store (engine + optuna storage) per process and URL."""
    if url not in _STORES:
        _STORES[url] = Store(url)
    return _STORES[url]


class _Beat:
    """Calls fn every HEARTBEAT_S seconds on a daemon thread until stop(); a missed beat is not an error."""

    def __init__(self, fn: Callable[[], None]):
        self._stop = threading.Event()
        self._fn = fn
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._fn()
            except Exception:  # the store is briefly unreachable: the next beat tries again
                pass

    def stop(self) -> None:
        self._stop.set()


class ClaimKeeper:
    """The claimant's side: takes grid points and keeps its claims fresh until their trials end."""

    def __init__(self, store: Store):
        self.store = store
        self._owners: set[str] = set()
        self._lock = threading.Lock()
        self._beat = _Beat(self._refresh)

    def _refresh(self) -> None:
        with self._lock:
            owners = sorted(self._owners)
        self.store.claim_heartbeat(owners)

    def claim_next(
        self, plan: Plan, retry_failed: bool, skip: set | frozenset = frozenset()
    ) -> tuple[GridPoint, str] | None:
        """The first grid point, longest trial first, not done, not running and not in skip that this call
        could claim; with adaptive seeds only among the points the study wants now (Plan.wanted_keys, read
        before the states, so a point it wants on an older read is still checked against the newer states)."""
        wanted = plan.wanted_keys(self.store.trials(plan.study.name)) if plan.adaptive else None
        done, running = point_states(plan, self.store, retry_failed)
        for p in plan.claim_order:
            if p.key in done or p.key in running or p.key in skip:
                continue
            if wanted is not None and p.key not in wanted:  # an added seed the rule does not ask for (yet)
                continue
            owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
            if self.store.claim_point(plan.study.name, point_key(*p.key), owner, retake_failed=retry_failed):
                with self._lock:
                    self._owners.add(owner)
                return p, owner
        return None

    def release(self, owner: str | None, status: str | None) -> None:
        """The trial under this claim ended with status (None: it never started, or its process died)."""
        if owner is None:
            return
        with self._lock:
            self._owners.discard(owner)
        self.store.release_claim(owner, status)

    def forget(self, owner: str) -> None:
        """Stop refreshing a claim that its trial has already released."""
        with self._lock:
            self._owners.discard(owner)

    def close(self) -> None:
        self._beat.stop()


def draws_curve(cfg: Any, stage_metric: str) -> bool:
    """Whether a trial's intermediate values are its learning curve: val mIoU on the fixed subset of
    eval.curve_images val images after each epoch, a stage's last included (core.trial's on_epoch). That
    needs a curve (eval.curve_images > 0) and val.miou as the stage metric."""
    return stage_metric == "val.miou" and cfg.eval.curve_images > 0


class TrialEvents(Protocol):
    """What a backend tells a live display (studies.live) about the trials it hands out."""

    def started(self, job: Job) -> None: ...

    def ended(self, job: Job, out: Outcome) -> None: ...


STOPPED_BY_USER = "stopped by the user (Ctrl-C or SIGTERM)"


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM ignored while the block runs (main thread only; elsewhere a no-op), so that a
    second Ctrl-C does not cut short the bookkeeping that the first one started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def execute(
    job: Job,
    on_stage: Callable[[int, float | None, dict], None] | None = None,
    pruned_types: tuple[type[BaseException], ...] = (optuna.TrialPruned,),
    on_begin: Callable[[int], None] | None = None,
) -> Outcome:
    """Run one trial and record it in the harness tables. on_stage(step, value, metrics) gets every
    intermediate value (step = global epoch), one measurement per trial: the learning curve on the val
    subset when the trial draws one (draws_curve), else the stage metric at each stage's last epoch. The
    whole-val stage values always go to the stage rows (and the result). on_stage may raise one of
    pruned_types to stop the trial (recorded as pruned). The claim (if any) is marked done (or freed, for
    an interrupted trial) once the trial row is closed."""
    store = get_store(job.url)
    cfg = job.config
    curve = draws_curve(cfg, job.stage_metric)
    harness_id = store.begin_trial(
        study=job.study,
        optuna_number=job.optuna_number,
        row=job.row,
        variant=job.variant,
        seed=job.seed,
        params=job.params,
        config=cfg.to_dict(),
        code_version=job.code_version,
    )
    if job.claim_owner is not None:
        store.claim_started(job.claim_owner, harness_id)
    beat = _Beat(lambda: store.heartbeat(harness_id))
    if on_begin is not None:
        on_begin(harness_id)

    def report(stage: int, metrics: dict) -> None:
        store.record_stage(harness_id, metrics)
        if on_stage is not None and not curve:  # a stage's value lands on the global epoch it ends on
            on_stage(metrics.get("epoch", stage), finite(dig(metrics, job.stage_metric)), metrics)

    def epoch(step: int, miou: float) -> None:  # learning-curve points (val mIoU on a fixed subset)
        if on_stage is not None and curve:
            on_stage(step, finite(miou), {"epoch": step, "val": {"miou": miou}, "curve": True})

    def close(status: str, result: dict | None = None, error: str | None = None) -> None:
        store.finish_trial(harness_id, status, result=result, error=error)
        if job.claim_owner is not None:
            store.release_claim(job.claim_owner, status)

    scratch = tempfile.mkdtemp(prefix="trial-artifacts-") if job.artifacts else None
    ckpt = checkpoint_dir(job, cfg)
    try:
        try:
            res = trial_fn()(cfg, report=report, on_epoch=epoch, artifacts_dir=scratch, checkpoint_dir=ckpt)
        except pruned_types as e:
            shutil.rmtree(ckpt, ignore_errors=True)  # a pruned trial is never resumed
            close(Status.PRUNED, error=str(e) or "pruned")
            return Outcome(
                optuna_number=job.optuna_number,
                status=Status.PRUNED,
                error=str(e) or "pruned",
                harness_id=harness_id,
            )
        except KeyboardInterrupt:
            with signals_held():
                close(Status.INTERRUPTED, error=STOPPED_BY_USER)
            raise
        except Exception as e:
            err = one_line(e)
            close(Status.FAILED, error=err)
            return Outcome(
                optuna_number=job.optuna_number, status=Status.FAILED, error=err, harness_id=harness_id
            )
        d = res.to_dict() if hasattr(res, "to_dict") else dict(res)
        if job.artifacts and (d.get("artifacts") or {}).get("gallery"):
            d["artifacts"] = {"gallery": upload_gallery(job, store, d["artifacts"]["gallery"])}
        value = finite(dig(d, job.metric))
        status, err = d.get("status", Status.COMPLETE), d.get("error")
        if status == Status.COMPLETE and value is None:
            status, err = Status.FAILED, f"metric {job.metric} is missing or not finite"
        close(status, result=d, error=err)
        return Outcome(
            optuna_number=job.optuna_number,
            status=status,
            value=value,
            error=err,
            harness_id=harness_id,
            result=d,
        )
    finally:
        beat.stop()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def checkpoint_dir(job: Job, cfg: Any) -> Path:
    """Where the trial of a job checkpoints itself, so that rerunning its grid point (or a tuning trial's
    parameters and seed) after a kill resumes there:
    runs/checkpoints/STUDY/store-<study's identity in its store>/<point>-<config fingerprint>.
    The store part keeps two stores that run the same study from one folder (a PostgreSQL study and a local
    SQLite try) from resuming, and then deleting, each other's checkpoints (issue #37); the fingerprint keeps
    a checkpoint from being resumed by a changed config (e.g. another preset). A Ray trial resolves runs/
    through AUXSEG_RUNS, which the driver sets to its own absolute runs/: resuming on another node needs that
    folder on storage every node reaches (README, Resuming)."""
    from core.checkpoint import config_fingerprint

    point = json.dumps([job.row, job.variant, job.seed, job.params], sort_keys=True, default=str)
    key = hashlib.sha256(point.encode()).hexdigest()[:12]
    return (
        study_checkpoints(job.study)
        / store_tag(get_store(job.url), job.study)
        / f"{key}-{config_fingerprint(cfg)}"
    )


def study_checkpoints(study: str) -> Path:
    """runs/checkpoints/STUDY: every store's checkpoints of the study, one store-* folder each."""
    from core.build import runs_dir

    return runs_dir() / "checkpoints" / study


STORE_PREFIX = "store-"


def store_tag(store: Store, study: str) -> str:
    """store-<12 hex>: the study's identity in this store, a hash of its row id and creation time as the
    store holds them. It names what owns the checkpoints, not where the store is: the URL would differ
    between hosts that reach one server by different names, and a moved SQLite file would lose its
    checkpoints; a new store (or the study deleted and created again) gets a new tag, so it never resumes
    checkpoints that another store's interrupted trials still need."""
    row = store.study(study)
    created = row.created_at.isoformat() if row.created_at is not None else ""
    ident = f"{store.study_id(study)}|{created}"
    return STORE_PREFIX + hashlib.sha256(ident.encode()).hexdigest()[:12]


def legacy_checkpoints(study: str) -> list[Path]:
    """Checkpoint folders of the layout before store tags (runs/checkpoints/STUDY/<point>-<fingerprint>):
    nothing says which store they belong to, so no run resumes or deletes them (studies.run notes them)."""
    folder = study_checkpoints(study)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(STORE_PREFIX))


def upload_gallery(job: Job, store: Store, path: str) -> str | None:
    """The trial's gallery PNG as an Optuna artifact (the dashboard shows it on the trial); returns its
    file in the artifact store, or None (logged) when the upload fails: a gallery never fails a trial."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    try:
        storage = store.optuna_storage()
        artifact_id = upload_artifact(
            artifact_store=FileSystemArtifactStore(job.artifacts),
            file_path=path,
            study_or_trial=storage.get_trial(job.optuna_trial_id),
            storage=storage,
            mimetype="image/png",
        )
        return str(Path(job.artifacts) / artifact_id)
    except Exception as e:
        print(f"[studies] warning: gallery of trial #{job.optuna_number} not uploaded: {one_line(e)}",
              file=sys.stderr)  # fmt: skip
        return None


# ------------------------------------------------------------------------------- resume / faults
def point_states(plan: Plan, store: Store, retry_failed: bool = False) -> tuple[set, set]:
    """(done, running) grid keys from the harness table. Interrupted trials count as not done; failed
    ones count as done unless retry_failed."""
    done, running = set(), set()
    for row, variant, seed, status in store.point_statuses(plan.study.name):
        if status in (Status.COMPLETE, Status.PRUNED) or (status == Status.FAILED and not retry_failed):
            done.add((row, variant, seed))
        elif status == Status.RUNNING:
            running.add((row, variant, seed))
    return done, running


def finished_count(plan: Plan, store: Store) -> int:
    """Tuning trials that count towards n_trials (everything but interrupted ones)."""
    return sum(1 for t in store.trials(plan.study.name) if t.status != Status.INTERRUPTED)


def recover_harness(plan: Plan, store: Store, grace_s: float | None = None) -> list[int]:
    """Mark what a killed process left running as interrupted; return those harness_ids. Their claims
    are taken over by the next claimant (their owner is dead or silent)."""
    return store.interrupt_dead(plan.study.name, **({} if grace_s is None else {"grace_s": grace_s}))
