"""API input and output models."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from email_validator import SPECIAL_USE_DOMAIN_NAMES
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    HttpUrl,
    field_validator,
    model_validator,
)

from app import addresses, models
from app.config import DEFAULT_CONSENT_VERSION, MAX_CONSENT_VERSION, SLUG_PATTERN, Locale
from app.readiness import WorkerState

MAX_ATTRIBUTES = 20
MAX_ATTRIBUTE_LENGTH = 500
_ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# What `_no_control_characters` allows, said in the OpenAPI document (the check stays
# in the validators, with its clearer message).
ONE_LINE = {"pattern": r"^[^\x00-\x1f\x7f]*$"}
# A field trimmed of surrounding white space must keep something: one visible character.
ONE_LINE_NOT_BLANK = {"pattern": r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"}


def has_control_characters(value: str) -> bool:
    """Whether `value` holds a line break, NUL or another control character."""
    return _CONTROL.search(value) is not None


def _no_control_characters(value: str) -> str:
    if has_control_characters(value):
        raise ValueError("must not contain control characters (line breaks, NUL, ...)")
    return value


def _one_line_not_blank(value: str) -> str:
    """A name or a version shown to people and kept in the ledger: one line, something
    visible in it, without the spaces around it."""
    value = _no_control_characters(value).strip()
    if not value:
        raise ValueError("must not be blank")
    return value


def _valid_email(value: str, *, new: bool) -> str:
    try:
        addresses.parse(value, new=new)
    except addresses.InvalidAddress as e:
        raise ValueError(str(e)) from e
    return value


Attributes = Annotated[
    dict[str, Annotated[str, Field(max_length=MAX_ATTRIBUTE_LENGTH, json_schema_extra=ONE_LINE)]],
    Field(
        default_factory=dict,
        max_length=MAX_ATTRIBUTES,
        json_schema_extra={"propertyNames": {"pattern": _ATTRIBUTE_NAME.pattern}},
    ),
]

# A row id in a URL: beyond `MAX_ROW_ID` it is refused (422), documented as the maximum.
MAX_ROW_ID = models.MAX_ROW_ID

_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


# A time followed by ` 01:00`: the `+01:00` of a URL typed as is (curl, an address bar),
# whose `+` the query string reads as a space. Nothing else puts a space there.
_PLUS_READ_AS_SPACE = re.compile(
    r"^(.*[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?) (\d{2}(?::?\d{2})?)$", re.IGNORECASE
)


def _date_time_text(value: object) -> object:
    # pydantic would also read `0.5` or `2026-11-28` as a datetime; the document promises
    # (and operators write) a date and time.
    if isinstance(value, str) and not _DATE_TIME.match(value.strip()):
        raise ValueError("give a date and time in ISO 8601, e.g. 2026-11-28T10:00:00Z")
    if isinstance(value, str):
        typed = _PLUS_READ_AS_SPACE.fullmatch(value.strip())
        if typed is not None:
            return f"{typed[1]}+{typed[2]}"
    return value


def _in_utc(value: datetime) -> datetime:
    # The database holds UTC: 0001-01-01T00:00:00+01:00 lies before year 1 there, and
    # 9999-12-31T23:00:00-02:00 after year 9999, which Python's datetime cannot hold.
    try:
        return models.as_utc(value)
    except OverflowError as e:
        raise ValueError("the date and time is out of range once in UTC") from e


# A date-time query parameter of the admin API, in UTC (one without a zone is UTC).
DateTimeQuery = Annotated[datetime, BeforeValidator(_date_time_text), AfterValidator(_in_utc)]

# Free text in an admin URL (a list's name, an address, a search prefix, an audit filter):
# a control character is refused (422), NUL above all, which PostgreSQL refuses in a text
# parameter with an error (a 500) where SQLite only finds nothing.
UrlText = Annotated[str, AfterValidator(_no_control_characters), Field(json_schema_extra=ONE_LINE)]


def _folded(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


# A language in an admin query: `EN` or ` en` means `en`; another is refused (422) rather
# than matching nothing.
LocaleQuery = Annotated[Locale, BeforeValidator(_folded)]


def _any_case(word: str) -> str:
    return "".join(f"[{char}{char.upper()}]" for char in word)


# email-validator refuses these top-level domains (RFC 6761 special use): no mail there.
_SPECIAL_USE_TLD = "|".join(_any_case(name) for name in sorted(SPECIAL_USE_DOMAIN_NAMES))

# `format: email` and the special-use rule tell API clients (and generated tests) what
# address is wanted; the validator (email-validator) has the last word.
EmailField = Annotated[
    str,
    Field(
        max_length=1000,
        examples=["camille@example.org"],
        json_schema_extra={
            "format": "email",
            "pattern": rf"^[^@]+@.+\.(?!(?:{_SPECIAL_USE_TLD})$)[^.@]+$",
        },
    ),
]


def clean_attributes(value: dict[str, Any]) -> dict[str, str]:
    """A subscriber's attributes within the limits the API sets (the CSV import uses it too)."""
    if len(value) > MAX_ATTRIBUTES:
        raise ValueError(f"at most {MAX_ATTRIBUTES} attributes are allowed")
    for name, item in value.items():
        if not _ATTRIBUTE_NAME.match(name):
            raise ValueError(f"attribute name {name[:64]!r} must be lowercase letters, digits or _")
        if not isinstance(item, str):
            raise ValueError(f"attribute {name!r} must be a string")
        if len(item) > MAX_ATTRIBUTE_LENGTH:
            raise ValueError(f"attribute {name!r} is longer than {MAX_ATTRIBUTE_LENGTH} characters")
        _no_control_characters(item)
    return value


