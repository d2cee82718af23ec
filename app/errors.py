"""Expected failures, each carrying its HTTP status and a stable error code.

Every error answer has the shape `{"error": code, "detail": message}`; the handlers in
`app.api.handlers` render these (as JSON, or as a page for a browser).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from pydantic import BaseModel


class ErrorBody(BaseModel):
    error: str
    detail: str


class DomainError(Exception):
    status_code: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"
    message: ClassVar[str] = "The request could not be processed."
    # Response headers the answer carries, documented in the OpenAPI document.
    documented_headers: ClassVar[dict[str, dict[str, Any]]] = {}
    # The page's text in the catalogues, when not `error.<code>`.
    text_key: ClassVar[str | None] = None

    def __init__(
        self, detail: str | None = None, *, list_slug: str | None = None, locale: str | None = None
    ) -> None:
        self.detail = detail or self.message
        # The list concerned, when known: an error page can then offer to ask again.
        self.list_slug = list_slug
        # The language stored with the subscription concerned, when known: its page's.
        self.locale = locale
        self.headers: dict[str, str] = {}
        super().__init__(self.detail)


class ListNotFound(DomainError):
    status_code = 404
    code = "list_not_found"
    message = "No mailing list has this name."


class TokenNotFound(DomainError):
    status_code = 404
    code = "token_not_found"
    message = "This link is not valid. Ask for a new one."


class TokenExpired(DomainError):
    status_code = 410
    code = "token_expired"
    message = "This link has expired. Ask for a new one."


class TokenUsed(DomainError):
    status_code = 409
    code = "token_used"
    message = "This link has already been used."


class TokenUsedNotSubscribed(TokenUsed):
    """A confirm link used before, of an address not subscribed now (it left since, or
    asked again and has a newer link): `TokenUsed`'s page, which reassures one who has
    just confirmed that nothing more is to be done, would tell this one they are."""

    message = (
        "This link has already been used, and this address is not subscribed at present: "
        "ask for a new link to subscribe again."
    )
    text_key = "error.token_used_not_subscribed"


class Unauthorized(DomainError):
    status_code = 401
    code = "unauthorized"
    message = "A valid API key is required (Authorization: Bearer <key>)."
    # RFC 9110 §11.6.1: a 401 names the scheme that would be accepted.
    documented_headers: ClassVar[dict[str, dict[str, Any]]] = {
        "WWW-Authenticate": {
            "description": "The scheme to authenticate with: `Bearer`.",
            "schema": {"type": "string"},
        }
    }

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail)
        self.headers["WWW-Authenticate"] = "Bearer"


class Forbidden(DomainError):
    status_code = 403
    code = "forbidden"
    message = "This key may only read; this action needs a write key."


class NotFound(DomainError):
    status_code = 404
    code = "not_found"
    message = "Nothing matches."


class Conflict(DomainError):
    status_code = 409
    code = "conflict"
    message = "This conflicts with what exists."


class AddressBlocked(Conflict):
    code = "address_blocked"
    message = "This address (or its domain) is on the block-list: it cannot be added."


class ListWithoutBackend(Conflict):
    code = "list_without_backend"
    message = (
        "This list has no mailing-list backend (its backend kind is none, or the settings do "
        "not declare it): there is no member list to compare with."
    )


class ConsentWordingChanged(Conflict):
    code = "consent_wording_changed"
    message = (
        "The consent wording changed but its version did not: give the new wording a new "
        "consent_version (the version is what the consent ledger refers to)."
    )


class BadRequest(DomainError):
    status_code = 400
    code = "bad_request"
    message = "The request is not valid."


def check_period(
    start: datetime | None, end: datetime | None, *, start_name: str, end_name: str
) -> None:
    """Raises BadRequest for a period that ends before it starts, or where it starts: every
    period here holds `start <= t < end`, so it can hold nothing, and its empty answer would
    read as "no activity" or "nobody". A bound left out leaves the period open."""
    if start is not None and end is not None and start >= end:
        raise BadRequest(
            f"{start_name} ({start.isoformat()}) is not before {end_name} ({end.isoformat()}):"
            f" the period is empty; give {start_name} before {end_name}."
        )


class InvalidBody(DomainError):
    status_code = 400
    code = "invalid_body"
    message = "The request body could not be read."


class UnsupportedMediaType(DomainError):
    status_code = 415
    code = "unsupported_media_type"
    message = "Send application/json, application/x-www-form-urlencoded or multipart/form-data."


class NotCsv(UnsupportedMediaType):
    message = "Send the file as text/csv."


class NotJson(UnsupportedMediaType):
    message = "Send the body as application/json."


class CompressedBody(UnsupportedMediaType):
    """A body with a content coding (`Content-Encoding: gzip`): bodies are read as sent, so
    a compressed one would be refused as unreadable JSON, CSV or form, and one labelled
    compressed but sent plain taken for what its label denies."""

    message = "Send the body uncompressed, without a Content-Encoding (identity only)."
    # RFC 9110 §15.5.16: a 415 for a content coding names those that would be accepted.
    documented_headers: ClassVar[dict[str, dict[str, Any]]] = {
        "Accept-Encoding": {
            "description": "The content codings a request body may have: `identity` (none).",
            "schema": {"type": "string"},
        }
    }

    def __init__(self) -> None:
        super().__init__()
        self.headers["Accept-Encoding"] = "identity"


class InvalidCsv(DomainError):
    """A file the import cannot read at all (encoding, CSV syntax, header); nothing is written."""

    status_code = 400
    code = "invalid_csv"
    message = "The CSV file could not be read."


class EmptyCsv(InvalidCsv):
    """A header and no row under it: most often the wrong file (the template, an export
    whose filters matched nobody). Its own code, so that a script importing a daily file
    can tell "nothing today" from a file that cannot be read."""

    code = "empty_csv"
    message = "The file holds no rows, only its header: nothing was imported."


class PayloadTooLarge(DomainError):
    status_code = 413
    code = "payload_too_large"
    message = "The request body is too large."


class RateLimited(DomainError):
    status_code = 429
    code = "rate_limited"
    message = "Too many requests from this network address; try again later."
    documented_headers: ClassVar[dict[str, dict[str, Any]]] = {
        "Retry-After": {
            "description": "Seconds to wait before trying again.",
            "schema": {"type": "integer", "minimum": 1},
        }
    }

    def __init__(self, *, retry_after: int) -> None:
        super().__init__(f"Too many requests from this network address; retry in {retry_after} s.")
        self.retry_after = retry_after
        self.headers["Retry-After"] = str(retry_after)


class DatabaseUnavailable(DomainError):
    """The database cannot be reached: nothing was stored, the client may try again."""

    status_code = 503
    code = "database_unavailable"
    message = "The service is briefly unavailable (its database does not answer). Try again."
    documented_headers: ClassVar[dict[str, dict[str, Any]]] = {
        "Retry-After": {
            "description": "Seconds to wait before trying again.",
            "schema": {"type": "integer", "minimum": 1},
        }
    }
    retry_after = 5

    def __init__(self) -> None:
        super().__init__()
        self.headers["Retry-After"] = str(self.retry_after)


class ImportInterrupted(DatabaseUnavailable):
    """The database stopped answering midway through an import: the batches before were
    committed. The detail says up to which line; the same file sent again finishes it."""

    code = "import_interrupted"
    message = (
        "The database stopped answering during the import: the rows of the batches before "
        "are imported, the others are not. Send the same file again to finish."
    )

    def __init__(self, detail: str | None = None) -> None:
        super().__init__()
        if detail is not None:
            self.detail = detail
            self.args = (detail,)


class OriginNotAllowed(DomainError):
    """A browser form post from a page on a site that may not use this service's forms."""

    status_code = 403
    code = "origin_not_allowed"
    message = "This form may not be sent from that site. Use the form on the newsletter's own site."


