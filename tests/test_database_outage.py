"""The database goes away and comes back (a private PostgreSQL cluster, restarted under load):
answers are 202 or 503, never 500 or a hang; readiness follows; nothing acknowledged is
lost; the worker carries on by itself.

These tests run their own cluster whatever TEST_DATABASE_URL says: stopping the machine's
shared server is not ours to do.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app import db, metrics, migrations, readiness
from app.mailer import make_mailer
from app.main import create_app
from app.worker import Worker
from tests.conftest import LiveServer, SmtpSink, make_settings, wait_until
from tests.processes import PrivatePostgres, start_holding_smtp


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    cluster = PrivatePostgres()
    migrations.upgrade(cluster.url)
    yield cluster
    cluster.destroy()


class SignupLoad:
    """A few clients subscribing new addresses in a loop, each answer recorded."""

    def __init__(self, base_url: str, *, clients: int = 3) -> None:
        self.base_url = base_url
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[str, int, dict[str, str] | None]] = []
        self._numbers = itertools.count()
        self._threads = [
            threading.Thread(target=self._run, name=f"signup-{n}", daemon=True)
            for n in range(clients)
        ]

    def __enter__(self) -> SignupLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self) -> None:
        # A timeout well under the test's: a hung request fails the test instead of hiding.
        with httpx.Client(base_url=self.base_url, timeout=15) as client:
            while not self.stop.is_set():
                with self.lock:
                    email = f"load{next(self._numbers)}@example.org"
                response = client.post("/v1/lists/bluehats/subscriptions", json={"email": email})
                body = response.json() if response.status_code != 202 else None
                with self.lock:
                    self.answers.append((email, response.status_code, body))

    def count(self, status: int) -> int:
        with self.lock:
            return sum(1 for _, code, _ in self.answers if code == status)

    def acknowledged(self) -> set[str]:
        with self.lock:
            return {email for email, code, _ in self.answers if code == 202}


def _stored(url: str) -> set[str]:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT email FROM subscription")).scalars().all()
    engine.dispose()
    return set(rows)


def _metric(text: str, name: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


def test_a_database_restart_under_load_loses_no_acknowledged_subscription(
    postgres: PrivatePostgres, smtp: SmtpSink
) -> None:
    settings = make_settings(postgres.url, smtp_port=smtp.port)
    with LiveServer(create_app(settings)) as base_url, SignupLoad(base_url) as load:
        probe = httpx.Client(base_url=base_url, timeout=15)
        assert probe.get("/readyz").status_code == 200
        wait_until(lambda: load.count(202) >= 20, timeout=20)

        postgres.stop()
        down = wait_until(lambda: (r := probe.get("/readyz")).status_code == 503 and r)
        assert down.json()["error"] == "database_unavailable"
        # The clients keep asking: they get 503 quickly, in the usual error shape.
        refused_before = load.count(503)
        wait_until(lambda: load.count(503) >= refused_before + 5, timeout=20)
        scrape = probe.get("/metrics")
        assert scrape.status_code == 200
        assert _metric(scrape.text, "newsletter_database_up") == 0

        postgres.start()
        wait_until(lambda: probe.get("/readyz").status_code == 200, timeout=30)
        accepted_after = load.count(202)
        wait_until(lambda: load.count(202) >= accepted_after + 20, timeout=20)
        load.stop.set()
        probe.close()

    statuses = {code for _, code, _ in load.answers}
    assert statuses == {202, 503}, statuses
    refusals = [body for _, code, body in load.answers if code == 503]
    assert all(body is not None and body["error"] == "database_unavailable" for body in refusals)
    assert load.acknowledged() <= _stored(postgres.url)


def _asked_while_it_hangs(
    postgres: PrivatePostgres,
    smtp: SmtpSink,
    path: str,
    *,
    up: Callable[[httpx.Response], bool],
) -> list[tuple[httpx.Response, float]]:
    """`path` asked three times while the server hangs (stopped dead, its connections open
    and silent), each answer with the seconds it took. Before and after, `up` holds of
    its answer; meanwhile `/healthz` answers 200."""
    settings = make_settings(postgres.url, smtp_port=smtp.port, run_worker=False)
    with (
        LiveServer(create_app(settings)) as base_url,
        httpx.Client(base_url=base_url, timeout=20) as probe,
    ):
        assert up(probe.get(path))
        answers = []
        with postgres.frozen():
            for _ in range(3):
                started = time.monotonic()
                answer = probe.get(path)
                answers.append((answer, time.monotonic() - started))
            assert probe.get("/healthz").status_code == 200
        wait_until(lambda: up(probe.get(path)), timeout=30)
    return answers


def test_a_database_that_hangs_is_not_ready_within_seconds_and_liveness_answers(
    postgres: PrivatePostgres, smtp: SmtpSink
) -> None:
    """A server that hangs answered no readiness probe at all: each waited with a thread
    of the pool for as long as the server hung. Now each probe answers 503 within the
    deadline, and one check at most waits."""
    answers = _asked_while_it_hangs(
        postgres, smtp, "/readyz", up=lambda answer: answer.status_code == 200
    )
    for answer, took in answers:
        assert answer.status_code == 503
        assert answer.json()["error"] == "database_unavailable"
        assert took < readiness.DEADLINE_S + 2, took


def test_a_scrape_of_a_database_that_hangs_answers_within_seconds(
    postgres: PrivatePostgres, smtp: SmtpSink
) -> None:
    """As readiness: a scrape read the database's gauges with a thread of the pool for as
    long as the server hung, one more thread every scrape. Now it answers at the deadline,
    the database said down, and one read at most waits."""
    answers = _asked_while_it_hangs(
        postgres,
        smtp,
        "/metrics",
        up=lambda scrape: _metric(scrape.text, "newsletter_database_up") == 1,
    )
    for scrape, took in answers:
        assert scrape.status_code == 200
        assert _metric(scrape.text, "newsletter_database_up") == 0
        assert took < metrics.READ_DEADLINE_S + 2, took


def test_the_worker_survives_an_outage_and_sends_what_comes_after(
    postgres: PrivatePostgres, smtp: SmtpSink
) -> None:
    settings = make_settings(postgres.url, smtp_port=smtp.port)
    with LiveServer(create_app(settings)) as base_url:
        app_worker = None
        with httpx.Client(base_url=base_url, timeout=15) as client:
            before = client.post(
                "/v1/lists/bluehats/subscriptions", json={"email": "a@example.org"}
            )
            assert before.status_code == 202
            smtp.mail_to("a@example.org", link="confirm")

            postgres.stop()
            answer = client.post(
                "/v1/lists/bluehats/subscriptions", json={"email": "b@example.org"}
            )
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "5"
            postgres.start()

            wait_until(lambda: client.get("/readyz").status_code == 200, timeout=30)
            after = client.post("/v1/lists/bluehats/subscriptions", json={"email": "c@example.org"})
            assert after.status_code == 202
            # The worker thread lived through the outage and picks the new job up.
            smtp.mail_to("c@example.org", link="confirm", timeout=20)
            app_worker = client.get("/readyz").json()["worker"]
    assert app_worker == "fresh"
    assert "b@example.org" not in _stored(postgres.url)


def test_a_mail_sent_while_the_database_was_away_is_recorded_once_it_is_back_not_sent_again(
    postgres: PrivatePostgres,
) -> None:
    """The worker knows the mail left: it writes so when the database answers again, within
    the job's lease, rather than letting the lease run out and the job be sent again."""
    sink, controller = start_holding_smtp()
    engine = db.make_engine(postgres.url)
    settings = make_settings(postgres.url, smtp_port=sink.port, job_lease="20s")
    worker = Worker(engine=engine, settings=settings, mailer=make_mailer(settings.mailer))
    try:
        queuing = make_settings(postgres.url, smtp_port=sink.port, run_worker=False)
        with TestClient(create_app(queuing)) as client:
            answer = client.post(
                "/v1/lists/bluehats/subscriptions", json={"email": "held@example.org"}
            )
            assert answer.status_code == 202
        worker.start()
        wait_until(lambda: sink.holding == 1, timeout=20)

        postgres.stop()
        sink.gate.set()  # the mail leaves; its outcome cannot be written
        sink.wait_for(1)
        wait_until(lambda: sink.holding == 0)
        postgres.start()

        # Well within the 20 s lease, at whose end the job would be taken and sent again.
        wait_until(lambda: _held_job(postgres.url) == ("done", 1), timeout=10)
        assert sink.recipients() == ["held@example.org"]
    finally:
        worker.stop(timeout=10)
        engine.dispose()
        controller.stop()


def _held_job(url: str) -> tuple[str, int] | None:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            row = connection.execute(
                sa.text(
                    "SELECT j.state, j.attempts FROM outbox_job j "
                    "JOIN subscription s ON s.id = j.subscription_id "
                    "WHERE s.email = 'held@example.org' AND j.kind = 'mail'"
                )
            ).one_or_none()
    finally:
        engine.dispose()
    return (str(row[0]), int(row[1])) if row is not None else None
