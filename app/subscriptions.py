"""The subscription state machine.

    pending --confirm--> confirmed --unsubscribe--> unsubscribed --subscribe--> pending

Every function here takes the caller's session and never commits: the state change, its
consent-ledger event and the mail it causes are written in the caller's one transaction.
Answers to the public never depend on the state; the mail tells the truth instead.

A mail that a public request causes (a confirmation, an "already subscribed" note, an
unsubscribe link) is sent only if the caller's `MailBudget` allows it, asked right where the
mail would be queued: the rate limits count mails really sent, and stay out of this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlmodel import Session, select

from app import addresses, blocklist, db, errors, lists, outbox, privacy, tokens
from app.config import Locale
from app.db import OUTBOX_WRITTEN
from app.mails import MailKind
from app.models import (
    ConsentAction,
    ConsentEvent,
    JobKind,
    MailingList,
    Subscription,
    SubscriptionStatus,
    Token,
    TokenPurpose,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Evidence:
    """How a request reached us, as the privacy settings allow us to keep it."""

    source: str
    source_url: str | None = None
    ip: str | None = None
    user_agent: str | None = None


@dataclass(frozen=True, slots=True)
class MailPermit:
    """A mail budget's answer for one mail to one address: send now, later, or not at all."""

    send: bool = True
    delay: timedelta = timedelta(0)
    # Why the mail is held back or delayed, for the consent ledger (a rate limit's name).
    reason: str | None = None

    def ledger_detail(self, *, now: datetime) -> dict[str, Any]:
        if not self.send:
            return {"mail_suppressed": self.reason}
        if self.delay > timedelta(0):
            return {
                "mail_delayed_until": (now + self.delay).isoformat(),
                "mail_delay_reason": self.reason,
            }
        return {}


SEND_NOW = MailPermit()

# Asked "may this address be mailed now?" once a mail is certain to be queued otherwise;
# asking consumes the budget.
MailBudget = Callable[[addresses.Address], MailPermit]


def unlimited(_address: addresses.Address) -> MailPermit:
    return SEND_NOW


@dataclass(frozen=True, slots=True)
class Target:
    """What a token link points at, for the page that asks to press the button."""

    mailing_list: MailingList
    subscription: TargetState


@dataclass(frozen=True, slots=True)
class TargetState:
    """The subscription a link points at, as its page shows it."""

    status: str
    locale: str


class _Subscriber(Protocol):
    """What the ledger and the mail queue need of a subscription: a loaded row, or the
    few fields of one this request just inserted (`_Fields`)."""

    @property
    def id(self) -> int | None: ...
    @property
    def list_id(self) -> int: ...
    @property
    def status(self) -> str: ...
    @property
    def consent_version(self) -> str: ...


@dataclass(frozen=True, slots=True)
class _Fields:
    """A subscription's fields the ledger and the mail queue need, read or written with
    Core statements: no ORM object is made (group commit runs many of these a second, and
    building and flushing entities cost more than the SQL)."""

    id: int
    list_id: int
    status: str
    consent_version: str


_SUBSCRIPTIONS = Subscription.__table__  # type: ignore[attr-defined]
_EVENTS = ConsentEvent.__table__  # type: ignore[attr-defined]
_RECORD = db.Prepared(
    sa.insert(_EVENTS),
    insert_keys=[
        "subscription_id",
        "list_id",
        "action",
        "status_after",
        "source",
        "source_url",
        "consent_version",
        "ip",
        "user_agent",
        "detail",
        "occurred_at",
        "address_hash",
    ],
)


def _record(
    session: Session,
    *,
    subscription: _Subscriber,
    action: ConsentAction,
    evidence: Evidence,
    now: datetime,
    detail: dict[str, Any] | None = None,
) -> None:
    assert subscription.id is not None
    row = {
        "subscription_id": subscription.id,
        "list_id": subscription.list_id,
        "action": action.value,
        "status_after": subscription.status,
        "source": evidence.source,
        "source_url": evidence.source_url,
        "consent_version": subscription.consent_version,
        "ip": evidence.ip,
        "user_agent": evidence.user_agent,
        "detail": detail or {},
        "occurred_at": now,
        "address_hash": None,
    }
    if subscription.status in _GONE:
        # Written now, after the events before it: a confirmation reads these (`_LOCK`).
        db.write_deferred(session, table=_EVENTS, subscription_id=subscription.id)
        _RECORD.execute(session, row).close()
    else:
        _RECORD.defer(session, row)


