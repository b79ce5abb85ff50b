"""
Peers found in DNS (L{sslshare.cluster.PeerDiscovery}), against a real DNS
server on 127.0.0.1: a C{twisted.names} server started by the test, whose
records the test changes while the cluster runs.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.names import client, dns, error, server
from twisted.names.common import ResolverBase
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sslshare import cluster
from sslshare.addresses import AddressError
from sslshare.cluster import PeerSource, peer_source
from sslshare.cluster._discovery import endpoint_string, resolve
from tests.support.cluster import LocalCluster
from tests.support.waiting import until

ZONE = "test.example"
SERVICE = f"_sslshare._tcp.{ZONE}"
TTL = 1


class _Records(ResolverBase):
    """
    The answers of the test's DNS server: C{records[(name, type)]}, a list
    of payloads, which the test changes at will; a name with none is
    NXDOMAIN.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[tuple[str, int], list[object]] = {}

    def _lookup(self, name, cls, type, timeout):
        name = name.decode("ascii") if isinstance(name, bytes) else name
        payloads = self.records.get((name.lower(), type), [])
        if not payloads:
            return fail(error.DomainError(name))
        return succeed(([dns.RRHeader(name, type, dns.IN,
                                      payload.ttl or TTL, payload)
                         for payload in payloads], [], []))


def dns_server(testcase: TestCase) -> tuple[_Records, int]:
    """
    A DNS server on a free UDP port of 127.0.0.1 answering from a
    L{_Records} the caller fills; the records and the port.
    """
    records = _Records()
    factory = server.DNSServerFactory(clients=[records])
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory),
                             interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return records, port.getHost().port


class PeerSourceTests(SynchronousTestCase):

    def test_forms(self):
        self.assertEqual(peer_source("dns-srv:_sslshare._tcp.x.example."),
                         PeerSource("dns-srv", "_sslshare._tcp.x.example"))
        self.assertEqual(peer_source("dns:peers.x.example:9440"),
                         PeerSource("dns", "peers.x.example", 9440))

    def test_refused(self):
        for text in ("srv:x", "dns-srv:", "dns-srv:x:1", "dns:x",
                     "dns:x:0", "dns:x:http"):
            self.assertRaises(AddressError, peer_source, text)

    def test_endpoint_strings_escape_ipv6_colons(self):
        self.assertEqual(endpoint_string("::1", 9440),
                         "tcp:host=\\:\\:1:port=9440")


class ResolveTests(TestCase):
    """
    L{resolve} against the test's DNS server.
    """

    def setUp(self):
        self.records, port = dns_server(self)
        self.resolver = client.Resolver(servers=[("127.0.0.1", port)])

    @inlineCallbacks
    def test_srv_targets_and_their_ports(self):
        self.records.records[(SERVICE, dns.SRV)] = [
            dns.Record_SRV(0, 0, 7001, f"a.{ZONE}"),
            dns.Record_SRV(0, 0, 7002, f"b.{ZONE}")]
        self.records.records[(f"a.{ZONE}", dns.A)] = [
            dns.Record_A("127.0.0.2")]
        self.records.records[(f"b.{ZONE}", dns.AAAA)] = [
            dns.Record_AAAA("::1")]
        found = yield Deferred.fromCoroutine(resolve(
            self.resolver, PeerSource("dns-srv", SERVICE)))
        self.assertEqual(found, ([("127.0.0.2", 7001), ("::1", 7002)], TTL))

    @inlineCallbacks
    def test_a_and_aaaa_records_with_the_port(self):
        name = f"peers.{ZONE}"
        self.records.records[(name, dns.A)] = [dns.Record_A("127.0.0.3"),
                                               dns.Record_A("127.0.0.2")]
        self.records.records[(name, dns.AAAA)] = [dns.Record_AAAA("::1")]
        found = yield Deferred.fromCoroutine(resolve(
            self.resolver, PeerSource("dns", name, 9440)))
        self.assertEqual(found, ([("127.0.0.2", 9440), ("127.0.0.3", 9440),
                                  ("::1", 9440)], TTL))

    @inlineCallbacks
    def test_a_name_that_does_not_exist_fails(self):
        attempt = Deferred.fromCoroutine(resolve(
            self.resolver, PeerSource("dns", f"nobody.{ZONE}", 9440)))
        yield self.assertFailure(attempt, error.DNSNameError)


def _no_dns_query_in_flight() -> bool:
    """
    Whether no DNS query of twisted.names waits for its answer (each holds
    a timeout call until then).
    """
    return not any(getattr(call.func, "__name__", None) == "_clearFailed"
                   for call in reactor.getDelayedCalls())


