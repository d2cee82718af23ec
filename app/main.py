"""The application factory. The lifespan owns the engine and the in-process worker."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from app import db, errors, httpserver, lists, logs, migrations, ratelimit, readiness, runtime
from app.api import admin as admin_api
from app.api import (
    admin_data,
    admin_privacy,
    admin_transfer,
    docs,
    handlers,
    health,
    public,
    webhooks,
)
from app.api.deps import Database
from app.config import Settings, load_settings
from app.mailer import make_mailer
from app.metrics import Metrics, RequestMetrics
from app.middleware import (
    BodyLimit,
    HeadAsGet,
    PagePolicy,
    PublicCors,
    RequestId,
    SecurityHeaders,
    SlashRedirect,
)
from app.worker import Worker

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
# The in-process worker gives way while requests wait for the database (the group writer's),
# and while a request is being answered and another arrived within this many seconds
# (Metrics.busy_with_requests): a round of the worker's that holds up the writes also
# holds up the arrivals, so these alone would soon read as a pause.
BUSY_WINDOW = 0.05


def _form_targets(settings: Settings) -> list[str]:
    """Origins a page's form may lead to: the thank-you pages on the site."""
    origins = set()
    for item in settings.lists:
        for url in (item.thank_you_url, item.landing_url):
            if url is not None:
                parts = urlsplit(str(url))
                origins.add(f"{parts.scheme}://{parts.netloc}")
    return sorted(origins)


def _style_origins(settings: Settings) -> list[str]:
    """The DSFR stylesheet's origin when it is served from elsewhere."""
    url = settings.dsfr_stylesheet_url
    if url is None:
        return []
    parts = urlsplit(str(url))
    return [f"{parts.scheme}://{parts.netloc}"]


def serve_app() -> FastAPI:
    """`newsletter serve`'s factory: each uvicorn process sets up its logging, then the app."""
    settings = load_settings()
    logs.configure(level=settings.log_level, fmt=settings.log_format)
    httpserver.DeadlineHttp.configure(timeout=settings.client_timeout.total_seconds())
    return create_app(settings, settle=True)


