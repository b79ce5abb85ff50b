"""
In-memory doubles of what a node talks to, in the spirit of C{treq.testing}:
real L{Node}s with their real L{Recovery} and stores on one L{Clock}, and
only the wire in memory.  A L{MemoryNetwork} carries each peer command to
the handler of the node it names (after the network's latency on the
clock, or never for a stalled node); a L{MemoryRepository} keeps sealed
blobs in a dict with the repository's rules.  Nothing answers what it was
not asked.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from sslshare import sessionid
from sslshare.cluster import FetchAnswer, FetchTerms, PeerUnavailable
from sslshare.node import Node, NodeSettings
from sslshare.placement import BackupRing, Layout, Placement
from sslshare.recovery import LookupSettings, Recovery
from sslshare.repository import ISessionRepository, RepositoryError, Taken
from sslshare.state import StateKeys
from sslshare.store import SessionStore
from sslshare.tls import LookupRequest
from tests.support.sessions import session_id_of

CLUSTER = "test"
SERVICE = "web"
CONTEXT = sessionid.service_id_context(CLUSTER, SERVICE)
BUDGET = 0.3
LIFETIME = 3600
# The head of an OpenSSL session's DER, which says its TLS version
# (sslshare.state.der_protocol); the rest is the engine's.
DER_HEADS = {"TLSv1.2": b"\x30\x40\x02\x01\x01\x02\x02\x03\x03",
             "TLSv1.3": b"\x30\x40\x02\x01\x01\x02\x02\x03\x04"}


@attrs.define
class MemoryLink:
    """
    What a node reads of its link to one peer of a L{MemoryNetwork}.
    """

    peer_node_id: str
    network: MemoryNetwork
    counters: Counter[str] = attrs.Factory(Counter)

    @property
    def connected(self) -> bool:
        return (self.peer_node_id in self.network.nodes
                and self.peer_node_id not in self.network.down)


class MemoryNetwork:
    """
    The wire between in-memory nodes.

    @ivar down: nodes whose link is down: every command to them fails.
    @ivar unreachable: nodes whose link is up, but whose answers are lost:
        every command to them fails (a holder alive but not answering).
    @ivar stalled: nodes that take every command and never answer.
    @ivar latency: seconds on the clock before each answer arrives.
    @ivar linked: C{False}: the nodes share only a repository, each with no
        peer configured, so every command is refused as the real
        L{sslshare.cluster.Peers} refuses one to a node that is not a peer.
    @ivar sent: C{(command, from, to)} for every command sent.
    @ivar cancelled: C{(command, from, to)} for every command whose
        caller gave up before it was answered.
    """

    def __init__(self, clock: Clock, linked: bool = True) -> None:
        self.clock = clock
        self.linked = linked
        self.nodes: dict[str, Node] = {}
        self.down: set[str] = set()
        self.unreachable: set[str] = set()
        self.stalled: set[str] = set()
        self.latency = 0.0
        self.sent: list[tuple[str, str, str]] = []
        self.cancelled: list[tuple[str, str, str]] = []

    def send(self, command: str, sender: str, receiver: str,
             answer: object) -> Deferred:
        """
        Deliver C{command}: C{answer(handler)} is what the receiving
        node's handler says to it.
        """
        call = (command, sender, receiver)
        self.sent.append(call)
        if not self.linked:
            return fail(PeerUnavailable(receiver, "not a peer of this node"))
        if (receiver not in self.nodes or receiver in self.down
                or receiver in self.unreachable):
            return fail(PeerUnavailable(receiver, "not connected"))
        if receiver in self.stalled:
            return Deferred(lambda _: self.cancelled.append(call))
        if not self.latency:
            return succeed(answer(self.nodes[receiver]))

        def give_up(_: Deferred) -> None:
            self.cancelled.append(call)
            delivery.cancel()

        arriving: Deferred = Deferred(give_up)
        delivery = self.clock.callLater(
            self.latency,
            lambda: arriving.callback(answer(self.nodes[receiver])))
        return arriving


class MemoryPeers:
    """
    One node's peers on a L{MemoryNetwork}: the methods of
    L{sslshare.placement.PeerChannel}, each carried to the handler of the
    node it names, as L{sslshare.cluster.Peers} carries them over AMP.
    """

    def __init__(self, network: MemoryNetwork, node_id: str) -> None:
        self.network = network
        self.node_id = node_id
        self._links: dict[str, MemoryLink] = {}

    @property
    def links(self) -> tuple[MemoryLink, ...]:
        return tuple(link for link in map(self.link, sorted(self.network.nodes))
                     if link is not None)

    def link(self, node_id: str) -> MemoryLink | None:
        if (not self.network.linked or node_id == self.node_id
                or node_id not in self.network.nodes):
            return None
        return self._links.setdefault(node_id,
                                      MemoryLink(node_id, self.network))

    def connected_count(self) -> int:
        return sum(1 for link in self.links if link.connected)

    def fetch_session(self, node_id: str, session_id: bytes,
                      terms: FetchTerms | None = None,
                      ) -> Deferred[FetchAnswer]:
        return self.network.send(
            "fetch", self.node_id, node_id,
            lambda handler: handler.fetch_session(session_id, self.node_id,
                                                  terms))

    def backup_session(self, node_id: str, session_id: bytes,
                       sealed: bytes) -> Deferred[bool]:
        return self.network.send(
            "backup", self.node_id, node_id,
            lambda handler: handler.backup(session_id, sealed, self.node_id))

    def checkpoint_session(self, node_id: str, session_id: bytes, seq: int,
                           digest: bytes) -> Deferred[bool]:
        return self.network.send(
            "checkpoint", self.node_id, node_id,
            lambda handler: handler.checkpoint(session_id, seq, digest,
                                               self.node_id))

    def purge_session(self, node_id: str, session_id: bytes,
                      holder: str | None = None) -> Deferred[bool]:
        return self.network.send(
            "purge", self.node_id, node_id,
            lambda handler: handler.purge(session_id, self.node_id, holder))


@attrs.define
class _Row:
    sealed: bytes
    expires: float
    seq: int = 0
    digest: bytes = b""


@implementer(ISessionRepository)
class MemoryRepository:
    """
    A repository in a dict, with the rules every backend keeps
    (L{sslshare.repository}): C{take} reads and deletes at once, a blob is
    never served past its expiry, a C{put} keeps the stored checkpoint, a
    checkpoint is recorded only when newer and for a live blob.  A
    repository that is C{down} fails every operation with
    L{RepositoryError}, counted in C{errors}.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self.rows: dict[bytes, _Row] = {}
        self.down = False

    def _live(self, session_id: bytes) -> _Row | None:
        row = self.rows.get(session_id)
        if row is not None and row.expires <= self.clock.seconds():
            del self.rows[session_id]
            self.counters["expired"] += 1
            return None
        return row

    def _refused(self, operation: str) -> Deferred | None:
        if not self.down:
            return None
        self.counters["errors"] += 1
        return fail(RepositoryError(f"memory repository: {operation}: down"))

    def start(self) -> Deferred[None]:
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)

    def ping(self) -> Deferred[None]:
        return self._refused("ping") or succeed(None)

    def put(self, session_id: bytes, sealed: bytes,
            expires: float) -> Deferred[None]:
        refused = self._refused("put")
        if refused is not None:
            return refused
        self.counters["puts"] += 1
        kept = self._live(session_id)
        self.rows[session_id] = _Row(
            sealed, expires, *((kept.seq, kept.digest) if kept else ()))
        return succeed(None)

    def take(self, session_id: bytes) -> Deferred[Taken | None]:
        refused = self._refused("take")
        if refused is not None:
            return refused
        self.counters["takes"] += 1
        row = self._live(session_id)
        if row is None:
            self.counters["misses"] += 1
            return succeed(None)
        del self.rows[session_id]
        self.counters["hits"] += 1
        return succeed(Taken(row.sealed, row.seq, row.digest, row.expires))

    def checkpoint(self, session_id: bytes, seq: int,
                   digest: bytes) -> Deferred[bool]:
        refused = self._refused("checkpoint")
        if refused is not None:
            return refused
        row = self._live(session_id)
        if row is None or seq <= row.seq:
            self.counters["stale_checkpoints"] += 1
            return succeed(False)
        row.seq, row.digest = seq, digest
        self.counters["checkpoints"] += 1
        return succeed(True)

    def checkpoint_of(self, session_id: bytes
                      ) -> Deferred[tuple[int, bytes] | None]:
        refused = self._refused("checkpoint_of")
        if refused is not None:
            return refused
        row = self._live(session_id)
        return succeed(None if row is None else (row.seq, row.digest))

    def purge(self, session_id: bytes) -> Deferred[bool]:
        refused = self._refused("purge")
        if refused is not None:
            return refused
        self.counters["purges"] += 1
        return succeed(self.rows.pop(session_id, None) is not None)

    def expire(self) -> Deferred[int]:
        refused = self._refused("expire")
        if refused is not None:
            return refused
        now = self.clock.seconds()
        gone = [key for key, row in self.rows.items() if row.expires <= now]
        for key in gone:
            del self.rows[key]
        return succeed(len(gone))


