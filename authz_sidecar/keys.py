"""Keys at speed: an in-process cache of verified keys, Argon2id off the event loop, bounded.

The cache is keyed by an HMAC of the token under a per-process random secret, so the process never
holds a table of raw tokens. Verified keys keep their context for a short TTL; failures are cached
too (negative cache), so a repeated bad token costs neither Postgres nor Argon2. Wrong secrets
for one real prefix are limited across replicas by `authz_sidecar/prefix_limiter.py`, checked here
before Postgres and again under the Argon2 slot (so a concurrent burst cannot overshoot the limit
by more than the number of slots).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import attrs

from authz_sidecar.prefix_limiter import OPEN, Gate, PrefixLimiter
from shared import keys
from shared.hashing import verify_key
from shared.keystore import Verdict, authenticate

Clock = Callable[[], float]


@attrs.define
class _Entry:
    verdict: Verdict
    expires: float


@attrs.define
class KeyCache:
    """Verdicts by HMAC(token), with a TTL; bounded in size."""

    ttl: float
    negative_ttl: float = 5.0
    max_entries: int = 100_000
    clock: Clock = time.monotonic
    _secret: bytes = attrs.field(factory=lambda: secrets.token_bytes(32))
    _entries: dict[bytes, _Entry] = attrs.field(factory=dict)
    hits: int = 0
    misses: int = 0
    # Bumped by every invalidation: a lookup that started before a change must not cache its
    # (possibly stale) answer after the change was applied.
    generation: int = 0

    def fingerprint(self, token: str) -> bytes:
        """The cache key for a token."""
        return hmac.new(self._secret, token.encode("utf-8", "replace"), hashlib.sha256).digest()

    def get(self, fingerprint: bytes) -> Verdict | None:
        """A live cached verdict, or None."""
        entry = self._entries.get(fingerprint)
        if entry is None or entry.expires <= self.clock():
            self.misses += 1
            if entry is not None:
                del self._entries[fingerprint]
            return None
        self.hits += 1
        return entry.verdict

    def put(self, fingerprint: bytes, verdict: Verdict, generation: int | None = None) -> None:
        """Remember a verdict (positive ones for `ttl`, negative ones for `negative_ttl`), unless an
        invalidation arrived since the lookup that produced it began."""
        if generation is not None and generation != self.generation:
            return
        if len(self._entries) >= self.max_entries:
            self._evict()
        ttl = self.ttl if verdict.context is not None else self.negative_ttl
        self._entries[fingerprint] = _Entry(verdict, self.clock() + ttl)

    def _evict(self) -> None:
        now = self.clock()
        for fp in [fp for fp, e in self._entries.items() if e.expires <= now]:
            del self._entries[fp]
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]

    def drop(self, *, tenant_id: int, key_id: int | None = None) -> int:
        """Forget every cached key of a tenant (or one key); returns how many were dropped."""
        self.generation += 1
        doomed = [
            fp
            for fp, e in self._entries.items()
            if e.verdict.context is not None
            and e.verdict.context.tenant_id == tenant_id
            and (key_id is None or e.verdict.context.key_id == key_id)
        ]
        for fp in doomed:
            del self._entries[fp]
        return len(doomed)

    def clear(self) -> None:
        """Forget everything (used when the invalidation channel was down for a while)."""
        self.generation += 1
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


@attrs.define
class Authenticator:
    """Resolves a token to a verdict: cache, else one Postgres query and one Argon2id check."""

    pool: asyncpg.Pool[asyncpg.Record]
    pepper: str = attrs.field(repr=False)
    cache: KeyCache
    concurrency: int = 2
    wall_clock: Clock = time.time
    guesses: PrefixLimiter | None = None
    argon2_calls: int = 0
    db_lookups: int = 0
    _executor: ThreadPoolExecutor = attrs.field(init=False)
    _slots: asyncio.Semaphore = attrs.field(init=False)
    _inflight: dict[bytes, asyncio.Future[Verdict]] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="argon2")
        self._slots = asyncio.Semaphore(self.concurrency)

    def close(self) -> None:
        """Stop the Argon2 worker threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _verify(self, token: str, phc: str, pepper: str, gate: Gate = OPEN) -> bool:
        if gate.known:
            return True  # the prefix is locked, and this is the token Argon2 last accepted for it
        prefix = keys.parse_key(token).prefix
        async with self._slots:
            if self.guesses is not None:
                # Again under the slot: guesses queued behind a burst see the count it left.
                now = await self.guesses.gate(prefix, token)
                if now.known:
                    return True
                if now.refuses():
                    raise self.guesses.refuse(now)
            self.argon2_calls += 1
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(self._executor, lambda: verify_key(token, phc, pepper=pepper))
            if self.guesses is not None:
                await (self.guesses.verified(prefix, token) if ok else self.guesses.mismatch(prefix))
            return ok

    def cached(self, token: str) -> Verdict | None:
        """A live cached verdict for the token, without any I/O."""
        return self.cache.get(self.cache.fingerprint(token))

    async def resolve(self, token: str) -> Verdict:
        """The verdict for a well-formed token (after `cached` missed); concurrent requests for one
        token share one check."""
        fingerprint = self.cache.fingerprint(token)
        pending = self._inflight.get(fingerprint)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._inflight[fingerprint] = future
        generation = self.cache.generation
        try:
            gate = OPEN
            if self.guesses is not None:
                gate = await self.guesses.gate(keys.parse_key(token).prefix, token)
                if gate.refuses():
                    raise self.guesses.refuse(gate)  # neither Postgres nor Argon2

            async def verifier(token: str, phc: str, pepper: str) -> bool:
                return await self._verify(token, phc, pepper, gate)

            self.db_lookups += 1
            verdict = await authenticate(
                self.pool,
                token,
                pepper=self.pepper,
                now=dt.datetime.fromtimestamp(self.wall_clock(), dt.UTC),
                verifier=verifier,
            )
            self.cache.put(fingerprint, verdict, generation)
            future.set_result(verdict)
            return verdict
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._inflight[fingerprint]
