"""The README's first command, as a newcomer types it: `make run`, on another port when
8000 is taken (`make run PORT=8001`)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from app.migrations import head_revision
from tests.conftest import free_port, wait_until
from tests.processes import Process

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent


def _env(tmp_path: Path, database_url: str, **extra: str) -> dict[str, str]:
    """The caller's environment without its NEWSLETTER_ settings, and this test's own."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("NEWSLETTER_")}
    env.update(
        NEWSLETTER_DATABASE_URL=database_url,
        NEWSLETTER_SECRET_KEY_FILE=str(tmp_path / "secret.key"),
        NEWSLETTER_MAILER__DIRECTORY=str(tmp_path / "mail"),
        **extra,
    )
    return env


def test_make_run_on_another_port_serves_pages_whose_forms_and_links_use_it(
    tmp_path: Path, database_url: str
) -> None:
    port = free_port()
    env = _env(tmp_path, database_url)
    with (tmp_path / "log").open("wb") as log:
        # This test's own venv, taken as installed (`-o`): make must not reinstall it.
        command = ["make", "--no-print-directory", "-o", f"{VENV}/.installed", "run"]
        make = subprocess.Popen(
            [*command, f"PORT={port}", f"VENV={VENV}"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        try:
            page = wait_until(lambda: _page(port, make), timeout=60)
            assert make.poll() is None, (tmp_path / "log").read_text()
            # The hosted form posts back to this server, not to the default port's (in the
            # page's language, the list's own here).
            [action] = re.findall(r'<form method="post" action="([^"]+)"', page.text)
            assert action == f"http://127.0.0.1:{port}/v1/lists/bluehats/subscriptions?lang=fr"
            assert "public_url_elsewhere" not in (tmp_path / "log").read_text()
        finally:
            os.killpg(make.pid, signal.SIGTERM)
            make.wait(30)


def _page(port: int, make: subprocess.Popen[bytes]) -> httpx.Response | bool:
    if make.poll() is not None:
        return True
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/v1/lists/bluehats", timeout=1)
    except httpx.TransportError:
        return False
    return response if response.status_code == 200 else False


def test_serve_on_another_port_than_the_public_url_s_warns_that_forms_lead_there(
    tmp_path: Path, database_url: str
) -> None:
    port = free_port()
    env = _env(tmp_path, database_url, NEWSLETTER_RUN_WORKER="false")
    # `newsletter serve --port P` as the README's commands show it, the public URL left as is.
    serve = Process(["serve", "--port", str(port)], env=env, cwd=tmp_path, log=tmp_path / "log")
    try:
        serve.wait_for_log("Uvicorn running")
    finally:
        serve.terminate()
        serve.wait()
    assert (
        f"WARNING app.cli serve.public_url_elsewhere public_url=http://127.0.0.1:8000 "
        f"port={port}: the pages' forms and the mails' links lead there" in serve.log_text()
    )


def test_serve_for_other_machines_with_a_loopback_public_url_warns_and_logs_json_only(
    tmp_path: Path,
) -> None:
    # The Dockerfile's command (`--host 0.0.0.0`) with NEWSLETTER_PUBLIC_URL left out, on a
    # database its start migrates, logging JSON: every confirm link would have led to the
    # visitor's own machine without a word, and the migration's "database at 0009" was the
    # one line of the log that was not JSON.
    port = free_port()
    env = _env(tmp_path, f"sqlite:///{tmp_path / 'fresh.db'}", NEWSLETTER_LOG_FORMAT="json")
    serve = Process(
        ["serve", "--host", "0.0.0.0", "--port", str(port)],  # noqa: S104
        env=env,
        cwd=tmp_path,
        log=tmp_path / "log",
    )
    try:
        serve.wait_for_log("Uvicorn running", timeout=60)
    finally:
        serve.terminate()
        serve.wait()
    lines = [json.loads(line) for line in serve.log_text().splitlines()]
    events = {line["event"]: line for line in lines}
    assert events["serve.migrated"]["message"] == f"serve.migrated revision={head_revision()}"
    assert events["serve.starting"]["message"] == (
        f"serve.starting url=http://0.0.0.0:{port} database=sqlite workers=1 "
        "public_url=http://127.0.0.1:8000"
    )
    warning = events["serve.public_url_loopback"]
    assert warning["level"] == "WARNING"
    assert warning["message"] == (
        "serve.public_url_loopback public_url=http://127.0.0.1:8000 host=0.0.0.0: the mails' "
        "links and the pages' forms lead to this machine's loopback, which no visitor "
        "reaches; set NEWSLETTER_PUBLIC_URL to the address visitors use"
    )
    assert "serve.public_url_elsewhere" not in events
