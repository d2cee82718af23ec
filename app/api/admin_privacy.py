"""The admin API, operators' side: lists created and changed through the API, subscribers
added (invited, or confirmed with evidence) and unsubscribed, and data protection requests:
access to everything held about an address, and its erasure.

Same rules as `app.api.admin`: every route needs a key, changes need a write key, and every
action goes to the audit log. An erasure is audited under the address's keyed hash, never
the address; earlier audit events naming the address are scrubbed by the erasure itself.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.exceptions import RequestValidationError

from app import addresses, backends, errors, lists, operators, privacy
from app.api.admin import (
    AUTH_ERRORS,
    CallerDep,
    KeyFirst,
    WriterDep,
    audited,
    caller,
    jobs_with_attempts,
    list_out,
    subscriber_detail,
    subscriber_out,
)
from app.api.deps import DatabaseDep, SettingsDep, json_body, known_query
from app.models import utcnow
from app.schemas import (
    AddSubscriberRequest,
    AuditOut,
    ConsentEventOut,
    ErasureOut,
    ListCreate,
    ListOut,
    ListUpdate,
    OperatorUnsubscribeRequest,
    PersonEventOut,
    PersonOut,
    PersonSubscription,
    SubscriberOut,
    UrlText,
)

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(caller), Depends(known_query)],
    responses=AUTH_ERRORS,
    route_class=KeyFirst,
)

EmailPath = Annotated[
    UrlText,
    Path(
        max_length=1000,
        description="The address, in any case.",
        json_schema_extra={"format": "email"},
    ),
]


def _address(raw: str, *, where: tuple[str, ...], new: bool) -> addresses.Address:
    try:
        return addresses.parse(raw, new=new)
    except addresses.InvalidAddress as e:
        raise RequestValidationError([{"loc": where, "msg": str(e), "type": "value_error"}]) from e


# Lists ------------------------------------------------------------------------------------


@router.post(
    "/lists",
    operation_id="admin_create_list",
    status_code=201,
    response_model=ListOut,
    dependencies=[Depends(json_body)],
    responses=errors.responses(errors.Conflict, errors.NotJson, errors.CompressedBody),
)
async def create_list(
    body: ListCreate, database: DatabaseDep, settings: SettingsDep, who: WriterDep
) -> ListOut:
    """Create a list, stored in the database only (without a backend until the settings
    declare a list with this slug, which then takes it over at the next start; meanwhile
    its sync jobs wait as failed jobs, to be retried then)."""
    row = await audited(
        database, who, action="list.create", target=body.slug,
        audit_detail={"settings": body.model_dump(mode="json", exclude={"slug"})},
        work=lists.create, slug=body.slug, name=body.name,
        default_locale=body.default_locale.value, consent_version=body.consent_version,
        confirm_ttl_seconds=body.confirm_ttl_seconds,
        thank_you_url=str(body.thank_you_url) if body.thank_you_url else None,
        landing_url=str(body.landing_url) if body.landing_url else None,
        declared=settings.lists, now=utcnow(),
    )  # fmt: skip
    return list_out(row, settings)


@router.patch(
    "/lists/{slug}",
    operation_id="admin_update_list",
    response_model=ListOut,
    dependencies=[Depends(json_body)],
    responses=errors.responses(
        errors.ListNotFound,
        errors.Conflict,
        errors.ConsentWordingChanged,
        errors.NotJson,
        errors.CompressedBody,
    ),
)
async def update_list(
    slug: UrlText, body: ListUpdate, database: DatabaseDep, settings: SettingsDep, who: WriterDep
) -> ListOut:
    """Change a list created through the API; a list declared in the settings is changed
    there (409 here: the settings are applied again at every start)."""
    changes = body.changes()
    # What was set, so that the log shows who pointed a list's pages elsewhere, and where.
    row = await audited(
        database, who, action="list.update", target=slug, audit_detail={"changes": changes},
        work=lists.update, slug=slug, changes=changes, declared=settings.lists,
        now=utcnow(),
    )  # fmt: skip
    return list_out(row, settings)


# Subscribers ------------------------------------------------------------------------------


@router.post(
    "/lists/{slug}/subscribers",
    operation_id="admin_add_subscriber",
    response_model=SubscriberOut,
    dependencies=[Depends(json_body)],
    responses=errors.responses(
        errors.ListNotFound,
        errors.Conflict,
        errors.AddressBlocked,
        errors.BadRequest,
        errors.NotJson,
        errors.CompressedBody,
    ),
)
async def add_subscriber(
    slug: UrlText,
    body: AddSubscriberRequest,
    database: DatabaseDep,
    settings: SettingsDep,
    who: WriterDep,
) -> SubscriberOut:
    """Add a subscriber: `invite` sends the double opt-in mail; `confirmed` records a
    consent given elsewhere, with mandatory evidence (409 for an erased address)."""
    proof = None
    if body.evidence is not None:
        proof = operators.ConsentProof(
            source=body.evidence.source,
            note=body.evidence.note,
            consented_at=body.evidence.consented_at,
            consent_version=body.evidence.consent_version,
        )
    address = _address(body.email, where=("body", "email"), new=True)
    refusal = backends.refusal(settings.backend_of(slug), address.email)
    if refusal is not None:
        raise RequestValidationError(
            [{"loc": ("body", "email"), "msg": refusal, "type": "value_error"}]
        )
    row = await audited(
        database, who, action=f"subscriber.add.{body.mode}", target=f"{slug}:{body.email}",
        work=operators.add_subscriber, list_slug=slug, address=address,
        mode=operators.AddMode(body.mode), locale=body.locale, attributes=body.attributes,
        proof=proof, actor=who.name, key=settings.token_key(), now=utcnow(),
        resend_interval=settings.resend_interval,
    )  # fmt: skip
    return subscriber_out(row)


@router.post(
    "/lists/{slug}/subscribers/{email:mailbox}/unsubscribe",
    operation_id="admin_unsubscribe_subscriber",
    response_model=SubscriberOut,
    dependencies=[Depends(json_body)],
    responses=errors.responses(
        errors.ListNotFound, errors.NotFound, errors.NotJson, errors.CompressedBody
    ),
)
async def unsubscribe_subscriber(
    slug: UrlText,
    email: EmailPath,
    body: OperatorUnsubscribeRequest,
    database: DatabaseDep,
    who: WriterDep,
) -> SubscriberOut:
    """Unsubscribe with a reason (in the ledger); the backend is told. No goodbye mail is
    sent. Idempotent for an address already unsubscribed."""
    row = await audited(
        database, who, action="subscriber.unsubscribe", target=f"{slug}:{email}",
        work=operators.unsubscribe, list_slug=slug,
        address=_address(email, where=("path", "email"), new=False), reason=body.reason,
        actor=who.name, now=utcnow(),
    )  # fmt: skip
    return subscriber_out(row)


# People (data protection) -----------------------------------------------------------------


@router.get("/people/{email:mailbox}", operation_id="admin_get_person", response_model=PersonOut)
async def get_person(
    email: EmailPath, database: DatabaseDep, settings: SettingsDep, who: CallerDep
) -> PersonOut:
    """Everything held about an address across lists: subscriptions with their consent
    ledger, mails and backend jobs with every attempt, and audit events naming it."""
    address = _address(email, where=("path", "email"), new=False)
    record = await audited(
        database, who, action="person.read", target=address.key,
        work=operators.person_record, address=address, key=settings.token_key(),
    )  # fmt: skip
    return person_out(record)


def person_out(record: operators.PersonRecord) -> PersonOut:
    return PersonOut(
        email=record.email_key,
        erased=record.erased,
        subscriptions=[
            PersonSubscription(list=slug, **subscriber_detail(item).model_dump())
            for slug, item in record.subscriptions
        ],
        address_jobs=jobs_with_attempts(record.address_jobs, record.address_attempts),
        erased_ledger=[
            PersonEventOut(
                list=slug,
                **ConsentEventOut.model_validate(event, from_attributes=True).model_dump(),
            )
            for slug, event in record.erased_events
        ],
        audit=[AuditOut.model_validate(row, from_attributes=True) for row in record.audit],
    )


@router.delete(
    "/people/{email:mailbox}",
    operation_id="admin_erase_person",
    response_model=ErasureOut,
)
async def erase_person(
    email: EmailPath, database: DatabaseDep, settings: SettingsDep, who: WriterDep
) -> ErasureOut:
    """Erase an address from every list: subscriptions, tokens and queued mails go, ledger
    events keep only a keyed hash, each backend gets a removal, a tombstone refuses later
    additions without the person's own opt-in. Idempotent: an unknown address answers 200
    with zero counts (and gets its tombstone)."""
    address = _address(email, where=("path", "email"), new=False)
    key = settings.token_key()
    report = await audited(
        database, who, action="person.erase",
        target=privacy.address_hash(address.key, key=key),
        work=operators.erase, address=address, key=key,
        backend_lists={item.slug for item in settings.lists}, now=utcnow(),
    )  # fmt: skip
    return ErasureOut(**dataclasses.asdict(report))
