"""`scripts/chaos`: kill (SIGKILL) and restart every real component under a steady streaming load,
then prove the books still balance.

The stack is scripts/localstack.py's (Postgres, Valkey, the Ollama simulator, authz_sidecar with
GATEWAY_ACCOUNTANT=off, stream_proxy, Caddy) plus one standalone accountant, with short leases so
lease-expiry charges land within seconds. Components are taken one at a time ("phases"); each phase
has a tenant of its own with one key per client (one of them with a total budget that runs out
during the phase). N clients stream `/api/chat` and `/v1/chat/completions` through Caddy; every
request carries a marker in its prompt and a model name of its own (`llama3.2:n<seq>`), so what the
client saw, what Ollama received and the ledger row pair up. After some seconds of load the component
is SIGKILLed (Postgres: the postmaster; Valkey: the server), brought back after a pause on the same
port with the same arguments and environment (Postgres on its data directory, held in recovery for a
while as a long crash recovery would be; Valkey empty), and the load goes on. Once the load stopped
and the accountant caught up, `judge` checks:

- as designed: besides complete 200s, clients saw only what the failure tables of
  docs/ARCHITECTURE.md#failure-behaviour and docs/DEPLOYMENT.md promise for that component (`AS_DESIGNED`);
- 200s served: every 200 a client saw is a request the simulator received, each at most once;
- ledger = simulator: every completed request has one ledger row with exactly the simulator's
  prompt_eval_count and eval_count, unflagged; rows of incomplete requests are flagged estimated;
- no duplicates: one ledger row per request;
- leases: no lease is ever set beyond its TTL, none outlives its request by more than the TTL, none
  is live a TTL after the last request ended, no key holds more live leases than its concurrency
  limit, and lease-expiry charges land within the sweep grace plus two sweep periods;
- budgets: no budget is exceeded (by the ledger, and by the tokens Ollama reported);
- counters: Redis budget counters equal budget_periods equal the ledger sums, before and after
  `rebuild-counters`;
- recovered: the first 200 within a lease TTL + 2 s of the restart, nothing but complete 200s in
  the last seconds of load, and never a 500;
- logs clean: no error line (traceback) in the sidecar, stream_proxy or accountant logs;
- settled: no reservation left open, the usage stream fully applied, no spooled event.

Documented losses are accepted exactly, not loosely (see `judge`): when Valkey dies, the usage events
still on its stream are lost with it (docs/DEPLOYMENT.md §5: completed requests that ended just
before the kill may have no ledger row) and open reservations are lost (a budget can be exceeded by
at most the requests in flight at the kill); a budget counter rebuilt in the instant between the
accountant's Postgres write and its Redis settle counts that request twice (docs/DECISIONS.md, an
overcount). When stream_proxy dies, its requests' reservations are charged at lease expiry, flagged
`lease_expired` (their rows name no model, so they are matched per key by count).

`scripts/chaos [--quick] [--components a,b] ...` prints a table and exits 1 if any check failed;
tests/e2e/test_chaos.py runs a CI-sized subset with the same harness.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import attrs
import coredis
import orjson
from coredis.response.types import ScoredMember
from rich.console import Console
from rich.table import Table

import localstack
from shared import admin, counters
from shared.db import asyncpg_dsn
from shared.redis_keys import RedisKeys

COMPONENTS = ("valkey", "postgres", "authz_sidecar", "stream_proxy", "accountant", "simulator", "caddy")
# What clients may see besides complete 200s while a component is dead or coming back, from the failure
# tables of docs/ARCHITECTURE.md#failure-behaviour and docs/DEPLOYMENT.md §7 (429 from client 0's spent
# budget is always allowed).
AS_DESIGNED: dict[str, frozenset[str]] = {
    "valkey": frozenset({"503"}),  # sidecar 503 + Retry-After; nothing reaches Ollama
    "postgres": frozenset(),  # cached, verified keys keep working while their budgets are in Redis
    "authz_sidecar": frozenset({"502", "503"}),  # Caddy cannot ask it
    # the streams it relayed end; Caddy cannot reach it; leases of requests it never took hold a
    # concurrency slot until they expire
    "stream_proxy": frozenset({"200 cut", "502", "503", "429"}),
    "accountant": frozenset(),  # nothing visible
    "simulator": frozenset({"200 cut", "502", "504"}),  # Ollama down: 502 / 504
    "caddy": frozenset({"no answer", "200 cut"}),
}
MODEL_FAMILY = "llama3.2"
MODEL_SLOTS = 2000  # model names registered with the simulator: requests per client and phase
MODEL_RE = re.compile(r"^llama3\.2:n([0-9]+)$")
MARKER_RE = re.compile(r"chaos([0-9a-f]+)p([0-9]+)c([0-9]+)n([0-9]+)")
PREFIX = "chaos:"
BIG = 10**9  # budgets that must exist (so their counters do) but never bind
# A completed request may miss its ledger row after a Valkey kill only if its usage event was on the
# stream then: it ended at most this long before the kill (the accountant applies within ms) ...
VALKEY_LOST_BEFORE = 5.0
# ... or a moment after it (the event is written right after the last byte leaves stream_proxy,
# which can be before Caddy has handed that byte to the client).
VALKEY_LOST_AFTER = 0.5
TOLERANCE_MS = 250  # clock reading skew between Redis TIME and the services' time.time()
SWEEP_INTERVAL = 2.0  # the accountant's maintenance period (claim, sweep, trim)
REDIS_TIME = "return redis.call('TIME')"
STOP_SECONDS = 45.0  # clients finish their request in flight within the client timeout (30 s)
console = Console(highlight=False)


@attrs.frozen
class Config:
    """How hard and how long to shake each component."""

    clients: int = 8
    load_seconds: float = 30.0  # load per phase
    kill_after: float = 10.0  # seconds of load before the kill
    down_seconds: float = 3.0  # how long the component stays dead
    postgres_recovery: float = 2.0  # then Postgres stays in recovery (refusing clients) this long
    lease_ttl: float = 3.0
    sweep_grace: float = 1.0
    claim_idle: float = 2.0
    tokens_per_second: float = 50.0  # simulator pace
    completion_tokens: int = 20  # simulator answer length (natural stop)
    num_predict: int = 24  # the completion limit clients ask for
    settle_seconds: float = 60.0  # at most this long for everything to settle after the load
    tail_seconds: float = 4.0  # the last seconds of load that must be all 200s

    @property
    def max_recovery(self) -> float:
        """Seconds from a restart to the first 200: a lease TTL (slots held by requests the dead
        component dropped) plus two seconds (Caddy's health checks run every second)."""
        return self.lease_ttl + 2.0

    @property
    def tight_budget(self) -> int:
        """Total-token budget of client 0's key: spent about halfway through a phase."""
        return int(40 * self.load_seconds)

    @property
    def environment(self) -> dict[str, str]:
        """What every gateway process of the chaos stack reads on top of LocalStack's settings."""
        return {
            "GATEWAY_ACCOUNTANT": "off",
            "GATEWAY_LEASE_TTL": str(self.lease_ttl),
            "GATEWAY_ACCOUNTANT_SWEEP_GRACE": str(self.sweep_grace),
            "GATEWAY_ACCOUNTANT_CLAIM_IDLE": str(self.claim_idle),
            "GATEWAY_LOG_LEVEL": "INFO",
        }


QUICK = Config(clients=6, load_seconds=12.0, kill_after=3.5, down_seconds=2.0, tail_seconds=3.0)


# --- what the clients saw -----------------------------------------------------------------------


@attrs.define
class Attempt:
    """One request as its client saw it."""

    run: str
    phase: int
    client: int
    seq: int
    api: str  # native | openai
    sent_at: float
    headers_at: float | None = None
    ended_at: float = 0.0
    status: int = 0  # 0: no HTTP answer at all
    completed: bool = False  # the whole stream, with the final token counts
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    chunks: int = 0
    error: str = ""

    @property
    def marker(self) -> str:
        """The tag in the prompt: which run, phase, client and request."""
        return marker(self.run, self.phase, self.client, self.seq)

    @property
    def model(self) -> str:
        """A model name of the request's own (the ledger stores it)."""
        return f"{MODEL_FAMILY}:n{self.seq}"

    @property
    def label(self) -> str:
        """Short name for reports."""
        return f"client {self.client} request {self.seq} ({self.api}, {self.outcome})"

    @property
    def outcome(self) -> str:
        """Status as counted in the report."""
        if self.status == 0:
            return "no answer"
        if self.status == 200:
            return "200" if self.completed else "200 cut"
        return str(self.status)


def marker(run: str, phase: int, client: int, seq: int) -> str:
    """The marker of one request."""
    return f"chaos{run}p{phase}c{client}n{seq}"


def request_body(attempt: Attempt, num_predict: int) -> dict[str, Any]:
    """A streamed chat with the attempt's marker and model."""
    messages = [{"role": "user", "content": f"{attempt.marker}: tell me about resilience"}]
    if attempt.api == "native":
        return {
            "model": attempt.model,
            "messages": messages,
            "stream": True,
            "options": {"num_predict": num_predict},
        }
    return {
        "model": attempt.model,
        "messages": messages,
        "stream": True,
        "max_tokens": num_predict,
        "stream_options": {"include_usage": True},
    }


def read_line(attempt: Attempt, line: bytes, state: dict[str, bool]) -> None:
    """Meter one NDJSON line or SSE line as the client sees it; `state["done"]` marks the end."""
    if attempt.api == "openai":
        if not line.startswith(b"data: "):
            return
        data = line[6:]
        if data == b"[DONE]":
            state["done"] = True
            return
        doc = orjson.loads(data)
        usage = doc.get("usage")
        if isinstance(usage, dict):
            attempt.prompt_tokens = usage.get("prompt_tokens")
            attempt.completion_tokens = usage.get("completion_tokens")
        for choice in doc.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                attempt.chunks += 1
        return
    doc = orjson.loads(line)
    if "error" in doc:
        attempt.error = "error line in the stream"
    elif doc.get("done") is True:
        attempt.prompt_tokens = doc.get("prompt_eval_count")
        attempt.completion_tokens = doc.get("eval_count")
        state["done"] = True
    elif (doc.get("message") or {}).get("content"):
        attempt.chunks += 1


async def send(http: aiohttp.ClientSession, url: str, key: str, attempt: Attempt, num_predict: int) -> None:
    """Make one streamed request and record what came back."""
    path = "/api/chat" if attempt.api == "native" else "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {key}"}
    state = {"done": False}
    try:
        async with http.post(url + path, json=request_body(attempt, num_predict), headers=headers) as resp:
            attempt.headers_at = time.time()
            attempt.status = resp.status
            if resp.status != 200:
                body = (await resp.read())[:300]
                attempt.error = body.decode("utf-8", "replace")
                return
            async for raw in resp.content:
                line = raw.strip()
                if line:
                    read_line(attempt, line, state)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        attempt.error = attempt.error or type(exc).__name__
    finally:
        attempt.ended_at = time.time()
        attempt.completed = (
            attempt.status == 200
            and state["done"]
            and attempt.prompt_tokens is not None
            and attempt.completion_tokens is not None
            and not attempt.error
        )


