"""Self-hosted proof of work for the public forms (off unless `proof_of_work_bits` > 0).

A bot filling the form with strangers' addresses pays nothing per request; a small
computation per request costs a person's browser about a second and a mass sender a CPU
for each request it makes. No third-party service sees the visitors.

    GET /v1/challenge -> {"challenge": "20.1764355200.<random>.<tag>", "bits": 20, ...}

The client finds a `nonce` (any string of up to 64 printable ASCII characters) such that
SHA-256(challenge + ":" + nonce) starts with `bits` zero bits, and sends `pow_challenge` and
`pow_nonce` with the subscribe or unsubscribe-by-address request (JSON or form fields).

A challenge is stateless until used: `bits.issued_at.random` plus an HMAC tag under a key
derived from the service's secret key, so any replica can check it. Each is good once:
its SHA-256 is kept in `webhook_nonce` (backend `proof_of_work`) until it expires. The
database and not the rate-limit counters: it is shared by every replica and transactional
even when the counters live in one process's memory, and the unique constraint makes two
simultaneous uses of one challenge a single success.

`app/static/pow.js` solves challenges in a browser for a form marked `data-proof-of-work`.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col

from app import db, errors, lists
from app.models import WebhookNonce

# The `backend` under which used challenges are kept in `webhook_nonce`.
USED_CHALLENGES = "proof_of_work"
MAX_NONCE_LENGTH = 64
MAX_CHALLENGE_LENGTH = 200
# A challenge issued this far in our future comes from a replica with a fast clock.
CLOCK_SKEW = timedelta(seconds=60)
_TAG_HEX = 32


@dataclass(frozen=True, slots=True)
class Challenge:
    challenge: str
    bits: int
    expires_at: datetime


def _key(secret_key: bytes) -> bytes:
    # A key of its own: a challenge tag can then never pass for any other HMAC we make.
    return hmac.new(secret_key, b"proof-of-work challenge", hashlib.sha256).digest()


def _tag(secret_key: bytes, payload: str) -> str:
    digest = hmac.new(_key(secret_key), payload.encode(), hashlib.sha256).hexdigest()
    return digest[:_TAG_HEX]


# The fields a form carries a solved challenge in (app/static/pow.js fills them).
FORM_FIELDS = ("pow_challenge", "pow_nonce")


def from_form(form: Mapping[str, str]) -> dict[str, str]:
    """A form's solved challenge, as the request models take it (nothing when absent)."""
    return {name: form[name] for name in FORM_FIELDS if form.get(name)}


def issue(*, key: bytes, bits: int, ttl: timedelta, now: datetime) -> Challenge:
    payload = f"{bits}.{int(now.timestamp())}.{secrets.token_urlsafe(16)}"
    return Challenge(challenge=f"{payload}.{_tag(key, payload)}", bits=bits, expires_at=now + ttl)


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def _digest(challenge: str, nonce: str) -> bytes:
    return hashlib.sha256(f"{challenge}:{nonce}".encode()).digest()


def solve(challenge: str, bits: int) -> str:
    """A nonce for `challenge` (what pow.js does in a browser; for Python clients and tests)."""
    for counter in itertools.count():
        nonce = format(counter, "x")
        if leading_zero_bits(_digest(challenge, nonce)) >= bits:
            return nonce
    raise AssertionError("unreachable")


def check(
    *,
    challenge: str | None,
    nonce: str | None,
    key: bytes,
    bits: int,
    ttl: timedelta,
    now: datetime,
) -> None:
    """Raise unless `nonce` solves a challenge we issued, of at least `bits`, not expired."""
    if not challenge or nonce is None:
        raise errors.ProofOfWorkRequired()
    if len(challenge) > MAX_CHALLENGE_LENGTH or not (
        0 < len(nonce) <= MAX_NONCE_LENGTH and nonce.isascii() and nonce.isprintable()
    ):
        raise errors.ProofOfWorkInvalid()
    payload, _, tag = challenge.rpartition(".")
    # Bytes, not str: compare_digest refuses non-ASCII str, and the tag is the caller's.
    if not hmac.compare_digest(_tag(key, payload).encode(), tag.encode()):
        raise errors.ProofOfWorkInvalid()
    stated_bits, issued_at, _random = payload.split(".", 2)
    # Signed by us, so these parse; a challenge issued before the setting was raised is
    # easier than asked for now.
    if int(stated_bits) < bits:
        raise errors.ProofOfWorkInvalid("The challenge is easier than this service now asks.")
    issued = datetime.fromtimestamp(int(issued_at), tz=UTC)
    if issued > now + CLOCK_SKEW:
        raise errors.ProofOfWorkInvalid()
    if now - issued > ttl:
        raise errors.ProofOfWorkExpired()
    if leading_zero_bits(_digest(challenge, nonce)) < int(stated_bits):
        raise errors.ProofOfWorkInvalid("The nonce does not solve the challenge.")


def spend(session: Session, *, challenge: str, ttl: timedelta, now: datetime) -> None:
    """Mark a checked challenge used; ProofOfWorkUsed when it already was.

    `INSERT ... ON CONFLICT DO NOTHING` on the unique (backend, token_hash): two
    simultaneous uses cannot both pass. Used challenges older than `ttl` are forgotten:
    they have expired, and `check` refuses them for that.
    """
    insert = db.dialect_insert(session)
    statement = (
        insert(WebhookNonce)
        .values(
            backend=USED_CHALLENGES,
            token_hash=hashlib.sha256(challenge.encode()).hexdigest(),
            received_at=now,
        )
        .on_conflict_do_nothing(index_elements=["backend", "token_hash"])
        .returning(col(WebhookNonce.id))
    )
    if session.scalars(statement).one_or_none() is None:
        raise errors.ProofOfWorkUsed()
    session.connection().execute(
        sa.delete(WebhookNonce).where(
            col(WebhookNonce.backend) == USED_CHALLENGES,
            col(WebhookNonce.received_at) < now - ttl - CLOCK_SKEW,
        )
    )


def spend_for_list(
    session: Session, *, list_slug: str, challenge: str, ttl: timedelta, now: datetime
) -> None:
    """`spend` for a request about a list. An unknown list is refused first (ListNotFound),
    as a bad payload is, so that the caller who corrects the name may send its solved
    challenge again: it cost them seconds of work, and it was spent for nothing."""
    lists.get(session, slug=list_slug)
    spend(session, challenge=challenge, ttl=ttl, now=now)
