"""Shared fixtures: a migrated database per test (SQLite or PostgreSQL), a real SMTP server
(aiosmtpd), settings and an app client.

`TEST_DATABASE_URL` selects PostgreSQL (e.g. postgresql+psycopg://postgres@127.0.0.1/test);
without it each test gets its own SQLite file copied from a migrated template.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from fastapi.testclient import TestClient

from app import apikeys, db, migrations
from app.config import Settings, SmtpMailerSettings
from app.main import create_app
from app.models import KeyScope, utcnow

POSTGRES_URL = os.environ.get("TEST_DATABASE_URL") or None
SECRET = "test-secret-key-not-for-production"
TABLES = [
    "worker_heartbeat",
    "blocked_entry",
    "consent_wording",
    "erased_address",
    "audit_event",
    "api_key",
    "webhook_nonce",
    "delivery_attempt",
    "outbox_job",
    "consent_event",
    "token",
    "subscription",
    "mailing_list",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], Any], *, timeout: float = 10.0, every: float = 0.05) -> Any:
    """Poll until `predicate()` is truthy and return it; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(every)


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> str:
    if POSTGRES_URL:
        engine = sa.create_engine(POSTGRES_URL)
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP SCHEMA public CASCADE")
            connection.exec_driver_sql("CREATE SCHEMA public")
        engine.dispose()
        migrations.upgrade(POSTGRES_URL)
        return POSTGRES_URL
    path = tmp_path_factory.mktemp("template") / "template.db"
    migrations.upgrade(f"sqlite:///{path}")
    return str(path)


