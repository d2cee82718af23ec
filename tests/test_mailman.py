"""The Mailman adapter against a REAL GNU Mailman 3.3.10 core (tests/mailman.py), alone and
behind the whole service: subscribe over HTTP, confirm, the member reaches Mailman's roster;
unsubscribe by link, the member leaves it; and Mailman itself mails nobody."""

from __future__ import annotations

import base64
import html
import json
import os
import smtplib
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

# Before the import below, so tests.mailman gets assertion rewriting like a plugin should.
pytest.register_assert_rewrite("tests.mailman")

from app import sync  # noqa: E402
from app.backends import make_backend, make_client  # noqa: E402
from app.backends.base import Member, PermanentSyncError, RetryableSyncError  # noqa: E402
from app.backends.mailman import MailmanBackend  # noqa: E402
from app.config import MailmanBackendSettings, Settings  # noqa: E402
from app.mailer import make_mailer  # noqa: E402
from app.main import create_app  # noqa: E402
from app.models import (  # noqa: E402
    AuditEvent,
    DeliveryAttempt,
    JobKind,
    JobState,
    KeyScope,
    OutboxJob,
    Subscription,
)
from app.worker import Worker  # noqa: E402
from tests.conftest import (  # noqa: E402
    SECRET,
    LiveServer,
    SmtpSink,
    api_key_headers,
    free_port,
    link_in,
    make_settings,
    wait_until,
)
from tests.mailman import (  # noqa: E402
    REPO_ROOT,
    MailmanCore,
    create_list,
    flush_outgoing_mail,
    mails_to,
    rest_client,
)

pytest_plugins = ("tests.mailman",)

# A roster change made by the worker shows up within this (it takes well under a second).
SYNC_TIMEOUT = 20.0


def unique(name: str = "ada") -> str:
    return f"{name}-{uuid.uuid4().hex[:10]}@example.com"


def unique_idn(name: str = "jo") -> tuple[str, str]:
    """An address at an internationalized domain: (Unicode form, ASCII form)."""
    local = f"{name}-{uuid.uuid4().hex[:10]}"
    return f"{local}@exämple.org", f"{local}@xn--exmple-cua.org"


def settings_for(
    core: MailmanCore, list_id: str, *, base_url: str | None = None, password: str | None = None
) -> MailmanBackendSettings:
    return MailmanBackendSettings(
        base_url=base_url or core.base_url,
        username=core.admin_user,
        password=password or core.admin_password,
        list_id=list_id,
    )


def member(email: str, name: str | None = "Ada Lovelace") -> Member:
    return Member(
        email=email,
        locale="fr",
        unsubscribe_url="https://news.example.org/v1/unsubscribe/tok",
        name=name,
    )


def roster(core: MailmanCore, list_id: str) -> list[dict[str, Any]]:
    """Every member of the list, as Mailman's REST API lists them (one page of 1000)."""
    with rest_client(core) as client:
        response = client.get(f"/lists/{list_id}/roster/member", params={"count": 1000, "page": 1})
    response.raise_for_status()
    entries: list[dict[str, Any]] = response.json().get("entries", [])
    return entries


def emails(core: MailmanCore, list_id: str) -> list[str]:
    return [entry["email"] for entry in roster(core, list_id)]


def subscribe_directly(
    core: MailmanCore, list_id: str, address: str, *, display_name: str | None = None
) -> None:
    with rest_client(core) as client:
        response = client.post(
            "/members",
            json={
                "list_id": list_id,
                "subscriber": address,
                "pre_verified": True,
                "pre_confirmed": True,
                "pre_approved": True,
                "send_welcome_message": False,
                **({"display_name": display_name} if display_name else {}),
            },
        )
    assert response.status_code == 201, response.text


def disable(core: MailmanCore, list_id: str, address: str, status: str) -> None:
    """Turn the member's delivery off at Mailman, as its bounce processing does
    (`by_bounces`), or the member themselves (`by_user`)."""
    with rest_client(core) as client:
        [entry] = client.get(
            "/members/find", params={"list_id": list_id, "subscriber": address}
        ).json()["entries"]
        done = client.patch(
            f"/members/{entry['member_id']}/preferences", json={"delivery_status": status}
        )
    assert done.status_code == 204, done.text


def known_addresses(core: MailmanCore, address: str) -> list[str]:
    """The address records Mailman holds for `address`, read from the whole collection:
    `GET /addresses/{address}` cannot name one with a `/`."""
    found: list[str] = []
    page = 1
    with rest_client(core) as client:
        while True:
            response = client.get("/addresses", params={"count": 500, "page": page})
            response.raise_for_status()
            entries = response.json().get("entries", [])
            found += [e["email"] for e in entries if e["email"] == address.lower()]
            if not entries:
                return found
            page += 1


def post_to_list(core: MailmanCore, list_id: str, sender: str) -> None:
    """Mail the list from `sender` through Mailman's LMTP, as a post; return once Mailman
    has made its nonmember record of the sender (a bare address, without a user)."""
    with rest_client(core) as client:
        posting = client.get(f"/lists/{list_id}").json()["fqdn_listname"]
    message = (
        f"From: {sender}\r\nTo: {posting}\r\nSubject: a question\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@example.com>\r\n\r\nHello.\r\n"
    )
    with smtplib.LMTP("127.0.0.1", core.lmtp_port) as lmtp:
        lmtp.sendmail(sender, [posting], message)

    def recorded() -> bool:
        with rest_client(core) as client:
            found = client.get("/members/find", params={"subscriber": sender, "list_id": list_id})
        return bool(found.json().get("total_size"))

    wait_until(recorded, timeout=SYNC_TIMEOUT)


@pytest.fixture
def mailman_list(mailman_core: MailmanCore) -> str:
    """A new list with Mailman's defaults: welcome and goodbye messages ON."""
    return create_list(mailman_core)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with make_client(connect_timeout=2, timeout=10) as client:
        yield client


@pytest.fixture
def backend(mailman_core: MailmanCore, mailman_list: str, http: httpx.Client) -> MailmanBackend:
    made = make_backend(settings_for(mailman_core, mailman_list), http)
    assert isinstance(made, MailmanBackend)
    return made


