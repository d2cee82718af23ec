"""A listmonk for tests: real HTTP on loopback, the part of listmonk's API the adapter uses.

listmonk cannot run here (a Go binary on PostgreSQL), so this server follows its reference:
- https://listmonk.app/docs/apis/apis/ : `Authorization: token user:token` or Basic auth
  with the same pair; `{"data": ...}` on success, `{"message": "..."}` with the status on
  failure.
- https://listmonk.app/docs/apis/subscribers/ : `GET /api/subscribers` (`query`, repeated
  `list_id`, `subscription_status`, `page`, `per_page` with `all`, `order`; the answer
  echoes `total`, `page`, `per_page`; subscribers carry `lists` with a
  `subscription_status` each), `POST /api/subscribers` (`preconfirm_subscriptions`),
  `PUT /api/subscribers/{id}`, `PUT /api/subscribers/lists` (`add` / `remove` /
  `unsubscribe`), `DELETE /api/subscribers/{id}`; `GET /api/lists/{id}` from
  https://listmonk.app/docs/apis/lists/.
- https://listmonk.app/docs/roles-and-permissions/ : permissions per call, and
  `subscribers:sql_query` for a `query` expression (listmonk >= v5).
Where the reference is silent, listmonk's source (github.com/knadh/listmonk) decided:
- auth (`internal/auth/auth.go`): missing or wrong credentials and a missing permission
  all answer 403;
- `internal/core/subscribers.go`: a duplicate address answers 409; an unknown subscriber
  id on GET or PUT answers 400 "not found" (not 404); addresses are lowercased on create
  and update (`SanitizeEmail`);
- `queries/subscribers.sql`: `DELETE` of an unknown id succeeds; `add` to a list sets the
  given status even over `unsubscribed`; a PUT of the subscriber deletes the subscriptions
  to lists it leaves out, keeps `confirmed` and `unsubscribed` ones, sets new or
  `unconfirmed` ones to `confirmed` with `preconfirm_subscriptions`, else `unconfirmed`;
  the attributes sent replace the stored ones; blocklisting unsubscribes every list;
- an opt-in mail goes out on create or update without `preconfirm_subscriptions` for
  each double opt-in list left unconfirmed: recorded in `optin_mails`.
A `query` is real SQL in listmonk; this fake understands only an address comparison,
`subscribers.email = '...'` or `LOWER(subscribers.email) = '...'` (quotes doubled), and
answers anything else, an unbalanced quote included, with listmonk's 400 for a query it
could not prepare. Paths it does not know answer 404, a known path with another method 405.

Every request is recorded (method, path, query, headers, JSON) before anything is checked.
Faults are injected per method and path: a status N times, with headers (Retry-After) or
any body; `blocked_domains` makes listmonk's domain blocklist refuse an address (400).
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.conftest import LiveServer

ALL_PERMISSIONS = frozenset(
    {
        "lists:get_all",
        "lists:manage_all",
        "subscribers:get",
        "subscribers:get_all",
        "subscribers:manage",
        "subscribers:sql_query",
    }
)
SUBSCRIPTION_STATUSES = ("unconfirmed", "confirmed", "unsubscribed")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
EMAIL_QUERY = re.compile(
    r"^\s*(?P<column>LOWER\(subscribers\.email\)|subscribers\.email)\s*=\s*"
    r"'(?P<value>(?:[^']|'')*)'\s*$"
)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    json: Any


@dataclass
class Fault:
    method: str
    path: str
    status: int
    times: int
    headers: dict[str, str]
    body: Any
    text: str | None


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class FakeListmonk:
    username: str = "sync-bot"
    token: str = "tok-3f9a2c"
    permissions: set[str] = field(default_factory=lambda: set(ALL_PERMISSIONS))
    blocked_domains: set[str] = field(default_factory=set)
    # id -> list; 3 is double opt-in (like ours), 7 single opt-in.
    lists: dict[int, dict[str, Any]] = field(
        default_factory=lambda: {
            3: _list(3, "BlueHats", "double"),
            7: _list(7, "Other newsletter", "single"),
        }
    )
    subscribers: dict[int, dict[str, Any]] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    optin_mails: list[tuple[int, list[int]]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    # Called with each request once it is answered, under the lock (it must not call the
    # helpers below, which take it): a change made at listmonk between two calls.
    after_request: Callable[[FakeListmonk, Seen], None] | None = None
    url: str = ""

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self._next_id = 1
        self.app = Starlette(
            routes=[
                Route(
                    "/{path:path}",
                    self._endpoint,
                    methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                )
            ]
        )
        self._server: LiveServer | None = None

    def __enter__(self) -> FakeListmonk:
        self._server = LiveServer(self.app)
        self.url = self._server.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.__exit__(*exc_info)

    # Test helpers -----------------------------------------------------------------------

    def seed(
        self,
        email: str,
        *,
        name: str = "",
        status: str = "enabled",
        attribs: dict[str, Any] | None = None,
        lists: dict[int, str] | None = None,
    ) -> int:
        """A subscriber already in listmonk, as if added through its admin UI."""
        with self.lock:
            return self._insert(
                email=email.lower(),
                name=name or email.split("@")[0],
                status=status,
                attribs=dict(attribs or {}),
                lists=dict(lists or {}),
            )

    def subscriber(self, email: str) -> dict[str, Any] | None:
        with self.lock:
            for record in self.subscribers.values():
                if record["email"] == email.lower():
                    return copy.deepcopy(record)
            return None

    def seen(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        with self.lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and (path is None or r.path == path)
            ]

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.seen()]

    def fail(
        self,
        method: str,
        path: str,
        status: int,
        *,
        times: int = 1,
        headers: dict[str, str] | None = None,
        body: Any = None,
        text: str | None = None,
    ) -> None:
        """Answer the next `times` matching requests with `status` (and `body` or `text`)."""
        with self.lock:
            self.faults.append(Fault(method, path, status, times, headers or {}, body, text))

    # HTTP -------------------------------------------------------------------------------

    async def _endpoint(self, request: Request) -> Response:
        raw = await request.body()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        with self.lock:
            self.requests.append(
                Seen(
                    method=request.method,
                    path=request.url.path,
                    query={key: request.query_params.getlist(key) for key in request.query_params},
                    headers=dict(request.headers),
                    json=payload,
                )
            )
            fault = self._take_fault(request.method, request.url.path)
            if fault is not None:
                if fault.text is not None:
                    return Response(fault.text, fault.status, headers=fault.headers)
                body = fault.body if fault.body is not None else {"message": "injected fault"}
                return JSONResponse(body, fault.status, headers=fault.headers)
            try:
                handler, args, permissions = self._route(request.method, request.url.path)
                self._authorize(request.headers.get("authorization", ""), permissions)
                if raw and payload is None:
                    raise Refused(400, "Invalid JSON in request body.")
                data = handler(request, payload, *args)
            except Refused as e:
                return JSONResponse({"message": e.message}, e.status)
            if self.after_request is not None:
                self.after_request(self, self.requests[-1])
        return JSONResponse({"data": data})

    def _take_fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.method == method and fault.path == path and fault.times > 0:
                fault.times -= 1
                return fault
        return None

    def _route(
        self, method: str, path: str
    ) -> tuple[Callable[..., Any], tuple[int, ...], tuple[str, ...]]:
        get = ("subscribers:get_all", "subscribers:get")
        manage = ("subscribers:manage",)
        table: list[tuple[str, str, Callable[..., Any], tuple[str, ...]]] = [
            ("GET", r"/api/subscribers", self._query, get),
            ("POST", r"/api/subscribers", self._create, manage),
            ("PUT", r"/api/subscribers/lists", self._manage_lists, manage),
            ("GET", r"/api/subscribers/(\d+)", self._get, get),
            ("PUT", r"/api/subscribers/(\d+)", self._update, manage),
            ("DELETE", r"/api/subscribers/(\d+)", self._delete, manage),
            ("GET", r"/api/lists/(\d+)", self._get_list, ("lists:get_all",)),
        ]
        known_path = False
        for route_method, pattern, handler, permissions in table:
            match = re.fullmatch(pattern, path)
            if match is None:
                continue
            known_path = True
            if route_method == method:
                return handler, tuple(int(g) for g in match.groups()), permissions
        if known_path:
            raise Refused(405, "Method Not Allowed")
        raise Refused(404, "Not Found")

    def _authorize(self, header: str, permissions: tuple[str, ...]) -> None:
        header = header.strip()
        if header.startswith("token "):
            pair = header[len("token ") :].strip()
        elif header.startswith("Basic "):
            try:
                pair = base64.b64decode(header[len("Basic ") :].strip()).decode()
            except (binascii.Error, UnicodeDecodeError) as e:
                raise Refused(403, "invalid Base64 value in Basic Authorization header") from e
        elif header:
            raise Refused(403, "unknown Authorization scheme")
        else:
            raise Refused(403, "invalid session")
        if pair != f"{self.username}:{self.token}":
            raise Refused(403, "invalid API credentials")
        if not any(p in self.permissions for p in permissions):
            raise Refused(403, f"permission denied: {permissions[0]}")

    # Handlers (called with the lock held) -----------------------------------------------

    def _query(self, request: Request, payload: Any) -> dict[str, Any]:
        params = request.query_params
        query = params.get("query", "").strip().rstrip(";")
        if query and "subscribers:sql_query" not in self.permissions:
            raise Refused(403, "permission denied: subscribers:sql_query")
        try:
            list_ids = [int(v) for v in params.getlist("list_id")]
        except ValueError as e:
            raise Refused(400, "Invalid ID.") from e
        sub_status = params.get("subscription_status", "")
        rows = sorted(self.subscribers.values(), key=lambda r: r["id"])
        if params.get("order", "").lower() != "asc":
            rows.reverse()
        if list_ids:
            rows = [
                r
                for r in rows
                if any(
                    lid in r["lists"] and (not sub_status or r["lists"][lid] == sub_status)
                    for lid in list_ids
                )
            ]
        if query:
            rows = [r for r in rows if _matches(query, r)]
        page = _positive(params.get("page"), 1)
        per_page_raw = params.get("per_page", "")
        total = len(rows)
        if per_page_raw == "all":
            per_page, shown = 0, rows
        else:
            per_page = _positive(per_page_raw, 20)
            shown = rows[(page - 1) * per_page : page * per_page]
        return {
            "results": [self._render(r) for r in shown],
            "query": query,
            "total": total,
            "per_page": per_page,
            "page": page,
        }

    def _create(self, request: Request, payload: Any) -> dict[str, Any]:
        body = _object(payload)
        email = self._sanitize_email(body.get("email"))
        name = str(body.get("name") or "").strip()
        if not name:
            raise Refused(400, "Invalid length for name.")
        status = body.get("status") or "enabled"
        if status not in ("enabled", "blocklisted"):
            raise Refused(400, "Invalid status.")
        if any(r["email"] == email for r in self.subscribers.values()):
            raise Refused(409, "E-mail already exists.")
        preconfirm = bool(body.get("preconfirm_subscriptions"))
        wanted = [lid for lid in _ints(body.get("lists")) if lid in self.lists]
        if status == "blocklisted":
            sub_status = "unsubscribed"
        else:
            sub_status = "confirmed" if preconfirm else "unconfirmed"
        subscriber_id = self._insert(
            email=email,
            name=name,
            status=status,
            attribs=_attribs(body.get("attribs")),
            lists=dict.fromkeys(wanted, sub_status),
        )
        if not preconfirm:
            self._send_optin(subscriber_id, wanted)
        return self._render(self.subscribers[subscriber_id])

    def _update(self, request: Request, payload: Any, subscriber_id: int) -> dict[str, Any]:
        body = _object(payload)
        email = self._sanitize_email(body.get("email"))
        record = self.subscribers.get(subscriber_id)
        if record is None:
            raise Refused(400, f"Subscriber ({subscriber_id}: {email}) not found.")
        status = body.get("status") or record["status"]
        if status not in ("enabled", "disabled", "blocklisted"):
            raise Refused(400, "Invalid status.")
        preconfirm = bool(body.get("preconfirm_subscriptions"))
        name = str(body.get("name") or "").strip()
        record.update(
            email=email,
            name=name or record["name"],
            status=status,
            attribs=_attribs(body.get("attribs")),
            updated_at=_now(),
        )
        wanted = [lid for lid in _ints(body.get("lists")) if lid in self.lists]
        current: dict[int, str] = record["lists"]
        for lid in list(current):
            if lid not in wanted:
                del current[lid]
        new_status = "confirmed" if preconfirm else "unconfirmed"
        for lid in wanted:
            if status == "blocklisted":
                current[lid] = "unsubscribed"
            elif current.get(lid) in ("confirmed", "unsubscribed"):
                continue
            else:
                current[lid] = new_status
        if not preconfirm:
            self._send_optin(subscriber_id, wanted)
        return self._render(record)

    def _manage_lists(self, request: Request, payload: Any) -> bool:
        body = _object(payload)
        ids = _ints(body.get("ids"))
        targets = _ints(body.get("target_list_ids"))
        if not ids:
            raise Refused(400, "No IDs given.")
        if not targets:
            raise Refused(400, "No lists given.")
        action = body.get("action")
        if action == "add":
            status = body.get("status") or ""
            if status and status not in SUBSCRIPTION_STATUSES:
                raise Refused(500, f"invalid input value for enum subscription_status: {status}")
            missing = [i for i in ids if i not in self.subscribers]
            missing += [t for t in targets if t not in self.lists]
            if missing:
                # A foreign key violation in listmonk's INSERT.
                raise Refused(500, "Error updating subscriptions: foreign key violation.")
            for i in ids:
                for t in targets:
                    subscriptions = self.subscribers[i]["lists"]
                    if t not in subscriptions or status:
                        subscriptions[t] = status or "unconfirmed"
        elif action == "remove":
            for i in ids:
                for t in targets:
                    self.subscribers.get(i, {"lists": {}})["lists"].pop(t, None)
        elif action == "unsubscribe":
            for i in ids:
                subscriptions = self.subscribers.get(i, {"lists": {}})["lists"]
                for t in targets:
                    if t in subscriptions:
                        subscriptions[t] = "unsubscribed"
        else:
            raise Refused(400, "Invalid action.")
        return True

    def _get(self, request: Request, payload: Any, subscriber_id: int) -> dict[str, Any]:
        record = self.subscribers.get(subscriber_id)
        if record is None:
            raise Refused(400, f"Subscriber ({subscriber_id}: ) not found.")
        return self._render(record)

    def _delete(self, request: Request, payload: Any, subscriber_id: int) -> bool:
        if subscriber_id < 1:
            raise Refused(400, "Invalid ID.")
        self.subscribers.pop(subscriber_id, None)
        return True

    def _get_list(self, request: Request, payload: Any, list_id: int) -> dict[str, Any]:
        if list_id not in self.lists:
            raise Refused(400, f"List ({list_id}) not found.")
        return dict(self.lists[list_id])

    # State ------------------------------------------------------------------------------

    def _insert(
        self,
        *,
        email: str,
        name: str,
        status: str,
        attribs: dict[str, Any],
        lists: dict[int, str],
    ) -> int:
        subscriber_id = self._next_id
        self._next_id += 1
        now = _now()
        self.subscribers[subscriber_id] = {
            "id": subscriber_id,
            "uuid": str(uuid.uuid4()),
            "email": email,
            "name": name,
            "attribs": attribs,
            "status": status,
            "lists": lists,
            "created_at": now,
            "updated_at": now,
        }
        return subscriber_id

    def _render(self, record: dict[str, Any]) -> dict[str, Any]:
        out = {key: value for key, value in record.items() if key != "lists"}
        out["attribs"] = dict(record["attribs"])
        out["lists"] = [
            {
                "subscription_status": status,
                "subscription_created_at": record["created_at"],
                "subscription_updated_at": record["updated_at"],
                "subscription_meta": {},
                **self.lists[list_id],
            }
            for list_id, status in sorted(record["lists"].items())
        ]
        return out

    def _sanitize_email(self, value: Any) -> str:
        email = str(value or "").strip().lower()
        if len(email) > 1000 or not EMAIL.match(email):
            raise Refused(400, "Invalid email.")
        if email.rsplit("@", 1)[1] in self.blocked_domains:
            raise Refused(400, "Domain is blocklisted.")
        return email

    def _send_optin(self, subscriber_id: int, list_ids: list[int]) -> None:
        subscriptions = self.subscribers[subscriber_id]["lists"]
        pending = [
            lid
            for lid in list_ids
            if self.lists[lid]["optin"] == "double" and subscriptions.get(lid) == "unconfirmed"
        ]
        if pending:
            self.optin_mails.append((subscriber_id, pending))


def _list(list_id: int, name: str, optin: str) -> dict[str, Any]:
    now = _now()
    return {
        "id": list_id,
        "uuid": str(uuid.uuid4()),
        "name": name,
        "type": "private",
        "optin": optin,
        "tags": [],
        "created_at": now,
        "updated_at": now,
    }


def _matches(query: str, record: dict[str, Any]) -> bool:
    match = EMAIL_QUERY.match(query)
    if match is None:
        raise Refused(400, f"Error preparing query: cannot run {query!r} in this fake.")
    value = match["value"].replace("''", "'")
    if match["column"].startswith("LOWER"):
        return bool(record["email"].lower() == value)
    return bool(record["email"] == value)


def _object(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise Refused(400, "Invalid JSON in request body.")
    return payload


def _ints(value: Any) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise Refused(400, "Invalid ID.")
    return list(value)


def _attribs(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Refused(400, "Invalid attributes.")
    return dict(value)


def _positive(value: str | None, default: int) -> int:
    try:
        number = int(value or "")
    except ValueError:
        return default
    return number if number > 0 else default


def _now() -> str:
    return datetime.now(UTC).isoformat()
