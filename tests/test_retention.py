"""Retention: data built at several ages (the domain functions take `now`), one run, and
exactly what went and what stayed; the worker runs it on schedule; the CLI prints counts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from app import (
    addresses,
    blocklist,
    db,
    lists,
    outbox,
    privacy,
    retention,
    subscriptions,
    tokens,
    transfer,
)
from app.config import Settings
from app.mailer import make_mailer
from app.main import create_app
from app.models import (
    AuditEvent,
    BlockKind,
    ConsentEvent,
    DeliveryAttempt,
    OutboxJob,
    Subscription,
    Token,
    TokenPurpose,
    utcnow,
)
from app.worker import Worker
from tests.conftest import SECRET, SmtpSink, make_settings, wait_until

NEWSLETTER = str(Path(sys.executable).with_name("newsletter"))
KEY = SECRET.encode()
NOW = utcnow()
DAY = timedelta(days=1)


@pytest.fixture
def quiet_settings(database_url: str, smtp: SmtpSink) -> Settings:
    # No in-process worker: the jobs stay as the requests left them, so counts are exact.
    return make_settings(database_url, smtp_port=smtp.port, run_worker=False)


@pytest.fixture
def quiet_client(quiet_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(quiet_settings)) as test_client:
        yield test_client


def _evidence(ip: str) -> subscriptions.Evidence:
    return subscriptions.Evidence(
        source="form", source_url="https://code.gouv.fr/", ip=ip, user_agent="Firefox/140"
    )


def subscribe(
    engine: sa.Engine, email: str, *, at: datetime, ip: str = "192.0.2.77", slug: str = "bluehats"
) -> None:
    with db.session_scope(engine) as session:
        subscriptions.subscribe(
            session, list_slug=slug, address=addresses.parse(email, new=True), locale=None,
            fallback_locale=None, attributes={"name": "Ada"}, evidence=_evidence(ip), key=KEY,
            now=at, resend_interval=timedelta(minutes=5),
        )  # fmt: skip


def _row(session: Session, email: str) -> Subscription:
    return session.exec(select(Subscription).where(Subscription.email_key == email)).one()


def _secret(session: Session, email: str, purpose: TokenPurpose) -> str:
    row = _row(session, email)
    assert row.id is not None
    token = tokens.live(session, subscription_id=row.id, purpose=purpose)
    assert token is not None
    return tokens.secret_for(token, key=KEY)


def confirm(engine: sa.Engine, email: str, *, at: datetime, ip: str = "192.0.2.78") -> None:
    with db.session_scope(engine) as session:
        secret = _secret(session, email, TokenPurpose.CONFIRM)
        subscriptions.confirm(session, secret=secret, evidence=_evidence(ip), key=KEY, now=at)


def unsubscribe(engine: sa.Engine, email: str, *, at: datetime) -> str:
    """Unsubscribe by link; returns the link's secret (it must keep working)."""
    with db.session_scope(engine) as session:
        secret = _secret(session, email, TokenPurpose.UNSUBSCRIBE)
        subscriptions.unsubscribe(
            session, secret=secret, evidence=_evidence("2001:db8:1:2::5"), now=at,
            send_goodbye=False,
        )  # fmt: skip
    return secret


@dataclass
class World:
    left_secret: str


def build(engine: sa.Engine) -> World:
    """Subscribers at several ages, each at an edge of the policy (defaults: pending 30 d,
    IPs cut after 30 d and dropped after 395 d, departed minimised after 90 d)."""
    with db.session_scope(engine) as session:
        # A list whose confirm links live 60 days: an old request there is still live.
        lists.create(
            session, slug="slow", name="Slow", default_locale="fr", consent_version="1",
            confirm_ttl_seconds=int((60 * DAY).total_seconds()), thank_you_url=None,
            landing_url=None, declared=[], now=NOW - 50 * DAY,
        )  # fmt: skip
    subscribe(engine, "old-pending@example.org", at=NOW - 40 * DAY)
    subscribe(engine, "fresh-pending@example.org", at=NOW - 1 * DAY)
    subscribe(engine, "asked-again@example.org", at=NOW - 40 * DAY)
    subscribe(engine, "asked-again@example.org", at=NOW - 29 * DAY)
    subscribe(engine, "live-link@example.org", at=NOW - 40 * DAY, slug="slow")
    subscribe(engine, "confirmed@example.org", at=NOW - 400 * DAY)
    confirm(engine, "confirmed@example.org", at=NOW - 399 * DAY)
    subscribe(engine, "left@example.org", at=NOW - 200 * DAY)
    confirm(engine, "left@example.org", at=NOW - 199 * DAY)
    left_secret = unsubscribe(engine, "left@example.org", at=NOW - 100 * DAY)
    subscribe(engine, "came-back@example.org", at=NOW - 300 * DAY)
    confirm(engine, "came-back@example.org", at=NOW - 299 * DAY)
    unsubscribe(engine, "came-back@example.org", at=NOW - 100 * DAY)
    subscribe(engine, "came-back@example.org", at=NOW - 40 * DAY)
    subscribe(engine, "left-lately@example.org", at=NOW - 20 * DAY)
    confirm(engine, "left-lately@example.org", at=NOW - 19 * DAY)
    unsubscribe(engine, "left-lately@example.org", at=NOW - 10 * DAY)
    return World(left_secret=left_secret)


