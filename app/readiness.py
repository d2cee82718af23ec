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

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

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


# A readiness check that gets no answer from the database in this long answers 503: a
# database that hangs (a frozen server, a connection cut without a word) is not ready.
DEADLINE_S = 3.0


class DatabaseSilent(Exception):
    """The database did not answer a readiness check within `DEADLINE_S`."""


class Probe:
    """Readiness checks run one at a time in a process, each probe awaiting the one under
    way for at most `DEADLINE_S`.

    A check runs in a thread and the driver has no read timeout: against a database that
    hangs, its thread waits as long as the database does. A probe per check would pile up
    a thread each, every few seconds, until the thread pool that also answers `/healthz`
    was full; and the orchestrator asking got no answer at all, not a 503.
    """

    def __init__(self) -> None:
        self._under_way: asyncio.Future[Report] | None = None

    async def check(self, work: Callable[[], Report]) -> Report:
        """`work()`'s report, the one under way's if a check is under way; raises
        DatabaseSilent after `DEADLINE_S`, and what `work` raised."""
        under_way = self._under_way
        if under_way is None or under_way.done():
            under_way = self._under_way = asyncio.ensure_future(run_in_threadpool(work))
            # Retrieved here when no probe waits any more (they gave up at the deadline).
            under_way.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(under_way), timeout=DEADLINE_S)
        except TimeoutError as e:
            raise DatabaseSilent from e
