"""The pages in a real headless Chromium (Debian `chromium`, driven by Playwright), against
the app served by uvicorn on loopback with a real SMTP server: subscribe on the hosted page,
confirm from the mail, ask for an unsubscribe link on the list's page and unsubscribe from
the mail, in French and in English, and with a real Mailman 3 core as the backend. Every
page is checked by axe-core (no serious or critical violation) and photographed under
artifacts/screenshots/, and its markup by the Nu Html Checker."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

# Before the import below, so tests.mailman gets assertion rewriting like a plugin should.
pytest.register_assert_rewrite("tests.mailman")

from playwright.sync_api import Browser, Page, Route, sync_playwright  # noqa: E402
from sqlmodel import Session, select  # noqa: E402

from app import formguard  # noqa: E402
from app.api import docs  # noqa: E402
from app.config import MailmanBackendSettings  # noqa: E402
from app.db import make_engine  # noqa: E402
from app.main import create_app  # noqa: E402
from app.models import KeyScope, Subscription, Token, utcnow  # noqa: E402
from tests.conftest import (  # noqa: E402
    SECRET,
    LiveServer,
    SmtpSink,
    api_key_headers,
    count_rows,
    free_port,
    link_in,
    make_settings,
    wait_until,
)
from tests.mailman import MailmanCore, create_list, rest_client  # noqa: E402

pytest_plugins = ("tests.mailman",)

ROOT = Path(__file__).resolve().parents[1]
E2E_DIR = ROOT / "tests" / "e2e"
AXE_JS = E2E_DIR / "node_modules" / "axe-core" / "axe.min.js"
SWAGGER_UI_DIST = E2E_DIR / "node_modules" / "swagger-ui-dist"
# The Nu Html Checker (the W3C's validator), run by the system's Java.
VNU_JAR = E2E_DIR / "node_modules" / "vnu-jar" / "build" / "dist" / "vnu.jar"
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
FIELDS = [
    {"name": "name", "label": {"fr": "Vos nom et prénom", "en": "Your full name"}},
    {
        "name": "organisation",
        "label": {"fr": "Votre administration", "en": "Your organisation"},
        "required": True,
        "max_length": 80,
        "autocomplete": "organization",
    },
]
TEXT = {
    "fr": {
        "subscribe": "M'inscrire",
        "confirm": "Confirmer mon inscription",
        "confirmed": "Inscription confirmée",
        "unsubscribe": "Me désinscrire",
        "unsubscribed": "Désinscription effectuée",
        "thanks": "Vérifiez votre boîte mail",
        "subscribe_again": "Se réinscrire",
        "leave": "Se désinscrire",
        "ask_unsubscribe": "Recevoir un lien de désinscription",
        "unsubscribe_sent": "un message contenant un lien de désinscription vient de partir",
        "new_unsubscribe_link": "Demander un nouveau lien de désinscription",
        "new_link": "Recevoir un nouveau lien",
        "error": "Erreur - ",
        "press_again": "puis appuyez de nouveau sur le bouton « M'inscrire »",
        "switch": "English",
    },
    "en": {
        "subscribe": "Subscribe",
        "confirm": "Confirm my subscription",
        "confirmed": "Subscription confirmed",
        "unsubscribe": "Unsubscribe",
        "unsubscribed": "You are unsubscribed",
        "thanks": "Check your inbox",
        "subscribe_again": "Subscribe again",
        "leave": "Unsubscribe",
        "ask_unsubscribe": "Send me an unsubscribe link",
        "unsubscribe_sent": "a message with an unsubscribe link is on its way",
        "new_unsubscribe_link": "Ask for a new unsubscribe link",
        "new_link": "Send me a new link",
        "error": "Error - ",
        "press_again": "then press the “Subscribe” button again",
        "switch": "Français",
    },
}


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """axe-core, Swagger UI and the Nu Html Checker from the npm registry, as
    tests/e2e/package-lock.json pins."""
    if not (AXE_JS.exists() and (SWAGGER_UI_DIST / "package.json").exists() and VNU_JAR.exists()):
        npm = shutil.which("npm")
        assert npm, "npm is needed to install axe-core (tests/e2e/package.json)"
        subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=E2E_DIR,
            check=True,
            timeout=300,
            capture_output=True,
        )
    return E2E_DIR / "node_modules"


@pytest.fixture(scope="session")
def axe_source(node_modules: Path) -> str:
    return AXE_JS.read_text("utf-8")


# One browser for the module (there is one browser module): Playwright's sync API runs an
# event loop in this thread while it is started, and `asyncio.run` in later tests would fail.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "apt-get install -y chromium (see .ci/run)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


class Visit:
    """One visitor's browser tab, checking and photographing each page it reaches."""

    def __init__(self, page: Page, *, axe: str, shots: Path, lang: str, prefix: str = "") -> None:
        self.page = page
        self.prefix = prefix
        self.axe = axe
        self.shots = shots
        self.lang = lang
        self.seen: list[str] = []

    def check(self, name: str) -> None:
        """The page is in the visitor's language, has a language switch, passes axe-core
        without serious or critical violation, and is saved as a screenshot."""
        page = self.page
        assert page.locator("html").get_attribute("lang") == self.lang, name
        switch = page.locator("a.fr-translate__language")
        assert switch.inner_text() == TEXT[self.lang]["switch"], name
        # The CSP forbids scripts, so the context bypasses it to inject axe.
        page.add_script_tag(content=self.axe)
        result: dict[str, Any] = page.evaluate(
            "async () => await axe.run(document, {resultTypes: ['violations']})"
        )
        serious = [
            f"{violation['id']} ({violation['impact']}): {violation['help']} -> "
            + "; ".join(node["html"][:120] for node in violation["nodes"][:3])
            for violation in result["violations"]
            if violation["impact"] in ("serious", "critical")
        ]
        assert serious == [], f"{name}: {serious}"
        page.screenshot(
            path=str(self.shots / f"{self.prefix}{name}-{self.lang}.png"), full_page=True
        )
        self.seen.append(name)


