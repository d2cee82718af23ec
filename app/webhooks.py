"""What mailing-list backends report by webhook: verified, then recorded in the state machine.

Mailgun (https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks)
posts `{"signature": {"timestamp", "token", "signature"}, "event-data": {...}}` where
`signature` is the hex HMAC-SHA256 of `timestamp + token` under the webhook signing key.
A call is accepted when the signature verifies with the key of a Mailgun list, its
timestamp is at most `MAX_AGE` old and at most `MAX_AHEAD` ahead of our clock, and its
token was never seen (its SHA-256 is kept in `webhook_nonce` for `NONCE_KEEP`, longer than
a timestamp passes; the unique constraint turns a replay into a refusal).

The age allowed is Mailgun's retry schedule, not a few minutes: Mailgun retries a call
answered other than 200 or 406 for 8 hours (5, 10 and 15 minutes, 1, 2 and 4 hours later:
https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/webhook-retries), and
a retry carries the signature block of the first attempt (Mailgun's pages do not say;
Hookdeck's Mailgun reference and integrators observe it). With a 5-minute window every
retry after our 5xx (a database outage, a restart) was refused as stale with a 406, which
stops Mailgun's retries: the unsubscribe was lost. Replays stay refused by the token.

Only events that change a subscription reach the state machine: `unsubscribed`,
`complained` and `failed` with severity `permanent` (a hard bounce). Deliveries, opens,
clicks and temporary failures (and events about lists not held here) are verified and
acknowledged; their token is spent all the same, as the signature does not cover the event:
a signature left unspent could be sent again, within `MAX_AGE`, with an unsubscribe in
place of a delivery.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlmodel import Session, col

from app import addresses, db, errors, subscriptions
from app.config import ListSettings, MailgunBackendSettings
from app.models import WebhookNonce
from app.schemas import MailgunWebhook

log = logging.getLogger(__name__)

MAILGUN = "mailgun"
# How old a call's timestamp may be: Mailgun's 8 hours of retries, and an hour for its
# queue and our clocks.
MAX_AGE = timedelta(hours=9)
# How far ahead of our clock it may be (clocks that drift).
MAX_AHEAD = timedelta(minutes=5)
# Tokens are kept past the time in which their timestamp would still pass.
NONCE_KEEP = MAX_AGE + MAX_AHEAD + timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class BackendEvent:
    """A verified call; `event` is None when it changes nothing here."""

    backend: str
    token: str
    event: str | None = None
    address: addresses.Address | None = None
    list_slugs: tuple[str, ...] = ()
    detail: dict[str, Any] = field(default_factory=dict)
    # When the event happened, as the backend says (not when it was delivered).
    occurred_at: datetime | None = None


def _mailgun_lists(lists: Sequence[ListSettings]) -> list[tuple[ListSettings, str]]:
    found = []
    for item in lists:
        backend = item.backend
        if isinstance(backend, MailgunBackendSettings) and backend.webhook_signing_key:
            found.append((item, backend.webhook_signing_key.get_secret_value()))
    return found


def _signature_matches(key: str, *, timestamp: str, token: str, signature: str) -> bool:
    expected = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    # Bytes, not str: compare_digest refuses non-ASCII str, and the signature is the
    # caller's to choose.
    return hmac.compare_digest(expected.encode(), signature.encode())


def _list_address(event_data: dict[str, Any]) -> str | None:
    """The mailing list an event is about, when Mailgun says (`mailing-list.address`)."""
    value = event_data.get("mailing-list")
    if isinstance(value, dict):
        value = value.get("address")
    return value.casefold() if isinstance(value, str) and value else None


def _occurred_at(event_data: dict[str, Any]) -> datetime | None:
    """The event's own time (`event-data.timestamp`, seconds since the epoch, as a float),
    None when absent or not a time."""
    value = event_data.get("timestamp")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return datetime.fromtimestamp(float(value), tz=UTC)
    except (ValueError, OverflowError, OSError):
        return None


def _mailgun_event(event_data: dict[str, Any]) -> str | None:
    name = event_data.get("event")
    if name in ("unsubscribed", "complained"):
        return str(name)
    if name == "failed" and event_data.get("severity") == "permanent":
        return "bounced"
    return None


def verify_mailgun(
    payload: object, *, lists: Sequence[ListSettings], now: datetime
) -> BackendEvent:
    """Check a Mailgun call's signature and age; what it reports, for `record`.

    Mailgun's signing key belongs to the account, so several lists may share it. An event
    naming its mailing list is checked with that list's key and applies to it alone (to
    none of ours if it names another list); an event naming none applies to every list
    whose key verifies it, as an unsubscribe, complaint or bounce at Mailgun's domain level
    stops mail from all of them.
    """
    try:
        call = MailgunWebhook.model_validate(payload)
    except ValidationError as e:
        if all(error["loc"][:1] == ("event-data",) for error in e.errors()):
            # Signed or not, a body to be told apart from one without a signature.
            raise errors.WebhookMalformed() from e
        raise errors.WebhookSignatureInvalid("The body carries no Mailgun signature.") from e
    signature = call.signature
    event_data = call.event_data
    candidates = _mailgun_lists(lists)
    if not candidates and any(isinstance(item.backend, MailgunBackendSettings) for item in lists):
        # Mailgun's webhooks pointed here before the key was set: a 406 "signature does not
        # verify" would have lost each event, and said nothing of the setting.
        log.warning(
            "webhook.not_configured backend=mailgun: no Mailgun list has its "
            "webhook_signing_key in NEWSLETTER_LISTS (Mailgun: Sending > Webhooks, HTTP "
            "webhook signing key); the call is answered 503 and Mailgun retries it"
        )
        raise errors.WebhookNotConfigured()
    named = _list_address(event_data)
    # The lists held here that the event names, and those of them with their keys.
    about = [
        item
        for item in lists
        if named is not None
        and isinstance(item.backend, MailgunBackendSettings)
        and item.backend.list_address.casefold() == named
    ]
    targets = _mailgun_lists(about)
    if about and not targets:
        # About a list held here whose key is not set, while another list's is: verified
        # with that one, it was taken for an event about a list not held here, and dropped.
        slug = about[0].slug
        log.warning(
            "webhook.not_configured backend=mailgun list=%s: its webhook_signing_key is not "
            "in NEWSLETTER_LISTS; the call is answered 503 and Mailgun retries it",
            slug,
        )
        raise errors.WebhookNotConfigured(
            f"The Mailgun list {slug!r} has no webhook_signing_key here (NEWSLETTER_LISTS), so "
            "the call cannot be verified; Mailgun retries it."
        )
    verified = [
        item
        for item, key in (targets or candidates)
        if _signature_matches(
            key,
            timestamp=signature.timestamp,
            token=signature.token,
            signature=signature.signature,
        )
    ]
    if not verified:
        raise errors.WebhookSignatureInvalid()
    try:
        sent_at = datetime.fromtimestamp(int(signature.timestamp), tz=now.tzinfo)
    except (ValueError, OverflowError, OSError) as e:
        raise errors.WebhookStale() from e
    if now - sent_at > MAX_AGE or sent_at - now > MAX_AHEAD:
        raise errors.WebhookStale()

    event = _mailgun_event(event_data)
    recipient = event_data.get("recipient")
    address = None
    if event is not None and isinstance(recipient, str):
        try:
            address = addresses.parse(recipient, new=False)
        except addresses.InvalidAddress:
            event = None
    if named is not None and not targets:
        # Signed by our account but about a list this service does not hold.
        event = None
    detail: dict[str, Any] = {"backend": MAILGUN, "event_id": str(event_data.get("id", ""))}
    if event_data.get("event") == "failed":
        detail["severity"] = str(event_data.get("severity", ""))
        reason = event_data.get("reason")
        if isinstance(reason, str):
            detail["reason"] = reason[:200]
    return BackendEvent(
        backend=MAILGUN,
        token=signature.token,
        event=event if address is not None else None,
        address=address,
        list_slugs=tuple(item.slug for item in verified),
        detail=detail,
        occurred_at=_occurred_at(event_data),
    )


def _spend_token(session: Session, *, backend: str, token: str, now: datetime) -> bool:
    """Record the token; false when it was already there (a replay).

    `INSERT ... ON CONFLICT DO NOTHING` on the unique (backend, token_hash): two
    simultaneous deliveries of one call cannot both pass.
    """
    insert = db.dialect_insert(session)
    statement = (
        insert(WebhookNonce)
        .values(
            backend=backend,
            token_hash=hashlib.sha256(token.encode()).hexdigest(),
            received_at=now,
        )
        .on_conflict_do_nothing(index_elements=["backend", "token_hash"])
        .returning(col(WebhookNonce.id))
    )
    return session.scalars(statement).one_or_none() is not None


def record(
    session: Session, *, event: BackendEvent, evidence: subscriptions.Evidence, now: datetime
) -> int:
    """Spend the call's token and apply its event to each list; how many subscriptions knew
    the address. Raises WebhookReplayed (and changes nothing) for a token seen before."""
    if not _spend_token(session, backend=event.backend, token=event.token, now=now):
        raise errors.WebhookReplayed()
    session.connection().execute(
        sa.delete(WebhookNonce).where(
            col(WebhookNonce.backend) == event.backend,
            col(WebhookNonce.received_at) < now - NONCE_KEEP,
        )
    )
    if event.event is None or event.address is None:
        return 0
    known = 0
    for slug in event.list_slugs:
        known += subscriptions.apply_backend_event(
            session,
            list_slug=slug,
            address=event.address,
            event=event.event,
            evidence=evidence,
            now=now,
            detail=event.detail,
            occurred_at=event.occurred_at,
        )
    log.info(
        "webhook.applied backend=%s event=%s lists=%s known=%d",
        event.backend,
        event.event,
        ",".join(event.list_slugs),
        known,
    )
    return known
