"""Model names as types/model/name.go parses them, and which of them are cloud models."""

from __future__ import annotations

import json
import re
from typing import Final

import attrs

from ollama_simulator.exceptions import ApiError

DEFAULT_HOST: Final = "registry.ollama.ai"


DEFAULT_NAMESPACE: Final = "library"


DEFAULT_TAG: Final = "latest"


_MODEL_PART: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,79}")


_NAMESPACE_PART: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,79}")


_HOST_PART: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,349}")


@attrs.frozen
class ModelName:
    """`[host/][namespace/]model[:tag]` with Ollama's defaults filled in."""

    host: str
    namespace: str
    model: str
    tag: str

    @property
    def key(self) -> str:
        """The case-insensitive identity used to match installed models."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}".lower()

    def display(self) -> str:
        """Go's Name.DisplayShortest: `llama3.2:latest`, `ns/m:tag`, `host/ns/m:tag`."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"


def parse_model_name(raw: str) -> ModelName | None:
    """Parse a model name per types/model/name.go; None when the grammar rejects it."""
    text = raw.strip()
    text = text.split("@", 1)[0]
    tag = DEFAULT_TAG
    slash, colon = text.rfind("/"), text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
    parts = text.split("/")
    if len(parts) > 3:
        return None
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    host = parts[-3] if len(parts) == 3 else DEFAULT_HOST
    valid = (
        _MODEL_PART.fullmatch(model)
        and _MODEL_PART.fullmatch(tag)
        and _NAMESPACE_PART.fullmatch(namespace)
        and _HOST_PART.fullmatch(host)
    )
    return ModelName(host, namespace, model, tag) if valid else None


def is_cloud_model(raw: str) -> bool:
    """`:cloud` names and `-cloud` tags are served by ollama.com (docs/OLLAMA.md#routes)."""
    name = raw.strip()
    if name.endswith(":local"):
        return False
    if name.endswith(":cloud"):
        return True
    slash, colon = name.rfind("/"), name.rfind(":")
    return colon > slash and name[colon + 1 :].endswith("-cloud")


def _local_name(raw: str) -> str:
    """The name with a `:local` source suffix removed; `:local` plus cloud is a 400."""
    name = raw.strip()
    if name.endswith(":local"):
        base = name[: -len(":local")]
        if is_cloud_model(base):
            raise ApiError(400, f"use either :local or :cloud, not both: {json.dumps(name)}")
        return base
    return name
