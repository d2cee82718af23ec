"""Retention: what the service stops keeping, and when.

    requests nobody confirmed ------> after `pending`: the subscription row, its tokens and
    (pending, no live link, no           jobs go; its ledger events stay under the address's
    activity since the cut-off)          keyed hash (as an erasure's), without IP, user agent
                                         or page. A request that interrupted an earlier
                                         opt-out instead returns the row to that state (a
                                         `request_expired` event): the opt-out stands.
    used or expired confirm tokens --> after `pending`: deleted (unsubscribe tokens stay:
                                         the link in every past newsletter must still work)
    ledger IPs ----------------------> after `ip_truncate`: cut to 192.0.2.0/24 or
                                         2001:db8:1::/48; after `ip_drop`: removed
    people who left (unsubscribed, --> after `unsubscribed`: attributes, the mail throttle,
    bounced, complained)                 the ledger's user agents and pages, and finished jobs
                                         with their attempts go. The address, the status and
                                         every ledger event stay: they answer "did this person
                                         unsubscribe?" and keep the opt-out honoured (an
                                         import leaves an existing address alone; a sync
                                         reads the status).
    requests of blocked addresses --> after `unsubscribed`: their IP, user agent and page go;
    (ledger events under a keyed         the event stays under the hash, as the trace of what
    hash alone)                          was asked in the address's name.

Nothing a live confirmation depends on is touched (a pending row with an unused, unexpired
confirm token, or any ledger event since the cut-off, stays), nor what an opt-out depends on
(the row, its status, its unsubscribe token, a sync job not yet run).

`run` takes the caller's session and never commits: the worker's job and the CLI commit,
`newsletter retention run --dry-run` rolls back and prints the same counts.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from app import privacy
from app.config import Settings
from app.models import (
    ConsentAction,
    ConsentEvent,
    DeliveryAttempt,
    JobKind,
    JobState,
    OutboxJob,
    Subscription,
    SubscriptionStatus,
    Token,
    TokenPurpose,
)

log = logging.getLogger(__name__)

GONE = (SubscriptionStatus.UNSUBSCRIBED, SubscriptionStatus.BOUNCED, SubscriptionStatus.COMPLAINED)
# The audit log's actor for the worker's scheduled runs.
ACTOR = "worker:retention"
# Rows handled per statement, so that `IN (...)` lists stay small on any database.
CHUNK = 500


@dataclass(frozen=True, slots=True)
class Policy:
    pending: timedelta
    ip_truncate: timedelta
    ip_drop: timedelta
    unsubscribed: timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            pending=settings.retention_pending,
            ip_truncate=settings.retention_ip_truncate,
            ip_drop=settings.retention_ip_drop,
            unsubscribed=settings.retention_unsubscribed,
        )


@dataclass(slots=True)
class Report:
    pending_purged: int = 0
    # Unconfirmed requests that had interrupted an opt-out: back to that state.
    pending_reverted: int = 0
    tokens_purged: int = 0
    jobs_purged: int = 0
    ips_truncated: int = 0
    ips_dropped: int = 0
    records_minimized: int = 0
    events_minimized: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def summary(self) -> str:
        return " ".join(f"{name}={value}" for name, value in self.as_dict().items())


def _chunks(ids: list[int]) -> list[list[int]]:
    return [ids[n : n + CHUNK] for n in range(0, len(ids), CHUNK)]


def _delete_jobs(session: Session, condition: Any) -> int:
    """Delete the jobs matching `condition` with their attempts; how many jobs went."""
    job_ids = list(session.exec(select(OutboxJob.id).where(condition)).all())
    for chunk in _chunks([job_id for job_id in job_ids if job_id is not None]):
        session.execute(sa.delete(DeliveryAttempt).where(col(DeliveryAttempt.job_id).in_(chunk)))
        session.execute(sa.delete(OutboxJob).where(col(OutboxJob.id).in_(chunk)))
    return len(job_ids)


# Requests nobody confirmed ---------------------------------------------------------------------


def _stale_pending(session: Session, *, cutoff: datetime, now: datetime) -> list[Subscription]:
    live_link = (
        select(Token.id)
        .where(
            Token.subscription_id == Subscription.id,
            Token.purpose == TokenPurpose.CONFIRM,
            col(Token.used_at).is_(None),
            sa.or_(col(Token.expires_at).is_(None), col(Token.expires_at) > now),
        )
        .exists()
    )
    recent_event = (
        select(ConsentEvent.id)
        .where(ConsentEvent.subscription_id == Subscription.id, ConsentEvent.occurred_at >= cutoff)
        .exists()
    )
    # A job still held by a worker (a mail being sent): its row waits for the next run.
    running_job = (
        select(OutboxJob.id)
        .where(OutboxJob.subscription_id == Subscription.id, OutboxJob.state == JobState.RUNNING)
        .exists()
    )
    return list(
        session.exec(
            select(Subscription)
            .where(
                Subscription.status == SubscriptionStatus.PENDING,
                col(Subscription.created_at) < cutoff,
                col(Subscription.updated_at) < cutoff,
                sa.or_(
                    col(Subscription.last_mail_at).is_(None),
                    col(Subscription.last_mail_at) < cutoff,
                ),
                ~live_link,
                ~recent_event,
                ~running_job,
            )
            .order_by(col(Subscription.id))
            .with_for_update(skip_locked=True)
        ).all()
    )


def _status_before_request(session: Session, *, subscription_id: int) -> str | None:
    """The departure (unsubscribed, bounced, complained) an unconfirmed request interrupted."""
    return session.exec(
        select(ConsentEvent.status_after)
        .where(
            ConsentEvent.subscription_id == subscription_id,
            col(ConsentEvent.status_after).in_(GONE),
        )
        .order_by(col(ConsentEvent.occurred_at).desc(), col(ConsentEvent.id).desc())
        .limit(1)
    ).first()


def _purge_pending(session: Session, *, policy: Policy, key: bytes, now: datetime) -> Report:
    report = Report()
    for row in _stale_pending(session, cutoff=now - policy.pending, now=now):
        assert row.id is not None
        report.tokens_purged += int(
            session.connection()
            .execute(
                sa.delete(Token).where(
                    col(Token.subscription_id) == row.id, col(Token.purpose) == TokenPurpose.CONFIRM
                )
            )
            .rowcount
        )
        previous = _status_before_request(session, subscription_id=row.id)
        if previous is not None:
            # Its mails, and finished jobs; a sync still to run tells the backend of the
            # opt-out and stays.
            report.jobs_purged += _delete_jobs(
                session,
                sa.and_(
                    col(OutboxJob.subscription_id) == row.id,
                    sa.or_(
                        col(OutboxJob.kind) == JobKind.MAIL,
                        col(OutboxJob.state).in_([JobState.DONE, JobState.DEAD]),
                    ),
                ),
            )
            # The person left before; an unconfirmed request does not withdraw that.
            row.status = previous
            row.attributes = {}
            row.last_mail_at = None
            row.updated_at = now
            session.add(row)
            session.add(
                ConsentEvent(
                    subscription_id=row.id,
                    list_id=row.list_id,
                    action=ConsentAction.REQUEST_EXPIRED,
                    status_after=previous,
                    source="retention",
                    consent_version=row.consent_version,
                    detail={"note": "request not confirmed in time; the earlier opt-out stands"},
                    occurred_at=now,
                )
            )
            report.pending_reverted += 1
            continue
        report.jobs_purged += _delete_jobs(session, col(OutboxJob.subscription_id) == row.id)
        hashed = privacy.address_hash(row.email_key, key=key)
        session.execute(
            sa.update(ConsentEvent)
            .where(col(ConsentEvent.subscription_id) == row.id)
            .values(
                subscription_id=None,
                address_hash=hashed,
                ip=None,
                user_agent=None,
                source_url=None,
            )
        )
        session.delete(row)
        report.pending_purged += 1
    session.flush()
    # Confirm links of any subscription that were used or expired long ago.
    cutoff = now - policy.pending
    report.tokens_purged += int(
        session.connection()
        .execute(
            sa.delete(Token).where(
                col(Token.purpose) == TokenPurpose.CONFIRM,
                sa.or_(col(Token.used_at) < cutoff, col(Token.expires_at) < cutoff),
            )
        )
        .rowcount
    )
    return report


# Request IPs ------------------------------------------------------------------------------------


def truncate_ip(value: str) -> str | None:
    """`192.0.2.77` -> `192.0.2.0/24`, `2001:db8:1:2::5` -> `2001:db8:1::/48`; None if not an IP."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def _age_ips(session: Session, *, policy: Policy, now: datetime, report: Report) -> None:
    report.ips_dropped += int(
        session.connection()
        .execute(
            sa.update(ConsentEvent)
            .where(
                col(ConsentEvent.occurred_at) < now - policy.ip_drop,
                col(ConsentEvent.ip).is_not(None),
            )
            .values(ip=None)
        )
        .rowcount
    )
    # A truncated IP carries its prefix length, so it is never truncated twice.
    rows = session.exec(
        select(ConsentEvent.id, ConsentEvent.ip).where(
            col(ConsentEvent.occurred_at) < now - policy.ip_truncate,
            col(ConsentEvent.ip).is_not(None),
            sa.not_(col(ConsentEvent.ip).contains("/")),
        )
    ).all()
    changes = [{"event_id": event_id, "new_ip": truncate_ip(ip or "")} for event_id, ip in rows]
    if changes:
        # Core executemany (one statement, many rows); the session holds no such events.
        session.connection().execute(
            sa.update(ConsentEvent)
            .where(col(ConsentEvent.id) == sa.bindparam("event_id"))
            .values(ip=sa.bindparam("new_ip")),
            changes,
        )
    report.ips_truncated += len(changes)


