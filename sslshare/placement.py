"""
Where a session's copies and checkpoints go, and so where the cluster looks
for a session whose holder cannot answer: the repository when the node has
one, else the session's backup node in the L{BackupRing}.

L{Placement} is the one place that decides it.  The node asks it where to
write a new session's copy, a checkpoint, or a session it hands over when
it stops; the recovery chain asks it which node to try when a holder cannot
answer, and which nodes keep the copies a move leaves behind.  It holds
what those answers depend on: the node's state keys and ring (a frozen
L{Layout} that a reload replaces whole), its repository, its peer links,
and whether a peer evidently runs.

It decides where, never whether: what to do with a session is the node's
and the recovery chain's.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Protocol

import attrs
from twisted.internet.defer import Deferred

from sslshare import sessionid
from sslshare.repository import ISessionRepository
from sslshare.state import SessionState, StateKeys

if TYPE_CHECKING:
    from collections import Counter

    from sslshare.cluster import FetchAnswer, FetchTerms

# Where a copy went when it went to the repository rather than to a node.
REPOSITORY = "repository"


@attrs.frozen
class BackupRing:
    """
    The cluster's node ids in sorted order, and the owner tag of each.  The
    backup copy of a session goes to the first node after its owner (the
    node its id's owner tag names) that is not its holder and is alive;
    every node computes the same answer from the id and the nodes that run,
    so whoever looks for a session whose holder is gone knows where the
    copy is, and a backup node that is down hands its part to the next
    live one.

    @ivar owners: owner tag -> node id, for every node of the cluster.
    """

    owners: Mapping[bytes, str]
    _nodes: tuple[str, ...] = attrs.field(init=False)

    @_nodes.default
    def _sorted_nodes(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.owners.values())))

    def owner(self, session_id: bytes) -> str | None:
        """
        The node named by C{session_id}'s owner tag, or C{None} when the
        tag names no node of the cluster.
        """
        try:
            return self.owners.get(sessionid.owner_of(session_id))
        except ValueError:
            return None

    def candidates(self, session_id: bytes, holder: str) -> list[str]:
        """
        Every node that may keep the backup copy of C{session_id} while
        C{holder} holds it, in the ring's order, alive or not.
        """
        owner = self.owner(session_id)
        if owner is None:
            return []
        start = self._nodes.index(owner)
        ring = (self._nodes[(start + step) % len(self._nodes)]
                for step in range(1, len(self._nodes) + 1))
        return [node for node in ring if node != holder]


@attrs.frozen
class Layout:
    """
    What a reload may change of where sessions go: the state keys that
    seal their copies, and the ring of the cluster's nodes.
    """

    keys: StateKeys
    ring: BackupRing


class PeerLinkState(Protocol):
    """
    What the node reads of one peer link (L{sslshare.cluster.PeerLink}).
    """

    @property
    def peer_node_id(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    @property
    def counters(self) -> Counter[str]: ...


class PeerChannel(Protocol):
    """
    The node's links to its peers and the commands it sends them, as
    L{sslshare.cluster.Peers} provides them.  Each command fails when the
    peer cannot be asked.
    """

    @property
    def links(self) -> tuple[PeerLinkState, ...]: ...

    def link(self, node_id: str) -> PeerLinkState | None: ...

    def connected_count(self) -> int: ...

    def fetch_session(self, node_id: str, session_id: bytes,
                      terms: FetchTerms | None = None,
                      ) -> Deferred[FetchAnswer]: ...

    def backup_session(self, node_id: str, session_id: bytes,
                       sealed: bytes) -> Deferred[bool]: ...

    def checkpoint_session(self, node_id: str, session_id: bytes, seq: int,
                           digest: bytes) -> Deferred[bool]: ...

    def purge_session(self, node_id: str, session_id: bytes,
                      holder: str | None = None) -> Deferred[bool]: ...


class PeerServer(Protocol):
    """
    The peers' connections to this node, as
    L{sslshare.cluster.PeerServerFactory} keeps them.
    """

    def connected_peers(self) -> Collection[str]: ...

    def stats(self) -> dict[str, int]: ...


class Placement:
    """
    Where one node's sessions and checkpoints go, and where the copies of
    the others' are.

    @ivar layout: the state keys and the ring in force; a reload replaces
        it whole.
    @ivar peers: the node's peer links.
    @ivar repository: the central repository, or C{None}: then the copies
        go to backup nodes.
    @ivar peer_server: the peers' connections to this node, when it
        listens for them.
    """

    def __init__(self, node_id: str, layout: Layout, peers: PeerChannel,
                 repository: ISessionRepository | None = None,
                 peer_server: PeerServer | None = None,
                 ) -> None:
        self.node_id = node_id
        self.layout = layout
        self.peers = peers
        self.repository = repository
        self.peer_server = peer_server

    @property
    def keys(self) -> StateKeys:
        return self.layout.keys

    def owner(self, session_id: bytes) -> str | None:
        """
        The node named by C{session_id}'s owner tag (L{BackupRing.owner}).
        """
        return self.layout.ring.owner(session_id)

    def alive(self, node_id: str) -> bool:
        """
        Whether node C{node_id} evidently runs: this node's link to it is
        up, or it holds a connection to this node.
        """
        link = self.peers.link(node_id)
        if link is not None and link.connected:
            return True
        return (self.peer_server is not None
                and node_id in self.peer_server.connected_peers())

    def backup_node(self, session_id: bytes, holder: str) -> str | None:
        """
        The peer that keeps the backup copy of C{session_id} while
        C{holder} holds it: the first of the ring's candidates that is
        this node or alive, else the first.  C{None} with a repository,
        which keeps the copies instead, and when that node is this one or
        there is none.
        """
        if self.repository is not None:
            return None
        candidates = self.layout.ring.candidates(session_id, holder)
        backup = next((node for node in candidates
                       if node == self.node_id or self.alive(node)),
                      candidates[0] if candidates else None)
        return None if backup == self.node_id else backup

    def backup_nodes(self, session_id: bytes, holder: str) -> set[str]:
        """
        The peers that may keep a backup copy of C{session_id} naming
        C{holder}: every node of the ring but the holder and this one,
        since the copy went to whichever was the first live one when it
        was written; none with a repository, which keeps the copies
        instead.
        """
        if self.repository is not None:
            return set()
        return (set(self.layout.ring.candidates(session_id, holder))
                - {self.node_id})

    def copy_nodes(self, session_id: bytes, holder: str,
                   written: str | None) -> set[str]:
        """
        The peers that may keep a backup copy of C{session_id} naming
        C{holder}: C{written}, the node the holder last wrote its copy to,
        when the holder knows it, since only the holder writes one (a
        backup node that stops takes what it keeps with it, and an earlier
        holder's copies went when it gave the session away); else every
        one of L{backup_nodes}.  The purges that keep a session in one
        place go to these, one node instead of every other node of the
        ring.
        """
        if written is None:
            return self.backup_nodes(session_id, holder)
        if self.repository is not None or written == REPOSITORY:
            return set()
        return {written} - {self.node_id}

    def purge_copies(self, session_id: bytes, nodes: AbstractSet[str],
                     holder: str | None = None
                     ) -> list[tuple[str, Deferred[bool]]]:
        """
        Tell each of C{nodes} (this node left out) to drop its copy of
        C{session_id}, which C{holder} (C{None}: this node) holds now.  A
        node that is not a peer cannot be told, and need not be: nodes
        that share only a repository take from it before they serve a copy
        of their own, and that take is what moved the session.

        @return: each node told and whether it held a copy.
        """
        return [(node, self.peers.purge_session(node, session_id, holder))
                for node in sorted(nodes - {self.node_id})
                if self.peers.link(node) is not None]

    def write_copy(self, state: SessionState
                   ) -> tuple[str, Deferred[bool]] | None:
        """
        Write a sealed copy of C{state}, a session this node holds, where
        the cluster looks for it once this node cannot answer: the
        repository, else its backup node, which replaces the copy it may
        keep already.

        @return: where it goes (L{REPOSITORY} or the backup's node id) and
            whether it was kept there; C{None} when there is nowhere to go
            (a cluster of one).
        """
        session_id = state.session_id
        if self.repository is not None:
            writing = self.repository.put(session_id, self.keys.seal(state),
                                          state.expires)
            return REPOSITORY, writing.addCallback(lambda _: True)
        backup = self.backup_node(session_id, self.node_id)
        if backup is None:
            return None
        return backup, self.peers.backup_session(backup, session_id,
                                                 self.keys.seal(state))

    def write_checkpoint(self, session_id: bytes, seq: int, digest: bytes
                         ) -> tuple[str, Deferred[bool]] | None:
        """
        Write the checkpoint of C{session_id}, a session this node holds,
        beside its copy outside the node (L{write_copy}).

        @return: where it goes and whether it was newer than the one kept
            there (a backup node that keeps no copy of the session says
            no); C{None} when there is nowhere to go.
        """
        if self.repository is not None:
            return REPOSITORY, self.repository.checkpoint(
                session_id, seq,
                self.keys.seal_checkpoint(session_id, seq, digest))
        backup = self.backup_node(session_id, self.node_id)
        if backup is None:
            return None
        return backup, self.peers.checkpoint_session(backup, session_id, seq,
                                                     digest)
