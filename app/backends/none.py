"""The `none` backend: accepts every change and only logs it (development, tests)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from app.addresses import mask
from app.backends.base import Member, MembersPage

log = logging.getLogger(__name__)


class NoneBackend:
    max_batch = 1000
    keeps_unsubscribed = True

    def add(self, members: Sequence[Member]) -> str:
        log.info("backend.none.add count=%d", len(members))
        return f"none: {len(members)} member(s) added"

    def unsubscribe(self, address: str) -> str:
        log.info("backend.none.unsubscribe address=%s", mask(address))
        return "none: unsubscribed"

    def remove(self, address: str) -> str:
        log.info("backend.none.remove address=%s", mask(address))
        return "none: removed"

    def members(self, cursor: str | None = None) -> MembersPage:
        return MembersPage(members=[], next_cursor=None)

    def clear_suppression(self, address: str) -> str | None:
        return None
