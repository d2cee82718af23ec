"""Graceful shutdown: SIGTERM to `newsletter serve` or `newsletter worker` while a mail is
being sent and a request is in flight loses nothing and sends nothing twice."""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import free_port, make_settings, wait_until
from tests.processes import (
    HoldingSink,
    Process,
    ServeProcess,
    service_env,
    start_holding_smtp,
)


@pytest.fixture
def held_smtp() -> Iterator[HoldingSink]:
    sink, controller = start_holding_smtp()
    yield sink
    sink.gate.set()
    controller.stop()


def _jobs(url: str) -> list[tuple[str, str, str | None, int]]:
    """(address, state, leased_by, attempts) of each mail job."""
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT s.email, j.state, j.leased_by, j.attempts FROM outbox_job j "
                "JOIN subscription s ON s.id = j.subscription_id "
                "WHERE j.kind = 'mail' ORDER BY s.email"
            )
        ).all()
    engine.dispose()
    return [(str(a), str(b), c, int(d)) for a, b, c, d in rows]


def _queue_signups(database_url: str, smtp_port: int, *emails: str) -> None:
    """Subscriptions whose confirmation mails wait in the outbox (no worker running)."""
    settings = make_settings(database_url, smtp_port=smtp_port, run_worker=False)
    with TestClient(create_app(settings)) as client:
        for email in emails:
            response = client.post("/v1/lists/bluehats/subscriptions", json={"email": email})
            assert response.status_code == 202


class TestWorkerSigterm:
    def test_the_mail_being_sent_is_delivered_the_next_is_given_back_and_sent_after_restart(
        self, database_url: str, held_smtp: HoldingSink, tmp_path: Path
    ) -> None:
        _queue_signups(database_url, held_smtp.port, "ada@example.org", "bob@example.org")
        # One job at a time: bob's waits behind ada's, which the SMTP server holds.
        env = service_env(database_url, smtp_port=held_smtp.port, WORKER_CONCURRENCY="1")
        worker = Process(["worker"], env=env, cwd=tmp_path, log=tmp_path / "worker-1.log")
        try:
            wait_until(lambda: held_smtp.holding == 1, timeout=20)
            worker.terminate()
            worker.wait_for_log("worker.stopping")
            held_smtp.gate.set()
            assert worker.wait() == 0, worker.log_text()
        finally:
            worker.kill()

        assert held_smtp.recipients() == ["ada@example.org"]
        # bob's job was given back untouched: no lease, its attempt not counted.
        assert _jobs(database_url) == [
            ("ada@example.org", "done", None, 1),
            ("bob@example.org", "pending", None, 0),
        ]

        # In production the worker's own counters are scraped from its metrics port.
        metrics_port = free_port()
        again = Process(
            ["worker", "--metrics-port", str(metrics_port)],
            env=env,
            cwd=tmp_path,
            log=tmp_path / "worker-2.log",
        )
        try:
            held_smtp.wait_for(2, timeout=20)
            wait_until(lambda: all(job[1] == "done" for job in _jobs(database_url)))
            scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
            assert 'newsletter_outbox_attempts_total{kind="mail",outcome="success"} 1.0' in scraped
            assert 'newsletter_outbox_jobs{kind="mail",state="pending"} 0.0' in scraped
            again.terminate()
            assert again.wait() == 0, again.log_text()
        finally:
            again.kill()
        assert held_smtp.recipients() == ["ada@example.org", "bob@example.org"]
        assert [job[1:] for job in _jobs(database_url)] == [("done", None, 1), ("done", None, 1)]


def _stopped_cleanly(server: ServeProcess) -> None:
    # uvicorn ends by raising the signal it caught again, after its shutdown is complete.
    assert server.wait() in (0, -signal.SIGTERM), server.log_text()
    assert "Application shutdown complete" in server.log_text()


def _start_request_in_flight(port: int, body: bytes) -> socket.socket:
    """A subscription whose headers are sent and whose body is not: once the server says
    `100 Continue`, the app is running and waiting for the body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(
        b"POST /v1/lists/bluehats/subscriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    interim = b""
    while b"\r\n\r\n" not in interim:
        interim += sock.recv(1024)
    assert interim.startswith(b"HTTP/1.1 100"), interim
    return sock


def _finish_request(sock: socket.socket, body: bytes) -> bytes:
    sock.sendall(body)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    return answer


class TestServeSigterm:
    def test_a_request_in_flight_completes_and_the_mail_in_flight_goes_exactly_once(
        self, database_url: str, held_smtp: HoldingSink, tmp_path: Path
    ) -> None:
        env = service_env(database_url, smtp_port=held_smtp.port)
        server = ServeProcess(env=env, cwd=tmp_path, log=tmp_path / "serve-1.log")
        try:
            response = httpx.post(
                f"{server.base_url}/v1/lists/bluehats/subscriptions",
                json={"email": "early@example.org"},
            )
            assert response.status_code == 202
            # The in-process worker is now inside the SMTP conversation of that mail.
            wait_until(lambda: held_smtp.holding == 1, timeout=20)
            body = json.dumps({"email": "late@example.org"}).encode()
            sock = _start_request_in_flight(server.port, body)

            server.terminate()
            # Draining: the listening socket is closed, the open request is still served.
            wait_until(server.refuses_connections, timeout=10)
            answer = _finish_request(sock, body)
            assert answer.startswith(b"HTTP/1.1 202"), answer
            held_smtp.gate.set()
            _stopped_cleanly(server)
        finally:
            server.kill()

        # Delivered during the stop, or given back and sent after the restart; never twice.
        restarted = ServeProcess(env=env, cwd=tmp_path, log=tmp_path / "serve-2.log")
        try:
            held_smtp.wait_for(2, timeout=20)
            wait_until(lambda: all(job[1] == "done" for job in _jobs(database_url)))
            restarted.terminate()
            _stopped_cleanly(restarted)
        finally:
            restarted.kill()
        assert held_smtp.recipients() == ["early@example.org", "late@example.org"]
        assert [job[1:] for job in _jobs(database_url)] == [("done", None, 1), ("done", None, 1)]
