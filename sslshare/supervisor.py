"""
Worker processes of one host, kept running: L{WorkerSupervisor}.

The supervisor starts C{count} copies of one command, each with the file
descriptors C{inherited} names for its index (its own listening socket on
the host's one address, the host's shared session table,
L{sslshare.hoststore}) and its index in C{SSLSHARE_WORKER}.  The caller
owns those descriptors and keeps them open while the supervisor runs.

Each worker gets a socket of its own, bound with C{SO_REUSEPORT}
(L{reuseport_sockets}), so that the kernel spreads connections over the
workers by a hash of each connection's addresses.  Workers that share one
listening socket do not share the load: Linux wakes the waiter that waited
last, so one worker takes nearly every connection (measured here: one
worker of two answered 200 connections out of 200).  Since the caller
keeps every socket open, a connection that arrives while its worker is
being started again waits in that socket's backlog rather than being
refused.  A descriptor handed down as a listening socket is described to
the worker as systemd describes one (C{LISTEN_FDS}, C{LISTEN_FDNAMES}, and
C{LISTEN_PID} set to the worker's own pid by a shell that then execs the
command), so a worker reads it with Twisted's C{systemd:} endpoint.

A worker that dies is started again under the same index after
C{restart_delay} seconds; one that dies within C{STABLE_AFTER} seconds of
its start waits twice as long as the one before it of its index (up to
C{MAX_RESTART_DELAY}), so that a command that cannot start does not spin.
What a worker writes to its standard output and error, its log, the
supervisor logs line by line, each line naming the worker: the host's log
is one, written by one process (processes that share a log file would
write over each other's lines).
L{WorkerSupervisor.signal} passes a signal on to every worker; stopping the
service sends SIGTERM to every worker, restarts none, and fires once all
have ended, sending SIGKILL to any still running after C{stop_timeout}
seconds.

This module knows nothing of sessions, TLS or configuration: it runs
processes.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

WORKER_VARIABLE = "SSLSHARE_WORKER"
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 10.0
_FIRST_INHERITED = 3
# The pid is only known in the child: a shell sets it, then execs.
_WITH_LISTEN_PID = ("/bin/sh", "-c", 'LISTEN_PID=$$ exec "$0" "$@"')

# Bytes of a worker's output kept while its line goes on: past it, the
# line is logged in pieces.
MAX_LINE = 64 * 1024

COUNTERS = ("started", "restarts", "exits")
"""Every counter of L{WorkerSupervisor.counters}."""


@attrs.frozen
class Inherited:
    """
    A file descriptor a worker inherits: C{fd} in the supervisor, and
    C{name}, its C{LISTEN_FDNAMES} entry when C{listening}.
    """

    fd: int
    name: str
    listening: bool = True


def reuseport_sockets(host: str, port: int, count: int,
                      backlog: int = 511) -> list[socket.socket]:
    """
    C{count} TCP sockets listening on C{host}:C{port} together, each with
    C{SO_REUSEPORT}: port 0 picks one free port for all of them.  An
    address that another process's sockets of C{SO_REUSEPORT} listen on
    already (a second copy of the same node, say) is refused, as a plain
    listener's is: the kernel would let the two groups share the
    connections.

    @raise OSError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        with socket.socket(family, socket.SOCK_STREAM) as alone:
            alone.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            alone.bind((host, port))
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            listening = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(listening)
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listening.bind((host, port))
            port = listening.getsockname()[1]
            listening.listen(backlog)
    except OSError:
        for listening in sockets:
            listening.close()
        raise
    return sockets


