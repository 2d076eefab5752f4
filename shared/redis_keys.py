"""The one module that builds Redis key names.

Every name starts with the configured prefix. Every key a script touches for one tenant carries
the tenant's hash tag `{t:<tenant_id>}`, so all of them live in one Redis Cluster slot.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class RedisKeys:
    """Key-name builder bound to one prefix."""

    prefix: str = "nz:"

    def tag(self, tenant_id: int) -> str:
        """The tenant's hash tag."""
        return f"{{t:{tenant_id}}}"

    def _t(self, tenant_id: int, rest: str) -> str:
        return f"{self.prefix}{self.tag(tenant_id)}:{rest}"

    # --- admission (per scope: "k<key_id>" or "t") ---------------------------------------------
    def rpm(self, tenant_id: int, scope: str) -> str:
        """Request-rate window state for a scope."""
        return self._t(tenant_id, f"rpm:{scope}")

    def tpm(self, tenant_id: int, scope: str) -> str:
        """Token-rate window state (settled plus reserved) for a scope."""
        return self._t(tenant_id, f"tpm:{scope}")

    def leases(self, tenant_id: int, scope: str) -> str:
        """Sorted set of live stream leases (member: request id, score: expiry)."""
        return self._t(tenant_id, f"leases:{scope}")

    def budget(self, tenant_id: int, scope: str, period: str, period_start: str) -> str:
        """Tokens used (settled plus reserved) in one budget period of a scope."""
        return self._t(tenant_id, f"budget:{scope}:{period}:{period_start}")

    def model(self, tenant_id: int, pattern: str, kind: str, scope: str) -> str:
        """A model rule's rpm / tpm / leases state for a scope; `pattern` is the rule's digest
        (shared/model_limits.py)."""
        return self._t(tenant_id, f"m:{pattern}:{kind}:{scope}")

    def model_budget(self, tenant_id: int, pattern: str, scope: str, period: str, period_start: str) -> str:
        """Tokens used (settled plus reserved) in one budget period of a model rule's scope."""
        return self._t(tenant_id, f"m:{pattern}:budget:{scope}:{period}:{period_start}")

    def decision(self, tenant_id: int, request_id: str) -> str:
        """The remembered admission of one request id (idempotent auth retries)."""
        return self._t(tenant_id, f"req:{request_id}")

    def reservation(self, tenant_id: int, request_id: str) -> str:
        """One request's reservation, settled by the accountant or charged at lease expiry."""
        return self._t(tenant_id, f"resv:{request_id}")

    def reservation_index(self, tenant_id: int) -> str:
        """Open reservations of a tenant by lease expiry (the expired-lease sweeper reads it)."""
        return self._t(tenant_id, "resv-index")

    def settled(self, tenant_id: int, request_id: str) -> str:
        """Marks a request id as settled (the accountant applies each usage event once)."""
        return self._t(tenant_id, f"settled:{request_id}")

    def grant_spent(self, tenant_id: int, request_id: str) -> str:
        """Marks a grant as spent (single use), set by the reservation call."""
        return self._t(tenant_id, f"grant:{request_id}")

    def unledgered(self, tenant_id: int) -> str:
        """Requests stream_proxy settled in Redis that the ledger may not have yet (request id ->
        key id, tokens, second, day, month, written ms); the accountant's settle removes each."""
        return self._t(tenant_id, "unledgered")

    def hydrate_lock(self, tenant_id: int) -> str:
        """Lock held while counters are rebuilt from Postgres; it holds off the accountant's settles."""
        return self._t(tenant_id, "hydrate-lock")

    # --- per key prefix (hash tag {p:<prefix>}: the guard's keys share one slot) -------------------
    def key_mismatches(self, prefix: str) -> str:
        """Wrong secrets tried against a key prefix in the current window (Argon2 mismatches)."""
        return f"{self.prefix}{{p:{prefix}}}:mismatches"

    def key_verified(self, prefix: str) -> str:
        """Keyed digest of the token last verified for a prefix (recognised while it is locked)."""
        return f"{self.prefix}{{p:{prefix}}}:verified"

    # --- process-wide ----------------------------------------------------------------------------
    @property
    def reserving_tenants(self) -> str:
        """Tenants that may have open reservations (where the sweeper looks)."""
        return f"{self.prefix}resv-tenants"

    @property
    def invalidations(self) -> str:
        """Pub/sub channel the admin CLI publishes key and tenant changes on."""
        return f"{self.prefix}invalidate"

    @property
    def usage_stream(self) -> str:
        """Stream of usage events from stream_proxy to the accountant."""
        return f"{self.prefix}usage"

    @property
    def audit_stream(self) -> str:
        """Stream of denial batches from the sidecars to the accountant."""
        return f"{self.prefix}audit"

    @property
    def dead_letters(self) -> str:
        """Stream of events the accountant could not apply, with their reason."""
        return f"{self.prefix}usage-dead"
