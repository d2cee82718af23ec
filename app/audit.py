"""The audit log: every operator action, who did it, on what, and how it ended."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from app import errors
from app.models import AuditEvent


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    target: str | None,
    outcome: str,
    now: datetime,
    detail: dict[str, Any] | None = None,
) -> None:
    session.add(
        AuditEvent(
            occurred_at=now,
            actor=actor,
            action=action,
            target=target[:400] if target else None,
            outcome=outcome,
            detail=detail or {},
        )
    )


def search(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[AuditEvent]:
    """Newest first; `before_id` pages backwards (keyset). BadRequest for `since` not
    before `until`."""
    errors.check_period(since, until, start_name="since", end_name="until")
    query = select(AuditEvent)
    if actor is not None:
        query = query.where(AuditEvent.actor == actor)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    if target is not None:
        query = query.where(AuditEvent.target == target)
    if since is not None:
        query = query.where(col(AuditEvent.occurred_at) >= since)
    if until is not None:
        query = query.where(col(AuditEvent.occurred_at) < until)
    if before_id is not None:
        query = query.where(col(AuditEvent.id) < before_id)
    return list(session.exec(query.order_by(col(AuditEvent.id).desc()).limit(limit)).all())
