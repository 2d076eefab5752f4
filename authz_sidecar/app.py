"""The authz_sidecar application: `create_app(config)` wires handlers and resources, nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import coredis
from aiohttp import web

from authz_sidecar import health
from authz_sidecar.accountant import Accountant, AccountantMetrics
from authz_sidecar.audit import DenialAuditor
from authz_sidecar.authz import Admission
from authz_sidecar.budgets import BudgetHydrator
from authz_sidecar.invalidations import InvalidationListener
from authz_sidecar.keys import Authenticator, Clock, KeyCache
from authz_sidecar.limiter import FailedAuthLimiter
from authz_sidecar.metrics import SidecarMetrics
from authz_sidecar.prefix_limiter import PrefixLimiter
from shared import store
from shared.config import SidecarConfig
from shared.db import create_pool
from shared.limits import LimitScripts
from shared.redis_keys import RedisKeys

CONFIG = web.AppKey("config", SidecarConfig)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
POOL: web.AppKey[asyncpg.Pool[asyncpg.Record]] = web.AppKey("pool")
REDIS: web.AppKey[coredis.Redis[bytes]] = web.AppKey("redis")
KEYS = web.AppKey("keys", RedisKeys)
METRICS = web.AppKey("metrics", SidecarMetrics)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
AUDITOR = web.AppKey("auditor", DenialAuditor)
LISTENER = web.AppKey("listener", InvalidationListener)
ADMISSION = web.AppKey("admission", Admission)
DRAINING = web.AppKey("draining", asyncio.Event)
ACCOUNTANT = web.AppKey("accountant", Accountant)


async def authz(request: web.Request) -> web.Response:
    """Caddy's forward_auth target."""
    return await request.app[ADMISSION].handle(request)


async def readyz(request: web.Request) -> web.Response:
    """Ready when Postgres and Redis answer and the process is not draining."""
    app = request.app
    checks = await health.readiness(app[POOL], app[REDIS], draining=app[DRAINING].is_set())
    return health.readiness_response(checks)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics."""
    return health.metrics_response(request.app[METRICS].registry)


async def _database(app: web.Application) -> AsyncIterator[None]:
    app[POOL] = await create_pool(app[CONFIG].postgres)
    yield
    await app[POOL].close()


async def _redis(app: web.Application) -> AsyncIterator[None]:
    async with store.connect(
        app[CONFIG].redis.url,
        connect_timeout=app[CONFIG].redis.connect_timeout,
        reply_timeout=app[CONFIG].redis.timeout,
    ) as client:
        app[REDIS] = client
        yield


async def _authenticator(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    authenticator = Authenticator(
        pool=app[POOL],
        pepper=config.hashing.pepper,
        cache=KeyCache(ttl=config.options.key_cache_ttl),
        concurrency=config.options.argon2_concurrency,
        wall_clock=app[CLOCK],
        guesses=PrefixLimiter(
            redis=app[REDIS],
            keys=app[KEYS],
            pepper=config.hashing.pepper,
            limit=config.options.key_mismatches_per_window,
            window=config.options.key_mismatch_window,
            verified_ttl=config.options.verified_key_ttl,
            on_error=app[METRICS].redis_errors.inc,
        ),
    )
    app[AUTHENTICATOR] = authenticator
    yield
    authenticator.close()


@contextlib.asynccontextmanager
async def _background(*coroutines: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _invalidations(app: web.Application) -> AsyncIterator[None]:
    listener = InvalidationListener(
        redis=app[REDIS],
        pool=app[POOL],
        cache=app[AUTHENTICATOR].cache,
        channel=app[KEYS].invalidations,
    )
    app[LISTENER] = listener
    async with _background(listener.run_subscription(), listener.run_fallback()):
        yield


async def _auditor(app: web.Application) -> AsyncIterator[None]:
    auditor = DenialAuditor(redis=app[REDIS], stream=app[KEYS].audit_stream, clock=app[CLOCK])
    app[AUDITOR] = auditor
    async with _background(auditor.run()):
        yield


async def _admission(app: web.Application) -> AsyncIterator[None]:
    authenticator, listener = app[AUTHENTICATOR], app[LISTENER]
    app[METRICS].watch(
        lambda: {
            "key_cache_hits": authenticator.cache.hits,
            "key_cache_misses": authenticator.cache.misses,
            "key_cache_entries": len(authenticator.cache),
            "argon2_verifications": authenticator.argon2_calls,
            "key_db_lookups": authenticator.db_lookups,
            "key_guess_refusals": authenticator.guesses.refusals if authenticator.guesses else 0,
            "key_verified_digest_hits": authenticator.guesses.known_hits if authenticator.guesses else 0,
            "invalidation_subscribed": float(listener.subscribed),
        }
    )
    config = app[CONFIG]
    scripts = LimitScripts(app[REDIS], app[KEYS])
    hydrator = BudgetHydrator(pool=app[POOL], scripts=scripts, zone=ZoneInfo(config.budget.timezone))
    app[ADMISSION] = Admission(
        config=config,
        scripts=scripts,
        hydrator=hydrator,
        authenticator=authenticator,
        limiter=FailedAuthLimiter(limit=app[CONFIG].options.auth_failures_per_minute, clock=app[CLOCK]),
        auditor=app[AUDITOR],
        metrics=app[METRICS],
        clock=app[CLOCK],
    )
    yield


async def _accountant(app: web.Application) -> AsyncIterator[None]:
    """The embedded accountant (GATEWAY_ACCOUNTANT=embedded): one more consumer in the group."""
    accountant = Accountant(
        redis=app[REDIS],
        pool=app[POOL],
        keys=app[KEYS],
        options=app[CONFIG].accountant,
        metrics=AccountantMetrics(app[METRICS].registry),
        clock=app[CLOCK],
    )
    app[ACCOUNTANT] = accountant
    async with _background(accountant.run()):
        yield


def create_app(config: SidecarConfig, *, clock: Callable[[], float] = time.time) -> web.Application:
    """Build the sidecar application."""
    app = web.Application()
    app[CONFIG] = config
    app[CLOCK] = clock
    app[KEYS] = RedisKeys(config.redis.prefix)
    app[METRICS] = SidecarMetrics()
    app[DRAINING] = asyncio.Event()
    app.cleanup_ctx.extend([_database, _redis, _authenticator, _invalidations, _auditor, _admission])
    if config.accountant.mode == "embedded":
        app.cleanup_ctx.append(_accountant)
    app.router.add_get("/authz", authz, allow_head=False)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
