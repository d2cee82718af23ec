"""One HTTP call of an adapter, its failures turned into the errors of `app.backends.base`.

Apart from `base` so that what only needs the protocol and the errors (the sync planner,
the API process) does not import httpx.
"""

from __future__ import annotations

import email.utils
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from app.backends.base import PermanentSyncError, RetryableSyncError

RESPONSE_LIMIT = 500


def excerpt(response: httpx.Response) -> str:
    return f"{response.status_code} {response.text[:RESPONSE_LIMIT]}"


def retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# The 4xx answers about the moment, not the request: 408 (the server gave up waiting for
# the request, RFC 9110 §15.5.9), 425 (sent too early, RFC 8470), 429 (too many requests).
# The same call later may succeed.
RETRYABLE_4XX = frozenset({408, 425, 429})


def send(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    what: str,
    ok: Sequence[int] = (),
    **kwargs: Any,
) -> httpx.Response:
    """Make one call; success (2xx, or a status in `ok`) returns the response.

    `ok` lists statuses that mean "already done" for this call (409 on add, 404 on
    remove); every other failure becomes a RetryableSyncError or a PermanentSyncError.
    """
    try:
        response = client.request(method, url, **kwargs)
    except httpx.TimeoutException as e:
        raise RetryableSyncError(f"{what}: timed out ({type(e).__name__})") from e
    except httpx.TransportError as e:
        raise RetryableSyncError(f"{what}: {type(e).__name__}: {e}") from e
    if response.is_success or response.status_code in ok:
        return response
    status = response.status_code
    if status in RETRYABLE_4XX or status >= 500:
        raise RetryableSyncError(
            f"{what}: HTTP {status}", response=excerpt(response), retry_after=retry_after(response)
        )
    raise PermanentSyncError(f"{what}: HTTP {status}", response=excerpt(response))
