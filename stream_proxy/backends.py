"""Several Ollama backends: what each one has, and which one serves a request (docs/ARCHITECTURE.md#backends).

Each stream_proxy polls every backend on its own (no coordination, nothing in Redis): `/api/version`
for health (answered within the poll timeout), `/api/tags` for its models and their digests,
`/api/ps` for the models it has loaded. A backend that does not answer `/api/version` leaves the
rotation at that poll; the next poll that gets an answer brings it back.

A request for a model goes to a healthy backend that has the model with the digest of the first
backend (in configuration order) that has it, so every backend that serves a name serves the same
model and the prompt bound learnt from one holds for all. Among those: one with room under its
`max_parallel` (a request never waits behind a full backend while another has room); of those, one
with the model loaded, then the key's previous backend for the model (its loaded runner may still
hold the conversation's prompt in its cache), then the fewest requests in flight per unit of
capacity (`max_parallel` times weight). When every candidate is full the request waits for room,
in arrival order, up to the first-byte timeout.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import aiohttp
import attrs
import orjson
from aiohttp import web
from yarl import URL

from shared.backend_spec import BackendSpec
from shared.model_names import InvalidModelName, normalise
from stream_proxy.capped import read_capped
from stream_proxy.exceptions import Refused
from stream_proxy.relay import RelayResult

log = logging.getLogger("stream_proxy.backends")
# The catalogue's own requests say who sends them (tests leave them out of what reached Ollama).
USER_AGENT = "neuronetz-gateway model-catalogue"
MAX_ANSWER_BYTES = 32 * 1024 * 1024
ERRORS = (aiohttp.ClientError, TimeoutError, OSError, ValueError)
STICKY_KEYS = 100_000  # (key id, model) pairs remembered for stickiness, least recently used dropped


def model_key(name: str) -> str | None:
    """The name as the catalogue keys it (Ollama's own normalisation), None when it is no name."""
    try:
        return normalise(name)
    except InvalidModelName:
        return None


@attrs.define(eq=False)
class Backend:
    """One Ollama server and what its last poll said."""

    spec: BackendSpec
    healthy: bool = False
    models: dict[str, str] = attrs.Factory(dict)  # model key -> digest
    loaded: frozenset[str] = frozenset()
    in_flight: int = 0
    polled: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def url(self) -> URL:
        return self.spec.url

    @property
    def room(self) -> bool:
        """Fewer requests in flight than its `max_parallel`."""
        return self.spec.max_parallel is None or self.in_flight < self.spec.max_parallel

    def load(self) -> float:
        """Requests in flight per unit of capacity (`max_parallel` times weight)."""
        return self.in_flight / self.spec.capacity


@attrs.define
class Backends:
    """The backends of this stream_proxy, their catalogue, and the choice of one per request."""

    session: aiohttp.ClientSession
    specs: Sequence[BackendSpec]
    interval: float
    timeout: float
    clock: Callable[[], float] = time.monotonic
    on_change: Callable[[Backend], None] | None = None
    backends: list[Backend] = attrs.field(init=False)
    _waiters: list[tuple[int, str, asyncio.Future[None]]] = attrs.field(init=False, factory=list)
    _tickets: Iterator[int] = attrs.field(init=False, factory=itertools.count)
    _sticky: OrderedDict[tuple[int, str], str] = attrs.field(init=False, factory=OrderedDict)
    _rng: random.Random = attrs.field(init=False, factory=random.Random)
    _misses_at: float = attrs.field(init=False, default=-1e18)

    def __attrs_post_init__(self) -> None:
        self.backends = [Backend(spec) for spec in self.specs]

    # --- the catalogue ------------------------------------------------------------------------

    async def _get(self, backend: Backend, path: str) -> Any:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        url = backend.url.with_path(path)
        async with self.session.get(url, timeout=timeout, headers={"User-Agent": USER_AGENT}) as response:
            if response.status != 200:
                return None
            answer = await read_capped(response, MAX_ANSWER_BYTES)
            return None if answer is None else orjson.loads(answer)

    async def poll(self, backend: Backend) -> None:
        """One poll of one backend: health, then its models and the loaded ones."""
        was = backend.healthy
        try:
            version = await self._get(backend, "/api/version")
            backend.healthy = isinstance(version, dict)
            if backend.healthy:
                tags = await self._get(backend, "/api/tags")
                if isinstance(tags, dict) and isinstance(tags.get("models"), list):
                    backend.models = _digests(tags["models"])
                ps = await self._get(backend, "/api/ps")
                if isinstance(ps, dict) and isinstance(ps.get("models"), list):
                    backend.loaded = frozenset(_digests(ps["models"]))
        except ERRORS as error:
            backend.healthy = False
            if was:
                log.warning("backend %s stopped answering: %s", backend.name, type(error).__name__)
        backend.polled = True
        if backend.healthy != was:
            log.warning("backend %s is %s", backend.name, "back" if backend.healthy else "out of rotation")
            self._wake()
        if self.on_change is not None:
            self.on_change(backend)

    async def poll_all(self) -> None:
        """Poll every backend at once."""
        await asyncio.gather(*(self.poll(b) for b in self.backends))

    async def run(self) -> None:
        """Poll each backend every `interval` seconds (±20 %, so replicas drift apart), for ever."""

        async def each(backend: Backend) -> None:
            while True:
                await asyncio.sleep(self.interval * self._rng.uniform(0.8, 1.2))
                try:
                    await self.poll(backend)
                except Exception:  # one failed poll never stops the next
                    log.exception("backend poll failed")

        await asyncio.gather(*(each(b) for b in self.backends))

    def healthy(self) -> list[Backend]:
        """The backends in rotation, in configuration order."""
        return [b for b in self.backends if b.healthy]

    def digest(self, key: str) -> str | None:
        """The digest a model name stands for: the first healthy backend's (configuration order)."""
        for backend in self.backends:
            if backend.healthy and key in backend.models:
                return backend.models[key]
        return None

    def candidates(self, key: str) -> list[Backend]:
        """Healthy backends that have the model with that digest."""
        digest = self.digest(key)
        if digest is None:
            return []
        return [b for b in self.backends if b.healthy and b.models.get(key) == digest]

    async def refresh_on_miss(self) -> None:
        """A model no backend lists may have been pulled since the last poll: poll again, at most
        once a second."""
        if self.clock() - self._misses_at < 1.0:
            return
        self._misses_at = self.clock()
        await self.poll_all()

    # --- the choice -----------------------------------------------------------------------------

    def choose(self, key: str, key_id: int, exclude: Iterable[Backend] = ()) -> Backend | None:
        """The best candidate with room, or None (none has the model, or every one is full)."""
        skipped = set(map(id, exclude))
        options = [b for b in self.candidates(key) if id(b) not in skipped and b.room]
        if not options:
            return None
        previous = self._sticky.get((key_id, key))
        return min(
            options,
            key=lambda b: (key not in b.loaded, b.name != previous, b.load(), self.backends.index(b)),
        )

    def pick(self, key: str, exclude: Iterable[Backend] = ()) -> Backend | None:
        """A backend that has the model, for a request that generates nothing (`/api/show`): one
        with it loaded first, else the first in configuration order; no place is held."""
        skipped = set(map(id, exclude))
        options = [b for b in self.candidates(key) if id(b) not in skipped]
        return min(options, key=lambda b: (key not in b.loaded, self.backends.index(b)), default=None)

    async def acquire(
        self, key: str, key_id: int, *, wait: float, exclude: Iterable[Backend] = ()
    ) -> Backend | None:
        """A backend for the request, counted in flight until `release`. When every candidate is
        full it waits for room, in arrival order among requests for the same model, at most `wait`
        seconds. None: no backend has the model, or no room came in time."""
        excluded = list(exclude)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        ticket: int | None = None
        while True:
            queued = ticket is None and any(k == key for _, k, _ in self._waiters)
            chosen = None if queued else self.choose(key, key_id, excluded)
            if chosen is not None:
                chosen.in_flight += 1
                self._remember(key_id, key, chosen)
                return chosen
            if not [b for b in self.candidates(key) if b not in excluded]:
                return None
            left = deadline - loop.time()
            if left <= 0:
                return None
            if ticket is None:
                ticket = next(self._tickets)
            waiter = (ticket, key, loop.create_future())
            bisect.insort(self._waiters, waiter, key=lambda w: w[0])
            try:
                async with asyncio.timeout(left):
                    await waiter[2]
            except TimeoutError:
                return None
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def release(self, backend: Backend) -> None:
        """The request has finished with the backend."""
        backend.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        """Room may have appeared: every waiting request looks again, the longest waiting first."""
        waiting, self._waiters = self._waiters, []
        for _, _, turn in waiting:
            if not turn.done():
                turn.set_result(None)

    def _remember(self, key_id: int, key: str, backend: Backend) -> None:
        self._sticky[(key_id, key)] = backend.name
        self._sticky.move_to_end((key_id, key))
        if len(self._sticky) > STICKY_KEYS:
            self._sticky.popitem(last=False)


def _digests(models: list[Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    for model in models:
        if not isinstance(model, dict):
            continue
        key = model_key(str(model.get("model") or model.get("name") or ""))
        if key is not None and key not in found:
            digest = model.get("digest")
            found[key] = digest if isinstance(digest, str) else ""
    return found


def merge_listing(route: str, documents: Sequence[Any]) -> Any:
    """One listing from each healthy backend's, in configuration order: the union, each model once
    (the first backend's entry). `/api/tags` and `/api/ps` list `models`, `/v1/models` lists `data`."""
    field, name_of = ("data", "id") if route == "openai_models" else ("models", "model")
    merged: list[Any] = []
    seen: set[str] = set()
    for document in documents:
        items = document.get(field) if isinstance(document, dict) else None
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            name = str(item.get(name_of) or item.get("name") or "")
            key = model_key(name) or name
            if key in seen:
                continue
            seen.add(key)
            merged.append(item)
    if route == "openai_models":
        return {"object": "list", "data": merged}
    return {"models": merged}


@attrs.define
class MergedListing:
    """`/api/tags`, `/api/ps` or `/v1/models` asked of every healthy backend at once and answered
    as one listing (then filtered like any listing). A backend that fails is left out; when every
    one fails the answer is 502."""

    request: web.Request
    session: aiohttp.ClientSession
    backends: Sequence[Backend]
    route: str
    timeout: float
    max_buffered: int
    transform: Callable[[bytes], bytes] | None = None
    headers: dict[str, str] = attrs.Factory(dict)
    result: RelayResult = attrs.Factory(RelayResult)

    async def _one(self, backend: Backend) -> tuple[Any, str]:
        """One backend's listing and its Content-Type (None when it failed)."""
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        url = backend.url.with_path(self.request.path)
        try:
            async with self.session.get(url, timeout=timeout) as answer:
                if answer.status != 200:
                    return None, ""
                data = await read_capped(answer, self.max_buffered)
                if data is None:
                    raise Refused(502, f"upstream answer larger than {self.max_buffered} bytes")
                return orjson.loads(data), answer.headers.get("Content-Type", "application/json")
        except ERRORS:
            return None, ""

    async def run(self, payload: bytes | None) -> web.StreamResponse:
        """Answer the merged listing; raises Refused (502) when no backend answered."""
        del payload
        documents = await asyncio.gather(*(self._one(b) for b in self.backends))
        answered = [d for d, _ in documents if isinstance(d, dict)]
        content_type = next((t for d, t in documents if isinstance(d, dict)), "application/json")
        self.result.first_byte_at = time.time()
        if not answered:
            self.result.upstream_failed = True
            raise Refused(502, "no model server answered")
        self.result.upstream_status = self.result.status = 200
        data = orjson.dumps(merge_listing(self.route, answered))
        if self.transform is not None:
            data = self.transform(data)
        headers = {"Content-Type": content_type, **self.headers}
        response = web.Response(body=data, status=200, headers=headers)
        await response.prepare(self.request)
        await response.write_eof()
        self.result.bytes_relayed = len(data)
        return response
