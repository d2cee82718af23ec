"""Rate limits, counted by the `limits` library in moving windows.

Counters live in this process (`memory://`), or in Redis when `redis_url` is set, so that every
replica counts together. Two places ask:

- the public routes, before any database work: `await limiter.check_client(ip)` raises
  `errors.RateLimited` (429 with `Retry-After`) past `rate_limit_per_ip`;
- the state machine, right where a mail that a visitor's request causes would be queued:
  `limiter.allow_mail(address)` is its `subscriptions.MailBudget`. Past the per-address or the
  per-domain limit the mail is not sent and the answer does not change (no enumeration); past
  the global `mail_budget` the mail is sent later and operators are told.

The first check is async (redis.asyncio), so the event loop never waits on Redis; the second
is sync (redis-py), because it runs inside the request's one thread-pool call that holds the
database transaction, and only when a mail is certain to go otherwise.

When the counters cannot be reached, requests go through and an error is logged (once per
few seconds and check, with the count of requests let through unchecked): a Redis outage
must not stop sign-ups, and the resend interval still bounds the mails per address. After a
failure a check leaves the counters alone for those few seconds: a Redis that does not
answer costs a request `REDIS_TIMEOUT` per check, and the mail check waits inside the
group commit (app/writer.py), so every sign-up and confirmation waited in turn for each one
before it (ten together: eleven seconds).

Keys (after the prefix): `ip/<ip or IPv6 /64>`, `address/<HMAC of the address's inbox>` (no
address in clear in Redis; `mailbox_key`), `domain/<domain>`, `mail-budget`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import limits
import limits.aio.storage
import limits.aio.strategies
import limits.storage
import limits.strategies
from limits import RateLimitItem
from limits.errors import StorageError

from app import addresses, errors
from app.config import Settings
from app.subscriptions import SEND_NOW, MailPermit

if TYPE_CHECKING:
    import redis
    import redis.asyncio

log = logging.getLogger(__name__)

# Seconds to reach Redis before letting the request through.
REDIS_TIMEOUT = 1.0


def _items(value: str | None) -> list[RateLimitItem]:
    return limits.parse_many(value) if value else []


def client_key(ip: str | None) -> str:
    """What one client's requests count under: its IP, or the /64 an IPv6 host owns."""
    if ip is None:
        return "unknown"
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        # One host gets a whole /64: counting single addresses would let it pick new ones.
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


# Domains whose mailboxes ignore the dots before the @-sign, and their one name.
_DOTLESS_DOMAINS = {"gmail.com": "gmail.com", "googlemail.com": "gmail.com"}


def mailbox_key(address: addresses.Address) -> str:
    """The inbox that mail to `address` lands in, as far as the per-address limit counts:
    without its `+tag` (`victim+1@` and `victim+2@` reach one inbox at most providers),
    and at Gmail without dots. Each spelling is a subscriber of its own; counted apart, a
    bot varying the tag mailed one person past the limit, up to the domain's."""
    local, _, domain = address.key.rpartition("@")
    local = local.partition("+")[0] or local
    if domain in _DOTLESS_DOMAINS:
        domain = _DOTLESS_DOMAINS[domain]
        local = local.replace(".", "")
    return f"{local}@{domain}"


class FailureLog:
    """`ratelimit.storage_failed` for one check, at most once per `every` seconds, with the
    count of requests let through unchecked since the last line: during an outage under load
    every request wrote its own ERROR line (two for a sign-up). For `every` seconds after a
    failure, `skipping` lets requests through without asking the counters (see the module
    docstring). Called from the event loop and from the thread pool, hence the lock."""

    def __init__(self, check: str, every: float = 5.0) -> None:
        self.check = check
        self.every = every
        self._count = 0
        self._reported_at = -math.inf
        self._failed_at = -math.inf
        self._lock = threading.Lock()

    def skipping(self) -> bool:
        """True (and the request counted as let through) shortly after a failure."""
        with self._lock:
            if time.monotonic() - self._failed_at >= self.every:
                return False
            self._count += 1
            return True

    def failed(self, error: Exception) -> None:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            self._failed_at = now
            if now - self._reported_at < self.every:
                return
            count, self._count, self._reported_at = self._count, 0, now
        log.error(
            "ratelimit.storage_failed check=%s unchecked=%d error=%r", self.check, count, error
        )


