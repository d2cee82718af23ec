"""Is this replica ready to serve? The database answers, its schema is at head, and the
outbox worker is alive.

Which worker counts:
- in-process (`NEWSLETTER_RUN_WORKER=true`): this process's own worker. A stale heartbeat
  means its thread died or hangs, so the replica is not ready (503 `worker_stale`) and an
  orchestrator restarts it.
- external (`newsletter worker`): the newest heartbeat of any worker, reported in the answer
  (`worker: fresh|stale|absent`) without failing readiness. Taking every API replica out of
  the load balancer because the worker is down would turn delayed mails into refused
  sign-ups, while the outbox keeps the work until a worker is back. Alert on the metrics
  `newsletter_workers_alive` / `newsletter_worker_heartbeat_age_seconds` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy.engine import Engine

from app import db, heartbeat, migrations


class WorkerState(StrEnum):
    FRESH = "fresh"
    STALE = "stale"
    ABSENT = "absent"


@dataclass(frozen=True, slots=True)
class Report:
    # None when ready; else the error code (`migrations_pending`, `worker_stale`).
    problem: str | None
    detail: str
    worker: WorkerState
    worker_seen_seconds_ago: float | None


def check(
    engine: Engine, *, own_worker: str | None, heartbeat_timeout: timedelta, now: datetime
) -> Report:
    """Raises SQLAlchemyError when the database does not answer."""
    db.ping(engine)
    current = migrations.current_revision(engine)
    head = migrations.head_revision()
    with db.session_scope(engine) as session:
        if own_worker is not None:
            seen = heartbeat.last_seen(session, worker_id=own_worker)
        else:
            seen = heartbeat.newest(session)
    age = (now - seen).total_seconds() if seen is not None else None
    if age is None:
        state = WorkerState.ABSENT
    elif age > heartbeat_timeout.total_seconds():
        state = WorkerState.STALE
    else:
        state = WorkerState.FRESH
    if current != head:
        return Report("migrations_pending", f"Schema at {current}, expected {head}.", state, age)
    if own_worker is not None and state != WorkerState.FRESH:
        when = f"{age:.0f} s ago" if age is not None else "never"
        return Report(
            "worker_stale", f"This process's outbox worker was last seen {when}.", state, age
        )
    return Report(None, "ready", state, age)
