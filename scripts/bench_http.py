"""The HTTP-level arms of `scripts/bench`: the simulator directly, a bare Caddy `reverse_proxy` (the
floor), Caddy with forward_auth only (the sidecar hop), the full gateway with every limit
configured, and optionally LiteLLM's proxy (`--peer litellm`) and Portkey's gateway (`--peer portkey`),
measured the same way.

Arms run interleaved in rounds (A B C A B C …) so drift of the machine cancels out; the load comes
from separate `scripts/loadgen.py` processes (closed-loop aiohttp clients) so the client is not
what limits an arm. Every arm sends the same OpenAI `/v1/chat/completions` body.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import attrs
import orjson

import localstack
from shared import admin
from shared.db import asyncpg_dsn
from shared.models import LIMIT_NAMES

CHAT_PATH = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Say hi"}]
LOADGEN = localstack.ROOT / "scripts" / "loadgen.py"
FLOOR_SCRIPT = localstack.ROOT / "scripts" / "floor_relay.py"
FLOOR = "shape floor"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (Postgres backends, LiteLLM workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process tree so far."""
    total = 0
    for each in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def machine_cpu_seconds() -> float:
    """Busy CPU of the whole machine so far (every process: the arm, the simulator, the load)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def rss_mb(pid: int) -> float:
    """Resident memory of a process tree."""
    total = 0
    for each in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


@attrs.frozen
class Arm:
    """One way to reach the simulator."""

    name: str
    url: str
    headers: Mapping[str, str]
    pids: Mapping[str, int]  # the processes this arm adds (measured for CPU and RSS)
    model: str = "llama3.2"


@attrs.define
class Sample:
    """Everything measured for one arm at one concurrency (summed over rounds)."""

    latency: list[float] = attrs.Factory(list)
    ttfb: list[float] = attrs.Factory(list)
    gaps: list[float] = attrs.Factory(list)
    requests: int = 0
    elapsed: float = 0.0
    reads: int = 0
    coalesced_reads: int = 0
    errors: int = 0
    statuses: dict[str, int] = attrs.Factory(dict)
    cpu: dict[str, float] = attrs.Factory(dict)  # process → CPU seconds during the runs
    rss: dict[str, float] = attrs.Factory(dict)  # process → peak MB
    loadgen_cpu: float = 0.0
    machine_cpu: float = 0.0  # busy CPU seconds of the whole machine during the runs
    chunks: int = 0  # streamed events received

    @property
    def machine_cpu_per_request(self) -> float:
        """Seconds of machine CPU per completed request."""
        return self.machine_cpu / self.requests if self.requests else float("nan")

    @property
    def rate(self) -> float:
        """Completed requests per second."""
        return self.requests / self.elapsed if self.elapsed else 0.0


@attrs.define
class LoadGenerator:
    """`workers` loadgen processes sharing each job's concurrency."""

    workers: int = 2
    procs: list[asyncio.subprocess.Process] = attrs.Factory(list)

    async def start(self) -> LoadGenerator:
        """Start the worker processes."""
        for _ in range(self.workers):
            self.procs.append(
                await asyncio.create_subprocess_exec(
                    str(localstack.ROOT / ".venv" / "bin" / "python"),
                    str(LOADGEN),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    limit=1 << 28,
                )
            )
        return self

    async def stop(self) -> None:
        """Close their input and wait for them."""
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
        self.procs.clear()

    async def run(self, arm: Arm, *, concurrency: int, seconds: float, stream: bool) -> dict[str, Any]:
        """One closed-loop run of `concurrency` clients for `seconds`, merged over the workers."""
        body: dict[str, Any] = {"model": arm.model, "messages": MESSAGES}
        if stream:
            body["stream"] = True
        used = self.procs[: max(1, min(len(self.procs), concurrency))]
        start_at = time.time() + 0.2
        shares = [concurrency // len(used) + (i < concurrency % len(used)) for i in range(len(used))]
        for proc, share in zip(used, shares, strict=True):
            job = {
                "url": arm.url + CHAT_PATH,
                "headers": {"Content-Type": "application/json", **arm.headers},
                "body": orjson.dumps(body).decode(),
                "concurrency": share,
                "seconds": seconds,
                "start_at": start_at,
                "stream": stream,
                "separator": "\n\n",
            }
            assert proc.stdin is not None  # noqa: S101 (started with a pipe)
            proc.stdin.write(orjson.dumps(job) + b"\n")
            await proc.stdin.drain()
        merged: dict[str, Any] = {"latency": [], "ttfb": [], "gaps": [], "statuses": {}, "elapsed": 0.0}
        for proc in used:
            assert proc.stdout is not None  # noqa: S101
            part = orjson.loads(await proc.stdout.readline())
            for name in ("latency", "ttfb", "gaps"):
                merged[name] += part[name]
            for name in ("reads", "coalesced_reads", "events", "errors", "cpu"):
                merged[name] = merged.get(name, 0) + part[name]
            for status, count in part["statuses"].items():
                merged["statuses"][status] = merged["statuses"].get(status, 0) + count
            merged["elapsed"] = max(merged["elapsed"], part["elapsed"])
        return merged


async def measure(
    generator: LoadGenerator,
    arms: Sequence[Arm],
    *,
    concurrency: int,
    seconds: float,
    rounds: int,
    stream: bool,
) -> dict[str, Sample]:
    """Interleaved rounds over the arms (after one short warm-up run each)."""
    samples = {arm.name: Sample() for arm in arms}
    for arm in arms:
        await generator.run(arm, concurrency=concurrency, seconds=min(1.0, seconds), stream=stream)
    for _ in range(rounds):
        for arm in arms:
            before = {name: cpu_seconds(pid) for name, pid in arm.pids.items()}
            machine = machine_cpu_seconds()
            part = await generator.run(arm, concurrency=concurrency, seconds=seconds, stream=stream)
            sample = samples[arm.name]
            sample.machine_cpu += machine_cpu_seconds() - machine
            sample.chunks += part["events"]
            for name, pid in arm.pids.items():
                sample.cpu[name] = sample.cpu.get(name, 0.0) + cpu_seconds(pid) - before[name]
                sample.rss[name] = max(sample.rss.get(name, 0.0), rss_mb(pid))
            sample.latency += part["latency"]
            sample.ttfb += part["ttfb"]
            sample.gaps += part["gaps"]
            sample.requests += len(part["latency"])
            sample.elapsed += part["elapsed"]
            sample.reads += part["reads"]
            sample.coalesced_reads += part["coalesced_reads"]
            sample.errors += part["errors"]
            sample.loadgen_cpu += part["cpu"]
            for status, count in part["statuses"].items():
                sample.statuses[status] = sample.statuses.get(status, 0) + count
    return samples


# --- the arms -----------------------------------------------------------------------------------------

BARE_CADDYFILE = """{
	auto_https off
	admin 127.0.0.1:{$CADDY_ADMIN_PORT}
	persist_config off
	servers {
		timeouts {
			read_header 10s
			write_idle 10m
		}
	}
}

http://127.0.0.1:{$BARE_PORT} {
	reverse_proxy 127.0.0.1:{$SIM_PORT}
}

http://127.0.0.1:{$AUTH_PORT} {
	route {
		request_header -X-Gw-*
		forward_auth 127.0.0.1:{$SIDECAR_PORT} {
			uri /authz
			header_up X-Request-Id {http.request.uuid}
			copy_headers X-Gw-Request-Id X-Gw-Grant
			header_up X-Gw-Client-Ip {client_ip}
			header_up -Content-Encoding
			header_up X-Gw-Body-Encoding {http.request.header.Content-Encoding}
		}
		reverse_proxy 127.0.0.1:{$SIM_PORT}
	}
}
"""


async def _keys(stack: localstack.LocalStack) -> tuple[str, str]:
    """A key with every limit configured (key and tenant, far above what the bench uses), and one
    for the forward_auth-only arm without a concurrency limit (no stream_proxy releases its lease)."""
    conn = await asyncpg.connect(asyncpg_dsn(stack.env["GATEWAY_DATABASE_URL"]))
    try:
        tokens = []
        for name, limits in (
            ("every-limit", LIMIT_NAMES),
            ("auth-only", [n for n in LIMIT_NAMES if n != "max_concurrent"]),
        ):
            tenant = f"bench-{name}-{uuid.uuid4().hex[:6]}"
            await admin.create_tenant(conn, name=tenant)
            created = await admin.create_key(
                conn, tenant=tenant, name=name, pepper=stack.env["GATEWAY_KEY_PEPPER"]
            )
            everything = {name: admin.parse_limit(name, str(10**9)) for name in limits}
            await admin.set_limits(conn, tenant=tenant, limits=everything)
            await admin.set_limits(conn, prefix=created.key.prefix, limits=everything)
            tokens.append(created.token)
    finally:
        await conn.close()
    return tokens[0], tokens[1]


@contextlib.contextmanager
def _bare_caddy(workdir: Path, sim_port: int, sidecar_port: int) -> Iterator[tuple[int, int, int]]:
    """The same Caddy binary: a bare reverse_proxy site, and one with forward_auth only."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "Caddyfile.bench"
    config.write_text(BARE_CADDYFILE)
    bare, auth, admin_port = (localstack.free_port() for _ in range(3))
    env = {
        "XDG_DATA_HOME": str(workdir / "data"),
        "XDG_CONFIG_HOME": str(workdir / "config"),
        "CADDY_ADMIN_PORT": str(admin_port),
        "BARE_PORT": str(bare),
        "AUTH_PORT": str(auth),
        "SIM_PORT": str(sim_port),
        "SIDECAR_PORT": str(sidecar_port),
    }
    with (workdir / "caddy-bare.log").open("ab") as log:
        proc = subprocess.Popen(
            [localstack.caddy_binary(), "run", "--config", str(config), "--adapter", "caddyfile"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    try:
        localstack.wait_for_port(bare, proc=proc)
        localstack.wait_for_port(auth, proc=proc)
        yield bare, auth, proc.pid
    finally:
        localstack.terminate(proc)


@contextlib.contextmanager
def _shape_floor(workdir: Path, sim_url: str) -> Iterator[tuple[int, dict[str, int]]]:
    """The gateway's shape doing nothing: the gateway's own Caddyfile (caddy/Caddyfile.dev), its
    forward_auth answered by a do-nothing responder and its reverse_proxy to a do-nothing relay
    (scripts/floor_relay.py, both on uvloop). Yields Caddy's port and the three processes."""
    workdir.mkdir(parents=True, exist_ok=True)
    python, script = str(localstack.ROOT / ".venv" / "bin" / "python"), str(FLOOR_SCRIPT)
    responder, relay, port, admin_port = (localstack.free_port() for _ in range(4))
    config = workdir / "Caddyfile"
    config.write_text(f"import {localstack.ROOT / 'caddy' / 'Caddyfile.dev'}\n")
    env = {
        **os.environ,
        "XDG_DATA_HOME": str(workdir / "data"),
        "XDG_CONFIG_HOME": str(workdir / "config"),
        "CADDY_ADMIN_PORT": str(admin_port),
        "GATEWAY_PORT": str(port),
        "SIDECAR_UPSTREAMS": f"127.0.0.1:{responder}",
        "PROXY_UPSTREAMS": f"127.0.0.1:{relay}",
    }
    commands = {
        "floor responder": ([python, script, "--authz", str(responder)], responder),
        "floor relay": ([python, script, str(relay), sim_url], relay),
        "caddy (floor)": (
            [localstack.caddy_binary(), "run", "--config", str(config), "--adapter", "caddyfile"],
            port,
        ),
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with (workdir / "floor.log").open("ab") as log:
        try:
            for name, (argv, listen) in commands.items():
                procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
                localstack.wait_for_port(listen, proc=procs[name])
            yield port, {name: proc.pid for name, proc in procs.items()}
        finally:
            for proc in reversed(procs.values()):
                localstack.terminate(proc)


def _peer_arm(name: str, stop: contextlib.ExitStack, sim_url: str, workdir: Path) -> Arm:
    """LiteLLM's proxy (`peer_litellm`) or Portkey's gateway (`peer_portkey`) in front of the
    simulator, installed under .dev/ on first use, stopped with `stop`."""
    module = importlib.import_module(f"peer_{name}")  # optional arms: imported only when asked for
    peer = stop.enter_context(
        module.running(localstack.ROOT / ".dev", sim_url, port=localstack.free_port(), workdir=workdir)
    )
    if name == "litellm":
        headers = {"Authorization": f"Bearer {peer.master_key}"}
        return Arm("LiteLLM", peer.url, headers, {"litellm": peer.pid}, model=peer.model_name)
    return Arm("Portkey", peer.url, peer.headers, {"portkey": peer.pid}, model=peer.model_name)


@attrs.define
class Bench:
    """The local stack plus the extra arms, started once for the HTTP scenarios."""

    workdir: Path
    database_url: str
    redis_url: str
    store_pids: dict[str, int] = attrs.Factory(dict)  # Valkey and Postgres, when started here
    peers: tuple[str, ...] = ()
    arms: list[Arm] = attrs.Factory(list)
    sim_url: str = ""
    simulator_pid: int = 0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Bench]:
        """Start everything; stop it all on the way out."""
        environ = {
            **os.environ,
            "GATEWAY_DATABASE_URL": self.database_url,
            "GATEWAY_REDIS_URL": self.redis_url,
            "GATEWAY_REDIS_PREFIX": f"bench:{uuid.uuid4().hex[:6]}:",
        }
        environ.pop("GATEWAY_OLLAMA_URL", None)
        stack = localstack.LocalStack(self.workdir / "stack", environ=environ)
        with contextlib.ExitStack() as stop:
            stack.start()
            stop.callback(stack.stop)
            pids = stack.pids()
            self.sim_url = stack.urls["ollama_url"]
            self.simulator_pid = pids["simulator"]
            sim_port = int(self.sim_url.rsplit(":", 1)[1])
            sidecar_port = int(stack.urls["sidecar_url"].rsplit(":", 1)[1])
            bare, auth, caddy_pid = stop.enter_context(
                _bare_caddy(self.workdir / "bare-caddy", sim_port, sidecar_port)
            )
            floor_port, floor_pids = stop.enter_context(_shape_floor(self.workdir / "floor", self.sim_url))
            token, auth_token = await _keys(stack)
            gateway_pids = {name: pids[name] for name in ("caddy", "authz_sidecar", "stream_proxy")}
            self.arms = [
                Arm("direct", self.sim_url, {}, {"simulator": pids["simulator"]}),
                Arm("bare Caddy", f"http://127.0.0.1:{bare}", {}, {"caddy (bare)": caddy_pid}),
                Arm(
                    "Caddy + forward_auth",
                    f"http://127.0.0.1:{auth}",
                    {"Authorization": f"Bearer {auth_token}"},
                    {"caddy (bare)": caddy_pid, "authz_sidecar": pids["authz_sidecar"]},
                ),
                Arm(
                    FLOOR, f"http://127.0.0.1:{floor_port}", {"Authorization": "Bearer nz_floor"}, floor_pids
                ),
                Arm(
                    "gateway",
                    stack.urls["gateway_url"],
                    {"Authorization": f"Bearer {token}"},
                    {**gateway_pids, **self.store_pids},
                ),
            ]
            for name in self.peers:
                self.arms.append(_peer_arm(name, stop, self.sim_url, self.workdir / name))
            yield self

    async def simulator(self, **settings: Any) -> dict[str, Any]:
        """Pin the simulator's settings; returns them."""
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.sim_url}/_sim/settings", json=settings) as resp,
        ):
            resp.raise_for_status()
            current: dict[str, Any] = await resp.json()
            return current


