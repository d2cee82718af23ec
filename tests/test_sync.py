"""Sync jobs end to end through the worker, against an in-memory backend that follows the
ListBackend contract (the HTTP adapters have their own tests against servers)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from app import addresses, blocklist, consent, db, heartbeat, operators, outbox, subscriptions, sync
from app.backends.base import (
    Member,
    MembersPage,
    PermanentSyncError,
    RemoteMember,
    RetryableSyncError,
)
from app.config import Settings
from app.main import create_app
from app.models import (
    BlockKind,
    ConsentEvent,
    DeliveryAttempt,
    JobKind,
    JobState,
    OutboxJob,
    Subscription,
    utcnow,
)
from app.worker import Worker
from tests.conftest import SmtpSink, link_in, make_settings


def _import_members(
    engine: sa.Engine,
    settings: Settings,
    remote: dict[str, tuple[str, bool]],
    *,
    backend_kind: str = "mailgun",
    now: datetime | None = None,
) -> sync.ImportReport:
    """`sync.import_members` into the list `bluehats`, in a transaction of its own."""
    with db.session_scope(engine) as session:
        return sync.import_members(
            session,
            list_slug="bluehats",
            remote=remote,
            backend_kind=backend_kind,
            key=settings.token_key(),
            now=now or utcnow(),
        )


@dataclass
class MemoryBackend:
    """A list held in memory; records every call; can be told to fail."""

    max_batch: int = 1000
    keeps_unsubscribed: bool = True
    held: dict[str, tuple[str, bool, dict[str, str]]] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    fail_next: list[Exception] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)
    suppressed: set[str] = field(default_factory=set)
    page_size: int = 100

    def _maybe_fail(self) -> None:
        if self.fail_next:
            raise self.fail_next.pop(0)

    def add(self, members: Sequence[Member]) -> str:
        self.calls.append(("add", [m.email for m in members]))
        self._maybe_fail()
        refused = [m.email for m in members if m.email in self.refuse]
        if refused:
            raise PermanentSyncError(
                f"400 invalid address {refused[0]}", response="400 bad", status=400
            )
        for m in members:
            self.held[m.email.casefold()] = (m.email, True, m.variables())
        return f"added {len(members)}"

    def unsubscribe(self, address: str) -> str:
        self.calls.append(("unsubscribe", address))
        self._maybe_fail()
        if address.casefold() in self.held:
            email, _, variables = self.held[address.casefold()]
            self.held[address.casefold()] = (email, False, variables)
        return "unsubscribed"

    def remove(self, address: str) -> str:
        self.calls.append(("remove", address))
        self._maybe_fail()
        self.held.pop(address.casefold(), None)
        return "removed"

    def members(self, cursor: str | None = None) -> MembersPage:
        start = int(cursor or 0)
        rows = list(self.held.values())[start : start + self.page_size]
        more = start + self.page_size < len(self.held)
        return MembersPage(
            members=[RemoteMember(email=e, subscribed=s) for e, s, _ in rows],
            next_cursor=str(start + self.page_size) if more else None,
        )

    def clear_suppression(self, address: str) -> str | None:
        self.calls.append(("clear_suppression", address))
        if address in self.suppressed:
            self.suppressed.discard(address)
            return "unsubscribes"
        return None


def _app_without_worker(database_url: str, smtp: SmtpSink, **overrides: Any) -> Settings:
    return make_settings(database_url, smtp_port=smtp.port, run_worker=False, **overrides)


def _mail_worker(
    settings: Settings,
    engine: sa.Engine,
    backend: MemoryBackend,
    *,
    now: Callable[[], datetime] = utcnow,
) -> Worker:
    return Worker(
        engine=engine,
        settings=settings,
        mailer=_SmtpFor(settings),
        name="test-worker",
        list_backends={"bluehats": backend},
        now=now,
    )


def _SmtpFor(settings: Settings) -> Any:
    from app.mailer import make_mailer

    return make_mailer(settings.mailer)


def _reconcile_an_hour_on(settings: Settings, engine: sa.Engine, backend: MemoryBackend) -> None:
    """A backend holding two members, read by the scheduled reconciliation an hour on."""
    backend.held = {
        "a@example.org": ("a@example.org", True, {}),
        "b@example.org": ("b@example.org", True, {}),
    }
    worker = _mail_worker(settings, engine, backend)
    worker.schedule_reconciliations()
    worker.now = lambda: utcnow() + timedelta(hours=1, minutes=1)
    _drain(worker)


def _drain(worker: Worker, rounds: int = 20) -> None:
    for _ in range(rounds):
        if worker.run_once() == 0:
            return


def _confirm(
    client: TestClient, worker: Worker, smtp: SmtpSink, email: str, *, mailed_to: str | None = None
) -> None:
    """Subscribe and confirm; `mailed_to`: the address as the mail carries it, if not `email`."""
    assert client.post("/v1/lists/bluehats/subscriptions", json={"email": email}).status_code == 202
    _drain(worker)
    response = client.post(
        link_in(smtp.mail_to(mailed_to or email, link="confirm"), "confirm"),
        headers={"accept": "application/json"},
    )
    assert response.json()["status"] == "confirmed"


def _jobs(engine: sa.Engine, kind: JobKind = JobKind.SYNC) -> list[OutboxJob]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(OutboxJob).where(OutboxJob.kind == kind).order_by(col(OutboxJob.id))
            ).all()
        )


LEASE = timedelta(minutes=5)


class TestSyncJobs:
    def test_a_confirmation_adds_the_member_with_a_working_unsubscribe_url(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        backend = MemoryBackend()
        worker = _mail_worker(settings, engine, backend)
        with TestClient(create_app(settings)) as client:
            _confirm(client, worker, smtp, "Camille@example.org")
            _drain(worker)
            # A first opt-in leaves the backend's suppressions alone (see the next test).
            assert backend.calls == [("add", ["Camille@example.org"])]
            _, subscribed, variables = backend.held["camille@example.org"]
            assert subscribed
            assert variables["locale"] == "fr"
            # The newsletter's List-Unsubscribe link works, as a one-click POST.
            link = variables["unsubscribe_url"].removeprefix("http://testserver")
            response = client.post(
                link,
                content=b"List-Unsubscribe=One-Click",
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
            assert response.status_code == 200
            _drain(worker)
        assert backend.calls[-1] == ("unsubscribe", "Camille@example.org")
        assert backend.held["camille@example.org"][1] is False
        jobs = _jobs(engine)
        assert [job.state for job in jobs] == [JobState.DONE, JobState.DONE]
        with Session(engine) as session:
            attempts = session.exec(select(DeliveryAttempt)).all()
            assert {a.job_id for a in attempts} >= {job.id for job in jobs}

    def test_changes_before_the_worker_runs_coalesce_and_the_latest_state_wins(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        backend = MemoryBackend()
        worker = _mail_worker(settings, engine, backend)
        # Sync jobs wait while mails are sent: only the mail kind runs here.
        with TestClient(create_app(settings)) as client:
            client.post("/v1/lists/bluehats/subscriptions", json={"email": "quick@example.org"})
            worker._mail_round(settings.worker_batch_size)
            client.post(link_in(smtp.mail_to("quick@example.org", link="confirm"), "confirm"))
            client.post("/v1/lists/bluehats/unsubscriptions", json={"email": "quick@example.org"})
            worker._mail_round(settings.worker_batch_size)
            client.post(
                link_in(smtp.mail_to("quick@example.org", link="unsubscribe"), "unsubscribe")
            )
        jobs = _jobs(engine)
        assert len(jobs) == 1, "confirm and unsubscribe share one pending sync job"
        _drain(worker)
        assert backend.calls == [("unsubscribe", "quick@example.org")]

    def test_coming_back_after_leaving_clears_the_old_suppression_once(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp, resend_interval="0s")
        backend = MemoryBackend(suppressed={"back@example.org"})
        worker = _mail_worker(settings, engine, backend)
        with TestClient(create_app(settings)) as client:
            _confirm(client, worker, smtp, "back@example.org")
            _drain(worker)
            client.post("/v1/lists/bluehats/unsubscriptions", json={"email": "back@example.org"})
            _drain(worker)
            client.post(
                link_in(smtp.mail_to("back@example.org", link="unsubscribe"), "unsubscribe")
            )
            _drain(worker)
            assert ("clear_suppression", "back@example.org") not in backend.calls
            _confirm(client, worker, smtp, "back@example.org")
            _drain(worker)
        assert backend.calls[-2:] == [
            ("clear_suppression", "back@example.org"),
            ("add", ["back@example.org"]),
        ]
        assert backend.suppressed == set()
        with Session(engine) as session:
            cleared = [
                e
                for e in session.exec(select(ConsentEvent)).all()
                if e.detail.get("event") == "suppression_cleared"
            ]
        assert len(cleared) == 1

    def test_a_burst_of_confirmations_becomes_bulk_calls(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp, sync_batch_size=1000)
        backend = MemoryBackend(max_batch=100)
        worker = _mail_worker(settings, engine, backend)
        _confirmed_rows(engine, count=250)
        _drain(worker)
        adds = [call for call in backend.calls if call[0] == "add"]
        assert [len(emails) for _, emails in adds] == [100, 100, 50]
        assert len(backend.held) == 250
        assert all(job.state == JobState.DONE for job in _jobs(engine))

    def test_a_refused_address_does_not_sink_its_batch(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        backend = MemoryBackend(refuse={"bulk-0003@example.org"})
        worker = _mail_worker(settings, engine, backend)
        _confirmed_rows(engine, count=5)
        _drain(worker)
        assert len(backend.held) == 4
        jobs = _jobs(engine)
        dead = [job for job in jobs if job.state == JobState.DEAD]
        assert len(dead) == 1
        assert "invalid address bulk-0003@example.org" in (dead[0].last_error or "")
        assert sum(job.state == JobState.DONE for job in jobs) == 4

    def test_a_backend_outage_is_retried_until_every_change_arrives_once(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(
            database_url, smtp, retry_base_delay="0s", retry_max_delay="0s"
        )
        backend = MemoryBackend(
            fail_next=[RetryableSyncError("HTTP 503", response="503 down") for _ in range(3)]
        )
        worker = _mail_worker(settings, engine, backend)
        _confirmed_rows(engine, count=3)
        _drain(worker)
        assert len(backend.held) == 3
        with Session(engine) as session:
            outcomes = [a.outcome for a in session.exec(select(DeliveryAttempt)).all()]
        assert outcomes.count("retry") == 9
        assert outcomes.count("success") == 3
        assert all(job.state == JobState.DONE for job in _jobs(engine))

    def test_retry_after_from_the_backend_is_honoured(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(
            database_url, smtp, retry_base_delay="0s", retry_max_delay="1s"
        )
        backend = MemoryBackend(fail_next=[RetryableSyncError("HTTP 429", retry_after=120)])
        worker = _mail_worker(settings, engine, backend)
        _confirmed_rows(engine, count=1)
        before = utcnow()
        worker.run_once()
        [job] = _jobs(engine)
        assert job.state == JobState.PENDING
        assert job.next_attempt_at >= before + timedelta(seconds=119)

    def test_jobs_of_one_subscription_never_run_side_by_side(
        self, database_url: str, engine: sa.Engine
    ) -> None:
        [row] = _confirmed_rows(engine, count=1)
        now = utcnow()
        with db.session_scope(engine) as session:
            from app import outbox

            [first] = outbox.claim(session, worker="a", now=now, lease=LEASE, limit=10)
            # A newer change while the first job is in flight: a second job is written...
            outbox.enqueue_sync(
                session, subscription_id=row, list_id=1, now=now, fresh_opt_in=False
            )
        with db.session_scope(engine) as session:
            # ...but it waits for the first to finish.
            assert (
                outbox.claim(session, worker="b", now=now, lease=timedelta(minutes=5), limit=10)
                == []
            )
            outbox.finish(session, job=first, worker="a", started_at=now, now=now)
        with db.session_scope(engine) as session:
            assert (
                len(
                    outbox.claim(session, worker="b", now=now, lease=timedelta(minutes=5), limit=10)
                )
                == 1
            )


class TestAdapterCrash:
    @pytest.mark.parametrize("max_batch", [1000, 1], ids=["bulk", "one at a time"])
    def test_an_exception_out_of_an_adapter_fails_its_jobs_not_the_round(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine, max_batch: int
    ) -> None:
        # An adapter is to raise SyncError only; one that raises anything else (a bug, an
        # httpx exception it let through) failed the whole round: no outcome recorded,
        # every job left leased, and taken again at each lease's end, never dead-lettered.
        settings = _app_without_worker(database_url, smtp, job_max_attempts=2)
        backend = MemoryBackend(max_batch=max_batch, fail_next=[ValueError("a bug")])
        worker = _mail_worker(settings, engine, backend)
        ids = _confirmed_rows(engine, count=3)

        worker.run_once()

        jobs = {job.payload["subscription_id"]: job for job in _jobs(engine)}
        # Bulk: the one call carried all three; one at a time: the first address's only.
        crashed = ids if max_batch > 1 else ids[:1]
        for subscription_id in ids:
            job = jobs[subscription_id]
            if subscription_id in crashed:
                assert (job.state, job.attempts) == (JobState.PENDING, 1)
                assert job.last_error == "internal error: ValueError"
            else:
                assert (job.state, job.attempts) == (JobState.DONE, 1)
        assert len(backend.held) == 3 - len(crashed)


def _confirmed_rows(engine: sa.Engine, *, count: int) -> list[int]:
    """Confirmed subscriptions with their sync jobs, as confirmations leave them."""
    from app import lists, outbox

    now = utcnow()
    ids = []
    with db.session_scope(engine) as session:
        lists.sync_from_settings(session, declared=Settings().lists, now=now)
        mailing_list = lists.get(session, slug="bluehats")
        assert mailing_list.id is not None
        for n in range(count):
            row = Subscription(
                list_id=mailing_list.id,
                email=f"bulk-{n:04d}@example.org",
                email_key=f"bulk-{n:04d}@example.org",
                status="confirmed",
                locale="fr",
                consent_version="2026-11",
                confirmed_at=now,
            )
            session.add(row)
            session.flush()
            assert row.id is not None
            ids.append(row.id)
            outbox.enqueue_sync(
                session,
                subscription_id=row.id,
                list_id=mailing_list.id,
                now=now,
                fresh_opt_in=False,
            )
    return ids


class TestReconcileAndImport:
    def test_reconcile_reports_and_applies_every_kind_of_difference(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        backend = MemoryBackend(page_size=2)
        worker = _mail_worker(settings, engine, backend)
        _confirmed_rows(engine, count=3)
        _drain(worker)
        # Drift: one member lost at the backend, one unsubscribed there, one stranger added.
        backend.held.pop("bulk-0000@example.org")
        email, _, variables = backend.held["bulk-0001@example.org"]
        backend.held["bulk-0001@example.org"] = (email, False, variables)
        backend.held["stranger@example.org"] = ("stranger@example.org", True, {})

        remote = sync.read_backend(backend)
        with db.session_scope(engine) as session:
            report = sync.compare(session, list_slug="bluehats", remote=remote)
        assert report.missing == ["bulk-0000@example.org"]
        assert report.unsubscribed_there == ["bulk-0001@example.org"]
        assert report.extra == ["stranger@example.org"]

        with db.session_scope(engine) as session:
            sync.apply(session, report=report, key=settings.token_key(), now=utcnow())
        _drain(worker)
        assert backend.held["bulk-0000@example.org"][1] is True
        assert backend.held["stranger@example.org"][1] is False
        with Session(engine) as session:
            row = session.exec(
                select(Subscription).where(Subscription.email_key == "bulk-0001@example.org")
            ).one()
            assert row.status == "unsubscribed"
        with db.session_scope(engine) as session:
            again = sync.compare(session, list_slug="bluehats", remote=sync.read_backend(backend))
        assert again.in_sync, again.as_dict()

    def test_reconcile_leaves_a_new_opt_in_whose_sync_has_not_reached_the_backend(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        backend = MemoryBackend()
        worker = _mail_worker(settings, engine, backend)
        with TestClient(create_app(settings)) as client:
            _confirm(client, worker, smtp, "back@example.org")
            _drain(worker)
            # They leave at the backend (its link in a newsletter), and it is recorded here.
            email, _, variables = backend.held["back@example.org"]
            backend.held["back@example.org"] = (email, False, variables)
            with db.session_scope(engine) as session:
                subscriptions.apply_backend_event(
                    session,
                    list_slug="bluehats",
                    address=addresses.parse("back@example.org", new=False),
                    event="unsubscribed",
                    evidence=subscriptions.Evidence(source="backend"),
                    now=utcnow(),
                )
            _drain(worker)
            # Then come back and confirm again: their sync is queued, not yet run.
            _confirm(client, worker, smtp, "back@example.org")
        assert backend.held["back@example.org"][1] is False

        # A reconciliation reads the backend meanwhile: it still holds the old opt-out.
        with db.session_scope(engine) as session:
            report = sync.compare(session, list_slug="bluehats", remote=sync.read_backend(backend))
            assert report.unsubscribed_there == []
            # Missing there, as it is, until its sync adds it.
            assert report.missing == ["back@example.org"]
            sync.apply(session, report=report, key=settings.token_key(), now=utcnow())

        # The newer opt-in stands, and reaches the backend.
        with Session(engine) as session:
            row = session.exec(
                select(Subscription).where(Subscription.email_key == "back@example.org")
            ).one()
            assert row.status == "confirmed"
        _drain(worker)
        assert backend.held["back@example.org"][1] is True

    def test_reconcile_removes_an_erased_address_the_backend_still_holds(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        backend = MemoryBackend()
        worker = _mail_worker(settings, engine, backend)
        with TestClient(create_app(settings)) as client:
            _confirm(client, worker, smtp, "erin@example.org")
        _drain(worker)
        assert backend.held["erin@example.org"][1] is True
        # The erasure's removal is refused until it is dead-lettered (a revoked API key,
        # say): the backend still has the person as a subscribed member.
        backend.fail_next = [PermanentSyncError("401 Forbidden", response="401")]
        _erase(engine, settings, "erin@example.org")
        _drain(worker)
        assert [job.state for job in _jobs(engine)][-1] == JobState.DEAD
        assert backend.held["erin@example.org"][1] is True

        with db.session_scope(engine) as session:
            report = sync.compare(session, list_slug="bluehats", remote=sync.read_backend(backend))
            assert report.extra == ["erin@example.org"]
            sync.apply(session, report=report, key=settings.token_key(), now=utcnow())
        backend.calls.clear()
        _drain(worker)
        # Removed as the erasure asked, not kept there as an unsubscribed member...
        assert backend.calls == [("remove", "erin@example.org")]
        assert "erin@example.org" not in backend.held
        # ...and, once it is gone there, the queue no longer holds the address either.
        done = [job for job in _jobs(engine) if job.state == JobState.DONE]
        assert not any("erin@example.org" in str(job.payload) for job in done)

    def test_a_member_gone_from_a_backend_that_forgets_leavers_is_not_added_back(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        # Like Mailman: someone who leaves through the list's own link simply disappears.
        backend = MemoryBackend(keeps_unsubscribed=False)
        worker = _mail_worker(settings, engine, backend)
        _confirmed_rows(engine, count=2)
        _drain(worker)
        backend.held.pop("bulk-0001@example.org")
        remote = sync.read_backend(backend)
        with db.session_scope(engine) as session:
            report = sync.compare(
                session, list_slug="bluehats", remote=remote, keeps_unsubscribed=False
            )
            assert report.missing == []
            assert report.absent_there == ["bulk-0001@example.org"]
            assert not report.in_sync
            sync.apply(session, report=report, key=settings.token_key(), now=utcnow())
        _drain(worker)
        assert "bulk-0001@example.org" not in backend.held

    def test_a_member_whose_addition_was_given_up_on_is_added_not_left_for_an_operator(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        # Mailman down for longer than the retries last: the confirmation's sync is dead.
        settings = _app_without_worker(database_url, smtp, job_max_attempts=1)
        backend = MemoryBackend(keeps_unsubscribed=False)
        worker = _mail_worker(settings, engine, backend)
        _confirmed_rows(engine, count=1)
        backend.fail_next = [RetryableSyncError("ConnectError: connection refused")]
        _drain(worker)
        assert [job.state for job in _jobs(engine)] == [JobState.DEAD]
        with db.session_scope(engine) as session:
            report = sync.compare(
                session,
                list_slug="bluehats",
                remote=sync.read_backend(backend),
                keeps_unsubscribed=False,
            )
            # Never there since the opt-in: its absence is no departure made there.
            assert (report.missing, report.absent_there) == (["bulk-0000@example.org"], [])
            sync.apply(session, report=report, key=settings.token_key(), now=utcnow())
        _drain(worker)
        assert backend.held["bulk-0000@example.org"][1] is True

    def test_a_member_whose_addition_is_under_way_is_missing_not_gone(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        # Confirmed while Mailman was read (or while a retry waits): Mailman cannot show
        # them yet, and an operator told they are gone would unsubscribe a new member.
        settings = _app_without_worker(database_url, smtp)
        backend = MemoryBackend(keeps_unsubscribed=False)
        worker = _mail_worker(settings, engine, backend)
        _confirmed_rows(engine, count=1)
        with db.session_scope(engine) as session:
            report = sync.compare(
                session,
                list_slug="bluehats",
                remote=sync.read_backend(backend),
                keeps_unsubscribed=False,
            )
            assert (report.missing, report.absent_there) == (["bulk-0000@example.org"], [])
            sync.apply(session, report=report, key=settings.token_key(), now=utcnow())
        _drain(worker)
        assert [job.state for job in _jobs(engine)] == [JobState.DONE]
        assert backend.held["bulk-0000@example.org"][1] is True

    def test_a_member_who_reached_the_backend_once_and_is_gone_is_still_left_to_check(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp, job_max_attempts=1)
        backend = MemoryBackend(keeps_unsubscribed=False)
        worker = _mail_worker(settings, engine, backend)
        _confirmed_rows(engine, count=1)
        _drain(worker)
        assert [job.state for job in _jobs(engine)] == [JobState.DONE]
        # A later sync of the same member (a change of name, say) fails for good: it was
        # at the backend all the same, and its absence now is a departure made there.
        with db.session_scope(engine) as session:
            [row] = session.exec(select(Subscription)).all()
            outbox.enqueue_sync(
                session,
                subscription_id=row.id or 0,
                list_id=row.list_id,
                now=utcnow(),
                fresh_opt_in=False,
            )
        backend.fail_next = [PermanentSyncError("400 refused", response="400")]
        _drain(worker)
        assert [job.state for job in _jobs(engine)] == [JobState.DONE, JobState.DEAD]
        backend.held = {}
        with db.session_scope(engine) as session:
            report = sync.compare(
                session,
                list_slug="bluehats",
                remote=sync.read_backend(backend),
                keeps_unsubscribed=False,
            )
        assert (report.missing, report.absent_there) == ([], ["bulk-0000@example.org"])

    def test_import_keeps_each_members_state_with_its_provenance(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        backend = MemoryBackend(page_size=2)
        backend.held = {
            "a@example.org": ("A@example.org", True, {}),
            "b@example.org": ("b@example.org", False, {}),
            "c@example.org": ("c@example.org", True, {}),
            "bad": ("not an address", True, {}),
        }
        with TestClient(create_app(settings)):
            pass  # creates the list rows
        remote = sync.read_backend(backend)
        report = _import_members(engine, settings, remote)
        assert (report.confirmed, report.unsubscribed, report.invalid) == (2, 1, ["not an address"])
        with db.session_scope(engine) as session:
            sync.settle_import(session, report=report, remote=remote, now=utcnow())
        assert report.departed == 0
        again = _import_members(engine, settings, remote)
        assert again.already_known == 3
        with Session(engine) as session:
            events = session.exec(select(ConsentEvent)).all()
            assert len(events) == 3
            assert all(e.action == "imported" for e in events)
            assert all(
                e.detail["provenance"].startswith("imported from mailgun on ") for e in events
            )
        worker = _mail_worker(settings, engine, backend)
        _drain(worker)
        # The confirmed imports now carry their unsubscribe URL at the backend.
        assert "unsubscribe_url" in backend.held["a@example.org"][2]
        assert "unsubscribe_url" not in backend.held["b@example.org"][2]

    def test_a_member_who_leaves_the_backend_while_the_import_runs_is_not_subscribed_again(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        backend = MemoryBackend()
        backend.held = {
            "stay@example.org": ("stay@example.org", True, {}),
            "leave@example.org": ("leave@example.org", True, {}),
        }
        worker = _mail_worker(settings, engine, backend)
        with TestClient(create_app(settings)):
            pass  # creates the list rows
        remote = sync.read_backend(backend)
        # Between the import's read and its write, one member unsubscribes at the backend
        # (its webhook finds no one here yet).
        backend.held["leave@example.org"] = ("leave@example.org", False, {})
        report = _import_members(engine, settings, remote)
        assert report.confirmed == 2
        # The imported members' syncs (an add each) wait for the second read...
        _drain(worker)
        assert backend.calls == []
        assert backend.held["leave@example.org"][1] is False
        with db.session_scope(engine) as session:
            sync.settle_import(
                session, report=report, remote=sync.read_backend(backend), now=utcnow()
            )
        assert report.departed == 1
        _drain(worker)
        # ...which records the departure: only the member who stayed is added (with its
        # unsubscribe URL); the one who left stays unsubscribed there and here.
        assert ("add", ["stay@example.org"]) in backend.calls
        assert not any(
            name == "add" and "leave@example.org" in args for name, args in backend.calls
        )
        assert "unsubscribe_url" in backend.held["stay@example.org"][2]
        assert backend.held["leave@example.org"][1] is False
        with Session(engine) as session:
            statuses = {row.email: row.status for row in session.exec(select(Subscription))}
            events = session.exec(
                select(ConsentEvent).where(ConsentEvent.action == "backend_event")
            ).all()
        assert statuses == {"stay@example.org": "confirmed", "leave@example.org": "unsubscribed"}
        assert [(e.source, e.detail["event"]) for e in events] == [("import", "unsubscribed")]

    def test_the_proof_of_an_imported_member_shows_no_wording_it_never_saw(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        with TestClient(create_app(settings)):
            pass  # creates the list rows and records its wording
        _import_members(engine, settings, {"a@example.org": ("a@example.org", True)})
        with db.session_scope(engine) as session:
            proof = consent.proof_by_address(
                session, list_slug="bluehats", email_key="a@example.org"
            )
            text = consent.render_text(proof, generated_at=utcnow())
        listed = settings.lists[0].consent_version
        # The member agreed to the former service's form, whose wording is not known here.
        assert [event.consent_version for event in proof.events] == ["imported from mailgun"]
        assert proof.subscription.consent_version == "imported from mailgun"
        assert proof.wordings == {"imported from mailgun": None}
        assert f"version {listed}" not in text
        assert "version imported from mailgun: no text recorded for this version" in text

    def test_import_leaves_out_erased_and_blocked_addresses(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        with TestClient(create_app(settings)):
            pass  # creates the list rows
        now = utcnow()
        with db.session_scope(engine) as session:
            operators.erase(
                session,
                address=addresses.parse("Gone@example.org", new=False),
                key=settings.token_key(),
                backend_lists=[],
                now=now,
            )
            blocklist.add(
                session, kind=BlockKind.DOMAIN, value="spam.example", reason="x", actor="t", now=now
            )
        remote = {
            "gone@example.org": ("gone@example.org", True),
            "left@example.org": ("GONE@EXAMPLE.ORG", False),  # the same person, unsubscribed
            "x@spam.example": ("x@spam.example", True),
            "kept@example.org": ("kept@example.org", True),
        }
        report = _import_members(engine, settings, remote, now=now)
        assert (report.confirmed, report.erased, report.blocked) == (1, 2, 1)
        with Session(engine) as session:
            assert [row.email for row in session.exec(select(Subscription)).all()] == [
                "kept@example.org"
            ]

    def test_an_erasure_then_a_new_subscription_leave_the_member_at_the_backend(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        backend = MemoryBackend()
        worker = _mail_worker(settings, engine, backend)
        with TestClient(create_app(settings)) as client:
            _confirm(client, worker, smtp, "greg@example.org")
            _drain(worker)
            assert backend.held["greg@example.org"][1] is True
            # Erased while the backend was away: the removal waits for its retry...
            with db.session_scope(engine) as session:
                operators.erase(
                    session,
                    address=addresses.parse("greg@example.org", new=False),
                    key=settings.token_key(),
                    backend_lists=["bluehats"],
                    now=utcnow(),
                )
            _set_due(engine, in_=timedelta(hours=1))
            # ...the person signs up again and confirms: an addition after it...
            _confirm(client, worker, smtp, "greg@example.org")
        removal, addition = [job for job in _jobs(engine) if job.state == JobState.PENDING]
        assert (removal.payload["action"], addition.payload.get("action")) == ("remove", None)
        # ...and the waiting job is retried (by hand, or its time came): both in one round.
        _set_due(engine, in_=timedelta(0))
        backend.calls.clear()
        _drain(worker)
        assert [name for name, _ in backend.calls] == ["remove", "add"]
        assert backend.held["greg@example.org"][1] is True
        assert {job.state for job in _jobs(engine)} == {JobState.DONE}


@dataclass
class _Clock:
    """The worker's time: now, or later once moved on (a retry's time comes)."""

    ahead: timedelta = timedelta(0)

    def __call__(self) -> datetime:
        return utcnow() + self.ahead


def _erase(engine: sa.Engine, settings: Settings, email: str) -> None:
    with db.session_scope(engine) as session:
        operators.erase(
            session,
            address=addresses.parse(email, new=False),
            key=settings.token_key(),
            backend_lists=["bluehats"],
            now=utcnow(),
        )


def _attempts_of(engine: sa.Engine, job_id: int | None) -> list[str]:
    with Session(engine) as session:
        return [
            attempt.outcome
            for attempt in session.exec(
                select(DeliveryAttempt)
                .where(DeliveryAttempt.job_id == job_id)
                .order_by(col(DeliveryAttempt.id))
            ).all()
        ]


RETRY_IN = timedelta(minutes=10)


class TestOrderAcrossRounds:
    """A job about an address waits for every older one about it that is not finished, in
    a later round too: a removal being retried is not overtaken by a newer addition."""

    def _worker(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine, **overrides: Any
    ) -> tuple[Settings, Worker, MemoryBackend, _Clock]:
        settings = _app_without_worker(
            database_url, smtp, retry_base_delay=RETRY_IN, retry_max_delay=RETRY_IN, **overrides
        )
        backend = MemoryBackend()
        clock = _Clock()
        return settings, _mail_worker(settings, engine, backend, now=clock), backend, clock

    def _erased_while_the_backend_is_away_then_back(
        self,
        client: TestClient,
        worker: Worker,
        backend: MemoryBackend,
        smtp: SmtpSink,
        engine: sa.Engine,
        *,
        email: str = "greg@example.org",
        sent_as: str = "greg@example.org",
    ) -> None:
        """Greg is a member; erased while the backend is away (the removal is retried in
        `RETRY_IN`), then signs up again and confirms: a newer addition, due at once.
        `sent_as`: the address as mails and the backend carry it."""
        _confirm(client, worker, smtp, email, mailed_to=sent_as)
        _drain(worker)
        assert backend.held[sent_as][1] is True
        _erase(engine, worker.settings, email)
        backend.fail_next = [RetryableSyncError("HTTP 503", response="503 down")]
        _drain(worker)
        [removal] = [job for job in _jobs(engine) if job.state == JobState.PENDING]
        assert (removal.payload["action"], removal.attempts) == ("remove", 1)
        assert sent_as in backend.held
        _confirm(client, worker, smtp, email, mailed_to=sent_as)
        backend.calls.clear()

    def _waiting(self, engine: sa.Engine) -> tuple[OutboxJob, OutboxJob]:
        removal, addition = [job for job in _jobs(engine) if job.state == JobState.PENDING]
        assert removal.payload["action"] == "remove"
        assert "subscription_id" in addition.payload
        return removal, addition

    @pytest.mark.parametrize("batch", [1, 1000], ids=["one-job-a-round", "both-in-one-round"])
    def test_a_newer_addition_waits_for_the_retried_removal_then_runs(
        self, batch: int, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings, worker, backend, clock = self._worker(
            database_url, smtp, engine, sync_batch_size=batch
        )
        with TestClient(create_app(settings)) as client:
            self._erased_while_the_backend_is_away_then_back(client, worker, backend, smtp, engine)
            _drain(worker)
            # The addition was due, but the removal asked before it is not done: no call,
            # no attempt counted, and it comes due again with the removal.
            assert backend.calls == []
            removal, addition = self._waiting(engine)
            assert addition.attempts == 0
            assert addition.next_attempt_at == removal.next_attempt_at
            assert _attempts_of(engine, addition.id) == []
            # The removal's time comes: it runs (never held back by the newer job, even
            # in a round of its own), and the addition in the next round.
            clock.ahead = RETRY_IN + timedelta(minutes=1)
            assert worker.run_once() == 1
            assert [name for name, _ in backend.calls] == ["remove"]
            assert worker.run_once() == 1
            assert [name for name, _ in backend.calls] == ["remove", "add"]
            _drain(worker)
        assert backend.held["greg@example.org"][1] is True
        assert {job.state for job in _jobs(engine)} == {JobState.DONE}
        assert _attempts_of(engine, addition.id) == ["success"]

    def test_a_newer_addition_runs_once_the_removal_is_dead(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings, worker, backend, clock = self._worker(
            database_url, smtp, engine, job_max_attempts=2
        )
        with TestClient(create_app(settings)) as client:
            self._erased_while_the_backend_is_away_then_back(client, worker, backend, smtp, engine)
            _drain(worker)
            assert backend.calls == []
            removal, addition = self._waiting(engine)
            # The backend is still away at the removal's last attempt: a dead letter...
            backend.fail_next = [RetryableSyncError("HTTP 503", response="503 down")]
            clock.ahead = RETRY_IN + timedelta(minutes=1)
            _drain(worker)
        # ...which holds nothing back: the newer addition runs.
        assert [name for name, _ in backend.calls] == ["remove", "add"]
        assert backend.held["greg@example.org"][1] is True
        states = {job.id: job.state for job in _jobs(engine)}
        assert (states[removal.id], states[addition.id]) == (JobState.DEAD, JobState.DONE)
        assert _attempts_of(engine, addition.id) == ["success"]

    def test_an_internationalized_domain_waits_in_either_spelling(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        # The removal's key holds the domain as stored (Unicode), the addition's address
        # is sent in ASCII: one address all the same.
        settings, worker, backend, clock = self._worker(database_url, smtp, engine)
        with TestClient(create_app(settings)) as client:
            self._erased_while_the_backend_is_away_then_back(
                client, worker, backend, smtp, engine, email=IDN, sent_as=IDN_ASCII
            )
            _drain(worker)
            assert backend.calls == []
            clock.ahead = RETRY_IN + timedelta(minutes=1)
            _drain(worker)
        assert [name for name, _ in backend.calls] == ["remove", "add"]
        assert backend.held[IDN_ASCII][1] is True

    def test_a_job_behind_an_older_one_holds_back_the_newer_ones_of_its_round(self) -> None:
        behind = replace(
            _planned(5, sync.Action.ADD, "greg@example.org"), waits_until=utcnow() + RETRY_IN
        )
        now, later = sync.in_turn(
            [
                _planned(7, sync.Action.UNSUBSCRIBE, "Greg@example.org"),
                behind,
                _planned(6, sync.Action.ADD, "ada@example.org"),
            ]
        )
        assert [item.job.id for item in now] == [6]
        assert [item.job.id for item in later] == [5, 7]

    def test_a_newer_addition_waits_for_a_removal_running_at_another_worker(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings, worker, backend, clock = self._worker(database_url, smtp, engine)
        with TestClient(create_app(settings)) as client:
            self._erased_while_the_backend_is_away_then_back(client, worker, backend, smtp, engine)
            # Another worker has taken the removal's retry and is calling the backend...
            removal, addition = self._waiting(engine)
            with db.session_scope(engine) as session:
                session.execute(
                    sa.update(OutboxJob)
                    .where(col(OutboxJob.id) == removal.id)
                    .values(next_attempt_at=addition.next_attempt_at - timedelta(seconds=1))
                )
            with db.session_scope(engine) as session:
                [taken] = outbox.claim(session, worker="slow", now=utcnow(), lease=LEASE, limit=1)
            assert taken.id == removal.id
            # ...the addition waits for its lease to end.
            _drain(worker)
            assert backend.calls == []
            [running] = [job for job in _jobs(engine) if job.id == removal.id]
            [waiting] = [job for job in _jobs(engine) if job.id == addition.id]
            assert waiting.next_attempt_at == running.lease_until
            with db.session_scope(engine) as session:
                outbox.finish(session, job=taken, worker="slow", started_at=utcnow(), now=utcnow())
            backend.held.pop("greg@example.org")
            clock.ahead = LEASE + timedelta(minutes=1)
            _drain(worker)
        assert backend.calls == [("add", ["greg@example.org"])]
        assert backend.held["greg@example.org"][1] is True


def _set_due(engine: sa.Engine, *, in_: timedelta) -> None:
    """Every pending sync job due in `in_` (as after a failure, or a retry by hand)."""
    with engine.begin() as connection:
        connection.execute(
            sa.update(OutboxJob)
            .where(col(OutboxJob.kind) == JobKind.SYNC, col(OutboxJob.state) == JobState.PENDING)
            .values(next_attempt_at=utcnow() + in_)
        )


# `jo@exämple.org`, its domain in ASCII (IDNA).
IDN = "jo@exämple.org"
IDN_ASCII = "jo@xn--exmple-cua.org"


def _stored(engine: sa.Engine, statuses: dict[str, str]) -> None:
    """Subscriptions as this service stores them (normalized address, identity), no jobs."""
    from app import lists

    now = utcnow()
    with db.session_scope(engine) as session:
        lists.sync_from_settings(session, declared=Settings().lists, now=now)
        mailing_list = lists.get(session, slug="bluehats")
        assert mailing_list.id is not None
        for typed, status in statuses.items():
            address = addresses.parse(typed, new=True)
            session.add(
                Subscription(
                    list_id=mailing_list.id,
                    email=address.email,
                    email_key=address.key,
                    status=status,
                    locale="fr",
                    consent_version="2026-11",
                    confirmed_at=now,
                )
            )


class TestInternationalizedDomains:
    """An internationalized domain is stored in Unicode, however it was typed; a backend
    gets it in ASCII, and a member read back in either spelling is the same person."""

    @pytest.mark.parametrize("typed", [IDN, IDN_ASCII], ids=["typed-unicode", "typed-ascii"])
    def test_every_call_to_the_backend_carries_the_domain_in_ascii(
        self, typed: str, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp, resend_interval="0s")
        backend = MemoryBackend()
        worker = _mail_worker(settings, engine, backend)
        with TestClient(create_app(settings)) as client:
            _confirm(client, worker, smtp, typed, mailed_to=IDN_ASCII)
            _drain(worker)
            # Leaves by the newsletter's one-click link, then comes back.
            link = backend.held[IDN_ASCII][2]["unsubscribe_url"]
            response = client.post(
                link.removeprefix("http://testserver"),
                content=b"List-Unsubscribe=One-Click",
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
            assert response.status_code == 200
            _drain(worker)
            _confirm(client, worker, smtp, typed, mailed_to=IDN_ASCII)
            _drain(worker)
        with db.session_scope(engine) as session:
            operators.erase(
                session,
                address=addresses.parse(IDN, new=False),
                key=settings.token_key(),
                backend_lists={"bluehats"},
                now=utcnow(),
            )
        _drain(worker)
        assert backend.calls == [
            ("add", [IDN_ASCII]),
            ("unsubscribe", IDN_ASCII),
            ("clear_suppression", IDN_ASCII),
            ("add", [IDN_ASCII]),
            ("remove", IDN_ASCII),
        ]
        assert backend.held == {}
        assert all(job.state == JobState.DONE for job in _jobs(engine))

    def test_reconcile_finds_a_member_held_in_ascii_in_agreement(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        backend = MemoryBackend()
        worker = _mail_worker(settings, engine, backend)
        _stored(engine, {IDN: "confirmed", "Ana@EXÄMPLE.org": "confirmed"})
        backend.held = {
            IDN_ASCII: (IDN_ASCII, True, {}),
            "ana@xn--exmple-cua.org": ("ANA@XN--EXMPLE-CUA.ORG", True, {}),
        }
        with db.session_scope(engine) as session:
            report = sync.compare(session, list_slug="bluehats", remote=sync.read_backend(backend))
            assert report.in_sync, report.as_dict()
            assert (report.confirmed_here, report.backend_members) == (2, 2)
            sync.apply(session, report=report, key=settings.token_key(), now=utcnow())
        _drain(worker)
        assert backend.calls == []

    def test_a_member_held_in_ascii_without_consent_here_is_fixed_through_its_subscription(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        backend = MemoryBackend()
        worker = _mail_worker(settings, engine, backend)
        _stored(engine, {IDN: "unsubscribed"})
        backend.held = {IDN_ASCII: (IDN_ASCII, True, {})}
        with db.session_scope(engine) as session:
            report = sync.compare(session, list_slug="bluehats", remote=sync.read_backend(backend))
            assert report.extra == [IDN_ASCII]
            assert report.missing == []
            sync.apply(session, report=report, key=settings.token_key(), now=utcnow())
        [job] = _jobs(engine)
        assert "subscription_id" in job.payload
        _drain(worker)
        assert backend.calls == [("unsubscribe", IDN_ASCII)]
        assert backend.held[IDN_ASCII][1] is False

    def test_a_member_imported_in_ascii_is_kept_by_reconcile(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        # Like Mailman, which holds the ASCII form.
        backend = MemoryBackend(keeps_unsubscribed=False)
        backend.held = {IDN_ASCII: (IDN_ASCII, True, {})}
        worker = _mail_worker(settings, engine, backend)
        with TestClient(create_app(settings)):
            pass  # creates the list rows
        imported = _import_members(
            engine, settings, sync.read_backend(backend), backend_kind="mailman"
        )
        assert imported.confirmed == 1
        with db.session_scope(engine) as session:
            sync.settle_import(
                session, report=imported, remote=sync.read_backend(backend), now=utcnow()
            )
        with db.session_scope(engine) as session:
            report = sync.compare(
                session,
                list_slug="bluehats",
                remote=sync.read_backend(backend),
                keeps_unsubscribed=False,
            )
            assert report.in_sync, report.as_dict()
            sync.apply(session, report=report, key=settings.token_key(), now=utcnow())
        _drain(worker)
        # The import's own sync (the member's unsubscribe link), in the same spelling.
        assert backend.calls == [("add", [IDN_ASCII])]
        assert backend.held[IDN_ASCII][1] is True

    def test_a_member_whose_address_is_not_valid_here_is_reported_and_left_alone(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        backend = MemoryBackend()
        worker = _mail_worker(settings, engine, backend)
        _stored(engine, {"kept@example.org": "confirmed"})
        backend.held = {
            "kept@example.org": ("kept@example.org", True, {}),
            "root@localhost": ("root@localhost", True, {}),
            "not an address": ("not an address", True, {}),
        }
        with db.session_scope(engine) as session:
            report = sync.compare(session, list_slug="bluehats", remote=sync.read_backend(backend))
            assert report.invalid == ["not an address", "root@localhost"]
            assert report.extra == []
            assert not report.in_sync
            sync.apply(session, report=report, key=settings.token_key(), now=utcnow())
        _drain(worker)
        assert backend.calls == []

    def test_a_subscribed_spelling_is_not_hidden_by_an_unsubscribed_one(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        _stored(engine, {IDN: "unsubscribed"})
        backend = MemoryBackend()
        # Listed in this order, the unsubscribed one last.
        backend.held = {IDN: (IDN, True, {}), IDN_ASCII: (IDN_ASCII, False, {})}
        with db.session_scope(engine) as session:
            report = sync.compare(session, list_slug="bluehats", remote=sync.read_backend(backend))
        assert report.extra == [IDN]
        assert report.backend_members == 1


# `andré@example.org` with its é decomposed (NFD: e and a combining acute), as some
# systems write it; this service stores the composed form (NFC).
DECOMPOSED = "andre\u0301@example.org"
COMPOSED = "andr\u00e9@example.org"


class TestSpellingsHeldAtTheBackend:
    """A backend may hold a member in another spelling than the one this service sends (an
    internationalized domain in Unicode, a decomposed accent, as the former service added
    it): fixes reach the member in the backend's own spelling."""

    @pytest.mark.parametrize("held", [IDN, DECOMPOSED], ids=["unicode-domain", "decomposed"])
    def test_a_member_without_consent_here_is_unsubscribed_in_its_spelling_there(
        self, held: str, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        backend = MemoryBackend()
        worker = _mail_worker(settings, engine, backend)
        _stored(engine, {held: "unsubscribed"})
        backend.held = {held.casefold(): (held, True, {})}
        with db.session_scope(engine) as session:
            report = sync.compare(session, list_slug="bluehats", remote=sync.read_backend(backend))
            assert report.extra == [held]
            sync.apply(session, report=report, key=settings.token_key(), now=utcnow())
        _drain(worker)
        assert backend.calls == [("unsubscribe", held)]
        assert backend.held[held.casefold()][1] is False
        with db.session_scope(engine) as session:
            again = sync.compare(session, list_slug="bluehats", remote=sync.read_backend(backend))
        assert again.in_sync, again.as_dict()

    def test_an_erased_address_held_with_its_domain_in_unicode_is_removed_there(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp)
        backend = MemoryBackend()
        worker = _mail_worker(settings, engine, backend)
        _stored(engine, {IDN: "confirmed"})
        backend.held = {IDN: (IDN, True, {})}
        _erase(engine, settings, IDN)
        _drain(worker)
        with db.session_scope(engine) as session:
            report = sync.compare(session, list_slug="bluehats", remote=sync.read_backend(backend))
            assert report.extra == [IDN]
            sync.apply(session, report=report, key=settings.token_key(), now=utcnow())
        _drain(worker)
        assert backend.calls[-1] == ("remove", IDN)
        assert backend.held == {}

    def test_a_fresh_opt_in_after_the_fix_is_enqueued_lands_after_it(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp, resend_interval="0s")
        backend = MemoryBackend()
        worker = _mail_worker(settings, engine, backend)
        with TestClient(create_app(settings)) as client:
            _confirm(client, worker, smtp, COMPOSED)
            client.post("/v1/lists/bluehats/unsubscriptions", json={"email": COMPOSED})
            _drain(worker)
            client.post(link_in(smtp.mail_to(COMPOSED, link="unsubscribe"), "unsubscribe"))
            _drain(worker)
            # The former service's member, in the decomposed spelling, is still subscribed.
            backend.held[DECOMPOSED.casefold()] = (DECOMPOSED, True, {})
            with db.session_scope(engine) as session:
                report = sync.compare(
                    session, list_slug="bluehats", remote=sync.read_backend(backend)
                )
                assert report.extra == [DECOMPOSED]
                sync.apply(session, report=report, key=settings.token_key(), now=utcnow())
            # Before the worker syncs (it only sends mail), the person subscribes again
            # and confirms.
            backend.calls.clear()
            client.post("/v1/lists/bluehats/subscriptions", json={"email": COMPOSED})
            worker._mail_round(settings.worker_batch_size)
            confirmed = client.post(
                link_in(smtp.mail_to(COMPOSED, link="confirm"), "confirm"),
                headers={"accept": "application/json"},
            )
            assert confirmed.json()["status"] == "confirmed"
            assert backend.calls == []
            _drain(worker)
        # The older fix first, then the new opt-in: at a backend that takes both spellings
        # for one member, the member ends subscribed.
        assert [name for name, _ in backend.calls] == ["unsubscribe", "clear_suppression", "add"]
        assert backend.calls[0] == ("unsubscribe", DECOMPOSED)
        assert backend.held[COMPOSED.casefold()][1] is True


class TestBackendEvents:
    def test_a_complaint_reported_by_the_backend_stops_sending_and_is_recorded(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        [row_id] = _confirmed_rows(engine, count=1)
        with db.session_scope(engine) as session:
            known = subscriptions.apply_backend_event(
                session,
                list_slug="bluehats",
                address=addresses.parse("bulk-0000@example.org", new=True),
                event="complained",
                evidence=subscriptions.Evidence(source="backend"),
                now=utcnow(),
            )
        assert known
        with Session(engine) as session:
            row = session.get(Subscription, row_id)
            assert row is not None
            assert row.status == "complained"
            [event] = session.exec(select(ConsentEvent)).all()
            assert event.detail["event"] == "complained"


class TestScheduledReconcile:
    def test_the_worker_reconciles_on_schedule_and_schedules_the_next_run(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp, reconcile_interval="1h")
        backend = MemoryBackend()
        backend.held["stranger@example.org"] = ("stranger@example.org", True, {})
        worker = _mail_worker(settings, engine, backend)
        _confirmed_rows(engine, count=1)
        worker.schedule_reconciliations()
        worker.schedule_reconciliations()  # a second worker asking changes nothing
        assert len(_jobs(engine, JobKind.RECONCILE)) == 1
        # The hour passes: the run is due.
        worker.now = lambda: utcnow() + timedelta(hours=1, minutes=1)
        _drain(worker)
        assert backend.held["stranger@example.org"][1] is False
        assert backend.held["bulk-0000@example.org"][1] is True
        reconciles = _jobs(engine, JobKind.RECONCILE)
        assert reconciles[0].state == JobState.DONE
        assert reconciles[-1].state == JobState.PENDING

    def test_a_member_gone_from_mailman_is_on_record_for_an_operator(
        self,
        database_url: str,
        smtp: SmtpSink,
        engine: sa.Engine,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        # Left through Mailman's own List-Unsubscribe, or removed by a list owner: the
        # scheduled run can fix nothing there, so it must say so, not look in sync.
        settings = _app_without_worker(database_url, smtp, reconcile_interval="1h")
        backend = MemoryBackend(keeps_unsubscribed=False)
        worker = _mail_worker(settings, engine, backend)
        _confirmed_rows(engine, count=1)
        _drain(worker)
        backend.held.pop("bulk-0000@example.org")
        worker.schedule_reconciliations()
        worker.now = lambda: utcnow() + timedelta(hours=1, minutes=1)
        with caplog.at_level("INFO", logger="app.worker"):
            _drain(worker)
        done = _jobs(engine, JobKind.RECONCILE)[0]
        assert done.state == JobState.DONE
        with Session(engine) as session:
            [attempt] = session.exec(
                select(DeliveryAttempt).where(DeliveryAttempt.job_id == done.id)
            ).all()
        assert "absent there 1" in (attempt.response or "")
        [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
        assert "absent_there=1" in warning.getMessage()
        assert "newsletter reconcile --list bluehats" in warning.getMessage()

    def test_a_list_without_a_backend_is_not_scheduled(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        # The embedded default's list (backend kind none): nothing to read, nothing to fix.
        settings = _app_without_worker(database_url, smtp, reconcile_interval="1h")
        worker = Worker(engine=engine, settings=settings, mailer=_SmtpFor(settings))
        _confirmed_rows(engine, count=1)
        worker.schedule_reconciliations()
        assert _jobs(engine, JobKind.RECONCILE) == []

    def test_a_run_that_fails_for_good_leaves_the_next_one_scheduled(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp, reconcile_interval="1h")
        backend = GarbledPageBackend(page_size=1)
        _reconcile_an_hour_on(settings, engine, backend)
        failed, *scheduled = _jobs(engine, JobKind.RECONCILE)
        assert failed.state == JobState.DEAD
        assert "unexpected answer" in (failed.last_error or "")
        assert [job.state for job in scheduled] == [JobState.PENDING]
        assert scheduled[0].next_attempt_at > utcnow() + timedelta(hours=1, minutes=30)

    def test_a_read_that_raises_what_no_adapter_should_is_a_failure_on_record(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        # Left to go up, the exception failed the round and left the job leased, taken
        # again at each lease's end and never dead-lettered; the schedule stopped with it.
        settings = _app_without_worker(
            database_url, smtp, reconcile_interval="1h", job_max_attempts=1
        )
        backend = CrashingPageBackend(page_size=1)
        _reconcile_an_hour_on(settings, engine, backend)
        failed, *scheduled = _jobs(engine, JobKind.RECONCILE)
        assert failed.state == JobState.DEAD
        assert failed.last_error == "internal error: KeyError"
        assert [job.state for job in scheduled] == [JobState.PENDING]


@dataclass
class CrashingPageBackend(MemoryBackend):
    """Its second page of members raises what an adapter never should (a bug)."""

    def members(self, cursor: str | None = None) -> MembersPage:
        if cursor:
            raise KeyError("entries")
        return super().members(cursor)


@dataclass
class GarbledPageBackend(MemoryBackend):
    """Its second page of members is not what the API promises (a proxy's page, say)."""

    def members(self, cursor: str | None = None) -> MembersPage:
        if cursor:
            raise PermanentSyncError("list members: unexpected answer", response="200 <html>")
        return super().members(cursor)


@dataclass
class SlowPagesBackend(MemoryBackend):
    """A list read one member a page, each page taking a while; `on_page` sees each."""

    page_size: int = 1
    delay: float = 0.05
    pages: int = 0
    on_page: Callable[[int], None] | None = None

    def members(self, cursor: str | None = None) -> MembersPage:
        self.pages += 1
        if self.on_page is not None:
            self.on_page(self.pages)
        time.sleep(self.delay)
        return MemoryBackend.members(self, cursor)


class TestLongReconciliation:
    """A large list is hundreds of pages at the backend, minutes of reading."""

    def _reconciling(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine, members: int, **overrides: Any
    ) -> tuple[Settings, Worker, SlowPagesBackend]:
        settings = _app_without_worker(database_url, smtp, **overrides)
        backend = SlowPagesBackend()
        for n in range(members):
            address = f"member{n:03}@example.org"
            backend.held[address] = (address, True, {})
        worker = _mail_worker(settings, engine, backend)
        with db.session_scope(engine) as session:
            outbox.schedule_reconcile(
                session, list_slug="bluehats", now=utcnow(), delay=timedelta(0)
            )
        return settings, worker, backend

    def test_mails_go_out_while_a_reconciliation_reads_the_list(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings, worker, backend = self._reconciling(database_url, smtp, engine, 60)
        mailed_by_page: dict[int, int] = {}
        with TestClient(create_app(settings)) as client:

            def on_page(page: int) -> None:
                if page == 5:  # someone signs up while the list is being read
                    response = client.post(
                        "/v1/lists/bluehats/subscriptions", json={"email": "new@example.org"}
                    )
                    assert response.status_code == 202
                mailed_by_page[page] = len(smtp.messages)

            backend.on_page = on_page
            worker.run_once()
        assert backend.pages == 60
        assert [job.state for job in _jobs(engine, JobKind.RECONCILE)] == [JobState.DONE]
        # Mailed while the reconciliation went on, not after it.
        assert mailed_by_page[60] == 1
        assert min(page for page, mailed in mailed_by_page.items() if mailed) < 60

    def test_the_worker_s_heartbeat_stays_fresh_while_it_reads_a_long_list(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        # Stale, the API running the worker in-process answered /readyz 503 worker_stale
        # (and newsletter_workers_alive fell to 0) for as long as the list was read.
        settings, worker, backend = self._reconciling(
            database_url, smtp, engine, 30, worker_heartbeat_timeout="1s"
        )
        backend.delay = 0.1
        ages: list[float] = []

        def on_page(_page: int) -> None:
            with db.session_scope(engine) as session:
                seen = heartbeat.last_seen(session, worker_id=worker.name)
            assert seen is not None
            ages.append((utcnow() - seen).total_seconds())

        backend.on_page = on_page
        with TestClient(create_app(settings)):  # the list, declared at start
            worker.beat()  # as `start` does
            worker.run_once()
        assert backend.pages == 30
        assert max(ages) < 1.0, ages

    def test_a_stop_breaks_a_reconciliation_off_and_gives_its_job_back(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        _, worker, backend = self._reconciling(database_url, smtp, engine, 60)
        backend.on_page = lambda page: worker.request_stop() if page == 5 else None
        started = time.monotonic()
        worker.run_once()
        assert time.monotonic() - started < 5
        assert backend.pages < 10
        [job] = _jobs(engine, JobKind.RECONCILE)
        assert (job.state, job.attempts, job.leased_by) == (JobState.PENDING, 0, None)
        assert backend.calls == []  # nothing applied from a partial reading


@dataclass
class OverlapBackend(MemoryBackend):
    """One member per call, each taking a while; counts the calls in flight together."""

    max_batch: int = 1
    delay: float = 0.05
    in_flight: int = 0
    most_in_flight: int = 0
    spans: list[tuple[str, str, float, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _timed(self, name: str, address: str, call: Callable[[], str]) -> str:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        started = time.monotonic()
        try:
            time.sleep(self.delay)
            return call()
        finally:
            with self.lock:
                self.in_flight -= 1
                self.spans.append((name, address, started, time.monotonic()))

    def add(self, members: Sequence[Member]) -> str:
        return self._timed("add", members[0].email, lambda: MemoryBackend.add(self, members))

    def unsubscribe(self, address: str) -> str:
        return self._timed("unsubscribe", address, lambda: MemoryBackend.unsubscribe(self, address))


def _planned(job_id: int, action: sync.Action, address: str) -> sync.Planned:
    from app import outbox

    job = outbox.ClaimedJob(
        id=job_id, kind=JobKind.SYNC, payload={}, attempt=1, created_at=utcnow()
    )
    member = None
    if action == sync.Action.ADD:
        member = Member(email=address, locale="fr", unsubscribe_url="https://x.example/u")
    return sync.Planned(
        job=job, action=action, list_slug="bluehats", address=address, member=member
    )


class TestBackendsWithoutBulkCalls:
    def test_single_member_calls_overlap_up_to_the_worker_concurrency(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = _app_without_worker(database_url, smtp, worker_concurrency=3)
        backend = OverlapBackend()
        worker = _mail_worker(settings, engine, backend)
        _confirmed_rows(engine, count=12)
        _drain(worker)
        worker.stop()
        assert len(backend.held) == 12
        assert all(job.state == JobState.DONE for job in _jobs(engine))
        assert 1 < backend.most_in_flight <= 3

    def test_calls_about_one_address_keep_their_order(self) -> None:
        backend = OverlapBackend()
        # Listed leave first: additions still go first, as with one call at a time.
        planned = [
            _planned(1, sync.Action.UNSUBSCRIBE, "same@example.org"),
            _planned(2, sync.Action.ADD, "Same@example.org"),
            *[_planned(10 + n, sync.Action.ADD, f"other-{n}@example.org") for n in range(6)],
        ]
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = sync.execute(planned, backend_for=lambda slug: backend, pool=pool)
        assert sorted(results) == [1, 2, *range(10, 16)]
        assert all(result.error is None for result in results.values())
        same = sorted(
            (span for span in backend.spans if span[1].casefold() == "same@example.org"),
            key=lambda span: span[2],
        )
        assert [span[0] for span in same] == ["add", "unsubscribe"]
        assert same[0][3] <= same[1][2], "the unsubscribe began before the add had ended"
        assert backend.most_in_flight > 1
        assert backend.held["same@example.org"][1] is False

    def test_a_stop_leaves_the_calls_not_begun_to_a_later_round(self) -> None:
        backend = OverlapBackend()
        planned = [_planned(n, sync.Action.ADD, f"m-{n}@example.org") for n in range(8)]
        stop = threading.Event()
        original = backend.add

        def add_then_stop(members: Sequence[Member]) -> str:
            stop.set()
            return original(members)

        backend.add = add_then_stop  # type: ignore[method-assign]
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = sync.execute(
                planned, backend_for=lambda slug: backend, should_stop=stop.is_set, pool=pool
            )
        # Calls begun before the stop (one per thread at most) finish; no other starts,
        # and the jobs without a result are given back by the worker.
        assert 1 <= len(results) <= 2
        assert all(result.error is None for result in results.values())
        assert sorted(backend.held) == sorted(f"m-{n}@example.org" for n in results)
        assert len(backend.calls) == len(results)


class TestDeadJobsPutToRest:
    """A dead sync whose work is done since leaves the failed jobs, done, its history kept
    (its dead attempt, then one `superseded`), on a backend that keeps those who leave as
    unsubscribed (Mailgun, listmonk); Mailman's case is in test_mailman.py."""

    def _worker(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> tuple[Settings, Worker, MemoryBackend]:
        settings = _app_without_worker(database_url, smtp)
        backend = MemoryBackend()
        return settings, _mail_worker(settings, engine, backend), backend

    def _reconcile(self, worker: Worker, engine: sa.Engine) -> None:
        with db.session_scope(engine) as session:
            outbox.request_reconcile(session, list_slug="bluehats", now=utcnow())
        _drain(worker)

    def _dead(self, engine: sa.Engine) -> list[OutboxJob]:
        return [job for job in _jobs(engine) if job.state == JobState.DEAD]

    def test_an_unsubscription_the_backend_shows_done(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings, worker, backend = self._worker(database_url, smtp, engine)
        email = "uma@example.org"
        with TestClient(create_app(settings)) as client:
            _confirm(client, worker, smtp, email)
            _drain(worker)
            client.post("/v1/lists/bluehats/unsubscriptions", json={"email": email})
            _drain(worker)
            leave = link_in(smtp.mail_to(email, link="unsubscribe"), "unsubscribe")
            backend.fail_next = [PermanentSyncError("HTTP 400: refused", status=400)]
            client.post(leave, headers={"accept": "application/json"})
            _drain(worker)
        [dead] = self._dead(engine)
        # Unsubscribed at the backend meanwhile (its own link): nothing left to do.
        backend.held[email] = (email, False, {})
        self._reconcile(worker, engine)
        assert self._dead(engine) == []
        assert _attempts_of(engine, dead.id) == ["dead", "superseded"]

    def test_an_erasures_removal_a_reconciliation_made_again(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings, worker, backend = self._worker(database_url, smtp, engine)
        email = "erin@example.org"
        with TestClient(create_app(settings)) as client:
            _confirm(client, worker, smtp, email)
            _drain(worker)
        _erase(engine, settings, email)
        backend.fail_next = [PermanentSyncError("HTTP 400: refused", status=400)]
        _drain(worker)
        [dead] = self._dead(engine)
        assert dead.payload["action"] == "remove"
        # Still held there: the reconciliation removes it (the address was erased here),
        # and that removal, done, puts the dead one to rest.
        self._reconcile(worker, engine)
        assert email not in backend.held
        assert self._dead(engine) == []
        assert _attempts_of(engine, dead.id) == ["dead", "superseded"]

    def test_an_erasures_removal_is_not_put_to_rest_by_a_roster_without_the_member(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        # The roster shows a list's members; the backend may keep the person beyond it (a
        # Mailman address record, a listmonk subscriber): only a removal done settles it.
        settings, worker, backend = self._worker(database_url, smtp, engine)
        email = "eve@example.org"
        with TestClient(create_app(settings)) as client:
            _confirm(client, worker, smtp, email)
            _drain(worker)
        _erase(engine, settings, email)
        backend.fail_next = [PermanentSyncError("HTTP 400: refused", status=400)]
        _drain(worker)
        [dead] = self._dead(engine)
        backend.held.pop(email)
        self._reconcile(worker, engine)
        assert [job.id for job in self._dead(engine)] == [dead.id]
        assert _attempts_of(engine, dead.id) == ["dead"]
