"""One typed Settings object, read from `NEWSLETTER_*` variables and validated at start.

Nested values use `__` (`NEWSLETTER_MAILER__KIND=smtp`, `NEWSLETTER_MAILER__HOST=...`);
lists are given as JSON (`NEWSLETTER_LISTS='[{"slug": "bluehats", ...}]'`).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import secrets
import ssl
from collections.abc import Mapping
from datetime import timedelta
from enum import StrEnum
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import limits
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    HttpUrl,
    IPvAnyNetwork,
    SecretStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from app import addresses, origins

# A sign is accepted so that "-5m" fails as negative rather than as unreadable.
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# The longest duration a setting takes. Every one is added to or taken from the present
# (a link's expiry, a retention cut-off, a resend interval): a million days passed the
# start and then failed each request that did the sum, beyond year 9999.
MAX_DURATION = timedelta(days=36500)


def _parse_duration(value: object) -> object:
    """`90`, `90s`, `5m`, `48h`, `7d` as well as pydantic's ISO 8601 and `HH:MM:SS`."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            seconds = float(match[1]) * _UNIT_SECONDS[match[2] or "s"]
            if abs(seconds) > MAX_DURATION.total_seconds():
                raise ValueError(_TOO_LONG)
            return timedelta(seconds=seconds)
        # Left to pydantic, `off` or `2 hours` read "invalid digit in duration".
        if _is_off(value):
            raise ValueError(f"cannot be off; {_DURATION_FORMS}")
        if ":" not in value and not value.strip().lstrip("-").upper().startswith("P"):
            raise ValueError(f"{value!r} is not a duration; {_DURATION_FORMS}")
    return value


_DURATION_FORMS = "give seconds (90) or a number with its unit: 90s, 5m, 48h, 7d"


def _seconds(value: object) -> object:
    """A number of seconds (`30`, `2.5`), or a duration as above (`30s`, `2m`)."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match[1]) * _UNIT_SECONDS[match[2] or "s"]
    return value


# The settings in seconds (timeouts, the worker's pauses) take the durations' units too:
# `NEWSLETTER_MAILER__TIMEOUT=30s` was refused as "not a valid number".
Seconds = BeforeValidator(_seconds)


_TOO_LONG = f"durations may not exceed {MAX_DURATION.days}d (100 years)"


def _within_bounds(value: timedelta | None) -> timedelta | None:
    if value is not None and value > MAX_DURATION:
        raise ValueError(_TOO_LONG)
    return value


Duration = Annotated[timedelta, BeforeValidator(_parse_duration), AfterValidator(_within_bounds)]


def _is_off(value: object) -> bool:
    """The words that turn an optional setting off, alike for every such setting."""
    return isinstance(value, str) and value.strip().lower() in ("", "off", "none")


def _duration_or_off(value: object) -> object:
    return None if _is_off(value) else _parse_duration(value)


# A duration, or `off` (also `none` or empty) for a periodic task that does not run.
DurationOrOff = Annotated[
    timedelta | None, BeforeValidator(_duration_or_off), AfterValidator(_within_bounds)
]


def _rate_limit_or_off(value: object) -> object:
    return None if _is_off(value) else value


def _parsed_rate_limit(value: str | None) -> str | None:
    """Fail at start on a limit `limits` cannot read ("10/minute", "3 per day;20/week")."""
    if value is None:
        return None
    try:
        items = limits.parse_many(value)
    except ValueError:
        # `limits` said "couldn't parse rate limit string", leaving the syntax to guess.
        raise ValueError(
            f"{value!r} is not a rate limit: write a count per period, as 20/minute, 3/day "
            "or 200/hour (several joined by ';'), or off"
        ) from None
    if any(item.amount < 1 for item in items):
        raise ValueError("a rate limit must allow at least 1 (use 'off' to turn it off)")
    return value


# The `limits` string syntax, several joined by ";"; `off` turns the limit off.
RateLimit = Annotated[
    str | None, BeforeValidator(_rate_limit_or_off), AfterValidator(_parsed_rate_limit)
]


def _list_from_text(value: object) -> object:
    """A JSON array, or the friendlier `10.0.0.0/8, 192.0.2.7` that operators write."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def _network(value: object) -> object:
    """A proxy's network as written, refused with the network meant when its host bits are
    set (`10.0.0.1/8`), which the bare "not a valid network" left to guess, and a proxy
    named by its host name (`nginx`), which is not looked up."""
    if isinstance(value, str) and "/" not in value:
        try:
            ipaddress.ip_address(value.strip())
        except ValueError:
            raise ValueError(
                f"{value.strip()!r} is not an IP address: give each proxy as the service sees "
                "it connect, by address (10.0.0.7) or network (10.0.0.0/8), not by name"
            ) from None
    if isinstance(value, str) and "/" in value:
        try:
            ipaddress.ip_network(value.strip())
        except ValueError:
            try:
                network = ipaddress.ip_network(value.strip(), strict=False)
            except ValueError:
                return value
            address = value.strip().partition("/")[0]
            raise ValueError(
                f"{value.strip()} has host bits set: write {network} for the whole network, "
                f"or {address} for one proxy"
            ) from None
    return value


ProxyNetwork = Annotated[IPvAnyNetwork, BeforeValidator(_network)]


class Locale(StrEnum):
    FR = "fr"
    EN = "en"


SLUG_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
# The patterns in words, by the key they check, for whoever typed a value one refuses
# (`BlueHats`, a list's name for its address): the pattern itself was the message.
PATTERN_RULES = {
    "slug": (
        "a list's name is lowercase letters, digits and dashes, starting with a letter or a "
        "digit, at most 63 of them (as bluehats or gazette-bluehats)"
    ),
    "list_address": "the list's address, as bluehats@mail.codegouv.fr",
    # A form field's name (a list's own name has no pattern).
    "name": (
        "a field's name is lowercase letters, digits and underscores, starting with a letter, "
        "at most 63 of them (as organisation or job_title)"
    ),
    "autocomplete": "an HTML autocomplete token, lowercase letters and dashes (as organization)",
    "helo_name": (
        "a host name, of letters, digits, dashes and dots (as newsletter.code.gouv.fr), or "
        "an address literal (as [192.0.2.7])"
    ),
    "rate_limit_key_prefix": (
        "letters, digits and _ . : - only, at most 64 of them (as newsletter-staging)"
    ),
}