# People who left -------------------------------------------------------------------------------


def _minimize_departed(session: Session, *, policy: Policy, now: datetime, report: Report) -> None:
    cutoff = now - policy.unsubscribed
    departed = select(Subscription.id).where(
        col(Subscription.status).in_(GONE),
        sa.func.coalesce(Subscription.unsubscribed_at, Subscription.updated_at) < cutoff,
    )
    with_data = set(
        session.exec(
            departed.where(
                sa.or_(
                    sa.cast(Subscription.attributes, sa.Text) != "{}",
                    col(Subscription.last_mail_at).is_not(None),
                )
            )
        ).all()
    )
    event_filter = sa.and_(
        col(ConsentEvent.subscription_id).in_(departed),
        sa.or_(
            col(ConsentEvent.user_agent).is_not(None), col(ConsentEvent.source_url).is_not(None)
        ),
    )
    with_events = set(
        session.exec(select(ConsentEvent.subscription_id).where(event_filter).distinct()).all()
    )
    # Finished jobs only: a sync not yet run still has to tell the backend of the opt-out.
    job_filter = sa.and_(
        col(OutboxJob.subscription_id).in_(departed),
        col(OutboxJob.state).in_([JobState.DONE, JobState.DEAD]),
    )
    with_jobs = set(
        session.exec(select(OutboxJob.subscription_id).where(job_filter).distinct()).all()
    )
    for chunk in _chunks(sorted(i for i in with_data if i is not None)):
        session.execute(
            sa.update(Subscription)
            .where(col(Subscription.id).in_(chunk))
            .values(attributes={}, last_mail_at=None)
        )
    report.events_minimized += int(
        session.connection()
        .execute(
            sa.update(ConsentEvent).where(event_filter).values(user_agent=None, source_url=None)
        )
        .rowcount
    )
    report.jobs_purged += _delete_jobs(session, job_filter)
    report.records_minimized += len(with_data | {i for i in with_events | with_jobs if i})


