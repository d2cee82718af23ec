"""The page to ask for an unsubscribe link by address, without a browser: both languages,
where its post leads, its errors tied to the field, its robots' trap, and the links to it
from the subscription page and from the pages of unsubscribe links that do not work."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app import formguard, unsubscribe_form
from app.config import Locale
from app.db import make_engine
from app.i18n import for_list
from app.models import Token, utcnow
from tests.conftest import SECRET, SmtpSink, count_rows, link_in, text_of
from tests.test_pages import app_client, input_tag, list_settings, stamp, stamp_in

PAGE = "/v1/lists/bluehats/unsubscribe"
POST = "/v1/lists/bluehats/unsubscriptions"
SENT = "http://testserver/v1/lists/bluehats/unsubscribe/sent"
HTML = {"accept": "text/html,application/xhtml+xml", "accept-language": "fr-FR,fr;q=0.9"}
MEMBER = "camille@example.org"


@pytest.fixture
def client(database_url: str, smtp: SmtpSink) -> Iterator[TestClient]:
    with app_client(database_url, smtp) as test_client:
        yield test_client


def confirm_member(client: TestClient, smtp: SmtpSink, email: str = MEMBER) -> None:
    assert client.post("/v1/lists/bluehats/subscriptions", json={"email": email}).status_code
    link = link_in(smtp.mail_to(email, link="confirm"), "confirm")
    assert client.post(link, headers={"accept": "application/json"}).json()["status"] == (
        "confirmed"
    )


def post_form(client: TestClient, fields: dict[str, str], **headers: str) -> Any:
    return client.post(POST, data=fields, headers=headers, follow_redirects=False)


def unsubscribe_mails(smtp: SmtpSink, email: str) -> int:
    return sum(
        1
        for message in list(smtp.messages)
        if message["To"] == email and "/v1/unsubscribe/" in text_of(message)
    )


def main_of(html: str) -> str:
    return html[html.index("<main") : html.index("</main>")]


class TestThePage:
    def test_asks_for_the_address_in_french_with_the_trap_and_a_stamp(
        self, client: TestClient
    ) -> None:
        page = client.get(PAGE, headers=HTML)
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        html = page.text
        assert '<html lang="fr">' in html
        assert "<title>Se désinscrire de Gazette BlueHats - Gazette BlueHats</title>" in html
        assert 'action="http://testserver/v1/lists/bluehats/unsubscriptions?lang=fr"' in html
        email = input_tag(html, "email")
        assert 'type="email"' in email
        assert 'autocomplete="email"' in email
        assert 'aria-describedby="field-email-hint"' in email
        assert '<label class="fr-label" for="field-email">Votre adresse électronique' in html
        assert 'value="fr"' in input_tag(html, "locale")
        assert 'tabindex="-1"' in input_tag(html, "website")
        assert ">Recevoir un lien de désinscription</button>" in html
        # One form, one button: nothing else to press by mistake.
        assert html.count("<form") == 1
        assert html.count("<button") == 1
        assert formguard.check_stamp(
            stamp_in(html),
            key=SECRET.encode(),
            now=utcnow() + timedelta(seconds=5),
            min_fill_time=timedelta(seconds=3),
            max_age=timedelta(days=1),
            required=True,
        ) == (formguard.Verdict.ACCEPTED)
        switch = 'href="/v1/lists/bluehats/unsubscribe?lang=en" hreflang="en" lang="en">English'
        assert switch in html

    def test_in_english_by_accept_language_with_a_switch_to_french(
        self, client: TestClient
    ) -> None:
        html = client.get(PAGE, headers={"accept-language": "en-GB,en;q=0.9"}).text
        assert '<html lang="en">' in html
        assert "<h1>Unsubscribe from Gazette BlueHats</h1>" in html
        assert ">Send me an unsubscribe link</button>" in html
        assert 'value="en"' in input_tag(html, "locale")
        assert 'href="/v1/lists/bluehats/unsubscribe?lang=fr" hreflang="fr"' in html

    def test_an_unknown_list_is_an_error_page(self, client: TestClient) -> None:
        page = client.get("/v1/lists/nope/unsubscribe", headers={"accept-language": "en"})
        assert page.status_code == 404
        assert "<title>Error - Mailing list not found - " in page.text

    def test_operators_reword_it_per_list_and_language(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        reworded = list_settings(
            strings={"fr": {"page.unsubscribe_request.button": "M'envoyer le lien"}}
        )
        with app_client(database_url, smtp, lists=[reworded]) as client:
            french = client.get(PAGE + "?lang=fr").text
            english = client.get(PAGE + "?lang=en").text
        assert ">M&#39;envoyer le lien</button>" in french
        assert ">Send me an unsubscribe link</button>" in english


class TestItsPost:
    @pytest.mark.parametrize("lang", ["fr", "en"])
    def test_goes_to_the_unsubscribe_check_your_inbox_page_and_the_link_is_mailed(
        self, client: TestClient, smtp: SmtpSink, lang: str
    ) -> None:
        confirm_member(client, smtp)
        response = post_form(
            client, {"email": f" {MEMBER} ", "locale": lang, "form_stamp": stamp()}, **HTML
        )
        assert response.status_code == 303
        assert response.headers["location"] == f"{SENT}?lang={lang}"
        smtp.mail_to(MEMBER, link="unsubscribe")

        page = client.get(response.headers["location"])
        assert page.status_code == 200
        text = main_of(page.text)
        if lang == "fr":
            assert "<h1>Vérifiez votre boîte mail</h1>" in text
            assert (
                "Si cette adresse est inscrite à Gazette BlueHats, un message contenant un "
                "lien de désinscription vient de partir." in text
            )
            assert "confirmer votre inscription" not in text
        else:
            assert "<h1>Check your inbox</h1>" in text
            assert (
                "If this address is subscribed to Gazette BlueHats, a message with an "
                "unsubscribe link is on its way." in text
            )
            assert "confirm your subscription" not in text

    def test_an_address_that_is_not_subscribed_gets_the_same_answer_and_no_mail(
        self, client: TestClient, smtp: SmtpSink, database_url: str
    ) -> None:
        confirm_member(client, smtp)
        answers = []
        for email in (MEMBER, "stranger@example.org"):
            response = post_form(client, {"email": email, "form_stamp": stamp()}, **HTML)
            answers.append((response.status_code, response.headers["location"], response.text))
        assert answers[0] == answers[1]
        smtp.mail_to(MEMBER, link="unsubscribe")
        assert unsubscribe_mails(smtp, "stranger@example.org") == 0
        assert count_rows(database_url, "subscription") == 1

    def test_a_bad_address_brings_the_page_back_with_the_value_and_the_error_on_the_field(
        self, client: TestClient, database_url: str
    ) -> None:
        before = count_rows(database_url, "consent_event")
        response = post_form(
            client, {"email": "camille<b>.example.org", "form_stamp": stamp()}, **HTML
        )
        assert response.status_code == 422
        html = response.text
        assert "<title>Erreur - Se désinscrire de Gazette BlueHats" in html
        start = html.index('id="error-summary"')
        assert start < html.index("<form")
        summary = html[start : html.index("</ul>", start)]
        assert '<a class="fr-link" href="#field-email">' in summary
        tag = input_tag(html, "email")
        # Kept, and escaped.
        assert 'value="camille&lt;b&gt;.example.org"' in tag
        assert 'aria-invalid="true"' in tag
        assert 'aria-describedby="field-email-hint field-email-error"' in tag
        assert (
            '<p class="fr-error-text" id="field-email-error">Saisissez une adresse '
            "électronique valide" in html
        )
        # A fresh stamp for the corrected post.
        assert stamp_in(html)
        assert count_rows(database_url, "consent_event") == before
        assert count_rows(database_url, "outbox_job") == 0

    def test_a_missing_address_is_said_in_english_for_an_english_page(
        self, client: TestClient
    ) -> None:
        response = post_form(
            client, {"email": "  ", "locale": "en", "form_stamp": stamp()}, accept="text/html"
        )
        assert response.status_code == 422
        assert '<html lang="en">' in response.text
        assert 'id="field-email-error">Enter your email address.</p>' in response.text

    def test_a_malformed_proof_of_work_is_not_called_a_bad_address(
        self, client: TestClient, smtp: SmtpSink, database_url: str
    ) -> None:
        confirm_member(client, smtp)
        before = count_rows(database_url, "outbox_job")
        fields = {"email": MEMBER, "pow_nonce": "n" * 65, "form_stamp": stamp()}
        # The generic error path, as the subscription page takes for its hidden fields: a
        # browser gets the error page, not its address marked invalid.
        page = post_form(client, fields, **HTML)
        assert page.status_code == 422
        assert page.headers["content-type"].startswith("text/html")
        assert "field-email-error" not in page.text
        assert "Saisissez une adresse" not in page.text
        answer = post_form(client, fields)
        assert answer.status_code == 422
        assert answer.json()["error"] == "validation_error"
        assert answer.json()["detail"].startswith("pow_nonce:")
        assert count_rows(database_url, "outbox_job") == before

    def test_read_post_names_the_address_only_when_the_address_is_wrong(self) -> None:
        t = for_list(Locale.EN, None)
        nonce_only = unsubscribe_form.read_post({"email": MEMBER, "pow_nonce": "n" * 65}, t=t)
        assert nonce_only.request is None
        assert nonce_only.error is None
        assert nonce_only.invalid is not None
        both = unsubscribe_form.read_post({"email": "nobody", "pow_nonce": "n" * 65}, t=t)
        assert both.error == t("form.error.email_invalid")
        pasted = unsubscribe_form.read_post({"email": "Camille <camille@example.org>"}, t=t)
        assert pasted.error == "Did you mean camille@example.org? Enter the address alone."
        missing = unsubscribe_form.read_post({"pow_nonce": "n"}, t=t)
        assert missing.error == t("form.error.email_missing")

    def test_a_form_post_that_is_not_a_browsers_gets_the_json_error(
        self, client: TestClient
    ) -> None:
        response = post_form(client, {"email": "not-an-address"})
        assert response.status_code == 422
        assert response.json()["error"] == "validation_error"
        assert response.json()["detail"].startswith("email:")

    def test_the_json_answer_is_unchanged(self, client: TestClient, smtp: SmtpSink) -> None:
        confirm_member(client, smtp)
        response = client.post(POST, json={"email": MEMBER})
        assert response.status_code == 202
        assert response.content == (
            b'{"status":"accepted","detail":"If this address is subscribed, a mail with an '
            b'unsubscribe link is on its way."}'
        )


class TestRobots:
    def test_a_filled_honeypot_is_answered_as_a_success_and_dropped(
        self, client: TestClient, smtp: SmtpSink, database_url: str
    ) -> None:
        confirm_member(client, smtp)
        events = count_rows(database_url, "consent_event")
        jobs = count_rows(database_url, "outbox_job")
        before = formguard.rejection_counts().get("honeypot", 0)
        response = post_form(
            client,
            {"email": MEMBER, "website": "http://spam.example", "form_stamp": stamp()},
            **HTML,
        )
        assert response.status_code == 303
        assert response.headers["location"] == f"{SENT}?lang=fr"
        assert formguard.rejection_counts()["honeypot"] == before + 1
        assert count_rows(database_url, "consent_event") == events
        assert count_rows(database_url, "outbox_job") == jobs
        # Even a bad address: a robot learns nothing from the answer.
        bad = post_form(client, {"email": "x", "website": "y", "form_stamp": stamp()}, **HTML)
        assert (bad.status_code, bad.headers["location"]) == (303, f"{SENT}?lang=fr")

    def test_a_page_posted_at_once_by_a_script_is_dropped(
        self, client: TestClient, smtp: SmtpSink, database_url: str
    ) -> None:
        confirm_member(client, smtp)
        events = count_rows(database_url, "consent_event")
        fresh = stamp_in(client.get(PAGE).text)
        response = post_form(client, {"email": MEMBER, "form_stamp": fresh})
        assert response.status_code == 303
        assert count_rows(database_url, "consent_event") == events

    def test_a_press_at_once_gets_the_page_back_and_the_second_press_mails_the_link(
        self, client: TestClient, smtp: SmtpSink, database_url: str
    ) -> None:
        """The browser fills the address in and the visitor presses at once: the page said
        "check your inbox" and no unsubscribe link ever came."""
        confirm_member(client, smtp)
        events = count_rows(database_url, "consent_event")
        before = formguard.rejection_counts().get("too_fast", 0)
        fresh = stamp_in(client.get(PAGE, headers=HTML).text)
        first = post_form(client, {"email": MEMBER, "locale": "fr", "form_stamp": fresh}, **HTML)
        assert first.status_code == 422
        assert (
            "Votre demande n&#39;est pas encore envoyée. Vérifiez votre adresse électronique, "
            "puis appuyez de nouveau sur le bouton « Recevoir un lien de désinscription »."
            in first.text
        )
        assert f'value="{MEMBER}"' in input_tag(first.text, "email")
        assert 'aria-invalid="true"' not in first.text
        assert count_rows(database_url, "consent_event") == events
        assert unsubscribe_mails(smtp, MEMBER) == 0
        assert formguard.rejection_counts()["too_fast"] == before + 1

        second = post_form(
            client,
            {"email": MEMBER, "locale": "fr", "form_stamp": stamp_in(first.text)},
            **HTML,
        )
        assert (second.status_code, second.headers["location"]) == (303, f"{SENT}?lang=fr")
        smtp.mail_to(MEMBER, link="unsubscribe")

    def test_a_page_left_open_overnight_comes_back_in_english_to_press_again(
        self, client: TestClient, smtp: SmtpSink, database_url: str
    ) -> None:
        confirm_member(client, smtp)
        events = count_rows(database_url, "consent_event")
        old = stamp(age=timedelta(days=1, minutes=1))
        fields = {"email": MEMBER, "locale": "en", "form_stamp": old}
        first = post_form(client, fields, **HTML)
        assert first.status_code == 422
        assert '<html lang="en">' in first.text
        assert "Your request has not been sent yet." in first.text
        assert count_rows(database_url, "consent_event") == events
        second = post_form(client, {**fields, "form_stamp": stamp_in(first.text)}, **HTML)
        assert (second.status_code, second.headers["location"]) == (303, f"{SENT}?lang=en")
        smtp.mail_to(MEMBER, link="unsubscribe")

    def test_an_address_corrected_at_once_is_not_dropped_as_too_fast(
        self, client: TestClient, smtp: SmtpSink
    ) -> None:
        confirm_member(client, smtp)
        refused = post_form(client, {"email": "camille@exemple", "form_stamp": stamp()}, **HTML)
        assert refused.status_code == 422
        response = post_form(client, {"email": MEMBER, "form_stamp": stamp_in(refused.text)})
        assert response.status_code == 303
        smtp.mail_to(MEMBER, link="unsubscribe")

    def test_a_post_without_stamp_is_dropped_when_the_list_requires_one(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        strict = list_settings(require_form_stamp=True)
        with app_client(database_url, smtp, lists=[strict]) as client:
            confirm_member(client, smtp)
            events = count_rows(database_url, "consent_event")
            assert post_form(client, {"email": MEMBER}).status_code == 303
            assert count_rows(database_url, "consent_event") == events
            assert post_form(client, {"email": MEMBER, "form_stamp": stamp()}).status_code == 303
            assert count_rows(database_url, "consent_event") == events + 1


class TestLinksToIt:
    def test_the_subscription_page_offers_it_in_its_language(self, client: TestClient) -> None:
        french = client.get("/v1/lists/bluehats", headers=HTML).text
        assert (
            'Vous recevez déjà Gazette BlueHats ? <a class="fr-link" '
            'href="/v1/lists/bluehats/unsubscribe?lang=fr">Se désinscrire</a>' in french
        )
        english = client.get("/v1/lists/bluehats?lang=en").text
        assert (
            'Already subscribed to Gazette BlueHats? <a class="fr-link" '
            'href="/v1/lists/bluehats/unsubscribe?lang=en">Unsubscribe</a>' in english
        )

    def test_an_unknown_unsubscribe_link_leads_to_it(self, client: TestClient) -> None:
        page = client.get("/v1/unsubscribe/" + "A" * 43, headers={"accept-language": "en"})
        assert page.status_code == 404
        assert (
            '<a class="fr-link" href="/v1/lists/bluehats/unsubscribe?lang=en">'
            "Ask for a new unsubscribe link</a>" in page.text
        )
        as_json = client.get("/v1/unsubscribe/" + "A" * 43, headers={"accept": "application/json"})
        assert as_json.json()["error"] == "token_not_found"

    def test_an_unknown_link_leads_to_each_list_s_page_when_its_list_cannot_be_told(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        """It led nowhere: one who wants to leave, with a link cut short, was stuck."""
        two = [list_settings(), list_settings(slug="other", name="Other")]
        with app_client(database_url, smtp, lists=two) as client:
            page = client.get("/v1/unsubscribe/" + "A" * 43, headers=HTML)
        assert page.status_code == 404
        main = main_of(page.text)
        assert "Demander un nouveau lien de désinscription pour l&#39;une de ces lettres :" in main
        assert '<a class="fr-link" href="/v1/lists/bluehats/unsubscribe?lang=fr">' in main
        assert '<a class="fr-link" href="/v1/lists/other/unsubscribe?lang=fr">Other</a>' in main
        # Never a subscription form: the visitor wants to leave.
        assert 'name="email"' not in main

    def test_an_expired_unsubscribe_link_leads_to_it_and_offers_no_subscription(
        self, client: TestClient, smtp: SmtpSink, database_url: str
    ) -> None:
        confirm_member(client, smtp)
        client.post(POST, json={"email": MEMBER})
        link = link_in(smtp.mail_to(MEMBER, link="unsubscribe"), "unsubscribe")
        engine = make_engine(database_url)
        with engine.begin() as connection:
            connection.execute(sa.update(Token).values(expires_at=utcnow() - timedelta(days=1)))
        engine.dispose()
        page = client.get(link, headers=HTML)
        assert page.status_code == 410
        html = main_of(page.text)
        assert '<a class="fr-link" href="/v1/lists/bluehats/unsubscribe?lang=fr">' in html
        assert "/subscriptions" not in html
        assert "<form" not in html

    def test_an_unknown_confirm_link_does_not(self, client: TestClient) -> None:
        page = client.get("/v1/confirm/" + "A" * 43, headers=HTML)
        assert page.status_code == 404
        assert "/unsubscribe?" not in main_of(page.text)

    def test_a_rate_limited_post_of_it_switches_language_to_it(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        with app_client(database_url, smtp, rate_limit_per_ip="1/minute") as client:
            fields = {"email": "busy@example.org", "form_stamp": stamp()}
            assert post_form(client, fields, **HTML).status_code == 303
            page = post_form(client, fields, **HTML)
        assert page.status_code == 429
        assert re.search(r'href="/v1/lists/bluehats/unsubscribe\?lang=en"', page.text)
