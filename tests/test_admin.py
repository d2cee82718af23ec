"""The admin API: keys and scopes on every route, search with keyset pages, a subscriber's
full record, stats, the failed-job queue, and the audit log."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from app import admin, apikeys, db, lists
from app.config import Settings
from app.models import (
    ApiKey,
    AuditEvent,
    JobKind,
    JobState,
    KeyScope,
    OutboxJob,
    Subscription,
    utcnow,
)
from app.schemas import MAX_ROW_ID
from tests.conftest import SECRET, SmtpSink, link_in, make_settings, wait_until
from tests.fake_listmonk import FakeListmonk

NEWSLETTER = str(Path(sys.executable).with_name("newsletter"))


def _key(engine: sa.Engine, name: str, scope: KeyScope) -> str:
    with db.session_scope(engine) as session:
        _, key = apikeys.create(session, name=name, scope=scope, now=utcnow())
    return key


@pytest.fixture
def read_key(client: TestClient, engine: sa.Engine) -> dict[str, str]:
    return {"authorization": f"Bearer {_key(engine, 'dashboard', KeyScope.READ)}"}


@pytest.fixture
def write_key(client: TestClient, engine: sa.Engine) -> dict[str, str]:
    return {"authorization": f"Bearer {_key(engine, 'operator', KeyScope.WRITE)}"}


def _admin_operations(client: TestClient) -> list[tuple[str, str]]:
    document = client.get("/openapi.json").json()
    found = []
    for path, operations in document["paths"].items():
        for method in operations:
            if path.startswith("/v1/admin"):
                concrete = path.replace("{slug}", "bluehats").replace("{email}", "a@example.org")
                found.append((method.upper(), concrete.replace("{job_id}", "1")))
    return found


def _subscriptions(engine: sa.Engine, count: int, **values: Any) -> None:
    now = utcnow()
    with db.session_scope(engine) as session:
        mailing_list = lists.get(session, slug="bluehats")
        for n in range(count):
            session.add(
                Subscription(
                    list_id=mailing_list.id,
                    email=f"user{n:04d}@example.org",
                    email_key=f"user{n:04d}@example.org",
                    status=values.get("status", "confirmed"),
                    locale=values.get("locale", "fr"),
                    consent_version="2026-11",
                    created_at=now,
                    confirmed_at=now,
                )
            )


class TestKeys:
    def test_every_admin_route_refuses_a_caller_without_a_valid_key(
        self, client: TestClient, engine: sa.Engine
    ) -> None:
        operations = _admin_operations(client)
        assert len(operations) >= 8
        revoked = _key(engine, "old", KeyScope.WRITE)
        with db.session_scope(engine) as session:
            apikeys.revoke(session, name="old", now=utcnow())
        for method, path in operations:
            for headers in (
                {},
                {"authorization": "Bearer nlk_not-a-key"},
                {"authorization": "Basic dXNlcjpwYXNz"},
                {"authorization": f"Bearer {revoked}"},
            ):
                response = client.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.json()["error"] == "unauthorized"
                # RFC 9110 §11.6.1: a 401 names the scheme that would be accepted.
                assert response.headers["www-authenticate"] == "Bearer"

    def test_a_body_is_not_read_before_the_key_is_checked(
        self, client: TestClient, read_key: dict[str, str]
    ) -> None:
        # FastAPI parses a JSON body before the dependencies that check the key.
        unreadable = b'{"name": '
        as_json = {"content-type": "application/json"}
        writes = [(m, p) for m, p in _admin_operations(client) if m != "GET"]
        for method, path in writes:
            response = client.request(method, path, content=unreadable, headers=as_json)
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
        # With a key, what is wrong with the body is said.
        headers = {**read_key, **as_json}
        refused = client.post("/v1/admin/blocks", content=unreadable, headers=headers)
        assert refused.status_code == 400
        assert refused.json()["error"] == "invalid_body"

    def test_a_refused_key_is_logged_and_a_revoked_one_by_its_name(
        self, client: TestClient, engine: sa.Engine, caplog: pytest.LogCaptureFixture
    ) -> None:
        revoked = _key(engine, "leaked-in-ci", KeyScope.WRITE)
        with db.session_scope(engine) as session:
            apikeys.revoke(session, name="leaked-in-ci", now=utcnow())
        caplog.set_level("WARNING", logger="app.apikeys")
        for key in (revoked, "nlk_not-a-key", "key-mailgun-0123", None):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            assert client.get("/v1/admin/lists", headers=headers).status_code == 401
        lines = [r.getMessage() for r in caplog.records if r.name == "app.apikeys"]
        assert lines == [
            "apikey.refused reason=revoked name=leaked-in-ci",
            "apikey.refused reason=unknown",
            "apikey.refused reason=malformed",
        ]
        # Never the key, nor any part of what was sent as one.
        assert not any("not-a-key" in line or "mailgun" in line for line in caplog.messages)

    def test_a_read_key_cannot_change_anything(
        self, client: TestClient, read_key: dict[str, str]
    ) -> None:
        writes = [(m, p) for m, p in _admin_operations(client) if m != "GET"]
        assert writes
        for method, path in writes:
            response = client.request(method, path, headers=read_key)
            assert response.status_code == 403, (method, path, response.text)

    def test_last_use_is_recorded(
        self, client: TestClient, engine: sa.Engine, read_key: dict[str, str]
    ) -> None:
        assert client.get("/v1/admin/lists", headers=read_key).status_code == 200
        with Session(engine) as session:
            key = session.exec(select(ApiKey).where(ApiKey.name == "dashboard")).one()
            assert key.last_used_at is not None
            assert key.key_hash not in read_key["authorization"]


class TestSearch:
    def test_pages_walk_every_subscriber_once_in_order(
        self, client: TestClient, engine: sa.Engine, read_key: dict[str, str]
    ) -> None:
        _subscriptions(engine, 250)
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 100}
            if cursor:
                params["cursor"] = cursor
            page = client.get(
                "/v1/admin/lists/bluehats/subscribers", params=params, headers=read_key
            ).json()
            seen += [item["email"] for item in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == 3
        assert seen == [f"user{n:04d}@example.org" for n in range(250)]

    def test_filters_combine(
        self, client: TestClient, engine: sa.Engine, read_key: dict[str, str]
    ) -> None:
        _subscriptions(engine, 30)
        with db.session_scope(engine) as session:
            for row in session.exec(select(Subscription)).all():
                if row.email.startswith("user001"):
                    row.locale = "en"
                    row.status = "unsubscribed"
                    session.add(row)
        response = client.get(
            "/v1/admin/lists/bluehats/subscribers",
            params={"status": "unsubscribed", "locale": "en", "prefix": "User0012"},
            headers=read_key,
        )
        assert response.status_code == 200
        emails = [item["email"] for item in response.json()["items"]]
        assert emails == ["user0012@example.org"]
        # The language in another case is the same language.
        upper = client.get(
            "/v1/admin/lists/bluehats/subscribers",
            params={"status": "unsubscribed", "locale": "EN", "prefix": "User0012"},
            headers=read_key,
        )
        assert [item["email"] for item in upper.json()["items"]] == emails
        # A language the service does not speak is refused, not an empty page.
        unknown = client.get(
            "/v1/admin/lists/bluehats/subscribers", params={"locale": "de"}, headers=read_key
        )
        assert unknown.status_code == 422
        assert "'fr' or 'en'" in unknown.text
        # A LIKE wildcard in the prefix is taken literally.
        wild = client.get(
            "/v1/admin/lists/bluehats/subscribers", params={"prefix": "%"}, headers=read_key
        )
        assert wild.json()["items"] == []

    # The last: beyond any row's id, which PostgreSQL refused to compare (a 500).
    @pytest.mark.parametrize(
        "cursor", ["nope", "aWQ6eA", "!!!", "Zm9vOjE", admin.encode_cursor(MAX_ROW_ID + 1)]
    )
    def test_a_cursor_not_handed_out_is_a_clear_400(
        self, client: TestClient, read_key: dict[str, str], cursor: str
    ) -> None:
        response = client.get(
            "/v1/admin/lists/bluehats/subscribers", params={"cursor": cursor}, headers=read_key
        )
        assert response.status_code == 400
        assert response.json()["error"] == "bad_request"

    def test_an_unknown_list_is_404(self, client: TestClient, read_key: dict[str, str]) -> None:
        response = client.get("/v1/admin/lists/nope/subscribers", headers=read_key)
        assert response.status_code == 404

    def test_a_search_is_audited_with_its_filters(
        self, client: TestClient, engine: sa.Engine, read_key: dict[str, str]
    ) -> None:
        # A prefix may be a whole address: the search reads a person's record as the
        # record's own route does, and leaves the same trace.
        _subscriptions(engine, 3)
        found = client.get(
            "/v1/admin/lists/bluehats/subscribers",
            params={"prefix": "user0001@example.org", "status": "confirmed"},
            headers=read_key,
        )
        assert [item["email"] for item in found.json()["items"]] == ["user0001@example.org"]
        assert client.get("/v1/admin/lists/nope/subscribers", headers=read_key).status_code == 404
        with Session(engine) as session:
            events = session.exec(select(AuditEvent).order_by(col(AuditEvent.id))).all()
        assert [(e.actor, e.action, e.target, e.outcome) for e in events] == [
            ("dashboard", "subscribers.search", "bluehats", "ok"),
            ("dashboard", "subscribers.search", "nope", "error:list_not_found"),
        ]
        assert events[0].detail == {
            "filters": {"prefix": "user0001@example.org", "status": "confirmed"},
            "cursor": False,
        }


class TestSubscriberRecord:
    def test_the_record_holds_the_ledger_and_every_attempt_and_is_audited(
        self, client: TestClient, smtp: SmtpSink, engine: sa.Engine, read_key: dict[str, str]
    ) -> None:
        client.post("/v1/lists/bluehats/subscriptions", json={"email": "Ada@example.org"})
        client.post(link_in(smtp.mail_to("Ada@example.org", link="confirm"), "confirm"))
        done = "SELECT count(*) FROM outbox_job WHERE state = 'done'"
        wait_until(lambda: _scalar(engine, done) == 2)
        response = client.get(
            "/v1/admin/lists/bluehats/subscribers/ADA@example.org", headers=read_key
        )
        assert response.status_code == 200
        record = response.json()
        assert record["status"] == "confirmed"
        assert [e["action"] for e in record["ledger"]] == ["subscribe_requested", "confirmed"]
        kinds = sorted(job["kind"] for job in record["jobs"])
        assert kinds == ["mail", "sync"]
        assert all(job["attempt_log"][0]["outcome"] == "success" for job in record["jobs"])
        with Session(engine) as session:
            [event] = session.exec(select(AuditEvent)).all()
            assert (event.actor, event.action, event.outcome) == (
                "dashboard",
                "subscriber.read",
                "ok",
            )

    def test_an_unknown_subscriber_is_404_and_the_attempt_is_audited(
        self, client: TestClient, engine: sa.Engine, read_key: dict[str, str]
    ) -> None:
        response = client.get(
            "/v1/admin/lists/bluehats/subscribers/nobody@example.org", headers=read_key
        )
        assert response.status_code == 404
        with Session(engine) as session:
            [event] = session.exec(select(AuditEvent)).all()
            assert event.outcome == "error:not_found"

    def test_search_record_and_person_give_the_id_the_consent_proof_needs(
        self, client: TestClient, engine: sa.Engine, read_key: dict[str, str]
    ) -> None:
        client.post("/v1/lists/bluehats/subscriptions", json={"email": "ada@example.org"})
        with Session(engine) as session:
            [row] = session.exec(select(Subscription)).all()
        found = client.get(
            "/v1/admin/lists/bluehats/subscribers", params={"prefix": "ada"}, headers=read_key
        ).json()["items"]
        record = client.get(
            "/v1/admin/lists/bluehats/subscribers/ada@example.org", headers=read_key
        ).json()
        person = client.get("/v1/admin/people/ada@example.org", headers=read_key).json()
        ids = {found[0]["id"], record["id"], person["subscriptions"][0]["id"]}
        assert ids == {row.id}
        proof = client.get(f"/v1/admin/subscribers/{row.id}/consent-proof", headers=read_key)
        assert proof.status_code == 200
        assert proof.json()["subscriber_id"] == row.id


def _scalar(engine: sa.Engine, sql: str) -> int:
    with engine.connect() as connection:
        return int(connection.exec_driver_sql(sql).scalar_one())


class TestStatsAndJobs:
    def test_stats_count_states_and_days(
        self, client: TestClient, smtp: SmtpSink, engine: sa.Engine, read_key: dict[str, str]
    ) -> None:
        for email in ("a@example.org", "b@example.org", "c@example.org"):
            client.post("/v1/lists/bluehats/subscriptions", json={"email": email})
        client.post(link_in(smtp.mail_to("a@example.org", link="confirm"), "confirm"))
        stats = client.get("/v1/admin/lists/bluehats/stats", headers=read_key).json()
        assert stats["by_status"] == {"pending": 2, "confirmed": 1}
        today = utcnow().date().isoformat()
        assert stats["series"][today] == {"subscribe_requested": 3, "confirmed": 1}
        assert stats["confirmation_rate"] == pytest.approx(1 / 3, abs=1e-3)
        monthly = client.get(
            "/v1/admin/lists/bluehats/stats", params={"by": "month"}, headers=read_key
        ).json()
        assert monthly["series"][today[:7]]["subscribe_requested"] == 3
        # The dates swapped: an empty period, which read as a list without activity.
        swapped = client.get(
            "/v1/admin/lists/bluehats/stats",
            params={"since": "2026-12-01T00:00:00Z", "until": "2026-11-01T00:00:00Z"},
            headers=read_key,
        )
        assert swapped.status_code == 400
        assert swapped.json() == {
            "error": "bad_request",
            "detail": "since (2026-12-01T00:00:00+00:00) is not before until "
            "(2026-11-01T00:00:00+00:00): the period is empty; give since before until.",
        }


class TestDeadJobs:
    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        # No worker in the app: a retried job would be claimed again at once, and this
        # test reads the state the retry leaves.
        return settings.model_copy(update={"run_worker": False})

    def test_dead_jobs_are_listed_and_retried(
        self,
        client: TestClient,
        engine: sa.Engine,
        read_key: dict[str, str],
        write_key: dict[str, str],
    ) -> None:
        now = utcnow()
        with db.session_scope(engine) as session:
            session.add(
                OutboxJob(
                    kind=JobKind.SYNC,
                    payload={"list_id": 1, "address": "x@example.org", "action": "remove"},
                    state=JobState.DEAD,
                    attempts=10,
                    next_attempt_at=now,
                    last_error="HTTP 400 from the backend",
                )
            )
        jobs = client.get("/v1/admin/jobs", params={"state": "dead"}, headers=read_key).json()
        assert [job["last_error"] for job in jobs] == ["HTTP 400 from the backend"]
        # A job running or done has not failed: asking for those listed every failed job.
        for state in ("running", "done"):
            refused = client.get("/v1/admin/jobs", params={"state": state}, headers=read_key)
            assert refused.status_code == 422
            assert refused.json()["detail"] == "query.state: Input should be 'dead' or 'pending'"
        job_id = jobs[0]["id"]
        retried = client.post(f"/v1/admin/jobs/{job_id}/retry", headers=write_key)
        assert retried.json() == {"retried": 1}
        with Session(engine) as session:
            job = session.get(OutboxJob, job_id)
            assert job is not None
            assert (job.state, job.attempts) == ("pending", 0)
        assert client.post("/v1/admin/jobs/999999/retry", headers=write_key).status_code == 404
        audit_log = client.get("/v1/admin/audit", headers=read_key).json()
        assert [(a["action"], a["outcome"]) for a in audit_log] == [
            ("job.retry", "error:not_found"),
            ("job.retry", "ok"),
            ("jobs.list", "ok"),
        ]
        # The list names addresses (this removal's): who read it is on record, and how.
        assert (audit_log[2]["actor"], audit_log[2]["detail"]) == (
            "dashboard",
            {"filters": {"state": "dead"}},
        )


class TestARouteThatTakesNoBody:
    """`POST /v1/admin/jobs/retry` retries every failed job; a body sent with it (as if it
    chose the jobs: `{"ids": [12]}`) was ignored, and every job went back in the queue."""

    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        return settings.model_copy(update={"run_worker": False})

    def test_a_body_is_refused_and_nothing_is_retried(
        self, client: TestClient, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        with db.session_scope(engine) as session:
            dead = [
                OutboxJob(
                    kind=JobKind.SYNC,
                    payload={},
                    state=JobState.DEAD,
                    attempts=10,
                    next_attempt_at=utcnow(),
                    last_error="HTTP 400 from the backend",
                )
                for _ in range(2)
            ]
            session.add_all(dead)
            session.flush()
            first = dead[0].id
        for path in ("/v1/admin/jobs/retry", f"/v1/admin/jobs/{first}/retry"):
            refused = client.post(path, json={"ids": [first]}, headers=write_key)
            assert refused.status_code == 422, (path, refused.text)
            assert refused.json() == {
                "error": "validation_error",
                "detail": "this route takes no body: send none",
            }
        with Session(engine) as session:
            states = session.exec(select(OutboxJob.state)).all()
        assert states == ["dead", "dead"]
        refused = client.post("/v1/admin/lists/bluehats/reconcile", json={}, headers=write_key)
        assert refused.status_code == 422, refused.text
        # Without a body, as ever.
        retried = client.post("/v1/admin/jobs/retry", headers=write_key)
        assert retried.json() == {"retried": 2}


class TestABodyNamingAFieldTwice:
    """`{"name": "A", "name": "B"}` has no one meaning (a proxy or a script may read the
    first, FastAPI took the last): refused, as on the public routes."""

    @pytest.mark.parametrize("first", ["Gazette A", "Gazette B"])
    def test_a_list_change_naming_a_field_twice_is_400_and_changes_nothing(
        self, client: TestClient, write_key: dict[str, str], first: str
    ) -> None:
        made = client.post(
            "/v1/admin/lists", json={"slug": "made-here", "name": "Made here"}, headers=write_key
        )
        assert made.status_code == 201, made.text
        other = "Gazette A" if first == "Gazette B" else "Gazette B"
        body = f'{{"name": "{first}", "consent_version": "2", "name": "{other}"}}'
        refused = client.patch(
            "/v1/admin/lists/made-here",
            content=body,
            headers={**write_key, "content-type": "application/json"},
        )
        assert refused.status_code == 400, refused.text
        assert refused.json() == {
            "error": "invalid_body",
            "detail": "The body names 'name' more than once.",
        }
        shown = client.get("/v1/admin/lists/made-here", headers=write_key).json()
        assert shown["name"] == "Made here"

    def test_a_new_list_naming_its_slug_twice_is_not_made(
        self, client: TestClient, write_key: dict[str, str]
    ) -> None:
        body = '{"slug": "first-one", "name": "Twice", "slug": "second-one"}'
        refused = client.post(
            "/v1/admin/lists",
            content=body,
            headers={**write_key, "content-type": "application/json"},
        )
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == "invalid_body"
        for slug in ("first-one", "second-one"):
            assert client.get(f"/v1/admin/lists/{slug}", headers=write_key).status_code == 404

    def test_a_body_that_is_not_json_is_still_said_so(
        self, client: TestClient, write_key: dict[str, str]
    ) -> None:
        refused = client.post(
            "/v1/admin/lists",
            content='{"slug": "x",',
            headers={**write_key, "content-type": "application/json"},
        )
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == "invalid_body"


class TestKeysCommand:
    def test_create_list_and_revoke_from_the_command_line(
        self, client: TestClient, database_url: str, settings: Settings, tmp_path: Path
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        env.update(NEWSLETTER_DATABASE_URL=database_url, NEWSLETTER_SECRET_KEY=SECRET)

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [NEWSLETTER, "keys", *args], env=env, cwd=tmp_path, capture_output=True,
                text=True, timeout=60, check=False,
            )  # fmt: skip

        made = run("create", "--name", "ci-export", "--scope", "read")
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip()
        assert key.startswith("nlk_")
        assert run("create", "--name", "ci-export").returncode == 1
        assert run("create", "--name", "x", "--scope", "admin").returncode == 2
        headers = {"authorization": f"Bearer {key}"}
        assert client.get("/v1/admin/lists", headers=headers).status_code == 200
        listed = run("list")
        assert "ci-export\tread" in listed.stdout
        assert key not in listed.stdout
        assert run("revoke", "ci-export").returncode == 0
        assert client.get("/v1/admin/lists", headers=headers).status_code == 401
        assert run("revoke", "nobody").returncode == 1


class TestDatesWithoutZone:
    def test_search_and_stats_read_zoneless_dates_as_utc(
        self, client: TestClient, engine: sa.Engine, read_key: dict[str, str]
    ) -> None:
        _subscriptions(engine, 3)
        for path, params in (
            ("/v1/admin/lists/bluehats/subscribers", {"created_after": "2000-01-01T00:00:00"}),
            ("/v1/admin/lists/bluehats/stats", {"since": "2000-01-01T00:00:00"}),
            ("/v1/admin/audit", {"since": "2000-01-01T00:00:00"}),
        ):
            response = client.get(path, params=params, headers=read_key)
            assert response.status_code == 200, (path, response.text)
        page = client.get(
            "/v1/admin/lists/bluehats/subscribers",
            params={"created_after": "2000-01-01T00:00:00"},
            headers=read_key,
        ).json()
        assert len(page["items"]) == 3

    def test_a_date_out_of_range_once_in_utc_is_422_everywhere(
        self, client: TestClient, engine: sa.Engine, read_key: dict[str, str]
    ) -> None:
        _subscriptions(engine, 1)
        before_year_1 = "0001-01-01T00:00:00+14:00"
        after_year_9999 = "9999-12-31T23:59:59-14:00"
        for path, name in (
            ("/v1/admin/lists/bluehats/subscribers", "created_after"),
            ("/v1/admin/lists/bluehats/subscribers", "confirmed_before"),
            ("/v1/admin/lists/bluehats/stats", "since"),
            ("/v1/admin/lists/bluehats/stats", "until"),
            ("/v1/admin/lists/bluehats/export", "created_after"),
            ("/v1/admin/audit", "since"),
        ):
            for value in (before_year_1, after_year_9999):
                response = client.get(path, params={name: value}, headers=read_key)
                assert response.status_code == 422, (path, name, value, response.text)
                assert "out of range" in response.json()["detail"]
        # The extremes that fit stay accepted.
        page = client.get(
            "/v1/admin/lists/bluehats/subscribers",
            params={"created_after": "0001-01-01T00:00:00-14:00"},
            headers=read_key,
        )
        assert page.status_code == 200
        assert len(page.json()["items"]) == 1


class TestAZoneTypedInAUrl:
    """`?created_after=2026-11-30T10:00:00+01:00` typed as is (curl, a browser's address
    bar): a query's `+` reads as a space, and the offset arrived as ` 01:00`."""

    @pytest.mark.parametrize(
        ("path", "name"),
        [
            ("/v1/admin/lists/bluehats/subscribers", "created_after"),
            ("/v1/admin/lists/bluehats/subscribers", "confirmed_before"),
            ("/v1/admin/lists/bluehats/export", "created_after"),
            ("/v1/admin/lists/bluehats/stats", "since"),
            ("/v1/admin/audit", "since"),
        ],
    )
    def test_the_plus_of_an_offset_is_read_as_a_plus(
        self, client: TestClient, engine: sa.Engine, read_key: dict[str, str], path: str, name: str
    ) -> None:
        _subscriptions(engine, 1)
        for typed, encoded in (
            ("2000-01-01T10:00:00+01:00", "2000-01-01T10%3A00%3A00%2B01%3A00"),
            ("2000-01-01 10:00+0130", "2000-01-01%2010%3A00%2B0130"),
        ):
            as_typed = client.get(f"{path}?{name}={typed}", headers=read_key)
            assert as_typed.status_code == 200, (typed, as_typed.text)
            assert as_typed.text == client.get(f"{path}?{name}={encoded}", headers=read_key).text


