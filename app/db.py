"""Engine and sessions. SQLite (WAL, one writer at a time) by default, PostgreSQL by URL.

The boundary owns the commit: a request dependency or `session_scope()` commits on success
and rolls back on error; domain code only flushes.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.sql.compiler import SQLCompiler
from sqlmodel import Session

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql, sqlite

log = logging.getLogger(__name__)

# Session.info key set by the outbox when a job is written; read after commit to wake workers.
OUTBOX_WRITTEN = "outbox_written"


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    if url.startswith("sqlite:"):
        return _sqlite_engine(url)
    return sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=20,
        pool_pre_ping=True,
        pool_recycle=1800,
        # A server that does not answer (down, cut off) fails a request in seconds, not minutes.
        connect_args={"connect_timeout": 5},
    )


# How long a transaction waits for the write lock another process holds (busy_timeout).
LOCK_WAIT_S = 30.0
# The pause between two attempts to take it. SQLite's own busy handler sleeps 1, 2, 5, ...
# up to 100 ms between attempts: beside a busy `newsletter worker` process, whose short
# transactions follow each other closely, a request could sleep through every gap and wait
# over a second (measured: p99 1.5 s for confirmations). Polling this often costs a few
# microseconds an attempt and starts the transaction as soon as the lock is free.
LOCK_POLL_S = 0.0005


def _sqlite_engine(url: str) -> Engine:
    database = sa.engine.make_url(url).database
    if database and database != ":memory:":
        # A folder that cannot be made (a path mistyped, a folder of another user's) fails
        # the first connection, which an operator is shown (`unreachable`), not a traceback.
        with contextlib.suppress(OSError):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url,
        # The driver's own transaction handling is off; we begin explicitly below. Its
        # timeout is SQLite's busy timeout.
        connect_args={
            "check_same_thread": False,
            "isolation_level": None,
            "timeout": LOCK_WAIT_S,
        },
        pool_size=20,
        max_overflow=20,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        if engine in _checkpointed_apart:
            cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.close()

    _sqlite_writers[engine] = _WriterLock()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        # Take the write lock up front: a deferred transaction that reads and then writes
        # can fail with "database is locked" without waiting when another writer is active.
        raw = connection.connection.driver_connection
        assert isinstance(raw, sqlite3.Connection)
        try:
            _begin_immediate(raw)
        except sqlite3.Error as e:
            raise sa_exc.DBAPIError.instance(
                "BEGIN IMMEDIATE", None, e, sqlite3.Error, dialect=engine.dialect
            ) from e

    return engine


def _begin_immediate(raw: sqlite3.Connection) -> None:
    # Polled here, not in SQLite's busy handler, which is off meanwhile (~2 µs a pragma).
    _set_busy_timeout(raw, 0)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                # The primary code: extended ones (SQLITE_BUSY_RECOVERY...) wait alike.
                busy = e.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
                if not busy or time.monotonic() > deadline:
                    raise
            time.sleep(LOCK_POLL_S)
    finally:
        _set_busy_timeout(raw, LOCK_WAIT_S)


def _set_busy_timeout(raw: sqlite3.Connection, seconds: float) -> None:
    raw.execute(f"PRAGMA busy_timeout={int(seconds * 1000)}")


# SQLite copies the WAL back into the database file (a checkpoint: the pages, then two
# fsyncs) in whichever connection's commit takes the WAL past 1,000 pages. In the API that
# is the group writer's commit, and every request of its batch, and of the batches queued
# behind it, waited for the disk: under a steady load of confirmations, 5 to 7 % of the
# time the process had nothing to do. A `Checkpointer` does it in a thread of its own, with
# the GIL released, while the writer goes on appending to the WAL.
CHECKPOINT_PAUSE_S = 0.02
# No write for a while: look less often.
CHECKPOINT_IDLE_PAUSE_S = 0.25
# A passive checkpoint never waits, so under writes that never pause it may not catch up
# and the WAL, which restarts only once fully copied, keeps growing (longer reads too).
# Past this many pages (40 MB) it waits for the writer and copies everything once.
CHECKPOINT_RESTART_FRAMES = 10_000

_checkpointed_apart: weakref.WeakSet[Engine] = weakref.WeakSet()


@dataclass(frozen=True, slots=True)
class CheckpointPass:
    wal_frames: int  # pages in the WAL (-1: another checkpoint was running)
    copied: int  # of which copied back into the database file
    restarted: bool  # it waited for the writer, to let the WAL start over


class Checkpointer:
    """The WAL checkpoints of a SQLite engine's connections in this process, in a thread of
    their own; their commits no longer do it (`wal_autocheckpoint=0`). Other processes on
    the same file (a `newsletter worker`, the CLI) keep SQLite's automatic checkpoints.

    `start_for(engine)` is None for PostgreSQL or an in-memory database.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        pause: float = CHECKPOINT_PAUSE_S,
        idle_pause: float = CHECKPOINT_IDLE_PAUSE_S,
        restart_frames: int = CHECKPOINT_RESTART_FRAMES,
    ) -> None:
        path = _sqlite_file(engine)
        assert path is not None, "a checkpointer is for a SQLite database file"
        self.engine = engine
        self.path = path
        self.pause = pause
        self.idle_pause = idle_pause
        self.restart_frames = restart_frames
        self.passes = 0
        self.restarts = 0
        self._data_version: int | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def start_for(cls, engine: Engine) -> Checkpointer | None:
        if _sqlite_file(engine) is None:
            return None
        checkpointer = cls(engine)
        checkpointer.start()
        return checkpointer

    def start(self) -> None:
        _checkpointed_apart.add(self.engine)
        # Connections opened before this one still check-point as they commit.
        self.engine.dispose()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread; the engine's connections opened from now on checkpoint again."""
        self._stopping.set()
        _sqlite_writers[self.engine].wrote.set()  # out of an idle wait at once
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        _checkpointed_apart.discard(self.engine)
        self.engine.dispose()

    def checkpoint(self, connection: sqlite3.Connection) -> CheckpointPass:
        """One pass: copy what the WAL holds without waiting for anyone; if that leaves it
        over `restart_frames` pages, wait for the writer and copy it all."""
        _busy, frames, copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        restarted = frames >= self.restart_frames
        if restarted:
            # Between two transactions of this process's writers: SQLite's busy handler,
            # which RESTART waits in, would otherwise sleep through every gap between them.
            with _sqlite_writers[self.engine].for_checkpoint():
                restart = connection.execute("PRAGMA wal_checkpoint(RESTART)")
                _busy, frames, copied = restart.fetchone()
            self.restarts += 1
        self.passes += 1
        return CheckpointPass(wal_frames=frames, copied=copied, restarted=restarted)

    def _loop(self) -> None:
        connection = sqlite3.connect(
            self.path, timeout=LOCK_WAIT_S, isolation_level=None, check_same_thread=False
        )
        wrote = _sqlite_writers[self.engine].wrote
        idle = False
        try:
            while True:
                if idle:
                    # Nothing written since the last look: the next transaction of this
                    # process wakes it (another process's commits, at the idle pause). A
                    # writer that paused a moment, then wrote without pause, had the WAL
                    # grow for a whole idle pause: thousands of pages.
                    wrote.wait(self.idle_pause)
                else:
                    self._stopping.wait(self.pause)
                if self._stopping.is_set():
                    break
                wrote.clear()
                try:
                    self.checkpoint(connection)
                    idle = not self.written_since_last_look(connection)
                except sqlite3.Error as e:
                    # The commits no longer checkpoint: keep trying, less often.
                    log.warning("sqlite.checkpoint_failed error=%s", e)
                    self._stopping.wait(self.idle_pause)
                    idle = False
        finally:
            connection.close()

    def written_since_last_look(self, connection: sqlite3.Connection) -> bool:
        """Whether another connection (of any process) committed since the last call, by
        SQLite's `data_version`. The WAL's length cannot tell: rewound after a complete
        checkpoint and written again, it may hold as many pages as at the last look, and
        a writer that never paused saw the thread sleep its idle pause while the WAL grew
        to thousands of pages."""
        version = connection.execute("PRAGMA data_version").fetchone()[0]
        written = version != self._data_version
        self._data_version = version
        return bool(written)