def status_of(database_url: str, email: str) -> str | None:
    engine = make_engine(database_url)
    with Session(engine) as session:
        row = session.exec(select(Subscription).where(Subscription.email_key == email)).first()
    engine.dispose()
    return row.status if row else None


def expire_tokens(database_url: str) -> None:
    """Every link expired, its mail sent a year ago (as long before as the link's life)."""
    year_ago = utcnow().replace(year=utcnow().year - 1)
    engine = make_engine(database_url)
    with engine.begin() as connection:
        connection.execute(sa.update(Token).values(expires_at=year_ago))
        connection.execute(sa.update(Subscription).values(last_mail_at=year_ago))
    engine.dispose()


def serve(
    database_url: str, smtp: SmtpSink, *, min_fill_time: str = "0s", **list_overrides: Any
) -> tuple[LiveServer, str]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    settings = make_settings(
        database_url,
        smtp_port=smtp.port,
        public_url=base_url,
        # A browser fills the form in milliseconds; the fill time has its own tests.
        form_min_fill_time=min_fill_time,
        lists=[
            {"slug": "bluehats", "name": "Gazette BlueHats", "fields": FIELDS, **list_overrides}
        ],
    )
    return LiveServer(create_app(settings), port=port), base_url


def subscribe_on_the_hosted_page(visit: Visit, base_url: str, email: str, *, name: str) -> None:
    page, text = visit.page, TEXT[visit.lang]
    page.goto(f"{base_url}/v1/lists/bluehats")
    visit.check("subscribe")

    # First a mistake: a bad address and the required field left empty.
    page.fill("#field-email", "not-an-address")
    page.fill("#field-name", name)
    page.click(f'button:has-text("{text["subscribe"]}")')
    assert page.title().startswith(text["error"])
    assert page.locator("#error-summary a").count() == 2
    assert page.get_attribute("#field-email", "aria-invalid") == "true"
    assert page.get_attribute("#field-organisation", "aria-invalid") == "true"
    assert page.input_value("#field-name") == name
    # The summary has the focus: the errors are what a screen reader reads first.
    assert page.evaluate("document.activeElement.id") == "error-summary"
    visit.check("subscribe-errors")

    page.fill("#field-email", email)
    page.fill("#field-organisation", "DINUM")
    page.click(f'button:has-text("{text["subscribe"]}")')
    page.wait_for_url("**/v1/lists/bluehats/thanks?lang=*")
    assert page.locator("h1").inner_text() == text["thanks"]
    visit.check("thanks")


def confirm_from_the_mail(visit: Visit, smtp: SmtpSink, database_url: str, email: str) -> None:
    page, text = visit.page, TEXT[visit.lang]
    mail = smtp.mail_to(email, link="confirm")
    confirm = link_in(mail, "confirm")
    page.goto(mail_link(mail, confirm))
    assert page.locator("h1").inner_text() != text["confirmed"]
    visit.check("confirm")
    # Opening the link changed nothing.
    assert status_of(database_url, email) == "pending"
    page.click(f'button:has-text("{text["confirm"]}")')
    assert page.locator("h1").inner_text() == text["confirmed"]
    visit.check("confirmed")
    assert status_of(database_url, email) == "confirmed"