def _minimize_hash_only(session: Session, *, policy: Policy, now: datetime, report: Report) -> None:
    # Events under a keyed hash alone (a blocked address's requests; an erased or purged
    # subscriber's, already bare) belong to no departed subscription: the same age limit,
    # checked on the event itself, and nothing beyond the hash is kept.
    result = session.connection().execute(
        sa.update(ConsentEvent)
        .where(
            col(ConsentEvent.subscription_id).is_(None),
            col(ConsentEvent.address_hash).is_not(None),
            col(ConsentEvent.occurred_at) < now - policy.unsubscribed,
            sa.or_(
                col(ConsentEvent.ip).is_not(None),
                col(ConsentEvent.user_agent).is_not(None),
                col(ConsentEvent.source_url).is_not(None),
            ),
        )
        .values(ip=None, user_agent=None, source_url=None)
    )
    report.events_minimized += int(result.rowcount)


def run(session: Session, *, policy: Policy, key: bytes, now: datetime) -> Report:
    """Apply the retention policy once; what was removed, by kind."""
    report = _purge_pending(session, policy=policy, key=key, now=now)
    _age_ips(session, policy=policy, now=now, report=report)
    _minimize_departed(session, policy=policy, now=now, report=report)
    _minimize_hash_only(session, policy=policy, now=now, report=report)
    session.flush()
    return report


def log_done(report: Report) -> None:
    """The log line of a run once committed (a dry run, rolled back, writes none)."""
    log.info("retention.done %s", report.summary())
