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
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

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
    """

    client: redis.Redis
    put: Any
    take: Any
    checkpoint: Any
    checkpoint_of: Any

    def close(self) -> None:
        self.client.close()


class RedisRepository(ThreadedRepository[_Client]):
    """
    Sessions in the Redis server that C{url} names (C{redis://},
    C{rediss://} or C{unix://}).

    @param password: the password, when it is kept outside C{url}.
    @param tls: connect over TLS even with a C{redis://} URL.
    @param threads: worker threads, each with a client of its own.
    @param timeout: seconds for connecting and for each command.
    @raise RepositoryError: C{url} is not a Redis URL, or C{tls} is set
        with a C{unix://} URL.
    """

    kind = "redis"

    def __init__(self, url: str, reactor: Any, *, password: str | None = None,
                 tls: bool = False, threads: int = DEFAULT_THREADS,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(reactor, threads=threads, timeout=timeout)
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise RepositoryError("redis: the url is not a URL") from None
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise RepositoryError("redis: the url is not a redis://, "
                                  "rediss:// or unix:// URL")
        if tls and parts.scheme == "unix":
            raise RepositoryError("redis: tls is set, but the URL names a "
                                  "unix socket")
        if tls and parts.scheme == "redis":
            parts = parts._replace(scheme="rediss")
        self._url = urlunsplit(parts)
        self._password = password
        if parts.scheme == "unix":
            self._target = f"unix:{parts.path}"
        else:
            self._target = (f"{parts.scheme}://{parts.hostname or 'localhost'}"
                            f":{port or 6379}{parts.path or ''}")

    def describe(self) -> str:
        return f"redis {self._target}"

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        return (redis.RedisError,)

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
        # No I/O here: the client connects on its first command.
        client = redis.Redis.from_url(self._url, **options)
        return _Client(client, client.register_script(_PUT),
                       client.register_script(_TAKE),
                       client.register_script(_CHECKPOINT),
                       client.register_script(_CHECKPOINT_OF))

    def _do_start(self, connection: _Client) -> None:
        connection.client.ping()

    def _do_put(self, connection: _Client, session_id: bytes, sealed: bytes,
                expires: float, now: float) -> None:
        # A lifetime of 0 or less makes PEXPIRE delete the key at once.
        lifetime = int((expires - now) * 1000)
        connection.put(keys=[key(session_id)], args=[sealed, lifetime])

    def _do_take(self, connection: _Client, session_id: bytes,
                 now: float) -> Outcome:
        found = _found(connection.take, session_id)
        if isinstance(found, Outcome):
            return found
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
        return connection.checkpoint(keys=[key(session_id)],
                                     args=[_seq_text(seq), digest]) == 1

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
        return connection.client.delete(key(session_id)) > 0

    def _do_expire(self, connection: _Client, now: float) -> int:
        # Redis expires keys by their TTL.
        return 0
