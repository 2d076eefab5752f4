"""Checking the sidecar's grant on arrival (signature, expiry, method, path).

Spending it (single use) happens in the same Redis call as the token reservation
(shared/lua/reserve.lua), so a grant can never be used twice, even across stream_proxy replicas.
"""

from __future__ import annotations

from aiohttp import web

from shared import grant as grants
from stream_proxy.exceptions import Refused

GRANT_HEADER = "X-Gw-Grant"


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
