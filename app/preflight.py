"""`newsletter check`: reach each thing the settings name, once, before a deployment relies
on it. A wrong relay password or list address otherwise shows only later, as failed jobs.

Nothing is sent, and nothing is written but what a start writes anyway:
- the database: connected to, and its schema's revision read (an SQLite file not there yet
  is left uncreated; its folder is made, as the start would, and must be writable);
- the secret key: given, or its file (NEWSLETTER_SECRET_KEY_FILE) read, or, not there yet,
  left unmade (a check run by another user would own it) with its folder made as the start
  would, and writable: a file the start cannot make stops it;
- Redis, when the rate-limit counters live there: PING;
- the mail relay: connected to, TLS and login as configured, then QUIT with no mail (the
  development mailer: its folder, made if need be as the first mail would, takes a file,
  removed at once);
- each list's backend: its first page of members read, the call `reconcile` starts with,
  which needs the address, the credentials and the list to be right; a Mailgun list without
  its webhook signing key is said, as its webhooks are refused until it is set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from app import db, migrations
from app.config import MailgunBackendSettings, Settings


@dataclass(frozen=True, slots=True)
class Outcome:
    part: str
    ok: bool
    detail: str


def run(settings: Settings) -> Iterator[Outcome]:
    """The outcomes one after the other, each as soon as it is known."""
    yield database(settings)
    yield secret_key(settings)
    yield redis(settings)
    yield mailer(settings)
    yield from backends(settings)


def database(settings: Settings) -> Outcome:
    url = sa.engine.make_url(settings.database_url)
    where = db.shown_url(settings.database_url)
    file = url.database if url.get_backend_name() == "sqlite" else None
    if file and file != ":memory:" and not Path(file).exists():
        problem = _folder_problem(Path(file).parent)
        if problem is not None:
            return Outcome("database", False, f"{where}: {problem}")
        if settings.auto_migrate:
            return Outcome("database", True, f"{where}: not there yet, made at start")
        return Outcome(
            "database",
            False,
            f"{where}: no such file, and NEWSLETTER_AUTO_MIGRATE is off: run `newsletter migrate`",
        )
    engine = db.make_engine(settings.database_url)
    try:
        db.ping(engine)
        current = migrations.current_revision(engine)
    except sa.exc.DBAPIError as e:
        where, reason = db.unreachable(settings.database_url, e)
        return Outcome("database", False, f"{where}: unreachable: {reason}")
    finally:
        engine.dispose()
    head = migrations.head_revision()
    if current == head:
        return Outcome("database", True, f"{where}: schema at {current}, this release's")
    at = f"schema at {current}" if current is not None else "no schema yet"
    if current is not None and not migrations.known(current):
        return Outcome(
            "database",
            False,
            f"{where}: {at}, which this release does not know (a later release migrated it)",
        )
    if settings.auto_migrate:
        return Outcome("database", True, f"{where}: {at}, migrated to {head} at start")
    return Outcome(
        "database",
        False,
        f"{where}: {at}, this release needs {head}: run `newsletter migrate`",
    )


def secret_key(settings: Settings) -> Outcome:
    if settings.secret_key is not None:
        return Outcome("secret key", True, "given in NEWSLETTER_SECRET_KEY")
    path = settings.secret_key_file.resolve()
    where = f"{path} (NEWSLETTER_SECRET_KEY_FILE)"
    if path.exists():
        # Read, and held to the key's rule, as the settings were loaded.
        return Outcome("secret key", True, f"{where}: read")
    problem = _folder_problem(path.parent)
    if problem is not None:
        return Outcome(
            "secret key",
            False,
            f"{where}: not there, and {problem}; make the file, or give NEWSLETTER_SECRET_KEY",
        )
    return Outcome("secret key", True, f"{where}: not there yet, made at start")


def _folder_problem(folder: Path) -> str | None:
    """Make the folder of a file the start makes, as the start does before it makes the
    file; what stops that file being made there, if anything."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"its folder {folder} cannot be made: {e.strerror}"
    if not os.access(folder, os.W_OK):
        return f"its folder {folder} is not writable by this user"
    return None


def redis(settings: Settings) -> Outcome:
    if settings.redis_url is None:
        return Outcome("redis", True, "not set: each process keeps its own rate-limit counters")
    import redis as redis_py

    client = redis_py.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=5)
    reached = client.get_connection_kwargs()
    where = reached.get("path") or f"{reached.get('host')}:{reached.get('port')}"
    try:
        client.ping()
    except redis_py.RedisError as e:
        return Outcome("redis", False, f"{where}: {type(e).__name__}: {e}")
    finally:
        client.close()
    return Outcome("redis", True, f"{where}: answered PING")


def mailer(settings: Settings) -> Outcome:
    from app.mailer import MailError, make_mailer

    try:
        detail = make_mailer(settings.mailer, public_host=settings.public_url.host).check()
    except MailError as e:
        return Outcome("mail relay", False, str(e))
    return Outcome("mail relay", True, detail)


def backends(settings: Settings) -> Iterator[Outcome]:
    from app import backends
    from app.backends.base import SyncError

    client = backends.make_client(
        connect_timeout=settings.backend_connect_timeout, timeout=settings.backend_timeout
    )
    try:
        for declared in settings.lists:
            part = f"list {declared.slug}"
            kind = declared.backend.kind
            if kind == "none":
                yield Outcome(part, True, "no mailing-list backend (kind none): nothing to reach")
                continue
            try:
                page = backends.make_backend(declared.backend, client).members()
            except SyncError as e:
                answer = f" ({e.response})" if e.response else ""
                # The backends' messages mostly name themselves ("listmonk: list members:
                # ..."), which read "listmonk: listmonk: ..." here.
                said = str(e) if str(e).startswith(kind) else f"{kind}: {e}"
                yield Outcome(part, False, f"{said}{answer}")
                continue
            more = ", more follow" if page.next_cursor is not None else ""
            if isinstance(declared.backend, MailgunBackendSettings) and (
                declared.backend.webhook_signing_key is None
            ):
                # Not a failure: the webhooks may be switched later (docs/production.md §10).
                more += "; no webhook_signing_key: Mailgun's webhooks get 503 until it is set"
            yield Outcome(
                part, True, f"{kind}: read {len(page.members)} members on the first page{more}"
            )
    finally:
        client.close()
