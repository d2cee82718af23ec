"""The admin API: operators and other services, with `Authorization: Bearer <key>`.

Every route needs a key (401 without a valid one); routes that change anything need a
write key (403 for a read key). Actions and reads of personal data go to the audit log.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.convertors import StringConvertor, register_url_convertor
from starlette.responses import Response

from app import admin, apikeys, audit, errors, lists, outbox
from app.api.deps import Database, DatabaseDep, SettingsDep, known_query, no_body
from app.models import JobKind, SubscriptionStatus, utcnow
from app.schemas import (
    MAX_ROW_ID,
    AttemptOut,
    AuditOut,
    ConsentEventOut,
    DateTimeQuery,
    JobOut,
    JobWithAttempts,
    ListOut,
    LocaleQuery,
    RetryResult,
    StatsOut,
    SubscriberDetail,
    SubscriberOut,
    SubscriberPage,
    UrlText,
)

T = TypeVar("T")

# Named apart from the metrics token's scheme (app/api/health.py): under one default name
# ("HTTPBearer") the document kept one description, and told that the admin API took
# NEWSLETTER_METRICS_TOKEN.
_bearer = HTTPBearer(
    scheme_name="ApiKey",
    auto_error=False,
    description="An API key made with `newsletter keys create`.",
)


def _authenticate(
    database: Database, credentials: HTTPAuthorizationCredentials | None
) -> Awaitable[apikeys.Caller]:
    key = credentials.credentials if credentials else None
    return database.run(apikeys.authenticate, key=key, now=utcnow())


async def caller(
    request: Request,
    database: DatabaseDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> apikeys.Caller:
    known: apikeys.Caller | None = getattr(request.state, "caller", None)
    if known is not None:  # the route checked the key before its body (KeyFirst)
        return known
    return await _authenticate(database, credentials)


class KeyFirst(APIRoute):
    """An admin route whose body FastAPI reads checks the key first: FastAPI parses a JSON
    body before any dependency runs, so an unreadable one got 400 from anyone, without a
    key, where every admin route answers 401."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def keyed(request: Request) -> Response:
            database: Database = request.app.state.database
            request.state.caller = await _authenticate(database, await _bearer(request))
            return await handler(request)

        return keyed


CallerDep = Annotated[apikeys.Caller, Depends(caller)]


async def writer(who: CallerDep) -> apikeys.Caller:
    if not who.can_write:
        raise errors.Forbidden()
    return who


WriterDep = Annotated[apikeys.Caller, Depends(writer)]

AUTH_ERRORS = errors.responses(errors.Unauthorized, errors.Forbidden)
router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(caller), Depends(known_query)],
    responses=AUTH_ERRORS,
    route_class=KeyFirst,
)


async def audited(
    database: Database,
    who: apikeys.Caller,
    *,
    action: str,
    target: str | None,
    work: Callable[..., T],
    audit_detail: dict[str, Any] | None = None,
    **kwargs: Any,
) -> T:
    """Run `work` and record the action in the audit log, success or failure."""

    def run(session: Any, **inner: Any) -> T:
        result = work(session, **inner)
        audit.record(
            session, actor=who.name, action=action, target=target, outcome="ok", now=utcnow(),
            detail=audit_detail,
        )  # fmt: skip
        return result

    try:
        return await database.run(run, **kwargs)
    except errors.DomainError as e:
        await database.run(
            audit.record,
            actor=who.name,
            action=action,
            target=target,
            outcome=f"error:{e.code}",
            now=utcnow(),
            detail={**(audit_detail or {}), "detail": e.detail},
        )
        raise


def list_out(row: Any, settings: Any) -> ListOut:
    declared = settings.list_settings(row.slug)
    return ListOut(
        slug=row.slug,
        name=row.name,
        default_locale=row.default_locale,
        consent_version=row.consent_version,
        confirm_ttl_seconds=row.confirm_ttl_seconds,
        thank_you_url=row.thank_you_url,
        landing_url=row.landing_url,
        backend=declared.backend.kind if declared else "none",
        declared_in_settings=declared is not None,
    )


@router.get("/lists", operation_id="admin_list_lists", response_model=list[ListOut])
async def list_lists(database: DatabaseDep, settings: SettingsDep) -> list[ListOut]:
    """Every mailing list."""
    rows = await database.run(admin.all_lists)
    return [list_out(row, settings) for row in rows]


@router.get(
    "/lists/{slug}",
    operation_id="admin_get_list",
    response_model=ListOut,
    responses=errors.responses(errors.ListNotFound),
)
async def get_list(slug: UrlText, database: DatabaseDep, settings: SettingsDep) -> ListOut:
    """One mailing list."""

    return list_out(await database.run(lists.get, slug=slug), settings)


def subscriber_out(row: Any) -> SubscriberOut:
    return SubscriberOut.model_validate(row, from_attributes=True)


