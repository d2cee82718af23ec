"""Runs outbox jobs: in a thread of the API process by default, or alone (`newsletter worker`).

Each round claims a batch of due jobs in one short transaction and runs them outside any
transaction. Mails: the batch's rows are read in one short transaction, each mail is rendered
and sent (network sends `worker_concurrency` at a time in a pool, a local mailer's in the
worker's thread), and the outcomes are written together in one transaction. A worker that dies
between a send and that write leaves its jobs leased: they are sent again once the lease ends
(delivery is at least once).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, SQLModel

from app import (
    addresses,
    audit,
    backends,
    blocklist,
    db,
    heartbeat,
    logs,
    mails,
    outbox,
    privacy,
    retention,
    sync,
    tokens,
)
from app.backends.base import ListBackend, PermanentSyncError, SyncError
from app.config import Locale, Settings
from app.mailer import Mailer, MailError, OutgoingMail
from app.metrics import Metrics
from app.models import (
    JobKind,
    JobState,
    SubscriptionStatus,
    TokenPurpose,
    utcnow,
)

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

# Heartbeat rows of workers not seen for this long are deleted (a clean stop deletes its own).
HEARTBEAT_RETENTION = timedelta(days=1)
# Longest pause between rounds while the database is unreachable.
MAX_OUTAGE_PAUSE = 5.0
# How often a worker giving way to requests looks whether they have paused (seconds): as
# often as the busy window is long (app/main.py BUSY_WINDOW); each look takes the GIL.
GIVE_WAY_STEP = 0.05
# A round that could wait no longer for a pause in the requests takes this many jobs at
# most: it runs in their interpreter, and a full sync round (a thousand jobs) held every
# request in flight for a tenth of a second.
PRESSED_MAIL_BATCH = 5
PRESSED_SYNC_BATCH = 50


class JobSkipped(Exception):
    """The job has nothing left to do (the subscriber moved on); it counts as done."""


class _Stopping(Exception):
    """A long job (a reconciliation) breaks off for a stop: its job is given back."""


# A batch's rows are read once before its first mail and its outcomes written once after its
# last. A slow batch (an SMTP server taking its time) reads again before a mail when what it
# read is older than this many seconds, and writes what it has every so often, so a mail is
# checked against fresh data (a block-list entry, a confirmation made meanwhile) and a mail
# sent is on record long before its lease could end.
BATCH_REFRESH = 1.0

_subscription = SQLModel.metadata.tables["subscription"]
_list = SQLModel.metadata.tables["mailing_list"]
_token = SQLModel.metadata.tables["token"]
# Plain columns, prebuilt: a Core select costs a fraction of an ORM entity load.
_MAIL_TARGETS = (
    sa.select(
        _subscription.c.id,
        _subscription.c.email,
        _subscription.c.email_key,
        _subscription.c.status,
        _subscription.c.locale,
        _list.c.slug.label("list_slug"),
        _list.c.name.label("list_name"),
        _list.c.landing_url,
        _list.c.confirm_ttl_seconds,
    )
    .join_from(_subscription, _list, _subscription.c.list_id == _list.c.id)
    .where(_subscription.c.id.in_(sa.bindparam("ids", expanding=True)))
)
_MAIL_TOKENS = sa.select(
    _token.c.id, _token.c.purpose, _token.c.used_at, _token.c.expires_at
).where(_token.c.id.in_(sa.bindparam("ids", expanding=True)))


@dataclass(frozen=True, slots=True)
class _MailData:
    """The rows the mails of a batch are made from, by subscription and token id."""

    targets: dict[int, sa.Row[*tuple[Any, ...]]]
    tokens: dict[uuid.UUID, sa.Row[*tuple[Any, ...]]]
    blocked: set[str]
    read_at: float


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One mail job's outcome, waiting to be written with its batch."""

    job: outbox.ClaimedJob
    started_at: datetime
    finished_at: datetime
    response: str | None = None
    # Set when the attempt failed; the job is then retried or dead, as `retryable` says.
    error: str | None = None
    retryable: bool = True
    skipped: bool = False