def pattern_rule(error: ErrorDetails) -> str | None:
    """A value refused by its key's pattern, said in words; None for any other error."""
    if error["type"] != "string_pattern_mismatch" or not error["loc"]:
        return None
    return PATTERN_RULES.get(str(error["loc"][-1]))


def error_message(error: ErrorDetails) -> str:
    """What a validation error says to whoever typed the value: a pattern's rule in words
    (`pattern_rule`), else pydantic's message without the prefix it gives our validators'
    own ("Value error, ...")."""
    rule = pattern_rule(error)
    if rule is not None:
        return rule
    return str(error.get("msg", "invalid value")).removeprefix("Value error, ")


class NoneBackendSettings(BaseModel):
    """No mailing-list backend: sync jobs only log (development)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["none"] = "none"


def _without_credentials(value: HttpUrl | None, *, instead: str) -> HttpUrl | None:
    """A backend's URL holds no `user:password@`: the HTTP client's debug log and its
    errors print the URL, the credentials with it. The message shows no part of it."""
    if value is not None and (value.username or value.password):
        raise ValueError(
            f"base_url holds a user name or password (user:password@): remove them from it "
            f"and give the credentials in {instead}, which are kept out of logs"
        )
    return value


class MailgunRegion(StrEnum):
    EU = "eu"
    US = "us"


class MailgunBackendSettings(BaseModel):
    """A Mailgun mailing list (https://documentation.mailgun.com/docs/mailgun/api-reference/)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["mailgun"] = "mailgun"
    # The list's address at Mailgun, e.g. bluehats@mail.codegouv.fr.
    list_address: Annotated[str, Field(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")]
    api_key: SecretStr
    region: MailgunRegion = MailgunRegion.EU
    # Overrides the region's API host (a proxy, or a test server).
    base_url: HttpUrl | None = None
    # Signs the webhooks Mailgun posts to /v1/webhooks/mailgun.
    webhook_signing_key: SecretStr | None = None
    # On a new opt-in, clear the address from Mailgun's unsubscribes and bounces lists.
    clear_suppressions: bool = True

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, value: HttpUrl | None) -> HttpUrl | None:
        _without_credentials(value, instead="api_key")
        # Mailgun's pages write each call's URL with its version (https://api.eu.mailgun.net
        # /v3/lists/...); a base_url copied with it made every call /v3/v3/..., a 404.
        if value is not None and re.search(r"/v\d+/?$", value.path or ""):
            root = re.sub(r"/v\d+/?$", "", str(value))
            raise ValueError(
                f"base_url is the API's root, without the version the calls add: {root}"
            )
        return value

    @model_validator(mode="after")
    def _one_host(self) -> MailgunBackendSettings:
        # base_url wins: a region given with it would say a host that is not used.
        if "region" in self.model_fields_set and self.base_url is not None:
            raise ValueError(
                "give region or base_url, not both: base_url replaces the region's API host"
            )
        return self


class MailmanBackendSettings(BaseModel):
    """A GNU Mailman 3 list through the core REST API."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["mailman"] = "mailman"
    # The REST root including the API version, e.g. http://127.0.0.1:8001/3.1
    base_url: HttpUrl
    username: Annotated[str, Field(min_length=1)]
    password: SecretStr
    # The list's id, e.g. bluehats.lists.example.org
    list_id: Annotated[str, Field(min_length=3, max_length=254)]

    @field_validator("base_url")
    @classmethod
    def _api_version(cls, value: HttpUrl) -> HttpUrl:
        _without_credentials(value, instead="username and password")
        # Without the version every call answers 404, which would read as a missing list.
        if not re.search(r"/3\.\d+/?$", value.path or ""):
            # A URL copied from a call (`.../3.1/lists/<id>`) is cut after its version,
            # rather than given the version once more at its end.
            url = str(value)
            version = re.search(r"^(\w+://[^/]+(?:/[^/]+)*?/3\.\d+)/", url)
            root = version[1] if version else url.rstrip("/") + "/3.1"
            raise ValueError(
                f"base_url must end with the REST API version, e.g. {root} (Mailman answers "
                "404 to every call without it)"
            )
        # API 3.0 writes users' and members' ids as numbers, which the adapter (written
        # for 3.1's hex strings) would not take: an erasure found no user and left the
        # person's name at Mailman.
        version = re.search(r"/(3\.\d+)/?$", value.path or "")
        if version and version[1] != "3.1":
            root = re.sub(r"/3\.\d+/?$", "/3.1", str(value))
            raise ValueError(
                f"base_url must end with /3.1, the REST API version this service speaks, "
                f"e.g. {root} (not {version[1]}: Mailman 3.3 answers 3.0 too, with ids as "
                "numbers, which an erasure would not find)"
            )
        return value

    @field_validator("list_id")
    @classmethod
    def _list_id(cls, value: str) -> str:
        # Mailman's POST /members takes the list id only (the other calls take either), so
        # the posting address would pass a reconciliation and then fail every addition.
        if "@" in value:
            name, _, domain = value.partition("@")
            raise ValueError(f"list_id is the list's id, not its posting address: {name}.{domain}")
        # Mailman makes list ids lower-case and matches them exactly.
        return value.lower()


class ListmonkBackendSettings(BaseModel):
    """A listmonk list through its REST API (API user and token)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["listmonk"] = "listmonk"
    base_url: HttpUrl
    username: Annotated[str, Field(min_length=1)]
    api_token: SecretStr
    list_id: Annotated[int, Field(ge=1)]

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, value: HttpUrl) -> HttpUrl:
        _without_credentials(value, instead="username and api_token")
        # The calls add /api/...: a base_url copied from listmonk's API pages with it made
        # every call /api/api/..., a 404.
        if re.search(r"/api/?$", value.path or ""):
            root = re.sub(r"/api/?$", "", str(value))
            raise ValueError(f"base_url is listmonk's root, without the /api the calls add: {root}")
        return value


def _backend_kind(value: object) -> str | None:
    if isinstance(value, dict):
        kind = value.get("kind", "none")
        return kind if isinstance(kind, str) else None
    return getattr(value, "kind", None)


BackendSettings = Annotated[
    Annotated[NoneBackendSettings, Tag("none")]
    | Annotated[MailgunBackendSettings, Tag("mailgun")]
    | Annotated[MailmanBackendSettings, Tag("mailman")]
    | Annotated[ListmonkBackendSettings, Tag("listmonk")],
    Discriminator(_backend_kind),
]


# Form fields the service itself reads; a list's own fields may not take these names.
RESERVED_FIELD_NAMES = frozenset(
    {
        "email",
        "locale",
        "lang",
        "attributes",
        "consent_version",
        "form_stamp",
        "website",
        "pow_challenge",
        "pow_nonce",
    }
)


class FieldType(StrEnum):
    TEXT = "text"
    EMAIL = "email"
    URL = "url"


class FormField(BaseModel):
    """A field a list asks for besides the address, stored as a subscription attribute and
    sent to the backend as a member variable (`name` becomes the member's display name)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
    # The label per language; a language without one shows the field's name.
    label: dict[Locale, Annotated[str, Field(min_length=1, max_length=200)]]
    type: FieldType = FieldType.TEXT
    required: bool = False
    # At most the attribute limit of the API (app/schemas.py MAX_ATTRIBUTE_LENGTH).
    max_length: Annotated[int, Field(ge=1, le=500)] = 200
    # The HTML autocomplete token ("name", "organization"): it helps people fill the form.
    autocomplete: Annotated[str | None, Field(pattern=r"^[a-z-]{1,40}$")] = None

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_FIELD_NAMES:
            raise ValueError(f"the field name {value!r} is reserved by the form")
        return value

    def label_in(self, locale: Locale) -> str:
        return self.label.get(locale) or next(iter(self.label.values()), self.name)


@cache
def catalogue_keys(locale: Locale) -> frozenset[str]:
    """The keys of a language's string catalogue (app/locales/<locale>.json)."""
    path = Path(__file__).parent / "locales" / f"{locale.value}.json"
    return frozenset(json.loads(path.read_text("utf-8")))


# The consent wording version of a list that does not name one, whether declared in the
# settings or created through the API or the CLI.
DEFAULT_CONSENT_VERSION = "2026-11"
# The longest consent version: the ledger's column (app/models.py) holds 64 characters.
MAX_CONSENT_VERSION = 64


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class ListSettings(BaseModel):
    """A mailing list as declared by the operators; stored in the database at start."""

    model_config = ConfigDict(extra="forbid")

    slug: Annotated[str, Field(pattern=SLUG_PATTERN)]
    name: Annotated[str, Field(min_length=1, max_length=200)]
    default_locale: Locale = Locale.FR
    consent_version: Annotated[str, Field(min_length=1, max_length=MAX_CONSENT_VERSION)] = (
        DEFAULT_CONSENT_VERSION
    )
    # The consent wording shown beside the form, per language; the catalogue's
    # `consent.text` where a language is missing. Change `consent_version` with it.
    consent_text: dict[Locale, Annotated[str, Field(min_length=1, max_length=4000)]] = Field(
        default_factory=dict
    )
    confirm_ttl: Duration = timedelta(hours=48)
    # Where a plain HTML form post is sent after success; the hosted page when unset.
    thank_you_url: HttpUrl | None = None
    # Where a confirmed or unsubscribed visitor may go next (the site's home page).
    landing_url: HttpUrl | None = None
    # The mailing-list backend that receives the confirmed members.
    backend: BackendSettings = Field(default_factory=NoneBackendSettings)
    # Fields the hosted page asks for besides the address (at most 10).
    fields: Annotated[list[FormField], Field(max_length=10)] = Field(default_factory=list)
    # The list's own wording for any catalogue string, per language (app/locales/*.json keys).
    strings: dict[Locale, dict[str, Annotated[str, Field(max_length=4000)]]] = Field(
        default_factory=dict
    )
    # Refuse (silently, as a bot) form posts without the hosted page's signed timestamp.
    require_form_stamp: bool = False

    @field_validator("name", "consent_version")
    @classmethod
    def _one_line(cls, value: str) -> str:
        # As the API's. The name goes into the mails' Subject, where a NUL or an escape was
        # written as it is (RFC 5322 allows no control character in a header); the version
        # into the form, whose post's version is not recorded when it holds one
        # (hosted.shown_consent_version), and into the ledger.
        if _CONTROL.search(value):
            raise ValueError("must not contain control characters (line breaks, NUL, ...)")
        # A name shown blank on the pages and in the Subject, a version that tells nothing.
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()

    @field_validator("consent_text")
    @classmethod
    def _printable_consent_text(cls, value: dict[Locale, str]) -> dict[Locale, str]:
        # Stored at start as the proof's wording (PostgreSQL refuses a NUL in a text) and
        # shown on the form; its paragraphs' line breaks are its own.
        for locale, text in value.items():
            if _TEXT_CONTROL.search(text):
                raise ValueError(
                    f"{locale.value}: must not contain control characters other than line "
                    "breaks and tabs (NUL, escape, ...)"
                )
        return value

    @field_validator("fields")
    @classmethod
    def _unique_fields(cls, value: list[FormField]) -> list[FormField]:
        names = [item.name for item in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"field names must be unique, repeated: {', '.join(repeated)}")
        return value

    @field_validator("strings")
    @classmethod
    def _known_strings(cls, value: dict[Locale, dict[str, str]]) -> dict[Locale, dict[str, str]]:
        # A misspelt key would silently change nothing: refuse it at start instead.
        for locale, overrides in value.items():
            if "consent.text" in overrides:
                # The recorded wording (the proof of consent) comes from `consent_text`.
                raise ValueError(
                    f"{locale.value} string key consent.text: the consent wording is "
                    "the list's consent_text (with a new consent_version), not a string"
                )
            unknown = sorted(set(overrides) - catalogue_keys(locale))
            if unknown:
                raise ValueError(f"unknown {locale.value} string keys: {', '.join(unknown)}")
            for key, text in overrides.items():
                # Line breaks are the catalogue's own (paragraphs of a mail's text).
                if _TEXT_CONTROL.search(text):
                    raise ValueError(
                        f"{locale.value} string {key}: must not contain control characters "
                        "other than line breaks and tabs (NUL, escape, ...)"
                    )
        return value

    @field_validator("confirm_ttl")
    @classmethod
    def _positive_ttl(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("confirm_ttl must be positive")
        return value


class FileMailerSettings(BaseModel):
    """Development mailer: writes each mail as an .eml file and logs its links."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["file"] = "file"
    directory: Path = Path("var/mail")


# A domain name (RFC 5321 4.1.2: letters, digits, hyphens, dots) or an address literal.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HELO_NAME_PATTERN = rf"^{_LABEL}(?:\.{_LABEL})*$|^\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\]$"


class SmtpSecurity(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    SSL = "ssl"


def _loopback(host: str) -> bool:
    """`localhost` (RFC 6761: it and its subdomains are this machine) or a loopback address."""
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


class SmtpMailerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["smtp"] = "smtp"
    host: Annotated[str, Field(min_length=1)]
    # 465 with `ssl` (implicit TLS, RFC 8314) when not given: 587, a submission port that
    # starts in clear, failed every send with `SSLError: WRONG_VERSION_NUMBER`.
    port: Annotated[int, Field(ge=1, le=65535)] = 587
    security: SmtpSecurity = SmtpSecurity.STARTTLS
    username: str | None = None
    password: SecretStr | None = None
    timeout: Annotated[float, Seconds, Field(gt=0)] = 30.0
    # A private CA's certificate (PEM) for a relay whose certificate the system does not trust.
    ca_file: Path | None = None
    # The name given in EHLO. Unset: the machine's, when it is fully qualified, else the
    # public URL's host (app/mailer.py, `helo_name`).
    helo_name: Annotated[str | None, Field(max_length=253, pattern=HELO_NAME_PATTERN)] = None
    # With `security: none`, AUTH sends the user name and password in clear (AUTH PLAIN is
    # base64, not encryption): allowed to a loopback host, elsewhere only when this says the
    # network to the relay is trusted.
    allow_cleartext_auth: bool = False

    @field_validator("host")
    @classmethod
    def _host_alone(cls, value: str) -> str:
        # `smtp.example.gouv.fr:587` or `smtp://...` was looked up in DNS as a name, and every
        # send failed with "Name or service not known", retried for hours.
        if ":" in value or "/" in value or any(c.isspace() for c in value):
            try:
                ipaddress.IPv6Address(value)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not a host name nor an IP address: give the host alone "
                    "(smtp.example.gouv.fr), the port in NEWSLETTER_MAILER__PORT and TLS in "
                    "NEWSLETTER_MAILER__SECURITY"
                ) from None
        return value

    @field_validator("ca_file", mode="before")
    @classmethod
    def _ca_file_given(cls, value: object) -> object:
        # An empty value read as the current directory: ". cannot be read (Is a directory)".
        if value == "":
            raise ValueError("is empty: give the path of the CA's PEM file, or leave it unset")
        return value

    @field_validator("ca_file")
    @classmethod
    def _readable_certificate(cls, value: Path | None) -> Path | None:
        # Unchecked, a wrong path failed every send with FileNotFoundError, retried for hours.
        if value is not None:
            try:
                ssl.create_default_context(cafile=str(value))
            except ssl.SSLError as e:
                raise ValueError(f"{value} holds no PEM certificate ({e.reason})") from e
            except OSError as e:
                raise ValueError(f"{value} cannot be read ({e.strerror})") from e
        return value

    @field_validator("username", "password")
    @classmethod
    def _ascii_credentials(cls, value: str | SecretStr | None) -> str | SecretStr | None:
        # smtplib writes AUTH's user name and password in ASCII only: any other letter
        # failed at every send, not here. The message never shows the value.
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text == "":
            # Taken as given, every send tried to log in with it and was retried for ever.
            raise ValueError(
                "is empty: give the relay's user name and password, or leave both unset"
            )
        if text is not None and not text.isascii():
            raise ValueError(
                "has letters beyond ASCII, which smtplib cannot send to the SMTP server "
                "(give the relay's account an ASCII user name and password)"
            )
        return value

    @model_validator(mode="after")
    def _credentials_go_together(self) -> SmtpMailerSettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("SMTP username and password must be given together")
        return self

    @model_validator(mode="after")
    def _no_password_in_clear(self) -> SmtpMailerSettings:
        # smtplib logs in over a connection without TLS as readily as over one with it:
        # anyone on the path read the relay's password, once per connection.
        if (
            self.security == SmtpSecurity.NONE
            and self.username is not None
            and not self.allow_cleartext_auth
            and not _loopback(self.host)
        ):
            raise ValueError(
                f"NEWSLETTER_MAILER__SECURITY=none would send the SMTP user name and password "
                f"in clear to {self.host}: use starttls or ssl, or, if the network to the relay "
                "is trusted, set NEWSLETTER_MAILER__ALLOW_CLEARTEXT_AUTH=true"
            )
        return self

    @model_validator(mode="after")
    def _implicit_tls_port(self) -> SmtpMailerSettings:
        if self.security == SmtpSecurity.SSL and "port" not in self.model_fields_set:
            self.port = 465
        return self


def _mailer_kind(value: object) -> str | None:
    # The file mailer is the default, so `NEWSLETTER_MAILER__DIRECTORY` alone is enough.
    if isinstance(value, dict):
        kind = value.get("kind", "file")
        return kind if isinstance(kind, str) else None
    return getattr(value, "kind", None)


MailerSettings = Annotated[
    Annotated[FileMailerSettings, Tag("file")] | Annotated[SmtpMailerSettings, Tag("smtp")],
    Discriminator(_mailer_kind),
]


ENV_PREFIX = "NEWSLETTER_"
ENV_NESTED_DELIMITER = "__"

# The links' HMAC key: 48 random bytes are asked for (docs/production.md), this much at least.
MIN_SECRET_KEY_LENGTH = 32
_KEY_RULE = (
    f"a secret key needs at least {MIN_SECRET_KEY_LENGTH} characters, e.g. 48 random bytes "
    """from `python -c "import secrets; print(secrets.token_urlsafe(48))"`"""
)


def _default_lists() -> list[ListSettings]:
    return [ListSettings(slug="bluehats", name="Gazette BlueHats", default_locale=Locale.FR)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
    )

    database_url: str = "sqlite:///var/newsletter.db"
    # Base URL of this service as visitors reach it; links in mails are built from it.
    public_url: HttpUrl = HttpUrl("http://127.0.0.1:8000")
    # Key that derives the links' tokens; the embedded default keeps one in var/secret.key.
    secret_key: SecretStr | None = None
    secret_key_file: Path = Path("var/secret.key")
    # The mails' From: `local@domain` or `Name <local@domain>`, a name with a comma (or
    # another of `;:@()[]\`) in double quotes; its address is the envelope's sender.
    mail_from: str = "BlueHats <bluehats@code.gouv.fr>"
    lists: list[ListSettings] = Field(default_factory=_default_lists)
    mailer: MailerSettings = Field(default_factory=FileMailerSettings)

    # Apply migrations at start (the embedded default); production runs `newsletter migrate`.
    auto_migrate: bool = True
    # Run the outbox worker inside the API process; off when `newsletter worker` runs it.
    run_worker: bool = True

    # A visitor asking again gets at most one mail per address in this interval.
    resend_interval: Duration = timedelta(minutes=5)
    # Evidence kept in the consent ledger.
    store_ip: bool = True
    store_user_agent: bool = True
    # Hosted-page form defences: a post sooner than this after the page was served, or
    # later than the max age, is not taken; a browser gets the form back to press again
    # (app/formguard.py).
    form_min_fill_time: Duration = timedelta(seconds=3)
    form_max_age: Duration = timedelta(days=1)
    # The French State design system's stylesheet (DSFR), e.g. a copy on the site's origin;
    # the built-in stylesheet when unset. Its origin is added to the pages' CSP.
    dsfr_stylesheet_url: HttpUrl | None = None
    max_body_bytes: Annotated[int, Field(ge=1024, le=10 * 1024 * 1024)] = 16 * 1024
    # A CSV import's body (POST /v1/admin/lists/{list}/import), streamed to a temporary file.
    max_import_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024 * 1024)] = 50 * 1024 * 1024

    # Rate limits (moving windows, `limits` syntax; `off` disables one). Counters live in
    # this process unless `redis_url` is set, which several replicas need to share them.
    redis_url: str | None = None
    rate_limit_key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = "newsletter"
    # Public POSTs per client IP (an IPv6 client counts by its /64); over it: 429.
    rate_limit_per_ip: RateLimit = "20/minute"
    # Mails that visitors' requests cause, per target address and per address domain; over
    # them the request is answered as usual and recorded, but no mail is sent.
    rate_limit_per_address: RateLimit = "3/day"
    rate_limit_per_domain: RateLimit = "200/hour"
    # All such mails together; over it subscriptions are still taken, their mails delayed.
    mail_budget: RateLimit = "1000/hour"
    # Peers whose X-Forwarded-For is believed (IPs or CIDRs): the reverse proxies in front.
    trusted_proxies: Annotated[list[ProxyNetwork], NoDecode, BeforeValidator(_list_from_text)] = (
        Field(default_factory=list)
    )
    # Web origins (`scheme://host[:port]`) whose pages may post the public forms and call
    # the public JSON routes from a browser (CORS); the origin of `public_url` always may.
    allowed_origins: Annotated[list[str], NoDecode, BeforeValidator(_list_from_text)] = Field(
        default_factory=list
    )
    # Proof of work asked of subscribe and unsubscribe-by-address callers: leading zero
    # bits of SHA-256(challenge ":" nonce); 0 turns it off. 20 bits cost a browser ~1 s.
    proof_of_work_bits: Annotated[int, Field(ge=0, le=32)] = 0
    # How long a challenge from GET /v1/challenge may be used.
    proof_of_work_ttl: Duration = timedelta(minutes=10)

    worker_poll_interval: Annotated[float, Seconds, Field(gt=0)] = 1.0
    # The worker inside `serve` only: while the process is busy with requests, each round
    # waits for a pause in them, at most this long (seconds; 0: never waits). A burst of
    # subscriptions is answered first and its mails follow; under endless load mail still
    # goes out, a round at least this often.
    worker_give_way: Annotated[float, Seconds, Field(ge=0, le=60)] = 2.0
    worker_batch_size: Annotated[int, Field(ge=1, le=1000)] = 20
    worker_concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    job_lease: Duration = timedelta(minutes=5)
    job_max_attempts: Annotated[int, Field(ge=1, le=100)] = 10
    # Sync jobs claimed per round; a burst of confirmations becomes bulk calls of this size.
    sync_batch_size: Annotated[int, Field(ge=1, le=10000)] = 1000
    # Timeouts of calls to the mailing-list backends (seconds): the connection's, and the
    # whole call's (each read within it, and each page of a paged read as a whole).
    backend_connect_timeout: Annotated[float, Seconds, Field(gt=0)] = 5.0
    backend_timeout: Annotated[float, Seconds, Field(gt=0)] = 30.0
    # Compare each list with its backend and fix differences this often (off when unset).
    reconcile_interval: DurationOrOff = None
    retry_base_delay: Duration = timedelta(seconds=30)
    retry_max_delay: Duration = timedelta(hours=2)

    # Retention (app/retention.py), run by the worker this often (`off`: never) and by
    # `newsletter retention run`. Requests nobody confirmed go after `retention_pending`
    # (longer than any confirm link lives); ledger IPs are cut to their /24 (IPv4) or /48
    # (IPv6) after `retention_ip_truncate`, removed after `retention_ip_drop`; records of
    # people who left are reduced to the proof of their opt-out after
    # `retention_unsubscribed`.
    retention_interval: DurationOrOff = timedelta(hours=24)
    retention_pending: Duration = timedelta(days=30)
    retention_ip_truncate: Duration = timedelta(days=30)
    retention_ip_drop: Duration = timedelta(days=395)
    retention_unsubscribed: Duration = timedelta(days=90)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # `text` for people (the embedded default), `json` for a log collector: one event a line.
    log_format: Literal["text", "json"] = "text"
    # When set, GET /metrics needs `Authorization: Bearer <token>`; open otherwise.
    metrics_token: SecretStr | None = None
    # A worker not seen for this long is stale: readiness says so (see README, Operations).
    worker_heartbeat_timeout: Duration = timedelta(seconds=60)
    # On SIGTERM, requests in flight get this long to finish before they are cut.
    shutdown_timeout: Duration = timedelta(seconds=20)
    # `newsletter serve`: a client gets this long to send a request's headers (from the
    # connection's opening or the request's first byte), and may pause its body no longer
    # than this; a slower one is cut (app/httpserver.py).
    client_timeout: Duration = timedelta(seconds=30)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _any_case(cls, value: object, info: ValidationInfo) -> object:
        # `debug`, `Info`, `JSON`: there is no other reading of them, and logging tools
        # take either case.
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "log_level" else value.lower()

    @field_validator("secret_key")
    @classmethod
    def _strong_secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty or short key left the links' HMACs and the erased addresses' keyed hashes
        # without a secret worth the name. The message never shows the key.
        if value is not None:
            key = value.get_secret_value()
            if len(key) < MIN_SECRET_KEY_LENGTH:
                raise ValueError(f"{'is empty' if not key else 'is too short'}; {_KEY_RULE}")
        return value

    @field_validator("metrics_token")
    @classmethod
    def _metrics_token_given(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty token was taken as a token no scraper can send (`Bearer ` has none): every
        # scrape got 401, from loopback too.
        if value is not None and not value.get_secret_value():
            raise ValueError(
                "is empty: give the token Prometheus sends (Authorization: Bearer), or leave "
                "it unset to serve /metrics without one to loopback and private networks"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str) -> str:
        # `postgres://`, as libpq and many hosting platforms write it, is the same URL.
        if value.startswith("postgres:"):
            value = "postgresql:" + value.removeprefix("postgres:")
        if not value.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
            raise ValueError(
                "database_url must start with sqlite:///, postgresql:// or "
                f"postgresql+psycopg:// (got {value.split(':', 1)[0]!r})"
            )
        if value.startswith("postgresql:"):
            value = "postgresql+psycopg:" + value.removeprefix("postgresql:")
        return value

    @field_validator("mail_from")
    @classmethod
    def _one_sender(cls, value: str) -> str:
        # Unchecked, `Gazette BlueHats, DINUM <...>` went out as MAIL FROM:<Gazette>, which
        # a relay refuses for every mail.
        addresses.sender(value)
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "redis_url must start with redis://, rediss:// or unix:// "
                f"(got {value.split(':', 1)[0]!r})"
            )
        # redis-py reads a path that is not a number as no path at all: database 0, shared
        # with whatever else uses it, without a word.
        database = urlsplit(value).path.strip("/") if value and "://" in value else ""
        if not value or value.startswith("unix://") or database == "" or database.isdigit():
            return value
        raise ValueError(
            f"the database after the host must be a number, as in redis://host:6379/0 "
            f"(got {database!r}); name this instance's keys with "
            "NEWSLETTER_RATE_LIMIT_KEY_PREFIX"
        )

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        return [origins.parse_setting(item) for item in value]

    @field_validator("lists")
    @classmethod
    def _unique_slugs(cls, value: list[ListSettings]) -> list[ListSettings]:
        if not value:
            raise ValueError("at least one list must be declared")
        slugs = [item.slug for item in value]
        duplicates = sorted({slug for slug in slugs if slugs.count(slug) > 1})
        if duplicates:
            raise ValueError(f"list slugs must be unique, repeated: {', '.join(duplicates)}")
        return value

    # Zero is refused where it would make a loop without pause (a lease taken back at once,
    # a heartbeat stale at once) or a check that lets nothing through.
    @field_validator(
        "job_lease",
        "worker_heartbeat_timeout",
        "form_max_age",
        "proof_of_work_ttl",
        "client_timeout",
    )
    @classmethod
    def _positive(cls, value: timedelta, info: ValidationInfo) -> timedelta:
        if value <= timedelta(0):
            raise ValueError(f"{info.field_name} must be positive")
        return value

    # A periodic task: zero ran it back to back (500 reconciliations in 10 s); `off` is how
    # it is turned off.
    @field_validator("reconcile_interval", "retention_interval")
    @classmethod
    def _positive_or_off(cls, value: timedelta | None, info: ValidationInfo) -> timedelta | None:
        if value is not None and value <= timedelta(0):
            raise ValueError(f"{info.field_name} must be positive (use 'off' to turn it off)")
        return value

    # Zero means "no wait" here: retry at once (still at most job_max_attempts times), no
    # resend interval, no minimum fill time, cut requests at once on shutdown.
    @field_validator(
        "retry_base_delay",
        "retry_max_delay",
        "resend_interval",
        "form_min_fill_time",
        "shutdown_timeout",
    )
    @classmethod
    def _non_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError("durations must not be negative")
        return value

    @model_validator(mode="after")
    def _backoff_within_its_cap(self) -> Settings:
        # The cap wins in the backoff: a base above it was silently ignored.
        if self.retry_base_delay > self.retry_max_delay:
            raise ValueError(
                f"NEWSLETTER_RETRY_BASE_DELAY ({self.retry_base_delay}) must not exceed "
                f"NEWSLETTER_RETRY_MAX_DELAY ({self.retry_max_delay})"
            )
        return self

    @model_validator(mode="after")
    def _lease_outlasts_a_send(self) -> Settings:
        # A lease that ends while a slow send or backend call is still running lets another
        # worker make it too. Each ends at its timeout, a deadline on the whole call; a long
        # job's lease is renewed from half its term, between sends and between the pages of
        # a read: twice the timeout lets a call begun just before a renewal end in time.
        lease = self.job_lease.total_seconds()
        mailer = self.mailer
        if isinstance(mailer, SmtpMailerSettings) and lease < 2 * mailer.timeout:
            raise ValueError(
                f"NEWSLETTER_JOB_LEASE ({self.job_lease}) must be at least twice "
                f"NEWSLETTER_MAILER__TIMEOUT ({mailer.timeout:g}s), or a slow send could be "
                "made twice"
            )
        calls_out = any(item.backend.kind != "none" for item in self.lists)
        if calls_out and lease < 2 * self.backend_timeout:
            raise ValueError(
                f"NEWSLETTER_JOB_LEASE ({self.job_lease}) must be at least twice "
                f"NEWSLETTER_BACKEND_TIMEOUT ({self.backend_timeout:g}s), or a slow call to "
                "a list's backend could be made twice"
            )
        return self

    @model_validator(mode="after")
    def _retention_keeps_what_is_live(self) -> Settings:
        # A request purged while its confirm link still works would turn a click into 404.
        longest = max(item.confirm_ttl for item in self.lists)
        if self.retention_pending <= longest:
            raise ValueError(
                f"NEWSLETTER_RETENTION_PENDING ({self.retention_pending}) must be longer than "
                f"the longest confirm_ttl in NEWSLETTER_LISTS ({longest})"
            )
        if self.retention_ip_drop <= self.retention_ip_truncate:
            raise ValueError(
                "NEWSLETTER_RETENTION_IP_DROP must be longer than NEWSLETTER_RETENTION_IP_TRUNCATE"
            )
        if any(
            value <= timedelta(0)
            for value in (self.retention_ip_truncate, self.retention_unsubscribed)
        ):
            raise ValueError("NEWSLETTER_RETENTION_* durations must be positive")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite:")

    def public_link(self, path: str) -> str:
        return str(self.public_url).rstrip("/") + path

    def form_origins(self) -> list[str]:
        """Origins allowed to post the public forms: the configured ones and our own."""
        own = origins.normalize(str(self.public_url))
        return sorted({*self.allowed_origins, *([own] if own else [])})

    def list_settings(self, slug: str) -> ListSettings | None:
        return next((item for item in self.lists if item.slug == slug), None)

    def backend_of(self, slug: str) -> BackendSettings | None:
        """The declared list's backend; None for a list the settings do not declare."""
        declared = self.list_settings(slug)
        return declared.backend if declared is not None else None

    def token_key(self) -> bytes:
        """The key for link tokens: configured, or kept in a local file for the embedded mode."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value().encode()
        return _key_from_file(self.secret_key_file.resolve())


@cache
def _key_from_file(path: Path) -> bytes:
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Created readable by the owner only, before the key is written into it.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            # A folder of another user's, a path mistyped: a traceback at start, before.
            raise SettingsError(
                f"invalid settings:\n  NEWSLETTER_SECRET_KEY_FILE: {path} does not exist and "
                f"cannot be made ({e.strerror}: {e.filename}); make it, or give "
                "NEWSLETTER_SECRET_KEY"
            ) from e
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_urlsafe(48))
    return _read_key_file(path).encode()


def _read_key_file(path: Path) -> str:
    """The key kept in `path`, held to the same rule as `NEWSLETTER_SECRET_KEY`."""
    try:
        key = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "it is not text"
        raise SettingsError(
            f"invalid settings:\n  NEWSLETTER_SECRET_KEY_FILE: {path} cannot be read ({reason})"
        ) from e
    if len(key) < MIN_SECRET_KEY_LENGTH:
        what = "is empty" if not key else "holds a key too short"
        raise SettingsError(
            f"invalid settings:\n  NEWSLETTER_SECRET_KEY_FILE: {path} {what}; {_KEY_RULE}"
        )
    return key


class SettingsError(Exception):
    """Settings could not be read; the message names each bad variable."""


# The tags pydantic puts in an error's location for the mailer union: no variable has them.
_MAILER_KINDS = frozenset({"file", "smtp"})
_BACKEND_KINDS = frozenset({"none", "mailgun", "mailman", "listmonk"})


def _variable(loc: tuple[int | str, ...]) -> str:
    """The variable an error is about: `NEWSLETTER_MAILER__HOST`, `NEWSLETTER_LISTS[0].slug`."""
    if not loc:
        # A check across several settings (a model validator): its message names them.
        return "NEWSLETTER_*"
    field, *rest = loc
    if field == "mailer" and rest and rest[0] in _MAILER_KINDS:
        rest = rest[1:]
    # Likewise a backend's kind: `NEWSLETTER_LISTS[0].backend.api_key`, as the JSON has it,
    # not `.backend.mailgun.api_key`.
    rest = [
        part
        for index, part in enumerate(rest)
        if not (index and rest[index - 1] == "backend" and part in _BACKEND_KINDS)
    ]
    name = f"NEWSLETTER_{str(field).upper()}"
    if any(isinstance(part, int) for part in rest):
        # Inside a JSON list: name the variable, then the place in its value.
        return name + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in rest)
    return "__".join([name, *(str(part).upper() for part in rest)])


def _models_in(annotation: object) -> list[type[BaseModel]]:
    """The models a field's type holds directly (through `|` and `Annotated`, not lists)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = get_origin(annotation)
    if origin is Annotated:
        return _models_in(get_args(annotation)[0])
    if origin in (Union, UnionType):
        return [model for arg in get_args(annotation) for model in _models_in(arg)]
    return []


def known_variables() -> frozenset[str]:
    """Every variable a setting is read from: `NEWSLETTER_<FIELD>` and, for a field that is a
    model (the mailer), `NEWSLETTER_<FIELD>__<SUBFIELD>` of any of its kinds. Lists take JSON
    only: pydantic-settings does not read `NEWSLETTER_LISTS__0__SLUG`."""
    names = set()
    for field, info in Settings.model_fields.items():
        name = f"{ENV_PREFIX}{field.upper()}"
        names.add(name)
        for model in _models_in(info.annotation):
            names.update(f"{name}{ENV_NESTED_DELIMITER}{sub.upper()}" for sub in model.model_fields)
    return frozenset(names)


def _unknown_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """`NEWSLETTER_*` variables that name no setting, each with the closest known name:
    pydantic-settings reads names in any case and skips those it does not know, so a
    misspelt one changed nothing, silently."""
    # Compared without the prefix, which every name shares and would make any two alike.
    known = sorted(name.removeprefix(ENV_PREFIX) for name in known_variables())
    unknown = {}
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper.removeprefix(ENV_PREFIX) not in known:
            close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), known, n=1)
            hint = f"did you mean {ENV_PREFIX}{close[0]}?" if close else "see the README's settings"
            unknown[name] = f"no such setting ({hint})"
    return unknown


