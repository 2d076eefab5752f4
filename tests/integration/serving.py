"""Serving an aiohttp app in process for a test: started and stopped inside one task of its own.

coredis clients must be left in the task that entered them, and an async fixture's setup and
teardown run in two different tasks; so the server lives in its own task, as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

SHUTDOWN_SECONDS = 10.0


@contextlib.asynccontextmanager
async def serving(
    app: web.Application, *, connections: int = 100
) -> AsyncIterator[tuple[TestServer, aiohttp.ClientSession]]:
    """The app behind a TestServer, and a client session for it; fails if shutdown hangs."""
    started: asyncio.Future[tuple[TestServer, aiohttp.ClientSession]] = (
        asyncio.get_running_loop().create_future()
    )
    stop = asyncio.Event()

    async def serve() -> None:
        server = TestServer(app)
        await server.start_server()
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
                started.set_result((server, session))
                await stop.wait()
        finally:
            await server.close()

    task = asyncio.create_task(serve())
    try:
        waiters: list[asyncio.Future[Any]] = [started, task]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            task.result()  # raises what made the start fail
        yield started.result()
    finally:
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=SHUTDOWN_SECONDS)
        if not done:
            # A cleanup that hangs is a bug: cancel until it is down so no task outlives the test,
            # then fail below.
            for _ in range(40):
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    break
    if not done:
        raise AssertionError(f"the app did not shut down within {SHUTDOWN_SECONDS} s")
    if not task.cancelled():
        task.result()
