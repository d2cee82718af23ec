"""SQLite's WAL copied back into the database file by a thread of its own (app/db.py
`Checkpointer`), so that no request's commit waits for the checkpoint's disk writes.

These run on a SQLite file whatever TEST_DATABASE_URL says: PostgreSQL has no WAL file
for the service to look after.
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
from fastapi.testclient import TestClient

from app import db
from app.main import create_app
from tests.conftest import make_settings

ROW = "x" * 3000  # about one page a row


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "wal.db")


@pytest.fixture
def engine(path: str) -> Iterator[sa.Engine]:
    engine = db.make_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE rows (body TEXT)")
    yield engine
    engine.dispose()


def write(engine: sa.Engine, transactions: int) -> None:
    """One row a transaction, as the service writes: one writer thread at a time."""
    for _ in range(transactions):
        with db.session_scope(engine) as session:
            session.connection().exec_driver_sql("INSERT INTO rows VALUES (?)", (ROW,))


def autocheckpoint(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        value = connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar()
    assert isinstance(value, int)
    return value


def wal_pages(path: str) -> int:
    return Path(path + "-wal").stat().st_size // 4096


def test_the_engines_commits_leave_checkpoints_to_the_thread_while_it_runs(
    engine: sa.Engine,
) -> None:
    assert autocheckpoint(engine) == 1000
    checkpointer = db.Checkpointer.start_for(engine)
    assert checkpointer is not None
    try:
        assert autocheckpoint(engine) == 0
        assert any(thread.name == "sqlite-checkpoint" for thread in threading.enumerate())
    finally:
        checkpointer.stop()
    assert autocheckpoint(engine) == 1000
    assert not any(thread.name == "sqlite-checkpoint" for thread in threading.enumerate())


def test_no_checkpointer_for_postgresql_or_memory() -> None:
    assert db.Checkpointer.start_for(sa.create_engine("sqlite://")) is None
    postgres = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1/test")
    assert db.Checkpointer.start_for(postgres) is None


@contextmanager
def started_but_still(engine: sa.Engine, *, restart_frames: int) -> Iterator[db.Checkpointer]:
    """A started checkpointer whose thread never comes round: the test makes the passes."""
    checkpointer = db.Checkpointer(
        engine, pause=3600, idle_pause=3600, restart_frames=restart_frames
    )
    checkpointer.start()
    try:
        yield checkpointer
    finally:
        checkpointer.stop()


def one_pass(checkpointer: db.Checkpointer) -> db.CheckpointPass:
    connection = sqlite3.connect(checkpointer.path, isolation_level=None)
    try:
        return checkpointer.checkpoint(connection)
    finally:
        connection.close()


def test_a_pass_copies_the_wal_back_and_the_next_writer_starts_it_over(
    engine: sa.Engine, path: str
) -> None:
    with started_but_still(engine, restart_frames=10_000) as checkpointer:
        write(engine, 200)
        grown = wal_pages(path)
        assert grown >= 200  # the commits did not checkpoint
        done = one_pass(checkpointer)
        assert done.copied == done.wal_frames >= 200
        assert not done.restarted
        assert Path(path).stat().st_size // 4096 >= 200  # the rows are in the file now
        write(engine, 50)
        # The WAL started over from its beginning: it did not grow past its old size.
        assert wal_pages(path) == grown


def test_a_wal_past_the_limit_is_copied_in_full_waiting_for_the_writer(
    engine: sa.Engine, path: str
) -> None:
    with started_but_still(engine, restart_frames=100) as checkpointer:
        write(engine, 150)
        done = one_pass(checkpointer)
        assert done.restarted
        assert checkpointer.restarts == 1
        assert done.copied == done.wal_frames >= 150


def test_writes_after_a_lull_wake_the_checkpointer_at_once(engine: sa.Engine, path: str) -> None:
    """After a lull, the thread waited out its idle pause (checking for other processes'
    commits) while this process's writes came back at full speed: the WAL grew for the
    whole pause. Now a commit here wakes it."""
    checkpointer = db.Checkpointer(engine, pause=0.005, idle_pause=5.0, restart_frames=300)
    checkpointer.start()
    largest = 0
    try:
        write(engine, 100)
        time.sleep(0.2)  # looked at twice with nothing new: idle
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            write(engine, 50)
            largest = max(largest, wal_pages(path))
    finally:
        checkpointer.stop()
    assert checkpointer.restarts >= 1
    assert largest < 4_000


def test_under_steady_writes_the_wal_stays_small(engine: sa.Engine, path: str) -> None:
    checkpointer = db.Checkpointer(engine, pause=0.005, restart_frames=300)
    checkpointer.start()
    largest = 0
    try:
        for _ in range(60):
            write(engine, 100)
            largest = max(largest, wal_pages(path))
    finally:
        checkpointer.stop()
    assert checkpointer.passes >= 2
    # Unchecked, the WAL holds every commit: about 18,000 pages for these 6,000. Writes
    # that never pause leave a passive checkpoint behind; past 300 pages a pass waits for
    # the writer and copies all (seen: 530 to 690 pages at most).
    assert largest < 4_000
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT count(*) FROM rows").fetchone() == (6_000,)


def test_writes_that_leave_the_wal_as_long_as_at_the_last_pass_are_seen(
    engine: sa.Engine, path: str
) -> None:
    # The thread's idle pause is for a database nobody writes to. A WAL copied back whole
    # starts over at the next write: written again to the same length, it looked untouched,
    # and the thread slept while steady writes took the WAL to thousands of pages.
    checkpointer = db.Checkpointer(engine)  # not started: its passes are made here
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        write(engine, 5)  # the first rows also write the table's first pages
        checkpointer.checkpoint(connection)
        checkpointer.written_since_last_look(connection)
        write(engine, 5)
        first = checkpointer.checkpoint(connection)
        assert checkpointer.written_since_last_look(connection)
        write(engine, 5)
        second = checkpointer.checkpoint(connection)
        assert (second.wal_frames, second.copied) == (first.wal_frames, first.copied) > (0, 0)
        assert checkpointer.written_since_last_look(connection)
        assert not checkpointer.written_since_last_look(connection)  # nothing since
    finally:
        connection.close()


def test_the_app_runs_one_while_it_is_up(tmp_path: Path) -> None:
    settings = make_settings(
        f"sqlite:///{tmp_path / 'app.db'}", smtp_port=1, auto_migrate=True, run_worker=False
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        assert any(thread.name == "sqlite-checkpoint" for thread in threading.enumerate())
        assert autocheckpoint(client.app.state.engine) == 0  # type: ignore[attr-defined]
    assert not any(thread.name == "sqlite-checkpoint" for thread in threading.enumerate())
