"""
The client side: a session from one cluster node is offered to, and
resumed by, a related node; a server outside every relatedness rule never
sees it (checked on the bytes of its ClientHello); a server that does not
resume gives a full handshake and the request goes through; HTTPS through
C{Agent} resumes across nodes; C{sslshare probe} tells which resumed.

Nodes listen on 127.0.0.1; other addresses (127.0.0.2, 127.0.0.3) are
TCP forwarders in front of them, which also record what the client sent.
"""

from __future__ import annotations

import json
import os
import struct
import sys

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL, crypto
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
)
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols import portforward
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from sslshare.client import (
    AddressGroup,
    ClientSessionCache,
    RelatednessError,
    RelatednessPolicy,
    SessionSharingPolicy,
    parse_target,
    probe,
)
from sslshare.dev import pki
from tests.support.cluster import LocalCluster
from tests.support.servers import OneShotEcho

# ---------------------------------------------------------------- helpers


def _versions(version):
    if version == "TLSv1.2":
        return {"lowerMaximumSecurityTo": TLSVersion.TLSv1_2}
    return {"raiseMinimumTo": TLSVersion.TLSv1_3}


def _policy(cluster_or_ca, version="TLSv1.3", relatedness=None, cache=None):
    ca = getattr(cluster_or_ca, "ca_cert", cluster_or_ca)
    with open(ca, "rb") as f:
        trust = Certificate.loadPEM(f.read())
    return SessionSharingPolicy(trust, relatedness, cache,
                                extraCertificateOptions=_versions(version))


class _Echoed(Protocol):
    def __init__(self):
        self.data = b""
        self.closed = Deferred()

    def connectionMade(self):
        self.transport.write(b"hello")

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.closed.callback(None)


@inlineCallbacks
def _round(policy, port, host="127.0.0.1", server_name="localhost"):
    """
    One connection through the policy's creator: send C{hello}, read the
    echo until the server closes.  Fires with (report, echo).
    """
    reports = []
    policy.reports.append(reports.append)
    try:
        protocol = _Echoed()
        yield connectProtocol(
            wrapClientTLS(policy.creator(server_name, host),
                          TCP4ClientEndpoint(reactor, host, port)), protocol)
        yield protocol.closed
    finally:
        policy.reports.remove(reports.append)
    return (reports[0] if reports else None), protocol.data


class _RecordingServer(portforward.ProxyServer):
    def dataReceived(self, data):
        self.factory.received.append(data)
        portforward.ProxyServer.dataReceived(self, data)


class _RecordingForwarder(portforward.ProxyFactory):
    protocol = _RecordingServer

    def __init__(self, host, port):
        portforward.ProxyFactory.__init__(self, host, port)
        self.received = []


def forward(testcase, interface, port):
    """
    Listen on C{interface} (e.g. 127.0.0.2) and forward to 127.0.0.1:port;
    the factory records every chunk the clients sent.
    """
    factory = _RecordingForwarder("127.0.0.1", port)
    listening = reactor.listenTCP(0, factory, interface=interface)
    testcase.addCleanup(listening.stopListening)
    return listening.getHost().port, factory


def parse_client_hello(data):
    """
    The legacy session id and extension types of the ClientHello that
    C{data} starts with.
    """
    assert data[0] == 22, "not a handshake record"
    body = data[5:5 + struct.unpack("!H", data[3:5])[0]]
    assert body[0] == 1, "not a ClientHello"
    position = 4 + 2 + 32
    session_id = body[position + 1:position + 1 + body[position]]
    position += 1 + body[position]
    position += 2 + struct.unpack("!H", body[position:position + 2])[0]
    position += 1 + body[position]
    end = position + 2 + struct.unpack("!H", body[position:position + 2])[0]
    position += 2
    extensions = []
    while position < end:
        kind, length = struct.unpack("!HH", body[position:position + 4])
        extensions.append(kind)
        position += 4 + length
    return session_id, extensions


_PSK = 41


