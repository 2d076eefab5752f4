"""Tokens: the prompt's upper bound before the request, and the count as the answer streams by.

Upper bound (DESIGN.md "Zero overshoot"): the UTF-8 bytes of the prompt's text (a token is never
shorter than one byte) plus a template allowance per message and an allowance per image. Counts
come from Ollama's own numbers (`prompt_eval_count` + `eval_count`, or `usage`); when they never
arrive (client gone, upstream failure, /api/embeddings) the count is estimated and flagged.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import orjson

from shared import policy
from stream_proxy import body

NATIVE_STREAMING: frozenset[policy.Route] = frozenset({"chat", "generate"})
OPENAI_STREAMING: frozenset[policy.Route] = frozenset({"openai_chat", "openai_completions"})
EMBEDDINGS: frozenset[policy.Route] = frozenset({"embed", "embeddings", "openai_embeddings"})
BYTES_PER_TOKEN_ESTIMATE = 4


@attrs.frozen
class PromptSize:
    """The prompt's text size and structure."""

    text_bytes: int
    messages: int
    images: int
    context_tokens: int

    def bound(self, per_message: int, per_image: int) -> int:
        """An upper bound on the prompt tokens Ollama will count."""
        return (
            self.text_bytes
            + per_message * (self.messages + 1)
            + per_image * self.images
            + self.context_tokens
        )

    def estimate(self, per_message: int, per_image: int) -> int:
        """A realistic guess (about four bytes a token) for requests that end without a count."""
        text = math.ceil(self.text_bytes / BYTES_PER_TOKEN_ESTIMATE)
        return text + per_message * (self.messages + 1) + per_image * self.images + self.context_tokens


def _json_bytes(value: Any) -> int:
    """Bytes of a structured field (tools, tool calls, a format schema) as compact JSON."""
    return 0 if value is None else len(orjson.dumps(value))


def _text(value: Any) -> int:
    return len(value.encode("utf-8")) if isinstance(value, str) else 0


def _message(message: Any) -> tuple[int, int, int]:
    """(text bytes, images, template messages) of one chat message."""
    if not isinstance(message, dict):
        return 0, 0, 0
    size = sum(_text(body.get(message, n)) for n in ("thinking", "reasoning", "reasoning_content"))
    size += _json_bytes(body.get(message, "tool_calls"))
    images = body.get(message, "images")
    image_count = len(images) if isinstance(images, list) else 0
    content = body.get(message, "content")
    if not isinstance(content, list):
        return size + (_text(content) if isinstance(content, str) else _json_bytes(content)), image_count, 1
    for part in content:  # OpenAI content parts: each becomes its own message in Ollama
        if isinstance(part, dict) and isinstance(body.get(part, "image_url"), (dict, str)):
            image_count += 1
        elif isinstance(part, dict):
            size += _text(body.get(part, "text")) or _json_bytes(body.get(part, "input_audio"))
    return size, image_count, max(1, len(content))


def prompt_size(route: policy.Route, document: dict[str, Any]) -> PromptSize:
    """What the prompt of a metered request consists of: text bytes (structured fields as compact
    JSON), messages, images and context tokens."""
    size = images = context = 0
    messages = 1
    if route in ("chat", "openai_chat"):
        msgs = body.get(document, "messages")
        messages = 0
        for message in msgs if isinstance(msgs, list) else []:
            text, pictures, count = _message(message)
            size, images, messages = size + text, images + pictures, messages + count
        size += sum(_json_bytes(body.get(document, n)) for n in ("tools", "format", "response_format"))
    elif route in ("generate", "openai_completions"):
        for name in ("prompt", "suffix", "system", "template"):
            value = body.get(document, name)
            size += _text(value) if isinstance(value, str) else _json_bytes(value)
        size += _json_bytes(body.get(document, "format"))
        messages = 2
        ctx = body.get(document, "context")
        context = len(ctx) if isinstance(ctx, list) else 0
        pictures = body.get(document, "images")
        images = len(pictures) if isinstance(pictures, list) else 0
    elif route in EMBEDDINGS:
        value = body.get(document, "prompt" if route == "embeddings" else "input")
        inputs = value if isinstance(value, list) else [value]
        size = sum(_text(v) if isinstance(v, str) else _json_bytes(v) for v in inputs)
        messages = len(inputs)
    return PromptSize(text_bytes=size, messages=messages, images=images, context_tokens=context)


