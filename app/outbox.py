"""The transactional outbox: jobs written in the same transaction as the state change.

Life of a job:

    pending --claim--> running --finish--> done
       ^                  |  \\--fail (permanent, or attempts exhausted)--> dead
       +--fail (retry)----+
       +--lease expired (the worker died)--+

A claim takes due jobs and leases them for `lease`; a worker that dies leaves its lease to
expire and another worker takes the job again. On PostgreSQL claims use
`FOR UPDATE SKIP LOCKED`, so several workers share the queue; on SQLite the write lock taken
at the start of every transaction serializes claims.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, SQLModel, col, select

from app import db
from app.db import OUTBOX_WRITTEN
from app.models import (
    AttemptOutcome,
    DeliveryAttempt,
    JobKind,
    JobState,
    OutboxJob,
    UTCDateTime,
)

ERROR_LIMIT = 2000


_TABLE = OutboxJob.__table__  # type: ignore[attr-defined]
_INSERT_KEYS = [
    "kind",
    "payload",
    "dedupe_key",
    "subscription_id",
    "state",
    "attempts",
    "next_attempt_at",
    "created_at",
    "updated_at",
]
_INSERT = db.Prepared(sa.insert(_TABLE).returning(_TABLE.c.id), insert_keys=_INSERT_KEYS)
_INSERT_LATER = db.Prepared(sa.insert(_TABLE), insert_keys=_INSERT_KEYS)


def enqueue(
    session: Session,
    *,
    kind: JobKind,
    payload: dict[str, Any],
    now: datetime,
    delay: timedelta = timedelta(0),
    dedupe_key: str | None = None,
) -> int:
    """Queue a job, written at once (one Core statement: every public request queues one);
    its id."""
    job_id: int = _INSERT.execute(
        session, _row(kind=kind, payload=payload, now=now, delay=delay, dedupe_key=dedupe_key)
    ).scalar()
    session.info[OUTBOX_WRITTEN] = True
    return job_id


def enqueue_later(
    session: Session,
    *,
    kind: JobKind,
    payload: dict[str, Any],
    now: datetime,
    delay: timedelta = timedelta(0),
    dedupe_key: str | None = None,
) -> None:
    """`enqueue` at the commit, if the session defers rows (`db.defer_inserts`): for a job
    nothing looks up before it runs, save by its dedupe key where the caller looks among
    the deferred rows too (`enqueue_sync`)."""
    _INSERT_LATER.defer(
        session, _row(kind=kind, payload=payload, now=now, delay=delay, dedupe_key=dedupe_key)
    )
    session.info[OUTBOX_WRITTEN] = True


def _row(
    *,
    kind: JobKind,
    payload: dict[str, Any],
    now: datetime,
    delay: timedelta,
    dedupe_key: str | None,
) -> dict[str, Any]:
    subscription_id = payload.get("subscription_id")
    return {
        "kind": kind.value,
        "payload": payload,
        "dedupe_key": dedupe_key,
        "subscription_id": subscription_id if isinstance(subscription_id, int) else None,
        "state": JobState.PENDING.value,
        "attempts": 0,
        "next_attempt_at": now + delay,
        "created_at": now,
        "updated_at": now,
    }


_PENDING_WITH_KEY = db.Prepared(
    sa.select(_TABLE.c.id, _TABLE.c.payload)
    .where(_TABLE.c.dedupe_key == sa.bindparam("key"), _TABLE.c.state == JobState.PENDING.value)
    .limit(1)
    .with_for_update()
)
_MERGE = db.Prepared(
    sa.update(_TABLE)
    .where(_TABLE.c.id == sa.bindparam("b_job_id"))
    .values(payload=sa.bindparam("b_payload"), updated_at=sa.bindparam("b_now"))
)


def enqueue_sync(
    session: Session, *, subscription_id: int, list_id: int, now: datetime, fresh_opt_in: bool
) -> None:
    """Ask for the subscription's current state to be pushed to its list's backend.

    The job carries no state: it reads the subscription when it runs, so the latest state
    wins, and a pending job for the same subscription absorbs this request. `fresh_opt_in`
    (a new confirmation) survives the merge: it lets an adapter clear old suppressions.
    """
    key = _sync_key(subscription_id)
    session.flush()
    # One this transaction has yet to write (a unit before this one in a group commit)
    # absorbs this request as it is; one it would change is written first, and merged below.
    for row in db.deferred_rows(session, _INSERT_LATER, subscription_id=subscription_id):
        if row["dedupe_key"] == key and (row["payload"]["fresh_opt_in"] or not fresh_opt_in):
            return
    db.write_deferred(session, table=_TABLE, subscription_id=subscription_id)
    pending = _PENDING_WITH_KEY.execute(session, {"key": key}).first()
    if pending is not None:
        payload = dict(pending.payload)
        if fresh_opt_in:
            payload["fresh_opt_in"] = True
        _MERGE.execute(session, {"b_job_id": pending.id, "b_payload": payload, "b_now": now})
        return
    enqueue_later(
        session,
        kind=JobKind.SYNC,
        payload=_sync_payload(subscription_id, list_id=list_id, fresh_opt_in=fresh_opt_in),
        now=now,
        dedupe_key=key,
    )


def enqueue_new_syncs(
    session: Session,
    *,
    subscription_ids: Sequence[int],
    list_id: int,
    now: datetime,
    delay: timedelta = timedelta(0),
) -> None:
    """`enqueue_sync` for subscriptions created in this transaction, in one statement, due
    after `delay`.

    A subscription made a moment ago has no pending sync job to merge with, so the per-row
    look-up (most of a large import's time) is skipped.
    """
    if not subscription_ids:
        return
    session.flush()  # as the ORM's own statements would
    _INSERT_LATER.execute_many(
        session,
        [
            {
                "kind": JobKind.SYNC.value,
                "dedupe_key": _sync_key(subscription_id),
                "subscription_id": subscription_id,
                "payload": _sync_payload(subscription_id, list_id=list_id, fresh_opt_in=False),
                "state": JobState.PENDING.value,
                "attempts": 0,
                "next_attempt_at": now + delay,
                "created_at": now,
                "updated_at": now,
            }
            for subscription_id in subscription_ids
        ],
    )
    session.info[OUTBOX_WRITTEN] = True


def release_syncs(session: Session, *, subscription_ids: Sequence[int], now: datetime) -> None:
    """Make the pending sync jobs of these subscriptions due now (those held back by
    `enqueue_new_syncs`'s delay), a few hundred keys per statement."""
    ids = list(subscription_ids)
    for start in range(0, len(ids), 500):
        keys = [_sync_key(subscription_id) for subscription_id in ids[start : start + 500]]
        session.connection().execute(
            sa.update(_TABLE)
            .where(
                _TABLE.c.dedupe_key.in_(keys),
                _TABLE.c.state == JobState.PENDING.value,
                _TABLE.c.next_attempt_at > now,
            )
            .values(next_attempt_at=now, updated_at=now)
        )
    session.info[OUTBOX_WRITTEN] = True


def _sync_key(subscription_id: int) -> str:
    return f"sync:{subscription_id}"


def _sync_payload(subscription_id: int, *, list_id: int, fresh_opt_in: bool) -> dict[str, Any]:
    return {"subscription_id": subscription_id, "list_id": list_id, "fresh_opt_in": fresh_opt_in}


def _pending_with_key(session: Session, key: str) -> OutboxJob | None:
    return session.exec(
        select(OutboxJob)
        .where(col(OutboxJob.dedupe_key) == key, col(OutboxJob.state) == JobState.PENDING)
        .with_for_update()
    ).first()


def schedule_reconcile(
    session: Session, *, list_slug: str, now: datetime, delay: timedelta
) -> None:
    """Make sure one reconciliation of the list is scheduled (any number of workers ask)."""
    key = f"reconcile:{list_slug}"
    if _pending_with_key(session, key) is None:
        enqueue(
            session,
            kind=JobKind.RECONCILE,
            payload={"list": list_slug},
            now=now,
            delay=delay,
            dedupe_key=key,
        )


RETENTION_KEY = "retention"


def schedule_retention(session: Session, *, now: datetime, delay: timedelta) -> None:
    """Make sure one retention run is scheduled (any number of workers ask)."""
    if _pending_with_key(session, RETENTION_KEY) is None:
        enqueue(
            session,
            kind=JobKind.RETENTION,
            payload={},
            now=now,
            delay=delay,
            dedupe_key=RETENTION_KEY,
        )


def request_reconcile(session: Session, *, list_slug: str, now: datetime) -> OutboxJob:
    """A reconciliation of the list as soon as a worker is free (a scheduled one moves up)."""
    pending = _pending_with_key(session, f"reconcile:{list_slug}")
    if pending is not None:
        pending.next_attempt_at = min(pending.next_attempt_at, now)
        pending.updated_at = now
        session.add(pending)
        session.flush()
        return pending
    job = session.get(
        OutboxJob,
        enqueue(
            session,
            kind=JobKind.RECONCILE,
            payload={"list": list_slug},
            now=now,
            dedupe_key=f"reconcile:{list_slug}",
        ),
    )
    assert job is not None
    return job


# Kinds the workers schedule ahead of time, one pending row each, due a whole interval after
# it was written: their wait starts when they fall due, not when they were written.
_SCHEDULED_KINDS = (JobKind.RECONCILE.value, JobKind.RETENTION.value)


def waiting_since(now: datetime) -> sa.ColumnElement[Any]:
    """Since when a job not done has been waiting for a worker; NULL while it is not due.

    A job never tried whose time has not come (the next retention run, a reconciliation,
    a mail held back by the mail budget, a change waiting behind an older one for the same
    address) is not late, so it does not count: the oldest job's age is meant for alerts on
    a worker that falls behind. A job once tried counts from its creation, backoff included.
    """
    not_due = sa.and_(_jobs.c.attempts == 0, _jobs.c.next_attempt_at > now)
    scheduled = sa.and_(_jobs.c.kind.in_(_SCHEDULED_KINDS), _jobs.c.attempts == 0)
    return sa.case(
        (not_due, sa.null()),
        (scheduled, _jobs.c.next_attempt_at),
        else_=_jobs.c.created_at,
    )


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    id: int
    kind: str
    payload: dict[str, Any]
    attempt: int
    created_at: datetime


# Claims, and the outcomes of a batch, go through prebuilt Core statements on the table: a
# worker runs them every round, and building and running an ORM query of whole entities cost
# several times as much CPU (the embedded worker shares the API process's GIL).
_jobs = SQLModel.metadata.tables["outbox_job"]
_attempts = SQLModel.metadata.tables["delivery_attempt"]


def _claim_query(*, of_kinds: bool) -> sa.Select[Any]:
    now = sa.bindparam("now", type_=UTCDateTime())
    job = _jobs.c
    due = sa.or_(
        sa.and_(job.state == JobState.PENDING.value, job.next_attempt_at <= now),
        sa.and_(job.state == JobState.RUNNING.value, job.lease_until <= now),
    )
    # The keys held by live jobs (running, lease not expired). A due job is never one of
    # them, so this is one uncorrelated set, computed once per claim. (A correlated
    # NOT EXISTS per candidate was planned on the `state` index by both databases: with
    # 100,000 jobs due and a batch of 1,000 running, one claim took 13 to 21 s.)
    other = _jobs.alias("other")
    held_keys = sa.select(other.c.dedupe_key).where(
        other.c.dedupe_key.is_not(None),
        other.c.state == JobState.RUNNING.value,
        other.c.lease_until > now,
    )
    query = sa.select(
        job.id, job.kind, job.dedupe_key, job.payload, job.attempts, job.created_at
    ).where(due, sa.or_(job.dedupe_key.is_(None), job.dedupe_key.not_in(held_keys)))
    if of_kinds:
        query = query.where(job.kind.in_(sa.bindparam("kinds", expanding=True)))
    return (
        query.order_by(job.next_attempt_at, job.id)
        .limit(sa.bindparam("limit", type_=sa.Integer()))
        .with_for_update(skip_locked=True)
    )


_CLAIM_ANY = _claim_query(of_kinds=False)
_CLAIM_OF_KINDS = _claim_query(of_kinds=True)
_LEASE = (
    sa.update(_jobs)
    .where(_jobs.c.id.in_(sa.bindparam("ids", expanding=True)))
    .values(
        state=JobState.RUNNING.value,
        attempts=_jobs.c.attempts + 1,
        lease_until=sa.bindparam("until", type_=UTCDateTime()),
        leased_by=sa.bindparam("holder", type_=sa.String()),
        updated_at=sa.bindparam("at", type_=UTCDateTime()),
    )
)


def claim(
    session: Session,
    *,
    worker: str,
    now: datetime,
    lease: timedelta,
    limit: int,
    kinds: Sequence[JobKind] | None = None,
) -> list[ClaimedJob]:
    """Lease up to `limit` due jobs (pending and due, or running with an expired lease).

    A job whose dedupe key is held by another live job waits for it: jobs of one
    subscription never run concurrently, so they apply in order.
    """
    # Jobs added in this session and not yet flushed are candidates too.
    session.flush()
    connection = session.connection()
    if kinds is None:
        rows = connection.execute(_CLAIM_ANY, {"now": now, "limit": limit})
    else:
        params = {"now": now, "limit": limit, "kinds": [JobKind(kind).value for kind in kinds]}
        rows = connection.execute(_CLAIM_OF_KINDS, params)
    claimed = []
    keys: set[str] = set()
    for row in rows.all():
        if row.dedupe_key is not None:
            if row.dedupe_key in keys:
                continue
            keys.add(row.dedupe_key)
        # The row is locked (FOR UPDATE; SQLite's write lock): the update below counts the
        # attempt exactly as read here.
        claimed.append(
            ClaimedJob(
                id=row.id,
                kind=row.kind,
                payload=dict(row.payload),
                attempt=row.attempts + 1,
                created_at=row.created_at,
            )
        )
    if claimed:
        connection.execute(
            _LEASE,
            {"ids": [job.id for job in claimed], "until": now + lease, "holder": worker, "at": now},
        )
    return claimed


def _held(session: Session, *, job_id: int, worker: str) -> OutboxJob | None:
    """The job if this worker still holds its lease (another worker may have taken it)."""
    job = session.get(OutboxJob, job_id, with_for_update=True)
    if job is None or job.state != JobState.RUNNING or job.leased_by != worker:
        return None
    return job


def _record(
    session: Session,
    *,
    job: ClaimedJob,
    worker: str,
    outcome: AttemptOutcome,
    started_at: datetime,
    now: datetime,
    error: str | None = None,
    response: str | None = None,
) -> None:
    session.add(
        DeliveryAttempt(
            job_id=job.id,
            attempt=job.attempt,
            worker=worker,
            outcome=outcome,
            error=error[:ERROR_LIMIT] if error else None,
            response=response[:ERROR_LIMIT] if response else None,
            started_at=started_at,
            finished_at=now,
        )
    )


def finish(
    session: Session,
    *,
    job: ClaimedJob,
    worker: str,
    started_at: datetime,
    now: datetime,
    response: str | None = None,
) -> None:
    _record(
        session,
        job=job,
        worker=worker,
        outcome=AttemptOutcome.SUCCESS,
        started_at=started_at,
        now=now,
        response=response,
    )
    held = _held(session, job_id=job.id, worker=worker)
    if held is None:
        return
    held.state = JobState.DONE
    held.lease_until = None
    held.leased_by = None
    held.finished_at = now
    held.updated_at = now


@dataclass(frozen=True, slots=True)
class Finished:
    """A job done (or with nothing left to do), waiting to be recorded with its batch."""

    job: ClaimedJob
    started_at: datetime
    finished_at: datetime
    response: str | None = None


_FINISH = (
    sa.update(_jobs)
    .where(
        _jobs.c.id == sa.bindparam("job_id", type_=sa.Integer()),
        _jobs.c.state == JobState.RUNNING.value,
        # Only while this worker holds the lease (another worker may have taken the job).
        _jobs.c.leased_by == sa.bindparam("holder", type_=sa.String()),
    )
    .values(
        state=JobState.DONE.value,
        lease_until=None,
        leased_by=None,
        finished_at=sa.bindparam("at", type_=UTCDateTime()),
        updated_at=sa.bindparam("at", type_=UTCDateTime()),
    )
)


def finish_many(session: Session, *, finished: Sequence[Finished], worker: str) -> None:
    """`finish` for a batch of jobs, in two statements whatever the batch's size."""
    if not finished:
        return
    connection = session.connection()
    connection.execute(
        sa.insert(_attempts),
        [
            {
                "job_id": done.job.id,
                "attempt": done.job.attempt,
                "worker": worker,
                "outcome": AttemptOutcome.SUCCESS.value,
                "error": None,
                "response": done.response[:ERROR_LIMIT] if done.response else None,
                "started_at": done.started_at,
                "finished_at": done.finished_at,
            }
            for done in finished
        ],
    )
    connection.execute(
        _FINISH,
        [{"job_id": done.job.id, "holder": worker, "at": done.finished_at} for done in finished],
    )


def supersede(session: Session, *, reasons: dict[int, str], worker: str, now: datetime) -> int:
    """Put dead jobs to rest whose work is done since (`reasons`: job id -> how): each becomes
    done, keeping its attempts, its last error and when it died, and gets one more attempt
    row, outcome `superseded`, saying how. The failed jobs' listing and the dead count no
    longer show it, `retry` no longer takes it, and retention and erasure treat it as any
    finished job. Returns how many were still dead (another worker may have been first)."""
    if not reasons:
        return 0
    connection = session.connection()
    rows = connection.execute(
        sa.update(_jobs)
        .where(_jobs.c.id.in_(sorted(reasons)), _jobs.c.state == JobState.DEAD.value)
        .values(state=JobState.DONE.value, updated_at=now)
        .returning(_jobs.c.id, _jobs.c.attempts)
    ).all()
    if rows:
        connection.execute(
            sa.insert(_attempts),
            [
                {
                    "job_id": row.id,
                    "attempt": row.attempts,
                    "worker": worker,
                    "outcome": AttemptOutcome.SUPERSEDED.value,
                    "error": None,
                    "response": reasons[row.id][:ERROR_LIMIT],
                    "started_at": now,
                    "finished_at": now,
                }
                for row in rows
            ],
        )
    return len(rows)


def backoff(*, attempt: int, base: timedelta, cap: timedelta) -> timedelta:
    """Exponential backoff with full jitter: uniform in [base, min(cap, base * 2^(attempt-1))]."""
    ceiling = min(cap.total_seconds(), base.total_seconds() * 2 ** min(attempt - 1, 30))
    floor = min(base.total_seconds(), ceiling)
    return timedelta(seconds=random.uniform(floor, ceiling))


# The longest wait a backend's Retry-After obtains when it asks for more than the longest
# backoff: a day's quota is waited for, a date years away is not (the job would sleep out
# of sight, as good as lost).
RETRY_AFTER_LIMIT = timedelta(days=1)


def retry_after_delay(seconds: float, *, max_delay: timedelta) -> timedelta:
    """The wait a backend's Retry-After (`seconds`, any float) obtains: as asked, up to
    the longer of `max_delay` and `RETRY_AFTER_LIMIT`."""
    limit = max(max_delay, RETRY_AFTER_LIMIT)
    # Compared as seconds: a timedelta of a Retry-After with enough digits overflows.
    return limit if seconds >= limit.total_seconds() else timedelta(seconds=max(0.0, seconds))


def fail(
    session: Session,
    *,
    job: ClaimedJob,
    worker: str,
    error: str,
    retryable: bool,
    started_at: datetime,
    now: datetime,
    max_attempts: int,
    base_delay: timedelta,
    max_delay: timedelta,
    response: str | None = None,
    retry_after: timedelta | None = None,
) -> JobState:
    """Schedule a retry, or move the job to the dead letters; returns the job's new state."""
    dead = not retryable or job.attempt >= max_attempts
    _record(
        session,
        job=job,
        worker=worker,
        outcome=AttemptOutcome.DEAD if dead else AttemptOutcome.RETRY,
        started_at=started_at,
        now=now,
        error=error,
        response=response,
    )
    held = _held(session, job_id=job.id, worker=worker)
    if held is None:
        return JobState.RUNNING
    held.last_error = error[:ERROR_LIMIT]
    held.lease_until = None
    held.leased_by = None
    held.updated_at = now
    if dead:
        held.state = JobState.DEAD
        held.finished_at = now
    else:
        held.state = JobState.PENDING
        delay = backoff(attempt=job.attempt, base=base_delay, cap=max_delay)
        if retry_after is not None:
            # The backend said when to come back (429 / 503 Retry-After): not before
            # (`retry_after_delay` bounds it).
            delay = max(delay, retry_after)
        held.next_attempt_at = now + delay
    return JobState(held.state)


def renew(
    session: Session, *, job_ids: Iterable[int], worker: str, now: datetime, lease: timedelta
) -> set[int]:
    """Extend this worker's leases on these jobs, for a batch that outlasts half its lease;
    the ids it still holds (a job whose lease ran out may have gone to another worker)."""
    ids = list(job_ids)
    if not ids:
        return set()
    rows = session.connection().execute(
        sa.update(OutboxJob)
        .where(
            col(OutboxJob.id).in_(ids),
            col(OutboxJob.leased_by) == worker,
            col(OutboxJob.state) == JobState.RUNNING,
        )
        .values(lease_until=now + lease, updated_at=now)
        .returning(col(OutboxJob.id))
    )
    return {row.id for row in rows}


def release(session: Session, *, job_ids: list[int], worker: str, now: datetime) -> int:
    """Give leased jobs back untouched (graceful shutdown); the attempt is not counted."""
    if not job_ids:
        return 0
    result = session.connection().execute(
        sa.update(OutboxJob)
        .where(
            col(OutboxJob.id).in_(job_ids),
            col(OutboxJob.leased_by) == worker,
            col(OutboxJob.state) == JobState.RUNNING,
        )
        .values(
            state=JobState.PENDING,
            attempts=col(OutboxJob.attempts) - 1,
            lease_until=None,
            leased_by=None,
            next_attempt_at=now,
            updated_at=now,
        )
    )
    return int(result.rowcount)


_POSTPONE = (
    sa.update(_jobs)
    .where(
        _jobs.c.id == sa.bindparam("b_id", type_=sa.Integer()),
        _jobs.c.leased_by == sa.bindparam("b_holder", type_=sa.String()),
        _jobs.c.state == JobState.RUNNING.value,
    )
    .values(
        state=JobState.PENDING.value,
        attempts=_jobs.c.attempts - 1,
        lease_until=None,
        leased_by=None,
        next_attempt_at=sa.bindparam("b_due", type_=UTCDateTime()),
        updated_at=sa.bindparam("b_now", type_=UTCDateTime()),
    )
)


def postpone(
    session: Session, *, until: Mapping[int, datetime], worker: str, now: datetime
) -> None:
    """Give leased jobs back untouched, each due again at its time (a job that waits for
    another one); the attempt is not counted. One statement whatever their number."""
    if not until:
        return
    session.connection().execute(
        _POSTPONE,
        [
            {"b_id": job_id, "b_holder": worker, "b_due": due, "b_now": now}
            for job_id, due in until.items()
        ],
    )
