"""Draining a burst of confirmations to Mailgun: how many HTTP calls, how long, how much memory?

For each database (a new SQLite file; optionally the PostgreSQL database `bench` on
loopback, emptied first) the script writes `--count` (100,000) confirmed subscriptions as
`confirm()` leaves them: the subscription, its standing unsubscribe token and one sync job
(`fresh_opt_in` false, as the confirmation of a first opt-in leaves it; `--fresh-opt-in`
for re-subscriptions, which also clear the address's old suppressions: two calls each).
Then it starts a real `newsletter worker` process, configured by NEWSLETTER_* variables
only (the list `bluehats` with a `mailgun` backend whose base_url is the fake Mailgun of
tests/fake_mailgun.py, served by this process on 127.0.0.1; the file mailer; the default
NEWSLETTER_SYNC_BATCH_SIZE), and waits until every sync job is done.

It prints, and writes to bench/results/sync_mailgun.json:

    calls       HTTP requests the fake received, by endpoint (target: at most 105)
    drain       seconds from the worker's start to the last sync job done
    members     members the fake holds at the end (must be --count, all subscribed)
    peak RSS    of the worker process (VmHWM)

with the time the fake spent answering, the worker's CPU, and the rounds it took. It is
a measurement, not a test: it never fails on a slow figure (it exits 1 only when members
are missing or jobs are left undone).

    .venv/bin/python bench/sync_mailgun.py [--databases sqlite postgresql] [--count 100000]
                                           [--fresh-opt-in | --no-fresh-opt-in]
                                           [--clear-suppressions | --no-clear-suppressions]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # The fake Mailgun lives in tests/; the script runs as `python bench/sync_mailgun.py`.
    sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

from app import db, lists, migrations, outbox, tokens  # noqa: E402
from app.config import Settings  # noqa: E402
from app.models import JobKind, Subscription, TokenPurpose, utcnow  # noqa: E402
from tests.conftest import LiveServer  # noqa: E402
from tests.fake_mailgun import FakeMailgun  # noqa: E402

RESULTS_FILE = ROOT / "bench" / "results" / "sync_mailgun.json"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/bench"
DATABASES = ("sqlite", "postgresql")
LOOPBACK = "127.0.0.1"
LIST_SLUG = "bluehats"
LIST_ADDRESS = "bluehats@mail.codegouv.fr"
SECRET_KEY = "bench-secret-key-not-for-production"  # noqa: S105
PUBLIC_URL = "https://newsletter.example.org"
CALL_TARGET = 105  # for 100,000 confirmations: 100 bulk calls of 1,000, and a little slack
SEED_CHUNK = 5000
POLL_EVERY = 0.25
STOP_TIMEOUT = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------------------
# Figures


@dataclass
class Run:
    database: str
    url: str
    count: int
    fresh_opt_in: bool
    clear_suppressions: bool
    postgres_autovacuum: str | None = None
    seed_s: float = 0.0
    # From the worker's start (Popen) to the last sync job done.
    drain_s: float | None = None
    # When the fake saw its first and last request, from the worker's start.
    first_call_at_s: float | None = None
    last_call_at_s: float | None = None
    http_calls: int = 0
    calls_by_endpoint: dict[str, int] = field(default_factory=dict)
    # Seconds the fake spent answering (parse + apply), summed, per endpoint.
    fake_busy_s: dict[str, float] = field(default_factory=dict)
    members_held: int = 0
    members_subscribed: int = 0
    members_with_unsubscribe_url: int = 0
    jobs_done: int = 0
    jobs_dead: int = 0
    jobs_left: int = 0
    delivery_attempts: int = 0
    sync_rounds: int = 0
    worker_peak_rss_mib: float = 0.0
    worker_cpu_s: float = 0.0
    bench_process_cpu_s: float = 0.0
    worker_exit_status: int | None = None
    worker_errors: list[str] = field(default_factory=list)
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return (
            not self.timed_out
            and self.jobs_left == 0
            and self.jobs_dead == 0
            and self.members_held == self.count
            and self.members_subscribed == self.count
        )


# --------------------------------------------------------------------------------------
# The database


def _check_postgres_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing a non-loopback PostgreSQL host: {parts.hostname!r}")
    if parts.path.lstrip("/") != "bench":
        raise SystemExit("the benchmark empties its database: it only uses the database `bench`")
    return url


def _reset_postgres(url: str) -> None:
    import psycopg

    conninfo = url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as connection:
        connection.execute("DROP SCHEMA IF EXISTS public CASCADE")
        connection.execute("CREATE SCHEMA public")


def _postgres_setting(url: str, name: str) -> str:
    import psycopg

    conninfo = url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as connection:
        row = connection.execute(f"SHOW {name}").fetchone()  # a fixed name, not input
    return str(row[0]) if row else "?"


def _list_settings(base_url: str, *, clear_suppressions: bool) -> list[dict[str, Any]]:
    return [
        {
            "slug": LIST_SLUG,
            "name": "Gazette BlueHats",
            "default_locale": "fr",
            "backend": {
                "kind": "mailgun",
                "list_address": LIST_ADDRESS,
                "api_key": FakeMailgun.api_key,
                "base_url": base_url,
                "clear_suppressions": clear_suppressions,
            },
        }
    ]


def _address(n: int) -> str:
    return f"member-{n:06d}@example.org"


def seed(url: str, *, count: int, fresh_opt_in: bool) -> None:
    """Confirmed subscriptions as `subscriptions.confirm()` leaves them: the row, its
    unsubscribe token, and the sync job `outbox.enqueue_sync` would write for it."""
    migrations.upgrade(url)
    settings = Settings(
        database_url=url,
        secret_key=SECRET_KEY,
        lists=_list_settings("http://127.0.0.1:9", clear_suppressions=True),
    )
    key = settings.token_key()
    engine = db.make_engine(url)
    try:
        now = utcnow()
        with db.session_scope(engine) as session:
            lists.sync_from_settings(session, declared=settings.lists, now=now)
        with db.session_scope(engine) as session:
            list_id = lists.get(session, slug=LIST_SLUG).id
        assert list_id is not None
        for start in range(0, count, SEED_CHUNK):
            with db.session_scope(engine) as session:
                rows = [
                    Subscription(
                        list_id=list_id,
                        email=_address(n),
                        email_key=_address(n),
                        status="confirmed",
                        locale="fr" if n % 3 else "en",
                        attributes={"name": f"Member {n}"} if n % 2 else {},
                        consent_version="2026-11",
                        created_at=now,
                        updated_at=now,
                        confirmed_at=now,
                    )
                    for n in range(start, min(count, start + SEED_CHUNK))
                ]
                session.add_all(rows)
                session.flush()
                for row in rows:
                    assert row.id is not None
                    tokens.issue(
                        session,
                        subscription=row,
                        purpose=TokenPurpose.UNSUBSCRIBE,
                        key=key,
                        now=now,
                        ttl=None,
                    )
                    # What `outbox.enqueue_sync` writes for a subscription with no pending
                    # job. It is not called itself: on SQLite its "pending job with this
                    # key?" lookup scans every pending job (see bench/README.md), which
                    # makes writing 100,000 of them quadratic.
                    outbox.enqueue(
                        session,
                        kind=JobKind.SYNC,
                        payload={
                            "subscription_id": row.id,
                            "list_id": list_id,
                            "fresh_opt_in": fresh_opt_in,
                        },
                        now=now,
                        dedupe_key=f"sync:{row.id}",
                    )
    finally:
        engine.dispose()


def _reader(url: str) -> sa.Engine:
    """A plain engine for counting: it takes no write lock (SQLite WAL readers never wait)."""
    return sa.create_engine(url, poolclass=sa.pool.NullPool)


def _sync_job_states(reader: sa.Engine) -> Counter[str]:
    with reader.connect() as connection:
        rows = connection.exec_driver_sql(
            "SELECT state, count(*) FROM outbox_job WHERE kind = 'sync' GROUP BY state"
        ).all()
    return Counter({str(state): int(n) for state, n in rows})


def _attempt_count(reader: sa.Engine) -> int:
    with reader.connect() as connection:
        return int(connection.exec_driver_sql("SELECT count(*) FROM delivery_attempt").scalar_one())


# --------------------------------------------------------------------------------------
# The fake Mailgun, timed


def _endpoint(method: str, path: str) -> str:
    if path.endswith("/members.json"):
        return "POST members.json (bulk)"
    if path.endswith("/members/pages"):
        return "GET members/pages"
    if "/unsubscribes/" in path:
        return f"{method} unsubscribes/{{address}}"
    if "/bounces/" in path:
        return f"{method} bounces/{{address}}"
    if re.search(r"/members/[^/]+$", path):
        return f"{method} members/{{address}}"
    if path.endswith("/members"):
        return f"{method} members (one)"
    return f"{method} other"


class Timed:
    """ASGI wrapper: when each request arrived and how long the fake took to answer it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.arrivals: list[float] = []
        self.busy: dict[str, float] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            with self.lock:
                self.arrivals.append(started)
                endpoint = _endpoint(scope["method"], scope["path"])
                self.busy[endpoint] = self.busy.get(endpoint, 0.0) + time.monotonic() - started


