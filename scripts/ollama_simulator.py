"""A fake Ollama v0.33.0-rc2 that answers byte for byte like the real one, deterministically.

Tests and benchmarks run against it instead of a real Ollama. It follows
`docs/ollama-protocol.md`: gin routing (404/405 texts, trailing-slash redirects), Go
`encoding/json` binding and output, NDJSON and SSE framing, the OpenAI-compatible quirks,
and the error bodies. It also records every request it receives, so a test can prove
what reached "Ollama" (and what never did), and it exposes that record and its settings
under `/_sim/`, a path prefix real Ollama never serves.

Generated text is a fixed word list cycled from a seed derived from the prompt, one token
per chunk. `prompt_eval_count` is a tokenizer estimate that never exceeds the UTF-8 byte
length of the counted prompt text plus `TEMPLATE_TOKENS_PER_MESSAGE` per message and one
more for the assistant turn; see `PromptShape`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import ipaddress
import json
import math
import os
import random
import re
import signal
import socket
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import attrs
import cattrs
from aiohttp import web

OLLAMA_VERSION: Final = "0.33.0-rc2"
DEFAULT_MODELS: Final = ("llama3.2:latest", "qwen3:8b", "all-minilm:latest")

# Every templated message (a chat message, or generate's system and prompt) costs this many
# tokens on top of its text, and the open assistant turn costs it once more. The gateway
# reserves "UTF-8 bytes of the prompt text + allowance"; prompt_eval_count stays within
# bytes + TEMPLATE_TOKENS_PER_MESSAGE * (messages + 1) (+ tokens_per_image per image, +
# len(context) on /api/generate).
TEMPLATE_TOKENS_PER_MESSAGE: Final = 4
# Each embedding input is wrapped in two special tokens ([CLS] ... [SEP]).
EMBED_TOKENS_PER_INPUT: Final = 2

CONTROL_PREFIX: Final = "/_sim/"
# Real Ollama reads native bodies without any limit; this only protects the test machine.
MAX_BODY_BYTES: Final = 1 << 30

DEFAULT_HOST: Final = "registry.ollama.ai"
DEFAULT_NAMESPACE: Final = "library"
DEFAULT_TAG: Final = "latest"
DEFAULT_KEEP_ALIVE_NS: Final = 5 * 60 * 1_000_000_000
FOREVER_NS: Final = 2**63 - 1
# modified_at of every installed model: fixed so listings are byte-stable.
MODEL_MODIFIED_AT_NS: Final = 1_785_585_600_000_000_000  # 2026-08-01T12:00:00Z

CT_GIN_JSON: Final = "application/json; charset=utf-8"
CT_JSON: Final = "application/json"
CT_NDJSON: Final = "application/x-ndjson"
CT_SSE: Final = "text/event-stream"
CT_TEXT: Final = "text/plain"

MSG_MISSING_BODY: Final = "missing request body"
MSG_MODEL_REQUIRED: Final = "model is required"
MSG_INVALID_NAME: Final = "invalid model name"
MSG_QUEUE_FULL: Final = "server busy, please try again.  maximum pending requests exceeded"
MSG_CLOUD_DISABLED: Final = "ollama cloud is disabled: remote model is unavailable"
MSG_RAW_CONFLICT: Final = "raw mode does not support template, system, or context"

_CONTENT_WORDS: Final = (
    " the", " simulated", " model", " answers", " every", " prompt", " with", " the",
    " same", " deterministic", " words", ",", " one", " token", " per", " chunk", ".",
    " Tokens", " arrive", " at", " a", " steady", " pace", " and", " stop", " cleanly", ".",
)  # fmt: skip
_THINKING_WORDS: Final = (
    " Let", " me", " think", " about", " this", " step", " by", " step", ".", " Okay", ",",
)  # fmt: skip


# --------------------------------------------------------------------------- settings


def _at_least_zero(_instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _model_names(_instance: object, _attribute: attrs.Attribute[Any], value: Any) -> None:
    bad = [name for name in value if parse_model_name(name) is None or is_cloud_model(name)]
    if bad:
        raise ValueError(f"models: invalid model names {bad!r}")


@attrs.frozen(kw_only=True)
class SimulatorSettings:
    """How the simulated Ollama behaves; replaceable at runtime through `POST /_sim/settings`."""

    # Generation pace: tokens per second after the first (0 = as fast as possible) and the
    # delay before the first chunk (model load plus prompt processing).
    tokens_per_second: float = attrs.field(default=0.0, validator=_at_least_zero)
    time_to_first_token: float = attrs.field(default=0.0, validator=_at_least_zero)
    # Content tokens of a generation that sets no limit (its natural end, done_reason "stop").
    completion_tokens: int = attrs.field(default=12, validator=_at_least_zero)
    # Thinking tokens emitted first by thinking-capable models (qwen3, ...) unless think=false.
    thinking_tokens: int = attrs.field(default=4, validator=_at_least_zero)
    # Fail after this many token chunks (at most all of them: the error then replaces the
    # final chunk): native streams get an {"error"} line and no done chunk, OpenAI streams
    # one junk chunk and no [DONE]; 0 fails before the first chunk (a real 500), as does any
    # value with stream:false. None = never fail.
    fail_after_chunks: int | None = attrs.field(default=None, validator=_at_least_zero)
    failure_message: str = "an error was encountered while running the model: unexpected EOF"
    # Every inference request gets 503 "server busy" (OLLAMA_MAX_QUEUE exceeded).
    queue_full: bool = False
    # Installed models (local only: cloud names are always refused, as with OLLAMA_NO_CLOUD=1).
    models: tuple[str, ...] = attrs.field(default=DEFAULT_MODELS, converter=tuple, validator=_model_names)
    version: str = OLLAMA_VERSION
    # When non-empty, content tokens are these strings (cycled) instead of the word list.
    reply: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    embedding_dimensions: int = attrs.field(default=384, validator=_at_least_zero)
    # Prompt tokens per attached image (real vision models use hundreds; 0 keeps the
    # text-only bound exact).
    tokens_per_image: int = attrs.field(default=0, validator=_at_least_zero)
    # The DNS-rebinding Host check Ollama applies when it listens on loopback, and the CORS
    # Origin check.
    host_check: bool = True
    cors_check: bool = True
    # Requests kept for `/_sim/requests` (oldest dropped first); benchmarks keep few.
    max_records: int = attrs.field(default=100_000, validator=_at_least_zero)


_settings_converter = cattrs.Converter(forbid_extra_keys=True)


def settings_to_json(settings: SimulatorSettings) -> dict[str, Any]:
    """The settings as plain JSON (tuples become lists)."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in attrs.asdict(settings).items()
    }


def settings_with(settings: SimulatorSettings, patch: dict[str, Any]) -> SimulatorSettings:
    """A copy of `settings` with the fields named in `patch` replaced; unknown keys are errors."""
    merged = {**settings_to_json(settings), **patch}
    return _settings_converter.structure(merged, SimulatorSettings)


# --------------------------------------------------------------------------- clock


class Clock(Protocol):
    """Wall time for `created_at` stamps and a monotonic clock for the reported durations."""

    def time_ns(self) -> int: ...

    def monotonic_ns(self) -> int: ...


@attrs.frozen
class SystemClock:
    """The real clocks."""

    def time_ns(self) -> int:
        return time.time_ns()

    def monotonic_ns(self) -> int:
        return time.perf_counter_ns()


@attrs.define
class FakeClock:
    """A clock for byte-exact tests.

    Each `time_ns()` call returns the current wall time and then advances it by `wall_tick_ns`;
    `monotonic_ns()` likewise with `monotonic_tick_ns`. The simulator reads the wall clock once
    when a request arrives (the record's `received_at`), then once per emitted chunk (and once
    per load/unload answer); it reads the monotonic clock exactly four times per generation
    (start, model loaded, first token, end), so with the default ticks every generation reports
    load_duration = prompt_eval_duration = eval_duration = 1 ms and total_duration = 3 ms.
    """

    start_ns: int
    wall_tick_ns: int = 0
    monotonic_tick_ns: int = 1_000_000
    _wall: int = attrs.field(init=False, default=0)
    _monotonic: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._wall = self.start_ns

    def time_ns(self) -> int:
        now = self._wall
        self._wall += self.wall_tick_ns
        return now

    def monotonic_ns(self) -> int:
        now = self._monotonic
        self._monotonic += self.monotonic_tick_ns
        return now


def rfc3339nano(epoch_ns: int) -> str:
    """Go's time.RFC3339Nano in UTC: fractional seconds with trailing zeros trimmed."""
    seconds, fraction = divmod(epoch_ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if fraction:
        stamp += "." + f"{fraction:09d}".rstrip("0")
    return stamp + "Z"


# --------------------------------------------------------------------------- Go JSON output

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


# --------------------------------------------------------------------------- Go JSON input


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


# --------------------------------------------------------------------------- model names


_MODEL_PART: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,79}")
_NAMESPACE_PART: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,79}")
_HOST_PART: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,349}")


@attrs.frozen
class ModelName:
    """`[host/][namespace/]model[:tag]` with Ollama's defaults filled in."""

    host: str
    namespace: str
    model: str
    tag: str

    @property
    def key(self) -> str:
        """The case-insensitive identity used to match installed models."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}".lower()

    def display(self) -> str:
        """Go's Name.DisplayShortest: `llama3.2:latest`, `ns/m:tag`, `host/ns/m:tag`."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"


def parse_model_name(raw: str) -> ModelName | None:
    """Parse a model name per types/model/name.go; None when the grammar rejects it."""
    text = raw.strip()
    text = text.split("@", 1)[0]
    tag = DEFAULT_TAG
    slash, colon = text.rfind("/"), text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
    parts = text.split("/")
    if len(parts) > 3:
        return None
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    host = parts[-3] if len(parts) == 3 else DEFAULT_HOST
    valid = (
        _MODEL_PART.fullmatch(model)
        and _MODEL_PART.fullmatch(tag)
        and _NAMESPACE_PART.fullmatch(namespace)
        and _HOST_PART.fullmatch(host)
    )
    return ModelName(host, namespace, model, tag) if valid else None


def is_cloud_model(raw: str) -> bool:
    """`:cloud` names and `-cloud` tags are served by ollama.com (§2 hidden side effects)."""
    name = raw.strip()
    if name.endswith(":local"):
        return False
    if name.endswith(":cloud"):
        return True
    slash, colon = name.rfind("/"), name.rfind(":")
    return colon > slash and name[colon + 1 :].endswith("-cloud")


def _local_name(raw: str) -> str:
    """The name with a `:local` source suffix removed; `:local` plus cloud is a 400."""
    name = raw.strip()
    if name.endswith(":local"):
        base = name[: -len(":local")]
        if is_cloud_model(base):
            raise ApiError(400, f"use either :local or :cloud, not both: {json.dumps(name)}")
        return base
    return name


@attrs.frozen
class ModelEntry:
    """One installed model, with the details Ollama lists for it."""

    name: ModelName
    family: str
    parameter_size: str
    quantization_level: str
    size: int
    capabilities: tuple[str, ...]
    modified_at_ns: int = MODEL_MODIFIED_AT_NS

    @property
    def display(self) -> str:
        return self.name.display()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.key.encode()).hexdigest()

    @property
    def thinks(self) -> bool:
        return "thinking" in self.capabilities

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


