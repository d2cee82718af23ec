"""Subscribe and confirm next to the trivial endpoint, on the real server, at 32 clients.

For each setup (`--setups`: SQLite or PostgreSQL, one or two uvicorn workers) it starts
`newsletter serve` as the embedded default runs it (the outbox worker inside each uvicorn
worker, the file mailer, migrations at start; rate limits off), or, for the setups ending in
`-apart`, with the outbox worker as its own `newsletter worker` process (the production
layout, docs/production.md), and, against that one server,
drives each scenario for `--duration` seconds after `--warmup` with `--concurrency`
keep-alive connections, each sending its next request as soon as the last is answered:

    healthz     GET  /healthz                          the trivial endpoint: the reference
    subscribe   POST /v1/lists/bluehats/subscriptions  a new address every request
    confirm     POST /v1/confirm/{secret}              a pending subscription's link, once each

Confirm needs links: the pending subscriptions are made through the API first (the
subscribe window leaves most of them; a burst tops them up, unmeasured), and each secret is
computed from its token's id and the key, as app/tokens.py does.

Between the two windows, the confirmation mails of those sign-ups are waited for: the outbox
worker gives way to requests, so under load it mails after the window, and a confirm window
started at once would pay for the sign-ups' mails. The wait is timed (`drain`: the worker's
mail rate once the requests stop) and checked: a sign-up whose mail is never written fails
the run. After the confirm window, likewise, the confirmations' sync jobs (to the list's
backend, `none` here) are waited for, timed and checked (`sync_drain`): the figures show
what each window left to the worker.

Targets printed beside the figures: each rate >= 60 % of healthz's; p99 < 50 ms on SQLite.

The `loadgen` scenario measures the load generator itself: the same clients against a
static asyncio server in another process. Its rate is the most this client can drive; a
healthz rate well below it means the server, not the client, set the pace.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common
from _common import LIST_SLUG, LoadResult, Request, RequestFactory, Row

RATE_TARGET = 0.60
SQLITE_P99_TARGET_MS = 50.0
# Confirm may run faster than subscribe: links enough for this multiple of subscribe's rate.
CONFIRM_HEADROOM = 1.5
# The sign-ups' confirmation mails, and the confirmations' sync jobs, are all done within
# this once their window ends, or the run fails.
DRAIN_DEADLINE_S = 600.0


def _subscribe_factory(run_id: str, limit: int | None = None) -> RequestFactory:
    counter = itertools.count()
    path = f"/v1/lists/{LIST_SLUG}/subscriptions"

    def subscribe() -> Request | None:
        n = next(counter)
        if limit is not None and n >= limit:
            return None
        body = json.dumps({"email": f"bench-{run_id}-{n}@example.org"}).encode()
        return ("POST", path, body, "")

    return subscribe


def _confirm_links(database_url: str) -> list[str]:
    """The secrets of every unused confirmation link, computed as app/tokens.py does."""
    import sqlalchemy as sa
    from sqlmodel import Session, col, select

    from app import tokens
    from app.models import Token, TokenPurpose

    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    key = _common.SECRET_KEY.encode()
    try:
        with Session(engine) as session:
            ids = session.exec(
                select(Token.id).where(
                    Token.purpose == TokenPurpose.CONFIRM, col(Token.used_at).is_(None)
                )
            ).all()
    finally:
        engine.dispose()
    # secret_for only reads the id: the secret is HMAC-SHA256(key, token id).
    return [
        tokens.secret_for(
            Token(id=token_id, subscription_id=0, purpose=TokenPurpose.CONFIRM, token_hash=""),
            key=key,
        )
        for token_id in ids
    ]


def _confirm_factory(secrets: list[str]) -> RequestFactory:
    pool = iter(secrets)

    def confirm() -> Request | None:
        secret = next(pool, None)
        return None if secret is None else ("POST", f"/v1/confirm/{secret}", None, "")

    return confirm


def _drained(
    remaining: Callable[[], int], *, total: int, label: str, what: str, verb: str
) -> dict[str, float]:
    """Wait until `remaining()` (the `what` of `total` not yet done) is zero; how many were
    left when the requests stopped and how fast the worker did them. Any still left after
    DRAIN_DEADLINE_S fail the run."""
    started = time.monotonic()
    left = remaining()
    deadline = started + DRAIN_DEADLINE_S
    while (now_left := remaining()) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{now_left:,} of {total:,} {what} not {verb} after {DRAIN_DEADLINE_S:.0f} s"
            )
        time.sleep(0.1)
    seconds = time.monotonic() - started
    rate = left / seconds if left > 0 and seconds > 0 else 0.0
    print(
        f"   {label:<9} {max(left, 0):,} of {total:,} {what} still to do after the "
        f"window; {verb} in {seconds:.1f} s ({rate:,.0f}/s)",
        flush=True,
    )
    return {"expected": total, "left": max(left, 0), "seconds": round(seconds, 2)}


def _wait_for_mails(server: _common.Server, expected: int) -> dict[str, float]:
    """Every sign-up's confirmation mail written (one per link)."""
    return _drained(
        lambda: expected - server.mails_written(),
        total=expected,
        label="mails",
        what="confirmation mails",
        verb="written",
    )