class _Worker(ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int,
                 started: float) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = started
        self.ended: Deferred[None] = Deferred()
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        *lines, rest = (self._partial.get(childFD, b"") + data).split(b"\n")
        if len(rest) > MAX_LINE:
            lines.append(rest)
            rest = b""
        self._partial[childFD] = rest
        for line in lines:
            self.supervisor._relay(self.index, childFD, line)

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in self._partial.items():
            if rest:
                self.supervisor._relay(self.index, childFD, rest)
        self.supervisor._ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(Service):
    """
    Keeps C{count} workers running C{command}; C{reactor} starts them and
    C{clock} times their restarts (the same reactor, but for tests).

    @ivar counters: workers C{started}, C{restarts} (started again after
        one died), C{exits} (every end, a stop's included).
    """

    log = Logger()

    def __init__(self, reactor: IReactorProcess, clock: IReactorTime,
                 command: Sequence[str], count: int,
                 inherited: Callable[[int], Sequence[Inherited]] = (
                     lambda index: ()),
                 environment: Mapping[str, str] | None = None,
                 restart_delay: float = 1.0,
                 stop_timeout: float = 30.0) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        self._reactor = reactor
        self._clock = clock
        self._command = tuple(command)
        self.count = count
        self._inherited = inherited
        self._environment = dict(os.environ if environment is None
                                 else environment)
        self._restart_delay = restart_delay
        self._stop_timeout = stop_timeout
        self._workers: dict[int, _Worker] = {}
        self._delays: dict[int, float] = {}
        self._pending: dict[int, IDelayedCall] = {}
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))

    @property
    def pids(self) -> dict[int, int]:
        """
        The pid of each running worker, by index.
        """
        return {index: worker.transport.pid
                for index, worker in self._workers.items()
                if worker.transport is not None
                and worker.transport.pid is not None}

    def startService(self) -> None:
        super().startService()
        for index in range(self.count):
            self._start(index)

    def _start(self, index: int) -> None:
        self._pending.pop(index, None)
        environment = dict(self._environment)
        environment[WORKER_VARIABLE] = str(index)
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        inherited = tuple(self._inherited(index))
        listening = [item for item in inherited if item.listening]
        # systemd's rule: the listening sockets come first, from fd 3.
        if inherited[:len(listening)] != tuple(listening):
            raise ValueError("the listening sockets must come first")
        for number, item in enumerate(inherited, _FIRST_INHERITED):
            child_fds[number] = item.fd
        command = self._command
        if listening:
            environment["LISTEN_FDS"] = str(len(listening))
            environment["LISTEN_FDNAMES"] = ":".join(
                item.name for item in listening)
            command = (*_WITH_LISTEN_PID, *command)
        worker = _Worker(self, index, self._clock.seconds())
        self._workers[index] = worker
        self._reactor.spawnProcess(worker, command[0], command,
                                   env=environment, childFDs=child_fds)
        self.counters["started"] += 1

    def _relay(self, index: int, childFD: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if not text:
            return
        if childFD == 2:
            self.log.warn("worker {index}: {line}", index=index, line=text)
        else:
            self.log.info("worker {index}: {line}", index=index, line=text)

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        self.counters["exits"] += 1
        if self._workers.get(worker.index) is worker:
            del self._workers[worker.index]
        if not self.running:
            return
        lived = self._clock.seconds() - worker.started
        delay = self._delays.get(worker.index, self._restart_delay)
        delay = (min(delay * 2, MAX_RESTART_DELAY) if lived < STABLE_AFTER
                 else self._restart_delay)
        self._delays[worker.index] = delay
        self.log.warn("worker {index} ended ({reason}); starting it again "
                      "in {delay:.1f} s", index=worker.index,
                      reason=reason.getErrorMessage(), delay=delay)
        self.counters["restarts"] += 1
        self._pending[worker.index] = self._clock.callLater(
            delay, self._start, worker.index)

    def signal(self, name: str) -> None:
        """
        Send signal C{name} (C{"HUP"}, C{"TERM"}, ...) to every running
        worker.
        """
        for worker in list(self._workers.values()):
            try:
                if worker.transport is not None:
                    worker.transport.signalProcess(name)
            except ProcessExitedAlready:
                pass

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for pending in self._pending.values():
            pending.cancel()
        self._pending.clear()
        ending = [worker.ended for worker in self._workers.values()]
        self.signal("TERM")
        deadline = self._clock.callLater(self._stop_timeout,
                                           self.signal, "KILL")
        done: Deferred[None] = DeferredList(ending).addCallback(
            lambda _: None)

        def ended(result: None) -> None:
            if deadline.active():
                deadline.cancel()
            return result

        return done.addCallback(ended)

