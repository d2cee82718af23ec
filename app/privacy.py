"""Data protection helpers shared by erasure, import and operators' additions.

An erased address survives only as HMAC-SHA256(secret key, "erased:" + case-folded
address): enough to recognise the person if the address comes back through an import, not
enough to recover the address from the database alone.
"""

from __future__ import annotations

import hashlib
import hmac

from sqlmodel import Session, select

from app.models import ErasedAddress


def address_hash(email_key: str, *, key: bytes) -> str:
    return hmac.new(key, f"erased:{email_key}".encode(), hashlib.sha256).hexdigest()


def is_erased(session: Session, *, email_key: str, key: bytes) -> bool:
    """True when this address was erased: it may come back only by a fresh opt-in."""
    wanted = address_hash(email_key, key=key)
    return (
        session.exec(select(ErasedAddress.id).where(ErasedAddress.address_hash == wanted)).first()
        is not None
    )