def load_settings() -> Settings:
    """The settings from the environment; a SettingsError names every bad variable."""
    unknown = _unknown_variables(os.environ)
    problems = list(unknown.items())
    named = {name.upper() for name in unknown}
    try:
        settings = Settings()
    except ValidationError as e:
        # A misspelt nested name is also pydantic's "extra input": named once, with its hint.
        problems += [
            _problem(name, error)
            for error in e.errors()
            if (name := _variable(error["loc"])) not in named
        ]
        raise SettingsError(_message(problems)) from e
    except PydanticSettingsError as e:
        # A list or nested value that is not JSON; pydantic-settings names only the field.
        match = re.search(r'field "(\w+)"', str(e))
        name = f"NEWSLETTER_{match[1].upper()}" if match else "a NEWSLETTER_* variable"
        problems.append((name, f"not valid JSON ({e.__cause__})"))
        raise SettingsError(_message(problems)) from e
    if problems:
        raise SettingsError(_message(problems))
    if (
        settings.secret_key is None
        and not settings.database_url.startswith("sqlite:")
        and "secret_key_file" not in settings.model_fields_set
        and not settings.secret_key_file.exists()
    ):
        # The embedded default makes its key where it runs. On PostgreSQL each replica,
        # worker and container did so too, each its own: the links one signed did not open
        # at the others ("This link is not valid"), without a word at start. A key file
        # named in the settings is where the operator keeps the key, made there if need be.
        raise SettingsError(_message([("NEWSLETTER_SECRET_KEY", _KEY_SHARED)]))
    if settings.secret_key is None and settings.secret_key_file.exists():
        # Read now, so that a bad key file stops the start rather than the first request.
        settings.token_key()
    return settings


