"""Running a service: uvloop, signal handling, and a drain period with readiness false.

On SIGTERM or SIGINT the `draining` event is set (so /readyz answers 503 and load balancers stop
sending new requests), requests in flight keep being served for `drain_seconds`, then the server
shuts down and the application's cleanup contexts run.
"""

from __future__ import annotations

import asyncio
import signal

import uvloop
from aiohttp import web


async def _serve(
    app: web.Application, host: str, port: int, draining: asyncio.Event, drain_seconds: float
) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=10)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        draining.set()
        if drain_seconds > 0:
            await asyncio.sleep(drain_seconds)
    finally:
        await runner.cleanup()


def run(app: web.Application, *, host: str, port: int, draining: asyncio.Event, drain_seconds: float) -> None:
    """Serve until a stop signal, then drain and clean up."""
    uvloop.run(_serve(app, host, port, draining, drain_seconds))
