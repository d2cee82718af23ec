"""The admin API, abuse and evidence side: the block-list of addresses and domains, and a
subscriber's proof of consent.

Same rules as `app.api.admin`: every route needs a key, changes need a write key, and every
action (and every read of a proof, which holds personal data) goes to the audit log.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.exceptions import RequestValidationError
from starlette.responses import PlainTextResponse, Response

from app import addresses, blocklist, consent, errors
from app.api.admin import AUTH_ERRORS, CallerDep, KeyFirst, WriterDep, audited, caller
from app.api.deps import DatabaseDep, json_body, known_query, prefers
from app.models import BlockedEntry, BlockKind, utcnow
from app.schemas import (
    MAX_ROW_ID,
    BlockCreate,
    BlockOut,
    ConsentEventOut,
    ConsentProofOut,
    WordingOut,
)

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(caller), Depends(known_query)],
    responses=AUTH_ERRORS,
    route_class=KeyFirst,
)


def block_out(entry: BlockedEntry) -> BlockOut:
    return BlockOut.model_validate(entry, from_attributes=True)


@router.get("/blocks", operation_id="admin_list_blocks", response_model=list[BlockOut])
async def list_blocks(database: DatabaseDep, kind: BlockKind | None = None) -> list[BlockOut]:
    """The block-list: addresses and domains that are never mailed nor added."""
    rows = await database.run(blocklist.all_entries, kind=kind)
    return [block_out(row) for row in rows]


@router.post(
    "/blocks",
    operation_id="admin_add_block",
    status_code=201,
    response_model=BlockOut,
    dependencies=[Depends(json_body)],
    responses=errors.responses(errors.Conflict, errors.NotJson, errors.CompressedBody),
)
async def add_block(body: BlockCreate, database: DatabaseDep, who: WriterDep) -> BlockOut:
    """Block an address or a domain (and its subdomains): public requests for it get the
    usual answer but send nothing; operators' additions and imports refuse it."""
    kind = BlockKind(body.kind)
    try:
        value = blocklist.normalize(kind, body.value)
    except addresses.InvalidAddress as e:
        raise RequestValidationError(
            [{"loc": ("body", "value"), "msg": str(e), "type": "value_error"}]
        ) from e
    entry = await audited(
        database, who, action="block.add", target=f"{kind.value}:{value}",
        work=blocklist.add, kind=kind, value=value, reason=body.reason, actor=who.name,
        now=utcnow(),
    )  # fmt: skip
    return block_out(entry)


@router.delete(
    "/blocks/{block_id}",
    operation_id="admin_remove_block",
    response_model=BlockOut,
    responses=errors.responses(errors.NotFound),
)
async def remove_block(
    block_id: Annotated[int, Path(ge=1, le=MAX_ROW_ID)], database: DatabaseDep, who: WriterDep
) -> BlockOut:
    """Take an entry off the block-list; answers the entry removed."""
    entry = await audited(
        database, who, action="block.remove", target=str(block_id),
        work=blocklist.remove, entry_id=block_id,
    )  # fmt: skip
    return block_out(entry)


def proof_out(item: consent.Proof, *, generated_at: Any) -> ConsentProofOut:
    sub = item.subscription
    assert sub.id is not None
    return ConsentProofOut(
        list=item.list_slug,
        list_name=item.list_name,
        subscriber_id=sub.id,
        email=sub.email,
        status=sub.status,
        locale=sub.locale,
        consent_version=sub.consent_version,
        created_at=sub.created_at,
        confirmed_at=sub.confirmed_at,
        unsubscribed_at=sub.unsubscribed_at,
        ledger=[ConsentEventOut.model_validate(e, from_attributes=True) for e in item.events],
        wordings=[
            WordingOut(
                version=version,
                locale=sub.locale,
                text=row.text if row else None,
                first_recorded_at=row.first_recorded_at if row else None,
            )
            for version, row in item.wordings.items()
        ],
        generated_at=generated_at,
    )


@router.get(
    "/subscribers/{subscriber_id}/consent-proof",
    operation_id="admin_consent_proof",
    response_model=ConsentProofOut,
    responses={
        200: {"content": {"text/plain": {}}, "description": "JSON, or text by `Accept`."},
        **errors.responses(errors.NotFound),
    },
)
async def consent_proof(
    subscriber_id: Annotated[int, Path(ge=1, le=MAX_ROW_ID, description="The subscription's id.")],
    request: Request,
    database: DatabaseDep,
    who: CallerDep,
) -> Response | ConsentProofOut:
    """A subscriber's proof of consent: each ledger event (when, source, IP as kept, user
    agent, consent version) and the exact wording of each version, in their language.
    `Accept: text/plain` gives a printable form."""
    item = await audited(
        database, who, action="subscriber.consent_proof", target=str(subscriber_id),
        work=consent.proof_by_id, subscription_id=subscriber_id,
    )  # fmt: skip
    now = utcnow()
    if prefers(request.headers.get("accept"), "text/plain", default=False):
        return PlainTextResponse(consent.render_text(item, generated_at=now))
    return proof_out(item, generated_at=now)
