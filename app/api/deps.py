"""Request dependencies, declared once as `Annotated` aliases."""

from __future__ import annotations

import codecs
import ipaddress
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, get_args, get_origin
from urllib.parse import parse_qsl

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from app import db, errors
from app.config import Locale, Settings
from app.i18n import negotiate, parse_locale, qvalue
from app.ratelimit import RateLimiter
from app.subscriptions import Evidence
from app.writer import GroupWriter

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
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
        self.writer = GroupWriter(engine, on_outbox_commit=on_outbox_commit)

    async def run(self, work: Callable[..., T], /, **kwargs: Any) -> T:
        return await run_in_threadpool(self._run, work, kwargs)

    async def write(self, work: Callable[..., T], /, **kwargs: Any) -> T:
        """As `run`, for the public routes' short writes: in a transaction shared with
        other requests (group commit, app/writer.py), committed before this returns."""
        return await self.writer.run(work, **kwargs)

    def close(self) -> None:
        """Finish the writes in hand (at shutdown, once no request is left)."""
        self.writer.stop()

    def _run(self, work: Callable[..., T], kwargs: dict[str, Any]) -> T:
        with db.session_scope(self.engine, on_outbox_commit=self.on_outbox_commit) as session:
            return work(session, **kwargs)


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_database(request: Request) -> Database:
    database: Database = request.app.state.database
    return database


async def get_rate_limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.rate_limiter
    return limiter


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]
RateLimiterDep = Annotated[RateLimiter, Depends(get_rate_limiter)]


@dataclass(frozen=True, slots=True)
class Services:
    """The settings, database and rate limiter, for the public POST routes that every
    sign-up and confirmation goes through. Those take them with `services_of` and call
    their screening and body reading themselves, with no FastAPI dependency: FastAPI spends
    about 20 µs of CPU on each dependency of each request, and these routes had six."""

    settings: Settings
    database: Database
    limiter: RateLimiter


def services_of(request: Request) -> Services:
    state = request.app.state
    return Services(state.settings, state.database, state.rate_limiter)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_ip(text: str) -> IPAddress | None:
    """An address as proxies write it (`192.0.2.1`, `192.0.2.1:443`, `[2001:db8::1]:443`)."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    # A zone (`fe80::1%eth0`) means nothing beyond the proxy's own link.
    text = text.partition("%")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forwarded_client(peer: str, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]) -> str:
    """The client behind `peer`: `peer` itself unless it is a trusted proxy; then, walking
    `X-Forwarded-For` from the right, the first entry that is not a trusted proxy.

    Each trusted proxy appends the address it was connected from, so entries right of the
    first untrusted one are vouched for, and anything left of it may be forged. An entry that
    is not an address (`unknown`, garbage) ends the walk: what lies beyond it cannot be
    believed, so the nearest proxy that wrote it stands for the client.
    """
    hop = _parse_ip(peer)
    if hop is None or not any(hop in network for network in trusted):
        return peer
    entries = [entry for header in forwarded_for for entry in header.split(",") if entry.strip()]
    for entry in reversed(entries):
        address = _parse_ip(entry)
        if address is None:
            break
        hop = address
        if not any(address in network for network in trusted):
            break
    return str(hop)


def client_ip(request: Request, settings: Settings) -> str | None:
    """The visitor's IP, for rate limits and the ledger (see `forwarded_client`)."""
    if request.client is None:
        return None
    peer = request.client.host
    if not settings.trusted_proxies:
        return peer
    return forwarded_client(
        peer, request.headers.getlist("x-forwarded-for"), settings.trusted_proxies
    )


