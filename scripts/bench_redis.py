"""`scripts/bench redis`: what one Redis round trip costs the calling Python process.

Every request makes two of them on its path (the sidecar's admission script, stream_proxy's
reservation script) and one more after it (the usage event and its settle, pipelined), so their
client-side CPU is a floor under the gateway's own cost per request (docs/ARCHITECTURE.md#speed-targets).
Measured here, one call at a time on uvloop, in this process's CPU time (`time.process_time`):
coredis as the services use it (timeouts set), and, as the floor of any Python client, a minimal
RESP exchange over an asyncio protocol (the same EVALSHA bytes, the reply only framed, not parsed).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from urllib.parse import urlsplit

import coredis
import uvloop

from bench_http import Row

SCRIPT = b"return {1, ARGV[1], KEYS[1]}"
KEYS = [f"bench:{{t:1}}:k{i}" for i in range(20)]  # the reservation script's shape: 20 keys, 30 arguments
ARGS = [str(i) for i in range(30)]
STREAM = "bench:{t:1}:stream"


def _command(*parts: bytes | str) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if isinstance(part, bytes) else part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Resp(asyncio.Protocol):
    """One request in flight at a time; a reply is complete when its last array element arrived
    (enough for the fixed replies measured here)."""

    def __init__(self, elements: int) -> None:
        self.elements = elements
        self.buffer = b""
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and self.buffer.count(b"\r\n") >= self.elements:
            self.waiter.set_result(self.buffer)
            self.waiter, self.buffer = None, b""

    async def call(self, request: bytes, elements: int) -> bytes:
        assert self.transport is not None  # noqa: S101 (connected)
        self.elements = elements
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


async def _cpu_per_call(call: object, n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        await call()  # type: ignore[operator]
    return (time.process_time() - started) / n


async def _measure(url: str, n: int) -> list[Row]:
    client: coredis.Redis[bytes] = coredis.Redis.from_url(url, connect_timeout=5, stream_timeout=5)
    async with client:
        script = client.register_script(SCRIPT)
        await script(keys=KEYS, args=ARGS)

        async def pipelined() -> None:
            async with client.pipeline(transaction=False) as pipe:
                pipe.xadd(STREAM, {b"f": b"v"})
                pipe.evalsha(script.sha, KEYS, ARGS)

        coredis_call = await _cpu_per_call(lambda: script(keys=KEYS, args=ARGS), n)
        coredis_ping = await _cpu_per_call(client.ping, n)
        coredis_pipe = await _cpu_per_call(pipelined, n // 2)
        await client.delete([STREAM])
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    transport, raw = await loop.create_connection(
        lambda: _Resp(0), parts.hostname or "127.0.0.1", parts.port or 6379
    )
    try:
        sha = hashlib.sha1(SCRIPT, usedforsecurity=False).hexdigest()
        await raw.call(_command("SCRIPT", "LOAD", SCRIPT), 1)
        request = _command("EVALSHA", sha, str(len(KEYS)), *KEYS, *ARGS)
        raw_call = await _cpu_per_call(lambda: raw.call(request, 6), n)
    finally:
        transport.close()

    def us(seconds: float) -> str:
        return f"{seconds * 1e6:.0f} µs"

    return [
        Row("coredis EVALSHA (20 keys, 30 args), client CPU per call", us(coredis_call), "—", None),
        Row("coredis PING, client CPU per call", us(coredis_ping), "—", None),
        Row("coredis pipeline XADD + EVALSHA, client CPU per round trip", us(coredis_pipe), "—", None),
        Row("minimal RESP EVALSHA (same bytes), client CPU per call", us(raw_call), "—", None),
        Row(
            "coredis over the minimal client, per call",
            f"{coredis_call / raw_call:.1f}x (+{us(coredis_call - raw_call)})",
            "—",
            None,
        ),
    ]


async def scenario_redis(services: object, *, decisions: int) -> list[Row]:
    """Client CPU per Redis round trip: coredis against a minimal RESP exchange (uvloop, one at a time)."""
    url: str = services.redis_url  # type: ignore[attr-defined]
    if urlsplit(url).scheme != "redis":
        return [Row("client CPU per Redis round trip", "needs a redis:// URL", "—", None)]
    # The services run on uvloop: measure there (a loop of its own, in a thread of its own).
    return await asyncio.to_thread(uvloop.run, _measure(url, max(2000, decisions // 4)))