def subscriber_filter(
    status: SubscriptionStatus | None = None,
    prefix: Annotated[UrlText | None, Query(max_length=admin.MAX_PREFIX)] = None,
    locale: LocaleQuery | None = None,
    created_after: DateTimeQuery | None = None,
    created_before: DateTimeQuery | None = None,
    confirmed_after: DateTimeQuery | None = None,
    confirmed_before: DateTimeQuery | None = None,
) -> admin.SubscriberFilter:
    """The filters the search and the export share, from the query."""
    if prefix is not None:
        # No address holds a space: one here is the `+` of a tag typed in the URL as is
        # (`?prefix=camille+news@`), which a query string reads as a space.
        prefix = prefix.replace(" ", "+")
    return admin.SubscriberFilter(
        status=status,
        prefix=prefix,
        locale=locale,
        created_after=created_after,
        created_before=created_before,
        confirmed_after=confirmed_after,
        confirmed_before=confirmed_before,
    )


SubscriberFilterDep = Annotated[admin.SubscriberFilter, Depends(subscriber_filter)]


@router.get(
    "/lists/{slug}/subscribers",
    operation_id="admin_search_subscribers",
    response_model=SubscriberPage,
    responses=errors.responses(errors.ListNotFound, errors.BadRequest),
)
async def search_subscribers(
    slug: UrlText,
    database: DatabaseDep,
    who: CallerDep,
    where: SubscriberFilterDep,
    cursor: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=admin.MAX_PAGE)] = 100,
) -> SubscriberPage:
    """Subscribers of a list, filtered, in pages (pass `next_cursor` back as `cursor`)."""
    # A read of personal data as the record's and the export's are (a prefix may be a
    # whole address): the filters go to the audit log with it.
    filters = where.given()
    rows, next_cursor = await audited(
        database, who, action="subscribers.search", target=slug,
        audit_detail={"filters": filters, "cursor": cursor is not None},
        work=admin.search_subscribers, list_slug=slug, where=where, cursor=cursor, limit=limit,
    )  # fmt: skip
    return SubscriberPage(items=[subscriber_out(row) for row in rows], next_cursor=next_cursor)


class _Mailbox(StringConvertor):
    """An address in a path. A mailbox name may hold `/`, which the server reads as a
    separator once its %2F is decoded (a plain segment answered such an address 404); it
    ends before a final `/unsubscribe`, that action's route (admin_privacy.py)."""

    regex = "(?:(?!/unsubscribe$).)+"


register_url_convertor("mailbox", _Mailbox())


@router.get(
    "/lists/{slug}/subscribers/{email:mailbox}",
    operation_id="admin_get_subscriber",
    response_model=SubscriberDetail,
    responses=errors.responses(errors.ListNotFound, errors.NotFound),
)
async def get_subscriber(
    slug: UrlText, email: UrlText, database: DatabaseDep, who: CallerDep
) -> SubscriberDetail:
    """One subscriber's full record: state, consent ledger, mails and syncs with attempts."""
    record = await audited(
        database, who, action="subscriber.read", target=f"{slug}:{email}",
        work=admin.subscriber_record, list_slug=slug, email=email,
    )  # fmt: skip
    return subscriber_detail(record)


def jobs_with_attempts(jobs: list[Any], attempts: list[Any]) -> list[JobWithAttempts]:
    """Jobs, each with the log of its delivery attempts."""
    by_job: dict[int, list[AttemptOut]] = {}
    for attempt in attempts:
        by_job.setdefault(attempt.job_id, []).append(
            AttemptOut.model_validate(attempt, from_attributes=True)
        )
    return [
        JobWithAttempts(
            **JobOut.model_validate(job, from_attributes=True).model_dump(),
            attempt_log=by_job.get(job.id or 0, []),
        )
        for job in jobs
    ]


def subscriber_detail(record: admin.SubscriberRecord) -> SubscriberDetail:
    return SubscriberDetail(
        **subscriber_out(record.subscription).model_dump(),
        ledger=[ConsentEventOut.model_validate(e, from_attributes=True) for e in record.events],
        jobs=jobs_with_attempts(record.jobs, record.attempts),
    )


@router.get(
    "/lists/{slug}/stats",
    operation_id="admin_list_stats",
    response_model=StatsOut,
    responses=errors.responses(errors.ListNotFound, errors.BadRequest),
)
async def list_stats(
    slug: UrlText,
    database: DatabaseDep,
    since: DateTimeQuery | None = None,
    until: DateTimeQuery | None = None,
    by: Annotated[str, Query(pattern="^(day|month)$")] = "day",
) -> StatsOut:
    """Counts by status; requests, confirmations and unsubscriptions per day or month;
    confirmation rate; sync backlog, oldest waiting job, dead jobs. Default: last 30 days."""
    now = utcnow()
    result = await database.run(
        admin.stats,
        list_slug=slug,
        since=since or now - timedelta(days=30),
        until=until or now + timedelta(seconds=1),
        by_month=by == "month",
        now=now,
    )
    return StatsOut(
        list=result.list_slug,
        by_status=result.by_status,
        series=result.series,
        confirmation_rate=result.confirmation_rate,
        sync_backlog=result.sync_backlog,
        oldest_pending_job_seconds=result.oldest_pending_job_seconds,
        dead_jobs=result.dead_jobs,
    )


