"""
What one cluster node does with sessions: keep the ones it makes, give one
away (move, not copy) when a peer asks for it, and count what happens.

L{Node} is the glue between the engine's hooks (a new session, a finished
handshake), the recovery chain, and the peer channel's commands
(L{sslshare.cluster.ICommandHandler}).  It holds no sockets and does no TLS.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from sslshare import sessionid
from sslshare.cluster import FetchAnswer, ICommandHandler
from sslshare.logs import RateLimitedWarning
from sslshare.recovery import Recovered, Recovery
from sslshare.state import SessionState, StateKeys
from sslshare.store import SessionStore
from sslshare.tls import Connection, LookupRequest, ServerContext


@implementer(ICommandHandler)
class Node:
    """
    One node's sessions.

    @ivar counters: handshakes by outcome (C{full}, C{resumed_local},
        C{resumed_peer}, C{resumed_repository}, C{handshake_timeouts}),
        C{sessions_made}, C{sessions_given}, C{repository_put_failures}.
    @ivar repository: the central repository every new session is also
        written to, or C{None}.
    """

    _log = Logger()

    def __init__(self, node_id: str, store: SessionStore, keys: StateKeys,
                 recovery: Recovery, clock: IReactorTime,
                 session_lifetime: int, repository: Any = None) -> None:
        self.node_id = node_id
        self.repository = repository
        self._warnings = RateLimitedWarning(clock)
        self.store = store
        self.keys = keys
        self.recovery = recovery
        self.clock = clock
        self.session_lifetime = session_lifetime
        self.counters: Counter[str] = Counter()
        self.context: ServerContext | None = None
        self.peer_links: Any = None

    # The engine's hooks.

    def new_session(self, connection: Connection, session_id: bytes,
                    der: bytes) -> None:
        now = self.clock.seconds()
        try:
            state = SessionState(
                session_id=session_id,
                id_context=connection.service.id_context,
                der=der,
                owner=self.node_id,
                created=now,
                expires=now + self.session_lifetime,
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
        if self.repository is not None:
            writing = self.repository.put(session_id, self.keys.seal(state),
                                          state.expires)
            writing.addErrback(self._repository_put_failed)

    def _repository_put_failed(self, reason: Any) -> None:
        # Fail open: the session stays resumable through this node.
        self.counters["repository_put_failures"] += 1
        self._warnings.warn("could not write a new session to the "
                            "repository: {why}", why=reason.getErrorMessage())

    def lookup(self, request: LookupRequest) -> Deferred[Recovered | None]:
        return self.recovery.recover(request)

    def handshake_done(self, connection: Connection | None,
                       source: str | None) -> None:
        if connection is None:
            self.counters["handshake_timeouts"] += 1
        elif connection.session_reused():
            self.counters[f"resumed_{source or 'local'}"] += 1
        else:
            self.counters["full"] += 1

    # What peers ask (ICommandHandler); the requester is the node id from
    # the peer's verified certificate.

    def fetch_session(self, session_id: bytes, requester: str) -> FetchAnswer:
        state = self.store.take(session_id)
        if state is not None:
            # The requester holds it from now on; whoever asks us later is
            # sent there.
            self.store.tombstone(session_id, requester, state.expires)
            self.counters["sessions_given"] += 1
            self._log.debug("gave session {session} to {peer}",
                            session=sessionid.describe(session_id),
                            peer=requester)
            return FetchAnswer("found", self.keys.seal(state.with_owner(requester)))
        holder = self.store.holder(session_id)
        if holder is not None and holder != requester:
            return FetchAnswer("redirect", holder=holder)
        return FetchAnswer("missing")

    def checkpoint(self, session_id: bytes, seq: int, digest: bytes,
                   requester: str) -> bool:
        return self.store.update_checkpoint(session_id, seq, digest)

    def purge(self, session_id: bytes, requester: str) -> bool:
        return self.store.discard(session_id)

    def stats(self) -> dict[str, int | float]:
        """
        Every counter of this node, flat: the node's own, then the engine's
        (C{engine.}), the recovery chain's (C{recovery.}) and the store's
        (C{store.}).
        """
        numbers: dict[str, int | float] = dict(self.counters)
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
        numbers["store.sessions"] = len(self.store)
        numbers["store.bytes"] = self.store.bytes_used
        if self.peer_links is not None:
            numbers["peers.connected"] = self.peer_links.connected_count()
        return numbers
