"""The mails this service sends, rendered from templates in the subscriber's language.

Nothing a visitor typed reaches a header except the validated address; the subject is
built from the list's name with line breaks removed, and `email.message` refuses CR/LF in
any header value besides (`_fixed` too, for the values it parses once).

The worker builds one mail after another, often inside the API's process: `email`'s modern
API spends most of a mail's CPU parsing and folding headers, so what repeats from mail to
mail (the header classes, the From and Subject of a list, the fixed headers) is parsed once.
"""

from __future__ import annotations

import email.policy
import re
import secrets
from email import headerregistry
from email.headerregistry import BaseHeader
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from enum import StrEnum
from functools import lru_cache
from pathlib import Path

import jinja2

from app.config import Locale
from app.i18n import Translator
from app.mailer import OutgoingMail
from app.models import utcnow

TEMPLATES = Path(__file__).parent / "templates" / "mail"

_text_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=False,  # noqa: S701 - plain-text parts; the HTML part has its own environment
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
)
_html_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


class MailKind(StrEnum):
    CONFIRM = "confirm"
    ALREADY_SUBSCRIBED = "already_subscribed"
    UNSUBSCRIBE = "unsubscribe"
    GOODBYE = "goodbye"


# Catalogue prefix, and the button label of the HTML part, per kind.
_KEYS: dict[MailKind, tuple[str, str | None]] = {
    MailKind.CONFIRM: ("mail.confirm", "mail.confirm.button"),
    MailKind.ALREADY_SUBSCRIBED: ("mail.already", "mail.unsubscribe.button"),
    MailKind.UNSUBSCRIBE: ("mail.unsubscribe", "mail.unsubscribe.button"),
    MailKind.GOODBYE: ("mail.goodbye", None),
}


class _HeaderClasses(headerregistry.HeaderRegistry):
    """The stock registry makes a new class with `type()` for every header it parses (a
    fifth of a mail's CPU); the class depends on the header's name only, so keep one."""

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        made = self._made.get(name.lower())
        if made is None:
            made = self._made[name.lower()] = super().__getitem__(name)
        return made


# `email.policy.default` in every other respect (SMTP and the file mailer use the message's).
POLICY = email.policy.default.clone(header_factory=_HeaderClasses())


@lru_cache(maxsize=256)
def _fixed(name: str, value: str) -> BaseHeader:
    """A header whose value repeats across mails, parsed once (headers are immutable)."""
    if len(value.splitlines()) > 1:
        # As `EmailMessage.__setitem__` does for the values it parses itself.
        raise ValueError("Header values may not contain linefeed or carriage return characters")
    header: BaseHeader = POLICY.header_factory(name, value)
    return header


def _boundary(*parts: str) -> str:
    """A multipart boundary found in no part. The generator would make one itself, and
    compile a regular expression for each mail to check it; `=_` never occurs in a
    quoted-printable or base64 body, and plain parts are checked here."""
    while True:
        boundary = "=_" + secrets.token_hex(16)
        if not any(boundary in part for part in parts):
            return boundary


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def compose(
    kind: MailKind,
    *,
    locale: Locale,
    list_name: str,
    to: str,
    mail_from: str,
    message_key: str,
    link: str | None,
    confirm_hours: int = 48,
    unsubscribe_link: str | None = None,
) -> OutgoingMail:
    """Build the mail. `message_key` makes the Message-ID stable across retries of one job."""
    t = Translator(locale)
    prefix, button_key = _KEYS[kind]
    subject = _one_line(t(f"{prefix}.subject", list=list_name))
    context = {"t": t, "list_name": list_name, "email": to, "link": link, "hours": confirm_hours}
    text = _text_env.get_template(f"{kind.value}.txt").render(context)

    notes = []
    if kind == MailKind.CONFIRM:
        notes = [t("mail.confirm.expiry", hours=confirm_hours), t("mail.ignore")]
    elif kind == MailKind.UNSUBSCRIBE:
        notes = [t("mail.ignore")]
    html = _html_env.get_template("layout.html").render(
        lang=locale.value,
        subject=subject,
        intro=t(f"{prefix}.intro", list=list_name, email=to),
        action=t(f"{prefix}.action", list=list_name) if kind != MailKind.GOODBYE else None,
        link=link,
        button=t(button_key) if button_key else "",
        notes=notes,
        signature=t("mail.signature", list=list_name),
    )

    message = EmailMessage(policy=POLICY)
    message["From"] = _fixed("From", mail_from)
    message["To"] = to
    message["Subject"] = _fixed("Subject", subject)
    message["Date"] = format_datetime(utcnow())
    message["Message-ID"] = f"<{message_key}@{_domain_of(mail_from)}>"
    # RFC 3834: machine-generated; no out-of-office replies, please.
    message["Auto-Submitted"] = _fixed("Auto-Submitted", "auto-generated")
    message["X-Auto-Response-Suppress"] = _fixed("X-Auto-Response-Suppress", "All")
    if unsubscribe_link is not None:
        # RFC 8058 one-click unsubscribe for mails to confirmed subscribers.
        message["List-Unsubscribe"] = f"<{unsubscribe_link}>"
        message["List-Unsubscribe-Post"] = _fixed(
            "List-Unsubscribe-Post", "List-Unsubscribe=One-Click"
        )
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    message.replace_header(
        "Content-Type", f'multipart/alternative; boundary="{_boundary(text, html)}"'
    )
    # After the body: setting content clears every Content-* header.
    message["Content-Language"] = _fixed("Content-Language", locale.value)
    return OutgoingMail(message=message, link=link)


@lru_cache(maxsize=16)
def _domain_of(mail_from: str) -> str:
    address = parseaddr(mail_from)[1]
    domain = address.rpartition("@")[2]
    return domain or "localhost"
