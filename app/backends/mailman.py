"""The `mailman` backend: one list of a GNU Mailman 3 core, through its REST API.

Auth and answers (https://docs.mailman3.org/projects/mailman/en/latest/src/mailman/rest/docs/
rest.html): HTTP Basic with the core's `[webservice] admin_user` / `admin_pass`, on every
call; `base_url` is the REST root with the API version, e.g. http://127.0.0.1:8001/3.1.
Bad credentials answer 401. A 201 has an empty body and the new resource in `Location`;
failures are JSON `{"title": ..., "description": ...}`. Observed against Mailman 3.3.10
(tests/mailman.py runs that core for the tests). Each call expects Mailman's one success
status (reads and the roster's mass unsubscription 200 with JSON, `POST /members` 201 or
202, `POST /users` 201, deletions and the discard of a request 204 without a body): any
other 2xx is not Mailman's answer (a proxy's `200` page, a login wall) and must not pass
for a change made; it is a retryable error, on record with the page it got.
Mailman's validator answers 400 "Unexpected parameters: ..." to a parameter it does not
know, on reads too: `fields` (the roster) came in core 3.3.2, `send_welcome_message` in
3.3.1, so an older core fails the reads of the roster and the additions, with an error
naming the version needed.

Endpoints:
- add: `POST /members {list_id, subscriber, display_name, pre_verified, pre_confirmed,
  pre_approved: true, send_welcome_message: false}` -> 201. This service already ran the
  double opt-in, so the pre_* flags skip Mailman's own confirmation and moderation, and
  `send_welcome_message: false` overrides the list's welcome for this request only. 409
  "Member already subscribed" is a success. 409 "Subscription request already pending" is
  a request the person made at Mailman itself (its own form), waiting there for their
  confirmation or a moderator: it is found (`GET /lists/{list_id}/requests?count=&page=`,
  `type` subscription, `email`), discarded (`POST .../requests/{token} {"action":
  "discard"}` -> 204, no mail), and the add made again, since the person confirmed here.
  400 "Membership is banned" is permanent, with its own message. So is 400 "Invalid
  Parameter \"subscriber\"": Mailman's address check is narrower than this service's; it
  takes no `^` or `|`, nor any letter beyond ASCII, before the @-sign (`jöhn@...`), and
  the error names the character. A 202 would mean Mailman
  held the request (and may have mailed a confirmation): never expected with these flags,
  reported as permanent.
  There is no bulk add in the core API (only `POST /members`, one subscriber per call), so
  `max_batch` is 1.
  Then, on 201 or 409 "already subscribed" (the member id from `Location`, or from
  `GET /members/find?list_id=&subscriber=&role=member`):
  - the member's language: `PATCH /members/{member_id}/preferences {"preferred_language":
    locale}` -> 204. Mailman writes to a member itself (bounce and disabled-delivery
    notices, password and digest wording) in the member's preferred language, else the
    list's: a member-level preference, so this list only. A language this Mailman has not
    enabled (`[language.xx] enabled: no`, or one it does not ship) answers 400
    "Unexpected parameters: preferred_language" (its validator's language lookup raises
    KeyError, which it reports as an unknown parameter): the member stays added, in the
    list's language, the answer says so, the adapter asks no more for that language and
    logs `backend.mailman.language_unavailable` once.
  - the name: `PATCH /addresses/{address} {"display_name": name}` -> 204 when the person
    gave one (on 409 only when it differs from the member's). Mailman sets an address's
    name only when it creates the address record, which outlives a membership: without
    this a person who left and came back, or renamed themselves here, kept the old name.
    The record is Mailman's one per address, for all its lists: the person's latest name
    given here is the one every list there shows. An address with a `/` cannot be named
    in a path (below): its name stays as Mailman has it.
- unsubscribe and remove: `DELETE /lists/{list_id}/roster/member {"emails": [address]}`,
  Mailman's mass unsubscription (rest/docs/membership.rst "Mass Unsubscriptions") -> 200
  `{address: true}` when a member left, `{address: false}` when it was not one (a success
  too), 404 when the list does not exist (permanent: a wrong `list_id` must not look like a
  done unsubscribe, which the per-member `DELETE .../member/{address}` 404 would). Mailman
  matches the lower-cased address there, so it is sent lower-cased.
- remove (erasure) then discards the person's subscription requests pending on this
  list (as for an add, above: they hold the address and the name), and forgets the person
  at Mailman as well, when nothing else there uses the address: Mailman keeps no
  unsubscribed *members*, but a subscription through the API creates an address record
  (the address as typed, the display name) and a user, which outlive the membership.
  `GET /members/find?subscriber={address}` (its memberships, on any list, in any role;
  only exact matches are kept, as a `*` there is a wildcard): a nonmember record of this
  list (made by Mailman when the address wrote to the list while not a member) is deleted
  (`DELETE /members/{member_id}`); any other membership left (on another list of that
  Mailman, or as an owner or moderator) keeps them, as that list's business.
  Otherwise the user holding the address (`GET /users/{address}`), if it holds no other
  address, is deleted (`DELETE /users/{user_id}`, its address with it); else only the
  address is (`DELETE /addresses/{address}`). 404 at any of these steps means already gone.
  An address with a `/` before the @ (`team/ops@example.org`) cannot be named in a path:
  Mailman's REST router (Falcon) decodes `%2F` before it splits the path, so every such
  path answers 404. For it the user is found by `GET /users/find?q={address}` (a
  substring search, its users' addresses then compared), and an address without a user
  (Mailman makes one bare for a post from a non-member) is deleted through a user made for
  it (`POST /users {"email": address}` links the address it finds; `DELETE /users/{id}`).
  The one case left, such an address among several of one user, which only
  `DELETE /addresses/{address}` could take alone, is a permanent error for an operator.
  Add, unsubscribe and the roster take addresses in bodies and answers only.
- members: `GET /lists/{list_id}/roster/member?count=100&page=1&fields=email&fields=
  display_name`, ordered by address, `total_size` the roster's size; a list larger than
  that page is then read whole, `count={total_size + 100}&page=1` (cursor `whole`), again
  with a larger count if it grew past it meanwhile (3 tries, then a retryable error).
  Mailman has no stable paging (no cursor, no keyset, no `since`): `page=N` is an offset
  into the roster as it is at each call (rest/helpers.py `_paginate` slices the list it
  reads each time), so a member who leaves from a page already read shifts the next ones
  and the member at the border is never read; a reconciliation reported them absent, and
  an import missed them (then unsubscribed there by the next reconciliation, as a member
  without consent here). One answer is one query, a snapshot. It costs Mailman less than
  pages do (each page reads the whole roster to slice it); the answer, some 150 bytes a
  member, may pass the 4 MiB a call reads otherwise (its cap is then 2 KiB a member asked
  for), and must come within `backend_timeout`: 1,000 members read in 0.2 s here.
  `count` and `page` always go together: one without the other makes Mailman 3.3 answer
  500. Every roster entry is a member, so `subscribed=True`: Mailman deletes a member who
  leaves.
  Before the first page, the members whose delivery Mailman turned off (`GET /members/
  find?list_id=&role=member&delivery_status={by_bounces,by_user,by_moderator,unknown}
  &count=&page=`, one status at a time; the roster's entries do not carry it, it is a
  member preference): Mailman's bounce processing disables a member whose mail bounces
  (`by_bounces`) and keeps them on the roster, mailed nothing, until it removes them after
  its warnings or someone enables them again. Such a member is read `subscribed` with
  `delivery_off` saying why: a reconciliation reports them (`delivery_disabled`), and
  changes nothing.

Mail from Mailman: none to the member, for any change this adapter makes. The welcome is
turned off per request; the mass unsubscription removes members without Mailman's goodbye
(sent by the per-member `DELETE` whenever the list's `send_goodbye_message` is on, with no
per-request override) and without its owner notice. So this adapter never changes the
list's settings: `send_welcome_message` and `send_goodbye_message` stay as the list owners
set them, for people who join or leave through Mailman itself. The one mail left is the
owners' own: with the list's `admin_notify_mchanges` on (off by default), Mailman tells
its owners of each member this adapter adds, as of any other (no per-request override).

Member variables: Mailman has no per-member custom variables, and its footer can only
expand fixed placeholders (`$user_address`, `$user_name`, ... with personalized delivery),
not this service's per-member token. So the personal `unsubscribe_url` does not reach
Mailman; the display name and the language do (see add). The newsletter's way out is the
list's footer, set by the list owners (template `list:member:regular:footer`): a link to
the site's unsubscribe form, which posts the address to `POST /v1/lists/{slug}/
unsubscriptions` and so mails the member a personal one-click link.
Mailman itself adds `List-Unsubscribe: <mailto:LIST-leave@...>` to every post, and a
member who leaves that way (or through Postorius) is simply gone from the roster: this
service is not told, and a reconciliation reports that member as *absent_there*
(`keeps_unsubscribed` is False): never added back without an operator.

Bans: `clear_suppression` returns None. Mailman's nearest thing to a suppression is its
ban list (`GET /lists/{list_id}/bans`, and `/bans` for the whole site), which list owners
set; it is moderation, not a member's own earlier opt-out, so a fresh opt-in here does not
lift it. The add of a banned address fails as a permanent error naming the ban, for an
operator to lift it in Mailman and retry; the error says which ban list holds it (the
list's, `/lists/{list_id}/bans`, or the site-wide one, `/bans`, which Mailman also applies
to every list; either holds addresses or `^patterns`). The site-wide list is read whole
(`GET /bans?count=&page=`) and matched as Mailman matches it, since `GET /bans/{address}`
cannot name an address with a `/`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any
from urllib.parse import quote

import httpx

from app.addresses import mask
from app.backends.base import (
    Member,
    MembersPage,
    PermanentSyncError,
    RemoteMember,
    RetryableSyncError,
    SyncError,
    mailman_refuses,
)
from app.backends.http import MAX_ANSWER_BYTES, excerpt, send
from app.config import MailmanBackendSettings

log = logging.getLogger(__name__)

PAGE_SIZE = 100
ALREADY_SUBSCRIBED = "Member already subscribed"
REQUEST_PENDING = "Subscription request already pending"
BANNED = "Membership is banned"
NO_SUCH_LIST = "No such list"
INVALID_SUBSCRIBER = 'Invalid Parameter "subscriber"'
# Mailman's validator, for a parameter it does not know (on reads as on writes).
UNEXPECTED = "Unexpected parameters: "
# The cursor of the roster's second read, the whole of it in one answer (see `members`).
WHOLE_ROSTER = "whole"
# The most one roster entry takes in Mailman's answer (address, display name with its
# characters escaped, http_etag): some 150 bytes in practice; the cap of a whole roster's
# answer is this many per member asked for.
MEMBER_BYTES = 2048
# Reads of the whole roster, each asking for more, before a roster that grows faster than
# it is read is given up on for now (retried later).
ROSTER_TRIES = 3
# A member's `delivery_status` other than `enabled`: kept on the roster, mailed nothing.
DELIVERY_OFF = ("by_bounces", "by_user", "by_moderator", "unknown")


def _segment(value: str) -> str:
    """A value as one path segment: `+`, `/`, `%` and non-ASCII percent-encoded."""
    return quote(value, safe="@")


def _banned_by(banned: str, email: str) -> bool:
    """Whether a ban list's entry (an address, or a `^pattern`) holds `email`, lower-cased,
    as Mailman's ban manager decides it."""
    if not banned.startswith("^"):
        return banned.lower() == email
    try:
        return re.match(banned, email, re.IGNORECASE) is not None
    except re.error:
        return False


