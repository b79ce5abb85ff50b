"""
The side of the channel that asks peers: one reconnecting link per peer,
and the checked calls the recovery chain and the CLI make.
"""

from __future__ import annotations

import functools
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import attrs
from OpenSSL import SSL
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.error import ConnectingCancelledError, ConnectionClosed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from sslshare import identity, sessionid
from sslshare.cluster._commands import (
    MAX_ITEMS,
    MAX_ITEMS_BYTES,
    OUTCOMES,
    Backup,
    Checkpoint,
    Deliver,
    FetchAnswer,
    FetchSession,
    FetchTerms,
    KeyCheck,
    Purge,
    Stats,
    check_session_id,
    counters_problem,
    fetch_answer_problem,
    key_check_message,
    key_problem,
    pack_item,
)
from sslshare.cluster._errors import (
    BadRequest,
    NotAuthorized,
    PeerIdentityError,
    PeerProtocolError,
    PeerUnavailable,
)
from sslshare.cluster._framing import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    BoundedBoxes,
    HandshakeDeadline,
)
from sslshare.cluster._tls import ClusterTLS, refusal_of, tls_failure
from sslshare.state import StateKeys

_log = Logger()

_Answer = TypeVar("_Answer")


# Seconds a peer has to answer a Deliver or Stats: a
# connected peer answers in milliseconds, a stopped or hung one never.
DEFAULT_CALL_TIMEOUT = 5.0
# Failed connection attempts a purge waits through for a peer that is
# down before it gives up (see Peers.purge_session).
PURGE_CONNECT_ATTEMPTS = 3


@implementer(IHandshakeListener)
class _PeerClientProtocol(BoundedBoxes, amp.AMP, HandshakeDeadline):
    def __init__(self, link: PeerLink) -> None:
        super().__init__()
        self._link = link
        # Whether the link is set up: TLS, then the key check.
        self.handshake_done = False
        # Whether the peer has answered anything on this connection: proof
        # that it accepted our certificate (see PeerLink._lost).
        self.answered = False
        # Why this side ended the connection, if it did.
        self._refusal: str | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_deadline(self._link.clock, self._link.handshake_timeout)

    def handshakeCompleted(self) -> None:
        # The handshake deadline runs on until the key check is done.
        link = self._link
        connection = self.transport.getHandle()
        keys = link.keys()

        def message(role: bytes) -> bytes:
            return key_check_message(connection, role, link.cluster,
                                     link.node_id, link.peer_node_id)

        def checked(answer: dict[str, Any]) -> None:
            problem = key_problem(keys, link.peer_node_id, link.node_id,
                                  answer["key_id"], message(b"server"),
                                  answer["proof"])
            if problem is not None:
                self._refuse(problem)
                return
            self._stop_deadline()
            self.handshake_done = True
            link._ready(self)

        def failed(reason: Failure) -> None:
            if reason.check(ConnectionClosed, SSL.Error):
                # connectionLost says why.
                return
            self._refuse(f"{link.peer_node_id} refused the key check of "
                         f"{link.node_id} ({reason.getErrorMessage()})")

        key_id, proof = keys.prove(message(b"client"))
        self.callRemote(KeyCheck, key_id=key_id, proof=proof).addCallbacks(
            checked, failed)

    def _refuse(self, reason: str) -> None:
        self._link.counters["key_mismatches"] += 1
        self._refusal = reason
        self.transport.abortConnection()

    def _handshake_timed_out(self) -> None:
        _log.warn("peer {peer}: no TLS handshake and key check in "
                  "{timeout} s", peer=self._link.peer_node_id,
                  timeout=self._link.handshake_timeout)

    def _box_too_large(self, what: str) -> None:
        self._link.counters["protocol_errors"] += 1
        _log.warn("dropped the connection to peer {peer}: it sent {what}",
                  peer=self._link.peer_node_id, what=what)
        self._drop()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_deadline()
        refusal = refusal_of(reason, self.transport) or self._refusal
        super().connectionLost(reason)
        self._link._lost(self, reason, refusal)

    def locateResponder(self, name: bytes) -> None:
        # Peers ask us through our own server, never through this link.
        return None


