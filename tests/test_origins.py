"""Browser form posts only from allowed sites; CORS for the public JSON routes only.

"Nothing happens" on a refusal is measured on the rows a request can cause (subscriptions,
consent-ledger events, outbox jobs), with a well-formed request that would otherwise act.
"""

from __future__ import annotations

import html
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.config import Settings
from app.main import create_app
from app.middleware import vary_on_origin
from tests.conftest import SmtpSink, count_rows, link_in, make_settings

SUBSCRIBE = "/v1/lists/bluehats/subscriptions"
UNSUBSCRIBE = "/v1/lists/bluehats/unsubscriptions"
FORM = {"content-type": "application/x-www-form-urlencoded"}
WANTS_JSON = {"accept": "application/json"}
SITE = "https://code.gouv.fr"
STRANGER = "https://evil.example"
STORED = ("subscription", "consent_event", "outbox_job")


def stored(settings: Settings) -> dict[str, int]:
    return {table: count_rows(settings.database_url, table) for table in STORED}


@pytest.fixture
def site_settings(database_url: str, smtp: SmtpSink) -> Settings:
    return make_settings(
        database_url, smtp_port=smtp.port, allowed_origins=f"{SITE}, http://localhost:8080"
    )


@pytest.fixture
def site_client(site_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(site_settings)) as client:
        yield client


def form_post(client: TestClient, path: str, body: str, **headers: str) -> httpx.Response:
    return client.post(
        path, content=body, headers={**FORM, **WANTS_JSON, **headers}, follow_redirects=False
    )


