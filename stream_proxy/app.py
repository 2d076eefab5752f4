"""The stream_proxy application: `create_app(config)` wires handlers and resources, nothing else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import coredis
from aiohttp import web
from yarl import URL

from shared import policy
from shared.config import ProxyConfig
from shared.dialect import error_response
from shared.redis_keys import RedisKeys
from stream_proxy import grants
from stream_proxy.exceptions import Refused
from stream_proxy.relay import relay

Clock = Callable[[], float]
CONFIG = web.AppKey("config", ProxyConfig)
SESSION = web.AppKey("session", aiohttp.ClientSession)
REDIS: web.AppKey[coredis.Redis[bytes]] = web.AppKey("redis")
KEYS = web.AppKey("keys", RedisKeys)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
DRAINING = web.AppKey("draining", asyncio.Event)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place a Refused becomes a response, in the caller's dialect."""
    try:
        return await handler(request)
    except Refused as refused:
        return error_response(
            request.path, refused.status, refused.message, code=refused.code, headers=refused.headers
        )


async def proxy(request: web.Request) -> web.StreamResponse:
    """Every request that is not a health endpoint: grant, policy, relay."""
    app = request.app
    config = app[CONFIG]
    decision = policy.decide(request.method, request.raw_path)
    if not decision.allowed:
        raise Refused(decision.status, decision.message)
    grant = grants.check(request, secrets=(config.grant.current, config.grant.previous), now=app[CLOCK]())
    await grants.spend(app[REDIS], app[KEYS], grant)
    body = await request.read() if request.can_read_body else None
    response, _ = await relay(
        request,
        session=app[SESSION],
        ollama=URL(config.options.ollama_url),
        body=body,
        first_byte_timeout=config.options.first_byte_timeout,
    )
    return response


async def healthz(_: web.Request) -> web.Response:
    """Alive."""
    return web.json_response({"status": "ok"})


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
    client: coredis.Redis[bytes] = coredis.Redis.from_url(app[CONFIG].redis.url)
    async with client:
        app[REDIS] = client
        yield


def create_app(config: ProxyConfig, *, clock: Clock = time.time) -> web.Application:
    """Build the stream_proxy application."""
    app = web.Application(middlewares=[refusals], client_max_size=config.options.max_body_bytes)
    app[CONFIG] = config
    app[CLOCK] = clock
    app[KEYS] = RedisKeys(config.redis.prefix)
    app[DRAINING] = asyncio.Event()
    app.cleanup_ctx.extend([_session, _redis])
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app