def _sqlite_file(engine: Engine) -> str | None:
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    return database


class _Session(Session):
    """The service's sessions: after a commit that wrote an outbox job, `on_outbox_commit`
    (if any) wakes the workers of this process."""

    def __init__(self, engine: Engine, *, on_outbox_commit: Callable[[], None] | None) -> None:
        super().__init__(engine, expire_on_commit=False)
        self.on_outbox_commit = on_outbox_commit
        # None: `Prepared.defer` writes at once. Else (`defer_inserts`) the rows wait
        # there, and the commit writes them.
        self.deferred: Deferred | None = None


@dataclass(slots=True)
class _Waiting:
    statement: Prepared
    params: dict[str, Any]
    written: bool = False

    @property
    def about(self) -> tuple[Any, Any]:
        return self.statement.table, self.params.get("subscription_id")


# Where a savepoint began: how many rows were deferred, and how many written, by then.
DeferredMark = tuple[int, int]


class Deferred:
    """The rows waiting for a transaction's commit, in order, with how many wait for each
    (table, subscription): the readers that must see them first ask that in O(1).

    A row written before the commit (for a reader) stays listed, marked written, so that a
    savepoint rolled back can be undone exactly (`undo`): the rows deferred within it are
    forgotten, and those written within it, which the rollback took back, wait again.
    """

    __slots__ = ("_rows", "_waiting", "_written")

    def __init__(self) -> None:
        self._rows: list[_Waiting] = []
        self._written: list[int] = []  # indexes in `_rows`, in the order written
        self._waiting: collections.Counter[tuple[Any, Any]] = collections.Counter()

    def add(self, statement: Prepared, params: dict[str, Any]) -> None:
        row = _Waiting(statement, params)
        self._rows.append(row)
        self._waiting[row.about] += 1

    def any_waiting(self, table: sa.TableClause | None, subscription_id: int | None) -> bool:
        if table is None or subscription_id is None:
            return len(self._rows) > len(self._written)
        return self._waiting[table, subscription_id] > 0

    def mark(self) -> DeferredMark:
        return len(self._rows), len(self._written)

    def undo(self, mark: DeferredMark) -> None:
        rows_then, written_then = mark
        for index in self._written[written_then:]:
            self._set(self._rows[index], written=False)
        del self._written[written_then:]
        for row in self._rows[rows_then:]:
            self._set(row, written=True)
        del self._rows[rows_then:]

    def waiting_rows(self, statement: Prepared, subscription_id: int) -> list[dict[str, Any]]:
        return [
            row.params
            for row in self._rows
            if not row.written
            and row.statement is statement
            and row.params.get("subscription_id") == subscription_id
        ]

    def take(
        self, table: sa.TableClause | None, subscription_id: int | None
    ) -> dict[Prepared, list[dict[str, Any]]]:
        """Mark written and return the rows waiting of `table` (and `subscription_id`), or
        all, by statement, each statement's in the order they came."""
        taken: dict[Prepared, list[dict[str, Any]]] = {}
        for index, row in enumerate(self._rows):
            if row.written:
                continue
            if table is not None and row.statement.table is not table:
                continue
            if subscription_id is not None and row.params.get("subscription_id") != subscription_id:
                continue
            taken.setdefault(row.statement, []).append(row.params)
            self._set(row, written=True)
            self._written.append(index)
        return taken

    def _set(self, row: _Waiting, *, written: bool) -> None:
        if row.written == written:
            return
        row.written = written
        self._waiting[row.about] += -1 if written else 1


