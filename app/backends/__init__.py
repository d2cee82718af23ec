"""Mailing-list backends: the protocol (`base`), one module per backend, and the registry.

Adding a backend: a settings model in `app.config` (a new `kind` in `BackendSettings`), a
module here with a class following `ListBackend`, and one entry in `_FACTORIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from app.backends.base import ListBackend
from app.backends.listmonk import ListmonkBackend
from app.backends.mailgun import MailgunBackend
from app.backends.mailman import MailmanBackend
from app.backends.none import NoneBackend
from app.config import BackendSettings

# kind -> factory(settings of that kind, shared HTTP client)
_FACTORIES: dict[str, Callable[[Any, httpx.Client], ListBackend]] = {
    "none": lambda settings, client: NoneBackend(),
    "listmonk": lambda settings, client: ListmonkBackend(settings, client),
    "mailgun": lambda settings, client: MailgunBackend(settings, client),
    "mailman": lambda settings, client: MailmanBackend(settings, client),
}


def make_backend(settings: BackendSettings, client: httpx.Client) -> ListBackend:
    return _FACTORIES[settings.kind](settings, client)


def make_client(*, connect_timeout: float, timeout: float) -> httpx.Client:
    """The one HTTP client the worker shares between backends: explicit timeouts."""
    return httpx.Client(
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        limits=httpx.Limits(max_connections=20, max_keepalive_connections=10),
        headers={"user-agent": "bluehats-newsletter/1.0"},
        follow_redirects=False,
    )


__all__ = ["ListBackend", "make_backend", "make_client"]
