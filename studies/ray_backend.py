"""The Ray Tune backend (`--backend ray`): the path to many GPUs and machines.

Tuner + OptunaSearch on the same Optuna study and storage as the Optuna backend (so the dashboard and
the report see one study whichever backend ran it), ASHA for tuning studies, the missing grid points
as points_to_evaluate for ablations. Each Ray trial calls the same execute() -> run_trial and writes
its harness rows itself; the driver tells Optuna and closes trials that ASHA stopped (pruned).

On a cluster (`--address`), every node needs this code and the data path, and the storage URL must be
reachable from every node (PostgreSQL; SQLite only works when all trials run on this machine).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from ray.tune.search.optuna import OptunaSearch

from studies.optuna_backend import (
    Job,
    Outcome,
    execute,
    finished_count,
    finite,
    get_store,
    one_line,
    open_study,
    point_states,
    recover,
    tell,
)
from studies.quality import COLLAPSED_MEANING, result_collapsed
from studies.spec import Plan
from studies.store import code_version, is_sqlite, retry_locked


def absolute_url(url: str) -> str:
    """Ray workers may run in another directory: pin a relative SQLite path to this one."""
    if not is_sqlite(url):
        return url
    u = sa.engine.make_url(url)
    if u.database and u.database != ":memory:" and not os.path.isabs(u.database):
        u = u.set(database=str(Path(u.database).resolve()))
    return u.render_as_string(hide_password=False)


class HarnessSearch(OptunaSearch):
    """OptunaSearch that passes the Optuna trial number on, reports per stage, and closes trials the
    harness way (complete / failed / pruned by ASHA) in both Optuna and the harness tables."""

    def setup_harness(self, plan: Plan, store: Any, log: Callable[[str], None]) -> None:
        self.h_plan, self.h_store, self.h_log = plan, store, log
        self.h_jobs: dict[str, Job] = {}
        self.h_outcomes: list[Outcome] = []

    def __getstate__(self) -> dict:  # the Tuner pickles its config; the live study and store stay here
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:  # resuming is the harness's job (the store), not Ray's
        raise NotImplementedError

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError

    def suggest(self, trial_id: str):
        cfg = super().suggest(trial_id)
        if cfg is None:
            return None
        ot = self._ot_trials[trial_id]
        ot.set_user_attr("owner_host", socket.gethostname())
        ot.set_user_attr("owner_pid", os.getpid())
        params = dict(ot.params)
        row = params.get("row", "trial")
        st = self.h_plan.study
        self.h_jobs[trial_id] = Job(
            st.name,
            self.h_store.url,
            self.h_plan.preset,
            ot.number,
            row,
            params.get("variant"),
            params.get("seed", st.seed),
            params,
            {},
            st.metric,
            st.stage_metric,
            "",
            optuna_trial_id=ot._trial_id,
        )
        return {**cfg, "_number": ot.number, "_trial_id": ot._trial_id}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if result.get("final") or trial_id in self._completed_trials:
            return
        retry_locked(self._ot_trials[trial_id].report, result["score"], result["stage"])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        self._completed_trials.add(trial_id)
        job, result = self.h_jobs[trial_id], result or {}
        hid = result.get("harness_id")
        if result.get("final"):
            out = Outcome(job.number, result["status"], finite(result.get("value")), result.get("error"), hid)
        elif error:
            out = Outcome(job.number, "failed", None, "the Ray trial raised (see its log)", hid)
        else:
            stage = result.get("stage")
            out = Outcome(job.number, "pruned", None, f"stopped by ASHA after stage {stage}", hid)
        if hid is not None and out.status != "complete" and not result.get("final"):
            retry_locked(self.h_store.finish_trial, hid, out.status, error=out.error)
        if hid is not None:  # the user attrs read the stored result
            t = [x for x in self.h_store.trials(self.h_plan.study.name) if x["id"] == hid]
            out.result = t[0]["result"] if t else None
            out.collapsed = result_collapsed(out.result)
        try:
            tell(self._ot_study, job, out)
        except Exception as e:
            self.h_log(f"[studies] could not tell Optuna about trial #{job.number}: {one_line(e)}")
        self.h_outcomes.append(out)
        v = "" if out.value is None else f" {self.h_plan.study.metric}={out.value:.4f}"
        label = job.row + (f"/{job.variant}" if job.variant else "")
        self.h_log(
            f"[studies] trial #{job.number} {label} seed {job.seed}: {out.status}{v}"
            + (f" ({out.error})" if out.error else "")
            + (f" [collapsed: {COLLAPSED_MEANING}]" if out.collapsed else "")
        )


def _make_trainable(plan: Plan, url: str, cv: str) -> Callable[[dict], None]:
    def trainable(config: dict) -> None:
        from ray import tune

        params = {k: v for k, v in config.items() if not k.startswith("_")}
        if plan.is_grid:
            p = plan.point_for_params(params)
            row, variant, seed, overrides, pruner = p.row, p.variant, p.seed, p.overrides, "none"
        else:
            row, variant, seed = "trial", None, plan.study.seed
            overrides, pruner = plan.overrides_for_params(params), plan.study.pruner
        job = Job(
            plan.study.name,
            url,
            plan.preset,
            config["_number"],
            row,
            variant,
            seed,
            params,
            overrides,
            plan.study.metric,
            plan.study.stage_metric,
            cv,
            pruner,
            config["_trial_id"],
        )
        state: dict[str, Any] = {"tid": None, "last": 0.0}

        def on_stage(stage: int, value: float | None, metrics: dict) -> None:
            if value is not None:
                state["last"] = value
            tune.report({"score": state["last"], "stage": stage, "final": False, "harness_id": state["tid"]})

        out = execute(job, on_stage, on_begin=lambda tid: state.update(tid=tid))
        tune.report(
            {
                "score": out.value if out.value is not None else state["last"],
                "stage": -1,
                "final": True,
                "status": out.status,
                "error": out.error,
                "value": out.value,
                "harness_id": out.harness_id,
            }
        )

    return trainable


def run_study_ray(
    plan: Plan,
    url: str,
    workers: int = 1,
    n_trials: int | None = None,
    retry_failed: bool = False,
    address: str | None = None,
    cpus_per_trial: float | None = None,
    gpus_per_trial: float = 0.0,
    log: Callable[[str], None] = print,
    ray_init: dict | None = None,
) -> list[Outcome]:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    url = absolute_url(url)
    store = get_store(url)
    store.upsert_study(
        plan.study.name, {k: v for k, v in plan.study.raw.items() if k != "__lines__"}, plan.preset
    )
    study = open_study(plan, store)
    failed = recover(plan, store, study)
    if failed:
        log(
            f"[studies] marked {len(failed)} interrupted trial(s) failed: #{', #'.join(map(str, failed))}; rerunning them"
        )
    s = plan.study
    points: list[dict] = []
    if plan.is_grid:
        done, running = point_states(plan, store, retry_failed)
        todo = [p for p in plan.points if p.key not in done | running]
        todo = todo[:n_trials] if n_trials is not None else todo
        points = [p.params for p in todo]
        num = len(points)
    else:
        num = max(0, (n_trials if n_trials is not None else s.n_trials) - finished_count(plan, store))
    if num == 0:
        log("[studies] nothing to run: every trial of this study is finished")
        return []

    mode = "max" if s.direction == "maximize" else "min"

    from studies.optuna_backend import make_sampler

    searcher = HarnessSearch(
        space=plan.search_space(),
        metric="score",
        mode=mode,
        points_to_evaluate=points or None,
        sampler=make_sampler(plan),
        study_name=s.name,
        storage=store.optuna_storage(),
    )
    searcher.setup_harness(plan, store, log)
    if plan.is_grid or s.pruner == "none":
        scheduler = FIFOScheduler()
    else:
        stages = int(plan.overrides_for_params({}).get("train.stages") or _preset_stages(plan))
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            metric="score",
            mode=mode,
            max_t=stages + 1,
            grace_period=1,
            reduction_factor=2,
        )

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
        ray.init(**kw)
        started = True
    try:
        resources = {"cpu": cpus_per_trial or 1, "gpu": gpus_per_trial or 0}
        tuner = tune.Tuner(
            tune.with_resources(_make_trainable(plan, url, code_version()), resources),
            tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=scheduler, num_samples=num, max_concurrent_trials=workers
            ),
            run_config=tune.RunConfig(
                name=f"{s.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(Path("runs/ray").resolve()),
                verbose=0,
            ),
        )
        tuner.fit()
    finally:
        if started:
            ray.shutdown()
    return searcher.h_outcomes


def _preset_stages(plan: Plan) -> int:
    from core.config import make_config

    return make_config(plan.preset, plan.overrides_for_params({})).train.stages
