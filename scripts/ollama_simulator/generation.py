"""What a model generates: plans, the paced passes over the prompt, failure injection, embeddings.

A generation runs one pass per runner call, two for structured outputs on a thinking model;
each pass starts with the runner taking its prompt (runner.py decides the tokens evaluated
or refuses it) and then emits the plan's tokens one chunk each.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import struct
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Final, Literal

import attrs

from ollama_simulator.catalog import ModelEntry
from ollama_simulator.exceptions import MSG_QUEUE_FULL, ApiError, ClientGone
from ollama_simulator.gojson import GoObject, _compact_json, _to_float32
from ollama_simulator.prompt import Prompt, Think
from ollama_simulator.recorder import GenerationRecord, PassRecord
from ollama_simulator.runner import RunnerOptions, evaluated_tokens
from ollama_simulator.settings import SimulatorSettings
from ollama_simulator.state import Call
from ollama_simulator.tokens import count_text_tokens

_CONTENT_WORDS: Final = (
    " the", " simulated", " model", " answers", " every", " prompt", " with", " the",
    " same", " deterministic", " words", ",", " one", " token", " per", " chunk", ".",
    " Tokens", " arrive", " at", " a", " steady", " pace", " and", " stop", " cleanly", ".",
)  # fmt: skip


_THINKING_WORDS: Final = (
    " Let", " me", " think", " about", " this", " step", " by", " step", ".", " Okay", ",",
)  # fmt: skip


@attrs.frozen
class ModelCall:
    """The one tool call a `tool_call` model makes: the first tool, with schema-derived arguments."""

    name: str
    arguments: dict[str, Any]
    # Output tokens the call costs (it counts toward eval_count like content does).
    tokens: int


@attrs.frozen
class Piece:
    """One generated chunk: a token, or (`tool` set) the whole parsed tool call."""

    text: str
    thinking: bool
    tool: ModelCall | None = None


def _word(words: Sequence[str], seed: int, index: int) -> str:
    word = words[(seed + index) % len(words)]
    return word.lstrip() if index == 0 else word


@attrs.frozen
class Plan:
    """The tokens one generation will produce and why it stops.

    `total` is eval_count. Chunks are the thinking tokens, then `content` tokens (all the rest
    when None), then one chunk for the tool call, whose tokens Ollama's parser buffers.
    """

    total: int
    thinking: int
    done_reason: str
    seed: int
    reply: tuple[str, ...] = ()
    content: int | None = None
    tool: ModelCall | None = None
    # Structured outputs' first pass: it ends on the first content token (an empty chunk).
    switch: bool = False

    @property
    def content_tokens(self) -> int:
        return self.total - self.thinking if self.content is None else self.content

    @property
    def chunks(self) -> int:
        return self.thinking + self.content_tokens + (1 if self.tool is not None else 0)

    def piece(self, index: int) -> Piece:
        if index < self.thinking:
            return Piece(_word(_THINKING_WORDS, self.seed, index), thinking=True)
        position = index - self.thinking
        if self.switch:
            return Piece("", thinking=False)
        if self.tool is not None and position == self.content_tokens:
            return Piece("", thinking=False, tool=self.tool)
        if self.reply:
            return Piece(self.reply[position % len(self.reply)], thinking=False)
        return Piece(_word(_CONTENT_WORDS, self.seed, position), thinking=False)

    def pieces(self) -> Iterator[Piece]:
        return (self.piece(index) for index in range(self.chunks))


def plan_generation(
    settings: SimulatorSettings,
    *,
    seed: int,
    think: bool,
    limit: int | None,
    tool: ModelCall | None = None,
    switch: bool = False,
) -> Plan:
    """Thinking tokens (when on), content tokens, then the tool call; cut at `limit` (length).

    A limit that cuts into the tool call leaves it unparsed: no call, done_reason "length".
    With `settings.honour_limit` false the limit is ignored (a backend that overruns it).
    `switch` plans structured outputs' first pass: the thinking, then the one content token
    on which ChatHandler cancels it (not when nothing was thought: the format never applies).
    """
    thinking = settings.thinking_tokens if think else 0
    if switch and thinking:
        if limit is not None and limit <= thinking and settings.honour_limit:
            return Plan(limit, limit, "length", seed, settings.reply, 0)
        return Plan(thinking + 1, thinking, "", seed, settings.reply, 1, switch=True)
    content = settings.completion_tokens
    natural = thinking + content + (tool.tokens if tool is not None else 0)
    if limit is not None and limit < natural and settings.honour_limit:
        cut_thinking = min(thinking, limit)
        cut_content = min(content, limit - cut_thinking)
        return Plan(limit, cut_thinking, "length", seed, settings.reply, cut_content)
    return Plan(natural, thinking, "stop", seed, settings.reply, content, tool)


_ARGUMENT_SAMPLES: Final[dict[str, Any]] = {
    "integer": 1,
    "number": 1,
    "boolean": True,
    "array": [],
    "object": {},
}


def _sample_argument(name: str, schema: Any) -> Any:
    """A deterministic value for one schema property: its first enum value, else one per type."""
    if not isinstance(schema, dict):
        return f"{name}-1"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind in _ARGUMENT_SAMPLES:
        sample = _ARGUMENT_SAMPLES[kind]
        return type(sample)() if isinstance(sample, list | dict) else sample
    return f"{name}-1"


def make_tool_call(name: str, parameters: Any) -> ModelCall:
    """The call of tool `name`: one argument per schema property, in the schema's order."""
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    arguments: dict[str, Any] = {}
    if isinstance(properties, dict):
        for key, schema in properties.items():
            arguments[key] = _sample_argument(key, schema)
    tokens = count_text_tokens(_compact_json({"name": name, "arguments": arguments}), "words")
    return ModelCall(name, arguments, tokens)


