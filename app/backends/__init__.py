"""Mailing-list backends: the protocol (`base`), one module per backend, and the registry.

Adding a backend: a settings model in `app.config` (a new `kind` in `BackendSettings`), a
module here with a class following `ListBackend`, and one entry in `_FACTORIES`.

An adapter's module, and httpx with it, is imported when a list first needs it: the API
process, which never calls a backend, keeps httpx (~6 MB with its command-line client) out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from app.addresses import deliverable
from app.backends.base import ListBackend, mailman_refuses
from app.config import BackendSettings

if TYPE_CHECKING:
    import httpx


def _none(settings: Any, client: httpx.Client) -> ListBackend:
    from app.backends.none import NoneBackend

    return NoneBackend()


def _listmonk(settings: Any, client: httpx.Client) -> ListBackend:
    from app.backends.listmonk import ListmonkBackend

    return ListmonkBackend(settings, client)


def _mailgun(settings: Any, client: httpx.Client) -> ListBackend:
    from app.backends.mailgun import MailgunBackend

    return MailgunBackend(settings, client)


def _mailman(settings: Any, client: httpx.Client) -> ListBackend:
    from app.backends.mailman import MailmanBackend

    return MailmanBackend(settings, client)


# kind -> factory(settings of that kind, shared HTTP client)
_FACTORIES: dict[str, Callable[[Any, httpx.Client], ListBackend]] = {
    "none": _none,
    "listmonk": _listmonk,
    "mailgun": _mailgun,
    "mailman": _mailman,
}


def refused_characters(settings: BackendSettings, email: str) -> str:
    """The characters before the @-sign of `email` that the list's backend cannot hold, each
    once ('' when it can hold the address).

    Checked when an address is taken for a list, so nobody confirms an address that the
    list would never mail: its sync could only fail. Only Mailman's check is narrower than
    this service's; the domain reaches it in ASCII (`deliverable`), which it takes.
    """
    if settings.kind != "mailman":
        return ""
    return mailman_refuses(deliverable(email))[0]


def refusal(settings: BackendSettings | None, email: str) -> str | None:
    """Why the list whose backend is `settings` cannot take `email`, or None when it can."""
    refused = refused_characters(settings, email) if settings is not None else ""
    if not refused:
        return None
    return (
        f"this list's mailing-list server takes no {refused!r} before the @-sign; "
        "use another address"
    )


def make_backend(settings: BackendSettings, client: httpx.Client) -> ListBackend:
    return _FACTORIES[settings.kind](settings, client)


def make_client(*, connect_timeout: float, timeout: float) -> httpx.Client:
    """The one HTTP client the worker shares between backends: explicit timeouts, and
    `timeout` as the deadline of each call as a whole (`app.backends.http`)."""
    import httpx

    from app.backends.http import hold_to_deadlines

    client = httpx.Client(
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        limits=httpx.Limits(max_connections=20, max_keepalive_connections=10),
        headers={"user-agent": "bluehats-newsletter/1.0"},
        follow_redirects=False,
    )
    hold_to_deadlines(client)
    return client


__all__ = ["ListBackend", "make_backend", "make_client"]
