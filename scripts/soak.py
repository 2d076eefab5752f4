"""`scripts/soak`: mixed traffic through the whole local stack at a steady rate for a set time, with
every stack process's memory and open file descriptors sampled throughout; fails when any of them
grew by more than 10 % after the warm-up. Not part of CI (it takes ten minutes by default).

The stack is `localstack.LocalStack` (Postgres, Valkey, simulator, authz_sidecar with its embedded
accountant, stream_proxy, Caddy), as `scripts/dev` starts it. Traffic is open-loop: a request starts
every 1/rate seconds whatever the others do, each of one kind drawn by weight (see KINDS): native
and OpenAI, streaming and not, embeddings, model lists, streams the client drops after the first
chunk, and refusals: keys over their RPM, budget or concurrency limit, unknown and malformed keys
(from 127.0.0.3, so their failed authentications do not throttle the others), blocked endpoints.

Every `--interval` seconds it reads, for every process of the stack's process trees (Postgres'
backends and workers included), `/proc/<pid>/status` and `/proc/<pid>/fd`. After the warm-up, the
median of the last three samples is compared with the median of the first three: growth beyond
`--threshold` (10 %) of memory or descriptors fails. Memory is VmRSS less RssShmem: the shared
memory a Postgres backend maps grows as it touches more of shared_buffers, which is no leak (VmRSS
is shown too). Descriptor counts within 4 of their start are not judged (one more connection is no
leak). A stack process that dies, a 5xx or a transport error fails the run as well. Valkey's
contents (used memory, keys, stream lengths, and at the end its keys by family with their TTLs) are
reported beside, not judged: they say what Valkey's memory is made of.

The report is printed as rich tables and written to docs/SOAK.md (overwritten on every run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import random
import re
import secrets
import shlex
import shutil
import signal
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import attrs
import coredis
import orjson
from rich.console import Console
from rich.table import Table

import localstack
from shared import admin, keys
from shared.db import asyncpg_dsn
from shared.redis_keys import RedisKeys

DOC = localstack.ROOT / "docs" / "SOAK.md"
console = Console(highlight=False, width=None if sys.stdout.isatty() else 180)
BAD_SOURCE = "127.0.0.3"  # failed authentications are limited per address: keep them off the rest
FD_SLACK = 4  # descriptor changes this small are not judged
WINDOW = 3  # samples whose median is compared at each end
SIMULATOR = {"tokens_per_second": 60.0, "completion_tokens": 24, "max_records": 100}


# --- the traffic ------------------------------------------------------------------------------------


@attrs.frozen
class Kind:
    """One sort of request in the mix."""

    name: str
    weight: int
    method: str
    path: str
    key: str  # "main", "rpm", "budget", "concurrency", "bad" (a fresh unknown or malformed key)
    body: Mapping[str, Any] | None = None
    disconnect: bool = False  # read the first chunk, then drop the connection
    expect: frozenset[int] = frozenset({200})


def _chat(stream: bool) -> dict[str, Any]:
    return {"model": "llama3.2", "messages": [{"role": "user", "content": "soak"}], "stream": stream}


V1, CHAT, GEN = "/v1/chat/completions", "/api/chat", "/api/generate"
LIMITED, BAD_KEY, BLOCKED = frozenset({200, 429}), frozenset({401, 429}), frozenset({403})
PULL = {"model": "llama3.2"}
KINDS = (
    Kind("native chat", 15, "POST", CHAT, "main", _chat(False)),
    Kind("native chat stream", 15, "POST", CHAT, "main", _chat(True)),
    Kind("native generate stream", 6, "POST", GEN, "main", {"model": "llama3.2", "prompt": "soak"}),
    Kind("openai chat", 14, "POST", V1, "main", _chat(False)),
    Kind("openai chat stream", 14, "POST", V1, "main", _chat(True)),
    Kind("native embed", 4, "POST", "/api/embed", "main", {"model": "all-minilm", "input": ["soak"]}),
    Kind("model list", 4, "GET", "/v1/models", "main"),
    Kind("native stream, client drops", 4, "POST", CHAT, "main", _chat(True), disconnect=True),
    Kind("openai stream, client drops", 3, "POST", V1, "main", _chat(True), disconnect=True),
    Kind("key over its RPM", 5, "POST", CHAT, "rpm", _chat(False), expect=LIMITED),
    Kind("key over its budget", 3, "POST", V1, "budget", _chat(False), expect=LIMITED),
    Kind("key over its concurrency", 3, "POST", CHAT, "concurrency", _chat(True), expect=LIMITED),
    Kind("unknown or malformed key", 5, "POST", CHAT, "bad", _chat(False), expect=BAD_KEY),
    Kind("blocked endpoint", 3, "POST", "/api/pull", "main", PULL, expect=BLOCKED),
    Kind("blocked endpoint (delete)", 1, "DELETE", "/api/delete", "main", PULL, expect=BLOCKED),
)

# (tenant, key name, limits): one tenant per key, so a key's refusals are its own limit's.
KEYS: dict[str, dict[str, str]] = {
    "main": {"rpm": "1000000", "tpm": "1000000000", "max_concurrent": "500", "daily_tokens": "100000000000"},
    "rpm": {"rpm": "20"},
    "budget": {"daily_tokens": "3000"},
    "concurrency": {"max_concurrent": "1"},
}


def bad_key() -> str:
    """Half well-formed keys of unknown prefixes, half keys with a broken checksum."""
    token = keys.generate_key().token
    if secrets.randbelow(2):
        return token
    return token[:-1] + ("0" if token[-1] != "0" else "1")


@attrs.define
class Traffic:
    """What the clients sent and got."""

    statuses: dict[str, Counter[str]] = attrs.field(factory=lambda: defaultdict(Counter))
    latency: dict[str, list[float]] = attrs.field(factory=lambda: defaultdict(list))
    sent: int = 0
    skipped: int = 0  # starts dropped because the client had too many requests in flight

    def unexpected(self) -> dict[str, int]:
        """5xx answers and transport errors, by kind."""
        found: dict[str, int] = {}
        for name, counts in self.statuses.items():
            bad = sum(n for status, n in counts.items() if status.startswith(("error", "5")))
            if bad:
                found[name] = bad
        return found


async def _one(
    kind: Kind, sessions: Mapping[str, aiohttp.ClientSession], gateway: str, tokens: Mapping[str, str],
    traffic: Traffic,
) -> None:  # fmt: skip
    token = bad_key() if kind.key == "bad" else tokens[kind.key]
    session = sessions["bad" if kind.key == "bad" else "good"]
    data = orjson.dumps(kind.body) if kind.body is not None else None
    started = time.perf_counter()
    status = "error"
    try:
        async with session.request(
            kind.method, gateway + kind.path, data=data, headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            status = str(resp.status)
            if kind.disconnect and resp.status == 200:
                await resp.content.readany()
                resp.close()
                status = "200, dropped"
            else:
                await resp.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        status = f"error: {type(exc).__name__}"
    traffic.statuses[kind.name][status] += 1
    traffic.latency[kind.name].append(time.perf_counter() - started)


async def drive(
    gateway: str, tokens: Mapping[str, str], *, rate: float, seconds: float, traffic: Traffic, seed: int = 7
) -> None:
    """Start one request every 1/rate s for `seconds`, kinds drawn by weight; wait for the stragglers."""
    chooser = random.Random(seed)  # noqa: S311 - a reproducible traffic mix, not a secret
    weights = [k.weight for k in KINDS]
    limit = max(100, int(rate * 20))
    timeout = aiohttp.ClientTimeout(total=120, sock_read=60)
    async with (
        aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as good,
        aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=0, local_addr=(BAD_SOURCE, 0))
        ) as bad,
    ):
        sessions = {"good": good, "bad": bad}
        running: set[asyncio.Task[None]] = set()
        began = time.monotonic()
        n = 0
        while (due := began + n / rate) < began + seconds:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            n += 1
            if len(running) >= limit:
                traffic.skipped += 1
                continue
            kind = chooser.choices(KINDS, weights)[0]
            task = asyncio.create_task(_one(kind, sessions, gateway, tokens, traffic))
            running.add(task)
            task.add_done_callback(running.discard)
            traffic.sent += 1
        if running:
            await asyncio.wait(running, timeout=120)


# --- the processes ----------------------------------------------------------------------------------


@attrs.frozen
class Sample:
    """One reading of one process."""

    at: float  # seconds since the traffic started
    rss_kib: int  # VmRSS - RssShmem
    vm_rss_kib: int
    fds: int


def _status(pid: int) -> dict[str, int]:
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssShmem"):
            fields[name] = int(value.split()[0])
    return fields


def _children() -> dict[int, list[int]]:
    found: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                found[ppid].append(int(entry.name))
    return found


BACKEND = re.compile(r"^postgres: \S+ (\S+) (\S+\(\d+\))")


def _label(root: str, pid: int, root_pid: int) -> str:
    """A stable name: the component for a root; a Postgres backend by database and client address
    (its title's state changes from query to query); other children by their title."""
    if pid == root_pid:
        return root
    title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip().decode(errors="replace")
    backend = BACKEND.match(title)
    if backend:
        return f"postgres backend {backend[1]} {backend[2]}"
    if title.startswith("postgres: "):
        return title
    return f"{root} child {pid}: {title[:40]}"


def processes(roots: Mapping[str, int]) -> dict[str, tuple[str, int]]:
    """label -> (component, pid) for every process of the stack's trees."""
    children = _children()
    found: dict[str, tuple[str, int]] = {}
    for root, root_pid in roots.items():
        todo = [root_pid]
        while todo:
            pid = todo.pop()
            with contextlib.suppress(OSError):
                found[_label(root, pid, root_pid)] = (root, pid)
            todo.extend(children.get(pid, []))
    return found


@attrs.define
class Sampler:
    """Samples of every process of the stack, by label, and the components' totals."""

    roots: dict[str, int]
    started: float
    series: dict[str, list[Sample]] = attrs.field(factory=lambda: defaultdict(list))
    component_of: dict[str, str] = attrs.field(factory=dict)
    gone: list[str] = attrs.field(factory=list)  # roots that died
    store: list[tuple[float, dict[str, int]]] = attrs.field(factory=list)  # Valkey's contents
    families: list[tuple[str, str, str]] = attrs.field(factory=list)  # Valkey's keys at the end

    def sample(self) -> None:
        """Read every process once (a process that exits meanwhile is skipped)."""
        at = time.monotonic() - self.started
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for label, (component, pid) in processes(self.roots).items():
            try:
                status = _status(pid)
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue
            name = label
            rss = status.get("VmRSS", 0) - status.get("RssShmem", 0)
            self.series[name].append(Sample(at, rss, status.get("VmRSS", 0), fds))
            self.component_of[name] = component
            total = totals[component]
            total[0] += rss
            total[1] += status.get("VmRSS", 0)
            total[2] += fds
        for component, (rss, vm_rss, fds) in totals.items():
            if component == "postgres":
                name = "postgres (all processes)"
                self.series[name].append(Sample(at, rss, vm_rss, fds))
                self.component_of[name] = component
        for root, pid in self.roots.items():
            if localstack._gone(pid) and root not in self.gone:
                self.gone.append(root)


@attrs.frozen
class Verdict:
    """One process's growth after the warm-up."""

    label: str
    rss_start: float
    rss_end: float
    rss_max: float
    vm_rss_end: float
    fds_start: float
    fds_end: float
    judged: bool  # alive from the first post-warm-up window to the last
    rss_growth: float
    fd_growth: float
    late_growth: float  # RSS growth over the second half of the judged period: a step or a trend?
    ok: bool


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def judge(
    series: Mapping[str, Sequence[Sample]], warmup: float, interval: float, threshold: float
) -> list[Verdict]:
    """Compare the median of each process's first WINDOW post-warm-up samples with its last WINDOW.
    A process not sampled both at the start and at the end of that period is shown but not judged."""
    after_all = [s.at for samples in series.values() for s in samples if s.at >= warmup]
    first_at, last_at = (min(after_all), max(after_all)) if after_all else (0.0, 0.0)
    verdicts = []
    for label, samples in series.items():
        after = [s for s in samples if s.at >= warmup]
        if not after:
            continue
        head, tail = after[:WINDOW], after[-WINDOW:]
        spans = head[0].at <= first_at + interval * 1.5 and tail[-1].at >= last_at - interval * 1.5
        judged = len(after) >= 2 * WINDOW and spans
        rss_start, rss_end = _median([s.rss_kib for s in head]), _median([s.rss_kib for s in tail])
        fds_start, fds_end = _median([s.fds for s in head]), _median([s.fds for s in tail])
        rss_growth = (rss_end - rss_start) / rss_start * 100 if rss_start else 0.0
        middle = [s for s in after if s.at >= (after[0].at + after[-1].at) / 2][:WINDOW]
        rss_middle = _median([s.rss_kib for s in middle])
        late_growth = (rss_end - rss_middle) / rss_middle * 100 if rss_middle else 0.0
        fd_growth = (fds_end - fds_start) / fds_start * 100 if fds_start else 0.0
        fd_bad = fd_growth > threshold and fds_end - fds_start > FD_SLACK
        ok = not judged or (rss_growth <= threshold and not fd_bad)
        verdicts.append(
            Verdict(
                label=label,
                rss_start=rss_start / 1024,
                rss_end=rss_end / 1024,
                rss_max=max(s.rss_kib for s in after) / 1024,
                vm_rss_end=_median([s.vm_rss_kib for s in tail]) / 1024,
                fds_start=fds_start,
                fds_end=fds_end,
                judged=judged,
                rss_growth=rss_growth,
                fd_growth=fd_growth,
                late_growth=late_growth,
                ok=ok,
            )
        )
    order = ["caddy", "authz_sidecar", "stream_proxy", "simulator", "valkey", "postgres"]
    return sorted(
        verdicts,
        key=lambda v: (next((i for i, o in enumerate(order) if v.label.startswith(o)), len(order)), v.label),
    )


# --- the run ---------------------------------------------------------------------------------------


async def _make_keys(database_url: str, pepper: str) -> dict[str, str]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        tokens = {}
        for name, limits in KEYS.items():
            tenant = f"soak-{name}"
            await admin.create_tenant(conn, name=tenant)
            created = await admin.create_key(conn, tenant=tenant, name=name, pepper=pepper)
            await admin.set_limits(
                conn,
                prefix=created.key.prefix,
                limits={n: admin.parse_limit(n, v) for n, v in limits.items()},
            )
            tokens[name] = created.token
        return tokens
    finally:
        await conn.close()


# What Valkey holds, sampled beside the processes: it explains Valkey's memory (not judged itself).
STORE_FIGURES = ("used_memory", "keys", "usage stream", "audit stream")


async def _store(redis: coredis.Redis[bytes], names: RedisKeys) -> dict[str, int]:
    memory = await redis.info("memory")
    return {
        "used_memory": int(str(memory.get("used_memory", 0))),
        "keys": int(await redis.dbsize()),
        "usage stream": int(await redis.xlen(names.usage_stream)),
        "audit stream": int(await redis.xlen(names.audit_stream)),
    }


FAMILY_PARTS = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\d+")
CENSUS_LIMIT = 200_000


def _ttl(ms: int) -> str:
    if ms < 0:
        return "none"
    seconds = ms / 1000
    return f"{seconds:.0f} s" if seconds < 3600 else f"{seconds / 3600:.1f} h"


async def census(redis: coredis.Redis[bytes]) -> list[tuple[str, str, str]]:
    """Valkey's keys at the end of the traffic by family (ids and numbers as <n>): count and the
    range of remaining TTLs, biggest family first."""
    families: dict[str, list[int]] = defaultdict(list)
    batch: list[bytes] = []

    async def flush() -> None:
        async with redis.pipeline(transaction=False) as pipe:
            pending = [(key, pipe.pttl(key)) for key in batch]
        for key, ttl in pending:
            left = int(await ttl)
            if left != -2:  # -2: expired since the scan saw it
                families[FAMILY_PARTS.sub("<n>", key.decode(errors="replace"))].append(left)
        batch.clear()

    seen = 0
    async for key in redis.scan_iter(count=1000):
        batch.append(key)
        seen += 1
        if len(batch) >= 1000:
            await flush()
        if seen >= CENSUS_LIMIT:
            break
    if batch:
        await flush()
    ordered = sorted(families.items(), key=lambda item: -len(item[1]))
    rows = []
    for family, ttls in ordered:
        low, high = _ttl(min(ttls)), _ttl(max(ttls))
        rows.append((family, str(len(ttls)), low if low == high else f"{low} – {high}"))
    return rows


async def _sampling(
    sampler: Sampler, interval: float, stop: asyncio.Event, redis: coredis.Redis[bytes], names: RedisKeys
) -> None:
    while True:
        sampler.sample()
        with contextlib.suppress(coredis.exceptions.RedisError, OSError, TimeoutError):
            sampler.store.append((time.monotonic() - sampler.started, await _store(redis, names)))
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


@attrs.frozen
class Options:
    """How long, how fast, how strict."""

    minutes: float
    rate: float
    warmup: float  # minutes
    interval: float
    threshold: float


async def soak(stack: localstack.LocalStack, options: Options) -> tuple[Sampler, Traffic, float]:
    """Run the traffic against a started stack while sampling; returns samples, traffic, elapsed."""
    tokens = await _make_keys(stack.urls["database_url"], stack.env["GATEWAY_KEY_PEPPER"])
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{stack.urls['ollama_url']}/_sim/settings", json=SIMULATOR) as resp,
    ):
        resp.raise_for_status()
    roots = stack.pids()
    if stack.valkey is not None and stack.valkey.proc is not None:
        roots["valkey"] = stack.valkey.proc.pid
    if stack.postgres is not None and stack.postgres.pid is not None:
        roots["postgres"] = stack.postgres.pid
    started = time.monotonic()
    sampler = Sampler(roots, started)
    traffic = Traffic()
    stop = asyncio.Event()
    names = RedisKeys(stack.env["GATEWAY_REDIS_PREFIX"])
    redis: coredis.Redis[bytes] = coredis.Redis.from_url(stack.urls["redis_url"])
    async with redis:
        sampling = asyncio.create_task(_sampling(sampler, options.interval, stop, redis, names))
        try:
            await drive(
                stack.urls["gateway_url"],
                tokens,
                rate=options.rate,
                seconds=options.minutes * 60,
                traffic=traffic,
            )
        finally:
            stop.set()
            await sampling
        elapsed = time.monotonic() - started
        with contextlib.suppress(coredis.exceptions.RedisError, OSError, TimeoutError):
            sampler.families = await census(redis)
    return sampler, traffic, elapsed


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _statuses(counts: Counter[str]) -> str:
    return ", ".join(f"{status}: {n}" for status, n in sorted(counts.items()))


