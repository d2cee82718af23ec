"""Deep pages of the admin subscriber search: is page 9,000 as cheap as page 1?

For each database it migrates a new database, declares the list `bluehats`, makes a read
key for the admin API, seeds `--search-rows` (1,000,000; 200,000 with --quick) confirmed
subscribers in one statement per table, then starts `newsletter serve` and asks, one request
at a time over a keep-alive connection, for 100 subscribers:

    first   GET /v1/admin/lists/bluehats/subscribers?limit=100
    deep    the same with `cursor` at the 90 % point of the list (the cursor the service
            hands out is the last id seen: keyset pagination, no OFFSET)

with no filter and with `status=confirmed`. Target: the deep page within 2x of the first
(p50). The two alternate in short windows on the same server (A B B A ...), so a
neighbour's burst weighs on both alike.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import _common
from _common import LIST_SLUG, Row

TARGET_RATIO = 2.0
PAGE = 100
FILTERS = {"no filter": "", "status=confirmed": "&status=confirmed"}
SLICES = 6


def _prepare(url: str, rows: int) -> tuple[str, str, float]:
    """The list, a read key and the rows; returns the key, the 90 % cursor, seed seconds."""
    import sqlalchemy as sa

    from app import admin, apikeys, db, lists, migrations
    from app.config import Settings
    from app.models import KeyScope, utcnow

    migrations.upgrade(url)
    settings = Settings(database_url=url, secret_key=_common.SECRET_KEY)
    engine = db.make_engine(url)
    try:
        with db.session_scope(engine) as session:
            lists.sync_from_settings(session, declared=settings.lists, now=utcnow())
        with db.session_scope(engine) as session:
            _, key = apikeys.create(session, name="bench", scope=KeyScope.READ, now=utcnow())
        seeded = _common.seed_confirmed(url, rows)
        with engine.connect() as connection:
            deep_id = connection.execute(
                sa.text("SELECT id FROM subscription ORDER BY id LIMIT 1 OFFSET :n"),
                {"n": int(rows * 0.9)},
            ).scalar_one()
    finally:
        engine.dispose()
    return key, admin.encode_cursor(int(deep_id)), seeded


def _database(options: argparse.Namespace, kind: str) -> dict[str, Any]:
    label = f"{'SQLite' if kind == 'sqlite' else 'PostgreSQL'}, {options.search_rows:,} rows"
    with tempfile.TemporaryDirectory(prefix="newsletter-bench-search-") as tmp:
        workdir = Path(tmp)
        url = _common.fresh_database(kind, workdir, options, "newsletter.db")
        print(f"\n== search: {label}", flush=True)
        key, cursor, seeded = _prepare(url, options.search_rows)
        print(f"   seeded in {seeded:.1f} s", flush=True)
        auth = f"authorization: Bearer {key}\r\n"
        path = f"/v1/admin/lists/{LIST_SLUG}/subscribers?limit={PAGE}"
        figures: dict[str, dict[str, Any]] = {}
        with _common.running_server(
            database_url=url, workdir=workdir, extra_env=options.extra_env
        ) as server:
            for name, query in FILTERS.items():
                pages = {"first": path + query, "deep": path + query + f"&cursor={cursor}"}
                latencies: dict[str, list[float]] = {page: [] for page in pages}
                answers: dict[str, int] = dict.fromkeys(pages, 0)
                # First and deep pages alternate in short windows (A B B A ...), so a
                # neighbour's burst on this shared machine weighs on both alike.
                for index in range(SLICES):
                    order = list(pages) if index % 2 == 0 else list(reversed(pages))
                    for page in order:
                        target = pages[page]
                        result = _common.load(
                            server.port,
                            lambda target=target: ("GET", target, None, auth),  # type: ignore[misc]
                            concurrency=1,
                            duration=options.duration / 2 / SLICES,
                            warmup=0.5 if index == 0 else 0,
                            keep=latencies[page],
                        )
                        if result.errors:
                            raise RuntimeError(f"{page} page answered {result.statuses}")
                        answers[page] += result.ok
                figures[name] = {}
                for page, values in latencies.items():
                    values.sort()
                    figures[name][page] = {
                        "requests": answers[page],
                        "p50_ms": round(_common.percentile(values, 0.5) * 1000, 2),
                        "p99_ms": round(_common.percentile(values, 0.99) * 1000, 2),
                    }
                first, deep = figures[name]["first"], figures[name]["deep"]
                print(
                    f"   {name:<17} first p50 {first['p50_ms']:6.2f} ms p99 {first['p99_ms']:6.2f}"
                    f" ms; deep p50 {deep['p50_ms']:6.2f} ms p99 {deep['p99_ms']:6.2f} ms "
                    f"({first['requests']} + {deep['requests']} requests)",
                    flush=True,
                )
    return {"database": kind, "label": label, "seed_s": seeded, "figures": figures}


def _rows(run: dict[str, Any]) -> list[Row]:
    rows = []
    for name, pages in run["figures"].items():
        first, deep = pages["first"], pages["deep"]
        ratio = deep["p50_ms"] / first["p50_ms"] if first["p50_ms"] else float("inf")
        rows.append(
            Row(
                "search",
                f"{run['label']}, {name}",
                "deep page (90 %) p50 / p99",
                f"{deep['p50_ms']:.1f} / {deep['p99_ms']:.1f} ms",
                reference=f"first page {first['p50_ms']:.1f} / {first['p99_ms']:.1f} ms",
                ratio=f"{ratio:.2f}x",
                target=f"<= {TARGET_RATIO:g}x",
                met=ratio <= TARGET_RATIO,
                detail={"first": first, "deep": deep},
            )
        )
    return rows


def run(options: argparse.Namespace) -> list[Row]:
    runs = [_database(options, kind) for kind in options.databases]
    _common.write_results("search", {"rows": options.search_rows, "page": PAGE, "runs": runs})
    return [row for item in runs for row in _rows(item)]


if __name__ == "__main__":
    import run as suite

    raise SystemExit(suite.main(only="search"))
