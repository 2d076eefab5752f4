"""The Redis / Valkey client: one server (`redis://`, `rediss://`, `unix://`) or a cluster
(`redis+cluster://host:port,host:port,...`, every listed node a startup node).

Every script keeps its keys in one hash slot (`{t:<tenant>}`, or a single process-wide key), so the
same code runs on both; the cluster client is typed as the single-server one, whose commands,
scripts, pipelines and pub/sub it shares.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import coredis
from coredis.connection import TCPLocation

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def is_cluster(url: str) -> bool:
    """Whether the URL names a cluster."""
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The startup nodes of a `redis+cluster://h1:p1,h2:p2` URL."""
    parts = urlsplit(url)
    nodes = []
    for item in parts.netloc.rsplit("@", 1)[-1].split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError("a cluster URL lists its nodes as host:port,host:port")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


def _cluster(url: str, timeouts: dict[str, float | None]) -> coredis.RedisCluster[bytes]:
    parts = urlsplit(url)
    options: dict[str, Any] = {}
    userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
    if userinfo:
        user, _, password = userinfo.partition(":")
        options["username"] = unquote(user) or None
        options["password"] = unquote(password) or None
    if parts.scheme.startswith("rediss"):
        options["ssl"] = True
    query = parse_qs(parts.query)
    if "stream_timeout" in query:
        options["stream_timeout"] = float(query["stream_timeout"][0])
    nodes = [TCPLocation(host, port) for host, port in cluster_nodes(url)]
    return coredis.RedisCluster(startup_nodes=nodes, **{**timeouts, **options})


@contextlib.asynccontextmanager
async def connect(
    url: str, *, connect_timeout: float | None = None, reply_timeout: float | None = None
) -> AsyncIterator[coredis.Redis[bytes]]:
    """A client for the URL, entered (coredis needs it used in the task that entered it). With
    timeouts (RedisConfig's), a hung Redis raises TimeoutError instead of pinning the caller; a
    `stream_timeout` in the URL still wins."""
    timeouts = {"connect_timeout": connect_timeout, "stream_timeout": reply_timeout}
    if not is_cluster(url):
        client: coredis.Redis[bytes] = coredis.Redis.from_url(
            url, connect_timeout=connect_timeout, stream_timeout=reply_timeout
        )
        async with client:
            yield client
        return
    cluster = _cluster(url, timeouts)
    try:
        async with cluster:
            yield cast("coredis.Redis[bytes]", cluster)
    finally:
        # coredis 6.9 never closes the cluster layout's error streams (ResourceWarning otherwise).
        for stream in getattr(cluster.connection_pool.cluster_layout, "_error_stream", ()):
            stream.close()
