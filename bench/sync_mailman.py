"""Syncing confirmed members to a real GNU Mailman 3 core: how close does this service come
to Mailman's own member-add rate?

One run starts a real Mailman 3.3.10 core with tests/mailman.py (its own virtualenv, REST
and SMTP on 127.0.0.1; its outgoing mail goes to an aiosmtpd sink in this process), makes
two new lists, and measures the same number of adds (`--mailman-members`, 500; 100 with
--quick) two ways:

    mailman     quiet adds straight to Mailman: `POST /3.1/members` with the pre_* flags
                and `send_welcome_message: false`, then the member's language (`PATCH
                /3.1/members/{id}/preferences`), one after the other from one client made
                like the worker's: Mailman's own rate for the state the service leaves
                there, the reference. (The service also sends each member's name, which
                Mailman takes at the add only for an address new to it: one call more.)
    service     confirmed subscriptions written to a new SQLite database as
                `subscriptions.confirm()` leaves them (the row, its standing unsubscribe
                token, a sync job with `fresh_opt_in`), drained by a `Worker` of this
                service (in this process, list `bluehats` on the other Mailman list,
                default settings but `sync_batch_size`): the time its rounds take, from
                the first claim to the last outcome recorded.

The two are interleaved in `--mailman-slices` (5; 2 with --quick) slices, A B B A ...: a
slice of direct adds, then one worker round of as many jobs, then the other way round.
Mailman's speed drifts as its database grows and with whatever else the machine runs;
interleaving gives both measurements the same conditions. Target: the service at 90 % of
Mailman's rate or better. It checks that every member reached its roster and that Mailman
mailed none of them (the suite fails otherwise). `--profile` profiles the worker's rounds
(wall clock) into bench/results/sync_mailman.prof and prints the top.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import math
import pstats
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _common
import httpx
import sqlalchemy as sa
from _common import LIST_SLUG, SECRET_KEY, Row
from sqlmodel import Session, func, select

from app import backends, db, lists, migrations, outbox, tokens
from app.config import FileMailerSettings, ListSettings, MailmanBackendSettings, Settings
from app.mailer import make_mailer
from app.models import JobKind, OutboxJob, Subscription, TokenPurpose, utcnow
from app.worker import Worker
from tests.conftest import start_smtp
from tests.mailman import (
    TIMINGS,
    MailmanCore,
    create_list,
    flush_outgoing_mail,
    rest_client,
    running_mailman,
)

PROFILE_FILE = _common.RESULTS_DIR / "sync_mailman.prof"
PROFILE_LINES = 30
PUBLIC_URL = "https://newsletter.example.org"
TARGET_RATIO = 0.9
WARMUP_ADDS = 20
QUIET = {
    "pre_verified": True,
    "pre_confirmed": True,
    "pre_approved": True,
    "send_welcome_message": False,
}
# The seeded subscribers' language, set on each member both ways.
MEMBER_LANGUAGE = "fr"
# A round that has not drained its slice after this is a failure, not a figure.
ROUND_TIMEOUT = 600.0


@dataclass
class Slice:
    members: int
    direct_s: float
    service_s: float

    @property
    def ratio(self) -> float:
        return self.direct_s / self.service_s


@dataclass
class Figures:
    members: int
    slices: list[Slice] = field(default_factory=list)
    seed_s: float = 0.0
    rounds: int = 0
    jobs_done: int = 0
    jobs_left: int = 0
    direct_roster: int = 0
    service_roster: int = 0
    worker_concurrency: int = 0
    sync_batch_size: int = 0

    @property
    def direct_s(self) -> float:
        return sum(s.direct_s for s in self.slices)

    @property
    def service_s(self) -> float:
        return sum(s.service_s for s in self.slices)


# --------------------------------------------------------------------------------------
# Mailman


def _client(core: MailmanCore) -> httpx.Client:
    # Made as the worker makes the client it gives its backends.
    client = backends.make_client(connect_timeout=5.0, timeout=30.0)
    client.auth = httpx.BasicAuth(core.admin_user, core.admin_password)
    return client


def _roster_size(core: MailmanCore, list_id: str) -> int:
    with rest_client(core) as client:
        response = client.get(f"/lists/{list_id}/roster/member", params={"count": 1, "page": 1})
    response.raise_for_status()
    return int(response.json()["total_size"])


def _direct_adds(client: httpx.Client, core: MailmanCore, list_id: str, numbers: range) -> float:
    url = f"{core.base_url}/members"
    started = time.perf_counter()
    for n in numbers:
        response = client.post(
            url,
            json={
                "list_id": list_id,
                "subscriber": f"direct-{n:06d}@example.org",
                "display_name": f"Member {n}",
                **QUIET,
            },
        )
        if response.status_code != 201:
            raise SystemExit(f"direct add {n}: HTTP {response.status_code} {response.text}")
        # The member's own language, as the service sets it (app/backends/mailman.py): the
        # same state at Mailman both ways. The name needs no call of its own here, the
        # address being new to Mailman.
        member_id = response.headers["location"].rstrip("/").rpartition("/")[2]
        response = client.patch(
            f"{core.base_url}/members/{member_id}/preferences",
            json={"preferred_language": MEMBER_LANGUAGE},
        )
        if response.status_code != 204:
            raise SystemExit(f"direct language {n}: HTTP {response.status_code} {response.text}")
    return time.perf_counter() - started


def warm_up(core: MailmanCore) -> None:
    """A few adds to a throwaway list: the REST worker's first requests are slower."""
    list_id = create_list(core)
    with _client(core) as client:
        for n in range(WARMUP_ADDS):
            body = {"list_id": list_id, "subscriber": f"warm-{n}@example.org", **QUIET}
            client.post(f"{core.base_url}/members", json=body).raise_for_status()