class TestATagTypedInAUrl:
    def test_a_prefix_s_plus_typed_as_is_finds_the_tagged_address(
        self, client: TestClient, engine: sa.Engine, read_key: dict[str, str]
    ) -> None:
        # `?prefix=camille+news@` typed as is (curl, an address bar): a query's `+` reads as
        # a space, and no address holds one: the search found nobody.
        with db.session_scope(engine) as session:
            mailing_list = lists.get(session, slug="bluehats")
            for email in ("camille+news@example.org", "camille@example.org"):
                session.add(
                    Subscription(
                        list_id=mailing_list.id,
                        email=email,
                        email_key=email,
                        status="confirmed",
                        locale="fr",
                        consent_version="2026-11",
                        created_at=utcnow(),
                        confirmed_at=utcnow(),
                    )
                )
        path = "/v1/admin/lists/bluehats/subscribers"
        for typed in ("camille+news@", "camille+", "Camille+News@example.org"):
            page = client.get(f"{path}?prefix={typed}", headers=read_key)
            assert page.status_code == 200, page.text
            assert [item["email"] for item in page.json()["items"]] == [
                "camille+news@example.org"
            ], typed
        exported = client.get(
            "/v1/admin/lists/bluehats/export?format=jsonl&prefix=camille+news@", headers=read_key
        )
        assert [json.loads(line)["email"] for line in exported.text.splitlines()] == [
            "camille+news@example.org"
        ]