def _description(response: httpx.Response) -> str:
    """Mailman's error `description` (or its `title`), else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        for key in ("description", "title"):
            value = body.get(key)
            if isinstance(value, str):
                return value[:200]
    return response.text[:200]


def _too_old(what: str, description: str, *, response: str | None) -> PermanentSyncError:
    """A core that does not know a parameter this adapter sends: older than 3.3.2
    (`fields` came in 3.3.2, `send_welcome_message` in 3.3.1)."""
    unknown = description.removeprefix(UNEXPECTED).strip()
    return PermanentSyncError(
        f"{what}: HTTP 400: Mailman does not know the parameter {unknown}: this service "
        "needs Mailman core 3.3.2 or later (GET /system/versions names the core's version)",
        response=response,
        status=400,
    )


def _total(body: dict[str, Any], what: str) -> int:
    try:
        return int(body.get("total_size") or 0)
    except (TypeError, ValueError) as e:
        raise PermanentSyncError(f"{what}: unexpected total_size {body.get('total_size')!r}") from e


def _json(response: httpx.Response, what: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as e:
        raise PermanentSyncError(f"{what}: not JSON", response=excerpt(response)) from e
    if not isinstance(body, dict):
        raise PermanentSyncError(f"{what}: unexpected answer", response=excerpt(response))
    return body


class MailmanBackend:
    max_batch = 1
    # Mailman forgets a member who leaves (its own List-Unsubscribe, Postorius).
    keeps_unsubscribed = False

    def __init__(
        self,
        settings: MailmanBackendSettings,
        client: httpx.Client,
        *,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self._client = client
        self._api = str(settings.base_url).rstrip("/")
        self._list_id = settings.list_id
        self._list_path = f"/lists/{_segment(settings.list_id)}"
        self._auth = httpx.BasicAuth(settings.username, settings.password.get_secret_value())
        self._page_size = page_size
        # Languages this Mailman refused (not enabled there), not asked again.
        self._unavailable: set[str] = set()
        # The roster's members not delivered to, read with its first page (`members`).
        self._delivery_off: dict[str, str] = {}
        # The roster's size as its latest read answered it.
        self._last_total = 0

    # ListBackend --------------------------------------------------------------------------

    def add(self, members: Sequence[Member]) -> str:
        return "; ".join(self._add_one(member) for member in members)

    def unsubscribe(self, address: str) -> str:
        if self._leave(address, what="mailman unsubscribe"):
            log.info("backend.mailman.unsubscribed address=%s", mask(address))
            return f"mailman: left {self._list_id}"
        return f"mailman: not a member of {self._list_id}, nothing to unsubscribe"

    def remove(self, address: str) -> str:
        left = self._leave(address, what="mailman remove")
        # A request the person left pending on this list holds the address and the name.
        discarded = self._discard_requests(address)
        outcome = self._forget(address)
        log.info(
            "backend.mailman.removed address=%s left=%s discarded_requests=%d",
            mask(address),
            left,
            discarded,
        )
        done = f"left {self._list_id}" if left else f"not a member of {self._list_id}"
        if discarded:
            done += f"; {discarded} pending request(s) discarded"
        return f"mailman: {done}; {outcome}"

    def members(self, cursor: str | None = None) -> MembersPage:
        if cursor not in (None, WHOLE_ROSTER):
            raise PermanentSyncError(f"mailman list members: bad cursor {cursor!r}")
        what = "mailman list members"
        if cursor is None:
            # Read once per pass over the roster, before its first page.
            self._delivery_off = self._not_delivered()
            body = self._roster(count=self._page_size, what=what)
        else:
            # The whole roster in one answer: Mailman reads it in one query, a snapshot.
            # Offset pages (`page=2, 3, ...`) shift when a member before them leaves
            # meanwhile, and the member at the border is never read.
            count = max(self._last_total, self._page_size) + self._page_size
            for _ in range(ROSTER_TRIES):
                body = self._roster(count=count, what=what)
                total = _total(body, what)
                if total <= count:
                    break
                # Grown past `count` since: again, with room for what came meanwhile.
                count = total + self._page_size
            else:
                raise RetryableSyncError(
                    f"{what}: the roster grew faster than it could be read whole "
                    f"({ROSTER_TRIES} tries, {count} members asked for)"
                )
        try:
            entries = body.get("entries") or []
            members = [
                RemoteMember(
                    email=str(entry["email"]),
                    subscribed=True,
                    name=entry.get("display_name") or None,
                    delivery_off=self._delivery_off.get(str(entry["email"]).lower()),
                )
                for entry in entries
            ]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PermanentSyncError(f"{what}: unexpected answer ({e})") from e
        self._last_total = _total(body, what)
        if cursor == WHOLE_ROSTER and len(members) < self._last_total:
            # Not Mailman's answer to `count` (a cache before the API that ignores it?):
            # the members past it would read as gone.
            raise RetryableSyncError(
                f"{what}: the whole roster's answer holds {len(members)} of its "
                f"{self._last_total} members (a cache in front of the API that ignores "
                "`count`?)"
            )
        more = cursor is None and bool(members) and self._last_total > len(members)
        return MembersPage(members=members, next_cursor=WHOLE_ROSTER if more else None)

    def _roster(self, *, count: int, what: str) -> dict[str, Any]:
        response = self._call_list(
            "GET",
            "/roster/member",
            what=what,
            # A page's answer fits the usual cap; the whole roster's is sized by its count.
            max_bytes=max(MAX_ANSWER_BYTES, count * MEMBER_BYTES),
            params=[
                ("count", count),
                ("page", 1),
                ("fields", "email"),
                ("fields", "display_name"),
            ],
        )
        return _json(response, what)

    def _not_delivered(self) -> dict[str, str]:
        """The list's members whose delivery Mailman turned off, by lower-cased address:
        why (`by_bounces`, `by_user`, `by_moderator`, `unknown`)."""
        found: dict[str, str] = {}
        for status in DELIVERY_OFF:
            for entry in self._paged(
                self._call,
                "/members/find",
                {"list_id": self._list_id, "role": "member", "delivery_status": status},
                what="mailman members not delivered to",
            ):
                if isinstance(entry.get("email"), str):
                    found[entry["email"].lower()] = status
        return found

    def _paged(
        self,
        call: Callable[..., httpx.Response],
        path: str,
        params: dict[str, Any],
        *,
        what: str,
    ) -> Iterator[dict[str, Any]]:
        """The entries of a paged read (`count` and `page` from 1), page after page until
        `total_size` is reached or a page comes back empty."""
        page = 1
        while True:
            body = _json(
                call(
                    "GET",
                    path,
                    what=what,
                    params={**params, "count": self._page_size, "page": page},
                ),
                what,
            )
            entries = body.get("entries") or []
            yield from (entry for entry in entries if isinstance(entry, dict))
            if not entries or page * self._page_size >= _total(body, what):
                return
            page += 1

    def clear_suppression(self, address: str) -> str | None:
        # A ban is the list owners' decision, not an opt-out to forget: see the docstring.
        return None

    # Steps --------------------------------------------------------------------------------

    def _add_one(self, member: Member) -> str:
        what = "mailman add member"
        body: dict[str, Any] = {
            "list_id": self._list_id,
            "subscriber": member.email,
            "pre_verified": True,
            "pre_confirmed": True,
            "pre_approved": True,
            "send_welcome_message": False,
        }
        if member.name:
            body["display_name"] = member.name
        response = self._call(
            "POST", "/members", what=what, ok=(400, 409), expect=(201, 202), json=body
        )
        status = response.status_code
        description = _description(response)
        discarded = 0
        if status == 409 and description == REQUEST_PENDING:
            # The person asked at Mailman too (its own form) and that request waits there
            # for their confirmation or a moderator; they confirmed here: this add stands
            # for it.
            discarded = self._discard_requests(member.email)
            if discarded:
                response = self._call(
                    "POST", "/members", what=what, ok=(400, 409), expect=(201, 202), json=body
                )
                status = response.status_code
                description = _description(response)
        if status == 201:
            member_id = response.headers.get("location", "").rstrip("/").rpartition("/")[2]
            # A new membership of an address Mailman already had (the person left and
            # came back, or is on another of its lists) keeps that address's old name.
            self._rename(member, held=None)
            language = self._set_language(member_id, member.locale)
            log.info(
                "backend.mailman.added address=%s discarded_requests=%d language=%s",
                mask(member.email),
                discarded,
                language,
            )
            instead = f", instead of {discarded} request(s) pending there" if discarded else ""
            return (
                f"mailman: member {member_id} added to {self._list_id}{instead}"
                f"{self._updated(False, language, member.locale)}"
            )
        if status == 409 and description == ALREADY_SUBSCRIBED:
            found = self._membership(member.email)
            if found is None:
                # Gone again between the two calls: nothing to update.
                return f"mailman: already a member of {self._list_id}"
            member_id, held = found
            renamed = self._rename(member, held=held)
            language = self._set_language(member_id, member.locale)
            return (
                f"mailman: already a member of {self._list_id}"
                f"{self._updated(renamed, language, member.locale)}"
            )
        if status == 409 and description == REQUEST_PENDING:
            raise PermanentSyncError(
                f"{what}: a subscription request made at Mailman is pending for this "
                f"address on {self._list_id}; a list owner must discard or accept it",
                response=excerpt(response),
            )
        if status == 400 and description == BANNED:
            raise PermanentSyncError(
                f"{what}: the address is banned from {self._list_id} by {self._ban(member)}; "
                "lift the ban in Mailman if this opt-in should stand",
                response=excerpt(response),
            )
        if status == 400 and description == NO_SUCH_LIST:
            raise PermanentSyncError(
                f"{what}: Mailman has no list {self._list_id} (is list_id right?)",
                response=excerpt(response),
            )
        if status == 400 and description.startswith(INVALID_SUBSCRIBER):
            refused = [
                f"{chars!r} {where}"
                for chars, where in zip(
                    mailman_refuses(member.email), ("before the @-sign", "after it"), strict=True
                )
                if chars
            ]
            raise PermanentSyncError(
                f"{what}: HTTP 400: Mailman refuses this address: its address check takes no "
                f"{' nor '.join(refused) or 'such address'} (only ASCII letters, digits and "
                "-!#$%&'*+./=?_`{}~ before the @-sign, and a domain in ASCII), so the list "
                "cannot hold this member",
                response=excerpt(response),
            )
        if status == 400 and description.startswith(UNEXPECTED):
            raise _too_old(what, description, response=excerpt(response))
        if status == 202:
            raise PermanentSyncError(
                f"{what}: Mailman held the subscription for confirmation or approval "
                "instead of adding the member",
                response=excerpt(response),
            )
        raise PermanentSyncError(
            f"{what}: HTTP {status}: {description}", response=excerpt(response)
        )

    @staticmethod
    def _updated(renamed: bool, language: str, locale: str) -> str:
        """What the answer says beyond the membership: a new name, a language Mailman
        lacks (a language set is the rule, left unsaid)."""
        said = "; display name updated" if renamed else ""
        if language == "set":
            return said
        return f"{said}; language {locale} not enabled at Mailman: the list's language instead"

    def _membership(self, address: str) -> tuple[str, str] | None:
        """The member id and display name of `address`'s membership of the list."""
        wanted = address.lower()
        what = "mailman find member"
        response = self._call(
            "GET",
            "/members/find",
            what=what,
            params={"list_id": self._list_id, "subscriber": wanted, "role": "member"},
        )
        for entry in _json(response, what).get("entries") or []:
            # `subscriber` is matched as a pattern where it holds a `*`: exact matches only.
            if (
                isinstance(entry, dict)
                and str(entry.get("email", "")).lower() == wanted
                and isinstance(entry.get("member_id"), str)
            ):
                return entry["member_id"], str(entry.get("display_name") or "")
        return None

    def _rename(self, member: Member, *, held: str | None) -> bool:
        """Give the address record the name the person gave here (`held`: the name Mailman
        shows, None where unknown); whether it was sent."""
        if not member.name or member.name == held or "/" in member.email:
            # No name given: Mailman's stays. An address with a `/` cannot be named in a
            # path (see the module's docstring): its name stays as Mailman has it.
            return False
        self._call(
            "PATCH",
            f"/addresses/{_segment(member.email.lower())}",
            what="mailman update display name",
            ok=(404,),
            expect=(204,),
            json={"display_name": member.name},
        )
        return True

    def _set_language(self, member_id: str, locale: str) -> str:
        """Set the member's preferred language at Mailman to this service's `locale`:
        "set", or "unavailable" where Mailman does not have it enabled (the member then
        gets the list's language from Mailman, as before)."""
        # Mailman's codes are its `[language.xx]` sections: `fr`, `en`, `pt_BR`.
        code = locale.replace("-", "_")
        if code in self._unavailable:
            return "unavailable"
        what = "mailman set preferred language"
        response = self._call(
            "PATCH",
            f"/members/{_segment(member_id)}/preferences",
            what=what,
            ok=(400, 404),
            expect=(204,),
            json={"preferred_language": code},
        )
        if response.status_code in (204, 404):
            # 404: the member left meanwhile (another job, Mailman's own link): no one to set.
            return "set"
        description = _description(response)
        # Mailman's validator reports a language it has not enabled as it does a parameter
        # it does not know (its language lookup raises KeyError): every Mailman 3 knows
        # `preferred_language`, so here it names the language.
        if description.startswith(UNEXPECTED) and "preferred_language" in description:
            self._unavailable.add(code)
            log.warning(
                "backend.mailman.language_unavailable list=%s language=%s: members get the "
                "list's language from Mailman",
                self._list_id,
                code,
            )
            return "unavailable"
        raise PermanentSyncError(
            f"{what}: HTTP 400: {description}", response=excerpt(response), status=400
        )

    def _discard_requests(self, address: str) -> int:
        """Discard the list's pending subscription requests for `address` (silently, as
        Mailman's discard does); how many there were."""
        wanted = address.lower()
        tokens = [
            entry["token"]
            for entry in self._paged(
                self._call_list, "/requests", {}, what="mailman pending requests"
            )
            if entry.get("type") == "subscription"
            and str(entry.get("email", "")).lower() == wanted
            and isinstance(entry.get("token"), str)
        ]
        for token in tokens:
            self._call(
                "POST",
                f"{self._list_path}/requests/{_segment(token)}",
                what="mailman discard pending request",
                ok=(404,),
                expect=(204,),
                json={"action": "discard"},
            )
        return len(tokens)

    def _ban(self, member: Member) -> str:
        """Which ban list refuses the member: the site's (every list, lifted at `/bans`)
        or the list's own, either by the address or by a `^pattern` matching it."""
        try:
            site = self._site_bans(member.email.lower())
        except SyncError:
            return "the list's or the site's ban list"
        if not site:
            return (
                f"the list's ban list, set by its owners (GET {self._list_path}/bans: the "
                "address, or a ^pattern matching it)"
            )
        return (
            "the site-wide ban list, for every list of this Mailman (GET /bans: the "
            "address, or a ^pattern matching it)"
        )

    def _site_bans(self, email: str) -> bool:
        """Whether the site-wide ban list holds `email`, matched as Mailman matches it (the
        address, or a `^pattern` by `re.match`, ignoring case). Read whole rather than
        asked of `GET /bans/{address}`, which cannot name an address with a `/`."""
        what = "mailman ban lookup"
        page = 1
        while True:
            response = self._call(
                "GET", "/bans", what=what, params={"count": self._page_size, "page": page}
            )
            body = _json(response, what)
            entries = body.get("entries") or []
            for entry in entries:
                banned = entry.get("email") if isinstance(entry, dict) else None
                if isinstance(banned, str) and _banned_by(banned, email):
                    return True
            if not entries or page * self._page_size >= int(body.get("total_size") or 0):
                return False
            page += 1

    def _leave(self, address: str, *, what: str) -> bool:
        """Take the address off the list, silently; true if it was a member."""
        # Mailman compares with the address it stores, lower-cased.
        wanted = address.lower()
        response = self._call_list("DELETE", "/roster/member", what=what, json={"emails": [wanted]})
        body = _json(response, what)
        left = body.get(wanted)
        if not isinstance(left, bool):
            raise PermanentSyncError(
                f"{what}: no result for the address in the answer", response=excerpt(response)
            )
        return left

    def _forget(self, address: str) -> str:
        """Delete Mailman's address record (and its user) when nothing else there uses it."""
        wanted = address.lower()
        what = "mailman erase: memberships"
        response = self._call("GET", "/members/find", what=what, params={"subscriber": wanted})
        # `subscriber` is matched as a pattern where it holds a `*`: exact matches only.
        memberships = [
            entry
            for entry in _json(response, what).get("entries") or []
            if isinstance(entry, dict) and str(entry.get("email", "")).lower() == wanted
        ]
        # A nonmember record of this list is this list's data about the person (Mailman
        # makes one when the address writes to the list while not a member): it goes too.
        nonmember = [
            entry["member_id"]
            for entry in memberships
            if entry.get("list_id") == self._list_id
            and entry.get("role") == "nonmember"
            and isinstance(entry.get("member_id"), str)
        ]
        for member_id in nonmember:
            self._call(
                "DELETE",
                f"/members/{_segment(member_id)}",
                what="mailman erase: nonmember record",
                ok=(404,),
                expect=(204,),
            )
        others = len(memberships) - len(nonmember)
        if others > 0:
            return f"address kept: it has {others} other membership(s) at Mailman"
        user_id, addresses = self._user_of(wanted)
        if user_id is not None and addresses <= 1:
            self._call(
                "DELETE",
                f"/users/{_segment(user_id)}",
                what="mailman erase: user",
                ok=(404,),
                expect=(204,),
            )
            return "address and its user deleted"
        if "/" not in wanted:
            response = self._call(
                "DELETE",
                f"/addresses/{_segment(wanted)}",
                what="mailman erase: address",
                ok=(404,),
                expect=(204,),
            )
            if response.status_code == 404:
                return "address not known to Mailman"
            return "address deleted"
        # No path names this address: `/addresses/{address}` cannot delete it.
        if user_id is not None:
            raise PermanentSyncError(
                "mailman erase: the address is one of several of a Mailman user, and "
                "Mailman's REST API cannot delete an address with a '/' alone (no URL path "
                "names it): delete it at Mailman (Postorius, or `mailman shell`)"
            )
        # No user holds the address, if Mailman has it at all (a nonmember record made by
        # a post has none): a user made for it (`POST /users` links an address it finds)
        # takes it along when deleted, and an address Mailman did not have is made and
        # deleted with it.
        response = self._call(
            "POST",
            "/users",
            what="mailman erase: user for the address",
            expect=(201,),
            json={"email": wanted},
        )
        made = response.headers.get("location", "").rstrip("/").rpartition("/")[2]
        if not made:
            raise PermanentSyncError(
                "mailman erase: user for the address: no Location", response=excerpt(response)
            )
        self._call(
            "DELETE",
            f"/users/{_segment(made)}",
            what="mailman erase: user",
            ok=(404,),
            expect=(204,),
        )
        return "address deleted" if memberships else "address not known to Mailman"

    def _user_of(self, email: str) -> tuple[str | None, int]:
        """The id of the Mailman user holding `email` (None if none) and how many addresses
        it holds."""
        what = "mailman erase: user"
        if "/" not in email:
            response = self._call("GET", f"/users/{_segment(email)}", what=what, ok=(404,))
            found = [] if response.status_code == 404 else [_json(response, what)]
        else:
            # No path names it; `q` matches a substring of any address or name.
            response = self._call("GET", "/users/find", what=what, params={"q": email})
            found = _json(response, what).get("entries") or []
        for entry in found:
            user_id = entry.get("user_id") if isinstance(entry, dict) else None
            if not isinstance(user_id, str) or not user_id:
                continue
            listed = self._call(
                "GET",
                f"/users/{_segment(user_id)}/addresses",
                what="mailman erase: user's addresses",
                ok=(404,),
            )
            if listed.status_code == 404:
                continue
            held = [
                str(address.get("email", "")).lower()
                for address in _json(listed, "mailman erase: user's addresses").get("entries") or []
                if isinstance(address, dict)
            ]
            if email in held:
                return user_id, len(held)
        return None, 0

    def _call_list(self, method: str, path: str, *, what: str, **kwargs: Any) -> httpx.Response:
        """A call under the list's own resource, where 404 means the list is not there."""
        response = self._call(method, self._list_path + path, what=what, ok=(404,), **kwargs)
        if response.status_code == 404:
            raise PermanentSyncError(
                f"{what}: HTTP 404: Mailman has no list {self._list_id} (is list_id right?)",
                response=excerpt(response),
            )
        return response

    def _call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        ok: Sequence[int] = (),
        expect: Collection[int] = (200,),
        **kwargs: Any,
    ) -> httpx.Response:
        """One call; a success other than the `expect`ed one (Mailman's writes answer 201
        or 204 without a body, so a proxy's 200 page would pass for a change made) is a
        retryable error, on record with what came instead."""
        try:
            response = send(
                self._client,
                method,
                self._api + path,
                what=what,
                ok=ok,
                refused=(401, "the backend's username and password"),
                auth=self._auth,
                **kwargs,
            )
        except PermanentSyncError as e:
            said = re.search(r'"description":\s*"(Unexpected parameters: [^"]*)"', e.response or "")
            if e.status == 400 and said:
                raise _too_old(what, said[1], response=e.response) from e
            raise
        status = response.status_code
        if response.is_success and status not in expect:
            expected = " or ".join(str(code) for code in sorted(expect))
            raise RetryableSyncError(
                f"{what}: HTTP {status} where Mailman answers {expected}: not Mailman's "
                "answer (a proxy's page? is base_url right?)",
                response=excerpt(response),
                status=status,
            )
        return response
