"""Group commit (app/writer.py): requests share a transaction, and each keeps its own outcome."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from app import errors, outbox
from app.models import BlockedEntry, JobKind, utcnow
from app.writer import GroupWriter

request_tag: contextvars.ContextVar[str] = contextvars.ContextVar("request_tag", default="")


def _add(session: Session, *, value: str) -> str:
    session.add(
        BlockedEntry(
            kind="address", value=value, reason="test", created_at=utcnow(), created_by="test"
        )
    )
    session.flush()
    return value


def _add_then_refuse(session: Session, *, value: str) -> str:
    _add(session, value=value)
    raise errors.TokenUsed()


def _add_then_break(session: Session, *, value: str) -> str:
    _add(session, value=value)
    raise RuntimeError("a bug in this one request")


def _stored(engine: sa.Engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.execute(sa.text("SELECT value FROM blocked_entry")).scalars())


class _Gate:
    """Holds the writer thread in its first unit until the others are queued behind it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, session: Session, *, value: str) -> str:
        self.entered.set()
        assert self.release.wait(10)
        return _add(session, value=value)


async def _batch(writer: GroupWriter, calls: list[tuple[Any, str]]) -> list[Any]:
    """Run `calls` so that all but the first land in one batch, in order."""
    gate = _Gate()
    first = asyncio.ensure_future(writer.run(gate, value="gate@example.org"))
    await asyncio.to_thread(gate.entered.wait, 10)
    tasks = [asyncio.ensure_future(writer.run(work, value=value)) for work, value in calls]
    await asyncio.sleep(0.05)  # every unit in the queue before the writer looks again
    gate.release.set()
    await first
    return list(await asyncio.gather(*tasks, return_exceptions=True))


def _in_one_batch(
    engine: sa.Engine, calls: list[tuple[Any, str]]
) -> tuple[list[Any], list[object]]:
    """`calls` queued behind the gate: their results, and the engine's commits. One writer
    thread, so that the calls make one batch on any database."""
    commits: list[object] = []
    sa.event.listen(engine, "commit", commits.append)
    writer = GroupWriter(engine, threads=1)
    try:
        results = asyncio.run(_batch(writer, calls))
    finally:
        writer.stop()
    return results, commits


def test_a_batch_commits_once_and_a_refused_request_undoes_only_its_own_writes(
    engine: sa.Engine,
) -> None:
    results, commits = _in_one_batch(
        engine,
        [
            (_add, "a@example.org"),
            (_add_then_refuse, "refused@example.org"),
            (_add, "b@example.org"),
        ],
    )
    assert results[0] == "a@example.org"
    assert isinstance(results[1], errors.TokenUsed)
    assert results[2] == "b@example.org"
    assert _stored(engine) == {"gate@example.org", "a@example.org", "b@example.org"}
    # The gate's batch, then one commit for the three queued behind it.
    assert len(commits) == 2


def _queue_mail(session: Session, *, value: str) -> str:
    outbox.enqueue(session, kind=JobKind.MAIL, payload={"to": value}, now=utcnow())
    return value


@pytest.mark.parametrize(
    "calls",
    [
        [(_add_then_refuse, "refused@example.org"), (_queue_mail, "a@example.org")],
        [(_queue_mail, "a@example.org"), (_add_then_refuse, "refused@example.org")],
    ],
    ids=["refused-first", "refused-last"],
)
def test_a_batch_that_queued_a_job_wakes_the_workers_once_after_its_commit(
    engine: sa.Engine, calls: list[tuple[Any, str]]
) -> None:
    wakes: list[int] = []
    writer = GroupWriter(engine, threads=1, on_outbox_commit=lambda: wakes.append(len(wakes)))
    try:
        results = asyncio.run(_batch(writer, calls))
    finally:
        writer.stop()

    assert sum(isinstance(result, errors.TokenUsed) for result in results) == 1
    assert wakes == [0]  # the gate's batch queued nothing; the other, one job and one wake


