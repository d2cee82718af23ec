"""`newsletter ...`: run the service (serve, worker, migrate) and operate it (subscribers,
people, imports and exports, the outbox's jobs, keys, the block-list, retention). Exit
codes: 0 done, 1 refused, 2 bad settings or input, 3 differences or failures found,
4 database unreachable, 5 schema not this release's."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperGroup

from app.config import (
    DEFAULT_CONSENT_VERSION,
    Locale,
    Settings,
    SettingsError,
    error_message,
    load_settings,
)

if TYPE_CHECKING:
    from rich.progress import Progress, ProgressColumn

# Exit codes common to every command (each command's own are in its help and the README):
# 2 bad settings or bad input; 4 the database does not answer; 5 its schema is not this
# release's (run `newsletter migrate`).
EXIT_USAGE = 2
EXIT_DATABASE_UNREACHABLE = 4
EXIT_SCHEMA_NOT_AT_HEAD = 5
# As a shell reports a command ended by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130
# The admin API's limits (app.admin.MAX_PAGE and MAX_PREFIX, app.schemas.MAX_ROW_ID and
# CONFIRM_TTL_BOUNDS; a test holds them equal), written out: importing those modules would
# slow every command's start.
MAX_PAGE = 500
MAX_PREFIX = 254
MAX_ROW_ID = 2**31 - 1
CONFIRM_TTL_HOURS = (1, 30 * 24)


def _stopped(message: str) -> None:
    """What stops a command, one line on stderr; a line of the log where the log is JSON
    (NEWSLETTER_LOG_FORMAT=json): a collector reading the stderr of `serve` or `worker`
    takes one object a line, and a start refused was the one line it could not read."""
    if _log_is_json():
        logging.getLogger("app.cli").error("cli.stopped %s", message)
    else:
        typer.echo(message, err=True)


def _log_is_json() -> bool:
    """The log is JSON, or is to be, by the environment, the settings not yet read (or
    refused for another of their values)."""
    from app import logs

    root = logging.getLogger()
    if any(isinstance(handler.formatter, logs.JsonFormatter) for handler in root.handlers):
        return True
    if root.handlers or os.environ.get("NEWSLETTER_LOG_FORMAT", "").strip().lower() != "json":
        return False
    logs.configure(level="INFO", fmt="json", stream=sys.stderr)
    return True


class _Commands(TyperGroup):
    """Every command runs through here: a database that does not answer, or whose schema is
    not at head, ends it with one line on stderr and its exit code, not a traceback. Any
    other failure is a bug and keeps its traceback."""

    def invoke(self, ctx: Any) -> Any:  # typer's own click Context, private to it
        try:
            return super().invoke(ctx)
        except SettingsError as e:
            # Found after the start (the key file made at first use): as at the start.
            _stopped(str(e))
            raise typer.Exit(EXIT_USAGE) from None
        except Exception as e:
            problem = _database_problem(e)
            if problem is None:
                raise
            message, code = problem
            _stopped(message)
            raise typer.Exit(code) from None


# A bug's traceback shows no local variables: typer's default showed them in earlier
# releases that pyproject allows (0.12 on), and a command's locals hold the settings, whose
# database URL carries its password in clear.
cli = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help=__doc__,
    cls=_Commands,
    pretty_exceptions_show_locals=False,
)


def _database_problem(error: Exception) -> tuple[str, int] | None:
    """The message and exit code for a database an operator must fix; None for another error."""
    from sqlalchemy import exc

    from app import migrations

    if isinstance(error, migrations.SchemaNotAtHead):
        return str(error), EXIT_SCHEMA_NOT_AT_HEAD
    if not isinstance(error, exc.DBAPIError):
        return None
    # The command loaded them already (SettingsError ended it otherwise).
    settings = load_settings()
    if error.statement is None or error.connection_invalidated:
        # Failed to connect (no statement was sent), or the connection was lost.
        return _unreachable(settings.database_url, error), EXIT_DATABASE_UNREACHABLE
    # A statement failed: a missing table or column is a schema behind (or ahead of) this
    # release; with the schema at head, it is a bug.
    from app import db

    engine = db.make_engine(settings.database_url)
    try:
        migrations.require_head(engine)
    except migrations.SchemaNotAtHead as e:
        return str(e), EXIT_SCHEMA_NOT_AT_HEAD
    except exc.DBAPIError as e:
        return _unreachable(settings.database_url, e), EXIT_DATABASE_UNREACHABLE
    finally:
        engine.dispose()
    return None


def _unreachable(database_url: str, error: Any) -> str:
    from app import db

    where, reason = db.unreachable(database_url, error)
    return f"database unreachable at {where}: {reason}"


def _progress(*columns: ProgressColumn | str) -> Progress:
    """A progress bar on stderr (stdout may carry an export), drawn on a terminal only:
    elsewhere rich draws nothing but still ends it with an empty line, after the command's
    one line. rich is imported by the commands that show one, not by `serve` and `worker`,
    which would keep it for good."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    return Progress(*columns, console=console, transient=True, disable=not console.is_terminal)


def _settings() -> Settings:
    try:
        settings = load_settings()
    except SettingsError as e:
        _stopped(str(e))
        raise typer.Exit(EXIT_USAGE) from e
    from app import logs

    logs.configure(level=settings.log_level, fmt=settings.log_format, stream=sys.stderr)
    return settings


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Serve the API (with the outbox worker inside unless NEWSLETTER_RUN_WORKER=false)."""
    import uvicorn

    settings = _settings()
    # The key file of the embedded default, made now if need be (SettingsError if it
    # cannot be), rather than by the app's start inside uvicorn, which printed a traceback.
    settings.token_key()
    _schema_at_head(settings)
    _can_listen(host, port, option="--port", host_option="--host")
    # A log line (JSON when asked), and the database by kind only, named as `app.started`
    # names it: its URL may hold a password.
    logging.getLogger("app.cli").info(
        "serve.starting url=http://%s:%d database=%s workers=%d public_url=%s",
        f"[{host}]" if ":" in host else host,
        port,
        "sqlite" if settings.is_sqlite else "postgresql",
        workers,
        settings.public_link(""),
    )
    if _loopback_for_others(settings, host=host):
        # The Dockerfile's `serve --host 0.0.0.0`, NEWSLETTER_PUBLIC_URL left out: every
        # confirm link mailed led to the subscriber's own machine, without a word.
        logging.getLogger("app.cli").warning(
            "serve.public_url_loopback public_url=%s host=%s: the mails' links and the pages' "
            "forms lead to this machine's loopback, which no visitor reaches; set "
            "NEWSLETTER_PUBLIC_URL to the address visitors use",
            settings.public_link(""),
            host,
        )
    elif _elsewhere_on_this_host(settings, port=port):
        # `newsletter serve --port 8001` in development, the default public URL left as is:
        # the pages would post their forms to, and the mails link to, another server.
        logging.getLogger("app.cli").warning(
            "serve.public_url_elsewhere public_url=%s port=%d: the pages' forms and the mails' "
            "links lead there; set NEWSLETTER_PUBLIC_URL (or use make run PORT=%d)",
            settings.public_link(""),
            port,
            port,
        )
    uvicorn.run(
        # Sets up logging in each process (uvicorn's own config is off: one format for all).
        "app.main:serve_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        proxy_headers=False,
        # uvicorn's HTTP/1.1 with deadlines on clients that send slowly or not at all.
        http="app.httpserver:DeadlineHttp",
        # No WebSocket route: no WebSocket library loaded.
        ws="none",
        log_level=settings.log_level.lower(),
        log_config=None,
        # SIGTERM: stop accepting, let requests in flight finish (this long at most), then
        # the lifespan stops the worker, which finishes its jobs in hand and gives back the rest.
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout.total_seconds())),
    )


def _can_listen(host: str, port: int, *, option: str, host_option: str) -> None:
    """Exit 2 with one line when nothing can listen on host:port (a port another server
    holds, an unknown host). Left to uvicorn, a port in use was one log line among others
    and exit code 3, after the in-process worker had started and sent mails; to the worker's
    metrics server, a traceback."""
    import errno
    import socket

    try:
        [(family, _, _, _, address), *_] = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As the servers bind: a port whose last connections linger in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        # A host that is not this machine's (no such name, an address of another machine)
        # is the host's fault; a port taken or reserved, the port's.
        wrong = option
        if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
            wrong = host_option
        _stopped(f"cannot listen on {host}:{port}: {e.strerror or e}; give another {wrong}")
        raise typer.Exit(EXIT_USAGE) from e


def _loopback(host: str | None) -> bool:
    return host in ("127.0.0.1", "localhost", "[::1]", "::1")


def _elsewhere_on_this_host(settings: Settings, *, port: int) -> bool:
    """The public URL names this machine (loopback) but another port than the one served."""
    url = settings.public_url
    return _loopback(url.host) and url.port != port


def _loopback_for_others(settings: Settings, *, host: str) -> bool:
    """The server listens for other machines (`0.0.0.0`, a network address) while the
    public URL, the base of every link mailed, names the loopback."""
    return _loopback(settings.public_url.host) and not _loopback(host)


def _schema_at_head(settings: Settings) -> None:
    """`newsletter migrate` in a child process when the schema is not at head and
    NEWSLETTER_AUTO_MIGRATE is on; SchemaNotAtHead when it is off. Checked here, before
    uvicorn, whose failed start would print the app's traceback.

    A child, because importing alembic and mako would keep ~10 MB in this long-running
    process for good; at head (every start but the first of a release) nothing is run.
    """
    import subprocess

    from app import db, migrations

    engine = db.make_engine(settings.database_url)
    try:
        pending = migrations.pending(engine)
        if pending and not settings.auto_migrate:
            migrations.require_head(engine)
    finally:
        engine.dispose()
    if pending:
        # Its one line on stdout ("database at 0009") is logged here as an event: printed as
        # it was, it was the one line of a JSON log (NEWSLETTER_LOG_FORMAT=json) that was
        # not JSON. Its log lines and its errors go to stderr as they are.
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", "migrate"], check=False, stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise typer.Exit(done.returncode)
        logging.getLogger("app.cli").info(
            "serve.migrated revision=%s", done.stdout.strip().removeprefix("database at ")
        )


@cli.command()
def worker(
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1, max=65535, help="Serve Prometheus metrics (attempts, outbox, ...) on this port."
        ),
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Address of the metrics port.")] = "127.0.0.1",
) -> None:
    """Run the outbox worker alone; SIGTERM finishes the jobs in hand and gives back the rest."""
    import threading

    from app import db, lists, migrations, runtime
    from app.mailer import make_mailer
    from app.metrics import Metrics
    from app.worker import Worker

    settings = _settings()
    log = logging.getLogger("app.worker")
    if metrics_port is not None:
        _can_listen(
            metrics_host, metrics_port, option="--metrics-port", host_option="--metrics-host"
        )
    engine = db.make_engine(settings.database_url)
    migrations.require_head(engine)
    settings.token_key()  # as `serve`: a key file that cannot be made stops it here
    lists.sync_declared(engine, declared=settings.lists)
    metrics = Metrics()
    if metrics_port is not None:
        from app import metrics as exposition

        metrics.watch_database(engine, heartbeat_timeout=settings.worker_heartbeat_timeout)
        exposition.serve(
            metrics.registry, host=metrics_host, port=metrics_port, token=settings.metrics_token
        )
        log.info("worker.metrics_listening address=%s:%d", metrics_host, metrics_port)
    runner = Worker(
        engine=engine,
        settings=settings,
        mailer=make_mailer(settings.mailer, public_host=settings.public_url.host),
        metrics=metrics,
    )
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        runner.request_stop()
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    runtime.settle()
    runner.start()
    # The loop runs in its thread; this one waits for a signal (or the loop's end).
    while not stop.wait(1.0):
        if not runner.running:
            break
    log.info("worker.stopping name=%s", runner.name)
    runner.stop(timeout=None)
    engine.dispose()


@cli.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Bring the schema to a revision: the latest by default, or an older one (downgrade).

    Exit 2 for a revision it cannot go to."""
    from app import db, migrations

    settings = _settings()
    engine = db.make_engine(settings.database_url)
    try:
        reached = migrations.migrate(settings.database_url, engine, revision)
    except migrations.BadRevision as e:
        typer.echo(f"cannot migrate to {revision!r}: {e}", err=True)
        raise typer.Exit(EXIT_USAGE) from e
    finally:
        engine.dispose()
    typer.echo(f"database at {reached or 'base (no revision)'}")