class _LinkFactory(Factory):
    def __init__(self, link: PeerLink) -> None:
        self._link = link

    def buildProtocol(self, addr: IAddress | None) -> _PeerClientProtocol:
        return _PeerClientProtocol(self._link)


@implementer(IStreamClientEndpoint)
class _ObservedEndpoint:
    """
    An endpoint that tells its link about failed connection attempts, which
    L{ClientService} otherwise keeps to itself.
    """

    def __init__(self, wrapped: IStreamClientEndpoint,
                 failed: Callable[[Failure], None]) -> None:
        self._wrapped = wrapped
        self._failed = failed

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        def observe(reason: Failure) -> Failure:
            # A cancelled attempt is the link stopping, not the peer failing.
            if not reason.check(CancelledError, ConnectingCancelledError):
                self._failed(reason)
            return reason

        return self._wrapped.connect(factory).addErrback(observe)


@attrs.define
class _Waiter:
    """
    A caller of L{PeerLink.when_connected}, and how many more failed
    attempts it waits through (C{None}: any number).
    """

    waiting: Deferred[None]
    remaining: int | None


BATCH_WINDOW = 0.002
"""
The most seconds an item waits in an L{Outbox} past the reactor turn that
made it: the bound of how much later a peer has a checkpoint or a copy.
"""


class Outbox:
    """
    The items (L{ITEM_COMMANDS}) this node has for one peer, sent in as
    few L{Deliver} commands as it can: the channel costs per command, not
    per item.  An item waits for the end of the reactor turn that made it;
    while a Deliver is unanswered, for its answer, at most L{BATCH_WINDOW}
    seconds.  So an idle node sends each item at once, and a busy one
    many in each command.  Items go out in the order they came, in
    commands sent in order, so that a session's items reach the peer in
    the order they were made.

    @ivar _items: the packed items not sent yet.
    @ivar _waiting: for each of C{_items}, its asker's L{Deferred} and its
        command's name.
    @ivar _bytes: the length of C{_items} packed: a command carries at
        most L{MAX_ITEMS_BYTES}.
    @ivar _sending: the call that sends C{_items}, when one is scheduled.
    @ivar _unanswered: how many Delivers wait for their answer.
    """

    def __init__(self, link: PeerLink, clock: IReactorTime) -> None:
        self._link = link
        self._clock = clock
        self._items: list[bytes] = []
        self._waiting: list[tuple[Deferred[bool], str]] = []
        self._bytes = 0
        self._sending: IDelayedCall | None = None
        self._unanswered = 0

    def add(self, command: type[amp.Command], **arguments: Any
            ) -> Deferred[bool]:
        """
        Send the peer C{command} (L{Backup}, L{Checkpoint} or L{Purge})
        with C{arguments}, in the next L{Deliver}.

        @return: fires with the command's answer; fails at once with
            L{BadRequest} for arguments out of bounds and with
            L{PeerUnavailable} when the link is down, later as L{PeerLink.call}
            fails, with L{NotAuthorized} when the peer refused the
            command, or with L{amp.UnknownRemoteError} when its handler
            failed.
        """
        try:
            item = pack_item(command, arguments)
        except BadRequest as e:
            return fail(e)
        if not self._link.connected:
            self._link.counters["unavailable"] += 1
            return fail(PeerUnavailable(self._link.peer_node_id,
                                        "not connected"))
        if (len(self._items) == MAX_ITEMS
                or self._bytes + len(item) > MAX_ITEMS_BYTES):
            self.flush()
        answer: Deferred[bool] = Deferred()
        self._items.append(item)
        self._waiting.append((answer, command.__name__))
        self._bytes += len(item)
        if self._sending is None:
            self._sending = self._clock.callLater(
                BATCH_WINDOW if self._unanswered else 0, self.flush)
        return answer

    def flush(self) -> None:
        """
        Send the items waiting now, if any.
        """
        if self._sending is not None:
            if self._sending.active():
                self._sending.cancel()
            self._sending = None
        if not self._items:
            return
        items, waiting = b"".join(self._items), self._waiting
        self._items, self._waiting, self._bytes = [], [], 0
        self._unanswered += 1
        self._link.call(Deliver, items=items).addCallbacks(
            self._answered, self._failed, callbackArgs=(waiting,),
            errbackArgs=(waiting,))

    def _answered(self, response: dict[str, Any],
                  waiting: list[tuple[Deferred[bool], str]]) -> None:
        self._settled()
        outcomes = response.get("outcomes")
        if not isinstance(outcomes, bytes) or len(outcomes) != len(waiting):
            self._failed(Failure(PeerProtocolError(
                f"peer {self._link.peer_node_id} answered {len(waiting)} "
                f"delivered items with {outcomes!r:.60}")), waiting)
            return
        peer, node = self._link.peer_node_id, self._link.node_id
        for (answer, name), outcome in zip(waiting, outcomes):
            found = _OUTCOME_OF.get(outcome)
            if isinstance(found, bool):
                answer.callback(found)
            elif found == "refused":
                answer.errback(NotAuthorized(
                    f"{node} may not call {name} on {peer}"))
            elif found == "failed":
                answer.errback(amp.UnknownRemoteError(
                    f"peer {peer} failed to run {name}"))
            else:
                answer.errback(PeerProtocolError(
                    f"peer {peer} answered {name} with outcome {outcome}"))

    def _failed(self, reason: Failure,
                waiting: list[tuple[Deferred[bool], str]]) -> None:
        if not isinstance(reason.value, PeerProtocolError):
            self._settled()
        for answer, _ in waiting:
            answer.errback(reason)

    def _settled(self) -> None:
        self._unanswered -= 1
        if self._unanswered == 0 and self._sending is not None:
            # What waited for this answer goes at the end of this turn.
            self._sending.cancel()
            self._sending = self._clock.callLater(0, self.flush)