def _events(session: Session, email: str) -> list[ConsentEvent]:
    row = _row(session, email)
    return list(
        session.exec(
            select(ConsentEvent)
            .where(ConsentEvent.subscription_id == row.id)
            .order_by(col(ConsentEvent.id))
        ).all()
    )


def _run(engine: sa.Engine, settings: Settings) -> retention.Report:
    with db.session_scope(engine) as session:
        return retention.run(
            session, policy=retention.Policy.from_settings(settings), key=KEY, now=NOW
        )


class TestRetentionRun:
    def test_what_goes_and_what_stays(
        self, quiet_client: TestClient, engine: sa.Engine, quiet_settings: Settings
    ) -> None:
        world = build(engine)
        report = _run(engine, quiet_settings)

        with Session(engine) as session:
            remaining = {row.email_key: row for row in session.exec(select(Subscription)).all()}
            # The old request nobody confirmed is gone, with its tokens and jobs...
            assert "old-pending@example.org" not in remaining
            hashed = privacy.address_hash("old-pending@example.org", key=KEY)
            [kept] = session.exec(
                select(ConsentEvent).where(ConsentEvent.address_hash == hashed)
            ).all()
            # ...its ledger event kept under the keyed hash, without the evidence.
            assert (kept.subscription_id, kept.action) == (None, "subscribe_requested")
            assert (kept.ip, kept.user_agent, kept.source_url) == (None, None, None)
            # Live requests stay: a recent one, one asked again lately, a live 60-day link.
            for email in (
                "fresh-pending@example.org",
                "asked-again@example.org",
                "live-link@example.org",
            ):
                assert remaining[email].status == "pending", email
                assert (
                    tokens.live(
                        session, subscription_id=remaining[email].id or 0,
                        purpose=TokenPurpose.CONFIRM,
                    )
                    is not None
                ), email  # fmt: skip
            # A confirmed subscriber is untouched but for the evidence's age: IPs over
            # 395 days dropped, its used confirm link gone, its unsubscribe link kept.
            confirmed = remaining["confirmed@example.org"]
            assert confirmed.status == "confirmed"
            assert confirmed.attributes == {"name": "Ada"}
            assert [e.ip for e in _events(session, "confirmed@example.org")] == [None, None]
            assert [e.user_agent for e in _events(session, "confirmed@example.org")] == [
                "Firefox/140",
                "Firefox/140",
            ]
            purposes = session.exec(
                select(Token.purpose).where(Token.subscription_id == confirmed.id)
            ).all()
            assert purposes == ["unsubscribe"]
            # Someone who left 100 days ago: reduced to the proof of the opt-out.
            left = remaining["left@example.org"]
            assert (left.status, left.attributes, left.last_mail_at) == ("unsubscribed", {}, None)
            left_events = _events(session, "left@example.org")
            assert [e.action for e in left_events] == [
                "subscribe_requested",
                "confirmed",
                "unsubscribed",
            ]
            assert [e.user_agent for e in left_events] == [None, None, None]
            assert [e.source_url for e in left_events] == [None, None, None]
            # IPs between 30 and 395 days old: truncated to their network.
            assert [e.ip for e in left_events] == [
                "192.0.2.0/24",
                "192.0.2.0/24",
                "2001:db8:1::/48",
            ]
            # An unconfirmed request after an opt-out: the opt-out stands again.
            came_back = remaining["came-back@example.org"]
            assert came_back.status == "unsubscribed"
            assert _events(session, "came-back@example.org")[-1].action == "request_expired"
            # Left ten days ago: not minimised yet.
            lately = remaining["left-lately@example.org"]
            assert lately.attributes == {"name": "Ada"}
            assert {e.user_agent for e in _events(session, "left-lately@example.org")} == {
                "Firefox/140"
            }
            assert [e.ip for e in _events(session, "left-lately@example.org")] == [
                "192.0.2.77",
                "192.0.2.78",
                "2001:db8:1:2::5",
            ]
            # No job is left about the purged row; the opt-outs' pending syncs remain.
            pending_syncs = session.exec(
                select(OutboxJob.subscription_id).where(
                    OutboxJob.kind == "sync", OutboxJob.state == "pending"
                )
            ).all()
            assert left.id in pending_syncs

        assert report.as_dict() == {
            "pending_purged": 1,
            "pending_reverted": 1,
            # old-pending's link; came-back's two (one used, one expired); the used links
            # of confirmed and left; asked-again's first, expired 38 days ago.
            "tokens_purged": 6,
            # The confirmation mails of old-pending (1) and came-back (2); no worker ran.
            "jobs_purged": 3,
            # Events 30 to 395 days old with an IP: left 3, came-back 4, asked-again and
            # live-link 1 each (their first request).
            "ips_truncated": 9,
            # confirmed's two events, 399 and 400 days old.
            "ips_dropped": 2,
            "records_minimized": 2,
            # left's three events and came-back's four.
            "events_minimized": 7,
        }
        # A second run finds nothing left to do.
        again = _run(engine, quiet_settings)
        assert set(again.as_dict().values()) == {0}

        # The opt-out is still honoured: its link works, an import leaves it alone, a
        # backend event does not bring it back.
        response = quiet_client.post(
            f"/v1/unsubscribe/{world.left_secret}",
            data={"List-Unsubscribe": "One-Click"},
        )
        assert response.status_code == 200
        with db.session_scope(engine) as session:
            subscriptions.apply_backend_event(
                session, list_slug="bluehats",
                address=addresses.parse("left@example.org", new=False),
                event="unsubscribed", evidence=subscriptions.Evidence(source="backend"), now=NOW,
            )  # fmt: skip
        report_import = self._import_confirmed(engine, "left@example.org")
        assert (report_import.created, report_import.unchanged) == (0, 1)
        with Session(engine) as session:
            assert _row(session, "left@example.org").status == "unsubscribed"

    @staticmethod
    def _import_confirmed(engine: sa.Engine, email: str) -> transfer.ImportReport:
        import io

        body = f"email,consent_source,consent_date\n{email},Paper form,2025-01-01\n"
        return transfer.import_csv(
            lambda: db.session_scope(engine), source=io.BytesIO(body.encode()),
            list_slug="bluehats", mode=transfer.ImportMode.CONFIRMED, dry_run=False,
            operator="test", note=None, key=KEY, resend_interval=timedelta(minutes=5), now=NOW,
        )  # fmt: skip

    def test_a_purge_cannot_outrun_a_confirm_link(self, database_url: str) -> None:
        with pytest.raises(ValueError, match="RETENTION_PENDING"):
            make_settings(
                database_url, smtp_port=25, retention_pending="2d",
                lists=[{"slug": "b", "name": "B", "confirm_ttl": "3d"}],
            )  # fmt: skip
        with pytest.raises(ValueError, match="RETENTION_IP_DROP"):
            make_settings(
                database_url, smtp_port=25, retention_ip_truncate="30d", retention_ip_drop="7d"
            )


