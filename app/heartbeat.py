"""Worker heartbeats: each outbox worker refreshes its row every round, so that readiness
and metrics can tell a live worker from a dead or stuck one (from any replica)."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from app.models import WorkerHeartbeat


def beat(
    session: Session, *, worker_id: str, host: str, pid: int, started_at: datetime, now: datetime
) -> None:
    """Record that the worker is alive now (each worker writes only its own row)."""
    row = session.get(WorkerHeartbeat, worker_id)
    if row is None:
        session.add(
            WorkerHeartbeat(
                worker_id=worker_id, host=host[:255], pid=pid, started_at=started_at, seen_at=now
            )
        )
    else:
        row.seen_at = now
    session.flush()


def forget(session: Session, *, worker_id: str) -> None:
    """A worker that stops cleanly leaves no row behind to look stale."""
    session.execute(sa.delete(WorkerHeartbeat).where(col(WorkerHeartbeat.worker_id) == worker_id))


def prune(session: Session, *, before: datetime) -> None:
    """Rows of workers killed long ago (a clean stop removes its own)."""
    session.execute(sa.delete(WorkerHeartbeat).where(col(WorkerHeartbeat.seen_at) < before))


def newest(session: Session) -> datetime | None:
    """When any worker was last seen; None when no worker has ever run (or all stopped)."""
    # The row rather than max(): the ORM column gives back a UTC-aware time on SQLite too.
    row = session.exec(
        select(WorkerHeartbeat).order_by(col(WorkerHeartbeat.seen_at).desc()).limit(1)
    ).first()
    return row.seen_at if row is not None else None


def last_seen(session: Session, *, worker_id: str) -> datetime | None:
    row = session.get(WorkerHeartbeat, worker_id)
    return row.seen_at if row is not None else None


def alive(session: Session, *, since: datetime) -> int:
    """How many workers were seen since `since`."""
    count: int = session.exec(
        select(func.count()).where(col(WorkerHeartbeat.seen_at) >= since)
    ).one()
    return count