def ask_for_an_unsubscribe_link(visit: Visit, base_url: str, email: str) -> None:
    """Without a mail at hand: from the hosted page to the list's unsubscribe page."""
    page, text = visit.page, TEXT[visit.lang]
    page.goto(f"{base_url}/v1/lists/bluehats")
    page.click(f'a:has-text("{text["leave"]}")')
    page.wait_for_url(f"**/v1/lists/bluehats/unsubscribe?lang={visit.lang}")
    visit.check("unsubscribe-request")

    page.fill("#field-email", "not-an-address")
    page.click(f'button:has-text("{text["ask_unsubscribe"]}")')
    assert page.title().startswith(text["error"])
    assert page.get_attribute("#field-email", "aria-invalid") == "true"
    assert page.input_value("#field-email") == "not-an-address"
    assert page.evaluate("document.activeElement.id") == "error-summary"
    visit.check("unsubscribe-request-errors")

    page.fill("#field-email", email)
    page.click(f'button:has-text("{text["ask_unsubscribe"]}")')
    page.wait_for_url(f"**/v1/lists/bluehats/unsubscribe/sent?lang={visit.lang}")
    assert text["unsubscribe_sent"] in page.locator("main").inner_text()
    visit.check("unsubscribe-sent")


def unsubscribe_from_the_mail(
    visit: Visit, smtp: SmtpSink, database_url: str, base_url: str, email: str
) -> None:
    page, text = visit.page, TEXT[visit.lang]
    ask_for_an_unsubscribe_link(visit, base_url, email)
    mail = smtp.mail_to(email, link="unsubscribe")
    page.goto(mail_link(mail, link_in(mail, "unsubscribe")))
    visit.check("unsubscribe")
    assert status_of(database_url, email) == "confirmed"
    page.click(f'button:has-text("{text["unsubscribe"]}")')
    assert page.locator("h1").inner_text() == text["unsubscribed"]
    visit.check("unsubscribed")
    assert status_of(database_url, email) == "unsubscribed"
    # The way back: the hosted page, in the same language.
    page.click(f'a:has-text("{text["subscribe_again"]}")')
    assert page.url.endswith(f"/v1/lists/bluehats?lang={visit.lang}")
    assert page.locator("#field-email").count() == 1


def mail_link(mail: Any, path: str) -> str:
    """The absolute link as the mail has it (the public URL is the live server's)."""
    for word in mail.get_body(preferencelist=("plain",)).get_content().split():
        if word.endswith(path):
            return str(word)
    raise AssertionError(f"{path} not found as an absolute link")


def error_pages(visit: Visit, smtp: SmtpSink, database_url: str, base_url: str) -> None:
    page, text = visit.page, TEXT[visit.lang]
    other = f"late-{visit.lang}@example.org"
    answer = httpx.post(
        f"{base_url}/v1/lists/bluehats/subscriptions",
        json={"email": other, "locale": visit.lang, "attributes": {"organisation": "X"}},
        trust_env=False,
    )
    assert answer.status_code == 202
    mail = smtp.mail_to(other, link="confirm")
    expire_tokens(database_url)
    expired = page.goto(mail_link(mail, link_in(mail, "confirm")))
    assert expired is not None
    assert expired.status == 410
    assert page.title().startswith(text["error"])
    visit.check("expired-link")
    # The list requires a field an address-only form cannot ask for: the way to a new link
    # is the list's own page, with every field.
    page.click(f'main a:has-text("{text["new_link"]}")')
    page.wait_for_url(f"**/v1/lists/bluehats?lang={visit.lang}")
    assert page.locator("#field-email").count() == 1
    assert page.locator("#field-organisation").count() == 1

    unknown = page.goto(f"{base_url}/v1/confirm/{'A' * 43}")
    assert unknown is not None
    assert unknown.status == 404
    assert page.title().startswith(text["error"])
    visit.check("unknown-link")

    # A broken unsubscribe link leads to the page that sends a new one.
    broken = page.goto(f"{base_url}/v1/unsubscribe/{'A' * 43}")
    assert broken is not None
    assert broken.status == 404
    page.click(f'a:has-text("{text["new_unsubscribe_link"]}")')
    page.wait_for_url(f"**/v1/lists/bluehats/unsubscribe?lang={visit.lang}")
    assert page.locator("#field-email").count() == 1

    no_list = page.goto(f"{base_url}/v1/lists/nope")
    assert no_list is not None
    assert no_list.status == 404
    assert page.title().startswith(text["error"])
    visit.check("unknown-list")


@pytest.mark.parametrize("lang", ["fr", "en"])
def test_subscribe_confirm_and_unsubscribe_in_a_browser(
    lang: str,
    browser: Browser,
    axe_source: str,
    screenshots: Path,
    database_url: str,
    smtp: SmtpSink,
) -> None:
    email = f"camille-{lang}@example.org"
    server, base_url = serve(database_url, smtp)
    locale = {"fr": "fr-FR", "en": "en-GB"}[lang]
    context = browser.new_context(bypass_csp=True, locale=locale)
    try:
        with server:
            visit = Visit(context.new_page(), axe=axe_source, shots=screenshots, lang=lang)
            subscribe_on_the_hosted_page(visit, base_url, email, name="Camille Martin")
            confirm_from_the_mail(visit, smtp, database_url, email)
            unsubscribe_from_the_mail(visit, smtp, database_url, base_url, email)
            error_pages(visit, smtp, database_url, base_url)
    finally:
        context.close()
    assert visit.seen == [
        "subscribe",
        "subscribe-errors",
        "thanks",
        "confirm",
        "confirmed",
        "unsubscribe-request",
        "unsubscribe-request-errors",
        "unsubscribe-sent",
        "unsubscribe",
        "unsubscribed",
        "expired-link",
        "unknown-link",
        "unknown-list",
    ]


