"""Deep pages of the admin subscriber search: is page 9,000 as cheap as page 1?

For each database it migrates a new database, declares the list `bluehats`, makes a read
key for the admin API, seeds `--search-rows` (1,000,000; 200,000 with --quick) confirmed
subscribers in one statement per table, then starts `newsletter serve` and asks, one request
at a time over a keep-alive connection, for 100 subscribers:

    first   GET /v1/admin/lists/bluehats/subscribers?limit=100
    deep    the same with `cursor` at the 90 % point of the list (the cursor the service
            hands out is the last id seen: keyset pagination, no OFFSET)

with no filter and with `status=confirmed`. Target: the deep page within 2x of the first
(p50). The deep page is measured in the same run as the first, on the same server.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import _common
from _common import LIST_SLUG, LoadResult, Row

TARGET_RATIO = 2.0
PAGE = 100
FILTERS = {"no filter": "", "status=confirmed": "&status=confirmed"}


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
        figures: dict[str, dict[str, LoadResult]] = {}
        with _common.running_server(
            database_url=url, workdir=workdir, extra_env=options.extra_env
        ) as server:
            for name, query in FILTERS.items():
                figures[name] = {}
                for page, extra in (("first", ""), ("deep", f"&cursor={cursor}")):
                    target = path + query + extra
                    result = _common.load(
                        server.port,
                        lambda target=target: ("GET", target, None, auth),  # type: ignore[misc]
                        concurrency=1,
                        duration=options.duration / 2,
                        warmup=0.5,
                        server_pid=server.process.pid,
                    )
                    print(f"   {name:<17} {page:<6}{result.summary()}", flush=True)
                    if result.errors:
                        raise RuntimeError(f"{page} page answered {result.statuses}")
                    figures[name][page] = result
    return {"database": kind, "label": label, "seed_s": seeded, "figures": figures}


def _rows(run: dict[str, Any]) -> list[Row]:
    rows = []
    for name, pages in run["figures"].items():
        first, deep = pages["first"], pages["deep"]
        ratio = deep.p50_ms / first.p50_ms if first.p50_ms else float("inf")
        rows.append(
            Row(
                "search",
                f"{run['label']}, {name}",
                "deep page (90 %) p50 / p99",
                f"{deep.p50_ms:.1f} / {deep.p99_ms:.1f} ms",
                reference=f"first page {first.p50_ms:.1f} / {first.p99_ms:.1f} ms",
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
