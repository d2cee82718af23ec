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
import secrets
import uuid
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, select

from app import errors
from app.models import Subscription, Token, TokenPurpose

# Longest token we accept in a URL; anything longer is not ours.
MAX_TOKEN_LENGTH = 64


def _secret(key: bytes, token_id: str) -> str:
    digest = hmac.new(key, token_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def hash_of(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue(
    session: Session,
    *,
    subscription: Subscription,
    purpose: TokenPurpose,
    key: bytes,
    now: datetime,
    ttl: timedelta | None,
) -> Token:
    assert subscription.id is not None
    token = Token(subscription_id=subscription.id, purpose=purpose, token_hash="", created_at=now)
    token.token_hash = hash_of(_secret(key, str(token.id)))
    token.expires_at = now + ttl if ttl is not None else None
    session.add(token)
    return token


def secret_for(token: Token, *, key: bytes) -> str:
    return secret_for_id(token.id, key=key)


def secret_for_id(token_id: uuid.UUID, *, key: bytes) -> str:
    """The link secret of a token read as a plain row (the worker reads only columns)."""
    return _secret(key, str(token_id))


def lookup(session: Session, *, secret: str, purpose: TokenPurpose, now: datetime) -> Token:
    """The live token behind a link, or the domain error that explains why it is not."""
    if not secret or len(secret) > MAX_TOKEN_LENGTH:
        raise errors.TokenNotFound()
    wanted = hash_of(secret)
    token = session.exec(
        select(Token).where(Token.token_hash == wanted, Token.purpose == purpose)
    ).first()
    if token is None or not secrets.compare_digest(token.token_hash, wanted):
        raise errors.TokenNotFound()
    if token.used_at is not None:
        raise errors.TokenUsed()
    if token.expires_at is not None and token.expires_at <= now:
        raise errors.TokenExpired()
    return token


def live(session: Session, *, subscription_id: int, purpose: TokenPurpose) -> Token | None:
    return session.exec(
        select(Token)
        .where(
            Token.subscription_id == subscription_id,
            Token.purpose == purpose,
            Token.used_at.is_(None),  # type: ignore[union-attr]
        )
        .order_by(Token.created_at.desc())  # type: ignore[attr-defined]
    ).first()


def retire(session: Session, *, subscription_id: int, purpose: TokenPurpose, now: datetime) -> None:
    """Mark every open token of this purpose used, so old links stop working."""
    session.execute(
        sa.update(Token)
        .where(
            Token.subscription_id == subscription_id,  # type: ignore[arg-type]
            Token.purpose == purpose,  # type: ignore[arg-type]
            Token.used_at.is_(None),  # type: ignore[union-attr]
        )
        .values(used_at=now)
    )
