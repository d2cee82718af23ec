"""API input and output models."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app import addresses
from app.config import Locale

MAX_ATTRIBUTES = 20
_ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _no_control_characters(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (line breaks, NUL, ...)")
    return value


def _valid_email(value: str) -> str:
    try:
        addresses.parse(value)
    except addresses.InvalidAddress as e:
        raise ValueError(str(e)) from e
    return value


class SubscriptionRequest(BaseModel):
    """A request to subscribe; the same fields come as JSON or as a form post."""

    model_config = ConfigDict(extra="ignore")

    email: Annotated[str, Field(max_length=1000, examples=["camille@example.org"])]
    locale: Locale | None = None
    attributes: Annotated[
        dict[str, Annotated[str, Field(max_length=500)]],
        Field(default_factory=dict, max_length=MAX_ATTRIBUTES),
    ]

    @field_validator("email")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        return _valid_email(value)

    @field_validator("attributes")
    @classmethod
    def _clean_attributes(cls, value: dict[str, str]) -> dict[str, str]:
        for name, item in value.items():
            if not _ATTRIBUTE_NAME.match(name):
                raise ValueError(
                    f"attribute name {name[:64]!r} must be lowercase letters, digits or _"
                )
            _no_control_characters(item)
        return value


class UnsubscriptionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    email: Annotated[str, Field(max_length=1000, examples=["camille@example.org"])]

    @field_validator("email")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        return _valid_email(value)


class Accepted(BaseModel):
    """The one answer to every valid request, whatever the address's state."""

    status: Literal["accepted"] = "accepted"
    detail: str


class ActionResult(BaseModel):
    status: str
    list: str


class Health(BaseModel):
    status: str


class MailgunSignature(BaseModel):
    """Mailgun's signature block: hex HMAC-SHA256 of `timestamp + token`."""

    # Mailgun sends the timestamp as a string; a number is read as the same digits.
    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)

    timestamp: Annotated[str, Field(max_length=20, examples=["1770920772"])]
    token: Annotated[str, Field(min_length=1, max_length=200)]
    signature: Annotated[str, Field(min_length=1, max_length=200)]


class MailgunWebhook(BaseModel):
    """What Mailgun posts for one event (its webhook payload, JSON)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    signature: MailgunSignature
    event_data: Annotated[dict[str, Any], Field(alias="event-data", default_factory=dict)]


# Admin ------------------------------------------------------------------------------------


class ListOut(BaseModel):
    slug: str
    name: str
    default_locale: str
    consent_version: str
    confirm_ttl_seconds: int
    thank_you_url: str | None
    landing_url: str | None
    backend: str


class SubscriberOut(BaseModel):
    email: str
    status: str
    locale: str
    attributes: dict[str, Any]
    consent_version: str
    created_at: datetime
    confirmed_at: datetime | None
    unsubscribed_at: datetime | None


class SubscriberPage(BaseModel):
    items: list[SubscriberOut]
    next_cursor: str | None


class ConsentEventOut(BaseModel):
    action: str
    status_after: str
    source: str
    source_url: str | None
    consent_version: str
    ip: str | None
    user_agent: str | None
    detail: dict[str, Any]
    occurred_at: datetime


class AttemptOut(BaseModel):
    attempt: int
    outcome: str
    error: str | None
    response: str | None
    started_at: datetime
    finished_at: datetime


class JobOut(BaseModel):
    id: int
    kind: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None
    payload: dict[str, Any]


class JobWithAttempts(JobOut):
    attempt_log: list[AttemptOut]


class SubscriberDetail(SubscriberOut):
    ledger: list[ConsentEventOut]
    jobs: list[JobWithAttempts]


class StatsOut(BaseModel):
    list: str
    by_status: dict[str, int]
    series: dict[str, dict[str, int]]
    confirmation_rate: float | None
    sync_backlog: int
    oldest_pending_job_seconds: float | None
    dead_jobs: int


class RetryResult(BaseModel):
    retried: int


class AuditOut(BaseModel):
    id: int
    occurred_at: datetime
    actor: str
    action: str
    target: str | None
    outcome: str
    detail: dict[str, Any]
