"""Three simulated Ollama backends with overlapping models behind one gateway, through the real Caddy:
each request goes to a backend that has its model, streams spread by `max_parallel` and never exceed
it, listings are merged, a backend that fails before the first byte is retried on another, a killed
backend leaves the rotation and rejoins, and the books stay exact. What each simulator served is
read from its own records."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import attrs
import orjson
import pytest

import localstack
from shared import admin, keys
from shared.db import asyncpg_dsn
from stream_proxy.backends import USER_AGENT
from tests.conftest import clone_database
from tests.e2e.conftest import TEST_ARGON2

pytestmark = pytest.mark.e2e

# sim1 and sim2 have llama3.2 (max_parallel 4 and 2); qwen3 is on sim1 and sim3; all-minilm on sim2
# and sim3. A poll every second: a killed backend leaves the rotation within about a second.
MODELS = [
    ("llama3.2:latest", "qwen3:8b"),
    ("llama3.2:latest", "all-minilm:latest"),
    ("qwen3:8b", "all-minilm:latest"),
]
OPTIONS = ["max_parallel=4", "max_parallel=2", "max_parallel=3"]
POLL = 1.0
HAS = {
    "llama3.2": {"sim1", "sim2"},
    "qwen3:8b": {"sim1", "sim3"},
    "all-minilm": {"sim2", "sim3"},
}


@attrs.define
class Three:
    """The stack, its simulators by name and a session."""

    local: localstack.LocalStack
    gateway: str
    sims: dict[str, str]
    database_url: str
    pepper: str
    http: aiohttp.ClientSession

    async def key(self, **limits: int) -> str:
        """A key on a new tenant, with the given key limits (`max_concurrent=3`, ...)."""
        conn = await asyncpg.connect(asyncpg_dsn(self.database_url))
        try:
            tenant = f"t-{uuid.uuid4().hex[:10]}"
            await admin.create_tenant(conn, name=tenant)
            created = await admin.create_key(
                conn, tenant=tenant, name="k", pepper=self.pepper, params=TEST_ARGON2
            )
            if limits:
                changes = {n: admin.parse_limit(n, str(v)) for n, v in limits.items()}
                await admin.set_limits(conn, prefix=created.key.prefix, limits=changes)
            return created.token
        finally:
            await conn.close()

    async def ledger(self, key: str, count: int, *, served: bool = True) -> list[asyncpg.Record]:
        """The key's ledger rows, once the accountant has written `count` of them (`served`: of
        those with status 200; the rows of refusals, 429 at the reservation, come too, so counting
        every row could stop before the last served one is in)."""
        conn = await asyncpg.connect(asyncpg_dsn(self.database_url))
        try:
            prefix = keys.parse_key(key).prefix
            query = "SELECT l.* FROM usage_ledger l JOIN api_keys k ON k.id = l.key_id WHERE k.prefix = $1"
            for _ in range(150):  # 15 s
                rows = await conn.fetch(query, prefix)
                if sum(1 for r in rows if r["http_status"] == 200 or not served) >= count:
                    break
                await asyncio.sleep(0.1)
            return list(rows)
        finally:
            await conn.close()

    async def records(self, sim: str) -> list[dict[str, Any]]:
        """What one simulator received, the gateway's catalogue polls left out."""
        query = {"ignore_agent": USER_AGENT}
        async with self.http.get(f"{self.sims[sim]}/_sim/requests", params=query) as resp:
            resp.raise_for_status()
            records: list[dict[str, Any]] = await resp.json()
            return records

    async def settings(self, sim: str, **changes: Any) -> None:
        async with self.http.post(f"{self.sims[sim]}/_sim/settings", json=changes) as resp:
            resp.raise_for_status()

    async def until_healthy(self, count: int, seconds: float = 10.0) -> None:
        """Wait until stream_proxy's /readyz counts `count` backends in rotation."""
        deadline = time.monotonic() + seconds
        while True:
            async with self.http.get(f"{self.local.urls['proxy_url']}/readyz") as resp:
                if (await resp.json())["backends_healthy"] == count:
                    return
            assert time.monotonic() < deadline, f"not {count} backends healthy within {seconds} s"
            await asyncio.sleep(0.2)

    async def reset(self) -> None:
        for url in self.sims.values():
            async with self.http.post(f"{url}/_sim/reset") as resp:
                resp.raise_for_status()

    async def chat(
        self, key: str, model: str, *, stream: bool = False, limit: int | None = None
    ) -> tuple[int, bytes]:
        """A native chat (an embedding of "hello" for all-minilm, which cannot chat); `limit` is
        its num_predict."""
        body: dict[str, Any]
        if model.startswith("all-minilm"):
            path, body = "/api/embed", {"model": model, "input": "hello"}
        else:
            path = "/api/chat"
            body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "stream": stream}
            if limit is not None:
                body["options"] = {"num_predict": limit}
        headers = {"Authorization": f"Bearer {key}"}
        async with self.http.post(f"{self.gateway}{path}", json=body, headers=headers) as resp:
            return resp.status, await resp.read()


