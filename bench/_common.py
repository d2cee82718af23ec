"""What the benchmarks share: options, databases, the server, the load generator, memory and
CPU readings, and the table of figures.

Every scenario module (`subscribe`, `search`, `footprint`, `transfer`, `sync_mailgun`,
`sync_mailman`) exposes `run(options) -> list[Row]`; `bench/run.py` runs the ones asked for
and prints one Markdown table. Each module can also be run alone (`python bench/search.py`
is `python bench/run.py --only search`).

Run as `python _common.py static-server PORT`, this file is the trivial HTTP server the load
generator is measured against (`static_server`, used by the `loadgen` scenario).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # Scenarios import `app` and the fakes of `tests/` (tests/fake_mailgun.py, tests/mailman.py).
    sys.path.insert(0, str(ROOT))
# tests.conftest imports fastapi.testclient, which warns about its httpx on import.
warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")

RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/bench"
LOOPBACK = "127.0.0.1"
LIST_SLUG = "bluehats"
# Known to the bench so it can compute link secrets as app/tokens.py does; throwaway data only.
SECRET_KEY = "bench-secret-key-not-for-production"  # noqa: S105
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 120.0  # migrations of a new database + start-up, on a busy machine
STOP_TIMEOUT = 30.0  # the worker finishes the jobs in hand on SIGTERM
REQUEST_TIMEOUT = 30.0
BACKGROUND_WARNING = 0.25  # cores busy before a run that make its figures suspect

SCENARIOS = (
    "loadgen",
    "subscribe",
    "search",
    "footprint",
    "transfer",
    "sync_mailgun",
    "sync_mailman",
)


# --------------------------------------------------------------------------------------
# Figures


@dataclass
class Row:
    """One line of the final table: a figure, what it is compared with, and its target."""

    scenario: str
    setup: str
    figure: str
    value: str
    reference: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None
    # Everything measured, for bench/results/suite.json.
    detail: dict[str, Any] = field(default_factory=dict)


def markdown_table(rows: list[Row]) -> str:
    header = ["scenario", "setup", "figure", "value", "reference", "ratio", "target", "met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        cells = [row.scenario, row.setup, row.figure, row.value, row.reference, row.ratio]
        cells += [row.target, met]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def pct(value: float) -> str:
    return f"{value * 100:.0f} %"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(value, 2) for value in os.getloadavg()],
    }


def write_results(name: str, document: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    document = {
        "benchmark": name,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine(),
        **document,
    }
    path.write_text(json.dumps(document, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)


# --------------------------------------------------------------------------------------
# Options: one parser for the suite; a scenario reads the options it knows.


def _names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(value: str) -> list[str]:
        names = [part.strip() for part in value.split(",") if part.strip()]
        for name in names:
            if name not in allowed:
                raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(allowed)}")
        return names

    return parse


def _env_pair(value: str) -> tuple[str, str]:
    name, sep, setting = value.partition("=")
    if not sep or not name.startswith("NEWSLETTER_"):
        raise argparse.ArgumentTypeError("expected NEWSLETTER_NAME=value")
    return name, setting


# database-uvicorn workers[-apart]: "apart" runs the outbox worker as its own process
# (`newsletter worker`, as in production) instead of inside each uvicorn worker.
SERVER_SETUPS = (
    "sqlite-1",
    "postgresql-1",
    "postgresql-2",
    "sqlite-2",
    "sqlite-1-apart",
    "postgresql-1-apart",
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="The performance suite of the newsletter service (see bench/README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--only",
        type=_names(SCENARIOS),
        nargs="+",
        default=None,
        help=f"scenarios to run (default: all): {', '.join(SCENARIOS)}",
    )
    p.add_argument(
        "--skip", type=_names(SCENARIOS), nargs="+", default=[], help="scenarios to skip"
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes and short windows (a few minutes)"
    )
    p.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL, help="the database `bench`")
    p.add_argument(
        "--databases",
        type=_names(("sqlite", "postgresql")),
        nargs="+",
        default=None,
        help="databases for search, footprint, transfer and sync_mailgun (default: both)",
    )
    p.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="NEWSLETTER_NAME=VALUE",
        help="an extra setting for every server or worker started, for experiments",
    )
    load = p.add_argument_group("subscribe (throughput and latency)")
    load.add_argument(
        "--setups",
        type=_names(SERVER_SETUPS),
        nargs="+",
        default=None,
        help=f"database-workers[-apart] (default: {', '.join(SERVER_SETUPS)})",
    )
    load.add_argument("--concurrency", type=int, default=32, help="keep-alive connections")
    load.add_argument("--duration", type=float, default=None, help="seconds measured (10; 3 quick)")
    load.add_argument("--warmup", type=float, default=None, help="seconds of warm-up (2; 1 quick)")
    size = p.add_argument_group("sizes (quick value in brackets)")
    size.add_argument("--search-rows", type=int, default=None, help="1,000,000 [200,000]")
    size.add_argument("--import-rows", type=int, default=None, help="100,000 [20,000]")
    size.add_argument("--export-rows", type=int, default=None, help="1,000,000 [200,000]")
    size.add_argument("--sync-count", type=int, default=None, help="100,000 [10,000]")
    size.add_argument("--mailman-members", type=int, default=None, help="500 [100]")
    size.add_argument("--mailman-slices", type=int, default=None, help="5 [2]")
    sync = p.add_argument_group("sync_mailgun and sync_mailman")
    sync.add_argument(
        "--fresh-opt-in",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Mailgun jobs with fresh_opt_in (re-subscriptions: two suppression calls each)",
    )
    sync.add_argument(
        "--clear-suppressions",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the mailgun backend's clear_suppressions setting",
    )
    sync.add_argument(
        "--worker-concurrency", type=int, default=None, help="worker_concurrency for Mailman"
    )
    sync.add_argument("--profile", action="store_true", help="cProfile the Mailman worker rounds")
    return p


def parse(argv: list[str] | None = None, *, only: str | None = None) -> argparse.Namespace:
    options = parser().parse_args(argv)
    if only is not None and options.only is None:
        options.only = [[only]]
    chosen = [name for group in options.only or [list(SCENARIOS)] for name in group]
    skipped = {name for group in options.skip for name in group}
    options.scenarios = [name for name in SCENARIOS if name in chosen and name not in skipped]
    options.databases = list(
        dict.fromkeys(
            name for group in options.databases or [["sqlite", "postgresql"]] for name in group
        )
    )
    options.setups = list(
        dict.fromkeys(name for group in options.setups or [list(SERVER_SETUPS)] for name in group)
    )
    quick = options.quick

    def pick(value: Any, full: Any, short: Any) -> Any:
        return value if value is not None else (short if quick else full)

    options.duration = pick(options.duration, 10.0, 3.0)
    options.warmup = pick(options.warmup, 2.0, 1.0)
    options.search_rows = pick(options.search_rows, 1_000_000, 200_000)
    options.import_rows = pick(options.import_rows, 100_000, 20_000)
    options.export_rows = pick(options.export_rows, 1_000_000, 200_000)
    options.sync_count = pick(options.sync_count, 100_000, 10_000)
    options.mailman_members = pick(options.mailman_members, 500, 100)
    options.mailman_slices = pick(options.mailman_slices, 5, 2)
    options.extra_env = dict(options.env)
    if not 1 <= options.concurrency <= 1000:
        raise SystemExit("--concurrency must be between 1 and 1000")
    return options


# --------------------------------------------------------------------------------------
# Databases


def postgres_conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def check_postgres_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing a non-loopback PostgreSQL host: {parts.hostname!r}")
    if parts.path.lstrip("/") != "bench":
        raise SystemExit("the benchmark empties its database: it only uses the database `bench`")
    return url


def reset_postgres(url: str) -> None:
    """Create the database `bench` if missing, and empty it: the service migrates it anew."""
    import psycopg

    check_postgres_url(url)
    conninfo = postgres_conninfo(url)
    try:
        connection = psycopg.connect(conninfo, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as e:
        if "does not exist" not in str(e):
            raise
        parts = urlsplit(conninfo)
        admin = parts._replace(path="/postgres").geturl()
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as server:
            server.execute("CREATE DATABASE bench")
        connection = psycopg.connect(conninfo, autocommit=True, connect_timeout=10)
    with connection:
        connection.execute("DROP SCHEMA IF EXISTS public CASCADE")
        connection.execute("CREATE SCHEMA public")


def postgres_backends(url: str) -> list[int]:
    """The pids of the PostgreSQL server processes serving the database of `url` (one per
    connection of the service and of its worker), for their CPU time. Read over a
    connection of its own, left out."""
    import psycopg

    with psycopg.connect(postgres_conninfo(url), autocommit=True, connect_timeout=10) as c:
        rows = c.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return [int(pid) for (pid,) in rows]


def postgres_setting(url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(postgres_conninfo(url), autocommit=True, connect_timeout=10) as c:
        row = c.execute(f"SHOW {name}").fetchone()  # a fixed name, not input
    return str(row[0]) if row else "?"


def fresh_database(kind: str, folder: Path, options: argparse.Namespace, name: str) -> str:
    """A new SQLite file in `folder`, or the emptied PostgreSQL database `bench`."""
    if kind == "sqlite":
        return f"sqlite:///{folder / name}"
    reset_postgres(options.postgres_url)
    return str(options.postgres_url)


# Confirmed subscribers, each with its confirming ledger event: one INSERT ... SELECT per
# table, generated inside the database (a million rows in seconds, not a Python loop).
_SQLITE_SEED = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :rows)
INSERT INTO subscription (list_id, email, email_key, status, locale, attributes,
    consent_version, created_at, updated_at, confirmed_at)
SELECT :list_id, 'seed' || i || '@example.org', 'seed' || i || '@example.org', 'confirmed',
    'fr', '{"org": "DINUM"}', '2026-11', :now, :now, :now FROM n;
"""
_SQLITE_SEED_EVENTS = """
INSERT INTO consent_event (subscription_id, list_id, action, status_after, source,
    consent_version, ip, user_agent, detail, occurred_at)
SELECT id, list_id, 'confirmed', 'confirmed', 'link', '2026-11', '192.0.2.1',
    'Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0', '{}', :now
FROM subscription;
"""
_POSTGRES_SEED = """
INSERT INTO subscription (list_id, email, email_key, status, locale, attributes,
    consent_version, created_at, updated_at, confirmed_at)
SELECT %(list_id)s, 'seed' || i || '@example.org', 'seed' || i || '@example.org',
    'confirmed', 'fr', '{"org": "DINUM"}', '2026-11', now(), now(), now()
FROM generate_series(1, %(rows)s) AS i;
"""
_POSTGRES_SEED_EVENTS = """
INSERT INTO consent_event (subscription_id, list_id, action, status_after, source,
    consent_version, ip, user_agent, detail, occurred_at)
SELECT id, list_id, 'confirmed', 'confirmed', 'link', '2026-11', '192.0.2.1',
    'Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0', '{}', now()
FROM subscription;
"""


