"""Which web origins may post the public forms, and what origin a request comes from.

An origin is `scheme://host[:port]` as browsers serialize it in the `Origin` header:
lowercase scheme and host, no default port (80 for http, 443 for https), no path.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize(value: str) -> str | None:
    """The serialized origin of a URL or origin string; None when it has none (`null`,
    a relative or opaque URL, another scheme, a malformed port)."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in DEFAULT_PORTS or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def parse_setting(value: str) -> str:
    """An operator's `scheme://host[:port]`, normalized; ValueError for anything else."""
    origin = normalize(value)
    parts = urlsplit(value.strip())
    if origin is None or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{value!r} is not an origin like https://code.gouv.fr[:port]")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{value!r}: an origin carries no user or password")
    return origin


def request_origin(*, origin: str | None, referer: str | None) -> str | None:
    """The origin a browser says a request comes from: `Origin`, else `Referer`'s origin.

    Returns "" when the browser sent neither (see `allowed`), and "null" for an opaque or
    unreadable one.
    """
    if origin:
        return normalize(origin) or "null"
    if referer:
        return normalize(referer) or "null"
    return ""


def allowed(origin: str | None, allow_list: Iterable[str]) -> bool:
    """Whether a form post from `origin` (as `request_origin` gives it) may go on.

    No `Origin` and no `Referer` at all is accepted: privacy extensions and some proxies
    strip both, while a browser posting from another site's page always sends `Origin`
    (only a person's own tools remove it). `Origin: null` is refused: any page can make a
    browser send it (`Referrer-Policy: no-referrer`, a sandboxed frame), so accepting it
    would let every site post the form through its visitors' browsers.
    """
    if origin == "":
        return True
    return origin is not None and origin in set(allow_list)
