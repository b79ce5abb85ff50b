"""
The per-connection TLS protocol: Twisted's L{TLSMemoryBIOProtocol}, taught to
wait for a session.

How a handshake pauses and resumes, once:

 1. Twisted feeds the ClientHello to the engine and calls C{do_handshake}.
 2. The engine (L{sslshare.tls.Connection}) sees one of our session ids
    offered, stops OpenSSL at its client-hello callback and calls
    L{SessionResumingTLSProtocol.lookup_requested}.
 3. We ask the factory's C{lookup} for the session.  Its Deferred may have
    fired already (a local hit): then we supply the answer at once and the
    engine carries on inside the same C{do_handshake} call.  Otherwise
    C{do_handshake} raises C{WantReadError}, Twisted waits for bytes that
    will not come, and the handshake stays paused.
 4. When the Deferred fires later, we supply the answer and feed the
    protocol zero bytes: C{dataReceived(b"")} is Twisted's own path for
    "try the handshake again, then flush", so nothing of Twisted's TLS
    machinery is copied here.
 5. A lookup that fails, or is cancelled because the client went away, is a
    miss: a full handshake, never a dropped or hung client.

Inside the TLS protocol, L{BackendProxy} carries the plaintext to and from
the backend endpoint once the handshake is done: each side is the other's
producer, so a slow reader on one side pauses the other (back-pressure),
and the backend closing its side ends the TLS connection once everything it
sent has gone out (half-close).  A handshake that does not finish within
the handshake timeout is aborted.

This module holds no crypto: the engine does the TLS, C{lookup} says where
sessions come from.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, cast
from typing import Protocol as TypingProtocol

import attrs
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableProtocol,
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from OpenSSL import SSL
from zope.interface import implementer

from sslshare import accesslog, proxyheader, sessionid
from sslshare.digest import CheckpointPipeline
from sslshare.hooks import LookupRequest
from sslshare.logs import iso_time
from sslshare.recovery import Recovered
from sslshare.tls import Connection, ISessionLookupListener, ServerContext


Lookup = Callable[[LookupRequest],
                  "Deferred[Recovered | None] | Recovered | None"]


@implementer(ISessionLookupListener)
class SessionResumingTLSProtocol(TLSMemoryBIOProtocol):
    """
    A TLS server protocol whose handshake waits for the session a client
    offers.

    @ivar recovered: what the lookup found for the handshake, or C{None}.
    @ivar lookup_seconds: how long the handshake waited for its lookup,
        or C{None} when it asked none.
    """

    _log = Logger()
    factory: SessionResumingTLSFactory
    # The TCP connection, from makeConnection on.
    transport: ITransport
    _pendingLookup: Deferred[None] | None = None
    _answerArrivesLater = False
    recovered: Recovered | None = None
    lookup_seconds: float | None = None
    _lookup_started = 0.0

    def makeConnection(self, transport: ITransport) -> None:
        # A handshake is a few small flights each way: Nagle's algorithm
        # would hold the last one for the peer's delayed ACK (up to 40 ms).
        setNoDelay = getattr(transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)
        super().makeConnection(transport)

    def lookup_requested(self, connection: Connection,
                         request: LookupRequest) -> None:
        # A TCP client is known by its IP address, not its port: one host
        # opening many connections is one client.
        client = getattr(self.transport.getPeer(), "host", None)
        request = attrs.evolve(request, client=client)
        self._lookup_started = self.factory.clock.seconds()
        # maybeDeferred waits for a Deferred answer, which its stubs cannot
        # say of a lookup that may answer either way.
        found = cast("Deferred[Recovered | None]",
                     maybeDeferred(self.factory.lookup, request))
        lookup = found.addErrback(self._lookupFailed, request).addCallback(
            self._supply, connection)
        if not lookup.called:
            self._answerArrivesLater = True
            self._pendingLookup = lookup

    def _lookupFailed(self, reason: Failure, request: LookupRequest) -> None:
        if not reason.check(CancelledError):
            self._log.failure(
                "session lookup for {session} failed; full handshake",
                reason, session=sessionid.describe(request.session_id))
        return None

    def _supply(self, found: Recovered | None,
                connection: Connection) -> None:
        self._pendingLookup = None
        self.lookup_seconds = self.factory.clock.seconds() - self._lookup_started
        if self._lostTLSConnection:
            return
        if found is None:
            connection.supply(None)
        else:
            self.recovered = found
            connection.supply(found.der)
        if self._answerArrivesLater:
            self.dataReceived(b"")

    def cut_off(self, end: str) -> None:
        """
        Close the connection at once, for C{end} (L{accesslog.ENDS}).
        """
        if isinstance(self.wrappedProtocol, BackendProxy):
            self.wrappedProtocol.ended(end)
        self.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # The TLS connection is marked lost first, so that the answer a
        # cancellation delivers is dropped rather than supplied.
        super().connectionLost(reason)
        if self._pendingLookup is not None:
            self._pendingLookup.cancel()


@implementer(IOpenSSLServerConnectionCreator)
class SessionResumingTLSFactory(TLSMemoryBIOFactory):
    """
    Wraps C{wrappedFactory} in TLS served by C{context}, asking C{lookup}
    for the sessions clients offer.

    @ivar context: the L{ServerContext} of new connections; replacing it
        (a reload) leaves the connections already open on the old one.
    @ivar lookup: called with a L{LookupRequest}; returns a
        L{sslshare.recovery.Recovered}, C{None}, or a Deferred of either.
    @ivar max_connections: client connections open at once at most
        (C{None}: no bound); one past it is closed as it arrives, counted
        in C{counters["connections_refused"]}.
    @ivar clock: what lookups are timed by.
    """

    protocol = SessionResumingTLSProtocol

    def __init__(self, context: ServerContext, lookup: Lookup,
                 wrappedFactory: IProtocolFactory,
                 counters: Counter[str] | None = None,
                 max_connections: int | None = None,
                 clock: IReactorTime | None = None) -> None:
        super().__init__(self, False, wrappedFactory)
        if clock is None:
            from twisted.internet import reactor
            clock = cast(IReactorTime, reactor)
        self.clock = clock
        self.context = context
        self.lookup = lookup
        self.counters: Counter[str] = Counter() if counters is None else counters
        self.max_connections = max_connections
        self._closed_waiters: list[Deferred[None]] = []

    # A factory may build no protocol (Twisted then closes the
    # connection), which WrappingFactory's annotation leaves out.
    def buildProtocol(  # type: ignore[override]
            self, addr: IAddress | None) -> TLSMemoryBIOProtocol | None:
        if (self.max_connections is not None
                and len(self.protocols) >= self.max_connections):
            self.counters["connections_refused"] += 1
            return None
        return super().buildProtocol(addr)

    # Twisted types the interface's answer as pyOpenSSL's Connection; what
    # TLSMemoryBIOProtocol calls of it, sslshare.tls.Connection has.
    def serverConnectionForTLS(  # type: ignore[override]
            self, tlsProtocol: TLSMemoryBIOProtocol) -> Connection:
        return self.context.serverConnectionForTLS(tlsProtocol)

    def unregisterProtocol(self, protocol: TLSMemoryBIOProtocol) -> None:
        super().unregisterProtocol(protocol)
        if not self.protocols:
            waiters, self._closed_waiters = self._closed_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def all_closed(self) -> Deferred[None]:
        """
        Fires when no connection of this factory is open (at once if none
        is); cancel it to stop waiting.
        """
        if not self.protocols:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._closed_waiters.remove)
        self._closed_waiters.append(waiter)
        return waiter


class HandshakeDone(TypingProtocol):
    """
    Told of each handshake's end (L{sslshare.node.Node.handshake_done}).
    """

    def __call__(self, connection: Connection | None,
                 found: Recovered | None = None,
                 pause: Callable[[], object] | None = None,
                 resume: Callable[[], object] | None = None,
                 ) -> CheckpointPipeline | None: ...


@implementer(IHandshakeListener)
class BackendProxy(Protocol):
    """
    The plaintext side of one client connection: bytes to and from the
    backend, once the handshake is done.
    """

    _log = Logger()
    factory: BackendProxyFactory
    # The TLS connection to the client, from makeConnection on.
    transport: SessionResumingTLSProtocol
    _backend: _BackendSide | None = None
    _timeout: IDelayedCall | None = None
    _linked = False
    _checkpoints: CheckpointPipeline | None = None
    _abort_call: IDelayedCall | None = None
    _idle: IDelayedCall | None = None
    # What the handshake settled, when the access log or the PROXY
    # protocol header needs it; then also how the session was found, and
    # the owner part of its id.
    _settled: proxyheader.Connection | None = None
    _resumed: str | None = None
    _session: str | None = None
    _service: str | None = None
    # How the connection ended (accesslog.ENDS) and why, once known: the
    # first cause wins.
    _end: str | None = None
    _why: str | None = None
    bytes_in = 0
    bytes_out = 0

    def connectionMade(self) -> None:
        self._started = self.factory.clock.seconds()
        self._pending: list[bytes] = []
        self._timeout = self.factory.clock.callLater(
            self.factory.settings.handshake_timeout, self._handshakeTimedOut)

    def _handshakeTimedOut(self) -> None:
        self._timeout = None
        self.ended("handshake_timeout")
        self.factory.handshake_done(None)
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None
        tls = self.transport
        if (self.factory.access_log is not None
                or self.factory.settings.proxy_protocol is not None):
            self._settle()
        self._gates = (_Gate(tls), _Gate(None))
        self._checkpoints = self.factory.handshake_done(
            tls.getHandle(), tls.recovered, self._hold, self._release)
        # Client bytes wait in the kernel until the backend can take them.
        tls.pauseProducing()
        connecting = self.factory.settings.backend.connect(
            _BackendConnection(self))
        connecting.addCallbacks(self._backendConnected, self._backendFailed)

    def _backendConnected(self, backend: _BackendSide) -> None:
        if not self.transport.connected:
            backend.transport.loseConnection()
            return
        self._backend = backend
        self._idle = self.factory.clock.callLater(
            self.factory.settings.idle_timeout, self._idle_timed_out)
        version = self.factory.settings.proxy_protocol
        if version is not None:
            if self._settled is None:
                # The PROXY protocol came in with a reload since the
                # handshake.
                self._settle()
            assert self._settled is not None
            backend.transport.write(proxyheader.header(version,
                                                       self._settled))
        for data in self._pending:
            backend.transport.write(data)
        self._pending = []
        client, server = self._gates
        server.attach(backend.transport)
        self.transport.registerProducer(server, True)
        backend.transport.registerProducer(client, True)
        self._linked = True
        client.resumeProducing()

    def _settle(self) -> None:
        """
        Keep what the handshake settled, for the PROXY protocol header and
        the access log.
        """
        tls = self.transport
        connection = tls.getHandle()
        server_name = connection.get_servername()
        recovered = tls.recovered
        session_id = connection.get_session_id()
        if not connection.session_reused():
            self._resumed = "full"
        else:
            self._resumed = ("local" if recovered is None
                             else recovered.found_at)
            request = connection.lookup_request
            if request is not None:
                session_id = request.session_id
        self._session = accesslog.owner_part(session_id)
        self._settled = proxyheader.Connection(
            client=_ip_end(tls.getPeer()), server=_ip_end(tls.getHost()),
            tls_version=connection.get_protocol_version_name(),
            cipher=connection.get_cipher_name(),
            server_name=(None if server_name is None
                         else server_name.decode("ascii")),
            alpn=connection.get_alpn_proto_negotiated() or None,
            resumed="full" if recovered is None else recovered.source)
        self._service = connection.service.name

    def _backendFailed(self, reason: Failure) -> None:
        self.ended("backend_unreachable", reason.getErrorMessage())
        client = self.transport.getPeer()
        self.factory.backend_failed(
            self.factory.settings.backend_name,
            f"{getattr(client, 'host', client)}:{getattr(client, 'port', '')}",
            reason)
        # Reading was paused for the backend: the client's answer to our
        # close_notify (or its FIN) must get through, or the connection
        # would sit in CLOSE-WAIT for good.
        self.transport.resumeProducing()
        self.transport.loseConnection()
        self._abort_call = self.factory.clock.callLater(
            self.factory.close_timeout, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        self.factory.counters["received_bytes"] += len(data)
        self.bytes_in += len(data)
        if self._backend is None:
            self._pending.append(data)
        else:
            self.busy()
            self._backend.transport.write(data)

    def busy(self) -> None:
        """
        A byte went one way or the other: the idle timeout starts again.
        """
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.factory.settings.idle_timeout)

    def _idle_timed_out(self) -> None:
        self._idle = None
        self.ended("idle_timeout")
        self.factory.idle_timed_out()
        self.transport.loseConnection()
        self._abort_call = self.factory.clock.callLater(
            self.factory.close_timeout, self.transport.abortConnection)

    def ended(self, end: str, why: str | None = None) -> None:
        """
        The connection is ending for C{end} (L{accesslog.ENDS}), because
        of C{why}, unless it already was for another cause.
        """
        if self._end is None:
            self._end, self._why = end, why

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        access_log = self.factory.access_log
        if access_log is not None:
            access_log.write(self._access_entry(reason))
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        if self._backend is not None:
            self.unlink()
            # Whatever the client sent still goes out before the close.
            self._backend.transport.loseConnection()
        checkpoints = self._checkpoints
        if checkpoints is not None:
            # The last records' checkpoint gets a moment to reach the store.
            flushing = checkpoints.flush()
            flushing.addTimeout(self.factory.flush_timeout, self.factory.clock)

            def stop(_: object) -> None:
                checkpoints.stop()

            flushing.addBoth(stop)

    def _access_entry(self, reason: Failure) -> accesslog.Entry:
        """
        This connection's access log entry (L{accesslog.FIELDS}), as it
        ends for C{reason}.
        """
        now = self.factory.clock.seconds()
        settled = self._settled
        if self._end is None:
            if settled is None:
                self.ended("handshake_failure", _handshake_failure(reason))
            else:
                self.ended("client_close")
        client = _ip_end(self.transport.getPeer())
        lookup = self.transport.lookup_seconds
        entry: accesslog.Entry = {
            "time": iso_time(now),
            "client_address": None if client is None else client[0],
            "client_port": None if client is None else client[1],
            "server_name": None, "service": None, "tls_version": None,
            "cipher": None, "alpn": None, "resumed": self._resumed,
            "lookup_ms": None if lookup is None else round(lookup * 1000, 3),
            "session": self._session,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "duration_ms": round((now - self._started) * 1000, 3),
            "end": self._end, "reason": self._why,
        }
        if settled is not None:
            entry.update(
                server_name=settled.server_name, service=self._service,
                tls_version=settled.tls_version, cipher=settled.cipher,
                alpn=(None if settled.alpn is None
                      else settled.alpn.decode("ascii", "replace")))
        return entry

    def _hold(self) -> None:
        # The checkpoint store lags: both directions wait for it.
        for gate in self._gates:
            gate.hold()

    def _release(self) -> None:
        for gate in self._gates:
            gate.release()

    def unlink(self) -> None:
        """
        End the producer/consumer pairing of the two sides: a transport
        with a producer registered waits for it before it closes.
        """
        if self._linked and self._backend is not None:
            self._linked = False
            self.transport.unregisterProducer()
            self._backend.transport.unregisterProducer()


def _handshake_failure(reason: Failure) -> str:
    """
    Why a handshake failed, in words: OpenSSL's reasons, or how the
    connection ended before it finished (a TCP health check that only
    connects, a port scan).
    """
    error = reason.value
    if isinstance(error, SSL.Error) and error.args \
            and isinstance(error.args[0], list):
        return "; ".join(str(item[-1]) for item in error.args[0]
                         if isinstance(item, tuple)) or "TLS error"
    return f"closed before the handshake finished ({reason.getErrorMessage()})"


def _ip_end(address: IAddress) -> tuple[str, int] | None:
    """
    (host, port) of an IP socket's end, or C{None} for another kind.
    """
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host, address.port
    return None


@implementer(IPushProducer)
class _Gate:
    """
    A producer that two parties may pause: the consumer it is registered
    with (flow control) and the checkpoint pipeline (C{hold}).  It runs only
    when neither holds it, so one cannot undo the other's pause.
    """

    def __init__(self, producer: Any) -> None:
        self.producer = producer
        self._paused = False
        self._held = False

    def pauseProducing(self) -> None:
        self._paused = True
        self._apply()

    def resumeProducing(self) -> None:
        self._paused = False
        self._apply()

    def stopProducing(self) -> None:
        if self.producer is not None:
            self.producer.stopProducing()

    def attach(self, producer: Any) -> None:
        self.producer = producer
        if self._held:
            producer.pauseProducing()

    def hold(self) -> None:
        self._held = True
        self._apply()

    def release(self) -> None:
        self._held = False
        self._apply()

    def _apply(self) -> None:
        if self.producer is None:
            return
        if self._paused or self._held:
            self.producer.pauseProducing()
        else:
            self.producer.resumeProducing()


class _IStream(ITransport, IConsumer, IPushProducer):
    """
    What each side of a proxied connection uses of the other's transport:
    its bytes, its flow control both ways, and its end.  Twisted's stream
    transports provide all three interfaces, and declare some.
    """


@implementer(IHalfCloseableProtocol)
class _BackendSide(Protocol):
    # The TCP connection to the backend, from makeConnection on.
    transport: _IStream

    def __init__(self, client: BackendProxy) -> None:
        self.client = client

    def dataReceived(self, data: bytes) -> None:
        self.client.factory.counters["sent_bytes"] += len(data)
        self.client.bytes_out += len(data)
        self.client.busy()
        self.client.transport.write(data)

    def readConnectionLost(self) -> None:
        # The backend has said all it will say: close TLS once it is sent.
        self.client.ended("backend_close")
        self.client.unlink()
        self.client.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """
        Nothing to do: the client side closes on its own.
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.client.ended("backend_close")
        self.client.unlink()
        self.client.transport.loseConnection()