def stranger_server(testcase, cluster):
    """
    A stock Twisted TLS echo server on 127.0.0.1 with the cluster's own
    server certificate but none of its sessions: related by address,
    unable to resume.
    """
    pki = os.path.join(cluster.directory, "pki")
    with open(os.path.join(pki, "localhost-chain.pem"), "rb") as f:
        chain = f.read()
    with open(os.path.join(pki, "localhost-key.pem"), "rb") as f:
        key = f.read()
    certificate = PrivateCertificate.loadPEM(chain + key)
    options = CertificateOptions(privateKey=certificate.privateKey.original,
                                 certificate=certificate.original,
                                 enableSessions=False)
    listening = reactor.listenSSL(0, Factory.forProtocol(OneShotEcho), options,
                                  interface="127.0.0.1")
    testcase.addCleanup(listening.stopListening)
    return listening


def named_server(testcase, cluster, name):
    """
    A stock Twisted TLS echo server on 127.0.0.1 whose certificate, from
    the cluster's CA, names the DNS name C{name} only.
    """
    ca = x509.load_pem_x509_certificate(
        FilePath(cluster.pki.ca_certificate).getContent())
    ca_key = serialization.load_pem_private_key(
        FilePath(cluster.pki.ca_key).getContent(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = pki.issue_certificate(
        ca, ca_key, key, name, [x509.DNSName(name)],
        [ExtendedKeyUsageOID.SERVER_AUTH])
    options = CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(certificate))
    listening = reactor.listenSSL(0, Factory.forProtocol(OneShotEcho), options,
                                  interface="127.0.0.1")
    testcase.addCleanup(listening.stopListening)
    return listening


class _HTTPOnce(Protocol):
    """
    A backend answering any request with one HTTP/1.1 response, then
    closing.
    """

    def dataReceived(self, data):
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                             b"Connection: close\r\n\r\nok")
        self.transport.loseConnection()


# ------------------------------------------------------------- relatedness


class RelatednessPolicyTests(TestCase):

    def test_same_ipv4_prefix_is_related(self):
        self.assertTrue(RelatednessPolicy().related("192.0.2.1", "192.0.2.200"))

    def test_other_ipv4_prefix_is_unrelated(self):
        self.assertFalse(RelatednessPolicy().related("192.0.2.1", "192.0.3.1"))

    def test_ipv6_prefix_is_64_by_default(self):
        policy = RelatednessPolicy()
        self.assertTrue(policy.related("2001:db8::1", "2001:db8::ffff:1"))
        self.assertFalse(policy.related("2001:db8::1", "2001:db8:0:1::1"))

    def test_prefix_is_configurable(self):
        policy = RelatednessPolicy(ipv4_prefix=31)
        self.assertTrue(policy.related("127.0.0.2", "127.0.0.3"))
        self.assertFalse(policy.related("127.0.0.1", "127.0.0.2"))

    def test_address_in_no_rule_is_a_group_of_its_own(self):
        policy = RelatednessPolicy(ipv4_prefix=None)
        self.assertEqual(policy.group_of("127.0.0.3"), "address:127.0.0.3")
        self.assertFalse(policy.related("127.0.0.2", "127.0.0.3"))

    def test_configured_group_relates_its_members_only(self):
        policy = RelatednessPolicy(
            (AddressGroup.parse("dc1", ["127.0.0.1", "10.1.0.0/16", "Web.Example"]),),
            ipv4_prefix=None)
        self.assertEqual(policy.group_of("10.1.2.3"), "group:dc1")
        self.assertEqual(policy.group_of("198.51.100.7", "web.example."), "group:dc1")
        self.assertTrue(policy.related("127.0.0.1", "10.1.200.1"))
        self.assertFalse(policy.related("127.0.0.1", "127.0.0.3"))

    def test_one_dns_name_relates_all_its_addresses(self):
        policy = RelatednessPolicy()
        self.assertEqual(policy.group_of("192.0.2.1", "www.example.com"),
                         policy.group_of("198.51.100.1", "www.example.com"))

    def test_address_literal_is_not_a_dns_name(self):
        self.assertEqual(RelatednessPolicy().group_of("127.0.0.1", "127.0.0.1"),
                         "prefix:127.0.0.0/24")

    def test_bad_rules_are_refused_with_their_name(self):
        with self.assertRaises(RelatednessError) as caught:
            AddressGroup.parse("dc1", ["10.0.0.0/33"])
        self.assertIn("dc1", str(caught.exception))
        self.assertRaises(RelatednessError, RelatednessPolicy, ipv4_prefix=40)

    def test_parse_target(self):
        self.assertEqual(parse_target("127.0.0.2:8441"), ("127.0.0.2", 8441))
        self.assertEqual(parse_target("[::1]:8441"), ("::1", 8441))
        self.assertEqual(parse_target("example.com"), ("example.com", 443))
        self.assertRaises(ValueError, parse_target, "host:http")