class ProofOfWorkRequired(DomainError):
    status_code = 400
    code = "proof_of_work_required"
    message = (
        "This request needs a solved challenge: GET /v1/challenge, then send pow_challenge "
        "and pow_nonce."
    )


class ProofOfWorkInvalid(DomainError):
    status_code = 400
    code = "proof_of_work_invalid"
    message = "The challenge or its solution is not valid. Ask for a new challenge."


class ProofOfWorkExpired(DomainError):
    status_code = 410
    code = "proof_of_work_expired"
    message = "The challenge has expired. Ask for a new one."


class ProofOfWorkUsed(DomainError):
    status_code = 409
    code = "proof_of_work_used"
    message = "The challenge was already used. Ask for a new one."


class WebhookRejected(DomainError):
    # 406: Mailgun treats it as "rejected, do not retry"; other backends stop as well.
    status_code = 406
    code = "webhook_rejected"
    message = "The webhook call was rejected."


class WebhookSignatureInvalid(WebhookRejected):
    code = "webhook_signature_invalid"
    message = "The webhook signature does not verify."


class WebhookMalformed(WebhookRejected):
    code = "webhook_malformed"
    message = "The body is not a Mailgun event: its event-data must be a JSON object."


class WebhookStale(WebhookRejected):
    code = "webhook_stale"
    message = "The webhook timestamp is too old or too far in the future."


class WebhookReplayed(WebhookRejected):
    code = "webhook_replayed"
    message = "This webhook call was already received."


class WebhookNotConfigured(DomainError):
    """A Mailgun list is declared, none with its webhook signing key: no call can be checked.
    Not a 406, after which Mailgun drops the event (an unsubscribe lost): it retries this
    answer for 8 hours, and its retries verify once the key is set."""

    status_code = 503
    code = "webhook_not_configured"
    message = (
        "No Mailgun list here has its webhook_signing_key (NEWSLETTER_LISTS), so the call "
        "cannot be verified; Mailgun retries it."
    )


def responses(*errors: type[DomainError], html: bool = False) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entry documenting these errors in the OpenAPI document.

    `html`: a browser (or, for link pages, any caller not asking for JSON) gets the error
    as a page, documented as `text/html` beside the JSON shape.
    """
    documented: dict[int | str, dict[str, Any]] = {}
    for error in errors:
        entry = documented.setdefault(
            error.status_code, {"model": ErrorBody, "description": error.message}
        )
        if html:
            entry["content"] = {"text/html": {"schema": {"type": "string"}}}
        if error.message not in entry["description"]:
            entry["description"] += " / " + error.message
        if error.documented_headers:
            entry.setdefault("headers", {}).update(error.documented_headers)
    return documented
