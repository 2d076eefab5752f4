"""Running a service: uvloop, signal handling, and a drain period with readiness false.

On SIGTERM or SIGINT the `draining` event is set (so /readyz answers 503 and load balancers stop
sending new requests), requests in flight keep being served for `drain_seconds`, then the server
shuts down and the application's cleanup contexts run.

With `workers` above 1 (GATEWAY_SIDECAR_WORKERS, GATEWAY_PROXY_WORKERS) the process forks that many
workers before any event loop exists; each builds its own application and listens on the same port
with SO_REUSEPORT, so the kernel spreads connections over them. The parent only supervises: it
forwards SIGTERM and SIGINT, and when a worker dies unasked it stops the others and exits non-zero,
so the service's supervisor (Compose, systemd) restarts it whole. Every limit, lease and budget
lives in Redis, so workers share them as replicas do (docs/ARCHITECTURE.md#scale-out).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import traceback
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
LISTEN_BACKLOG = 4096


async def _serve(
    app: web.Application,
    host: str,
    port: int,
    draining: asyncio.Event,
    drain_seconds: float,
    *,
    reuse_port: bool = False,
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
        # A burst of new connections (thousands of streams opened at once) waits in the queue
        # instead of meeting a dropped SYN (aiohttp's default is 128; the kernel caps it at somaxconn).
        site = web.TCPSite(
            runner, host, port, reuse_address=True, reuse_port=reuse_port or None, backlog=LISTEN_BACKLOG
        )
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


def supervise(workers: int, host: str, port: int, work: Callable[[int], None]) -> int:
    """Fork `workers` processes running `work(port)` on one SO_REUSEPORT port (port 0: one free
    port chosen here, for all of them); wait for them; the exit code of the first that failed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, port))  # bound, never listening: it only holds the port for the workers
    port = holder.getsockname()[1]
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the worker; its coverage is the service's own
            holder.close()
            code = 1
            try:
                work(port)
                code = 0
            except BaseException:  # noqa: BLE001 - reported, then the worker exits non-zero
                traceback.print_exc()
            finally:
                os._exit(code)
        children.append(pid)
    stopping = False
    status = 0

    def forward(signum: int, frame: object) -> None:
        del frame
        nonlocal stopping
        stopping = True
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    while children:
        pid, raw = os.wait()
        children.remove(pid)
        code = os.waitstatus_to_exitcode(raw)
        if not stopping:  # a worker died unasked: stop the rest and let the supervisor restart us
            status = code or 1
            forward(signal.SIGTERM, None)
        elif code and not status:
            status = code
    holder.close()
    return status


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

    @property
    def workers(self) -> int: ...


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
    options = config.options

    def serve_on(port: int, *, reuse_port: bool = False) -> None:
        """One process: build the app, serve until a stop signal, then drain and clean up."""
        app = create_app(config)
        uvloop.run(
            _serve(app, options.host, port, app[draining], options.drain_seconds, reuse_port=reuse_port)
        )

    if options.workers == 1:
        serve_on(options.port)
        return 0
    return supervise(
        options.workers, options.host, options.port, lambda port: serve_on(port, reuse_port=True)
    )
