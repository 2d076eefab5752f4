"""Relaying one allowed request to Ollama and its answer back, chunk by chunk as it arrives.

Only an allowlist of request headers is forwarded (never Authorization, X-Gw-*, Origin or
cookies); Host is set for Ollama; redirects are never followed; the response is written as each
upstream chunk arrives and ended right after the last one. A client that goes away cancels the
upstream request at once, which makes Ollama stop generating.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import attrs
from aiohttp import web
from yarl import URL

from stream_proxy.exceptions import Refused

log = logging.getLogger("stream_proxy.relay")

FORWARDED_REQUEST_HEADERS = ("Content-Type", "Accept", "User-Agent")
RELAYED_RESPONSE_HEADERS = ("Content-Type",)
CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError, ConnectionError)


@attrs.define
class RelayResult:
    """What happened, for metering and the usage event."""

    upstream_status: int | None = None
    status: int = 0
    bytes_relayed: int = 0
    chunks: int = 0
    client_disconnected: bool = False
    upstream_failed: bool = False
    first_byte_at: float | None = None


def upstream_headers(request: web.Request, ollama: URL) -> dict[str, str]:
    """The allowlisted request headers plus Host for Ollama and an identity encoding."""
    headers = {name: request.headers[name] for name in FORWARDED_REQUEST_HEADERS if name in request.headers}
    headers["Host"] = f"{ollama.host}:{ollama.port}" if ollama.port else str(ollama.host)
    headers["Accept-Encoding"] = "identity"
    return headers


async def relay(
    request: web.Request,
    *,
    session: aiohttp.ClientSession,
    ollama: URL,
    body: bytes | None,
    first_byte_timeout: float,
    extra_response_headers: dict[str, str] | None = None,
) -> tuple[web.StreamResponse, RelayResult]:
    """Send the request upstream and stream the answer back; raises Refused (502/504) before
    any byte was written to the client."""
    result = RelayResult()
    target = ollama.with_path(request.path)  # no client query string: Ollama takes none
    loop = asyncio.get_running_loop()
    try:
        upstream = await asyncio.wait_for(
            session.request(
                request.method,
                target,
                data=body,
                headers=upstream_headers(request, ollama),
                allow_redirects=False,
            ),
            timeout=first_byte_timeout,
        )
    except TimeoutError:
        raise Refused(504, "upstream model server timed out", headers={"Retry-After": "5"}) from None
    except (aiohttp.ClientError, OSError):
        raise Refused(502, "upstream model server unreachable", headers={"Retry-After": "5"}) from None
    result.upstream_status = upstream.status
    response = web.StreamResponse(status=upstream.status)
    for name in RELAYED_RESPONSE_HEADERS:
        if name in upstream.headers:
            response.headers[name] = upstream.headers[name]
    if extra_response_headers:
        response.headers.update(extra_response_headers)
    if upstream.content_length is not None and "chunked" not in upstream.headers.get("Transfer-Encoding", ""):
        response.content_length = upstream.content_length
    result.status = upstream.status
    try:
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            if result.first_byte_at is None:
                result.first_byte_at = loop.time()
            await response.write(chunk)
            result.bytes_relayed += len(chunk)
            result.chunks += 1
        await response.write_eof()
    except CLIENT_GONE:
        result.client_disconnected = True
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientError, TimeoutError):
        result.upstream_failed = True
        log.warning("upstream failed mid-response", extra={"request_id": request.headers.get("X-Request-Id")})
    finally:
        upstream.close()
    return response, result