def record_many(session: Session, events: list[dict[str, Any]]) -> None:
    """Ledger events written now, one pipeline for all (an import's batch): each with the
    columns `_record` writes."""
    if events:
        _RECORD.execute_many(session, events)


# Session.info key set while a blocked address's request rehearses the ordinary work.
_REHEARSAL = "blocklist_rehearsal"


def _blocked(
    session: Session,
    *,
    mailing_list: MailingList,
    address: addresses.Address,
    action: ConsentAction,
    evidence: Evidence,
    key: bytes,
    now: datetime,
    rehearse: Callable[[], object],
) -> bool:
    """For a blocked address: the ledger event alone, under the address's keyed hash.

    True when the address is blocked; the caller then returns at once. So that the answer
    takes as long as any other, `rehearse` first does the ordinary work (rows, token, mail
    job) inside a savepoint that is then rolled back: nothing of it is kept or sent.
    """
    if session.info.get(_REHEARSAL):
        return False
    kind = blocklist.match(session, email_key=address.key)
    if kind is None:
        return False
    outbox_written = session.info.get(OUTBOX_WRITTEN, False)
    session.info[_REHEARSAL] = True
    try:
        with db.rehearsal(session):
            rehearse()
    finally:
        session.info.pop(_REHEARSAL, None)
        # No job survives the rehearsal: no reason to wake the worker.
        session.info[OUTBOX_WRITTEN] = outbox_written
    assert mailing_list.id is not None
    # After the ledger's earlier events, as it would be without deferred rows.
    db.write_deferred(session, table=_EVENTS)
    session.add(
        ConsentEvent(
            subscription_id=None,
            address_hash=privacy.address_hash(address.key, key=key),
            list_id=mailing_list.id,
            action=action,
            status_after="blocked",
            source=evidence.source,
            source_url=evidence.source_url,
            consent_version=mailing_list.consent_version,
            ip=evidence.ip,
            user_agent=evidence.user_agent,
            detail={"blocked": kind.value, "mail_suppressed": "blocklist"},
            occurred_at=now,
        )
    )
    session.flush()
    log.info("subscription.blocked list_id=%s action=%s by=%s", mailing_list.id, action, kind)
    return True


_CLAIM_MAIL_SLOT = db.Prepared(
    sa.update(_SUBSCRIPTIONS)
    .where(
        _SUBSCRIPTIONS.c.id == sa.bindparam("b_id"),
        sa.or_(
            _SUBSCRIPTIONS.c.last_mail_at.is_(None),
            _SUBSCRIPTIONS.c.last_mail_at <= sa.bindparam("b_cutoff"),
        ),
    )
    .values(last_mail_at=sa.bindparam("b_now"))
)


def _claim_mail_slot(
    session: Session, *, subscription_id: int, now: datetime, interval: timedelta
) -> bool:
    """Atomically take the right to mail this address now; false if mailed too recently.

    One conditional UPDATE, so concurrent requests for one address cannot both win.
    """
    result = _CLAIM_MAIL_SLOT.execute(
        session, {"b_id": subscription_id, "b_cutoff": now - interval, "b_now": now}
    )
    return result.rowcount == 1


def _queue_mail(
    session: Session,
    *,
    kind: MailKind,
    subscription: _Subscriber,
    token_id: str | None,
    now: datetime,
    delay: timedelta = timedelta(0),
) -> None:
    outbox.enqueue_later(
        session,
        kind=JobKind.MAIL,
        payload={"mail": kind.value, "subscription_id": subscription.id, "token_id": token_id},
        now=now,
        delay=delay,
    )


def _ask(
    budget: MailBudget, *, address: addresses.Address, subscription: _Subscriber, kind: MailKind
) -> MailPermit:
    permit = budget(address)
    if not permit.send:
        log.info(
            "subscription.mail_suppressed list_id=%s subscription_id=%s mail=%s reason=%s",
            subscription.list_id,
            subscription.id,
            kind.value,
            permit.reason,
        )
    return permit


