"""The outbox's own verbs against a real database: claim, lease, release, finish, fail, backoff.

Times are passed explicitly (`now=`), so leases expire without sleeping.
"""

from __future__ import annotations

import statistics
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlmodel import col, select

from app import db, outbox
from app.models import AttemptOutcome, DeliveryAttempt, JobKind, JobState, OutboxJob
from tests.conftest import POSTGRES_URL

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
LEASE = timedelta(seconds=10)
BASE = timedelta(seconds=1)
CAP = timedelta(seconds=60)


def enqueue_jobs(engine: sa.Engine, count: int, *, delay: timedelta = timedelta(0)) -> list[int]:
    with db.session_scope(engine) as session:
        return [
            outbox.enqueue(session, kind=JobKind.MAIL, payload={"n": n}, now=T0, delay=delay)
            for n in range(count)
        ]


def claim(
    engine: sa.Engine, *, worker: str, now: datetime, limit: int = 10
) -> list[outbox.ClaimedJob]:
    with db.session_scope(engine) as session:
        return outbox.claim(session, worker=worker, now=now, lease=LEASE, limit=limit)


def job_row(engine: sa.Engine, job_id: int) -> OutboxJob:
    with db.session_scope(engine) as session:
        job = session.get(OutboxJob, job_id)
        assert job is not None
        return job


def all_jobs(engine: sa.Engine) -> list[OutboxJob]:
    with db.session_scope(engine) as session:
        return list(session.exec(select(OutboxJob).order_by(col(OutboxJob.id))).all())


def attempts_of(engine: sa.Engine, job_id: int) -> list[DeliveryAttempt]:
    with db.session_scope(engine) as session:
        query = (
            select(DeliveryAttempt)
            .where(DeliveryAttempt.job_id == job_id)
            .order_by(col(DeliveryAttempt.id))
        )
        return list(session.exec(query).all())


def finish(engine: sa.Engine, job: outbox.ClaimedJob, *, worker: str, now: datetime) -> None:
    with db.session_scope(engine) as session:
        outbox.finish(session, job=job, worker=worker, started_at=now, now=now, response="250 ok")


def fail(
    engine: sa.Engine,
    job: outbox.ClaimedJob,
    *,
    worker: str,
    now: datetime,
    retryable: bool,
    max_attempts: int = 5,
) -> JobState:
    with db.session_scope(engine) as session:
        return outbox.fail(
            session,
            job=job,
            worker=worker,
            error="451 try later" if retryable else "550 no such user",
            retryable=retryable,
            started_at=now,
            now=now,
            max_attempts=max_attempts,
            base_delay=BASE,
            max_delay=CAP,
        )


class TestWakeAfterCommit:
    """A commit that wrote a job wakes the workers of this process, once; nothing else does."""

    def test_a_commit_with_a_job_wakes_once_and_the_next_without_does_not(
        self, engine: sa.Engine
    ) -> None:
        wakes: list[str] = []
        with db.session_scope(engine, on_outbox_commit=lambda: wakes.append("a")) as session:
            outbox.enqueue(session, kind=JobKind.MAIL, payload={}, now=T0)
            outbox.enqueue(session, kind=JobKind.MAIL, payload={}, now=T0)
            assert wakes == []  # not before the jobs are stored
        assert wakes == ["a"]

        with db.session_scope(engine, on_outbox_commit=lambda: wakes.append("b")) as session:
            session.exec(select(OutboxJob)).all()
        assert wakes == ["a"]

    def test_a_rolled_back_job_wakes_nobody(self, engine: sa.Engine) -> None:
        wakes: list[str] = []

        def failing_request() -> None:
            with db.session_scope(engine, on_outbox_commit=lambda: wakes.append("x")) as session:
                outbox.enqueue(session, kind=JobKind.MAIL, payload={}, now=T0)
                raise RuntimeError("the request failed")

        with pytest.raises(RuntimeError):
            failing_request()

        assert wakes == []
        assert all_jobs(engine) == []

    def test_each_session_wakes_its_own_callback(self, engine: sa.Engine) -> None:
        wakes: list[str] = []
        with db.session_scope(engine, on_outbox_commit=lambda: wakes.append("first")) as first:
            outbox.enqueue(first, kind=JobKind.MAIL, payload={}, now=T0)
        with db.session_scope(engine) as plain:
            outbox.enqueue(plain, kind=JobKind.MAIL, payload={}, now=T0)
        with db.session_scope(engine, on_outbox_commit=lambda: wakes.append("third")) as third:
            outbox.enqueue(third, kind=JobKind.MAIL, payload={}, now=T0)

        assert wakes == ["first", "third"]