@router.get("/jobs", operation_id="admin_list_failed_jobs", response_model=list[JobOut])
async def list_failed_jobs(
    database: DatabaseDep,
    who: CallerDep,
    state: Annotated[
        admin.FailedJobState | None, Query(description="dead, or pending (retrying)")
    ] = None,
    kind: JobKind | None = None,
    limit: Annotated[int, Query(ge=1, le=admin.MAX_PAGE)] = 100,
) -> list[JobOut]:
    """Jobs that failed: dead letters and jobs waiting for a retry, with their last error."""
    # Their payloads and errors name addresses (a removal's, a relay's refusal): a read of
    # personal data, audited as a subscriber search is.
    filters = {name: value for name, value in (("state", state), ("kind", kind)) if value}
    rows = await audited(
        database, who, action="jobs.list", target=None, audit_detail={"filters": filters},
        work=admin.failed_jobs, state=state, kind=kind, limit=limit,
    )  # fmt: skip
    return [JobOut.model_validate(row, from_attributes=True) for row in rows]


@router.post(
    "/jobs/{job_id}/retry",
    operation_id="admin_retry_job",
    response_model=RetryResult,
    responses=errors.responses(errors.NotFound),
    dependencies=[Depends(no_body)],
)
async def retry_job(
    job_id: Annotated[int, Path(ge=1, le=MAX_ROW_ID)], database: DatabaseDep, who: WriterDep
) -> RetryResult:
    """Put one failed job back in the queue now."""

    def work(session: Any) -> int:
        if not admin.retry_jobs(session, job_ids=[job_id], now=utcnow()):
            raise errors.NotFound("No failed job has this id.")
        return 1

    count = await audited(database, who, action="job.retry", target=str(job_id), work=work)
    return RetryResult(retried=count)


@router.post(
    "/lists/{slug}/reconcile",
    operation_id="admin_reconcile_list",
    status_code=202,
    response_model=JobOut,
    responses=errors.responses(errors.ListNotFound, errors.ListWithoutBackend),
    dependencies=[Depends(no_body)],
)
async def reconcile_list(
    slug: UrlText, database: DatabaseDep, settings: SettingsDep, who: WriterDep
) -> JobOut:
    """Compare the list with its backend and fix differences, in the worker, soon.

    The answer is the reconciliation job; its outcome (counts of what was fixed) shows in
    `GET /v1/admin/jobs` when it fails, and in the audit log of the request. A list without
    a backend is refused (409): against none, every confirmed member would count as missing.
    """
    declared = settings.list_settings(slug)

    def work(session: Any) -> JobOut:
        lists.get(session, slug=slug)
        if declared is None or declared.backend.kind == "none":
            raise errors.ListWithoutBackend(
                f"List {slug!r} has no mailing-list backend (its backend kind is none, or the "
                "settings do not declare it): there is no member list to compare with. "
                "Declare its backend in NEWSLETTER_LISTS first."
            )
        job = outbox.request_reconcile(session, list_slug=slug, now=utcnow())
        return JobOut.model_validate(job, from_attributes=True)

    return await audited(database, who, action="list.reconcile", target=slug, work=work)


@router.post(
    "/jobs/retry",
    operation_id="admin_retry_all_jobs",
    response_model=RetryResult,
    dependencies=[Depends(no_body)],
)
async def retry_all_jobs(database: DatabaseDep, who: WriterDep) -> RetryResult:
    """Put every failed job back in the queue now."""
    retried = await audited(
        database, who, action="job.retry_all", target=None,
        work=admin.retry_jobs, job_ids=None, now=utcnow(),
    )  # fmt: skip
    return RetryResult(retried=len(retried))


@router.get(
    "/audit",
    operation_id="admin_search_audit",
    response_model=list[AuditOut],
    responses=errors.responses(errors.BadRequest),
)
async def search_audit(
    database: DatabaseDep,
    actor: UrlText | None = None,
    action: UrlText | None = None,
    target: UrlText | None = None,
    since: DateTimeQuery | None = None,
    until: DateTimeQuery | None = None,
    before_id: Annotated[int | None, Query(ge=1, le=MAX_ROW_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=admin.MAX_PAGE)] = 100,
) -> list[AuditOut]:
    """The audit log, newest first (`before_id` for older pages)."""
    rows = await database.run(
        audit.search, actor=actor, action=action, target=target,
        since=since, until=until, before_id=before_id, limit=limit,
    )  # fmt: skip
    return [AuditOut.model_validate(row, from_attributes=True) for row in rows]
