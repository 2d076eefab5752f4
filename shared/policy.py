"""Endpoint policy: which (method, path) pairs the gateway serves, shared by both services.

An allowlist, decided on the raw (still percent-encoded) path. Every served route belongs to one
API family (docs/ARCHITECTURE.md#api-families-and-adapters), which fixes its error dialect and the
adapter stream_proxy reads its body and answer with. The mutating and egress routes of
Ollama are refused with 403 whatever the key and however they are spelled: any normalisation of an
ambiguous path (doubled slashes, dot segments, percent-encoding, trailing slash, case) that lands
on a blocked route is a 403. Other ambiguous paths are 400, everything else 404 (or 405 for a
served path with another method). There is deliberately no setting that unblocks anything.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import unquote

import attrs

Route = Literal[
    "chat",
    "generate",
    "embed",
    "embeddings",
    "tags",
    "show",
    "ps",
    "version",
    "openai_chat",
    "openai_completions",
    "openai_embeddings",
    "openai_models",
    "openai_model",
    "openai_responses",
    "anthropic_messages",
]
Family = Literal["native", "openai", "responses", "anthropic"]

ALLOWED: dict[str, dict[str, Route]] = {
    "/api/chat": {"POST": "chat"},
    "/api/generate": {"POST": "generate"},
    "/api/embed": {"POST": "embed"},
    "/api/embeddings": {"POST": "embeddings"},
    "/api/tags": {"GET": "tags", "HEAD": "tags"},
    "/api/show": {"POST": "show"},
    "/api/ps": {"GET": "ps"},
    "/api/version": {"GET": "version", "HEAD": "version"},
    "/v1/chat/completions": {"POST": "openai_chat"},
    "/v1/completions": {"POST": "openai_completions"},
    "/v1/embeddings": {"POST": "openai_embeddings"},
    "/v1/models": {"GET": "openai_models"},
    "/v1/responses": {"POST": "openai_responses"},
    "/v1/messages": {"POST": "anthropic_messages"},
}
MODEL_ROUTE_PREFIX = "/v1/models/"

# The API family of every route: its error dialect and its adapter in stream_proxy.
FAMILY: dict[Route, Family] = {
    "chat": "native",
    "generate": "native",
    "embed": "native",
    "embeddings": "native",
    "tags": "native",
    "show": "native",
    "ps": "native",
    "version": "native",
    "openai_chat": "openai",
    "openai_completions": "openai",
    "openai_embeddings": "openai",
    "openai_models": "openai",
    "openai_model": "openai",
    "openai_responses": "responses",
    "anthropic_messages": "anthropic",
}
# Routes that consume tokens (reserved and metered).
METERED: frozenset[Route] = frozenset(
    {
        "chat",
        "generate",
        "embed",
        "embeddings",
        "openai_chat",
        "openai_completions",
        "openai_embeddings",
        "openai_responses",
        "anthropic_messages",
    }
)
# Routes whose request body names a model that the key's allowlist must cover.
MODEL_BODY: frozenset[Route] = METERED | {"show"}

# Exact blocked paths and blocked subtrees (docs/OLLAMA.md#routes: model management and egress).
BLOCKED_EXACT = frozenset(
    {"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/me", "/api/signout"}
)
BLOCKED_TREES = ("/api/blobs", "/api/user", "/api/experimental")
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")

_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9._:-]+$")


@attrs.frozen
class Decision:
    """The policy's verdict: status 200 with a route, or an error status and message."""

    status: int
    route: Route | None = None
    message: str = ""
    allow: tuple[str, ...] = ()  # for 405

    @property
    def allowed(self) -> bool:
        """True when the request may proceed."""
        return self.status == 200


def _is_blocked(path: str) -> bool:
    if path in BLOCKED_EXACT:
        return True
    return any(path == tree or path.startswith(tree + "/") for tree in BLOCKED_TREES)


def _resolve_dots(path: str) -> str:
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    return "/".join(out)


def normalisations(raw_path: str) -> set[str]:
    """Every plausible reading of a path by some server or proxy along the way."""
    candidates = {raw_path}
    text = raw_path
    for _ in range(3):  # double and triple encoding
        decoded = unquote(text)
        if decoded == text:
            break
        candidates.add(decoded)
        text = decoded
    results: set[str] = set()
    for candidate in candidates:
        for variant in (candidate, candidate.replace("\\", "/")):
            collapsed = re.sub(r"/{2,}", "/", variant)
            resolved = _resolve_dots(collapsed)
            # RFC 3986 dot removal keeps empty segments: "/api//../pull" is "/api/pull" there.
            rfc = _resolve_dots(variant)
            for form in (variant, collapsed, resolved, rfc, re.sub(r"/{2,}", "/", rfc)):
                stripped = form.rstrip("/") or "/"
                results.update({form, stripped, form.lower(), stripped.lower()})
    return results


def is_model_segment(segment: str) -> bool:
    """A `/v1/models/{model}` segment: one plain path segment with model-name characters."""
    return bool(_SAFE_SEGMENT.match(segment)) and segment not in {".", ".."}


def _served(raw_path: str) -> dict[str, Route] | None:
    methods = ALLOWED.get(raw_path)
    if (
        methods is None
        and raw_path.startswith(MODEL_ROUTE_PREFIX)
        and is_model_segment(raw_path[len(MODEL_ROUTE_PREFIX) :])
    ):
        return {"GET": "openai_model"}
    return methods


def decide(method: str, raw_uri: str, override: str | None = None) -> Decision:
    """Classify one request by method and raw URI (query string allowed, ignored)."""
    raw_path = raw_uri.split("?", 1)[0].split("#", 1)[0]
    methods = _served(raw_path)  # exact, canonical spellings: they cannot normalise elsewhere
    if methods is None:
        forms = normalisations(raw_path)
        if any(_is_blocked(form) for form in forms):
            return Decision(403, message="this endpoint is disabled on this gateway")
        if any(_served(form) is not None for form in forms) or forms - {raw_path, raw_path.lower()}:
            return Decision(400, message="ambiguous request path")
        return Decision(404, message="not found")
    if override is not None:
        return Decision(400, message="method override headers are not accepted")
    route = methods.get(method)  # case-sensitive, as HTTP methods are
    if route is None:
        return Decision(405, message="method not allowed", allow=tuple(methods))
    return Decision(200, route=route)
