"""
Every part that declares an interface provides it: C{verifyObject} on a real
instance of each, built from a node of a real cluster where it needs one.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.internet.task import Clock
from twisted.protocols.amp import IResponderLocator
from twisted.trial.unittest import TestCase
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface.verify import verifyObject

from sslshare.accesslog import AccessLogFile, AccessLogToNodeLog, IAccessLog
from sslshare.client import SessionSharingPolicy
from sslshare.cluster import ClusterTLS, ICommandHandler
from sslshare.protocol import _BackendSide, _Gate
from sslshare.repository import ISessionRepository
from sslshare.tls import ISessionLookupListener
from tests.support.clients import _HeldAmpClient
from tests.support.cluster import LocalCluster
from tests.support.memory import MemoryRepository
from tests.support.servers import StallingHandler

_CLIENT = IPv4Address("TCP", "127.0.0.1", 50000)


class NodePartsTests(TestCase):

    @inlineCallbacks
    def setUp(self):
        self.cluster = LocalCluster(self, nodes=("node1", "node2"))
        yield self.cluster.start_all()
        self.service = self.cluster.services["node1"]

    def test_node_handles_the_cluster_commands(self):
        verifyObject(ICommandHandler, self.cluster.nodes["node1"])

    def test_client_side_tls_protocol(self):
        factory = self.service._clients
        verifyObject(IOpenSSLServerConnectionCreator, factory)
        protocol = factory.buildProtocol(_CLIENT)
        verifyObject(ISessionLookupListener, protocol)
        verifyObject(IHandshakeListener, protocol.wrappedProtocol)
        verifyObject(IHalfCloseableProtocol, _BackendSide(protocol.wrappedProtocol))
        verifyObject(IPushProducer, _Gate(None))

    @inlineCallbacks
    def test_cluster_channel_protocols(self):
        node = self.cluster.nodes["node1"]
        server = node.peer_server.buildProtocol(_CLIENT)
        verifyObject(IHandshakeListener, server)
        verifyObject(IResponderLocator, server.locator)
        link = node.peer_links.link("node2")
        verifyObject(IStreamClientEndpoint, link._endpoint)
        yield link.when_connected(fail_after_failures=3)
        verifyObject(IHandshakeListener, link._protocol)

    def test_cluster_channel_connection_creators(self):
        files = self.cluster.pki.node("node1")
        channel = ClusterTLS(self.cluster.ca_cert, files.certificate,
                             files.key, "test", "node1")
        verifyObject(IOpenSSLServerConnectionCreator,
                     channel.server_options(lambda node, address: None))
        verifyObject(IOpenSSLClientConnectionCreator,
                     channel.client_options("node2"))


class AccessLogTests(TestCase):

    def test_both_destinations(self):
        import os

        verifyObject(IAccessLog, AccessLogToNodeLog())
        verifyObject(IAccessLog, AccessLogFile(os.path.abspath(self.mktemp()),
                                               Clock()))


class HostTableRepositoryTests(TestCase):

    def test_table_repository(self):
        from sslshare.hoststore import HostStore, Shape, create_table
        from sslshare.repository.table import TableRepository

        table = HostStore(create_table(Shape(buckets=1)), Clock())
        self.addCleanup(table.close)
        verifyObject(ISessionRepository, TableRepository(table))


class ClientPartsTests(TestCase):

    def test_policy_and_its_creators(self):
        policy = SessionSharingPolicy()
        verifyObject(IPolicyForHTTPS, policy)
        verifyObject(IOpenSSLClientConnectionCreator,
                     policy.creatorForNetloc(b"localhost", 443))


class DoublesTests(TestCase):
    """
    The in-memory doubles of the tests provide what they stand for.
    """

    def test_memory_repository(self):
        verifyObject(ISessionRepository, MemoryRepository(Clock()))

    def test_stalling_handler(self):
        verifyObject(ICommandHandler, StallingHandler())
        verifyObject(ICommandHandler, StallingHandler(everything=True))

    def test_held_amp_client(self):
        verifyObject(IHandshakeListener, _HeldAmpClient(b""))
