"""Ollama's OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/embeddings,
/v1/models (docs/OLLAMA.md#openai-api).

`stream` absent means no stream; streams are SSE ending with `data: [DONE]`. Ollama reads only
`max_tokens` as the completion limit; the gateway also honours `max_completion_tokens` (the smaller
positive one wins) and always writes the clamped limit into `max_tokens`, which Ollama obeys. A
stream reports usage only when asked (`stream_options.include_usage`): the gateway always asks, and
drops that event again when the client did not ask itself.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson

from shared import policy
from stream_proxy import body, meter
from stream_proxy.apis.base import CountingReader, Framing, check_limit, field_text, json_bytes, text_bytes
from stream_proxy.exceptions import Refused

GENERATING: frozenset[policy.Route] = frozenset({"openai_chat", "openai_completions"})
ZERO_USAGE = b',"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'
LIMIT_FIELDS = ("max_tokens", "max_completion_tokens")


def _message(message: Any) -> tuple[int, int, int]:
    """(text bytes, images, template messages) of one chat message: Ollama turns every content
    part into a message of its own."""
    if not isinstance(message, dict):
        return 0, 0, 0
    names = ("thinking", "reasoning", "reasoning_content", "name")
    size = sum(text_bytes(body.get(message, n)) for n in names)
    size += json_bytes(body.get(message, "tool_calls"))
    content = body.get(message, "content")
    if not isinstance(content, list):
        return size + field_text(content), 0, 1
    images = 0
    for part in content:
        if isinstance(part, dict) and isinstance(body.get(part, "image_url"), (dict, str)):
            images += 1
        elif isinstance(part, dict):
            size += text_bytes(body.get(part, "text")) or json_bytes(body.get(part, "input_audio"))
    return size, images, max(1, len(content))


def usage_counts(usage: Any, count: meter.Count) -> None:
    """`usage.prompt_tokens` / `completion_tokens` (an all-zero usage is Ollama's placeholder)."""
    if not isinstance(usage, dict):
        return
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int) and (prompt or completion):
        count.prompt_tokens, count.completion_tokens = prompt, completion
    elif isinstance(prompt, int) and completion is None and prompt:
        count.prompt_tokens, count.completion_tokens = prompt, 0


@attrs.define
class OpenAIReader(CountingReader):
    """Reads OpenAI answers: one JSON body, or SSE `data:` events ending with `[DONE]`."""

    def whole(self, document: Any) -> None:
        """A complete answer."""
        self._object(document)

    def line(self, document: Any) -> None:
        """OpenAI answers are never NDJSON; observed as objects."""
        self._object(document)

    def _object(self, document: Any) -> None:
        if not isinstance(document, dict):
            return
        if "error" in document:
            self.count.error = True
            return
        usage_counts(document.get("usage"), self.count)
        choices = document.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict):
                continue
            # A stream's piece has a `delta`, a whole chat answer a `message`, a completion `text`.
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice.get("message")
            text = delta.get("content") if isinstance(delta, dict) else None
            produced = isinstance(delta, dict) and (
                delta.get("content") or delta.get("reasoning") or delta.get("tool_calls")
            )
            if produced or choice.get("text"):
                self.produced(text if isinstance(text, str) and text else choice.get("text"))

    def event(self, name: str | None, data: bytes, raw: bytes) -> bytes:
        """Count one event; drop the usage event the gateway asked for, and Ollama's zero usage."""
        if data == b"[DONE]":
            self.count.finished = True
            return raw
        if not data:
            return raw
        document = meter.loads(data)
        self._object(document)
        if self.framing.hide_usage and isinstance(document, dict) and document.get("choices") == []:
            return b""
        if self.framing.strip_zero_usage:
            return raw.replace(ZERO_USAGE, b"")
        return raw

    def tail(self) -> bytes:
        """A finish chunk with finish_reason `length`, then `[DONE]`."""
        choice = {"index": 0, "delta": {}, "finish_reason": "length"}
        chunk = {"object": "chat.completion.chunk", "choices": [choice]}
        return b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n"


