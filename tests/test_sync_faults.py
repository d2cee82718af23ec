"""Sync jobs against a Mailgun that misbehaves: every change arrives, none twice in effect.

Real parts only: the fake Mailgun of tests/fake_mailgun.py served over HTTP on loopback,
the outbox worker (in this process, or a `newsletter worker` process killed with SIGKILL)
and the database the suite runs on. Each test asserts what the fake saw, request by
request where the order matters, and what it holds at the end.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import signal
import subprocess
import sysconfig
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import col, select

from app import db, heartbeat, lists, outbox
from app.config import (
    FileMailerSettings,
    ListmonkBackendSettings,
    ListSettings,
    MailgunBackendSettings,
    Settings,
)
from app.mailer import make_mailer
from app.models import (
    AttemptOutcome,
    ConsentEvent,
    DeliveryAttempt,
    JobKind,
    JobState,
    OutboxJob,
    Subscription,
    utcnow,
)
from app.worker import Worker
from tests.conftest import SECRET, LiveServer, free_port, make_settings, wait_until
from tests.fake_listmonk import FakeListmonk
from tests.fake_mailgun import FakeMailgun, SeenRequest, StoredMember

NEWSLETTER = Path(sysconfig.get_path("scripts")) / "newsletter"
LIST = "bluehats@mail.codegouv.fr"
DOMAIN = "mail.codegouv.fr"
BULK = "/v3/lists/bluehats@mail.codegouv.fr/members.json"
ONE = "/v3/lists/bluehats@mail.codegouv.fr/members"
PUBLIC_URL = "http://testserver"


# The fake Mailgun, with the time each request arrived ------------------------------------


class Arrivals:
    """ASGI wrapper: the wall-clock time each request reached the fake, in order."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.seen: list[tuple[float, str, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            with self.lock:
                self.seen.append((time.time(), scope["method"], scope["path"]))
        await self.app(scope, receive, send)

    def times(self, method: str, path: str) -> list[float]:
        with self.lock:
            return [at for at, m, p in self.seen if (m, p) == (method, path)]


@dataclass
class Mailgun:
    fake: FakeMailgun
    base_url: str
    arrivals: Arrivals

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.raw_path) for r in self.fake.seen()]

    def bulk_calls(self) -> list[SeenRequest]:
        return [r for r in self.fake.seen() if r.raw_path == BULK]

    def held(self) -> dict[str, bool]:
        """Address -> subscribed, for every member the fake holds (one entry per member)."""
        return {m.address: m.subscribed for m in self.fake.members_of(LIST)}


@pytest.fixture
def mailgun() -> Iterator[Mailgun]:
    fake = FakeMailgun()
    fake.create_list(LIST)
    arrivals = Arrivals(fake.app())
    with LiveServer(arrivals) as base_url:
        yield Mailgun(fake=fake, base_url=base_url, arrivals=arrivals)


def addresses_in(request: SeenRequest) -> list[str]:
    return [entry["address"] for entry in json.loads(request.form["members"])]


# Settings, subscriptions and the outbox ------------------------------------------------


def backend_dict(base_url: str) -> dict[str, Any]:
    return {
        "kind": "mailgun",
        "list_address": LIST,
        "api_key": FakeMailgun.api_key,
        "base_url": base_url,
    }


def worker_settings(
    database_url: str, mailgun: Mailgun, tmp_path: Path, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "lists": [
            ListSettings(
                slug="bluehats",
                name="Gazette BlueHats",
                backend=MailgunBackendSettings(**backend_dict(mailgun.base_url)),
            )
        ],
        # The file mailer: no SMTP timeout for the settings to weigh the lease against.
        "mailer": FileMailerSettings(directory=tmp_path / "mail"),
        "backend_connect_timeout": 2,
        "backend_timeout": 5,
    }
    values.update(overrides)
    return make_settings(database_url, smtp_port=free_port(), **values)


def in_process_worker(engine: sa.Engine, settings: Settings, **kwargs: Any) -> Worker:
    return Worker(engine=engine, settings=settings, mailer=make_mailer(settings.mailer), **kwargs)


@dataclass
class Row:
    email: str
    status: str = "confirmed"
    fresh_opt_in: bool = False


