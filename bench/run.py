"""The performance suite: runs the scenarios asked for and prints one Markdown table.

    .venv/bin/python bench/run.py                 # everything, full sizes
    .venv/bin/python bench/run.py --quick         # everything, small sizes (a few minutes)
    .venv/bin/python bench/run.py --only subscribe search --setups sqlite-1

Every scenario runs beside its reference in the same run (subscribe next to healthz on the
same server, the service's Mailman sync next to Mailman's own adds, a deep page next to the
first one), so a busy machine skews both sides alike. Figures go to bench/results/*.json and
the table to bench/results/suite.md. It is a measurement, not a test: it exits 1 only when a
scenario could not run or a correctness check inside one failed, never on a slow figure.
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable

import _common
from _common import Row


def _scenario(name: str) -> Callable[[argparse.Namespace], list[Row]]:
    # Imported on demand: a scenario's imports (the Mailman harness, the fakes) cost only it.
    if name == "loadgen":
        import subscribe

        return subscribe.run_loadgen
    module = __import__(name)
    runner: Callable[[argparse.Namespace], list[Row]] = module.run
    return runner


def main(argv: list[str] | None = None, *, only: str | None = None) -> int:
    options = _common.parse(argv, only=only)
    started = time.perf_counter()
    cpus = _common.machine()["cpu_count"]
    print(
        f"newsletter performance suite ({'quick' if options.quick else 'full'}): "
        f"{', '.join(options.scenarios)}; {cpus} CPU core(s), "
        f"load average {_common.machine()['load_average']}",
        flush=True,
    )
    rows: list[Row] = []
    took: dict[str, float] = {}
    failed = []
    for name in options.scenarios:
        began = time.perf_counter()
        try:
            rows.extend(_scenario(name)(options))
        except Exception as e:  # one broken scenario must not cost the figures of the rest
            traceback.print_exc()
            failed.append(name)
            rows.append(Row(name, "", "FAILED", f"{type(e).__name__}: {str(e)[:120]}", met=False))
        took[name] = round(time.perf_counter() - began, 1)
    total = time.perf_counter() - started
    table = _common.markdown_table(rows)
    timing = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in took.items())
    footer = (
        f"{cpus} CPU core(s) shared by the load generator, the servers and the databases; "
        f"load average at the end {_common.machine()['load_average']}. "
        f"Run took {total / 60:.1f} min ({timing})."
    )
    print("\n" + table + "\n\n" + footer)
    _common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (_common.RESULTS_DIR / "suite.md").write_text(table + "\n\n" + footer + "\n")
    _common.write_results(
        "suite",
        {
            "quick": options.quick,
            "scenarios": options.scenarios,
            "seconds": took,
            "failed": failed,
            "rows": rows,
        },
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
