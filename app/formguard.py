"""Bot defences of the hosted forms (subscribe, ask for an unsubscribe link): a honeypot
field and a minimum fill time.

The hosted page carries a stamp, `<unix milliseconds>.<HMAC-SHA256(key, "form-stamp:" ms)>`
truncated to 32 hex digits. A post whose honeypot field, hidden from people, holds anything,
or whose stamp is forged, is a robot's: it gets the same answer as a success and nothing is
stored or mailed, so a robot learns nothing to adapt to.

A post with an empty honeypot and a stamp of ours that is only younger than the minimum fill
time or older than the maximum age may be a person's (`SENT_BACK`): a browser that fills the
address in and a press at once, a tab left open overnight. Nothing is stored or mailed for
it either, but the form comes back with what was typed, a notice to press again and a stamp
that passes then; answered as a success, that person was told to check a mailbox that got
nothing. A robot gains a second post for it, as it would by waiting.

The site's own static form cannot carry a stamp, so a post without one passes unless the
list sets `require_form_stamp`. `rejections` counts the posts refused, by reason, for
metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timedelta
from enum import StrEnum

log = logging.getLogger(__name__)

STAMP_FIELD = "form_stamp"
# A name bots like to fill; people never see the field (see the page's `fr-sr-only`).
HONEYPOT_FIELD = "website"
_DIGEST_HEX = 32


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    HONEYPOT = "honeypot"
    MISSING = "missing"
    TOO_FAST = "too_fast"
    TOO_OLD = "too_old"
    FORGED = "forged"


# Refusals a person's post may meet: the form comes back to be sent again (module docstring).
SENT_BACK = frozenset({Verdict.TOO_FAST, Verdict.TOO_OLD})


_lock = threading.Lock()
rejections: Counter[Verdict] = Counter()


def _signature(key: bytes, millis: int) -> str:
    # The prefix keeps this MAC apart from the link tokens made with the same key.
    mac = hmac.new(key, f"form-stamp:{millis}".encode(), hashlib.sha256)
    return mac.hexdigest()[:_DIGEST_HEX]


def issue(*, key: bytes, now: datetime) -> str:
    """The stamp a freshly served page carries."""
    millis = int(now.timestamp() * 1000)
    return f"{millis}.{_signature(key, millis)}"


def check_stamp(
    stamp: str | None,
    *,
    key: bytes,
    now: datetime,
    min_fill_time: timedelta,
    max_age: timedelta,
    required: bool,
) -> Verdict:
    if not stamp:
        return Verdict.MISSING if required else Verdict.ACCEPTED
    millis_text, _, signature = stamp.partition(".")
    if not millis_text.isascii() or not millis_text.isdigit() or len(millis_text) > 15:
        return Verdict.FORGED
    millis = int(millis_text)
    if not hmac.compare_digest(signature.encode(), _signature(key, millis).encode()):
        return Verdict.FORGED
    age = now.timestamp() - millis / 1000
    if age < min_fill_time.total_seconds():
        return Verdict.TOO_FAST
    if age > max_age.total_seconds():
        return Verdict.TOO_OLD
    return Verdict.ACCEPTED


def check(
    *,
    honeypot: str | None,
    stamp: str | None,
    key: bytes,
    now: datetime,
    min_fill_time: timedelta,
    max_age: timedelta,
    require_stamp: bool,
) -> Verdict:
    """The verdict on one form post: `ACCEPTED`, or why it is dropped."""
    if honeypot:
        return Verdict.HONEYPOT
    return check_stamp(
        stamp,
        key=key,
        now=now,
        min_fill_time=min_fill_time,
        max_age=max_age,
        required=require_stamp,
    )


def screen(
    form: Mapping[str, str],
    *,
    key: bytes,
    now: datetime,
    min_fill_time: timedelta,
    max_age: timedelta,
    require_stamp: bool,
    list_slug: str,
) -> Verdict:
    """The verdict on a form post; a refused one is counted and logged here (no address)."""
    verdict = check(
        honeypot=form.get(HONEYPOT_FIELD),
        stamp=form.get(STAMP_FIELD),
        key=key,
        now=now,
        min_fill_time=min_fill_time,
        max_age=max_age,
        require_stamp=require_stamp,
    )
    if verdict != Verdict.ACCEPTED:
        record_rejection(verdict, list_slug=list_slug)
    return verdict


def record_rejection(verdict: Verdict, *, list_slug: str) -> None:
    """Count and log a refused post (never its address: the log is not the ledger)."""
    with _lock:
        rejections[verdict] += 1
    log.info("formguard.rejected list=%s reason=%s", list_slug, verdict.value)


def rejection_counts() -> dict[str, int]:
    """A copy of the counters, by reason (for a metrics exporter)."""
    with _lock:
        return {verdict.value: count for verdict, count in rejections.items()}