@cli.command()
def check() -> None:
    """Reach the database, key file, Redis, mail relay and each list's backend; send nothing.

    A line each, ok or FAILED; exit 0 if all answered, 3 if not."""
    from app import preflight

    settings = _settings()
    if settings.log_level != "DEBUG":
        # Each backend's read logged its request at INFO between the report's lines; the
        # line says what answered. DEBUG keeps them.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    failed = 0
    for outcome in preflight.run(settings):
        typer.echo(f"{'ok' if outcome.ok else 'FAILED':<7}{outcome.part}: {outcome.detail}")
        failed += not outcome.ok
    if failed:
        typer.echo(f"{failed} of the checks failed", err=True)
        raise typer.Exit(3)


@cli.command()
def openapi(
    output: Annotated[Path | None, typer.Option(help="Write to this file.")] = None,
) -> None:
    """Print (or write) the OpenAPI document generated from the app."""
    from app.main import create_app

    # Checked as every command's: built with Settings() alone, a bad value ended in a
    # traceback that printed it, a too-short NEWSLETTER_SECRET_KEY included.
    settings = _settings()
    document = json.dumps(create_app(settings).openapi(), indent=2, ensure_ascii=False) + "\n"
    if output is None:
        typer.echo(document, nl=False)
        return
    if output.is_dir():
        typer.echo(f"cannot write {output}: it is a directory", err=True)
        raise typer.Exit(EXIT_USAGE)
    try:
        output.write_text(document, encoding="utf-8")
    except OSError as e:
        typer.echo(f"cannot write {output}: {e.strerror or e}", err=True)
        raise typer.Exit(EXIT_USAGE) from e
    typer.echo(f"wrote {output}", err=True)


def _backend_for(settings: Settings, slug: str) -> tuple[Any, Any]:
    from app import backends

    declared = settings.list_settings(slug)
    if declared is None:
        known = ", ".join(item.slug for item in settings.lists)
        if _created_here(settings, slug):
            # `lists show` names it: "no list in the settings" read as a typo in its name.
            typer.echo(
                f"list {slug!r} has no mailing-list backend: it was created through the API "
                "or the CLI, and NEWSLETTER_LISTS declares none for it (declared there: "
                f"{known}); declare its backend there first",
                err=True,
            )
        else:
            typer.echo(f"no list {slug!r} in the settings (known: {known})", err=True)
        raise typer.Exit(2)
    if declared.backend.kind == "none":
        typer.echo(
            f"list {slug!r} has no mailing-list backend (its backend kind is none): "
            "there is no member list to read",
            err=True,
        )
        raise typer.Exit(2)
    client = backends.make_client(
        connect_timeout=settings.backend_connect_timeout, timeout=settings.backend_timeout
    )
    return backends.make_backend(declared.backend, client), client


def _created_here(settings: Settings, slug: str) -> bool:
    """Whether the database holds a list of this name (created through the API or CLI)."""
    from app import admin, db

    engine = db.make_engine(settings.database_url)
    try:
        with db.session_scope(engine) as session:
            return any(item.slug == slug for item in admin.all_lists(session))
    finally:
        engine.dispose()


def _read_members(
    backend: Any,
    *,
    label: str,
    names: dict[str, str] | None = None,
    variables: dict[str, dict[str, Any]] | None = None,
    again: bool = False,
    not_delivered: dict[str, str] | None = None,
) -> dict[str, tuple[str, bool]]:
    """The backend's members by identity (`sync.read_backend`). Two spellings of one address
    there are one member here: said (but on a second read, `again`), so that the count
    matches the backend's own."""
    from rich.progress import SpinnerColumn, TextColumn

    from app import sync
    from app.backends.base import SyncError

    with _progress(SpinnerColumn(), TextColumn("{task.description}")) as progress:
        task = progress.add_task(f"reading members from {label}", total=None)
        seen = 0

        def advance(count: int) -> None:
            nonlocal seen
            seen += count
            progress.update(task, description=f"reading members from {label}: {seen}")

        try:
            members = sync.read_backend(
                backend,
                progress=advance,
                names=names,
                variables=variables,
                not_delivered=not_delivered,
            )
        except SyncError as e:
            typer.echo(f"the backend failed: {e} {e.response or ''}", err=True)
            raise typer.Exit(1) from e
    if seen > len(members) and not again:
        typer.echo(
            f"{label}: {seen} members at the backend for {len(members)} addresses: a member "
            "in another spelling of an address read already (its domain in Unicode and in "
            "ASCII, say) counts once, subscribed if either spelling is",
            err=True,
        )
    return members