def test_the_language_switch_leads_to_the_same_page_in_the_other_language(
    browser: Browser, axe_source: str, screenshots: Path, database_url: str, smtp: SmtpSink
) -> None:
    server, base_url = serve(database_url, smtp)
    context = browser.new_context(bypass_csp=True, locale="fr-FR")
    try:
        with server:
            page = context.new_page()
            page.goto(f"{base_url}/v1/lists/bluehats")
            assert page.locator("h1").inner_text() == "S'inscrire à Gazette BlueHats"
            page.click("a.fr-translate__language")
            assert page.locator("html").get_attribute("lang") == "en"
            assert page.locator("h1").inner_text() == "Subscribe to Gazette BlueHats"
            # The keyboard reaches the skip link first, and it leads to the content.
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.getAttribute('href')") == "#content"
    finally:
        context.close()


@pytest.mark.parametrize("lang", ["fr", "en"])
def test_a_visitor_who_presses_at_once_is_asked_to_press_again_and_gets_the_mail(
    lang: str,
    browser: Browser,
    axe_source: str,
    screenshots: Path,
    database_url: str,
    smtp: SmtpSink,
) -> None:
    """The browser fills the address in, the visitor presses at once: the post came before
    the form's fill time and was dropped as a robot's behind a "check your inbox" page,
    and no mail ever came."""
    text = TEXT[lang]
    email = f"prompt-{lang}@example.org"
    server, base_url = serve(database_url, smtp, min_fill_time="3s")
    locale = {"fr": "fr-FR", "en": "en-GB"}[lang]
    context = browser.new_context(bypass_csp=True, locale=locale)
    try:
        with server:
            visit = Visit(
                context.new_page(), axe=axe_source, shots=screenshots, lang=lang, prefix="at-once-"
            )
            page = visit.page
            page.goto(f"{base_url}/v1/lists/bluehats")
            page.fill("#field-email", email)
            page.fill("#field-organisation", "DINUM")
            page.click(f'button:has-text("{text["subscribe"]}")')
            page.wait_for_load_state()
            assert "/thanks" not in page.url
            assert text["press_again"] in page.locator("#notice").inner_text()
            assert page.evaluate("document.activeElement.id") == "notice"
            assert page.input_value("#field-email") == email
            assert page.input_value("#field-organisation") == "DINUM"
            visit.check("subscribe-press-again")
            assert status_of(database_url, email) is None

            page.click(f'button:has-text("{text["subscribe"]}")')
            page.wait_for_url("**/v1/lists/bluehats/thanks?lang=*")
            assert page.locator("h1").inner_text() == text["thanks"]
            mail = smtp.mail_to(email, link="confirm")
            assert mail["Content-Language"] == lang
            assert status_of(database_url, email) == "pending"
            assert len(smtp.messages) == 1
    finally:
        context.close()


def test_back_from_the_thank_you_page_and_a_second_press_end_in_one_subscription(
    browser: Browser, database_url: str, smtp: SmtpSink
) -> None:
    """Back from the thank-you page fetched the form anew, its stamp too fresh for the
    press that followed at once: the visitor was asked to press yet again."""
    email = "twice@example.org"
    server, base_url = serve(database_url, smtp, min_fill_time="1s")
    context = browser.new_context(bypass_csp=True, locale="fr-FR")
    try:
        with server:
            page = context.new_page()
            page.goto(f"{base_url}/v1/lists/bluehats")
            page.fill("#field-email", email)
            page.fill("#field-organisation", "DINUM")
            time.sleep(1.2)
            page.click(f'button:has-text("{TEXT["fr"]["subscribe"]}")')
            page.wait_for_url("**/v1/lists/bluehats/thanks?lang=fr")
            smtp.mail_to(email, link="confirm")

            page.go_back()
            assert page.input_value("#field-email") == email
            with page.expect_navigation():
                page.click(f'button:has-text("{TEXT["fr"]["subscribe"]}")')
            assert page.url.endswith("/v1/lists/bluehats/thanks?lang=fr"), page.url
            assert page.locator("h1").inner_text() == TEXT["fr"]["thanks"]
            assert status_of(database_url, email) == "pending"
            # The second request is in the ledger; one confirmation mail for both.
            wait_until(lambda: count_rows(database_url, "consent_event") == 2)
            assert count_rows(database_url, "outbox_job") == 1
            assert len(smtp.messages) == 1
    finally:
        context.close()


