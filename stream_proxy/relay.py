"""Relaying one allowed request to Ollama and its answer back, chunk by chunk, metering as it goes.

Only an allowlist of request headers is forwarded (never Authorization, X-Gw-*, Origin or
cookies); Host is set for Ollama; redirects are never followed. The answer is framed by its
Content-Type, never by what the request asked for: NDJSON is written byte for byte as each upstream
chunk arrives, SSE event by event (so the adapter's reader can drop the usage event the gateway
asked for), anything else as one body. Every piece goes to the API family's reader, which counts.
A client that goes away cancels the upstream request at once, which makes Ollama stop generating.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
import attrs
from aiohttp import web
from yarl import URL

from shared.untrusted import printable
from stream_proxy import meter
from stream_proxy.apis import Reader
from stream_proxy.capped import read_capped
from stream_proxy.exceptions import Refused

log = logging.getLogger("stream_proxy.relay")

FORWARDED_REQUEST_HEADERS = ("Content-Type", "Accept", "User-Agent")
RELAYED_RESPONSE_HEADERS = ("Content-Type",)
CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError, ConnectionError)
UPSTREAM_BROKEN = (
    aiohttp.ClientPayloadError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientError,
    TimeoutError,
)


@attrs.define
class RelayResult:
    """What happened, for metering and the usage event."""

    upstream_status: int | None = None
    status: int = 0
    bytes_relayed: int = 0
    client_disconnected: bool = False
    upstream_failed: bool = False
    upstream_unreached: bool = False  # no connection to Ollama at all: it never saw the request
    dropped_before_head: bool = False  # connected, but the connection broke before the answer's head
    cut_at_limit: bool = False
    first_byte_at: float | None = None
    count: meter.Count = attrs.Factory(meter.Count)
    response_text: list[str] = attrs.Factory(list)


class Coalesced(web.StreamResponse):
    """A response whose status line and headers leave with its first body bytes (one send for a
    whole answer, headers and the first chunk together for a stream) instead of a send of their own
    at `prepare` (aiohttp 3.14, pinned: the class attribute `web.Response` itself sets)."""

    _send_headers_immediately = False


def framing_of(content_type: str | None) -> str:
    """`ndjson`, `sse` or `whole`, from the answer's Content-Type."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/x-ndjson":
        return "ndjson"
    if media == "text/event-stream":
        return "sse"
    return "whole"


def split_event(event: bytes) -> tuple[str | None, bytes]:
    """The `event:` name and the `data:` payload of one SSE event."""
    name: str | None = None
    data: list[bytes] = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
    return name, b"\n".join(data)


def upstream_headers(request: web.Request, ollama: URL) -> dict[str, str]:
    """The allowlisted request headers plus Host for Ollama and an identity encoding."""
    headers = {name: request.headers[name] for name in FORWARDED_REQUEST_HEADERS if name in request.headers}
    headers["Host"] = f"{ollama.host}:{ollama.port}" if ollama.port else str(ollama.host)
    headers["Accept-Encoding"] = "identity"
    return headers


