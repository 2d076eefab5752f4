"""A limiter on wrong secrets per key prefix, so guessing one key costs the guesser, not our Argon2.

A key's prefix is public and its checksum is computable, so anyone can send well-formed keys with a
real prefix; each one costs an Argon2id verification (~33 ms on one of a few slots). After `limit`
mismatches for one prefix within `window` seconds, further guesses for it are refused with 429
before Postgres and Argon2 (docs/DECISIONS.md, "Guessing one key"). The key's holder is not locked
out with the guessers: every successful verification stores a keyed digest of the token
(HMAC-SHA256 under a key derived from the pepper) for the prefix, and while the prefix is locked a
token matching that digest is accepted without Argon2 (its key and tenant are still read from
Postgres, so a revocation applies).

The state lives in Redis, shared by every sidecar replica (a per-replica count would give a guesser
`limit` times the number of replicas), one Lua call per check or count (`shared/lua/key_guesses.lua`).
It is bounded: only prefixes that exist can mismatch, each holds one counter that expires with its
window and one digest that expires after `verified_ttl`. When Redis fails the guard stays out of
the way (the per-address limiter and the bounded Argon2 pool still apply) and counts the error.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Callable
from importlib import resources
from typing import Any

import attrs
import coredis

from shared.redis_keys import RedisKeys

STORE_ERRORS = (coredis.exceptions.RedisError, OSError, TimeoutError)
_MEMO_LABEL = b"neuronetz-gateway verified-key digest v1"


def _script() -> str:
    return resources.files("shared").joinpath("lua", "key_guesses.lua").read_text(encoding="utf-8")


class PrefixLocked(Exception):
    """Too many wrong secrets for this prefix: refused without Argon2."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"key prefix locked for {retry_after} s")
        self.retry_after = retry_after


@attrs.frozen
class Gate:
    """The state of one prefix for one presented token."""

    locked: bool = False
    known: bool = False  # the token is the one last verified for this prefix
    retry_after: int = 0

    def refuses(self) -> bool:
        """Locked, and not the holder's already verified token."""
        return self.locked and not self.known


OPEN = Gate()


@attrs.define
class PrefixLimiter:
    """Counts Argon2 mismatches per prefix in Redis and refuses guesses past the limit."""

    redis: coredis.Redis[bytes]
    keys: RedisKeys
    pepper: str = attrs.field(repr=False)
    limit: int = 10
    window: float = 60.0
    verified_ttl: float = 86400.0
    on_error: Callable[[], None] = lambda: None
    refusals: int = 0
    known_hits: int = 0
    _secret: bytes = attrs.field(init=False, repr=False)
    _lua: Any = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._secret = hmac.new(self.pepper.encode("utf-8"), _MEMO_LABEL, hashlib.sha256).digest()
        self._lua = self.redis.register_script(_script())

    def digest(self, token: str) -> bytes:
        """The keyed digest stored for a verified token (the token itself is never stored)."""
        return hmac.new(self._secret, token.encode("utf-8", "replace"), hashlib.sha256).hexdigest().encode()

    async def _call(self, prefix: str, *args: str | int) -> list[Any] | None:
        try:
            reply: list[Any] = await self._lua(
                keys=[self.keys.key_mismatches(prefix), self.keys.key_verified(prefix)], args=list(args)
            )
        except STORE_ERRORS:
            self.on_error()
            return None
        return reply

    async def gate(self, prefix: str, token: str) -> Gate:
        """Whether guesses for the prefix are refused, and whether this token is the verified one."""
        if self.limit <= 0:
            return OPEN
        reply = await self._call(prefix, "check")
        if reply is None or int(reply[0]) < self.limit:
            return OPEN
        stored = reply[2] if len(reply) > 2 else None
        known = isinstance(stored, bytes) and hmac.compare_digest(stored, self.digest(token))
        if known:
            self.known_hits += 1
        left_ms = int(reply[1])
        retry = max(1, math.ceil(left_ms / 1000)) if left_ms > 0 else 1
        return Gate(locked=True, known=known, retry_after=retry)

    async def mismatch(self, prefix: str) -> None:
        """Count one wrong secret for the prefix."""
        if self.limit > 0:
            await self._call(prefix, "mismatch", int(self.window * 1000))

    async def verified(self, prefix: str, token: str) -> None:
        """Remember the token Argon2 just accepted for the prefix."""
        if self.limit > 0:
            await self._call(prefix, "verified", int(self.verified_ttl * 1000), self.digest(token).decode())

    def refuse(self, gate: Gate) -> PrefixLocked:
        """The exception for a refused guess (counted)."""
        self.refusals += 1
        return PrefixLocked(gate.retry_after)