def refused(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    assert response.json() == {
        "error": "origin_not_allowed",
        "detail": "This form may not be sent from that site. "
        "Use the form on the newsletter's own site.",
    }


def member(client: TestClient, smtp: SmtpSink, email: str) -> tuple[str, str]:
    """A confirmed member: its confirm link (now used) and its unsubscribe link."""
    assert client.post(SUBSCRIBE, json={"email": email}).status_code == 202
    confirm = link_in(smtp.mail_to(email, link="confirm"), "confirm")
    assert client.post(confirm, headers=WANTS_JSON).json()["status"] == "confirmed"
    assert client.post(UNSUBSCRIBE, json={"email": email}).status_code == 202
    return confirm, link_in(smtp.mail_to(email, link="unsubscribe"), "unsubscribe")


class TestFormPostsFromOtherSites:
    @pytest.mark.parametrize("path", [SUBSCRIBE, UNSUBSCRIBE])
    def test_a_form_post_from_a_stranger_site_is_403_and_changes_nothing(
        self, site_client: TestClient, smtp: SmtpSink, site_settings: Settings, path: str
    ) -> None:
        member(site_client, smtp, "member@example.org")
        before = stored(site_settings)
        for headers in (
            {"origin": STRANGER},
            {"referer": f"{STRANGER}/newsletter.html"},
            {"origin": STRANGER, "referer": f"{SITE}/newsletter.html"},
            # A look-alike: the allowed host as a subdomain of another, or another port.
            {"origin": "https://code.gouv.fr.evil.example"},
            {"origin": "https://code.gouv.fr:8443"},
            {"origin": "http://code.gouv.fr"},
            # Any page can make a browser send `null` (no-referrer policy, sandboxed frame).
            {"origin": "null"},
            {"referer": "about:blank"},
        ):
            refused(form_post(site_client, path, "email=member%40example.org", **headers))
        assert stored(site_settings) == before

    def test_the_allowed_site_its_referer_and_our_own_pages_may_post(
        self, site_client: TestClient, site_settings: Settings
    ) -> None:
        cases = {
            "site origin": {"origin": SITE},
            "site origin with its default port": {"origin": "https://CODE.gouv.fr:443"},
            "second allowed origin": {"origin": "http://localhost:8080"},
            "site referer": {"referer": f"{SITE}/inscription?x=1"},
            "our own hosted page": {"origin": "http://testserver"},
            # Privacy tools strip both; a browser posting from another site never does.
            "neither header": {},
        }
        for number, (name, headers) in enumerate(cases.items()):
            response = form_post(
                site_client, SUBSCRIBE, f"email=p{number}%40example.org", **headers
            )
            assert response.status_code == 303, (name, response.text)
        assert count_rows(site_settings.database_url, "subscription") == len(cases)

    def test_json_calls_are_left_to_cors(
        self, site_client: TestClient, site_settings: Settings
    ) -> None:
        # A browser sends cross-origin JSON only after a preflight the CORS allow-list
        # answers; servers integrating by REST send whatever Origin they like.
        response = site_client.post(
            SUBSCRIBE, json={"email": "api@example.org"}, headers={"origin": STRANGER}
        )
        assert response.status_code == 202
        assert count_rows(site_settings.database_url, "subscription") == 1

    @pytest.mark.parametrize(
        ("language", "title", "why"),
        [
            ("fr", "Erreur - Formulaire envoyé depuis un autre site", "le site où vous l'avez"),
            ("en", "Error - Form sent from another site", "the site where you filled it"),
        ],
    )
    @pytest.mark.parametrize("path", [SUBSCRIBE, UNSUBSCRIBE])
    def test_a_browser_gets_a_page_saying_why(
        self, site_client: TestClient, path: str, language: str, title: str, why: str
    ) -> None:
        response = site_client.post(
            path,
            content=b"email=x%40example.org",
            headers={
                **FORM,
                "origin": STRANGER,
                "accept": "text/html",
                "accept-language": language,
            },
        )
        assert response.status_code == 403
        assert response.headers["content-type"].startswith("text/html")
        # Not the generic "try again in a moment": trying again from there cannot work.
        assert f"<title>{title}" in response.text
        assert why in html.unescape(response.text)


class TestLinkButtons:
    def test_confirm_and_unsubscribe_buttons_posted_from_a_stranger_site_are_403(
        self, site_client: TestClient, smtp: SmtpSink, site_settings: Settings
    ) -> None:
        assert site_client.post(SUBSCRIBE, json={"email": "new@example.org"}).status_code == 202
        confirm = link_in(smtp.mail_to("new@example.org", link="confirm"), "confirm")
        refused(form_post(site_client, confirm, "", origin=STRANGER))
        assert count_rows(site_settings.database_url, "consent_event") == 1
        response = form_post(site_client, confirm, "", origin="http://testserver")
        assert response.json()["status"] == "confirmed"

        assert site_client.post(UNSUBSCRIBE, json={"email": "new@example.org"}).status_code == 202
        unsubscribe = link_in(smtp.mail_to("new@example.org", link="unsubscribe"), "unsubscribe")
        refused(form_post(site_client, unsubscribe, "", origin=STRANGER))
        # A form with enctype="text/plain", or a post with no body, needs no preflight either.
        for headers in ({"content-type": "text/plain"}, {}):
            headers = {**headers, "origin": STRANGER, "accept": "application/json"}
            response = site_client.post(unsubscribe, headers=headers)
            refused(response)
        where = "subscription WHERE status = 'confirmed'"
        assert count_rows(site_settings.database_url, where) == 1

    def test_rfc_8058_one_click_works_whatever_its_headers(
        self, site_client: TestClient, smtp: SmtpSink, site_settings: Settings
    ) -> None:
        _confirm, unsubscribe = member(site_client, smtp, "leaving@example.org")
        response = form_post(
            site_client,
            unsubscribe,
            "List-Unsubscribe=One-Click",
            origin="https://mail.provider.example",
            referer="https://mail.provider.example/inbox",
        )
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "unsubscribed"

    def test_our_pages_send_the_origin_with_their_form_posts(
        self, site_client: TestClient, smtp: SmtpSink
    ) -> None:
        # Under `no-referrer` a browser would send `Origin: null` with the page's button.
        assert site_client.post(SUBSCRIBE, json={"email": "page@example.org"}).status_code == 202
        confirm = link_in(smtp.mail_to("page@example.org", link="confirm"), "confirm")
        page = site_client.get(confirm)
        assert page.headers["referrer-policy"] == "strict-origin"


class TestCors:
    def preflight(self, client: TestClient, path: str, origin: str) -> httpx.Response:
        return client.options(
            path,
            headers={
                "origin": origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type",
            },
        )

    @pytest.mark.parametrize(
        "path", [SUBSCRIBE, UNSUBSCRIBE, "/v1/confirm/abc", "/v1/unsubscribe/abc", "/v1/challenge"]
    )
    def test_a_preflight_from_an_allowed_site_is_answered_and_cached(
        self, site_client: TestClient, path: str
    ) -> None:
        response = self.preflight(site_client, path, SITE)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == SITE
        assert "POST" in response.headers["access-control-allow-methods"]
        assert "content-type" in response.headers["access-control-allow-headers"].lower()
        assert response.headers["access-control-max-age"] == "3600"
        assert "access-control-allow-credentials" not in response.headers

    def test_a_preflight_from_another_site_is_refused(self, site_client: TestClient) -> None:
        response = self.preflight(site_client, SUBSCRIBE, STRANGER)
        assert response.status_code == 400
        assert "access-control-allow-origin" not in response.headers
        # In the one error shape, saying what was refused (the site's developer reads it
        # in the browser's network panel).
        assert response.json()["error"] == "cors_refused"
        assert "(refused: origin)" in response.json()["detail"]

    def test_a_preflight_asking_for_a_header_not_allowed_says_which_are(
        self, site_client: TestClient
    ) -> None:
        response = site_client.options(
            SUBSCRIBE,
            headers={
                "origin": SITE,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type, x-api-key",
            },
        )
        assert response.status_code == 400
        assert set(response.json()) == {"error", "detail"}
        assert "(refused: headers)" in response.json()["detail"]
        assert "Content-Type, Accept and Accept-Language" in response.json()["detail"]

    def test_an_allowed_site_may_read_the_answer(self, site_client: TestClient) -> None:
        response = site_client.post(
            SUBSCRIBE, json={"email": "cors@example.org"}, headers={"origin": SITE}
        )
        assert response.status_code == 202
        assert response.headers["access-control-allow-origin"] == SITE
        other = site_client.get("/v1/challenge", headers={"origin": STRANGER})
        assert other.status_code == 200
        assert "access-control-allow-origin" not in other.headers

    def test_an_allowed_site_s_script_may_read_when_to_try_again(
        self, database_url: str, smtp: SmtpSink
    ) -> None:
        # A page's fetch() sees only the CORS-safelisted headers unless the answer exposes
        # others: a 429's Retry-After (and the request id to quote when asking for help).
        settings = make_settings(
            database_url, smtp_port=smtp.port, allowed_origins=SITE, rate_limit_per_ip="1/minute"
        )
        with TestClient(create_app(settings)) as client:
            for status in (202, 429):
                response = client.post(
                    SUBSCRIBE, json={"email": "busy@example.org"}, headers={"origin": SITE}
                )
                assert response.status_code == status, response.text
                exposed = response.headers["access-control-expose-headers"].lower().split(", ")
                assert {"retry-after", "x-request-id"} <= set(exposed)
            assert response.headers["retry-after"]

    def test_the_answer_varies_by_origin_with_or_without_one(self, site_client: TestClient) -> None:
        # A cache must not serve a server's answer (no Origin, so no allow header) to a
        # page that sent one, nor the other way round.
        plain = site_client.post(SUBSCRIBE, json={"email": "vary@example.org"})
        assert plain.status_code == 202
        assert "access-control-allow-origin" not in plain.headers
        assert plain.headers.get_list("vary") == ["Origin"]
        from_site = site_client.post(
            SUBSCRIBE, json={"email": "vary@example.org"}, headers={"origin": SITE}
        )
        assert from_site.headers.get_list("vary") == ["Origin"]

    def test_origin_joins_a_vary_the_route_set(self) -> None:
        message = {
            "type": "http.response.start",
            "headers": [(b"content-type", b"text/html"), (b"Vary", b"Accept-Language")],
        }
        vary_on_origin(message)
        assert message["headers"] == [
            (b"content-type", b"text/html"),
            (b"vary", b"Accept-Language, Origin"),
        ]

    @pytest.mark.parametrize("path", ["/v1/admin/lists", "/v1/webhooks/mailgun", "/healthz"])
    def test_other_routes_have_no_cors_at_all(self, site_client: TestClient, path: str) -> None:
        response = self.preflight(site_client, path, SITE)
        assert "access-control-allow-origin" not in response.headers
        answer = site_client.get(path, headers={"origin": SITE})
        assert "access-control-allow-origin" not in answer.headers


class TestSetting:
    def test_origins_are_read_from_a_comma_list_and_normalized(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv(
            "NEWSLETTER_ALLOWED_ORIGINS", "https://Code.Gouv.FR:443, http://[::1]:8080/"
        )
        settings = Settings()
        assert settings.allowed_origins == ["https://code.gouv.fr", "http://[::1]:8080"]
        assert settings.form_origins() == [
            "http://127.0.0.1:8000",
            "http://[::1]:8080",
            "https://code.gouv.fr",
        ]

    @pytest.mark.parametrize(
        "value",
        [
            "code.gouv.fr",
            "https://code.gouv.fr/newsletter",
            "ftp://code.gouv.fr",
            "https://user:pw@code.gouv.fr",
            "https://code.gouv.fr:99999",
            "null",
        ],
    )
    def test_anything_but_an_origin_fails_at_start(self, value: str) -> None:
        with pytest.raises(ValidationError, match="allowed_origins"):
            Settings(allowed_origins=[value])
