"""Prometheus metrics of one stream_proxy process (labels: route and status class, never keys)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class _Spool(Collector):
    def __init__(self, depth: Callable[[], int]) -> None:
        self._depth = depth

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("proxy_usage_spool_depth", "usage events waiting for Redis")
        family.add_metric([], float(self._depth()))
        yield family


@attrs.define
class ProxyMetrics:
    """The proxy's registry and instruments."""

    registry: CollectorRegistry = attrs.field(factory=lambda: CollectorRegistry(auto_describe=True))
    requests: Counter = attrs.field(init=False)
    first_byte: Histogram = attrs.field(init=False)
    duration: Histogram = attrs.field(init=False)
    tokens: Counter = attrs.field(init=False)
    disconnects: Counter = attrs.field(init=False)
    upstream_errors: Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("proxy_requests", "proxied requests", ["route", "status"], registry=r)
        self.first_byte = Histogram("proxy_first_byte_seconds", "time to Ollama's first byte", ["route"],
                                    buckets=SECONDS, registry=r)  # fmt: skip
        self.duration = Histogram(
            "proxy_duration_seconds", "whole request", ["route"], buckets=SECONDS, registry=r
        )
        self.tokens = Counter("proxy_tokens", "tokens metered", ["route", "kind"], registry=r)
        self.disconnects = Counter(
            "proxy_client_disconnects", "clients gone mid-response", ["route"], registry=r
        )
        self.upstream_errors = Counter("proxy_upstream_errors", "Ollama failures", ["route"], registry=r)

    def watch_spool(self, depth: Callable[[], int]) -> None:
        """Expose the usage spool's depth."""
        self.registry.register(_Spool(depth))
