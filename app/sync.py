"""Keeping each backend's membership equal to this service's confirmed set.

Three ways in, one way out:
- sync jobs (outbox): written with every confirm, unsubscribe, erasure and backend event;
  the worker plans them against the subscriptions' *current* state, groups additions into
  bulk calls of the backend's `max_batch`, and records one outcome per job;
- `reconcile()`: compares the whole list with the backend and, when asked, enqueues fixes;
- `import_members()`: takes over an existing backend list, keeping its members' state,
  with their provenance in the consent ledger; `settle_import()` then reads the list again
  and records who left it while the import ran, before any of them is synced.
Adapters are called outside any database transaction.
"""

from __future__ import annotations

import contextlib
import logging
import unicodedata
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Executor, wait
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlmodel import Session, SQLModel, col, select

from app import addresses, blocklist, forms, lists, logs, outbox, tokens
from app.backends.base import (
    ListBackend,
    Member,
    MembersPage,
    PermanentSyncError,
    RetryableSyncError,
    SyncError,
)
from app.config import FormField, Settings
from app.models import (
    ConsentAction,
    ConsentEvent,
    JobKind,
    JobState,
    OutboxJob,
    Subscription,
    SubscriptionStatus,
    TokenPurpose,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class Action(StrEnum):
    ADD = "add"
    UNSUBSCRIBE = "unsubscribe"
    REMOVE = "remove"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Planned:
    job: outbox.ClaimedJob
    action: Action
    list_slug: str = ""
    # As the backend gets it: `addresses.deliverable`, the domain in ASCII (`xn--`).
    address: str = ""
    member: Member | None = None
    fresh_opt_in: bool = False
    subscription_id: int | None = None
    reason: str = ""
    # Set when an older job about the same address, outside the round, is not finished
    # (see `_older_unfinished`): this one is given back, due again at that time.
    waits_until: datetime | None = None


@dataclass(slots=True)
class Result:
    response: str | None = None
    error: SyncError | None = None
    # Suppressions cleared at the backend for a fresh opt-in (recorded in the ledger).
    cleared: str | None = None


def address_job_payload(
    *, list_id: int, address: str, action: Action, as_held: bool = False
) -> dict[str, Any]:
    """A sync job about an address with no subscription row (erased, or unknown here), or
    about a backend's own spelling of one. `as_held`: `address` is the spelling the backend
    holds (a reconciliation's fix), sent as it is; otherwise it is a stored address, sent
    as this service sends it (`addresses.deliverable`)."""
    payload = {"list_id": list_id, "address": address, "action": action.value}
    if as_held:
        payload["as_held"] = True
    return payload


def address_job_key(*, list_id: int, address: str) -> str:
    """Jobs about one address on one list run one at a time, in order. The key folds the
    case and composes accents (NFC, as stored addresses are), so that a backend's
    decomposed spelling of an address shares the key of its stored form."""
    return f"sync-address:{list_id}:{unicodedata.normalize('NFC', address).casefold()}"


def enqueue_address_job(
    session: Session,
    *,
    list_id: int,
    address: str,
    action: Action,
    now: datetime,
    as_held: bool = False,
) -> None:
    outbox.enqueue(
        session,
        kind=JobKind.SYNC,
        payload=address_job_payload(
            list_id=list_id, address=address, action=action, as_held=as_held
        ),
        now=now,
        dedupe_key=address_job_key(list_id=list_id, address=address),
    )


def _target(address: str) -> str:
    """One member at a backend, whichever of its spellings a call carries: the ASCII form
    of its domain, accents composed, case folded."""
    return unicodedata.normalize("NFC", addresses.deliverable(address)).casefold()


def in_turn(planned: Sequence[Planned]) -> tuple[list[Planned], list[Planned]]:
    """The round's calls, one per address at a list, and those that wait for the next round.

    Two jobs may concern one address (an erasure's removal, then a new subscription's
    addition: their queue keys differ), and a round makes its additions before its
    removals: the later request would be undone. So the oldest job of each address goes
    now, and the others once it is done, in the order they were asked for. A job that
    waits for an older one outside the round (`Planned.waits_until`) holds back the newer
    ones of the round about its address too.
    """
    now: list[Planned] = []
    later: list[Planned] = []
    seen: set[tuple[str, str]] = set()
    for item in sorted(planned, key=lambda item: item.job.id):
        if item.action == Action.SKIP or not item.address:
            now.append(item)
            continue
        target = (item.list_slug, _target(item.address))
        (later if target in seen or item.waits_until is not None else now).append(item)
        seen.add(target)
    return now, later


_jobs = SQLModel.metadata.tables["outbox_job"]
# Answered by the index on (dedupe_key, state).
_UNFINISHED_WITH_KEYS = sa.select(
    _jobs.c.id, _jobs.c.dedupe_key, _jobs.c.state, _jobs.c.next_attempt_at, _jobs.c.lease_until
).where(
    _jobs.c.dedupe_key.in_(sa.bindparam("keys", expanding=True)),
    _jobs.c.state.in_([JobState.PENDING.value, JobState.RUNNING.value]),
)


def address_job_keys(*, list_id: int, address: str) -> set[str]:
    """The address job keys (`address_job_key`) a job about `address` may go by: its
    spellings as stored (an internationalized domain in Unicode: an erasure's removal) and
    as a backend holds it (a reconciliation's fix: mostly in ASCII); the key folds the case
    and composes accents."""
    spellings = {address, addresses.deliverable(address)}
    with contextlib.suppress(addresses.InvalidAddress):
        spellings.add(addresses.parse(address, new=False).email)
    return {address_job_key(list_id=list_id, address=spelling) for spelling in spellings}


def _older_unfinished(
    session: Session, *, keys: dict[int, set[str]], round_ids: set[int]
) -> dict[int, datetime]:
    """The round's jobs (id -> the address job keys of their address) that an older job
    about the same address, not in the round, has yet to precede: when that job is due
    again (the latest of them, if several), in one query for the whole round.

    A retried removal must not land after a newer addition of the same address: the
    person who came back would be a member here and not at the backend. Only jobs keyed
    by address are looked for: a subscription's own jobs share one key (they run one at
    a time and each pushes the state of the moment), and an erasure takes the jobs of the
    subscriptions it deletes out of the queue, or keeps its removal behind the running ones.
    A dead job does not hold anyone back; a running one holds until its lease ends.
    """
    wanted = set().union(*keys.values()) if keys else set()
    if not wanted:
        return {}
    by_key: dict[str, list[tuple[int, datetime]]] = {}
    for row in session.connection().execute(_UNFINISHED_WITH_KEYS, {"keys": sorted(wanted)}):
        if row.id in round_ids:
            continue  # `in_turn` orders the round's own jobs
        running = row.state == JobState.RUNNING and row.lease_until is not None
        due = row.lease_until if running else row.next_attempt_at
        by_key.setdefault(row.dedupe_key, []).append((row.id, due))
    waits: dict[int, datetime] = {}
    for job_id, job_keys in keys.items():
        older = [due for key in job_keys for other, due in by_key.get(key, []) if other < job_id]
        if older:
            waits[job_id] = max(older)
    return waits


_subscriptions = SQLModel.metadata.tables["subscription"]
_tokens = SQLModel.metadata.tables["token"]
_lists = SQLModel.metadata.tables["mailing_list"]
_PLAN_SUBSCRIPTIONS = sa.select(
    _subscriptions.c.id,
    _subscriptions.c.list_id,
    _subscriptions.c.email,
    _subscriptions.c.status,
    _subscriptions.c.locale,
    _subscriptions.c.attributes,
).where(_subscriptions.c.id.in_(sa.bindparam("ids", expanding=True)))
_LIST_SLUGS = sa.select(_lists.c.id, _lists.c.slug)
_UNSUBSCRIBE_TOKENS = sa.select(_tokens.c.subscription_id, _tokens.c.id).where(
    _tokens.c.subscription_id.in_(sa.bindparam("ids", expanding=True)),
    _tokens.c.purpose == TokenPurpose.UNSUBSCRIBE.value,
    _tokens.c.used_at.is_(None),
)


def plan(
    session: Session, jobs: Sequence[outbox.ClaimedJob], *, settings: Settings, key: bytes
) -> list[Planned]:
    """What each job must do now, from the subscriptions' current state (latest wins), and
    whether it waits for an older job about its address (`Planned.waits_until`)."""
    subscription_ids = [
        job.payload["subscription_id"] for job in jobs if "subscription_id" in job.payload
    ]
    connection = session.connection()
    # Rows, not entities: the plan reads six columns and writes none back, and loading
    # whole entities into the identity map cost a third of the plan's time.
    by_id: dict[int, Any] = {
        row.id: row for row in connection.execute(_PLAN_SUBSCRIPTIONS, {"ids": subscription_ids})
    }
    slugs: dict[int, str] = {row.id: row.slug for row in connection.execute(_LIST_SLUGS)}
    unsubscribe_tokens: dict[int, uuid.UUID] = {}
    for subscription_id, token_id in connection.execute(
        _UNSUBSCRIBE_TOKENS, {"ids": subscription_ids}
    ):
        unsubscribe_tokens.setdefault(subscription_id, token_id)
    # Confirmed subscribers without an unsubscribe link yet (imported ones): one each, all
    # in one statement.
    lacking: dict[int, datetime] = {}
    for job in jobs:
        subscription = by_id.get(job.payload.get("subscription_id", -1))
        if (
            subscription is not None
            and subscription.status == SubscriptionStatus.CONFIRMED
            and subscription.id not in unsubscribe_tokens
        ):
            lacking[subscription.id] = job.created_at
    unsubscribe_tokens |= tokens.insert_many(
        session, created=lacking, purpose=TokenPurpose.UNSUBSCRIBE, key=key
    )

    planned = []
    # The address job keys each job's address may go by, for `_older_unfinished`.
    keys: dict[int, set[str]] = {}
    for job in jobs:
        list_id = job.payload.get("list_id", -1)
        slug = slugs.get(list_id, "")
        if "address" in job.payload:
            held = str(job.payload["address"])
            planned.append(
                Planned(
                    job=job,
                    action=Action(job.payload["action"]),
                    list_slug=slug,
                    address=held if job.payload.get("as_held") else addresses.deliverable(held),
                )
            )
            keys[job.id] = address_job_keys(list_id=list_id, address=job.payload["address"])
            continue
        subscription = by_id.get(job.payload["subscription_id"])
        if subscription is None or not slug:
            planned.append(Planned(job=job, action=Action.SKIP, reason="subscription is gone"))
            continue
        status = SubscriptionStatus(subscription.status)
        # A stored address keeps an internationalized domain in Unicode; backends get its
        # ASCII form, the one every mail system takes (Mailman refuses the Unicode one).
        address = addresses.deliverable(subscription.email)
        if status != SubscriptionStatus.PENDING:
            keys[job.id] = address_job_keys(
                list_id=subscription.list_id, address=subscription.email
            )
        if status == SubscriptionStatus.CONFIRMED:
            secret = tokens.secret_for_id(unsubscribe_tokens[subscription.id], key=key)
            link = settings.public_link(f"/v1/unsubscribe/{secret}")
            attributes = {name: str(value) for name, value in subscription.attributes.items()}
            member = Member(
                email=address,
                locale=subscription.locale,
                unsubscribe_url=link,
                name=attributes.pop("name", None),
                attributes=attributes,
            )
            planned.append(
                Planned(
                    job=job,
                    action=Action.ADD,
                    list_slug=slug,
                    address=address,
                    member=member,
                    fresh_opt_in=bool(job.payload.get("fresh_opt_in")),
                    subscription_id=subscription.id,
                )
            )
        elif status == SubscriptionStatus.PENDING:
            planned.append(
                Planned(job=job, action=Action.SKIP, reason="pending: not a member anywhere")
            )
        else:
            planned.append(
                Planned(
                    job=job,
                    action=Action.UNSUBSCRIBE,
                    list_slug=slug,
                    address=address,
                    subscription_id=subscription.id,
                )
            )
    session.flush()
    waits = _older_unfinished(session, keys=keys, round_ids={job.id for job in jobs})
    return [
        replace(item, waits_until=waits[item.job.id]) if item.job.id in waits else item
        for item in planned
    ]


def _id(subscription: Subscription) -> int:
    assert subscription.id is not None
    return subscription.id


def _chunks(items: Sequence[Planned], size: int) -> Iterator[Sequence[Planned]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]


def execute(
    planned: Sequence[Planned],
    *,
    backend_for: Callable[[str], ListBackend | None],
    should_stop: Callable[[], bool] = lambda: False,
    pool: Executor | None = None,
) -> dict[int, Result]:
    """Call the backends; one Result per job id. Jobs left out were not started (stop).

    A backend without bulk calls (`max_batch` 1) gets its calls through `pool`, when one
    is given, as many at a time as the pool has threads: one task per address, so that
    the calls about one address keep their order (additions first, as below) while
    different addresses overlap. One call at a time would leave the backend idle while
    this side builds the next request and reads the answer.
    """
    results: dict[int, Result] = {}
    for item in planned:
        if item.action == Action.SKIP:
            results[item.job.id] = Result(response=f"skipped: {item.reason}")
    by_list: dict[str, list[Planned]] = {}
    for item in planned:
        if item.action != Action.SKIP:
            by_list.setdefault(item.list_slug, []).append(item)

    for slug, items in by_list.items():
        found = backend_for(slug)
        if found is None:
            for item in items:
                results[item.job.id] = Result(
                    error=PermanentSyncError(f"list {slug!r} has no backend in the settings")
                )
            continue
        backend = _StopsAtRefusedCredentials(found)
        if pool is not None and backend.max_batch == 1:
            _execute_concurrently(backend, items, results, pool=pool, should_stop=should_stop)
            continue
        additions = [item for item in items if item.action == Action.ADD]
        for chunk in _chunks(additions, backend.max_batch):
            if should_stop():
                return results
            _add(backend, chunk, results)
        for item in items:
            if item.action == Action.ADD:
                continue
            if should_stop():
                return results
            results[item.job.id] = _leave(backend, item)
    return results


# The backend refusing our credentials (a revoked key or token, a removed permission): every
# other call of the round would get the same answer.
CREDENTIALS_REFUSED = frozenset({401, 403})


class _StopsAtRefusedCredentials:
    """A backend for one round: once it has refused the credentials, the round's other
    calls to it fail with that same error without being made (a backend without bulk calls
    cost one refused call per job, a thousand a round). Their jobs go the way the refused
    call's went; the next round asks again. Calls already under way in other threads end
    as they end."""

    def __init__(self, backend: ListBackend) -> None:
        self._backend = backend
        self.max_batch = backend.max_batch
        self.keeps_unsubscribed = backend.keeps_unsubscribed
        self._refused: SyncError | None = None

    def _call(self, call: Callable[[], _T]) -> _T:
        refused = self._refused
        if refused is not None:
            raise type(refused)(
                str(refused),
                response=refused.response,
                retry_after=refused.retry_after,
                status=refused.status,
            )
        try:
            return call()
        except SyncError as e:
            if e.status in CREDENTIALS_REFUSED:
                self._refused = e
            raise

    def add(self, members: Sequence[Member]) -> str:
        return self._call(lambda: self._backend.add(members))

    def unsubscribe(self, address: str) -> str:
        return self._call(lambda: self._backend.unsubscribe(address))

    def remove(self, address: str) -> str:
        return self._call(lambda: self._backend.remove(address))

    def members(self, cursor: str | None = None) -> MembersPage:
        return self._call(lambda: self._backend.members(cursor))

    def clear_suppression(self, address: str) -> str | None:
        return self._call(lambda: self._backend.clear_suppression(address))


def _execute_concurrently(
    backend: ListBackend,
    items: Sequence[Planned],
    results: dict[int, Result],
    *,
    pool: Executor,
    should_stop: Callable[[], bool],
) -> None:
    by_address: dict[str, list[Planned]] = {}
    for item in sorted(items, key=lambda item: item.action != Action.ADD):
        by_address.setdefault(_target(item.address), []).append(item)
    tasks = [
        pool.submit(_run_in_order, backend, calls, should_stop) for calls in by_address.values()
    ]
    # Every task ends before an error (a bug) leaves: no call outlives its round.
    wait(tasks)
    for task in tasks:
        # Cancelled: the worker stopped before the task began; its jobs are given back.
        with contextlib.suppress(CancelledError):
            results.update(task.result())


def _run_in_order(
    backend: ListBackend, items: Sequence[Planned], should_stop: Callable[[], bool]
) -> dict[int, Result]:
    """One address's calls, one after the other; stops before a call once asked to."""
    results: dict[int, Result] = {}
    for item in items:
        if should_stop():
            break
        if item.action == Action.ADD:
            _add(backend, [item], results)
            continue
        results[item.job.id] = _leave(backend, item)
    return results


def _leave(backend: ListBackend, item: Planned) -> Result:
    call = backend.unsubscribe if item.action == Action.UNSUBSCRIBE else backend.remove
    try:
        return Result(response=call(item.address))
    except SyncError as e:
        return Result(error=e)
    except Exception as e:
        return Result(error=_crashed(e))


def _crashed(e: Exception) -> RetryableSyncError:
    """What an adapter raised that it never should (a bug, an exception it let through),
    as its jobs' failure: they are retried, and dead-lettered in the end. Left to go up,
    it failed the whole round: no outcome recorded, every job of it left leased and taken
    again at each lease's end, never dead-lettered."""
    log.exception("sync.crashed error=%s", type(e).__name__, exc_info=e)
    return RetryableSyncError(f"internal error: {type(e).__name__}")


# The refusals of a bulk call that may be about one of its members (an address refused:
# 400 or 422; a body too large: 413), found by adding them one by one. Any other (401 a
# revoked key, 403, 404 no such list, a redirect, an answer that could not be read) is
# about the call: each member's own call would get it again, a thousand calls a round.
MEMBER_REFUSALS = frozenset({400, 413, 422})


def _add(backend: ListBackend, chunk: Sequence[Planned], results: dict[int, Result]) -> None:
    cleared: dict[int, str] = {}
    pending = []
    for item in chunk:
        if item.fresh_opt_in:
            try:
                found = backend.clear_suppression(item.address)
            except SyncError as e:
                results[item.job.id] = Result(error=e)
                continue
            except Exception as e:
                results[item.job.id] = Result(error=_crashed(e))
                continue
            if found:
                cleared[item.job.id] = found
        pending.append(item)
    if not pending:
        return
    members = [item.member for item in pending if item.member is not None]
    try:
        response = backend.add(members)
    except PermanentSyncError as e:
        if len(pending) == 1 or e.status not in MEMBER_REFUSALS:
            for item in pending:
                results[item.job.id] = Result(error=e, cleared=cleared.get(item.job.id))
            return
        # One bad address must not dead-letter its whole batch: find it one by one.
        log.warning(
            "sync.bulk_refused size=%d error=%s; retrying one by one",
            len(pending),
            # A backend's refusal may quote the addresses it did not like.
            logs.mask_addresses(str(e)),
        )
        for item in pending:
            _add(backend, [_without_fresh(item)], results)
            if item.job.id in cleared:
                results[item.job.id].cleared = cleared[item.job.id]
        return
    except SyncError as e:
        for item in pending:
            results[item.job.id] = Result(error=e, cleared=cleared.get(item.job.id))
        return
    except Exception as e:
        crashed = _crashed(e)
        for item in pending:
            results[item.job.id] = Result(error=crashed, cleared=cleared.get(item.job.id))
        return
    for item in pending:
        results[item.job.id] = Result(response=response, cleared=cleared.get(item.job.id))


def _without_fresh(item: Planned) -> Planned:
    return Planned(
        job=item.job,
        action=item.action,
        list_slug=item.list_slug,
        address=item.address,
        member=item.member,
        fresh_opt_in=False,
        subscription_id=item.subscription_id,
    )


def record_cleared(
    session: Session, *, planned: Sequence[Planned], results: dict[int, Result], now: datetime
) -> None:
    """Ledger entries for suppressions cleared at the backend on a fresh opt-in."""
    for item in planned:
        result = results.get(item.job.id)
        if result is None or not result.cleared or item.subscription_id is None:
            continue
        subscription = session.get(Subscription, item.subscription_id)
        if subscription is None:
            continue
        session.add(
            ConsentEvent(
                subscription_id=item.subscription_id,
                list_id=subscription.list_id,
                action=ConsentAction.BACKEND_EVENT,
                status_after=subscription.status,
                source="sync",
                consent_version=subscription.consent_version,
                detail={"event": "suppression_cleared", "cleared": result.cleared},
                occurred_at=now,
            )
        )


# Reconciliation -------------------------------------------------------------------------


@dataclass
class Report:
    list_slug: str
    backend_members: int = 0
    confirmed_here: int = 0
    # Confirmed here, absent at the backend: to add.
    missing: list[str] = field(default_factory=list)
    # Subscribed at the backend without a confirmed subscription here: to unsubscribe there.
    extra: list[str] = field(default_factory=list)
    # Confirmed here, unsubscribed at the backend: the opt-out there wins, recorded here.
    unsubscribed_there: list[str] = field(default_factory=list)
    # Confirmed here, absent from a backend that deletes members who leave (Mailman): they
    # may have left there. Not added back automatically: an operator checks each one.
    absent_there: list[str] = field(default_factory=list)
    # Subscribed at the backend, not a valid address here: left there as it is, for an
    # operator to check (it matches no subscription, so no consent can be shown for it).
    invalid: list[str] = field(default_factory=list)
    # Confirmed here and a member there, but mailed nothing: the backend turned their
    # delivery off (Mailman's bounce processing: `by_bounces`), address as held there ->
    # why. Not a difference to fix (the backend may enable them again, or remove them
    # after its warnings, which a later reconciliation reports as absent_there): counted
    # and named for the operator, not unsubscribed, and not counted against `in_sync`.
    delivery_disabled: dict[str, str] = field(default_factory=dict)
    applied: bool = False

    @property
    def in_sync(self) -> bool:
        return not (
            self.missing
            or self.extra
            or self.unsubscribed_there
            or self.absent_there
            or self.invalid
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "list": self.list_slug,
            "backend_members": self.backend_members,
            "confirmed_here": self.confirmed_here,
            "missing": self.missing,
            "extra": self.extra,
            "unsubscribed_there": self.unsubscribed_there,
            "absent_there": self.absent_there,
            "invalid": self.invalid,
            "delivery_disabled": self.delivery_disabled,
            "in_sync": self.in_sync,
            "applied": self.applied,
        }


def remote_key(address: str) -> str | None:
    """The identity of an address a backend holds, as a stored subscription's `email_key`
    (`jo@xn--exmple-cua.org`, `JO@EXÄMPLE.ORG` and `jo@exämple.org` are one); None for one
    not valid here, which this service leaves alone."""
    try:
        # Members the backend already holds: a look-alike among them is read as it is.
        return addresses.parse(address, new=False).key
    except addresses.InvalidAddress:
        return None


def read_backend(
    backend: ListBackend,
    *,
    progress: Callable[[int], None] | None = None,
    names: dict[str, str] | None = None,
    not_delivered: dict[str, str] | None = None,
    variables: dict[str, dict[str, Any]] | None = None,
) -> dict[str, tuple[str, bool]]:
    """Every member at the backend: identity (`remote_key`) -> (address, subscribed).

    An address not valid here is keyed by its case-folded form (`compare` reports it
    apart). Two spellings of one address (a domain in Unicode and in ASCII, say) are one
    member: a subscribed one is kept over an unsubscribed one, so no subscription there is
    hidden. `names`, when given, gets each member's display name where the backend holds
    one (Mailgun's `name`, Mailman's `display_name`, listmonk's `name`), by identity;
    `variables` each member's variables where it holds some (Mailgun's `vars`). Of two
    spellings, both are those of the member kept. `not_delivered`, when given, gets why
    the backend does not deliver to a subscribed member it holds
    (`RemoteMember.delivery_off`: Mailman's bounce processing), by the member's address
    as the backend holds it.
    """
    seen: dict[str, tuple[str, bool]] = {}
    cursor: str | None = None
    # A cursor given twice would be read for ever (a cache in front of the API that
    # ignores the query string answers every page with the first one).
    cursors: set[str] = set()
    while True:
        try:
            page = backend.members(cursor)
        except SyncError:
            raise
        except Exception as e:
            raise _crashed(e) from e
        for member in page.members:
            key = remote_key(member.email) or member.email.casefold()
            if key not in seen or (member.subscribed and not seen[key][1]):
                seen[key] = (member.email, member.subscribed)
            if not_delivered is not None and member.subscribed and member.delivery_off:
                not_delivered[member.email] = member.delivery_off
            if (
                names is not None
                and member.name
                and (key not in names or seen[key][0] == member.email)
            ):
                names[key] = member.name
            if (
                variables is not None
                and member.variables
                and (key not in variables or seen[key][0] == member.email)
            ):
                variables[key] = member.variables
        if progress is not None:
            progress(len(page.members))
        if page.next_cursor is None or not page.members:
            return seen
        if page.next_cursor in cursors:
            # The cursor may name a member (Mailgun's pivot): not in the message.
            raise PermanentSyncError(
                f"list members: the backend's paging does not advance: after "
                f"{len(cursors) + 1} pages it named a next page it had named before "
                "(a cache in front of its API?)"
            )
        cursors.add(page.next_cursor)
        cursor = page.next_cursor


def compare(
    session: Session,
    *,
    list_slug: str,
    remote: dict[str, tuple[str, bool]],
    keeps_unsubscribed: bool = True,
    read_since: datetime | None = None,
    not_delivered: dict[str, str] | None = None,
) -> Report:
    """The differences between this list and its backend (see `Report`).

    `keeps_unsubscribed` is the backend's: where it is False, a confirmed member absent
    there goes to `absent_there` rather than `missing`, as they may have left there;
    unless they cannot be there yet (their sync under way, as below) or this service gave
    up putting them there since their latest confirmation (a sync dead-lettered, none done
    since: an outage longer than the retries, credentials refused): never there to leave,
    they are `missing`, added by their sync or the fixes.

    A confirmation the backend cannot show yet, one whose sync job is not finished or made
    since the read began (`read_since`: its sync may have run after the page holding the
    member was read), is never `unsubscribed_there`: the backend's opt-out is older than
    the opt-in, and someone who left and came back would be recorded as gone again, their
    new consent undone. It is `missing` (to be added, as its sync does), and so is such a
    member absent from a backend that does not keep those who leave.

    `not_delivered` (from `read_backend`): a confirmed member held subscribed there whose
    delivery is off goes to `delivery_disabled`, with why.
    """
    mailing_list = lists.get(session, slug=list_slug)
    rows = session.exec(select(Subscription).where(Subscription.list_id == mailing_list.id)).all()
    here = {row.email_key: row.status for row in rows}
    on_the_way = _syncs_under_way(session, list_id=mailing_list.id)
    if read_since is not None:
        on_the_way |= {
            row.email_key
            for row in rows
            if row.confirmed_at is not None and row.confirmed_at >= read_since
        }
    report = Report(list_slug=list_slug, backend_members=len(remote))
    never_there = set() if keeps_unsubscribed else _given_up(session, list_id=mailing_list.id)
    for key, status in here.items():
        if status != SubscriptionStatus.CONFIRMED:
            continue
        report.confirmed_here += 1
        there = remote.get(key)
        if there is None:
            gone = not keeps_unsubscribed and key not in never_there and key not in on_the_way
            (report.absent_there if gone else report.missing).append(key)
        elif not there[1]:
            (report.missing if key in on_the_way else report.unsubscribed_there).append(key)
        elif not_delivered and there[0] in not_delivered:
            report.delivery_disabled[there[0]] = not_delivered[there[0]]
    for key, (address, subscribed) in remote.items():
        if subscribed and here.get(key) != SubscriptionStatus.CONFIRMED:
            (report.extra if remote_key(address) is not None else report.invalid).append(address)
    for part in (
        report.missing,
        report.extra,
        report.unsubscribed_there,
        report.absent_there,
        report.invalid,
    ):
        part.sort()
    report.delivery_disabled = dict(sorted(report.delivery_disabled.items()))
    return report


def _syncs_under_way(session: Session, *, list_id: int | None) -> set[str]:
    """The `email_key`s of the list's subscriptions with a sync job not finished."""
    query = (
        select(Subscription.email_key)
        .join(OutboxJob, col(OutboxJob.subscription_id) == col(Subscription.id))
        .where(
            Subscription.list_id == list_id,
            col(OutboxJob.kind) == JobKind.SYNC,
            col(OutboxJob.state).in_([JobState.PENDING, JobState.RUNNING]),
        )
    )
    return set(session.exec(query).all())


def _given_up(session: Session, *, list_id: int | None) -> set[str]:
    """The `email_key`s of the list's confirmed subscriptions whose sync was dead-lettered
    since their latest confirmation, and none done since: the backend never held them
    since that opt-in."""
    since = sa.and_(
        col(OutboxJob.subscription_id) == col(Subscription.id),
        col(OutboxJob.kind) == JobKind.SYNC,
        col(OutboxJob.finished_at) >= col(Subscription.confirmed_at),
    )
    query = (
        select(Subscription.email_key, OutboxJob.state)
        .join(OutboxJob, since)
        .where(
            Subscription.list_id == list_id,
            Subscription.status == SubscriptionStatus.CONFIRMED,
            col(OutboxJob.state).in_([JobState.DONE, JobState.DEAD]),
        )
        .distinct()
    )
    states: dict[str, set[str]] = {}
    for email_key, state in session.exec(query).all():
        states.setdefault(email_key, set()).add(state)
    return {email_key for email_key, seen in states.items() if seen == {JobState.DEAD}}


def apply(session: Session, *, report: Report, key: bytes, now: datetime) -> None:
    """Enqueue the fixes a report calls for (in the caller's transaction).

    A member the backend holds without a subscription here is unsubscribed there, unless
    its address was erased here (`key` finds the tombstone; an erasure's removal that was
    dead-lettered, say): then it is removed there, as the erasure asked, and the queue
    forgets the address once the backend has (`privacy.scrub_after_removal`), rather than
    keeping it at the backend, and in the job, for good.
    """
    from app import privacy, subscriptions  # privacy imports this module

    mailing_list = lists.get(session, slug=report.list_slug)
    assert mailing_list.id is not None
    rows = {
        row.email_key: row
        for row in session.exec(
            select(Subscription).where(Subscription.list_id == mailing_list.id)
        ).all()
    }
    for email_key in report.missing:
        outbox.enqueue_sync(
            session,
            subscription_id=_id(rows[email_key]),
            list_id=mailing_list.id,
            now=now,
            fresh_opt_in=False,
        )
    extra = {address: remote_key(address) for address in report.extra}
    strangers = [remote for remote in extra.values() if remote is not None and remote not in rows]
    erased = privacy.erased_among(session, keys=strangers, key=key)
    for address, remote in extra.items():
        row = rows.get(remote or "")
        # The subscription's own job reaches the member in this service's spelling; one the
        # backend holds in another (its domain in Unicode, say) is fixed in that spelling.
        if row is not None and addresses.deliverable(row.email).casefold() == address.casefold():
            outbox.enqueue_sync(
                session,
                subscription_id=_id(row),
                list_id=mailing_list.id,
                now=now,
                fresh_opt_in=False,
            )
        else:
            enqueue_address_job(
                session,
                list_id=mailing_list.id,
                address=address,
                action=Action.REMOVE if remote in erased else Action.UNSUBSCRIBE,
                now=now,
                as_held=True,
            )
    for email_key in report.unsubscribed_there:
        subscriptions.apply_backend_event(
            session,
            list_slug=report.list_slug,
            address=addresses.Address(email=rows[email_key].email, key=email_key),
            event="unsubscribed",
            evidence=subscriptions.Evidence(source="reconcile"),
            now=now,
            detail={"note": "unsubscribed at the backend, found by reconciliation"},
        )
    report.applied = True


# Dead jobs put to rest -------------------------------------------------------------------

_DEAD_SYNCS = sa.select(_jobs.c.id, _jobs.c.dedupe_key, _jobs.c.payload).where(
    _jobs.c.kind == JobKind.SYNC.value,
    _jobs.c.state == JobState.DEAD.value,
    _jobs.c.dedupe_key.in_(sa.bindparam("keys", expanding=True)),
)
_ALL_DEAD_SYNCS = sa.select(_jobs.c.id, _jobs.c.payload).where(
    _jobs.c.kind == JobKind.SYNC.value, _jobs.c.state == JobState.DEAD.value
)


def _queue_key(payload: dict[str, Any]) -> str | None:
    """The dedupe key a sync job went by (`outbox.enqueue_sync`, `enqueue_address_job`)."""
    if "subscription_id" in payload:
        return f"sync:{payload['subscription_id']}"
    if "address" in payload and "list_id" in payload:
        return address_job_key(list_id=int(payload["list_id"]), address=str(payload["address"]))
    return None


def _covers(done: Action, dead: str | None, *, by_address: bool) -> bool:
    """Whether a job done with `done` did what an older dead job of the same key (`dead`,
    its payload's action) had to. A subscription's jobs each push its state of the moment,
    so any of them does what the older ones had to; jobs about an address carry their
    action: a removal (an erasure) covers an unsubscription, not the other way round."""
    if not by_address:
        return done in (Action.ADD, Action.UNSUBSCRIBE)
    if dead == Action.UNSUBSCRIBE:
        return done in (Action.UNSUBSCRIBE, Action.REMOVE)
    return dead == Action.REMOVE and done == Action.REMOVE


def supersede_dead(session: Session, *, done: Sequence[Planned], worker: str, now: datetime) -> int:
    """Dead sync jobs that jobs done now have made needless (a reconciliation's fix, a
    retry, a new request about the same subscription or address): put to rest
    (`outbox.supersede`), so the failed jobs no longer ask an operator to act. Only older
    jobs of the same queue key, and only where the job done covers the dead one's work
    (`_covers`); a skipped job (nothing sent) covers nothing."""
    by_key: dict[str, list[Planned]] = {}
    for item in done:
        key = _queue_key(item.job.payload) if item.action != Action.SKIP else None
        if key is not None:
            by_key.setdefault(key, []).append(item)
    if not by_key:
        return 0
    reasons: dict[int, str] = {}
    for row in session.connection().execute(_DEAD_SYNCS, {"keys": sorted(by_key)}):
        payload = row.payload or {}
        for item in by_key[row.dedupe_key]:
            if item.job.id > row.id and _covers(
                item.action, payload.get("action"), by_address="address" in payload
            ):
                reasons[row.id] = (
                    f"superseded: job {item.job.id}, done at {now.isoformat()}, made the "
                    f"{item.action.value} this job could not"
                )
                break
    return outbox.supersede(session, reasons=reasons, worker=worker, now=now)


def settle_dead(
    session: Session,
    *,
    report: Report,
    remote: dict[str, tuple[str, bool]],
    worker: str,
    now: datetime,
) -> int:
    """After a reconciliation of `report.list_slug` (`remote`: the backend as read): its dead
    sync jobs whose work the backend shows done are put to rest (`outbox.supersede`);
    returns how many.

    The backend's roster shows membership only. So a job is put to rest here when its
    work was to take a member off and the backend does not hold them subscribed: a
    subscription's job while the subscription is not confirmed, a reconciliation's
    unsubscription of an address. A confirmed member held subscribed there is sent again
    (a sync, as its own would be: name, language, unsubscribe link, which the roster does
    not show), and its dead job is put to rest once that is done (`supersede_dead`); once
    only (a second dead sync stays for an operator, rather than one more each time). An
    erasure's removal never is here: the backend may keep the person beyond the list (a
    Mailman address record, a listmonk subscriber), only a removal done settles it.
    """
    mailing_list = lists.get(session, slug=report.list_slug)
    assert mailing_list.id is not None
    dead = [
        row
        for row in session.connection().execute(_ALL_DEAD_SYNCS)
        if (row.payload or {}).get("list_id") == mailing_list.id
    ]
    if not dead:
        return 0
    ids = [row.payload["subscription_id"] for row in dead if "subscription_id" in row.payload]
    by_id = {
        row.id: row
        for row in session.connection().execute(
            sa.select(
                _subscriptions.c.id, _subscriptions.c.status, _subscriptions.c.email_key
            ).where(_subscriptions.c.id.in_(ids))
        )
    }
    unsettled = set(report.missing) | set(report.unsubscribed_there) | set(report.absent_there)
    # A subscription with two dead syncs: sent again already, and that failed too; not
    # again at every reconciliation, for an operator to look at.
    dead_count: dict[int, int] = {}
    for subscription_id in ids:
        dead_count[subscription_id] = dead_count.get(subscription_id, 0) + 1
    reasons: dict[int, str] = {}
    resent: set[int] = set()
    said = f"superseded: the reconciliation of {now.isoformat()} found"
    for row in dead:
        payload = row.payload
        if "subscription_id" in payload:
            subscription = by_id.get(payload["subscription_id"])
            if subscription is None:
                continue  # erased: the erasure took care of its jobs
            key = subscription.email_key
            there = remote.get(key)
            held = there is not None and there[1]
            if subscription.status != SubscriptionStatus.CONFIRMED and not held:
                reasons[row.id] = (
                    f"{said} the member not subscribed at the backend, as this service has "
                    f"them ({subscription.status})"
                )
            elif (
                subscription.status == SubscriptionStatus.CONFIRMED
                and held
                and key not in unsettled
                and dead_count[subscription.id] == 1
                and subscription.id not in resent
            ):
                outbox.enqueue_sync(
                    session,
                    subscription_id=subscription.id,
                    list_id=mailing_list.id,
                    now=now,
                    fresh_opt_in=False,
                )
                resent.add(subscription.id)
        elif payload.get("action") == Action.UNSUBSCRIBE and "address" in payload:
            address = str(payload["address"])
            there = remote.get(remote_key(address) or address.casefold())
            if there is None or not there[1]:
                reasons[row.id] = f"{said} the address not subscribed at the backend"
    return outbox.supersede(session, reasons=reasons, worker=worker, now=now)


# Import ----------------------------------------------------------------------------------


@dataclass
class ImportReport:
    list_slug: str
    read: int = 0
    confirmed: int = 0
    unsubscribed: int = 0
    already_known: int = 0
    invalid: list[str] = field(default_factory=list)
    # Not taken over: erased at their owner's request (only their own opt-in brings them
    # back), or on the block-list, as a CSV import refuses them.
    erased: int = 0
    blocked: int = 0
    # The subscriptions imported as confirmed (id -> address), for `settle_import`.
    confirmed_addresses: dict[int, addresses.Address] = field(default_factory=dict)
    # Of those, how many had left the backend by its second read (`settle_import`).
    departed: int = 0
    # The members' variables (Mailgun's `vars`) not kept, by name: how many members had
    # each. `undeclared`: the list declares no field of that name; `refused`: a value that
    # its field refuses as the form would (too long, not a URL...), or that is not text.
    variables_undeclared: Counter[str] = field(default_factory=Counter)
    variables_refused: Counter[str] = field(default_factory=Counter)
    # Display names that the form would refuse (too long, a control character): left out.
    names_refused: int = 0

    def variables_not_kept(self) -> dict[str, dict[str, int]]:
        """What the audit log keeps: the variables' names, no value."""
        return {
            "undeclared": dict(sorted(self.variables_undeclared.items())),
            "refused": dict(sorted(self.variables_refused.items())),
        }


# How long the syncs of members imported as confirmed wait for `settle_import` to release
# them, should it never run (the second read failed, the command was killed).
IMPORT_HOLD = timedelta(hours=1)


def import_members(
    session: Session,
    *,
    list_slug: str,
    remote: dict[str, tuple[str, bool]],
    backend_kind: str,
    key: bytes,
    now: datetime,
    names: dict[str, str] | None = None,
    variables: dict[str, dict[str, Any]] | None = None,
    fields: Sequence[FormField] = (),
) -> ImportReport:
    """Record the backend's members as they are: subscribed -> confirmed, else unsubscribed.

    The ledger says where each came from ("imported from mailgun on 2026-11-28"), so a
    list can move to this service without asking its members to opt in again. Addresses
    already known here are left as they are. Confirmed imports get a sync job, which gives
    the backend each member's personal unsubscribe URL. An address erased here (`key`
    finds its tombstone) or on the block-list is not taken over. A member's display name
    (`names`, from `read_backend`) is kept as the attribute `name`, as a CSV import keeps
    its `name` column, and goes back to the backend with each sync. Its `variables`
    (Mailgun's `vars`) go into the attributes of the list's declared `fields`, checked as
    the form checks them; the others are counted by name in the report, not dropped
    without a word (see `_imported_attributes`).
    """
    from app import privacy  # which imports this module

    mailing_list = lists.get(session, slug=list_slug)
    assert mailing_list.id is not None
    known = set(
        session.exec(
            select(Subscription.email_key).where(Subscription.list_id == mailing_list.id)
        ).all()
    )
    report = ImportReport(list_slug=list_slug, read=len(remote))
    provenance = f"imported from {backend_kind} on {now.date().isoformat()}"
    # These people agreed to whatever the former service showed them, not to this list's
    # wording: the ledger must not name a version they never saw, or the proof of consent
    # would print its text as "shown". An outside version has no recorded text, and the
    # proof says so.
    outside_version = f"imported from {backend_kind}"
    members: list[tuple[addresses.Address, bool]] = []
    for address, subscribed in remote.values():
        try:
            # Members the backend already holds: a look-alike among them is imported as it is.
            members.append((addresses.parse(address, new=False), subscribed))
        except addresses.InvalidAddress:
            report.invalid.append(address)
    keys = [parsed.key for parsed, _ in members]
    erased = privacy.erased_among(session, keys=keys, key=key)
    blocked = blocklist.blocked_among(session, email_keys=keys)
    for parsed, subscribed in members:
        if parsed.key in known:
            report.already_known += 1
            continue
        if parsed.key in erased:
            report.erased += 1
            continue
        if parsed.key in blocked:
            report.blocked += 1
            continue
        known.add(parsed.key)
        status = SubscriptionStatus.CONFIRMED if subscribed else SubscriptionStatus.UNSUBSCRIBED
        subscription = Subscription(
            list_id=mailing_list.id,
            email=parsed.email,
            email_key=parsed.key,
            email_ascii_key=parsed.ascii_key,
            status=status,
            locale=mailing_list.default_locale,
            attributes=_imported_attributes(
                parsed,
                name=(names or {}).get(parsed.key),
                variables=(variables or {}).get(parsed.key, {}),
                fields=fields,
                report=report,
            ),
            consent_version=outside_version,
            created_at=now,
            updated_at=now,
            confirmed_at=now if subscribed else None,
            unsubscribed_at=None if subscribed else now,
        )
        session.add(subscription)
        session.flush()
        session.add(
            ConsentEvent(
                subscription_id=_id(subscription),
                list_id=mailing_list.id,
                action=ConsentAction.IMPORTED,
                status_after=status,
                source="import",
                consent_version=outside_version,
                detail={"provenance": provenance, "backend": backend_kind},
                occurred_at=now,
            )
        )
        if subscribed:
            report.confirmed += 1
            report.confirmed_addresses[_id(subscription)] = parsed
        else:
            report.unsubscribed += 1
    # A confirmed member's sync makes it subscribed at the backend (the unsubscribe URL
    # travels with an add). Someone who left the backend after the read above would be
    # subscribed again; a webhook about them found no one here then. So the syncs wait
    # for `settle_import`.
    outbox.enqueue_new_syncs(
        session,
        subscription_ids=list(report.confirmed_addresses),
        list_id=mailing_list.id,
        now=now,
        delay=IMPORT_HOLD,
    )
    return report


def _imported_attributes(
    address: addresses.Address,
    *,
    name: str | None,
    variables: dict[str, Any],
    fields: Sequence[FormField],
    report: ImportReport,
) -> dict[str, str]:
    """A member's attributes: its display name as `name` (its variable `name` when it has
    none), and its variables' values for the list's declared fields; each checked as the
    form checks that field (trimmed, a blank one no value), a name the list does not
    declare within the API's limits for an attribute. Anything not kept (a value refused,
    a variable of no declared field) is counted in `report` by the variable's name.

    A display name that is only the address's local part is none: listmonk requires a name,
    and writes that one when none is given.
    """
    declared = {field.name: field for field in fields}
    kept: dict[str, str] = {}
    shown = (name or "").strip()
    if shown == address.email.rpartition("@")[0]:
        shown = ""
    if shown:
        if _refused(declared.get("name"), shown):
            report.names_refused += 1
        else:
            kept["name"] = shown
    for variable, value in variables.items():
        text = value.strip() if isinstance(value, str) else None
        if text == "":
            continue  # no value, nothing lost
        if variable == "name" and shown:
            # The member's display name is their name: another one here is not kept.
            if text != shown:
                report.variables_refused[variable] += 1
        elif variable not in declared and variable != "name":
            report.variables_undeclared[variable] += 1
        elif text is None or _refused(declared.get(variable), text):
            report.variables_refused[variable] += 1
        else:
            kept[variable] = text
    return kept


def _refused(field: FormField | None, value: str) -> bool:
    """Whether the form refuses `value` for `field`; without one (a name the list does not
    declare), whether the API refuses it as an attribute."""
    from app import schemas  # which imports modules importing this one

    if field is not None:
        return forms.problem(field, value) is not None
    try:
        schemas.clean_attributes({"name": value})
    except ValueError:
        return True
    return False


def settle_import(
    session: Session,
    *,
    report: ImportReport,
    remote: dict[str, tuple[str, bool]],
    now: datetime,
) -> None:
    """After the import's commit, with the backend read again (`remote`): each member
    imported as confirmed who is no longer subscribed there (unsubscribed, or gone) has
    left while the import ran, and is recorded so, as its webhook would have been; then
    the imported members' syncs are released.

    Once the import is committed, a webhook finds the member here and its unsubscribe
    waits with the sync it merges into; this second read catches those whose webhook came
    before (and was about no one here) or never came.
    """
    from app import subscriptions  # which imports this module

    departed = [
        address
        for address in report.confirmed_addresses.values()
        if not remote.get(address.key, ("", False))[1]
    ]
    for address in departed:
        subscriptions.apply_backend_event(
            session,
            list_slug=report.list_slug,
            address=address,
            event="unsubscribed",
            evidence=subscriptions.Evidence(source="import"),
            now=now,
            detail={"note": "left the backend while the import ran"},
        )
    report.departed = len(departed)
    outbox.release_syncs(session, subscription_ids=list(report.confirmed_addresses), now=now)
