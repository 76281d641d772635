"""The Ray Tune backend (`--backend ray`): the path to many GPUs and machines.

Tuner + OptunaSearch on the same Optuna study and storage as the Optuna backend (so the dashboard and
the report see one study whichever backend ran it), ASHA for tuning studies. For ablations the
searcher claims each grid point in the database before Ray schedules it (studies.execute: the same
exactly-once claim as the Optuna backend, so several drivers, of either backend, can share a study).
Each Ray trial calls the same execute() -> run_trial and writes its harness rows itself, on whichever
node it runs; the driver tells Optuna and closes trials that ASHA stopped (pruned) or whose node died
(interrupted: the next run reruns them).

Resources per trial come from the cluster (the smallest node's CPUs, or --cpus-per-trial), never from
this machine's core count; a request no node can satisfy is an error before any trial. On a cluster
(`--address`), every node needs this code and the data path, and the storage URL must be reachable
from every node (PostgreSQL; SQLite only works when all nodes run on this machine).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from studies.db import code_version, is_sqlite, retry_locked
from studies.execute import (
    ClaimKeeper,
    ClusterError,
    Job,
    Outcome,
    TrialEvents,
    execute,
    finished_count,
    get_store,
    job_for_params,
    one_line,
    point_states,
    signals_held,
)
from studies.optuna_adapter import OptunaStudy, make_sampler
from studies.plan import Plan
from studies.quality import result_collapsed
from studies.records import Status, StoredTrial, finite


def absolute_url(url: str) -> str:
    """Ray workers may run in another directory: pin a relative SQLite path to this one."""
    if not is_sqlite(url):
        return url
    u = sa.engine.make_url(url)
    if u.database and u.database != ":memory:" and not os.path.isabs(u.database):
        u = u.set(database=str(Path(u.database).resolve()))
    return u.render_as_string(hide_password=False)


def trial_resources(
    nodes: list[dict], cpus_per_trial: float | None, gpus_per_trial: float, where: str
) -> tuple[float, float, int]:
    """(cpus, gpus) per trial and the number of trials the cluster can run at once, from its alive
    nodes' resources (ray.nodes()); ClusterError when no node can hold one trial."""
    alive = [n.get("Resources") or {} for n in nodes if n.get("Alive")]
    cpus_by_node = [float(r.get("CPU", 0)) for r in alive]
    if not alive:
        raise ClusterError(f"the Ray cluster at {where} has no alive node")
    cpus = cpus_per_trial if cpus_per_trial else max(1.0, min(c for c in cpus_by_node) or 1.0)
    fits = [r for r in alive if float(r.get("CPU", 0)) >= cpus and float(r.get("GPU", 0)) >= gpus_per_trial]
    if not fits:
        have = ", ".join(
            f"{float(r.get('CPU', 0)):g} CPU" + (f" {float(r.get('GPU', 0)):g} GPU" if r.get("GPU") else "")
            for r in alive
        )
        raise ClusterError(
            f"no node of the Ray cluster at {where} can hold a trial of {cpus:g} CPU"
            + (f" + {gpus_per_trial:g} GPU" if gpus_per_trial else "")
            + f" (nodes: {have}); lower --cpus-per-trial / --gpus-per-trial"
        )
    slots = sum(
        min(
            math.floor(float(r.get("CPU", 0)) / cpus),
            math.floor(float(r.get("GPU", 0)) / gpus_per_trial) if gpus_per_trial else 10**6,
        )
        for r in fits
    )
    return cpus, gpus_per_trial, max(1, slots)


LOOK_S = 2.0  # adaptive seeds: how often a waiting searcher reads the store for newly wanted seeds


