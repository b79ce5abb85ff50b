"""
A load balancer in front of a node that speaks the PROXY protocol: the
node listens through Twisted's C{haproxy:} endpoint prefix, and the client
address it bounds lookups by is the one the header carries, not the load
balancer's.
"""

from __future__ import annotations

import socket
import ssl
import struct

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support.cluster import LocalCluster
from tests.support.waiting import until, wait_for_port
from tests.support.servers import haproxy

CLIENT = "203.0.113.7"
HAPROXY_LISTEN = "haproxy:tcp:{port}:interface=127.0.0.1"


def _v1(port):
    return f"PROXY TCP4 {CLIENT} 127.0.0.1 40001 {port}\r\n".encode("ascii")


def _v2(port):
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    addresses = (socket.inet_aton(CLIENT) + socket.inet_aton("127.0.0.1")
                 + struct.pack("!HH", 40002, port))
    # Version 2, PROXY; TCP over IPv4.
    return signature + b"\x21\x11" + struct.pack("!H", len(addresses)) \
        + addresses


def _handshake_behind_a_header(port, ca_cert, header, hold):
    """
    Send C{header}, then a TLS handshake, over one connection; returns the
    TLS socket, still open, once C{hold} (a threading event) is set, after
    which it is closed.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.sendall(header)
    context = ssl.create_default_context(cafile=ca_cert)
    with context.wrap_socket(raw, server_hostname="localhost") as client:
        version = client.version()
        hold.wait(10)
        return version


class ProxyProtocolListenerTests(TestCase):

    def _cluster(self):
        return LocalCluster(self, nodes=("node1",), listen=HAPROXY_LISTEN)

    @inlineCallbacks
    def _client_address_seen(self, header):
        import threading

        cluster = self._cluster()
        yield cluster.start_all()
        hold = threading.Event()
        done = deferToThread(_handshake_behind_a_header,
                             cluster.ports["node1"], cluster.ca_cert,
                             header(cluster.ports["node1"]), hold)
        protocols = cluster.services["node1"]._clients.protocols
        try:
            yield until(lambda: len(protocols) == 1)
            (protocol,) = protocols
            peer = protocol.transport.getPeer()
        finally:
            hold.set()
        version = yield done
        self.assertIsNotNone(version)
        return peer

    @inlineCallbacks
    def test_the_address_of_a_v1_header(self):
        peer = yield self._client_address_seen(_v1)
        self.assertEqual((peer.host, peer.port), (CLIENT, 40001))

    @inlineCallbacks
    def test_the_address_of_a_v2_header(self):
        peer = yield self._client_address_seen(_v2)
        self.assertEqual((peer.host, peer.port), (CLIENT, 40002))

    @inlineCallbacks
    def test_a_connection_without_a_header_is_dropped(self):
        cluster = self._cluster()
        yield cluster.start_all()
        attempt = cluster.client_round("node1", "TLSv1.3")
        yield self.assertFailure(attempt, ssl.SSLError, ConnectionError,
                                 OSError)


# An HTTP backend behind the PROXY protocol: it answers every request with
# what the header told it.
HAPROXY_BACKEND = """\
global
    maxconn 64
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend backend
    bind 127.0.0.1:{port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "src=%[src] port=%[src_port] sni=%[fc_pp_authority]\\n"
"""


def haproxy_backend(testcase, port):
    """
    HAProxy on C{port} of 127.0.0.1 reading the PROXY protocol; stopped
    when the test ends.
    """
    return haproxy(testcase, HAPROXY_BACKEND.format(port=port))


def _request_behind_a_header(port, ca_cert, header):
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.sendall(header)
    context = ssl.create_default_context(cafile=ca_cert)
    with context.wrap_socket(raw, server_hostname="localhost") as client:
        client.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        answer = b""
        while chunk := client.recv(4096):
            answer += chunk
    return answer.decode("latin-1")


class BackendProxyProtocolTests(TestCase):
    """
    C{backend_proxy_protocol}: the node writes the header, and a real
    HAProxy backend (C{accept-proxy}) reads the client's address, and with
    v2 the server name, from it.
    """

    @inlineCallbacks
    def _answer(self, version):
        from sslshare.dev.throwaway import free_port

        backend_port = free_port()
        haproxy_backend(self, backend_port)
        yield wait_for_port(backend_port)
        cluster = LocalCluster(
            self, nodes=("node1",),
            node_options=f'backend_proxy_protocol = "{version}"',
            listen=HAPROXY_LISTEN,
            backend_endpoint=f"tcp:host=127.0.0.1:port={backend_port}")
        yield cluster.start_all()
        answer = yield deferToThread(
            _request_behind_a_header, cluster.ports["node1"], cluster.ca_cert,
            _v1(cluster.ports["node1"]))
        return answer

    @inlineCallbacks
    def test_v1_carries_the_client_address(self):
        answer = yield self._answer("v1")
        self.assertIn("200", answer.splitlines()[0])
        self.assertIn(f"src={CLIENT} port=40001 sni=\n", answer)

    @inlineCallbacks
    def test_v2_carries_the_client_address_and_the_server_name(self):
        answer = yield self._answer("v2")
        self.assertIn(f"src={CLIENT} port=40001 sni=localhost\n", answer)