# --- results ---------------------------------------------------------------------------------------


@attrs.frozen
class Row:
    """One measured figure beside its target."""

    figure: str
    value: str
    target: str
    met: bool | None


@attrs.frozen
class Outcome:
    """A scenario's rows (figures with targets) and the extra Markdown (tables, charts)."""

    rows: list[Row]
    markdown: str
    meta: dict[str, str]


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _ok_share(sample: Sample) -> str:
    total = sum(sample.statuses.values()) + sample.errors
    bad = total - sample.statuses.get("200", 0)
    return f"{bad} of {total}"


def _arm_table(results: Mapping[int, Mapping[str, Sample]], *, stream: bool) -> str:
    """Every arm at every concurrency: the raw figures."""
    header = ["concurrency", "arm", "requests/s", "latency p50", "latency p99"]
    if stream:
        header += ["first byte p50", "first byte p99", "inter-chunk p99", "coalesced reads"]
    header += ["not 200", "load generator CPU"]
    lines = []
    for concurrency, samples in results.items():
        for name, s in samples.items():
            line = [
                str(concurrency),
                name,
                f"{s.rate:,.0f}",
                _ms(percentile(s.latency, 50)),
                _ms(percentile(s.latency, 99)),
            ]
            if stream:
                share = s.coalesced_reads / s.reads * 100 if s.reads else 0.0
                line += [
                    _ms(percentile(s.ttfb, 50)),
                    _ms(percentile(s.ttfb, 99)),
                    _ms(percentile(s.gaps, 99)),
                    f"{share:.1f} %",
                ]
            line += [_ok_share(s), f"{s.loadgen_cpu / s.elapsed * 100:.0f} % of a core" if s.elapsed else "—"]
            lines.append(line)
    return _table(header, lines)


