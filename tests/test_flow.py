"""The double opt-in, end to end over HTTP, with a real SMTP server receiving the mails."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from app.config import Settings
from app.db import make_engine
from app.main import create_app
from app.models import ConsentEvent, JobState, OutboxJob, Subscription
from tests.conftest import SmtpSink, count_rows, link_in, make_settings, text_of, wait_until

BROWSER = {"user-agent": "Mozilla/5.0 (test browser)", "accept-language": "fr-FR,fr;q=0.9"}


def subscription(url: str, email_key: str) -> Subscription | None:
    engine = make_engine(url)
    with Session(engine) as session:
        row = session.exec(select(Subscription).where(Subscription.email_key == email_key)).first()
    engine.dispose()
    return row


def ledger(url: str) -> list[ConsentEvent]:
    engine = make_engine(url)
    with Session(engine) as session:
        rows = list(session.exec(select(ConsentEvent).order_by(ConsentEvent.id)).all())
    engine.dispose()
    return rows


def subscribe(client: TestClient, email: str, **extra: Any) -> None:
    response = client.post(
        "/v1/lists/bluehats/subscriptions", json={"email": email, **extra}, headers=BROWSER
    )
    assert response.status_code == 202, response.text


@pytest.fixture
def https_client(database_url: str, smtp: SmtpSink) -> Iterator[TestClient]:
    """The service published over HTTPS, as in production: RFC 8058 one-click needs it."""
    settings = make_settings(database_url, smtp_port=smtp.port, public_url="https://testserver")
    with TestClient(create_app(settings), base_url="https://testserver") as test_client:
        yield test_client


class TestDoubleOptIn:
    def test_subscribe_confirm_and_one_click_unsubscribe(
        self, https_client: TestClient, smtp: SmtpSink, database_url: str
    ) -> None:
        client = https_client
        url = database_url
        subscribe(client, "Camille.Martin+news@Example.org")

        [mail] = smtp.wait_for(1)
        assert mail["To"] == "Camille.Martin+news@example.org"
        assert "Confirmez votre inscription" in mail["Subject"]
        assert mail["Auto-Submitted"] == "auto-generated"
        assert mail["Message-ID"].startswith("<")
        assert mail["Date"]
        assert mail.get_body(preferencelist=("html",)) is not None
        confirm_link = link_in(mail, "confirm")

        # GET shows a button and changes nothing: a mail scanner may have fetched it.
        page = client.get(confirm_link)
        assert page.status_code == 200
        assert '<form method="post"' in page.text
        assert subscription(url, "camille.martin+news@example.org").status == "pending"

        confirmed = client.post(confirm_link, headers=BROWSER)
        assert confirmed.status_code == 200
        assert "Inscription confirmée" in confirmed.text
        row = subscription(url, "camille.martin+news@example.org")
        assert row is not None
        assert row.status == "confirmed"
        assert row.confirmed_at is not None

        # Asking to leave by address mails a link, with RFC 8058 headers.
        asked = client.post(
            "/v1/lists/bluehats/unsubscriptions", json={"email": "camille.martin+NEWS@example.org"}
        )
        assert asked.status_code == 202
        [_, unsubscribe_mail] = smtp.wait_for(2)
        assert unsubscribe_mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        one_click_url = unsubscribe_mail["List-Unsubscribe"].strip("<>")
        one_click_path = one_click_url.removeprefix("https://testserver")
        assert one_click_path == link_in(unsubscribe_mail, "unsubscribe")

        # What a mail provider sends for a one-click unsubscribe: no cookies, form body.
        done = client.post(
            one_click_path,
            content=b"List-Unsubscribe=One-Click",
            headers={"content-type": "application/x-www-form-urlencoded"},
            follow_redirects=False,
        )
        assert done.status_code == 200
        assert "location" not in done.headers
        assert subscription(url, "camille.martin+news@example.org").status == "unsubscribed"

        events = ledger(url)
        assert [(e.action, e.status_after, e.source) for e in events] == [
            ("subscribe_requested", "pending", "api"),
            ("confirmed", "confirmed", "link"),
            ("unsubscribe_requested", "confirmed", "api"),
            ("unsubscribed", "unsubscribed", "one_click"),
        ]
        assert events[0].ip == "testclient"
        assert events[0].user_agent == "Mozilla/5.0 (test browser)"
        assert events[1].user_agent == "Mozilla/5.0 (test browser)"
        assert all(e.consent_version == "2026-11" for e in events)
        # A one-click unsubscribe sends no goodbye mail; nothing was sent twice.
        mails_done = "outbox_job WHERE kind = 'mail' AND state = 'done'"
        wait_until(lambda: count_rows(url, mails_done) == 2)
        assert len(smtp.messages) == 2

    def test_form_post_redirects_to_the_thank_you_page(self, client: TestClient) -> None:
        response = client.post(
            "/v1/lists/bluehats/subscriptions",
            data={"email": "form@example.org"},
            headers={"accept-language": "en"},
            follow_redirects=False,
        )
        assert response.status_code == 303
        assert response.headers["location"] == "http://testserver/v1/lists/bluehats/thanks?lang=en"
        page = client.get("/v1/lists/bluehats/thanks?lang=en")
        assert page.status_code == 200
        assert "Check your inbox" in page.text

    def test_form_post_goes_to_the_configured_thank_you_url(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        settings = make_settings(
            database_url,
            smtp_port=smtp.port,
            lists=[
                {
                    "slug": "bluehats",
                    "name": "Gazette BlueHats",
                    "thank_you_url": "https://code.gouv.fr/merci",
                }
            ],
        )
        with TestClient(create_app(settings)) as client:
            response = client.post(
                "/v1/lists/bluehats/subscriptions",
                data={"email": "form@example.org"},
                follow_redirects=False,
            )
        assert response.status_code == 303
        assert response.headers["location"] == "https://code.gouv.fr/merci"

    def test_a_lists_own_wording_reaches_its_mails(self, database_url: str, smtp: SmtpSink) -> None:
        # The list's strings reworded its pages; its mails kept the catalogue's wording.
        strings = {
            "mail.confirm.subject": "Un dernier clic pour {list}",
            "mail.signature": "La DINUM, pour {list}",
        }
        settings = make_settings(
            database_url,
            smtp_port=smtp.port,
            lists=[{"slug": "bluehats", "name": "Gazette BlueHats", "strings": {"fr": strings}}],
        )
        with TestClient(create_app(settings)) as client:
            subscribe(client, "reworded@example.org")
            [mail] = smtp.wait_for(1)
        assert mail["Subject"] == "Un dernier clic pour Gazette BlueHats"
        for subtype in ("plain", "html"):
            part = mail.get_body(preferencelist=(subtype,))
            assert part is not None
            assert "La DINUM, pour Gazette BlueHats" in part.get_content(), subtype

    def test_unknown_list_is_404(self, client: TestClient) -> None:
        response = client.post("/v1/lists/nope/subscriptions", json={"email": "a@example.org"})
        assert response.status_code == 404
        assert response.json() == {
            "error": "list_not_found",
            "detail": "No mailing list has this name.",
        }


class TestNoEnumeration:
    def _answers(self, client: TestClient, path: str, email: str) -> tuple[int, list, bytes]:
        response = client.post(path, json={"email": email})
        # The date and the request id (random per request) differ whatever the address.
        headers = sorted(
            (k, v) for k, v in response.headers.items() if k not in ("date", "x-request-id")
        )
        return response.status_code, headers, response.content

    def test_subscribe_answers_are_identical_for_every_state(
        self, client: TestClient, smtp: SmtpSink, settings: Settings
    ) -> None:
        path = "/v1/lists/bluehats/subscriptions"
        new = self._answers(client, path, "new@example.org")
        subscribe(client, "pending@example.org")
        subscribe(client, "confirmed@example.org")
        subscribe(client, "unsubscribed@example.org")
        for email in ("confirmed@example.org", "unsubscribed@example.org"):
            client.post(link_in(smtp.mail_to(email, link="confirm"), "confirm"))
        client.post(
            "/v1/lists/bluehats/unsubscriptions", json={"email": "unsubscribed@example.org"}
        )
        unsubscribe_mail = smtp.mail_to("unsubscribed@example.org", link="unsubscribe")
        client.post(link_in(unsubscribe_mail, "unsubscribe"))
        assert subscription(settings.database_url, "unsubscribed@example.org").status == (
            "unsubscribed"
        )

        answers = [
            new,
            self._answers(client, path, "pending@example.org"),
            self._answers(client, path, "confirmed@example.org"),
            self._answers(client, path, "unsubscribed@example.org"),
        ]
        assert all(answer == answers[0] for answer in answers), answers
        assert answers[0][0] == 202

        leave = "/v1/lists/bluehats/unsubscriptions"
        leave_answers = [
            self._answers(client, leave, email)
            for email in ("nobody@example.org", "pending@example.org", "confirmed@example.org")
        ]
        assert all(answer == leave_answers[0] for answer in leave_answers)


class TestResubscribing:
    def test_pending_address_gets_at_most_one_mail_per_interval(
        self, client: TestClient, smtp: SmtpSink, settings: Settings
    ) -> None:
        for _ in range(5):
            subscribe(client, "again@example.org")
        wait_until(lambda: count_rows(settings.database_url, "outbox_job WHERE state='done'") == 1)
        assert len(smtp.messages) == 1
        assert count_rows(settings.database_url, "subscription") == 1

    def test_pending_address_gets_a_new_mail_after_the_interval(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        settings = make_settings(database_url, smtp_port=smtp.port, resend_interval="0s")
        with TestClient(create_app(settings)) as client:
            subscribe(client, "again@example.org")
            subscribe(client, "again@example.org")
            first, second = smtp.wait_for(2)
            # Both links work until one is used; then the other is spent.
            assert link_in(first, "confirm") != link_in(second, "confirm")
            assert client.post(link_in(second, "confirm")).status_code == 200
            assert client.post(link_in(first, "confirm")).status_code == 409

    def test_a_pending_request_sent_again_confirms_the_values_sent_last(
        self, client: TestClient, smtp: SmtpSink, settings: Settings
    ) -> None:
        subscribe(client, "typo@example.org", attributes={"name": "Camile Dupnot"})
        subscribe(client, "typo@example.org", attributes={"name": "Camille Dupont"})
        # A bare request for a new link keeps them.
        subscribe(client, "typo@example.org")
        [mail] = smtp.wait_for(1)
        assert client.post(link_in(mail, "confirm")).status_code == 200
        row = subscription(settings.database_url, "typo@example.org")
        assert row is not None
        assert row.status == "confirmed"
        assert row.attributes == {"name": "Camille Dupont"}
        # Once confirmed, a request (anyone's) changes nothing the person chose.
        subscribe(client, "typo@example.org", attributes={"name": "Mallory"}, locale="en")
        row = subscription(settings.database_url, "typo@example.org")
        assert row is not None
        assert row.attributes == {"name": "Camille Dupont"}
        assert row.locale == "fr"

    def test_confirmed_address_gets_an_already_subscribed_note(
        self, client: TestClient, smtp: SmtpSink
    ) -> None:
        subscribe(client, "member@example.org", locale="en")
        [mail] = smtp.wait_for(1)
        client.post(link_in(mail, "confirm"))
        subscribe(client, "member@example.org")
        note = smtp.wait_for(2)[1]
        assert note["Subject"] == "You are already subscribed to Gazette BlueHats"
        assert "/v1/unsubscribe/" in text_of(note)
        assert "/v1/confirm/" not in text_of(note)

    def test_unsubscribed_address_starts_a_new_double_opt_in(
        self, client: TestClient, smtp: SmtpSink, settings: Settings
    ) -> None:
        subscribe(client, "back@example.org")
        client.post(link_in(smtp.wait_for(1)[0], "confirm"))
        client.post("/v1/lists/bluehats/unsubscriptions", json={"email": "back@example.org"})
        client.post(link_in(smtp.wait_for(2)[1], "unsubscribe"))
        goodbye = smtp.wait_for(3)[2]
        assert "désinscrit" in goodbye["Subject"]
        row = subscription(settings.database_url, "back@example.org")
        assert row is not None
        assert row.status == "unsubscribed"

        subscribe(client, "back@example.org")
        fresh = smtp.wait_for(4)[3]
        assert "Confirmez" in fresh["Subject"]
        row = subscription(settings.database_url, "back@example.org")
        assert row is not None
        assert row.status == "pending"
        assert client.post(link_in(fresh, "confirm")).status_code == 200
        row = subscription(settings.database_url, "back@example.org")
        assert row is not None
        assert row.status == "confirmed"


class TestLinks:
    def test_unknown_token_is_404_json_and_page(self, client: TestClient) -> None:
        response = client.post("/v1/confirm/not-a-token", headers={"accept": "application/json"})
        assert response.status_code == 404
        assert response.json()["error"] == "token_not_found"
        page = client.get("/v1/confirm/not-a-token")
        assert page.status_code == 404
        assert page.headers["content-type"].startswith("text/html")
        # Its text says "ask for a new one": with one list, the page lets the visitor do it.
        assert 'action="http://testserver/v1/lists/bluehats/subscriptions?lang=fr"' in page.text
        assert 'name="email"' in page.text

    @pytest.mark.parametrize(
        "accept", ["text/html;q=0, application/json", "application/json, text/html;q=0.1"]
    )
    def test_a_client_weighing_json_above_html_gets_json_from_a_link(
        self, client: TestClient, smtp: SmtpSink, accept: str
    ) -> None:
        subscribe(client, "weighed@example.org")
        link = link_in(smtp.wait_for(1)[0], "confirm")
        confirmed = client.post(link, headers={"accept": accept})
        assert confirmed.status_code == 200
        assert confirmed.json() == {"status": "confirmed", "list": "bluehats"}
        unknown = client.post("/v1/confirm/not-a-token", headers={"accept": accept})
        assert unknown.status_code == 404
        assert unknown.json()["error"] == "token_not_found"
        # A browser's header still gets the page.
        browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        page = client.post("/v1/confirm/not-a-token", headers={"accept": browser})
        assert page.headers["content-type"].startswith("text/html")

    def test_expired_token_is_410_with_a_way_to_ask_again(
        self, client: TestClient, smtp: SmtpSink, settings: Settings
    ) -> None:
        subscribe(client, "late@example.org")
        link = link_in(smtp.wait_for(1)[0], "confirm")
        engine = make_engine(settings.database_url)
        with engine.begin() as connection:
            connection.execute(
                sa.text("UPDATE token SET expires_at = :past"),
                {"past": "2000-01-01 00:00:00+00:00"},
            )
        engine.dispose()
        response = client.post(link, headers={"accept": "application/json"})
        assert response.status_code == 410
        assert response.json()["error"] == "token_expired"
        page = client.get(link)
        assert page.status_code == 410
        assert 'action="http://testserver/v1/lists/bluehats/subscriptions?lang=fr"' in page.text
        assert subscription(settings.database_url, "late@example.org").status == "pending"

    def test_a_spent_or_expired_link_s_page_speaks_the_subscriber_s_language(
        self, client: TestClient, smtp: SmtpSink, settings: Settings
    ) -> None:
        # Signed up in English; the page is opened by a browser that asks for nothing.
        client.post(
            "/v1/lists/bluehats/subscriptions",
            json={"email": "anglo@example.org", "locale": "en"},
        )
        link = link_in(smtp.wait_for(1)[0], "confirm")
        assert client.post(link).status_code == 200
        spent = client.post(link, headers={"accept": "text/html"})
        assert spent.status_code == 409
        assert '<html lang="en">' in spent.text
        assert "This link has already been used." in spent.text
        assert "Gazette BlueHats" in spent.text  # the list's page, not a generic one
        # `?lang=` still chooses, as on the link's own page.
        french = client.post(link + "?lang=fr", headers={"accept": "text/html"})
        assert '<html lang="fr">' in french.text
        engine = make_engine(settings.database_url)
        with engine.begin() as connection:
            connection.execute(
                sa.text("UPDATE token SET expires_at = :past, used_at = NULL"),
                {"past": "2000-01-01 00:00:00+00:00"},
            )
        engine.dispose()
        expired = client.get(link, headers={"accept-language": ""})
        assert expired.status_code == 410
        assert '<html lang="en">' in expired.text

    @pytest.mark.parametrize(
        ("language", "reassurance"),
        [
            ("fr", "Si c'était pour confirmer votre inscription, elle est enregistrée"),
            ("en", "If you used it to confirm your subscription, it is recorded"),
        ],
    )
    def test_going_back_to_the_link_after_confirming_says_there_is_nothing_more_to_do(
        self, client: TestClient, smtp: SmtpSink, language: str, reassurance: str
    ) -> None:
        subscribe(client, "back@example.org", locale=language)
        link = link_in(smtp.wait_for(1)[0], "confirm")
        pressed = client.post(link, data={}, headers={"accept": "text/html"})
        assert pressed.status_code == 200
        # The browser's back button, or the mail's link opened again: the link is spent,
        # and the visitor, who just confirmed, must not be left thinking it failed.
        again = client.get(link)
        assert again.status_code == 409
        assert reassurance in html.unescape(again.text)

    def test_the_button_pressed_twice_says_so_and_its_switch_says_it_in_the_other_language(
        self, client: TestClient, smtp: SmtpSink
    ) -> None:
        """A double click, or the answer reloaded: "already used", whose language switch led
        to the subscription form instead of the same words in the other language."""
        subscribe(client, "twice-pressed@example.org")
        link = link_in(smtp.wait_for(1)[0], "confirm")
        assert client.post(link, headers=BROWSER).status_code == 200
        second = client.post(link, headers=BROWSER)
        assert second.status_code == 409
        switch = re.search(r'fr-translate__language" href="([^"]+)"', second.text)
        assert switch is not None
        assert html.unescape(switch[1]) == f"{link}?lang=en"
        english = client.get(html.unescape(switch[1]), headers=BROWSER)
        assert english.status_code == 409
        assert "nothing more to do" in english.text

    @pytest.mark.parametrize(
        ("language", "told"),
        [
            ("fr", "cette adresse n'est pas inscrite à ce jour"),
            ("en", "this address is not subscribed at present"),
        ],
    )
    def test_the_confirm_link_used_again_after_leaving_says_the_address_is_not_subscribed(
        self, client: TestClient, smtp: SmtpSink, language: str, told: str
    ) -> None:
        subscribe(client, "left@example.org", locale=language)
        link = link_in(smtp.wait_for(1)[0], "confirm")
        assert client.post(link, headers={"accept": "application/json"}).status_code == 200
        client.post("/v1/lists/bluehats/unsubscriptions", json={"email": "left@example.org"})
        client.post(link_in(smtp.wait_for(2)[1], "unsubscribe"), data={})
        # The old confirmation mail opened again: "it is recorded, nothing more to do" would
        # tell someone who left that they are subscribed.
        page = client.get(link)
        assert page.status_code == 409
        text = html.unescape(page.text)
        assert told in text
        assert "elle est enregistrée" not in text
        assert "it is recorded" not in text
        # The way back in is on the page.
        assert 'name="email"' in page.text
        answer = client.post(link, headers={"accept": "application/json"})
        assert answer.status_code == 409
        assert answer.json() == {
            "error": "token_used",
            "detail": "This link has already been used, and this address is not subscribed "
            "at present: ask for a new link to subscribe again.",
        }

    def test_an_unsubscribe_link_works_twice(self, client: TestClient, smtp: SmtpSink) -> None:
        subscribe(client, "twice@example.org")
        client.post(link_in(smtp.wait_for(1)[0], "confirm"))
        client.post("/v1/lists/bluehats/unsubscriptions", json={"email": "twice@example.org"})
        link = link_in(smtp.wait_for(2)[1], "unsubscribe")
        accept = {"accept": "application/json"}
        assert client.post(link, headers=accept).json()["status"] == "unsubscribed"
        assert client.post(link, headers=accept).json()["status"] == "unsubscribed"

    @pytest.mark.parametrize(
        "pasted",
        [
            pytest.param("{link}.", id="full-stop"),
            pytest.param("{link})", id="closing-parenthesis"),
            pytest.param("{link}%3E", id="angle-bracket"),
            pytest.param("{link}%C2%BB", id="guillemet"),
            pytest.param("{link}%22", id="quote"),
            pytest.param("{link}.%20Merci%20!", id="next-sentence"),
            pytest.param("{head}%20{tail}", id="cut-in-two-by-a-space"),
        ],
    )
    def test_a_link_pasted_with_what_surrounded_it_still_works(
        self, client: TestClient, smtp: SmtpSink, database_url: str, pasted: str
    ) -> None:
        """A link copied from a sentence (`... : <link>.`), or cut in two by a mail client
        and pasted back with a space, was "not valid": a token holds none of those."""
        subscribe(client, "pasted@example.org")
        confirm = link_in(smtp.wait_for(1)[0], "confirm")
        cut = len(confirm) - 20
        url = pasted.format(link=confirm, head=confirm[:cut], tail=confirm[cut:])

        page = client.get(url, headers=BROWSER)
        assert page.status_code == 200, page.text
        # The button posts to the link as it was sent.
        assert f'action="http://testserver{confirm}?lang=fr"' in page.text
        confirmed = client.post(url, headers={"accept": "application/json"})
        assert confirmed.json() == {"status": "confirmed", "list": "bluehats"}

        client.post("/v1/lists/bluehats/unsubscriptions", json={"email": "pasted@example.org"})
        leave = link_in(smtp.wait_for(2)[1], "unsubscribe")
        cut = len(leave) - 20
        url = pasted.format(link=leave, head=leave[:cut], tail=leave[cut:])
        page = client.get(url, headers=BROWSER)
        assert f'action="http://testserver{leave}?lang=fr"' in page.text
        left = client.post(url, headers={"accept": "application/json"})
        assert left.json() == {"status": "unsubscribed", "list": "bluehats"}
        assert subscription(database_url, "pasted@example.org").status == "unsubscribed"

    def test_the_button_answers_in_the_language_the_visitor_switched_its_page_to(
        self, client: TestClient, smtp: SmtpSink
    ) -> None:
        """The page of a French subscriber's link, switched to English: the button's answer
        came back in French, the language stored with the subscription."""

        def press_the_button_in_english(link: str) -> str:
            french = client.get(link, headers=BROWSER)
            switch = re.search(r'fr-translate__language" href="([^"]+)"', french.text)
            assert switch is not None
            english = client.get(html.unescape(switch[1]), headers=BROWSER)
            assert '<html lang="en">' in english.text
            action = re.search(r'<form method="post" action="([^"]+)"', english.text)
            assert action is not None
            answer = client.post(html.unescape(action[1]), headers=BROWSER)
            assert answer.status_code == 200
            assert '<html lang="en">' in answer.text
            return answer.text

        subscribe(client, "switch@example.org")
        confirm = link_in(smtp.wait_for(1)[0], "confirm")
        assert "<h1>Subscription confirmed</h1>" in press_the_button_in_english(confirm)
        client.post("/v1/lists/bluehats/unsubscriptions", json={"email": "switch@example.org"})
        leave = link_in(smtp.wait_for(2)[1], "unsubscribe")
        assert "<h1>You are unsubscribed</h1>" in press_the_button_in_english(leave)

    def test_a_link_cut_short_is_still_not_valid(self, client: TestClient, smtp: SmtpSink) -> None:
        subscribe(client, "cut@example.org")
        confirm = link_in(smtp.wait_for(1)[0], "confirm")
        for url in (confirm[:-1], confirm[:-1] + ".", confirm + "x"):
            assert client.get(url, headers={"accept": "application/json"}).status_code == 404


class TestMails:
    def test_language_follows_accept_language_then_the_list_default(
        self, client: TestClient, smtp: SmtpSink
    ) -> None:
        client.post(
            "/v1/lists/bluehats/subscriptions",
            json={"email": "en@example.org"},
            headers={"accept-language": "en-GB,en;q=0.8"},
        )
        client.post("/v1/lists/bluehats/subscriptions", json={"email": "fr@example.org"})
        mails = {m["To"]: m for m in smtp.wait_for(2)}
        assert mails["en@example.org"]["Subject"] == "Confirm your subscription to Gazette BlueHats"
        assert mails["en@example.org"]["Content-Language"] == "en"
        assert mails["fr@example.org"]["Content-Language"] == "fr"

    def test_internationalized_address_is_accepted_and_mailed(
        self, client: TestClient, smtp: SmtpSink, settings: Settings
    ) -> None:
        subscribe(client, "josé@exämple.fr")
        [mail] = smtp.wait_for(1)
        assert smtp.envelopes[0].rcpt_tos == ["josé@exämple.fr"]
        assert "josé@exämple.fr" in mail["To"]
        assert subscription(settings.database_url, "josé@exämple.fr") is not None

    def test_addresses_differing_only_by_case_are_one_subscriber_but_tags_are_kept(
        self, client: TestClient, smtp: SmtpSink, settings: Settings
    ) -> None:
        subscribe(client, "Ada@Example.org")
        subscribe(client, "ada@example.org")
        subscribe(client, "ada+tag@example.org")
        smtp.wait_for(2)
        assert count_rows(settings.database_url, "subscription") == 2
        row = subscription(settings.database_url, "ada@example.org")
        assert row is not None
        assert row.email == "Ada@example.org"


class TestRestart:
    def test_a_pending_subscription_survives_a_restart(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        without_worker = make_settings(database_url, smtp_port=smtp.port, run_worker=False)
        with TestClient(create_app(without_worker)) as client:
            subscribe(client, "patient@example.org")
        assert smtp.messages == []
        engine = make_engine(database_url)
        with Session(engine) as session:
            [job] = session.exec(select(OutboxJob)).all()
            assert job.state == JobState.PENDING
        engine.dispose()

        with TestClient(create_app(make_settings(database_url, smtp_port=smtp.port))) as client:
            [mail] = smtp.wait_for(1)
            response = client.post(link_in(mail, "confirm"), headers={"accept": "application/json"})
            assert response.json() == {"status": "confirmed", "list": "bluehats"}
