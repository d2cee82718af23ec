"""One place that turns errors into answers: `{"error", "detail"}` JSON, or a page."""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Match, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import db, errors, formguard, logs, pages
from app.api import views
from app.api.deps import refuse_compressed, request_locale, wants_html
from app.config import ListSettings, Locale, Settings, error_message
from app.i18n import parse_locale
from app.middleware import relative_location

log = logging.getLogger(__name__)

PAGE_PREFIXES = ("/v1/confirm/", "/v1/unsubscribe/")
# The hosted pages a browser GETs (the form, and the pages a form post leads to).
PAGE_PATHS = re.compile(
    r"^/v1/lists/[^/]+(/(thanks|confirmed|unsubscribed|unsubscribe|unsubscribe/sent))?/?$"
)
# Where the forms post. A browser lands on one by GET when its address bar shows it after
# a form came back with errors (reloaded by Enter, a restored tab, a bookmark).
FORM_POSTS = re.compile(r"^/v1/lists/([^/]+)/(subscriptions|unsubscriptions)/?$")
UNSUBSCRIBE_LINKS = "/v1/unsubscribe/"
CONFIRM_LINKS = "/v1/confirm/"
# nginx's status for a request whose client closed the connection before the answer.
CLIENT_CLOSED_REQUEST = 499
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
    the link's page, which answers the same by GET (a link already used, expired...), or
    the list's form (a POST cannot be replayed by a link)."""
    if request.method in ("GET", "HEAD"):
        return None
    if request.url.path.startswith(PAGE_PREFIXES):
        # Not the list's form: one who pressed the button twice, or reloaded its answer,
        # read "already used" and switched to read it in the other language.
        return request.url.path
    if list_slug is not None:
        return f"/v1/lists/{list_slug}"
    match = re.match(r"^/v1/lists/([^/]+)/(unsubscriptions)?", request.url.path)
    if match:
        # The form the visitor posted: the unsubscribe page's post goes to unsubscriptions.
        return f"/v1/lists/{match[1]}" + ("/unsubscribe" if match[2] else "")
    return request.url.path


def _answer(
    request: Request,
    *,
    status: int,
    code: str,
    detail: str,
    list_slug: str | None = None,
    stored_locale: str | None = None,
    text_key: str | None = None,
) -> Response:
    if wants_html(request, default=_is_page(request)):
        settings = request.app.state.settings
        declared = settings.list_settings(list_slug) if list_slug else None
        # As the link's own page: `?lang=`, else the subscriber's language when the error
        # knows whose link it is; else the visitor's, else the list's.
        if stored_locale is not None:
            locale = parse_locale(request.query_params.get("lang")) or Locale(stored_locale)
        else:
            locale = request_locale(request, default=_default_locale(request, settings, declared))
        chrome = views.chrome(
            request,
            settings,
            locale=locale,
            declared=declared,
            list_name=declared.name if declared else None,
            switch_path=_switch_path(request, list_slug),
        )
        t = chrome.t
        key = text_key or f"error.{code}"
        # A payload refused (422) says why in English, for the site's developer; the visitor
        # reads what it means in the page's language around it.
        text = t(key, detail=detail) if key in t else t("error.generic")
        title_key = f"error.title.{code}"
        title = t(title_key) if title_key in t else t("error.title")
        form = None
        ask_url = None
        unsubscribe_url = None
        list_links = None
        # A confirm link not found does not say its list (cut short by a mail client,
        # mistyped): with one list, the page can still offer the new link its text speaks of;
        # with several, the way to each list's.
        ask_slug = list_slug
        lost = code == "token_not_found" and list_slug is None
        if lost and request.url.path.startswith(CONFIRM_LINKS):
            ask_slug = _only_list(settings)
            if ask_slug is None:
                list_links = pages.ListLinks(
                    label=t("page.ask_again.choose"),
                    links=_lists_pages(settings, "", locale),
                )
        if request.url.path.startswith(UNSUBSCRIBE_LINKS):
            # Someone who wants to leave, with a link that does not work: the way on is the
            # list's page to ask for a new unsubscribe link, not a subscription form.
            leave_slug = list_slug or _only_list(settings)
            if leave_slug is not None:
                unsubscribe_url = f"/v1/lists/{leave_slug}/unsubscribe?lang={locale.value}"
            else:
                # Which list the link was for is not known: the page of each.
                list_links = pages.ListLinks(
                    label=t("page.unsubscribe_request.choose"),
                    links=_lists_pages(settings, "/unsubscribe", locale),
                )
        elif ask_slug is not None and _asks_on_its_own_page(settings, ask_slug):
            ask_url = f"/v1/lists/{ask_slug}?lang={locale.value}"
        elif ask_slug is not None:
            form = pages.Form(
                action=settings.public_link(
                    f"/v1/lists/{ask_slug}/subscriptions?lang={locale.value}"
                ),
                button=t("page.ask_again.button"),
                ask_email=True,
                email_label=t("page.ask_again.label"),
                # Stamped like the hosted form, so a list that requires stamps takes it; as
                # filled before when the link was a real one (its list is known): its
                # visitor asks again with the address the browser fills in, at once.
                hidden={
                    "locale": locale.value,
                    formguard.STAMP_FIELD: views.page_stamp(
                        settings, filled_before=list_slug is not None
                    ),
                },
            )
        return pages.render(
            chrome=chrome,
            title=title,
            text=text,
            status_code=status,
            form=form,
            is_error=True,
            unsubscribe_url=unsubscribe_url,
            ask_url=ask_url,
            form_url=_form_page_after_post(request, code=code, locale=locale),
            list_links=list_links,
        )
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


