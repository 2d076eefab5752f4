"""A limiter on failed authentications per client address, so key guessing costs the guesser.

A fixed one-minute window per address, in process: once an address has failed `limit` times in
the current minute, its further requests are refused with 429 before any key work. The address
is Caddy's `{client_ip}` (authz_sidecar/authz.py, `client_address`). IPv6 addresses count per /64
(one subscriber usually holds a whole /64, so counting single addresses would let one host rotate
through 2^64 of them) and IPv4-mapped IPv6 addresses count as the IPv4 address they carry. State
is bounded: the table is cleared when the minute turns.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable

import attrs

IPV6_GROUP = 64


def address_group(address: str) -> str:
    """The bucket an address counts in: an IPv4 address as it is, an IPv6 address by its /64, an
    IPv4-mapped IPv6 address as its IPv4 address; anything unparsable as the text it is."""
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]").split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_GROUP), strict=False))
    return str(ip)


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
        if self._failures.get(address_group(address), 0) >= self.limit:
            return max(1, math.ceil(start + self.window - self.clock()))
        return None

    def failed(self, address: str | None) -> None:
        """Count one failed authentication."""
        if address is None:
            return
        self._roll()
        group = address_group(address)
        if group not in self._failures and len(self._failures) >= self.max_addresses:
            return  # a flood from very many addresses: stay bounded; per-key work is cheap anyway
        self._failures[group] = self._failures.get(group, 0) + 1