async def limit_client(request: Request, services: Services) -> None:
    """Count the request against its client's limit, before any other work; 429 past it."""
    await services.limiter.check_client(client_ip(request, services.settings))


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def parse_form(raw: bytes) -> dict[str, str]:
    """An url-encoded form body; the first value of a repeated field wins."""
    try:
        pairs = parse_qsl(
            # A byte order mark in front (a body written to a file by Windows tools, sent by
            # `curl --data @file`) would be read into the first field's name, so that
            # `email` was "missing"; JSON's reader skips it too.
            raw.removeprefix(codecs.BOM_UTF8).decode("utf-8"),
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
    return form


def _charset(request: Request) -> str | None:
    for parameter in request.headers.get("content-type", "").split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


def refuse_other_charsets(request: Request) -> None:
    """415 for a body declared in a charset other than UTF-8.

    JSON is UTF-8 (RFC 8259) and forms are read as UTF-8; a body declared in another
    charset (UTF-7 smuggles markup past filters) would be misread, not converted.
    """
    if _charset(request) not in (None, "utf-8", "utf8"):
        raise errors.UnsupportedMediaType("Send the body in UTF-8 (or without a charset).")


def refuse_compressed(request: Request) -> None:
    """415, with `Accept-Encoding: identity`, for a body sent with a content coding.

    Bodies are read as they come: a gzipped one would be "not valid JSON" (or an unreadable
    form, or a CSV file of nonsense), and one labelled `gzip` but sent plain would be taken
    whatever its label says.
    """
    codings = ",".join(request.headers.getlist("content-encoding"))
    if any(coding.strip().lower() not in ("", "identity") for coding in codings.split(",")):
        raise errors.CompressedBody()


def _takes_several(annotation: Any) -> bool:
    """Whether a query parameter so typed takes several values (`list[str] | None`)."""
    if get_origin(annotation) in (list, set, frozenset, tuple):
        return True
    return any(_takes_several(argument) for argument in get_args(annotation))


def _query_names(dependant: Dependant) -> dict[str, bool]:
    """Each query parameter the route takes, and whether it takes several values."""
    names = {
        field.alias: _takes_several(field.field_info.annotation) for field in dependant.query_params
    }
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def known_query(request: Request) -> None:
    """422 for a query parameter the route does not take (the admin routes), or given more
    than once where it takes one value.

    FastAPI ignores one: a misspelt filter (`?state=confirmed` for `status`) would go
    unnoticed, and an export of the confirmed subscribers hold every one. It keeps the last
    of a repeated one: `?status=confirmed&status=pending` exported the pending alone.
    """
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known = _query_names(route.dependant)
    repeated = sorted(
        name
        for name, takes_several in known.items()
        if not takes_several and len(request.query_params.getlist(name)) > 1
    )
    if repeated:
        raise RequestValidationError(
            [
                {
                    "loc": ("query", name),
                    "msg": f"given {len(request.query_params.getlist(name))} times: it takes "
                    "one value (ask once per value)",
                    "type": "extra_forbidden",
                }
                for name in repeated
            ]
        )
    unknown = sorted(set(request.query_params) - set(known))
    if unknown:
        takes = ", ".join(sorted(known)) or "none"
        raise RequestValidationError(
            [
                {
                    "loc": ("query", name[:40]),
                    "msg": f"not a parameter of this route (it takes: {takes})",
                    "type": "extra_forbidden",
                }
                for name in unknown
            ]
        )


async def no_body(request: Request) -> None:
    """422 for a body sent to a route that takes none (the admin API's actions on a job or a
    list). FastAPI ignores one: `POST /v1/admin/jobs/retry` with `{"ids": [12]}`, as if it
    chose the jobs, put every failed job back in the queue."""
    if await request.body():
        raise RequestValidationError(
            [
                {
                    "loc": ("body",),
                    "msg": "this route takes no body: send none",
                    "type": "extra_forbidden",
                }
            ]
        )


async def json_body(request: Request) -> None:
    """415 for a body that is not JSON in UTF-8, on a route whose body FastAPI reads as JSON;
    400 for an object naming a field twice.

    FastAPI takes a body of another type (curl's `-d` sends a form) for no object at all,
    which would be a 422 saying the body is not a dictionary.
    """
    body = await request.body()
    if not body:
        return
    kind = media_type(request)
    if kind != JSON and not (kind.startswith("application/") and kind.endswith("+json")):
        raise errors.NotJson()
    refuse_compressed(request)
    refuse_other_charsets(request)
    # A name given twice is refused, as on the public routes (`_object`): FastAPI would
    # take the last one.
    try:
        json.loads(body, object_pairs_hook=_object)
    except errors.InvalidBody:
        raise
    except (RecursionError, ValueError):
        return  # not JSON: FastAPI reads the body next and says so


async def read_form(request: Request) -> dict[str, str]:
    """A form post's fields, url-encoded or multipart (a form with
    `enctype="multipart/form-data"`), read as `read_payload` reads one (UTF-8 only)."""
    refuse_compressed(request)
    refuse_other_charsets(request)
    if media_type(request) == MULTIPART:
        return await _multipart_fields(request)
    return parse_form(await request.body())


async def _multipart_fields(request: Request) -> dict[str, str]:
    """A multipart form's text fields; the first value of a repeated field wins. A file
    has no place in these forms: one is refused, as more than `MAX_FORM_FIELDS` fields."""
    # Read whole first (the form is parsed from it): Starlette decodes a field that is not
    # UTF-8 as Latin-1 instead of refusing it, so a page in windows-1252 would store its
    # visitors' text altered (its apostrophe, 0x92, as an invisible control character)
    # where the url-encoded form of the same page gets a 400.
    raw = await request.body()
    try:
        form = await request.form(max_files=0, max_fields=MAX_FORM_FIELDS)
    except HTTPException as e:  # Starlette's answer to a malformed or oversized form
        raise errors.InvalidBody(
            f"The form is not valid multipart/form-data (text fields only, at most "
            f"{MAX_FORM_FIELDS}): {e.detail}"
        ) from e
    fields: dict[str, str] = {}
    for name, value in form.multi_items():
        if not isinstance(value, str):
            raise errors.InvalidBody("The form holds a file: only text fields are read.")
        fields.setdefault(name, value)
    # Text fields only, so the whole body is UTF-8 when each of them is.
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise errors.InvalidBody("The form is not valid UTF-8 multipart/form-data.") from e
    return fields


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose names are each given once: `{"email": "a@...", "email": "b@..."}`
    has no one meaning (RFC 8259 §4; Python keeps the last, a proxy or a filter in front
    may read the first), so it is refused rather than guessed."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise errors.InvalidBody(f"The body names {name[:40]!r} more than once.")
            seen.add(name)
    return value


async def read_payload(request: Request, model: type[ModelT]) -> ModelT:
    """Parse a JSON or form body into `model`, with clear errors for anything else."""
    kind = media_type(request)
    refuse_compressed(request)
    refuse_other_charsets(request)
    raw = await request.body()
    data: object
    if kind == JSON:
        try:
            data = json.loads(raw, object_pairs_hook=_object)
        except RecursionError as e:
            # `[[[[...` a few thousand deep fits under the body limit and exhausts the stack.
            raise errors.InvalidBody("The body is nested too deeply.") from e
        except (UnicodeDecodeError, ValueError) as e:
            raise errors.InvalidBody("The body is not valid JSON.") from e
        if not isinstance(data, dict):
            raise errors.InvalidBody("The body must be a JSON object.")
    elif kind == FORM:
        data = parse_form(raw)
    else:
        raise errors.UnsupportedMediaType()
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False)) from e


