"""The simulated Ollama renders each model's real template and counts what its runner evaluates.

Expected prompts and counts are worked out by hand from Ollama's source (server/prompt.go,
server/routes.go, llm/llama_server.go) and the templates in scripts/ollama_simulator/
templates; the comments show the sums. Words-mode tokens: a <|special|> marker, a word run or
a punctuation mark each count one, plus one BOS per evaluated prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

import ollama_simulator as sim

START_NS = 1_787_331_600_101_234_000
STAMP = "2026-08-21T17:00:00.101234Z"
SAY_HI = [{"role": "user", "content": "Say hi"}]
HI = {"reply": ("Hi", "!"), "completion_tokens": 2}
MODELS = ("llama3.2:latest", "qwen3:8b", "all-minilm:latest", "assistant:latest")

# llama3.2's rendering of one user turn and its tokens (BOS included): the system block (10),
# the user turn (3 + the content + 1), the assistant header (3), the BOS.
LLAMA_HEAD = "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\n"
SAY_HI_PROMPT = (
    LLAMA_HEAD + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nSay hi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
SAY_HI_TOKENS = 10 + 3 + 2 + 1 + 3 + 1
# qwen3 with think on (its default): <|im_start|> user Say hi / think <|im_end|> <|im_start|>
# assistant, and the BOS.
QWEN_SAY_HI_PROMPT = "<|im_start|>user\nSay hi /think<|im_end|>\n<|im_start|>assistant\n"
QWEN_SAY_HI_TOKENS = 9 + 1


@attrs.define
class Sim:
    session: aiohttp.ClientSession
    root: URL
    recorder: sim.Recorder

    def post(self, path: str, body: Any) -> aiohttp.client._RequestContextManager:
        return self.session.post(self.root.with_path(path), data=json.dumps(body).encode())

    def get(self, path: str) -> aiohttp.client._RequestContextManager:
        return self.session.get(self.root.with_path(path))


@contextlib.asynccontextmanager
async def running(**changes: Any) -> AsyncIterator[Sim]:
    """A simulator with the four profiles installed, a pinned clock and seeded ids."""
    recorder = sim.Recorder()
    settings = sim.SimulatorSettings(**{"models": MODELS, **changes})
    clock = sim.FakeClock(start_ns=START_NS)
    rng = random.Random(7)  # noqa: S311 - deterministic ids
    server = TestServer(sim.create_app(settings, recorder, clock=clock, rng=rng))
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Sim(session, server.make_url("/"), recorder)
    finally:
        await server.close()


async def rendered(s: Sim, body: dict[str, Any], path: str = "/api/chat") -> dict[str, Any]:
    async with s.post(path, {**body, "_debug_render_only": True}) as r:
        assert r.status == 200
        info: dict[str, Any] = json.loads(await r.read())["_debug_info"]
        return info


async def final(s: Sim, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with s.post(path, {**body, "stream": False}) as r:
        assert r.status == 200, await r.text()
        answer: dict[str, Any] = json.loads(await r.read())
        return answer


# --------------------------------------------------------------------------- what the models are


async def test_show_reports_each_profile() -> None:
    """/api/show: the real template text, SYSTEM and MESSAGEs, PARAMETERs as fmt's "%-30s %#v",
    model_info with <arch>.context_length (keys sorted), capabilities from the template."""
    async with running() as s:
        shown = {}
        for model in ("llama3.2", "assistant", "qwen3:8b", "all-minilm"):
            async with s.post("/api/show", {"model": model}) as r:
                shown[model] = json.loads(await r.read())
    llama, assistant, qwen, minilm = shown.values()
    assert llama["template"].startswith(LLAMA_HEAD + "{{ if .System }}{{ .System }}")
    assert llama["parameters"] == (
        'stop                           "<|start_header_id|>"\n'
        'stop                           "<|end_header_id|>"\n'
        'stop                           "<|eot_id|>"'
    )
    assert llama["model_info"]["llama.context_length"] == 131_072
    assert list(llama["model_info"]) == sorted(llama["model_info"])
    assert llama["capabilities"] == ["completion", "tools"]
    assert "system" not in llama
    assert "messages" not in llama
    assert assistant["template"].startswith("{{- range .Messages }}<|im_start|>{{ .Role }}")
    assert len(assistant["system"].encode()) >= 1000
    assert assistant["messages"][0] == {"role": "user", "content": "Who are you?"}
    assert assistant["parameters"].splitlines()[0] == "num_ctx                        8192"
    assert assistant["capabilities"] == ["completion"]
    assert "\nSYSTEM " in assistant["modelfile"]
    assert "\nMESSAGE user Who are you?\n" in assistant["modelfile"]
    assert "<tools></tools>" in qwen["template"]
    assert qwen["model_info"]["qwen3.context_length"] == 40_960
    assert qwen["capabilities"] == ["completion", "tools", "thinking"]
    assert minilm["model_info"]["bert.context_length"] == 512
    assert minilm["capabilities"] == ["embedding"]


async def test_model_profiles_setting_chooses_a_profile() -> None:
    """settings.model_profiles gives a named model a profile; unknown profiles are refused."""
    async with running(models=("mybot:v1",), model_profiles={"mybot:v1": "assistant"}) as s:
        async with s.post("/api/show", {"model": "mybot:v1"}) as r:
            assert (await r.json())["system"].startswith("You are Atlas")
        async with s.post("/_sim/settings", {"model_profiles": {"mybot:v1": "nope"}}) as r:
            assert r.status == 400


async def test_ps_reports_the_num_ctx_in_effect() -> None:
    """num_ctx: the request's option, else the Modelfile's (assistant: 8192), else the default
    setting; at least 4 and capped at the trained context length (llama3.2 131072, bert 512)."""
    cases = [
        ("llama3.2", {"num_ctx": 2048}, 2048),
        ("llama3.2", {"num_ctx": 10**7}, 131_072),
        ("llama3.2", {"num_ctx": 1}, 4),
        ("assistant", None, 8192),
        ("qwen3:8b", None, 6000),
    ]
    async with running(default_num_ctx=6000) as s:
        for model, options, expected in cases:
            async with s.post("/api/generate", {"model": model, "options": options}) as r:
                assert r.status == 200
            async with s.get("/api/ps") as r:
                loaded = {m["name"]: m["context_length"] for m in (await r.json())["models"]}
            assert loaded[sim.parse_model_name(model).display()] == expected  # type: ignore[union-attr]
        async with s.post("/api/embed", {"model": "all-minilm", "input": "hi"}) as r:
            assert r.status == 200
        async with s.get("/api/ps") as r:
            assert {m["name"]: m["context_length"] for m in (await r.json())["models"]}[
                "all-minilm:latest"
            ] == 512


# --------------------------------------------------------------------------- rendered prompts


async def test_debug_render_only_answers_the_rendered_prompt() -> None:
    """_debug_render_only (routes.go): the prompt in _debug_info.rendered_template, image_count
    when images were tagged, no generation; the generate form has "response":"" instead."""
    image = {"role": "user", "content": "What is this?", "images": ["aGVsbG8="]}
    async with running() as s:
        async with s.post(
            "/api/chat", {"model": "llama3.2", "messages": SAY_HI, "_debug_render_only": True}
        ) as r:
            chat = (await r.read()).decode()
        async with s.post(
            "/api/generate", {"model": "llama3.2", "prompt": "Say hi", "_debug_render_only": True}
        ) as r:
            generate = (await r.read()).decode()
        info = await rendered(s, {"model": "llama3.2", "messages": [image]})
        assert s.recorder.generations() == []
    prompt = json.dumps(SAY_HI_PROMPT).replace("<", "\\u003c").replace(">", "\\u003e")
    assert chat == (
        f'{{"model":"llama3.2","created_at":"{STAMP}","message":{{"role":"","content":""}},"done":false,'
        f'"_debug_info":{{"rendered_template":{prompt}}}}}'
    )
    assert generate == (
        f'{{"model":"llama3.2","created_at":"{STAMP}","response":"","done":false,'
        f'"_debug_info":{{"rendered_template":{prompt}}}}}'
    )
    assert info["image_count"] == 1
    assert "<|end_header_id|>\n\n[img-0]What is this?<|eot_id|>" in info["rendered_template"]


async def test_modelfile_system_and_messages_join_the_conversation() -> None:
    """ChatHandler puts the Modelfile MESSAGEs first and the SYSTEM before them unless the
    request starts with its own system message; GenerateHandler does the same, and skips the
    MESSAGEs when the request carries a context."""
    system = sim.PROFILES["assistant"].system
    turns = (
        "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\nI am Atlas, the company "
        "assistant. Ask me about our tools and guidelines.<|im_end|>\n"
    )
    own = [{"role": "system", "content": "Be terse."}, *SAY_HI]
    async with running() as s:
        chat = await rendered(s, {"model": "assistant", "messages": SAY_HI})
        replaced = await rendered(s, {"model": "assistant", "messages": own})
        generate = await rendered(s, {"model": "assistant", "prompt": "Say hi"}, "/api/generate")
        with_context = await rendered(
            s, {"model": "assistant", "prompt": "Say hi", "context": []}, "/api/generate"
        )
    user = "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
    assert chat["rendered_template"] == f"<|im_start|>system\n{system}<|im_end|>\n{turns}{user}"
    # The Modelfile MESSAGEs come first, so the request's system message follows them.
    assert replaced["rendered_template"] == f"{turns}<|im_start|>system\nBe terse.<|im_end|>\n{user}"
    assert generate["rendered_template"] == chat["rendered_template"]
    assert with_context["rendered_template"] == f"<|im_start|>system\n{system}<|im_end|>\n{user}"


async def test_generate_variants() -> None:
    """raw tokenizes the prompt as sent; a `template` overrides the model's (here it doubles the
    prompt); `context` ids detokenize and are prepended; a suffix needs the insert capability."""
    async with running(**HI) as s:
        raw = await final(s, "/api/generate", {"model": "llama3.2", "prompt": "Say hi", "raw": True})
        doubled = await final(
            s,
            "/api/generate",
            {"model": "llama3.2", "prompt": "Say hi", "template": "{{ .Prompt }} {{ .Prompt }}"},
        )
        first = await final(s, "/api/generate", {"model": "llama3.2", "prompt": "Say hi"})
        second = await final(
            s, "/api/generate", {"model": "llama3.2", "prompt": "Say hi", "context": first["context"]}
        )
        async with s.post("/api/generate", {"model": "llama3.2", "prompt": "a", "suffix": "b"}) as r:
            insert = (r.status, await r.json())
        async with s.post("/api/generate", {"model": "llama3.2", "prompt": "a", "template": "{{ .Nope"}) as r:
            broken = (r.status, await r.json())
    assert raw["prompt_eval_count"] == 2 + 1
    assert doubled["prompt_eval_count"] == 4 + 1  # "Say hi Say hi"
    # The first answer's context is its prompt and "Hi!" without BOS: SAY_HI_TOKENS - 1 + 2;
    # the next prompt is that text again followed by a fresh rendering (and one BOS).
    assert len(first["context"]) == SAY_HI_TOKENS + 1
    assert second["prompt_eval_count"] == (SAY_HI_TOKENS + 1) + SAY_HI_TOKENS
    assert insert == (400, {"error": "registry.ollama.ai/library/llama3.2:latest does not support insert"})
    assert broken == (500, {"error": "template: :1: unclosed action"})


async def test_tools_need_a_template_that_uses_them() -> None:
    """CheckCapabilities: the chatml persona's template has no .Tools, so tools are a 400."""
    tools = [{"type": "function", "function": {"name": "noop"}}]
    async with (
        running() as s,
        s.post("/api/chat", {"model": "assistant", "messages": SAY_HI, "tools": tools}) as r,
    ):
        assert (r.status, await r.json()) == (
            400,
            {"error": "registry.ollama.ai/library/assistant:latest does not support tools"},
        )


