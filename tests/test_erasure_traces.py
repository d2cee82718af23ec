"""An erasure leaves the address nowhere, including the texts that merely quote it.

Real parts: an SMTP server (aiosmtpd) that refuses the person's address with a 550 quoting
it, the fake Mailgun of tests/fake_mailgun.py answering errors that quote it, the outbox
worker, the admin API and the `newsletter` command line. After the erasure every text
value of every table is searched for the address, as typed and lowercased, and so is every
line the service logged at INFO and above.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from fastapi.testclient import TestClient
from sqlmodel import SQLModel

from app import logs
from app.config import ListSettings, MailgunBackendSettings, Settings
from app.mailer import make_mailer
from app.main import create_app
from app.models import KeyScope
from app.worker import Worker
from tests.conftest import (
    SECRET,
    SmtpSink,
    api_key_headers,
    free_port,
    make_settings,
)
from tests.fake_mailgun import FakeMailgun

NEWSLETTER = str(Path(sys.executable).with_name("newsletter"))
LIST = "bluehats@mail.codegouv.fr"
# Capitals in the local part: kept as typed, lowercased by the backend's answers.
ADA = "Ada.Lovelace@example.org"
BOB = "bob@example.org"
EVIDENCE = {"source": "paper form", "note": "form no. 7", "consented_at": "2025-06-01"}


class RefusingSmtp(SmtpSink):
    """Accepts every recipient but one, refused with the 550 many relays send: quoting it."""

    refused: str = ADA

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address.lower() == self.refused.lower():
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.fixture
def refusing_smtp() -> Iterator[RefusingSmtp]:
    sink = RefusingSmtp(host="127.0.0.1", port=free_port())
    controller = Controller(sink, hostname=sink.host, port=sink.port)
    controller.start()
    yield sink
    controller.stop()


@pytest.fixture
def mailgun() -> Iterator[tuple[FakeMailgun, str]]:
    fake = FakeMailgun()
    fake.create_list(LIST)
    with fake.serve() as base_url:
        yield fake, base_url


def _lists(base_url: str) -> list[dict[str, Any]]:
    return [
        {
            "slug": "bluehats",
            "name": "Gazette BlueHats",
            "backend": {
                "kind": "mailgun",
                "list_address": LIST,
                "api_key": FakeMailgun.api_key,
                "base_url": base_url,
            },
        },
        {"slug": "events", "name": "Événements"},
    ]


def _settings(database_url: str, smtp: SmtpSink, base_url: str) -> Settings:
    declared = _lists(base_url)
    return make_settings(
        database_url,
        smtp_port=smtp.port,
        run_worker=False,
        retry_base_delay="0.05s",
        retry_max_delay="0.1s",
        lists=[
            ListSettings(
                slug=declared[0]["slug"],
                name=declared[0]["name"],
                backend=MailgunBackendSettings(**declared[0]["backend"]),
            ),
            ListSettings(slug=declared[1]["slug"], name=declared[1]["name"]),
        ],
    )


def holding(engine: sa.Engine, needle: str) -> list[tuple[str, str, str]]:
    """(table, column, value) of every value, in every table, holding `needle` exactly or
    URL-encoded."""
    needles = {needle, quote(needle, safe=""), quote(needle, safe="@")}
    found = []
    with engine.connect() as connection:
        for table in SQLModel.metadata.sorted_tables:
            for row in connection.execute(sa.select(table)).mappings():
                for column, value in row.items():
                    if value is None:
                        continue
                    text = (
                        json.dumps(value, ensure_ascii=False)
                        if isinstance(value, dict | list)
                        else str(value)
                    )
                    if any(n in text for n in needles):
                        found.append((table.name, column, text))
    return found


def _unfinished(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                sa.text("SELECT count(*) FROM outbox_job WHERE state IN ('pending', 'running')")
            ).scalar_one()
        )


def _drain(worker: Worker, engine: sa.Engine, *, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while _unfinished(engine):
        assert time.monotonic() < deadline, "the outbox did not drain"
        if worker.run_once() == 0:
            time.sleep(0.05)


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every line logged at INFO and above, as the service's formatter writes it."""
    formatter = logs.TextFormatter()
    return "\n".join(
        formatter.format(record) for record in caplog.records if record.levelno >= logging.INFO
    )


