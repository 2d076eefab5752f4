"""The installed models: their details, /api/tags, /api/ps and /api/show."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs
from aiohttp import web

from ollama_simulator.clock import rfc3339nano
from ollama_simulator.exceptions import (
    MSG_CLOUD_DISABLED,
    MSG_INVALID_NAME,
    MSG_MODEL_REQUIRED,
    ApiError,
)
from ollama_simulator.gofmt import fprint, sprintf
from ollama_simulator.gojson import FOREVER_NS, Binder
from ollama_simulator.names import (
    ModelName,
    _local_name,
    is_cloud_model,
    parse_model_name,
)
from ollama_simulator.profiles import PROFILES, ModelProfile, profile_for
from ollama_simulator.wire import gin_json

if TYPE_CHECKING:  # state.py builds on the catalog; handlers only name the Call type
    from ollama_simulator.state import Call

MODEL_MODIFIED_AT_NS: Final = 1_785_585_600_000_000_000  # 2026-08-01T12:00:00Z


@attrs.frozen
class ModelEntry:
    """One installed model: its name and the profile it was built from."""

    name: ModelName
    profile: ModelProfile
    modified_at_ns: int = MODEL_MODIFIED_AT_NS

    @property
    def display(self) -> str:
        return self.name.display()

    @property
    def full_name(self) -> str:
        """model.Name.String(), as capability errors name the model."""
        return f"{self.name.host}/{self.name.namespace}/{self.name.model}:{self.name.tag}"

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.key.encode()).hexdigest()

    @property
    def family(self) -> str:
        return self.profile.architecture

    @property
    def size(self) -> int:
        return self.profile.size

    @property
    def capabilities(self) -> tuple[str, ...]:
        return self.profile.capabilities

    @property
    def thinks(self) -> bool:
        return "thinking" in self.capabilities

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.profile.parameter_size,
            "quantization_level": self.profile.quantization_level,
        }


def model_entry(raw: str, profiles: Mapping[str, str] | None = None) -> ModelEntry:
    """An installed model: the profile `profiles` names for it (settings.model_profiles), else
    the one the name rule picks (profiles.profile_for)."""
    name = parse_model_name(raw)
    if name is None:
        raise ValueError(f"invalid model name: {raw!r}")
    chosen = {
        parsed.key: PROFILES[profile]
        for key, profile in (profiles or {}).items()
        if (parsed := parse_model_name(key)) is not None
    }
    return ModelEntry(name, chosen.get(name.key) or profile_for(name.model))


def _lookup(call: Call, raw: str, not_found: str) -> ModelEntry:
    """The installed model for a request name (cloud names are refused as with OLLAMA_NO_CLOUD)."""
    if is_cloud_model(raw):
        raise ApiError(403, MSG_CLOUD_DISABLED, native=True)
    name = parse_model_name(_local_name(raw))
    entry = call.state.find(name) if name is not None else None
    if entry is None:
        raise ApiError(404, not_found)
    return entry


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
    """PsHandler: context_length is the num_ctx the runner was loaded with."""
    state = call.state
    wall, now = state.clock.time_ns(), state.clock.monotonic_ns()
    for key, loaded in list(state.loaded.items()):
        if loaded.expires_ns <= now or key not in state.models:
            del state.loaded[key]
    running = sorted(state.loaded.items(), key=lambda item: item[1].expires_ns, reverse=True)
    models = []
    for key, loaded in running:
        entry = state.models[key]
        remaining = min(loaded.expires_ns - now, FOREVER_NS)
        models.append(
            {
                "name": entry.display,
                "model": entry.display,
                "size": entry.size,
                "digest": entry.digest,
                "details": entry.details(),
                "expires_at": rfc3339nano(wall + remaining),
                "size_vram": entry.size,
                "context_length": loaded.num_ctx,
            }
        )
    return gin_json(200, {"models": models})


def _quote(text: str) -> str:
    """parser.quote: triple quotes for multi-line text with a quote in it, quotes for spaces."""
    if "\n" in text or text.startswith(" ") or text.endswith(" "):
        return f'"""{text}"""' if '"' in text else f'"{text}"'
    return text


def _parameter_values(entry: ModelEntry) -> list[tuple[str, Any]]:
    """The PARAMETERs one per value (a list repeats its key), as the params layer holds them."""
    values: list[tuple[str, Any]] = []
    for key, value in entry.profile.parameters:
        values.extend((key, item) for item in (value if isinstance(value, list) else [value]))
    return values


def _modelfile(entry: ModelEntry) -> str:
    """GetModelInfo's modelfile: the header, then Model.String()'s commands in Ollama's order."""
    profile = entry.profile
    lines = [
        '# Modelfile generated by "ollama show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {entry.display}",
        "",
        f"FROM /root/.ollama/models/blobs/sha256-{entry.digest}",
        f"TEMPLATE {_quote(profile.template_text)}",
    ]
    if profile.system:
        lines.append(f"SYSTEM {_quote(profile.system)}")
    lines.extend(f"PARAMETER {key} {_quote(fprint(value))}" for key, value in _parameter_values(entry))
    lines.extend(f"MESSAGE {m.role} {_quote(m.content)}" for m in profile.messages)
    return "\n".join(lines) + "\n"


def _show_body(entry: ModelEntry) -> dict[str, Any]:
    """api.ShowResponse in field order (parameters as fmt's "%-30s %#v" per value)."""
    profile = entry.profile
    body: dict[str, Any] = {"modelfile": _modelfile(entry)}
    parameters = "\n".join(f"{key:<30} {sprintf('%#v', value)}" for key, value in _parameter_values(entry))
    if parameters:
        body["parameters"] = parameters
    body["template"] = profile.template_text
    if profile.system:
        body["system"] = profile.system
    body["details"] = entry.details()
    if profile.messages:
        body["messages"] = [{"role": m.role, "content": m.content} for m in profile.messages]
    body["model_info"] = dict(sorted(profile.model_info().items()))
    body["capabilities"] = list(entry.capabilities)
    body["modified_at"] = rfc3339nano(entry.modified_at_ns)
    return body


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