def test_refusals_in_a_row_first_and_last_undo_only_their_own_writes(
    engine: sa.Engine,
) -> None:
    results, commits = _in_one_batch(
        engine,
        [
            (_add_then_refuse, "r1@example.org"),
            (_add, "a@example.org"),
            (_add_then_refuse, "r2@example.org"),
            (_add_then_refuse, "r3@example.org"),
            (_add, "b@example.org"),
            (_add, "c@example.org"),
            (_add_then_refuse, "r4@example.org"),
        ],
    )
    refused = [isinstance(result, errors.TokenUsed) for result in results]
    assert refused == [True, False, True, True, False, False, True]
    assert _stored(engine) == {
        "gate@example.org",
        "a@example.org",
        "b@example.org",
        "c@example.org",
    }
    assert len(commits) == 2  # the gate's, then one for the batch: none ran again alone


def test_a_broken_request_fails_alone_and_the_others_are_stored(engine: sa.Engine) -> None:
    writer = GroupWriter(engine, threads=1)
    try:
        results = asyncio.run(
            _batch(
                writer,
                [
                    (_add, "a@example.org"),
                    (_add_then_break, "broken@example.org"),
                    (_add, "b@example.org"),
                ],
            )
        )
    finally:
        writer.stop()
    assert results[0] == "a@example.org"
    assert isinstance(results[1], RuntimeError)
    assert results[2] == "b@example.org"
    assert _stored(engine) == {"gate@example.org", "a@example.org", "b@example.org"}


def test_the_answer_comes_after_the_commit_with_the_request_context(engine: sa.Engine) -> None:
    seen: list[tuple[str, set[str]]] = []

    def look(session: Session, *, value: str) -> str:
        _add(session, value=value)
        return request_tag.get()

    async def one(tag: str, value: str) -> str:
        request_tag.set(tag)
        result = await writer.run(look, value=value)
        # Answered: the row is visible to any other connection.
        seen.append((result, _stored(engine)))
        return result

    async def main() -> list[str]:
        return list(
            await asyncio.gather(one("first", "a@example.org"), one("second", "b@example.org"))
        )

    writer = GroupWriter(engine)
    try:
        tags = asyncio.run(main())
    finally:
        writer.stop()
    assert tags == ["first", "second"]
    for tag, stored in seen:
        assert {"first": "a@example.org", "second": "b@example.org"}[tag] in stored


@pytest.mark.parametrize("threads", [1, 4])
def test_stop_finishes_what_is_queued(engine: sa.Engine, threads: int) -> None:
    writer = GroupWriter(engine, threads=threads)

    async def main() -> list[str]:
        return list(
            await asyncio.gather(*(writer.run(_add, value=f"{n}@example.org") for n in range(20)))
        )

    assert len(asyncio.run(main())) == 20
    writer.stop()
    assert len(_stored(engine)) == 20


@pytest.mark.parametrize("size", [1, 3])
def test_a_lost_database_fails_every_request_of_the_batch(size: int, tmp_path: Any) -> None:
    broken = sa.create_engine(f"sqlite:///{tmp_path}/missing/dir/none.db")
    writer = GroupWriter(broken)

    async def main() -> list[Any]:
        return list(
            await asyncio.gather(
                *(writer.run(_add, value=f"{n}@example.org") for n in range(size)),
                return_exceptions=True,
            )
        )

    try:
        results = asyncio.run(main())
    finally:
        writer.stop()
    assert len(results) == size
    assert all(isinstance(result, sa.exc.OperationalError) for result in results)


def test_waiting_counts_the_requests_queued_or_under_way_until_answered(
    engine: sa.Engine,
) -> None:
    """What the in-process worker reads to give way to requests (app/main.py)."""
    writer = GroupWriter(engine, threads=1)
    seen: list[int] = []

    async def scenario() -> None:
        gate = _Gate()
        first = asyncio.ensure_future(writer.run(gate, value="gate@example.org"))
        await asyncio.to_thread(gate.entered.wait, 10)
        seen.append(writer.waiting)  # the gate, under way
        queued = [
            asyncio.ensure_future(writer.run(_add, value=f"{n}@example.org")) for n in range(3)
        ]
        await asyncio.sleep(0)
        seen.append(writer.waiting)  # and three behind it
        gate.release.set()
        await first
        await asyncio.gather(*queued)
        seen.append(writer.waiting)
        with pytest.raises(errors.TokenUsed):
            await writer.run(_add_then_refuse, value="refused@example.org")
        seen.append(writer.waiting)  # a refusal is answered too

    try:
        asyncio.run(scenario())
    finally:
        writer.stop()
    assert seen == [1, 4, 0, 0]
