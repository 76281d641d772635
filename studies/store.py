"""The results store: the harness's own tables (studies.models) beside Optuna's, in one database.

    store = Store("sqlite:///runs/studies.db")      # creates the tables if missing
    store.upsert_study(name, spec, preset)
    if store.claim_point(name, point_key(row, variant, seed), owner):   # exactly once across processes
        harness_id = store.begin_trial(study=name, optuna_number=0, row="seg", variant=None, seed=0,
                                       params={...}, config=cfg.to_dict(), code_version=code_version())
        store.record_stage(harness_id, stage_dict)   # one entry of result.json "stages"
        store.finish_trial(harness_id, Status.COMPLETE, result=res.to_dict())
        store.release_claim(owner, Status.COMPLETE)
    store.study(name), store.trials(name), store.study_stages(name)   # typed records (studies.records)
    storage = store.optuna_storage()                # optuna RDBStorage on the same URL

Reading returns the typed records of studies.records (JSON decoded, statuses as Status); nothing above the
store reads its tables or decodes their JSON.

Any SQLAlchemy URL works (PostgreSQL for several machines). For SQLite the database is switched to
WAL and every connection (ours and Optuna's) waits up to BUSY_TIMEOUT_S for a lock; writes that
still hit "database is locked" are retried with backoff.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from studies.db import (
    DEFAULT_URL,
    StoreError,
    created_concurrently,
    engine_kwargs,
    is_sqlite,
    make_engine,
    normalize_url,
    pid_alive,
    redact_url,
    retry_locked,
    retrying,
    sqlite_on_connect,
)
from studies.models import (
    END_STATUSES,
    Base,
    ClaimRow,
    StageRow,
    Status,
    StudyRow,
    TrialRow,
)
from studies.records import (
    StoredClaim,
    StoredStage,
    StoredStudy,
    StoredTrial,
    TrialProgress,
    finite,
)

__all__ = ["CLAIM_STALE_S", "DEFAULT_URL", "Store", "point_key"]
CLAIM_STALE_S = 120.0  # a claim whose heartbeat is older than this (4 missed beats) may be taken over

T = TypeVar("T")


# ----------------------------------------------------------------------------------------- helpers
def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # naive UTC: same on SQLite and PostgreSQL


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, allow_nan=True)


# ------------------------------------------------------------------------------------------- Store
def _legacy_status(status: str, error: str | None) -> Status:
    # Stores written before `interrupted` was a status kept it as failed + this error text.
    legacy = status == Status.FAILED and (error or "").startswith("interrupted")
    return Status.INTERRUPTED if legacy else Status(status)


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else None


def _trial(t: TrialRow) -> StoredTrial:
    return StoredTrial(
        harness_id=t.id,
        optuna_number=t.optuna_number,
        row=t.row,
        variant=t.variant,
        seed=t.seed,
        status=_legacy_status(t.status, t.error),
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


def _looks_alive(trial: StoredTrial, host: str, now: float, grace_s: float) -> bool:
    """A running trial's process is alive: its pid, when it runs on this host; else a heartbeat newer
    than grace_s (another host's pid cannot be checked)."""
    if trial.host == host and trial.pid is not None:
        return pid_alive(trial.pid)
    return trial.heartbeat_at is not None and now - trial.heartbeat_at < grace_s


def point_key(row: str, variant: str | None, seed: int) -> str:
    """A grid point's claim key: canonical JSON of [row, variant, seed]."""
    return json.dumps([row, variant, int(seed)])


class Store:
    """The harness tables on one SQLAlchemy URL (the same database Optuna uses)."""

    def __init__(self, url: str = DEFAULT_URL, create: bool = True):
        self.url = normalize_url(url)  # one driver for ours and Optuna's engine (postgresql+psycopg)
        self.engine = make_engine(url, create=create)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._optuna_storage = None
        if create:
            self._create_tables()
            self._migrate_statuses()

    def _create_tables(self) -> None:
        created_concurrently(lambda: retry_locked(Base.metadata.create_all, self.engine))

    @retrying
    def _migrate_statuses(self) -> None:
        with self._session.begin() as s:
            s.execute(
                sa.update(TrialRow)
                .where(TrialRow.status == Status.FAILED, TrialRow.error.like("interrupted%"))
                .values(status=Status.INTERRUPTED)
            )

    def check_readable(self) -> None:
        """StoreError unless the store exists and holds at least one study (for readers: reports)."""
        db = sa.engine.make_url(self.url)
        if is_sqlite(self.url) and db.database not in (None, "", ":memory:"):
            if not Path(db.database).exists():
                raise StoreError(f"no results store at {redact_url(self.url)}")
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("harness_studies"):
                raise StoreError(f"results store {redact_url(self.url)} is empty (no harness tables)")
        if not self.study_names():
            raise StoreError(f"results store {redact_url(self.url)} holds no studies")

    # -- optuna ---------------------------------------------------------------------------------
    def optuna_storage(self):
        """optuna.storages.RDBStorage on the same URL with the same lock handling (cached)."""
        if self._optuna_storage is None:
            import optuna

            storage = created_concurrently(
                lambda: retry_locked(
                    optuna.storages.RDBStorage, self.url, engine_kwargs=engine_kwargs(self.url)
                )
            )
            if is_sqlite(self.url):
                event.listen(storage.engine, "connect", sqlite_on_connect)
                storage.engine.dispose()  # connections opened before the listener get reopened with it
            self._optuna_storage = storage
        return self._optuna_storage

    # -- studies --------------------------------------------------------------------------------
    @retrying
    def upsert_study(self, name: str, spec: dict, preset: str) -> int:
        """Create the study row, or update its spec/preset; returns its id."""
        for _ in range(2):
            try:
                with self._session.begin() as s:
                    row = s.scalar(sa.select(StudyRow).where(StudyRow.name == name))
                    if row is None:
                        row = StudyRow(name=name, spec_json=_dumps(spec), preset=preset, created_at=_now())
                        s.add(row)
                    else:
                        row.spec_json, row.preset = _dumps(spec), preset
                    s.flush()
                    return row.id
            except IntegrityError:  # created concurrently by another worker: update theirs
                continue
        raise RuntimeError(f"could not create study {name!r} in the store")

    @retrying
    def study_id(self, name: str) -> int | None:
        with self._session() as s:
            return s.scalar(sa.select(StudyRow.id).where(StudyRow.name == name))

    @retrying
    def presets(self) -> dict[str, str]:
        """Each stored study's preset, by name."""
        with self._session() as s:
            return dict(s.execute(sa.select(StudyRow.name, StudyRow.preset).order_by(StudyRow.id)).all())

    def study_names(self) -> list[str]:
        with self._session() as s:
            return list(s.scalars(sa.select(StudyRow.name).order_by(StudyRow.id)))

    @retrying
    def study(self, name: str) -> StoredStudy:
        """The stored study, its spec.Study rebuilt from the stored mapping; StoreError naming the known
        studies if name is not stored, or naming the study if its stored definition no longer parses."""
        from studies.spec import SpecError, study_from_record

        with self._session() as s:
            row = s.scalar(sa.select(StudyRow).where(StudyRow.name == name))
        if row is None:
            known = ", ".join(sorted(self.study_names())) or "none"
            raise StoreError(f"unknown study {name!r} in {redact_url(self.url)}; known: {known}")
        record = json.loads(row.spec_json) if row.spec_json else {}
        try:
            spec = study_from_record(name, record)
        except SpecError as e:
            raise StoreError(f"study {name!r} in {redact_url(self.url)}: {e}") from None
        return StoredStudy(
            name=row.name,
            spec=spec,
            preset=row.preset,
            created_at=row.created_at,
            cli_overrides=dict(record.get("_cli_set") or {}),
            study_file=record.get("_study_file"),
        )

    # -- trials ---------------------------------------------------------------------------------
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
            t.params_json, t.config_json = _dumps(params), _dumps(config)
            t.status, t.error, t.started_at, t.finished_at = Status.RUNNING, None, _now(), None
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
            per_class_iou_json=_dumps(val.get("per_class_iou"))
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
            t.status, t.finished_at, t.heartbeat_at = status, _now(), time.time()
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
                    t.config_json = _dumps(result["config"])
                t.result_json = _dumps(result)
        if result:  # stages reported live are already there; fill in any that were not (e.g. Ray)
            have = {r.stage for r in self.stages(harness_id)}
            for st in result.get("stages") or []:
                if int(st["stage"]) not in have:
                    self.record_stage(harness_id, st)

    @retrying
    def mark_stale_running(self, study: str, keep: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """Mark the study's running trials not in keep (harness_ids) as interrupted; return their ids.
        For a process that knows these trials are its own and dead; others use interrupt_dead."""
        sid = self.study_id(study)
        if sid is None:
            return []
        with self._session.begin() as s:
            rows = s.scalars(
                sa.select(TrialRow).where(TrialRow.study_id == sid, TrialRow.status == Status.RUNNING)
            ).all()
            out = []
            for t in rows:
                if t.id in keep:
                    continue
                t.status, t.finished_at = Status.INTERRUPTED, _now()
                t.error = "its process died while the trial was running"
                out.append(t.id)
            return out

    def interrupt_dead(self, study: str, grace_s: float = CLAIM_STALE_S) -> list[int]:
        """Mark as interrupted the running trials whose process is gone (not _looks_alive). Each is
        compare-and-set on what was observed (status running, same pid and heartbeat), so a trial that
        began or beat in between is never touched."""
        host, now, out = socket.gethostname(), time.time(), []
        for t in self.trials(study, status=Status.RUNNING):
            if not _looks_alive(t, host, now, grace_s) and retry_locked(
                self._interrupt_if_unchanged, t.harness_id, t.pid, t.heartbeat_at
            ):
                out.append(t.harness_id)
        return out

    def _interrupt_if_unchanged(self, harness_id: int, pid: int | None, heartbeat_at: float | None) -> bool:
        with self._session.begin() as s:
            res = s.execute(
                sa.update(TrialRow)
                .where(
                    TrialRow.id == harness_id,
                    TrialRow.status == Status.RUNNING,
                    TrialRow.pid.is_(None) if pid is None else TrialRow.pid == pid,
                    TrialRow.heartbeat_at.is_(None)
                    if heartbeat_at is None
                    else TrialRow.heartbeat_at == heartbeat_at,
                )
                .values(
                    status=Status.INTERRUPTED,
                    finished_at=_now(),
                    error="its process died while the trial was running",
                )
            )
            return res.rowcount == 1

    @retrying
    def live_running(self, study: str, grace_s: float = CLAIM_STALE_S) -> set[int]:
        """harness_ids of running trials that look alive (_looks_alive)."""
        host, now = socket.gethostname(), time.time()
        return {
            t.harness_id
            for t in self.trials(study, status=Status.RUNNING)
            if _looks_alive(t, host, now, grace_s)
        }

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
            return [(r, v, sd, _legacy_status(st, err)) for r, v, sd, st, err in s.execute(q).all()]

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
                          status=_legacy_status(status, error), error=error, started_at=started,
                          seconds=seconds, host=host, pid=pid, stages=k)
            for hid, n, row, variant, seed, status, error, started, seconds, host, pid, k in rows
        ]  # fmt: skip

    # -- grid-point claims ------------------------------------------------------------------------
    def claim_point(
        self, study: str, key: str, owner: str, retake_failed: bool = False, stale_s: float = CLAIM_STALE_S
    ) -> bool:
        """Take grid point `key` of `study` for `owner`, atomically: True if this call now holds it.

        Free point: a unique insert. Held point: taken over only when its claimant is gone (a dead pid on
        this host, or no heartbeat for stale_s). Done point: retaken only with retake_failed and when its
        trial failed. Takeovers are compare-and-set on the previous owner, so two processes racing for
        the same point cannot both win."""
        sid = self.study_id(study)
        if sid is None:
            raise KeyError(f"study {study!r} is not in the store (call upsert_study first)")
        host, pid = socket.gethostname(), os.getpid()
        try:
            retry_locked(self._insert_claim, sid, key, owner, host, pid)
            return True
        except IntegrityError:
            pass
        with self._session() as s:
            c = s.scalar(sa.select(ClaimRow).where(ClaimRow.study_id == sid, ClaimRow.point == key))
            if c is None:  # released between our insert and this read: try once more
                return self.claim_point(study, key, owner, retake_failed, stale_s)
            prev_owner, prev_state = c.owner, c.state
            if c.state == Status.RUNNING:
                gone = (c.host == host and not pid_alive(c.pid)) or time.time() - c.heartbeat_at > stale_s
                if not gone:
                    return False
            else:
                t = s.get(TrialRow, c.harness_id) if c.harness_id is not None else None
                if not (retake_failed and t is not None and t.status == Status.FAILED):
                    return False
        return retry_locked(self._take_over_claim, sid, key, owner, host, pid, prev_owner, prev_state)

    def _insert_claim(self, sid: int, key: str, owner: str, host: str, pid: int) -> None:
        with self._session.begin() as s:
            s.add(
                ClaimRow(
                    study_id=sid,
                    point=key,
                    state=Status.RUNNING,
                    owner=owner,
                    host=host,
                    pid=pid,
                    heartbeat_at=time.time(),
                )
            )

    def _take_over_claim(
        self, sid: int, key: str, owner: str, host: str, pid: int, prev_owner: str, prev_state: str
    ) -> bool:
        with self._session.begin() as s:
            res = s.execute(
                sa.update(ClaimRow)
                .where(
                    ClaimRow.study_id == sid,
                    ClaimRow.point == key,
                    ClaimRow.owner == prev_owner,
                    ClaimRow.state == prev_state,
                )
                .values(
                    state=Status.RUNNING,
                    owner=owner,
                    host=host,
                    pid=pid,
                    heartbeat_at=time.time(),
                    harness_id=None,
                )
            )
            return res.rowcount == 1

    @retrying
    def claim_heartbeat(self, owners: list[str]) -> None:
        """Keep these owners' running claims fresh (one statement for all)."""
        if not owners:
            return
        with self._session.begin() as s:
            s.execute(
                sa.update(ClaimRow)
                .where(ClaimRow.owner.in_(owners), ClaimRow.state == Status.RUNNING)
                .values(heartbeat_at=time.time())
            )

    @retrying
    def claim_started(self, owner: str, harness_id: int) -> None:
        with self._session.begin() as s:
            s.execute(sa.update(ClaimRow).where(ClaimRow.owner == owner).values(harness_id=harness_id))

    @retrying
    def release_claim(self, owner: str, status: str | None) -> None:
        """The claimant is finished with its point: an interrupted (or never started, status None) trial
        frees the point for anyone; any other end status marks it done."""
        with self._session.begin() as s:
            q = sa.select(ClaimRow).where(ClaimRow.owner == owner)
            for c in s.scalars(q).all():
                if status in (None, Status.INTERRUPTED):
                    s.delete(c)
                else:
                    c.state, c.heartbeat_at = Status.DONE, time.time()

    @retrying
    def claims(self, study: str) -> list[StoredClaim]:
        with self._session() as s:
            rows = s.scalars(
                sa.select(ClaimRow)
                .join(StudyRow, StudyRow.id == ClaimRow.study_id)
                .where(StudyRow.name == study)
                .order_by(ClaimRow.id)
            ).all()
            return [
                StoredClaim(point=c.point, state=Status(c.state), owner=c.owner, host=c.host, pid=c.pid,
                            heartbeat_at=c.heartbeat_at, harness_id=c.harness_id)
                for c in rows
            ]  # fmt: skip

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
        if status is not None:  # in SQL, so only those rows' JSON is decoded; a legacy row is failed there
            legacy = (Status.FAILED,) if status == Status.INTERRUPTED else ()
            q = q.where(TrialRow.status.in_((status, *legacy)))
        with self._session() as s:
            out = [_trial(t) for t in s.scalars(q).all()]
        return out if status is None else [t for t in out if t.status == status]

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
                    status=_legacy_status(status, error),
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

    def close(self) -> None:
        self.engine.dispose()
        if self._optuna_storage is not None:
            self._optuna_storage.engine.dispose()