class HarnessSearch(OptunaSearch):
    """OptunaSearch that claims grid points, passes the Optuna trial number on, reports per stage, and
    closes trials the harness way (complete / failed / pruned by ASHA / interrupted) in both Optuna and
    the harness tables."""

    def setup_harness(
        self,
        plan: Plan,
        store: Any,
        log: Callable[[str], None],
        retry_failed: bool,
        budget: int,
        events: TrialEvents | None = None,
    ) -> None:
        self.h_plan, self.h_store, self.h_log, self.h_events = plan, store, log, events
        # The searcher's own Optuna study (OptunaSearch asks and tells on it), driven the harness way.
        self.h_ot = OptunaStudy(plan, store, self._ot_study, log)
        self.h_retry_failed, self.h_budget = retry_failed, budget
        self.h_keeper = ClaimKeeper(store) if plan.is_grid else None
        self.h_handed: set = set()
        self.h_jobs: dict[str, Job] = {}  # Ray trial id -> job
        self.h_outcomes: list[Outcome] = []
        self.h_look_after = 0.0  # adaptive seeds: when suggest may read the store again

    def __getstate__(self) -> dict:  # the Tuner pickles its config; the live study and store stay here
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:  # resuming is the harness's job (the store), not Ray's
        raise NotImplementedError

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError

    def suggest(self, trial_id: str):
        if self.h_budget <= 0:
            return Searcher.FINISHED
        plan, owner = self.h_plan, None
        if plan.is_grid:
            if plan.adaptive and time.time() < self.h_look_after:
                return None  # Ray asks many times a second: look at the store every LOOK_S seconds
            got = self.h_keeper.claim_next(plan, self.h_retry_failed, skip=self.h_handed)
            if got is None and plan.adaptive and self.unfinished():
                self.h_look_after = time.time() + LOOK_S
                return None  # adaptive seeds: the running trials may ask for more; Ray asks again later
            if got is None:
                return Searcher.FINISHED
            point, owner = got
            self.h_handed.add(point.key)
            self.h_ot.fix(point)
        try:
            cfg = super().suggest(trial_id)
        except BaseException:
            if owner is not None:
                self.h_keeper.release(owner, None)
            raise
        ot = self._ot_trials[trial_id]
        self.h_ot.own(ot)
        self.h_budget -= 1
        self.h_jobs[trial_id] = job_for_params(
            plan,
            dict(ot.params),
            ot.number,
            url=self.h_store.url,
            optuna_trial_id=ot._trial_id,
            claim_owner=owner,
            value_scale=self.h_ot.value_scale,
        )
        self.h_ot.label(ot, self.h_jobs[trial_id])
        if self.h_events is not None:
            self.h_events.started(self.h_jobs[trial_id])
        return {
            **cfg,
            "_optuna_number": ot.number,
            "_optuna_trial_id": ot._trial_id,
            "_claim_owner": owner,
            "_value_scale": self.h_ot.value_scale,
        }

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if result.get("final") or trial_id in self._completed_trials:
            return
        scale = self.h_jobs[trial_id].value_scale
        retry_locked(self._ot_trials[trial_id].report, result["score"] * scale, result["stage"])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        self._completed_trials.add(trial_id)
        job, result = self.h_jobs[trial_id], result or {}
        harness_id = result.get("harness_id")
        if result.get("final"):  # the trial closed its own rows and claim
            row = self._harness_row(job) if harness_id is not None else None
            out = Outcome(
                optuna_number=job.optuna_number,
                status=result["status"],
                value=finite(result.get("value")),
                error=result.get("error"),
                harness_id=harness_id,
            )
            if self.h_keeper is not None and job.claim_owner:
                self.h_keeper.forget(job.claim_owner)
        else:
            if error:  # the trial's process or node died: rerun on the next invocation
                status, why = Status.INTERRUPTED, "its Ray worker or node died while the trial was running"
            else:
                status, why = Status.PRUNED, f"stopped by ASHA after epoch {result.get('stage')}"
            out = Outcome(optuna_number=job.optuna_number, status=status, error=why, harness_id=harness_id)
            row = self._harness_row(job)  # the trial may have died before it told the driver its id
            if row is not None and row.status == Status.RUNNING:
                retry_locked(self.h_store.finish_trial, row.harness_id, status, error=why)
            out.harness_id = row.harness_id if row is not None else harness_id
            if self.h_keeper is not None:
                self.h_keeper.release(job.claim_owner, status)
        out.result = row.result if row is not None else None  # the user attrs read the stored result
        out.collapsed = result_collapsed(out.result)
        try:
            if result.get("node"):  # before tell(): Optuna refuses attributes on a finished trial
                storage = self._ot_study._storage
                retry_locked(storage.set_trial_user_attr, job.optuna_trial_id, "ray_node", result["node"])
            self.h_ot.tell(job, out)
        except Exception as e:
            self.h_log(f"[studies] could not tell Optuna about trial #{job.optuna_number}: {one_line(e)}")
        self.h_outcomes.append(out)
        self.h_ot.logged(job, out)
        if self.h_events is not None:
            self.h_events.ended(job, out)

    def unfinished(self) -> list[Job]:
        """The jobs this driver handed to Ray whose trials it has not closed."""
        return [j for ray_trial_id, j in self.h_jobs.items() if ray_trial_id not in self._completed_trials]

    def _harness_row(self, job: Job) -> StoredTrial | None:
        """The harness row of job's trial (by its Optuna number), as Store.trials gives it."""
        for t in self.h_store.trials(job.study):
            if t.optuna_number == job.optuna_number:
                return t
        return None

    def close(self) -> None:
        if self.h_keeper is not None:
            self.h_keeper.close()