# A language tag with a region (`fr-FR`, `fr_CA`, `en-GB`, as sites and browsers write
# them): its primary subtag. Case aside, nothing else is changed, so `de-DE` or `fr\r\n`
# are still refused (422) with the languages the service speaks.
_REGION_TAG = re.compile(r"([A-Za-z]{2})(?:[-_][A-Za-z0-9]{1,8})*")
_LANGUAGES = frozenset(locale.value for locale in Locale)


def language_of(value: object) -> object:
    if isinstance(value, str):
        match = _REGION_TAG.fullmatch(value)
        if match is not None and match[1].lower() in _LANGUAGES:
            return match[1].lower()
    return value


# The mails' language in a subscription request: `fr` or `en`, or a tag of either.
RequestLocale = Annotated[Locale | None, BeforeValidator(language_of)]


# A solved challenge from GET /v1/challenge, when the service asks for proof of work.
PowChallenge = Annotated[str | None, Field(default=None, max_length=200)]
PowNonce = Annotated[str | None, Field(default=None, max_length=64)]


class SubscriptionRequest(BaseModel):
    """A request to subscribe; the same fields come as JSON or as a form post."""

    model_config = ConfigDict(extra="ignore")

    email: EmailField
    pow_challenge: PowChallenge = None
    pow_nonce: PowNonce = None
    locale: RequestLocale = None
    attributes: Attributes

    @field_validator("email")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        return _valid_email(value, new=True)

    @field_validator("attributes")
    @classmethod
    def _clean_attributes(cls, value: dict[str, str]) -> dict[str, str]:
        return clean_attributes(value)


class UnsubscriptionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    email: EmailField
    pow_challenge: PowChallenge = None
    pow_nonce: PowNonce = None

    @field_validator("email")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        # An address to find, perhaps stored before the look-alike check.
        return _valid_email(value, new=False)


class Accepted(BaseModel):
    """The one answer to every valid request, whatever the address's state."""

    status: Literal["accepted"] = "accepted"
    detail: str


class ProofOfWorkChallenge(BaseModel):
    """A challenge to solve: SHA-256(challenge + ":" + nonce) must start with `bits` zero
    bits; send it back as `pow_challenge` and `pow_nonce`. `bits` 0: not asked for."""

    challenge: str
    bits: int
    expires_at: datetime


class ActionResult(BaseModel):
    status: str
    list: str


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    # The outbox worker: this process's own, or with an external worker the newest of any.
    worker: WorkerState
    worker_seen_seconds_ago: float | None = None


class MailgunSignature(BaseModel):
    """Mailgun's signature block: hex HMAC-SHA256 of `timestamp + token`."""

    # Mailgun sends the timestamp as a string; a number is read as the same digits.
    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)

    timestamp: Annotated[str, Field(max_length=20, examples=["1770920772"])]
    token: Annotated[str, Field(min_length=1, max_length=200)]
    signature: Annotated[str, Field(min_length=1, max_length=200)]