class _BackendConnection(Factory[_BackendSide]):
    """
    Makes the one L{_BackendSide} of C{client}'s backend connection.
    Quiet, unlike the factory of C{connectProtocol}: its "Starting
    factory" and "Stopping factory" lines, two for every client, were a
    sixth of a resumed connection's CPU.
    """

    noisy = False

    def __init__(self, client: BackendProxy) -> None:
        self.client = client

    def buildProtocol(self, addr: IAddress | None) -> _BackendSide:
        return _BackendSide(self.client)


@attrs.frozen
class ProxySettings:
    """
    What a reload may change of the proxy.

    @ivar backend: where the plaintext goes.
    @ivar backend_name: how the configuration names C{backend}, for the
        log.
    @ivar handshake_timeout: seconds a client has to finish its handshake.
    @ivar idle_timeout: seconds a connection may pass, after its handshake,
        with no byte either way; then it is closed.
    @ivar proxy_protocol: the PROXY protocol header written to the backend
        first (L{sslshare.proxyheader.VERSIONS}), or C{None}.
    """

    backend: IStreamClientEndpoint
    backend_name: str
    handshake_timeout: float
    idle_timeout: float
    proxy_protocol: str | None = None


class BackendProxyFactory(Factory[BackendProxy]):
    """
    Makes L{BackendProxy} protocols.

    @param settings: the proxy's settings in force; a reload replaces them
        whole (C{settings}).
    @param handshake_done: told of each handshake's end, as
        C{handshake_done(connection, found, pause, resume)}: the engine
        connection, what the lookup found for it (or C{None}), and two
        callables that stop and restart the connection's traffic; it may
        return the connection's checkpoint pipeline, flushed at close.  A
        handshake that timed out is told as C{handshake_done(None)}.
    @param backend_failed: told of each client whose backend connection
        failed, as C{backend_failed(backend_name, client, reason)} with the
        client's C{host:port}; the client connection is closed.
    @param counters: where C{idle_timeouts}, C{received_bytes} and
        C{sent_bytes} are counted (the node's).
    @param access_log: where each connection is logged when it ends, or
        C{None}.
    """

    protocol = BackendProxy

    flush_timeout = 1.0
    # A client that neither answers our close_notify nor closes its side
    # after the backend failed is cut off then.
    close_timeout = 1.0

    def __init__(self, handshake_done: HandshakeDone, clock: IReactorTime,
                 settings: ProxySettings,
                 backend_failed: Callable[[str, str, Failure], object],
                 counters: Counter[str] | None = None,
                 access_log: accesslog.IAccessLog | None = None) -> None:
        self.handshake_done = handshake_done
        self.access_log = access_log
        self.clock = clock
        self.settings = settings
        self.backend_failed = backend_failed
        self.counters: Counter[str] = Counter() if counters is None else counters

    def idle_timed_out(self) -> None:
        """
        A connection passed the idle timeout with no byte either way.
        """
        self.counters["idle_timeouts"] += 1