def wants_stream(route: policy.Route, document: dict[str, Any]) -> bool:
    """As Ollama decides it: native `stream` absent or null streams; OpenAI absent does not."""
    value = body.get(document, "stream")
    if route in NATIVE_STREAMING:
        return value is not False
    if route in OPENAI_STREAMING:
        return value is True
    return False


def requested_completion(route: policy.Route, document: dict[str, Any]) -> int | None:
    """The completion limit the client asked for (None: none, or unlimited)."""
    if route in EMBEDDINGS:
        return 0
    if route in NATIVE_STREAMING:
        value = body.get(body.get(document, "options"), "num_predict")
    else:
        candidates = [body.get(document, "max_completion_tokens"), body.get(document, "max_tokens")]
        numbers = [c for c in candidates if isinstance(c, int) and not isinstance(c, bool) and c > 0]
        value = min(numbers) if numbers else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return None  # 0, -1 and -2 mean "no limit": until the model stops or fills the context
    return int(value)


def set_completion(route: policy.Route, doc: body.Body, limit: int) -> None:
    """Forward the clamped completion limit in the field Ollama reads for this route."""
    document = doc.document
    if route in NATIVE_STREAMING:
        body.put(body.child(document, "options"), "num_predict", limit)
    elif route in OPENAI_STREAMING:
        body.put(document, "max_tokens", limit)
        if body.get(document, "max_completion_tokens") is not None:
            body.put(document, "max_completion_tokens", limit)
    else:
        return
    doc.changed = True


def ask_for_usage(doc: body.Body) -> bool:
    """Make an OpenAI stream report usage; returns whether the client had asked for it itself."""
    options = body.get(doc.document, "stream_options")
    if isinstance(options, dict) and body.get(options, "include_usage") is True:
        return True
    body.put(body.child(doc.document, "stream_options"), "include_usage", True)
    doc.changed = True
    return False


@attrs.define
class Count:
    """Tokens as far as known."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    content_chunks: int = 0
    error: bool = False
    finished: bool = False  # the final object / [DONE] / the usage event was seen


def _usage(document: Any, count: Count) -> None:
    usage = document.get("usage") if isinstance(document, dict) else None
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int) and (prompt or completion):
            count.prompt_tokens, count.completion_tokens = prompt, completion
        elif isinstance(prompt, int) and completion is None and prompt:
            count.prompt_tokens, count.completion_tokens = prompt, 0


def read_native_object(document: Any, count: Count) -> None:
    """One native object (a stream line or a whole body)."""
    if not isinstance(document, dict):
        return
    if "error" in document:
        count.error = True
        return
    if document.get("done") is True:
        count.finished = True
        count.prompt_tokens = int(document.get("prompt_eval_count") or 0)
        count.completion_tokens = int(document.get("eval_count") or 0)
        return
    if "embeddings" in document or "embedding" in document:
        count.finished = True
        if "prompt_eval_count" in document:
            count.prompt_tokens = int(document.get("prompt_eval_count") or 0)
            count.completion_tokens = 0
        return
    message = document.get("message")
    text = message.get("content") if isinstance(message, dict) else document.get("response")
    thinking = message.get("thinking") if isinstance(message, dict) else document.get("thinking")
    if text or thinking:
        count.content_chunks += 1


def read_openai_object(document: Any, count: Count) -> None:
    """One OpenAI object (an SSE event's data or a whole body)."""
    if not isinstance(document, dict):
        return
    if "error" in document:
        count.error = True
        return
    _usage(document, count)
    choices = document.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            produced = isinstance(delta, dict) and (
                delta.get("content") or delta.get("reasoning") or delta.get("tool_calls")
            )
            if produced or choice.get("text"):
                count.content_chunks += 1


def loads(raw: bytes) -> Any:
    """Parse JSON, or None when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