@attrs.define
class Load:
    """N clients, each streaming one request after another with a key of its own."""

    run: str
    phase: int
    url: str
    keys: list[str]
    num_predict: int
    attempts: list[Attempt] = attrs.field(factory=list)
    stopping: asyncio.Event = attrs.field(factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = attrs.field(factory=list)

    def start(self, http: aiohttp.ClientSession) -> None:
        """Start every client."""
        self._tasks = [asyncio.create_task(self._client(http, i, k)) for i, k in enumerate(self.keys)]

    async def _client(self, http: aiohttp.ClientSession, index: int, key: str) -> None:
        for seq in range(MODEL_SLOTS):
            if self.stopping.is_set():
                return
            api = "native" if (seq + index) % 2 == 0 else "openai"
            attempt = Attempt(self.run, self.phase, index, seq, api, sent_at=time.time())
            self.attempts.append(attempt)
            await send(http, self.url, key, attempt, self.num_predict)
            if attempt.status != 200 or not attempt.completed:
                # No hot loop on refusals; still a steady load.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), 0.2)

    async def stop(self) -> None:
        """Let every client finish its request in flight (bounded by the client timeout), then stop."""
        self.stopping.set()
        _, pending = await asyncio.wait(self._tasks, timeout=STOP_SECONDS)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# --- leases, watched while the load runs --------------------------------------------------------


@attrs.define
class LeaseWatch:
    """Samples the phase tenant's lease sets (scores are expiry times, Redis ms)."""

    ttl_ms: int
    max_concurrent: int
    max_score: dict[str, int] = attrs.field(factory=dict)
    problems: list[str] = attrs.field(factory=list)
    samples: int = 0

    def observe(self, now_ms: int, scope: str, members: Sequence[tuple[str, int]]) -> None:
        """One sample of one scope's leases."""
        self.samples += 1
        live = 0
        for request_id, score in members:
            self.max_score[request_id] = max(score, self.max_score.get(request_id, 0))
            if score > now_ms + self.ttl_ms + TOLERANCE_MS:
                self.problems.append(
                    f"lease {request_id} ({scope}) expires {(score - now_ms) / 1000:.2f} s ahead, "
                    f"more than the TTL"
                )
            live += score > now_ms
        if scope != "t" and live > self.max_concurrent:
            self.problems.append(f"{live} live leases on key scope {scope} (limit {self.max_concurrent})")


async def leases_now(
    redis: coredis.Redis[bytes], keys: RedisKeys, tenant_id: int, scopes: Sequence[str]
) -> tuple[int, dict[str, list[tuple[str, int]]]]:
    """Redis TIME (ms) and, at that same instant (one transaction), the (request id, expiry ms)
    members of the scopes' lease sets."""
    async with redis.pipeline(transaction=True) as pipe:
        # Not pipe.time(): coredis 6.9.0 reads TIME's microseconds as nanoseconds (up to 1 s early).
        clock = pipe.eval(REDIS_TIME)
        sets = [pipe.zrange(keys.leases(tenant_id, scope), 0, -1, withscores=True) for scope in scopes]
    reply: Any = await clock
    now_ms = int(reply[0]) * 1000 + int(reply[1]) // 1000
    found: dict[str, list[tuple[str, int]]] = {}
    for scope, pending in zip(scopes, sets, strict=True):
        members = found.setdefault(scope, [])
        for item in await pending:
            if isinstance(item, ScoredMember):
                member = item.member.decode() if isinstance(item.member, bytes) else str(item.member)
                members.append((member, int(item.score)))
    return now_ms, found


# --- one phase ----------------------------------------------------------------------------------


@attrs.define
class Phase:
    """One component's turn: who, when, and what the clients saw."""

    run: str
    index: int
    component: str
    tenant_id: int
    tenant_name: str
    key_ids: list[int]
    key_budgets: list[dict[str, int]]  # per client: limit name -> value
    tenant_budgets: dict[str, int]
    load: Load
    lease_watch: LeaseWatch
    started: float
    kill_at: float = 0.0
    restart_begun: float = 0.0
    restart_at: float = 0.0  # when the component listened again
    load_end: float = 0.0
    snapshot_at: float | None = None  # simulator records saved just before a simulator kill
    snapshot: list[dict[str, Any]] = attrs.field(factory=list)
    log_offsets: dict[str, int] = attrs.field(factory=dict)
    dead_letters_before: int = 0

    @property
    def attempts(self) -> list[Attempt]:
        """Every request of the phase."""
        return self.load.attempts


@attrs.frozen
class Row:
    """One ledger row."""

    request_id: str
    key_id: int
    model: str | None
    prompt: int
    completion: int
    total: int
    reserved: int
    estimated: bool
    reason: str | None
    http_status: int
    started: float
    finished: float
    recorded: float


@attrs.frozen
class SimRecord:
    """What the simulator says about one chat request it received."""

    marker: str
    finished: bool
    outcome: str | None
    prompt: int | None
    completion: int | None
    tokens_sent: int


@attrs.define
class Evidence:
    """Everything `judge` looks at, gathered once the phase settled."""

    rows: list[Row]
    duplicate_request_ids: list[str]
    records: dict[str, list[SimRecord]]
    foreign_records: list[str]  # chat requests the simulator saw without a marker of this phase
    periods: dict[tuple[str, int, str, str], int]  # (scope, id, period, start) -> tokens
    live_counters: dict[tuple[str, int, str, str], int | None]
    rebuilt_counters: dict[tuple[str, int, str, str], int | None]
    end_leases: list[str]
    dead_letters: list[str]
    log_errors: list[str]
    settled: bool
    settle_detail: str


@attrs.frozen
class Check:
    """One named verdict."""

    name: str
    ok: bool
    detail: str = ""


@attrs.define
class PhaseResult:
    """What one phase showed."""

    component: str
    statuses: Counter[str]
    requests: int
    down: float
    recovery: float | None
    checks: list[Check]
    notes: list[str]

    @property
    def ok(self) -> bool:
        """Every check passed."""
        return all(c.ok for c in self.checks)


def _check(name: str, problems: list[str]) -> Check:
    shown = "; ".join(problems[:6]) + (f"; … {len(problems) - 6} more" if len(problems) > 6 else "")
    return Check(name, not problems, shown)


def judge(phase: Phase, ev: Evidence, config: Config) -> tuple[list[Check], list[str]]:
    """The verdicts on one phase (pure: everything comes from `phase` and `ev`)."""
    component, attempts = phase.component, phase.attempts
    notes: list[str] = []
    row: Row | None
    by_marker = {a.marker: a for a in attempts}

    # --- 200s served -----------------------------------------------------------------------------
    served: list[str] = [f"Ollama received a chat nobody here sent: {m}" for m in ev.foreign_records[:3]]
    for mark, recs in ev.records.items():
        if mark not in by_marker:
            served.append(f"Ollama received {mark}, which no client sent")
        if len(recs) > 1:
            served.append(f"Ollama received {mark} {len(recs)} times")
    lost_with_simulator: set[str] = set()
    for a in attempts:
        if a.status != 200 or a.marker in ev.records:
            continue
        if (
            component == "simulator"
            and phase.snapshot_at is not None
            and a.headers_at is not None
            and phase.snapshot_at <= a.headers_at <= phase.restart_at
            and not a.completed
        ):
            lost_with_simulator.add(a.marker)  # received after the last look, then killed
            continue
        served.append(f"{a.label}: a 200 for a request Ollama never received")
    if lost_with_simulator:
        notes.append(
            f"{len(lost_with_simulator)} cut streams reached the simulator after its last record "
            "was saved, just before it was killed"
        )

    # --- ledger = simulator ----------------------------------------------------------------------
    key_client = {key_id: i for i, key_id in enumerate(phase.key_ids)}
    linked: dict[str, list[Row]] = defaultdict(list)
    unlinked: list[Row] = []
    for row in ev.rows:
        found = MODEL_RE.match(row.model or "")
        client = key_client.get(row.key_id)
        if found is None or client is None:
            unlinked.append(row)
        else:
            linked[marker(phase.run, phase.index, client, int(found.group(1)))].append(row)
    ledger: list[str] = [f"usage event dead-lettered: {d}" for d in ev.dead_letters]
    valkey_lost: list[Attempt] = []
    need_charge: Counter[int] = Counter()  # per client: requests only a lease-expiry charge can cover
    may_charge: Counter[int] = Counter()  # per client: requests a dying stream_proxy may have reserved
    unserved_charged = unserved_tokens = 0
    for a in attempts:
        rows = linked.get(a.marker, [])
        row = rows[0] if rows else None
        recs = ev.records.get(a.marker, [])
        rec = recs[-1] if recs else None
        reached = rec is not None or a.marker in lost_with_simulator
        if a.completed:
            seen = (a.prompt_tokens, a.completion_tokens)
            if rec is not None and rec.outcome == "completed" and (rec.prompt, rec.completion) != seen:
                ledger.append(
                    f"{a.label}: the client saw {seen}, Ollama reported {(rec.prompt, rec.completion)}"
                )
            if row is None:
                if (
                    component == "valkey"
                    and phase.kill_at - VALKEY_LOST_BEFORE <= a.ended_at <= phase.kill_at + VALKEY_LOST_AFTER
                ):
                    valkey_lost.append(a)
                elif component == "stream_proxy":
                    need_charge[a.client] += 1
                else:
                    ledger.append(f"{a.label}: completed, but no ledger row")
            elif row.estimated or (row.prompt, row.completion) != seen or row.http_status != 200:
                ledger.append(
                    f"{a.label}: Ollama reported {seen}, the ledger has ({row.prompt}, {row.completion}) "
                    f"status {row.http_status} estimated={row.reason}"
                )
        elif reached:
            if row is None:
                if component == "stream_proxy":
                    need_charge[a.client] += 1
                else:
                    ledger.append(f"{a.label}: reached Ollama, but no ledger row")
            elif not row.estimated:
                if (
                    rec is None
                    or rec.outcome != "completed"
                    or (rec.prompt, rec.completion) != (row.prompt, row.completion)
                ):
                    ledger.append(f"{a.label}: an unflagged row for an answer Ollama did not complete")
            elif rec is not None and rec.finished and row.completion > rec.tokens_sent:
                ledger.append(
                    f"{a.label}: {row.completion} completion tokens charged, Ollama sent {rec.tokens_sent}"
                )
        elif row is not None:
            if row.http_status == 200:
                ledger.append(f"{a.label}: the ledger has a 200 for a request Ollama never received")
            if row.total > 0 and not row.estimated:
                ledger.append(f"{a.label}: unflagged tokens for a request Ollama never received")
            elif row.total > 0:
                unserved_charged += 1
                unserved_tokens += row.total
        elif component == "stream_proxy" and a.status in (0, 200, 502):
            may_charge[a.client] += 1
    charged: Counter[int] = Counter()
    for row in unlinked:
        if row.reason != "lease_expired" or row.key_id not in key_client:
            ledger.append(
                f"ledger row {row.request_id} matches no client request ({row.model}, {row.reason})"
            )
            continue
        charged[key_client[row.key_id]] += 1
        if row.total != row.reserved:
            ledger.append(
                f"lease-expiry charge {row.request_id}: {row.total} tokens, reserved {row.reserved}"
            )
    for client in sorted(set(charged) | set(need_charge)):
        low, high = need_charge[client], need_charge[client] + may_charge[client]
        if not low <= charged[client] <= high:
            ledger.append(
                f"client {client}: {charged[client]} lease-expiry charges, expected {low}..{high} "
                "(requests cut by the killed stream_proxy)"
            )
    if charged:
        notes.append(f"{sum(charged.values())} reservations charged at lease expiry (lease_expired)")
    if valkey_lost:
        notes.append(
            f"{len(valkey_lost)} completed requests have no ledger row: their usage events were on the "
            "Valkey stream, not yet applied, when it died (documented)"
        )
    if unserved_charged:
        notes.append(
            f"{unserved_charged} requests Ollama never received were charged {unserved_tokens} tokens "
            "(estimated prompt, upstream_failed)"
        )

    # --- no duplicates ---------------------------------------------------------------------------
    duplicates = [f"request id {r} appears twice in the ledger" for r in ev.duplicate_request_ids]
    duplicates += [
        f"{by_marker[m].label if m in by_marker else m}: {len(rows)} ledger rows"
        for m, rows in linked.items()
        if len(rows) > 1
    ]

    # --- leases ----------------------------------------------------------------------------------
    leases = list(phase.lease_watch.problems)
    ttl_ms = int(config.lease_ttl * 1000)
    finished = {row.request_id: row for row in ev.rows}
    for request_id, score in phase.lease_watch.max_score.items():
        row = finished.get(request_id)
        if (
            row is not None
            and row.reason != "lease_expired"
            and score > row.finished * 1000 + ttl_ms + TOLERANCE_MS
        ):
            leases.append(
                f"lease {request_id} lived until {(score / 1000 - row.finished):.2f} s after its "
                "request ended"
            )
    leases += [f"lease {r} still live a TTL after the last request ended" for r in ev.end_leases]
    late_by = (
        config.sweep_grace + 2 * SWEEP_INTERVAL + 2.0
    )  # grace, a sweep period and a blocking read, slack
    for row in unlinked:
        if row.reason == "lease_expired" and row.recorded - row.finished > late_by:
            leases.append(
                f"lease-expiry charge {row.request_id} recorded {row.recorded - row.finished:.1f} s after "
                f"the lease expired (at most {late_by:.1f} s)"
            )

    # --- budgets ---------------------------------------------------------------------------------
    budgets: list[str] = []
    in_flight: Counter[tuple[str, int]] = Counter()  # tokens of requests in flight at a Valkey kill
    lost_tokens: Counter[tuple[str, int]] = Counter()
    if component == "valkey":
        for row in ev.rows:
            if row.started <= phase.kill_at <= row.finished:
                in_flight[("key", row.key_id)] += row.total
                in_flight[("tenant", phase.tenant_id)] += row.total
        for a in valkey_lost:
            tokens = (a.prompt_tokens or 0) + (a.completion_tokens or 0)
            lost_tokens[("key", phase.key_ids[a.client])] += tokens
            lost_tokens[("tenant", phase.tenant_id)] += tokens
    charged_sum: Counter[tuple[str, int]] = Counter()
    for row in ev.rows:
        charged_sum[("key", row.key_id)] += row.total
        charged_sum[("tenant", phase.tenant_id)] += row.total
    reported: Counter[tuple[str, int]] = Counter()
    for a in attempts:
        rec = next(iter(ev.records.get(a.marker, [])), None)
        if rec is not None and rec.outcome == "completed":
            tokens = (rec.prompt or 0) + (rec.completion or 0)
        elif a.completed:
            tokens = (a.prompt_tokens or 0) + (a.completion_tokens or 0)
        else:
            continue
        reported[("key", phase.key_ids[a.client])] += tokens
        reported[("tenant", phase.tenant_id)] += tokens
    scopes: list[tuple[tuple[str, int], dict[str, int]]] = [
        (("tenant", phase.tenant_id), phase.tenant_budgets)
    ]
    scopes += [(("key", k), b) for k, b in zip(phase.key_ids, phase.key_budgets, strict=True)]
    for scope, limits in scopes:
        for name, limit in limits.items():
            excess = in_flight[scope]
            if charged_sum[scope] > limit + excess:
                budgets.append(
                    f"{scope[0]} {scope[1]} {name}: ledger {charged_sum[scope]} > {limit} + {excess}"
                )
            if reported[scope] > limit + excess + lost_tokens[scope]:
                budgets.append(
                    f"{scope[0]} {scope[1]} {name}: Ollama reported {reported[scope]} > {limit} + "
                    f"{excess + lost_tokens[scope]}"
                )
    tight = ("key", phase.key_ids[0])
    notes.append(f"tight key: {charged_sum[tight]} of {phase.key_budgets[0]['total_tokens']} tokens charged")

    # --- counters --------------------------------------------------------------------------------
    counter_problems: list[str] = []
    per_scope: dict[tuple[str, int, str], int] = defaultdict(int)
    for (scope_name, scope_id, period, _), tokens in ev.periods.items():
        per_scope[(scope_name, scope_id, period)] += tokens
    for scope, _ in scopes:
        for period in ("day", "month", "total"):
            if per_scope.get((*scope, period), 0) != charged_sum[scope]:
                counter_problems.append(
                    f"budget_periods {scope[0]} {scope[1]} {period}: "
                    f"{per_scope.get((*scope, period), 0)}, ledger {charged_sum[scope]}"
                )
    overcounts = []
    absent = 0
    for where, live in ev.live_counters.items():
        expected = ev.periods.get(where, 0)
        if live == expected:
            continue
        if live is None:
            absent += 1  # not cached: the next admission rebuilds it from Postgres
            continue
        if live > expected and component == "valkey":
            overcounts.append(f"{where[0]} {where[1]} {where[2]}: +{live - expected}")
            continue
        counter_problems.append(f"Redis counter {where}: {live}, Postgres {expected}")
    for where, rebuilt in ev.rebuilt_counters.items():
        if rebuilt != ev.periods.get(where, 0):
            counter_problems.append(
                f"after rebuild-counters {where}: {rebuilt}, Postgres {ev.periods.get(where, 0)}"
            )
    if absent:
        notes.append(f"{absent} budget counters absent from Redis (rebuilt from Postgres on demand)")
    if overcounts:
        notes.append(
            "Redis counters above the ledger after hydration (documented overcount, fixed by "
            f"rebuild-counters): {', '.join(overcounts)}"
        )

    # --- recovered -------------------------------------------------------------------------------
    recovered: list[str] = [f"{a.label}: 500 {a.error[:80]}" for a in attempts if a.status == 500]
    # The tail: the last seconds of load, and at least a lease TTL after the restart (concurrency
    # slots held by requests the dead component dropped are free again by then).
    tail_from = max(phase.load_end - config.tail_seconds, phase.restart_at + config.lease_ttl + 0.5)
    tail = [a for a in attempts if a.sent_at >= tail_from and a.client != 0]
    if not tail:
        recovered.append(f"no request in the last {phase.load_end - tail_from:.1f} s of load")
    failing = [a for a in tail if not a.completed]
    recovered += [f"{a.label} in the last seconds of load: {a.error[:100]}" for a in failing[:5]]
    took = recovery(phase)
    if took is None:
        recovered.append("no 200 after the restart")
    elif took > config.max_recovery:
        recovered.append(f"first 200 {took:.1f} s after the restart (at most {config.max_recovery:g} s)")

    # --- as designed ------------------------------------------------------------------------------
    allowed = AS_DESIGNED.get(component, frozenset())
    designed = Counter(
        f"{a.outcome}: {a.error[:90]}"
        for a in attempts
        if a.outcome != "200" and a.outcome not in allowed and not (a.client == 0 and a.status == 429)
    )
    as_designed = [f"{n}× {what}" for what, n in designed.most_common()]

    checks = [
        _check("as designed", as_designed),
        _check("200s served", served),
        _check("ledger = simulator", ledger),
        _check("no duplicates", duplicates),
        _check("leases", leases),
        _check("budgets", budgets),
        _check("counters", counter_problems),
        _check("recovered", recovered),
        _check("logs clean", ev.log_errors),
        Check("settled", ev.settled, ev.settle_detail),
    ]
    return checks, notes


def recovery(phase: Phase) -> float | None:
    """Seconds from the restart to the first 200 of a request sent after it."""
    firsts = [
        a.headers_at
        for a in phase.attempts
        if a.sent_at >= phase.restart_at and a.status == 200 and a.headers_at
    ]
    return min(firsts) - phase.restart_at if firsts else None


# --- the harness --------------------------------------------------------------------------------


@contextlib.contextmanager
def _environ(changes: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (LocalStack's children inherit os.environ)."""
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _start_stack(workdir: Path, config: Config) -> localstack.LocalStack:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    environ |= {
        "GATEWAY_REDIS_PREFIX": PREFIX,
        "GATEWAY_SIM_TOKENS_PER_SECOND": str(config.tokens_per_second),
    }
    with _environ(config.environment):
        return localstack.LocalStack(workdir, environ=environ).start()


def _parse_record(raw: dict[str, Any]) -> tuple[str | None, SimRecord | None]:
    """(marker, record) of a chat request; (None, None) for anything else the simulator saw."""
    if raw.get("path") not in ("/api/chat", "/v1/chat/completions"):
        return None, None
    try:
        content = str(orjson.loads(raw["body_text"])["messages"][0]["content"])
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        content = ""
    found = MARKER_RE.search(content)
    generation = raw.get("generation") or {}
    record = SimRecord(
        marker=found.group(0) if found else content[:60],
        finished=bool(raw.get("finished")),
        outcome=generation.get("outcome"),
        prompt=generation.get("prompt_eval_count"),
        completion=generation.get("eval_count"),
        tokens_sent=int(generation.get("tokens_sent") or 0),
    )
    return (found.group(0) if found else None), record


@attrs.define
class Harness:
    """The chaos stack and what is needed to shake it and audit it."""

    config: Config
    stack: localstack.LocalStack
    http: aiohttp.ClientSession
    redis: coredis.Redis[bytes]
    run: str = attrs.field(factory=lambda: uuid.uuid4().hex[:6])
    keys: RedisKeys = attrs.field(factory=lambda: RedisKeys(PREFIX))
    phases: int = 0
    # The lease watcher leaves Redis alone while Valkey is dead: coredis 6.9.0 leaks anyio streams
    # (ResourceWarnings) for every command that fails on a lost connection.
    valkey_dead: bool = False
    redis_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock)

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, workdir: Path, config: Config) -> AsyncIterator[Harness]:
        """Start the stack and a standalone accountant; stop every process on the way out."""
        stack = await asyncio.to_thread(_start_stack, workdir, config)
        try:
            database_url = stack.urls["database_url"]
            conn = await asyncpg.connect(asyncpg_dsn(database_url))
            try:
                # LocalStack's Postgres runs with synchronous_commit=off for speed: a killed
                # postmaster then loses the last commits, which no production server does.
                database = database_url.rsplit("/", 1)[1].split("?", 1)[0]
                await conn.execute(f'ALTER DATABASE "{database}" SET synchronous_commit = on')
            finally:
                await conn.close()
            port = localstack.free_port()
            env = {**stack.env, **config.environment, "GATEWAY_ACCOUNTANT_METRICS_PORT": str(port)}
            argv = [sys.executable, "-m", "authz_sidecar.accountant"]
            await asyncio.to_thread(stack.spawn, "accountant", argv, port, env)
            timeout = aiohttp.ClientTimeout(total=30, sock_connect=5, sock_read=10)
            connector = aiohttp.TCPConnector(force_close=True, limit=0)
            async with (
                aiohttp.ClientSession(timeout=timeout, connector=connector) as http,
                coredis.Redis.from_url(stack.urls["redis_url"]) as redis,
            ):
                yield cls(config, stack, http, redis)
        finally:
            await asyncio.to_thread(stack.stop)

    # --- faults ----------------------------------------------------------------------------------

    def _simulator_args(self) -> list[str]:
        models = ",".join(f"{MODEL_FAMILY}:n{i}" for i in range(MODEL_SLOTS))
        c = self.config
        return ["--tokens-per-second", str(c.tokens_per_second), "--completion-tokens",
                str(c.completion_tokens), "--thinking-tokens", "0", "--models", models]  # fmt: skip

    async def kill(self, component: str) -> None:
        """SIGKILL one component (Postgres: the postmaster; Valkey: the server)."""
        async with self.redis_lock:
            self.valkey_dead = component == "valkey"
            await asyncio.to_thread(self.stack.kill, component)

    async def restart(self, component: str) -> None:
        """Bring a killed component back on its port, with its arguments and environment."""
        if component == "postgres" and self.stack.postgres is not None:
            recovering = self.config.postgres_recovery
            await asyncio.to_thread(self.stack.postgres.restart, recovering=recovering)
        else:
            extra = self._simulator_args() if component == "simulator" else []
            await asyncio.to_thread(self.stack.restart, component, extra)
        self.valkey_dead = False

    # --- the simulator ---------------------------------------------------------------------------

    async def _simulator(self, method: str, path: str, body: Any = None) -> Any:
        url = self.stack.urls["ollama_url"] + path
        async with self.http.request(method, url, json=body) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def _prepare_simulator(self) -> None:
        await self._simulator("POST", "/_sim/reset")
        c = self.config
        settings = {
            "tokens_per_second": c.tokens_per_second,
            "completion_tokens": c.completion_tokens,
            "thinking_tokens": 0,
            "models": [f"{MODEL_FAMILY}:n{i}" for i in range(MODEL_SLOTS)],
        }
        await self._simulator("POST", "/_sim/settings", settings)

    async def _records(self, wait: float = 15.0) -> list[dict[str, Any]]:
        """Every record, once every request the simulator received has finished."""
        deadline = time.monotonic() + wait
        while True:
            records: list[dict[str, Any]] = await self._simulator("GET", "/_sim/requests")
            if all(r.get("finished") for r in records) or time.monotonic() > deadline:
                return records
            await asyncio.sleep(0.2)

    # --- tenants and keys ------------------------------------------------------------------------

    async def _tenant(
        self, name: str
    ) -> tuple[int, list[int], list[str], list[dict[str, int]], dict[str, int]]:
        c = self.config
        tenant_budgets = {"daily_tokens": BIG, "monthly_tokens": BIG, "total_tokens": BIG}
        conn = await asyncpg.connect(asyncpg_dsn(self.stack.urls["database_url"]))
        try:
            tenant = await admin.create_tenant(conn, name=name)
            limits = {"tpm": 10_000_000, **tenant_budgets}
            await admin.set_limits(
                conn, tenant=name, limits={n: admin.parse_limit(n, str(v)) for n, v in limits.items()}
            )
            key_ids, tokens, budgets = [], [], []
            for client in range(c.clients):
                created = await admin.create_key(
                    conn, tenant=name, name=f"client-{client}", pepper=self.stack.env["GATEWAY_KEY_PEPPER"]
                )
                total = c.tight_budget if client == 0 else BIG // 10
                key_budgets = {"daily_tokens": BIG // 10, "monthly_tokens": BIG // 10, "total_tokens": total}
                key_limits = {"rpm": 100_000, "max_concurrent": 2, **key_budgets}
                await admin.set_limits(
                    conn,
                    prefix=created.key.prefix,
                    limits={n: admin.parse_limit(n, str(v)) for n, v in key_limits.items()},
                )
                key_ids.append(created.key.id)
                tokens.append(created.token)
                budgets.append(key_budgets)
        finally:
            await conn.close()
        return tenant.id, key_ids, tokens, budgets, tenant_budgets

    # --- one phase -------------------------------------------------------------------------------

    def _logs(self) -> dict[str, Path]:
        return {
            s.name: s.log
            for s in self.stack.services
            if s.name in ("authz_sidecar", "stream_proxy", "accountant")
        }

    async def _dead_letters(self) -> list[str]:
        entries = await self.redis.xrange(self.keys.dead_letters)
        return [
            (e.field_values.get(b"reason") or b"?").decode("utf-8", "replace")  # type: ignore[union-attr]
            for e in entries
        ]

    async def _watch_leases(self, phase: Phase, stop: asyncio.Event) -> None:
        scopes = ["t", *(f"k{k}" for k in phase.key_ids)]
        while not stop.is_set():
            async with self.redis_lock:
                if not self.valkey_dead:
                    with contextlib.suppress(coredis.exceptions.RedisError, OSError, TimeoutError):
                        now_ms, found = await leases_now(self.redis, self.keys, phase.tenant_id, scopes)
                        for scope, members in found.items():
                            phase.lease_watch.observe(now_ms, scope, members)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)

    async def run_phase(self, component: str) -> PhaseResult:
        """Load, kill, restart, more load, settle, verify."""
        c = self.config
        self.phases += 1
        index = self.phases
        await self._prepare_simulator()
        tenant_name = f"chaos-{self.run}-{index}-{component.replace('_', '-')}"
        tenant_id, key_ids, tokens, key_budgets, tenant_budgets = await self._tenant(tenant_name)
        load = Load(self.run, index, self.stack.urls["gateway_url"], tokens, c.num_predict)
        phase = Phase(
            run=self.run,
            index=index,
            component=component,
            tenant_id=tenant_id,
            tenant_name=tenant_name,
            key_ids=key_ids,
            key_budgets=key_budgets,
            tenant_budgets=tenant_budgets,
            load=load,
            lease_watch=LeaseWatch(ttl_ms=int(c.lease_ttl * 1000), max_concurrent=2),
            started=time.time(),
            log_offsets={name: path.stat().st_size for name, path in self._logs().items()},
            dead_letters_before=len(await self._dead_letters()),
        )
        stop_watch = asyncio.Event()
        watcher = asyncio.create_task(self._watch_leases(phase, stop_watch))
        load.start(self.http)
        try:
            await asyncio.sleep(c.kill_after)
            if component == "simulator":
                phase.snapshot_at = time.time()
                phase.snapshot = await self._simulator("GET", "/_sim/requests")
            phase.kill_at = time.time()
            await self.kill(component)
            await asyncio.sleep(c.down_seconds)
            phase.restart_begun = time.time()
            await self.restart(component)
            phase.restart_at = time.time()
            await asyncio.sleep(max(0.0, phase.started + c.load_seconds - time.time()))
            phase.load_end = time.time()
        finally:
            await load.stop()
            stop_watch.set()
            await watcher
        settled, detail = await self._settle(phase)
        evidence = await self._evidence(phase, settled, detail)
        checks, notes = judge(phase, evidence, c)
        statuses = Counter(a.outcome for a in phase.attempts)
        return PhaseResult(
            component=component,
            statuses=statuses,
            requests=len(phase.attempts),
            down=phase.restart_at - phase.kill_at,
            recovery=recovery(phase),
            checks=checks,
            notes=notes,
        )

    async def _settle(self, phase: Phase) -> tuple[bool, str]:
        """Wait until no reservation is open, the usage stream is applied and no event is spooled."""
        deadline = time.monotonic() + self.config.settle_seconds
        started = time.monotonic()
        state = "nothing checked"
        while time.monotonic() < deadline:
            try:
                state = await self._unsettled(phase)
            except (coredis.exceptions.RedisError, OSError, TimeoutError, aiohttp.ClientError) as exc:
                state = f"cannot look: {type(exc).__name__}"
            if not state:
                return True, f"settled in {time.monotonic() - started:.1f} s"
            await asyncio.sleep(0.25)
        return False, f"not settled after {self.config.settle_seconds:g} s: {state}"

    async def _unsettled(self, phase: Phase) -> str:
        """What still moves ('' once everything settled)."""
        open_reservations = await self.redis.zcard(self.keys.reservation_index(phase.tenant_id))
        if open_reservations:
            return f"{open_reservations} reservations open"
        stream = self.keys.usage_stream
        groups = await self.redis.xinfo_groups(stream) if await self.redis.exists([stream]) else ()
        group = next((g for g in groups if g.get(b"name") == b"accountant"), None)
        if group is not None:
            pending = group.get(b"pending")
            if pending:
                return f"{pending!r} usage events pending"
            last = await self.redis.xrevrange(stream, count=1)
            if last and last[0].identifier != group.get(b"last-delivered-id"):
                return "usage events not yet read by the accountant"
        elif groups or await self.redis.exists([stream]):
            return "no accountant group"
        async with self.http.get(self.stack.urls["proxy_url"] + "/metrics") as resp:
            text = await resp.text()
        found = re.search(r"^proxy_usage_spool_depth ([0-9.e+]+)$", text, re.MULTILINE)
        if found is None or float(found.group(1)) > 0:
            return "usage events spooled in stream_proxy"
        return ""

    async def _counters(
        self, phase: Phase, wheres: Sequence[tuple[str, int, str, str]]
    ) -> dict[Any, int | None]:
        values: dict[Any, int | None] = {}
        for where in wheres:
            scope, scope_id, period, start = where
            name = "t" if scope == "tenant" else f"k{scope_id}"
            raw = await self.redis.get(self.keys.budget(phase.tenant_id, name, period, start))
            values[where] = None if raw is None else int(raw)
        return values

    async def _evidence(self, phase: Phase, settled: bool, detail: str) -> Evidence:
        conn = await asyncpg.connect(asyncpg_dsn(self.stack.urls["database_url"]))
        try:
            rows = [
                Row(
                    request_id=r["request_id"],
                    key_id=r["key_id"],
                    model=r["model"],
                    prompt=r["prompt_tokens"],
                    completion=r["completion_tokens"],
                    total=r["total_tokens"],
                    reserved=r["reserved_tokens"],
                    estimated=r["estimated"],
                    reason=r["estimate_reason"],
                    http_status=r["http_status"],
                    started=r["started_at"].timestamp(),
                    finished=r["finished_at"].timestamp(),
                    recorded=r["recorded_at"].timestamp(),
                )
                for r in await conn.fetch("SELECT * FROM usage_ledger WHERE tenant_id = $1", phase.tenant_id)
            ]
            duplicates = await conn.fetch(
                "SELECT request_id FROM usage_ledger WHERE tenant_id = $1 "
                "GROUP BY request_id HAVING count(*) > 1",
                phase.tenant_id,
            )
            period_rows = await conn.fetch(
                "SELECT scope, scope_id, period, period_start, tokens FROM budget_periods "
                "WHERE (scope = 'tenant' AND scope_id = $1) "
                "OR (scope = 'key' AND scope_id = ANY($2::bigint[]))",
                phase.tenant_id,
                phase.key_ids,
            )
            periods = {
                (r["scope"], r["scope_id"], r["period"], r["period_start"].isoformat()): int(r["tokens"])
                for r in period_rows
            }
            today = time.strftime("%Y-%m-%d", time.gmtime())
            names = {"day": today, "month": today[:8] + "01", "total": "1970-01-01"}
            wheres = set(periods)
            for scope, scope_id in [("tenant", phase.tenant_id), *(("key", k) for k in phase.key_ids)]:
                wheres |= {(scope, scope_id, p, start) for p, start in names.items()}
            ordered = sorted(wheres)
            live = await self._counters(phase, ordered)
            await counters.rebuild(
                conn, self.redis, self.keys, zone=ZoneInfo("UTC"), tenant_ids=[phase.tenant_id]
            )
            rebuilt = await self._counters(phase, ordered)
        finally:
            await conn.close()
        records: dict[str, list[SimRecord]] = defaultdict(list)
        foreign = []
        for raw in [*phase.snapshot, *await self._records()]:
            mark, record = _parse_record(raw)
            if record is None:
                continue
            if mark is None or not mark.startswith(f"chaos{self.run}p{phase.index}c"):
                foreign.append(record.marker)
                continue
            records[mark].append(record)
        # Every lease was taken before its request ended: one TTL after the last end, none is live.
        last_end = max((a.ended_at for a in phase.attempts), default=time.time())
        await asyncio.sleep(max(0.0, last_end + self.config.lease_ttl + TOLERANCE_MS / 1000 - time.time()))
        scopes = ["t", *(f"k{k}" for k in phase.key_ids)]
        now_ms, found = await leases_now(self.redis, self.keys, phase.tenant_id, scopes)
        end_leases = [r for members in found.values() for r, score in members if score > now_ms]
        dead = (await self._dead_letters())[phase.dead_letters_before :]
        return Evidence(
            rows=rows,
            duplicate_request_ids=[r["request_id"] for r in duplicates],
            records=dict(records),
            foreign_records=foreign,
            periods=periods,
            live_counters=live,
            rebuilt_counters=rebuilt,
            end_leases=end_leases,
            dead_letters=dead,
            log_errors=self._log_errors(phase),
            settled=settled,
            settle_detail=detail,
        )

    def _log_errors(self, phase: Phase) -> list[str]:
        """Error lines (tracebacks) the services logged during the phase."""
        found: list[str] = []
        for name, path in self._logs().items():
            with path.open("rb") as log:
                log.seek(phase.log_offsets.get(name, 0))
                lines = log.read().splitlines()
            for line in lines:
                try:
                    doc = orjson.loads(line)
                except orjson.JSONDecodeError:
                    if line.strip():
                        found.append(f"{name}: {line.decode('utf-8', 'replace')[:160]}")
                    continue
                if isinstance(doc, dict) and doc.get("level") in ("error", "critical"):
                    trace = " < ".join(reversed(doc.get("trace") or []))[:200]
                    found.append(f"{name}: {doc.get('msg')} {doc.get('error') or ''} {trace}".strip())
        return found


# --- the command --------------------------------------------------------------------------------


def report(results: Sequence[PhaseResult]) -> Table:
    """The rich table of a run."""
    table = Table(title="chaos: SIGKILL and restart under streaming load", show_lines=True)
    for column in ("component", "requests", "what clients saw", "down s", "recovery s", "checks", "notes"):
        table.add_column(column, overflow="fold")
    for result in results:
        seen = ", ".join(
            f"{status}×{n}" for status, n in sorted(result.statuses.items(), key=lambda i: -i[1])
        )
        failed = [c for c in result.checks if not c.ok]
        passed = f"{len(result.checks) - len(failed)}/{len(result.checks)}"
        checks = (
            f"[green]{passed}[/]"
            if not failed
            else f"[red]{passed}[/]\n" + "\n".join(f"[red]✗ {c.name}[/]: {c.detail}" for c in failed)
        )
        table.add_row(
            result.component,
            str(result.requests),
            seen,
            f"{result.down:.1f}",
            "—" if result.recovery is None else f"{result.recovery:.2f}",
            checks,
            "\n".join(result.notes),
        )
    return table


def render(results: Sequence[PhaseResult], width: int = 200) -> str:
    """The report as plain text (for assertion messages)."""
    recorder = Console(width=width, record=True, file=io.StringIO())
    recorder.print(report(results))
    return recorder.export_text()


async def run(components: Sequence[str], config: Config, workdir: Path) -> list[PhaseResult]:
    """Every component in turn on one stack."""
    results = []
    async with Harness.running(workdir, config) as harness:
        for component in components:
            console.print(
                f"[bold]{component}[/]: {config.load_seconds:g} s of load, kill after {config.kill_after:g} s"
            )
            result = await harness.run_phase(component)
            mark = "[green]ok[/]" if result.ok else "[red]FAILED[/]"
            console.print(f"  {mark} {dict(result.statuses)}")
            results.append(result)
    return results


def main(argv: Sequence[str]) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(
        prog="scripts/chaos", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    parser.add_argument("--quick", action="store_true", help="short phases (about 15 s each)")
    parser.add_argument("--components", default=",".join(COMPONENTS), help="comma-separated, in order")
    parser.add_argument("--clients", type=int, help="concurrent streaming clients")
    parser.add_argument("--load-seconds", type=float, help="load per component")
    parser.add_argument("--kill-after", type=float, help="seconds of load before the kill")
    parser.add_argument("--down-seconds", type=float, help="how long the component stays dead")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs) on success")
    args = parser.parse_args(argv)
    components = [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        parser.error(f"unknown component(s) {', '.join(unknown)}; known: {', '.join(COMPONENTS)}")
    config = QUICK if args.quick else Config()
    changes = {
        "clients": args.clients,
        "load_seconds": args.load_seconds,
        "kill_after": args.kill_after,
        "down_seconds": args.down_seconds,
    }
    config = attrs.evolve(config, **{k: v for k, v in changes.items() if v is not None})
    if config.kill_after + config.down_seconds >= config.load_seconds:
        parser.error("--kill-after plus --down-seconds must leave load after the restart")
    workdir = localstack.ROOT / ".dev" / f"chaos-{os.getpid()}"
    # SIGTERM unwinds like Ctrl-C, so every process of the stack is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    results = asyncio.run(run(components, config, workdir))
    console.print(report(results))
    ok = all(r.ok for r in results)
    verdict = "[green]all checks passed[/]" if ok else "[red]checks failed[/]"
    kept = workdir.relative_to(localstack.ROOT) if not ok or args.keep else "removed"
    console.print(f"{verdict} in {time.monotonic() - started:.0f} s; logs: {kept}")
    if ok and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
