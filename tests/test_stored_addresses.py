"""An address stored before the look-alike check (a word mixing Latin letters with Cyrillic
or Greek ones) stays reachable: its person can ask for an unsubscribe link by address and
leave, an operator can read, unsubscribe and erase it (API and command line), Mailgun's
events about it apply, and a backend's members import takes it. A new one is still refused:
a sign-up (JSON or form), an operator's addition, a CSV import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from app import db, lists, sync
from app.config import Settings
from app.models import KeyScope, Subscription, SubscriptionStatus, utcnow
from tests.conftest import SECRET, SmtpSink, api_key_headers, count_rows, link_in, make_settings
from tests.fake_mailgun import FakeMailgun, webhook
from tests.test_pages import stamp
from tests.test_webhooks import (
    ACCEPTED,
    LIST_ADDRESS,
    SIGNING_KEY,
    event,
    mailgun_list,
    status_of,
)

# `camille@` with a Cyrillic es and a (U+0441, U+0430): refused as a new address.
LOOK_ALIKE = "\u0441\u0430mille@example.org"
KEY = LOOK_ALIKE.casefold()
NEWSLETTER = str(Path(sys.executable).with_name("newsletter"))


@pytest.fixture
def mailgun_url() -> Iterator[str]:
    fake = FakeMailgun()
    fake.create_list(LIST_ADDRESS)
    with fake.serve() as url:
        yield url


@pytest.fixture
def settings(database_url: str, smtp: SmtpSink, mailgun_url: str) -> Settings:
    return make_settings(database_url, smtp_port=smtp.port, lists=[mailgun_list(mailgun_url)])


def store_confirmed(engine: sa.Engine, email: str = LOOK_ALIKE) -> None:
    """The row as an earlier version of the service stored it (no check to pass)."""
    with db.session_scope(engine) as session:
        mailing_list = lists.get(session, slug="bluehats")
        assert mailing_list.id is not None
        session.add(
            Subscription(
                list_id=mailing_list.id,
                email=email,
                email_key=email.casefold(),
                status=SubscriptionStatus.CONFIRMED,
                locale="fr",
                consent_version="v1",
                confirmed_at=utcnow(),
            )
        )


def subscription_status(engine: sa.Engine) -> str | None:
    with Session(engine) as session:
        row = session.exec(select(Subscription).where(Subscription.email_key == KEY)).first()
        return row.status if row else None


def subscription_keys(engine: sa.Engine) -> list[str]:
    with Session(engine) as session:
        return list(session.exec(select(Subscription.email_key)).all())


class TestAStoredLookAlike:
    @pytest.mark.parametrize("kind", ["json", "form"])
    def test_its_person_asks_for_an_unsubscribe_link_by_address_and_leaves(
        self, client: TestClient, smtp: SmtpSink, engine: sa.Engine, kind: str
    ) -> None:
        store_confirmed(engine)
        url = "/v1/lists/bluehats/unsubscriptions"
        if kind == "json":
            response = client.post(url, json={"email": LOOK_ALIKE})
            assert response.status_code == 202, response.text
        else:
            fields = {"email": LOOK_ALIKE, "form_stamp": stamp()}
            response = client.post(
                url, data=fields, headers={"accept": "text/html"}, follow_redirects=False
            )
            assert response.status_code == 303, response.text

        link = link_in(smtp.mail_to(LOOK_ALIKE, link="unsubscribe"), "unsubscribe")
        left = client.post(link, headers={"accept": "application/json"})
        assert left.json() == {"status": "unsubscribed", "list": "bluehats"}
        assert subscription_status(engine) == "unsubscribed"

    def test_an_operator_reads_unsubscribes_and_erases_it(
        self, client: TestClient, engine: sa.Engine
    ) -> None:
        store_confirmed(engine)
        headers = api_key_headers(engine, "operator", KeyScope.WRITE)
        path = quote(LOOK_ALIKE, safe="@")

        person = client.get(f"/v1/admin/people/{path}", headers=headers)
        assert person.status_code == 200, person.text
        assert person.json()["email"] == KEY
        assert [item["status"] for item in person.json()["subscriptions"]] == ["confirmed"]

        unsubscribed = client.post(
            f"/v1/admin/lists/bluehats/subscribers/{path}/unsubscribe",
            json={"reason": "asked by phone"},
            headers=headers,
        )
        assert unsubscribed.status_code == 200, unsubscribed.text
        assert unsubscribed.json()["status"] == "unsubscribed"

        erased = client.delete(f"/v1/admin/people/{path}", headers=headers)
        assert erased.status_code == 200, erased.text
        assert erased.json()["subscriptions"] == 1
        assert subscription_keys(engine) == []

    def test_the_command_line_shows_and_erases_it(
        self, client: TestClient, engine: sa.Engine, database_url: str, tmp_path: Path
    ) -> None:
        store_confirmed(engine)
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        env.update(
            NEWSLETTER_DATABASE_URL=database_url,
            NEWSLETTER_SECRET_KEY=SECRET,
            NEWSLETTER_LOG_LEVEL="WARNING",
        )

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [NEWSLETTER, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                timeout=60, check=False, stdin=subprocess.DEVNULL,
            )  # fmt: skip

        shown = run("people", "show", LOOK_ALIKE)
        assert shown.returncode == 0, shown.stderr
        person = json.loads(shown.stdout)
        assert person["email"] == KEY
        assert [item["status"] for item in person["subscriptions"]] == ["confirmed"]
        erased = run("people", "erase", LOOK_ALIKE, "--yes")
        assert erased.returncode == 0, erased.stderr
        assert subscription_keys(engine) == []

    @pytest.mark.parametrize(
        ("kind", "status"), [("unsubscribed", "unsubscribed"), ("complained", "complained")]
    )
    def test_a_mailgun_event_about_it_applies(
        self, client: TestClient, engine: sa.Engine, settings: Settings, kind: str, status: str
    ) -> None:
        store_confirmed(engine)
        response = client.post(
            "/v1/webhooks/mailgun", json=webhook(SIGNING_KEY, event(kind, LOOK_ALIKE))
        )
        assert response.status_code == 200
        assert response.json() == ACCEPTED
        assert status_of(settings.database_url, KEY) == status

    def test_a_backend_members_import_takes_it(self, client: TestClient, engine: sa.Engine) -> None:
        with db.session_scope(engine) as session:
            report = sync.import_members(
                session,
                list_slug="bluehats",
                remote={KEY: (LOOK_ALIKE, True)},
                backend_kind="mailgun",
                key=SECRET.encode(),
                now=utcnow(),
            )
        assert (report.confirmed, report.invalid) == (1, [])
        assert subscription_keys(engine) == [KEY]


class TestANewLookAlike:
    def test_a_sign_up_is_refused_as_json_and_as_a_form(
        self, client: TestClient, database_url: str
    ) -> None:
        url = "/v1/lists/bluehats/subscriptions"
        refused = client.post(url, json={"email": LOOK_ALIKE})
        assert refused.status_code == 422
        assert "look alike" in refused.json()["detail"]
        form = client.post(
            url, data={"email": LOOK_ALIKE, "form_stamp": stamp()}, follow_redirects=False
        )
        assert form.status_code == 422
        assert "look alike" in form.json()["detail"]
        assert count_rows(database_url, "subscription") == 0

    def test_an_operator_addition_and_a_csv_import_are_refused(
        self, client: TestClient, engine: sa.Engine, database_url: str
    ) -> None:
        headers = api_key_headers(engine, "operator", KeyScope.WRITE)
        added = client.post(
            "/v1/admin/lists/bluehats/subscribers",
            json={"email": LOOK_ALIKE, "mode": "invite"},
            headers=headers,
        )
        assert added.status_code == 422
        assert "look alike" in added.json()["detail"]
        imported = client.post(
            "/v1/admin/lists/bluehats/import",
            content=f"email,consent_source,consent_date\n{LOOK_ALIKE},paper form,2025-03-12\n",
            headers={**headers, "content-type": "text/csv"},
        )
        assert imported.status_code == 200, imported.text
        assert (imported.json()["created"], imported.json()["invalid"]) == (0, 1)
        assert "look alike" in imported.json()["errors"][0]["error"]
        assert count_rows(database_url, "subscription") == 0