_KEY_SHARED = (
    "is not set: on PostgreSQL every API replica, worker and command must sign the links "
    "with the same key, or a link mailed by one does not open at another; give them all the "
    "same NEWSLETTER_SECRET_KEY (or NEWSLETTER_SECRET_KEY_FILE, a file they all read)"
)


def _problem(name: str, error: ErrorDetails) -> tuple[str, str]:
    """A variable and what is wrong with it. An unknown `kind` (of the mailer, of a list's
    backend) is said of the kind itself, not as pydantic's "Input tag ... found using
    _mailer_kind()", which named the mailer and a function of ours. pydantic's words are
    kept where they say what to fix, and completed where they do not: "Extra inputs are not
    permitted" for a misspelt key, "unable to interpret input" for a boolean, "relative URL
    without a base" for a URL without its scheme. Only a boolean's value is repeated: any
    other may be a secret."""
    name, problem = _problem_itself(name, error)
    value = error.get("input")
    if isinstance(value, str) and re.search(r"\s#", value):
        # `NEWSLETTER_MAILER__PORT=587  # default` in an environment file: systemd and
        # Docker keep the comment as part of the value (docs/production.md).
        problem += (
            " (the value holds ' #': a comment after a value is part of it in an environment "
            "file; put the comment on a line of its own)"
        )
    return name, problem


