"""Operators' actions and data protection: lists made through the API, subscribers added
(invited, or confirmed with evidence) and unsubscribed with a reason, access to everything
held about an address, and erasure down to the last column of the last table; the same
through the `newsletter` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, SQLModel, col, select

from app import db, lists, outbox, sync
from app.backends.base import Member, RetryableSyncError
from app.config import Settings
from app.mailer import make_mailer
from app.main import create_app
from app.models import (
    AuditEvent,
    ConsentEvent,
    ErasedAddress,
    JobKind,
    JobState,
    KeyScope,
    OutboxJob,
    Subscription,
    utcnow,
)
from app.worker import Worker
from tests.conftest import SECRET, SmtpSink, api_key_headers, link_in, make_settings, wait_until
from tests.test_sync import MemoryBackend

NEWSLETTER = str(Path(sys.executable).with_name("newsletter"))
EVIDENCE = {
    "source": "paper form, BlueHats stand at the Open Source Experience",
    "note": "form no. 42, scanned in the DINUM drive",
    "consented_at": "2025-12-04",
}


def _ledger(engine: sa.Engine, email_key: str) -> list[ConsentEvent]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(ConsentEvent)
                .join(Subscription, col(Subscription.id) == col(ConsentEvent.subscription_id))
                .where(Subscription.email_key == email_key)
                .order_by(col(ConsentEvent.id))
            ).all()
        )


def _jobs(engine: sa.Engine, kind: JobKind | None = None) -> list[OutboxJob]:
    with Session(engine) as session:
        query = select(OutboxJob).order_by(col(OutboxJob.id))
        if kind is not None:
            query = query.where(OutboxJob.kind == kind)
        return list(session.exec(query).all())


def _audit(engine: sa.Engine) -> list[AuditEvent]:
    with Session(engine) as session:
        return list(session.exec(select(AuditEvent).order_by(col(AuditEvent.id))).all())


def _add(
    client: TestClient, headers: dict[str, str], email: str, *, slug: str = "bluehats", **body: Any
) -> Any:
    body = {"email": email, "mode": "confirmed", "evidence": EVIDENCE} | body
    return client.post(f"/v1/admin/lists/{slug}/subscribers", json=body, headers=headers)


# Lists ------------------------------------------------------------------------------------


class TestLists:
    def test_a_list_made_through_the_api_is_created_changed_and_takes_subscriptions(
        self, client: TestClient, write_key: dict[str, str], engine: sa.Engine
    ) -> None:
        created = client.post(
            "/v1/admin/lists",
            json={"slug": "bluehats-events", "name": "Événements BlueHats"},
            headers=write_key,
        )
        assert created.status_code == 201, created.text
        assert created.json() | {"name": "-"} == {
            "slug": "bluehats-events",
            "name": "-",
            "default_locale": "fr",
            "consent_version": "2026-11",
            "confirm_ttl_seconds": 48 * 3600,
            "thank_you_url": None,
            "landing_url": None,
            "backend": "none",
            "declared_in_settings": False,
        }
        changed = client.patch(
            "/v1/admin/lists/bluehats-events",
            json={
                "name": "BlueHats events",
                "default_locale": "en",
                "confirm_ttl_seconds": 7200,
                "thank_you_url": "https://code.gouv.fr/merci",
                "consent_version": "2026-12",
            },
            headers=write_key,
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["thank_you_url"] == "https://code.gouv.fr/merci"
        assert changed.json()["confirm_ttl_seconds"] == 7200
        cleared = client.patch(
            "/v1/admin/lists/bluehats-events", json={"thank_you_url": None}, headers=write_key
        )
        assert cleared.json()["thank_you_url"] is None
        assert cleared.json()["name"] == "BlueHats events"
        listed = client.get("/v1/admin/lists", headers=write_key).json()
        assert [item["slug"] for item in listed] == ["bluehats", "bluehats-events"]
        assert [item["declared_in_settings"] for item in listed] == [True, False]
        subscribed = client.post(
            "/v1/lists/bluehats-events/subscriptions", json={"email": "ada@example.org"}
        )
        assert subscribed.status_code == 202
        [event] = _ledger(engine, "ada@example.org")
        assert event.consent_version == "2026-12"
        entries = _audit(engine)
        actions = [(a.action, a.target, a.outcome) for a in entries]
        assert actions == [
            ("list.create", "bluehats-events", "ok"),
            ("list.update", "bluehats-events", "ok"),
            ("list.update", "bluehats-events", "ok"),
        ]
        # Where a list's pages send its visitors is in the log, with who set it.
        assert entries[0].detail["settings"]["name"] == "Événements BlueHats"
        assert entries[0].detail["settings"]["thank_you_url"] is None
        assert entries[1].detail == {
            "changes": {
                "name": "BlueHats events",
                "default_locale": "en",
                "confirm_ttl_seconds": 7200,
                "thank_you_url": "https://code.gouv.fr/merci",
                "consent_version": "2026-12",
            }
        }
        assert entries[2].detail == {"changes": {"thank_you_url": None}}

    def test_a_list_declared_in_the_settings_is_read_only_through_the_api(
        self, client: TestClient, write_key: dict[str, str]
    ) -> None:
        response = client.patch(
            "/v1/admin/lists/bluehats", json={"name": "Other"}, headers=write_key
        )
        assert response.status_code == 409
        assert "declared in the settings" in response.json()["detail"]
        again = client.post(
            "/v1/admin/lists", json={"slug": "bluehats", "name": "Again"}, headers=write_key
        )
        assert again.status_code == 409
        assert "declared in the settings" in again.json()["detail"]

    def test_refusals(
        self, client: TestClient, write_key: dict[str, str], read_key: dict[str, str]
    ) -> None:
        body = {"slug": "drafts", "name": "Drafts"}
        assert client.post("/v1/admin/lists", json=body, headers=write_key).status_code == 201
        duplicate = client.post("/v1/admin/lists", json=body, headers=write_key)
        assert duplicate.status_code == 409
        assert "already exists" in duplicate.json()["detail"]
        # In words, not as the pattern '^[a-z0-9][a-z0-9-]{0,62}$'.
        capitals = client.post(
            "/v1/admin/lists", json={"slug": "Drafts", "name": "x"}, headers=write_key
        )
        assert (capitals.status_code, capitals.json()) == (
            422,
            {
                "error": "validation_error",
                "detail": "slug: a list's name is lowercase letters, digits and dashes, starting "
                "with a letter or a digit, at most 63 of them (as bluehats or gazette-bluehats)",
            },
        )
        for bad in (
            {"slug": "Not A Slug", "name": "x"},
            {"slug": "ok", "name": ""},
            {"slug": "ok", "name": "x", "confirm_ttl_seconds": 10},
            {"slug": "ok", "name": "x", "backend": "mailgun"},
            {"slug": "ok", "name": "x", "landing_url": "not a url"},
        ):
            response = client.post("/v1/admin/lists", json=bad, headers=write_key)
            assert response.status_code == 422, bad
            assert response.json()["error"] == "validation_error"
        for bad in ({"name": None}, {"confirm_ttl_seconds": None}, {"slug": "renamed"}):
            response = client.patch("/v1/admin/lists/drafts", json=bad, headers=write_key)
            assert response.status_code == 422, bad
        assert (
            client.patch("/v1/admin/lists/nope", json={"name": "x"}, headers=write_key).status_code
            == 404
        )
        assert client.post("/v1/admin/lists", json=body, headers=read_key).status_code == 403
        assert (
            client.patch("/v1/admin/lists/drafts", json={"name": "x"}, headers=read_key).status_code
            == 403
        )


# Subscribers ------------------------------------------------------------------------------


class TestAddSubscriber:
    def test_an_invitation_is_the_double_opt_in_signed_by_the_operator(
        self, client: TestClient, smtp: SmtpSink, write_key: dict[str, str], engine: sa.Engine
    ) -> None:
        response = client.post(
            "/v1/admin/lists/bluehats/subscribers",
            json={"email": "Camille@example.org", "mode": "invite", "locale": "en"},
            headers=write_key,
        )
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "pending"
        mail = smtp.mail_to("Camille@example.org", link="confirm")
        confirmed = client.post(link_in(mail, "confirm"), headers={"accept": "application/json"})
        assert confirmed.json()["status"] == "confirmed"
        first, second = _ledger(engine, "camille@example.org")
        assert (first.action, first.source, first.detail["operator"]) == (
            "subscribe_requested",
            "operator",
            "operator",
        )
        assert second.action == "confirmed"
        [event] = _audit(engine)
        assert (event.actor, event.action, event.target) == (
            "operator",
            "subscriber.add.invite",
            "bluehats:Camille@example.org",
        )

    def test_an_invitation_to_an_address_that_left_answers_its_new_state(
        self, client: TestClient, smtp: SmtpSink, write_key: dict[str, str], engine: sa.Engine
    ) -> None:
        invite = {"email": "back@example.org", "mode": "invite"}
        url = "/v1/admin/lists/bluehats/subscribers"
        assert client.post(url, json=invite, headers=write_key).json()["status"] == "pending"
        left = client.post(
            f"{url}/back@example.org/unsubscribe", json={"reason": "asked"}, headers=write_key
        )
        assert left.json()["status"] == "unsubscribed"
        again = client.post(url, json={**invite, "locale": "en"}, headers=write_key)
        assert again.status_code == 200, again.text
        assert (again.json()["status"], again.json()["locale"]) == ("pending", "en")
        shown = client.get(f"{url}/back@example.org", headers=write_key).json()
        assert (shown["status"], shown["locale"]) == ("pending", "en")
        assert [event.status_after for event in _ledger(engine, "back@example.org")] == [
            "pending",
            "unsubscribed",
            "pending",
        ]

    def test_a_confirmed_addition_records_the_evidence_and_syncs_without_a_mail(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = make_settings(database_url, smtp_port=smtp.port, run_worker=False)
        with TestClient(create_app(settings)) as client:
            headers = api_key_headers(engine, "operator", KeyScope.WRITE)
            response = _add(client, headers, "Grace@Example.org", attributes={"name": "Grace"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["email"], body["status"]) == ("Grace@example.org", "confirmed")
        assert body["attributes"] == {"name": "Grace"}
        [event] = _ledger(engine, "grace@example.org")
        assert (event.action, event.status_after, event.source) == (
            "confirmed",
            "confirmed",
            "operator",
        )
        assert event.detail == {
            "operator": "operator",
            "evidence_source": EVIDENCE["source"],
            "note": EVIDENCE["note"],
            "consented_at": "2025-12-04",
        }
        assert [job.kind for job in _jobs(engine)] == ["sync"]
        backend = MemoryBackend()
        worker = Worker(
            engine=engine,
            settings=settings,
            mailer=make_mailer(settings.mailer),
            list_backends={"bluehats": backend},
        )
        worker.run_once()
        worker.stop()
        assert backend.calls == [("add", ["Grace@example.org"])]
        assert backend.held["grace@example.org"][2]["unsubscribe_url"].startswith(
            "http://testserver/v1/unsubscribe/"
        )
        assert smtp.messages == []

    def test_an_address_already_confirmed_is_a_clear_conflict(
        self, client: TestClient, write_key: dict[str, str]
    ) -> None:
        assert _add(client, write_key, "grace@example.org").status_code == 200
        for mode in ("confirmed", "invite"):
            extra = {"evidence": None} if mode == "invite" else {}
            response = _add(client, write_key, "GRACE@example.org", mode=mode, **extra)
            assert response.status_code == 409, mode
            assert response.json()["detail"] == (
                "This address is already a confirmed subscriber of 'bluehats'; nothing to do."
            )

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"evidence": None}, "evidence (source, note, consented_at) is required"),
            ({"evidence": EVIDENCE | {"note": " "}}, "evidence.note"),
            ({"evidence": {"source": "x", "note": "y"}}, "evidence.consented_at"),
            ({"evidence": EVIDENCE | {"consented_at": "2999-01-01"}}, "must not be in the"),
            # An empty date in a spreadsheet, or a typo: no proof of a consent given then.
            ({"evidence": EVIDENCE | {"consented_at": "0001-01-01"}}, "is before 1990-01-01"),
            ({"evidence": EVIDENCE | {"consented_at": "1970-01-01"}}, "is before 1990-01-01"),
            ({"evidence": EVIDENCE | {"consented_at": "yesterday"}}, "evidence.consented_at"),
            ({"mode": "invite"}, "evidence goes with mode confirmed"),
            ({"mode": "import"}, "mode"),
            ({"email": "not an address"}, "email"),
            ({"attributes": {"Bad Name": "x"}}, "attribute name"),
        ],
    )
    def test_bad_evidence_or_input_is_422(
        self,
        client: TestClient,
        write_key: dict[str, str],
        engine: sa.Engine,
        change: dict[str, Any],
        message: str,
    ) -> None:
        email = change.pop("email", "grace@example.org")
        response = _add(client, write_key, email, **change)
        assert response.status_code == 422, response.text
        assert message in response.json()["detail"]
        with Session(engine) as session:
            assert session.exec(select(Subscription)).all() == []

    def test_an_unknown_list_is_404_and_a_read_key_403(
        self, client: TestClient, write_key: dict[str, str], read_key: dict[str, str]
    ) -> None:
        assert _add(client, write_key, "a@example.org", slug="nope").status_code == 404
        assert _add(client, read_key, "a@example.org").status_code == 403

    def test_a_consent_older_than_the_unsubscription_is_refused_a_newer_one_accepted(
        self, client: TestClient, write_key: dict[str, str], engine: sa.Engine
    ) -> None:
        assert _add(client, write_key, "grace@example.org").status_code == 200
        unsubscribe = client.post(
            "/v1/admin/lists/bluehats/subscribers/grace@example.org/unsubscribe",
            json={"reason": "asked by phone"},
            headers=write_key,
        )
        assert unsubscribe.json()["status"] == "unsubscribed"
        stale = _add(client, write_key, "grace@example.org")
        assert stale.status_code == 409
        assert "that consent was withdrawn" in stale.json()["detail"]
        # A consent given after the unsubscription (later than today cannot be: tomorrow's
        # date is refused) is simulated by moving the unsubscription into the past.
        with db.session_scope(engine) as session:
            row = session.exec(select(Subscription)).one()
            row.unsubscribed_at = utcnow() - timedelta(days=30)
            session.add(row)
        fresh = _add(
            client,
            write_key,
            "grace@example.org",
            evidence=EVIDENCE | {"consented_at": utcnow().date().isoformat()},
        )
        assert fresh.status_code == 200, fresh.text
        assert fresh.json()["status"] == "confirmed"
        assert _ledger(engine, "grace@example.org")[-1].detail["previous_status"] == "unsubscribed"


class TestOperatorUnsubscribe:
    def test_unsubscribe_records_the_reason_tells_the_backend_and_sends_no_mail(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = make_settings(database_url, smtp_port=smtp.port, run_worker=False)
        with TestClient(create_app(settings)) as client:
            headers = api_key_headers(engine, "operator", KeyScope.WRITE)
            assert _add(client, headers, "grace@example.org").status_code == 200
            backend = MemoryBackend()
            worker = Worker(
                engine=engine,
                settings=settings,
                mailer=make_mailer(settings.mailer),
                list_backends={"bluehats": backend},
            )
            worker.run_once()
            url = "/v1/admin/lists/bluehats/subscribers/Grace@example.org/unsubscribe"
            response = client.post(url, json={"reason": "bounced for a month"}, headers=headers)
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "unsubscribed"
            again = client.post(url, json={"reason": "twice"}, headers=headers)
            assert again.status_code == 200
            worker.run_once()
            worker.stop()
        assert backend.calls[-1] == ("unsubscribe", "grace@example.org")
        assert backend.held["grace@example.org"][1] is False
        events = _ledger(engine, "grace@example.org")
        assert [(e.action, e.source) for e in events] == [
            ("confirmed", "operator"),
            ("unsubscribed", "operator"),
        ]
        assert events[1].detail == {
            "reason": "bounced for a month",
            "operator": "operator",
            "previous_status": "confirmed",
        }
        assert _jobs(engine, JobKind.MAIL) == []
        assert smtp.messages == []

    def test_refusals(
        self, client: TestClient, write_key: dict[str, str], read_key: dict[str, str]
    ) -> None:
        base = "/v1/admin/lists/bluehats/subscribers"
        reason = {"reason": "asked"}
        unknown = client.post(
            f"{base}/nobody@example.org/unsubscribe", json=reason, headers=write_key
        )
        assert unknown.status_code == 404
        assert unknown.json()["error"] == "not_found"
        assert (
            client.post(
                "/v1/admin/lists/nope/subscribers/a@example.org/unsubscribe",
                json=reason,
                headers=write_key,
            ).json()["error"]
            == "list_not_found"
        )
        assert _add(client, write_key, "grace@example.org").status_code == 200
        url = f"{base}/grace@example.org/unsubscribe"
        for bad in ({}, {"reason": ""}, {"reason": "two\nlines"}):
            assert client.post(url, json=bad, headers=write_key).status_code == 422, bad
        assert (
            client.post(
                f"{base}/not-an-address/unsubscribe", json=reason, headers=write_key
            ).status_code
            == 422
        )
        assert client.post(url, json=reason, headers=read_key).status_code == 403

    def test_an_address_with_a_slash_is_found_read_unsubscribed_and_erased(
        self, client: TestClient, write_key: dict[str, str], read_key: dict[str, str]
    ) -> None:
        # `/` is a character a mailbox name may hold; sent as %2F, the server reads it as a
        # path separator, and every route naming the address answered a bare 404.
        address = "team/ops@example.org"
        assert _add(client, write_key, address).status_code == 200
        quoted = quote(address, safe="")
        record = client.get(f"/v1/admin/lists/bluehats/subscribers/{quoted}", headers=read_key)
        assert record.status_code == 200, record.text
        assert record.json()["email"] == address
        person = client.get(f"/v1/admin/people/{quoted}", headers=read_key)
        assert person.status_code == 200, person.text
        left = client.post(
            f"/v1/admin/lists/bluehats/subscribers/{quoted}/unsubscribe",
            json={"reason": "asked"},
            headers=write_key,
        )
        assert left.status_code == 200, left.text
        assert left.json()["status"] == "unsubscribed"
        erased = client.delete(f"/v1/admin/people/{quoted}", headers=write_key)
        assert erased.status_code == 200, erased.text
        assert erased.json()["subscriptions"] == 1
        gone = client.get(f"/v1/admin/lists/bluehats/subscribers/{quoted}", headers=read_key)
        assert gone.status_code == 404
        assert gone.json()["error"] == "not_found"
        assert gone.json()["detail"] != "Not Found"


class TestFindingAnInternationalizedDomain:
    """An operator types a domain as a mail program shows it: in Unicode (`café.fr`) or in
    its ASCII form (`xn--caf-dma.fr`); either finds the subscriber."""

    def test_the_search_and_the_record_take_either_spelling_of_the_domain(
        self, client: TestClient, write_key: dict[str, str], read_key: dict[str, str]
    ) -> None:
        assert _add(client, write_key, "jean@café.fr").status_code == 200
        assert _add(client, write_key, "anne@xn--strae-oqa.de").status_code == 200
        search = "/v1/admin/lists/bluehats/subscribers"
        for prefix, found in (
            ("jean@xn--caf-dma.fr", "jean@café.fr"),
            ("JEAN@XN--CAF-DMA", "jean@café.fr"),
            ("jean@café", "jean@café.fr"),
            ("anne@xn--strae-oqa.de", "anne@straße.de"),
            ("anne@straße", "anne@straße.de"),
        ):
            page = client.get(search, params={"prefix": prefix}, headers=read_key)
            assert page.status_code == 200, page.text
            assert [item["email"] for item in page.json()["items"]] == [found], prefix
        # Typed half-way, an ASCII label finds the subscriber, as a Unicode one does.
        for prefix, found in (
            ("jean@xn--caf-d", ["jean@café.fr"]),
            ("JEAN@XN--C", ["jean@café.fr"]),
            ("anne@xn--str", ["anne@straße.de"]),
            ("jean@caf", ["jean@café.fr"]),
            ("jean@xn--caf-x", []),
            ("jean@xn--caf-dma.f", ["jean@café.fr"]),
        ):
            page = client.get(search, params={"prefix": prefix}, headers=read_key)
            assert [item["email"] for item in page.json()["items"]] == found, prefix
        for typed in ("jean@xn--caf-dma.fr", "Jean@CAFÉ.fr"):
            record = client.get(f"{search}/{quote(typed, safe='')}", headers=read_key)
            assert record.status_code == 200, (typed, record.text)
            assert record.json()["email"] == "jean@café.fr"

    def test_every_way_in_keeps_the_ascii_spelling_a_search_finds(
        self,
        client: TestClient,
        engine: sa.Engine,
        write_key: dict[str, str],
        read_key: dict[str, str],
    ) -> None:
        # A sign-up, an operator's addition, a CSV import (as invitations and as confirmed
        # rows) and a take-over of the backend's members each write the subscription.
        signed_up = client.post(
            "/v1/lists/bluehats/subscriptions", json={"email": "ana@exämple.org"}
        )
        assert signed_up.status_code == 202, signed_up.text
        assert _add(client, write_key, "bea@exämple.org").status_code == 200
        for mode, email in (("confirmed", "cid@exämple.org"), ("invite", "dan@exämple.org")):
            imported = client.post(
                "/v1/admin/lists/bluehats/import", params={"mode": mode},
                content=f"email,consent_source,consent_date\n{email},Paper form,2025-03-12\n",
                headers={**write_key, "content-type": "text/csv"},
            )  # fmt: skip
            assert imported.json()["created"] == 1, imported.text
        with db.session_scope(engine) as session:
            sync.import_members(
                session, list_slug="bluehats", backend_kind="mailgun", key=SECRET.encode(),
                remote={"eve@exämple.org": ("eve@xn--exmple-cua.org", True)}, now=utcnow(),
            )  # fmt: skip
        for name in ("ana", "bea", "cid", "dan", "eve"):
            page = client.get(
                "/v1/admin/lists/bluehats/subscribers",
                params={"prefix": f"{name}@xn--exmple-c"},
                headers=read_key,
            )
            assert [item["email"] for item in page.json()["items"]] == [f"{name}@exämple.org"]

    def test_the_command_line_search_and_show_take_either_spelling(
        self,
        client: TestClient,
        write_key: dict[str, str],
        run_cli: Callable[..., CompletedProcess[str]],
    ) -> None:
        assert _add(client, write_key, "jean@café.fr").status_code == 200
        found = run_cli("subscriber", "search", "--list", "bluehats", "--prefix", "jean@xn--caf")
        assert found.returncode == 0, found.stderr
        assert found.stdout.startswith("jean@café.fr\tconfirmed\t"), found
        found = run_cli(
            "subscriber", "search", "--list", "bluehats", "--prefix", "jean@xn--caf-dma.fr"
        )
        assert found.stdout.startswith("jean@café.fr\tconfirmed\t"), found
        shown = run_cli("subscriber", "show", "jean@xn--caf-dma.fr", "--list", "bluehats")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["subscription"]["email"] == "jean@café.fr"


# Access -----------------------------------------------------------------------------------


class TestAccess:
    def test_everything_held_about_an_address_across_lists(
        self,
        client: TestClient,
        smtp: SmtpSink,
        engine: sa.Engine,
        read_key: dict[str, str],
        write_key: dict[str, str],
    ) -> None:
        client.post("/v1/admin/lists", json={"slug": "events", "name": "Events"}, headers=write_key)
        client.post("/v1/lists/bluehats/subscriptions", json={"email": "Ada@example.org"})
        client.post(link_in(smtp.mail_to("Ada@example.org", link="confirm"), "confirm"))
        assert _add(client, write_key, "ada@example.org", slug="events").status_code == 200
        client.get("/v1/admin/lists/bluehats/subscribers/ADA@example.org", headers=read_key)
        finished = "SELECT count(*) FROM outbox_job WHERE state IN ('done', 'dead')"
        wait_until(lambda: _scalar(engine, finished) == 3)

        response = client.get("/v1/admin/people/ADA@Example.org", headers=read_key)
        assert response.status_code == 200, response.text
        person = response.json()
        assert person["email"] == "ada@example.org"
        assert person["erased"] is False
        bluehats, events = person["subscriptions"]
        assert (bluehats["list"], bluehats["status"]) == ("bluehats", "confirmed")
        assert [e["action"] for e in bluehats["ledger"]] == ["subscribe_requested", "confirmed"]
        assert bluehats["ledger"][0]["ip"] == "testclient"
        assert sorted(job["kind"] for job in bluehats["jobs"]) == ["mail", "sync"]
        assert all(job["attempt_log"][0]["outcome"] == "success" for job in bluehats["jobs"])
        assert (events["list"], events["status"]) == ("events", "confirmed")
        assert events["ledger"][0]["detail"]["note"] == EVIDENCE["note"]
        # The list has no backend in the settings: its sync job waits as a dead letter.
        [sync_job] = events["jobs"]
        assert sync_job["state"] == "dead"
        assert "no backend" in sync_job["attempt_log"][0]["error"]
        assert [(a["action"], a["target"]) for a in person["audit"]] == [
            ("subscriber.add.confirmed", "events:ada@example.org"),
            ("subscriber.read", "bluehats:ADA@example.org"),
        ]
        assert person["address_jobs"] == []
        assert person["erased_ledger"] == []
        latest = _audit(engine)[-1]
        assert (latest.actor, latest.action, latest.target) == (
            "dashboard",
            "person.read",
            "ada@example.org",
        )

    def test_an_unknown_address_holds_nothing_an_invalid_one_is_422(
        self, client: TestClient, read_key: dict[str, str]
    ) -> None:
        response = client.get("/v1/admin/people/nobody@example.org", headers=read_key)
        assert response.status_code == 200
        assert response.json()["subscriptions"] == []
        invalid = client.get("/v1/admin/people/nobody", headers=read_key)
        assert invalid.status_code == 422
        assert invalid.json()["error"] == "validation_error"


def _scalar(engine: sa.Engine, sql: str) -> int:
    with engine.connect() as connection:
        return int(connection.exec_driver_sql(sql).scalar_one())


# Erasure ----------------------------------------------------------------------------------

ADDRESS = "Ada.Lovelace+news@Example.org"
NORMALIZED = "Ada.Lovelace+news@example.org"
# An internationalized domain, as stored here and as backends get it.
IDN = "jo@exämple.org"
IDN_ASCII = "jo@xn--exmple-cua.org"


class QuotingBackend(MemoryBackend):
    """Answers quoting the address, as Mailgun's do ("... jo@xn--... has been removed")."""

    def add(self, members: Sequence[Member]) -> str:
        super().add(members)
        return "added " + ", ".join(member.email for member in members)

    def unsubscribe(self, address: str) -> str:
        super().unsubscribe(address)
        return f"unsubscribed {address}"

    def remove(self, address: str) -> str:
        super().remove(address)
        return f"removed {address}"


