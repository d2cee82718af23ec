"""The mails this service sends, rendered from templates in the subscriber's language.

Nothing a visitor typed reaches a header except the validated address; the subject is
built from the list's name with line breaks and control characters removed. CR/LF is
refused in any header value besides: by `email.message` in the values it parses, by
`_fixed` in those parsed once, and the address is written as it is only without them.

The worker builds one mail after another, often inside the API's process, and `email`'s
modern API spends most of a mail's CPU parsing and folding headers and encoding parts. So
the headers that repeat from mail to mail (a list's From and Subject, the fixed ones) are
parsed and folded once and set raw, as are the plain ASCII ones made per mail (the date,
the Message-ID, an ASCII address), and the two text parts are encoded as `set_content`
would, directly: about 230 µs a mail, written out, against 600.
"""

from __future__ import annotations

import binascii
import email.policy
import re
import secrets
from collections.abc import Mapping
from datetime import timedelta
from email import headerregistry
from email.header import Header
from email.headerregistry import BaseHeader
from email.message import EmailMessage
from email.utils import format_datetime
from enum import StrEnum
from functools import lru_cache
from pathlib import Path

import jinja2

from app import addresses
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


# `email.policy.default` in every other respect (SMTP and the file mailer use the message's),
# except that a value set with `set_raw` is written as it is: those are folded here already,
# or are one unbreakable token (a URL, a Message-ID) that the default would rewrite as
# RFC 2047 words once over 78 characters.
POLICY = email.policy.default.clone(header_factory=_HeaderClasses(), refold_source="none")


# RFC 5322's line length, `email.policy.default`'s.
_LINE_LENGTH = 78
# RFC 2047: an encoded word is at most 75 characters, after a continuation line's space.
_ENCODED_LINE_LENGTH = 76
# RFC 5322 2.1.1, less `List-Unsubscribe: ` and the line's end.
_MAX_LINE = 998 - len("List-Unsubscribe: ")


def _text_part(subtype: str, body: str) -> EmailMessage:
    """A UTF-8 text part, encoded as `set_content` would with 7-bit output: as it is (7bit)
    when ASCII with no line over 78 characters, else quoted-printable (by `binascii`, in
    C). Never 8bit: that needs BODY=8BITMIME (RFC 6152), which smtplib declares only for
    an SMTPUTF8 mail. Its headers are parsed once per process: `set_content` spent a third
    of a mail setting them."""
    lines = body.encode().splitlines()
    data = b"\n".join(lines) + b"\n"  # as `set_content`: one newline at the end
    part = EmailMessage(policy=POLICY)
    part["Content-Type"] = _fixed("Content-Type", f'text/{subtype}; charset="utf-8"')
    if (
        data.isascii()
        and max(map(len, lines), default=0) <= _LINE_LENGTH
        and not _NOT_7BIT.search(data)
    ):
        cte = "7bit"
        payload = data.decode("ascii")
    else:
        cte = "quoted-printable"
        payload = binascii.b2a_qp(data, istext=True).decode("ascii")
    part["Content-Transfer-Encoding"] = _fixed("Content-Transfer-Encoding", cte)
    part.set_payload(payload)
    return part