# ---------------------------------------------------------------- cache


class ClientSessionCacheTests(TestCase):
    key = ("prefix:127.0.0.0/24", "localhost")

    def test_tls13_ticket_is_offered_once(self):
        cache = ClientSessionCache(Clock())
        ticket = SSL.Session()
        cache.put(self.key, ticket, "TLSv1.3")
        self.assertIs(cache.take(self.key), ticket)
        self.assertIsNone(cache.take(self.key))

    def test_tls13_tickets_are_kept_up_to_the_bound_newest_first(self):
        cache = ClientSessionCache(Clock(), tickets_per_key=2)
        tickets = [SSL.Session() for _ in range(3)]
        for ticket in tickets:
            cache.put(self.key, ticket, "TLSv1.3")
        self.assertEqual([cache.take(self.key), cache.take(self.key),
                          cache.take(self.key)], [tickets[2], tickets[1], None])

    def test_tls12_session_may_be_offered_again(self):
        cache = ClientSessionCache(Clock())
        session = SSL.Session()
        cache.put(self.key, session, "TLSv1.2")
        self.assertIs(cache.take(self.key), session)
        self.assertIs(cache.take(self.key), session)

    def test_session_expires_with_its_lifetime(self):
        clock = Clock()
        cache = ClientSessionCache(clock, lifetime=60)
        cache.put(self.key, SSL.Session(), "TLSv1.2")
        clock.advance(61)
        self.assertIsNone(cache.take(self.key))
        self.assertEqual(cache.counters["expired"], 1)

    def test_other_server_name_gets_nothing(self):
        cache = ClientSessionCache(Clock())
        cache.put(self.key, SSL.Session(), "TLSv1.2")
        self.assertIsNone(cache.take((self.key[0], "other.test")))

    def test_least_recent_key_is_evicted(self):
        cache = ClientSessionCache(Clock(), max_keys=1)
        cache.put(("a", "localhost"), SSL.Session(), "TLSv1.2")
        cache.put(("b", "localhost"), SSL.Session(), "TLSv1.2")
        self.assertIsNone(cache.take(("a", "localhost")))
        self.assertIsNotNone(cache.take(("b", "localhost")))


# --------------------------------------------------- against a real cluster