# --------------------------------------------------------------------------------------
# The worker


def _newsletter_command() -> str:
    here = Path(sys.executable).parent / "newsletter"
    if here.exists():
        return str(here)
    venv = ROOT / ".venv" / "bin" / "newsletter"
    if venv.exists():
        return str(venv)
    found = shutil.which("newsletter")
    if found is None:
        raise SystemExit("cannot find the `newsletter` command (pip install -e .)")
    return found


def _worker_env(
    *, url: str, base_url: str, workdir: Path, clear_suppressions: bool, extra: dict[str, str]
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(
        {
            "NEWSLETTER_DATABASE_URL": url,
            "NEWSLETTER_SECRET_KEY": SECRET_KEY,
            "NEWSLETTER_PUBLIC_URL": PUBLIC_URL,
            "NEWSLETTER_LISTS": json.dumps(
                _list_settings(base_url, clear_suppressions=clear_suppressions)
            ),
            "NEWSLETTER_MAILER__KIND": "file",
            "NEWSLETTER_MAILER__DIRECTORY": str(workdir / "mail"),
            "NEWSLETTER_AUTO_MIGRATE": "false",
            # INFO: one `sync.round` line per round, counted below.
            "NEWSLETTER_LOG_LEVEL": "INFO",
            **extra,
        }
    )
    return env


def _process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"   the worker did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM; killing it")
            process.kill()
            process.wait(timeout=10)
    return int(process.returncode)


