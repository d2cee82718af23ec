"""The listmonk adapter against a listmonk-shaped HTTP server on loopback (fake_listmonk)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from app.backends import make_backend, make_client
from app.backends.base import Member, PermanentSyncError, RetryableSyncError
from app.backends.http import excerpt
from app.backends.listmonk import ListmonkBackend
from app.config import ListmonkBackendSettings
from tests.conftest import free_port
from tests.fake_listmonk import FakeListmonk

LIST_ID = 3
OTHER_LIST = 7
API_TOKEN = FakeListmonk.token
AUTH = f"token sync-bot:{API_TOKEN}"


def settings_for(url: str, *, api_token: str = API_TOKEN) -> ListmonkBackendSettings:
    return ListmonkBackendSettings(
        base_url=url, username="sync-bot", api_token=api_token, list_id=LIST_ID
    )


def member(email: str = "ada@example.org") -> Member:
    return Member(
        email=email,
        locale="fr",
        unsubscribe_url=f"https://news.example.org/v1/unsubscribe/tok-{email.split('@')[0]}",
        name="Ada Lovelace",
    )


def lookup(email: str) -> dict[str, list[str]]:
    return {
        "query": [f"LOWER(subscribers.email) = '{email}'"],
        "page": ["1"],
        "per_page": ["1"],
    }


@pytest.fixture
def listmonk() -> Iterator[FakeListmonk]:
    with FakeListmonk() as fake:
        yield fake


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with make_client(connect_timeout=2, timeout=5) as client:
        yield client


@pytest.fixture
def backend(listmonk: FakeListmonk, http: httpx.Client) -> ListmonkBackend:
    made = make_backend(settings_for(listmonk.url), http)
    assert isinstance(made, ListmonkBackend)
    return made


class TestAdd:
    def test_new_member_is_created_confirmed_with_its_variables(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        answer = backend.add([member()])

        find, create = listmonk.seen()
        assert (find.method, find.path, find.query) == (
            "GET",
            "/api/subscribers",
            lookup("ada@example.org"),
        )
        assert (create.method, create.path) == ("POST", "/api/subscribers")
        assert create.json == {
            "email": "ada@example.org",
            "name": "Ada Lovelace",
            "status": "enabled",
            "lists": [LIST_ID],
            "attribs": {
                "locale": "fr",
                "unsubscribe_url": "https://news.example.org/v1/unsubscribe/tok-ada",
            },
            "preconfirm_subscriptions": True,
        }
        assert create.headers["content-type"] == "application/json"
        assert {r.headers["authorization"] for r in listmonk.seen()} == {AUTH}
        stored = listmonk.subscriber("ada@example.org")
        assert stored is not None
        assert stored["lists"] == {LIST_ID: "confirmed"}
        assert listmonk.optin_mails == []
        assert answer == f"listmonk: subscriber {stored['id']} created on list {LIST_ID}"

    def test_member_without_a_name_gets_the_local_part(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        backend.add([Member(email="grace@example.org", locale="en", unsubscribe_url="u")])

        [create] = listmonk.seen("POST")
        assert create.json["name"] == "grace"

    def test_existing_member_is_updated_and_resubscribed_not_duplicated(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        subscriber_id = listmonk.seed(
            "ada@example.org",
            name="A. Lovelace",
            attribs={"city": "Lyon", "unsubscribe_url": "https://old.example.org/u/1"},
            lists={LIST_ID: "unsubscribed", OTHER_LIST: "confirmed"},
        )

        answer = backend.add([member()])

        assert listmonk.calls() == [
            ("GET", "/api/subscribers"),
            ("PUT", "/api/subscribers/lists"),
            ("PUT", f"/api/subscribers/{subscriber_id}"),
        ]
        _, subscribe, update = listmonk.seen()
        assert subscribe.json == {
            "ids": [subscriber_id],
            "action": "add",
            "target_list_ids": [LIST_ID],
            "status": "confirmed",
        }
        assert update.json == {
            "email": "ada@example.org",
            "name": "Ada Lovelace",
            "status": "enabled",
            "lists": [LIST_ID, OTHER_LIST],
            "attribs": {
                "city": "Lyon",
                "locale": "fr",
                "unsubscribe_url": "https://news.example.org/v1/unsubscribe/tok-ada",
            },
            "preconfirm_subscriptions": False,
        }
        assert len(listmonk.subscribers) == 1
        stored = listmonk.subscriber("ada@example.org")
        assert stored is not None
        assert stored["lists"] == {LIST_ID: "confirmed", OTHER_LIST: "confirmed"}
        assert stored["name"] == "Ada Lovelace"
        assert stored["attribs"]["city"] == "Lyon"
        assert listmonk.optin_mails == []
        assert answer == f"listmonk: subscriber {subscriber_id} confirmed on list 3, updated"

    def test_second_add_of_the_same_member_only_looks_it_up(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        backend.add([member()])
        before = len(listmonk.seen())

        answer = backend.add([member()])

        assert listmonk.calls()[before:] == [("GET", "/api/subscribers")]
        assert answer.endswith("already up to date")
        assert len(listmonk.subscribers) == 1

    def test_address_with_a_quote_and_capitals_is_looked_up_safely(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        address = "Zoe.O'Brien@Example.org"

        backend.add([member(address)])
        backend.add([member(address)])
        backend.unsubscribe(address)

        finds = listmonk.seen("GET", "/api/subscribers")
        assert len(finds) == 3
        assert {tuple(r.query["query"]) for r in finds} == {
            ("LOWER(subscribers.email) = 'zoe.o''brien@example.org'",)
        }
        assert len(listmonk.seen("POST")) == 1
        assert len(listmonk.subscribers) == 1
        stored = listmonk.subscriber(address)
        assert stored is not None
        assert stored["lists"] == {LIST_ID: "unsubscribed"}

    def test_address_created_meanwhile_is_updated_after_the_409(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        subscriber_id = listmonk.seed("ada@example.org", lists={OTHER_LIST: "confirmed"})
        # The first lookup misses it, as if another writer created it right after.
        listmonk.fail(
            "GET",
            "/api/subscribers",
            200,
            body={"data": {"results": [], "query": "", "total": 0, "per_page": 1, "page": 1}},
        )

        backend.add([member()])

        assert listmonk.calls() == [
            ("GET", "/api/subscribers"),
            ("POST", "/api/subscribers"),
            ("GET", "/api/subscribers"),
            ("PUT", "/api/subscribers/lists"),
            ("PUT", f"/api/subscribers/{subscriber_id}"),
        ]
        assert len(listmonk.subscribers) == 1
        stored = listmonk.subscriber("ada@example.org")
        assert stored is not None
        assert stored["lists"] == {LIST_ID: "confirmed", OTHER_LIST: "confirmed"}

    def test_a_list_listmonk_does_not_have_is_a_permanent_error_not_a_member_added(
        self, listmonk: FakeListmonk, http: httpx.Client
    ) -> None:
        wrong = ListmonkBackendSettings(
            base_url=listmonk.url, username="sync-bot", api_token=API_TOKEN, list_id=99
        )
        # listmonk creates the subscriber with the list ids it knows: none here.
        with pytest.raises(PermanentSyncError, match="without list 99") as caught:
            ListmonkBackend(wrong, http).add([member()])
        assert "is list_id right?" in str(caught.value)
        # The answer kept for the attempt log echoes the member's attributes: never the
        # token of its unsubscribe link, which a read key would otherwise see.
        kept = caught.value.response
        assert kept is not None
        assert "news.example.org/v1/unsubscribe/<redacted>" in kept
        assert "tok-ada" not in kept
        stored = listmonk.subscriber("ada@example.org")
        assert stored is not None
        assert stored["lists"] == {}

    def test_an_answer_kept_for_the_attempt_log_holds_no_link_token(self) -> None:
        # JSON may write `/` as `\/`; a token cut at the end of the excerpt goes too.
        escaped = (
            '{"vars": {"unsubscribe_url": '
            '"https:\\/\\/n.example.org\\/v1\\/unsubscribe\\/S3cr-t_"}}'
        )
        kept = excerpt(httpx.Response(400, text=escaped))
        assert kept == (
            '400 {"vars": {"unsubscribe_url": '
            '"https:\\/\\/n.example.org\\/v1\\/unsubscribe\\/<redacted>"}}'
        )
        cut = excerpt(httpx.Response(500, text="x" * 470 + "/v1/confirm/" + "T" * 43))
        assert cut == "500 " + "x" * 470 + "/v1/confirm/<redacted>"


class TestUnsubscribe:
    def test_unsubscribes_from_our_list_only(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        subscriber_id = listmonk.seed(
            "ada@example.org", lists={LIST_ID: "confirmed", OTHER_LIST: "confirmed"}
        )

        backend.unsubscribe("ada@example.org")

        assert listmonk.calls() == [
            ("GET", "/api/subscribers"),
            ("PUT", "/api/subscribers/lists"),
        ]
        assert listmonk.seen("PUT")[0].json == {
            "ids": [subscriber_id],
            "action": "unsubscribe",
            "target_list_ids": [LIST_ID],
        }
        stored = listmonk.subscriber("ada@example.org")
        assert stored is not None
        assert stored["status"] == "enabled"
        assert stored["lists"] == {LIST_ID: "unsubscribed", OTHER_LIST: "confirmed"}

    def test_unknown_address_is_a_success(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        assert backend.unsubscribe("nobody@example.org") == "listmonk: no such subscriber"
        assert listmonk.calls() == [("GET", "/api/subscribers")]

    def test_already_unsubscribed_is_a_success_without_a_call(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        listmonk.seed("ada@example.org", lists={LIST_ID: "unsubscribed"})

        assert backend.unsubscribe("ada@example.org").endswith("already unsubscribed")
        assert listmonk.calls() == [("GET", "/api/subscribers")]


class TestRemove:
    def test_deletes_the_subscriber(self, listmonk: FakeListmonk, backend: ListmonkBackend) -> None:
        subscriber_id = listmonk.seed("ada@example.org", lists={LIST_ID: "confirmed"})

        backend.remove("ada@example.org")

        assert listmonk.calls() == [
            ("GET", "/api/subscribers"),
            ("DELETE", f"/api/subscribers/{subscriber_id}"),
        ]
        assert listmonk.subscribers == {}

    def test_unknown_address_is_a_success(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        assert backend.remove("nobody@example.org") == "listmonk: no such subscriber"
        assert listmonk.calls() == [("GET", "/api/subscribers")]

    def test_subscriber_deleted_meanwhile_is_a_success(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        subscriber_id = listmonk.seed("ada@example.org", lists={LIST_ID: "confirmed"})
        listmonk.fail("DELETE", f"/api/subscribers/{subscriber_id}", 404)

        assert backend.remove("ada@example.org") == f"listmonk: subscriber {subscriber_id} deleted"


class TestMembers:
    def test_pages_through_250_members(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        expected = {}
        for n in range(250):
            email = f"member{n:03}@example.org"
            status = "confirmed"
            if n % 7 == 0:
                status = "unconfirmed"
            if n % 10 == 0:
                status = "unsubscribed"
            blocklisted = n % 50 == 1
            listmonk.seed(
                email,
                status="blocklisted" if blocklisted else "enabled",
                lists={LIST_ID: status, OTHER_LIST: "confirmed"},
            )
            expected[email] = status != "unsubscribed" and not blocklisted
        for n in range(5):
            listmonk.seed(f"elsewhere{n}@example.org", lists={OTHER_LIST: "confirmed"})

        seen: dict[str, bool] = {}
        cursors = []
        cursor = None
        for _ in range(10):
            page = backend.members(cursor)
            seen.update({m.email: m.subscribed for m in page.members})
            cursors.append(page.next_cursor)
            cursor = page.next_cursor
            if cursor is None:
                break

        assert seen == expected
        assert cursors == ["2", "3", None]
        assert [r.query for r in listmonk.seen()] == [
            {"list_id": ["3"], "page": [str(n)], "per_page": ["100"], "order": ["asc"]}
            for n in (1, 2, 3)
        ]

    def test_empty_list_is_one_page(self, backend: ListmonkBackend) -> None:
        page = backend.members()

        assert (page.members, page.next_cursor) == ([], None)


class TestFailures:
    def test_503_is_retryable_and_the_retry_does_not_duplicate(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        listmonk.fail("POST", "/api/subscribers", 503, times=2)

        for _ in range(2):
            with pytest.raises(RetryableSyncError) as caught:
                backend.add([member()])
            assert caught.value.response is not None
            assert caught.value.response.startswith("503")
        backend.add([member()])

        assert len(listmonk.subscribers) == 1
        assert len(listmonk.seen("POST")) == 3

    @pytest.mark.parametrize(
        ("operation", "method", "path"),
        [
            ("unsubscribe", "PUT", "/api/subscribers/lists"),
            ("remove", "DELETE", "/api/subscribers/{id}"),
            ("add", "PUT", "/api/subscribers/lists"),
            ("add", "PUT", "/api/subscribers/{id}"),
        ],
        ids=["unsubscribe", "remove", "confirm on the list", "update"],
    )
    def test_a_write_answered_200_with_a_page_is_not_taken_for_done(
        self,
        listmonk: FakeListmonk,
        backend: ListmonkBackend,
        operation: str,
        method: str,
        path: str,
    ) -> None:
        # A proxy in front of listmonk that answers writes with a page of its own (a WAF's
        # challenge, a login page): listmonk saw nothing, and the job must not be done.
        lists = {LIST_ID: "unsubscribed" if operation == "add" else "confirmed"}
        subscriber_id = listmonk.seed("ada@example.org", lists=lists)
        listmonk.fail(
            method,
            path.format(id=subscriber_id),
            200,
            text="<html><body>Please wait...</body></html>",
            headers={"content-type": "text/html"},
        )
        call = {
            "unsubscribe": lambda: backend.unsubscribe("ada@example.org"),
            "remove": lambda: backend.remove("ada@example.org"),
            "add": lambda: backend.add([member()]),
        }[operation]

        with pytest.raises(PermanentSyncError) as caught:
            call()

        assert "not JSON" in str(caught.value)
        assert caught.value.response == "200 <html><body>Please wait...</body></html>"

    def test_429_carries_retry_after(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        listmonk.fail(
            "GET",
            "/api/subscribers",
            429,
            headers={"Retry-After": "7"},
            body={"message": "Too many requests"},
        )

        with pytest.raises(RetryableSyncError) as caught:
            backend.add([member()])

        assert caught.value.retry_after == 7.0
        assert listmonk.calls() == [("GET", "/api/subscribers")]

    @pytest.mark.parametrize("status", [408, 425])
    def test_a_4xx_about_the_moment_is_retryable(
        self, listmonk: FakeListmonk, backend: ListmonkBackend, status: int
    ) -> None:
        listmonk.fail("GET", "/api/subscribers", status, body={"message": "try again"})

        with pytest.raises(RetryableSyncError) as caught:
            backend.add([member()])
        backend.add([member()])

        assert caught.value.response == f'{status} {{"message":"try again"}}'
        assert len(listmonk.subscribers) == 1

    def test_400_is_permanent_with_the_answer(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        listmonk.blocked_domains.add("spam.example")

        with pytest.raises(PermanentSyncError) as caught:
            backend.add([member("ada@spam.example")])

        assert str(caught.value) == "listmonk: create: HTTP 400"
        assert caught.value.response == '400 {"message":"Domain is blocklisted."}'
        assert listmonk.subscribers == {}

    def test_connection_refused_is_retryable(self, http: httpx.Client) -> None:
        backend = ListmonkBackend(settings_for(f"http://127.0.0.1:{free_port()}"), http)

        with pytest.raises(RetryableSyncError, match="ConnectError") as caught:
            backend.unsubscribe("ada@example.org")

        assert isinstance(caught.value.__cause__, httpx.ConnectError)

    def test_wrong_token_is_permanent(self, listmonk: FakeListmonk, http: httpx.Client) -> None:
        backend = ListmonkBackend(settings_for(listmonk.url, api_token="wrong"), http)

        with pytest.raises(PermanentSyncError) as caught:
            backend.members()

        assert caught.value.response == '403 {"message":"invalid API credentials"}'
        assert listmonk.seen()[0].headers["authorization"] == "token sync-bot:wrong"

    def test_missing_sql_query_permission_is_permanent(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        listmonk.permissions.discard("subscribers:sql_query")

        with pytest.raises(PermanentSyncError) as caught:
            backend.remove("ada@example.org")

        assert caught.value.response is not None
        assert "permission denied: subscribers:sql_query" in caught.value.response

    def test_answer_that_is_not_listmonk_is_permanent(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        listmonk.fail("GET", "/api/subscribers", 200, text="<html>Sign in</html>")

        with pytest.raises(PermanentSyncError, match="not JSON") as caught:
            backend.members()

        assert caught.value.response == "200 <html>Sign in</html>"


class TestBlocklist:
    def test_fresh_opt_in_lifts_the_blocklist_and_subscribes_our_list_only(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        subscriber_id = listmonk.seed(
            "ada@example.org",
            status="blocklisted",
            lists={LIST_ID: "unsubscribed", OTHER_LIST: "unsubscribed"},
        )

        # What the sync does for a fresh opt-in: clear first, then add.
        cleared = backend.clear_suppression("ada@example.org")
        backend.add([member()])

        assert cleared == f"listmonk: subscriber {subscriber_id} was blocklisted, enabled again"
        lift = listmonk.seen("PUT", f"/api/subscribers/{subscriber_id}")[0]
        assert lift.json["status"] == "enabled"
        assert lift.json["lists"] == [LIST_ID, OTHER_LIST]
        stored = listmonk.subscriber("ada@example.org")
        assert stored is not None
        assert stored["status"] == "enabled"
        assert stored["lists"] == {LIST_ID: "confirmed", OTHER_LIST: "unsubscribed"}
        assert listmonk.optin_mails == []

    def test_add_that_is_not_a_fresh_opt_in_leaves_the_blocklist(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        listmonk.seed("ada@example.org", status="blocklisted", lists={LIST_ID: "unsubscribed"})

        answer = backend.add([member()])

        assert answer.endswith("is blocklisted, left as it is")
        assert listmonk.calls() == [("GET", "/api/subscribers")]
        stored = listmonk.subscriber("ada@example.org")
        assert stored is not None
        assert (stored["status"], stored["lists"]) == ("blocklisted", {LIST_ID: "unsubscribed"})

    def test_nothing_to_clear_for_an_enabled_or_unknown_address(
        self, listmonk: FakeListmonk, backend: ListmonkBackend
    ) -> None:
        listmonk.seed("ada@example.org", lists={LIST_ID: "unsubscribed"})

        assert backend.clear_suppression("ada@example.org") is None
        assert backend.clear_suppression("nobody@example.org") is None
        assert listmonk.calls() == [("GET", "/api/subscribers")] * 2