def seed_confirmed(url: str, rows: int) -> float:
    """`rows` confirmed subscribers of the list `bluehats` (which must exist); seconds taken."""
    started = time.perf_counter()
    if url.startswith("sqlite:"):
        connection = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            list_id = connection.execute(
                "SELECT id FROM mailing_list WHERE slug = ?", (LIST_SLUG,)
            ).fetchone()[0]
            # The text form the app's UTCDateTime column writes on SQLite.
            now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
            connection.execute(_SQLITE_SEED, {"rows": rows, "list_id": list_id, "now": now})
            connection.execute(_SQLITE_SEED_EVENTS, {"now": now})
            connection.commit()
            connection.execute("ANALYZE")
        finally:
            connection.close()
    else:
        import psycopg

        with psycopg.connect(postgres_conninfo(url), autocommit=True, connect_timeout=10) as c:
            row = c.execute("SELECT id FROM mailing_list WHERE slug = %s", (LIST_SLUG,)).fetchone()
            assert row is not None
            c.execute(_POSTGRES_SEED, {"rows": rows, "list_id": row[0]})
            c.execute(_POSTGRES_SEED_EVENTS)
            c.execute("ANALYZE")
    return round(time.perf_counter() - started, 1)


# --------------------------------------------------------------------------------------
# Processes: the `newsletter` command, CPU and memory


