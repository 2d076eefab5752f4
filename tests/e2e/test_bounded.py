"""Bounded everything (docs/RELIABILITY.md#hostile-input): a buffered upstream answer larger than
GATEWAY_MAX_UPSTREAM_BODY_BYTES (1 MiB in the e2e stack) is 502 in the caller's dialect, never held
whole; the same listing below the cap is served."""

from __future__ import annotations

import aiohttp
import pytest

from tests.e2e.conftest import KeyFactory, SimulatorControl, Stack

pytestmark = pytest.mark.e2e


async def test_a_listing_larger_than_the_cap_is_502_in_the_callers_dialect(
    stack: Stack, http: aiohttp.ClientSession, make_key: KeyFactory, simulator: SimulatorControl
) -> None:
    """/api/tags and /v1/models of 20,000 models (over 1 MiB from the simulator): 502 in Ollama's and
    OpenAI's shape; with 100 models both are served."""
    key = await make_key()
    headers = {"Authorization": f"Bearer {key}"}
    await simulator.settings(models=[f"model-{i:05d}:latest" for i in range(20_000)])
    async with http.get(f"{stack.gateway_url}/api/tags", headers=headers) as resp:
        assert resp.status == 502
        assert await resp.json() == {"error": f"upstream answer larger than {1024 * 1024} bytes"}
    async with http.get(f"{stack.gateway_url}/v1/models", headers=headers) as resp:
        assert resp.status == 502
        answer = await resp.json()
        assert answer["error"]["message"] == f"upstream answer larger than {1024 * 1024} bytes"
    await simulator.settings(models=[f"model-{i:05d}:latest" for i in range(100)])
    async with http.get(f"{stack.gateway_url}/api/tags", headers=headers) as resp:
        assert resp.status == 200
        assert len((await resp.json())["models"]) == 100
