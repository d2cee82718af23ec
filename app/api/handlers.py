"""One place that turns errors into answers: `{"error", "detail"}` JSON, or a page."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from app import errors, pages
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


def _allowed_methods(request: Request) -> str:
    """Every method some route takes at this path: Starlette's 405 names only the first
    route's, while e.g. GET and POST /v1/confirm/{token} are two routes."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(request.url.path) and getattr(route, "methods", None):
            methods.update(route.methods)
    return ", ".join(sorted(methods))


def document_error_shape(openapi: dict[str, Any]) -> dict[str, Any]:
    """Make the document say what 422 answers are: `{"error", "detail"}` like every other
    error (FastAPI documents its own `HTTPValidationError`, which this service never sends),
    and, on the public routes, a page for a browser."""
    schemas = openapi.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    body = {"$ref": "#/components/schemas/ErrorBody"}
    for operations in openapi.get("paths", {}).values():
        for operation in operations.values():
            if "requestBody" in operation:
                # Every route with a body: the body cap (middleware) and unreadable JSON.
                for error in (errors.InvalidBody, errors.PayloadTooLarge):
                    operation["responses"].setdefault(
                        str(error.status_code),
                        {
                            "description": error.message,
                            "content": {"application/json": {"schema": body}},
                        },
                    )
            answer = operation.get("responses", {}).get("422")
            if answer is None:
                continue
            answer["description"] = "The request is not valid (which field, and why)."
            answer["content"] = {"application/json": {"schema": body}}
            if "public" in operation.get("tags", []):
                answer["content"]["text/html"] = {"schema": {"type": "string"}}
    if schemas and "ErrorBody" not in schemas:
        schemas["ErrorBody"] = errors.ErrorBody.model_json_schema()
    return openapi


def install(app: FastAPI) -> None:
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_error_shape(default_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

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
        if exc.status_code == 405:
            response.headers["Allow"] = _allowed_methods(request)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("request.failed path=%s", request.url.path)
        return _answer(
            request, status=500, code="internal_error", detail="An unexpected error occurred."
        )
