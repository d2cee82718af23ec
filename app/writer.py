"""Group commit: the public write requests of one process share transactions.

A subscription or a confirmation is a few short statements; committing each in its own
transaction, from its own pool thread, cost more than the statements themselves (one
BEGIN and COMMIT each, and, on SQLite, every thread queueing on the one write lock).
Here a writer thread takes the requests waiting in the queue, up to `max_batch`, and
runs each as a unit of work inside a savepoint of one transaction. The callers are
answered only after the commit, so a 2xx still means stored. Under a light load a batch
is a single request, and nothing waits for others to come.

A unit refuses a request by raising a `DomainError` (unknown link, link used...): its
savepoint is rolled back, its caller gets the error, the others go on. Any other error
(a bug, a constraint, a deadlock between replicas) rolls the whole transaction back and
each unit of the batch runs again alone, in its own transaction, so only the unit at
fault fails. When the database is gone, the batch fails as a whole with that error.

The rows nobody reads back before the commit (ledger events, mail jobs, confirmation
tokens: `db.defer_inserts`) are written at the commit, one statement a table for the
whole batch; a refused unit's are undone with its savepoint.

The savepoints are the driver's own statements, not the ORM's nested transactions:
those cost about a quarter of a subscription's time. So a refused unit's objects are
taken out of the session (`expunge_all`) rather than expired one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlmodel import Session

from app import db, errors

log = logging.getLogger(__name__)

T = TypeVar("T")

# PostgreSQL: deadlock_detected, serialization_failure. Worth one more try, one by one.
_RETRY_ALONE = {"40P01", "40001"}


@dataclass(slots=True)
class _Unit:
    work: Callable[..., Any]
    kwargs: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    # The request's context (its request id, for the log lines the work writes).
    context: contextvars.Context
    outcome: tuple[bool, Any] = field(default=(False, None))


class GroupWriter:
    """Writer threads for one engine in this process; `await writer.run(fn, **kwargs)` calls
    `fn(session, **kwargs)` in a shared transaction and returns its result after commit.

    SQLite takes one writer at a time: one thread. PostgreSQL runs transactions side by
    side, and a batch there spends most of its time waiting for the server's answers (a
    round trip per statement): `threads` (4 by default) batches are under way at once.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        on_outbox_commit: Callable[[], None] | None = None,
        max_batch: int = 64,
        threads: int | None = None,
    ) -> None:
        self.engine = engine
        self.on_outbox_commit = on_outbox_commit
        self.max_batch = max_batch
        self.threads = threads or (1 if engine.dialect.name == "sqlite" else 4)
        self._queue: queue.SimpleQueue[_Unit | None] = queue.SimpleQueue()
        self._running: list[threading.Thread] = []
        self._start_lock = threading.Lock()
        # Changed by the event loops' threads only; read by anyone.
        self._waiting = 0

    async def run(self, work: Callable[..., T], /, **kwargs: Any) -> T:
        self._ensure_started()
        loop = asyncio.get_running_loop()
        unit = _Unit(
            work=work,
            kwargs=kwargs,
            loop=loop,
            future=loop.create_future(),
            context=contextvars.copy_context(),
        )
        self._waiting += 1
        try:
            self._queue.put(unit)
            result: T = await unit.future
        finally:
            self._waiting -= 1
        return result

    @property
    def waiting(self) -> int:
        """Requests whose writes are queued or under way: they wait for the database."""
        return self._waiting

    def stop(self) -> None:
        """Finish what is queued, then end the threads."""
        running = [thread for thread in self._running if thread.is_alive()]
        for _ in running:
            self._queue.put(None)  # each thread ends at the first it takes
        for thread in running:
            thread.join()
        self._running = []

    def _ensure_started(self) -> None:
        if self._running:
            return
        with self._start_lock:
            if not self._running:
                for n in range(self.threads):
                    thread = threading.Thread(
                        target=self._loop, name=f"group-writer-{n}", daemon=True
                    )
                    thread.start()
                    self._running.append(thread)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stopping = False
            while len(batch) < self.max_batch:
                try:
                    unit = self._queue.get_nowait()
                except queue.Empty:
                    break
                if unit is None:
                    stopping = True
                    break
                batch.append(unit)
            self._run_batch(batch)
            if stopping:
                return

    def _run_batch(self, batch: list[_Unit]) -> None:
        try:
            with db.session_scope(self.engine, on_outbox_commit=self.on_outbox_commit) as session:
                db.defer_inserts(session)
                savepoint = _Savepoint(session)
                for unit in batch:
                    unit.outcome = savepoint.run(unit)
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as e:
            if len(batch) > 1 and _sqlstate(e) in _RETRY_ALONE:
                self._retry_alone(batch)
            else:
                self._fail_all(batch, e)
            return
        except Exception as e:
            if len(batch) > 1:
                self._retry_alone(batch)
            else:
                self._fail_all(batch, e)
            return
        except BaseException as e:
            self._fail_all(batch, e)
            raise
        _answer_all(batch)

    def _retry_alone(self, batch: list[_Unit]) -> None:
        log.info("writer.batch_retried_alone size=%d", len(batch))
        for unit in batch:
            self._run_alone(unit)

    def _run_alone(self, unit: _Unit) -> None:
        try:
            with db.session_scope(self.engine, on_outbox_commit=self.on_outbox_commit) as session:
                unit.outcome = (True, unit.context.run(unit.work, session, **unit.kwargs))
        except Exception as e:
            unit.outcome = (False, e)
        _answer_all([unit])

    @staticmethod
    def _fail_all(batch: list[_Unit], error: BaseException) -> None:
        for unit in batch:
            unit.outcome = (False, error)
        _answer_all(batch)