@attrs.define
class Relay:
    """One request's trip to Ollama and back."""

    request: web.Request
    session: aiohttp.ClientSession
    ollama: URL
    reader: Reader
    first_byte_timeout: float
    max_buffered: int = 128 * 1024 * 1024  # bytes of a non-streamed answer held at once
    completion_limit: int | None = None
    transform: Callable[[bytes], bytes] | None = None  # non-streamed bodies (listing filters)
    headers: dict[str, str] = attrs.Factory(dict)
    # Another backend to try when this one refused the connection, dropped it before its answer's
    # head, or answered 5xx ("refused", "dropped", "status"): nothing had reached the client yet.
    # None: no other (stream_proxy/backends.py).
    retry: Callable[[str], Awaitable[URL | None]] | None = None
    result: RelayResult = attrs.Factory(RelayResult)

    def __attrs_post_init__(self) -> None:
        self.result.count = self.reader.count
        self.result.response_text = self.reader.text

    async def _open(self, payload: bytes | None) -> aiohttp.ClientResponse:
        """The upstream answer's head; once on another backend if this one refused the connection
        or failed with a 5xx, which is before anything reached the client."""
        while True:
            try:
                upstream = await self._attempt(payload)
            except Refused:
                result = self.result
                kind = "refused" if result.upstream_unreached else "dropped"
                if not (result.upstream_unreached or result.dropped_before_head):
                    raise
                if (other := await self._another(kind)) is None:
                    raise
                result.upstream_failed = result.upstream_unreached = result.dropped_before_head = False
                self.ollama = other
                continue
            if upstream.status >= 500 and (other := await self._another("status")) is not None:
                upstream.close()
                self.ollama = other
                continue
            return upstream

    async def _another(self, kind: str) -> URL | None:
        return None if self.retry is None else await self.retry(kind)

    async def _attempt(self, payload: bytes | None) -> aiohttp.ClientResponse:
        target = self.ollama.with_path(self.request.path)  # no client query string: Ollama takes none
        try:
            async with asyncio.timeout(self.first_byte_timeout):
                return await self.session.request(
                    self.request.method,
                    target,
                    data=payload,
                    headers=upstream_headers(self.request, self.ollama),
                    allow_redirects=False,
                )
        except TimeoutError:
            self.result.upstream_failed = True
            raise Refused(504, "upstream model server timed out", headers={"Retry-After": "5"}) from None
        except aiohttp.ClientConnectorError:
            # No connection, so Ollama never saw the request: nothing to charge.
            self.result.upstream_failed = self.result.upstream_unreached = True
            raise Refused(502, "upstream model server unreachable", headers={"Retry-After": "5"}) from None
        except (aiohttp.ClientError, OSError):
            # Connected, but the backend went away before its answer's head: nothing reached the
            # client, so another backend may still be tried.
            self.result.upstream_failed = self.result.dropped_before_head = True
            raise Refused(502, "upstream model server unreachable", headers={"Retry-After": "5"}) from None

    def _over_limit(self) -> bool:
        limit = self.completion_limit
        return limit is not None and self.result.count.content_chunks > limit

    async def run(self, payload: bytes | None) -> web.StreamResponse:
        """Relay; raises Refused (502/504) before any byte reached the client."""
        upstream = await self._open(payload)
        result = self.result
        result.upstream_status = result.status = upstream.status
        response = Coalesced(status=upstream.status)
        for name in RELAYED_RESPONSE_HEADERS:
            if name in upstream.headers:
                response.headers[name] = upstream.headers[name]
        response.headers.update(self.headers)
        try:
            framing = framing_of(upstream.headers.get("Content-Type"))
            if framing != "whole" and self.request.method != "HEAD":
                await self._stream(upstream, response, sse=framing == "sse")
            else:
                await self._whole(upstream, response)
        except CLIENT_GONE:
            result.client_disconnected = True
        except UPSTREAM_BROKEN:
            result.upstream_failed = True
            log.warning(
                "upstream failed mid-response",
                extra={"request_id": printable(self.request.headers.get("X-Request-Id"), 100)},
            )
        finally:
            upstream.close()  # at once: a disconnected client cancels the generation upstream
        return response

    async def _whole(self, upstream: aiohttp.ClientResponse, response: web.StreamResponse) -> None:
        data = await read_capped(upstream, self.max_buffered)
        if data is None:
            self.result.upstream_failed = True
            raise Refused(502, f"upstream answer larger than {self.max_buffered} bytes")
        self.result.first_byte_at = time.time()
        if upstream.status == 200:
            self.reader.whole(meter.loads(data.rstrip(b"\n")))
            if self.transform is not None:
                data = self.transform(data)
        if self.request.method == "HEAD":
            # No body, but the length of the GET answer, as Ollama sends it.
            response.content_length = upstream.content_length or 0
        else:
            response.content_length = len(data)
        await response.prepare(self.request)
        await response.write(data)
        await response.write_eof()
        self.result.bytes_relayed = len(data)

    async def _stream(
        self, upstream: aiohttp.ClientResponse, response: web.StreamResponse, *, sse: bool
    ) -> None:
        separator = b"\n\n" if sse else b"\n"
        pending = b""
        prepared = False
        async for chunk in upstream.content.iter_any():
            if self.result.first_byte_at is None:
                self.result.first_byte_at = time.time()
            pending += chunk
            *complete, pending = pending.split(separator)
            # Counted as read from Ollama, relayed or not: Ollama generated them either way.
            out = self._events(complete, separator) if sse else self._lines(complete, chunk, pending)
            if not prepared:
                await response.prepare(self.request)
                prepared = True
            if out:
                await response.write(out)
            self.result.bytes_relayed += len(out)
            if self._over_limit():
                await self._cut(response)
                return
        if pending:  # a stream cut without its final separator
            if not sse:
                self.reader.line(meter.loads(pending))
            await response.write(pending)
            self.result.bytes_relayed += len(pending)
        if not prepared:
            await response.prepare(self.request)
        await response.write_eof()
        if not self.result.count.finished:
            self.result.upstream_failed = True

    def _lines(self, lines: list[bytes], chunk: bytes, pending: bytes) -> bytes:
        for line in lines:
            if line:
                self.reader.line(meter.loads(line))
        return chunk  # NDJSON is relayed byte for byte, as it arrived

    def _events(self, events: list[bytes], separator: bytes) -> bytes:
        kept: list[bytes] = []
        for event in events:
            name, data = split_event(event)
            kept.append(self.reader.event(name, data, event + separator))
        return b"".join(kept)

    async def _cut(self, response: web.StreamResponse) -> None:
        """Ollama ran past the clamped limit: end the stream with the family's final piece."""
        self.result.cut_at_limit = True
        tail = self.reader.tail()
        await response.write(tail)
        await response.write_eof()
        self.result.bytes_relayed += len(tail)
