"""Operations endpoints: liveness, readiness (Postgres and Redis reachable, not draining), metrics."""

from __future__ import annotations

import asyncio

import asyncpg
import coredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

PROBE_TIMEOUT = 1.0


async def healthz(_: web.Request) -> web.Response:
    """Alive: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readiness(
    pool: asyncpg.Pool[asyncpg.Record], redis: coredis.Redis[bytes], *, draining: bool
) -> dict[str, bool]:
    """Each dependency's state, checked with a short timeout."""
    checks = {"draining": draining, "postgres": False, "redis": False}
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            checks["postgres"] = await pool.fetchval("SELECT 1") == 1
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        checks["postgres"] = False
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            checks["redis"] = bool(await redis.ping())
    except (OSError, TimeoutError, coredis.exceptions.RedisError):
        checks["redis"] = False
    return checks


def readiness_response(checks: dict[str, bool]) -> web.Response:
    """200 when ready, 503 otherwise, with the checks as JSON."""
    ready = checks["postgres"] and checks["redis"] and not checks["draining"]
    return web.json_response({"ready": ready, **checks}, status=200 if ready else 503)


def metrics_response(registry: CollectorRegistry) -> web.Response:
    """The Prometheus text exposition."""
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
