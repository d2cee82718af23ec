"""Operator commands as operators run them: `newsletter ...` in a subprocess, configured by
the environment, against a listmonk-shaped server (tests/fake_listmonk.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import Session, col, select

from app.config import Settings
from app.mailer import make_mailer
from app.models import AuditEvent, ConsentEvent, Subscription
from app.worker import Worker
from tests.conftest import SECRET, SmtpSink, wait_until
from tests.fake_listmonk import FakeListmonk, Seen
from tests.fake_mailgun import FakeMailgun

NEWSLETTER = str(Path(sys.executable).with_name("newsletter"))
LIST = 3


@pytest.fixture
def listmonk() -> Iterator[FakeListmonk]:
    with FakeListmonk() as fake:
        yield fake


def _lists(listmonk: FakeListmonk) -> list[dict[str, object]]:
    return [
        {
            "slug": "bluehats",
            "name": "Gazette BlueHats",
            "backend": {
                "kind": "listmonk",
                "base_url": listmonk.url,
                "username": listmonk.username,
                "api_token": listmonk.token,
                "list_id": LIST,
            },
        }
    ]


def newsletter(
    *args: str,
    database_url: str,
    listmonk: FakeListmonk,
    tmp_path: Path,
    unset: tuple[str, ...] = (),
    **settings: str,
) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("NEWSLETTER_")}
    env.update(
        NEWSLETTER_DATABASE_URL=database_url,
        NEWSLETTER_SECRET_KEY=SECRET,
        NEWSLETTER_LISTS=json.dumps(_lists(listmonk)),
        NEWSLETTER_LOG_LEVEL="WARNING",
    )
    env.update({f"NEWSLETTER_{name}": value for name, value in settings.items()})
    for name in unset:
        del env[f"NEWSLETTER_{name}"]
    return subprocess.run(
        [NEWSLETTER, *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _run_worker(engine: sa.Engine, database_url: str, listmonk: FakeListmonk) -> None:
    """A few rounds of the outbox worker, with the listmonk list's settings."""
    settings = Settings(
        database_url=database_url,
        secret_key=SECRET,
        lists=_lists(listmonk),  # type: ignore[arg-type]
        auto_migrate=False,
    )
    worker = Worker(engine=engine, settings=settings, mailer=make_mailer(settings.mailer), name="t")
    try:
        for _ in range(5):
            worker.run_once()
    finally:
        worker.stop()


def _status_on_list(listmonk: FakeListmonk, email: str) -> str | None:
    record = listmonk.subscriber(email)
    if record is None:
        return None
    status = record["lists"].get(LIST)
    return None if status is None else str(status)


