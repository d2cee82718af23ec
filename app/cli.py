"""`newsletter ...`: serve, worker, migrate, openapi."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console

from app.config import Settings, SettingsError, load_settings

_err = Console(stderr=True)
cli = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


def _settings() -> Settings:
    try:
        settings = load_settings()
    except SettingsError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from e
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    return settings


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1,
) -> None:
    """Serve the API (with the outbox worker inside unless NEWSLETTER_RUN_WORKER=false)."""
    import uvicorn

    settings = _settings()
    if settings.auto_migrate:
        from app import migrations

        migrations.upgrade(settings.database_url)
    typer.echo(f"serving on http://{host}:{port} (database: {settings.database_url})", err=True)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        proxy_headers=False,
        log_level=settings.log_level.lower(),
    )


@cli.command()
def worker() -> None:
    """Run the outbox worker alone; SIGTERM finishes the jobs in hand and gives back the rest."""
    from app import db, lists
    from app.mailer import make_mailer
    from app.models import utcnow
    from app.worker import Worker

    settings = _settings()
    engine = db.make_engine(settings.database_url)
    with db.session_scope(engine) as session:
        lists.sync_from_settings(session, declared=settings.lists, now=utcnow())
    runner = Worker(engine=engine, settings=settings, mailer=make_mailer(settings.mailer))

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        runner.request_stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    runner.run()
    runner.stop()
    engine.dispose()


@cli.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Bring the database schema to a revision (the latest by default)."""
    from app import migrations

    settings = _settings()
    migrations.upgrade(settings.database_url, revision)
    typer.echo(f"database at {revision}")


@cli.command()
def openapi(
    output: Annotated[Path | None, typer.Option(help="Write to this file.")] = None,
) -> None:
    """Print (or write) the OpenAPI document generated from the app."""
    from app.main import create_app

    document = json.dumps(create_app(Settings()).openapi(), indent=2, ensure_ascii=False) + "\n"
    if output is None:
        typer.echo(document, nl=False)
    else:
        output.write_text(document, encoding="utf-8")
        typer.echo(f"wrote {output}", err=True)


def _backend_for(settings: Settings, slug: str) -> tuple[Any, Any]:
    from app import backends

    declared = settings.list_settings(slug)
    if declared is None:
        known = ", ".join(item.slug for item in settings.lists)
        typer.echo(f"no list {slug!r} in the settings (known: {known})", err=True)
        raise typer.Exit(2)
    client = backends.make_client(
        connect_timeout=settings.backend_connect_timeout, timeout=settings.backend_timeout
    )
    return backends.make_backend(declared.backend, client), client


def _read_members(backend: Any, *, label: str) -> dict[str, tuple[str, bool]]:
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from app import sync
    from app.backends.base import SyncError

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), transient=True, console=_err
    ) as progress:
        task = progress.add_task(f"reading members from {label}", total=None)
        seen = 0

        def advance(count: int) -> None:
            nonlocal seen
            seen += count
            progress.update(task, description=f"reading members from {label}: {seen}")

        try:
            return sync.read_backend(backend, progress=advance)
        except SyncError as e:
            typer.echo(f"the backend failed: {e} {e.response or ''}", err=True)
            raise typer.Exit(1) from e


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
        with db.session_scope(engine) as session:
            lists.sync_from_settings(session, declared=settings.lists, now=utcnow())
        remote = _read_members(backend, label=list_slug)
        with db.session_scope(engine) as session:
            report = sync.compare(session, list_slug=list_slug, remote=remote)
            if apply and not report.in_sync:
                sync.apply(session, report=report, now=utcnow())
    finally:
        client.close()
        engine.dispose()
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print_report(report)
    if not report.in_sync and not apply:
        raise typer.Exit(3)


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
    ):
        typer.echo(f"  {len(items)} {title}")
        for item in items[:20]:
            typer.echo(f"    {item}")
        if len(items) > 20:
            typer.echo(f"    ... and {len(items) - 20} more (--json for all)")
    if report.in_sync:
        typer.echo("  in sync")
    elif report.applied:
        typer.echo("  fixes enqueued; the worker applies them")
    else:
        typer.echo("  run again with --apply to fix")


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
        with db.session_scope(engine) as session:
            lists.sync_from_settings(session, declared=settings.lists, now=utcnow())
        remote = _read_members(backend, label=list_slug)
        with db.session_scope(engine) as session:
            report = sync.import_members(
                session,
                list_slug=list_slug,
                remote=remote,
                backend_kind=declared.backend.kind,
                now=utcnow(),
            )
            if dry_run:
                session.rollback()
    finally:
        client.close()
        engine.dispose()
    verb = "would import" if dry_run else "imported"
    typer.echo(
        f"list {list_slug}: read {report.read}; {verb} {report.confirmed} confirmed and "
        f"{report.unsubscribed} unsubscribed; {report.already_known} already known; "
        f"{len(report.invalid)} invalid"
    )
    for address in report.invalid[:20]:
        typer.echo(f"  invalid: {address!r}")


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


def main() -> None:
    cli()
