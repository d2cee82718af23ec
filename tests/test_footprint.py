"""What each long-running process imports: every module stays in memory for good
(bench/footprint.py measures the resident memory these choices give)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _imported_by(module: str) -> set[str]:
    """Every module in sys.modules after importing `module` in a new interpreter."""
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(done.stdout))


# Neither needs: alembic (only `newsletter migrate`, or a start that migrates), redis-py
# (only with NEWSLETTER_REDIS_URL), rich (progress bars of the operator commands), httpx
# (the worker's, when a list's backend is first called), the PostgreSQL dialect on SQLite.
NEVER = {"alembic", "mako", "redis", "rich", "httpx", "sqlalchemy.dialects.postgresql"}


@pytest.mark.parametrize(
    ("module", "kept_out"),
    [
        ("app.worker", NEVER | {"fastapi", "starlette.routing", "uvicorn"}),
        ("app.main", NEVER),
    ],
)
def test_a_long_running_process_does_not_import(module: str, kept_out: set[str]) -> None:
    imported = _imported_by(module)
    assert module in imported
    unwanted = {
        name for name in imported if any(name == o or name.startswith(f"{o}.") for o in kept_out)
    }
    assert unwanted == set()
