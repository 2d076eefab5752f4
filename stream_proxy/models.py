"""What Ollama says about each model that bounds its prompts (docs/ARCHITECTURE.md#prompt-bound).

`/api/show` reports the template that wraps every prompt, the Modelfile SYSTEM and MESSAGEs that
are added to it, the PARAMETER num_ctx and the context length the model was trained for (Ollama
caps num_ctx there). The facts are cached per model name together with the model's digest from
`/api/tags`; a poll of `/api/tags` drops every entry whose digest changed (a model pulled again,
or created anew under the same name), so the next request asks `/api/show` again.
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

from shared.model_names import InvalidModelName, normalise
from stream_proxy.capped import read_capped
from stream_proxy.template_bound import Analysis, analyse

log = logging.getLogger("stream_proxy.models")
# The catalogue's own requests say who sends them (tests leave them out of what reached Ollama).
USER_AGENT = "neuronetz-gateway model-catalogue"
# How long a name Ollama does not describe stays unknown, and how many such names are kept.
UNKNOWN_SECONDS = 5.0
MAX_UNKNOWN = 4096
# The most of an /api/show or /api/tags answer read (a verbose show with a tokenizer is ~10 MB).
MAX_ANSWER_BYTES = 32 * 1024 * 1024
ERRORS = (aiohttp.ClientError, TimeoutError, OSError, ValueError)


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


def _key(name: str) -> str | None:
    try:
        return normalise(name)
    except InvalidModelName:
        return None


@attrs.define
class ModelCatalog:
    """Facts per model, fetched on first use and dropped when the model's digest changes."""

    session: aiohttp.ClientSession
    ollama: URL
    refresh: float
    timeout: float
    clock: Callable[[], float] = time.monotonic
    _facts: dict[str, ModelFacts] = attrs.field(init=False, factory=dict)
    _digests: dict[str, str] = attrs.field(init=False, factory=dict)
    _digests_at: float = attrs.field(init=False, default=-1e18)
    _inflight: dict[str, asyncio.Future[ModelFacts | None]] = attrs.field(init=False, factory=dict)
    # Names Ollama did not describe, until when: requests naming them do not each cost a call.
    _unknown: dict[str, float] = attrs.field(init=False, factory=dict)

    async def facts(self, name: str) -> ModelFacts | None:
        """The model's facts, or None when Ollama does not describe it (unknown model, an error):
        the caller then bounds the prompt by the context length alone."""
        key = _key(name)
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
        if key not in self._digests and self.clock() - self._digests_at > 1.0:
            await self.poll()
        answer = await self._get("/api/show", {"model": name})
        if not isinstance(answer, dict):
            if len(self._unknown) >= MAX_UNKNOWN:
                self._unknown.clear()
            self._unknown[key] = self.clock() + min(self.refresh, UNKNOWN_SECONDS)
            return None
        found = facts_from_show(answer, self._digests.get(key))
        self._facts[key] = found
        return found

    async def _get(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        url = self.ollama.with_path(path)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        headers = {"User-Agent": USER_AGENT, "Content-Type": "application/json"}
        try:
            if payload is None:
                request = self.session.get(url, timeout=timeout, headers=headers)
            else:
                data = orjson.dumps(payload)
                request = self.session.post(url, data=data, timeout=timeout, headers=headers)
            async with request as response:
                if response.status != 200:
                    return None
                answer = await read_capped(response, MAX_ANSWER_BYTES)
                if answer is None:
                    log.warning("ollama %s answered more than %d bytes", path, MAX_ANSWER_BYTES)
                    return None
                return orjson.loads(answer)
        except ERRORS as error:
            log.warning("ollama %s failed: %s", path, type(error).__name__)
            return None

    async def poll(self) -> None:
        """Read `/api/tags` and drop the facts of every model whose digest changed or is gone."""
        answer = await self._get("/api/tags")
        if not isinstance(answer, dict) or not isinstance(answer.get("models"), list):
            return
        digests: dict[str, str] = {}
        for model in answer["models"]:
            if isinstance(model, dict) and isinstance(model.get("digest"), str):
                key = _key(str(model.get("model") or model.get("name") or ""))
                if key is not None:
                    digests[key] = model["digest"]
        self._digests, self._digests_at = digests, self.clock()
        for key, facts in list(self._facts.items()):
            if digests.get(key) != facts.digest:
                del self._facts[key]

    async def run(self) -> None:
        """Poll `/api/tags` every `refresh` seconds for as long as the process lives."""
        while True:
            await asyncio.sleep(self.refresh)
            try:
                await self.poll()
            except Exception:  # one failed poll never stops the next
                log.exception("model catalogue poll failed")
