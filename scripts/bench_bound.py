"""`scripts/bench bound`: how far the prompt bound over-reserves, per model, for ordinary prompts.

Each ordinary prompt goes straight to the simulator (the truth: its prompt_eval_count from the
model's rendered template) and through stream_proxy's own bound (its catalogue asking the same
simulator's /api/show). The factor is bound / prompt tokens; with the simulator's worst-case
tokenizer (one token per byte) it shows how much room is left above the worst a tokenizer can do.
"""

from __future__ import annotations

import statistics
from typing import Any, Final

import aiohttp
from aiohttp.test_utils import TestServer
from yarl import URL

import ollama_simulator as sim
from bench_http import Row
from shared import policy
from shared.config import ProxyOptions
from stream_proxy.models import ModelCatalog
from stream_proxy.prompt_bound import request_bound

# Ordinary requests: what a chat client, an agent without tools and a completion script send.
QUESTION = "Why is the sky blue? Answer in two sentences."
PROMPTS: Final[list[tuple[policy.Route, str, dict[str, Any]]]] = [
    ("chat", "/api/chat", {"messages": [{"role": "user", "content": "hi"}]}),
    ("chat", "/api/chat", {"messages": [{"role": "user", "content": QUESTION}]}),
    (
        "chat",
        "/api/chat",
        {
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": "Rayleigh scattering: short wavelengths scatter more."},
                {"role": "user", "content": "And why are sunsets red?"},
            ]
        },
    ),
    ("generate", "/api/generate", {"prompt": QUESTION}),
    ("openai_chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}]}),
]
# The three model profiles: a dated system preamble, thinking, a long Modelfile SYSTEM.
MODELS: Final = ["llama3.2:latest", "qwen3:8b", "assistant:latest"]
# The largest factor we state per model (README "The guarantee", docs/ARCHITECTURE.md#prompt-bound),
# against the worst-case tokenizer: qwen3's template carries ~134 bytes of markup per message.
TARGETS: Final = {"llama3.2:latest": 3.0, "assistant:latest": 3.0, "qwen3:8b": 8.0}


async def _prompt_tokens(session: aiohttp.ClientSession, base: URL, path: str, body: dict[str, Any]) -> int:
    async with session.post(base.with_path(path), json={**body, "stream": False}) as resp:
        answer = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"{path}: {resp.status} {answer}")
        counted = answer["usage"]["prompt_tokens"] if "usage" in answer else answer["prompt_eval_count"]
        return int(counted)


async def _factors(settings: sim.SimulatorSettings) -> dict[str, list[float]]:
    server = TestServer(sim.create_app(settings))
    await server.start_server()
    base = URL(str(server.make_url("/")))
    factors: dict[str, list[float]] = {}
    try:
        async with aiohttp.ClientSession() as session:
            catalog = ModelCatalog.single(session, base, timeout=5)
            for model in settings.models:
                if "minilm" in model:
                    continue
                for route, path, shape in PROMPTS:
                    body = {"model": model, **shape}
                    truth = await _prompt_tokens(session, base, path, body)
                    bound = await request_bound(route, body, catalog, ProxyOptions())
                    factors.setdefault(model, []).append(bound / max(truth, 1))
    finally:
        await server.close()
    return factors


async def scenario_bound(_services: object, *, decisions: int) -> list[Row]:
    """Over-reservation per model: the median and the largest factor over the ordinary prompts,
    with the simulator's normal tokenizer and (where it has one) its worst case."""
    rows: list[Row] = []
    modes: list[tuple[str, dict[str, Any]]] = [
        ("normal tokenizer", {}),
        ("one token per byte", {"tokenizer": "bytes"}),
    ]
    for label, patch in modes:
        settings = sim.settings_with(sim.SimulatorSettings(), {"models": MODELS, **patch})
        for model, values in (await _factors(settings)).items():
            worst = max(values)
            rows.append(
                Row(
                    f"{model}, {label}: bound / prompt tokens (median · max of {len(values)})",
                    f"{statistics.median(values):.2f} · {worst:.2f}",
                    f"max ≤ {TARGETS[model]:g}" if patch else "(informative)",
                    worst <= TARGETS[model] if patch else None,
                )
            )
    return rows
