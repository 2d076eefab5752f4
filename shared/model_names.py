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
    return _canonical(_NAME_RE.match(text), _NAMESPACE, name)


def _canonical(match: re.Match[str] | None, namespace_re: str, original: str) -> str:
    """The canonical short form of a matched name or pattern (defaults dropped, lower case)."""
    if match is None:
        raise InvalidModelName(original)
    host = (match["host"] or DEFAULT_HOST).lower()
    namespace = (match["ns"] or DEFAULT_NAMESPACE).lower()
    if match["host"] and not match["ns"]:
        # two parts: "ns/model", not "host/model"; a namespace has no dots or colons
        if not re.fullmatch(namespace_re, match["host"]):
            raise InvalidModelName(original)
        namespace, host = host, DEFAULT_HOST
    model = match["model"].lower()
    tag = (match["tag"] or DEFAULT_TAG).lower()
    prefix = "" if host == DEFAULT_HOST else f"{host}/"
    prefix += "" if namespace == DEFAULT_NAMESPACE and not prefix else f"{namespace}/"
    return f"{prefix}{model}:{tag}"


# A pattern is a name whose parts may hold `*` (any run of characters inside that part): the same
# grammar with `*` allowed, the same defaults (`big` is `big:latest`; `big:*` is every tag of it).
_PPART = r"[A-Za-z0-9_*][A-Za-z0-9_.*-]{0,79}"
_PNAMESPACE = r"[A-Za-z0-9_*][A-Za-z0-9_*-]{0,79}"
_PHOST = r"[A-Za-z0-9_*][A-Za-z0-9_.:*-]{0,349}"
_PATTERN_RE = re.compile(
    rf"^(?:(?P<host>{_PHOST})/)?(?:(?P<ns>{_PNAMESPACE})/)?(?P<model>{_PPART})(?::(?P<tag>{_PPART}))?$"
)


def normalise_pattern(text: str) -> str:
    """The canonical short form of a model pattern, as `normalise` gives a name's; raises
    InvalidModelName."""
    return _canonical(_PATTERN_RE.match(text.strip()), _PNAMESPACE, text)


def qualified(canonical: str) -> str:
    """`host/namespace/model:tag` of a canonical short name or pattern (every default written out),
    the form patterns are matched in: a `*` never reaches across a `/`."""
    parts = canonical.split("/")
    if len(parts) == 1:
        return f"{DEFAULT_HOST}/{DEFAULT_NAMESPACE}/{canonical}"
    if len(parts) == 2:
        return f"{DEFAULT_HOST}/{canonical}"
    return canonical


def unqualified(name: str) -> str:
    """The canonical short form of a qualified name (the inverse of `qualified`)."""
    for default in (f"{DEFAULT_HOST}/{DEFAULT_NAMESPACE}/", f"{DEFAULT_HOST}/"):
        if name.startswith(default) and name.count("/") == 2:
            return name[len(default) :]
    return name
