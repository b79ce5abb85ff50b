"""
TLS on the wire, built and read by hand for the inputs no stock client
sends: ClientHellos and their extensions, records and fragments, and an
exchange that judges what a server did with them.
"""

from __future__ import annotations

import socket
import struct

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.protocol import Protocol


def _u8(data):
    return bytes((len(data),)) + data


def _u16(data):
    return struct.pack("!H", len(data)) + data


def _extension(kind, body):
    return struct.pack("!H", kind) + _u16(body)


def psk_extension(identities):
    """
    A pre_shared_key extension body offering C{identities}, with binders of
    the right shape (and wrong value).
    """
    listed = b"".join(_u16(identity) + b"\0\0\0\0" for identity in identities)
    binders = b"".join(_u8(b"\0" * 32) for _ in identities)
    return _u16(listed) + _u16(binders)


def client_hello(tls13, psk=None, session_id=b"", legacy_version=0x0303,
                 server_name="localhost"):
    """
    A ClientHello record built by hand, for the inputs no stock client sends.
    """
    extensions = [
        _extension(0, _u16(b"\0" + _u16(server_name.encode("ascii")))),
        _extension(10, _u16(b"\x00\x1d\x00\x17")),           # groups
        _extension(11, b"\x01\x00"),                         # point formats
        _extension(13, _u16(b"\x04\x03\x08\x04\x04\x01")),   # signatures
    ]
    suites = b"\xc0\x2b\xc0\x2f"
    if tls13:
        public = x25519.X25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        suites = b"\x13\x01" + suites
        extensions += [
            _extension(43, b"\x02\x03\x04"),                  # TLS 1.3 only
            _extension(45, b"\x01\x01"),                      # psk_dhe_ke
            _extension(51, _u16(b"\x00\x1d" + _u16(public))),
        ]
        if psk is not None:
            # pre_shared_key must come last.
            extensions.append(_extension(41, psk))
    body = (struct.pack("!H", legacy_version) + b"\x11" * 32 + _u8(session_id)
            + _u16(suites) + b"\x01\x00" + _u16(b"".join(extensions)))
    handshake = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + _u16(handshake)


def read_records(port, data, timeout=0.5):
    """
    Send C{data} to a server and parse the TLS records it answers with until
    it closes or goes quiet for C{timeout} seconds.  Blocking.

    @return: a list of (content type, body).
    """
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        raw.sendall(data)
        try:
            while chunk := raw.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    records = []
    while len(received) >= 5:
        length = struct.unpack("!H", received[3:5])[0]
        records.append((received[0], received[5:5 + length]))
        received = received[5 + length:]
    return records


def fragment(record, size):
    """
    The handshake bytes of the one TLS record C{record} cut into records
    of at most C{size} bytes each (TLS lets a handshake message span
    records, and ClientHellos over 16 KiB must).
    """
    header, body = record[:3], record[5:]
    return b"".join(header + _u16(body[at:at + size])
                    for at in range(0, len(body), size))


def tls_outcome(received, closed):
    """
    What a TLS server did with what a client sent, from the bytes it sent
    back: C{"handshake"} (a ServerHello came), C{"alert"}, C{"closed"}
    (closed without a word), C{"other"} (bytes that are none of these, a
    fault); C{None} while it is too early to say.
    """
    if len(received) >= 6:
        if received[0] == 22 and received[5] == 2:
            return "handshake"
        if received[0] == 21:
            return "alert"
        return "other"
    if closed:
        return "closed" if not received else "other"
    return None


class _Exchange(Protocol):
    """
    Sends C{chunks}, C{delay} seconds apart, and fires C{done} with
    C{judge(received, closed)} as soon as that is not C{None}, then
    aborts the connection; C{"hung"} if nothing is decided in C{deadline}
    seconds.
    """

    def __init__(self, chunks, delay, judge, deadline):
        self.chunks = list(chunks)
        self.delay = delay
        self.judge = judge
        self.received = b""
        self.done = Deferred()
        self._timers = [reactor.callLater(deadline, self._decide, "hung")]

    def connectionMade(self):
        self._send()

    def _send(self):
        while self.chunks and not self.done.called:
            self.transport.write(self.chunks.pop(0))
            if self.delay and self.chunks:
                self._timers.append(reactor.callLater(self.delay, self._send))
                return

    def dataReceived(self, data):
        self.received += data
        outcome = self.judge(self.received, False)
        if outcome is not None:
            self._decide(outcome)

    def connectionLost(self, reason):
        self.transport = None
        self._decide(self.judge(self.received, True) or "closed")

    def _decide(self, outcome):
        if self.done.called:
            return
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self.done.callback(outcome)
        if self.transport is not None:
            self.transport.abortConnection()


def exchange(port, chunks, *, delay=0.0, judge=tls_outcome, deadline=10.0,
             source="127.0.0.1", tls=None):
    """
    Connect to C{port} of 127.0.0.1 from address C{source}, send
    C{chunks} (C{delay} seconds apart), and fire with what C{judge} makes
    of the answer (L{tls_outcome} by default), or C{"hung"} after
    C{deadline} seconds, or C{"refused"} if the connection fails.

    @param tls: client TLS options (an C{IOpenSSLClientConnectionCreator})
        to speak over TLS, or C{None} for plain TCP.
    """
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=deadline,
                                  bindAddress=(source, 0))
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    protocol = _Exchange(chunks, delay, judge, deadline)

    def refused(reason):
        protocol._decide("refused")

    connectProtocol(endpoint, protocol).addErrback(refused)
    return protocol.done