def test_back_to_a_form_sent_back_with_an_error_is_no_dead_end(
    browser: Browser, database_url: str, smtp: SmtpSink
) -> None:
    """A typo, the form back with its error, the address corrected, the thank-you page;
    then Back: Chrome stopped on "Confirm Form Resubmission" (ERR_CACHE_MISS), as the form
    sent back was not to be kept even for the history."""
    email = "typo@example.org"
    server, base_url = serve(database_url, smtp)
    context = browser.new_context(bypass_csp=True, locale="fr-FR")
    try:
        with server:
            page = context.new_page()
            page.goto(f"{base_url}/v1/lists/bluehats")
            page.fill("#field-email", "typo@exemple")
            page.fill("#field-organisation", "DINUM")
            page.click(f'button:has-text("{TEXT["fr"]["subscribe"]}")')
            assert page.title().startswith(TEXT["fr"]["error"])
            # Reload posts the same again: the same error, nothing taken.
            page.reload()
            assert page.get_attribute("#field-email", "aria-invalid") == "true"
            assert status_of(database_url, email) is None

            page.fill("#field-email", email)
            page.click(f'button:has-text("{TEXT["fr"]["subscribe"]}")')
            page.wait_for_url("**/v1/lists/bluehats/thanks?lang=fr")
            mail = smtp.mail_to(email, link="confirm")
            assert mail["Content-Language"] == "fr"

            page.go_back()
            assert page.url.endswith("/v1/lists/bluehats/subscriptions?lang=fr")
            assert page.locator("#field-email").count() == 1
            page.fill("#field-email", email)
            page.click(f'button:has-text("{TEXT["fr"]["subscribe"]}")')
            page.wait_for_url("**/v1/lists/bluehats/thanks?lang=fr")
            assert status_of(database_url, email) == "pending"
            wait_until(lambda: count_rows(database_url, "consent_event") == 2)
            assert count_rows(database_url, "outbox_job") == 1
            assert [message["To"] for message in smtp.messages] == [email]
    finally:
        context.close()


def roster_names(core: MailmanCore, list_id: str) -> dict[str, str | None]:
    with rest_client(core) as client:
        response = client.get(f"/lists/{list_id}/roster/member", params={"count": 100, "page": 1})
    response.raise_for_status()
    return {
        entry["email"]: entry.get("display_name") for entry in response.json().get("entries", [])
    }


def test_a_browser_subscriber_joins_and_leaves_a_real_mailman_list(
    browser: Browser,
    axe_source: str,
    screenshots: Path,
    database_url: str,
    smtp: SmtpSink,
    mailman_core: MailmanCore,
) -> None:
    list_id = create_list(mailman_core)
    backend = MailmanBackendSettings(
        base_url=mailman_core.base_url,
        username=mailman_core.admin_user,
        password=mailman_core.admin_password,
        list_id=list_id,
    )
    email = "ada-mailman@example.com"
    server, base_url = serve(database_url, smtp, backend=backend)
    context = browser.new_context(bypass_csp=True, locale="fr-FR")
    try:
        with server:
            visit = Visit(
                context.new_page(), axe=axe_source, shots=screenshots, lang="fr", prefix="mailman-"
            )
            subscribe_on_the_hosted_page(visit, base_url, email, name="Ada Lovelace")
            confirm_from_the_mail(visit, smtp, database_url, email)
            wait_until(lambda: roster_names(mailman_core, list_id) == {email: "Ada Lovelace"})
            unsubscribe_from_the_mail(visit, smtp, database_url, base_url, email)
            wait_until(lambda: roster_names(mailman_core, list_id) == {})
    finally:
        context.close()


class SitePage:
    """One page of "the site" on another loopback origin, in the bytes a site serves it."""

    def __init__(self, body: bytes, *, content_type: str) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return self.origin

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def readme_form(action: str) -> str:
    """The site's form as the README gives it, posting to `action` instead."""
    readme = (ROOT / "README.md").read_text("utf-8")
    [form] = re.findall(r"```html\n(<form .*?</form>)\n```", readme, re.S)
    return form.replace("https://newsletter.code.gouv.fr/v1/lists/bluehats/subscriptions", action)


@pytest.mark.parametrize("encoding", ["utf-8", "windows-1252"])
def test_the_readme_s_form_on_another_site_works_without_javascript(
    browser: Browser, database_url: str, smtp: SmtpSink, encoding: str
) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    # Many sites still serve their pages in a legacy encoding: the form must post UTF-8.
    html = (
        f'<!DOCTYPE html><html lang="fr"><head><meta charset="{encoding}">'
        "<title>Le site</title></head><body>"
        + readme_form(f"{base_url}/v1/lists/bluehats/subscriptions")
        + "</body></html>"
    )
    site = SitePage(html.encode(encoding), content_type=f"text/html; charset={encoding}")
    with site as origin:
        settings = make_settings(
            database_url,
            smtp_port=smtp.port,
            public_url=base_url,
            allowed_origins=origin,
            lists=[{"slug": "bluehats", "name": "Gazette BlueHats", "fields": FIELDS}],
        )
        context = browser.new_context(java_script_enabled=False, locale="fr-FR")
        try:
            with LiveServer(create_app(settings), port=port):
                page = context.new_page()
                page.goto(f"{origin}/")
                page.fill("#nl-email", "  Site.Visitor@Example.org ")
                page.fill("#nl-organisation", "Préfecture de l'Hérault")
                with page.expect_navigation():
                    page.click("button[type=submit]")
                assert page.url == f"{base_url}/v1/lists/bluehats/thanks?lang=fr", page.content()
                assert page.locator("h1").inner_text() == TEXT["fr"]["thanks"]
                smtp.mail_to("Site.Visitor@example.org", link="confirm")
        finally:
            context.close()
    engine = make_engine(database_url)
    with Session(engine) as session:
        [row] = session.exec(select(Subscription)).all()
    engine.dispose()
    assert row.attributes == {"organisation": "Préfecture de l'Hérault"}


