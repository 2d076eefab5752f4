"""Go encoding/json: output byte for byte, decoding, and binding to Go structs."""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable
from decimal import Decimal
from typing import Any, Final, Literal

import attrs

DEFAULT_KEEP_ALIVE_NS: Final = 5 * 60 * 1_000_000_000


FOREVER_NS: Final = 2**63 - 1


_GO_HTML_ESCAPES: Final = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


_GO_HTML_RE: Final = re.compile("[<>&\u2028\u2029]")


_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")


@attrs.frozen
class Float32s:
    """A []float32 for go_json: each value is written in float32's shortest form."""

    values: tuple[float, ...]


def _go_string(text: str) -> str:
    out = json.dumps(text, ensure_ascii=False)
    if _GO_HTML_RE.search(out):
        out = _GO_HTML_RE.sub(lambda m: _GO_HTML_ESCAPES[m.group()], out)
    return out


def _to_float32(value: float) -> float:
    result: float = struct.unpack("<f", struct.pack("<f", value))[0]
    return result


def _shortest_float32(value: float) -> str:
    for precision in range(9):
        text = f"{value:.{precision}e}"
        if _to_float32(float(text)) == value:
            return text
    return f"{value:.8e}"


def go_float(value: float, bits: Literal[32, 64] = 64) -> str:
    """A float as Go's encoding/json writes it (shortest round-trip, 'e' only when tiny or huge)."""
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"json: unsupported value: {value!r}")
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    digits = repr(value) if bits == 64 else _shortest_float32(value)
    number = Decimal(digits).normalize()
    magnitude = abs(value)
    if magnitude < 1e-6 or magnitude >= 1e21:
        sign, mantissa_digits, raw_exponent = number.as_tuple()
        exponent = int(raw_exponent)  # finite, so never 'n', 'N' or 'F'
        text = "".join(str(d) for d in mantissa_digits)
        sci_exponent = exponent + len(text) - 1
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        exp_sign = "-" if sci_exponent < 0 else "+"
        exp_digits = str(abs(sci_exponent))
        if exp_sign == "+" and len(exp_digits) < 2:
            exp_digits = "0" + exp_digits
        return f"{'-' if sign else ''}{mantissa}e{exp_sign}{exp_digits}"
    return format(number, "f")


def _encode(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_go_string(value))
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(go_float(value))
    elif isinstance(value, Float32s):
        out.append("[" + ",".join(go_float(v, 32) for v in value.values) + "]")
    elif isinstance(value, dict):
        out.append("{")
        first = True
        for key, item in value.items():
            if not first:
                out.append(",")
            first = False
            out.append(_go_string(key))
            out.append(":")
            _encode(item, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"go_json cannot encode {type(value).__name__}")


def go_json(value: Any) -> bytes:
    """Compact JSON exactly as Go's json.Marshal writes it (key order kept, HTML escaped)."""
    out: list[str] = []
    _encode(value, out)
    text = "".join(out)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: Go writes U+FFFD for invalid UTF-8
        return _SURROGATE_RE.sub("\ufffd", text).encode("utf-8")


class EmptyBody(Exception):
    """The body held no JSON value (Go's io.EOF from the decoder)."""


class BindError(Exception):
    """A body Go's encoding/json refuses; the message is Go's error text."""


class GoObject(dict[str, Any]):
    """A JSON object as Go binds it to a struct: keys match case-insensitively, last one wins.

    The dict itself keeps the exact keys (Go maps such as `options` are case-sensitive);
    `folded` is the struct view.
    """

    __slots__ = ("folded",)

    def __init__(self, pairs: Iterable[tuple[str, Any]] = ()) -> None:
        items = list(pairs)
        super().__init__(items)
        self.folded: dict[str, Any] = {key.lower(): value for key, value in items}


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


_DECODER: Final = json.JSONDecoder(object_pairs_hook=GoObject, parse_constant=_reject_constant)


def parse_go_json(body: bytes) -> Any:
    """The first JSON value of `body`, as json.NewDecoder(...).Decode reads it."""
    text = body.decode("utf-8", "replace").lstrip(" \t\r\n")
    if not text:
        raise EmptyBody
    try:
        value, _end = _DECODER.raw_decode(text)
    except json.JSONDecodeError as e:
        if e.pos >= len(text) or e.msg.startswith("Unterminated string"):
            raise BindError("unexpected EOF") from None
        char = text[e.pos]
        where = "looking for beginning of value"
        if e.msg.startswith("Expecting property name"):
            where = "looking for beginning of object key string"
        elif e.msg.startswith("Expecting ',' delimiter"):
            where = "after object key:value pair" if text.startswith("{") else "after array element"
        elif e.msg.startswith("Expecting ':' delimiter"):
            where = "after object key"
        raise BindError(f"invalid character {char!r} {where}") from None
    except ValueError:
        raise BindError("invalid character 'N' looking for beginning of value") from None
    return value


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def bind_root(value: Any, go_type: str) -> GoObject:
    """The request object, or Go's error for a body that is not an object (null binds as {})."""
    if value is None:
        return GoObject()
    if not isinstance(value, GoObject):
        raise BindError(f"json: cannot unmarshal {_json_kind(value)} into Go value of type {go_type}")
    return value