class TestBlockedRequests:
    def test_an_old_blocked_request_keeps_only_its_hash(
        self, quiet_client: TestClient, quiet_settings: Settings, engine: sa.Engine
    ) -> None:
        with db.session_scope(engine) as session:
            blocklist.add(
                session, kind=BlockKind.ADDRESS, value="spam@example.org", reason="abuse",
                actor="test", now=NOW - 200 * DAY,
            )  # fmt: skip
        subscribe(engine, "spam@example.org", at=NOW - 91 * DAY)
        subscribe(engine, "spam@example.org", at=NOW - 89 * DAY)
        hashed = privacy.address_hash("spam@example.org", key=KEY)

        def evidence() -> list[tuple[str | None, str | None, str | None]]:
            with Session(engine) as session:
                events = session.exec(
                    select(ConsentEvent)
                    .where(ConsentEvent.address_hash == hashed)
                    .order_by(col(ConsentEvent.occurred_at))
                ).all()
                assert all(e.status_after == "blocked" and e.subscription_id is None
                           for e in events)  # fmt: skip
                return [(e.ip, e.user_agent, e.source_url) for e in events]

        assert len(evidence()) == 2
        report = _run(engine, quiet_settings)
        assert report.events_minimized == 1
        assert evidence() == [
            (None, None, None),
            ("192.0.2.0/24", "Firefox/140", "https://code.gouv.fr/"),
        ]
        # Nothing left to clear: a second run changes nothing.
        assert _run(engine, quiet_settings).events_minimized == 0


