"""
The running digest of a session's records, and the pipeline that
checkpoints it outside the node.

A session's state is its key, its id, and a digest of every record
exchanged under it.  L{RunningDigest} is that digest: a SHA-256 chain with
one step per TLS application-data record, in either direction, in the order
the node saw them.  Anyone holding the plaintext records can recompute it
(L{verify_transcript}, behind C{sslshare digest verify}).

Encoding, version 1.  Integers are unsigned, big-endian, fixed width;
C{||} is concatenation:

    h_0 = SHA-256("sslshare digest v1" || 0x00 || session_id || exporter)
        session_id: the 32-byte sslshare session id
        exporter:   32 bytes, the TLS exporter (RFC 5705 / RFC 8446 7.5) of
                    the connection that begins the chain, with label
                    "EXPORTER-sslshare-digest" and the session id as its
                    context (L{exporter}); it binds h_0 to that connection's
                    keys without putting a key into the chain

    h_n = SHA-256(h_{n-1} || direction || seq || length || plaintext)
        direction: 1 byte, 0 client to server, 1 server to client
        seq:       8 bytes, n: the record's number, 1 for the first record
                   of the session, counting both directions
        length:    4 bytes, the plaintext's length, 1..16384
        plaintext: the record's application data

The checkpoint after record n is the pair (n, h_n): "the digest covers n
records"; a session state with seq 0 holds no digest (nothing is covered).
A connection whose session holds no digest yet (a new session, or one
resumed before any of its checkpoints reached the cluster) begins the chain
at h_0, with its own session id and exporter.  A connection that resumes a
session holding a checkpoint, on this node or another, continues the chain
from it (L{RunningDigest.resume}), not from h_0: records of the previous
connection after its last checkpoint the cluster holds are not in the
chain.

What a record is.  OpenSSL's C{SSL_read} returns the plaintext of at most
one record per call (no read pipelining), and with
C{SSL_MODE_ENABLE_PARTIAL_WRITE}, which L{sslshare.tls} sets, C{SSL_write}
returns after one record; so one step per successful C{recv} and one per
successful C{send} of the engine is one step per record.  OpenSSL never
returns an empty record's plaintext, and the encoding has none.

L{CheckpointPipeline} carries the checkpoints of one session to whatever
stores them outside the node (a peer, the repository: a C{write} callable
it is given), asynchronously:

    - at most one write in flight per session; a checkpoint that arrives
      while one is in flight waits, and a newer one replaces the waiting one
      (counted as C{coalesced}): only the newest is worth writing;
    - it never reorders: every write carries a higher seq than the one
      before it (a failed write may be retried with the same seq, never a
      lower one), and stores accept only a higher seq anyway;
    - a write that fails or times out is counted (C{failed}) and logged at
      a limited rate; the next checkpoint retries it naturally, and if none
      comes, the newest is retried after a growing delay;
    - back-pressure: when the records the store has not yet answered for
      exceed a bound, the pipeline calls C{pause} (the connection stops
      reading); it calls C{resume} when they fall under half the bound.  A
      slow store slows the connection only past the bound, and only while
      it answers: a failed write skips the records it stood for (a store
      that is down, refuses or fails never stops traffic, however slowly
      it fails), and a pause
      ends after C{max_pause} seconds whatever the store does (counted as
      C{pauses_cut}); the pipeline pauses again only once the store has
      answered since;
    - a flush (the connection is closing) hands the newest checkpoint,
      if it waits behind a write in flight, to C{keep} at once: the
      holder's own copy, which a peer may fetch before the store answers;
    - modes: C{every-record} writes as fast as the store answers;
      C{interval} writes the newest checkpoint once per period at most;
      C{off} writes nothing.

This module does no I/O of its own and knows nothing of TLS beyond the
C{export_keying_material} call in L{exporter}.  Digests are not secrets,
but a digest confirms a guess of the plaintext: they never go into a log or
a C{repr}.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from sslshare import sessionid
from sslshare.logs import RateLimitedWarning
from sslshare.state import DIGEST_LENGTH, MAX_SEQ
from sslshare.hooks import CLIENT_TO_SERVER, SERVER_TO_CLIENT

EXPORTER_LABEL = b"EXPORTER-sslshare-digest"
EXPORTER_LENGTH = 32
SESSION_ID_LENGTH = sessionid.SESSION_ID_LENGTH
MAX_RECORD_LENGTH = 2 ** 14
DIRECTION_NAMES = {"c2s": CLIENT_TO_SERVER, "s2c": SERVER_TO_CLIENT}
MODES = ("every-record", "interval", "off")
COUNTERS = ("written", "rejected", "coalesced", "failed", "pauses",
            "pauses_cut")
"""Every counter of L{CheckpointPipeline.counters}: the stats show each,
zero included."""

_START_PREFIX = b"sslshare digest v1\0"
_STEP = struct.Struct("!BQI")
_sha256 = hashlib.sha256

# A checkpoint: (seq, digest), the digest after seq records.  (Not named
# Checkpoint: that is the cluster's AMP command.)
_Mark = tuple[int, bytes]


class _Exporting(Protocol):
    def export_keying_material(self, label: bytes, olen: int,
                               context: bytes | None = None) -> bytes: ...


def exporter(connection: _Exporting, session_id: bytes) -> bytes:
    """
    The exporter value that binds h_0 to the connection that begins the
    chain of C{session_id}: 32 bytes with label L{EXPORTER_LABEL} and the
    session id as context.  Call it once the handshake is done.
    """
    return connection.export_keying_material(EXPORTER_LABEL, EXPORTER_LENGTH,
                                             session_id)


def _check_checkpoint(seq: int, digest: bytes) -> None:
    if type(seq) is not int or not 0 < seq <= MAX_SEQ:
        raise ValueError(f"a digest's seq must be an int from 1 to {MAX_SEQ}, "
                         f"not {seq!r}")
    if type(digest) is not bytes or len(digest) != DIGEST_LENGTH:
        raise ValueError(f"a digest must be {DIGEST_LENGTH} bytes")


class ChainExhausted(ValueError):
    """
    A running digest at L{MAX_SEQ} records can take no more steps.
    """


class RunningDigest:
    """
    The SHA-256 chain of one session's records (see the module docstring).

    @ivar seq: the number of records the digest covers.
    @ivar digest: h_seq, 32 bytes.
    """

    __slots__ = ("seq", "digest")

    def __init__(self, seq: int, digest: bytes) -> None:
        # seq 0 is h_0, made by start() only; resume() checks the rest.
        self.seq = seq
        self.digest = digest

    def __repr__(self) -> str:
        return f"<RunningDigest seq={self.seq}>"

    @classmethod
    def start(cls, session_id: bytes, exporter: bytes) -> RunningDigest:
        """
        A new chain at h_0, for a session that has no digest yet.

        @param exporter: from L{exporter}, for the connection that begins
            the chain.
        @raise ValueError: C{session_id} or C{exporter} is not 32 bytes.
        """
        if type(session_id) is not bytes or len(session_id) != SESSION_ID_LENGTH:
            raise ValueError(f"session id must be {SESSION_ID_LENGTH} bytes")
        if type(exporter) is not bytes or len(exporter) != EXPORTER_LENGTH:
            raise ValueError(f"exporter value must be {EXPORTER_LENGTH} bytes")
        return cls(0, _sha256(_START_PREFIX + session_id + exporter).digest())

    @classmethod
    def resume(cls, seq: int, digest: bytes) -> RunningDigest:
        """
        The chain continued from a checkpoint: C{digest} covers C{seq}
        records (at least one).

        @raise ValueError: C{seq} is not 1..L{MAX_SEQ} or C{digest} not
            32 bytes.
        """
        _check_checkpoint(seq, digest)
        return cls(seq, digest)

    def update(self, direction: int, plaintext: bytes) -> _Mark:
        """
        One record: the chain steps to the next seq.

        @param direction: L{CLIENT_TO_SERVER} or L{SERVER_TO_CLIENT}.
        @param plaintext: the record's application data, 1..16384 bytes
            (C{bytes}, C{bytearray} or a byte C{memoryview}).
        @return: the new (seq, digest).
        @raise ValueError: a bad direction or length; the digest is
            unchanged.
        @raise ChainExhausted: the chain covers L{MAX_SEQ} records already.
        """
        length = len(plaintext)
        if not 0 < length <= MAX_RECORD_LENGTH:
            raise ValueError(f"a record's plaintext must be 1 to "
                             f"{MAX_RECORD_LENGTH} bytes, not {length}")
        if direction != CLIENT_TO_SERVER and direction != SERVER_TO_CLIENT:
            raise ValueError(f"direction must be 0 or 1, not {direction!r}")
        if self.seq >= MAX_SEQ:
            # Only a checkpoint forged or replayed to the bound gets here.
            raise ChainExhausted(f"the digest chain covers {MAX_SEQ} records, "
                                 f"its bound")
        seq = self.seq + 1
        step = _sha256(self.digest)
        step.update(_STEP.pack(direction, seq, length))
        step.update(plaintext)
        self.seq = seq
        self.digest = digest = step.digest()
        return seq, digest


class TranscriptError(ValueError):
    """
    A recorded transcript is not valid.

    @ivar line: the 1-based line number at fault (0 when the transcript as a
        whole is).
    @ivar reason: what is wrong with it.
    """

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}" if line else reason)
        self.line = line
        self.reason = reason


# A 16 KiB record is 32 KiB of hex; leave room for the rest of the line.
_MAX_LINE_LENGTH = 2 * MAX_RECORD_LENGTH + 1024
_TRANSCRIPT_KEYS = frozenset(("direction", "record"))
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


def _transcript_record(number: int, line: str) -> tuple[int, bytes]:
    if len(line) > _MAX_LINE_LENGTH:
        raise TranscriptError(number, f"line longer than {_MAX_LINE_LENGTH} "
                              "characters")
    try:
        entry = json.loads(line)
    except ValueError as e:
        raise TranscriptError(number, f"not JSON: {e}") from None
    if not isinstance(entry, dict):
        raise TranscriptError(number, "not a JSON object")
    missing = _TRANSCRIPT_KEYS - entry.keys()
    if missing:
        raise TranscriptError(number, f"missing {', '.join(sorted(missing))}")
    unknown = entry.keys() - _TRANSCRIPT_KEYS
    if unknown:
        raise TranscriptError(
            number, f"unknown key {', '.join(repr(k) for k in sorted(unknown))}")
    direction = entry["direction"]
    if not isinstance(direction, str) or direction not in DIRECTION_NAMES:
        raise TranscriptError(
            number, f'direction must be "c2s" or "s2c", not {direction!r:.40}')
    record = entry["record"]
    if not isinstance(record, str):
        raise TranscriptError(
            number, f"record must be a hex string, not {type(record).__name__}")
    # Strict: bytes.fromhex would also take spaces.
    if not _HEX.fullmatch(record):
        raise TranscriptError(
            number, "record is not hex (an even number of 0-9a-f digits)")
    plaintext = bytes.fromhex(record)
    if not 0 < len(plaintext) <= MAX_RECORD_LENGTH:
        raise TranscriptError(
            number, f"record must be 1 to {MAX_RECORD_LENGTH} bytes, "
            f"not {len(plaintext)}")
    return DIRECTION_NAMES[direction], plaintext


def verify_transcript(
    lines: Iterable[str],
    *,
    session_id: bytes | None = None,
    exporter: bytes | None = None,
    start_seq: int | None = None,
    start_digest: bytes | None = None,
    until_seq: int | None = None,
) -> _Mark:
    """
    Recompute a digest from a recorded transcript.

    The transcript is JSON lines, one record each, in the order the node
    saw them: C{{"direction": "c2s" | "s2c", "record": "<hex plaintext>"}};
    blank lines are skipped.  The chain begins either at h_0 (C{session_id}
    and C{exporter}: the transcript starts at the session's first record)
    or at a checkpoint (C{start_seq} and C{start_digest}: the transcript
    starts at the record after it).

    @param until_seq: stop after the record with this seq, to compare with
        a checkpoint older than the end of the transcript.
    @return: the (seq, digest) after the last record read.
    @raise TranscriptError: a line is not a valid record (the message names
        its line number), or the transcript ends before C{until_seq}.
    @raise ValueError: not exactly one way to begin was given, or its
        values are not valid.
    """
    from_start = session_id is not None or exporter is not None
    from_checkpoint = start_seq is not None or start_digest is not None
    if from_start == from_checkpoint:
        raise ValueError("give either session_id and exporter, or start_seq "
                         "and start_digest")
    if from_start:
        if session_id is None or exporter is None:
            raise ValueError("session_id and exporter go together")
        chain = RunningDigest.start(session_id, exporter)
    else:
        if start_seq is None or start_digest is None:
            raise ValueError("start_seq and start_digest go together")
        chain = RunningDigest.resume(start_seq, start_digest)
    if until_seq is not None and until_seq < chain.seq:
        raise ValueError(f"until_seq {until_seq} is before the start, "
                         f"seq {chain.seq}")
    if until_seq == chain.seq:
        return chain.seq, chain.digest
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        direction, plaintext = _transcript_record(number, line)
        chain.update(direction, plaintext)
        if chain.seq == until_seq:
            break
    if until_seq is not None and chain.seq < until_seq:
        raise TranscriptError(0, f"the transcript ends at seq {chain.seq}, "
                              f"before seq {until_seq}")
    return chain.seq, chain.digest


def _positive(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"checkpoint {attribute.name} must be a positive "
                         f"number, not {value!r}")


def _bound(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if type(value) is not int or value < 1:
        raise ValueError(f"checkpoint bound must be a positive int, "
                         f"not {value!r}")


def _mode(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value not in MODES:
        raise ValueError(f"checkpoint mode must be one of {', '.join(MODES)}, "
                         f"not {value!r}")


@attrs.frozen
class CheckpointPolicy:
    """
    How a node checkpoints its sessions' digests.

    @ivar mode: C{"every-record"}, C{"interval"} or C{"off"}.
    @ivar period: seconds between writes in C{interval} mode.
    @ivar bound: records the store may leave unanswered before the
        connection is paused; it resumes under half of it.
    @ivar timeout: seconds a write may take before it counts as failed.
    @ivar max_pause: seconds a connection stays paused for the store at
        most; then it goes on, and is paused again only after the store
        has answered.
    @ivar retry_initial: seconds before the newest checkpoint is written
        again after a failure, when no newer one came; it doubles with
        every failure in a row, up to C{retry_max}.
    """

    mode: str = attrs.field(default="every-record", validator=_mode)
    period: float = attrs.field(default=1.0, validator=_positive)
    bound: int = attrs.field(default=64, validator=_bound)
    timeout: float = attrs.field(default=5.0, validator=_positive)
    max_pause: float = attrs.field(default=0.25, validator=_positive)
    retry_initial: float = attrs.field(default=0.25, validator=_positive)
    retry_max: float = attrs.field(default=5.0, validator=_positive)


class FailureLog(RateLimitedWarning):
    """
    Warnings for failed checkpoint writes, at most one per C{interval}
    seconds however many sessions fail: a store outage fails every session
    at once.  A node shares one among its pipelines.
    """

    def failed(self, session_id: bytes, seq: int, reason: Failure) -> None:
        self.warn("checkpoint {seq} of session {session} failed: {why}",
                  seq=seq, session=sessionid.describe(session_id),
                  why=reason.getErrorMessage() or reason.type.__name__)

    def pause_cut(self, session_id: bytes, seconds: float) -> None:
        self.warn("session {session}: the checkpoint store did not answer "
                  "in {seconds} s, its connection goes on",
                  session=sessionid.describe(session_id), seconds=seconds)


Write = Callable[[bytes, int, bytes], "Deferred[bool] | bool"]


class CheckpointPipeline:
    """
    The checkpoints of one session on their way to the store (see the
    module docstring).

    @ivar session_id: the id the checkpoints are written under.
    @ivar counters: C{written} (the store accepted), C{rejected} (the store
        answered no: it no longer holds the session, or holds a newer
        seq), C{coalesced} (replaced by a newer checkpoint before being
        written), C{failed} (errors and timeouts), C{pauses},
        C{pauses_cut} (pauses ended at C{max_pause}).  Pass one
        C{Counter} to all of a node's pipelines to count for the node.
    @ivar last_acknowledged: the newest checkpoint the store accepted, or
        the one the pipeline started from.
    @ivar paused: whether the pipeline holds the connection paused.
    """

    def __init__(
        self,
        session_id: bytes,
        write: Write,
        clock: IReactorTime,
        policy: CheckpointPolicy = CheckpointPolicy(),
        *,
        start: tuple[int, bytes] = (0, b""),
        pause: Callable[[], object] | None = None,
        resume: Callable[[], object] | None = None,
        counters: Counter[str] | None = None,
        failure_log: FailureLog | None = None,
        keep: Callable[[bytes, int, bytes], object] | None = None,
    ) -> None:
        """
        @param write: called as C{write(session_id, seq, digest)}; returns
            (a L{Deferred} of) whether the store accepted it.
        @param keep: called as C{keep(session_id, seq, digest)} with the
            newest checkpoint when a flush finds it still waiting behind a
            write in flight: the holder's own copy takes it at once, so
            that a peer fetching the session before the store answers
            continues the chain from the connection's last record.
        @param start: the checkpoint the cluster already holds for the
            session (a resumed session), or C{(0, b"")}.
        @param pause: called when the backlog passes the bound.
        @param resume: called when it falls back under half the bound.
        """
        self.session_id = session_id
        self._write = write
        self._keep = keep
        self._clock = clock
        self.policy = policy
        self._pause = pause
        self._resume = resume
        self.counters: Counter[str] = Counter() if counters is None else counters
        self._failure_log = failure_log or FailureLog(clock)
        self.last_acknowledged: _Mark = start
        self.paused = False
        self._newest_seq = start[0]
        # Enqueued and not yet handed to write(); at most one.
        self._waiting: _Mark | None = None
        self._in_flight: _Mark | None = None
        # The store should hold this seq by now (the newest in every-record
        # mode; the newest at the last tick or flush in interval mode), and
        # has answered for this one, or a write up to this one failed:
        # their gap is the backlog.
        self._due_seq = start[0]
        self._overdue_seq = start[0]
        self._answered_seq = start[0]
        self._skipped_seq = start[0]
        # The connection was paused for max_pause and the store has not
        # answered since: no pause until it does.
        self._unanswering = False
        self._pause_limit: IDelayedCall | None = None
        self._send_when_free = False
        self._tick: IDelayedCall | None = None
        self._retry: IDelayedCall | None = None
        self._retry_delay = policy.retry_initial
        self._flushes: list[tuple[int, Deferred[bool]]] = []
        self._stopped = False

    def __repr__(self) -> str:
        return (f"<CheckpointPipeline {sessionid.describe(self.session_id)} "
                f"{self.policy.mode} newest={self._newest_seq} "
                f"acknowledged={self.last_acknowledged[0]}>")

    @property
    def backlog(self) -> int:
        """
        Records the store should have answered for by now and has not: in
        every-record mode all that are due; in interval mode those due at
        an earlier tick than the last, so that a store that keeps up with
        the period never pauses the connection.
        """
        return self._overdue_seq - max(self._answered_seq, self._skipped_seq)

    def enqueue(self, seq: int, digest: bytes) -> None:
        """
        The digest now covers C{seq} records: checkpoint it (or let a newer
        one replace it).  Cheap enough for every record.

        @raise ValueError: C{seq} is not above the newest enqueued.
        @raise RuntimeError: the pipeline was stopped.
        """
        if self._stopped:
            raise RuntimeError("checkpoint pipeline is stopped")
        if seq <= self._newest_seq:
            raise ValueError(f"checkpoint seq {seq} is not above the newest, "
                             f"{self._newest_seq}")
        mode = self.policy.mode
        if mode == "off":
            self._newest_seq = seq
            return
        self._newest_seq = seq
        if self._waiting is not None:
            self.counters["coalesced"] += 1
        self._waiting = (seq, digest)
        if mode == "every-record":
            self._due_seq = self._overdue_seq = seq
            if self._in_flight is None:
                self._send()
            self._check_pressure()
        elif self._tick is None:
            self._tick = self._clock.callLater(self.policy.period, self._ticked)

    def flush(self) -> Deferred[bool]:
        """
        Write the newest checkpoint now (interval mode: without waiting
        for the period) and wait for the store.

        @return: fires with C{True} once the store accepted the newest
            checkpoint enqueued before this call (at once if nothing is
            owed, as in C{off} mode), or C{False} if the store refused it
            or the pipeline is stopped first.  Failed writes are retried
            meanwhile: add a timeout.  Cancelling stops the wait only.
        """
        target = self._newest_seq
        if self.policy.mode == "off" or self.last_acknowledged[0] >= target:
            return succeed(True)
        if self._stopped or self._answered_seq >= target:
            # Stopped, or the store answered no for it already.
            return succeed(False)

        def cancel(d: Deferred[bool]) -> None:
            self._flushes.remove((target, d))

        waiter: Deferred[bool] = Deferred(cancel)
        self._flushes.append((target, waiter))
        if self._waiting is not None:
            if self._keep is not None:
                self._keep(self.session_id, *self._waiting)
            self._due_seq = target
            self._send_soon()
            self._check_pressure()
        return waiter

    def stop(self) -> None:
        """
        No more checkpoints: cancel the timers and answer waiting flushes
        with C{False}.  A write in flight finishes on its own.  The
        connection is left as it is (the caller is closing it).
        """
        if self._stopped:
            return
        self._stopped = True
        for call in (self._tick, self._retry, self._pause_limit):
            if call is not None and call.active():
                call.cancel()
        self._tick = self._retry = self._pause_limit = None
        self._waiting = None
        flushes, self._flushes = self._flushes, []
        for _, waiter in flushes:
            waiter.callback(False)

    # Writing.

    def _send_soon(self) -> None:
        """
        Send the waiting checkpoint as soon as no write is in flight.
        """
        if self._in_flight is None:
            self._send()
        else:
            self._send_when_free = True

    def _send(self) -> None:
        if self._retry is not None:
            if self._retry.active():
                self._retry.cancel()
            self._retry = None
        if self._tick is not None:
            if self._tick.active():
                self._tick.cancel()
            self._tick = None
        self._send_when_free = False
        checkpoint = self._in_flight = self._waiting
        assert checkpoint is not None
        self._waiting = None
        seq, digest = checkpoint
        writing = maybeDeferred(self._write, self.session_id, seq, digest)
        if not writing.called:
            # A store that answers at once needs no timer.
            writing.addTimeout(self.policy.timeout, self._clock)
        writing.addCallbacks(self._answered, self._failed,
                             callbackArgs=(checkpoint,),
                             errbackArgs=(checkpoint,))

    def _answered(self, accepted: object, checkpoint: _Mark) -> None:
        self._in_flight = None
        self._unanswering = False
        self._retry_delay = self.policy.retry_initial
        seq = checkpoint[0]
        self._answered_seq = max(self._answered_seq, seq)
        if accepted:
            self.counters["written"] += 1
            if seq > self.last_acknowledged[0]:
                self.last_acknowledged = checkpoint
        else:
            self.counters["rejected"] += 1
        if self._flushes:
            done = [w for w in self._flushes if w[0] <= seq]
            self._flushes = [w for w in self._flushes if w[0] > seq]
            for _, waiter in done:
                waiter.callback(bool(accepted))
        self._next()

    def _failed(self, reason: Failure, checkpoint: _Mark) -> None:
        self._in_flight = None
        self.counters["failed"] += 1
        self._failure_log.failed(self.session_id, checkpoint[0], reason)
        if self._stopped:
            return
        # A store that cannot be written is no reason to hold the client:
        # these records go without a checkpoint unless a retry makes one,
        # a pause for them ends, and a store that failed has not answered:
        # no pause for it until it answers again.
        self._skipped_seq = max(self._skipped_seq, checkpoint[0])
        self._unanswering = True
        if self.paused:
            self._go_on()
        if self._waiting is None:
            # Nothing newer will retry it: do it after a while.
            self._waiting = checkpoint
            self._retry = self._clock.callLater(self._retry_delay, self._retried)
            self._retry_delay = min(2 * self._retry_delay, self.policy.retry_max)
            self._check_pressure()
        else:
            self._next()

    def _next(self) -> None:
        if self._stopped:
            return
        if self._waiting is not None and self._retry is None:
            if self.policy.mode == "every-record" or self._send_when_free:
                self._send()
            elif self._tick is None:
                self._tick = self._clock.callLater(self.policy.period,
                                                   self._ticked)
        self._check_pressure()

    def _retried(self) -> None:
        self._retry = None
        if self._waiting is not None and self._in_flight is None:
            self._send()

    def _ticked(self) -> None:
        self._tick = None
        if self._waiting is not None:
            self._overdue_seq = self._due_seq
            self._due_seq = self._waiting[0]
            if self._retry is None:
                self._send_soon()
            self._check_pressure()

    def _check_pressure(self) -> None:
        if self._stopped:
            return
        backlog = self.backlog
        if not self.paused:
            if backlog > self.policy.bound and not self._unanswering:
                self.paused = True
                self.counters["pauses"] += 1
                self._pause_limit = self._clock.callLater(
                    self.policy.max_pause, self._pause_too_long)
                if self._pause is not None:
                    self._pause()
        elif 2 * backlog < self.policy.bound:
            self._go_on()

    def _pause_too_long(self) -> None:
        self._pause_limit = None
        self._unanswering = True
        self.counters["pauses_cut"] += 1
        self._failure_log.pause_cut(self.session_id, self.policy.max_pause)
        self._go_on()

    def _go_on(self) -> None:
        if self._pause_limit is not None:
            if self._pause_limit.active():
                self._pause_limit.cancel()
            self._pause_limit = None
        self.paused = False
        if self._resume is not None:
            self._resume()
