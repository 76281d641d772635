"""The results store: the harness's own tables beside Optuna's, in one database.

    store = Store("sqlite:///runs/studies.db")      # creates the tables if missing
    sid = store.upsert_study(name, spec, preset)
    tid = store.begin_trial(study=name, number=0, row="seg", variant=None, seed=0,
                            params={...}, config=cfg.to_dict(), code_version=code_version())
    store.record_stage(tid, stage_dict)             # one entry of result.json "stages"
    store.finish_trial(tid, "complete", result=res.to_dict())
    store.mark_stale_running(name, keep={live ids}) # -> ids marked failed ("interrupted")
    pandas.read_sql("harness_trials", store.engine)
    storage = store.optuna_storage()                # optuna RDBStorage on the same URL

Tables (prefixed harness_ so they never clash with Optuna's): harness_studies, harness_trials,
harness_stages. Any SQLAlchemy URL works (PostgreSQL for several machines). For SQLite the database
is switched to WAL and every connection (ours and Optuna's) waits up to BUSY_TIMEOUT_S for a lock;
writes that still hit "database is locked" are retried with backoff.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

DEFAULT_URL = "sqlite:///runs/studies.db"
BUSY_TIMEOUT_S = 60.0
STATUSES = ("running", "complete", "failed", "pruned")

T = TypeVar("T")


class Base(DeclarativeBase):
    pass


class StudyRow(Base):
    __tablename__ = "harness_studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(255), unique=True)
    spec_json: Mapped[str] = mapped_column(sa.Text)
    preset: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime)


class TrialRow(Base):
    __tablename__ = "harness_trials"
    __table_args__ = (sa.UniqueConstraint("study_id", "optuna_number", name="uq_harness_trial_number"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("harness_studies.id"), index=True)
    optuna_number: Mapped[int] = mapped_column(sa.Integer)
    row: Mapped[str] = mapped_column(sa.String(255))
    variant: Mapped[str | None] = mapped_column(sa.String(255), nullable=True)
    seed: Mapped[int] = mapped_column(sa.Integer)
    params_json: Mapped[str] = mapped_column(sa.Text)
    config_json: Mapped[str] = mapped_column(sa.Text)
    status: Mapped[str] = mapped_column(sa.String(16), index=True)
    error: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(sa.DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(sa.DateTime, nullable=True)
    seconds: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    warmup_cached: Mapped[bool | None] = mapped_column(sa.Boolean, nullable=True)
    warmup_seconds: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    code_version: Mapped[str] = mapped_column(sa.String(64))
    host: Mapped[str] = mapped_column(sa.String(255))
    pid: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(sa.Float, nullable=True)  # unix time
    final_miou: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    final_miou_post: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    initial_precision: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    initial_recall: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    initial_miou: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    result_json: Mapped[str | None] = mapped_column(sa.Text, nullable=True)


class StageRow(Base):
    __tablename__ = "harness_stages"
    __table_args__ = (sa.UniqueConstraint("trial_id", "stage", name="uq_harness_stage"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    trial_id: Mapped[int] = mapped_column(sa.ForeignKey("harness_trials.id"), index=True)
    stage: Mapped[int] = mapped_column(sa.Integer)
    val_miou: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    val_miou_post: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    per_class_iou_json: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    pgt_precision: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    pgt_recall: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    pgt_miou: Mapped[float | None] = mapped_column(sa.Float, nullable=True)
    seconds: Mapped[float | None] = mapped_column(sa.Float, nullable=True)


# ----------------------------------------------------------------------------------------- helpers
def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # naive UTC: same on SQLite and PostgreSQL


def _num(x: Any) -> float | None:
    """A finite float or None (NaN/inf are not portable across databases)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, allow_nan=True)