def newsletter_command() -> str:
    here = Path(sys.executable).parent / "newsletter"
    if here.exists():
        return str(here)
    venv = ROOT / ".venv" / "bin" / "newsletter"
    if venv.exists():
        return str(venv)
    found = shutil.which("newsletter")
    if found is None:
        raise SystemExit("cannot find the `newsletter` command; run `make bench` (installs it)")
    return found


def service_env(database_url: str, workdir: Path, extra: dict[str, str]) -> dict[str, str]:
    """The environment of a `newsletter` process: this database, nothing from the caller's
    NEWSLETTER_* variables, the file mailer in `workdir`, quiet logs, no abuse limits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(
        {
            "NEWSLETTER_DATABASE_URL": database_url,
            "NEWSLETTER_SECRET_KEY": SECRET_KEY,
            "NEWSLETTER_MAILER__KIND": "file",
            "NEWSLETTER_MAILER__DIRECTORY": str(workdir / "mail"),
            "NEWSLETTER_LOG_LEVEL": "WARNING",
            # One loopback client sends everything: the abuse limits would answer 429 or
            # hold mails back. tests/test_ratelimit.py measures them, not this suite.
            "NEWSLETTER_RATE_LIMIT_PER_IP": "off",
            "NEWSLETTER_RATE_LIMIT_PER_ADDRESS": "off",
            "NEWSLETTER_RATE_LIMIT_PER_DOMAIN": "off",
            "NEWSLETTER_MAIL_BUDGET": "off",
            **extra,
        }
    )
    return env


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces; fields after it are space-separated.
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_memory_mib(pid: int, field_name: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def process_memory_parts_mib(pid: int) -> dict[str, float]:
    """A process's resident memory split into its own pages and pages it shares with other
    processes (libraries mapped from the same files), from /proc/<pid>/smaps_rollup."""
    fields = {"Private_Clean", "Private_Dirty", "Shared_Clean", "Shared_Dirty"}
    kib: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in fields:
                    kib[name] = int(rest.split()[0])
    except OSError:
        return {"private": 0.0, "shared": 0.0}
    return {
        "private": (kib.get("Private_Clean", 0) + kib.get("Private_Dirty", 0)) / 1024,
        "shared": (kib.get("Shared_Clean", 0) + kib.get("Shared_Dirty", 0)) / 1024,
    }


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (uvicorn's workers are children of its supervisor)."""
    found = [pid]
    for current in found:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    found.extend(int(child) for child in f.read().split())
    return found


