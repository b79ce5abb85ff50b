"""
The session repository in Redis, through redis-py's synchronous client.

One hash per session, under C{sslshare:session:<session id in hex>}:

    sealed   the sealed state
    seq      checkpoint: the record count, 20 decimal digits, zero-padded
    digest   checkpoint: the running digest

The key's TTL is the session's lifetime (C{PEXPIRE}, in milliseconds from
now), so Redis drops expired sessions by itself and never returns one:
L{RedisRepository.expire} has nothing to do.

Every operation that reads and writes is one Lua script, which Redis runs
atomically: C{take} reads the blob and deletes the key; C{checkpoint}
compares and sets the checkpoint.  Redis' Lua numbers are doubles, exact to
2**53 only, so the checkpoint compares zero-padded decimal strings of one
length instead (digits order the same in every collation).  A key of
another type, or a hash with no blob, is a bad row: deleted and counted.

redis-py's asyncio client would need an asyncio reactor, so the
synchronous one runs in the repository's worker threads (four by default),
each with a client of its own holding one connection.  The client
reconnects by itself: a command on a connection that broke is tried once
more, at once, on a new one, which covers a server that restarted; a server
that is down fails the call at once (connection refused) or after the
timeout.  C{rediss://} URLs, or C{tls}, connect over TLS; name the CA with
the URL's C{ssl_ca_certs} parameter when it is not a system one.  The
password from a password file replaces any in the URL.

A Redis Cluster (a C{redis+cluster://} URL naming seed nodes, or
C{cluster} with one seed's URL) is reached through redis-py's
C{RedisCluster}, which learns the slots from the seeds and follows
C{MOVED} and C{ASK}: every script touches one key, so its keys are in one
hash slot by construction.  A Sentinel deployment (C{sentinels} and
C{service}) is reached through redis-py's C{Sentinel}: each connection
asks the sentinels for the master, so after a failover the next
connection goes to the promoted replica.

Replication is asynchronous: a master that dies may take its latest writes
with it, and a promoted replica may still hold a session a take deleted,
which another node would then take again: one session served twice.  With
C{wait_replicas = N}, every write (put, take, checkpoint, purge) is
followed by C{WAIT N}, bounded by half the timeout, and fails unless N
replicas acknowledged it; a take that fails so is not used (its lookup
becomes a full handshake), so a session a promoted replica still holds
was never served.  Sentinel deployments wait for one replica unless told
otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import attrs
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from sslshare.repository._base import (
    DEFAULT_THREADS,
    DEFAULT_TIMEOUT,
    MISS,
    Outcome,
    RepositoryError,
    ThreadedRepository,
    stored_checkpoint_problem,
    taken_outcome,
)
from sslshare.redis_targets import (
    MAX_WAIT_REPLICAS,
    SERVER_SCHEMES,
    RedisTargetError,
    cluster_seeds,
    is_cluster_url,
)
from sslshare.state import MAX_SEQ

KEY_PREFIX = b"sslshare:session:"
_SEQ_DIGITS = 20
_BAD_SEQ = f"the checkpoint seq is not {_SEQ_DIGITS} digits"

# Scripts that read a session's hash start here: a missing key is a miss,
# any other type is a bad row, dropped.
_HASH_OR_DISCARD = """
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'none' then return {'miss'} end
if kind ~= 'hash' then
    redis.call('DEL', KEYS[1])
    return {'bad', 'the key holds a ' .. kind .. ', not a hash'}
