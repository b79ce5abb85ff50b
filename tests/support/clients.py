"""
Clients a test drives: Python's C{ssl} (with the contexts its rounds share),
C{openssl s_client}, a client without a certificate, and an AMP client that
holds back what the server answers.
"""

from __future__ import annotations

import functools
import socket
import ssl
import threading

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.protocols import amp
from zope.interface import implementer


@attrs.frozen
class ClientResult:
    """
    What a L{python_client_round} saw: the version and whether the session
    was resumed, the echo, the session to offer next time, the server's DNS
    names and the application protocol it chose.
    """

    version: str
    reused: bool
    echo: bytes
    session: ssl.SSLSession | None
    peer_names: list[str]
    alpn: str | None


_client_contexts_lock = threading.Lock()


def client_context(ca_cert: str, version: str | None = None,
                   verify: bool = True, alpn: tuple[str, ...] = (),
                   strict: bool = False) -> ssl.SSLContext:
    """
    Python's default client context trusting C{ca_cert}, the same one for
    the same arguments.

    @param version: C{"TLSv1.2"} or C{"TLSv1.3"}, the only version it
        speaks; C{None} for any.
    @param verify: check the server's certificate and name.
    @param alpn: the application protocols it offers.
    @param strict: insist that certificates satisfy RFC 5280, as Python
        3.13's default context does, not only OpenSSL's lenient defaults.
    """
    # Python's ssl resumes a session only with the context that made it, so
    # the rounds of one test share contexts, even rounds that start at once
    # in several threads.
    with _client_contexts_lock:
        return _new_client_context(ca_cert, version, verify, alpn, strict)


@functools.cache
def _new_client_context(ca_cert, version, verify, alpn, strict):
    context = ssl.create_default_context(cafile=ca_cert)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if version is not None:
        context.minimum_version = context.maximum_version = getattr(
            ssl.TLSVersion, version.replace(".", "_"))
    if alpn:
        context.set_alpn_protocols(alpn)
    if strict:
        context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def python_client_round(port, ca_cert, version, session=None,
                        server_hostname="localhost", verify=True, alpn=None,
                        timeout=10):
    """
    One connection with Python's C{ssl}: handshake (offering C{session}),
    send C{hello}, read the echo until the server closes.  Blocking: run it
    in a thread.

    @param timeout: seconds each socket operation may wait.
    """
    context = client_context(ca_cert, version, verify, tuple(alpn or ()))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname=server_hostname,
                                 session=session) as client:
            if client.version() is None:
                # Python's ssl skips the handshake, and would go on in
                # plaintext, when the peer reset the connection before it.
                raise ConnectionResetError("reset before the TLS handshake")
            # Read before the echo: a server that closes without a
            # close_notify leaves the connection in a state where Python
            # no longer answers these.
            version, reused = client.version(), client.session_reused
            alpn = client.selected_alpn_protocol()
            names = []
            certificate = client.getpeercert()
            if certificate:
                names = [value for kind, value
                         in certificate.get("subjectAltName", ())
                         if kind == "DNS"]
            client.sendall(b"hello")
            echo = b""
            while chunk := client.recv(1024):
                echo += chunk
            return ClientResult(version, reused, echo, client.session, names,
                                alpn)


class _Collect(ProcessProtocol):
    def __init__(self, stdin):
        self.stdin = stdin
        self.output = []
        self.done = Deferred()

    def connectionMade(self):
        self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data):
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason):
        self.done.callback(b"".join(self.output).decode("utf-8", "replace"))


def s_client_round(port, ca_cert, version, session_out=None, session_in=None,
                   alpn=()):
    """
    One connection with C{openssl s_client}, offering the application
    protocols C{alpn} if any; fires with its output.
    """
    arguments = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                 "-servername", "localhost", "-CAfile", ca_cert,
                 "-verify_return_error", "-ign_eof",
                 "-tls1_3" if version == "TLSv1.3" else "-tls1_2"]
    if session_out:
        arguments += ["-sess_out", session_out]
    if session_in:
        arguments += ["-sess_in", session_in]
    if alpn:
        arguments += ["-alpn", ",".join(alpn)]
    collector = _Collect(b"hello\n")
    reactor.spawnProcess(collector, "openssl", arguments, env=None)
    return collector.done


def connect_without_certificate(port, ca_cert):
    """
    Open TLS to C{port} of 127.0.0.1 with no client certificate (a node's
    peer channel refuses it).  Blocking: run it in a thread.
    """
    context = client_context(ca_cert, verify=False)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass


@implementer(IHandshakeListener)
class _HeldAmpClient(Protocol):
    """
    Sends C{data} once TLS is up, then reads nothing until L{read}: what
    the server answers waits on its side.  C{boxes} counts the boxes
    received, parsed by AMP's own parser.
    """

    def __init__(self, data):
        self.data = data
        self.boxes = 0
        self.closed = Deferred()
        self._parser = amp.BinaryBoxProtocol(self)

    def connectionMade(self):
        self._parser.makeConnection(self.transport)
        self.transport.write(self.data)

    reading = False
    _paused = False

    def handshakeCompleted(self):
        if not self.reading:
            self._paused = True
            self.transport.pauseProducing()

    def read(self):
        self.reading = True
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def dataReceived(self, data):
        self._parser.dataReceived(data)

    def connectionLost(self, reason):
        self.closed.callback(None)

    # IBoxReceiver of the parser.
    def startReceivingBoxes(self, sender):
        pass

    def ampBoxReceived(self, box):
        self.boxes += 1

    def stopReceivingBoxes(self, reason):
        pass


def held_amp_client(port, tls, data):
    """
    Connect to the AMP listener on C{port} of 127.0.0.1 with the client
    TLS options C{tls}, send C{data} and read nothing until told
    (L{_HeldAmpClient.read}); fires with the protocol once connected.
    """
    endpoint = wrapClientTLS(
        tls, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    return connectProtocol(endpoint, _HeldAmpClient(data))