# A path under a list's own: its pages, and where its forms post.
LIST_PATH = re.compile(r"^/v1/lists/([^/]+)")


def _default_locale(request: Request, settings: Settings, declared: ListSettings | None) -> Locale:
    """An error page's language when its visitor states none (no `?lang=`, no
    `Accept-Language`): its list's, told by the error, else by the path (a form post refused
    before its body is read), else the only list's (a link not found); French otherwise."""
    if declared is None:
        match = LIST_PATH.match(request.url.path)
        slug = match[1] if match else _only_list(settings)
        declared = settings.list_settings(slug) if slug else None
    return declared.default_locale if declared else Locale.FR


def body_too_large(scope: Scope, detail: str) -> Response:
    """The answer of the body cap (app.middleware.BodyLimit) to a body announced too large:
    as any error's, a page for a browser, whose form post would otherwise end on JSON."""
    return _answer(Request(scope), status=413, code=errors.PayloadTooLarge.code, detail=detail)


def _form_page_after_post(request: Request, *, code: str, locale: Locale) -> str | None:
    """The page of the form whose post was refused (another site's origin, too many
    requests, a proof of work...), in the error page's language: the way to try again."""
    match = FORM_POSTS.match(request.url.path)
    if match is None or request.method != "POST" or code == "list_not_found":
        return None
    path = f"/v1/lists/{quote(match[1], safe='')}"
    if match[2] == "unsubscriptions":
        path += "/unsubscribe"
    return f"{path}?lang={locale.value}"


def _form_page_of_post_url(request: Request) -> str | None:
    """The form's own page for a browser that GETs the URL its post went to: the page that
    posts there, in the language asked for, instead of a dead end that says "try again"."""
    match = FORM_POSTS.match(request.url.path)
    if match is None or request.method not in ("GET", "HEAD"):
        return None
    if not wants_html(request, default=False):
        return None
    settings: Settings = request.app.state.settings
    path = f"/v1/lists/{quote(match[1], safe='')}"
    if match[2] == "unsubscriptions":
        path += "/unsubscribe"
    lang = parse_locale(request.query_params.get("lang"))
    if lang is not None:
        path += f"?lang={lang.value}"
    return settings.public_link(path)