def create_app(settings: Settings | None = None, *, settle: bool = False) -> FastAPI:
    """The app; `settle` freezes the start-up heap once it is up (app/runtime.py): a
    process that serves it and nothing else."""
    settings = settings or load_settings()
    logs.install_redaction()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = db.make_engine(settings.database_url)
        if settings.auto_migrate and await run_in_threadpool(migrations.pending, engine):
            await run_in_threadpool(migrations.upgrade, settings.database_url)
        try:
            await run_in_threadpool(migrations.require_head, engine)
        except migrations.SchemaNotAtHead:
            engine.dispose()
            raise
        await run_in_threadpool(lists.sync_declared, engine, declared=settings.lists)
        # SQLite: the WAL is copied back by a thread of its own, not by request commits.
        checkpointer = db.Checkpointer.start_for(engine)
        worker = None
        if settings.run_worker:
            worker = Worker(
                engine=engine,
                settings=settings,
                mailer=make_mailer(settings.mailer, public_host=settings.public_url.host),
                metrics=metrics,
                busy=lambda: (
                    database.writer.waiting > 0 or metrics.busy_with_requests(within=BUSY_WINDOW)
                ),
            )
        # Built in the running loop: its async Redis connections belong to this loop.
        limiter = ratelimit.RateLimiter.from_settings(
            settings,
            on_mail_budget_exceeded=lambda: metrics.limited("mail_budget"),
            on_refused=metrics.limited,
        )
        collector = metrics.watch_database(
            engine, heartbeat_timeout=settings.worker_heartbeat_timeout
        )
        app.state.engine = engine
        app.state.worker = worker
        # Of this event loop: the check under way is awaited here.
        app.state.readiness = readiness.Probe()
        database = Database(engine, on_outbox_commit=worker.wake if worker else None)
        app.state.database = database
        if worker is not None:
            worker.start()
        app.state.rate_limiter = limiter
        log.info(
            "app.started database=%s worker=%s rate_limit_counters=%s lists=%s",
            engine.dialect.name,
            "in-process" if worker else "external",
            "redis" if settings.redis_url else "memory",
            ",".join(item.slug for item in settings.lists),
        )
        if settle:
            runtime.settle()
        try:
            yield
        finally:
            await run_in_threadpool(database.close)
            if worker is not None:
                await run_in_threadpool(worker.stop)
            await limiter.aclose()
            metrics.registry.unregister(collector)
            if checkpointer is not None:
                await run_in_threadpool(checkpointer.stop)
            engine.dispose()
            log.info("app.stopped")

    app = FastAPI(
        title="BlueHats newsletter subscriptions",
        version="1.0.0",
        description=(
            "Double opt-in subscriptions for public bodies' newsletters, with a consent "
            "ledger, and confirmed members synced to the mailing-list backend."
        ),
        lifespan=lifespan,
        # Replaced by SlashRedirect below, which does not write the Host header into the
        # Location.
        redirect_slashes=False,
        # /docs is app/api/docs.py's (its files checked by their hashes); no ReDoc, which
        # would fetch an unpinned release and Google's fonts.
        docs_url=None,
        redoc_url=None,
    )
    app.router.default = SlashRedirect(app.router.routes, fallback=app.router.default)
    app.state.settings = settings
    # The pages' CSP; a page whose form leads elsewhere too adds to it (app.api.views).
    policy = PagePolicy(
        form_targets=tuple(_form_targets(settings)),
        style_origins=tuple(_style_origins(settings)),
        scripts=settings.proof_of_work_bits > 0,
    )
    app.state.page_policy = policy
    # The pages after a link's button, each rendered once (app.api.public._result_page).
    app.state.result_pages = {}
    app.state.metrics = metrics
    app.state.engine = None
    app.state.worker = None
    app.state.readiness = None
    app.state.database = None
    app.state.rate_limiter = None
    handlers.install(app)
    # Every route that reaches the database may answer 503 while it is away.
    database_gone = errors.responses(errors.DatabaseUnavailable)
    # A request is matched against the routes in this order, one after another: the
    # probes first (a load balancer's, every few seconds), then the public routes. Last,
    # `/healthz` was matched against every admin route first: a third of its CPU.
    app.include_router(health.router)
    app.include_router(public.router, responses=database_gone)
    app.include_router(admin_api.router, responses=database_gone)
    app.include_router(admin_privacy.router, responses=database_gone)
    app.include_router(admin_transfer.router, responses=database_gone)
    app.include_router(admin_data.router, responses=database_gone)
    app.include_router(webhooks.router, responses=database_gone)
    app.include_router(docs.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        # Browsers ask for it beside every page. No icon of its own: an empty answer they
        # keep a day, rather than a 404 in the access log and the metrics for each visit.
        return Response(status_code=204, headers={"cache-control": "public, max-age=86400"})

    # Innermost: a 500 still passes through every layer below (request id, headers, metrics).
    app.add_middleware(handlers.UnexpectedErrors)
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        # Mailgun retries a refused event for hours: let any real event through.
        by_prefix={"/v1/webhooks/": max(settings.max_body_bytes, 1024 * 1024)},
        # A CSV import is streamed to a temporary file, up to its own cap.
        by_pattern={admin_transfer.IMPORT_PATH_PATTERN: settings.max_import_bytes},
        refusal=handlers.body_too_large,
    )
    app.add_middleware(SecurityHeaders, policy=policy, https=settings.public_url.scheme == "https")
    app.add_middleware(PublicCors, origins=settings.form_origins())
    app.add_middleware(RequestMetrics, metrics=metrics, router=app)
    app.add_middleware(HeadAsGet)
    # Outermost: every line logged while answering, and the access line, carry the id.
    app.add_middleware(RequestId)
    return app
