"""The block-list: addresses and domains operators refuse to mail or to add.

A public request (subscribe, or ask for an unsubscribe link) for a blocked address gets the
very answer any address gets, from the same domain function in the same transaction, which
even does the ordinary work (rows, token, mail job) and rolls it back to a savepoint, so the
answer takes as long (measured: medians within 0.5 ms on SQLite). Nothing is mailed and no
subscription row is kept: the request leaves one consent-ledger
event under the address's keyed hash (`privacy.address_hash`, as an erasure's tombstone),
with the request's evidence, so that operators can see the abuse and the person can be
shown what was asked in their name, while the table holds no address in clear.

An operator's "add subscriber" (either mode) and a CSV import refuse a blocked address
(409 `address_blocked`, a row error). The worker skips a queued mail to an address blocked
after it was queued. A block never changes an existing subscription: an opt-out link
keeps working, and a confirmed subscriber blocked by mistake is not lost.

A domain entry `example.org` blocks `a@example.org` and `a@mail.example.org`, not
`a@badexample.org`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, col, select

from app import addresses, db, errors
from app.models import BlockedEntry, BlockKind

log = logging.getLogger(__name__)


def normalize(kind: BlockKind, raw: str) -> str:
    """The stored form: the case-folded address, or the domain as email-validator writes it.

    Raises `addresses.InvalidAddress` for something that is not an address (or a domain).
    """
    if kind == BlockKind.ADDRESS:
        # Blocking (or unblocking) a look-alike is just what an operator may need to do.
        return addresses.parse(raw, new=False).key
    domain = raw.strip().removeprefix("@").rstrip(".")
    if not domain or "@" in domain:
        raise addresses.InvalidAddress("A domain entry is a domain name, such as example.org.")
    # The address parser normalizes domains (IDNA, case) exactly as it does subscribers'.
    try:
        return addresses.parse(f"postmaster@{domain}", new=False).key.partition("@")[2]
    except addresses.InvalidAddress as e:
        # Its reasons speak of an address ("The part after the @-sign ..."): an operator who
        # typed a domain is told about the domain.
        reason = str(e).replace("The part after the @-sign", "The domain")
        if "@" in reason:
            reason = "A domain entry is a domain name, such as example.org."
        raise addresses.InvalidAddress(reason) from e


def _domains_of(email_key: str) -> list[str]:
    """`a@mail.example.org` -> mail.example.org, example.org, org."""
    labels = email_key.rpartition("@")[2].split(".")
    return [".".join(labels[n:]) for n in range(len(labels))]


_ENTRIES = BlockedEntry.__table__  # type: ignore[attr-defined]


@functools.cache
def _match_statement(domains: int) -> db.Prepared:
    """The look-up for an address of `domains` domain levels, prepared once per length
    (an expanding IN is compiled again at every call; this runs for every subscription)."""
    return db.Prepared(
        sa.select(_ENTRIES.c.kind)
        .where(
            (_ENTRIES.c.kind == BlockKind.ADDRESS.value) & (_ENTRIES.c.value == sa.bindparam("key"))
            | (_ENTRIES.c.kind == BlockKind.DOMAIN.value)
            & _ENTRIES.c.value.in_([sa.bindparam(f"d{n}") for n in range(domains)])
        )
        .limit(1)
    )


# Session.info key: whether the block-list had any entry when this transaction first looked.
_ANY = "blocklist_any"
_ANY_ENTRY = db.Prepared(sa.select(_ENTRIES.c.kind).limit(1))


def match(session: Session, *, email_key: str) -> BlockKind | None:
    """Which kind of entry blocks this address, if any (one indexed look-up).

    An empty block-list, the usual case, is read once per transaction: the public requests
    of one group commit (app/writer.py) then need no look-up each. A block added while the
    transaction runs applies from the next one, as it would to a request a moment earlier.
    """
    any_entry = session.info.get(_ANY)
    if any_entry is None:
        any_entry = session.info[_ANY] = _ANY_ENTRY.execute(session, {}).first() is not None
    if not any_entry:
        return None
    domains = _domains_of(email_key)
    found = (
        _match_statement(len(domains))
        .execute(
            session,
            {"key": email_key, **{f"d{n}": domain for n, domain in enumerate(domains)}},
        )
        .scalar()
    )
    return BlockKind(found) if found is not None else None


def blocked_among(session: Session, *, email_keys: Iterable[str]) -> set[str]:
    """`match` for a batch (an import's): the keys that are blocked, in two queries."""
    keys = set(email_keys)
    if not keys:
        return set()
    by_address = set(
        session.exec(
            select(BlockedEntry.value).where(
                BlockedEntry.kind == BlockKind.ADDRESS, col(BlockedEntry.value).in_(keys)
            )
        ).all()
    )
    domains = set(
        session.exec(select(BlockedEntry.value).where(BlockedEntry.kind == BlockKind.DOMAIN)).all()
    )
    return {
        key
        for key in keys
        if key in by_address or any(domain in domains for domain in _domains_of(key))
    }


def refuse_if_blocked(session: Session, *, email_key: str) -> None:
    if match(session, email_key=email_key) is not None:
        raise errors.AddressBlocked()


def add(
    session: Session, *, kind: BlockKind, value: str, reason: str, actor: str, now: datetime
) -> BlockedEntry:
    """Block an address or a domain; Conflict if it is already blocked.

    `value` must be normalized already (`normalize`).
    """
    existing = session.exec(
        select(BlockedEntry).where(BlockedEntry.kind == kind, BlockedEntry.value == value)
    ).first()
    if existing is not None:
        raise errors.Conflict(f"This {kind.value} is already on the block-list.")
    entry = BlockedEntry(kind=kind, value=value, reason=reason, created_at=now, created_by=actor)
    session.add(entry)
    session.flush()
    session.info.pop(_ANY, None)
    log.info("blocklist.added kind=%s id=%s", kind.value, entry.id)
    return entry


def all_entries(session: Session, *, kind: BlockKind | None = None) -> list[BlockedEntry]:
    query = select(BlockedEntry)
    if kind is not None:
        query = query.where(BlockedEntry.kind == kind)
    return list(session.exec(query.order_by(col(BlockedEntry.kind), col(BlockedEntry.value))))


def find(session: Session, *, kind: BlockKind, value: str) -> BlockedEntry:
    entry = session.exec(
        select(BlockedEntry).where(BlockedEntry.kind == kind, BlockedEntry.value == value)
    ).first()
    if entry is None:
        raise errors.NotFound(f"This {kind.value} is not on the block-list.")
    return entry


def remove(session: Session, *, entry_id: int) -> BlockedEntry:
    entry = session.get(BlockedEntry, entry_id)
    if entry is None:
        raise errors.NotFound("No block-list entry has this id.")
    session.delete(entry)
    session.flush()
    log.info("blocklist.removed kind=%s id=%s", entry.kind, entry_id)
    return entry
