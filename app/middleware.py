"""Pure ASGI middleware: a cap on request bodies, security headers on every answer, CORS
for the public JSON routes, and a request id on every answer and log line; and the
router's redirect of a path with a trailing slash too many or too few."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import quote

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import errors, logs


class BodyLimit:
    """Refuse bodies over `max_bytes`, whether announced by Content-Length or streamed."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        by_prefix: dict[str, int] | None = None,
        by_pattern: dict[str, int] | None = None,
        refusal: Callable[[Scope, str], Response] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # The answer to a body announced too large, given its detail: the application's
        # own (a page for a browser's form post); plain JSON without one.
        self.refusal = refusal
        # Larger caps for some paths (a backend's webhook events exceed a form's size;
        # `by_pattern`, regular expressions matching the whole path: a CSV import).
        self.by_prefix = by_prefix or {}
        self.by_pattern = [
            (re.compile(pattern), cap) for pattern, cap in (by_pattern or {}).items()
        ]

    def _limit(self, path: str) -> int:
        for pattern, cap in self.by_pattern:
            if pattern.fullmatch(path):
                return cap
        return next(
            (cap for prefix, cap in self.by_prefix.items() if path.startswith(prefix)),
            self.max_bytes,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope["path"])
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            if self.refusal is not None:
                response = self.refusal(scope, _over(limit))
                # The body is left unread: the connection cannot carry another request.
                response.headers["connection"] = "close"
                await response(scope, receive, send)
                return
            await self._refuse(send, limit)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise errors.PayloadTooLarge(_over(limit))
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send: Send, limit: int) -> None:
        body = json.dumps({"error": errors.PayloadTooLarge.code, "detail": _over(limit)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _over(limit: int) -> str:
    # The limit, so that an operator knows how much to split a CSV import into.
    return f"The request body is larger than {limit} bytes, the most this route takes."


@dataclass(frozen=True, slots=True)
class PagePolicy:
    """The pages' Content-Security-Policy: our own stylesheet (or the DSFR's, from its
    origin), our own script when the proof of work asks for one, and forms that post here
    and may lead on (a redirect after the post, which browsers check too) to `form_targets`,
    the site's thank-you pages."""

    form_targets: tuple[str, ...] = ()
    style_origins: tuple[str, ...] = ()
    scripts: bool = False

    def header(self, *, also_form_targets: Iterable[str] = ()) -> str:
        """The policy; `also_form_targets`: origins a page's form leads to besides those
        the settings name (the thank-you page of a list created through the API)."""
        targets = [*self.form_targets]
        targets += [origin for origin in also_form_targets if origin not in targets]
        actions = " ".join(["'self'", *targets])
        # A stylesheet from elsewhere (the DSFR) brings its fonts and icons from there too.
        styles = " ".join(["'self'", *self.style_origins])
        fonts = f"font-src {' '.join(self.style_origins)}; " if self.style_origins else ""
        # Our own script file only (the proof-of-work solver, when it is asked for), which
        # fetches its challenge from this origin; never an inline script.
        script = "script-src 'self'; connect-src 'self'; " if self.scripts else ""
        return (
            f"default-src 'none'; style-src {styles}; img-src {styles} data:; {fonts}{script}"
            f"form-action {actions}; frame-ancestors 'none'; base-uri 'none'"
        )


class SecurityHeaders:
    """Headers for every answer; pages under /v1 also get a strict CSP (`PagePolicy`; a
    page that sets its own keeps it) and no caching (their URLs carry tokens;
    `strict-origin` keeps those out of other sites' logs), but for the forms that a
    browser may show again on Back (`app.api.views.kept_for_back`).

    `https`: the service is published over HTTPS (`NEWSLETTER_PUBLIC_URL`), so browsers are
    told to come back over HTTPS only (HSTS): a link typed or followed as `http://` would
    otherwise cross the network in clear first, token included, where anyone on the way
    can read it or answer in the service's place. Browsers ignore the header over HTTP.
    """

    def __init__(self, app: ASGIApp, *, policy: PagePolicy, https: bool = False) -> None:
        self.app = app
        # A year, as commonly required to be preloaded; subdomains are not ours to bind.
        self.hsts = "max-age=31536000" if https else None
        self.csp = policy.header()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        on_v1 = scope["path"].startswith("/v1/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("x-content-type-options", "nosniff")
                # The origin alone, never a path (link URLs carry tokens), and to our own
                # forms too: under `no-referrer` a browser sends `Origin: null` with a form
                # post, which the origin check must refuse (see app/origins.py).
                headers.setdefault("referrer-policy", "strict-origin")
                headers.setdefault("x-frame-options", "DENY")
                if self.hsts is not None:
                    headers.setdefault("strict-transport-security", self.hsts)
                if on_v1:
                    headers.setdefault("content-security-policy", self.csp)
                    headers.setdefault("cache-control", "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)


class HeadAsGet:
    """HEAD answered as GET, without the body (RFC 9110 9.3.2): the routes declare GET
    alone, and a load balancer's, a link checker's or curl -I's HEAD got 405."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_head(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_head)


class RequestId:
    """Takes `X-Request-ID` when sane (else makes one), puts it in the logging context for
    the whole request (access line included) and returns it in the answer's header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = logs.accept_request_id(Headers(scope=scope).get("x-request-id"))
        token = logs.request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logs.request_id.reset(token)


# The public routes a page on an allowed site may call with fetch(): subscribe, unsubscribe
# by address, confirm and unsubscribe by link, and the proof-of-work challenge.
PUBLIC_CORS_PATHS = re.compile(
    r"/v1/(lists/[^/]+/(subscriptions|unsubscriptions)|confirm/[^/]+|unsubscribe/[^/]+|challenge)"
)


class PublicCors:
    """Starlette's CORSMiddleware for the public routes only; the admin API and the rest get
    no CORS headers at all, so no browser page can read them cross-origin.

    No credentials (the public routes use no cookies); preflights are cached for an hour.
    """

    def __init__(self, app: ASGIApp, *, origins: list[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Accept", "Accept-Language"],
            # A page's script reads a 429's Retry-After (README, rate limits) and the
            # request id to quote when reporting a problem; others stay hidden from it.
            expose_headers=["Retry-After", "X-Request-ID"],
            allow_credentials=False,
            max_age=3600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not PUBLIC_CORS_PATHS.fullmatch(scope["path"]):
            await self.app(scope, receive, send)
            return
        if any(name == b"origin" for name, _ in scope["headers"]):
            headers = Headers(scope=scope)
            if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                await self._preflight(headers)(scope, receive, send)
                return
            await self.cors(scope, receive, send)
            return

        # No Origin: nothing to allow, only the `Vary: Origin` that CORSMiddleware would
        # add, without its cost on every sign-up and confirmation sent by a server.
        async def send_varying(message: Message) -> None:
            if message["type"] == "http.response.start":
                vary_on_origin(message)
            await send(message)

        await self.app(scope, receive, send_varying)

    def _preflight(self, headers: Headers) -> Response:
        """CORSMiddleware's answer to a preflight; a refusal in the one error shape, saying
        what a site's script may send, rather than its bare `Disallowed CORS origin`."""
        response = self.cors.preflight_response(request_headers=headers)
        if response.status_code == 200:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        kept = {
            name: value
            for name, value in response.headers.items()
            if name not in ("content-length", "content-type")
        }
        return JSONResponse(
            {
                "error": "cors_refused",
                "detail": (
                    f"A page's script may not send this request (refused: {refused}). Allowed: "
                    "the origins in NEWSLETTER_ALLOWED_ORIGINS, GET and POST, the headers "
                    "Content-Type, Accept and Accept-Language."
                ),
            },
            status_code=response.status_code,
            headers=kept,
        )


def vary_on_origin(message: Message) -> None:
    """Add `Origin` to the answer's `Vary`, as one header, as CORSMiddleware writes it."""
    headers = list(message.get("headers", []))
    vary = [value for name, value in headers if name.lower() == b"vary"]
    kept = [(name, value) for name, value in headers if name.lower() != b"vary"]
    message["headers"] = [*kept, (b"vary", b", ".join([*vary, b"Origin"]))]


# What a path and a query may hold unencoded in a Location (RFC 3986 §3.3 and §3.4), besides
# the letters, digits and `-._~` that `quote` always keeps. A query is kept as it was sent,
# its `%XX` escapes included; a path arrives decoded, so its `%` is escaped.
_PATH_SAFE = "/:@!$&'()*+,;="
_QUERY_SAFE = _PATH_SAFE + "?%"


def on_this_host(path: str) -> str:
    """An encoded path that a browser reads as a path on this host: a second leading slash
    (`//evil.example/x`, another host's) written `%2F`, which the router reads back as the
    same path."""
    return "/%2F" + path[2:] if path.startswith("//") else path


def relative_location(path: str, query_string: bytes = b"") -> str:
    """`path` (decoded, as the ASGI scope holds it) and a raw query as a relative
    Location, which the client resolves against the URL it asked for (RFC 9110 §10.2.2).

    A Location starting with `//` would be read as another host's (`//evil.example/x`),
    as would `/\\evil.example` by browsers: the backslash is escaped with the rest, and a
    second leading slash is written `%2F`, which the router reads back as the same path.
    """
    location = on_this_host(quote(path, safe=_PATH_SAFE))
    if query_string:
        location += "?" + quote(query_string, safe=_QUERY_SAFE)
    return location


class SlashRedirect:
    """The router's last resort (its `default`, with its `redirect_slashes` off): a path
    with no route whose twin with or without a trailing slash has one gets a 307 to that
    twin, method and body kept, with a relative Location; anything else goes on to
    `fallback` (the 404).

    Starlette's own redirect writes an absolute URL from the Host header, which the client
    chooses: `Host: evil.example` got `Location: http://evil.example/...`, a redirect to
    another site that a cache keyed on the path would serve to everyone.
    """

    def __init__(self, routes: list[BaseRoute], *, fallback: ASGIApp) -> None:
        # The router's own list, so routes added after this is built are seen too.
        self.routes = routes
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            twin = path.rstrip("/") if path.endswith("/") else path + "/"
            if twin and self._routed({**scope, "path": twin}):
                location = relative_location(twin, scope.get("query_string", b""))
                await RedirectResponse(location, status_code=307)(scope, receive, send)
                return
        await self.fallback(scope, receive, send)

    def _routed(self, scope: Scope) -> bool:
        return any(route.matches(scope)[0] is not Match.NONE for route in self.routes)
