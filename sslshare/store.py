"""
The node's own sessions, in memory: L{SessionStore}.

One ordered dict, least recently used first, maps a session id to either
the session the node holds or a tombstone: where the session went when
another node took it, so that a third node asking here can be sent on.  A
session id has one or the other, never both.  Every operation on one id is
O(1); only L{SessionStore.expire}, the periodic sweep, walks the whole dict.

A node may hold millions of sessions, so each is one bytes object, its
record, rather than a L{SessionState} and the objects of its fields (about
150 bytes less a session); the store turns a record back into a state,
checked field by field by its constructor, when one is read:

    offset  size  field
    0       8     expires, unix time, binary64
    8       8     created, the same
    16      8     seq
    24      4     the number of its (session id context, holder) pair
    28      4     moves
    32      1     d: digest length, 0 or 32
    33      d     digest
    33+d    ...   DER

in native byte order.  The session id is the dict's key; the id context and
holder, which many sessions share, are numbered in a table the store keeps
while a session uses them.  A checkpoint rewrites the record's head and
digest without making a state.  A tombstone is a bytes object of its own
type: the unix time it ends at, binary64, the session's move count when it
left, 4 bytes, then the holder's node id in UTF-8.

The store is bounded in bytes.  A session costs the length of its DER plus
L{ENTRY_OVERHEAD}, a tombstone costs L{TOMBSTONE_OVERHEAD}: estimates of
what CPython 3.11 (64-bit) really spends on the id, the record or tombstone
and the dict entry, measured with C{tracemalloc} (for a session besides its
DER, about 220 to 235 bytes without a digest and 250 to 265 with one; for a
tombstone, 220 to 235; the dict's share depends on how full its table is).
Past C{max_bytes} the least recently used entries go first, sessions and
tombstones alike (a session is used when it is put, read or checkpointed; a
tombstone when it is written).  Expiry goes by the clock given, so that
tests drive it with L{twisted.internet.task.Clock}: a session expires at its
C{expires}, a tombstone at its C{until}.

This module makes no remote calls and no I/O, and logs nothing.
"""

from __future__ import annotations

import struct
from collections import Counter, OrderedDict

from twisted.internet.interfaces import IReactorTime

from sslshare.state import SessionState, checkpoint_problem

ENTRY_OVERHEAD = 264
TOMBSTONE_OVERHEAD = 232

# Sessions and tombstones both start with the unix time they end at.
_ENDS = struct.Struct("=d")
_HEAD = struct.Struct("=ddQIIB")
_TOMBSTONE_HEAD = struct.Struct("=dI")
_DIGEST_AT = _HEAD.size


class _Tombstone(bytes):
    """
    Where a taken session went: the unix time the tombstone ends at, the
    session's move count then, and the holder's node id in UTF-8.  A type
    of its own, so that a tombstone is never read as a session record.
    """

    __slots__ = ()

    @classmethod
    def of(cls, holder: str, until: float, moves: int) -> _Tombstone:
        return cls(_TOMBSTONE_HEAD.pack(until, moves) + holder.encode("utf-8"))

    @property
    def holder(self) -> str:
        return self[_TOMBSTONE_HEAD.size:].decode("utf-8")

    @property
    def moves(self) -> int:
        return _TOMBSTONE_HEAD.unpack_from(self)[1]


_Context = tuple[bytes, str, str | None]


class _Contexts:
    """
    The (session id context, holder, node its copy was written to) of the
    sessions held, each numbered once while a session uses it: a node has
    a few services and knows a few nodes, so a few serve every session.
    """

    def __init__(self) -> None:
        self._numbers: dict[_Context, int] = {}
        self._pairs: list[_Context] = []
        self._uses: list[int] = []
        self._free: list[int] = []

    def __getitem__(self, number: int) -> _Context:
        return self._pairs[number]

    def __len__(self) -> int:
        return len(self._numbers)

    def acquire(self, id_context: bytes, holder: str,
                copy_at: str | None = None) -> int:
        """
        The number of the context, counting one more session that uses it.
        """
        pair = (id_context, holder, copy_at)
        number = self._numbers.get(pair)
        if number is None:
            if self._free:
                number = self._free.pop()
                self._pairs[number] = pair
            else:
                number = len(self._pairs)
                self._pairs.append(pair)
                self._uses.append(0)
            self._numbers[pair] = number
        self._uses[number] += 1
        return number

    def release(self, number: int) -> None:
        """
        Count one session less that uses context C{number}; a context no
        session uses is forgotten.
        """
        self._uses[number] -= 1
        if not self._uses[number]:
            del self._numbers[self._pairs[number]]
            self._free.append(number)