def _start_opt_in(
    session: Session,
    *,
    mailing_list: MailingList,
    subscription: _Subscriber,
    address: addresses.Address,
    mail_budget: MailBudget,
    key: bytes,
    now: datetime,
) -> dict[str, Any]:
    """Issue a confirmation link and queue its mail, as the budget allows; the ledger note."""
    permit = _ask(mail_budget, address=address, subscription=subscription, kind=MailKind.CONFIRM)
    if not permit.send:
        _rehearse_mail(
            session,
            mailing_list=mailing_list,
            subscription=subscription,
            address=address,
            key=key,
            now=now,
        )
        return permit.ledger_detail(now=now)
    # Earlier links stay valid until they expire, so whichever mail the visitor opens
    # works; confirming retires them all. A delayed mail's link lives as long from sending.
    token_id = tokens.insert(
        session,
        subscription_id=_id(subscription),
        purpose=TokenPurpose.CONFIRM,
        key=key,
        now=now,
        ttl=timedelta(seconds=mailing_list.confirm_ttl_seconds) + permit.delay,
        later=True,
    )
    _queue_mail(
        session,
        kind=MailKind.CONFIRM,
        subscription=subscription,
        token_id=str(token_id),
        now=now,
        delay=permit.delay,
    )
    return permit.ledger_detail(now=now)


def _rehearse_mail(
    session: Session,
    *,
    mailing_list: MailingList,
    subscription: _Subscriber | None,
    address: addresses.Address,
    key: bytes,
    now: datetime,
) -> None:
    """Make the writes a mail would cost (a subscription row if none, a token, an outbox
    job, a ledger event), then undo them: a request that sends no mail then takes about
    as long as one that does, so its timing does not tell an unknown, throttled or
    suppressed address from one that was mailed (bench/enumeration.py measures it).
    """
    with db.rehearsal(session):
        if subscription is None:
            subscription = _insert_if_new(
                session,
                _new_row(
                    mailing_list=mailing_list,
                    address=address,
                    locale=mailing_list.default_locale,
                    attributes={},
                    now=now,
                    last_mail_at=None,
                ),
            )
        if subscription is not None:
            token_id = tokens.insert(
                session,
                subscription_id=_id(subscription),
                purpose=TokenPurpose.CONFIRM,
                key=key,
                now=now,
                ttl=timedelta(seconds=mailing_list.confirm_ttl_seconds),
                later=True,
            )
            _queue_mail(
                session,
                kind=MailKind.CONFIRM,
                subscription=subscription,
                token_id=str(token_id),
                now=now,
            )
            session.flush()


def _id(subscription: _Subscriber) -> int:
    assert subscription.id is not None
    return subscription.id


def _find(session: Session, *, list_id: int, key: str, lock: bool) -> Subscription | None:
    # The row as it is now: a Core statement (a confirmation earlier in the same group
    # commit) may have changed it since this session last loaded it.
    query = (
        select(Subscription)
        .where(Subscription.list_id == list_id, Subscription.email_key == key)
        .execution_options(populate_existing=True)
    )
    if lock:
        query = query.with_for_update()
    return session.exec(query).first()


_LOCK_BY_ADDRESS = db.Prepared(
    sa.select(
        _SUBSCRIPTIONS.c.id,
        _SUBSCRIPTIONS.c.status,
        _SUBSCRIPTIONS.c.email,
        _SUBSCRIPTIONS.c.locale,
        _SUBSCRIPTIONS.c.attributes,
        _SUBSCRIPTIONS.c.consent_version,
        _SUBSCRIPTIONS.c.updated_at,
    )
    .where(
        _SUBSCRIPTIONS.c.list_id == sa.bindparam("list_id"),
        _SUBSCRIPTIONS.c.email_key == sa.bindparam("email_key"),
    )
    .with_for_update()
)
_SAVE = db.Prepared(
    sa.update(_SUBSCRIPTIONS)
    .where(_SUBSCRIPTIONS.c.id == sa.bindparam("b_id"))
    .values(
        status=sa.bindparam("b_status"),
        email=sa.bindparam("b_email"),
        locale=sa.bindparam("b_locale"),
        attributes=sa.bindparam("b_attributes"),
        consent_version=sa.bindparam("b_consent_version"),
        updated_at=sa.bindparam("b_updated_at"),
    )
)


def _new_row(
    *,
    mailing_list: MailingList,
    address: addresses.Address,
    locale: str,
    attributes: dict[str, str],
    now: datetime,
    last_mail_at: datetime | None,
) -> dict[str, Any]:
    """The columns of a new pending subscription, for `_insert_if_new`."""
    return {
        "list_id": mailing_list.id,
        "email": address.email,
        "email_key": address.key,
        "email_ascii_key": address.ascii_key,
        "status": SubscriptionStatus.PENDING.value,
        "locale": locale,
        "attributes": attributes,
        "consent_version": mailing_list.consent_version,
        "created_at": now,
        "updated_at": now,
        "last_mail_at": last_mail_at,
    }