def _kind_ok(kind: Kind, counts: Counter[str]) -> bool:
    allowed = {str(s) for s in kind.expect} | ({"200, dropped"} if kind.disconnect else set())
    return set(counts) <= allowed


def store_rows(
    store: Sequence[tuple[float, dict[str, int]]], warmup: float
) -> list[tuple[str, str, str, str]]:
    """Valkey's contents at the end of the warm-up and at the end: (figure, start, end, max)."""
    after = [figures for at, figures in store if at >= warmup]
    if not after:
        return []

    def shown(name: str, value: int) -> str:
        return f"{value / 1024 / 1024:.2f} MiB" if name == "used_memory" else str(value)

    return [
        (
            name,
            shown(name, after[0][name]),
            shown(name, after[-1][name]),
            shown(name, max(f[name] for f in after)),
        )
        for name in STORE_FIGURES
    ]


def show(
    verdicts: Sequence[Verdict],
    traffic: Traffic,
    threshold: float,
    stores: Sequence[tuple[str, ...]],
    families: Sequence[tuple[str, ...]],
) -> None:
    """The processes and the traffic as rich tables."""
    table = Table(title=f"processes after the warm-up (fail: growth > {threshold:g} %)")
    for column in ("process", "RSS start", "RSS end", "RSS max", "VmRSS end", "growth", "2nd half",
                   "fds start", "fds end", "fd growth", "ok"):  # fmt: skip
        table.add_column(column, justify="left" if column == "process" else "right")
    for v in verdicts:
        ok = "—" if not v.judged else ("[green]yes[/]" if v.ok else "[red]no[/]")
        table.add_row(
            v.label, f"{v.rss_start:.1f} MiB", f"{v.rss_end:.1f} MiB", f"{v.rss_max:.1f} MiB",
            f"{v.vm_rss_end:.1f} MiB", f"{v.rss_growth:+.1f} %", f"{v.late_growth:+.1f} %",
            f"{v.fds_start:g}", f"{v.fds_end:g}", f"{v.fd_growth:+.1f} %", ok,
        )  # fmt: skip
    console.print(table)
    kinds = Table(title=f"traffic: {traffic.sent} requests ({traffic.skipped} starts skipped)")
    for column in ("kind", "requests", "statuses", "p50", "p99", "as expected"):
        kinds.add_column(column, justify="left" if column in ("kind", "statuses") else "right")
    for kind in KINDS:
        counts = traffic.statuses.get(kind.name, Counter())
        lat = traffic.latency.get(kind.name, [])
        ok = "[green]yes[/]" if _kind_ok(kind, counts) else "[red]no[/]"
        p50, p99 = _percentile(lat, 0.5) * 1000, _percentile(lat, 0.99) * 1000
        kinds.add_row(
            kind.name, str(sum(counts.values())), _statuses(counts), f"{p50:.0f} ms", f"{p99:.0f} ms", ok
        )
    console.print(kinds)
    total: Counter[str] = Counter()
    for counts in traffic.statuses.values():
        total.update(counts)
    console.print(f"all statuses: {_statuses(total)}")
    valkey = Table(title="Valkey's contents after the warm-up (not judged; explains Valkey's memory)")
    for column in ("figure", "start", "end", "max"):
        valkey.add_column(column, justify="left" if column == "figure" else "right")
    for row in stores:
        valkey.add_row(*row)
    console.print(valkey)
    census_table = Table(title="Valkey's keys at the end of the traffic, by family")
    for column in ("family", "keys", "TTL left"):
        census_table.add_column(column, justify="right" if column == "keys" else "left")
    for family_row in families[:12]:
        census_table.add_row(*family_row)
    console.print(census_table)


