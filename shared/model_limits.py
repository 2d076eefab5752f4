"""Which model rules a request's model falls under (docs/ARCHITECTURE.md#model-limits).

Patterns and names are compared in their qualified form (`host/namespace/model:tag`, every default
written out, shared/model_names.py): `*` is any run of characters except `/`, so it stays inside
one part of the name. The same match runs in Lua when counters are rebuilt (shared/lua/rebuild.lua);
`lua_pattern` is the one translation of a pattern for it.
"""

from __future__ import annotations

import functools
import hashlib
import re

from shared.model_names import InvalidModelName, normalise, qualified
from shared.models import ModelRule

MAX_RULES_PER_SCOPE = 32  # per tenant and per key: every rule travels in the grant


@functools.lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile("[^/]*".join(re.escape(piece) for piece in qualified(pattern).split("*")))


def matches(pattern: str, model: str) -> bool:
    """Whether a canonical pattern covers a canonical model name."""
    return _regex(pattern).fullmatch(qualified(model)) is not None


def lua_pattern(pattern: str) -> str:
    """The anchored Lua pattern matching what `matches` matches, for qualified names."""
    pieces = [
        re.sub(r"[\^$()%.\[\]+\-?]", lambda m: "%" + m.group(0), p) for p in qualified(pattern).split("*")
    ]
    return "^" + "[^/]*".join(pieces) + "$"


def digest(pattern: str) -> str:
    """A pattern's short name in Redis key names (patterns hold characters key names should not)."""
    return hashlib.sha256(pattern.encode("utf-8")).hexdigest()[:16]


def canonical_model(name: object) -> str | None:
    """The canonical name of the model a request names; None when it names none or no valid one."""
    if not isinstance(name, str) or not name.strip():
        return None
    try:
        return normalise(name)
    except InvalidModelName:
        return None


def applicable(rules: tuple[ModelRule, ...], model: str | None) -> list[ModelRule]:
    """The rules whose pattern covers `model` (canonical), in the grant's order."""
    if model is None or not rules:
        return []
    return [rule for rule in rules if matches(rule.pattern, model)]
