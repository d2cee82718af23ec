"""Prometheus metrics (prometheus-client), one registry per app or worker process.

Counted as things happen, in the process where they happen:
    newsletter_http_requests_total{method,route,status}       route = the path template
    newsletter_http_request_duration_seconds{method,route,status}   (never a raw path:
                                                               tokens and addresses live there)
    newsletter_outbox_attempts_total{kind,outcome}            mail / sync / reconcile attempts:
                                                               success, skipped, retry, dead
    newsletter_rate_limited_total{scope}                      ip (429s), address and domain
                                                               (mail suppressed), mail_budget
                                                               (mail delayed)
Read from the database at scrape time (cheap GROUP BY queries on indexed columns):
    newsletter_subscriptions{list,status}
    newsletter_outbox_jobs{kind,state}                        pending, running, dead
    newsletter_outbox_oldest_job_age_seconds{kind}            longest wait of a due job
    newsletter_worker_heartbeat_age_seconds                   newest heartbeat of any worker
    newsletter_workers_alive                                  heartbeats within the timeout
    newsletter_database_up                                    0 when those queries failed

The API process's registry holds the worker counters when the worker runs inside it; an
external `newsletter worker --metrics-port P` serves its own registry on loopback (`serve`),
behind the same NEWSLETTER_METRICS_TOKEN as the API's /metrics.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import secrets
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import db, formguard, heartbeat, outbox
from app.models import (
    JobKind,
    JobState,
    MailingList,
    OutboxJob,
    Subscription,
    as_utc,
    utcnow,
)

if TYPE_CHECKING:
    from pydantic import SecretStr

log = logging.getLogger(__name__)

_PARAMETER = re.compile(r"\{[^}]+\}")
ATTEMPT_OUTCOMES = ("success", "skipped", "retry", "dead")
RATE_LIMIT_SCOPES = ("ip", "address", "domain", "mail_budget")
# A public POST takes milliseconds; a CSV import or export may take minutes.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


class Metrics:
    """The counters of one process, in their own registry (tests build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # HTTP requests being answered, and when the latest arrived (time.monotonic), for
        # `busy_with_requests`. Read from the worker's thread: hints, not exact counts.
        self.in_flight = 0
        self.last_request_at = float("-inf")
        self.http_requests = Counter(
            "newsletter_http_requests",
            "HTTP requests answered, by route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "newsletter_http_request_duration_seconds",
            "Time to answer HTTP requests, by route template and status.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.outbox_attempts = Counter(
            "newsletter_outbox_attempts",
            "Outbox job attempts made by the worker(s) of this process, by kind and outcome.",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "newsletter_rate_limited",
            "Requests refused (ip: 429) and mails suppressed or delayed by a rate limit.",
            ["scope"],
            registry=self.registry,
        )
        # Zeros from the start: a rate() over a series that appears late misses its first hit.
        for kind in JobKind:
            for outcome in ATTEMPT_OUTCOMES:
                self.outbox_attempts.labels(kind=kind.value, outcome=outcome)
        for scope in RATE_LIMIT_SCOPES:
            self.rate_limited.labels(scope=scope)
        self.registry.register(FormGuardCollector())

    def busy_with_requests(self, *, within: float) -> bool:
        """A request is being answered and another arrived in the last `within` seconds:
        the process is loaded (not one long request alone, nor light traffic, whose requests
        are rarely in flight when this is asked). The in-process worker gives way then."""
        return self.in_flight > 0 and time.monotonic() - self.last_request_at < within

    def attempt(self, kind: str, outcome: str, count: int = 1) -> None:
        self.outbox_attempts.labels(kind=kind, outcome=outcome).inc(count)

    def limited(self, scope: str) -> None:
        self.rate_limited.labels(scope=scope).inc()

    def watch_database(self, engine: Engine, *, heartbeat_timeout: timedelta) -> Collector:
        collector = DatabaseCollector(engine, heartbeat_timeout=heartbeat_timeout)
        self.registry.register(collector)
        return collector


class FormGuardCollector(Collector):
    """Form posts refused by the robot screen (app/formguard.py counts them for the process)."""

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "newsletter_form_rejections",
            "Form posts refused by the robot screen, by reason: too_fast and too_old get "
            "the form back to send again, the others a success's answer.",
            labels=["reason"],
        )
        counts = formguard.rejection_counts()
        for verdict in formguard.Verdict:
            if verdict is not formguard.Verdict.ACCEPTED:
                family.add_metric([verdict.value], counts.get(verdict.value, 0))
        yield family


