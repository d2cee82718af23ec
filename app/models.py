"""Database tables (SQLModel). Timestamps are UTC-aware; enums are stored as strings."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """`value` in UTC, one without a zone being UTC already. OverflowError when that takes
    it beyond the years a datetime holds (0001-01-01T00:00+01:00 is before year 1 in UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored with its zone and always read back as UTC-aware (SQLite keeps none)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _ts(*, nullable: bool = False) -> Any:
    column: sa.Column[datetime] = sa.Column(UTCDateTime(), nullable=nullable)
    if nullable:
        return Field(default=None, sa_column=column)
    return Field(default_factory=utcnow, sa_column=column)


def _json() -> Any:
    return Field(default_factory=dict, sa_column=sa.Column(sa.JSON(), nullable=False))


class SubscriptionStatus(StrEnum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    COMPLAINED = "complained"


class TokenPurpose(StrEnum):
    CONFIRM = "confirm"
    UNSUBSCRIBE = "unsubscribe"


class ConsentAction(StrEnum):
    SUBSCRIBE_REQUESTED = "subscribe_requested"
    CONFIRMED = "confirmed"
    UNSUBSCRIBE_REQUESTED = "unsubscribe_requested"
    UNSUBSCRIBED = "unsubscribed"
    # Reported by the mailing-list backend (webhook): bounced, complained, unsubscribed there.
    BACKEND_EVENT = "backend_event"
    # Taken over from the backend's existing list (provenance in the event's detail).
    IMPORTED = "imported"
    # A request nobody confirmed, dropped by the retention job; the opt-out it interrupted
    # stands again (see app/retention.py).
    REQUEST_EXPIRED = "request_expired"


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    DEAD = "dead"


class JobKind(StrEnum):
    MAIL = "mail"
    SYNC = "sync"
    RECONCILE = "reconcile"
    RETENTION = "retention"


class AttemptOutcome(StrEnum):
    SUCCESS = "success"
    RETRY = "retry"
    DEAD = "dead"
    # No call: a dead job whose work was done since (`outbox.supersede`), put to rest.
    SUPERSEDED = "superseded"


# Row ids are 32-bit integers on PostgreSQL (`INTEGER`): a larger one asked for (in a URL, in
# a cursor) is refused before the database would refuse it with an error, as out of range.
MAX_ROW_ID = 2**31 - 1


class MailingList(SQLModel, table=True):
    __tablename__ = "mailing_list"

    id: int | None = Field(default=None, primary_key=True)
    slug: str = Field(max_length=63, unique=True)
    name: str = Field(max_length=200)
    default_locale: str = Field(max_length=8)
    consent_version: str = Field(max_length=64)
    confirm_ttl_seconds: int
    thank_you_url: str | None = Field(default=None, max_length=2048)
    landing_url: str | None = Field(default=None, max_length=2048)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class Subscription(SQLModel, table=True):
    __tablename__ = "subscription"
    __table_args__ = (
        sa.UniqueConstraint("list_id", "email_key", name="uq_subscription_list_email"),
        # Keyset pages of one list stay an index range scan on the millionth row.
        sa.Index("ix_subscription_list_id_id", "list_id", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    list_id: int = Field(foreign_key="mailing_list.id", index=True)
    # The address as typed, after email-validator's normalization (domain lowercased, NFC).
    email: str = Field(max_length=320)
    # The case-folded form that makes two spellings of one address the same subscriber.
    email_key: str = Field(max_length=320)
    # The key with the domain in ASCII (`xn--caf-dma.fr` for `café.fr`), for a search typed
    # that way (`addresses.ascii_key`); None when the domain is ASCII, the key then.
    email_ascii_key: str | None = Field(default=None, max_length=320)
    status: str = Field(max_length=16, index=True)
    locale: str = Field(max_length=8)
    attributes: dict[str, Any] = _json()
    consent_version: str = Field(max_length=64)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    confirmed_at: datetime | None = _ts(nullable=True)
    unsubscribed_at: datetime | None = _ts(nullable=True)
    # Last time a mail was queued at a visitor's request; throttles repeated requests.
    last_mail_at: datetime | None = _ts(nullable=True)


class ConsentEvent(SQLModel, table=True):
    """The consent ledger: append-only, one row per state change or request, with evidence."""

    __tablename__ = "consent_event"

    id: int | None = Field(default=None, primary_key=True)
    # None once the subscriber is erased; the event then keeps only `address_hash`.
    subscription_id: int | None = Field(default=None, foreign_key="subscription.id", index=True)
    list_id: int = Field(foreign_key="mailing_list.id")
    action: str = Field(max_length=32)
    status_after: str = Field(max_length=16)
    # form, api, one_click, link, operator, backend
    source: str = Field(max_length=32)
    source_url: str | None = Field(default=None, max_length=2048)
    consent_version: str = Field(max_length=64)
    ip: str | None = Field(default=None, max_length=64)
    user_agent: str | None = Field(default=None, max_length=512)
    detail: dict[str, Any] = _json()
    occurred_at: datetime = _ts()
    # Set at erasure: the keyed hash that replaced the address (see ErasedAddress).
    address_hash: str | None = Field(default=None, max_length=64, index=True)


class Token(SQLModel, table=True):
    """A link token. Only its SHA-256 is stored; the link is derived from the id with a key."""

    __tablename__ = "token"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    subscription_id: int = Field(foreign_key="subscription.id", index=True)
    purpose: str = Field(max_length=16)
    token_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = _ts()
    expires_at: datetime | None = _ts(nullable=True)
    used_at: datetime | None = _ts(nullable=True)


class OutboxJob(SQLModel, table=True):
    __tablename__ = "outbox_job"
    __table_args__ = (
        sa.Index("ix_outbox_job_due", "state", "next_attempt_at"),
        # "The pending job with this key" (coalescing) is asked on every confirmation and
        # unsubscription: one index answers it, whatever the number of pending jobs.
        sa.Index("ix_outbox_job_dedupe_key_state", "dedupe_key", "state"),
    )

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=32)
    # Jobs sharing a key run one at a time, in order, and a pending one absorbs newer
    # requests (sync jobs: "sync:<subscription id>"; the latest state wins).
    dedupe_key: str | None = Field(default=None, max_length=128)
    # The subscription the job is about, when there is one (operators look jobs up by it).
    subscription_id: int | None = Field(default=None, index=True)
    payload: dict[str, Any] = _json()
    state: str = Field(max_length=16)
    attempts: int = 0
    next_attempt_at: datetime = _ts()
    lease_until: datetime | None = _ts(nullable=True)
    leased_by: str | None = Field(default=None, max_length=64)
    last_error: str | None = Field(default=None, max_length=2000)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    finished_at: datetime | None = _ts(nullable=True)


class DeliveryAttempt(SQLModel, table=True):
    """Every outbound attempt (mail, backend call) leaves one row, success or not."""

    __tablename__ = "delivery_attempt"

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="outbox_job.id", index=True)
    attempt: int
    worker: str = Field(max_length=64)
    outcome: str = Field(max_length=16)
    error: str | None = Field(default=None, max_length=2000)
    response: str | None = Field(default=None, max_length=2000)
    started_at: datetime = _ts()
    finished_at: datetime = _ts()


class WebhookNonce(SQLModel, table=True):
    """Tokens of webhook calls already accepted: a replayed call is refused."""

    __tablename__ = "webhook_nonce"
    __table_args__ = (sa.UniqueConstraint("backend", "token_hash", name="uq_webhook_nonce"),)

    id: int | None = Field(default=None, primary_key=True)
    backend: str = Field(max_length=32)
    token_hash: str = Field(max_length=64)
    received_at: datetime = _ts()


class KeyScope(StrEnum):
    READ = "read"
    WRITE = "write"


class ApiKey(SQLModel, table=True):
    """An operator's or a service's key to the admin API; only its SHA-256 is stored."""

    __tablename__ = "api_key"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100, unique=True)
    scope: str = Field(max_length=16)
    key_hash: str = Field(max_length=64, unique=True)
    # The key's first characters, to tell keys apart in listings.
    prefix: str = Field(max_length=16)
    created_at: datetime = _ts()
    last_used_at: datetime | None = _ts(nullable=True)
    revoked_at: datetime | None = _ts(nullable=True)


class AuditEvent(SQLModel, table=True):
    """Append-only record of every operator action, through the API or the CLI."""

    __tablename__ = "audit_event"

    id: int | None = Field(default=None, primary_key=True)
    occurred_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(UTCDateTime(), nullable=False, index=True)
    )
    # The key's name, or "cli:<user>" for the command line.
    actor: str = Field(max_length=120, index=True)
    action: str = Field(max_length=64, index=True)
    target: str | None = Field(default=None, max_length=400)
    # "ok", or "error:<code>" with the domain error's code (list_not_found, invalid_csv, ...).
    outcome: str = Field(max_length=64)
    detail: dict[str, Any] = _json()


