"""The worker delivers every queued mail exactly once, whatever SMTP or the process does.

Real parts only: aiosmtpd servers on loopback, a TCP tarpit, a `newsletter worker` process
killed with SIGKILL, and the database the suite runs on.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sysconfig
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from fastapi.testclient import TestClient
from sqlmodel import col, select

from app import blocklist, db
from app.config import Settings, SmtpMailerSettings
from app.mailer import make_mailer
from app.main import create_app
from app.models import (
    AttemptOutcome,
    BlockKind,
    DeliveryAttempt,
    JobState,
    KeyScope,
    OutboxJob,
    Subscription,
    SubscriptionStatus,
    utcnow,
)
from app.worker import PRESSED_MAIL_BATCH, Worker
from tests.conftest import (
    SECRET,
    PeerSink,
    SmtpSink,
    TricklingSmtp,
    api_key_headers,
    free_port,
    make_settings,
    start_smtp,
    wait_until,
)
from tests.processes import start_login_smtp

NEWSLETTER = Path(sysconfig.get_path("scripts")) / "newsletter"


# Reading the outbox -----------------------------------------------------------------------


def jobs(engine: sa.Engine) -> list[OutboxJob]:
    with db.session_scope(engine) as session:
        return list(session.exec(select(OutboxJob).order_by(col(OutboxJob.id))).all())


def only_job(engine: sa.Engine) -> OutboxJob:
    [job] = jobs(engine)
    return job


def attempts(engine: sa.Engine) -> list[DeliveryAttempt]:
    with db.session_scope(engine) as session:
        query = select(DeliveryAttempt).order_by(col(DeliveryAttempt.id))
        return list(session.exec(query).all())


def all_in(engine: sa.Engine, state: JobState, count: int) -> bool:
    rows = jobs(engine)
    return len(rows) == count and all(job.state == state for job in rows)


def settle() -> None:
    """Leave a worker polling every 0.05 s ten rounds to send anything it would send twice."""
    time.sleep(0.5)


# Queuing mails ----------------------------------------------------------------------------


def subscribe(client: TestClient, email: str) -> None:
    response = client.post("/v1/lists/bluehats/subscriptions", json={"email": email})
    assert response.status_code == 202, response.text


def queue_confirmations(database_url: str, emails: list[str]) -> None:
    """Subscribe through the API with no worker running: the mails wait in the outbox."""
    settings = make_settings(database_url, smtp_port=free_port(), run_worker=False)
    with TestClient(create_app(settings)) as client:
        for email in emails:
            subscribe(client, email)


@contextmanager
def running(worker: Worker) -> Iterator[Worker]:
    worker.start()
    try:
        yield worker
    finally:
        worker.stop(timeout=15)


def worker_for(engine: sa.Engine, settings: Settings, *, name: str) -> Worker:
    return Worker(engine=engine, settings=settings, mailer=make_mailer(settings.mailer), name=name)


# SMTP servers that misbehave --------------------------------------------------------------


class RefusingSink(SmtpSink):
    """A real SMTP server answering every RCPT TO with one fixed reply (e.g. 550 or 451)."""

    def __init__(self, *, port: int, reply: str) -> None:
        super().__init__(host="127.0.0.1", port=port)
        self.reply = reply
        self.rcpt_count = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        with self.lock:
            self.rcpt_count += 1
        return self.reply


class DeferringSink(SmtpSink):
    """A real SMTP server answering the first `step` (RCPT, or the end of a mail's DATA)
    with `reply` (a greylisting relay's 451 4.7.1), or with no answer but the connection
    closed when `reply` is None; accepting every one after."""

    def __init__(self, *, port: int, step: str, reply: str | None) -> None:
        super().__init__(host="127.0.0.1", port=port)
        self.step, self.reply = step, reply
        self.counts = {"RCPT": 0, "DATA": 0}

    def _first(self, step: str, server: Any) -> str | None:
        with self.lock:
            self.counts[step] += 1
            if step != self.step or self.counts[step] > 1:
                return None
        if self.reply is None:
            server.transport.close()
            return "250 OK"  # never read
        return self.reply

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if (reply := self._first("RCPT", server)) is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if (reply := self._first("DATA", server)) is not None:
            return reply
        return await super().handle_DATA(server, session, envelope)


class SlowSink(SmtpSink):
    """A real SMTP server that takes `delay` seconds to accept each message."""

    def __init__(self, *, port: int, delay: float) -> None:
        super().__init__(host="127.0.0.1", port=port)
        self.delay = delay
        self.data_started = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_started.set()
        await asyncio.sleep(self.delay)
        return await super().handle_DATA(server, session, envelope)


@contextmanager
def serving(sink: SmtpSink) -> Iterator[SmtpSink]:
    controller = Controller(sink, hostname=sink.host, port=sink.port)
    controller.start()
    try:
        yield sink
    finally:
        controller.stop()


class Tarpit:
    """A loopback TCP server that accepts connections and never says a word."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        for connection in self.accepted:
            connection.close()
        self.listener.close()


def worker_process(
    database_url: str, *, smtp_port: int, cwd: Path, log: Path
) -> subprocess.Popen[bytes]:
    """`newsletter worker` as production runs it, configured by environment only."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("NEWSLETTER_")}
    env.update(
        NEWSLETTER_DATABASE_URL=database_url,
        NEWSLETTER_SECRET_KEY=SECRET,
        NEWSLETTER_MAILER__KIND="smtp",
        NEWSLETTER_MAILER__HOST="127.0.0.1",
        NEWSLETTER_MAILER__PORT=str(smtp_port),
        NEWSLETTER_MAILER__SECURITY="none",
        NEWSLETTER_JOB_LEASE="2s",
        # The lease must outlast a send (settings check it): the tarpit holds for 1 s at most.
        NEWSLETTER_MAILER__TIMEOUT="1",
        NEWSLETTER_WORKER_POLL_INTERVAL="0.05",
        NEWSLETTER_AUTO_MIGRATE="false",
        # The daily retention job would be a second job in the queue these tests count.
        NEWSLETTER_RETENTION_INTERVAL="off",
    )
    with log.open("wb") as output:
        return subprocess.Popen(
            [str(NEWSLETTER), "worker"], env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT
        )


# Scenarios --------------------------------------------------------------------------------


class TestNormalPath:
    def test_one_request_sends_one_mail_in_one_attempt(
        self, database_url: str, engine: sa.Engine, smtp: SmtpSink
    ) -> None:
        with TestClient(create_app(make_settings(database_url, smtp_port=smtp.port))) as client:
            subscribe(client, "once@example.org")
            wait_until(lambda: all_in(engine, JobState.DONE, 1))
            settle()
        assert [message["To"] for message in smtp.messages] == ["once@example.org"]
        job = only_job(engine)
        assert job.attempts == 1
        assert job.leased_by is None
        assert job.last_error is None
        [attempt] = attempts(engine)
        assert (attempt.job_id, attempt.attempt, attempt.outcome) == (
            job.id,
            1,
            AttemptOutcome.SUCCESS,
        )
        assert attempt.response == f"accepted by 127.0.0.1:{smtp.port}"

    def test_two_workers_sharing_the_queue_send_each_mail_once(
        self, database_url: str, engine: sa.Engine, smtp: SmtpSink
    ) -> None:
        emails = [f"reader{n}@example.org" for n in range(20)]
        queue_confirmations(database_url, emails)
        settings = make_settings(
            database_url, smtp_port=smtp.port, worker_batch_size=3, worker_concurrency=2
        )
        with (
            running(worker_for(engine, settings, name="worker-a")),
            running(worker_for(engine, settings, name="worker-b")),
        ):
            wait_until(lambda: all_in(engine, JobState.DONE, 20), timeout=20)
            settle()
        assert Counter(message["To"] for message in smtp.messages) == Counter(emails)
        assert {job.attempts for job in jobs(engine)} == {1}
        rows = attempts(engine)
        assert len(rows) == 20
        assert {(row.attempt, row.outcome) for row in rows} == {(1, AttemptOutcome.SUCCESS)}


class TestOneRound:
    def test_a_batch_is_sent_over_as_many_connections_as_sends_at_a_time_and_recorded(
        self, database_url: str, engine: sa.Engine
    ) -> None:
        emails = [f"batch{n}@example.org" for n in range(8)]
        queue_confirmations(database_url, emails)
        sink = PeerSink()
        settings = make_settings(
            database_url, smtp_port=sink.port, worker_concurrency=2, worker_batch_size=8
        )
        with serving(sink):
            worker = worker_for(engine, settings, name="one-round")
            try:
                assert worker.run_once() == 8
            finally:
                worker.stop(timeout=15)
        assert sorted(message["To"] for message in sink.messages) == sorted(emails)
        assert 1 <= len(set(sink.peers)) <= 2
        assert [(job.state, job.attempts, job.leased_by) for job in jobs(engine)] == [
            (JobState.DONE, 1, None)
        ] * 8
        rows = attempts(engine)
        assert sorted(row.job_id for row in rows) == [job.id for job in jobs(engine)]
        assert {(row.attempt, row.outcome, row.worker) for row in rows} == {
            (1, AttemptOutcome.SUCCESS, "one-round")
        }
        assert all(row.started_at <= row.finished_at for row in rows)

    def test_mails_with_nothing_left_to_do_are_skipped_and_the_others_sent(
        self, database_url: str, engine: sa.Engine, smtp: SmtpSink
    ) -> None:
        queue_confirmations(
            database_url, ["sent@example.org", "blocked@example.org", "moved@example.org"]
        )
        with db.session_scope(engine) as session:
            blocklist.add(
                session,
                kind=BlockKind.ADDRESS,
                value="blocked@example.org",
                reason="abuse",
                actor="test",
                now=utcnow(),
            )
            session.execute(
                sa.update(Subscription)
                .where(col(Subscription.email_key) == "moved@example.org")
                .values(status=SubscriptionStatus.UNSUBSCRIBED)
            )
        settings = make_settings(database_url, smtp_port=smtp.port)
        worker = worker_for(engine, settings, name="skipping")
        try:
            assert worker.run_once() == 3
        finally:
            worker.stop(timeout=15)
        assert [message["To"] for message in smtp.messages] == ["sent@example.org"]
        assert {job.state for job in jobs(engine)} == {JobState.DONE}
        by_job = sorted(attempts(engine), key=lambda row: row.job_id)
        assert [(row.outcome, row.response) for row in by_job] == [
            (AttemptOutcome.SUCCESS, f"accepted by 127.0.0.1:{smtp.port}"),
            (AttemptOutcome.SUCCESS, "skipped: address is on the block-list"),
            (AttemptOutcome.SUCCESS, "skipped: subscription is unsubscribed"),
        ]
        counted = worker.metrics.registry.get_sample_value
        name = "newsletter_outbox_attempts_total"
        assert counted(name, {"kind": "mail", "outcome": "success"}) == 1
        assert counted(name, {"kind": "mail", "outcome": "skipped"}) == 2


class TestSmtpDown:
    def test_mail_waits_for_the_smtp_server_and_is_delivered_once(
        self, database_url: str, engine: sa.Engine
    ) -> None:
        port = free_port()  # nothing listens here until the server "comes back"
        settings = make_settings(
            database_url,
            smtp_port=port,
            retry_base_delay="0.1s",
            retry_max_delay="0.3s",
            job_max_attempts=100,
        )
        with TestClient(create_app(settings)) as client:
            response = client.post(
                "/v1/lists/bluehats/subscriptions", json={"email": "patient@example.org"}
            )
            assert response.status_code == 202

            def waiting_after_retries() -> bool:
                job = only_job(engine)
                retries = [a for a in attempts(engine) if a.outcome == AttemptOutcome.RETRY]
                return job.state == JobState.PENDING and len(retries) >= 2

            wait_until(waiting_after_retries)
            job = only_job(engine)
            assert job.last_error is not None
            assert "Connection refused" in job.last_error
            assert job.leased_by is None
            assert all(a.error and "Connection refused" in a.error for a in attempts(engine))

            sink, controller = start_smtp(port)
            try:
                wait_until(lambda: all_in(engine, JobState.DONE, 1))
                settle()
            finally:
                controller.stop()

        assert [message["To"] for message in sink.messages] == ["patient@example.org"]
        job = only_job(engine)
        rows = attempts(engine)
        retries = len(rows) - 1
        assert retries >= 2
        assert [row.outcome for row in rows] == [AttemptOutcome.RETRY] * retries + [
            AttemptOutcome.SUCCESS
        ]
        assert [row.attempt for row in rows] == list(range(1, retries + 2))
        assert job.attempts == retries + 1


class TestWorkerKilled:
    def test_job_of_a_killed_worker_is_delivered_once_after_its_lease_expires(
        self, database_url: str, engine: sa.Engine, smtp: SmtpSink, tmp_path: Path
    ) -> None:
        queue_confirmations(database_url, ["survivor@example.org"])
        tarpit = Tarpit()
        log = tmp_path / "worker.log"
        process = worker_process(database_url, smtp_port=tarpit.port, cwd=tmp_path, log=log)
        try:

            def held_by_process() -> bool:
                if process.poll() is not None:
                    raise AssertionError(f"worker exited early:\n{log.read_text()}")
                job = only_job(engine)
                return (
                    job.state == JobState.RUNNING
                    and f":{process.pid}:" in (job.leased_by or "")
                    and bool(tarpit.accepted)
                )

            wait_until(held_by_process, timeout=20)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
            tarpit.close()
        assert process.returncode == -signal.SIGKILL

        orphan = only_job(engine)
        assert (orphan.state, orphan.attempts) == (JobState.RUNNING, 1)
        assert orphan.lease_until is not None
        assert attempts(engine) == []

        settings = make_settings(
            database_url,
            smtp_port=smtp.port,
            job_lease="2s",
            mailer=SmtpMailerSettings(host="127.0.0.1", port=smtp.port, security="none", timeout=1),
        )
        with running(worker_for(engine, settings, name="rescuer")):
            wait_until(lambda: all_in(engine, JobState.DONE, 1), timeout=15)
            settle()

        assert [message["To"] for message in smtp.messages] == ["survivor@example.org"]
        job = only_job(engine)
        assert job.attempts == 2
        [attempt] = attempts(engine)
        assert (attempt.attempt, attempt.worker, attempt.outcome) == (
            2,
            "rescuer",
            AttemptOutcome.SUCCESS,
        )
        # Taken only once the dead worker's lease had run out.
        assert attempt.started_at >= orphan.lease_until


class TestSmtpRefuses:
    def test_recipient_refused_with_550_makes_the_job_dead_after_one_attempt(
        self, database_url: str, engine: sa.Engine
    ) -> None:
        sink = RefusingSink(port=free_port(), reply="550 5.1.1 Mailbox does not exist")
        with serving(sink):
            settings = make_settings(database_url, smtp_port=sink.port)
            with TestClient(create_app(settings)) as client:
                subscribe(client, "gone@example.org")
                wait_until(lambda: all_in(engine, JobState.DEAD, 1))
                settle()
        job = only_job(engine)
        assert job.attempts == 1
        assert job.last_error is not None
        assert "550" in job.last_error
        [attempt] = attempts(engine)
        assert attempt.outcome == AttemptOutcome.DEAD
        assert sink.rcpt_count == 1
        assert sink.messages == []

    def test_451_is_retried_and_dead_after_the_maximum_attempts(
        self, database_url: str, engine: sa.Engine
    ) -> None:
        sink = RefusingSink(port=free_port(), reply="451 4.7.1 Greylisted, try again later")
        with serving(sink):
            settings = make_settings(
                database_url,
                smtp_port=sink.port,
                job_max_attempts=3,
                retry_base_delay="0.05s",
                retry_max_delay="0.1s",
            )
            with TestClient(create_app(settings)) as client:
                subscribe(client, "greylisted@example.org")
                wait_until(lambda: all_in(engine, JobState.DEAD, 1))
                settle()
        job = only_job(engine)
        assert job.attempts == 3
        assert job.last_error is not None
        assert "451" in job.last_error
        rows = attempts(engine)
        assert [(row.attempt, row.outcome) for row in rows] == [
            (1, AttemptOutcome.RETRY),
            (2, AttemptOutcome.RETRY),
            (3, AttemptOutcome.DEAD),
        ]
        assert all(row.error and "451" in row.error for row in rows)
        assert sink.rcpt_count == 3
        assert sink.messages == []

    @pytest.mark.parametrize(
        ("step", "reply", "said"),
        [
            # Too many recipients or no room for now: RFC 5321 4.5.3.1.10 has the client
            # take it as 452.
            ("RCPT", "552 5.2.2 Mailbox full", "recipient deferred: 552 5.2.2 Mailbox full"),
            # Greylisting (Postgrey, rspamd): the first try of a sender is put off, at RCPT
            # or at the end of the data.
            (
                "RCPT",
                "450 4.7.1 Greylisted, see https://postgrey.schweikert.ch/help/example.org.html",
                "recipient deferred: 450 4.7.1 Greylisted, see https://postgrey",
            ),
            (
                "RCPT",
                "451 4.7.1 Please try again later",
                "recipient deferred: 451 4.7.1 Please try again later",
            ),
            ("DATA", "451 4.7.1 Try again later", "message deferred: 451 4.7.1 Try again later"),
            # The whole mail sent, and the connection closed with no answer: it may have
            # been taken, and the record says the retry may deliver it twice.
            (
                "DATA",
                None,
                "SMTPServerDisconnected: Connection unexpectedly closed; the relay had the "
                "whole mail and may have taken it",
            ),
        ],
    )
    def test_a_mail_deferred_once_is_delivered_at_the_next_attempt(
        self,
        database_url: str,
        engine: sa.Engine,
        caplog: pytest.LogCaptureFixture,
        step: str,
        reply: str | None,
        said: str,
    ) -> None:
        sink = DeferringSink(port=free_port(), step=step, reply=reply)
        with serving(sink):
            settings = make_settings(
                database_url, smtp_port=sink.port, retry_base_delay="1s", retry_max_delay="1s"
            )
            with TestClient(create_app(settings)) as client:
                read_key = api_key_headers(engine, "dashboard", KeyScope.READ)
                subscribe(client, "camille@example.org")
                wait_until(lambda: bool(attempts(engine)))
                first = only_job(engine)
                assert first.state == JobState.PENDING, first.last_error
                # Between the two attempts, operators see it waiting, and why.
                [waiting] = client.get(
                    "/v1/admin/jobs", params={"state": "pending"}, headers=read_key
                ).json()
                assert waiting["attempts"] == 1
                assert said in waiting["last_error"]
                wait_until(lambda: all_in(engine, JobState.DONE, 1))
                settle()
        assert [message["To"] for message in sink.messages] == ["camille@example.org"]
        assert sink.counts[step] == 2
        assert [(row.attempt, row.outcome) for row in attempts(engine)] == [
            (1, AttemptOutcome.RETRY),
            (2, AttemptOutcome.SUCCESS),
        ]
        assert only_job(engine).attempts == 2
        [failed] = [r for r in caplog.records if r.getMessage().startswith("job.failed")]
        assert failed.levelname == "WARNING"
        assert "state=pending" in failed.getMessage()
        assert said in failed.getMessage()
        assert "camille@example.org" not in caplog.text

    def test_a_refused_login_is_not_tried_again_for_each_mail_of_the_queue(
        self, database_url: str, engine: sa.Engine
    ) -> None:
        # Each mail logged in with the refused password, hundreds of refused logins a
        # minute: relays lock the account or ban the client for that.
        logins: list[str] = []

        def refuse(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
            logins.append(mechanism)
            return AuthResult(success=False, handled=False)

        emails = [f"reader{i}@example.org" for i in range(30)]
        queue_confirmations(database_url, emails)
        sink, controller = start_login_smtp(refuse)
        try:
            mailer = SmtpMailerSettings(
                host="127.0.0.1",
                port=sink.port,
                security="none",
                username="relay-user",
                password="wrong",
                timeout=5,
            )
            settings = make_settings(
                database_url,
                smtp_port=sink.port,
                mailer=mailer,
                retry_base_delay="0.05s",
                retry_max_delay="0.1s",
            )
            with running(worker_for(engine, settings, name="worker-a")):
                wait_until(lambda: all(job.attempts >= 3 for job in jobs(engine)))
        finally:
            controller.stop()
        # The sends of the first round that logged in side by side, each trying the
        # mechanisms the relay offers (PLAIN, LOGIN); none after.
        assert 1 <= len(logins) <= 2 * settings.worker_concurrency
        assert sink.messages == []
        for job in jobs(engine):
            assert job.state == JobState.PENDING
            assert job.last_error is not None
            assert "login refused by 127.0.0.1" in job.last_error
            assert "535 5.7.8 Authentication credentials invalid" in job.last_error
            assert "NEWSLETTER_MAILER__PASSWORD" in job.last_error


class TestGracefulStop:
    def test_stop_finishes_the_mail_in_flight_and_gives_back_the_others(
        self, database_url: str, engine: sa.Engine
    ) -> None:
        emails = ["first@example.org", "second@example.org", "third@example.org"]
        queue_confirmations(database_url, emails)
        sink = SlowSink(port=free_port(), delay=0.5)
        settings = make_settings(
            database_url, smtp_port=sink.port, worker_concurrency=1, worker_batch_size=5
        )
        with serving(sink):
            worker = worker_for(engine, settings, name="stopping")
            worker.start()
            try:
                assert sink.data_started.wait(timeout=10)
            finally:
                worker.stop(timeout=15)

            # The mail in flight went out and its job is done; the others were given back
            # untouched, and nothing is left running under a lease.
            assert [message["To"] for message in sink.messages] == ["first@example.org"]
            assert [(job.state, job.attempts, job.leased_by) for job in jobs(engine)] == [
                (JobState.DONE, 1, None),
                (JobState.PENDING, 0, None),
                (JobState.PENDING, 0, None),
            ]
            assert [(a.attempt, a.outcome) for a in attempts(engine)] == [
                (1, AttemptOutcome.SUCCESS)
            ]

            # Nothing was lost: the next worker sends the rest, once each.
            with running(worker_for(engine, settings, name="next")):
                wait_until(lambda: all_in(engine, JobState.DONE, 3))
                settle()
        assert sorted(message["To"] for message in sink.messages) == sorted(emails)
        assert {job.attempts for job in jobs(engine)} == {1}


class TestLeases:
    """A batch slower than its lease (a server taking its time) keeps its jobs: another
    worker would otherwise take the ones not yet sent and send them too."""

    def _slow_batch(
        self, database_url: str, sink: SmtpSink, count: int, *, lease: str = "2s"
    ) -> Settings:
        queue_confirmations(database_url, [f"slow{n}@example.org" for n in range(count)])
        # One batch of all the mails, one at a time, each as slow as the sink.
        mailer = SmtpMailerSettings(host="127.0.0.1", port=sink.port, security="none", timeout=1)
        return make_settings(
            database_url,
            smtp_port=sink.port,
            mailer=mailer,
            job_lease=lease,
            worker_batch_size=count,
            worker_concurrency=1,
        )

    def test_a_batch_outlasting_its_lease_renews_it_and_each_mail_goes_once(
        self, database_url: str, engine: sa.Engine
    ) -> None:
        # 16 mails at 0.5 s outlast the 6 s lease; renewed from its half, 3 s in, with
        # seconds to spare for a machine busy with other work (a 2 s lease, renewed at 1 s
        # between mails of 0.4 s, was lost on one so busy, and mails went twice).
        sink = SlowSink(port=free_port(), delay=0.5)
        settings = self._slow_batch(database_url, sink, 16, lease="6s")
        with serving(sink), running(worker_for(engine, settings, name="slow")):
            assert sink.data_started.wait(timeout=10)
            # Waits for work while the first one's batch runs past its 2 s lease.
            with running(worker_for(engine, settings, name="other")):
                wait_until(lambda: all_in(engine, JobState.DONE, 16), timeout=30)
                settle()
        sent = Counter(message["To"] for message in sink.messages)
        assert sent == Counter(f"slow{n}@example.org" for n in range(16))
        assert {(job.attempts, job.leased_by) for job in jobs(engine)} == {(1, None)}
        assert {row.worker for row in attempts(engine)} == {"slow"}

    def test_a_job_taken_by_another_worker_meanwhile_is_not_sent(
        self, database_url: str, engine: sa.Engine, caplog: pytest.LogCaptureFixture
    ) -> None:
        sink = SlowSink(port=free_port(), delay=0.4)
        settings = self._slow_batch(database_url, sink, 8)
        ids = [job.id for job in jobs(engine)]
        with serving(sink), running(worker_for(engine, settings, name="stalled")):
            assert sink.data_started.wait(timeout=10)
            # As if this worker had stalled past its lease and another had claimed the last
            # four jobs: they are that worker's to send now.
            with db.session_scope(engine) as session:
                session.connection().execute(
                    sa.update(OutboxJob)
                    .where(col(OutboxJob.id).in_(ids[4:]))
                    .values(leased_by="other", lease_until=utcnow() + timedelta(minutes=5))
                )
            wait_until(lambda: len(sink.messages) == 4 and not _running_for(engine, "stalled"))
            settle()
        assert sorted(message["To"] for message in sink.messages) == [
            f"slow{n}@example.org" for n in range(4)
        ]
        assert [job.leased_by for job in jobs(engine)][4:] == ["other"] * 4
        assert "worker.leases_lost count=4" in caplog.text


class TestTricklingServer:
    """A relay answering a byte at a time, each within the read timeout, would hold a send
    past its lease; the send ends at the settings' timeout instead, and is retried."""

    def test_a_send_past_its_deadline_is_retried_and_the_mail_goes_once(
        self, database_url: str, engine: sa.Engine
    ) -> None:
        queue_confirmations(database_url, ["patient@example.org"])
        # The first connection's greeting takes 6.6 s; the next ones are greeted at once.
        server = TricklingSmtp(trickle="greeting")
        mailer = SmtpMailerSettings(host="127.0.0.1", port=server.port, security="none", timeout=1)
        # One send at a time in the worker's thread, which renews leases between sends:
        # a send outlasting the 2 s lease would let the other worker take the job.
        settings = make_settings(
            database_url,
            smtp_port=server.port,
            mailer=mailer,
            job_lease="2s",
            worker_concurrency=1,
        )
        try:
            with (
                running(worker_for(engine, settings, name="first")),
                running(worker_for(engine, settings, name="second")),
            ):
                wait_until(lambda: all_in(engine, JobState.DONE, 1), timeout=20)
                settle()
        finally:
            server.close()
        assert server.delivered == ["patient@example.org"]
        trickled, retried = attempts(engine)
        assert (trickled.outcome, retried.outcome) == (AttemptOutcome.RETRY, AttemptOutcome.SUCCESS)
        assert trickled.error is not None
        assert "abandoned at its deadline" in trickled.error
        assert trickled.finished_at - trickled.started_at < timedelta(seconds=1.6)


def _running_for(engine: sa.Engine, worker: str) -> bool:
    return any(job.leased_by == worker for job in jobs(engine))


class TestGivingWay:
    """The worker inside `serve` lets the requests being answered go first (app/worker.py
    `_give_way`): each round waits for a pause in them, at most `worker_give_way`."""

    def test_mail_waits_for_a_pause_in_the_requests(
        self, database_url: str, engine: sa.Engine, smtp: SmtpSink
    ) -> None:
        queue_confirmations(database_url, ["burst@example.org"])
        settings = make_settings(database_url, smtp_port=smtp.port, worker_give_way=30)
        answering = threading.Event()
        answering.set()
        worker = Worker(
            engine=engine,
            settings=settings,
            mailer=make_mailer(settings.mailer),
            busy=answering.is_set,
        )
        with running(worker):
            time.sleep(0.5)
            assert smtp.messages == []
            assert only_job(engine).state == JobState.PENDING
            answering.clear()
            smtp.wait_for(1)
        assert [message["To"] for message in smtp.messages] == ["burst@example.org"]

    def test_under_endless_requests_mail_still_goes_out(
        self, database_url: str, engine: sa.Engine, smtp: SmtpSink
    ) -> None:
        queue_confirmations(database_url, ["steady@example.org"])
        settings = make_settings(database_url, smtp_port=smtp.port, worker_give_way=0.3)
        worker = Worker(
            engine=engine,
            settings=settings,
            mailer=make_mailer(settings.mailer),
            busy=lambda: True,
        )
        started = time.monotonic()
        with running(worker):
            smtp.wait_for(1)
        assert time.monotonic() - started >= 0.3
        assert [message["To"] for message in smtp.messages] == ["steady@example.org"]

    def test_a_round_that_could_wait_no_longer_is_small(
        self, database_url: str, engine: sa.Engine, smtp: SmtpSink
    ) -> None:
        emails = [f"queued{n}@example.org" for n in range(12)]
        queue_confirmations(database_url, emails)
        settings = make_settings(database_url, smtp_port=smtp.port)
        worker = worker_for(engine, settings, name="pressed")
        try:
            assert worker.run_once(pressed=True) == PRESSED_MAIL_BATCH
            assert len(smtp.messages) == PRESSED_MAIL_BATCH
            assert worker.run_once() == len(emails) - PRESSED_MAIL_BATCH
        finally:
            worker.stop()
        assert sorted(message["To"] for message in smtp.messages) == sorted(emails)

    def test_the_app_notes_its_requests_in_flight_and_their_arrival(
        self, settings: Settings
    ) -> None:
        app = create_app(settings)
        seen: list[int] = []

        @app.get("/probe")
        def probe() -> dict[str, int]:
            seen.append(app.state.metrics.in_flight)
            return {}

        @app.get("/broken")
        def broken() -> None:
            raise RuntimeError("a bug")

        with TestClient(app, raise_server_exceptions=False) as client:
            before = time.monotonic()
            assert client.get("/probe").status_code == 200
            assert before <= app.state.metrics.last_request_at <= time.monotonic()
            noted = app.state.metrics.last_request_at
            assert client.get("/v1/lists/unknown").status_code == 404
            assert client.get("/broken").status_code == 500
            assert app.state.metrics.last_request_at > noted
            # Counted while answered, whatever the outcome, and no longer after.
            assert seen == [1]
            assert app.state.metrics.in_flight == 0
