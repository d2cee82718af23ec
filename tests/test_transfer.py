"""CSV import and CSV / JSON-lines export: through the admin API and the command line.

Import: confirmed rows with their evidence, invitations by double opt-in, per-row errors
by line, whole-file refusals that write nothing (encoding, CSV syntax, header), duplicate
rows, erased addresses, dry runs, running a file twice, the body limit. Export: the consent
fields, filters, pages, and formulas kept out of spreadsheets.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import pty
import signal
import stat
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from app import apikeys, db, lists, privacy, transfer
from app.config import Settings
from app.main import create_app
from app.models import (
    AuditEvent,
    ConsentEvent,
    ErasedAddress,
    JobKind,
    KeyScope,
    OutboxJob,
    Subscription,
    utcnow,
)
from tests.conftest import SECRET, SmtpSink, count_rows, link_in, make_settings, wait_until

NEWSLETTER = str(Path(sys.executable).with_name("newsletter"))
IMPORT = "/v1/admin/lists/bluehats/import"
EXPORT = "/v1/admin/lists/bluehats/export"
HEADER = "email,name,locale,attributes,consent_source,consent_date\n"
WRITTEN_TABLES = ("subscription", "consent_event", "outbox_job", "token")


def _key(engine: sa.Engine, name: str, scope: KeyScope) -> str:
    with db.session_scope(engine) as session:
        _, key = apikeys.create(session, name=name, scope=scope, now=utcnow())
    return key


@pytest.fixture
def read_key(client: TestClient, engine: sa.Engine) -> dict[str, str]:
    return {"authorization": f"Bearer {_key(engine, 'dashboard', KeyScope.READ)}"}


@pytest.fixture
def write_key(client: TestClient, engine: sa.Engine) -> dict[str, str]:
    return {"authorization": f"Bearer {_key(engine, 'operator', KeyScope.WRITE)}"}


def _import(
    client: TestClient, key: dict[str, str], body: str | bytes, **params: Any
) -> httpx.Response:
    return client.post(
        IMPORT,
        content=body.encode() if isinstance(body, str) else body,
        params=params,
        headers={**key, "content-type": "text/csv"},
    )


def _row(email: str, **values: str) -> str:
    """One CSV line in HEADER's column order; evidence by default."""
    fields = {
        "name": "",
        "locale": "",
        "attributes": "",
        "consent_source": "Paper form, BlueHats meetup",
        "consent_date": "2025-03-12",
        **values,
    }
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(
        [email, *(fields[name] for name in HEADER.strip().split(",")[1:])]
    )
    return buffer.getvalue()


def _subscriptions(engine: sa.Engine) -> dict[str, Subscription]:
    with Session(engine) as session:
        return {row.email: row for row in session.exec(select(Subscription)).all()}


def _written(url: str) -> dict[str, int]:
    """Row counts of what an import writes, once the worker has run every job (a sync
    issues the subscriber's unsubscribe token)."""

    def settled() -> bool:
        engine = sa.create_engine(url)
        with engine.connect() as connection:
            busy = connection.exec_driver_sql(
                "SELECT count(*) FROM outbox_job WHERE state IN ('pending', 'running')"
            ).scalar_one()
        engine.dispose()
        return busy == 0

    wait_until(settled)
    return {table: count_rows(url, table) for table in WRITTEN_TABLES}


def _big_file(folder: Path, rows: int) -> Path:
    """A CSV of `rows` subscribers with their consent, for runs long enough to stop."""
    big = folder / "big.csv"
    with big.open("w") as out:
        out.write("email,consent_source,consent_date\n")
        out.writelines(f"user{n}@example.org,Paper form,2025-03-12\n" for n in range(rows))
    return big


def _cli_env(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(
        NEWSLETTER_DATABASE_URL=database_url,
        NEWSLETTER_SECRET_KEY=SECRET,
        NEWSLETTER_LOG_LEVEL="WARNING",
    )
    return env


def _ctrl_c_once(
    command: list[str], env: dict[str, str], *, when: Callable[[], bool]
) -> tuple[int, str]:
    """Run `command`, press Ctrl-C once `when()` holds; its exit code and stderr."""
    running = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as a terminal sends it, whatever the test runner's own disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        wait_until(when, timeout=60)
        running.send_signal(signal.SIGINT)
        _, stderr = running.communicate(timeout=60)
    finally:
        running.kill()
    return running.returncode, stderr


def _audit(engine: sa.Engine, action: str) -> list[AuditEvent]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(AuditEvent).where(AuditEvent.action == action).order_by(col(AuditEvent.id))
            ).all()
        )


