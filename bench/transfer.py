"""Import and export at scale, through the real command line in subprocesses.

    import   `newsletter import --list bluehats rows.csv --mode confirmed` on a file of
             --rows (100,000) new addresses with their consent evidence: wall time and the
             process's peak memory (targets: at most 20 s and 250 MB on SQLite); then the
             same file again (every row `unchanged`: the idempotent re-run).
    export   --export-rows (1,000,000) confirmed subscribers, each with its confirming
             ledger event, seeded by one bulk SQL statement each; then
             `newsletter export --list bluehats --output FILE` as CSV and as JSON lines:
             wall time and peak memory against the same command exporting nothing
             (`--status complained`: every module loaded, the engine open, no row), the
             idle baseline (target: peak within 60 MB of it).

Peak memory is the child's own high-water mark (`ru_maxrss` from `wait4` on its pid), so
nothing is sampled and nothing is missed. It is a measurement, not a test: it never fails
on a slow figure. Figures are printed and written to bench/results/transfer.json.

    .venv/bin/python bench/transfer.py [--rows 100000] [--export-rows 1000000]
                                       [--databases sqlite postgresql]

PostgreSQL uses the database `bench` on 127.0.0.1:5432 (user postgres), which it **empties
first**; SQLite gets a new file in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = ROOT / "bench" / "results" / "transfer.json"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/bench"
LIST_SLUG = "bluehats"
SECRET = "bench-secret-key-not-for-production"  # noqa: S105 (a throw-away database)
TIMEOUT = 1800.0
IMPORT_TARGET_S = 20.0
IMPORT_TARGET_MB = 250.0
EXPORT_TARGET_DELTA_MB = 60.0


@dataclass
class Run:
    """One `newsletter ...` process: how long it took and how much memory it held."""

    command: str
    exit_code: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    stdout_tail: str
    stderr_tail: str


def _newsletter_command() -> str:
    here = Path(sys.executable).parent / "newsletter"
    if here.exists():
        return str(here)
    venv = ROOT / ".venv" / "bin" / "newsletter"
    if venv.exists():
        return str(venv)
    found = shutil.which("newsletter")
    if found is None:
        raise SystemExit("cannot find the `newsletter` command; install the project first")
    return found


def run_measured(args: list[str], *, env: dict[str, str], cwd: Path) -> Run:
    """Run `newsletter args...` and read its peak RSS and CPU from wait4(2) on its pid."""
    out_path, err_path = cwd / "stdout.txt", cwd / "stderr.txt"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        process = subprocess.Popen(
            [_newsletter_command(), *args], env=env, cwd=cwd, stdout=out, stderr=err
        )
        deadline = started + TIMEOUT
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid == process.pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return Run(
        command="newsletter " + " ".join(args),
        exit_code=process.returncode,
        wall_s=round(wall, 2),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 2),
        # Linux reports ru_maxrss in kilobytes.
        peak_rss_mb=round(usage.ru_maxrss / 1024, 1),
        stdout_tail=out_path.read_text(errors="replace")[-500:],
        stderr_tail=err_path.read_text(errors="replace")[-500:],
    )


def _check(run: Run) -> Run:
    if run.exit_code != 0:
        raise SystemExit(
            f"{run.command} exited {run.exit_code}:\n{run.stdout_tail}\n{run.stderr_tail}"
        )
    return run


def write_import_file(path: Path, rows: int) -> int:
    with path.open("w", encoding="utf-8", newline="") as file:
        file.write("email,name,locale,attributes,consent_source,consent_date\n")
        for n in range(rows):
            locale = "en" if n % 5 == 0 else "fr"
            file.write(
                f"person{n:07d}@example{n % 97}.org,Person {n},{locale},"
                f'"{{""org"": ""org{n % 13}""}}",Paper form at the meetup,2025-03-12\n'
            )
    return path.stat().st_size


# Seeding the export: one INSERT ... SELECT per table, generated in the database.

SQLITE_SEED = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :rows)
INSERT INTO subscription (list_id, email, email_key, status, locale, attributes,
    consent_version, created_at, updated_at, confirmed_at)
SELECT :list_id, 'seed' || i || '@example.org', 'seed' || i || '@example.org', 'confirmed',
    'fr', '{"org": "DINUM"}', '2026-11', :now, :now, :now FROM n;
"""
SQLITE_SEED_EVENTS = """
INSERT INTO consent_event (subscription_id, list_id, action, status_after, source,
    consent_version, ip, user_agent, detail, occurred_at)
SELECT id, list_id, 'confirmed', 'confirmed', 'link', '2026-11', '192.0.2.1',
    'Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0', '{}', :now
FROM subscription;
"""
POSTGRES_SEED = """
INSERT INTO subscription (list_id, email, email_key, status, locale, attributes,
    consent_version, created_at, updated_at, confirmed_at)
SELECT %(list_id)s, 'seed' || i || '@example.org', 'seed' || i || '@example.org',
    'confirmed', 'fr', '{"org": "DINUM"}', '2026-11', now(), now(), now()
FROM generate_series(1, %(rows)s) AS i;
"""
POSTGRES_SEED_EVENTS = """
INSERT INTO consent_event (subscription_id, list_id, action, status_after, source,
    consent_version, ip, user_agent, detail, occurred_at)
SELECT id, list_id, 'confirmed', 'confirmed', 'link', '2026-11', '192.0.2.1',
    'Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0', '{}', now()
FROM subscription;
"""