@pytest.mark.parametrize("tampered", [False, True], ids=["as-released", "changed-on-the-cdn"])
def test_the_api_docs_run_swagger_ui_only_from_the_files_their_hashes_name(
    browser: Browser,
    node_modules: Path,
    screenshots: Path,
    database_url: str,
    smtp: SmtpSink,
    tampered: bool,
) -> None:
    """/docs under its own CSP, the CDN answered with the npm release's files (the test has
    no internet): they run; the same files with a byte changed are refused, nothing runs."""
    assert (SWAGGER_UI_DIST / "package.json").read_text("utf-8").count(f'"{docs.SWAGGER_UI}"')

    def cdn(route: Route) -> None:
        name = route.request.url.removeprefix(docs.CDN + "/")
        body = (SWAGGER_UI_DIST / name).read_bytes() + (b"\n" if tampered else b"")
        kind = "text/css" if name.endswith(".css") else "text/javascript"
        headers = {"content-type": kind, "access-control-allow-origin": "*"}
        route.fulfill(status=200, body=body, headers=headers)

    server, base_url = serve(database_url, smtp)
    context = browser.new_context(locale="en-GB")
    errors: list[str] = []
    try:
        with server:
            page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.route(f"{docs.CDN}/**", cdn)
            page.goto(f"{base_url}/docs")
            if tampered:
                page.wait_for_load_state("load")
                assert page.locator("#swagger-ui").inner_text() == ""
                assert any("integrity" in error for error in errors), errors
                return
            title = page.locator(".swagger-ui .info .title")
            title.wait_for(timeout=15_000)
            assert "BlueHats" in title.inner_text()
            path = page.locator('.opblock-summary-path[data-path="/v1/lists/{slug}/subscriptions"]')
            path.wait_for()
            page.screenshot(path=str(screenshots / "api-docs.png"))
            assert errors == []
    finally:
        context.close()


def test_a_list_created_through_the_api_leads_its_visitors_to_its_thank_you_page(
    browser: Browser, database_url: str, smtp: SmtpSink
) -> None:
    """The pages' CSP (`form-action`) named the thank-you pages of the settings' lists only:
    on the page of a list created through the admin API, Chrome refused to follow the
    post's redirect to the site, and the visitor stayed on the form, the request taken."""
    site = SitePage(b"<!DOCTYPE html><title>Merci</title><h1>Merci</h1>", content_type="text/html")
    server, base_url = serve(database_url, smtp)
    context = browser.new_context(locale="fr-FR")
    refused: list[str] = []
    try:
        with site as origin, server:
            engine = make_engine(database_url)
            key = api_key_headers(engine, "operator", KeyScope.WRITE)
            engine.dispose()
            created = httpx.post(
                f"{base_url}/v1/admin/lists",
                json={"slug": "events", "name": "Événements", "thank_you_url": f"{origin}/merci"},
                headers=key,
                trust_env=False,
            )
            assert created.status_code == 201, created.text
            page = context.new_page()
            page.on("console", lambda m: refused.append(m.text) if m.type == "error" else None)
            page.goto(f"{base_url}/v1/lists/events")
            page.fill("#field-email", "events@example.org")
            with page.expect_navigation():
                page.click("button[type=submit]")
            assert page.url == f"{origin}/merci", refused
            smtp.mail_to("events@example.org", link="confirm")

            # Its expired link's way to a new one leads there too, through the list's page.
            answer = httpx.post(
                f"{base_url}/v1/lists/events/subscriptions",
                json={"email": "late@example.org"},
                trust_env=False,
            )
            assert answer.status_code == 202
            mail = smtp.mail_to("late@example.org", link="confirm")
            expire_tokens(database_url)
            page.goto(mail_link(mail, link_in(mail, "confirm")))
            page.click(f'main a:has-text("{TEXT["fr"]["new_link"]}")')
            page.fill("#field-email", "late@example.org")
            with page.expect_navigation():
                page.click("button[type=submit]")
            assert page.url == f"{origin}/merci", refused
    finally:
        context.close()


