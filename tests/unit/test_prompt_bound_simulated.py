"""The reservation's prompt bound against the simulated Ollama's own count, for any body.

stream_proxy computes the bound the way it does in production (`prompt_bound.request_bound`
with a real `ModelCatalog` reading the simulator's /api/show); the simulator renders the
model's real Go template and counts one token per UTF-8 byte (its worst-case tokenizer), over
every pass the runner makes. Neither side reads the other: the truth is the simulator's
record of what its runner evaluated (docs/ARCHITECTURE.md#prompt-bound).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Iterator
from typing import Any, Final

import aiohttp
import attrs
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from yarl import URL

import ollama_simulator as sim
from shared.config import ProxyOptions
from shared.policy import Route
from stream_proxy.exceptions import Refused
from stream_proxy.models import ModelCatalog
from stream_proxy.prompt_bound import request_bound

PATHS: Final[dict[Route, str]] = {
    "chat": "/api/chat",
    "generate": "/api/generate",
    "embed": "/api/embed",
    "embeddings": "/api/embeddings",
    "openai_chat": "/v1/chat/completions",
    "openai_completions": "/v1/completions",
    "openai_embeddings": "/v1/embeddings",
    "anthropic_messages": "/v1/messages",
    "openai_responses": "/v1/responses",
}
MODELS: Final = ("llama3.2:latest", "qwen3:8b", "assistant:latest", "all-minilm:latest")
# Models whose template renders tools (the assistant profile's does not: Ollama refuses tools).
TOOL_MODELS: Final = ("llama3.2", "qwen3:8b")
CHAT_MODELS: Final = (*TOOL_MODELS, "assistant")
SETTINGS: Final = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@attrs.define
class Pair:
    """The simulator and the gateway's bound side by side, driven from a synchronous test."""

    loop: asyncio.AbstractEventLoop
    session: aiohttp.ClientSession
    root: URL
    recorder: sim.Recorder
    catalog: ModelCatalog
    options: ProxyOptions

    def run(self, route: Route, document: dict[str, Any]) -> tuple[int | None, int]:
        """(the gateway's bound or None when it refuses, the tokens the simulator evaluated)."""
        bound, status, counted = self.loop.run_until_complete(self._run(route, document))
        assert status == 200, status
        return bound, counted

    def case(self, route: Route, document: dict[str, Any]) -> tuple[int | None, int]:
        """As `run`, for a generated body: one the simulator refuses is not a case (`assume`)."""
        bound, status, counted = self.loop.run_until_complete(self._run(route, document))
        assume(status == 200)
        return bound, counted

    async def _run(self, route: Route, document: dict[str, Any]) -> tuple[int | None, int, int]:
        bound: int | None = None
        try:
            bound = await request_bound(route, document, self.catalog, self.options)
        except Refused as refused:
            if refused.status != 400:
                raise
        before = len(self.recorder.records)
        url = self.root.with_path(PATHS[route])
        async with self.session.post(url, data=json.dumps(document).encode()) as response:
            await response.read()
        if response.status != 200:
            return bound, response.status, 0
        record = next(r for r in self.recorder.records[before:] if r.path == PATHS[route])
        # An embed of no inputs runs nothing: no generation, nothing counted.
        return bound, 200, record.generation.prompt_tokens if record.generation is not None else 0


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    loop = asyncio.new_event_loop()
    recorder = sim.Recorder()
    changes: dict[str, Any] = {"models": MODELS}  # attrs' tuple converter defeats mypy here
    simulated = sim.SimulatorSettings(
        **changes, tokenizer="bytes", completion_tokens=1, thinking_tokens=1, tokens_per_image=64
    )
    app = sim.create_app(simulated, recorder, rng=random.Random(3))  # noqa: S311 - ids only
    server = TestServer(app)
    loop.run_until_complete(server.start_server())

    async def open_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    session = loop.run_until_complete(open_session())
    catalog = ModelCatalog.single(session, server.make_url("/"), timeout=5.0)
    try:
        yield Pair(loop, session, server.make_url("/"), recorder, catalog, ProxyOptions())
    finally:
        loop.run_until_complete(session.close())
        loop.run_until_complete(server.close())
        loop.close()