def defer_inserts(session: Session) -> None:
    """From now on, `Prepared.defer` rows wait for this transaction's commit, which writes
    them in one statement a kind (the group writer's batches: a ledger event, a link and
    a mail job for each sign-up, three round trips each, become three in all).

    A deferred row is one nobody reads back before the commit, save where a reader writes
    the rows it could see first (`write_deferred`). A savepoint rolled back must be undone
    here too (`undo_deferred`).
    """
    assert isinstance(session, _Session)
    session.deferred = Deferred()


def _deferred(session: Session) -> Deferred | None:
    deferred: Deferred | None = getattr(session, "deferred", None)
    return deferred


def deferred_mark(session: Session) -> DeferredMark:
    """Where the deferred rows stand, for `undo_deferred` after a rollback to a savepoint
    taken now."""
    deferred = _deferred(session)
    return (0, 0) if deferred is None else deferred.mark()


def undo_deferred(session: Session, mark: DeferredMark) -> None:
    """After a rollback to the savepoint taken at `mark`: forget the rows deferred since,
    and have those written since wait again."""
    deferred = _deferred(session)
    if deferred is not None:
        deferred.undo(mark)


@contextmanager
def rehearsal(session: Session) -> Iterator[None]:
    """Writes undone on the way out: a savepoint rolled back, with the deferred rows
    (app/subscriptions.py rehearses the work of a mail it does not send)."""
    mark = deferred_mark(session)
    savepoint = session.begin_nested()
    try:
        yield
    finally:
        savepoint.rollback()
        undo_deferred(session, mark)


