"""A limiter on failed authentications per client address, so key guessing costs the guesser.

A fixed one-minute window per address, in process: once an address has failed `limit` times in
the current minute, its further requests are refused with 429 before any key work. The address
comes from Caddy's X-Forwarded-For (Caddy replaces any client-sent value). State is bounded: the
table is cleared when the minute turns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import attrs


@attrs.define
class FailedAuthLimiter:
    """Counts failures per address per minute."""

    limit: int = 60
    window: float = 60.0
    clock: Callable[[], float] = time.time
    max_addresses: int = 100_000
    _window_start: float = 0.0
    _failures: dict[str, int] = attrs.field(factory=dict)

    def _roll(self) -> float:
        now = self.clock()
        start = now - (now % self.window)
        if start != self._window_start:
            self._window_start = start
            self._failures.clear()
        return start

    def retry_after(self, address: str | None) -> int | None:
        """Seconds until the address may try again, or None when it is not blocked."""
        if address is None or self.limit <= 0:
            return None
        start = self._roll()
        if self._failures.get(address, 0) >= self.limit:
            return max(1, math.ceil(start + self.window - self.clock()))
        return None

    def failed(self, address: str | None) -> None:
        """Count one failed authentication."""
        if address is None:
            return
        self._roll()
        if address not in self._failures and len(self._failures) >= self.max_addresses:
            return  # a flood from very many addresses: stay bounded; per-key work is cheap anyway
        self._failures[address] = self._failures.get(address, 0) + 1
