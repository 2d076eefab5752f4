"""Tenants cannot disturb each other's models, through the real Caddy
(docs/DECISIONS.md#tenants-cannot-disturb-each-others-models): keep_alive 0 never reaches Ollama as
0 (the shared model stays loaded), options that reload a model are 403 in the caller's dialect
unless the key is allowed them, and /api/ps lists only the key's models with nothing that times
other tenants' requests.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from shared import admin, keys
from tests.e2e.conftest import KeyFactory, SimulatorControl, Stack

pytestmark = pytest.mark.e2e

FLOOR = 300  # GATEWAY_KEEP_ALIVE_FLOOR's default; the e2e stack does not set it


async def _post(http: aiohttp.ClientSession, stack: Stack, key: str, path: str, body: Any) -> Any:
    async with http.post(
        f"{stack.gateway_url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        return resp.status, resp.headers.get("Content-Type"), await resp.read()


async def _loaded(http: aiohttp.ClientSession, url: str, key: str | None = None) -> list[dict[str, Any]]:
    """/api/ps's entries, from the simulator itself (no key) or through the gateway."""
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    async with http.get(f"{url}/api/ps", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        entries: list[dict[str, Any]] = orjson.loads(await resp.read())["models"]
        return entries


def _forwarded(records: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    return [orjson.loads(r["body_text"]) for r in records if r["path"] == path]


async def test_keep_alive_zero_never_unloads_a_shared_model(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """One tenant's model is loaded; another tenant's unload requests (keep_alive 0, "0s", "-0",
    "1ms" on /api/chat, /api/generate and /api/embed) reach Ollama with the floor instead, and the
    models are still loaded afterwards."""
    user, other = await make_key(), await make_key()
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    status, _, raw = await _post(http, stack, user, "/api/chat", chat)
    assert status == 200, raw
    status, _, raw = await _post(http, stack, user, "/api/embed", {"model": "all-minilm", "input": "x"})
    assert status == 200, raw
    unloads = [
        ("/api/chat", {"model": "llama3.2", "messages": [], "keep_alive": 0}),
        ("/api/generate", {"model": "llama3.2", "KEEP_ALIVE": "0s"}),
        ("/api/generate", {"model": "llama3.2", "keep_alive": "-0", "stream": False}),
        ("/api/embed", {"model": "all-minilm", "input": [], "keep_alive": "1ms"}),
    ]
    for path, body in unloads:
        status, _, raw = await _post(http, stack, other, path, body)
        assert status == 200, raw
        assert b'"unload"' not in raw
    records = await simulator.requests()
    sent = _forwarded(records, "/api/chat")[-1:] + _forwarded(records, "/api/generate")[-2:]
    sent += _forwarded(records, "/api/embed")[-1:]
    assert [s["keep_alive"] for s in sent] == [FLOOR] * 4
    assert not any("KEEP_ALIVE" in s for s in sent)
    loaded = {e["model"] for e in await _loaded(http, stack.ollama_url)}
    assert {"llama3.2:latest", "all-minilm:latest"} <= loaded


async def _set_reload(stack_db: asyncpg.Connection, token: str, *, on: bool) -> None:
    await admin.set_reload_options(stack_db, prefix=keys.parse_key(token).prefix, on=on)


async def test_reload_options_are_403_without_the_flag_and_forwarded_with_it(
    stack: Stack,
    http: aiohttp.ClientSession,
    make_key: KeyFactory,
    simulator: SimulatorControl,
    stack_db: asyncpg.Connection,
) -> None:
    """num_gpu (any case) and native `shift` are 403 in the native and OpenAI dialects and never
    reach Ollama for a key without `set-reload-options --on`; the same requests from a key with it
    are forwarded with the options intact."""
    plain, trusted = await make_key(), await make_key()
    await _set_reload(stack_db, trusted, on=True)
    native = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    cases = [
        ("/api/chat", {**native, "options": {"num_gpu": 0}}),
        ("/api/chat", {**native, "options": {"NUM_GPU": 0}}),
        (
            "/api/generate",
            {"model": "llama3.2", "prompt": "hi", "stream": False, "options": {"use_mmap": False}},
        ),
        ("/api/generate", {"model": "llama3.2", "prompt": "hi", "stream": False, "Shift": False}),
        ("/api/embed", {"model": "all-minilm", "input": "x", "options": {"num_thread": 1}}),
    ]
    for path, body in cases:
        status, content_type, raw = await _post(http, stack, plain, path, body)
        assert status == 403, raw
        assert content_type == "application/json; charset=utf-8"
        assert "reloads the model" in orjson.loads(raw)["error"]
    openai_body = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "hi"}],
        "options": {"num_batch": 8},
    }
    status, content_type, raw = await _post(http, stack, plain, "/v1/chat/completions", openai_body)
    assert status == 403, raw
    assert orjson.loads(raw)["error"]["type"] == "permission_error"
    assert content_type == "application/json"
    assert await simulator.requests() == []

    for path, body in cases:
        status, _, raw = await _post(http, stack, trusted, path, body)
        assert status == 200, raw
    records = await simulator.requests()
    chats, generates = _forwarded(records, "/api/chat"), _forwarded(records, "/api/generate")
    assert (chats[0]["options"]["num_gpu"], chats[1]["options"]["NUM_GPU"]) == (0, 0)
    assert generates[0]["options"]["use_mmap"] is False
    assert generates[1]["Shift"] is False
    assert _forwarded(records, "/api/embed")[0]["options"] == {"num_thread": 1}


async def test_ps_lists_only_the_keys_models_without_timing(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """With llama3.2 and qwen3:8b loaded by another tenant, /api/ps through the gateway shows a key
    allowed only llama3.2 just that one, and no key sees expires_at, size_vram or context_length."""
    other, narrow = await make_key(), await make_key(models="llama3.2")
    for model in ("llama3.2", "qwen3:8b"):
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": False,
            "think": False,
        }
        status, _, raw = await _post(http, stack, other, "/api/chat", body)
        assert status == 200, raw
    direct = await _loaded(http, stack.ollama_url)
    assert {e["model"] for e in direct} >= {"llama3.2:latest", "qwen3:8b"}
    assert all("expires_at" in e for e in direct)

    seen = await _loaded(http, stack.gateway_url, narrow)
    assert [e["model"] for e in seen] == ["llama3.2:latest"]
    everything = await _loaded(http, stack.gateway_url, other)
    assert {e["model"] for e in everything} == {e["model"] for e in direct}
    for entry in seen + everything:
        assert not {"expires_at", "size_vram", "context_length"} & set(entry), entry
        assert {"name", "model", "size", "digest"} <= set(entry)
