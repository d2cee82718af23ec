"""The `mailgun` backend: one Mailgun mailing list through the v3 API.

Remote endpoints (https://documentation.mailgun.com/docs/mailgun/api-reference/):

    POST   /v3/lists/{list}/members               one member, form fields: address, name,
                                                  vars (JSON object), subscribed=yes, upsert=yes
    POST   /v3/lists/{list}/members.json          bulk, form fields: members (JSON array of
                                                  {address, name, vars, subscribed}, at most
                                                  1,000 per call), upsert=yes
    PUT    /v3/lists/{list}/members/{address}     subscribed=no: unsubscribe, keep the member
    DELETE /v3/lists/{list}/members/{address}     erase the member
    GET    /v3/lists/{list}/members/pages         limit=100; follow paging.next
    DELETE /v3/{domain}/unsubscribes/{address}    forget a domain-level unsubscribe
    DELETE /v3/{domain}/bounces/{address}         forget a bounce

    mailing lists   .../api-reference/send/mailgun/mailing-lists
    member create   .../send/mailgun/mailing-lists/post-lists-string:list_address-members
    bulk (JSON)     .../send/mailgun/mailing-lists/post-lists-list_address-members.json
    member update   .../send/mailgun/mailing-lists/put-lists-list_address-members-member_address
    member delete   .../send/mailgun/mailing-lists/delete-lists-list_address-members-member_address
    members pages   https://documentation.mailgun.com/docs/inboxready/api-reference/optimize/
                    mailgun/mailing-lists/get-lists-list_address-members-pages
    unsubscribes    .../send/mailgun/unsubscribe/delete-v3--domainid--unsubscribes--address-
    bounces         .../send/mailgun/bounces/delete-v3--domainid--bounces--address-
    response codes  https://documentation.mailgun.com/docs/mailgun/api-reference/api-overview

Auth: HTTP Basic, user `api`, password the API key. Host: https://api.eu.mailgun.net (EU)
or https://api.mailgun.net (US), unless `base_url` overrides it.

Idempotency: adds are upserts (`upsert=yes`), so sending a member twice keeps one member
with the latest name and variables. Unsubscribe and remove treat 404 (no such member) as
done, but only a JSON 404: Mailgun answers a bare 404 for a path it does not know, which
means a wrong `base_url`, not a missing member. The suppressions (domain-wide, outside the
list) are cleared only on a fresh opt-in, and 404 there means nothing to clear.

Every answer of Mailgun's is a JSON object: a 2xx without one (a proxy's page, an answer
cut short) is a permanent error, never taken for a change made.

Bulk calls of more than 100 members are applied by Mailgun asynchronously: a 200 means
accepted, and a member Mailgun refuses later shows up only in its events.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import httpx

from app.backends.base import (
    Member,
    MembersPage,
    PermanentSyncError,
    RemoteMember,
)
from app.backends.http import clean, excerpt, send
from app.config import MailgunBackendSettings, MailgunRegion

log = logging.getLogger(__name__)

REGION_HOSTS = {
    MailgunRegion.EU: "https://api.eu.mailgun.net",
    MailgunRegion.US: "https://api.mailgun.net",
}
MAX_BULK = 1000
PAGE_SIZE = 100
# The query parameters of `paging.next` that say where the next page starts.
_CURSOR_PARAMS = ("page", "address")


def _segment(value: str) -> str:
    """An address as one path segment: `+`, `/`, `%` and non-ASCII percent-encoded."""
    return quote(value, safe="@")


def _message(response: httpx.Response, *, what: str) -> str:
    """Mailgun's `message` in a successful answer, else its body (cleaned).

    Mailgun answers every call with a JSON object: a 2xx without one (a proxy's or a login
    page, an answer cut short) says nothing of what was done, and must not be taken for a
    member added or gone."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise PermanentSyncError(
            f"mailgun {what}: HTTP {response.status_code} but not Mailgun's JSON (a proxy's "
            "page, or an answer cut short? is base_url right?)",
            response=excerpt(response),
        )
    message = body.get("message")
    # The body otherwise: a member's answer holds its vars, its unsubscribe link among them.
    return message[:200] if isinstance(message, str) else clean(response.text, limit=200)


def _is_json(response: httpx.Response) -> bool:
    try:
        response.json()
    except ValueError:
        return False
    return True