def _mails_to_members(core: MailmanCore) -> int:
    """Mails Mailman sent to anyone but the harness's probes (welcome, goodbye, confirm)."""
    with core.smtp.lock:
        return sum(
            1
            for envelope in core.smtp.envelopes
            if any(not rcpt.startswith("probe-") for rcpt in envelope.rcpt_tos)
        )


# --------------------------------------------------------------------------------------
# The service


def seed(engine: sa.Engine, settings: Settings, *, members: int) -> None:
    """Confirmed subscriptions as `subscriptions.confirm()` leaves them: the row, its
    unsubscribe token, and a sync job written by `outbox.enqueue_sync` itself."""
    key = settings.token_key()
    now = utcnow()
    with db.session_scope(engine) as session:
        lists.sync_from_settings(session, declared=settings.lists, now=now)
    with db.session_scope(engine) as session:
        list_id = lists.get(session, slug=LIST_SLUG).id
        assert list_id is not None
        for n in range(members):
            address = f"service-{n:06d}@example.org"
            row = Subscription(
                list_id=list_id,
                email=address,
                email_key=address,
                status="confirmed",
                locale=MEMBER_LANGUAGE,
                consent_version="2026-11",
                attributes={"name": f"Member {n}"},
                confirmed_at=now,
            )
            session.add(row)
            session.flush()
            assert row.id is not None
            tokens.issue(
                session,
                subscription=row,
                purpose=TokenPurpose.UNSUBSCRIBE,
                key=key,
                now=now,
                ttl=None,
            )
            outbox.enqueue_sync(
                session, subscription_id=row.id, list_id=list_id, now=now, fresh_opt_in=True
            )


def _sync_jobs_by_state(engine: sa.Engine) -> dict[str, int]:
    with Session(engine) as session:
        rows = session.exec(
            select(OutboxJob.state, func.count())
            .where(OutboxJob.kind == JobKind.SYNC)
            .group_by(OutboxJob.state)
        ).all()
    return {str(state): int(count) for state, count in rows}


def service_settings(
    core: MailmanCore, *, list_id: str, folder: Path, batch: int, concurrency: int | None
) -> Settings:
    overrides: dict[str, Any] = {"sync_batch_size": batch}
    if concurrency is not None:
        overrides["worker_concurrency"] = concurrency
    return Settings(
        database_url=f"sqlite:///{folder / 'newsletter.db'}",
        public_url=PUBLIC_URL,
        secret_key=SECRET_KEY,
        auto_migrate=False,
        run_worker=False,
        log_level="WARNING",
        mailer=FileMailerSettings(directory=folder / "mail"),
        lists=[
            ListSettings(
                slug=LIST_SLUG,
                name="Gazette BlueHats",
                backend=MailmanBackendSettings(
                    base_url=core.base_url,
                    username=core.admin_user,
                    password=core.admin_password,
                    list_id=list_id,
                ),
            )
        ],
        **overrides,
    )


def _round(worker: Worker, profiler: cProfile.Profile | None) -> tuple[int, float]:
    """One worker round (claim, plan, backend calls, outcomes): jobs handled, seconds."""
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    try:
        handled = worker.run_once()
    finally:
        if profiler:
            profiler.disable()
    return handled, time.perf_counter() - started