end
"""

_PUT = """
redis.call('HSET', KEYS[1], 'sealed', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_TAKE = _HASH_OR_DISCARD + """
local stored = redis.call('HMGET', KEYS[1], 'sealed', 'seq', 'digest')
local lifetime = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
if not stored[1] then return {'bad', 'the hash has no blob'} end
return {'hit', stored[1], stored[2] or '', stored[3] or '', lifetime}
"""

_CHECKPOINT = """
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then return 0 end
if redis.call('HEXISTS', KEYS[1], 'sealed') == 0 then return 0 end
local stored = redis.call('HGET', KEYS[1], 'seq')
if stored and string.len(stored) == string.len(ARGV[1])
        and stored >= ARGV[1] then
    return 0
end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'digest', ARGV[2])
return 1
"""

_CHECKPOINT_OF = _HASH_OR_DISCARD + """
if redis.call('HEXISTS', KEYS[1], 'sealed') == 0 then
    redis.call('DEL', KEYS[1])
    return {'bad', 'the hash has no blob'}
end
local stored = redis.call('HMGET', KEYS[1], 'seq', 'digest')
return {'hit', stored[1] or '', stored[2] or ''}
"""


def key(session_id: bytes) -> bytes:
    """
    The Redis key of C{session_id}'s hash.
    """
    return KEY_PREFIX + session_id.hex().encode("ascii")


def _seq_text(seq: int) -> bytes:
    return b"%0*d" % (_SEQ_DIGITS, seq)


def _seq_from_text(text: bytes) -> int | None:
    if not text:
        return 0
    if len(text) != _SEQ_DIGITS or not text.isdigit():
        return None
    seq = int(text)
    return seq if seq <= MAX_SEQ else None


def _found(script: Any, session_id: bytes) -> list[Any] | Outcome:
    """
    Run C{script}, one that starts with L{_HASH_OR_DISCARD}, on the hash
    of C{session_id}: what it found after its C{'hit'}, or the outcome of a
    miss or a bad row.
    """
    answer = script(keys=[key(session_id)])
    status = answer[0]
    if status == b"miss":
        return MISS
    if status == b"bad":
        return Outcome("bad", answer[1].decode("utf-8", "replace"))
    return answer[1:]


@attrs.frozen
class _Client:
    """
    One worker thread's client and its scripts.

    @ivar wait_replicas: replicas each write waits for (L{RedisRepository}).
    """

    client: redis.Redis | RedisCluster
    put: Any
    take: Any
    checkpoint: Any
    checkpoint_of: Any
    wait_replicas: int
    timeout: float

    def close(self) -> None:
        self.client.close()

    def replicated(self, session_id: bytes, operation: str) -> None:
        """
        Wait until L{wait_replicas} replicas have what this connection
        wrote, at most half L{timeout} seconds.

        @raise RepositoryError: fewer acknowledged it.
        """
        if not self.wait_replicas:
            return
        # Half the command timeout: WAIT answers before the socket gives
        # up on it, with the count.
        command = ("WAIT", self.wait_replicas,
                   max(1, int(self.timeout * 500)))
        if isinstance(self.client, RedisCluster):
            # WAIT has no key: it must go to the node the write went to.
            acknowledged = self.client.execute_command(
                *command,
                target_nodes=self.client.get_node_from_key(key(session_id)))
        else:
            acknowledged = self.client.execute_command(*command)
        if acknowledged < self.wait_replicas:
            raise RepositoryError(
                f"redis: {operation}: {acknowledged} of {self.wait_replicas} "
                f"replicas acknowledged the write in {self.timeout / 2} s")


class RedisRepository(ThreadedRepository[_Client]):
    """
    Sessions in Redis: the server that C{url} names (C{redis://},
    C{rediss://} or C{unix://}), the Redis Cluster it names
    (C{redis+cluster://} seeds, or C{cluster} with one seed's URL), or the
    master that C{sentinels} name for C{service}.

    @param password: the password, when it is kept outside C{url}.
    @param tls: connect over TLS even with a C{redis://} URL; with
        C{sentinels}, to the sentinels and the master.
    @param sentinels: (host, port) of each sentinel, instead of C{url}.
    @param service: the master's name at the sentinels.
    @param wait_replicas: replicas each write waits for, at most C{timeout}
        seconds; a write fewer acknowledge fails (see the module).
        C{None}: one with C{sentinels}, none otherwise.
    @param threads: worker threads, each with a client of its own.
    @param timeout: seconds for connecting and for each command.
    @raise RepositoryError: C{url} is not a Redis URL, C{tls} is set with
        a C{unix://} URL, a cluster is asked for with one, or the
        sentinels, service and URL do not go together.
    """

    kind = "redis"

    def __init__(self, url: str | None, reactor: Any, *,
                 password: str | None = None, tls: bool = False,
                 cluster: bool = False,
                 sentinels: Sequence[tuple[str, int]] = (),
                 service: str | None = None, wait_replicas: int | None = None,
                 threads: int = DEFAULT_THREADS,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(reactor, threads=threads, timeout=timeout)
        if wait_replicas is None:
            wait_replicas = 1 if sentinels else 0
        if not 0 <= wait_replicas <= MAX_WAIT_REPLICAS:
            raise RepositoryError(f"redis: wait_replicas must be from 0 to "
                                  f"{MAX_WAIT_REPLICAS}")
        self.wait_replicas = wait_replicas
        self._password = password
        self._tls = tls
        self._sentinels = tuple(sentinels)
        self._service = service or ""
        self._seeds: tuple[tuple[str, int], ...] = ()
        self._username: str | None = None
        # The one server's URL, when it is neither a cluster nor sentinels.
        self._url = ""
        if sentinels:
            if url is not None or cluster:
                raise RepositoryError("redis: sentinels name the master; "
                                      "give no url and no cluster with them")
            if not service:
                raise RepositoryError("redis: sentinels need the service "
                                      "(the master's name)")
            self._target = (f"redis sentinel {service} via "
                            + ",".join(f"{h}:{p}" for h, p in sentinels))
            return
        if url is None:
            raise RepositoryError("redis: no url and no sentinels")
        if is_cluster_url(url):
            try:
                seeds = cluster_seeds(url)
            except RedisTargetError as e:
                raise RepositoryError(f"redis: {e}") from None
            self._seeds, self._tls = seeds.nodes, tls or seeds.tls
            if password is None:
                self._password = seeds.password
            self._username = seeds.username
            self._target = ("redis cluster " + ",".join(
                f"{h}:{p}" for h, p in seeds.nodes))
            return
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise RepositoryError("redis: the url is not a URL") from None
        if parts.scheme not in SERVER_SCHEMES:
            raise RepositoryError("redis: the url is not a redis://, "
                                  "rediss://, unix://, redis+cluster:// or "
                                  "rediss+cluster:// URL")
        if tls and parts.scheme == "unix":
            raise RepositoryError("redis: tls is set, but the URL names a "
                                  "unix socket")
        if cluster and parts.scheme == "unix":
            raise RepositoryError("redis: cluster is set, but the URL names "
                                  "a unix socket")
        if tls and parts.scheme == "redis":
            parts = parts._replace(scheme="rediss")
        host = parts.hostname or "localhost"
        if cluster:
            self._seeds, self._tls = ((host, port or 6379),), tls or (
                parts.scheme == "rediss")
            self._username = (unquote(parts.username)
                              if parts.username else None)
            if password is None and parts.password is not None:
                self._password = unquote(parts.password)
            self._target = f"redis cluster {host}:{port or 6379}"
            return
        self._url = urlunsplit(parts)
        if parts.scheme == "unix":
            self._target = f"redis unix:{parts.path}"
        else:
            self._target = (f"redis {parts.scheme}://{host}:{port or 6379}"
                            f"{parts.path or ''}")

    def describe(self) -> str:
        return self._target

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        # RedisCluster's "no node answers" is not a RedisError.
        return (redis.RedisError, RedisClusterException)

    def _is_broken(self, connection: _Client, error: BaseException) -> bool:
        # The client drops a broken connection and makes a new one on the
        # next command by itself.
        return False

    def _connect(self) -> _Client:
        options: dict[str, Any] = dict(
            socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
            # One worker thread, one command at a time.
            max_connections=1,
            # One retry, at once: it reconnects a connection that broke
            # while idle (a restarted server); a server that is down must
            # fail the call now, not after a backoff.
            retry=Retry(NoBackoff(), 1))
        if self._password is not None:
            options["password"] = self._password
        client: redis.Redis | RedisCluster
        if self._sentinels:
            sentinel_options = dict(socket_timeout=self.timeout,
                                    socket_connect_timeout=self.timeout,
                                    ssl=self._tls)
            # The sentinels are asked at each connection: no I/O here.
            client = Sentinel(
                self._sentinels, sentinel_kwargs=sentinel_options,
                ssl=self._tls).master_for(self._service, **options)
        elif self._seeds:
            # RedisCluster reads the slots from a seed now, in this worker
            # thread; a down seed fails the operation that connects.
            client = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in self._seeds],
                ssl=self._tls, username=self._username,
                cluster_error_retry_attempts=2, **options)
        else:
            # No I/O here: the client connects on its first command.
            client = redis.Redis.from_url(self._url, **options)
        return _Client(client, client.register_script(_PUT),
                       client.register_script(_TAKE),
                       client.register_script(_CHECKPOINT),
                       client.register_script(_CHECKPOINT_OF),
                       self.wait_replicas, self.timeout)

    def _do_start(self, connection: _Client) -> None:
        connection.client.ping()

    def _do_ping(self, connection: _Client) -> None:
        connection.client.ping()

    def _do_put(self, connection: _Client, session_id: bytes, sealed: bytes,
                expires: float, now: float) -> None:
        # A lifetime of 0 or less makes PEXPIRE delete the key at once.
        lifetime = int((expires - now) * 1000)
        connection.put(keys=[key(session_id)], args=[sealed, lifetime])
        connection.replicated(session_id, "put")

    def _do_take(self, connection: _Client, session_id: bytes,
                 now: float) -> Outcome:
        found = _found(connection.take, session_id)
        if isinstance(found, Outcome):
            return found
        # Not used unless the delete is where a failover would look.
        connection.replicated(session_id, "take")
        sealed, seq_text, digest, lifetime = found
        seq = _seq_from_text(seq_text)
        if seq is None:
            return Outcome("bad", _BAD_SEQ)
        # PTTL: milliseconds left, negative for a key without an expiry
        # (written by hand: every put sets one).
        expires = now + lifetime / 1000 if lifetime >= 0 else math.inf
        return taken_outcome(sealed, seq, digest, expires)

    def _do_checkpoint(self, connection: _Client, session_id: bytes,
                       seq: int, digest: bytes, now: float) -> bool:
        newer = connection.checkpoint(keys=[key(session_id)],
                                      args=[_seq_text(seq), digest]) == 1
        if newer:
            connection.replicated(session_id, "checkpoint")
        return newer

    def _do_checkpoint_of(self, connection: _Client, session_id: bytes,
                          now: float) -> Outcome:
        found = _found(connection.checkpoint_of, session_id)
        if isinstance(found, Outcome):
            return found
        seq_text, digest = found
        seq = _seq_from_text(seq_text)
        problem = (_BAD_SEQ if seq is None
                   else stored_checkpoint_problem(seq, digest))
        if problem is not None:
            connection.client.delete(key(session_id))
            return Outcome("bad", problem)
        return Outcome("hit", (seq, digest))

    def _do_purge(self, connection: _Client, session_id: bytes) -> bool:
        purged = connection.client.delete(key(session_id)) > 0
        if purged:
            connection.replicated(session_id, "purge")
        return purged

    def _do_expire(self, connection: _Client, now: float) -> int:
        # Redis expires keys by their TTL.
        return 0