def tree_cpu(pid: int) -> float:
    return sum(tree_cpus(pid).values())


def _is_worker(pid: int) -> bool:
    """A uvicorn worker process, not multiprocessing's resource tracker beside them."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" not in f.read()
    except OSError:
        return False


def tree_cpus(pid: int) -> dict[int, float]:
    """CPU seconds of the process and of each of its descendants, by pid."""
    return {p: process_cpu(p) for p in process_tree(pid)}


def _cpus(pids: Iterable[int]) -> dict[int, float]:
    return {pid: process_cpu(pid) for pid in pids}


def tree_rss_mib(pid: int) -> float:
    return sum(process_memory_mib(p) for p in process_tree(pid))


def machine_busy() -> float:
    """CPU seconds spent not idle, summed over all cores, since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS


def busy_cores(seconds: float = 1.0) -> float:
    """Cores kept busy by others over a short quiet moment, before a measurement starts."""
    before = machine_busy()
    time.sleep(seconds)
    return round((machine_busy() - before) / seconds, 2)


def warn_if_busy(label: str) -> float:
    busy = busy_cores()
    if busy > BACKGROUND_WARNING:
        print(f"   WARNING: {busy:.2f} cores busy before {label}: other work skews these figures")
    return busy


@dataclass
class Measured:
    """One `newsletter ...` process run to its end: time, CPU, its own peak memory."""

    command: str
    exit_code: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    stdout_tail: str
    stderr_tail: str


