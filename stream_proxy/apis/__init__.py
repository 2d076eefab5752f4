"""The API families stream_proxy speaks, one adapter each, found by the route's family in
shared/policy.py (docs/ARCHITECTURE.md#api-families-and-adapters). Adding a family is one module
here plus its tests."""

from __future__ import annotations

from shared import policy
from stream_proxy.apis.anthropic import Anthropic
from stream_proxy.apis.base import Api, Framing, Reader
from stream_proxy.apis.native import Native
from stream_proxy.apis.openai import OpenAI
from stream_proxy.apis.responses import Responses

ADAPTERS: dict[policy.Family, Api] = {
    "native": Native(),
    "openai": OpenAI(),
    "responses": Responses(),
    "anthropic": Anthropic(),
}


def adapter(route: policy.Route) -> Api:
    """The adapter of a route's family."""
    return ADAPTERS[policy.FAMILY[route]]


__all__ = ["ADAPTERS", "Api", "Framing", "Reader", "adapter"]
