"""The Ollama backends a stream_proxy fronts, as `GATEWAY_OLLAMA_URLS` names them.

`GATEWAY_OLLAMA_URLS` is a comma-separated list of `[name=]url[;weight=W][;max_parallel=N]`, for example
`gpu1=http://10.0.0.11:11434;weight=2;max_parallel=4, gpu2=http://10.0.0.12:11434`. The name is the
backend's label in logs and metrics (never its URL, which may carry credentials); it defaults to
`ollama-<position>`. `weight` (default 1) scales its share; `max_parallel` is the box's own
`OLLAMA_NUM_PARALLEL`: the gateway never has more requests in flight there (unset: no limit, as
with `GATEWAY_OLLAMA_URL`, the one-backend form).
"""

from __future__ import annotations

import re

import attrs
from yarl import URL

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
MAX_BACKENDS = 64


class BackendSpecError(ValueError):
    """A `GATEWAY_OLLAMA_URLS` entry that cannot be read (the message never holds the URL)."""


@attrs.frozen
class BackendSpec:
    """One backend: its name, base URL, weight and `max_parallel` (None: no limit)."""

    name: str
    url: URL
    weight: float = 1.0
    max_parallel: int | None = None

    @property
    def capacity(self) -> float:
        """Its share of the work: `max_parallel` (1 when unset) times its weight."""
        return (self.max_parallel or 1) * self.weight


def _url(text: str, position: int) -> URL:
    try:
        url = URL(text.strip())
    except ValueError:
        raise BackendSpecError(f"backend {position}: not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise BackendSpecError(f"backend {position}: the URL must be http(s)://host[:port]")
    if url.path not in ("", "/") or url.query_string or url.fragment:
        raise BackendSpecError(f"backend {position}: the URL must have no path, query or fragment")
    return url.with_path("")


def _number(name: str, value: str, position: int) -> float:
    try:
        number = float(value)
    except ValueError:
        raise BackendSpecError(f"backend {position}: {name} must be a number") from None
    if not 0 < number <= 1_000_000:  # NaN fails it too
        raise BackendSpecError(f"backend {position}: {name} must be above 0 and at most 1000000")
    return number


def _entry(entry: str, position: int) -> BackendSpec:
    head, *options = entry.split(";")
    name = f"ollama-{position}"
    if "=" in head and "://" not in head.split("=", 1)[0]:
        name, head = (part.strip() for part in head.split("=", 1))
        if not NAME.fullmatch(name):
            raise BackendSpecError(
                f"backend {position}: a name is 1-32 of a-z, 0-9, '_' and '-', not starting with '_' or '-'"
            )
    weight, max_parallel = 1.0, None
    for option in options:
        key, _, value = (part.strip() for part in option.partition("="))
        if key == "weight":
            weight = _number("weight", value, position)
        elif key == "max_parallel":
            number = _number("max_parallel", value, position)
            if number != int(number):
                raise BackendSpecError(f"backend {position}: max_parallel must be a whole number")
            max_parallel = int(number)
        else:
            known = "weight, max_parallel"
            raise BackendSpecError(f"backend {position}: unknown option {key[:40]!r} ({known})")
    return BackendSpec(name=name, url=_url(head, position), weight=weight, max_parallel=max_parallel)


def parse_backends(text: str) -> list[BackendSpec]:
    """Every backend of a `GATEWAY_OLLAMA_URLS` value, in order; BackendSpecError when one is wrong."""
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        raise BackendSpecError("no backend given")
    if len(entries) > MAX_BACKENDS:
        raise BackendSpecError(f"at most {MAX_BACKENDS} backends")
    specs = [_entry(entry, position) for position, entry in enumerate(entries, start=1)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise BackendSpecError("backend names must differ")
    return specs