class TestAdd:
    def test_a_member_appears_in_the_roster_with_its_name(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        address = unique()
        answer = backend.add([member(address)])
        assert answer.startswith("mailman: member ")
        [entry] = roster(mailman_core, mailman_list)
        assert entry["email"] == address
        assert entry["display_name"] == "Ada Lovelace"
        assert entry["role"] == "member"

    def test_the_request_asks_mailman_for_a_quiet_preapproved_subscription(
        self, mailman_core: MailmanCore, mailman_list: str
    ) -> None:
        address = unique()
        seen: list[httpx.Request] = []
        with httpx.Client(event_hooks={"request": [seen.append]}, timeout=10) as client:
            MailmanBackend(settings_for(mailman_core, mailman_list), client).add(
                [member(address, name=None)]
            )
        # The subscription, then the member's language (the member's own preference).
        request, language = seen
        assert (request.method, request.url.path) == ("POST", "/3.1/members")
        assert (language.method, json.loads(language.content)) == (
            "PATCH",
            {"preferred_language": "fr"},
        )
        assert language.url.path.endswith("/preferences")
        credentials = f"{mailman_core.admin_user}:{mailman_core.admin_password}".encode()
        assert request.headers["authorization"] == "Basic " + base64.b64encode(credentials).decode()
        assert json.loads(request.content) == {
            "list_id": mailman_list,
            "subscriber": address,
            "pre_verified": True,
            "pre_confirmed": True,
            "pre_approved": True,
            "send_welcome_message": False,
        }

    @pytest.mark.parametrize("policy", ["moderate", "confirm_then_moderate", "open"])
    def test_a_list_that_moderates_or_confirms_subscriptions_gets_the_member_at_once(
        self, mailman_core: MailmanCore, http: httpx.Client, policy: str
    ) -> None:
        # The default policy, confirm, is every other test's; here the list owners vet
        # each subscription: this service's opt-in must neither be held nor mailed about.
        list_id = create_list(mailman_core, config={"subscription_policy": policy})
        address = unique("vetted")
        MailmanBackend(settings_for(mailman_core, list_id), http).add(
            [member(address, name="Élodie Théâtre")]
        )
        [entry] = roster(mailman_core, list_id)
        assert (entry["email"], entry["display_name"]) == (address, "Élodie Théâtre")
        with rest_client(mailman_core) as client:
            assert client.get(f"/lists/{list_id}/requests").json()["total_size"] == 0
        flush_outgoing_mail(mailman_core)
        assert mails_to(mailman_core, address) == []

    def test_a_second_add_of_the_same_member_succeeds_and_keeps_one_member(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        address = f"Grace.Hopper+news-{uuid.uuid4().hex[:6]}@Example.COM"
        backend.add([member(address)])
        assert backend.add([member(address)]) == f"mailman: already a member of {mailman_list}"
        assert backend.add([member(address.lower())]).startswith("mailman: already a member")
        assert emails(mailman_core, mailman_list) == [address.lower()]

    @pytest.mark.parametrize(
        ("policy", "asked_with"),
        [
            ("confirm", {}),  # waits for the person's confirmation at Mailman
            ("moderate", {"pre_verified": True, "pre_confirmed": True}),  # for a moderator
        ],
    )
    def test_a_request_the_person_left_pending_at_mailman_gives_way_to_their_opt_in(
        self,
        mailman_core: MailmanCore,
        http: httpx.Client,
        policy: str,
        asked_with: dict[str, bool],
    ) -> None:
        list_id = create_list(mailman_core, config={"subscription_policy": policy})
        address = unique("asked-twice")
        others = [unique("other") for _ in range(3)]
        with rest_client(mailman_core) as client:
            # Mailman's own form, the person first (in capitals), then other people.
            for asking in (address.upper(), *others):
                response = client.post(
                    "/members", json={"list_id": list_id, "subscriber": asking, **asked_with}
                )
                assert response.status_code == 202, response.text
        flush_outgoing_mail(mailman_core)
        mailed_before = len(mails_to(mailman_core, address))

        # Pages of 2 requests: the person's is found among the others.
        backend = MailmanBackend(settings_for(mailman_core, list_id), http, page_size=2)
        answer = backend.add([member(address)])

        assert answer.endswith(", instead of 1 request(s) pending there")
        assert emails(mailman_core, list_id) == [address]
        with rest_client(mailman_core) as client:
            left = client.get(f"/lists/{list_id}/requests").json()["entries"]
        assert sorted(entry["email"] for entry in left) == sorted(others)
        flush_outgoing_mail(mailman_core)
        assert len(mails_to(mailman_core, address)) == mailed_before

    def test_mailman_takes_an_internationalized_domain_in_ascii_only(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        # Why the sync layer sends `addresses.deliverable` forms: Mailman refuses the other.
        unicode_form, ascii_form = unique_idn()
        with pytest.raises(PermanentSyncError, match="HTTP 400") as caught:
            backend.add([member(unicode_form)])
        assert "its address check takes no 'ä' after it" in str(caught.value)
        backend.add([member(ascii_form)])
        assert emails(mailman_core, mailman_list) == [ascii_form]

    @pytest.mark.parametrize(
        ("local", "named"), [("jöhn", "'ö'"), ("ÉLODIE.Straße", "'Éß'"), ("a^b|c", "'^|'")]
    )
    def test_an_address_mailman_refuses_is_a_permanent_error_naming_why(
        self,
        mailman_core: MailmanCore,
        mailman_list: str,
        backend: MailmanBackend,
        local: str,
        named: str,
    ) -> None:
        # Valid here (RFC 6531, RFC 5322 atext), refused by Mailman's narrower check.
        address = f"{local}-{uuid.uuid4().hex[:6]}@example.com"
        with pytest.raises(PermanentSyncError) as caught:
            backend.add([member(address)])
        assert str(caught.value).startswith(
            "mailman add member: HTTP 400: Mailman refuses this address: its address check "
            f"takes no "
            f"{named} before the @-sign"
        )
        assert caught.value.response is not None
        assert 'Invalid Parameter \\"subscriber\\"' in caught.value.response
        assert emails(mailman_core, mailman_list) == []

    def test_a_banned_address_stays_banned_and_is_a_permanent_error(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        address = unique("banned")
        with rest_client(mailman_core) as client:
            assert client.post(f"/lists/{mailman_list}/bans", json={"email": address}).is_success
        # A fresh opt-in does not lift a ban: that is the list owners' decision.
        assert backend.clear_suppression(address) is None
        with pytest.raises(PermanentSyncError, match="banned from") as caught:
            backend.add([member(address)])
        assert f"by the list's ban list, set by its owners (GET /lists/{mailman_list}/bans" in str(
            caught.value
        )
        assert caught.value.response is not None
        assert "Membership is banned" in caught.value.response
        with rest_client(mailman_core) as client:
            assert client.get(f"/lists/{mailman_list}/bans/{address}").status_code == 200
        assert emails(mailman_core, mailman_list) == []

    def test_a_site_wide_ban_is_named_as_such(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        # Lifting it on the list would change nothing: the error must say where it is.
        address = unique("banned-site")
        pattern = f"^{address.split('@')[0]}-tagged@.*$"
        with rest_client(mailman_core) as client:
            assert client.post("/bans", json={"email": address}).is_success
            assert client.post("/bans", json={"email": pattern}).is_success
        for banned in (address, address.replace("@", "-tagged@").upper()):
            with pytest.raises(PermanentSyncError, match="banned from") as caught:
                backend.add([member(banned)])
            assert "by the site-wide ban list, for every list of this Mailman (GET /bans" in str(
                caught.value
            )
        assert emails(mailman_core, mailman_list) == []

    def test_an_unknown_list_is_a_permanent_error_not_a_silent_success(
        self, mailman_core: MailmanCore, http: httpx.Client
    ) -> None:
        backend = MailmanBackend(settings_for(mailman_core, "nolist.example.org"), http)
        with pytest.raises(PermanentSyncError, match=r"no list nolist\.example\.org"):
            backend.add([member(unique())])
        # The per-member DELETE would answer 404 here, as for "not a member": not this one.
        named = r"HTTP 404: Mailman has no list nolist\.example\.org \(is list_id right\?\)"
        with pytest.raises(PermanentSyncError, match=named):
            backend.unsubscribe(unique())
        with pytest.raises(PermanentSyncError, match=named):
            backend.remove(unique())
        with pytest.raises(PermanentSyncError, match=named):
            backend.members()


def preferences(core: MailmanCore, list_id: str, address: str) -> dict[str, Any]:
    """The member's own preferences at Mailman (not the list's or the address's)."""
    with rest_client(core) as client:
        found = client.get(
            "/members/find", params={"list_id": list_id, "subscriber": address}
        ).json()
        [entry] = found["entries"]
        answer: dict[str, Any] = client.get(f"/members/{entry['member_id']}/preferences").json()
    return answer


def member_in(email: str, locale: str, name: str | None = "Ada Lovelace") -> Member:
    return Member(
        email=email,
        locale=locale,
        unsubscribe_url="https://news.example.org/v1/unsubscribe/tok",
        name=name,
    )


class TestTheMembersLanguageAndName:
    """Mailman mails a member itself (a bounce notice, a password reminder, its digest's
    wording) in the member's preferred language, else the list's; and names them by the
    display name of their address record."""

    def test_a_member_gets_their_own_language_not_the_lists(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        with rest_client(mailman_core) as client:
            assert client.get(f"/lists/{mailman_list}/config").json()["preferred_language"] == "en"
        french, english = unique("fr"), unique("en")
        backend.add([member_in(french, "fr")])
        backend.add([member_in(english, "en")])
        assert preferences(mailman_core, mailman_list, french)["preferred_language"] == "fr"
        assert preferences(mailman_core, mailman_list, english)["preferred_language"] == "en"

    def test_a_member_who_changed_language_has_it_changed_at_mailman(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        address = unique()
        backend.add([member_in(address, "fr")])
        assert backend.add([member_in(address, "en")]).startswith("mailman: already a member")
        assert preferences(mailman_core, mailman_list, address)["preferred_language"] == "en"

    def test_a_language_mailman_lacks_leaves_the_member_in_the_lists_language(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        # Mailman takes only the languages enabled in its configuration; any other is
        # refused ("Unexpected parameters: preferred_language"): the member is added all
        # the same, and Mailman uses the list's language for them.
        address = unique()
        answer = backend.add([member_in(address, "tlh")])
        assert answer.startswith("mailman: member ")
        assert "tlh" in answer
        assert emails(mailman_core, mailman_list) == [address]
        assert "preferred_language" not in preferences(mailman_core, mailman_list, address)

    def test_a_name_changed_on_subscribing_again_reaches_mailman(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        address = unique()
        backend.add([member_in(address, "fr", name="Ada Lovelace")])
        backend.add([member_in(address, "fr", name="Ada King")])
        [entry] = roster(mailman_core, mailman_list)
        assert entry["display_name"] == "Ada King"

    def test_a_name_changed_after_leaving_reaches_mailman_when_coming_back(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        # Mailman keeps the address record (and its name) after the member leaves; a new
        # subscription of that address ignores the display_name it is given.
        address = unique()
        backend.add([member_in(address, "fr", name="Ada Lovelace")])
        backend.unsubscribe(address)
        backend.add([member_in(address, "fr", name="Ada King")])
        [entry] = roster(mailman_core, mailman_list)
        assert entry["display_name"] == "Ada King"

    def test_no_name_given_keeps_the_name_mailman_has(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        address = unique()
        subscribe_directly(mailman_core, mailman_list, address, display_name="Ada Lovelace")
        backend.add([member_in(address, "fr", name=None)])
        [entry] = roster(mailman_core, mailman_list)
        assert entry["display_name"] == "Ada Lovelace"


class TestLeaving:
    def test_unsubscribe_takes_the_member_off_the_list(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        address = f"Mixed.Case+tag-{uuid.uuid4().hex[:6]}@Example.org"
        kept = unique("kept")
        backend.add([member(address)])
        backend.add([member(kept)])
        # The address as this service holds it, with its capitals.
        assert backend.unsubscribe(address) == f"mailman: left {mailman_list}"
        assert emails(mailman_core, mailman_list) == [kept]

    def test_an_unknown_address_unsubscribes_successfully(self, backend: MailmanBackend) -> None:
        answer = backend.unsubscribe(unique("nobody"))
        assert answer.startswith("mailman: not a member")
        # Twice is the same.
        address = unique()
        backend.add([member(address)])
        backend.unsubscribe(address)
        assert backend.unsubscribe(address).startswith("mailman: not a member")

    def test_remove_also_forgets_the_address_at_mailman(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        address = unique("erase")
        backend.add([member(address)])
        answer = backend.remove(address)
        assert answer == f"mailman: left {mailman_list}; address and its user deleted"
        assert emails(mailman_core, mailman_list) == []
        with rest_client(mailman_core) as client:
            assert client.get(f"/addresses/{address}").status_code == 404
            assert client.get(f"/users/{address}").status_code == 404

    def test_remove_keeps_an_address_another_list_still_uses(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        address = unique("shared")
        other_list = create_list(mailman_core)
        backend.add([member(address)])
        subscribe_directly(mailman_core, other_list, address)
        answer = backend.remove(address)
        assert answer.endswith("address kept: it has 1 other membership(s) at Mailman")
        assert emails(mailman_core, mailman_list) == []
        assert emails(mailman_core, other_list) == [address]

    def test_remove_forgets_a_nonmember_record_of_this_list_not_of_another(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        # Mailman makes a nonmember record when an address writes to a list it is not on
        # (a reply to an old issue, after leaving): it holds the address at Mailman.
        address = unique("wrote")
        other_list = create_list(mailman_core)
        backend.add([member(address)])
        backend.unsubscribe(address)
        for list_id in (mailman_list, other_list):
            with rest_client(mailman_core) as client:
                response = client.post(
                    "/members",
                    json={"list_id": list_id, "subscriber": address, "role": "nonmember"},
                )
            assert response.status_code == 201, response.text
        answer = backend.remove(address)
        assert answer.endswith("address kept: it has 1 other membership(s) at Mailman")
        with rest_client(mailman_core) as client:
            held = client.get(f"/addresses/{address}/memberships").json()["entries"]
        assert [(entry["list_id"], entry["role"]) for entry in held] == [(other_list, "nonmember")]

        # Without the other list's record, nothing is left of the address.
        with rest_client(mailman_core) as client:
            assert client.delete(held[0]["self_link"]).status_code == 204
            response = client.post(
                "/members",
                json={"list_id": mailman_list, "subscriber": address, "role": "nonmember"},
            )
            assert response.status_code == 201, response.text
        assert backend.remove(address).endswith("address and its user deleted")
        with rest_client(mailman_core) as client:
            assert client.get(f"/addresses/{address}").status_code == 404

    def test_remove_discards_a_request_the_person_left_pending_on_the_list(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        # Asked at Mailman's own form, never confirmed: Mailman holds the address and name.
        address = unique("asked")
        kept = unique("kept")
        with rest_client(mailman_core) as client:
            for asking in (address, kept):
                response = client.post(
                    "/members",
                    json={"list_id": mailman_list, "subscriber": asking, "display_name": "Zoé"},
                )
                assert response.status_code == 202, response.text
        answer = backend.remove(address)
        assert answer == (
            f"mailman: not a member of {mailman_list}; 1 pending request(s) discarded; "
            "address and its user deleted"
        )
        with rest_client(mailman_core) as client:
            left = client.get(f"/lists/{mailman_list}/requests").json()["entries"]
            assert client.get(f"/addresses/{address}").status_code == 404
        assert [entry["email"] for entry in left] == [kept]

    def test_remove_of_an_unknown_address_succeeds(self, backend: MailmanBackend) -> None:
        answer = backend.remove(unique("nobody"))
        assert answer.endswith(
            "not a member of " + backend._list_id + "; address not known to Mailman"
        )


class TestAnAddressWithASlash:
    """`team/ops@example.org` is a valid address, but no URL path of Mailman's REST API can
    name it: Falcon decodes `%2F` before routing, so `/addresses/team%2Fops@...` is
    `/addresses/team/ops@...`, a 404. Every call takes it in a query or a body."""

    def test_add_unsubscribe_and_reading_the_roster_reach_the_member(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        address = f"team/ops-{uuid.uuid4().hex[:6]}@example.com"
        assert backend.add([member(address)]).startswith("mailman: member ")
        assert backend.add([member(address)]).startswith("mailman: already a member")
        assert list(sync.read_backend(backend).values()) == [(address, True)]
        assert backend.unsubscribe(address) == f"mailman: left {mailman_list}"
        assert emails(mailman_core, mailman_list) == []
        assert backend.unsubscribe(address).startswith("mailman: not a member")

    def test_erasure_forgets_the_address_and_its_user(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        address = f"Team/Erase-{uuid.uuid4().hex[:6]}@example.com"
        backend.add([member(address)])
        answer = backend.remove(address)
        assert answer == f"mailman: left {mailman_list}; address and its user deleted"
        assert emails(mailman_core, mailman_list) == []
        assert known_addresses(mailman_core, address) == []
        with rest_client(mailman_core) as client:
            users = client.get("/users/find", params={"q": address}).json()
        assert users["total_size"] == 0
        assert backend.remove(address).endswith("; address not known to Mailman")

    def test_erasure_keeps_an_address_another_list_still_uses(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        address = f"team/shared-{uuid.uuid4().hex[:6]}@example.com"
        other_list = create_list(mailman_core)
        backend.add([member(address)])
        subscribe_directly(mailman_core, other_list, address)
        answer = backend.remove(address)
        assert answer.endswith("address kept: it has 1 other membership(s) at Mailman")
        assert emails(mailman_core, other_list) == [address]

    def test_erasure_forgets_the_bare_address_a_post_to_the_list_left(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        # A post from a non-member makes a nonmember record of an address without a user.
        address = f"team/wrote-{uuid.uuid4().hex[:6]}@example.com"
        post_to_list(mailman_core, mailman_list, address)
        answer = backend.remove(address)
        assert answer == f"mailman: not a member of {mailman_list}; address deleted"
        assert known_addresses(mailman_core, address) == []
        with rest_client(mailman_core) as client:
            found = client.get("/members/find", params={"subscriber": address}).json()
        assert found["total_size"] == 0

    def test_erasure_of_one_of_a_users_several_addresses_is_a_permanent_error(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        # Mailman can delete such an address only by naming it in a path: an operator must.
        address = f"team/linked-{uuid.uuid4().hex[:6]}@example.com"
        backend.add([member(address)])
        with rest_client(mailman_core) as client:
            user_id = client.get("/users/find", params={"q": address}).json()["entries"][0][
                "user_id"
            ]
            linked = client.post(f"/users/{user_id}/addresses", json={"email": unique("main")})
            assert linked.status_code == 201, linked.text
        with pytest.raises(PermanentSyncError, match="one of several of a Mailman user"):
            backend.remove(address)
        assert emails(mailman_core, mailman_list) == []
        assert known_addresses(mailman_core, address) == [address]

    def test_a_site_wide_ban_is_named_as_such(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        address = f"team/banned-{uuid.uuid4().hex[:6]}@example.com"
        with rest_client(mailman_core) as client:
            assert client.post("/bans", json={"email": address}).is_success
        with pytest.raises(PermanentSyncError, match="by the site-wide ban list"):
            backend.add([member(address)])


def read_from_a_stand_in(
    http: httpx.Client, list_id: str, roster_page: Callable[[Request], Awaitable[Response]]
) -> dict[str, tuple[str, bool]]:
    """`sync.read_backend` of a stand-in for Mailman's REST API answering the roster with
    `roster_page`, and with no member whose delivery is off."""

    async def find(request: Request) -> Response:
        return Response('{"start": 0, "total_size": 0}', media_type="application/json")

    stand_in = Starlette(
        routes=[
            Route(f"/3.1/lists/{list_id}/roster/member", roster_page),
            Route("/3.1/members/find", find),
        ]
    )
    with LiveServer(stand_in) as base_url:
        settings = MailmanBackendSettings(
            base_url=f"{base_url}/3.1", username="restadmin", password="restpass", list_id=list_id
        )
        return sync.read_backend(MailmanBackend(settings, http))


class TestMembers:
    def test_pages_cover_the_whole_roster(
        self, mailman_core: MailmanCore, mailman_list: str, http: httpx.Client
    ) -> None:
        backend = MailmanBackend(settings_for(mailman_core, mailman_list), http, page_size=3)
        added = sorted(f"page-{n}-{uuid.uuid4().hex[:6]}@example.com" for n in range(7))
        for address in added:
            backend.add([member(address)])
        cursors = []
        cursor = None
        while True:
            page = backend.members(cursor)
            cursors.append((len(page.members), page.next_cursor))
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        # A first page, then the whole roster in one answer (a snapshot: see below).
        assert cursors == [(3, "whole"), (7, None)]
        remote = sync.read_backend(backend)
        assert sorted(email for email, _ in remote.values()) == added
        assert all(subscribed for _, subscribed in remote.values())

    def test_a_member_removed_during_the_read_makes_no_other_member_missed(
        self, mailman_core: MailmanCore, mailman_list: str, http: httpx.Client
    ) -> None:
        # Mailman pages by offset over the roster sorted by address: a member removed from
        # a page already read shifted the next pages by one, and the member at the border
        # was never read (then reported absent, or, after an import, unsubscribed there
        # as a stranger by the next reconciliation).
        backend = MailmanBackend(settings_for(mailman_core, mailman_list), http, page_size=3)
        added = sorted(f"shift-{n}-{uuid.uuid4().hex[:6]}@example.com" for n in range(7))
        for address in added:
            backend.add([member(address)])
        removed: list[str] = []

        def remove_the_first_after_the_first_page(count: int) -> None:
            if not removed:
                backend.unsubscribe(added[0])
                removed.append(added[0])

        remote = sync.read_backend(backend, progress=remove_the_first_after_the_first_page)
        assert removed == [added[0]]
        assert {email for email, _ in remote.values()} >= set(added[1:])

    def test_a_roster_larger_than_one_answer_may_be_is_read_whole(self, http: httpx.Client) -> None:
        # 40,000 members as Mailman lists them (each entry with its http_etag) are some
        # 6 MB: past the 4 MiB an answer may hold (app.backends.http), which guards
        # against a proxy's endless page, not against a large list. A stand-in for
        # Mailman's roster, as the real core answers it (count, page, total_size).
        size = 40_000
        entries = [
            {
                "email": f"member-{n:05d}@example.org",
                "display_name": f"Member Number {n:05d}",
                "http_etag": f'"{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"',
            }
            for n in range(size)
        ]

        async def roster_page(request: Request) -> Response:
            count, page = int(request.query_params["count"]), int(request.query_params["page"])
            body: dict[str, Any] = {"start": (page - 1) * count, "total_size": size}
            if chunk := entries[(page - 1) * count : page * count]:
                body["entries"] = chunk
            return Response(json.dumps(body), media_type="application/json")

        remote = read_from_a_stand_in(http, "big.example.org", roster_page)
        assert len(remote) == size

    def test_a_whole_roster_answered_short_is_an_error_not_fewer_members(
        self, http: httpx.Client
    ) -> None:
        # A cache before the API that ignores `count` answers the whole roster's read with
        # the first page: taken as the whole, the members after it would read as gone.
        entries = [{"email": f"member-{n:03d}@example.org"} for n in range(250)]

        async def roster_page(request: Request) -> Response:
            body = {"start": 0, "total_size": len(entries), "entries": entries[:100]}
            return Response(json.dumps(body), media_type="application/json")

        with pytest.raises(RetryableSyncError) as caught:
            read_from_a_stand_in(http, "cached.example.org", roster_page)
        assert "100 of its 250 members" in str(caught.value)

    def test_a_member_whose_delivery_mailman_disabled_is_read_with_the_reason(
        self, mailman_core: MailmanCore, mailman_list: str, http: httpx.Client
    ) -> None:
        backend = MailmanBackend(settings_for(mailman_core, mailman_list), http, page_size=2)
        bouncing, paused, fine = unique("bouncing"), unique("paused"), unique("fine")
        for address in (bouncing, paused, fine):
            backend.add([member(address)])
        disable(mailman_core, mailman_list, bouncing, "by_bounces")
        disable(mailman_core, mailman_list, paused, "by_user")
        not_delivered: dict[str, str] = {}
        remote = sync.read_backend(backend, not_delivered=not_delivered)
        # Still members, subscribed: Mailman keeps them, and may enable them again.
        assert sorted(email for email, subscribed in remote.values() if subscribed) == sorted(
            [bouncing, paused, fine]
        )
        assert not_delivered == {bouncing: "by_bounces", paused: "by_user"}

    def test_an_empty_list_is_one_empty_page(self, backend: MailmanBackend) -> None:
        page = backend.members()
        assert (page.members, page.next_cursor) == ([], None)


class TestNoMailFromMailman:
    def test_no_welcome_goodbye_or_confirmation_reaches_anyone(
        self, mailman_core: MailmanCore, mailman_list: str, backend: MailmanBackend
    ) -> None:
        address = unique("quiet")
        erased = unique("erased")
        backend.add([member(address)])
        backend.add([member(address)])
        backend.unsubscribe(address)
        backend.add([member(address)])
        backend.add([member(erased)])
        backend.remove(erased)
        # A barrier: everything Mailman queued before this has reached its SMTP sink.
        flush_outgoing_mail(mailman_core)
        assert mails_to(mailman_core, address) == []
        assert mails_to(mailman_core, erased) == []
        # Silent by the calls made, not by changing what the list owners set.
        with rest_client(mailman_core) as client:
            config = client.get(f"/lists/{mailman_list}/config").json()
        assert config["send_welcome_message"] is True
        assert config["send_goodbye_message"] is True

    def test_owners_who_asked_for_membership_notices_hear_of_additions_only(
        self, mailman_core: MailmanCore, http: httpx.Client
    ) -> None:
        list_id = create_list(mailman_core, config={"admin_notify_mchanges": True})
        owner = unique("owner")
        with rest_client(mailman_core) as client:
            response = client.post(
                "/members", json={"list_id": list_id, "subscriber": owner, "role": "owner"}
            )
            assert response.status_code == 201, response.text
        address = unique("noticed")
        backend = MailmanBackend(settings_for(mailman_core, list_id), http)
        backend.add([member(address)])
        backend.unsubscribe(address)
        flush_outgoing_mail(mailman_core)
        assert mails_to(mailman_core, address) == []
        # Mailman's own notice of a new member, which the owners turned on; none for the
        # departure (the mass unsubscription sends no owner notice).
        [notice] = mails_to(mailman_core, owner)
        assert address in notice.get_body().get_content()


class TestFailures:
    def test_a_wrong_password_is_permanent(
        self, mailman_core: MailmanCore, mailman_list: str, http: httpx.Client
    ) -> None:
        backend = MailmanBackend(settings_for(mailman_core, mailman_list, password="wrong"), http)
        with pytest.raises(PermanentSyncError, match="HTTP 401") as caught:
            backend.add([member(unique())])
        # What `newsletter check` and `newsletter jobs failed` show: the settings to fix.
        assert str(caught.value) == (
            "mailman add member: HTTP 401: check the backend's username and password"
        )
        assert "REST API authorization failed" in (caught.value.response or "")
        with pytest.raises(PermanentSyncError, match="HTTP 401"):
            backend.unsubscribe(unique())
        with pytest.raises(PermanentSyncError, match="HTTP 401"):
            backend.members()

    def test_mailman_down_is_retryable(
        self, mailman_core: MailmanCore, mailman_list: str, http: httpx.Client
    ) -> None:
        closed = f"http://127.0.0.1:{free_port()}/3.1"
        backend = MailmanBackend(settings_for(mailman_core, mailman_list, base_url=closed), http)
        with pytest.raises(RetryableSyncError, match="ConnectError") as caught:
            backend.add([member(unique())])
        assert isinstance(caught.value.__cause__, httpx.ConnectError)
        with pytest.raises(RetryableSyncError):
            backend.unsubscribe(unique())
        with pytest.raises(RetryableSyncError):
            backend.remove(unique())
        with pytest.raises(RetryableSyncError):
            backend.members()

    def test_a_core_older_than_3_3_2_is_named_as_such(self) -> None:
        # Mailman's validator refuses a parameter it does not know, on a read as on a
        # write, as 3.3.10 does (observed: `fieldz` on the roster, `send_goodbye_message`
        # on POST /members): `fields` came in 3.3.2, `send_welcome_message` in 3.3.1.
        def old_core(request: httpx.Request) -> httpx.Response:
            unknown = "fields" if request.method == "GET" else "send_welcome_message"
            return httpx.Response(
                400,
                json={
                    "title": "400 Bad Request",
                    "description": f"Unexpected parameters: {unknown}",
                },
            )

        settings = MailmanBackendSettings(
            base_url="http://mailman.internal:8001/3.1",
            username="restadmin",
            password="p",
            list_id="bluehats.example.org",
        )
        with httpx.Client(transport=httpx.MockTransport(old_core)) as client:
            backend = MailmanBackend(settings, client)
            for call, name in (
                (backend.members, "fields"),
                (lambda: backend.add([member(unique())]), "send_welcome_message"),
            ):
                with pytest.raises(PermanentSyncError) as caught:
                    call()
                assert f"Mailman does not know the parameter {name}" in str(caught.value)
                assert "Mailman core 3.3.2 or later" in str(caught.value)
                assert "GET /system/versions" in str(caught.value)


class PagingProxy:
    """A reverse proxy before the real core that answers chosen calls, once each, with its
    own `200` HTML page (maintenance, a login wall) instead of passing them on."""

    def __init__(self, core: MailmanCore) -> None:
        upstream = httpx.URL(core.base_url)
        self.upstream = f"{upstream.scheme}://{upstream.host}:{upstream.port}"
        self.intercept: list[tuple[str, str]] = []
        self.paged: list[tuple[str, str]] = []
        self.app = Starlette(
            routes=[
                Route("/{path:path}", self._endpoint, methods=["GET", "POST", "PATCH", "DELETE"])
            ]
        )

    async def _endpoint(self, request: Request) -> Response:
        call = (request.method, request.url.path)
        for method, prefix in self.intercept:
            if method == call[0] and call[1].startswith(prefix):
                self.intercept.remove((method, prefix))
                self.paged.append(call)
                return HTMLResponse("<html><body>Back soon</body></html>", status_code=200)
        async with httpx.AsyncClient(base_url=self.upstream, timeout=10) as client:
            answer = await client.request(
                request.method,
                request.url.path,
                params=request.query_params.multi_items(),
                content=await request.body(),
                headers={
                    name: value
                    for name, value in request.headers.items()
                    if name in ("authorization", "content-type")
                },
            )
        headers = {
            name: value
            for name, value in answer.headers.items()
            if name in ("content-type", "location")
        }
        return Response(answer.content, status_code=answer.status_code, headers=headers)


class TestAProxysPageIsNoChangeMade:
    """Mailman answers its writes 201 or 204 without a body: a `200` page was taken for a
    member added, a user deleted."""

    @pytest.fixture
    def proxy(self, mailman_core: MailmanCore) -> Iterator[tuple[PagingProxy, str]]:
        proxy = PagingProxy(mailman_core)
        with LiveServer(proxy.app) as url:
            yield proxy, f"{url}/3.1"

    def test_an_add_answered_200_is_retried_and_then_made(
        self,
        mailman_core: MailmanCore,
        mailman_list: str,
        http: httpx.Client,
        proxy: tuple[PagingProxy, str],
    ) -> None:
        paging, url = proxy
        backend = MailmanBackend(settings_for(mailman_core, mailman_list, base_url=url), http)
        address = unique()
        paging.intercept.append(("POST", "/3.1/members"))
        with pytest.raises(RetryableSyncError) as caught:
            backend.add([member(address)])
        assert str(caught.value) == (
            "mailman add member: HTTP 200 where Mailman answers 201 or 202: not Mailman's "
            "answer (a proxy's page? is base_url right?)"
        )
        assert caught.value.response == "200 <html><body>Back soon</body></html>"
        assert emails(mailman_core, mailman_list) == []
        assert backend.add([member(address)]).startswith("mailman: member ")
        assert emails(mailman_core, mailman_list) == [address]

    def test_an_erasure_whose_deletion_is_answered_200_is_retried_until_mailman_forgot(
        self,
        mailman_core: MailmanCore,
        mailman_list: str,
        http: httpx.Client,
        proxy: tuple[PagingProxy, str],
    ) -> None:
        paging, url = proxy
        backend = MailmanBackend(settings_for(mailman_core, mailman_list, base_url=url), http)
        address = unique("erase")
        backend.add([member(address)])
        paging.intercept.append(("DELETE", "/3.1/users/"))
        with pytest.raises(RetryableSyncError, match="HTTP 200 where Mailman answers 204"):
            backend.remove(address)
        assert [method for method, _ in paging.paged] == ["DELETE"]
        # Mailman still holds the address: the erasure is not done.
        assert known_addresses(mailman_core, address) == [address]
        assert backend.remove(address) == (
            f"mailman: not a member of {mailman_list}; address and its user deleted"
        )
        assert known_addresses(mailman_core, address) == []


# The whole service ----------------------------------------------------------------------


def service_settings(
    database_url: str, smtp: SmtpSink, backend: MailmanBackendSettings, **overrides: Any
) -> Settings:
    """The app with list 'bluehats' on Mailman; our own mails go to the test SMTP sink."""
    return make_settings(
        database_url,
        smtp_port=smtp.port,
        lists=[
            {
                "slug": "bluehats",
                "name": "Gazette BlueHats",
                "backend": backend,
            }
        ],
        **overrides,
    )


def sync_attempts(engine: sa.Engine) -> list[str]:
    with Session(engine) as session:
        rows = session.exec(
            select(DeliveryAttempt.outcome)
            .join(OutboxJob, col(OutboxJob.id) == col(DeliveryAttempt.job_id))
            .where(OutboxJob.kind == JobKind.SYNC)
            .order_by(col(DeliveryAttempt.id))
        ).all()
    return list(rows)


def sync_jobs(engine: sa.Engine) -> list[OutboxJob]:
    with Session(engine) as session:
        return list(session.exec(select(OutboxJob).where(OutboxJob.kind == JobKind.SYNC)).all())


def subscribe_and_confirm(
    client: TestClient, smtp: SmtpSink, address: str, *, mailed_to: str | None = None
) -> None:
    """`mailed_to`: the address as the mail carries it, if not `address`."""
    response = client.post("/v1/lists/bluehats/subscriptions", json={"email": address})
    assert response.status_code == 202, response.text
    confirm = link_in(smtp.mail_to(mailed_to or address, link="confirm"), "confirm")
    confirmed = client.post(confirm, headers={"accept": "application/json"})
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.json()["status"] == "confirmed"


class TestThroughTheService:
    def test_subscribe_confirm_and_unsubscribe_reach_the_mailman_roster(
        self,
        database_url: str,
        engine: sa.Engine,
        smtp: SmtpSink,
        mailman_core: MailmanCore,
        mailman_list: str,
    ) -> None:
        address = unique("camille")
        settings = service_settings(database_url, smtp, settings_for(mailman_core, mailman_list))
        with TestClient(create_app(settings)) as client:
            subscribe_and_confirm(client, smtp, address)
            wait_until(
                lambda: emails(mailman_core, mailman_list) == [address], timeout=SYNC_TIMEOUT
            )

            asked = client.post("/v1/lists/bluehats/unsubscriptions", json={"email": address})
            assert asked.status_code == 202
            leave = link_in(smtp.mail_to(address, link="unsubscribe"), "unsubscribe")
            left = client.post(leave, headers={"accept": "application/json"})
            assert left.json()["status"] == "unsubscribed"
            wait_until(lambda: emails(mailman_core, mailman_list) == [], timeout=SYNC_TIMEOUT)
            wait_until(
                lambda: [job.state for job in sync_jobs(engine)] == [JobState.DONE] * 2,
                timeout=SYNC_TIMEOUT,
            )
        assert sync_attempts(engine) == ["success", "success"]
        # Our own mails went to our SMTP server; Mailman sent nothing to the member.
        flush_outgoing_mail(mailman_core)
        assert mails_to(mailman_core, address) == []
        subjects = [str(m["Subject"]) for m in smtp.messages if m["To"] == address]
        assert len(subjects) == 3, subjects  # confirm, unsubscribe link, goodbye

    def test_who_comes_back_under_a_new_name_has_it_and_their_language_at_mailman(
        self,
        database_url: str,
        engine: sa.Engine,
        smtp: SmtpSink,
        mailman_core: MailmanCore,
        mailman_list: str,
    ) -> None:
        address = unique("ada")
        settings = service_settings(database_url, smtp, settings_for(mailman_core, mailman_list))

        def subscribe(name: str) -> None:
            asked = client.post(
                "/v1/lists/bluehats/subscriptions",
                json={"email": address, "locale": "fr", "attributes": {"name": name}},
            )
            assert asked.status_code == 202, asked.text
            confirm = link_in(smtp.mail_to(address, link="confirm"), "confirm")
            smtp.messages.clear()
            client.post(confirm, headers={"accept": "application/json"})

        with TestClient(create_app(settings)) as client:
            subscribe("Ada Lovelace")
            wait_until(
                lambda: emails(mailman_core, mailman_list) == [address], timeout=SYNC_TIMEOUT
            )
            client.post("/v1/lists/bluehats/unsubscriptions", json={"email": address})
            leave = link_in(smtp.mail_to(address, link="unsubscribe"), "unsubscribe")
            client.post(leave, headers={"accept": "application/json"})
            wait_until(lambda: emails(mailman_core, mailman_list) == [], timeout=SYNC_TIMEOUT)
            smtp.messages.clear()
            subscribe("Ada King")
            wait_until(
                lambda: emails(mailman_core, mailman_list) == [address], timeout=SYNC_TIMEOUT
            )
        [entry] = roster(mailman_core, mailman_list)
        assert entry["display_name"] == "Ada King"
        # The list speaks English; this member asked in French.
        assert preferences(mailman_core, mailman_list, address)["preferred_language"] == "fr"

    def test_an_internationalized_domain_reaches_the_roster_in_ascii(
        self,
        database_url: str,
        engine: sa.Engine,
        smtp: SmtpSink,
        mailman_core: MailmanCore,
        mailman_list: str,
    ) -> None:
        unicode_form, ascii_form = unique_idn()
        settings = service_settings(database_url, smtp, settings_for(mailman_core, mailman_list))
        with TestClient(create_app(settings)) as client:
            subscribe_and_confirm(client, smtp, unicode_form, mailed_to=ascii_form)
            wait_until(
                lambda: emails(mailman_core, mailman_list) == [ascii_form], timeout=SYNC_TIMEOUT
            )

            asked = client.post("/v1/lists/bluehats/unsubscriptions", json={"email": unicode_form})
            assert asked.status_code == 202
            leave = link_in(smtp.mail_to(ascii_form, link="unsubscribe"), "unsubscribe")
            left = client.post(leave, headers={"accept": "application/json"})
            assert left.json()["status"] == "unsubscribed"
            wait_until(lambda: emails(mailman_core, mailman_list) == [], timeout=SYNC_TIMEOUT)
            wait_until(
                lambda: [job.state for job in sync_jobs(engine)] == [JobState.DONE] * 2,
                timeout=SYNC_TIMEOUT,
            )
        assert sync_attempts(engine) == ["success", "success"]

    def test_an_address_with_a_slash_is_subscribed_reconciled_and_erased(
        self,
        database_url: str,
        engine: sa.Engine,
        smtp: SmtpSink,
        mailman_core: MailmanCore,
        mailman_list: str,
        tmp_path: Path,
    ) -> None:
        address = f"team/ops-{uuid.uuid4().hex[:6]}@example.com"
        backend = settings_for(mailman_core, mailman_list)
        settings = service_settings(database_url, smtp, backend)
        with TestClient(create_app(settings)) as client:
            subscribe_and_confirm(client, smtp, address)
            wait_until(
                lambda: emails(mailman_core, mailman_list) == [address], timeout=SYNC_TIMEOUT
            )
            report = newsletter(
                "reconcile", "--list", "bluehats",
                database_url=database_url, backend=backend, tmp_path=tmp_path,
            )  # fmt: skip
            assert report.returncode == 0, report.stdout + report.stderr
            assert "in sync" in report.stdout

            writer = api_key_headers(engine, "operator", KeyScope.WRITE)
            erased = client.delete(f"/v1/admin/people/{quote(address)}", headers=writer)
            assert erased.status_code == 200, erased.text
            # The erasure's removal; the jobs naming the address went with the erasure.
            wait_until(
                lambda: [job.state for job in sync_jobs(engine)] == [JobState.DONE],
                timeout=SYNC_TIMEOUT,
            )
        assert emails(mailman_core, mailman_list) == []
        assert known_addresses(mailman_core, address) == []

    def test_a_list_deleted_at_mailman_dead_letters_the_sync_at_once_saying_so(
        self,
        database_url: str,
        engine: sa.Engine,
        smtp: SmtpSink,
        mailman_core: MailmanCore,
    ) -> None:
        list_id = create_list(mailman_core)
        with rest_client(mailman_core) as client:
            assert client.delete(f"/lists/{list_id}").status_code == 204
        settings = service_settings(
            database_url, smtp, settings_for(mailman_core, list_id), job_max_attempts=100
        )
        with TestClient(create_app(settings)) as client:
            subscribe_and_confirm(client, smtp, unique("orphan"))
            wait_until(
                lambda: [job.state for job in sync_jobs(engine)] == [JobState.DEAD],
                timeout=SYNC_TIMEOUT,
            )
        [job] = sync_jobs(engine)
        assert job.attempts == 1
        assert f"Mailman has no list {list_id} (is list_id right?)" in (job.last_error or "")

    def test_a_mailman_outage_is_retried_and_the_member_arrives_once(
        self,
        database_url: str,
        engine: sa.Engine,
        smtp: SmtpSink,
        mailman_core: MailmanCore,
        mailman_list: str,
    ) -> None:
        address = unique("patient")
        closed = f"http://127.0.0.1:{free_port()}/3.1"
        down = service_settings(
            database_url,
            smtp,
            settings_for(mailman_core, mailman_list, base_url=closed),
            job_max_attempts=100,
        )
        with TestClient(create_app(down)) as client:
            subscribe_and_confirm(client, smtp, address)
            wait_until(lambda: sync_attempts(engine).count("retry") >= 2, timeout=SYNC_TIMEOUT)
        [job] = sync_jobs(engine)
        assert job.state == JobState.PENDING
        assert "ConnectError" in (job.last_error or "")
        assert emails(mailman_core, mailman_list) == []

        # The operator fixes the URL and restarts: the same job goes through, once.
        up = service_settings(
            database_url, smtp, settings_for(mailman_core, mailman_list), job_max_attempts=100
        )
        with TestClient(create_app(up)):
            wait_until(
                lambda: [j.state for j in sync_jobs(engine)] == [JobState.DONE],
                timeout=SYNC_TIMEOUT,
            )
        assert emails(mailman_core, mailman_list) == [address]
        outcomes = sync_attempts(engine)
        assert outcomes[-1] == "success"
        assert outcomes.count("success") == 1
        assert set(outcomes[:-1]) == {"retry"}
        flush_outgoing_mail(mailman_core)
        assert mails_to(mailman_core, address) == []

    def test_a_member_whose_sync_outlived_its_retries_is_added_by_reconciliation(
        self,
        database_url: str,
        engine: sa.Engine,
        smtp: SmtpSink,
        mailman_core: MailmanCore,
        mailman_list: str,
        tmp_path: Path,
    ) -> None:
        address = unique("outlasted")
        closed = f"http://127.0.0.1:{free_port()}/3.1"
        down = service_settings(
            database_url,
            smtp,
            settings_for(mailman_core, mailman_list, base_url=closed),
            job_max_attempts=1,
        )
        with TestClient(create_app(down)) as client:
            subscribe_and_confirm(client, smtp, address)
            wait_until(
                lambda: [job.state for job in sync_jobs(engine)] == [JobState.DEAD],
                timeout=SYNC_TIMEOUT,
            )
        # Mailman is back. The member never reached it: not one who left there.
        backend = settings_for(mailman_core, mailman_list)
        report = newsletter(
            "reconcile", "--list", "bluehats", "--json", "--apply",
            database_url=database_url, backend=backend, tmp_path=tmp_path,
        )  # fmt: skip
        assert report.returncode == 0, report.stdout + report.stderr
        found = json.loads(report.stdout)
        assert (found["missing"], found["absent_there"]) == ([address], [])
        with TestClient(create_app(service_settings(database_url, smtp, backend))):
            wait_until(
                lambda: emails(mailman_core, mailman_list) == [address], timeout=SYNC_TIMEOUT
            )
        flush_outgoing_mail(mailman_core)
        assert mails_to(mailman_core, address) == []


class TestADeadSyncRepairedSinceIsPutToRest:
    """A sync that outlived its retries is a dead letter in `GET /v1/admin/jobs`, for an
    operator to act on; once its work is done (a reconciliation's fix, or the backend shows
    it done), it leaves that listing, its history kept: done, with its dead attempt and one
    more, `superseded`, saying how."""

    def failed_jobs(self, client: TestClient, engine: sa.Engine) -> list[dict[str, Any]]:
        key = api_key_headers(engine, f"ops-{uuid.uuid4().hex[:6]}", KeyScope.READ)
        listed = client.get("/v1/admin/jobs", headers=key)
        assert listed.status_code == 200, listed.text
        jobs: list[dict[str, Any]] = listed.json()
        return jobs

    def attempts(self, engine: sa.Engine, job_id: int) -> list[tuple[str, str | None]]:
        with Session(engine) as session:
            rows = session.exec(
                select(DeliveryAttempt)
                .where(DeliveryAttempt.job_id == job_id)
                .order_by(col(DeliveryAttempt.id))
            ).all()
        return [(row.outcome, row.response) for row in rows]

    def test_an_addition_made_by_a_reconciliations_fix(
        self,
        database_url: str,
        engine: sa.Engine,
        smtp: SmtpSink,
        mailman_core: MailmanCore,
        mailman_list: str,
        tmp_path: Path,
    ) -> None:
        address = unique("outlasted")
        closed = f"http://127.0.0.1:{free_port()}/3.1"
        down = service_settings(
            database_url,
            smtp,
            settings_for(mailman_core, mailman_list, base_url=closed),
            job_max_attempts=1,
        )
        with TestClient(create_app(down)) as client:
            subscribe_and_confirm(client, smtp, address)
            wait_until(
                lambda: [job.state for job in sync_jobs(engine)] == [JobState.DEAD],
                timeout=SYNC_TIMEOUT,
            )
            [dead] = self.failed_jobs(client, engine)
        backend = settings_for(mailman_core, mailman_list)
        report = newsletter(
            "reconcile", "--list", "bluehats", "--json", "--apply",
            database_url=database_url, backend=backend, tmp_path=tmp_path,
        )  # fmt: skip
        assert json.loads(report.stdout)["missing"] == [address]
        with TestClient(create_app(service_settings(database_url, smtp, backend))) as client:
            wait_until(
                lambda: [job.state for job in sync_jobs(engine)] == [JobState.DONE] * 2,
                timeout=SYNC_TIMEOUT,
            )
            assert emails(mailman_core, mailman_list) == [address]
            assert self.failed_jobs(client, engine) == []
            stats = client.get(
                "/v1/admin/lists/bluehats/stats",
                headers=api_key_headers(engine, "ops2", KeyScope.READ),
            )
            assert stats.json()["dead_jobs"] == 0
        [(died, _), (rested, how)] = self.attempts(engine, dead["id"])
        assert (died, rested) == ("dead", "superseded")
        assert str(how).startswith("superseded: job ")

    def test_an_addition_made_at_mailman_meanwhile_is_sent_again_then_put_to_rest(
        self,
        database_url: str,
        engine: sa.Engine,
        smtp: SmtpSink,
        mailman_core: MailmanCore,
        mailman_list: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        address = unique("by-hand")
        closed = f"http://127.0.0.1:{free_port()}/3.1"
        down = service_settings(
            database_url,
            smtp,
            settings_for(mailman_core, mailman_list, base_url=closed),
            job_max_attempts=1,
        )
        with TestClient(create_app(down)) as client:
            subscribe_and_confirm(client, smtp, address)
            wait_until(
                lambda: [job.state for job in sync_jobs(engine)] == [JobState.DEAD],
                timeout=SYNC_TIMEOUT,
            )
            [dead] = self.failed_jobs(client, engine)
        # A list owner added the member by hand: the roster is right, their language is not.
        subscribe_directly(mailman_core, mailman_list, address)
        backend = settings_for(mailman_core, mailman_list)
        settings = service_settings(database_url, smtp, backend)
        with caplog.at_level("INFO"), TestClient(create_app(settings)) as client:
            asked = client.post(
                "/v1/admin/lists/bluehats/reconcile",
                headers=api_key_headers(engine, "ops-write", KeyScope.WRITE),
            )
            assert asked.status_code == 202, asked.text
            wait_until(
                lambda: [job.state for job in sync_jobs(engine)] == [JobState.DONE] * 2,
                timeout=SYNC_TIMEOUT,
            )
            assert self.failed_jobs(client, engine) == []
        assert preferences(mailman_core, mailman_list, address)["preferred_language"] == "fr"
        [(died, _), (rested, how)] = self.attempts(engine, dead["id"])
        assert (died, rested) == ("dead", "superseded")
        assert str(how).startswith("superseded: job ")

    def test_an_unsubscription_the_backend_shows_done(
        self,
        database_url: str,
        engine: sa.Engine,
        smtp: SmtpSink,
        mailman_core: MailmanCore,
        mailman_list: str,
        tmp_path: Path,
    ) -> None:
        address = unique("left-twice")
        backend = settings_for(mailman_core, mailman_list)
        with TestClient(create_app(service_settings(database_url, smtp, backend))) as client:
            subscribe_and_confirm(client, smtp, address)
            wait_until(
                lambda: emails(mailman_core, mailman_list) == [address], timeout=SYNC_TIMEOUT
            )
        closed = f"http://127.0.0.1:{free_port()}/3.1"
        down = service_settings(
            database_url,
            smtp,
            settings_for(mailman_core, mailman_list, base_url=closed),
            job_max_attempts=1,
        )
        with TestClient(create_app(down)) as client:
            client.post("/v1/lists/bluehats/unsubscriptions", json={"email": address})
            leave = link_in(smtp.mail_to(address, link="unsubscribe"), "unsubscribe")
            client.post(leave, headers={"accept": "application/json"})
            wait_until(
                lambda: [job.state for job in sync_jobs(engine)] == [JobState.DONE, JobState.DEAD],
                timeout=SYNC_TIMEOUT,
            )
            [dead] = self.failed_jobs(client, engine)
        # The member leaves at Mailman too (its own List-Unsubscribe): nothing left to do.
        with rest_client(mailman_core) as rest:
            assert rest.delete(f"/lists/{mailman_list}/member/{address}").status_code == 204
        looked = newsletter(
            "reconcile", "--list", "bluehats", "--json",
            database_url=database_url, backend=backend, tmp_path=tmp_path,
        )  # fmt: skip
        # A look changes nothing; --apply puts it to rest.
        assert (json.loads(looked.stdout)["in_sync"], json.loads(looked.stdout)["superseded"]) == (
            True,
            0,
        )
        assert [job.state for job in sync_jobs(engine)] == [JobState.DONE, JobState.DEAD]
        fixed = newsletter(
            "reconcile", "--list", "bluehats", "--json", "--apply",
            database_url=database_url, backend=backend, tmp_path=tmp_path,
        )  # fmt: skip
        assert json.loads(fixed.stdout)["superseded"] == 1, fixed.stdout + fixed.stderr
        assert [job.state for job in sync_jobs(engine)] == [JobState.DONE, JobState.DONE]
        [(died, _), (rested, how)] = self.attempts(engine, dead["id"])
        assert (died, rested) == ("dead", "superseded")
        assert "not subscribed at the backend" in str(how)
        with TestClient(create_app(service_settings(database_url, smtp, backend))) as client:
            assert self.failed_jobs(client, engine) == []


# Taking over a list: the operator's commands, as operators run them -----------------------


def newsletter(
    *args: str, database_url: str, backend: MailmanBackendSettings, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """`newsletter ...` in a subprocess, on this checkout's code (PYTHONPATH), configured
    by the environment with list 'bluehats' on Mailman."""
    declared = {
        "slug": "bluehats",
        "name": "Gazette BlueHats",
        "backend": {
            "kind": "mailman",
            "base_url": str(backend.base_url),
            "username": backend.username,
            "password": backend.password.get_secret_value(),
            "list_id": backend.list_id,
        },
    }
    env = {key: value for key, value in os.environ.items() if not key.startswith("NEWSLETTER_")}
    env.update(
        NEWSLETTER_DATABASE_URL=database_url,
        NEWSLETTER_SECRET_KEY=SECRET,
        NEWSLETTER_LISTS=json.dumps([declared]),
        NEWSLETTER_LOG_LEVEL="WARNING",
        PYTHONPATH=str(REPO_ROOT),
    )
    return subprocess.run(
        [str(Path(sys.executable).with_name("newsletter")), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestTakingOverAList:
    def test_a_members_display_name_is_kept_as_its_name(
        self,
        database_url: str,
        engine: sa.Engine,
        mailman_core: MailmanCore,
        mailman_list: str,
        tmp_path: Path,
    ) -> None:
        subscribe_directly(
            mailman_core, mailman_list, "ada@example.org", display_name="Ada Lovelace"
        )
        subscribe_directly(mailman_core, mailman_list, "bob@example.org")
        done = newsletter(
            "import-backend", "--list", "bluehats",
            database_url=database_url, backend=settings_for(mailman_core, mailman_list),
            tmp_path=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        with Session(engine) as session:
            attributes = {
                row.email: row.attributes for row in session.exec(select(Subscription)).all()
            }
        assert attributes == {"ada@example.org": {"name": "Ada Lovelace"}, "bob@example.org": {}}

    def test_a_member_held_with_an_ascii_domain_is_imported_and_kept(
        self,
        database_url: str,
        engine: sa.Engine,
        smtp: SmtpSink,
        mailman_core: MailmanCore,
        mailman_list: str,
        tmp_path: Path,
    ) -> None:
        unicode_form, ascii_form = unique_idn("jo2")
        subscribe_directly(mailman_core, mailman_list, ascii_form)
        backend = settings_for(mailman_core, mailman_list)

        done = newsletter(
            "import-backend", "--list", "bluehats",
            database_url=database_url, backend=backend, tmp_path=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "imported 1 confirmed and 0 unsubscribed" in done.stdout
        with Session(engine) as session:
            [row] = session.exec(select(Subscription)).all()
        # Stored as any address typed here: the domain in Unicode.
        assert (row.email, row.status) == (unicode_form, "confirmed")

        report = newsletter(
            "reconcile", "--list", "bluehats", "--json",
            database_url=database_url, backend=backend, tmp_path=tmp_path,
        )  # fmt: skip
        assert report.returncode == 0, report.stdout + report.stderr
        assert json.loads(report.stdout)["extra"] == []

        # The import's sync (the member's unsubscribe link) reaches Mailman: the same member.
        settings = service_settings(database_url, smtp, backend)
        worker = Worker(
            engine=engine, settings=settings, mailer=make_mailer(settings.mailer), name="t"
        )
        try:
            for _ in range(5):
                worker.run_once()
        finally:
            worker.stop()
        assert [job.state for job in sync_jobs(engine)] == [JobState.DONE]
        assert emails(mailman_core, mailman_list) == [ascii_form]
        again = newsletter(
            "reconcile", "--list", "bluehats",
            database_url=database_url, backend=backend, tmp_path=tmp_path,
        )  # fmt: skip
        assert again.returncode == 0, again.stdout + again.stderr
        assert "in sync" in again.stdout

    def test_a_member_who_left_at_mailman_is_reported_never_added_back(
        self,
        database_url: str,
        engine: sa.Engine,
        smtp: SmtpSink,
        mailman_core: MailmanCore,
        mailman_list: str,
        tmp_path: Path,
    ) -> None:
        address = unique("left-there")
        subscribe_directly(mailman_core, mailman_list, address)
        backend = settings_for(mailman_core, mailman_list)
        done = newsletter(
            "import-backend", "--list", "bluehats",
            database_url=database_url, backend=backend, tmp_path=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        # The worker runs the import's sync (the member's link): the member is at Mailman
        # by this service's doing, then leaves there.
        with TestClient(create_app(service_settings(database_url, smtp, backend))):
            wait_until(
                lambda: [job.state for job in sync_jobs(engine)] == [JobState.DONE],
                timeout=SYNC_TIMEOUT,
            )
        jobs = len(sync_jobs(engine))
        # The member leaves through Mailman itself (its List-Unsubscribe, Postorius).
        with rest_client(mailman_core) as client:
            assert client.delete(f"/lists/{mailman_list}/member/{address}").status_code == 204

        for apply in ((), ("--apply",)):
            report = newsletter(
                "reconcile", "--list", "bluehats", "--json", *apply,
                database_url=database_url, backend=backend, tmp_path=tmp_path,
            )  # fmt: skip
            assert report.returncode == (0 if apply else 3), report.stdout + report.stderr
            found = json.loads(report.stdout)
            assert (found["absent_there"], found["missing"]) == ([address], [])
        assert len(sync_jobs(engine)) == jobs
        assert emails(mailman_core, mailman_list) == []

    def test_a_member_whose_delivery_mailman_disabled_is_reported_and_kept(
        self,
        database_url: str,
        engine: sa.Engine,
        smtp: SmtpSink,
        mailman_core: MailmanCore,
        mailman_list: str,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        bouncing, fine = unique("bouncing"), unique("fine")
        for address in (bouncing, fine):
            subscribe_directly(mailman_core, mailman_list, address)
        backend = settings_for(mailman_core, mailman_list)
        done = newsletter(
            "import-backend", "--list", "bluehats",
            database_url=database_url, backend=backend, tmp_path=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        disable(mailman_core, mailman_list, bouncing, "by_bounces")

        # The operator's report: named with the reason, in sync all the same (exit 0).
        report = newsletter(
            "reconcile", "--list", "bluehats", "--json",
            database_url=database_url, backend=backend, tmp_path=tmp_path,
        )  # fmt: skip
        assert report.returncode == 0, report.stdout + report.stderr
        found = json.loads(report.stdout)
        assert found["delivery_disabled"] == {bouncing: "by_bounces"}
        assert (found["missing"], found["extra"], found["absent_there"]) == ([], [], [])
        printed = newsletter(
            "reconcile", "--list", "bluehats",
            database_url=database_url, backend=backend, tmp_path=tmp_path,
        )  # fmt: skip
        assert "1 subscribed at the backend, delivery disabled there" in printed.stdout
        assert f"{bouncing} (by_bounces)" in printed.stdout
        # The audit log of those runs counts them, and keeps no address.
        with Session(engine) as session:
            audited = session.exec(
                select(AuditEvent.detail).where(AuditEvent.action == "list.reconcile")
            ).all()
        assert [detail["delivery_disabled"] for detail in audited] == [1, 1]
        assert "@" not in json.dumps(audited)

        # The worker's reconciliation: counted and named, masked, in its log.
        settings = service_settings(database_url, smtp, backend)
        with caplog.at_level("INFO"), TestClient(create_app(settings)) as client:
            asked = client.post(
                "/v1/admin/lists/bluehats/reconcile",
                headers=api_key_headers(engine, "ops", KeyScope.WRITE),
            )
            assert asked.status_code == 202, asked.text
            wait_until(
                lambda: any("reconcile.done" in r.getMessage() for r in caplog.records),
                timeout=SYNC_TIMEOUT,
            )
        said = [r.getMessage() for r in caplog.records if "delivery_disabled" in r.getMessage()]
        assert any("delivery_disabled=1" in line for line in said), said
        masked = f"{bouncing[0]}***@example.com (by_bounces)"
        assert any(masked in line for line in said), said
        assert not any(bouncing in line for line in said), said
        # Still a member at Mailman, still confirmed here.
        assert sorted(emails(mailman_core, mailman_list)) == sorted([bouncing, fine])
        with Session(engine) as session:
            statuses = session.exec(select(Subscription.status)).all()
        assert sorted(statuses) == ["confirmed", "confirmed"]


class TestAnAddressMailmanRefusesAtSignUp:
    """Mailman's address check is narrower than this service's: such an address is refused
    when it is given for a Mailman list, not confirmed and then never mailed (its sync could
    only fail). No core is needed: nothing reaches the backend before a confirmation."""

    @pytest.fixture
    def client(self, database_url: str, smtp: SmtpSink) -> Iterator[TestClient]:
        mailman = MailmanBackendSettings(
            base_url=f"http://127.0.0.1:{free_port()}/3.1",
            username="restadmin",
            password="restpass",
            list_id="bluehats.lists.example.org",
        )
        settings = make_settings(
            database_url,
            smtp_port=smtp.port,
            lists=[
                {"slug": "bluehats", "name": "Gazette BlueHats", "backend": mailman},
                {"slug": "plain", "name": "Sans serveur de listes"},
            ],
        )
        with TestClient(create_app(settings)) as test_client:
            yield test_client

    @staticmethod
    def stored(engine: sa.Engine) -> list[str]:
        with Session(engine) as session:
            return list(session.exec(select(Subscription.email)).all())

    @pytest.mark.parametrize(
        ("local", "named"), [("jöhn", "ö"), ("ÉLODIE.Straße", "Éß"), ("a^b|c", "^|")]
    )
    def test_an_api_caller_gets_a_422_naming_the_characters_and_nothing_is_mailed(
        self, client: TestClient, engine: sa.Engine, smtp: SmtpSink, local: str, named: str
    ) -> None:
        response = client.post(
            "/v1/lists/bluehats/subscriptions", json={"email": f"{local}@example.org"}
        )
        assert response.status_code == 422, response.text
        assert response.json() == {
            "error": "validation_error",
            "detail": f"email: this list's mailing-list server takes no {named!r} before the "
            "@-sign; use another address",
        }
        assert self.stored(engine) == []
        # A list without Mailman takes the same address.
        taken = client.post("/v1/lists/plain/subscriptions", json={"email": f"{local}@example.org"})
        assert taken.status_code == 202, taken.text
        smtp.wait_for(1)
        assert [m["To"] for m in smtp.messages] == [f"{local}@example.org"]

    def test_an_address_mailman_takes_is_accepted(
        self, client: TestClient, engine: sa.Engine
    ) -> None:
        # ASCII atext, and an internationalized domain: Mailman gets it in ASCII.
        for address in ("o'brien+news@example.org", "jo@exämple.org"):
            response = client.post("/v1/lists/bluehats/subscriptions", json={"email": address})
            assert response.status_code == 202, response.text
        assert sorted(self.stored(engine)) == ["jo@exämple.org", "o'brien+news@example.org"]

    def test_an_address_with_spaces_around_it_is_accepted(
        self, client: TestClient, engine: sa.Engine
    ) -> None:
        # Pasted with a space before it: the space is no part of the address, as every
        # other list takes it, and Mailman never sees it.
        response = client.post(
            "/v1/lists/bluehats/subscriptions", json={"email": " ada@example.org"}
        )
        assert response.status_code == 202, response.text
        form = client.post(
            "/v1/lists/bluehats/subscriptions",
            data={"email": "  jo@exämple.org ", "locale": "fr"},
            headers={"accept": "text/html,application/xhtml+xml"},
            follow_redirects=False,
        )
        assert form.status_code == 303, form.text
        assert sorted(self.stored(engine)) == ["ada@example.org", "jo@exämple.org"]

    @pytest.mark.parametrize(
        ("lang", "said"),
        [
            ("fr", "Cette liste ne peut pas recevoir d'adresse contenant « ö » avant le @"),
            ("en", "This list cannot take an address with “ö” before the @"),
        ],
    )
    def test_the_form_comes_back_with_the_reason_beside_the_address(
        self, client: TestClient, engine: sa.Engine, lang: str, said: str
    ) -> None:
        response = client.post(
            "/v1/lists/bluehats/subscriptions",
            data={"email": "jöhn@example.org", "locale": lang},
            headers={"accept": "text/html,application/xhtml+xml"},
            follow_redirects=False,
        )
        assert response.status_code == 422
        assert response.headers["content-type"].startswith("text/html")
        assert f'<html lang="{lang}">' in response.text
        assert 'value="jöhn@example.org"' in response.text
        assert 'aria-invalid="true"' in response.text
        assert 'id="field-email-error"' in response.text
        assert said in html.unescape(response.text)
        assert self.stored(engine) == []
        # A form post that does not ask for HTML gets the API's answer.
        plain = client.post(
            "/v1/lists/bluehats/subscriptions",
            data={"email": "jöhn@example.org"},
            follow_redirects=False,
        )
        assert plain.status_code == 422
        assert "takes no 'ö' before the @-sign" in plain.json()["detail"]

    def test_an_operator_cannot_add_it_to_the_list(
        self, client: TestClient, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        evidence = {"source": "paper form", "note": "no. 7", "consented_at": "2025-06-01"}
        for mode, extra in (("invite", {}), ("confirmed", {"evidence": evidence})):
            response = client.post(
                "/v1/admin/lists/bluehats/subscribers",
                json={"email": "jöhn@example.org", "mode": mode, **extra},
                headers=write_key,
            )
            assert response.status_code == 422, response.text
            assert response.json()["detail"] == (
                "email: this list's mailing-list server takes no 'ö' before the @-sign; "
                "use another address"
            )
        assert self.stored(engine) == []

    def test_an_import_refuses_its_row_and_takes_the_others(
        self, client: TestClient, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        body = (
            "email,consent_source,consent_date\n"
            "ada@example.org,paper form,2025-03-12\n"
            "jöhn@example.org,paper form,2025-03-12\n"
        )
        response = client.post(
            "/v1/admin/lists/bluehats/import",
            content=body.encode(),
            headers={**write_key, "content-type": "text/csv"},
        )
        assert response.status_code == 200, response.text
        report = response.json()
        assert [(error["line"], error["error"]) for error in report["errors"]] == [
            (
                3,
                "email is refused: this list's mailing-list server takes no 'ö' before the "
                "@-sign; use another address.",
            )
        ]
        assert self.stored(engine) == ["ada@example.org"]

    def test_the_command_line_refuses_it_too(
        self, database_url: str, engine: sa.Engine, tmp_path: Path
    ) -> None:
        lists = [
            {
                "slug": "bluehats",
                "name": "Gazette BlueHats",
                "backend": {
                    "kind": "mailman",
                    "base_url": f"http://127.0.0.1:{free_port()}/3.1",
                    "username": "restadmin",
                    "password": "restpass",
                    "list_id": "bluehats.lists.example.org",
                },
            }
        ]
        env = {
            **os.environ,
            "NEWSLETTER_DATABASE_URL": database_url,
            "NEWSLETTER_SECRET_KEY": SECRET,
            "NEWSLETTER_LOG_LEVEL": "WARNING",
            "NEWSLETTER_LISTS": json.dumps(lists),
        }
        newsletter = str(Path(sys.executable).with_name("newsletter"))
        added = subprocess.run(
            [newsletter, "subscriber", "add", "jöhn@example.org", "--list", "bluehats"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert added.returncode == 2, added.stderr
        assert added.stderr.strip() == (
            "jöhn@example.org: this list's mailing-list server takes no 'ö' before the "
            "@-sign; use another address"
        )
        (tmp_path / "members.csv").write_text(
            "email,consent_source,consent_date\n"
            "ada@example.org,paper form,2025-03-12\n"
            "jöhn@example.org,paper form,2025-03-12\n",
            encoding="utf-8",
        )
        imported = subprocess.run(
            [newsletter, "import", "members.csv", "--list", "bluehats"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert "takes no 'ö' before the @-sign" in imported.stdout + imported.stderr
        assert self.stored(engine) == ["ada@example.org"]