class MailgunWebhook(BaseModel):
    """What Mailgun posts for one event (its webhook payload, JSON)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    signature: MailgunSignature
    event_data: Annotated[dict[str, Any], Field(alias="event-data", default_factory=dict)]


# Admin ------------------------------------------------------------------------------------


class ListOut(BaseModel):
    slug: str
    name: str
    default_locale: str
    consent_version: str
    confirm_ttl_seconds: int
    thank_you_url: str | None
    landing_url: str | None
    backend: str
    # Declared lists are read-only through the API: the settings are re-applied at start.
    declared_in_settings: bool


class SubscriberOut(BaseModel):
    id: int = Field(description="The subscription's id (for its proof of consent).")
    email: str
    status: str
    locale: str
    attributes: dict[str, Any]
    consent_version: str
    created_at: datetime
    confirmed_at: datetime | None
    unsubscribed_at: datetime | None


class SubscriberPage(BaseModel):
    items: list[SubscriberOut]
    next_cursor: str | None


class ConsentEventOut(BaseModel):
    action: str
    status_after: str
    source: str
    source_url: str | None
    consent_version: str
    ip: str | None
    user_agent: str | None
    detail: dict[str, Any]
    occurred_at: datetime


class AttemptOut(BaseModel):
    attempt: int
    outcome: str
    error: str | None
    response: str | None
    started_at: datetime
    finished_at: datetime


class JobOut(BaseModel):
    id: int
    kind: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None
    payload: dict[str, Any]


class JobWithAttempts(JobOut):
    attempt_log: list[AttemptOut]


class SubscriberDetail(SubscriberOut):
    ledger: list[ConsentEventOut]
    jobs: list[JobWithAttempts]


class StatsOut(BaseModel):
    list: str
    by_status: dict[str, int]
    series: dict[str, dict[str, int]]
    confirmation_rate: float | None
    sync_backlog: int
    oldest_pending_job_seconds: float | None
    dead_jobs: int


class RetryResult(BaseModel):
    retried: int


class AuditOut(BaseModel):
    id: int
    occurred_at: datetime
    actor: str
    action: str
    target: str | None
    outcome: str
    detail: dict[str, Any]


# Operators and data protection ------------------------------------------------------------

_NOTE_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# Line breaks and tabs allowed, other control characters not; not blank once trimmed.
NOTE_TEXT = {"pattern": r"^[^\x00-\x08\x0b-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x08\x0b-\x1f\x7f]*$"}


def _note_text(value: str) -> str:
    if _NOTE_CONTROL.search(value):
        raise ValueError("must not contain control characters other than line breaks")
    return value


# A note in an admin URL (the import's): as `UrlText`, line breaks and tabs allowed.
UrlNote = Annotated[
    str,
    AfterValidator(_note_text),
    Field(json_schema_extra={"pattern": r"^[^\x00-\x08\x0b-\x1f\x7f]*$"}),
]


# No consent to a list of this service is older than the web: an earlier date is a
# spreadsheet's empty one (0001-01-01, 1899-12-30, 1900-01-01, 1904-01-01, 1970-01-01) or a
# typo, and would stand as proof of a consent nobody gave then.
EARLIEST_CONSENT_DATE = date(1990, 1, 1)


def too_early_for_consent(value: date) -> str | None:
    """Why `value` cannot be the date of a consent, or None."""
    if value < EARLIEST_CONSENT_DATE:
        return (
            f"{value.isoformat()} is before {EARLIEST_CONSENT_DATE.isoformat()}, which no "
            "consent here can be (an empty date in a spreadsheet reads as 1900-01-01 or "
            "0001-01-01)"
        )
    return None


def _plausible_consent_date(value: date) -> date:
    if value > datetime.now(UTC).date():
        raise ValueError("the date of the consent must not be in the future")
    if (reason := too_early_for_consent(value)) is not None:
        raise ValueError(f"the date of the consent: {reason}")
    return value


class ConsentEvidence(BaseModel):
    """Evidence of a consent given elsewhere (a paper form, an earlier tool)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    source: Annotated[
        str,
        Field(
            min_length=1,
            max_length=200,
            examples=["paper form, BlueHats stand, 2026-02-01"],
            json_schema_extra=ONE_LINE_NOT_BLANK,
        ),
    ]
    note: Annotated[
        str,
        Field(
            min_length=1,
            max_length=2000,
            description="The operator's note: who collected the consent, where the proof is.",
            json_schema_extra=NOTE_TEXT,
        ),
    ]
    consented_at: Annotated[
        date,
        Field(description="Date of the original consent; not in the future, nor before 1990."),
    ]
    consent_version: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=MAX_CONSENT_VERSION,
            description="The consent wording shown then; the list's current one when unset.",
            json_schema_extra=ONE_LINE_NOT_BLANK,
        ),
    ] = None

    @field_validator("source", "consent_version")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        return _no_control_characters(value) if value is not None else None

    @field_validator("note")
    @classmethod
    def _text(cls, value: str) -> str:
        return _note_text(value)

    @field_validator("consented_at")
    @classmethod
    def _past(cls, value: date) -> date:
        return _plausible_consent_date(value)


