"""
The table of sealed sessions the worker processes of one host share
(L{sslshare.hoststore.HostStore}), as the repository of each worker's node:
L{TableRepository}.

A worker's node writes every session it makes to the table, takes one it
holds from the table before it resumes it, and takes a sibling's from it,
exactly as nodes do with a central repository (L{sslshare.recovery}): the
table's take (read and free under one bucket lock) is the repository's
atomic take, so of the host's workers exactly one holds a session at a
time, and the checkpoint rests beside the blob.  The table answers in
microseconds from shared memory, so every operation runs in the reactor's
thread and returns a Deferred that has already fired.

The table is the host's: it lives while any worker maps it, and a worker
that dies leaves its sessions in it for the worker started in its place,
or any sibling, to take.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from sslshare.hoststore import HostStore
from sslshare.repository._base import ISessionRepository, RepositoryError, Taken


@implementer(ISessionRepository)
class TableRepository:
    """
    The host's shared table as an L{ISessionRepository}.

    @ivar counters: the table's (L{sslshare.hoststore.COUNTERS}).
    """

    def __init__(self, table: HostStore) -> None:
        self.table = table

    @property
    def counters(self) -> Counter[str]:
        return self.table.counters

    def start(self) -> Deferred[None]:
        return succeed(None)

    def close(self) -> Deferred[None]:
        # The table stays mapped until the process ends: it is the host's,
        # and the sessions a stopping worker handed over to it stay there
        # for its siblings.
        return succeed(None)

    def ping(self) -> Deferred[None]:
        return succeed(None)

    def put(self, session_id: bytes, sealed: bytes,
            expires: float) -> Deferred[None]:
        if not self.table.put(session_id, sealed, expires):
            return fail(RepositoryError(
                "host table: put: not stored (too large for a slot, expired, "
                "or its bucket stayed locked)"))
        return succeed(None)

    def take(self, session_id: bytes) -> Deferred[Taken | None]:
        entry = self.table.take(session_id)
        if entry is None:
            return succeed(None)
        return succeed(Taken(entry.sealed, entry.seq, entry.digest,
                             entry.expires))

    def checkpoint(self, session_id: bytes, seq: int,
                   digest: bytes) -> Deferred[bool]:
        return succeed(self.table.checkpoint(session_id, seq, digest))

    def checkpoint_of(self, session_id: bytes
                      ) -> Deferred[tuple[int, bytes] | None]:
        return succeed(self.table.checkpoint_of(session_id))

    def purge(self, session_id: bytes) -> Deferred[bool]:
        return succeed(self.table.purge(session_id))

    def expire(self) -> Deferred[int]:
        return succeed(self.table.expire())
