"""The request body: bounded, parsed as Ollama's Go `encoding/json` reads it, inspected, rewritten.

Go matches an object key to a struct field case-insensitively: ASCII letters fold, and of all other
characters only U+017F (long s) folds to `s` and U+212A (Kelvin sign) to `k`, because every Ollama
field name is ASCII (docs/OLLAMA.md#go-json-decoding). Python's `str.casefold()` folds far more
(sharp s, the st and fi ligatures…) and would see fields Go never sees. The gateway folds as Go
does, and refuses bodies Go and the gateway could read differently: a key repeated in one object
(Go merges repeated objects, other readers keep the last) and two spellings of one field. NaN and
Infinity (not JSON), invalid UTF-8 and lone surrogates are refused too. What is forwarded is the
document that was checked, re-serialised, never the client's bytes, so no parser differential can
reach Ollama.
"""

from __future__ import annotations

import json
import math
from typing import Any

import attrs
import orjson

from stream_proxy.exceptions import Refused

MAX_DEPTH = 64
# Values (of every kind, keys not counted) in one body: a `context` of 262,144 token ids fits; 660,000
# empty messages, which cost seconds of parsing, do not.
MAX_VALUES = 300_000
# Elements of `messages` or `input` (conversation turns, input items, embedding inputs).
MAX_ITEMS = 10_000
_GO_FOLDS = str.maketrans({"\u017f": "s", "\u212a": "k"})  # long s, Kelvin sign


def fold(name: str) -> str:
    """A key as Go compares it with an ASCII field name: ASCII lower-cased, U+017F to s, U+212A to
    k, nothing else."""
    if name.isascii():
        return name.lower()
    folded = name.translate(_GO_FOLDS)
    return "".join(c.lower() if c.isascii() else c for c in folded)


class GoObject(dict[str, Any]):
    """A JSON object of the body with its keys folded once: `index` maps each folded key to the key
    as the client spelled it, so a lookup by Go's matching costs one fold, not one per key. Kept
    right by `put`, the only way the gateway changes a body's fields."""

    __slots__ = ("index",)
    index: dict[str, str]


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """One JSON object, refused when a key repeats or two keys are one field to Go."""
    document = GoObject(pairs)
    document.index = {key if key.isascii() and key.islower() else fold(key): key for key in document}
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise Refused(400, f"request body repeats the key {key!r}")
            seen.add(key)
    if len(document.index) != len(document):
        raise Refused(400, "request body has keys that differ only in case (one field spelled twice)")
    return document


def _constant(name: str) -> Any:
    raise Refused(400, f"request body is not valid JSON ({name} is not a JSON number)")


def _float(literal: str) -> float:
    """A JSON number as Go's float64: one that overflows it is an error, never infinity."""
    value = float(literal)
    if not math.isfinite(value):
        raise Refused(400, f"request body is not valid JSON (the number {literal[:40]} overflows)")
    return value


def _depth(value: dict[str, Any] | list[Any], depth: int = 0) -> None:
    """Refuse a value nested deeper than MAX_DEPTH (a scalar inside counts as one more level)."""
    if depth > MAX_DEPTH:
        raise Refused(400, "request body is nested too deeply")
    for item in value.values() if isinstance(value, dict) else value:
        if isinstance(item, (dict, list)):
            _depth(item, depth + 1)
        elif depth + 1 > MAX_DEPTH:
            raise Refused(400, "request body is nested too deeply")


def values_bound(raw: bytes) -> int:
    """How many values the JSON text can hold, from above, without parsing it (a few passes of
    C-speed byte counting): each value but the first follows a comma or opens a container. Commas
    and brackets inside strings count only when the quick count is over the limit: then strings are
    cut out (escaped backslashes and quotes first, so every quote left delimits a string)."""
    quick = raw.count(b",") + raw.count(b"{") + raw.count(b"[") + 1
    if quick <= MAX_VALUES:
        return quick
    cleaned = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    strings = cleaned.count(b'"') // 2
    if strings > 2 * MAX_VALUES:  # a key per member at most: more strings than twice the values
        return strings
    outside = b"".join(cleaned.split(b'"')[0::2])
    return outside.count(b",") + outside.count(b"{") + outside.count(b"[") + 1


