"""A Mailgun stand-in for tests: a real HTTP server on loopback that follows Mailgun's
documented v3 API for the calls the adapter makes, and signs webhooks as Mailgun does.

What it follows, and where Mailgun documents it:

- Auth: HTTP Basic, user `api`, password the API key; anything else gets 401.
  https://documentation.mailgun.com/docs/mailgun/api-reference/api-overview
- Errors: a JSON body `{"message": ...}` for a known endpoint (400, 404); a 404 without
  JSON for a path that is not an endpoint; 429 for rate limits, 5xx for Mailgun's own
  trouble. https://documentation.mailgun.com/docs/mailgun/quickstart-guide/responses
- POST /v3/lists/{list}/members: form fields address, name, vars (a JSON-encoded object),
  subscribed, upsert (default false: a duplicate address is a 400).
  .../api-reference/send/mailgun/mailing-lists/post-lists-string:list_address-members
- POST /v3/lists/{list}/members.json: form field `members`, a JSON array of addresses or
  of {address, name, vars, subscribed} objects, "up to 1000 per call"; upsert.
  .../send/mailgun/mailing-lists/post-lists-list_address-members.json
- PUT /v3/lists/{list}/members/{address}: form fields name, vars, subscribed; others kept.
  .../send/mailgun/mailing-lists/put-lists-list_address-members-member_address
- GET /v3/lists/{list}: the list ({"list": {...}}), a JSON 404 when Mailgun has none.
- DELETE /v3/lists/{list}/members/{address}: 404 when not a member.
  .../send/mailgun/mailing-lists/delete-lists-list_address-members-member_address
- GET /v3/lists/{list}/members/pages: limit (default 100), page (first, last, next, prev),
  address (the pivot), subscribed; answers {items, paging: {first, last, next, previous}},
  members in ascending order. https://documentation.mailgun.com/docs/inboxready/
  api-reference/optimize/mailgun/mailing-lists/get-lists-list_address-members-pages
- DELETE /v3/{domain}/unsubscribes/{address} and DELETE /v3/{domain}/bounces/{address}:
  200 {message, address}, 404 when the address is not in that table.
  .../send/mailgun/unsubscribe/delete-v3--domainid--unsubscribes--address-
  .../send/mailgun/bounces/delete-v3--domainid--bounces--address-
- Webhooks: JSON {"signature": {timestamp, token, signature}, "event-data": {...}}, the
  signature being HMAC-SHA256 of timestamp + token with the webhook signing key (hex).
  https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks
  https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/webhook-payloads

(`...` is https://documentation.mailgun.com/docs/mailgun/api-reference.)

Every request is recorded (method, path as sent and decoded, query, Basic credentials,
form fields) so tests assert what the server saw. Faults can be injected: N answers with
a 5xx, a 429 with Retry-After, a 400 for a given address, a slow answer, an answer
trickled in small pieces (each within any read timeout), and any answer a proxy or a
server on a bad day may give instead of Mailgun's (`answer_oddly`: an HTML page with a
200, a JSON body cut short, a body not in the encoding its headers name).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tests.conftest import LiveServer

BULK_LIMIT = 1000


@dataclass(frozen=True)
class SeenRequest:
    method: str
    # Decoded, as Mailgun routes it; `raw_path` keeps the percent-encoding as sent.
    path: str
    raw_path: str
    query: dict[str, str]
    auth: tuple[str, str] | None
    content_type: str
    form: dict[str, str]


@dataclass
class StoredMember:
    address: str
    name: str
    vars: dict[str, Any]
    subscribed: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "name": self.name,
            "vars": self.vars,
            "subscribed": self.subscribed,
        }


@dataclass
class Fault:
    status: int
    times: int
    retry_after: str | None = None
    delay: float = 0.0
    # An answer sent as it is (status, these bytes, these headers) instead of Mailgun's.
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


class BadRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _key(address: str) -> str:
    return address.strip().lower()


def _flag(value: str | None, *, default: bool) -> bool:
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in ("yes", "true"):
        return True
    if lowered in ("no", "false"):
        return False
    raise BadRequest(f"Invalid boolean value: {value!r}")


def _valid_address(value: object) -> str:
    if not isinstance(value, str):
        raise BadRequest("'address' parameter is not a valid address")
    local, at, domain = value.strip().rpartition("@")
    if not at or not local or not domain or " " in value.strip():
        raise BadRequest(f"'address' parameter is not a valid address: {value!r}")
    return value.strip()


@dataclass
class FakeMailgun:
    api_key: str = "key-test-0123456789"
    lists: dict[str, dict[str, StoredMember]] = field(default_factory=dict)
    # domain -> address key -> record
    unsubscribes: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    bounces: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    requests: list[SeenRequest] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    rejected: dict[str, tuple[int, str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # For each of the next requests (in order): seconds over which to trickle its answer's
    # body, 0 for an answer sent at once.
    trickles: list[float] = field(default_factory=list)

    # Test-side set-up and inspection ------------------------------------------------------

    def create_list(self, address: str) -> None:
        with self.lock:
            self.lists.setdefault(_key(address), {})

    def seed(
        self,
        list_address: str,
        address: str,
        *,
        name: str = "",
        vars: dict[str, Any] | None = None,
        subscribed: bool = True,
    ) -> None:
        """A member the list holds already, as Mailgun's own admin or API left it."""
        with self.lock:
            self.lists.setdefault(_key(list_address), {})[_key(address)] = StoredMember(
                address=address, name=name, vars=vars or {}, subscribed=subscribed
            )

    def member(self, list_address: str, address: str) -> StoredMember | None:
        with self.lock:
            return self.lists[_key(list_address)].get(_key(address))

    def members_of(self, list_address: str) -> list[StoredMember]:
        with self.lock:
            return list(self.lists[_key(list_address)].values())

    def suppress(self, table: str, domain: str, address: str) -> None:
        """Put an address in the domain's `unsubscribes` or `bounces` table."""
        store = self.unsubscribes if table == "unsubscribes" else self.bounces
        with self.lock:
            store.setdefault(domain, {})[_key(address)] = {"address": address}

    def suppressed(self, table: str, domain: str, address: str) -> bool:
        store = self.unsubscribes if table == "unsubscribes" else self.bounces
        with self.lock:
            return _key(address) in store.get(domain, {})

    def seen(self, method: str | None = None) -> list[SeenRequest]:
        with self.lock:
            return [r for r in self.requests if method is None or r.method == method]

    # Faults -------------------------------------------------------------------------------

    def fail(self, *, status: int = 503, times: int = 1) -> None:
        """Answer the next `times` requests with `status`."""
        with self.lock:
            self.faults.append(Fault(status=status, times=times))

    def throttle(self, *, retry_after: str, times: int = 1) -> None:
        with self.lock:
            self.faults.append(Fault(status=429, times=times, retry_after=retry_after))

    def answer_oddly(
        self,
        *,
        status: int = 200,
        body: bytes,
        headers: dict[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next `times` requests with `status` and these raw bytes and headers,
        the request itself left undone."""
        with self.lock:
            self.faults.append(
                Fault(status=status, times=times, body=body, headers=dict(headers or {}))
            )

    def stall(self, *, seconds: float, times: int = 1) -> None:
        """Answer the next `times` requests (normally) only after `seconds`."""
        with self.lock:
            self.faults.append(Fault(status=0, times=times, delay=seconds))

    def trickle(self, *, seconds: float, times: int = 1, after: int = 0) -> None:
        """Answer the next `times` requests (after `after` others) normally, but spread
        the body of each over `seconds` in small pieces (see `_Trickling`)."""
        with self.lock:
            self.trickles.extend([0.0] * after + [seconds] * times)

    def reject(self, address: str, *, status: int = 400, message: str | None = None) -> None:
        """Refuse every request that names this address."""
        with self.lock:
            self.rejected[_key(address)] = (
                status,
                message or f"'{address}' is not a valid address",
            )

    def _next_fault(self) -> Fault | None:
        with self.lock:
            if not self.faults:
                return None
            fault = self.faults[0]
            fault.times -= 1
            if fault.times <= 0:
                self.faults.pop(0)
            return fault

    def _check_rejected(self, *addresses: str) -> None:
        with self.lock:
            for address in addresses:
                if _key(address) in self.rejected:
                    status, message = self.rejected[_key(address)]
                    raise _Refused(status, message)

    # The server ---------------------------------------------------------------------------

    @contextmanager
    def serve(self) -> Iterator[str]:
        """Run on a loopback port; yields the base URL to give the adapter."""
        with LiveServer(self.app()) as base_url:
            yield base_url

    def app(self) -> Any:
        return _Trickling(self, self._routes())

    def _next_trickle(self) -> float:
        with self.lock:
            return self.trickles.pop(0) if self.trickles else 0.0

    def _routes(self) -> Starlette:
        every = ["GET", "POST", "PUT", "DELETE", "PATCH"]
        routes = [
            Route("/v3/lists/{list_address}", self._get_list, methods=["GET"]),
            Route("/v3/lists/{list_address}/members", self._add_member, methods=["POST"]),
            Route("/v3/lists/{list_address}/members.json", self._add_bulk, methods=["POST"]),
            Route("/v3/lists/{list_address}/members/pages", self._pages, methods=["GET"]),
            Route(
                "/v3/lists/{list_address}/members/{member}",
                self._member,
                methods=["PUT", "DELETE"],
            ),
            Route(
                "/v3/{domain}/{table:str}/{address}",
                self._clear_suppression,
                methods=["DELETE"],
            ),
            # Not an endpoint: Mailgun's bare 404 (no JSON).
            Route("/{path:path}", self._not_found, methods=every),
        ]
        return Starlette(
            routes=routes,
            exception_handlers={
                BadRequest: _bad_request,  # type: ignore[dict-item]
                _Refused: _refused,  # type: ignore[dict-item]
                _Odd: _odd,  # type: ignore[dict-item]
            },
        )

    async def _begin(self, request: Request) -> None:
        """Record the request, then apply an injected fault and the auth check."""
        content_type = request.headers.get("content-type", "")
        form: dict[str, str] = {}
        if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            form = {name: str(value) for name, value in (await request.form()).items()}
        auth = _basic(request.headers.get("authorization"))
        with self.lock:
            self.requests.append(
                SeenRequest(
                    method=request.method,
                    path=request.url.path,
                    raw_path=request.scope.get("raw_path", b"").decode("latin-1"),
                    query=dict(request.query_params),
                    auth=auth,
                    content_type=content_type,
                    form=form,
                )
            )
        fault = self._next_fault()
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        elif fault is not None and fault.body is not None:
            raise _Odd(fault)
        elif fault is not None:
            raise _Refused(
                fault.status,
                "Too many requests" if fault.status == 429 else "Service unavailable",
                retry_after=fault.retry_after,
            )
        if auth != ("api", self.api_key):
            raise _Unauthorized()

    async def _not_found(self, request: Request) -> Response:
        await self._begin(request)
        return PlainTextResponse("404 page not found", status_code=404)

    async def _get_list(self, request: Request) -> Response:
        await self._begin(request)
        with self.lock:
            members = self._list(request)
            address = request.path_params["list_address"]
            return JSONResponse({"list": {"address": address, "members_count": len(members)}})

    def _list(self, request: Request) -> dict[str, StoredMember]:
        members = self.lists.get(_key(request.path_params["list_address"]))
        if members is None:
            raise _Refused(404, f"Mailing list {request.path_params['list_address']} not found")
        return members

    async def _add_member(self, request: Request) -> Response:
        await self._begin(request)
        form = await request.form()
        address = _valid_address(form.get("address"))
        self._check_rejected(address)
        raw_vars = form.get("vars")
        variables: Any = {}
        if raw_vars is not None:
            try:
                variables = json.loads(str(raw_vars))
            except ValueError as e:
                raise BadRequest("Failed to decode vars: not valid JSON") from e
            if not isinstance(variables, dict):
                raise BadRequest("Failed to decode vars: not a JSON object")
        subscribed = _flag(_str(form.get("subscribed")), default=True)
        upsert = _flag(_str(form.get("upsert")), default=False)
        with self.lock:
            members = self._list(request)
            existing = members.get(_key(address))
            if existing is not None and not upsert:
                raise BadRequest(f"Address already exists '{address}'")
            name = _str(form.get("name"))
            member = StoredMember(
                address=address,
                name=name if name is not None else (existing.name if existing else ""),
                vars=variables if raw_vars is not None else (existing.vars if existing else {}),
                subscribed=subscribed,
            )
            members[_key(address)] = member
        message = (
            "Mailing list member has been updated"
            if existing
            else ("Mailing list member has been created")
        )
        return JSONResponse({"member": member.as_json(), "message": message})

    async def _add_bulk(self, request: Request) -> Response:
        await self._begin(request)
        form = await request.form()
        raw = form.get("members")
        if raw is None:
            raise BadRequest("Missing mandatory parameter: members")
        try:
            entries = json.loads(str(raw))
        except ValueError as e:
            raise BadRequest("members: not valid JSON") from e
        if not isinstance(entries, list):
            raise BadRequest("members: must be a JSON array")
        if len(entries) > BULK_LIMIT:
            raise BadRequest(f"Too many members: at most {BULK_LIMIT} per call")
        upsert = _flag(_str(form.get("upsert")), default=False)
        parsed = []
        for entry in entries:
            item = {"address": entry} if isinstance(entry, str) else entry
            if not isinstance(item, dict):
                raise BadRequest("members: each entry must be an address or an object")
            address = _valid_address(item.get("address"))
            variables = item.get("vars", {})
            if not isinstance(variables, dict):
                raise BadRequest("members: vars must be a JSON object")
            subscribed = item.get("subscribed", True)
            if isinstance(subscribed, str):
                subscribed = _flag(subscribed, default=True)
            parsed.append(
                StoredMember(
                    address=address,
                    name=str(item.get("name", "")),
                    vars=variables,
                    subscribed=bool(subscribed),
                )
            )
        self._check_rejected(*(member.address for member in parsed))
        with self.lock:
            members = self._list(request)
            for member in parsed:
                if _key(member.address) in members and not upsert:
                    continue  # Mailgun skips duplicates unless upsert
                members[_key(member.address)] = member
            count = len(members)
        return JSONResponse(
            {
                "list": {
                    "address": request.path_params["list_address"],
                    "members_count": count,
                },
                "message": "Mailing list has been updated",
                "task-id": secrets.token_hex(8),
            }
        )

    async def _member(self, request: Request) -> Response:
        await self._begin(request)
        address = request.path_params["member"]
        self._check_rejected(address)
        form = await request.form() if request.method == "PUT" else None
        with self.lock:
            members = self._list(request)
            existing = members.get(_key(address))
            if existing is None:
                raise _Refused(404, f"Member {address} of mailing list not found")
            if request.method == "DELETE":
                del members[_key(address)]
                return JSONResponse(
                    {
                        "member": {"address": existing.address},
                        "message": "Mailing list member has been deleted",
                    }
                )
            assert form is not None
            existing.subscribed = _flag(_str(form.get("subscribed")), default=existing.subscribed)
            if form.get("name") is not None:
                existing.name = str(form.get("name"))
            if form.get("vars") is not None:
                try:
                    existing.vars = json.loads(str(form.get("vars")))
                except ValueError as e:
                    raise BadRequest("Failed to decode vars") from e
            return JSONResponse(
                {"member": existing.as_json(), "message": "Mailing list member has been updated"}
            )

    async def _pages(self, request: Request) -> Response:
        await self._begin(request)
        query = request.query_params
        try:
            limit = int(query.get("limit", "100"))
        except ValueError as e:
            raise BadRequest("limit must be an integer") from e
        if not 1 <= limit <= 1000:
            raise BadRequest("limit must be between 1 and 1000")
        page = query.get("page", "first")
        pivot = _key(query.get("address", ""))
        with self.lock:
            members = sorted(self._list(request).items())
        if query.get("subscribed") is not None:
            wanted = _flag(query.get("subscribed"), default=True)
            members = [(k, m) for k, m in members if m.subscribed == wanted]
        if page == "next" and pivot:
            chosen = [m for k, m in members if k > pivot][:limit]
        elif page == "prev" and pivot:
            chosen = [m for k, m in members if k < pivot][-limit:]
        elif page == "last":
            chosen = [m for _, m in members][-limit:]
        elif page in ("first", "next", "prev"):
            chosen = [m for _, m in members][:limit]
        else:
            raise BadRequest(f"Invalid page: {page!r}")
        base = (
            f"{str(request.base_url).rstrip('/')}/v3/lists/"
            f"{quote(request.path_params['list_address'], safe='@')}/members/pages"
        )

        def link(**params: str) -> str:
            return f"{base}?{urlencode({**params, 'limit': str(limit)})}"

        last_seen = chosen[-1].address if chosen else query.get("address", "")
        first_seen = chosen[0].address if chosen else query.get("address", "")
        return JSONResponse(
            {
                "items": [m.as_json() for m in chosen],
                "paging": {
                    "first": link(page="first"),
                    "last": link(page="last"),
                    "next": link(page="next", address=last_seen),
                    "previous": link(page="prev", address=first_seen),
                },
            }
        )

    async def _clear_suppression(self, request: Request) -> Response:
        await self._begin(request)
        table = request.path_params["table"]
        if table not in ("unsubscribes", "bounces"):
            return PlainTextResponse("404 page not found", status_code=404)
        domain = request.path_params["domain"]
        address = request.path_params["address"]
        self._check_rejected(address)
        store = self.unsubscribes if table == "unsubscribes" else self.bounces
        with self.lock:
            if store.get(domain, {}).pop(_key(address), None) is None:
                raise _Refused(404, f"Address not found in {table} table")
        message = (
            "Unsubscribe event has been removed"
            if table == "unsubscribes"
            else "Bounced address has been removed"
        )
        return JSONResponse({"message": message, "address": address})


TRICKLE_PACE = 0.05


class _Trickling:
    """ASGI wrapper: sends the body of a trickled answer in small pieces, at least
    `TRICKLE_PACE` apart (its Content-Length as usual), and stops once the client has gone."""

    def __init__(self, fake: FakeMailgun, app: Starlette) -> None:
        self.fake = fake
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        seconds = self.fake._next_trickle() if scope["type"] == "http" else 0.0
        if not seconds:
            await self.app(scope, receive, send)
            return
        gone = asyncio.Event()

        async def watch() -> None:
            # The request's body has been read by then: what comes next is the disconnect.
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher: asyncio.Task[None] | None = None

        async def slowly(message: Any) -> None:
            nonlocal watcher
            if message["type"] == "http.response.start":
                watcher = asyncio.create_task(watch())
            if message["type"] != "http.response.body" or not message.get("body"):
                await send(message)
                return
            body = message["body"]
            pieces = max(1, min(len(body), round(seconds / TRICKLE_PACE)))
            size = -(-len(body) // pieces)
            pause = seconds / -(-len(body) // size)
            for start in range(0, len(body), size):
                if gone.is_set():
                    return
                piece = body[start : start + size]
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                await asyncio.sleep(pause)
            await send(
                {
                    "type": "http.response.body",
                    "body": b"",
                    "more_body": message.get("more_body", False),
                }
            )

        try:
            await self.app(scope, receive, slowly)
        finally:
            if watcher is not None:
                watcher.cancel()


class _Refused(Exception):
    def __init__(self, status: int, message: str, *, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class _Unauthorized(_Refused):
    def __init__(self) -> None:
        super().__init__(401, "Forbidden")


class _Odd(Exception):
    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.status)
        self.fault = fault


async def _odd(request: Request, exc: _Odd) -> Response:
    # Sent as given: no content type or encoding is added or checked.
    assert exc.fault.body is not None
    return Response(exc.fault.body, status_code=exc.fault.status, headers=exc.fault.headers)


async def _bad_request(request: Request, exc: BadRequest) -> Response:
    return JSONResponse({"message": exc.message}, status_code=400)


async def _refused(request: Request, exc: _Refused) -> Response:
    if isinstance(exc, _Unauthorized):
        return PlainTextResponse("Forbidden", status_code=401)
    headers = {"retry-after": exc.retry_after} if exc.retry_after else None
    return JSONResponse({"message": exc.message}, status_code=exc.status, headers=headers)


def _str(value: object) -> str | None:
    return None if value is None else str(value)


def _basic(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user, password


# Webhooks, as Mailgun signs them ------------------------------------------------------


def sign(signing_key: str, *, timestamp: str, token: str) -> str:
    return hmac.new(signing_key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()


def webhook(
    signing_key: str,
    event_data: dict[str, Any],
    *,
    timestamp: float | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """The JSON body Mailgun posts for one event, signed with `signing_key`."""
    stamp = str(int(time.time() if timestamp is None else timestamp))
    token = token or secrets.token_hex(25)
    return {
        "signature": {
            "timestamp": stamp,
            "token": token,
            "signature": sign(signing_key, timestamp=stamp, token=token),
        },
        "event-data": {
            "id": secrets.token_urlsafe(16),
            "timestamp": float(stamp),
            "log-level": "info",
            **event_data,
        },
    }