# Starts the measured command and reports its wait4(2) figures as JSON. Linux seeds a new
# program's ru_maxrss with the peak of the process image it replaces: a child of the suite
# (which holds the app, seeded data, a fake server...) would report at least the suite's
# own size. A child of this small launcher starts from the launcher's ~10 MB instead.
_LAUNCHER = """
import json, os, sys, time
timeout, out_path, err_path, *command = sys.argv[1:]
with open(out_path, "wb") as out, open(err_path, "wb") as err:
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        os.execv(command[0], command)
deadline = started + float(timeout)
while True:
    found, status, usage = os.wait4(pid, os.WNOHANG)
    if found == pid:
        break
    if time.perf_counter() > deadline:
        os.kill(pid, 9)
        found, status, usage = os.wait4(pid, 0)
        break
    time.sleep(0.02)
print(json.dumps({
    "exit_code": os.waitstatus_to_exitcode(status),
    "wall_s": time.perf_counter() - started,
    "cpu_s": usage.ru_utime + usage.ru_stime,
    "maxrss_kb": usage.ru_maxrss,
}))
"""


def run_measured(
    args: list[str], *, env: dict[str, str], cwd: Path, timeout: float = 1800.0
) -> Measured:
    """Run `newsletter args...`; peak memory and CPU come from wait4(2) on its pid, so a short
    spike is not missed (Linux reports ru_maxrss in kilobytes)."""
    out_path, err_path = cwd / "stdout.txt", cwd / "stderr.txt"
    launcher_args = [str(timeout), str(out_path), str(err_path), newsletter_command(), *args]
    launcher = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _LAUNCHER, *launcher_args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout + 60,
    )
    figures = json.loads(launcher.stdout)
    measured = Measured(
        command="newsletter " + " ".join(args),
        exit_code=int(figures["exit_code"]),
        wall_s=round(figures["wall_s"], 2),
        cpu_s=round(figures["cpu_s"], 2),
        peak_rss_mb=round(figures["maxrss_kb"] / 1024, 1),
        stdout_tail=out_path.read_text(errors="replace")[-2000:],
        stderr_tail=err_path.read_text(errors="replace")[-2000:],
    )
    if measured.exit_code != 0:
        raise RuntimeError(
            f"{measured.command} exited {measured.exit_code}:\n"
            f"{measured.stdout_tail}\n{measured.stderr_tail}"
        )
    return measured


# --------------------------------------------------------------------------------------
# The server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    log_path: Path
    started_at: float
    ready_after_s: float = math.nan

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def mails_written(self) -> int:
        try:
            mail_dir = self.workdir / "mail"
            return sum(1 for entry in os.scandir(mail_dir) if entry.name.endswith(".eml"))
        except FileNotFoundError:
            return 0


def start_process(
    args: list[str], *, env: dict[str, str], workdir: Path, log_name: str
) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = workdir / log_name
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [newsletter_command(), *args],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return process, log_path