class ErasedAddress(SQLModel, table=True):
    """The tombstone of an erased person: a keyed hash of the address, nothing else.

    An import or an operator's "add as confirmed" refuses an address whose hash is here;
    only a fresh double opt-in by the person brings it back.
    """

    __tablename__ = "erased_address"

    id: int | None = Field(default=None, primary_key=True)
    address_hash: str = Field(max_length=64, unique=True)
    erased_at: datetime = _ts()


class WorkerHeartbeat(SQLModel, table=True):
    """One row per running outbox worker, refreshed every round: readiness and metrics read
    the newest `seen_at` to tell a live worker from a dead or stuck one."""

    __tablename__ = "worker_heartbeat"

    # The worker's name (host:pid:random), as in `outbox_job.leased_by`.
    worker_id: str = Field(primary_key=True, max_length=64)
    host: str = Field(max_length=255)
    pid: int
    started_at: datetime = _ts()
    seen_at: datetime = _ts()


class BlockKind(StrEnum):
    ADDRESS = "address"
    # A domain entry covers the domain and every subdomain of it.
    DOMAIN = "domain"


class BlockedEntry(SQLModel, table=True):
    """An address or a domain operators refuse to mail or to add (see app/blocklist.py)."""

    __tablename__ = "blocked_entry"
    __table_args__ = (sa.UniqueConstraint("kind", "value", name="uq_blocked_entry_kind_value"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=16)
    # The case-folded address, or the lowercased domain (no leading "@").
    value: str = Field(max_length=320)
    reason: str = Field(max_length=500)
    created_at: datetime = _ts()
    # The key's name, or "cli:<user>".
    created_by: str = Field(max_length=120)


class ConsentWording(SQLModel, table=True):
    """The text a consent version stood for, per list and language: the proof's other half.

    Written when a list is declared or changed, never rewritten: a changed text needs a
    new `consent_version` (see app/consent.py).
    """

    __tablename__ = "consent_wording"
    __table_args__ = (
        sa.UniqueConstraint("list_id", "version", "locale", name="uq_consent_wording"),
    )

    id: int | None = Field(default=None, primary_key=True)
    list_id: int = Field(foreign_key="mailing_list.id")
    version: str = Field(max_length=64)
    locale: str = Field(max_length=8)
    text: str = Field(sa_column=sa.Column(sa.Text(), nullable=False))
    first_recorded_at: datetime = _ts()