def subscriptions_with_sync_jobs(
    engine: sa.Engine, settings: Settings, rows: list[Row]
) -> dict[str, int]:
    """Subscriptions in the given states, each with the sync job its last change wrote."""
    now = utcnow()
    ids = {}
    with db.session_scope(engine) as session:
        lists.sync_from_settings(session, declared=settings.lists, now=now)
        list_id = lists.get(session, slug="bluehats").id
        assert list_id is not None
        for row in rows:
            subscription = Subscription(
                list_id=list_id,
                email=row.email,
                email_key=row.email.casefold(),
                status=row.status,
                locale="fr",
                consent_version="2026-11",
                confirmed_at=now,
                unsubscribed_at=now if row.status == "unsubscribed" else None,
            )
            session.add(subscription)
            session.flush()
            assert subscription.id is not None
            ids[row.email] = subscription.id
            outbox.enqueue_sync(
                session,
                subscription_id=subscription.id,
                list_id=list_id,
                now=now,
                fresh_opt_in=row.fresh_opt_in,
            )
    return ids


def sync_jobs(engine: sa.Engine) -> list[OutboxJob]:
    with db.session_scope(engine) as session:
        query = select(OutboxJob).where(OutboxJob.kind == JobKind.SYNC)
        return list(session.exec(query.order_by(col(OutboxJob.id))).all())


def jobs_by_subscription(engine: sa.Engine) -> dict[int, OutboxJob]:
    return {job.payload["subscription_id"]: job for job in sync_jobs(engine)}


def attempts(engine: sa.Engine) -> list[DeliveryAttempt]:
    with db.session_scope(engine) as session:
        query = select(DeliveryAttempt).order_by(col(DeliveryAttempt.id))
        return list(session.exec(query).all())


def unfinished(engine: sa.Engine) -> int:
    """Sync jobs neither done nor dead (a count: cheap enough to poll)."""
    with db.session_scope(engine) as session:
        query = select(sa.func.count()).where(
            col(OutboxJob.kind) == JobKind.SYNC,
            col(OutboxJob.state).not_in([JobState.DONE, JobState.DEAD]),
        )
        return int(session.exec(query).one())


def drain(worker: Worker, engine: sa.Engine, *, timeout: float = 15.0) -> None:
    """Run rounds in this thread until every sync job is done or dead (bounded)."""
    deadline = time.monotonic() + timeout
    while unfinished(engine):
        if time.monotonic() > deadline:
            pytest.fail(f"sync jobs not finished within {timeout}s")
        if worker.run_once() == 0:
            time.sleep(0.05)


@dataclass
class Clock:
    """The worker's clock, moved by the test: backoff is checked without sleeping."""

    at: datetime = field(default_factory=utcnow)

    def __call__(self) -> datetime:
        return self.at

    def advance(self, delta: timedelta) -> None:
        self.at += delta


# Scenarios -------------------------------------------------------------------------------


