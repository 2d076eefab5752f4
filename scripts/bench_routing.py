"""`scripts/bench routing`: what choosing a backend costs a request.

The routing step of stream_proxy as each metered request runs it (the model's candidates, the
choice, the in-flight count taken and given back), timed per request for one backend and for three
backends with overlapping models, some requests in flight. The figure is the difference of the two
medians: what routing across several backends adds over one.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any, Final

import aiohttp
from yarl import URL

from bench_http import Row
from shared.backend_spec import BackendSpec
from stream_proxy.backends import Backends

TARGET_MS: Final = 0.1
MODELS: Final = [f"registry.ollama.ai/library/model-{i}:latest" for i in range(30)]


def _pool(session: aiohttp.ClientSession, count: int) -> Backends:
    specs = [BackendSpec(f"b{i}", URL(f"http://10.0.0.{i + 1}:11434"), 1.0, 8) for i in range(count)]
    backends = Backends(session, specs, interval=5.0, timeout=1.0)
    for index, backend in enumerate(backends.backends):
        backend.healthy = True
        # With several backends each lacks a third of the models; every model is on at least one.
        backend.models = {m: f"d{j}" for j, m in enumerate(MODELS) if count == 1 or j % count != index}
        backend.loaded = frozenset(MODELS[index::3])
        backend.in_flight = index
    return backends


async def _per_request(backends: Backends, requests: int) -> list[float]:
    """Seconds of routing per request (candidates, choice, in-flight taken and released)."""
    times: list[float] = []
    for n in range(requests):
        model = MODELS[n % len(MODELS)]
        started = time.perf_counter()
        chosen = await backends.acquire(model, key_id=n % 500, wait=1.0)
        if chosen is None:
            raise RuntimeError(f"no backend for {model}")
        backends.release(chosen)
        times.append(time.perf_counter() - started)
    return times


async def scenario_routing(services: Any, *, decisions: int) -> list[Row]:
    """p50 of the routing step with one backend and with three; their difference against the target."""
    del services
    requests = max(decisions, 20_000)
    async with aiohttp.ClientSession() as session:
        one = statistics.median(await _per_request(_pool(session, 1), requests))
        three = statistics.median(await _per_request(_pool(session, 3), requests))
    added = (three - one) * 1e3
    return [
        Row("routing per request, one backend (p50)", f"{one * 1e6:.1f} µs", "—", None),
        Row("routing per request, three backends (p50)", f"{three * 1e6:.1f} µs", "—", None),
        Row(
            "added by routing across three backends (p50)",
            f"{added * 1e3:.1f} µs",
            f"≤ {TARGET_MS * 1e3:.0f} µs",
            added <= TARGET_MS,
        ),
    ]


if __name__ == "__main__":
    for row in asyncio.run(scenario_routing(None, decisions=20_000)):
        print(row)
