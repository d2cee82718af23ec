"""What each long-running process imports: every module stays in memory for good
(bench/footprint.py measures the resident memory these choices give)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def test_the_served_app_freezes_its_start_up_heap(tmp_path: Path) -> None:
    """`serve_app` settles the heap once started (app/runtime.py); a test's app does not."""
    code = """
import gc, json, sys
from fastapi.testclient import TestClient
from app.config import Settings
from app.main import create_app
settings = Settings(database_url=sys.argv[1], secret_key="k" * 32, run_worker=False)
seen = {}
for settle in (False, True):
    with TestClient(create_app(settings, settle=settle)):
        seen[str(settle)] = [gc.get_freeze_count(), gc.get_threshold()[0]]
print(json.dumps(seen))
"""
    url = f"sqlite:///{tmp_path}/settle.db"
    done = subprocess.run(
        [sys.executable, "-c", code, url], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["False"] == [0, 700]
    frozen, young = seen["True"]
    # The start-up heap of the app: modules, routes, models, SQLAlchemy's tables.
    assert frozen > 50_000
    assert young == 10_000
