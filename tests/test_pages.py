"""The hosted pages without a browser: the form's defences (honeypot, signed fill time), a
list's own fields (stored, enforced, sent to the backend), operators' wording, languages,
and the DSFR stylesheet setting with its CSP."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlmodel import Session, select

from app import consent, formguard
from app.config import Settings
from app.db import make_engine
from app.main import create_app
from app.models import ConsentEvent, KeyScope, Subscription, utcnow
from tests.conftest import (
    SECRET,
    SmtpSink,
    api_key_headers,
    count_rows,
    link_in,
    make_settings,
    wait_until,
)
from tests.fake_listmonk import FakeListmonk
from tests.fake_mailgun import FakeMailgun

PAGE = "/v1/lists/bluehats"
SUBSCRIBE = "/v1/lists/bluehats/subscriptions"
HTML = {"accept": "text/html,application/xhtml+xml", "accept-language": "fr-FR,fr;q=0.9"}
FIELDS = [
    {
        "name": "name",
        "label": {"fr": "Vos nom et prénom", "en": "Your full name"},
        "autocomplete": "name",
    },
    {
        "name": "organisation",
        "label": {"fr": "Votre administration", "en": "Your organisation"},
        "required": True,
        "max_length": 40,
        "autocomplete": "organization",
    },
    {"name": "site", "label": {"fr": "Site web", "en": "Website"}, "type": "url"},
]


def list_settings(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"slug": "bluehats", "name": "Gazette BlueHats"}
    values.update(overrides)
    return values


def app_client(
    database_url: str, smtp: SmtpSink, *, lists: list[dict[str, Any]] | None = None, **extra: Any
) -> TestClient:
    settings = make_settings(
        database_url,
        smtp_port=smtp.port,
        lists=lists or [list_settings()],
        # The fill time is tested here with stamps made in the past.
        form_min_fill_time="3s",
        **extra,
    )
    return TestClient(create_app(settings))


@pytest.fixture
def client(database_url: str, smtp: SmtpSink) -> Iterator[TestClient]:
    with app_client(database_url, smtp, lists=[list_settings(fields=FIELDS)]) as test_client:
        yield test_client


def stamp(*, age: timedelta = timedelta(seconds=10), key: str = SECRET) -> str:
    return formguard.issue(key=key.encode(), now=utcnow() - age)


def edited(stamp: str) -> str:
    """The same signature on an earlier time: what a bot would try to pass the fill time."""
    millis, _, signature = stamp.partition(".")
    return f"{int(millis) - 60_000}.{signature}"


def post_form(client: TestClient, fields: dict[str, str], **headers: str) -> Any:
    return client.post(SUBSCRIBE, data=fields, headers=headers, follow_redirects=False)


def stored(database_url: str) -> list[Subscription]:
    engine = make_engine(database_url)
    with Session(engine) as session:
        rows = list(session.exec(select(Subscription)).all())
    engine.dispose()
    return rows


def input_tag(html: str, name: str) -> str:
    match = re.search(rf'<input[^>]*\bname="{name}"[^>]*>', html)
    assert match, f"no input named {name}"
    return match[0]


def stamp_in(html: str) -> str:
    match = re.search(r'name="form_stamp" value="([^"]+)"', html)
    assert match
    return match[1]


class TestTheHostedPage:
    def test_shows_the_list_its_fields_the_consent_wording_and_its_version(
        self, client: TestClient
    ) -> None:
        page = client.get(PAGE, headers=HTML)
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        html = page.text
        assert '<html lang="fr">' in html
        assert "<title>S&#39;inscrire à Gazette BlueHats - Gazette BlueHats</title>" in html
        assert 'action="http://testserver/v1/lists/bluehats/subscriptions?lang=fr"' in html
        assert 'type="email"' in input_tag(html, "email")
        assert 'autocomplete="email"' in input_tag(html, "email")
        assert '<label class="fr-label" for="field-organisation">Votre administration' in html
        assert 'maxlength="40"' in input_tag(html, "organisation")
        assert "required" in input_tag(html, "organisation")
        assert "required" not in input_tag(html, "name")
        assert "Vos nom et prénom (facultatif)" in html
        assert 'type="url"' in input_tag(html, "site")
        assert "accepte de recevoir Gazette BlueHats par courriel" in html
        assert "Version du texte de consentement : 2026-11" in html
        assert 'value="2026-11"' in input_tag(html, "consent_version")
        honeypot = input_tag(html, "website")
        assert 'tabindex="-1"' in honeypot
        assert 'autocomplete="off"' in honeypot
        assert '<div class="fr-input-group fr-sr-only">' in html
        assert "Laissez ce champ vide" in html
        assert formguard.check_stamp(
            stamp_in(html),
            key=SECRET.encode(),
            now=utcnow() + timedelta(seconds=5),
            min_fill_time=timedelta(seconds=3),
            max_age=timedelta(days=1),
            required=True,
        ) == (formguard.Verdict.ACCEPTED)

    def test_an_unknown_list_is_an_error_page_that_says_so_in_its_title(
        self, client: TestClient
    ) -> None:
        page = client.get("/v1/lists/nope", headers={"accept-language": "en"})
        assert page.status_code == 404
        assert page.headers["content-type"].startswith("text/html")
        assert (
            "<title>Error - Mailing list not found - Newsletter subscriptions</title>" in page.text
        )
        assert "This mailing list does not exist." in page.text
        as_json = client.get("/v1/lists/nope", headers={"accept": "application/json"})
        assert as_json.json()["error"] == "list_not_found"

    def test_a_list_s_page_typed_with_capitals_leads_to_the_list_s_page(
        self, client: TestClient
    ) -> None:
        """`/v1/lists/BlueHats`, as the newsletter's name is written on a poster, was "no
        such list": every list's name in its address is in lowercase."""
        for typed, meant in (
            ("/v1/lists/BlueHats", "/v1/lists/bluehats"),
            ("/v1/lists/BLUEHATS/unsubscribe?lang=en", "/v1/lists/bluehats/unsubscribe?lang=en"),
            ("/v1/lists/Nope", "/v1/lists/nope"),
        ):
            answer = client.get(typed, headers=HTML, follow_redirects=False)
            assert answer.status_code == 308, typed
            assert answer.headers["location"] == meant
        assert client.get("/v1/lists/BlueHats", headers=HTML).status_code == 200
        assert client.get("/v1/lists/Nope", headers=HTML).status_code == 404
        # A form posting to it is not sent elsewhere: its post is an API call.
        posted = client.post("/v1/lists/BlueHats/subscriptions", json={"email": "a@example.org"})
        assert posted.status_code == 404


