"""`scripts/dev`: start, stop and show the local stack, with a demo tenant and key."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

import localstack
import ollama_simulator
from shared import admin
from shared.db import asyncpg_dsn

# GATEWAY_STACK_FILE moves the state file (and the stack's working directory beside it).
STACK_FILE = Path(os.environ.get("GATEWAY_STACK_FILE") or localstack.ROOT / ".dev" / "stack.json")
STACK_DIR = STACK_FILE.with_suffix("")
DEMO_TENANT = "demo"
console = Console(highlight=False)


async def _demo_key(database_url: str, pepper: str) -> str:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        tenants = {t.name for t, _ in await admin.list_tenants(conn)}
        if DEMO_TENANT not in tenants:
            await admin.create_tenant(conn, name=DEMO_TENANT)
        created = await admin.create_key(
            conn, tenant=DEMO_TENANT, name=f"demo-{int(time.time())}", pepper=pepper
        )
        return created.token
    finally:
        await conn.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_open(url: str) -> bool:
    host_port = url.split("//", 1)[-1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not port.isdigit():
        return False
    with contextlib.suppress(OSError), socket.create_connection((host or "127.0.0.1", int(port)), 0.3):
        return True
    return False


def _read_state() -> dict[str, Any] | None:
    if not STACK_FILE.is_file():
        return None
    state: dict[str, Any] = orjson.loads(STACK_FILE.read_bytes())
    return state


def _curl(state: dict[str, Any]) -> str:
    return (
        f"curl -N {state['gateway_url']}/api/chat -H 'Authorization: Bearer {state['demo_key']}' "
        '-d \'{"model":"llama3.2","messages":[{"role":"user","content":"Hello"}]}\''
    )


def _panel(state: dict[str, Any]) -> Panel:
    gateway = state["gateway_url"]
    lines = [
        f"[bold]gateway[/]   {gateway}",
        f"sidecar   {state['sidecar_url']}",
        f"proxy     {state['proxy_url']}",
        *(
            [f"ollama    {entry}" for entry in state["ollama_urls"].split(",")]
            if state.get("ollama_urls")
            else [f"ollama    {state['ollama_url']}"]
        ),
        f"redis     {state['redis_url']}",
        "",
        f"[bold]demo tenant[/] {DEMO_TENANT}",
        f"[bold]demo key[/]    {state['demo_key']}",
    ]
    return Panel("\n".join(lines), title="neuronetz-gateway: local stack", border_style="green")


def backend_models(index: int, count: int) -> list[str]:
    """The models of simulator `index` (0-based) of `count`: with several, each lacks one of the
    default models in turn, so every model is on all but one backend (one alone has them all)."""
    models = list(ollama_simulator.DEFAULT_MODELS)
    if count == 1:
        return models
    return [m for j, m in enumerate(models) if j != index % len(models)]


def up(
    detach: bool, *, sidecars: int = 1, proxies: int = 1, redis_cluster: bool = False, ollamas: int = 1
) -> int:
    """Start the stack; with --detach return once it answers, else run until Ctrl-C."""
    state = _read_state()
    if state and any(_alive(pid) for pid in state.get("pids", {}).values()):
        console.print("[bold red]error:[/] the stack is already running (scripts/dev down stops it)")
        return 1
    # A visible pace for people trying the stack: tokens arrive one by one (tests run it flat out).
    environ = {"GATEWAY_SIM_TOKENS_PER_SECOND": "20", **os.environ}
    stack = localstack.LocalStack(
        STACK_DIR,
        environ=environ,
        detach=detach,
        sidecars=sidecars,
        proxies=proxies,
        redis_cluster=redis_cluster,
        ollama_models=[backend_models(i, ollamas) for i in range(ollamas)] if ollamas > 1 else (),
    )
    with console.status("starting Postgres, Valkey, simulator, sidecar, proxy and Caddy…"):
        try:
            stack.start()
            demo_key = asyncio.run(_demo_key(stack.urls["database_url"], stack.env["GATEWAY_KEY_PEPPER"]))
        except Exception as exc:  # noqa: BLE001 - any start failure is reported as one line
            stack.stop()
            console.print(f"[bold red]error:[/] {exc}")
            return 1
    state = {
        **stack.urls,
        "demo_key": demo_key,
        "env": stack.env,
        "pids": {
            **stack.pids(),
            **({"valkey": stack.valkey.proc.pid} if stack.valkey and stack.valkey.proc else {}),
            **(
                {f"valkey-node-{i}": pid for i, pid in enumerate(stack.cluster.pids, 1)}
                if stack.cluster
                else {}
            ),
        },
        "pgdata": str(STACK_DIR / "pgdata") if stack.postgres else None,
        "logs": str(STACK_DIR),
    }
    STACK_FILE.parent.mkdir(parents=True, exist_ok=True)
    STACK_FILE.touch(mode=0o600)
    STACK_FILE.write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2))
    console.print(_panel(state))
    console.print(_curl(state), soft_wrap=True)
    if detach:
        console.print("running in the background: [bold]scripts/dev status[/], [bold]scripts/dev down[/]")
        return 0
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    console.print("Ctrl-C stops everything.")
    while not stopping:
        time.sleep(0.2)
    with console.status("stopping…"):
        stack.stop()
        STACK_FILE.unlink(missing_ok=True)
    console.print("stopped.")
    return 0


def down() -> int:
    """Stop a detached stack and everything it started."""
    state = _read_state()
    if state is None:
        console.print("nothing to stop: no .dev/stack.json")
        return 0
    pids: dict[str, int] = state.get("pids", {})
    order = ("caddy", "stream_proxy", "authz_sidecar", "simulator", "valkey")
    for name in sorted(
        pids, key=lambda n: next((i for i, o in enumerate(order) if n.startswith(o)), len(order))
    ):
        pid = pids[name]
        if pid and _alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
        time.sleep(0.05)
    for pid in pids.values():
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    if state.get("pgdata"):
        localstack.Postgres(Path(state["pgdata"]).parent, started=True).stop()
    STACK_FILE.unlink(missing_ok=True)
    console.print("stopped.")
    return 0


def status() -> int:
    """Show each component and whether it answers."""
    state = _read_state()
    if state is None:
        console.print("not running (no .dev/stack.json)")
        return 1
    table = Table(title="local stack")
    table.add_column("component")
    table.add_column("address")
    table.add_column("state")
    rows = [("gateway (caddy)", "gateway_url"), ("authz_sidecar", "sidecar_url"),
            ("stream_proxy", "proxy_url"), ("ollama", "ollama_url"), ("redis", "redis_url"),
            ("postgres", "database_url")]  # fmt: skip
    healthy = True
    for name, field in rows:
        url = state[field]
        shown = url.split("@")[-1] if field == "database_url" else url
        target = url
        if field == "database_url":
            target = "//" + url.split("@")[-1].split("/")[0]
        elif "+cluster://" in url:  # every node must answer
            target = ""
            up_now = all(_port_open("//" + node) for node in url.split("://", 1)[1].split(","))
        if target:
            up_now = _port_open(target)
        healthy &= up_now
        table.add_row(name, shown, "[green]up[/]" if up_now else "[red]down[/]")
    console.print(table)
    console.print(_panel(state))
    return 0 if healthy else 1


def main(argv: Sequence[str]) -> int:
    """Entry point of scripts/dev."""
    parser = argparse.ArgumentParser(prog="scripts/dev", description="Run the gateway locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    up_cmd = sub.add_parser("up", help="start the stack")
    up_cmd.add_argument("--detach", action="store_true", help="return once everything answers")
    up_cmd.add_argument("--sidecars", type=int, default=1, metavar="N", help="authz_sidecar replicas")
    up_cmd.add_argument("--proxies", type=int, default=1, metavar="M", help="stream_proxy replicas")
    up_cmd.add_argument(
        "--ollamas",
        type=int,
        default=1,
        metavar="K",
        help="simulated Ollama backends, each with its own models",
    )
    up_cmd.add_argument(
        "--redis-cluster", action="store_true", help="a 3-primary Valkey cluster instead of one Valkey"
    )
    sub.add_parser("down", help="stop a detached stack")
    sub.add_parser("status", help="show the stack")
    args = parser.parse_args(argv)
    if args.command == "up":
        if args.sidecars < 1 or args.proxies < 1 or args.ollamas < 1:
            parser.error("--sidecars, --proxies and --ollamas take a number of at least 1")
        return up(
            args.detach,
            sidecars=args.sidecars,
            proxies=args.proxies,
            redis_cluster=args.redis_cluster,
            ollamas=args.ollamas,
        )
    if args.command == "down":
        return down()
    return status()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