# The columns `_new_row` gives (an import's confirmed rows add theirs: app/transfer.py).
NEW_ROW_KEYS = [
    "list_id",
    "email",
    "email_key",
    "email_ascii_key",
    "status",
    "locale",
    "attributes",
    "consent_version",
    "created_at",
    "updated_at",
    "last_mail_at",
]
# By dialect, made on first use (db.dialect_insert imports only the dialect in use).
_INSERT_IF_NEW: dict[str, db.Prepared] = {}


def _insert_if_new(session: Session, row: dict[str, Any]) -> _Fields | None:
    """Insert the subscription unless (list, address) exists; the new one, or None.

    `INSERT ... ON CONFLICT DO NOTHING` is atomic under concurrency on both databases, so
    two simultaneous first requests for one address create one row, without a savepoint.
    """
    dialect = session.get_bind().dialect.name
    statement = _INSERT_IF_NEW.get(dialect)
    if statement is None:
        statement = _INSERT_IF_NEW[dialect] = db.Prepared(
            db.dialect_insert(session)(_SUBSCRIPTIONS)
            .on_conflict_do_nothing(index_elements=["list_id", "email_key"])
            .returning(_SUBSCRIPTIONS.c.id),
            insert_keys=NEW_ROW_KEYS,
        )
    new_id = statement.execute(session, row).scalar()
    if new_id is None:
        return None
    return _Fields(
        id=new_id,
        list_id=row["list_id"],
        status=row["status"],
        consent_version=row["consent_version"],
    )


def _shown(detail: dict[str, Any], version: str | None) -> dict[str, Any]:
    # The form's page may predate a change of wording: the ledger says which one was read.
    return {**detail, "consent_version_shown": version[:64]} if version else detail


