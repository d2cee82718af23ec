"""Engine and sessions. SQLite (WAL, one writer at a time) by default, PostgreSQL by URL.

The boundary owns the commit: a request dependency or `session_scope()` commits on success
and rolls back on error; domain code only flushes.
"""

from __future__ import annotations

import collections
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
        cursor.close()

    _sqlite_writers[engine] = threading.Lock()

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


def new_session(engine: Engine, *, on_outbox_commit: Callable[[], None] | None = None) -> Session:
    session = Session(engine, expire_on_commit=False)
    if on_outbox_commit is not None:

        @event.listens_for(session, "after_commit")
        def _after_commit(sess: Any) -> None:
            if sess.info.pop(OUTBOX_WRITTEN, False):
                on_outbox_commit()

    return session


# SQLite has one writer at a time. Threads of this process queue on a lock instead of
# polling SQLite's busy handler, whose growing sleeps made tail latency seconds long.
_sqlite_writers: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()


@contextmanager
def _one_writer(engine: Engine) -> Iterator[None]:
    lock = _sqlite_writers.get(engine)
    if lock is None:
        yield
        return
    # A plain Lock: a request's session may be opened and closed on different threads.
    with lock:
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

    def execute(self, session: Session, params: Mapping[str, Any]) -> _Result:
        connection = session.connection()
        dialect = connection.dialect
        compiled = self._by_dialect.get(dialect.name)
        if compiled is None:
            compiled = self._by_dialect[dialect.name] = _Compiled.of(
                self.statement, dialect, self.insert_keys
            )
        values = compiled.parameters(params)
        cursor = connection.connection.cursor()
        try:
            cursor.execute(compiled.sql, values)
        except dialect.loaded_dbapi.Error as e:
            cursor.close()
            raise sa_exc.DBAPIError.instance(
                compiled.sql,
                values,
                e,
                dialect.loaded_dbapi.Error,
                dialect=dialect,
                connection_invalidated=dialect.is_disconnect(e, connection.connection, cursor),
            ) from e
        return _Result(cursor, compiled)


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

    @property
    def rowcount(self) -> int:
        count: int = self._cursor.rowcount
        self._cursor.close()
        return count

    def first(self) -> Any:
        """The first row, its columns by name (a named tuple), or None."""
        raw = self._cursor.fetchone()
        self._cursor.close()
        if raw is None:
            return None
        row_type = self._compiled.row_type
        assert row_type is not None
        return row_type(
            *(
                value if reader is None or value is None else reader(value)
                for value, reader in zip(raw, self._compiled.readers, strict=True)
            )
        )

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
