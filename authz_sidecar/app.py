"""The authz_sidecar application: `create_app(config)` wires handlers and resources, nothing else."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web

from authz_sidecar.authz import admit, log_decision
from authz_sidecar.exceptions import Denied
from authz_sidecar.keys import Authenticator, Clock, KeyCache
from shared.config import SidecarConfig
from shared.db import create_pool
from shared.dialect import error_response

CONFIG = web.AppKey("config", SidecarConfig)
POOL = web.AppKey("pool", asyncpg.Pool)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")


async def authz(request: web.Request) -> web.Response:
    """Caddy's forward_auth target."""
    started = time.perf_counter()
    try:
        response, context = await admit(
            request, config=request.app[CONFIG], authenticator=request.app[AUTHENTICATOR]
        )
    except Denied as denied:
        log_decision(request, denied.status, denied.reason, started, None)
        path = request.headers.get("X-Forwarded-Uri", "/")
        return error_response(path, denied.status, denied.message, code=denied.code, headers=denied.headers)
    log_decision(request, 200, "allowed", started, context)
    return response


async def healthz(_: web.Request) -> web.Response:
    """Alive."""
    return web.json_response({"status": "ok"})


async def _database(app: web.Application) -> AsyncIterator[None]:
    app[POOL] = await create_pool(app[CONFIG].postgres)
    yield
    await app[POOL].close()


async def _authenticator(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    authenticator = Authenticator(
        pool=app[POOL],
        pepper=config.hashing.pepper,
        cache=KeyCache(ttl=config.options.key_cache_ttl),
        concurrency=config.options.argon2_concurrency,
        wall_clock=app[CLOCK],
    )
    app[AUTHENTICATOR] = authenticator
    yield
    authenticator.close()


def create_app(config: SidecarConfig, *, clock: Clock = time.time) -> web.Application:
    """Build the sidecar application."""
    app = web.Application()
    app[CONFIG] = config
    app[CLOCK] = clock
    app.cleanup_ctx.extend([_database, _authenticator])
    app.router.add_get("/authz", authz, allow_head=False)
    app.router.add_get("/healthz", healthz)
    return app
