"""Reading a buffered upstream answer without holding more than a cap of it."""

from __future__ import annotations

import aiohttp


async def read_capped(upstream: aiohttp.ClientResponse, cap: int) -> bytes | None:
    """The whole body of a non-streamed answer, or None once it grows past `cap` bytes (declared
    or received): a buffered answer never holds more memory than that."""
    if upstream.content_length is not None and upstream.content_length > cap:
        return None
    data = bytearray()
    async for chunk in upstream.content.iter_any():
        data += chunk
        if len(data) > cap:
            return None
    return bytes(data)
