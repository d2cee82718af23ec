"""Logging: text for people or JSON for collectors, a request id on every line, and no
secret on any line.

- Link tokens never reach a log line (`/v1/confirm/<redacted>`), except the development
  mailer's line that shows a developer the link to click (`extra={"shows_link": True}`).
- Addresses are masked (`c*****@example.org`) at INFO and above, whoever logs them (our
  calls mask them already; uvicorn's access log and httpx's request log carry them in paths,
  percent-encoded, e.g. DELETE /v1/admin/people/{email}, Mailgun's /members/{address}), and
  so are the admin search's prefixes (`?prefix=c*****`). DEBUG shows them.
- The request id (`X-Request-ID` when sane, else generated) lives in a context variable set
  by `app.middleware.RequestId`; Starlette's thread pool copies the context, so lines logged
  from a sync endpoint or `Database.run` carry it too, as does uvicorn's access line.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

# Any case and doubled slashes too: `/v1/Confirm/<token>` is a 404, but its line shows it.
# Whatever stands before the segment: a client may send dot segments unresolved
# (`/v1/./confirm/<token>`, `/v1/lists/x/../../confirm/<token>`), which no route takes and
# the access line shows as sent. The unsubscribe request's own page (`.../unsubscribe/sent`)
# holds no token and is kept readable.
_TOKEN_PATH = re.compile(
    r"(/+(?:confirm|unsubscribe)/+)(?!sent(?:[\s\"?/]|$))[^\s\"?/]+", re.IGNORECASE
)
# Local part: what mail addresses carry in practice, stopping at the separators that surround
# them in paths, query strings and messages; `%40` is an @ in a URL, where uvicorn's and
# httpx's lines also percent-encode what is not ASCII (`%C3%A9lodie%40ex%C3%A4mple.fr`): the
# character kept in clear may be one encoded character (a lead byte and its continuations),
# and the domain may hold encoded characters. The domain may be partial or empty (a search
# prefix such as `camille%40exa`): whatever stands before an @ is masked.
# A match starts only where a word does (the look-behind): tried from inside every word, a
# long line without an address cost a time growing with the square of its length.
_HEX = "[0-9A-Fa-f]"
_ADDRESS = re.compile(
    r"(?<![^\s@<>()\[\],;:\"'/=?&])"
    rf"(%{_HEX}{{2}}(?:%[89ABab]{_HEX})*|[^\s@<>()\[\],;:\"'/=?&])"
    r"[^\s@<>()\[\],;:\"'/=?&]*(?:@|%40)"
    rf"((?:[\w-]|%{_HEX}{{2}})*(?:\.(?:[\w-]|%{_HEX}{{2}})+)*)"
)
# An address in an admin path, from the segment's start: a `/` is valid before the @-sign
# (`dept/jean@example.org`, decoded from `%2F` before uvicorn's line quotes the path again),
# where `_ADDRESS` takes it for the path's and would mask only what follows it.
_ADDRESS_IN_PATH = re.compile(
    r"(/v1/admin/(?:people|lists/[^/\s\"?]+/subscribers)/)"
    rf"(%{_HEX}{{2}}(?:%[89ABab]{_HEX})*|[^\s\"?@%])[^\s\"?@]*?(?=@|%40)"
)
# A URL's user and password (`postgresql://newsletter:***@db/newsletter`), up to its @: the
# database a start could not reach, a backend's address. Not a mail address to mask.
_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([^\s/?#@]*@)")
# The admin search's prefix is the start of an address, with or without its @.
_PREFIX = re.compile(rf"([?&]prefix=)(%{_HEX}{{2}}(?:%[89ABab]{_HEX})*|[^&\s\"#%])[^&\s\"#]*")
# What a client may send as X-Request-ID: a proxy's UUID or trace id, nothing to inject.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def redact(text: str) -> str:
    return _TOKEN_PATH.sub(r"\1<redacted>", text)


def mask_addresses(text: str) -> str:
    """`camille@example.org` -> `c*****@example.org`, wherever an address appears, and
    `?prefix=camille` -> `?prefix=c*****`."""
    # Most lines hold no address: two substring searches, and no regular expression, for them.
    if "prefix=" in text:
        text = _PREFIX.sub(r"\1\2*****", text)
    if "@" not in text and "%40" not in text:
        return text
    if "/v1/admin/" in text:
        text = _ADDRESS_IN_PATH.sub(r"\1\2*****", text)
    if "://" in text:
        return _ADDRESS.sub(functools.partial(_mask_outside, _userinfo_spans(text)), text)
    return _ADDRESS.sub(r"\1*****@\2", text)


def _userinfo_spans(text: str) -> list[tuple[int, int]]:
    return [match.span(1) for match in _USERINFO.finditer(text)]


def _mask_outside(spans: list[tuple[int, int]], match: re.Match[str]) -> str:
    """An address masked, unless it is the user (and password) of a URL."""
    if any(start <= match.start() < end for start, end in spans):
        return match.group(0)
    return f"{match.group(1)}*****@{match.group(2)}"


def accept_request_id(value: str | None) -> str:
    """The client's (or proxy's) request id when it is sane, else a new one."""
    if value is not None and _SANE_REQUEST_ID.fullmatch(value):
        return value
    # 128 random bits from the process's PRNG, as uuid4().hex reads them from the kernel:
    # an id needs to be unique, not secret, and os.urandom's system call hands the GIL to
    # the writer thread, which then keeps the request waiting for up to 5 ms.
    return f"{random.getrandbits(128):032x}"


class RedactTokens(logging.Filter):
    """Rewrites token paths in a record (uvicorn's access log carries request paths).

    Kept on the loggers for callers that install their own handlers; the formatters below
    redact again whatever reaches them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in record.args)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def install_redaction() -> None:
    for name in ("uvicorn.access", "uvicorn.error", "httpx"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())


