"""The database goes away and comes back (a private PostgreSQL cluster, restarted under load):
answers are 202 or 503, never 500 or a hang; readiness follows; nothing acknowledged is
lost; the worker carries on by itself.

These tests run their own cluster whatever TEST_DATABASE_URL says: stopping the machine's
shared server is not ours to do.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from app import migrations
from app.main import create_app
from tests.conftest import LiveServer, SmtpSink, make_settings, wait_until
from tests.processes import PrivatePostgres


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
