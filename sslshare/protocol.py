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

This module holds no crypto: the engine does the TLS, C{lookup} says where
sessions come from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from sslshare import sessionid
from sslshare.tls import (
    Connection,
    ISessionLookupListener,
    LookupRequest,
    ServerContext,
)

Lookup = Callable[[LookupRequest], "Deferred[bytes | None] | bytes | None"]


@implementer(ISessionLookupListener)
class SessionResumingTLSProtocol(TLSMemoryBIOProtocol):
    """
    A TLS server protocol whose handshake waits for the session a client
    offers.
    """

    _log = Logger()
    _pendingLookup: Deferred[None] | None = None
    _answerArrivesLater = False

    def makeConnection(self, transport: Any) -> None:
        # A handshake is a few small flights each way: Nagle's algorithm
        # would hold the last one for the peer's delayed ACK (up to 40 ms).
        setNoDelay = getattr(transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)
        super().makeConnection(transport)

    def lookup_requested(self, connection: Connection,
                         request: LookupRequest) -> None:
        lookup = maybeDeferred(self.factory.lookup, request)
        lookup.addErrback(self._lookupFailed, request)
        lookup.addCallback(self._supply, connection)
        if not lookup.called:
            self._answerArrivesLater = True
            self._pendingLookup = lookup

    def _lookupFailed(self, reason: Failure, request: LookupRequest) -> None:
        if not reason.check(CancelledError):
            self._log.failure(
                "session lookup for {session} failed; full handshake",
                reason, session=sessionid.describe(request.session_id))
        return None

    def _supply(self, der: bytes | None, connection: Connection) -> None:
        self._pendingLookup = None
        if self._lostTLSConnection:
            return
        connection.supply(der)
        if self._answerArrivesLater:
            self.dataReceived(b"")

    def connectionLost(self, reason: Failure) -> None:
        # The TLS connection is marked lost first, so that the answer a
        # cancellation delivers is dropped rather than supplied.
        super().connectionLost(reason)
        if self._pendingLookup is not None:
            self._pendingLookup.cancel()


class SessionResumingTLSFactory(TLSMemoryBIOFactory):
    """
    Wraps C{wrappedFactory} in TLS served by C{context}, asking C{lookup}
    for the sessions clients offer.

    @ivar lookup: called with a L{LookupRequest}; returns the DER of the
        session, C{None}, or a Deferred of either.
    """

    protocol = SessionResumingTLSProtocol

    def __init__(self, context: ServerContext, lookup: Lookup,
                 wrappedFactory: Any) -> None:
        super().__init__(context, False, wrappedFactory)
        self.context = context
        self.lookup = lookup