class TestBackoff:
    def test_first_retry_waits_exactly_the_base_delay(self) -> None:
        assert {outbox.backoff(attempt=1, base=BASE, cap=CAP) for _ in range(20)} == {BASE}

    def test_delay_stays_between_base_and_cap_and_under_the_exponential_ceiling(self) -> None:
        for attempt in [*range(1, 41), 1000]:
            ceiling = min(CAP, BASE * 2 ** min(attempt - 1, 30))
            for _ in range(50):
                delay = outbox.backoff(attempt=attempt, base=BASE, cap=CAP)
                assert BASE <= delay <= ceiling <= CAP, (attempt, delay)

    def test_delay_grows_with_attempts_until_the_cap(self) -> None:
        def mean_seconds(attempt: int) -> float:
            samples = [outbox.backoff(attempt=attempt, base=BASE, cap=CAP) for _ in range(400)]
            return statistics.fmean(delay.total_seconds() for delay in samples)

        # Full jitter: uniform in [1, 2^(n-1)] seconds, so the means are about 1, 2.5, 8.5, 30.5.
        means = [mean_seconds(attempt) for attempt in (1, 3, 5, 10)]
        assert means == sorted(means)
        assert means[0] == pytest.approx(1.0)
        assert means[1] == pytest.approx(2.5, abs=0.5)
        assert means[2] == pytest.approx(8.5, abs=1.5)
        assert means[3] == pytest.approx(30.5, abs=5)
        # Past the cap the delay stops growing.
        assert mean_seconds(30) == pytest.approx(30.5, abs=5)


class TestRetryAfter:
    @pytest.mark.parametrize(
        ("seconds", "max_delay", "waited"),
        [
            (120.0, CAP, timedelta(seconds=120)),  # past the backoff's cap: as asked
            (0.0, CAP, timedelta(0)),
            (-5.0, CAP, timedelta(0)),
            (86_400.0 * 30, CAP, timedelta(days=1)),  # a month: a day
            (1e14, CAP, timedelta(days=1)),  # no OverflowError
            (86_400.0 * 3, timedelta(days=2), timedelta(days=2)),  # a longer cap is the limit
        ],
    )
    def test_a_backends_wait_is_honoured_up_to_a_day_or_the_cap(
        self, seconds: float, max_delay: timedelta, waited: timedelta
    ) -> None:
        assert outbox.retry_after_delay(seconds, max_delay=max_delay) == waited


