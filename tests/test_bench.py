"""The performance suite's own instruments (bench/_common.py): what they report must be the
measured process's figure, not the suite's, or every number in bench/results is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa

from app import db
from app.models import JobKind, JobState, OutboxJob, utcnow

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def common() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCH))
    try:
        import _common

        yield _common
    finally:
        sys.path.remove(str(BENCH))


class TestRunMeasured:
    def test_peak_memory_is_the_childs_own_not_the_suites(
        self, common: ModuleType, tmp_path: Path
    ) -> None:
        # Linux seeds a new program's ru_maxrss with the image it replaces: a direct child
        # of a 200 MB parent reported 200 MB whatever it used.
        ballast = bytearray(200 * 1024 * 1024)
        for offset in range(0, len(ballast), 4096):
            ballast[offset] = 1
        parent_mb = common.process_memory_mib(os.getpid())
        assert parent_mb > 200

        # One command's help: short enough to be read whole from the output's tail.
        measured = common.run_measured(["migrate", "--help"], env=dict(os.environ), cwd=tmp_path)

        assert measured.exit_code == 0
        assert "Usage: newsletter migrate" in measured.stdout_tail
        assert 20 < measured.peak_rss_mb < parent_mb - 100
        del ballast

    def test_a_failing_command_is_an_error_with_its_output(
        self, common: ModuleType, tmp_path: Path
    ) -> None:
        with pytest.raises(RuntimeError, match="exited 2"):
            common.run_measured(["no-such-command"], env=dict(os.environ), cwd=tmp_path)


class TestLoadGenerator:
    def test_every_request_is_answered_and_a_dry_pool_ends_the_window(
        self, common: ModuleType
    ) -> None:
        remaining = iter(range(500))

        def make() -> tuple[str, str, None, str] | None:
            return None if next(remaining, None) is None else ("GET", "/healthz", None, "")

        with common.static_server() as (port, pid):
            result = common.load(port, make, concurrency=8, duration=60.0, warmup=0, server_pid=pid)

        assert result.requests == 500
        assert result.statuses == {"200": 500}
        assert result.exhausted
        assert result.elapsed_s < 60
        assert 0 < result.p50_ms <= result.p99_ms <= result.max_ms


def test_the_table_marks_missed_targets(common: ModuleType) -> None:
    rows = [
        common.Row("subscribe", "SQLite", "rate", "100/s", target=">= 60 %", met=False),
        common.Row("search", "PostgreSQL", "deep | first", "1.0x", met=True),
    ]

    table = common.markdown_table(rows).splitlines()

    assert table[0].startswith("| scenario | setup | figure | value |")
    assert table[2].endswith("| >= 60 % | **no** |")
    # A "|" inside a cell would break the row into an extra column.
    assert table[3].count("|") == table[0].count("|")
    assert table[3].endswith("| yes |")


def test_memory_split_into_own_and_shared_pages_adds_up_to_rss(common: ModuleType) -> None:
    ballast = bytearray(64 * 1024 * 1024)
    for offset in range(0, len(ballast), 4096):
        ballast[offset] = 1
    parts = common.process_memory_parts_mib(os.getpid())
    rss = common.process_memory_mib(os.getpid())
    # The ballast is this process's own; libpython and libc pages are shared with others.
    assert parts["private"] > 64
    assert parts["shared"] > 0
    assert abs(parts["private"] + parts["shared"] - rss) < 0.05 * rss
    del ballast


def test_two_processes_count_their_shared_pages_once() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import footprint
    finally:
        sys.path.remove(str(BENCH))
    processes = {
        "serve": {"private_mb": 70.0, "shared_mb": 20.0},
        "worker": {"private_mb": 50.0, "shared_mb": 17.0},
    }
    assert footprint._distinct_total(processes) == 140.0


def test_each_child_process_has_its_own_cpu_figure(common: ModuleType) -> None:
    """How the load fell on each of two uvicorn workers: the CPU of each child, by pid."""
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    busy = subprocess.Popen([sys.executable, "-c", burn + "\ntime.sleep(30)"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while common.process_cpu(busy.pid) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        cpus = common.tree_cpus(os.getpid())
    finally:
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()
    assert cpus[busy.pid] >= 0.3
    assert cpus[idle.pid] < 0.2
    assert os.getpid() in cpus
    result = common.LoadResult(
        requests=1,
        ok=1,
        errors=0,
        elapsed_s=1.0,
        ok_per_s=1.0,
        p50_ms=1.0,
        p90_ms=1.0,
        p99_ms=1.0,
        max_ms=1.0,
        statuses={"200": 1},
        server_cpu_cores=1.05,
        loadgen_cpu_cores=0.1,
        machine_busy_cores=1.2,
        server_cores_by_process=[1.05, 0.0],
    )
    assert result.split() == " (1.05 + 0.00 by process)"


def test_watched_processes_have_their_cpu_per_answer_beside_the_servers(
    common: ModuleType,
) -> None:
    """The database's (and a separate worker's) CPU over a load window, per 2xx answer:
    a process that burns CPU only during the window is counted, one that sleeps is not."""
    # 0.25 s of CPU once told to start, then asleep: done well within the window even on
    # a busy machine.
    spin = (
        "import sys, time\nsys.stdin.readline()\nend = time.process_time() + 0.25\n"
        "while time.process_time() < end: pass\ntime.sleep(60)"
    )
    busy = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE, text=True)
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = False

    def spinning() -> list[int]:
        # Asked for its pids at the window's start: it starts burning only then.
        nonlocal started
        if not started:
            assert busy.stdin is not None
            busy.stdin.write("go\n")
            busy.stdin.flush()
            started = True
        return [busy.pid]

    try:
        with common.static_server() as (port, pid):
            result = common.load(
                port,
                lambda: ("GET", "/healthz", None, ""),
                concurrency=4,
                duration=4.0,
                warmup=0,
                server_pid=pid,
                others={"database": spinning, "worker": lambda: [idle.pid]},
            )
    finally:
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()
    # Its CPU before the window (starting Python) is left out, the window's counted.
    burnt = result.others_cpu_cores["database"] * result.elapsed_s
    assert 0.24 <= burnt < 0.4
    assert result.others_cpu_cores["worker"] < 0.01
    per_answer = result.cpu_ms_per_answer()
    assert set(per_answer) == {"api", "database", "worker"}
    assert per_answer["database"] == pytest.approx(
        result.others_cpu_cores["database"] * 1000 / result.ok_per_s, abs=0.001
    )
    assert "database" in result.summary()


class TestWaitForMails:
    """Between the sign-ups and the confirmations, the sign-ups' mails are waited for, so
    the confirm window does not pay for them; a mail never written fails the run."""

    @pytest.fixture
    def subscribe(self, common: ModuleType) -> ModuleType:
        import subscribe  # bench/, on the path while `common` is

        return subscribe

    class _Server:
        def __init__(self, written: list[int]) -> None:
            self.counts = iter(written)
            self.last = 0

        def mails_written(self) -> int:
            self.last = next(self.counts, self.last)
            return self.last

    def test_the_mails_left_after_the_sign_ups_are_counted_and_timed(
        self, subscribe: ModuleType
    ) -> None:
        drain = subscribe._wait_for_mails(self._Server([40, 70, 100]), 100)

        assert drain["expected"] == 100
        assert drain["left"] == 60
        assert drain["seconds"] > 0

    def test_a_mail_never_written_fails_the_run(
        self, subscribe: ModuleType, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(subscribe, "DRAIN_DEADLINE_S", 0.3)

        with pytest.raises(RuntimeError, match="1 of 100 confirmation mails not written"):
            subscribe._wait_for_mails(self._Server([99]), 100)


class TestWaitForSyncs:
    """After the confirmations, their sync jobs are waited for likewise: the window's rate
    comes with what it left to the worker, and a sync never done fails the run."""

    @pytest.fixture
    def subscribe(self, common: ModuleType) -> ModuleType:
        import subscribe  # bench/, on the path while `common` is

        return subscribe

    @staticmethod
    def _queue(engine: sa.Engine, *states: tuple[JobKind, JobState]) -> None:
        now = utcnow()
        with db.session_scope(engine) as session:
            for kind, state in states:
                session.add(
                    OutboxJob(
                        kind=kind,
                        payload={},
                        state=state,
                        next_attempt_at=now,
                        created_at=now,
                        updated_at=now,
                    )
                )

    def test_the_sync_jobs_left_after_the_confirmations_are_counted_and_timed(
        self, subscribe: ModuleType, engine: sa.Engine, database_url: str
    ) -> None:
        self._queue(
            engine,
            (JobKind.SYNC, JobState.DONE),
            (JobKind.SYNC, JobState.PENDING),
            (JobKind.SYNC, JobState.RUNNING),
            (JobKind.MAIL, JobState.PENDING),  # a mail is not a sync
        )

        def finish() -> None:
            time.sleep(0.3)
            with engine.begin() as connection:
                connection.execute(
                    sa.text("UPDATE outbox_job SET state = 'done' WHERE kind = 'sync'")
                )

        worker = threading.Thread(target=finish)
        worker.start()
        try:
            drain = subscribe._wait_for_syncs(database_url)
        finally:
            worker.join()

        assert drain["expected"] == 3
        assert drain["left"] == 2
        assert drain["seconds"] >= 0.3

    def test_a_sync_never_done_fails_the_run(
        self,
        subscribe: ModuleType,
        engine: sa.Engine,
        database_url: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setattr(subscribe, "DRAIN_DEADLINE_S", 0.3)
        self._queue(engine, (JobKind.SYNC, JobState.DONE), (JobKind.SYNC, JobState.PENDING))

        with pytest.raises(RuntimeError, match="1 of 2 sync jobs not done"):
            subscribe._wait_for_syncs(database_url)
