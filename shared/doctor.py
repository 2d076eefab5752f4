"""`neuronetz-gateway doctor`: one line per part of the deployment, green or red with the fix.

Checks, in order: the configuration every component reads (each service's variables, secret lengths),
Postgres (reachable, migrations at head), Redis (reachable, every script loadable, a cluster's slots
all covered), every Ollama backend (version, models), the sidecar's and stream_proxy's `/readyz`,
and Caddy's admin API when its URL is given. Nothing here changes anything; a check that cannot run
because an earlier part is down says so.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import aiohttp
import asyncpg
import attrs

from shared import store
from shared.config import AccountantConfig, AdminConfig, ProxyConfig, SidecarConfig, load_config
from shared.db import asyncpg_dsn
from shared.exceptions import ConfigError

TIMEOUT = 5.0
MIGRATIONS = Path(__file__).resolve().parent.parent / "sql" / "migrations"
CLUSTER_SLOTS = 16384


@attrs.frozen
class Check:
    """One line of the report: what was checked, whether it is fine, what was found, the fix."""

    part: str
    ok: bool
    detail: str
    fix: str = ""


def configuration(environ: Mapping[str, str]) -> list[Check]:
    """Every component's configuration, as each would load it at start."""
    checks = []
    for name, cls in (
        ("config: authz_sidecar", SidecarConfig),
        ("config: stream_proxy", ProxyConfig),
        ("config: accountant", AccountantConfig),
        ("config: admin", AdminConfig),
    ):
        try:
            load_config(cls, environ)
        except ConfigError as exc:
            checks.append(Check(name, False, "; ".join(exc.problems), "set the variables named (README)"))
        else:
            checks.append(Check(name, True, "every variable valid, secrets long enough"))
    return checks


def _versions(folder: Path) -> list[str]:
    return sorted(p.name.split("_", 1)[0] for p in folder.glob("*.sql"))


async def postgres(url: str, migrations: Path = MIGRATIONS) -> list[Check]:
    """Reachable, and the migrations at head: every file applied, none applied that this code does
    not know. Any failure is a red line naming the error's type only (a URL may hold a password)."""
    fix = "check GATEWAY_DATABASE_URL and that Postgres is running"
    try:
        conn = await asyncpg.connect(asyncpg_dsn(url), timeout=TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - a bad URL, refused, not Postgres: all one red line
        return [Check("postgres", False, f"cannot connect ({type(exc).__name__})", fix)]
    try:
        version = await conn.fetchval("SHOW server_version")
        try:
            applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        except asyncpg.UndefinedTableError:
            applied = set()
    except Exception as exc:  # noqa: BLE001 - e.g. no right to read schema_migrations
        return [Check("postgres", False, f"connected, but a query failed ({type(exc).__name__})", fix)]
    finally:
        with contextlib.suppress(Exception):
            await conn.close()
    files = _versions(migrations)
    checks = [Check("postgres", True, f"reachable (PostgreSQL {version})")]
    missing = [v for v in files if v not in applied]
    unknown = sorted(applied - set(files))
    if missing:
        checks.append(
            Check(
                "postgres: migrations",
                False,
                f"{len(files) - len(missing)} of {len(files)} applied; missing {', '.join(missing)}",
                "run `neuronetz-gateway migrate`",
            )
        )
    elif unknown:
        checks.append(
            Check(
                "postgres: migrations",
                False,
                f"the database has migrations this version does not know: {', '.join(unknown)}",
                "run the gateway version that wrote them (or newer)",
            )
        )
    else:
        checks.append(Check("postgres: migrations", True, f"at head ({len(files)} applied)"))
    return checks


def _scripts() -> list[tuple[str, str]]:
    folder = resources.files("shared").joinpath("lua")
    common = folder.joinpath("common.lua").read_text(encoding="utf-8")
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".lua") and entry.name != "common.lua":
            text = entry.read_text(encoding="utf-8")
            found.append((entry.name, text if entry.name == "key_guesses.lua" else common + text))
    return found


