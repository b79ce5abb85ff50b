"""
Where a session offered by a client comes from: the recovery chain.

L{Recovery.recover} reads top to bottom in the order the design fixes:

    1. this node's own store;
    2. the owner node named by the session id's owner tag, over AMP
       C{FetchSession} (or, when this node is the owner and gave the session
       away, the node its tombstone names); a redirect (the owner gave the
       session away) is followed once;
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

SOURCES = ("local", "peer", "repository")


@attrs.frozen
class Recovered:
    """
    A session found for a lookup, and where it was found (one of
    L{SOURCES}).
    """

    state: SessionState
    source: str

    @property
    def der(self) -> bytes:
        return self.state.der


class Recovery:
    """
    The recovery chain of one node.

    @param owners: owner tag -> node id, for every node of the cluster.
    @param fetch_from_peer: C{(node_id, session_id) -> Deferred[FetchAnswer]},
        failing when the peer cannot be asked.
    @param repository: the central repository
        (L{sslshare.repository.ISessionRepository}), or C{None}.
    @param purge_on_peer: C{(node_id, session_id) -> Deferred}, telling a
        peer to drop a session this node took from the repository.
    @param id_contexts: service name -> session id context.
    @ivar counters: C{recovered_<source>}, C{misses}, C{timeouts},
        C{joined}, C{peer_errors}, C{repository_errors}, C{unsealable},
        C{redirects_followed}, C{repository_<put|purge>_failures},
        C{peer_purge_failures}.
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
        if local is not None:
            return Recovered(local, "local")
        found = await self._from_owner(request, context)
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

    async def _from_owner(self, request: LookupRequest,
                          context: bytes) -> Recovered | None:
        owner = self.owners.get(sessionid.owner_of(request.session_id))
        if owner == self.node_id:
            # Made here and given away since: ask where it went.
            owner = self.store.holder(request.session_id)
        if owner is None or owner == self.node_id or self.fetch_from_peer is None:
            return None
        answer = await self._ask_peer(owner, request)
        if answer is not None and answer.status == "redirect":
            holder = answer.holder
            if holder in (None, self.node_id, owner):
                return None
            self.counters["redirects_followed"] += 1
            answer = await self._ask_peer(holder, request)
        if answer is None or answer.status != "found":
            return None
        return self._open(answer.sealed, request, context, "peer")

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
        return self._open(sealed, request, context, "repository")

    def _open(self, sealed: bytes | None, request: LookupRequest,
              context: bytes, source: str) -> Recovered | None:
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
        return Recovered(state, source)

    def _hold(self, found: Recovered, request: LookupRequest) -> None:
        """
        Make this node the one holder of what it recovered: a TLS 1.2
        session (which keeps its id) is stored here, and the repository's
        copy names this node; a used TLS 1.3 ticket leaves the repository.
        A session taken from the repository may still sit in the store of
        the node that held it: that node is told to drop it.
        """
        session_id = request.session_id
        if request.protocol == "TLSv1.2":
            mine = found.state.with_owner(self.node_id)
            self.store.put(mine)
            if self.repository is not None:
                self._repository_write("put", self.repository.put(
                    session_id, self.keys.seal(mine), mine.expires))
        elif self.repository is not None and found.source != "repository":
            self._repository_write("purge", self.repository.purge(session_id))
        previous = found.state.owner
        if (found.source == "repository" and previous != self.node_id
                and self.purge_on_peer is not None):
            purging = self.purge_on_peer(previous, session_id)
            purging.addErrback(self._purge_failed, previous)

    def _repository_write(self, what: str, writing: Deferred[Any]) -> None:
        # Fail open: the handshake goes on, the node keeps serving.
        def failed(reason: Any) -> None:
            self.counters[f"repository_{what}_failures"] += 1
            self._warnings.warn("repository {what} failed: {why}", what=what,
                                why=reason.getErrorMessage())

        writing.addErrback(failed)

    def _purge_failed(self, reason: Any, peer: str) -> None:
        # Best effort: a peer that cannot be told is usually a peer that is
        # down, and lost what it held.
        self.counters["peer_purge_failures"] += 1

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
