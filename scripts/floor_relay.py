"""The floor of the stream_proxy hop for `scripts/bench proxy`: an aiohttp server that relays every
POST to the upstream with one pooled aiohttp client and streams the answer back, and does nothing
else (no grant, no policy, no Redis, no metering). What the real stream_proxy adds above this is
the cost of its own work; what this adds above the simulator is the cost of the framework hop.

    python scripts/floor_relay.py PORT UPSTREAM_URL
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def relay(request: web.Request) -> web.StreamResponse:
    """Forward the body, stream the answer back chunk by chunk."""
    body = await request.read()
    async with request.app[SESSION].post(
        request.app[UPSTREAM] + request.path, data=body, headers={"Content-Type": "application/json"}
    ) as upstream:
        response = web.StreamResponse(status=upstream.status)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def _session(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        app[SESSION] = session
        yield


def main(argv: list[str]) -> None:
    """Serve until killed."""
    app = web.Application()
    app[UPSTREAM] = argv[1]
    app.cleanup_ctx.append(_session)
    app.router.add_post("/{tail:.*}", relay)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(argv[0]), access_log=None, print=None)


if __name__ == "__main__":
    main(sys.argv[1:])