class TestOutage:
    def test_503s_then_recovery_every_change_arrives_once(
        self, database_url: str, engine: sa.Engine, mailgun: Mailgun, tmp_path: Path
    ) -> None:
        settings = worker_settings(
            database_url, mailgun, tmp_path, retry_base_delay="10s", retry_max_delay="20s"
        )
        # Back after an unsubscribe at Mailgun: a fresh opt-in clears it there.
        mailgun.fake.suppress("unsubscribes", DOMAIN, "again@example.org")
        # Left here, still subscribed at Mailgun: to unsubscribe there.
        mailgun.fake.lists[LIST]["gone@example.org"] = StoredMember(
            address="gone@example.org", name="", vars={}, subscribed=True
        )
        ids = subscriptions_with_sync_jobs(
            engine,
            settings,
            [
                Row("again@example.org", fresh_opt_in=True),
                Row("Bea@example.org"),
                Row("cyd@example.org"),
                Row("gone@example.org", status="unsubscribed"),
            ],
        )
        clock = Clock()
        worker = in_process_worker(engine, settings, name="patient", now=clock)
        mailgun.fake.fail(status=503, times=3)

        # Round 1: each of the first three calls gets a 503; all four jobs wait to retry.
        assert worker.run_once() == 4
        assert mailgun.calls() == [
            ("DELETE", "/v3/mail.codegouv.fr/unsubscribes/again@example.org"),
            ("POST", BULK),
            ("PUT", f"{ONE}/gone@example.org"),
        ]
        assert addresses_in(mailgun.bulk_calls()[0]) == ["Bea@example.org", "cyd@example.org"]
        jobs = sync_jobs(engine)
        assert [(job.state, job.attempts) for job in jobs] == [(JobState.PENDING, 1)] * 4
        assert all(job.next_attempt_at >= clock.at + timedelta(seconds=10) for job in jobs)
        assert all("HTTP 503" in (job.last_error or "") for job in jobs)
        failed = attempts(engine)
        assert [a.outcome for a in failed] == [AttemptOutcome.RETRY] * 4
        assert all((a.response or "").startswith("503 ") for a in failed)

        # Not due yet: nothing is sent before the backoff has passed.
        assert worker.run_once() == 0
        assert len(mailgun.fake.seen()) == 3

        # Mailgun is back: one more round and every change has arrived.
        clock.advance(timedelta(seconds=21))
        assert worker.run_once() == 4
        assert worker.run_once() == 0
        assert mailgun.calls()[3:] == [
            ("DELETE", "/v3/mail.codegouv.fr/unsubscribes/again@example.org"),
            ("DELETE", "/v3/mail.codegouv.fr/bounces/again@example.org"),
            ("POST", BULK),
            ("PUT", f"{ONE}/gone@example.org"),
        ]
        # Two add calls in all: the refused one and the one that went through.
        [_, bulk] = mailgun.bulk_calls()
        assert sorted(addresses_in(bulk)) == [
            "Bea@example.org",
            "again@example.org",
            "cyd@example.org",
        ]
        assert mailgun.held() == {
            "again@example.org": True,
            "Bea@example.org": True,
            "cyd@example.org": True,
            "gone@example.org": False,
        }
        assert not mailgun.fake.suppressed("unsubscribes", DOMAIN, "again@example.org")
        assert [(job.state, job.attempts) for job in sync_jobs(engine)] == [(JobState.DONE, 2)] * 4
        assert [a.outcome for a in attempts(engine)[4:]] == [AttemptOutcome.SUCCESS] * 4
        with db.session_scope(engine) as session:
            [cleared] = session.exec(select(ConsentEvent)).all()
        assert cleared.subscription_id == ids["again@example.org"]
        assert cleared.detail["event"] == "suppression_cleared"