class TestPeriodsThatHoldNothing:
    """A range whose start is not before its end found nothing, which read as "nobody
    subscribed then" or "nobody did anything": refused as the stats refuse it. Every bound
    pair is `start <= t < end`, so a range that starts where it ends holds nothing either."""

    @pytest.mark.parametrize(
        ("path", "start", "end"),
        [
            ("/v1/admin/audit", "since", "until"),
            ("/v1/admin/lists/bluehats/subscribers", "created_after", "created_before"),
            ("/v1/admin/lists/bluehats/subscribers", "confirmed_after", "confirmed_before"),
            ("/v1/admin/lists/bluehats/export", "created_after", "created_before"),
            ("/v1/admin/lists/bluehats/export", "confirmed_after", "confirmed_before"),
        ],
    )
    def test_a_range_ending_before_or_where_it_starts_is_400_naming_both(
        self, client: TestClient, engine: sa.Engine, read_key: dict[str, str],
        path: str, start: str, end: str,
    ) -> None:  # fmt: skip
        _subscriptions(engine, 2)
        for begin, finish in (("2026-12-01T00:00:00Z", "2026-11-01T00:00:00Z"),
                              ("2026-11-01T00:00:00Z", "2026-11-01T00:00:00Z")):  # fmt: skip
            response = client.get(path, params={start: begin, end: finish}, headers=read_key)
            assert response.status_code == 400, (path, response.text)
            assert response.json() == {
                "error": "bad_request",
                "detail": f"{start} ({begin[:-1]}+00:00) is not before {end} ({finish[:-1]}"
                f"+00:00): the period is empty; give {start} before {end}.",
            }
        # A range that holds time still answers.
        fine = client.get(
            path,
            params={start: "2000-01-01T00:00:00Z", end: "2100-01-01T00:00:00Z"},
            headers=read_key,
        )
        assert fine.status_code == 200, (path, fine.text)


