"""The trial and stage rows of the results store: writing a trial's life (begin_trial, heartbeat,
record_stage, finish_trial) and reading it back as the typed records of studies.records (trials, stages,
study_stages, point_statuses, trial_progress), JSON columns decoded and legacy statuses read through
studies.legacy. TrialsMixin is one part of studies.store.Store, which supplies its session factory and
study_id; the column conventions (naive UTC times, canonical JSON) live here for the store's other parts."""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from typing import Any, Callable

import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from studies.db import retrying
from studies.legacy import legacy_status, stored_as
from studies.models import END_STATUSES, StageRow, Status, StudyRow, TrialRow
from studies.records import StoredStage, StoredTrial, TrialProgress, finite


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # naive UTC: same on SQLite and PostgreSQL


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, allow_nan=True)


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else None


def _trial(t: TrialRow) -> StoredTrial:
    return StoredTrial(
        harness_id=t.id,
        optuna_number=t.optuna_number,
        row=t.row,
        variant=t.variant,
        seed=t.seed,
        status=legacy_status(t.status, t.error),
        error=t.error,
        params=_loads(t.params_json) or {},
        config=_loads(t.config_json) or {},
        result=_loads(t.result_json),
        started_at=t.started_at,
        finished_at=t.finished_at,
        seconds=t.seconds,
        warmup_cached=t.warmup_cached,
        warmup_seconds=t.warmup_seconds,
        code_version=t.code_version,
        host=t.host,
        pid=t.pid,
        heartbeat_at=t.heartbeat_at,
        final_miou=t.final_miou,
        final_miou_post=t.final_miou_post,
        initial_precision=t.initial_precision,
        initial_recall=t.initial_recall,
        initial_miou=t.initial_miou,
    )