class MemoryCluster:
    """
    Nodes of one cluster, each a real L{Node} with its L{Recovery}, on one
    L{Clock} and one L{MemoryNetwork}; with C{repository}, all share one
    L{MemoryRepository}, and with C{linked=False} nothing else.
    """

    def __init__(self, nodes: tuple[str, ...] = ("node1", "node2", "node3"),
                 repository: bool = False, linked: bool = True,
                 **settings: object) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.network = MemoryNetwork(self.clock, linked)
        self.keys = StateKeys([StateKeys.generate()])
        self.repository = MemoryRepository(self.clock) if repository else None
        ring = BackupRing({sessionid.owner_tag(CLUSTER, node_id): node_id
                           for node_id in nodes})
        for node_id in nodes:
            store = SessionStore(1 << 20, self.clock)
            placement = Placement(node_id, Layout(self.keys, ring),
                                  MemoryPeers(self.network, node_id),
                                  self.repository)
            recovery = Recovery(
                store, placement,
                LookupSettings(id_contexts={SERVICE: CONTEXT}, budget=BUDGET,
                               **settings),
                self.clock)
            self.network.nodes[node_id] = Node(store, placement, recovery,
                                               self.clock,
                                               NodeSettings(LIFETIME))

    def __getitem__(self, node_id: str) -> Node:
        return self.network.nodes[node_id]

    def new_session(self, node_id: str, protocol: str = "TLSv1.2") -> bytes:
        """
        A session that node C{node_id} makes, as its engine reports one,
        with its copy where the cluster keeps it.
        """
        session_id = session_id_of(node_id, CLUSTER)
        made_for = SimpleNamespace(service=SimpleNamespace(id_context=CONTEXT))
        self[node_id].new_session(made_for, session_id,
                                  DER_HEADS[protocol] + bytes(64))
        return session_id

    def backup_of(self, session_id: bytes, holder: str) -> str:
        """
        The node the copy of C{session_id} went to while C{holder} holds it.
        """
        holding = [node_id for node_id, node in self.network.nodes.items()
                   if node_id != holder and node.store.get(session_id)]
        assert len(holding) == 1, holding
        return holding[0]

    def lookup(self, node_id: str, session_id: bytes,
               protocol: str = "TLSv1.2", client: str | None = "192.0.2.1",
               ) -> Deferred:
        return self[node_id].recovery.recover(
            LookupRequest(session_id, protocol, SERVICE, client))

    def holders(self, session_id: bytes) -> dict[str, str]:
        """
        Node id -> the holder its copy of C{session_id} names.
        """
        return {node_id: state.holder
                for node_id, node in self.network.nodes.items()
                if (state := node.store.get(session_id)) is not None}