class RateLimiter:
    """The service's rate limits over one counter storage (see the module docstring)."""

    def __init__(
        self,
        *,
        per_ip: str | None,
        per_address: str | None,
        per_domain: str | None,
        mail_budget: str | None,
        address_key: bytes,
        redis_url: str | None = None,
        key_prefix: str = "newsletter",
        on_mail_budget_exceeded: Callable[[], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.per_ip = _items(per_ip)
        self.per_address = _items(per_address)
        self.per_domain = _items(per_domain)
        self.mail_budget = _items(mail_budget)
        self._address_key = address_key
        # The metric of issue 7 plugs in here; the warning below is written either way.
        self._on_mail_budget_exceeded = on_mail_budget_exceeded
        # Told the scope ("ip", "address", "domain") of each refusal, for the metrics.
        self._on_refused = on_refused
        self._client_failures = FailureLog("client")
        self._mail_failures = FailureLog("mail")
        self._pool: redis.ConnectionPool | None = None
        self._async_pool: redis.asyncio.ConnectionPool | None = None
        sync_storage: limits.storage.Storage
        async_storage: limits.aio.storage.Storage
        if redis_url is None:
            sync_storage = limits.storage.MemoryStorage()
            async_storage = limits.aio.storage.MemoryStorage()
        else:
            # Only here: redis-py is ~4 MB of modules a server counting in memory never uses.
            import redis
            import redis.asyncio

            timeouts: dict[str, Any] = {
                "socket_timeout": REDIS_TIMEOUT,
                "socket_connect_timeout": REDIS_TIMEOUT,
            }
            self._pool = redis.ConnectionPool.from_url(redis_url, **timeouts)
            self._async_pool = redis.asyncio.ConnectionPool.from_url(redis_url, **timeouts)
            # The storages use our pools (closed on shutdown); the URL only names the kind.
            scheme = "rediss" if redis_url.startswith("rediss:") else "redis"
            sync_storage = limits.storage.RedisStorage(
                f"{scheme}://",
                connection_pool=self._pool,
                key_prefix=key_prefix,
                wrap_exceptions=True,
            )
            async_options: dict[str, Any] = {"connection_pool": self._async_pool}
            async_storage = limits.aio.storage.RedisStorage(
                f"async+{scheme}://",
                implementation="redispy",
                key_prefix=key_prefix,
                wrap_exceptions=True,
                **async_options,
            )
        self._sync = limits.strategies.MovingWindowRateLimiter(sync_storage)
        self._async = limits.aio.strategies.MovingWindowRateLimiter(async_storage)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        on_mail_budget_exceeded: Callable[[], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> RateLimiter:
        return cls(
            per_ip=settings.rate_limit_per_ip,
            per_address=settings.rate_limit_per_address,
            per_domain=settings.rate_limit_per_domain,
            mail_budget=settings.mail_budget,
            address_key=settings.token_key(),
            redis_url=settings.redis_url,
            key_prefix=settings.rate_limit_key_prefix,
            on_mail_budget_exceeded=on_mail_budget_exceeded,
            on_refused=on_refused,
        )

    async def aclose(self) -> None:
        if self._async_pool is not None:
            await self._async_pool.disconnect()
        if self._pool is not None:
            self._pool.disconnect()

    async def check_client(self, ip: str | None) -> None:
        """Count one request from `ip`; `errors.RateLimited` once it is over its limit."""
        if not self.per_ip or self._client_failures.skipping():
            return
        who = client_key(ip)
        try:
            for item in self.per_ip:
                if not await self._async.hit(item, "ip", who):
                    stats = await self._async.get_window_stats(item, "ip", who)
                    retry_after = max(1, math.ceil(stats.reset_time - time.time()))
                    log.debug("ratelimit.client_refused limit=%s retry_after=%s", item, retry_after)
                    self._refused("ip")
                    raise errors.RateLimited(retry_after=retry_after)
        except StorageError as e:
            self._client_failures.failed(e.storage_error)

    def allow_mail(self, address: addresses.Address) -> MailPermit:
        """May `address` be mailed now? Consumes the budgets (a `subscriptions.MailBudget`).

        Asked in order, each only if the one before allowed the mail, so that a flood at one
        address does not use up its domain's budget, nor a flood at one domain the global one.
        """
        if self._mail_failures.skipping():
            return SEND_NOW
        try:
            if not self._hit_all(self.per_address, "address", self._address_id(address)):
                self._refused("address")
                return MailPermit(send=False, reason="address_rate_limit")
            domain = address.key.rpartition("@")[2]
            if not self._hit_all(self.per_domain, "domain", domain):
                self._refused("domain")
                return MailPermit(send=False, reason="domain_rate_limit")
            return self._within_budget()
        except StorageError as e:
            self._mail_failures.failed(e.storage_error)
            return SEND_NOW

    def _refused(self, scope: str) -> None:
        if self._on_refused is not None:
            self._on_refused(scope)

    def _hit_all(self, items: list[RateLimitItem], *identifiers: str) -> bool:
        return all(self._sync.hit(item, *identifiers) for item in items)

    def _address_id(self, address: addresses.Address) -> str:
        digest = hmac.new(
            self._address_key, b"ratelimit:" + mailbox_key(address).encode(), hashlib.sha256
        )
        return digest.hexdigest()[:32]

    def _within_budget(self) -> MailPermit:
        for item in self.mail_budget:
            if self._sync.hit(item, "mail-budget"):
                continue
            stats = self._sync.get_window_stats(item, "mail-budget")
            until_free = max(0.0, stats.reset_time - time.time())
            # Spread over the next window: the held-back mails do not all leave at the
            # moment the window frees, in one burst over the budget.
            delay = timedelta(
                seconds=max(1, math.ceil(until_free + random.uniform(0, item.get_expiry())))
            )
            log.warning(
                "ratelimit.global_budget_exceeded budget=%s delay_seconds=%d",
                item,
                delay.total_seconds(),
            )
            if self._on_mail_budget_exceeded is not None:
                self._on_mail_budget_exceeded()
            return MailPermit(delay=delay, reason="mail_budget")
        return SEND_NOW