def inline_refs(schema: Any, definitions: dict[str, Any] | None = None) -> Any:
    """A model's JSON schema with its nested models inlined: a request body given in
    `openapi_extra` cannot add them to the document's components."""
    if definitions is None and isinstance(schema, dict):
        definitions = schema.pop("$defs", {})
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and definitions is not None:
            return inline_refs(definitions[ref.rpartition("/")[2]], definitions)
        return {key: inline_refs(value, definitions) for key, value in schema.items()}
    if isinstance(schema, list):
        return [inline_refs(item, definitions) for item in schema]
    return schema


def evidence(request: Request, settings: Settings, *, source: str) -> Evidence:
    client = client_ip(request, settings)
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


HTML = "text/html"
# An Accept header's media ranges read at most: a browser sends about ten.
MAX_ACCEPT_RANGES = 32
# A media range's type or subtype: an RFC 9110 token (§5.6.2).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")


def accept_ranges(accept: str) -> list[tuple[str, str, float]]:
    """The media ranges of an `Accept` header (RFC 9110 §12.5.1), as (type, subtype,
    quality), in their order. A range that cannot be read (`text`, `*/html`, `q=high`) is
    left out, as if it were not there; past the first `MAX_ACCEPT_RANGES`, the rest too.
    Media type parameters are ignored: no page or JSON answer here comes in variants
    that a parameter would choose between."""
    ranges = []
    for part in accept.split(",", MAX_ACCEPT_RANGES)[:MAX_ACCEPT_RANGES]:
        media, *parameters = part.split(";", MAX_ACCEPT_RANGES)
        kind, slash, subtype = media.strip().lower().partition("/")
        if not (slash and _TOKEN.fullmatch(kind) and _TOKEN.fullmatch(subtype)):
            continue
        if kind == "*" and subtype != "*":
            continue
        quality: float | None = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                # What follows the weight is an extension (accept-ext), ignored.
                quality = qvalue(value)
                break
        if quality is not None:
            ranges.append((kind, subtype, quality))
    return ranges


def accept_quality(ranges: Sequence[tuple[str, str, float]], media_type: str) -> float:
    """How much a client with these ranges wants `media_type` (`text/html`): the weight of
    the most specific range that matches it (`text/html` over `text/*` over `*/*`), the
    highest one if the header names it more than once; 0, not acceptable, when none does."""
    kind, _, subtype = media_type.partition("/")
    best: tuple[int, float] | None = None
    for range_kind, range_subtype, quality in ranges:
        if (range_kind, range_subtype) == (kind, subtype):
            specificity = 2
        elif (range_kind, range_subtype) == (kind, "*"):
            specificity = 1
        elif (range_kind, range_subtype) == ("*", "*"):
            specificity = 0
        else:
            continue
        if best is None or (specificity, quality) > best:
            best = (specificity, quality)
    return best[1] if best else 0.0


def prefers(accept: str | None, media_type: str, *, default: bool) -> bool:
    """Whether to answer in `media_type` rather than JSON, by the `Accept` header: yes when
    the client weighs it strictly above application/json; no when the other way round;
    `default` (the route's own kind of answer) on a tie, such as `*/*`, no header, a header
    naming neither, or one that cannot be read."""
    ranges = accept_ranges(accept) if accept else []
    other_weight, json_weight = accept_quality(ranges, media_type), accept_quality(ranges, JSON)
    if other_weight != json_weight:
        return other_weight > json_weight
    return default


def prefers_html(accept: str | None, *, default: bool) -> bool:
    """A page rather than JSON (`prefers`)."""
    return prefers(accept, HTML, default=default)


def wants_html(request: Request, *, default: bool) -> bool:
    """`prefers_html` for this request's `Accept` header."""
    return prefers_html(request.headers.get("accept"), default=default)