class DiscoveredClusterTests(TestCase):
    """
    Three nodes whose only peer list is an SRV name on the test's DNS
    server.
    """

    def setUp(self):
        self.records, port = dns_server(self)
        # Runs once the nodes have stopped, while the DNS server still
        # answers: a lookup a node sent just before it stopped is answered
        # (its UDP port closed) within milliseconds, but not within the
        # turn in which the cluster stopped.
        self.addCleanup(until, _no_dns_query_in_flight,
                        message="a node's DNS query is still in flight")
        self.cluster = LocalCluster(
            self, peers=False, cluster_options=(
                f'peers_from = "dns-srv:{SERVICE}"\n'
                f'dns_servers = ["127.0.0.1:{port}"]\n'
                'peers_refresh_min_s = 0.2\n'))
        for node in self.cluster.paths:
            self.records.records[(f"{node}.{ZONE}", dns.A)] = [
                dns.Record_A("127.0.0.1")]

    def publish(self, *nodes):
        self.records.records[(SERVICE, dns.SRV)] = [
            dns.Record_SRV(0, 0, self.cluster.amp_ports[node],
                           f"{node}.{ZONE}")
            for node in nodes]

    def linked(self, node, *peers):
        links = self.cluster.nodes[node].peer_links
        return until(lambda: sorted(
            link.peer_node_id for link in links if link.connected)
            == sorted(peers), message=f"{node} is not linked to {peers}")

    @inlineCallbacks
    def test_nodes_come_and_go_with_their_records(self):
        cluster = self.cluster
        self.publish("node1", "node2")
        cluster.start("node1")
        cluster.start("node2")
        yield self.linked("node1", "node2")
        yield self.linked("node2", "node1")
        # Every node dials its own address too, and recognises itself.
        self.assertEqual(
            cluster.nodes["node1"].peer_links.link("node1"), None)
        first = yield cluster.client_round("node1", "TLSv1.2")
        moved = yield cluster.client_round("node2", "TLSv1.2", first.session)
        self.assertTrue(moved.reused)
        self.assertEqual(cluster.nodes["node2"].counters["resumed_peer"], 1)

        # A node added resumes sessions the others made.
        self.publish("node1", "node2", "node3")
        cluster.start("node3")
        yield self.linked("node3", "node1", "node2")
        yield self.linked("node1", "node2", "node3")
        made = yield cluster.client_round("node1", "TLSv1.2")
        joined = yield cluster.client_round("node3", "TLSv1.2", made.session)
        self.assertTrue(joined.reused)
        self.assertEqual(cluster.nodes["node3"].counters["resumed_peer"], 1)

        # A node removed is no longer dialled.
        self.publish("node1", "node3")
        yield until(lambda: cluster.nodes["node1"].peer_links.link("node2")
                    is None, message="node1 still dials node2")
        yield self.linked("node3", "node1")
        self.assertIsNotNone(cluster.nodes["node2"].peer_links.link("node1"))

    @inlineCallbacks
    def test_an_address_of_another_cluster_is_not_a_peer(self):
        """
        A record naming something that is not a node of this cluster
        (here a plain TCP listener that closes at once) links nothing,
        and is counted.
        """
        from twisted.internet.protocol import Factory, Protocol

        class Closes(Protocol):
            def connectionMade(self):
                self.transport.loseConnection()

        stranger = reactor.listenTCP(0, Factory.forProtocol(Closes),
                                     interface="127.0.0.1")
        self.addCleanup(stranger.stopListening)
        self.records.records[(SERVICE, dns.SRV)] = [
            dns.Record_SRV(0, 0, self.cluster.amp_ports["node1"],
                           f"node1.{ZONE}"),
            dns.Record_SRV(0, 0, stranger.getHost().port, f"node2.{ZONE}")]
        self.cluster.start("node1")
        discovery = self.cluster.services["node1"].discovery
        yield until(lambda: discovery.counters["identify_failures"] >= 1)
        self.assertEqual(discovery.peers, ())
        self.assertIsInstance(discovery, cluster.PeerDiscovery)


