"""
Where a session offered by a client comes from: the recovery chain.

L{Recovery.recover} reads top to bottom in the order the design fixes:

    1. this node's own store (with a repository, a session this node
       holds serves only once this node has taken the repository's copy:
       another node may have taken it, and the purge that should have
       followed been lost);
    2. the owner node named by the session id's owner tag, over AMP
       C{FetchSession} (or, when this node is the owner and gave the session
       away, the node its tombstone names); when that node cannot answer,
       its backup node, which keeps a copy; a redirect (the session was
       given away) is followed, to the holder or, when the holder cannot
       answer, to the holder's backup node, up to L{MAX_REDIRECTS} times
       and never back to a node already asked;
    3. the central repository, when one is configured;
    4. nothing: a full handshake.

The whole chain runs inside one time budget (C{addTimeout}); whatever is in
flight when it runs out is cancelled and the answer is "nothing".  Asking
past this node's store is bounded: at most C{max_lookups} chains at the
peers or the repository at once, and at most C{max_lookups_per_client} for
one client address.  A lookup past either bound is not started (the
answer is "nothing", a full handshake, counted): a flood of made-up
session ids must not turn the node into an amplifier against its peers.
A chain whose client went away still counts until it ends (within the
budget): the questions it asked are still out.  A source
that fails, answers garbage or holds a blob that does not open is skipped,
logged and counted, never fatal.  Concurrent lookups of one session id on
this node are joined: one chain runs, every waiter gets its answer.

A session recovered from elsewhere is held here from then on ("move, not
copy"): the node that gave it deleted it when it answered, so for a TLS 1.2 session,
which keeps its id when resumed, this node stores it under its own name.
A TLS 1.3 ticket is used once; the resumed handshake issues a new one,
which the node stores as any new session.

Nothing moves for a handshake that cannot resume it: a peer is asked with
the handshake's TLS version, session id context and this node's state key
ids (L{sslshare.cluster.FetchTerms}) and refuses otherwise, a copy here is
checked before it is used up, and one taken from the repository that
cannot serve goes back.  A copy of a session from before it last left this
node (its move count at or below the one its tombstone keeps) is refused.

This module does no TLS and holds no sockets of its own: it talks to the
store and, through its L{sslshare.placement.Placement}, to the peer links
and the repository; the placement says which node keeps a copy.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from sslshare import sessionid
from sslshare.cluster import FetchAnswer, FetchTerms
from sslshare.logs import RateLimitedWarning
from sslshare.placement import REPOSITORY, Placement
from sslshare.repository import ISessionRepository, Taken
from sslshare.state import SealError, SessionState
from sslshare.store import SessionStore
from sslshare.hooks import LookupRequest

# "peer": another node's session, fetched from it now or kept here as its
# backup copy.
SOURCES = ("local", "peer", "repository")

# Where a lookup ended, for its latency: this node's store (its own
# sessions and the backup copies it keeps), the owner peer (or the node a
# redirect named), the owner's backup node when the owner could not answer,
# the repository, or nowhere (a miss or a timeout).  The latencies of these
# paths differ by orders of magnitude, hence one histogram each.
LOOKUP_SOURCES = ("local", "peer", "backup", "repository", "miss")

# Redirects one lookup follows at most: each is a session that moved on
# while the copy or tombstone naming its new holder was still on its way,
# rarely more than one move; the budget bounds the chain in any case.
MAX_REDIRECTS = 3

_T = TypeVar("_T")

# Who answered a question about a session asked of a node, and what (None:
# nobody could).
_Ask = Callable[[str, LookupRequest], Awaitable[tuple[str, "FetchAnswer | None"]]]

# Upper bounds in seconds of the lookup latency buckets: from a local hit
# (microseconds) to the largest lookup budget (10 s).
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                  0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@attrs.frozen
class Recovered:
    """
    A session found for a lookup, where it was found (one of L{SOURCES}),
    and the peer that gave it, if one did.

    @ivar found_at: the path the lookup took to it, one of
        L{LOOKUP_SOURCES} but C{miss}; by default its C{source}.
    """

    state: SessionState
    source: str
    giver: str | None = None
    found_at: str = attrs.field(
        default=attrs.Factory(lambda self: self.source, takes_self=True))

    @property
    def der(self) -> bytes:
        return self.state.der


class LatencyHistogram:
    """
    How long lookups took, by where they ended (L{LOOKUP_SOURCES}): a count
    per bucket of L{LATENCY_BOUNDS}, and the count and sum of all.
    """

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS) -> None:
        self.bounds = bounds
        # One more bucket than bounds: above the last bound.
        self._buckets = {source: [0] * (len(bounds) + 1)
                         for source in LOOKUP_SOURCES}
        self._sums = dict.fromkeys(LOOKUP_SOURCES, 0.0)

    def observe(self, source: str, seconds: float) -> None:
        self._buckets[source][bisect_left(self.bounds, seconds)] += 1
        self._sums[source] += seconds

    def count(self, source: str) -> int:
        return sum(self._buckets[source])

    def sum(self, source: str) -> float:
        """
        The seconds all lookups that ended at C{source} took.
        """
        return self._sums[source]

    def cumulative(self, source: str) -> list[tuple[float, int]]:
        """
        (upper bound, lookups that took at most that long) for each bound,
        then (infinity, all lookups): Prometheus' C{le} buckets.
        """
        counts, total = [], 0
        for bound, count in zip((*self.bounds, math.inf),
                                self._buckets[source]):
            total += count
            counts.append((bound, total))
        return counts


@attrs.frozen(kw_only=True)
class LookupSettings:
    """
    What a reload may change of the recovery chain.

    @ivar id_contexts: service name -> session id context.
    @ivar budget: seconds a lookup may take, the whole chain included.
    @ivar max_lookups: how many chains may be out at the peers or the
        repository at once; C{None}: no bound.
    @ivar max_lookups_per_client: the same, for one client address
        (L{LookupRequest.client}).
    """

    id_contexts: Mapping[str, bytes]
    budget: float
    max_lookups: int | None = None
    max_lookups_per_client: int | None = None


COUNTERS = (
    *(f"recovered_{source}" for source in SOURCES), "misses", "timeouts",
    "joined", "lookups_shed", "lookups_shed_per_client", "peer_errors",
    "repository_errors", "unsealable", "redirects_followed",
    "backups_asked", "copies_withheld", "stale_copies", "bad_checkpoints",
    "unresumable", "replays_refused", "given_back",
    *(f"peer_{what}_failures" for what in ("backup", "purge")),
    *(f"repository_{what}_failures"
      for what in ("put", "checkpoint", "purge")))
"""Every counter of L{Recovery.counters}: the stats show each, zero
included."""


class Recovery:
    """
    The recovery chain of one node.

    @param placement: where the copies of sessions are (the repository,
        backup nodes), and the peers to ask.
    @param settings: the chain's settings in force; a reload replaces them
        whole (C{settings}).
    @param ask_peers: whether the chain asks the owner peer and its backup
        node; without, it asks the repository only.
    @ivar latency: how long each lookup chain took, by where it ended.
    @ivar counters: C{recovered_<source>}, C{misses}, C{timeouts},
        C{joined}, C{lookups_shed}, C{lookups_shed_per_client},
        C{peer_errors}, C{repository_errors}, C{unsealable},
        C{redirects_followed}, C{backups_asked}, C{copies_withheld} (a
        backup copy not served, its holder alive but not answering),
        C{stale_copies} (a copy here that its holder, or the repository, no
        longer had), C{bad_checkpoints} (a repository checkpoint that a
        chain cannot continue from, ignored), C{unresumable} (a session
        found of another TLS version or service than the handshake: left as
        it was), C{given_back} (taken from the repository, and put back
        unused), C{replays_refused} (a copy of a session from before it
        last left this node),
        C{repository_<put|purge|checkpoint>_failures},
        C{peer_<backup|purge>_failures}.
    """

    _log = Logger()

    def __init__(self, store: SessionStore, placement: Placement,
                 settings: LookupSettings, clock: IReactorTime,
                 ask_peers: bool = True) -> None:
        self.store = store
        self.placement = placement
        self.settings = settings
        self.clock = clock
        self.ask_peers = ask_peers
        self._warnings = RateLimitedWarning(clock)
        self._shed_warnings = RateLimitedWarning(clock)
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self.latency = LatencyHistogram()
        self._in_flight: dict[bytes, list[Deferred[Recovered | None]]] = {}
        # Chains past the store, in all and by client address.
        self._asking = 0
        self._asking_for: Counter[str | None] = Counter()

    @property
    def node_id(self) -> str:
        return self.placement.node_id

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
        chain.addTimeout(self.settings.budget, self.clock)
        chain.addErrback(self._gave_up, request)
        chain.addCallback(self._timed, self.clock.seconds())
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
        context = self.settings.id_contexts.get(request.service)
        if context is None:
            return None
        local = self.store.get(request.session_id)
        if local is not None and not self._resumable(local, request, context):
            # Whatever cannot resume this handshake is left as it is, here
            # and everywhere: the client that can may still come.
            return None
        repository = self.placement.repository
        if local is not None and local.holder == self.node_id:
            if repository is not None:
                own = await self._own_session_taken_from_repository(
                    request, context, local, repository)
                if own is not None and own.source == "repository":
                    self._hold(own, request)
                return own
            self._used_here(request, local)
            return Recovered(local, "local")
        if not self._admit(request.client):
            return None
        try:
            if local is not None:
                found = await self._from_holder_or_copy(request, context, local)
            else:
                found = await self._from_peers(request, context)
                if found is None and repository is not None:
                    found = await self._from_repository(request, context,
                                                        repository)
        finally:
            self._release(request.client)
        if found is None:
            self.counters["misses"] += 1
            return None
        self._hold(found, request)
        return found

    def _resumable(self, state: SessionState, request: LookupRequest,
                   context: bytes) -> bool:
        """
        Whether C{state} can resume C{request}'s handshake in C{context};
        what cannot is counted (C{unresumable}).
        """
        problem = state.unresumable(request.protocol, context)
        if problem is None:
            return True
        self.counters["unresumable"] += 1
        self._log.info("session {session} cannot resume a {protocol} "
                       "handshake of service {service} ({why}): left as it is",
                       session=sessionid.describe(request.session_id),
                       protocol=request.protocol, service=request.service,
                       why=problem)
        return False

    def _admit(self, client: str | None) -> bool:
        """
        Whether one more chain of C{client} may ask past the store; if so,
        it counts until L{_release}.
        """
        settings = self.settings
        if (settings.max_lookups is not None
                and self._asking >= settings.max_lookups):
            shed = "lookups_shed"
        elif (settings.max_lookups_per_client is not None
              and self._asking_for[client] >= settings.max_lookups_per_client):
            shed = "lookups_shed_per_client"
        else:
            self._asking += 1
            self._asking_for[client] += 1
            return True
        self.counters[shed] += 1
        self._shed_warnings.warn("too many session lookups out ({shed}): "
                                 "full handshakes instead", shed=shed)
        return False

    def _release(self, client: str | None) -> None:
        self._asking -= 1
        self._asking_for[client] -= 1
        if not self._asking_for[client]:
            # Past clients leave nothing behind.
            del self._asking_for[client]

    def _used_here(self, request: LookupRequest, state: SessionState) -> None:
        """
        This node resumes a session it holds.  A TLS 1.2 session is resumed
        again and again under one id, so it stays; a TLS 1.3 ticket is
        single use: it goes from here, from the repository and from the
        nodes that may keep its backup copy.
        """
        if request.protocol == "TLSv1.2":
            return
        session_id = request.session_id
        copies = self.placement.copy_nodes(session_id, self.node_id,
                                           self.store.copy_at(session_id))
        self._used_up(state)
        repository = self.placement.repository
        if repository is not None:
            self._repository_write("purge", repository.purge(session_id))
        self._purge_elsewhere(session_id, copies)

    def _used_up(self, ticket: SessionState) -> None:
        """
        Drop a TLS 1.3 ticket this node used, remembering how often it had
        moved: a copy of it that comes back (put back into the repository)
        is an old one, and refused.
        """
        self.store.tombstone(ticket.session_id, self.node_id, ticket.expires,
                             ticket.moves)

    async def _own_session_taken_from_repository(
            self, request: LookupRequest, context: bytes,
            local: SessionState,
            repository: ISessionRepository) -> Recovered | None:
        """
        A session this node holds, with a repository.  Other nodes take
        sessions from the repository, and the purge of this node's copy
        that should follow can be lost (the taker may die first) or never
        be sent (nodes that share only a repository have no link), so
        every node resumes a session it holds only once it has taken the
        repository's copy: the copy is the session, and whoever takes it
        holds it.  With this node's name in it: a TLS 1.3 ticket is used
        up; a TLS 1.2 session, which is resumed again and again under its
        id, goes back to the repository at once (the repository runs this
        node's operations on a session in order, so the put lands after
        the take).  With another node's name in it, that node took the
        session since and put it back: this node's copy is stale, and the
        repository's is resumed as one taken from it (L{_hold} makes this
        node the holder).  A copy that does not open, or cannot resume
        this handshake, goes back as it was.  When the repository cannot
        answer, a full handshake: never the same session served twice.
        The checkpoint kept beside the repository's copy may be newer than
        this node's: the digest continues from the newest.
        """
        session_id = request.session_id
        tls12 = request.protocol == "TLSv1.2"
        if not tls12:
            self.store.take(session_id)
        answered, taken = await self._take_from_repository(request,
                                                           repository)
        if not answered:
            return None
        # A TLS 1.2 copy may go while the repository answers: a peer's
        # fetch, or a purge from a node that took the session.
        still_here = not tls12 or self.store.get(session_id) is not None
        opened = None
        if taken is not None and still_here:
            opened = self._open(taken.sealed, request, context, "repository",
                                None, "repository")
        if (taken is not None and opened is not None
                and opened.state.holder != self.node_id
                and self._resumable(opened.state, request, context)):
            self.counters["stale_copies"] += 1
            self.store.take(session_id)
            return Recovered(
                self._with_repository_checkpoint(opened.state, taken),
                "repository")
        if taken is None or opened is None or opened.state.holder != self.node_id:
            if taken is not None:
                # Sealed under a key this node lacks, or not for this
                # handshake: its copy goes back as it was.
                self._give_back(session_id, taken, repository)
            self.counters["stale_copies"] += 1
            self.store.take(session_id)
            return None
        state = self._with_repository_checkpoint(local, taken)
        if tls12:
            self.store.put(state)
            self._repository_write("put", repository.put(
                session_id, self.placement.keys.seal(state), state.expires))
        else:
            self._used_up(opened.state)
        return Recovered(state, "local")

    def _give_back(self, session_id: bytes, taken: Taken,
                   repository: ISessionRepository) -> None:
        """
        Put what this node took from the repository back as it was: the
        blob, then the checkpoint kept beside it.
        """
        self.counters["given_back"] += 1
        self._repository_write("put", repository.put(
            session_id, taken.sealed, taken.expires))
        if taken.seq:
            self._repository_write("checkpoint", repository.checkpoint(
                session_id, taken.seq, taken.digest))

    async def _from_holder_or_copy(self, request: LookupRequest, context: bytes,
                                   copy: SessionState) -> Recovered | None:
        """
        This node keeps a backup copy of the session, and its holder may
        still hold it: the holder gives it up first (a move), and the copy
        serves only when the holder is gone.  A holder that is alive but
        cannot answer (its link from here down, or stalled) may still
        resume the session itself, so the copy is withheld: a full
        handshake, never the same session served twice.
        """
        holder = giver = copy.holder
        if not self._resumable(copy, request, context):
            return None
        if not self.ask_peers:
            answer = None
        else:
            # A redirect: the session moved on, and the backup copy naming
            # its new holder is still on its way here.
            _, giver, answer = await self._follow_redirects(
                request, holder, holder, await self._ask_peer(holder, request),
                self._ask_peer_named)
        if answer is not None and answer.status == "found":
            return self._open(answer.sealed, request, context, "peer", giver,
                              "peer")
        if answer is not None and answer.status == "refused":
            return None
        if answer is not None:
            # Used, or lost, where it was held: this copy must not serve.
            self.counters["stale_copies"] += 1
            self.store.take(request.session_id)
            return None
        if giver != holder:
            # The holder it moved to cannot answer: this copy is older.
            return None
        if self.placement.alive(holder):
            self.counters["copies_withheld"] += 1
            return None
        return Recovered(copy, "peer", found_at="local")

    async def _from_peers(self, request: LookupRequest,
                          context: bytes) -> Recovered | None:
        session_id = request.session_id
        # The owner holds the sessions it made until it gives them away.
        first = self.placement.owner(session_id)
        if first == self.node_id:
            # Made here and given away since: ask where it went.
            first = self.store.holder(session_id)
        if first is None or first == self.node_id or not self.ask_peers:
            return None
        giver, answer = await self._ask_holder(first, request)
        holder, giver, answer = await self._follow_redirects(
            request, first, giver, answer, self._ask_holder)
        if answer is None or answer.status != "found":
            return None
        return self._open(answer.sealed, request, context, "peer", giver,
                          "peer" if giver == holder else "backup")

    async def _follow_redirects(
            self, request: LookupRequest, asked: str, giver: str,
            answer: FetchAnswer | None, ask: _Ask,
    ) -> tuple[str, str, FetchAnswer | None]:
        """
        Follow the redirects of C{answer}, which C{giver} gave when
        C{asked} was asked: at most L{MAX_REDIRECTS}, never to a node asked
        already, with C{ask(node, request)}, which answers with who answered
        and what.

        @return: the node asked last, who answered it, and the answer.
        """
        seen = {None, self.node_id, asked, giver}
        for _ in range(MAX_REDIRECTS):
            holder = (answer.holder if answer is not None
                      and answer.status == "redirect" else None)
            if holder is None or holder in seen:
                break
            self.counters["redirects_followed"] += 1
            asked = holder
            giver, answer = await ask(asked, request)
            seen.update((asked, giver))
        return asked, giver, answer

    async def _ask_peer_named(self, node_id: str,
                              request: LookupRequest
                              ) -> tuple[str, FetchAnswer | None]:
        return node_id, await self._ask_peer(node_id, request)

    async def _ask_holder(self, holder: str,
                          request: LookupRequest
                          ) -> tuple[str, FetchAnswer | None]:
        """
        Ask C{holder}, then, when it cannot answer, its backup node for the
        session, which keeps a copy, and which a stopping holder hands its
        sessions to (with a repository, the repository does both instead).

        @return: who answered last, and the answer (C{None}: nobody could).
        """
        answer = await self._ask_peer(holder, request)
        if answer is not None:
            return holder, answer
        backup = self.placement.backup_node(request.session_id, holder)
        if backup is None:
            return holder, None
        self.counters["backups_asked"] += 1
        return backup, await self._ask_peer(backup, request)

    async def _ask_peer(self, node_id: str,
                        request: LookupRequest) -> FetchAnswer | None:
        terms = FetchTerms(request.protocol,
                           self.settings.id_contexts[request.service],
                           self.placement.keys.key_ids)
        try:
            return await self.placement.peers.fetch_session(
                node_id, request.session_id, terms)
        except CancelledError:
            raise
        except Exception as e:
            self.counters["peer_errors"] += 1
            self._log.info(
                "peer {peer} could not answer for session {session}: {why}",
                peer=node_id, session=sessionid.describe(request.session_id),
                why=str(e) or type(e).__name__)
            return None

    async def _from_repository(self, request: LookupRequest, context: bytes,
                               repository: ISessionRepository
                               ) -> Recovered | None:
        _, taken = await self._take_from_repository(request, repository)
        if taken is None:
            return None
        state = self._opened(taken.sealed, request, context, "repository", None)
        if state is not None and self._replayed(state):
            return None
        if (state is None or state.expired(self.clock.seconds())
                or not self._resumable(state, request, context)):
            # Not this handshake's to use up: back as it was.
            self._give_back(request.session_id, taken, repository)
            return None
        return Recovered(self._with_repository_checkpoint(state, taken),
                         "repository")

    async def _take_from_repository(self, request: LookupRequest,
                                    repository: ISessionRepository,
                                    ) -> tuple[bool, Taken | None]:
        """
        Take the session from the repository: whether it answered, and what
        it gave up (C{None}: it has none).  A repository that fails is
        counted and logged, and has not answered.
        """
        try:
            return True, await repository.take(request.session_id)
        except CancelledError:
            raise
        except Exception as e:
            self.counters["repository_errors"] += 1
            self._log.info("repository could not answer for session "
                           "{session}: {why}",
                           session=sessionid.describe(request.session_id),
                           why=str(e) or type(e).__name__)
            return False, None

    def _with_repository_checkpoint(self, state: SessionState,
                                    taken: Taken) -> SessionState:
        """
        C{state} with the checkpoint the repository kept beside its copy,
        when that is newer and authentic: a forged seq must not become the
        chain's (one at the bound would stop its checkpoints).
        """
        if taken.seq <= state.seq:
            return state
        try:
            digest = self.placement.keys.open_checkpoint(state.session_id, taken.seq,
                                               taken.digest)
            return state.with_checkpoint(taken.seq, digest)
        except ValueError as e:
            self.counters["bad_checkpoints"] += 1
            self._log.warn("ignored the repository's checkpoint of session "
                           "{session}: {why}",
                           session=sessionid.describe(state.session_id),
                           why=str(e))
            return state

    def _open(self, sealed: bytes | None, request: LookupRequest,
              context: bytes, source: str, giver: str | None,
              found_at: str) -> Recovered | None:
        """
        The session sealed in C{sealed}, if it opens, is not an old copy
        and has not expired.
        """
        state = self._opened(sealed, request, context, source, giver)
        if (state is None or self._replayed(state)
                or state.expired(self.clock.seconds())):
            return None
        return Recovered(state, source, giver, found_at)

    def _opened(self, sealed: bytes | None, request: LookupRequest,
                context: bytes, source: str,
                giver: str | None) -> SessionState | None:
        try:
            return self.placement.keys.open(sealed or b"", request.session_id, context)
        except SealError as e:
            self.counters["unsealable"] += 1
            self._log.warn("could not open the state of session {session} "
                           "from {source}: {why}",
                           session=sessionid.describe(request.session_id),
                           source=source if giver is None else f"peer {giver}",
                           why=str(e))
            return None

    def _replayed(self, state: SessionState) -> bool:
        """
        Whether C{state} is a copy of the session from before it last left
        this node (given away, purged or used up here), counted
        (C{replays_refused}).
        """
        seen = self.store.moves_seen(state.session_id)
        if seen is None or state.moves > seen:
            return False
        self.counters["replays_refused"] += 1
        self._warnings.warn("refused an old copy of session {session} (moved "
                            "{moves} times, {seen} when it left this node)",
                            session=sessionid.describe(state.session_id),
                            moves=state.moves, seen=seen)
        return True

    def _hold(self, found: Recovered, request: LookupRequest) -> None:
        """
        Make this node the one holder of what it recovered ("move, not
        copy"): every other copy the cluster may keep is dropped (by the
        peer that gave it, when one did; by this node for a copy it kept
        or took from the repository), and a TLS 1.2 session (which keeps
        its id) is stored here with a fresh copy in the repository or at
        this node's backup for it.  A used TLS 1.3 ticket is dropped
        everywhere, and its tombstone here refuses it if it comes back.
        """
        session_id = request.session_id
        previous = found.state.holder
        if found.giver is not None:
            # The node that gave it (its holder, or the backup node of a
            # holder that could not answer) drops the other copies itself:
            # the nodes keeping them take the holder's word, and that node
            # knows whose they are.
            others = set()
        else:
            others = ({previous}
                      | self.placement.backup_nodes(session_id, previous))
        if request.protocol == "TLSv1.2":
            mine = found.state.with_holder(self.node_id)
            self.store.put(mine)
            copy = self.placement.write_copy(mine)
            if copy is not None:
                where, writing = copy
                self.store.note_copy(session_id, where)
                # The new copy replaces the old one there.
                others.discard(where)
                if where == REPOSITORY:
                    self._repository_write("put", writing)
                else:
                    self._peer_write("backup", where, writing)
        else:
            # A used ticket lives nowhere, this node's backup copy included.
            self._used_up(found.state)
            repository = self.placement.repository
            if repository is not None and found.source != "repository":
                self._repository_write("purge", repository.purge(session_id))
        self._purge_elsewhere(session_id, others)

    def _purge_elsewhere(self, session_id: bytes, nodes: set[str]) -> None:
        """
        Tell C{nodes} to drop their copy of C{session_id}
        (L{Placement.purge_copies}).
        """
        for node, purging in self.placement.purge_copies(session_id, nodes):
            self._peer_write("purge", node, purging)

    def _peer_write(self, what: str, peer: str, writing: Deferred[_T]) -> None:
        # Best effort: a peer that cannot be told is usually a peer that is
        # down, and lost what it held.
        def failed(reason: Failure) -> None:
            self.counters[f"peer_{what}_failures"] += 1

        writing.addErrback(failed)

    def _repository_write(self, what: str, writing: Deferred[_T]) -> None:
        # Fail open: the handshake goes on, the node keeps serving.
        def failed(reason: Failure) -> None:
            self.counters[f"repository_{what}_failures"] += 1
            self._warnings.warn("repository {what} failed: {why}", what=what,
                                why=reason.getErrorMessage())

        writing.addErrback(failed)

    def _gave_up(self, reason: Failure, request: LookupRequest) -> None:
        if reason.check(TimeoutError, CancelledError):
            self.counters["timeouts"] += 1
        else:
            self._log.failure("recovery of session {session} failed", reason,
                              session=sessionid.describe(request.session_id))
        return None

    def _timed(self, result: Recovered | None,
               started: float) -> Recovered | None:
        self.latency.observe("miss" if result is None else result.found_at,
                             self.clock.seconds() - started)
        return result

    def _answer_all(self, result: Recovered | None,
                    request: LookupRequest) -> None:
        waiters = self._in_flight.pop(request.session_id, [])
        if result is not None:
            self.counters[f"recovered_{result.source}"] += 1
        for waiter in waiters:
            waiter.callback(result)
