"""The request body: bounded, parsed as Ollama parses it, inspected and rewritten.

Ollama (Go encoding/json) matches JSON keys case-insensitively, so `{"MODEL": "x"}` names the model.
The gateway reads keys the same way and refuses bodies whose keys collide by case (two spellings
of one field), because Go and other readers may disagree on which one wins. Rewrites (the clamped
completion limit, the injected usage request) replace the client's spelling of a key.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson

from stream_proxy.exceptions import Refused

MAX_DEPTH = 64


def _check(value: Any, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise Refused(400, "request body is nested too deeply")
    if isinstance(value, dict):
        seen: set[str] = set()
        for key, item in value.items():
            folded = key.casefold()
            if folded in seen:
                raise Refused(400, f"request body has keys that differ only in case: {key!r}")
            seen.add(folded)
            _check(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check(item, depth + 1)


def parse(raw: bytes) -> dict[str, Any]:
    """A JSON object, checked for case collisions; Refused(400) otherwise."""
    if not raw.strip():
        raise Refused(400, "missing request body")
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Refused(400, "request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise Refused(400, "request body must be a JSON object")
    _check(document)
    return document


def get(obj: Any, name: str) -> Any:
    """A field of a JSON object by case-insensitive name (None if absent or not an object)."""
    if not isinstance(obj, dict):
        return None
    if name in obj:
        return obj[name]
    folded = name.casefold()
    for key, value in obj.items():
        if key.casefold() == folded:
            return value
    return None


def put(obj: dict[str, Any], name: str, value: Any) -> None:
    """Set a field, replacing whatever spelling the client used."""
    folded = name.casefold()
    for key in [k for k in obj if k.casefold() == folded]:
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


@attrs.define
class Body:
    """A parsed body and whether it was changed (then it is re-serialised for Ollama)."""

    document: dict[str, Any]
    raw: bytes
    changed: bool = False

    def encoded(self) -> bytes:
        """The bytes to forward: the client's own unless something was rewritten."""
        return orjson.dumps(self.document) if self.changed else self.raw
