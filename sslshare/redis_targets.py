"""
Where a Redis repository's servers are, as the configuration names them,
read without the driver: a node's configuration is checked with these, and
the backend connects with them.

    redis://[user:password@]host[:port][/db]     one server
    rediss://...                                 the same, over TLS
    unix:///path/to/socket                       one server, local
    redis+cluster://[user:password@]host:port,host:port,...
    rediss+cluster://...                         a Redis Cluster, by its
                                                 seed nodes
    "host:port" (each of C{sentinels})           a Sentinel

A host and port are read by L{sslshare.addresses.host_port}; the port
defaults to 6379 for a server and 26379 for a sentinel.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import attrs

from sslshare.addresses import AddressError, host_port

SERVER_PORT = 6379
SENTINEL_PORT = 26379

SERVER_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SCHEMES = SERVER_SCHEMES + CLUSTER_SCHEMES

MAX_WAIT_REPLICAS = 16
"""The most replicas a write may wait for (C{wait_replicas})."""


class RedisTargetError(AddressError):
    """
    A URL that names no Redis server; the message says why and never holds
    a password.
    """


@attrs.frozen
class ClusterSeeds:
    """
    A Redis Cluster's seed nodes, from a C{redis+cluster://} URL.

    @ivar tls: C{rediss+cluster://}.
    """

    nodes: tuple[tuple[str, int], ...]
    tls: bool
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)


def is_cluster_url(url: str) -> bool:
    """
    Whether C{url} names a Redis Cluster by its seeds.
    """
    return url.partition("://")[0] in CLUSTER_SCHEMES


def url_scheme_problem(url: str) -> str | None:
    """
    Why C{url} is not a URL of one of L{SCHEMES}, or C{None}.
    """
    scheme, separator, _ = url.partition("://")
    if not separator or scheme not in SCHEMES:
        return ("not a redis://, rediss://, unix://, redis+cluster:// or "
                "rediss+cluster:// URL")
    return None


def cluster_seeds(url: str) -> ClusterSeeds:
    """
    The seeds of a C{redis+cluster://} or C{rediss+cluster://} URL.

    @raise RedisTargetError: not such a URL, no seed, a bad seed, or a
        path other than C{/} or C{/0} (a cluster has one database).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        raise RedisTargetError("not a URL") from None
    if parts.scheme not in CLUSTER_SCHEMES:
        raise RedisTargetError("not a redis+cluster:// or rediss+cluster:// "
                               "URL")
    if parts.path not in ("", "/", "/0"):
        raise RedisTargetError("a Redis Cluster has database 0 only")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = tuple(host_port(seed, SERVER_PORT)
                  for seed in hosts.split(",") if seed)
    if not nodes:
        raise RedisTargetError("the URL names no seed node")
    return ClusterSeeds(nodes, parts.scheme == "rediss+cluster", username,
                        password)