class TestTakingOverAList:
    def test_import_then_reconcile_then_apply(
        self, database_url: str, listmonk: FakeListmonk, engine: sa.Engine, tmp_path: Path
    ) -> None:
        listmonk.seed("ada@example.org", lists={LIST: "confirmed"})
        listmonk.seed("bob@example.org", lists={LIST: "unsubscribed"})
        listmonk.seed("other@example.org", lists={7: "confirmed"})

        dry = newsletter(
            "import-backend", "--list", "bluehats", "--dry-run",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
        )  # fmt: skip
        assert dry.returncode == 0, dry.stderr
        assert "would import 1 confirmed and 1 unsubscribed" in dry.stdout
        with Session(engine) as session:
            assert session.exec(select(Subscription)).all() == []

        done = newsletter(
            "import-backend", "--list", "bluehats",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "imported 1 confirmed and 1 unsubscribed" in done.stdout
        with Session(engine) as session:
            rows = {row.email: row.status for row in session.exec(select(Subscription)).all()}
            assert rows == {"ada@example.org": "confirmed", "bob@example.org": "unsubscribed"}
            provenance = {e.detail["provenance"] for e in session.exec(select(ConsentEvent))}
            assert len(provenance) == 1
            assert provenance.pop().startswith("imported from listmonk on ")

        in_sync = newsletter(
            "reconcile", "--list", "bluehats", "--json",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
        )  # fmt: skip
        assert in_sync.returncode == 0, in_sync.stderr
        assert json.loads(in_sync.stdout)["in_sync"] is True

        # Someone adds a member in listmonk's admin, without consent recorded here.
        listmonk.seed("stranger@example.org", lists={LIST: "confirmed"})
        drift = newsletter(
            "reconcile", "--list", "bluehats", "--json",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
        )  # fmt: skip
        assert drift.returncode == 3
        assert json.loads(drift.stdout)["extra"] == ["stranger@example.org"]

        fix = newsletter(
            "reconcile", "--list", "bluehats", "--apply",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
        )  # fmt: skip
        assert fix.returncode == 0, fix.stderr
        assert "fixes enqueued" in fix.stdout

        _run_worker(engine, database_url, listmonk)
        assert _status_on_list(listmonk, "stranger@example.org") == "unsubscribed"
        # The import's sync gave ada her personal unsubscribe link at listmonk.
        ada = listmonk.subscriber("ada@example.org")
        assert ada is not None
        assert "/v1/unsubscribe/" in ada["attribs"]["unsubscribe_url"]

        again = newsletter(
            "reconcile", "--list", "bluehats",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
        )  # fmt: skip
        assert again.returncode == 0, again.stdout + again.stderr
        assert "in sync" in again.stdout

    def test_the_take_over_and_each_reconciliation_are_in_the_audit_log(
        self, database_url: str, listmonk: FakeListmonk, engine: sa.Engine, tmp_path: Path
    ) -> None:
        listmonk.seed("ada@example.org", lists={LIST: "confirmed"})
        listmonk.seed("bob@example.org", lists={LIST: "unsubscribed"})
        for args in (
            ("import-backend", "--list", "bluehats", "--dry-run"),
            ("import-backend", "--list", "bluehats"),
            ("reconcile", "--list", "bluehats"),
        ):
            done = newsletter(
                *args, database_url=database_url, listmonk=listmonk, tmp_path=tmp_path
            )
            assert done.returncode == 0, done.stderr
        listmonk.seed("stranger@example.org", lists={LIST: "confirmed"})
        fix = newsletter(
            "reconcile", "--list", "bluehats", "--apply",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
        )  # fmt: skip
        assert fix.returncode == 0, fix.stderr

        with Session(engine) as session:
            entries = session.exec(select(AuditEvent).order_by(col(AuditEvent.id))).all()
        assert [(e.action, e.target, e.outcome) for e in entries] == [
            ("list.import_backend", "bluehats", "ok"),
            ("list.import_backend", "bluehats", "ok"),
            ("list.reconcile", "bluehats", "ok"),
            ("list.reconcile", "bluehats", "ok"),
        ]
        assert all(e.actor.startswith("cli:") for e in entries)
        dry, taken = entries[0].detail, entries[1].detail
        assert (dry["dry_run"], dry["confirmed"], dry["unsubscribed"]) == (True, 1, 1)
        assert (taken["dry_run"], taken["read"], taken["backend"]) == (False, 2, "listmonk")
        assert (taken["confirmed"], taken["unsubscribed"], taken["invalid"]) == (1, 1, 0)
        compared, fixed = entries[2].detail, entries[3].detail
        assert (compared["apply"], compared["in_sync"]) == (False, True)
        assert (fixed["apply"], fixed["extra"], fixed["applied"]) == (True, 1, True)
        # Counts only: the audit log keeps no address.
        assert "@" not in json.dumps([e.detail for e in entries])

    def test_the_import_keeps_each_members_name_and_the_sync_gives_it_back(
        self, database_url: str, listmonk: FakeListmonk, engine: sa.Engine, tmp_path: Path
    ) -> None:
        listmonk.seed("ada@example.org", name="Ada Lovelace", lists={LIST: "confirmed"})
        # listmonk requires a name: its admin writes the local part when none is typed.
        listmonk.seed("bob@example.org", lists={LIST: "confirmed"})
        listmonk.seed("cy@example.org", name="Cy Ng", lists={LIST: "unsubscribed"})
        done = newsletter(
            "import-backend", "--list", "bluehats",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        with Session(engine) as session:
            attributes = {
                row.email: row.attributes for row in session.exec(select(Subscription)).all()
            }
        assert attributes == {
            "ada@example.org": {"name": "Ada Lovelace"},
            "bob@example.org": {},
            "cy@example.org": {"name": "Cy Ng"},
        }
        _run_worker(engine, database_url, listmonk)
        ada = listmonk.subscriber("ada@example.org")
        assert ada is not None
        assert ada["name"] == "Ada Lovelace"
        assert "/v1/unsubscribe/" in ada["attribs"]["unsubscribe_url"]

    def test_mailgun_member_variables_go_into_the_list_s_fields_and_the_rest_is_named(
        self, database_url: str, listmonk: FakeListmonk, engine: sa.Engine, tmp_path: Path
    ) -> None:
        mailgun = FakeMailgun()
        address = "bluehats@mail.codegouv.fr"
        mailgun.create_list(address)
        mailgun.seed(
            address, "ada@example.org", name="Ada Lovelace",
            vars={"organisation": " DINUM ", "site": "https://ada.example.org",
                  "phone": "0600000000", "unsubscribe_url": "https://old.example.org/u/1"},
        )  # fmt: skip
        # Too long for the field, not a URL, not text: refused as the form refuses them.
        mailgun.seed(
            address, "bob@example.org",
            vars={"organisation": "x" * 21, "site": "ada.example.org", "age": 42},
        )  # fmt: skip
        # A name the form would refuse (a control character), a value that is no text.
        mailgun.seed(address, "cy@example.org", name="Cy\x1b[31mNg", vars={"organisation": 7})
        # No display name: the variable `name` stands for it, checked as the form's field.
        mailgun.seed(
            address, "dee@example.org", vars={"name": "Dee Dee", "organisation": "ANCT"},
            subscribed=False,
        )  # fmt: skip
        fields = [
            {"name": "name", "label": {"fr": "Nom"}, "max_length": 40},
            {"name": "organisation", "label": {"fr": "Organisation"}, "max_length": 20},
            {"name": "site", "label": {"fr": "Site"}, "type": "url"},
        ]
        with mailgun.serve() as url:
            declared = [
                {
                    "slug": "bluehats", "name": "Gazette BlueHats", "fields": fields,
                    "backend": {"kind": "mailgun", "list_address": address,
                                "api_key": FakeMailgun.api_key, "base_url": url},
                }
            ]  # fmt: skip
            runs = [
                newsletter(
                    "import-backend", "--list", "bluehats", *extra,
                    database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
                    LISTS=json.dumps(declared),
                )
                for extra in (["--dry-run"], [])
            ]  # fmt: skip
        for run in runs:
            assert run.returncode == 0, run.stderr
            lines = run.stdout.splitlines()
            assert lines[1:] == [
                "  member variables not kept, the list declaring no such field: age (1), "
                "phone (1), unsubscribe_url (1)",
                "  member variables not kept, refused as the form refuses them: "
                "organisation (2), site (1)",
                "  display names not kept, refused as the form refuses them: 1",
                "  (an address taken over is not read again, and its first sync sends the "
                "backend only the values kept: declare a field in NEWSLETTER_LISTS before the "
                "import to keep its values)",
            ], run.stdout
        with Session(engine) as session:
            attributes = {
                row.email: row.attributes for row in session.exec(select(Subscription)).all()
            }
            [entry] = [
                entry
                for entry in session.exec(
                    select(AuditEvent).where(AuditEvent.action == "list.import_backend")
                ).all()
                if not entry.detail["dry_run"]
            ]
        assert attributes == {
            "ada@example.org": {
                "name": "Ada Lovelace", "organisation": "DINUM", "site": "https://ada.example.org",
            },
            "bob@example.org": {},
            "cy@example.org": {},
            "dee@example.org": {"name": "Dee Dee", "organisation": "ANCT"},
        }  # fmt: skip
        assert entry.detail["variables_not_kept"] == {
            "undeclared": {"age": 1, "phone": 1, "unsubscribe_url": 1},
            "refused": {"organisation": 2, "site": 1},
        }
        assert entry.detail["names_not_kept"] == 1

    def test_a_member_who_unsubscribes_at_listmonk_during_the_import_stays_unsubscribed(
        self, database_url: str, listmonk: FakeListmonk, engine: sa.Engine, tmp_path: Path
    ) -> None:
        listmonk.seed("ada@example.org", lists={LIST: "confirmed"})
        bob = listmonk.seed("bob@example.org", lists={LIST: "confirmed"})

        def bob_leaves(fake: FakeListmonk, seen: Seen) -> None:
            # Right after the import's first read of the list, at listmonk's own page.
            if seen.path == "/api/subscribers" and "list_id" in seen.query:
                fake.subscribers[bob]["lists"][LIST] = "unsubscribed"
                fake.after_request = None

        listmonk.after_request = bob_leaves
        done = newsletter(
            "import-backend", "--list", "bluehats",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "imported 2 confirmed and 0 unsubscribed" in done.stdout
        assert "left the backend while the import ran: 1" in done.stdout
        with Session(engine) as session:
            rows = {row.email: row.status for row in session.exec(select(Subscription)).all()}
        assert rows == {"ada@example.org": "confirmed", "bob@example.org": "unsubscribed"}

        _run_worker(engine, database_url, listmonk)
        # The import's syncs ran: ada got her link, bob was not subscribed again.
        ada = listmonk.subscriber("ada@example.org")
        assert ada is not None
        assert "/v1/unsubscribe/" in ada["attribs"]["unsubscribe_url"]
        assert _status_on_list(listmonk, "bob@example.org") == "unsubscribed"

    def test_an_address_not_valid_here_is_left_to_the_operator_and_said_so(
        self, database_url: str, listmonk: FakeListmonk, tmp_path: Path
    ) -> None:
        listmonk.seed("root@localhost", lists={LIST: "confirmed"})
        report = newsletter(
            "reconcile", "--list", "bluehats",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
        )  # fmt: skip
        assert report.returncode == 3
        assert "root@localhost" in report.stdout
        assert "1 left for an operator to check: --apply changes nothing there" in report.stdout
        assert "--apply to fix" not in report.stdout
        applied = newsletter(
            "reconcile", "--list", "bluehats", "--apply",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
        )  # fmt: skip
        assert applied.returncode == 0, applied.stderr
        assert "fixes enqueued" not in applied.stdout
        assert "1 left for an operator to check" in applied.stdout

    def test_the_take_over_says_how_many_invalid_addresses_it_does_not_show(
        self, database_url: str, listmonk: FakeListmonk, tmp_path: Path
    ) -> None:
        for n in range(23):
            listmonk.seed(f"user{n:02}@localhost", lists={LIST: "confirmed"})
        done = newsletter(
            "import-backend", "--list", "bluehats", "--dry-run",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "23 invalid" in done.stdout
        assert done.stdout.count("  invalid: ") == 20
        assert (
            "  ... and 3 more invalid (`newsletter reconcile --list bluehats --json` lists them "
            "all, under invalid)"
        ) in done.stdout

    def test_ctrl_c_during_the_second_read_says_the_members_are_in(
        self, database_url: str, listmonk: FakeListmonk, engine: sa.Engine, tmp_path: Path
    ) -> None:
        listmonk.seed("ada@example.org", lists={LIST: "confirmed"})
        reads = 0

        def slow_second_read(fake: FakeListmonk, seen: Seen) -> None:
            nonlocal reads
            if seen.path == "/api/subscribers" and "list_id" in seen.query:
                reads += 1
                if reads == 2:
                    time.sleep(3)

        listmonk.after_request = slow_second_read
        env = {key: value for key, value in os.environ.items() if not key.startswith("NEWSLETTER_")}
        env.update(
            NEWSLETTER_DATABASE_URL=database_url,
            NEWSLETTER_SECRET_KEY=SECRET,
            NEWSLETTER_LISTS=json.dumps(_lists(listmonk)),
            NEWSLETTER_LOG_LEVEL="WARNING",
        )
        running = subprocess.Popen(
            [NEWSLETTER, "import-backend", "--list", "bluehats"], env=env, cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # Ctrl-C as a terminal sends it, whatever the test runner's own disposition.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        try:
            wait_until(lambda: reads == 2, timeout=30)
            running.send_signal(signal.SIGINT)
            _, stderr = running.communicate(timeout=30)
        finally:
            running.kill()
        assert running.returncode == 130, stderr
        assert (
            "the members are imported (read 1: 1 confirmed, 0 unsubscribed); their syncs start "
            "in 60 minutes: run `newsletter reconcile --list bluehats --apply` before"
        ) in stderr
        assert "Traceback" not in stderr
        with Session(engine) as session:
            [entry] = session.exec(select(AuditEvent)).all()
        assert (entry.action, entry.outcome) == ("list.import_backend", "interrupted")

    def test_two_spellings_of_one_address_there_are_counted_once_and_said(
        self, database_url: str, listmonk: FakeListmonk, engine: sa.Engine, tmp_path: Path
    ) -> None:
        listmonk.seed("jo@xn--exmple-cua.org", lists={LIST: "unsubscribed"})
        listmonk.seed("jo@exämple.org", lists={LIST: "confirmed"})
        listmonk.seed("ada@example.org", lists={LIST: "confirmed"})
        said = (
            "bluehats: 3 members at the backend for 2 addresses: a member in another spelling "
            "of an address read already (its domain in Unicode and in ASCII, say) counts once, "
            "subscribed if either spelling is"
        )
        for command in ("import-backend", "reconcile"):
            done = newsletter(
                command, "--list", "bluehats",
                database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert done.stderr.count(said) == 1, done.stderr
        with Session(engine) as session:
            rows = {row.email: row.status for row in session.exec(select(Subscription)).all()}
        assert rows == {"jo@exämple.org": "confirmed", "ada@example.org": "confirmed"}

    def test_an_unknown_list_is_refused_with_exit_code_2(
        self, database_url: str, listmonk: FakeListmonk, tmp_path: Path
    ) -> None:
        result = newsletter(
            "reconcile", "--list", "nope",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
        )  # fmt: skip
        assert result.returncode == 2
        assert "no list 'nope'" in result.stderr

    def test_a_backend_that_refuses_gives_exit_code_1(
        self, database_url: str, listmonk: FakeListmonk, tmp_path: Path
    ) -> None:
        listmonk.permissions = set()  # the API user lost its rights: listmonk answers 403
        result = newsletter(
            "reconcile", "--list", "bluehats",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
        )  # fmt: skip
        assert result.returncode == 1
        assert "the backend failed" in result.stderr


class TestCheck:
    """`newsletter check`: each thing the settings name is reached once, nothing is sent."""

    def test_everything_reachable_is_ok_and_nothing_is_sent_or_changed(
        self, database_url: str, listmonk: FakeListmonk, smtp: SmtpSink, tmp_path: Path
    ) -> None:
        result = newsletter(
            "check",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
            MAILER__KIND="smtp", MAILER__HOST="127.0.0.1", MAILER__PORT=str(smtp.port),
            MAILER__SECURITY="none", REDIS_URL="redis://127.0.0.1:6379/0",
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert [line.split(":", 1)[0] for line in lines] == [
            "ok     database",
            "ok     secret key",
            "ok     redis",
            "ok     mail relay",
            "ok     list bluehats",
        ]
        assert "schema at " in lines[0]
        assert "this release's" in lines[0]
        assert lines[1] == "ok     secret key: given in NEWSLETTER_SECRET_KEY"
        assert lines[2].endswith("127.0.0.1:6379: answered PING")
        assert lines[3].endswith(f"127.0.0.1:{smtp.port} (none): the relay answered, no login; "
                                 "nothing was sent")  # fmt: skip
        assert lines[4] == "ok     list bluehats: listmonk: read 0 members on the first page"
        assert smtp.messages == []
        assert {seen.method for seen in listmonk.requests} == {"GET"}

    def test_a_password_in_the_url_s_query_string_is_masked_when_the_database_answers(
        self, database_url: str, listmonk: FakeListmonk, tmp_path: Path
    ) -> None:
        if not database_url.startswith("postgresql"):
            pytest.skip("a password in the URL is PostgreSQL's (libpq takes it in the query)")
        # This server trusts loopback: the password is sent, and not needed.
        separator = "&" if "?" in database_url else "?"
        with_password = f"{database_url}{separator}password=s3cret-pw&sslpassword=s3cret-key-pw"
        result = newsletter(
            "check", database_url=with_password, listmonk=listmonk, tmp_path=tmp_path
        )
        assert result.returncode == 0, result.stdout + result.stderr
        [database] = [line for line in result.stdout.splitlines() if "database:" in line]
        assert database.startswith("ok     database: postgresql+psycopg://")
        assert "password=***" in database
        assert "sslpassword=***" in database
        assert "s3cret" not in result.stdout + result.stderr

    def test_each_failure_is_said_and_the_rest_still_checked(
        self, listmonk: FakeListmonk, tmp_path: Path
    ) -> None:
        listmonk.permissions = set()  # the API user lost its rights: listmonk answers 403
        # A port held, never listened on: refused, and no other process can take it.
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            nobody = holder.getsockname()[1]
            result = newsletter(
                "check",
                database_url=f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{nobody}/newsletter",
                listmonk=listmonk, tmp_path=tmp_path,
                MAILER__KIND="smtp", MAILER__HOST="127.0.0.1", MAILER__PORT=str(nobody),
                MAILER__SECURITY="none", REDIS_URL=f"redis://127.0.0.1:{nobody}/0",
            )  # fmt: skip
        assert result.returncode == 3, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert [line.split(":", 1)[0] for line in lines] == [
            "FAILED database",
            "ok     secret key",
            "FAILED redis",
            "FAILED mail relay",
            "FAILED list bluehats",
        ]
        assert f"postgres:***@127.0.0.1:{nobody}/newsletter: unreachable" in lines[0]
        assert "hunter2" not in result.stdout + result.stderr
        assert f"127.0.0.1:{nobody}: ConnectionError" in lines[2]
        assert f"127.0.0.1:{nobody} (none): ConnectionRefusedError" in lines[3]
        assert lines[4].startswith(
            "FAILED list bluehats: listmonk: list members: HTTP 403: check the backend's "
            "username and api_token, and the API user's permissions ("
        )
        assert result.stderr.strip().endswith("4 of the checks failed")

    def test_a_key_file_the_start_cannot_make_is_said(
        self, database_url: str, listmonk: FakeListmonk, tmp_path: Path
    ) -> None:
        # `serve` and `worker` stop at once on it (exit 2), where the check said all was well.
        blocked = tmp_path / "a-file"
        blocked.write_text("")
        key_file = blocked / "secret.key"
        result = newsletter(
            "check",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
            unset=("SECRET_KEY",), SECRET_KEY_FILE=str(key_file),
            MAILER__DIRECTORY=str(tmp_path / "mail"),
        )  # fmt: skip
        assert result.returncode == 3, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert lines[1] == (
            f"FAILED secret key: {key_file} (NEWSLETTER_SECRET_KEY_FILE): not there, and its "
            f"folder {blocked} cannot be made: File exists; make the file, or give "
            "NEWSLETTER_SECRET_KEY"
        )
        assert [line.split(" ", 1)[0] for line in lines] == ["ok", "FAILED", "ok", "ok", "ok"]
        assert result.stderr.strip().endswith("1 of the checks failed")

    def test_a_key_file_not_there_yet_is_left_for_the_start_to_make(
        self, database_url: str, listmonk: FakeListmonk, tmp_path: Path
    ) -> None:
        key_file = tmp_path / "keys" / "secret.key"
        result = newsletter(
            "check",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
            unset=("SECRET_KEY",), SECRET_KEY_FILE=str(key_file),
            MAILER__DIRECTORY=str(tmp_path / "mail"),
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.splitlines()[1] == (
            f"ok     secret key: {key_file} (NEWSLETTER_SECRET_KEY_FILE): not there yet, made "
            "at start"
        )
        # Made by the check, it would be the key of whoever ran it, unreadable by the service.
        assert not key_file.exists()

    def test_the_report_is_not_interleaved_with_the_http_client_s_log(
        self, database_url: str, listmonk: FakeListmonk, tmp_path: Path
    ) -> None:
        # At INFO, httpx's "HTTP Request: GET http://.../api/subscribers?..." came between
        # the report's lines in a terminal.
        result = newsletter(
            "check",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
            LOG_LEVEL="INFO", MAILER__DIRECTORY=str(tmp_path / "mail"),
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.splitlines()[-1] == (
            "ok     list bluehats: listmonk: read 0 members on the first page"
        )
        assert "HTTP Request" not in result.stderr
        debug = newsletter(
            "check",
            database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
            LOG_LEVEL="DEBUG", MAILER__DIRECTORY=str(tmp_path / "mail"),
        )  # fmt: skip
        assert "HTTP Request: GET" in debug.stderr

    def test_a_mailgun_list_without_its_webhook_signing_key_is_said(
        self, database_url: str, listmonk: FakeListmonk, tmp_path: Path
    ) -> None:
        # Its webhooks get 503 until the key is set: found before they are pointed here.
        fake = FakeMailgun()
        fake.create_list("bluehats@mail.codegouv.fr")
        backend = {
            "kind": "mailgun", "list_address": "bluehats@mail.codegouv.fr",
            "api_key": FakeMailgun.api_key,
        }  # fmt: skip
        with fake.serve() as url:
            declared = [{"slug": "bluehats", "name": "B", "backend": {**backend, "base_url": url}}]
            result = newsletter(
                "check",
                database_url=database_url, listmonk=listmonk, tmp_path=tmp_path,
                LISTS=json.dumps(declared), MAILER__DIRECTORY=str(tmp_path / "mail"),
            )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.splitlines()[-1] == (
            "ok     list bluehats: mailgun: read 0 members on the first page; no "
            "webhook_signing_key: Mailgun's webhooks get 503 until it is set"
        )

    def test_an_sqlite_file_not_there_is_left_uncreated(
        self, listmonk: FakeListmonk, tmp_path: Path
    ) -> None:
        database = tmp_path / "var" / "newsletter.db"
        result = newsletter(
            "check",
            database_url=f"sqlite:///{database}", listmonk=listmonk, tmp_path=tmp_path,
            MAILER__DIRECTORY=str(tmp_path / "mail"),
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"sqlite:///{database}: not there yet, made at start" in result.stdout
        assert not database.exists()
