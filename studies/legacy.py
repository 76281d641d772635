"""Reading stores written before `interrupted` was a trial status. Such a store kept an interrupted trial as
failed with an error text starting "interrupted"; this module is the one place that knows it: it reads
such a row's status as interrupted, widens a status filter so the SQL still finds those rows, and rewrites
them in place when a writer opens the store (Store(create=True))."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from studies.db import retrying
from studies.models import Status, TrialRow


def legacy_status(status: str, error: str | None) -> Status:
    """A trial row's status; a legacy one (failed, error "interrupted...") reads as interrupted."""
    legacy = status == Status.FAILED and (error or "").startswith("interrupted")
    return Status.INTERRUPTED if legacy else Status(status)


def stored_as(status: Status) -> tuple[Status, ...]:
    """The stored status values a row read as `status` may have (legacy_status on them decides)."""
    return (status, Status.FAILED) if status == Status.INTERRUPTED else (status,)


@retrying
def migrate_statuses(session: sessionmaker) -> None:
    """Rewrite legacy interrupted rows as interrupted."""
    with session.begin() as s:
        s.execute(
            sa.update(TrialRow)
            .where(TrialRow.status == Status.FAILED, TrialRow.error.like("interrupted%"))
            .values(status=Status.INTERRUPTED)
        )
