"""The Mailgun adapter against a fake Mailgun served over real HTTP (tests/fake_mailgun.py):
what the server saw, what it holds afterwards, and how each failure reaches the worker."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from app.backends import make_backend, make_client
from app.backends.base import Member, PermanentSyncError, RetryableSyncError
from app.backends.mailgun import MailgunBackend
from app.config import MailgunBackendSettings
from app.sync import read_backend
from tests.conftest import free_port
from tests.fake_mailgun import FakeMailgun

LIST = "bluehats@mail.codegouv.fr"
DOMAIN = "mail.codegouv.fr"
FORM = "application/x-www-form-urlencoded"


def member(email: str, **overrides: Any) -> Member:
    values: dict[str, Any] = {
        "email": email,
        "locale": "fr",
        "unsubscribe_url": f"http://testserver/v1/unsubscribe/tok-{email}",
    }
    values.update(overrides)
    return Member(**values)


def backend_settings(base_url: str, **overrides: Any) -> MailgunBackendSettings:
    values: dict[str, Any] = {
        "list_address": LIST,
        "api_key": FakeMailgun.api_key,
        "base_url": base_url,
    }
    values.update(overrides)
    return MailgunBackendSettings(**values)


@pytest.fixture
def fake() -> FakeMailgun:
    server = FakeMailgun()
    server.create_list(LIST)
    return server


@pytest.fixture
def base_url(fake: FakeMailgun) -> Iterator[str]:
    with fake.serve() as url:
        yield url


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with make_client(connect_timeout=2, timeout=5) as http:
        yield http


@pytest.fixture
def backend(base_url: str, client: httpx.Client) -> MailgunBackend:
    made = make_backend(backend_settings(base_url), client)
    assert isinstance(made, MailgunBackend)
    return made


class TestAdd:
    def test_one_member_is_a_form_post_with_its_variables_as_json(
        self, backend: MailgunBackend, fake: FakeMailgun
    ) -> None:
        answer = backend.add(
            [
                member(
                    "Camille.Martin+news@example.org",
                    name="Camille Martin",
                    attributes={"organisation": "DINUM"},
                )
            ]
        )

        assert answer == "mailgun: Mailing list member has been created"
        [seen] = fake.seen()
        assert seen.method == "POST"
        assert seen.raw_path == "/v3/lists/bluehats@mail.codegouv.fr/members"
        assert seen.auth == ("api", FakeMailgun.api_key)
        assert seen.content_type == FORM
        assert seen.form == {
            "address": "Camille.Martin+news@example.org",
            "name": "Camille Martin",
            "vars": seen.form["vars"],
            "subscribed": "yes",
            "upsert": "yes",
        }
        assert json.loads(seen.form["vars"]) == {
            "organisation": "DINUM",
            "locale": "fr",
            "unsubscribe_url": "http://testserver/v1/unsubscribe/tok-Camille.Martin+news@example.org",
        }
        stored = fake.member(LIST, "camille.martin+news@example.org")
        assert stored is not None
        assert stored.subscribed is True
        assert stored.vars["unsubscribe_url"].endswith("tok-Camille.Martin+news@example.org")

    def test_a_member_without_a_name_sends_no_name_field(
        self, backend: MailgunBackend, fake: FakeMailgun
    ) -> None:
        backend.add([member("anon@example.org")])
        [seen] = fake.seen()
        assert "name" not in seen.form

    def test_2500_members_go_in_three_bulk_calls_of_at_most_1000(
        self, backend: MailgunBackend, fake: FakeMailgun
    ) -> None:
        members = [member(f"m{i:04d}@example.org", name=f"M {i}") for i in range(2500)]

        answer = backend.add(members)

        calls = fake.seen()
        assert [(c.method, c.raw_path) for c in calls] == [
            ("POST", "/v3/lists/bluehats@mail.codegouv.fr/members.json")
        ] * 3
        batches = [json.loads(call.form["members"]) for call in calls]
        assert [len(batch) for batch in batches] == [1000, 1000, 500]
        assert all(call.form["upsert"] == "yes" for call in calls)
        assert all(call.auth == ("api", FakeMailgun.api_key) for call in calls)
        assert batches[0][0] == {
            "address": "m0000@example.org",
            "name": "M 0",
            "vars": {
                "locale": "fr",
                "unsubscribe_url": "http://testserver/v1/unsubscribe/tok-m0000@example.org",
            },
            "subscribed": True,
        }
        sent = [entry["address"] for batch in batches for entry in batch]
        assert sent == [m.email for m in members]
        assert len(fake.members_of(LIST)) == 2500
        assert answer.count("Mailing list has been updated") == 3

    def test_adding_twice_keeps_one_member_with_the_latest_variables(
        self, backend: MailgunBackend, fake: FakeMailgun
    ) -> None:
        backend.add([member("twice@example.org", locale="fr")])
        backend.add([member("twice@example.org", locale="en")])
        backend.add([member("twice@example.org", locale="en"), member("other@example.org")])
        backend.add([member("twice@example.org", locale="fr"), member("other@example.org")])

        assert sorted(m.address for m in fake.members_of(LIST)) == [
            "other@example.org",
            "twice@example.org",
        ]
        stored = fake.member(LIST, "twice@example.org")
        assert stored is not None
        assert stored.vars["locale"] == "fr"

    def test_adding_brings_back_a_member_unsubscribed_at_mailgun(
        self, backend: MailgunBackend, fake: FakeMailgun
    ) -> None:
        backend.add([member("back@example.org")])
        backend.unsubscribe("back@example.org")
        backend.add([member("back@example.org")])
        stored = fake.member(LIST, "back@example.org")
        assert stored is not None
        assert stored.subscribed is True

    def test_the_fake_refuses_more_than_1000_members_in_one_call(
        self, base_url: str, client: httpx.Client
    ) -> None:
        # Keeps the fake honest: Mailgun documents "up to 1000 per call".
        response = client.post(
            f"{base_url}/v3/lists/{LIST}/members.json",
            auth=("api", FakeMailgun.api_key),
            data={
                "members": json.dumps([f"m{i}@example.org" for i in range(1001)]),
                "upsert": "yes",
            },
        )
        assert response.status_code == 400
        assert "1000" in response.json()["message"]

    def test_a_wrong_api_key_is_permanent(self, base_url: str, client: httpx.Client) -> None:
        wrong = MailgunBackend(backend_settings(base_url, api_key="key-wrong"), client)
        with pytest.raises(PermanentSyncError) as caught:
            wrong.add([member("a@example.org")])
        assert caught.value.response == "401 Forbidden"


class TestLeave:
    def test_unsubscribe_sets_subscribed_no_and_keeps_the_member(
        self, backend: MailgunBackend, fake: FakeMailgun
    ) -> None:
        backend.add([member("Leaving+tag@example.org")])

        answer = backend.unsubscribe("Leaving+tag@example.org")

        assert answer == "mailgun: Mailing list member has been updated"
        seen = fake.seen()[-1]
        assert seen.method == "PUT"
        # `+` is percent-encoded, so no server reads it as a space.
        assert seen.raw_path == (
            "/v3/lists/bluehats@mail.codegouv.fr/members/Leaving%2Btag@example.org"
        )
        assert seen.path == "/v3/lists/bluehats@mail.codegouv.fr/members/Leaving+tag@example.org"
        assert seen.form == {"subscribed": "no"}
        assert seen.auth == ("api", FakeMailgun.api_key)
        stored = fake.member(LIST, "leaving+tag@example.org")
        assert stored is not None
        assert stored.subscribed is False
        assert stored.vars["locale"] == "fr"

    def test_remove_deletes_the_member(self, backend: MailgunBackend, fake: FakeMailgun) -> None:
        backend.add([member("erase@example.org")])

        answer = backend.remove("erase@example.org")

        assert answer == "mailgun: Mailing list member has been deleted"
        seen = fake.seen()[-1]
        assert (seen.method, seen.raw_path) == (
            "DELETE",
            "/v3/lists/bluehats@mail.codegouv.fr/members/erase@example.org",
        )
        assert fake.member(LIST, "erase@example.org") is None

    @pytest.mark.parametrize("operation", ["unsubscribe", "remove"])
    def test_a_non_member_is_nothing_to_do(
        self, backend: MailgunBackend, fake: FakeMailgun, operation: str
    ) -> None:
        answer = getattr(backend, operation)("stranger@example.org")
        assert answer.startswith("mailgun: not a member")
        # The member's 404, then a look at the list, which is there.
        assert [(seen.method, seen.raw_path) for seen in fake.seen()][1:] == [
            ("GET", "/v3/lists/bluehats@mail.codegouv.fr")
        ]

    @pytest.mark.parametrize("operation", ["unsubscribe", "remove"])
    def test_a_list_mailgun_does_not_have_is_no_departure_done(
        self, base_url: str, client: httpx.Client, fake: FakeMailgun, operation: str
    ) -> None:
        # Mailgun answers a list it does not have with a JSON 404, as for a non-member.
        settings = backend_settings(base_url).model_copy(
            update={"list_address": "typo@mail.codegouv.fr"}
        )
        lost = MailgunBackend(settings, client)
        with pytest.raises(PermanentSyncError) as caught:
            getattr(lost, operation)("member@example.org")
        assert "no list typo@mail.codegouv.fr at Mailgun" in str(caught.value)

    def test_a_bare_404_means_a_wrong_base_url_not_a_missing_member(
        self, base_url: str, client: httpx.Client
    ) -> None:
        lost = MailgunBackend(backend_settings(base_url + "/not-mailgun"), client)
        with pytest.raises(PermanentSyncError) as caught:
            lost.remove("someone@example.org")
        assert "base_url" in str(caught.value)
        assert caught.value.response == "404 404 page not found"


class TestMembers:
    def test_paging_follows_paging_next_until_an_empty_page(
        self, backend: MailgunBackend, fake: FakeMailgun
    ) -> None:
        backend.add([member(f"p{i:03d}@example.org") for i in range(250)])
        backend.unsubscribe("p007@example.org")
        requests_before = len(fake.seen())

        seen: list[str] = []
        subscribed: dict[str, bool] = {}
        cursor = None
        pages = 0
        while True:
            page = backend.members(cursor)
            pages += 1
            seen.extend(m.email for m in page.members)
            subscribed.update({m.email: m.subscribed for m in page.members})
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
            assert pages < 10

        assert seen == [f"p{i:03d}@example.org" for i in range(250)]
        assert subscribed["p007@example.org"] is False
        assert subscribed["p008@example.org"] is True
        calls = fake.seen()[requests_before:]
        assert [c.raw_path for c in calls] == [
            "/v3/lists/bluehats@mail.codegouv.fr/members/pages"
        ] * 4
        assert calls[0].query == {"limit": "100"}
        assert calls[1].query == {"limit": "100", "page": "next", "address": "p099@example.org"}
        assert calls[3].query["address"] == "p249@example.org"
        assert all(c.method == "GET" and c.auth == ("api", FakeMailgun.api_key) for c in calls)

    def test_a_read_whose_paging_does_not_advance_stops_with_a_permanent_error(
        self, backend: MailgunBackend, fake: FakeMailgun
    ) -> None:
        # A cache in front of the API that ignores the query string: the first page, with
        # the same `paging.next`, for every page asked. The read went on for ever (the
        # worker's reconciliation renewing its lease at every page).
        first = {
            "items": [{"address": "a@example.org", "name": "", "subscribed": True, "vars": {}}],
            "paging": {
                "next": f"https://api.eu.mailgun.net/v3/lists/{LIST}/members/pages"
                "?page=next&address=a%40example.org&limit=100"
            },
        }
        fake.answer_oddly(
            body=json.dumps(first).encode(),
            headers={"content-type": "application/json"},
            times=50,
        )
        with pytest.raises(PermanentSyncError) as caught:
            read_backend(backend)
        assert "paging does not advance" in str(caught.value)
        assert "a@example.org" not in str(caught.value)
        assert len(fake.seen()) == 2

    def test_an_empty_list_is_one_page(self, backend: MailgunBackend) -> None:
        page = backend.members()
        assert page.members == []
        assert page.next_cursor is None


class TestSuppressions:
    def test_a_fresh_opt_in_clears_unsubscribes_and_bounces(
        self, backend: MailgunBackend, fake: FakeMailgun
    ) -> None:
        fake.suppress("unsubscribes", DOMAIN, "again@example.org")
        fake.suppress("bounces", DOMAIN, "again@example.org")

        answer = backend.clear_suppression("again@example.org")

        assert answer == "mailgun: removed from unsubscribes and bounces of mail.codegouv.fr"
        assert [(c.method, c.raw_path) for c in fake.seen()] == [
            ("DELETE", "/v3/mail.codegouv.fr/unsubscribes/again@example.org"),
            ("DELETE", "/v3/mail.codegouv.fr/bounces/again@example.org"),
        ]
        assert not fake.suppressed("unsubscribes", DOMAIN, "again@example.org")
        assert not fake.suppressed("bounces", DOMAIN, "again@example.org")

    def test_only_what_was_there_is_reported(
        self, backend: MailgunBackend, fake: FakeMailgun
    ) -> None:
        fake.suppress("bounces", DOMAIN, "bounced@example.org")
        answer = backend.clear_suppression("bounced@example.org")
        assert answer == "mailgun: removed from bounces of mail.codegouv.fr"

    def test_nothing_to_clear_is_none(self, backend: MailgunBackend, fake: FakeMailgun) -> None:
        assert backend.clear_suppression("clean@example.org") is None
        assert len(fake.seen()) == 2

    def test_switched_off_it_makes_no_call(
        self, base_url: str, client: httpx.Client, fake: FakeMailgun
    ) -> None:
        fake.suppress("unsubscribes", DOMAIN, "kept@example.org")
        quiet = MailgunBackend(backend_settings(base_url, clear_suppressions=False), client)
        assert quiet.clear_suppression("kept@example.org") is None
        assert fake.seen() == []
        assert fake.suppressed("unsubscribes", DOMAIN, "kept@example.org")


OPERATIONS: dict[str, Callable[[MailgunBackend], object]] = {
    "add": lambda b: b.add([member("x@example.org")]),
    "bulk add": lambda b: b.add([member("x@example.org"), member("y@example.org")]),
    "unsubscribe": lambda b: b.unsubscribe("x@example.org"),
    "remove": lambda b: b.remove("x@example.org"),
    "members": lambda b: b.members(),
    "clear_suppression": lambda b: b.clear_suppression("x@example.org"),
}


class TestFailures:
    def test_an_answer_without_a_message_is_kept_without_the_members_link_token(self) -> None:
        # Mailgun answers an added member with it, vars included; without a `message` the
        # body is what the attempt log keeps, which a read key reads.
        answer = {"member": {"address": "ada@example.org", "vars": member("ada").variables()}}

        def mailgun(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, json=answer)

        with httpx.Client(transport=httpx.MockTransport(mailgun)) as http:
            made = make_backend(backend_settings("http://127.0.0.1:9"), http)
            kept = made.add([member("ada@example.org")])
        assert "/v1/unsubscribe/<redacted>" in kept
        assert "tok-ada" not in kept

    @pytest.mark.parametrize("operation", OPERATIONS)
    def test_503_is_retryable(
        self, backend: MailgunBackend, fake: FakeMailgun, operation: str
    ) -> None:
        fake.fail(status=503)
        with pytest.raises(RetryableSyncError) as caught:
            OPERATIONS[operation](backend)
        assert caught.value.response is not None
        assert caught.value.response.startswith("503 ")
        assert caught.value.retry_after is None
        # The next call goes through.
        OPERATIONS[operation](backend)

    @pytest.mark.parametrize("operation", OPERATIONS)
    @pytest.mark.parametrize(
        ("body", "content_type"),
        [
            # A proxy's or a login page's answer in front of the API.
            (b"<html><body><h1>Welcome</h1></body></html>", "text/html"),
            # Mailgun's answer cut short.
            (b'{"member": {"address": "x@example.org", "na', "application/json"),
        ],
        ids=["html", "truncated json"],
    )
    def test_a_200_that_is_not_mailguns_json_is_not_taken_for_done(
        self,
        backend: MailgunBackend,
        fake: FakeMailgun,
        operation: str,
        body: bytes,
        content_type: str,
    ) -> None:
        # Mailgun answers every call with a JSON object: a 200 without one did nothing
        # that can be told, and a job taking it for done would hold a member as added (or
        # gone) that Mailgun never saw.
        fake.answer_oddly(status=200, body=body, headers={"content-type": content_type})
        with pytest.raises(PermanentSyncError) as caught:
            OPERATIONS[operation](backend)
        said = str(caught.value)
        assert "not Mailgun's JSON" in said or said == "mailgun list members: unexpected answer"
        assert caught.value.response == "200 " + body.decode()
        assert fake.members_of(LIST) == []

    @pytest.mark.parametrize("status", [301, 302, 307, 308])
    def test_a_redirect_is_not_followed_and_says_where_it_led(
        self, backend: MailgunBackend, fake: FakeMailgun, status: int
    ) -> None:
        # http:// to https://, or to another host: the API key would go along; the
        # operator is to fix base_url, and needs to know what it should be.
        elsewhere = f"https://127.0.0.1:{free_port()}/v3/lists/{LIST}/members"
        fake.answer_oddly(status=status, body=b"", headers={"location": elsewhere})
        with pytest.raises(PermanentSyncError) as caught:
            backend.add([member("moved@example.org")])
        assert str(caught.value) == (
            f"mailgun add member: HTTP {status}, redirected to {elsewhere}: redirects are "
            "not followed (is base_url right?)"
        )
        assert caught.value.status == status
        assert len(fake.seen()) == 1

    @pytest.mark.parametrize("operation", OPERATIONS)
    def test_a_body_not_in_the_encoding_its_headers_name_is_retryable(
        self, backend: MailgunBackend, fake: FakeMailgun, operation: str
    ) -> None:
        # httpx's DecodingError is no TransportError: it left the adapter as it was, and
        # the worker's round failed whole, every job of it left leased.
        fake.answer_oddly(
            status=200,
            body=b"this is not gzip",
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )
        with pytest.raises(RetryableSyncError) as caught:
            OPERATIONS[operation](backend)
        assert isinstance(caught.value.__cause__, httpx.DecodingError)
        assert "DecodingError" in str(caught.value)
        # The next call goes through.
        OPERATIONS[operation](backend)

    def test_429_with_retry_after_says_when_to_come_back(
        self, backend: MailgunBackend, fake: FakeMailgun
    ) -> None:
        fake.throttle(retry_after="7")
        with pytest.raises(RetryableSyncError) as caught:
            backend.add([member("busy@example.org")])
        assert caught.value.retry_after == 7
        assert "HTTP 429" in str(caught.value)

    def test_400_is_permanent_with_what_mailgun_said(
        self, backend: MailgunBackend, fake: FakeMailgun
    ) -> None:
        fake.reject("bad@example.org", message="'bad@example.org' is not a valid address")
        with pytest.raises(PermanentSyncError) as caught:
            backend.add([member("bad@example.org")])
        assert caught.value.response == (
            '400 {"message":"\'bad@example.org\' is not a valid address"}'
        )
        assert "HTTP 400" in str(caught.value)

    def test_one_refused_address_fails_its_bulk_call(
        self, backend: MailgunBackend, fake: FakeMailgun
    ) -> None:
        # The worker then retries the batch one by one (app/sync.py).
        fake.reject("bad@example.org")
        with pytest.raises(PermanentSyncError):
            backend.add([member("good@example.org"), member("bad@example.org")])

    @pytest.mark.parametrize("operation", OPERATIONS)
    def test_connection_refused_is_retryable(self, client: httpx.Client, operation: str) -> None:
        closed = MailgunBackend(backend_settings(f"http://127.0.0.1:{free_port()}"), client)
        with pytest.raises(RetryableSyncError) as caught:
            OPERATIONS[operation](closed)
        assert isinstance(caught.value.__cause__, httpx.ConnectError)

    def test_a_timeout_is_retryable(self, base_url: str, fake: FakeMailgun) -> None:
        fake.stall(seconds=1)
        with make_client(connect_timeout=1, timeout=0.2) as impatient:
            slow = MailgunBackend(backend_settings(base_url), impatient)
            with pytest.raises(RetryableSyncError) as caught:
                slow.add([member("slow@example.org")])
        assert "timed out" in str(caught.value)
        assert isinstance(caught.value.__cause__, httpx.TimeoutException)


class TestDeadline:
    """An answer trickled in small pieces stays within the timeout of each read; each call
    as a whole still ends at NEWSLETTER_BACKEND_TIMEOUT (1 s here), its connection closed."""

    @pytest.fixture
    def patient(self, base_url: str) -> Iterator[MailgunBackend]:
        with make_client(connect_timeout=1, timeout=1) as http:
            yield MailgunBackend(backend_settings(base_url), http)

    def test_an_answer_trickled_past_the_deadline_is_abandoned_and_retryable(
        self, patient: MailgunBackend, fake: FakeMailgun
    ) -> None:
        fake.trickle(seconds=6)
        started = time.monotonic()
        with pytest.raises(
            RetryableSyncError,
            match=r"mailgun add member: timed out, abandoned at the call's deadline: no whole "
            r"answer within 1s \(NEWSLETTER_BACKEND_TIMEOUT\)",
        ):
            patient.add([member("patient@example.org")])
        elapsed = time.monotonic() - started
        assert 0.9 < elapsed < 1.6
        # The abandoned call had taken effect; the next one, with a deadline of its own, is
        # an upsert and finds the member there.
        assert "updated" in patient.add([member("patient@example.org")])
        assert [c.raw_path for c in fake.seen("POST")] == [
            "/v3/lists/bluehats@mail.codegouv.fr/members"
        ] * 2

    def test_each_page_of_a_read_has_a_deadline_of_its_own(
        self, patient: MailgunBackend, fake: FakeMailgun
    ) -> None:
        patient.add([member(f"p{i:03d}@example.org") for i in range(150)])
        # The first page comes in 0.7 s, within its deadline; the second would take 6 s.
        fake.trickle(seconds=0.7)
        fake.trickle(seconds=6)
        started = time.monotonic()
        with pytest.raises(RetryableSyncError, match=r"mailgun list members: .* deadline"):
            read_backend(patient)
        elapsed = time.monotonic() - started
        assert 1.6 < elapsed < 2.4
        assert [c.query.get("page") for c in fake.seen("GET")] == [None, "next"]


class TestRegion:
    @pytest.mark.parametrize(
        ("region", "host"),
        [("eu", "https://api.eu.mailgun.net"), ("us", "https://api.mailgun.net")],
    )
    def test_the_region_picks_the_api_host(
        self, client: httpx.Client, region: str, host: str
    ) -> None:
        settings = MailgunBackendSettings(list_address=LIST, api_key="k", region=region)
        assert MailgunBackend(settings, client).base == host

    def test_a_region_given_with_a_base_url_is_refused(self) -> None:
        with pytest.raises(ValidationError, match="region or base_url, not both"):
            MailgunBackendSettings(
                list_address=LIST, api_key="k", region="us", base_url="http://127.0.0.1:9"
            )
        # Either alone is fine; base_url alone replaces the default region's host.
        alone = MailgunBackendSettings(
            list_address=LIST, api_key="k", base_url="http://127.0.0.1:9"
        )
        assert alone.base_url is not None