def _process_table(samples: Mapping[str, Sample], concurrency: int) -> str:
    """CPU and memory of every process an arm adds, at one concurrency."""
    lines = []
    for name, s in samples.items():
        for process, cpu in s.cpu.items():
            per_request = cpu / s.requests * 1e3 if s.requests else 0.0
            share = cpu / s.elapsed * 100 if s.elapsed else 0.0
            lines.append(
                [name, process, f"{per_request:.3f} ms", f"{share:.0f} %", f"{s.rss[process]:.0f} MB"]
            )
    header = [
        "arm",
        "process",
        f"CPU per request ({concurrency} concurrent)",
        "CPU (% of one core)",
        "RSS peak",
    ]
    return _table(header, lines)


def _ratio_table(
    results: Mapping[int, Mapping[str, Sample]],
    figures: Sequence[tuple[str, str, str]],
    targets: dict[str, str],
) -> str:
    """The gateway divided by the shape floor, bare Caddy and LiteLLM for every figure."""
    versus = [(FLOOR, "floor"), ("bare Caddy", "bare"), ("LiteLLM", "peer"), ("Portkey", "portkey")]
    present = [(arm, tag) for arm, tag in versus if any(arm in samples for samples in results.values())]
    lines = []
    for concurrency, samples in results.items():
        gateway = samples["gateway"]
        for label, attribute, kind in figures:

            def value(s: Sample, attribute: str = attribute, kind: str = kind) -> float:
                if kind == "rate":
                    return s.rate
                if kind == "cpu":
                    return s.machine_cpu_per_request
                return percentile(getattr(s, attribute), float(kind))

            mine = value(gateway)
            key = f"{label} @ {concurrency}"
            line = [key]
            for arm, tag in present:
                other = samples.get(arm)
                line.append(f"{mine / value(other):.2f}" if other is not None and value(other) else "not run")
                line.append(targets.get(f"{tag}:{key}", "—"))
            lines.append(line)
    header = ["figure"]
    for arm, _ in present:
        header += [f"gateway ÷ {arm}", "target"]
    return _table(header, lines)


