"""Ollama's native API: /api/chat, /api/generate, /api/embed, /api/embeddings, and the catalogue
routes (/api/tags, /api/ps, /api/show, /api/version) (docs/OLLAMA.md#native-api).

`stream` absent or null streams (NDJSON); the completion limit is `options.num_predict`; counts are
`prompt_eval_count` + `eval_count` on the `done:true` object.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson

from shared import policy
from stream_proxy import body, meter
from stream_proxy.apis.base import CountingReader, Framing, check_limit, field_text, json_bytes, text_bytes

GENERATING: frozenset[policy.Route] = frozenset({"chat", "generate"})
EMBEDDING: frozenset[policy.Route] = frozenset({"embed", "embeddings"})


def _message(message: Any) -> tuple[int, int]:
    """(text bytes, images) of one native chat message."""
    if not isinstance(message, dict):
        return 0, 0
    names = ("content", "thinking", "reasoning", "reasoning_content", "tool_name")
    size = sum(text_bytes(body.get(message, n)) for n in names)
    size += json_bytes(body.get(message, "tool_calls"))
    content = body.get(message, "content")
    if content is not None and not isinstance(content, str):
        size += json_bytes(content)
    images = body.get(message, "images")
    return size, len(images) if isinstance(images, list) else 0


@attrs.define
class NativeReader(CountingReader):
    """Reads native answers: one object, or NDJSON lines ending with `done:true`."""

    def whole(self, document: Any) -> None:
        """A complete answer."""
        self.line(document)

    def line(self, document: Any) -> None:
        """One object: an error, the final counts, an embedding, or a piece of output."""
        count = self.count
        if not isinstance(document, dict):
            return
        if "error" in document:
            count.error = True
            return
        if "embeddings" in document or "embedding" in document:
            count.finished = True
            if "prompt_eval_count" in document:
                count.prompt_tokens = int(document.get("prompt_eval_count") or 0)
                count.completion_tokens = 0
            return
        # A non-streamed answer is one object with the whole output and `done`: both are read.
        message = document.get("message")
        text = message.get("content") if isinstance(message, dict) else document.get("response")
        thinking = message.get("thinking") if isinstance(message, dict) else document.get("thinking")
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if text or thinking or calls:
            self.produced(text if isinstance(text, str) else None)
        if document.get("done") is True:
            count.finished = True
            count.prompt_tokens = int(document.get("prompt_eval_count") or 0)
            count.completion_tokens = int(document.get("eval_count") or 0)

    def event(self, name: str | None, data: bytes, raw: bytes) -> bytes:
        """Native answers are never SSE; relayed untouched."""
        return raw

    def tail(self) -> bytes:
        """A final object with done_reason `length`."""
        return orjson.dumps({"done": True, "done_reason": "length"}) + b"\n"


@attrs.frozen
class Native:
    """The native family's adapter."""

    family: policy.Family = "native"

    def models(self, route: policy.Route, document: dict[str, Any]) -> list[Any] | None:
        """`model`; /api/show also takes the deprecated `name`."""
        if route == "show":
            return [body.get(document, "model"), body.get(document, "name")]
        return [body.get(document, "model")] if route in policy.METERED else None

    def path_model(self, route: policy.Route, raw_path: str) -> str | None:
        """No route of this family names a model in its path."""
        return None

    def refuse(self, route: policy.Route, document: dict[str, Any]) -> None:
        """An absurd num_predict is refused before any reservation."""
        if route in GENERATING:
            check_limit(body.option(document, "num_predict"), "options.num_predict", any_number=True)

    def streams(self, route: policy.Route, document: dict[str, Any]) -> bool:
        """`stream` absent or null streams on /api/chat and /api/generate; embeddings never do."""
        return route in GENERATING and body.get(document, "stream") is not False

    def requested_completion(self, route: policy.Route, document: dict[str, Any]) -> int | None:
        """options.num_predict; 0, -1 and -2 mean no limit (until the model stops or fills the context)."""
        if route not in GENERATING:
            return 0
        value = body.option(document, "num_predict")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            return None
        return int(value)

    def write_completion(self, route: policy.Route, doc: body.Body, limit: int) -> None:
        """options.num_predict."""
        if route in GENERATING:
            body.put(body.child(doc.document, "options"), "num_predict", limit)
            doc.changed = True

    def prompt(self, route: policy.Route, document: dict[str, Any]) -> meter.PromptSize:
        """Chat: every message's text, tool calls and images, plus tools and format; generate:
        prompt, suffix, system, template, format, context tokens and images; embeddings: inputs."""
        size = images = context = 0
        messages = 1
        if route == "chat":
            msgs = body.get(document, "messages")
            messages = 0
            for message in msgs if isinstance(msgs, list) else []:
                text, pictures = _message(message)
                size, images, messages = size + text, images + pictures, messages + 1
            size += sum(json_bytes(body.get(document, n)) for n in ("tools", "format"))
        elif route == "generate":
            size = sum(field_text(body.get(document, n)) for n in ("prompt", "suffix", "system", "template"))
            size += json_bytes(body.get(document, "format"))
            messages = 2
            ctx = body.get(document, "context")
            context = len(ctx) if isinstance(ctx, list) else 0
            pictures = body.get(document, "images")
            images = len(pictures) if isinstance(pictures, list) else 0
        elif route in EMBEDDING:
            value = body.get(document, "prompt" if route == "embeddings" else "input")
            inputs = value if isinstance(value, list) else [value]
            size = sum(field_text(v) for v in inputs)
            messages = len(inputs)
        return meter.PromptSize(text_bytes=size, messages=messages, images=images, context_tokens=context)

    def prepare(self, route: policy.Route, doc: body.Body, *, streaming: bool, keep_text: bool) -> Framing:
        """Native answers always carry their counts: nothing to ask for."""
        return Framing(keep_text=keep_text)

    def reader(self, route: policy.Route, framing: Framing) -> NativeReader:
        """A native reader."""
        return NativeReader(framing)

    def listing(self, route: policy.Route) -> tuple[str, tuple[str, ...]] | None:
        """/api/tags and /api/ps list `models`, each named by `model` or `name`."""
        return ("models", ("model", "name")) if route in ("tags", "ps") else None