@cli.command()
def reconcile(
    list_slug: Annotated[str, typer.Option("--list", help="The list's slug.")],
    apply: Annotated[bool, typer.Option("--apply", help="Enqueue the fixes.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Compare the list's confirmed members with the backend's; exit 0 in sync, 3 if not."""
    from app import db, lists, sync
    from app.models import utcnow

    settings = _settings()
    backend, client = _backend_for(settings, list_slug)
    engine = db.make_engine(settings.database_url)
    try:
        lists.sync_declared(engine, declared=settings.lists)
        read_since = utcnow()
        not_delivered: dict[str, str] = {}
        remote = _read_members(backend, label=list_slug, not_delivered=not_delivered)
        with db.session_scope(engine) as session:
            report = sync.compare(
                session,
                list_slug=list_slug,
                remote=remote,
                keeps_unsubscribed=backend.keeps_unsubscribed,
                read_since=read_since,
                not_delivered=not_delivered,
            )
            if apply and not report.in_sync:
                sync.apply(session, report=report, key=settings.token_key(), now=utcnow())
            # Dead syncs whose work the backend shows done: put to rest, with --apply only.
            rested = (
                sync.settle_dead(
                    session, report=report, remote=remote, worker=_cli_actor(), now=utcnow()
                )
                if apply
                else 0
            )
        # As the admin API's reconcile: who compared, who had the fixes enqueued. Counts,
        # no address.
        counts = {
            name: len(value) if isinstance(value, list | dict) else value
            for name, value in report.as_dict().items()
            if name != "list"
        }
        _record(
            engine, action="list.reconcile", target=list_slug, outcome="ok",
            detail={"apply": apply, **counts, "superseded": rested},
        )  # fmt: skip
    finally:
        client.close()
        engine.dispose()
    if as_json:
        typer.echo(json.dumps({**report.as_dict(), "superseded": rested}, indent=2))
    else:
        _print_report(report)
        if rested:
            typer.echo(f"  {rested} dead sync job(s) put to rest: the backend shows them done")
    if not report.in_sync and not apply:
        raise typer.Exit(3)


def _print_first(lines: list[str], shown: int = 20) -> None:
    """The first `shown` lines of a report's section, and how many more --json gives."""
    for line in lines[:shown]:
        typer.echo(f"    {line}")
    if len(lines) > shown:
        typer.echo(f"    ... and {len(lines) - shown} more (--json for all)")


def _print_report(report: Any) -> None:
    typer.echo(
        f"list {report.list_slug}: {report.confirmed_here} confirmed here, "
        f"{report.backend_members} members at the backend"
    )
    for title, items in (
        ("missing at the backend (will be added)", report.missing),
        (
            "subscribed at the backend without consent here (will be unsubscribed there)",
            report.extra,
        ),
        ("unsubscribed at the backend (will be recorded here)", report.unsubscribed_there),
        (
            "absent from a backend that deletes members who leave (check each; not re-added)",
            report.absent_there,
        ),
        (
            "subscribed at the backend, not a valid address here (check each; left as is)",
            report.invalid,
        ),
    ):
        typer.echo(f"  {len(items)} {title}")
        _print_first(items)
    if report.delivery_disabled:
        # Members there and here that the backend mails nothing: not a difference --apply
        # fixes (the backend may enable them again), for an operator to know of.
        disabled = list(report.delivery_disabled.items())
        typer.echo(
            f"  {len(disabled)} subscribed at the backend, delivery disabled there (its "
            "bounce processing, or the member or a moderator: left as is)"
        )
        _print_first([f"{address} ({why})" for address, why in disabled])
    # What --apply fixes; the rest is an operator's to check, at the backend.
    fixable = report.missing or report.extra or report.unsubscribed_there
    checks = len(report.absent_there) + len(report.invalid)
    if report.in_sync:
        typer.echo("  in sync")
    if fixable:
        typer.echo(
            "  fixes enqueued; the worker applies them"
            if report.applied
            else "  run again with --apply to fix"
        )
    if checks:
        typer.echo(f"  {checks} left for an operator to check: --apply changes nothing there")


@cli.command("import-backend")
def import_backend(
    list_slug: Annotated[str, typer.Option("--list", help="The list's slug.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count, write nothing.")] = False,
) -> None:
    """Take over the backend's existing members (subscribed -> confirmed, else unsubscribed)."""
    from app import db, lists, sync
    from app.models import utcnow

    settings = _settings()
    backend, client = _backend_for(settings, list_slug)
    declared = settings.list_settings(list_slug)
    assert declared is not None
    engine = db.make_engine(settings.database_url)
    try:
        lists.sync_declared(engine, declared=settings.lists)
        names: dict[str, str] = {}
        variables: dict[str, dict[str, Any]] = {}
        remote = _read_members(backend, label=list_slug, names=names, variables=variables)
        with db.session_scope(engine) as session:
            report = sync.import_members(
                session,
                list_slug=list_slug,
                remote=remote,
                backend_kind=declared.backend.kind,
                key=settings.token_key(),
                now=utcnow(),
                names=names,
                variables=variables,
                fields=declared.fields,
            )
            if dry_run:
                session.rollback()

        def audited(outcome: str) -> None:
            # Who took the members over, and how many: counts, no address.
            _record(
                engine, action="list.import_backend", target=list_slug, outcome=outcome,
                detail={
                    "backend": declared.backend.kind, "dry_run": dry_run, "read": report.read,
                    "confirmed": report.confirmed, "unsubscribed": report.unsubscribed,
                    "already_known": report.already_known, "invalid": len(report.invalid),
                    "erased": report.erased, "blocked": report.blocked,
                    "departed": report.departed,
                    "variables_not_kept": report.variables_not_kept(),
                    "names_not_kept": report.names_refused,
                },
            )  # fmt: skip

        if report.confirmed_addresses and not dry_run:
            # Who left the backend while it was read: recorded before any sync re-adds them.
            try:
                again = _read_members(backend, label=list_slug, again=True)
            except (typer.Exit, KeyboardInterrupt) as e:
                # The backend failed, or Ctrl-C: the members are in all the same.
                stopped = isinstance(e, KeyboardInterrupt)
                audited("interrupted" if stopped else "error:second_read")
                typer.echo(
                    f"the members are imported (read {report.read}: {report.confirmed} "
                    f"confirmed, {report.unsubscribed} unsubscribed); their syncs start in "
                    f"{sync.IMPORT_HOLD.total_seconds() / 60:.0f} minutes: run `newsletter "
                    f"reconcile --list {list_slug} --apply` before, to record who left the "
                    "backend meanwhile",
                    err=True,
                )
                if stopped:
                    raise typer.Exit(EXIT_INTERRUPTED) from None
                raise
            with db.session_scope(engine) as session:
                sync.settle_import(session, report=report, remote=again, now=utcnow())
        audited("ok")
    finally:
        client.close()
        engine.dispose()
    verb = "would import" if dry_run else "imported"
    typer.echo(
        f"list {list_slug}: read {report.read}; {verb} {report.confirmed} confirmed and "
        f"{report.unsubscribed} unsubscribed; {report.already_known} already known; "
        f"{len(report.invalid)} invalid"
    )
    if report.departed:
        typer.echo(
            f"  left the backend while the import ran: {report.departed} "
            "(recorded as unsubscribed, not subscribed again)"
        )
    if report.erased or report.blocked:
        typer.echo(
            f"  not taken over: {report.erased} erased at their owner's request, "
            f"{report.blocked} on the block-list"
        )
    _print_not_kept(report)
    for address in report.invalid[:20]:
        typer.echo(f"  invalid: {address!r}")
    if len(report.invalid) > 20:
        typer.echo(
            f"  ... and {len(report.invalid) - 20} more invalid (`newsletter reconcile --list "
            f"{list_slug} --json` lists them all, under invalid)"
        )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _print_not_kept(report: Any) -> None:
    """What `import-backend` left out of the members' variables and names, by name."""
    for counts, why in (
        (report.variables_undeclared, "the list declaring no such field"),
        (report.variables_refused, "refused as the form refuses them"),
    ):
        if counts:
            # The backend's names, shown as text: a control character is no escape sequence.
            named = [
                f"{_CONTROL.sub('?', name[:64])} ({count})"
                for name, count in sorted(counts.items())
            ]
            more = f", and {len(named) - 20} more" if len(named) > 20 else ""
            typer.echo(f"  member variables not kept, {why}: {', '.join(named[:20])}{more}")
    if report.names_refused:
        typer.echo(
            f"  display names not kept, refused as the form refuses them: {report.names_refused}"
        )
    if report.variables_undeclared or report.variables_refused or report.names_refused:
        typer.echo(
            "  (an address taken over is not read again, and its first sync sends the backend "
            "only the values kept: declare a field in NEWSLETTER_LISTS before the import to "
            "keep its values)"
        )


keys_cli = typer.Typer(no_args_is_help=True, help="Keys to the admin API.")
cli.add_typer(keys_cli, name="keys")


def _cli_actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


@keys_cli.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what uses the key.")],
    scope: Annotated[str, typer.Option(help="read or write.")] = "read",
) -> None:
    """Make a key; it is printed once and only its hash is kept."""
    from app import apikeys, audit, db, errors
    from app.models import KeyScope, utcnow

    try:
        chosen = KeyScope(scope)
    except ValueError as e:
        typer.echo("--scope must be read or write", err=True)
        raise typer.Exit(2) from e
    try:
        name = apikeys.clean_name(name)
    except ValueError as e:
        typer.echo(f"--name: {e}", err=True)
        raise typer.Exit(2) from e
    settings = _settings()
    engine = db.make_engine(settings.database_url)
    try:
        with db.session_scope(engine) as session:
            _, key = apikeys.create(session, name=name, scope=chosen, now=utcnow())
            audit.record(
                session,
                actor=_cli_actor(),
                action="key.create",
                target=name,
                outcome="ok",
                now=utcnow(),
                detail={"scope": chosen.value},
            )
    except errors.Conflict as e:
        typer.echo(e.detail, err=True)
        raise typer.Exit(1) from e
    finally:
        engine.dispose()
    typer.echo(key)
    typer.echo(f"key {name!r} ({chosen.value}) created; it is shown only now", err=True)


@keys_cli.command("list")
def keys_list() -> None:
    """Every key: name, scope, created, last used, revoked."""
    from app import apikeys, db

    settings = _settings()
    engine = db.make_engine(settings.database_url)
    with db.session_scope(engine) as session:
        rows = apikeys.all_keys(session)
    engine.dispose()
    for row in rows:
        state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
        used = f"{row.last_used_at:%Y-%m-%d %H:%M}" if row.last_used_at else "never"
        typer.echo(
            f"{row.name}\t{row.scope}\t{row.prefix}...\tcreated {row.created_at:%Y-%m-%d}"
            f"\tlast used {used}\t{state}"
        )


@keys_cli.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Revoke a key at once."""
    from app import apikeys, audit, db, errors
    from app.models import utcnow

    settings = _settings()
    engine = db.make_engine(settings.database_url)
    try:
        with db.session_scope(engine) as session:
            apikeys.revoke(session, name=name, now=utcnow())
            audit.record(
                session,
                actor=_cli_actor(),
                action="key.revoke",
                target=name,
                outcome="ok",
                now=utcnow(),
            )
    except errors.NotFound as e:
        typer.echo(e.detail, err=True)
        raise typer.Exit(1) from e
    finally:
        engine.dispose()
    typer.echo(f"key {name!r} revoked")


# Operators: subscribers and people (data protection) ---------------------------------------
#
# Exit codes: 0 done; 1 refused or not found (an address not on the list, or of which
# nothing is held; already confirmed, erased address, declined); 2 bad input (unknown
# list, address, evidence, missing --yes without a terminal).

subscriber_cli = typer.Typer(
    no_args_is_help=True,
    help="A list's subscribers: search, show, add, unsubscribe, proof of consent.",
)
cli.add_typer(subscriber_cli, name="subscriber")
people_cli = typer.Typer(
    no_args_is_help=True, help="Data protection: what is held about an address; erasure."
)
cli.add_typer(people_cli, name="people")


def _parsed(model: Any, data: dict[str, Any], *, options: Mapping[str, str]) -> Any:
    """`data` validated by the API's own input model; exit 2 with its messages if invalid,
    each named by what the operator typed (`options`: a field's option or argument), not
    by the API's field (`evidence.source: Field required` for a missing `--source`)."""
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as e:
        for error in e.errors():
            where = ".".join(str(part) for part in error["loc"])
            where = options.get(where, where)
            message = error_message(error)
            typer.echo(f"{where}: {message}" if where else message, err=True)
        raise typer.Exit(2) from e


def _address(raw: str, *, new: bool) -> Any:
    from app import addresses

    try:
        return addresses.parse(raw, new=new)
    except addresses.InvalidAddress as e:
        typer.echo(f"invalid address: {e}", err=True)
        raise typer.Exit(2) from e


def _audited_run(
    settings: Settings,
    *,
    action: str,
    target: str | None,
    work: Any,
    audit_detail: dict[str, Any] | None = None,
    about_list: str | None = None,
    **kwargs: Any,
) -> Any:
    """Run `work` in one transaction and record it in the audit log as `cli:<user>`; a
    refusal is recorded too, printed, and ends the command (exit code 1, or 2 for bad
    input: `_refusal_code`). `about_list`: the list the command names (`list_slug` among
    the arguments by default), named with the known ones when there is no such list."""
    from app import audit, db, errors, lists
    from app.models import utcnow

    actor = _cli_actor()
    engine = db.make_engine(settings.database_url)
    try:
        try:
            with db.session_scope(engine) as session:
                lists.sync_from_settings(session, declared=settings.lists, now=utcnow())
                result = work(session, **kwargs)
                audit.record(
                    session, actor=actor, action=action, target=target, outcome="ok",
                    now=utcnow(), detail=audit_detail,
                )  # fmt: skip
                return result
        except errors.DomainError as e:
            with db.session_scope(engine) as session:
                audit.record(
                    session, actor=actor, action=action, target=target,
                    outcome=f"error:{e.code}", now=utcnow(),
                    detail={**(audit_detail or {}), "detail": e.detail},
                )  # fmt: skip
            _refuse(e, engine, settings, about_list=about_list or kwargs.get("list_slug"))
    finally:
        engine.dispose()


def _refuse(error: Any, engine: Any, settings: Settings, *, about_list: str | None) -> None:
    """Print a refusal and end the command with its code. An unknown list is named, with
    the lists there are (`no list 'nesletter' (known: bluehats)`): the API's "No mailing
    list has this name." left the operator to find which of the command's names was wrong
    and what to type instead."""
    from app import errors

    if isinstance(error, errors.ListNotFound) and about_list is not None:
        typer.echo(_no_such_list(engine, settings, about_list), err=True)
    else:
        typer.echo(error.detail, err=True)
    raise typer.Exit(_refusal_code(error)) from error


def _no_such_list(engine: Any, settings: Settings, slug: str) -> str:
    """The lists declared in the settings and those created through the API or the CLI
    (the refused command's transaction, which stored the declared ones, was rolled back)."""
    from app import admin, db

    with db.session_scope(engine) as session:
        created = {item.slug for item in admin.all_lists(session)}
    known = ", ".join(sorted(created | {item.slug for item in settings.lists}))
    return f"no list {slug!r} (known: {known})"


@subscriber_cli.command("add")
def subscriber_add(
    email: Annotated[str, typer.Argument(help="The address.")],
    list_slug: Annotated[str, typer.Option("--list", help="The list's slug.")],
    confirmed: Annotated[
        bool,
        typer.Option(
            "--confirmed",
            help="Consent given elsewhere: needs --source, --note and --consented-at.",
        ),
    ] = False,
    source: Annotated[str | None, typer.Option(help="Where the consent was given.")] = None,
    note: Annotated[str | None, typer.Option(help="Your note: who, where the proof is.")] = None,
    consented_at: Annotated[
        str | None, typer.Option("--consented-at", help="Date of the consent, YYYY-MM-DD.")
    ] = None,
    locale: Annotated[str | None, typer.Option(help="fr or en.")] = None,
    consent_version: Annotated[
        str | None,
        typer.Option(
            "--consent-version",
            help="With --confirmed: the consent wording the person agreed to, when not the "
            "list's current one.",
        ),
    ] = None,
) -> None:
    """Invite an address (the double opt-in mail), or add it as confirmed with evidence."""
    from app import backends, operators
    from app.models import utcnow
    from app.schemas import AddSubscriberRequest

    evidence = {
        name: value
        for name, value in (
            ("source", source),
            ("note", note),
            ("consented_at", consented_at),
            ("consent_version", consent_version),
        )
        if value is not None
    }
    body = _parsed(
        AddSubscriberRequest,
        {
            "email": email,
            "mode": "confirmed" if confirmed else "invite",
            "locale": locale,
            "evidence": evidence if confirmed or evidence else None,
        },
        options={
            "email": "EMAIL",
            "locale": "--locale",
            "evidence.source": "--source",
            "evidence.note": "--note",
            "evidence.consented_at": "--consented-at",
            "evidence.consent_version": "--consent-version",
        },
    )
    proof = None
    if body.evidence is not None:
        proof = operators.ConsentProof(
            source=body.evidence.source,
            note=body.evidence.note,
            consented_at=body.evidence.consented_at,
            consent_version=body.evidence.consent_version,
        )
    settings = _settings()
    address = _address(email, new=True)
    refusal = backends.refusal(settings.backend_of(list_slug), address.email)
    if refusal is not None:
        typer.echo(f"{email}: {refusal}", err=True)
        raise typer.Exit(2)
    row = _audited_run(
        settings, action=f"subscriber.add.{body.mode}", target=f"{list_slug}:{email}",
        work=operators.add_subscriber, list_slug=list_slug, address=address,
        mode=operators.AddMode(body.mode), locale=body.locale, attributes={}, proof=proof,
        actor=_cli_actor(), key=settings.token_key(), now=utcnow(),
        resend_interval=settings.resend_interval,
    )  # fmt: skip
    typer.echo(f"{row.email} is {row.status} on {list_slug}")


@subscriber_cli.command("unsubscribe")
def subscriber_unsubscribe(
    email: Annotated[str, typer.Argument(help="The address.")],
    list_slug: Annotated[str, typer.Option("--list", help="The list's slug.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the consent ledger).")],
) -> None:
    """Unsubscribe an address with a reason; the backend is told; no goodbye mail."""
    from app import operators
    from app.models import utcnow
    from app.schemas import OperatorUnsubscribeRequest

    body = _parsed(OperatorUnsubscribeRequest, {"reason": reason}, options={"reason": "--reason"})
    settings = _settings()
    row = _audited_run(
        settings, action="subscriber.unsubscribe", target=f"{list_slug}:{email}",
        work=operators.unsubscribe, list_slug=list_slug, address=_address(email, new=False),
        reason=body.reason, actor=_cli_actor(), now=utcnow(),
    )  # fmt: skip
    typer.echo(f"{row.email} is {row.status} on {list_slug}")


@people_cli.command("show")
def people_show(email: Annotated[str, typer.Argument(help="The address.")]) -> None:
    """Print everything held about an address, across lists, as JSON.

    Exit 1 when that is nothing (no subscription, job or erasure), as the other commands
    do for an address they do not find; the record is printed all the same."""
    from app import operators
    from app.api.admin_privacy import person_out

    address = _address(email, new=False)
    settings = _settings()
    record = _audited_run(
        settings, action="person.read", target=address.key, work=operators.person_record,
        address=address, key=settings.token_key(),
    )  # fmt: skip
    typer.echo(person_out(record).model_dump_json(indent=2))
    if record.nothing_held:
        typer.echo(
            f"nothing held about {record.email_key}: no subscription on any list, no job, "
            "no erasure",
            err=True,
        )
        raise typer.Exit(1)


@people_cli.command("erase")
def people_erase(
    email: Annotated[str, typer.Argument(help="The address.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Erase an address from every list; the backends are told through the sync.

    Prints what was done as JSON. Erasing again is harmless."""
    import dataclasses

    from app import operators, privacy
    from app.models import utcnow

    address = _address(email, new=False)
    if not yes:
        if not sys.stdin.isatty():
            typer.echo("not a terminal: pass --yes to erase", err=True)
            raise typer.Exit(2)
        if not typer.confirm(f"Erase {address.email} from every list? This cannot be undone"):
            typer.echo("nothing erased", err=True)
            raise typer.Exit(1)
    settings = _settings()
    key = settings.token_key()
    report = _audited_run(
        settings, action="person.erase", target=privacy.address_hash(address.key, key=key),
        work=operators.erase, address=address, key=key,
        backend_lists={item.slug for item in settings.lists}, now=utcnow(),
    )  # fmt: skip
    typer.echo(json.dumps(dataclasses.asdict(report), indent=2))


# Import and export -------------------------------------------------------------------------
#
# Exit codes: 0 done (every row imported or already there); 1 some rows refused; 2 bad
# usage (unknown list, option or file) or a file that cannot be read (not UTF-8, a bad
# header, no row under the header: nothing written then).


def _known_list(settings: Settings, engine: Any, slug: str) -> int:
    """The list's id, after bringing the declared lists into the database; exit 2 if unknown."""
    from app import admin, db, errors, lists
    from app.models import utcnow

    with db.session_scope(engine) as session:
        lists.sync_from_settings(session, declared=settings.lists, now=utcnow())
        try:
            row = lists.get(session, slug=slug)
        except errors.ListNotFound as e:
            known = ", ".join(item.slug for item in admin.all_lists(session))
            typer.echo(f"no list {slug!r} (known: {known})", err=True)
            raise typer.Exit(2) from e
        assert row.id is not None
        return row.id


def _record(engine: Any, *, action: str, target: str, outcome: str, detail: dict[str, Any]) -> None:
    from app import audit, db
    from app.models import utcnow

    with db.session_scope(engine) as session:
        audit.record(
            session, actor=_cli_actor(), action=action, target=target, outcome=outcome,
            now=utcnow(), detail=detail,
        )  # fmt: skip


@contextlib.contextmanager
def _ctrl_c_between_steps() -> Iterator[Callable[[], None]]:
    """Ctrl-C during a long command (an import, an export) stops it between two of its
    steps (a batch, a page), each in a transaction of its own: the `check` this yields,
    called between them, raises KeyboardInterrupt there. Raised anywhere else, it could
    leave a transaction and this process's SQLite writer lock held, and the record of the
    stop then waited for ever. A second Ctrl-C stops at once."""
    pressed = threading.Event()

    def on_ctrl_c(_signum: int, _frame: FrameType | None) -> None:
        pressed.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def check() -> None:
        if pressed.is_set():
            raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_ctrl_c)
    except ValueError:  # not the main thread: Ctrl-C is not ours to take
        yield lambda: None
        return
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)


def _choice(value: str, *, option: str, allowed: Any) -> Any:
    try:
        return allowed(value)
    except ValueError as e:
        names = ", ".join(item.value for item in allowed)
        typer.echo(f"{option} must be one of {names}", err=True)
        raise typer.Exit(2) from e


@contextlib.contextmanager
def _seekable(file: Path) -> Iterator[IO[bytes]]:
    """The file opened for reading, or a copy of what a pipe gives (`... | newsletter import
    /dev/stdin`): the import reads the file twice."""
    import shutil
    import tempfile

    with file.open("rb") as source:
        if source.seekable():
            yield source
            return
        with tempfile.TemporaryFile() as copy:
            shutil.copyfileobj(source, copy)
            yield copy


@cli.command("import")
def import_file(
    file: Annotated[
        Path,
        typer.Argument(
            exists=True,
            dir_okay=False,
            readable=True,
            help="The CSV file (/dev/stdin: from a pipe): UTF-8, a header line first (email, "
            "name, locale, attributes, consent_source, consent_date, consent_version).",
        ),
    ],
    list_slug: Annotated[str, typer.Option("--list", help="The list's slug.")],
    mode: Annotated[
        str,
        typer.Option(
            help="confirmed: rows carry consent_source and consent_date, added as confirmed; "
            "invite: each address gets the double opt-in mail."
        ),
    ] = "confirmed",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and count; write nothing.")] = (
        False
    ),
    note: Annotated[
        str | None, typer.Option(help="An operator's note, kept in the ledger.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    rejects: Annotated[
        Path | None,
        typer.Option(
            help="Write every refused row there, as CSV: its line, why, and the row as it "
            "was; fixed, that file imports as it is."
        ),
    ] = None,
) -> None:
    """Import subscribers from a CSV file; an address already on the list is left as it is."""
    import functools
    import io
    import os

    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn

    from app import db, errors, transfer
    from app.models import utcnow

    chosen = _choice(mode, option="--mode", allowed=transfer.ImportMode)
    if note is not None and len(note) > transfer.MAX_NOTE:
        typer.echo(f"--note is longer than {transfer.MAX_NOTE} characters", err=True)
        raise typer.Exit(2)
    if note is not None:
        from app.schemas import UrlNote

        # As the API's import takes it: line breaks, but no escape sequence into the ledger.
        _as_the_api_takes(note, UrlNote, option="--note")
    settings = _settings()
    # Opened first: an import whose refused rows could not be written is refused before
    # it writes anything.
    rejected = None if rejects is None else _open_output(rejects, None)
    engine = db.make_engine(settings.database_url)
    detail: dict[str, Any] = {"mode": chosen.value, "dry_run": dry_run, "file": file.name}
    if rejects is not None:
        detail["rejects"] = rejects.name
    try:
        _known_list(settings, engine, list_slug)
        with (
            contextlib.ExitStack() as closing,
            _seekable(file) as source,
            _progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                TimeRemainingColumn(),
            ) as progress,
            _ctrl_c_between_steps() as stop_if_asked,
        ):  # fmt: skip
            size = os.fstat(source.fileno()).st_size
            # The first pass checks the whole file, writing nothing; then the second writes
            # it, batch by batch. The bar shows each in turn, over the file's bytes.
            task = progress.add_task(f"checking {file.name}", total=size)
            writing = False

            def checking(done: int) -> None:
                progress.update(task, completed=done)
                stop_if_asked()  # nothing written yet: Ctrl-C stops the import there

            # Filled as the import goes: a run cut short still tells what it wrote.
            report = transfer.ImportReport(list_slug=list_slug, mode=chosen, dry_run=dry_run)
            rejects_text = None
            if rejected is not None:
                rejects_text = closing.enter_context(
                    io.TextIOWrapper(rejected, encoding="utf-8", newline="")
                )

            def advance(done: int) -> None:
                nonlocal writing
                if not writing:
                    # From the start again, with the writing's own pace for the time left.
                    progress.reset(task, total=size, description=f"importing into {list_slug}")
                    writing = True
                progress.update(task, completed=done)
                stop_if_asked()  # after a batch's commit: where Ctrl-C stops the import

            try:
                report = transfer.import_csv(
                    functools.partial(db.session_scope, engine),
                    source=source,
                    list_slug=list_slug,
                    mode=chosen,
                    dry_run=dry_run,
                    operator=_cli_actor(),
                    note=note,
                    key=settings.token_key(),
                    resend_interval=settings.resend_interval,
                    now=utcnow(),
                    progress=advance,
                    backend=settings.backend_of(list_slug),
                    report=report,
                    rejects=rejects_text,
                    checking=checking,
                )
            except errors.DomainError as e:
                _record(
                    engine, action="subscribers.import", target=list_slug,
                    outcome=f"error:{e.code}", detail={**detail, "detail": e.detail},
                )  # fmt: skip
                typer.echo(e.detail, err=True)
                raise typer.Exit(_refusal_code(e)) from e
            except (KeyboardInterrupt, Exception) as e:
                # Ctrl-C, the database gone: the batches committed stay. Say which rows are
                # in, so that the list is not left half imported without a word.
                progress.stop()
                typer.echo(transfer.cut_short(report, again="Run the same command again"), err=True)
                with contextlib.suppress(Exception):  # the database may be what failed
                    _record(
                        engine, action="subscribers.import", target=list_slug,
                        outcome="interrupted",
                        detail={
                            **detail, **report.counts(),
                            "applied_through": report.applied_through, "note": note,
                        },
                    )  # fmt: skip
                if isinstance(e, KeyboardInterrupt):
                    raise typer.Exit(EXIT_INTERRUPTED) from None
                raise
        _record(
            engine, action="subscribers.import", target=list_slug, outcome="ok",
            detail={**detail, **report.counts(), "note": note},
        )  # fmt: skip
    finally:
        if rejected is not None:
            rejected.close()
        engine.dispose()
    if as_json:
        document = {
            "list": list_slug,
            **report.counts(),
            "errors": [
                {"line": item.line, "email": item.email, "error": item.error}
                for item in report.errors
            ],
        }
        if rejects is not None:
            document["rejects"] = str(rejects)
        typer.echo(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        verb = "would create" if dry_run else "created"
        typer.echo(
            f"list {list_slug} ({chosen.value}{', dry run' if dry_run else ''}): read "
            f"{report.read}; {verb} {report.created}; unchanged {report.unchanged}; "
            f"invalid {report.invalid}"
        )
        for item in report.errors:
            typer.echo(f"  line {item.line} {item.email}: {item.error}")
        if rejects is not None and report.invalid:
            typer.echo(
                f"  all {report.invalid} refused rows, as they were, are in {rejects} (with "
                "their line and why): fixed, that file imports as it is"
            )
        elif report.invalid > len(report.errors):
            typer.echo(
                f"  ... and {report.invalid - len(report.errors)} more refused rows: --rejects "
                "FILE writes every refused row, as it was, with its line and why"
            )
    if report.invalid:
        raise typer.Exit(1)


# The filters of the search and the export, as the admin API's query names them.
_StatusOption = Annotated[str | None, typer.Option(help="pending, confirmed, ...")]
_PrefixOption = Annotated[
    str | None,
    typer.Option(help="Start of the address (a domain in Unicode or in ASCII, xn--...)."),
]
_LocaleOption = Annotated[str | None, typer.Option(help="fr or en.")]
_CreatedAfterOption = Annotated[
    str | None, typer.Option(help="Created at or after (ISO date or date-time, UTC by default).")
]
_CreatedBeforeOption = Annotated[
    str | None, typer.Option(help="Created before (ISO date or date-time, UTC by default).")
]
_ConfirmedAfterOption = Annotated[
    str | None,
    typer.Option(help="Confirmed at or after (ISO date or date-time, UTC by default)."),
]
_ConfirmedBeforeOption = Annotated[
    str | None, typer.Option(help="Confirmed before (ISO date or date-time, UTC by default).")
]


def _as_the_api_takes(value: str, kind: Any, *, option: str) -> None:
    """Exit 2, saying why, for a value the admin API would refuse as `kind` (a type of
    app.schemas)."""
    from pydantic import TypeAdapter, ValidationError

    try:
        TypeAdapter(kind).validate_python(value)
    except ValidationError as e:
        message = error_message(e.errors()[0])
        typer.echo(f"{option}: {message}", err=True)
        raise typer.Exit(EXIT_USAGE) from e


def _subscriber_filter(
    *,
    status: str | None,
    prefix: str | None,
    locale: str | None,
    created_after: str | None,
    created_before: str | None,
    confirmed_after: str | None,
    confirmed_before: str | None,
) -> Any:
    """The search's and the export's filters, checked as the admin API checks its query
    (`subscriber_filter`); exit 2 for one it would refuse."""
    from app import admin, errors
    from app.models import SubscriptionStatus
    from app.schemas import UrlText

    chosen = _choice(status, option="--status", allowed=SubscriptionStatus) if status else None
    language = None
    if locale is not None:
        language = _choice(locale.strip().lower(), option="--locale", allowed=Locale)
    if prefix is not None:
        if len(prefix) > MAX_PREFIX:
            typer.echo(f"--prefix is longer than {MAX_PREFIX} characters", err=True)
            raise typer.Exit(EXIT_USAGE)
        _as_the_api_takes(prefix, UrlText, option="--prefix")
    try:
        return admin.SubscriberFilter(
            status=chosen,
            prefix=prefix or None,
            locale=language,
            created_after=_when(created_after, option="--created-after"),
            created_before=_when(created_before, option="--created-before"),
            confirmed_after=_when(confirmed_after, option="--confirmed-after"),
            confirmed_before=_when(confirmed_before, option="--confirmed-before"),
        )
    except errors.BadRequest as e:
        # The check names the API's parameters; here they are options.
        detail = re.sub(r"\b(created|confirmed)_(after|before)\b", r"--\1-\2", e.detail)
        typer.echo(detail, err=True)
        raise typer.Exit(EXIT_USAGE) from e


@cli.command("export")
def export_file(
    list_slug: Annotated[str, typer.Option("--list", help="The list's slug.")],
    export_format: Annotated[str, typer.Option("--format", help="csv or jsonl.")] = "csv",
    status: _StatusOption = None,
    prefix: _PrefixOption = None,
    locale: _LocaleOption = None,
    created_after: _CreatedAfterOption = None,
    created_before: _CreatedBeforeOption = None,
    confirmed_after: _ConfirmedAfterOption = None,
    confirmed_before: _ConfirmedBeforeOption = None,
    output: Annotated[
        Path | None, typer.Option(help="Write to this file (default: standard output).")
    ] = None,
) -> None:
    """Export a list's subscribers with their consent fields, as CSV or JSON lines.

    The filters are the search's."""
    import functools
    import os

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    from app import db, transfer

    chosen = _choice(export_format, option="--format", allowed=transfer.ExportFormat)
    where = _subscriber_filter(
        status=status,
        prefix=prefix,
        locale=locale,
        created_after=created_after,
        created_before=created_before,
        confirmed_after=confirmed_after,
        confirmed_before=confirmed_before,
    )
    settings = _settings()
    # A file appears under its name only once complete: a script never reads half an export.
    # A pipe or a device (`--output /dev/stdout`, a shell's `>(gzip > f.gz)`) is written as
    # it is: a file renamed over it would replace it.
    partial = None
    if output is not None and (output.is_file() or not output.exists()):
        partial = output.with_name(output.name + ".part")
    # Opened first: an export that cannot be written is refused before the audit log
    # records it as done.
    sink = sys.stdout.buffer if output is None else _open_output(output, partial)
    engine = db.make_engine(settings.database_url)
    detail = {"format": chosen.value, "filters": where.given()}
    try:
        list_id = _known_list(settings, engine, list_slug)
        with db.session_scope(engine) as session:
            total = transfer.export_count(session, list_id=list_id, where=where)
        _record(
            engine, action="subscribers.export", target=list_slug, outcome="ok",
            detail={**detail, "rows": total},
        )  # fmt: skip
        sent = 0

        def advance(count: int) -> None:
            nonlocal sent
            sent += count
            progress.advance(task, count)
            stop_if_asked()  # between two pages, each read in a transaction of its own

        try:
            with (
                _ctrl_c_between_steps() as stop_if_asked,
                _progress(
                    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()
                ) as progress,
                # Closed here, before the engine: a page left open held its session.
                contextlib.closing(
                    transfer.export_chunks(
                        functools.partial(db.session_scope, engine),
                        list_id=list_id,
                        where=where,
                        format=chosen,
                        progress=advance,
                    )
                ) as chunks,
            ):
                task = progress.add_task(f"exporting {list_slug}", total=total)
                for chunk in chunks:
                    sink.write(chunk)
            sink.flush()
        except KeyboardInterrupt:
            # The log said `ok` for every row before the first was read (it must be there
            # whatever happens next): it now says how far the export went.
            where_to = f"{output} is not written" if output is not None else "output cut short"
            typer.echo(f"export stopped: {sent} of {total} subscribers read; {where_to}", err=True)
            with contextlib.suppress(Exception):
                _record(
                    engine, action="subscribers.export", target=list_slug,
                    outcome="interrupted", detail={**detail, "rows": total, "read": sent},
                )  # fmt: skip
            raise typer.Exit(EXIT_INTERRUPTED) from None
        finally:
            if output is not None:
                sink.close()
        if partial is not None and output is not None:
            os.replace(partial, output)
        if output is not None:
            typer.echo(f"wrote {total} subscribers to {output}", err=True)
    except BrokenPipeError:
        # `newsletter export ... | head`: the reader left; not an error of ours.
        sys.stderr.close()
    except OSError as e:
        # A full disk, a quota: the file is not left half written (the partial goes below).
        typer.echo(f"cannot write {output or 'standard output'}: {e.strerror or e}", err=True)
        if output is None:
            # What stdout still holds would fail again at exit, with a traceback.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(EXIT_USAGE) from e
    finally:
        if output is not None:
            with contextlib.suppress(OSError):  # already told, above
                sink.close()
        if partial is not None and partial.exists():
            partial.unlink()
        engine.dispose()


def _open_output(output: Path, partial: Path | None) -> Any:
    """`partial` opened for writing, checking that `output` can take its place (`output`
    itself when there is no `partial`); exit 2 if not."""
    if output.is_dir():
        typer.echo(f"cannot write {output}: it is a directory", err=True)
        raise typer.Exit(EXIT_USAGE)
    try:
        return (partial or output).open("wb")
    except OSError as e:
        typer.echo(f"cannot write {output}: {e.strerror or e}", err=True)
        raise typer.Exit(EXIT_USAGE) from e


# Read-only operator commands and the job queue ----------------------------------------------

jobs_cli = typer.Typer(no_args_is_help=True, help="The outbox: failed jobs and retries.")
cli.add_typer(jobs_cli, name="jobs")
lists_cli = typer.Typer(no_args_is_help=True, help="Mailing lists.")
cli.add_typer(lists_cli, name="lists")


def _refusal_code(error: Exception) -> int:
    """The exit code of a refusal: 2 when the input itself is wrong (an unknown list, a
    cursor or a file that cannot be read), 1 for a refusal of what it asks (an unknown
    subscriber, a conflict...), as the README's table of exit codes says."""
    from app import errors

    bad_input = (errors.ListNotFound, errors.BadRequest, errors.InvalidBody, errors.InvalidCsv)
    return 2 if isinstance(error, bad_input) else 1


def _read(settings: Settings, work: Any, *, of_lists: bool = False, **kwargs: Any) -> Any:
    """Run a read in one transaction; a refusal prints its reason and exits (1 or 2).
    `of_lists` (implied by a `list_slug`): the lists declared in the settings are brought
    into the database first, as `serve` and the other commands do, so that a read made
    between `newsletter migrate` and the first start finds them ("No mailing list has this
    name." for the list in NEWSLETTER_LISTS, and `lists show` printed nothing)."""
    from app import db, errors, lists
    from app.models import utcnow

    engine = db.make_engine(settings.database_url)
    try:
        with db.session_scope(engine) as session:
            if of_lists or "list_slug" in kwargs:
                lists.sync_from_settings(session, declared=settings.lists, now=utcnow())
            return work(session, **kwargs)
    except errors.DomainError as e:
        _refuse(e, engine, settings, about_list=kwargs.get("list_slug"))
    finally:
        engine.dispose()


def _when(value: str | None, *, option: str) -> Any:
    from datetime import datetime

    from app.models import as_utc

    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as e:
        typer.echo(f"{option}: not an ISO date or date-time: {value!r}", err=True)
        raise typer.Exit(2) from e
    try:
        # The database holds UTC, where 0001-01-01T00:00+01:00 would be before year 1.
        return as_utc(parsed)
    except OverflowError as e:
        typer.echo(f"{option}: out of range once in UTC: {value!r}", err=True)
        raise typer.Exit(2) from e


def _period(since: Any, until: Any) -> None:
    """Exit 2 for a period that holds nothing, named by the options (the check in the
    domain names the API's `since` and `until`)."""
    from app import errors

    try:
        errors.check_period(since, until, start_name="--since", end_name="--until")
    except errors.BadRequest as e:
        typer.echo(e.detail, err=True)
        raise typer.Exit(EXIT_USAGE) from e


def _json_out(value: Any) -> None:
    from pydantic import TypeAdapter

    typer.echo(TypeAdapter(Any).dump_json(value, indent=2).decode())


@subscriber_cli.command("search")
def subscriber_search(
    list_slug: Annotated[str, typer.Option("--list", help="The list's slug.")],
    status: _StatusOption = None,
    prefix: _PrefixOption = None,
    locale: _LocaleOption = None,
    created_after: _CreatedAfterOption = None,
    created_before: _CreatedBeforeOption = None,
    confirmed_after: _ConfirmedAfterOption = None,
    confirmed_before: _ConfirmedBeforeOption = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_PAGE, help="Rows per page.")] = 100,
    cursor: Annotated[str | None, typer.Option(help="Next page, as printed.")] = None,
) -> None:
    """One page of a list's subscribers, tab-separated; the next page's cursor on stderr."""
    from app import admin

    where = _subscriber_filter(
        status=status,
        prefix=prefix,
        locale=locale,
        created_after=created_after,
        created_before=created_before,
        confirmed_after=confirmed_after,
        confirmed_before=confirmed_before,
    )
    settings = _settings()
    # A read of personal data, audited with its filters as the API's search is.
    rows, next_cursor = _audited_run(
        settings, action="subscribers.search", target=list_slug,
        audit_detail={"filters": where.given(), "cursor": cursor is not None},
        work=admin.search_subscribers, list_slug=list_slug, where=where, cursor=cursor,
        limit=limit,
    )  # fmt: skip
    for row in rows:
        confirmed = row.confirmed_at.isoformat() if row.confirmed_at else ""
        typer.echo(f"{row.email}\t{row.status}\t{row.locale}\t{confirmed}")
    if next_cursor:
        typer.echo(f"next page: --cursor {next_cursor}", err=True)


@subscriber_cli.command("show")
def subscriber_show(
    email: Annotated[str, typer.Argument(help="The address.")],
    list_slug: Annotated[str, typer.Option("--list", help="The list's slug.")],
) -> None:
    """One subscriber's record with its consent ledger and job attempts, as JSON."""
    from app import admin

    settings = _settings()
    record = _audited_run(
        settings, action="subscriber.read", target=f"{list_slug}:{email}",
        work=admin.subscriber_record, list_slug=list_slug, email=email,
    )  # fmt: skip
    _json_out(
        {
            "subscription": record.subscription.model_dump(exclude={"email_key"}),
            "ledger": [event.model_dump() for event in record.events],
            "jobs": [job.model_dump() for job in record.jobs],
            "attempts": [attempt.model_dump() for attempt in record.attempts],
        }
    )


@cli.command()
def stats(
    list_slug: Annotated[str, typer.Option("--list", help="The list's slug.")],
    since: Annotated[str | None, typer.Option(help="ISO date (default: 30 days ago).")] = None,
    until: Annotated[str | None, typer.Option(help="ISO date (default: now).")] = None,
    by: Annotated[str, typer.Option(help="day or month.")] = "day",
) -> None:
    """Counts by status, activity per day or month, confirmation rate, sync backlog."""
    from dataclasses import asdict
    from datetime import timedelta

    from app import admin
    from app.models import utcnow

    if by not in ("day", "month"):
        typer.echo("--by must be day or month", err=True)
        raise typer.Exit(2)
    settings = _settings()
    now = utcnow()
    start = _when(since, option="--since") or now - timedelta(days=30)
    end = _when(until, option="--until") or now + timedelta(seconds=1)
    _period(start, end)
    result = _read(
        settings,
        admin.stats,
        list_slug=list_slug,
        since=start,
        until=end,
        by_month=by == "month",
        now=now,
    )
    _json_out(asdict(result))


@jobs_cli.command("failed")
def jobs_failed(
    state: Annotated[str | None, typer.Option(help="dead, or pending (retrying).")] = None,
    kind: Annotated[str | None, typer.Option(help="mail, sync, reconcile or retention.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_PAGE, help="At most this many.")] = 100,
) -> None:
    """Failed jobs with their last error, newest first; exit 0 when there are none, 3 if any."""
    from app import admin
    from app.models import JobKind

    settings = _settings()
    rows = _read(
        settings,
        admin.failed_jobs,
        state=_choice(state, option="--state", allowed=admin.FailedJobState) if state else None,
        kind=_choice(kind, option="--kind", allowed=JobKind) if kind else None,
        limit=limit,
    )
    for row in rows:
        typer.echo(f"{row.id}\t{row.kind}\t{row.state}\tattempts {row.attempts}\t{row.last_error}")
    if rows:
        raise typer.Exit(3)


@jobs_cli.command("retry")
def jobs_retry(
    job_id: Annotated[
        list[int] | None,
        typer.Option("--id", min=1, max=MAX_ROW_ID, help="A job id (repeatable)."),
    ] = None,
    every: Annotated[bool, typer.Option("--all", help="Every failed job.")] = False,
) -> None:
    """Put failed jobs back in the queue now, with a fresh attempt budget."""
    from app import admin
    from app.models import utcnow

    if job_id and every:
        typer.echo("give --id N (one or more) or --all, not both", err=True)
        raise typer.Exit(2)
    if not job_id and not every:
        typer.echo("give --id N (one or more) or --all", err=True)
        raise typer.Exit(2)
    settings = _settings()
    retried = _audited_run(
        settings,
        action="job.retry_all" if every else "job.retry",
        target=None if every else ",".join(str(n) for n in job_id or []),
        work=admin.retry_jobs,
        job_ids=None if every else list(job_id or []),
        now=utcnow(),
    )
    typer.echo(f"{len(retried)} job(s) back in the queue")
    missed = sorted(set(job_id or []) - set(retried))
    if missed:
        shown = ", ".join(str(n) for n in missed)
        typer.echo(f"no failed job with id {shown} (unknown, done or running)", err=True)
        raise typer.Exit(1)


@cli.command("audit")
def audit_search(
    actor: Annotated[str | None, typer.Option(help="Key name or cli:<user>.")] = None,
    action: Annotated[str | None, typer.Option(help="e.g. subscriber.read")] = None,
    target: Annotated[str | None, typer.Option(help="Exact target.")] = None,
    since: Annotated[str | None, typer.Option(help="ISO date (from, included).")] = None,
    until: Annotated[str | None, typer.Option(help="ISO date (to, excluded).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_PAGE, help="At most this many.")] = 100,
) -> None:
    """The audit log, newest first, tab-separated."""
    from app import audit

    settings = _settings()
    start, end = _when(since, option="--since"), _when(until, option="--until")
    _period(start, end)
    rows = _read(
        settings, audit.search, actor=actor, action=action, target=target,
        since=start, until=end, limit=limit,
    )  # fmt: skip
    for row in rows:
        typer.echo(
            f"{row.occurred_at.isoformat()}\t{row.actor}\t{row.action}\t{row.target or ''}"
            f"\t{row.outcome}"
        )


@lists_cli.command("show")
def lists_show() -> None:
    """Every list with its language, consent wording version and backend."""
    from app import admin

    settings = _settings()
    for row in _read(settings, admin.all_lists, of_lists=True):
        declared = settings.list_settings(row.slug)
        backend = declared.backend.kind if declared else "none"
        typer.echo(
            f"{row.slug}\t{row.name}\t{row.default_locale}\t{row.consent_version}\t{backend}"
        )


# The options of `lists create` and `lists update`, by the API's fields they fill.
_LIST_OPTIONS = {
    "name": "--name",
    "default_locale": "--default-locale",
    "consent_version": "--consent-version",
    "confirm_ttl_seconds": "--confirm-ttl-hours",
    "thank_you_url": "--thank-you-url",
    "landing_url": "--landing-url",
}


_THANK_YOU_HELP = (
    "Where a form post is sent once taken (https://...); the hosted 'check your inbox' page "
    "when unset."
)
_LANDING_HELP = "Where the confirmed and unsubscribed pages lead back to (https://...)."


@lists_cli.command("create")
def lists_create(
    slug: Annotated[str, typer.Argument(help="Lowercase letters, digits and dashes.")],
    name: Annotated[str, typer.Option(help="The name shown in mails and pages.")],
    default_locale: Annotated[str, typer.Option(help="fr or en.")] = "fr",
    consent_version: Annotated[
        str, typer.Option(help="Consent wording version.")
    ] = DEFAULT_CONSENT_VERSION,
    confirm_ttl_hours: Annotated[
        int,
        typer.Option(
            min=CONFIRM_TTL_HOURS[0], max=CONFIRM_TTL_HOURS[1], help="Confirmation link lifetime."
        ),
    ] = 48,
    thank_you_url: Annotated[str | None, typer.Option(help=_THANK_YOU_HELP)] = None,
    landing_url: Annotated[str | None, typer.Option(help=_LANDING_HELP)] = None,
) -> None:
    """Create a list in the database, without a backend until the settings declare one.

    Meanwhile its sync jobs wait as failed jobs (`newsletter jobs retry --all` then)."""
    from app import lists
    from app.models import utcnow
    from app.schemas import ListCreate

    body = _parsed(
        ListCreate,
        {
            "slug": slug, "name": name, "default_locale": default_locale,
            "consent_version": consent_version, "confirm_ttl_seconds": confirm_ttl_hours * 3600,
            "thank_you_url": thank_you_url, "landing_url": landing_url,
        },
        options={**_LIST_OPTIONS, "slug": "SLUG"},
    )  # fmt: skip
    settings = _settings()
    _audited_run(
        settings, action="list.create", target=slug,
        audit_detail={"settings": body.model_dump(mode="json", exclude={"slug"})},
        work=lists.create, slug=body.slug,
        name=body.name, default_locale=body.default_locale.value,
        consent_version=body.consent_version, confirm_ttl_seconds=body.confirm_ttl_seconds,
        thank_you_url=str(body.thank_you_url) if body.thank_you_url else None,
        landing_url=str(body.landing_url) if body.landing_url else None,
        declared=settings.lists, now=utcnow(),
    )  # fmt: skip
    typer.echo(f"list {slug!r} created")


@lists_cli.command("update")
def lists_update(
    slug: Annotated[str, typer.Argument(help="A list created through the API or CLI.")],
    name: Annotated[str | None, typer.Option(help="The name shown in mails and pages.")] = None,
    default_locale: Annotated[str | None, typer.Option(help="fr or en.")] = None,
    consent_version: Annotated[
        str | None,
        typer.Option(help="Consent wording version: a new one whenever the wording changes."),
    ] = None,
    confirm_ttl_hours: Annotated[
        int | None,
        typer.Option(
            min=CONFIRM_TTL_HOURS[0], max=CONFIRM_TTL_HOURS[1], help="Confirmation link lifetime."
        ),
    ] = None,
    thank_you_url: Annotated[str | None, typer.Option(help=_THANK_YOU_HELP)] = None,
    landing_url: Annotated[str | None, typer.Option(help=_LANDING_HELP)] = None,
) -> None:
    """Change a list created through the API (lists in the settings change there)."""
    from app import lists
    from app.models import utcnow

    changes: dict[str, Any] = {
        key: value
        for key, value in {
            "name": name,
            "default_locale": default_locale,
            "consent_version": consent_version,
            "confirm_ttl_seconds": None if confirm_ttl_hours is None else confirm_ttl_hours * 3600,
            "thank_you_url": thank_you_url,
            "landing_url": landing_url,
        }.items()
        if value is not None
    }
    if not changes:
        typer.echo("nothing to change", err=True)
        raise typer.Exit(2)
    from app.schemas import ListUpdate

    valid = _parsed(ListUpdate, changes, options=_LIST_OPTIONS).changes()
    settings = _settings()
    _audited_run(
        settings, action="list.update", target=slug, audit_detail={"changes": valid},
        work=lists.update, slug=slug, changes=valid, declared=settings.lists, now=utcnow(),
        about_list=slug,
    )  # fmt: skip
    typer.echo(f"list {slug!r} updated")


# Block-list, retention, proof of consent ----------------------------------------------------
#
# Exit codes as above: 0 done; 1 refused (already blocked, not on the list, unknown
# subscriber); 2 bad input.

block_cli = typer.Typer(
    no_args_is_help=True, help="The block-list: addresses and domains never mailed nor added."
)
cli.add_typer(block_cli, name="block")
retention_cli = typer.Typer(no_args_is_help=True, help="Retention of personal data.")
cli.add_typer(retention_cli, name="retention")


def _block_value(raw: str, kind: str | None) -> tuple[Any, str]:
    """The entry's kind (given, or: an address has a local part) and its stored form."""
    from app import addresses, blocklist
    from app.models import BlockKind

    if kind is None:
        chosen = BlockKind.ADDRESS if "@" in raw.strip().lstrip("@") else BlockKind.DOMAIN
    else:
        chosen = _choice(kind, option="--kind", allowed=BlockKind)
    try:
        return chosen, blocklist.normalize(chosen, raw)
    except addresses.InvalidAddress as e:
        typer.echo(f"invalid {chosen.value}: {e}", err=True)
        raise typer.Exit(2) from e


@block_cli.command("add")
def block_add(
    value: Annotated[str, typer.Argument(help="An address, or a domain (example.org).")],
    reason: Annotated[str, typer.Option(help="Why (kept with the entry).")],
    kind: Annotated[
        str | None, typer.Option(help="address or domain (default: guessed from an @).")
    ] = None,
) -> None:
    """Block an address, or a domain and its subdomains."""
    from app import blocklist
    from app.models import utcnow
    from app.schemas import BlockCreate

    chosen, normalized = _block_value(value, kind)
    body = _parsed(
        BlockCreate,
        {"kind": chosen.value, "value": value, "reason": reason},
        options={"value": "VALUE", "reason": "--reason"},
    )
    settings = _settings()
    _audited_run(
        settings, action="block.add", target=f"{chosen.value}:{normalized}",
        work=blocklist.add, kind=chosen, value=normalized, reason=body.reason,
        actor=_cli_actor(), now=utcnow(),
    )  # fmt: skip
    typer.echo(f"{chosen.value} {normalized} blocked")


@block_cli.command("list")
def block_list(
    kind: Annotated[str | None, typer.Option(help="address or domain.")] = None,
) -> None:
    """Every entry: kind, value, reason, when, by whom (tab-separated)."""
    from app import blocklist
    from app.models import BlockKind

    chosen = _choice(kind, option="--kind", allowed=BlockKind) if kind else None
    rows = _read(_settings(), blocklist.all_entries, kind=chosen)
    for row in rows:
        typer.echo(
            f"{row.kind}\t{row.value}\t{row.reason}\t{row.created_at:%Y-%m-%d %H:%M}\t"
            f"{row.created_by}"
        )


@block_cli.command("remove")
def block_remove(
    value: Annotated[str, typer.Argument(help="The address or domain, as listed.")],
    kind: Annotated[str | None, typer.Option(help="address or domain.")] = None,
) -> None:
    """Take an address or a domain off the block-list."""
    from app import blocklist

    chosen, normalized = _block_value(value, kind)

    def work(session: Any) -> Any:
        entry = blocklist.find(session, kind=chosen, value=normalized)
        assert entry.id is not None
        return blocklist.remove(session, entry_id=entry.id)

    _audited_run(
        _settings(), action="block.remove", target=f"{chosen.value}:{normalized}", work=work
    )
    typer.echo(f"{chosen.value} {normalized} no longer blocked")


@retention_cli.command("run")
def retention_run(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would go; change nothing.")
    ] = False,
) -> None:
    """Apply the retention settings now and print what was removed, by kind."""
    from app import audit, db, retention
    from app.models import utcnow

    settings = _settings()
    engine = db.make_engine(settings.database_url)
    policy = retention.Policy.from_settings(settings)
    try:
        if dry_run:
            # The same work in a transaction that is rolled back: the counts are exact.
            session = db.new_session(engine)
            try:
                report = retention.run(
                    session, policy=policy, key=settings.token_key(), now=utcnow()
                )
            finally:
                session.rollback()
                session.close()
        else:
            with db.session_scope(engine) as session:
                report = retention.run(
                    session, policy=policy, key=settings.token_key(), now=utcnow()
                )
                audit.record(
                    session, actor=_cli_actor(), action="retention.run", target=None,
                    outcome="ok", now=utcnow(), detail=report.as_dict(),
                )  # fmt: skip
            retention.log_done(report)
    finally:
        engine.dispose()
    if dry_run:
        typer.echo("dry run: nothing changed; would remove:", err=True)
    for name, count in report.as_dict().items():
        typer.echo(f"{name}\t{count}")


@subscriber_cli.command("proof")
def subscriber_proof(
    who: Annotated[str, typer.Argument(help="The subscriber's id, or the address.")],
    list_slug: Annotated[str, typer.Option("--list", help="The list's slug.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of text.")] = False,
) -> None:
    """Print a subscriber's proof of consent: ledger events and the exact wording shown."""
    from app import consent, errors, lists
    from app.api.admin_data import proof_out
    from app.models import utcnow

    settings = _settings()
    if who.isdigit():

        def work(session: Any) -> Any:
            lists.get(session, slug=list_slug)  # an unknown list is bad input, as by address
            item = consent.proof_by_id(session, subscription_id=int(who))
            if item.list_slug != list_slug:
                raise errors.NotFound(f"Subscriber {who} is not on the list {list_slug!r}.")
            return item

    else:
        address = _address(who, new=False)

        def work(session: Any) -> Any:
            return consent.proof_by_address(session, list_slug=list_slug, email_key=address.key)

    item = _audited_run(
        settings, action="subscriber.consent_proof", target=f"{list_slug}:{who}", work=work,
        about_list=list_slug,
    )  # fmt: skip
    now = utcnow()
    if as_json:
        typer.echo(proof_out(item, generated_at=now).model_dump_json(indent=2))
    else:
        typer.echo(consent.render_text(item, generated_at=now), nl=False)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