def holding(engine: sa.Engine, address: str) -> list[tuple[str, str, str]]:
    """(table, column, value) of every text value, in every table, that holds the address in
    any case, as typed or URL-encoded."""
    needles = {address.casefold(), quote(address, safe="").casefold()}
    found = []
    with engine.connect() as connection:
        for table in SQLModel.metadata.sorted_tables:
            for row in connection.execute(sa.select(table)).mappings():
                for column, value in row.items():
                    if value is None:
                        continue
                    if isinstance(value, dict | list):
                        text = json.dumps(value, ensure_ascii=False)
                    else:
                        text = str(value)
                    if any(needle in text.casefold() for needle in needles):
                        found.append((table.name, column, text))
    return found


def _idle(engine: sa.Engine) -> bool:
    return (
        _scalar(engine, "SELECT count(*) FROM outbox_job WHERE state IN ('pending', 'running')")
        == 0
    )


def _run_until_idle(worker: Worker, engine: sa.Engine) -> None:
    def round_done() -> bool:
        worker.run_once()
        return _idle(engine)

    wait_until(round_done, timeout=20, every=0.1)


@pytest.fixture
def two_lists(database_url: str, smtp: SmtpSink) -> Settings:
    return make_settings(
        database_url,
        smtp_port=smtp.port,
        run_worker=False,
        lists=[
            {"slug": "bluehats", "name": "Gazette BlueHats"},
            {"slug": "events", "name": "Événements", "default_locale": "en"},
        ],
    )


