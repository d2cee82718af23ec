"""One place that turns errors into answers: `{"error", "detail"}` JSON, or a page."""

from __future__ import annotations

import logging
import math
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from app import errors, logs, pages
from app.api.deps import request_locale, wants_html
from app.config import Locale
from app.i18n import Translator

log = logging.getLogger(__name__)

PAGE_PREFIXES = ("/v1/confirm/", "/v1/unsubscribe/")
HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def _answer(
    request: Request, *, status: int, code: str, detail: str, list_slug: str | None = None
) -> Response:
    is_page = request.url.path.startswith(PAGE_PREFIXES)
    if wants_html(request, default=is_page):
        locale = request_locale(request, default=Locale.FR)
        t = Translator(locale)
        key = f"error.{code}"
        text = t(key) if key in _catalogue_keys(locale) else t("error.generic")
        form = None
        if list_slug is not None:
            settings = request.app.state.settings
            form = pages.Form(
                action=settings.public_link(f"/v1/lists/{list_slug}/subscriptions"),
                button=t("page.ask_again.button"),
                ask_email=True,
                email_label=t("page.ask_again.label"),
                hidden={"locale": locale.value},
            )
        if status == 422:
            text = detail
        return pages.render(
            locale=locale, title=t("error.title"), text=text, status_code=status, form=form
        )
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def _catalogue_keys(locale: Locale) -> set[str]:
    from app.i18n import catalogue

    return set(catalogue(locale))


def _validation_detail(exc: RequestValidationError) -> str:
    messages = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        messages.append(f"{where}: {message}" if where else message)
    return "; ".join(messages) or "The request is not valid."


class EveryFewSeconds:
    """Counts events; `hit()` returns the count since the last report once `every` seconds
    have passed since it, else 0. Used from the event loop only (no lock)."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self._count = 0
        self._reported_at = -math.inf

    def hit(self) -> int:
        self._count += 1
        now = time.monotonic()
        if now - self._reported_at < self.every:
            return 0
        count, self._count, self._reported_at = self._count, 0, now
        return count


def install(app: FastAPI) -> None:
    outage_log = EveryFewSeconds()

    @app.exception_handler(errors.DomainError)
    async def _domain(request: Request, exc: errors.DomainError) -> Response:
        response = _answer(
            request,
            status=exc.status_code,
            code=exc.code,
            detail=exc.detail,
            list_slug=exc.list_slug,
        )
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return _answer(request, status=422, code="validation_error", detail=_validation_detail(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        code = HTTP_CODES.get(exc.status_code, "http_error")
        response = _answer(request, status=exc.status_code, code=code, detail=str(exc.detail))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    # The database went away (restart, failover, network): 503 with Retry-After, in the
    # usual shape, instead of a 500. The pool's pre-ping reconnects once it is back.
    @app.exception_handler(sa_exc.OperationalError)
    @app.exception_handler(sa_exc.InterfaceError)
    async def _database_gone(request: Request, exc: sa_exc.DBAPIError) -> Response:
        # One line per few seconds, not one per refused request (a thousand a second).
        refused = outage_log.hit()
        if refused:
            log.warning(
                "database.unavailable error=%s refused=%d", type(exc.orig).__name__, refused
            )
        return await _domain(request, errors.DatabaseUnavailable())

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # Paths carry link tokens and (admin people routes) addresses.
        log.exception("request.failed path=%s", logs.mask_addresses(logs.redact(request.url.path)))
        return _answer(
            request, status=500, code="internal_error", detail="An unexpected error occurred."
        )
