"""Keys to the admin API: shown once at creation, stored as SHA-256, scoped read or write."""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from app import errors
from app.models import ApiKey, KeyScope

log = logging.getLogger(__name__)

KEY_PREFIX = "nlk_"
# A key's last use is written at most this often (not on every request).
TOUCH_EVERY = timedelta(minutes=1)
# The length of the `api_key.name` column.
MAX_NAME = 100


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling the admin API (or the CLI): goes into the audit log."""

    name: str
    scope: KeyScope

    @property
    def can_write(self) -> bool:
        return self.scope == KeyScope.WRITE


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def clean_name(raw: str) -> str:
    """A key's name as stored: without surrounding blanks; ValueError when it is blank or
    longer than the column (which SQLite would take and PostgreSQL refuse)."""
    name = raw.strip()
    if not name:
        raise ValueError("a key's name cannot be blank")
    if len(name) > MAX_NAME:
        raise ValueError(f"a key's name has at most {MAX_NAME} characters")
    return name


def create(session: Session, *, name: str, scope: KeyScope, now: datetime) -> tuple[ApiKey, str]:
    """A new key; the clear key is returned once and never stored."""
    existing = session.exec(select(ApiKey).where(ApiKey.name == name)).first()
    if existing is not None and existing.revoked_at is not None:
        # A revoked key keeps its name, so that the audit log's lines about it stay its own:
        # "already exists" sent the operator who had just revoked it looking for a live one.
        raise errors.Conflict(
            f"A key named {name!r} existed: it was revoked on "
            f"{existing.revoked_at:%Y-%m-%d}, and its name stays its own (the audit log names "
            "keys by it); give the new key another name."
        )
    if existing is not None:
        raise errors.Conflict(f"A key named {name!r} already exists.")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, scope=scope, key_hash=_hash(key), prefix=key[:10], created_at=now)
    session.add(row)
    session.flush()
    return row, key


def all_keys(session: Session) -> list[ApiKey]:
    return list(session.exec(select(ApiKey).order_by(col(ApiKey.created_at))).all())


def revoke(session: Session, *, name: str, now: datetime) -> ApiKey:
    row = session.exec(select(ApiKey).where(ApiKey.name == name)).first()
    if row is None:
        raise errors.NotFound(f"No key is named {name!r}.")
    if row.revoked_at is None:
        row.revoked_at = now
        session.add(row)
    return row


def authenticate(session: Session, *, key: str | None, now: datetime) -> Caller:
    """The caller behind a bearer key; Unauthorized for a missing, unknown or revoked key.

    A key sent but refused is logged (never the key itself): a revoked key still in use, by
    its name, tells operators where a leaked or forgotten key still runs, and a stream of
    unknown keys shows someone guessing. A request without a key is the access line's 401.
    """
    if not key:
        raise errors.Unauthorized()
    if not key.startswith(KEY_PREFIX) or len(key) > 100:
        log.warning("apikey.refused reason=malformed")
        raise errors.Unauthorized()
    wanted = _hash(key)
    row = session.exec(select(ApiKey).where(ApiKey.key_hash == wanted)).first()
    if row is None or not secrets.compare_digest(row.key_hash, wanted):
        log.warning("apikey.refused reason=unknown")
        raise errors.Unauthorized()
    if row.revoked_at is not None:
        log.warning("apikey.refused reason=revoked name=%s", row.name)
        raise errors.Unauthorized()
    if row.last_used_at is None or now - row.last_used_at >= TOUCH_EVERY:
        row.last_used_at = now
        session.add(row)
    return Caller(name=row.name, scope=KeyScope(row.scope))