class TestErasure:
    def test_after_erasure_no_table_holds_the_address_and_the_backends_were_told(
        self, two_lists: Settings, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = two_lists
        gazette, events = MemoryBackend(), MemoryBackend()
        worker = Worker(
            engine=engine,
            settings=settings,
            mailer=make_mailer(settings.mailer),
            name="test-worker",
            list_backends={"bluehats": gazette, "events": events},
        )
        with TestClient(create_app(settings)) as client:
            reader = api_key_headers(engine, "dashboard", KeyScope.READ)
            writer = api_key_headers(engine, "operator", KeyScope.WRITE)
            client.post("/v1/admin/lists", json={"slug": "drafts", "name": "D"}, headers=writer)
            # Confirmed by the person on one list, through a backend hiccup that quotes the
            # address in the attempt log...
            client.post("/v1/lists/bluehats/subscriptions", json={"email": ADDRESS})
            _run_until_idle(worker, engine)
            client.post(link_in(smtp.mail_to(NORMALIZED, link="confirm"), "confirm"))
            gazette.fail_next = [
                RetryableSyncError(f"503 busy for {ADDRESS}", response=f'{{"member": "{ADDRESS}"}}')
            ]
            _run_until_idle(worker, engine)
            # ...added by an operator on another, pending on a list with no backend...
            assert _add(client, writer, ADDRESS.upper(), slug="events").status_code == 200
            client.post("/v1/lists/drafts/subscriptions", json={"email": ADDRESS})
            _run_until_idle(worker, engine)
            # ...read and refused in the audit log.
            client.get(f"/v1/admin/lists/bluehats/subscribers/{ADDRESS}", headers=reader)
            assert _add(client, writer, ADDRESS, slug="events").status_code == 409
            assert client.get(f"/v1/admin/people/{ADDRESS}", headers=reader).status_code == 200
            assert {table for table, _, _ in holding(engine, ADDRESS)} >= {
                "subscription",
                "audit_event",
                "delivery_attempt",
            }

            erased = client.delete(f"/v1/admin/people/{ADDRESS.lower()}", headers=writer)
            assert erased.status_code == 200, erased.text
            report = erased.json()
            assert report | {"address_hash": "-"} == {
                "address_hash": "-",
                "subscriptions": 3,
                "ledger_events": 4,
                "tokens": 4,
                "jobs_deleted": 4,
                "jobs_scrubbed": 0,
                "audit_events": 4,
                "backend_removals": ["bluehats", "events"],
                "no_backend": ["drafts"],
                "already_erased": False,
            }
            # Until the worker runs them, the removals alone hold the address.
            assert {(table, column) for table, column, _ in holding(engine, ADDRESS)} == {
                ("outbox_job", "payload"),
                ("outbox_job", "dedupe_key"),
            }
            # The first removal fails, quoting the address; the retry succeeds.
            gazette.fail_next = [RetryableSyncError(f"503 on DELETE /members/{quote(NORMALIZED)}")]
            _run_until_idle(worker, engine)
            worker.stop()

            assert holding(engine, ADDRESS) == []
            assert ("remove", NORMALIZED) in gazette.calls
            # Each backend is asked in the spelling it was given (the operator typed capitals).
            assert events.calls[-1] == (
                "remove",
                ADDRESS.upper().replace("EXAMPLE.ORG", "example.org"),
            )
            assert gazette.held == {}
            assert events.held == {}
            with Session(engine) as session:
                ledger = session.exec(select(ConsentEvent)).all()
                assert len(ledger) == 4
                assert {e.address_hash for e in ledger} == {report["address_hash"]}
                assert all(e.subscription_id is None and e.ip is None for e in ledger)
                assert session.exec(select(Subscription)).all() == []
                [tombstone] = session.exec(select(ErasedAddress)).all()
                assert tombstone.address_hash == report["address_hash"]
                removals = session.exec(
                    select(OutboxJob).where(OutboxJob.state == JobState.DONE)
                ).all()
                assert sum(job.payload.get("action") == "remove" for job in removals) == 2
            audit = _audit(engine)
            assert (audit[-1].action, audit[-1].target) == ("person.erase", report["address_hash"])

            # The access request now finds only the hashed ledger.
            person = client.get(f"/v1/admin/people/{ADDRESS}", headers=reader).json()
            assert person["erased"] is True
            assert person["subscriptions"] == []
            assert {e["list"] for e in person["erased_ledger"]} == {"bluehats", "events", "drafts"}

            # An operator cannot bring the address back; erasing again is harmless.
            refused = _add(client, writer, ADDRESS, slug="events")
            assert refused.status_code == 409
            assert "erased at its owner's request" in refused.json()["detail"]
            again = client.delete(f"/v1/admin/people/{ADDRESS}", headers=writer).json()
            assert again["subscriptions"] == 0
            assert again["already_erased"] is True

            # The person's own double opt-in is a fresh consent: it works, the tombstone stays.
            assert (
                client.post("/v1/lists/bluehats/subscriptions", json={"email": ADDRESS}).status_code
                == 202
            )
            worker = Worker(
                engine=engine,
                settings=settings,
                mailer=make_mailer(settings.mailer),
                list_backends={"bluehats": gazette, "events": events},
            )
            _run_until_idle(worker, engine)
            mails = [m for m in smtp.messages if m["To"] == NORMALIZED]
            confirmed = client.post(
                link_in(mails[-1], "confirm"), headers={"accept": "application/json"}
            )
            assert confirmed.json()["status"] == "confirmed"
            _run_until_idle(worker, engine)
            worker.stop()
            assert NORMALIZED.casefold() in gazette.held
            with Session(engine) as session:
                assert len(session.exec(select(ErasedAddress)).all()) == 1

    def test_an_addition_in_flight_is_removed_after_it_lands_and_scrubbed(
        self, two_lists: Settings, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = two_lists
        gazette = MemoryBackend()
        with TestClient(create_app(settings)) as client:
            writer = api_key_headers(engine, "operator", KeyScope.WRITE)
            assert _add(client, writer, ADDRESS).status_code == 200
            # A worker has taken the addition and is calling the backend...
            now = utcnow()
            with db.session_scope(engine) as session:
                [in_flight] = outbox.claim(
                    session, worker="slow", now=now, lease=timedelta(seconds=1), limit=10
                )
            report = client.delete(f"/v1/admin/people/{ADDRESS}", headers=writer).json()
            assert report["backend_removals"] == ["bluehats"]
            [removal] = [job for job in _jobs(engine) if job.payload.get("action") == "remove"]
            assert removal.payload["scrub_job_ids"] == [in_flight.id]
            # ...the removal waits for that worker's lease, so it cannot overtake the addition.
            assert removal.next_attempt_at >= now + timedelta(seconds=1)
            # The slow worker's call lands, and its answer quotes the address.
            gazette.held[NORMALIZED.casefold()] = (NORMALIZED, True, {})
            with db.session_scope(engine) as session:
                outbox.finish(
                    session, job=in_flight, worker="slow", started_at=now, now=utcnow(),
                    response=f"added {NORMALIZED}",
                )  # fmt: skip
        worker = Worker(
            engine=engine,
            settings=settings,
            mailer=make_mailer(settings.mailer),
            list_backends={"bluehats": gazette},
        )
        _run_until_idle(worker, engine)
        worker.stop()
        assert gazette.held == {}
        assert holding(engine, ADDRESS) == []

    def test_an_internationalized_address_leaves_no_trace_in_either_spelling(
        self, two_lists: Settings, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = two_lists
        gazette, events = QuotingBackend(), QuotingBackend()
        # At the second list's backend only, from before this service: a stranger here.
        events.held[IDN_ASCII] = (IDN_ASCII, True, {})
        worker = Worker(
            engine=engine,
            settings=settings,
            mailer=make_mailer(settings.mailer),
            name="test-worker",
            list_backends={"bluehats": gazette, "events": events},
        )
        with TestClient(create_app(settings)) as client:
            writer = api_key_headers(engine, "operator", KeyScope.WRITE)
            # Added on one list: synced in ASCII, which the backend's answer quotes...
            assert _add(client, writer, IDN).status_code == 200
            # ...and unsubscribed at the other by a reconciliation, in the backend's spelling.
            with db.session_scope(engine) as session:
                report = sync.compare(session, list_slug="events", remote=sync.read_backend(events))
                assert report.extra == [IDN_ASCII]
                sync.apply(session, report=report, key=settings.token_key(), now=utcnow())
            _run_until_idle(worker, engine)
            assert holding(engine, IDN_ASCII) != []

            erased = client.delete(f"/v1/admin/people/{IDN}", headers=writer).json()
            assert erased["backend_removals"] == ["bluehats", "events"]
            _run_until_idle(worker, engine)
            worker.stop()
        assert gazette.held == {}
        assert events.held == {}
        assert holding(engine, IDN) == []
        assert holding(engine, IDN_ASCII) == []
        # Each removal keeps what it was about as the tombstone's hash, whatever its spelling.
        hashes = {job.payload.get("address_hash") for job in _jobs(engine)} - {None}
        assert hashes == {erased["address_hash"]}

    def test_an_address_whose_case_folding_changes_it_leaves_no_trace_in_the_audit_log(
        self, database_url: str, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        # `ß` folds to `ss`: the address's key is `anne@strasse.de`, which an audit event
        # naming `anne@straße.de` (an operator's read, as typed) does not spell.
        address = "anne@straße.de"
        # No worker in the process: the removal job stays as the erasure left it.
        settings = make_settings(database_url, smtp_port=smtp.port, run_worker=False)
        write_key = api_key_headers(engine, "operator", KeyScope.WRITE)
        read_key = api_key_headers(engine, "dashboard", KeyScope.READ)
        with TestClient(create_app(settings)) as client:
            assert _add(client, write_key, address).status_code == 200
            for typed in (address, "Anne@STRASSE.de", "anne@xn--strae-oqa.de"):
                read = client.get(
                    f"/v1/admin/lists/bluehats/subscribers/{quote(typed, safe='')}",
                    headers=read_key,
                )
                assert read.status_code == 200, (typed, read.text)
            erased = client.delete(f"/v1/admin/people/{quote(address, safe='')}", headers=write_key)
            assert erased.status_code == 200, erased.text
        # Only the removal job waiting for the worker holds it (it scrubs itself once run).
        left = {(table, column) for table, column, _ in holding(engine, address)}
        assert left == {("outbox_job", "payload"), ("outbox_job", "dedupe_key")}
        assert holding(engine, "anne@xn--strae-oqa.de") == []

    def test_a_fix_running_in_the_backends_spelling_during_the_erasure_is_scrubbed_after_it(
        self, two_lists: Settings, smtp: SmtpSink, engine: sa.Engine
    ) -> None:
        settings = two_lists
        events = QuotingBackend()
        events.held[IDN_ASCII] = (IDN_ASCII, True, {})
        with TestClient(create_app(settings)) as client:
            writer = api_key_headers(engine, "operator", KeyScope.WRITE)
            with db.session_scope(engine) as session:
                report = sync.compare(session, list_slug="events", remote=sync.read_backend(events))
                sync.apply(session, report=report, key=settings.token_key(), now=utcnow())
            # A worker has taken the reconciliation's fix and is calling the backend...
            now = utcnow()
            with db.session_scope(engine) as session:
                [in_flight] = outbox.claim(
                    session, worker="slow", now=now, lease=timedelta(seconds=1), limit=10
                )
            erased = client.delete(f"/v1/admin/people/{IDN}", headers=writer).json()
            assert erased["backend_removals"] == ["events"]
            # ...and its answer, quoting the address, lands after the erasure.
            with db.session_scope(engine) as session:
                outbox.finish(
                    session, job=in_flight, worker="slow", started_at=now, now=utcnow(),
                    response=f"unsubscribed {IDN_ASCII}",
                )  # fmt: skip
        worker = Worker(
            engine=engine,
            settings=settings,
            mailer=make_mailer(settings.mailer),
            list_backends={"events": events},
        )
        _run_until_idle(worker, engine)
        worker.stop()
        assert events.held == {}
        assert holding(engine, IDN_ASCII) == []

    def test_an_address_inside_another_one_is_left_alone(
        self, client: TestClient, write_key: dict[str, str], read_key: dict[str, str]
    ) -> None:
        for email in ("ada@example.org", "barbada@example.org", "ada@example.org.uk"):
            assert _add(client, write_key, email).status_code == 200
        person = client.get("/v1/admin/people/ada@example.org", headers=read_key).json()
        assert [a["target"] for a in person["audit"]] == ["bluehats:ada@example.org"]
        erased = client.delete("/v1/admin/people/ada@example.org", headers=write_key).json()
        assert (erased["subscriptions"], erased["audit_events"]) == (1, 2)
        targets = [a["target"] for a in client.get("/v1/admin/audit", headers=read_key).json()]
        assert "bluehats:barbada@example.org" in targets
        assert "bluehats:ada@example.org.uk" in targets
        assert "bluehats:[erased]" in targets
        for email in ("barbada@example.org", "ada@example.org.uk"):
            [kept] = client.get(f"/v1/admin/people/{email}", headers=read_key).json()[
                "subscriptions"
            ]
            assert kept["status"] == "confirmed"

    def test_an_unknown_address_gets_its_tombstone_and_counts_zero(
        self, client: TestClient, write_key: dict[str, str], read_key: dict[str, str]
    ) -> None:
        response = client.delete("/v1/admin/people/nobody@example.org", headers=write_key)
        assert response.status_code == 200
        body = response.json()
        assert body["subscriptions"] == body["ledger_events"] == body["jobs_deleted"] == 0
        assert body["already_erased"] is False
        assert _add(client, write_key, "nobody@example.org").status_code == 409
        assert client.delete("/v1/admin/people/x@example.org", headers=read_key).status_code == 403
        assert client.delete("/v1/admin/people/nobody", headers=write_key).status_code == 422


# Command line -----------------------------------------------------------------------------


@pytest.fixture
def run_cli(database_url: str, tmp_path: Path) -> Callable[..., CompletedProcess[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(
        NEWSLETTER_DATABASE_URL=database_url,
        NEWSLETTER_SECRET_KEY=SECRET,
        NEWSLETTER_LOG_LEVEL="WARNING",
    )

    def run(*args: str) -> CompletedProcess[str]:
        return subprocess.run(
            [NEWSLETTER, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
            timeout=60, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    return run


class TestCommandLine:
    def test_a_confirmed_addition_keeps_the_consent_wording_the_person_agreed_to(
        self, run_cli: Callable[..., CompletedProcess[str]], engine: sa.Engine
    ) -> None:
        evidence = ["--source", "paper form", "--note", "no. 7", "--consented-at", "2025-06-01"]
        add = ["subscriber", "add", "--list", "bluehats", "--confirmed", *evidence]
        assert run_cli(*add, "grace@example.org").returncode == 0
        older = run_cli(*add, "lin@example.org", "--consent-version", "2019-form")
        assert older.returncode == 0, older.stderr
        with Session(engine) as session:
            current = lists.get(session, slug="bluehats").consent_version
            versions = {
                row.email: row.consent_version for row in session.exec(select(Subscription)).all()
            }
            ledger = {
                event.subscription_id: event.consent_version
                for event in session.exec(select(ConsentEvent)).all()
            }
        # The wording the person agreed to; the list's current one when not given.
        assert current != "2019-form"
        assert versions == {"grace@example.org": current, "lin@example.org": "2019-form"}
        assert sorted(ledger.values()) == sorted([current, "2019-form"])

    def test_add_unsubscribe_show_and_erase_with_exit_codes_scripts_can_trust(
        self, run_cli: Callable[..., CompletedProcess[str]], engine: sa.Engine
    ) -> None:
        evidence = ["--source", "paper form", "--note", "no. 7", "--consented-at", "2025-06-01"]
        add = ["subscriber", "add", "--list", "bluehats"]
        made = run_cli(*add, "Grace@example.org", "--confirmed", *evidence)
        assert made.returncode == 0, made.stderr
        assert made.stdout.strip() == "Grace@example.org is confirmed on bluehats"
        again = run_cli(*add, "grace@example.org", "--confirmed", *evidence)
        assert (again.returncode, "already a confirmed subscriber" in again.stderr) == (1, True)
        assert run_cli(*add, "grace@example.org", "--confirmed").returncode == 2
        future = run_cli(
            *add, "x@example.org", "--confirmed", *evidence[:4], "--consented-at", "2999-01-01"
        )
        assert (future.returncode, "future" in future.stderr) == (2, True)
        assert run_cli(*add, "not-an-address").returncode == 2
        assert run_cli("subscriber", "add", "--list", "nope", "x@example.org").returncode == 2
        invited = run_cli(*add, "ada@example.org")
        assert (invited.returncode, invited.stdout.strip()) == (
            0,
            "ada@example.org is pending on bluehats",
        )

        left = run_cli(
            "subscriber", "unsubscribe", "--list", "bluehats", "grace@example.org",
            "--reason", "asked by phone",
        )  # fmt: skip
        assert left.returncode == 0, left.stderr
        assert "unsubscribed" in left.stdout
        assert (
            run_cli(
                "subscriber", "unsubscribe", "--list", "bluehats", "who@example.org",
                "--reason", "x",
            ).returncode
            == 1
        )  # fmt: skip

        shown = run_cli("people", "show", "GRACE@example.org")
        assert shown.returncode == 0, shown.stderr
        person = json.loads(shown.stdout)
        [subscription] = person["subscriptions"]
        assert subscription["status"] == "unsubscribed"
        assert [e["detail"].get("reason") for e in subscription["ledger"]] == [
            None,
            "asked by phone",
        ]

        assert run_cli("people", "erase", "grace@example.org").returncode == 2
        erased = run_cli("people", "erase", "grace@example.org", "--yes")
        assert erased.returncode == 0, erased.stderr
        assert json.loads(erased.stdout)["subscriptions"] == 1
        refused = run_cli(*add, "grace@example.org", "--confirmed", *evidence)
        assert (refused.returncode, "erased" in refused.stderr) == (1, True)
        # No worker ran: the removal still holds the address; and the refused attempt after
        # the erasure names it in the audit log.
        assert {(table, column) for table, column, _ in holding(engine, "grace@example.org")} == {
            ("outbox_job", "payload"),
            ("outbox_job", "dedupe_key"),
            ("audit_event", "target"),
        }

        audit = _audit(engine)
        assert {event.actor for event in audit} == {audit[0].actor}
        assert audit[0].actor.startswith("cli:")
        assert [(e.action, e.outcome) for e in audit] == [
            ("subscriber.add.confirmed", "ok"),
            ("subscriber.add.confirmed", "error:conflict"),
            ("subscriber.add.invite", "error:list_not_found"),
            ("subscriber.add.invite", "ok"),
            ("subscriber.unsubscribe", "ok"),
            ("subscriber.unsubscribe", "error:not_found"),
            ("person.read", "ok"),
            ("person.erase", "ok"),
            ("subscriber.add.confirmed", "error:conflict"),
        ]
