"""Running a service: uvloop, signal handling, and a drain period with readiness false.

On SIGTERM or SIGINT the `draining` event is set (so /readyz answers 503 and load balancers stop
sending new requests), requests in flight keep being served for `drain_seconds`, then the server
shuts down and the application's cleanup contexts run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from typing import Protocol, TypeVar

import uvloop
from aiohttp import web

from shared import logs
from shared.config import LoggingOptions, load_config
from shared.exceptions import ConfigError

ConfigT = TypeVar("ConfigT", bound="_Service")
# Above what Caddy lets through (max_header_size 64KB): every header set Caddy accepts reaches our
# handlers, which answer in the caller's dialect; aiohttp's own 400 (plain text, echoing part of the
# offending header) is never what a client sees.
HEADER_LIMITS = {"max_line_size": 128 * 1024, "max_field_size": 128 * 1024, "max_headers": 64 * 1024}


async def _serve(
    app: web.Application, host: str, port: int, draining: asyncio.Event, drain_seconds: float
) -> None:
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=10,
        max_line_size=HEADER_LIMITS["max_line_size"],
        max_field_size=HEADER_LIMITS["max_field_size"],
        max_headers=HEADER_LIMITS["max_headers"],
    )
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


class _Service(Protocol):
    """What `main` needs of a service config: logging and listening options."""

    @property
    def logging(self) -> LoggingOptions: ...

    @property
    def options(self) -> _Listening: ...


class _Listening(Protocol):
    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def drain_seconds(self) -> float: ...


def main(
    name: str,
    config_class: type[ConfigT],
    create_app: Callable[[ConfigT], web.Application],
    draining: web.AppKey[asyncio.Event],
) -> int:
    """`python -m <service>`: configuration from GATEWAY_*, JSON logs, serve, drain on SIGTERM."""
    try:
        config = load_config(config_class, os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"{name}: {exc}\n")
        return 2
    logs.setup(config.logging.level)
    app = create_app(config)
    options = config.options
    run(
        app, host=options.host, port=options.port, draining=app[draining], drain_seconds=options.drain_seconds
    )
    return 0
