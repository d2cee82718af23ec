"""Mailing lists: declared in settings and stored in the database at start, or created by
operators through the admin API (see "Operators' changes" below)."""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from app import consent, db, errors
from app.config import SLUG_PATTERN, ListSettings
from app.models import MailingList, utcnow

log = logging.getLogger(__name__)

_SLUG = re.compile(SLUG_PATTERN)


def get(session: Session, *, slug: str) -> MailingList:
    # A name no list can have is unknown without asking the database (PostgreSQL refuses
    # a NUL in a text parameter with an error, not an empty answer).
    if not _SLUG.fullmatch(slug):
        raise errors.ListNotFound()
    mailing_list = session.exec(select(MailingList).where(MailingList.slug == slug)).first()
    if mailing_list is None:
        raise errors.ListNotFound()
    return mailing_list


# Session.info key: the lists this transaction has read, by slug and by id.
_READ = "lists_read"
_TABLE = MailingList.__table__  # type: ignore[attr-defined]
_BY_SLUG = db.Prepared(sa.select(_TABLE).where(_TABLE.c.slug == sa.bindparam("slug")))
_BY_ID = db.Prepared(sa.select(_TABLE).where(_TABLE.c.id == sa.bindparam("list_id")))


def _read(session: Session) -> dict[str | int, MailingList]:
    read: dict[str | int, MailingList] = session.info.setdefault(_READ, {})
    return read


def _copy(row: Any) -> MailingList:
    # A plain copy of the row, outside the session (an ORM load costs six times more).
    return MailingList.model_construct(**row._asdict())


def get_shared(session: Session, *, slug: str) -> MailingList:
    """`get` for the public write path, read once per transaction (a group commit's
    requests, app/writer.py, mostly name the same list); a copy of the row, not an
    entity of the session: to read, not to change."""
    read = _read(session)
    mailing_list = read.get(slug)
    if mailing_list is None:
        if not _SLUG.fullmatch(slug):
            raise errors.ListNotFound()
        row = _BY_SLUG.execute(session, {"slug": slug}).first()
        if row is None:
            raise errors.ListNotFound()
        mailing_list = read[slug] = _copy(row)
    return mailing_list


def get_shared_by_id(session: Session, *, list_id: int) -> MailingList:
    """`get_shared`, by the list's id."""
    read = _read(session)
    mailing_list = read.get(list_id)
    if mailing_list is None:
        row = _BY_ID.execute(session, {"list_id": list_id}).first()
        assert row is not None
        mailing_list = read[list_id] = _copy(row)
    return mailing_list


def sync_declared(engine: Engine, *, declared: list[ListSettings]) -> None:
    """`sync_from_settings` in a transaction of its own, as a process starts. Processes
    starting together on a new database (`serve --workers 2`, a `newsletter worker`
    beside it) may both try to create a list: the one that loses the race finds it there
    on a second try."""
    for attempt in (1, 2):
        try:
            with db.session_scope(engine) as session:
                sync_from_settings(session, declared=declared, now=utcnow())
            return
        except sa_exc.IntegrityError:
            if attempt == 2:
                raise
            log.info("lists.created_meanwhile")


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
        # The text this version stands for; a changed text under the same version stops
        # the start (ConsentWordingChanged).
        consent.record(session, mailing_list=row, overrides=item.consent_text, now=now)


# Operators' changes ---------------------------------------------------------------------
#
# A list declared in the settings belongs to the settings: `sync_from_settings` rewrites it
# at every start, so the API refuses to change it (409) rather than accept a change that
# the next restart would undo. A list created through the API lives in the database only;
# it has no backend (nothing is pushed anywhere: its sync jobs wait as dead letters, to be
# retried) until the settings declare a list with its slug, which then takes it over at
# the next start.

EDITABLE = frozenset(
    {
        "name",
        "default_locale",
        "consent_version",
        "confirm_ttl_seconds",
        "thank_you_url",
        "landing_url",
    }
)


def create(
    session: Session,
    *,
    slug: str,
    name: str,
    default_locale: str,
    consent_version: str,
    confirm_ttl_seconds: int,
    thank_you_url: str | None,
    landing_url: str | None,
    declared: list[ListSettings],
    now: datetime,
) -> MailingList:
    if any(item.slug == slug for item in declared):
        raise errors.Conflict(
            f"The list {slug!r} is declared in the settings (NEWSLETTER_LISTS); change it there."
        )
    if session.exec(select(MailingList.id).where(MailingList.slug == slug)).first() is not None:
        raise errors.Conflict(f"A list named {slug!r} already exists.")
    row = MailingList(
        slug=slug,
        name=name,
        default_locale=default_locale,
        consent_version=consent_version,
        confirm_ttl_seconds=confirm_ttl_seconds,
        thank_you_url=thank_you_url,
        landing_url=landing_url,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    consent.record(session, mailing_list=row, overrides={}, now=now)
    return row


def update(
    session: Session,
    *,
    slug: str,
    changes: dict[str, Any],
    declared: list[ListSettings],
    now: datetime,
) -> MailingList:
    """Apply `changes` (a subset of EDITABLE) to a list created through the API."""
    row = get(session, slug=slug)
    if any(item.slug == slug for item in declared):
        raise errors.Conflict(
            f"The list {slug!r} is declared in the settings (NEWSLETTER_LISTS), which are "
            "applied at every start; change it there."
        )
    unknown = set(changes) - EDITABLE
    if unknown:
        raise ValueError(f"not editable: {sorted(unknown)}")
    for name, value in changes.items():
        setattr(row, name, value)
    row.updated_at = now
    session.add(row)
    session.flush()
    # A new name changes the wording (it names the list): 409 unless the version changes.
    consent.record(session, mailing_list=row, overrides={}, now=now)
    return row