class TestImportConfirmed:
    def test_rows_with_evidence_become_confirmed_with_a_ledger_event_and_a_sync(
        self, client: TestClient, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        camille_row = _row(
            "Camille.Martin@Example.org",
            name="Camille Martin",
            locale="EN",
            attributes='{"org": "DINUM"}',
            consent_date="2025-03-12T09:30:00+01:00",
        )
        body = HEADER + camille_row + _row("dominique@example.org")
        response = _import(client, write_key, body, note="from the 2025 meetup")
        assert response.status_code == 200, response.text
        assert response.json() == {
            "list": "bluehats", "mode": "confirmed", "dry_run": False, "read": 2,
            "created": 2, "unchanged": 0, "invalid": 0, "errors": [],
        }  # fmt: skip
        rows = _subscriptions(engine)
        camille = rows["Camille.Martin@example.org"]
        assert (camille.status, camille.locale, camille.email_key) == (
            "confirmed",
            "en",
            "camille.martin@example.org",
        )
        assert camille.attributes == {"org": "DINUM", "name": "Camille Martin"}
        assert camille.confirmed_at is not None
        assert rows["dominique@example.org"].locale == "fr"  # the list's language
        with Session(engine) as session:
            [event] = session.exec(
                select(ConsentEvent).where(ConsentEvent.subscription_id == camille.id)
            ).all()
            assert (event.action, event.source, event.status_after) == (
                "imported",
                "import",
                "confirmed",
            )
            assert event.detail == {
                "consent_source": "Paper form, BlueHats meetup",
                "consent_date": "2025-03-12T08:30:00+00:00",
                "operator": "operator",
                "note": "from the 2025 meetup",
            }
        assert rows["dominique@example.org"].id is not None

        def synced() -> bool:
            with Session(engine) as session:
                jobs = session.exec(select(OutboxJob).where(OutboxJob.kind == JobKind.SYNC)).all()
                return len(jobs) == 2 and all(job.state == "done" for job in jobs)

        # The in-process worker runs the sync jobs (the list's backend is "none").
        wait_until(synced)
        [entry] = _audit(engine, "subscribers.import")
        assert (entry.actor, entry.target, entry.outcome) == ("operator", "bluehats", "ok")
        assert entry.detail == {
            "mode": "confirmed", "dry_run": False, "read": 2, "created": 2, "unchanged": 0,
            "invalid": 0, "note": "from the 2025 meetup",
        }  # fmt: skip

    def test_a_row_without_consent_source_is_refused_unless_it_is_an_invitation(
        self, client: TestClient, smtp: SmtpSink, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        body = HEADER + _row("ann@example.org", consent_source="", consent_date="")
        refused = _import(client, write_key, body).json()
        assert (refused["created"], refused["invalid"]) == (0, 1)
        assert "consent_source is empty" in refused["errors"][0]["error"]
        assert "mode=invite" in refused["errors"][0]["error"]
        no_date = _import(client, write_key, HEADER + _row("ann@example.org", consent_date=""))
        assert "consent_date is empty" in no_date.json()["errors"][0]["error"]

        invited = _import(client, write_key, body, mode="invite", note="asked at FOSDEM").json()
        assert (invited["mode"], invited["created"], invited["invalid"]) == ("invite", 1, 0)
        assert _subscriptions(engine)["ann@example.org"].status == "pending"
        mail = smtp.mail_to("ann@example.org", link="confirm")
        with Session(engine) as session:
            [event] = session.exec(select(ConsentEvent)).all()
            assert (event.action, event.source) == ("subscribe_requested", "operator")
            assert event.detail == {
                "operator": "operator",
                "note": "asked at FOSDEM",
                "via": "import",
            }
        assert client.post(link_in(mail, "confirm")).status_code == 200
        assert _subscriptions(engine)["ann@example.org"].status == "confirmed"

    def test_a_row_s_consent_version_is_the_wording_its_subscription_and_ledger_keep(
        self, client: TestClient, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        # Consent given on the old site's form, to its own wording: the proof must say so,
        # not claim this list's current wording.
        header = HEADER.strip() + ",consent_version\n"
        body = (
            header
            + _row("old-form@example.org").strip() + ",2019-site-form\n"  # line 2
            + _row("no-version@example.org").strip() + ",\n"  # 3: the list's own
            + _row("long@example.org").strip() + "," + "v" * 65 + "\n"  # 4
        )  # fmt: skip
        result = _import(client, write_key, body).json()
        assert (result["created"], result["invalid"]) == (2, 1), result
        [error] = result["errors"]
        assert error["line"] == 4
        assert "consent_version is longer than 64 characters" in error["error"]
        rows = _subscriptions(engine)
        with Session(engine) as session:
            current = lists.get(session, slug="bluehats").consent_version
        assert current != "2019-site-form"
        assert rows["old-form@example.org"].consent_version == "2019-site-form"
        assert rows["no-version@example.org"].consent_version == current
        with Session(engine) as session:
            versions = {
                event.subscription_id: event.consent_version
                for event in session.exec(select(ConsentEvent)).all()
            }
        assert versions == {
            rows["old-form@example.org"].id: "2019-site-form",
            rows["no-version@example.org"].id: current,
        }

        # An invitation asks for consent to today's wording: a version there is a mistake.
        invited = _import(
            client,
            write_key,
            header + _row("invited@example.org").strip() + ",2019-site-form\n",
            mode="invite",
        ).json()
        assert (invited["created"], invited["invalid"]) == (0, 1)
        assert "consent_version is for consent given elsewhere" in invited["errors"][0]["error"]
        assert "invited@example.org" not in _subscriptions(engine)

    def test_each_refused_row_is_reported_by_line_and_the_others_imported(
        self, client: TestClient, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        body = (
            HEADER
            + _row("good@example.org")  # line 2
            + _row("not-an-address")  # 3
            + _row("bad-locale@example.org", locale="de")  # 4
            + _row("list-attributes@example.org", attributes="[1, 2]")  # 5
            + _row("bad-name@example.org", attributes='{"Org": "x"}')  # 6
            + _row("french-date@example.org", consent_date="12/03/2025")  # 7
            + _row("future@example.org", consent_date="2999-01-01")  # 8
            + '"multi@example.org","Two\nlines",fr,,source,2025-01-01\n'  # 9-10
            + "short@example.org,only two\n"  # 11
            + _row("")  # 12
            + _row("number@example.org", attributes='{"n": 3}')  # 13
            + _row("twice@example.org", name="A", attributes='{"name": "B"}')  # 14
            + "\n"  # 15: blank, skipped
            + _row("last@example.org")  # 16
        )
        response = _import(client, write_key, body)
        assert response.status_code == 200
        result = response.json()
        assert (result["read"], result["created"], result["invalid"]) == (13, 2, 11)
        errors = {item["line"]: item for item in result["errors"]}
        assert sorted(errors) == [3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14]
        expected = {
            3: "email is not a valid address",
            4: "locale 'de' is not one of fr, en",
            5: "attributes must be a JSON object",
            6: "must be lowercase letters",
            7: "is not an ISO date",
            8: "is in the future",
            # A cell written on two lines (Alt+Enter in a spreadsheet): said as such, where
            # "control characters" sent the operator looking for invisible ones.
            9: "name is written on several lines (a line break inside the cell): put it on "
            "one line.",
            11: "The row has 2 fields, the header 6",
            12: "email is empty",
            13: "must be a string",
            14: "name is given twice",
        }
        for line, text in expected.items():
            assert text in errors[line]["error"], (line, errors[line])
        # Masked addresses: the line finds the row; a pasted report names nobody.
        assert errors[4]["email"] == "b***@example.org"
        assert errors[3]["email"] == "n***"
        assert set(_subscriptions(engine)) == {"good@example.org", "last@example.org"}

    def test_a_consent_date_out_of_range_once_in_utc_is_a_row_error(
        self, client: TestClient, write_key: dict[str, str]
    ) -> None:
        body = (
            HEADER
            + _row("early@example.org", consent_date="0001-01-01T00:00:00+14:00")
            + _row("late@example.org", consent_date="9999-12-31T23:59:59-14:00")
            + _row("fine@example.org", consent_date="2025-01-01T00:00:00-14:00")
        )
        response = _import(client, write_key, body, mode="confirmed")
        assert response.status_code == 200, response.text
        report = response.json()
        assert (report["created"], report["invalid"]) == (1, 2)
        assert [error["line"] for error in report["errors"]] == [2, 3]
        assert "out of range once in UTC" in report["errors"][0]["error"]
        assert "out of range once in UTC" in report["errors"][1]["error"]

    def test_a_consent_date_before_1990_is_a_row_error(
        self, client: TestClient, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        # A spreadsheet's empty date (.NET's, Excel's, Unix's zero) or a typo: as proof, it
        # would date a consent nobody gave then.
        body = (
            HEADER
            + _row("year-one@example.org", consent_date="0001-01-01")
            + _row("excel-zero@example.org", consent_date="1899-12-30")
            + _row("epoch@example.org", consent_date="1970-01-01T00:00:00Z")
            + _row("typo@example.org", consent_date="0205-03-12")
            + _row("fine@example.org", consent_date="1990-01-01")
        )
        report = _import(client, write_key, body, mode="confirmed").json()
        assert (report["read"], report["created"], report["invalid"]) == (5, 1, 4)
        assert [(error["line"], error["error"]) for error in report["errors"]] == [
            (
                line,
                f"consent_date {day} is before 1990-01-01, which no consent here can be (an "
                "empty date in a spreadsheet reads as 1900-01-01 or 0001-01-01).",
            )
            for line, day in (
                (2, "0001-01-01"), (3, "1899-12-30"), (4, "1970-01-01"), (5, "0205-03-12")
            )
        ]  # fmt: skip
        assert set(_subscriptions(engine)) == {"fine@example.org"}

    def test_a_locale_with_a_region_is_its_language_as_the_sign_up_takes_it(
        self, client: TestClient, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        body = (
            HEADER
            + _row("ann@example.org", locale="fr-FR")
            + _row("bob@example.org", locale="en_GB")
            + _row("cy@example.org", locale=" EN ")
            + _row("dora@example.org", locale="de-DE")
        )
        report = _import(client, write_key, body).json()
        assert (report["created"], report["invalid"]) == (3, 1)
        assert [(error["line"], error["error"]) for error in report["errors"]] == [
            (5, "locale 'de-de' is not one of fr, en.")
        ]
        assert {email: row.locale for email, row in _subscriptions(engine).items()} == {
            "ann@example.org": "fr", "bob@example.org": "en", "cy@example.org": "en"
        }  # fmt: skip

    def test_a_name_around_the_address_is_kept_as_the_name(
        self, client: TestClient, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        # As a mail program's address book, or a members list pasted from one, writes them.
        body = (
            HEADER
            + _row("Camille Dupont <camille@example.org>")  # line 2
            + _row('"Durand, Hélène" <helene@example.org>')  # 3
            + _row("<nobody@example.org>")  # 4
            + _row("Zoé <zoe@example.org>", name="Zoé")  # 5
            + _row("Zoé <zoe2@example.org>", name="Zoë")  # 6
            + _row("Bad <>")  # 7
        )
        report = _import(client, write_key, body).json()
        assert (report["read"], report["created"], report["invalid"]) == (6, 4, 2)
        assert [(error["line"], error["email"], error["error"]) for error in report["errors"]] == [
            (6, "z***@example.org", "name is given twice, differently (column and email cell)."),
            (7, "", "email is empty between its angle brackets."),
        ]
        assert {email: row.attributes for email, row in _subscriptions(engine).items()} == {
            "camille@example.org": {"name": "Camille Dupont"},
            "helene@example.org": {"name": "Durand, Hélène"},
            "nobody@example.org": {},
            "zoe@example.org": {"name": "Zoé"},
        }

    def test_an_email_cell_of_spaces_is_read_in_linear_time(
        self, client: TestClient, write_key: dict[str, str]
    ) -> None:
        # Read as a possible `Name <address>`: two parts that could both take the spaces
        # made it quadratic, seconds for a line a file may hold thousands of.
        body = HEADER + _row("a" + " " * 60_000 + "b@example.org")
        started = time.monotonic()
        report = _import(client, write_key, body).json()
        assert time.monotonic() - started < 1.5
        assert report["invalid"] == 1

    def test_a_duplicate_row_is_reported_and_only_its_first_line_imported(
        self, client: TestClient, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        body = (
            HEADER
            + _row("ann@example.org", name="First")
            + _row("bob@example.org")
            + _row("ANN@example.org", name="Second")
        )
        result = _import(client, write_key, body).json()
        assert (result["read"], result["created"], result["invalid"]) == (3, 2, 1)
        assert result["errors"] == [
            {
                "line": 4,
                "email": "A***@example.org",
                "error": "The same address as line 2; only that line is imported.",
            }
        ]
        assert _subscriptions(engine)["ann@example.org"].attributes == {"name": "First"}

    def test_running_a_file_twice_changes_nothing_the_second_time(
        self, client: TestClient, database_url: str, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        body = HEADER + "".join(_row(f"user{n}@example.org") for n in range(30))
        first = _import(client, write_key, body).json()
        assert (first["created"], first["unchanged"]) == (30, 0)
        after_first = _written(database_url)
        second = _import(client, write_key, body).json()
        assert (second["created"], second["unchanged"], second["invalid"]) == (0, 30, 0)
        assert _written(database_url) == after_first
        assert count_rows(database_url, "subscription") == 30

    def test_an_address_already_on_the_list_keeps_its_state(
        self, client: TestClient, smtp: SmtpSink, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        client.post("/v1/lists/bluehats/subscriptions", json={"email": "left@example.org"})
        client.post(link_in(smtp.mail_to("left@example.org", link="confirm"), "confirm"))
        with db.session_scope(engine) as session:
            row = session.exec(select(Subscription)).one()
            row.status = "unsubscribed"
            session.add(row)
        for mode in ("confirmed", "invite"):
            result = _import(client, write_key, HEADER + _row("Left@example.org"), mode=mode)
            assert (result.json()["created"], result.json()["unchanged"]) == (0, 1)
        assert _subscriptions(engine)["left@example.org"].status == "unsubscribed"

    def test_an_erased_address_is_refused_in_every_mode(
        self,
        client: TestClient,
        database_url: str,
        engine: sa.Engine,
        write_key: dict[str, str],
    ) -> None:
        with db.session_scope(engine) as session:
            session.add(
                ErasedAddress(
                    address_hash=privacy.address_hash("gone@example.org", key=SECRET.encode())
                )
            )
        body = HEADER + _row("Gone@Example.org") + _row("kept@example.org")
        for params in ({"dry_run": "true"}, {"mode": "invite"}, {}):
            result = _import(client, write_key, body, **params).json()
            assert result["invalid"] == 1, params
            [error] = result["errors"]
            assert error["line"] == 2
            assert "erased" in error["error"]
        emails = set(_subscriptions(engine))
        assert emails == {"kept@example.org"}
        assert "gone" not in json.dumps([e.detail for e in _audit(engine, "subscribers.import")])

    def test_thousands_of_refused_rows_are_all_counted_and_the_first_by_line_listed(
        self, client: TestClient, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        # An erased address is refused when its batch is written, after the rows below it
        # were read: it still comes first, by line.
        with db.session_scope(engine) as session:
            session.add(
                ErasedAddress(
                    address_hash=privacy.address_hash("gone@example.org", key=SECRET.encode())
                )
            )
        body = (
            HEADER
            + _row("gone@example.org")  # line 2
            + "".join(_row(f"bad{n}") for n in range(2500))  # lines 3 to 2502
            + _row("kept@example.org")  # 2503
        )
        result = _import(client, write_key, body).json()
        assert (result["read"], result["created"], result["invalid"]) == (2502, 1, 2501)
        assert len(result["errors"]) == transfer.MAX_ERRORS
        assert [error["line"] for error in result["errors"]] == list(range(2, 102))
        assert "erased" in result["errors"][0]["error"]
        [entry] = _audit(engine, "subscribers.import")
        assert entry.detail["invalid"] == 2501

    def test_a_dry_run_counts_like_the_real_run_and_writes_nothing(
        self, client: TestClient, database_url: str, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        _import(client, write_key, HEADER + _row("known@example.org"))
        before = _written(database_url)
        body = (
            HEADER
            + _row("known@example.org")
            + _row("new1@example.org")
            + _row("new2@example.org")
            + _row("broken")
        )
        for mode in ("confirmed", "invite"):
            dry = _import(client, write_key, body, dry_run="true", mode=mode).json()
            assert dry["dry_run"] is True
            assert (dry["read"], dry["created"], dry["unchanged"], dry["invalid"]) == (4, 2, 1, 1)
            assert dry["errors"][0]["line"] == 5
            assert _written(database_url) == before
        real = _import(client, write_key, body).json()
        assert (real["created"], real["unchanged"], real["invalid"]) == (2, 1, 1)
        details = [entry.detail["dry_run"] for entry in _audit(engine, "subscribers.import")]
        assert details == [False, True, True, False]


class TestImportRefusesTheFile:
    """A file that cannot be read as a whole is refused before any row is written."""

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            (b"", "The file is empty"),
            (b"\n" + HEADER.encode(), "first line is blank"),
            (b"name,locale\nCamille,fr\n", "no email column"),
            (
                b"email,phone\na@example.org,0612345678\n",
                "Unknown column(s) in the header: 'phone'",
            ),
            (b"email,email\na@example.org,a@example.org\n", "repeats email"),
            # Another tool's member list, whose rows include those who left there.
            (
                b"Address,Name,Subscribed,Vars\na@example.org,A,false,{}\n",
                "The header is that of a Mailgun member list (address, subscribed), whose rows "
                "carry each member's state at that backend (those who left included): take the "
                "list's members over with `newsletter import-backend --list <slug>`",
            ),
            (
                b"uuid,email,name,attributes,status,created_at,updated_at\n"
                b'5e7c,a@example.org,A,"{}",enabled,2024-01-01,2024-01-01\n',
                "The header is that of a listmonk subscriber export (uuid, email, status)",
            ),
            # A bare list of addresses: "Unknown column(s) in the header: 'a@example.org'".
            (
                b"a@example.org\nb@example.org\n",
                "The first line holds an address, not the columns' names: put a header line "
                "first (email, alone for a list of addresses).",
            ),
            # Between two names (after the last one, a spreadsheet's trailing separator).
            (b"email,,name\na@example.org,,A\n", "Column 2 of the header has no name"),
            (
                b'{"email": "a@example.org", "name": "A, B", "status": "confirmed"}\n',
                "The file holds JSON lines (an export with format jsonl?), not CSV",
            ),
        ],
    )
    def test_a_bad_header_is_a_clear_400(
        self, client: TestClient, write_key: dict[str, str], body: bytes, message: str
    ) -> None:
        response = _import(client, write_key, body)
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_csv"
        assert message in response.json()["detail"]

    def test_a_misspelt_parameter_is_refused_before_anything_is_written(
        self,
        client: TestClient,
        database_url: str,
        read_key: dict[str, str],
        write_key: dict[str, str],
    ) -> None:
        # Ignored, `dryrun` would have made this a real import, and `state` an export of
        # everyone, the unsubscribed too.
        response = _import(client, write_key, HEADER + _row("ann@example.org"), dryrun="true")
        assert response.status_code == 422
        assert response.json() == {
            "error": "validation_error",
            "detail": "query.dryrun: not a parameter of this route (it takes: dry_run, mode, note)",
        }
        assert count_rows(database_url, "subscription") == 0
        exported = client.get(EXPORT, params={"state": "confirmed"}, headers=read_key)
        assert exported.status_code == 422
        assert exported.json()["detail"].startswith("query.state: not a parameter")

    def test_a_filter_given_twice_is_refused_not_half_applied(
        self, client: TestClient, database_url: str, read_key: dict[str, str]
    ) -> None:
        # FastAPI kept the last: "the confirmed and the pending" exported the pending alone.
        exported = client.get(
            f"{EXPORT}?status=confirmed&status=pending&format=csv", headers=read_key
        )
        assert exported.status_code == 422, exported.text
        assert exported.json() == {
            "error": "validation_error",
            "detail": "query.status: given 2 times: it takes one value (ask once per value)",
        }
        listed = client.get(
            "/v1/admin/lists/bluehats/subscribers?limit=1&limit=50", headers=read_key
        )
        assert listed.status_code == 422, listed.text
        assert listed.json()["detail"].startswith("query.limit: given 2 times")
        once = client.get(f"{EXPORT}?status=confirmed&format=csv", headers=read_key)
        assert once.status_code == 200, once.text

    def test_malformed_csv_writes_nothing_even_before_the_bad_line(
        self, client: TestClient, database_url: str, write_key: dict[str, str]
    ) -> None:
        body = HEADER + "".join(_row(f"user{n}@example.org") for n in range(1500))
        body += '"broken@example.org,unterminated quote\n'
        response = _import(client, write_key, body)
        assert response.status_code == 400
        assert response.json() == {
            "error": "invalid_csv",
            "detail": "Line 1502 is not valid CSV (unexpected end of data).",
        }
        assert count_rows(database_url, "subscription") == 0

    def test_a_file_not_in_utf8_is_refused_with_the_line(
        self, client: TestClient, database_url: str, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        latin1 = (HEADER + _row("a@example.org") + _row("b@example.org", name="Hélène")).encode(
            "latin-1"
        )
        response = _import(client, write_key, latin1)
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_csv"
        assert response.json()["detail"].startswith("Line 3 is not UTF-8 (byte 0xe9")
        unix = HEADER + _row("a@example.org")
        # Also with Windows line ends, as a spreadsheet's "Unicode text" has them: its \r\0\n
        # was taken for lines ending with a carriage return alone.
        for text in (unix, unix.replace("\n", "\r\n")):
            utf16 = _import(client, write_key, text.encode("utf-16"))
            assert utf16.status_code == 400
            assert utf16.json()["detail"] == (
                'The file is UTF-16, not UTF-8: save the file as UTF-8 ("CSV UTF-8" in a '
                "spreadsheet)."
            )
        assert count_rows(database_url, "subscription") == 0
        outcomes = [entry.outcome for entry in _audit(engine, "subscribers.import")]
        assert outcomes == ["error:invalid_csv"] * 3

    def test_a_spreadsheet_workbook_is_refused_saying_to_save_it_as_csv(
        self, client: TestClient, database_url: str, write_key: dict[str, str]
    ) -> None:
        # The workbook itself (.xlsx and .ods are ZIP files, .xls an OLE2 one): it was
        # refused as "not UTF-8 (... Latin-1 or Windows-1252?)", a wrong lead.
        workbook = io.BytesIO()
        with zipfile.ZipFile(workbook, "w") as archive:
            archive.writestr("[Content_Types].xml", "<Types/>")
            archive.writestr("xl/workbook.xml", "<workbook/>")
        legacy = bytes.fromhex("D0CF11E0A1B11AE1") + bytes(504)
        for body in (workbook.getvalue(), legacy):
            response = _import(client, write_key, body)
            assert response.status_code == 400
            assert response.json() == {
                "error": "invalid_csv",
                "detail": "The file is a spreadsheet workbook (.xlsx, .ods or .xls), not CSV: "
                'save it as "CSV UTF-8" from the spreadsheet and import that file.',
            }
        assert count_rows(database_url, "subscription") == 0

    def test_a_file_whose_lines_end_with_a_carriage_return_alone_is_refused_saying_so(
        self, client: TestClient, database_url: str, write_key: dict[str, str]
    ) -> None:
        classic_mac = (HEADER + _row("a@example.org") + _row("b@example.org")).replace("\n", "\r")
        response = _import(client, write_key, classic_mac.encode())
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_csv"
        assert response.json()["detail"].startswith("The lines end with a carriage return alone")
        assert count_rows(database_url, "subscription") == 0
        # Windows line ends are read as ever.
        windows = (HEADER + _row("a@example.org")).replace("\n", "\r\n")
        assert _import(client, write_key, windows.encode()).status_code == 200

    def test_a_spreadsheet_export_with_bom_semicolons_and_crlf_is_read(
        self, client: TestClient, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        body = (
            "\ufeffEmail;Name;Consent_Source;Consent_Date\r\n"
            "helene@example.org;Hélène Durand;Formulaire papier;2025-03-12\r\n"
        ).encode()
        result = _import(client, write_key, body)
        assert result.status_code == 200, result.text
        assert result.json()["created"] == 1
        assert _subscriptions(engine)["helene@example.org"].attributes == {"name": "Hélène Durand"}

    def test_a_spreadsheet_s_empty_columns_after_the_last_one_are_left_out(
        self, client: TestClient, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        # A spreadsheet writes a separator for each column once used or formatted, header
        # included; the whole file was refused ("Column 5 of the header has no name").
        body = (
            "Email;Name;Consent_Source;Consent_Date;;\r\n"
            "helene@example.org;Hélène Durand;Formulaire papier;2025-03-12;;\r\n"
            "jean@example.org;Jean;Formulaire papier;2025-03-12\r\n"
            "lea@example.org;Léa;Formulaire papier;2025-03-12;;;\r\n"
            "max@example.org;Max;Formulaire papier;2025-03-12;;oui\r\n"
            ";;;;;\r\n"
        ).encode()
        result = _import(client, write_key, body)
        assert result.status_code == 200, result.text
        report = result.json()
        assert (report["read"], report["created"], report["invalid"]) == (4, 3, 1)
        # A value there is no empty cell: nothing says which column it belongs to.
        assert report["errors"] == [
            {"line": 5, "email": "m***@example.org", "error": "The row has 6 fields, the header 4."}
        ]
        assert _subscriptions(engine)["helene@example.org"].attributes == {"name": "Hélène Durand"}
        assert set(_subscriptions(engine)) == {
            "helene@example.org", "jean@example.org", "lea@example.org"
        }  # fmt: skip

    def test_excel_s_separator_line_names_the_separator_and_lines_keep_their_numbers(
        self, client: TestClient, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        body = (
            "\ufeffsep=;\r\n"
            "Email;Name;Consent_Source;Consent_Date\r\n"
            "helene@example.org;Durand, Hélène;Formulaire papier;2025-03-12\r\n"
            "not-an-address;Personne;Formulaire papier;2025-03-12\r\n"
        ).encode()
        result = _import(client, write_key, body)
        assert result.status_code == 200, result.text
        assert result.json()["created"] == 1
        # The name holds a comma: the separator is the one the first line names.
        assert _subscriptions(engine)["helene@example.org"].attributes == {"name": "Durand, Hélène"}
        [refused] = result.json()["errors"]
        assert refused["line"] == 4  # as a spreadsheet numbers it: the sep= line is line 1

    def test_a_body_that_is_not_csv_is_415(
        self, client: TestClient, write_key: dict[str, str]
    ) -> None:
        response = client.post(IMPORT, json={"email": "a@example.org"}, headers=write_key)
        assert response.status_code == 415
        assert response.json() == {
            "error": "unsupported_media_type",
            "detail": "Send the file as text/csv.",
        }

    def test_a_compressed_file_is_415_naming_identity(
        self, client: TestClient, database_url: str, write_key: dict[str, str]
    ) -> None:
        # A large export gzipped for the trip: read as sent, it was a file of nonsense.
        response = client.post(
            IMPORT,
            content=gzip.compress((HEADER + _row("ann@example.org")).encode()),
            headers={**write_key, "content-type": "text/csv", "content-encoding": "gzip"},
        )
        assert response.status_code == 415, response.text
        assert response.json() == {
            "error": "unsupported_media_type",
            "detail": "Send the body uncompressed, without a Content-Encoding (identity only).",
        }
        assert response.headers["accept-encoding"] == "identity"
        assert count_rows(database_url, "subscription") == 0

    def test_a_form_upload_is_415_saying_how_to_send_the_file(
        self, client: TestClient, database_url: str, write_key: dict[str, str]
    ) -> None:
        # `curl -F file=@subscribers.csv`, a browser's file field: the file inside a form.
        response = client.post(
            IMPORT,
            files={"file": ("subscribers.csv", HEADER + _row("ann@example.org"), "text/csv")},
            headers=write_key,
        )
        assert response.status_code == 415
        assert response.json() == {
            "error": "unsupported_media_type",
            "detail": "Send the file itself as the body, as text/csv, not inside a form "
            "(multipart/form-data): curl --data-binary @subscribers.csv -H 'Content-Type: "
            "text/csv' ...",
        }
        assert count_rows(database_url, "subscription") == 0

    def test_unknown_list_is_404_and_a_read_key_is_403(
        self,
        client: TestClient,
        engine: sa.Engine,
        read_key: dict[str, str],
        write_key: dict[str, str],
    ) -> None:
        body = HEADER + _row("a@example.org")
        unknown = client.post(
            "/v1/admin/lists/nope/import",
            content=body,
            headers={**write_key, "content-type": "text/csv"},
        )
        assert unknown.status_code == 404
        assert unknown.json()["error"] == "list_not_found"
        assert _import(client, read_key, body).status_code == 403
        assert _import(client, {}, body).status_code == 401
        [entry] = _audit(engine, "subscribers.import")
        assert (entry.target, entry.outcome) == ("nope", "error:list_not_found")


class TestAFileWithoutRows:
    """A header and nothing under it is most often the wrong file (an export whose filters
    matched nobody, the template instead of the filled-in copy): refused, saying so, and
    told apart from a file that cannot be read by its code."""

    EXPECTED = (
        "The file holds no rows: its header (email, name, locale, attributes, consent_source, "
        "consent_date) is followed by no subscriber, so nothing was imported. Is it the right "
        "file?"
    )

    @pytest.mark.parametrize(
        "body", [HEADER, HEADER + "\n\n", HEADER.replace("\n", "\r\n") + ",,,,,\r\n"]
    )
    def test_the_api_answers_400_empty_csv_and_audits_it(
        self,
        client: TestClient,
        database_url: str,
        engine: sa.Engine,
        write_key: dict[str, str],
        body: str,
    ) -> None:
        for params in ({}, {"dry_run": "true"}, {"mode": "invite"}):
            response = _import(client, write_key, body, **params)
            assert response.status_code == 400, params
            assert response.json() == {"error": "empty_csv", "detail": self.EXPECTED}
        assert count_rows(database_url, "subscription") == 0
        outcomes = [entry.outcome for entry in _audit(engine, "subscribers.import")]
        assert outcomes == ["error:empty_csv"] * 3

    def test_the_command_exits_2_with_the_same_words(
        self, database_url: str, engine: sa.Engine, tmp_path: Path
    ) -> None:
        empty = tmp_path / "empty.csv"
        empty.write_text(HEADER)
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        env.update(NEWSLETTER_DATABASE_URL=database_url, NEWSLETTER_SECRET_KEY=SECRET)
        for extra in ((), ("--dry-run",), ("--json",)):
            result = subprocess.run(
                [NEWSLETTER, "import", "--list", "bluehats", str(empty), *extra], env=env,
                cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert (result.returncode, result.stdout) == (2, ""), extra
            assert result.stderr == self.EXPECTED + "\n"
        outcomes = [entry.outcome for entry in _audit(engine, "subscribers.import")]
        assert outcomes == ["error:empty_csv"] * 3


def _on_a_terminal(
    command: list[str], env: dict[str, str], *, ctrl_c_at: bytes
) -> tuple[int, bytes]:
    """Run `command` with its stderr on a terminal (a pseudo-terminal), pressing Ctrl-C
    once `ctrl_c_at` shows there; its exit code and all it drew."""
    main, secondary = pty.openpty()
    running = subprocess.Popen(
        command, env={**env, "TERM": "xterm", "COLUMNS": "120"}, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=secondary,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    os.close(secondary)
    drawn = b""
    pressed = False
    try:
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the terminal's last writer has gone
                break
            if not chunk:
                break
            drawn += chunk
            if not pressed and ctrl_c_at in drawn:
                running.send_signal(signal.SIGINT)
                pressed = True
        return running.wait(timeout=120), drawn
    finally:
        running.kill()
        os.close(main)


class TestProgress:
    """The import shows how far it is while it checks the whole file (the first pass,
    which writes nothing) as while it writes."""

    def test_the_first_pass_reports_the_bytes_read_before_any_row_is_written(
        self, client: TestClient, database_url: str
    ) -> None:
        body = (HEADER + "".join(_row(f"user{n}@example.org") for n in range(2500))).encode()
        seen: list[tuple[str, int, int]] = []
        transfer.import_csv(
            lambda: db.session_scope(client.app.state.engine),  # type: ignore[attr-defined]
            source=io.BytesIO(body), list_slug="bluehats", mode=transfer.ImportMode.CONFIRMED,
            dry_run=False, operator="test", note=None, key=b"k" * 32,
            resend_interval=timedelta(minutes=5), now=utcnow(),
            checking=lambda done: seen.append(
                ("check", done, count_rows(database_url, "subscription"))
            ),
            progress=lambda done: seen.append(("write", done, 0)),
        )  # fmt: skip
        checks = [(done, rows) for stage, done, rows in seen if stage == "check"]
        # Every 1,000 rows, then at the end; all before the first batch, nothing written.
        assert [stage for stage, _, _ in seen] == ["check"] * 3 + ["write"] * 3
        assert [rows for _, rows in checks] == [0, 0, 0]
        assert checks[0][0] < checks[1][0] < checks[2][0] == len(body)

    def test_the_command_shows_the_check_on_a_terminal_and_ctrl_c_stops_it_there(
        self, database_url: str, engine: sa.Engine, tmp_path: Path
    ) -> None:
        # A file whose check takes seconds: until it ends, the writing has not begun.
        big = _big_file(tmp_path, 500_000)
        returncode, drawn = _on_a_terminal(
            [NEWSLETTER, "import", "--list", "bluehats", str(big)], _cli_env(database_url),
            ctrl_c_at=b"checking big.csv",
        )  # fmt: skip
        assert returncode == 130, drawn[-2000:]
        assert b"The import into bluehats was interrupted: nothing was written." in drawn
        assert count_rows(database_url, "subscription") == 0
        [entry] = _audit(engine, "subscribers.import")
        assert (entry.outcome, entry.detail["applied_through"]) == ("interrupted", 0)

    def test_off_a_terminal_the_command_draws_nothing(
        self, database_url: str, tmp_path: Path
    ) -> None:
        members = tmp_path / "members.csv"
        members.write_text(HEADER + "".join(_row(f"user{n}@example.org") for n in range(2500)))
        result = subprocess.run(
            [NEWSLETTER, "import", "--list", "bluehats", str(members)], env=_cli_env(database_url),
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        # In a log: the report's one line, no bar, no line left empty by one.
        assert result.stderr == ""
        assert result.stdout.splitlines() == [
            "list bluehats (confirmed): read 2500; created 2500; unchanged 0; invalid 0"
        ]


class TestLargeFiles:
    def test_a_10_mb_file_is_imported(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        # Long names make 10 MB out of some 22,000 rows (a bare address row is ~60 bytes).
        filler = "x" * 400
        lines = [HEADER]
        size = len(HEADER)
        count = 0
        while size < 10 * 1024 * 1024:
            line = _row(f"user{count}@example.org", name=f"{filler}{count}")
            lines.append(line)
            size += len(line)
            count += 1
        body = "".join(lines)
        assert len(body.encode()) >= 10 * 1024 * 1024
        # Without the in-process worker, whose 22,000 syncs would compete for the database
        # and make this test about the worker's speed.
        settings = make_settings(database_url, smtp_port=smtp.port, run_worker=False)
        with TestClient(create_app(settings)) as client:
            key = {"authorization": f"Bearer {_key(engine, 'ops', KeyScope.WRITE)}"}
            response = _import(client, key, body)
        assert response.status_code == 200, response.text[:500]
        assert response.json()["created"] == count
        assert count_rows(database_url, "subscription") == count

    def test_a_file_over_the_limit_is_413_whether_announced_or_streamed(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = make_settings(database_url, smtp_port=smtp.port, max_import_bytes=64 * 1024)
        body = (HEADER + "".join(_row(f"user{n}@example.org") for n in range(2000))).encode()
        assert len(body) > 64 * 1024

        def chunks() -> Iterator[bytes]:
            for start in range(0, len(body), 8192):
                yield body[start : start + 8192]

        with TestClient(create_app(settings)) as client:
            key = {"authorization": f"Bearer {_key(engine, 'ops', KeyScope.WRITE)}"}
            headers = {**key, "content-type": "text/csv"}
            # The answer names the cap: how much to split the file into.
            refused = {
                "error": "payload_too_large",
                "detail": "The request body is larger than 65536 bytes, the most this route takes.",
            }
            announced = client.post(IMPORT, content=body, headers=headers)
            assert announced.status_code == 413
            assert announced.json() == refused
            streamed = client.post(IMPORT, content=chunks(), headers=headers)
            assert streamed.status_code == 413
            assert streamed.json() == refused
            # Under the cap is fine, and other routes keep their small limit.
            small = client.post(IMPORT, content=body[:30_000].rsplit(b"\n", 1)[0], headers=headers)
            assert small.status_code == 200
            elsewhere = client.post(
                "/v1/lists/bluehats/subscriptions",
                content=b'{"email": "a@example.org", "pad": "' + b"x" * 30_000 + b'"}',
                headers={"content-type": "application/json"},
            )
            assert elsewhere.status_code == 413
        assert count_rows(database_url, "subscription") == small.json()["created"]


def _confirmed_by_link(client: TestClient, smtp: SmtpSink, email: str) -> None:
    client.post(
        "/v1/lists/bluehats/subscriptions",
        json={"email": email, "locale": "en"},
        headers={"user-agent": "Firefox/140"},
    )
    confirmed = client.post(
        link_in(smtp.mail_to(email, link="confirm"), "confirm"),
        headers={"user-agent": "Firefox/140", "accept": "application/json"},
    )
    assert confirmed.status_code == 200


def _csv(response: httpx.Response) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(response.text)))


class TestAnImportCutShort:
    """A run stopped midway (Ctrl-C, the database gone) keeps its committed batches and
    says which lines they reach; the same file run again completes it."""

    def test_the_report_holds_the_committed_batches_and_their_last_line(
        self, client: TestClient, engine: sa.Engine
    ) -> None:
        body = HEADER + "".join(_row(f"user{n}@example.org") for n in range(5))
        calls = 0

        @contextlib.contextmanager
        def failing_third_batch() -> Iterator[Session]:
            nonlocal calls
            calls += 1
            with db.session_scope(engine) as session:
                yield session
                # The list's look-up, two batches, then the database is gone.
                if calls == 4:
                    raise sa.exc.OperationalError("COMMIT", {}, Exception("server closed"))

        report = transfer.ImportReport(
            list_slug="bluehats", mode=transfer.ImportMode.CONFIRMED, dry_run=False
        )
        with pytest.raises(sa.exc.OperationalError):
            transfer.import_csv(
                failing_third_batch, source=io.BytesIO(body.encode()), list_slug="bluehats",
                mode=transfer.ImportMode.CONFIRMED, dry_run=False, operator="test", note=None,
                key=b"k" * 32, resend_interval=timedelta(minutes=5), now=utcnow(),
                batch_size=2, report=report,
            )  # fmt: skip
        # Lines 2 and 3, then 4 and 5, are in; line 6's batch rolled back.
        assert (report.applied_through, report.created, report.unchanged) == (5, 4, 0)
        assert sorted(_subscriptions(engine)) == [f"user{n}@example.org" for n in range(4)]

        again = transfer.import_csv(
            lambda: db.session_scope(engine), source=io.BytesIO(body.encode()),
            list_slug="bluehats", mode=transfer.ImportMode.CONFIRMED, dry_run=False,
            operator="test", note=None, key=b"k" * 32, resend_interval=timedelta(minutes=5),
            now=utcnow(), batch_size=2,
        )  # fmt: skip
        assert (again.created, again.unchanged, again.applied_through) == (1, 4, 6)

    def test_the_api_answers_503_saying_which_rows_are_in(
        self, client: TestClient, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        body = HEADER + "".join(_row(f"user{n:04}@example.org") for n in range(1500))
        batches = 0

        def database_gone_at_second_batch(
            connection: Any, cursor: Any, statement: str, *args: Any
        ) -> None:
            # Each batch's first query: which of its addresses were erased (the inserts run
            # on the driver's cursor, which SQLAlchemy's events do not see).
            nonlocal batches
            if "FROM erased_address" in statement:
                batches += 1
                if batches == 2:
                    raise sa.exc.OperationalError(statement, {}, Exception("server closed"))

        app_engine = client.app.state.engine  # type: ignore[attr-defined]
        sa.event.listen(app_engine, "before_cursor_execute", database_gone_at_second_batch)
        try:
            response = _import(client, write_key, body)
        finally:
            sa.event.remove(app_engine, "before_cursor_execute", database_gone_at_second_batch)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json() == {
            "error": "import_interrupted",
            "detail": "The import into bluehats was interrupted: the rows up to line 1001 are "
            "imported (1000 created, 0 unchanged), the rows after it are not. Send the same "
            "file again to finish: the rows already imported are left as they are.",
        }
        assert len(_subscriptions(engine)) == 1000
        [entry] = _audit(engine, "subscribers.import")
        assert (entry.outcome, entry.detail["applied_through"]) == ("interrupted", 1001)

        again = _import(client, write_key, body).json()
        assert (again["created"], again["unchanged"], again["invalid"]) == (500, 1000, 0)

    def test_ctrl_c_says_which_rows_are_in_and_is_audited(
        self, client: TestClient, database_url: str, engine: sa.Engine, tmp_path: Path
    ) -> None:
        rows = 60_000
        big = _big_file(tmp_path, rows)
        env = _cli_env(database_url)
        command = [NEWSLETTER, "import", "--list", "bluehats", str(big)]
        returncode, stderr = _ctrl_c_once(
            command, env, when=lambda: count_rows(database_url, "subscription") > 0
        )
        if returncode == 0:
            pytest.skip("the import finished before it could be interrupted")
        assert returncode == 130, stderr
        created = count_rows(database_url, "subscription")
        assert 0 < created < rows
        # The batches committed reach the line said: a header, then one row a line.
        assert (
            f"the rows up to line {created + 1} are imported ({created} created, 0 unchanged)"
            in stderr
        )
        assert "Run the same command again to finish" in stderr
        assert "Traceback" not in stderr
        [entry] = _audit(engine, "subscribers.import")
        assert entry.outcome == "interrupted"
        assert (entry.detail["created"], entry.detail["applied_through"]) == (created, created + 1)

        finished = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert finished.returncode == 0, finished.stderr
        assert f"created {rows - created}; unchanged {created}; invalid 0" in finished.stdout


class TestAnExportCutShort:
    def test_ctrl_c_stops_it_between_pages_says_how_far_and_is_audited(
        self, database_url: str, engine: sa.Engine, tmp_path: Path
    ) -> None:
        """Ctrl-C during `newsletter export` ended it with no word, the audit log saying
        `ok` for every row."""
        rows = 60_000
        big = _big_file(tmp_path, rows)
        env = _cli_env(database_url)
        imported = subprocess.run(
            [NEWSLETTER, "import", "--list", "bluehats", "--mode", "confirmed", str(big)],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert imported.returncode == 0, imported.stderr
        output = tmp_path / "out.csv"
        partial = tmp_path / "out.csv.part"
        returncode, stderr = _ctrl_c_once(
            [NEWSLETTER, "export", "--list", "bluehats", "--output", str(output)],
            env,
            when=lambda: partial.exists() and partial.stat().st_size > 0,
        )
        if returncode == 0:
            pytest.skip("the export finished before it could be interrupted")
        assert returncode == 130, stderr
        assert "Traceback" not in stderr
        assert "export stopped: " in stderr
        assert f" of {rows} subscribers read; {output} is not written" in stderr
        assert not output.exists()
        assert not partial.exists()
        entries = _audit(engine, "subscribers.export")
        assert [entry.outcome for entry in entries] == ["ok", "interrupted"]
        stopped = entries[1].detail
        assert stopped["rows"] == rows
        assert 0 < stopped["read"] < rows
        assert f"export stopped: {stopped['read']} of {rows}" in stderr


class TestExport:
    def test_csv_carries_the_consent_fields(
        self,
        client: TestClient,
        smtp: SmtpSink,
        write_key: dict[str, str],
        read_key: dict[str, str],
        engine: sa.Engine,
    ) -> None:
        _confirmed_by_link(client, smtp, "clicked@example.org")
        _import(client, write_key, HEADER + _row("imported@example.org", name="Imp"))
        client.post("/v1/lists/bluehats/subscriptions", json={"email": "waiting@example.org"})
        response = client.get(EXPORT, headers=read_key)
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/csv; charset=utf-8"
        assert response.headers["content-disposition"].startswith(
            'attachment; filename="bluehats-all-'
        )
        rows = {row["email"]: row for row in _csv(response)}
        assert list(rows) == ["clicked@example.org", "imported@example.org", "waiting@example.org"]
        clicked = rows["clicked@example.org"]
        assert clicked["status"] == "confirmed"
        assert clicked["locale"] == "en"
        assert clicked["consent_event"] == "confirmed"
        assert clicked["consent_event_source"] == "link"
        assert clicked["consent_ip"] == "testclient"
        assert clicked["consent_user_agent"] == "Firefox/140"
        assert clicked["consent_event_at"] >= clicked["confirmed_at"] > clicked["created_at"]
        assert clicked["consent_source"] == ""
        imported = rows["imported@example.org"]
        assert (imported["name"], imported["consent_event"], imported["consent_event_source"]) == (
            "Imp",
            "imported",
            "import",
        )
        assert imported["consent_source"] == "Paper form, BlueHats meetup"
        assert imported["consent_date"] == "2025-03-12"
        assert json.loads(imported["attributes"]) == {"name": "Imp"}
        waiting = rows["waiting@example.org"]
        assert (waiting["status"], waiting["consent_event"], waiting["confirmed_at"]) == (
            "pending",
            "",
            "",
        )
        [entry] = _audit(engine, "subscribers.export")
        assert (entry.actor, entry.outcome) == ("dashboard", "ok")
        assert entry.detail == {"format": "csv", "filters": {}}

    def test_json_lines_and_filters(
        self,
        client: TestClient,
        smtp: SmtpSink,
        write_key: dict[str, str],
        read_key: dict[str, str],
        engine: sa.Engine,
    ) -> None:
        _import(
            client,
            write_key,
            HEADER + _row("ann@example.org", locale="en") + _row("bob@example.org"),
        )
        client.post("/v1/lists/bluehats/subscriptions", json={"email": "carl@example.org"})
        response = client.get(
            EXPORT, params={"format": "jsonl", "status": "confirmed"}, headers=read_key
        )
        assert response.headers["content-type"] == "application/x-ndjson"
        assert response.headers["content-disposition"].endswith('.jsonl"')
        records = [json.loads(line) for line in response.text.splitlines()]
        assert [r["email"] for r in records] == ["ann@example.org", "bob@example.org"]
        assert records[0]["consent_date"] == "2025-03-12"
        assert records[0]["attributes"] == {}
        assert records[0]["unsubscribed_at"] is None
        english = client.get(
            EXPORT, params={"format": "jsonl", "locale": "en", "prefix": "A"}, headers=read_key
        )
        assert [json.loads(line)["email"] for line in english.text.splitlines()] == [
            "ann@example.org"
        ]
        pending = client.get(EXPORT, params={"status": "pending"}, headers=read_key)
        assert [row["email"] for row in _csv(pending)] == ["carl@example.org"]
        naive = client.get(
            EXPORT, params={"created_after": "2000-01-01T00:00:00"}, headers=read_key
        )
        assert len(_csv(naive)) == 3
        last = _audit(engine, "subscribers.export")[1]
        assert last.detail == {"format": "jsonl", "filters": {"prefix": "A", "locale": "en"}}

    def test_every_row_comes_once_across_pages(
        self, client: TestClient, engine: sa.Engine, read_key: dict[str, str]
    ) -> None:
        now = utcnow()
        with db.session_scope(engine) as session:
            list_id = lists.get(session, slug="bluehats").id
            session.execute(
                sa.insert(Subscription),
                [
                    {
                        "list_id": list_id,
                        "email": f"u{n:05d}@example.org",
                        "email_key": f"u{n:05d}@example.org",
                        "status": "confirmed",
                        "locale": "fr",
                        "attributes": {},
                        "consent_version": "v1",
                        "created_at": now,
                        "updated_at": now,
                        "confirmed_at": now,
                    }
                    for n in range(2345)
                ],
            )
        response = client.get(EXPORT, params={"format": "jsonl"}, headers=read_key)
        emails = [json.loads(line)["email"] for line in response.text.splitlines()]
        assert emails == [f"u{n:05d}@example.org" for n in range(2345)]

    def test_cells_that_a_spreadsheet_would_run_are_neutralised(
        self, client: TestClient, write_key: dict[str, str], read_key: dict[str, str]
    ) -> None:
        formula = '=HYPERLINK("http://evil.example","x")'
        _import(client, write_key, HEADER + _row("ann@example.org", name=formula))
        [row] = _csv(client.get(EXPORT, headers=read_key))
        assert row["name"] == "'" + formula
        [record] = client.get(EXPORT, params={"format": "jsonl"}, headers=read_key).text.split(
            "\n"
        )[:1]
        assert json.loads(record)["name"] == formula

    def test_an_address_that_reads_as_a_formula_is_neutralised_and_imports_back_exact(
        self,
        client: TestClient,
        engine: sa.Engine,
        read_key: dict[str, str],
        write_key: dict[str, str],
    ) -> None:
        # Valid addresses a stranger may subscribe: `|`, `'` and `!` are allowed before the @.
        dde = "=cmd|'/Ccalc'!A0@example.org"
        quoted = "'=x@example.org"
        for email in (dde, "-2+3@example.org", quoted):
            response = client.post("/v1/lists/bluehats/subscriptions", json={"email": email})
            assert response.status_code == 202
        rows = _csv(client.get(EXPORT, headers=read_key))
        assert sorted(row["email"] for row in rows) == sorted(
            ["'" + dde, "'-2+3@example.org", "'" + quoted]
        )
        created = client.post(
            "/v1/admin/lists", json={"slug": "copy", "name": "Copy"}, headers=write_key
        )
        assert created.status_code == 201, created.text
        exported = io.StringIO()
        writer = csv.writer(exported, lineterminator="\n")
        writer.writerow(HEADER.strip().split(","))
        for row in rows:
            writer.writerow([row["email"], "", "", "", "Paper form", "2025-03-12"])
        response = client.post(
            "/v1/admin/lists/copy/import",
            content=exported.getvalue().encode(),
            params={"mode": "confirmed"},
            headers={**write_key, "content-type": "text/csv"},
        )
        assert response.json()["created"] == 3, response.json()
        copied = _csv(client.get("/v1/admin/lists/copy/export", headers=read_key))
        assert sorted(row["email"] for row in copied) == sorted(row["email"] for row in rows)
        with Session(engine) as session:
            stored = session.exec(select(Subscription.email)).all()
        assert sorted(stored) == sorted([dde, "-2+3@example.org", quoted] * 2)

    def test_the_csv_export_imports_as_it_is_into_another_list(
        self,
        client: TestClient,
        smtp: SmtpSink,
        engine: sa.Engine,
        read_key: dict[str, str],
        write_key: dict[str, str],
    ) -> None:
        _confirmed_by_link(client, smtp, "clicked@example.org")
        attributes = json.dumps({"org": "DINUM, Paris"})
        imp = _row("imp@example.org", name="-Imp", attributes=attributes).rstrip("\n") + ",v0\n"
        imported = _import(client, write_key, HEADER.strip() + ",consent_version\n" + imp)
        assert imported.json()["created"] == 1, imported.text
        _import(client, write_key, HEADER + _row("left@example.org"))
        added = client.post(
            "/v1/admin/lists/bluehats/subscribers",
            json={
                "email": "added@example.org",
                "mode": "confirmed",
                "evidence": {
                    "source": "Signed form",
                    "note": "no. 7",
                    "consented_at": "2025-06-01",
                },
            },
            headers=write_key,
        )
        assert added.status_code == 200, added.text
        left = client.post(
            "/v1/admin/lists/bluehats/subscribers/left@example.org/unsubscribe",
            json={"reason": "asked by mail"},
            headers=write_key,
        )
        assert left.status_code == 200, left.text
        exported = client.get(EXPORT, headers=read_key)
        created = client.post(
            "/v1/admin/lists", json={"slug": "copy", "name": "Copy"}, headers=write_key
        )
        assert created.status_code == 201, created.text

        response = client.post(
            "/v1/admin/lists/copy/import",
            content=exported.content,
            params={"mode": "confirmed"},
            headers={**write_key, "content-type": "text/csv"},
        )
        assert response.status_code == 200, response.text
        report = response.json()
        assert (report["created"], report["invalid"]) == (3, 1), report
        [refused] = report["errors"]
        assert refused["line"] == 4
        assert refused["error"].startswith("status is 'unsubscribed': only confirmed")

        original = {row["email"]: row for row in _csv(exported)}
        # The evidence an operator gave when adding a subscriber as confirmed is exported.
        added_row = original["added@example.org"]
        assert (added_row["consent_source"], added_row["consent_date"]) == (
            "Signed form",
            "2025-06-01",
        )
        copied = {
            row["email"]: row
            for row in _csv(client.get("/v1/admin/lists/copy/export", headers=read_key))
        }
        assert list(copied) == ["clicked@example.org", "imp@example.org", "added@example.org"]
        for email, row in copied.items():
            for column in ("name", "status", "locale", "attributes", "consent_version"):
                assert row[column] == original[email][column], (email, column)
        assert copied["imp@example.org"]["name"] == "'-Imp"
        assert json.loads(copied["imp@example.org"]["attributes"])["name"] == "-Imp"
        assert copied["imp@example.org"]["consent_version"] == "v0"
        evidence = {
            email: (row["consent_source"], row["consent_date"]) for email, row in copied.items()
        }
        assert evidence == {
            "clicked@example.org": (
                "export: confirmed (link)",
                original["clicked@example.org"]["consent_event_at"],
            ),
            "imp@example.org": ("Paper form, BlueHats meetup", "2025-03-12"),
            "added@example.org": ("Signed form", "2025-06-01"),
        }

    def test_unknown_list_is_404_and_audited(
        self, client: TestClient, engine: sa.Engine, read_key: dict[str, str]
    ) -> None:
        response = client.get("/v1/admin/lists/nope/export", headers=read_key)
        assert response.status_code == 404
        assert response.json()["error"] == "list_not_found"
        assert client.get(EXPORT).status_code == 401
        bad = client.get(EXPORT, params={"format": "xml"}, headers=read_key)
        assert bad.status_code == 422
        [entry] = _audit(engine, "subscribers.export")
        assert entry.outcome == "error:list_not_found"


class TestCommandLine:
    @pytest.fixture
    def run(self, database_url: str, tmp_path: Path) -> Any:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        env.update(
            NEWSLETTER_DATABASE_URL=database_url,
            NEWSLETTER_SECRET_KEY=SECRET,
            NEWSLETTER_LOG_LEVEL="WARNING",
        )

        def run(
            *args: str, stdout: Any = subprocess.PIPE, input: str | None = None
        ) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [NEWSLETTER, *args], env=env, cwd=tmp_path, stdout=stdout, stderr=subprocess.PIPE,
                input=input, text=True, timeout=120, check=False,
            )  # fmt: skip

        return run

    def test_import_then_export(
        self, run: Any, tmp_path: Path, database_url: str, engine: sa.Engine
    ) -> None:
        good = tmp_path / "good.csv"
        good.write_text(HEADER + _row("ann@example.org") + _row("bob@example.org", locale="en"))
        dry = run("import", "--list", "bluehats", str(good), "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would create 2" in dry.stdout
        assert count_rows(database_url, "subscription") == 0
        done = run("import", "--list", "bluehats", str(good), "--note", "meetup")
        assert done.returncode == 0, done.stderr
        assert "created 2; unchanged 0; invalid 0" in done.stdout
        again = run("import", "--list", "bluehats", str(good), "--json")
        assert again.returncode == 0
        assert json.loads(again.stdout)["unchanged"] == 2

        mixed = tmp_path / "mixed.csv"
        mixed.write_text(HEADER + _row("carl@example.org") + _row("nope", locale="xx"))
        partly = run("import", "--list", "bluehats", str(mixed))
        assert partly.returncode == 1
        assert "line 3 n***: email is not a valid address" in partly.stdout
        assert count_rows(database_url, "subscription") == 3

        out = tmp_path / "out.csv"
        exported = run("export", "--list", "bluehats", "--output", str(out))
        assert exported.returncode == 0, exported.stderr
        # One line, without the empty one a progress bar left when stderr is no terminal.
        assert exported.stderr == f"wrote 3 subscribers to {out}\n"
        rows = list(csv.DictReader(out.open(encoding="utf-8")))
        assert [row["email"] for row in rows] == [
            "ann@example.org",
            "bob@example.org",
            "carl@example.org",
        ]
        assert not (tmp_path / "out.csv.part").exists()
        english = run("export", "--list", "bluehats", "--format", "jsonl", "--status", "confirmed")
        assert english.returncode == 0
        assert len(english.stdout.splitlines()) == 3
        with Session(engine) as session:
            entries = session.exec(select(AuditEvent).order_by(col(AuditEvent.id))).all()
            assert [(e.action, e.outcome) for e in entries] == [
                ("subscribers.import", "ok"),
                ("subscribers.import", "ok"),
                ("subscribers.import", "ok"),
                ("subscribers.import", "ok"),
                ("subscribers.export", "ok"),
                ("subscribers.export", "ok"),
            ]
            assert all(e.actor.startswith("cli:") for e in entries)
            assert entries[1].detail["note"] == "meetup"

    def test_a_consent_date_before_1990_is_a_row_error_in_the_report(
        self, run: Any, tmp_path: Path, database_url: str
    ) -> None:
        dated = tmp_path / "dated.csv"
        dated.write_text(HEADER + _row("old@example.org", consent_date="0001-01-01"))
        result = run("import", "--list", "bluehats", str(dated))
        assert result.returncode == 1, result.stderr
        assert "line 2 o***@example.org: consent_date 0001-01-01 is before 1990-01-01" in (
            result.stdout
        )
        assert count_rows(database_url, "subscription") == 0

    def test_the_export_takes_the_searchs_filters(
        self, run: Any, tmp_path: Path, engine: sa.Engine
    ) -> None:
        people = tmp_path / "people.csv"
        people.write_text(
            HEADER + _row("ann@example.org") + _row("bob@example.org", locale="en")
            + _row("carl@example.org")
        )  # fmt: skip
        assert run("import", "--list", "bluehats", str(people)).returncode == 0
        with engine.begin() as connection:
            for email, day in (("ann", "01-10"), ("bob", "02-10"), ("carl", "03-10")):
                connection.execute(
                    sa.update(Subscription)
                    .where(col(Subscription.email) == f"{email}@example.org")
                    .values(
                        created_at=datetime.fromisoformat(f"2025-{day}T09:00:00+00:00"),
                        confirmed_at=datetime.fromisoformat(f"2025-{day}T10:00:00+00:00"),
                    )
                )

        def exported(*filters: str) -> list[str]:
            result = run("export", "--list", "bluehats", "--format", "jsonl", *filters)
            assert result.returncode == 0, (filters, result.stderr)
            return [json.loads(line)["email"] for line in result.stdout.splitlines()]

        assert exported("--confirmed-after", "2025-02-01") == [
            "bob@example.org",
            "carl@example.org",
        ]
        assert exported(
            "--confirmed-after", "2025-02-10T10:00:00Z", "--confirmed-before", "2025-03-01"
        ) == ["bob@example.org"]
        assert exported("--created-before", "2025-02-10T09:00:01+00:00") == [
            "ann@example.org", "bob@example.org"
        ]  # fmt: skip
        assert exported("--created-after", "2025-03-01", "--status", "confirmed") == [
            "carl@example.org"
        ]
        assert exported("--locale", "EN") == ["bob@example.org"]
        assert exported("--prefix", "CARL@") == ["carl@example.org"]
        # Refused as the API refuses them (400, 422): exit 2, nothing written, nor audited.
        for filters, message in (
            (("--confirmed-after", "2025-03-01", "--confirmed-before", "2025-02-01"),
             "--confirmed-after (2025-03-01T00:00:00+00:00) is not before --confirmed-before"),
            (("--created-after", "2025-02-01", "--created-before", "2025-02-01"),
             "the period is empty"),
            (("--confirmed-before", "last week"), "--confirmed-before: not an ISO date"),
            (("--locale", "de"), "--locale must be one of fr, en"),
            (("--prefix", "ann\x1b[31m"), "--prefix: must not contain control characters"),
            (("--prefix", "a" * 255), "--prefix is longer than 254 characters"),
        ):  # fmt: skip
            refused = run("export", "--list", "bluehats", *filters)
            assert refused.returncode == 2, (filters, refused.stderr)
            assert message in refused.stderr, (filters, refused.stderr)
            assert refused.stdout == ""
        exports = _audit(engine, "subscribers.export")
        assert len(exports) == 6
        assert exports[1].detail["filters"] == {
            "confirmed_after": "2025-02-10T10:00:00+00:00",
            "confirmed_before": "2025-03-01T00:00:00+00:00",
        }

    def test_every_refused_row_goes_to_the_rejects_file_which_imports_once_fixed(
        self, run: Any, tmp_path: Path, database_url: str, engine: sa.Engine
    ) -> None:
        with db.session_scope(engine) as session:
            session.add(
                ErasedAddress(
                    address_hash=privacy.address_hash("gone@example.org", key=SECRET.encode())
                )
            )
        source = tmp_path / "members.csv"
        bad = [f"bad{n}.example.org" for n in range(2500)]
        source.write_text(
            "email;name;consent_source;consent_date\n"
            "gone@example.org;Gone;Paper form;2025-03-12\n"  # line 2: refused when written
            + "".join(f"{email};Name {n};Paper form;2025-03-12\n" for n, email in enumerate(bad))
            + "short@example.org;only two\n"  # line 2503
            + '"=cmd@example.org";"Two\nlines";Paper form;2025-03-12\n'  # 2504-2505
            + "ann@example.org;Ann;Paper form;2025-03-12\n"  # 2506
        )
        rejects = tmp_path / "rejects.csv"
        result = run("import", "--list", "bluehats", str(source), "--rejects", str(rejects))
        assert result.returncode == 1, result.stderr
        assert "created 1; unchanged 0; invalid 2503" in result.stdout
        assert f"all 2503 refused rows, as they were, are in {rejects}" in result.stdout
        # Every refused row, by line, as the file had it, with why; in the file's separator.
        with rejects.open(encoding="utf-8", newline="") as written:
            assert written.readline() == (
                "refused_line;refused_reason;email;name;consent_source;consent_date\r\n"
            )
            written.seek(0)
            rows = list(csv.reader(written, delimiter=";"))[1:]
        assert len(rows) == 2503
        assert [row[0] for row in rows] == [str(line) for line in [2, *range(3, 2504), 2504]]
        assert rows[0][2:] == ["gone@example.org", "Gone", "Paper form", "2025-03-12"]
        assert "erased" in rows[0][1]
        assert rows[1][2:] == ["bad0.example.org", "Name 0", "Paper form", "2025-03-12"]
        assert "email is not a valid address" in rows[1][1]
        assert rows[-2][2:] == ["short@example.org", "only two"]
        assert rows[-1][2:] == ["=cmd@example.org", "Two\nlines", "Paper form", "2025-03-12"]
        [entry] = _audit(engine, "subscribers.import")
        assert (entry.detail["invalid"], entry.detail["rejects"]) == (2503, "rejects.csv")

        # The operator fixes the rows and imports the file as it is; its first two columns
        # are read as what they are, and left out.
        fixed = tmp_path / "fixed.csv"
        fixed.write_text(
            rejects.read_text(encoding="utf-8").replace(".example.org;", "@example.org;"),
            encoding="utf-8",
        )
        again = run("import", "--list", "bluehats", str(fixed))
        assert "created 2500; unchanged 0; invalid 3" in again.stdout, again.stderr

    def test_without_a_rejects_file_the_report_says_how_to_get_every_refused_row(
        self, run: Any, tmp_path: Path
    ) -> None:
        source = tmp_path / "members.csv"
        source.write_text("email\n" + "".join(f"bad{n}\n" for n in range(150)))
        result = run("import", "--list", "bluehats", str(source), "--mode", "invite")
        assert result.returncode == 1
        lines = result.stdout.splitlines()
        assert lines[1].startswith("  line 2 b***: email is not a valid address")
        assert lines[-1] == (
            "  ... and 50 more refused rows: --rejects FILE writes every refused row, as it "
            "was, with its line and why"
        )
        assert len(lines) == 1 + transfer.MAX_ERRORS + 1

    def test_a_rejects_file_that_cannot_be_written_is_refused_before_anything_is_read(
        self, run: Any, tmp_path: Path, database_url: str
    ) -> None:
        good = tmp_path / "good.csv"
        good.write_text(HEADER + _row("ann@example.org"))
        for rejects in (tmp_path / "missing" / "rejects.csv", tmp_path):
            result = run("import", "--list", "bluehats", str(good), "--rejects", str(rejects))
            assert result.returncode == 2, result.stderr
            assert result.stderr.startswith(f"cannot write {rejects}: "), result.stderr
        assert count_rows(database_url, "subscription") == 0

    def test_a_file_read_from_a_pipe_is_imported(self, run: Any, database_url: str) -> None:
        # `... | newsletter import --list bluehats /dev/stdin`: the import reads a file twice.
        piped = HEADER + _row("ann@example.org") + _row("bob@example.org")
        result = run("import", "--list", "bluehats", "/dev/stdin", input=piped)
        assert result.returncode == 0, result.stderr
        assert "created 2; unchanged 0; invalid 0" in result.stdout
        assert count_rows(database_url, "subscription") == 2

    def test_the_report_prints_no_control_character_of_the_file(
        self, run: Any, tmp_path: Path
    ) -> None:
        # An escape sequence in a cell (here one that retitles the terminal) is shown, not run.
        hostile = tmp_path / "hostile.csv"
        hostile.write_bytes(b"email\n\x1b]0;pwned\x07@example.org\n")
        result = run("import", "--list", "bluehats", str(hostile), "--mode", "invite")
        assert result.returncode == 1
        assert "line 2 ?***@example.org: email is not a valid address" in result.stdout
        assert not any(ord(char) < 32 for char in result.stdout.replace("\n", ""))

    def test_exit_codes(self, run: Any, tmp_path: Path, database_url: str) -> None:
        good = tmp_path / "good.csv"
        good.write_text(HEADER + _row("ann@example.org"))
        unreadable = tmp_path / "latin1.csv"
        unreadable.write_bytes((HEADER + _row("zoé@example.org")).encode("latin-1"))
        cases = [
            (("import", "--list", "bluehats", str(unreadable)), 2, "is not UTF-8"),
            (("import", "--list", "nope", str(good)), 2, "no list 'nope'"),
            (("import", "--list", "bluehats", str(good), "--mode", "maybe"), 2, "--mode"),
            # The API refuses such a note (422); it went into the ledger from the CLI.
            (
                ("import", "--list", "bluehats", str(good), "--note", "a\x1b[31mb"),
                2,
                "--note: must not contain control characters other than line breaks\n",
            ),
            (("import", "--list", "bluehats", str(tmp_path / "missing.csv")), 2, "missing.csv"),
            (("import", str(good)), 2, "--list"),
            (("export", "--list", "nope"), 2, "no list 'nope'"),
            (("export", "--list", "bluehats", "--format", "xml"), 2, "--format"),
            (("export", "--list", "bluehats", "--status", "gone"), 2, "--status"),
        ]
        for args, code, message in cases:
            result = run(*args)
            assert result.returncode == code, (args, result.stdout, result.stderr)
            assert message in result.stderr, (args, result.stderr)
        refused = run("import", "--list", "bluehats", str(unreadable))
        assert refused.stderr.startswith("Line 2 is not UTF-8")
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert count_rows(database_url, "subscription") == 0

    def test_an_export_that_cannot_be_written_is_refused_before_it_is_audited(
        self, run: Any, tmp_path: Path, engine: sa.Engine
    ) -> None:
        for output in (tmp_path / "missing" / "out.csv", tmp_path):
            result = run("export", "--list", "bluehats", "--output", str(output))
            assert result.returncode == 2, result.stderr
            assert result.stderr.startswith(f"cannot write {output}: "), result.stderr
            assert "Traceback" not in result.stderr
        assert _audit(engine, "subscribers.export") == []
        assert not list(tmp_path.glob("*.part"))

    @pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
    def test_an_export_that_fails_while_writing_says_so_without_a_traceback(
        self, run: Any, tmp_path: Path
    ) -> None:
        # A full disk, in short.
        with open("/dev/full", "wb") as full:
            to_stdout = run("export", "--list", "bluehats", stdout=full)
        assert to_stdout.returncode == 2
        assert to_stdout.stderr == "cannot write standard output: No space left on device\n"
        device = tmp_path / "full"
        device.symlink_to("/dev/full")
        to_file = run("export", "--list", "bluehats", "--output", str(device))
        assert to_file.returncode == 2
        assert to_file.stderr == f"cannot write {device}: No space left on device\n"
        assert device.is_symlink()
        assert not list(tmp_path.glob("*.part"))

    def test_an_export_into_a_pipe_is_written_into_it(self, run: Any, tmp_path: Path) -> None:
        # As `--output /dev/stdout` or a shell's `--output >(gzip > export.csv.gz)`: a file
        # renamed over the pipe would replace it, and its reader would wait for ever.
        pipe = tmp_path / "pipe"
        os.mkfifo(pipe)
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.append(pipe.read_bytes()), daemon=True)
        reader.start()
        result = run("export", "--list", "bluehats", "--output", str(pipe))
        assert result.returncode == 0, result.stderr
        reader.join(timeout=30)
        assert stat.S_ISFIFO(pipe.stat().st_mode)
        assert received == [transfer.header(transfer.ExportFormat.CSV)]
        assert not list(tmp_path.glob("*.part"))


def test_the_import_route_is_a_write_route(client: TestClient) -> None:
    """The admin suite's key checks (401 without a key, 403 with a read key) cover it."""
    document = client.get("/openapi.json").json()
    operation = document["paths"]["/v1/admin/lists/{slug}/import"]["post"]
    assert operation["operationId"] == "admin_import_subscribers"
    assert "text/csv" in operation["requestBody"]["content"]
    assert Settings().max_import_bytes == 50 * 1024 * 1024