def _sync_jobs(database_url: str, *, unfinished: bool) -> int:
    """The sync jobs in the queue; with `unfinished`, those not yet done (pending, or
    running under a lease)."""
    import sqlalchemy as sa

    query = "SELECT count(*) FROM outbox_job WHERE kind = 'sync'"
    if unfinished:
        query += " AND state IN ('pending', 'running')"
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            return int(connection.execute(sa.text(query)).scalar_one())
    finally:
        engine.dispose()


def _wait_for_syncs(database_url: str) -> dict[str, float]:
    """Every confirmation's sync job done: the worker gives way to requests, so under load
    it syncs after the window, as it mails after the sign-ups'."""
    return _drained(
        functools.partial(_sync_jobs, database_url, unfinished=True),
        total=_sync_jobs(database_url, unfinished=False),
        label="syncs",
        what="sync jobs",
        verb="done",
    )


def _run_setup(options: argparse.Namespace, setup: str) -> dict[str, Any]:
    database, workers, *layout = setup.split("-")
    apart = layout == ["apart"]
    label = f"{'SQLite' if database == 'sqlite' else 'PostgreSQL'}, {workers} worker(s)"
    if apart:
        label += ", outbox worker apart"
    results: dict[str, LoadResult] = {}
    extra_env = dict(options.extra_env)
    if apart:
        extra_env["NEWSLETTER_RUN_WORKER"] = "false"
    with tempfile.TemporaryDirectory(prefix="newsletter-bench-") as tmp:
        workdir = Path(tmp)
        url = _common.fresh_database(database, workdir, options, "newsletter.db")
        background = _common.warn_if_busy(label)
        print(f"\n== subscribe: {label} ({url})", flush=True)
        with (
            _common.running_server(
                database_url=url, workdir=workdir, workers=int(workers), extra_env=extra_env
            ) as server,
            _common.running_worker(
                database_url=url, workdir=workdir, server=server, extra_env=options.extra_env
            )
            if apart
            else contextlib.nullcontext() as worker,
        ):
            print(f"   ready after {server.ready_after_s:.2f} s at {server.base_url}", flush=True)
            run_id = uuid.uuid4().hex[:8]

            # The CPU of the rest of the service, beside the API process's own.
            others: dict[str, Callable[[], list[int]]] = {}
            if database == "postgresql":
                others["database"] = functools.partial(_common.postgres_backends, url)
            if worker is not None:
                others["worker"] = functools.partial(_common.process_tree, worker.pid)

            def measure(name: str, make: RequestFactory) -> LoadResult:
                result = _common.load(
                    server.port,
                    make,
                    concurrency=options.concurrency,
                    duration=options.duration,
                    warmup=options.warmup,
                    server_pid=server.process.pid,
                    others=others,
                )
                print(f"   {name:<10}{result.summary()}", flush=True)
                results[name] = result
                return result

            measure("healthz", lambda: ("GET", "/healthz", None, ""))
            subscribed = measure("subscribe", _subscribe_factory(run_id))
            # Links for the confirm window: what subscribe left, topped up by an unmeasured burst.
            window = options.warmup + options.duration
            wanted = int(subscribed.ok_per_s * window * CONFIRM_HEADROOM) + 200
            have = subscribed.ok + int(subscribed.ok_per_s * options.warmup)
            if wanted > have:
                _common.load(
                    server.port,
                    _subscribe_factory(run_id + "t", wanted - have),
                    concurrency=options.concurrency,
                    duration=600.0,
                    warmup=0,
                )
            links = _confirm_links(url)
            drain = _wait_for_mails(server, len(links))
            confirmed = measure("confirm", _confirm_factory(links))
            if confirmed.exhausted:
                print(f"   note: the {len(links)} links ran out before the end of the window")
            sync_drain = _wait_for_syncs(url)
            mails = server.mails_written()
            if server.process.poll() is not None:
                raise RuntimeError(f"the server died during the run:\n{server.log_tail()}")
    return {
        "setup": setup,
        "label": label,
        "database": database,
        "workers": int(workers),
        "background_busy_cores": background,
        "links_prepared": len(links),
        "mails_written": mails,
        "drain": drain,
        "sync_drain": sync_drain,
        "results": results,
    }


def _cores(result: LoadResult) -> str:
    """With two uvicorn workers, how the load fell on each: "; cores 0.98 + 0.05"."""
    if len(result.server_cores_by_process) < 2:
        return ""
    return "; cores " + " + ".join(f"{c:.2f}" for c in result.server_cores_by_process)