class ClusterResumptionTests(TestCase):

    @inlineCallbacks
    def _node1_then_node2(self, version):
        cluster = LocalCluster(self)
        yield cluster.start_all()
        policy = _policy(cluster, version)
        first, echo = yield _round(policy, cluster.ports["node1"])
        self.assertEqual(echo, b"hello")
        self.assertFalse(first.offered)
        second, echo = yield _round(policy, cluster.ports["node2"])
        self.assertEqual((second.version, second.offered, second.resumed),
                         (version, True, True))
        self.assertEqual(echo, b"hello")
        self.assertEqual(cluster.nodes["node2"].counters["resumed_peer"], 1)

    def test_tls13_session_from_node1_is_resumed_by_node2(self):
        return self._node1_then_node2("TLSv1.3")

    def test_tls12_session_from_node1_is_resumed_by_node2(self):
        return self._node1_then_node2("TLSv1.2")

    @inlineCallbacks
    def test_tls13_ticket_is_offered_once_then_replaced(self):
        """
        Each connection uses one ticket and brings new ones: a client goes
        round the cluster twice, resuming every time after the first.
        """
        cluster = LocalCluster(self)
        yield cluster.start_all()
        policy = _policy(cluster, "TLSv1.3")
        yield _round(policy, cluster.ports["node1"])
        for node in ("node2", "node3", "node1", "node2"):
            report, _ = yield _round(policy, cluster.ports[node])
            self.assertTrue(report.resumed, f"not resumed on {node}")
        self.assertEqual(policy.cache.counters["offered"], 4)

    @inlineCallbacks
    def test_prefix_rule_relates_127_0_0_2_and_127_0_0_3_only(self):
        """
        With a /31 prefix, 127.0.0.2 and 127.0.0.3 are one group and
        127.0.0.1 another: node1 at .2 hands its session to node2 at .3,
        and node3 at .1 never sees it.
        """
        cluster = LocalCluster(self)
        yield cluster.start_all()
        policy = _policy(cluster, "TLSv1.2", RelatednessPolicy(ipv4_prefix=31))
        at_2, _ = forward(self, "127.0.0.2", cluster.ports["node1"])
        at_3, _ = forward(self, "127.0.0.3", cluster.ports["node2"])
        yield _round(policy, at_2, "127.0.0.2")
        second, _ = yield _round(policy, at_3, "127.0.0.3")
        self.assertTrue(second.resumed)
        third, echo = yield _round(policy, cluster.ports["node3"], "127.0.0.1")
        self.assertEqual((third.offered, third.resumed, echo), (False, False, b"hello"))
        self.assertEqual(cluster.nodes["node3"].context.counters["lookups"], 0)

    @inlineCallbacks
    def _never_received(self, version):
        cluster = LocalCluster(self)
        yield cluster.start_all()
        policy = _policy(cluster, version, RelatednessPolicy(
            (AddressGroup.parse("dc1", ["127.0.0.1", "127.0.0.2"]),),
            ipv4_prefix=None))
        at_2, _ = forward(self, "127.0.0.2", cluster.ports["node2"])
        at_3, recorded = forward(self, "127.0.0.3", cluster.ports["node3"])
        yield _round(policy, cluster.ports["node1"], "127.0.0.1")
        related, _ = yield _round(policy, at_2, "127.0.0.2")
        self.assertTrue(related.resumed)
        outsider, echo = yield _round(policy, at_3, "127.0.0.3")
        self.assertEqual((outsider.offered, outsider.resumed, echo),
                         (False, False, b"hello"))
        self.assertEqual(outsider.group, "address:127.0.0.3")
        # Server side: no lookup key in the ClientHello node3 got.
        session_id, extensions = parse_client_hello(recorded.received[0])
        self.assertNotIn(_PSK, extensions)
        if version == "TLSv1.2":
            self.assertEqual(session_id, b"")
        counters = cluster.nodes["node3"].context.counters
        self.assertEqual((counters["lookups"], counters["foreign_session_id"]), (0, 0))

    def test_tls12_server_in_no_rule_never_receives_the_session(self):
        return self._never_received("TLSv1.2")

    def test_tls13_server_in_no_rule_never_receives_the_session(self):
        return self._never_received("TLSv1.3")

    @inlineCallbacks
    def _not_resumed_falls_back(self, version):
        """
        A stock Twisted TLS server with the cluster's certificate on a
        related address: it cannot resume node1's session, so the client
        completes a full handshake, verifies, and the echo comes back.
        """
        cluster = LocalCluster(self)
        yield cluster.start_all()
        stranger = stranger_server(self, cluster)
        policy = _policy(cluster, version)
        yield _round(policy, cluster.ports["node1"])
        report, echo = yield _round(policy, stranger.getHost().port)
        self.assertEqual((report.offered, report.resumed, echo), (True, False, b"hello"))
        # And the new session it made works there next time.
        again, _ = yield _round(policy, stranger.getHost().port)
        self.assertEqual(again.offered, True)

    def test_tls12_server_that_does_not_resume_gives_full_handshake(self):
        return self._not_resumed_falls_back("TLSv1.2")

    def test_tls13_server_that_does_not_resume_gives_full_handshake(self):
        return self._not_resumed_falls_back("TLSv1.3")

    @inlineCallbacks
    def test_certificate_is_still_verified(self):
        cluster = LocalCluster(self)
        yield cluster.start_all()
        policy = _policy(cluster)
        report, echo = yield _round(policy, cluster.ports["node1"],
                                    server_name="other.test")
        self.assertIsNone(report)
        self.assertEqual(echo, b"")
        self.assertEqual(len(policy.cache), 0)


