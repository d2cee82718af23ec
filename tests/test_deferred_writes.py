"""Rows written at the commit (db.defer_inserts): in a group commit, the ledger events,
confirmation tokens and outbox jobs of the batch are written at its end. What a request
stores, and what later requests of the same batch see, must be as if each had been
written at once."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session, col, select

from app import addresses, db, errors, lists, subscriptions, tokens, transfer
from app.models import (
    BlockedEntry,
    BlockKind,
    ConsentEvent,
    JobKind,
    JobState,
    OutboxJob,
    Subscription,
    Token,
    TokenPurpose,
    utcnow,
)
from app.writer import GroupWriter
from tests.conftest import SECRET

KEY = SECRET.encode()
EVIDENCE = subscriptions.Evidence(source="form", ip="192.0.2.7", user_agent="Firefox/140")


@pytest.fixture(autouse=True)
def _list(engine: sa.Engine) -> None:
    with db.session_scope(engine) as session:
        lists.create(
            session, slug="bluehats", name="BlueHats", default_locale="fr", consent_version="1",
            confirm_ttl_seconds=3600, thank_you_url=None, landing_url=None, declared=[],
            now=utcnow(),
        )  # fmt: skip


def _subscribe(session: Session, *, email: str, interval: timedelta = timedelta(0)) -> str:
    subscriptions.subscribe(
        session,
        list_slug="bluehats",
        address=addresses.parse(email, new=True),
        locale=None,
        fallback_locale=None,
        attributes={},
        evidence=EVIDENCE,
        key=KEY,
        now=utcnow(),
        resend_interval=interval,
    )
    return email


def _subscribe_now(engine: sa.Engine, email: str) -> None:
    with db.session_scope(engine) as session:
        _subscribe(session, email=email)


def _subscribe_then_refuse(session: Session, *, email: str) -> str:
    _subscribe(session, email=email)
    raise errors.TokenUsed()


def _confirm(session: Session, *, secret: str) -> str:
    subscriptions.confirm(session, secret=secret, evidence=EVIDENCE, key=KEY, now=utcnow())
    return "confirmed"


def _unsubscribe(session: Session, *, secret: str) -> str:
    subscriptions.unsubscribe(
        session, secret=secret, evidence=EVIDENCE, now=utcnow(), send_goodbye=False
    )
    return "unsubscribed"


def _in_one_batch(
    engine: sa.Engine, calls: list[tuple[Any, dict[str, Any]]], *, commits: int = 2
) -> list[Any]:
    """Run `calls` in one batch of one writer thread, in order (held behind a first unit
    until all are queued); their results or errors. `commits`: the engine's, all told
    (by default the gate's, then one for the batch)."""
    entered, release = threading.Event(), threading.Event()

    def gate(session: Session) -> None:
        entered.set()
        assert release.wait(10)

    async def run(writer: GroupWriter) -> list[Any]:
        first = asyncio.ensure_future(writer.run(gate))
        await asyncio.to_thread(entered.wait, 10)
        tasks = [asyncio.ensure_future(writer.run(work, **kwargs)) for work, kwargs in calls]
        await asyncio.sleep(0.05)
        release.set()
        await first
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    committed: list[object] = []

    def count(connection: object) -> None:
        committed.append(connection)

    sa.event.listen(engine, "commit", count)
    writer = GroupWriter(engine, threads=1)
    try:
        results = asyncio.run(run(writer))
    finally:
        writer.stop()
        sa.event.remove(engine, "commit", count)
    assert len(committed) == commits
    return results


def _subscription(session: Session, email: str) -> Subscription:
    return session.exec(select(Subscription).where(Subscription.email_key == email)).one()


def _block(session: Session, email: str) -> None:
    session.add(
        BlockedEntry(
            kind=BlockKind.ADDRESS,
            value=email,
            reason="test",
            created_at=utcnow(),
            created_by="test",
        )
    )


def _tokens(session: Session, subscription: Subscription, purpose: TokenPurpose) -> list[Token]:
    return list(
        session.exec(
            select(Token).where(Token.subscription_id == subscription.id, Token.purpose == purpose)
        ).all()
    )


def _secret(engine: sa.Engine, email: str, purpose: TokenPurpose) -> str:
    with Session(engine) as session:
        subscription = _subscription(session, email)
        assert subscription.id is not None
        token = tokens.live(session, subscription_id=subscription.id, purpose=purpose)
        assert token is not None
        return tokens.secret_for(token, key=KEY)


def test_each_sign_up_of_a_batch_keeps_its_link_mail_and_ledger_event_and_a_refused_one_none(
    engine: sa.Engine,
) -> None:
    emails = ["a@example.org", "refused@example.org", "b@example.org", "c@example.org"]
    results = _in_one_batch(
        engine,
        [
            (
                _subscribe_then_refuse if email.startswith("refused") else _subscribe,
                {"email": email},
            )
            for email in emails
        ],
    )
    assert isinstance(results[1], errors.TokenUsed)
    assert [r for n, r in enumerate(results) if n != 1] == [
        "a@example.org",
        "b@example.org",
        "c@example.org",
    ]

    with Session(engine) as session:
        stored = session.exec(select(Subscription)).all()
        assert sorted(s.email_key for s in stored) == [
            "a@example.org",
            "b@example.org",
            "c@example.org",
        ]
        for subscription in stored:
            links = session.exec(
                select(Token).where(Token.subscription_id == subscription.id)
            ).all()
            assert [t.purpose for t in links] == [TokenPurpose.CONFIRM]
            assert links[0].expires_at is not None
            assert links[0].used_at is None
            jobs = session.exec(
                select(OutboxJob).where(OutboxJob.subscription_id == subscription.id)
            ).all()
            assert [(j.kind, j.payload["mail"], j.payload["token_id"]) for j in jobs] == [
                (JobKind.MAIL, "confirm", str(links[0].id))
            ]
            events = session.exec(
                select(ConsentEvent).where(ConsentEvent.subscription_id == subscription.id)
            ).all()
            assert [(e.action, e.status_after, e.ip) for e in events] == [
                ("subscribe_requested", "pending", "192.0.2.7")
            ]
        # Nothing of the refused one: no row without its subscription either.
        assert session.exec(select(sa.func.count()).select_from(Token)).one() == 3
        assert session.exec(select(sa.func.count()).select_from(OutboxJob)).one() == 3
        assert session.exec(select(sa.func.count()).select_from(ConsentEvent)).one() == 3


def test_a_link_sent_earlier_in_the_batch_is_retired_by_a_confirmation_after_it(
    engine: sa.Engine,
) -> None:
    with db.session_scope(engine) as session:
        _subscribe(session, email="ada@example.org")
    first_link = _secret(engine, "ada@example.org", TokenPurpose.CONFIRM)

    results = _in_one_batch(
        engine,
        [
            (_subscribe, {"email": "ada@example.org"}),  # a new link, mailed
            (_confirm, {"secret": first_link}),
        ],
    )
    assert results == ["ada@example.org", "confirmed"]

    with Session(engine) as session:
        subscription = _subscription(session, "ada@example.org")
        assert subscription.status == "confirmed"
        links = _tokens(session, subscription, TokenPurpose.CONFIRM)
        assert len(links) == 2
        # Confirming retired every other link, the one asked for in the same batch too.
        assert all(link.used_at is not None for link in links)


def test_a_confirmation_and_an_opt_out_in_one_batch_keep_their_order_and_make_one_sync(
    engine: sa.Engine,
) -> None:
    # Ada left once (so her standing opt-out link exists) and asked again.
    with db.session_scope(engine) as session:
        _subscribe(session, email="ada@example.org")
    with db.session_scope(engine) as session:
        _confirm(session, secret=_secret(engine, "ada@example.org", TokenPurpose.CONFIRM))
    opt_out = _secret(engine, "ada@example.org", TokenPurpose.UNSUBSCRIBE)
    with db.session_scope(engine) as session:
        _unsubscribe(session, secret=opt_out)
    with db.session_scope(engine) as session:
        _subscribe(session, email="ada@example.org")
        # The earlier syncs ran: the batch's two must merge with each other.
        session.execute(sa.update(OutboxJob).values(state=JobState.DONE))
    link = _secret(engine, "ada@example.org", TokenPurpose.CONFIRM)

    results = _in_one_batch(
        engine, [(_confirm, {"secret": link}), (_unsubscribe, {"secret": opt_out})]
    )
    assert results == ["confirmed", "unsubscribed"]

    with Session(engine) as session:
        subscription = _subscription(session, "ada@example.org")
        assert subscription.status == "unsubscribed"
        events = session.exec(
            select(ConsentEvent)
            .where(ConsentEvent.subscription_id == subscription.id)
            .order_by(col(ConsentEvent.id))
        ).all()
        assert [e.action for e in events] == [
            "subscribe_requested",
            "confirmed",
            "unsubscribed",
            "subscribe_requested",
            "confirmed",
            "unsubscribed",
        ]
        syncs = session.exec(
            select(OutboxJob).where(
                OutboxJob.kind == JobKind.SYNC, OutboxJob.state == JobState.PENDING
            )
        ).all()
        # One job for both, carrying the confirmation's "fresh opt-in" (she had left before).
        assert [(j.dedupe_key, j.payload["fresh_opt_in"]) for j in syncs] == [
            (f"sync:{subscription.id}", True)
        ]


def test_confirmations_in_one_batch_and_a_request_after_one_share_its_opt_out_link(
    engine: sa.Engine,
) -> None:
    for email in ("a@example.org", "b@example.org"):
        with db.session_scope(engine) as session:
            _subscribe(session, email=email)
    links = {
        e: _secret(engine, e, TokenPurpose.CONFIRM) for e in ("a@example.org", "b@example.org")
    }

    results = _in_one_batch(
        engine,
        [
            (_confirm, {"secret": links["b@example.org"]}),
            (_confirm, {"secret": links["a@example.org"]}),
            # "Already subscribed": its mail carries the opt-out link made just before.
            (_subscribe, {"email": "a@example.org"}),
        ],
    )
    assert results == ["confirmed", "confirmed", "a@example.org"]

    with Session(engine) as session:
        for email in ("a@example.org", "b@example.org"):
            subscription = _subscription(session, email)
            assert subscription.status == "confirmed"
            opt_outs = _tokens(session, subscription, TokenPurpose.UNSUBSCRIBE)
            assert len(opt_outs) == 1
            assert opt_outs[0].expires_at is None
            links_of = _tokens(session, subscription, TokenPurpose.CONFIRM)
            assert len(links_of) == 1
            jobs = session.exec(
                select(OutboxJob)
                .where(OutboxJob.subscription_id == subscription.id)
                .order_by(col(OutboxJob.id))
            ).all()
            kinds = [(j.kind, j.payload.get("mail"), j.payload.get("token_id")) for j in jobs]
            expected = [(JobKind.MAIL, "confirm", str(links_of[0].id)), (JobKind.SYNC, None, None)]
            if email == "a@example.org":
                expected.append((JobKind.MAIL, "already_subscribed", str(opt_outs[0].id)))
            assert kinds == expected


def test_requests_that_mail_nothing_in_a_batch_leave_nothing_of_their_rehearsal(
    engine: sa.Engine,
) -> None:
    with db.session_scope(engine) as session:
        _block(session, "blocked@example.org")
    hour = timedelta(hours=1)
    results = _in_one_batch(
        engine,
        [
            (_subscribe, {"email": "a@example.org", "interval": hour}),
            (_subscribe, {"email": "blocked@example.org", "interval": hour}),
            # Mailed a moment ago: no second mail, the same work rehearsed.
            (_subscribe, {"email": "a@example.org", "interval": hour}),
        ],
    )
    assert results == ["a@example.org", "blocked@example.org", "a@example.org"]

    with Session(engine) as session:
        assert [s.email_key for s in session.exec(select(Subscription)).all()] == ["a@example.org"]
        assert session.exec(select(sa.func.count()).select_from(Token)).one() == 1
        jobs = session.exec(select(OutboxJob)).all()
        assert [(j.kind, j.payload["mail"]) for j in jobs] == [(JobKind.MAIL, "confirm")]
        events = session.exec(select(ConsentEvent).order_by(col(ConsentEvent.id))).all()
        assert [(e.action, e.status_after, e.subscription_id is None) for e in events] == [
            ("subscribe_requested", "pending", False),
            ("subscribe_requested", "blocked", True),
            ("subscribe_requested", "pending", False),
        ]


def test_a_blocked_request_after_a_confirmation_in_the_batch_leaves_its_opt_out_link(
    engine: sa.Engine,
) -> None:
    # Pending, then blocked: a block never changes an existing subscription.
    with db.session_scope(engine) as session:
        _subscribe(session, email="ada@example.org")
        _block(session, "ada@example.org")
    link = _secret(engine, "ada@example.org", TokenPurpose.CONFIRM)

    # The blocked request rehearses an "already subscribed" mail, whose opt-out link is
    # the one the confirmation before it made: written inside the rehearsal, then undone.
    results = _in_one_batch(
        engine, [(_confirm, {"secret": link}), (_subscribe, {"email": "ada@example.org"})]
    )
    assert results == ["confirmed", "ada@example.org"]

    with Session(engine) as session:
        subscription = _subscription(session, "ada@example.org")
        assert subscription.status == "confirmed"
        opt_outs = _tokens(session, subscription, TokenPurpose.UNSUBSCRIBE)
        assert len(opt_outs) == 1
        jobs = session.exec(select(OutboxJob).order_by(col(OutboxJob.id))).all()
        assert [(j.kind, j.payload.get("mail")) for j in jobs] == [
            (JobKind.MAIL, "confirm"),
            (JobKind.SYNC, None),
        ]
        events = session.exec(select(ConsentEvent).order_by(col(ConsentEvent.id))).all()
        assert [(e.action, e.status_after) for e in events] == [
            ("subscribe_requested", "pending"),
            ("confirmed", "confirmed"),
            ("subscribe_requested", "blocked"),
        ]


def test_undoing_a_savepoint_forgets_its_rows_and_has_those_it_wrote_wait_again() -> None:
    events = db.Prepared(sa.insert(ConsentEvent.__table__))  # type: ignore[attr-defined]
    table = events.table
    assert table is not None
    deferred = db.Deferred()
    deferred.add(events, {"subscription_id": 1, "n": 1})
    deferred.add(events, {"subscription_id": 2, "n": 2})
    mark = deferred.mark()
    deferred.add(events, {"subscription_id": 1, "n": 3})
    # A reader inside the savepoint writes subscription 1's rows, the earlier one included.
    taken = deferred.take(table, 1)
    assert [row["n"] for row in taken[events]] == [1, 3]
    assert not deferred.any_waiting(table, 1)

    deferred.undo(mark)  # the rollback took both back; the savepoint's own row is gone

    assert deferred.any_waiting(table, 1)
    assert [row["n"] for row in deferred.take(None, None)[events]] == [1, 2]
    assert not deferred.any_waiting(None, None)


def _link_for_nobody(session: Session, *, email: str) -> str:
    # A row the database refuses (no such subscription), found only when written.
    tokens.insert(
        session,
        subscription_id=999_999,
        purpose=TokenPurpose.CONFIRM,
        key=KEY,
        now=utcnow(),
        ttl=timedelta(hours=1),
        later=True,
    )
    return email


def test_a_row_refused_at_the_commit_fails_its_own_request_and_the_others_are_stored(
    engine: sa.Engine,
) -> None:
    results = _in_one_batch(
        engine,
        [
            (_subscribe, {"email": "a@example.org"}),
            (_link_for_nobody, {"email": "nobody@example.org"}),
            (_subscribe, {"email": "b@example.org"}),
        ],
        # The gate's; the batch's failed, then each request ran alone: two stored.
        commits=3,
    )

    assert results[0] == "a@example.org"
    assert isinstance(results[1], sa.exc.IntegrityError)
    assert results[2] == "b@example.org"
    with Session(engine) as session:
        stored = session.exec(select(Subscription)).all()
        assert sorted(s.email_key for s in stored) == ["a@example.org", "b@example.org"]
        for subscription in stored:
            assert len(_tokens(session, subscription, TokenPurpose.CONFIRM)) == 1
        assert session.exec(select(sa.func.count()).select_from(Token)).one() == 2
        assert session.exec(select(sa.func.count()).select_from(ConsentEvent)).one() == 2


class TestImportedRowsInOnePipeline:
    """An import's batch writes its subscriptions, ledger events and sync jobs as one short
    statement run for each row (app/transfer.py), not one statement holding every row."""

    def _rows(self, *emails: str) -> list[transfer.ImportRow]:
        return [
            transfer.ImportRow(
                line=line,
                address=addresses.parse(email, new=True),
                locale=None,
                attributes={"org": f"org {line}"},
                consent_source="Paper form",
                consent_date="2025-03-12",
            )
            for line, email in enumerate(emails, start=2)
        ]

    def test_only_new_addresses_are_created_each_with_its_event_and_job(
        self, engine: sa.Engine
    ) -> None:
        _subscribe_now(engine, "there@example.org")
        with db.session_scope(engine) as session:
            info = transfer._list_info(session, slug="bluehats")
            rows = self._rows("first@example.org", "there@example.org", "second@example.org")
            created = transfer._insert_confirmed(
                session, rows=rows, mailing_list=info, operator="op", note=None, now=utcnow()
            )
        # The address already there (signed up meanwhile) is left as it is.
        assert created == 2
        with Session(engine) as session:
            made = {
                s.email: s
                for s in session.exec(
                    select(Subscription).where(Subscription.status == "confirmed")
                )
            }
            assert sorted(made) == ["first@example.org", "second@example.org"]
            assert made["second@example.org"].attributes == {"org": "org 4"}
            for subscription in made.values():
                [event] = session.exec(
                    select(ConsentEvent).where(ConsentEvent.subscription_id == subscription.id)
                ).all()
                assert (event.action, event.detail["operator"]) == ("imported", "op")
                [job] = session.exec(
                    select(OutboxJob).where(OutboxJob.subscription_id == subscription.id)
                ).all()
                assert (job.kind, job.state) == (JobKind.SYNC, JobState.PENDING)
            pending = session.exec(
                select(Subscription).where(Subscription.email == "there@example.org")
            ).one()
            assert pending.status == "pending"
