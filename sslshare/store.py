"""
The node's own sessions, in memory: L{SessionStore}.

One ordered dict, least recently used first, maps a session id to either
the state the node holds or a tombstone: where the session went when
another node took it, so that a third node asking here can be sent on.  A
session id has one or the other, never both.  Every operation on one id is
O(1); only L{SessionStore.expire}, the periodic sweep, walks the whole dict.

The store is bounded in bytes.  A session costs the length of its DER plus
L{ENTRY_OVERHEAD}, a tombstone costs L{TOMBSTONE_OVERHEAD}: estimates of
what CPython 3.11 (64-bit) really spends on the id, the object, its other
fields and the dict entry, measured with C{tracemalloc} (about 280 bytes for
a session besides its DER, 340 with a digest; about 200 for a tombstone).
Past C{max_bytes} the least recently used entries go first, sessions and
tombstones alike (a session is used when it is put, read or checkpointed; a
tombstone when it is written).  Expiry goes by the clock given, so that
tests drive it with L{twisted.internet.task.Clock}: a session expires at its
C{expires}, a tombstone at its C{until}.

This module makes no remote calls and no I/O, and logs nothing.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import attrs
from twisted.internet.interfaces import IReactorTime

from sslshare.state import SessionState

ENTRY_OVERHEAD = 352
TOMBSTONE_OVERHEAD = 200


@attrs.frozen
class _Tombstone:
    holder: str
    until: float


def _cost(entry: SessionState | _Tombstone) -> int:
    if isinstance(entry, _Tombstone):
        return TOMBSTONE_OVERHEAD
    return len(entry.der) + ENTRY_OVERHEAD


class SessionStore:
    """
    The node's own sessions: LRU + TTL, bounded in bytes, with tombstones
    naming where a taken session went.

    @ivar counters: sessions C{stored}, C{taken}, C{expired} (found past
        their lifetime, or put already expired), C{evicted} (to make room),
        C{discarded} (purged); and C{tombstones} written.
    """

    def __init__(self, max_bytes: int, clock: IReactorTime) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[bytes, SessionState | _Tombstone] = OrderedDict()
        self._sessions = 0
        self._bytes = 0
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        """
        The number of sessions held (tombstones not included).
        """
        return self._sessions

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def _add(self, session_id: bytes, entry: SessionState | _Tombstone) -> None:
        self._remove(session_id)
        self._entries[session_id] = entry
        self._bytes += _cost(entry)
        if isinstance(entry, SessionState):
            self._sessions += 1
        while self._bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            if isinstance(self._remove(oldest), SessionState):
                self.counters["evicted"] += 1

    def _remove(self, session_id: bytes) -> SessionState | _Tombstone | None:
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            self._bytes -= _cost(entry)
            if isinstance(entry, SessionState):
                self._sessions -= 1
        return entry

    def _live(self, session_id: bytes) -> SessionState | None:
        """
        The unexpired session under C{session_id}, now the most recently
        used; an expired one is dropped.
        """
        entry = self._entries.get(session_id)
        if not isinstance(entry, SessionState):
            return None
        if entry.expired(self._clock.seconds()):
            self._remove(session_id)
            self.counters["expired"] += 1
            return None
        self._entries.move_to_end(session_id)
        return entry

    def put(self, state: SessionState) -> None:
        """
        Hold C{state}, in place of anything under its id, evicting the least
        recently used entries past C{max_bytes}.  A state already expired,
        or too large for the whole store, is not kept.
        """
        if state.expired(self._clock.seconds()):
            self._remove(state.session_id)
            self.counters["expired"] += 1
            return
        if len(state.der) + ENTRY_OVERHEAD > self.max_bytes:
            self._remove(state.session_id)
            self.counters["evicted"] += 1
            return
        self._add(state.session_id, state)
        self.counters["stored"] += 1

    def take(self, session_id: bytes) -> SessionState | None:
        """
        Remove and return the session, or C{None} if absent or expired.
        """
        state = self._live(session_id)
        if state is not None:
            self._remove(session_id)
            self.counters["taken"] += 1
        return state

    def get(self, session_id: bytes) -> SessionState | None:
        """
        The session, left in place, or C{None} if absent or expired.
        """
        return self._live(session_id)

    def sessions(self) -> list[SessionState]:
        """
        Every unexpired session held, least recently used first.
        """
        now = self._clock.seconds()
        return [entry for entry in self._entries.values()
                if isinstance(entry, SessionState) and not entry.expired(now)]

    def update_checkpoint(self, session_id: bytes, seq: int,
                          digest: bytes) -> bool:
        """
        Record that the digest C{digest} covers C{seq} records of the
        session, if C{seq} is above the one held: checkpoints may arrive out
        of order, and an older one must not undo a newer.

        @return: whether the checkpoint was recorded.
        @raise ValueError: C{seq} or C{digest} is not valid in a state.
        """
        state = self._live(session_id)
        if state is None or seq <= state.seq:
            return False
        # Same DER, same cost: the accounting does not change.
        self._entries[session_id] = attrs.evolve(state, seq=seq, digest=digest)
        return True

    def discard(self, session_id: bytes) -> bool:
        """
        Purge the session.  A tombstone under its id stays: it still says
        where the session went.

        @return: whether a live session was removed.
        """
        if self._live(session_id) is None:
            return False
        self._remove(session_id)
        self.counters["discarded"] += 1
        return True

    def tombstone(self, session_id: bytes, holder: str, until: float) -> None:
        """
        Remember until unix time C{until} that node C{holder} has the
        session now; a session still held under that id is dropped, since
        it lives elsewhere.
        """
        self._add(session_id, _Tombstone(holder, until))
        self.counters["tombstones"] += 1

    def holder(self, session_id: bytes) -> str | None:
        """
        The node a live tombstone names, or C{None}.
        """
        entry = self._entries.get(session_id)
        if not isinstance(entry, _Tombstone):
            return None
        if self._clock.seconds() >= entry.until:
            self._remove(session_id)
            return None
        return entry.holder

    def expire(self) -> int:
        """
        Drop every expired session and tombstone.

        @return: how many were dropped.
        """
        now = self._clock.seconds()
        dead = [
            (session_id, isinstance(entry, SessionState))
            for session_id, entry in self._entries.items()
            if (entry.expired(now) if isinstance(entry, SessionState)
                else now >= entry.until)
        ]
        for session_id, is_session in dead:
            self._remove(session_id)
            if is_session:
                self.counters["expired"] += 1
        return len(dead)
