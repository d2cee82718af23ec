"""One HTTP call of an adapter, its failures turned into the errors of `app.backends.base`.

Apart from `base` so that what only needs the protocol and the errors (the sync planner,
the API process) does not import httpx.

A call has a deadline as a whole, the client's read timeout (NEWSLETTER_BACKEND_TIMEOUT):
httpx's timeouts bound each read, so a server answering a byte at a time held a call for
as long as it liked, past the job's lease. The clients of `app.backends.make_client` cut
each connect, read and write to what is left of the deadline of the call under way in
their thread (`hold_to_deadlines`), and `send` sets that deadline. It also has a size: the
answer is streamed and read up to MAX_ANSWER_BYTES, past which the call fails (retryable
after a 5xx, 408, 425 or 429, permanent otherwise) with the start of the answer on record.
"""

from __future__ import annotations

import email.utils
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpcore
import httpx

from app.backends.base import PermanentSyncError, RetryableSyncError

RESPONSE_LIMIT = 500

# The most of an answer a call reads, decoded: a backend's largest answer is a page of 100
# members with their variables (some 100 KB at Mailgun or listmonk); a proxy's or a broken
# backend's endless body stops here instead of filling the worker's memory.
MAX_ANSWER_BYTES = 4 * 1024 * 1024

_T = TypeVar("_T")

# The deadline (time.monotonic()) of the call under way in this thread, and whether the
# call has run into it.
_call = threading.local()


# A link of ours in a backend's answer: a member's `unsubscribe_url` comes back with the
# member (listmonk's `attribs`, Mailgun's `vars`), in JSON that may write `/` as `\/`.
_LINK_TOKEN = re.compile(
    r"((?:\\?/)+(?:confirm|unsubscribe)(?:\\?/)+)[^\s\"'?/\\<>&]+", re.IGNORECASE
)


def clean(text: str, *, limit: int) -> str:
    """The start of a backend's answer, for the attempt log, without the tokens of our
    links: the log is read with a read key and kept in the database, neither of which may
    unsubscribe anyone. A window a little past the limit is cleaned, so that a token cut
    there goes too."""
    return _LINK_TOKEN.sub(r"\1<redacted>", text[: limit + 100])[:limit]


def excerpt(response: httpx.Response) -> str:
    return f"{response.status_code} {clean(response.text, limit=RESPONSE_LIMIT)}"


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
    refused: tuple[int, str] | None = None,
    max_bytes: int = MAX_ANSWER_BYTES,
    **kwargs: Any,
) -> httpx.Response:
    """Make one call; success (2xx, or a status in `ok`) returns the response.

    `max_bytes`: the most of the answer read, for a call whose answer is known to be
    larger than a page (Mailman's whole roster, sized from its announced total).

    `ok` lists statuses that mean "already done" for this call (409 on add, 404 on
    remove); every other failure becomes a RetryableSyncError or a PermanentSyncError.
    `refused` is the status with which the backend refuses the credentials, and the
    settings to check then: Mailgun's 401 says "Forbidden" and nothing of the API key.
    """
    seconds = client.timeout.read
    _call.deadline = None if seconds is None else time.monotonic() + seconds
    _call.expired = False
    auth = kwargs.pop("auth", httpx.USE_CLIENT_DEFAULT)
    try:
        request = client.build_request(method, url, **kwargs)
        streamed = client.send(request, auth=auth, stream=True)
        try:
            response = _read_capped(streamed, what=what, max_bytes=max_bytes)
        finally:
            streamed.close()
    except httpx.TimeoutException as e:
        if _call.expired:
            raise RetryableSyncError(
                f"{what}: timed out, abandoned at the call's deadline: no whole answer "
                f"within {seconds:g}s (NEWSLETTER_BACKEND_TIMEOUT)"
            ) from e
        raise RetryableSyncError(f"{what}: timed out ({type(e).__name__})") from e
    except httpx.TransportError as e:
        raise RetryableSyncError(f"{what}: {type(e).__name__}: {e}") from e
    except httpx.DecodingError as e:
        # A body not in the encoding its headers name (`Content-Encoding: gzip` over plain
        # bytes, from a proxy, say): no TransportError, yet no answer to read either.
        raise RetryableSyncError(f"{what}: {type(e).__name__}: {e}") from e
    finally:
        _call.deadline = None
    if response.is_success or response.status_code in ok:
        return response
    status = response.status_code
    if status in RETRYABLE_4XX or status >= 500:
        raise RetryableSyncError(
            f"{what}: HTTP {status}",
            response=excerpt(response),
            retry_after=retry_after(response),
            status=status,
        )
    message = f"{what}: HTTP {status}"
    if refused is not None and status == refused[0]:
        message += f": check {refused[1]}"
    location = response.headers.get("location")
    if response.is_redirect and location:
        # Not followed (`make_client`): the credentials would go along, to another host
        # or over plain HTTP. Where it led tells the operator what base_url should be.
        message += (
            f", redirected to {clean(location, limit=200)}: redirects are not followed "
            "(is base_url right?)"
        )
    raise PermanentSyncError(message, response=excerpt(response), status=status)