def write_deferred(
    session: Session, *, table: sa.TableClause | None = None, subscription_id: int | None = None
) -> None:
    """Write the deferred rows now: all, or those of `table` (about `subscription_id`);
    one statement per kind of row, in the order they were deferred."""
    deferred = _deferred(session)
    if deferred is None or not deferred.any_waiting(table, subscription_id):
        return
    for statement, rows in deferred.take(table, subscription_id).items():
        statement.execute_many(session, rows)


def deferred_rows(
    session: Session, statement: Prepared, *, subscription_id: int
) -> list[dict[str, Any]]:
    """The rows of `statement` about `subscription_id` waiting for the commit (to read:
    a change to one would outlive a rollback of the savepoint that made it)."""
    deferred = _deferred(session)
    if deferred is None or statement.table is None:
        return []
    if not deferred.any_waiting(statement.table, subscription_id):
        return []
    return deferred.waiting_rows(statement, subscription_id)


@event.listens_for(_Session, "before_commit")
def _before_commit(session: _Session) -> None:
    write_deferred(session)


# One listener for the class, not one per session: adding a listener to a session cost a
# few per cent of a confirmation's time, on every write transaction.
@event.listens_for(_Session, "after_commit")
def _after_commit(session: _Session) -> None:
    if session.info.pop(OUTBOX_WRITTEN, False) and session.on_outbox_commit is not None:
        session.on_outbox_commit()


def new_session(engine: Engine, *, on_outbox_commit: Callable[[], None] | None = None) -> Session:
    return _Session(engine, on_outbox_commit=on_outbox_commit)