@attrs.frozen
class OpenAI:
    """The OpenAI family's adapter."""

    family: policy.Family = "openai"

    def models(self, route: policy.Route, document: dict[str, Any]) -> list[Any] | None:
        """`model` of the inference routes (/v1/models/{model} names it in the path)."""
        return [body.get(document, "model")] if route in policy.METERED else None

    def path_model(self, route: policy.Route, raw_path: str) -> str | None:
        """/v1/models/{model} names its model in the last path segment."""
        return raw_path.rsplit("/", 1)[-1] if route == "openai_model" else None

    def refuse(self, route: policy.Route, document: dict[str, Any]) -> None:
        """A completion limit that is no integer or absurd, and stream_options that is no object,
        are refused before any reservation."""
        if route in GENERATING:
            for name in LIMIT_FIELDS:
                check_limit(body.get(document, name), name)
            options = body.get(document, "stream_options")
            if options is not None and not isinstance(options, dict):
                raise Refused(400, "stream_options must be an object")

    def streams(self, route: policy.Route, document: dict[str, Any]) -> bool:
        """`stream: true` streams; absent does not."""
        return route in GENERATING and body.get(document, "stream") is True

    def requested_completion(self, route: policy.Route, document: dict[str, Any]) -> int | None:
        """The smaller positive of max_tokens and max_completion_tokens (None: neither; Ollama itself
        ignores max_completion_tokens, so the gateway's clamp is what enforces it)."""
        if route not in GENERATING:
            return 0
        candidates = [body.get(document, name) for name in LIMIT_FIELDS]
        numbers = [c for c in candidates if isinstance(c, int) and not isinstance(c, bool) and c > 0]
        return min(numbers) if numbers else None

    def write_completion(self, route: policy.Route, doc: body.Body, limit: int) -> None:
        """max_tokens (and max_completion_tokens when the client sent it)."""
        if route not in GENERATING:
            return
        body.put(doc.document, "max_tokens", limit)
        if body.get(doc.document, "max_completion_tokens") is not None:
            body.put(doc.document, "max_completion_tokens", limit)
        doc.changed = True

    def prompt(self, route: policy.Route, document: dict[str, Any]) -> meter.PromptSize:
        """Chat: messages (each content part a message), tools, response format; completions: prompt
        and suffix; embeddings: inputs."""
        size = images = 0
        messages = 1
        if route == "openai_chat":
            msgs = body.get(document, "messages")
            messages = 0
            for message in msgs if isinstance(msgs, list) else []:
                text, pictures, count = _message(message)
                size, images, messages = size + text, images + pictures, messages + count
            size += sum(json_bytes(body.get(document, n)) for n in ("tools", "response_format"))
        elif route == "openai_completions":
            # Only prompt and suffix reach the template; the rest is counted too (never lower).
            size = sum(field_text(body.get(document, n)) for n in ("prompt", "suffix", "system", "template"))
            size += json_bytes(body.get(document, "format"))
            messages = 2
        elif route == "openai_embeddings":
            value = body.get(document, "input")
            inputs = value if isinstance(value, list) else [value]
            size = sum(field_text(v) for v in inputs)
            messages = len(inputs)
        return meter.PromptSize(text_bytes=size, messages=messages, images=images, context_tokens=0)

    def prepare(self, route: policy.Route, doc: body.Body, *, streaming: bool, keep_text: bool) -> Framing:
        """On a stream, ask for usage; hide it again when the client did not ask."""
        if not (streaming and route in GENERATING):
            return Framing(keep_text=keep_text)
        options = body.get(doc.document, "stream_options")
        if isinstance(options, dict) and body.get(options, "include_usage") is True:
            return Framing(keep_text=keep_text)
        body.put(body.child(doc.document, "stream_options"), "include_usage", True)
        doc.changed = True
        return Framing(hide_usage=True, strip_zero_usage=route == "openai_completions", keep_text=keep_text)

    def reader(self, route: policy.Route, framing: Framing) -> OpenAIReader:
        """An OpenAI reader."""
        return OpenAIReader(framing)

    def listing(self, route: policy.Route) -> tuple[str, tuple[str, ...]] | None:
        """/v1/models lists `data`, each named by `id`."""
        return ("data", ("id",)) if route == "openai_models" else None
