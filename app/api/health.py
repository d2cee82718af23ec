"""Liveness and readiness, outside /v1."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import JSONResponse

from app import db, migrations
from app.errors import ErrorBody
from app.schemas import Health

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="healthz", response_model=Health)
def healthz() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get(
    "/readyz",
    operation_id="readyz",
    response_model=Health,
    responses={503: {"model": ErrorBody, "description": "Not ready to serve."}},
)
def readyz(request: Request) -> JSONResponse:
    """The database answers and its schema is at the latest migration."""
    engine = request.app.state.engine
    try:
        db.ping(engine)
        current = migrations.current_revision(engine)
    except SQLAlchemyError as e:
        log.warning("readiness.database_unreachable error=%s", type(e).__name__)
        return JSONResponse(
            {"error": "database_unavailable", "detail": "The database does not answer."},
            status_code=503,
        )
    head = migrations.head_revision()
    if current != head:
        return JSONResponse(
            {"error": "migrations_pending", "detail": f"Schema at {current}, expected {head}."},
            status_code=503,
        )
    return JSONResponse({"status": "ready"})