class AddSubscriberRequest(BaseModel):
    """An operator adds a subscriber: an invitation (double opt-in), or an address already
    confirmed elsewhere, with evidence."""

    email: EmailField
    locale: Locale | None = None
    attributes: Attributes
    mode: Literal["invite", "confirmed"]
    evidence: ConsentEvidence | None = None

    @field_validator("email")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        return _valid_email(value, new=True)

    @field_validator("attributes")
    @classmethod
    def _clean_attributes(cls, value: dict[str, str]) -> dict[str, str]:
        return clean_attributes(value)

    model_config = ConfigDict(
        extra="forbid",
        # The rule below, in the document: evidence with `confirmed`, none with `invite`.
        json_schema_extra={
            "if": {"properties": {"mode": {"const": "invite"}}},
            "then": {"properties": {"evidence": {"type": "null"}}},
            "else": {"required": ["evidence"], "properties": {"evidence": {"type": "object"}}},
        },
    )

    @model_validator(mode="after")
    def _evidence_goes_with_confirmed(self) -> AddSubscriberRequest:
        if self.mode == "confirmed" and self.evidence is None:
            raise ValueError(
                "evidence (source, note, consented_at) is required to add a confirmed subscriber"
            )
        if self.mode == "invite" and self.evidence is not None:
            raise ValueError(
                "evidence goes with mode confirmed; an invitation's evidence is the person's "
                "own confirmation"
            )
        return self


class OperatorUnsubscribeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    reason: Annotated[
        str,
        Field(
            min_length=1,
            max_length=500,
            examples=["asked by phone on 2026-11-20"],
            json_schema_extra=ONE_LINE_NOT_BLANK,
        ),
    ]

    @field_validator("reason")
    @classmethod
    def _one_line(cls, value: str) -> str:
        return _no_control_characters(value)


# Bounds of a list's confirmation lifetime, in seconds: an hour to thirty days.
CONFIRM_TTL_BOUNDS = {"ge": 3600, "le": 30 * 24 * 3600}


class ListCreate(BaseModel):
    """A list created through the API: stored in the database only, without a backend until
    the settings declare a list with this slug (the settings then take it over); meanwhile
    its sync jobs wait as failed jobs, to be retried then."""

    model_config = ConfigDict(extra="forbid")

    slug: Annotated[str, Field(pattern=SLUG_PATTERN, examples=["bluehats-events"])]
    name: Annotated[str, Field(min_length=1, max_length=200, json_schema_extra=ONE_LINE_NOT_BLANK)]
    default_locale: Locale = Locale.FR
    consent_version: Annotated[
        str,
        Field(min_length=1, max_length=MAX_CONSENT_VERSION, json_schema_extra=ONE_LINE_NOT_BLANK),
    ] = DEFAULT_CONSENT_VERSION
    confirm_ttl_seconds: Annotated[int, Field(**CONFIRM_TTL_BOUNDS)] = 48 * 3600
    thank_you_url: HttpUrl | None = None
    landing_url: HttpUrl | None = None

    @field_validator("name", "consent_version")
    @classmethod
    def _one_line(cls, value: str) -> str:
        return _one_line_not_blank(value)


# A list's fields that may change but not be removed (null).
KEPT_LIST_FIELDS = ("name", "default_locale", "consent_version", "confirm_ttl_seconds")


def _not_nullable(schema: dict[str, Any], names: Sequence[str]) -> None:
    """Document fields that may be left out but not sent as null (the model's default
    None means "not sent")."""
    for name in names:
        field = schema["properties"][name]
        variants = [item for item in field.pop("anyOf", []) if item.get("type") != "null"]
        if len(variants) == 1:
            field.update(variants[0])


