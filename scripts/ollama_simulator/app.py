"""The application: gin's routing table, the Host and CORS guards, the /_sim/ control API."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import attrs
import cattrs
from aiohttp import web

from ollama_simulator.anthropic import handle_anthropic
from ollama_simulator.catalog import handle_ps, handle_show, handle_tags
from ollama_simulator.clock import Clock, SystemClock
from ollama_simulator.exceptions import ApiError, ClientGone
from ollama_simulator.gojson import BindError
from ollama_simulator.management import (
    handle_blob_create,
    handle_blob_head,
    handle_copy,
    handle_create,
    handle_delete,
    handle_pull,
    handle_push,
    handle_recommendations,
    handle_root,
    handle_signout,
    handle_status,
    handle_transcriptions,
    handle_unauthorized,
    handle_version,
)
from ollama_simulator.native import (
    handle_chat,
    handle_embed,
    handle_embeddings,
    handle_generate,
)
from ollama_simulator.openai import (
    handle_openai_chat,
    handle_openai_completions,
    handle_openai_embeddings,
    handle_openai_model,
    handle_openai_models,
)
from ollama_simulator.recorder import Recorder, RequestRecord
from ollama_simulator.responses import handle_responses
from ollama_simulator.settings import SimulatorSettings, settings_to_json, settings_with
from ollama_simulator.state import (
    RECORD_KEY,
    RECORDER_KEY,
    STATE_KEY,
    Call,
    SimulatorState,
)
from ollama_simulator.wire import Dialect, empty, plain, render_error

CONTROL_PREFIX: Final = "/_sim/"


MAX_BODY_BYTES: Final = 1 << 30


Handler = Callable[[Call], Awaitable[web.StreamResponse]]


@attrs.frozen
class Route:
    method: str
    segments: tuple[str, ...]
    handler: Handler
    dialect: Dialect

    def match(self, parts: Sequence[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for pattern, part in zip(self.segments, parts, strict=True):
            if pattern.startswith(":"):
                if not part:
                    return None
                params[pattern[1:]] = part
            elif pattern != part:
                return None
        return params


def _route(method: str, path: str, handler: Handler, dialect: Dialect = "native") -> Route:
    return Route(method, tuple(path.split("/")[1:]), handler, dialect)


ROUTES: Final = (
    _route("HEAD", "/", handle_root),
    _route("GET", "/", handle_root),
    _route("HEAD", "/api/version", handle_version),
    _route("GET", "/api/version", handle_version),
    _route("GET", "/api/status", handle_status),
    _route("POST", "/api/pull", handle_pull),
    _route("POST", "/api/push", handle_push),
    _route("HEAD", "/api/tags", handle_tags),
    _route("GET", "/api/tags", handle_tags),
    _route("POST", "/api/show", handle_show),
    _route("DELETE", "/api/delete", handle_delete),
    _route("POST", "/api/me", handle_unauthorized),
    _route("POST", "/api/signout", handle_signout),
    _route("DELETE", "/api/user/keys/:encodedKey", handle_signout),
    _route("POST", "/api/create", handle_create),
    _route("POST", "/api/blobs/:digest", handle_blob_create),
    _route("HEAD", "/api/blobs/:digest", handle_blob_head),
    _route("POST", "/api/copy", handle_copy),
    _route("POST", "/api/experimental/web_search", handle_unauthorized),
    _route("POST", "/api/experimental/web_fetch", handle_unauthorized),
    _route("GET", "/api/experimental/model-recommendations", handle_recommendations),
    _route("GET", "/api/ps", handle_ps),
    _route("POST", "/api/generate", handle_generate),
    _route("POST", "/api/chat", handle_chat),
    _route("POST", "/api/embed", handle_embed),
    _route("POST", "/api/embeddings", handle_embeddings),
    _route("POST", "/v1/chat/completions", handle_openai_chat, "openai"),
    _route("POST", "/v1/completions", handle_openai_completions, "openai"),
    _route("POST", "/v1/embeddings", handle_openai_embeddings, "openai"),
    _route("GET", "/v1/models", handle_openai_models, "openai"),
    _route("GET", "/v1/models/:model", handle_openai_model, "openai"),
    _route("POST", "/v1/responses", handle_responses, "openai"),
    _route("POST", "/v1/audio/transcriptions", handle_transcriptions, "openai"),
    _route("POST", "/v1/messages", handle_anthropic, "anthropic"),
)


def _find(method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    parts = path.split("/")[1:]
    for route in ROUTES:
        if route.method == method:
            params = route.match(parts)
            if params is not None:
                return route, params
    return None


def _redirect(request: web.Request, target: str) -> web.Response:
    """gin's redirectTrailingSlash: 301 for GET, 307 otherwise, via net/http's Redirect."""
    query = request.rel_url.raw_query_string
    location = target + (f"?{query}" if query else "")
    status = 301 if request.method == "GET" else 307
    response = web.Response(status=status, headers={"Location": location})
    if request.method in ("GET", "HEAD"):
        response.headers["Content-Type"] = "text/html; charset=utf-8"
    if request.method == "GET":
        text = "Moved Permanently" if status == 301 else "Temporary Redirect"
        response.body = f'<a href="{location}">{text}</a>.\n\n'.encode()
    return response


@functools.cache
def _hostname() -> str:
    return socket.gethostname().lower()


def _host_allowed_by_name(host: str) -> bool:
    host = host.lower()
    if host in ("", "localhost", _hostname()):
        return True
    return host.endswith((".localhost", ".local", ".internal"))


def _split_host(header: str) -> str:
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    if header.count(":") == 1:
        return header.split(":", 1)[0]
    return header


def _host_guard(request: web.Request) -> web.Response | None:
    """allowedHostsMiddleware (loopback listener): 403 for foreign Host headers."""
    host = _split_host(request.headers.get("Host", ""))
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(host)
        if address.is_loopback or address.is_private or address.is_unspecified:
            return None
    if _host_allowed_by_name(host):
        return empty(204) if request.method == "OPTIONS" else None
    return empty(403)


# An allowlist of Origin hosts, not an address to bind.
_LOCAL_ORIGIN_HOSTS: Final = ("localhost", "127.0.0.1", "0.0.0.0")  # noqa: S104  # nosec


_ORIGIN_SCHEMES: Final = (
    "app://",
    "file://",
    "tauri://",
    "vscode-webview://",
    "vscode-file://",
    "chrome-extension://",
    "safari-extension://",
    "moz-extension://",
    "ms-browser-extension://",
)


_CORS_ALLOW_HEADERS: Final = (
    "Authorization,Content-Type,User-Agent,Accept,X-Requested-With,X-Stainless-Lang,"
    "X-Stainless-Package-Version,X-Stainless-Os,X-Stainless-Arch,X-Stainless-Retry-Count,"
    "X-Stainless-Runtime,X-Stainless-Runtime-Version,X-Stainless-Async,X-Stainless-Helper-Method,"
    "X-Stainless-Poll-Helper,X-Stainless-Custom-Poll-Interval,X-Stainless-Timeout"
)


def _origin_allowed(origin: str) -> bool:
    if origin.startswith(_ORIGIN_SCHEMES):
        return True
    for scheme in ("http://", "https://"):
        for host in _LOCAL_ORIGIN_HOSTS:
            base = scheme + host
            if origin == base or origin.startswith(base + ":"):
                return True
    return False


def _cors_guard(request: web.Request) -> tuple[web.Response | None, dict[str, str]]:
    """gin-contrib/cors: foreign Origins get 403, preflights 204; allowed ones get ACAO."""
    origin = request.headers.get("Origin", "")
    host = request.headers.get("Host", "")
    if not origin or origin in (f"http://{host}", f"https://{host}"):
        return None, {}
    if not _origin_allowed(origin):
        return empty(403), {}
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if request.method == "OPTIONS":
        preflight = empty(204)
        preflight.headers.update(headers)
        preflight.headers["Access-Control-Allow-Methods"] = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
        preflight.headers["Access-Control-Allow-Headers"] = _CORS_ALLOW_HEADERS
        preflight.headers["Access-Control-Max-Age"] = "43200"
        return preflight, {}
    return None, headers


async def dispatch(request: web.Request) -> web.StreamResponse:
    """gin's engine: CORS, Host check, route lookup, trailing-slash redirect, 405, 404."""
    state = request.app[STATE_KEY]
    settings = state.settings
    cors_headers: dict[str, str] = {}
    if settings.cors_check:
        refusal, cors_headers = _cors_guard(request)
        if refusal is not None:
            return refusal
    if settings.host_check and (refusal := _host_guard(request)) is not None:
        return refusal
    method, path = request.method, request.path
    found = _find(method, path)
    if found is None:
        if method != "CONNECT" and path != "/":
            alternative = path[:-1] if path.endswith("/") else path + "/"
            if _find(method, alternative) is not None:
                return _redirect(request, alternative)
        if any(_find(other, path) for other in {r.method for r in ROUTES} - {method}):
            return plain(405, "405 method not allowed")
        return plain(404, "404 page not found")
    route, params = found
    call = Call(request, state, settings, request[RECORD_KEY], params)
    try:
        response = await route.handler(call)
    except ApiError as error:
        response = render_error(error, route.dialect)
    except BindError as error:  # Go's decoder refused the body (ShouldBindJSON failed)
        response = render_error(ApiError(400, str(error), middleware=True), route.dialect)
    except ClientGone:  # nobody is left to read it; the record says "cancelled"
        return web.Response(status=499)
    response.headers.update(cors_headers)
    return response


