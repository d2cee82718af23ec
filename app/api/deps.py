"""Request dependencies, declared once as `Annotated` aliases."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qsl

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from app import db, errors
from app.config import Locale, Settings
from app.i18n import negotiate, parse_locale
from app.subscriptions import Evidence

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
MAX_FORM_FIELDS = 50

ModelT = TypeVar("ModelT", bound=BaseModel)
T = TypeVar("T")


class Database:
    """The request boundary's unit of work: `await database.run(fn, **kwargs)` opens a
    session, calls `fn(session, **kwargs)`, commits (or rolls back on error) and closes,
    all in one thread-pool call, before the response is built, so a 2xx means stored.

    One call and not a session dependency: a transaction held open across the several
    thread-pool hops of a sync dependency and a sync endpoint let a burst of requests
    occupy every pool thread waiting for the lock the holder still had, while the holder
    waited for a thread (seen as 30 s stalls under 50 concurrent clicks).
    """

    def __init__(self, engine: Engine, *, on_outbox_commit: Callable[[], None] | None) -> None:
        self.engine = engine
        self.on_outbox_commit = on_outbox_commit

    async def run(self, work: Callable[..., T], /, **kwargs: Any) -> T:
        return await run_in_threadpool(self._run, work, kwargs)

    def _run(self, work: Callable[..., T], kwargs: dict[str, Any]) -> T:
        with db.session_scope(self.engine, on_outbox_commit=self.on_outbox_commit) as session:
            return work(session, **kwargs)


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_database(request: Request) -> Database:
    database: Database = request.app.state.database
    return database


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_payload(request: Request, model: type[ModelT]) -> ModelT:
    """Parse a JSON or form body into `model`, with clear errors for anything else."""
    kind = media_type(request)
    raw = await request.body()
    data: object
    if kind == JSON:
        try:
            data = json.loads(raw)
        except RecursionError as e:
            # `[[[[...` a few thousand deep fits under the body limit and exhausts the stack.
            raise errors.InvalidBody("The body is nested too deeply.") from e
        except (UnicodeDecodeError, ValueError) as e:
            raise errors.InvalidBody("The body is not valid JSON.") from e
        if not isinstance(data, dict):
            raise errors.InvalidBody("The body must be a JSON object.")
    elif kind == FORM:
        try:
            pairs = parse_qsl(
                raw.decode("utf-8"),
                keep_blank_values=True,
                max_num_fields=MAX_FORM_FIELDS,
                errors="strict",
            )
        except UnicodeDecodeError as e:
            raise errors.InvalidBody("The form is not valid UTF-8 url-encoded data.") from e
        except ValueError as e:
            # parse_qsl's only ValueError here: more than max_num_fields fields.
            raise errors.InvalidBody(f"The form has more than {MAX_FORM_FIELDS} fields.") from e
        form: dict[str, str] = {}
        for name, value in pairs:
            form.setdefault(name, value)
        data = form
    else:
        raise errors.UnsupportedMediaType()
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False)) from e


def evidence(request: Request, settings: Settings, *, source: str) -> Evidence:
    client = request.client.host if request.client else None
    agent = request.headers.get("user-agent")
    referer = request.headers.get("referer") or request.headers.get("origin")
    return Evidence(
        source=source,
        source_url=referer[:2048] if referer else None,
        ip=client if settings.store_ip else None,
        user_agent=agent[:512] if agent and settings.store_user_agent else None,
    )


def request_locale(request: Request, *, default: Locale) -> Locale:
    """`?lang=` first, then `Accept-Language`, then the given default."""
    chosen = parse_locale(request.query_params.get("lang"))
    if chosen is not None:
        return chosen
    return negotiate(request.headers.get("accept-language"), default=default)


def wants_html(request: Request, *, default: bool) -> bool:
    accept = request.headers.get("accept", "").lower()
    if "text/html" in accept:
        return True
    if JSON in accept:
        return False
    return default