class TestClaim:
    def test_claim_leases_due_jobs_and_counts_the_attempt(self, engine: sa.Engine) -> None:
        [job_id] = enqueue_jobs(engine, 1)
        [claimed] = claim(engine, worker="w1", now=T0)
        assert (claimed.id, claimed.attempt, claimed.payload) == (job_id, 1, {"n": 0})
        row = job_row(engine, job_id)
        assert row.state == JobState.RUNNING
        assert row.attempts == 1
        assert row.leased_by == "w1"
        assert row.lease_until == T0 + LEASE
        # Leased: nobody else gets it, not even the same worker.
        assert claim(engine, worker="w2", now=T0) == []
        assert claim(engine, worker="w1", now=T0) == []

    def test_job_is_not_claimed_before_it_is_due(self, engine: sa.Engine) -> None:
        [job_id] = enqueue_jobs(engine, 1, delay=timedelta(seconds=30))
        assert claim(engine, worker="w1", now=T0 + timedelta(seconds=29)) == []
        assert [job.id for job in claim(engine, worker="w1", now=T0 + timedelta(seconds=30))] == [
            job_id
        ]

    def test_claim_takes_at_most_the_limit_oldest_first(self, engine: sa.Engine) -> None:
        ids = enqueue_jobs(engine, 5)
        assert [job.id for job in claim(engine, worker="w1", now=T0, limit=2)] == ids[:2]
        assert [job.id for job in claim(engine, worker="w2", now=T0, limit=10)] == ids[2:]

    def test_two_threads_claiming_concurrently_never_share_a_job(self, engine: sa.Engine) -> None:
        ids = enqueue_jobs(engine, 50)
        barrier = threading.Barrier(2)
        taken: dict[str, list[int]] = {"w1": [], "w2": []}
        errors: list[BaseException] = []

        def drain(worker: str) -> None:
            try:
                barrier.wait(timeout=10)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    jobs = claim(engine, worker=worker, now=T0, limit=3)
                    if not jobs:
                        return
                    taken[worker].extend(job.id for job in jobs)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=drain, args=(name,)) for name in taken]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []

        assert set(taken["w1"]).isdisjoint(taken["w2"])
        assert sorted(taken["w1"] + taken["w2"]) == ids
        for job in all_jobs(engine):
            assert job.state == JobState.RUNNING
            assert job.attempts == 1
            assert job.id in taken[job.leased_by or ""]

    @pytest.mark.skipif(
        not POSTGRES_URL, reason="SQLite has one writer: a second claim waits for the first"
    )
    def test_a_claim_skips_rows_locked_by_an_uncommitted_claim(self, engine: sa.Engine) -> None:
        ids = enqueue_jobs(engine, 50)
        first = db.new_session(engine)
        second = db.new_session(engine)
        try:
            held = outbox.claim(first, worker="w1", now=T0, lease=LEASE, limit=10)
            # Were the rows waited for instead of skipped, this would fail after 5 s.
            second.connection().exec_driver_sql("SET LOCAL lock_timeout = '5s'")
            rest = outbox.claim(second, worker="w2", now=T0, lease=LEASE, limit=50)
            second.commit()
            first.commit()
        finally:
            first.close()
            second.close()
        assert [job.id for job in held] == ids[:10]
        assert [job.id for job in rest] == ids[10:]
        leased_by = {job.id: job.leased_by for job in all_jobs(engine)}
        assert {leased_by[job_id] for job_id in ids[:10]} == {"w1"}
        assert {leased_by[job_id] for job_id in ids[10:]} == {"w2"}


class TestLease:
    def test_running_job_is_claimable_again_once_its_lease_expires(self, engine: sa.Engine) -> None:
        [job_id] = enqueue_jobs(engine, 1)
        claim(engine, worker="dead-worker", now=T0)
        assert claim(engine, worker="w2", now=T0 + LEASE - timedelta(seconds=1)) == []
        [again] = claim(engine, worker="w2", now=T0 + LEASE)
        assert (again.id, again.attempt) == (job_id, 2)
        row = job_row(engine, job_id)
        assert row.state == JobState.RUNNING
        assert row.leased_by == "w2"
        assert row.lease_until == T0 + 2 * LEASE

    def test_finish_by_a_worker_that_lost_its_lease_keeps_the_new_holders_state(
        self, engine: sa.Engine
    ) -> None:
        [job_id] = enqueue_jobs(engine, 1)
        [slow] = claim(engine, worker="slow", now=T0)
        [fast] = claim(engine, worker="fast", now=T0 + LEASE)

        finish(engine, slow, worker="slow", now=T0 + LEASE + timedelta(seconds=1))
        row = job_row(engine, job_id)
        assert row.state == JobState.RUNNING
        assert row.leased_by == "fast"
        assert row.lease_until == T0 + 2 * LEASE
        assert row.finished_at is None
        assert row.attempts == 2

        finish(engine, fast, worker="fast", now=T0 + LEASE + timedelta(seconds=2))
        row = job_row(engine, job_id)
        assert row.state == JobState.DONE
        assert row.finished_at == T0 + LEASE + timedelta(seconds=2)
        # Both sends happened and both are on record, each under its own attempt.
        assert [(a.attempt, a.worker, a.outcome) for a in attempts_of(engine, job_id)] == [
            (1, "slow", AttemptOutcome.SUCCESS),
            (2, "fast", AttemptOutcome.SUCCESS),
        ]

    def test_failure_by_a_worker_that_lost_its_lease_keeps_the_new_holders_state(
        self, engine: sa.Engine
    ) -> None:
        [job_id] = enqueue_jobs(engine, 1)
        [slow] = claim(engine, worker="slow", now=T0)
        claim(engine, worker="fast", now=T0 + LEASE)

        state = fail(engine, slow, worker="slow", now=T0 + LEASE, retryable=False)
        assert state == JobState.RUNNING
        row = job_row(engine, job_id)
        assert row.state == JobState.RUNNING
        assert row.leased_by == "fast"
        assert row.last_error is None


