"""
A TLS-terminating TCP proxy on Twisted's reactor whose TLS reads and writes
the client's socket itself: the reference that tells what a server on
Twisted would cost if the record path left Python, for the rate
benchmark's C{owned_full} and C{owned_resumed} kinds (L{benchmarks.rates}).

Twisted's C{TLSMemoryBIOProtocol} (what stock Twisted and an sslshare node
use) receives the ciphertext in Python, writes it into a memory BIO,
drives OpenSSL, reads the ciphertext it made out of another memory BIO and
writes it to the socket in Python again.  Here OpenSSL owns the socket
(pyOpenSSL's C{Connection(context, socket)} is C{SSL_set_fd}): the reactor
only says when the socket is readable, and each readiness is one
C{do_handshake} or a C{recv} loop in C.  The backend side is Twisted's
TCP client, as in L{benchmarks.twisted_tls}; the certificate, the session
cache (tickets off, so TLS 1.3 resumes from it too) and the backend are
the same.

It is a measurement, not a server: no half-close, no back-pressure beyond
the socket buffer, no PROXY protocol, no timeouts.

    python -m benchmarks.owned_tls PORT BACKEND_PORT CHAIN KEY
"""

from __future__ import annotations

import socket
import sys

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.interfaces import (
    IReactorFDSet,
    IReactorTCP,
    IReadDescriptor,
    IReadWriteDescriptor,
)
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from benchmarks.twisted_tls import ContextFactory

# Connections accepted per readiness of the listening socket, as Twisted's
# own port does, so that a burst of clients costs few reactor turns.
ACCEPTS_PER_READ = 50


class _Backend(Protocol):
    """
    The backend side of one client connection.
    """

    def __init__(self, client: _Client) -> None:
        self._client = client

    def connectionMade(self) -> None:
        self._client.backend_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self._client.send(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._client.close()


class _BackendFactory(ClientFactory):
    noisy = False

    def __init__(self, client: _Client) -> None:
        self._client = client

    def buildProtocol(self, addr: object) -> _Backend:
        return _Backend(self._client)

    def clientConnectionFailed(self, connector: object,
                               reason: Failure) -> None:
        self._client.close()


@implementer(IReadWriteDescriptor)
class _Client:
    """
    One client connection: an C{IReadWriteDescriptor} whose socket
    OpenSSL reads and writes.

    @ivar _unsent: plaintext for the client that OpenSSL could not write
        yet (the socket buffer was full); written when the socket is
        writable again.
    @ivar _early: plaintext from the client that came before the backend
        connection was up.
    """

    def __init__(self, reactor: IReactorFDSet, tcp: IReactorTCP,
                 client: socket.socket, context: SSL.Context,
                 backend_port: int) -> None:
        self._reactor = reactor
        self._tcp = tcp
        self._socket = client
        self._fileno = client.fileno()
        self._tls = SSL.Connection(context, client)
        self._tls.set_accept_state()
        self._backend_port = backend_port
        self._handshaken = False
        self._backend: _Backend | None = None
        self._early: list[bytes] = []
        self._unsent = b""
        self._closed = False
        reactor.addReader(self)

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return "owned-tls"

    def doRead(self) -> None:
        if not self._handshaken and not self._handshake():
            return
        while not self._closed:
            try:
                data = self._tls.recv(65536)
            except SSL.WantReadError:
                return
            except SSL.Error:
                self.close()
                return
            if self._backend is None:
                self._early.append(data)
            else:
                self._backend.transport.write(data)

    def _handshake(self) -> bool:
        try:
            self._tls.do_handshake()
        except SSL.WantReadError:
            return False
        except SSL.Error:
            self.close()
            return False
        self._handshaken = True
        self._tcp.connectTCP("127.0.0.1", self._backend_port,
                             _BackendFactory(self))
        return True

    def backend_connected(self, backend: _Backend) -> None:
        self._backend = backend
        if self._early:
            backend.transport.write(b"".join(self._early))
            self._early = []

    def send(self, data: bytes) -> None:
        if self._closed:
            return
        if self._unsent:
            self._unsent += data
            return
        self._unsent = data
        self.doWrite()

    def doWrite(self) -> None:
        while self._unsent and not self._closed:
            try:
                written = self._tls.send(self._unsent)
            except SSL.WantWriteError:
                self._reactor.addWriter(self)
                return
            except SSL.Error:
                self.close()
                return
            self._unsent = self._unsent[written:]
        self._reactor.removeWriter(self)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reactor.removeReader(self)
        self._reactor.removeWriter(self)
        try:
            self._tls.shutdown()
        except SSL.Error:
            pass
        self._socket.close()
        if self._backend is not None:
            self._backend.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self.close()


@implementer(IReadDescriptor)
class Listener:
    """
    The listening socket, accepting into L{_Client}s.

    @ivar port: the port it listens on.
    """

    def __init__(self, reactor: IReactorFDSet, tcp: IReactorTCP, port: int,
                 context: SSL.Context, backend_port: int,
                 interface: str = "127.0.0.1") -> None:
        self._reactor = reactor
        self._tcp = tcp
        self._socket = socket.socket()
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((interface, port))
        self._socket.listen(1024)
        self._socket.setblocking(False)
        self.port: int = self._socket.getsockname()[1]
        self._context = context
        self._backend_port = backend_port
        reactor.addReader(self)

    def fileno(self) -> int:
        return self._socket.fileno()

    def logPrefix(self) -> str:
        return "owned-tls-listener"

    def doRead(self) -> None:
        for _ in range(ACCEPTS_PER_READ):
            try:
                client, _ = self._socket.accept()
            except BlockingIOError:
                return
            client.setblocking(False)
            # A handshake is a few small flights each way: Nagle's
            # algorithm would hold the last one for a delayed ACK.
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _Client(self._reactor, self._tcp, client, self._context,
                    self._backend_port)

    def stop(self) -> None:
        self._reactor.removeReader(self)
        self._socket.close()

    def connectionLost(self, reason: Failure) -> None:
        self.stop()


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        raise SystemExit(__doc__.strip().splitlines()[-1].strip())
    port, backend_port, chain, key = argv
    Listener(reactor, reactor, int(port),
             ContextFactory(chain, key).getContext(), int(backend_port))
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
