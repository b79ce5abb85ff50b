"""
L{sslshare.supervisor.WorkerSupervisor} with real worker processes: each a
small Twisted program that serves on its own listening socket of one
address, which the supervisor bound with SO_REUSEPORT and handed down (read with Twisted's C{systemd:} endpoint, as a node
reads one) and answers every connection with its index, pid, how many
SIGHUPs it has had, and the first bytes of the shared table it inherited.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import textwrap

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from sslshare import hoststore
from sslshare.supervisor import (
    MAX_RESTART_DELAY,
    STABLE_AFTER,
    Inherited,
    WorkerSupervisor,
    reuseport_sockets,
)
from tests.support.waiting import until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = textwrap.dedent("""
    import os, signal, sys
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory, Protocol
    hups = []
    signal.signal(signal.SIGHUP, lambda *_: hups.append(1))
    table = os.pread(4, 16, 0)

    class Answer(Protocol):
        def connectionMade(self):
            self.transport.write(b"%s %d %d %s" % (
                os.environ["SSLSHARE_WORKER"].encode(), os.getpid(),
                len(hups), table.rstrip(b"\\0")))
            self.transport.loseConnection()

    serverFromString(reactor, "systemd:domain=INET:index=0").listen(
        Factory.forProtocol(Answer))
    reactor.run()
""")


def ask(port: int) -> tuple[int, int, int, bytes]:
    """
    What one worker answers a connection to C{port}: index, pid, SIGHUPs
    had, the table's magic.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        answer = b""
        while chunk := s.recv(256):
            answer += chunk
    index, pid, hups, magic = answer.split(b" ", 3)
    return int(index), int(pid), int(hups), magic


class SupervisorTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self):
        sockets = reuseport_sockets("127.0.0.1", 0, 2)
        for listening in sockets:
            self.addCleanup(listening.close)
        self.port = sockets[0].getsockname()[1]
        table = hoststore.create_table(hoststore.Shape(1))
        self.addCleanup(os.close, table)
        self.supervisor = WorkerSupervisor(
            reactor, reactor, (sys.executable, "-c", _WORKER), 2,
            lambda index: [
                Inherited(sockets[index].fileno(), "sslshare.socket"),
                Inherited(table, "hoststore", listening=False)],
            environment={"PYTHONPATH": ROOT}, restart_delay=0.1,
            stop_timeout=10)
        self.supervisor.startService()
        self.addCleanup(self.stop)
        yield self.answers(lambda seen: len(seen) == 2)

    def stop(self):
        if self.supervisor.running:
            return self.supervisor.stopService()

    @inlineCallbacks
    def answers(self, enough, tries=200):
        """
        Ask the address until the answers seen, by worker index, are
        C{enough}; the answers.
        """
        seen = {}
        for _ in range(tries):
            index, pid, hups, magic = yield deferToThread(ask, self.port)
            seen[index] = (pid, hups, magic)
            if enough(seen):
                return seen
        self.fail(f"answers never enough: {seen}")

    def test_every_worker_serves_the_one_address(self):
        pids = self.supervisor.pids
        self.assertEqual(sorted(pids), [0, 1])
        self.assertEqual(len(set(pids.values())), 2)

    @inlineCallbacks
    def test_every_worker_inherits_the_shared_table(self):
        seen = yield self.answers(lambda seen: len(seen) == 2)
        self.assertEqual({magic for _, _, magic in seen.values()},
                         {hoststore.MAGIC.rstrip(b"\0")})

    @inlineCallbacks
    def test_killed_worker_is_started_again_and_serves(self):
        killed = self.supervisor.pids[1]
        os.kill(killed, signal.SIGKILL)
        yield until(lambda: self.supervisor.pids.get(1, killed)
                         != killed, timeout=10)
        again = self.supervisor.pids[1]
        seen = yield self.answers(lambda seen: seen.get(1, (0,))[0] == again)
        self.assertNotEqual(seen[1][0], killed)
        self.assertEqual(self.supervisor.counters["restarts"], 1)

    @inlineCallbacks
    def test_connections_wait_while_a_worker_starts_again(self):
        """
        The supervisor keeps a dead worker's socket open: the connections
        the kernel gives it while it is started again wait and are served,
        none is refused.
        """
        killed = self.supervisor.pids[1]
        os.kill(killed, signal.SIGKILL)
        # Once it has ended: a connection it had accepted would be reset.
        yield until(lambda: self.supervisor.counters["exits"] == 1)
        answers = yield gatherResults(
            [deferToThread(ask, self.port) for _ in range(20)])
        self.assertEqual({index for index, _, _, _ in answers}, {0, 1})
        self.assertNotIn(killed, {pid for _, pid, _, _ in answers})

    @inlineCallbacks
    def test_signal_reaches_every_worker(self):
        self.supervisor.signal("HUP")
        seen = yield self.answers(
            lambda seen: len(seen) == 2
            and all(hups == 1 for _, hups, _ in seen.values()))
        self.assertEqual(len(seen), 2)

    @inlineCallbacks
    def test_stop_ends_every_worker_and_starts_none(self):
        pids = self.supervisor.pids.values()
        yield self.supervisor.stopService()
        for pid in pids:
            self.assertRaises(ProcessLookupError, os.kill, pid, 0)
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(self.supervisor.pids, {})
        self.assertEqual(self.supervisor.counters["restarts"], 0)


