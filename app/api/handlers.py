"""One place that turns errors into answers: `{"error", "detail"}` JSON, or a page."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from app import errors, formguard, pages
from app.api import views
from app.api.deps import request_locale, wants_html
from app.config import Locale, Settings
from app.models import utcnow

log = logging.getLogger(__name__)

PAGE_PREFIXES = ("/v1/confirm/", "/v1/unsubscribe/")
# The hosted pages a browser GETs (the form, and the pages a form post leads to).
PAGE_PATHS = re.compile(
    r"^/v1/lists/[^/]+(/(thanks|confirmed|unsubscribed|unsubscribe|unsubscribe/sent))?/?$"
)
UNSUBSCRIBE_LINKS = "/v1/unsubscribe/"
HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def _is_page(request: Request) -> bool:
    path = request.url.path
    if path.startswith(PAGE_PREFIXES):
        return True
    return request.method in ("GET", "HEAD") and PAGE_PATHS.match(path) is not None


def _switch_path(request: Request, list_slug: str | None) -> str | None:
    """Where the error page's language switch leads: the same URL for a GET; after a POST,
    the list's form (a POST cannot be replayed by a link), or the link's page."""
    if request.method in ("GET", "HEAD"):
        return None
    if list_slug is not None:
        return f"/v1/lists/{list_slug}"
    match = re.match(r"^/v1/lists/([^/]+)/(unsubscriptions)?", request.url.path)
    if match:
        # The form the visitor posted: the unsubscribe page's post goes to unsubscriptions.
        return f"/v1/lists/{match[1]}" + ("/unsubscribe" if match[2] else "")
    return request.url.path


def _answer(
    request: Request, *, status: int, code: str, detail: str, list_slug: str | None = None
) -> Response:
    if wants_html(request, default=_is_page(request)):
        settings = request.app.state.settings
        locale = request_locale(request, default=Locale.FR)
        declared = settings.list_settings(list_slug) if list_slug else None
        chrome = views.chrome(
            request,
            settings,
            locale=locale,
            declared=declared,
            list_name=declared.name if declared else None,
            switch_path=_switch_path(request, list_slug),
        )
        t = chrome.t
        key = f"error.{code}"
        text = t(key) if key in t else t("error.generic")
        title_key = f"error.title.{code}"
        title = t(title_key) if title_key in t else t("error.title")
        form = None
        unsubscribe_url = None
        if request.url.path.startswith(UNSUBSCRIBE_LINKS):
            # Someone who wants to leave, with a link that does not work: the way on is the
            # list's page to ask for a new unsubscribe link, not a subscription form.
            leave_slug = list_slug or _only_list(settings)
            if leave_slug is not None:
                unsubscribe_url = f"/v1/lists/{leave_slug}/unsubscribe?lang={locale.value}"
        elif list_slug is not None:
            form = pages.Form(
                action=settings.public_link(f"/v1/lists/{list_slug}/subscriptions"),
                button=t("page.ask_again.button"),
                ask_email=True,
                email_label=t("page.ask_again.label"),
                # Stamped like the hosted form, so a list that requires stamps takes it.
                hidden={
                    "locale": locale.value,
                    formguard.STAMP_FIELD: formguard.issue(key=settings.token_key(), now=utcnow()),
                },
            )
        if status == 422:
            text = detail
        return pages.render(
            chrome=chrome,
            title=title,
            text=text,
            status_code=status,
            form=form,
            is_error=True,
            unsubscribe_url=unsubscribe_url,
        )
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def _only_list(settings: Settings) -> str | None:
    """The declared list when there is only one: an unknown link does not say its list."""
    return settings.lists[0].slug if len(settings.lists) == 1 else None


def _validation_detail(exc: RequestValidationError) -> str:
    messages = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        messages.append(f"{where}: {message}" if where else message)
    return "; ".join(messages) or "The request is not valid."


def install(app: FastAPI) -> None:
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

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("request.failed path=%s", request.url.path)
        return _answer(
            request, status=500, code="internal_error", detail="An unexpected error occurred."
        )
