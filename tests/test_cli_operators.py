"""The operators' read and queue commands, run as operators run them (subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from app import db
from app.models import AuditEvent, JobKind, JobState, OutboxJob, Subscription, utcnow
from tests.conftest import SECRET, SmtpSink, link_in

NEWSLETTER = str(Path(sys.executable).with_name("newsletter"))


def run(database_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(NEWSLETTER_DATABASE_URL=database_url, NEWSLETTER_SECRET_KEY=SECRET)
    return subprocess.run(
        [NEWSLETTER, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


class TestOperatorCommands:
    def test_search_show_stats_jobs_audit_and_lists(
        self,
        client: TestClient,
        smtp: SmtpSink,
        database_url: str,
        engine: sa.Engine,
        tmp_path: Path,
    ) -> None:
        for email in ("ada@example.org", "bob@example.org"):
            client.post("/v1/lists/bluehats/subscriptions", json={"email": email})
        client.post(link_in(smtp.mail_to("ada@example.org", link="confirm"), "confirm"))

        found = run(database_url, tmp_path, "subscriber", "search", "--list", "bluehats",
                    "--status", "confirmed")  # fmt: skip
        assert found.returncode == 0, found.stderr
        assert found.stdout.splitlines()[0].startswith("ada@example.org\tconfirmed\tfr\t")
        assert len(found.stdout.splitlines()) == 1
        paged = run(database_url, tmp_path, "subscriber", "search", "--list", "bluehats",
                    "--limit", "1")  # fmt: skip
        assert "next page: --cursor " in paged.stderr
        bad = run(database_url, tmp_path, "subscriber", "search", "--list", "bluehats",
                  "--status", "happy")  # fmt: skip
        assert bad.returncode == 2
        # A language in another case is that language; one the service does not speak is
        # refused, rather than an empty page.
        french = run(database_url, tmp_path, "subscriber", "search", "--list", "bluehats",
                     "--status", "confirmed", "--locale", " FR")  # fmt: skip
        assert french.stdout == found.stdout
        german = run(database_url, tmp_path, "subscriber", "search", "--list", "bluehats",
                     "--locale", "de")  # fmt: skip
        assert (german.returncode, german.stderr) == (2, "--locale must be one of fr, en\n")

        shown = run(database_url, tmp_path, "subscriber", "show", "ada@example.org",
                    "--list", "bluehats")  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        record = json.loads(shown.stdout)
        assert [e["action"] for e in record["ledger"]] == ["subscribe_requested", "confirmed"]
        missing = run(database_url, tmp_path, "subscriber", "show", "nobody@example.org",
                      "--list", "bluehats")  # fmt: skip
        assert missing.returncode == 1

        counts = run(database_url, tmp_path, "stats", "--list", "bluehats")
        assert json.loads(counts.stdout)["by_status"] == {"confirmed": 1, "pending": 1}

        assert run(database_url, tmp_path, "jobs", "failed").returncode == 0
        with db.session_scope(engine) as session:
            session.add(
                OutboxJob(
                    kind=JobKind.SYNC,
                    payload={},
                    state=JobState.DEAD,
                    attempts=10,
                    next_attempt_at=utcnow(),
                    last_error="HTTP 400 from the backend",
                )
            )
        dead = run(database_url, tmp_path, "jobs", "failed", "--state", "dead")
        assert dead.returncode == 3
        assert "HTTP 400 from the backend" in dead.stdout
        assert run(database_url, tmp_path, "jobs", "retry").returncode == 2
        retried = run(database_url, tmp_path, "jobs", "retry", "--all")
        assert retried.returncode == 0
        assert retried.stdout.startswith("1 job(s)")
        with db.session_scope(engine) as session:
            dead_job = OutboxJob(
                kind=JobKind.SYNC,
                payload={},
                state=JobState.DEAD,
                attempts=10,
                next_attempt_at=utcnow(),
                last_error="HTTP 400 from the backend",
            )
            session.add(dead_job)
            session.flush()
            dead_id = dead_job.id
        # An id that is no failed job is named, even beside one that was retried.
        partly = run(database_url, tmp_path, "jobs", "retry", "--id", str(dead_id),
                     "--id", "99999")  # fmt: skip
        assert partly.returncode == 1
        assert partly.stdout == "1 job(s) back in the queue\n"
        assert partly.stderr == "no failed job with id 99999 (unknown, done or running)\n"

        made = run(database_url, tmp_path, "lists", "create", "events", "--name", "Événements")
        assert made.returncode == 0, made.stderr
        assert run(database_url, tmp_path, "lists", "create", "Bad Slug", "--name", "x"
                   ).returncode == 2  # fmt: skip
        changed = run(database_url, tmp_path, "lists", "update", "events",
                      "--consent-version", "2027-01")  # fmt: skip
        assert changed.returncode == 0, changed.stderr
        declared = run(database_url, tmp_path, "lists", "update", "bluehats", "--name", "x")
        assert declared.returncode == 1
        shown_lists = run(database_url, tmp_path, "lists", "show").stdout
        assert "events\tÉvénements\tfr\t2027-01\tnone" in shown_lists

        log = run(database_url, tmp_path, "audit", "--action", "job.retry_all")
        assert "\tjob.retry_all\t" in log.stdout
        # --until bounds the log as the API's `until` does: nothing before 2000.
        old = run(database_url, tmp_path, "audit", "--until", "2000-01-01")
        assert (old.returncode, old.stdout) == (0, "")
        recent = run(
            database_url, tmp_path, "audit", "--since", "2000-01-01", "--until", "2100-01-01"
        )
        assert "\tjob.retry_all\t" in recent.stdout
        with Session(engine) as session:
            actions = {e.action for e in session.exec(select(AuditEvent)).all()}
        assert {"subscriber.read", "job.retry_all", "list.create", "list.update"} <= actions
        with Session(engine) as session:
            updates = session.exec(
                select(AuditEvent).where(AuditEvent.action == "list.update")
            ).all()
        assert [e.detail for e in updates] == [
            {"changes": {"consent_version": "2027-01"}},
            {"changes": {"name": "x"}, "detail": updates[1].detail["detail"]},
        ]

    def test_the_search_takes_the_apis_confirmed_after_and_before_and_is_audited(
        self,
        client: TestClient,
        smtp: SmtpSink,
        database_url: str,
        engine: sa.Engine,
        tmp_path: Path,
    ) -> None:
        for email in ("ada@example.org", "bob@example.org", "cy@example.org"):
            client.post("/v1/lists/bluehats/subscriptions", json={"email": email})
            client.post(link_in(smtp.mail_to(email, link="confirm"), "confirm"))
        with engine.begin() as connection:
            for email, confirmed_at in (
                ("ada@example.org", "2025-01-10T10:00:00+00:00"),
                ("bob@example.org", "2025-02-10T10:00:00+00:00"),
                ("cy@example.org", "2025-03-10T10:00:00+00:00"),
            ):
                connection.execute(
                    sa.update(Subscription)
                    .where(col(Subscription.email) == email)
                    .values(confirmed_at=datetime.fromisoformat(confirmed_at))
                )

        def found(*filters: str) -> list[str]:
            result = run(database_url, tmp_path, "subscriber", "search", "--list", "bluehats",
                         *filters)  # fmt: skip
            assert result.returncode == 0, (filters, result.stderr)
            return [line.split("\t")[0] for line in result.stdout.splitlines()]

        assert found("--confirmed-after", "2025-02-10T10:00:00Z") == [
            "bob@example.org", "cy@example.org"
        ]  # fmt: skip
        assert found("--confirmed-before", "2025-02-10T10:00:00Z") == ["ada@example.org"]
        assert found("--confirmed-after", "2025-02-01", "--confirmed-before", "2025-03-01") == [
            "bob@example.org"
        ]
        swapped = run(database_url, tmp_path, "subscriber", "search", "--list", "bluehats",
                      "--confirmed-after", "2025-03-01",
                      "--confirmed-before", "2025-02-01")  # fmt: skip
        assert swapped.returncode == 2
        # In the options' names, as the operator typed them.
        assert "--confirmed-after (2025-03-01T00:00:00+00:00) is not before --confirmed-before" in (
            swapped.stderr
        )
        # A read of personal data, audited with its filters as the API's search is.
        with Session(engine) as session:
            searches = session.exec(
                select(AuditEvent)
                .where(AuditEvent.action == "subscribers.search")
                .order_by(col(AuditEvent.id))
            ).all()
        assert [(e.actor[:4], e.target, e.outcome) for e in searches] == [
            ("cli:", "bluehats", "ok")
        ] * 3
        assert searches[2].detail == {
            "filters": {
                "confirmed_after": "2025-02-01T00:00:00+00:00",
                "confirmed_before": "2025-03-01T00:00:00+00:00",
            },
            "cursor": False,
        }

    def test_a_list_created_without_a_consent_version_has_the_apis_default(
        self,
        client: TestClient,
        write_key: dict[str, str],
        database_url: str,
        tmp_path: Path,
    ) -> None:
        by_api = client.post(
            "/v1/admin/lists", json={"slug": "by-api", "name": "By API"}, headers=write_key
        )
        assert by_api.status_code == 201, by_api.text
        by_cli = run(database_url, tmp_path, "lists", "create", "by-cli", "--name", "By CLI")
        assert by_cli.returncode == 0, by_cli.stderr
        shown = {
            line.split("\t")[0]: line.split("\t")[3]
            for line in run(database_url, tmp_path, "lists", "show").stdout.splitlines()
        }
        # The same as a list the settings declare without one.
        assert shown["by-cli"] == shown["by-api"] == shown["bluehats"] == "2026-11"


class TestAnAddressNotFound:
    """Every command that looks an address up exits 1 when it finds nothing there (one line
    on stderr), 2 when the address or the list is not valid input, 0 when it found it."""

    def test_each_command_exits_1_for_an_address_it_does_not_hold(
        self, database_url: str, tmp_path: Path
    ) -> None:
        cases = [
            ("subscriber", "show", "nobody@example.org", "--list", "bluehats"),
            ("subscriber", "proof", "nobody@example.org", "--list", "bluehats"),
            (
                "subscriber",
                "unsubscribe",
                "nobody@example.org",
                "--list",
                "bluehats",
                "--reason",
                "x",
            ),
            ("people", "show", "nobody@example.org"),
            ("block", "remove", "nobody@example.org"),
        ]
        for args in cases:
            result = run(database_url, tmp_path, *args)
            assert result.returncode == 1, (args, result.stdout, result.stderr)
            assert result.stderr.count("\n") == 1, (args, result.stderr)

    def test_people_show_prints_what_it_holds_and_says_when_that_is_nothing(
        self, database_url: str, tmp_path: Path
    ) -> None:
        unknown = run(database_url, tmp_path, "people", "show", "Nobody@Example.org")
        assert unknown.returncode == 1
        assert unknown.stderr == (
            "nothing held about nobody@example.org: no subscription on any list, no job, "
            "no erasure\n"
        )
        # The answer to an access request all the same, with the audit log's mentions.
        assert json.loads(unknown.stdout)["subscriptions"] == []

        added = run(database_url, tmp_path, "subscriber", "add", "ada@example.org",
                    "--list", "bluehats")  # fmt: skip
        assert added.returncode == 0, added.stderr
        held = run(database_url, tmp_path, "people", "show", "ADA@example.org")
        assert (held.returncode, held.stderr) == (0, "")
        assert [s["list"] for s in json.loads(held.stdout)["subscriptions"]] == ["bluehats"]

        erased = run(database_url, tmp_path, "people", "erase", "ada@example.org", "--yes")
        assert erased.returncode == 0, erased.stderr
        # An erased address is held as its tombstone and its hashed ledger.
        after = run(database_url, tmp_path, "people", "show", "ada@example.org")
        assert (after.returncode, after.stderr) == (0, "")
        assert json.loads(after.stdout)["erased"] is True

    def test_bad_input_exits_2(self, database_url: str, tmp_path: Path) -> None:
        cases = [
            ("subscriber", "show", "nobody@example.org", "--list", "nope"),
            ("subscriber", "proof", "nobody@example.org", "--list", "nope"),
            ("people", "show", "nobody@"),
            ("people", "erase", "nobody@", "--yes"),
        ]
        for args in cases:
            result = run(database_url, tmp_path, *args)
            assert result.returncode == 2, (args, result.stdout, result.stderr)
            assert result.stderr.count("\n") == 1, (args, result.stderr)


class TestAnEmptyPeriodNamesTheOptions:
    def test_stats_and_audit_name_since_and_until_as_typed(
        self, database_url: str, tmp_path: Path
    ) -> None:
        # As the search names --created-after: the API's parameter names left the operator
        # to guess which option was meant.
        for command in (("stats", "--list", "bluehats"), ("audit",)):
            result = run(database_url, tmp_path, *command, "--since", "2026-12-01",
                         "--until", "2026-11-01T00:00:00+00:00")  # fmt: skip
            assert (result.returncode, result.stdout) == (2, ""), command
            assert result.stderr == (
                "--since (2026-12-01T00:00:00+00:00) is not before --until "
                "(2026-11-01T00:00:00+00:00): the period is empty; give --since before --until.\n"
            ), command