class TrialsMixin:
    """Trial and stage rows; mixed into studies.store.Store."""

    _session: sessionmaker
    study_id: Callable[[str], int | None]

    # -- writing --------------------------------------------------------------------------------
    @retrying
    def begin_trial(
        self,
        *,
        study: str,
        optuna_number: int,
        row: str,
        variant: str | None,
        seed: int,
        params: dict,
        config: dict,
        code_version: str,
    ) -> int:
        """Insert a running trial (or reset the one with the same Optuna number); returns its harness_id."""
        sid = self.study_id(study)
        if sid is None:
            raise KeyError(f"study {study!r} is not in the store (call upsert_study first)")
        with self._session.begin() as s:
            t = s.scalar(
                sa.select(TrialRow).where(TrialRow.study_id == sid, TrialRow.optuna_number == optuna_number)
            )
            if t is None:
                t = TrialRow(study_id=sid, optuna_number=optuna_number)
                s.add(t)
            else:
                s.execute(sa.delete(StageRow).where(StageRow.trial_id == t.id))
            t.row, t.variant, t.seed = row, variant, int(seed)
            t.params_json, t.config_json = dumps(params), dumps(config)
            t.status, t.error, t.started_at, t.finished_at = Status.RUNNING, None, utc_now(), None
            t.code_version, t.host, t.pid, t.heartbeat_at = (
                code_version,
                socket.gethostname(),
                os.getpid(),
                time.time(),
            )
            for col in (
                "seconds",
                "warmup_cached",
                "warmup_seconds",
                "final_miou",
                "final_miou_post",
                "initial_precision",
                "initial_recall",
                "initial_miou",
                "result_json",
            ):
                setattr(t, col, None)
            s.flush()
            return t.id

    @retrying
    def heartbeat(self, harness_id: int) -> None:
        with self._session.begin() as s:
            s.execute(
                sa.update(TrialRow)
                .where(TrialRow.id == harness_id, TrialRow.status == Status.RUNNING)
                .values(heartbeat_at=time.time())
            )

    @retrying
    def record_stage(self, harness_id: int, stage: dict) -> None:
        """Store one stage entry of result.json (insert or replace by stage number)."""
        val, pgt = stage.get("val") or {}, stage.get("pgt") or {}
        values = dict(
            val_miou=finite(val.get("miou")),
            val_miou_post=finite(val.get("miou_post")),
            per_class_iou_json=dumps(val.get("per_class_iou"))
            if val.get("per_class_iou") is not None
            else None,
            pgt_precision=finite(pgt.get("precision")),
            pgt_recall=finite(pgt.get("recall")),
            pgt_miou=finite(pgt.get("miou")),
            seconds=finite(stage.get("seconds")),
        )
        with self._session.begin() as s:
            row = s.scalar(
                sa.select(StageRow).where(
                    StageRow.trial_id == harness_id, StageRow.stage == int(stage["stage"])
                )
            )
            if row is None:
                s.add(StageRow(trial_id=harness_id, stage=int(stage["stage"]), **values))
            else:
                for k, v in values.items():
                    setattr(row, k, v)
            s.execute(sa.update(TrialRow).where(TrialRow.id == harness_id).values(heartbeat_at=time.time()))

    @retrying
    def finish_trial(
        self, harness_id: int, status: str, result: dict | None = None, error: str | None = None
    ) -> None:
        """Close a trial: status, error, and (from result.json) final_*, initial_*, seconds, warmup_*."""
        if status not in END_STATUSES:
            raise ValueError(f"finish_trial: status must be one of {', '.join(END_STATUSES)}; got {status!r}")
        with self._session.begin() as s:
            t = s.get(TrialRow, harness_id)
            if t is None:
                raise KeyError(f"no harness trial with id {harness_id}")
            t.status, t.finished_at, t.heartbeat_at = status, utc_now(), time.time()
            t.error = error if error is not None else (result or {}).get("error")
            if t.seconds is None and t.started_at is not None:
                t.seconds = (t.finished_at - t.started_at).total_seconds()
            if result:
                final, init, warm = (
                    result.get("final") or {},
                    result.get("initial_pgt") or {},
                    result.get("warmup") or {},
                )
                t.final_miou, t.final_miou_post = finite(final.get("miou")), finite(final.get("miou_post"))
                t.initial_precision = finite(init.get("precision"))
                t.initial_recall = finite(init.get("recall"))
                t.initial_miou = finite(init.get("miou"))
                t.warmup_cached = None if warm.get("cached") is None else bool(warm["cached"])
                t.warmup_seconds = finite(warm.get("seconds"))
                t.seconds = finite(result.get("seconds")) if result.get("seconds") is not None else t.seconds
                if result.get("config"):
                    t.config_json = dumps(result["config"])
                t.result_json = dumps(result)
        if result:  # stages reported live are already there; fill in any that were not (e.g. Ray)
            have = {r.stage for r in self.stages(harness_id)}
            for st in result.get("stages") or []:
                if int(st["stage"]) not in have:
                    self.record_stage(harness_id, st)

    # -- reading --------------------------------------------------------------------------------
    @retrying
    def trials(self, study: str, status: Status | None = None) -> list[StoredTrial]:
        """The study's harness trials (of one status, when given), ordered by Optuna number."""
        q = (
            sa.select(TrialRow)
            .join(StudyRow, StudyRow.id == TrialRow.study_id)
            .where(StudyRow.name == study)
            .order_by(TrialRow.optuna_number, TrialRow.id)
        )
        if status is not None:  # in SQL, so only those rows' JSON is decoded
            q = q.where(TrialRow.status.in_(stored_as(status)))
        with self._session() as s:
            out = [_trial(t) for t in s.scalars(q).all()]
        return out if status is None else [t for t in out if t.status == status]

    @retrying
    def point_statuses(self, study: str) -> list[tuple[str, str | None, int, str]]:
        """(row, variant, seed, status) of every trial of the study: what a claimant reads before each
        claim, so only these columns (the full rows grow with the study)."""
        q = (
            sa.select(TrialRow.row, TrialRow.variant, TrialRow.seed, TrialRow.status, TrialRow.error)
            .join(StudyRow, StudyRow.id == TrialRow.study_id)
            .where(StudyRow.name == study)
        )
        with self._session() as s:
            return [(r, v, sd, legacy_status(st, err)) for r, v, sd, st, err in s.execute(q).all()]

    @retrying
    def trial_progress(self, study: str) -> list[TrialProgress]:
        """What a live display polls every few seconds: each trial without the JSON columns (the results
        grow with the study), with its stage rows so far counted. Ordered by Optuna number."""
        stages = (
            sa.select(sa.func.count(StageRow.id)).where(StageRow.trial_id == TrialRow.id).scalar_subquery()
        )
        cols = (TrialRow.id, TrialRow.optuna_number, TrialRow.row, TrialRow.variant, TrialRow.seed,
                TrialRow.status, TrialRow.error, TrialRow.started_at, TrialRow.seconds, TrialRow.host,
                TrialRow.pid)  # fmt: skip
        q = (
            sa.select(*cols, stages.label("stages"))
            .join(StudyRow, StudyRow.id == TrialRow.study_id)
            .where(StudyRow.name == study)
            .order_by(TrialRow.optuna_number, TrialRow.id)
        )
        with self._session() as s:
            rows = s.execute(q).all()
        return [
            TrialProgress(harness_id=hid, optuna_number=n, row=row, variant=variant, seed=seed,
                          status=legacy_status(status, error), error=error, started_at=started,
                          seconds=seconds, host=host, pid=pid, stages=k)
            for hid, n, row, variant, seed, status, error, started, seconds, host, pid, k in rows
        ]  # fmt: skip

    @retrying
    def stages(self, harness_id: int) -> list[StoredStage]:
        """One trial's stage records, by stage."""
        return self._stages(TrialRow.id == harness_id)

    @retrying
    def study_stages(self, study: str) -> list[StoredStage]:
        """Every stage record of the study's trials, by trial then stage."""
        return self._stages(StudyRow.name == study)

    def _stages(self, where) -> list[StoredStage]:
        q = (
            sa.select(
                StageRow, TrialRow.row, TrialRow.variant, TrialRow.seed, TrialRow.status, TrialRow.error
            )
            .join(TrialRow, TrialRow.id == StageRow.trial_id)
            .join(StudyRow, StudyRow.id == TrialRow.study_id)
            .where(where)
            .order_by(StageRow.trial_id, StageRow.stage)
        )
        with self._session() as s:
            return [
                StoredStage(
                    harness_id=g.trial_id,
                    stage=g.stage,
                    row=row,
                    variant=variant,
                    seed=seed,
                    status=legacy_status(status, error),
                    val_miou=g.val_miou,
                    val_miou_post=g.val_miou_post,
                    per_class_iou=_loads(g.per_class_iou_json),
                    pgt_precision=g.pgt_precision,
                    pgt_recall=g.pgt_recall,
                    pgt_miou=g.pgt_miou,
                    seconds=g.seconds,
                )
                for g, row, variant, seed, status, error in s.execute(q).all()
            ]
