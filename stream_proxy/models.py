"""What Ollama says about each model that bounds its prompts (docs/ARCHITECTURE.md#prompt-bound).

`/api/show` reports the template that wraps every prompt, the Modelfile SYSTEM and MESSAGEs that
are added to it, the PARAMETER num_ctx and the context length the model was trained for (Ollama
caps num_ctx there). The facts are asked of a backend that has the model and cached per model name
together with the model's digest (every backend that serves the name has that digest,
stream_proxy/backends.py); a poll that finds the digest changed (a model pulled again, or created
anew under the same name) drops the entry, so the next request asks `/api/show` again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import attrs
import orjson
from yarl import URL

from shared.backend_spec import BackendSpec
from stream_proxy.backends import ERRORS, MAX_ANSWER_BYTES, USER_AGENT, Backends, model_key
from stream_proxy.capped import read_capped
from stream_proxy.template_bound import Analysis, analyse

log = logging.getLogger("stream_proxy.models")
# How long a name Ollama does not describe stays unknown, and how many such names are kept.
UNKNOWN_SECONDS = 5.0
MAX_UNKNOWN = 4096
# The most of an /api/show or /api/tags answer read (a verbose show with a tokenizer is ~10 MB).


@attrs.frozen
class ModelFacts:
    """One model as `/api/show` describes it (sizes in UTF-8 bytes)."""

    digest: str | None
    template: Analysis
    system: int  # the Modelfile SYSTEM
    messages: tuple[tuple[str, int], ...]  # the Modelfile MESSAGEs: (role, content bytes)
    context_length: int | None  # <architecture>.context_length of model_info
    num_ctx: int | None  # PARAMETER num_ctx
    thinking: bool  # the "thinking" capability
    rendered: bool  # a built-in renderer writes the prompt: the template says nothing


def _size(value: Any) -> int:
    return len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else 0


def _positive(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return None
    return int(value)


def _parameter(parameters: str, name: str) -> int | None:
    """A numeric PARAMETER as `/api/show` lists them: one `name   value` per line."""
    found: int | None = None
    for line in parameters.splitlines():
        key, _, value = line.strip().partition(" ")
        if key == name:
            with contextlib.suppress(ValueError):
                found = _positive(float(value.strip()))
    return found


def facts_from_show(answer: dict[str, Any], digest: str | None) -> ModelFacts:
    """The facts in one `/api/show` answer."""
    info = answer.get("model_info")
    context = None
    if isinstance(info, dict):
        lengths = [
            _positive(v) for k, v in info.items() if isinstance(k, str) and k.endswith(".context_length")
        ]
        context = min((n for n in lengths if n is not None), default=None)
    messages = answer.get("messages")
    parameters = answer.get("parameters")
    capabilities = answer.get("capabilities")
    template = answer.get("template")
    # Ollama reports its default `{{ .Prompt }}` for a model without a template of its own, which
    # llama-server then renders with its own chat template: that says nothing.
    described = isinstance(template, str) and template.strip() not in ("", "{{ .Prompt }}")
    return ModelFacts(
        digest=digest,
        template=analyse(template) if described and isinstance(template, str) else Analysis(None, None),
        system=_size(answer.get("system")),
        messages=tuple(
            (str(m.get("role", "")), _size(m.get("content")))
            for m in (messages if isinstance(messages, list) else [])
            if isinstance(m, dict)
        ),
        context_length=context,
        num_ctx=_parameter(parameters, "num_ctx") if isinstance(parameters, str) else None,
        thinking=isinstance(capabilities, list) and "thinking" in capabilities,
        rendered=bool(answer.get("renderer")),
    )


@attrs.define
class ModelCatalog:
    """Facts per model, fetched on first use from a backend that has it, and dropped when the
    model's digest changes (stream_proxy/backends.py polls the backends and calls `forget_changed`)."""

    session: aiohttp.ClientSession
    backends: Backends
    timeout: float
    clock: Callable[[], float] = time.monotonic
    _facts: dict[str, ModelFacts] = attrs.field(init=False, factory=dict)
    _inflight: dict[str, asyncio.Future[ModelFacts | None]] = attrs.field(init=False, factory=dict)
    # Names Ollama did not describe, until when: requests naming them do not each cost a call.
    _unknown: dict[str, float] = attrs.field(init=False, factory=dict)

    @classmethod
    def single(
        cls, session: aiohttp.ClientSession, ollama: URL, *, timeout: float, interval: float = 30.0
    ) -> ModelCatalog:
        """A catalogue of one backend (tests, benchmarks)."""
        backends = Backends(session, [BackendSpec("ollama", ollama)], interval=interval, timeout=timeout)
        catalog = cls(session, backends, timeout)
        backends.on_change = lambda _: catalog.forget_changed()
        return catalog

    async def facts(self, name: str) -> ModelFacts | None:
        """The model's facts, or None when no backend describes it (unknown model, an error): the
        caller then bounds the prompt by the context length alone."""
        key = model_key(name)
        if key is None:
            return None
        known = self._facts.get(key)
        if known is not None:
            return known
        if self._unknown.get(key, -1e18) > self.clock():
            return None
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[ModelFacts | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            found = await self._fetch(name, key)
            future.set_result(found)
            return found
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it twice
            raise
        finally:
            del self._inflight[key]

    async def _fetch(self, name: str, key: str) -> ModelFacts | None:
        if not self.backends.candidates(key):
            await self.backends.refresh_on_miss()
        candidates = self.backends.candidates(key)
        if not candidates and len(self.backends.backends) == 1:
            candidates = self.backends.backends  # one backend alone is asked whatever its listing says
        answer = await self._show(candidates[0].url, name) if candidates else None
        if not isinstance(answer, dict):
            if len(self._unknown) >= MAX_UNKNOWN:
                self._unknown.clear()
            self._unknown[key] = self.clock() + UNKNOWN_SECONDS
            return None
        found = facts_from_show(answer, self.backends.digest(key))
        self._facts[key] = found
        return found

    async def _show(self, ollama: URL, name: str) -> Any:
        url = ollama.with_path("/api/show")
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        headers = {"User-Agent": USER_AGENT, "Content-Type": "application/json"}
        try:
            data = orjson.dumps({"model": name})
            async with self.session.post(url, data=data, timeout=timeout, headers=headers) as response:
                if response.status != 200:
                    return None
                answer = await read_capped(response, MAX_ANSWER_BYTES)
                if answer is None:
                    log.warning("ollama /api/show answered more than %d bytes", MAX_ANSWER_BYTES)
                    return None
                return orjson.loads(answer)
        except ERRORS as error:
            log.warning("ollama /api/show failed: %s", type(error).__name__)
            return None

    async def poll(self) -> None:
        """Poll every backend now (their catalogue, then the facts whose digest changed go)."""
        await self.backends.poll_all()
        self.forget_changed()

    def forget_changed(self) -> None:
        """Drop the facts of every model whose digest changed or that no backend has any more."""
        for key, facts in list(self._facts.items()):
            if self.backends.digest(key) != facts.digest:
                del self._facts[key]
