"""Portkey's AI gateway as an optional peer arm of the benchmark, in front of the same simulator.

`@portkey-ai/gateway` is the routing-only gateway many self-hosters pick: no keys of its own, no
limits, no budgets, no ledger; it translates an OpenAI-style request for the provider named in its
headers and relays the answer. It is never a project dependency: `ensure_installed` runs
`npm install` into `.dev/peer-portkey/` (about 60 MB, a few seconds) once, and `running` starts
its Node server (`build/start-server.js --port=N`, one process, one event loop) for the duration of
a `with` block.

How it is pointed at the simulator: every request carries `x-portkey-provider: ollama` and
`x-portkey-custom-host: <simulator URL>`; for `/v1/chat/completions` Portkey's Ollama provider
calls the simulator's `/v1/chat/completions` (Ollama's OpenAI-compatible route) and answers in
OpenAI's format. Nothing else is configured: no config object, no cache, no retries, no logging
integrations (it logs nothing per request by default). Ready means one chat completion through it
answers 200. Its stdout and stderr go to `<workdir>/portkey.log`; the process group gets SIGTERM,
then SIGKILL, on exit.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import attrs
import rich.console

import localstack
from peer_litellm import _stop_group, _tail

PORTKEY_VERSION = "1.15.2"
PORTKEY_SPEC = f"@portkey-ai/gateway@{PORTKEY_VERSION}"
DIR_NAME = "peer-portkey"
STAMP_NAME = "installed.txt"
STARTUP_TIMEOUT = 60.0


@attrs.frozen
class Peer:
    """A running Portkey gateway: call `url` + `/v1/chat/completions` with `headers`."""

    url: str
    headers: Mapping[str, str]
    pid: int
    model_name: str
    log: Path


def _server(prefix: Path) -> Path:
    return prefix / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"


def ensure_installed(dev_dir: Path, *, console: rich.console.Console | None = None) -> Path:
    """`npm install` the pinned gateway (once) under dev_dir / "peer-portkey"; its server script.
    A stamp holding the spec makes a second call instant; another version reinstalls."""
    prefix = dev_dir / DIR_NAME
    server, stamp = _server(prefix), prefix / STAMP_NAME
    with contextlib.suppress(OSError):
        if server.exists() and stamp.read_text() == PORTKEY_SPEC:
            return server
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("the Portkey arm needs npm (Debian: apt-get install npm)")
    shutil.rmtree(prefix, ignore_errors=True)
    prefix.mkdir(parents=True)
    status = console.status(f"installing {PORTKEY_SPEC} into {prefix}…") if console else None
    log = prefix / "install.log"
    with status if status is not None else contextlib.nullcontext(), log.open("wb") as out:
        done = subprocess.run(
            [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", PORTKEY_SPEC],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode != 0 or not server.exists():
        raise RuntimeError(f"installing {PORTKEY_SPEC} failed (see {log}):\n{_tail(log)}")
    stamp.write_text(PORTKEY_SPEC)
    return server


def _answers(port: int, headers: Mapping[str, str], model: str) -> bool:
    """True once one chat completion through the gateway answers 200."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "ready?"}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers=dict(headers))
        resp = conn.getresponse()
        resp.read()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    return resp.status == 200


@contextlib.contextmanager
def running(
    dev_dir: Path, ollama_url: str, *, port: int, workdir: Path, model: str = "llama3.2"
) -> Iterator[Peer]:
    """Portkey's gateway on port (0 picks a free one) in front of `ollama_url`, installed first if
    needed; yields once a chat completion through it answers 200."""
    server = ensure_installed(dev_dir)
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("the Portkey arm needs node (Debian: apt-get install nodejs)")
    port = port or localstack.free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    headers = {
        "Content-Type": "application/json",
        "x-portkey-provider": "ollama",
        "x-portkey-custom-host": ollama_url,
    }
    log = workdir / "portkey.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [node, str(server), f"--port={port}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "NODE_ENV": "production"},
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _answers(port, headers, model):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Portkey's gateway did not start; {log}:\n{_tail(log)}")
            time.sleep(0.2)
        yield Peer(f"http://127.0.0.1:{port}", headers, proc.pid, model, log)
    finally:
        _stop_group(proc)
