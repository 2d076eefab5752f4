"""What Ollama does after admission, charged exactly, through the real Caddy: a stream it fails mid
way (the prompt bound plus every chunk relayed, flagged), a full queue (503 in the caller's dialect,
nothing charged), an image (bounded by num_ctx: refused by a small budget, served and charged the
simulator's counts without one), and a tool call (charged the simulator's counts)."""

from __future__ import annotations

from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from tests.e2e.conftest import (
    KeyFactory,
    SimulatorControl,
    Stack,
    finished_records,
    ledger_rows,
    prompt_bound,
)

pytestmark = pytest.mark.e2e

WAIT_SECONDS = 10.0
IMAGE = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


async def _post(
    http: aiohttp.ClientSession, stack: Stack, key: str, path: str, body: Any
) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(f"{stack.gateway_url}{path}", json=body, headers=headers) as resp:
        return resp.status, await resp.read()


FAILING = [
    ("chat", "/api/chat", {"messages": [{"role": "user", "content": "fail me"}], "stream": True}),
    ("generate", "/api/generate", {"prompt": "fail me", "stream": True}),
    (
        "openai_chat",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "fail me"}], "stream": True},
    ),
]


@pytest.mark.parametrize(("route", "path", "shape"), FAILING)
async def test_a_stream_failed_mid_way_is_charged_its_bound_and_what_was_relayed(  # noqa: PLR0917 - fixtures
    route: Any,
    path: str,
    shape: dict[str, Any],
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    stack_db: asyncpg.Connection,
) -> None:
    """Ollama fails after 3 tokens (no final counts): the ledger row is flagged upstream_failed and
    charges the prompt bound reserved plus the 3 chunks relayed, never less than the simulator did
    (its record: 3 tokens sent, a prompt of at most the bound)."""
    await simulator.settings(fail_after_chunks=3, completion_tokens=20)
    key = await make_key()
    body = {"model": "llama3.2", **shape}
    status, _ = await _post(http, stack, key, path, body)
    assert status == 200
    (record,) = await finished_records(http, stack, 1)
    generation = record["generation"]
    assert (generation["outcome"], generation["tokens_sent"]) == ("failed", 3)
    (row,) = await ledger_rows(stack_db, key, 1)
    assert (row["estimated"], row["estimate_reason"]) == (True, "upstream_failed"), dict(row)
    assert row["completion_tokens"] == 3, dict(row)
    assert row["prompt_tokens"] == await prompt_bound(stack, http, body, route), dict(row)


@pytest.mark.parametrize(
    ("path", "shape", "error"),
    [
        (
            "/api/chat",
            {"messages": [{"role": "user", "content": "hi"}]},
            "server busy, please try again.  maximum pending requests exceeded",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, None),
    ],
)
async def test_a_full_queue_is_503_in_the_dialect_and_charges_nothing(  # noqa: PLR0917 - fixtures
    path: str,
    shape: dict[str, Any],
    error: str | None,
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    stack_db: asyncpg.Connection,
) -> None:
    """Ollama's queue is full: the client gets Ollama's 503 in its dialect, and the ledger row has
    status 503 and 0 tokens (Ollama did nothing)."""
    await simulator.settings(queue_full=True)
    key = await make_key()
    status, data = await _post(http, stack, key, path, {"model": "llama3.2", "stream": False, **shape})
    assert status == 503, data
    answer = orjson.loads(data)
    if error is not None:
        assert answer == {"error": error}
    else:
        assert answer["error"]["type"] in ("api_error", "server_error"), answer
    (row,) = await ledger_rows(stack_db, key, 1)
    assert (row["http_status"], row["prompt_tokens"], row["completion_tokens"]) == (503, 0, 0), dict(row)


async def test_an_image_is_bounded_by_num_ctx_and_charged_the_simulators_count(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    stack_db: asyncpg.Connection,
) -> None:
    """An image's tokens are not bytes: a key with a 10,000-token budget cannot reserve the num_ctx
    an image needs (429, nothing reaches the simulator); a key without a budget is served, and its
    ledger row carries exactly the simulator's counts (image tokens included)."""
    await simulator.settings(tokens_per_image=600)
    body = {
        "model": "llama3.2",
        "stream": False,
        "messages": [{"role": "user", "content": "what is it?", "images": [IMAGE]}],
    }
    thrifty = await make_key(total_tokens=10_000)
    status, data = await _post(http, stack, thrifty, "/api/chat", body)
    assert status == 429, data
    assert await simulator.requests() == []
    key = await make_key()
    status, data = await _post(http, stack, key, "/api/chat", body)
    assert status == 200, data
    answer = orjson.loads(data)
    assert answer["prompt_eval_count"] >= 600
    (record,) = await finished_records(http, stack, 1)
    (row,) = await ledger_rows(stack_db, key, 1)
    generation = record["generation"]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        generation["prompt_eval_count"],
        generation["eval_count"],
    )
    assert row["estimated"] is False


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/api/chat", {"messages": [{"role": "user", "content": "weather in Paris?"}], "tools": [TOOL]}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "weather in Paris?"}], "tools": [TOOL]},
        ),
    ],
)
async def test_a_tool_call_is_charged_the_simulators_counts(  # noqa: PLR0917 - fixtures
    path: str,
    shape: dict[str, Any],
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    stack_db: asyncpg.Connection,
) -> None:
    """The model calls the offered tool: the answer carries the call, and the ledger row is exactly
    the simulator's prompt and completion counts."""
    await simulator.settings(tool_call=True)
    key = await make_key(total_tokens=100_000)
    status, data = await _post(http, stack, key, path, {"model": "llama3.2", "stream": False, **shape})
    assert status == 200, data
    answer = orjson.loads(data)
    message = answer["message"] if path == "/api/chat" else answer["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    (record,) = await finished_records(http, stack, 1)
    generation = record["generation"]
    (row,) = await ledger_rows(stack_db, key, 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        generation["prompt_eval_count"],
        generation["eval_count"],
    )
    assert row["estimated"] is False
