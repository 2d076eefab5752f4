"""Prompt logs end to end: a key opted in has its request body and the generated text stored by the
accountant, each cut at GATEWAY_PROMPT_LOG_MAX_BYTES (4,096 on the e2e stack) at a character
boundary, so neither stream_proxy's spool, the usage stream nor the table holds more per request."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from shared import admin, keys
from tests.e2e.conftest import KeyFactory, SimulatorControl, Stack, key_ids

pytestmark = pytest.mark.e2e

CAP = 4096  # GATEWAY_PROMPT_LOG_MAX_BYTES of the e2e stack (tests/e2e/conftest.py)
WAIT_SECONDS = 10.0


async def logged(conn: asyncpg.Connection, key: str, count: int) -> asyncpg.Record:
    """The key's newest prompt-log row, once the accountant wrote `count` of them."""
    _, key_id = await key_ids(conn, key)
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        rows = await conn.fetch("SELECT * FROM prompt_logs WHERE key_id = $1 ORDER BY created_at", key_id)
        if len(rows) >= count:
            assert len(rows) == count
            return rows[-1]
        assert time.monotonic() < deadline, f"{len(rows)} prompt logs, not {count}"
        await asyncio.sleep(0.1)


async def chat(http: aiohttp.ClientSession, stack: Stack, key: str, body: dict[str, Any]) -> Any:
    """A non-streamed native chat's answer."""
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(f"{stack.gateway_url}/api/chat", data=orjson.dumps(body), headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_prompt_logs_hold_the_request_and_the_answer_each_cut_at_the_byte_limit(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    stack_db: asyncpg.Connection,
    simulator: SimulatorControl,
) -> None:
    """A short chat is logged whole: the exact body sent and the exact content answered. A body of
    6,000 bytes of two-byte characters and an answer of about 12,000 bytes are each logged as their
    first 4,096 bytes or less, never half a character (4,095 for the body: 4,096 would split one)."""
    key = await make_key()
    prefix = keys.parse_key(key).prefix
    await admin.set_prompt_logging(stack_db, prefix=prefix, on=True, ttl=dt.timedelta(days=1))

    small = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "log me, please"}],
        "stream": False,
    }
    answer = await chat(http, stack, key, small)
    row = await logged(stack_db, key, 1)
    assert row["request_text"] == orjson.dumps(small).decode()
    assert row["response_text"] == answer["message"]["content"]

    await simulator.settings(completion_tokens=2000)
    text = "é" * 3000
    large = {"model": "llama3.2", "messages": [{"role": "user", "content": text}], "stream": False}
    sent = orjson.dumps(large)
    assert len(sent) > CAP
    answer = await chat(http, stack, key, large)
    content = answer["message"]["content"]
    assert len(content.encode()) > 2 * CAP
    row = await logged(stack_db, key, 2)
    assert sent.startswith(row["request_text"].encode())
    assert CAP - 1 <= len(row["request_text"].encode()) <= CAP
    assert content.encode().startswith(row["response_text"].encode())
    assert CAP - 3 <= len(row["response_text"].encode()) <= CAP


def _responses_text(answer: Any) -> str:
    return "".join(
        part["text"]
        for item in answer["output"]
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )


# (path, body, the generated text in the answer) for a whole (non-streamed) answer of each family
WHOLE = [
    (
        "/api/generate",
        {"model": "llama3.2", "prompt": "log me", "stream": False},
        lambda a: a["response"],
    ),
    (
        "/v1/chat/completions",
        {"model": "llama3.2", "messages": [{"role": "user", "content": "log me"}]},
        lambda a: a["choices"][0]["message"]["content"],
    ),
    (
        "/v1/completions",
        {"model": "llama3.2", "prompt": "log me"},
        lambda a: a["choices"][0]["text"],
    ),
    (
        "/v1/messages",
        {"model": "llama3.2", "max_tokens": 50, "messages": [{"role": "user", "content": "log me"}]},
        lambda a: "".join(b["text"] for b in a["content"] if b["type"] == "text"),
    ),
    (
        "/v1/responses",
        {"model": "llama3.2", "input": "log me"},
        _responses_text,
    ),
]


@pytest.mark.parametrize(("path", "body", "text_of"), WHOLE, ids=[p for p, _, _ in WHOLE])
async def test_a_whole_answer_of_every_family_is_logged_with_its_generated_text(  # noqa: PLR0917 - fixtures
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    stack_db: asyncpg.Connection,
    simulator: SimulatorControl,
    path: str,
    body: dict[str, Any],
    text_of: Any,
) -> None:
    """Not only streams: a non-streamed answer's text is what the prompt log holds (the native,
    OpenAI and Responses readers logged nothing for one)."""
    key = await make_key()
    await admin.set_prompt_logging(
        stack_db, prefix=keys.parse_key(key).prefix, on=True, ttl=dt.timedelta(days=1)
    )
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(f"{stack.gateway_url}{path}", data=orjson.dumps(body), headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    generated = text_of(answer)
    assert generated
    row = await logged(stack_db, key, 1)
    assert row["request_text"] == orjson.dumps(body).decode()
    assert row["response_text"] == generated
