"""
Soak: a cluster of three under steady client load while faults come and
go, measured.

node1 runs as a C{twistd} process, so that it can be killed as a host
loses a process; node2 and node3 run in this process, so that their stores
can be read.  Client processes (tests/soak_client.py, so that this
process's memory is the nodes') connect in a loop for the whole run, each
connection to another node than the last, offering the session of the
client's previous connection of that version, TLS 1.2 and 1.3 in turn.
Every third TLS 1.3 ticket a client offers is offered again at once to the
two other nodes, and every seventh connection replays a ticket the client
used earlier in the run: a ticket is single use, cluster-wide, whatever
happened in between.

Faults come on a schedule, once per cycle of the run: node1 killed
(SIGKILL) and, while it is down, a listener on its cluster port that
accepts and never answers, then node1 started again; node1 stopped
(SIGSTOP: the kernel still accepts its connections, nobody answers) and
continued; with a repository, PostgreSQL killed (an immediate shutdown:
every connection breaks) and started again on its port.  One variant
runs these faults with node2, the backup node of node1's sessions, down
for the whole run (never started, its ports closed): the copies and
checkpoints go to the next live node of the ring, node3, and the clients
connect to node1 and node3 only.

Each test class runs the soak once, prints one line of figures, and each
of its tests asserts one part of them:

  - no connection hung: each one ended, with its echo or with an error,
    within L{HANG_BOUND} (the lookup budget, the handshake timeout and a
    margin that also covers a stall), with a client socket timeout well
    past it, so that a hang shows as one; and after each fault, sessions
    move between nodes again (a control round must resume within
    L{RECOVERY_BOUND});
  - no session served twice: no TLS 1.3 ticket resumed more than once
    across the cluster; at the end (node1 stopped with SIGTERM, which hands
    its sessions to the others), every copy of a TLS 1.2 session names the
    same holder;
  - once the load stops, this process (node2, node3) has no more file
    descriptors open than before it (its connections to the repository
    aside), and resident memory within L{RSS_SLACK} of its baseline plus
    what the stores grew by holding more sessions.

The baseline is taken after a first cycle of the same load and faults, so
that what the first fault of each kind makes once is not counted as
growth; the figures line counts both cycles' connections.  Sessions served
twice, which this soak found (a holder that missed the purge of its copy
resumed it again), are guarded against since: a node serves a backup copy
only when the holder cannot answer and is not connected, and a node with a
repository takes its own session from the repository before it resumes it
(tests/test_node.py and tests/test_repository_node.py show each case every
time).

SSLSHARE_SOAK_SECONDS sets the seconds of measured load per variant (12
by default, which keeps the module about a minute); a long run has one
fault cycle per L{CYCLE_SECONDS}.  docs/soak.md records the figures of a short and a long
run.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from collections import Counter

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support.cluster import LocalCluster
from tests.support.databases import throwaway_server
from tests.support.processes import (
    connections_to,
    open_descriptors,
    resident_bytes,
)
from tests.support.servers import SilentListener
from tests.support.waiting import until

SOAK_SECONDS = float(os.environ.get("SSLSHARE_SOAK_SECONDS", "12"))
CYCLE_SECONDS = 30.0
CYCLES = max(1, round(SOAK_SECONDS / CYCLE_SECONDS))
CLIENT_PROCESSES = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = os.path.join(ROOT, "tests", "soak_client.py")

BUDGET = 0.3
HANDSHAKE_TIMEOUT = 5.0
STALL_SECONDS = 2.0
# Far above anything a connection should take, and above a stall: only a
# hang reaches it.
HANG_BOUND = BUDGET + HANDSHAKE_TIMEOUT + 10.0
CLIENT_TIMEOUT = 2 * HANG_BOUND
RECOVERY_BOUND = 20.0
RSS_SLACK = 4 * 1024 * 1024
VERSIONS = ("TLSv1.2", "TLSv1.3")


@attrs.frozen
class Attempt:
    """
    One client connection: when it started (seconds into the run), how
    long it took, where it went, and how it ended (C{"resumed"},
    C{"full"}, or the name of the error).

    @ivar kind: C{"loop"}, C{"again"} (a ticket just offered, offered
        again) or C{"replay"} (a ticket from earlier in the run).
    """

    started: float
    elapsed: float
    node: str
    version: str
    kind: str
    outcome: str


class _ClientProcess(ProcessProtocol):
    """
    One client process; C{ended} fires with its summary when it exits,
    or fails with its error output if it did not exit cleanly.
    """

    def __init__(self) -> None:
        self.ended = Deferred()
        self._output = b""
        self._errors = b""

    def outReceived(self, data: bytes) -> None:
        self._output += data

    def errReceived(self, data: bytes) -> None:
        self._errors = (self._errors + data)[-4096:]

    def stop(self) -> None:
        if self.transport is not None and self.transport.pid is not None:
            self.transport.closeStdin()

    def processEnded(self, reason) -> None:
        if reason.check(ProcessDone):
            self.ended.callback(json.loads(self._output))
        else:
            self.ended.errback(AssertionError(
                f"a soak client ended with {reason.value}: "
                f"{self._errors.decode('utf-8', 'replace')}"))


class Load:
    """
    Client processes (tests/soak_client.py) connecting to the nodes of
    the cluster not named in C{down} in a loop, and what they saw, added
    up when they stop.
    """

    def __init__(self, cluster: LocalCluster, down: tuple[str, ...] = ()) -> None:
        self.cluster = cluster
        self.down = down
        self.origin = time.monotonic()
        self.connections = 0
        self.outcomes: Counter[str] = Counter()
        self.slowest = 0.0
        self.hung: list[Attempt] = []
        self.offered = self.resumed = self.tickets = 0
        # The offers of each TLS 1.3 ticket resumed more than once, to
        # show how it came to be.
        self.served_twice: list[list[tuple[float, str, str, str]]] = []
        self.tls12_sessions: set[bytes] = set()
        self._clients: list[_ClientProcess] = []
        self._stopping = None

    def run(self) -> Deferred:
        """
        Start the clients; fires once every one has stopped (L{stop}) and
        its summary is added up, failing if one did not end well.
        """
        ports = [f"{name}={port}" for name, port
                 in sorted(self.cluster.ports.items()) if name not in self.down]
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
        for index in range(CLIENT_PROCESSES):
            client = _ClientProcess()
            reactor.spawnProcess(
                client, sys.executable,
                [sys.executable, CLIENT, str(index), self.cluster.ca_cert,
                 str(CLIENT_TIMEOUT), str(HANG_BOUND), *ports],
                env=environment)
            client.ended.addCallback(self._add)
            self._clients.append(client)
        return gatherResults([client.ended for client in self._clients],
                             consumeErrors=True)

    def stop_in(self, seconds: float) -> None:
        self._stopping = reactor.callLater(seconds, self.stop)

    def stop(self) -> Deferred:
        """
        Tell every client to stop after its connection in progress; fires
        once they all have, however they ended.
        """
        if self._stopping is not None and self._stopping.active():
            self._stopping.cancel()
        for client in self._clients:
            client.stop()
        return DeferredList([client.ended for client in self._clients],
                            consumeErrors=True)

    def _add(self, summary: dict) -> None:
        self.connections += summary["connections"]
        self.outcomes.update(summary["outcomes"])
        self.slowest = max(self.slowest, summary["slowest"])
        self.hung += [Attempt(started - self.origin, *rest)
                      for started, *rest in summary["hung"]]
        self.offered += summary["offered"]
        self.resumed += summary["resumed"]
        self.tickets += summary["tickets"]
        self.served_twice += [
            [(round(started - self.origin, 2), node, kind, outcome)
             for started, node, kind, outcome in offers]
            for offers in summary["served_twice"]]
        self.tls12_sessions.update(
            bytes.fromhex(session) for session in summary["tls12_sessions"])


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


def store_bytes(cluster: LocalCluster) -> int:
    return sum(node.store.bytes_used for node in cluster.nodes.values())


def holders_named(cluster: LocalCluster, session_id: bytes) -> set[str]:
    """
    The holders that the copies of C{session_id} in the stores of the
    nodes of this process name (a backup copy names its holder too).
    """
    return {state.holder for node in cluster.nodes.values()
            if (state := node.store.get(session_id)) is not None}


@attrs.frozen
class Figures:
    """
    What one soak run measured (see the module's docstring).

    @ivar timeline: (fault event, seconds into the run).
    """

    line: str
    outcomes: Counter
    hung: list
    served_twice: list
    held_twice: list
    fds: int
    rss: int
    stores: int
    timeline: list


class _Soak:
    """
    The run every soak test shares: it runs once per class, for the first
    of its tests, and each test asserts a part of its figures.  Subclasses
    say what the repository is, and which faults one cycle injects
    (L{cycle}).
    """

    timeout = 3 * SOAK_SECONDS + 240
    repository = None
    # Nodes that never run, and the node whose sessions control() moves.
    down: tuple[str, ...] = ()
    maker = "node2"
    _figures = None

    def figures(self) -> Deferred:
        return Deferred.fromCoroutine(self._figures_once())

    async def _figures_once(self):
        cls = type(self)
        if cls._figures is None:
            try:
                cls._figures = await self._soak()
            except Exception as e:
                cls._figures = e
                raise
        elif isinstance(cls._figures, Exception):
            raise AssertionError(f"the soak run failed: {cls._figures!r}")
        return cls._figures

    def test_no_connection_hangs(self):
        async def check():
            figures = await self.figures()
            self.assertEqual(figures.hung, [])
            self.assertNotIn("wrong echo", figures.outcomes)
            self.assertGreater(figures.outcomes["resumed"], 0)

        return Deferred.fromCoroutine(check())

    def test_file_descriptors_come_back(self):
        async def check():
            figures = await self.figures()
            self.assertLessEqual(figures.fds, 0)

        return Deferred.fromCoroutine(check())

    def test_memory_comes_back(self):
        async def check():
            figures = await self.figures()
            self.assertLess(figures.rss - figures.stores, RSS_SLACK)

        return Deferred.fromCoroutine(check())

    def test_no_session_is_served_twice(self):
        async def check():
            figures = await self.figures()
            self.assertEqual(
                figures.served_twice, [],
                f"TLS 1.3 tickets resumed twice (seconds into the run, "
                f"node, kind of offer, outcome); faults: {figures.timeline}")

        return Deferred.fromCoroutine(check())

    def test_no_session_is_held_twice(self):
        async def check():
            figures = await self.figures()
            self.assertEqual(figures.held_twice, [])

        return Deferred.fromCoroutine(check())

    async def start_cluster(self):
        self.cluster = LocalCluster(
            self, budget_ms=int(BUDGET * 1000), repository=self.repository,
            node_options=f"handshake_timeout_s = {HANDSHAKE_TIMEOUT}\n")
        # A test that fails while node1 is stopped must not leave it so:
        # nothing but SIGCONT reaches a stopped process.
        self.addCleanup(self._continue_node1)
        await self.cluster.spawn("node1")
        for node in ("node2", "node3"):
            if node not in self.down:
                self.cluster.start(node)
        await self.linked()
        self.faults = Counter()
        self.timeline = []
        self.recoveries = []
        self.origin = time.monotonic()

    def _continue_node1(self):
        process = self.cluster.processes.get("node1")
        if process is not None and process.pid is not None:
            os.kill(process.pid, signal.SIGCONT)

    def linked(self):
        return gatherResults([self.cluster.wait_linked(timeout=RECOVERY_BOUND,
                                                       down=self.down),
                              self.cluster.wait_linked_to(
                                  "node1", timeout=RECOVERY_BOUND)])

    def event(self, what):
        self.timeline.append((what, round(time.monotonic() - self.origin, 2)))

    async def kill_and_restart_node1(self, down_seconds):
        """
        SIGKILL node1; while it is down, its cluster port accepts and never
        answers; then start it again.
        """
        self.event("node1 killed")
        await self.cluster.kill("node1")
        silent = SilentListener(self.cluster.amp_ports["node1"])
        await sleep(down_seconds)
        await silent.stop()
        await self.cluster.spawn("node1")
        self.event("node1 listens again")
        self.faults["node1 killed and restarted"] += 1
        self.faults["silent peer port"] += 1
        await self.linked()
        self.event("node1 linked again")
        await self.control()

    async def stall_node1(self):
        self.event("node1 stopped")
        self.cluster.signal("node1", signal.SIGSTOP)
        await sleep(STALL_SECONDS)
        self.cluster.signal("node1", signal.SIGCONT)
        self.event("node1 continued")
        self.faults["node1 stalled"] += 1
        await self.linked()
        await self.control()

    async def control(self):
        """
        Until a session made on the C{maker} node resumes on each other
        node that runs, for both versions: the cluster shares sessions
        again after a fault.
        """
        maker = self.maker
        others = [node for node in sorted(self.cluster.ports)
                  if node not in self.down and node != maker]
        started = time.monotonic()
        for version in VERSIONS:
            for other in others:
                while True:
                    writes = self.writes(maker)
                    made = await self.cluster.client_round(maker, version)
                    if writes is not None:
                        await until(lambda: self.writes(maker) > writes)
                    again = await self.cluster.client_round(
                        other, version, made.session)
                    if again.reused:
                        break
                    if time.monotonic() - started > RECOVERY_BOUND:
                        raise AssertionError(
                            f"{version}: sessions of {maker} did not resume "
                            f"on {other} within {RECOVERY_BOUND} s of the "
                            f"fault's end")
                    await sleep(0.2)
        self.recoveries.append(time.monotonic() - started)

    def repository_connections(self):
        """
        How many connections the nodes of this process have open to the
        repository: each of its worker threads opens one on first use, so
        their number depends on how busy the threads were, not on leaks.
        """
        return 0

    def writes(self, maker):
        """
        How many writes of new sessions C{maker} has made that its peers
        depend on to resume them, or C{None}: peers ask C{maker} itself.
        """
        return None

    async def schedule(self, load):
        for index in range(CYCLES):
            await self.cycle(load.origin + index * SOAK_SECONDS / CYCLES,
                             SOAK_SECONDS / CYCLES)

    async def at(self, moment):
        delay = moment - time.monotonic()
        if delay > 0:
            await sleep(delay)

    def load(self):
        load = Load(self.cluster, self.down)
        # Clients that outlive a failed test would go on connecting.
        self.addCleanup(load.stop)
        return load

    async def _soak(self):
        await self.start_cluster()
        # One cycle of faults before the baseline: what the first of each
        # fault makes once (a link to a restarted peer, the code paths of
        # refused and cancelled lookups) is not growth.
        warm_up = self.load()
        warming = warm_up.run()
        length = SOAK_SECONDS / CYCLES
        await self.cycle(warm_up.origin, length)
        warm_up.stop_in(max(warm_up.origin + length - time.monotonic(), 1.0))
        await warming
        await self.linked()
        baseline = await self.measure()

        load = self.load()
        self.origin = load.origin
        running = load.run()
        await self.schedule(load)
        # A slow fault may outlast the planned run: load goes on for a few
        # seconds after the last one, to show it is served.
        load.stop_in(max(load.origin + SOAK_SECONDS - time.monotonic(), 3.0))
        await running
        duration = time.monotonic() - load.origin
        await self.linked()
        after = await self.measure(settle_to=baseline)

        # node1 hands its sessions over, so that every copy of every TLS
        # 1.2 session is in this process.
        await self.cluster.kill("node1", "TERM")
        await self.cluster.settled()
        held_twice = [(session_id.hex(), sorted(holders))
                      for session_id in load.tls12_sessions
                      if len(holders := holders_named(self.cluster,
                                                      session_id)) > 1]

        loads = (warm_up, load)
        outcomes = warm_up.outcomes + load.outcomes
        hung = warm_up.hung + load.hung
        served_twice = warm_up.served_twice + load.served_twice
        fds = after["fds"] - baseline["fds"]
        rss = after["rss"] - baseline["rss"]
        stores = after["stores"] - baseline["stores"]
        faults = ", ".join(f"{count} {what}" for what, count
                           in sorted(self.faults.items()))
        tally = ", ".join(f"{count} {outcome}" for outcome, count
                          in sorted(outcomes.items()))
        line = (
            f"soak {self.soak_name}: {duration:.0f} s, "
            f"{sum(part.connections for part in loads)} "
            f"connections ({tally}), {sum(self.faults.values())} faults "
            f"injected ({faults}), hung {len(hung)} (slowest "
            f"{max(part.slowest for part in loads):.2f} s, bound "
            f"{HANG_BOUND:.1f} s), TLS 1.3 tickets offered "
            f"{sum(part.tickets for part in loads)}, served "
            f"twice {len(served_twice)}, TLS 1.2 sessions "
            f"{len(load.tls12_sessions)}, held twice {len(held_twice)}, "
            f"resumed/offered {load.resumed}/{load.offered}, sharing "
            f"back within {max(self.recoveries):.1f} s of each fault, fds "
            f"{fds:+d} from baseline, RSS {rss / 2**20:+.1f} MiB of which "
            f"stores {stores / 2**20:+.1f} MiB")
        print(f"\n{line}", flush=True)
        return Figures(line, outcomes, hung, served_twice, held_twice,
                       fds, rss, stores, self.timeline)

    async def measure(self, settle_to=None):
        """
        This process's open file descriptors, resident memory and the
        bytes its stores hold, once the connections the load left have
        closed (C{settle_to}: until no more descriptors than that are
        open, or L{RECOVERY_BOUND} passed).
        """
        await self.cluster.settled()
        deadline = time.monotonic() + RECOVERY_BOUND
        while True:
            await sleep(0.5)
            gc.collect()
            fds = open_descriptors() - self.repository_connections()
            if (settle_to is None or fds <= settle_to["fds"]
                    or time.monotonic() > deadline):
                break
        return {"fds": fds, "rss": resident_bytes(),
                "stores": store_bytes(self.cluster)}


class PeerSoakTests(_Soak, TestCase):
    """
    Peers only: node1 killed (its cluster port silent while it is down)
    and restarted, and stalled.
    """

    soak_name = "peers"

    async def cycle(self, start, length):
        await self.at(start + 0.15 * length)
        await self.kill_and_restart_node1(0.15 * length)
        await self.at(start + 0.55 * length)
        await self.stall_node1()


class BackupDownSoakTests(_Soak, TestCase):
    """
    Peers only, the faults of L{PeerSoakTests}, with node2 down for the
    whole run: node1's sessions keep their copies and checkpoints at node3,
    the next live node of the ring, and none is served twice.
    """

    soak_name = "peers, backup node down"
    down = ("node2",)
    maker = "node3"
    cycle = PeerSoakTests.cycle


class RepositorySoakTests(_Soak, TestCase):
    """
    Through PostgreSQL only: the repository killed and restarted, and
    node1 killed and restarted.
    """

    soak_name = "repository"

    def setUp(self):
        if type(self)._figures is not None:
            return
        self.server = throwaway_server(self, "postgres",
                                       survives_kill=True).start()
        self.repository = (f'topology = "repository"\nkind = "postgres"\n'
                           f'dsn = "{self.server.dsn()}"\n')

    def repository_connections(self):
        return connections_to(self.server.port)

    def writes(self, maker):
        """
        How many writes of new sessions C{maker} has made to the
        repository, successfully or not.
        """
        node = self.cluster.nodes[maker]
        return (node.repository.counters["puts"]
                + node.counters["repository_put_failures"])

    async def kill_and_restart_repository(self, down_seconds):
        self.event("repository killed")
        await deferToThread(self.server.stop)
        await sleep(down_seconds)
        await deferToThread(self.server.start)
        self.event("repository started again")
        self.faults["repository killed and restarted"] += 1
        await self.control()

    async def cycle(self, start, length):
        await self.at(start + 0.15 * length)
        await self.kill_and_restart_repository(0.15 * length)
        await self.at(start + 0.55 * length)
        await self.kill_and_restart_node1(0.1 * length)
