"""Ollama model names: validation and normalisation as Ollama does it (docs/OLLAMA.md#model-names).

`[host/][namespace/]model[:tag]`, defaults `registry.ollama.ai`, `library`, `latest`, matched
case-insensitively. Allowlists store the normalised short form (`llama3.2:latest`, or
`ns/model:tag` / `host/ns/model:tag` when those are not the defaults).
"""

from __future__ import annotations

import re

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"
_NAMESPACE = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}"
_HOST = r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}"
_NAME_RE = re.compile(
    rf"^(?:(?P<host>{_HOST})/)?(?:(?P<ns>{_NAMESPACE})/)?(?P<model>{_PART})(?::(?P<tag>{_PART}))?$"
)


class InvalidModelName(ValueError):
    """The string is not an Ollama model name."""


def is_cloud(name: str) -> bool:
    """`:cloud` names and `-cloud` tags are proxied by Ollama to ollama.com (off-box)."""
    lowered = name.strip().lower()
    return lowered.endswith(":cloud") or (":" in lowered and lowered.rsplit(":", 1)[1].endswith("-cloud"))


def normalise(name: str) -> str:
    """The canonical short form used in allowlists; raises InvalidModelName."""
    text = name.strip()
    if text.lower().endswith(":local"):
        text = text[: -len(":local")]
    match = _NAME_RE.match(text)
    if match is None:
        raise InvalidModelName(name)
    host = (match["host"] or DEFAULT_HOST).lower()
    namespace = (match["ns"] or DEFAULT_NAMESPACE).lower()
    if match["host"] and not match["ns"]:
        # two parts: "ns/model", not "host/model"; a namespace has no dots or colons
        if not re.fullmatch(_NAMESPACE, match["host"]):
            raise InvalidModelName(name)
        namespace, host = host, DEFAULT_HOST
    model = match["model"].lower()
    tag = (match["tag"] or DEFAULT_TAG).lower()
    prefix = "" if host == DEFAULT_HOST else f"{host}/"
    prefix += "" if namespace == DEFAULT_NAMESPACE and not prefix else f"{namespace}/"
    return f"{prefix}{model}:{tag}"