def _machine_table(results: Mapping[int, Mapping[str, Sample]], *, stream: bool) -> str:
    """Machine CPU (every process on the machine) per request, and per relayed chunk when streaming."""
    header = ["concurrency", "arm", "machine CPU per request"]
    if stream:
        header += ["chunks per request", "machine CPU per chunk"]
    lines = []
    for concurrency, samples in results.items():
        for name, s in samples.items():
            line = [str(concurrency), name, _ms(s.machine_cpu_per_request)]
            if stream:
                per = s.chunks / s.requests if s.requests else 0.0
                line += [f"{per:.0f}", f"{s.machine_cpu / s.chunks * 1e6:.1f} µs" if s.chunks else "—"]
            lines.append(line)
    return _table(header, lines)


def _chart(path: Path, results: Mapping[int, Mapping[str, Sample]], *, attribute: str, title: str) -> None:
    """Latency percentiles per arm (grouped by concurrency) and throughput per concurrency."""
    import matplotlib  # noqa: PLC0415 (only the bench draws)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    levels = list(results)
    arms = list(next(iter(results.values())))
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        xs = [n + i * width for n in range(len(levels))]
        p50 = [percentile(getattr(results[c][arm], attribute), 50) * 1e3 for c in levels]
        p99 = [percentile(getattr(results[c][arm], attribute), 99) * 1e3 for c in levels]
        left.bar(xs, p99, width, alpha=0.35, color=f"C{i}")
        left.bar(xs, p50, width, label=arm, color=f"C{i}")
        right.plot([str(c) for c in levels], [results[c][arm].rate for c in levels], marker="o", label=arm)
    left.set_xticks([n + 0.4 - width / 2 for n in range(len(levels))], [str(c) for c in levels])
    left.set_yscale("log")
    left.set_xlabel("concurrent clients")
    left.set_ylabel("ms (solid p50, light p99)")
    left.set_title(f"{title}: latency per arm")
    left.legend(fontsize=8)
    right.set_xlabel("concurrent clients")
    right.set_ylabel("requests per second")
    right.set_title(f"{title}: throughput")
    right.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