# A scrape whose database reads get no answer in this long says `newsletter_database_up 0`.
READ_DEADLINE_S = 3.0


def _settle_with(future: Future[list[Metric]], read: Callable[[], list[Metric]]) -> None:
    try:
        future.set_result(read())
    except BaseException as e:  # handed to whoever waits on the future
        future.set_exception(e)


class DatabaseCollector(Collector):
    """Gauges read from the database when Prometheus scrapes (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        *,
        heartbeat_timeout: timedelta,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.heartbeat_timeout = heartbeat_timeout
        self.now = now
        # The read under way, which a scrape that comes meanwhile waits on (`_read_in_time`).
        self._under_way: Future[list[Metric]] | None = None
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        # Nothing: describing would run the queries when the collector is registered.
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "newsletter_database_up", "1 when the scrape's database queries succeeded."
        )
        try:
            families = self._read_in_time()
        except SQLAlchemyError as e:
            log.warning(
                "metrics.database_unreachable error=%s %s",
                type(e).__name__,
                db.failure(self.engine, e),
            )
            up.add_metric([], 0)
            yield up
            return
        except TimeoutError:
            log.warning(
                "metrics.database_silent seconds=%g %s",
                READ_DEADLINE_S,
                db.shown_where(self.engine),
            )
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read_in_time(self) -> list[Metric]:
        """`_read()`, in a thread of its own, waited for `READ_DEADLINE_S` at most; one
        at a time, a scrape that comes meanwhile waiting on the one under way. The driver
        has no read timeout: against a database that hangs, each scrape held a thread of
        the pool that also answers `/healthz` for as long as it hung, one more every
        scrape, until none was left."""
        with self._lock:
            under_way = self._under_way
            if under_way is None or under_way.done():
                under_way = self._under_way = Future()
                threading.Thread(
                    target=_settle_with, args=(under_way, self._read), daemon=True,
                    name="metrics-database-read",
                ).start()  # fmt: skip
        return under_way.result(timeout=READ_DEADLINE_S)

    def _read(self) -> list[Metric]:
        now = self.now()
        with db.session_scope(self.engine) as session:
            subscriptions = subscription_counts(session)
            jobs = outbox_depth(session, now=now)
            newest = heartbeat.newest(session)
            alive = heartbeat.alive(session, since=now - self.heartbeat_timeout)

        by_list = GaugeMetricFamily(
            "newsletter_subscriptions",
            "Subscriptions by list and status.",
            labels=["list", "status"],
        )
        for (slug, status), count in sorted(subscriptions.items()):
            by_list.add_metric([slug, status], count)

        depth = GaugeMetricFamily(
            "newsletter_outbox_jobs",
            "Outbox jobs not done, by kind and state.",
            labels=["kind", "state"],
        )
        oldest = GaugeMetricFamily(
            "newsletter_outbox_oldest_job_age_seconds",
            "How long the longest-waiting due outbox job has waited, by kind.",
            labels=["kind"],
        )
        oldest_by_kind: dict[str, datetime] = {}
        for (kind, state), (count, created_at) in sorted(jobs.items()):
            depth.add_metric([kind, state], count)
            if state != JobState.DEAD and created_at is not None:
                known = oldest_by_kind.get(kind)
                oldest_by_kind[kind] = created_at if known is None else min(known, created_at)
        for kind in JobKind:
            for state in (JobState.PENDING, JobState.RUNNING, JobState.DEAD):
                if (kind.value, state.value) not in jobs:
                    depth.add_metric([kind.value, state.value], 0)
            created = oldest_by_kind.get(kind.value)
            age = (now - created).total_seconds() if created is not None else 0.0
            oldest.add_metric([kind.value], max(0.0, age))

        workers = GaugeMetricFamily(
            "newsletter_workers_alive", "Workers whose heartbeat is within the timeout."
        )
        workers.add_metric([], alive)
        families: list[Metric] = [by_list, depth, oldest, workers]
        if newest is not None:
            age_family = GaugeMetricFamily(
                "newsletter_worker_heartbeat_age_seconds",
                "Seconds since the newest heartbeat of any worker.",
            )
            age_family.add_metric([], max(0.0, (now - newest).total_seconds()))
            families.append(age_family)
        return families


def subscription_counts(session: Session) -> dict[tuple[str, str], int]:
    rows = session.exec(
        select(MailingList.slug, Subscription.status, func.count())
        .join(MailingList, col(MailingList.id) == col(Subscription.list_id))
        .group_by(MailingList.slug, Subscription.status)
    ).all()
    return {(str(slug), str(status)): int(count) for slug, status, count in rows}


def outbox_depth(
    session: Session, *, now: datetime
) -> dict[tuple[str, str], tuple[int, datetime | None]]:
    """Count of the jobs not done, and since when the longest-waiting of them has waited
    (`outbox.waiting_since`: jobs not yet due do not count), by (kind, state).

    Done jobs, the bulk of the table, are left out by the `state` index.
    """
    rows = session.exec(
        select(OutboxJob.kind, OutboxJob.state, func.count(), func.min(outbox.waiting_since(now)))
        .where(col(OutboxJob.state).in_([JobState.PENDING, JobState.RUNNING, JobState.DEAD]))
        .group_by(OutboxJob.kind, OutboxJob.state)
    ).all()
    return {
        (str(kind), str(state)): (int(count), _as_utc(oldest))
        for kind, state, count, oldest in rows
    }


def _as_utc(value: object) -> datetime | None:
    """min() of a timestamp comes back raw (a string on SQLite): read it as UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        return None
    return as_utc(value)


