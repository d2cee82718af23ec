"""What an operator sees when a command cannot do its work: one line on stderr and a
documented exit code (README "Commands"), never a traceback. Run as operators run them."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import Session, select

from app import admin, apikeys, cli, migrations
from app.models import ApiKey, utcnow
from app.schemas import CONFIRM_TTL_BOUNDS, MAX_ROW_ID
from tests.conftest import SECRET, free_port, wait_until
from tests.processes import Process, service_env

NEWSLETTER = str(Path(sys.executable).with_name("newsletter"))
UNREACHABLE = "postgresql+psycopg://postgres:s3cret-pw@127.0.0.1:{port}/newsletter"


def run(
    database_url: str, tmp_path: Path, *args: str, **settings: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(
        NEWSLETTER_DATABASE_URL=database_url,
        NEWSLETTER_SECRET_KEY=SECRET,
        NEWSLETTER_LOG_LEVEL="WARNING",
        NEWSLETTER_AUTO_MIGRATE="false",
    )
    env.update({f"NEWSLETTER_{name}": value for name, value in settings.items()})
    # A worker that started would run until the timeout: the test fails, it does not hang.
    return subprocess.run(
        [NEWSLETTER, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert "╭" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


class TestDatabaseProblems:
    @pytest.mark.parametrize(
        "args",
        [
            ("migrate",),
            ("worker",),
            ("stats", "--list", "bluehats"),
            ("keys", "list"),
            ("serve", "--port", "1"),
        ],
    )
    def test_an_unreachable_database_is_named_with_its_password_masked(
        self, tmp_path: Path, args: tuple[str, ...]
    ) -> None:
        url = UNREACHABLE.format(port=free_port())
        result = run(url, tmp_path, *args)
        assert result.returncode == cli.EXIT_DATABASE_UNREACHABLE == 4
        line = last_line(result)
        assert line.startswith("database unreachable at postgresql+psycopg://postgres:***@127.")
        assert "refused" in line
        assert "s3cret-pw" not in result.stderr

    @pytest.mark.parametrize("args", [("migrate",), ("check",)])
    def test_a_password_in_the_url_s_query_string_is_masked_too(
        self, tmp_path: Path, args: tuple[str, ...]
    ) -> None:
        # libpq takes any connection parameter in the query string, the password too.
        url = (
            f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/newsletter"
            "?sslmode=disable&password=s3cret-pw&sslpassword=s3cret-key-pw"
        )
        result = run(url, tmp_path, *args)
        assert "s3cret" not in result.stdout + result.stderr
        assert "/newsletter?password=***&sslmode=disable&sslpassword=***: " in (
            result.stdout + result.stderr
        )

    @pytest.mark.parametrize("args", [("worker",), ("keys", "list"), ("serve", "--port", "1")])
    def test_an_empty_database_asks_for_newsletter_migrate(
        self, tmp_path: Path, args: tuple[str, ...]
    ) -> None:
        result = run(f"sqlite:///{tmp_path / 'empty.db'}", tmp_path, *args)
        assert result.returncode == cli.EXIT_SCHEMA_NOT_AT_HEAD == 5
        assert last_line(result) == (
            "database schema is at no revision (empty database), this release needs "
            f"{migrations.head_revision()}: run `newsletter migrate`"
        )


class TestJsonLog:
    """With NEWSLETTER_LOG_FORMAT=json, what stops `serve` or `worker` is a line of the log
    like any other: a collector reading their stderr got the one line it could not parse."""

    @pytest.mark.parametrize(
        ("args", "settings", "said", "code"),
        [
            (("serve", "--port", "1"), {}, "database unreachable at ", 4),
            (("worker",), {}, "database unreachable at ", 4),
            (("worker",), {"WORKER_BATCH_SIZE": "0"}, "NEWSLETTER_WORKER_BATCH_SIZE: ", 2),
        ],
    )
    def test_a_refused_start_is_a_json_line(
        self,
        tmp_path: Path,
        args: tuple[str, ...],
        settings: dict[str, str],
        said: str,
        code: int,
    ) -> None:
        url = UNREACHABLE.format(port=free_port())
        result = run(url, tmp_path, *args, LOG_FORMAT="json", **settings)
        assert result.returncode == code, result.stderr
        lines = [json.loads(line) for line in result.stderr.splitlines()]
        assert lines[-1]["level"] == "ERROR"
        assert lines[-1]["event"] == "cli.stopped"
        assert said in lines[-1]["message"]
        assert "s3cret-pw" not in result.stderr
        if said.startswith("database"):
            # The database's user as given, not masked as if it were a mail address.
            assert "postgresql+psycopg://postgres:***@127.0.0.1:" in lines[-1]["message"]

    def test_a_refused_log_format_is_said_in_text(self, tmp_path: Path) -> None:
        result = run("sqlite://", tmp_path, "worker", LOG_FORMAT="yaml")
        assert result.returncode == 2
        assert "NEWSLETTER_LOG_FORMAT: " in last_line(result)


class TestMigrate:
    def test_an_older_revision_is_a_downgrade_and_the_worker_refuses_to_run_on_it(
        self, database_url: str, engine: sa.Engine, tmp_path: Path
    ) -> None:
        head = migrations.head_revision()
        assert head == "0010"
        down = run(database_url, tmp_path, "migrate", "0009")
        assert down.returncode == 0, down.stderr
        assert down.stdout == "database at 0009\n"
        assert migrations.current_revision(engine) == "0009"

        worker = run(database_url, tmp_path, "worker")
        assert worker.returncode == 5
        assert last_line(worker).startswith("database schema is at 0009, this release needs 0010")

        up = run(database_url, tmp_path, "migrate")
        assert up.returncode == 0, up.stderr
        assert up.stdout == "database at 0010\n"
        assert migrations.current_revision(engine) == head

    def test_migrate_logs_the_upgrades_it_runs_and_not_alembic_s_plugins(
        self, tmp_path: Path
    ) -> None:
        fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
        result = run(fresh, tmp_path, "migrate", LOG_LEVEL="INFO")
        assert result.returncode == 0, result.stderr
        assert "Running upgrade 0009 -> 0010" in result.stderr
        assert "plugin" not in result.stderr

    def test_an_unknown_revision_is_bad_input(self, database_url: str, tmp_path: Path) -> None:
        result = run(database_url, tmp_path, "migrate", "nosuchrev")
        assert result.returncode == 2
        assert last_line(result) == (
            "cannot migrate to 'nosuchrev': Can't locate revision identified by 'nosuchrev'"
        )


class TestListWithoutBackend:
    @pytest.mark.parametrize("command", ["reconcile", "import-backend"])
    def test_reading_its_members_is_refused_with_exit_code_2(
        self, database_url: str, tmp_path: Path, command: str
    ) -> None:
        # The embedded default's list: before, reconcile reported every confirmed member
        # "missing at the backend" and exited 3.
        result = run(database_url, tmp_path, command, "--list", "bluehats")
        assert result.returncode == 2
        assert last_line(result) == (
            "list 'bluehats' has no mailing-list backend (its backend kind is none): "
            "there is no member list to read"
        )
        assert result.stdout == ""

    @pytest.mark.parametrize("command", ["reconcile", "import-backend"])
    def test_a_list_created_here_is_said_to_need_its_backend_declared(
        self, database_url: str, tmp_path: Path, command: str
    ) -> None:
        created = run(database_url, tmp_path, "lists", "create", "etalab", "--name", "Etalab")
        assert created.returncode == 0, created.stderr
        # `lists show` names it; "no list 'etalab' in the settings" read as a misspelt name.
        result = run(database_url, tmp_path, command, "--list", "etalab")
        assert result.returncode == 2
        assert last_line(result) == (
            "list 'etalab' has no mailing-list backend: it was created through the API or the "
            "CLI, and NEWSLETTER_LISTS declares none for it (declared there: bluehats); "
            "declare its backend there first"
        )
        assert result.stdout == ""

    def test_a_list_nowhere_is_named_with_the_declared_ones(
        self, database_url: str, tmp_path: Path
    ) -> None:
        result = run(database_url, tmp_path, "reconcile", "--list", "etalab")
        assert (result.returncode, last_line(result)) == (
            2,
            "no list 'etalab' in the settings (known: bluehats)",
        )


class TestLimits:
    def test_the_cli_takes_the_admin_apis_limits(self) -> None:
        assert (cli.MAX_PAGE, cli.MAX_PREFIX, cli.MAX_ROW_ID) == (
            admin.MAX_PAGE,
            admin.MAX_PREFIX,
            MAX_ROW_ID,
        )
        hours = tuple(seconds // 3600 for seconds in CONFIRM_TTL_BOUNDS.values())
        assert hours == cli.CONFIRM_TTL_HOURS

    @pytest.mark.parametrize(
        "args",
        [
            ("jobs", "failed", "--limit", "-1"),
            ("audit", "--limit", "-1"),
            ("audit", "--limit", "0"),
            ("subscriber", "search", "--list", "bluehats", "--limit", "0"),
            ("subscriber", "search", "--list", "bluehats", "--limit", "100000"),
            ("jobs", "retry", "--id", str(MAX_ROW_ID + 1)),
            # In hours, as given: not a 422 about confirm_ttl_seconds; nor, for 0, "nothing
            # to change".
            ("lists", "create", "events", "--name", "Events", "--confirm-ttl-hours", "0"),
            ("lists", "create", "events", "--name", "Events", "--confirm-ttl-hours", "721"),
            ("lists", "update", "events", "--confirm-ttl-hours", "0"),
        ],
    )
    def test_a_limit_out_of_range_is_bad_input(
        self, database_url: str, tmp_path: Path, args: tuple[str, ...]
    ) -> None:
        result = run(database_url, tmp_path, *args)
        assert result.returncode == 2
        assert "Invalid value for '--" in result.stderr
        assert "Input should be " in result.stderr

    @pytest.mark.parametrize(
        "args",
        [
            ("stats", "--list", "bluehats", "--since", "0001-01-01T00:00:00+14:00"),
            ("stats", "--list", "bluehats", "--until", "9999-12-31T23:59:59-14:00"),
            ("audit", "--since", "0001-01-01T00:00:00+01:00"),
            (
                "subscriber",
                "search",
                "--list",
                "bluehats",
                "--created-after",
                "0001-01-01T00:00:00+01:00",
            ),
        ],
    )
    def test_a_date_out_of_range_once_in_utc_is_bad_input(
        self, database_url: str, tmp_path: Path, args: tuple[str, ...]
    ) -> None:
        result = run(database_url, tmp_path, *args)
        assert result.returncode == 2, result.stderr
        assert "out of range once in UTC" in last_line(result)

    def test_an_id_or_cursor_beyond_any_row_is_not_found(
        self, database_url: str, tmp_path: Path
    ) -> None:
        huge = "99999999999999999999"
        # First: it brings the declared list into the database, and the search reaches it.
        proof = run(database_url, tmp_path, "subscriber", "proof", huge, "--list", "bluehats")
        assert proof.returncode == 1
        assert last_line(proof) == "No subscriber has this id."
        cursor = base64.urlsafe_b64encode(f"id:{huge}".encode()).decode().rstrip("=")
        searched = run(database_url, tmp_path, "subscriber", "search", "--list", "bluehats",
                       "--cursor", cursor)  # fmt: skip
        assert searched.returncode == 2  # bad input
        assert last_line(searched) == "The cursor is not one this service handed out."
        # As the list's name: `stats` on a list that does not exist.
        unknown = run(database_url, tmp_path, "stats", "--list", "nope")
        assert (unknown.returncode, last_line(unknown)) == (2, "no list 'nope' (known: bluehats)")


class TestKeyNames:
    @pytest.mark.parametrize("name", ["", "   ", "k" * (apikeys.MAX_NAME + 1)])
    def test_a_blank_or_too_long_name_is_bad_input(
        self, database_url: str, engine: sa.Engine, tmp_path: Path, name: str
    ) -> None:
        result = run(database_url, tmp_path, "keys", "create", "--name", name)
        assert result.returncode == 2
        assert last_line(result).startswith("--name: a key's name ")
        with Session(engine) as session:
            assert session.exec(select(ApiKey)).all() == []

    def test_a_name_is_kept_without_its_surrounding_blanks(
        self, database_url: str, engine: sa.Engine, tmp_path: Path
    ) -> None:
        longest = "k" * apikeys.MAX_NAME
        for name in ("  dashboard ", longest):
            made = run(database_url, tmp_path, "keys", "create", "--name", name)
            assert made.returncode == 0, made.stderr
        with Session(engine) as session:
            names = {row.name for row in session.exec(select(ApiKey)).all()}
        assert names == {"dashboard", longest}
        assert ApiKey.__table__.c.name.type.length == apikeys.MAX_NAME  # type: ignore[attr-defined]

    def test_the_name_of_a_revoked_key_is_said_to_be_taken_by_it(
        self, database_url: str, tmp_path: Path
    ) -> None:
        assert run(database_url, tmp_path, "keys", "create", "--name", "ops").returncode == 0
        assert run(database_url, tmp_path, "keys", "revoke", "ops").returncode == 0
        # "A key named 'ops' already exists." where `keys list` shows it revoked.
        again = run(database_url, tmp_path, "keys", "create", "--name", "ops")
        assert (again.returncode, last_line(again)) == (
            1,
            f"A key named 'ops' existed: it was revoked on {utcnow():%Y-%m-%d}, and its name "
            "stays its own (the audit log names keys by it); give the new key another name.",
        )
        live = run(database_url, tmp_path, "keys", "create", "--name", "ops-2")
        assert live.returncode == 0
        assert last_line(run(database_url, tmp_path, "keys", "create", "--name", "ops-2")) == (
            "A key named 'ops-2' already exists."
        )


class TestBadInputNamesTheOption:
    """A value the API's model refuses is named by the option the operator typed, not by
    the API's field (`evidence.source: Field required` for a missing --source)."""

    @pytest.mark.parametrize(
        ("args", "expected"),
        [
            (
                ("subscriber", "add", "ada@example.org", "--list", "bluehats", "--confirmed",
                 "--source", "paper form", "--consented-at", "2025-10-01"),
                ["--note: Field required"],
            ),
            (
                ("subscriber", "add", "ada@example.org", "--list", "bluehats", "--confirmed",
                 "--source", "", "--note", "box 3", "--consented-at", "2025-13-01"),
                ["--source: String should have at least 1 character",
                 "--consented-at: Input should be a valid date or datetime, month value is "
                 "outside expected range of 1-12"],
            ),
            (
                ("subscriber", "unsubscribe", "ada@example.org", "--list", "bluehats",
                 "--reason", ""),
                ["--reason: String should have at least 1 character"],
            ),
            (
                ("lists", "create", "events", "--name", "Events", "--default-locale", "de"),
                ["--default-locale: Input should be 'fr' or 'en'"],
            ),
            # The pattern itself ('^[a-z0-9][a-z0-9-]{0,62}$') was the message.
            (
                ("lists", "create", "Events", "--name", "Events"),
                ["SLUG: a list's name is lowercase letters, digits and dashes, starting with a "
                 "letter or a digit, at most 63 of them (as bluehats or gazette-bluehats)"],
            ),
            (
                ("lists", "update", "events", "--thank-you-url", "merci"),
                ["--thank-you-url: Input should be a valid URL, relative URL without a base"],
            ),
            (
                ("block", "add", "spam.example", "--reason", ""),
                ["--reason: String should have at least 1 character"],
            ),
            # A job running or done has not failed: listing "failed jobs done" listed them all.
            (("jobs", "failed", "--state", "done"), ["--state must be one of dead, pending"]),
            (("stats", "--list", "bluehats", "--since", "2026-12-01", "--until", "2026-11-01"),
             ["--since (2026-12-01T00:00:00+00:00) is not before --until (2026-11-01T00:00:00"
              "+00:00): the period is empty; give --since before --until."]),
            (("audit", "--since", "2026-12-01", "--until", "2026-11-01"),
             ["--since (2026-12-01T00:00:00+00:00) is not before --until (2026-11-01T00:00:00"
              "+00:00): the period is empty; give --since before --until."]),
            # The same mistake in a search found nobody, which read as "no subscriber".
            (("subscriber", "search", "--list", "bluehats", "--created-after", "2026-12-01",
              "--created-before", "2026-12-01"),
             ["--created-after (2026-12-01T00:00:00+00:00) is not before --created-before"
              " (2026-12-01T00:00:00+00:00): the period is empty; give --created-after before"
              " --created-before."]),
            # Both: it asked for one of them, as if neither had been given.
            (("jobs", "retry", "--all", "--id", "3"),
             ["give --id N (one or more) or --all, not both"]),
        ],
    )  # fmt: skip
    def test_each_refused_value_is_named_by_its_option(
        self, database_url: str, tmp_path: Path, args: tuple[str, ...], expected: list[str]
    ) -> None:
        result = run(database_url, tmp_path, *args)
        assert result.returncode == cli.EXIT_USAGE == 2
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines() == expected