def seed_export(url: str, rows: int) -> float:
    started = time.perf_counter()
    if url.startswith("sqlite:"):
        connection = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            list_id = connection.execute(
                "SELECT id FROM mailing_list WHERE slug = ?", (LIST_SLUG,)
            ).fetchone()[0]
            # The text form the app's UTCDateTime column writes on SQLite.
            now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
            params = {"rows": rows, "list_id": list_id, "now": now}
            connection.execute(SQLITE_SEED, params)
            connection.execute(SQLITE_SEED_EVENTS, {"now": now})
            connection.commit()
        finally:
            connection.close()
    else:
        import psycopg

        conninfo = url.replace("postgresql+psycopg://", "postgresql://", 1)
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as connection:
            row = connection.execute(
                "SELECT id FROM mailing_list WHERE slug = %s", (LIST_SLUG,)
            ).fetchone()
            assert row is not None
            connection.execute(POSTGRES_SEED, {"rows": rows, "list_id": row[0]})
            connection.execute(POSTGRES_SEED_EVENTS)
            connection.execute("ANALYZE")
    return round(time.perf_counter() - started, 1)


def _reset_postgres(url: str) -> None:
    import psycopg

    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing a non-loopback PostgreSQL host: {parts.hostname!r}")
    if parts.path.lstrip("/") != "bench":
        raise SystemExit("the benchmark empties its database: it only uses the database `bench`")
    conninfo = url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as connection:
        connection.execute("DROP SCHEMA IF EXISTS public CASCADE")
        connection.execute("CREATE SCHEMA public")


def _env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(
        NEWSLETTER_DATABASE_URL=url,
        NEWSLETTER_SECRET_KEY=SECRET,
        NEWSLETTER_LOG_LEVEL="WARNING",
    )
    return env


