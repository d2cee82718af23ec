"""Subscribe throughput against the real server: how close is `POST .../subscriptions` to a
trivial endpoint on the same process?

For each database (SQLite file, PostgreSQL database `bench` on loopback) the script starts
`newsletter serve` with ONE uvicorn process (API + in-process outbox worker + file mailer),
waits for /readyz, then drives each scenario with a fixed number of concurrent keep-alive
connections from this process, after a short warm-up. The load generator is a minimal
asyncio HTTP/1.1 client (`--client httpx` uses httpx.AsyncClient instead, which needs ten
times the CPU per request and, on a small machine, measures itself rather than the server):

    healthz     GET  /healthz                                   (the trivial endpoint)
    subscribe   POST /v1/lists/bluehats/subscriptions           (a new address every request)

It prints requests/s, p50/p99 latency, non-2xx count, CPU use, and the ratio
subscribe rate / healthz rate; the same figures go to bench/results/subscribe.json.
It is a measurement, not a test: it never fails on a slow figure.

    .venv/bin/python bench/subscribe.py [--databases sqlite postgresql] [--concurrency 32]
                                        [--duration 10] [--warmup 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = ROOT / "bench" / "results" / "subscribe.json"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/bench"
LOOPBACK = "127.0.0.1"
LIST_SLUG = "bluehats"
DATABASES = ("sqlite", "postgresql")
SCENARIOS = ("healthz", "subscribe")
START_TIMEOUT = 90.0  # migrations + start-up
STOP_TIMEOUT = 30.0  # the worker drains the jobs in hand on SIGTERM
REQUEST_TIMEOUT = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BACKGROUND_WARNING = 0.25  # cores busy before a run that make its figures suspect

# --------------------------------------------------------------------------------------
# Figures


@dataclass
class ScenarioResult:
    scenario: str
    requests: int
    ok: int
    errors: int
    elapsed_s: float
    requests_per_s: float
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
    mails_written: int | None = None


@dataclass
class DatabaseRun:
    database: str
    url: str
    # Cores busy on the machine just before the server started (other work skews figures).
    background_busy_cores: float = 0.0
    scenarios: dict[str, ScenarioResult] = field(default_factory=dict)
    subscribe_vs_healthz: float | None = None


def _percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces; fields after it are space-separated.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _background_load(seconds: float = 1.0) -> float:
    """Cores busy over a short quiet moment, before anything of ours runs."""
    before = _machine_busy()
    time.sleep(seconds)
    return (_machine_busy() - before) / seconds


def _machine_busy() -> float:
    """CPU seconds spent not idle, summed over all cores, since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS


# --------------------------------------------------------------------------------------
# The server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _newsletter_command() -> str:
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


def _check_postgres_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing a non-loopback PostgreSQL host: {parts.hostname!r}")
    if parts.path.lstrip("/") != "bench":
        raise SystemExit("the benchmark empties its database: it only uses the database `bench`")
    return url


def _reset_postgres(url: str) -> None:
    """Empty the `bench` database: the server migrates it from scratch at start."""
    import psycopg

    conninfo = url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as connection:
        connection.execute("DROP SCHEMA IF EXISTS public CASCADE")
        connection.execute("CREATE SCHEMA public")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    mail_dir: Path
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def mails_written(self) -> int:
        try:
            return sum(1 for entry in os.scandir(self.mail_dir) if entry.name.endswith(".eml"))
        except FileNotFoundError:
            return 0


