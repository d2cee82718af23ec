"""Many requests at once against a real uvicorn server: one subscriber, one mail, one confirm."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx

from app.main import create_app
from tests.conftest import LiveServer, SmtpSink, count_rows, link_in, make_settings, wait_until

SUBSCRIBE = "/v1/lists/bluehats/subscriptions"
UNSUBSCRIBE = "/v1/lists/bluehats/unsubscriptions"
WANTS_JSON = {"accept": "application/json"}
UNFINISHED_JOBS = "outbox_job WHERE state IN ('pending', 'running')"


async def send_all(
    base_url: str, calls: list[tuple[str, str, dict[str, Any] | None]], *, timeout: float = 60.0
) -> list[int]:
    """Send every (method, path, JSON body) at once, one connection each; the status codes."""
    limits = httpx.Limits(max_connections=len(calls), max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=timeout, limits=limits, trust_env=False
    ) as http:
        answers = await asyncio.wait_for(
            asyncio.gather(
                *(
                    http.request(method, path, json=body, headers=WANTS_JSON)
                    for method, path, body in calls
                )
            ),
            timeout=timeout,
        )
    return [answer.status_code for answer in answers]


class TestConcurrentSubscribes:
    def test_200_concurrent_requests_for_one_address_make_one_subscriber_and_one_mail(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        spellings = ["Same@Example.org", "same@example.org", "SAME@EXAMPLE.ORG", "same@EXAMPLE.org"]
        calls: list[tuple[str, str, dict[str, Any] | None]] = [
            ("POST", SUBSCRIBE, {"email": spellings[i % len(spellings)]}) for i in range(200)
        ]
        settings = make_settings(database_url, smtp_port=smtp.port)
        with LiveServer(create_app(settings)) as base_url:
            statuses = asyncio.run(send_all(base_url, calls))
            # Every 202 was committed before it was sent; let the worker drain the outbox.
            wait_until(lambda: count_rows(database_url, UNFINISHED_JOBS) == 0, timeout=20)

        assert Counter(statuses) == {202: 200}
        assert count_rows(database_url, "subscription") == 1
        assert count_rows(database_url, "subscription WHERE email_key = 'same@example.org'") == 1
        # Every request is in the ledger; only the first one queued a mail.
        assert count_rows(database_url, "consent_event") == 200
        assert count_rows(database_url, "outbox_job") == 1
        assert count_rows(database_url, "outbox_job WHERE state = 'done'") == 1
        assert len(smtp.messages) == 1
        assert smtp.messages[0]["To"].lower() == "same@example.org"


class TestConcurrentConfirms:
    def test_50_concurrent_presses_of_one_confirm_link_confirm_once(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        settings = make_settings(database_url, smtp_port=smtp.port)
        with LiveServer(create_app(settings)) as base_url:
            with httpx.Client(base_url=base_url, timeout=10, trust_env=False) as http:
                asked = http.post(SUBSCRIBE, json={"email": "racer@example.org"})
            assert asked.status_code == 202
            link = link_in(smtp.mail_to("racer@example.org", link="confirm"), "confirm")
            statuses = asyncio.run(send_all(base_url, [("POST", link, None)] * 50))

        assert all(status < 500 for status in statuses), Counter(statuses)
        # One press wins; every other one finds the link spent.
        assert Counter(statuses) == {200: 1, 409: 49}
        assert count_rows(database_url, "consent_event WHERE action = 'confirmed'") == 1
        assert count_rows(database_url, "subscription WHERE status = 'confirmed'") == 1
        assert count_rows(database_url, "token WHERE purpose = 'unsubscribe'") == 1


class TestConcurrentUnsubscribes:
    def test_a_burst_of_views_and_presses_of_one_unsubscribe_link_unsubscribes_once(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        settings = make_settings(database_url, smtp_port=smtp.port)
        with LiveServer(create_app(settings)) as base_url:
            with httpx.Client(base_url=base_url, timeout=10, trust_env=False) as http:
                assert http.post(SUBSCRIBE, json={"email": "leaver@example.org"}).status_code == 202
                confirm = link_in(smtp.mail_to("leaver@example.org", link="confirm"), "confirm")
                assert http.post(confirm, headers=WANTS_JSON).status_code == 200
                asked = http.post(UNSUBSCRIBE, json={"email": "leaver@example.org"})
                assert asked.status_code == 202
            link = link_in(smtp.mail_to("leaver@example.org", link="unsubscribe"), "unsubscribe")
            calls: list[tuple[str, str, dict[str, Any] | None]] = [
                ("GET" if i % 2 else "POST", link, None) for i in range(60)
            ]
            statuses = asyncio.run(send_all(base_url, calls))
            wait_until(lambda: count_rows(database_url, UNFINISHED_JOBS) == 0, timeout=20)

        # Unsubscribing is idempotent: every view and press is answered, one is recorded.
        assert Counter(statuses) == {200: 60}
        assert count_rows(database_url, "consent_event WHERE action = 'unsubscribed'") == 1
        assert count_rows(database_url, "subscription WHERE status = 'unsubscribed'") == 1
        goodbyes = [m for m in smtp.messages if "désinscrit" in m["Subject"]]
        assert len(goodbyes) == 1
