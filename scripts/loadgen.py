"""A load generator process for `scripts/bench`: closed-loop HTTP clients, measured per request.

It runs as its own process (several at once), so the benchmark's client is not the bottleneck of
the arm it measures. It reads one JSON job per line on stdin and answers one JSON result per line
on stdout, until stdin closes:

    job    {"url", "headers", "body" (text), "concurrency", "seconds", "start_at" (time.time()),
            "stream" (bool), "separator" ("\\n" NDJSON or "\\n\\n" SSE)}
    result {"latency": [s], "ttfb": [s], "gaps": [s], "reads", "coalesced_reads", "events",
            "statuses": {"200": n}, "errors", "elapsed", "cpu"}

`latency` is the whole response; `ttfb` the first body byte; `gaps` the time between body reads
of a streamed response; a read holding more than one complete event counts as coalesced.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import orjson
import uvloop


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_job(session: aiohttp.ClientSession, job: dict[str, Any]) -> dict[str, Any]:
    """Run one job: `concurrency` clients back to back for `seconds` from `start_at`."""
    url: str = job["url"]
    headers: dict[str, str] = job["headers"]
    body = str(job["body"]).encode()
    separator = str(job.get("separator") or "\n").encode()
    stream = bool(job.get("stream"))
    latency: list[float] = []
    ttfb: list[float] = []
    gaps: list[float] = []
    statuses: Counter[str] = Counter()
    totals = {"reads": 0, "coalesced_reads": 0, "events": 0, "errors": 0}
    await asyncio.sleep(max(0.0, float(job["start_at"]) - time.time()))
    deadline = time.perf_counter() + float(job["seconds"])
    cpu = _cpu_seconds()

    async def client() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    statuses[str(resp.status)] += 1
                    first = last = None
                    async for chunk in resp.content.iter_any():
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        elif stream and last is not None:
                            gaps.append(now - last)
                        last = now
                        if stream:
                            events = chunk.count(separator)
                            totals["reads"] += 1
                            totals["events"] += events
                            totals["coalesced_reads"] += events > 1
                    ended = time.perf_counter()
            except (aiohttp.ClientError, OSError, TimeoutError):
                totals["errors"] += 1
                continue
            latency.append(ended - started)
            ttfb.append((first or ended) - started)

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(int(job["concurrency"]))))
    return {
        "latency": latency,
        "ttfb": ttfb,
        "gaps": gaps,
        **totals,
        "statuses": dict(statuses),
        "elapsed": time.perf_counter() - began,
        "cpu": _cpu_seconds() - cpu,
    }


async def serve() -> None:
    """Answer jobs from stdin until it closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=300, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        while line := await reader.readline():
            result = await run_job(session, orjson.loads(line))
            sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
            sys.stdout.buffer.flush()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve())