async def test_bytes_tokenizer_counts_utf8_bytes_and_the_bos() -> None:
    """tokenizer "bytes": one token per UTF-8 byte of the rendered prompt plus the BOS."""
    async with running(tokenizer="bytes", **HI) as s:
        answer = await final(s, "/api/chat", {"model": "llama3.2", "messages": SAY_HI})
        context = await final(s, "/api/generate", {"model": "llama3.2", "prompt": "Say hi"})
    assert answer["prompt_eval_count"] == len(SAY_HI_PROMPT.encode()) + 1
    assert context["context"] == list((SAY_HI_PROMPT + "Hi!").encode())


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/chat", {"messages": SAY_HI}),
        ("/api/generate", {"prompt": "Say hi"}),
        ("/v1/chat/completions", {"messages": SAY_HI}),
        ("/v1/completions", {"prompt": "Say hi"}),
        ("/v1/messages", {"messages": SAY_HI, "max_tokens": 100}),
        ("/v1/responses", {"input": "Say hi"}),
        (
            "/v1/responses",
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": "Say hi"}]}]},
        ),
    ],
)
async def test_every_family_counts_the_same_rendered_prompt(path: str, body: dict[str, Any]) -> None:
    """Every family that becomes a chat or a generate renders "Say hi" the same way."""
    async with running(**HI) as s, s.post(path, {"model": "llama3.2", **body}) as r:
        assert r.status == 200
        await r.read()
    assert s.recorder.generations()[0].prompt_eval_count == SAY_HI_TOKENS