class TestReconcileRequest:
    @pytest.fixture
    def listmonk(self) -> Iterator[FakeListmonk]:
        with FakeListmonk() as fake:
            yield fake

    @pytest.fixture
    def settings(self, database_url: str, smtp: SmtpSink, listmonk: FakeListmonk) -> Settings:
        backend = {
            "kind": "listmonk", "base_url": listmonk.url, "username": listmonk.username,
            "api_token": listmonk.token, "list_id": 3,
        }  # fmt: skip
        return make_settings(
            database_url,
            smtp_port=smtp.port,
            lists=[
                {"slug": "bluehats", "name": "Gazette BlueHats", "backend": backend},
                {"slug": "local", "name": "Local"},
            ],
        )

    def test_an_operator_triggers_a_reconciliation_the_worker_runs(
        self,
        client: TestClient,
        engine: sa.Engine,
        write_key: dict[str, str],
        listmonk: FakeListmonk,
    ) -> None:
        # Added in listmonk's admin, without consent recorded here.
        listmonk.seed("stranger@example.org", lists={3: "confirmed"})
        first = client.post("/v1/admin/lists/bluehats/reconcile", headers=write_key)
        assert first.status_code == 202
        assert first.json()["kind"] == "reconcile"
        assert client.post("/v1/admin/lists/nope/reconcile", headers=write_key).status_code == 404
        # The in-process worker runs it against the list's backend, and applies the fix.
        job_id = first.json()["id"]
        wait_until(lambda: _state(engine, job_id) == "done")
        wait_until(
            lambda: (
                (listmonk.subscriber("stranger@example.org") or {})["lists"].get(3)
                == "unsubscribed"
            )
        )

    def test_a_list_without_a_backend_is_refused_rather_than_all_its_members_missing(
        self,
        client: TestClient,
        engine: sa.Engine,
        write_key: dict[str, str],
    ) -> None:
        made = client.post(
            "/v1/admin/lists", json={"slug": "made-here", "name": "Made here"}, headers=write_key
        )
        assert made.status_code == 201, made.text
        # Declared with backend kind none, and created through the API (no backend at all).
        for slug in ("local", "made-here"):
            refused = client.post(f"/v1/admin/lists/{slug}/reconcile", headers=write_key)
            assert refused.status_code == 409
            assert refused.json() == {
                "error": "list_without_backend",
                "detail": f"List {slug!r} has no mailing-list backend (its backend kind is "
                "none, or the settings do not declare it): there is no member list to "
                "compare with. Declare its backend in NEWSLETTER_LISTS first.",
            }
        with Session(engine) as session:
            assert (
                session.exec(select(OutboxJob).where(OutboxJob.kind == JobKind.RECONCILE)).all()
                == []
            )