async def control_requests(request: web.Request) -> web.StreamResponse:
    """GET /_sim/requests[?path=/api/chat][&wait_finished=N&timeout=S][&ignore_agent=UA]: the
    recorded requests; `ignore_agent` leaves out (and does not wait for) those a client sent with
    that User-Agent (a gateway's own catalogue polls, say)."""
    recorder = request.app[RECORDER_KEY]
    ignored = request.query.get("ignore_agent")

    def counted(record: RequestRecord) -> bool:
        agent = next((v for k, v in record.headers if k.lower() == "user-agent"), None)
        return ignored is None or agent != ignored

    wanted = request.query.get("wait_finished")
    if wanted is not None:
        timeout = float(request.query.get("timeout", "5"))
        try:
            async with asyncio.timeout(timeout):
                await recorder.wait_finished(int(wanted), counted)
        except TimeoutError:
            return web.json_response({"error": "timed out waiting for requests"}, status=504)
    records = [r for r in recorder.records if counted(r)]
    if path := request.query.get("path"):
        records = [r for r in records if r.path == path]
    return web.json_response([r.to_json() for r in records])


async def control_reset(request: web.Request) -> web.StreamResponse:
    """POST /_sim/reset: forget the records and return to the initial settings and models."""
    request.app[RECORDER_KEY].clear()
    request.app[STATE_KEY].reset()
    return web.json_response(settings_to_json(request.app[STATE_KEY].settings))