@pytest.fixture(scope="module")
async def three(
    work_dir: Path, postgres_admin_url: str, template_database: str, redis_url: str
) -> AsyncIterator[Three]:
    database_url = await clone_database(postgres_admin_url, template_database, f"e2e3_{os.getpid()}")
    environ = {
        **os.environ,
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_REDIS_PREFIX": f"e2e3:{uuid.uuid4().hex[:8]}:",
        "GATEWAY_BACKEND_POLL_INTERVAL": str(POLL),
    }
    environ.pop("GATEWAY_OLLAMA_URL", None)
    local = localstack.LocalStack(
        work_dir / "e2e-three", environ=environ, ollama_models=MODELS, ollama_options=OPTIONS
    ).start()
    sims = {
        entry.split("=", 1)[0]: entry.split("=", 1)[1].split(";", 1)[0]
        for entry in local.urls["ollama_urls"].split(",")
    }
    try:
        async with aiohttp.ClientSession() as http:
            yield Three(
                local, local.urls["gateway_url"], sims, database_url, local.env["GATEWAY_KEY_PEPPER"], http
            )
    finally:
        local.stop()


def _model_of(record: dict[str, Any]) -> str:
    return str(orjson.loads(record["body_text"]).get("model", ""))


def _peak(records: Sequence[dict[str, Any]]) -> int:
    """The most requests that were open at the simulator at once."""
    events = sorted(
        [(r["received_at_ns"], 1) for r in records] + [(r["finished_at_ns"], -1) for r in records],
        key=lambda e: (e[0], e[1]),
    )
    open_now = peak = 0
    for _, step in events:
        open_now += step
        peak = max(peak, open_now)
    return peak


