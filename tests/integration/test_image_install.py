"""The image's install step replayed without Docker.

compose/Dockerfile builds every wheel in a stage with a compiler and installs them in a final stage
that has none, with `pip install --no-index`. This test does the same on this machine: it wheels
the build context the Dockerfile copies (the project plus every runtime dependency), installs
`neuronetz-gateway` from those wheels alone into a fresh venv with no compiler on PATH, and starts
both services from that venv against the test's real Postgres and Valkey.

The dependency wheels are cached under `.dev/wheelhouse-<hash of pyproject.toml + setup.cfg>`, so only
a change of dependencies rebuilds them; the project's own wheel is rebuilt on every run, so the
installed code is always the code under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import aiohttp
import attrs
import pytest

import localstack

pytestmark = pytest.mark.integration

ROOT = localstack.ROOT
DOCKERFILE = ROOT / "compose" / "Dockerfile"
PROJECT = "neuronetz-gateway"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
COMPILERS = ("gcc", "cc", "c++", "g++", "clang", "ld", "make")
PIP_TIMEOUT = 600


def _build_context(target: Path) -> Path:
    """Copy exactly what the Dockerfile's build stage COPYs (before `pip wheel`) into `target`."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    build_stage = re.split(r"^FROM ", text, flags=re.M)[1]
    copies = [line.split()[1:] for line in build_stage.splitlines() if line.startswith("COPY ")]
    assert copies, "the Dockerfile's build stage copies nothing"
    target.mkdir(parents=True)
    for *sources, destination in copies:
        assert not any(s.startswith("--") for s in sources), sources
        for source in sources:
            origin = ROOT / source
            landing = (
                target / destination / Path(source).name
                if destination.endswith("/")
                else target / destination
            )
            if origin.is_dir():
                shutil.copytree(origin, landing, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                landing.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, landing)
    return target


def _pip_wheel(context: Path, wheel_dir: Path, *extra: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--wheel-dir",
            str(wheel_dir),
            *extra,
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT,
        check=False,
        cwd=str(context),
    )
    assert done.returncode == 0, f"pip wheel failed (network?):\n{done.stdout}\n{done.stderr}"