class RefreshTests(TestCase):
    """
    L{cluster.PeerDiscovery} on a clock of the test's own, its resolver
    and identification doubles: what a lookup changes, and when the next
    one comes.
    """

    def setUp(self):
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.records = _Records()
        self.identities = {}
        self.applied = []
        self.discovery = cluster.PeerDiscovery(
            PeerSource("dns", "peers.test.example", 7441), self.records,
            "node1", self.identify, self.applied.append,
            lambda node_id: True, self.clock, refresh=(2.0, 30.0))

    def identify(self, host, port):
        node_id = self.identities.get(host)
        if node_id is None:
            return fail(ConnectionRefusedError(host))
        return succeed(node_id)

    def answer(self, *hosts, ttl=TTL):
        self.records.records[("peers.test.example", dns.A)] = [
            dns.Record_A(host, ttl) for host in hosts]

    def refresh(self):
        return self.successResultOf(Deferred.fromCoroutine(
            self.discovery.refresh()))

    def test_peers_found_and_the_ttl_bounded(self):
        self.identities = {"10.0.0.1": "node1", "10.0.0.2": "node2"}
        self.answer("10.0.0.1", "10.0.0.2")
        self.assertEqual(self.refresh(), 2.0)
        self.assertEqual(self.applied,
                         [(("node2", "tcp:host=10.0.0.2:port=7441"),)])

    def test_a_failed_lookup_keeps_the_peers(self):
        self.identities = {"10.0.0.2": "node2"}
        self.answer("10.0.0.2")
        self.refresh()
        self.records.records.clear()
        self.assertEqual(self.refresh(), 2.0)
        self.assertEqual(len(self.applied), 1)
        self.assertEqual(self.discovery.peers,
                         (("node2", "tcp:host=10.0.0.2:port=7441"),))
        self.assertEqual(self.discovery.counters["lookup_failures"], 1)

    def test_an_address_that_names_no_node_is_left_out(self):
        self.identities = {"10.0.0.2": "node2"}
        self.answer("10.0.0.2", "10.0.0.3")
        self.refresh()
        self.assertEqual(self.discovery.peers,
                         (("node2", "tcp:host=10.0.0.2:port=7441"),))
        self.assertEqual(self.discovery.counters["identify_failures"], 1)

    def test_lookups_follow_one_another_on_the_clock(self):
        self.identities = {"10.0.0.2": "node2"}
        self.answer("10.0.0.2", ttl=3600)
        self.discovery.startService()
        self.clock.advance(0)
        self.assertEqual(self.discovery.counters["lookups"], 1)
        self.clock.advance(29)
        self.assertEqual(self.discovery.counters["lookups"], 1)
        self.clock.advance(1)
        self.assertEqual(self.discovery.counters["lookups"], 2)
        self.discovery.stopService()
        self.clock.advance(60)
        self.assertEqual(self.discovery.counters["lookups"], 2)


class StatsTests(TestCase):

    @inlineCallbacks
    def test_lookups_are_counted_in_the_stats(self):
        records, port = dns_server(self)
        cluster_ = LocalCluster(self, nodes=("node1",), peers=False,
                                cluster_options=(
                                    f'peers_from = "dns-srv:{SERVICE}"\n'
                                    f'dns_servers = ["127.0.0.1:{port}"]\n'))
        cluster_.start("node1")
        node = cluster_.nodes["node1"]
        yield until(lambda: node.stats().get("discovery.lookup_failures"))
        self.assertEqual(node.stats()["discovery.lookups"], 1)


class SlowAddressTests(TestCase):
    """
    Addresses that do not answer cost their timeout once, not one after
    another.
    """

    def test_unanswered_addresses_are_dialled_at_once(self):
        from twisted.internet.task import Clock, deferLater

        clock = Clock()
        records = _Records()
        records.records[("peers.test.example", dns.A)] = [
            dns.Record_A(f"10.0.0.{host}") for host in (2, 3, 4, 5)]

        def identify(host, port):
            if host == "10.0.0.5":
                return succeed("node5")
            return deferLater(clock, 5, lambda: (_ for _ in ()).throw(
                ConnectionRefusedError(host)))

        applied = []
        discovery = cluster.PeerDiscovery(
            PeerSource("dns", "peers.test.example", 7441), records, "node1",
            identify, applied.append, lambda node_id: False, clock)
        refreshing = Deferred.fromCoroutine(discovery.refresh())
        clock.advance(5)
        self.successResultOf(refreshing)
        self.assertEqual(applied, [(("node5", "tcp:host=10.0.0.5:port=7441"),)])
        self.assertEqual(discovery.counters["identify_failures"], 3)


class IdentifyTests(TestCase):
    """
    L{cluster.identify} over real sockets.
    """

    @inlineCallbacks
    def test_a_question_given_up_ends_its_connection(self):
        """
        A dial whose answer is no longer wanted (its timeout, or the node
        stopping) is closed, not left waiting for a handshake that a
        silent address never answers.
        """
        from twisted.internet.defer import CancelledError
        from twisted.internet.protocol import Factory, Protocol

        accepted = []
        lost: Deferred[None] = Deferred()

        class Silent(Protocol):
            def connectionMade(self):
                accepted.append(self)

            def connectionLost(self, reason):
                lost.callback(None)

        silent = reactor.listenTCP(0, Factory.forProtocol(Silent),
                                   interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        nodes = LocalCluster(self, peers=False)
        files = nodes.pki.node("node1")
        channel = cluster.ClusterTLS(nodes.ca_cert, files.certificate,
                                     files.key, "test", "node1")
        asking = cluster.identify(channel, reactor, reactor, "127.0.0.1",
                                  silent.getHost().port)
        yield until(lambda: accepted, message="the dial did not arrive")
        asking.cancel()
        yield self.assertFailure(asking, CancelledError)
        yield lost.addTimeout(5, reactor)