# --- scenarios --------------------------------------------------------------------------------------

OVERHEAD_SIMULATOR = {
    "tokens_per_second": 0,
    "time_to_first_token": 0,
    "completion_tokens": 12,
    "max_records": 50,
}
STREAM_SIMULATOR = {
    "tokens_per_second": 50,
    "time_to_first_token": 0,
    "completion_tokens": 20,
    "max_records": 50,
}
LONG_STREAM_SIMULATOR = {**STREAM_SIMULATOR, "tokens_per_second": 200, "completion_tokens": 200}


def _settings_text(settings: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k} {settings[k]}" for k in ("tokens_per_second", "time_to_first_token", "completion_tokens")
    )


async def scenario_chat(
    bench: Bench, generator: LoadGenerator, *, rounds: int, seconds: float, charts: Path
) -> Outcome:
    """Non-streaming chat at 1 / 16 / 64 concurrent, every arm, interleaved rounds."""
    settings = await bench.simulator(**OVERHEAD_SIMULATOR)
    results: dict[int, dict[str, Sample]] = {}
    for concurrency in (1, 16, 64):
        results[concurrency] = await measure(
            generator, bench.arms, concurrency=concurrency, seconds=seconds, rounds=rounds, stream=False
        )
    rows: list[Row] = []
    one, top = results[1], results[64]

    def added(samples: Mapping[str, Sample], arm: str, base: str, q: float) -> float:
        return percentile(samples[arm].latency, q) - percentile(samples[base].latency, q)

    value = added(one, "gateway", FLOOR, 50)
    rows.append(Row("added p50 over the shape floor, 1 concurrent", _ms(value), "≤ 1 ms", value <= 1e-3))
    value = added(one, "gateway", FLOOR, 99)
    rows.append(Row("added p99 over the shape floor, 1 concurrent", _ms(value), "—", None))
    rows.append(_ratio_row("requests/s at 64 concurrent", top, FLOOR, "rate", 0.5))
    rows.append(_ratio_row("machine CPU per request at 64 concurrent", top, FLOOR, "cpu", 2.0))
    rows.append(_ratio_row("requests/s at 64 concurrent", top, "LiteLLM", "rate", 15.0))
    rows.append(_ratio_row("requests/s at 64 concurrent", top, "Portkey", "rate", None))
    hops = (
        ("whole gateway added over bare Caddy", "gateway", "bare Caddy"),
        ("forward_auth round trip incl. sidecar decision", "Caddy + forward_auth", "bare Caddy"),
        ("stream_proxy hop (gateway − Caddy + forward_auth)", "gateway", "Caddy + forward_auth"),
    )
    for label, arm, base in hops:
        values = " / ".join(_ms(added(one, arm, base, q)) for q in (50, 99))
        rows.append(Row(f"{label}, p50 / p99, 1 concurrent", values, "—", None))
    rows.append(_ratio_row("requests/s at 64 concurrent", top, "bare Caddy", "rate", None))
    rows += _error_rows(results)
    _chart(charts / "chat.png", results, attribute="latency", title="non-streaming chat")
    targets = {
        "floor:requests/s @ 64": "≥ 0.5",
        "floor:machine CPU per request @ 64": "≤ 2",
        "peer:requests/s @ 64": "≥ 15",
    }
    figures = [
        ("latency p50", "latency", "50"),
        ("latency p99", "latency", "99"),
        ("requests/s", "", "rate"),
        ("machine CPU per request", "", "cpu"),
    ]
    markdown = "\n\n".join(
        [
            "![non-streaming chat: latency and throughput per arm](bench/chat.png)",
            "#### every arm\n\n" + _arm_table(results, stream=False),
            "#### ratios\n\n" + _ratio_table(results, figures, targets),
            "#### machine CPU\n\n" + _machine_table(results, stream=False),
            "#### processes (64 concurrent)\n\n" + _process_table(top, 64),
        ]
    )
    return Outcome(rows, markdown, {"simulator": _settings_text(settings), **_shape(rounds, seconds)})


