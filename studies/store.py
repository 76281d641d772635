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

Store is the one facade; its parts live by concern: studies.trials (trial and stage rows, written and
read), studies.claims (grid-point claims, stale running trials), studies.legacy (rows of older stores).
This module holds the rest: the study rows, the Optuna storage, and opening and closing the database.

Any SQLAlchemy URL works (PostgreSQL for several machines). For SQLite the database is switched to
WAL and every connection (ours and Optuna's) waits up to BUSY_TIMEOUT_S for a lock; writes that
still hit "database is locked" are retried with backoff.
"""

from __future__ import annotations

import json
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from studies.claims import CLAIM_STALE_S, ClaimsMixin, point_key
from studies.db import (
    DEFAULT_URL,
    StoreError,
    created_concurrently,
    engine_kwargs,
    is_sqlite,
    make_engine,
    normalize_url,
    redact_url,
    retry_locked,
    retrying,
    sqlite_on_connect,
)
from studies.legacy import migrate_statuses
from studies.models import Base, StudyRow
from studies.records import StoredStudy
from studies.trials import TrialsMixin, dumps, utc_now

__all__ = ["CLAIM_STALE_S", "DEFAULT_URL", "Store", "point_key"]


class Store(ClaimsMixin, TrialsMixin):
    """The harness tables on one SQLAlchemy URL (the same database Optuna uses)."""

    def __init__(self, url: str = DEFAULT_URL, create: bool = True):
        self.url = normalize_url(url)  # one driver for ours and Optuna's engine (postgresql+psycopg)
        self.engine = make_engine(url, create=create)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._optuna_storage = None
        if create:
            self._create_tables()
            migrate_statuses(self._session)

    def _create_tables(self) -> None:
        created_concurrently(lambda: retry_locked(Base.metadata.create_all, self.engine))

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
                        row = StudyRow(name=name, spec_json=dumps(spec), preset=preset, created_at=utc_now())
                        s.add(row)
                    else:
                        row.spec_json, row.preset = dumps(spec), preset
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

    def close(self) -> None:
        self.engine.dispose()
        if self._optuna_storage is not None:
            self._optuna_storage.engine.dispose()
