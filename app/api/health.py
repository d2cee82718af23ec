"""Liveness, readiness and metrics, outside /v1."""

from __future__ import annotations

import functools
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import JSONResponse, Response

from app import db, errors, readiness
from app.api.deps import SettingsDep, client_ip
from app.config import Settings
from app.errors import ErrorBody
from app.metrics import (
    RELAY_HEADERS,
    UNAUTHORIZED_DETAIL,
    Metrics,
    private_scraper,
    scrape_allowed,
)
from app.models import utcnow
from app.schemas import Health, Readiness

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])

_bearer = HTTPBearer(
    scheme_name="MetricsToken",
    auto_error=False,
    description="NEWSLETTER_METRICS_TOKEN, when it is set.",
)


class MetricsUnauthorized(errors.Unauthorized):
    message = UNAUTHORIZED_DETAIL


class MetricsForbidden(errors.Forbidden):
    message = (
        "Without NEWSLETTER_METRICS_TOKEN, metrics are served to loopback and private "
        "networks only (through a reverse proxy, one listed in NEWSLETTER_TRUSTED_PROXIES)."
    )


def _private_scraper(request: Request, settings: Settings) -> bool:
    """Whether the scraper is on loopback or a private network. A request relayed by a
    proxy that NEWSLETTER_TRUSTED_PROXIES does not list has that proxy as its client (nginx
    on the same host: 127.0.0.1), whoever sent it from wherever: it is not taken as local."""
    client = client_ip(request, settings)
    peer = request.client.host if request.client is not None else None
    if client == peer and any(name in request.headers for name in RELAY_HEADERS):
        return False
    return private_scraper(client)


# Answered on the event loop (`async`): a plain `def` route runs in the thread pool, so a
# process whose pool threads all waited on a slow database failed its liveness probe and
# was restarted; and each answer cost two hops to a pool thread and back (the route, then
# its response's check), more than the rest of the answer.
@router.get("/healthz", operation_id="healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get(
    "/readyz",
    operation_id="readyz",
    response_model=Readiness,
    responses={503: {"model": ErrorBody, "description": "Not ready to serve."}},
)
async def readyz(request: Request, settings: SettingsDep) -> JSONResponse:
    """The database answers, its schema is at the latest migration, and the outbox worker
    is alive (this process's own; an external worker's state is reported, see README)."""
    worker = request.app.state.worker
    engine = request.app.state.engine
    probe: readiness.Probe = request.app.state.readiness
    try:
        report = await probe.check(
            functools.partial(
                readiness.check,
                engine,
                own_worker=worker.name if worker is not None else None,
                heartbeat_timeout=settings.worker_heartbeat_timeout,
                now=utcnow(),
            )
        )
    except readiness.DatabaseSilent:
        log.warning(
            "readiness.database_silent seconds=%g %s",
            readiness.DEADLINE_S,
            db.shown_where(engine),
        )
        return JSONResponse(
            {
                "error": "database_unavailable",
                "detail": f"The database does not answer (nothing within "
                f"{readiness.DEADLINE_S:g} s).",
            },
            status_code=503,
        )
    except SQLAlchemyError as e:
        log.warning(
            "readiness.database_unreachable error=%s %s",
            type(e).__name__,
            db.failure(engine, e),
        )
        return JSONResponse(
            {"error": "database_unavailable", "detail": "The database does not answer."},
            status_code=503,
        )
    if report.problem is not None:
        log.warning("readiness.not_ready reason=%s", report.problem)
        return JSONResponse({"error": report.problem, "detail": report.detail}, status_code=503)
    body = Readiness(
        status="ready",
        worker=report.worker,
        worker_seen_seconds_ago=report.worker_seen_seconds_ago,
    )
    return JSONResponse(body.model_dump())


@router.get(
    "/metrics",
    operation_id="metrics",
    responses={
        200: {"description": "Prometheus text format.", "content": {CONTENT_TYPE_LATEST: {}}},
        **errors.responses(MetricsUnauthorized, MetricsForbidden),
    },
    # The token is optional (NEWSLETTER_METRICS_TOKEN): without one, any client on loopback
    # or a private network may scrape.
    openapi_extra={"security": [{}]},
)
def metrics(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Response:
    """Prometheus metrics: requests, outbox, subscriptions, rate limits, worker heartbeat."""
    given = credentials.credentials if credentials is not None else None
    if not scrape_allowed(given, token=settings.metrics_token):
        raise MetricsUnauthorized()
    if settings.metrics_token is None and not _private_scraper(request, settings):
        raise MetricsForbidden()
    registry: Metrics = request.app.state.metrics
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
