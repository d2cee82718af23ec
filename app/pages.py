"""Server-rendered pages (no JavaScript): the hosted subscription form, the interstitials
behind mail links, and the result and error pages, in French and English.

Markup uses the French State design system's class names (DSFR), so its stylesheet applies
when `dsfr_stylesheet_url` is set; otherwise the built-in /static/style.css gives the look.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import jinja2
from markupsafe import Markup
from starlette.responses import HTMLResponse

from app.config import FieldType, Locale
from app.i18n import Translator

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates" / "pages"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
_BLANK_LINES = re.compile(r"\n\s*\n")


def paragraphs(text: str) -> Markup:
    """A text in paragraphs as the page shows it: a blank line between two, a line break
    kept within one. An operator's wording (a list's consent text, a reworded string) may
    hold them, as the mails show them; in one `<p>` they ran together."""
    return Markup("").join(
        Markup("<p>{}</p>").format(Markup("<br>\n").join(part.strip().splitlines()))
        for part in _BLANK_LINES.split(text.strip())
    )


_env.filters["paragraphs"] = paragraphs


def other_locale(locale: Locale) -> Locale:
    return Locale.EN if locale == Locale.FR else Locale.FR


def with_lang(path: str, query: str, locale: Locale) -> str:
    """`path?query` with its `lang` parameter set to `locale` (the language switch)."""
    pairs = [(name, value) for name, value in parse_qsl(query) if name != "lang"]
    return f"{path}?{urlencode([*pairs, ('lang', locale.value)])}"


@dataclass(frozen=True, slots=True)
class Chrome:
    """What surrounds every page: its language, the switch to the other one, the look."""

    t: Translator
    # The same page in the other language (a link, so it works without JavaScript).
    switch_url: str
    service_name: str
    # The DSFR stylesheet when configured; the built-in one otherwise.
    stylesheet_url: str | None = None
    # Forms that ask for an address carry a proof of work (app/static/pow.js solves it).
    proof_of_work: bool = False

    @property
    def locale(self) -> Locale:
        return self.t.locale


@dataclass(frozen=True, slots=True)
class Form:
    action: str
    button: str
    # Ask for an address (the "send me a new link" form); otherwise a lone button.
    ask_email: bool = False
    email_label: str = ""
    hidden: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ListLinks:
    """A way on to one of several lists' pages, when a page cannot tell which list."""

    label: str
    # (list name, URL of its page)
    links: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class InputView:
    """One input of the hosted form, with what the visitor typed and what is wrong with it."""

    name: str
    label: str
    type: str
    required: bool
    autocomplete: str
    value: str = ""
    error: str | None = None
    hint: str | None = None
    max_length: int | None = None

    @property
    def id(self) -> str:
        return f"field-{self.name}"

    @property
    def describedby(self) -> str:
        ids = [f"{self.id}-hint"] if self.hint else []
        if self.error:
            ids.append(f"{self.id}-error")
        return " ".join(ids)


def input_type(kind: FieldType) -> str:
    return {FieldType.TEXT: "text", FieldType.EMAIL: "email", FieldType.URL: "url"}[kind]


@dataclass(frozen=True, slots=True)
class SubscribeForm:
    action: str
    list_name: str
    consent_text: str
    consent_version: str
    inputs: list[InputView]
    hidden: dict[str, str]
    honeypot_name: str
    # The list's page to ask for an unsubscribe link ("Already subscribed? Unsubscribe").
    unsubscribe_url: str = ""
    # Why a post with nothing wrong in it came back: press again (app/formguard.py).
    notice: str | None = None

    @property
    def errors(self) -> list[InputView]:
        return [item for item in self.inputs if item.error]


@dataclass(frozen=True, slots=True)
class UnsubscribeRequestForm:
    """The page to ask for an unsubscribe link: one address, the robots' trap, one button."""

    action: str
    list_name: str
    email: InputView
    hidden: dict[str, str]
    honeypot_name: str
    # Why a post with nothing wrong in it came back: press again (app/formguard.py).
    notice: str | None = None

    @property
    def errors(self) -> list[InputView]:
        return [self.email] if self.email.error else []


def render(
    *,
    chrome: Chrome,
    title: str,
    text: str,
    status_code: int = 200,
    form: Form | None = None,
    back_url: str | None = None,
    subscribe_url: str | None = None,
    is_error: bool = False,
    unsubscribe_url: str | None = None,
    ask_url: str | None = None,
    form_url: str | None = None,
    list_links: ListLinks | None = None,
) -> HTMLResponse:
    """A page with a title, a paragraph and at most one form or a way on."""
    return _render(
        "page.html",
        chrome=chrome,
        title=title,
        status_code=status_code,
        is_error=is_error,
        text=text,
        form=form,
        back_url=back_url,
        subscribe_url=subscribe_url,
        unsubscribe_url=unsubscribe_url,
        ask_url=ask_url,
        form_url=form_url,
        list_links=list_links,
    )


def render_subscribe(
    *, chrome: Chrome, form: SubscribeForm, status_code: int = 200
) -> HTMLResponse:
    """The hosted subscription page; with errors, a 422 whose title says so."""
    return _render(
        "subscribe.html",
        chrome=chrome,
        title=chrome.t("page.subscribe.title", list=form.list_name),
        status_code=status_code,
        is_error=bool(form.errors),
        form=form,
    )


def render_unsubscribe_request(
    *, chrome: Chrome, form: UnsubscribeRequestForm, status_code: int = 200
) -> HTMLResponse:
    """The page to ask for an unsubscribe link; with an error, a 422 whose title says so."""
    return _render(
        "unsubscribe_request.html",
        chrome=chrome,
        title=chrome.t("page.unsubscribe_request.title", list=form.list_name),
        status_code=status_code,
        is_error=bool(form.errors),
        form=form,
    )


def _render(
    template: str,
    *,
    chrome: Chrome,
    title: str,
    status_code: int,
    is_error: bool,
    **context: object,
) -> HTMLResponse:
    t = chrome.t
    # The window title says the state first: a screen reader announces it on arrival.
    head_title = f"{title} - {chrome.service_name}"
    if is_error:
        head_title = f"{t('layout.error_prefix')} - {head_title}"
    other = other_locale(chrome.locale)
    html = _env.get_template(template).render(
        chrome=chrome,
        t=t,
        lang=chrome.locale.value,
        other_lang=other.value,
        # The switch's text is in the language it leads to.
        other_lang_name=Translator(other)("layout.lang_name"),
        title=title,
        head_title=head_title,
        is_error=is_error,
        **context,
    )
    return HTMLResponse(html, status_code=status_code)