# --------------------------------------------------------------------------- num_ctx


CONVERSATION = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "one two three four five"},
    {"role": "assistant", "content": "six seven"},
    {"role": "user", "content": "eight"},
]


async def test_chat_prompt_drops_the_oldest_messages_first() -> None:
    """chatPrompt: the whole conversation is 11 (system block with "S") + 9 (first user) + 6
    (assistant) + 5 (last user) + 3 (assistant header) = 34 tokens before the BOS. With
    num_ctx 30 the first user turn goes (25); with 20 the assistant turn too (19), the system
    block and the last message always stay. The runner then fits 25 + BOS into 30 as is, but
    cuts 19 + BOS > 20 - 1 to num_keep 4 + BOS 1 and half the rest: 20 - (20 - 5) // 2 = 13."""
    assistant = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    system = LLAMA_HEAD + "S<|eot_id|>"
    last = "<|start_header_id|>user<|end_header_id|>\n\neight<|eot_id|>" + assistant
    async with running(**HI) as s:
        wide = await rendered(s, {"model": "llama3.2", "messages": CONVERSATION, "options": {"num_ctx": 30}})
        narrow = await rendered(
            s, {"model": "llama3.2", "messages": CONVERSATION, "options": {"num_ctx": 20}}
        )
        counts = [
            (
                await final(
                    s, "/api/chat", {"model": "llama3.2", "messages": CONVERSATION, "options": options}
                )
            )["prompt_eval_count"]
            for options in ({"num_ctx": 30}, {"num_ctx": 20}, {"num_ctx": 20, "num_keep": 9})
        ]
        generations = s.recorder.generations()
    assert wide["rendered_template"] == system + assistant + "six seven<|eot_id|>" + last
    assert narrow["rendered_template"] == system + last
    assert counts == [25 + 1, 20 - (20 - 5) // 2, 20 - (20 - 10) // 2]
    assert [g.num_ctx for g in generations] == [30, 20, 20]
    assert [g.passes for g in generations] == [[sim.PassRecord(count, 2)] for count in counts]


async def test_a_prompt_too_long_for_num_ctx() -> None:
    """One 100-word message (18 + 100 tokens) in num_ctx 64: cut to 64 - (64 - 5) // 2 = 35 by
    context shift; refused with Ollama's 400 when shift is false; refused by llama-server (its
    error body as Ollama's message) when truncate is false or an image rides along."""
    words = [{"role": "user", "content": "word " * 100}]
    request = {"model": "llama3.2", "messages": words, "options": {"num_ctx": 64}, "stream": False}
    exceeded = {
        "error": {
            "code": 400,
            "message": (
                "request (118 tokens) exceeds the available context size (64 tokens), try increasing it"
            ),
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 118,
            "n_ctx": 64,
        }
    }
    image = [{**words[0], "images": ["aGVsbG8="]}]
    async with running(**HI) as s:
        cut = await final(s, "/api/chat", request)
        async with s.post("/api/chat", {**request, "shift": False}) as r:
            refused = (r.status, await r.json())
        async with s.post("/api/chat", {**request, "truncate": False}) as r:
            untruncated = (r.status, await r.json())
        async with s.post("/api/chat", {**request, "messages": image}) as r:
            with_image = (r.status, await r.json())
        async with s.post("/api/chat", {**request, "stream": True, "shift": False}) as r:
            streamed = (r.status, r.headers["Content-Type"], await r.json())
        generations = s.recorder.generations()
    assert cut["prompt_eval_count"] == 35
    assert refused == (400, {"error": sim.MSG_PROMPT_TOO_LONG})
    assert untruncated == (400, {"error": json.dumps(exceeded, separators=(",", ":"))})
    # The "[img-0]" tag imageTaggedMessages adds is the image (tokens_per_image 0 here), not text.
    assert with_image == untruncated
    assert streamed == (400, "application/json", {"error": sim.MSG_PROMPT_TOO_LONG})
    assert [g.outcome for g in generations] == ["completed", "failed", "failed", "failed", "failed"]
    assert generations[1].passes == []


# --------------------------------------------------------------------------- structured outputs


async def test_format_on_a_thinking_model_runs_two_passes() -> None:
    """ChatHandler's structured outputs: pass 1 streams the thinking and is cancelled on the first
    content token (an empty chunk); pass 2 renders the conversation with that thinking as an
    assistant turn (<think> 3 + 2 thinking tokens + </think> 4 more: 10 + 9 = 19) and answers.
    Only pass 2's counts are reported; the record holds both passes."""
    request = {"model": "qwen3:8b", "messages": SAY_HI, "format": "json"}
    async with running(thinking_tokens=2, **HI) as s:
        async with s.post("/api/chat", request) as r:
            lines = [json.loads(line) for line in (await r.read()).splitlines()]
        plain = await final(s, "/api/chat", {**request, "format": None})
        without = await final(s, "/api/chat", {"model": "qwen3:8b", "messages": SAY_HI})
        openai = await final(
            s, "/v1/chat/completions", {**request, "response_format": {"type": "json_object"}, "format": None}
        )
        llama = await final(s, "/api/chat", {**request, "model": "llama3.2"})
        generations = s.recorder.generations()
    messages = [line["message"] for line in lines]
    assert [("thinking" in m, m["content"]) for m in messages] == [
        (True, ""),
        (True, ""),
        (False, ""),
        (False, "Hi"),
        (False, "!"),
        (False, ""),
    ]
    assert (lines[-1]["prompt_eval_count"], lines[-1]["eval_count"]) == (QWEN_SAY_HI_TOKENS + 9, 2)
    two_passes = [sim.PassRecord(QWEN_SAY_HI_TOKENS, 2 + 1), sim.PassRecord(QWEN_SAY_HI_TOKENS + 9, 2)]
    assert generations[0].passes == two_passes
    assert (generations[0].prompt_tokens, generations[0].completion_tokens) == (2 * QWEN_SAY_HI_TOKENS + 9, 5)
    assert plain["prompt_eval_count"] == QWEN_SAY_HI_TOKENS + 9  # "format": null is a format too
    assert generations[1].passes == two_passes
    assert without["prompt_eval_count"] == QWEN_SAY_HI_TOKENS
    assert generations[2].passes == [sim.PassRecord(QWEN_SAY_HI_TOKENS, 4)]
    assert openai["usage"]["prompt_tokens"] == QWEN_SAY_HI_TOKENS + 9
    assert generations[3].passes == two_passes
    assert llama["prompt_eval_count"] == SAY_HI_TOKENS  # no thinking, one pass
    assert len(generations[4].passes) == 1


# --------------------------------------------------------------------------- disconnects


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/chat", {"messages": SAY_HI}),
        ("/api/generate", {"prompt": "Say hi"}),
        ("/v1/chat/completions", {"messages": SAY_HI, "stream": True}),
        ("/v1/completions", {"prompt": "Say hi", "stream": True}),
        ("/v1/messages", {"messages": SAY_HI, "max_tokens": 100_000, "stream": True}),
        ("/v1/responses", {"input": "Say hi", "stream": True}),
    ],
)
async def test_a_cancelled_stream_keeps_the_tokens_evaluated(path: str, body: dict[str, Any]) -> None:
    """When the client goes away mid-stream the record still holds the prompt tokens the runner
    evaluated and every completion token generated until then (at least those delivered)."""
    async with running(tokens_per_second=200.0, completion_tokens=10_000) as s:
        async with s.post(path, {"model": "llama3.2", **body}) as r:
            for _ in range(4):
                await r.content.readline()
            r.close()
        async with asyncio.timeout(5):
            await s.recorder.wait_finished(1)
        generation = s.recorder.generations()[0]
    assert generation.outcome == "cancelled"
    assert len(generation.passes) == 1
    assert generation.passes[0].prompt_tokens == SAY_HI_TOKENS
    assert 1 <= generation.tokens_sent <= generation.completion_tokens < 10_000
    assert generation.prompt_eval_count is None


