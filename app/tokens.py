"""Link tokens (confirm, unsubscribe).

A token's secret is never stored: the link carries HMAC-SHA256(key, token id), the database
keeps only the SHA-256 of that value. The worker can rebuild a link from the id and the key
when it renders a mail, so neither the outbox nor the ledger holds a usable link, and a copy
of the database alone cannot confirm or unsubscribe anyone.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session

from app import db, errors
from app.models import Subscription, Token, TokenPurpose

# Longest token we accept in a URL; anything longer is not ours.
MAX_TOKEN_LENGTH = 64
# A secret's characters (base64url, unpadded): the token of a link is their first run.
_SECRET_CHARACTERS = re.compile(r"[A-Za-z0-9_-]*")
_SPACES = re.compile(r"\s+")


def _secret(key: bytes, token_id: str) -> str:
    digest = hmac.new(key, token_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def from_link(text: str) -> str:
    """The secret in a link's last segment as a visitor's browser sent it. A link copied
    with what followed it in the text (`...eE.`, `...eE)`, `...eE>`, `...eE»`, a quote, the
    next sentence) or cut in two by a mail client and pasted back with a space between its
    halves was "not valid": no secret holds a space or any of those characters, so spaces
    are taken out and the secret ends where its characters do."""
    # Bounded: a secret that long is refused by `lookup` anyway.
    joined = _SPACES.sub("", text[: 4 * MAX_TOKEN_LENGTH])
    match = _SECRET_CHARACTERS.match(joined)
    return match[0] if match else ""


def hash_of(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# The columns `_row` fills.
_COLUMNS = ["id", "subscription_id", "purpose", "token_hash", "created_at", "expires_at", "used_at"]
_INSERT = db.Prepared(
    sa.insert(Token.__table__),  # type: ignore[attr-defined]
    insert_keys=_COLUMNS,
)


def _row(
    token_id: uuid.UUID,
    *,
    subscription_id: int,
    purpose: TokenPurpose,
    key: bytes,
    created_at: datetime,
    ttl: timedelta | None,
) -> dict[str, object]:
    return {
        "id": token_id,
        "subscription_id": subscription_id,
        "purpose": purpose.value,
        "token_hash": hash_of(_secret(key, str(token_id))),
        "created_at": created_at,
        "expires_at": created_at + ttl if ttl is not None else None,
        "used_at": None,
    }


def insert(
    session: Session,
    *,
    subscription_id: int,
    purpose: TokenPurpose,
    key: bytes,
    now: datetime,
    ttl: timedelta | None,
    later: bool = False,
) -> uuid.UUID:
    """A new token, written at once (one Core statement, no ORM object); its id.

    `later`: at the commit, if the session defers rows (`db.defer_inserts`). The token's
    readers here write deferred tokens first.
    """
    token_id = uuid.uuid4()
    row = _row(
        token_id,
        subscription_id=subscription_id,
        purpose=purpose,
        key=key,
        created_at=now,
        ttl=ttl,
    )
    if later:
        _INSERT.defer(session, row)
    else:
        _INSERT.execute(session, row).close()
    return token_id


def insert_many(
    session: Session, *, created: dict[int, datetime], purpose: TokenPurpose, key: bytes
) -> dict[int, uuid.UUID]:
    """A token without expiry for each subscription of `created` (id -> creation time),
    in one statement of many rows (a sync round issues up to a thousand); their ids."""
    ids = {subscription_id: uuid.uuid4() for subscription_id in created}
    if ids:
        session.connection().execute(
            sa.insert(Token.__table__),  # type: ignore[attr-defined]
            [
                _row(
                    token_id,
                    subscription_id=subscription_id,
                    purpose=purpose,
                    key=key,
                    created_at=created[subscription_id],
                    ttl=None,
                )
                for subscription_id, token_id in ids.items()
            ],
        )
    return ids


def issue(
    session: Session,
    *,
    subscription: Subscription,
    purpose: TokenPurpose,
    key: bytes,
    now: datetime,
    ttl: timedelta | None,
) -> Token:
    """`insert`, for callers that want the row."""
    assert subscription.id is not None
    token_id = insert(
        session, subscription_id=subscription.id, purpose=purpose, key=key, now=now, ttl=ttl
    )
    token = session.get(Token, token_id)
    assert token is not None
    return token


def secret_for(token: Token, *, key: bytes) -> str:
    return secret_for_id(token.id, key=key)


def secret_for_id(token_id: uuid.UUID, *, key: bytes) -> str:
    """The link secret of a token read as a plain row (the worker reads only columns)."""
    return _secret(key, str(token_id))


@dataclass(frozen=True, slots=True)
class Live:
    """A live token, as `lookup` finds it."""

    id: uuid.UUID
    subscription_id: int


_TABLE = Token.__table__  # type: ignore[attr-defined]
# Prepared once: every confirmation and unsubscription runs these.
_BY_HASH = db.Prepared(
    sa.select(
        _TABLE.c.id,
        _TABLE.c.subscription_id,
        _TABLE.c.token_hash,
        _TABLE.c.used_at,
        _TABLE.c.expires_at,
    ).where(
        _TABLE.c.token_hash == sa.bindparam("hash"), _TABLE.c.purpose == sa.bindparam("purpose")
    )
)
_LIVE = db.Prepared(
    sa.select(_TABLE.c.id)
    .where(
        _TABLE.c.subscription_id == sa.bindparam("subscription_id"),
        _TABLE.c.purpose == sa.bindparam("purpose"),
        _TABLE.c.used_at.is_(None),
    )
    .order_by(_TABLE.c.created_at.desc())
    .limit(1)
)
# A subscription's open tokens of one purpose.
_OPEN = (
    _TABLE.c.subscription_id == sa.bindparam("b_subscription_id"),
    _TABLE.c.purpose == sa.bindparam("b_purpose"),
    _TABLE.c.used_at.is_(None),
)
_USE = db.Prepared(
    sa.update(_TABLE)
    .where(
        *_OPEN,
        # Only while this very token is unused.
        sa.exists().where(_TABLE.c.id == sa.bindparam("b_token_id"), _TABLE.c.used_at.is_(None)),
    )
    .values(used_at=sa.bindparam("b_now"))
)
_RETIRE = db.Prepared(sa.update(_TABLE).where(*_OPEN).values(used_at=sa.bindparam("b_now")))


def lookup(session: Session, *, secret: str, purpose: TokenPurpose, now: datetime) -> Live:
    """The live token behind a link, or the domain error that explains why it is not."""
    if not secret or len(secret) > MAX_TOKEN_LENGTH:
        raise errors.TokenNotFound()
    wanted = hash_of(secret)
    # What this transaction changed counts, as with the ORM's own queries.
    session.flush()
    row = _BY_HASH.execute(session, {"hash": wanted, "purpose": purpose.value}).first()
    if row is None or not secrets.compare_digest(row.token_hash, wanted):
        raise errors.TokenNotFound()
    if row.used_at is not None:
        raise errors.TokenUsed()
    if row.expires_at is not None and row.expires_at <= now:
        raise errors.TokenExpired()
    return Live(id=row.id, subscription_id=row.subscription_id)


def use(
    session: Session,
    *,
    token_id: uuid.UUID,
    subscription_id: int,
    purpose: TokenPurpose,
    now: datetime,
) -> bool:
    """Mark the token used, with every other open token of its subscription and purpose (the
    older links stop working), unless it is used already: then false, and nothing changed.
    One atomic statement: `retire` once the token is known to be unused."""
    # The others retired include those.
    db.write_deferred(session, table=_TABLE, subscription_id=subscription_id)
    result = _USE.execute(
        session,
        {
            "b_token_id": token_id,
            "b_subscription_id": subscription_id,
            "b_purpose": purpose.value,
            "b_now": now,
        },
    )
    return result.rowcount > 0


def live_id(session: Session, *, subscription_id: int, purpose: TokenPurpose) -> uuid.UUID | None:
    """The newest unused token of this purpose, if any."""
    session.flush()
    db.write_deferred(session, table=_TABLE, subscription_id=subscription_id)
    found: uuid.UUID | None = _LIVE.execute(
        session, {"subscription_id": subscription_id, "purpose": purpose.value}
    ).scalar()
    return found


# INSERT ... SELECT <the new row> WHERE NOT EXISTS <a live one>: one statement for both.
_ENSURE = db.Prepared(
    sa.insert(_TABLE).from_select(
        _COLUMNS,
        sa.select(*(sa.bindparam(name, type_=_TABLE.c[name].type) for name in _COLUMNS)).where(
            ~sa.exists().where(
                _TABLE.c.subscription_id == sa.bindparam("subscription_id"),
                _TABLE.c.purpose == sa.bindparam("purpose"),
                _TABLE.c.used_at.is_(None),
            )
        ),
    )
)


def ensure(
    session: Session, *, subscription_id: int, purpose: TokenPurpose, key: bytes, now: datetime
) -> None:
    """A token of this purpose without expiry, made unless an unused one exists (the
    standing unsubscribe link, at confirmation): `live_id` and `insert` in one statement."""
    row = _row(
        uuid.uuid4(),
        subscription_id=subscription_id,
        purpose=purpose,
        key=key,
        created_at=now,
        ttl=None,
    )
    # At the commit in a group commit: `live_id` and `use` write it first, and two for one
    # subscription still make one token (each checks when it runs).
    _ENSURE.defer(session, row)


def live(session: Session, *, subscription_id: int, purpose: TokenPurpose) -> Token | None:
    """`live_id`, as the row."""
    token_id = live_id(session, subscription_id=subscription_id, purpose=purpose)
    return session.get(Token, token_id) if token_id is not None else None


def retire(session: Session, *, subscription_id: int, purpose: TokenPurpose, now: datetime) -> None:
    """Mark every open token of this purpose used, so old links stop working."""
    db.write_deferred(session, table=_TABLE, subscription_id=subscription_id)
    _RETIRE.execute(
        session,
        {"b_subscription_id": subscription_id, "b_purpose": purpose.value, "b_now": now},
    )
