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


class _Backends(Collector):
    def __init__(self, state: Callable[[], list[tuple[str, int, bool]]]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "proxy_backend_in_flight", "requests in flight on each backend", labels=["backend"]
        )
        healthy = GaugeMetricFamily(
            "proxy_backend_healthy", "1 while the backend answers its polls", labels=["backend"]
        )
        for name, count, up in self._state():
            in_flight.add_metric([name], float(count))
            healthy.add_metric([name], 1.0 if up else 0.0)
        yield in_flight
        yield healthy


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
    backend_requests: Counter = attrs.field(init=False)
    backend_first_byte: Histogram = attrs.field(init=False)
    backend_errors: Counter = attrs.field(init=False)

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
        # Per backend, labelled with its configured name (never its URL, which may hold credentials).
        self.backend_requests = Counter(
            "proxy_backend_requests", "requests sent to each backend", ["backend"], registry=r
        )
        self.backend_first_byte = Histogram(
            "proxy_backend_first_byte_seconds",
            "time to a backend's first byte",
            ["backend"],
            buckets=SECONDS,
            registry=r,
        )
        self.backend_errors = Counter(
            "proxy_backend_errors",
            "backend failures: refused, dropped (before the answer), status (5xx), broken (mid-answer)",
            ["backend", "kind"],
            registry=r,
        )

    def watch_backends(self, state: Callable[[], list[tuple[str, int, bool]]]) -> None:
        """Expose each backend's requests in flight and health: (name, in flight, healthy)."""
        self.registry.register(_Backends(state))

    def watch_spool(self, depth: Callable[[], int]) -> None:
        """Expose the usage spool's depth."""
        self.registry.register(_Spool(depth))