def test_the_new_link_form_of_a_dead_link_takes_an_address_beyond_ascii(
    browser: Browser, axe_source: str, screenshots: Path, database_url: str, smtp: SmtpSink
) -> None:
    """The form of an expired link's page let the browser check the address: Chrome refused
    `josé@...` (which the service takes) in its own language, and no new link could be had."""
    server, base_url = serve(database_url, smtp, fields=[])
    context = browser.new_context(bypass_csp=True, locale="fr-FR")
    try:
        with server:
            answer = httpx.post(
                f"{base_url}/v1/lists/bluehats/subscriptions",
                json={"email": "josé@exemple.fr"},
                trust_env=False,
            )
            assert answer.status_code == 202
            mail = smtp.mail_to("josé@exemple.fr", link="confirm")
            expire_tokens(database_url)
            visit = Visit(context.new_page(), axe=axe_source, shots=screenshots, lang="fr")
            page = visit.page
            page.goto(mail_link(mail, link_in(mail, "confirm")))
            visit.check("expired-link-address-form")
            page.fill("main input[type=email]", "josé@exemple.fr")
            with page.expect_navigation():
                page.click(f'button:has-text("{TEXT["fr"]["new_link"]}")')
            assert page.url.endswith("/v1/lists/bluehats/thanks?lang=fr"), page.url
            assert len(smtp.wait_for(2)) == 2
    finally:
        context.close()


def width_overflow(page: Page) -> int:
    """How far the page reaches past the window's side (0: it scrolls down only)."""
    return int(
        page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    )


@pytest.mark.parametrize("lang", ["fr", "en"])
def test_the_pages_fit_a_320_px_screen_whatever_the_length_of_a_word(
    lang: str,
    browser: Browser,
    axe_source: str,
    screenshots: Path,
    database_url: str,
    smtp: SmtpSink,
) -> None:
    """A 320 px wide screen (a small phone, or 1280 px zoomed to 400 %) scrolls one way only
    (WCAG 1.4.10): an address shown back in an error, or a list's long name, that ran off
    the side made the whole page scroll sideways. Both forms, as served, sent back to press
    again, sent back with an error, and the pages they lead to."""
    text = TEXT[lang]
    name = "Lettre-d'information-de-la-direction-interministérielle-du-numérique"
    # Each form's first press is to come back with "press again": a fill time longer than
    # the page's checks (axe-core and a screenshot, over 3 s on a busy machine) before it.
    server, base_url = serve(database_url, smtp, name=name, min_fill_time="60s")
    context = browser.new_context(
        bypass_csp=True,
        locale={"fr": "fr-FR", "en": "en-GB"}[lang],
        viewport={"width": 320, "height": 640},
    )
    long_address = f"{'camille.dupont-martin' * 3}@{'administration' * 4}.gouv.fr"
    try:
        with server:
            visit = Visit(
                context.new_page(), axe=axe_source, shots=screenshots, lang=lang, prefix="320px-"
            )
            page = visit.page

            def fits(name: str) -> None:
                visit.check(name)
                assert width_overflow(page) == 0, name

            page.goto(f"{base_url}/v1/lists/bluehats")
            fits("subscribe")
            page.fill("#field-email", long_address)
            page.fill("#field-organisation", "Direction-interministérielle-du-numérique" * 2)
            page.click(f'button:has-text("{text["subscribe"]}")')
            assert page.locator("#notice").count() == 1
            fits("subscribe-press-again")
            page.fill("#field-email", f"Camille <{long_address}>")
            page.click(f'button:has-text("{text["subscribe"]}")')
            assert long_address in page.locator("#field-email-error").inner_text()
            fits("subscribe-errors")
            page.fill("#field-email", long_address)
            page.click(f'button:has-text("{text["subscribe"]}")')
            page.wait_for_url("**/v1/lists/bluehats/thanks?lang=*")
            fits("thanks")

            mail = smtp.mail_to(long_address, link="confirm")
            page.goto(mail_link(mail, link_in(mail, "confirm")))
            fits("confirm")
            page.click(f'button:has-text("{text["confirm"]}")')
            fits("confirmed")

            page.goto(f"{base_url}/v1/lists/bluehats/unsubscribe")
            fits("unsubscribe-request")
            page.fill("#field-email", f"Camille <{long_address}>")
            page.click(f'button:has-text("{text["ask_unsubscribe"]}")')
            assert page.locator("#notice").count() == 1
            fits("unsubscribe-request-press-again")
            page.click(f'button:has-text("{text["ask_unsubscribe"]}")')
            assert long_address in page.locator("#field-email-error").inner_text()
            fits("unsubscribe-request-errors")
            page.fill("#field-email", long_address)
            page.click(f'button:has-text("{text["ask_unsubscribe"]}")')
            page.wait_for_url("**/v1/lists/bluehats/unsubscribe/sent?lang=*")
            fits("unsubscribe-sent")
            mail = smtp.mail_to(long_address, link="unsubscribe")
            page.goto(mail_link(mail, link_in(mail, "unsubscribe")))
            fits("unsubscribe")
            page.click(f'button:has-text("{text["unsubscribe"]}")')
            fits("unsubscribed")
    finally:
        context.close()


