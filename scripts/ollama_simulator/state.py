"""The mutable state of one simulator and the per-request Call handlers receive."""

from __future__ import annotations

import random
from typing import Final

import attrs
from aiohttp import web

from ollama_simulator.catalog import ModelEntry, model_entry
from ollama_simulator.clock import Clock, rfc3339nano
from ollama_simulator.exceptions import MSG_MISSING_BODY, ApiError
from ollama_simulator.gojson import (
    DEFAULT_KEEP_ALIVE_NS,
    BindError,
    EmptyBody,
    GoObject,
    bind_root,
    parse_go_json,
)
from ollama_simulator.names import ModelName
from ollama_simulator.recorder import GenerationRecord, Recorder, RequestRecord
from ollama_simulator.settings import SimulatorSettings
from ollama_simulator.tokens import Vocabulary


@attrs.frozen
class Loaded:
    """A loaded runner: when it expires (monotonic) and the num_ctx it runs with."""

    expires_ns: int
    num_ctx: int


@attrs.define
class SimulatorState:
    """Mutable state of one simulator: settings, installed and loaded models, blobs."""

    initial: SimulatorSettings
    clock: Clock
    rng: random.Random
    settings: SimulatorSettings = attrs.field(init=False)
    models: dict[str, ModelEntry] = attrs.field(init=False, factory=dict)
    loaded: dict[str, Loaded] = attrs.field(init=False, factory=dict)
    blobs: set[str] = attrs.field(init=False, factory=set)
    # Token ids for /api/generate's context; kept across resets so old contexts still decode.
    vocabulary: Vocabulary = attrs.field(init=False, factory=Vocabulary)

    def __attrs_post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.apply(self.initial)
        self.loaded.clear()
        self.blobs.clear()

    def apply(self, settings: SimulatorSettings) -> None:
        changed_models = (
            not hasattr(self, "settings")
            or settings.models != self.settings.models
            or settings.model_profiles != self.settings.model_profiles
        )
        self.settings = settings
        if changed_models:
            self.models = {}
            for raw in settings.models:
                entry = model_entry(raw, settings.model_profiles)
                self.models[entry.name.key] = entry

    def find(self, name: ModelName) -> ModelEntry | None:
        return self.models.get(name.key)

    def install(self, raw: str) -> None:
        entry = model_entry(raw, self.settings.model_profiles)
        self.models[entry.name.key] = entry

    def touch(self, entry: ModelEntry, keep_alive_ns: int | None, now_monotonic: int, num_ctx: int) -> None:
        """The model was used: (re)load it with its keep_alive (0 unloads it at once) and the
        request's num_ctx (a different num_ctx reloads the runner).

        Expiry is kept on the monotonic clock so that loading reads no extra wall time.
        """
        keep = DEFAULT_KEEP_ALIVE_NS if keep_alive_ns is None else keep_alive_ns
        if keep == 0:
            self.loaded.pop(entry.name.key, None)
        else:
            self.loaded[entry.name.key] = Loaded(now_monotonic + keep, num_ctx)

    def touch_now(self, entry: ModelEntry, keep_alive_ns: int | None, num_ctx: int) -> None:
        self.touch(entry, keep_alive_ns, self.clock.monotonic_ns(), num_ctx)


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