def _lowercase_list_page(request: Request) -> str | None:
    """A list's page asked for with capitals in its name (`/v1/lists/BlueHats`, typed from
    a poster or a slide): the same page under the list's name as it is, in lowercase (as
    every list's is), rather than "no such list"."""
    path = request.url.path
    match = LIST_PATH.match(path)
    if request.method not in ("GET", "HEAD") or not PAGE_PATHS.match(path) or match is None:
        return None
    slug = match[1]
    if slug == slug.lower():
        return None
    lowered = f"/v1/lists/{slug.lower()}{path[match.end() :]}"
    return relative_location(lowered, request.scope.get("query_string", b""))


def _asks_on_its_own_page(settings: Settings, slug: str) -> bool:
    """A new link is asked for on the list's own page, not with the error page's form of
    an address alone, when the list requires fields (an address alone would come back with
    "fill in ..."), or when the settings do not declare it (created through the API): its
    thank-you page, where that form's post leads, is then unknown here and so to the page's
    CSP, and the browser would refuse to go there; the list's own page allows it."""
    declared = settings.list_settings(slug)
    return declared is None or any(field.required for field in declared.fields)


def _lists_pages(settings: Settings, page: str, locale: Locale) -> list[tuple[str, str]]:
    """Each declared list's name and its page `page` ("": the subscription page)."""
    return [
        (item.name, f"/v1/lists/{item.slug}{page}?lang={locale.value}") for item in settings.lists
    ]


def _only_list(settings: Settings) -> str | None:
    """The declared list when there is only one: an unknown link does not say its list."""
    return settings.lists[0].slug if len(settings.lists) == 1 else None


def _validation_detail(exc: RequestValidationError) -> str:
    messages = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        message = error_message(error)
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


# The methods a 405's `Allow` may list; HEAD goes with GET (app.middleware.HeadAsGet).
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> str:
    """Every method some route takes at this path: Starlette's 405 names only the first
    route's, while e.g. GET and POST /v1/confirm/{token} are two routes. Asked of the
    router's own matching, whatever shape its routes take (included routers...)."""
    methods: set[str] = set()
    # From the application's routes, as they saw the path: a mounted app (/static) has
    # moved its own prefix into the scope's root path, where no route would match it.
    root_path = request.scope.get("app_root_path", request.scope.get("root_path", ""))
    for method in _METHODS:
        scope = {**request.scope, "method": method, "root_path": root_path}
        for route in request.app.router.routes:
            if route.matches(scope)[0] != Match.FULL:
                continue
            if isinstance(route, Mount):
                # A mount matches whatever the method; the static files answer GET alone.
                if isinstance(route.app, StaticFiles) and method == "GET":
                    methods.add(method)
            else:
                methods.add(method)
    if "GET" in methods:
        methods.add("HEAD")
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


def _no_object(exc: RequestValidationError) -> errors.InvalidBody | None:
    """FastAPI's 422 for a JSON body route (the admin routes) given no body ("Field
    required", naming no field) or JSON that is not an object ("Input should be a valid
    dictionary"): a body with no fields to validate, answered as the public routes do.
    Alone: beside a bad path or query parameter, the 422 names each."""
    found = exc.errors()
    if len(found) != 1 or tuple(found[0].get("loc", ())) != ("body",):
        return None
    kind = found[0].get("type")
    if kind == "missing":
        return errors.InvalidBody("The body is empty: send a JSON object.")
    if kind in ("model_attributes_type", "dict_type", "model_type"):
        return errors.InvalidBody("The body must be a JSON object.")
    return None


def _unreadable_body(request: Request, exc: HTTPException) -> errors.DomainError | None:
    """FastAPI's bare 400 ("There was an error parsing the body") for a JSON body it could
    not decode, worded as the public routes word theirs."""
    if exc.status_code != 400:
        return None
    try:
        # FastAPI reads the body before the route's dependencies (`json_body`) can say so.
        refuse_compressed(request)
    except errors.CompressedBody as e:
        return e
    if isinstance(exc.__cause__, RecursionError):
        return errors.InvalidBody("The body is nested too deeply.")
    if isinstance(exc.__cause__, ValueError):
        # Not UTF-8 (UnicodeDecodeError is a ValueError).
        return errors.InvalidBody("The body is not valid JSON in UTF-8.")
    return None