async def scenario_stream(
    bench: Bench, generator: LoadGenerator, *, rounds: int, seconds: float, charts: Path
) -> Outcome:
    """Streaming chat: latency at 1 / 64 / 256 concurrent at a realistic token rate, then the
    machine's CPU for 200-chunk answers at 64 concurrent (every arm, interleaved)."""
    settings = await bench.simulator(**STREAM_SIMULATOR)
    # Not Portkey: its gateway answers every streamed request 500 "Something went wrong" (a TypeError
    # "immutable" in its header handling; 1.15.2 and 1.9.8 on Node 20), so there is nothing to compare.
    arms = [arm for arm in bench.arms if arm.name not in ("Caddy + forward_auth", "Portkey")]
    results: dict[int, dict[str, Sample]] = {}
    for concurrency in (1, 64, 256):
        results[concurrency] = await measure(
            generator, arms, concurrency=concurrency, seconds=seconds, rounds=rounds, stream=True
        )
    await bench.simulator(**LONG_STREAM_SIMULATOR)
    long = {
        64: await measure(
            generator, arms, concurrency=64, seconds=max(3.0, seconds), rounds=rounds, stream=True
        )
    }
    await bench.simulator(**STREAM_SIMULATOR)
    rows: list[Row] = [
        _ratio_row("200-chunk answers at 64 concurrent: machine CPU per request", long[64], FLOOR, "cpu", 1.2)
    ]
    for base in (FLOOR, "bare Caddy"):
        for concurrency in (1, 64):
            samples = results[concurrency]
            ttfb = " / ".join(
                _ms(percentile(samples["gateway"].ttfb, q) - percentile(samples[base].ttfb, q))
                for q in (50, 99)
            )
            gap = percentile(samples["gateway"].gaps, 99) - percentile(samples[base].gaps, 99)
            rows.append(
                Row(f"added first byte over {base}, p50 / p99, {concurrency} concurrent", ttfb, "—", None)
            )
            rows.append(
                Row(f"added inter-chunk p99 over {base}, {concurrency} concurrent", _ms(gap), "—", None)
            )
    big = results[256]
    value = percentile(big["gateway"].ttfb, 50) - percentile(big[FLOOR].ttfb, 50)
    rows.append(Row("added first byte over the shape floor, p50, 256 concurrent", _ms(value), "—", None))
    rows += _error_rows(results)
    rows += _error_rows(long, label="200-chunk answers: responses other than 200")
    _chart(charts / "stream.png", results, attribute="ttfb", title="streaming chat (first byte)")
    figures = [
        ("first byte p50", "ttfb", "50"),
        ("first byte p99", "ttfb", "99"),
        ("inter-chunk p99", "gaps", "99"),
        ("requests/s", "", "rate"),
    ]
    long_figures = [("machine CPU per request", "", "cpu"), ("requests/s", "", "rate")]
    markdown = "\n\n".join(
        [
            "![streaming chat: time to first byte and throughput per arm](bench/stream.png)",
            "#### every arm\n\n" + _arm_table(results, stream=True),
            "#### ratios\n\n" + _ratio_table(results, figures, {}),
            f"#### 200-chunk answers at 64 concurrent ({_settings_text(LONG_STREAM_SIMULATOR)})\n\n"
            + _machine_table(long, stream=True)
            + "\n\n"
            + _ratio_table(long, long_figures, {"floor:machine CPU per request @ 64": "≤ 1.2"}),
            "#### processes (200-chunk answers, 64 concurrent)\n\n" + _process_table(long[64], 64),
            "#### processes (256 concurrent)\n\n" + _process_table(big, 256),
        ]
    )
    return Outcome(rows, markdown, {"simulator": _settings_text(settings), **_shape(rounds, seconds)})


