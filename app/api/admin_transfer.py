"""The admin API, bulk side: CSV import into a list, CSV / JSON-lines export out of it.

Same rules as `app.api.admin`: every route needs a key, the import a write key, and both
go to the audit log ("subscribers.import" / "subscribers.export", the list as target, the
counts or filters as detail; never an address). The work is `app.transfer`'s, shared with
the CLI.

Neither route fits `Database.run`'s one-transaction-per-request shape: the import commits
batch by batch (each batch its own short transaction), the export reads page by page while
the response streams; see each route.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import exc as sa_exc
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from app import admin, apikeys, audit, db, errors, lists, transfer
from app.api.admin import (
    AUTH_ERRORS,
    CallerDep,
    KeyFirst,
    SubscriberFilterDep,
    WriterDep,
    caller,
)
from app.api.deps import (
    MULTIPART,
    Database,
    DatabaseDep,
    SettingsDep,
    known_query,
    media_type,
    refuse_compressed,
)
from app.models import utcnow
from app.schemas import ImportResult, ImportRowError, UrlNote, UrlText

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(caller), Depends(known_query)],
    responses=AUTH_ERRORS,
    route_class=KeyFirst,
)

# The import's path, for the body limit (`NEWSLETTER_MAX_IMPORT_BYTES` instead of the
# small default every other route keeps).
IMPORT_PATH_PATTERN = r"/v1/admin/lists/[^/]+/import"
# An upload up to this size stays in memory; a larger one goes to a temporary file.
SPOOL_IN_MEMORY = 1024 * 1024
CSV_MEDIA_TYPES = ("text/csv", "application/csv")

# `curl -F file=@...` or a browser's file field: the file inside a form, which the import
# (reading the body twice, streamed to a spool) does not unpack.
_FORM_UPLOAD = (
    "Send the file itself as the body, as text/csv, not inside a form (multipart/form-data): "
    "curl --data-binary @subscribers.csv -H 'Content-Type: text/csv' ..."
)

_CSV_EXAMPLE = (
    "email,name,locale,consent_source,consent_date\n"
    "camille@example.org,Camille,fr,Paper form at the BlueHats meetup,2025-03-12\n"
)


async def _audit(
    database: Database,
    who: apikeys.Caller,
    *,
    action: str,
    target: str,
    outcome: str,
    detail: dict[str, Any],
) -> None:
    await database.run(
        audit.record,
        actor=who.name,
        action=action,
        target=target,
        outcome=outcome,
        now=utcnow(),
        detail=detail,
    )


def _transaction(database: Database) -> transfer.Transaction:
    return functools.partial(
        db.session_scope, database.engine, on_outbox_commit=database.on_outbox_commit
    )


@router.post(
    "/lists/{slug}/import",
    operation_id="admin_import_subscribers",
    response_model=ImportResult,
    responses=errors.responses(
        errors.ListNotFound,
        errors.InvalidCsv,
        errors.EmptyCsv,
        errors.DatabaseUnavailable,
        errors.ImportInterrupted,
        errors.PayloadTooLarge,
        errors.NotCsv,
        errors.CompressedBody,
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": (
                "The CSV file itself as the body (not a form upload), UTF-8 (a BOM is fine), "
                "comma- or semicolon-separated, a header line first, at least one row under "
                "it. Columns: email (required), name, locale (fr, en), attributes "
                "(a JSON object of strings), consent_source, consent_date (ISO date or "
                "date-time; not in the future, nor before 1990), consent_version (the "
                "wording agreed to, when not the list's current one; confirmed rows only). "
                "Up to NEWSLETTER_MAX_IMPORT_BYTES (50 MB by default)."
            ),
            "content": {"text/csv": {"schema": {"type": "string"}, "example": _CSV_EXAMPLE}},
        }
    },
)
async def import_subscribers(
    slug: UrlText,
    request: Request,
    database: DatabaseDep,
    settings: SettingsDep,
    who: WriterDep,
    mode: Annotated[
        transfer.ImportMode,
        Query(
            description="confirmed: rows carry proof of consent (consent_source and "
            "consent_date), added as confirmed; invite: each address gets the double "
            "opt-in mail."
        ),
    ] = transfer.ImportMode.CONFIRMED,
    dry_run: Annotated[bool, Query(description="Count and check; write nothing.")] = False,
    note: Annotated[
        UrlNote | None, Query(max_length=transfer.MAX_NOTE, description="Kept in the ledger.")
    ] = None,
) -> ImportResult:
    """Import subscribers from a CSV body (`text/csv`); rows are checked one by one, and
    an address already on the list is left as it is, so running a file twice is harmless."""
    detail: dict[str, Any] = {"mode": mode.value, "dry_run": dry_run}
    # Filled as the import goes: one the database cuts short says what it wrote.
    report = transfer.ImportReport(list_slug=slug, mode=mode, dry_run=dry_run)
    try:
        kind = media_type(request)
        if kind == MULTIPART:
            raise errors.NotCsv(_FORM_UPLOAD)
        if kind not in CSV_MEDIA_TYPES:
            raise errors.NotCsv()
        refuse_compressed(request)
        await database.run(lists.get, slug=slug)
        # The body is streamed to a spooled file (memory up to SPOOL_IN_MEMORY, then disk),
        # never held whole: the import reads it twice, line by line. The body limit
        # (BodyLimit middleware) stops an upload over NEWSLETTER_MAX_IMPORT_BYTES.
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
            async for chunk in request.stream():
                await run_in_threadpool(spool.write, chunk)
            # One thread-pool call for the whole import, which opens one short transaction
            # per batch: other requests (and, on SQLite, other writers) get in between.
            call = functools.partial(
                transfer.import_csv,
                _transaction(database),
                source=spool,
                list_slug=slug,
                mode=mode,
                dry_run=dry_run,
                operator=who.name,
                note=note,
                key=settings.token_key(),
                resend_interval=settings.resend_interval,
                now=utcnow(),
                backend=settings.backend_of(slug),
                report=report,
            )
            try:
                report = await run_in_threadpool(call)
            except (sa_exc.OperationalError, sa_exc.InterfaceError) as e:
                if not report.applied_through or dry_run:
                    raise  # nothing written: the usual 503
                raise errors.ImportInterrupted(
                    transfer.cut_short(report, again="Send the same file again")
                ) from e
    except errors.ImportInterrupted as e:
        # The database that cut the import short may be back, or not: the answer says
        # what was written either way.
        with contextlib.suppress(sa_exc.OperationalError, sa_exc.InterfaceError):
            await _audit(
                database, who, action="subscribers.import", target=slug, outcome="interrupted",
                detail={**report.counts(), "applied_through": report.applied_through,
                        "note": note, "detail": e.detail},
            )  # fmt: skip
        raise
    except errors.DomainError as e:
        await _audit(
            database, who, action="subscribers.import", target=slug,
            outcome=f"error:{e.code}", detail={**detail, "detail": e.detail},
        )  # fmt: skip
        raise
    await _audit(
        database, who, action="subscribers.import", target=slug, outcome="ok",
        detail={**report.counts(), "note": note},
    )  # fmt: skip
    return ImportResult(
        list=slug,
        mode=mode.value,
        dry_run=dry_run,
        read=report.read,
        created=report.created,
        unchanged=report.unchanged,
        invalid=report.invalid,
        errors=[
            ImportRowError(line=item.line, email=item.email, error=item.error)
            for item in report.errors
        ],
    )


def _open_export(session: Session, *, slug: str, actor: str, detail: dict[str, Any]) -> int:
    mailing_list = lists.get(session, slug=slug)
    assert mailing_list.id is not None
    audit.record(
        session,
        actor=actor,
        action="subscribers.export",
        target=slug,
        outcome="ok",
        now=utcnow(),
        detail=detail,
    )
    return mailing_list.id


def _page_bytes(
    session: Session,
    *,
    list_id: int,
    where: admin.SubscriberFilter,
    after: int | None,
    export_format: transfer.ExportFormat,
) -> tuple[bytes, int | None]:
    page = transfer.export_page(session, list_id=list_id, where=where, after=after)
    return transfer.encode(page.records, export_format), page.next_after


@router.get(
    "/lists/{slug}/export",
    operation_id="admin_export_subscribers",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The subscribers, one per CSV row or JSON line, with the consent "
            "fields (the confirming event's time, source, IP, user agent; the evidence "
            "given at import).",
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        },
        **errors.responses(errors.ListNotFound, errors.BadRequest),
    },
)
async def export_subscribers(
    slug: UrlText,
    database: DatabaseDep,
    who: CallerDep,
    where: SubscriberFilterDep,
    export_format: Annotated[transfer.ExportFormat, Query(alias="format")] = (
        transfer.ExportFormat.CSV
    ),
) -> StreamingResponse:
    """Export a list's subscribers as CSV or JSON lines, streamed, with the same filters
    as the search."""
    filters = where.given()
    detail = {"format": export_format.value, "filters": filters}
    try:
        list_id = await database.run(_open_export, slug=slug, actor=who.name, detail=detail)
    except errors.DomainError as e:
        await _audit(
            database, who, action="subscribers.export", target=slug,
            outcome=f"error:{e.code}", detail={**detail, "detail": e.detail},
        )  # fmt: skip
        raise

    async def body() -> AsyncIterator[bytes]:
        # The body is sent after this function has returned, at the client's pace, so its
        # reads cannot be one `Database.run`: that transaction would stay open for the whole
        # download (on SQLite holding the write lock, blocking every subscription) and keep
        # a pool thread. Instead each page is one `Database.run` (one thread-pool call, a
        # short session of its own), keyset after the last id: the next page starts where
        # this one stopped even if rows change in between, and memory holds one page.
        yield transfer.header(export_format)
        after: int | None = None
        while True:
            chunk, after = await database.run(
                _page_bytes, list_id=list_id, where=where, after=after, export_format=export_format
            )
            if chunk:
                yield chunk
            if after is None:
                return

    extension = "csv" if export_format == transfer.ExportFormat.CSV else "jsonl"
    which = where.status.value if where.status else "all"
    filename = f"{slug}-{which}-{utcnow():%Y%m%d}.{extension}"
    return StreamingResponse(
        body(),
        media_type=transfer.MEDIA_TYPES[export_format],
        headers={"content-disposition": f'attachment; filename="{filename}"'},
    )