# --------------------------------------------------------------------------------------


def run_database(args: argparse.Namespace, database: str, extra_env: dict[str, str]) -> Run:
    with tempfile.TemporaryDirectory(prefix="newsletter-bench-sync-") as tmp:
        workdir = Path(tmp)
        autovacuum = None
        if database == "sqlite":
            url = f"sqlite:///{workdir / 'newsletter.db'}"
        else:
            url = _check_postgres_url(args.postgres_url)
            _reset_postgres(url)
            autovacuum = _postgres_setting(url, "autovacuum")
        run = Run(
            database=database,
            url=url,
            count=args.count,
            fresh_opt_in=args.fresh_opt_in,
            clear_suppressions=args.clear_suppressions,
            postgres_autovacuum=autovacuum,
        )
        print(f"\n== {database}: {args.count:,} confirmed subscriptions with their sync jobs")
        if autovacuum == "off":
            print(
                "   note: autovacuum is off on this server: the planner's statistics stay "
                "those of the empty tables (no ANALYZE is run here)"
            )
        started = time.monotonic()
        seed(url, count=args.count, fresh_opt_in=args.fresh_opt_in)
        run.seed_s = round(time.monotonic() - started, 1)
        print(f"   written in {run.seed_s:.1f} s ({url})")

        fake = FakeMailgun()
        fake.create_list(LIST_ADDRESS)
        timed = Timed(fake.app())
        reader = _reader(url)
        log_path = workdir / "worker.log"
        own_cpu = time.process_time()
        with LiveServer(timed) as base_url:
            env = _worker_env(
                url=url,
                base_url=base_url,
                workdir=workdir,
                clear_suppressions=args.clear_suppressions,
                extra=extra_env,
            )
            print(f"   fake Mailgun at {base_url}; starting `newsletter worker` ...", flush=True)
            with log_path.open("wb") as log:
                t0 = time.monotonic()
                process = subprocess.Popen(
                    [_newsletter_command(), "worker"],
                    cwd=workdir,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                run.drain_s, states = _wait_drained(
                    process, reader, t0=t0, timeout=args.timeout, progress=args.progress
                )
                run.timed_out = run.drain_s is None
                run.worker_peak_rss_mib = round(_peak_rss_mib(process.pid), 1)
                run.worker_cpu_s = round(_process_cpu(process.pid), 1)
            finally:
                run.worker_exit_status = _stop(process)
        run.bench_process_cpu_s = round(time.process_time() - own_cpu, 1)

        run.jobs_done = states.get("done", 0)
        run.jobs_dead = states.get("dead", 0)
        run.jobs_left = sum(n for state, n in states.items() if state not in ("done", "dead"))
        run.delivery_attempts = _attempt_count(reader)
        reader.dispose()

        seen = fake.seen()
        run.http_calls = len(seen)
        run.calls_by_endpoint = dict(
            Counter(_endpoint(r.method, r.path) for r in seen).most_common()
        )
        run.fake_busy_s = {name: round(s, 2) for name, s in timed.busy.items()}
        if timed.arrivals:
            run.first_call_at_s = round(min(timed.arrivals) - t0, 2)
            run.last_call_at_s = round(max(timed.arrivals) - t0, 2)
        held = fake.members_of(LIST_ADDRESS)
        run.members_held = len(held)
        run.members_subscribed = sum(1 for m in held if m.subscribed)
        run.members_with_unsubscribe_url = sum(
            1 for m in held if str(m.vars.get("unsubscribe_url", "")).startswith(PUBLIC_URL)
        )
        log_text = log_path.read_text(errors="replace")
        run.sync_rounds = log_text.count("sync.round jobs=")
        run.worker_errors = [
            line for line in log_text.splitlines() if " ERROR " in line or "Traceback" in line
        ][:10]
        _print_run(run)
    return run


def _wait_drained(
    process: subprocess.Popen[bytes],
    reader: sa.Engine,
    *,
    t0: float,
    timeout: float,
    progress: bool,
) -> tuple[float | None, Counter[str]]:
    """Seconds from t0 until no sync job is pending or running (None on timeout)."""
    last_print = t0
    while True:
        states = _sync_job_states(reader)
        now = time.monotonic()
        left = sum(n for state, n in states.items() if state not in ("done", "dead"))
        if left == 0:
            return round(now - t0, 2), states
        if process.poll() is not None:
            print(f"   the worker exited early with {process.returncode}")
            return None, states
        if now - t0 > timeout:
            print(f"   not drained within {timeout:.0f} s; {left:,} sync jobs left")
            return None, states
        if progress and now - last_print >= 10:
            last_print = now
            print(
                f"   +{now - t0:6.1f} s: {states.get('done', 0):,} done, {left:,} left", flush=True
            )
        time.sleep(POLL_EVERY)


# --------------------------------------------------------------------------------------
# Report


def _print_run(run: Run) -> None:
    verdict = "within" if run.http_calls <= _target(run.count) else "OVER"
    print(
        f"   HTTP calls to the fake: {run.http_calls:,} "
        f"({verdict} the target of {_target(run.count):,})"
    )
    for endpoint, n in run.calls_by_endpoint.items():
        busy = run.fake_busy_s.get(endpoint, 0.0)
        print(f"     {n:>9,}  {endpoint:<30} fake busy {busy:7.2f} s")
    drain = f"{run.drain_s:.1f} s" if run.drain_s is not None else "NOT DRAINED"
    print(
        f"   drained in {drain} from the worker's start "
        f"(first call at +{run.first_call_at_s} s, last at +{run.last_call_at_s} s); "
        f"{run.sync_rounds} sync rounds"
    )
    print(
        f"   jobs: {run.jobs_done:,} done, {run.jobs_dead:,} dead, {run.jobs_left:,} left; "
        f"{run.delivery_attempts:,} delivery attempts"
    )
    print(
        f"   fake holds {run.members_held:,} members, {run.members_subscribed:,} subscribed, "
        f"{run.members_with_unsubscribe_url:,} with their unsubscribe URL"
    )
    print(
        f"   worker: peak RSS {run.worker_peak_rss_mib:.1f} MiB, CPU {run.worker_cpu_s:.1f} s, "
        f"exit status {run.worker_exit_status}; bench process (fake) CPU "
        f"{run.bench_process_cpu_s:.1f} s"
    )
    for line in run.worker_errors:
        print(f"   worker log: {line}")


def _target(count: int) -> int:
    return max(1, round(CALL_TARGET * count / 100_000))


def print_table(runs: list[Run]) -> None:
    header = (
        f"{'database':<11}{'confirmations':>14}{'HTTP calls':>12}{'target':>8}"
        f"{'drain s':>9}{'members':>9}{'peak RSS MiB':>14}{'worker CPU s':>14}"
    )
    print()
    print(header)
    print("-" * len(header))
    for run in runs:
        drain = f"{run.drain_s:.1f}" if run.drain_s is not None else "-"
        print(
            f"{run.database:<11}{run.count:>14,}{run.http_calls:>12,}{_target(run.count):>8,}"
            f"{drain:>9}{run.members_held:>9,}{run.worker_peak_rss_mib:>14.1f}"
            f"{run.worker_cpu_s:>14.1f}"
        )
    print("-" * len(header))
    print(
        f"This machine has {os.cpu_count()} CPU core(s), shared by the worker, the fake Mailgun "
        "(this process) and, for PostgreSQL, its backends."
    )


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _variant(args: argparse.Namespace, extra_env: dict[str, str]) -> str:
    """The key of one configuration in the results file (runs of others are kept)."""
    parts = [
        f"count={args.count}",
        f"fresh_opt_in={str(args.fresh_opt_in).lower()}",
        f"clear_suppressions={str(args.clear_suppressions).lower()}",
        *(f"{name}={value}" for name, value in sorted(extra_env.items())),
    ]
    return " ".join(parts)


def write_json(runs: list[Run], args: argparse.Namespace, extra_env: dict[str, str]) -> None:
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    variants: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        previous = json.loads(RESULTS_FILE.read_text())
        if previous.get("benchmark") == "sync_mailgun":
            variants = dict(previous.get("variants", {}))
    key = _variant(args, extra_env)
    entry = variants.setdefault(key, {"runs": {}})
    entry.update(
        {
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_commit": _git_commit(),
            "parameters": {
                "count": args.count,
                "fresh_opt_in": args.fresh_opt_in,
                "clear_suppressions": args.clear_suppressions,
                "call_target": _target(args.count),
                "worker": "newsletter worker, file mailer, default NEWSLETTER_SYNC_BATCH_SIZE",
                "worker_env_overrides": extra_env,
            },
        }
    )
    entry["runs"].update({run.database: {**asdict(run), "ok": run.ok} for run in runs})
    document = {
        "benchmark": "sync_mailgun",
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "variants": variants,
    }
    RESULTS_FILE.write_text(json.dumps(document, indent=2) + "\n")
    print(f"written to {RESULTS_FILE.relative_to(ROOT)} under {key!r}")


# --------------------------------------------------------------------------------------


def _names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(value: str) -> list[str]:
        names = [part.strip() for part in value.split(",") if part.strip()]
        for name in names:
            if name not in allowed:
                raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(allowed)}")
        return names

    return parse


