"""The whole API against its own OpenAPI document, by schemathesis (property-based).

The `schemathesis run` command line, as a subprocess (its pytest plugin has not kept up
with pytest 9), against the app served by uvicorn on loopback with an admin write key, so
the admin operations are exercised too. All of schemathesis's default checks: no server
error, status codes, content types, headers and bodies as documented, schema-valid
requests accepted and invalid ones refused; tests/schemathesis.toml names the few
operations whose valid requests no schema can describe, and why.

A fixed seed keeps the run reproducible (`SCHEMATHESIS_SEED` explores others); 20 examples
per operation keep it near 30 s.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import Session

from app import apikeys
from app.config import Settings
from app.main import create_app
from app.models import KeyScope, utcnow
from tests.conftest import LiveServer

CONFIG = Path(__file__).resolve().parent / "schemathesis.toml"
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
MAX_EXAMPLES = "20"
SEED = os.environ.get("SCHEMATHESIS_SEED", "1")


def test_the_api_keeps_to_its_openapi_document(
    settings: Settings, engine: sa.Engine, tmp_path: Path
) -> None:
    with Session(engine) as session:
        _row, key = apikeys.create(session, name="schemathesis", scope=KeyScope.WRITE, now=utcnow())
        session.commit()
    with LiveServer(create_app(settings)) as base_url:
        run = subprocess.run(
            [
                str(SCHEMATHESIS),
                "--config-file",
                str(CONFIG),
                "--no-color",
                "run",
                f"{base_url}/openapi.json",
                "--max-examples",
                MAX_EXAMPLES,
                "--seed",
                SEED,
                "--header",
                f"Authorization: Bearer {key}",
                "--generation-database",
                "none",
                # Generous: the suite shares a small machine; a slow answer is not the finding.
                "--request-timeout",
                "30",
            ],
            # schemathesis writes its files (reports, a cache) in its working directory.
            cwd=tmp_path,
            capture_output=True,
            text=True,
            # The admin URLs' text patterns (no control characters) cost hypothesis most of
            # it: about 4 minutes here with the other database's run alongside.
            timeout=600,
            check=False,
        )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-20000:]
    # Every operation of the document was run, the admin ones past their key check.
    selected = re.search(r"Selected: (\d+)/(\d+)", output)
    tested = re.search(r"Tested: (\d+)", output)
    assert selected is not None, output[-5000:]
    assert tested is not None, output[-5000:]
    assert selected[1] == selected[2] == tested[1], output[-5000:]
    assert "Authentication failed" not in output, output[-5000:]