def check(pair: Pair, route: Route, document: dict[str, Any]) -> None:
    bound, counted = pair.case(route, document)
    if bound is None:
        # Refused only where Ollama would run two passes and report one.
        assert "format" in json.dumps(document) or "response_format" in document
        return
    assert bound >= counted, (bound, counted)


# --- what a client controls ------------------------------------------------------------------

# Every code point a JSON body can carry (no lone surrogates), weighted to what templates and
# Go's `json` escape: markup, quotes, controls, U+2028/9, and bytes above 0x7F.
_char = st.one_of(
    st.sampled_from(list('<>&"\\\n\t\x00\x1f\u2028\u2029é€😀ſK')),
    st.characters(codec="utf-8"),
)
text = st.text(_char, max_size=40)
name = st.text(_char, min_size=1, max_size=12)
scalar = st.one_of(st.integers(-(2**40), 2**40), st.booleans(), st.none(), text)
arguments = st.dictionaries(name, st.one_of(scalar, st.lists(scalar, max_size=3)), max_size=4)


@st.composite
def tool(draw: st.DrawFn, flat: bool = False) -> dict[str, Any]:
    """A function tool; `flat` is the Responses API's shape (no `function` wrapper)."""
    properties = draw(
        st.dictionaries(
            name,
            st.fixed_dictionaries(
                {"type": st.sampled_from(["string", "number", "integer", "boolean"])},
                optional={"description": text, "enum": st.lists(text, max_size=3)},
            ),
            max_size=4,
        )
    )
    function = {
        "name": draw(name),
        "description": draw(text),
        "parameters": {"type": "object", "properties": properties, "required": sorted(properties)[:2]},
    }
    return {"type": "function", **function} if flat else {"type": "function", "function": function}


@st.composite
def native_message(draw: st.DrawFn) -> dict[str, Any]:
    role = draw(st.sampled_from(["system", "user", "assistant", "tool"]))
    message: dict[str, Any] = {"role": role, "content": draw(text)}
    if role == "assistant" and draw(st.booleans()):
        message["thinking"] = draw(text)
    if role == "assistant" and draw(st.booleans()):
        calls = st.fixed_dictionaries(
            {"function": st.fixed_dictionaries({"name": name, "arguments": arguments})}
        )
        message["tool_calls"] = draw(st.lists(calls, min_size=1, max_size=2))
    if role == "tool" and draw(st.booleans()):
        message["tool_name"] = draw(name)
    return message


def think_for(draw: Callable[[st.SearchStrategy[Any]], Any], model: str) -> dict[str, Any]:
    if not model.startswith("qwen3"):
        return {}
    think: dict[str, Any] = draw(st.sampled_from([{}, {"think": True}, {"think": False}]))
    return think


@SETTINGS
@given(data=st.data())
def test_native_chat(pair: Pair, data: st.DataObject) -> None:
    """/api/chat: any messages, thinking, tool calls, tools, num_ctx and format."""
    draw = data.draw
    model = draw(st.sampled_from(CHAT_MODELS))
    document: dict[str, Any] = {
        "model": model,
        "messages": draw(st.lists(native_message(), min_size=1, max_size=5)),
        "stream": draw(st.booleans()),
        **think_for(draw, model),
    }
    if model in TOOL_MODELS and draw(st.booleans()):
        document["tools"] = draw(st.lists(tool(), min_size=1, max_size=2))
    if draw(st.booleans()):
        document["options"] = {"num_ctx": draw(st.integers(4, 300))}
    if draw(st.booleans()):
        document["format"] = "json"
    check(pair, "chat", document)


@SETTINGS
@given(data=st.data())
def test_generate(pair: Pair, data: st.DataObject) -> None:
    """/api/generate: prompt, system, suffix, raw, think and num_ctx."""
    draw = data.draw
    model = draw(st.sampled_from(CHAT_MODELS))
    document: dict[str, Any] = {
        "model": model,
        "prompt": draw(st.text(_char, min_size=1, max_size=60)),
        "stream": draw(st.booleans()),
        **think_for(draw, model),
    }
    for field in ("system", "suffix"):
        if draw(st.booleans()):
            document[field] = draw(text)
    if draw(st.booleans()):
        document["raw"] = draw(st.booleans())
    if draw(st.booleans()):
        document["options"] = {"num_ctx": draw(st.integers(4, 300))}
    check(pair, "generate", document)