def _make_trainable(plan: Plan, url: str, cv: str, artifacts: str | None) -> Callable[[dict], None]:
    def trainable(config: dict) -> None:
        import ray
        from ray import tune

        params = {k: v for k, v in config.items() if not k.startswith("_")}
        job = job_for_params(
            plan,
            params,
            config["_optuna_number"],
            url=url,
            code_version=cv,
            optuna_trial_id=config["_optuna_trial_id"],
            claim_owner=config.get("_claim_owner"),
            value_scale=config.get("_value_scale", 100.0),
            artifacts=artifacts,
        )
        node = ray.get_runtime_context().get_node_id()
        state: dict[str, Any] = {"harness_id": None, "last": 0.0}

        def on_stage(step: int, value: float | None, metrics: dict) -> None:
            if value is not None:
                state["last"] = value
            tune.report(
                {"score": state["last"], "stage": step, "final": False, "harness_id": state["harness_id"]}
            )

        out = execute(job, on_stage, on_begin=lambda harness_id: state.update(harness_id=harness_id))
        tune.report(
            {
                "score": out.value if out.value is not None else state["last"],
                "stage": -1,
                "final": True,
                "status": out.status,
                "error": out.error,
                "value": out.value,
                "harness_id": out.harness_id,
                "node": node,
            }
        )

    return trainable