_OUTCOME_OF: dict[int, bool | str] = {
    value[0]: outcome for outcome, value in OUTCOMES.items()}


def default_retry_policy() -> Callable[[int], float]:
    """
    Reconnection delays: 0.2 s doubling up to 30 s, plus up to 0.2 s of
    jitter so that a restarted node is not hit by all its peers at once.
    """
    return backoffPolicy(initialDelay=0.2, maxDelay=30.0, factor=2.0,
                         jitter=lambda: random.random() * 0.2)


class PeerLink(Service):
    """
    The connection to one peer, kept up in the background.

    @ivar peer_node_id: the peer; also this service's name.
    @ivar endpoint: the endpoint string or endpoint the link was made with.
    @ivar counters: C{connects}, C{disconnects}, C{failed_attempts},
        C{key_mismatches} (connections ended by the key check),
        C{protocol_errors} (connections ended by a box too large),
        C{unavailable} (calls refused because not connected),
        C{unanswered_bound} (fetches refused because too many wait),
        C{call_timeouts} (calls the peer did not answer in time).
    """

    def __init__(self, peer_node_id: str,
                 endpoint: str | IStreamClientEndpoint, tls: ClusterTLS, *,
                 keys: Callable[[], StateKeys],
                 reactor: IReactorTime | None = None,
                 retry_policy: Callable[[int], float] | None = None,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 max_unanswered_fetches: int | None = None,
                 call_timeout: float = DEFAULT_CALL_TIMEOUT) -> None:
        """
        @param endpoint: a client endpoint string (C{"tcp:host=...:port=..."})
            or endpoint for the peer's AMP listener; TLS is added here.
        @param keys: the node's state keys now, for L{KeyCheck}.
        @param retry_policy: seconds to wait before attempt N (1, 2, ...),
            as for L{ClientService}; the attempt number also counts the
            connections in a row that the peer refused at TLS.  Default:
            L{default_retry_policy}.
        @param max_unanswered_fetches: how many L{FetchSession} questions
            may wait for the peer's answer at once; past it L{call} fails
            at once.  A question whose asker gave up still counts until
            the peer answers or the connection ends: a peer that takes
            questions and never answers must not pile them up without
            bound.  C{None}: no bound.
        @param call_timeout: seconds the peer has to answer a command other
            than L{FetchSession}.
        """
        if reactor is None:
            from twisted.internet import reactor as default
            reactor = default
        self.call_timeout = call_timeout
        self.max_unanswered_fetches = max_unanswered_fetches
        self._unanswered_fetches = 0
        self.peer_node_id = identity.validate_name("node id", peer_node_id)
        self.setName(peer_node_id)
        self.cluster = tls.cluster
        self.node_id = tls.node_id
        self.keys = keys
        # As given: what a reconfiguration compares.
        self.endpoint = endpoint
        self.clock = reactor
        self.handshake_timeout = handshake_timeout
        self.counters: Counter[str] = Counter()
        tcp = (clientFromString(reactor, endpoint)
               if isinstance(endpoint, str) else endpoint)
        self._endpoint = _ObservedEndpoint(
            wrapClientTLS(tls.client_options(peer_node_id), tcp),
            lambda reason: self._attempt_failed(reason.getErrorMessage()))
        policy = retry_policy or default_retry_policy()
        self._protocol: _PeerClientProtocol | None = None
        # Connections in a row that the peer refused (see _lost).
        # ClientService restarts its own count at every TCP connection, so
        # without this a peer that refuses our certificate would be retried
        # at the shortest delay forever.
        self._refusals = 0
        self._waiters: list[_Waiter] = []
        self.outbox = Outbox(self, reactor)
        self._client = ClientService(
            self._endpoint, _LinkFactory(self),
            retryPolicy=lambda attempt: policy(attempt + self._refusals),
            clock=reactor)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "not connected"
        return f"<PeerLink {self.peer_node_id} {state}>"

    @property
    def connected(self) -> bool:
        """
        Whether the peer can be asked right now: TLS is up, the peer's
        certificate names the expected node, and the key check passed.
        """
        return self._protocol is not None

    def startService(self) -> None:
        super().startService()
        self._client.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.outbox.flush()
        stopped = self._client.stopService()
        self._fail_waiters(lambda remaining: True, "link stopped")
        return stopped

    def call(self, command: type[amp.Command], **arguments: Any) -> Deferred[dict[str, Any]]:
        """
        Send C{command} to the peer.  Fails at once with L{PeerUnavailable}
        when not connected; fails with it too if the connection ends before
        the answer, or, for commands other than L{FetchSession}, if no
        answer comes within the call timeout.  Cancelling the Deferred
        abandons the answer.
        """
        protocol = self._protocol
        if protocol is None:
            self.counters["unavailable"] += 1
            return fail(PeerUnavailable(self.peer_node_id, "not connected"))

        def answered(response: dict[str, Any]) -> dict[str, Any]:
            protocol.answered = True
            return response

        def lost(reason: Failure) -> Failure:
            if reason.check(CancelledError):
                return reason
            if reason.check(ConnectionClosed, SSL.Error, PeerIdentityError):
                why = tls_failure(reason) or reason.getErrorMessage()
                raise PeerUnavailable(
                    self.peer_node_id, f"connection lost before the answer ({why})")
            # An error answer (NOT_AUTHORIZED...) is an answer too.
            protocol.answered = True
            return reason

        if command is not FetchSession:
            def timed_out(result: object, timeout: float) -> Failure:
                self.counters["call_timeouts"] += 1
                return Failure(PeerUnavailable(
                    self.peer_node_id,
                    f"no answer to {command.__name__} in {timeout} s"))

            return protocol.callRemote(command, **arguments).addCallbacks(
                answered, lost).addTimeout(self.call_timeout, self.clock,
                                           onTimeoutCancel=timed_out)
        # What the outbox holds was made before this question: it goes
        # first, as it would have without the outbox.
        self.outbox.flush()
        if (self.max_unanswered_fetches is not None
                and self._unanswered_fetches >= self.max_unanswered_fetches):
            self.counters["unanswered_bound"] += 1
            return fail(PeerUnavailable(
                self.peer_node_id, f"{self._unanswered_fetches} questions "
                                   f"are still unanswered"))
        self._unanswered_fetches += 1
        # AMP's own Deferred fires when the peer answers or the connection
        # ends, whatever the asker does; the asker gets another one, which
        # it may cancel.
        asker: Deferred[dict[str, Any]] = Deferred()

        def settled(result: dict[str, Any] | Failure) -> None:
            self._unanswered_fetches -= 1
            if asker.called:
                return
            if isinstance(result, Failure):
                asker.errback(result)
            else:
                asker.callback(result)

        protocol.callRemote(command, **arguments).addCallbacks(
            answered, lost).addBoth(settled)
        return asker

    def when_connected(self, fail_after_failures: int | None = None) -> Deferred[None]:
        """
        Fires when the link is connected (at once if it is).

        @param fail_after_failures: fail with L{PeerUnavailable} after this
            many failed connection attempts (TCP or TLS); C{None}: wait.

        Why not L{ClientService.whenConnected} with a C{prepareConnection}
        that runs the TLS handshake and the key check: the link is
        connected only once both are done, and a connection that ends
        while C{prepareConnection} is still running (a refused certificate,
        a refused key check: the cases that matter here) makes
        ClientService (Twisted 26.10) log an unhandled C{NoTransition} from
        its state machine, which has no transition for a disconnection in
        its C{Connecting} and C{Waiting} states.  Its C{whenConnected}
        alone fires as soon as TCP is up, before TLS.  So the link keeps
        its own waiters, counted down by the attempts it sees fail.
        """
        if self._protocol is not None:
            return succeed(None)
        waiting: Deferred[None] = Deferred(
            lambda d: self._waiters.remove(waiter))
        waiter = _Waiter(waiting, fail_after_failures)
        self._waiters.append(waiter)
        return waiting

    def _ready(self, protocol: _PeerClientProtocol) -> None:
        self._protocol = protocol
        self.counters["connects"] += 1
        _log.info("connected to peer {peer}", peer=self.peer_node_id)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.waiting.callback(None)

    def _lost(self, protocol: _PeerClientProtocol, reason: Failure,
              refusal: str | None) -> None:
        """
        The connection of C{protocol} ended, C{refusal} says why if TLS or
        the key check refused it.  It counts as a failed attempt when it
        ended before the link was set up (handshake and key check), and
        also when a TLS alert ended it before the peer
        answered anything: with TLS 1.3 the server judges our certificate
        after our side of the handshake is done, so its refusal arrives as
        an alert on a connection that looked up.
        """
        if protocol is self._protocol:
            self._protocol = None
        if not self.running:
            # Our own stopService closed it: nothing to report.
            return
        was_ready = protocol.handshake_done
        if not was_ready or (refusal is not None and not protocol.answered):
            self._refusals += 1
            if was_ready:
                self.counters["disconnects"] += 1
            self._attempt_failed(refusal or reason.getErrorMessage())
            return
        self._refusals = 0
        self.counters["disconnects"] += 1
        _log.info("lost peer {peer}: {reason}", peer=self.peer_node_id,
                  reason=reason.getErrorMessage())

    def _attempt_failed(self, why: str) -> None:
        self.counters["failed_attempts"] += 1
        _log.warn("cannot connect to peer {peer}: {reason}",
                  peer=self.peer_node_id, reason=why)
        self._fail_waiters(lambda remaining: remaining is not None and remaining <= 1,
                           why)
        for waiter in self._waiters:
            if waiter.remaining is not None:
                waiter.remaining -= 1

    def _fail_waiters(self, done: Callable[[int | None], bool], reason: str) -> None:
        failing = [waiter for waiter in self._waiters if done(waiter.remaining)]
        self._waiters = [waiter for waiter in self._waiters
                         if not done(waiter.remaining)]
        for waiter in failing:
            waiter.waiting.errback(PeerUnavailable(self.peer_node_id, reason))