def _machine() -> str:
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        memory = f", {kib / 1024 / 1024:.0f} GiB RAM"
    return (
        f"{os.cpu_count()} cores, {platform.machine()}{memory}, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def markdown(
    *,
    stores: Sequence[tuple[str, ...]],
    families: Sequence[tuple[str, ...]],
    verdicts: Sequence[Verdict],
    traffic: Traffic,
    options: Options,
    elapsed: float,
    failures: Sequence[str],
    command: str,
) -> str:
    """docs/SOAK.md."""
    total: Counter[str] = Counter()
    for counts in traffic.statuses.values():
        total.update(counts)
    verdict = "**passed**" if not failures else "**failed**: " + "; ".join(failures)
    lines = [
        "# Soak test",
        "",
        "Generated by `scripts/soak` (overwritten on every run; not part of CI). Mixed traffic through",
        "the whole local stack at a steady rate; every process of the stack sampled every "
        f"{options.interval:g} s; after the warm-up, the median of the last {WINDOW} samples is compared "
        f"with the median of the first {WINDOW}. RSS is VmRSS less RssShmem (the part of shared_buffers "
        "a Postgres backend has touched so far is no leak; VmRSS is shown as well). Descriptor changes "
        f"of {FD_SLACK} or fewer are not judged. Processes not alive from the first to the last "
        "post-warm-up samples are shown but not judged (—). `2nd half` is the RSS growth over the "
        "second half of the judged period only (not judged): near zero after a large `growth`, the "
        "process grew once and stopped; close to half of it, it keeps growing.",
        "",
        f"- command: `{command}`",
        f"- run: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}, {elapsed / 60:.1f} min of traffic "
        f"at {options.rate:g} requests/s (achieved {traffic.sent / elapsed:.1f}/s), warm-up "
        f"{options.warmup:g} min, threshold {options.threshold:g} %",
        f"- machine: {_machine()}",
        f"- simulator: {SIMULATOR['tokens_per_second']:g} tokens/s, {SIMULATOR['completion_tokens']} "
        "tokens per completion",
        f"- verdict: {verdict}",
        "",
        "## Processes",
        "",
        "| process | RSS start | RSS end | RSS max | VmRSS end | growth | 2nd half | fds start | fds end "
        "| fd growth | ok |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for v in verdicts:
        ok = "—" if not v.judged else ("yes" if v.ok else "**no**")
        lines.append(
            f"| {v.label} | {v.rss_start:.1f} MiB | {v.rss_end:.1f} MiB | {v.rss_max:.1f} MiB | "
            f"{v.vm_rss_end:.1f} MiB | {v.rss_growth:+.1f} % | {v.late_growth:+.1f} % | {v.fds_start:g} | "
            f"{v.fds_end:g} | {v.fd_growth:+.1f} % | {ok} |"
        )
    lines += [
        "",
        "## Traffic",
        "",
        f"{traffic.sent} requests, {traffic.skipped} starts skipped (client at capacity). "
        f"All statuses: {_statuses(total)}.",
        "",
        "| kind | share | requests | statuses | p50 | p99 | as expected |",
        "|---|---:|---:|---|---:|---:|---|",
    ]
    weights = sum(k.weight for k in KINDS)
    for kind in KINDS:
        counts = traffic.statuses.get(kind.name, Counter())
        lat = traffic.latency.get(kind.name, [])
        lines.append(
            f"| {kind.name} (`{kind.method} {kind.path}`) | {kind.weight * 100 / weights:.0f} % | "
            f"{sum(counts.values())} | {_statuses(counts)} | {_percentile(lat, 0.5) * 1000:.0f} ms | "
            f"{_percentile(lat, 0.99) * 1000:.0f} ms | {'yes' if _kind_ok(kind, counts) else '**no**'} |"
        )
    lines += [
        "",
        "## Valkey's contents",
        "",
        "Not judged; they explain Valkey's memory. `keys` counts every key (limit windows, leases, grants "
        "used once, caches); the streams are the usage events and the denial batches for the accountant.",
        "",
        "| figure | start | end | max |",
        "|---|---:|---:|---:|",
        *(f"| {' | '.join(row)} |" for row in stores),
        "",
        "Keys at the end of the traffic, by family (ids and numbers as `<n>`), with the TTL they had left:",
        "",
        "| family | keys | TTL left |",
        "|---|---:|---|",
        *(f"| `{family}` | {count} | {ttl} |" for family, count, ttl in families[:12]),
    ]
    return "\n".join(lines) + "\n"


def run(options: Options, *, keep: bool, command: str) -> int:
    """Start the stack, soak it, judge, report; 1 on growth, a dead process or errors."""
    workdir = localstack.ROOT / ".dev" / f"soak-{os.getpid()}"
    environ = {"GATEWAY_LOG_LEVEL": "INFO", **os.environ}
    stack = localstack.LocalStack(workdir, environ=environ)
    with console.status("starting Postgres, Valkey, simulator, sidecar, proxy and Caddy…"):
        stack.start()
    try:
        console.print(
            f"soaking: {options.minutes:g} min at {options.rate:g} requests/s, "
            f"warm-up {options.warmup:g} min, samples every {options.interval:g} s "
            f"(logs in {workdir.relative_to(localstack.ROOT)})"
        )
        with console.status("running mixed traffic…"):
            sampler, traffic, elapsed = asyncio.run(soak(stack, options))
    finally:
        stack.stop()
    verdicts = judge(sampler.series, options.warmup * 60, options.interval, options.threshold)
    # Every sample, for a closer look (kept with --keep or on failure).
    samples = {label: [attrs.asdict(s) for s in series] for label, series in sampler.series.items()}
    (workdir / "samples.json").write_bytes(orjson.dumps({"processes": samples, "valkey": sampler.store}))
    stores = store_rows(sampler.store, options.warmup * 60)
    show(verdicts, traffic, options.threshold, stores, sampler.families)
    failures = [f"{v.label} grew" for v in verdicts if not v.ok]
    failures += [f"{root} died" for root in sampler.gone]
    failures += [f"{kind}: {n} errors or 5xx" for kind, n in traffic.unexpected().items()]
    DOC.write_text(
        markdown(
            stores=stores,
            families=sampler.families,
            verdicts=verdicts,
            traffic=traffic,
            options=options,
            elapsed=elapsed,
            failures=failures,
            command=command,
        )
    )
    console.print(f"report written to {DOC.relative_to(localstack.ROOT)}")
    if failures:
        console.print(f"[bold red]failed:[/] {'; '.join(failures)} (logs kept in {workdir})")
        return 1
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    console.print("[bold green]passed:[/] no growth beyond the threshold after the warm-up")
    return 0


def main(argv: Sequence[str]) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the traffic runs (10)")
    parser.add_argument("--rate", type=float, default=50.0, help="requests started per second (50)")
    parser.add_argument(
        "--warmup", type=float, help="minutes not judged at the start (default: 1, or 10 %% of a longer run)"
    )
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (5)")
    parser.add_argument("--threshold", type=float, default=10.0, help="growth that fails, in %% (10)")
    parser.add_argument("--keep", action="store_true", help="keep the stack's logs under .dev/ after a pass")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(1.0, args.minutes / 10)
    if args.minutes <= 0 or args.rate <= 0 or args.interval <= 0:
        parser.error("--minutes, --rate and --interval must be positive")
    if not 0 <= warmup < args.minutes:
        parser.error("--warmup must be shorter than the run")
    if (args.minutes - warmup) * 60 < 2 * WINDOW * args.interval:
        parser.error(f"after the warm-up, the run must last at least {2 * WINDOW} samples")
    options = Options(args.minutes, args.rate, warmup, args.interval, args.threshold)
    # SIGTERM unwinds like Ctrl-C, so the stack is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return run(options, keep=args.keep, command=shlex.join(["scripts/soak", *argv]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
