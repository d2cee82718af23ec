"""Attack tests for the rate limits, with real counters (in memory, and in the real Redis on
127.0.0.1:6379), real SMTP and real HTTP.

- A mail cannon: 1,000 sign-ups for one victim from 1,000 IPs send at most the per-address
  budget of mails, and every answer is the same 202.
- One IP trying 1,000 addresses is refused with 429 and `Retry-After` past its limit; nothing
  of a refused request is stored.
- Two app instances sharing Redis enforce one limit; without Redis each counts alone.
- A spoofed `X-Forwarded-For` from an untrusted peer changes nothing.
- Past the global mail budget, subscriptions are still taken and their mails delayed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from app.api.deps import forwarded_client
from app.config import Settings, SettingsError, load_settings
from app.db import make_engine
from app.main import create_app
from app.models import ConsentEvent, OutboxJob, Token, utcnow
from app.ratelimit import REDIS_TIMEOUT, client_key
from tests.conftest import (
    LiveServer,
    SmtpSink,
    count_rows,
    free_port,
    make_settings,
    wait_until,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
SUBSCRIBE = "/v1/lists/bluehats/subscriptions"
JSON_ACCEPT = {"accept": "application/json"}
UNFINISHED_JOBS = "outbox_job WHERE state IN ('pending', 'running')"
PROXY = "192.0.2.1"


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own in the real Redis, removed afterwards."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(f"Redis is not running on 127.0.0.1:6379 (.ci/run starts it): {e}")
    prefix = f"test-{secrets.token_hex(6)}"
    yield prefix
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(params=["memory", "redis"])
def counters(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Where the counters live: this process, or the real Redis under a fresh prefix."""
    if request.param == "memory":
        return {"redis_url": None}
    prefix: str = request.getfixturevalue("redis_prefix")
    return {"redis_url": REDIS_URL, "rate_limit_key_prefix": prefix}


def limited_settings(database_url: str, smtp: SmtpSink, **overrides: Any) -> Settings:
    """Test settings with the production limits on, unless overridden."""
    values: dict[str, Any] = {
        "rate_limit_per_ip": "20/minute",
        "rate_limit_per_address": "3/day",
        "rate_limit_per_domain": "200/hour",
        "mail_budget": "1000/hour",
    }
    values.update(overrides)
    return make_settings(database_url, smtp_port=smtp.port, **values)


def ledger(url: str) -> list[ConsentEvent]:
    engine = make_engine(url)
    with Session(engine) as session:
        rows = list(session.exec(select(ConsentEvent).order_by(col(ConsentEvent.id))).all())
    engine.dispose()
    return rows


def answer_of(response: httpx.Response) -> tuple[int, tuple[tuple[str, str], ...], bytes]:
    """Status, headers (but the date and the random request id) and body: what a caller
    could tell answers apart by."""
    headers = tuple(
        sorted((k, v) for k, v in response.headers.items() if k not in ("date", "x-request-id"))
    )
    return response.status_code, headers, response.content


