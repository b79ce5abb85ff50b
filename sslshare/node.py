"""
What one cluster node does with sessions: keep the ones it makes (with a
copy in the repository or at the session's backup node), give one away
(move, not copy) when a peer asks for it, keep the running digest of every
connection's records and checkpoint it outside the node, and count what
happens.

L{Node} is the glue between the engine's hooks (a new session, a finished
handshake), the recovery chain, and the peer channel's commands
(L{sslshare.cluster.ICommandHandler}).  It holds no sockets and does no TLS.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Set as AbstractSet
from typing import TypeVar

import attrs
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sslshare import sessionid
from sslshare.cluster import FetchAnswer, FetchTerms, ICommandHandler
from sslshare.digest import COUNTERS as CHECKPOINT_COUNTERS
from sslshare.digest import (
    ChainExhausted,
    CheckpointPipeline,
    CheckpointPolicy,
    FailureLog,
    RunningDigest,
    exporter,
)
from sslshare.logs import RateLimitedWarning
from sslshare.placement import REPOSITORY, PeerChannel, PeerServer, Placement
from sslshare.recovery import LOOKUP_SOURCES, Recovered, Recovery
from sslshare.repository import ISessionRepository
from sslshare.state import SealError, SessionState, StateKeys, der_protocol
from sslshare.store import SessionStore
from sslshare.hooks import LookupRequest
from sslshare.tls import Connection, ServerContext

_T = TypeVar("_T")

# Sessions on their way to their new place at once when a node stops: enough
# to keep a peer link or the repository's threads busy, few enough not to
# queue a whole store's worth of calls.
HANDOVER_CONCURRENCY = 32


def fired_within(waiting: Deferred[_T], seconds: float,
                 clock: IReactorTime) -> Deferred[bool]:
    """
    Fires with C{True} once C{waiting} fires, or with C{False} after
    C{seconds}, whichever comes first.  Unlike C{addTimeout}, it does not
    rely on C{waiting} honouring a cancellation: a stopping node waits no
    longer than it said, whatever it waits for.  C{waiting}'s result is
    consumed.
    """
    first: Deferred[bool] = Deferred()

    def at_deadline() -> None:
        if not first.called:
            first.callback(False)

    deadline = clock.callLater(max(0.0, seconds), at_deadline)

    def fired(_: object) -> None:
        if not first.called:
            deadline.cancel()
            first.callback(True)

    waiting.addBoth(fired)
    return first


@attrs.frozen
class NodeSettings:
    """
    What a reload may change of how a node keeps its sessions.

    @ivar session_lifetime: seconds a new session stays resumable.
    @ivar checkpoint: when the running digest of a connection's records is
        checkpointed outside the node.
    """

    session_lifetime: int
    checkpoint: CheckpointPolicy = CheckpointPolicy()


COUNTERS = (
    "full", "resumed_local", "resumed_peer", "resumed_repository",
    "handshake_timeouts", "sessions_made", "sessions_unstorable",
    "sessions_given", "repository_put_failures", "backups_kept",
    "backups_refused", "backup_failures", "backups_moved", "copies_withheld",
    "sessions_handed_over", "handover_failures", "reloads",
    "reload_failures", "backend_failures", "fetches_refused",
    "refused_checkpoints", "refused_purges", "late_checkpoints",
    "tombstones_moved", "purge_failures", "chains_exhausted",
    "connections_refused", "idle_timeouts", "received_bytes", "sent_bytes")
"""Every counter of L{Node.counters}: the stats show each, zero included."""


@implementer(ICommandHandler)
class Node:
    """
    One node's sessions.

    @ivar counters: handshakes by outcome (C{full}, C{resumed_local},
        C{resumed_peer}, C{resumed_repository}, C{handshake_timeouts}),
        C{sessions_made}, C{sessions_given}, C{repository_put_failures},
        C{backups_kept}, C{backups_refused}, C{backup_failures},
        C{backups_moved} (copies given to a backup node that had none,
        as when the one before it in the ring went down),
        C{sessions_handed_over} and C{handover_failures} (when the node
        stopped), C{reloads} and C{reload_failures}, C{backend_failures}
        (clients closed because their backend connection failed),
        C{fetches_refused} (a peer asked for a session its handshake
        cannot resume: kept here), C{refused_checkpoints} and
        C{refused_purges} (from a peer that
        does not hold the session), C{late_checkpoints} (from a former
        holder, covered by the copy kept), C{tombstones_moved} (a
        tombstone that named the node a session went to, told by it where
        the session went next), C{purge_failures} (an old copy of a
        session at another node could not be dropped: given away, or
        replaced by a copy at a new backup node), C{chains_exhausted}
        (a digest chain at its bound, no longer digested),
        C{connections_refused} (clients past C{max_connections}),
        C{idle_timeouts} (connections closed for their silence),
        C{received_bytes} and C{sent_bytes} (plaintext from clients to their
        backend, and back).
    @ivar checkpoint_counters: the checkpoint pipelines' C{written},
        C{rejected}, C{coalesced}, C{failed}, C{pauses}.
    @ivar discovery_counters: the counters of the peers' lookups in DNS
        (L{sslshare.cluster.PeerDiscovery}), when the peers are found so.
    @ivar open_connections: the number of client connections open now.
    @ivar placement: where the node's sessions and checkpoints go.
    @ivar settings: the node's settings in force; a reload replaces them
        whole.
    """

    _log = Logger()

    def __init__(self, store: SessionStore, placement: Placement,
                 recovery: Recovery, clock: IReactorTime,
                 settings: NodeSettings) -> None:
        self.store = store
        self.placement = placement
        self.recovery = recovery
        self.clock = clock
        self.settings = settings
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self.checkpoint_counters: Counter[str] = Counter(
            dict.fromkeys(CHECKPOINT_COUNTERS, 0))
        self.discovery_counters: Counter[str] | None = None
        self.context: ServerContext | None = None
        self.open_connections: Callable[[], int] = lambda: 0
        self._warnings = RateLimitedWarning(clock)
        # Apart: a backend outage must not hide the cluster's warnings.
        self._backend_warnings = RateLimitedWarning(clock)
        self._checkpoint_failures = FailureLog(clock)
        # Weak: a pipeline lives as long as its connection.
        self._pipelines: weakref.WeakSet[CheckpointPipeline] = weakref.WeakSet()

    # What the node runs with, as its placement has it.

    @property
    def node_id(self) -> str:
        return self.placement.node_id

    @property
    def keys(self) -> StateKeys:
        return self.placement.keys

    @property
    def repository(self) -> ISessionRepository | None:
        """
        The central repository every new session is also written to, or
        C{None}.
        """
        return self.placement.repository

    @property
    def peer_links(self) -> PeerChannel:
        return self.placement.peers

    @property
    def peer_server(self) -> PeerServer | None:
        """
        The peers' connections to this node, when it listens for them.
        """
        return self.placement.peer_server

    def stop(self) -> None:
        """
        Stop every connection's checkpoint pipeline: the node is going.
        """
        for pipeline in list(self._pipelines):
            pipeline.stop()

    def hand_over(self, within: float) -> Deferred[Counter[str]]:
        """
        Move every session this node holds to where the cluster looks for
        it once this node is gone: the repository when there is one, else
        the session's backup node, which the recovery chain asks when the
        holder cannot answer (a L{sslshare.cluster.Backup} that replaces
        the copy it may keep already).  The node keeps none of them, handed
        over or not: a move, never a copy.  Backup copies this node keeps
        for other holders are left alone; they go with the node.

        @param within: seconds the whole handover may take; what is still
            on its way then counts as failed.
        @return: fires with the count of sessions by where they went (a
            node id or C{"repository"}) and C{"failed"}.
        """
        held = [state for state in self.store.sessions()
                if state.holder == self.node_id]
        for state in held:
            self.store.take(state.session_id)
        moved: Counter[str] = Counter()
        limiter = DeferredSemaphore(HANDOVER_CONCURRENCY)

        def move(state: SessionState) -> Deferred[None]:
            moving = limiter.run(self._hand_over_one, state)
            return moving.addCallback(lambda where: moved.update((where,)))

        everything = DeferredList([move(state) for state in held],
                                  consumeErrors=True)

        def done(_: bool) -> Counter[str]:
            counted = Counter(moved)
            counted["failed"] += len(held) - sum(counted.values())
            self.counters["sessions_handed_over"] += len(held) - counted["failed"]
            self.counters["handover_failures"] += counted["failed"]
            return counted

        return fired_within(everything, within, self.clock).addCallback(done)

    def _hand_over_one(self, state: SessionState) -> Deferred[str]:
        copy = self.placement.write_copy(state)
        if copy is None:
            # A cluster of one: there is nowhere to go.
            return succeed("failed")
        where, moving = copy

        def arrived(kept: bool) -> str:
            return where if kept else "failed"

        def failed(reason: Failure) -> str:
            if not reason.check(CancelledError):
                self._warnings.warn("could not hand session {session} over: "
                                    "{why}", why=reason.getErrorMessage(),
                                    session=sessionid.describe(state.session_id))
            return "failed"

        return moving.addCallback(arrived).addErrback(failed)

    # The engine's hooks.

    def new_session(self, connection: Connection, session_id: bytes,
                    der: bytes) -> None:
        now = self.clock.seconds()
        try:
            state = SessionState(
                session_id=session_id,
                id_context=connection.service.id_context,
                der=der,
                holder=self.node_id,
                created=now,
                expires=now + self.settings.session_lifetime,
            )
        except ValueError as e:
            # Not worth failing a handshake for: the client simply cannot
            # resume this one.
            self.counters["sessions_unstorable"] += 1
            self._log.warn("cannot keep session {session}: {why}",
                           session=sessionid.describe(session_id), why=str(e))
            return
        self.store.put(state)
        self.counters["sessions_made"] += 1
        # The repository runs a session's operations in order: its
        # checkpoints and takes come after this put.
        copy = self.placement.write_copy(state)
        if copy is not None:
            where, writing = copy
            self.store.note_copy(session_id, where)
            writing.addErrback(self._copy_failed, where)

    def _copy_failed(self, reason: Failure, where: str) -> None:
        # Fail open: the session stays resumable while this node lives.
        if where == REPOSITORY:
            self.counters["repository_put_failures"] += 1
            self._warnings.warn("could not write a new session to the "
                                "repository: {why}",
                                why=reason.getErrorMessage())
        else:
            self.counters["backup_failures"] += 1
            self._warnings.warn("could not give node {peer} its backup copy: "
                                "{why}", peer=where,
                                why=reason.getErrorMessage())

    def backend_failed(self, backend: str, client: str, reason: Failure) -> None:
        """
        Count and log (at a bounded rate) a client whose backend connection
        failed; its connection is being closed.
        """
        self.counters["backend_failures"] += 1
        self._backend_warnings.warn(
            "backend {backend} unreachable, closing client {client}: {why}",
            backend=backend, client=client, why=reason.getErrorMessage())

    def lookup(self, request: LookupRequest) -> Deferred[Recovered | None]:
        return self.recovery.recover(request)

    def handshake_done(self, connection: Connection | None,
                       found: Recovered | None = None,
                       pause: Callable[[], object] | None = None,
                       resume: Callable[[], object] | None = None,
                       ) -> CheckpointPipeline | None:
        """
        Count a finished handshake, and start the running digest of its
        records (continuing the chain of a resumed session).

        @param found: what the lookup found for it, if anything.
        @param pause: stops the connection's traffic while the checkpoint
            store lags past its bound; C{resume} starts it again.
        @return: the connection's checkpoint pipeline, to flush when it
            closes; C{None} when checkpoints are off or the handshake timed
            out (C{connection} is C{None}).
        """
        if connection is None:
            self.counters["handshake_timeouts"] += 1
            return None
        if not connection.session_reused():
            self.counters["full"] += 1
            found = None
        else:
            source = "local" if found is None else found.source
            self.counters[f"resumed_{source}"] += 1
        if self.settings.checkpoint.mode == "off":
            return None
        return self._record(connection, None if found is None else found.state,
                            pause, resume)

    def _record(self, connection: Connection, state: SessionState | None,
                pause: Callable[[], object] | None,
                resume: Callable[[], object] | None) -> CheckpointPipeline:
        session_id = connection.get_session_id()
        if state is not None and state.seq > 0:
            chain = RunningDigest.resume(state.seq, state.digest)
            start = (state.seq, state.digest)
            if session_id != state.session_id:
                # TLS 1.3: the chain goes on under the ticket just issued.
                self.store.update_checkpoint(session_id, state.seq, state.digest)
        else:
            chain = RunningDigest.start(session_id,
                                        exporter(connection, session_id))
            start = (0, b"")
        pipeline = CheckpointPipeline(
            session_id, self._write_checkpoint, self.clock,
            self.settings.checkpoint, start=start, pause=pause, resume=resume,
            counters=self.checkpoint_counters,
            failure_log=self._checkpoint_failures,
            keep=self.store.update_checkpoint)
        self._pipelines.add(pipeline)
        update, enqueue = chain.update, pipeline.enqueue

        def observe(direction: int, data: bytes) -> None:
            try:
                mark = update(direction, data)
            except ChainExhausted:
                # The client is served on; its records are no longer
                # digested.
                connection.record_observer = None
                self.counters["chains_exhausted"] += 1
                self._warnings.warn("stopped the digest of session {session}: "
                                    "its chain is at the bound",
                                    session=sessionid.describe(session_id))
                return
            enqueue(*mark)

        connection.record_observer = observe
        return pipeline

    def _write_checkpoint(self, session_id: bytes, seq: int,
                          digest: bytes) -> Deferred[bool] | bool:
        """
        Where a checkpoint goes: this node's store, and outside the node —
        the repository when there is one, else the session's backup node.
        """
        self.store.update_checkpoint(session_id, seq, digest)
        checkpoint = self.placement.write_checkpoint(session_id, seq, digest)
        if checkpoint is None:
            # A cluster of one: there is nowhere outside.
            return True
        where, writing = checkpoint
        if where == REPOSITORY:
            return writing
        return writing.addCallback(self._checkpoint_answered, session_id,
                                   where)

    def _checkpoint_answered(self, accepted: bool, session_id: bytes,
                             backup: str) -> Deferred[bool] | bool:
        """
        The session's backup node answered a checkpoint; if it keeps no
        copy of the session (it has just become its backup node because
        the one before it in the ring is down, or it restarted), give it
        one, checkpoint included, and drop the copies the other nodes of
        the ring may still keep.
        """
        if accepted:
            return True
        state = self.store.get(session_id)
        if state is None or state.holder != self.node_id:
            # Given away meanwhile: its checkpoints are no longer ours.
            return False
        self.counters["backups_moved"] += 1

        def given(kept: bool) -> bool:
            held = self.store.get(session_id)
            if kept and held is not None and held.holder == self.node_id:
                # The purge of the copy before may not arrive (a node cut
                # off, not down, keeps it): later purges go to every node.
                self.store.note_copy(session_id, None)
                self._purge_copies(session_id, self.node_id, {backup},
                                   self.node_id, None)
            return kept

        giving = self.placement.peers.backup_session(backup, session_id,
                                                     self.keys.seal(state))
        return giving.addCallback(given)

    # What peers ask (ICommandHandler); the requester is the node id from
    # the peer's verified certificate.

    def fetch_session(self, session_id: bytes, requester: str,
                      terms: FetchTerms | None = None) -> FetchAnswer:
        kept = self.store.get(session_id)
        if (kept is not None and kept.holder not in (self.node_id, requester)
                and self.placement.alive(kept.holder)):
            # A backup copy whose holder still runs: the session is the
            # holder's to give, or the same session could be served twice.
            self.counters["copies_withheld"] += 1
            return FetchAnswer("redirect", holder=kept.holder)
        key_id = None
        if kept is not None and terms is not None:
            refusal = self._fetch_refusal(kept, terms)
            if refusal is not None:
                # Before anything moves: the client that can resume it may
                # still come.
                self.counters["fetches_refused"] += 1
                self._warnings.warn("kept session {session} that {peer} "
                                    "asked for: {why}", peer=requester,
                                    why=refusal,
                                    session=sessionid.describe(session_id))
                return FetchAnswer("refused")
            key_id = self.keys.sealing_key_for(terms.key_ids)
        written = self.store.copy_at(session_id)
        state = self.store.take(session_id)
        if state is not None:
            given = state.with_holder(requester)
            # The requester holds it from now on; whoever asks us later is
            # sent there, and a copy of it from before is an old one.
            self.store.tombstone(session_id, requester, given.expires,
                                 given.moves)
            # Counted, not logged: twistd writes debug events too, and
            # this is one per peer resumption.
            self.counters["sessions_given"] += 1
            self._purge_other_copy(state, requester, written)
            return FetchAnswer("found", self.keys.seal(given, key_id))
        holder = self.store.holder(session_id)
        if holder not in (None, requester, self.node_id):
            return FetchAnswer("redirect", holder=holder)
        return FetchAnswer("missing")

    def _fetch_refusal(self, state: SessionState,
                       terms: FetchTerms) -> str | None:
        """
        Why the handshake that asks under C{terms} cannot resume C{state},
        or C{None}.
        """
        problem = state.unresumable(terms.protocol, terms.id_context)
        if problem is not None:
            return problem
        if self.keys.sealing_key_for(terms.key_ids) is None:
            return (f"none of its state keys "
                    f"({', '.join(k.hex() for k in terms.key_ids)}) is one of "
                    f"this node's ({', '.join(k.hex() for k in self.keys.key_ids)})")
        return None

    def _purge_other_copy(self, given: SessionState, requester: str,
                          written: str | None) -> None:
        """
        What this node just gave away leaves the nodes that may keep a
        backup copy of it, told by this node: a session it held, as its
        holder (its copy is where this node C{written} it, when it did);
        a backup copy it kept, for a holder that could not answer (that
        holder's own copy stays: a node drops its own sessions on nobody's
        word).  A TLS 1.2 session whose new holder has the same backup node
        is left there: the new holder's copy replaces it.  A TLS 1.2
        session, resumed again and again, is looked for at its owner first:
        the owner is told too, and its tombstone names the new holder.
        """
        session_id = given.session_id
        kept = {requester}
        told: set[str] = set()
        if der_protocol(given.der) == "TLSv1.2":
            backup = self.placement.backup_node(session_id, requester)
            if backup is not None:
                kept.add(backup)
            owner = self.placement.owner(session_id)
            if owner is not None:
                told.add(owner)
        self._purge_copies(session_id, given.holder, kept, requester, written,
                           told)

    def _purge_copies(self, session_id: bytes, holder: str, kept: set[str],
                      successor: str, written: str | None,
                      told: AbstractSet[str] = frozenset()) -> None:
        """
        Tell the nodes that may keep a backup copy of C{session_id} naming
        C{holder} (L{Placement.copy_nodes}) and the nodes C{told}, but
        C{kept} and this node, to drop it: C{successor} holds the session
        now.
        """
        others = self.placement.copy_nodes(session_id, holder, written) | told
        named = None if successor == self.node_id else successor
        for other, purging in self.placement.purge_copies(
                session_id, others - kept, named):
            purging.addErrback(self._purge_failed, other)

    def _purge_failed(self, reason: Failure, peer: str) -> None:
        # A peer that cannot be told is usually a peer that is down, and
        # lost what it held.
        self.counters["purge_failures"] += 1
        self._warnings.warn("could not tell node {peer} to drop a session "
                            "it no longer holds: {why}", peer=peer,
                            why=reason.getErrorMessage())

    def checkpoint(self, session_id: bytes, seq: int, digest: bytes,
                   requester: str) -> bool:
        """
        Record the checkpoint of a copy this node keeps for C{requester},
        its holder; the checkpoint of a session anyone else holds is not
        C{requester}'s to write.  One the copy already covers is a former
        holder's, sent before the session moved and overtaken by the new
        holder's copy, which carries it: it changes nothing and is counted,
        not warned about.
        """
        kept = self.store.holder_and_seq(session_id)
        if kept is not None and kept[0] != requester:
            if seq <= kept[1]:
                self.counters["late_checkpoints"] += 1
            else:
                self._refused_peer("Checkpoint", session_id, requester,
                                   kept[0])
            return False
        return self.store.update_checkpoint(session_id, seq, digest)

    def purge(self, session_id: bytes, requester: str,
              successor: str | None = None) -> bool:
        """
        Drop this node's copy of a session C{successor} (C{None}:
        C{requester}) now holds, leaving a tombstone that sends whoever
        asks here to it.  The copy's holder may say so; anyone, for a
        backup copy whose holder is gone (it would serve only then, and a
        session recovered from another copy meanwhile would be served
        twice); never for a session this node holds itself.  With a
        repository any peer may: the repository decides who holds a
        session, and this node resumes its own only once it has taken the
        repository's copy.  Without a copy, a tombstone here that names
        C{requester} (this node gave it the session, or was told it went
        there) is moved to C{successor}: lookups that reach this node
        (every node asks a session's owner first) are sent to where the
        session is, not to where it was, one redirect fewer.
        """
        successor = successor or requester
        holder = self.store.held_by(session_id)
        if holder is None:
            if (successor != requester
                    and self.store.move_tombstone(session_id, requester,
                                                  successor)):
                self.counters["tombstones_moved"] += 1
            return False
        if not (holder == requester or self.repository is not None
                or (holder != self.node_id
                    and not self.placement.alive(holder))):
            self._refused_peer("Purge", session_id, requester, holder)
            return False
        state = self.store.take(session_id)
        if state is None:
            return False
        self.store.tombstone(session_id, successor, state.expires, state.moves)
        return True

    def _refused_peer(self, command: str, session_id: bytes, requester: str,
                      holder: str) -> None:
        self.counters[f"refused_{command.lower()}s"] += 1
        self._warnings.warn(
            "refused {command} of session {session} from {peer}: node "
            "{holder} holds it", command=command, peer=requester,
            holder=holder, session=sessionid.describe(session_id))

    def backup(self, session_id: bytes, sealed: bytes, requester: str) -> bool:
        """
        Keep a copy of a session C{requester} holds, if it opens as one of
        this node's services and names C{requester} as its holder, and this
        node does not hold the session itself: then the copy is older than
        the move that brought the session here.
        """
        kept = self.store.get(session_id)
        if kept is not None and kept.holder == self.node_id:
            self.counters["backups_refused"] += 1
            return False
        for context in self.recovery.settings.id_contexts.values():
            try:
                state = self.keys.open(sealed, session_id, context)
            except SealError:
                continue
            if state.holder != requester:
                break
            self.store.put(state)
            self.counters["backups_kept"] += 1
            return True
        self.counters["backups_refused"] += 1
        return False

    def stats(self) -> dict[str, int | float]:
        """
        Every counter of this node, flat: the node's own and its open
        client connections (C{connections_open}), then the engine's
        (C{engine.}), the recovery chain's (C{recovery.}), the store's
        (C{store.}), the repository's, the checkpoint pipelines', the count
        and total seconds of the lookups that ended at each of
        L{LOOKUP_SOURCES} (C{lookup.<source>.count}, C{.seconds}), whether
        each peer is connected (C{peers.<node id>.connected}, 0 or 1) and
        how many calls it did not answer in time (C{.call_timeouts}), the
        peer channel's (C{cluster.}), and the peers' lookups in DNS
        (C{discovery.}) when they are found so.  C{sslshare stats} and the
        metrics page both show these numbers.
        """
        numbers: dict[str, int | float] = dict(self.counters)
        numbers["connections_open"] = self.open_connections()
        failed = 0
        if self.context is not None:
            for name, count in self.context.counters.items():
                numbers[f"engine.{name}"] = count
                if name.startswith("failed:"):
                    failed += count
        numbers["failed"] = failed + self.counters["handshake_timeouts"]
        for name, count in self.recovery.counters.items():
            numbers[f"recovery.{name}"] = count
        for name, count in self.store.counters.items():
            numbers[f"store.{name}"] = count
        if self.repository is not None:
            for name, count in self.repository.counters.items():
                numbers[f"repository.{name}"] = count
        for name, count in self.checkpoint_counters.items():
            numbers[f"checkpoint.{name}"] = count
        for name, count in (self.discovery_counters or {}).items():
            numbers[f"discovery.{name}"] = count
        numbers["store.sessions"] = len(self.store)
        numbers["store.bytes"] = self.store.bytes_used
        for source in LOOKUP_SOURCES:
            numbers[f"lookup.{source}.count"] = self.recovery.latency.count(source)
            numbers[f"lookup.{source}.seconds"] = self.recovery.latency.sum(source)
        if self.peer_links is not None:
            numbers["peers.connected"] = self.peer_links.connected_count()
            for link in self.peer_links.links:
                numbers[f"peers.{link.peer_node_id}.connected"] = int(
                    link.connected)
                numbers[f"peers.{link.peer_node_id}.call_timeouts"] = (
                    link.counters["call_timeouts"])
        if self.peer_server is not None:
            numbers.update(self.peer_server.stats())
        return numbers