def _problem_itself(name: str, error: ErrorDetails) -> tuple[str, str]:
    kind = error["type"]
    if kind == "union_tag_invalid":
        context = error.get("ctx", {})
        where = f"{name}__KIND" if "[" not in name else f"{name}.kind"
        return where, f"{context.get('tag')!r} is not one of {context.get('expected_tags')}"
    if kind == "extra_forbidden":
        return name, _unknown_key(error["loc"])
    if kind == "bool_parsing" and isinstance(error.get("input"), str):
        return name, f"{error['input']!r} is not a boolean: write true or false"
    if kind == "url_parsing":
        return name, (
            f"{error['msg']}: give the whole URL with its scheme, e.g. https://example.gouv.fr"
        )
    if kind == "list_type" and isinstance(error.get("input"), dict):
        # NEWSLETTER_LISTS='{"slug": "bluehats", ...}': one list, written without its array.
        return name, "one JSON object where a JSON array is expected: put it in [ ], even alone"
    return name, error_message(error)


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    """Why a key is refused: not one of its model's (said with the closest one and the
    model's keys), or one of another kind's (`NEWSLETTER_MAILER__DIRECTORY` left set when
    the mailer became smtp), rather than pydantic's "Extra inputs are not permitted"."""
    *path, key = loc
    models: list[type[BaseModel]] = [Settings]
    kinds: list[type[BaseModel]] = []
    for part in path:
        if isinstance(part, int):
            continue  # an item of a list: the list's model still
        tagged = [model for model in models if _kind_of(model) == part]
        if tagged:
            kinds, models = models, tagged  # the tag of a union's kind (smtp, mailgun)
            continue
        owned = [model.model_fields[part] for model in models if part in model.model_fields]
        models = [model for info in owned for model in _models_in(_element(info.annotation))]
    if len(models) != 1:
        return "no such setting"
    [model] = models
    kind = _kind_of(model)
    others = [_kind_of(other) for other in kinds if str(key) in other.model_fields]
    if kind is not None and others:
        return (
            f"only for kind {' or '.join(map(str, others))}, and the kind is {kind}: remove "
            "it, or change the kind"
        )
    names = [name for name in model.model_fields if name != "kind"]
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"no such setting ({hint}those here: {', '.join(names)})"


def _element(annotation: object) -> object:
    """A list's element type (`list[FormField]` -> FormField), or the annotation itself."""
    if get_origin(annotation) is list:
        return get_args(annotation)[0]
    return annotation


def _kind_of(model: type[BaseModel]) -> str | None:
    """The `kind` a model of a tagged union stands for (`smtp`, `mailgun`), if any."""
    field = model.model_fields.get("kind")
    return field.default if field is not None and isinstance(field.default, str) else None


def _message(problems: list[tuple[str, str]]) -> str:
    return "invalid settings:\n" + "\n".join(f"  {name}: {why}" for name, why in problems)