def _template_pattern(template: str) -> re.Pattern[str]:
    """`/v1/confirm/{token}` -> a pattern matching `/v1/confirm/<anything but a slash>`."""
    return re.compile("[^/]+".join(re.escape(part) for part in _PARAMETER.split(template)))


class RouteNames:
    """The route template of a request: the one routing chose, or, when the answer came
    before routing (a 413 from the body cap), the documented path that matches."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._patterns: list[tuple[re.Pattern[str], str]] | None = None

    def _documented(self) -> list[tuple[re.Pattern[str], str]]:
        if self._patterns is None:
            openapi = getattr(self.app, "openapi", None)
            paths = openapi()["paths"] if callable(openapi) else {}
            self._patterns = [(_template_pattern(path), path) for path in paths]
        return self._patterns

    def __call__(self, scope: Scope) -> str:
        route = scope.get("route")
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return path or "/"
        # Starlette's own routes (the schema at /openapi.json) and mounts (/static) name no
        # `route`, only the endpoint they chose: counted as `<unmatched>`, a page served
        # passed for a 404.
        endpoint = scope.get("endpoint")
        if endpoint is not None:
            # Here, not at the top: the worker process imports this module, not the routing.
            from starlette.routing import Mount

            for candidate in getattr(self.app, "routes", ()):
                if isinstance(candidate, Mount) and candidate.app is endpoint:
                    return f"{candidate.path}/{{path}}"
                if getattr(candidate, "endpoint", None) is endpoint:
                    return str(candidate.path)
        for pattern, template in self._documented():
            if pattern.fullmatch(scope["path"]):
                return template
        # A 404: the raw path would let anyone mint new series.
        return "<unmatched>"


class RequestMetrics:
    """Counts each answer and its latency by method, route template and status."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, router: ASGIApp) -> None:
        self.app = app
        self.metrics = metrics
        # The app whose routes name the templates (the middleware only sees the next layer).
        self.route_of = RouteNames(router)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        self.metrics.last_request_at = time.monotonic()
        self.metrics.in_flight += 1

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.in_flight -= 1
            method = scope["method"]
            labels = {
                # Any verb a scanner makes up would be a new series.
                "method": method if method in KNOWN_METHODS else "OTHER",
                "route": self.route_of(scope),
                "status": str(status),
            }
            self.metrics.http_requests.labels(**labels).inc()
            self.metrics.http_duration.labels(**labels).observe(time.perf_counter() - started)


