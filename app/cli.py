"""`newsletter ...`: serve, worker, migrate, openapi."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from app.config import Settings, SettingsError, load_settings

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


def main() -> None:
    cli()