class RestartDelayTests(TestCase):
    """
    A worker that dies young is started again later each time, up to a
    bound; restarts are timed on the clock given.
    """

    def setUp(self):
        self.clock = Clock()
        self.supervisor = WorkerSupervisor(
            reactor, self.clock, ("/bin/false",), 1, environment={},
            restart_delay=1.0)
        self.supervisor.startService()
        self.addCleanup(self.supervisor.stopService)

    @inlineCallbacks
    def next_delay(self):
        """
        The delay before the worker starts again, once it has ended.
        """
        exits = self.supervisor.counters["exits"]
        yield until(lambda: self.supervisor.counters["exits"] > exits)
        (call,) = self.clock.getDelayedCalls()
        return call.getTime() - self.clock.seconds()

    @inlineCallbacks
    def test_delay_doubles_while_the_worker_dies_young(self):
        delays = []
        for _ in range(7):
            delays.append((yield self.next_delay()))
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [2.0, 4.0, 8.0, 16.0, MAX_RESTART_DELAY,
                                  MAX_RESTART_DELAY, MAX_RESTART_DELAY])

    @inlineCallbacks
    def test_delay_starts_again_once_a_worker_lived(self):
        # It lived long enough before it died.
        self.clock.advance(STABLE_AFTER + 1)
        self.assertEqual((yield self.next_delay()), 1.0)


class StopDeadlineTests(TestCase):
    @inlineCallbacks
    def test_worker_that_ignores_sigterm_is_killed_at_the_deadline(self):
        ready = self.mktemp()
        worker = textwrap.dedent(f"""
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            open({ready!r}, "w").close()
            time.sleep(60)
        """)
        supervisor = WorkerSupervisor(
            reactor, reactor, (sys.executable, "-c", worker), 1,
            environment={}, stop_timeout=0.5)
        supervisor.startService()
        yield until(lambda: os.path.exists(ready))
        (pid,) = supervisor.pids.values()
        yield supervisor.stopService()
        self.assertRaises(ProcessLookupError, os.kill, pid, 0)
        self.assertEqual(supervisor.counters["restarts"], 0)


class OutputTests(TestCase):
    """
    What a worker writes to its standard output and error is logged by the
    supervisor, a line at a time, naming the worker.
    """

    @inlineCallbacks
    def test_each_line_of_a_worker_is_logged_with_its_index(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        worker = textwrap.dedent("""
            import sys
            sys.stdout.write("first line\\nsecond ")
            sys.stdout.flush()
            sys.stdout.write("line\\nno newline at the end")
            sys.stderr.write("trouble\\n")
        """)
        supervisor = WorkerSupervisor(
            reactor, reactor, (sys.executable, "-c", worker), 1,
            environment={}, restart_delay=60)
        supervisor.startService()
        self.addCleanup(supervisor.stopService)
        yield until(lambda: supervisor.counters["exits"] == 1)
        logged = [(event["log_level"].name, formatEvent(event))
                  for event in events
                  if event.get("log_namespace", "").endswith("WorkerSupervisor")
                  and "line" in event.get("log_format", "")]
        self.assertEqual(sorted(logged), sorted([
            ("info", "worker 0: first line"),
            ("info", "worker 0: second line"),
            ("info", "worker 0: no newline at the end"),
            ("warn", "worker 0: trouble")]))


class ArgumentTests(TestCase):
    def test_listening_sockets_must_come_first(self):
        supervisor = WorkerSupervisor(
            reactor, reactor, ("true",), 1,
            lambda index: [Inherited(5, "table", listening=False),
                           Inherited(3, "sslshare.socket")])
        self.assertRaises(ValueError, supervisor.startService)
