"""What operators read and do: search, records, stats, the job queue. Used by the admin API
and the CLI alike; functions take the caller's session and never commit."""

from __future__ import annotations

import base64
import binascii
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlmodel import Session, col, func, select

from app import addresses, errors, lists, outbox
from app.config import Locale
from app.models import (
    MAX_ROW_ID,
    ConsentEvent,
    DeliveryAttempt,
    JobKind,
    JobState,
    MailingList,
    OutboxJob,
    Subscription,
    SubscriptionStatus,
)

MAX_PAGE = 500
# The longest search prefix: an address's longest.
MAX_PREFIX = 254


# Cursors ----------------------------------------------------------------------------------


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The id a page starts after; BadRequest for anything this service did not hand out."""
    if cursor is None or cursor == "":
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        text = base64.urlsafe_b64decode(padded.encode("ascii")).decode("ascii")
        kind, _, value = text.partition(":")
        # An id past the column's range was not handed out (and PostgreSQL would refuse it
        # with an error rather than find nothing).
        if kind != "id" or not value.isdigit() or len(value) > 10 or int(value) > MAX_ROW_ID:
            raise ValueError(text)
        return int(value)
    except (ValueError, UnicodeError, binascii.Error) as e:
        raise errors.BadRequest("The cursor is not one this service handed out.") from e


# Subscribers -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubscriberFilter:
    status: SubscriptionStatus | None = None
    prefix: str | None = None
    locale: Locale | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    confirmed_after: datetime | None = None
    confirmed_before: datetime | None = None

    def __post_init__(self) -> None:
        # Bounds that cannot both hold would find nobody, which reads as "no subscriber":
        # refused wherever a filter is made (the API's query, the CLI's options).
        errors.check_period(
            self.created_after, self.created_before,
            start_name="created_after", end_name="created_before",
        )  # fmt: skip
        errors.check_period(
            self.confirmed_after, self.confirmed_before,
            start_name="confirmed_after", end_name="confirmed_before",
        )  # fmt: skip

    def given(self) -> dict[str, Any]:
        """The filters set, as the audit log keeps them (times in ISO 8601)."""
        return {
            name: value.isoformat() if isinstance(value, datetime) else value
            for name in self.__slots__
            if (value := getattr(self, name)) is not None
        }


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def subscriber_query(list_id: int, where: SubscriberFilter) -> Any:
    query = select(Subscription).where(Subscription.list_id == list_id)
    if where.status is not None:
        query = query.where(Subscription.status == where.status)
    if where.prefix:
        # The domain in Unicode or in ASCII (`xn--`), whole or typed half-way: keys hold it
        # in Unicode, `email_ascii_key` in ASCII.
        start = _escape_like(addresses.key_prefix(where.prefix)) + "%"
        query = query.where(
            sa.or_(
                col(Subscription.email_key).like(start, escape="\\"),
                col(Subscription.email_ascii_key).like(start, escape="\\"),
            )
        )
    if where.locale is not None:
        query = query.where(Subscription.locale == where.locale.value)
    if where.created_after is not None:
        query = query.where(col(Subscription.created_at) >= where.created_after)
    if where.created_before is not None:
        query = query.where(col(Subscription.created_at) < where.created_before)
    if where.confirmed_after is not None:
        query = query.where(col(Subscription.confirmed_at) >= where.confirmed_after)
    if where.confirmed_before is not None:
        query = query.where(col(Subscription.confirmed_at) < where.confirmed_before)
    return query


def search_subscribers(
    session: Session,
    *,
    list_slug: str,
    where: SubscriberFilter,
    cursor: str | None,
    limit: int,
) -> tuple[list[Subscription], str | None]:
    """One page in id order (keyset: fast on any page), and the next page's cursor."""
    after = decode_cursor(cursor)
    mailing_list = lists.get(session, slug=list_slug)
    assert mailing_list.id is not None
    query = subscriber_query(mailing_list.id, where)
    if after is not None:
        query = query.where(col(Subscription.id) > after)
    limit = max(1, min(limit, MAX_PAGE))
    rows = list(session.exec(query.order_by(col(Subscription.id)).limit(limit + 1)).all())
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1].id) if more and rows[-1].id is not None else None
    return rows, next_cursor


def find_subscriber(session: Session, *, list_slug: str, email: str) -> Subscription:
    mailing_list = lists.get(session, slug=list_slug)
    # The key as stored: a domain typed in ASCII (`xn--`) or in capitals is the same one.
    try:
        key = addresses.parse(email, new=False).key
    except addresses.InvalidAddress:
        key = unicodedata.normalize("NFC", email).casefold()
    row = session.exec(
        select(Subscription).where(
            Subscription.list_id == mailing_list.id, Subscription.email_key == key
        )
    ).first()
    if row is None:
        raise errors.NotFound("No subscriber with this address on this list.")
    return row


@dataclass(frozen=True, slots=True)
class SubscriberRecord:
    subscription: Subscription
    events: list[ConsentEvent]
    jobs: list[OutboxJob]
    attempts: list[DeliveryAttempt]


def subscriber_record(session: Session, *, list_slug: str, email: str) -> SubscriberRecord:
    """Everything about one subscriber: state, consent ledger, mails and syncs with attempts."""
    row = find_subscriber(session, list_slug=list_slug, email=email)
    events = list(
        session.exec(
            select(ConsentEvent)
            .where(ConsentEvent.subscription_id == row.id)
            .order_by(col(ConsentEvent.id))
        ).all()
    )
    jobs = list(
        session.exec(
            select(OutboxJob).where(OutboxJob.subscription_id == row.id).order_by(col(OutboxJob.id))
        ).all()
    )
    attempts = list(
        session.exec(
            select(DeliveryAttempt)
            .where(col(DeliveryAttempt.job_id).in_([job.id for job in jobs]))
            .order_by(col(DeliveryAttempt.id))
        ).all()
    )
    return SubscriberRecord(subscription=row, events=events, jobs=jobs, attempts=attempts)