def _state(engine: sa.Engine, job_id: int) -> str | None:
    with Session(engine) as session:
        job = session.get(OutboxJob, job_id)
        return None if job is None else job.state


# Out-of-range and unreadable input (PostgreSQL refuses both with an error, SQLite does not:
# these cases matter most under TEST_DATABASE_URL).
BEYOND_BIGINT = "9" * 24
NUL = "\x00"


class TestInputTheDatabaseWouldRefuse:
    @pytest.mark.parametrize(
        "cursor_id", [BEYOND_BIGINT, "2147483648", "9223372036854775807", "0" * 50 + "1"]
    )
    def test_a_cursor_past_the_id_range_is_a_clear_400(
        self, client: TestClient, read_key: dict[str, str], cursor_id: str
    ) -> None:
        cursor = base64.urlsafe_b64encode(f"id:{cursor_id}".encode()).decode()
        response = client.get(
            "/v1/admin/lists/bluehats/subscribers", params={"cursor": cursor}, headers=read_key
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "bad_request"

    def test_the_last_id_in_range_is_a_valid_cursor(
        self, client: TestClient, read_key: dict[str, str]
    ) -> None:
        cursor = base64.urlsafe_b64encode(f"id:{2**31 - 1}".encode()).decode()
        response = client.get(
            "/v1/admin/lists/bluehats/subscribers", params={"cursor": cursor}, headers=read_key
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"items": [], "next_cursor": None}

    @pytest.mark.parametrize(
        ("method", "path", "params"),
        [
            ("POST", f"/v1/admin/jobs/{BEYOND_BIGINT}/retry", {}),
            ("DELETE", f"/v1/admin/blocks/{BEYOND_BIGINT}", {}),
            ("GET", f"/v1/admin/subscribers/{BEYOND_BIGINT}/consent-proof", {}),
            ("GET", "/v1/admin/subscribers/2147483648/consent-proof", {}),
            ("GET", "/v1/admin/audit", {"before_id": BEYOND_BIGINT}),
        ],
    )
    def test_an_id_past_the_column_range_is_refused_before_the_database(
        self,
        client: TestClient,
        write_key: dict[str, str],
        method: str,
        path: str,
        params: dict[str, str],
    ) -> None:
        response = client.request(method, path, params=params, headers=write_key)
        # Documented as the parameter's maximum in openapi.json.
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "validation_error"

    @pytest.mark.parametrize("character", [NUL, "\x1f"])
    @pytest.mark.parametrize(
        ("method", "path", "params", "where"),
        [
            ("GET", "/v1/admin/lists/bluehats/subscribers", {"prefix": "ada{c}"}, "query.prefix"),
            ("GET", "/v1/admin/lists/bluehats/subscribers", {"locale": "f{c}"}, "query.locale"),
            ("GET", "/v1/admin/lists/bluehats/export", {"prefix": "{c}"}, "query.prefix"),
            ("GET", "/v1/admin/lists/bluehats/export", {"locale": "{c}"}, "query.locale"),
            ("GET", "/v1/admin/audit", {"actor": "a{c}"}, "query.actor"),
            ("GET", "/v1/admin/audit", {"action": "{c}"}, "query.action"),
            ("GET", "/v1/admin/audit", {"target": "bluehats:{c}"}, "query.target"),
            ("GET", "/v1/admin/lists/blue{c}hats", {}, "path.slug"),
            ("PATCH", "/v1/admin/lists/blue{c}hats", {}, "path.slug"),
            ("GET", "/v1/admin/lists/blue{c}hats/subscribers", {}, "path.slug"),
            ("GET", "/v1/admin/lists/blue{c}hats/stats", {}, "path.slug"),
            ("POST", "/v1/admin/lists/blue{c}hats/reconcile", {}, "path.slug"),
            ("GET", "/v1/admin/lists/blue{c}hats/export", {}, "path.slug"),
            ("POST", "/v1/admin/lists/blue{c}hats/import", {}, "path.slug"),
            ("POST", "/v1/admin/lists/blue{c}hats/subscribers", {}, "path.slug"),
            ("GET", "/v1/admin/lists/bluehats/subscribers/ada{c}@example.org", {}, "path.email"),
            (
                "POST",
                "/v1/admin/lists/bluehats/subscribers/ada{c}@example.org/unsubscribe",
                {},
                "path.email",
            ),
            ("GET", "/v1/admin/people/ada{c}@example.org", {}, "path.email"),
            ("DELETE", "/v1/admin/people/ada{c}@example.org", {}, "path.email"),
        ],
    )
    def test_a_control_character_in_a_url_is_422(
        self,
        client: TestClient,
        engine: sa.Engine,
        write_key: dict[str, str],
        method: str,
        path: str,
        params: dict[str, str],
        where: str,
        character: str,
    ) -> None:
        encoded = quote(character)
        response = client.request(
            method,
            path.format(c=encoded),
            params={name: value.format(c=character) for name, value in params.items()},
            headers=write_key,
        )
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["error"] == "validation_error"
        assert body["detail"].startswith(f"{where}: ")
        with Session(engine) as session:
            assert session.exec(select(OutboxJob)).all() == []

    def test_a_control_character_in_the_import_note_is_422_and_a_line_break_is_kept(
        self, client: TestClient, write_key: dict[str, str]
    ) -> None:
        csv = b"email,consent_source,consent_date\nada@example.org,paper form,2026-01-02\n"
        headers = {**write_key, "content-type": "text/csv"}
        path = "/v1/admin/lists/bluehats/import"
        refused = client.post(path, params={"note": f"box{NUL}3"}, content=csv, headers=headers)
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"].startswith("query.note: ")
        kept = client.post(
            path, params={"note": "box 3\nshelf 2", "dry_run": "true"}, content=csv, headers=headers
        )
        assert kept.status_code == 200, kept.text


class TestListNames:
    """A list's name goes into its pages' titles and its mails' Subject, its consent version
    into the ledger as the proof's wording: neither may be blank."""

    @pytest.mark.parametrize("field", ["name", "consent_version"])
    @pytest.mark.parametrize("value", [" ", "\u00a0", "   \u3000"])
    def test_a_blank_name_or_version_is_422_on_create_and_on_change(
        self, client: TestClient, write_key: dict[str, str], field: str, value: str
    ) -> None:
        created = client.post(
            "/v1/admin/lists",
            json={"slug": "made-here", "name": "Made here", field: value},
            headers=write_key,
        )
        assert created.status_code == 422, created.text
        assert created.json()["detail"] == f"{field}: must not be blank"
        assert client.get("/v1/admin/lists/made-here", headers=write_key).status_code == 404
        changed = client.patch("/v1/admin/lists/bluehats", json={field: value}, headers=write_key)
        assert changed.status_code == 422, changed.text
        assert changed.json()["detail"] == f"{field}: must not be blank"
        assert client.get("/v1/admin/lists/bluehats", headers=write_key).json()[field].strip()

    def test_spaces_around_a_name_are_left_out(
        self, client: TestClient, write_key: dict[str, str]
    ) -> None:
        created = client.post(
            "/v1/admin/lists",
            json={"slug": "made-here", "name": "  Made here ", "consent_version": " v2 "},
            headers=write_key,
        )
        assert created.status_code == 201, created.text
        assert (created.json()["name"], created.json()["consent_version"]) == ("Made here", "v2")
