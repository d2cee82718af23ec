"""SQLite's write lock held by another process (a `newsletter worker` beside `serve`).

A transaction waits for the lock by polling it (app/db.py `_begin_immediate`), with the
connection's busy timeout off meanwhile and put back after, and gives up after
`LOCK_WAIT_S` as SQLite's own busy timeout would.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from app import db


@pytest.fixture
def sqlite_file(tmp_path: Path) -> str:
    return str(tmp_path / "lock.db")


@contextmanager
def held_by_another_connection(path: str, *, for_s: float) -> Iterator[threading.Event]:
    """Another connection (as another process would) holds the write lock for `for_s`;
    the event yielded is set as it lets go (just before its COMMIT)."""
    taken = threading.Event()
    releasing = threading.Event()

    def hold() -> None:
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("PRAGMA journal_mode=WAL")
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO marks VALUES ('other')")
        taken.set()
        time.sleep(for_s)
        # Before, not after: the lock is free the moment COMMIT ends, and the waiting
        # transaction may start before this thread runs again.
        releasing.set()
        other.execute("COMMIT")
        other.close()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert taken.wait(5)
        yield releasing
    finally:
        thread.join()


def _engine(path: str) -> sa.Engine:
    engine = db.make_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE IF NOT EXISTS marks (who TEXT)")
    return engine


def _busy_timeout(connection: sa.Connection) -> int:
    return int(connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one())


def test_a_transaction_waits_for_the_lock_and_starts_once_it_is_free(sqlite_file: str) -> None:
    engine = _engine(sqlite_file)
    with (
        held_by_another_connection(sqlite_file, for_s=0.3) as releasing,
        engine.begin() as connection,
    ):
        # The lock is ours only once the other connection has let it go.
        assert releasing.is_set()
        connection.exec_driver_sql("INSERT INTO marks VALUES ('ours')")
        assert _busy_timeout(connection) == int(db.LOCK_WAIT_S * 1000)
    with engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT who FROM marks ORDER BY rowid").all()
    assert [row[0] for row in rows] == ["other", "ours"]
    engine.dispose()


def test_a_transaction_gives_up_after_the_wait(
    sqlite_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(sqlite_file)
    monkeypatch.setattr(db, "LOCK_WAIT_S", 0.2)
    with held_by_another_connection(sqlite_file, for_s=1.0) as releasing:
        with pytest.raises(sa_exc.OperationalError, match="database is locked"), engine.begin():
            pass
        assert not releasing.is_set()
    # The connection went back to the pool with its busy timeout put back.
    with engine.begin() as connection:
        assert _busy_timeout(connection) == 200
    engine.dispose()