def _der_length(record: bytes) -> int:
    return len(record) - _DIGEST_AT - record[_DIGEST_AT - 1]


def _cost(entry: bytes) -> int:
    if type(entry) is _Tombstone:
        return TOMBSTONE_OVERHEAD
    return _der_length(entry) + ENTRY_OVERHEAD


COUNTERS = ("stored", "taken", "expired", "evicted", "discarded",
            "tombstones")
"""Every counter of L{SessionStore.counters}: the stats show each, zero
included."""


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
        # A session record is a plain bytes, a tombstone a _Tombstone.
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._contexts = _Contexts()
        self._sessions = 0
        self._bytes = 0
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))

    def __len__(self) -> int:
        """
        The number of sessions held (tombstones not included).
        """
        return self._sessions

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def _add(self, session_id: bytes, entry: bytes) -> None:
        self._remove(session_id)
        self._entries[session_id] = entry
        self._bytes += _cost(entry)
        if type(entry) is bytes:
            self._sessions += 1
        while self._bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            if type(self._remove(oldest)) is bytes:
                self.counters["evicted"] += 1

    def _remove(self, session_id: bytes) -> bytes | None:
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            self._bytes -= _cost(entry)
            if type(entry) is bytes:
                self._sessions -= 1
                self._contexts.release(_HEAD.unpack_from(entry)[3])
        return entry

    def _live(self, session_id: bytes) -> bytes | None:
        """
        The record of the unexpired session under C{session_id}, now the
        most recently used; an expired one is dropped.
        """
        record = self._entries.get(session_id)
        if type(record) is not bytes:
            return None
        if self._clock.seconds() >= _ENDS.unpack_from(record)[0]:
            self._remove(session_id)
            self.counters["expired"] += 1
            return None
        self._entries.move_to_end(session_id)
        return record

    def _record(self, state: SessionState) -> bytes:
        context = self._contexts.acquire(state.id_context, state.holder)
        return b"".join((
            _HEAD.pack(state.expires, state.created, state.seq, context,
                       state.moves, len(state.digest)),
            state.digest, state.der))

    def _state(self, session_id: bytes, record: bytes) -> SessionState:
        # The constructor checks every field again, as a decoder should.
        expires, created, seq, context, moves, digest_length = (
            _HEAD.unpack_from(record))
        id_context, holder, _ = self._contexts[context]
        der_at = _DIGEST_AT + digest_length
        return SessionState(
            session_id=session_id, id_context=id_context, der=record[der_at:],
            holder=holder, created=created, expires=expires, seq=seq,
            digest=record[_DIGEST_AT:der_at], moves=moves)

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
        self._add(state.session_id, self._record(state))
        self.counters["stored"] += 1

    def take(self, session_id: bytes) -> SessionState | None:
        """
        Remove and return the session, or C{None} if absent or expired.
        """
        record = self._live(session_id)
        if record is None:
            return None
        state = self._state(session_id, record)
        self._remove(session_id)
        self.counters["taken"] += 1
        return state

    def get(self, session_id: bytes) -> SessionState | None:
        """
        The session, left in place, or C{None} if absent or expired.
        """
        record = self._live(session_id)
        return None if record is None else self._state(session_id, record)

    def held_by(self, session_id: bytes) -> str | None:
        """
        The holder a live session under C{session_id} names, or C{None}:
        cheaper than L{get}, which rebuilds the whole state.
        """
        kept = self.holder_and_seq(session_id)
        return None if kept is None else kept[0]

    def holder_and_seq(self, session_id: bytes) -> tuple[str, int] | None:
        """
        The holder a live session under C{session_id} names and how many
        records its checkpoint covers, or C{None}: cheaper than L{get}.
        """
        record = self._live(session_id)
        if record is None:
            return None
        head = _HEAD.unpack_from(record)
        return self._contexts[head[3]][1], head[2]

    def note_copy(self, session_id: bytes, node_id: str | None) -> None:
        """
        Remember that this node, the session's holder, wrote its copy to
        node C{node_id} (L{copy_at}); C{None}: it may be anywhere.
        """
        record = self._live(session_id)
        if record is None:
            return
        head = list(_HEAD.unpack_from(record))
        id_context, holder, _ = self._contexts[head[3]]
        number = self._contexts.acquire(id_context, holder, node_id)
        self._contexts.release(head[3])
        head[3] = number
        self._entries[session_id] = _HEAD.pack(*head) + record[_HEAD.size:]

    def copy_at(self, session_id: bytes) -> str | None:
        """
        The node this node last wrote the live session's copy to
        (L{note_copy}), or C{None}: unknown, or not written here.
        """
        record = self._live(session_id)
        if record is None:
            return None
        return self._contexts[_HEAD.unpack_from(record)[3]][2]

    def sessions(self) -> list[SessionState]:
        """
        Every unexpired session held, least recently used first.
        """
        now = self._clock.seconds()
        return [self._state(session_id, entry)
                for session_id, entry in self._entries.items()
                if type(entry) is bytes and now < _ENDS.unpack_from(entry)[0]]

    def update_checkpoint(self, session_id: bytes, seq: int,
                          digest: bytes) -> bool:
        """
        Record that the digest C{digest} covers C{seq} records of the
        session, if C{seq} is above the one held: checkpoints may arrive out
        of order, and an older one must not undo a newer.

        @return: whether the checkpoint was recorded.
        @raise ValueError: C{seq} or C{digest} is not valid in a state.
        """
        record = self._live(session_id)
        if record is None:
            return False
        expires, created, held, context, moves, digest_length = (
            _HEAD.unpack_from(record))
        if seq <= held:
            return False
        problem = checkpoint_problem(seq, digest)
        if problem is not None:
            raise ValueError(problem)
        # Same DER, same cost: the accounting does not change.
        self._entries[session_id] = b"".join((
            _HEAD.pack(expires, created, seq, context, moves, len(digest)),
            digest,
            record[_DIGEST_AT + digest_length:]))
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

    def tombstone(self, session_id: bytes, holder: str, until: float,
                  moves: int = 0) -> None:
        """
        Remember until unix time C{until} that node C{holder} has the
        session now, and that it had moved C{moves} times when it left;
        a session still held under that id is dropped, since it lives
        elsewhere.
        """
        self._add(session_id, _Tombstone.of(holder, until, moves))
        self.counters["tombstones"] += 1

    def move_tombstone(self, session_id: bytes, holder: str,
                       successor: str) -> bool:
        """
        Make the live tombstone that names C{holder} name C{successor}, the
        node C{holder} gave the session to: whoever asks here is sent to
        where the session is, not to where it was.

        @return: whether there was such a tombstone.
        """
        entry = self._tombstone(session_id)
        if entry is None or entry.holder != holder:
            return False
        self._entries[session_id] = _Tombstone.of(
            successor, _ENDS.unpack_from(entry)[0], entry.moves)
        return True

    def _tombstone(self, session_id: bytes) -> _Tombstone | None:
        entry = self._entries.get(session_id)
        if type(entry) is not _Tombstone:
            return None
        if self._clock.seconds() >= _ENDS.unpack_from(entry)[0]:
            self._remove(session_id)
            return None
        return entry

    def holder(self, session_id: bytes) -> str | None:
        """
        The node a live tombstone names, or C{None}.
        """
        entry = self._tombstone(session_id)
        return None if entry is None else entry.holder

    def moves_seen(self, session_id: bytes) -> int | None:
        """
        The move count a live tombstone recorded, or C{None}: a copy of
        the session at or below it is an old one.
        """
        entry = self._tombstone(session_id)
        return None if entry is None else entry.moves

    def expire(self) -> int:
        """
        Drop every expired session and tombstone.

        @return: how many were dropped.
        """
        now = self._clock.seconds()
        ends = _ENDS.unpack_from
        dead = [(session_id, type(entry) is bytes)
                for session_id, entry in self._entries.items()
                if now >= ends(entry)[0]]
        for session_id, is_session in dead:
            self._remove(session_id)
            if is_session:
                self.counters["expired"] += 1
        return len(dead)
