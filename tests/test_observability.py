"""Readiness with the worker's heartbeat, Prometheus metrics, and the logs over a full flow."""

from __future__ import annotations

import io
import json
import logging
import warnings
import wsgiref.util
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from app import admin, apikeys, db, heartbeat, logs, outbox
from app.config import FileMailerSettings
from app.mailer import make_mailer
from app.main import create_app
from app.metrics import exposition_app
from app.models import JobKind, KeyScope, utcnow
from app.worker import Worker
from tests.conftest import SmtpSink, free_port, link_in, make_settings, wait_until
from tests.processes import HoldingSink, ServeProcess, service_env, start_holding_smtp

SUBSCRIBE = "/v1/lists/bluehats/subscriptions"


def scrape(
    client: TestClient | httpx.Client, **headers: str
) -> dict[tuple[str, frozenset[Any]], float]:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): float(sample.value)
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def labels(**values: str) -> frozenset[Any]:
    return frozenset(values.items())


@pytest.fixture
def held_smtp() -> Iterator[HoldingSink]:
    sink, controller = start_holding_smtp()
    sink.gate.set()
    yield sink
    sink.gate.set()
    controller.stop()


class TestReadinessAndTheWorker:
    def test_a_worker_stuck_in_a_send_makes_readyz_503_until_it_moves_again(
        self, database_url: str, held_smtp: HoldingSink
    ) -> None:
        settings = make_settings(
            database_url, smtp_port=held_smtp.port, worker_heartbeat_timeout="1s"
        )
        with TestClient(create_app(settings)) as client:
            assert client.get("/readyz").json()["worker"] == "fresh"
            held_smtp.gate.clear()
            assert client.post(SUBSCRIBE, json={"email": "stuck@example.org"}).status_code == 202
            wait_until(lambda: held_smtp.holding == 1)

            stale = wait_until(lambda: (r := client.get("/readyz")).status_code == 503 and r)
            assert stale.json()["error"] == "worker_stale"
            metrics = scrape(client)
            assert metrics[("newsletter_worker_heartbeat_age_seconds", labels())] > 1
            assert metrics[("newsletter_workers_alive", labels())] == 0

            held_smtp.gate.set()
            wait_until(lambda: client.get("/readyz").status_code == 200)
            assert client.get("/readyz").json()["worker"] == "fresh"

    def test_with_an_external_worker_readyz_reports_its_heartbeat_without_failing(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        settings = make_settings(database_url, smtp_port=smtp.port, run_worker=False)
        with TestClient(create_app(settings)) as client:
            assert client.get("/readyz").json() == {
                "status": "ready",
                "worker": "absent",
                "worker_seen_seconds_ago": None,
            }
            engine = client.app.state.engine  # type: ignore[attr-defined]
            with db.session_scope(engine) as session:
                long_ago = utcnow() - timedelta(minutes=5)
                heartbeat.beat(
                    session,
                    worker_id="worker-host:42:abc",
                    host="worker-host",
                    pid=42,
                    started_at=long_ago,
                    now=long_ago,
                )
            ready = client.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["worker"] == "stale"
            assert ready.json()["worker_seen_seconds_ago"] >= 300
            assert scrape(client)[("newsletter_workers_alive", labels())] == 0

            worker = Worker(engine=engine, settings=settings, mailer=make_mailer(settings.mailer))
            worker.beat()
            assert client.get("/readyz").json()["worker"] == "fresh"
            assert scrape(client)[("newsletter_workers_alive", labels())] == 1
            worker.stop()
            # A clean stop takes the worker's row away; the stale one stays visible.
            assert client.get("/readyz").json()["worker"] == "stale"


class TestMetrics:
    def test_a_subscription_shows_in_requests_subscriptions_outbox_attempts_and_limits(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        settings = make_settings(
            database_url, smtp_port=smtp.port, run_worker=False, rate_limit_per_ip="3/minute"
        )
        app = create_app(settings)
        with TestClient(app) as client:
            assert client.post(SUBSCRIBE, json={"email": "camille@example.org"}).status_code == 202
            metrics = scrape(client)
            route = "/v1/lists/{slug}/subscriptions"
            assert (
                metrics[
                    (
                        "newsletter_http_requests_total",
                        labels(method="POST", route=route, status="202"),
                    )
                ]
                == 1
            )
            assert (
                metrics[
                    (
                        "newsletter_http_request_duration_seconds_count",
                        labels(method="POST", route=route, status="202"),
                    )
                ]
                == 1
            )
            assert (
                metrics[("newsletter_subscriptions", labels(list="bluehats", status="pending"))]
                == 1
            )
            assert metrics[("newsletter_outbox_jobs", labels(kind="mail", state="pending"))] == 1
            assert metrics[("newsletter_outbox_oldest_job_age_seconds", labels(kind="mail"))] > 0
            assert metrics[("newsletter_database_up", labels())] == 1

            # The worker counts its attempts in the registry of the process it runs in.
            worker = Worker(
                engine=app.state.engine,
                settings=settings,
                mailer=make_mailer(settings.mailer),
                metrics=app.state.metrics,
            )
            assert worker.run_once() == 1
            worker.stop()
            mail = smtp.mail_to("camille@example.org", link="confirm")
            metrics = scrape(client)
            success = ("newsletter_outbox_attempts_total", labels(kind="mail", outcome="success"))
            assert metrics[success] == 1
            assert metrics[("newsletter_outbox_jobs", labels(kind="mail", state="pending"))] == 0
            assert metrics[("newsletter_outbox_oldest_job_age_seconds", labels(kind="mail"))] == 0

            # A link's token never becomes a label: the route template does.
            confirm_path = link_in(mail, "confirm")
            assert client.get(confirm_path).status_code == 200
            assert client.get("/no/such/page").status_code == 404
            text = client.get("/metrics").text
            assert confirm_path not in text
            assert 'route="/v1/confirm/{token}"' in text
            assert 'route="<unmatched>",status="404"' in text

            codes = [
                client.post(SUBSCRIBE, json={"email": f"n{i}@example.org"}).status_code
                for i in range(3)
            ]
            assert codes == [202, 202, 429]
            metrics = scrape(client)
            assert metrics[("newsletter_rate_limited_total", labels(scope="ip"))] == 1
            assert (
                metrics[
                    (
                        "newsletter_http_requests_total",
                        labels(method="POST", route=route, status="429"),
                    )
                ]
                == 1
            )

    def test_the_oldest_job_age_counts_waits_for_a_worker_not_jobs_scheduled_for_later(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        settings = make_settings(database_url, smtp_port=smtp.port, run_worker=False)
        app = create_app(settings)
        with TestClient(app) as client:
            now = utcnow()
            with db.session_scope(app.state.engine) as session:
                # The next retention run, written two hours ago for tomorrow: not late.
                outbox.schedule_retention(
                    session, now=now - timedelta(hours=2), delay=timedelta(hours=24)
                )
                # A daily reconciliation that fell due an hour ago: late by an hour, not 25.
                outbox.schedule_reconcile(
                    session,
                    list_slug="bluehats",
                    now=now - timedelta(hours=25),
                    delay=timedelta(hours=24),
                )
                # A mail held back by the mail budget until tomorrow: not late either.
                outbox.enqueue(
                    session,
                    kind=JobKind.MAIL,
                    payload={},
                    now=now - timedelta(minutes=5),
                    delay=timedelta(hours=24),
                )
                stats = admin.stats(
                    session,
                    list_slug="bluehats",
                    since=now - timedelta(days=1),
                    until=now,
                    by_month=False,
                    now=now,
                )
            metrics = scrape(client)
            age = "newsletter_outbox_oldest_job_age_seconds"
            assert (
                metrics[("newsletter_outbox_jobs", labels(kind="retention", state="pending"))] == 1
            )
            assert metrics[(age, labels(kind="retention"))] == 0
            assert metrics[("newsletter_outbox_jobs", labels(kind="mail", state="pending"))] == 1
            assert metrics[(age, labels(kind="mail"))] == 0
            assert 3600 <= metrics[(age, labels(kind="reconcile"))] < 3600 + 60
            assert stats.oldest_pending_job_seconds is not None
            assert 3600 <= stats.oldest_pending_job_seconds < 3600 + 60

    def test_suppressed_and_delayed_mails_are_counted_by_scope(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        settings = make_settings(
            database_url,
            smtp_port=smtp.port,
            run_worker=False,
            resend_interval="0s",
            rate_limit_per_address="1/day",
            mail_budget="2/hour",
        )
        with TestClient(create_app(settings)) as client:
            for email in ("a@example.org", "a@example.org", "b@example.org", "c@example.org"):
                assert client.post(SUBSCRIBE, json={"email": email}).status_code == 202
            metrics = scrape(client)
        assert metrics[("newsletter_rate_limited_total", labels(scope="address"))] == 1
        assert metrics[("newsletter_rate_limited_total", labels(scope="mail_budget"))] == 1
        assert metrics[("newsletter_rate_limited_total", labels(scope="ip"))] == 0

    def test_an_answer_given_before_routing_is_still_counted_under_its_template(
        self, client: TestClient, settings: Any
    ) -> None:
        big = {"email": "x@example.org", "pad": "x" * settings.max_body_bytes}
        assert client.post("/v1/lists/any-list/subscriptions", json=big).status_code == 413
        template = labels(method="POST", route="/v1/lists/{slug}/subscriptions", status="413")
        assert scrape(client)[("newsletter_http_requests_total", template)] == 1

    def test_the_schema_and_static_files_are_counted_under_their_routes_not_unmatched(
        self, client: TestClient
    ) -> None:
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/static/style.css").status_code == 200
        assert client.get("/static/no-such-file.css").status_code == 404
        assert client.get("/no/such/page").status_code == 404
        counted = scrape(client)
        requests = "newsletter_http_requests_total"
        assert counted[(requests, labels(method="GET", route="/openapi.json", status="200"))] == 1
        static = "/static/{path}"
        assert counted[(requests, labels(method="GET", route=static, status="200"))] == 1
        assert counted[(requests, labels(method="GET", route=static, status="404"))] == 1
        # `<unmatched>` is what no route took: a 404, never a page served.
        assert counted[(requests, labels(method="GET", route="<unmatched>", status="404"))] == 1
        assert (requests, labels(method="GET", route="<unmatched>", status="200")) not in counted

    def test_a_metrics_token_when_set_is_required(self, database_url: str, smtp: SmtpSink) -> None:
        settings = make_settings(database_url, smtp_port=smtp.port, metrics_token="scrape-me")
        with TestClient(create_app(settings)) as client:
            missing = client.get("/metrics")
            assert missing.status_code == 401
            wrong = client.get("/metrics", headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401
            assert wrong.json()["error"] == "unauthorized"
            # RFC 9110 §11.6.1: a 401 names the scheme that would be accepted.
            for refused in (missing, wrong):
                assert refused.headers["www-authenticate"] == "Bearer"
            scrape(client, authorization="Bearer scrape-me")
        # With the token, a scraper from anywhere.
        with TestClient(create_app(settings), client=("93.184.216.34", 4711)) as client:
            scrape(client, authorization="Bearer scrape-me")

    def test_without_a_token_only_loopback_and_private_networks_may_scrape(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        # The pending count would tell a stranger whether a sign-up's address was new.
        settings = make_settings(database_url, smtp_port=smtp.port, trusted_proxies=["10.0.0.1"])
        app = create_app(settings)
        for peer in ("127.0.0.1", "::1", "10.1.2.3", "192.168.0.9", "fd00::5", "::ffff:172.17.0.2"):
            with TestClient(app, client=(peer, 4711)) as client:
                scrape(client)
        # A Teredo client (2001:0::/32) is anywhere on the Internet; the documentation and
        # benchmarking ranges are no private network either, though Python's ipaddress
        # counts them all private.
        teredo = "2001:0:4136:e378:8000:63bf:3fff:fdd2"
        not_private = ("203.0.113.7", "198.51.100.7", "192.0.2.7", "198.18.0.1", "2001:db8::7")
        for peer in ("93.184.216.34", "2a00:1450::1", "::ffff:93.184.216.34", teredo, *not_private):
            with TestClient(app, client=(peer, 4711)) as client:
                refused = client.get("/metrics")
                assert refused.status_code == 403
                assert refused.json()["error"] == "forbidden"
                assert "NEWSLETTER_METRICS_TOKEN" in refused.json()["detail"]
        # Behind a trusted proxy, the client it forwards for.
        with TestClient(app, client=("10.0.0.1", 4711)) as client:
            stranger = client.get("/metrics", headers={"x-forwarded-for": "93.184.216.34"})
            assert stranger.status_code == 403
            scrape(client, **{"x-forwarded-for": "10.9.9.9"})
        # Relayed by a proxy that is not listed (nginx on this host, NEWSLETTER_TRUSTED_PROXIES
        # forgotten): its peer address is the proxy's, not the scraper's, who may be anyone.
        for listed in ([], ["10.0.0.1"]):
            unlisted = create_app(
                make_settings(database_url, smtp_port=smtp.port, trusted_proxies=listed)
            )
            with TestClient(unlisted, client=("127.0.0.1", 4711)) as client:
                for header in ("x-forwarded-for", "forwarded", "x-real-ip"):
                    relayed = client.get("/metrics", headers={header: "93.184.216.34"})
                    assert relayed.status_code == 403, (listed, header)
                    assert "NEWSLETTER_TRUSTED_PROXIES" in relayed.json()["detail"]
                scrape(client)

    def test_a_worker_s_metrics_port_without_a_token_answers_as_the_api_s(self) -> None:
        """`newsletter worker --metrics-port P --metrics-host 0.0.0.0` (a container's port,
        for Prometheus) showed the subscription counts to anyone reaching it."""
        registry = CollectorRegistry()
        Gauge("newsletter_subscriptions", "test", registry=registry).set(1)

        def get(peer: str, token: str | None = None, **headers: str) -> tuple[str, bytes]:
            environ: dict[str, Any] = {"REMOTE_ADDR": peer, "PATH_INFO": "/metrics"}
            environ.update({f"HTTP_{k.upper()}": v for k, v in headers.items()})
            wsgiref.util.setup_testing_defaults(environ)
            seen: list[str] = []
            app = exposition_app(registry, token=SecretStr(token) if token else None)
            body = b"".join(app(environ, lambda status, _headers: seen.append(status)))
            return seen[0], body

        for peer in ("127.0.0.1", "::1", "10.1.2.3", "fd00::5", "::ffff:172.17.0.2"):
            assert get(peer) == ("200 OK", get("127.0.0.1")[1]), peer
        for peer in ("93.184.216.34", "2a00:1450::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2"):
            status, body = get(peer)
            assert status == "403 Forbidden", peer
            assert json.loads(body)["error"] == "forbidden"
            assert b"newsletter_subscriptions" not in body
        # A proxy on this host relays a stranger's scrape.
        assert get("127.0.0.1", X_FORWARDED_FOR="93.184.216.34")[0] == "403 Forbidden"
        # With the token, from anywhere.
        scraped = get("93.184.216.34", "scrape-me", AUTHORIZATION="Bearer scrape-me")
        assert scraped[0] == "200 OK"
        assert get("127.0.0.1", "scrape-me")[0] == "401 Unauthorized"


def _person_path(email: str) -> str:
    return f"/v1/admin/people/{email}"


class TestLogs:
    def test_json_lines_over_a_full_flow_carry_request_ids_and_no_secret(
        self, database_url: str, smtp: SmtpSink, tmp_path: Path
    ) -> None:
        email = "camille.dupont@example.org"
        env = service_env(database_url, smtp_port=smtp.port, LOG_FORMAT="json", LOG_LEVEL="INFO")
        server = ServeProcess(env=env, cwd=tmp_path, log=tmp_path / "serve.log")
        try:
            app_engine = db.make_engine(database_url)
            with db.session_scope(app_engine) as session:
                _, key = apikeys.create(session, name="ops", scope=KeyScope.READ, now=utcnow())
            app_engine.dispose()
            with httpx.Client(base_url=server.base_url, timeout=15) as client:

                def call(method: str, path: str, rid: str, **kwargs: Any) -> httpx.Response:
                    response = client.request(
                        method,
                        path,
                        headers={"x-request-id": rid, **kwargs.pop("headers", {})},
                        **kwargs,
                    )
                    assert response.headers["x-request-id"] == rid
                    return response

                assert (
                    call("POST", SUBSCRIBE, "flow-subscribe", json={"email": email}).status_code
                    == 202
                )
                confirm = link_in(smtp.mail_to(email, link="confirm"), "confirm")
                assert call("GET", confirm, "flow-confirm-page").status_code == 200
                confirmed = call(
                    "POST", confirm, "flow-confirm", headers={"accept": "application/json"}
                )
                assert confirmed.json()["status"] == "confirmed"
                leave = call(
                    "POST",
                    "/v1/lists/bluehats/unsubscriptions",
                    "flow-ask-leave",
                    json={"email": email},
                )
                assert leave.status_code == 202
                unsubscribe = link_in(smtp.mail_to(email, link="unsubscribe"), "unsubscribe")
                gone = call(
                    "POST", unsubscribe, "flow-unsubscribe", headers={"accept": "application/json"}
                )
                assert gone.json()["status"] == "unsubscribed"
                person = call(
                    "GET",
                    _person_path(email),
                    "flow-admin",
                    headers={"authorization": f"Bearer {key}"},
                )
                assert person.status_code == 200
                # An id that is not sane is replaced, not echoed into the logs.
                odd = client.get("/healthz", headers={"x-request-id": "x" * 300})
                assert odd.headers["x-request-id"] != "x" * 300
            server.terminate()
            server.wait()
        finally:
            server.kill()

        lines = [line for line in server.log_text().splitlines() if line.strip()]
        events = [json.loads(line) for line in lines]  # every line is one JSON event
        for event in events:
            assert {"time", "level", "logger", "message", "request_id"} <= set(event)

        text = "\n".join(lines)
        secrets = [confirm.rsplit("/", 1)[1], unsubscribe.rsplit("/", 1)[1], key]
        for secret in secrets:
            assert secret not in text
        assert email not in text.lower()
        assert email.replace("@", "%40") not in text.lower()
        assert "c*****@example.org" in text  # the admin call's access line, masked

        def by_request(rid: str) -> list[dict[str, Any]]:
            return [event for event in events if event["request_id"] == rid]

        for rid in (
            "flow-subscribe",
            "flow-confirm-page",
            "flow-confirm",
            "flow-ask-leave",
            "flow-unsubscribe",
            "flow-admin",
        ):
            access = [e for e in by_request(rid) if e["logger"] == "uvicorn.access"]
            assert len(access) == 1, (rid, by_request(rid))
            assert access[0]["event"] == "http.access"
        # Logged inside the thread pool, in the domain code: the request's id went with it.
        assert any(e["event"] == "subscription.confirmed" for e in by_request("flow-confirm"))
        assert any(
            e["event"] == "subscription.unsubscribed" for e in by_request("flow-unsubscribe")
        )


class TestLogHygiene:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("to camille@example.org", "to c*****@example.org"),
            (
                "DELETE /v1/admin/people/camille%40example.org",
                "/v1/admin/people/c*****@example.org",
            ),
            ("550 <camille+news@example.org>: no such user", "550 <c*****@example.org>: no"),
            ("email=Camille@Example.ORG&x=1", "email=C*****@Example.ORG&x=1"),
            ("/members/élodie@exemple.fr", "/members/é*****@exemple.fr"),
            ("DELETE /v1/admin/people/bob%40example.org", "/people/b*****@example.org"),
            # uvicorn's access line quotes the path: what is not ASCII comes percent-encoded.
            (
                '"GET ' + quote("/v1/admin/people/élodie@exämple.fr") + ' HTTP/1.1" 200',
                "/people/%C3%A9*****@ex%C3%A4mple.fr HTTP/1.1",
            ),
            # httpx's line when paging Mailgun's members.
            (
                "GET https://api.mailgun.net/v3/lists/x/members/pages?"
                "address=%C3%A9mile%40ex%C3%A4mple.fr&limit=100",
                "?address=%C3%A9*****@ex%C3%A4mple.fr&limit=100",
            ),
            # The admin search's prefix is a partial address, with or without its @.
            ("GET /v1/admin/lists/x/subscribers?prefix=camille%40exa&limit=5", "?prefix=c*****&"),
            ("GET /v1/admin/lists/x/subscribers?limit=5&prefix=camille", "&prefix=c*****"),
            ("GET /v1/admin/lists/x/export?prefix=%C3%A9lo HTTP/1.1", "?prefix=%C3%A9***** HTTP"),
            ("admin.note to=camille@exa", "to=c*****@exa"),
            # A `/` before the @-sign (sent as %2F, decoded in the path): all of it masked.
            (
                '"GET /v1/admin/people/bob/camille%40example.org HTTP/1.1" 200',
                '"GET /v1/admin/people/b*****@example.org HTTP/1.1" 200',
            ),
            (
                "POST /v1/admin/lists/x/subscribers/bob/camille@example.org/unsubscribe",
                "/v1/admin/lists/x/subscribers/b*****@example.org/unsubscribe",
            ),
        ],
    )
    def test_addresses_are_masked_wherever_they_appear(self, text: str, expected: str) -> None:
        masked = logs.mask_addresses(text)
        assert expected in masked
        for hidden in ("amille", "lodie", "%A9lo", "mile", "bob"):
            assert hidden not in masked

    @pytest.mark.parametrize(
        "text",
        [
            '"GET /v1/admin/lists/bluehats/subscribers?status=confirmed&limit=100 HTTP/1.1" 200',
            "GET /v1/admin/lists/bluehats/subscribers?cursor=aWQ6MTAw HTTP/1.1",
            "GET /v1/lists/caf%C3%A9/subscriptions 100% done /a%2Fb",
            "GET /v1/admin/subscribers/12/consent-proof",
            "outbox.sent job=12 kind=mail attempt=1",
            "GET /v1/admin/audit?action=subscriber.read&target=bluehats",
            # A URL's user is no mail address: the database a start could not reach.
            "database unreachable at postgresql+psycopg://postgres@127.0.0.1:5999/test: refused",
            "database unreachable at postgresql+psycopg://newsletter:***@db.internal/newsletter",
        ],
    )
    def test_lines_without_an_address_are_left_as_they_are(self, text: str) -> None:
        assert logs.mask_addresses(text) == text

    def test_uvicorns_access_line_masks_an_address_beyond_ascii(self) -> None:
        path = quote("/v1/admin/people/élodie@exämple.fr")
        record = logging.LogRecord(
            "uvicorn.access", logging.INFO, __file__, 1,
            '%s - "%s %s HTTP/%s" %d', ("127.0.0.1:5000", "GET", path, "1.1", 200), None,
        )  # fmt: skip
        entry = json.loads(logs.JsonFormatter().format(record))
        assert entry["path"] == "/v1/admin/people/%C3%A9*****@ex%C3%A4mple.fr"
        assert "lodie" not in entry["message"]
        assert "lodie" not in logs.TextFormatter().format(record)

    def test_only_info_and_above_are_masked_and_tokens_are_redacted_at_every_level(self) -> None:
        formatter = logs.JsonFormatter()

        def line(level: int, message: str) -> dict[str, Any]:
            record = logging.LogRecord("app.x", level, __file__, 1, message, None, None)
            return dict(json.loads(formatter.format(record)))

        assert (
            line(logging.INFO, "x.y to=ada@example.org")["message"] == "x.y to=a*****@example.org"
        )
        assert line(logging.DEBUG, "x.y to=ada@example.org")["message"] == "x.y to=ada@example.org"
        assert line(logging.DEBUG, "GET /v1/confirm/abc123")["message"] == (
            "GET /v1/confirm/<redacted>"
        )
        assert line(logging.INFO, "x.y to=ada@example.org")["event"] == "x.y"

    def test_a_library_line_has_its_logger_as_event(self) -> None:
        formatter = logs.JsonFormatter()

        def event(logger: str, message: str) -> Any:
            record = logging.LogRecord(logger, logging.INFO, __file__, 1, message, None, None)
            return json.loads(formatter.format(record))["event"]

        assert event("alembic.runtime.migration", "Running upgrade  -> 0001, start") == (
            "alembic.runtime.migration"
        )
        assert event("uvicorn.error", "Started server process [42]") == "uvicorn"
        assert event("app.worker", "worker.started name=w1") == "worker.started"

    @pytest.mark.parametrize(
        ("given", "kept"),
        [
            ("3f2a9c1e-5b7d-4e8f-9a0b-1c2d3e4f5a6b", True),
            ("proxy.trace:0001", True),
            ("x" * 129, False),
            ("has space", False),
            ('quote"injection', False),
            ("", False),
        ],
    )
    def test_a_request_id_is_kept_only_when_sane(self, given: str, kept: bool) -> None:
        assert (logs.accept_request_id(given) == given) is kept

    def test_a_librarys_warning_is_one_json_line_too(self) -> None:
        stream = io.StringIO()
        root = logging.getLogger()
        saved = (list(root.handlers), root.level)
        handler = logs.configure(level="INFO", fmt="json", stream=stream)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.warn("a library's complaint about c@example.org", UserWarning, 1)
        finally:
            logging.captureWarnings(False)
            root.removeHandler(handler)
            for old in saved[0]:
                root.addHandler(old)
            root.setLevel(saved[1])
        lines = stream.getvalue().splitlines()
        assert len(lines) == 1
        entry = json.loads(lines[0])
        assert (entry["level"], entry["logger"], entry["event"]) == (
            "WARNING",
            "py.warnings",
            "py.warnings",
        )
        assert "UserWarning: a library's complaint about c*****@example.org" in entry["message"]

    def test_text_lines_carry_the_request_id_from_inside_the_thread_pool(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        stream = io.StringIO()
        root = logging.getLogger()
        saved = (list(root.handlers), root.level)
        handler = logs.configure(level="INFO", fmt="text", stream=stream)
        try:
            settings = make_settings(database_url, smtp_port=smtp.port)
            with TestClient(create_app(settings)) as client:
                client.post(SUBSCRIBE, json={"email": "ada@example.org"})
                confirm = link_in(smtp.mail_to("ada@example.org", link="confirm"), "confirm")
                answer = client.post(confirm, headers={"x-request-id": "text-confirm-1"})
                assert answer.headers["x-request-id"] == "text-confirm-1"
        finally:
            root.removeHandler(handler)
            for old in saved[0]:
                root.addHandler(old)
            root.setLevel(saved[1])
        confirmed = [
            line for line in stream.getvalue().splitlines() if "subscription.confirmed" in line
        ]
        assert len(confirmed) == 1
        assert confirmed[0].endswith("request_id=text-confirm-1")
        assert " INFO app.subscriptions subscription.confirmed " in confirmed[0]


class TestFormRejections:
    def test_a_robots_form_post_is_counted_by_reason(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        settings = make_settings(database_url, smtp_port=smtp.port)
        with TestClient(create_app(settings)) as client:
            key = ("newsletter_form_rejections_total", labels(reason="honeypot"))
            before = scrape(client)[key]
            answer = client.post(
                SUBSCRIBE,
                data={"email": "robot@example.org", "website": "http://spam.example"},
                follow_redirects=False,
            )
            assert answer.status_code == 303
            after = scrape(client)
            assert after[key] == before + 1


class TestDevelopmentMailerInADeployment:
    @pytest.mark.parametrize(
        ("url", "warned"),
        [
            ("postgresql+psycopg://newsletter@127.0.0.1:5432/newsletter", True),
            ("sqlite:///x", False),
        ],
    )
    def test_a_worker_on_postgresql_with_the_file_mailer_warns_at_start(
        self,
        database_url: str,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
        url: str,
        warned: bool,
    ) -> None:
        settings = make_settings(
            database_url, smtp_port=1, mailer=FileMailerSettings(directory=tmp_path / "mail")
        ).model_copy(update={"database_url": url})
        engine = db.make_engine(database_url)
        worker = Worker(engine=engine, settings=settings, mailer=make_mailer(settings.mailer))
        worker.request_stop()
        with caplog.at_level(logging.INFO, logger="app.worker"):
            worker.run()
        engine.dispose()
        warnings = [
            r.getMessage() for r in caplog.records if r.getMessage().startswith("worker.dev")
        ]
        expected = (
            f"worker.development_mailer directory={tmp_path / 'mail'}: mails are written "
            "there, not sent, and their links logged; set NEWSLETTER_MAILER__KIND=smtp "
            "(docs/production.md §6)"
        )
        assert warnings == ([expected] if warned else [])


class TestUnexpectedErrors:
    def test_a_client_hanging_up_mid_body_is_no_error_and_no_500(
        self, database_url: str, smtp: SmtpSink, caplog: pytest.LogCaptureFixture
    ) -> None:
        app = create_app(make_settings(database_url, smtp_port=smtp.port))
        sent: list[dict[str, Any]] = []

        async def hang_up(state: dict[str, Any]) -> None:
            # Half a form, then the connection closes, as uvicorn tells it to the app.
            messages: list[dict[str, Any]] = [
                {"type": "http.request", "body": b"email=camille%40exa", "more_body": True},
                {"type": "http.disconnect"},
            ]

            async def receive() -> dict[str, Any]:
                return messages.pop(0)

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": SUBSCRIBE,
                "raw_path": SUBSCRIBE.encode(),
                "root_path": "",
                "query_string": b"",
                "headers": [
                    (b"host", b"testserver"),
                    (b"content-type", b"application/x-www-form-urlencoded"),
                    (b"content-length", b"40"),
                ],
                "client": ("127.0.0.1", 50000),
                "server": ("testserver", 80),
                "state": state,
            }
            await app(scope, receive, send)

        with TestClient(app) as client, caplog.at_level(logging.INFO):
            client.portal.call(hang_up, dict(client.app_state))
            metrics = scrape(client)
        assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
        failures = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert failures == []
        assert "request.client_disconnected path=/v1/lists/bluehats/subscriptions" in [
            r.getMessage() for r in caplog.records
        ]
        route = labels(method="POST", route="/v1/lists/{slug}/subscriptions", status="499")
        assert metrics[("newsletter_http_requests_total", route)] == 1
        assert not any(
            name == "newsletter_http_requests_total" and ("status", "500") in key
            for name, key in metrics
        )

    def test_a_500_keeps_the_request_id_the_headers_and_the_error_shape(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        seen: list[tuple[str, str | None]] = []

        class Remember(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                seen.append((record.getMessage(), logs.request_id.get()))

        def boom() -> None:
            raise RuntimeError("a bug")

        app = create_app(make_settings(database_url, smtp_port=smtp.port))
        app.add_api_route("/v1/lists/{slug}/boom", boom)
        handler = Remember(level=logging.ERROR)
        logging.getLogger("app.api.handlers").addHandler(handler)
        try:
            with TestClient(app) as client:
                answer = client.get(
                    "/v1/lists/bluehats/boom",
                    headers={"x-request-id": "bug-42", "accept": "application/json"},
                )
                metrics = scrape(client)
        finally:
            logging.getLogger("app.api.handlers").removeHandler(handler)
        assert answer.status_code == 500
        assert answer.json() == {
            "error": "internal_error",
            "detail": "An unexpected error occurred.",
        }
        assert answer.headers["x-request-id"] == "bug-42"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        assert answer.headers["cache-control"] == "no-store"
        assert ("request.failed path=/v1/lists/bluehats/boom", "bug-42") in seen
        route = labels(method="GET", route="/v1/lists/{slug}/boom", status="500")
        assert metrics[("newsletter_http_requests_total", route)] == 1


class TestADatabaseThatDoesNotAnswer:
    """The log lines of an outage say where the database is and what its driver said (a
    refused connection, a refused password, a full server call for different fixes), with
    the password masked; the client's answer says neither."""

    @pytest.fixture
    def dead_engine(self) -> Iterator[Any]:
        engine = db.make_engine(self.url)
        yield engine
        engine.dispose()

    @pytest.fixture(autouse=True)
    def _nothing_listens(self) -> None:
        self.port = free_port()
        self.url = f"postgresql+psycopg://newsletter:hunter2-pw@127.0.0.1:{self.port}/newsletter"

    def _said(self, caplog: pytest.LogCaptureFixture, event: str) -> str:
        """The line as the log shows it (its addresses masked)."""
        [record] = [r for r in caplog.records if r.getMessage().startswith(event)]
        line = logs.TextFormatter().format(record)
        assert "hunter2-pw" not in line
        return line

    def test_readyz_logs_where_and_why_and_tells_the_prober_neither(
        self, settings: Any, dead_engine: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        with TestClient(create_app(settings)) as client:
            own_engine = client.app.state.engine  # type: ignore[attr-defined]
            client.app.state.engine = dead_engine  # type: ignore[attr-defined]
            try:
                with caplog.at_level(logging.WARNING, logger="app.api.health"):
                    response = client.get("/readyz")
            finally:
                client.app.state.engine = own_engine  # type: ignore[attr-defined]
        assert response.status_code == 503
        assert str(self.port) not in response.text
        assert "refused" not in response.text
        line = self._said(caplog, "readiness.database_unreachable")
        assert (
            f"database=postgresql+psycopg://127.0.0.1:{self.port}/newsletter user=newsletter"
            in line
        )
        assert "Connection refused" in line

    def test_a_scrape_logs_where_and_why(
        self, dead_engine: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        from prometheus_client import generate_latest

        from app.metrics import Metrics

        metrics = Metrics()
        metrics.watch_database(dead_engine, heartbeat_timeout=timedelta(seconds=60))
        with caplog.at_level(logging.WARNING, logger="app.metrics"):
            text = generate_latest(metrics.registry).decode()
        assert "newsletter_database_up 0.0" in text
        line = self._said(caplog, "metrics.database_unreachable")
        assert f"127.0.0.1:{self.port}" in line
        assert "Connection refused" in line

    def test_the_worker_logs_where_and_why(
        self, dead_engine: Any, smtp: SmtpSink, caplog: pytest.LogCaptureFixture
    ) -> None:
        settings = make_settings(self.url, smtp_port=smtp.port)
        worker = Worker(engine=dead_engine, settings=settings, mailer=make_mailer(settings.mailer))
        with caplog.at_level(logging.WARNING, logger="app.worker"):
            worker.start()
            try:
                wait_until(
                    lambda: any(
                        r.getMessage().startswith("worker.database_unavailable")
                        for r in caplog.records
                    )
                )
            finally:
                worker.stop(timeout=10)
        line = self._said(caplog, "worker.database_unavailable")
        assert f"127.0.0.1:{self.port}" in line
        assert "Connection refused" in line