def _items(document: dict[str, Any]) -> None:
    for name in ("messages", "input"):
        value = get(document, name)
        if isinstance(value, list) and len(value) > MAX_ITEMS:
            raise Refused(400, f"request body has more than {MAX_ITEMS} {name}")


def parse(raw: bytes) -> dict[str, Any]:
    """A JSON object as Go reads it; Refused(400) otherwise (also for more than MAX_VALUES values,
    MAX_ITEMS messages or input items, or MAX_DEPTH levels)."""
    if not raw.strip():
        raise Refused(400, "missing request body")
    if values_bound(raw) > MAX_VALUES:
        raise Refused(400, f"request body has more than {MAX_VALUES} JSON values")
    try:
        # Decoded strictly as UTF-8 first: json.loads would accept UTF-16 and a byte order mark
        # in bytes, which Go's decoder refuses.
        text = raw.decode("utf-8")
        document = json.loads(text, object_pairs_hook=_object, parse_constant=_constant, parse_float=_float)
    except UnicodeDecodeError:
        raise Refused(400, "request body is not valid UTF-8") from None
    except RecursionError:
        raise Refused(400, "request body is nested too deeply") from None
    except ValueError:
        raise Refused(400, "request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise Refused(400, "request body must be a JSON object")
    _depth(document)
    _items(document)
    return document


def get(obj: Any, name: str) -> Any:
    """A field of a JSON object by Go's case-insensitive matching (None if absent or not an object)."""
    if not isinstance(obj, dict):
        return None
    if name in obj:
        return obj[name]
    folded = fold(name)
    if isinstance(obj, GoObject):
        key = obj.index.get(folded)
        return None if key is None else obj.get(key)
    for key, value in obj.items():
        if fold(key) == folded:
            return value
    return None


def option(document: dict[str, Any], name: str) -> Any:
    """One of `options`, a Go `map[string]any` whose keys Ollama matches exactly (no folding)."""
    options = get(document, "options")
    return options.get(name) if isinstance(options, dict) else None


def put(obj: dict[str, Any], name: str, value: Any) -> None:
    """Set a field, replacing whatever spelling the client used."""
    folded = fold(name)
    if isinstance(obj, GoObject):
        old = obj.index.pop(folded, None)
        if old is not None:
            del obj[old]
        obj[name] = value
        obj.index[folded] = name
        return
    for key in [k for k in obj if fold(k) == folded]:
        del obj[key]
    obj[name] = value


def child(obj: dict[str, Any], name: str) -> dict[str, Any]:
    """A nested object by case-insensitive name, created when absent; Refused if not an object."""
    value = get(obj, name)
    if value is None:
        value = {}
        put(obj, name, value)
    if not isinstance(value, dict):
        raise Refused(400, f"{name} must be an object")
    return value


def serialise(document: dict[str, Any]) -> bytes:
    """The document as JSON; Refused(400) for what JSON cannot carry (lone surrogates, integers
    beyond 64 bits, which no Ollama field holds either)."""
    try:
        return orjson.dumps(document)
    except (orjson.JSONEncodeError, TypeError):
        raise Refused(400, "request body holds a string or number Ollama cannot read") from None


@attrs.define
class Body:
    """A parsed body; what is forwarded is always this document, re-serialised."""

    document: dict[str, Any]
    raw: bytes
    changed: bool = False
    _checked: bytes | None = attrs.field(default=None, alias="checked")

    @classmethod
    def read(cls, raw: bytes) -> Body:
        """Parse and re-serialise once (so a body JSON cannot carry is refused before anything else)."""
        document = parse(raw)
        return cls(document=document, raw=raw, checked=serialise(document))

    def encoded(self) -> bytes:
        """The bytes to forward: the checked document (re-serialised again when rewritten)."""
        if self.changed or self._checked is None:
            return serialise(self.document)
        return self._checked
