"""Tokens: the prompt's upper bound before the request, and the count as the answer streams by.

Upper bound (docs/ARCHITECTURE.md#zero-overshoot): the UTF-8 bytes of the prompt's text (a token is
never shorter than one byte) plus a template allowance per message and an allowance per image.
Counts come from Ollama's own numbers (`prompt_eval_count` + `eval_count`, or `usage`); when they
never arrive (client gone, upstream failure, /api/embeddings) the charge is the prompt bound plus
the output pieces received, flagged as estimated.
What each API family's prompt and answer are made of is its adapter's business (stream_proxy/apis).
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson

MAX_LOGGED_TEXT = 1 << 20  # the default of GATEWAY_PROMPT_LOG_MAX_BYTES


def utf8_prefix(text: str, limit: int) -> str:
    """The longest prefix of `text` whose UTF-8 form has at most `limit` bytes (never half a
    character; lone surrogates count as the three bytes they would take)."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text
    return raw[: max(0, limit)].decode("utf-8", "ignore")


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


@attrs.define
class Count:
    """Tokens as far as known."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    content_chunks: int = 0
    error: bool = False
    finished: bool = False  # the final object / [DONE] / the usage event was seen


def loads(raw: bytes) -> Any:
    """Parse JSON, or None when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def dumps(value: Any) -> bytes:
    """Compact JSON."""
    return orjson.dumps(value)