# Stats ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stats:
    list_slug: str
    by_status: dict[str, int]
    series: dict[str, dict[str, int]]
    confirmation_rate: float | None
    sync_backlog: int
    oldest_pending_job_seconds: float | None
    dead_jobs: int


def stats(
    session: Session,
    *,
    list_slug: str,
    since: datetime,
    until: datetime,
    by_month: bool,
    now: datetime,
) -> Stats:
    """Raises BadRequest for a window that ends before it starts (`since` and `until`
    swapped), which would otherwise read as a list without activity."""
    errors.check_period(since, until, start_name="since", end_name="until")
    mailing_list = lists.get(session, slug=list_slug)
    by_status = {
        str(status): int(count)
        for status, count in session.exec(
            select(Subscription.status, func.count())
            .where(Subscription.list_id == mailing_list.id)
            .group_by(Subscription.status)
        ).all()
    }
    day = func.substr(sa.cast(ConsentEvent.occurred_at, sa.String), 1, 7 if by_month else 10)
    series: dict[str, dict[str, int]] = {}
    for bucket, action, count in session.exec(
        select(day, ConsentEvent.action, func.count())
        .where(
            ConsentEvent.list_id == mailing_list.id,
            col(ConsentEvent.occurred_at) >= since,
            col(ConsentEvent.occurred_at) < until,
            col(ConsentEvent.action).in_(["subscribe_requested", "confirmed", "unsubscribed"]),
        )
        .group_by(day, ConsentEvent.action)
    ).all():
        series.setdefault(str(bucket), {})[str(action)] = int(count)
    created = session.exec(
        select(func.count()).where(
            Subscription.list_id == mailing_list.id,
            col(Subscription.created_at) >= since,
            col(Subscription.created_at) < until,
        )
    ).one()
    confirmed = session.exec(
        select(func.count()).where(
            Subscription.list_id == mailing_list.id,
            col(Subscription.created_at) >= since,
            col(Subscription.created_at) < until,
            col(Subscription.confirmed_at).is_not(None),
        )
    ).one()
    backlog = session.exec(
        select(func.count(), func.min(OutboxJob.created_at)).where(
            col(OutboxJob.state).in_([JobState.PENDING, JobState.RUNNING]),
            OutboxJob.kind == JobKind.SYNC,
        )
    ).one()
    oldest = session.exec(
        select(func.min(outbox.waiting_since(now))).where(
            col(OutboxJob.state).in_([JobState.PENDING, JobState.RUNNING])
        )
    ).one()
    dead = session.exec(select(func.count()).where(OutboxJob.state == JobState.DEAD)).one()
    oldest_at = _aware(oldest)
    return Stats(
        list_slug=list_slug,
        by_status=by_status,
        series=dict(sorted(series.items())),
        confirmation_rate=round(confirmed / created, 4) if created else None,
        sync_backlog=int(backlog[0]),
        oldest_pending_job_seconds=(
            round((now - oldest_at).total_seconds(), 1) if oldest_at is not None else None
        ),
        dead_jobs=int(dead),
    )


def _aware(value: Any) -> datetime | None:
    """Aggregates bypass the column type: SQLite hands back text, PostgreSQL a datetime."""
    from app.models import UTCDateTime

    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return UTCDateTime().process_result_value(value, sqlite.dialect())


# Jobs -------------------------------------------------------------------------------------


class FailedJobState(StrEnum):
    """The states a failed job can be in: dead (out of attempts) or pending (waiting for
    its next attempt)."""

    DEAD = JobState.DEAD.value
    PENDING = JobState.PENDING.value


def failed_jobs(
    session: Session, *, state: FailedJobState | None, kind: JobKind | None, limit: int
) -> list[OutboxJob]:
    """Dead jobs, and pending ones that have failed at least once (retrying)."""
    query = select(OutboxJob)
    if state == FailedJobState.DEAD:
        query = query.where(OutboxJob.state == JobState.DEAD)
    elif state == FailedJobState.PENDING:
        query = query.where(
            OutboxJob.state == JobState.PENDING, col(OutboxJob.last_error).is_not(None)
        )
    else:
        query = query.where(
            sa.or_(
                col(OutboxJob.state) == JobState.DEAD,
                sa.and_(
                    col(OutboxJob.state) == JobState.PENDING,
                    col(OutboxJob.last_error).is_not(None),
                ),
            )
        )
    if kind is not None:
        query = query.where(OutboxJob.kind == kind)
    return list(
        session.exec(query.order_by(col(OutboxJob.id).desc()).limit(min(limit, MAX_PAGE))).all()
    )


def retry_jobs(session: Session, *, job_ids: list[int] | None, now: datetime) -> list[int]:
    """Put dead (or waiting) jobs back in the queue now, with a fresh attempt budget; the
    ids of those put back, in order."""
    query = sa.update(OutboxJob).where(
        col(OutboxJob.state).in_([JobState.DEAD, JobState.PENDING]),
        col(OutboxJob.last_error).is_not(None),
    )
    if job_ids is not None:
        query = query.where(col(OutboxJob.id).in_(job_ids))
    result = session.connection().execute(
        query.values(
            state=JobState.PENDING,
            attempts=0,
            next_attempt_at=now,
            finished_at=None,
            updated_at=now,
        ).returning(col(OutboxJob.id))
    )
    return sorted(job_id for job_id in result.scalars() if job_id is not None)


def all_lists(session: Session) -> list[MailingList]:
    return list(session.exec(select(MailingList).order_by(col(MailingList.slug))).all())
