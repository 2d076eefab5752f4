"""Checking the sidecar's grant on arrival, and spending it so it cannot be used twice."""

from __future__ import annotations

import coredis
from aiohttp import web

from shared import grant as grants
from shared.redis_keys import RedisKeys
from stream_proxy.exceptions import Refused

GRANT_HEADER = "X-Gw-Grant"
SPENT_TTL_SECONDS = int(grants.MAX_TTL) + 60


def raw_path(request: web.Request) -> str:
    """The still-encoded path, exactly as the sidecar saw it in X-Forwarded-Uri."""
    return request.raw_path.split("?", 1)[0]


def check(request: web.Request, *, secrets: tuple[str, ...], now: float) -> grants.Grant:
    """Signature, expiry, method and path; raises Refused (403)."""
    try:
        return grants.verify(
            request.headers.get(GRANT_HEADER),
            secrets=secrets,
            method=request.method,
            path=raw_path(request),
            now=now,
        )
    except grants.GrantError as exc:
        raise Refused(403, f"request not authorised by the gateway: {exc}") from None


async def spend(redis: coredis.Redis[bytes], keys: RedisKeys, grant: grants.Grant) -> None:
    """Mark the grant used; a second use is refused. Redis trouble refuses too (fail closed)."""
    try:
        fresh = await redis.set(
            keys.grant_used(grant.request_id), b"1", condition=coredis.PureToken.NX, ex=SPENT_TTL_SECONDS
        )
    except (coredis.exceptions.RedisError, OSError, TimeoutError):
        raise Refused(503, "gateway state store unavailable", headers={"Retry-After": "1"}) from None
    if not fresh:
        raise Refused(403, "request not authorised by the gateway: grant already used")