async def post_all(
    base_url: str, requests: list[tuple[dict[str, Any], dict[str, str]]], *, concurrency: int
) -> list[httpx.Response]:
    """POST every (JSON body, headers) to the subscribe route, `concurrency` at a time."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=30, limits=limits, trust_env=False
    ) as http:

        async def post(body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
            async with gate:
                return await http.post(SUBSCRIBE, json=body, headers=headers)

        return await asyncio.wait_for(
            asyncio.gather(*(post(body, headers) for body, headers in requests)), timeout=90
        )


class TestClientAddress:
    TRUSTED = Settings(trusted_proxies="10.0.0.0/8, 192.0.2.1").trusted_proxies

    @pytest.mark.parametrize(
        ("peer", "forwarded_for", "expected"),
        [
            # An untrusted peer is the client, whatever it claims.
            ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),
            # A trusted proxy: the right-most entry it vouches for.
            ("192.0.2.1", ["198.51.100.1"], "198.51.100.1"),
            # What the client put in front (left) is ignored; proxies are skipped.
            ("10.0.0.1", ["6.6.6.6, 198.51.100.1, 10.0.0.2"], "198.51.100.1"),
            ("10.0.0.1", ["6.6.6.6", "198.51.100.1"], "198.51.100.1"),
            # Ports and brackets as some proxies write them; zones dropped.
            ("10.0.0.1", ["198.51.100.1:4711"], "198.51.100.1"),
            ("10.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
            ("10.0.0.1", ["fe80::1%eth0"], "fe80::1"),
            ("::ffff:10.0.0.1", ["198.51.100.1"], "198.51.100.1"),
            # Not an address: nothing beyond it is believed; the proxy stands for the client.
            ("10.0.0.1", ["6.6.6.6, unknown"], "10.0.0.1"),
            ("10.0.0.1", ["6.6.6.6, <script>, 10.0.0.3"], "10.0.0.3"),
            ("10.0.0.1", ["1.2.3.4\x00"], "10.0.0.1"),
            # Empty entries carry no claim; no header at all leaves the proxy.
            ("10.0.0.1", ["198.51.100.1, , "], "198.51.100.1"),
            ("10.0.0.1", [], "10.0.0.1"),
            # Only proxies: the farthest one is the best we know.
            ("10.0.0.1", ["10.0.0.3, 10.0.0.2"], "10.0.0.3"),
            # A peer that is no IP at all (the test client) is kept as it is.
            ("testclient", ["198.51.100.1"], "testclient"),
        ],
    )
    def test_the_right_most_untrusted_entry_is_the_client(
        self, peer: str, forwarded_for: list[str], expected: str
    ) -> None:
        assert forwarded_client(peer, forwarded_for, self.TRUSTED) == expected

    def test_an_ipv6_client_counts_by_its_64_and_a_mapped_ipv4_as_ipv4(self) -> None:
        assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2")
        assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
        assert client_key("::ffff:198.51.100.7") == "198.51.100.7"
        assert client_key(None) == "unknown"

    def test_settings_read_proxies_as_json_or_commas_and_refuse_bad_values(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_TRUSTED_PROXIES", "10.0.0.0/8, 2001:db8::/32")
        monkeypatch.setenv("NEWSLETTER_RATE_LIMIT_PER_DOMAIN", "off")
        settings = Settings()
        assert [str(n) for n in settings.trusted_proxies] == ["10.0.0.0/8", "2001:db8::/32"]
        assert settings.rate_limit_per_domain is None
        monkeypatch.setenv("NEWSLETTER_TRUSTED_PROXIES", '["127.0.0.1"]')
        assert [str(n) for n in Settings().trusted_proxies] == ["127.0.0.1/32"]
        for name, value in [
            ("NEWSLETTER_TRUSTED_PROXIES", "10.0.0.1/8"),
            ("NEWSLETTER_TRUSTED_PROXIES", "proxy.example.org"),
            ("NEWSLETTER_RATE_LIMIT_PER_IP", "ten a minute"),
            ("NEWSLETTER_MAIL_BUDGET", "0/hour"),
            ("NEWSLETTER_REDIS_URL", "http://127.0.0.1:6379"),
        ]:
            with monkeypatch.context() as env:
                env.setenv(name, value)
                with pytest.raises(ValueError, match=name.removeprefix("NEWSLETTER_").lower()):
                    Settings()

    def test_a_redis_url_whose_database_is_not_a_number_is_refused(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_REDIS_URL", "redis://:s3cret@127.0.0.1:6379/newsletter")
        with pytest.raises(SettingsError) as refused:
            load_settings()
        assert str(refused.value) == (
            "invalid settings:\n  NEWSLETTER_REDIS_URL: the database after the "
            "host must be a number, as in redis://host:6379/0 (got 'newsletter'); name this "
            "instance's keys with NEWSLETTER_RATE_LIMIT_KEY_PREFIX"
        )
        for accepted in ["redis://127.0.0.1:6379/9", "redis://127.0.0.1:6379", "unix:///r.sock"]:
            monkeypatch.setenv("NEWSLETTER_REDIS_URL", accepted)
            assert Settings().redis_url == accepted

    def test_a_proxy_network_with_host_bits_set_names_the_network_meant(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEWSLETTER_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.1/8")
        with pytest.raises(ValueError, match="trusted_proxies") as refused:
            Settings()
        assert (
            "10.0.0.1/8 has host bits set: write 10.0.0.0/8 for the whole network, "
            "or 10.0.0.1 for one proxy"
        ) in str(refused.value)


class TestMailCannon:
    def test_1000_signups_for_one_victim_from_1000_ips_send_at_most_the_address_budget(
        self, database_url: str, smtp: SmtpSink, redis_prefix: str
    ) -> None:
        # Counters in Redis, as replicas run them (in memory the path through `limits` is
        # the same; the other attack tests run on both).
        settings = limited_settings(
            database_url,
            smtp,
            # No resend interval: the per-address limit alone stands between bot and victim.
            resend_interval="0s",
            trusted_proxies=["127.0.0.1"],
            redis_url=REDIS_URL,
            rate_limit_key_prefix=redis_prefix,
        )
        # Each request through the (trusted) loopback proxy from its own client IP, with a
        # forged entry in front that must not count.
        requests = [
            (
                {"email": "Victim@Example.org"},
                {**JSON_ACCEPT, "x-forwarded-for": f"6.6.6.6, 198.51.{n // 250}.{n % 250 + 1}"},
            )
            for n in range(1000)
        ]
        with LiveServer(create_app(settings)) as base_url:
            answers = asyncio.run(post_all(base_url, requests, concurrency=8))
            wait_until(lambda: count_rows(database_url, UNFINISHED_JOBS) == 0, timeout=30)

        assert Counter(a.status_code for a in answers) == {202: 1000}
        assert len({answer_of(a) for a in answers}) == 1
        assert len(smtp.messages) == 3
        assert {m["To"] for m in smtp.messages} == {"Victim@example.org"}
        # Every request is in the ledger, with its client's IP; the held-back ones say so.
        events = ledger(database_url)
        assert len(events) == 1000
        assert len({e.ip for e in events}) == 1000
        assert "6.6.6.6" not in {e.ip for e in events}
        # (Some requests lost the race for the address's mail slot to a later one and asked
        # nothing; every one that asked after the third mail was held back.)
        held = [e for e in events if "mail_suppressed" in e.detail]
        assert held
        assert {e.detail["mail_suppressed"] for e in held} == {"address_rate_limit"}
        assert count_rows(database_url, "outbox_job WHERE kind = 'mail'") == 3

    def test_signups_for_one_inbox_under_many_spellings_send_at_most_the_address_budget(
        self, database_url: str, smtp: SmtpSink, counters: dict[str, Any]
    ) -> None:
        # `+tags` and, at Gmail, dots: each spelling is a subscriber of its own, all of
        # them one person's inbox.
        spellings = [f"victim+{n}@example.org" for n in range(6)] + [
            "v.ictim@gmail.com",
            "vi.ctim+x@gmail.com",
            "vic.tim@googlemail.com",
            "victim@gmail.com",
        ]
        settings = limited_settings(database_url, smtp, resend_interval="0s", **counters)
        with TestClient(create_app(settings)) as client:
            answers = {answer_of(client.post(SUBSCRIBE, json={"email": e})) for e in spellings}
            wait_until(lambda: count_rows(database_url, UNFINISHED_JOBS) == 0)
        assert len(answers) == 1
        assert count_rows(database_url, "subscription") == len(spellings)
        to = Counter(m["To"].rpartition("@")[2] for m in smtp.messages)
        assert to == {"example.org": 3, "gmail.com": 2, "googlemail.com": 1}
        notes = [e.detail.get("mail_suppressed") for e in ledger(database_url)]
        assert notes.count("address_rate_limit") == 4


class TestPerDomain:
    def test_many_addresses_at_one_domain_get_mail_up_to_its_limit_and_the_same_answer(
        self, database_url: str, smtp: SmtpSink, counters: dict[str, Any]
    ) -> None:
        settings = limited_settings(database_url, smtp, rate_limit_per_domain="4/hour", **counters)
        with TestClient(create_app(settings)) as client:
            answers = [
                answer_of(client.post(SUBSCRIBE, json={"email": f"u{n}@target.example"}))
                for n in range(10)
            ]
            answers.append(answer_of(client.post(SUBSCRIBE, json={"email": "x@other.example"})))
            wait_until(lambda: count_rows(database_url, UNFINISHED_JOBS) == 0)
        assert len(set(answers)) == 1
        assert answers[0][0] == 202
        # Every subscription is stored (pending, without a mail); mails stop at the limit.
        assert count_rows(database_url, "subscription") == 11
        assert len(smtp.messages) == 5
        assert sum(m["To"].endswith("@target.example") for m in smtp.messages) == 4
        notes = [e.detail.get("mail_suppressed") for e in ledger(database_url)]
        assert notes.count("domain_rate_limit") == 6


class TestOneIpManyAddresses:
    def test_one_ip_trying_1000_addresses_is_throttled(
        self, database_url: str, smtp: SmtpSink, counters: dict[str, Any]
    ) -> None:
        settings = limited_settings(
            database_url, smtp, rate_limit_per_ip="10/minute", run_worker=False, **counters
        )
        app = create_app(settings)
        with TestClient(app, client=("203.0.113.50", 40000)) as bot:
            answers = [
                bot.post(SUBSCRIBE, json={"email": f"target{n}@example.org"}, headers=JSON_ACCEPT)
                for n in range(1000)
            ]
            # Every public POST counts: a confirm press from that IP is refused too, as is
            # the form; an RFC 8058 one-click unsubscribe is not (mail providers share IPs).
            press = bot.post("/v1/confirm/some-token", headers=JSON_ACCEPT)
            form = bot.post(
                SUBSCRIBE, data={"email": "form@example.org"}, headers={"accept": "text/html"}
            )
            one_click = bot.post(
                "/v1/unsubscribe/some-token",
                content=b"List-Unsubscribe=One-Click",
                headers={"content-type": "application/x-www-form-urlencoded", **JSON_ACCEPT},
            )
        with TestClient(app, client=("203.0.113.51", 40000)) as neighbour:
            other = neighbour.post(SUBSCRIBE, json={"email": "neighbour@example.org"})

        assert Counter(a.status_code for a in answers) == {202: 10, 429: 990}
        assert [a.status_code for a in answers[:10]] == [202] * 10
        refused = answers[10:]
        for response in (*refused, press):
            assert response.status_code == 429
            assert response.json()["error"] == "rate_limited"
            assert set(response.json()) == {"error", "detail"}
            assert 1 <= int(response.headers["retry-after"]) <= 60
        assert form.status_code == 429
        assert form.headers["content-type"].startswith("text/html")
        assert "retry-after" in form.headers
        assert one_click.status_code == 404
        assert other.status_code == 202
        # Nothing of a refused request was stored.
        assert count_rows(database_url, "subscription") == 11
        assert count_rows(database_url, "consent_event") == 11
        assert count_rows(database_url, "outbox_job") == 11
        stored = {e.ip for e in ledger(database_url)}
        assert stored == {"203.0.113.50", "203.0.113.51"}


class TestSharedCounters:
    def _spread(
        self, settings_a: Settings, settings_b: Settings, *, calls: list[tuple[str, str]]
    ) -> list[tuple[str, int]]:
        """Send (client IP, address) calls alternately to two instances behind one proxy."""
        statuses = []
        with (
            TestClient(create_app(settings_a), client=(PROXY, 1000)) as a,
            TestClient(create_app(settings_b), client=(PROXY, 1000)) as b,
        ):
            for n, (ip, email) in enumerate(calls):
                instance, name = (a, "a") if n % 2 == 0 else (b, "b")
                response = instance.post(
                    SUBSCRIBE, json={"email": email}, headers={"x-forwarded-for": ip}
                )
                statuses.append((name, response.status_code))
        return statuses

    def test_two_instances_sharing_redis_enforce_one_limit(
        self, database_url: str, smtp: SmtpSink, redis_prefix: str
    ) -> None:
        settings = limited_settings(
            database_url,
            smtp,
            rate_limit_per_ip="6/minute",
            rate_limit_per_address="2/day",
            resend_interval="0s",
            trusted_proxies=[PROXY],
            redis_url=REDIS_URL,
            rate_limit_key_prefix=redis_prefix,
            run_worker=False,
        )
        # One client IP, 20 requests spread over both: 6 in all get through.
        statuses = self._spread(
            settings,
            settings,
            calls=[("198.51.100.7", f"a{n}@example.org") for n in range(20)],
        )
        assert Counter(status for _, status in statuses) == {202: 6, 429: 14}
        assert Counter(name for name, status in statuses if status == 202) == {"a": 3, "b": 3}
        # One victim, 10 client IPs over both instances: 2 mails in all.
        statuses = self._spread(
            settings,
            settings,
            calls=[(f"198.51.100.{n + 20}", "victim@example.org") for n in range(10)],
        )
        assert Counter(status for _, status in statuses) == {202: 10}
        assert count_rows(database_url, "outbox_job WHERE kind = 'mail'") == 6 + 2

    def test_without_redis_each_instance_counts_alone(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        settings = limited_settings(
            database_url,
            smtp,
            rate_limit_per_ip="6/minute",
            trusted_proxies=[PROXY],
            run_worker=False,
        )
        statuses = self._spread(
            settings,
            settings,
            calls=[("198.51.100.7", f"a{n}@example.org") for n in range(20)],
        )
        # Why replicas need Redis: twice the limit gets through.
        assert Counter(status for _, status in statuses) == {202: 12, 429: 8}


class TestSpoofedForwardedFor:
    @pytest.mark.parametrize("trusted", [[], ["10.0.0.0/8"]])
    def test_a_spoofed_x_forwarded_for_from_an_untrusted_peer_changes_nothing(
        self, database_url: str, smtp: SmtpSink, redis_prefix: str, trusted: list[str]
    ) -> None:
        settings = limited_settings(
            database_url,
            smtp,
            rate_limit_per_ip="3/minute",
            trusted_proxies=trusted,
            redis_url=REDIS_URL,
            rate_limit_key_prefix=redis_prefix,
            run_worker=False,
        )
        with (
            LiveServer(create_app(settings)) as base_url,
            httpx.Client(base_url=base_url, timeout=10, trust_env=False) as http,
        ):
            statuses = [
                http.post(
                    SUBSCRIBE,
                    json={"email": f"s{n}@example.org"},
                    headers={**JSON_ACCEPT, "x-forwarded-for": f"10.0.0.{n}, 198.51.100.{n}"},
                ).status_code
                for n in range(1, 9)
            ]
        # The socket's 127.0.0.1 is counted, whatever the header says, and it is the evidence.
        assert statuses == [202, 202, 202, 429, 429, 429, 429, 429]
        assert {e.ip for e in ledger(database_url)} == {"127.0.0.1"}


class TestGlobalBudget:
    def test_past_the_budget_subscriptions_are_taken_and_their_mails_delayed(
        self,
        database_url: str,
        smtp: SmtpSink,
        counters: dict[str, Any],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        settings = limited_settings(database_url, smtp, mail_budget="2/hour", **counters)
        caplog.set_level(logging.WARNING, logger="app.ratelimit")
        started = utcnow()
        with TestClient(create_app(settings)) as client:
            answers = [
                answer_of(client.post(SUBSCRIBE, json={"email": f"reader{n}@example.org"}))
                for n in range(5)
            ]
            wait_until(lambda: count_rows(database_url, "outbox_job WHERE state = 'done'") == 2)
            # The delayed ones are not due: the worker leaves them alone.
            assert count_rows(database_url, "outbox_job WHERE state = 'pending'") == 3

        assert len(set(answers)) == 1
        assert answers[0][0] == 202
        assert count_rows(database_url, "subscription WHERE status = 'pending'") == 5
        assert len(smtp.messages) == 2
        engine = make_engine(database_url)
        with Session(engine) as session:
            jobs = session.exec(select(OutboxJob).order_by(col(OutboxJob.id))).all()
            tokens = {str(t.id): t for t in session.exec(select(Token)).all()}
        engine.dispose()
        delayed = [job for job in jobs if job.state == "pending"]
        for job in delayed:
            # Into the next window (the oldest of the 2 frees in an hour), spread over it.
            assert started + timedelta(minutes=59) < job.next_attempt_at
            assert job.next_attempt_at < utcnow() + timedelta(hours=2, seconds=5)
            # Its link lives its whole 48 hours from when the mail leaves.
            token = tokens[job.payload["token_id"]]
            assert token.expires_at is not None
            assert token.expires_at >= job.next_attempt_at + timedelta(hours=47, minutes=59)
        notes = [e.detail for e in ledger(database_url) if "mail_delayed_until" in e.detail]
        assert len(notes) == 3
        assert {n["mail_delay_reason"] for n in notes} == {"mail_budget"}
        warnings = [r for r in caplog.records if "ratelimit.global_budget_exceeded" in r.message]
        assert len(warnings) == 3
        assert all(r.levelno == logging.WARNING for r in warnings)


class TestCountersUnreachable:
    def test_sign_ups_go_through_when_redis_is_down(
        self, database_url: str, smtp: SmtpSink, caplog: pytest.LogCaptureFixture
    ) -> None:
        # A loopback port nobody listens on: connections are refused at once.
        settings = limited_settings(
            database_url, smtp, redis_url=f"redis://127.0.0.1:{free_port()}/0"
        )
        caplog.set_level(logging.ERROR, logger="app.ratelimit")
        with TestClient(create_app(settings)) as client:
            response = client.post(SUBSCRIBE, json={"email": "still@example.org"})
            smtp.wait_for(1)
        assert response.status_code == 202
        failures = [r.message for r in caplog.records if "ratelimit.storage_failed" in r.message]
        assert any("check=client" in m for m in failures)
        assert any("check=mail" in m for m in failures)

    def test_a_redis_that_does_not_answer_holds_up_one_request_not_every_one(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        # A port whose connections the kernel takes and nobody answers, as behind a network
        # path that drops packets or a stuck server: each call waits for REDIS_TIMEOUT.
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]
        settings = limited_settings(database_url, smtp, redis_url=f"redis://127.0.0.1:{port}/0")
        try:
            with TestClient(create_app(settings)) as client:
                first = client.post(SUBSCRIBE, json={"email": "silent0@example.org"})
                assert first.status_code == 202
                started = time.monotonic()
                for i in range(1, 6):
                    answer = client.post(SUBSCRIBE, json={"email": f"silent{i}@example.org"})
                    assert answer.status_code == 202
                elapsed = time.monotonic() - started
                smtp.wait_for(6)
        finally:
            silent.close()
        # Each of them waited for its client check and its mail check, in the group commit
        # where the others wait for it: 10 s.
        assert elapsed < 2 * REDIS_TIMEOUT

    def test_an_outage_under_load_is_one_line_per_check_with_the_requests_let_through(
        self, database_url: str, smtp: SmtpSink, caplog: pytest.LogCaptureFixture
    ) -> None:
        settings = limited_settings(
            database_url, smtp, redis_url=f"redis://127.0.0.1:{free_port()}/0"
        )
        caplog.set_level(logging.ERROR, logger="app.ratelimit")
        with TestClient(create_app(settings)) as client:
            for i in range(10):
                answer = client.post(SUBSCRIBE, json={"email": f"outage{i}@example.org"})
                assert answer.status_code == 202
            smtp.wait_for(10)
            failures = [r.message for r in caplog.records if "storage_failed" in r.message]
            assert len(failures) == 2
            assert failures[0].startswith("ratelimit.storage_failed check=client unchecked=1 ")
            assert failures[1].startswith("ratelimit.storage_failed check=mail unchecked=1 ")
            limiter = client.app.state.rate_limiter
            # The next line, once its interval has passed, counts those let through since.
            limiter._client_failures.every = 0
            assert client.post(SUBSCRIBE, json={"email": "outage10@example.org"}).is_success
        last = [r.message for r in caplog.records if "storage_failed" in r.message][-2:]
        assert any(
            m.startswith("ratelimit.storage_failed check=client unchecked=10 ") for m in last
        )
