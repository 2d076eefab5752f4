"""The floor of the gateway's shape for `scripts/bench`: do-nothing stand-ins for its two services.

    python scripts/floor_relay.py PORT UPSTREAM_URL     the relay (stand-in for stream_proxy)
    python scripts/floor_relay.py --authz PORT          the responder (stand-in for authz_sidecar)

The relay forwards every POST to the upstream with one pooled aiohttp client and streams the answer
back chunk by chunk; the responder answers every forward_auth call 200 with a grant-sized
`X-Gw-Grant` header. Neither checks, limits, meters or records anything. Behind the gateway's own
Caddyfile they make "the same shape doing nothing" (docs/ARCHITECTURE.md#speed-targets): what the
gateway costs above them is the cost of its own work. Both answer `GET /healthz` for Caddy's health
checks and run on uvloop like the services they stand in for.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
# About the size of a real grant with every limit set on key and tenant (base64url of signed JSON).
GRANT = "f" * 900


async def relay(request: web.Request) -> web.StreamResponse:
    """Forward the body, stream the answer back chunk by chunk."""
    body = await request.read()
    async with request.app[SESSION].post(
        request.app[UPSTREAM] + request.path, data=body, headers={"Content-Type": "application/json"}
    ) as upstream:
        response = web.StreamResponse(status=upstream.status)
        response.content_type = upstream.content_type
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def authz(request: web.Request) -> web.Response:
    """Allow everything, with a grant header as large as a real one."""
    del request
    return web.Response(status=200, headers={"X-Gw-Request-Id": uuid.uuid4().hex, "X-Gw-Grant": GRANT})


async def healthz(request: web.Request) -> web.Response:
    """Caddy's active health check."""
    del request
    return web.Response(text='{"status":"ok"}', content_type="application/json")


async def _session(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        app[SESSION] = session
        yield


def main(argv: list[str]) -> None:
    """Serve until killed."""
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    if argv[0] == "--authz":
        port = int(argv[1])
        app.router.add_route("*", "/{tail:.*}", authz)
    else:
        port = int(argv[0])
        app[UPSTREAM] = argv[1]
        app.cleanup_ctx.append(_session)
        app.router.add_post("/{tail:.*}", relay)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=4096)  # as the gateway


if __name__ == "__main__":
    main(sys.argv[1:])
