"""`neuronetz-gateway doctor` against the running e2e stack (real Postgres, Valkey, Caddy, both
services, the simulator): green on every line, and red with the right line and fix for each broken
part: Postgres down, Redis down, Ollama down, migrations behind, a secret too short."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs
import orjson

from tests.e2e.conftest import Stack

CLI = [str(Path(sys.executable).parent / "neuronetz-gateway")]


@attrs.frozen
class Report:
    """One doctor run."""

    code: int
    table: str
    checks: dict[str, dict[str, Any]]  # by part


def _closed_port() -> int:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        return int(holder.getsockname()[1])  # closed again when the block ends: nobody listens


async def _run(env: Mapping[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "doctor",
        *args,
        env=dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert err == b"", err
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def doctor(stack: Stack, **overrides: str) -> Report:
    """doctor as a table and as JSON, with the stack's environment changed by `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {**stack.env, "GATEWAY_STACK_FILE": str(stack.logs / "no-such-stack.json"), "COLUMNS": "200"}
    env |= overrides
    urls = [f"--sidecar-url={stack.sidecar_url}", f"--proxy-url={stack.proxy_url}"]
    urls.append(f"--caddy-admin-url={stack.caddy_admin_url}")
    code, table = await _run(env, *urls)
    json_code, text = await _run(env, *urls, "--json")
    assert json_code == code
    checks = {c["part"]: c for c in orjson.loads(text)}
    return Report(code, table, checks)


def _line(report: Report, part: str) -> str:
    lines = [line for line in report.table.splitlines() if f" {part} " in f" {line} "]
    assert lines, report.table
    return lines[0]


EVERY_PART = {
    "config: authz_sidecar",
    "config: stream_proxy",
    "config: accountant",
    "config: admin",
    "postgres",
    "postgres: migrations",
    "redis",
    "redis: scripts",
    "ollama: ollama",
    "authz_sidecar",
    "stream_proxy",
    "caddy",
}


async def test_doctor_is_green_on_the_running_stack(stack: Stack) -> None:
    report = await doctor(stack)
    assert report.code == 0, report.table
    assert set(report.checks) == EVERY_PART
    assert all(c["ok"] for c in report.checks.values()), report.checks
    assert "✗" not in report.table
    assert report.table.count("✓") == len(EVERY_PART)
    assert "at head" in _line(report, "postgres: migrations")
    assert "Ollama" in _line(report, "ollama: ollama")


async def test_postgres_down_is_one_red_line_and_the_rest_still_checked(stack: Stack) -> None:
    parts = urlsplit(stack.database_url)
    down = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{_closed_port()}"))
    report = await doctor(stack, GATEWAY_DATABASE_URL=down)
    assert report.code == 1
    assert not report.checks["postgres"]["ok"]
    assert "cannot connect" in report.checks["postgres"]["detail"]
    assert "GATEWAY_DATABASE_URL" in report.checks["postgres"]["fix"]
    assert "✗" in _line(report, "postgres")
    assert report.checks["redis"]["ok"]
    assert report.checks["ollama: ollama"]["ok"]
    assert down not in report.table  # the URL (with its password, when it has one) is never printed


async def test_redis_down_is_one_red_line(stack: Stack) -> None:
    report = await doctor(stack, GATEWAY_REDIS_URL=f"redis://127.0.0.1:{_closed_port()}")
    assert report.code == 1
    assert not report.checks["redis"]["ok"]
    assert "GATEWAY_REDIS_URL" in report.checks["redis"]["fix"]
    assert "redis: scripts" not in report.checks
    assert report.checks["postgres"]["ok"]


async def test_ollama_down_is_one_red_line(stack: Stack) -> None:
    report = await doctor(
        stack, GATEWAY_OLLAMA_URL=f"http://127.0.0.1:{_closed_port()}", GATEWAY_OLLAMA_URLS=""
    )
    assert report.code == 1
    assert not report.checks["ollama: ollama"]["ok"]
    assert "cannot connect" in report.checks["ollama: ollama"]["detail"]
    assert "✗" in _line(report, "ollama: ollama")
    assert report.checks["postgres"]["ok"]


async def test_migrations_behind_say_which_and_how_to_fix(stack: Stack, empty_database_url: str) -> None:
    empty = empty_database_url
    report = await doctor(stack, GATEWAY_DATABASE_URL=empty)
    assert report.code == 1
    assert report.checks["postgres"]["ok"]
    behind = report.checks["postgres: migrations"]
    assert not behind["ok"]
    assert behind["detail"].startswith("0 of ")
    assert "neuronetz-gateway migrate" in behind["fix"]


async def test_a_short_secret_is_a_red_configuration_line(stack: Stack) -> None:
    report = await doctor(stack, GATEWAY_GRANT_SECRET="short")
    assert report.code == 1
    assert not report.checks["config: authz_sidecar"]["ok"]
    assert "GATEWAY_GRANT_SECRET" in report.checks["config: authz_sidecar"]["detail"]
    assert "short" not in report.checks["config: authz_sidecar"]["detail"].replace("too short", "")
    assert report.checks["config: admin"]["ok"]  # the admin CLI reads no grant secret