@dataclass(slots=True)
class _Outcomes:
    """A mail round under way: its outcomes not yet written, the jobs not yet begun, and
    the leases it holds (renewed from half their term, see `Worker._keep_leases`)."""

    written_at: float
    renew_at: datetime
    waiting: deque[outbox.ClaimedJob]
    held: set[int]
    done: list[_Attempt] = field(default_factory=list)


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    def __init__(
        self,
        *,
        engine: Engine,
        settings: Settings,
        mailer: Mailer,
        name: str | None = None,
        now: Callable[[], datetime] = utcnow,
        list_backends: dict[str, ListBackend] | None = None,
        metrics: Metrics | None = None,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.mailer = mailer
        self.name = name or _worker_name()
        self.now = now
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(
            max_workers=settings.worker_concurrency, thread_name_prefix="outbox"
        )
        self._key = settings.token_key()
        self._client: httpx.Client | None = None
        # Adapters by list slug; made from the settings on first use unless given here.
        self._backends: dict[str, ListBackend] = dict(list_backends or {})
        # Attempts are counted in this process's registry (the API's, or `--metrics-port`).
        self.metrics = metrics or Metrics()
        # Mails sent whose outcomes the database, gone meanwhile, did not take: written
        # first when it answers again, before their leases end and another round sends them.
        self._unwritten: list[_Attempt] = []
        self.started_at = now()
        # Written at most this often, after a round or a job: a heartbeat means progress.
        self._beat_every = settings.worker_heartbeat_timeout.total_seconds() / 4
        self._last_beat: datetime | None = None
        self._beat_lock = threading.Lock()
        # Inside the API's process: true while it is busy with requests; they go first (the
        # worker shares their interpreter) for up to `worker_give_way` a round.
        self._busy = busy if settings.worker_give_way > 0 else None

    # Lifecycle -------------------------------------------------------------------------

    def wake(self) -> None:
        """Look for work now rather than at the next poll (called after an outbox commit)."""
        self._wake.set()

    def start(self) -> None:
        # A first heartbeat before the thread runs: readiness is true from the first request.
        try:
            self.beat()
        except OperationalError as e:
            log.warning("worker.heartbeat_failed error=%s", type(e.orig).__name__)
        self._thread = threading.Thread(target=self.run, name="outbox-worker", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the loop to end after the jobs in hand (safe from a signal handler)."""
        self._stop.set()
        self._wake.set()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the jobs in hand, give back the ones not started, and return."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._client is not None:
            self._client.close()
        try:
            # Sent while the database was away: a last try, or they go again at lease end.
            self._record(self._unwritten)
            self._unwritten = []
        except OperationalError:
            log.warning(
                "worker.outcomes_not_written name=%s jobs=%d", self.name, len(self._unwritten)
            )
        try:
            with db.session_scope(self.engine) as session:
                heartbeat.forget(session, worker_id=self.name)
        except OperationalError:
            # The row goes stale and is pruned later: nothing to keep the stop waiting for.
            log.warning("worker.heartbeat_not_removed name=%s", self.name)

    def beat(self, *, force: bool = True) -> None:
        """Record this worker as alive (at most every `worker_heartbeat_timeout / 4`)."""
        now = self.now()
        with self._beat_lock:
            last = self._last_beat
        if not force and last is not None and (now - last).total_seconds() < self._beat_every:
            return
        with db.session_scope(self.engine) as session:
            heartbeat.beat(
                session,
                worker_id=self.name,
                host=socket.gethostname(),
                pid=os.getpid(),
                started_at=self.started_at,
                now=now,
            )
            if last is None:
                heartbeat.prune(session, before=now - HEARTBEAT_RETENTION)
        with self._beat_lock:
            self._last_beat = now

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self) -> None:
        mailer = self.settings.mailer
        # Where the mails and the syncs go, which an external worker's log said nowhere.
        log.info(
            "worker.started name=%s mailer=%s lists=%s",
            self.name,
            f"smtp:{mailer.host}:{mailer.port}" if mailer.kind == "smtp" else "file",
            ",".join(f"{item.slug}:{item.backend.kind}" for item in self.settings.lists),
        )
        if mailer.kind == "file" and not self.settings.database_url.startswith("sqlite:"):
            # NEWSLETTER_MAILER__KIND left out in a deployment: nobody got a mail, and the
            # links went to the log, without a word.
            log.warning(
                "worker.development_mailer directory=%s: mails are written there, not sent, "
                "and their links logged; set NEWSLETTER_MAILER__KIND=smtp (docs/production.md §6)",
                mailer.directory,
            )
        try:
            self.schedule_reconciliations()
        except Exception:
            log.exception("worker.schedule_failed")
        outage = 0
        while not self._stop.is_set():
            try:
                pressed = self._give_way()
                self.beat(force=False)
                done = self.run_once(pressed=pressed)
                if outage:
                    log.info("worker.database_back name=%s", self.name)
                outage = 0
            except OperationalError as e:
                # The database is away (restart, failover): no traceback every second; try
                # again, less often, until it answers. Leased jobs come back at lease end.
                if outage == 0:
                    log.warning(
                        "worker.database_unavailable name=%s error=%s %s",
                        self.name,
                        type(e.orig).__name__,
                        db.failure(self.engine, e),
                    )
                outage += 1
                self._wake.wait(
                    min(MAX_OUTAGE_PAUSE, self.settings.worker_poll_interval * 2 ** min(outage, 8))
                )
                self._wake.clear()
                continue
            except Exception:
                log.exception("worker.round_failed name=%s", self.name)
                done = 0
            if done == 0:
                self._wake.wait(self.settings.worker_poll_interval)
                self._wake.clear()
        log.info("worker.stopped name=%s", self.name)

    def _give_way(self) -> bool:
        """Wait for a pause in the requests of this process, at most `worker_give_way`;
        true when the wait ran out with requests still coming (the round is then small)."""
        busy = self._busy
        if busy is None or not busy():
            return False
        deadline = time.monotonic() + self.settings.worker_give_way
        while busy() and not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            self._stop.wait(min(GIVE_WAY_STEP, left))
        return False

    # One round ---------------------------------------------------------------------------

    def run_once(self, *, pressed: bool = False) -> int:
        """Claim and run one batch of due jobs of each kind; returns how many were handled.
        `pressed`: requests are waiting for this process, so the batches are small."""
        mail_batch = self.settings.worker_batch_size
        sync_batch = self.settings.sync_batch_size
        if pressed:
            mail_batch = min(mail_batch, PRESSED_MAIL_BATCH)
            sync_batch = min(sync_batch, PRESSED_SYNC_BATCH)
        if self._unwritten:
            self._record(self._unwritten)
            self._unwritten = []
        return (
            self._mail_round(mail_batch)
            + self._sync_round(sync_batch)
            + self._reconcile_round()
            + self._retention_round()
        )

    def _claim(self, kind: JobKind, limit: int) -> list[outbox.ClaimedJob]:
        with db.session_scope(self.engine) as session:
            return outbox.claim(
                session,
                worker=self.name,
                now=self.now(),
                lease=self.settings.job_lease,
                limit=limit,
                kinds=[kind],
            )

    def _release(self, job_ids: list[int]) -> None:
        if job_ids:
            with db.session_scope(self.engine) as session:
                outbox.release(session, job_ids=job_ids, worker=self.name, now=self.now())
            log.info("worker.released count=%d", len(job_ids))

    def _mail_round(self, limit: int) -> int:
        """Send one batch of mails; returns how many were handled (not given back).

        The batch's rows are read in a few statements before its first mail, and its
        outcomes written in one transaction after its last (see `BATCH_REFRESH` for slow
        batches). A stop lets the mails in flight finish and gives back the ones not begun.
        """
        claimed = self._claim(JobKind.MAIL, limit)
        if not claimed:
            return 0
        waiting = deque(claimed)
        batch = _Outcomes(
            written_at=time.monotonic(),
            renew_at=self._next_renewal(self.now()),
            waiting=waiting,
            held={job.id for job in claimed},
        )
        # Sends that wait on a server overlap in the pool; a local mailer's gain nothing from
        # a thread hop, nor do one-at-a-time sends.
        concurrency = self.settings.worker_concurrency if self.mailer.waits_on_network else 1
        in_flight: set[Future[_Attempt]] = set()
        data: _MailData | None = None
        # An SMTP connection serves several mails of the batch.
        with self.mailer.batch(), self._kept_when_the_database_goes(batch):
            try:
                while waiting and not self._stop.is_set():
                    if data is None or time.monotonic() - data.read_at > BATCH_REFRESH:
                        data = self._read_mail_data(waiting)
                    job = waiting.popleft()
                    started_at = self.now()
                    mail = self._prepare_mail(job, data, started_at=started_at)
                    if isinstance(mail, _Attempt):
                        batch.done.append(mail)
                    elif concurrency == 1:
                        batch.done.append(self._deliver(job, mail, started_at=started_at))
                    else:
                        sending = self._pool.submit(self._deliver, job, mail, started_at=started_at)
                        in_flight.add(sending)
                        in_flight = self._collect(in_flight, batch, keep=concurrency - 1)
                    self._write_if_due(batch)
            finally:
                # Even when the round fails (the database went away), no send is left
                # running behind it; outcomes not written wait in `_unwritten`.
                self._collect(in_flight, batch, keep=0)
            # On record before the batch's connections say goodbye, however slowly.
            self._write(batch)
        not_started = [job.id for job in waiting]
        self._release(not_started)
        return len(claimed) - len(not_started)

    # Sync jobs ------------------------------------------------------------------------------

    def backend_for(self, slug: str) -> ListBackend | None:
        """The adapter of a list's backend, made once per worker (one shared HTTP client)."""
        if slug not in self._backends:
            declared = self.settings.list_settings(slug)
            if declared is None:
                return None
            if self._client is None:
                self._client = backends.make_client(
                    connect_timeout=self.settings.backend_connect_timeout,
                    timeout=self.settings.backend_timeout,
                )
            self._backends[slug] = backends.make_backend(declared.backend, self._client)
        return self._backends[slug]

    def _sync_round(self, limit: int) -> int:
        claimed = self._claim(JobKind.SYNC, limit)
        if not claimed:
            return 0
        started_at = self.now()
        with db.session_scope(self.engine) as session:
            planned = sync.plan(session, claimed, settings=self.settings, key=self._key)
        # A second job about an address already in the round waits for the next (given
        # back below, as it has no result); one behind an older job outside the round waits
        # until that job is due again (postponed below).
        planned, later = sync.in_turn(planned)
        postponed = {
            item.job.id: item.waits_until for item in later if item.waits_until is not None
        }
        # The pool is idle here (the mail round has finished): it carries the calls of
        # backends without bulk calls, `worker_concurrency` at a time.
        results = sync.execute(
            planned,
            backend_for=self.backend_for,
            should_stop=self._keeping_leases(claimed),
            pool=self._pool,
        )
        with db.session_scope(self.engine) as session:
            now = self.now()
            done = [
                outbox.Finished(job, started_at, now, result.response)
                for job in claimed
                if (result := results.get(job.id)) is not None and result.error is None
            ]
            # One statement per table for the whole round: the write lock (one writer on
            # SQLite) is held for a moment, not for a statement per job.
            outbox.finish_many(session, finished=done, worker=self.name)
            if done:
                self.metrics.attempt(JobKind.SYNC, "success", len(done))
                finished_ids = {finished.job.id for finished in done}
                rested = sync.supersede_dead(
                    session,
                    done=[item for item in planned if item.job.id in finished_ids],
                    worker=self.name,
                    now=now,
                )
                if rested:
                    log.info("sync.superseded count=%d: dead jobs whose work is done", rested)
            for finished in done:
                if finished.job.payload.get("action") == sync.Action.REMOVE:
                    # An erased address leaves the queue once the backend has it gone.
                    privacy.scrub_after_removal(session, job_id=finished.job.id, key=self._key)
            # Said once per error and outcome, not per job: a refused key fails a whole
            # bulk call's thousand jobs with one answer.
            failures: Counter[tuple[JobState, str]] = Counter()
            for job in claimed:
                result = results.get(job.id)
                if result is None or result.error is None:
                    continue
                error = result.error
                state = self._record_failure(
                    session,
                    job,
                    error=str(error),
                    retryable=error.retryable,
                    started_at=started_at,
                    response=error.response,
                    retry_after=error.retry_after,
                    now=now,
                )
                failures[(state, str(error))] += 1
            sync.record_cleared(session, planned=planned, results=results, now=now)
            outbox.postpone(session, until=postponed, worker=self.name, now=now)
        # As a mail's failure (`job.failed`): the reason in the log, at WARNING, not only
        # in `newsletter jobs failed`.
        for (state, message), count in failures.items():
            log.warning(
                "sync.failed jobs=%d state=%s error=%s",
                count,
                state,
                # A backend's refusal may quote the address.
                logs.mask_addresses(message),
            )
        failed = sum(1 for result in results.values() if result.error is not None)
        log.info(
            "sync.round jobs=%d done=%d failed=%d waiting=%d",
            len(claimed),
            len(results) - failed,
            failed,
            len(postponed),
        )
        self._release(
            [job.id for job in claimed if job.id not in results and job.id not in postponed]
        )
        return len(results)

    def _keeping_leases(self, jobs: list[outbox.ClaimedJob]) -> Callable[[], bool]:
        """A sync round's `should_stop`, asked before each call (in the pool's threads too),
        that also renews the round's leases from half their term (a round of calls one at a
        time to a slow backend outlasted them, and another worker made the same calls) and
        keeps the heartbeat fresh."""
        ids = [job.id for job in jobs]
        lock = threading.Lock()
        renew_at = self._next_renewal(self.now())

        def should_stop() -> bool:
            nonlocal renew_at
            with lock:
                now = self.now()
                if now >= renew_at:
                    self._renew(ids, now)
                    renew_at = self._next_renewal(now)
                # Alive to readiness through a long round, as through a long reconciliation
                # (one thread at a time: each would write the same row).
                self.beat(force=False)
            return self.stopping

        return should_stop

    # Reconciliation --------------------------------------------------------------------------

    def schedule_reconciliations(self) -> None:
        self.schedule_retention()
        interval = self.settings.reconcile_interval
        if interval is None:
            return
        with db.session_scope(self.engine) as session:
            for declared in self.settings.lists:
                if declared.backend.kind == "none" and declared.slug not in self._backends:
                    continue  # no members anywhere to compare with
                outbox.schedule_reconcile(
                    session, list_slug=declared.slug, now=self.now(), delay=interval
                )

    def _reconcile_round(self) -> int:
        claimed = self._claim(JobKind.RECONCILE, 1)
        for job in claimed:
            started_at = self.now()
            slug = job.payload["list"]
            backend = self.backend_for(slug)
            try:
                if backend is None:
                    raise PermanentSyncError(f"list {slug!r} is no longer declared")
                not_delivered: dict[str, str] = {}
                remote = sync.read_backend(
                    backend, progress=self._between_pages(job), not_delivered=not_delivered
                )
            except _Stopping:
                self._release([job.id])
                log.info("reconcile.interrupted list=%s reason=stopping", slug)
                return 0
            except SyncError as e:
                with db.session_scope(self.engine) as session:
                    state = self._record_failure(
                        session,
                        job,
                        error=str(e),
                        retryable=e.retryable,
                        started_at=started_at,
                        response=e.response,
                        retry_after=e.retry_after,
                    )
                    interval = self.settings.reconcile_interval
                    if state == JobState.DEAD and backend is not None and interval is not None:
                        # A run that failed for good (a page the backend garbled, a day of
                        # outage) shows in the failed jobs; the schedule goes on.
                        outbox.schedule_reconcile(
                            session, list_slug=slug, now=self.now(), delay=interval
                        )
                continue
            with db.session_scope(self.engine) as session:
                report = sync.compare(
                    session,
                    list_slug=slug,
                    remote=remote,
                    keeps_unsubscribed=backend.keeps_unsubscribed,
                    read_since=started_at,
                    not_delivered=not_delivered,
                )
                if not report.in_sync:
                    sync.apply(session, report=report, key=self._key, now=self.now())
                rested = sync.settle_dead(
                    session, report=report, remote=remote, worker=self.name, now=self.now()
                )
                self.metrics.attempt(JobKind.RECONCILE, "success")
                outbox.finish(
                    session,
                    job=job,
                    worker=self.name,
                    started_at=started_at,
                    now=self.now(),
                    response=(
                        f"missing {len(report.missing)}, extra {len(report.extra)}, "
                        f"unsubscribed there {len(report.unsubscribed_there)}, "
                        f"absent there {len(report.absent_there)}, "
                        f"invalid {len(report.invalid)}, "
                        f"delivery disabled there {len(report.delivery_disabled)}, "
                        f"dead jobs put to rest {rested}"
                    ),
                )
                if self.settings.reconcile_interval is not None:
                    outbox.schedule_reconcile(
                        session,
                        list_slug=slug,
                        now=self.now(),
                        delay=self.settings.reconcile_interval,
                    )
            log.info(
                "reconcile.done list=%s missing=%d extra=%d unsubscribed_there=%d "
                "absent_there=%d invalid=%d delivery_disabled=%d superseded=%d",
                slug,
                len(report.missing),
                len(report.extra),
                len(report.unsubscribed_there),
                len(report.absent_there),
                len(report.invalid),
                len(report.delivery_disabled),
                rested,
            )
            if report.delivery_disabled:
                # Subscribed there and here, mailed nothing (bounces, mostly): left as they
                # are, the backend may enable them again; named masked, as every log does.
                named = [
                    f"{addresses.mask(address)} ({why})"
                    for address, why in list(report.delivery_disabled.items())[:20]
                ]
                more = len(report.delivery_disabled) - len(named)
                log.warning(
                    "reconcile.delivery_disabled list=%s delivery_disabled=%d members=%s%s: "
                    "members at the backend that it mails nothing; `newsletter reconcile "
                    "--list %s` names them",
                    slug,
                    len(report.delivery_disabled),
                    ", ".join(named),
                    f" and {more} more" if more else "",
                    slug,
                )
            if report.absent_there or report.invalid:
                # Left as they are (a member gone from Mailman may have left through its own
                # link): only an operator can settle them, and only this line tells them.
                log.warning(
                    "reconcile.to_check list=%s absent_there=%d invalid=%d: left as they "
                    "are; `newsletter reconcile --list %s` names them",
                    slug,
                    len(report.absent_there),
                    len(report.invalid),
                    slug,
                )
        return len(claimed)

    def _between_pages(self, job: outbox.ClaimedJob) -> Callable[[int], None]:
        """Called after each page a reconciliation reads at the backend (a large list is
        hundreds of pages, minutes): a stop breaks it off, the heartbeat is kept fresh, the
        mails due go out meanwhile (a confirmation would wait for the whole list), and its
        lease is kept."""
        renew_at = self._next_renewal(self.now())
        mailed_at = time.monotonic()

        def between(_members: int) -> None:
            nonlocal renew_at, mailed_at
            if self._stop.is_set():
                raise _Stopping()
            # Alive to readiness and `newsletter_workers_alive` through minutes of reading:
            # the rounds' heartbeats wait for the reconciliation's end.
            self.beat(force=False)
            if time.monotonic() - mailed_at > BATCH_REFRESH:
                self._mail_round(self.settings.worker_batch_size)
                mailed_at = time.monotonic()
            now = self.now()
            if now >= renew_at:
                self._renew([job.id], now)
                renew_at = self._next_renewal(now)

        return between

    # Retention ------------------------------------------------------------------------------

    def schedule_retention(self) -> None:
        """The first run one interval after start; each run schedules the next."""
        interval = self.settings.retention_interval
        if interval is None:
            return
        with db.session_scope(self.engine) as session:
            outbox.schedule_retention(session, now=self.now(), delay=interval)

    def _retention_round(self) -> int:
        interval = self.settings.retention_interval
        if interval is None:
            # Off: no job is scheduled, and the round costs no claim (one write on SQLite).
            return 0
        claimed = self._claim(JobKind.RETENTION, 1)
        for job in claimed:
            started_at = self.now()
            try:
                self._run_retention(job, started_at=started_at)
            except Exception as e:
                # A database error, or a bug: the job is retried with backoff, and shows in
                # the failed jobs (GET /v1/admin/jobs) once dead.
                log.exception("retention.failed id=%s", job.id)
                with db.session_scope(self.engine) as session:
                    state = self._record_failure(
                        session,
                        job,
                        error=f"retention failed: {type(e).__name__}",
                        retryable=True,
                        started_at=started_at,
                    )
                    if state == JobState.DEAD:
                        # Out of attempts: the schedule goes on (only a run schedules the
                        # next), so one bad night does not stop retention until a restart.
                        outbox.schedule_retention(session, now=self.now(), delay=interval)
        return len(claimed)

    def _run_retention(self, job: outbox.ClaimedJob, *, started_at: datetime) -> None:
        with db.session_scope(self.engine) as session:
            report = retention.run(
                session,
                policy=retention.Policy.from_settings(self.settings),
                key=self._key,
                now=started_at,
            )
            # Operators read each run in the audit log (and the job's response).
            audit.record(
                session,
                actor=retention.ACTOR,
                action="retention.run",
                target=None,
                outcome="ok",
                now=started_at,
                detail=report.as_dict(),
            )
            outbox.finish(
                session,
                job=job,
                worker=self.name,
                started_at=started_at,
                now=self.now(),
                response=report.summary(),
            )
            if self.settings.retention_interval is not None:
                outbox.schedule_retention(
                    session, now=self.now(), delay=self.settings.retention_interval
                )
        retention.log_done(report)

    def _record_failure(
        self,
        session: Session,
        job: outbox.ClaimedJob,
        *,
        error: str,
        retryable: bool,
        started_at: datetime,
        response: str | None = None,
        retry_after: float | None = None,
        now: datetime | None = None,
    ) -> JobState:
        """`outbox.fail` with this worker's retry policy (attempts, backoff).

        A batch passes one `now`, so its jobs come due again together (one bulk call).
        """
        s = self.settings
        state = outbox.fail(
            session,
            job=job,
            worker=self.name,
            error=error,
            retryable=retryable,
            started_at=started_at,
            now=now or self.now(),
            max_attempts=s.job_max_attempts,
            base_delay=s.retry_base_delay,
            max_delay=s.retry_max_delay,
            response=response,
            retry_after=(
                outbox.retry_after_delay(retry_after, max_delay=s.retry_max_delay)
                if retry_after
                else None
            ),
        )
        self.metrics.attempt(job.kind, "dead" if state == JobState.DEAD else "retry")
        return state

    # Mail jobs ----------------------------------------------------------------------------

    def _read_mail_data(self, jobs: Iterable[outbox.ClaimedJob]) -> _MailData:
        """What the mails of these jobs need, in one short transaction of four reads."""
        subscription_ids: set[int] = set()
        token_ids: set[uuid.UUID] = set()
        for job in jobs:
            subscription_id = job.payload.get("subscription_id")
            if isinstance(subscription_id, int):
                subscription_ids.add(subscription_id)
            try:
                token_id = _token_id(job)
            except ValueError:
                continue  # the job's own rendering says so (job.crashed)
            if token_id is not None:
                token_ids.add(token_id)
        with db.session_scope(self.engine) as session:
            connection = session.connection()
            targets = {
                row.id: row
                for row in connection.execute(_MAIL_TARGETS, {"ids": list(subscription_ids)})
            }
            found = {
                row.id: row for row in connection.execute(_MAIL_TOKENS, {"ids": list(token_ids)})
            }
            blocked = blocklist.blocked_among(
                session, email_keys=(row.email_key for row in targets.values())
            )
        return _MailData(targets=targets, tokens=found, blocked=blocked, read_at=time.monotonic())

    def _prepare_mail(
        self, job: outbox.ClaimedJob, data: _MailData, *, started_at: datetime
    ) -> OutgoingMail | _Attempt:
        """The job's mail, or its outcome when there is nothing to send."""
        try:
            return self._render_mail(job, data, now=started_at)
        except JobSkipped as e:
            return _Attempt(job, started_at, self.now(), response=f"skipped: {e}", skipped=True)
        except Exception as e:
            return self._crashed(job, e, started_at=started_at)

    def _deliver(
        self, job: outbox.ClaimedJob, mail: OutgoingMail, *, started_at: datetime
    ) -> _Attempt:
        try:
            response = self.mailer.send(mail)
        except MailError as e:
            return _Attempt(job, started_at, self.now(), error=str(e), retryable=e.retryable)
        except Exception as e:
            return self._crashed(job, e, started_at=started_at)
        return _Attempt(job, started_at, self.now(), response=response)

    def _crashed(self, job: outbox.ClaimedJob, e: Exception, *, started_at: datetime) -> _Attempt:
        # A bug, not a delivery failure: keep the job (retry later) and say so loudly.
        log.exception("job.crashed id=%s kind=%s", job.id, job.kind, exc_info=e)
        return _Attempt(job, started_at, self.now(), error=f"internal error: {type(e).__name__}")

    def _collect(
        self, in_flight: set[Future[_Attempt]], batch: _Outcomes, *, keep: int
    ) -> set[Future[_Attempt]]:
        """Wait until at most `keep` sends are in flight, writing outcomes as they are due."""
        while len(in_flight) > keep:
            done, pending = wait(in_flight, timeout=BATCH_REFRESH, return_when=FIRST_COMPLETED)
            in_flight = pending
            batch.done.extend(future.result() for future in done)
            self._write_if_due(batch)
        return in_flight

    def _write_if_due(self, batch: _Outcomes) -> None:
        self._keep_leases(batch)
        if batch.done and time.monotonic() - batch.written_at > BATCH_REFRESH:
            self._write(batch)

    def _next_renewal(self, now: datetime) -> datetime:
        """A long job's leases are renewed from half their term."""
        return now + self.settings.job_lease / 2

    def _renew(self, job_ids: Iterable[int], now: datetime) -> set[int]:
        """Extend this worker's leases on these jobs; the ids it still holds."""
        with db.session_scope(self.engine) as session:
            return outbox.renew(
                session, job_ids=job_ids, worker=self.name, now=now, lease=self.settings.job_lease
            )

    def _keep_leases(self, batch: _Outcomes) -> None:
        """A batch still under way at half its lease (a slow server) extends the leases of
        its jobs not yet written, those in flight included: at lease end another worker
        would take them and send them again. A job not begun that this worker no longer
        holds (it stalled past the lease) is dropped: another worker has it."""
        now = self.now()
        if now < batch.renew_at:
            return
        batch.held = self._renew(batch.held, now)
        batch.renew_at = self._next_renewal(now)
        lost = [job for job in batch.waiting if job.id not in batch.held]
        if lost:
            log.warning(
                "worker.leases_lost count=%d ids=%s", len(lost), ",".join(str(j.id) for j in lost)
            )
            for job in lost:
                batch.waiting.remove(job)

    @contextlib.contextmanager
    def _kept_when_the_database_goes(self, batch: _Outcomes) -> Iterator[None]:
        """The database went away during a round (writing its outcomes, renewing its
        leases): the outcomes gathered are kept for `run_once` to write when it is back."""
        try:
            yield
        except OperationalError:
            self._unwritten.extend(batch.done)
            batch.done = []
            raise

    def _write(self, batch: _Outcomes) -> None:
        """Record the outcomes gathered so far, all in one transaction."""
        self._record(batch.done)
        batch.done = []
        batch.written_at = time.monotonic()

    def _record(self, done: list[_Attempt]) -> None:
        """Write these outcomes in one transaction; raises with nothing written."""
        if not done:
            return
        failed = [attempt for attempt in done if attempt.error is not None]
        states: list[JobState] = []
        with db.session_scope(self.engine) as session:
            outbox.finish_many(
                session,
                finished=[
                    outbox.Finished(
                        job=attempt.job,
                        started_at=attempt.started_at,
                        finished_at=attempt.finished_at,
                        response=attempt.response,
                    )
                    for attempt in done
                    if attempt.error is None
                ],
                worker=self.name,
            )
            for attempt in failed:
                assert attempt.error is not None
                states.append(
                    self._record_failure(
                        session,
                        attempt.job,
                        error=attempt.error,
                        retryable=attempt.retryable,
                        started_at=attempt.started_at,
                        now=attempt.finished_at,
                    )
                )
        for attempt in done:
            job = attempt.job
            if attempt.error is None:
                self.metrics.attempt(job.kind, "skipped" if attempt.skipped else "success")
                log.info("job.done id=%s kind=%s attempt=%d", job.id, job.kind, job.attempt)
        for attempt, state in zip(failed, states, strict=True):
            job = attempt.job
            log.warning(
                "job.failed id=%s kind=%s attempt=%d state=%s error=%s",
                job.id,
                job.kind,
                job.attempt,
                state,
                # An SMTP refusal quotes the recipient.
                logs.mask_addresses(attempt.error or ""),
            )
        self.beat(force=False)

    def _render_mail(
        self, job: outbox.ClaimedJob, data: _MailData, *, now: datetime
    ) -> OutgoingMail:
        if job.kind != JobKind.MAIL:
            raise ValueError(f"unknown job kind {job.kind!r}")
        kind = mails.MailKind(job.payload["mail"])
        target = data.targets.get(job.payload["subscription_id"])
        if target is None:
            raise JobSkipped("subscription no longer exists")
        if target.email_key in data.blocked:
            # Blocked after the mail was queued (or an invitation raced the block).
            raise JobSkipped("address is on the block-list")
        link = None
        unsubscribe_link = None
        token_id = _token_id(job)
        token = data.tokens.get(token_id) if token_id is not None else None
        if kind == mails.MailKind.CONFIRM:
            if target.status != SubscriptionStatus.PENDING:
                raise JobSkipped(f"subscription is {target.status}")
            if token is None or token.used_at is not None:
                raise JobSkipped("confirmation link no longer valid")
            if token.expires_at is not None and token.expires_at <= now:
                raise JobSkipped("confirmation link expired before it could be sent")
            link = self.settings.public_link(
                f"/v1/confirm/{tokens.secret_for_id(token.id, key=self._key)}"
            )
        elif kind in (mails.MailKind.ALREADY_SUBSCRIBED, mails.MailKind.UNSUBSCRIBE):
            if target.status != SubscriptionStatus.CONFIRMED:
                raise JobSkipped(f"subscription is {target.status}")
            if token is None or token.purpose != TokenPurpose.UNSUBSCRIBE:
                raise JobSkipped("no unsubscribe link")
            link = self.settings.public_link(
                f"/v1/unsubscribe/{tokens.secret_for_id(token.id, key=self._key)}"
            )
            unsubscribe_link = link
        else:
            link = target.landing_url
        locale = Locale(target.locale)
        declared = self.settings.list_settings(target.list_slug)
        return mails.compose(
            kind,
            locale=locale,
            list_name=target.list_name,
            to=target.email,
            mail_from=self.settings.mail_from,
            message_key=f"{job.id}.{job.created_at.strftime('%Y%m%d%H%M%S')}.newsletter",
            link=link,
            confirm_ttl=timedelta(seconds=target.confirm_ttl_seconds),
            unsubscribe_link=unsubscribe_link,
            # The list's own wording, which its pages show too.
            strings=declared.strings.get(locale) if declared else None,
        )


def _token_id(job: outbox.ClaimedJob) -> uuid.UUID | None:
    token_id = job.payload.get("token_id")
    return uuid.UUID(token_id) if token_id else None