def _fresh_database(kind: str, folder: Path, name: str, postgres_url: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{folder / name}"
    _reset_postgres(postgres_url)
    return postgres_url


def bench_import(kind: str, folder: Path, rows: int, postgres_url: str) -> dict[str, object]:
    url = _fresh_database(kind, folder, "import.db", postgres_url)
    env = _env(url)
    _check(run_measured(["migrate"], env=env, cwd=folder))
    path = folder / "rows.csv"
    size = write_import_file(path, rows)
    args = ["import", "--list", LIST_SLUG, str(path), "--mode", "confirmed", "--json"]
    first = _check(run_measured(args, env=env, cwd=folder))
    report = json.loads(first.stdout_tail[first.stdout_tail.index("{") :])
    if report["created"] != rows:
        raise SystemExit(f"expected {rows} created, got {report}")
    again = _check(run_measured(args, env=env, cwd=folder))
    return {
        "database": kind,
        "rows": rows,
        "file_mb": round(size / 1024 / 1024, 1),
        "first_run": asdict(first),
        "rows_per_s": round(rows / first.wall_s),
        "second_run_all_unchanged": asdict(again),
        "targets": {"wall_s": IMPORT_TARGET_S, "peak_rss_mb": IMPORT_TARGET_MB},
        "meets_targets": first.wall_s <= IMPORT_TARGET_S and first.peak_rss_mb <= IMPORT_TARGET_MB,
    }


def bench_export(kind: str, folder: Path, rows: int, postgres_url: str) -> dict[str, object]:
    url = _fresh_database(kind, folder, "export.db", postgres_url)
    env = _env(url)
    _check(run_measured(["migrate"], env=env, cwd=folder))
    # `migrate` does not create the lists: one empty export does (and warms the caches).
    _check(
        run_measured(
            ["export", "--list", LIST_SLUG, "--output", "warm-up.csv"], env=env, cwd=folder
        )
    )
    seeded_in = seed_export(url, rows)
    idle = _check(
        run_measured(
            ["export", "--list", LIST_SLUG, "--status", "complained", "--output", "empty.csv"],
            env=env,
            cwd=folder,
        )
    )
    results: dict[str, object] = {
        "database": kind,
        "rows": rows,
        "seeded_in_s": seeded_in,
        "idle_baseline": asdict(idle),
    }
    for export_format in ("csv", "jsonl"):
        output = folder / f"export.{export_format}"
        run = _check(
            run_measured(
                ["export", "--list", LIST_SLUG, "--format", export_format, "--output", str(output)],
                env=env,
                cwd=folder,
            )
        )
        with output.open("rb") as file:
            lines = sum(1 for _ in file)
        expected = rows + (1 if export_format == "csv" else 0)
        if lines != expected:
            raise SystemExit(f"{output.name}: {lines} lines, expected {expected}")
        delta = round(run.peak_rss_mb - idle.peak_rss_mb, 1)
        results[export_format] = {
            **asdict(run),
            "file_mb": round(output.stat().st_size / 1024 / 1024, 1),
            "rows_per_s": round(rows / run.wall_s),
            "peak_over_idle_mb": delta,
            "meets_target": delta <= EXPORT_TARGET_DELTA_MB,
        }
        output.unlink()
    results["target_peak_over_idle_mb"] = EXPORT_TARGET_DELTA_MB
    return results


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows to import")
    parser.add_argument("--export-rows", type=int, default=1_000_000, help="rows to export")
    parser.add_argument(
        "--databases", nargs="+", choices=("sqlite", "postgresql"), default=["sqlite"]
    )
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--skip-export", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    runs: dict[str, dict[str, object]] = {}
    for kind in args.databases:
        folder = Path(tempfile.mkdtemp(prefix=f"newsletter-transfer-{kind}-"))
        try:
            print(f"== {kind}: import of {args.rows:,} rows (mode confirmed) ==", flush=True)
            imported = bench_import(kind, folder, args.rows, args.postgres_url)
            first = imported["first_run"]
            assert isinstance(first, dict)
            again = imported["second_run_all_unchanged"]
            assert isinstance(again, dict)
            print(
                f"  {imported['file_mb']} MB file: {first['wall_s']} s "
                f"({imported['rows_per_s']:,} rows/s), CPU {first['cpu_s']} s, peak "
                f"{first['peak_rss_mb']} MB  (targets {IMPORT_TARGET_S:g} s, "
                f"{IMPORT_TARGET_MB:g} MB)\n"
                f"  same file again (all unchanged): {again['wall_s']} s, peak "
                f"{again['peak_rss_mb']} MB",
                flush=True,
            )
            run: dict[str, object] = {"import": imported}
            if not args.skip_export:
                print(f"== {kind}: export of {args.export_rows:,} rows ==", flush=True)
                exported = bench_export(kind, folder, args.export_rows, args.postgres_url)
                idle = exported["idle_baseline"]
                assert isinstance(idle, dict)
                print(
                    f"  seeded in {exported['seeded_in_s']} s; idle baseline (an export of "
                    f"no row): peak {idle['peak_rss_mb']} MB",
                    flush=True,
                )
                for export_format in ("csv", "jsonl"):
                    figures = exported[export_format]
                    assert isinstance(figures, dict)
                    print(
                        f"  {export_format}: {figures['file_mb']} MB in {figures['wall_s']} s "
                        f"({figures['rows_per_s']:,} rows/s), peak {figures['peak_rss_mb']} MB "
                        f"= idle + {figures['peak_over_idle_mb']} MB (target "
                        f"+{EXPORT_TARGET_DELTA_MB:g} MB)",
                        flush=True,
                    )
                run["export"] = exported
            runs[kind] = run
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    document = {
        "benchmark": "transfer",
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_before": round(load_before, 2),
            "load_average_after": round(os.getloadavg()[0], 2),
        },
        "parameters": {"rows": args.rows, "export_rows": args.export_rows},
        "note": "Each figure is one `newsletter` process run as operators run it; peak memory "
        "is its ru_maxrss (wait4). A load average above the core count means other work "
        "shared the machine and times are pessimistic.",
        "runs": runs,
    }
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS_FILE.relative_to(ROOT)}")
    # The children's peak, for the record: RUSAGE_CHILDREN is the largest of them all.
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"largest child peak: {children:.1f} MB; load average {load_before:.1f} before")


if __name__ == "__main__":
    main()