_CALL_ID_LETTERS: Final = "abcdefghijklmnopqrstuvwxyz0123456789"


def tool_call_id(rng: random.Random) -> str:
    """server/routes.go toolCallId: "call_" and 8 letters or digits from math/rand."""
    return "call_" + "".join(rng.choice(_CALL_ID_LETTERS) for _ in range(8))


def _embedding(text: str, dimensions: int) -> tuple[float, ...]:
    """A deterministic, L2-normalised float32 vector for one input."""
    raw: list[float] = []
    counter = 0
    while len(raw) < dimensions:
        block = hashlib.blake2b(f"{counter}:{text}".encode("utf-8", "surrogatepass")).digest()
        raw.extend((v / 2**31) - 1.0 for v in struct.unpack("<16I", block))
        counter += 1
    vector = raw[:dimensions]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return tuple(_to_float32(v / norm) for v in vector)


@attrs.frozen
class Job:
    """An inference request after validation: the prompt, what to generate, how to run it."""

    kind: Literal["generate", "chat"]
    model: str  # as sent, echoed verbatim
    entry: ModelEntry
    prompt: Prompt
    think: bool
    limit: int | None
    runner: RunnerOptions
    keep_alive_ns: int | None = None
    raw: bool = False
    # Set when the settings say the model calls a tool and the request offered one.
    tool: ModelCall | None = None
    # Structured outputs on a thinking model (ChatHandler): pass 2's prompt from pass 1's thinking.
    second_pass: Callable[[str], Prompt] | None = None


def _seed(prompt: Prompt) -> int:
    return zlib.crc32(prompt.text.encode("utf-8", "surrogatepass"))