class TestHoneypot:
    def test_a_filled_honeypot_is_answered_as_a_success_and_dropped(
        self, client: TestClient, database_url: str
    ) -> None:
        before = formguard.rejection_counts().get("honeypot", 0)
        response = post_form(
            client,
            {
                "email": "bot@example.org",
                "organisation": "Bots Inc",
                "website": "http://spam.example",
                "form_stamp": stamp(),
            },
        )
        assert response.status_code == 303
        assert response.headers["location"] == (
            "http://testserver/v1/lists/bluehats/thanks?lang=fr"
        )
        assert stored(database_url) == []
        assert count_rows(database_url, "outbox_job") == 0
        assert count_rows(database_url, "consent_event") == 0
        assert formguard.rejection_counts()["honeypot"] == before + 1

    def test_an_empty_honeypot_lets_the_post_through(
        self, client: TestClient, database_url: str, smtp: SmtpSink
    ) -> None:
        response = post_form(
            client,
            {
                "email": "person@example.org",
                "organisation": "DINUM",
                "website": "",
                "form_stamp": stamp(),
            },
        )
        assert response.status_code == 303
        assert [row.email for row in stored(database_url)] == ["person@example.org"]
        smtp.mail_to("person@example.org", link="confirm")


class TestFillTime:
    @pytest.mark.parametrize(
        ("case", "make_stamp", "reason", "accept"),
        [
            ("other-key", lambda: stamp(key="another-key"), "forged", "text/html"),
            ("edited-time", lambda: edited(stamp()), "forged", "text/html"),
            ("garbage", lambda: "yesterday", "forged", "text/html"),
            # A stamped post that does not ask for a page is a script's, not a browser's.
            ("script-too-fast", lambda: stamp(age=timedelta(seconds=1)), "too_fast", "*/*"),
            ("script-too-old", lambda: stamp(age=timedelta(days=2)), "too_old", "*/*"),
        ],
    )
    def test_a_bad_stamp_is_answered_as_a_success_and_dropped(
        self,
        client: TestClient,
        database_url: str,
        case: str,
        make_stamp: Any,
        reason: str,
        accept: str,
    ) -> None:
        before = formguard.rejection_counts().get(reason, 0)
        response = post_form(
            client,
            {"email": f"{case}@example.org", "organisation": "X", "form_stamp": make_stamp()},
            accept=accept,
        )
        assert response.status_code == 303
        assert response.headers["location"].endswith("/v1/lists/bluehats/thanks?lang=fr")
        assert stored(database_url) == []
        assert count_rows(database_url, "outbox_job") == 0
        assert formguard.rejection_counts()[reason] == before + 1

    def test_a_stamp_past_the_fill_time_is_accepted(
        self, client: TestClient, database_url: str
    ) -> None:
        response = post_form(
            client,
            {"email": "patient@example.org", "organisation": "X", "form_stamp": stamp()},
        )
        assert response.status_code == 303
        assert [row.email for row in stored(database_url)] == ["patient@example.org"]

    def test_a_post_without_stamp_is_accepted_when_the_list_does_not_require_one(
        self, client: TestClient, database_url: str
    ) -> None:
        # The site's own static form has no stamp.
        response = post_form(client, {"email": "site@example.org", "organisation": "X"})
        assert response.status_code == 303
        assert [row.email for row in stored(database_url)] == ["site@example.org"]

    def test_a_post_without_stamp_is_dropped_when_the_list_requires_one(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        strict = list_settings(require_form_stamp=True)
        before = formguard.rejection_counts().get("missing", 0)
        with app_client(database_url, smtp, lists=[strict]) as client:
            response = post_form(client, {"email": "site@example.org"})
            assert response.status_code == 303
            assert stored(database_url) == []
            assert formguard.rejection_counts()["missing"] == before + 1
            stamped = post_form(client, {"email": "site@example.org", "form_stamp": stamp()})
            assert stamped.status_code == 303
            assert [row.email for row in stored(database_url)] == ["site@example.org"]

    def test_a_press_at_once_gets_the_form_back_and_the_second_press_subscribes(
        self, client: TestClient, database_url: str, smtp: SmtpSink
    ) -> None:
        """The browser fills the address in and the visitor presses at once: that post was
        answered "check your inbox" and dropped, and no mail ever came."""
        before = formguard.rejection_counts().get("too_fast", 0)
        html = client.get(PAGE, headers=HTML).text
        fields = {
            "email": "Camille.Quick@example.org",
            "organisation": "DINUM",
            "website": "",
            "locale": "fr",
            "form_stamp": stamp_in(html),
        }
        first = post_form(client, fields, **HTML)
        assert first.status_code == 422
        assert "Votre demande n&#39;est pas encore envoyée" in first.text
        assert "appuyez de nouveau sur le bouton « M&#39;inscrire »" in first.text
        assert 'value="Camille.Quick@example.org"' in input_tag(first.text, "email")
        assert 'value="DINUM"' in input_tag(first.text, "organisation")
        assert 'aria-invalid="true"' not in first.text
        assert stored(database_url) == []
        assert count_rows(database_url, "outbox_job") == 0
        assert count_rows(database_url, "consent_event") == 0
        assert smtp.messages == []
        assert formguard.rejection_counts()["too_fast"] == before + 1

        second = post_form(client, {**fields, "form_stamp": stamp_in(first.text)}, **HTML)
        assert second.status_code == 303
        assert second.headers["location"] == "http://testserver/v1/lists/bluehats/thanks?lang=fr"
        assert [row.email for row in stored(database_url)] == ["Camille.Quick@example.org"]
        smtp.mail_to("Camille.Quick@example.org", link="confirm")
        assert formguard.rejection_counts()["too_fast"] == before + 1

    def test_a_page_left_open_overnight_comes_back_in_its_language_to_send_again(
        self, client: TestClient, database_url: str, smtp: SmtpSink
    ) -> None:
        before = formguard.rejection_counts().get("too_old", 0)
        fields = {
            "email": "sleepy@example.org",
            "organisation": "DINUM",
            "website": "",
            "locale": "en",
            "form_stamp": stamp(age=timedelta(days=1, hours=2)),
        }
        first = post_form(client, fields, **HTML)
        assert first.status_code == 422
        assert '<html lang="en">' in first.text
        assert (
            "Your request has not been sent yet. Check your email address, then press "
            "the “Subscribe” button again." in first.text
        )
        assert 'value="sleepy@example.org"' in input_tag(first.text, "email")
        assert stored(database_url) == []
        assert count_rows(database_url, "outbox_job") == 0
        assert formguard.rejection_counts()["too_old"] == before + 1

        second = post_form(client, {**fields, "form_stamp": stamp_in(first.text)}, **HTML)
        assert second.status_code == 303
        assert second.headers["location"].endswith("/v1/lists/bluehats/thanks?lang=en")
        message = smtp.mail_to("sleepy@example.org", link="confirm")
        assert message["Content-Language"] == "en"
        assert len(smtp.messages) == 1

    def test_a_visitor_who_corrects_a_typo_at_once_is_not_dropped_as_too_fast(
        self, client: TestClient, database_url: str, smtp: SmtpSink
    ) -> None:
        # The site's form (no stamp) with a mistyped address: the page comes back, and the
        # visitor fixes it within the fill time. That post must not be dropped as a robot's
        # while the page says "check your inbox".
        before = formguard.rejection_counts().get("too_fast", 0)
        refused = post_form(
            client, {"email": "camille@exemple", "organisation": "DINUM", "website": ""}, **HTML
        )
        assert refused.status_code == 422
        response = post_form(
            client,
            {
                "email": "camille@example.org",
                "organisation": "DINUM",
                "website": "",
                "form_stamp": stamp_in(refused.text),
            },
            **HTML,
        )
        assert response.status_code == 303
        assert [row.email for row in stored(database_url)] == ["camille@example.org"]
        assert formguard.rejection_counts().get("too_fast", 0) == before
        smtp.mail_to("camille@example.org", link="confirm")

    def test_one_who_asks_again_from_a_dead_link_s_page_at_once_is_not_dropped_as_too_fast(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        """The expired link's page: one field the browser fills in, one button, pressed
        within the fill time, and the page said "check your inbox" while nothing came. A
        link of a real mail shows the visitor filled the list's form before."""
        with app_client(database_url, smtp, resend_interval="0s") as client:
            client.post(SUBSCRIBE, json={"email": "late@example.org"})
            link = link_in(smtp.mail_to("late@example.org", link="confirm"), "confirm")
            engine = make_engine(database_url)
            with engine.begin() as connection:
                connection.execute(sa.text("UPDATE token SET expires_at = :now"), {"now": utcnow()})
            engine.dispose()
            before = formguard.rejection_counts().get("too_fast", 0)
            expired = client.get(link, headers=HTML)
            assert expired.status_code == 410
            again = post_form(
                client,
                {"email": "late@example.org", "form_stamp": stamp_in(expired.text)},
                **HTML,
            )
            assert again.status_code == 303
            assert formguard.rejection_counts().get("too_fast", 0) == before
            assert len(smtp.wait_for(2)) == 2

            # A made-up link's page is anyone's: its form keeps the fill time.
            unknown = client.get("/v1/confirm/" + "A" * 43, headers=HTML)
            assert unknown.status_code == 404
            sent_back = post_form(
                client,
                {"email": "robot@example.org", "form_stamp": stamp_in(unknown.text)},
                **HTML,
            )
            assert sent_back.status_code == 422
            assert "pas encore envoyée" in sent_back.text
            assert formguard.rejection_counts().get("too_fast", 0) == before + 1
            assert "robot@example.org" not in [row.email for row in stored(database_url)]

    def test_json_callers_have_no_form_defences(
        self, client: TestClient, database_url: str
    ) -> None:
        response = client.post(
            SUBSCRIBE, json={"email": "api@example.org", "attributes": {"organisation": "X"}}
        )
        assert response.status_code == 202
        assert [row.email for row in stored(database_url)] == ["api@example.org"]


class TestTheSitesForm:
    def test_a_plain_form_post_from_the_site_goes_to_its_thank_you_url(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        site = list_settings(
            fields=FIELDS,
            thank_you_url="https://code.gouv.fr/merci",
            landing_url="https://code.gouv.fr/",
        )
        with app_client(
            database_url, smtp, lists=[site], allowed_origins=["https://code.gouv.fr"]
        ) as client:
            # What a browser sends for the README's form on code.gouv.fr: no stamp, an
            # empty honeypot, another origin, no JavaScript.
            response = post_form(
                client,
                {
                    "email": "site@example.org",
                    "organisation": "DINUM",
                    "website": "",
                    "locale": "fr",
                },
                origin="https://code.gouv.fr",
                referer="https://code.gouv.fr/fr/bluehats/",
                **HTML,
            )
            assert response.status_code == 303
            assert response.headers["location"] == "https://code.gouv.fr/merci"
            # Our pages may send their forms on to the site (CSP form-action).
            csp = client.get(PAGE).headers["content-security-policy"]
            assert "form-action 'self' https://code.gouv.fr;" in csp
            # While the app (and its in-process worker) still runs.
            smtp.mail_to("site@example.org", link="confirm")
        [row] = stored(database_url)
        assert row.attributes == {"organisation": "DINUM"}

    def test_the_page_of_a_list_created_through_the_api_may_lead_to_its_thank_you_page(
        self, client: TestClient, engine: sa.Engine, smtp: SmtpSink
    ) -> None:
        """Its thank-you page is not in the settings, whose origins every page's CSP names:
        the list's own page adds it, or the browser refuses the post's redirect there."""
        key = api_key_headers(engine, "operator", KeyScope.WRITE)
        created = client.post(
            "/v1/admin/lists",
            json={"slug": "events", "name": "Events", "thank_you_url": "https://events.example/ok"},
            headers=key,
        )
        assert created.status_code == 201, created.text
        page = client.get("/v1/lists/events", headers=HTML)
        # The form sent back for correction too.
        corrected = client.post(
            "/v1/lists/events/subscriptions", data={"email": "not an address"}, headers=HTML
        )
        assert corrected.status_code == 422
        for answer in (page, corrected):
            csp = answer.headers["content-security-policy"]
            assert "form-action 'self' https://events.example;" in csp
        taken = client.post(
            "/v1/lists/events/subscriptions",
            data={"email": "events@example.org"},
            headers=HTML,
            follow_redirects=False,
        )
        assert taken.status_code == 303
        assert taken.headers["location"] == "https://events.example/ok"
        # Only there: another list's page does not lead there.
        assert "events.example" not in client.get(PAGE).headers["content-security-policy"]

        # Its dead link's page (whose CSP does not know that page) leads to the list's own
        # page rather than posting a form of its own.
        client.post("/v1/lists/events/subscriptions", json={"email": "late@example.org"})
        link = link_in(smtp.mail_to("late@example.org", link="confirm"), "confirm")
        client.post(link)
        page = client.get(link, headers=HTML)
        assert page.status_code == 409
        assert 'name="email"' not in page.text
        assert '<a class="fr-link" href="/v1/lists/events?lang=fr">' in page.text

    @pytest.mark.parametrize(
        ("language", "title"),
        [("fr", "Erreur - Formulaire illisible"), ("en", "Error - Form could not be read")],
    )
    def test_a_form_the_site_sent_in_another_encoding_gets_a_page_that_says_so(
        self, database_url: str, smtp: SmtpSink, language: str, title: str
    ) -> None:
        with app_client(
            database_url, smtp, lists=[list_settings()], allowed_origins=["https://code.gouv.fr"]
        ) as client:
            # What a browser sends for a form without accept-charset on a windows-1252 page.
            response = client.post(
                SUBSCRIBE,
                content=b"email=site%40example.org&name=Cl%E9mence",
                headers={
                    **HTML,
                    "content-type": "application/x-www-form-urlencoded",
                    "origin": "https://code.gouv.fr",
                    "accept-language": language,
                },
                follow_redirects=False,
            )
        assert response.status_code == 400
        # Not the generic "try again in a moment": the same form fails the same way.
        assert f"<title>{title} - " in response.text
        assert stored(database_url) == []


class TestCustomFields:
    def test_declared_fields_are_stored_as_attributes_and_others_ignored(
        self, client: TestClient, database_url: str
    ) -> None:
        response = post_form(
            client,
            {
                "email": "camille@example.org",
                "name": "  Camille Martin ",
                "organisation": "DINUM",
                "site": "",
                "undeclared": "ignored",
                "form_stamp": stamp(),
            },
        )
        assert response.status_code == 303
        [row] = stored(database_url)
        assert row.attributes == {"name": "Camille Martin", "organisation": "DINUM"}

    def test_the_ledger_keeps_the_consent_version_the_page_showed(
        self, client: TestClient, database_url: str
    ) -> None:
        html = client.get(PAGE).text
        assert 'name="consent_version" value="2026-11"' in html
        response = post_form(
            client,
            {
                "email": "camille@example.org",
                "organisation": "DINUM",
                "consent_version": "2026-11",
                "form_stamp": stamp(),
            },
        )
        assert response.status_code == 303
        engine = make_engine(database_url)
        with Session(engine) as session:
            [event] = session.exec(select(ConsentEvent)).all()
        engine.dispose()
        assert (event.source, event.consent_version) == ("form", "2026-11")
        assert event.detail["consent_version_shown"] == "2026-11"

    def test_a_consent_version_no_page_of_ours_shows_is_not_recorded_and_the_proof_works(
        self, client: TestClient, database_url: str, subtests: pytest.Subtests
    ) -> None:
        cases = {"nul": "\x00", "escape": "2026-11\x1b[2J", "too-long": "v" * 65}
        for n, (name, value) in enumerate(cases.items()):
            with subtests.test(name):
                email = f"camille{n}@example.org"
                response = post_form(
                    client,
                    {
                        "email": email,
                        "organisation": "DINUM",
                        "consent_version": value,
                        "form_stamp": stamp(),
                    },
                )
                assert response.status_code == 303
                engine = make_engine(database_url)
                with Session(engine) as session:
                    [row] = [row for row in stored(database_url) if row.email == email]
                    [event] = session.exec(
                        select(ConsentEvent).where(ConsentEvent.subscription_id == row.id)
                    ).all()
                    assert "consent_version_shown" not in event.detail
                    assert event.consent_version == "2026-11"
                    proof = consent.proof_by_address(session, list_slug="bluehats", email_key=email)
                    assert list(proof.wordings) == ["2026-11"]
                engine.dispose()
        with subtests.test("recorded-before"):
            # A NUL recorded before the form's value was checked: the proof is still given.
            engine = make_engine(database_url)
            with Session(engine) as session:
                event = session.exec(select(ConsentEvent)).first()
                assert event is not None
                event.detail = {"consent_version_shown": "\x00"}
                session.add(event)
                session.commit()
                subscription = session.get(Subscription, event.subscription_id)
                assert subscription is not None
                proof = consent.proof(session, subscription=subscription)
                assert list(proof.wordings) == ["2026-11"]
            engine.dispose()

    def test_bad_input_brings_the_form_back_with_values_kept_and_errors_tied_to_fields(
        self, client: TestClient, database_url: str
    ) -> None:
        response = post_form(
            client,
            {
                "email": "camille.example.org",
                "name": "Camille <b>Martin</b>",
                "organisation": "",
                "site": "ftp://example.org",
                "form_stamp": stamp(),
            },
            **HTML,
        )
        assert response.status_code == 422
        html = response.text
        assert html.startswith("<!DOCTYPE html>")
        assert "<title>Erreur - S&#39;inscrire à Gazette BlueHats" in html
        # The summary at the top links each error to its field.
        start = html.index('id="error-summary"')
        summary = html[start : html.index("</ul>", start)]
        assert html.index("error-summary") < html.index("<form")
        assert 'role="alert"' in html[start - 60 : start + 60]
        assert summary.index("#field-email") < summary.index("#field-organisation")
        assert summary.index("#field-organisation") < summary.index("#field-site")
        assert "#field-name" not in summary
        for name in ("email", "organisation", "site"):
            tag = input_tag(html, name)
            assert 'aria-invalid="true"' in tag
            assert f"field-{name}-error" in tag
            assert f'id="field-{name}-error"' in html
        assert 'aria-invalid="true"' not in input_tag(html, "name")
        assert 'value="camille.example.org"' in input_tag(html, "email")
        # Kept, and escaped.
        assert 'value="Camille &lt;b&gt;Martin&lt;/b&gt;"' in input_tag(html, "name")
        assert "Remplissez le champ « Votre administration »." in html
        assert "commençant par https://" in html
        assert stored(database_url) == []

    def test_too_long_a_value_is_refused_in_english_too(
        self, client: TestClient, database_url: str
    ) -> None:
        response = post_form(
            client,
            {
                "email": "camille@example.org",
                "organisation": "X" * 41,
                "locale": "en",
                "form_stamp": stamp(),
            },
            accept="text/html",
        )
        assert response.status_code == 422
        assert '<html lang="en">' in response.text
        assert "“Your organisation” must be at most 40 characters long" in response.text
        assert stored(database_url) == []

    def test_a_json_caller_gets_the_usual_json_error_for_a_declared_field(
        self, client: TestClient, database_url: str
    ) -> None:
        response = client.post(SUBSCRIBE, json={"email": "camille@example.org"})
        assert response.status_code == 422
        assert response.json() == {
            "error": "validation_error",
            "detail": "attributes.organisation: Field required",
        }
        form_without_html = post_form(client, {"email": "camille@example.org"})
        assert form_without_html.status_code == 422
        assert form_without_html.json()["detail"] == "attributes.organisation: Field required"
        # Blank is no answer from either (the form trims what it reads).
        for answer in ("   ", "\u00a0"):
            blank = {"email": "camille@example.org", "attributes": {"organisation": answer}}
            response = client.post(SUBSCRIBE, json=blank)
            assert response.status_code == 422, answer
            assert response.json()["detail"] == "attributes.organisation: Field required"
        assert stored(database_url) == []

    def test_a_json_caller_s_declared_fields_are_stored_trimmed_as_a_form_s(
        self, client: TestClient, database_url: str
    ) -> None:
        attributes = {"organisation": "  DINUM  ", "undeclared": " kept as sent "}
        response = client.post(
            SUBSCRIBE, json={"email": "camille@example.org", "attributes": attributes}
        )
        assert response.status_code == 202
        [subscription] = stored(database_url)
        assert subscription.attributes == {"organisation": "DINUM", "undeclared": " kept as sent "}

    def test_fields_reach_mailgun_as_member_variables(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        fake = FakeMailgun()
        fake.create_list("bluehats@mail.codegouv.fr")
        with fake.serve() as base_url:
            backend = {
                "kind": "mailgun",
                "list_address": "bluehats@mail.codegouv.fr",
                "api_key": FakeMailgun.api_key,
                "base_url": base_url,
            }
            lists = [list_settings(fields=FIELDS, backend=backend)]
            with app_client(database_url, smtp, lists=lists) as client:
                sent = post_form(
                    client,
                    {
                        "email": "camille@example.org",
                        "name": "Camille Martin",
                        "organisation": "DINUM",
                        "site": "https://code.gouv.fr",
                        "form_stamp": stamp(),
                    },
                )
                assert sent.status_code == 303
                confirm = link_in(smtp.mail_to("camille@example.org", link="confirm"), "confirm")
                assert client.post(confirm, headers=HTML).status_code == 200
                member = wait_until(
                    lambda: fake.member("bluehats@mail.codegouv.fr", "camille@example.org")
                )
        assert member.name == "Camille Martin"
        assert member.vars["organisation"] == "DINUM"
        assert member.vars["site"] == "https://code.gouv.fr"
        assert member.vars["unsubscribe_url"].startswith("http://testserver/v1/unsubscribe/")

    def test_fields_reach_listmonk_as_attribs_and_the_name_as_its_name(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        with FakeListmonk() as fake:
            backend = {
                "kind": "listmonk",
                "base_url": fake.url,
                "username": "sync-bot",
                "api_token": FakeListmonk.token,
                # The list the fake starts with.
                "list_id": 3,
            }
            lists = [list_settings(fields=FIELDS, backend=backend)]
            with app_client(database_url, smtp, lists=lists) as client:
                sent = post_form(
                    client,
                    {
                        "email": "ada@example.org",
                        "name": "Ada Lovelace",
                        "organisation": "DINUM",
                        "form_stamp": stamp(),
                    },
                )
                assert sent.status_code == 303
                confirm = link_in(smtp.mail_to("ada@example.org", link="confirm"), "confirm")
                assert client.post(confirm, headers=HTML).status_code == 200
                subscriber = wait_until(lambda: fake.subscriber("ada@example.org"))
        assert subscriber["name"] == "Ada Lovelace"
        assert subscriber["attribs"]["organisation"] == "DINUM"
        assert "name" not in subscriber["attribs"]

    def test_a_reserved_or_repeated_field_name_is_refused_at_start(self, database_url: str) -> None:
        with pytest.raises(ValidationError, match="reserved"):
            make_settings(
                database_url,
                smtp_port=25,
                lists=[list_settings(fields=[{"name": "email", "label": {"fr": "x"}}])],
            )
        with pytest.raises(ValidationError, match="repeated: site"):
            make_settings(
                database_url,
                smtp_port=25,
                lists=[list_settings(fields=[FIELDS[2], FIELDS[2]])],
            )


class TestStrings:
    def test_operators_reword_a_page_per_list_and_language(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        reworded = list_settings(
            strings={
                "fr": {"page.subscribe.title": "Abonnez-vous à {list} !"},
                "en": {"page.subscribe.button": "Sign me up"},
            },
            consent_text={"en": "Our own consent text for {list}."},
        )
        with app_client(database_url, smtp, lists=[reworded]) as client:
            french = client.get(PAGE, headers=HTML).text
            english = client.get(PAGE + "?lang=en").text
        assert "<h1>Abonnez-vous à Gazette BlueHats !</h1>" in french
        assert ">M&#39;inscrire</button>" in french
        assert "<h1>Subscribe to Gazette BlueHats</h1>" in english
        assert ">Sign me up</button>" in english
        assert "Our own consent text for Gazette BlueHats." in english

    def test_an_unknown_string_key_is_refused_at_start(self, database_url: str) -> None:
        with pytest.raises(
            ValidationError, match=r"unknown fr string keys: page\.subscribe\.titel"
        ):
            make_settings(
                database_url,
                smtp_port=25,
                lists=[list_settings(strings={"fr": {"page.subscribe.titel": "x"}})],
            )

    def test_a_wording_in_paragraphs_is_shown_in_paragraphs(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        """Line breaks in an operator's wording (which the mails keep) ran together into one
        paragraph on the page: the consent text the visitor agrees to, as written."""
        reworded = list_settings(
            consent_text={
                "fr": "J'accepte de recevoir {list}.\n\nMes droits : accès, rectification.\n"
                "Contact : <dpo@example.org>"
            },
            strings={"fr": {"page.thanks.text": "Merci !\r\n\r\nOuvrez le message reçu."}},
        )
        with app_client(database_url, smtp, lists=[reworded]) as client:
            page = client.get(PAGE, headers=HTML).text
            thanks = client.get(PAGE + "/thanks", headers=HTML).text
        assert (
            '<div class="fr-text" id="consent-text"><p>J&#39;accepte de recevoir Gazette '
            "BlueHats.</p><p>Mes droits : accès, rectification.<br>\n"
            "Contact : &lt;dpo@example.org&gt;</p></div>"
        ) in page
        assert "<p>Merci !</p><p>Ouvrez le message reçu.</p>" in thanks


class TestLanguage:
    def test_accept_language_chooses_and_the_switch_leads_to_the_other_language(
        self, client: TestClient
    ) -> None:
        english = client.get(PAGE, headers={"accept-language": "en-GB,en;q=0.9,fr;q=0.5"}).text
        assert '<html lang="en">' in english
        assert "<h1>Subscribe to Gazette BlueHats</h1>" in english
        switch = re.search(r'<a class="fr-link fr-translate__language"[^>]*>([^<]*)</a>', english)
        assert switch is not None
        assert 'href="/v1/lists/bluehats?lang=fr"' in switch[0]
        assert 'hreflang="fr"' in switch[0]
        assert 'lang="fr"' in switch[0]
        assert switch[1] == "Français"

        french = client.get("/v1/lists/bluehats?lang=fr", headers={"accept-language": "en"}).text
        assert '<html lang="fr">' in french
        assert 'href="/v1/lists/bluehats?lang=en" hreflang="en" lang="en">English</a>' in french

    def test_without_a_preference_the_lists_language_applies(self, client: TestClient) -> None:
        assert '<html lang="fr">' in client.get(PAGE).text

    def test_a_result_page_after_a_post_switches_to_its_own_page(
        self, client: TestClient, smtp: SmtpSink
    ) -> None:
        post_form(
            client,
            {"email": "camille@example.org", "organisation": "X", "locale": "en"},
        )
        confirm = link_in(smtp.mail_to("camille@example.org", link="confirm"), "confirm")
        interstitial = client.get(confirm).text
        assert '<html lang="en">' in interstitial
        assert f'href="{confirm}?lang=fr"' in interstitial
        done = client.post(confirm, headers={"accept": "text/html"}).text
        assert "<h1>Subscription confirmed</h1>" in done
        assert 'href="/v1/lists/bluehats/confirmed?lang=fr"' in done
        other = client.get("/v1/lists/bluehats/confirmed?lang=fr")
        assert other.status_code == 200
        assert "<h1>Inscription confirmée</h1>" in other.text

    def test_error_pages_have_a_switch_and_a_title_that_says_error(
        self, client: TestClient
    ) -> None:
        page = client.get("/v1/confirm/" + "A" * 43, headers={"accept-language": "fr"})
        assert page.status_code == 404
        assert "<title>Erreur - Lien non valide - " in page.text
        assert 'hreflang="en"' in page.text
        assert "?lang=en" in page.text

    def test_the_switch_of_a_path_with_a_doubled_leading_slash_stays_on_this_host(
        self, client: TestClient
    ) -> None:
        # httpx would read "//evil.example/x" alone as another host: the full URL keeps it
        # a path, as a browser sends it and nginx passes it on.
        for path in ("//evil.example/x", "///evil.example/x"):
            page = client.get(f"http://testserver{path}", headers={"accept": "text/html"})
            assert page.status_code == 404
            switch = re.search(r'href="([^"]*)" hreflang="en"', page.text)
            assert switch is not None
            assert not switch[1].startswith("//")
            assert switch[1] == "/%2F" + path[2:] + "?lang=en"


class TestResultPages:
    """The page after a link's button is the same for everyone on a list in one language,
    and is rendered once: what it shows must still follow the list and the language."""

    def _confirm(
        self, client: TestClient, smtp: SmtpSink, slug: str, address: str, locale: str
    ) -> str:
        body: dict[str, Any] = {"email": address, "locale": locale}
        if slug == "bluehats":  # its declared fields ask for one
            body["attributes"] = {"organisation": "DINUM"}
        sent = client.post(f"/v1/lists/{slug}/subscriptions", json=body)
        assert sent.status_code == 202, sent.text
        link = link_in(smtp.mail_to(address, link="confirm"), "confirm")
        done = client.post(link, headers={"accept": "text/html"})
        assert done.status_code == 200, done.text
        return done.text

    def test_a_list_changed_through_the_api_shows_its_new_name_and_way_on(
        self, client: TestClient, smtp: SmtpSink, write_key: dict[str, str]
    ) -> None:
        made = client.post(
            "/v1/admin/lists",
            json={"slug": "made-here", "name": "Made here", "landing_url": "https://a.example/"},
            headers=write_key,
        )
        assert made.status_code == 201, made.text
        first = self._confirm(client, smtp, "made-here", "one@example.org", "en")
        assert "Made here" in first
        assert 'href="https://a.example/"' in first

        changed = client.patch(
            "/v1/admin/lists/made-here",
            json={
                "name": "Renamed here",
                "landing_url": "https://b.example/",
                "consent_version": "renamed",
            },
            headers=write_key,
        )
        assert changed.status_code == 200, changed.text
        second = self._confirm(client, smtp, "made-here", "two@example.org", "en")
        assert "Renamed here" in second
        assert 'href="https://b.example/"' in second
        assert "Made here" not in second
        assert "a.example" not in second

    def test_each_language_and_each_result_has_its_own_page(
        self, client: TestClient, smtp: SmtpSink
    ) -> None:
        english = self._confirm(client, smtp, "bluehats", "en@example.org", "en")
        french = self._confirm(client, smtp, "bluehats", "fr@example.org", "fr")
        assert '<html lang="en">' in english
        assert "<h1>Subscription confirmed</h1>" in english
        assert '<html lang="fr">' in french
        assert "<h1>Inscription confirmée</h1>" in french
        again = self._confirm(client, smtp, "bluehats", "en2@example.org", "en")
        assert again == english

        asked = client.post("/v1/lists/bluehats/unsubscriptions", json={"email": "en@example.org"})
        assert asked.status_code == 202
        link = link_in(smtp.mail_to("en@example.org", link="unsubscribe"), "unsubscribe")
        left = client.post(link, headers={"accept": "text/html"})
        assert left.status_code == 200
        assert '<html lang="en">' in left.text
        assert "Subscription confirmed" not in left.text
        assert 'href="/v1/lists/bluehats/unsubscribed?lang=fr"' in left.text


class TestErrorPages:
    def test_with_several_lists_a_confirm_link_not_found_leads_to_each_list_s_page(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        """A link cut short does not say its list. With one list, its page offers the new
        link it speaks of; with several, it offered nothing (tests/test_unsubscribe_page.py:
        the same for an unsubscribe link)."""
        lists = [list_settings(), list_settings(slug="news", name="Actualités")]
        with app_client(database_url, smtp, lists=lists) as client:
            page = client.get("/v1/confirm/" + "A" * 30, headers=HTML)
        assert page.status_code == 404
        label = "Recevoir un nouveau lien pour l&#39;une de ces lettres :"
        assert f'<p id="list-links">{label}</p>' in page.text
        assert '<li><a class="fr-link" href="/v1/lists/bluehats?lang=fr">' in page.text
        assert '<li><a class="fr-link" href="/v1/lists/news?lang=fr">Actualités</a>' in page.text

    def test_too_many_posts_get_a_page_that_says_so_with_retry_after(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        with app_client(database_url, smtp, rate_limit_per_ip="1/minute") as client:
            fields = {"email": "busy@example.org", "form_stamp": stamp()}
            assert post_form(client, fields, **HTML).status_code == 303
            page = post_form(client, fields, **HTML)
        assert page.status_code == 429
        assert page.headers["retry-after"]
        assert "<title>Erreur - Trop de demandes - " in page.text
        assert "Trop de demandes sont venues de votre réseau" in page.text
        # A POST cannot be replayed by a link: the switch leads to the list's form.
        assert 'href="/v1/lists/bluehats?lang=en"' in page.text

    def test_without_a_browser_preference_error_pages_speak_the_list_s_language(
        self, database_url: str, smtp: SmtpSink, subtests: pytest.Subtests
    ) -> None:
        english = list_settings(default_locale="en")
        with app_client(
            database_url, smtp, lists=[english], rate_limit_per_ip="2/minute"
        ) as client:
            wants_page = {"accept": "text/html"}
            with subtests.test("a value the form may not hold"):
                page = post_form(
                    client, {"email": "camille@example.org", "locale": "de"}, **wants_page
                )
                assert page.status_code == 422
                assert '<html lang="en">' in page.text
            with subtests.test("a link not found"):
                page = client.get("/v1/confirm/abc", headers=wants_page)
                assert page.status_code == 404
                assert '<html lang="en">' in page.text
            with subtests.test("refused before the body is read"):
                post_form(client, {"email": "camille@example.org"})
                page = post_form(client, {"email": "camille@example.org"}, **wants_page)
                assert page.status_code == 429
                assert '<html lang="en">' in page.text

    def test_a_form_post_too_large_gets_a_page_that_says_so_and_leads_back_to_the_form(
        self, client: TestClient, database_url: str
    ) -> None:
        fields = {"email": "camille@example.org", "organisation": "x" * 20_000}
        page = client.post(f"{SUBSCRIBE}?lang=en", data=fields, headers={"accept": "text/html"})
        assert page.status_code == 413
        assert page.headers["content-type"].startswith("text/html")
        assert "<title>Error - Form too long - " in page.text
        assert "shorten what you typed" in page.text
        assert 'href="/v1/lists/bluehats?lang=en"' in page.text
        assert stored(database_url) == []
        answer = client.post(SUBSCRIBE, data=fields)
        assert answer.status_code == 413
        assert answer.json()["error"] == "payload_too_large"

    def test_a_dead_link_of_a_list_with_required_fields_leads_to_its_page_not_to_a_bare_form(
        self, client: TestClient, smtp: SmtpSink, database_url: str
    ) -> None:
        client.post(
            SUBSCRIBE, json={"email": "late@example.org", "attributes": {"organisation": "DINUM"}}
        )
        link = link_in(smtp.mail_to("late@example.org", link="confirm"), "confirm")
        engine = make_engine(database_url)
        with engine.begin() as connection:
            connection.execute(sa.text("UPDATE token SET expires_at = :past"), {"past": utcnow()})
        engine.dispose()
        for dead in (link, "/v1/confirm/" + "A" * 43):
            page = client.get(dead, headers=HTML)
            assert page.status_code in (404, 410)
            # An address alone would come back with "fill in Votre administration": the
            # way on is the list's page, which asks for every required field.
            assert 'name="email"' not in page.text
            assert '<a class="fr-link" href="/v1/lists/bluehats?lang=fr">' in page.text
            assert "Recevoir un nouveau lien" in page.text

    @pytest.mark.parametrize(
        ("posted_to", "language", "form_page", "link"),
        [
            (SUBSCRIBE, "fr", "/v1/lists/bluehats?lang=fr", "Aller au formulaire"),
            (
                "/v1/lists/bluehats/unsubscriptions",
                "en",
                "/v1/lists/bluehats/unsubscribe?lang=en",
                "Go to the form",
            ),
        ],
    )
    def test_a_form_post_refused_before_it_is_read_leads_to_the_form_in_the_same_language(
        self, client: TestClient, posted_to: str, language: str, form_page: str, link: str
    ) -> None:
        # The site's form on an origin not listed (www. forgotten): the page tells the
        # visitor to use the newsletter's own form, and must say where it is.
        response = client.post(
            posted_to,
            data={"email": "site@example.org", "organisation": "DINUM"},
            headers={**HTML, "accept-language": language, "origin": "https://www.code.gouv.fr"},
        )
        assert response.status_code == 403
        assert f'<a class="fr-link" href="{form_page}">{link}</a>' in response.text

    def test_the_readme_s_site_form_gets_its_error_pages_in_the_site_page_s_language(
        self, client: TestClient
    ) -> None:
        # The README's form is on a French page (its action's `?lang=fr`); a visitor whose
        # browser prefers English, on a site not allowed, reads the refusal in French.
        readme = (Path(__file__).parent.parent / "README.md").read_text("utf-8")
        [action] = re.findall(r'```html\n<form method="post" action="([^"]+)"', readme)
        response = client.post(
            action.removeprefix("https://newsletter.code.gouv.fr"),
            data={"email": "site@example.org", "organisation": "DINUM", "locale": "fr"},
            headers={**HTML, "accept-language": "en-GB,en", "origin": "https://other.example"},
        )
        assert response.status_code == 403
        assert '<html lang="fr">' in response.text
        assert "<title>Erreur - Formulaire envoyé depuis un autre site - " in response.text

    @pytest.mark.parametrize(
        ("language", "title", "text"),
        [
            ("fr", "<title>Erreur - Formulaire non accepté - ", "Signalez-le au site"),
            ("en", "<title>Error - Form not accepted - ", "Tell the site where you filled"),
        ],
    )
    def test_a_form_post_with_a_value_the_visitor_cannot_fix_gets_a_page_in_its_language(
        self, client: TestClient, database_url: str, language: str, title: str, text: str
    ) -> None:
        # The site's form sends a language the service does not speak in a hidden field:
        # nothing on the page to correct. The visitor reads what happened in the page's
        # language; the site's developer, the field and why.
        fields = {"email": "site@example.org", "organisation": "DINUM", "locale": "de"}
        response = post_form(client, fields, **{**HTML, "accept-language": language})
        assert response.status_code == 422
        assert f'<html lang="{language}">' in response.text
        assert title in response.text
        assert text in response.text
        assert "locale: Input should be &#39;fr&#39; or &#39;en&#39;" in response.text
        assert stored(database_url) == []

    @pytest.mark.parametrize(
        ("posted_to", "language", "title", "text"),
        [
            (SUBSCRIBE, "fr", "Formulaire illisible", "Signalez-le au site"),
            ("/v1/lists/bluehats/unsubscriptions", "en", "Form could not be read", "Tell the site"),
        ],
    )
    def test_a_site_form_in_a_format_not_read_gets_a_page_that_says_trying_again_is_vain(
        self, client: TestClient, posted_to: str, language: str, title: str, text: str
    ) -> None:
        # `<form enctype="text/plain">` on the site: "try again in a moment" would send
        # the visitor round in circles; the site has to change its form.
        response = client.post(
            posted_to,
            content=b"email=site@example.org\r\n",
            headers={**HTML, "accept-language": language, "content-type": "text/plain"},
        )
        assert response.status_code == 415
        assert f"<title>{'Erreur' if language == 'fr' else 'Error'} - {title} - " in response.text
        assert text in response.text

    @pytest.mark.parametrize(
        ("page_url", "title"),
        [
            (PAGE + "?lang=en", "<title>Error - JavaScript needed - "),
            ("/v1/lists/bluehats/unsubscribe?lang=en", "<title>Error - JavaScript needed - "),
            (PAGE, "<title>Erreur - JavaScript nécessaire - "),
        ],
    )
    def test_a_page_refusing_the_hosted_form_s_post_is_in_the_form_s_language(
        self, database_url: str, smtp: SmtpSink, page_url: str, title: str
    ) -> None:
        # A visitor whose browser asks for French reads the form in English (the switch);
        # the post is refused before its fields are read (here, no proof of work: no
        # JavaScript). The answer is in the language the visitor was reading.
        with app_client(database_url, smtp, proof_of_work_bits=4) as client:
            html = client.get(page_url, headers=HTML).text
            action = re.search(r'<form method="post" action="([^"]+)"', html)
            assert action
            response = client.post(
                action[1],
                data={"email": "camille@example.org", "form_stamp": stamp()},
                headers=HTML,
            )
        assert response.status_code == 400
        assert title in response.text

    @pytest.mark.parametrize(
        ("posted_to", "query", "form_page"),
        [
            (SUBSCRIBE, "", "/v1/lists/bluehats"),
            (SUBSCRIBE, "?lang=en", "/v1/lists/bluehats?lang=en"),
            ("/v1/lists/bluehats/unsubscriptions", "", "/v1/lists/bluehats/unsubscribe"),
        ],
    )
    def test_a_browser_opening_the_url_a_form_posted_to_is_sent_to_the_form(
        self, client: TestClient, posted_to: str, query: str, form_page: str
    ) -> None:
        # After a form came back with errors, the address bar shows where it posted; Enter
        # there, a restored tab or a bookmark GETs it. Not a dead end saying "try again".
        response = client.get(posted_to + query, headers=HTML, follow_redirects=False)
        assert response.status_code == 303
        assert response.headers["location"] == f"http://testserver{form_page}"
        page = client.get(response.headers["location"], headers=HTML)
        assert page.status_code == 200
        assert 'name="email"' in page.text

    def test_an_api_client_still_gets_405_at_the_url_a_form_posts_to(
        self, client: TestClient
    ) -> None:
        response = client.get(SUBSCRIBE, headers={"accept": "application/json"})
        assert response.status_code == 405
        assert response.headers["allow"] == "POST"
        assert response.json()["error"] == "method_not_allowed"


class TestStylesheet:
    def test_the_built_in_stylesheet_by_default_and_a_csp_that_allows_only_it(
        self, client: TestClient
    ) -> None:
        page = client.get(PAGE)
        assert '<link rel="stylesheet" href="/static/style.css">' in page.text
        csp = page.headers["content-security-policy"]
        assert "style-src 'self';" in csp
        assert "font-src" not in csp
        assert "script-src" not in csp
        assert client.get("/static/style.css").status_code == 200

    def test_the_icon_browsers_ask_for_is_an_empty_answer_they_keep(
        self, client: TestClient
    ) -> None:
        icon = client.get("/favicon.ico")
        assert icon.status_code == 204
        assert icon.content == b""
        assert icon.headers["cache-control"] == "public, max-age=86400"
        assert "/favicon.ico" not in client.get("/openapi.json").json()["paths"]

    def test_the_dsfr_stylesheet_when_configured_and_its_origin_in_the_csp(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        url = "https://static.code.gouv.fr/dsfr/1.12/dsfr.min.css"
        with app_client(database_url, smtp, dsfr_stylesheet_url=url) as client:
            page = client.get(PAGE)
            error_page = client.get("/v1/confirm/unknown", headers={"accept": "text/html"})
        assert f'<link rel="stylesheet" href="{url}">' in page.text
        assert "/static/style.css" not in page.text
        for answer in (page, error_page):
            csp = answer.headers["content-security-policy"]
            assert "style-src 'self' https://static.code.gouv.fr;" in csp
            assert "font-src https://static.code.gouv.fr;" in csp
            assert "img-src 'self' https://static.code.gouv.fr data:;" in csp
        assert f'href="{url}"' in error_page.text

    def test_a_stylesheet_url_that_is_not_a_url_is_refused_at_start(
        self, database_url: str
    ) -> None:
        with pytest.raises(ValidationError, match="dsfr_stylesheet_url"):
            Settings(database_url=database_url, dsfr_stylesheet_url="not a url")