class Peers(MultiService):
    """
    A L{PeerLink} for every peer of this node.
    """

    def __init__(self, peers: Iterable[tuple[str, str | IStreamClientEndpoint]],
                 tls: ClusterTLS, *, keys: Callable[[], StateKeys],
                 reactor: IReactorTime | None = None,
                 retry_policy: Callable[[int], float] | None = None,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 max_unanswered_fetches: int | None = None,
                 call_timeout: float = DEFAULT_CALL_TIMEOUT) -> None:
        """
        @param peers: (node id, client endpoint string or endpoint) pairs.
        @param keys: the node's state keys now (see L{PeerLink}).
        @param max_unanswered_fetches: the bound of each link (see
            L{PeerLink}).
        @param call_timeout: the call timeout of each link (see
            L{PeerLink}).
        @raise ValueError: a peer is listed twice, or is this node itself.
        """
        super().__init__()
        self._tls = tls
        self._new_link = functools.partial(
            PeerLink, tls=tls, keys=keys, reactor=reactor,
            retry_policy=retry_policy, handshake_timeout=handshake_timeout,
            max_unanswered_fetches=max_unanswered_fetches,
            call_timeout=call_timeout)
        for link in self._new_links(peers):
            link.setServiceParent(self)

    def _new_links(self, peers: Iterable[tuple[str, str | IStreamClientEndpoint]],
                   ) -> list[PeerLink]:
        links: list[PeerLink] = []
        for node_id, endpoint in peers:
            if node_id == self._tls.node_id:
                raise ValueError(f"node {node_id} cannot be its own peer")
            if node_id in (link.peer_node_id for link in links):
                raise ValueError(f"peer {node_id} listed twice")
            links.append(self._new_link(node_id, endpoint))
        return links

    def reconfigure(self, peers: Iterable[tuple[str, str | IStreamClientEndpoint]],
                    ) -> tuple[list[str], list[str]]:
        """
        Make the peers those of C{peers}: links to new peers start, links
        to peers no longer listed (or listed with another endpoint) stop
        and close their connection; the others stay up, untouched.

        @return: the node ids whose link started, and those whose link
            stopped (a changed endpoint is in both).
        @raise ValueError: as the constructor; nothing has changed then.
        """
        wanted = {link.peer_node_id: link for link in self._new_links(peers)}
        removed = [link for link in self.services
                   if wanted.get(link.peer_node_id) is None
                   or wanted[link.peer_node_id].endpoint != link.endpoint]
        added = [link for node_id, link in wanted.items()
                 if node_id not in self.namedServices
                 or self.namedServices[node_id] in removed]
        for link in removed:
            link.disownServiceParent()
        for link in added:
            link.setServiceParent(self)
        return ([link.peer_node_id for link in added],
                [link.peer_node_id for link in removed])

    def link(self, node_id: str) -> PeerLink | None:
        """
        The link to C{node_id}, or C{None} if it is not a peer.
        """
        return self.namedServices.get(node_id)

    @property
    def links(self) -> tuple[PeerLink, ...]:
        return tuple(self.services)

    def connected_count(self) -> int:
        """
        How many peers are connected now.
        """
        return sum(1 for link in self.services if link.connected)

    def fetch_session(self, node_id: str, session_id: bytes,
                      terms: FetchTerms | None = None) -> Deferred[FetchAnswer]:
        """
        L{fetch_from} the link to C{node_id}; L{PeerUnavailable} if there
        is none.
        """
        return self._call(node_id, lambda link, sid: fetch_from(
            link, sid, terms), session_id)

    def backup_session(self, node_id: str, session_id: bytes,
                       sealed: bytes) -> Deferred[bool]:
        """
        Give C{node_id} a sealed copy of C{session_id} to keep; fires with
        whether it kept it.
        """
        return self._call(node_id, lambda link, sid: link.outbox.add(
            Backup, session_id=sid, sealed=sealed), session_id)

    def checkpoint_session(self, node_id: str, session_id: bytes, seq: int,
                           digest: bytes) -> Deferred[bool]:
        """
        Send C{node_id} the digest checkpoint of C{session_id}; fires with
        whether it was newer than the one it had.
        """
        return self._call(node_id, lambda link, sid: link.outbox.add(
            Checkpoint, session_id=sid, seq=seq, digest=digest), session_id)

    def purge_session(self, node_id: str, session_id: bytes,
                      holder: str | None = None) -> Deferred[bool]:
        """
        Tell C{node_id} to drop C{session_id}, which C{holder} (C{None}:
        this node) holds now; fires with whether it held it.  A purge is
        what keeps a session in one place, so a peer whose link is down now
        (as right after it restarted) gets it once the link is back;
        L{PeerUnavailable} if it is not a peer, or if the link fails
        L{PURGE_CONNECT_ATTEMPTS} more times (a peer that stays down lost
        what it held).
        """
        link = self.link(node_id)
        if link is None:
            return fail(PeerUnavailable(node_id, "not a peer of this node"))
        return link.when_connected(PURGE_CONNECT_ATTEMPTS).addCallback(
            lambda _: purge_on(link, session_id, holder))

    def _call(self, node_id: str,
              operation: Callable[[PeerLink, bytes], Deferred[_Answer]],
              session_id: bytes) -> Deferred[_Answer]:
        link = self.link(node_id)
        if link is None:
            return fail(PeerUnavailable(node_id, "not a peer of this node"))
        return operation(link, session_id)


