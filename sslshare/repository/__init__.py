"""
The central session repository: where sealed session states rest outside
the nodes, for a node that cannot ask the owner, or for a cluster that
recovers from the repository only.

L{ISessionRepository} is the whole contract.  A repository holds, per
session id, one I{sealed} blob (L{sslshare.state.StateKeys.seal}), its
expiry time, and the session's checkpoint (record count and running digest
with its tag, L{sslshare.state.StateKeys.seal_checkpoint}) in separate
fields beside the blob.  It never sees a plaintext state, a DER or a key:
sealing and opening are the caller's job.

Three backends share the code in this module:

    - L{sslshare.repository.sqlite}: one SQLite file, the embedded default
      (no server);
    - L{sslshare.repository.postgres}: a PostgreSQL table, through psycopg 3;
    - L{sslshare.repository.redis}: one Redis hash per session, with TTLs.

All three drivers block, so every operation runs in a thread pool of the
repository's own (L{twisted.python.threadpool.ThreadPool}, started by
C{start} and stopped by C{close}) and comes back as a Deferred: the reactor
never waits for storage.  Counters and logs are touched in the reactor
thread only.

What is true of every backend:

    - C{take} reads and deletes in one atomic step, so of any number of
      nodes racing for a session exactly one gets the blob, with the
      newest checkpoint stored beside it; a blob is never served after its
      expiry time.
    - The operations one repository object is asked for one session id
      run one after another, in the order they were asked (L{InOrder}),
      although the worker threads run the operations of different
      sessions at once: a node that writes a session and takes it right
      back finds it.
    - A checkpoint is accepted only when its C{seq} is higher than the one
      stored (one atomic compare-and-set) and only for a live blob.
    - A C{put} over an existing blob replaces the blob and its expiry and
      keeps the stored checkpoint, which must never go backwards.
    - Everything read back from storage is checked (id, blob and digest
      lengths, types); a bad row is deleted, logged and counted in
      C{bad_rows}, and reads as absent.  It never crashes a caller.
    - Driver failures (server down, refused password, full disk) fail the
      Deferred with L{RepositoryError}, counted in C{errors}; the next
      operation tries again, so a repository recovers by itself when its
      server returns.  Connections are made per worker thread, on first
      use, with short timeouts, and made again after they break.

Time: "now" is the given reactor's C{seconds()}, read in the reactor thread
when the operation is called; expiry times are unix times like it.

This module does no sealing and never logs a blob.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sslshare.repository._base import (
    COUNTERS,
    DEFAULT_THREADS,
    DEFAULT_TIMEOUT,
    EXPIRED,
    MISS,
    InOrder,
    ISessionRepository,
    Outcome,
    RepositoryError,
    Taken,
    ThreadedRepository,
    as_bytes,
    id_problem,
    read_secret_file,
    sealed_problem,
    stored_checkpoint_problem,
    taken_outcome,
)

if TYPE_CHECKING:
    from sslshare.config import RepositoryConfig

__all__ = [
    "COUNTERS",
    "DEFAULT_THREADS",
    "DEFAULT_TIMEOUT",
    "EXPIRED",
    "MISS",
    "ISessionRepository",
    "InOrder",
    "Outcome",
    "RepositoryError",
    "Taken",
    "ThreadedRepository",
    "as_bytes",
    "from_config",
    "id_problem",
    "sealed_problem",
    "stored_checkpoint_problem",
    "taken_outcome",
]


@contextmanager
def _needs_driver(kind: str, driver: str) -> Iterator[None]:
    """
    Turn a failed import of the driver of C{kind} into the
    L{RepositoryError} that says how to install it.
    """
    try:
        yield
    except ImportError as e:
        raise RepositoryError(
            f"repository kind {kind!r} needs {driver} (pip install "
            f"'sslshare[{kind}]'): {e}") from None


def _server(kind: str, address: str | None) -> str:
    if address is None:
        raise RepositoryError(f"repository kind {kind!r} names no server")
    return address


def from_config(config: RepositoryConfig, reactor: Any, state_dir: str
                ) -> ISessionRepository:
    """
    The repository a node's C{[repository]} section describes, not
    started yet.

    @param state_dir: the node's own directory; an SQLite repository with
        no C{path} keeps C{sessions.sqlite3} there.
    @raise RepositoryError: the backend's driver is not installed, or its
        password file cannot be read.
    """
    if config.kind == "sqlite":
        from sslshare.repository.sqlite import SQLiteRepository

        path = config.path or os.path.join(state_dir, "sessions.sqlite3")
        return SQLiteRepository(path, reactor)
    password = None
    if config.password_file is not None:
        password = read_secret_file(config.password_file)
    if config.kind == "postgres":
        with _needs_driver("postgres", "psycopg 3"):
            from sslshare.repository.postgres import PostgresRepository
        return PostgresRepository(_server(config.kind, config.dsn), reactor,
                                  password=password, tls=config.tls)
    if config.kind == "redis":
        with _needs_driver("redis", "redis-py"):
            from sslshare.repository.redis import RedisRepository
        return RedisRepository(config.url, reactor, password=password,
                               tls=config.tls, cluster=config.cluster,
                               sentinels=config.sentinels,
                               service=config.service,
                               wait_replicas=config.wait_replicas)
    raise RepositoryError(f"unknown repository kind {config.kind!r}")
