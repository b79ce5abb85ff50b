"""
L{benchmarks.rates}: the round that stands for a kind, the ratios, and
the stock Twisted reference server.
"""

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.protocols import portforward
from twisted.trial.unittest import SynchronousTestCase, TestCase

from benchmarks import owned_tls, twisted_tls
from benchmarks.rates import lookup_means, median_round, ratios
from tests.support.clients import python_client_round
from tests.support.pki import pki
from tests.support.servers import OneShotEcho


class MedianRoundTests(SynchronousTestCase):

    def test_the_median_round_is_reported_whole_with_every_rounds_cpu(self):
        rounds = [{"server_cpu_us_per_handshake": cpu, "handshakes": count}
                  for cpu, count in ((5000, 10), (3000, 30), (4000, 20))]
        self.assertEqual(median_round(rounds),
                         {"server_cpu_us_per_handshake": 4000, "handshakes": 20,
                          "rounds_server_cpu_us": [5000, 3000, 4000]})

    def test_of_two_rounds_the_lower_is_reported(self):
        rounds = [{"server_cpu_us_per_handshake": cpu} for cpu in (5000, 3000)]
        self.assertEqual(median_round(rounds)["server_cpu_us_per_handshake"],
                         3000)


class LookupMeansTests(SynchronousTestCase):

    def test_mean_milliseconds_by_where_the_lookups_ended(self):
        changed = {"lookup:peer.count": 4, "lookup:peer.seconds": 0.006,
                   "lookup:local.count": 2, "lookup:local.seconds": 0.0001,
                   "resumed_peer": 4, "commands:FetchSession": 4}
        means = lookup_means(changed)
        self.assertEqual(set(means), {"peer", "local"})
        self.assertAlmostEqual(means["peer"], 1.5)
        self.assertAlmostEqual(means["local"], 0.05)


class RatiosTests(SynchronousTestCase):

    def test_the_lone_node_and_stock_twisted_over_each_reference(self):
        cpu = {"alone_full": 2000.0, "haproxy_full": 500.0,
               "twisted_full": 1000.0, "alone_resumed": 1500.0,
               "haproxy_resumed": 300.0, "twisted_resumed": 750.0}
        found = ratios({"tls1.2": {
            kind: {"server_cpu_us_per_handshake": value}
            for kind, value in cpu.items()}})["tls1.2"]
        self.assertEqual(found, {
            "alone_full_vs_haproxy_full": 4.0,
            "alone_full_vs_twisted_full": 2.0,
            "twisted_full_vs_haproxy_full": 2.0,
            "alone_resumed_vs_haproxy_resumed": 5.0,
            "alone_resumed_vs_twisted_resumed": 2.0,
            "twisted_resumed_vs_haproxy_resumed": 2.5})


class ReferenceServerTests(TestCase):
    """
    The Python reference servers, over real sockets: a reference that
    resumed no session would measure only full handshakes in its resumed
    kind.
    """

    def _backend_port(self) -> int:
        backend = reactor.listenTCP(0, Factory.forProtocol(OneShotEcho),
                                    interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        return backend.getHost().port

    @inlineCallbacks
    def _assert_resumes(self, port, files):
        for version in ("TLSv1.2", "TLSv1.3"):
            first = yield deferToThread(
                python_client_round, port, files.ca_cert, version)
            second = yield deferToThread(
                python_client_round, port, files.ca_cert, version,
                first.session)
            self.assertEqual((first.echo, first.reused, second.reused),
                             (b"hello", False, True), version)

    def test_stock_twisted_resumes_python_clients(self):
        factory = portforward.ProxyFactory("127.0.0.1", self._backend_port())
        factory.protocol = twisted_tls.ProxyServer
        files = pki()
        port = reactor.listenSSL(
            0, factory, twisted_tls.ContextFactory(files.ec_chain,
                                                   files.ec_key),
            interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return self._assert_resumes(port.getHost().port, files)

    def test_openssl_owned_sockets_resume_python_clients(self):
        files = pki()
        context = twisted_tls.ContextFactory(files.ec_chain,
                                             files.ec_key).getContext()
        listener = owned_tls.Listener(reactor, reactor, 0, context,
                                      self._backend_port())
        self.addCleanup(listener.stop)
        return self._assert_resumes(listener.port, files)
