"""The HTTP connections of `newsletter serve`: uvicorn's, with a deadline on slow clients.

uvicorn waits for a request for as long as its client keeps the connection open: a
connection that sends nothing, or half a request line, or a body one byte a minute, holds
its socket and its memory for good, and enough of them (slowloris) take every file
descriptor the process has. Its only timer is the keep-alive one, between two requests.

Here each connection also has the read deadlines a reverse proxy gives (nginx's
`client_header_timeout` and `client_body_timeout`), both `NEWSLETTER_CLIENT_TIMEOUT`:
- a request's line and headers must arrive within it, counted from the connection's
  opening or from the request's first byte; otherwise `408` and the connection is closed;
- the body may pause no longer than it between two reads; otherwise the connection is
  closed, and the request (waiting for the rest) ends as a client that hung up (`499`);
  a body still coming after its request was answered (a 404 before it was read) is cut
  alike.
While the app is not reading (uvicorn stops reading when the body waiting for it grows
large), the body's deadline waits too: the client is not the slow one.

A request that asks to switch protocols (`Connection: Upgrade` with `Upgrade: h2c`, which
`curl --http2` adds to every request over http://) is served as HTTP/1.1, as RFC 9110 §7.8
lets a server do. httptools ends such a message at its headers and leaves its body as
bytes of the other protocol, which uvicorn drops: a sign-up reached the app without its
address. The request is read again without that ask, its body with it.
"""

from __future__ import annotations

import asyncio
import json
import logging

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app import errors

log = logging.getLogger(__name__)


def _closing_answer(status: bytes, code: str, detail: str) -> bytes:
    """A whole answer in the service's error shape, for a request the app never sees; the
    connection closes after it."""
    body = json.dumps({"error": code, "detail": detail}).encode()
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"content-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"connection: close\r\n"
        b"\r\n" + body
    )


_REQUEST_TIMEOUT = _closing_answer(
    b"408 Request Timeout",
    "request_timeout",
    "The request's headers did not arrive in time; the connection is closed.",
)
# uvicorn's answer was a line of plain text ("Invalid HTTP request received.").
_NOT_HTTP = _closing_answer(
    b"400 Bad Request",
    errors.BadRequest.code,
    "The request could not be read as HTTP/1.1 (its request line, a header or the framing "
    "of its body); the connection is closed.",
)


# How long a connection closed with an answer of ours reads what its client still sends.
LINGER_S = 2.0


class DeadlineHttp(HttpToolsProtocol):
    # Set by `configure` in each serving process, from the settings, before it serves.
    timeout: float = 30.0

    @classmethod
    def configure(cls, *, timeout: float) -> None:
        cls.timeout = timeout

    _deadline: asyncio.TimerHandle | None = None
    _reading_body = False
    # The request's headers ask for a switch of protocols that will not be made.
    _upgrade_refused = False
    # Its headers are being read again: should they still ask (a Connection option this
    # rewrite missed), uvicorn's own handling, not another reading.
    _rereading = False
    # Answered and half-closed (`_close_with`): what still comes is read and dropped.
    _lingering = False

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        # uvicorn's own, but for a switch of protocols it does not make.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade as upgrade:
            if self._upgrade_refused:
                self._read_again_without_upgrade(data[upgrade.args[0] :])
            elif self._should_upgrade():
                self.handle_websocket_upgrade()
            else:  # pragma: no cover - every upgrade not made is refused above
                self._unsupported_upgrade_warning()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's message is for its log, which has it; the client gets the usual shape.
        self._close_with(_NOT_HTTP)

    def _close_with(self, answer: bytes) -> None:
        """Send `answer` with uvicorn's own headers (`date`, `server`), and close.

        The close lingers (as nginx's `lingering_close`): the answer and then the end of
        the stream are sent, and what the client still sends is read and dropped until it
        closes, for `LINGER_S` at most. Closed at once, a socket holding bytes not read
        (the next line of headers a slow client was sending) is reset, and a reset may
        wipe out, at the client, the answer it has not read yet."""
        status, _, rest = answer.partition(b"\r\n")
        defaults = [
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        ]
        self.transport.write(b"\r\n".join([status, b"".join(defaults) + rest]))
        if not self.transport.can_write_eof():  # TLS: no half-close
            self.transport.close()
            return
        self._lingering = True
        self.transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)

    def _read_again_without_upgrade(self, rest: bytes) -> None:
        """Parse the request again from its headers, without `upgrade` among the connection
        options, so that what follows them is read as its body (and the next requests)."""
        version = self.parser.get_http_version().encode("ascii")
        head = [self.parser.get_method() + b" " + self.url + b" HTTP/" + version + b"\r\n"]
        for name, value in self.headers:
            if name == b"connection":
                options = [o.strip() for o in value.split(b",")]
                value = b", ".join(o for o in options if o and o.lower() != b"upgrade")
                if not value:
                    continue
            head.append(name + b": " + value + b"\r\n")
        self._upgrade_refused = False
        self._rereading = True
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.data_received(b"".join(head) + b"\r\n" + rest)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # The first byte of a request on a kept-alive connection (a new connection's
        # deadline already runs from its opening).
        if self._deadline is None:
            self._arm(self._headers_late)

    def on_headers_complete(self) -> None:
        self._disarm()
        rereading, self._rereading = self._rereading, False
        if (
            not rereading
            and self.parser.should_upgrade()
            and not self._should_upgrade()
            # CONNECT's tunnel is not a switch that can be left out: uvicorn's answer.
            and self.parser.get_method() != b"CONNECT"
        ):
            # Read again (`data_received`) before the app is called.
            self._upgrade_refused = True
            return
        super().on_headers_complete()
        # Headers without a body end the message at once (on_message_complete follows).
        self._reading_body = True
        self._arm(self._body_late)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self._reading_body:
            self._arm(self._body_late)

    def on_message_complete(self) -> None:
        if self._upgrade_refused:
            return  # the message, body and all, is read again
        self._reading_body = False
        self._disarm()
        super().on_message_complete()

    def _arm(self, late: object) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.timeout, late)  # type: ignore[arg-type]

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The start of a pipelined request, read while the one before is still being
            # answered (uvicorn reads no further meanwhile): that answer comes first.
            self._arm(self._headers_late)
            return
        log.info("http.request_timeout phase=headers")
        self._close_with(_REQUEST_TIMEOUT)

    def _body_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or not self._reading_body:
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_complete:
            # Answered before the whole body came (a 404, a refusal), and the rest stopped
            # coming: the connection cannot carry another request before it ends. uvicorn's
            # keep-alive timer was cancelled by the body's last bytes.
            log.info("http.request_timeout phase=body_after_answer")
            self.transport.close()
            return
        if self.flow is not None and self.flow.read_paused:
            # The app has not taken what came: wait for it, not for the client.
            self._arm(self._body_late)
            return
        log.info("http.request_timeout phase=body")
        self.transport.close()