# What the recovery chain and the CLI call.

def purge_on(link: PeerLink, session_id: bytes,
             holder: str | None = None) -> Deferred[bool]:
    """
    Ask the peer behind C{link} to drop C{session_id}, which C{holder}
    (C{None}: this node) holds now; fires with whether it held it.
    """
    return link.outbox.add(Purge, session_id=session_id, holder=holder)


def fetch_from(link: PeerLink, session_id: bytes,
               terms: FetchTerms | None = None) -> Deferred[FetchAnswer]:
    """
    Ask C{link}'s peer for C{session_id}, if it can resume under C{terms}.

    @return: fires with the peer's L{FetchAnswer}, checked; fails with
        L{PeerUnavailable}, L{NotAuthorized}, L{BadRequest}, or
        L{PeerProtocolError} when the answer breaks the protocol.
    """
    try:
        check_session_id(session_id)
    except BadRequest as e:
        return fail(e)

    def garbled(reason: Failure) -> Failure:
        # AMP could not even parse the answer: a required field is absent
        # (KeyError) or a text field is not UTF-8 (UnicodeDecodeError).
        if reason.check(KeyError, ValueError):
            raise PeerProtocolError(
                f"peer {link.peer_node_id} answered FetchSession "
                f"{sessionid.describe(session_id)} with an unreadable box "
                f"({reason.getErrorMessage()})")
        return reason

    def checked(response: dict[str, Any]) -> FetchAnswer:
        status = response.get("status", "")
        sealed = response.get("sealed")
        holder = response.get("holder")
        problem = fetch_answer_problem(status, sealed, holder)
        if problem is not None:
            raise PeerProtocolError(
                f"peer {link.peer_node_id} answered FetchSession "
                f"{sessionid.describe(session_id)} with {problem}")
        return FetchAnswer(status, sealed, holder)

    arguments = {} if terms is None else terms.arguments()
    return link.call(FetchSession, session_id=session_id,
                     **arguments).addCallbacks(checked, garbled)


def stats_from(link: PeerLink) -> Deferred[dict[str, int | float]]:
    """
    The counters of C{link}'s peer, checked (a JSON object of numbers).
    """
    def garbled(reason: Failure) -> Failure:
        if reason.check(KeyError, ValueError):
            raise PeerProtocolError(
                f"peer {link.peer_node_id} answered Stats with an unreadable "
                f"box ({reason.getErrorMessage()})")
        return reason

    def checked(response: dict[str, Any]) -> dict[str, int | float]:
        try:
            counters = json.loads(response["counters"])
        except ValueError as e:
            raise PeerProtocolError(
                f"peer {link.peer_node_id} answered Stats with bad JSON ({e})") from None
        problem = counters_problem(counters)
        if problem is not None:
            raise PeerProtocolError(
                f"peer {link.peer_node_id} answered Stats: {problem}")
        return counters

    return link.call(Stats).addCallbacks(checked, garbled)