class _Savepoint:
    """The units of one batch, each in its savepoint, at one statement a unit where it can.

    A unit that went through leaves its savepoint open: the next unit's `RELEASE` and
    `SAVEPOINT` go together (one round trip on PostgreSQL, whose driver takes the two in
    one string; SQLite's takes one statement at a time, and has no round trip), and the
    batch's COMMIT releases the last one. A refused unit rolls its savepoint back and
    releases it, so the next unit opens a new one.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self.open = False
        joined = session.get_bind().dialect.name == "postgresql"
        self.next = (
            ("RELEASE SAVEPOINT unit; SAVEPOINT unit",)
            if joined
            else ("RELEASE SAVEPOINT unit", "SAVEPOINT unit")
        )

    def run(self, unit: _Unit) -> tuple[bool, Any]:
        """Run one unit: (True, its result), or (False, the DomainError it refused with)."""
        session = self.session
        with contextlib.closing(session.connection().connection.cursor()) as cursor:
            for statement in self.next if self.open else ("SAVEPOINT unit",):
                cursor.execute(statement)
            self.open = True
            mark = db.deferred_mark(session)
            try:
                value = unit.context.run(unit.work, session, **unit.kwargs)
                session.flush()
            except errors.DomainError as e:
                db.undo_deferred(session, mark)
                cursor.execute("ROLLBACK TO SAVEPOINT unit")
                cursor.execute("RELEASE SAVEPOINT unit")
                self.open = False
                _forget(session)
                return False, e
        return True, value


def _forget(session: Session) -> None:
    """After a refused unit: what it loaded or changed may no longer match the rows, so
    later units of the batch read afresh (earlier units' results keep their values)."""
    outbox_written = session.info.get(db.OUTBOX_WRITTEN, False)
    session.expunge_all()
    session.info.clear()
    if outbox_written:
        session.info[db.OUTBOX_WRITTEN] = True


def _sqlstate(error: sa_exc.DBAPIError) -> str | None:
    state = getattr(error.orig, "sqlstate", None)
    return state if isinstance(state, str) else None


def _answer_all(batch: list[_Unit]) -> None:
    """Settle the units' futures with their outcomes: one wake-up of each event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Unit]] = {}
    for unit in batch:
        by_loop.setdefault(unit.loop, []).append(unit)
    for loop, units in by_loop.items():

        def settle(units: list[_Unit] = units) -> None:
            for unit in units:
                _settle(unit, *unit.outcome)

        # A closed loop (the server stopped before the answer) has nobody waiting.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle)


def _settle(unit: _Unit, ok: bool, value: Any) -> None:
    if unit.future.done():  # the request was cancelled meanwhile
        return
    if ok:
        unit.future.set_result(value)
    else:
        unit.future.set_exception(value)
