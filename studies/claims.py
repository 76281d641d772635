"""Who runs what, across processes and hosts: grid-point claims (a unique insert, or a compare-and-set
takeover of a claimant that is gone) and the detection of running trials whose process died, which are then
marked interrupted. ClaimsMixin is one part of studies.store.Store, which supplies its session factory,
study_id and trials."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from studies.db import pid_alive, retry_locked, retrying
from studies.models import ClaimRow, Status, StudyRow, TrialRow
from studies.records import StoredClaim, StoredTrial
from studies.trials import utc_now

CLAIM_STALE_S = 120.0  # a claim whose heartbeat is older than this (4 missed beats) may be taken over
DIED_ERROR = "its process died while the trial was running"  # the error of a trial marked interrupted here


def point_key(row: str, variant: str | None, seed: int) -> str:
    """A grid point's claim key: canonical JSON of [row, variant, seed]."""
    return json.dumps([row, variant, int(seed)])


def _looks_alive(trial: StoredTrial, host: str, now: float, grace_s: float) -> bool:
    """A running trial's process is alive: its pid, when it runs on this host; else a heartbeat newer
    than grace_s (another host's pid cannot be checked)."""
    if trial.host == host and trial.pid is not None:
        return pid_alive(trial.pid)
    return trial.heartbeat_at is not None and now - trial.heartbeat_at < grace_s


class ClaimsMixin:
    """Grid-point claims and stale running trials; mixed into studies.store.Store."""

    _session: sessionmaker
    study_id: Callable[[str], int | None]
    trials: Callable[..., list[StoredTrial]]

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

    # -- stale running trials ---------------------------------------------------------------------
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
                t.status, t.finished_at = Status.INTERRUPTED, utc_now()
                t.error = DIED_ERROR
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
                .values(status=Status.INTERRUPTED, finished_at=utc_now(), error=DIED_ERROR)
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