def _clean(text: str, record: logging.LogRecord) -> str:
    if not getattr(record, "shows_link", False):
        text = redact(text)
    if record.levelno >= logging.INFO:
        text = mask_addresses(text)
    return text


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on each record (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = _clean(super().format(record), record)
        rid = getattr(record, "request_id", None)
        return f"{text} request_id={rid}" if rid else text


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "shows_link",
    "color_message",
}
_EVENT = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+")
# A line of a library's that does not start with an event name has its logger's name as
# event; uvicorn's general logger, which also announces start and stop, is "uvicorn.error".
_LOGGER_EVENTS = {"uvicorn.error": "uvicorn"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, message, request_id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        message = _clean(record.getMessage(), record)
        first = message.split(" ", 1)[0]
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": (
                first if _EVENT.fullmatch(first) else _LOGGER_EVENTS.get(record.name, record.name)
            ),
            "message": message,
            "request_id": getattr(record, "request_id", None),
        }
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            client, method, path, _version, status = args
            entry["event"] = "http.access"
            entry.update(
                client=client, method=method, path=_clean(str(path), record), status=status
            )
        for name, value in vars(record).items():
            if name not in _STANDARD and name not in entry:
                entry[name] = _clean(value, record) if isinstance(value, str) else value
        if record.exc_info:
            entry["exception"] = _clean(self.formatException(record.exc_info), record)
        return json.dumps(entry, default=str, ensure_ascii=False)


class QuietMigrationContext(logging.Filter):
    """Alembic announces its dialect each time the schema version is read, i.e. on every
    readiness probe; the upgrade lines themselves still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Context impl", "Will assume"))


def configure(*, level: str, fmt: str, stream: TextIO | None = None) -> logging.Handler:
    """One handler on the root logger for the whole process; uvicorn's loggers go through it."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Alembic 1.17+ announces each of its plugins (seven lines) on every `newsletter migrate`,
    # the first `make run` included, before the upgrades that matter.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    migration_log = logging.getLogger("alembic.runtime.migration")
    if not any(isinstance(f, QuietMigrationContext) for f in migration_log.filters):
        migration_log.addFilter(QuietMigrationContext())
    # A library's warning (warnings.warn) went to stderr as two lines of plain text, which a
    # collector reading one JSON object per line could not parse; now a line of its logger.
    logging.captureWarnings(True)
    install_redaction()
    return handler
