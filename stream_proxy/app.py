"""The stream_proxy application: `create_app(config)` wires handlers and resources, nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import coredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared import store
from shared.config import ProxyConfig
from shared.dialect import error_response
from shared.limits import LimitScripts
from shared.redis_keys import RedisKeys
from shared.untrusted import printable
from stream_proxy.backends import Backends
from stream_proxy.exceptions import Refused
from stream_proxy.metrics import ProxyMetrics
from stream_proxy.models import ModelCatalog
from stream_proxy.proxy import Proxy
from stream_proxy.usage import UsageReporter

Clock = Callable[[], float]
CONFIG = web.AppKey("config", ProxyConfig)
SESSION = web.AppKey("session", aiohttp.ClientSession)
REDIS: web.AppKey[coredis.Redis[bytes]] = web.AppKey("redis")
KEYS = web.AppKey("keys", RedisKeys)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
DRAINING = web.AppKey("draining", asyncio.Event)
REPORTER = web.AppKey("reporter", UsageReporter)
PROXY = web.AppKey("proxy", Proxy)
CATALOG = web.AppKey("catalog", ModelCatalog)
BACKENDS = web.AppKey("backends", Backends)
METRICS = web.AppKey("metrics", ProxyMetrics)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place a Refused becomes a response, in the caller's dialect."""
    try:
        return await handler(request)
    except Refused as refused:
        return error_response(
            request.path,
            refused.status,
            refused.message,
            code=refused.code,
            headers=refused.headers,
            request_id=printable(request.headers.get("X-Request-Id"), 100),
        )


async def proxy(request: web.Request) -> web.StreamResponse:
    """Every request that is not an operations endpoint."""
    return await request.app[PROXY].handle(request)


async def healthz(_: web.Request) -> web.Response:
    """Alive."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when a backend is in rotation (its last poll answered), the spool has room and the
    process is not draining."""
    app = request.app
    healthy = len(app[BACKENDS].healthy())
    checks = {
        "draining": app[DRAINING].is_set(),
        "spool_full": app[REPORTER].full,
        "ollama": healthy > 0,
        "backends_healthy": healthy,
    }
    ready = healthy > 0 and not checks["spool_full"] and not checks["draining"]
    return web.json_response({"ready": ready, **checks}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics."""
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _session(app: web.Application) -> AsyncIterator[None]:
    options = app[CONFIG].options
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=options.connect_timeout, sock_read=options.idle_timeout
        ),
        auto_decompress=False,
    )
    app[SESSION] = session
    yield
    await session.close()


async def _redis(app: web.Application) -> AsyncIterator[None]:
    async with store.connect(
        app[CONFIG].redis.url,
        connect_timeout=app[CONFIG].redis.connect_timeout,
        reply_timeout=app[CONFIG].redis.timeout,
    ) as client:
        app[REDIS] = client
        yield


async def _reporter(app: web.Application) -> AsyncIterator[None]:
    reporter = UsageReporter(app[REDIS], app[KEYS].usage_stream)
    app[REPORTER] = reporter
    task = asyncio.create_task(reporter.run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _catalog(app: web.Application) -> AsyncIterator[None]:
    """The backends (polled once before the first request, then each on its own timer) and the
    facts about their models."""
    options = app[CONFIG].options
    backends = Backends(
        app[SESSION],
        options.backends(),
        interval=options.backend_poll_interval,
        timeout=options.backend_poll_timeout,
    )
    catalog = ModelCatalog(app[SESSION], backends, timeout=options.show_timeout)
    backends.on_change = lambda _: catalog.forget_changed()
    app[BACKENDS], app[CATALOG] = backends, catalog
    app[METRICS].watch_backends(lambda: [(b.name, b.in_flight, b.healthy) for b in backends.backends])
    await backends.poll_all()
    task = asyncio.create_task(backends.run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _proxy(app: web.Application) -> AsyncIterator[None]:
    app[PROXY] = Proxy(
        config=app[CONFIG],
        session=app[SESSION],
        catalog=app[CATALOG],
        scripts=LimitScripts(app[REDIS], app[KEYS]),
        reporter=app[REPORTER],
        draining=app[DRAINING],
        metrics=app[METRICS],
        backends=app[BACKENDS],
        clock=app[CLOCK],
    )
    app[METRICS].watch_spool(lambda: app[REPORTER].depth)
    yield
    await app[PROXY].finish()


def create_app(config: ProxyConfig, *, clock: Clock = time.time) -> web.Application:
    """Build the stream_proxy application."""
    app = web.Application(middlewares=[refusals], client_max_size=config.options.max_body_bytes)
    app[CONFIG] = config
    app[CLOCK] = clock
    app[KEYS] = RedisKeys(config.redis.prefix)
    app[DRAINING] = asyncio.Event()
    app[METRICS] = ProxyMetrics()
    app.cleanup_ctx.extend([_session, _redis, _reporter, _catalog, _proxy])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app
