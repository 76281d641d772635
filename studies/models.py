"""The harness's ORM models: its own tables beside Optuna's, in one database (prefixed harness_ so
they never clash). The status vocabulary (core.records.Status, re-exported here) and the grid-point claim
table live here too; studies.store holds the logic that reads and writes them."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.records import END_STATUSES, Status

__all__ = ["END_STATUSES", "Base", "ClaimRow", "StageRow", "Status", "StudyRow", "TrialRow"]


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


class ClaimRow(Base):
    """One row per grid point (row, variant, seed) of a study, taken atomically by the process that runs
    it: the unique key makes the claim exactly-once; heartbeat_at lets a dead claimant's point be taken
    over after a timeout. state: running (held) | done (its trial ended; --retry-failed may retake it)."""

    __tablename__ = "harness_claims"
    __table_args__ = (sa.UniqueConstraint("study_id", "point", name="uq_harness_claim_point"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("harness_studies.id"), index=True)
    point: Mapped[str] = mapped_column(sa.String(512))  # canonical JSON of [row, variant, seed]
    state: Mapped[str] = mapped_column(sa.String(16))
    owner: Mapped[str] = mapped_column(sa.String(255))  # host:pid:nonce of the claimant
    host: Mapped[str] = mapped_column(sa.String(255))
    pid: Mapped[int] = mapped_column(sa.Integer)
    heartbeat_at: Mapped[float] = mapped_column(sa.Float)  # unix time
    harness_id: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