def measure(
    core: MailmanCore,
    *,
    members: int,
    slices: int,
    folder: Path,
    concurrency: int | None,
    profiler: cProfile.Profile | None,
) -> Figures:
    direct_list = create_list(core)
    service_list = create_list(core)
    batch = math.ceil(members / slices)
    settings = service_settings(
        core, list_id=service_list, folder=folder, batch=batch, concurrency=concurrency
    )
    migrations.upgrade(settings.database_url)
    engine = db.make_engine(settings.database_url)
    figures = Figures(
        members=members,
        worker_concurrency=settings.worker_concurrency,
        sync_batch_size=batch,
    )
    started = time.perf_counter()
    seed(engine, settings, members=members)
    figures.seed_s = round(time.perf_counter() - started, 3)
    worker = Worker(
        engine=engine, settings=settings, mailer=make_mailer(settings.mailer), name="bench"
    )
    try:
        with _client(core) as client:
            for index, start in enumerate(range(0, members, batch)):
                numbers = range(start, min(members, start + batch))
                direct_s = service_s = 0.0
                # A B B A: neither side always goes first.
                for side in ("direct", "service") if index % 2 == 0 else ("service", "direct"):
                    if side == "direct":
                        direct_s = _direct_adds(client, core, direct_list, numbers)
                    else:
                        handled, service_s = _round(worker, profiler)
                        figures.rounds += 1
                        if handled != len(numbers):
                            print(f"warning: round {index + 1} handled {handled} jobs")
                figure = Slice(members=len(numbers), direct_s=direct_s, service_s=service_s)
                figures.slices.append(figure)
        # Jobs a round could not finish (a retry) are done here, and counted as service time.
        deadline = time.perf_counter() + ROUND_TIMEOUT
        while (states := _sync_jobs_by_state(engine)).get("done", 0) < members:
            if time.perf_counter() > deadline or states.get("dead"):
                break
            handled, seconds = _round(worker, profiler)
            figures.rounds += 1
            figures.slices[-1].service_s += seconds
            if not handled:
                time.sleep(0.1)
    finally:
        worker.stop()
    states = _sync_jobs_by_state(engine)
    engine.dispose()
    figures.jobs_done = states.get("done", 0)
    figures.jobs_left = sum(states.values()) - figures.jobs_done
    figures.direct_roster = _roster_size(core, direct_list)
    figures.service_roster = _roster_size(core, service_list)
    return figures


# --------------------------------------------------------------------------------------
# The run


def run(options: argparse.Namespace) -> list[Row]:
    members, slices = options.mailman_members, options.mailman_slices
    if members < 1 or not 1 <= slices <= members:
        raise SystemExit("--mailman-members must be positive, --mailman-slices in 1..members")
    logging.basicConfig(level=logging.WARNING)
    print(f"\n== sync_mailman: {members} adds each way in {slices} slice(s)", flush=True)
    background = _common.warn_if_busy("the Mailman run")
    profiler = cProfile.Profile() if options.profile else None

    folder = Path(tempfile.mkdtemp(prefix="newsletter-bench-mailman-"))
    sink, controller = start_smtp()
    try:
        with running_mailman(folder / "mailman", sink) as core:
            with rest_client(core) as client:
                version = client.get("/system/versions").json()["mailman_version"]
            warm_up(core)
            figures = measure(
                core,
                members=members,
                slices=slices,
                folder=folder,
                concurrency=options.worker_concurrency,
                profiler=profiler,
            )
            flush_outgoing_mail(core)
            mails = _mails_to_members(core)
    finally:
        controller.stop()
        shutil.rmtree(folder, ignore_errors=True)

    if profiler:
        PROFILE_FILE.parent.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(PROFILE_FILE)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(PROFILE_LINES)

    mailman_rate = figures.members / figures.direct_s
    service_rate = figures.jobs_done / figures.service_s
    ratio = service_rate / mailman_rate
    per_slice = [round(s.ratio, 3) for s in figures.slices]
    # A neighbour's burst sinks one slice; the median shows the run without it.
    median = statistics.median(per_slice)
    ok = (
        figures.jobs_left == 0
        and figures.service_roster == members
        and figures.direct_roster == members
        and mails == 0
    )
    print(
        f"   {version}: mailman {mailman_rate:.1f} adds/s ({figures.direct_s:.2f} s), service "
        f"{service_rate:.1f} syncs/s ({figures.service_s:.2f} s in {figures.rounds} rounds of up "
        f"to {figures.sync_batch_size}); ratio {ratio:.1%}, per slice {per_slice}\n"
        f"   rosters {figures.direct_roster} + {figures.service_roster}, jobs left "
        f"{figures.jobs_left}, mails from Mailman to members {mails}",
        flush=True,
    )
    _common.write_results(
        "sync_mailman",
        {
            "background_busy_cores": background,
            "parameters": {
                "members": members,
                "slices": len(figures.slices),
                "sync_batch_size": figures.sync_batch_size,
                "worker_concurrency": figures.worker_concurrency,
                "mailman_version": version,
                "mailman": "tests/mailman.py: SQLite, one gunicorn REST worker, loopback",
                "database": "SQLite (a new file)",
                "harness": dict(TIMINGS),
            },
            "mailman_adds_per_s": round(mailman_rate, 1),
            "service_syncs_per_s": round(service_rate, 1),
            "ratio": round(ratio, 4),
            "ratio_per_slice": per_slice,
            "ratio_median_slice": round(median, 4),
            "figures": asdict(figures),
            "mails_from_mailman_to_members": mails,
            "ok": ok,
        },
    )
    if not ok:
        raise RuntimeError("members missing, jobs left undone or Mailman mailed members")
    return [
        Row(
            "sync Mailman",
            f"{version}, {members} members, SQLite",
            "service syncs/s",
            f"{service_rate:.1f}/s",
            reference=f"Mailman's own adds {mailman_rate:.1f}/s",
            ratio=f"{ratio:.0%} (median slice {median:.0%})",
            target=f">= {TARGET_RATIO:.0%}",
            met=ratio >= TARGET_RATIO,
            detail=asdict(figures),
        )
    ]


if __name__ == "__main__":
    import run as suite

    raise SystemExit(suite.main(only="sync_mailman"))
