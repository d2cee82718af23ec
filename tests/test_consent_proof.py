"""Proof of consent: the wordings are stored per list, version and language; a subscriber's
proof holds every ledger event with its evidence and the exact text they were shown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from app import consent, db, errors, formguard, lists
from app.config import Locale, Settings
from app.main import create_app
from app.models import (
    AuditEvent,
    ConsentWording,
    KeyScope,
    MailingList,
    Subscription,
    utcnow,
)
from tests.conftest import SECRET, SmtpSink, api_key_headers, link_in, make_settings

NEWSLETTER = str(Path(sys.executable).with_name("newsletter"))
# The catalogue's English wording (app/locales/en.json), for the default list.
CATALOGUE_EN = (
    "I agree to receive Gazette BlueHats by email, about every two months. I can unsubscribe "
    "at any time with the link at the bottom of every issue. My address is used for this "
    "newsletter only and is never shared."
)


def _key(engine: sa.Engine, scope: KeyScope = KeyScope.READ) -> dict[str, str]:
    return api_key_headers(engine, f"dpo-{scope.value}", scope)


def _subscribe_and_confirm(
    client: TestClient, smtp: SmtpSink, email: str, *, locale: str = "en"
) -> None:
    agent = {"user-agent": "Mozilla/5.0 (X11; Linux) Firefox/140.0"}
    response = client.post(
        "/v1/lists/bluehats/subscriptions",
        json={"email": email, "locale": locale},
        headers={**agent, "referer": "https://code.gouv.fr/fr/bluehats/"},
    )
    assert response.status_code == 202
    confirm = link_in(smtp.mail_to(email, link="confirm"), "confirm")
    assert client.post(confirm, headers={**agent, "accept": "application/json"}).status_code == 200


def _subscriber_id(engine: sa.Engine, email: str) -> int:
    with Session(engine) as session:
        row = session.exec(select(Subscription).where(Subscription.email_key == email)).one()
        assert row.id is not None
        return row.id


def _settings(database_url: str, smtp: SmtpSink, *, version: str, texts: dict[str, str]) -> Any:
    return make_settings(
        database_url,
        smtp_port=smtp.port,
        lists=[
            {
                "slug": "bluehats",
                "name": "Gazette BlueHats",
                "consent_version": version,
                "consent_text": texts,
            }
        ],
    )


class TestProofThroughTheApi:
    def test_subscribe_and_confirm_leave_a_proof_with_evidence_and_the_exact_wording(
        self, client: TestClient, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        _subscribe_and_confirm(client, smtp, "ada@example.org")
        subscriber = _subscriber_id(engine, "ada@example.org")
        path = f"/v1/admin/subscribers/{subscriber}/consent-proof"
        assert client.get(path).status_code == 401
        key = _key(engine)

        response = client.get(path, headers=key)
        assert response.status_code == 200, response.text
        proof = response.json()
        assert (proof["list"], proof["email"], proof["status"], proof["locale"]) == (
            "bluehats",
            "ada@example.org",
            "confirmed",
            "en",
        )
        assert [e["action"] for e in proof["ledger"]] == ["subscribe_requested", "confirmed"]
        for event in proof["ledger"]:
            assert event["ip"] == "testclient"  # the test client's peer address
            assert event["user_agent"] == "Mozilla/5.0 (X11; Linux) Firefox/140.0"
            assert event["consent_version"] == "2026-11"
        assert proof["ledger"][0]["source"] == "api"
        assert proof["ledger"][0]["source_url"] == "https://code.gouv.fr/fr/bluehats/"
        assert proof["ledger"][1]["source"] == "link"
        [wording] = proof["wordings"]
        assert (wording["version"], wording["locale"], wording["text"]) == (
            "2026-11",
            "en",
            CATALOGUE_EN,
        )

        text = client.get(path, headers={**key, "accept": "text/plain"})
        assert text.status_code == 200
        assert text.headers["content-type"].startswith("text/plain")
        for expected in (
            "Address:          ada@example.org",
            "Current status:   confirmed",
            "1. subscribe_requested at ",
            "2. confirmed at ",
            "IP address: testclient",
            "user agent: Mozilla/5.0 (X11; Linux) Firefox/140.0",
            f'"{CATALOGUE_EN}"',
        ):
            assert expected in text.text, expected
        assert client.get("/v1/admin/subscribers/999/consent-proof", headers=key).status_code == (
            404
        )
        with Session(engine) as session:
            audited = session.exec(
                select(AuditEvent)
                .where(AuditEvent.action == "subscriber.consent_proof")
                .order_by(col(AuditEvent.id))
            ).all()
        assert [(a.actor, a.target, a.outcome) for a in audited] == [
            ("dpo-read", str(subscriber), "ok"),
            ("dpo-read", str(subscriber), "ok"),
            ("dpo-read", "999", "error:not_found"),
        ]
        # By the header's weights: text only where it is preferred to JSON.
        for accept, kind in (
            ("application/json;q=0.5, text/plain", "text/plain"),
            ("text/plain;q=0, application/json", "application/json"),
            ("text/plain;q=0.2, application/json;q=0.9", "application/json"),
            ("text/plain, application/json", "application/json"),
            ("*/*", "application/json"),
        ):
            answer = client.get(path, headers={**key, "accept": accept})
            assert answer.headers["content-type"].startswith(kind), accept


class TestWordingVersions:
    def test_an_old_subscriber_keeps_the_old_text_after_a_new_version(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        old = _settings(
            database_url, smtp, version="v1", texts={"fr": "Texte A pour {list}", "en": "Text A"}
        )
        with TestClient(create_app(old)) as client:
            _subscribe_and_confirm(client, smtp, "old@example.org", locale="fr")
        new = _settings(
            database_url, smtp, version="v2", texts={"fr": "Texte B pour {list}", "en": "Text B"}
        )
        with TestClient(create_app(new)) as client:
            _subscribe_and_confirm(client, smtp, "new@example.org", locale="fr")
            key = _key(engine)
            proofs = {
                email: client.get(
                    f"/v1/admin/subscribers/{_subscriber_id(engine, email)}/consent-proof",
                    headers=key,
                ).json()
                for email in ("old@example.org", "new@example.org")
            }
        assert [(w["version"], w["locale"], w["text"]) for w in proofs["old@example.org"][
            "wordings"]] == [("v1", "fr", "Texte A pour Gazette BlueHats")]  # fmt: skip
        assert [(w["version"], w["text"]) for w in proofs["new@example.org"]["wordings"]] == [
            ("v2", "Texte B pour Gazette BlueHats")
        ]
        with Session(engine) as session:
            stored = session.exec(
                select(ConsentWording.version, ConsentWording.locale, ConsentWording.text).order_by(
                    col(ConsentWording.version), col(ConsentWording.locale)
                )
            ).all()
        assert stored == [
            ("v1", "en", "Text A"),
            ("v1", "fr", "Texte A pour Gazette BlueHats"),
            ("v2", "en", "Text B"),
            ("v2", "fr", "Texte B pour Gazette BlueHats"),
        ]

    def test_a_second_request_from_a_page_showing_a_new_version_proves_both_wordings(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        email = "twice@example.org"
        old = _settings(database_url, smtp, version="A", texts={"en": "Text A"})
        with TestClient(create_app(old)) as client:
            first = client.post(
                "/v1/lists/bluehats/subscriptions", json={"email": email, "locale": "en"}
            )
            assert first.status_code == 202
        new = _settings(database_url, smtp, version="B", texts={"en": "Text B"})
        with TestClient(create_app(new)) as client:
            # Still pending: the hosted form, now showing B, asks again.
            again = client.post(
                "/v1/lists/bluehats/subscriptions",
                data={
                    "email": email,
                    "locale": "en",
                    "consent_version": "B",
                    "form_stamp": formguard.issue(
                        key=SECRET.encode(), now=utcnow() - timedelta(seconds=10)
                    ),
                },
                follow_redirects=False,
            )
            assert again.status_code == 303, again.text
            confirm = link_in(smtp.mail_to(email, link="confirm"), "confirm")
            assert client.post(confirm, headers={"accept": "application/json"}).status_code == 200
            proof = client.get(
                f"/v1/admin/subscribers/{_subscriber_id(engine, email)}/consent-proof",
                headers=_key(engine),
            ).json()
        assert proof["consent_version"] == "B"
        assert [(e["action"], e["consent_version"]) for e in proof["ledger"]] == [
            ("subscribe_requested", "A"),
            ("subscribe_requested", "B"),
            ("confirmed", "B"),
        ]
        assert proof["ledger"][1]["detail"]["consent_version_shown"] == "B"
        assert [(w["version"], w["text"]) for w in proof["wordings"]] == [
            ("A", "Text A"),
            ("B", "Text B"),
        ]

    def test_the_start_refuses_a_changed_wording_under_an_unchanged_version(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        first = _settings(database_url, smtp, version="v1", texts={"fr": "Texte A"})
        with TestClient(create_app(first)):
            pass
        changed = _settings(database_url, smtp, version="v1", texts={"fr": "Texte A, revu"})
        with (
            pytest.raises(errors.ConsentWordingChanged, match=r"'bluehats' in 'fr'.*'v1'"),
            TestClient(create_app(changed)),
        ):
            pass
        # The same wording again starts as before.
        with TestClient(create_app(first)) as client:
            assert client.get("/healthz").status_code == 200

    @pytest.mark.parametrize("same_text", [True, False], ids=["same text", "other text"])
    def test_a_wording_another_start_wrote_meanwhile_is_compared_not_inserted_again(
        self, engine: sa.Engine, same_text: bool
    ) -> None:
        """Processes starting together: between this start's look and its write, another
        one records the same (list, version, language)."""
        with db.session_scope(engine) as session:
            created = lists.create(
                session, slug="races", name="Races", default_locale="fr", consent_version="1",
                confirm_ttl_seconds=3600, thank_you_url=None, landing_url=None, declared=[],
                now=utcnow(),
            )  # fmt: skip
            list_id = created.id
        text = consent.wording(list_name="Races", locale=Locale.FR, overrides={})
        raced: list[str] = []

        def other_start_first(conn: sa.Connection, _c: Any, statement: str, *_: Any) -> None:
            if raced or not statement.lstrip().upper().startswith("INSERT INTO CONSENT_WORDING"):
                return
            raced.append(statement)
            conn.execute(
                sa.insert(ConsentWording).values(
                    list_id=list_id, version="2", locale="fr", first_recorded_at=utcnow(),
                    text=text if same_text else "Un autre texte",
                )
            )  # fmt: skip

        def start() -> int:
            with db.session_scope(engine) as session:
                row = session.get(MailingList, list_id)
                assert row is not None
                row.consent_version = "2"
                return consent.record(session, mailing_list=row, overrides={}, now=utcnow())

        sa.event.listen(engine, "before_cursor_execute", other_start_first)
        try:
            if same_text:
                assert start() == 1  # the French row was there: only the English one is new
            else:
                with pytest.raises(errors.ConsentWordingChanged, match=r"'races' in 'fr'"):
                    start()
        finally:
            sa.event.remove(engine, "before_cursor_execute", other_start_first)
        assert raced
        with Session(engine) as session:
            texts = session.exec(
                select(ConsentWording.locale, ConsentWording.text).where(
                    ConsentWording.list_id == list_id, ConsentWording.version == "2"
                )
            ).all()
        assert sorted(texts) == ([("en", consent.wording(list_name="Races", locale=Locale.EN,
                                  overrides={})), ("fr", text)] if same_text else [])  # fmt: skip

    def test_lists_created_and_changed_through_the_api_record_their_wording(
        self, client: TestClient, engine: sa.Engine
    ) -> None:
        key = _key(engine, KeyScope.WRITE)
        created = client.post(
            "/v1/admin/lists",
            json={"slug": "infolettre", "name": "Infolettre", "consent_version": "1"},
            headers=key,
        )
        assert created.status_code == 201, created.text
        renamed = client.patch("/v1/admin/lists/infolettre", json={"name": "Lettre"}, headers=key)
        # The wording names the list: a new name under the same version is refused.
        assert renamed.status_code == 409
        assert renamed.json()["error"] == "consent_wording_changed"
        # Told why, as the operator only changed the name.
        assert (
            "consent_version stayed '1' (it names the list, whose name changed). Give"
            in renamed.json()["detail"]
        )
        bumped = client.patch(
            "/v1/admin/lists/infolettre",
            json={"name": "Lettre", "consent_version": "2"},
            headers=key,
        )
        assert bumped.status_code == 200, bumped.text
        with Session(engine) as session:
            texts = {
                (row.version, row.locale): row.text
                for row in session.exec(select(ConsentWording)).all()
                if "Infolettre" in row.text or "Lettre" in row.text
            }
        assert set(texts) == {("1", "fr"), ("1", "en"), ("2", "fr"), ("2", "en")}
        assert "Infolettre" in texts[("1", "en")]
        assert "receive Lettre by email" in texts[("2", "en")]


class TestCommandLine:
    def test_proof_by_address_or_id_as_text_or_json(
        self,
        client: TestClient,
        smtp: SmtpSink,
        engine: sa.Engine,
        database_url: str,
        settings: Settings,
        tmp_path: Path,
    ) -> None:
        _subscribe_and_confirm(client, smtp, "ada@example.org")
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        env.update(NEWSLETTER_DATABASE_URL=database_url, NEWSLETTER_SECRET_KEY=SECRET)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [NEWSLETTER, "subscriber", "proof", *args], env=env, cwd=tmp_path,
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip

        by_address = cli("Ada@example.org", "--list", "bluehats")
        assert by_address.returncode == 0, by_address.stderr
        assert "2. confirmed at " in by_address.stdout
        assert f'"{CATALOGUE_EN}"' in by_address.stdout
        subscriber = _subscriber_id(engine, "ada@example.org")
        by_id = cli(str(subscriber), "--list", "bluehats", "--json")
        assert by_id.returncode == 0, by_id.stderr
        proof = json.loads(by_id.stdout)
        assert [e["action"] for e in proof["ledger"]] == ["subscribe_requested", "confirmed"]
        assert proof["wordings"][0]["text"] == CATALOGUE_EN
        assert cli("nobody@example.org", "--list", "bluehats").returncode == 1
        # A list that exists, without this subscriber: refused (1); one that does not exist
        # is bad input (2), by id as by address.
        made = client.post(
            "/v1/admin/lists",
            json={"slug": "other", "name": "Other"},
            headers=_key(engine, KeyScope.WRITE),
        )
        assert made.status_code == 201, made.text
        elsewhere = cli(str(subscriber), "--list", "other")
        assert (elsewhere.returncode, elsewhere.stderr) == (
            1,
            f"Subscriber {subscriber} is not on the list 'other'.\n",
        )
        for who in (str(subscriber), "ada@example.org"):
            unknown = cli(who, "--list", "nope")
            assert (unknown.returncode, unknown.stderr) == (
                2,
                "no list 'nope' (known: bluehats, other)\n",
            )
        assert cli("not an address", "--list", "bluehats").returncode == 2
        with Session(engine) as session:
            actors = session.exec(
                select(AuditEvent.actor).where(AuditEvent.action == "subscriber.consent_proof")
            ).all()
        assert len(actors) == 6
        assert all(actor.startswith("cli:") for actor in actors)