def _project_wheels(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{PROJECT.replace('-', '_')}-*.whl"))


@pytest.fixture(scope="module")
def dependency_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels of every runtime dependency (the project's own wheel removed), cached per
    pyproject.toml + setup.cfg; built like the image's first stage on a cache miss."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + (ROOT / "setup.cfg").read_bytes())
    cache = ROOT / ".dev" / f"wheelhouse-{digest.hexdigest()[:16]}"
    if (cache / ".complete").is_file():
        return cache
    partial = cache.with_name(f"{cache.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    _pip_wheel(_build_context(tmp_path_factory.mktemp("deps") / "src"), partial)
    for wheel in _project_wheels(partial):
        wheel.unlink()
    (partial / ".complete").write_text("")
    try:
        partial.rename(cache)
    except OSError:  # another session finished first: use its wheelhouse
        shutil.rmtree(partial, ignore_errors=True)
    return cache


@pytest.fixture(scope="module")
def project_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's own wheel, built from the Dockerfile's build context on every run."""
    base = tmp_path_factory.mktemp("project")
    wheel_dir = base / "wheels"
    _pip_wheel(_build_context(base / "src"), wheel_dir, "--no-deps")
    (wheel,) = _project_wheels(wheel_dir)
    assert wheel.name.startswith(f"{PROJECT.replace('-', '_')}-{VERSION}-")
    return wheel_dir


@attrs.frozen
class Installed:
    """A venv holding only what `pip install --no-index` put there, and the clean environment."""

    venv: Path
    env: dict[str, str]
    workdir: Path

    @property
    def python(self) -> str:
        """The venv's interpreter."""
        return str(self.venv / "bin" / "python")


def _compiler_free_path(bin_dir: Path, venv: Path) -> str:
    bin_dir.mkdir()
    interpreter = Path(sys.executable).resolve()
    for name in ("python", "python3"):
        (bin_dir / name).symlink_to(interpreter)
    return os.pathsep.join([str(venv / "bin"), str(bin_dir)])


def _run(argv: list[str], env: Mapping[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=dict(env), cwd=str(cwd), capture_output=True, text=True, timeout=PIP_TIMEOUT, check=False
    )


@pytest.fixture(scope="module")
def installed(
    tmp_path_factory: pytest.TempPathFactory, dependency_wheels: Path, project_wheel: Path
) -> Installed:
    """A fresh venv with neuronetz-gateway installed from the wheels alone, no compiler on PATH."""
    base = tmp_path_factory.mktemp("image")
    venv = base / "venv"
    path = _compiler_free_path(base / "bin", venv)
    (base / "home").mkdir()
    (base / "work").mkdir()
    env = {
        "PATH": path,
        "HOME": str(base / "home"),
        "LANG": "C.UTF-8",
        "PIP_CONFIG_FILE": os.devnull,  # no index, find-links or constraints from this machine's config
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_CACHE_DIR": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    assert [c for c in COMPILERS if shutil.which(c, path=path)] == []
    created = _run(["python", "-m", "venv", str(venv)], env, base / "work")
    assert created.returncode == 0, created.stderr
    done = _run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--no-index",
            "--find-links",
            str(dependency_wheels),
            "--find-links",
            str(project_wheel),
            f"{PROJECT}=={VERSION}",
        ],
        env,
        base / "work",
    )
    assert done.returncode == 0, f"install from wheels only failed:\n{done.stdout}\n{done.stderr}"
    return Installed(venv=venv, env=env, workdir=base / "work")


# ---------------------------------------------------------------------------------------------
# The services, started from the installed venv


@attrs.frozen
class Running:
    """A service process started from the venv."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """What it logged so far (for failure messages)."""
        return self.log.read_text(errors="replace")[-3000:]


@contextlib.contextmanager
def _started(name: str, argv: list[str], port: int, env: Mapping[str, str], cwd: Path) -> Iterator[Running]:
    log = cwd / f"{name}.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, env=dict(env), cwd=str(cwd), stdout=sink, stderr=subprocess.STDOUT)
    service = Running(name, proc, port, log)
    try:
        try:
            localstack.wait_for_port(port, timeout=30, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{name} did not start: {exc}\n{service.output()}") from None
        yield service
    finally:
        localstack.terminate(proc)


@pytest.fixture
async def services(
    installed: Installed, database_url: str, redis_url: str, redis_prefix: str
) -> AsyncIterator[tuple[Running, Running, dict[str, str]]]:
    """authz_sidecar and stream_proxy from the venv (cwd outside the checkout, so nothing is imported
    from the source tree), on the test's migrated database and Valkey, with the Ollama simulator."""
    sidecar_port, proxy_port, ollama_port = (localstack.free_port() for _ in range(3))
    env = {
        **installed.env,
        "GATEWAY_DATABASE_URL": database_url,
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_REDIS_PREFIX": redis_prefix,
        "GATEWAY_GRANT_SECRET": secrets.token_urlsafe(32),
        "GATEWAY_KEY_PEPPER": secrets.token_urlsafe(32),
        "GATEWAY_SIDECAR_PORT": str(sidecar_port),
        "GATEWAY_PROXY_PORT": str(proxy_port),
        "GATEWAY_OLLAMA_URL": f"http://127.0.0.1:{ollama_port}",
        "GATEWAY_SIDECAR_DRAIN_SECONDS": "0",
        "GATEWAY_PROXY_DRAIN_SECONDS": "0",
    }
    simulator = [sys.executable, "-m", "ollama_simulator", "--host", "127.0.0.1", "--port", str(ollama_port)]
    python = installed.python
    cwd = installed.workdir
    with contextlib.ExitStack() as stack:
        await asyncio.to_thread(
            stack.enter_context,
            _started(
                "simulator", simulator, ollama_port, {**os.environ, "PYTHONPATH": str(ROOT / "scripts")}, cwd
            ),
        )
        sidecar = await asyncio.to_thread(
            stack.enter_context,
            _started("authz_sidecar", [python, "-m", "authz_sidecar"], sidecar_port, env, cwd),
        )
        proxy = await asyncio.to_thread(
            stack.enter_context,
            _started("stream_proxy", [python, "-m", "stream_proxy"], proxy_port, env, cwd),
        )
        try:
            yield sidecar, proxy, env
        finally:
            await asyncio.to_thread(stack.close)


async def test_the_wheels_install_without_a_compiler_or_an_index(installed: Installed) -> None:
    """neuronetz-gateway installs from the wheelhouse alone (--no-index) with no compiler on PATH, and
    the venv imports the services from its own site-packages, Lua scripts included."""
    assert shutil.which("gcc", path=installed.env["PATH"]) is None
    probe = (
        "import importlib.resources, authz_sidecar, stream_proxy, shared;"
        "print(authz_sidecar.__file__); print(stream_proxy.__file__);"
        "print(sorted(p.name for p in importlib.resources.files('shared').joinpath('lua').iterdir()))"
    )
    done = await asyncio.to_thread(_run, [installed.python, "-c", probe], installed.env, installed.workdir)
    assert done.returncode == 0, done.stderr
    sidecar_file, proxy_file, lua = done.stdout.splitlines()
    site = str(installed.venv / "lib")
    assert sidecar_file.startswith(site), sidecar_file
    assert proxy_file.startswith(site), proxy_file
    assert lua == str(sorted(p.name for p in (ROOT / "shared" / "lua").glob("*.lua")))


async def test_admin_cli_runs_from_the_venv(installed: Installed) -> None:
    """The `neuronetz-gateway` console script is installed and `--help` lists its commands."""
    cli = str(installed.venv / "bin" / "neuronetz-gateway")
    done = await asyncio.to_thread(_run, [cli, "--help"], installed.env, installed.workdir)
    assert done.returncode == 0, done.stderr
    for command in ("migrate", "create-tenant", "create-key", "revoke-key", "set-limits"):
        assert command in done.stdout, command


async def test_both_services_start_from_the_venv_and_answer_healthz(
    services: tuple[Running, Running, dict[str, str]], installed: Installed
) -> None:
    """`python -m authz_sidecar` and `python -m stream_proxy` from the venv answer /healthz 200, and
    the Compose healthchecks (`python -m authz_sidecar.probe` / `stream_proxy.probe`) pass."""
    sidecar, proxy, env = services
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for service in (sidecar, proxy):
            async with http.get(f"{service.url}/healthz") as resp:
                assert resp.status == 200, (service.name, await resp.text(), service.output())
    for module in ("authz_sidecar.probe", "stream_proxy.probe"):
        done = await asyncio.to_thread(_run, [installed.python, "-m", module], env, installed.workdir)
        assert done.returncode == 0, (module, done.stdout, done.stderr, sidecar.output(), proxy.output())
