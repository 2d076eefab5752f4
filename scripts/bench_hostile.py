"""`scripts/bench hostile`: one body cannot stall a process.

A streamed chat runs through the local stack (Caddy, sidecar, one stream_proxy, the simulator at
100 tokens/s) while the same stream_proxy is sent the largest bodies it must still read: a tool
schema of ~290,000 JSON values (parsed, folded and walked for the prompt bound), a 9 MB prompt of
characters Go escapes, and bodies it refuses (660,000 empty messages, 10,001 messages). The
figure is the stream's inter-chunk p99 while they are processed, against the same stream alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import uuid
from typing import Any, Final

import aiohttp
import orjson

import bench_http
import localstack
from bench_http import Row

TOKENS_PER_SECOND: Final = 100
TARGET_MS: Final = 50.0
PHASE_SECONDS: Final = 6.0


def _bodies() -> dict[str, bytes]:
    user = [{"role": "user", "content": "hi"}]
    schema = {f"p{i}": {"type": "string"} for i in range(140_000)}
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": schema}},
    }
    return {
        "290,000-value tool schema": orjson.dumps({"model": "llama3.2", "messages": user, "tools": [tool]}),
        "9 MB prompt of '<'": orjson.dumps({"model": "llama3.2", "prompt": "<" * 9_000_000}),
        "660,000 empty messages": orjson.dumps({"model": "llama3.2", "messages": [{}] * 660_000}),
        "10,001 messages": orjson.dumps({"model": "llama3.2", "messages": user * 10_001}),
    }


async def _stream(session: aiohttp.ClientSession, url: str, key: str, stop: asyncio.Event) -> list[float]:
    """Chunk arrival times of streamed chats, one after another until `stop`."""
    arrivals: list[float] = []
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "go on"}], "stream": True}
    while not stop.is_set():
        async with session.post(
            f"{url}/api/chat", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            r.raise_for_status()
            async for _ in r.content:
                arrivals.append(time.monotonic())
                if stop.is_set():
                    break
    return arrivals


async def _hostile(
    session: aiohttp.ClientSession, url: str, key: str, bodies: dict[str, bytes], stop: asyncio.Event
) -> dict[str, set[int]]:
    """Send every body, two at a time, over and over until `stop`; their statuses."""
    statuses: dict[str, set[int]] = {name: set() for name in bodies}
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def sender(names: list[str]) -> None:
        while not stop.is_set():
            for name in names:
                path = "/api/generate" if b'"prompt"' in bodies[name][:40] else "/api/chat"
                async with session.post(f"{url}{path}", data=bodies[name], headers=headers) as r:
                    await r.read()
                    statuses[name].add(r.status)

    names = list(bodies)
    await asyncio.gather(sender(names[:2]), sender(names[2:]))
    return statuses


def _gaps(arrivals: list[float], start: float, end: float) -> list[float]:
    inside = [t for t in arrivals if start <= t <= end]
    return [b - a for a, b in itertools.pairwise(inside)]


async def scenario_hostile(services: Any, *, decisions: int) -> list[Row]:
    """The stream's inter-chunk p99 alone and while hostile bodies are processed."""
    environ = {
        **os.environ,
        "GATEWAY_DATABASE_URL": services.database_url,
        "GATEWAY_REDIS_URL": services.redis_url,
        "GATEWAY_REDIS_PREFIX": f"bench:{uuid.uuid4().hex[:6]}:",
    }
    environ.pop("GATEWAY_OLLAMA_URL", None)
    stack = localstack.LocalStack(services.workdir / "hostile", environ=environ).start()
    try:
        key, _ = await bench_http._keys(stack)
        url = stack.urls["gateway_url"]
        bodies = _bodies()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            settings = {"tokens_per_second": TOKENS_PER_SECOND, "completion_tokens": 100_000}
            async with session.post(f"{stack.urls['ollama_url']}/_sim/settings", json=settings) as r:
                r.raise_for_status()
            stop_stream, stop_hostile = asyncio.Event(), asyncio.Event()
            streaming = asyncio.create_task(_stream(session, url, key, stop_stream))
            await asyncio.sleep(PHASE_SECONDS)
            calm = (time.monotonic() - PHASE_SECONDS + 1, time.monotonic())
            hostile = asyncio.create_task(_hostile(session, url, key, bodies, stop_hostile))
            started = time.monotonic()
            await asyncio.sleep(PHASE_SECONDS)
            stop_hostile.set()
            statuses = await hostile
            under = (started, time.monotonic())
            stop_stream.set()
            arrivals = await streaming
    finally:
        stack.stop()
    alone = bench_http.percentile(_gaps(arrivals, *calm), 99)
    loaded = bench_http.percentile(_gaps(arrivals, *under), 99)
    nominal = 1000 / TOKENS_PER_SECOND
    rows = [
        Row(f"stream inter-chunk p99 alone ({nominal:g} ms nominal)", f"{alone * 1e3:.1f} ms", "—", None),
        Row(
            "stream inter-chunk p99 while hostile bodies are processed",
            f"{loaded * 1e3:.1f} ms",
            f"≤ {TARGET_MS:g} ms",
            loaded * 1e3 <= TARGET_MS,
        ),
    ]
    rows += [
        Row(f"status of {name} ({len(bodies[name]) / 1e6:.1f} MB)", ", ".join(map(str, sorted(s))), "—", None)
        for name, s in statuses.items()
    ]
    with contextlib.suppress(ZeroDivisionError):
        rows.append(Row("chunks seen under load", str(len(_gaps(arrivals, *under)) + 1), "—", None))
    return rows