@contextlib.contextmanager
def running_server(
    *, database_url: str, workdir: Path, workers: int = 1, extra_env: dict[str, str] | None = None
) -> Iterator[Server]:
    """`newsletter serve` on a loopback port, ready (its /readyz answered 200) when yielded."""
    port = free_port()
    env = service_env(database_url, workdir, {
        "NEWSLETTER_PUBLIC_URL": f"http://{LOOPBACK}:{port}",
        **(extra_env or {}),
    })  # fmt: skip
    args = ["serve", "--host", LOOPBACK, "--port", str(port), "--workers", str(workers)]
    started = time.perf_counter()
    process, log_path = start_process(args, env=env, workdir=workdir, log_name=f"serve-{port}.log")
    server = Server(
        process=process, port=port, workdir=workdir, log_path=log_path, started_at=started
    )
    try:
        server.ready_after_s = wait_ready(server)
        yield server
    finally:
        stop_process(process, label="server", log_path=log_path)


@contextlib.contextmanager
def running_worker(
    *, database_url: str, workdir: Path, server: Server, extra_env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """`newsletter worker` beside `server` (its outbox worker apart), stopped with SIGTERM."""
    env = service_env(
        database_url, workdir, {"NEWSLETTER_PUBLIC_URL": server.base_url, **extra_env}
    )
    worker, log = start_process(["worker"], env=env, workdir=workdir, log_name="worker.log")
    try:
        yield worker
    finally:
        stop_process(worker, label="worker", log_path=log)


def wait_ready(server: Server, *, timeout: float = START_TIMEOUT, every: float = 0.01) -> float:
    """Seconds from the process's start to the first 200 from /readyz (polled every 10 ms)."""
    request = f"GET /readyz HTTP/1.1\r\nhost: {LOOPBACK}:{server.port}\r\nconnection: close\r\n\r\n"
    deadline = server.started_at + timeout
    while time.perf_counter() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"the server exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        with contextlib.suppress(OSError):
            with socket.create_connection((LOOPBACK, server.port), timeout=5) as s:
                s.sendall(request.encode())
                answer = s.recv(64)
            if answer.startswith(b"HTTP/1.1 200"):
                return time.perf_counter() - server.started_at
        time.sleep(every)
    raise RuntimeError(f"the server was not ready within {timeout:.0f} s:\n{server.log_tail()}")


def stop_process(process: subprocess.Popen[bytes], *, label: str, log_path: Path) -> None:
    """SIGTERM, then wait: uvicorn finishes the requests in hand and the worker its jobs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"   the {label} did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM; killing it")
            process.kill()
            process.wait(timeout=10)
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return
    problems = [line for line in lines if "ERROR" in line or "Traceback" in line]
    if problems:
        print(f"   WARNING: the {label} logged {len(problems)} error line(s); last lines:")
        print("   " + "\n   ".join(lines[-15:]))


# --------------------------------------------------------------------------------------
# The load generator

# A request: method, path, body (JSON) or None, extra header lines.
Request = tuple[str, str, bytes | None, str]
# Returns the next request, or None when it has none left (a pool of tokens, say).
RequestFactory = Callable[[], Request | None]


class RawConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams.

    httpx.AsyncClient costs this process about 2 ms of CPU per request, which on 2 cores
    caps the trivial endpoint and so measures the client; this one costs a tenth of that
    (the `loadgen` scenario measures it). It reads what uvicorn sends: Content-Length or
    chunked bodies, `connection: close`.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None, headers: str) -> str:
        """Send one request, read the whole answer; returns its status code or the error."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await self._exchange(method, path, body, headers)
        except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, TimeoutError) as e:
            await self.close()
            return type(e).__name__

    async def open(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def _exchange(self, method: str, path: str, body: bytes | None, headers: str) -> str:
        await self.open()
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
        head += "user-agent: newsletter-bench\r\naccept: application/json\r\n" + headers
        if body is not None:
            head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        elif method == "POST":
            head += "content-length: 0\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        block = await self.reader.readuntil(b"\r\n\r\n")
        lines = block.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)[1]
        answer = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            answer[name.strip().lower()] = value.strip().lower()
        if "content-length" in answer:
            await self.reader.readexactly(int(answer["content-length"]))
        elif answer.get("transfer-encoding") == "chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        if answer.get("connection") == "close":
            await self.close()
        return status

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@dataclass
class LoadResult:
    requests: int
    ok: int
    errors: int
    elapsed_s: float
    ok_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int]
    # CPU seconds per wall second: 1.0 = one core busy all along.
    server_cpu_cores: float
    loadgen_cpu_cores: float
    machine_busy_cores: float
    # The factory ran dry before the end of the window (a pool of tokens).
    exhausted: bool = False
    # CPU seconds per wall second of the other processes `load` was asked to watch, by
    # name: the PostgreSQL server processes of the service's connections ("database"), a
    # separate outbox worker ("worker").
    others_cpu_cores: dict[str, float] = field(default_factory=dict)
    # The cores of each of uvicorn's worker processes (not their idle supervisor nor
    # multiprocessing's resource tracker), busiest first; empty for a server of one
    # process. The kernel hands the clients' connections to whichever worker accepts
    # first, not always half to each.
    server_cores_by_process: list[float] = field(default_factory=list)

    def split(self) -> str:
        """ " (0.98 + 0.05 by process)" for a server of several processes, else ""."""
        if len(self.server_cores_by_process) < 2:
            return ""
        return f" ({' + '.join(f'{c:.2f}' for c in self.server_cores_by_process)} by process)"

    def cpu_ms_per_answer(self) -> dict[str, float]:
        """Milliseconds of CPU each 2xx answer cost: the server's ("api"), and each watched
        process group's. What a machine of any size needs per request, whatever waited."""
        if not self.ok:
            return {}
        per = {"api": self.server_cpu_cores, **self.others_cpu_cores}
        return {name: round(cores * 1000 / self.ok_per_s, 3) for name, cores in per.items()}

    def summary(self) -> str:
        return (
            f"{self.ok_per_s:8.1f} ok/s  p50 {self.p50_ms:7.2f} ms  p99 {self.p99_ms:7.2f} ms  "
            f"errors {self.errors}  server {self.server_cpu_cores:.2f} cores{self.split()}  "
            + "".join(
                f"{name} {cores:.2f} cores  " for name, cores in self.others_cpu_cores.items()
            )
            + f"loadgen {self.loadgen_cpu_cores:.2f} cores"
        )