def _ratio_row(label: str, samples: Mapping[str, Sample], base: str, kind: str, bound: float | None) -> Row:
    """gateway ÷ `base` for one figure; a rate must reach `bound`, a CPU figure stay under it."""
    target = "—" if bound is None else (f"≥ {bound:g}" if kind == "rate" else f"≤ {bound:g}")
    figure = f"{label}, gateway ÷ {base}"
    other = samples.get(base)
    if other is None:
        flag = {"LiteLLM": "litellm", "Portkey": "portkey"}.get(base, base)
        return Row(figure, f"not run (add --peer {flag})", target, None)
    gateway = samples["gateway"]
    if kind == "rate":
        mine, theirs, unit = gateway.rate, other.rate, "req/s"
        text = f"{mine:,.0f} ÷ {theirs:,.0f} {unit}"
    else:
        mine, theirs = gateway.machine_cpu_per_request, other.machine_cpu_per_request
        text = f"{_ms(mine)} ÷ {_ms(theirs)}"
    ratio = mine / theirs if theirs else float("inf")
    met = None if bound is None else (ratio >= bound if kind == "rate" else ratio <= bound)
    return Row(figure, f"{ratio:.2f} ({text})", target, met)


def _error_rows(
    results: Mapping[int, Mapping[str, Sample]], label: str = "responses other than 200"
) -> list[Row]:
    rows = []
    for concurrency, samples in results.items():
        bad = {name: _ok_share(s) for name, s in samples.items() if s.statuses.keys() - {"200"} or s.errors}
        rows.append(
            Row(
                f"{label}, {concurrency} concurrent",
                "; ".join(f"{n}: {v}" for n, v in bad.items()) or "none",
                "none",
                not bad,
            )
        )
    return rows


def _shape(rounds: int, seconds: float) -> dict[str, str]:
    return {"rounds": f"{rounds} interleaved × {seconds:g} s per arm", "load": "2 loadgen processes"}


@contextlib.asynccontextmanager
async def _replica_arm(
    bench: Bench, name: str, *, sidecars: int, proxies: int, cluster: bool, workers: int = 1
) -> AsyncIterator[Arm]:
    """A whole gateway (its own simulator and Caddy) with replicas (or worker processes), as one arm."""
    environ = {
        **os.environ,
        "GATEWAY_SIDECAR_WORKERS": str(workers),
        "GATEWAY_PROXY_WORKERS": str(workers),
        "GATEWAY_DATABASE_URL": bench.database_url,
        "GATEWAY_REDIS_PREFIX": f"bench:{uuid.uuid4().hex[:6]}:",
        "GATEWAY_SIM_TOKENS_PER_SECOND": "0",
    }
    environ.pop("GATEWAY_OLLAMA_URL", None)
    if cluster:
        environ.pop("GATEWAY_REDIS_URL", None)
    else:
        environ["GATEWAY_REDIS_URL"] = bench.redis_url
    stack = localstack.LocalStack(
        bench.workdir / name.split(maxsplit=1)[0],
        environ=environ,
        sidecars=sidecars,
        proxies=proxies,
        redis_cluster=cluster,
    )
    stack.start()
    try:
        token, _ = await _keys(stack)
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{stack.urls['ollama_url']}/_sim/settings", json=OVERHEAD_SIMULATOR) as resp,
        ):
            resp.raise_for_status()
        pids = {
            n: p for n, p in stack.pids().items() if n.startswith(("caddy", "authz_sidecar", "stream_proxy"))
        }
        if stack.cluster is not None:
            pids.update({f"valkey-node-{i}": pid for i, pid in enumerate(stack.cluster.pids, 1)})
        yield Arm(name, stack.urls["gateway_url"], {"Authorization": f"Bearer {token}"}, pids)
    finally:
        stack.stop()