def _duration(t: Translator, ttl: timedelta) -> str:
    """`48 hours`, `1 hour`, `20 minutes`: how long a link lasts, rounded down."""
    seconds = int(ttl.total_seconds())
    if seconds >= 3600:
        hours = seconds // 3600
        return t("duration.hour") if hours == 1 else t("duration.hours", n=hours)
    minutes = max(1, seconds // 60)
    return t("duration.minute") if minutes == 1 else t("duration.minutes", n=minutes)


@lru_cache(maxsize=256)
def _folded(name: str, value: str) -> str:
    """A header value that repeats across mails (a list's From and Subject...), parsed and
    folded once: what the generator writes after `name: ` (RFC 2047 words, continuation
    lines), kept with `set_raw`. The generator writes such a value as it is, where it
    folds a parsed header again for every mail."""
    header = _fixed(name, value)  # which refuses line breaks, on either path
    if name == "Subject" and (not value.isascii() or "=?" in value):
        # `email`'s folder loses the space between two encoded words ("à l'été" reads back
        # as "àl'été"); the classic encoder keeps every space inside the words. A subject
        # is our text, never RFC 2047 words to decode: the parser read a list named
        # `=?utf-8?q?a=0D=0ABcc:_x?=` as `a`, a line break and `Bcc: x`, which the folder
        # wrote as a header of its own. The encoder writes `=?` as any other letters.
        return Header(value, "utf-8", header_name=name).encode(
            linesep="\n", maxlinelen=_ENCODED_LINE_LENGTH
        )
    return header.fold(policy=POLICY)[len(name) + 2 :].rstrip("\r\n")


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


# Line breaks and other white space, and control characters (C0, DEL, C1): none may be in
# a header (RFC 5322 2.2), where the folder writes them as they are. The settings and the
# API refuse them in a list's name and wording; a name stored before they did is mended.
_NOT_ONE_LINE = re.compile(r"[\s\x00-\x1f\x7f-\x9f]+")
# What a 7bit part may not hold besides its line ends (RFC 2045 2.7): NUL, other controls.
_NOT_7BIT = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _one_line(text: str) -> str:
    return _NOT_ONE_LINE.sub(" ", text).strip()


def compose(
    kind: MailKind,
    *,
    locale: Locale,
    list_name: str,
    to: str,
    mail_from: str,
    message_key: str,
    link: str | None,
    confirm_ttl: timedelta = timedelta(hours=48),
    unsubscribe_link: str | None = None,
    strings: Mapping[str, str] | None = None,
) -> OutgoingMail:
    """Build the mail. `message_key` makes the Message-ID stable across retries of one job;
    `strings` is the list's own wording in `locale` (`ListSettings.strings`), as its pages."""
    t = Translator(locale, strings)
    prefix, button_key = _KEYS[kind]
    subject = _one_line(t(f"{prefix}.subject", list=list_name))
    # Hours down to the hour (a link never outlives what the mail says), minutes under one.
    expiry = t("mail.confirm.expiry", duration=_duration(t, confirm_ttl))
    context = {"t": t, "list_name": list_name, "email": to, "link": link, "expiry": expiry}
    text = _text_env.get_template(f"{kind.value}.txt").render(context)

    notes = []
    if kind == MailKind.CONFIRM:
        notes = [expiry, t("mail.ignore")]
    elif kind == MailKind.UNSUBSCRIBE:
        # Not `mail.ignore`'s "you will receive nothing else": this address stays subscribed.
        notes = [t("mail.unsubscribe.ignore", list=list_name)]
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

    # Checked at start (the settings), so this only reads it: the From header and the
    # envelope's sender are then the one address, whatever smtplib would read in the header.
    sender = addresses.sender(mail_from)
    message = EmailMessage(policy=POLICY)
    message.set_raw("From", _folded("From", mail_from))
    recipient = addresses.deliverable(to)
    if len(recipient.splitlines()) > 1:
        # As `EmailMessage.__setitem__` does: the generator would write any line break
        # `splitlines` finds as a new header line.
        raise ValueError("Header values may not contain linefeed or carriage return characters")
    # A validated address, as it is, on its one line (at most 4 + 254 characters): parsed,
    # `=?utf-8?q?ab?=c@example.org`, valid letters before an @-sign, read as the RFC 2047
    # word `ab`, and the header named another mailbox than the envelope (`abc@...`), or
    # none (a word hiding a line break made the mail fail at every attempt). An address
    # beyond ASCII goes only with SMTPUTF8, whose headers are UTF-8 (RFC 6532).
    message.set_raw("To", recipient)
    message.set_raw("Subject", _folded("Subject", subject))
    message.set_raw("Date", format_datetime(utcnow()))
    message.set_raw("Message-ID", f"<{message_key}@{sender.addr_spec.rpartition('@')[2]}>")
    # RFC 3834: machine-generated; no out-of-office replies, please.
    message.set_raw("Auto-Submitted", "auto-generated")
    message.set_raw("X-Auto-Response-Suppress", "All")
    if unsubscribe_link is not None:
        # RFC 2369 unsubscribe link, and RFC 8058 one-click, for mails to confirmed subscribers.
        # The URL as it is, on one line (RFC 2369): the header class would write a value
        # over 78 characters with no space to fold at as RFC 2047 words, which no client
        # reads as a URL. A line may have up to 998 (RFC 5322 2.1.1).
        value = f"<{unsubscribe_link}>"
        if not value.isascii() or len(value.splitlines()) > 1 or len(value) > _MAX_LINE:
            raise ValueError(f"not a URL for List-Unsubscribe: {unsubscribe_link!r}")
        message.set_raw("List-Unsubscribe", value)
        if unsubscribe_link[:8].lower() == "https://":
            # RFC 8058 3.1: one-click needs an HTTPS URI in List-Unsubscribe. Over http
            # (a development URL) the link stays for clients to show, without the claim.
            message.set_raw("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")
    parts = [_text_part("plain", text), _text_part("html", html)]
    message.set_raw("MIME-Version", "1.0")
    boundary = _boundary(*(str(part.get_payload()) for part in parts))
    message["Content-Type"] = f'multipart/alternative; boundary="{boundary}"'
    message.set_raw("Content-Language", _folded("Content-Language", locale.value))
    for part in parts:
        message.attach(part)
    return OutgoingMail(message=message, link=link, recipient=recipient, sender=sender.addr_spec)