def subscribe(
    session: Session,
    *,
    list_slug: str,
    address: addresses.Address,
    locale: Locale | None,
    fallback_locale: Locale | None,
    attributes: dict[str, str],
    evidence: Evidence,
    key: bytes,
    now: datetime,
    resend_interval: timedelta,
    mail_budget: MailBudget = unlimited,
    shown_consent_version: str | None = None,
) -> MailingList:
    """Start (or restart) a double opt-in; never tells the caller which case it was.

    `locale` is the language the visitor chose; `fallback_locale` (the request's
    `Accept-Language`), then the list's language, apply only where none is stored yet.
    At most one mail per `resend_interval` goes to an address, and only as `mail_budget`
    allows; the request is recorded in the ledger either way. `shown_consent_version` is
    the wording version the visitor's page showed, kept in the ledger's detail.
    """
    mailing_list = lists.get_shared(session, slug=list_slug)
    assert mailing_list.id is not None
    if _blocked(
        session,
        mailing_list=mailing_list,
        address=address,
        action=ConsentAction.SUBSCRIBE_REQUESTED,
        evidence=evidence,
        key=key,
        now=now,
        rehearse=lambda: subscribe(
            session,
            list_slug=list_slug,
            address=address,
            locale=locale,
            fallback_locale=fallback_locale,
            attributes=attributes,
            evidence=evidence,
            key=key,
            now=now,
            resend_interval=resend_interval,
        ),
    ):
        return mailing_list
    chosen_locale = (locale or fallback_locale or Locale(mailing_list.default_locale)).value
    new = _insert_if_new(
        session,
        _new_row(
            mailing_list=mailing_list,
            address=address,
            locale=chosen_locale,
            attributes=attributes,
            now=now,
            last_mail_at=now,
        ),
    )
    if new is not None:
        mail_note = _start_opt_in(
            session,
            mailing_list=mailing_list,
            subscription=new,
            address=address,
            mail_budget=mail_budget,
            key=key,
            now=now,
        )
        _record(
            session,
            subscription=new,
            action=ConsentAction.SUBSCRIBE_REQUESTED,
            evidence=evidence,
            now=now,
            detail=_shown(mail_note, shown_consent_version),
        )
        return mailing_list

    current = _LOCK_BY_ADDRESS.execute(
        session, {"list_id": mailing_list.id, "email_key": address.key}
    ).first()
    assert current is not None
    status = SubscriptionStatus(current.status)
    detail: dict[str, Any] = {}
    changed = {
        "b_id": current.id,
        "b_status": current.status,
        "b_email": current.email,
        "b_locale": locale.value if locale is not None else current.locale,
        "b_attributes": current.attributes,
        "b_consent_version": current.consent_version,
        "b_updated_at": current.updated_at,
    }
    if status == SubscriptionStatus.CONFIRMED:
        # Anyone may send this address's request: nothing the person chose changes, their
        # language (of their mails and pages, and a member variable at the backend) neither.
        changed["b_locale"] = current.locale
        detail = {"note": "already confirmed"}
    elif status == SubscriptionStatus.PENDING:
        # The confirmation that follows answers this request, under today's wording and
        # with the values it carries: a visitor who corrects a field and sends the form
        # again confirms what they sent last. A request without any (a bare "send me a new
        # link") keeps those of the one before.
        changed["b_consent_version"] = mailing_list.consent_version
        if attributes:
            changed["b_attributes"] = attributes
    else:
        # Unsubscribed (or bounced, complained): a new request is a new consent to prove.
        changed |= {
            "b_status": SubscriptionStatus.PENDING.value,
            "b_email": address.email,
            "b_attributes": attributes,
            "b_consent_version": mailing_list.consent_version,
            "b_updated_at": now,
        }
        detail = {"previous_status": status.value}
    # One statement whatever changed, so every state costs the same.
    _SAVE.execute(session, changed)
    subscription = _Fields(
        id=current.id,
        list_id=mailing_list.id,
        status=changed["b_status"],
        consent_version=changed["b_consent_version"],
    )
    if _claim_mail_slot(session, subscription_id=current.id, now=now, interval=resend_interval):
        if status == SubscriptionStatus.CONFIRMED:
            # The mail tells the truth the answer hides, with a way out.
            permit = _ask(
                mail_budget,
                address=address,
                subscription=subscription,
                kind=MailKind.ALREADY_SUBSCRIBED,
            )
            if permit.send:
                _queue_mail(
                    session,
                    kind=MailKind.ALREADY_SUBSCRIBED,
                    subscription=subscription,
                    token_id=_unsubscribe_token(
                        session, subscription=subscription, key=key, now=now
                    ),
                    now=now,
                    delay=permit.delay,
                )
            else:
                _rehearse_mail(
                    session,
                    mailing_list=mailing_list,
                    subscription=subscription,
                    address=address,
                    key=key,
                    now=now,
                )
            detail |= permit.ledger_detail(now=now)
        else:
            detail |= _start_opt_in(
                session,
                mailing_list=mailing_list,
                subscription=subscription,
                address=address,
                mail_budget=mail_budget,
                key=key,
                now=now,
            )
    else:
        # Mailed too recently: no mail, the same work.
        _rehearse_mail(
            session,
            mailing_list=mailing_list,
            subscription=subscription,
            address=address,
            key=key,
            now=now,
        )
    _record(
        session,
        subscription=subscription,
        action=ConsentAction.SUBSCRIBE_REQUESTED,
        evidence=evidence,
        now=now,
        detail=_shown(detail, shown_consent_version),
    )
    return mailing_list


def _unsubscribe_token(
    session: Session, *, subscription: _Subscriber, key: bytes, now: datetime
) -> str:
    """The subscriber's standing unsubscribe token (its id), issued on first need."""
    token_id = tokens.live_id(
        session, subscription_id=_id(subscription), purpose=TokenPurpose.UNSUBSCRIBE
    )
    if token_id is None:
        token_id = tokens.insert(
            session,
            subscription_id=_id(subscription),
            purpose=TokenPurpose.UNSUBSCRIBE,
            key=key,
            now=now,
            ttl=None,
        )
    return str(token_id)


def _target(session: Session, *, subscription_id: int) -> Target:
    subscription = session.get(Subscription, subscription_id)
    if subscription is None:
        raise errors.TokenNotFound()
    return _target_of(session, list_id=subscription.list_id, state=subscription)


def _target_of(session: Session, *, list_id: int, state: Subscription | TargetState) -> Target:
    return Target(
        mailing_list=lists.get_shared_by_id(session, list_id=list_id),
        subscription=TargetState(status=state.status, locale=state.locale),
    )