async def scenario_replicas(
    bench: Bench, generator: LoadGenerator, *, rounds: int, seconds: float, charts: Path
) -> Outcome:
    """2 sidecars + 2 stream_proxies on a 3-primary Valkey cluster, and 1 + 1 with 2 worker
    processes each (SO_REUSEPORT), versus 1 + 1 on one Valkey, all with every limit configured,
    non-streaming chat at 1 and 64 concurrent (interleaved)."""
    del charts
    async with (
        _replica_arm(bench, "1+1 (one Valkey)", sidecars=1, proxies=1, cluster=False) as single,
        _replica_arm(bench, "2+2 (3-primary cluster)", sidecars=2, proxies=2, cluster=True) as double,
        _replica_arm(
            bench, "1+1, 2 workers each (one Valkey)", sidecars=1, proxies=1, cluster=False, workers=2
        ) as forked,
    ):
        results = {
            concurrency: await measure(
                generator,
                [single, double, forked],
                concurrency=concurrency,
                seconds=seconds,
                rounds=rounds,
                stream=False,
            )
            for concurrency in (1, 64)
        }
    one, top = results[1], results[64]
    rows = [
        Row(f"requests/s at 64 concurrent, {arm.name}", f"{top[arm.name].rate:,.0f}", "—", None)
        for arm in (single, double, forked)
    ]
    gain = top[double.name].rate / top[single.name].rate if top[single.name].rate else 0.0
    rows.append(
        Row("throughput 2+2 ÷ 1+1 at 64 concurrent", f"{gain:.2f}", "— (2 cores: little gain expected)", None)
    )
    gain = top[forked.name].rate / top[single.name].rate if top[single.name].rate else 0.0
    rows.append(Row("throughput with 2 workers each ÷ 1 worker, 64 concurrent", f"{gain:.2f}", "—", None))
    for arm in (single, double, forked):
        rows.append(
            Row(
                f"latency p50 / p99 at 1 concurrent, {arm.name}",
                " / ".join(_ms(percentile(one[arm.name].latency, q)) for q in (50, 99)),
                "—",
                None,
            )
        )
    rows += _error_rows(results)
    markdown = "\n\n".join(
        [
            "#### every arm\n\n" + _arm_table(results, stream=False),
            "#### processes (64 concurrent)\n\n" + _process_table(top, 64),
        ]
    )
    return Outcome(
        rows, markdown, {"simulator": _settings_text(OVERHEAD_SIMULATOR), **_shape(rounds, seconds)}
    )


SLOW_STREAMS = 5000
SLOW_RAMP_SECONDS = 15.0  # about 330 new streams a second: within what the gateway admits
SLOW_SIMULATOR = {**STREAM_SIMULATOR, "tokens_per_second": 1, "completion_tokens": 30}


@attrs.define
class _Open:
    """Streams answered (200) and not yet ended, and the most there were at once."""

    now: int = 0
    peak: int = 0

    def opened(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)


async def _slow_stream(session: aiohttp.ClientSession, arm: Arm, body: bytes, streams: _Open) -> str:
    """One streamed chat read to its end: "ok" for a 200 whose last line says done, else what
    went wrong (the status, "not done" or the exception's type)."""
    headers = {"Content-Type": "application/json", **arm.headers}
    try:
        async with session.post(arm.url + "/api/chat", data=body, headers=headers) as resp:
            if resp.status != 200:
                return f"HTTP {resp.status}"
            streams.opened()
            try:
                last = b""
                async for line in resp.content:
                    if line.strip():
                        last = line
            finally:
                streams.now -= 1
            return "ok" if orjson.loads(last).get("done") else "not done"
    except (aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError) as exc:
        return type(exc).__name__


async def scenario_slow(
    bench: Bench, generator: LoadGenerator, *, rounds: int, seconds: float, charts: Path
) -> Outcome:
    """5,000 concurrent slow streams (1 token/s, 30 tokens each) through the whole gateway (Caddy,
    forward_auth, stream_proxy, every limit set), opened over about 15 s, so that all are open at
    once: failures, the most open at once, and the peak resident memory of every process."""
    del generator, rounds, seconds, charts
    settings = await bench.simulator(**SLOW_SIMULATOR)
    arm = next(a for a in bench.arms if a.name == "gateway")
    pids = {**arm.pids, "simulator": bench.simulator_pid}
    idle = {name: rss_mb(pid) for name, pid in pids.items()}
    peak = dict(idle)
    body = orjson.dumps({"model": arm.model, "messages": MESSAGES, "stream": True})
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300, sock_read=60)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        streams = _Open()
        for n in range(SLOW_STREAMS):
            tasks.append(asyncio.create_task(_slow_stream(session, arm, body, streams)))
            if n % 100 == 99:
                await asyncio.sleep(SLOW_RAMP_SECONDS * 100 / SLOW_STREAMS)
        while not all(t.done() for t in tasks):
            for name, pid in pids.items():
                peak[name] = max(peak[name], rss_mb(pid))
            await asyncio.sleep(0.5)
        outcomes = collections.Counter(t.result() for t in tasks)
    elapsed = time.monotonic() - started
    served = outcomes.pop("ok", 0)
    failed = SLOW_STREAMS - served
    why = ", ".join(f"{count:,} {what}" for what, count in outcomes.most_common())
    await bench.simulator(**STREAM_SIMULATOR)
    rows = [
        Row(
            f"{SLOW_STREAMS:,} concurrent slow streams through the gateway: failed",
            f"{failed:,} ({served:,} complete in {elapsed:.0f} s{'; ' + why if why else ''})",
            "0",
            failed == 0,
        ),
        Row(
            "streams open at once (peak)",
            f"{streams.peak:,}",
            f"{SLOW_STREAMS:,}",
            streams.peak == SLOW_STREAMS,
        ),
    ]
    rows += [
        Row(f"RSS of {name} (peak; idle)", f"{peak[name]:.0f} MB; {idle[name]:.0f} MB", "—", None)
        for name in pids
    ]
    return Outcome(rows, "", {"simulator": _settings_text(settings)})
