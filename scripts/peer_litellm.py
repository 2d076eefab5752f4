"""LiteLLM's proxy as an optional peer arm of the benchmark, in front of the same Ollama simulator.

LiteLLM is never a project dependency: `ensure_installed` puts it into its own virtualenv under
the dev directory (`.dev/peer-litellm/`, about 0.8 GB) once, and `running` starts its proxy for
the duration of a `with` block.

What gets installed. `litellm[proxy]==1.110.2` itself cannot be installed from the index this
project uses: its `proxy` extra pins three companion packages released with it (`litellm-proxy`,
`litellm-proxy-extras==0.4.114.post1`, `litellm-enterprise==0.1.83.post1`) that the index does
not serve. So we install `litellm==1.110.2` plus every other requirement of that extra, verbatim
(`PROXY_EXTRA`), with `litellm-proxy` left out (nothing in the wheel imports it; the proxy's code
ships in `litellm` itself) and the other two at the newest versions served. Those two are only
used by the database (Prisma migrations) and enterprise paths, which this arm never enters.

How the proxy is made lean, so that what we measure is its request path and nothing optional:

- one model, `ollama_chat/<model>` with `api_base` = the simulator, published under the plain
  name (`llama3.2`): `ollama_chat/` is LiteLLM's provider for Ollama's native `/api/chat`, the
  route our gateway relays too (`ollama/` would use `/api/generate`);
- a generated master key as the only credential: no `DATABASE_URL` (no Prisma, no spend logs,
  no key table, no budget resets), no Redis (in-memory caches and limiters only); `DATABASE_*`,
  `REDIS_*` and inherited `LITELLM_*` variables are removed from its environment;
- `general_settings`: `disable_spend_logs` and `disable_error_logs` (nothing to write anyway
  without a database, but it skips building the payloads), `background_health_checks: false`
  (no periodic calls to the simulator that would show up in its request log and load);
- `litellm_settings`: no `callbacks` / `success_callback` / `failure_callback` (no logging
  integrations), `turn_off_message_logging` (no message copies kept for loggers), `num_retries: 0`
  and `request_timeout: 600` (a request is one upstream call, as in our gateway);
- `LITELLM_LOG=ERROR` and `--num_workers 1` on uvicorn (a single process and event loop, like
  one stream_proxy process), stdout and stderr into `<workdir>/litellm.log`;
- `LITELLM_TELEMETRY_DISABLED=true` (usage telemetry vetoed; it is off without a database anyway),
  `LITELLM_LOCAL_MODEL_COST_MAP=True` and `LITELLM_OFFLINE_MODE=true` (no fetch of the model cost
  map or tokenizers from the internet at startup: the bundled copies are used), and
  `LITELLM_MODE=PRODUCTION` (no `.env` loaded from the working directory);
- `LITELLM_DONT_SHOW_FEEDBACK_BOX=true` only shortens the startup banner;
- `zero_cost=True` (the default) adds `input_cost_per_token: 0` and `output_cost_per_token: 0`
  to the model's `litellm_params`, as an operator would for a local model. Without a price,
  LiteLLM's cost tracking looks the unknown `ollama_chat/llama3.2` up in its ~4,900-entry cost
  map several times per request (`OllamaModelInfo._is_static_ollama_model` lower-cases every key
  each time): on a 2-CPU machine that is ~30 ms of CPU per request instead of ~18, p50 27 ms
  instead of 15. `zero_cost=False` measures LiteLLM exactly as shipped.

Ready means `GET /v1/models` with the master key answers 200 and lists the model; startup takes
6-7 s on an idle 2-CPU machine (importing LiteLLM dominates). Measure only after a few warm-up
requests: the first one takes ~0.6 s (lazy imports). Only the master key is accepted: any other
bearer token gets 400 "No connected db.", not 401. The proxy runs in its own session and the
whole process group gets SIGTERM, then SIGKILL, on exit.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import rich.console

import localstack

LITELLM_VERSION = "1.110.2"
LITELLM_SPEC = f"litellm=={LITELLM_VERSION}"
# The `proxy` extra of litellm 1.110.2 (its METADATA, markers kept), minus `litellm-proxy`, with
# the two companion pins lowered to the newest versions the index serves (see the docstring).
PROXY_EXTRA: tuple[str, ...] = (
    "gunicorn>=23.0.0,<24.0",
    "uvicorn>=0.33.0,<1.0",
    "granian>=2.7.4,<3.0 ; python_full_version < '3.15'",
    "granian>=2.8.0,<3.0 ; python_full_version >= '3.15'",
    "uvloop>=0.22.1,<1.0 ; sys_platform != 'win32'",
    "fastapi>=0.136.3,<1.0",
    "starlette>=1.0.1,<2.0",
    "backoff>=2.2.1,<3.0",
    "pyyaml>=6.0.3,<7.0",
    "rq>=2.7.0,<3.0",
    "orjson>=3.11.6,<4.0 ; python_full_version < '3.15'",
    "orjson>=3.12.0,<4.0 ; python_full_version >= '3.15'",
    "hiredis>=3.0.0,<4.0 ; python_full_version < '3.15'",
    "hiredis>=3.5.0,<4.0 ; python_full_version >= '3.15'",
    "apscheduler>=3.11.2,<4.0",
    "fastapi-sso>=0.19.0,<1.0",
    "pyjwt>=2.13.0,<3.0",
    "python-multipart>=0.0.27,<1.0",
    "cryptography>=49.0.0,<51.0",
    "pynacl>=1.6.2,<2.0",
    "websockets>=15.0.1,<16.0",
    "boto3>=1.43.117,<2.0",
    "azure-identity>=1.25.2,<2.0",
    "azure-storage-blob>=12.28.0,<13.0",
    "mcp>=2.3.0,<3",
    "httpx2>=2.10.0,<3",
    "pydantic>=2.12.0,<3",
    "litellm-proxy-extras==0.4.110",  # the extra pins 0.4.114.post1
    "litellm-enterprise==0.1.83",  # the extra pins 0.1.83.post1
    "restrictedpython>=8.5,<9.0",
    "rich>=13.9.4,<14.0",
    "inquirerpy>=0.3.4,<1.0",
    "tomlkit>=0.13.3,<1.0",
    "polars>=1.38.1,<2.0",
    "soundfile>=0.12.1,<1.0",
    "pyroscope-io>=0.8.16,<1.0 ; sys_platform != 'win32'",
    "expression>=5.6.0,<6.0",
    "backports-zstd>=1.0.0,<2.0 ; python_full_version < '3.14'",
    "semver>=3.0.4,<4",
)
REQUIREMENTS: tuple[str, ...] = (LITELLM_SPEC, *PROXY_EXTRA)

VENV_NAME = "peer-litellm"
STAMP_NAME = "installed-requirements.txt"
STARTUP_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0

# Inherited variables that would switch on a database, Redis or other LiteLLM behaviour.
_SCRUBBED_PREFIXES = ("LITELLM_", "DATABASE_", "DIRECT_URL", "REDIS_", "GATEWAY_")
_LEAN_ENV = {
    "LITELLM_LOG": "ERROR",
    "LITELLM_MODE": "PRODUCTION",
    "LITELLM_TELEMETRY_DISABLED": "true",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_OFFLINE_MODE": "true",
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true",
}


@attrs.frozen
class Peer:
    """A running LiteLLM proxy: call `url` + `/v1/chat/completions` with `model_name` and the key."""

    url: str
    master_key: str
    pid: int
    model_name: str
    log: Path


def _stamp_text() -> str:
    return "\n".join(REQUIREMENTS) + "\n"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def ensure_installed(dev_dir: Path, *, console: rich.console.Console | None = None) -> Path:
    """Create (once) a virtualenv at dev_dir / "peer-litellm" with LiteLLM's proxy installed.

    Returns the path of its `litellm` executable. A stamp file holding the requirement list makes
    a second call instant; a different list (another version) rebuilds the virtualenv.
    """
    venv = dev_dir / VENV_NAME
    exe = venv / "bin" / "litellm"
    stamp = venv / STAMP_NAME
    with contextlib.suppress(OSError):
        if exe.exists() and stamp.read_text() == _stamp_text():
            return exe
    shutil.rmtree(venv, ignore_errors=True)
    dev_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    status = console.status(f"installing {LITELLM_SPEC} (proxy) into {venv}…") if console else None
    with status if status is not None else contextlib.nullcontext():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        log = venv / "install.log"
        with log.open("wb") as out:
            pip = subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                 *REQUIREMENTS],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )  # fmt: skip
        if pip.returncode != 0 or not exe.exists():
            raise RuntimeError(f"installing {LITELLM_SPEC} failed (see {log}):\n{_tail(log)}")
    stamp.write_text(_stamp_text())
    if console is not None:
        console.print(f"installed {LITELLM_SPEC} into {venv} in {time.monotonic() - started:.0f} s")
    return exe


def _config(model: str, ollama_url: str, master_key: str, *, zero_cost: bool) -> dict[str, object]:
    params: dict[str, object] = {"model": f"ollama_chat/{model}", "api_base": ollama_url}
    if zero_cost:
        params |= {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0}
    return {
        "model_list": [{"model_name": model, "litellm_params": params}],
        "litellm_settings": {
            "callbacks": [],
            "success_callback": [],
            "failure_callback": [],
            "turn_off_message_logging": True,
            "num_retries": 0,
            "request_timeout": 600,
        },
        "general_settings": {
            "master_key": master_key,
            "disable_spend_logs": True,
            "disable_error_logs": True,
            "background_health_checks": False,
        },
    }


def _lists_model(port: int, master_key: str, model: str) -> bool:
    """True once GET /v1/models with the key answers 200 and names the model."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {master_key}"})
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    if resp.status != 200:
        return False
    try:
        data = json.loads(body).get("data", [])
    except (ValueError, AttributeError):
        return False
    return isinstance(data, list) and any(isinstance(item, dict) and item.get("id") == model for item in data)


