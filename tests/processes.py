"""The service as operators run it, for the operations tests: `newsletter serve` and
`newsletter worker` as subprocesses, an SMTP server that holds mails until told, and a
private PostgreSQL cluster that a test may stop and start (never the machine's shared one).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiosmtpd.controller import Controller

from tests.conftest import SECRET, SmtpSink, free_port, wait_until

NEWSLETTER = str(Path(sys.executable).parent / "newsletter")
PG_BIN = Path("/usr/lib/postgresql/15/bin")


@dataclass
class HoldingSink(SmtpSink):
    """An SMTP server that keeps each mail's DATA unanswered while `gate` is closed: the
    sending worker is caught in the middle of a send."""

    gate: threading.Event = field(default_factory=threading.Event)
    holding: int = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.holding += 1
        while not self.gate.is_set():
            await asyncio.sleep(0.01)
        with self.lock:
            self.holding -= 1
        return await super().handle_DATA(server, session, envelope)

    def recipients(self) -> list[str]:
        with self.lock:
            return sorted(str(message["To"]) for message in self.messages)


def start_holding_smtp() -> tuple[HoldingSink, Controller]:
    sink = HoldingSink(host="127.0.0.1", port=free_port())
    controller = Controller(sink, hostname=sink.host, port=sink.port, enable_SMTPUTF8=True)
    controller.start()
    return sink, controller


def start_login_smtp(authenticator: Any) -> tuple[SmtpSink, Controller]:
    """An SMTP server on loopback that asks for a login over plain text, and checks it with
    `authenticator` (aiosmtpd's)."""
    sink = SmtpSink(host="127.0.0.1", port=free_port())
    controller = Controller(
        sink,
        hostname=sink.host,
        port=sink.port,
        authenticator=authenticator,
        auth_require_tls=False,
    )
    controller.start()
    return sink, controller


def service_env(database_url: str, *, smtp_port: int, **settings: str) -> dict[str, str]:
    """The environment of a `newsletter` process: the test's database and SMTP server."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("NEWSLETTER_")}
    values = {
        "DATABASE_URL": database_url,
        "SECRET_KEY": SECRET,
        "PUBLIC_URL": "http://testserver",
        "MAILER__KIND": "smtp",
        "MAILER__HOST": "127.0.0.1",
        "MAILER__PORT": str(smtp_port),
        "MAILER__SECURITY": "none",
        # Longer than any hold in these tests: a held send must not time out and be retried.
        "MAILER__TIMEOUT": "20",
        "JOB_LEASE": "60s",
        "AUTO_MIGRATE": "false",
        "WORKER_POLL_INTERVAL": "0.1",
        "RATE_LIMIT_PER_IP": "off",
        "RATE_LIMIT_PER_ADDRESS": "off",
        "RATE_LIMIT_PER_DOMAIN": "off",
        "MAIL_BUDGET": "off",
        **settings,
    }
    env.update({f"NEWSLETTER_{name}": value for name, value in values.items()})
    return env


class Process:
    """A `newsletter ...` subprocess whose stderr (the log) goes to a file."""

    def __init__(self, args: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log_path = log
        self._log = log.open("ab")
        self.popen = subprocess.Popen(
            [NEWSLETTER, *args], env=env, cwd=cwd, stdout=self._log, stderr=self._log
        )

    def log_text(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace")

    def wait_for_log(self, text: str, *, timeout: float = 20.0) -> None:
        wait_until(
            lambda: text in self.log_text() or self.popen.poll() is not None, timeout=timeout
        )
        assert text in self.log_text(), f"{text!r} never logged:\n{self.log_text()}"

    def terminate(self) -> None:
        self.popen.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.popen.wait(timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self._log.close()


class ServeProcess(Process):
    """`newsletter serve` on a free loopback port, ready once /readyz answers 200."""

    def __init__(self, *, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.port = free_port()
        super().__init__(["serve", "--port", str(self.port)], env=env, cwd=cwd, log=log)
        self.base_url = f"http://127.0.0.1:{self.port}"
        wait_until(self._ready, timeout=30)
        assert self.popen.poll() is None, self.log_text()

    def _ready(self) -> bool:
        if self.popen.poll() is not None:
            return True
        try:
            return httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def refuses_connections(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        except OSError:
            return True
        return False


class PrivatePostgres:
    """A PostgreSQL cluster of this test's own, in a temporary folder, on a free loopback port.

    Stopping it is what a database restart or failover looks like to the service.
    """

    def __init__(self) -> None:
        # Under /tmp itself: pytest's folders are not reachable by the postgres user.
        self.root = Path(tempfile.mkdtemp(prefix="newsletter-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.port = free_port()
        shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres(
            PG_BIN / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8"
        )
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: object) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *map(str, command)],
            check=True,
            capture_output=True,
            cwd=self.root,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            "-c fsync=off -c max_connections=100"
        )
        self._as_postgres(
            PG_BIN / "pg_ctl",
            "-D",
            self.data,
            "-o",
            options,
            "-l",
            self.root / "log",
            "-w",
            "start",
        )

    def stop(self) -> None:
        # `fast`: sessions are cut, as in a crash or failover seen from the client.
        self._as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server and its sessions stopped dead (SIGSTOP) for the block: connections
        stay open and get no answer, as from a server that hangs or a network that drops
        everything without a word."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(
            ["pgrep", "-P", str(postmaster)], capture_output=True, text=True, check=False
        ).stdout.split()
        pids = [postmaster, *map(int, children)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