class TestPortTaken:
    """A port another server holds: one line naming it and the option, exit 2, before
    anything starts (uvicorn's own failure came after the in-process worker had sent mails,
    with exit code 3; the worker's metrics server's was a traceback)."""

    @pytest.mark.parametrize(
        ("args", "option"),
        [(("serve", "--port"), "--port"), (("worker", "--metrics-port"), "--metrics-port")],
    )
    def test_a_port_in_use_is_bad_input_naming_the_option(
        self, database_url: str, tmp_path: Path, args: tuple[str, str], option: str
    ) -> None:
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            result = run(database_url, tmp_path, *args, str(port))
        assert result.returncode == cli.EXIT_USAGE == 2
        line = last_line(result)
        assert line == (
            f"cannot listen on 127.0.0.1:{port}: Address already in use; give another {option}"
        )
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr

    @pytest.mark.parametrize(
        "args",
        [
            ("serve", "--port", "99999"),
            ("serve", "--workers", "0"),
            ("worker", "--metrics-port", "70000"),
        ],
    )
    def test_a_port_or_process_count_out_of_range_is_bad_input(
        self, database_url: str, tmp_path: Path, args: tuple[str, ...]
    ) -> None:
        # `--port 99999` served on port 34463 (99999 - 65536) with a start line saying 99999.
        result = run(database_url, tmp_path, *args)
        assert result.returncode == 2
        assert f"Invalid value for '{args[1]}'" in result.stderr
        assert "Input should be " in result.stderr


