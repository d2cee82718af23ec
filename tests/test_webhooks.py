"""POST /v1/webhooks/mailgun: signed Mailgun events change subscriptions; anything unsigned,
stale or replayed gets 406 and changes nothing. The list's backend is the fake Mailgun
(tests/fake_mailgun.py), so the sync that follows an event reaches a real HTTP server."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from app import db, sync
from app.config import Settings
from app.db import make_engine
from app.main import create_app
from app.models import ConsentEvent, JobKind, JobState, OutboxJob, Subscription, utcnow
from tests.conftest import SmtpSink, count_rows, link_in, make_settings, wait_until
from tests.fake_mailgun import FakeMailgun, webhook

LIST_ADDRESS = "bluehats@mail.codegouv.fr"
SIGNING_KEY = "mailgun-webhook-signing-key-for-tests"
ACCEPTED = {"status": "accepted", "detail": "Event received."}


def mailgun_list(base_url: str, **backend: Any) -> dict[str, Any]:
    return {
        "slug": "bluehats",
        "name": "Gazette BlueHats",
        "backend": {
            "kind": "mailgun",
            "list_address": LIST_ADDRESS,
            "api_key": FakeMailgun.api_key,
            "base_url": base_url,
            "webhook_signing_key": SIGNING_KEY,
            **backend,
        },
    }


@pytest.fixture
def fake() -> FakeMailgun:
    server = FakeMailgun()
    server.create_list(LIST_ADDRESS)
    return server


@pytest.fixture
def mailgun_url(fake: FakeMailgun) -> Iterator[str]:
    with fake.serve() as url:
        yield url


@pytest.fixture
def settings(database_url: str, smtp: SmtpSink, mailgun_url: str) -> Settings:
    return make_settings(database_url, smtp_port=smtp.port, lists=[mailgun_list(mailgun_url)])


def status_of(url: str, email_key: str) -> str | None:
    engine = make_engine(url)
    with Session(engine) as session:
        row = session.exec(select(Subscription).where(Subscription.email_key == email_key)).first()
    engine.dispose()
    return row.status if row else None


def backend_events(url: str) -> list[ConsentEvent]:
    engine = make_engine(url)
    with Session(engine) as session:
        rows = list(
            session.exec(
                select(ConsentEvent)
                .where(ConsentEvent.action == "backend_event", ConsentEvent.source == "backend")
                .order_by(ConsentEvent.id)  # type: ignore[arg-type]
            ).all()
        )
    engine.dispose()
    return rows


def confirmed(client: TestClient, smtp: SmtpSink, email: str, *, after: int = 0) -> None:
    """Subscribe and confirm through the API, with the mail the real SMTP server received
    (once it holds more than `after` mails)."""
    response = client.post("/v1/lists/bluehats/subscriptions", json={"email": email})
    assert response.status_code == 202
    smtp.wait_for(after + 1)
    link = link_in(smtp.mail_to(email, link="confirm"), "confirm")
    assert client.post(link, headers={"accept": "application/json"}).json() == {
        "status": "confirmed",
        "list": "bluehats",
    }


def event(kind: str, recipient: str, **extra: Any) -> dict[str, Any]:
    return {
        "event": kind,
        "recipient": recipient,
        "mailing-list": {"address": LIST_ADDRESS, "list-id": "bluehats", "sid": "x"},
        **extra,
    }


def post(client: TestClient, body: dict[str, Any]) -> Any:
    return client.post("/v1/webhooks/mailgun", json=body)


def sync_waiting(url: str) -> bool:
    engine = make_engine(url)
    with Session(engine) as session:
        waiting = session.exec(
            select(OutboxJob).where(
                OutboxJob.kind == JobKind.SYNC, OutboxJob.state == JobState.PENDING
            )
        ).first()
    engine.dispose()
    return waiting is not None


def stored_rows(url: str) -> dict[str, int]:
    return {
        table: count_rows(url, table)
        for table in ("subscription", "consent_event", "outbox_job", "webhook_nonce")
    }


class TestAcceptedEvents:
    @pytest.mark.parametrize(
        ("data", "status"),
        [
            ({"event": "unsubscribed"}, "unsubscribed"),
            ({"event": "complained"}, "complained"),
            (
                {"event": "failed", "severity": "permanent", "reason": "bounce"},
                "bounced",
            ),
        ],
        ids=["unsubscribed", "complained", "permanent-failure"],
    )
    def test_a_signed_event_changes_the_subscription(
        self,
        client: TestClient,
        smtp: SmtpSink,
        settings: Settings,
        data: dict[str, Any],
        status: str,
    ) -> None:
        url = settings.database_url
        confirmed(client, smtp, "Reader@example.org")
        body = webhook(SIGNING_KEY, event(data["event"], "reader@example.org", **data))

        response = post(client, body)

        assert response.status_code == 200
        assert response.json() == ACCEPTED
        assert status_of(url, "reader@example.org") == status
        [recorded] = backend_events(url)
        assert recorded.status_after == status
        assert recorded.ip == "testclient"
        expected_detail = {
            "event": status,
            "previous_status": "confirmed",
            "backend": "mailgun",
            "event_id": body["event-data"]["id"],
        }
        if data["event"] == "failed":
            expected_detail |= {"severity": "permanent", "reason": "bounce"}
        assert recorded.detail == expected_detail
        assert count_rows(url, "webhook_nonce") == 1

    def test_an_unsubscribe_at_mailgun_is_kept_and_synced_back(
        self, client: TestClient, smtp: SmtpSink, settings: Settings, fake: FakeMailgun
    ) -> None:
        confirmed(client, smtp, "sync@example.org")
        # The worker pushed the confirmed member to (fake) Mailgun.
        wait_until(lambda: fake.member(LIST_ADDRESS, "sync@example.org"))

        post(client, webhook(SIGNING_KEY, event("unsubscribed", "sync@example.org")))

        assert status_of(settings.database_url, "sync@example.org") == "unsubscribed"
        # The new state is synced: Mailgun keeps the member, unsubscribed.
        wait_until(
            lambda: (
                (stored := fake.member(LIST_ADDRESS, "sync@example.org")) and not stored.subscribed
            )
        )

    def test_an_internationalized_domain_goes_in_ascii_and_its_events_come_home(
        self, client: TestClient, smtp: SmtpSink, settings: Settings, fake: FakeMailgun
    ) -> None:
        # Stored in Unicode; Mailgun gets, and reports, the ASCII form.
        response = client.post("/v1/lists/bluehats/subscriptions", json={"email": "jo@exämple.org"})
        assert response.status_code == 202
        link = link_in(smtp.mail_to("jo@xn--exmple-cua.org", link="confirm"), "confirm")
        assert client.post(link, headers={"accept": "application/json"}).status_code == 200
        wait_until(lambda: fake.member(LIST_ADDRESS, "jo@xn--exmple-cua.org"))

        post(client, webhook(SIGNING_KEY, event("unsubscribed", "JO@XN--EXMPLE-CUA.ORG")))

        assert status_of(settings.database_url, "jo@exämple.org") == "unsubscribed"
        wait_until(
            lambda: (
                (stored := fake.member(LIST_ADDRESS, "jo@xn--exmple-cua.org"))
                and not stored.subscribed
            )
        )
        assert [member.address for member in fake.members_of(LIST_ADDRESS)] == [
            "jo@xn--exmple-cua.org"
        ]

    @pytest.mark.parametrize("kind", ["unsubscribed", "complained", "failed"])
    def test_an_event_older_than_the_latest_confirmation_does_not_undo_it(
        self, client: TestClient, smtp: SmtpSink, settings: Settings, kind: str
    ) -> None:
        url = settings.database_url
        confirmed(client, smtp, "again@example.org")
        post(client, webhook(SIGNING_KEY, event("unsubscribed", "again@example.org")))
        assert status_of(url, "again@example.org") == "unsubscribed"
        # They come back and confirm again (with the new mail's link)...
        mails = len(smtp.messages)
        confirmed(client, smtp, "again@example.org", after=mails)
        # ...then Mailgun delivers, late (its own lag, or a retry), an event that happened
        # a minute before that confirmation.
        data = event(kind, "again@example.org", severity="permanent", timestamp=time.time() - 60)
        assert post(client, webhook(SIGNING_KEY, data)).json() == ACCEPTED

        assert status_of(url, "again@example.org") == "confirmed"
        late = backend_events(url)[-1]
        assert late.status_after == "confirmed"
        assert late.detail["previous_status"] == "confirmed"
        assert "predates" in late.detail["note"]

    def test_an_event_older_than_a_taken_over_membership_still_applies(
        self, client: TestClient, settings: Settings
    ) -> None:
        url = settings.database_url
        engine = make_engine(url)
        # `newsletter import-backend`: Mailgun's members read (reader subscribed there)...
        read = {"reader@example.org": ("reader@example.org", True)}
        # ...the reader leaves at Mailgun while the rest of the list is read...
        left_at = time.time() - 60
        # ...and the import is written: a confirmation dated now, which no opt-in renewed.
        with db.session_scope(engine) as session:
            sync.import_members(
                session,
                list_slug="bluehats",
                remote=read,
                backend_kind="mailgun",
                key=settings.token_key(),
                now=utcnow(),
            )
        engine.dispose()
        assert status_of(url, "reader@example.org") == "confirmed"
        # Mailgun's event comes late (retried after an outage here): the same membership.
        data = event("unsubscribed", "reader@example.org", timestamp=left_at)
        assert post(client, webhook(SIGNING_KEY, data)).json() == ACCEPTED
        assert status_of(url, "reader@example.org") == "unsubscribed"

    def test_an_event_after_the_confirmation_applies(
        self, client: TestClient, smtp: SmtpSink, settings: Settings
    ) -> None:
        confirmed(client, smtp, "later@example.org")
        data = event("unsubscribed", "later@example.org", timestamp=time.time() + 1)
        assert post(client, webhook(SIGNING_KEY, data)).json() == ACCEPTED
        assert status_of(settings.database_url, "later@example.org") == "unsubscribed"

    def test_an_event_naming_no_list_applies_to_the_list_whose_key_signs_it(
        self, client: TestClient, smtp: SmtpSink, settings: Settings
    ) -> None:
        confirmed(client, smtp, "domain@example.org")
        data = {"event": "complained", "recipient": "domain@example.org"}
        assert post(client, webhook(SIGNING_KEY, data)).json() == ACCEPTED
        assert status_of(settings.database_url, "domain@example.org") == "complained"


class TestRejected:
    def _assert_refused(self, response: Any, code: str) -> None:
        assert response.status_code == 406
        body = response.json()
        assert body["error"] == code
        assert set(body) == {"error", "detail"}

    def test_a_wrong_signature_is_406_and_changes_nothing(
        self, client: TestClient, smtp: SmtpSink, settings: Settings
    ) -> None:
        confirmed(client, smtp, "safe@example.org")
        before = stored_rows(settings.database_url)
        body = webhook(SIGNING_KEY, event("unsubscribed", "safe@example.org"))
        body["signature"]["signature"] = "0" * 64

        self._assert_refused(post(client, body), "webhook_signature_invalid")

        assert status_of(settings.database_url, "safe@example.org") == "confirmed"
        assert stored_rows(settings.database_url) == before

    @pytest.mark.parametrize(
        "forge",
        ["other key", "token swapped", "non-ascii signature", "no signature block"],
    )
    def test_forgeries_are_406(self, client: TestClient, settings: Settings, forge: str) -> None:
        before = stored_rows(settings.database_url)
        body = webhook(SIGNING_KEY, event("unsubscribed", "someone@example.org"))
        if forge == "other key":
            body = webhook("not-our-key", event("unsubscribed", "someone@example.org"))
        elif forge == "token swapped":
            body["signature"]["token"] = "a" * 50
        elif forge == "non-ascii signature":
            body["signature"]["signature"] = "é" * 64
        else:
            del body["signature"]

        self._assert_refused(post(client, body), "webhook_signature_invalid")
        assert stored_rows(settings.database_url) == before

    @pytest.mark.parametrize("event_data", [[1, 2], "unsubscribed", None])
    def test_a_signed_call_whose_event_is_not_an_object_says_so(
        self, client: TestClient, settings: Settings, event_data: object
    ) -> None:
        # Not "no signature": the signature block is there; what is wrong is the event.
        before = stored_rows(settings.database_url)
        body = webhook(SIGNING_KEY, event("unsubscribed", "someone@example.org"))
        body["event-data"] = event_data
        response = post(client, body)
        self._assert_refused(response, "webhook_malformed")
        assert "event-data" in response.json()["detail"]
        assert stored_rows(settings.database_url) == before

    # Well past the window (9 hours back, 300 s ahead): the timestamp is truncated to whole
    # seconds, and the request takes time to arrive, so 301 s could land within it.
    @pytest.mark.parametrize("offset", [-9 * 3600 - 30, 330], ids=["stale", "from-the-future"])
    def test_a_timestamp_outside_the_window_is_406(
        self, client: TestClient, smtp: SmtpSink, settings: Settings, offset: int
    ) -> None:
        confirmed(client, smtp, "late@example.org")
        body = webhook(
            SIGNING_KEY,
            event("unsubscribed", "late@example.org"),
            timestamp=time.time() + offset,
        )
        self._assert_refused(post(client, body), "webhook_stale")
        assert status_of(settings.database_url, "late@example.org") == "confirmed"
        assert count_rows(settings.database_url, "webhook_nonce") == 0

    def test_mailguns_retry_hours_later_with_the_first_signature_is_applied(
        self, client: TestClient, smtp: SmtpSink, settings: Settings
    ) -> None:
        # Our first answer was a 5xx (a database outage); Mailgun retries for 8 hours, each
        # retry with the first attempt's signature block. The 4-hour retry was refused as
        # stale (406, which ends Mailgun's retries): the unsubscribe was lost.
        confirmed(client, smtp, "retried@example.org")
        # Confirmed the day before the event.
        engine = make_engine(settings.database_url)
        with Session(engine) as session:
            row = session.exec(select(Subscription)).one()
            row.confirmed_at = utcnow() - timedelta(days=1)
            session.add(row)
            session.commit()
        engine.dispose()
        body = webhook(
            SIGNING_KEY,
            event("unsubscribed", "retried@example.org"),
            timestamp=time.time() - 4 * 3600,
        )
        assert post(client, body).status_code == 200
        assert status_of(settings.database_url, "retried@example.org") == "unsubscribed"
        # The token stays spent: the same call again is a replay.
        self._assert_refused(post(client, body), "webhook_replayed")

    def test_a_replayed_token_is_406(
        self, client: TestClient, smtp: SmtpSink, settings: Settings
    ) -> None:
        confirmed(client, smtp, "replay@example.org")
        body = webhook(SIGNING_KEY, event("unsubscribed", "replay@example.org"))
        assert post(client, body).status_code == 200

        self._assert_refused(post(client, body), "webhook_replayed")
        # Same token, another event: still a replay.
        again = webhook(
            SIGNING_KEY,
            event("complained", "replay@example.org"),
            token=body["signature"]["token"],
        )
        self._assert_refused(post(client, again), "webhook_replayed")

        assert status_of(settings.database_url, "replay@example.org") == "unsubscribed"
        assert len(backend_events(settings.database_url)) == 1
        assert count_rows(settings.database_url, "webhook_nonce") == 1

    @pytest.mark.parametrize(
        "first",
        [
            event("delivered", "reader@example.org"),
            {**event("unsubscribed", "reader@example.org"), "mailing-list": {"address": "x@y.fr"}},
        ],
        ids=["delivery", "another-list"],
    )
    def test_a_signature_used_for_an_event_that_changed_nothing_cannot_unsubscribe(
        self, client: TestClient, smtp: SmtpSink, settings: Settings, first: dict[str, Any]
    ) -> None:
        # Mailgun signs the timestamp and token, not the event: whoever saw one signed call
        # could send its signature again with another event in it.
        confirmed(client, smtp, "reader@example.org")
        call = webhook(SIGNING_KEY, first)
        assert post(client, call).json() == ACCEPTED

        forged = {**call, "event-data": event("unsubscribed", "reader@example.org")}
        self._assert_refused(post(client, forged), "webhook_replayed")
        assert status_of(settings.database_url, "reader@example.org") == "confirmed"
        assert backend_events(settings.database_url) == []

    def test_without_a_signing_key_a_call_is_refused_for_mailgun_to_retry_once_it_is_set(
        self,
        database_url: str,
        smtp: SmtpSink,
        mailgun_url: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        # The webhooks pointed here before the key was set. A 406 "signature does not
        # verify" made Mailgun drop each event (an unsubscribe lost) and named no setting.
        keyless = make_settings(
            database_url,
            smtp_port=smtp.port,
            lists=[mailgun_list(mailgun_url, webhook_signing_key=None)],
        )
        body = webhook(SIGNING_KEY, event("unsubscribed", "reader@example.org"))
        with TestClient(create_app(keyless)) as client:
            confirmed(client, smtp, "reader@example.org")
            before = stored_rows(database_url)
            refused = post(client, body)
        assert (refused.status_code, refused.json()) == (
            503,
            {
                "error": "webhook_not_configured",
                "detail": "No Mailgun list here has its webhook_signing_key (NEWSLETTER_LISTS), "
                "so the call cannot be verified; Mailgun retries it.",
            },
        )
        assert "webhook.not_configured backend=mailgun" in caplog.text
        assert stored_rows(database_url) == before
        assert status_of(database_url, "reader@example.org") == "confirmed"

        # Mailgun's retry, with the first attempt's signature, once the key is set.
        keyed = make_settings(database_url, smtp_port=smtp.port, lists=[mailgun_list(mailgun_url)])
        with TestClient(create_app(keyed)) as client:
            assert post(client, body).json() == ACCEPTED
        assert status_of(database_url, "reader@example.org") == "unsubscribed"

    def test_an_event_about_a_list_whose_key_is_not_set_is_refused_for_mailgun_to_retry(
        self, database_url: str, smtp: SmtpSink, mailgun_url: str
    ) -> None:
        # The account's key was set on another list only: verified with it, the event was
        # taken for one about a list not held here, acknowledged and dropped.
        events = {
            "slug": "events",
            "name": "Events",
            "backend": {**mailgun_list(mailgun_url)["backend"], "list_address": "ev@mg.org"},
        }
        keyless = make_settings(
            database_url,
            smtp_port=smtp.port,
            lists=[mailgun_list(mailgun_url, webhook_signing_key=None), events],
        )
        with TestClient(create_app(keyless)) as client:
            confirmed(client, smtp, "reader@example.org")
            refused = post(
                client, webhook(SIGNING_KEY, event("unsubscribed", "reader@example.org"))
            )
        assert (refused.status_code, refused.json()) == (
            503,
            {
                "error": "webhook_not_configured",
                "detail": "The Mailgun list 'bluehats' has no webhook_signing_key here "
                "(NEWSLETTER_LISTS), so the call cannot be verified; Mailgun retries it.",
            },
        )
        assert status_of(database_url, "reader@example.org") == "confirmed"

    def test_a_body_that_is_not_json_is_400(self, client: TestClient) -> None:
        response = client.post(
            "/v1/webhooks/mailgun",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_body"
        form = client.post("/v1/webhooks/mailgun", data={"signature": "x"})
        assert form.status_code == 415

    def test_a_compressed_event_is_415_and_changes_nothing(
        self, client: TestClient, smtp: SmtpSink, settings: Settings
    ) -> None:
        confirmed(client, smtp, "a@example.org")
        body = json.dumps(webhook(SIGNING_KEY, event("unsubscribed", "a@example.org")))
        response = client.post(
            "/v1/webhooks/mailgun",
            content=gzip.compress(body.encode()),
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )
        assert response.status_code == 415, response.text
        assert response.json()["error"] == "unsupported_media_type"
        assert response.headers["accept-encoding"] == "identity"
        assert status_of(settings.database_url, "a@example.org") == "confirmed"


class TestIgnored:
    @pytest.mark.parametrize(
        "data",
        [
            {"event": "delivered"},
            {"event": "opened"},
            {"event": "clicked", "url": "https://code.gouv.fr"},
            {"event": "failed", "severity": "temporary", "reason": "generic"},
            {"event": "accepted"},
        ],
        ids=["delivered", "opened", "clicked", "temporary-failure", "accepted"],
    )
    def test_other_events_are_acknowledged_and_change_nothing(
        self, client: TestClient, smtp: SmtpSink, settings: Settings, data: dict[str, Any]
    ) -> None:
        confirmed(client, smtp, "reader@example.org")
        before = stored_rows(settings.database_url)

        response = post(
            client, webhook(SIGNING_KEY, event(data["event"], "reader@example.org", **data))
        )

        assert response.status_code == 200
        assert response.json() == ACCEPTED
        assert status_of(settings.database_url, "reader@example.org") == "confirmed"
        # Nothing but the spent token (see TestRejected's signature used again).
        assert stored_rows(settings.database_url) == {
            **before,
            "webhook_nonce": before["webhook_nonce"] + 1,
        }

    def test_an_unknown_address_gets_the_same_answer_and_nothing_is_stored(
        self, client: TestClient, smtp: SmtpSink, settings: Settings
    ) -> None:
        confirmed(client, smtp, "known@example.org")
        # The confirmation's sync job taken by the worker: the unsubscription then queues a
        # job of its own (a job still waiting would absorb it).
        wait_until(lambda: not sync_waiting(settings.database_url))
        before = stored_rows(settings.database_url)

        known = post(client, webhook(SIGNING_KEY, event("unsubscribed", "known@example.org")))
        unknown = post(client, webhook(SIGNING_KEY, event("unsubscribed", "nobody@example.org")))

        assert (unknown.status_code, unknown.content) == (known.status_code, known.content)
        assert status_of(settings.database_url, "nobody@example.org") is None
        after = stored_rows(settings.database_url)
        # The known address: one ledger entry and one sync job; the unknown one: nothing
        # but the spent token of each call.
        assert after["subscription"] == before["subscription"]
        assert after["consent_event"] == before["consent_event"] + 1
        assert after["outbox_job"] == before["outbox_job"] + 1
        assert after["webhook_nonce"] == before["webhook_nonce"] + 2

    def test_an_event_about_another_mailgun_list_changes_nothing(
        self, client: TestClient, smtp: SmtpSink, settings: Settings
    ) -> None:
        confirmed(client, smtp, "reader@example.org")
        data = event("unsubscribed", "reader@example.org")
        data["mailing-list"] = {"address": "other-list@mail.codegouv.fr"}

        assert post(client, webhook(SIGNING_KEY, data)).json() == ACCEPTED

        assert status_of(settings.database_url, "reader@example.org") == "confirmed"
        assert backend_events(settings.database_url) == []
