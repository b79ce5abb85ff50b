"""
The Redis and PostgreSQL servers the tests run against: the skip of the
tests whose driver or server is missing, one shared server of each kind per
process, and throwaway servers a test may stop.
"""

from __future__ import annotations

import atexit
import importlib

from twisted.trial.unittest import SkipTest, TestCase

from sslshare.dev.throwaway import (
    PostgresServer,
    RedisClusterServers,
    RedisSentinels,
    RedisServer,
    ServerUnavailable,
    postgres_binaries,
    redis_server_binary,
)
from tests.support.pki import pki

# The Python driver a node reaches each kind of server with.
SERVER_DRIVERS = {"redis": "redis", "postgres": "psycopg"}

_shared_servers: dict[str, RedisServer | PostgresServer] = {}
_shared_redis_groups: dict[str, RedisClusterServers | RedisSentinels] = {}

# The Redis deployments of several servers, by the name a test asks for.
REDIS_GROUPS = {"cluster": RedisClusterServers, "sentinel": RedisSentinels}


def skip_without(kind: str, server: bool = True) -> None:
    """
    Skip the running test unless the driver of C{kind} (C{"redis"} or
    C{"postgres"}) can be imported and, with C{server}, the server's
    programs are installed: the L{SkipTest} says which is missing and how
    to install it.  Every test that needs either asks here (through
    L{shared_server} or L{throwaway_server} when it needs a server running).
    """
    try:
        importlib.import_module(SERVER_DRIVERS[kind])
    except ImportError as e:
        raise SkipTest(f"the {kind} driver is not installed (pip install "
                       f"'sslshare[{kind}]'): {e}") from None
    if not server:
        return
    try:
        if kind == "redis":
            redis_server_binary()
        else:
            postgres_binaries()
    except ServerUnavailable as e:
        raise SkipTest(str(e)) from None


def _made_or_skipped(kind: str,
                     **options: object) -> RedisServer | PostgresServer:
    skip_without(kind)
    try:
        return (RedisServer(**options) if kind == "redis"
                else PostgresServer(**options))
    except ServerUnavailable as e:
        # Found, but cannot run here (root without a user to run as).
        raise SkipTest(str(e)) from None


def shared_server(kind: str) -> RedisServer | PostgresServer:
    """
    The server of C{kind} (C{"redis"} or C{"postgres"}, PostgreSQL with
    TLS) that every test of this process may use, started on first use and
    removed when the process exits.  Tests keep to their own keys and rows,
    and never stop it (a test that stops its server has its own, from
    L{throwaway_server}).

    @raise SkipTest: as L{skip_without} says.
    """
    if kind not in _shared_servers:
        options = {"tls": pki()} if kind == "postgres" else {}
        server = _made_or_skipped(kind, **options)
        atexit.register(server.remove)
        _shared_servers[kind] = server.start()
    return _shared_servers[kind]


def throwaway_server(testcase: TestCase, kind: str,
                     **options: object) -> RedisServer | PostgresServer:
    """
    A server of C{kind} of C{testcase}'s own, made with C{options} (those of
    L{RedisServer} or L{PostgresServer}) but not started, and removed when
    the test ends.

    @raise SkipTest: as L{skip_without} says.
    """
    server = _made_or_skipped(kind, **options)
    testcase.addCleanup(server.remove)
    return server


def shared_redis_group(name: str) -> RedisClusterServers | RedisSentinels:
    """
    The Redis deployment C{name} of L{REDIS_GROUPS} (a 3-master Redis
    Cluster, or a master, a replica and three sentinels) that every test
    of this process may use, as L{shared_server}: started on first use,
    removed when the process exits, never stopped by a test.

    @raise SkipTest: as L{skip_without} says.
    """
    if name not in _shared_redis_groups:
        skip_without("redis")
        group = REDIS_GROUPS[name]()
        atexit.register(group.remove)
        _shared_redis_groups[name] = group.start()
    return _shared_redis_groups[name]


def throwaway_redis_group(testcase: TestCase, name: str,
                          **options: object
                          ) -> RedisClusterServers | RedisSentinels:
    """
    A Redis deployment C{name} of L{REDIS_GROUPS} of C{testcase}'s own,
    made with C{options}, started, and removed when the test ends.

    @raise SkipTest: as L{skip_without} says.
    """
    skip_without("redis")
    group = REDIS_GROUPS[name](**options)
    testcase.addCleanup(group.remove)
    return group.start()