def test_every_page_is_valid_html(
    node_modules: Path, database_url: str, smtp: SmtpSink, tmp_path: Path
) -> None:
    """The Nu Html Checker finds no error in any page as served, in both languages: the
    forms, their errors, the links' pages and answers, the error pages."""
    java = shutil.which("java")
    assert java, "the Nu Html Checker runs on Java (apt-get install default-jre-headless)"
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    settings = make_settings(
        database_url,
        smtp_port=smtp.port,
        public_url=base_url,
        form_min_fill_time="0s",
        resend_interval="0s",
        lists=[
            {"slug": "bluehats", "name": "Gazette BlueHats", "fields": FIELDS},
            {"slug": "news", "name": "Actualités", "consent_text": {"fr": "Oui.\n\nVraiment."}},
        ],
    )
    served: dict[str, str] = {}
    with (
        LiveServer(create_app(settings), port=port),
        httpx.Client(base_url=base_url, trust_env=False) as client,
    ):
        for lang in ("fr", "en"):
            html = {"accept": "text/html", "accept-language": lang}

            def keep(name: str, answer: httpx.Response, status: int, lang: str = lang) -> None:
                assert answer.status_code == status, (name, lang, answer.text[:300])
                served[f"{name}-{lang}"] = answer.text

            def get(path: str, html: dict[str, str] = html) -> httpx.Response:
                return client.get(path, headers=html)

            def post(path: str, html: dict[str, str] = html, **kwargs: Any) -> httpx.Response:
                return client.post(path, headers=html, **kwargs)

            for page in ("", "/thanks", "/confirmed", "/unsubscribed", "/unsubscribe"):
                keep(f"bluehats{page.replace('/', '-')}", get(f"/v1/lists/bluehats{page}"), 200)
            keep("news", get("/v1/lists/news"), 200)
            keep("sent", get("/v1/lists/bluehats/unsubscribe/sent"), 200)
            keep(
                "subscribe-errors",
                post("/v1/lists/bluehats/subscriptions", data={"email": "Camille <c@example.org>"}),
                422,
            )
            # A page left open longer than the stamp's age: the form again, to press again.
            stale = formguard.issue(key=SECRET.encode(), now=utcnow() - timedelta(days=2))
            keep(
                "subscribe-press-again",
                post(
                    "/v1/lists/bluehats/subscriptions",
                    data={"email": "c@example.org", "form_stamp": stale},
                ),
                422,
            )
            keep(
                "unsubscribe-press-again",
                post(
                    "/v1/lists/bluehats/unsubscriptions",
                    data={"email": "c@example.org", "form_stamp": stale},
                ),
                422,
            )
            keep(
                "unsubscribe-errors",
                post("/v1/lists/bluehats/unsubscriptions", data={"email": "nope"}),
                422,
            )
            keep(
                "origin-refused",
                client.post(
                    "/v1/lists/news/subscriptions",
                    data={"email": "c@example.org"},
                    headers={**html, "origin": "https://elsewhere.example"},
                ),
                403,
            )
            email = f"valid-{lang}@example.org"
            post("/v1/lists/news/subscriptions", json={"email": email, "locale": lang})
            confirm = link_in(smtp.mail_to(email, link="confirm"), "confirm")
            keep("confirm", get(confirm), 200)
            keep("confirmed-answer", post(confirm), 200)
            # The used link's page asks for an address itself (the list requires no field).
            keep("used-link", post(confirm), 409)
            post("/v1/lists/news/unsubscriptions", json={"email": email})
            leave = link_in(smtp.mail_to(email, link="unsubscribe"), "unsubscribe")
            keep("unsubscribe", get(leave), 200)
            keep("unsubscribed-answer", post(leave), 200)
            # Several lists: the page of a link cut short leads to each one's.
            keep("unknown-confirm-link", get("/v1/confirm/" + "A" * 30), 404)
            keep("unknown-unsubscribe-link", get("/v1/unsubscribe/" + "A" * 30), 404)
            keep("unknown-list", get("/v1/lists/nope"), 404)
            keep("not-found", get("/nowhere"), 404)
    for name, text in served.items():
        (tmp_path / f"{name}.html").write_text(text, "utf-8")
    pages = sorted(str(path) for path in tmp_path.glob("*.html"))
    checked = subprocess.run(
        [java, "-jar", str(VNU_JAR), "--errors-only", "--format", "json", "--stdout", *pages],
        capture_output=True,
        text=True,
        timeout=180,
    )
    errors = [
        f"{Path(message.get('url', '?')).name}:{message.get('lastLine')}: {message['message']}"
        for message in json.loads(checked.stdout)["messages"]
    ]
    assert errors == [], errors
    assert len(pages) == len(served) == 42