async def redis(url: str, *, connect_timeout: float, reply_timeout: float) -> list[Check]:
    """Reachable, every Lua script accepted (SCRIPT LOAD), and on a cluster every slot served."""
    try:
        async with store.connect(url, connect_timeout=connect_timeout, reply_timeout=reply_timeout) as client:
            await client.ping()
            checks = [Check("redis", True, "reachable")]
            failed = []
            for name, text in _scripts():
                try:
                    await client.script_load(text)
                except Exception as exc:  # noqa: BLE001 - reported, by script, as the check's result
                    failed.append(f"{name} ({type(exc).__name__})")
            if failed:
                checks.append(
                    Check(
                        "redis: scripts",
                        False,
                        "not loadable: " + ", ".join(failed),
                        "use Redis or Valkey 7 or later with Lua scripting allowed",
                    )
                )
            else:
                checks.append(Check("redis: scripts", True, f"all {len(_scripts())} load"))
            if store.is_cluster(url):
                info = await client.cluster_info()
                assigned = int(info.get("cluster_slots_assigned", 0))
                state = info.get("cluster_state")
                good = state == "ok" and assigned == CLUSTER_SLOTS
                checks.append(
                    Check(
                        "redis: cluster",
                        good,
                        f"state {state}, {assigned:,} of {CLUSTER_SLOTS:,} slots assigned",
                        "" if good else "assign every slot to a primary (valkey-cli --cluster fix)",
                    )
                )
            return checks
    except Exception as exc:  # noqa: BLE001 - any failure to reach it is the check's red line
        return [
            Check(
                "redis",
                False,
                f"cannot connect ({type(exc).__name__})",
                "check GATEWAY_REDIS_URL and that Valkey / Redis is running",
            )
        ]


async def _get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, object]:
    async with session.get(url) as resp:
        body = await resp.read()
        try:
            return resp.status, await resp.json(content_type=None) if body else None
        except ValueError:
            return resp.status, None


async def ollama(session: aiohttp.ClientSession, backends: Sequence[tuple[str, str]]) -> list[Check]:
    """Each backend's `/api/version` and `/api/tags`."""
    checks = []
    for name, url in backends:
        part = f"ollama: {name}"
        base = url.rstrip("/")
        try:
            status, version = await _get_json(session, f"{base}/api/version")
            _, tags = await _get_json(session, f"{base}/api/tags")
        except Exception as exc:  # noqa: BLE001 - whatever fails is this backend's red line
            fix = "check GATEWAY_OLLAMA_URL(S) and that Ollama is running"
            checks.append(Check(part, False, f"cannot connect ({type(exc).__name__})", fix))
            continue
        if status != 200 or not isinstance(version, dict):
            checks.append(Check(part, False, f"/api/version answered {status}", "is this URL an Ollama?"))
            continue
        models = tags.get("models") if isinstance(tags, dict) else None
        count = len(models) if isinstance(models, list) else 0
        good = count > 0
        detail = f"Ollama {version.get('version', '?')}, {count} model{'s' if count != 1 else ''}"
        checks.append(Check(part, good, detail, "" if good else "pull a model on this Ollama (ollama pull)"))
    return checks


async def ready(session: aiohttp.ClientSession, part: str, url: str) -> Check:
    """A service's `/readyz` (200: serving)."""
    try:
        async with session.get(url.rstrip("/") + "/readyz") as resp:
            status = resp.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return Check(
            part, False, f"not answering at {url} ({type(exc).__name__})", "start it, or give its URL"
        )
    if status == 200:
        return Check(part, True, f"ready at {url}")
    return Check(
        part, False, f"/readyz answered {status} at {url}", "see its log: it names what it waits for"
    )


async def caddy(session: aiohttp.ClientSession, url: str) -> Check:
    """Caddy's admin API answers with a loaded configuration."""
    try:
        async with session.get(url.rstrip("/") + "/config/") as resp:
            status = resp.status
            config = await resp.json(content_type=None) if status == 200 else None
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        return Check(
            "caddy", False, f"admin API not answering ({type(exc).__name__})", "check the admin address"
        )
    if status != 200 or not isinstance(config, dict) or not config.get("apps"):
        return Check("caddy", False, f"admin API answered {status} without apps", "is the Caddyfile loaded?")
    return Check("caddy", True, f"admin API answers, apps: {', '.join(sorted(config['apps']))}")


async def run(
    environ: Mapping[str, str],
    *,
    sidecar_url: str | None = None,
    proxy_url: str | None = None,
    caddy_admin_url: str | None = None,
) -> list[Check]:
    """Every check, in order."""
    checks = configuration(environ)
    with contextlib.suppress(ConfigError):
        admin = load_config(AdminConfig, environ)
        checks += await postgres(admin.postgres.url)
        checks += await redis(
            admin.redis.url, connect_timeout=admin.redis.connect_timeout, reply_timeout=admin.redis.timeout
        )
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with contextlib.suppress(ConfigError):
            proxy = load_config(ProxyConfig, environ)
            checks += await ollama(session, [(b.name, str(b.url)) for b in proxy.options.backends()])
        sidecar_port = environ.get("GATEWAY_SIDECAR_PORT", "8081")
        proxy_port = environ.get("GATEWAY_PROXY_PORT", "8082")
        checks += await asyncio.gather(
            ready(session, "authz_sidecar", sidecar_url or f"http://127.0.0.1:{sidecar_port}"),
            ready(session, "stream_proxy", proxy_url or f"http://127.0.0.1:{proxy_port}"),
        )
        if caddy_admin_url:
            checks.append(await caddy(session, caddy_admin_url))
    return checks