@attrs.define
class Generation:
    """Runs one job's passes with pacing, failure injection and disconnect detection.

    `plan` and `prompt_eval_count` are the current (at the end: the last) pass's, which is
    what Ollama reports; the record keeps every pass's evaluated and generated tokens.
    """

    call: Call
    job: Job
    record: GenerationRecord
    plan: Plan = attrs.field(init=False)
    prompt_eval_count: int = attrs.field(init=False, default=0)
    marks: list[int] = attrs.field(init=False, factory=list)
    # What to answer when run() returns False (the injected failure, or a prompt refused).
    error_status: int = attrs.field(init=False, default=500)
    error_message: str = attrs.field(init=False, default="")
    # Every generated piece's text, in order (the thinking for pass 2, the output for context).
    texts: list[str] = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        self.plan = self._plan(self.job.prompt, think=self.job.think, switch=self.job.second_pass is not None)
        self.record.completion_limit = self.job.limit
        self.record.num_ctx = self.job.runner.num_ctx
        clock = self.call.state.clock
        self.marks = [clock.monotonic_ns(), clock.monotonic_ns()]  # start, model loaded
        self.call.state.touch(self.job.entry, self.job.keep_alive_ns, self.marks[1], self.job.runner.num_ctx)

    def _plan(self, prompt: Prompt, *, think: bool, switch: bool) -> Plan:
        return plan_generation(
            self.call.settings,
            seed=_seed(prompt),
            think=think,
            limit=self.job.limit,
            tool=self.job.tool,
            switch=switch,
        )

    def _mark(self) -> None:
        self.marks.append(self.call.state.clock.monotonic_ns())

    def _start_pass(self, prompt: Prompt) -> PassRecord | None:
        """The runner takes the prompt: its evaluated tokens, or None when it is refused."""
        try:
            tokens = evaluated_tokens(prompt, self.job.runner, self.call.settings)
        except ApiError as e:
            self.error_status, self.error_message = e.status, e.message
            return None
        self.prompt_eval_count = tokens
        record = PassRecord(tokens)
        self.record.passes.append(record)
        return record

    async def run(self, on_piece: Callable[[Piece], Awaitable[None]]) -> bool:
        """Emit every token through `on_piece`; False when a failure ends the generation."""
        settings = self.call.settings
        loop = asyncio.get_running_loop()
        started = loop.time()
        interval = 1.0 / settings.tokens_per_second if settings.tokens_per_second > 0 else 0.0
        fail_after = settings.fail_after_chunks
        prompt = self.job.prompt
        index = 0
        while True:
            current = self._start_pass(prompt)
            if current is None:
                return False
            for position in range(self.plan.chunks):
                if fail_after is not None and index >= fail_after:
                    self.error_status, self.error_message = 500, settings.failure_message
                    return False
                delay = started + settings.time_to_first_token + index * interval - loop.time()
                await asyncio.sleep(max(delay, 0.0))
                transport = self.call.request.transport
                if transport is None or transport.is_closing():
                    raise ClientGone
                if index == 0:
                    self._mark()
                piece = self.plan.piece(position)
                current.completion_tokens += piece.tool.tokens if piece.tool is not None else 1
                self.texts.append(piece.text)
                await on_piece(piece)
                if piece.text or piece.tool is not None:
                    self.record.tokens_sent += 1
                index += 1
            if not (self.plan.switch and self.job.second_pass is not None):
                break
            prompt = self.job.second_pass("".join(self.texts[: self.plan.thinking]))
            self.plan = self._plan(prompt, think=False, switch=False)
        if index == 0:
            await asyncio.sleep(settings.time_to_first_token)
            self._mark()
        self._mark()
        if fail_after is not None:
            self.error_status, self.error_message = 500, settings.failure_message
            return False
        return True

    def metrics(self) -> dict[str, Any]:
        """The six metrics in Go's order; zero values are dropped (omitempty)."""
        start, loaded, first, end = self.marks[:4]
        values = {
            "total_duration": max(end - start, 1),
            "load_duration": max(loaded - start, 1),
            "prompt_eval_count": self.prompt_eval_count,
            "prompt_eval_duration": max(first - loaded, 1),
            "eval_count": self.plan.total,
            "eval_duration": max(end - first, 1),
        }
        return {key: value for key, value in values.items() if value}

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_eval_count,
            "completion_tokens": self.plan.total,
            "total_tokens": self.prompt_eval_count + self.plan.total,
        }

    def finish(self) -> None:
        """The final chunk (or usage) went out: record the reported counts."""
        self.record.outcome = "completed"
        self.record.done_reason = self.plan.done_reason
        self.record.prompt_eval_count = self.prompt_eval_count
        self.record.eval_count = self.plan.total

    def fail(self) -> None:
        self.record.outcome = "failed"

    def context(self) -> list[int]:
        """/api/generate's context: the prompt and the output, tokenized without BOS."""
        text = self.job.prompt.text + "".join(self.texts)
        return self.call.state.vocabulary.tokenize(text, self.call.settings.tokenizer)


def _limit_from_options(options: GoObject | None) -> int | None:
    """options.num_predict (exact key, as Go's Options.FromMap reads the map); <= 0 = no limit."""
    if options is None or "num_predict" not in options:
        return None
    value = options["num_predict"]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(500, 'option "num_predict" must be of type integer')
    limit = int(value)
    return limit if limit > 0 else None


def _positive_min(*values: int | None) -> int | None:
    positive = [v for v in values if v is not None and v > 0]
    return min(positive) if positive else None


_THINK_LEVELS: Final = ("high", "medium", "low", "max")


def _bind_think(value: Any) -> bool | str | None:
    """api.ThinkValue as bound: a bool or a level."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value in _THINK_LEVELS:
        return value
    raise ApiError(400, f"invalid think value: {json.dumps(value)}")


def _check_queue(call: Call) -> None:
    if call.settings.queue_full:
        raise ApiError(503, MSG_QUEUE_FULL)


def resolve_think(entry: ModelEntry, model: str, think: bool | str | None, *, relax: bool = False) -> Think:
    """ChatHandler / GenerateHandler: thinking models think unless told not to; others refuse
    think (the Anthropic route, with relax_thinking set, drops it instead)."""
    if entry.thinks:
        return Think(True if think is None else think)
    if Think(think).enabled:
        if relax:
            return Think(None)
        raise ApiError(400, f"{json.dumps(model)} does not support thinking")
    return Think(think)


ToolFamily = Literal["native", "anthropic", "responses"]


def offered_tool(call: Call, tools: Sequence[Any] | None, family: ToolFamily) -> ModelCall | None:
    """The tool a `tool_call` model calls: the first function tool the request offers.

    Built-in web search tools are never called: Ollama would run that search on ollama.com,
    which the simulator does not; such requests are only recorded.
    """
    if not call.settings.tool_call or not tools:
        return None
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        if family == "native":  # api.Tool (also what /v1/chat/completions binds)
            function = tool.get("function")
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                return make_tool_call(function["name"], function.get("parameters"))
        elif family == "anthropic":
            if str(tool.get("type") or "").startswith("web_search"):
                continue
            if isinstance(tool.get("name"), str):
                return make_tool_call(tool["name"], tool.get("input_schema"))
        elif tool.get("type") == "function" and isinstance(tool.get("name"), str):
            return make_tool_call(tool["name"], tool.get("parameters"))
    return None