async def _drive(
    connections: list[RawConnection], make: RequestFactory, *, duration: float
) -> tuple[list[float], Counter[str], float, bool]:
    """One loop per connection, each sending its next request when the last is answered."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    exhausted = False
    start = time.perf_counter()
    deadline = start + duration

    async def user(connection: RawConnection) -> None:
        nonlocal exhausted
        while time.perf_counter() < deadline:
            request = make()
            if request is None:
                exhausted = True
                return
            method, path, body, headers = request
            sent = time.perf_counter()
            outcome = await connection.request(method, path, body, headers)
            latencies.append(time.perf_counter() - sent)
            statuses[outcome] += 1

    await asyncio.wait_for(
        asyncio.gather(*(user(connection) for connection in connections)),
        timeout=duration + REQUEST_TIMEOUT + 10,
    )
    return latencies, statuses, time.perf_counter() - start, exhausted


# The pause between two connections' openings. Opened all at once, a server of several
# processes sharing one listening socket often saw every connection taken by the process
# that woke first (asyncio accepts all that wait): healthz measured on one process of two.
CONNECT_GAP_S = 0.005


async def _open_apart(connections: list[RawConnection]) -> None:
    """Open the connections one after another, so that each wakes every server process
    and any of them may take it."""
    for connection in connections:
        with contextlib.suppress(OSError):
            await connection.open()
        await asyncio.sleep(CONNECT_GAP_S)


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def load(
    port: int,
    make: RequestFactory,
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    server_pid: int | None = None,
    keep: list[float] | None = None,
    others: dict[str, Callable[[], list[int]]] | None = None,
) -> LoadResult:
    """`concurrency` closed-loop clients for `warmup` seconds, then `duration` measured;
    `keep` receives every measured latency (seconds), to pool several windows. `others`
    names groups of processes (a function giving their pids) whose CPU over the window is
    reported beside the server's."""
    watched = others or {}

    async def both() -> tuple[
        list[float], Counter[str], float, bool, dict[int, float], float, float, dict[str, float]
    ]:
        connections = [RawConnection(LOOPBACK, port) for _ in range(concurrency)]
        try:
            await _open_apart(connections)
            if warmup > 0:
                await _drive(connections, make, duration=warmup)
            others_before = {name: _cpus(pids()) for name, pids in watched.items()}
            server_before = tree_cpus(server_pid) if server_pid else {}
            own_cpu = time.process_time()
            busy = machine_busy()
            latencies, statuses, elapsed, exhausted = await _drive(
                connections, make, duration=duration
            )
            server_after = tree_cpus(server_pid) if server_pid else {}
            own_cpu = time.process_time() - own_cpu
            busy = machine_busy() - busy
            # A process that started in the window counts from zero.
            others_cpu = {
                name: sum(
                    seconds - others_before[name].get(pid, 0.0)
                    for pid, seconds in _cpus(pids()).items()
                )
                for name, pids in watched.items()
            }
        finally:
            for connection in connections:
                await connection.close()
        server_cpu = {
            pid: seconds - server_before.get(pid, 0.0) for pid, seconds in server_after.items()
        }
        return latencies, statuses, elapsed, exhausted, server_cpu, own_cpu, busy, others_cpu

    with _runner() as runner:
        (latencies, statuses, elapsed, exhausted, by_process, own_cpu, busy, others_cpu) = (
            runner.run(both())
        )
    server_cpu = sum(by_process.values())
    latencies.sort()
    if keep is not None:
        keep.extend(latencies)
    requests = len(latencies)
    ok = sum(count for code, count in statuses.items() if code.startswith("2"))
    elapsed = max(elapsed, 1e-9)
    return LoadResult(
        requests=requests,
        ok=ok,
        errors=requests - ok,
        elapsed_s=round(elapsed, 3),
        ok_per_s=round(ok / elapsed, 1),
        p50_ms=round(percentile(latencies, 0.50) * 1000, 2),
        p90_ms=round(percentile(latencies, 0.90) * 1000, 2),
        p99_ms=round(percentile(latencies, 0.99) * 1000, 2),
        max_ms=round(latencies[-1] * 1000, 2) if latencies else math.nan,
        statuses=dict(sorted(statuses.items())),
        server_cpu_cores=round(server_cpu / elapsed, 2),
        loadgen_cpu_cores=round(own_cpu / elapsed, 2),
        machine_busy_cores=round(busy / elapsed, 2),
        exhausted=exhausted,
        others_cpu_cores={name: round(cpu / elapsed, 3) for name, cpu in others_cpu.items()},
        server_cores_by_process=sorted(
            (
                round(seconds / elapsed, 2)
                for pid, seconds in by_process.items()
                if pid != server_pid and _is_worker(pid)
            ),
            reverse=True,
        ),
    )


# The trivial server the load generator is measured against: a fixed answer, no framework.
_STATIC_ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n"
    b'{"status":"ok"}'
)


async def _static_server(port: int) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(_STATIC_ANSWER)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(answer, LOOPBACK, port)
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def static_server() -> Iterator[tuple[int, int]]:
    """The static server in its own process (port, pid), as the service would be."""
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "static-server", str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 1):
                break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the static server did not start")
            time.sleep(0.05)
        yield port, process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)


if __name__ == "__main__" and sys.argv[1:2] == ["static-server"]:
    with _runner() as _loop, contextlib.suppress(KeyboardInterrupt):
        _loop.run(_static_server(int(sys.argv[2])))
