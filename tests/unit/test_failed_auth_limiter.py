"""The per-address failed-authentication limiter: which addresses count together, and its window."""

from __future__ import annotations

import ipaddress

import attrs
from hypothesis import given
from hypothesis import strategies as st

from authz_sidecar.limiter import FailedAuthLimiter, address_group


@attrs.define
class Clock:
    """A wall clock tests move by hand."""

    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@given(st.integers(0, 2**128 - 1), st.integers(0, 2**64 - 1))
def test_every_address_of_one_ipv6_64_is_one_group(address: int, other_low: int) -> None:
    """Two IPv6 addresses with the same first 64 bits count as one client (its /64); one with other
    first 64 bits does not."""
    ip = ipaddress.IPv6Address(address)
    if ip.ipv4_mapped is not None:
        return  # mapped IPv4 addresses are grouped as IPv4 (the test below)
    sibling = ipaddress.IPv6Address((address >> 64 << 64) | other_low)
    assert (
        address_group(str(ip))
        == address_group(str(sibling))
        == str(ipaddress.IPv6Network((address >> 64 << 64, 64)))
    )
    neighbour = ipaddress.IPv6Address(address ^ (1 << 64))
    if neighbour.ipv4_mapped is None:
        assert address_group(str(neighbour)) != address_group(str(ip))


def test_ipv4_and_ipv4_mapped_ipv6_are_one_group_and_distinct_per_address() -> None:
    """`::ffff:192.0.2.5` counts as 192.0.2.5; IPv4 addresses are never grouped with each other;
    bracketed and zoned spellings and unparsable text do not raise."""
    assert address_group("::ffff:192.0.2.5") == address_group("192.0.2.5") == "192.0.2.5"
    assert address_group("192.0.2.6") != address_group("192.0.2.5")
    assert address_group("[2001:db8::1]") == address_group("2001:db8::2") == "2001:db8::/64"
    assert address_group("fe80::1%eth0") == "fe80::/64"
    assert address_group("not an address") == "not an address"


def test_one_ipv6_64_shares_one_allowance() -> None:
    """With 3 failures a minute, three addresses of one /64 block a fourth of the same /64 until the
    minute turns; another /64 and the IPv4 address a mapped one carries are counted apart."""
    clock = Clock()
    limiter = FailedAuthLimiter(limit=3, clock=clock)
    for host in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff:ffff:ffff:ffff"):
        assert limiter.retry_after(host) is None
        limiter.failed(host)
    assert limiter.retry_after("2001:db8:1:2:abcd::99") == 60 - int(clock.now % 60)
    assert limiter.retry_after("2001:db8:1:3::1") is None
    for _ in range(3):
        limiter.failed("::ffff:198.51.100.9")
    assert limiter.retry_after("198.51.100.9") is not None
    clock.now += 60
    assert limiter.retry_after("2001:db8:1:2::1") is None