async def control_get_settings(request: web.Request) -> web.StreamResponse:
    return web.json_response(settings_to_json(request.app[STATE_KEY].settings))


async def control_set_settings(request: web.Request) -> web.StreamResponse:
    """POST /_sim/settings {"field": value, ...}: replace those fields from now on."""
    state = request.app[STATE_KEY]
    try:
        patch = json.loads(await request.read())
        if not isinstance(patch, dict):
            raise TypeError("expected a JSON object")
        state.apply(settings_with(state.settings, patch))
    except (ValueError, TypeError, cattrs.BaseValidationError) as e:
        detail = "; ".join(cattrs.transform_error(e)) if isinstance(e, cattrs.BaseValidationError) else str(e)
        return web.json_response({"error": detail}, status=400)
    return web.json_response(settings_to_json(state.settings))


@web.middleware
async def record_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Record every non-control request before anything can refuse it."""
    if request.path.startswith(CONTROL_PREFIX):
        return await handler(request)
    recorder = request.app[RECORDER_KEY]
    record = recorder.start(
        method=request.method,
        path=request.path,
        query=request.rel_url.raw_query_string,
        headers=list(request.headers.items()),
        body=await request.read(),
        received_at_ns=request.app[STATE_KEY].clock.time_ns(),
    )
    recorder.trim(request.app[STATE_KEY].settings.max_records)
    request[RECORD_KEY] = record
    status: int | None = None
    try:
        response = await handler(request)
        status = response.status
        if isinstance(response, web.Response) and isinstance(response.body, bytes):
            record.response_body += response.body
        return response
    finally:
        await recorder.finish(record, status, finished_at_ns=request.app[STATE_KEY].clock.time_ns())


async def _drop_server_header(_request: web.Request, response: web.StreamResponse) -> None:
    """Ollama (Go net/http) sends no Server header."""
    response.headers.popall("Server", None)


def create_app(
    settings: SimulatorSettings,
    recorder: Recorder | None = None,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> web.Application:
    """The simulator as an aiohttp application; `clock` and `rng` make its output reproducible."""
    app = web.Application(middlewares=[record_middleware], client_max_size=MAX_BODY_BYTES)
    app[RECORDER_KEY] = recorder if recorder is not None else Recorder()
    app[STATE_KEY] = SimulatorState(
        settings,
        clock if clock is not None else SystemClock(),
        # Ollama's ids come from math/rand too: never secrets, and chatcmpl-N repeats.
        rng if rng is not None else random.Random(),  # noqa: S311  # nosec B311
    )
    app.on_response_prepare.append(_drop_server_header)
    app.router.add_get("/_sim/requests", control_requests)
    app.router.add_post("/_sim/reset", control_reset)
    app.router.add_get("/_sim/settings", control_get_settings)
    app.router.add_post("/_sim/settings", control_set_settings)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app