class TestRelease:
    def test_release_gives_the_job_back_without_counting_the_attempt(
        self, engine: sa.Engine
    ) -> None:
        [job_id] = enqueue_jobs(engine, 1)
        claim(engine, worker="w1", now=T0)
        later = T0 + timedelta(seconds=3)
        with db.session_scope(engine) as session:
            assert outbox.release(session, job_ids=[job_id], worker="w1", now=later) == 1
        row = job_row(engine, job_id)
        assert row.state == JobState.PENDING
        assert row.attempts == 0
        assert row.leased_by is None
        assert row.lease_until is None
        assert row.next_attempt_at == later
        assert attempts_of(engine, job_id) == []
        [again] = claim(engine, worker="w2", now=later)
        assert again.attempt == 1

    def test_release_by_another_worker_changes_nothing(self, engine: sa.Engine) -> None:
        [job_id] = enqueue_jobs(engine, 1)
        claim(engine, worker="w1", now=T0)
        with db.session_scope(engine) as session:
            assert outbox.release(session, job_ids=[job_id], worker="w2", now=T0) == 0
        row = job_row(engine, job_id)
        assert (row.state, row.attempts, row.leased_by) == (JobState.RUNNING, 1, "w1")


class TestFail:
    def test_retryable_failure_schedules_a_retry_with_backoff(self, engine: sa.Engine) -> None:
        [job_id] = enqueue_jobs(engine, 1)
        [job] = claim(engine, worker="w1", now=T0)
        assert fail(engine, job, worker="w1", now=T0, retryable=True) == JobState.PENDING
        row = job_row(engine, job_id)
        assert row.state == JobState.PENDING
        assert row.last_error == "451 try later"
        assert row.leased_by is None
        assert row.next_attempt_at == T0 + BASE
        [attempt] = attempts_of(engine, job_id)
        assert (attempt.attempt, attempt.outcome, attempt.error) == (
            1,
            AttemptOutcome.RETRY,
            "451 try later",
        )
        assert claim(engine, worker="w1", now=T0 + BASE - timedelta(milliseconds=1)) == []
        assert len(claim(engine, worker="w1", now=T0 + BASE)) == 1

    def test_permanent_failure_is_dead_at_once(self, engine: sa.Engine) -> None:
        [job_id] = enqueue_jobs(engine, 1)
        [job] = claim(engine, worker="w1", now=T0)
        assert fail(engine, job, worker="w1", now=T0, retryable=False) == JobState.DEAD
        row = job_row(engine, job_id)
        assert (row.state, row.finished_at, row.last_error) == (
            JobState.DEAD,
            T0,
            "550 no such user",
        )
        assert [a.outcome for a in attempts_of(engine, job_id)] == [AttemptOutcome.DEAD]
        assert claim(engine, worker="w1", now=T0 + timedelta(days=1)) == []

    def test_retryable_failure_on_the_last_attempt_is_dead(self, engine: sa.Engine) -> None:
        [job_id] = enqueue_jobs(engine, 1)
        now = T0
        for _ in range(3):
            [job] = claim(engine, worker="w1", now=now)
            fail(engine, job, worker="w1", now=now, retryable=True, max_attempts=3)
            now += CAP
        row = job_row(engine, job_id)
        assert (row.state, row.attempts) == (JobState.DEAD, 3)
        assert [a.outcome for a in attempts_of(engine, job_id)] == [
            AttemptOutcome.RETRY,
            AttemptOutcome.RETRY,
            AttemptOutcome.DEAD,
        ]