@st.composite
def openai_message(draw: st.DrawFn) -> dict[str, Any]:
    role = draw(st.sampled_from(["system", "developer", "user", "assistant", "tool"]))
    part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
    content: Any = draw(st.one_of(text, st.lists(part, min_size=1, max_size=3)))
    message: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant" and draw(st.booleans()):
        message["reasoning"] = draw(text)
    if role == "assistant" and draw(st.booleans()):
        calls = st.fixed_dictionaries(
            {
                "id": name,
                "type": st.just("function"),
                "function": st.fixed_dictionaries({"name": name, "arguments": arguments.map(json.dumps)}),
            }
        )
        message["tool_calls"] = draw(st.lists(calls, min_size=1, max_size=2))
    if role == "tool":
        message["tool_call_id"] = draw(name)
    return message


@SETTINGS
@given(data=st.data())
def test_openai_chat(pair: Pair, data: st.DataObject) -> None:
    """/v1/chat/completions: string or part contents, reasoning, tool calls, tools, formats."""
    draw = data.draw
    model = draw(st.sampled_from(CHAT_MODELS))
    document: dict[str, Any] = {
        "model": model,
        "messages": draw(st.lists(openai_message(), min_size=1, max_size=5)),
        "stream": draw(st.booleans()),
    }
    if model.startswith("qwen3"):
        document.update(
            draw(st.sampled_from([{}, {"reasoning_effort": "none"}, {"reasoning_effort": "high"}]))
        )
    if model in TOOL_MODELS and draw(st.booleans()):
        document["tools"] = draw(st.lists(tool(), min_size=1, max_size=2))
    if draw(st.booleans()):
        document["response_format"] = {"type": "json_object"}
    check(pair, "openai_chat", document)


@SETTINGS
@given(data=st.data())
def test_openai_completions(pair: Pair, data: st.DataObject) -> None:
    """/v1/completions: prompt and suffix."""
    draw = data.draw
    document: dict[str, Any] = {
        "model": draw(st.sampled_from(CHAT_MODELS)),
        "prompt": draw(st.text(_char, min_size=1, max_size=60)),
    }
    if draw(st.booleans()):
        document["suffix"] = draw(text)
    check(pair, "openai_completions", document)