class MailgunBackend:
    max_batch = MAX_BULK
    keeps_unsubscribed = True

    def __init__(self, settings: MailgunBackendSettings, client: httpx.Client) -> None:
        self.settings = settings
        self.client = client
        base = str(settings.base_url) if settings.base_url else REGION_HOSTS[settings.region]
        self.base = base.rstrip("/")
        self.list_path = f"/v3/lists/{_segment(settings.list_address)}"
        self.domain = settings.list_address.rpartition("@")[2]
        self.auth = httpx.BasicAuth("api", settings.api_key.get_secret_value())

    def _call(
        self, method: str, path: str, *, what: str, ok: Sequence[int] = (), **kwargs: Any
    ) -> httpx.Response:
        return send(
            self.client,
            method,
            self.base + path,
            what=f"mailgun {what}",
            ok=ok,
            refused=(401, "the backend's api_key"),
            auth=self.auth,
            **kwargs,
        )

    # Adding ------------------------------------------------------------------------------

    def add(self, members: Sequence[Member]) -> str:
        if not members:
            return "mailgun: nothing to add"
        if len(members) == 1:
            return self._add_one(members[0])
        answers = [
            self._add_bulk(members[start : start + MAX_BULK])
            for start in range(0, len(members), MAX_BULK)
        ]
        return "; ".join(answers)

    def _add_one(self, member: Member) -> str:
        form = {
            "address": member.email,
            "vars": json.dumps(member.variables(), ensure_ascii=False),
            "subscribed": "yes",
            "upsert": "yes",
        }
        if member.name:
            form["name"] = member.name
        response = self._call("POST", f"{self.list_path}/members", what="add member", data=form)
        return f"mailgun: {_message(response, what='add member')}"

    def _add_bulk(self, members: Sequence[Member]) -> str:
        entries = []
        for member in members:
            entry: dict[str, Any] = {
                "address": member.email,
                "vars": member.variables(),
                "subscribed": True,
            }
            if member.name:
                entry["name"] = member.name
            entries.append(entry)
        form = {"members": json.dumps(entries, ensure_ascii=False), "upsert": "yes"}
        response = self._call("POST", f"{self.list_path}/members.json", what="bulk add", data=form)
        return f"mailgun: {len(members)} member(s): {_message(response, what='bulk add')}"

    # Leaving ------------------------------------------------------------------------------

    def _absent_is_done(self, response: httpx.Response, *, what: str) -> bool:
        """True for Mailgun's JSON 404 (nothing there); a bare 404 is a wrong endpoint."""
        if response.status_code != 404:
            return False
        if not _is_json(response):
            raise PermanentSyncError(
                f"mailgun {what}: HTTP 404 without a JSON body (is base_url right?)",
                response=excerpt(response),
            )
        return True

    def _not_a_member(self, response: httpx.Response, *, what: str) -> bool:
        """True for a member's JSON 404 when the list exists. Mailgun answers a list it does
        not have with a JSON 404 too: one look at the list tells them apart, or every
        departure would count as done while nobody leaves the list."""
        if not self._absent_is_done(response, what=what):
            return False
        found = self._call("GET", self.list_path, what="read the list", ok=(404,))
        if found.status_code == 404:
            raise PermanentSyncError(
                f"mailgun {what}: no list {self.settings.list_address} at Mailgun "
                "(is list_address right?)",
                response=excerpt(found),
            )
        return True

    def unsubscribe(self, address: str) -> str:
        response = self._call(
            "PUT",
            f"{self.list_path}/members/{_segment(address)}",
            what="unsubscribe",
            ok=(404,),
            data={"subscribed": "no"},
        )
        if self._not_a_member(response, what="unsubscribe"):
            return "mailgun: not a member, nothing to unsubscribe"
        return f"mailgun: {_message(response, what='unsubscribe')}"

    def remove(self, address: str) -> str:
        response = self._call(
            "DELETE",
            f"{self.list_path}/members/{_segment(address)}",
            what="remove member",
            ok=(404,),
        )
        if self._not_a_member(response, what="remove member"):
            return "mailgun: not a member, nothing to remove"
        return f"mailgun: {_message(response, what='remove member')}"

    # Reading ------------------------------------------------------------------------------

    def members(self, cursor: str | None = None) -> MembersPage:
        params: dict[str, str] = {"limit": str(PAGE_SIZE)}
        if cursor:
            params.update({name: values[0] for name, values in parse_qs(cursor).items() if values})
        response = self._call(
            "GET", f"{self.list_path}/members/pages", what="list members", params=params
        )
        try:
            body = response.json()
            items = body["items"]
            next_url = (body.get("paging") or {}).get("next")
            page = [
                RemoteMember(
                    email=str(item["address"]),
                    subscribed=bool(item.get("subscribed", True)),
                    name=item.get("name") or None,
                    # A JSON object (`vars` is one in every answer of Mailgun's).
                    variables=dict(item.get("vars") or {}),
                )
                for item in items
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PermanentSyncError(
                "mailgun list members: unexpected answer", response=excerpt(response)
            ) from e
        # Only the pivot of `paging.next` is kept, never its host: the API key must not
        # follow a URL the answer chose.
        next_cursor = None
        if page and isinstance(next_url, str):
            query = parse_qs(urlsplit(next_url).query)
            pivot = {name: query[name][0] for name in _CURSOR_PARAMS if query.get(name)}
            if pivot:
                next_cursor = urlencode(pivot)
        return MembersPage(members=page, next_cursor=next_cursor)

    # Suppressions -------------------------------------------------------------------------

    def clear_suppression(self, address: str) -> str | None:
        if not self.settings.clear_suppressions:
            return None
        cleared = []
        for table in ("unsubscribes", "bounces"):
            response = self._call(
                "DELETE",
                f"/v3/{_segment(self.domain)}/{table}/{_segment(address)}",
                what=f"clear {table}",
                ok=(404,),
            )
            if not self._absent_is_done(response, what=f"clear {table}"):
                _message(response, what=f"clear {table}")
                cleared.append(table)
        if not cleared:
            return None
        log.info("backend.mailgun.suppression_cleared tables=%s", ",".join(cleared))
        return f"mailgun: removed from {' and '.join(cleared)} of {self.domain}"