class TestWorkerMetricsPort:
    def test_the_metrics_token_is_required_as_on_the_api(
        self, database_url: str, engine: sa.Engine, tmp_path: Path
    ) -> None:
        port, smtp_port = free_port(), free_port()
        env = service_env(database_url, smtp_port=smtp_port, METRICS_TOKEN="scrape-me")
        worker = Process(
            ["worker", "--metrics-port", str(port)], env=env, cwd=tmp_path, log=tmp_path / "log"
        )
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            worker.wait_for_log("worker.metrics_listening")
            # Its start says where the mails and the syncs go.
            worker.wait_for_log(f"mailer=smtp:127.0.0.1:{smtp_port} lists=bluehats:none")
            anonymous = wait_until(lambda: _get(url))
            assert anonymous.status_code == 401
            assert anonymous.json()["error"] == "unauthorized"
            assert _get(url, "Bearer nope").status_code == 401
            scraped = _get(url, "Bearer scrape-me")
            assert scraped.status_code == 200
            assert "newsletter_database_up 1.0" in scraped.text
        finally:
            worker.terminate()
            assert worker.wait() == 0, worker.log_text()


def _get(url: str, authorization: str | None = None) -> httpx.Response | None:
    headers = {"authorization": authorization} if authorization else {}
    try:
        return httpx.get(url, headers=headers, timeout=5)
    except httpx.TransportError:
        return None


