"""The key's body policy: which models it may name, and caps on num_ctx and keep_alive.

Model names are compared as Ollama resolves them (docs/OLLAMA.md#model-names): normalised, case-
insensitive, default registry/namespace/tag filled in. `:cloud` and `-cloud` models (which Ollama
proxies off-box) are refused unless the allowlist names them explicitly.
"""

from __future__ import annotations

import re
from typing import Any, Final

from shared.grant import Grant
from shared.model_names import InvalidModelName, is_cloud, normalise
from shared.policy import Route
from stream_proxy import body
from stream_proxy.exceptions import Refused

_GO_DURATION_PART = re.compile(r"((?:\d+(?:\.\d*)?|\.\d+))(ns|us|µs|μs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def model_allowed(grant: Grant, name: str) -> bool:
    """Whether the grant's allowlist covers a model name."""
    try:
        canonical = normalise(name)
    except InvalidModelName:
        raise Refused(400, "invalid model name") from None
    if grant.allowed_models is None:
        return not is_cloud(name)
    return canonical in grant.allowed_models


def check_model(grant: Grant, name: Any) -> None:
    """Refuse a request naming a model outside the key's allowlist (403)."""
    if not isinstance(name, str) or not name.strip():
        if grant.allowed_models is not None:
            raise Refused(403, "model not allowed for this key")
        return
    if not model_allowed(grant, name):
        raise Refused(403, f"model {name.strip()!r} is not allowed for this key")


def _seconds(value: Any) -> float | None:
    """keep_alive as Ollama reads it: seconds as a number, or a Go duration string."""
    if isinstance(value, bool):
        raise Refused(400, "invalid keep_alive")
    if isinstance(value, (int, float)):
        return float(value)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Refused(400, "invalid keep_alive")
    text = value.strip()
    if not text:
        return None
    if text in ("0", "+0", "-0"):  # Go's one unit-less duration
        return 0.0
    sign = -1.0 if text.startswith("-") else 1.0
    rest = text.lstrip("+-")
    parts = _GO_DURATION_PART.findall(rest)
    if not parts or _GO_DURATION_PART.sub("", rest):
        raise Refused(400, "invalid keep_alive duration")
    return sign * sum(float(number) * _UNIT[unit] for number, unit in parts)


def apply_caps(grant: Grant, doc: body.Body) -> None:
    """num_ctx above the cap is refused (400); keep_alive above the cap is lowered to it."""
    document = doc.document
    if grant.max_num_ctx is not None:
        num_ctx = body.option(document, "num_ctx")
        if (
            isinstance(num_ctx, (int, float))
            and not isinstance(num_ctx, bool)
            and num_ctx > grant.max_num_ctx
        ):
            raise Refused(400, f"num_ctx above this key's limit of {grant.max_num_ctx}")
    if grant.max_keep_alive_seconds is not None:
        keep_alive = _seconds(body.get(document, "keep_alive"))
        if keep_alive is not None and (keep_alive < 0 or keep_alive > grant.max_keep_alive_seconds):
            body.put(document, "keep_alive", grant.max_keep_alive_seconds)
            doc.changed = True


# Native fields that make a prompt bound meaningless or show what the operator keeps private: a
# client's Go template (generate) expands without limit; `_debug_render_only` (generate, chat)
# answers the rendered prompt, the Modelfile SYSTEM included (docs/ARCHITECTURE.md#prompt-bound).
TEMPLATE_FIELDS: Final = {"generate": ("template", "_debug_render_only"), "chat": ("_debug_render_only",)}


def check_templates(grant: Grant, route: Route, document: dict[str, Any]) -> None:
    """Refuse (403) the template fields unless the key is allowed them (`set-templates --on`)."""
    if grant.allow_templates:
        return
    for name in TEMPLATE_FIELDS.get(route, ()):
        value = body.get(document, name)
        if value not in (None, "", False):
            raise Refused(403, f"{name} is not allowed for this key")


def check_body(grant: Grant, route: Route, names: list[Any] | None, doc: body.Body) -> None:
    """Everything the key's policy says about this body: the models it names (`names`, from the
    route's adapter; None when the route names none), the template fields and the caps."""
    check_templates(grant, route, doc.document)
    if names is not None:
        given = [n for n in names if isinstance(n, str) and n.strip()]
        if not given:
            check_model(grant, None)
        for name in given:
            check_model(grant, name)
    apply_caps(grant, doc)


def filter_listing(grant: Grant, listing: tuple[str, tuple[str, ...]], document: Any) -> Any:
    """Drop the models a key may not use from a listing (/api/tags, /api/ps, /v1/models):
    `listing` names the field of entries and the fields that name each entry's model."""
    if not isinstance(document, dict):
        return document
    field, name_fields = listing

    def keep(entry: Any) -> bool:
        if not isinstance(entry, dict):
            return False
        name = next((entry[f] for f in name_fields if entry.get(f)), None)
        try:
            return isinstance(name, str) and model_allowed(grant, name)
        except Refused:
            return False

    entries = document.get(field)
    if isinstance(entries, list):
        document[field] = [e for e in entries if keep(e)]
    return document