def is_locked_error(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return "database is locked" in msg or "database is busy" in msg or "database table is locked" in msg


def retry_locked(fn: Callable[..., T], *args: Any, attempts: int = 8, **kwargs: Any) -> T:
    """Call fn, retrying with jittered exponential backoff while SQLite reports a lock (last resort)."""
    delay = 0.05
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # OperationalError, or optuna's StorageInternalError wrapping it
            locked = is_locked_error(exc) or (exc.__cause__ is not None and is_locked_error(exc.__cause__))
            if not locked or i == attempts - 1:
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


def _retrying(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return retry_locked(method, *args, **kwargs)

    return wrapper


def is_sqlite(url: str) -> bool:
    return sa.engine.make_url(url).get_backend_name() == "sqlite"


def engine_kwargs(url: str) -> dict[str, Any]:
    """create_engine kwargs shared by the harness engine and Optuna's RDBStorage."""
    if is_sqlite(url):
        return {"connect_args": {"timeout": BUSY_TIMEOUT_S}}
    return {"pool_pre_ping": True}


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
    finally:
        cur.close()


def make_engine(url: str) -> sa.Engine:
    """An engine for url; for SQLite: parent folder created, WAL on, busy timeout on every connection."""
    if is_sqlite(url):
        db = sa.engine.make_url(url).database
        if db and db != ":memory:" and not db.startswith("file:"):
            Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, **engine_kwargs(url))
    if is_sqlite(url):
        event.listen(engine, "connect", _sqlite_on_connect)
    return engine


@functools.cache
def code_version(root: str | None = None) -> str:
    """`git rev-parse HEAD` (+"+dirty" when the tree has changes), or "unknown"."""
    cwd = root or str(Path(__file__).resolve().parents[1])
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        # --no-optional-locks: never take index.lock (a study must not disturb someone committing)
        status = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        dirty = status.returncode == 0 and status.stdout.strip() != ""
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------- Store
class Store:
    """The harness tables on one SQLAlchemy URL (the same database Optuna uses)."""

    def __init__(self, url: str = DEFAULT_URL, create: bool = True):
        self.url = url
        self.engine = make_engine(url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._optuna_storage = None
        if create:
            self._create_tables()

    def _create_tables(self) -> None:
        for i in range(3):
            try:
                return retry_locked(Base.metadata.create_all, self.engine)
            except OperationalError as exc:  # another process created them between check and create
                if "already exists" not in str(exc) or i == 2:
                    raise

    # -- optuna ---------------------------------------------------------------------------------
    def optuna_storage(self):
        """optuna.storages.RDBStorage on the same URL with the same lock handling (cached)."""
        if self._optuna_storage is None:
            import optuna

            storage = retry_locked(
                optuna.storages.RDBStorage, self.url, engine_kwargs=engine_kwargs(self.url)
            )
            if is_sqlite(self.url):
                event.listen(storage.engine, "connect", _sqlite_on_connect)
                storage.engine.dispose()  # connections opened before the listener get reopened with it
            self._optuna_storage = storage
        return self._optuna_storage

    # -- studies --------------------------------------------------------------------------------
    @_retrying
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

    def study_id(self, name: str) -> int | None:
        with self._session() as s:
            return s.scalar(sa.select(StudyRow.id).where(StudyRow.name == name))

    def study_names(self) -> list[str]:
        with self._session() as s:
            return list(s.scalars(sa.select(StudyRow.name).order_by(StudyRow.id)))

    def study_spec(self, name: str) -> dict | None:
        with self._session() as s:
            row = s.scalar(sa.select(StudyRow).where(StudyRow.name == name))
            return None if row is None else {"spec": json.loads(row.spec_json), "preset": row.preset}

    # -- trials ---------------------------------------------------------------------------------
    @_retrying
    def begin_trial(
        self,
        study: str,
        number: int,
        row: str,
        variant: str | None,
        seed: int,
        params: dict,
        config: dict,
        code_version: str,
    ) -> int:
        """Insert a running trial (or reset the one with the same number); returns its id."""
        sid = self.study_id(study)
        if sid is None:
            raise KeyError(f"study {study!r} is not in the store (call upsert_study first)")
        with self._session.begin() as s:
            t = s.scalar(
                sa.select(TrialRow).where(TrialRow.study_id == sid, TrialRow.optuna_number == number)
            )
            if t is None:
                t = TrialRow(study_id=sid, optuna_number=number)
                s.add(t)
            else:
                s.execute(sa.delete(StageRow).where(StageRow.trial_id == t.id))
            t.row, t.variant, t.seed = row, variant, int(seed)
            t.params_json, t.config_json = _dumps(params), _dumps(config)
            t.status, t.error, t.started_at, t.finished_at = "running", None, _now(), None
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

    @_retrying
    def heartbeat(self, trial_id: int) -> None:
        with self._session.begin() as s:
            s.execute(
                sa.update(TrialRow)
                .where(TrialRow.id == trial_id, TrialRow.status == "running")
                .values(heartbeat_at=time.time())
            )

    @_retrying
    def record_stage(self, trial_id: int, stage: dict) -> None:
        """Store one stage entry of result.json (insert or replace by stage number)."""
        val, pgt = stage.get("val") or {}, stage.get("pgt") or {}
        values = dict(
            val_miou=_num(val.get("miou")),
            val_miou_post=_num(val.get("miou_post")),
            per_class_iou_json=_dumps(val.get("per_class_iou"))
            if val.get("per_class_iou") is not None
            else None,
            pgt_precision=_num(pgt.get("precision")),
            pgt_recall=_num(pgt.get("recall")),
            pgt_miou=_num(pgt.get("miou")),
            seconds=_num(stage.get("seconds")),
        )
        with self._session.begin() as s:
            row = s.scalar(
                sa.select(StageRow).where(
                    StageRow.trial_id == trial_id, StageRow.stage == int(stage["stage"])
                )
            )
            if row is None:
                s.add(StageRow(trial_id=trial_id, stage=int(stage["stage"]), **values))
            else:
                for k, v in values.items():
                    setattr(row, k, v)
            s.execute(sa.update(TrialRow).where(TrialRow.id == trial_id).values(heartbeat_at=time.time()))

    @_retrying
    def finish_trial(
        self, trial_id: int, status: str, result: dict | None = None, error: str | None = None
    ) -> None:
        """Close a trial: status, error, and (from result.json) final_*, initial_*, seconds, warmup_*."""
        if status not in STATUSES or status == "running":
            raise ValueError(f"finish_trial: status must be one of complete, failed, pruned; got {status!r}")
        with self._session.begin() as s:
            t = s.get(TrialRow, trial_id)
            if t is None:
                raise KeyError(f"no harness trial with id {trial_id}")
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
                t.final_miou, t.final_miou_post = _num(final.get("miou")), _num(final.get("miou_post"))
                t.initial_precision, t.initial_recall = _num(init.get("precision")), _num(init.get("recall"))
                t.initial_miou = _num(init.get("miou"))
                t.warmup_cached = None if warm.get("cached") is None else bool(warm["cached"])
                t.warmup_seconds = _num(warm.get("seconds"))
                t.seconds = _num(result.get("seconds")) if result.get("seconds") is not None else t.seconds
                if result.get("config"):
                    t.config_json = _dumps(result["config"])
                t.result_json = _dumps(result)
        if result:  # stages reported live are already there; fill in any that were not (e.g. Ray)
            have = {r["stage"] for r in self.stages(trial_id)}
            for st in result.get("stages") or []:
                if int(st["stage"]) not in have:
                    self.record_stage(trial_id, st)

    @_retrying
    def mark_stale_running(self, study: str, keep: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """Mark the study's running trials whose id is not in keep as failed ("interrupted"); return their ids."""
        sid = self.study_id(study)
        if sid is None:
            return []
        with self._session.begin() as s:
            rows = s.scalars(
                sa.select(TrialRow).where(TrialRow.study_id == sid, TrialRow.status == "running")
            ).all()
            out = []
            for t in rows:
                if t.id in keep:
                    continue
                t.status, t.finished_at = "failed", _now()
                t.error = "interrupted (its process died while the trial was running)"
                out.append(t.id)
            return out

    def live_running(self, study: str, grace_s: float = 120.0) -> set[int]:
        """Ids of running trials that still look alive: a live pid on this host, or a recent heartbeat elsewhere."""
        host, now, live = socket.gethostname(), time.time(), set()
        for t in self.trials(study, status="running"):
            if t["host"] == host and t["pid"] is not None:
                if pid_alive(t["pid"]):
                    live.add(t["id"])
            elif t["heartbeat_at"] is not None and now - t["heartbeat_at"] < grace_s:
                live.add(t["id"])
        return live

    # -- reading --------------------------------------------------------------------------------
    def trials(self, study: str, status: str | None = None) -> list[dict]:
        """The study's harness trials as plain dicts (JSON columns decoded), ordered by number."""
        q = (
            sa.select(TrialRow)
            .join(StudyRow, StudyRow.id == TrialRow.study_id)
            .where(StudyRow.name == study)
            .order_by(TrialRow.optuna_number)
        )
        if status:
            q = q.where(TrialRow.status == status)
        with self._session() as s:
            rows = s.scalars(q).all()
            out = []
            for t in rows:
                d = {c.name: getattr(t, c.key) for c in TrialRow.__table__.columns}
                for k in ("params_json", "config_json", "result_json"):
                    d[k[:-5]] = json.loads(d[k]) if d[k] else None
                out.append(d)
            return out

    def stages(self, trial_id: int) -> list[dict]:
        with self._session() as s:
            rows = s.scalars(
                sa.select(StageRow).where(StageRow.trial_id == trial_id).order_by(StageRow.stage)
            ).all()
            return [{c.name: getattr(r, c.key) for c in StageRow.__table__.columns} for r in rows]

    def close(self) -> None:
        self.engine.dispose()
        if self._optuna_storage is not None:
            self._optuna_storage.engine.dispose()
