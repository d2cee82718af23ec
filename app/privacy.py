"""Data protection helpers shared by erasure, import and operators' additions.

An erased address survives only as HMAC-SHA256(secret key, "erased:" + case-folded
address): enough to recognise the person if the address comes back through an import, not
enough to recover the address from the database alone. The key is the service's secret key
(`Settings.token_key()`).

Free text that may quote the address (backend answers, errors, audit targets) is scrubbed:
every spelling of it becomes `[erased]`, in other people's records too: a backend's answer
to a bulk call, or a proxy's error page, may quote any member of the call, and lands on
every job of it (`scrub_mentions`). The backend removal job is the one place the address
stays in clear after an erasure, until the worker has run it (`scrub_after_removal`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Collection
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlmodel import Session, col, func, select

from app import addresses, sync
from app.models import DeliveryAttempt, ErasedAddress, JobState, OutboxJob


def address_hash(email_key: str, *, key: bytes) -> str:
    return hmac.new(key, f"erased:{email_key}".encode(), hashlib.sha256).hexdigest()


def is_erased(session: Session, *, email_key: str, key: bytes) -> bool:
    """True when this address was erased: it may come back only by a fresh opt-in."""
    wanted = address_hash(email_key, key=key)
    return (
        session.exec(select(ErasedAddress.id).where(ErasedAddress.address_hash == wanted)).first()
        is not None
    )


def erased_among(session: Session, *, keys: list[str], key: bytes) -> set[str]:
    """`is_erased` for a whole batch in one query: the keys that have a tombstone."""
    hashes = {address_hash(email_key, key=key): email_key for email_key in keys}
    found = session.exec(
        select(ErasedAddress.address_hash).where(col(ErasedAddress.address_hash).in_(hashes))
    ).all()
    return {hashes[value] for value in found}


# Scrubbing -------------------------------------------------------------------------------

# What an erased address becomes inside free text (backend answers, errors, notes).
ERASED = "[erased]"


# Characters that continue an address on either side: `ada@example.org` is not found in
# `barbada@example.org` nor in `ada@example.org.uk` (a trailing full stop still ends it).
# Rarer local-part characters (`/`, `=`, `'`) count as separators: they mostly quote or
# lead into an address (`/members/ada@...`, `?address=ada@...`, `'ada@...'`).
_BEFORE = r"(?<![\w.+-])"
_AFTER = r"(?![\w-]|\.[\w-])"


def _pattern(address: str) -> re.Pattern[str]:
    forms = _forms(address)
    alternatives = "|".join(re.escape(form) for form in sorted(forms, key=len, reverse=True))
    return re.compile(f"{_BEFORE}(?:{alternatives}){_AFTER}", re.IGNORECASE)


def _encoded(spelling: str) -> set[str]:
    return {spelling, quote(spelling, safe="@"), quote(spelling, safe="")}


def mentions(text: str | None, *, address: str) -> bool:
    return text is not None and _pattern(address).search(text) is not None


def scrub_text(text: str | None, *, address: str) -> str | None:
    """`text` with every spelling of `address` replaced by `[erased]`."""
    if text is None:
        return None
    return _pattern(address).sub(ERASED, text)


def scrub_json(value: Any, *, address: str) -> Any:
    """A JSON value with the address scrubbed from every string in it (keys included)."""
    if isinstance(value, str):
        return scrub_text(value, address=address)
    if isinstance(value, list):
        return [scrub_json(item, address=address) for item in value]
    if isinstance(value, dict):
        return {
            scrub_text(str(name), address=address): scrub_json(item, address=address)
            for name, item in value.items()
        }
    return value


def scrub_job(session: Session, *, job: OutboxJob, address: str, address_hash: str) -> None:
    """Take the address out of a job and its attempts (a job that no longer needs it)."""
    payload = scrub_json(dict(job.payload), address=address)
    if "address" in job.payload:
        # An address job keeps what it was about, as the tombstone's hash.
        payload.pop("address", None)
        payload["address_hash"] = address_hash
    job.payload = payload
    job.dedupe_key = scrub_text(job.dedupe_key, address=address)
    job.last_error = scrub_text(job.last_error, address=address)
    session.add(job)
    for attempt in session.exec(select(DeliveryAttempt).where(DeliveryAttempt.job_id == job.id)):
        attempt.error = scrub_text(attempt.error, address=address)
        attempt.response = scrub_text(attempt.response, address=address)
        session.add(attempt)


def _forms(address: str) -> set[str]:
    # Backends echo an address as typed, lowercased, or URL-encoded in a path, and as they
    # got it: an internationalized domain in ASCII.
    spellings = {address, addresses.deliverable(address)}
    return {form for spelling in spellings for form in _encoded(spelling)}


def _mentioning(column: Any, forms: set[str]) -> Any:
    """An SQL condition that holds for every text of `column` that may quote one of
    `forms`, in any case: a cheap filter before `mentions`, which decides. SQL's lower()
    folds ASCII everywhere (not more on SQLite), so a form beyond ASCII is also looked for
    as written and lowercased."""
    patterns = {form.lower() for form in forms if form.isascii()}
    exact = {variant for form in forms if not form.isascii() for variant in (form, form.lower())}
    return sa.or_(
        *(func.lower(column).contains(pattern, autoescape=True) for pattern in sorted(patterns)),
        *(column.contains(pattern, autoescape=True) for pattern in sorted(exact)),
    )


def _scrub_each(text: str | None, spellings: Collection[str]) -> str | None:
    for spelling in spellings:
        text = scrub_text(text, address=spelling)
    return text


def scrub_mentions(session: Session, *, spellings: Collection[str]) -> int:
    """Scrub the address from the errors and answers of every job and attempt, whoever
    they were about; how many jobs that touched. Payloads are left to the callers: only
    the jobs about the address carry it there."""
    forms = {form for spelling in spellings for form in _forms(spelling)}
    touched: set[int] = set()
    for attempt in session.exec(
        select(DeliveryAttempt).where(
            sa.or_(
                _mentioning(col(DeliveryAttempt.error), forms),
                _mentioning(col(DeliveryAttempt.response), forms),
            )
        )
    ).all():
        error = _scrub_each(attempt.error, spellings)
        response = _scrub_each(attempt.response, spellings)
        if (error, response) != (attempt.error, attempt.response):
            attempt.error, attempt.response = error, response
            session.add(attempt)
            touched.add(attempt.job_id)
    for job in session.exec(
        select(OutboxJob).where(_mentioning(col(OutboxJob.last_error), forms))
    ).all():
        error = _scrub_each(job.last_error, spellings)
        if error != job.last_error:
            job.last_error = error
            session.add(job)
            assert job.id is not None
            touched.add(job.id)
    return len(touched)


def scrub_after_removal(session: Session, *, job_id: int, key: bytes) -> int:
    """Once the backend has removed an erased address, the queue forgets it too.

    Called by the worker after a successful `remove` job: the address leaves that job's
    payload and dedupe key, its attempts' errors and answers, the other finished jobs about
    the same address on that list, and the jobs the erasure listed in `scrub_job_ids`
    (jobs of the erased subscription that were running at the time). Returns how many jobs
    were scrubbed; 0 when the job is not done (another worker took it over: it runs again).
    """
    job = session.get(OutboxJob, job_id)
    if job is None or job.state != JobState.DONE or "address" not in job.payload:
        return 0
    address = str(job.payload["address"])
    # The tombstone's hash, whichever spelling the job carries.
    hashed = address_hash(sync.remote_key(address) or address.casefold(), key=key)
    related = set(job.payload.get("scrub_job_ids", []))
    same_address = sync.address_job_key(list_id=int(job.payload["list_id"]), address=address)
    others = session.exec(
        select(OutboxJob).where(
            sa.or_(
                col(OutboxJob.id).in_(related),
                sa.and_(
                    col(OutboxJob.dedupe_key) == same_address,
                    col(OutboxJob.state) == JobState.DONE,
                ),
            ),
            col(OutboxJob.id) != job_id,
        )
    ).all()
    for other in [job, *others]:
        scrub_job(session, job=other, address=address, address_hash=hashed)
    # Answers that landed since the erasure, on other people's jobs (a bulk call's).
    scrub_mentions(session, spellings={address})
    return 1 + len(others)
