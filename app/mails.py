"""The mails this service sends, rendered from templates in the subscriber's language.

Nothing a visitor typed reaches a header except the validated address; the subject is
built from the list's name with line breaks removed, and `email.message` refuses CR/LF in
any header value besides.
"""

from __future__ import annotations

import re
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from enum import StrEnum
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

    message = EmailMessage()
    message["From"] = mail_from
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = format_datetime(utcnow())
    message["Message-ID"] = f"<{message_key}@{_domain_of(mail_from)}>"
    # RFC 3834: machine-generated; no out-of-office replies, please.
    message["Auto-Submitted"] = "auto-generated"
    message["X-Auto-Response-Suppress"] = "All"
    if unsubscribe_link is not None:
        # RFC 8058 one-click unsubscribe for mails to confirmed subscribers.
        message["List-Unsubscribe"] = f"<{unsubscribe_link}>"
        message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    # After the body: setting content clears every Content-* header.
    message["Content-Language"] = locale.value
    return OutgoingMail(message=message, link=link)


def _domain_of(mail_from: str) -> str:
    address = parseaddr(mail_from)[1]
    domain = address.rpartition("@")[2]
    return domain or "localhost"
