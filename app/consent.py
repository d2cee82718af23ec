"""The consent wording a visitor is shown: what a subscription's ledger version refers to."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

from app import db, errors
from app.config import Locale
from app.i18n import Translator
from app.models import ConsentEvent, ConsentWording, MailingList, Subscription
from app.schemas import MAX_ROW_ID


def wording(*, list_name: str, locale: Locale, overrides: Mapping[Locale, str]) -> str:
    """The list's own wording in `locale` if the operators wrote one, else the catalogue's."""
    text = overrides.get(locale)
    if text is not None:
        return text.replace("{list}", list_name)
    return Translator(locale)("consent.text", list=list_name)


# Stored wordings ---------------------------------------------------------------------------
#
# A ledger event names the consent version shown; `consent_wording` keeps the text each
# version stood for, per list and language, from the first time it was seen. The text of a
# version is never rewritten: a changed wording under an unchanged version is refused
# (`ConsentWordingChanged`), at start for a declared list, with 409 through the API.


def record(
    session: Session,
    *,
    mailing_list: MailingList,
    overrides: Mapping[Locale, str],
    now: datetime,
) -> int:
    """Store the list's current wording in every language; how many rows were new.

    Raises ConsentWordingChanged when a stored text of this version differs.
    """
    assert mailing_list.id is not None
    texts = {
        locale.value: wording(list_name=mailing_list.name, locale=locale, overrides=overrides)
        for locale in Locale
    }
    # Processes starting together (serve --workers N, the API and the worker) record the
    # same rows: the loser of the race must neither fail nor write, only compare.
    insert = db.dialect_insert(session)
    added = 0
    for locale, text in texts.items():
        statement = (
            insert(ConsentWording)
            .values(
                list_id=mailing_list.id,
                version=mailing_list.consent_version,
                locale=locale,
                text=text,
                first_recorded_at=now,
            )
            .on_conflict_do_nothing(index_elements=["list_id", "version", "locale"])
            .returning(col(ConsentWording.id))
        )
        added += session.connection().execute(statement).first() is not None
    stored = session.exec(
        select(ConsentWording.locale, ConsentWording.text).where(
            ConsentWording.list_id == mailing_list.id,
            ConsentWording.version == mailing_list.consent_version,
        )
    ).all()
    for locale, text in sorted(stored):
        if locale in texts and text != texts[locale]:
            # An operator who only renamed the list is told why that changed the wording.
            renamed = mailing_list.name in texts[locale] and mailing_list.name not in text
            raise errors.ConsentWordingChanged(
                f"The consent wording of list {mailing_list.slug!r} in {locale!r} "
                f"changed while its consent_version stayed {mailing_list.consent_version!r}"
                f"{' (it names the list, whose name changed)' if renamed else ''}. "
                "Give the new wording a new consent_version: the consent ledger refers to "
                "the version, and the text recorded for it must stay what people were shown."
            )
    return added


def stored_wordings(
    session: Session, *, list_id: int, versions: Iterable[str], locale: str
) -> dict[str, ConsentWording]:
    """The recorded texts of these versions in this language, by version."""
    rows = session.exec(
        select(ConsentWording).where(
            ConsentWording.list_id == list_id,
            col(ConsentWording.version).in_(set(versions)),
            ConsentWording.locale == locale,
        )
    ).all()
    return {row.version: row for row in rows}


# Proof of consent ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Proof:
    """What answers "show us this person's consent": the subscription, its ledger, and
    the text of every consent version it names, in the subscription's language."""

    list_slug: str
    list_name: str
    subscription: Subscription
    events: list[ConsentEvent]
    # By version; None for a version recorded before wordings were kept (or never declared
    # here: an operator's import citing an outside version).
    wordings: dict[str, ConsentWording | None]


