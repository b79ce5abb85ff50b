"""
The sessions the worker processes of one host share: L{HostStore}, a table
of sealed session states in shared memory.

Every worker of a host maps the same table, so a worker resumes a session
another worker of the host made by taking it from the table, in a few
microseconds and without asking that worker anything: the kernel spreads a
client's connections over the workers at random, and a resumption on
another worker of the host must cost about what one on the same worker
does, not a round trip over a channel (see C{benchmarks/hoststore.py} for
the measurement that chose this over a socket between workers).

The table is a memfd (C{memfd_create}, L{create_table}) that the process
which starts the workers makes and hands to each as an inherited file
descriptor (L{sslshare.supervisor.Inherited}): it is in no directory, only
the processes given it can reach it, it is never written to disk, and it
goes when the last process that holds it exits.  It holds
sealed blobs (L{sslshare.state.StateKeys.seal}), as a repository does, with
the checkpoint beside each blob; sealing and opening are the caller's job.

Layout, all integers little-endian:

    offset  size  field
    0       16    magic, C{MAGIC}
    16      4     format, C{FORMAT}
    20      4     buckets
    24      4     slots per bucket
    28      4     slot size
    32      ...   zeros up to C{HEADER_SIZE}
    HEADER_SIZE   the buckets, each C{slots per bucket} slots

and one slot:

    0       32    session id; a first byte of 0 marks the slot free (an
                  sslshare session id starts with its format byte, 1)
    32      8     expires, unix time, binary64
    40      4     blob length
    44      3     zeros
    47      1     length of the sealed digest, 0 or SEALED_CHECKPOINT_LENGTH
    48      8     seq of the checkpoint stored beside the blob, 0 before
                  the first
    56      48    its sealed digest, zeros past its length
    104     ...   blob, up to slot size - SLOT_HEAD

A session id's bucket is its last 8 bytes (random) modulo the number of
buckets; a session lives in one of its bucket's slots.  Every operation
locks its bucket's byte range with C{fcntl} (C{lockf}) for the few
microseconds it reads or writes the bucket: a take reads and frees the slot
under one lock, so of any number of workers racing for a session exactly
one gets the blob.  A lock is never waited for in the kernel: a worker
tries again, yielding the CPU between tries, and after
C{LOCK_ATTEMPTS} tries gives up (counted as C{busy}; a put that gives up
leaves the session out, a take finds nothing, a full handshake), so that a
sibling stopped while holding a lock cannot hang the others.  The kernel
drops a process's locks when it dies, so a worker killed inside an
operation leaves no bucket locked.

C{fcntl} locks belong to a process, not to a file descriptor: two
L{HostStore} objects of one process never exclude each other, and closing
any descriptor of the table drops the process's locks on it.  A process
therefore opens the table once.

A put into a full bucket replaces the slot that expires first (counted as
C{evicted}); an expired slot is free for any put.  Buckets fill unevenly
(the ids' random tails spread them): with half the table's slots in use,
about 2% of the buckets are full, so a table is sized for about twice the
sessions it must hold.  A blob larger than a slot holds is not stored
(C{too_large}).  Everything read from the table is checked, since every
worker can write it: a slot whose fields are out of bounds is freed and
counted as C{bad_slots}, and reads as absent.

This module makes no network calls and logs nothing; its only I/O is the
shared mapping.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import struct
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
from twisted.internet.interfaces import IReactorTime

from sslshare import sessionid
from sslshare.state import (
    MAX_SEALED_LENGTH,
    SEALED_CHECKPOINT_LENGTH,
    checkpoint_problem,
)

MAGIC = b"sslshare hosts\0\0"
FORMAT = 1
HEADER_SIZE = 4096
SLOT_HEAD = 104
DEFAULT_SLOT_SIZE = 1024
SLOTS_PER_BUCKET = 8
LOCK_ATTEMPTS = 1000

_HEADER = struct.Struct("<16sIIII")
_SLOT = struct.Struct(f"<32sdI3xBQ{SEALED_CHECKPOINT_LENGTH}s")
_EXPIRES = struct.Struct("<d")
_CHECKPOINT_AT = 47
_CHECKPOINT = struct.Struct(f"<BQ{SEALED_CHECKPOINT_LENGTH}s")
_ID_LENGTH = sessionid.SESSION_ID_LENGTH
_FREE = bytes(_ID_LENGTH)

COUNTERS = ("puts", "takes", "hits", "misses", "expired", "evicted",
            "too_large", "busy", "bad_slots", "checkpoints",
            "stale_checkpoints", "purges")
"""Every counter of L{HostStore.counters}, zero included in the stats."""


class HostStoreError(Exception):
    """
    A file descriptor is not a host store's table, or the table cannot be
    made: the message says which and why.
    """


class HostStoreBusy(Exception):
    """
    A bucket stayed locked by another worker through every attempt.
    """


@attrs.frozen
class Shape:
    """
    The geometry of a table: C{buckets} of C{slots} slots of C{slot_size}
    bytes each.
    """

    buckets: int
    slots: int = SLOTS_PER_BUCKET
    slot_size: int = DEFAULT_SLOT_SIZE

    @classmethod
    def for_bytes(cls, max_bytes: int,
                  slot_size: int = DEFAULT_SLOT_SIZE) -> Shape:
        """
        The shape of the largest table of at most C{max_bytes} (one bucket
        at least).
        """
        bucket_bytes = SLOTS_PER_BUCKET * slot_size
        return cls(max(1, (max_bytes - HEADER_SIZE) // bucket_bytes),
                   SLOTS_PER_BUCKET, slot_size)

    @property
    def bucket_bytes(self) -> int:
        return self.slots * self.slot_size

    @property
    def size(self) -> int:
        return HEADER_SIZE + self.buckets * self.bucket_bytes

    @property
    def max_blob(self) -> int:
        return min(self.slot_size - SLOT_HEAD, MAX_SEALED_LENGTH)

    def problem(self) -> str | None:
        """
        What makes this shape unusable, or C{None}.
        """
        if not 1 <= self.buckets <= 2 ** 31:
            return f"{self.buckets} buckets (1..2**31 expected)"
        if not 1 <= self.slots <= 256:
            return f"{self.slots} slots per bucket (1..256 expected)"
        if not SLOT_HEAD + 64 <= self.slot_size <= SLOT_HEAD + MAX_SEALED_LENGTH \
                or self.slot_size % 8:
            return (f"slot size {self.slot_size} (a multiple of 8 in "
                    f"{SLOT_HEAD + 64}..{SLOT_HEAD + MAX_SEALED_LENGTH} "
                    f"expected)")
        return None


@attrs.frozen
class Entry:
    """
    What a take got from the table: the sealed blob, its expiry, and the
    checkpoint stored beside it (C{(0, b"")} before the first).
    """

    sealed: bytes = attrs.field(repr=False)
    expires: float
    seq: int = 0
    digest: bytes = attrs.field(default=b"", repr=False)


def create_table(shape: Shape) -> int:
    """
    A new, empty table of C{shape} in a memfd: its file descriptor, which
    the caller hands to the workers (it is inheritable) and closes once
    they have it.

    @raise HostStoreError: the shape is unusable or the memory cannot be
        had.
    """
    problem = shape.problem()
    if problem is not None:
        raise HostStoreError(f"host store: unusable shape: {problem}")
    try:
        fd = os.memfd_create("sslshare-hoststore", os.MFD_CLOEXEC)
    except OSError as e:
        raise HostStoreError(f"host store: memfd_create: {e.strerror}") \
            from None
    try:
        os.ftruncate(fd, shape.size)
        os.pwrite(fd, _HEADER.pack(MAGIC, FORMAT, shape.buckets, shape.slots,
                                   shape.slot_size), 0)
    except OSError as e:
        os.close(fd)
        raise HostStoreError(f"host store: cannot size {shape.size} bytes: "
                             f"{e.strerror}") from None
    os.set_inheritable(fd, True)
    return fd


def _read_shape(fd: int) -> Shape:
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, _HEADER.size, 0)
    except OSError as e:
        raise HostStoreError(f"host store: fd {fd}: {e.strerror}") from None
    if len(head) < _HEADER.size:
        raise HostStoreError(f"host store: fd {fd}: no table header")
    magic, version, buckets, slots, slot_size = _HEADER.unpack(head)
    if magic != MAGIC:
        raise HostStoreError(f"host store: fd {fd}: not a host store table")
    if version != FORMAT:
        raise HostStoreError(f"host store: fd {fd}: format {version}, "
                             f"{FORMAT} expected")
    shape = Shape(buckets, slots, slot_size)
    problem = shape.problem()
    if problem is not None:
        raise HostStoreError(f"host store: fd {fd}: {problem}")
    if size != shape.size:
        raise HostStoreError(f"host store: fd {fd}: {size} bytes, "
                             f"{shape.size} expected")
    return shape


class HostStore:
    """
    One process's view of its host's shared table of sealed sessions.

    @ivar counters: C{puts}, C{takes} (and their C{hits}, C{misses},
        C{expired}), C{evicted}, C{too_large}, C{busy} (a bucket stayed
        locked), C{bad_slots}, C{checkpoints} (and C{stale_checkpoints}),
        C{purges}.
    """

    def __init__(self, fd: int, clock: IReactorTime) -> None:
        """
        Map the table behind C{fd}, which this object owns from now on.

        @raise HostStoreError: C{fd} holds no usable table.
        """
        self.shape = _read_shape(fd)
        self._fd = fd
        self._map = mmap.mmap(fd, self.shape.size)
        self._clock = clock
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def _bucket(self, session_id: bytes) -> int:
        if len(session_id) != _ID_LENGTH or session_id[0] == 0:
            raise ValueError(f"session id must be {_ID_LENGTH} bytes, "
                             f"the first not 0")
        shape = self.shape
        return HEADER_SIZE + (int.from_bytes(session_id[-8:], "little")
                              % shape.buckets) * shape.bucket_bytes

    def _lock(self, start: int) -> None:
        length = self.shape.bucket_bytes
        for _ in range(LOCK_ATTEMPTS):
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length,
                            start)
                return
            except BlockingIOError:
                os.sched_yield()
        self.counters["busy"] += 1
        raise HostStoreBusy()

    def _unlock(self, start: int) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, self.shape.bucket_bytes, start)

    def _find(self, bucket: int, session_id: bytes) -> int | None:
        """
        The offset of the slot holding C{session_id} in the bucket at
        C{bucket}, or C{None}.  The bucket is locked.
        """
        view = self._map
        for slot in range(bucket, bucket + self.shape.bucket_bytes,
                          self.shape.slot_size):
            if view[slot:slot + _ID_LENGTH] == session_id:
                return slot
        return None

    def _free(self, slot: int) -> None:
        self._map[slot:slot + _ID_LENGTH] = _FREE

    def _read(self, slot: int) -> Entry | None:
        """
        The entry in C{slot}, or C{None} when its fields are out of bounds
        (the slot is freed and counted).
        """
        _, expires, length, digest_length, seq, digest = _SLOT.unpack_from(
            self._map, slot)
        digest = digest[:digest_length]
        if (math.isnan(expires) or not 0 < length <= self.shape.max_blob
                or checkpoint_problem(seq, digest, SEALED_CHECKPOINT_LENGTH)):
            self._free(slot)
            self.counters["bad_slots"] += 1
            return None
        start = slot + SLOT_HEAD
        return Entry(self._map[start:start + length], expires, seq, digest)

    @contextmanager
    def _locked(self, session_id: bytes) -> Iterator[int]:
        """
        The offset of C{session_id}'s bucket, locked while the block runs.

        @raise HostStoreBusy: the bucket stayed locked by another process.
        @raise ValueError: C{session_id} is not a session id.
        """
        bucket = self._bucket(session_id)
        self._lock(bucket)
        try:
            yield bucket
        finally:
            self._unlock(bucket)

    def _entry(self, bucket: int, session_id: bytes
               ) -> tuple[int, Entry] | None:
        """
        The slot of the locked bucket holding C{session_id} and what it
        holds, or C{None}.
        """
        slot = self._find(bucket, session_id)
        entry = None if slot is None else self._read(slot)
        return None if slot is None or entry is None else (slot, entry)

    def put(self, session_id: bytes, sealed: bytes, expires: float) -> bool:
        """
        Store the sealed blob of C{session_id} until C{expires} (unix time),
        in place of any blob under that id; the checkpoint of a blob
        replaced is kept (it must never go backwards).

        @return: whether it was stored (not when it is too large, already
            expired, or its bucket stayed locked).
        @raise ValueError: C{session_id} is not a session id.
        """
        self.counters["puts"] += 1
        if not 0 < len(sealed) <= self.shape.max_blob:
            self.counters["too_large"] += 1
            return False
        now = self._clock.seconds()
        if not expires > now:
            self.counters["expired"] += 1
            return False
        try:
            with self._locked(session_id) as bucket:
                found = self._entry(bucket, session_id)
                if found is None:
                    slot, seq, digest = self._place(bucket, now), 0, b""
                else:
                    slot, kept = found
                    seq, digest = kept.seq, kept.digest
                _SLOT.pack_into(self._map, slot, session_id, expires,
                                len(sealed), len(digest), seq, digest)
                start = slot + SLOT_HEAD
                self._map[start:start + len(sealed)] = sealed
        except HostStoreBusy:
            return False
        return True

    def _place(self, bucket: int, now: float) -> int:
        """
        A slot of the locked bucket to write a new session in: a free or
        expired one, else the one that expires first.
        """
        view = self._map
        soonest, soonest_at = math.inf, bucket
        for slot in range(bucket, bucket + self.shape.bucket_bytes,
                          self.shape.slot_size):
            if view[slot] == 0:
                return slot
            expires = _EXPIRES.unpack_from(view, slot + _ID_LENGTH)[0]
            if not expires > now:
                return slot
            if expires < soonest:
                soonest, soonest_at = expires, slot
        self.counters["evicted"] += 1
        return soonest_at

    def _remove(self, session_id: bytes) -> Entry | None:
        """
        Read and free the slot of C{session_id} under one lock: what it
        held, expired or not, or C{None}.

        @raise HostStoreBusy: the bucket stayed locked.
        """
        with self._locked(session_id) as bucket:
            found = self._entry(bucket, session_id)
            if found is None:
                return None
            self._free(found[0])
            return found[1]

    def take(self, session_id: bytes) -> Entry | None:
        """
        Read and free the slot of C{session_id} under one lock.

        @return: what was taken, or C{None} when there is no live blob, or
            its bucket stayed locked.
        @raise ValueError: C{session_id} is not a session id.
        """
        self.counters["takes"] += 1
        try:
            entry = self._remove(session_id)
        except HostStoreBusy:
            return None
        if entry is None:
            self.counters["misses"] += 1
            return None
        if not entry.expires > self._clock.seconds():
            self.counters["expired"] += 1
            return None
        self.counters["hits"] += 1
        return entry

    def checkpoint(self, session_id: bytes, seq: int, digest: bytes) -> bool:
        """
        Record the sealed checkpoint C{digest} covering C{seq} records
        beside the live blob of C{session_id}, if C{seq} is above the one
        stored.

        @return: whether it was recorded (not when its bucket stayed
            locked).
        @raise ValueError: an argument is out of bounds.
        """
        problem = checkpoint_problem(seq, digest, SEALED_CHECKPOINT_LENGTH)
        if problem is not None:
            raise ValueError(problem)
        try:
            with self._locked(session_id) as bucket:
                found = self._entry(bucket, session_id)
                recorded = (found is not None and found[1].seq < seq
                            and found[1].expires > self._clock.seconds())
                if found is not None and recorded:
                    _CHECKPOINT.pack_into(self._map, found[0] + _CHECKPOINT_AT,
                                          len(digest), seq, digest)
        except HostStoreBusy:
            return False
        self.counters["checkpoints" if recorded else "stale_checkpoints"] += 1
        return recorded

    def checkpoint_of(self, session_id: bytes) -> tuple[int, bytes] | None:
        """
        The checkpoint stored beside the live blob of C{session_id}
        (C{(0, b"")} before the first), or C{None} when there is no live
        blob or its bucket stayed locked.
        """
        try:
            with self._locked(session_id) as bucket:
                found = self._entry(bucket, session_id)
        except HostStoreBusy:
            return None
        if found is None or not found[1].expires > self._clock.seconds():
            return None
        return found[1].seq, found[1].digest

    def expire(self) -> int:
        """
        Free every slot whose session has expired, one bucket locked at a
        time; how many (a bucket that stayed locked is left for the next
        time).
        """
        now = self._clock.seconds()
        view = self._map
        freed = 0
        for bucket in range(HEADER_SIZE, self.shape.size,
                            self.shape.bucket_bytes):
            try:
                self._lock(bucket)
            except HostStoreBusy:
                continue
            try:
                for slot in range(bucket, bucket + self.shape.bucket_bytes,
                                  self.shape.slot_size):
                    if view[slot] != 0 and not _EXPIRES.unpack_from(
                            view, slot + _ID_LENGTH)[0] > now:
                        self._free(slot)
                        freed += 1
            finally:
                self._unlock(bucket)
        self.counters["expired"] += freed
        return freed

    def purge(self, session_id: bytes) -> bool:
        """
        Free the slot of C{session_id}; whether there was one (not when
        its bucket stayed locked).
        """
        try:
            if self._remove(session_id) is None:
                return False
        except HostStoreBusy:
            return False
        self.counters["purges"] += 1
        return True
