"""Import and export at scale, through the real command line in subprocesses.

    import   `newsletter import --list bluehats rows.csv --mode confirmed` on a file of
             --import-rows (100,000; 20,000 with --quick) new addresses with their consent
             evidence: wall time and the process's peak memory (targets: at most 20 s and
             250 MB for 100,000 rows); then the same file again (every row `unchanged`).
    export   --export-rows (1,000,000; 200,000 with --quick) confirmed subscribers, each
             with its confirming ledger event, seeded by one bulk SQL statement each; then
             `newsletter export --list bluehats --output FILE` as CSV and as JSON lines:
             wall time and peak memory against the same command exporting nothing
             (`--status complained`: every module loaded, the engine open, no row), the
             idle baseline, measured in the same run (target: peak within 60 MB of it).

Peak memory is the child's own high-water mark (`ru_maxrss` from `wait4` on its pid), so
nothing is sampled and nothing is missed. The exported files are checked for their row count.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import _common
from _common import LIST_SLUG, Row

IMPORT_TARGET_S = 20.0  # for 100,000 rows: at least 5,000 rows/s, start-up included
IMPORT_TARGET_MB = 250.0
EXPORT_TARGET_DELTA_MB = 60.0


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


def _env(url: str, folder: Path, options: argparse.Namespace) -> dict[str, str]:
    return _common.service_env(url, folder, options.extra_env)


def bench_import(options: argparse.Namespace, kind: str, folder: Path) -> dict[str, Any]:
    rows = options.import_rows
    url = _common.fresh_database(kind, folder, options, "import.db")
    env = _env(url, folder, options)
    _common.run_measured(["migrate"], env=env, cwd=folder)
    path = folder / "rows.csv"
    size = write_import_file(path, rows)
    args = ["import", "--list", LIST_SLUG, str(path), "--mode", "confirmed", "--json"]
    first = _common.run_measured(args, env=env, cwd=folder)
    report = json.loads(first.stdout_tail[first.stdout_tail.index("{") :])
    if report["created"] != rows:
        raise RuntimeError(f"expected {rows} created, got {report}")
    again = _common.run_measured(args, env=env, cwd=folder)
    print(
        f"   import {rows:,} rows ({size / 1024 / 1024:.1f} MB): {first.wall_s} s, CPU "
        f"{first.cpu_s} s, peak {first.peak_rss_mb} MB; again (all unchanged): "
        f"{again.wall_s} s, peak {again.peak_rss_mb} MB",
        flush=True,
    )
    return {
        "rows": rows,
        "file_mb": round(size / 1024 / 1024, 1),
        "first_run": asdict(first),
        "rows_per_s": round(rows / first.wall_s),
        "second_run_all_unchanged": asdict(again),
    }


def bench_export(options: argparse.Namespace, kind: str, folder: Path) -> dict[str, Any]:
    rows = options.export_rows
    url = _common.fresh_database(kind, folder, options, "export.db")
    env = _env(url, folder, options)
    _common.run_measured(["migrate"], env=env, cwd=folder)
    # `migrate` does not declare the lists: one empty export does (and warms the caches).
    warm = ["export", "--list", LIST_SLUG, "--output", "warm-up.csv"]
    _common.run_measured(warm, env=env, cwd=folder)
    seeded_in = _common.seed_confirmed(url, rows)
    idle = _common.run_measured(
        ["export", "--list", LIST_SLUG, "--status", "complained", "--output", "empty.csv"],
        env=env,
        cwd=folder,
    )
    print(f"   seeded {rows:,} in {seeded_in} s; idle export peak {idle.peak_rss_mb} MB")
    results: dict[str, Any] = {"rows": rows, "seeded_in_s": seeded_in, "idle": asdict(idle)}
    for export_format in ("csv", "jsonl"):
        output = folder / f"export.{export_format}"
        run = _common.run_measured(
            ["export", "--list", LIST_SLUG, "--format", export_format, "--output", str(output)],
            env=env,
            cwd=folder,
        )
        with output.open("rb") as file:
            lines = sum(1 for _ in file)
        expected = rows + (1 if export_format == "csv" else 0)
        if lines != expected:
            raise RuntimeError(f"{output.name}: {lines} lines, expected {expected}")
        delta = round(run.peak_rss_mb - idle.peak_rss_mb, 1)
        results[export_format] = {
            **asdict(run),
            "file_mb": round(output.stat().st_size / 1024 / 1024, 1),
            "rows_per_s": round(rows / run.wall_s),
            "peak_over_idle_mb": delta,
        }
        print(
            f"   export {export_format}: {run.wall_s} s, peak {run.peak_rss_mb} MB = idle "
            f"+ {delta} MB",
            flush=True,
        )
        output.unlink()
    return results


def _rows(kind: str, imported: dict[str, Any], exported: dict[str, Any] | None) -> list[Row]:
    name = "SQLite" if kind == "sqlite" else "PostgreSQL"
    first = imported["first_run"]
    # Other sizes are held to the same rate (a small file pays the start-up more).
    target_rate = 100_000 / IMPORT_TARGET_S
    rows = [
        Row(
            "import",
            f"{name}, {imported['rows']:,} rows",
            "time / peak RSS",
            f"{first['wall_s']:.1f} s ({imported['rows_per_s']:,} rows/s) / "
            f"{first['peak_rss_mb']:.0f} MB",
            reference=f"again, all unchanged: {imported['second_run_all_unchanged']['wall_s']} s",
            target=f"<= {IMPORT_TARGET_S:g} s per 100k / {IMPORT_TARGET_MB:.0f} MB",
            met=imported["rows_per_s"] >= target_rate and first["peak_rss_mb"] <= IMPORT_TARGET_MB,
            detail=imported,
        )
    ]
    if exported is not None:
        for export_format in ("csv", "jsonl"):
            figures = exported[export_format]
            rows.append(
                Row(
                    "export",
                    f"{name}, {exported['rows']:,} rows, {export_format}",
                    "peak RSS / time",
                    f"{figures['peak_rss_mb']:.0f} MB / {figures['wall_s']:.1f} s",
                    reference=f"idle export {exported['idle']['peak_rss_mb']:.0f} MB",
                    ratio=f"+{figures['peak_over_idle_mb']:.1f} MB",
                    target=f"<= idle + {EXPORT_TARGET_DELTA_MB:.0f} MB",
                    met=figures["peak_over_idle_mb"] <= EXPORT_TARGET_DELTA_MB,
                    detail=figures,
                )
            )
    return rows


def run(options: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    runs: dict[str, Any] = {}
    for kind in options.databases:
        print(f"\n== transfer: {kind}", flush=True)
        folder = Path(tempfile.mkdtemp(prefix=f"newsletter-bench-transfer-{kind}-"))
        try:
            imported = bench_import(options, kind, folder)
            exported = bench_export(options, kind, folder) if options.export_rows else None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        runs[kind] = {"import": imported, "export": exported}
        rows.extend(_rows(kind, imported, exported))
    _common.write_results("transfer", {"runs": runs})
    return rows


if __name__ == "__main__":
    import run as suite

    raise SystemExit(suite.main(only="transfer"))
