"""
What every repository backend shares: the contract (L{ISessionRepository}),
what a take answers, the checks of what storage gives back, the order of
one session's operations, and the threaded base the backends build on.
The package's docstring says what is true of every backend.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar, cast

import attrs
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredLock,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

from sslshare import sessionid
from sslshare.state import (
    MAX_SEALED_LENGTH,
    SEALED_CHECKPOINT_LENGTH,
    checkpoint_problem,
)


T = TypeVar("T")


class Closable(Protocol):
    """
    What the base needs of a backend's connection: that it can be closed.
    """

    def close(self) -> None: ...


Connection = TypeVar("Connection", bound=Closable)

# Seconds a connection attempt or a single command may take before it
# fails: the recovery chain waits for tens of milliseconds, so a server that
# does not answer must free its worker thread soon.
DEFAULT_TIMEOUT = 2.0
DEFAULT_THREADS = 4
COUNTERS = ("puts", "takes", "hits", "misses", "expired", "errors",
            "bad_rows", "checkpoints", "stale_checkpoints", "purges")


class RepositoryError(Exception):
    """
    A repository operation failed: its server is unreachable or refused
    it, or its file is unusable.  The message names the repository, the
    operation and the reason (never a password or a blob).
    """


class ISessionRepository(Interface):
    """
    Where sealed session states rest outside the nodes.  Every method
    returns a Deferred and never blocks the reactor.
    """

    counters = Attribute(
        "A collections.Counter of the operations and their outcomes.")

    def start() -> Deferred[None]:
        """
        Start the worker threads and prepare the storage (create the schema
        if missing; idempotent).  A server that is down now does not fail
        this call: the repository logs it and tries again on use.
        """

    def close() -> Deferred[None]:
        """
        Finish the operations in flight, close the connections, stop the
        worker threads.
        """

    def ping() -> Deferred[None]:
        """
        Fires once the storage has answered a question that changes
        nothing; fails with L{RepositoryError} when it cannot answer now
        (what a readiness probe asks).
        """

    def put(session_id: bytes, sealed: bytes, expires: float) -> Deferred[None]:
        """
        Store the sealed blob of C{session_id} until C{expires} (unix
        time), replacing any blob stored under that id.
        """

    def take(session_id: bytes) -> Deferred[Taken | None]:
        """
        Read and delete the blob of C{session_id} and its checkpoint in one
        atomic step.

        @return: what was taken, or C{None} when there is no blob, it
            expired, it is malformed, or another caller took it first.
        """

    def checkpoint(session_id: bytes, seq: int, digest: bytes) -> Deferred[bool]:
        """
        Record that the session's first C{seq} records hash to C{digest}
        (sealed: L{sslshare.state.StateKeys.seal_checkpoint}, which the
        repository stores as it is and never checks), if C{seq} is higher
        than the stored one and the blob is live.

        @return: whether it was recorded.
        """

    def checkpoint_of(session_id: bytes) -> Deferred[tuple[int, bytes] | None]:
        """
        The stored C{(seq, sealed digest)} of a live blob (C{(0, b"")}
        before the first checkpoint), or C{None} when there is no live blob.
        """

    def purge(session_id: bytes) -> Deferred[bool]:
        """
        Delete the blob of C{session_id}; whether there was one.
        """

    def expire() -> Deferred[int]:
        """
        Delete the expired blobs; how many.  The node calls it now and
        then; a backend whose server expires keys by itself returns 0.
        """


@attrs.frozen
class Outcome:
    """
    What a worker thread found, for the reactor thread to count and log:
    C{kind} is C{"hit"} (C{value} is the result), C{"miss"}, C{"expired"}
    or C{"bad"} (C{value} says what was wrong with the stored row).
    """

    kind: str
    value: Any = attrs.field(default=None, repr=False)


MISS = Outcome("miss")
EXPIRED = Outcome("expired")


@attrs.frozen
class Taken:
    """
    What a C{take} got: the sealed blob, and the checkpoint stored beside
    it (C{(0, b"")} before the first), which may be newer than the one
    sealed in the blob.

    @ivar expires: the unix time the row would have ended at, which a node
        that cannot use the blob puts it back with; not compared: two takes
        of the same row are equal whenever they were made.
    """

    sealed: bytes = attrs.field(repr=False)
    seq: int = 0
    digest: bytes = attrs.field(default=b"", repr=False)
    expires: float = attrs.field(default=math.inf, eq=False)


def taken_outcome(sealed: object, seq: object, digest: object,
                  expires: float) -> Outcome:
    """
    The outcome of a take that found a live row: a hit, or what is wrong
    with the row.
    """
    problem = sealed_problem(sealed) or stored_checkpoint_problem(seq, digest)
    if problem is not None:
        return Outcome("bad", problem)
    # The checks have found bytes, an int and bytes.
    return Outcome("hit", Taken(cast(bytes, sealed), cast(int, seq),
                                cast(bytes, digest), expires))


class InOrder:
    """
    Runs the operations asked for one key one after another, in the order
    they were asked, and those of different keys independently.

    A caller that cancels an operation still waiting for its turn takes it
    out of the line: it never runs.  One that cancels an operation already
    running stops waiting for its answer; the next in line waits until it
    has really finished.
    """

    def __init__(self) -> None:
        self._lines: dict[bytes, DeferredLock] = {}

    def __len__(self) -> int:
        """
        How many keys have an operation running.
        """
        return len(self._lines)

    def run(self, key: bytes,
            operation: Callable[[], Deferred[T]]) -> Deferred[T]:
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = DeferredLock()
        running = False

        def cancel(answer: Deferred[T]) -> None:
            if not running:
                turn.cancel()

        answer: Deferred[T] = Deferred(cancel)

        def finished(result: Any) -> None:
            line.release()
            # The release may have run the next operation in line to its
            # end already, and that one forgot the line.
            if not line.locked and self._lines.get(key) is line:
                del self._lines[key]
            if not answer.called:
                if isinstance(result, Failure):
                    answer.errback(result)
                else:
                    answer.callback(result)

        def go(_: object) -> None:
            nonlocal running
            running = True
            maybeDeferred(operation).addBoth(finished)

        turn = line.acquire()
        turn.addCallbacks(go, lambda reason: reason.trap(CancelledError))
        return answer


def sealed_problem(sealed: object) -> str | None:
    """
    What is wrong with a blob read back from storage, or C{None}.
    """
    if not isinstance(sealed, bytes):
        return f"the blob is a {type(sealed).__name__}, not bytes"
    if not 0 < len(sealed) <= MAX_SEALED_LENGTH:
        return f"the blob is {len(sealed)} bytes (1..{MAX_SEALED_LENGTH} expected)"
    return None


def stored_checkpoint_problem(seq: object, digest: object) -> str | None:
    """
    What is wrong with a checkpoint given to or read back from storage,
    sealed (L{sslshare.state.StateKeys.seal_checkpoint}), or C{None}.
    """
    return checkpoint_problem(seq, digest, SEALED_CHECKPOINT_LENGTH)


def id_problem(found: object, wanted: bytes) -> str | None:
    """
    What is wrong with a session id read back from storage for C{wanted},
    or C{None}.
    """
    if not isinstance(found, bytes):
        return f"the session id is a {type(found).__name__}, not bytes"
    if len(found) != sessionid.SESSION_ID_LENGTH:
        return (f"the session id is {len(found)} bytes "
                f"({sessionid.SESSION_ID_LENGTH} expected)")
    if found != wanted:
        return "the row is filed under another session id"
    return None


def as_bytes(value: object) -> object:
    """
    C{value} as C{bytes} when a driver returned a buffer type for a binary
    column; anything else unchanged, for the checks to reject.
    """
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return value


def read_secret_file(path: str) -> str:
    """
    The password in the file at C{path}: its first line, without the line
    end.

    @raise RepositoryError: the file cannot be read or is not UTF-8.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RepositoryError(f"password file {path}: cannot read: "
                              f"{e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RepositoryError(f"password file {path}: not UTF-8") from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise RepositoryError(f"password file {path}: the first line is empty")
    return lines[0]


def _argument_problem(session_id: object) -> str | None:
    if not isinstance(session_id, bytes):
        return f"session id must be bytes, not {type(session_id).__name__}"
    if len(session_id) != sessionid.SESSION_ID_LENGTH:
        return (f"session id must be {sessionid.SESSION_ID_LENGTH} bytes, "
                f"not {len(session_id)}")
    return None


@implementer(ISessionRepository)
class ThreadedRepository(Generic[Connection]):
    """
    What the backends share: the worker threads, one connection per worker
    thread, argument checks, counters and logs.  A backend implements the
    C{_do_*} methods, which run in a worker thread, and L{_connect},
    L{_disconnect} and L{_driver_errors}.

    @ivar counters: C{puts}, C{takes}, C{hits} (takes that got a blob),
        C{misses} (takes that got C{None}, whatever the reason),
        C{expired} (blobs a take found expired, plus those C{expire}
        removed), C{errors} (operations that failed), C{bad_rows}
        (malformed rows discarded), C{checkpoints} (accepted),
        C{stale_checkpoints} (refused: not higher, or no live blob),
        C{purges} (blobs purged).
    """

    _log = Logger()
    kind = "?"

    def __init__(self, reactor: Any, *, threads: int = DEFAULT_THREADS,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        self._reactor = reactor
        self.timeout = timeout
        self.threads = threads
        self.counters: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self._pool: ThreadPool | None = None
        self._start_waiters: list[Deferred[None]] | None = None
        self._local = threading.local()
        self._connections_lock = threading.Lock()
        self._connections: list[Connection] = []
        self._shutdown_trigger: Any = None
        self._in_order = InOrder()

    # -- naming ------------------------------------------------------------

    def describe(self) -> str:
        """
        Which repository this is, for messages: kind and target, never a
        password.
        """
        return self.kind

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    # -- life cycle --------------------------------------------------------

    def start(self) -> Deferred[None]:
        if self._pool is not None:
            return fail(RepositoryError(f"{self.describe()}: already started"))
        self._pool = ThreadPool(minthreads=0, maxthreads=self.threads,
                                name=f"sslshare-repository-{self.kind}")
        self._pool.start()
        # A node that never calls close must still let the process exit:
        # the workers are not daemon threads.
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "during", "shutdown", self._stop_pool)
        # Calls made before the schema exists wait for it: a node starts
        # serving (and writing sessions) without waiting for its repository.
        self._start_waiters = []
        started = self._call("start", self._do_start)
        started.addErrback(self._start_failed)
        started.addBoth(self._started)
        return started

    def _started(self, result: Any) -> Any:
        waiters, self._start_waiters = self._start_waiters, None
        for waiter in waiters or ():
            waiter.callback(None)
        return result

    def _start_failed(self, reason: Failure) -> Failure | None:
        if self._start_must_succeed():
            self._shut_down()
            return reason
        self._log.warn("{repository} cannot be used yet ({why}); every call "
                       "will try again", repository=self.describe(),
                       why=reason.getErrorMessage())
        return None

    def _start_must_succeed(self) -> bool:
        # A server may be down when a node starts, and come back later; a
        # local file that cannot be opened is a configuration error.
        return False

    def close(self) -> Deferred[None]:
        self._shut_down()
        return succeed(None)

    def _shut_down(self) -> None:
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        # Blocks while the operations already queued finish; every one is
        # bounded by the driver timeouts, as adbapi's close is.
        self._stop_pool()

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            self._disconnect(connection)
        self._local = threading.local()

    # -- worker threads ----------------------------------------------------

    def _connect(self) -> Connection:
        """
        Open a connection (in a worker thread).
        """
        raise NotImplementedError

    def _disconnect(self, connection: Connection) -> None:
        """
        Close C{connection}, ignoring the driver's errors (any thread): a
        connection being dropped is usually broken already.
        """
        try:
            connection.close()
        except self._driver_errors():
            pass

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        """
        The exception types of the driver that become L{RepositoryError}.
        """
        raise NotImplementedError

    def _is_broken(self, connection: Connection, error: BaseException) -> bool:
        """
        Whether C{error} left C{connection} unusable, so that it must be
        replaced (and a call on it that had been idle may be retried once).
        """
        return True

    def _connection(self) -> tuple[Connection, bool]:
        """
        This worker thread's connection, made if missing; and whether it
        is fresh.
        """
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            return connection, False
        connection = self._connect()
        self._local.connection = connection
        with self._connections_lock:
            self._connections.append(connection)
        return connection, True

    def _drop_connection(self, connection: Connection) -> None:
        self._local.connection = None
        with self._connections_lock:
            if connection in self._connections:
                self._connections.remove(connection)
        self._disconnect(connection)

    def _with_connection(self, operation: str,
                         function: Callable[..., T], *arguments: Any) -> T:
        """
        Run C{function(connection, *arguments)} in this worker thread.  A
        connection that broke is replaced; when it had been idle (its
        server may have restarted since) the call is tried once more on a
        fresh one.  A take tried again cannot serve a blob twice: at worst
        the first attempt deleted it and the second finds nothing.
        """
        errors = self._driver_errors()
        for attempt in (1, 2):
            try:
                connection, fresh = self._connection()
            except errors as e:
                raise RepositoryError(
                    f"{self.describe()}: {operation}: cannot connect: "
                    f"{_one_line(e)}") from e
            try:
                return function(connection, *arguments)
            except errors as e:
                broken = self._is_broken(connection, e)
                if broken:
                    self._drop_connection(connection)
                if broken and not fresh and attempt == 1:
                    continue
                raise RepositoryError(
                    f"{self.describe()}: {operation}: {_one_line(e)}") from e
        raise AssertionError("unreachable")

    def _call(self, operation: str, function: Callable[..., T],
              *arguments: Any) -> Deferred[T]:
        if self._pool is None:
            return fail(RepositoryError(
                f"{self.describe()}: {operation}: not started"))
        if self._start_waiters is not None and operation != "start":
            waiting: Deferred[None] = Deferred()
            self._start_waiters.append(waiting)
            return waiting.addCallback(
                lambda _: self._call(operation, function, *arguments))
        called = deferToThreadPool(self._reactor, self._pool,
                                   self._with_connection, operation, function,
                                   *arguments)
        called.addErrback(self._failed, operation)
        return called

    def _for_session(self, session_id: bytes, operation: str,
                     function: Callable[..., T], *arguments: Any) -> Deferred[T]:
        """
        L{_call} C{function(connection, session_id, *arguments)} once the
        operations asked before for C{session_id} have finished.
        """
        return self._in_order.run(session_id, lambda: self._call(
            operation, function, session_id, *arguments))

    def _failed(self, reason: Failure, operation: str) -> Failure:
        self.counters["errors"] += 1
        return reason

    def _discarded(self, outcome: Outcome, session_id: bytes) -> None:
        self.counters["bad_rows"] += 1
        self._log.warn("{repository} discarded the malformed row of session "
                       "{session}: {why}", repository=self.describe(),
                       session=sessionid.describe(session_id),
                       why=outcome.value)

    # -- the operations ----------------------------------------------------

    def _now(self) -> float:
        return float(self._reactor.seconds())

    def ping(self) -> Deferred[None]:
        return self._call("ping", self._do_ping)

    def put(self, session_id: bytes, sealed: bytes,
            expires: float) -> Deferred[None]:
        problem = _argument_problem(session_id) or sealed_problem(sealed)
        if problem is None and (isinstance(expires, bool)
                                or not isinstance(expires, (int, float))
                                or not math.isfinite(expires)):
            problem = "expires must be a finite number"
        if problem is not None:
            return fail(ValueError(f"put: {problem}"))
        self.counters["puts"] += 1
        return self._for_session(session_id, "put", self._do_put, sealed,
                                 float(expires), self._now())

    def take(self, session_id: bytes) -> Deferred[Taken | None]:
        problem = _argument_problem(session_id)
        if problem is not None:
            return fail(ValueError(f"take: {problem}"))
        self.counters["takes"] += 1
        taken = self._for_session(session_id, "take", self._do_take,
                                  self._now())
        return taken.addCallback(self._taken, session_id)

    def _taken(self, outcome: Outcome, session_id: bytes) -> Taken | None:
        if outcome.kind == "hit":
            self.counters["hits"] += 1
            return outcome.value
        if outcome.kind == "bad":
            self._discarded(outcome, session_id)
        elif outcome.kind == "expired":
            self.counters["expired"] += 1
        self.counters["misses"] += 1
        return None

    def checkpoint(self, session_id: bytes, seq: int,
                   digest: bytes) -> Deferred[bool]:
        problem = _argument_problem(session_id)
        if problem is None:
            problem = stored_checkpoint_problem(seq, digest)
        if problem is not None:
            return fail(ValueError(f"checkpoint: {problem}"))
        recorded = self._for_session(session_id, "checkpoint",
                                     self._do_checkpoint, seq, digest,
                                     self._now())
        return recorded.addCallback(self._checkpointed)

    def _checkpointed(self, accepted: bool) -> bool:
        self.counters["checkpoints" if accepted else "stale_checkpoints"] += 1
        return accepted

    def checkpoint_of(self, session_id: bytes
                      ) -> Deferred[tuple[int, bytes] | None]:
        problem = _argument_problem(session_id)
        if problem is not None:
            return fail(ValueError(f"checkpoint_of: {problem}"))
        found = self._for_session(session_id, "checkpoint_of",
                                  self._do_checkpoint_of, self._now())
        return found.addCallback(self._checkpoint_found, session_id)

    def _checkpoint_found(self, outcome: Outcome,
                          session_id: bytes) -> tuple[int, bytes] | None:
        if outcome.kind == "hit":
            return outcome.value
        if outcome.kind == "bad":
            self._discarded(outcome, session_id)
        return None

    def purge(self, session_id: bytes) -> Deferred[bool]:
        problem = _argument_problem(session_id)
        if problem is not None:
            return fail(ValueError(f"purge: {problem}"))
        purged = self._for_session(session_id, "purge", self._do_purge)
        return purged.addCallback(self._purged)

    def _purged(self, removed: bool) -> bool:
        if removed:
            self.counters["purges"] += 1
        return removed

    def expire(self) -> Deferred[int]:
        expired = self._call("expire", self._do_expire, self._now())
        return expired.addCallback(self._expired)

    def _expired(self, count: int) -> int:
        self.counters["expired"] += count
        return count

    # -- what a backend implements (worker threads) ------------------------

    def _do_start(self, connection: Connection) -> None:
        """
        Prepare the storage: make the schema if it is missing.
        """
        raise NotImplementedError

    def _do_ping(self, connection: Connection) -> None:
        """
        Ask the storage a question that changes nothing.
        """
        raise NotImplementedError

    def _do_put(self, connection: Connection, session_id: bytes, sealed: bytes,
                expires: float, now: float) -> None:
        """
        Store C{sealed} until C{expires}, over any blob of C{session_id},
        keeping the stored checkpoint.
        """
        raise NotImplementedError

    def _do_take(self, connection: Connection, session_id: bytes,
                 now: float) -> Outcome:
        """
        Delete the row of C{session_id} and read it in one atomic step: a
        hit with its L{Taken}, a miss, expired, or what is wrong with it.
        """
        raise NotImplementedError

    def _do_checkpoint(self, connection: Connection, session_id: bytes, seq: int,
                       digest: bytes, now: float) -> bool:
        """
        Store the checkpoint if C{seq} is above the stored one and the blob
        is live, in one atomic compare-and-set; whether it did.
        """
        raise NotImplementedError

    def _do_checkpoint_of(self, connection: Connection, session_id: bytes,
                          now: float) -> Outcome:
        """
        The stored C{(seq, digest)} of a live blob as a hit, a miss, or
        what is wrong with it (the row is deleted then).
        """
        raise NotImplementedError

    def _do_purge(self, connection: Connection, session_id: bytes) -> bool:
        """
        Delete the row of C{session_id}; whether there was one.
        """
        raise NotImplementedError

    def _do_expire(self, connection: Connection, now: float) -> int:
        """
        Delete the rows expired by C{now}; how many (0 where the storage
        expires them by itself).
        """
        raise NotImplementedError


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