# --------------------------------------------------------------------------- the bound that holds

_ROLES = st.sampled_from(["system", "user", "assistant", "tool", "USER"])


@settings(max_examples=60, deadline=None)
@given(
    messages=st.lists(st.tuples(_ROLES, st.text(max_size=40)), min_size=1, max_size=6),
    think=st.sampled_from([None, True, False, "high"]),
)
def test_text_prompts_cost_at_most_their_rendered_bytes_plus_the_bos(
    messages: list[tuple[str, str]], think: bool | str | None
) -> None:
    """For text-only prompts of every profile, words-mode tokens never exceed the rendered
    prompt's UTF-8 bytes plus the BOS, and bytes mode is exactly that."""
    words, byte_mode = sim.SimulatorSettings(), sim.SimulatorSettings(tokenizer="bytes")
    api_messages = [sim.Message(role.lower(), text) for role, text in messages]
    for profile in (sim.PROFILES["llama3.2"], sim.PROFILES["qwen3"], sim.PROFILES["assistant"]):
        prompt = sim.chat_prompt(
            profile.template,
            api_messages,
            None,
            sim.Think(think),
            num_ctx=10**6,
            truncate=True,
            count=sim.count_text_tokens,
            projector=False,
            today=datetime.date(2026, 8, 21),
        )
        size = len(prompt.text.encode()) + 1
        assert sim.prompt_tokens(prompt, words) <= size == sim.prompt_tokens(prompt, byte_mode)
