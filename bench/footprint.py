"""Idle memory of the API with its worker, and cold start to ready.

Idle memory, per database, two layouts (target: under 150 MB each, all processes summed):

    embedded    `newsletter serve`, the outbox worker inside it (the default)
    separate    `newsletter serve` with NEWSLETTER_RUN_WORKER=false + `newsletter worker`

Each is started on a new database and warmed up (1 s of /healthz, then 200 subscriptions
whose confirmation mails the worker writes, waited for); then the resident memory (VmRSS)
of each process is read, and its peak (VmHWM). Two processes also get the memory they take
together: each one's own pages plus the pages they share (the same libraries) once, where
summed RSS counts the shared ones twice (`_distinct_total`).

Cold start: on an already-migrated database (a SQLite file after `newsletter migrate`; the
PostgreSQL database `bench` likewise), seconds from starting `newsletter serve` to the
first 200 from /readyz, polled every 10 ms; the median of several starts (5; 2 with
--quick). Target: under 3 s. `serve` runs with its defaults, so it also checks that no
migration is pending (NEWSLETTER_AUTO_MIGRATE), as the embedded default does.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import _common
from _common import LIST_SLUG, Row

MEMORY_TARGET_MB = 150.0
COLD_START_TARGET_S = 3.0
WARM_UP_SUBSCRIPTIONS = 200
MAIL_DEADLINE_S = 120.0


def _warm_up(server: _common.Server) -> None:
    _common.load(
        server.port, lambda: ("GET", "/healthz", None, ""), concurrency=4, duration=1.0, warmup=0
    )
    run_id = uuid.uuid4().hex[:8]
    numbers = iter(range(WARM_UP_SUBSCRIPTIONS))

    def subscribe() -> _common.Request | None:
        n = next(numbers, None)
        if n is None:
            return None
        body = f'{{"email": "warm-{run_id}-{n}@example.org"}}'.encode()
        return ("POST", f"/v1/lists/{LIST_SLUG}/subscriptions", body, "")

    _common.load(server.port, subscribe, concurrency=4, duration=120.0, warmup=0)
    deadline = time.monotonic() + MAIL_DEADLINE_S
    while server.mails_written() < WARM_UP_SUBSCRIPTIONS:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {server.mails_written()} mails written in time")
        time.sleep(0.1)


def _memory(pid: int) -> dict[str, float]:
    parts = _common.process_memory_parts_mib(pid)
    return {
        "rss_mb": round(_common.process_memory_mib(pid), 1),
        "peak_mb": round(_common.process_memory_mib(pid, "VmHWM"), 1),
        "private_mb": round(parts["private"], 1),
        "shared_mb": round(parts["shared"], 1),
    }


def _distinct_total(processes: dict[str, dict[str, float]]) -> float:
    """The memory the processes take together: each one's own pages, and the pages they
    share (the same libraries: libpython, OpenSSL, pydantic-core...) once. Summing RSS
    counts those twice. The shared part taken is the largest process's: the other maps the
    same libraries or fewer (an upper bound: that part may also hold pages shared with
    unrelated processes)."""
    private = sum(p["private_mb"] for p in processes.values())
    return round(private + max(p["shared_mb"] for p in processes.values()), 1)


def _idle(options: argparse.Namespace, kind: str) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for layout in ("embedded", "separate"):
        with tempfile.TemporaryDirectory(prefix="newsletter-bench-idle-") as tmp:
            workdir = Path(tmp)
            url = _common.fresh_database(kind, workdir, options, "newsletter.db")
            extra = dict(options.extra_env)
            if layout == "separate":
                extra["NEWSLETTER_RUN_WORKER"] = "false"
            with contextlib.ExitStack() as stack:
                server = stack.enter_context(
                    _common.running_server(database_url=url, workdir=workdir, extra_env=extra)
                )
                worker = None
                if layout == "separate":
                    worker = stack.enter_context(
                        _common.running_worker(
                            database_url=url,
                            workdir=workdir,
                            server=server,
                            extra_env=options.extra_env,
                        )
                    )
                _warm_up(server)
                processes = {"serve": _memory(server.process.pid)}
                if worker is not None:
                    processes["worker"] = _memory(worker.pid)
        total = round(sum(p["rss_mb"] for p in processes.values()), 1)
        distinct = _distinct_total(processes)
        figures[layout] = {
            "processes": processes,
            "total_rss_mb": total,
            "distinct_mb": distinct,
        }
        parts = ", ".join(
            f"{name} {p['rss_mb']} MB = {p['private_mb']} own + {p['shared_mb']} shared"
            for name, p in processes.items()
        )
        print(
            f"   idle {layout:<9} RSS {total:6.1f} MB, shared pages once {distinct:6.1f} MB "
            f"({parts})",
            flush=True,
        )
    return figures


def _cold_start(options: argparse.Namespace, kind: str) -> list[float]:
    starts = 2 if options.quick else 5
    with tempfile.TemporaryDirectory(prefix="newsletter-bench-start-") as tmp:
        workdir = Path(tmp)
        url = _common.fresh_database(kind, workdir, options, "newsletter.db")
        env = _common.service_env(url, workdir, options.extra_env)
        _common.run_measured(["migrate"], env=env, cwd=workdir)
        seconds = []
        for _ in range(starts):
            with _common.running_server(
                database_url=url, workdir=workdir, extra_env=options.extra_env
            ) as server:
                seconds.append(round(server.ready_after_s, 3))
    print(f"   cold start to ready: {seconds} s", flush=True)
    return seconds


def run(options: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    results: dict[str, Any] = {}
    for kind in options.databases:
        name = "SQLite" if kind == "sqlite" else "PostgreSQL"
        print(f"\n== footprint: {name}", flush=True)
        idle = _idle(options, kind)
        starts = _cold_start(options, kind)
        results[kind] = {"idle": idle, "cold_start_s": starts}
        for layout, label in (
            ("embedded", "serve (worker inside)"),
            ("separate", "serve + worker"),
        ):
            figure = idle[layout]
            parts = " + ".join(f"{p['rss_mb']:.0f}" for p in figure["processes"].values())
            rows.append(
                Row(
                    "idle memory",
                    f"{name}, {label}",
                    "RSS after warm-up",
                    f"{figure['total_rss_mb']:.0f} MB"
                    + (f" ({parts})" if len(figure["processes"]) > 1 else ""),
                    target=f"< {MEMORY_TARGET_MB:.0f} MB",
                    met=figure["total_rss_mb"] < MEMORY_TARGET_MB,
                    detail=figure,
                )
            )
            if len(figure["processes"]) > 1:
                rows.append(
                    Row(
                        "idle memory",
                        f"{name}, {label}",
                        "own pages + shared pages once",
                        f"{figure['distinct_mb']:.0f} MB",
                        reference=f"RSS summed {figure['total_rss_mb']:.0f} MB",
                        target=f"< {MEMORY_TARGET_MB:.0f} MB",
                        met=figure["distinct_mb"] < MEMORY_TARGET_MB,
                    )
                )
        median = statistics.median(starts)
        rows.append(
            Row(
                "cold start",
                f"{name}, migrated database",
                "start to first 200 from /readyz",
                f"{median:.2f} s (median of {len(starts)}, max {max(starts):.2f})",
                target=f"< {COLD_START_TARGET_S:g} s",
                met=median < COLD_START_TARGET_S,
                detail={"seconds": starts},
            )
        )
    _common.write_results("footprint", {"runs": results})
    return rows


if __name__ == "__main__":
    import run as suite

    raise SystemExit(suite.main(only="footprint"))
