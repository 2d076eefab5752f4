"""The small error hierarchy of the shared package; services map these to HTTP in one middleware."""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The environment does not describe a usable configuration; lists every problem at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class KeyFormatError(GatewayError):
    """A presented API key is malformed or fails its checksum (decided without any I/O)."""


class AdminError(GatewayError):
    """An admin command cannot be carried out; the message is safe to show the operator."""


class NotFoundError(AdminError):
    """The tenant or key an admin command names does not exist."""


class ConflictError(AdminError):
    """An admin command would create a duplicate (tenant name, key name)."""
