"""Subscribe and unsubscribe-by-address answer byte for byte the same whatever the address's
state, as JSON and as a form post: status, every header, body.

Each case uses its own address, brought to its state first; per-address mail budget 2/day
and no resend interval, so "over the budget" is its own state (two mails already sent).
The outbox shows the states really differ inside: the answers hide it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.conftest import SmtpSink, count_rows, make_settings

SUBSCRIBE = "/v1/lists/bluehats/subscriptions"
UNSUBSCRIBE = "/v1/lists/bluehats/unsubscriptions"
KINDS = ("json", "form")


@pytest.fixture
def budget_settings(database_url: str, smtp: SmtpSink) -> Settings:
    return make_settings(
        database_url, smtp_port=smtp.port, rate_limit_per_address="2/day", resend_interval="0s"
    )


@pytest.fixture
def app_client(budget_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(budget_settings)) as client:
        yield client


# The same request id every time: the service echoes it, and a generated one would differ
# between any two answers, so every header can be compared.
REQUEST_ID = {"x-request-id": "enumeration-probe"}


def send(client: TestClient, path: str, email: str, kind: str) -> httpx.Response:
    if kind == "json":
        return client.post(path, json={"email": email}, headers=REQUEST_ID)
    return client.post(
        path,
        content=f"email={email.replace('@', '%40')}&locale=fr",
        headers={"content-type": "application/x-www-form-urlencoded", **REQUEST_ID},
        follow_redirects=False,
    )


def answer(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    return response.status_code, sorted(response.headers.multi_items()), response.content


def set_status(settings: Settings, email: str, status: str) -> None:
    engine = sa.create_engine(settings.database_url)
    with engine.begin() as connection:
        updated = connection.execute(
            sa.text("UPDATE subscription SET status = :status WHERE email = :email"),
            {"status": status, "email": email},
        ).rowcount
    engine.dispose()
    assert updated == 1


def jobs_for(settings: Settings, email: str) -> list[str]:
    engine = sa.create_engine(settings.database_url)
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT outbox_job.payload FROM outbox_job JOIN subscription"
                " ON subscription.id = outbox_job.subscription_id"
                " WHERE subscription.email = :email ORDER BY outbox_job.id"
            ),
            {"email": email},
        ).all()
    engine.dispose()
    return [
        (json.loads(payload) if isinstance(payload, str) else payload)["mail"]
        for (payload,) in rows
    ]


Prepare = Callable[[TestClient, Settings, str], None]


def _new(client: TestClient, settings: Settings, email: str) -> None:
    pass


def _subscribed(status: str | None, *, extra_requests: int = 0) -> Prepare:
    def prepare(client: TestClient, settings: Settings, email: str) -> None:
        assert client.post(SUBSCRIBE, json={"email": email}).status_code == 202
        if status is not None:
            set_status(settings, email, status)
        for _ in range(extra_requests):
            path = UNSUBSCRIBE if status == "confirmed" else SUBSCRIBE
            assert client.post(path, json={"email": email}).status_code == 202

    return prepare


SUBSCRIBE_STATES: dict[str, Prepare] = {
    "new": _new,
    "pending": _subscribed(None),
    "confirmed": _subscribed("confirmed"),
    "unsubscribed": _subscribed("unsubscribed"),
    "bounced": _subscribed("bounced"),
    "complained": _subscribed("complained"),
    "over the per-address budget": _subscribed(None, extra_requests=1),
}
UNSUBSCRIBE_STATES: dict[str, Prepare] = {
    "unknown": _new,
    "pending": _subscribed(None),
    "confirmed": _subscribed("confirmed"),
    "unsubscribed": _subscribed("unsubscribed"),
    "bounced": _subscribed("bounced"),
    "over the per-address budget": _subscribed("confirmed", extra_requests=1),
}


def answers_by_state(
    client: TestClient, settings: Settings, path: str, states: dict[str, Prepare], kind: str
) -> dict[str, tuple[int, list[tuple[str, str]], bytes]]:
    answers = {}
    for number, (state, prepare) in enumerate(states.items()):
        email = f"{kind}-{number}@example.org"
        prepare(client, settings, email)
        answers[state] = answer(send(client, path, email, kind))
    return answers


class TestSubscribeRevealsNothing:
    @pytest.mark.parametrize("kind", KINDS)
    def test_every_state_gets_the_same_bytes(
        self, app_client: TestClient, budget_settings: Settings, kind: str
    ) -> None:
        answers = answers_by_state(app_client, budget_settings, SUBSCRIBE, SUBSCRIBE_STATES, kind)
        first = answers["new"]
        assert first[0] == (202 if kind == "json" else 303)
        different = {state: got for state, got in answers.items() if got != first}
        assert different == {}, (first, different)

        # The states did differ: what was queued tells the truth the answers hide.
        def mails(state: str) -> list[str]:
            number = list(SUBSCRIBE_STATES).index(state)
            return jobs_for(budget_settings, f"{kind}-{number}@example.org")

        assert mails("new") == ["confirm"]
        assert mails("confirmed") == ["confirm", "already_subscribed"]
        assert mails("over the per-address budget") == ["confirm", "confirm"]


class TestUnsubscribeRequestRevealsNothing:
    @pytest.mark.parametrize("kind", KINDS)
    def test_every_state_gets_the_same_bytes(
        self, app_client: TestClient, budget_settings: Settings, kind: str
    ) -> None:
        answers = answers_by_state(
            app_client, budget_settings, UNSUBSCRIBE, UNSUBSCRIBE_STATES, kind
        )
        first = answers["unknown"]
        assert first[0] == (202 if kind == "json" else 303)
        different = {state: got for state, got in answers.items() if got != first}
        assert different == {}, (first, different)

        def mails(state: str) -> list[str]:
            number = list(UNSUBSCRIBE_STATES).index(state)
            return jobs_for(budget_settings, f"{kind}-{number}@example.org")

        assert mails("confirmed") == ["confirm", "unsubscribe"]
        assert mails("pending") == ["confirm"]
        assert mails("over the per-address budget") == ["confirm", "unsubscribe"]


class TestOneCodePath:
    def test_an_unsubscribe_request_for_a_pending_address_is_recorded_like_the_others(
        self, app_client: TestClient, budget_settings: Settings
    ) -> None:
        # No early return for the states that get no mail: the ledger still says someone
        # asked, as it does for a confirmed address.
        assert app_client.post(SUBSCRIBE, json={"email": "p@example.org"}).status_code == 202
        assert app_client.post(UNSUBSCRIBE, json={"email": "p@example.org"}).status_code == 202
        engine = sa.create_engine(budget_settings.database_url)
        with engine.connect() as connection:
            actions = (
                connection.execute(sa.text("SELECT action FROM consent_event ORDER BY id"))
                .scalars()
                .all()
            )
        engine.dispose()
        assert actions == ["subscribe_requested", "unsubscribe_requested"]

    def test_requests_that_send_no_mail_leave_no_trace_of_the_work_they_rehearse(
        self, app_client: TestClient, budget_settings: Settings
    ) -> None:
        # They make (and undo) the writes a mail would cost, so that their timing matches.
        url = budget_settings.database_url

        def rows() -> dict[str, int]:
            return {
                table: count_rows(url, table)
                for table in ("subscription", "token", "outbox_job", "consent_event")
            }

        assert app_client.post(UNSUBSCRIBE, json={"email": "nobody@example.org"}).status_code == 202
        assert rows() == {"subscription": 0, "token": 0, "outbox_job": 0, "consent_event": 0}
        for _ in range(2):
            assert app_client.post(SUBSCRIBE, json={"email": "b@example.org"}).status_code == 202
        before = rows()
        # Past the per-address budget: recorded in the ledger, nothing else.
        assert app_client.post(SUBSCRIBE, json={"email": "b@example.org"}).status_code == 202
        assert rows() == {**before, "consent_event": before["consent_event"] + 1}