def run_study(
    plan: Plan,
    url: str,
    *,
    workers: int | None = None,
    n_trials: int | None = None,
    retry_failed: bool = False,
    artifacts: str | None = None,
    log: Callable[[str], None] = print,
    events: TrialEvents | None = None,
    address: str | None = None,
    cpus_per_trial: float | None = None,
    gpus_per_trial: float = 0.0,
    user_keys: set[str] | frozenset[str] = frozenset(),
    ray_init: dict | None = None,
) -> list[Outcome]:
    """Run (or resume) a study with Ray Tune on this machine (address None) or a running cluster; returns
    this invocation's outcomes. The leading parameters are studies.optuna_backend.run_study's. workers:
    trials at once (default: as many as the cluster's nodes can hold). artifacts: the Optuna artifact
    store folder for the trials' galleries (None: no galleries). events: told when each trial starts and
    ends (studies.live). user_keys: config keys the user set, so that per-trial thread counts are only
    derived from the resources when unset. ray_init: extra ray.init arguments. On KeyboardInterrupt
    (SIGTERM through studies.run) Ray is shut down first (a local one) and this driver's open trials are
    closed as interrupted in both stores."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    url = absolute_url(url)
    s = plan.study
    repo = str(Path(__file__).resolve().parents[1])
    env = {
        "RAY_CHDIR_TO_TRIAL_DIR": "0",
        "AUXSEG_RUNS": str(Path(os.environ.get("AUXSEG_RUNS", "runs")).resolve()),
        "PYTHONPATH": os.pathsep.join(x for x in (repo, os.environ.get("PYTHONPATH", "")) if x),
    }
    if os.environ.get("STUDIES_TRIAL_FN"):
        env["STUDIES_TRIAL_FN"] = os.environ["STUDIES_TRIAL_FN"]
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    started = False
    if not ray.is_initialized():
        kw = dict(
            address=address,
            include_dashboard=False,
            runtime_env={"env_vars": env},
            log_to_driver=False,
            configure_logging=False,
        )
        kw.update(ray_init or {})
        try:
            ray.init(**kw)
        except ConnectionError as e:
            hint = (
                ""
                if os.environ.get("RAY_AUTH_MODE")
                else "; with token authentication set RAY_AUTH_MODE=token"
            )
            raise ClusterError(
                f"cannot connect to the Ray cluster at {address}: {one_line(e)}{hint}"
            ) from None
        started = True
    searcher = None
    try:
        # The cluster is checked before the study is touched: a request no node can hold changes nothing.
        cpus, gpus, slots = trial_resources(ray.nodes(), cpus_per_trial, gpus_per_trial, address or "local")
        store = get_store(url)
        ot = OptunaStudy.open(plan, store, log)
        if plan.is_grid:
            done, running = point_states(plan, store, retry_failed)
            num = len([p for p in plan.points if p.key not in done | running])
            num = min(num, n_trials) if n_trials is not None else num
        else:
            num = max(0, (n_trials if n_trials is not None else s.n_trials) - finished_count(plan, store))
            if num:
                ot.enqueue_interrupted()  # the searcher asks their parameters first
        if num == 0:
            log("[studies] nothing to run: every trial of this study is finished")
            return []
        derived = {k: max(1, int(cpus)) for k in ("train.threads", "train.workers") if k not in user_keys}
        plan = plan.derive({**plan.derived_overrides, **derived})  # each trial's threads from its resources
        mode = "max" if s.direction == "maximize" else "min"
        searcher = HarnessSearch(
            space=plan.search_space(),
            metric="score",
            mode=mode,
            sampler=make_sampler(plan),
            study_name=s.name,
            storage=store.optuna_storage(),
        )
        searcher.setup_harness(plan, store, log, retry_failed, num, events)
        if plan.is_grid or s.pruner == "none":
            scheduler = FIFOScheduler()
        else:
            scheduler = ASHAScheduler(  # one iteration per intermediate value: epochs, plus the final one
                time_attr="training_iteration",
                metric="score",
                mode=mode,
                max_t=_total_epochs(plan) + 1,
                grace_period=1,
                reduction_factor=2,
            )
        alive = len([n for n in ray.nodes() if n.get("Alive")])
        log(
            f"[studies] Ray: {cpus:g} CPU{f' + {gpus:g} GPU' if gpus else ''} per trial, "
            f"{min(workers or slots, slots)} at once on {alive} node(s)"
        )
        tuner = tune.Tuner(
            tune.with_resources(
                _make_trainable(plan, url, code_version(), artifacts), {"cpu": cpus, "gpu": gpus}
            ),
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=num,
                max_concurrent_trials=workers or slots,
            ),
            run_config=tune.RunConfig(
                name=f"{s.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(Path("runs/ray").resolve()),
                verbose=0,
            ),
        )
        tuner.fit()
    except KeyboardInterrupt:
        if searcher is not None and getattr(searcher, "h_jobs", None):
            if started:  # stop this driver's trials before closing them
                ray.shutdown()
                started = False
            with signals_held():
                for job, out in ot.close_stopped(searcher.unfinished()):
                    ot.logged(job, out)
                    if events is not None:
                        events.ended(job, out)
        raise
    finally:
        if searcher is not None:
            searcher.close()
        if started:
            ray.shutdown()
    return searcher.h_outcomes if searcher is not None else []


def _total_epochs(plan: Plan) -> int:
    t = plan.base_config.train
    return t.stages * t.stage_epochs
