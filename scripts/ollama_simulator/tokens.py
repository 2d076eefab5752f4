"""The simulator's deterministic tokenizer: counting, token ids and detokenization.

Two modes (the `tokenizer` setting). "words": a token per `<|...|>` special marker, per run
of word characters and per other non-space character, whitespace riding along with its
neighbour (a text of only whitespace is one token). "bytes": a token per UTF-8 byte, the
worst case of any byte-level tokenizer. Either way a prompt the runner evaluates costs one
more token, the BOS llama-server adds (tokenize with add_special).

Token ids are what /api/generate returns as `context` and accepts back: in bytes mode the
byte values 0-255, in words mode ids from 256 up that a per-simulator vocabulary assigns to
each distinct piece the first time it is tokenized. Detokenizing maps both back (ids the
vocabulary never issued decode to nothing), so a context round-trips to its text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final, Literal

import attrs

TokenizerMode = Literal["words", "bytes"]


BOS_TOKENS: Final = 1


EMBED_TOKENS_PER_INPUT: Final = 2


_PIECE_RE: Final = re.compile(r"\s*(?:<\|[^\s|<>]+\|>|\w+|[^\w\s])\s*|\s+")


_FIRST_WORD_ID: Final = 256


def pieces(text: str) -> list[str]:
    """The words-mode tokens of a text, whitespace attached (they concatenate back to it)."""
    return _PIECE_RE.findall(text)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def count_text_tokens(text: str, mode: TokenizerMode = "words") -> int:
    """Tokens of a text without BOS; never more than its UTF-8 byte length."""
    if mode == "bytes":
        return len(_utf8(text))
    return len(pieces(text))


def embed_prompt_tokens(inputs: Sequence[str]) -> int:
    """prompt_eval_count of /api/embed: the sum over inputs of their tokens plus [CLS]/[SEP]."""
    return sum(EMBED_TOKENS_PER_INPUT + count_text_tokens(text) for text in inputs)


@attrs.define
class Vocabulary:
    """The ids words-mode tokens get, issued in first-seen order."""

    _ids: dict[str, int] = attrs.field(factory=dict)
    _pieces: list[str] = attrs.field(factory=list)

    def tokenize(self, text: str, mode: TokenizerMode) -> list[int]:
        """Token ids of a text without BOS (llama-server's /tokenize without add_special)."""
        if mode == "bytes":
            return list(_utf8(text))
        ids: list[int] = []
        for piece in pieces(text):
            found = self._ids.get(piece)
            if found is None:
                found = _FIRST_WORD_ID + len(self._pieces)
                self._ids[piece] = found
                self._pieces.append(piece)
            ids.append(found)
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of token ids (llama-server's /detokenize); invalid UTF-8 becomes U+FFFD."""
        out = bytearray()
        for token in ids:
            if 0 <= token < _FIRST_WORD_ID:
                out.append(token)
            elif 0 <= token - _FIRST_WORD_ID < len(self._pieces):
                out += _utf8(self._pieces[token - _FIRST_WORD_ID])
        return out.decode("utf-8", "replace")
