"""Engine and sessions. SQLite (WAL, one writer at a time) by default, PostgreSQL by URL.

The boundary owns the commit: a request dependency or `session_scope()` commits on success
and rolls back on error; domain code only flushes.
"""

from __future__ import annotations

import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
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


def _sqlite_engine(url: str) -> Engine:
    database = sa.engine.make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url,
        # The driver's own transaction handling is off; we begin explicitly below.
        connect_args={"check_same_thread": False, "isolation_level": None, "timeout": 30},
        pool_size=20,
        max_overflow=20,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    _sqlite_writers[engine] = threading.Lock()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        # Take the write lock up front: a deferred transaction that reads and then writes
        # can fail with "database is locked" without waiting when another writer is active.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


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
