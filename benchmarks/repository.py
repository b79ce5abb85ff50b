"""
Session lookup latency and resumed handshakes per second through each place
a node recovers sessions from: its own store, a peer node, and the central
repository's backends (SQLite, Redis, PostgreSQL), measured in one run.

Usage, from the root of a checkout::

    .venv/bin/python benchmarks/repository.py [--quick] [--json]
        [--tls 1.2|1.3] [--sources local,peer,sqlite,redis,postgres]

The default run takes about two minutes, C{--quick} about thirty seconds;
C{--json} prints one JSON object instead of the table.

What runs
=========

Everything lives in this process and one reactor, except the Redis and
PostgreSQL servers: throwaway ones from L{sslshare.dev.throwaway}, started in
temporary directories on free ports of 127.0.0.1.  A source whose server
binary or Python driver is missing, or that cannot be set up, is reported
as skipped with the reason; the others run.  The TLS handshakes are those
of C{benchmarks/engine.py} (whose functions this script imports): a
pyOpenSSL client and an L{sslshare.tls.Connection} talking through memory
BIOs, no sockets, one TLS version (1.3 unless C{--tls 1.2}), the P-256
localhost certificate of a PKI made by L{sslshare.dev.pki.init_pki}.

Each source has a node that makes sessions and a node that resumes them,
each a real L{sslshare.node.Node} (store, state keys, L{Recovery}) whose
engine context calls C{Node.new_session} for every new session, as in a
running node:

    - C{local}: one node makes the sessions and resumes them itself; its
      recovery finds them in its own L{SessionStore}.
    - C{peer}: three nodes built by L{sslshare.service.build_node} from
      temporary TOML files (the PKI's node certificates, AMP over mutual
      TLS on 127.0.0.1, as C{tests.support.cluster.LocalCluster} does), in
      this process and reactor: node 1 makes the sessions; a node that holds no
      copy of them (not node 1's backup node, when the recovery chain keeps
      backup copies) resumes them, fetching each (moving it) from node 1
      over C{FetchSession}.  The owner's side of the fetch runs in the same
      reactor thread, so it is in the lookup latency.  What the nodes send
      each other besides (backup copies, purges) is waited for as the
      repository's writes are, with one C{Stats} round trip on every link.
    - C{sqlite}, C{redis}, C{postgres}: node 1 writes every new session,
      sealed, to the repository (C{SQLiteRepository} on a file in a
      temporary directory, C{RedisRepository}, C{PostgresRepository}, each
      with its default worker threads); node 2 shares that repository and
      recovers in the "repository" topology (no peer to ask), taking each
      session from it.  What node 2 writes back, as a node does (a TLS 1.2
      session it now holds; for TLS 1.3 the new ticket of the resumed
      handshake), goes to the repository too.  These two nodes have no
      peer links, so the purge a node of a real cluster sends to the
      session's previous holder is not made.

The recovery budget is 1 s instead of the node's default 50 ms, so that the
latency tail is measured rather than cut off; lookups slower than the
default budget are counted.

One batch of one source: B full handshakes on the making node's context
(each session's write to the repository is waited for), then the B
sessions resumed once each, one handshake at a time, on the resuming
node's context.  The lookup listener of each resumed connection does what
L{sslshare.protocol.SessionResumingTLSProtocol} does: it calls
C{recovery.recover(request)}; when the Deferred has fired already (a local
hit) it supplies the DER at once and the handshake goes on in the same
C{do_handshake} call; otherwise the handshake stays paused, the reactor
runs until the Deferred fires, the DER is supplied and the handshake is
driven again with no new bytes.  Every resumed handshake must be resumed
on both ends, must have offered a session made by the making node (its
owner tag), and must have been answered by the expected source
(C{Recovered.source}); and no recovery, repository or write failure may be
counted on either node.  A source that breaks one of these mid-run is
dropped from the figures and reported as skipped with the reason.

How the numbers come out
========================

A warm-up round, then N rounds.  Each round runs one batch of every source,
starting with a different source each round so that drifts in the
machine's load hit all alike.  L{LEGEND} says how each figure is made from
those batches, and is printed with the results.  This script times; it
never asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater, react
from zope.interface import implementer

# Run as a script from a checkout: import the sslshare and the benchmarks
# next to this directory, ahead of any installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.engine import (
    CLUSTER,
    HOST_NAME,
    SERVICE,
    DictLookup,
    EngineServer,
    HandshakeError,
    _client_advance,
    _client_output,
    client_context,
    client_resumed,
    client_session,
    close,
    handshake,
    machine,
    new_client,
)
from sslshare import cluster, config, hooks, sessionid, tls
from sslshare.dev import pki, throwaway
from sslshare.node import Node, NodeSettings
from sslshare.placement import BackupRing, Layout, Placement
from sslshare.recovery import LookupSettings, Recovered, Recovery
from sslshare.state import StateKeys
from sslshare.store import SessionStore

SOURCES = ("local", "peer", "sqlite", "redis", "postgres")
# What Recovered.source says for each.
EXPECTED = {"local": "local", "peer": "peer", "sqlite": "repository",
            "redis": "repository", "postgres": "repository"}
VERSIONS = ("1.2", "1.3")
# Three nodes: the first makes the sessions, another may keep their backup
# copies, and one holds none of them, so that it must fetch each from the
# first over AMP.
PEER_NODES = ("node1", "node2", "node3")
BUDGET = 1.0
NODE_BUDGET = config.DEFAULT_LOOKUP_BUDGET_MS / 1000
# Counters that must stay at zero: any of them means a lookup or a write
# went wrong, and the source's figures would not be what they claim.
RECOVERY_FAILURES = ("misses", "timeouts", "peer_errors", "repository_errors",
                     "unsealable", "repository_put_failures",
                     "repository_purge_failures", "peer_purge_failures",
                     "peer_backup_failures")
NODE_FAILURES = ("repository_put_failures", "sessions_unstorable",
                 "backup_failures", "backups_refused")


@attrs.frozen
class RunSize:
    """
    How much to measure: C{rounds} rounds (after one warm-up round) of one
    batch of C{batch} sessions per source.
    """

    rounds: int
    batch: int

    def handshakes(self, sources: int) -> int:
        """
        Resumed handshakes in the whole run (as many full ones again).
        """
        return (self.rounds + 1) * self.batch * sources


# A session (its full handshake, its resumed handshake, lookup and writes)
# takes about 2.7 ms with TLS 1.3 and 1.9 ms with TLS 1.2, averaged over the
# five sources, on a 2-core Xeon VM, and setting up the servers and the
# peers about 2 s: about 30 s and 2 minutes with all five sources.
QUICK = RunSize(rounds=12, batch=150)
DEFAULT = RunSize(rounds=40, batch=200)

LEGEND = {
    "lookup_ms": "milliseconds from the call of recovery.recover(request) "
                 "to its Deferred firing, as seen in the reactor thread; "
                 "p50 and p99 over every lookup of the measured rounds "
                 "(local: the store answers inside the call)",
    "over_node_budget": f"lookups slower than the node's default budget of "
                        f"{NODE_BUDGET * 1000:.0f} ms (the run uses "
                        f"{BUDGET * 1000:.0f} ms so as not to cut the tail)",
    "resumed_per_s": "resumed handshakes / wall-clock seconds of the resume "
                     "loops of the measured rounds, one handshake in flight "
                     "at a time: the client, the server, the lookup, the "
                     "checks and, at the end of each loop, waiting for the "
                     "resuming node's writes to land",
    "ratio_to_local": "median over rounds of (the source's resumed "
                      "handshakes per second / local's, same round)",
    "server_us": "median over rounds of the batch's mean server time per "
                 "resumed handshake, microseconds, as in engine.py: "
                 "perf_counter_ns around the engine's bio_write, "
                 "do_handshake and bio_read of every flight, and the "
                 "supply() of a late answer.  It includes what the node does "
                 "synchronously inside those calls (the start of recover(), "
                 "all of it for local; for TLS 1.3, storing the new ticket "
                 "and queueing its write), and time the reactor thread lost "
                 "to the node's own repository worker threads holding the "
                 "GIL; the wait for the source and the Deferred callbacks "
                 "are not in it",
    "server_cpu_us": "as server_us, but the reactor thread's own CPU time "
                     "(thread_time_ns) in the same calls: time spent waiting "
                     "for the GIL is not in it; what sharing the process "
                     "with running worker threads costs this thread (system "
                     "calls, context switches, caches) is",
    "resumed": "resumed handshakes of the measured rounds, each checked: "
               "resumed on both ends, offering a session the making node "
               "issued, answered by the expected source",
}


class SourceFailed(Exception):
    """
    A source counted a failure that makes its figures meaningless.
    """


# The lookup listener of a resumed connection, and the handshake it pauses.

@implementer(tls.ISessionLookupListener)
class RecoveryLookup:
    """
    Answers a paused handshake from a recovery chain, as
    L{sslshare.protocol.SessionResumingTLSProtocol} does: at once when the
    Deferred has fired already, else when it fires, leaving L{pending} for
    the driver to wait on.

    @ivar pending: the lookup still in flight, or C{None}.
    @ivar found: what the lookup found.
    @ivar lookup_ns: nanoseconds from the call of C{lookup} to its answer.
    @ivar supply_ns: nanoseconds spent in C{supply} for an answer that came
        later (an answer at once is supplied inside the server's step), and
        C{supply_cpu_ns} the thread CPU time of the same.
    """

    def __init__(self, lookup: Callable[[hooks.LookupRequest],
                                        Deferred[Recovered | None]]) -> None:
        self._lookup = lookup
        self._later = False
        self.pending: Deferred[None] | None = None
        self.found: Recovered | None = None
        self.lookup_ns: int | None = None
        self.supply_ns = 0
        self.supply_cpu_ns = 0

    def lookup_requested(self, connection: tls.Connection,
                         request: hooks.LookupRequest) -> None:
        started = time.perf_counter_ns()
        looking = self._lookup(request)
        looking.addCallback(self._answer, connection, started)
        if not looking.called:
            self._later = True
            self.pending = looking

    def _answer(self, found: Recovered | None, connection: tls.Connection,
                started: int) -> None:
        answered = time.perf_counter_ns()
        cpu = time.thread_time_ns()
        self.lookup_ns = answered - started
        self.found = found
        connection.supply(None if found is None else found.der)
        if self._later:
            self.supply_cpu_ns = time.thread_time_ns() - cpu
            self.supply_ns = time.perf_counter_ns() - answered


async def resumed_handshake(client: Any, server: EngineServer,
                            listener: RecoveryLookup) -> tuple[int, int]:
    """
    L{benchmarks.engine.handshake}, for a server that may pause on the
    ClientHello: when nobody has anything to say and a lookup is in flight,
    wait for it, then drive the server again with no new bytes (what
    Twisted's C{dataReceived(b"")} does in the real protocol).

    @return: the server's nanoseconds for this handshake, and the CPU
        nanoseconds of this thread in the same calls.
    """
    server_ns = server_cpu_ns = 0
    client_done = server_done = False
    while True:
        if not client_done:
            client_done = _client_advance(client)
        to_server = _client_output(client)
        if not to_server:
            if listener.pending is not None:
                pending, listener.pending = listener.pending, None
                await pending
                server_ns += listener.supply_ns
                server_cpu_ns += listener.supply_cpu_ns
            elif client_done and server_done:
                return server_ns, server_cpu_ns
            else:
                raise HandshakeError("handshake stalled: nobody has anything "
                                     "to say and no lookup is in flight")
        cpu = time.thread_time_ns()
        done, to_client, elapsed = server.step(to_server)
        server_cpu_ns += time.thread_time_ns() - cpu
        server_done = server_done or done
        server_ns += elapsed
        if to_client:
            client.bio_write(to_client)


# The repository as the nodes see it.

class WriteTracker:
    """
    A repository, passed through, that keeps the Deferreds of the writes
    the nodes make (which they do not wait for), so that a batch can wait
    until they have landed.
    """

    def __init__(self, repository: Any) -> None:
        self.repository = repository
        self._writes: list[Deferred[Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.repository, name)

    def put(self, session_id: bytes, sealed: bytes,
            expires: float) -> Deferred[None]:
        return self._track(self.repository.put(session_id, sealed, expires))

    def purge(self, session_id: bytes) -> Deferred[bool]:
        return self._track(self.repository.purge(session_id))

    def _track(self, writing: Deferred[Any]) -> Deferred[Any]:
        self._writes.append(writing)
        return writing

    def settle(self) -> Deferred[Any]:
        # The nodes' own errbacks come first and count failures; the
        # Deferreds here only say when each write is over.
        writes, self._writes = self._writes, []
        return DeferredList(writes, consumeErrors=True)


# The sources.

@attrs.define
class Source:
    """
    One place sessions come from: the context of the node that makes them,
    the context and lookup of the node that resumes them.

    @ivar expected: the C{Recovered.source} every lookup must report.
    @ivar nodes: the nodes whose counters must show no failure.
    @ivar writes: fires once the writes the nodes made so far (which they
        do not wait for) have landed, if they make any.
    @ivar stop: releases what the source holds.
    """

    name: str
    maker: tls.ServerContext
    resumer: tls.ServerContext
    lookup: Callable[[hooks.LookupRequest], Deferred[Recovered | None]]
    nodes: list[Node]
    writes: Callable[[], Awaitable[Any]] | None = None
    stop: Callable[[], Awaitable[Any]] | None = None

    @property
    def expected(self) -> str:
        return EXPECTED[self.name]

    async def settle(self) -> None:
        """
        Wait for the nodes' writes to land, then check that nothing failed.

        @raise SourceFailed: a node counted a failure.
        """
        if self.writes is not None:
            await self.writes()
        for node in self.nodes:
            failures = {f"node {node.node_id} {name}": node.counters[name]
                        for name in NODE_FAILURES if node.counters[name]}
            failures.update(
                {f"node {node.node_id} recovery {name}":
                 node.recovery.counters[name]
                 for name in RECOVERY_FAILURES if node.recovery.counters[name]})
            if failures:
                raise SourceFailed(", ".join(f"{what}: {count}"
                                             for what, count in failures.items()))


class Bench:
    """
    What every source shares: the PKI, the state keys, the TLS version,
    the reactor and a temporary directory.
    """

    def __init__(self, reactor: Any, directory: str, version: str) -> None:
        self.reactor = reactor
        self.directory = directory
        self.version = version
        self.pki = pki.init_pki(os.path.join(directory, "pki"), CLUSTER,
                                PEER_NODES, (HOST_NAME,))
        self.keys = StateKeys.from_file(self.pki.state_key)
        self.id_context = sessionid.service_id_context(CLUSTER, SERVICE)
        self.servers: list[Any] = []

    def node(self, node_id: str,
             repository: Any = None) -> tuple[Node, tls.ServerContext]:
        """
        A node as L{sslshare.service.build_node} assembles one for the
        "repository" topology (no peer to ask), with the configuration's
        defaults but no peer links at all, and its engine context.
        """
        store = SessionStore(config.DEFAULT_STORE_MAX_BYTES, self.reactor)
        placement = Placement(node_id, Layout(self.keys, BackupRing({})),
                              self._no_peers(node_id),
                              repository)
        recovery = Recovery(store, placement,
                            LookupSettings(id_contexts={SERVICE: self.id_context},
                                           budget=BUDGET),
                            self.reactor, ask_peers=False)
        node = Node(store, placement, recovery, self.reactor,
                    NodeSettings(config.DEFAULT_SESSION_LIFETIME_S))
        service = tls.VirtualService(SERVICE, self.pki.server_chain,
                                     self.pki.server_key, self.id_context,
                                     (HOST_NAME,))
        context = tls.ServerContext(
            [service], sessionid.owner_tag(CLUSTER, node_id),
            on_new_session=node.new_session,
            minimum_version=self.version, maximum_version=self.version,
            session_lifetime=config.DEFAULT_SESSION_LIFETIME_S)
        node.context = context
        return node, context

    def _no_peers(self, node_id: str) -> cluster.Peers:
        files = self.pki.node(node_id)
        channel = cluster.ClusterTLS(self.pki.ca_certificate, files.certificate,
                                     files.key, CLUSTER, node_id)
        return cluster.Peers([], channel, keys=lambda: self.keys)

    async def source(self, name: str) -> Source:
        """
        Set up source C{name}.

        @raise Exception: it cannot be set up (the reason is the message).
        """
        if name == "local":
            node, context = self.node("node1")
            return Source(name, context, context, node.lookup, [node])
        if name == "peer":
            return await self._peer_source()
        return await self._repository_source(name)

    async def _repository_source(self, name: str) -> Source:
        if name == "sqlite":
            from sslshare.repository.sqlite import SQLiteRepository

            repository = SQLiteRepository(
                os.path.join(self.directory, "sessions.sqlite3"), self.reactor)
        elif name == "redis":
            from sslshare.repository.redis import RedisRepository

            server = throwaway.RedisServer()
            self.servers.append(server)
            server.start()
            repository = RedisRepository(server.url, self.reactor)
        else:
            from sslshare.repository.postgres import PostgresRepository

            server = throwaway.PostgresServer()
            self.servers.append(server)
            server.start()
            repository = PostgresRepository(server.dsn(), self.reactor)
        # start() does not fail for a server that is down (a node keeps
        # serving): one call that must reach it does.
        await repository.start()
        await repository.purge(b"\x01" + bytes(31))
        writes = WriteTracker(repository)
        maker, maker_context = self.node("node1", writes)
        resumer, resumer_context = self.node("node2", writes)
        return Source(name, maker_context, resumer_context, resumer.lookup,
                      [maker, resumer], writes.settle, repository.close)

    async def _peer_source(self) -> Source:
        from sslshare.service import build_node

        amp_ports = {node_id: throwaway.free_port() for node_id in PEER_NODES}
        services: list[Any] = []
        nodes: dict[str, Node] = {}

        async def stop() -> None:
            for service in services:
                await service.stopService()

        try:
            for node_id in PEER_NODES:
                path = os.path.join(self.directory, f"{node_id}.toml")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(self._peer_config(node_id, amp_ports))
                service, nodes[node_id] = build_node(
                    config.load(path, self.reactor), self.reactor)
                service.startService()
                services.append(service)
            deadline = self.reactor.seconds() + 10
            while not all(node.peer_links.connected_count() == len(nodes) - 1
                          for node in nodes.values()):
                if self.reactor.seconds() > deadline:
                    raise SourceFailed("the nodes' peer links did not "
                                       "connect within 10 s")
                await deferLater(self.reactor, 0.05, lambda: None)
        except BaseException:
            await stop()
            raise
        maker = nodes[PEER_NODES[0]]
        resumer = nodes[_not_holding(maker)]

        async def writes() -> None:
            # Each link is one AMP connection whose peer answers in order,
            # and a node answers its peers' writes (backup copies, purges)
            # at once: the answer to a Stats sent now comes after every
            # write sent before it has been done.
            for node in nodes.values():
                for link in node.peer_links.links:
                    await link.call(cluster.Stats)

        return Source("peer", maker.context, resumer.context, resumer.lookup,
                      [maker, resumer], writes, stop)

    def _peer_config(self, node_id: str, amp_ports: dict[str, int]) -> str:
        files = self.pki.node(node_id)
        # JSON strings are TOML basic strings.
        q = json.dumps
        return "\n".join([
            "[node]",
            f"id = {q(node_id)}",
            f"cluster = {q(CLUSTER)}",
            'listen = "tcp:0:interface=127.0.0.1"',
            # Never connected: the benchmark drives the engine in memory.
            'backend = "tcp:host=127.0.0.1:port=9"',
            f"lookup_budget_ms = {int(BUDGET * 1000)}",
            f"state_dir = {q(os.path.join(self.directory, 'state', node_id))}",
            "",
            "[tls]",
            f"min_version = {q(self.version)}",
            f"max_version = {q(self.version)}",
            "",
            "[[tls.service]]",
            f"name = {q(SERVICE)}",
            f"server_names = [{q(HOST_NAME)}]",
            f"certificate = {q(self.pki.server_chain)}",
            f"key = {q(self.pki.server_key)}",
            "",
            "[cluster]",
            f'listen = "tcp:{amp_ports[node_id]}:interface=127.0.0.1"',
            f"ca = {q(self.pki.ca_certificate)}",
            f"certificate = {q(files.certificate)}",
            f"key = {q(files.key)}",
            f"state_key = {q(self.pki.state_key)}",
            "",
            "[cluster.peers]",
            *(f'{peer} = "tcp:host=127.0.0.1:port={amp_ports[peer]}"'
              for peer in PEER_NODES if peer != node_id),
            "",
        ])

    def remove_servers(self) -> None:
        for server in self.servers:
            server.remove()


# One batch, and the run.

@attrs.frozen
class Batch:
    """
    One batch's figures: resumed handshakes, the wall-clock seconds of the
    resume loop, the server's nanoseconds and thread CPU nanoseconds, each
    lookup's nanoseconds.
    """

    handshakes: int
    seconds: float
    server_ns: int
    server_cpu_ns: int
    lookups_ns: list[int]


async def measure(source: Source, client: Any, batch: int) -> Batch:
    """
    Make C{batch} sessions on the making node, wait for their writes, then
    resume each once on the resuming node.
    """
    sessions = []
    unused = DictLookup({})
    for _ in range(batch):
        connection, server = new_client(client, None), EngineServer(source.maker, unused)
        handshake(connection, server)
        if server.session_reused() or client_resumed(connection):
            raise HandshakeError(f"{source.name}: a full handshake resumed")
        sessions.append(client_session(connection))
        close(connection, server)
    await source.settle()

    maker_tag = source.maker.owner_tag
    lookups, server_ns, server_cpu_ns = [], 0, 0
    started = time.perf_counter()
    for session in sessions:
        connection = new_client(client, session)
        listener = RecoveryLookup(source.lookup)
        server = EngineServer(source.resumer, listener)
        wall, cpu = await resumed_handshake(connection, server, listener)
        server_ns += wall
        server_cpu_ns += cpu
        if not (server.session_reused() and client_resumed(connection)):
            raise HandshakeError(
                f"{source.name}: a session was not resumed (server "
                f"{server.session_reused()}, client "
                f"{client_resumed(connection)}, recovered from "
                f"{listener.found.source if listener.found else None})")
        offered = server.offered_session_id()
        if offered is None or sessionid.owner_of(offered) != maker_tag:
            raise HandshakeError(
                f"{source.name}: resumed a session the making node did not make")
        if listener.found is None or listener.found.source != source.expected:
            raise HandshakeError(
                f"{source.name}: the session came from "
                f"{listener.found.source if listener.found else None}, not "
                f"{source.expected}")
        lookups.append(listener.lookup_ns)
        close(connection, server)
    await source.settle()
    return Batch(len(sessions), time.perf_counter() - started, server_ns,
                 server_cpu_ns, lookups)


async def run(bench: Bench, names: list[str], size: RunSize,
              skipped: dict[str, str]) -> dict[str, list[Batch]]:
    """
    Set up the sources (those that cannot be are added to C{skipped}), one
    warm-up round, then C{size.rounds} measured ones.

    @return: source name -> its batches of the measured rounds.
    """
    sources: dict[str, Source] = {}
    try:
        for name in names:
            try:
                sources[name] = await bench.source(name)
            except Exception as e:
                skipped[name] = f"setup failed: {_one_line(e)}"
        client = client_context(bench.version)
        batches: dict[str, list[Batch]] = {name: [] for name in sources}
        for round_number in range(size.rounds + 1):
            running = [name for name in sources if name not in skipped]
            shift = round_number % max(len(running), 1)
            for name in running[shift:] + running[:shift]:
                try:
                    batch = await measure(sources[name], client, size.batch)
                except Exception as e:
                    skipped[name] = (f"failed in round {round_number}: "
                                     f"{_one_line(e)}")
                    batches.pop(name, None)
                    continue
                if round_number > 0:
                    batches[name].append(batch)
        return batches
    finally:
        for source in sources.values():
            if source.stop is not None:
                try:
                    await source.stop()
                except Exception:
                    pass


def _not_holding(maker: Node) -> str:
    """
    A node of the peer cluster that holds no copy of the sessions C{maker}
    makes: not C{maker}, and not the node that keeps their backup copies
    when the node has one.
    """
    backup = maker.placement.backup_node(
        sessionid.new_session_id(maker.context.owner_tag), maker.node_id)
    return next(node_id for node_id in PEER_NODES
                if node_id not in (maker.node_id, backup))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _unavailable(names: list[str]) -> dict[str, str]:
    """
    The sources that cannot run here at all, and why: a missing server
    binary or Python driver.
    """
    reasons = {}
    for name, check in (("redis", throwaway.redis_server_binary),
                        ("postgres", throwaway.postgres_binaries)):
        if name not in names:
            continue
        try:
            check()
        except throwaway.ServerUnavailable as e:
            reasons[name] = str(e)
    for name, module in (("redis", "redis"), ("postgres", "psycopg")):
        if name in names and name not in reasons:
            try:
                __import__(module)
            except ImportError as e:
                reasons[name] = f"the Python driver is missing: {e}"
    return reasons


# The figures.

def summarize(batches: dict[str, list[Batch]]) -> dict:
    """
    The figures (see L{LEGEND}), keyed as the JSON output is.
    """
    def rate(batch: Batch) -> float:
        return batch.handshakes / batch.seconds

    lookup_ms, per_s, server_us, cpu_us, over, resumed = {}, {}, {}, {}, {}, {}
    for name, runs in batches.items():
        lookups = [ns / 1e6 for batch in runs for ns in batch.lookups_ns]
        lookup_ms[name] = {
            "p50": statistics.median(lookups),
            "p99": statistics.quantiles(lookups, n=100, method="inclusive")[98],
        }
        over[name] = sum(1 for ms in lookups if ms > NODE_BUDGET * 1000)
        handshakes = sum(batch.handshakes for batch in runs)
        per_s[name] = handshakes / sum(batch.seconds for batch in runs)
        server_us[name] = statistics.median(
            batch.server_ns / batch.handshakes for batch in runs) / 1e3
        cpu_us[name] = statistics.median(
            batch.server_cpu_ns / batch.handshakes for batch in runs) / 1e3
        resumed[name] = handshakes
    ratio = {}
    if "local" in batches:
        local = batches["local"]
        ratio = {name: statistics.median(rate(mine) / rate(theirs)
                                         for mine, theirs in zip(runs, local))
                 for name, runs in batches.items()}
    return {
        "lookup_ms": lookup_ms,
        "resumed_per_s": per_s,
        "ratio_to_local": ratio,
        "server_us": server_us,
        "server_cpu_us": cpu_us,
        "over_node_budget": over,
        "resumed": resumed,
    }


def _redis_binary() -> str:
    return throwaway.redis_server_binary()


def _postgres_binary() -> str:
    return os.path.join(throwaway.postgres_binaries(), "postgres")


def facts() -> dict:
    """
    L{benchmarks.engine.machine}, and the versions of the storage.
    """
    found = machine()
    found["sqlite"] = sqlite3.sqlite_version
    for name, binary in (("redis_server", _redis_binary),
                         ("postgres", _postgres_binary)):
        try:
            found[name] = subprocess.run(
                [binary(), "--version"], capture_output=True, text=True,
                timeout=10).stdout.strip()
        except (throwaway.ServerUnavailable, OSError, subprocess.SubprocessError):
            found[name] = "not installed"
    return found


# Output.

def print_table(result: dict) -> None:
    print(f"session recovery by source, TLS {result['tls']}: lookup latency "
          f"and resumed handshakes")
    print(f"{'source':<10}{'p50 ms':>9}{'p99 ms':>9}{'>50 ms':>8}"
          f"{'resumed/s':>11}{'vs local':>10}{'server µs':>11}{'cpu µs':>8}"
          f"{'resumed':>9}")
    for name in result["resumed_per_s"]:
        lookup = result["lookup_ms"][name]
        ratio = result["ratio_to_local"].get(name)
        print(f"{name:<10}{lookup['p50']:>9.3f}{lookup['p99']:>9.3f}"
              f"{result['over_node_budget'][name]:>8}"
              f"{result['resumed_per_s'][name]:>11.0f}"
              f"{'-' if ratio is None else f'{ratio:.2f}':>10}"
              f"{result['server_us'][name]:>11.1f}"
              f"{result['server_cpu_us'][name]:>8.1f}"
              f"{result['resumed'][name]:>9}")
    for name, reason in result["skipped"].items():
        print(f"{name:<10}skipped: {reason}")
    print()
    size = result["size"]
    print(f"{size['rounds']} rounds (+1 warm-up) x {size['batch']} sessions "
          f"per source: {size['handshakes']} full + {size['handshakes']} "
          f"resumed handshakes in {result['seconds']:.0f} s")
    for key, value in result["machine"].items():
        print(f"{key}: {value}")
    print(f"command: {result['command']}")
    print()
    print("how each number is measured:")
    for key, text in result["method"].items():
        print(f"  {key}: {text}")


async def main(reactor: Any, options: argparse.Namespace) -> None:
    size = QUICK if options.quick else DEFAULT
    names = options.sources
    skipped = _unavailable(names)
    found = facts()
    runnable = [name for name in names if name not in skipped]
    print(f"measuring {size.handshakes(len(runnable))} resumed handshakes: "
          f"{size.rounds} rounds (+1 warm-up) x {size.batch} per source "
          f"({', '.join(runnable) or 'none'})", file=sys.stderr)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sslshare-bench-") as directory:
        bench = Bench(reactor, directory, options.tls)
        try:
            batches = await run(bench, runnable, size, skipped)
        finally:
            bench.remove_servers()
    found["load_average_1m_at_end"] = os.getloadavg()[0]
    measured = [name for name in names if name in batches]
    result = {
        **summarize({name: batches[name] for name in measured}),
        "skipped": {name: skipped[name] for name in names if name in skipped},
        "tls": options.tls,
        "size": {**attrs.asdict(size),
                 "handshakes": size.handshakes(len(measured))},
        "seconds": time.monotonic() - started,
        "machine": found,
        "command": shlex.join([sys.executable] + sys.argv),
        "method": LEGEND,
    }
    if options.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


def _sources(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SOURCES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown source {', '.join(unknown) or '(none)'}: choose from "
            f"{', '.join(SOURCES)}")
    return list(dict.fromkeys(names))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--quick", action="store_true",
                        help="about 30 s instead of about two minutes")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the table")
    parser.add_argument("--tls", choices=VERSIONS, default="1.3",
                        help="the TLS version of every handshake (default 1.3)")
    parser.add_argument("--sources", type=_sources, default=list(SOURCES),
                        help=f"comma-separated, from {','.join(SOURCES)} "
                             f"(default: all)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, arguments)))
