"""The `listmonk` backend: one list of a self-hosted listmonk, through its REST API.

Auth (https://listmonk.app/docs/apis/apis/): an API user created in Admin -> Users
(listmonk >= v4) sends `Authorization: token <username>:<api_token>` on every call.
listmonk v4+ also accepts the same pair as HTTP Basic auth; before v4 there were no API
users, only the admin login as Basic auth, which this adapter does not support. Bad or
missing credentials answer 403, as does a missing permission ("permission denied: ...").
The API user needs `subscribers:get_all`, `subscribers:manage`, manage rights on the list,
and `subscribers:sql_query` for the lookup by address (listmonk >= v5,
https://listmonk.app/docs/roles-and-permissions/).
Answers are `{"data": ...}`; failures `{"message": "..."}` with a 4xx/5xx status. A 2xx
without that envelope (a proxy's page) is a permanent error, a write's included.

Endpoints (https://listmonk.app/docs/apis/subscribers/):
- find by address: `GET /api/subscribers?query=LOWER(subscribers.email) = '<address>'`.
  There is no documented per-address lookup; `query` is a raw SQL expression, so the
  address goes in as an SQL string literal with every `'` doubled (PostgreSQL's standard
  strings take backslashes literally). listmonk lowercases addresses on create and holds a
  unique index on `LOWER(email)`, which this condition uses.
- add: `POST /api/subscribers` `{email, name, status: "enabled", lists: [list_id],
  attribs, preconfirm_subscriptions: true}`: this service already ran the double opt-in,
  so listmonk marks the subscription confirmed and sends no opt-in mail of its own.
  listmonk drops the list ids it has no list for (or that the API user may not manage)
  and still creates the subscriber: an answer without our list is a permanent error (a
  wrong `list_id`), not a member added.
  409 means the address exists (a concurrent add): it is looked up again and updated.
- existing subscriber: `PUT /api/subscribers/lists` `{ids, action: "add",
  target_list_ids: [list_id], status: "confirmed"}` (skipped when already confirmed),
  which also brings back an earlier unsubscribe from this list, then, only when the name
  or an attribute changed, `PUT /api/subscribers/{id}` with the stored attributes merged
  with ours and every list the subscriber is on (a PUT without them would drop the
  subscriber from the lists left out). The list call comes first so that the PUT, sent
  with `preconfirm_subscriptions: false` to leave the subscriber's other lists as they
  are, finds our list confirmed and triggers no opt-in mail for it.
- unsubscribe: `PUT /api/subscribers/lists` `{ids, action: "unsubscribe",
  target_list_ids: [list_id]}`: this list only, the subscriber and its other lists stay.
- remove (erasure): `DELETE /api/subscribers/{id}`: the whole subscriber, with its
  subscriptions to other lists of that listmonk, its views and clicks.
- members: `GET /api/subscribers?list_id=..&page=..&per_page=100&order=asc`, oldest
  first so that newcomers land on later pages; each subscriber carries its
  `subscription_status` per list. `unsubscribed` on our list, or a blocklisted
  subscriber, is not subscribed; `confirmed` and `unconfirmed` are.

Idempotency: an unknown address on unsubscribe or remove is a success, as is a
subscriber already unsubscribed; `DELETE` of a missing id answers 200 in listmonk and 404
is accepted too. A second add of the same member only looks it up.

Blocklist: listmonk keeps no suppression list apart from the subscriber; its nearest
thing is a blocklisted subscriber (an "unsubscribe from all lists", bounces past the
configured limit, an operator), who gets no campaign and whose subscriptions were all
set to `unsubscribed`. `clear_suppression`, called on a fresh opt-in only, lifts it: a
lookup, and for a blocklisted subscriber a `PUT /api/subscribers/{id}` back to `enabled`
(its lists left as they are; the add that follows confirms ours). Otherwise it returns
None. An add that is not a fresh opt-in (a reconciliation, an import) leaves a
blocklisted subscriber alone: listmonk's opt-out stands until someone opts in again.

`max_batch` is 1: listmonk's one bulk path, `POST /api/import/subscribers`
(https://listmonk.app/docs/apis/import/), uploads a CSV that is imported in the
background, one import at a time per listmonk, with no result per address, so a job could
neither learn that its member was refused nor safely run beside an operator's import.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import httpx

from app.addresses import mask
from app.backends.base import (
    Member,
    MembersPage,
    PermanentSyncError,
    RemoteMember,
    RetryableSyncError,
)
from app.backends.http import excerpt, send
from app.config import ListmonkBackendSettings

log = logging.getLogger(__name__)

PAGE_SIZE = 100
UNSUBSCRIBED = "unsubscribed"
CONFIRMED = "confirmed"
BLOCKLISTED = "blocklisted"


def sql_string(value: str) -> str:
    """An SQL string literal for `value`: quotes doubled, nothing else to escape."""
    return "'" + value.replace("'", "''") + "'"


class ListmonkBackend:
    max_batch = 1
    keeps_unsubscribed = True

    def __init__(self, settings: ListmonkBackendSettings, client: httpx.Client) -> None:
        self._client = client
        self._api = str(settings.base_url).rstrip("/") + "/api"
        self._list_id = settings.list_id
        token = f"{settings.username}:{settings.api_token.get_secret_value()}"
        self._headers = {"authorization": f"token {token}", "accept": "application/json"}

    # ListBackend --------------------------------------------------------------------------

    def add(self, members: Sequence[Member]) -> str:
        return "; ".join(self._add_one(member) for member in members)

    def unsubscribe(self, address: str) -> str:
        subscriber = self._find(address)
        if subscriber is None:
            return "listmonk: no such subscriber"
        status = self._status_on_list(subscriber)
        if status is None:
            return f"listmonk: subscriber {subscriber['id']} is not on list {self._list_id}"
        if status == UNSUBSCRIBED:
            return f"listmonk: subscriber {subscriber['id']} already unsubscribed"
        self._call(
            "PUT",
            "/subscribers/lists",
            what="listmonk: unsubscribe",
            json={
                "ids": [subscriber["id"]],
                "action": "unsubscribe",
                "target_list_ids": [self._list_id],
            },
        )
        log.info("backend.listmonk.unsubscribed address=%s", mask(address))
        return f"listmonk: subscriber {subscriber['id']} unsubscribed from list {self._list_id}"

    def remove(self, address: str) -> str:
        subscriber = self._find(address)
        if subscriber is None:
            return "listmonk: no such subscriber"
        self._call("DELETE", f"/subscribers/{subscriber['id']}", what="listmonk: delete", ok=(404,))
        log.info("backend.listmonk.removed address=%s", mask(address))
        return f"listmonk: subscriber {subscriber['id']} deleted"

    def members(self, cursor: str | None = None) -> MembersPage:
        try:
            page = int(cursor) if cursor else 1
        except ValueError as e:
            raise PermanentSyncError(f"listmonk: bad cursor {cursor!r}") from e
        response = self._call(
            "GET",
            "/subscribers",
            what="listmonk: list members",
            params={
                "list_id": self._list_id,
                "page": page,
                "per_page": PAGE_SIZE,
                "order": "asc",
            },
        )
        data = _mapping(_data(response, "listmonk: list members"), response)
        try:
            rows = _subscribers(data)
            total = int(data.get("total") or 0)
            # listmonk echoes the page size it applied, which may be smaller than asked.
            per_page = int(data.get("per_page") or PAGE_SIZE)
        except (TypeError, ValueError) as e:
            raise PermanentSyncError(
                f"listmonk: list members: unexpected answer ({e})", response=excerpt(response)
            ) from e
        members = [
            RemoteMember(
                email=row["email"],
                subscribed=row.get("status") != BLOCKLISTED
                and self._status_on_list(row) not in (None, UNSUBSCRIBED),
                name=row.get("name") or None,
            )
            for row in rows
        ]
        more = bool(rows) and page * per_page < total
        return MembersPage(members=members, next_cursor=str(page + 1) if more else None)

    def clear_suppression(self, address: str) -> str | None:
        subscriber = self._find(address)
        if subscriber is None or subscriber.get("status") != BLOCKLISTED:
            return None
        self._put_subscriber(
            subscriber,
            name=subscriber.get("name") or "",
            attribs=subscriber.get("attribs") or {},
            what="listmonk: lift blocklist",
            status="enabled",
        )
        log.info("backend.listmonk.blocklist_lifted address=%s", mask(address))
        return f"listmonk: subscriber {subscriber['id']} was blocklisted, enabled again"

    # Steps --------------------------------------------------------------------------------

    def _add_one(self, member: Member) -> str:
        subscriber = self._find(member.email)
        if subscriber is None:
            response = self._call(
                "POST",
                "/subscribers",
                what="listmonk: create",
                ok=(409,),
                json={
                    "email": member.email,
                    # Required by listmonk; its own signup form falls back the same way.
                    "name": member.name or member.email.split("@", 1)[0],
                    "status": "enabled",
                    "lists": [self._list_id],
                    "attribs": member.variables(),
                    "preconfirm_subscriptions": True,
                },
            )
            if response.status_code != 409:
                created = _mapping(_data(response, "listmonk: create"), response)
                if not any(
                    isinstance(entry, dict) and entry.get("id") == self._list_id
                    for entry in created.get("lists") or []
                ):
                    # listmonk leaves out the list ids it has no list for (or that the API
                    # user may not manage), and still creates the subscriber.
                    raise PermanentSyncError(
                        f"listmonk: create: the subscriber was created without list "
                        f"{self._list_id}: listmonk has no such list, or the API user may "
                        "not manage it (is list_id right?)",
                        response=excerpt(response),
                    )
                log.info("backend.listmonk.created address=%s", mask(member.email))
                return f"listmonk: subscriber {created.get('id')} created on list {self._list_id}"
            # Added meanwhile by someone else: update that one.
            subscriber = self._find(member.email)
            if subscriber is None:
                raise RetryableSyncError(
                    "listmonk: create answered 409 but the address is not found",
                    response=excerpt(response),
                )
        return self._update(subscriber, member)

    def _update(self, subscriber: dict[str, Any], member: Member) -> str:
        subscriber_id = subscriber["id"]
        if subscriber.get("status") == BLOCKLISTED:
            # Only a fresh opt-in lifts a blocklist (`clear_suppression`); this add is a
            # resync of an older one, and listmonk's opt-out wins until reconciled.
            log.warning("backend.listmonk.blocklisted address=%s", mask(member.email))
            return f"listmonk: subscriber {subscriber_id} is blocklisted, left as it is"
        done = []
        if self._status_on_list(subscriber) != CONFIRMED:
            self._call(
                "PUT",
                "/subscribers/lists",
                what="listmonk: subscribe",
                json={
                    "ids": [subscriber_id],
                    "action": "add",
                    "target_list_ids": [self._list_id],
                    "status": CONFIRMED,
                },
            )
            done.append(f"confirmed on list {self._list_id}")
        stored = subscriber.get("attribs") or {}
        attribs = {**stored, **member.variables()}
        name = member.name or subscriber.get("name") or ""
        if attribs != stored or name != subscriber.get("name"):
            # Our list is in: the subscription made just above is not in `subscriber` yet.
            self._put_subscriber(
                subscriber, name=name, attribs=attribs, what="listmonk: update", ours=True
            )
            done.append("updated")
        log.info("backend.listmonk.existing address=%s changes=%d", mask(member.email), len(done))
        return f"listmonk: subscriber {subscriber_id} " + (", ".join(done) or "already up to date")

    def _put_subscriber(
        self,
        subscriber: dict[str, Any],
        *,
        name: str,
        attribs: dict[str, Any],
        what: str,
        status: str | None = None,
        ours: bool = False,
    ) -> None:
        """`PUT /api/subscribers/{id}` keeping every list the subscriber is on: listmonk
        drops the subscriptions to the lists a PUT leaves out."""
        lists = {
            entry["id"]
            for entry in subscriber.get("lists") or []
            if isinstance(entry, dict) and isinstance(entry.get("id"), int)
        }
        if ours:
            lists.add(self._list_id)
        self._call(
            "PUT",
            f"/subscribers/{subscriber['id']}",
            what=what,
            json={
                "email": subscriber["email"],
                "name": name,
                "status": status or subscriber.get("status") or "enabled",
                "lists": sorted(lists),
                "attribs": attribs,
                # True would also confirm pending opt-ins to the subscriber's other lists.
                "preconfirm_subscriptions": False,
            },
        )

    def _find(self, address: str) -> dict[str, Any] | None:
        wanted = address.lower()
        response = self._call(
            "GET",
            "/subscribers",
            what="listmonk: find",
            params={
                "query": f"LOWER(subscribers.email) = {sql_string(wanted)}",
                "page": 1,
                "per_page": 1,
            },
        )
        data = _mapping(_data(response, "listmonk: find"), response)
        try:
            rows = _subscribers(data)
        except (TypeError, ValueError) as e:
            raise PermanentSyncError(
                f"listmonk: find: unexpected answer ({e})", response=excerpt(response)
            ) from e
        # The query is exact already; this guards against a server that ignored it.
        return next((row for row in rows if row["email"].lower() == wanted), None)

    def _status_on_list(self, subscriber: dict[str, Any]) -> str | None:
        for entry in subscriber.get("lists") or []:
            if isinstance(entry, dict) and entry.get("id") == self._list_id:
                status = entry.get("subscription_status")
                return str(status) if status is not None else None
        return None

    def _call(
        self, method: str, path: str, *, what: str, ok: Sequence[int] = (), **kwargs: Any
    ) -> httpx.Response:
        response = send(
            self._client,
            method,
            self._api + path,
            what=what,
            ok=ok,
            # listmonk answers 403 to a missing permission too: its message says which.
            refused=(403, "the backend's username and api_token, and the API user's permissions"),
            headers=self._headers,
            **kwargs,
        )
        if method in ("PUT", "DELETE") and response.is_success:
            # Their answer is read by no caller: a 2xx without listmonk's envelope (a
            # proxy's page) is no change made. Reads and creates are checked by theirs.
            _data(response, what)
        return response


def _data(response: httpx.Response, what: str) -> Any:
    """The `data` of listmonk's envelope; anything else is a misconfiguration (a proxy page,
    the admin UI behind the base URL) for an operator to see."""
    try:
        body = response.json()
    except ValueError as e:
        raise PermanentSyncError(f"{what}: not JSON", response=excerpt(response)) from e
    if not isinstance(body, dict) or "data" not in body:
        raise PermanentSyncError(f"{what}: no data in the answer", response=excerpt(response))
    return body["data"]


def _subscribers(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The `results` of a subscriber query, each with the fields this adapter relies on."""
    results = data.get("results") or []
    if not isinstance(results, list):
        raise TypeError("results is not a list")
    for row in results:
        if not (
            isinstance(row, dict)
            and isinstance(row.get("id"), int)
            and isinstance(row.get("email"), str)
        ):
            raise ValueError("a subscriber without an id or an email")
    return results


def _mapping(value: Any, response: httpx.Response) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PermanentSyncError("listmonk: unexpected answer", response=excerpt(response))
    return value