_THINKING_FAMILIES: Final = ("qwen3", "deepseek-r1", "gpt-oss", "magistral", "phi4-reasoning")
_EMBEDDING_MARKERS: Final = ("minilm", "embed", "bge", "e5-")


def model_entry(raw: str) -> ModelEntry:
    """Catalog details for an installed model name, guessed from the name like Ollama shows them."""
    name = parse_model_name(raw)
    if name is None:
        raise ValueError(f"invalid model name: {raw!r}")
    base = name.model.lower()
    if any(marker in base for marker in _EMBEDDING_MARKERS):
        return ModelEntry(name, "bert", "23M", "F16", 45_960_996, ("embedding",))
    family_match = re.match(r"[a-z]+", base)
    family = family_match.group() if family_match else "llama"
    if base.startswith(_THINKING_FAMILIES):
        caps = ("completion", "tools", "thinking")
        return ModelEntry(name, family, "8.2B", "Q4_K_M", 5_225_388_164, caps)
    return ModelEntry(name, family, "3.2B", "Q4_K_M", 2_019_393_189, ("completion", "tools"))


# --------------------------------------------------------------------------- tokens

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


def _compact_json(value: Any) -> str:
    """Tool schemas and tool calls as the template would render them (no HTML escaping)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@attrs.frozen
class Piece:
    """One generated token."""

    text: str
    thinking: bool


def _word(words: Sequence[str], seed: int, index: int) -> str:
    word = words[(seed + index) % len(words)]
    return word.lstrip() if index == 0 else word


@attrs.frozen
class Plan:
    """The tokens one generation will produce and why it stops."""

    total: int
    thinking: int
    done_reason: str
    seed: int
    reply: tuple[str, ...] = ()

    def piece(self, index: int) -> Piece:
        if index < self.thinking:
            return Piece(_word(_THINKING_WORDS, self.seed, index), thinking=True)
        position = index - self.thinking
        if self.reply:
            return Piece(self.reply[position % len(self.reply)], thinking=False)
        return Piece(_word(_CONTENT_WORDS, self.seed, position), thinking=False)

    def pieces(self) -> Iterator[Piece]:
        return (self.piece(index) for index in range(self.total))


def plan_generation(settings: SimulatorSettings, *, seed: int, think: bool, limit: int | None) -> Plan:
    """Thinking tokens (when on), then content tokens, cut at `limit` with done_reason length."""
    thinking = settings.thinking_tokens if think else 0
    natural = thinking + settings.completion_tokens
    if limit is not None and limit < natural:
        return Plan(limit, min(thinking, limit), "length", seed, settings.reply)
    return Plan(natural, thinking, "stop", seed, settings.reply)


def _embedding(text: str, dimensions: int) -> tuple[float, ...]:
    """A deterministic, L2-normalised float32 vector for one input."""
    raw: list[float] = []
    counter = 0
    while len(raw) < dimensions:
        block = hashlib.blake2b(f"{counter}:{text}".encode("utf-8", "surrogatepass")).digest()
        raw.extend((v / 2**31) - 1.0 for v in struct.unpack("<16I", block))
        counter += 1
    vector = raw[:dimensions]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return tuple(_to_float32(v / norm) for v in vector)


# --------------------------------------------------------------------------- recorder


@attrs.define
class GenerationRecord:
    """What one inference request produced."""

    endpoint: str
    model: str
    stream: bool
    completion_limit: int | None = None
    # running, completed, cancelled (client went away), failed (injected failure)
    outcome: str = "running"
    chunks_sent: int = 0
    tokens_sent: int = 0
    done_reason: str | None = None
    # The counts as reported to the client (None when no final chunk/usage carried them).
    prompt_eval_count: int | None = None
    eval_count: int | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class RequestRecord:
    """One request as it reached the simulator."""

    seq: int
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    received_at_ns: int
    status: int | None = None
    finished: bool = False
    generation: GenerationRecord | None = None
    # Every body byte the simulator wrote back, so tests can compare what a relay delivered.
    response_body: bytearray = attrs.field(factory=bytearray)

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in reversed(self.headers) if k.lower() == lowered), None)

    def json_body(self) -> Any:
        return json.loads(self.body) if self.body else None

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": [list(pair) for pair in self.headers],
            "body_text": self.body.decode("utf-8", "replace"),
            "body_base64": base64.b64encode(self.body).decode("ascii"),
            "received_at": rfc3339nano(self.received_at_ns),
            "status": self.status,
            "finished": self.finished,
            "generation": self.generation.to_json() if self.generation else None,
            "response_base64": base64.b64encode(bytes(self.response_body)).decode("ascii"),
        }


class Recorder:
    """Every request the simulator received (except `/_sim/` control calls), in order."""

    def __init__(self) -> None:
        self._records: list[RequestRecord] = []
        self._seq = 0
        self._changed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def records(self) -> list[RequestRecord]:
        return list(self._records)

    def generations(self) -> list[GenerationRecord]:
        return [r.generation for r in self._records if r.generation is not None]

    def clear(self) -> None:
        self._records.clear()

    def trim(self, keep: int) -> None:
        """Drop the oldest records beyond `keep`."""
        if len(self._records) > keep:
            del self._records[: len(self._records) - keep]

    def start(
        self,
        *,
        method: str,
        path: str,
        query: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        received_at_ns: int,
    ) -> RequestRecord:
        self._seq += 1
        record = RequestRecord(self._seq, method, path, query, tuple(headers), body, received_at_ns)
        self._records.append(record)
        return record

    async def finish(self, record: RequestRecord, status: int | None) -> None:
        record.status = status
        record.finished = True
        if record.generation is not None and record.generation.outcome == "running":
            record.generation.outcome = "cancelled"
        await self._notify()

    async def _notify(self) -> None:
        if self._changed is None or self._loop is not asyncio.get_running_loop():
            return
        async with self._changed:
            self._changed.notify_all()

    async def wait_finished(self, count: int) -> list[RequestRecord]:
        """Wait until at least `count` records are finished; returns all records.

        Callers bound the wait with `asyncio.timeout`.
        """
        loop = asyncio.get_running_loop()
        if self._changed is None or self._loop is not loop:
            self._changed, self._loop = asyncio.Condition(), loop
        changed = self._changed

        def enough() -> bool:
            return sum(1 for r in self._records if r.finished) >= count

        async with changed:
            await changed.wait_for(enough)
        return self.records


# --------------------------------------------------------------------------- state


class ApiError(Exception):
    """An error answer; the route's dialect decides its shape unless `native` forces Ollama's.

    `middleware` marks /v1 validation errors, which gin writes (charset, no newline).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        native: bool = False,
        middleware: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.native = native
        self.middleware = middleware
        self.extra = extra or {}


class ClientGone(Exception):
    """The client closed the connection; generation stops like Ollama's does."""


@attrs.define
class SimulatorState:
    """Mutable state of one simulator: settings, installed and loaded models, blobs."""

    initial: SimulatorSettings
    clock: Clock
    rng: random.Random
    settings: SimulatorSettings = attrs.field(init=False)
    models: dict[str, ModelEntry] = attrs.field(init=False, factory=dict)
    loaded: dict[str, int] = attrs.field(init=False, factory=dict)
    blobs: set[str] = attrs.field(init=False, factory=set)

    def __attrs_post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.apply(self.initial)
        self.loaded.clear()
        self.blobs.clear()

    def apply(self, settings: SimulatorSettings) -> None:
        changed_models = not hasattr(self, "settings") or settings.models != self.settings.models
        self.settings = settings
        if changed_models:
            self.models = {}
            for raw in settings.models:
                entry = model_entry(raw)
                self.models[entry.name.key] = entry

    def find(self, name: ModelName) -> ModelEntry | None:
        return self.models.get(name.key)

    def install(self, raw: str) -> None:
        entry = model_entry(raw)
        self.models[entry.name.key] = entry

    def touch(self, entry: ModelEntry, keep_alive_ns: int | None, now_monotonic: int) -> None:
        """The model was used: (re)load it with its keep_alive (0 unloads it at once).

        Expiry is kept on the monotonic clock so that loading reads no extra wall time.
        """
        keep = DEFAULT_KEEP_ALIVE_NS if keep_alive_ns is None else keep_alive_ns
        if keep == 0:
            self.loaded.pop(entry.name.key, None)
        else:
            self.loaded[entry.name.key] = now_monotonic + keep

    def touch_now(self, entry: ModelEntry, keep_alive_ns: int | None) -> None:
        self.touch(entry, keep_alive_ns, self.clock.monotonic_ns())


STATE_KEY: Final = web.AppKey("ollama_simulator_state", SimulatorState)
RECORDER_KEY: Final = web.AppKey("ollama_simulator_recorder", Recorder)
RECORD_KEY: Final = web.RequestKey("ollama_simulator_record", RequestRecord)


@attrs.define
class Call:
    """One request being answered: the request, a settings snapshot and its record."""

    request: web.Request
    state: SimulatorState
    settings: SimulatorSettings
    record: RequestRecord
    params: dict[str, str]

    async def body(self) -> bytes:
        return await self.request.read()

    async def json(self, go_type: str, *, missing: str = MSG_MISSING_BODY) -> GoObject:
        """The body bound like gin's ShouldBindJSON; `missing` is the empty-body message."""
        try:
            return bind_root(parse_go_json(await self.body()), go_type)
        except EmptyBody:
            raise ApiError(400, missing) from None
        except BindError as e:
            raise ApiError(400, str(e)) from None

    def now(self) -> str:
        return rfc3339nano(self.state.clock.time_ns())

    def begin(self, endpoint: str, model: str, *, stream: bool) -> GenerationRecord:
        generation = GenerationRecord(endpoint, model, stream)
        self.record.generation = generation
        return generation


# --------------------------------------------------------------------------- responses


def gin_json(status: int, payload: Any) -> web.Response:
    """gin's c.JSON: charset in the Content-Type, no trailing newline."""
    return web.Response(status=status, body=go_json(payload), headers={"Content-Type": CT_GIN_JSON})


def encoder_json(status: int, payload: Any) -> web.Response:
    """json.NewEncoder(w).Encode as the OpenAI writers use it: trailing newline, no charset."""
    body = go_json(payload) + b"\n"
    return web.Response(status=status, body=body, headers={"Content-Type": CT_JSON})


def plain(status: int, text: str, content_type: str = CT_TEXT) -> web.Response:
    return web.Response(status=status, body=text.encode(), headers={"Content-Type": content_type})


def empty(status: int = 200) -> web.Response:
    return web.Response(status=status)


def openai_error_body(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
        503: "overloaded_error",
    }.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


Dialect = Literal["native", "openai", "anthropic"]


def render_error(error: ApiError, dialect: Dialect) -> web.Response:
    """The error body in the caller's dialect, framed as the Go code that writes it frames it."""
    if error.native or dialect == "native":
        return gin_json(error.status, {"error": error.message, **error.extra})
    if dialect == "anthropic":
        return gin_json(error.status, anthropic_error_body(error.status, error.message))
    if error.middleware:
        return gin_json(error.status, openai_error_body(error.status, error.message))
    return encoder_json(error.status, openai_error_body(error.status, error.message))


