"""
Where a session offered by a client comes from: the recovery chain.

L{Recovery.recover} reads top to bottom in the order the design fixes:

    1. this node's own store;
    2. the owner node named by the session id's owner tag, over AMP
       C{FetchSession} (or, when this node is the owner and gave the session
       away, the node its tombstone names); when that node cannot answer,
       its backup node, which keeps a copy; a redirect (the session was
       given away) is followed once, to the holder or, when the holder
       cannot answer, to the holder's backup node;
    3. the central repository, when one is configured;
    4. nothing: a full handshake.

The whole chain runs inside one time budget (C{addTimeout}); whatever is in
flight when it runs out is cancelled and the answer is "nothing".  A source
that fails, answers garbage or holds a blob that does not open is skipped,
logged and counted, never fatal.  Concurrent lookups of one session id on
this node are joined: one chain runs, every waiter gets its answer.

A session recovered from elsewhere is held here from then on ("move, not
copy"): its owner deleted it when it answered, so for a TLS 1.2 session,
which keeps its id when resumed, this node stores it under its own name.
A TLS 1.3 ticket is used once; the resumed handshake issues a new one,
which the node stores as any new session.

This module does no TLS and holds no sockets of its own: it talks to the
store, the peer links and the repository it is given.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sslshare import sessionid
from sslshare.logs import RateLimitedWarning
from sslshare.state import SealError, SessionState, StateKeys
from sslshare.store import SessionStore
from sslshare.tls import LookupRequest

# "peer": another node's session, fetched from it now or kept here as its
# backup copy.
SOURCES = ("local", "peer", "repository")


@attrs.frozen
class Recovered:
    """
    A session found for a lookup, where it was found (one of L{SOURCES}),
    and the peer that gave it, if one did.
    """

    state: SessionState
    source: str
    giver: str | None = None

    @property
    def der(self) -> bytes:
        return self.state.der


class BackupRing:
    """
    Which node keeps the backup copy of a session: in the ring of the
    cluster's node ids in sorted order, the first after the node that made
    the session (its id's owner tag) that is not the session's holder.
    Every node computes the same answer from the id alone, so whoever looks
    for a session whose holder is gone knows where the copy is.
    """

    def __init__(self, owners: Mapping[bytes, str]) -> None:
        self._owners = dict(owners)
        self._nodes = sorted(set(self._owners.values()))

    def __call__(self, session_id: bytes, holder: str) -> str | None:
        try:
            owner = self._owners.get(sessionid.owner_of(session_id))
        except ValueError:
            return None
        if owner is None:
            return None
        start = self._nodes.index(owner)
        for step in range(1, len(self._nodes) + 1):
            node = self._nodes[(start + step) % len(self._nodes)]
            if node != holder:
                return node
        return None


class Recovery:
    """
    The recovery chain of one node.

    @param owners: owner tag -> node id, for every node of the cluster.
    @param fetch_from_peer: C{(node_id, session_id) -> Deferred[FetchAnswer]},
        failing when the peer cannot be asked.
    @param repository: the central repository
        (L{sslshare.repository.ISessionRepository}), or C{None}.
    @param purge_on_peer: C{(node_id, session_id) -> Deferred}, telling a
        peer to drop its copy of a session this node now holds.
    @param backup_on_peer: C{(node_id, session_id, sealed) -> Deferred},
        giving a peer the copy it keeps as the session's backup node.
    @param backup_of: C{(session_id, holder) -> node id or None}: the
        backup node of a session while C{holder} holds it.
    @param id_contexts: service name -> session id context.
    @ivar counters: C{recovered_<source>}, C{misses}, C{timeouts},
        C{joined}, C{peer_errors}, C{repository_errors}, C{unsealable},
        C{redirects_followed}, C{backups_asked},
        C{repository_<put|purge>_failures}, C{peer_<backup|purge>_failures}.
    """

    _log = Logger()

    def __init__(
        self,
        node_id: str,
        store: SessionStore,
        keys: StateKeys,
        owners: Mapping[bytes, str],
        id_contexts: Mapping[str, bytes],
        budget: float,
        clock: IReactorTime,
        fetch_from_peer: Callable[[str, bytes], Deferred[Any]] | None = None,
        repository: Any = None,
        purge_on_peer: Callable[[str, bytes], Deferred[Any]] | None = None,
        backup_on_peer: Callable[[str, bytes, bytes], Deferred[Any]] | None = None,
        backup_of: Callable[[bytes, str], str | None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.store = store
        self.keys = keys
        self.owners = dict(owners)
        self.id_contexts = dict(id_contexts)
        self.budget = budget
        self.clock = clock
        self.fetch_from_peer = fetch_from_peer
        self.repository = repository
        self.purge_on_peer = purge_on_peer
        self.backup_on_peer = backup_on_peer
        self.backup_of = backup_of
        self._warnings = RateLimitedWarning(clock)
        self.counters: Counter[str] = Counter()
        self._in_flight: dict[bytes, list[Deferred[Recovered | None]]] = {}

    def recover(self, request: LookupRequest) -> Deferred[Recovered | None]:
        """
        Find the session of C{request}; fires with a L{Recovered} or
        C{None} within the budget, and never fails.
        """
        waiters = self._in_flight.get(request.session_id)
        if waiters is not None:
            self.counters["joined"] += 1
            return self._wait(waiters)
        waiters = self._in_flight[request.session_id] = []
        waiter = self._wait(waiters)
        chain = Deferred.fromCoroutine(self._chain(request))
        chain.addTimeout(self.budget, self.clock)
        chain.addErrback(self._gave_up, request)
        chain.addCallback(self._answer_all, request)
        return waiter

    @staticmethod
    def _wait(waiters: list[Deferred[Recovered | None]]
              ) -> Deferred[Recovered | None]:
        # A waiter that gives up (its client went away) leaves the others
        # waiting; the chain itself runs on, bounded by the budget.
        waiter: Deferred[Recovered | None] = Deferred(waiters.remove)
        waiters.append(waiter)
        return waiter

    async def _chain(self, request: LookupRequest) -> Recovered | None:
        context = self.id_contexts.get(request.service)
        if context is None:
            return None
        local = self._from_store(request)
        if local is not None and local.owner == self.node_id:
            return Recovered(local, "local")
        if local is not None:
            # A backup copy another node gave this one: the session comes
            # from a peer all the same, and is held here from now on.
            found = Recovered(local, "peer")
            self._hold(found, request)
            return found
        found = await self._from_peers(request, context)
        if found is None and self.repository is not None:
            found = await self._from_repository(request, context)
        if found is None:
            self.counters["misses"] += 1
            return None
        self._hold(found, request)
        return found

    def _from_store(self, request: LookupRequest) -> SessionState | None:
        # A TLS 1.2 session is resumed again and again under one id, so it
        # stays; a TLS 1.3 ticket is single use, here and in the repository.
        if request.protocol == "TLSv1.2":
            return self.store.get(request.session_id)
        state = self.store.take(request.session_id)
        if state is not None and self.repository is not None:
            self._repository_write("purge", self.repository.purge(
                request.session_id))
        return state

    async def _from_peers(self, request: LookupRequest,
                          context: bytes) -> Recovered | None:
        session_id = request.session_id
        owner = self.owners.get(sessionid.owner_of(session_id))
        if owner == self.node_id:
            # Made here and given away since: ask where it went.
            owner = self.store.holder(session_id)
        if owner is None or owner == self.node_id or self.fetch_from_peer is None:
            return None
        giver, answer = await self._ask_holder(owner, request)
        if answer is not None and answer.status == "redirect":
            holder = answer.holder
            if holder in (None, self.node_id, giver):
                return None
            self.counters["redirects_followed"] += 1
            giver, answer = await self._ask_holder(holder, request)
        if answer is None or answer.status != "found":
            return None
        return self._open(answer.sealed, request, context, "peer", giver)

    async def _ask_holder(self, holder: str,
                          request: LookupRequest) -> tuple[str, Any]:
        """
        Ask C{holder}, then, when it cannot answer, its backup node for the
        session, which keeps a copy, and which a stopping holder hands its
        sessions to (with a repository, the repository does both instead).

        @return: who answered last, and the answer (C{None}: nobody could).
        """
        answer = await self._ask_peer(holder, request)
        if (answer is not None or self.backup_of is None
                or self.repository is not None):
            return holder, answer
        backup = self.backup_of(request.session_id, holder)
        if backup in (None, self.node_id):
            return holder, None
        self.counters["backups_asked"] += 1
        return backup, await self._ask_peer(backup, request)

    async def _ask_peer(self, node_id: str, request: LookupRequest) -> Any:
        try:
            return await self.fetch_from_peer(node_id, request.session_id)
        except CancelledError:
            raise
        except Exception as e:
            self.counters["peer_errors"] += 1
            self._log.info(
                "peer {peer} could not answer for session {session}: {why}",
                peer=node_id, session=sessionid.describe(request.session_id),
                why=str(e) or type(e).__name__)
            return None

    async def _from_repository(self, request: LookupRequest,
                               context: bytes) -> Recovered | None:
        try:
            sealed = await self.repository.take(request.session_id)
        except CancelledError:
            raise
        except Exception as e:
            self.counters["repository_errors"] += 1
            self._log.info("repository could not answer for session "
                           "{session}: {why}",
                           session=sessionid.describe(request.session_id),
                           why=str(e) or type(e).__name__)
            return None
        if sealed is None:
            return None
        return self._open(sealed, request, context, "repository", None)

    def _open(self, sealed: bytes | None, request: LookupRequest,
              context: bytes, source: str,
              giver: str | None) -> Recovered | None:
        try:
            state = self.keys.open(sealed or b"", request.session_id, context)
        except SealError as e:
            self.counters["unsealable"] += 1
            self._log.warn("discarded the state of session {session} from "
                           "{source}: {why}",
                           session=sessionid.describe(request.session_id),
                           source=source, why=str(e))
            return None
        if state.expired(self.clock.seconds()):
            return None
        return Recovered(state, source, giver)

    def _hold(self, found: Recovered, request: LookupRequest) -> None:
        """
        Make this node the one holder of what it recovered ("move, not
        copy"): every other copy the cluster may keep is dropped, and a
        TLS 1.2 session (which keeps its id) is stored here with a fresh
        copy in the repository or at this node's backup for it.  A used
        TLS 1.3 ticket is dropped everywhere.
        """
        session_id = request.session_id
        previous = found.state.owner
        others = {previous}
        if self.backup_of is not None and self.repository is None:
            others.add(self.backup_of(session_id, previous))
        others -= {None, self.node_id, found.giver}
        if request.protocol == "TLSv1.2":
            mine = found.state.with_owner(self.node_id)
            self.store.put(mine)
            if self.repository is not None:
                self._repository_write("put", self.repository.put(
                    session_id, self.keys.seal(mine), mine.expires))
            elif self.backup_on_peer is not None:
                backup = self.backup_of(session_id, self.node_id)
                if backup is not None:
                    # The new copy replaces the old one there.
                    others.discard(backup)
                    self._peer_write("backup", backup, self.backup_on_peer(
                        backup, session_id, self.keys.seal(mine)))
        elif self.repository is not None and found.source != "repository":
            self._repository_write("purge", self.repository.purge(session_id))
        if self.purge_on_peer is not None:
            for node in sorted(others):
                self._peer_write("purge", node,
                                 self.purge_on_peer(node, session_id))

    def _peer_write(self, what: str, peer: str, writing: Deferred[Any]) -> None:
        # Best effort: a peer that cannot be told is usually a peer that is
        # down, and lost what it held.
        def failed(reason: Any) -> None:
            self.counters[f"peer_{what}_failures"] += 1

        writing.addErrback(failed)

    def _repository_write(self, what: str, writing: Deferred[Any]) -> None:
        # Fail open: the handshake goes on, the node keeps serving.
        def failed(reason: Any) -> None:
            self.counters[f"repository_{what}_failures"] += 1
            self._warnings.warn("repository {what} failed: {why}", what=what,
                                why=reason.getErrorMessage())

        writing.addErrback(failed)

    def _gave_up(self, reason: Any, request: LookupRequest) -> None:
        if reason.check(TimeoutError, CancelledError):
            self.counters["timeouts"] += 1
        else:
            self._log.failure("recovery of session {session} failed", reason,
                              session=sessionid.describe(request.session_id))
        return None

    def _answer_all(self, result: Recovered | None,
                    request: LookupRequest) -> None:
        waiters = self._in_flight.pop(request.session_id, [])
        if result is not None:
            self.counters[f"recovered_{result.source}"] += 1
        for waiter in waiters:
            waiter.callback(result)