def _lookup(session: Session, *, secret: str, purpose: TokenPurpose, now: datetime) -> tokens.Live:
    try:
        return tokens.lookup(session, secret=secret, purpose=purpose, now=now)
    except (errors.TokenExpired, errors.TokenUsed) as e:
        # Say which list, so the page can offer to ask again, in the subscriber's language.
        token = session.exec(
            select(Token).where(Token.token_hash == tokens.hash_of(secret))
        ).first()
        if token is not None:
            target = _target(session, subscription_id=token.subscription_id)
            error: type[errors.DomainError] = type(e)
            if (
                isinstance(e, errors.TokenUsed)
                and purpose == TokenPurpose.CONFIRM
                and target.subscription.status != SubscriptionStatus.CONFIRMED
            ):
                error = errors.TokenUsedNotSubscribed
            slug, locale = target.mailing_list.slug, target.subscription.locale
            raise error(list_slug=slug, locale=locale) from e
        raise


def _spent(
    session: Session, *, list_id: int, locale: str, subscribed: bool = True
) -> errors.TokenUsed:
    """A link already used, from the list and language of its subscription."""
    mailing_list = lists.get_shared_by_id(session, list_id=list_id)
    error = errors.TokenUsed if subscribed else errors.TokenUsedNotSubscribed
    return error(list_slug=mailing_list.slug, locale=locale)


_GONE = (
    SubscriptionStatus.UNSUBSCRIBED.value,
    SubscriptionStatus.BOUNCED.value,
    SubscriptionStatus.COMPLAINED.value,
)


def confirmation_target(session: Session, *, secret: str, now: datetime) -> Target:
    """What a confirm link would confirm; changes nothing (mail scanners follow links)."""
    token = _lookup(session, secret=secret, purpose=TokenPurpose.CONFIRM, now=now)
    return _target(session, subscription_id=token.subscription_id)


_LOCK = db.Prepared(
    sa.select(
        _SUBSCRIPTIONS.c.list_id,
        _SUBSCRIPTIONS.c.status,
        _SUBSCRIPTIONS.c.locale,
        _SUBSCRIPTIONS.c.consent_version,
        # Did this address leave the list before (unsubscribed, bounced, complained)? Only
        # then may the backend hold a suppression from that departure for the sync to clear
        # on this new opt-in. Checking every first-time address instead costs two calls
        # each at Mailgun (no bulk suppression API): 200,000 for 100,000 confirmations.
        sa.exists()
        .where(
            _EVENTS.c.subscription_id == _SUBSCRIPTIONS.c.id,
            # Fixed parameters, not an expanding IN: `db.Prepared` compiles it once.
            _EVENTS.c.status_after.in_([sa.literal(status) for status in _GONE]),
        )
        .label("left_before"),
    )
    .where(_SUBSCRIPTIONS.c.id == sa.bindparam("subscription_id"))
    .with_for_update(of=_SUBSCRIPTIONS)
)
_CONFIRMED = db.Prepared(
    sa.update(_SUBSCRIPTIONS)
    .where(_SUBSCRIPTIONS.c.id == sa.bindparam("b_id"))
    .values(
        status=SubscriptionStatus.CONFIRMED.value,
        confirmed_at=sa.bindparam("b_now"),
        unsubscribed_at=None,
        updated_at=sa.bindparam("b_now"),
        # The mail throttle guards against floods from strangers; a state change made with
        # a link from the mailbox proves the owner acted, so the next request may mail.
        last_mail_at=None,
    )
)


def confirm(
    session: Session, *, secret: str, evidence: Evidence, key: bytes, now: datetime
) -> Target:
    token = _lookup(session, secret=secret, purpose=TokenPurpose.CONFIRM, now=now)
    subscription_id = token.subscription_id
    # Lock the subscription row: two presses of the button confirm once.
    row = _LOCK.execute(session, {"subscription_id": subscription_id}).first()
    assert row is not None
    if row.status not in (SubscriptionStatus.PENDING, SubscriptionStatus.CONFIRMED):
        raise _spent(session, list_id=row.list_id, locale=row.locale, subscribed=False)
    # Used by a press that came first (it held the lock): this one confirms nothing. Else
    # the subscription's other confirmation links are retired with it.
    if not tokens.use(
        session,
        token_id=token.id,
        subscription_id=subscription_id,
        purpose=TokenPurpose.CONFIRM,
        now=now,
    ):
        raise _spent(session, list_id=row.list_id, locale=row.locale)
    if row.status == SubscriptionStatus.CONFIRMED:
        return _target_of(session, list_id=row.list_id, state=TargetState(row.status, row.locale))
    _CONFIRMED.execute(session, {"b_id": subscription_id, "b_now": now})
    confirmed = _Fields(
        id=subscription_id,
        list_id=row.list_id,
        status=SubscriptionStatus.CONFIRMED.value,
        consent_version=row.consent_version,
    )
    # The standing unsubscribe link, unless one is left from an earlier subscription.
    tokens.ensure(
        session,
        subscription_id=subscription_id,
        purpose=TokenPurpose.UNSUBSCRIBE,
        key=key,
        now=now,
    )
    _record(
        session, subscription=confirmed, action=ConsentAction.CONFIRMED, evidence=evidence, now=now
    )
    outbox.enqueue_sync(
        session,
        subscription_id=subscription_id,
        list_id=row.list_id,
        now=now,
        fresh_opt_in=bool(row.left_before),
    )
    log.info("subscription.confirmed list_id=%s subscription_id=%s", row.list_id, subscription_id)
    return _target_of(session, list_id=row.list_id, state=TargetState(confirmed.status, row.locale))


