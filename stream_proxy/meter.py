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
_IMAGE_FIELDS = frozenset({"images", "image_url"})
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


def _without_images(value: Any) -> tuple[Any, int]:
    """A copy of a JSON value with image payloads removed, and how many images it held."""
    if isinstance(value, list):
        items, count = [], 0
        for item in value:
            cleaned, images = _without_images(item)
            items.append(cleaned)
            count += images
        return items, count
    if isinstance(value, dict):
        out, count = {}, 0
        for key, item in value.items():
            if key.casefold() in _IMAGE_FIELDS:
                count += len(item) if isinstance(item, list) else 1
                continue
            cleaned, images = _without_images(item)
            out[key] = cleaned
            count += images
        return out, count
    return value, 0


def _text_bytes(value: Any) -> tuple[int, int]:
    """UTF-8 bytes of a JSON value as compact JSON (every key, value and punctuation mark: a token
    is never shorter than a byte, so this bounds any tokenisation of it), and its image count."""
    cleaned, images = _without_images(value)
    if cleaned is None:
        return 0, images
    return len(orjson.dumps(cleaned)), images


def prompt_size(route: policy.Route, document: dict[str, Any]) -> PromptSize:
    """What the prompt of a metered request consists of."""
    fields: list[Any] = []
    messages = 1
    context = 0
    extra_images = 0
    if route in ("chat", "openai_chat"):
        msgs = body.get(document, "messages")
        msgs = msgs if isinstance(msgs, list) else []
        fields += [msgs, *(body.get(document, n) for n in ("tools", "format", "response_format"))]
        # Ollama's OpenAI layer turns every content part into its own message.
        messages = sum(
            len(c) if isinstance(c := body.get(m, "content"), list) else 1
            for m in msgs
            if isinstance(m, dict)
        )
    elif route in ("generate", "openai_completions"):
        fields += [body.get(document, n) for n in ("prompt", "suffix", "system", "template", "format")]
        messages = 2
        ctx = body.get(document, "context")
        context = len(ctx) if isinstance(ctx, list) else 0
        images = body.get(document, "images")
        extra_images = len(images) if isinstance(images, list) else 0
    elif route in EMBEDDINGS:
        key = "prompt" if route == "embeddings" else "input"
        value = body.get(document, key)
        fields.append(value)
        messages = len(value) if isinstance(value, list) else 1
    size, image_count = _text_bytes([f for f in fields if f is not None])
    return PromptSize(
        text_bytes=size, messages=messages, images=image_count + extra_images, context_tokens=context
    )


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