def test_a_database_url_without_password_is_shown_whole(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/newsletter"
    result = run(url, tmp_path, "lists", "show")
    assert result.returncode == 4
    assert last_line(result).startswith(f"database unreachable at {url}: ")


class TestUnknownList:
    """A list name that is not one: every command names it and the lists there are, as
    `import` and `export` did ("No mailing list has this name." elsewhere)."""

    @pytest.mark.parametrize(
        "args",
        [
            ("subscriber", "search", "--list", "nope"),
            ("subscriber", "show", "ada@example.org", "--list", "nope"),
            ("subscriber", "add", "ada@example.org", "--list", "nope"),
            ("subscriber", "unsubscribe", "ada@example.org", "--list", "nope", "--reason", "r"),
            ("subscriber", "proof", "1", "--list", "nope"),
            ("stats", "--list", "nope"),
            ("export", "--list", "nope"),
            ("lists", "update", "nope", "--name", "N"),
        ],
    )
    def test_it_is_named_with_the_known_lists(
        self, database_url: str, tmp_path: Path, args: tuple[str, ...]
    ) -> None:
        result = run(database_url, tmp_path, *args)
        assert (result.returncode, last_line(result)) == (2, "no list 'nope' (known: bluehats)")

    def test_reads_before_the_first_start_know_the_declared_lists(
        self, database_url: str, tmp_path: Path
    ) -> None:
        # `newsletter migrate`, then the operator's first commands, before any `serve`: the
        # list of NEWSLETTER_LISTS was "not a list" to `stats`, and `lists show` was empty.
        shown = run(database_url, tmp_path, "lists", "show")
        assert (shown.returncode, shown.stdout) == (
            0,
            "bluehats\tGazette BlueHats\tfr\t2026-11\tnone\n",
        )
        stats = run(database_url, tmp_path, "stats", "--list", "bluehats")
        assert stats.returncode == 0, stats.stderr
        assert '"list_slug": "bluehats"' in stats.stdout


class TestOpenapi:
    def test_bad_settings_are_named_without_their_value(self, tmp_path: Path) -> None:
        # Built from Settings() alone, the document's command printed pydantic's traceback,
        # the refused key's value in it.
        result = run(
            f"sqlite:///{tmp_path / 'x.db'}", tmp_path, "openapi", SECRET_KEY="short-key-VALUE"
        )
        assert result.returncode == 2
        assert last_line(result).startswith("  NEWSLETTER_SECRET_KEY: is too short; ")
        assert "short-key-VALUE" not in result.stderr + result.stdout

    @pytest.mark.parametrize(
        ("where", "reason"),
        [("missing/openapi.json", "No such file or directory"), (".", "it is a directory")],
    )
    def test_a_file_that_cannot_be_written_is_bad_input(
        self, tmp_path: Path, where: str, reason: str
    ) -> None:
        output = tmp_path / where
        result = run(f"sqlite:///{tmp_path / 'x.db'}", tmp_path, "openapi", "--output", str(output))
        assert (result.returncode, last_line(result)) == (2, f"cannot write {output}: {reason}")


class TestFilesThatCannotBeMade:
    """A path under a regular file: nothing can be made there, as root too."""

    def test_a_key_file_stops_serve_and_the_commands_with_a_settings_error(
        self, database_url: str, tmp_path: Path
    ) -> None:
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "keys" / "secret.key"
        for args in (
            ("serve", "--port", str(free_port())),
            ("people", "erase", "a@b.org", "--yes"),
        ):
            result = _run_without_key(database_url, tmp_path, path, *args)
            assert result.returncode == 2, result.stderr
            assert last_line(result) == (
                f"  NEWSLETTER_SECRET_KEY_FILE: {path} does not exist and cannot be made (Not a "
                f"directory: {path.parent}); make it, or give NEWSLETTER_SECRET_KEY"
            )

    def test_an_sqlite_file_whose_folder_cannot_be_made(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("x")
        url = f"sqlite:///{tmp_path / 'file' / 'db' / 'newsletter.db'}"
        checked = run(url, tmp_path, "check", AUTO_MIGRATE="true")
        assert checked.returncode == 3
        assert checked.stdout.splitlines()[0] == (
            f"FAILED database: {url}: its folder {tmp_path / 'file' / 'db'} cannot be made: "
            "Not a directory"
        )
        shown = run(url, tmp_path, "lists", "show")
        assert (shown.returncode, last_line(shown)) == (
            4,
            f"database unreachable at {url}: unable to open database file (its folder "
            f"{tmp_path / 'file' / 'db'} does not exist and could not be made)",
        )


def _run_without_key(
    database_url: str, tmp_path: Path, key_file: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(
        NEWSLETTER_DATABASE_URL=database_url,
        NEWSLETTER_SECRET_KEY_FILE=str(key_file),
        NEWSLETTER_LOG_LEVEL="WARNING",
        NEWSLETTER_AUTO_MIGRATE="false",
    )
    return subprocess.run(
        [NEWSLETTER, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip


def test_a_host_that_is_not_this_machine_s_names_the_host_option(
    database_url: str, tmp_path: Path
) -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: binding to it fails, nothing is sent.
    result = run(database_url, tmp_path, "serve", "--host", "192.0.2.1", "--port", str(free_port()))
    assert result.returncode == 2
    assert last_line(result).endswith("Cannot assign requested address; give another --host")