@attrs.define
class Emitter:
    """Writes one stream, preparing the response only when the first chunk exists."""

    call: Call
    response: web.StreamResponse
    generation: GenerationRecord | None = None

    @property
    def started(self) -> bool:
        return self.response.prepared

    def _check(self) -> None:
        transport = self.call.request.transport
        if transport is None or transport.is_closing():
            raise ClientGone

    async def send(self, data: bytes) -> None:
        self._check()
        try:
            if not self.response.prepared:
                await self.response.prepare(self.call.request)
            await self.response.write(data)
        except ConnectionError as e:
            raise ClientGone from e
        self.call.record.response_body += data
        if self.generation is not None:
            self.generation.chunks_sent += 1


def _stream_response(content_type: str, **headers: str) -> web.StreamResponse:
    response = web.StreamResponse(status=200)
    response.headers["Content-Type"] = content_type
    response.headers.update(headers)
    return response


# --------------------------------------------------------------------------- generation


@attrs.frozen
class Job:
    """An inference request after validation: what to generate and how to count it."""

    kind: Literal["generate", "chat"]
    model: str  # as sent, echoed verbatim
    entry: ModelEntry
    shape: PromptShape
    think: bool
    limit: int | None
    keep_alive_ns: int | None = None
    raw: bool = False


@attrs.define
class Generation:
    """Runs one job's token loop with pacing, failure injection and disconnect detection."""

    call: Call
    job: Job
    record: GenerationRecord
    plan: Plan = attrs.field(init=False)
    prompt_eval_count: int = attrs.field(init=False)
    marks: list[int] = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        settings = self.call.settings
        self.plan = plan_generation(
            settings, seed=self.job.shape.seed(), think=self.job.think, limit=self.job.limit
        )
        self.prompt_eval_count = self.job.shape.prompt_eval_count(settings.tokens_per_image)
        self.record.completion_limit = self.job.limit
        clock = self.call.state.clock
        self.marks = [clock.monotonic_ns(), clock.monotonic_ns()]  # start, model loaded
        self.call.state.touch(self.job.entry, self.job.keep_alive_ns, self.marks[1])

    def _mark(self) -> None:
        self.marks.append(self.call.state.clock.monotonic_ns())

    async def run(self, on_piece: Callable[[Piece], Awaitable[None]]) -> bool:
        """Emit every token through `on_piece`; False when the injected failure fires."""
        settings = self.call.settings
        loop = asyncio.get_running_loop()
        started = loop.time()
        interval = 1.0 / settings.tokens_per_second if settings.tokens_per_second > 0 else 0.0
        fail_after = settings.fail_after_chunks
        for index in range(self.plan.total):
            if fail_after is not None and index >= fail_after:
                break
            delay = started + settings.time_to_first_token + index * interval - loop.time()
            await asyncio.sleep(max(delay, 0.0))
            transport = self.call.request.transport
            if transport is None or transport.is_closing():
                raise ClientGone
            if index == 0:
                self._mark()
            await on_piece(self.plan.piece(index))
            self.record.tokens_sent += 1
        else:
            if self.plan.total == 0:
                await asyncio.sleep(settings.time_to_first_token)
                self._mark()
            self._mark()
            return fail_after is None
        return False

    def metrics(self) -> dict[str, Any]:
        """The six metrics in Go's order; zero values are dropped (omitempty)."""
        start, loaded, first, end = self.marks[:4]
        values = {
            "total_duration": max(end - start, 1),
            "load_duration": max(loaded - start, 1),
            "prompt_eval_count": self.prompt_eval_count,
            "prompt_eval_duration": max(first - loaded, 1),
            "eval_count": self.plan.total,
            "eval_duration": max(end - first, 1),
        }
        return {key: value for key, value in values.items() if value}

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_eval_count,
            "completion_tokens": self.plan.total,
            "total_tokens": self.prompt_eval_count + self.plan.total,
        }

    def finish(self) -> None:
        """The final chunk (or usage) went out: record the reported counts."""
        self.record.outcome = "completed"
        self.record.done_reason = self.plan.done_reason
        self.record.prompt_eval_count = self.prompt_eval_count
        self.record.eval_count = self.plan.total

    def fail(self) -> None:
        self.record.outcome = "failed"

    def context(self) -> list[int]:
        """Token ids of prompt plus output, as /api/generate returns them."""
        count = self.prompt_eval_count + self.plan.total
        seed = self.plan.seed
        return [(seed + 7919 * index) % 128_000 for index in range(count)]


def _limit_from_options(options: GoObject | None) -> int | None:
    """options.num_predict (exact key, as Go's Options.FromMap reads the map); <= 0 = no limit."""
    if options is None or "num_predict" not in options:
        return None
    value = options["num_predict"]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(500, 'option "num_predict" must be of type integer')
    limit = int(value)
    return limit if limit > 0 else None


def _positive_min(*values: int | None) -> int | None:
    positive = [v for v in values if v is not None and v > 0]
    return min(positive) if positive else None


_THINK_LEVELS: Final = ("high", "medium", "low", "max")


def _bind_think(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value in _THINK_LEVELS:
        return True
    raise ApiError(400, f"invalid think value: {json.dumps(value)}")


def _check_queue(call: Call) -> None:
    if call.settings.queue_full:
        raise ApiError(503, MSG_QUEUE_FULL)


def _resolve_think(entry: ModelEntry, model: str, think: bool | None) -> bool:
    if think is None:
        return entry.thinks
    if think and not entry.thinks:
        raise ApiError(400, f"{json.dumps(model)} does not support thinking")
    return think


def _lookup(call: Call, raw: str, not_found: str) -> ModelEntry:
    """The installed model for a request name (cloud names are refused as with OLLAMA_NO_CLOUD)."""
    if is_cloud_model(raw):
        raise ApiError(403, MSG_CLOUD_DISABLED, native=True)
    name = parse_model_name(_local_name(raw))
    entry = call.state.find(name) if name is not None else None
    if entry is None:
        raise ApiError(404, not_found)
    return entry


# --------------------------------------------------------------------------- native writers


async def _native_load(call: Call, kind: str, model: str, reason: str) -> web.Response:
    payload: dict[str, Any] = {"model": model, "created_at": call.now()}
    if kind == "generate":
        payload["response"] = ""
    else:
        payload["message"] = {"role": "assistant", "content": ""}
    payload["done"] = True
    payload["done_reason"] = reason
    return gin_json(200, payload)


def _native_chunk(job: Job, created_at: str, text: str, thinking: str) -> dict[str, Any]:
    chunk: dict[str, Any] = {"model": job.model, "created_at": created_at}
    if job.kind == "generate":
        chunk["response"] = text
        if thinking:
            chunk["thinking"] = thinking
    else:
        message = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        chunk["message"] = message
    chunk["done"] = False
    return chunk


def _native_final(gen: Generation, created_at: str, text: str, thinking: str) -> dict[str, Any]:
    final = _native_chunk(gen.job, created_at, text, thinking)
    final["done"] = True
    final["done_reason"] = gen.plan.done_reason
    if gen.job.kind == "generate" and not gen.job.raw:
        final["context"] = gen.context()
    final.update(gen.metrics())
    return final


async def run_native(call: Call, job: Job, *, stream: bool) -> web.StreamResponse:
    """/api/generate and /api/chat: NDJSON stream, or one object with stream:false."""
    gen = Generation(call, job, call.begin(f"/api/{job.kind}", job.model, stream=stream))
    if not stream:
        texts: list[str] = []
        thoughts: list[str] = []

        async def collect(piece: Piece) -> None:
            (thoughts if piece.thinking else texts).append(piece.text)

        if not await gen.run(collect):
            gen.fail()
            return gin_json(500, {"error": call.settings.failure_message})
        final = _native_final(gen, call.now(), "".join(texts), "".join(thoughts))
        gen.finish()
        gen.record.chunks_sent = 1
        return gin_json(200, final)

    emitter = Emitter(call, _stream_response(CT_NDJSON), gen.record)

    async def send(piece: Piece) -> None:
        text, thinking = ("", piece.text) if piece.thinking else (piece.text, "")
        await emitter.send(go_json(_native_chunk(job, call.now(), text, thinking)) + b"\n")

    try:
        completed = await gen.run(send)
        if not completed:
            gen.fail()
            error = {"error": call.settings.failure_message}
            if not emitter.started:
                body = go_json(error)
                return web.Response(status=500, body=body, headers={"Content-Type": CT_JSON})
            await emitter.send(go_json(error) + b"\n")
            return emitter.response
        await emitter.send(go_json(_native_final(gen, call.now(), "", "")) + b"\n")
        gen.finish()
    except ClientGone:
        gen.record.outcome = "cancelled"
    return emitter.response


# --------------------------------------------------------------------------- OpenAI writers


def _sse(payload: Any) -> bytes:
    return b"data: " + go_json(payload) + b"\n\n"


_SSE_DONE: Final = b"data: [DONE]\n\n"


def _chat_chunk(
    ident: str, created: int, model: str, choices: list[Any], usage: Any = None
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_ollama",
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


async def run_openai_chat(call: Call, job: Job, *, stream: bool, include_usage: bool) -> web.StreamResponse:
    """/v1/chat/completions in the current (v0.32.6+) chunk format of §6.3, or §6.4."""
    ident = f"chatcmpl-{call.state.rng.randrange(999)}"
    gen = Generation(call, job, call.begin("/v1/chat/completions", job.model, stream=stream))
    if not stream:
        texts: list[str] = []
        thoughts: list[str] = []

        async def collect(piece: Piece) -> None:
            (thoughts if piece.thinking else texts).append(piece.text)

        if not await gen.run(collect):
            gen.fail()
            return encoder_json(500, openai_error_body(500, call.settings.failure_message))
        finished_at = call.state.clock.time_ns() // 1_000_000_000
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if thoughts:
            message["reasoning"] = "".join(thoughts)
        body = {
            "id": ident,
            "object": "chat.completion",
            "created": finished_at,
            "model": job.model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "message": message, "finish_reason": gen.plan.done_reason}],
            "usage": gen.usage(),
        }
        gen.finish()
        gen.record.chunks_sent = 1
        return encoder_json(200, body)

    emitter = Emitter(call, _stream_response(CT_SSE), gen.record)
    created: int | None = None

    def stamp() -> int:
        nonlocal created
        now = call.state.clock.time_ns() // 1_000_000_000
        if created is None:
            created = now
        return created

    def delta(content: str, reasoning: str = "") -> dict[str, Any]:
        result: dict[str, Any] = {} if emitter.started else {"role": "assistant"}
        result["content"] = content
        if reasoning:
            result["reasoning"] = reasoning
        return result

    async def send(piece: Piece) -> None:
        ts = stamp()
        body = delta("", piece.text) if piece.thinking else delta(piece.text)
        choice = {"index": 0, "delta": body, "finish_reason": None}
        await emitter.send(_sse(_chat_chunk(ident, ts, job.model, [choice])))

    try:
        completed = await gen.run(send)
        if not completed:
            gen.fail()
            if not emitter.started:
                return encoder_json(500, openai_error_body(500, call.settings.failure_message))
            # The native {"error"} line parses as an empty ChatResponse: one junk chunk.
            junk = {"index": 0, "delta": delta(""), "finish_reason": None}
            await emitter.send(_sse(_chat_chunk(ident, stamp(), "", [junk])))
            return emitter.response
        ts = stamp()
        if not emitter.started:
            opener = {"index": 0, "delta": delta(""), "finish_reason": None}
            await emitter.send(_sse(_chat_chunk(ident, ts, job.model, [opener])))
        finish = {"index": 0, "delta": {}, "finish_reason": gen.plan.done_reason}
        await emitter.send(_sse(_chat_chunk(ident, ts, job.model, [finish])))
        if include_usage:
            await emitter.send(_sse(_chat_chunk(ident, ts, job.model, [], gen.usage())))
        await emitter.send(_SSE_DONE)
        gen.finish()
        if not include_usage:  # nothing reported the counts
            gen.record.prompt_eval_count = gen.record.eval_count = None
    except ClientGone:
        gen.record.outcome = "cancelled"
    return emitter.response


