"""What operators do to subscribers and to people: add a subscriber (an invitation, or as
already confirmed with evidence of consent), unsubscribe with a reason, and answer a data
protection request: access (everything held about an address) and erasure.

Used by the admin API and the CLI alike; functions take the caller's session and never
commit. `actor` is the key's name (or `cli:<user>`) and goes into the consent ledger.

Erasure, in one transaction:

    subscription rows ---------------> deleted (with their tokens)
    consent ledger events -----------> kept; subscription_id NULL, address_hash set,
                                       ip / user agent / source URL cleared, address
                                       scrubbed from the detail
    blocked requests' ledger events -> (already under the hash alone) ip / user agent /
                                       source URL cleared
    jobs of the subscriptions -------> deleted with their attempts (a running one is
                                       detached, and scrubbed once the removal has run)
    earlier jobs about the address --> pending or dead: deleted; done: scrubbed
    audit events naming the address -> the address replaced by `[erased]`
    each list's backend -------------> a `remove` job, the one place the address stays
                                       in clear until the worker has run it (the worker
                                       then scrubs it: `privacy.scrub_after_removal`)
    tombstone -----------------------> HMAC of the address in `erased_address`

The tombstone is permanent. It refuses an operator's "add as confirmed" (and the CSV
import) of that address; it never blocks the person's own double opt-in, nor an invitation
they must confirm: either is a fresh consent, recorded in the ledger as usual.

A block-list entry for the address stays, in clear: it is the operators' refusal, not the
person's data, and it has to keep matching (and be listed, and lifted) as before.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from app import (
    addresses,
    admin,
    blocklist,
    db,
    errors,
    lists,
    outbox,
    privacy,
    subscriptions,
    sync,
    tokens,
)
from app.config import Locale
from app.models import (
    AuditEvent,
    ConsentAction,
    ConsentEvent,
    DeliveryAttempt,
    ErasedAddress,
    JobKind,
    JobState,
    MailingList,
    OutboxJob,
    Subscription,
    SubscriptionStatus,
    Token,
    TokenPurpose,
)

# The ledger's `source` for everything an operator does.
OPERATOR = "operator"


class AddMode(StrEnum):
    # The normal double opt-in: a confirmation mail, the person decides.
    INVITE = "invite"
    # Consent given elsewhere (a paper form, an earlier tool), with evidence.
    CONFIRMED = "confirmed"


@dataclass(frozen=True, slots=True)
class ConsentProof:
    """Evidence of a consent given before or outside this service."""

    source: str
    note: str
    consented_at: date
    # The consent wording the person saw, when it differs from the list's current one.
    consent_version: str | None = None


def _find(session: Session, *, list_id: int, key: str) -> Subscription | None:
    # `populate_existing`: `subscriptions.subscribe` writes the row with a Core UPDATE,
    # which leaves an instance loaded before it as it was; a re-invited address that had
    # left was answered "unsubscribed" while it was pending again.
    return session.exec(
        select(Subscription)
        .where(Subscription.list_id == list_id, Subscription.email_key == key)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()


def _id(row: Subscription | MailingList) -> int:
    assert row.id is not None
    return row.id


# Adding and removing subscribers ----------------------------------------------------------


def add_subscriber(
    session: Session,
    *,
    list_slug: str,
    address: addresses.Address,
    mode: AddMode,
    locale: Locale | None,
    attributes: dict[str, str],
    proof: ConsentProof | None,
    actor: str,
    key: bytes,
    now: datetime,
    resend_interval: timedelta,
) -> Subscription:
    """Invite an address (double opt-in) or record it as confirmed on `proof`.

    Conflict for an address already confirmed on the list or on the block-list
    (`AddressBlocked`); for "confirmed", also for an erased address and for one that
    left the list after the consent `proof` cites.
    """
    mailing_list = lists.get(session, slug=list_slug)
    list_id = _id(mailing_list)
    # Either mode: an invitation to a blocked address would silently go nowhere.
    blocklist.refuse_if_blocked(session, email_key=address.key)
    existing = _find(session, list_id=list_id, key=address.key)
    if existing is not None and existing.status == SubscriptionStatus.CONFIRMED:
        raise errors.Conflict(
            f"This address is already a confirmed subscriber of {list_slug!r}; nothing to do."
        )
    if mode == AddMode.INVITE:
        subscriptions.subscribe(
            session,
            list_slug=list_slug,
            address=address,
            locale=locale,
            fallback_locale=None,
            attributes=attributes,
            evidence=subscriptions.Evidence(source=OPERATOR),
            key=key,
            now=now,
            resend_interval=resend_interval,
        )
        row = _find(session, list_id=list_id, key=address.key)
        assert row is not None
        _sign_latest_event(session, subscription=row, actor=actor)
        return row
    if proof is None:
        raise errors.BadRequest("Adding a confirmed subscriber needs evidence of the consent.")
    if proof.consented_at > now.date():
        raise errors.BadRequest("The date of the consent is in the future.")
    if privacy.is_erased(session, email_key=address.key, key=key):
        raise errors.Conflict(
            "This address was erased at its owner's request: only the person's own opt-in "
            "(an invitation they confirm) can bring it back."
        )
    return _add_confirmed(
        session,
        mailing_list=mailing_list,
        existing=existing,
        address=address,
        locale=locale,
        attributes=attributes,
        proof=proof,
        actor=actor,
        key=key,
        now=now,
    )


def _sign_latest_event(session: Session, *, subscription: Subscription, actor: str) -> None:
    """Name the operator in the ledger event `subscriptions.subscribe` just wrote."""
    event = session.exec(
        select(ConsentEvent)
        .where(ConsentEvent.subscription_id == subscription.id)
        .order_by(col(ConsentEvent.id).desc())
        .limit(1)
    ).first()
    if event is not None:
        event.detail = {**event.detail, "operator": actor}
        session.add(event)
        session.flush()


def _add_confirmed(
    session: Session,
    *,
    mailing_list: MailingList,
    existing: Subscription | None,
    address: addresses.Address,
    locale: Locale | None,
    attributes: dict[str, str],
    proof: ConsentProof,
    actor: str,
    key: bytes,
    now: datetime,
) -> Subscription:
    detail: dict[str, Any] = {
        "operator": actor,
        "evidence_source": proof.source,
        "note": proof.note,
        "consented_at": proof.consented_at.isoformat(),
    }
    if existing is None:
        row = Subscription(
            list_id=_id(mailing_list),
            email=address.email,
            email_key=address.key,
            email_ascii_key=address.ascii_key,
            status=SubscriptionStatus.CONFIRMED,
            locale=(locale or Locale(mailing_list.default_locale)).value,
            attributes=attributes,
            consent_version=proof.consent_version or mailing_list.consent_version,
            created_at=now,
            updated_at=now,
            confirmed_at=now,
        )
        session.add(row)
        session.flush()
    else:
        left_at = existing.unsubscribed_at
        if left_at is not None and left_at.date() >= proof.consented_at:
            raise errors.Conflict(
                f"This address left the list on {left_at.date().isoformat()}, not before the "
                f"consent you cite ({proof.consented_at.isoformat()}): that consent was "
                "withdrawn. Only a newer consent, or the person's own opt-in, brings it back."
            )
        row = existing
        detail["previous_status"] = row.status
        row.status = SubscriptionStatus.CONFIRMED
        row.email = address.email
        if locale is not None:
            row.locale = locale.value
        if attributes:
            row.attributes = attributes
        row.consent_version = proof.consent_version or mailing_list.consent_version
        row.confirmed_at = now
        row.unsubscribed_at = None
        row.updated_at = now
        row.last_mail_at = None
        session.add(row)
        tokens.retire(session, subscription_id=_id(row), purpose=TokenPurpose.CONFIRM, now=now)
    if tokens.live(session, subscription_id=_id(row), purpose=TokenPurpose.UNSUBSCRIBE) is None:
        tokens.issue(
            session, subscription=row, purpose=TokenPurpose.UNSUBSCRIBE, key=key, now=now, ttl=None
        )
    session.add(
        ConsentEvent(
            subscription_id=_id(row),
            list_id=row.list_id,
            action=ConsentAction.CONFIRMED,
            status_after=row.status,
            source=OPERATOR,
            consent_version=row.consent_version,
            detail=detail,
            occurred_at=now,
        )
    )
    # Not a fresh opt-in: suppressions at the backend (an unsubscription made there) are
    # cleared only by the person's own confirmation.
    outbox.enqueue_sync(
        session, subscription_id=_id(row), list_id=row.list_id, now=now, fresh_opt_in=False
    )
    session.flush()
    return row


def unsubscribe(
    session: Session,
    *,
    list_slug: str,
    address: addresses.Address,
    reason: str,
    actor: str,
    now: datetime,
) -> Subscription:
    """Unsubscribe on an operator's decision, with the reason in the ledger; the backend is
    told through the sync. No goodbye mail is sent: the person did not ask for this here.

    Idempotent: an address already unsubscribed (or bounced, complained) stays as it is.
    """
    mailing_list = lists.get(session, slug=list_slug)
    row = _find(session, list_id=_id(mailing_list), key=address.key)
    if row is None:
        raise errors.NotFound("No subscriber with this address on this list.")
    previous = SubscriptionStatus(row.status)
    if previous not in (SubscriptionStatus.PENDING, SubscriptionStatus.CONFIRMED):
        return row
    row.status = SubscriptionStatus.UNSUBSCRIBED
    row.unsubscribed_at = now
    row.updated_at = now
    row.last_mail_at = None
    session.add(row)
    tokens.retire(session, subscription_id=_id(row), purpose=TokenPurpose.CONFIRM, now=now)
    session.add(
        ConsentEvent(
            subscription_id=_id(row),
            list_id=row.list_id,
            action=ConsentAction.UNSUBSCRIBED,
            status_after=row.status,
            source=OPERATOR,
            consent_version=row.consent_version,
            detail={"reason": reason, "operator": actor, "previous_status": previous.value},
            occurred_at=now,
        )
    )
    outbox.enqueue_sync(
        session, subscription_id=_id(row), list_id=row.list_id, now=now, fresh_opt_in=False
    )
    session.flush()
    return row


# Access ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PersonRecord:
    """Everything held about one address, across lists."""

    email_key: str
    erased: bool
    # (list slug, record) per subscription.
    subscriptions: list[tuple[str, admin.SubscriberRecord]]
    # Jobs about the address that have no subscription row (backend removals, fixes).
    address_jobs: list[OutboxJob]
    address_attempts: list[DeliveryAttempt]
    # Ledger events kept from an earlier erasure, under the address's hash.
    erased_events: list[tuple[str, ConsentEvent]]
    # Audit events whose target names the address.
    audit: list[AuditEvent]

    @property
    def nothing_held(self) -> bool:
        """No subscription, job, erasure or ledger event: an address the service does not
        know (the audit log may still name it, from earlier look-ups)."""
        return not (self.erased or self.subscriptions or self.address_jobs or self.erased_events)


def _slugs(session: Session) -> dict[int, str]:
    return {_id(row): row.slug for row in session.exec(select(MailingList)).all()}


def _address_jobs(session: Session, *, key: str, slugs: dict[int, str]) -> list[OutboxJob]:
    # Under any spelling the jobs were keyed by: a reconciliation's fix goes by the backend's
    # (an internationalized domain in ASCII), an erasure's removal by the stored one.
    wanted = [
        job_key
        for list_id in slugs
        for job_key in sync.address_job_keys(list_id=list_id, address=key)
    ]
    return list(
        session.exec(
            select(OutboxJob)
            .where(col(OutboxJob.dedupe_key).in_(wanted))
            .order_by(col(OutboxJob.id))
        ).all()
    )


def _attempts(session: Session, jobs: list[OutboxJob]) -> list[DeliveryAttempt]:
    return list(
        session.exec(
            select(DeliveryAttempt)
            .where(col(DeliveryAttempt.job_id).in_([job.id for job in jobs]))
            .order_by(col(DeliveryAttempt.id))
        ).all()
    )


def _spellings(address: addresses.Address, rows: Collection[Subscription]) -> set[str]:
    """The ways an operator may have typed the address: its key, as asked, as stored. They
    differ beyond case where case folding changes letters (`straße` has the key
    `strasse`), which a case-insensitive match does not bridge."""
    return {address.key, address.email, *(row.email for row in rows)}


def _audit_mentioning(session: Session, *, spellings: set[str]) -> list[AuditEvent]:
    """Audit events whose target or detail names the address (any case, any spelling)."""
    if all(spelling.isascii() for spelling in spellings):
        # SQL's lower() folds ASCII everywhere; a non-ASCII address is looked for below.
        patterns = {spelling.lower() for spelling in spellings}
        query = select(AuditEvent).where(
            sa.or_(
                *(
                    column.contains(pattern, autoescape=True)
                    for pattern in sorted(patterns)
                    for column in (
                        func.lower(AuditEvent.target),
                        func.lower(sa.cast(AuditEvent.detail, sa.Text)),
                    )
                )
            )
        )
    else:
        query = select(AuditEvent)
    rows = session.exec(query.order_by(col(AuditEvent.id))).all()
    return [
        row
        for row in rows
        if any(
            privacy.mentions(row.target, address=spelling)
            or privacy.mentions(str(row.detail), address=spelling)
            for spelling in spellings
        )
    ]


def person_record(session: Session, *, address: addresses.Address, key: bytes) -> PersonRecord:
    """Everything held about an address (data protection access request)."""
    slugs = _slugs(session)
    rows = session.exec(
        select(Subscription)
        .where(Subscription.email_key == address.key)
        .order_by(col(Subscription.list_id))
    ).all()
    records = [
        (
            slugs[row.list_id],
            admin.subscriber_record(session, list_slug=slugs[row.list_id], email=address.key),
        )
        for row in rows
    ]
    jobs = _address_jobs(session, key=address.key, slugs=slugs)
    hashed = privacy.address_hash(address.key, key=key)
    erased_events = session.exec(
        select(ConsentEvent)
        .where(ConsentEvent.address_hash == hashed)
        .order_by(col(ConsentEvent.id))
    ).all()
    return PersonRecord(
        email_key=address.key,
        erased=privacy.is_erased(session, email_key=address.key, key=key),
        subscriptions=records,
        address_jobs=jobs,
        address_attempts=_attempts(session, jobs),
        erased_events=[(slugs[event.list_id], event) for event in erased_events],
        audit=_audit_mentioning(session, spellings=_spellings(address, rows)),
    )


# Erasure --------------------------------------------------------------------------------


@dataclass(slots=True)
class ErasureReport:
    address_hash: str
    subscriptions: int = 0
    ledger_events: int = 0
    tokens: int = 0
    jobs_deleted: int = 0
    jobs_scrubbed: int = 0
    audit_events: int = 0
    # Lists whose backend gets a removal job, and lists with no backend declared to tell.
    backend_removals: list[str] = field(default_factory=list)
    no_backend: list[str] = field(default_factory=list)
    # True when the tombstone was already there (an earlier erasure).
    already_erased: bool = False


def erase(
    session: Session,
    *,
    address: addresses.Address,
    key: bytes,
    backend_lists: Collection[str],
    now: datetime,
) -> ErasureReport:
    """Erase everything held about an address (data protection erasure request).

    Idempotent; an address never seen gets its tombstone all the same (the person asked not
    to be held, nor re-added). `backend_lists` are the slugs whose backend is declared in
    the settings: they get a removal job; other lists have no backend to tell.
    """
    hashed = privacy.address_hash(address.key, key=key)
    report = ErasureReport(address_hash=hashed)
    slugs = _slugs(session)
    rows = list(
        session.exec(
            select(Subscription).where(Subscription.email_key == address.key).with_for_update()
        ).all()
    )
    # How the address may be written in the audit log, the stored spellings included.
    spellings = _spellings(address, rows)
    # Jobs of the erased subscriptions still running: the removal waits for their lease
    # (an addition in flight must not land after it), then scrubs them.
    running: list[OutboxJob] = []
    # Each list's backend is asked to remove the address as it was sent there.
    spelling = {row.list_id: row.email for row in rows}
    for row in rows:
        report.ledger_events += _detach_ledger(session, subscription=row, hashed=hashed)
        report.tokens += _delete(session, Token, col(Token.subscription_id) == row.id)
        for job in session.exec(
            select(OutboxJob).where(OutboxJob.subscription_id == row.id).with_for_update()
        ).all():
            if job.state == JobState.RUNNING:
                job.subscription_id = None
                session.add(job)
                running.append(job)
            else:
                _delete_job(session, job)
                report.jobs_deleted += 1
        session.flush()
        session.delete(row)
        report.subscriptions += 1
    # Requests refused by the block-list left events under the hash alone, with evidence.
    report.ledger_events += _scrub_hashed_ledger(session, address=address, hashed=hashed)
    # Earlier jobs about the bare address (fixes from a reconciliation, an earlier erasure).
    for job in _address_jobs(session, key=address.key, slugs=slugs):
        spelling.setdefault(int(job.payload["list_id"]), job.payload.get("address", address.email))
        if job.state == JobState.RUNNING:
            continue  # the removal shares its dedupe key, so it runs after it
        if job.state == JobState.DONE:
            privacy.scrub_job(session, job=job, address=address.email, address_hash=hashed)
            report.jobs_scrubbed += 1
            continue
        # A removal still waiting (erased twice): the new one takes over what it had to scrub.
        for job_id in job.payload.get("scrub_job_ids", []):
            other = session.get(OutboxJob, job_id)
            if other is not None and other not in running:
                running.append(other)
        _delete_job(session, job)
        report.jobs_deleted += 1
    session.flush()
    for list_id in sorted(spelling.keys() & slugs.keys()):
        slug = slugs[list_id]
        if slug not in backend_lists:
            report.no_backend.append(slug)
            continue
        _enqueue_removal(
            session, list_id=list_id, address=spelling[list_id], running=running, now=now
        )
        report.backend_removals.append(slug)
    # Other people's jobs may quote the address too: a bulk call's answer lands on each.
    report.jobs_scrubbed += privacy.scrub_mentions(session, spellings=spellings)
    report.audit_events = _scrub_audit(session, spellings=spellings)
    report.already_erased = not _tombstone(session, hashed=hashed, now=now)
    session.flush()
    return report


def _detach_ledger(session: Session, *, subscription: Subscription, hashed: str) -> int:
    events = session.exec(
        select(ConsentEvent).where(ConsentEvent.subscription_id == subscription.id)
    ).all()
    for event in events:
        event.subscription_id = None
        event.address_hash = hashed
        event.ip = None
        event.user_agent = None
        event.source_url = None
        event.detail = privacy.scrub_json(dict(event.detail), address=subscription.email)
        session.add(event)
    return len(events)


def _scrub_hashed_ledger(session: Session, *, address: addresses.Address, hashed: str) -> int:
    events = session.exec(
        select(ConsentEvent).where(
            ConsentEvent.address_hash == hashed,
            col(ConsentEvent.subscription_id).is_(None),
            sa.or_(
                col(ConsentEvent.ip).is_not(None),
                col(ConsentEvent.user_agent).is_not(None),
                col(ConsentEvent.source_url).is_not(None),
            ),
        )
    ).all()
    for event in events:
        event.ip = None
        event.user_agent = None
        event.source_url = None
        event.detail = privacy.scrub_json(dict(event.detail), address=address.email)
        session.add(event)
    return len(events)


def _delete(session: Session, table: type[Any], condition: Any) -> int:
    result = session.connection().execute(sa.delete(table).where(condition))
    return int(result.rowcount)


def _delete_job(session: Session, job: OutboxJob) -> None:
    _delete(session, DeliveryAttempt, col(DeliveryAttempt.job_id) == job.id)
    session.delete(job)


def _enqueue_removal(
    session: Session,
    *,
    list_id: int,
    address: str,
    running: list[OutboxJob],
    now: datetime,
) -> None:
    leases = [job.lease_until for job in running if job.lease_until is not None]
    start = max([now, *leases])
    outbox.enqueue(
        session,
        kind=JobKind.SYNC,
        payload={
            **sync.address_job_payload(list_id=list_id, address=address, action=sync.Action.REMOVE),
            "scrub_job_ids": [job.id for job in running],
        },
        now=now,
        delay=start - now,
        dedupe_key=sync.address_job_key(list_id=list_id, address=address),
    )


def _scrub_audit(session: Session, *, spellings: set[str]) -> int:
    events = _audit_mentioning(session, spellings=spellings)
    for event in events:
        target, detail = event.target, dict(event.detail)
        for spelling in sorted(spellings):
            target = privacy.scrub_text(target, address=spelling)
            detail = privacy.scrub_json(detail, address=spelling)
        event.target, event.detail = target, detail
        session.add(event)
    return len(events)


def _tombstone(session: Session, *, hashed: str, now: datetime) -> bool:
    """Record the tombstone; false if it was already there. Safe under concurrency."""
    insert = db.dialect_insert(session)
    statement = (
        insert(ErasedAddress)
        .values(address_hash=hashed, erased_at=now)
        .on_conflict_do_nothing(index_elements=["address_hash"])
        .returning(col(ErasedAddress.id))
    )
    return session.connection().execute(statement).first() is not None
