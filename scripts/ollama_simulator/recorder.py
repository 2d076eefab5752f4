"""The record of every request the simulator received and what it answered."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from ollama_simulator.clock import rfc3339nano


@attrs.define
class PassRecord:
    """One runner call: the prompt tokens it evaluated and the tokens generated so far."""

    prompt_tokens: int
    completion_tokens: int = 0


@attrs.define
class GenerationRecord:
    """What one inference request produced.

    `passes` is the truth of the tokens the runner handled, also for a request the client
    abandoned: a pass's prompt tokens count once the runner takes the prompt, its completion
    tokens one by one as they are generated. Structured outputs on a thinking model run two
    passes (the thinking, then the formatted answer); Ollama reports only the last one.
    """

    endpoint: str
    model: str
    stream: bool
    completion_limit: int | None = None
    num_ctx: int | None = None
    # running, completed, cancelled (client went away), failed (injected failure)
    outcome: str = "running"
    chunks_sent: int = 0
    tokens_sent: int = 0
    done_reason: str | None = None
    # The counts as reported to the client (None when no final chunk/usage carried them).
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    passes: list[PassRecord] = attrs.field(factory=list)

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens evaluated over every pass."""
        return sum(p.prompt_tokens for p in self.passes)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated over every pass (delivered or not)."""
        return sum(p.completion_tokens for p in self.passes)

    def to_json(self) -> dict[str, Any]:
        body = attrs.asdict(self)
        body["prompt_tokens"] = self.prompt_tokens
        body["completion_tokens"] = self.completion_tokens
        return body


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
    finished_at_ns: int | None = None  # wall clock, as received_at_ns
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
            # Nanoseconds, so tests can tell which requests overlapped in time.
            "received_at_ns": self.received_at_ns,
            "finished_at_ns": self.finished_at_ns,
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

    async def finish(self, record: RequestRecord, status: int | None, *, finished_at_ns: int) -> None:
        record.status = status
        record.finished = True
        record.finished_at_ns = finished_at_ns
        if record.generation is not None and record.generation.outcome == "running":
            record.generation.outcome = "cancelled"
        await self._notify()

    async def _notify(self) -> None:
        if self._changed is None or self._loop is not asyncio.get_running_loop():
            return
        async with self._changed:
            self._changed.notify_all()

    async def wait_finished(
        self, count: int, counted: Callable[[RequestRecord], bool] = lambda _: True
    ) -> list[RequestRecord]:
        """Wait until at least `count` records (of those `counted`) are finished; returns all records.

        Callers bound the wait with `asyncio.timeout`.
        """
        loop = asyncio.get_running_loop()
        if self._changed is None or self._loop is not loop:
            self._changed, self._loop = asyncio.Condition(), loop
        changed = self._changed

        def enough() -> bool:
            return sum(1 for r in self._records if r.finished and counted(r)) >= count

        async with changed:
            await changed.wait_for(enough)
        return self.records