class AgentTests(TestCase):

    @inlineCallbacks
    def _agent_across_two_nodes(self, version):
        cluster = LocalCluster(self, backend=_HTTPOnce)
        yield cluster.start_all()
        policy = _policy(cluster, version)
        reports = []
        policy.reports.append(reports.append)
        agent = Agent(reactor, contextFactory=policy)
        for node in ("node1", "node2"):
            response = yield agent.request(
                b"GET", f"https://localhost:{cluster.ports[node]}/".encode())
            self.assertEqual(response.code, 200)
            self.assertEqual((yield readBody(response)), b"ok")
        self.assertEqual([(r.port, r.resumed) for r in reports],
                         [(cluster.ports["node1"], False),
                          (cluster.ports["node2"], True)])
        self.assertEqual(reports[1].group, "name:localhost")

    def test_tls13_https_request_through_agent_resumes_on_node2(self):
        return self._agent_across_two_nodes("TLSv1.3")

    def test_tls12_https_request_through_agent_resumes_on_node2(self):
        return self._agent_across_two_nodes("TLSv1.2")


class ProbeTests(TestCase):

    @inlineCallbacks
    def test_probe_resumes_on_every_node_after_the_first(self):
        cluster = LocalCluster(self)
        yield cluster.start_all()
        policy = _policy(cluster)
        results = yield Deferred.fromCoroutine(probe(
            reactor, [f"127.0.0.1:{cluster.ports[n]}" for n in ("node1", "node2", "node3")],
            policy, "localhost", b"hello"))
        self.assertEqual([(r.offered, r.resumed, r.failed) for r in results],
                         [(False, False, False), (True, True, False), (True, True, False)])

    def _sslshare(self, *arguments):
        return getProcessOutputAndValue(
            sys.executable, ["-c", "from sslshare.cli import main; main()", *arguments],
            env=os.environ)

    @inlineCallbacks
    def test_probe_command_prints_json_and_exits_0(self):
        cluster = LocalCluster(self)
        yield cluster.start_all()
        out, err, code = yield self._sslshare(
            "probe", "--json", "--ca", cluster.ca_cert, "--server-name", "localhost",
            *[f"127.0.0.1:{cluster.ports[n]}" for n in ("node1", "node2", "node3")])
        self.assertEqual(code, 0, err)
        lines = json.loads(out)
        self.assertEqual([line["resumed"] for line in lines], [False, True, True])
        self.assertEqual(lines[1]["version"], "TLSv1.3")

    @inlineCallbacks
    def test_probe_without_server_name_explains_the_name_mismatch(self):
        # Without --server-name the probe verifies the address it dialled,
        # 127.0.0.1, which the certificate does not name.
        cluster = LocalCluster(self, nodes=("node1",))
        server = named_server(self, cluster, "www.example.com")
        out, err, code = yield self._sslshare(
            "probe", "--json", "--ca", cluster.ca_cert,
            f"127.0.0.1:{server.getHost().port}")
        self.assertEqual(code, 1, err)
        (line,) = json.loads(out)
        self.assertEqual(
            line["error"],
            "the certificate is not for 127.0.0.1: none of its names is that "
            "address; give the name it was issued for with --server-name")

    @inlineCallbacks
    def test_probe_command_exits_1_when_a_related_server_does_not_resume(self):
        """
        A server on the same prefix is related by the policy but shares
        nothing: offered, not resumed, exit status 1, and the table says so.
        """
        cluster = LocalCluster(self, nodes=("node1",))
        cluster.start("node1")
        stranger = stranger_server(self, cluster)
        out, err, code = yield self._sslshare(
            "probe", "--ca", cluster.ca_cert, "--server-name", "localhost",
            f"127.0.0.1:{cluster.ports['node1']}",
            f"127.0.0.1:{stranger.getHost().port}")
        self.assertEqual(code, 1, err)
        rows = [row.split() for row in out.decode().splitlines()]
        self.assertEqual(rows[0][:4], ["ADDRESS", "TLS", "CIPHER", "RESUMED"])
        self.assertEqual(rows[1][3], "no")
        self.assertEqual(rows[2][3:5], ["NO", "(offered)"])