class _WriterLock:
    """SQLite has one writer at a time. Threads of this process queue on this lock instead
    of polling SQLite's busy handler, whose growing sleeps made tail latency seconds long.

    A plain Lock inside (a request's session may be opened and closed on different
    threads). A thread writing back to back takes a plain lock again before a waiting
    thread wakes, so a checkpoint that waits for a gap between writers (`for_checkpoint`)
    is let in first: writers that come meanwhile wait until it is done.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._no_checkpoint_waiting = threading.Event()
        self._no_checkpoint_waiting.set()
        # Set after each transaction: wakes a checkpointer idling since its last look.
        self.wrote = threading.Event()

    @contextmanager
    def for_writer(self) -> Iterator[None]:
        self._no_checkpoint_waiting.wait()
        with self._lock:
            try:
                yield
            finally:
                self.wrote.set()

    @contextmanager
    def for_checkpoint(self) -> Iterator[None]:
        self._no_checkpoint_waiting.clear()
        try:
            with self._lock:
                yield
        finally:
            self._no_checkpoint_waiting.set()


_sqlite_writers: weakref.WeakKeyDictionary[Engine, _WriterLock] = weakref.WeakKeyDictionary()


@contextmanager
def _one_writer(engine: Engine) -> Iterator[None]:
    lock = _sqlite_writers.get(engine)
    if lock is None:
        yield
        return
    with lock.for_writer():
        yield


@contextmanager
def session_scope(
    engine: Engine, *, on_outbox_commit: Callable[[], None] | None = None
) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    with _one_writer(engine):
        session = new_session(engine, on_outbox_commit=on_outbox_commit)
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()


def ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT 1")


# Secrets libpq also takes in a URL's query string (`postgresql://u@host/db?password=...`).
SECRET_QUERY_PARAMETERS = ("password", "sslpassword")


def shown_url(database_url: str) -> str:
    """The database's URL to show an operator: its password masked, whether it is written
    before the host or in the query string."""
    url = sa.engine.make_url(database_url)
    hidden = [name for name in SECRET_QUERY_PARAMETERS if name in url.query]
    shown = url.update_query_dict(dict.fromkeys(hidden, "***")).render_as_string(hide_password=True)
    # The query's mask comes back percent-encoded.
    return shown.replace("=%2A%2A%2A", "=***")


def unreachable(database_url: str, error: sa_exc.DBAPIError) -> tuple[str, str]:
    """Where a database did not answer, and why, to show an operator: the URL and the
    driver's reason on one line each, its password masked in both, whether it is written
    before the host or in the query string."""
    url = sa.engine.make_url(database_url)
    reason = " ".join(str(error.orig).split())
    hidden = {name: url.query[name] for name in SECRET_QUERY_PARAMETERS if name in url.query}
    secrets = [str(url.password)] if url.password else []
    for value in hidden.values():
        secrets.extend([value] if isinstance(value, str) else value)
    for secret in secrets:
        if secret:
            reason = reason.replace(secret, "***")
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        # SQLite says "unable to open database file" whatever the cause.
        folder = Path(url.database).parent
        if not folder.is_dir():
            reason += f" (its folder {folder} does not exist and could not be made)"
        elif not os.access(folder, os.W_OK):
            reason += f" (its folder {folder} is not writable by this user)"
    return shown_url(database_url), reason


def failure(engine: Engine, error: BaseException) -> str:
    """A database failure as a log line says it: where, as whom and the driver's reason,
    `database=<url without user> user=<name> reason=<text>`, the password masked. The
    error's class alone (`OperationalError`) did not tell a refused connection from a
    refused password or a full server. The user stands apart: in the URL, `user@host` read
    as an address, which the log masks."""
    url = engine.url.render_as_string(hide_password=False)
    if isinstance(error, sa_exc.DBAPIError):
        _, reason = unreachable(url, error)
    else:
        # The pool's own (a checkout that timed out): no driver, no password in it.
        reason = " ".join(str(error).split())
    return f"{shown_where(engine)} reason={reason}"


def shown_where(engine: Engine) -> str:
    """`database=<url without user> user=<name>` (see `failure`)."""
    given = engine.url
    anonymous = sa.engine.URL.create(
        given.drivername, host=given.host, port=given.port, database=given.database,
        query=given.query,
    )  # fmt: skip
    where = shown_url(anonymous.render_as_string(hide_password=False))
    user = f" user={given.username}" if given.username else ""
    return f"database={where}{user}"


class Prepared:
    """A Core statement compiled once per dialect and run on the driver's own cursor.

    For the few statements every public request runs (app/subscriptions.py, app/tokens.py):
    `Connection.execute` spends about 50 µs of CPU around each one (cache key, parameters,
    result set-up) where the driver needs 20. Parameters and results still go through the
    column types' own converters (time zones, UUIDs, JSON), and a driver error comes out
    as SQLAlchemy's, as from `Connection.execute`. The statement runs in the session's
    transaction; the ORM does not see it (no autoflush: callers flush where they must).
    """

    def __init__(self, statement: sa.ClauseElement, *, insert_keys: Sequence[str] = ()) -> None:
        self.statement = statement
        self.insert_keys = list(insert_keys)
        self._by_dialect: dict[str, _Compiled] = {}
        # The table an INSERT writes to (None for other statements), for `write_deferred`.
        self.table = statement.table if isinstance(statement, sa.Insert) else None
        self.deferrable = self.table is not None and not getattr(statement, "_returning", ())

    def execute(self, session: Session, params: Mapping[str, Any]) -> _Result:
        connection = session.connection()
        compiled = self._compiled(connection.dialect)
        values = compiled.parameters(params)
        cursor = connection.connection.cursor()
        with self._driver_errors(connection, cursor, compiled.sql, values):
            cursor.execute(compiled.sql, values)
        return _Result(cursor, compiled)

    def defer(self, session: Session, params: dict[str, Any]) -> None:
        """`execute` an INSERT at the commit, if the session defers (`defer_inserts`); else
        now. Returns nothing: the row is not written yet."""
        assert self.deferrable, "only an INSERT without RETURNING can wait"
        deferred = _deferred(session)
        if deferred is None:
            self.execute(session, params).close()
        else:
            deferred.add(self, params)

    def execute_many(self, session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
        """The statement once per row, in one call to the driver (a pipeline on PostgreSQL)."""
        self._many(session, rows, returning=False)

    def execute_many_returning(
        self, session: Session, rows: Sequence[Mapping[str, Any]]
    ) -> list[Any]:
        """`execute_many` for an INSERT with RETURNING on PostgreSQL: what each row
        returned (named tuples), in order, from one pipeline of one short statement.
        SQLAlchemy's way, one statement with a thousand rows of values, cost psycopg more
        CPU in parsing that statement anew each time than the rows themselves."""
        assert session.get_bind().dialect.name == "postgresql", "sqlite3 drops these rows"
        return self._many(session, rows, returning=True)

    def _many(
        self, session: Session, rows: Sequence[Mapping[str, Any]], *, returning: bool
    ) -> list[Any]:
        connection = session.connection()
        compiled = self._compiled(connection.dialect)
        values = [compiled.parameters(params) for params in rows]
        # psycopg's `executemany(returning=True)` is its own, beyond the DB-API.
        cursor: Any = connection.connection.cursor()
        returned: list[Any] = []
        try:
            with self._driver_errors(connection, cursor, compiled.sql, values):
                if not returning:
                    cursor.executemany(compiled.sql, values)
                    return returned
                cursor.executemany(compiled.sql, values, returning=True)
                while True:
                    returned.extend(compiled.row(raw) for raw in cursor.fetchall())
                    if not cursor.nextset():
                        break
        finally:
            cursor.close()
        return returned

    def _compiled(self, dialect: Dialect) -> _Compiled:
        compiled = self._by_dialect.get(dialect.name)
        if compiled is None:
            compiled = self._by_dialect[dialect.name] = _Compiled.of(
                self.statement, dialect, self.insert_keys
            )
        return compiled

    @staticmethod
    @contextmanager
    def _driver_errors(
        connection: sa.Connection, cursor: Any, sql: str, values: Any
    ) -> Iterator[None]:
        """A driver error comes out as SQLAlchemy's, as from `Connection.execute`."""
        dialect = connection.dialect
        try:
            yield
        except dialect.loaded_dbapi.Error as e:
            cursor.close()
            raise sa_exc.DBAPIError.instance(
                sql,
                values,
                e,
                dialect.loaded_dbapi.Error,
                dialect=dialect,
                connection_invalidated=dialect.is_disconnect(e, connection.connection, cursor),
            ) from e


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    positions: tuple[str, ...] | None
    defaults: dict[str, Any]
    binders: dict[str, Callable[[Any], Any]]
    row_type: type[tuple[Any, ...]] | None
    readers: tuple[Callable[[Any], Any] | None, ...]

    @classmethod
    def of(cls, statement: sa.ClauseElement, dialect: Dialect, insert_keys: list[str]) -> _Compiled:
        compiled = statement.compile(dialect=dialect, column_keys=insert_keys or None)
        assert isinstance(compiled, SQLCompiler)
        columns = compiled._result_columns
        names = [column[0] for column in columns]
        return cls(
            sql=compiled.string,
            positions=tuple(compiled.positiontup) if compiled.positiontup is not None else None,
            defaults=dict(compiled.construct_params(_check=False)),
            # One converter per name (a tuple only for the tuple-IN this does not use).
            binders={
                name: bind for name, bind in compiled._bind_processors.items() if callable(bind)
            },
            row_type=collections.namedtuple("Row", names) if names else None,
            readers=tuple(column[3]._cached_result_processor(dialect, None) for column in columns),
        )

    def row(self, raw: Sequence[Any]) -> Any:
        """A row the driver returned, its columns by name (a named tuple), converted."""
        row_type = self.row_type
        assert row_type is not None
        return row_type(
            *(
                value if reader is None or value is None else reader(value)
                for value, reader in zip(raw, self.readers, strict=True)
            )
        )

    def parameters(self, params: Mapping[str, Any]) -> Any:
        values = {**self.defaults, **params}
        for name, bind in self.binders.items():
            if values.get(name) is not None:
                values[name] = bind(values[name])
        if self.positions is None:
            return values
        return [values[name] for name in self.positions]


class _Result:
    def __init__(self, cursor: Any, compiled: _Compiled) -> None:
        self._cursor = cursor
        self._compiled = compiled

    def close(self) -> None:
        self._cursor.close()

    @property
    def rowcount(self) -> int:
        count: int = self._cursor.rowcount
        self._cursor.close()
        return count

    def first(self) -> Any:
        """The first row, its columns by name (a named tuple), or None."""
        raw = self._cursor.fetchone()
        self._cursor.close()
        return None if raw is None else self._compiled.row(raw)

    def scalar(self) -> Any:
        row = self.first()
        return None if row is None else row[0]


def dialect_insert(session: Session) -> Callable[[Any], sqlite.Insert | postgresql.Insert]:
    """The database's own INSERT, which has ON CONFLICT (the same clauses on both).

    Only the dialect in use is imported: the other one's modules (~2 MB for PostgreSQL's)
    would stay in the process for nothing.
    """
    if session.get_bind().dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert
    from sqlalchemy.dialects.postgresql import insert as postgresql_insert

    return postgresql_insert
