"""Enumeration timing: do subscribe and unsubscribe-by-address take as long whatever the
address's state? The answers are identical byte for byte (tests/test_enumeration.py); this
measures whether their timing tells the states apart.

It starts `newsletter serve` (one uvicorn process, in-process worker, file mailer) on a
SQLite file on loopback, prepares a pool of addresses per state through the API (plus a
direct UPDATE for the states only a link or a backend can reach), then sends the measured
requests one at a time over one keep-alive connection, in a shuffled order so every state
meets the same background (worker, other processes): each request is its own address,
since a request can change the state it found.

    subscribe:       new, pending, confirmed, unsubscribed, bounced, over-budget
    unsubscribe:     unknown, pending, confirmed, unsubscribed, bounced, over-budget

Limits as in production except the per-IP one (off: one client sends everything): the
per-address budget is 2/day and the resend interval 0, so "over-budget" addresses have had
their two mails and the others get theirs. A block-list state is measured when the
service has one (not in this version).

Per route and state: median and p90 latency; per route, the largest difference between
state medians relative to the route's overall median. A measurement, not a test.

    .venv/bin/python bench/enumeration.py [--requests 300] [--seed 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
SUBSCRIBE = "/v1/lists/bluehats/subscriptions"
UNSUBSCRIBE = "/v1/lists/bluehats/unsubscriptions"
START_TIMEOUT = 90.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def serving(workdir: Path, database_url: str) -> Iterator[str]:
    port = _free_port()
    base_url = f"http://{LOOPBACK}:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(
        {
            "NEWSLETTER_DATABASE_URL": database_url,
            "NEWSLETTER_PUBLIC_URL": base_url,
            "NEWSLETTER_MAILER__KIND": "file",
            "NEWSLETTER_MAILER__DIRECTORY": str(workdir / "mail"),
            "NEWSLETTER_SECRET_KEY_FILE": str(workdir / "secret.key"),
            "NEWSLETTER_LOG_LEVEL": "WARNING",
            "NEWSLETTER_RATE_LIMIT_PER_IP": "off",
            "NEWSLETTER_RATE_LIMIT_PER_ADDRESS": "2/day",
            "NEWSLETTER_RATE_LIMIT_PER_DOMAIN": "off",
            "NEWSLETTER_MAIL_BUDGET": "off",
            "NEWSLETTER_RESEND_INTERVAL": "0s",
        }
    )
    newsletter = str(Path(sys.executable).parent / "newsletter")
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [newsletter, "serve", "--host", LOOPBACK, "--port", str(port)],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(base_url=base_url, timeout=5.0, trust_env=False) as client:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited:\n{log_path.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/readyz").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not become ready")
                time.sleep(0.2)
        yield base_url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


Prepare = Callable[[httpx.Client, sa.Engine, list[str]], None]


def _post_all(client: httpx.Client, path: str, emails: list[str]) -> None:
    for email in emails:
        response = client.post(path, json={"email": email})
        response.raise_for_status()


def _set_status(engine: sa.Engine, emails: list[str], status: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE subscription SET status = :status WHERE email = :email"),
            [{"status": status, "email": email} for email in emails],
        )


def _state(status: str | None, *, extra: str | None = None) -> Prepare:
    def prepare(client: httpx.Client, engine: sa.Engine, emails: list[str]) -> None:
        _post_all(client, SUBSCRIBE, emails)
        if status is not None:
            _set_status(engine, emails, status)
        if extra is not None:
            _post_all(client, extra, emails)

    return prepare


def _nothing(client: httpx.Client, engine: sa.Engine, emails: list[str]) -> None:
    pass


STATES: dict[str, dict[str, Prepare]] = {
    "subscribe": {
        "new": _nothing,
        "pending": _state(None),
        "confirmed": _state("confirmed"),
        "unsubscribed": _state("unsubscribed"),
        "bounced": _state("bounced"),
        # Two mails already: the measured request is past the per-address budget.
        "over-budget": _state(None, extra=SUBSCRIBE),
    },
    "unsubscribe": {
        "unknown": _nothing,
        "pending": _state(None),
        "confirmed": _state("confirmed"),
        "unsubscribed": _state("unsubscribed"),
        "bounced": _state("bounced"),
        "over-budget": _state("confirmed", extra=UNSUBSCRIBE),
    },
}
PATHS = {"subscribe": SUBSCRIBE, "unsubscribe": UNSUBSCRIBE}


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="per route and state")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-enumeration-") as tmp:
        workdir = Path(tmp)
        database_url = f"sqlite:///{workdir / 'newsletter.db'}"
        with (
            serving(workdir, database_url) as base_url,
            httpx.Client(base_url=base_url, timeout=30.0, trust_env=False) as client,
        ):
            engine = sa.create_engine(database_url)
            plan: list[tuple[str, str, str]] = []
            started = time.monotonic()
            for route, states in STATES.items():
                for state, prepare in states.items():
                    emails = [
                        f"{route}-{state}-{number}@example.org" for number in range(args.requests)
                    ]
                    prepare(client, engine, emails)
                    plan.extend((route, state, email) for email in emails)
            print(f"prepared {len(plan)} addresses in {time.monotonic() - started:.0f} s")
            random.Random(args.seed).shuffle(plan)
            timings: dict[tuple[str, str], list[float]] = defaultdict(list)
            statuses: dict[tuple[str, str], set[int]] = defaultdict(set)
            for route, state, email in plan:
                begin = time.perf_counter()
                response = client.post(PATHS[route], json={"email": email})
                timings[route, state].append((time.perf_counter() - begin) * 1000)
                statuses[route, state].add(response.status_code)
            engine.dispose()

    load = os.getloadavg()
    print(
        f"\n{args.requests} requests per route and state, interleaved, one at a time; "
        f"SQLite; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on "
        f"{os.cpu_count()} cores (a busy machine blurs small differences)\n"
    )
    print(f"{'route':<12}{'state':<14}{'median ms':>10}{'p90 ms':>9}  statuses")
    for route, states in STATES.items():
        medians = {}
        for state in states:
            values = timings[route, state]
            medians[state] = statistics.median(values)
            codes = ",".join(str(code) for code in sorted(statuses[route, state]))
            print(f"{route:<12}{state:<14}{medians[state]:>10.2f}{_p90(values):>9.2f}  {codes}")
        overall = statistics.median([value for state in states for value in timings[route, state]])
        spread = max(medians.values()) - min(medians.values())
        slowest = max(medians, key=lambda state: medians[state])
        fastest = min(medians, key=lambda state: medians[state])
        print(
            f"{route:<12}{'all':<14}{overall:>10.2f}{'':>9}  largest difference between "
            f"state medians: {spread:.2f} ms = {100 * spread / overall:.1f}% of the median "
            f"({slowest} slowest, {fastest} fastest)\n"
        )


if __name__ == "__main__":
    main()