@contextlib.contextmanager
def running_server(
    *, database_url: str, workdir: Path, extra_env: dict[str, str]
) -> Iterator[Server]:
    port = _free_port()
    base_url = f"http://{LOOPBACK}:{port}"
    mail_dir = workdir / "mail"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(
        {
            "NEWSLETTER_DATABASE_URL": database_url,
            "NEWSLETTER_PUBLIC_URL": base_url,
            "NEWSLETTER_MAILER__KIND": "file",
            "NEWSLETTER_MAILER__DIRECTORY": str(mail_dir),
            # The embedded default keeps its key in a file; keep it out of the work tree.
            "NEWSLETTER_SECRET_KEY_FILE": str(workdir / "secret.key"),
            "NEWSLETTER_LOG_LEVEL": "WARNING",
            # One loopback client sends everything: the abuse limits would answer 429 or
            # hold mails back. They are measured by tests/test_ratelimit.py, not here;
            # `--env NEWSLETTER_RATE_LIMIT_PER_IP=20/minute` puts one back.
            "NEWSLETTER_RATE_LIMIT_PER_IP": "off",
            "NEWSLETTER_RATE_LIMIT_PER_ADDRESS": "off",
            "NEWSLETTER_RATE_LIMIT_PER_DOMAIN": "off",
            "NEWSLETTER_MAIL_BUDGET": "off",
            **extra_env,
        }
    )
    log_path = workdir / "server.log"
    command = [_newsletter_command(), "serve", "--host", LOOPBACK, "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(process=process, base_url=base_url, mail_dir=mail_dir, log_path=log_path)
    try:
        _wait_ready(server)
        yield server
    finally:
        _stop(server)


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with httpx.Client(base_url=server.base_url, timeout=5.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {server.process.returncode}:\n{server.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/readyz").status_code == 200:
                    return
            time.sleep(0.2)
    raise RuntimeError(
        f"the server was not ready within {START_TIMEOUT:.0f} s:\n{server.log_tail()}"
    )


def _stop(server: Server) -> None:
    """SIGTERM, then wait: uvicorn finishes the requests in hand and the lifespan stops the
    worker (it finishes its jobs in hand and gives back the rest)."""
    process = server.process
    if process.poll() is None:
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"   the server did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM; killing it")
            process.kill()
            process.wait(timeout=10)
        # uvicorn shuts down gracefully, then raises the signal it caught again: -SIGTERM.
        clean = process.returncode in (0, -signal.SIGTERM)
        print(
            f"   server stopped {'cleanly' if clean else 'UNCLEANLY'} "
            f"(exit status {process.returncode}) after {time.monotonic() - started:.1f} s"
        )
    problems = [
        line
        for line in server.log_tail(10_000).splitlines()
        if "ERROR" in line or "Traceback" in line
    ]
    if problems:
        print(f"   WARNING: the server logged {len(problems)} error line(s); last lines:")
        print("   " + server.log_tail(15).replace("\n", "\n   "))


# --------------------------------------------------------------------------------------
# The load


# A request: method, path, JSON body or None.
Request = tuple[str, str, bytes | None]
RequestFactory = Callable[[], Request]


def _factory(scenario: str, run_id: str) -> RequestFactory:
    if scenario == "healthz":
        return lambda: ("GET", "/healthz", None)
    if scenario == "subscribe":
        counter = itertools.count()
        path = f"/v1/lists/{LIST_SLUG}/subscriptions"

        def subscribe() -> Request:
            email = f"bench-{run_id}-{next(counter)}@example.org"
            return ("POST", path, json.dumps({"email": email}).encode())

        return subscribe
    raise ValueError(scenario)


class RawConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams.

    httpx costs this process about 2 ms of CPU per request, so on 2 cores it, not the
    server, set the pace of the trivial endpoint; this minimal client costs a tenth of that.
    It understands what uvicorn sends: Content-Length or chunked bodies, `connection: close`.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None) -> str:
        """Send one request, read the whole answer; returns its status code."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await self._exchange(method, path, body)
        except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, TimeoutError) as e:
            await self.close()
            return type(e).__name__

    async def _exchange(self, method: str, path: str, body: bytes | None) -> str:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
        head += "user-agent: newsletter-bench\r\naccept: application/json\r\n"
        if body is not None:
            head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        block = await self.reader.readuntil(b"\r\n\r\n")
        lines = block.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)[1]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if "content-length" in headers:
            await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        if headers.get("connection") == "close":
            await self.close()
        return status

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class HttpxConnections:
    """The same interface over one shared httpx.AsyncClient (`--client httpx`)."""

    def __init__(self, base_url: str, concurrency: int) -> None:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = httpx.AsyncClient(
            base_url=base_url,
            limits=limits,
            timeout=REQUEST_TIMEOUT,
            trust_env=False,  # loopback only: never through a proxy from the environment
            headers={"user-agent": "newsletter-bench", "accept": "application/json"},
        )

    async def request(self, method: str, path: str, body: bytes | None) -> str:
        headers = {"content-type": "application/json"} if body is not None else None
        try:
            response = await self.client.request(method, path, content=body, headers=headers)
        except httpx.HTTPError as e:
            return type(e).__name__
        return str(response.status_code)

    async def close(self) -> None:
        await self.client.aclose()


async def _drive(
    connections: list[RawConnection] | list[HttpxConnections],
    make: RequestFactory,
    *,
    duration: float,
) -> tuple[list[float], Counter[str], float]:
    """One loop per connection, each sending its next request when the last is answered."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    start = time.perf_counter()
    deadline = start + duration

    async def user(connection: RawConnection | HttpxConnections) -> None:
        while time.perf_counter() < deadline:
            method, path, body = make()
            sent = time.perf_counter()
            outcome = await connection.request(method, path, body)
            latencies.append(time.perf_counter() - sent)
            statuses[outcome] += 1

    await asyncio.wait_for(
        asyncio.gather(*(user(connection) for connection in connections)),
        timeout=duration + REQUEST_TIMEOUT + 10,
    )
    return latencies, statuses, time.perf_counter() - start


async def run_scenario(
    server: Server,
    scenario: str,
    *,
    client: str,
    concurrency: int,
    duration: float,
    warmup: float,
) -> ScenarioResult:
    connections: list[RawConnection] | list[HttpxConnections]
    if client == "raw":
        parts = urlsplit(server.base_url)
        assert parts.hostname is not None
        assert parts.port is not None
        connections = [RawConnection(parts.hostname, parts.port) for _ in range(concurrency)]
    else:
        # One shared client; its pool holds `concurrency` connections.
        shared = HttpxConnections(server.base_url, concurrency)
        connections = [shared] * concurrency
    make = _factory(scenario, uuid.uuid4().hex[:8])
    try:
        if warmup > 0:
            await _drive(connections, make, duration=warmup)
        server_cpu = _process_cpu(server.process.pid)
        own_cpu = time.process_time()
        busy = _machine_busy()
        mails = server.mails_written()
        latencies, statuses, elapsed = await _drive(connections, make, duration=duration)
        server_cpu = _process_cpu(server.process.pid) - server_cpu
        own_cpu = time.process_time() - own_cpu
        busy = _machine_busy() - busy
        mails = server.mails_written() - mails
    finally:
        for connection in set(connections):
            await connection.close()

    latencies.sort()
    requests = len(latencies)
    ok = sum(count for code, count in statuses.items() if code.startswith("2"))
    return ScenarioResult(
        scenario=scenario,
        requests=requests,
        ok=ok,
        errors=requests - ok,
        elapsed_s=round(elapsed, 3),
        requests_per_s=round(requests / elapsed, 1),
        ok_per_s=round(ok / elapsed, 1),
        p50_ms=round(_percentile(latencies, 0.50) * 1000, 2),
        p90_ms=round(_percentile(latencies, 0.90) * 1000, 2),
        p99_ms=round(_percentile(latencies, 0.99) * 1000, 2),
        max_ms=round(latencies[-1] * 1000, 2) if latencies else math.nan,
        statuses=dict(sorted(statuses.items())),
        server_cpu_cores=round(server_cpu / elapsed, 2),
        loadgen_cpu_cores=round(own_cpu / elapsed, 2),
        machine_busy_cores=round(busy / elapsed, 2),
        mails_written=mails if scenario == "subscribe" else None,
    )


def _event_loop_runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def run_database(args: argparse.Namespace, database: str, extra_env: dict[str, str]) -> DatabaseRun:
    with tempfile.TemporaryDirectory(prefix="newsletter-bench-") as tmp:
        workdir = Path(tmp)
        if database == "sqlite":
            url = f"sqlite:///{workdir / 'newsletter.db'}"
        else:
            url = _check_postgres_url(args.postgres_url)
            _reset_postgres(url)
        run = DatabaseRun(database=database, url=url, background_busy_cores=_background_load())
        if run.background_busy_cores > BACKGROUND_WARNING:
            print(
                f"   WARNING: {run.background_busy_cores:.2f} cores already busy before the run "
                "(another process); the figures below are skewed"
            )
        print(f"\n== {database}: starting `newsletter serve` (1 uvicorn process) on {url}")
        with running_server(database_url=url, workdir=workdir, extra_env=extra_env) as server:
            print(f"   ready at {server.base_url} (pid {server.process.pid})")
            for scenario in args.scenarios:
                print(
                    f"   {scenario}: {args.warmup:g} s warm-up, then {args.duration:g} s "
                    f"at concurrency {args.concurrency} ...",
                    flush=True,
                )
                with _event_loop_runner() as runner:
                    result = runner.run(
                        run_scenario(
                            server,
                            scenario,
                            client=args.client,
                            concurrency=args.concurrency,
                            duration=args.duration,
                            warmup=args.warmup,
                        )
                    )
                run.scenarios[scenario] = result
                print(
                    f"     {result.requests_per_s:8.1f} req/s  p50 {result.p50_ms:7.2f} ms  "
                    f"p99 {result.p99_ms:7.2f} ms  errors {result.errors}  "
                    f"server CPU {result.server_cpu_cores:.2f} cores"
                )
            if server.process.poll() is not None:
                raise RuntimeError(f"the server died during the run:\n{server.log_tail()}")
        health, sub = run.scenarios.get("healthz"), run.scenarios.get("subscribe")
        if health and sub and health.ok_per_s > 0:
            run.subscribe_vs_healthz = round(sub.ok_per_s / health.ok_per_s, 4)
    return run


# --------------------------------------------------------------------------------------
# Report


def _cpu_note(cores: int | None) -> str:
    return (
        f"This machine has {cores} CPU core(s). The load generator (this process), the server "
        "(one uvicorn process: API + in-process outbox worker writing .eml files) and, for "
        "the PostgreSQL run, the PostgreSQL backends all share them, so absolute rates are "
        "lower than on a dedicated server; compare the ratio, and read the CPU columns "
        "(cores busy: server = the uvicorn process, loadgen = this process, machine = all)."
    )


def print_table(runs: list[DatabaseRun], args: argparse.Namespace) -> None:
    header = (
        f"{'database':<11}{'scenario':<11}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'errors':>8}{'server':>8}{'loadgen':>8}{'machine':>8}{'mails':>7}"
    )
    print()
    print(
        f"Results: {args.client} client, concurrency {args.concurrency}, "
        f"{args.duration:g} s per scenario after "
        f"{args.warmup:g} s warm-up; errors = responses other than 2xx (and transport errors)"
    )
    print(header)
    print("-" * len(header))
    for run in runs:
        for result in run.scenarios.values():
            mails = "" if result.mails_written is None else str(result.mails_written)
            print(
                f"{run.database:<11}{result.scenario:<11}{result.requests_per_s:>9.1f}"
                f"{result.p50_ms:>9.2f}{result.p99_ms:>9.2f}{result.errors:>8}"
                f"{result.server_cpu_cores:>8.2f}{result.loadgen_cpu_cores:>8.2f}"
                f"{result.machine_busy_cores:>8.2f}{mails:>7}"
            )
    print("-" * len(header))
    for run in runs:
        if run.subscribe_vs_healthz is not None:
            print(
                f"{run.database}: subscribe / healthz rate (2xx only) = "
                f"{run.subscribe_vs_healthz * 100:.1f} %"
            )
    busy = [run for run in runs if run.background_busy_cores > BACKGROUND_WARNING]
    for run in busy:
        print(
            f"WARNING: {run.background_busy_cores:.2f} cores were busy before the {run.database} "
            "run started: other work shared the machine; run again when it is quiet."
        )
    print()
    print(_cpu_note(os.cpu_count()))
    print("mails = confirmation mails the in-process worker wrote during the subscribe window.")


def _git_commit() -> str | None:
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


def write_json(runs: list[DatabaseRun], args: argparse.Namespace, extra_env: dict[str, str]):
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "subscribe",
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "parameters": {
            "concurrency": args.concurrency,
            "client": args.client,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "server": "newsletter serve, 1 uvicorn process, in-process worker, file mailer",
            "server_env_overrides": extra_env,
        },
        "note": _cpu_note(os.cpu_count()),
        "runs": {
            run.database: {
                "url": run.url,
                "background_busy_cores": round(run.background_busy_cores, 2),
                "subscribe_vs_healthz": run.subscribe_vs_healthz,
                "scenarios": {name: asdict(result) for name, result in run.scenarios.items()},
            }
            for run in runs
        },
    }
    RESULTS_FILE.write_text(json.dumps(document, indent=2) + "\n")
    print(f"written to {RESULTS_FILE.relative_to(ROOT)}")


