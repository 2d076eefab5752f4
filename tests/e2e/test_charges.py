"""Every outcome after admission settles once, through the real Caddy: a refusal by stream_proxy
(disallowed model 403, bad body 400, a completion limit of the wrong type) releases the concurrency
slot at once, charges nothing and leaves one ledger row; nothing refused reaches the simulator."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from shared import admin, keys
from shared.db import asyncpg_dsn
from tests.e2e.conftest import KeyFactory, SimulatorControl, Stack, key_ids

pytestmark = pytest.mark.e2e

WAIT_SECONDS = 10.0
GOOD = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


async def _post(http: aiohttp.ClientSession, stack: Stack, key: str, path: str, body: bytes) -> int:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with http.post(f"{stack.gateway_url}{path}", data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def _rows(conn: asyncpg.Connection, key_id: int, count: int) -> list[asyncpg.Record]:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        rows = await conn.fetch(
            "SELECT http_status, prompt_tokens, completion_tokens, estimated FROM usage_ledger "
            "WHERE key_id = $1 ORDER BY finished_at",
            key_id,
        )
        if len(rows) >= count or time.monotonic() > deadline:
            return list(rows)
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    ("path", "refused", "status"),
    [
        ("/api/chat", {**GOOD, "model": "qwen3:8b"}, 403),
        ("/v1/chat/completions", {**GOOD, "model": "qwen3:8b"}, 403),
        ("/v1/messages", {**GOOD, "model": "qwen3:8b", "max_tokens": 5}, 403),
        ("/api/chat", {**GOOD, "options": {"num_predict": "5"}}, 400),
        ("/v1/responses", {"model": "llama3.2", "input": "hi", "max_output_tokens": "5"}, 400),
        ("/api/chat", b'{"model":"llama3.2","model":"qwen3:8b"}', 400),
        ("/api/generate", {"model": "llama3.2", "prompt": "hi", "template": "{{ .Prompt }}"}, 403),
        ("/api/generate", {"model": "llama3.2", "prompt": "hi", "TEMPLATE": "{{ .Prompt }}"}, 403),
        ("/api/chat", {**GOOD, "_debug_render_only": True}, 403),
        ("/api/generate", {"model": "llama3.2", "prompt": "hi", "_DEBUG_RENDER_ONLY": True}, 403),
    ],
)
async def test_a_refused_request_does_not_hold_a_concurrency_slot(  # noqa: PLR0917 - pytest fixtures
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    stack_db: asyncpg.Connection,
    path: str,
    refused: dict[str, Any] | bytes,
    status: int,
) -> None:
    """Concurrency 1: a request stream_proxy refuses (the sidecar had admitted it and taken the
    slot), then an immediate valid one is served 200, not 429; the refusal is one ledger row with
    its status and 0 tokens, and never reached the simulator."""
    key = await make_key(max_concurrent=1, models="llama3.2")
    body = refused if isinstance(refused, bytes) else orjson.dumps(refused)
    assert await _post(http, stack, key, path, body) == status
    assert await _post(http, stack, key, "/api/chat", orjson.dumps(GOOD)) == 200
    records = await simulator.requests()
    assert [r["path"] for r in records] == ["/api/chat"]
    _, key_id = await key_ids(stack_db, key)
    rows = await _rows(stack_db, key_id, 2)
    first, second = rows[:2]
    assert (first["http_status"], first["prompt_tokens"], first["completion_tokens"]) == (status, 0, 0)
    assert second["http_status"] == 200
    assert len(rows) == 2


async def test_wrong_typed_limit_is_never_replaced_by_the_default(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """A caller who sends `max_output_tokens: "5"` is refused (400, OpenAI-shaped), not served up to
    the gateway's default completion limit."""
    key = await make_key(total_tokens=100_000)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = {"model": "llama3.2", "input": "hello", "max_output_tokens": "5"}
    async with http.post(f"{stack.gateway_url}/v1/responses", json=body, headers=headers) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert "max_output_tokens" in error["message"]
    assert await simulator.requests() == []


async def test_a_key_allowed_templates_may_send_them(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """After `set-templates --on` a generate with its own template reaches Ollama (and is bounded
    by num_ctx alone), as does a debug render."""
    key = await make_key()
    conn = await asyncpg.connect(asyncpg_dsn(stack.database_url))
    try:
        await admin.set_templates(conn, prefix=keys.parse_key(key).prefix, on=True)
    finally:
        await conn.close()
    deadline = time.monotonic() + WAIT_SECONDS
    body = orjson.dumps({"model": "llama3.2", "prompt": "hi", "template": "{{ .Prompt }}", "stream": False})
    while (status := await _post(http, stack, key, "/api/generate", body)) == 403:
        assert time.monotonic() < deadline, "the sidecar never saw the key allowed templates"
        await asyncio.sleep(0.2)
    assert status == 200
    debug = orjson.dumps({"model": "llama3.2", "prompt": "hi", "_debug_render_only": True, "stream": False})
    assert await _post(http, stack, key, "/api/generate", debug) == 200
    assert [r["path"] for r in await simulator.requests()][-2:] == ["/api/generate", "/api/generate"]


@pytest.mark.parametrize(
    ("label", "raw"),
    [
        (
            "ligature key Go does not fold",
            '{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"\ufb06ream":false}',
        ),
        (
            "long s folds to options",
            '{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"option\u017f":{"num_predict":5},"stream":false}',
        ),
        (
            "options keys are exact",
            '{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"OPTIONS":{"NUM_PREDICT":5},"stream":false}',
        ),
        (
            "duplicate key",
            '{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false,"stream":true}',
        ),
        (
            "options of the wrong type",
            '{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"options":"fast"}',
        ),
        (
            "absurd num_predict",
            '{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"options":{"num_predict":1e30}}',
        ),
        (
            "absurd max_tokens",
            '{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"max_tokens":99999999999}',
        ),
    ],
)
async def test_odd_bodies_never_leave_the_ledger_below_the_simulator(  # noqa: PLR0917 - fixtures
    label: str,
    raw: str,
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    stack_db: asyncpg.Connection,
) -> None:
    """Bodies Go reads differently from Python: whatever the gateway answers, the key's ledger row
    holds at least the tokens the simulator counted (exactly them when it finished), and a refused
    body never reached the simulator."""
    key = await make_key(total_tokens=100_000)
    path = "/v1/chat/completions" if "max_tokens" in raw else "/api/chat"
    status = await _post(http, stack, key, path, raw.encode())
    _, key_id = await key_ids(stack_db, key)
    (row,) = await _rows(stack_db, key_id, 1)
    records = await simulator.requests()
    if status != 200:
        assert 400 <= status < 500, (label, status)
        assert records == [], label
        assert (row["prompt_tokens"], row["completion_tokens"]) == (0, 0), label
        return
    (record,) = records
    generation = record["generation"]
    counted = (generation["prompt_eval_count"], generation["eval_count"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == counted, (label, dict(row), generation)