def _completion_chunk(
    ident: str, created: int, model: str, choices: list[Any], usage: Any = None
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "choices": choices,
        "model": model,
        "system_fingerprint": "fp_ollama",
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


_ZERO_USAGE: Final = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


async def run_openai_completion(
    call: Call, job: Job, *, stream: bool, include_usage: bool, load: bool = False
) -> web.StreamResponse:
    """/v1/completions (§6.5), including the zero usage on every chunk with include_usage."""
    ident = f"cmpl-{call.state.rng.randrange(999)}"
    gen = Generation(call, job, call.begin("/v1/completions", job.model, stream=stream))
    if load:
        gen.plan = Plan(0, 0, "load", 0)
        gen.prompt_eval_count = 0

    def now_s() -> int:
        return call.state.clock.time_ns() // 1_000_000_000

    if not stream:
        texts: list[str] = []

        async def collect(piece: Piece) -> None:
            if not piece.thinking:
                texts.append(piece.text)

        if not load and not await gen.run(collect):
            gen.fail()
            return encoder_json(500, openai_error_body(500, call.settings.failure_message))
        choice = {"text": "".join(texts), "index": 0, "finish_reason": gen.plan.done_reason}
        body = {
            "id": ident,
            "object": "text_completion",
            "created": now_s(),
            "model": job.model,
            "system_fingerprint": "fp_ollama",
            "choices": [choice],
            "usage": gen.usage(),
        }
        gen.finish()
        gen.record.chunks_sent = 1
        return encoder_json(200, body)

    emitter = Emitter(call, _stream_response(CT_SSE), gen.record)
    zero = dict(_ZERO_USAGE) if include_usage else None

    async def send(piece: Piece) -> None:
        choice = {"text": "" if piece.thinking else piece.text, "index": 0, "finish_reason": None}
        await emitter.send(_sse(_completion_chunk(ident, now_s(), job.model, [choice], zero)))

    try:
        if not load and not await gen.run(send):
            gen.fail()
            if not emitter.started:
                return encoder_json(500, openai_error_body(500, call.settings.failure_message))
            junk = {"text": "", "index": 0, "finish_reason": None}
            await emitter.send(_sse(_completion_chunk(ident, now_s(), "", [junk], zero)))
            return emitter.response
        ts = now_s()
        last = {"text": "", "index": 0, "finish_reason": gen.plan.done_reason}
        await emitter.send(_sse(_completion_chunk(ident, ts, job.model, [last], zero)))
        if include_usage:
            await emitter.send(_sse(_completion_chunk(ident, ts, job.model, [], gen.usage())))
        await emitter.send(_SSE_DONE)
        gen.finish()
        if not include_usage:
            gen.record.prompt_eval_count = gen.record.eval_count = None
    except ClientGone:
        gen.record.outcome = "cancelled"
    return emitter.response


# --------------------------------------------------------------------------- Anthropic / Responses


def _sse_event(event: str, payload: Any) -> bytes:
    return f"event: {event}\ndata: ".encode() + go_json(payload) + b"\n\n"


async def run_anthropic(call: Call, job: Job, *, stream: bool) -> web.StreamResponse:
    """/v1/messages: Anthropic Messages shape; authoritative usage in the final message_delta."""
    ident = f"msg_{call.state.rng.getrandbits(96):024x}"
    gen = Generation(call, job, call.begin("/v1/messages", job.model, stream=stream))
    stop_reason = "max_tokens" if gen.plan.done_reason == "length" else "end_turn"

    def usage() -> dict[str, int]:
        return {"input_tokens": gen.prompt_eval_count, "output_tokens": gen.plan.total}

    if not stream:
        texts: list[str] = []
        thoughts: list[str] = []

        async def collect(piece: Piece) -> None:
            (thoughts if piece.thinking else texts).append(piece.text)

        if not await gen.run(collect):
            gen.fail()
            return gin_json(500, anthropic_error_body(500, call.settings.failure_message))
        content: list[Any] = []
        if thoughts:
            content.append({"type": "thinking", "thinking": "".join(thoughts), "signature": ""})
        content.append({"type": "text", "text": "".join(texts)})
        body = {
            "id": ident,
            "type": "message",
            "role": "assistant",
            "model": job.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage(),
        }
        gen.finish()
        gen.record.chunks_sent = 1
        return gin_json(200, body)

    emitter = Emitter(
        call,
        _stream_response(CT_SSE, **{"Cache-Control": "no-cache", "Connection": "keep-alive"}),
        gen.record,
    )
    block: dict[str, Any] = {"index": -1, "type": ""}
    # message_start carries a character-based estimate, as Ollama's does (~4 chars a token).
    estimate = (sum(len(text) for text in job.shape.texts()) + 3) // 4

    async def open_block(kind: str) -> None:
        if block["index"] >= 0:
            stop = {"type": "content_block_stop", "index": block["index"]}
            await emitter.send(_sse_event("content_block_stop", stop))
        block["index"] += 1
        block["type"] = kind
        start: dict[str, Any] = {"type": kind, kind: ""}
        if kind == "thinking":
            start["signature"] = ""
        event = {"type": "content_block_start", "index": block["index"], "content_block": start}
        await emitter.send(_sse_event("content_block_start", event))

    async def begin() -> None:
        message: dict[str, Any] = {
            "id": ident,
            "type": "message",
            "role": "assistant",
            "model": job.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": estimate, "output_tokens": 0},
        }
        await emitter.send(_sse_event("message_start", {"type": "message_start", "message": message}))

    async def send(piece: Piece) -> None:
        if not emitter.started:
            await begin()
        kind = "thinking" if piece.thinking else "text"
        if block["type"] != kind:
            await open_block(kind)
        delta = {"type": f"{kind}_delta", kind: piece.text}
        event = {"type": "content_block_delta", "index": block["index"], "delta": delta}
        await emitter.send(_sse_event("content_block_delta", event))

    try:
        if not await gen.run(send):
            gen.fail()
            if not emitter.started:
                return gin_json(500, anthropic_error_body(500, call.settings.failure_message))
            error = anthropic_error_body(500, call.settings.failure_message)
            await emitter.send(_sse_event("error", error))
            return emitter.response
        if not emitter.started:
            await begin()
        if block["type"] != "text":
            await open_block("text")
        stop = {"type": "content_block_stop", "index": block["index"]}
        await emitter.send(_sse_event("content_block_stop", stop))
        final = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": usage(),
        }
        await emitter.send(_sse_event("message_delta", final))
        await emitter.send(_sse_event("message_stop", {"type": "message_stop"}))
        gen.finish()
    except ClientGone:
        gen.record.outcome = "cancelled"
    return emitter.response


