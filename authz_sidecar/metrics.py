"""Prometheus metrics of one sidecar process (labels never carry keys or prefixes)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


class _Readings(Collector):
    """Counters that live as plain attributes elsewhere, read at scrape time."""

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        values = self._read()
        for name in (
            "key_cache_hits",
            "key_cache_misses",
            "argon2_verifications",
            "key_db_lookups",
            "key_guess_refusals",
            "key_verified_digest_hits",
        ):
            family = CounterMetricFamily(f"authz_{name}", name.replace("_", " "))
            family.add_metric([], values.get(name, 0.0))
            yield family
        size = GaugeMetricFamily("authz_key_cache_entries", "cached key verdicts")
        size.add_metric([], values.get("key_cache_entries", 0.0))
        yield size
        subscribed = GaugeMetricFamily("authz_invalidation_subscribed", "1 while subscribed")
        subscribed.add_metric([], values.get("invalidation_subscribed", 0.0))
        yield subscribed


@attrs.define
class SidecarMetrics:
    """The sidecar's registry and instruments."""

    registry: CollectorRegistry = attrs.field(factory=lambda: CollectorRegistry(auto_describe=True))
    decisions: Counter = attrs.field(init=False)
    latency: Histogram = attrs.field(init=False)
    redis_errors: Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.decisions = Counter(
            "authz_decisions", "admission decisions", ["outcome", "reason"], registry=self.registry
        )
        self.latency = Histogram(
            "authz_decision_seconds", "time to decide", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.redis_errors = Counter("authz_redis_errors", "failed Redis calls", registry=self.registry)

    def watch(self, read: Callable[[], dict[str, float]]) -> None:
        """Expose attribute counters (cache, Argon2, lookups) at scrape time."""
        self.registry.register(_Readings(read))