def worker_process(
    database_url: str, mailgun: Mailgun, tmp_path: Path, **env: str
) -> subprocess.Popen[bytes]:
    """`newsletter worker` as production runs it, configured by environment only."""
    variables = {
        key: value for key, value in os.environ.items() if not key.startswith("NEWSLETTER_")
    }
    variables.update(
        NEWSLETTER_DATABASE_URL=database_url,
        NEWSLETTER_SECRET_KEY=SECRET,
        NEWSLETTER_PUBLIC_URL=PUBLIC_URL,
        NEWSLETTER_LISTS=json.dumps(
            [
                {
                    "slug": "bluehats",
                    "name": "Gazette BlueHats",
                    "backend": backend_dict(mailgun.base_url),
                }
            ]
        ),
        NEWSLETTER_MAILER__KIND="file",
        NEWSLETTER_MAILER__DIRECTORY=str(tmp_path / "mail"),
        NEWSLETTER_AUTO_MIGRATE="false",
        NEWSLETTER_WORKER_POLL_INTERVAL="0.05",
        NEWSLETTER_LOG_LEVEL="DEBUG",
        **env,
    )
    log = tmp_path / "worker.log"
    with log.open("wb") as output:
        return subprocess.Popen(
            [str(NEWSLETTER), "worker"],
            env=variables,
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


class TestTrickledAnswer:
    def test_a_call_past_its_deadline_is_retried_and_no_other_worker_calls_meanwhile(
        self, database_url: str, engine: sa.Engine, mailgun: Mailgun, tmp_path: Path
    ) -> None:
        # Each piece of the answer comes within the 1 s read timeout; the whole would take
        # 6 s, past the 2 s lease, and the other worker would then take the job and call.
        settings = worker_settings(
            database_url, mailgun, tmp_path, job_lease="2s", backend_timeout=1
        )
        subscriptions_with_sync_jobs(engine, settings, [Row("patient@example.org")])
        mailgun.fake.trickle(seconds=6)
        workers = [in_process_worker(engine, settings, name=name) for name in ("one", "two")]
        for worker in workers:
            worker.start()
        try:
            wait_until(lambda: unfinished(engine) == 0, timeout=20)
        finally:
            for worker in workers:
                worker.stop(timeout=15)
        [job] = sync_jobs(engine)
        assert (job.state, job.attempts) == (JobState.DONE, 2)
        trickled, retried = attempts(engine)
        assert (trickled.outcome, retried.outcome) == (AttemptOutcome.RETRY, AttemptOutcome.SUCCESS)
        assert "abandoned at the call's deadline" in (trickled.error or "")
        # Given up at its 1 s deadline and recorded before the 2 s lease ran out, not after
        # the 6 s the whole answer took (recording it waits for the database: 1.64 s once,
        # on a busy host).
        assert trickled.finished_at - trickled.started_at < timedelta(seconds=2)
        # The retry came after the first call was abandoned, never beside it.
        assert retried.started_at >= trickled.finished_at
        assert mailgun.calls() == [("POST", ONE)] * 2
        assert mailgun.held() == {"patient@example.org": True}


class Flood:
    """ASGI wrapper: the next `times` requests get a 200 JSON answer of `size` bytes, sent
    in pieces while the client reads; `sent` counts the bytes that went out."""

    def __init__(self, app: Any, *, size: int, times: int = 1) -> None:
        self.app, self.size, self.times = app, size, times
        self.sent = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.times <= 0:
            await self.app(scope, receive, send)
            return
        self.times -= 1
        piece = b" " * 65536
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"message": "', "more_body": True})
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        while self.sent < self.size and not gone.is_set():
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            self.sent += len(piece)
            await asyncio.sleep(0)
        watcher.cancel()
        await send({"type": "http.response.body", "body": b'"}', "more_body": False})


class TestHugeAnswer:
    def test_an_answer_past_the_cap_is_abandoned_and_on_record(
        self, database_url: str, engine: sa.Engine, tmp_path: Path
    ) -> None:
        # A proxy before Mailgun (or a broken one) answers a page with no end: the worker
        # read it all into memory, for as long as the call's deadline let it.
        fake = FakeMailgun()
        fake.create_list(LIST)
        flood = Flood(fake.app(), size=512 * 1024 * 1024)
        with LiveServer(flood) as base_url:
            mailgun = Mailgun(fake=fake, base_url=base_url, arrivals=Arrivals(fake.app()))
            settings = worker_settings(
                database_url,
                mailgun,
                tmp_path,
                backend_timeout=20,
                job_lease="60s",
                retry_base_delay="0.05s",
                retry_max_delay="0.1s",
            )
            subscriptions_with_sync_jobs(engine, settings, [Row("big@example.org")])
            worker = in_process_worker(engine, settings, name="capped")
            started = time.monotonic()
            assert worker.run_once() == 1
            assert time.monotonic() - started < 10
            [job] = sync_jobs(engine)
            assert (job.state, job.attempts) == (JobState.DEAD, 1)
            assert job.last_error == (
                "mailgun add member: HTTP 200 with an answer over 4 MiB, not read further (no "
                "backend answers that much: a proxy's page? is base_url right?)"
            )
            [attempt] = attempts(engine)
            assert attempt.outcome == AttemptOutcome.DEAD
            assert (attempt.response or "").startswith('200 {"message": ')
            # The worker stopped reading at the cap: what went out is that, and what the
            # sockets' buffers held, far from the whole.
            assert flood.sent < 64 * 1024 * 1024


class TestLongRound:
    def test_a_round_outlasting_its_lease_keeps_it_and_each_call_is_made_once(
        self, database_url: str, engine: sa.Engine, mailgun: Mailgun, tmp_path: Path
    ) -> None:
        # Six unsubscribes, one call each, 0.6 s apiece: a 3.6 s round with a 2 s lease.
        settings = worker_settings(
            database_url, mailgun, tmp_path, job_lease="2s", backend_timeout=1
        )
        emails = [f"gone{n}@example.org" for n in range(6)]
        for address in emails:
            mailgun.fake.lists[LIST][address] = StoredMember(
                address=address, name="", vars={}, subscribed=True
            )
        subscriptions_with_sync_jobs(
            engine, settings, [Row(e, status="unsubscribed") for e in emails]
        )
        mailgun.fake.stall(seconds=0.6, times=6)
        workers = [in_process_worker(engine, settings, name=name) for name in ("one", "two")]
        try:
            # The second starts once the first holds the round: started together, their
            # claims could split the jobs between them (SKIP LOCKED), which is no takeover.
            workers[0].start()
            wait_until(lambda: all(job.leased_by == "one" for job in sync_jobs(engine)))
            workers[1].start()
            wait_until(lambda: unfinished(engine) == 0, timeout=20)
        finally:
            for worker in workers:
                worker.stop(timeout=15)
        assert sorted(mailgun.calls()) == sorted(("PUT", f"{ONE}/{email}") for email in emails)
        assert {(job.state, job.attempts) for job in sync_jobs(engine)} == {(JobState.DONE, 1)}
        assert len({a.worker for a in attempts(engine)}) == 1

    def test_the_worker_s_heartbeat_stays_fresh_through_a_long_round(
        self, database_url: str, engine: sa.Engine, mailgun: Mailgun, tmp_path: Path
    ) -> None:
        # Stale, the API running the worker in-process answered /readyz 503 worker_stale
        # (and newsletter_workers_alive fell to 0) until the round ended.
        settings = worker_settings(
            database_url, mailgun, tmp_path, backend_timeout=1, worker_heartbeat_timeout="1s"
        )
        emails = [f"slow{n}@example.org" for n in range(6)]
        for address in emails:
            mailgun.fake.lists[LIST][address] = StoredMember(
                address=address, name="", vars={}, subscribed=True
            )
        subscriptions_with_sync_jobs(
            engine, settings, [Row(e, status="unsubscribed") for e in emails]
        )
        mailgun.fake.stall(seconds=0.6, times=6)  # 3.6 s, one call at a time
        worker = in_process_worker(engine, settings, name="slow-round")
        ages: list[float] = []
        try:
            worker.start()
            while unfinished(engine):
                with db.session_scope(engine) as session:
                    seen = heartbeat.last_seen(session, worker_id=worker.name)
                assert seen is not None
                ages.append((datetime.now(UTC) - seen).total_seconds())
                time.sleep(0.1)
        finally:
            worker.stop(timeout=15)
        assert len(ages) > 20
        assert max(ages) < 1.0, ages


class TestWorkerKilled:
    def test_a_batch_cut_by_sigkill_is_sent_again_and_each_member_held_once(
        self, database_url: str, engine: sa.Engine, mailgun: Mailgun, tmp_path: Path
    ) -> None:
        # One claimed batch of 2,050 jobs: three bulk calls (1,000, 1,000, 50). The second
        # call is held by the fake, and the worker is killed while it waits for the answer.
        emails = [f"m{n:04d}@example.org" for n in range(2050)]
        settings = worker_settings(
            database_url, mailgun, tmp_path, job_lease="3s", backend_timeout=1.5
        )
        subscriptions_with_sync_jobs(engine, settings, [Row(e) for e in emails])
        mailgun.fake.stall(seconds=0.001)  # the first bulk call: answered at once
        mailgun.fake.stall(seconds=3)  # the second: still in flight at the kill
        process = worker_process(
            database_url,
            mailgun,
            tmp_path,
            NEWSLETTER_SYNC_BATCH_SIZE="2050",
            # The lease outlasts two backend timeouts (the settings check it).
            NEWSLETTER_JOB_LEASE="3s",
            NEWSLETTER_BACKEND_TIMEOUT="1.5",
        )
        try:

            def second_call_in_flight() -> bool:
                if process.poll() is not None:
                    log = (tmp_path / "worker.log").read_text()
                    raise AssertionError(f"worker exited early:\n{log}")
                return len(mailgun.bulk_calls()) == 2

            wait_until(second_call_in_flight, timeout=20, every=0.01)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        assert process.returncode == -signal.SIGKILL

        # Nothing was recorded: the whole batch is still leased by the dead process, the
        # jobs of the call that had gone through included.
        orphans = sync_jobs(engine)
        assert len(orphans) == 2050
        assert {(job.state, job.attempts) for job in orphans} == {(JobState.RUNNING, 1)}
        assert {f":{process.pid}:" in (job.leased_by or "") for job in orphans} == {True}
        assert attempts(engine) == []
        lease_until = max(job.lease_until for job in orphans if job.lease_until is not None)

        rescuer = in_process_worker(engine, settings, name="rescuer")
        rescuer.start()
        try:
            wait_until(lambda: unfinished(engine) == 0, timeout=20)
        finally:
            rescuer.stop(timeout=15)

        # The rescuer sent the whole batch again, in its own batches of 1,000.
        assert mailgun.calls() == [("POST", BULK)] * 5
        assert [addresses_in(call) for call in mailgun.bulk_calls()] == [
            emails[:1000],
            emails[1000:2000],
            emails[:1000],
            emails[1000:2000],
            emails[2000:],
        ]
        # The held call is answered (and applied) by now; each member is there once.
        wait_until(lambda: len(mailgun.held()) == 2050, timeout=10)
        assert mailgun.held() == dict.fromkeys(emails, True)
        jobs = sync_jobs(engine)
        assert {(job.state, job.attempts, job.leased_by) for job in jobs} == {
            (JobState.DONE, 2, None)
        }
        rows = attempts(engine)
        assert len(rows) == 2050
        assert {(a.attempt, a.worker, a.outcome) for a in rows} == {
            (2, "rescuer", AttemptOutcome.SUCCESS)
        }
        # Taken again only once the dead worker's lease had run out.
        assert min(a.started_at for a in rows) >= lease_until


class TestRateLimited:
    @pytest.mark.parametrize("form", ["delta-seconds", "http-date"])
    def test_429_retry_after_is_honoured(
        self,
        database_url: str,
        engine: sa.Engine,
        mailgun: Mailgun,
        tmp_path: Path,
        form: str,
    ) -> None:
        # Backoff alone would retry within 0.1 s: only Retry-After makes the worker wait.
        settings = worker_settings(
            database_url, mailgun, tmp_path, retry_base_delay="0.05s", retry_max_delay="0.1s"
        )
        emails = ["r1@example.org", "r2@example.org", "r3@example.org"]
        subscriptions_with_sync_jobs(engine, settings, [Row(e) for e in emails])
        if form == "delta-seconds":
            retry_after = "2"
        else:
            # An absolute time (whole seconds), at least 2 s from now.
            not_before = float(int(time.time()) + 3)
            retry_after = email.utils.formatdate(not_before, usegmt=True)
        mailgun.fake.throttle(retry_after=retry_after)
        worker = in_process_worker(engine, settings, name="polite")

        assert worker.run_once() == 3
        jobs = sync_jobs(engine)
        assert [(job.state, job.attempts) for job in jobs] == [(JobState.PENDING, 1)] * 3
        throttled = attempts(engine)
        assert [a.outcome for a in throttled] == [AttemptOutcome.RETRY] * 3
        assert all(a.error == "mailgun bulk add: HTTP 429" for a in throttled)
        assert all(a.response == '429 {"message":"Too many requests"}' for a in throttled)
        for job, attempt in zip(jobs, throttled, strict=True):
            if form == "delta-seconds":
                # Counted from the moment the answer was recorded.
                assert job.next_attempt_at >= attempt.finished_at + timedelta(seconds=2)
            else:
                assert job.next_attempt_at.timestamp() >= not_before

        drain(worker, engine, timeout=15)

        first, retry = mailgun.arrivals.times("POST", BULK)
        if form == "delta-seconds":
            assert retry - first >= 2
        else:
            assert retry >= not_before
        assert retry >= max(job.next_attempt_at.timestamp() for job in jobs)
        assert mailgun.calls() == [("POST", BULK)] * 2
        assert [addresses_in(call) for call in mailgun.bulk_calls()] == [emails, emails]
        assert mailgun.held() == dict.fromkeys(emails, True)
        assert [(job.state, job.attempts) for job in sync_jobs(engine)] == [(JobState.DONE, 2)] * 3


class TestRetryAfterTooFar:
    @pytest.mark.parametrize(
        "retry_after",
        [
            # A date decades away: the job slept until then, out of sight.
            "Wed, 21 Oct 2099 07:28:00 GMT",
            # Past what a date can hold: the round failed with an OverflowError.
            "99999999999999",
        ],
        ids=["http-date", "delta-seconds"],
    )
    def test_a_wait_of_more_than_a_day_is_cut_to_a_day(
        self,
        database_url: str,
        engine: sa.Engine,
        mailgun: Mailgun,
        tmp_path: Path,
        retry_after: str,
    ) -> None:
        settings = worker_settings(
            database_url, mailgun, tmp_path, retry_base_delay="1s", retry_max_delay="60s"
        )
        emails = ["far1@example.org", "far2@example.org"]
        subscriptions_with_sync_jobs(engine, settings, [Row(e) for e in emails])
        mailgun.fake.throttle(retry_after=retry_after)
        clock = Clock()
        worker = in_process_worker(engine, settings, name="patient", now=clock)

        assert worker.run_once() == 2
        jobs = sync_jobs(engine)
        assert [(job.state, job.attempts) for job in jobs] == [(JobState.PENDING, 1)] * 2
        assert [a.outcome for a in attempts(engine)] == [AttemptOutcome.RETRY] * 2
        # Honoured past the longest backoff (a day's quota is waited for), but no further:
        # the job comes due again, and is dead-lettered in the end if the backend never
        # answers otherwise.
        for job in jobs:
            assert job.next_attempt_at == clock.at + timedelta(days=1)

        clock.advance(timedelta(days=1))
        drain(worker, engine)
        assert mailgun.held() == dict.fromkeys(emails, True)
        assert [(job.state, job.attempts) for job in sync_jobs(engine)] == [(JobState.DONE, 2)] * 2


class TestCredentialsRevoked:
    def test_a_refused_key_costs_one_call_per_round_not_one_per_member(
        self,
        database_url: str,
        engine: sa.Engine,
        mailgun: Mailgun,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        settings = worker_settings(database_url, mailgun, tmp_path)
        emails = [f"k{n}@example.org" for n in range(20)]
        subscriptions_with_sync_jobs(engine, settings, [Row(e) for e in emails])
        # The key is revoked at Mailgun: every call gets 401.
        mailgun.fake.api_key = "key-revoked"
        worker = in_process_worker(engine, settings, name="revoked")

        assert worker.run_once() == 20
        # A refusal of the call itself (not of one of its members) is not retried one
        # member at a time: that was 20 more calls with a key Mailgun refuses.
        assert mailgun.calls() == [("POST", BULK)]
        jobs = sync_jobs(engine)
        assert {(job.state, job.attempts, job.last_error) for job in jobs} == {
            (JobState.DEAD, 1, "mailgun bulk add: HTTP 401: check the backend's api_key")
        }
        # The reason in the worker's log too, once for the round's twenty jobs: it said
        # only "sync.round ... failed=20", at INFO.
        assert [
            record.getMessage() for record in caplog.records if record.levelname == "WARNING"
        ] == ["sync.failed jobs=20 state=dead error=mailgun bulk add: HTTP 401: check the "
              "backend's api_key"]  # fmt: skip

    def test_departures_after_a_refused_key_are_not_called_either(
        self, database_url: str, engine: sa.Engine, mailgun: Mailgun, tmp_path: Path
    ) -> None:
        settings = worker_settings(database_url, mailgun, tmp_path)
        joined = [f"k{n}@example.org" for n in range(5)]
        left = [f"gone{n}@example.org" for n in range(5)]
        subscriptions_with_sync_jobs(
            engine,
            settings,
            [Row(e) for e in joined] + [Row(e, status="unsubscribed") for e in left],
        )
        mailgun.fake.api_key = "key-revoked"
        worker = in_process_worker(engine, settings, name="revoked")

        assert worker.run_once() == 10
        # Mailgun has no bulk unsubscribe: each departure was one more call with a key
        # Mailgun had just refused.
        assert mailgun.calls() == [("POST", BULK)]
        assert {(job.state, job.attempts, job.last_error) for job in sync_jobs(engine)} == {
            (JobState.DEAD, 1, "mailgun bulk add: HTTP 401: check the backend's api_key")
        }
        assert {a.response for a in attempts(engine)} == {"401 Forbidden"}

    def test_a_revoked_listmonk_token_costs_a_few_calls_per_round_not_one_per_job(
        self, database_url: str, engine: sa.Engine, tmp_path: Path
    ) -> None:
        with FakeListmonk() as listmonk:
            settings = make_settings(
                database_url,
                smtp_port=free_port(),
                lists=[
                    ListSettings(
                        slug="bluehats",
                        name="Gazette BlueHats",
                        backend=ListmonkBackendSettings(
                            base_url=listmonk.url,
                            username=listmonk.username,
                            api_token="tok-revoked",
                            list_id=3,
                        ),
                    )
                ],
                mailer=FileMailerSettings(directory=tmp_path / "mail"),
                worker_concurrency=2,
                backend_timeout=5,
            )
            emails = [f"l{n}@example.org" for n in range(20)]
            subscriptions_with_sync_jobs(engine, settings, [Row(e) for e in emails])
            worker = in_process_worker(engine, settings, name="revoked")

            assert worker.run_once() == 20
            worker.stop()
            # listmonk has no bulk call: one lookup per job, each answered 403, was 20
            # calls. Now the calls already under way when the first refusal came, at most
            # one per thread of the pool.
            assert 1 <= len(listmonk.calls()) <= settings.worker_concurrency
        jobs = sync_jobs(engine)
        assert {(job.state, job.attempts, job.last_error) for job in jobs} == {
            (
                JobState.DEAD,
                1,
                "listmonk: find: HTTP 403: check the backend's username and api_token, and the "
                "API user's permissions",
            )
        }
        assert {a.response for a in attempts(engine)} == {
            '403 {"message":"invalid API credentials"}'
        }


class TestGarbledAnswer:
    def test_a_body_not_in_its_named_encoding_is_retried_and_the_round_recorded(
        self, database_url: str, engine: sa.Engine, mailgun: Mailgun, tmp_path: Path
    ) -> None:
        # httpx's DecodingError used to leave the adapter: the round failed whole, its
        # jobs stayed leased with no attempt on record, and came back at lease end only.
        settings = worker_settings(
            database_url, mailgun, tmp_path, retry_base_delay="0.05s", retry_max_delay="0.1s"
        )
        emails = ["g1@example.org", "g2@example.org"]
        subscriptions_with_sync_jobs(engine, settings, [Row(e) for e in emails])
        mailgun.fake.answer_oddly(
            status=200,
            body=b"not gzip at all",
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )
        worker = in_process_worker(engine, settings, name="garbled")

        assert worker.run_once() == 2
        assert [(job.state, job.attempts) for job in sync_jobs(engine)] == [
            (JobState.PENDING, 1)
        ] * 2
        garbled = attempts(engine)
        assert [a.outcome for a in garbled] == [AttemptOutcome.RETRY] * 2
        assert all(
            a.error is not None and a.error.startswith("mailgun bulk add: DecodingError: ")
            for a in garbled
        )

        drain(worker, engine)
        assert mailgun.held() == dict.fromkeys(emails, True)
        assert [(job.state, job.attempts) for job in sync_jobs(engine)] == [(JobState.DONE, 2)] * 2


class TestRefused:
    def test_a_400_for_one_address_kills_its_job_only(
        self, database_url: str, engine: sa.Engine, mailgun: Mailgun, tmp_path: Path
    ) -> None:
        settings = worker_settings(database_url, mailgun, tmp_path)
        emails = [f"p{n}@example.org" for n in range(10)]
        ids = subscriptions_with_sync_jobs(engine, settings, [Row(e) for e in emails])
        mailgun.fake.reject("p3@example.org", message="'p3@example.org' is not a valid address")
        worker = in_process_worker(engine, settings, name="careful")

        assert worker.run_once() == 10
        assert worker.run_once() == 0

        # The bulk call is refused as a whole, then each address is added on its own.
        calls = mailgun.fake.seen()
        assert [(c.method, c.raw_path) for c in calls] == [("POST", BULK)] + [("POST", ONE)] * 10
        assert addresses_in(calls[0]) == emails
        assert [c.form["address"] for c in calls[1:]] == emails
        assert all((c.form["subscribed"], c.form["upsert"]) == ("yes", "yes") for c in calls[1:])
        assert mailgun.held() == {
            address: True for address in emails if address != "p3@example.org"
        }

        jobs = jobs_by_subscription(engine)
        dead = jobs[ids["p3@example.org"]]
        assert (dead.state, dead.attempts) == (JobState.DEAD, 1)
        assert dead.last_error == "mailgun add member: HTTP 400"
        assert dead.finished_at is not None
        others = [job for sid, job in jobs.items() if sid != ids["p3@example.org"]]
        assert {(job.state, job.attempts, job.last_error) for job in others} == {
            (JobState.DONE, 1, None)
        }
        rows: dict[int | None, DeliveryAttempt] = {a.job_id: a for a in attempts(engine)}
        assert len(rows) == 10
        refused = rows[dead.id]
        assert (refused.attempt, refused.outcome) == (1, AttemptOutcome.DEAD)
        assert refused.error == "mailgun add member: HTTP 400"
        assert refused.response == '400 {"message":"\'p3@example.org\' is not a valid address"}'
        assert {rows[job.id].outcome for job in others} == {AttemptOutcome.SUCCESS}
        assert {rows[job.id].response for job in others} == {
            "mailgun: Mailing list member has been created"
        }
