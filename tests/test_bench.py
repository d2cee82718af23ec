"""The performance suite's own instruments (bench/_common.py): what they report must be the
measured process's figure, not the suite's, or every number in bench/results is wrong."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

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

        measured = common.run_measured(["--help"], env=dict(os.environ), cwd=tmp_path)

        assert measured.exit_code == 0
        assert "migrate" in measured.stdout_tail
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