# The answer to a scrape without the token, through the API or the worker's port.
UNAUTHORIZED_DETAIL = "This endpoint needs Authorization: Bearer <NEWSLETTER_METRICS_TOKEN>."


def scrape_allowed(credentials: str | None, *, token: SecretStr | None) -> bool:
    """Whether a scrape may read the metrics: no NEWSLETTER_METRICS_TOKEN, or `credentials`
    (the bearer token the scraper sent) equal to it, compared in constant time."""
    if token is None:
        return True
    return credentials is not None and secrets.compare_digest(
        credentials.encode(), token.get_secret_value().encode()
    )


# Where Prometheus runs: loopback, link-local, RFC 1918 and RFC 4193 (unique local) networks.
# Not Python's `is_private`, which also counts the documentation and benchmarking ranges
# (192.0.2.0/24, 198.18.0.0/15, 2001:db8::/32...) and Teredo (2001::/32), a tunnel to any
# host on the Internet.
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(network)
    for network in (
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
)


def private_scraper(client: str | None) -> bool:
    """Whether a client (its IP as the rate limits see it) may scrape without a token: one on
    loopback or a private network, where Prometheus runs. The metrics tell a stranger what
    the public answers hide: the count of pending subscriptions grows after a sign-up for
    an address never seen, and stays for one already known. No IP (a Unix socket, an
    in-process client) is local."""
    if client is None:
        return True
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return True
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in PRIVATE_NETWORKS)


def bearer_credentials(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, read as FastAPI's HTTPBearer
    reads it for the API's /metrics."""
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return None
    return credentials


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    # One thread per scrape, as prometheus_client's own server; not waited for at exit.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (one every 15 s)."""


# Headers a reverse proxy adds to the requests it relays.
RELAY_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")
# The worker's port has no NEWSLETTER_TRUSTED_PROXIES to find the client behind a proxy.
WORKER_FORBIDDEN_DETAIL = (
    "Without NEWSLETTER_METRICS_TOKEN, a worker's metrics port answers loopback and private "
    "networks only, and no request relayed by a proxy."
)


def _answer(start_response: Any, status: str, body: bytes, *extra: tuple[str, str]) -> list[bytes]:
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    start_response(status, [*headers, *extra])
    return [body]


def exposition_app(registry: CollectorRegistry, *, token: SecretStr | None) -> Any:
    """The worker's metrics port as a WSGI app: prometheus_client's, behind the API's rules
    for /metrics. With NEWSLETTER_METRICS_TOKEN, 401 without it or with another; without it,
    403 to a scraper outside loopback and private networks (the subscription counts tell a
    stranger whether a sign-up's address was new), and to one a proxy relayed."""
    metrics_app = make_wsgi_app(registry)
    unauthorized = json.dumps({"error": "unauthorized", "detail": UNAUTHORIZED_DETAIL}).encode()
    forbidden = json.dumps({"error": "forbidden", "detail": WORKER_FORBIDDEN_DETAIL}).encode()
    relayed = ["HTTP_" + name.upper().replace("-", "_") for name in RELAY_HEADERS]

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        credentials = bearer_credentials(environ.get("HTTP_AUTHORIZATION"))
        if not scrape_allowed(credentials, token=token):
            return _answer(
                start_response, "401 Unauthorized", unauthorized, ("WWW-Authenticate", "Bearer")
            )
        if token is None and (
            not private_scraper(environ.get("REMOTE_ADDR"))
            or any(name in environ for name in relayed)
        ):
            return _answer(start_response, "403 Forbidden", forbidden)
        return metrics_app(environ, start_response)

    return app


def serve(
    registry: CollectorRegistry, *, host: str, port: int, token: SecretStr | None
) -> WSGIServer:
    """The registry on http://host:port/ in a daemon thread (the worker's metrics port), as
    `exposition_app` answers. Returns the server (`shutdown()` stops it)."""
    app = exposition_app(registry, token=token)

    # An IPv6 address (--metrics-host ::) needs an IPv6 socket.
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_ThreadingServer):
        address_family = family

    server = make_server(str(address[0]), port, app, Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-port", daemon=True).start()
    return server