_CPU_NAMES = {"api": "API", "database": "PostgreSQL", "worker": "worker"}


def _cpu(result: LoadResult) -> str:
    """ "API 1.10 + PostgreSQL 0.42 ms": the CPU each answer cost, by process group."""
    parts = result.cpu_ms_per_answer()
    return " + ".join(f"{_CPU_NAMES[name]} {ms:.2f}" for name, ms in parts.items()) + " ms"


def _rows(run: dict[str, Any]) -> list[Row]:
    label = run["label"]
    results: dict[str, LoadResult] = run["results"]
    health = results["healthz"]
    rows = [
        Row(
            "healthz",
            label,
            "rate / p50 / p99",
            f"{health.ok_per_s:,.0f}/s / {health.p50_ms:.1f} / {health.p99_ms:.1f} ms"
            + _cores(health),
            reference="(the reference)",
            detail={"server_cpu_cores": health.server_cpu_cores, **vars(health)},
        ),
        Row("healthz", label, "CPU per answer", _cpu(health), reference="(the reference)"),
    ]
    for name in ("subscribe", "confirm"):
        result = results[name]
        ratio = result.ok_per_s / health.ok_per_s if health.ok_per_s else 0.0
        rows.append(
            Row(
                name,
                label,
                "rate (2xx)",
                f"{result.ok_per_s:,.0f}/s"
                + (f" ({result.errors} errors)" if result.errors else "")
                + _cores(result),
                reference=f"healthz {health.ok_per_s:,.0f}/s",
                ratio=_common.pct(ratio),
                target=f">= {_common.pct(RATE_TARGET)}",
                met=ratio >= RATE_TARGET and result.errors == 0,
                detail=vars(result),
            )
        )
        sqlite = run["database"] == "sqlite"
        rows.append(
            Row(
                name,
                label,
                "p50 / p99",
                f"{result.p50_ms:.1f} / {result.p99_ms:.1f} ms",
                reference=f"healthz {health.p50_ms:.1f} / {health.p99_ms:.1f} ms",
                target=f"p99 < {SQLITE_P99_TARGET_MS:.0f} ms" if sqlite else "",
                met=result.p99_ms < SQLITE_P99_TARGET_MS if sqlite else None,
            )
        )
        # What one answer costs in CPU, whatever waited: healthz's API CPU over this one's
        # is the share of healthz's rate one API process could reach with cores to spare.
        api_ms = result.cpu_ms_per_answer().get("api")
        health_ms = health.cpu_ms_per_answer().get("api")
        rows.append(
            Row(
                name,
                label,
                "CPU per answer",
                _cpu(result),
                reference=f"healthz API {health_ms:.2f} ms" if health_ms else "",
                ratio=_common.pct(health_ms / api_ms) if api_ms and health_ms else "",
            )
        )
        drain, figure, verb = {
            "subscribe": (run.get("drain"), "mails after the window", "written"),
            "confirm": (run.get("sync_drain"), "syncs after the window", "done"),
        }[name]
        if drain:
            rate = drain["left"] / drain["seconds"] if drain["left"] and drain["seconds"] else 0
            rows.append(
                Row(
                    name,
                    label,
                    figure,
                    f"{drain['left']:,} of {drain['expected']:,} {verb} in "
                    f"{drain['seconds']:.1f} s ({rate:,.0f}/s)",
                )
            )
    return rows


def run(options: argparse.Namespace) -> list[Row]:
    runs = [_run_setup(options, setup) for setup in options.setups]
    _common.write_results(
        "subscribe",
        {
            "parameters": {
                "concurrency": options.concurrency,
                "duration_s": options.duration,
                "warmup_s": options.warmup,
                "server_env_overrides": options.extra_env,
            },
            "runs": runs,
        },
    )
    return [row for item in runs for row in _rows(item)]


def run_loadgen(options: argparse.Namespace) -> list[Row]:
    """The load generator against a static server: the most it can drive on this machine."""
    print("\n== loadgen: the load generator against a static asyncio server", flush=True)
    with _common.static_server() as (port, pid):
        result = _common.load(
            port,
            lambda: ("GET", "/healthz", None, ""),
            concurrency=options.concurrency,
            duration=options.duration,
            warmup=options.warmup,
            server_pid=pid,
        )
    print(f"   {'static':<10}{result.summary()}", flush=True)
    _common.write_results("loadgen", {"result": result})
    return [
        Row(
            "loadgen",
            f"static server, {options.concurrency} clients",
            "rate / CPU",
            f"{result.ok_per_s:,.0f}/s, client {result.loadgen_cpu_cores:.2f} cores",
            reference="healthz rates above",
            target="well above healthz",
            detail=vars(result),
        )
    ]


if __name__ == "__main__":
    import run as suite

    raise SystemExit(suite.main(only="subscribe"))