async def test_every_request_goes_to_a_backend_that_has_its_model_and_listings_are_merged(
    three: Three,
) -> None:
    await three.reset()
    key = await three.key()
    for model in HAS:
        for _ in range(6):
            status, body = await three.chat(key, model)
            assert status == 200, body
    for sim in three.sims:
        for record in await three.records(sim):
            if record["path"] in ("/api/chat", "/api/embed"):
                assert sim in HAS[_model_of(record).split(":latest")[0]], (sim, _model_of(record))
    async with three.http.get(
        f"{three.gateway}/api/tags", headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        assert resp.status == 200
        names = sorted(m["model"] for m in (await resp.json())["models"])
    assert names == ["all-minilm:latest", "llama3.2:latest", "qwen3:8b"]
    async with three.http.get(
        f"{three.gateway}/v1/models", headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        assert resp.status == 200
        ids = sorted(m["id"] for m in (await resp.json())["data"])
    assert ids == ["all-minilm:latest", "llama3.2:latest", "qwen3:8b"]
    status, body = await three.chat(key, "mistral:7b")
    assert status == 404, body
    assert orjson.loads(body) == {"error": 'model "mistral:7b" not found, try pulling it first'}


async def test_forty_streams_spread_by_max_parallel_and_never_exceed_it(three: Three) -> None:
    """llama3.2 is on sim1 (max_parallel 4) and sim2 (2): of 40 concurrent streams sim1 serves
    2/3 and sim2 1/3, each within 20 % of its share, and neither ever has more open at once."""
    await three.reset()
    for sim in ("sim1", "sim2"):
        await three.settings(sim, tokens_per_second=100, completion_tokens=15)
    key = await three.key()
    results = await asyncio.gather(*(three.chat(key, "llama3.2", stream=True) for _ in range(40)))
    assert [status for status, _ in results] == [200] * 40
    served = {
        sim: [r for r in await three.records(sim) if r["path"] == "/api/chat"] for sim in ("sim1", "sim2")
    }
    counts = {sim: len(records) for sim, records in served.items()}
    assert sum(counts.values()) == 40
    assert abs(counts["sim1"] - 40 * 4 / 6) <= 0.2 * 40 * 4 / 6, counts
    assert abs(counts["sim2"] - 40 * 2 / 6) <= 0.2 * 40 * 2 / 6, counts
    assert _peak(served["sim1"]) <= 4
    assert _peak(served["sim2"]) <= 2
    assert not [r for r in await three.records("sim3") if r["path"] == "/api/chat"]


async def test_a_backend_failing_before_the_first_byte_is_retried_on_another(three: Three) -> None:
    """sim1 answers every chat 503 (Ollama's full queue), before any byte: qwen3 requests, which go
    to sim1 first (configuration order), are served by sim3, and the client never sees the 503."""
    await three.reset()
    await three.settings("sim1", queue_full=True)
    try:
        key = await three.key()
        for _ in range(4):
            status, body = await three.chat(key, "qwen3:8b")
            assert status == 200, body
        tried = [r for r in await three.records("sim1") if r["path"] == "/api/chat"]
        served = [r for r in await three.records("sim3") if r["path"] == "/api/chat"]
        assert tried
        assert all(r["status"] == 503 for r in tried)
        assert len(served) == 4
        assert all(r["status"] == 200 for r in served)
    finally:
        await three.settings("sim1", queue_full=False)


async def test_a_killed_backend_leaves_the_rotation_and_rejoins(three: Three) -> None:
    """qwen3 is loaded on sim3 only, so sim3 is preferred for it; sim3 SIGKILLed, and at once a
    qwen3 request: its connection is refused and it is served by sim1, without an error. After the
    next poll sim3 is out of rotation (/readyz still ready, 2 backends); once restarted it rejoins
    and serves again (8 concurrent qwen3 streams need it beside sim1's 4 places)."""
    await three.reset()
    key = await three.key()
    body = {"model": "qwen3:8b", "messages": [{"role": "user", "content": "load"}], "stream": False}
    async with three.http.post(f"{three.sims['sim3']}/api/chat", json=body) as resp:
        assert resp.status == 200
    await asyncio.sleep(POLL * 1.5)  # the gateway's catalogue has seen it loaded there
    three.local.kill("simulator-3")
    try:
        status, answer = await three.chat(key, "qwen3:8b")
        assert status == 200, answer
        assert [_model_of(r) for r in await three.records("sim1") if r["path"] == "/api/chat"] == ["qwen3:8b"]
        await asyncio.sleep(POLL * 1.5)
        async with three.http.get(f"{three.local.urls['proxy_url']}/readyz") as resp:
            ready = await resp.json()
        assert ready["ready"] is True
        assert ready["backends_healthy"] == 2
        for _ in range(4):
            status, answer = await three.chat(key, "qwen3:8b")
            assert status == 200, answer
        assert not [r for r in await three.records("sim1") if r["path"] == "/api/chat" and r["status"] != 200]
    finally:
        three.local.restart("simulator-3")
    await three.until_healthy(3)
    for sim in ("sim1", "sim3"):
        await three.settings(sim, tokens_per_second=50, completion_tokens=10)
    results = await asyncio.gather(*(three.chat(key, "qwen3:8b", stream=True) for _ in range(8)))
    assert Counter(status for status, _ in results) == {200: 8}
    assert [r for r in await three.records("sim3") if r["path"] == "/api/chat"]


async def test_limits_budgets_and_the_ledger_hold_exactly_across_backends(three: Three) -> None:
    """A key limited to 3 concurrent requests and a 1,000-token total budget sends six waves of 5
    streams at once, llama3.2 (on sim1 and sim2) and qwen3 (on sim1 and sim3): never more than 3
    are open at the simulators together, the tokens the simulators' runners handled stay within the
    budget, refusals are 429, and every served request's ledger row equals its simulator's counts."""
    await three.reset()
    for sim in three.sims:
        await three.settings(sim, tokens_per_second=100, completion_tokens=20)
    key = await three.key(max_concurrent=3, total_tokens=1000)
    statuses: Counter[int] = Counter()
    for wave in range(6):
        models = ["llama3.2", "qwen3:8b"] * 3
        sent = [three.chat(key, m, stream=True, limit=20) for m in models[wave % 2 : wave % 2 + 5]]
        statuses.update(status for status, _ in await asyncio.gather(*sent))
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] >= 3
    assert statuses[429] >= 6  # two over the concurrency limit in every wave, more once the budget is spent
    served = [r for sim in three.sims for r in await three.records(sim) if r["path"] == "/api/chat"]
    assert len(served) == statuses[200]
    assert _peak(served) <= 3
    used = sum(r["generation"]["prompt_tokens"] + r["generation"]["completion_tokens"] for r in served)
    assert used <= 1000
    rows = await three.ledger(key, statuses[200])
    charged = sorted((r["prompt_tokens"], r["completion_tokens"]) for r in rows if r["http_status"] == 200)
    simulated = sorted(
        (r["generation"]["prompt_tokens"], r["generation"]["completion_tokens"]) for r in served
    )
    assert charged == simulated


@attrs.define
class Outcome:
    """One client request of the load: when it started, its status, and Ollama's final counts."""

    started: float
    status: int
    counts: tuple[int, int] | None  # (prompt_eval_count, eval_count) of the final chunk; None: cut


async def _stream(three: Three, key: str, model: str) -> Outcome:
    started = time.monotonic()
    body = {"model": model, "messages": [{"role": "user", "content": "go"}], "stream": True}
    try:
        async with three.http.post(
            f"{three.gateway}/api/chat", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as resp:
            lines = [line async for line in resp.content if line.strip()]
            status = resp.status
    except aiohttp.ClientError:
        return Outcome(started, 0, None)
    final = orjson.loads(lines[-1]) if lines else {}
    if status != 200 or final.get("done") is not True:
        return Outcome(started, status, None)
    return Outcome(started, status, (final["prompt_eval_count"], final["eval_count"]))


async def test_a_backend_killed_under_load_fails_only_its_streams_and_the_books_stay_exact(
    three: Three,
) -> None:
    """Ten clients stream qwen3 (on sim1 and sim3) without pause; sim3 is SIGKILLed after 3 s.
    Only requests started before the kill fail (its open streams, at most its 3 places); every
    request started after it is served (the refused ones retried on sim1, then sim3 is out of
    rotation); every ledger row of a served request holds the counts Ollama reported in its final
    chunk, and every failed one is an estimated row. sim3 then rejoins."""
    await three.reset()
    for sim in three.sims:
        await three.settings(sim, tokens_per_second=20, completion_tokens=30)
    key = await three.key()
    outcomes: list[Outcome] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            outcomes.append(await _stream(three, key, "qwen3:8b"))

    clients = [asyncio.create_task(client()) for _ in range(10)]
    try:
        await asyncio.sleep(3.0)
        killed_at = time.monotonic()
        three.local.kill("simulator-3")
        await asyncio.sleep(4.0)
    finally:
        stop.set()
        await asyncio.gather(*clients)
        three.local.restart("simulator-3")
    failed = [o for o in outcomes if o.counts is None]
    assert all(o.started < killed_at for o in failed), failed
    assert 1 <= len(failed) <= 3, failed
    assert sum(1 for o in outcomes if o.started > killed_at) >= 10
    rows = await three.ledger(key, len(outcomes), served=False)
    assert len(rows) == len(outcomes)
    reported = sorted(o.counts for o in outcomes if o.counts is not None)
    exact = sorted((r["prompt_tokens"], r["completion_tokens"]) for r in rows if not r["estimated"])
    assert exact == reported
    assert sorted(r["estimate_reason"] for r in rows if r["estimated"]) == ["upstream_failed"] * len(failed)
    await three.until_healthy(3)
