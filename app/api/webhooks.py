"""Webhooks from mailing-list backends, each checked with the backend's own signature."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from app import errors, webhooks
from app.api.deps import (
    JSON,
    DatabaseDep,
    SettingsDep,
    evidence,
    inline_refs,
    media_type,
    refuse_compressed,
)
from app.models import utcnow
from app.schemas import Accepted, MailgunWebhook

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

# One answer for every verified call, whether the address is known here or not.
EVENT_ACCEPTED = Accepted(detail="Event received.")


@router.post(
    "/mailgun",
    operation_id="mailgun_webhook",
    response_model=Accepted,
    responses=errors.responses(
        errors.WebhookSignatureInvalid,
        errors.WebhookMalformed,
        errors.WebhookStale,
        errors.WebhookReplayed,
        # The router's 503 (the database away) is this route's too, beside this one.
        errors.DatabaseUnavailable,
        errors.WebhookNotConfigured,
        errors.InvalidBody,
        errors.NotJson,
        errors.CompressedBody,
        errors.PayloadTooLarge,
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                JSON: {"schema": inline_refs(MailgunWebhook.model_json_schema(by_alias=True))}
            },
        }
    },
)
async def mailgun_webhook(
    request: Request, database: DatabaseDep, settings: SettingsDep
) -> Response:
    """Receive a signed Mailgun event: unsubscribes, complaints and hard bounces apply."""
    if media_type(request) != JSON:
        raise errors.NotJson("Send the Mailgun event as application/json.")
    refuse_compressed(request)
    try:
        payload = json.loads(await request.body())
    except RecursionError as e:
        raise errors.InvalidBody("The body is nested too deeply.") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise errors.InvalidBody("The body is not valid JSON.") from e
    now = utcnow()
    event = webhooks.verify_mailgun(payload, lists=settings.lists, now=now)
    # The token of every verified call is spent, those that change nothing here included:
    # Mailgun signs the timestamp and token, not the event, so an unspent signature could
    # come back within the tolerance carrying an unsubscribe or a complaint.
    await database.run(
        webhooks.record,
        event=event,
        evidence=evidence(request, settings, source="backend"),
        now=now,
    )
    return JSONResponse(EVENT_ACCEPTED.model_dump())
