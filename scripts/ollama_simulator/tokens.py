"""Prompt token counting: the deterministic prompt_eval_count and its byte bound."""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator, Sequence
from typing import Final

import attrs

TEMPLATE_TOKENS_PER_MESSAGE: Final = 4


EMBED_TOKENS_PER_INPUT: Final = 2


_TOKEN_RE: Final = re.compile(r"\w+|[^\w\s]")


def count_text_tokens(text: str) -> int:
    """Tokens of a text: runs of word characters, and each other non-space character.

    Every token is at least one character, so the count never exceeds the UTF-8 byte length.
    """
    return sum(1 for _ in _TOKEN_RE.finditer(text))


@attrs.frozen
class PromptShape:
    """What a prompt is made of, for the deterministic prompt_eval_count.

    prompt_eval_count = sum(count_text_tokens(t) for every counted text)
                        + TEMPLATE_TOKENS_PER_MESSAGE * (len(messages) + 1)   [if templated]
                        + tokens_per_image * images + context_tokens
    """

    # Texts per templated message (content, thinking, tool calls as compact JSON).
    messages: tuple[tuple[str, ...], ...] = ()
    # Texts counted without a template wrapper (raw prompt, generate suffix, tool schemas).
    extra: tuple[str, ...] = ()
    images: int = 0
    context_tokens: int = 0
    templated: bool = True

    def texts(self) -> Iterator[str]:
        for message in self.messages:
            yield from message
        yield from self.extra

    def _allowance(self, tokens_per_image: int) -> int:
        template = TEMPLATE_TOKENS_PER_MESSAGE * (len(self.messages) + 1) if self.templated else 0
        return template + tokens_per_image * self.images + self.context_tokens

    def prompt_eval_count(self, tokens_per_image: int = 0) -> int:
        tokens = sum(count_text_tokens(text) for text in self.texts())
        return tokens + self._allowance(tokens_per_image)

    def upper_bound(self, tokens_per_image: int = 0) -> int:
        """UTF-8 bytes of every counted text plus the template, image and context allowance."""
        size = sum(len(text.encode("utf-8", "surrogatepass")) for text in self.texts())
        return size + self._allowance(tokens_per_image)

    def seed(self) -> int:
        joined = "\x00".join(self.texts())
        return zlib.crc32(joined.encode("utf-8", "surrogatepass"))


def embed_prompt_tokens(inputs: Sequence[str]) -> int:
    """prompt_eval_count of /api/embed: the sum over inputs of their tokens plus [CLS]/[SEP]."""
    return sum(EMBED_TOKENS_PER_INPUT + count_text_tokens(text) for text in inputs)
