"""Draining a burst of confirmations to Mailgun: how many HTTP calls, how long, how much memory?

For each database (a new SQLite file; the PostgreSQL database `bench` on loopback, emptied
first) it writes `--sync-count` (100,000; 10,000 with --quick) confirmed subscriptions as
`confirm()` leaves them: the subscription, its standing unsubscribe token and one sync job
(`fresh_opt_in` false, as the confirmation of a first opt-in leaves it; `--fresh-opt-in`
for re-subscriptions, which also clear the address's old suppressions: two calls each).
Then it starts a real `newsletter worker` process, configured by NEWSLETTER_* variables
only (the list `bluehats` with a `mailgun` backend whose base_url is the fake Mailgun of
tests/fake_mailgun.py, served by this process on 127.0.0.1; the file mailer; the default
NEWSLETTER_SYNC_BATCH_SIZE), and waits until every sync job is done.

Figures: HTTP calls the fake received, by endpoint (target: at most 105 per 100,000
confirmations); seconds from the worker's start to the last sync job done; members the
fake holds at the end (must be all, subscribed); the worker's peak RSS (VmHWM) and CPU.
It fails (exit 1 of the suite) only when members are missing or jobs are left undone.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _common
import sqlalchemy as sa
from _common import LIST_SLUG, SECRET_KEY, Row

from app import db, lists, migrations, outbox, tokens
from app.config import Settings
from app.models import JobKind, Subscription, TokenPurpose, utcnow
from tests.conftest import LiveServer
from tests.fake_mailgun import FakeMailgun

LIST_ADDRESS = "bluehats@mail.codegouv.fr"
PUBLIC_URL = "https://newsletter.example.org"
CALL_TARGET = 105  # for 100,000 confirmations: 100 bulk calls of 1,000, and a little slack
SEED_CHUNK = 5000
POLL_EVERY = 0.25
TIMEOUT = 1800.0


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


def _worker_env(
    *, url: str, base_url: str, workdir: Path, options: argparse.Namespace
) -> dict[str, str]:
    return _common.service_env(url, workdir, {
        "NEWSLETTER_PUBLIC_URL": PUBLIC_URL,
        "NEWSLETTER_LISTS": json.dumps(
            _list_settings(base_url, clear_suppressions=options.clear_suppressions)
        ),
        "NEWSLETTER_AUTO_MIGRATE": "false",
        # INFO: one `sync.round` line per round, counted below.
        "NEWSLETTER_LOG_LEVEL": "INFO",
        **options.extra_env,
    })  # fmt: skip


def run_database(options: argparse.Namespace, database: str) -> Run:
    count = options.sync_count
    with tempfile.TemporaryDirectory(prefix="newsletter-bench-sync-") as tmp:
        workdir = Path(tmp)
        url = _common.fresh_database(database, workdir, options, "newsletter.db")
        autovacuum = None
        if database == "postgresql":
            autovacuum = _common.postgres_setting(url, "autovacuum")
        run = Run(
            database=database,
            url=url,
            count=count,
            fresh_opt_in=options.fresh_opt_in,
            clear_suppressions=options.clear_suppressions,
            postgres_autovacuum=autovacuum,
        )
        print(f"\n== sync_mailgun: {database}, {count:,} confirmed subscriptions with their jobs")
        if autovacuum == "off":
            print(
                "   note: autovacuum is off on this server: the planner's statistics stay "
                "those of the empty tables (no ANALYZE is run here)"
            )
        started = time.monotonic()
        seed(url, count=count, fresh_opt_in=options.fresh_opt_in)
        run.seed_s = round(time.monotonic() - started, 1)
        print(f"   written in {run.seed_s:.1f} s", flush=True)

        fake = FakeMailgun()
        fake.create_list(LIST_ADDRESS)
        timed = Timed(fake.app())
        reader = _reader(url)
        own_cpu = time.process_time()
        with LiveServer(timed) as base_url:
            env = _worker_env(url=url, base_url=base_url, workdir=workdir, options=options)
            print(f"   fake Mailgun at {base_url}; starting `newsletter worker` ...", flush=True)
            t0 = time.monotonic()
            process, log_path = _common.start_process(
                ["worker"], env=env, workdir=workdir, log_name="worker.log"
            )
            try:
                run.drain_s, states = _wait_drained(process, reader, t0=t0, timeout=TIMEOUT)
                run.timed_out = run.drain_s is None
                run.worker_peak_rss_mib = round(_common.process_memory_mib(process.pid, "VmHWM"), 1)
                run.worker_cpu_s = round(_common.process_cpu(process.pid), 1)
            finally:
                _common.stop_process(process, label="worker", log_path=log_path)
                run.worker_exit_status = process.returncode
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
        if now - last_print >= 10:
            last_print = now
            print(
                f"   +{now - t0:6.1f} s: {states.get('done', 0):,} done, {left:,} left", flush=True
            )
        time.sleep(POLL_EVERY)


# --------------------------------------------------------------------------------------
# Report


def _print_run(run: Run) -> None:
    for endpoint, n in run.calls_by_endpoint.items():
        busy = run.fake_busy_s.get(endpoint, 0.0)
        print(f"     {n:>9,}  {endpoint:<30} fake busy {busy:7.2f} s")
    drain = f"{run.drain_s:.1f} s" if run.drain_s is not None else "NOT DRAINED"
    print(
        f"   {run.http_calls:,} HTTP calls; drained in {drain} from the worker's start "
        f"(first call at +{run.first_call_at_s} s, last at +{run.last_call_at_s} s); "
        f"{run.sync_rounds} sync rounds\n"
        f"   jobs: {run.jobs_done:,} done, {run.jobs_dead:,} dead, {run.jobs_left:,} left; "
        f"fake holds {run.members_held:,} members, {run.members_subscribed:,} subscribed, "
        f"{run.members_with_unsubscribe_url:,} with their unsubscribe URL\n"
        f"   worker: peak RSS {run.worker_peak_rss_mib:.1f} MiB, CPU {run.worker_cpu_s:.1f} s, "
        f"exit status {run.worker_exit_status}; fake (this process) CPU "
        f"{run.bench_process_cpu_s:.1f} s",
        flush=True,
    )
    for line in run.worker_errors:
        print(f"   worker log: {line}")


def _target(count: int) -> int:
    return max(1, round(CALL_TARGET * count / 100_000))


def _rows(run: Run) -> list[Row]:
    name = "SQLite" if run.database == "sqlite" else "PostgreSQL"
    setup = f"{name}, {run.count:,} confirmations"
    if run.fresh_opt_in:
        setup += ", fresh opt-in" + ("" if run.clear_suppressions else ", no suppression calls")
    drain = f"{run.drain_s:.1f} s" if run.drain_s is not None else "NOT DRAINED"
    rate = f"{run.count / run.drain_s:,.0f}/s" if run.drain_s else "-"
    return [
        Row(
            "sync Mailgun",
            setup,
            "HTTP calls",
            f"{run.http_calls:,} ({run.http_calls * 1000 / run.count:.2f} per 1,000)",
            target=f"<= {_target(run.count):,}",
            met=run.http_calls <= _target(run.count) and run.ok,
            detail=asdict(run),
        ),
        Row(
            "sync Mailgun",
            setup,
            "drain time / worker peak RSS",
            f"{drain} ({rate}) / {run.worker_peak_rss_mib:.0f} MB",
            reference=f"members at the fake: {run.members_held:,}",
            met=None if run.ok else False,
        ),
    ]


def run(options: argparse.Namespace) -> list[Row]:
    runs = [run_database(options, database) for database in options.databases]
    _common.write_results(
        "sync_mailgun",
        {
            "parameters": {
                "count": options.sync_count,
                "fresh_opt_in": options.fresh_opt_in,
                "clear_suppressions": options.clear_suppressions,
                "call_target": _target(options.sync_count),
                "worker_env_overrides": options.extra_env,
            },
            "runs": [{**asdict(item), "ok": item.ok} for item in runs],
        },
    )
    failed = [item.database for item in runs if not item.ok]
    if failed:
        raise RuntimeError(f"members missing or jobs left undone on {', '.join(failed)}")
    return [row for item in runs for row in _rows(item)]


if __name__ == "__main__":
    import run as suite

    raise SystemExit(suite.main(only="sync_mailgun"))