class TestSchedule:
    def test_the_worker_runs_it_on_schedule_and_says_what_it_removed(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = make_settings(database_url, smtp_port=smtp.port, retention_interval="0.5s")
        with TestClient(create_app(settings)):
            subscribe(engine, "old-pending@example.org", at=NOW - 40 * DAY)
            subscribe(engine, "fresh@example.org", at=NOW)

            def runs() -> list[AuditEvent]:
                with Session(engine) as session:
                    return list(
                        session.exec(
                            select(AuditEvent).where(AuditEvent.action == "retention.run")
                        ).all()
                    )

            wait_until(lambda: any(r.detail["pending_purged"] == 1 for r in runs()))
            # ...and it schedules the next run.
            wait_until(lambda: len(runs()) >= 2)
            first = next(r for r in runs() if r.detail["pending_purged"] == 1)
            assert first.actor == "worker:retention"
            with Session(engine) as session:
                emails = {row.email_key for row in session.exec(select(Subscription)).all()}
                assert emails == {"fresh@example.org"}
                responses = session.exec(
                    select(DeliveryAttempt.response)
                    .join(OutboxJob, col(OutboxJob.id) == DeliveryAttempt.job_id)
                    .where(OutboxJob.kind == "retention")
                ).all()
                assert any("pending_purged=1" in (text or "") for text in responses)
                assert session.exec(
                    select(OutboxJob).where(
                        OutboxJob.kind == "retention", OutboxJob.state == "pending"
                    )
                ).all()


class FailingRetention(Worker):
    """A worker whose retention run fails (as on a database error), for the schedule."""

    def _run_retention(self, job: outbox.ClaimedJob, *, started_at: datetime) -> None:
        raise sa.exc.OperationalError("DELETE ...", {}, Exception("database is locked"))


class TestScheduleAfterFailures:
    def test_a_run_dead_after_its_attempts_still_schedules_the_next(
        self, quiet_settings: Settings, engine: sa.Engine
    ) -> None:
        settings = quiet_settings.model_copy(
            update={"job_max_attempts": 1, "retention_interval": timedelta(hours=24)}
        )
        clock = [NOW]
        worker = FailingRetention(
            engine=engine, settings=settings, mailer=make_mailer(settings.mailer),
            now=lambda: clock[0],
        )  # fmt: skip

        def retention_jobs() -> list[tuple[str, datetime]]:
            with Session(engine) as session:
                jobs = session.exec(
                    select(OutboxJob)
                    .where(OutboxJob.kind == "retention")
                    .order_by(col(OutboxJob.id))
                ).all()
                return [(job.state, job.next_attempt_at) for job in jobs]

        worker.schedule_retention()
        assert retention_jobs() == [("pending", NOW + DAY)]
        clock[0] = NOW + DAY
        worker.run_once()
        worker.stop()
        # The failed run is dead (one attempt allowed); the next is due one interval on.
        assert [state for state, _ in retention_jobs()] == ["dead", "pending"]
        assert retention_jobs()[1][1] == NOW + 2 * DAY


class TestCommandLine:
    def test_dry_run_counts_and_changes_nothing_then_run_removes(
        self, quiet_client: TestClient, engine: sa.Engine, database_url: str, tmp_path: Path
    ) -> None:
        subscribe(engine, "old-pending@example.org", at=NOW - 40 * DAY)
        subscribe(engine, "fresh@example.org", at=NOW - 1 * DAY)
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        env.update(NEWSLETTER_DATABASE_URL=database_url, NEWSLETTER_SECRET_KEY=SECRET)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [NEWSLETTER, "retention", "run", *args], env=env, cwd=tmp_path,
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip

        dry = cli("--dry-run")
        assert dry.returncode == 0, dry.stderr
        counts = dict(line.split("\t") for line in dry.stdout.splitlines())
        assert counts["pending_purged"] == "1"
        assert counts["tokens_purged"] == "1"
        assert "nothing changed" in dry.stderr
        assert "retention.done" not in dry.stderr  # the log says what was done, not counted
        with Session(engine) as session:
            assert len(session.exec(select(Subscription)).all()) == 2
            assert not session.exec(
                select(AuditEvent).where(AuditEvent.action == "retention.run")
            ).all()

        done = cli()
        assert done.returncode == 0, done.stderr
        assert dict(line.split("\t") for line in done.stdout.splitlines()) == counts
        assert "retention.done" in done.stderr
        with Session(engine) as session:
            assert [r.email_key for r in session.exec(select(Subscription)).all()] == [
                "fresh@example.org"
            ]
            [entry] = session.exec(
                select(AuditEvent).where(AuditEvent.action == "retention.run")
            ).all()
            assert entry.actor.startswith("cli:")
            assert entry.detail["pending_purged"] == 1
