"""Logging helpers: link tokens never reach a log line."""

from __future__ import annotations

import logging
import re

_TOKEN_PATH = re.compile(r"(/v1/(?:confirm|unsubscribe)/)[^\s\"?/]+")


def redact(text: str) -> str:
    return _TOKEN_PATH.sub(r"\1<redacted>", text)


class RedactTokens(logging.Filter):
    """Rewrites token paths in a record (uvicorn's access log carries request paths)."""

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
