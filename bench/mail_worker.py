"""The worker's CPU per confirmation mail, measured in-process.

    .venv/bin/python bench/mail_worker.py                       # SQLite and PostgreSQL, file mailer
    .venv/bin/python bench/mail_worker.py --mailers file smtp --mails 2000
    .venv/bin/python bench/mail_worker.py --databases sqlite --batch-size 100

Seeds N pending subscriptions through `subscriptions.subscribe` (each with its confirmation
mail job, one transaction each as the API writes them) on a fresh SQLite file and on a
PostgreSQL database (emptied first: `DROP SCHEMA public CASCADE`), then calls
`Worker.run_once()` until the queue is drained and prints mails/s and the CPU time of this
process per mail (`time.process_time`, every thread: the worker's pool included). This is
the cost the embedded default pays inside the API process, where it shares the GIL with the
requests.

The file mailer writes into a temporary folder; `smtp` sends to an aiosmtpd sink run in
another process on loopback, so the sink's CPU is not counted. Logging is configured as
`newsletter serve` does (text at INFO), into /dev/null: the worker's log lines are part of
its cost. A figure, not a test: it exits 1 only when a mail is missing or a job not done.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import _common  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from app import addresses, db, lists, logs, migrations, subscriptions  # noqa: E402
from app.config import FileMailerSettings, Settings, SmtpMailerSettings  # noqa: E402
from app.mailer import make_mailer  # noqa: E402
from app.models import JobKind, JobState, OutboxJob, utcnow  # noqa: E402
from app.worker import Worker  # noqa: E402

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/bench"
SECRET_KEY = "bench-secret-key-not-for-production"  # noqa: S105


@dataclass
class Figures:
    database: str
    mailer: str
    mails: int
    rounds: int
    seconds: float
    cpu_seconds: float

    def line(self) -> str:
        return (
            f"{self.database:<10} {self.mailer:<5} mails={self.mails:<6} rounds={self.rounds:<5} "
            f"{self.mails / self.seconds:8.0f} mails/s  "
            f"{1000 * self.cpu_seconds / self.mails:6.3f} ms CPU/mail  "
            f"{1000 * self.seconds / self.mails:6.3f} ms wall/mail"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def smtp_sink() -> Iterator[int]:
    """An aiosmtpd server that accepts and drops every mail, in its own process."""
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            f"127.0.0.1:{port}",
            "-c",
            "aiosmtpd.handlers.Sink",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the SMTP sink did not start")
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def _fresh_database(url: str) -> None:
    if url.startswith("postgresql"):
        # The suite's database `bench`, created when missing (bench/README.md).
        _common.reset_postgres(url)
    migrations.upgrade(url)


def _settings(url: str, mailer: Any, options: argparse.Namespace) -> Settings:
    values: dict[str, Any] = {
        "database_url": url,
        "public_url": "http://bench.invalid",
        "secret_key": SECRET_KEY,
        "mailer": mailer,
        "auto_migrate": False,
        "rate_limit_per_ip": None,
        "rate_limit_per_address": None,
        "rate_limit_per_domain": None,
        "mail_budget": None,
        "retention_interval": None,
        "reconcile_interval": None,
    }
    if options.batch_size:
        values["worker_batch_size"] = options.batch_size
    if options.concurrency:
        values["worker_concurrency"] = options.concurrency
    return Settings(**values)


def _seed(engine: sa.Engine, settings: Settings, count: int) -> None:
    key = settings.token_key()
    with db.session_scope(engine) as session:
        lists.sync_from_settings(session, declared=settings.lists, now=utcnow())
    slug = settings.lists[0].slug
    for n in range(count):
        with db.session_scope(engine) as session:
            subscriptions.subscribe(
                session,
                list_slug=slug,
                address=addresses.parse(f"reader{n}@example.org", new=True),
                locale=None,
                fallback_locale=None,
                attributes={},
                evidence=subscriptions.Evidence(source="api"),
                key=key,
                now=utcnow(),
                resend_interval=settings.resend_interval,
            )


def _done(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        query = sa.select(sa.func.count()).where(
            OutboxJob.kind == JobKind.MAIL,  # type: ignore[arg-type]
            OutboxJob.state == JobState.DONE,  # type: ignore[arg-type]
        )
        return int(connection.execute(query).scalar_one())


def run_one(database: str, mailer_kind: str, options: argparse.Namespace) -> Figures:
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mail-bench-")))
        url = f"sqlite:///{folder / 'bench.db'}" if database == "sqlite" else options.postgres_url
        if mailer_kind == "smtp":
            port = stack.enter_context(smtp_sink())
            mailer: Any = SmtpMailerSettings(
                host="127.0.0.1", port=port, security="none", timeout=10
            )
        else:
            mailer = FileMailerSettings(directory=folder / "mail")
        settings = _settings(url, mailer, options)
        _fresh_database(url)
        engine = db.make_engine(url)
        stack.callback(engine.dispose)
        _seed(engine, settings, options.mails)
        worker = Worker(engine=engine, settings=settings, mailer=make_mailer(settings.mailer))
        stack.callback(worker.stop, 30)
        # As `Worker.start` does: the first heartbeat is written before any round.
        worker.beat()

        rounds = 0
        wall, cpu = time.perf_counter(), time.process_time()
        while worker.run_once():
            rounds += 1
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

        done = _done(engine)
        if done != options.mails:
            raise SystemExit(f"{database}/{mailer_kind}: {done} of {options.mails} jobs done")
        if mailer_kind == "file":
            written = len(list((folder / "mail").glob("*.eml")))
            if written != options.mails:
                raise SystemExit(f"{database}/file: {written} of {options.mails} mails written")
        return Figures(database, mailer_kind, options.mails, rounds, wall, cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mails", type=int, default=1000)
    parser.add_argument(
        "--databases", nargs="+", choices=("sqlite", "postgresql"), default=["sqlite", "postgresql"]
    )
    parser.add_argument("--mailers", nargs="+", choices=("file", "smtp"), default=["file"])
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--batch-size", type=int, default=0, help="worker_batch_size (20)")
    parser.add_argument("--concurrency", type=int, default=0, help="worker_concurrency (4)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each setup")
    options = parser.parse_args(argv)

    with open(os.devnull, "w") as devnull:
        logs.configure(level="INFO", fmt="text", stream=devnull)
        # Migrations and seeding say nothing worth the time.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        for database in options.databases:
            for mailer_kind in options.mailers:
                for _ in range(options.repeat):
                    print(run_one(database, mailer_kind, options).line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
