"""The block-list: managed through the admin API and the CLI; a blocked address (or one in a
blocked domain) gets the public answer every address gets and no mail; operators' additions
and imports refuse it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from app import addresses, blocklist, db, privacy
from app.models import (
    AuditEvent,
    BlockedEntry,
    BlockKind,
    ConsentEvent,
    OutboxJob,
    Subscription,
    utcnow,
)
from tests.conftest import POSTGRES_URL, SECRET, SmtpSink, count_rows, link_in, wait_until

NEWSLETTER = str(Path(sys.executable).with_name("newsletter"))
BLOCKS = "/v1/admin/blocks"
SUBSCRIBE = "/v1/lists/bluehats/subscriptions"
UNSUBSCRIBE = "/v1/lists/bluehats/unsubscriptions"
UNFINISHED = "outbox_job WHERE state IN ('pending', 'running')"


def _audit(engine: sa.Engine, action: str) -> list[AuditEvent]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(AuditEvent).where(AuditEvent.action == action).order_by(col(AuditEvent.id))
            ).all()
        )


def _block(client: TestClient, key: dict[str, str], kind: str, value: str) -> int:
    response = client.post(
        BLOCKS, json={"kind": kind, "value": value, "reason": "mail cannon"}, headers=key
    )
    assert response.status_code == 201, response.text
    entry_id: int = response.json()["id"]
    return entry_id


def run_cli(database_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(NEWSLETTER_DATABASE_URL=database_url, NEWSLETTER_SECRET_KEY=SECRET)
    return subprocess.run(
        [NEWSLETTER, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


class TestAdminApi:
    def test_add_list_remove_with_scopes_and_audit(
        self,
        client: TestClient,
        engine: sa.Engine,
        read_key: dict[str, str],
        write_key: dict[str, str],
    ) -> None:
        body = {"kind": "domain", "value": "@Spam.Example", "reason": "bot wave"}
        assert client.post(BLOCKS, json=body).status_code == 401
        assert client.get(BLOCKS).status_code == 401
        assert client.post(BLOCKS, json=body, headers=read_key).status_code == 403

        created = client.post(BLOCKS, json=body, headers=write_key)
        assert created.status_code == 201, created.text
        entry = created.json()
        assert (entry["kind"], entry["value"], entry["reason"]) == (
            "domain",
            "spam.example",
            "bot wave",
        )
        assert entry["created_by"] == "operator"
        again = client.post(BLOCKS, json=body, headers=write_key)
        assert again.status_code == 409

        address = {"kind": "address", "value": "Mallory@Example.ORG", "reason": "abuse report"}
        assert client.post(BLOCKS, json=address, headers=write_key).status_code == 201
        bad = {"kind": "address", "value": "not an address", "reason": "x"}
        assert client.post(BLOCKS, json=bad, headers=write_key).status_code == 422

        listed = client.get(BLOCKS, headers=read_key)
        assert listed.status_code == 200
        assert [(e["kind"], e["value"]) for e in listed.json()] == [
            ("address", "mallory@example.org"),
            ("domain", "spam.example"),
        ]

        assert client.delete(f"{BLOCKS}/{entry['id']}", headers=read_key).status_code == 403
        removed = client.delete(f"{BLOCKS}/{entry['id']}", headers=write_key)
        assert removed.status_code == 200
        assert removed.json()["value"] == "spam.example"
        assert client.delete(f"{BLOCKS}/{entry['id']}", headers=write_key).status_code == 404
        assert [e["value"] for e in client.get(BLOCKS, headers=read_key).json()] == [
            "mallory@example.org"
        ]

        assert [(a.actor, a.target, a.outcome) for a in _audit(engine, "block.add")] == [
            ("operator", "domain:spam.example", "ok"),
            ("operator", "domain:spam.example", "error:conflict"),
            ("operator", "address:mallory@example.org", "ok"),
        ]
        assert [(a.target, a.outcome) for a in _audit(engine, "block.remove")] == [
            (str(entry["id"]), "ok"),
            (str(entry["id"]), "error:not_found"),
        ]


class TestPublicEndpoints:
    def test_a_blocked_address_and_a_blocked_subdomain_get_the_same_202_and_no_mail(
        self,
        client: TestClient,
        smtp: SmtpSink,
        engine: sa.Engine,
        database_url: str,
        write_key: dict[str, str],
    ) -> None:
        _block(client, write_key, "address", "mallory@example.org")
        _block(client, write_key, "domain", "spam.example")
        # One request id for all: the service echoes it, so every header can be compared.
        headers = {"user-agent": "bot/1.0", "x-request-id": "probe"}

        answers = {
            email: client.post(SUBSCRIBE, json={"email": email}, headers=headers)
            for email in ("control@example.org", "Mallory@example.org", "x@mail.spam.example")
        }
        control = answers.pop("control@example.org")
        assert control.status_code == 202
        for email, answer in answers.items():
            assert answer.status_code == control.status_code, email
            assert answer.content == control.content, email
            assert answer.headers.items() == control.headers.items(), email

        # The control address's confirmation arrives; nothing for the blocked ones, even
        # once the worker has nothing left to do.
        smtp.mail_to("control@example.org", link="confirm")
        wait_until(lambda: count_rows(database_url, UNFINISHED) == 0)
        assert [m["To"] for m in smtp.messages] == ["control@example.org"]

        # Nothing about the blocked addresses but a ledger event under their keyed hash.
        with Session(engine) as session:
            emails = {row.email_key for row in session.exec(select(Subscription)).all()}
            assert emails == {"control@example.org"}
            blocked_events = session.exec(
                select(ConsentEvent).where(col(ConsentEvent.subscription_id).is_(None))
            ).all()
            assert {e.address_hash for e in blocked_events} == {
                privacy.address_hash("mallory@example.org", key=SECRET.encode()),
                privacy.address_hash("x@mail.spam.example", key=SECRET.encode()),
            }
            assert {e.status_after for e in blocked_events} == {"blocked"}
            assert {e.detail["blocked"] for e in blocked_events} == {"address", "domain"}
            assert all(e.user_agent == "bot/1.0" for e in blocked_events)
            for event in blocked_events:
                assert "mallory" not in str(event.model_dump())
                assert "spam.example" not in str(event.model_dump())

        # A sibling domain that merely ends the same way is not blocked.
        client.post(SUBSCRIBE, json={"email": "y@notspam.example"})
        smtp.mail_to("y@notspam.example", link="confirm")

    def test_unsubscribe_by_address_and_form_posts_answer_alike(
        self, client: TestClient, smtp: SmtpSink, write_key: dict[str, str], database_url: str
    ) -> None:
        _block(client, write_key, "domain", "spam.example")
        probe = {"x-request-id": "probe"}
        control = client.post(UNSUBSCRIBE, json={"email": "c@example.org"}, headers=probe)
        blocked = client.post(UNSUBSCRIBE, json={"email": "c@spam.example"}, headers=probe)
        assert (blocked.status_code, blocked.content) == (control.status_code, control.content)
        assert blocked.headers.items() == control.headers.items()

        form = {"email": "c@example.org", "locale": "en"}
        control = client.post(SUBSCRIBE, data=form, headers=probe, follow_redirects=False)
        blocked = client.post(
            SUBSCRIBE,
            data={**form, "email": "c@spam.example"},
            headers=probe,
            follow_redirects=False,
        )
        assert control.status_code == 303
        assert (blocked.status_code, blocked.content) == (control.status_code, control.content)
        assert blocked.headers.items() == control.headers.items()
        smtp.mail_to("c@example.org", link="confirm")
        wait_until(lambda: count_rows(database_url, UNFINISHED) == 0)
        assert [m["To"] for m in smtp.messages] == ["c@example.org"]

    def test_the_ordinary_work_is_rehearsed_and_undone_for_a_known_blocked_address(
        self,
        client: TestClient,
        smtp: SmtpSink,
        engine: sa.Engine,
        database_url: str,
        write_key: dict[str, str],
    ) -> None:
        # A confirmed subscriber whose address is blocked later: a new request would mean
        # an "already subscribed" mail and a new mail slot; the block leaves neither.
        client.post(SUBSCRIBE, json={"email": "ada@example.org"})
        client.post(link_in(smtp.mail_to("ada@example.org", link="confirm"), "confirm"))
        wait_until(lambda: count_rows(database_url, UNFINISHED) == 0)
        _block(client, write_key, "address", "ada@example.org")
        with Session(engine) as session:
            before = session.exec(select(Subscription)).one().model_dump()
        jobs = count_rows(database_url, "outbox_job")
        tokens = count_rows(database_url, "token")

        for path in (SUBSCRIBE, UNSUBSCRIBE):
            assert client.post(path, json={"email": "ada@example.org"}).status_code == 202
        with Session(engine) as session:
            assert session.exec(select(Subscription)).one().model_dump() == before
        assert count_rows(database_url, "outbox_job") == jobs
        assert count_rows(database_url, "token") == tokens
        assert count_rows(database_url, "consent_event WHERE status_after = 'blocked'") == 2
        assert [m["To"] for m in smtp.messages] == ["ada@example.org"]

    def test_a_mail_queued_before_the_block_is_not_sent(
        self, client: TestClient, smtp: SmtpSink, engine: sa.Engine, database_url: str
    ) -> None:
        # The worker is stopped so the mail waits in the queue while the block is added.
        client.app.state.worker.stop()  # type: ignore[attr-defined]
        client.post(SUBSCRIBE, json={"email": "late@spam.example"})
        with db.session_scope(engine) as session:
            session.add(
                BlockedEntry(kind="domain", value="spam.example", reason="r", created_by="t")
            )
        from app.mailer import make_mailer
        from app.worker import Worker

        settings = client.app.state.settings  # type: ignore[attr-defined]
        worker = Worker(engine=engine, settings=settings, mailer=make_mailer(settings.mailer))
        assert worker.run_once() == 1
        worker.stop()
        with Session(engine) as session:
            job = session.exec(select(OutboxJob)).one()
            assert job.state == "done"
        assert smtp.messages == []


class TestErasure:
    def test_erasure_clears_the_blocked_requests_evidence_and_the_block_stays(
        self,
        client: TestClient,
        engine: sa.Engine,
        write_key: dict[str, str],
        read_key: dict[str, str],
    ) -> None:
        _block(client, write_key, "address", "mallory@example.org")
        headers = {"user-agent": "bot/1.0", "referer": "https://code.gouv.fr/bluehats/"}
        answer = client.post(SUBSCRIBE, json={"email": "mallory@example.org"}, headers=headers)
        assert answer.status_code == 202
        hashed = privacy.address_hash("mallory@example.org", key=SECRET.encode())

        def evidence() -> list[tuple[str | None, str | None, str | None]]:
            with Session(engine) as session:
                events = session.exec(
                    select(ConsentEvent).where(ConsentEvent.address_hash == hashed)
                ).all()
                return [(e.ip, e.user_agent, e.source_url) for e in events]

        assert evidence() == [("testclient", "bot/1.0", "https://code.gouv.fr/bluehats/")]
        erased = client.delete("/v1/admin/people/mallory@example.org", headers=write_key)
        assert erased.status_code == 200, erased.text
        assert (erased.json()["subscriptions"], erased.json()["ledger_events"]) == (0, 1)
        assert evidence() == [(None, None, None)]
        # The operators' refusal outlives the erasure: the address is still blocked.
        blocks = client.get(BLOCKS, headers=read_key).json()
        assert [b["value"] for b in blocks] == ["mallory@example.org"]
        client.post(SUBSCRIBE, json={"email": "mallory@example.org"}, headers=headers)
        with Session(engine) as session:
            assert session.exec(select(Subscription)).all() == []


class TestOperators:
    def test_add_subscriber_and_import_refuse_blocked_addresses(
        self, client: TestClient, engine: sa.Engine, write_key: dict[str, str]
    ) -> None:
        _block(client, write_key, "address", "mallory@example.org")
        _block(client, write_key, "domain", "spam.example")
        for email in ("MALLORY@example.org", "a@deep.spam.example"):
            for mode, extra in (
                ("invite", {}),
                (
                    "confirmed",
                    {
                        "evidence": {
                            "source": "paper form",
                            "note": "meetup",
                            "consented_at": "2025-01-01",
                        }
                    },
                ),
            ):
                response = client.post(
                    "/v1/admin/lists/bluehats/subscribers",
                    json={"email": email, "mode": mode, **extra},
                    headers=write_key,
                )
                assert response.status_code == 409, response.text
                assert response.json()["error"] == "address_blocked"

        body = (
            "email,name,locale,attributes,consent_source,consent_date\n"
            "ok@example.org,,,,Paper form,2025-03-12\n"
            "mallory@example.org,,,,Paper form,2025-03-12\n"
            "b@spam.example,,,,Paper form,2025-03-12\n"
        )
        imported = client.post(
            "/v1/admin/lists/bluehats/import",
            content=body.encode(),
            params={"mode": "confirmed"},
            headers={**write_key, "content-type": "text/csv"},
        )
        assert imported.status_code == 200, imported.text
        result = imported.json()
        assert (result["created"], result["invalid"]) == (1, 2)
        assert [(e["line"], "block-list" in e["error"]) for e in result["errors"]] == [
            (3, True),
            (4, True),
        ]
        with Session(engine) as session:
            assert [r.email for r in session.exec(select(Subscription)).all()] == ["ok@example.org"]


class TestCommandLine:
    def test_block_add_list_remove_with_audit_and_exit_codes(
        self, client: TestClient, engine: sa.Engine, database_url: str, tmp_path: Path
    ) -> None:
        added = run_cli(database_url, tmp_path, "block", "add", "spam.example", "--reason", "bots")
        assert added.returncode == 0, added.stderr
        assert added.stdout.strip() == "domain spam.example blocked"
        again = run_cli(database_url, tmp_path, "block", "add", "spam.example", "--reason", "x")
        assert again.returncode == 1
        assert "already" in again.stderr
        bad = run_cli(database_url, tmp_path, "block", "add", "a@@b", "--reason", "x")
        assert bad.returncode == 2
        person = run_cli(
            database_url, tmp_path, "block", "add", "Eve@Example.org", "--reason", "report"
        )
        assert person.returncode == 0, person.stderr

        listed = run_cli(database_url, tmp_path, "block", "list")
        assert listed.returncode == 0, listed.stderr
        rows = [line.split("\t") for line in listed.stdout.splitlines()]
        assert [(r[0], r[1], r[2]) for r in rows] == [
            ("address", "eve@example.org", "report"),
            ("domain", "spam.example", "bots"),
        ]
        assert all(r[4].startswith("cli:") for r in rows)

        # The block applies to the running service at once.
        answer = client.post(SUBSCRIBE, json={"email": "z@spam.example"})
        assert answer.status_code == 202
        assert count_rows(database_url, "subscription") == 0

        removed = run_cli(database_url, tmp_path, "block", "remove", "spam.example")
        assert removed.returncode == 0, removed.stderr
        missing = run_cli(database_url, tmp_path, "block", "remove", "spam.example")
        assert missing.returncode == 1
        assert [line.split("\t")[1] for line in run_cli(
            database_url, tmp_path, "block", "list").stdout.splitlines()] == [
            "eve@example.org"
        ]  # fmt: skip
        actions = [(a.action, a.outcome) for a in _audit(engine, "block.add")] + [
            (a.action, a.outcome) for a in _audit(engine, "block.remove")
        ]
        assert actions == [
            ("block.add", "ok"),
            ("block.add", "error:conflict"),
            ("block.add", "ok"),
            ("block.remove", "ok"),
            ("block.remove", "error:not_found"),
        ]
        assert all(a.actor.startswith("cli:") for a in _audit(engine, "block.add"))


class TestDomainEntries:
    @pytest.mark.parametrize(
        ("value", "reason"),
        [
            ("notanything", "The domain is not valid. It should have a period."),
            ("a b.example", "The domain contains invalid characters: SPACE."),
            # email-validator's reason names the @-sign in a way no rewording fixes.
            ("-bad.example", "A domain entry is a domain name, such as example.org."),
        ],
    )
    def test_an_invalid_domain_is_explained_as_a_domain_not_an_address(
        self, value: str, reason: str
    ) -> None:
        with pytest.raises(addresses.InvalidAddress) as raised:
            blocklist.normalize(BlockKind.DOMAIN, value)
        assert str(raised.value) == reason


class TestOneTransaction:
    """The public path reads an empty block-list once per transaction (a group commit's)."""

    @pytest.mark.skipif(
        not POSTGRES_URL, reason="SQLite has one writer: nothing commits while a write runs"
    )
    def test_an_empty_list_is_read_once_and_a_block_applies_from_the_next_transaction(
        self, engine: sa.Engine
    ) -> None:
        with Session(engine) as reading:
            assert blocklist.match(reading, email_key="eve@spam.example") is None
            with db.session_scope(engine) as other:
                blocklist.add(
                    other, kind=BlockKind.DOMAIN, value="spam.example", reason="bots",
                    actor="operator", now=utcnow(),
                )  # fmt: skip
            # Committed meanwhile: this transaction read the list empty and keeps to it.
            assert blocklist.match(reading, email_key="mallory@spam.example") is None
        with Session(engine) as later:
            assert blocklist.match(later, email_key="mallory@spam.example") is BlockKind.DOMAIN
            assert blocklist.match(later, email_key="camille@example.org") is None

    def test_a_block_added_in_the_same_transaction_applies_at_once(self, engine: sa.Engine) -> None:
        with db.session_scope(engine) as session:
            assert blocklist.match(session, email_key="mallory@example.org") is None
            blocklist.add(
                session, kind=BlockKind.ADDRESS, value="mallory@example.org", reason="abuse",
                actor="operator", now=utcnow(),
            )  # fmt: skip
            assert blocklist.match(session, email_key="mallory@example.org") is BlockKind.ADDRESS