def proof(session: Session, *, subscription: Subscription) -> Proof:
    mailing_list = session.get(MailingList, subscription.list_id)
    assert mailing_list is not None
    events = list(
        session.exec(
            select(ConsentEvent)
            .where(ConsentEvent.subscription_id == subscription.id)
            .order_by(col(ConsentEvent.occurred_at), col(ConsentEvent.id))
        ).all()
    )
    versions = [
        version
        for event in events
        # The hosted form's page may have shown another version than the list's of the day.
        for version in (event.consent_version, _shown_version(event))
        if version
    ] + [subscription.consent_version]
    found = stored_wordings(
        session, list_id=subscription.list_id, versions=versions, locale=subscription.locale
    )
    return Proof(
        list_slug=mailing_list.slug,
        list_name=mailing_list.name,
        subscription=subscription,
        events=events,
        wordings={version: found.get(version) for version in dict.fromkeys(versions)},
    )


def _shown_version(event: ConsentEvent) -> str | None:
    shown = event.detail.get("consent_version_shown")
    # A NUL cannot be looked up on PostgreSQL (a query's text holds none); such a value,
    # recorded from a hand-made form post, names no version anyway.
    return shown if isinstance(shown, str) and "\x00" not in shown else None


def proof_by_id(session: Session, *, subscription_id: int) -> Proof:
    # An id beyond any row's is not looked up: PostgreSQL would refuse it (out of range).
    subscription = (
        session.get(Subscription, subscription_id) if 1 <= subscription_id <= MAX_ROW_ID else None
    )
    if subscription is None:
        raise errors.NotFound("No subscriber has this id.")
    return proof(session, subscription=subscription)


def proof_by_address(session: Session, *, list_slug: str, email_key: str) -> Proof:
    # Not `lists.get`: app.lists records wordings through this module.
    mailing_list = session.exec(select(MailingList).where(MailingList.slug == list_slug)).first()
    if mailing_list is None:
        raise errors.ListNotFound()
    subscription = session.exec(
        select(Subscription).where(
            Subscription.list_id == mailing_list.id, Subscription.email_key == email_key
        )
    ).first()
    if subscription is None:
        raise errors.NotFound("No subscriber with this address on this list.")
    return proof(session, subscription=subscription)


def render_text(item: Proof, *, generated_at: datetime) -> str:
    """The printable form (plain text, UTF-8), for a letter to a data-protection authority."""
    sub = item.subscription
    lines = [
        f"Proof of consent - list {item.list_name} ({item.list_slug})",
        f"Generated at {generated_at.isoformat()}",
        "",
        f"Address:          {sub.email}",
        f"Subscriber id:    {sub.id}",
        f"Current status:   {sub.status}",
        f"Language:         {sub.locale}",
        f"Consent version:  {sub.consent_version}",
        f"Created at:       {sub.created_at.isoformat()}",
        f"Confirmed at:     {sub.confirmed_at.isoformat() if sub.confirmed_at else '-'}",
        f"Unsubscribed at:  {sub.unsubscribed_at.isoformat() if sub.unsubscribed_at else '-'}",
        "",
        "Consent ledger (oldest first):",
    ]
    for n, event in enumerate(item.events, start=1):
        lines += [
            "",
            f"  {n}. {event.action} at {event.occurred_at.isoformat()} -> {event.status_after}",
            f"     source: {event.source}" + (f" ({event.source_url})" if event.source_url else ""),
            f"     IP address: {event.ip or '(not kept)'}",
            f"     user agent: {event.user_agent or '(not kept)'}",
            f"     consent version: {event.consent_version}",
        ]
        if event.detail:
            details = ", ".join(f"{name}={value}" for name, value in sorted(event.detail.items()))
            lines.append(f"     detail: {details}")
    lines += ["", f"Consent wording shown, in {sub.locale}:"]
    for version, row in item.wordings.items():
        lines.append("")
        if row is None:
            lines.append(f"  version {version}: no text recorded for this version")
            continue
        lines.append(f"  version {version} (recorded since {row.first_recorded_at.isoformat()}):")
        lines.append(f'  "{row.text}"')
    return "\n".join(lines) + "\n"
