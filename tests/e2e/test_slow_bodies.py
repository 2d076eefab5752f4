"""A body that trickles in cannot outlive its lease or its grant (docs/RELIABILITY.md#hostile-input).

stream_proxy gives the whole body GATEWAY_BODY_TIMEOUT (10 s in the e2e stack, at most half the
lease TTL) and checks the grant's expiry again once the body is in: a client cannot hold a
concurrency slot past its lease, nor be served on a grant that lapsed (a key revoked meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time

import aiohttp
import attrs
import orjson
import pytest
from yarl import URL

from shared import grant as grants
from tests.e2e.conftest import KeyFactory, SimulatorControl, Stack

pytestmark = pytest.mark.e2e

MODEL = "llama3.2"


def _body(content: str) -> bytes:
    return orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], "stream": False})


async def _trickle(
    address: tuple[str, int], path: str, headers: dict[str, str], body: bytes, *, seconds: float
) -> tuple[int | None, bytes]:
    """POST `body` spread evenly over `seconds`, byte by byte; the status and body of the answer
    (None when the connection closed without one). Stops sending once an answer has started."""
    reader, writer = await asyncio.open_connection(*address)
    head = [f"POST {path} HTTP/1.1", f"Host: {address[0]}:{address[1]}", f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    head.append("Connection: close")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    answer = asyncio.create_task(reader.read())
    try:
        for i in range(len(body)):
            if answer.done():
                break
            with contextlib.suppress(OSError):
                writer.write(body[i : i + 1])
                await writer.drain()
            await asyncio.wait([answer], timeout=seconds / len(body))
        async with asyncio.timeout(20):
            data = await answer
    finally:
        answer.cancel()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not data:
        return None, b""
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split(b" ")[1]), rest.partition(b"\r\n\r\n")[2]


def _address(url: str) -> tuple[str, int]:
    parsed = URL(url)
    assert parsed.host is not None
    assert parsed.port is not None
    return parsed.host, parsed.port


async def test_a_body_slower_than_the_deadline_is_408_and_frees_its_slot(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """A chat body dribbled over 14 s through Caddy on a key with one concurrent stream: answered 408
    in Ollama's shape by the 10 s body deadline, never relayed, and the slot is free at once for
    the next request (200)."""
    key = await make_key(max_concurrent=1)
    body = _body("slow " * 20)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    started = time.monotonic()
    status, answer = await _trickle(_address(stack.gateway_url), "/api/chat", headers, body, seconds=14)
    elapsed = time.monotonic() - started
    assert status == 408, (status, answer)
    assert orjson.loads(answer) == {"error": "request body not received within 10 s"}
    assert elapsed < 13, elapsed
    assert not [r for r in await simulator.requests() if r["path"] == "/api/chat"]
    async with http.post(f"{stack.gateway_url}/api/chat", data=_body("next"), headers=headers) as resp:
        assert resp.status == 200, await resp.text()


async def test_a_grant_that_lapses_while_its_body_arrives_is_not_served(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """A grant the sidecar issued, re-signed to lapse 1 s after it reaches stream_proxy, with the
    body sent over 3 s (within the body deadline): 403 once the body is in, nothing relayed."""
    key = await make_key()
    forwarded = {
        "Authorization": f"Bearer {key}",
        "X-Forwarded-Method": "POST",
        "X-Forwarded-Uri": "/api/chat",
    }
    async with http.get(f"{stack.sidecar_url}/authz", headers=forwarded) as resp:
        assert resp.status == 200, await resp.text()
        issued = resp.headers["X-Gw-Grant"]
    secret = stack.env["GATEWAY_GRANT_SECRET"]
    real = grants.verify(issued, secrets=(secret,), method="POST", path="/api/chat", now=time.time())
    short = grants.sign(attrs.evolve(real, expires_at=time.time() + 1.0), secret)
    headers = {"X-Gw-Grant": short, "Content-Type": "application/json"}
    status, answer = await _trickle(_address(stack.proxy_url), "/api/chat", headers, _body("late"), seconds=3)
    assert status == 403, (status, answer)
    assert orjson.loads(answer) == {
        "error": "request not authorised by the gateway: grant expired while the body was read"
    }
    assert not [r for r in await simulator.requests() if r["path"] == "/api/chat"]


async def test_bodies_of_too_many_values_or_messages_are_400_in_the_callers_dialect(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """660,000 empty messages (2 MB) on /api/chat and 10,001 messages on /v1/chat/completions and
    /v1/messages: 400 in each caller's dialect, nothing relayed; a 290,000-value tool schema (the
    largest body still read) is served while a stream on the same stream_proxy goes on."""
    key = await make_key()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    turn = {"role": "user", "content": "x"}
    cases = [
        ("/api/chat", {"model": MODEL, "messages": [{}] * 660_000}, "more than 300000 JSON values"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [turn] * 10_001}, "more than 10000 messages"),
        ("/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": [turn] * 10_001}, "more than 10000"),
    ]
    for path, document, message in cases:
        async with http.post(
            f"{stack.gateway_url}{path}", data=io.BytesIO(orjson.dumps(document)), headers=headers
        ) as resp:
            answer = orjson.loads(await resp.read())
        assert resp.status == 400, (path, answer)
        if path == "/api/chat":
            assert message in answer["error"]
        elif path == "/v1/messages":
            assert answer["type"] == "error"
            assert message in answer["error"]["message"]
        else:
            assert message in answer["error"]["message"]
            assert answer["error"]["type"] == "invalid_request_error"
    assert not await simulator.requests()

    await simulator.settings(tokens_per_second=50, completion_tokens=100)
    schema = {f"p{i}": {"type": "string"} for i in range(140_000)}
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": schema}},
    }
    big = {
        "model": MODEL,
        "messages": [turn],
        "tools": [tool],
        "stream": False,
        "options": {"num_predict": 1},
    }
    streamed = {"model": MODEL, "messages": [turn], "options": {"num_predict": 40}}

    async def stream() -> list[bytes]:
        async with http.post(f"{stack.gateway_url}/api/chat", json=streamed, headers=headers) as resp:
            assert resp.status == 200
            return [line async for line in resp.content]

    async def heavy() -> int:
        async with http.post(
            f"{stack.gateway_url}/api/chat", data=io.BytesIO(orjson.dumps(big)), headers=headers
        ) as resp:
            await resp.read()
            return resp.status

    lines, status = await asyncio.gather(stream(), heavy())
    assert status == 200
    assert len(lines) == 41
    assert orjson.loads(lines[-1])["done"] is True