def unsubscription_target(session: Session, *, secret: str, now: datetime) -> Target:
    token = _lookup(session, secret=secret, purpose=TokenPurpose.UNSUBSCRIBE, now=now)
    return _target(session, subscription_id=token.subscription_id)


def unsubscribe(
    session: Session, *, secret: str, evidence: Evidence, now: datetime, send_goodbye: bool
) -> Target:
    """Unsubscribe by link. Idempotent: an already unsubscribed address stays so."""
    token = _lookup(session, secret=secret, purpose=TokenPurpose.UNSUBSCRIBE, now=now)
    subscription = session.get(Subscription, token.subscription_id, with_for_update=True)
    assert subscription is not None
    previous = SubscriptionStatus(subscription.status)
    if previous in (SubscriptionStatus.PENDING, SubscriptionStatus.CONFIRMED):
        subscription.status = SubscriptionStatus.UNSUBSCRIBED
        subscription.unsubscribed_at = now
        subscription.updated_at = now
        subscription.last_mail_at = None
        session.add(subscription)
        tokens.retire(
            session, subscription_id=_id(subscription), purpose=TokenPurpose.CONFIRM, now=now
        )
        _record(
            session,
            subscription=subscription,
            action=ConsentAction.UNSUBSCRIBED,
            evidence=evidence,
            now=now,
            detail={"previous_status": previous.value},
        )
        outbox.enqueue_sync(
            session,
            subscription_id=_id(subscription),
            list_id=subscription.list_id,
            now=now,
            fresh_opt_in=False,
        )
        if send_goodbye and previous == SubscriptionStatus.CONFIRMED:
            _queue_mail(
                session, kind=MailKind.GOODBYE, subscription=subscription, token_id=None, now=now
            )
        log.info(
            "subscription.unsubscribed list_id=%s subscription_id=%s source=%s",
            subscription.list_id,
            subscription.id,
            evidence.source,
        )
    session.flush()
    return _target(session, subscription_id=_id(subscription))


def request_unsubscribe(
    session: Session,
    *,
    list_slug: str,
    address: addresses.Address,
    evidence: Evidence,
    key: bytes,
    now: datetime,
    resend_interval: timedelta,
    mail_budget: MailBudget = unlimited,
) -> MailingList:
    """Mail an unsubscribe link to a subscribed address; nothing else, whatever the state.

    Every state takes the same steps (find and lock, claim the mail slot, ask the budget,
    queue, record), each a no-op where it does not apply, with no early return: the
    request's timing then says as little as its answer.
    """
    mailing_list = lists.get_shared(session, slug=list_slug)
    assert mailing_list.id is not None
    if _blocked(
        session,
        mailing_list=mailing_list,
        address=address,
        action=ConsentAction.UNSUBSCRIBE_REQUESTED,
        evidence=evidence,
        key=key,
        now=now,
        rehearse=lambda: request_unsubscribe(
            session,
            list_slug=list_slug,
            address=address,
            evidence=evidence,
            key=key,
            now=now,
            resend_interval=resend_interval,
        ),
    ):
        return mailing_list
    subscription = _find(session, list_id=mailing_list.id, key=address.key, lock=True)
    subscribed = subscription is not None and subscription.status == SubscriptionStatus.CONFIRMED
    detail: dict[str, Any] = {}
    if subscription is not None and not subscribed:
        detail = {"note": f"not subscribed ({subscription.status})"}
    mailed = False
    if (
        subscription is not None
        and subscribed
        and _claim_mail_slot(
            session, subscription_id=_id(subscription), now=now, interval=resend_interval
        )
    ):
        permit = _ask(
            mail_budget, address=address, subscription=subscription, kind=MailKind.UNSUBSCRIBE
        )
        if permit.send:
            token_id = _unsubscribe_token(session, subscription=subscription, key=key, now=now)
            _queue_mail(
                session,
                kind=MailKind.UNSUBSCRIBE,
                subscription=subscription,
                token_id=token_id,
                now=now,
                delay=permit.delay,
            )
            mailed = True
        detail = permit.ledger_detail(now=now)
    if not mailed:
        _rehearse_mail(
            session,
            mailing_list=mailing_list,
            subscription=subscription,
            address=address,
            key=key,
            now=now,
        )
    if subscription is not None:
        # Pending or gone addresses too: the ledger keeps that someone asked.
        _record(
            session,
            subscription=subscription,
            action=ConsentAction.UNSUBSCRIBE_REQUESTED,
            evidence=evidence,
            now=now,
            detail=detail,
        )
    session.flush()
    return mailing_list


