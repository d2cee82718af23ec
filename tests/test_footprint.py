"""What each long-running process imports: every module stays in memory for good
(bench/footprint.py measures the resident memory these choices give)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _imported_by(module: str) -> set[str]:
    """Top-level packages in sys.modules after importing `module` in a new interpreter."""
    code = (
        f"import json, sys, {module}; "
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(done.stdout))


@pytest.mark.parametrize(
    ("module", "kept_out"),
    [
        # `newsletter worker`: no web framework, no server, no migration tooling; httpx
        # when a list's backend is first called.
        ("app.worker", {"fastapi", "uvicorn", "alembic", "mako", "redis", "httpx"}),
        # The API: alembic only in `newsletter migrate` (or a start that migrates); redis-py
        # only with NEWSLETTER_REDIS_URL; httpx never (the worker calls the backends).
        ("app.main", {"alembic", "mako", "redis", "httpx"}),
    ],
)
def test_a_long_running_process_does_not_import(module: str, kept_out: set[str]) -> None:
    imported = _imported_by(module)
    assert module.split(".")[0] in imported
    assert imported & kept_out == set()