def _truncate(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    engine.dispose()


@pytest.fixture
def database_url(migrated_template: str, tmp_path: Path) -> Iterator[str]:
    """A database at the latest migration with no rows, for this test alone."""
    if POSTGRES_URL:
        _truncate(POSTGRES_URL)
        yield POSTGRES_URL
        _truncate(POSTGRES_URL)
        return
    path = tmp_path / "newsletter.db"
    shutil.copy(migrated_template, path)
    yield f"sqlite:///{path}"


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    from app.db import make_engine

    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@dataclass
class SmtpSink:
    """What a real SMTP server (aiosmtpd, on loopback) received."""

    host: str
    port: int
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[Any] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.original_content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        with self.lock:
            self.envelopes.append(envelope)
            self.messages.append(message)
        return "250 Message accepted for delivery"

    def mail_to(self, address: str, *, link: str, timeout: float = 10.0) -> EmailMessage:
        """The latest mail to `address` holding a /v1/{link}/ link, once it has arrived."""

        def found() -> EmailMessage | None:
            with self.lock:
                for message in reversed(self.messages):
                    if message["To"] == address and f"/v1/{link}/" in text_of(message):
                        return message
            return None

        message: EmailMessage = wait_until(found, timeout=timeout)
        return message

    def wait_for(self, count: int, *, timeout: float = 10.0) -> list[EmailMessage]:
        wait_until(lambda: len(self.messages) >= count, timeout=timeout)
        return list(self.messages)


class PeerSink(SmtpSink):
    """A real SMTP server noting which connection (client address and port) carried each mail."""

    def __init__(self) -> None:
        super().__init__(host="127.0.0.1", port=free_port())
        self.peers: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.peers.append(session.peer)
        return await super().handle_DATA(server, session, envelope)


class TricklingSmtp:
    """A loopback SMTP server on plain sockets whose first `slow` connections get one reply
    (`trickle`: "greeting" or "quit") a byte every `pace` seconds, each byte well within any
    read timeout; otherwise it answers at once and keeps the recipients of every message it
    accepted (at the end of its DATA)."""

    GREETING = b"220 trickle.example ESMTP ready\r\n"
    BYE = b"221 2.0.0 trickle.example closing connection\r\n"

    def __init__(self, *, trickle: str = "greeting", slow: int = 1, pace: float = 0.2) -> None:
        self.trickle, self.slow, self.pace = trickle, slow, pace
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.delivered: list[str] = []
        self.connections = 0
        self.lock = threading.Lock()
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
            with self.lock:
                self.connections += 1
                slow = self.connections <= self.slow
            threading.Thread(target=self._serve, args=(connection, slow), daemon=True).start()

    def _say(self, connection: socket.socket, reply: bytes, *, slowly: bool) -> None:
        if not slowly:
            connection.sendall(reply)
            return
        for byte in reply:
            connection.sendall(bytes([byte]))
            if self._closed.wait(self.pace):
                return

    def _serve(self, connection: socket.socket, slow: bool) -> None:
        with contextlib.suppress(OSError), connection, connection.makefile("rb") as lines:
            self._say(connection, self.GREETING, slowly=slow and self.trickle == "greeting")
            recipients: list[str] = []
            in_data = False
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if in_data:
                    if line == ".":
                        in_data = False
                        with self.lock:
                            self.delivered.extend(recipients)
                        recipients = []
                        connection.sendall(b"250 2.0.0 queued\r\n")
                    continue
                verb = line[:4].upper()
                if verb == "RCPT":
                    recipients.append(line.partition(":")[2].strip().strip("<>"))
                elif verb == "RSET":
                    recipients = []
                if verb == "DATA":
                    in_data = True
                    connection.sendall(b"354 go on\r\n")
                elif verb == "QUIT":
                    self._say(connection, self.BYE, slowly=slow and self.trickle == "quit")
                    return
                else:
                    connection.sendall(b"250 ok\r\n")

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self.listener.close()


def start_smtp(port: int | None = None) -> tuple[SmtpSink, Controller]:
    sink = SmtpSink(host="127.0.0.1", port=port or free_port())
    controller = Controller(sink, hostname=sink.host, port=sink.port, enable_SMTPUTF8=True)
    controller.start()
    return sink, controller


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink, controller = start_smtp()
    yield sink
    controller.stop()


def make_settings(database_url: str, *, smtp_port: int, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "public_url": "http://testserver",
        "secret_key": SECRET,
        "mailer": SmtpMailerSettings(host="127.0.0.1", port=smtp_port, security="none", timeout=5),
        "auto_migrate": False,
        "worker_poll_interval": 0.05,
        "retry_base_delay": "0.2s",
        "retry_max_delay": "1s",
        "job_lease": "30s",
        # The lease must outlast two backend calls where a list has a backend.
        "backend_timeout": 10,
        "log_level": "DEBUG",
        # The limits would count the suite's own requests; test_ratelimit turns them on.
        "rate_limit_per_ip": None,
        "rate_limit_per_address": None,
        "rate_limit_per_domain": None,
        "mail_budget": None,
        # The scheduled retention job would sit in the queue of every test; test_retention
        # turns it on.
        "retention_interval": None,
        # The in-process worker would wait while a test's requests follow each other and
        # race the test's reads of the outbox; TestGivingWay (test_worker_resilience) turns
        # it on.
        "worker_give_way": 0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(database_url: str, smtp: SmtpSink) -> Settings:
    return make_settings(database_url, smtp_port=smtp.port)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def api_key_headers(engine: sa.Engine, name: str, scope: KeyScope) -> dict[str, str]:
    """The `Authorization` header of a new admin key."""
    with db.session_scope(engine) as session:
        _, key = apikeys.create(session, name=name, scope=scope, now=utcnow())
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def read_key(client: TestClient, engine: sa.Engine) -> dict[str, str]:
    return api_key_headers(engine, "dashboard", KeyScope.READ)


@pytest.fixture
def write_key(client: TestClient, engine: sa.Engine) -> dict[str, str]:
    return api_key_headers(engine, "operator", KeyScope.WRITE)


def text_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    content: str = part.get_content()
    return content


def link_in(message: EmailMessage, kind: str) -> str:
    """The path of the first /v1/{kind}/... link in the mail's text part."""
    for word in text_of(message).split():
        if f"/v1/{kind}/" in word:
            return word[word.index("/v1/") :]
    raise AssertionError(f"no {kind} link in mail:\n{text_of(message)}")


def count_rows(url: str, table: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        value = connection.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one()
    engine.dispose()
    return int(value)


class LiveServer:
    """The app served by a real uvicorn on a loopback port, in a background thread.

    `with LiveServer(create_app(settings)) as base_url:` runs the lifespan (engine, worker),
    and on exit asks uvicorn to stop and waits for its thread.
    """

    def __init__(self, app: Any, *, timeout: float = 15.0, port: int | None = None) -> None:
        import uvicorn

        # A port chosen beforehand lets the app's settings name its own public URL.
        self.port = port or free_port()
        self.timeout = timeout
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=5,
            # As `newsletter serve`: the app alone decides whose X-Forwarded-For to believe.
            proxy_headers=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, name=f"uvicorn-{self.port}", daemon=True
        )

    def __enter__(self) -> str:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), timeout=self.timeout)
        if not self.server.started:
            pytest.fail("uvicorn did not start")
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.timeout)
        if self.thread.is_alive():
            pytest.fail(f"uvicorn did not stop within {self.timeout}s")


def pytest_report_header() -> str:
    return (
        f"database: {'PostgreSQL ' + POSTGRES_URL if POSTGRES_URL else 'SQLite (a file per test)'}"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On PostgreSQL (TEST_DATABASE_URL set), the tests that use the database: those that
    take `database_url` (directly or through `engine`, `settings`, `client`...) or are
    marked `database` (they reach TEST_DATABASE_URL another way). The others (settings,
    units, SMTP, backends' adapters...) give the same answer on either database: they run
    once, in the SQLite run, and `make test` runs both. On this 2-core machine running them
    twice took about a third of the pair's time."""
    if not POSTGRES_URL:
        return
    kept: list[pytest.Item] = []
    left: list[pytest.Item] = []
    for item in items:
        uses_database = "database_url" in getattr(item, "fixturenames", ())
        (kept if uses_database or item.get_closest_marker("database") else left).append(item)
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = kept