def install(app: FastAPI) -> None:
    outage_log = EveryFewSeconds()
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_error_shape(default_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(errors.DomainError)
    async def _domain(request: Request, exc: errors.DomainError) -> Response:
        if isinstance(exc, errors.ListNotFound):
            lowercase = _lowercase_list_page(request)
            if lowercase is not None:
                return RedirectResponse(lowercase, status_code=308)
        response = _answer(
            request,
            status=exc.status_code,
            code=exc.code,
            detail=exc.detail,
            list_slug=exc.list_slug,
            stored_locale=exc.locale,
            text_key=exc.text_key,
        )
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        if any(error.get("type") == "json_invalid" for error in exc.errors()):
            # FastAPI's own parsing of a JSON body (the admin routes): unreadable, as the
            # public routes answer it, and not a field's validation.
            return await _domain(request, errors.InvalidBody("The body is not valid JSON."))
        unreadable = _no_object(exc)
        if unreadable is not None:
            return await _domain(request, unreadable)
        return _answer(request, status=422, code="validation_error", detail=_validation_detail(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        unreadable = _unreadable_body(request, exc)
        if unreadable is not None:
            return await _domain(request, unreadable)
        code = HTTP_CODES.get(exc.status_code, "http_error")
        response = _answer(request, status=exc.status_code, code=code, detail=str(exc.detail))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        if exc.status_code == 405:
            page = _form_page_of_post_url(request)
            if page is not None:
                return RedirectResponse(page, status_code=303)
            response.headers["Allow"] = _allowed_methods(request)
        return response

    # The database went away (restart, failover, network): 503 with Retry-After, in the
    # usual shape, instead of a 500. The pool's pre-ping reconnects once it is back.
    @app.exception_handler(sa_exc.OperationalError)
    @app.exception_handler(sa_exc.InterfaceError)
    async def _database_gone(request: Request, exc: sa_exc.DBAPIError) -> Response:
        # One line per few seconds, not one per refused request (a thousand a second).
        refused = outage_log.hit()
        engine = request.app.state.engine
        if refused:
            log.warning(
                "database.unavailable error=%s refused=%d %s",
                type(exc.orig).__name__,
                refused,
                db.failure(engine, exc) if engine is not None else "",
            )
        return await _domain(request, errors.DatabaseUnavailable())


def _unexpected(request: Request) -> Response:
    # Paths carry link tokens and (admin people routes) addresses.
    log.exception("request.failed path=%s", logs.mask_addresses(logs.redact(request.url.path)))
    return _answer(
        request, status=500, code="internal_error", detail="An unexpected error occurred."
    )


class UnexpectedErrors:
    """Answers an unexpected exception from inside the middleware stack: Starlette answers a
    catch-all `Exception` handler from its outermost layer, past the request id, the
    security headers and the metrics, so a 500 would carry none of them and its log line no
    request id. Installed innermost (the first middleware added)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except ClientDisconnect:
            # The client hung up before its body was read (a closed tab, a lost mobile
            # connection, an interrupted import): nobody to answer, and no fault of ours. It
            # was an ERROR with a traceback and a 500 in the metrics, which alerts on 5xx.
            log.info(
                "request.client_disconnected path=%s",
                logs.mask_addresses(logs.redact(Request(scope).url.path)),
            )
            if not started:
                # Never delivered (the server drops what is sent to a closed connection); it
                # puts nginx's 499, "client closed request", in the metrics.
                await Response(status_code=CLIENT_CLOSED_REQUEST)(scope, receive, send)
        except Exception:
            if started:
                # Half an answer is out: nothing to do but let the server close it.
                raise
            await _unexpected(Request(scope))(scope, receive, send)