@attrs.frozen
class Binder:
    """Reads typed fields of one Go struct, failing with encoding/json's UnmarshalTypeError text."""

    struct: str
    path: str = ""

    def nested(self, struct: str, field: str) -> Binder:
        return Binder(struct, f"{self.path}{field}.")

    def _error(self, value: Any, key: str, go_type: str) -> BindError:
        kind = _json_kind(value)
        if kind == "number" and go_type == "int":
            kind = f"number {value!r}"
        return BindError(
            f"json: cannot unmarshal {kind} into Go struct field "
            f"{self.struct}.{self.path}{key} of type {go_type}"
        )

    def string(self, obj: GoObject, key: str) -> str | None:
        value = obj.folded.get(key)
        if value is None or isinstance(value, str):
            return value
        raise self._error(value, key, "string")

    def boolean(self, obj: GoObject, key: str) -> bool | None:
        value = obj.folded.get(key)
        if value is None or isinstance(value, bool):
            return value
        raise self._error(value, key, "bool")

    def integer(self, obj: GoObject, key: str) -> int | None:
        value = obj.folded.get(key)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise self._error(value, key, "int")

    def array(self, obj: GoObject, key: str, go_type: str) -> list[Any] | None:
        value = obj.folded.get(key)
        if value is None or isinstance(value, list):
            return value
        raise self._error(value, key, go_type)

    def object(self, obj: GoObject, key: str, go_type: str) -> GoObject | None:
        value = obj.folded.get(key)
        if value is None or isinstance(value, GoObject):
            return value
        raise self._error(value, key, go_type)

    def element(self, value: Any, key: str, go_type: str) -> GoObject:
        """One element of an array of structs (null binds as the zero struct)."""
        if value is None:
            return GoObject()
        if isinstance(value, GoObject):
            return value
        raise self._error(value, key, go_type)


_DURATION_UNITS: Final = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # the micro sign, as Go also accepts it
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


_DURATION_PART: Final = re.compile(r"(\d*)(\.\d*)?([^\d.]*)")


def parse_go_duration(text: str) -> int:
    """time.ParseDuration in nanoseconds, with Go's error messages."""
    quoted = json.dumps(text)
    rest = text
    negative = False
    if rest[:1] in ("-", "+"):
        negative = rest[0] == "-"
        rest = rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise BindError(f"time: invalid duration {quoted}")
    total = 0.0
    while rest:
        match = _DURATION_PART.match(rest)
        if match is None:  # the pattern matches the empty string, so only for safety
            raise BindError(f"time: invalid duration {quoted}")
        whole, fraction, unit = match.groups()
        if not whole and (not fraction or fraction == "."):
            raise BindError(f"time: invalid duration {quoted}")
        if not unit:
            raise BindError(f"time: missing unit in duration {quoted}")
        if unit not in _DURATION_UNITS:
            raise BindError(f"time: unknown unit {json.dumps(unit)} in duration {quoted}")
        total += float((whole or "0") + (fraction or "")) * _DURATION_UNITS[unit]
        rest = rest[match.end() :]
    nanos = int(total)
    return -nanos if negative else nanos


def bind_keep_alive(obj: GoObject) -> int | None:
    """api.Duration: seconds as a number or a Go duration string; negative means forever."""
    value = obj.folded.get("keep_alive")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        go_type = {"bool": "bool", "array": "[]interface {}", "object": "map[string]interface {}"}
        raise BindError(f"Unsupported type: '{go_type[_json_kind(value)]}'")
    nanos = parse_go_duration(value) if isinstance(value, str) else int(value * 1_000_000_000)
    return FOREVER_NS if nanos < 0 else nanos


def _go_type_name(value: Any) -> str:
    """fmt's %T of a decoded JSON value."""
    if value is None:
        return "<nil>"
    return {
        "bool": "bool",
        "number": "float64",
        "string": "string",
        "array": "[]interface {}",
        "object": "map[string]interface {}",
    }[_json_kind(value)]


def _compact_json(value: Any) -> str:
    """Tool schemas and tool calls as the template would render them (no HTML escaping)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
