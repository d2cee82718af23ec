"""What every mailing-list backend adapter provides, and the only errors it may raise.

    SyncError
     +-- RetryableSyncError   timeouts, connection errors, 5xx, 408, 425, 429 (with
     |                        `retry_after` from the backend's Retry-After): the outbox
     |                        retries later
     +-- PermanentSyncError   any other 4xx: the job goes to the dead letters with the
                              reason, for an operator to look at

Idempotent outcomes are successes, not errors: "already a member" on add, "not found" on
remove or unsubscribe. No httpx exception leaves an adapter: `app.backends.http.send()` turns
each into one of the two, always chained (`raise ... from e`).

Addresses reach an adapter as mails carry them (`app.addresses.deliverable`): an
internationalized domain in ASCII (`xn--`), which every backend takes (Mailman 3 refuses
the Unicode form). The sync layer converts them; an adapter sends them as they come.

This service owns consent; a backend only receives confirmed members. Each member carries
its personal unsubscribe URL as a member variable (`unsubscribe_url`), so the newsletter
template can put it in the `List-Unsubscribe` header (RFC 8058).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# What Mailman 3's address check (mailman.email.validate) takes before the @-sign: RFC
# 5322's atext less `^` and `|`, and no letter beyond ASCII (RFC 6531), which this service
# takes; after it, a domain in ASCII.
_MAILMAN_LOCAL = re.compile(r"[-0-9a-z!#$%&'*+./=?@_`{}~]", re.IGNORECASE)
_MAILMAN_DOMAIN = re.compile(r"[-0-9a-z.]", re.IGNORECASE)


def mailman_refuses(email: str) -> tuple[str, str]:
    """The characters of `email` Mailman's address check does not take, each once: those
    before the @-sign, and those after it ('' and '' when Mailman takes the address)."""
    local, _, domain = email.rpartition("@")
    return (
        "".join(dict.fromkeys(_MAILMAN_LOCAL.sub("", local))),
        "".join(dict.fromkeys(_MAILMAN_DOMAIN.sub("", domain))),
    )


class SyncError(Exception):
    retryable: bool = True

    def __init__(
        self,
        message: str,
        *,
        response: str | None = None,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        # What the backend answered, truncated, for the attempt log.
        self.response = response
        # Seconds the backend asked us to wait (429 / 503 Retry-After).
        self.retry_after = retry_after
        # The HTTP status of a refused call; None where no status says it (a timeout, an
        # answer that could not be read).
        self.status = status


class RetryableSyncError(SyncError):
    retryable = True


class PermanentSyncError(SyncError):
    retryable = False


@dataclass(frozen=True, slots=True)
class Member:
    """A confirmed subscriber as a backend should hold it."""

    email: str
    locale: str
    unsubscribe_url: str
    name: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)

    def variables(self) -> dict[str, str]:
        """Member variables for the newsletter template."""
        return {**self.attributes, "locale": self.locale, "unsubscribe_url": self.unsubscribe_url}


@dataclass(frozen=True, slots=True)
class RemoteMember:
    """A member as the backend reports it."""

    email: str
    subscribed: bool
    name: str | None = None
    # Why the backend holds this subscribed member without delivering to them (Mailman's
    # `delivery_status`: by_bounces, by_user, by_moderator, unknown); None while it
    # delivers, and for backends that keep no such state apart from unsubscribing.
    delivery_off: str | None = None
    # The member's variables where the backend holds them (Mailgun's `vars`), as it sent
    # them: any JSON value.
    variables: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MembersPage:
    members: list[RemoteMember]
    # Opaque; None on the last page.
    next_cursor: str | None


class ListBackend(Protocol):
    """One list at one backend. Every call either succeeds or raises a SyncError."""

    # How many members one `add` call may carry (1 where the backend has no bulk call).
    max_batch: int
    # True where an unsubscribed member stays listed as unsubscribed (Mailgun, listmonk);
    # False where unsubscribing deletes the member (Mailman): there, a confirmed member's
    # absence may be a departure made at the backend, not a member to add back.
    keeps_unsubscribed: bool

    def add(self, members: Sequence[Member]) -> str:
        """Add or update confirmed members (subscribed); returns the backend's answer."""
        ...

    def unsubscribe(self, address: str) -> str:
        """Stop sending to this member (kept as unsubscribed where the backend can)."""
        ...

    def remove(self, address: str) -> str:
        """Delete the member entirely (erasure)."""
        ...

    def members(self, cursor: str | None = None) -> MembersPage:
        """One page of the backend's members, subscribed or not."""
        ...

    def clear_suppression(self, address: str) -> str | None:
        """Forget a past unsubscribe or bounce held outside the list, where the backend
        keeps one (Mailgun); None where there is nothing to clear."""
        ...
