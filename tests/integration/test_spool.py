"""stream_proxy's usage spool against a real Valkey that is killed and restarted: events written
while Redis is gone wait in order, a full spool makes the process not ready and refuses new
requests with 503, and everything is written, once and in order, when Redis is back."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from pathlib import Path
from typing import Any, cast

import attrs
import pytest

import localstack
from shared import store, usage_wire
from shared.config import ProxyConfig, load_config
from shared.models import UsageEvent
from stream_proxy.app import REPORTER, create_app
from stream_proxy.usage import UsageReporter
from tests.integration.serving import serving

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def event(n: int) -> UsageEvent:
    now = time.time()
    return UsageEvent(
        request_id=f"spooled-{n}-{uuid.uuid4().hex[:6]}",
        tenant_id=1,
        key_id=1,
        key_prefix="spooltst",
        endpoint="/api/chat",
        model="llama3.2",
        prompt_tokens=10 + n,
        completion_tokens=n,
        reserved_tokens=100,
        estimated=False,
        estimate_reason=None,
        http_status=200,
        upstream_status=200,
        started_at=now,
        first_byte_at=now,
        finished_at=now,
        bytes_relayed=10,
        client_disconnected=False,
    )


async def stream_ids(url: str, stream: str) -> list[str]:
    """Request ids on the stream, in order."""
    async with store.connect(url) as client:
        entries = await client.xrange(stream)
    return [usage_wire.decode(cast("dict[bytes, bytes]", entry.field_values)).request_id for entry in entries]


async def test_events_wait_in_order_while_redis_is_gone_and_are_written_once_when_it_is_back(
    tmp_path: Path,
) -> None:
    """Valkey SIGKILLed: three events are spooled (report says not written, the spool is full at
    3); restarted on the same port: one drain writes all three, in order, and the spool is empty."""
    valkey = localstack.Valkey(tmp_path / "valkey").start()
    stream = f"spool:{uuid.uuid4().hex[:6]}:usage"
    try:
        async with store.connect(valkey.url) as client:
            reporter = UsageReporter(client, stream, spool_max=3)
            assert await reporter.report(event(0)) is True
            assert valkey.proc is not None
            valkey.proc.kill()
            valkey.proc.wait()
            events = [event(n) for n in (1, 2, 3)]
            for each in events:
                assert await reporter.report(each) is False
            assert (reporter.depth, reporter.full) == (3, True)
            assert await reporter.drain() == 0  # still gone: nothing lost, nothing written

            valkey.start()  # same port, empty
            deadline = time.monotonic() + 10
            written = 0
            while written < 3 and time.monotonic() < deadline:
                written += await reporter.drain()
                await asyncio.sleep(0.1)
            assert written == 3
            assert (reporter.depth, reporter.full) == (0, False)
        assert await stream_ids(valkey.url, stream) == [e.request_id for e in events]
    finally:
        valkey.stop()


async def test_events_ending_together_share_a_pipeline_and_each_keeps_its_own_settle(
    tmp_path: Path,
) -> None:
    """Group commit: 200 events reported at once reach the stream exactly once each in fewer
    pipelines than events, every follow-up runs after its own event in the same round trip (each
    INCRBY lands on its own counter), and an event reported alone afterwards still leaves at once."""
    valkey = localstack.Valkey(tmp_path / "valkey").start()
    stream = f"spool:{uuid.uuid4().hex[:6]}:usage"
    try:
        async with store.connect(valkey.url) as client:
            reporter = UsageReporter(client, stream)
            events = [event(n) for n in range(200)]

            def then(n: int) -> Any:
                def queue(pipe: Any) -> Any:
                    reply = pipe.incrby(f"{stream}:settled:{n}", n + 1)
                    return lambda: reply

                return queue

            results = await asyncio.gather(*(reporter.report(e, then=then(n)) for n, e in enumerate(events)))
            assert results == [True] * 200
            assert 1 <= reporter.batches < 200
            written_batches = reporter.batches
            assert sorted(await stream_ids(valkey.url, stream)) == sorted(e.request_id for e in events)
            settled = await client.mget([f"{stream}:settled:{n}" for n in range(200)])
            assert [int(v or 0) for v in settled] == [n + 1 for n in range(200)]
            alone = event(999)
            assert await asyncio.wait_for(reporter.report(alone), 5) is True
            assert reporter.batches == written_batches + 1
            assert (await stream_ids(valkey.url, stream))[-1] == alone.request_id
            assert reporter.depth == 0
    finally:
        valkey.stop()


async def test_an_event_that_cannot_be_encoded_or_settled_never_stalls_its_batch(tmp_path: Path) -> None:
    """In one group commit: an event whose text cannot be encoded fails for its own caller only
    (as it would alone), an event whose follow-up cannot be queued is still written, and the rest
    are written and settled; the next report goes through (the batch did not wedge the writer)."""
    valkey = localstack.Valkey(tmp_path / "valkey").start()
    stream = f"spool:{uuid.uuid4().hex[:6]}:usage"
    try:
        async with store.connect(valkey.url) as client:
            reporter = UsageReporter(client, stream)
            good, unsettled, later = event(1), event(2), event(3)
            broken = attrs.evolve(event(4), request_text="\udcff not UTF-8")

            def settle(pipe: Any) -> Any:
                reply = pipe.incrby(f"{stream}:settled", 1)
                return lambda: reply

            def refuse(pipe: Any) -> Any:
                raise ValueError("cannot queue")

            outcomes = await asyncio.wait_for(
                asyncio.gather(
                    reporter.report(good, then=settle),
                    reporter.report(broken, then=settle),
                    reporter.report(unsettled, then=refuse),
                    return_exceptions=True,
                ),
                10,
            )
            assert outcomes[0] is True
            assert isinstance(outcomes[1], TypeError)
            assert outcomes[2] is True
            assert await asyncio.wait_for(reporter.report(later), 5) is True
            assert int(await client.get(f"{stream}:settled") or 0) == 1
            assert reporter.depth == 0
        assert await stream_ids(valkey.url, stream) == [e.request_id for e in (good, unsettled, later)]
    finally:
        valkey.stop()


async def test_the_spool_is_full_by_bytes_before_it_is_full_by_count(tmp_path: Path) -> None:
    """Events with prompt logging carry the request's and answer's text: with Valkey gone, three
    events of 40 kB each fill a spool bounded at 100 kB although it would hold 10,000 by count;
    written once Valkey is back, the spool is empty and not full again."""
    valkey = localstack.Valkey(tmp_path / "valkey").start()
    stream = f"spool:{uuid.uuid4().hex[:6]}:usage"
    try:
        async with store.connect(valkey.url) as client:
            reporter = UsageReporter(client, stream, spool_max_bytes=100_000)
            assert valkey.proc is not None
            valkey.proc.kill()
            valkey.proc.wait()
            big = [attrs.evolve(event(n), request_text="x" * 40_000) for n in range(3)]
            for each in big[:2]:
                assert await reporter.report(each) is False
            assert (reporter.depth, reporter.full) == (2, False)
            assert 80_000 < reporter.spooled_bytes < 100_000
            assert await reporter.report(big[2]) is False
            assert (reporter.depth, reporter.full) == (3, True)

            valkey.start()
            deadline = time.monotonic() + 10
            while reporter.depth and time.monotonic() < deadline:
                await reporter.drain()
                await asyncio.sleep(0.1)
            assert (reporter.depth, reporter.spooled_bytes, reporter.full) == (0, 0, False)
        assert await stream_ids(valkey.url, stream) == [e.request_id for e in big]
    finally:
        valkey.stop()


async def test_a_full_spool_makes_stream_proxy_not_ready_and_refuses_new_requests_until_drained(
    tmp_path: Path,
) -> None:
    """With the spool full, /readyz says spool_full and a new request gets 503 with Retry-After in
    the caller's dialect (before its grant is even looked at); once Valkey is back the background
    retry drains the spool and /readyz no longer reports it full."""
    valkey = localstack.Valkey(tmp_path / "valkey").start()
    env = {
        "GATEWAY_REDIS_URL": valkey.url,
        "GATEWAY_REDIS_PREFIX": f"spool:{uuid.uuid4().hex[:6]}:",
        "GATEWAY_GRANT_SECRET": secrets.token_urlsafe(32),
        "GATEWAY_OLLAMA_URL": f"http://127.0.0.1:{localstack.free_port()}",
    }
    app = create_app(load_config(ProxyConfig, env))
    try:
        async with serving(app) as (server, http):
            reporter = app[REPORTER]
            reporter.spool_max = 2
            assert valkey.proc is not None
            valkey.proc.kill()
            valkey.proc.wait()
            for n in (1, 2):
                assert await reporter.report(event(n)) is False
            async with http.get(server.make_url("/readyz")) as resp:
                assert resp.status == 503
                assert (await resp.json())["spool_full"] is True
            for path, body_has in (("/api/chat", '"error":"'), ("/v1/chat/completions", '"message":"')):
                async with http.post(server.make_url(path), data=b"{}") as resp:
                    assert resp.status == 503
                    assert resp.headers["Retry-After"] == "1"
                    assert body_has in await resp.text()

            valkey.start()
            deadline = time.monotonic() + 10
            while reporter.depth and time.monotonic() < deadline:  # noqa: ASYNC110 (polling a counter)
                await asyncio.sleep(0.1)
            assert reporter.depth == 0
            async with http.get(server.make_url("/readyz")) as resp:
                assert (await resp.json())["spool_full"] is False
    finally:
        valkey.stop()
