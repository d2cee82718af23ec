"""Mailing lists: declared in settings, stored in the database at start."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session, select

from app import errors
from app.config import ListSettings
from app.models import MailingList


def get(session: Session, *, slug: str) -> MailingList:
    mailing_list = session.exec(select(MailingList).where(MailingList.slug == slug)).first()
    if mailing_list is None:
        raise errors.ListNotFound()
    return mailing_list


def sync_from_settings(session: Session, *, declared: list[ListSettings], now: datetime) -> None:
    """Create or update each declared list; lists no longer declared are kept untouched."""
    existing = {item.slug: item for item in session.exec(select(MailingList)).all()}
    for item in declared:
        row = existing.get(item.slug) or MailingList(
            slug=item.slug,
            name=item.name,
            default_locale=item.default_locale.value,
            consent_version=item.consent_version,
            confirm_ttl_seconds=0,
            created_at=now,
        )
        row.name = item.name
        row.default_locale = item.default_locale.value
        row.consent_version = item.consent_version
        row.confirm_ttl_seconds = int(item.confirm_ttl.total_seconds())
        row.thank_you_url = str(item.thank_you_url) if item.thank_you_url else None
        row.landing_url = str(item.landing_url) if item.landing_url else None
        row.updated_at = now
        session.add(row)
    session.flush()
