"""The walking skeleton: client → Caddy → sidecar → Caddy → stream_proxy → simulator and back."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.e2e.conftest import KeyFactory, SimulatorControl, Stack

pytestmark = pytest.mark.e2e

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "Say hi"}]}


async def _stream(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], key: str | None
) -> tuple[int, CIMultiDict[str], bytes, int]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.post(url, json=body, headers=headers) as resp:
        reads, data = 0, b""
        async for chunk in resp.content.iter_any():
            reads += 1
            data += chunk
        return resp.status, CIMultiDict(resp.headers), data, reads


async def _only_record(simulator: SimulatorControl, path: str) -> dict[str, Any]:
    records = [r for r in await simulator.requests() if r["path"] == path]
    assert len(records) == 1, records
    return records[0]


async def test_native_chat_stream_equals_simulator_bytes(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """A streamed /api/chat through Caddy delivers exactly the bytes the simulator wrote, as NDJSON
    chunks that arrive separately (the relay does not buffer the whole answer)."""
    await simulator.settings(tokens_per_second=200)
    key = await make_key()
    status, headers, data, reads = await _stream(http, f"{stack.gateway_url}/api/chat", CHAT, key)
    assert status == 200
    assert headers["Content-Type"] == "application/x-ndjson"
    record = await _only_record(simulator, "/api/chat")
    assert data == base64.b64decode(record["response_base64"])
    lines = data.splitlines()
    assert len(lines) == 13
    assert b'"done":true' in lines[-1]
    assert reads > 1


async def test_openai_chat_stream_equals_simulator_bytes(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """A streamed /v1/chat/completions through Caddy delivers exactly the simulator's SSE bytes,
    less the usage event the gateway asked for on its own behalf, ending with `data: [DONE]`."""
    await simulator.settings(tokens_per_second=200)
    key = await make_key()
    body = {**CHAT, "stream": True}
    status, headers, data, reads = await _stream(http, f"{stack.gateway_url}/v1/chat/completions", body, key)
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream"
    record = await _only_record(simulator, "/v1/chat/completions")
    sent = base64.b64decode(record["response_base64"]).split(b"\n\n")
    # The gateway asked Ollama for usage to meter the stream; the client did not, so that one
    # event (choices: []) is dropped and every other byte is relayed as sent.
    usage_events = [e for e in sent if b'"choices":[]' in e]
    assert len(usage_events) == 1
    assert data == b"\n\n".join(e for e in sent if e not in usage_events)
    assert data.endswith(b"data: [DONE]\n\n")
    assert reads > 1


async def test_no_key_is_401_from_the_sidecar(
    stack: Stack, http: aiohttp.ClientSession, simulator: SimulatorControl
) -> None:
    """Without a key the sidecar answers 401 with WWW-Authenticate in the caller's dialect, and
    nothing reaches the simulator."""
    status, headers, data, _ = await _stream(http, f"{stack.gateway_url}/api/chat", CHAT, None)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert data == b'{"error":"missing API key"}'
    status, _, data, _ = await _stream(http, f"{stack.gateway_url}/v1/chat/completions", CHAT, None)
    assert status == 401
    assert b'"type":"authentication_error"' in data
    assert await simulator.requests() == []


async def test_direct_hit_on_stream_proxy_never_reaches_the_simulator(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """stream_proxy refuses a request without a grant, or with a made-up one, even with a valid
    key: the simulator's record stays empty."""
    key = await make_key()
    status, _, data, _ = await _stream(http, f"{stack.proxy_url}/api/chat", CHAT, key)
    assert status == 403
    assert b"missing grant" in data
    async with http.post(
        f"{stack.proxy_url}/api/chat", json=CHAT, headers={"X-Gw-Grant": "v1.e30.AAAA"}
    ) as resp:
        assert resp.status == 403
    assert await simulator.requests() == []


async def test_public_healthz(stack: Stack, http: aiohttp.ClientSession) -> None:
    """Caddy answers /healthz without a key."""
    async with http.get(f"{stack.gateway_url}/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