@st.composite
def anthropic_turns(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Alternating user/assistant turns; an assistant's tool_use answered by the user's tool_result."""
    turns: list[dict[str, Any]] = []
    for index in range(draw(st.integers(1, 4))):
        role = "user" if index % 2 == 0 else "assistant"
        blocks: list[dict[str, Any]] = [{"type": "text", "text": draw(text)}]
        if role == "assistant" and draw(st.booleans()):
            blocks.append({"type": "thinking", "thinking": draw(text), "signature": "s"})
        if role == "assistant" and draw(st.booleans()):
            ident = draw(name)
            blocks.append({"type": "tool_use", "id": ident, "name": draw(name), "input": draw(arguments)})
            turns.append({"role": role, "content": blocks})
            result = {"type": "tool_result", "tool_use_id": ident, "content": draw(text)}
            turns.append({"role": "user", "content": [result]})
            break
        content: Any = blocks[0]["text"] if len(blocks) == 1 and draw(st.booleans()) else blocks
        turns.append({"role": role, "content": content})
    return turns


@SETTINGS
@given(data=st.data())
def test_anthropic_messages(pair: Pair, data: st.DataObject) -> None:
    """/v1/messages: system as a string or blocks, text/thinking/tool_use/tool_result blocks, tools."""
    draw = data.draw
    model = draw(st.sampled_from(CHAT_MODELS))
    document: dict[str, Any] = {
        "model": model,
        "max_tokens": draw(st.integers(1, 64)),
        "messages": draw(anthropic_turns()),
        "stream": draw(st.booleans()),
    }
    if draw(st.booleans()):
        system = draw(text)
        document["system"] = draw(st.sampled_from([system, [{"type": "text", "text": system}]]))
    if model in TOOL_MODELS and draw(st.booleans()):
        document["tools"] = [
            {
                "name": t["function"]["name"],
                "description": t["function"]["description"],
                "input_schema": t["function"]["parameters"],
            }
            for t in draw(st.lists(tool(), min_size=1, max_size=2))
        ]
    if model.startswith("qwen3"):
        document.update(draw(st.sampled_from([{}, {"thinking": {"type": "enabled", "budget_tokens": 1024}}])))
    check(pair, "anthropic_messages", document)


@st.composite
def responses_input(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(st.text(_char, min_size=1, max_size=60))
    items: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["message", "message", "call"]))
        if kind == "message":
            role = draw(st.sampled_from(["user", "assistant", "system", "developer"]))
            part_type = "output_text" if role == "assistant" else "input_text"
            content: Any = draw(st.one_of(text, st.just([{"type": part_type, "text": draw(text)}])))
            items.append({"type": "message", "role": role, "content": content})
        else:
            ident = draw(name)
            items.append(
                {
                    "type": "function_call",
                    "call_id": ident,
                    "name": draw(name),
                    "arguments": json.dumps(draw(arguments)),
                }
            )
            items.append({"type": "function_call_output", "call_id": ident, "output": draw(text)})
    return items


@SETTINGS
@given(data=st.data())
def test_openai_responses(pair: Pair, data: st.DataObject) -> None:
    """/v1/responses: a string or items (messages, function calls and outputs), instructions, tools."""
    draw = data.draw
    model = draw(st.sampled_from(CHAT_MODELS))
    document: dict[str, Any] = {
        "model": model,
        "input": draw(responses_input()),
        "stream": draw(st.booleans()),
    }
    if draw(st.booleans()):
        document["instructions"] = draw(text)
    if model in TOOL_MODELS and draw(st.booleans()):
        document["tools"] = draw(st.lists(tool(flat=True), min_size=1, max_size=2))
    if model.startswith("qwen3"):
        document.update(
            draw(st.sampled_from([{}, {"reasoning": {"effort": "none"}}, {"reasoning": {"effort": "low"}}]))
        )
    check(pair, "openai_responses", document)


@SETTINGS
@given(inputs=st.one_of(text, st.lists(text, min_size=1, max_size=5)))
def test_embeddings(pair: Pair, inputs: str | list[str]) -> None:
    """/api/embed and /v1/embeddings: any input strings; /api/embeddings: one prompt."""
    check(pair, "embed", {"model": "all-minilm", "input": inputs})
    check(pair, "openai_embeddings", {"model": "all-minilm", "input": inputs})
    prompt = inputs if isinstance(inputs, str) else "".join(inputs)
    check(pair, "embeddings", {"model": "all-minilm", "prompt": prompt})


@pytest.mark.parametrize("route", ["chat", "openai_chat"])
def test_long_system_and_modelfile_messages_are_in_the_bound(pair: Pair, route: Route) -> None:
    """The assistant model's 1.3 KB SYSTEM and its two MESSAGEs render with every chat: the
    simulator counts them, so a short 'hi' must be bounded above them."""
    bound, counted = pair.run(route, {"model": "assistant", "messages": [{"role": "user", "content": "hi"}]})
    assert counted > 1300
    assert bound is not None
    assert bound >= counted


def test_two_passes_are_refused_or_bounded(pair: Pair) -> None:
    """qwen3 with format and thinking on runs two passes: the gateway refuses it; with thinking
    off it is one pass, and bounded."""
    messages = [{"role": "user", "content": "list three colours"}]
    refused, counted = pair.run("chat", {"model": "qwen3:8b", "messages": messages, "format": "json"})
    assert refused is None
    assert len(pair.recorder.generations()[-1].passes) == 2
    bound, counted = pair.run(
        "chat", {"model": "qwen3:8b", "messages": messages, "format": "json", "think": False, "stream": False}
    )
    assert bound is not None
    assert bound >= counted > 0