def _env_pair(value: str) -> tuple[str, str]:
    name, sep, setting = value.partition("=")
    if not sep or not name.startswith("NEWSLETTER_"):
        raise argparse.ArgumentTypeError("expected NEWSLETTER_NAME=value")
    return name, setting


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument(
        "--databases",
        type=_names(DATABASES),
        nargs="+",
        default=[["sqlite"]],
        help="sqlite, postgresql or both (comma or space separated; default: sqlite)",
    )
    parser.add_argument(
        "--count", type=int, default=100_000, help="confirmed subscriptions (default 100000)"
    )
    parser.add_argument(
        "--fresh-opt-in",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="write the jobs with fresh_opt_in=true, as confirm() does for an address that "
        "left the list before (two suppression calls each); default: false, as confirm() "
        "does for a first opt-in, and as reconcile and import do",
    )
    parser.add_argument(
        "--clear-suppressions",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the mailgun backend's clear_suppressions setting (default: true, its default)",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds allowed to drain (default 1800)"
    )
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help=f"loopback database `bench`, emptied first (default {DEFAULT_POSTGRES_URL})",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print progress every 10 s",
    )
    parser.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="NEWSLETTER_NAME=VALUE",
        help="extra worker setting, for experiments (e.g. NEWSLETTER_SYNC_BATCH_SIZE=5000)",
    )
    args = parser.parse_args(argv)
    args.databases = list(dict.fromkeys(itertools.chain.from_iterable(args.databases)))
    if not 1 <= args.count <= 1_000_000:
        parser.error("--count must be between 1 and 1000000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extra_env = dict(args.env)
    print(
        f"sync_mailgun benchmark: {args.count:,} confirmations "
        f"(fresh_opt_in={str(args.fresh_opt_in).lower()}, "
        f"clear_suppressions={str(args.clear_suppressions).lower()}) on "
        f"{', '.join(args.databases)}; {os.cpu_count()} CPU core(s)"
    )
    runs = [run_database(args, database, extra_env) for database in args.databases]
    print_table(runs)
    write_json(runs, args, extra_env)
    return 0 if all(run.ok for run in runs) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
