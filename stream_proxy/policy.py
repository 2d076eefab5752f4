"""The key's body policy: which models it may name, caps on num_ctx, keep_alive's cap and floor,
the fields a key must be allowed, and what listings may show.

Model names are compared as Ollama resolves them (docs/OLLAMA.md#model-names): normalised, case-
insensitive, default registry/namespace/tag filled in. `:cloud` and `-cloud` models (which Ollama
proxies off-box) are refused unless the allowlist names them explicitly.

One Ollama serves every tenant, so nothing a tenant sends may change how a shared model is loaded
for the others: keep_alive has a floor as well as a cap (0 would unload the model), the options that
reload a model need a key allowed them, and /api/ps shows neither other tenants' models nor when
they were last used (docs/DECISIONS.md#tenants-cannot-disturb-each-others-models).
"""

from __future__ import annotations

import re
from typing import Any, Final

from shared.grant import Grant
from shared.model_names import InvalidModelName, is_cloud, normalise
from shared.policy import Route
from stream_proxy import body
from stream_proxy.exceptions import Refused

# ASCII digits only: Python's \d (and float()) also take other scripts' digits, which Go refuses.
_GO_DURATION_PART = re.compile(r"((?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(ns|us|µs|μs|ms|s|m|h)")
# api.Duration is an int64 of nanoseconds: a number of seconds beyond it converts to whatever the
# platform makes of an overflowing float (a negative duration on amd64, an unload), a string beyond
# it is Go's "invalid duration".
_MAX_DURATION_SECONDS: Final = (2**63 - 1) / 1e9
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


def apply_keep_alive(grant: Grant, doc: body.Body, *, floor: int = 0) -> None:
    """keep_alive above the key's cap, or negative ("forever") under a cap, is lowered to the cap;
    then one below the floor (0 and short values unload a model every tenant shares) is raised to
    the floor, which wins over a smaller cap. Every spelling (number, Go duration string, any case
    of the key) is rewritten as whole seconds in `keep_alive`; one beyond Go's Duration that would
    be forwarded as sent is refused (400)."""
    document = doc.document
    seconds = _seconds(body.get(document, "keep_alive"))
    if seconds is None:
        return
    target: float | None = None
    cap = grant.max_keep_alive_seconds
    if cap is not None and (seconds < 0 or seconds > cap):
        target = cap
    if floor > 0 and 0 <= (seconds if target is None else target) < floor:  # -0.0 included
        target = floor  # negative (forever) is no short stay: only the cap lowers it
    if target is not None:
        body.put(document, "keep_alive", int(target))
        doc.changed = True
    elif seconds >= _MAX_DURATION_SECONDS:
        raise Refused(400, "keep_alive is out of range")


def apply_caps(grant: Grant, doc: body.Body, *, keep_alive_floor: int = 0) -> None:
    """num_ctx above the cap is refused (400); keep_alive is brought within cap and floor."""
    document = doc.document
    if grant.max_num_ctx is not None:
        num_ctx = body.option(document, "num_ctx")
        if (
            isinstance(num_ctx, (int, float))
            and not isinstance(num_ctx, bool)
            and num_ctx > grant.max_num_ctx
        ):
            raise Refused(400, f"num_ctx above this key's limit of {grant.max_num_ctx}")
    apply_keep_alive(grant, doc, floor=keep_alive_floor)


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


# What makes Ollama reload a model (the runner options, compared on every request) and so evicts
# it for every tenant using it. `options` is an exact-key map to Ollama, but any case is refused:
# a spelling that Ollama ignores today is not worth a reload tomorrow. Native `shift` too.
RELOAD_OPTIONS: Final = ("num_gpu", "num_batch", "main_gpu", "use_mmap", "num_thread")
RELOAD_FIELDS: Final = {"generate": ("shift",), "chat": ("shift",)}


def check_reload_options(grant: Grant, route: Route, document: dict[str, Any]) -> None:
    """Refuse (403) the options that reload a shared model unless the key is allowed them
    (`set-reload-options --on`); present at all is enough, whatever the value."""
    if grant.allow_reload_options:
        return
    options = body.get(document, "options")
    if isinstance(options, dict):
        for key in options:
            if (name := body.fold(key)) in RELOAD_OPTIONS:
                raise Refused(403, f"option {name} is not allowed for this key (it reloads the model)")
    for name in RELOAD_FIELDS.get(route, ()):
        if body.get(document, name) is not None:
            raise Refused(403, f"{name} is not allowed for this key (it reloads the model)")


def check_body(
    grant: Grant, route: Route, names: list[Any] | None, doc: body.Body, *, keep_alive_floor: int = 0
) -> None:
    """Everything the key's policy says about this body: the models it names (`names`, from the
    route's adapter; None when the route names none), the template and reload fields, the caps
    and keep_alive's floor."""
    check_templates(grant, route, doc.document)
    check_reload_options(grant, route, doc.document)
    if names is not None:
        given = [n for n in names if isinstance(n, str) and n.strip()]
        if not given:
            check_model(grant, None)
        for name in given:
            check_model(grant, name)
    apply_caps(grant, doc, keep_alive_floor=keep_alive_floor)


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


# Listing fields that show other tenants' activity, by route: /api/ps's expires_at is a model's
# last use plus that request's keep_alive; size_vram and context_length change with whoever loaded
# the model and how.
PRIVATE_LISTING_FIELDS: Final[dict[Route, tuple[str, ...]]] = {
    "ps": ("expires_at", "size_vram", "context_length")
}


def strip_private(route: Route, listing: tuple[str, tuple[str, ...]], document: Any) -> Any:
    """Drop the fields of a listing's entries that time or describe other tenants' requests."""
    private = PRIVATE_LISTING_FIELDS.get(route, ())
    entries = document.get(listing[0]) if isinstance(document, dict) else None
    for entry in entries if private and isinstance(entries, list) else ():
        if isinstance(entry, dict):
            for name in private:
                entry.pop(name, None)
    return document