class TestErasureLeavesNoTrace:
    @pytest.mark.parametrize("way", ["admin_api", "command_line"])
    def test_refusals_that_quote_the_address_are_gone_after_the_erasure(
        self,
        way: str,
        database_url: str,
        engine: sa.Engine,
        refusing_smtp: RefusingSmtp,
        mailgun: tuple[FakeMailgun, str],
        caplog: pytest.LogCaptureFixture,
        tmp_path: Path,
    ) -> None:
        caplog.set_level(logging.DEBUG)
        fake, base_url = mailgun
        settings = _settings(database_url, refusing_smtp, base_url)
        worker = Worker(
            engine=engine, settings=settings, mailer=make_mailer(settings.mailer), name="w"
        )
        with TestClient(create_app(settings)) as client:
            writer = api_key_headers(engine, "operator", KeyScope.WRITE)
            for email in (ADA, BOB):
                added = client.post(
                    "/v1/admin/lists/bluehats/subscribers",
                    json={"email": email, "mode": "confirmed", "evidence": EVIDENCE},
                    headers=writer,
                )
                assert added.status_code == 200, added.text
            # Mailgun (or a proxy before it) is busy, and its answer to the bulk call of both
            # members quotes one of them: both jobs' attempts hold Ada's address.
            fake.answer_oddly(
                status=503,
                body=json.dumps({"message": f"busy adding {ADA.lower()}, try later"}).encode(),
                headers={"content-type": "application/json"},
            )
            worker.run_once()
            # Then it refuses her address, quoting it: her job is a dead letter.
            fake.reject(ADA, message=f"'{ADA.lower()}' is not a valid address")
            time.sleep(0.15)
            _drain(worker, engine)
            fake.rejected.clear()
            assert [m.address for m in fake.members_of(LIST)] == [BOB]
            # She asks for the other list; the relay refuses her mailbox, quoting it.
            asked = client.post("/v1/lists/events/subscriptions", json={"email": ADA})
            assert asked.status_code == 202
            _drain(worker, engine)
            quoted = holding(engine, ADA) + holding(engine, ADA.lower())
            assert {(table, column) for table, column, _ in quoted} >= {
                ("delivery_attempt", "error"),
                ("delivery_attempt", "response"),
                ("outbox_job", "last_error"),
            }
            # Bob's attempts too: the busy answer to the bulk call quoted her.
            assert any(BOB not in value and "busy adding" in value for _, _, value in quoted)

            if way == "admin_api":
                erased = client.delete(f"/v1/admin/people/{quote(ADA)}", headers=writer)
                assert erased.status_code == 200, erased.text
            else:
                env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
                env.update(
                    NEWSLETTER_DATABASE_URL=database_url,
                    NEWSLETTER_SECRET_KEY=SECRET,
                    NEWSLETTER_LISTS=json.dumps(_lists(base_url)),
                    NEWSLETTER_LOG_LEVEL="INFO",
                )
                done = subprocess.run(
                    [NEWSLETTER, "people", "erase", ADA, "--yes"],
                    env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                    check=False, stdin=subprocess.DEVNULL,
                )  # fmt: skip
                assert done.returncode == 0, done.stderr
                assert ADA.lower() not in (done.stdout + done.stderr).lower()
            _drain(worker, engine)
            worker.stop()

        assert fake.members_of(LIST)[0].address == BOB
        assert len(fake.members_of(LIST)) == 1
        assert holding(engine, ADA) == []
        assert holding(engine, ADA.lower()) == []
        # Bob's own records are untouched.
        assert holding(engine, BOB) != []
        logged = _logged(caplog)
        assert ADA not in logged
        assert ADA.lower() not in logged
        assert quote(ADA.lower(), safe="") not in logged.lower()