# --------------------------------------------------------------------------------------


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--databases",
        type=_names(DATABASES),
        nargs="+",
        default=[list(DATABASES)],
        help="sqlite, postgresql or both (comma or space separated; default: both)",
    )
    parser.add_argument(
        "--scenarios",
        type=_names(SCENARIOS),
        nargs="+",
        default=[list(SCENARIOS)],
        help="healthz, subscribe (default: both)",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="connections (default 32)")
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds measured per scenario (default 10)"
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of unmeasured load first (default 2)"
    )
    parser.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load generator: minimal asyncio HTTP/1.1 (default) or httpx.AsyncClient",
    )
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help=f"loopback database `bench`, emptied first (default {DEFAULT_POSTGRES_URL})",
    )
    parser.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="NEWSLETTER_NAME=VALUE",
        help="extra server setting, for experiments (e.g. NEWSLETTER_RUN_WORKER=false)",
    )
    args = parser.parse_args(argv)
    args.databases = list(dict.fromkeys(itertools.chain.from_iterable(args.databases)))
    args.scenarios = list(dict.fromkeys(itertools.chain.from_iterable(args.scenarios)))
    if not 1 <= args.concurrency <= 1000:
        parser.error("--concurrency must be between 1 and 1000")
    if not 0 < args.duration <= 600 or not 0 <= args.warmup <= 60:
        parser.error("--duration must be in (0, 600] and --warmup in [0, 60]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    extra_env = dict(args.env)
    print(
        f"subscribe benchmark: databases {', '.join(args.databases)}; "
        f"{os.cpu_count()} CPU core(s) shared by the load generator and the server"
    )
    runs = [run_database(args, database, extra_env) for database in args.databases]
    print_table(runs, args)
    write_json(runs, args, extra_env)


if __name__ == "__main__":
    main()
