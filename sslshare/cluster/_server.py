"""
The side of the channel that answers peers.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IAddress,
    IHandshakeListener,
    IReactorTime,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from sslshare import identity
from sslshare.cluster._commands import (
    ARGUMENT_CHECKS,
    BY_WIRE_NAME,
    COMMANDS,
    ITEM_COMMANDS,
    OUTCOMES,
    Backup,
    Checkpoint,
    Deliver,
    FetchAnswer,
    FetchSession,
    FetchTerms,
    ICommandHandler,
    KeyCheck,
    Purge,
    Stats,
    counters_problem,
    fetch_answer_problem,
    key_check_message,
    key_problem,
)
from sslshare.cluster._errors import (
    BadRequest,
    HandlerFault,
    KeyMismatch,
    NodeRefused,
    NotAuthorized,
    PeerIdentityError,
)
from sslshare.cluster._framing import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    BoundedBoxes,
    HandshakeDeadline,
)
from sslshare.cluster._tls import node_identity, tls_failure, verify_refusal
from sslshare.logs import RateLimitedWarning
from sslshare.state import StateKeys

_log = Logger()

COUNTERS = (
    "connections", "reading_paused", "handshake_timeouts",
    "refused_connections", "refused_nodes", "duplicate_nodes",
    "protocol_errors", "unknown_commands", "refused_commands",
    "bad_requests", "key_mismatches",
    *(f"commands:{name}" for name in (*COMMANDS, Deliver.__name__)),
    *(f"items:{command.__name__}" for command in ITEM_COMMANDS.values()))
"""Every counter of L{PeerServerFactory.counters}: the stats show each,
zero included."""


def _shown_address(address: IAddress) -> str:
    # A log field: a string survives a JSON log, an IAddress does not.
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@implementer(IHandshakeListener)
class _PeerServerProtocol(BoundedBoxes, amp.AMP, HandshakeDeadline):
    factory: PeerServerFactory

    peer_node_id: str | None = None
    _refused = False
    # A failed key check: the connection ends once its answer is out.
    _link_refused = False

    def __init__(self) -> None:
        super().__init__(locator=_PeerCommands(self))

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer()
        self.host = getattr(peer, "host", None)
        self._address = _shown_address(peer)
        self.factory._protocols.add(self)
        self._start_deadline(self.factory.clock, self.factory.handshake_timeout)

    def handshakeCompleted(self) -> None:
        self._stop_deadline()
        # The verify callback has checked this already; reading it again
        # from the verified certificate is what sets the identity.
        certificate = self.transport.getPeerCertificate()
        try:
            if certificate is None:
                raise PeerIdentityError("no certificate")
            node_id = node_identity(certificate.to_cryptography(),
                                    self.factory.cluster)
        except PeerIdentityError as e:
            self._refuse(str(e))
            self.transport.abortConnection()
            return
        self.peer_node_id = node_id
        self.factory.counters["connections"] += 1
        _log.info("peer {peer} connected from {address}", peer=node_id,
                  address=self._address)
        # Answers the peer does not take stop this side reading its
        # questions (see pauseProducing).
        self.transport.registerProducer(self, True)

    def pauseProducing(self) -> None:
        """
        The transport's write buffer is over its bound: the peer asks
        faster than it reads the answers.  Reading stops, and so does
        parsing what was read already, until the buffer drains.
        """
        self.factory.counters["reading_paused"] += 1
        super().pauseProducing()

    def _handshake_timed_out(self) -> None:
        self._refused = True
        self.factory.counters["handshake_timeouts"] += 1
        self.factory.warn("handshake_timeouts",
                          "dropped connection from {address}: no TLS "
                          "handshake in {timeout} s", address=self._address,
                          timeout=self.factory.handshake_timeout)

    def _refuse(self, reason: str, counter: str = "refused_connections") -> None:
        self._refused = True
        self.factory.counters[counter] += 1
        self.factory.warn(counter, "refused connection from {address}: {reason}",
                          address=self._address, reason=reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_deadline()
        self.factory._protocols.discard(self)
        if self.peer_node_id is None and not self._refused:
            problem = verify_refusal(self.transport)
            why = tls_failure(reason) if problem is None else str(problem)
            if why is not None:
                self._refuse(why, problem.counter if isinstance(
                    problem, NodeRefused) else "refused_connections")
        super().connectionLost(reason)

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        # This side never asks, so no answer is due to it (AMP would raise
        # out of dataReceived on an answer to no question, or a box that is
        # neither); and our peers ask every question with _ask (AMP would
        # log the failure of one without as an unhandled error).
        if (amp.COMMAND not in box or amp.ASK not in box
                or amp.ANSWER in box or amp.ERROR in box):
            self._protocol_error(f"a box that is not a question (keys "
                                 f"{sorted(box)[:8]!r})")
            return
        super().ampBoxReceived(box)
        if self._link_refused:
            # The answer of the failed key check is written already.
            self._dropped = True
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def lengthLimitExceeded(self, length: int) -> None:
        self._protocol_error(f"a key of {length} bytes (AMP allows 255)")

    def _box_too_large(self, what: str) -> None:
        self._protocol_error(what)

    def _protocol_error(self, what: str) -> None:
        """
        The peer broke AMP itself: count it, say so, and drop it.
        """
        self.factory.counters["protocol_errors"] += 1
        self.factory.warn("protocol_errors",
                          "dropped {peer} at {address}: it sent {what}",
                          peer=self.peer_node_id or "(unknown)",
                          address=self._address, what=what)
        self._drop()


@implementer(amp.IResponderLocator)
class _PeerCommands:
    """
    The one way from a peer's question to the handler.  A box that names a
    command of the channel goes through these steps, in this order, and
    stops at the first that refuses it:

      1. the peer must be allowed to run the command: C{NOT_AUTHORIZED},
         counted in C{refused_commands} (L{KeyCheck} is open to every peer
         the handshake admitted, and so is L{Deliver}, whose items are
         authorized one by one, by the command each names: a refused item
         answers C{R}, and the others run);
      2. AMP parses the arguments, and L{ARGUMENT_CHECKS} checks them
         against the command's bounds: C{BAD_REQUEST}, counted in
         C{bad_requests}; the connection stays up, since a malformed
         question is the asker's fault;
      3. the command's responder here runs the handler, and checks what it
         answers before it goes out: a L{HandlerFault} is this node's
         fault, logged here, and the asker gets AMP's unknown error.

    A L{Deliver} checks all its items in step 2, so that a malformed one
    runs none; an item whose handler fails answers C{F}, logged here, and
    the items after it run.  Items are counted in C{items:<command>}.

    Any other name gets AMP's C{UNHANDLED}, counted in C{unknown_commands}:
    AMP's built-in StartTLS among them, which would start TLS inside TLS.
    No responder checks anything steps 1 and 2 have checked.
    """

    def __init__(self, protocol: _PeerServerProtocol) -> None:
        self._protocol = protocol

    def locateResponder(self, name: bytes,
                        ) -> Callable[[amp.AmpBox], Deferred[amp.AmpBox]] | None:
        command = BY_WIRE_NAME.get(name)
        if command is None:
            protocol = self._protocol
            protocol.factory.counters["unknown_commands"] += 1
            protocol.factory.warn(
                "unknown_commands", "unknown command {command!r} from {peer} "
                "at {address}", command=name[:64],
                peer=protocol.peer_node_id or "(unknown)",
                address=protocol._address)
            return None
        return lambda box: Deferred.fromCoroutine(self._answer(command, box))

    async def _answer(self, command: type[amp.Command],
                      box: amp.AmpBox) -> amp.AmpBox:
        known = {**command.errors, **command.fatalErrors}
        try:
            requester = self._authorize(command)
            try:
                parsed = command.parseArguments(box, self._protocol)
            except (KeyError, ValueError, TypeError) as e:
                # A missing argument, an integer that is not one.
                raise self._bad_request(
                    command, f"unreadable arguments "
                             f"({type(e).__name__}: {e})"[:200]) from None
            try:
                arguments = ARGUMENT_CHECKS[command](**parsed)
            except BadRequest as e:
                raise self._bad_request(command, str(e)) from None
            response = await maybeDeferred(
                self._RESPONDERS[command], self, requester, **arguments)
        except tuple(known) as e:
            raise amp.RemoteAmpError(known[type(e)], str(e),
                                     type(e) in command.fatalErrors) from None
        return command.makeResponse(response, self._protocol)

    def _authorize(self, command: type[amp.Command]) -> str:
        """
        The requester's node id, if it may run C{command}.
        """
        protocol = self._protocol
        if command is KeyCheck or command is Deliver:
            # TLS delivers no box before the handshake, which set it.
            peer = protocol.peer_node_id
            assert peer is not None
        else:
            peer = self._allowed(command.__name__)
        if command is not KeyCheck:
            protocol.factory.counters[f"commands:{command.__name__}"] += 1
        return peer

    def _allowed(self, name: str) -> str:
        """
        The requester's node id, if it may run the command C{name}.
        """
        protocol = self._protocol
        factory = protocol.factory
        peer = protocol.peer_node_id
        if peer is None or not factory.allowed(name, peer):
            factory.counters["refused_commands"] += 1
            factory.warn("refused_commands",
                         "refused {command} from {peer} at {address}: "
                         "not authorized", command=name,
                         peer=peer or "(unknown)", address=protocol._address)
            raise NotAuthorized(f"{peer or 'an unidentified peer'} may not "
                                f"call {name} on {factory.node_id}")
        return peer

    def _bad_request(self, command: type[amp.Command],
                     reason: str) -> BadRequest:
        factory = self._protocol.factory
        factory.counters["bad_requests"] += 1
        factory.warn("bad_requests", "bad {command} from {peer}: {reason}",
                     command=command.__name__,
                     peer=self._protocol.peer_node_id, reason=reason)
        return BadRequest(reason)

    def _key_check(self, requester: str, key_id: bytes,
                   proof: bytes) -> dict[str, bytes]:
        protocol = self._protocol
        factory = protocol.factory
        node_id = factory.node_id
        keys = factory.keys()
        connection = protocol.transport.getHandle()
        problem = key_problem(
            keys, requester, node_id, key_id,
            key_check_message(connection, b"client", factory.cluster,
                              requester, node_id), proof)
        if problem is not None:
            protocol._link_refused = True
            factory.counters["key_mismatches"] += 1
            factory.warn("key_mismatches",
                         "refused the link of peer {peer} at {address}: "
                         "{reason}", peer=requester,
                         address=protocol._address, reason=problem)
            raise KeyMismatch(problem)
        own_key_id, own_proof = keys.prove(key_check_message(
            connection, b"server", factory.cluster, requester, node_id))
        return {"key_id": own_key_id, "proof": own_proof}

    async def _fetch_session(self, requester: str, session_id: bytes,
                             terms: FetchTerms | None) -> dict[str, object]:
        answer = await maybeDeferred(self._protocol.factory.handler.fetch_session,
                                     session_id, requester, terms)
        if not isinstance(answer, FetchAnswer):
            raise HandlerFault(f"fetch_session answered "
                               f"{type(answer).__name__}")
        problem = fetch_answer_problem(answer.status, answer.sealed,
                                       answer.holder)
        if problem is not None:
            raise HandlerFault(f"fetch_session answered {problem}")
        response: dict[str, object] = {"status": answer.status}
        if answer.sealed is not None:
            response["sealed"] = answer.sealed
        if answer.holder is not None:
            response["holder"] = answer.holder
        return response

    async def _run_item(self, command: type[amp.Command], requester: str,
                        arguments: dict[str, Any]) -> bool:
        """
        Run an item command (L{ITEM_COMMANDS}) on the handler: a single
        command and an item of a L{Deliver} do the same.
        """
        handler = self._protocol.factory.handler
        if command is Checkpoint:
            answer = handler.checkpoint(arguments["session_id"],
                                        arguments["seq"], arguments["digest"],
                                        requester)
        elif command is Backup:
            answer = handler.backup(arguments["session_id"],
                                    arguments["sealed"], requester)
        else:
            answer = handler.purge(arguments["session_id"], requester,
                                   arguments["holder"])
        if isinstance(answer, Deferred):
            answer = await answer
        return bool(answer)

    async def _checkpoint(self, requester: str,
                          **arguments: Any) -> dict[str, bool]:
        return {"accepted": await self._run_item(Checkpoint, requester,
                                                 arguments)}

    async def _backup(self, requester: str,
                      **arguments: Any) -> dict[str, bool]:
        return {"kept": await self._run_item(Backup, requester, arguments)}

    async def _purge(self, requester: str,
                     **arguments: Any) -> dict[str, bool]:
        return {"removed": await self._run_item(Purge, requester, arguments)}

    async def _deliver(self, requester: str,
                       items: list[tuple[type[amp.Command], dict[str, Any]]]
                       ) -> dict[str, bytes]:
        # Each command is authorized once per batch: its refusal is then
        # counted and logged once, however many items name it.
        allowed: dict[type[amp.Command], bool] = {}
        counters = self._protocol.factory.counters
        outcomes = []
        for command, arguments in items:
            name = command.__name__
            if command not in allowed:
                try:
                    self._allowed(name)
                    allowed[command] = True
                except NotAuthorized:
                    allowed[command] = False
            if not allowed[command]:
                outcomes.append(OUTCOMES["refused"])
                continue
            counters[f"items:{name}"] += 1
            try:
                done = await self._run_item(command, requester, arguments)
            except Exception:
                _log.failure("{command} item from {peer} failed",
                             command=command.__name__, peer=requester)
                outcomes.append(OUTCOMES["failed"])
            else:
                outcomes.append(OUTCOMES[done])
        return {"outcomes": b"".join(outcomes)}

    def _stats(self, requester: str) -> dict[str, str]:
        factory = self._protocol.factory
        counters = dict(factory.handler.stats())
        counters.update(factory.stats())
        problem = counters_problem(counters)
        if problem is not None:
            raise HandlerFault(f"stats answered {problem}")
        return {"counters": json.dumps(counters, sort_keys=True,
                                       allow_nan=False)}

    _RESPONDERS: dict[type[amp.Command], Callable[..., object]] = {
        KeyCheck: _key_check,
        FetchSession: _fetch_session,
        Checkpoint: _checkpoint,
        Backup: _backup,
        Purge: _purge,
        Deliver: _deliver,
        Stats: _stats,
    }


class PeerServerFactory(Factory["_PeerServerProtocol"]):
    """
    The AMP side of the channel that answers peers.  Listen with it wrapped
    in TLS::

        TLSMemoryBIOFactory(cluster_tls.server_options(factory.admit),
                            False, factory)

    @ivar counters: C{connections} (identified peers), C{refused_connections},
        C{refused_nodes} (nodes of the cluster that are not peers),
        C{duplicate_nodes} (a node id connected from another host
        already), C{handshake_timeouts}, C{key_mismatches},
        C{refused_commands}, C{bad_requests}, C{unknown_commands},
        C{protocol_errors} (boxes AMP cannot take, which end the
        connection), C{reading_paused} (times reading stopped while a
        peer's answers waited), and C{commands:<name>} for each command
        let through.
    @ivar peers: the node ids of the peers, which may connect (and this
        node, which may ask for its own L{Stats}); C{None}: any node of the
        cluster may.

    Stopping the last listener that uses the factory also closes the
    connections it accepted: a node that stops listening answers no one.
    """

    protocol = _PeerServerProtocol

    def __init__(self, handler: ICommandHandler, cluster: str, node_id: str,
                 allowed: Callable[[str, str], bool], *,
                 peers: Iterable[str] | None, keys: Callable[[], StateKeys],
                 clock: IReactorTime | None = None,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT) -> None:
        """
        @param handler: what runs the commands.
        @param cluster: the cluster name: only its nodes are accepted.
        @param node_id: this node's id (for the log and error messages).
        @param allowed: C{(command name, requester node id) -> bool}, asked
            before every command (names are the keys of L{COMMANDS}).
        @param peers: the node ids that may connect, besides this node;
            C{None}: every node of the cluster (peers found in DNS).
        @param keys: the node's state keys now, for L{KeyCheck}.
        @param handshake_timeout: seconds a connection may take to finish
            its TLS handshake.
        """
        identity.validate_name("cluster name", cluster)
        identity.validate_name("node id", node_id)
        if clock is None:
            from twisted.internet import reactor
            clock = reactor
        self.handler = handler
        self.cluster = cluster
        self.node_id = node_id
        self.allowed = allowed
        self.peers = None if peers is None else frozenset(peers)
        self.keys = keys
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self._protocols: set[_PeerServerProtocol] = set()
        self._warnings: dict[str, RateLimitedWarning] = {}

    def warn(self, kind: str, format: str, **fields: Any) -> None:
        """
        Log a warning a remote can repeat at will at a bounded rate, apart
        for each C{kind} (a counter name), so that a flood of one kind
        hides no other.
        """
        if kind not in self._warnings:
            self._warnings[kind] = RateLimitedWarning(self.clock, log=_log)
        self._warnings[kind].warn(format, **fields)

    def admit(self, node_id: str, address: IAddress) -> None:
        """
        Refuse node C{node_id}, connecting from C{address} with a verified
        certificate, unless it is a peer (or this node) and is not
        connected from another host already.

        @raise NodeRefused: it may not, and why.
        """
        if (node_id != self.node_id and self.peers is not None
                and node_id not in self.peers):
            raise NodeRefused(
                "refused_nodes", f"node {node_id} is not a peer of "
                                 f"{self.node_id} (cluster.peers)")
        host = getattr(address, "host", None)
        for protocol in self._protocols:
            if protocol.peer_node_id == node_id and protocol.host != host:
                raise NodeRefused(
                    "duplicate_nodes",
                    f"node {node_id} is connected from {protocol._address} "
                    f"already, and {_shown_address(address)} claims its id "
                    f"too: two nodes have the same id")

    def stats(self) -> dict[str, int]:
        """
        The channel's counters, named C{cluster.<counter>}.
        """
        return {f"cluster.{name}": count
                for name, count in self.counters.items()}

    def connected_peers(self) -> set[str]:
        """
        The node ids of the peers connected to this node right now.
        """
        return {protocol.peer_node_id for protocol in self._protocols
                if protocol.peer_node_id is not None}

    def stopFactory(self) -> None:
        # Aborted, not closed: a TLS close waits for the peer's close_notify,
        # and a stalled peer would keep the connection open.
        for protocol in list(self._protocols):
            protocol.transport.abortConnection()