# What a backend may report about a member, and the state it leads to.
BACKEND_EVENTS = {
    "unsubscribed": SubscriptionStatus.UNSUBSCRIBED,
    "complained": SubscriptionStatus.COMPLAINED,
    "bounced": SubscriptionStatus.BOUNCED,
}


# How far a backend's clock may be from ours: an event reported within this of a
# confirmation is taken as after it (leaving and confirming anew takes a mail's round trip).
BACKEND_CLOCK_SKEW = timedelta(seconds=2)


def _left_before(session: Session, *, subscription_id: int) -> bool:
    """Whether the subscription was ever gone (unsubscribed, bounced, complained): only
    then is its confirmation a renewal, after which an older event is about the past."""
    query = sa.select(
        sa.exists().where(
            _EVENTS.c.subscription_id == subscription_id,
            _EVENTS.c.status_after.in_(_GONE),
        )
    )
    return bool(session.execute(query).scalar())


def apply_backend_event(
    session: Session,
    *,
    list_slug: str,
    address: addresses.Address,
    event: str,
    evidence: Evidence,
    now: datetime,
    detail: dict[str, Any] | None = None,
    occurred_at: datetime | None = None,
) -> bool:
    """Record what the backend reports (an unsubscribe there, a complaint, a hard bounce).

    A confirmed (or unsubscribed) subscription takes the reported state, so it is not sent
    to again and a complaint is not undone by a later sync; the ledger keeps the report.
    Returns False when this service does not know the address on that list.

    `occurred_at`, when the backend says when it happened: an event older than the
    subscription's confirmation (delivered late, or retried), where the person left before
    and confirmed again since, is about the subscription they have since renewed, and
    leaves it confirmed; the ledger keeps the report. A subscription that never left (a
    member taken over from the backend, or added by an operator, confirmed at that time)
    has no earlier one: the event is about it, however late it comes.
    """
    new_status = BACKEND_EVENTS[event]
    mailing_list = lists.get(session, slug=list_slug)
    assert mailing_list.id is not None
    subscription = _find(session, list_id=mailing_list.id, key=address.key, lock=True)
    if subscription is None:
        return False
    previous = SubscriptionStatus(subscription.status)
    if (
        previous == SubscriptionStatus.CONFIRMED
        and occurred_at is not None
        and subscription.confirmed_at is not None
        and occurred_at < subscription.confirmed_at - BACKEND_CLOCK_SKEW
        and _left_before(session, subscription_id=_id(subscription))
    ):
        detail = {
            **(detail or {}),
            "note": "predates the confirmation, which stands",
            "occurred_at": occurred_at.isoformat(),
        }
    elif previous in (SubscriptionStatus.CONFIRMED, SubscriptionStatus.UNSUBSCRIBED) and (
        previous != new_status
    ):
        subscription.status = new_status
        if previous == SubscriptionStatus.CONFIRMED:
            subscription.unsubscribed_at = now
        subscription.updated_at = now
        session.add(subscription)
        outbox.enqueue_sync(
            session,
            subscription_id=_id(subscription),
            list_id=subscription.list_id,
            now=now,
            fresh_opt_in=False,
        )
    _record(
        session,
        subscription=subscription,
        action=ConsentAction.BACKEND_EVENT,
        evidence=evidence,
        now=now,
        detail={"event": event, "previous_status": previous.value, **(detail or {})},
    )
    session.flush()
    return True