def _read_capped(
    response: httpx.Response, *, what: str, max_bytes: int = MAX_ANSWER_BYTES
) -> httpx.Response:
    """The answer read whole, when it holds no more than `max_bytes` once decoded; else
    the call fails there, with the start of the answer on record."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            status = response.status_code
            start = b"".join(chunks)[:RESPONSE_LIMIT].decode(
                response.encoding or "utf-8", "replace"
            )
            error = (
                RetryableSyncError
                if status in RETRYABLE_4XX or status >= 500
                else PermanentSyncError
            )
            raise error(
                f"{what}: HTTP {status} with an answer over {max_bytes // (1024 * 1024)} "
                "MiB, not read further (no backend answers that much: a proxy's page? is "
                "base_url right?)",
                response=f"{status} {clean(start, limit=RESPONSE_LIMIT)}",
                status=status,
            )
    # The body as read, decoded: the headers that described its transfer go.
    headers = [
        (name, value)
        for name, value in response.headers.multi_items()
        if name.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    return httpx.Response(
        response.status_code, headers=headers, content=b"".join(chunks), request=response.request
    )


def _bounded(
    operation: Callable[[float | None], _T],
    timeout: float | None,
    expired: type[httpcore.TimeoutException],
) -> _T:
    """Run a network operation with its timeout cut to what is left of the call's deadline."""
    deadline: float | None = getattr(_call, "deadline", None)
    if deadline is None:
        return operation(timeout)
    left = deadline - time.monotonic()
    if left <= 0:
        _call.expired = True
        raise expired("the call's deadline has passed")
    if timeout is not None and timeout < left:
        return operation(timeout)
    try:
        return operation(left)
    except httpcore.TimeoutException:
        _call.expired = True
        raise


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return _bounded(lambda t: self._stream.read(max_bytes, t), timeout, httpcore.ReadTimeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        _bounded(lambda t: self._stream.write(buffer, t), timeout, httpcore.WriteTimeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        return _opened(lambda t: self._stream.start_tls(ssl_context, server_hostname, t), timeout)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def _opened(
    open_stream: Callable[[float | None], httpcore.NetworkStream], timeout: float | None
) -> _DeadlineStream:
    """A connection (or its TLS layer) opened within the call's deadline, and held to it."""
    return _DeadlineStream(_bounded(open_stream, timeout, httpcore.ConnectTimeout))


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        return _opened(
            lambda t: self._backend.connect_tcp(host, port, t, local_address, socket_options),
            timeout,
        )

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        return _opened(
            lambda t: self._backend.connect_unix_socket(path, t, socket_options), timeout
        )

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def hold_to_deadlines(client: httpx.Client) -> None:
    """Give the connection pools of the client (its own, and those of proxies taken from
    the environment) the network backend that holds each call of `send` to its deadline.

    httpx has no setting for httpcore's network backend (encode/httpx#3749 proposes one),
    so this reaches into its transports: a release that moves them fails here rather than
    lose the deadlines unseen (pyproject.toml keeps httpx below 0.29).
    """
    transports = [client._transport, *client._mounts.values()]
    pools = [getattr(transport, "_pool", None) for transport in transports if transport]
    if not pools or not all(isinstance(pool, httpcore.ConnectionPool) for pool in pools):
        raise RuntimeError("this httpx release keeps its connection pools elsewhere")
    for pool in pools:
        assert isinstance(pool, httpcore.ConnectionPool)
        pool._network_backend = _DeadlineBackend(pool._network_backend)
