"""stream_proxy's model catalogue against the simulated Ollama: facts fetched once, dropped when
the model is gone from /api/tags, None for a model Ollama does not have."""

from __future__ import annotations

import aiohttp
from aiohttp.test_utils import TestServer
from yarl import URL

import ollama_simulator as sim
from stream_proxy.models import ModelCatalog


async def test_facts_are_cached_and_dropped_with_the_model() -> None:
    """The first request for a model asks /api/show; the second is served from the cache; a poll
    after the model was removed drops it, and an unknown model has no facts."""
    app = sim.create_app(sim.SimulatorSettings())
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            catalog = ModelCatalog.single(session, URL(str(server.make_url("/"))), timeout=5)
            first = await catalog.facts("llama3.2")
            assert first is not None
            assert first.digest is not None
            again = await catalog.facts("LLAMA3.2:latest")
            assert again is first
            assert await catalog.facts("no-such-model") is None
            assert await catalog.facts("no-such-model") is None  # remembered: no second /api/show
            async with session.post(server.make_url("/_sim/settings"), json={"models": ["qwen3:8b"]}) as resp:
                assert resp.status == 200, await resp.text()
            await catalog.poll()
            replaced = await catalog.facts("llama3.2")
            assert replaced is None
            shows = [r for r in await _requests(session, server) if r["path"] == "/api/show"]
            assert len(shows) == 3  # llama3.2, no-such-model, llama3.2 again after the poll
    finally:
        await server.close()


async def _requests(session: aiohttp.ClientSession, server: TestServer) -> list[dict[str, object]]:
    async with session.get(server.make_url("/_sim/requests")) as resp:
        records: list[dict[str, object]] = await resp.json()
        return records