def _stop_group(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the proxy's whole process group, then SIGKILL whatever is left after `timeout`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the leader if it hung, else any straggler
    proc.wait()


@contextlib.contextmanager
def running(
    dev_dir: Path,
    ollama_url: str,
    *,
    port: int,
    workdir: Path,
    model: str = "llama3.2",
    zero_cost: bool = True,
) -> Iterator[Peer]:
    """LiteLLM's proxy on 127.0.0.1:port (0 picks a free port) in front of `ollama_url`.

    Installs it first if needed, writes `<workdir>/litellm-config.yaml` (JSON is valid YAML) and
    logs to `<workdir>/litellm.log`; yields once `/v1/models` answers with the model.
    `zero_cost` declares the model free in its config (see the module docstring).
    """
    exe = ensure_installed(dev_dir)
    port = port or localstack.free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    master_key = f"sk-bench-{secrets.token_urlsafe(24)}"
    config = workdir / "litellm-config.yaml"
    config.write_text(json.dumps(_config(model, ollama_url, master_key, zero_cost=zero_cost), indent=2))
    config.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env.update(_LEAN_ENV)
    argv = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1"]  # fmt: skip
    log = workdir / "litellm.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        try:
            localstack.wait_for_port(port, timeout=STARTUP_TIMEOUT, proc=proc)
            while not _lists_model(port, master_key, model):
                if proc.poll() is not None:
                    raise RuntimeError(f"exited with {proc.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no model list after {STARTUP_TIMEOUT:.0f} s")
                time.sleep(0.1)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"LiteLLM proxy did not start ({exc}); {log}:\n{_tail(log)}") from exc
        yield Peer(
            url=f"http://127.0.0.1:{port}", master_key=master_key, pid=proc.pid, model_name=model, log=log
        )
    finally:
        _stop_group(proc)