class ListUpdate(BaseModel):
    """The fields to change; a URL set to null is removed."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=lambda schema: _not_nullable(schema, KEPT_LIST_FIELDS),
    )

    name: Annotated[
        str | None, Field(min_length=1, max_length=200, json_schema_extra=ONE_LINE_NOT_BLANK)
    ] = None
    default_locale: Locale | None = None
    consent_version: Annotated[
        str | None,
        Field(min_length=1, max_length=MAX_CONSENT_VERSION, json_schema_extra=ONE_LINE_NOT_BLANK),
    ] = None
    confirm_ttl_seconds: Annotated[int | None, Field(**CONFIRM_TTL_BOUNDS)] = None
    thank_you_url: HttpUrl | None = None
    landing_url: HttpUrl | None = None

    @field_validator("name", "consent_version")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        return _one_line_not_blank(value) if value is not None else None

    @model_validator(mode="after")
    def _required_stay_set(self) -> ListUpdate:
        for name in KEPT_LIST_FIELDS:
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be removed, only changed")
        return self

    def changes(self) -> dict[str, Any]:
        """The fields sent, as the database stores them."""
        values = self.model_dump(exclude_unset=True, mode="json")
        return values


class PersonSubscription(SubscriberDetail):
    list: str


class PersonEventOut(ConsentEventOut):
    list: str


class PersonOut(BaseModel):
    """Everything held about one address, across lists (data protection access request)."""

    email: str
    erased: bool = Field(description="The address was erased once (its tombstone exists).")
    subscriptions: list[PersonSubscription]
    address_jobs: list[JobWithAttempts] = Field(
        description="Backend jobs about the address that have no subscription row."
    )
    erased_ledger: list[PersonEventOut] = Field(
        description="Ledger events kept from an earlier erasure, found by the address's hash."
    )
    audit: list[AuditOut] = Field(description="Audit events whose target names the address.")


class ErasureOut(BaseModel):
    """What an erasure did. Erasing again is harmless (counts 0, `already_erased`)."""

    address_hash: str
    subscriptions: int
    ledger_events: int
    tokens: int
    jobs_deleted: int
    jobs_scrubbed: int
    audit_events: int
    backend_removals: list[str] = Field(
        description="Lists whose backend gets a removal job (the worker runs it)."
    )
    no_backend: list[str] = Field(description="Lists with no backend declared: none to tell.")
    already_erased: bool


class ImportRowError(BaseModel):
    line: int = Field(description="Line of the file where the row starts (the header is 1).")
    email: str = Field(description="The row's address, masked (`c***@example.org`).")
    error: str


# An alias: inside ImportResult, `list` is a field.
ImportRowErrors = list[ImportRowError]


class ImportResult(BaseModel):
    """What an import did (or, in a dry run, would do)."""

    list: str
    mode: str
    dry_run: bool
    read: int = Field(description="Rows read (the header and blank lines not counted).")
    created: int
    unchanged: int = Field(description="Addresses already on the list, left as they are.")
    invalid: int = Field(description="Rows refused, every one counted (`errors` lists 100).")
    errors: ImportRowErrors = Field(
        description="The first 100 refused rows, by line; `invalid` counts them all."
    )


# Block-list ---------------------------------------------------------------------------------


class BlockCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["address", "domain"] = Field(
        description="`address`, or `domain` (which also blocks every subdomain)."
    )
    value: Annotated[str, Field(min_length=1, max_length=320)] = Field(
        description="The address, or the domain (`example.org`; a leading `@` is ignored)."
    )
    reason: Annotated[str, Field(min_length=1, max_length=500)]

    @field_validator("reason")
    @classmethod
    def _plain_reason(cls, value: str) -> str:
        value = _no_control_characters(value).strip()
        if not value:
            raise ValueError("a reason is required")
        return value


class BlockOut(BaseModel):
    id: int
    kind: str
    value: str
    reason: str
    created_at: datetime
    created_by: str


# Proof of consent ---------------------------------------------------------------------------


class WordingOut(BaseModel):
    version: str
    locale: str
    text: str | None = Field(description="The exact text shown; null if none was recorded.")
    first_recorded_at: datetime | None


# Aliases: inside ConsentProofOut, `list` is a field.
ProofLedger = list[ConsentEventOut]
ProofWordings = list[WordingOut]


class ConsentProofOut(BaseModel):
    """A subscriber's consent evidence: each ledger event and the wording of each version."""

    list: str
    list_name: str
    subscriber_id: int
    email: str
    status: str
    locale: str
    consent_version: str
    created_at: datetime
    confirmed_at: datetime | None
    unsubscribed_at: datetime | None
    ledger: ProofLedger
    wordings: ProofWordings = Field(
        description="The text of every consent version the ledger names, in the "
        "subscription's language."
    )
    generated_at: datetime