async def run_responses(call: Call, job: Job, *, stream: bool) -> web.StreamResponse:
    """/v1/responses: OpenAI Responses shape; usage in the body or in response.completed."""
    response_id = f"resp_{call.state.rng.randrange(999999)}"
    item_id = f"msg_{call.state.rng.randrange(999999)}"
    gen = Generation(call, job, call.begin("/v1/responses", job.model, stream=stream))
    created = call.state.clock.time_ns() // 1_000_000_000

    def usage() -> dict[str, Any]:
        return {
            "input_tokens": gen.prompt_eval_count,
            "output_tokens": gen.plan.total,
            "total_tokens": gen.prompt_eval_count + gen.plan.total,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }

    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": []}

    def item(text: str | None) -> dict[str, Any]:
        status = "in_progress" if text is None else "completed"
        content = [] if text is None else [part(text)]
        return {
            "id": item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def response(status: str, output: list[Any], final: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": response_id,
            "object": "response",
            "created_at": created,
            "status": status,
            "model": job.model,
            "output": output,
        }
        if final and gen.plan.done_reason == "length":
            body["status"] = "incomplete"
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        body["usage"] = usage() if final else None
        return body

    texts: list[str] = []
    if not stream:

        async def collect(piece: Piece) -> None:
            if not piece.thinking:
                texts.append(piece.text)

        if not await gen.run(collect):
            gen.fail()
            return encoder_json(500, openai_error_body(500, call.settings.failure_message))
        gen.finish()
        gen.record.chunks_sent = 1
        return encoder_json(200, response("completed", [item("".join(texts))], final=True))

    emitter = Emitter(
        call,
        _stream_response(CT_SSE, **{"Cache-Control": "no-cache", "Connection": "keep-alive"}),
        gen.record,
    )
    sequence = 0

    async def event(kind: str, payload: dict[str, Any]) -> None:
        nonlocal sequence
        await emitter.send(_sse_event(kind, {"type": kind, "sequence_number": sequence, **payload}))
        sequence += 1

    async def begin() -> None:
        await event("response.created", {"response": response("in_progress", [], final=False)})
        await event("response.in_progress", {"response": response("in_progress", [], final=False)})
        await event("response.output_item.added", {"output_index": 0, "item": item(None)})
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        await event("response.content_part.added", {**where, "part": part("")})

    async def send(piece: Piece) -> None:
        if not emitter.started:
            await begin()
        if not piece.thinking:
            texts.append(piece.text)
            where = {"item_id": item_id, "output_index": 0, "content_index": 0}
            await event("response.output_text.delta", {**where, "delta": piece.text})

    try:
        if not await gen.run(send):
            gen.fail()
            if not emitter.started:
                return encoder_json(500, openai_error_body(500, call.settings.failure_message))
            failed = response("failed", [], final=False)
            failed["error"] = {"code": "server_error", "message": call.settings.failure_message}
            await event("response.failed", {"response": failed})
            return emitter.response
        if not emitter.started:
            await begin()
        text = "".join(texts)
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        await event("response.output_text.done", {**where, "text": text})
        await event("response.content_part.done", {**where, "part": part(text)})
        await event("response.output_item.done", {"output_index": 0, "item": item(text)})
        final = response("completed", [item(text)], final=True)
        await event("response.completed", {"response": final})
        gen.finish()
    except ClientGone:
        gen.record.outcome = "cancelled"
    return emitter.response


# --------------------------------------------------------------------------- native handlers


async def handle_root(call: Call) -> web.StreamResponse:
    return plain(200, "Ollama is running", "text/plain; charset=utf-8")


async def handle_version(call: Call) -> web.StreamResponse:
    return gin_json(200, {"version": call.settings.version})


async def handle_status(call: Call) -> web.StreamResponse:
    return gin_json(200, {"cloud": {"disabled": True, "source": "env"}})


def _tags_entry(entry: ModelEntry) -> dict[str, Any]:
    return {
        "name": entry.display,
        "model": entry.display,
        "modified_at": rfc3339nano(entry.modified_at_ns),
        "size": entry.size,
        "digest": entry.digest,
        "details": entry.details(),
        "capabilities": list(entry.capabilities),
    }


async def handle_tags(call: Call) -> web.StreamResponse:
    return gin_json(200, {"models": [_tags_entry(e) for e in call.state.models.values()]})


async def handle_ps(call: Call) -> web.StreamResponse:
    state = call.state
    wall, now = state.clock.time_ns(), state.clock.monotonic_ns()
    for key, expires in list(state.loaded.items()):
        if expires <= now or key not in state.models:
            del state.loaded[key]
    running = sorted(state.loaded.items(), key=lambda item: item[1], reverse=True)
    models = []
    for key, expires in running:
        entry = state.models[key]
        remaining = min(expires - now, FOREVER_NS)
        models.append(
            {
                "name": entry.display,
                "model": entry.display,
                "size": entry.size,
                "digest": entry.digest,
                "details": entry.details(),
                "expires_at": rfc3339nano(wall + remaining),
                "size_vram": entry.size,
                "context_length": 4096,
            }
        )
    return gin_json(200, {"models": models})


def _show_body(entry: ModelEntry) -> dict[str, Any]:
    modelfile = (
        '# Modelfile generated by "ollama show"\n'
        f"# To build a new Modelfile based on this, replace FROM with:\n# FROM {entry.display}\n\n"
        f"FROM {entry.display}\n"
        'TEMPLATE """{{ .Prompt }}"""\n'
    )
    return {
        "modelfile": modelfile,
        "parameters": 'stop                           "<|eot_id|>"',
        "template": "<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>",
        "details": entry.details(),
        "model_info": {
            "general.architecture": entry.family,
            "general.file_type": 15,
            "general.parameter_count": entry.size // 2,
            "general.quantization_version": 2,
        },
        "capabilities": list(entry.capabilities),
        "modified_at": rfc3339nano(entry.modified_at_ns),
    }


async def _show(call: Call, raw: str) -> ModelEntry:
    if not raw.strip():
        raise ApiError(400, MSG_MODEL_REQUIRED)
    if is_cloud_model(raw):
        raise ApiError(403, MSG_CLOUD_DISABLED, native=True)
    name = parse_model_name(_local_name(raw))
    if name is None:
        raise ApiError(400, MSG_INVALID_NAME)
    entry = call.state.find(name)
    if entry is None:
        raise ApiError(404, f"model '{name.display()}' not found")
    return entry


async def handle_show(call: Call) -> web.StreamResponse:
    obj = await call.json("api.ShowRequest")
    bind = Binder("ShowRequest")
    raw = bind.string(obj, "model") or bind.string(obj, "name") or ""
    bind.boolean(obj, "verbose")
    return gin_json(200, _show_body(await _show(call, raw)))


def _bind_options(bind: Binder, obj: GoObject) -> GoObject | None:
    return bind.object(obj, "options", "map[string]interface {}")


def _bind_images(bind: Binder, obj: GoObject, key: str = "images") -> int:
    images = bind.array(obj, key, "[]api.ImageData") or []
    for image in images:
        if not isinstance(image, str):
            raise BindError(
                f"json: cannot unmarshal {_json_kind(image)} into Go struct field "
                f"{bind.struct}.{bind.path}{key} of type api.ImageData"
            )
        try:
            base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise BindError("illegal base64 data at input byte 0") from None
    return len(images)


async def handle_generate(call: Call) -> web.StreamResponse:
    obj = await call.json("api.GenerateRequest")
    bind = Binder("GenerateRequest")
    model = bind.string(obj, "model") or ""
    prompt = bind.string(obj, "prompt") or ""
    suffix = bind.string(obj, "suffix") or ""
    system = bind.string(obj, "system") or ""
    template = bind.string(obj, "template") or ""
    context = bind.array(obj, "context", "[]int") or []
    stream = bind.boolean(obj, "stream")
    raw = bool(bind.boolean(obj, "raw"))
    options = _bind_options(bind, obj)
    images = _bind_images(bind, obj)
    keep_alive = bind_keep_alive(obj)
    top_logprobs = bind.integer(obj, "top_logprobs") or 0
    think = _bind_think(obj.folded.get("think"))
    if is_cloud_model(model):
        raise ApiError(403, MSG_CLOUD_DISABLED)
    if parse_model_name(_local_name(model)) is None:
        raise ApiError(404, f"model '{model}' not found")
    if raw and (template or system or context):
        raise ApiError(400, MSG_RAW_CONFLICT)
    if not 0 <= top_logprobs <= 20:
        raise ApiError(400, "top_logprobs must be between 0 and 20")
    entry = _lookup(call, model, f"model '{model}' not found")
    if not prompt and keep_alive == 0:
        call.state.touch_now(entry, 0)
        return await _native_load(call, "generate", model, "unload")
    if "completion" not in entry.capabilities:
        raise ApiError(400, f"{json.dumps(model)} does not support generate")
    thinking = _resolve_think(entry, model, think)
    limit = _limit_from_options(options)
    _check_queue(call)
    if not prompt:
        call.state.touch_now(entry, keep_alive)
        return await _native_load(call, "generate", model, "load")
    if raw:
        shape = PromptShape(extra=(prompt, suffix), images=images, templated=False)
    else:
        messages = ((system,),) if system else ()
        shape = PromptShape(
            messages=(*messages, (prompt, suffix)), images=images, context_tokens=len(context)
        )
    job = Job("generate", model, entry, shape, thinking, limit, keep_alive, raw)
    return await run_native(call, job, stream=stream is not False)


def _bind_native_messages(bind: Binder, obj: GoObject) -> tuple[tuple[tuple[str, ...], ...], int]:
    """Counted texts per message and the image count of api.ChatRequest.messages."""
    messages = bind.array(obj, "messages", "[]api.Message") or []
    inner = bind.nested("Message", "messages")
    texts: list[tuple[str, ...]] = []
    images = 0
    for raw in messages:
        message = bind.element(raw, "messages", "api.Message")
        inner.string(message, "role")
        parts = [inner.string(message, "content") or "", inner.string(message, "thinking") or ""]
        calls = inner.array(message, "tool_calls", "[]api.ToolCall")
        if calls:
            parts.append(_compact_json(calls))
        images += _bind_images(inner, message)
        texts.append(tuple(part for part in parts if part))
    return tuple(texts), images


async def handle_chat(call: Call) -> web.StreamResponse:
    obj = await call.json("api.ChatRequest")
    bind = Binder("ChatRequest")
    model = bind.string(obj, "model") or ""
    messages, images = _bind_native_messages(bind, obj)
    stream = bind.boolean(obj, "stream")
    options = _bind_options(bind, obj)
    tools = bind.array(obj, "tools", "api.Tools")
    keep_alive = bind_keep_alive(obj)
    top_logprobs = bind.integer(obj, "top_logprobs") or 0
    think = _bind_think(obj.folded.get("think"))
    if not model.strip():
        raise ApiError(400, MSG_MODEL_REQUIRED)
    if is_cloud_model(model):
        raise ApiError(403, MSG_CLOUD_DISABLED)
    if parse_model_name(_local_name(model)) is None:
        raise ApiError(400, MSG_INVALID_NAME)
    if not 0 <= top_logprobs <= 20:
        raise ApiError(400, "top_logprobs must be between 0 and 20")
    entry = _lookup(call, model, f"model '{model}' not found")
    if not messages and keep_alive == 0:
        call.state.touch_now(entry, 0)
        return await _native_load(call, "chat", model, "unload")
    if "completion" not in entry.capabilities:
        raise ApiError(400, f"{json.dumps(model)} does not support chat")
    thinking = _resolve_think(entry, model, think)
    limit = _limit_from_options(options)
    _check_queue(call)
    if not messages:
        call.state.touch_now(entry, keep_alive)
        return await _native_load(call, "chat", model, "load")
    extra = (_compact_json(tools),) if tools else ()
    shape = PromptShape(messages=messages, extra=extra, images=images)
    job = Job("chat", model, entry, shape, thinking, limit, keep_alive)
    return await run_native(call, job, stream=stream is not False)


def _embed_inputs(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ApiError(400, "invalid input type")


async def _embed(
    call: Call, model: str, inputs: list[str], dimensions: int, keep_alive: int | None
) -> dict[str, Any]:
    """The /api/embed answer (also the source of /v1/embeddings)."""
    if is_cloud_model(model):
        raise ApiError(403, MSG_CLOUD_DISABLED, native=True)
    if parse_model_name(_local_name(model)) is None:
        raise ApiError(404, f"model '{model}' not found")
    entry = _lookup(call, model, f"model {json.dumps(model)} not found, try pulling it first")
    _check_queue(call)
    clock = call.state.clock
    started = clock.monotonic_ns()
    call.state.touch(entry, keep_alive, started)
    if not inputs:
        return {"model": model, "embeddings": []}
    loaded = clock.monotonic_ns()
    await asyncio.sleep(call.settings.time_to_first_token)  # prompt processing
    size = call.settings.embedding_dimensions
    if 0 < dimensions < size:
        size = dimensions
    vectors = [Float32s(_embedding(text, size)) for text in inputs]
    count = embed_prompt_tokens(inputs)
    generation = call.begin("/api/embed", model, stream=False)
    generation.prompt_eval_count = count
    generation.outcome = "completed"
    generation.chunks_sent = 1
    return {
        "model": model,
        "embeddings": vectors,
        "total_duration": max(clock.monotonic_ns() - started, 1),
        "load_duration": max(loaded - started, 1),
        "prompt_eval_count": count,
    }


async def handle_embed(call: Call) -> web.StreamResponse:
    obj = await call.json("api.EmbedRequest")
    bind = Binder("EmbedRequest")
    model = bind.string(obj, "model") or ""
    dimensions = bind.integer(obj, "dimensions") or 0
    bind.boolean(obj, "truncate")
    keep_alive = bind_keep_alive(obj)
    _bind_options(bind, obj)
    inputs = _embed_inputs(obj.folded.get("input"))
    return gin_json(200, await _embed(call, model, inputs, dimensions, keep_alive))


async def handle_embeddings(call: Call) -> web.StreamResponse:
    obj = await call.json("api.EmbeddingRequest")
    bind = Binder("EmbeddingRequest")
    model = bind.string(obj, "model") or ""
    prompt = bind.string(obj, "prompt") or ""
    keep_alive = bind_keep_alive(obj)
    _bind_options(bind, obj)
    if not model.strip():
        raise ApiError(400, MSG_MODEL_REQUIRED)
    if is_cloud_model(model):
        raise ApiError(403, MSG_CLOUD_DISABLED)
    entry = _lookup(call, model, f"model {json.dumps(model)} not found, try pulling it first")
    _check_queue(call)
    call.state.touch_now(entry, keep_alive)
    generation = call.begin("/api/embeddings", model, stream=False)
    generation.outcome = "completed"
    generation.chunks_sent = 1
    if not prompt:
        return gin_json(200, {"embedding": []})
    vector = _embedding(prompt, call.settings.embedding_dimensions)
    return gin_json(200, {"embedding": list(vector)})


def _progress_lines(kind: str, digest: str, size: int) -> list[dict[str, Any]]:
    short = digest[:12]
    layer = {"digest": f"sha256:{digest}", "total": size}
    if kind == "pull":
        return [
            {"status": "pulling manifest"},
            {"status": f"pulling {short}", **layer, "completed": size // 2},
            {"status": f"pulling {short}", **layer, "completed": size},
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
    if kind == "push":
        return [
            {"status": "retrieving manifest"},
            {"status": f"pushing {short}", **layer, "completed": size},
            {"status": "pushing manifest"},
            {"status": "success"},
        ]
    return [
        {"status": "gathering model components"},
        {"status": f"using existing layer sha256:{digest}"},
        {"status": "writing manifest"},
        {"status": "success"},
    ]


async def _progress(call: Call, kind: str) -> web.StreamResponse:
    """/api/pull, /api/push, /api/create: NDJSON progress ending with {"status":"success"}."""
    obj = await call.json(f"api.{kind.capitalize()}Request")
    bind = Binder(f"{kind.capitalize()}Request")
    raw = bind.string(obj, "model") or bind.string(obj, "name") or ""
    stream = bind.boolean(obj, "stream")
    name = parse_model_name(raw)
    if name is None:
        raise ApiError(400, MSG_INVALID_NAME)
    if kind == "push" and call.state.find(name) is None:
        raise ApiError(404, f"model '{raw}' not found")
    lines = _progress_lines(kind, hashlib.sha256(name.key.encode()).hexdigest(), 2_019_393_189)
    if kind in ("pull", "create"):
        call.state.install(name.display())
    if stream is False:
        return gin_json(200, lines[-1])
    emitter = Emitter(call, _stream_response(CT_NDJSON))
    with contextlib.suppress(ClientGone):
        for line in lines:
            await emitter.send(go_json(line) + b"\n")
    return emitter.response


async def handle_pull(call: Call) -> web.StreamResponse:
    return await _progress(call, "pull")


async def handle_push(call: Call) -> web.StreamResponse:
    return await _progress(call, "push")


async def handle_create(call: Call) -> web.StreamResponse:
    return await _progress(call, "create")


async def handle_delete(call: Call) -> web.StreamResponse:
    obj = await call.json("api.DeleteRequest")
    bind = Binder("DeleteRequest")
    raw = bind.string(obj, "model") or bind.string(obj, "name") or ""
    name = parse_model_name(raw)
    if name is None:
        raise ApiError(400, f"name {json.dumps(raw)} is invalid")
    if call.state.models.pop(name.key, None) is None:
        raise ApiError(404, f"model '{raw}' not found")
    call.state.loaded.pop(name.key, None)
    return empty()


async def handle_copy(call: Call) -> web.StreamResponse:
    obj = await call.json("api.CopyRequest")
    bind = Binder("CopyRequest")
    source = bind.string(obj, "source") or ""
    destination = bind.string(obj, "destination") or ""
    src, dst = parse_model_name(source), parse_model_name(destination)
    if src is None:
        raise ApiError(400, f"source {json.dumps(source)} is invalid")
    if dst is None:
        raise ApiError(400, f"destination {json.dumps(destination)} is invalid")
    if call.state.find(src) is None:
        raise ApiError(404, f"model {json.dumps(source)} not found")
    call.state.install(dst.display())
    return empty()


_DIGEST_RE: Final = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")


async def handle_blob_head(call: Call) -> web.StreamResponse:
    digest = call.params["digest"]
    if digest.replace("-", ":", 1) in call.state.blobs:
        return empty()
    return gin_json(404, {"error": "blob not found"})


async def handle_blob_create(call: Call) -> web.StreamResponse:
    digest = call.params["digest"]
    match = _DIGEST_RE.fullmatch(digest)
    if match is None:
        raise ApiError(400, "invalid digest format")
    expected = f"sha256:{match.group(1).lower()}"
    if expected in call.state.blobs:
        return empty()
    actual = f"sha256:{hashlib.sha256(await call.body()).hexdigest()}"
    if actual != expected:
        raise ApiError(400, f"digest mismatch, expected {json.dumps(expected)}, got {json.dumps(actual)}")
    call.state.blobs.add(expected)
    return empty(201)


_SIGNIN_URL: Final = "https://ollama.com/connect?name=ollama-simulator&key=c2ltdWxhdG9y"


async def handle_unauthorized(call: Call) -> web.StreamResponse:
    raise ApiError(401, "unauthorized", extra={"signin_url": _SIGNIN_URL})


async def handle_signout(call: Call) -> web.StreamResponse:
    return empty()


async def handle_recommendations(call: Call) -> web.StreamResponse:
    return gin_json(200, {"recommendations": []})


# --------------------------------------------------------------------------- OpenAI handlers


async def _openai_json(call: Call, go_type: str) -> GoObject:
    """The /v1 middlewares bind with ShouldBindJSON too, but report io.EOF as "EOF"."""
    try:
        return await call.json(go_type, missing="EOF")
    except ApiError as e:
        raise ApiError(e.status, e.message, middleware=True) from None


def _cloud_passthrough(obj: GoObject) -> None:
    """cloudPassthroughMiddleware runs first on /v1 inference: cloud names get Ollama's 403."""
    model = obj.folded.get("model")
    if isinstance(model, str) and is_cloud_model(model):
        raise ApiError(403, MSG_CLOUD_DISABLED, native=True)


_IMAGE_PREFIXES: Final = tuple(f"data:image/{t};base64," for t in ("jpeg", "jpg", "png", "webp"))


def _openai_image(part: dict[str, Any]) -> None:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise ApiError(400, "invalid message format", middleware=True)
    prefix = next((p for p in (*_IMAGE_PREFIXES, "data:;base64,") if url.startswith(p)), None)
    if prefix is None:
        raise ApiError(400, "invalid image input", middleware=True)
    try:
        base64.b64decode(url[len(prefix) :], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid message format", middleware=True) from None


def _openai_messages(bind: Binder, obj: GoObject) -> tuple[tuple[tuple[str, ...], ...], int]:
    """openai.FromChatRequest: every content part becomes its own message."""
    raw_messages = bind.array(obj, "messages", "[]openai.Message") or []
    inner = bind.nested("Message", "messages")
    messages: list[tuple[str, ...]] = []
    images = 0
    for raw in raw_messages:
        message = bind.element(raw, "messages", "openai.Message")
        inner.string(message, "role")
        reasoning = inner.string(message, "reasoning") or ""
        calls = inner.array(message, "tool_calls", "[]openai.ToolCall")
        call_text = (_compact_json(calls),) if calls else ()
        content = message.folded.get("content")
        if isinstance(content, str):
            texts = (content, reasoning, *call_text)
            messages.append(tuple(t for t in texts if t))
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    raise ApiError(400, "invalid message format", middleware=True)
                kind = part.get("type")
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise ApiError(400, "invalid message format", middleware=True)
                    messages.append((text,) if text else ())
                elif kind == "image_url":
                    _openai_image(part)
                    images += 1
                    messages.append(())
                else:
                    raise ApiError(400, "invalid message format", middleware=True)
            if messages and (calls or reasoning):
                messages[-1] = messages[-1] + tuple(t for t in (reasoning, *call_text) if t)
        elif calls is None:
            got = _go_type_name(content)
            raise ApiError(400, f"invalid message content type: {got}", middleware=True)
        else:
            messages.append(tuple(t for t in (reasoning, *call_text) if t))
    return tuple(messages), images


_EFFORTS: Final = {
    "none": False,
    "minimal": True,
    "low": True,
    "medium": True,
    "high": True,
    "max": True,
    "xhigh": True,
    "ultra": True,
}


def _openai_think(bind: Binder, obj: GoObject) -> bool | None:
    effort = bind.string(obj, "reasoning_effort")
    reasoning = bind.object(obj, "reasoning", "openai.Reasoning")
    if effort is None and reasoning is not None:
        effort = bind.nested("Reasoning", "reasoning").string(reasoning, "effort")
    if not effort:
        return None
    if effort not in _EFFORTS:
        message = f'invalid reasoning value: \'{effort}\' (must be "none", "minimal", "low", "medium", "high", "max")'  # noqa: E501 - one message
        raise ApiError(400, message, middleware=True)
    return _EFFORTS[effort]


def _include_usage(bind: Binder, obj: GoObject, stream: bool) -> bool:
    options = bind.object(obj, "stream_options", "openai.StreamOptions")
    if options is None:
        return False
    include = bind.nested("StreamOptions", "stream_options").boolean(options, "include_usage")
    return stream and bool(include)


async def handle_openai_chat(call: Call) -> web.StreamResponse:
    obj = await _openai_json(call, "openai.ChatCompletionRequest")
    _cloud_passthrough(obj)
    bind = Binder("ChatCompletionRequest")
    model = bind.string(obj, "model") or ""
    stream = bool(bind.boolean(obj, "stream"))
    include_usage = _include_usage(bind, obj, stream)
    limit = _positive_min(bind.integer(obj, "max_tokens"), bind.integer(obj, "max_completion_tokens"))
    raw_messages = bind.array(obj, "messages", "[]openai.Message")
    if not raw_messages:
        raise ApiError(400, "[] is too short - 'messages'", middleware=True)
    messages, images = _openai_messages(bind, obj)
    tools = bind.array(obj, "tools", "[]api.Tool")
    think = _openai_think(bind, obj)
    if not model.strip():
        raise ApiError(400, MSG_MODEL_REQUIRED)
    if parse_model_name(_local_name(model)) is None:
        raise ApiError(400, MSG_INVALID_NAME)
    entry = _lookup(call, model, f"model '{model}' not found")
    if "completion" not in entry.capabilities:
        raise ApiError(400, f"{json.dumps(model)} does not support chat")
    thinking = _resolve_think(entry, model, think)
    _check_queue(call)
    extra = (_compact_json(tools),) if tools else ()
    shape = PromptShape(messages=messages, extra=extra, images=images)
    job = Job("chat", model, entry, shape, thinking, limit)
    return await run_openai_chat(call, job, stream=stream, include_usage=include_usage)


async def handle_openai_completions(call: Call) -> web.StreamResponse:
    obj = await _openai_json(call, "openai.CompletionRequest")
    _cloud_passthrough(obj)
    bind = Binder("CompletionRequest")
    model = bind.string(obj, "model") or ""
    prompt = bind.string(obj, "prompt") or ""
    suffix = bind.string(obj, "suffix") or ""
    stream = bool(bind.boolean(obj, "stream"))
    include_usage = _include_usage(bind, obj, stream)
    limit = _positive_min(bind.integer(obj, "max_tokens"), bind.integer(obj, "max_completion_tokens"))
    if parse_model_name(_local_name(model)) is None:
        raise ApiError(404, f"model '{model}' not found")
    entry = _lookup(call, model, f"model '{model}' not found")
    if "completion" not in entry.capabilities:
        raise ApiError(400, f"{json.dumps(model)} does not support generate")
    _check_queue(call)
    shape = PromptShape(messages=((prompt, suffix),))
    job = Job("generate", model, entry, shape, entry.thinks, limit)
    return await run_openai_completion(call, job, stream=stream, include_usage=include_usage, load=not prompt)


async def handle_openai_embeddings(call: Call) -> web.StreamResponse:
    obj = await _openai_json(call, "openai.EmbedRequest")
    _cloud_passthrough(obj)
    bind = Binder("EmbedRequest")
    model = bind.string(obj, "model") or ""
    dimensions = bind.integer(obj, "dimensions") or 0
    encoding = bind.string(obj, "encoding_format") or ""
    if encoding and encoding.lower() not in ("float", "base64"):
        message = f"Invalid value for 'encoding_format' = {encoding}. Supported values: ['float', 'base64']."
        raise ApiError(400, message, middleware=True)
    value = obj.folded.get("input")
    if value == "":
        value = [""]
    if value is None or value == []:
        raise ApiError(400, "invalid input", middleware=True)
    if isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        inputs = list(value)
    else:
        raise ApiError(400, "invalid input type")
    native = await _embed(call, model, inputs, dimensions, None)
    if call.record.generation is not None:
        call.record.generation.endpoint = "/v1/embeddings"
    data = []
    for index, vector in enumerate(native["embeddings"]):
        embedding: Any = vector
        if encoding.lower() == "base64":
            packed = struct.pack(f"<{len(vector.values)}f", *vector.values)
            embedding = base64.b64encode(packed).decode("ascii")
        data.append({"object": "embedding", "embedding": embedding, "index": index})
    count = native.get("prompt_eval_count", 0)
    body = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": count, "total_tokens": count},
    }
    return encoder_json(200, body)


async def handle_openai_models(call: Call) -> web.StreamResponse:
    data = [
        {
            "id": entry.display,
            "object": "model",
            "created": entry.modified_at_ns // 1_000_000_000,
            "owned_by": entry.name.namespace,
        }
        for entry in call.state.models.values()
    ]
    return encoder_json(200, {"object": "list", "data": data or None})


async def handle_openai_model(call: Call) -> web.StreamResponse:
    raw = call.params["model"]
    entry = await _show(call, raw)
    name = parse_model_name(raw)
    body = {
        "id": raw,
        "object": "model",
        "created": entry.modified_at_ns // 1_000_000_000,
        "owned_by": name.namespace if name else DEFAULT_NAMESPACE,
    }
    return encoder_json(200, body)


def _block_texts(value: Any, kinds: tuple[str, ...]) -> tuple[list[str], int]:
    """Texts and image count of a string or a list of content blocks."""
    if isinstance(value, str):
        return [value], 0
    texts: list[str] = []
    images = 0
    for block in value if isinstance(value, list) else []:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind in kinds and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind in ("image", "input_image"):
            images += 1
        elif kind in ("tool_use", "tool_result", "function_call", "function_call_output"):
            texts.append(_compact_json(block))
    return texts, images


async def handle_anthropic(call: Call) -> web.StreamResponse:
    obj = await _openai_json(call, "anthropic.MessagesRequest")
    _cloud_passthrough(obj)
    bind = Binder("MessagesRequest")
    model = bind.string(obj, "model") or ""
    stream = bool(bind.boolean(obj, "stream"))
    limit = _positive_min(bind.integer(obj, "max_tokens"))
    raw_messages = bind.array(obj, "messages", "[]anthropic.MessageParam") or []
    thinking = bind.object(obj, "thinking", "anthropic.ThinkingConfig")
    tools = bind.array(obj, "tools", "[]anthropic.Tool")
    if not model.strip():
        raise ApiError(400, MSG_MODEL_REQUIRED)
    if not raw_messages:
        raise ApiError(400, "messages is required")
    messages: list[tuple[str, ...]] = []
    images = 0
    system_texts, _ = _block_texts(obj.folded.get("system"), ("text",))
    if any(system_texts):
        messages.append(tuple(t for t in system_texts if t))
    for raw in raw_messages:
        content = raw.get("content") if isinstance(raw, dict) else None
        texts, count = _block_texts(content, ("text",))
        images += count
        messages.append(tuple(t for t in texts if t))
    entry = _lookup(call, model, f"model '{model}' not found")
    think: bool | None = None
    if thinking is not None:
        think = thinking.folded.get("type") == "enabled"
    wants = entry.thinks if think is None else (think and entry.thinks)
    _check_queue(call)
    extra = (_compact_json(tools),) if tools else ()
    shape = PromptShape(messages=tuple(messages), extra=extra, images=images)
    job = Job("chat", model, entry, shape, wants, limit)
    return await run_anthropic(call, job, stream=stream)


async def handle_responses(call: Call) -> web.StreamResponse:
    obj = await _openai_json(call, "openai.ResponsesRequest")
    _cloud_passthrough(obj)
    bind = Binder("ResponsesRequest")
    model = bind.string(obj, "model") or ""
    stream = bool(bind.boolean(obj, "stream"))
    limit = _positive_min(bind.integer(obj, "max_output_tokens"))
    instructions = bind.string(obj, "instructions") or ""
    tools = bind.array(obj, "tools", "[]openai.ResponsesTool")
    think = _openai_think(bind, obj)
    messages: list[tuple[str, ...]] = [(instructions,)] if instructions else []
    images = 0
    value = obj.folded.get("input")
    if isinstance(value, str):
        messages.append((value,))
    elif isinstance(value, list):
        for item in value:
            if not isinstance(item, dict):
                raise ApiError(400, "invalid input item", middleware=True)
            if "content" in item:
                texts, count = _block_texts(item["content"], ("input_text", "output_text", "text"))
            else:
                texts, count = [_compact_json(item)], 0
            images += count
            messages.append(tuple(t for t in texts if t))
    if not model.strip():
        raise ApiError(400, MSG_MODEL_REQUIRED)
    entry = _lookup(call, model, f"model '{model}' not found")
    thinking = _resolve_think(entry, model, think)
    _check_queue(call)
    extra = (_compact_json(tools),) if tools else ()
    shape = PromptShape(messages=tuple(messages), extra=extra, images=images)
    job = Job("chat", model, entry, shape, thinking, limit)
    return await run_responses(call, job, stream=stream)


def _multipart_fields(body: bytes, content_type: str) -> dict[str, bytes]:
    """The named parts of a multipart/form-data body (enough for the transcription form)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        return {}
    fields: dict[str, bytes] = {}
    for chunk in body.split(b"--" + match.group(1).encode()):
        head, sep, content = chunk.partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]*)"', head)
        if sep and name:
            fields[name.group(1).decode()] = content.removesuffix(b"\r\n")
    return fields


async def handle_transcriptions(call: Call) -> web.StreamResponse:
    fields = _multipart_fields(await call.body(), call.request.headers.get("Content-Type", ""))
    if "file" not in fields:
        raise ApiError(400, "file is required", middleware=True)
    model = fields.get("model", b"").decode("utf-8", "replace")
    entry = _lookup(call, model, f"model '{model}' not found")
    _check_queue(call)
    prompt = fields.get("prompt", b"").decode("utf-8", "replace")
    shape = PromptShape(messages=((prompt,) if prompt else (),), images=1)
    job = Job("chat", model, entry, shape, False, None)
    gen = Generation(call, job, call.begin("/v1/audio/transcriptions", model, stream=False))
    texts: list[str] = []

    async def collect(piece: Piece) -> None:
        texts.append(piece.text)

    if not await gen.run(collect):
        gen.fail()
        raise ApiError(500, call.settings.failure_message)
    gen.finish()
    if fields.get("response_format", b"json") == b"text":
        return plain(200, "".join(texts), "text/plain; charset=utf-8")
    return encoder_json(200, {"text": "".join(texts)})


# --------------------------------------------------------------------------- routing

Handler = Callable[[Call], Awaitable[web.StreamResponse]]


@attrs.frozen
class Route:
    method: str
    segments: tuple[str, ...]
    handler: Handler
    dialect: Dialect

    def match(self, parts: Sequence[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for pattern, part in zip(self.segments, parts, strict=True):
            if pattern.startswith(":"):
                if not part:
                    return None
                params[pattern[1:]] = part
            elif pattern != part:
                return None
        return params


def _route(method: str, path: str, handler: Handler, dialect: Dialect = "native") -> Route:
    return Route(method, tuple(path.split("/")[1:]), handler, dialect)


ROUTES: Final = (
    _route("HEAD", "/", handle_root),
    _route("GET", "/", handle_root),
    _route("HEAD", "/api/version", handle_version),
    _route("GET", "/api/version", handle_version),
    _route("GET", "/api/status", handle_status),
    _route("POST", "/api/pull", handle_pull),
    _route("POST", "/api/push", handle_push),
    _route("HEAD", "/api/tags", handle_tags),
    _route("GET", "/api/tags", handle_tags),
    _route("POST", "/api/show", handle_show),
    _route("DELETE", "/api/delete", handle_delete),
    _route("POST", "/api/me", handle_unauthorized),
    _route("POST", "/api/signout", handle_signout),
    _route("DELETE", "/api/user/keys/:encodedKey", handle_signout),
    _route("POST", "/api/create", handle_create),
    _route("POST", "/api/blobs/:digest", handle_blob_create),
    _route("HEAD", "/api/blobs/:digest", handle_blob_head),
    _route("POST", "/api/copy", handle_copy),
    _route("POST", "/api/experimental/web_search", handle_unauthorized),
    _route("POST", "/api/experimental/web_fetch", handle_unauthorized),
    _route("GET", "/api/experimental/model-recommendations", handle_recommendations),
    _route("GET", "/api/ps", handle_ps),
    _route("POST", "/api/generate", handle_generate),
    _route("POST", "/api/chat", handle_chat),
    _route("POST", "/api/embed", handle_embed),
    _route("POST", "/api/embeddings", handle_embeddings),
    _route("POST", "/v1/chat/completions", handle_openai_chat, "openai"),
    _route("POST", "/v1/completions", handle_openai_completions, "openai"),
    _route("POST", "/v1/embeddings", handle_openai_embeddings, "openai"),
    _route("GET", "/v1/models", handle_openai_models, "openai"),
    _route("GET", "/v1/models/:model", handle_openai_model, "openai"),
    _route("POST", "/v1/responses", handle_responses, "openai"),
    _route("POST", "/v1/audio/transcriptions", handle_transcriptions, "openai"),
    _route("POST", "/v1/messages", handle_anthropic, "anthropic"),
)


def _find(method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    parts = path.split("/")[1:]
    for route in ROUTES:
        if route.method == method:
            params = route.match(parts)
            if params is not None:
                return route, params
    return None


def _redirect(request: web.Request, target: str) -> web.Response:
    """gin's redirectTrailingSlash: 301 for GET, 307 otherwise, via net/http's Redirect."""
    query = request.rel_url.raw_query_string
    location = target + (f"?{query}" if query else "")
    status = 301 if request.method == "GET" else 307
    response = web.Response(status=status, headers={"Location": location})
    if request.method in ("GET", "HEAD"):
        response.headers["Content-Type"] = "text/html; charset=utf-8"
    if request.method == "GET":
        text = "Moved Permanently" if status == 301 else "Temporary Redirect"
        response.body = f'<a href="{location}">{text}</a>.\n\n'.encode()
    return response


@functools.cache
def _hostname() -> str:
    return socket.gethostname().lower()


def _host_allowed_by_name(host: str) -> bool:
    host = host.lower()
    if host in ("", "localhost", _hostname()):
        return True
    return host.endswith((".localhost", ".local", ".internal"))


def _split_host(header: str) -> str:
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    if header.count(":") == 1:
        return header.split(":", 1)[0]
    return header


def _host_guard(request: web.Request) -> web.Response | None:
    """allowedHostsMiddleware (loopback listener): 403 for foreign Host headers."""
    host = _split_host(request.headers.get("Host", ""))
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(host)
        if address.is_loopback or address.is_private or address.is_unspecified:
            return None
    if _host_allowed_by_name(host):
        return empty(204) if request.method == "OPTIONS" else None
    return empty(403)


_LOCAL_ORIGIN_HOSTS: Final = ("localhost", "127.0.0.1", "0.0.0.0")  # noqa: S104 - an allowlist, not a bind
_ORIGIN_SCHEMES: Final = (
    "app://",
    "file://",
    "tauri://",
    "vscode-webview://",
    "vscode-file://",
    "chrome-extension://",
    "safari-extension://",
    "moz-extension://",
    "ms-browser-extension://",
)
_CORS_ALLOW_HEADERS: Final = (
    "Authorization,Content-Type,User-Agent,Accept,X-Requested-With,X-Stainless-Lang,"
    "X-Stainless-Package-Version,X-Stainless-Os,X-Stainless-Arch,X-Stainless-Retry-Count,"
    "X-Stainless-Runtime,X-Stainless-Runtime-Version,X-Stainless-Async,X-Stainless-Helper-Method,"
    "X-Stainless-Poll-Helper,X-Stainless-Custom-Poll-Interval,X-Stainless-Timeout"
)


def _origin_allowed(origin: str) -> bool:
    if origin.startswith(_ORIGIN_SCHEMES):
        return True
    for scheme in ("http://", "https://"):
        for host in _LOCAL_ORIGIN_HOSTS:
            base = scheme + host
            if origin == base or origin.startswith(base + ":"):
                return True
    return False


def _cors_guard(request: web.Request) -> tuple[web.Response | None, dict[str, str]]:
    """gin-contrib/cors: foreign Origins get 403, preflights 204; allowed ones get ACAO."""
    origin = request.headers.get("Origin", "")
    host = request.headers.get("Host", "")
    if not origin or origin in (f"http://{host}", f"https://{host}"):
        return None, {}
    if not _origin_allowed(origin):
        return empty(403), {}
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if request.method == "OPTIONS":
        preflight = empty(204)
        preflight.headers.update(headers)
        preflight.headers["Access-Control-Allow-Methods"] = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
        preflight.headers["Access-Control-Allow-Headers"] = _CORS_ALLOW_HEADERS
        preflight.headers["Access-Control-Max-Age"] = "43200"
        return preflight, {}
    return None, headers


async def dispatch(request: web.Request) -> web.StreamResponse:
    """gin's engine: CORS, Host check, route lookup, trailing-slash redirect, 405, 404."""
    state = request.app[STATE_KEY]
    settings = state.settings
    cors_headers: dict[str, str] = {}
    if settings.cors_check:
        refusal, cors_headers = _cors_guard(request)
        if refusal is not None:
            return refusal
    if settings.host_check and (refusal := _host_guard(request)) is not None:
        return refusal
    method, path = request.method, request.path
    found = _find(method, path)
    if found is None:
        if method != "CONNECT" and path != "/":
            alternative = path[:-1] if path.endswith("/") else path + "/"
            if _find(method, alternative) is not None:
                return _redirect(request, alternative)
        if any(_find(other, path) for other in {r.method for r in ROUTES} - {method}):
            return plain(405, "405 method not allowed")
        return plain(404, "404 page not found")
    route, params = found
    call = Call(request, state, settings, request[RECORD_KEY], params)
    try:
        response = await route.handler(call)
    except ApiError as error:
        response = render_error(error, route.dialect)
    except BindError as error:  # Go's decoder refused the body (ShouldBindJSON failed)
        response = render_error(ApiError(400, str(error), middleware=True), route.dialect)
    except ClientGone:  # nobody is left to read it; the record says "cancelled"
        return web.Response(status=499)
    response.headers.update(cors_headers)
    return response


# --------------------------------------------------------------------------- control API


async def control_requests(request: web.Request) -> web.StreamResponse:
    """GET /_sim/requests[?path=/api/chat][&wait_finished=N&timeout=S]: the recorded requests."""
    recorder = request.app[RECORDER_KEY]
    wanted = request.query.get("wait_finished")
    if wanted is not None:
        timeout = float(request.query.get("timeout", "5"))
        try:
            async with asyncio.timeout(timeout):
                await recorder.wait_finished(int(wanted))
        except TimeoutError:
            return web.json_response({"error": "timed out waiting for requests"}, status=504)
    records = recorder.records
    if path := request.query.get("path"):
        records = [r for r in records if r.path == path]
    return web.json_response([r.to_json() for r in records])


async def control_reset(request: web.Request) -> web.StreamResponse:
    """POST /_sim/reset: forget the records and return to the initial settings and models."""
    request.app[RECORDER_KEY].clear()
    request.app[STATE_KEY].reset()
    return web.json_response(settings_to_json(request.app[STATE_KEY].settings))


async def control_get_settings(request: web.Request) -> web.StreamResponse:
    return web.json_response(settings_to_json(request.app[STATE_KEY].settings))


async def control_set_settings(request: web.Request) -> web.StreamResponse:
    """POST /_sim/settings {"field": value, ...}: replace those fields from now on."""
    state = request.app[STATE_KEY]
    try:
        patch = json.loads(await request.read())
        if not isinstance(patch, dict):
            raise TypeError("expected a JSON object")
        state.apply(settings_with(state.settings, patch))
    except (ValueError, TypeError, cattrs.BaseValidationError) as e:
        detail = "; ".join(cattrs.transform_error(e)) if isinstance(e, cattrs.BaseValidationError) else str(e)
        return web.json_response({"error": detail}, status=400)
    return web.json_response(settings_to_json(state.settings))


# --------------------------------------------------------------------------- app


@web.middleware
async def record_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Record every non-control request before anything can refuse it."""
    if request.path.startswith(CONTROL_PREFIX):
        return await handler(request)
    recorder = request.app[RECORDER_KEY]
    record = recorder.start(
        method=request.method,
        path=request.path,
        query=request.rel_url.raw_query_string,
        headers=list(request.headers.items()),
        body=await request.read(),
        received_at_ns=request.app[STATE_KEY].clock.time_ns(),
    )
    recorder.trim(request.app[STATE_KEY].settings.max_records)
    request[RECORD_KEY] = record
    status: int | None = None
    try:
        response = await handler(request)
        status = response.status
        if isinstance(response, web.Response) and isinstance(response.body, bytes):
            record.response_body += response.body
        return response
    finally:
        await recorder.finish(record, status)


async def _drop_server_header(_request: web.Request, response: web.StreamResponse) -> None:
    """Ollama (Go net/http) sends no Server header."""
    response.headers.popall("Server", None)


def create_app(
    settings: SimulatorSettings,
    recorder: Recorder | None = None,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> web.Application:
    """The simulator as an aiohttp application; `clock` and `rng` make its output reproducible."""
    app = web.Application(middlewares=[record_middleware], client_max_size=MAX_BODY_BYTES)
    app[RECORDER_KEY] = recorder if recorder is not None else Recorder()
    app[STATE_KEY] = SimulatorState(
        settings,
        clock if clock is not None else SystemClock(),
        # Ollama's ids come from math/rand too: never secrets, and chatcmpl-N repeats.
        rng if rng is not None else random.Random(),  # noqa: S311 - see above
    )
    app.on_response_prepare.append(_drop_server_header)
    app.router.add_get("/_sim/requests", control_requests)
    app.router.add_post("/_sim/reset", control_reset)
    app.router.add_get("/_sim/settings", control_get_settings)
    app.router.add_post("/_sim/settings", control_set_settings)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ollama_simulator", description="A protocol-faithful fake Ollama server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port")
    parser.add_argument("--port-file", type=Path, help="write the bound port here (atomically)")
    parser.add_argument("--tokens-per-second", type=float, default=0.0)
    parser.add_argument("--ttft", type=float, default=0.0, help="time to first token, seconds")
    parser.add_argument("--completion-tokens", type=int, default=12)
    parser.add_argument("--thinking-tokens", type=int, default=4)
    parser.add_argument("--fail-after-chunks", type=int, default=None)
    parser.add_argument("--models", help="comma-separated installed models")
    parser.add_argument("--ollama-version", default=OLLAMA_VERSION, help="for /api/version")
    parser.add_argument("--queue-full", action="store_true")
    parser.add_argument("--embedding-dimensions", type=int, default=384)
    parser.add_argument(
        "--host-check",
        choices=("auto", "on", "off"),
        default="auto",
        help="Ollama's Host check; auto = on when listening on loopback, like Ollama",
    )
    parser.add_argument("--no-cors-check", action="store_true")
    return parser


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings_from_args(args: argparse.Namespace) -> SimulatorSettings:
    """SimulatorSettings from parsed CLI arguments."""
    host_check = args.host_check == "on" or (args.host_check == "auto" and _is_loopback(args.host))
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else None
    return SimulatorSettings(
        tokens_per_second=args.tokens_per_second,
        time_to_first_token=args.ttft,
        completion_tokens=args.completion_tokens,
        thinking_tokens=args.thinking_tokens,
        fail_after_chunks=args.fail_after_chunks,
        models=models if models is not None else DEFAULT_MODELS,
        version=args.ollama_version,
        queue_full=args.queue_full,
        embedding_dimensions=args.embedding_dimensions,
        host_check=host_check,
        cors_check=not args.no_cors_check,
    )


def write_port_file(path: Path, port: int) -> None:
    """Write the port so a reader never sees a partial file (temp file, then rename)."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{port}\n")
        Path(temp).replace(path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


async def serve(host: str, port: int, port_file: Path | None, settings: SimulatorSettings) -> None:
    """Run until SIGTERM or SIGINT, then shut down cleanly."""
    runner = web.AppRunner(create_app(settings), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = int(runner.addresses[0][1])
        if port_file is not None:
            write_port_file(port_file, bound)
        print(bound, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"ollama_simulator: {e}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):  # a SIGINT before the handlers are installed
        asyncio.run(serve(args.host, args.port, args.port_file, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
