"""
Clusters of real nodes on 127.0.0.1: L{LocalCluster} writes their files and
starts them (in this process or as C{twistd} processes), and
L{NetworkLookup} answers an engine's lookups over a TCP round trip.
"""

from __future__ import annotations

import ipaddress
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory

from sslshare import config
from sslshare.cluster import ClusterTLS, PeerServerFactory, stats_from
from sslshare.dev import pki as pki_files
from sslshare.dev.throwaway import free_port
from sslshare.service import build_node
from sslshare.state import StateKeys
from tests.support.clients import python_client_round
from tests.support.pki import write_identity
from tests.support.processes import NodeProcess
from tests.support.servers import OneShotEcho
from tests.support.sessions import Found
from tests.support.waiting import until, wait_for_port


class _LookupAnswerer(LineReceiver):
    delimiter = b"\n"

    def lineReceived(self, line):
        der = self.factory.sessions.get(bytes.fromhex(line.decode("ascii")))
        self.sendLine(der.hex().encode("ascii") if der else b"-")


class _LookupAsker(LineReceiver):
    delimiter = b"\n"

    def __init__(self):
        self.answer = Deferred()

    def lineReceived(self, line):
        self.answer.callback(
            None if line == b"-" else Found(bytes.fromhex(line.decode())))
        self.transport.loseConnection()


class NetworkLookup:
    """
    Lookups answered over a TCP round trip to a line server on 127.0.0.1.
    """

    def __init__(self, testcase, sessions):
        factory = Factory.forProtocol(_LookupAnswerer)
        factory.sessions = sessions
        self.listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        testcase.addCleanup(self.listening.stopListening)

    def lookup(self, request):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1",
                                      self.listening.getHost().port)
        asker = _LookupAsker()
        connected = connectProtocol(endpoint, asker)
        connected.addCallback(
            lambda protocol: protocol.sendLine(
                request.session_id.hex().encode()))
        return connected.addCallback(lambda _: asker.answer)


NODE_CONFIG = """\
[node]
id = "{node}"
cluster = "{cluster}"
listen = "tcp:{client_port}:interface=127.0.0.1"
backend = "tcp:host=127.0.0.1:port={backend_port}"
state_dir = "{state_dir}"
{node_options}

[[tls.service]]
name = "web"
server_names = ["localhost"]
certificate = "pki/localhost-chain.pem"
key = "pki/localhost-key.pem"

[cluster]
listen = "tcp:{amp_port}:interface=127.0.0.1"
ca = "pki/ca.pem"
certificate = "pki/{node}.pem"
key = "pki/{node}-key.pem"
state_key = "pki/state.key"

[cluster.peers]
{peers}
"""
"""
A node of a local cluster whose PKI is in C{pki/} beside its file (as
L{sslshare.dev.pki.init_pki} writes it); C{node_options} are more lines of its
C{[node]} table.  Also used by C{benchmarks/checkpoint.py}.
"""


# The lines of NODE_CONFIG that LocalCluster's listen and backend_endpoint
# replace.
_LISTEN = 'listen = "tcp:{port}:interface=127.0.0.1"'
_BACKEND = 'backend = "tcp:host=127.0.0.1:port={port}"'


class LocalCluster:
    """
    A cluster of nodes of the test's own: a PKI made by
    L{sslshare.dev.pki.init_pki}, one TOML file per node with free ports, a
    one-shot echo backend, and nodes started in this process with
    L{sslshare.service.build_node} (or by the test as C{twistd} processes
    from the same files).
    """

    def __init__(self, testcase, nodes=("node1", "node2", "node3"),
                 budget_ms=300, backend=OneShotEcho, repository=None,
                 metrics=False, node_options="", peers=True,
                 cluster_options="", listen=None, backend_endpoint=None):
        """
        @param backend: the backend's protocol class, or its factory.
        @param peers: every node is a peer of every other; C{False}: none
            is listed (nodes that share only the repository, or find their
            peers in DNS).
        @param cluster_options: more lines of each node's C{[cluster]}
            table; C{{node}} in them names the node.
        @param listen: the client listen endpoint instead of C{tcp:} on
            127.0.0.1; C{{port}} in it is the node's port (C{ports}).
        @param backend_endpoint: the backend's client endpoint string, for
            a backend the test runs itself (C{backend} is then unused).
        @param repository: the body of a C{[repository]} section, or
            C{None}; C{{directory}} in it names the cluster's directory.
        @param metrics: serve each node's metrics on a free port of its
            own (C{metrics_ports}).
        @param node_options: more lines of each node's C{[node]} table.
        """
        self._testcase = testcase
        self.peers = peers
        self.directory = os.path.abspath(testcase.mktemp())
        os.makedirs(self.directory)
        self.pki = pki_files.init_pki(os.path.join(self.directory, "pki"),
                                      "test", nodes)
        if not isinstance(backend, Factory):
            backend = Factory.forProtocol(backend)
        backend = reactor.listenTCP(0, backend, interface="127.0.0.1")
        testcase.addCleanup(backend.stopListening)
        # A test stops it to make the backend refuse connections.
        self.backend_listener = backend
        self.ports = {node: free_port() for node in nodes}
        self.amp_ports = amp_ports = {node: free_port() for node in nodes}
        self.metrics_ports = ({node: free_port() for node in nodes}
                              if metrics else {})
        self.paths = {}
        for node in nodes:
            named = "\n".join(
                f'{peer} = "tcp:host=127.0.0.1:port={amp_ports[peer]}"'
                for peer in nodes if peer != node and peers)
            options = f"lookup_budget_ms = {budget_ms}\n{node_options}"
            if metrics:
                options += (f'\nmetrics_listen = '
                            f'"tcp:{self.metrics_ports[node]}:'
                            f'interface=127.0.0.1"')
            text = NODE_CONFIG.format(
                node=node, cluster="test", client_port=self.ports[node],
                backend_port=backend.getHost().port,
                state_dir=f"state/{node}", node_options=options,
                amp_port=amp_ports[node], peers=named)
            replaced = [("\n[cluster.peers]\n",
                         cluster_options.format(node=node)
                         + "\n[cluster.peers]\n")]
            if listen is not None:
                replaced.append((_LISTEN.format(port=self.ports[node]),
                                 f'listen = "{listen}"'.format(
                                     port=self.ports[node])))
            if backend_endpoint is not None:
                replaced.append((_BACKEND.format(port=backend.getHost().port),
                                 f'backend = "{backend_endpoint}"'))
            for line, replacement in replaced:
                if line not in text:
                    raise AssertionError(f"NODE_CONFIG has no {line!r}")
                text = text.replace(line, replacement)
            path = os.path.join(self.directory, f"{node}.toml")
            with open(path, "w") as f:
                f.write(text)
                if repository is not None:
                    f.write("\n[repository]\n"
                            + repository.format(directory=self.directory))
            self.paths[node] = path
        self.services = {}
        self.nodes = {}
        self.processes = {}
        testcase.addCleanup(self.stop_all)

    @property
    def ca_cert(self):
        return self.pki.ca_certificate

    def start(self, node):
        service, self.nodes[node] = build_node(
            config.load(self.paths[node], reactor), reactor)
        service.startService()
        self.services[node] = service
        return self.nodes[node]

    def start_all(self):
        for node in self.paths:
            self.start(node)
        return self.wait_linked()

    def wait_linked(self, timeout=10.0, down=()):
        """
        Wait until every node started in this process has its links up to
        all the others but those named in C{down}, which do not run.
        """
        links = (len(self.paths) - 1 - len(set(down))) if self.peers else 0
        return until(lambda: all(node.peer_links.connected_count() == links
                                 for name, node in self.nodes.items()
                                 if name in self.services),
                     timeout, interval=0.05,
                     message="the nodes did not link up in time")

    def client_round(self, node, version, session=None, **options):
        """
        L{python_client_round} with C{node} of this cluster, in a thread:
        fires with its L{ClientResult}.
        """
        return deferToThread(python_client_round, self.ports[node],
                             self.ca_cert, version, session, **options)

    @inlineCallbacks
    def settled(self):
        """
        Fires once the in-process nodes have closed every client connection
        (the last records' checkpoints leave then) and every command they
        have sent their peers, and every item waiting in their outboxes,
        has been handled: the outboxes flushed, then a C{Stats} round trip
        on every link that is up, since AMP answers a connection's commands
        in order.
        """
        yield until(lambda: not any(service.open_connections
                                    for service in self.services.values()),
                    10.0, interval=0.01,
                    message="the nodes kept client connections open")
        links = [link for node in self.nodes.values()
                 for link in node.peer_links.links if link.connected]
        for link in links:
            link.outbox.flush()
        yield gatherResults([stats_from(link) for link in links])

    @inlineCallbacks
    def resume_from_the_backup_node(self):
        """
        Make a TLS 1.2 session on node1, stop node1, and resume the session
        on node3, which finds it at node1's backup node, node2 (the ring
        after node1): started nodes node1 to node3; fires with the last
        round's L{ClientResult}.
        """
        yield self.start_all()
        first = yield self.client_round("node1", "TLSv1.2")
        # The backup copy arrives asynchronously.
        yield self.settled()
        yield self.stop("node1")
        yield until(lambda: not self.nodes["node3"].peer_links
                    .link("node1").connected)
        resumed = yield self.client_round("node3", "TLSv1.2", first.session)
        return resumed

    def wait_linked_to(self, peer, timeout=10.0):
        """
        Wait until every node started in this process has its link to
        C{peer} up, and C{peer} its link to it (C{peer} may be a C{twistd}
        process).
        """
        return until(lambda: all(node.peer_links.link(peer).connected
                                 and peer in node.peer_server.connected_peers()
                                 for node in self.nodes.values()),
                     timeout, interval=0.05,
                     message=f"no link to {peer} in time")

    def impersonate(self, node, handler, protocol=None):
        """
        Answer the cluster channel of C{node} with C{handler} (an
        L{ICommandHandler}) behind C{node}'s own certificate, allowing
        every command: a peer that links up as C{node} and does what
        C{handler} says.

        @param protocol: a subclass of the channel's server protocol, for
            a peer that answers what the real one never would.
        """
        files = self.pki.node(node)
        channel = ClusterTLS(self.ca_cert, files.certificate, files.key,
                             "test", node)
        keys = StateKeys.from_file(os.path.join(self.directory, "pki",
                                                "state.key"))
        amp = PeerServerFactory(handler, "test", node,
                                lambda command, peer: True,
                                peers=[peer for peer in self.ports
                                       if peer != node],
                                keys=lambda: keys)
        if protocol is not None:
            amp.protocol = protocol
        listening = reactor.listenTCP(
            self.amp_ports[node],
            TLSMemoryBIOFactory(channel.server_options(amp.admit), False, amp),
            interface="127.0.0.1")
        self._testcase.addCleanup(listening.stopListening)

    def stop(self, node):
        self.nodes.pop(node, None)
        return self.services.pop(node).stopService()

    def edit(self, node, old, new):
        """
        Replace C{old} by C{new} in C{node}'s configuration file; C{old}
        must be there, so that a test never checks an edit that did not
        happen.
        """
        with open(self.paths[node]) as f:
            text = f.read()
        assert old in text, f"{old!r} not in {self.paths[node]}"
        with open(self.paths[node], "w") as f:
            f.write(text.replace(old, new))

    def peer_line(self, node):
        """
        The line of C{[cluster.peers]} that names C{node}.
        """
        return f'{node} = "tcp:host=127.0.0.1:port={self.amp_ports[node]}"'

    def server_certificate(self, name, server_names=("localhost",)):
        """
        Issue another certificate for clients from the cluster CA, for
        C{server_names} and 127.0.0.1, as C{pki/<name>-chain.pem} and
        C{pki/<name>-key.pem}.

        @return: the two paths as a node's file names them.
        """
        with open(self.pki.ca_key, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), None)
        with open(self.pki.ca_certificate, "rb") as f:
            ca_pem = f.read()
        ca = x509.load_pem_x509_certificate(ca_pem)
        key = ec.generate_private_key(ec.SECP256R1())
        names = [x509.DNSName(name) for name in server_names]
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        certificate = pki_files.issue_certificate(
            ca, ca_key, key, server_names[0], names,
            [ExtendedKeyUsageOID.SERVER_AUTH])
        write_identity(os.path.join(self.directory, "pki"), name, certificate,
                       key, ca_pem)
        return f"pki/{name}-chain.pem", f"pki/{name}-key.pem"

    def log(self, node):
        """
        What C{node}'s C{twistd} process has logged so far, in the files
        twistd rotated (every 1 MB) too, oldest first.
        """
        path = os.path.join(self.directory, f"{node}.log")
        rotated = sorted((int(name.rsplit(".", 1)[1]) for name
                          in os.listdir(self.directory)
                          if name.startswith(f"{node}.log.")), reverse=True)
        text = ""
        for name in [f"{path}.{number}" for number in rotated] + [path]:
            with open(name) as f:
                text += f.read()
        return text

    def spawn(self, node, environment=None, child_fds=None, wrapper=()):
        """
        Run C{node} as a C{twistd -n sslshare} process; fires once it
        listens for clients.

        @param environment: more environment variables for it.
        @param child_fds: its file descriptors, as for C{spawnProcess}.
        @param wrapper: a command line that runs it (its arguments
            follow), such as a shell setting what only the child knows.
        """
        process = NodeProcess()
        command = [*wrapper, sys.executable, "-c",
                   "from twisted.scripts.twistd import run; run()",
                   "-n", "--pidfile=", "--logfile",
                   os.path.join(self.directory, f"{node}.log"),
                   "sslshare", "--config", self.paths[node]]
        self.processes[node] = reactor.spawnProcess(
            process, command[0], command,
            env={**os.environ, **(environment or {})}, childFDs=child_fds)
        return Deferred.fromCoroutine(
            wait_for_port(self.ports[node], process.ended))

    def kill(self, node, signal_name="KILL"):
        """
        Send C{node}'s process a signal; fires when it has ended.
        """
        transport = self.processes.pop(node)
        transport.signalProcess(signal_name)
        return transport.proto.ended

    def signal(self, node, signal_name):
        """
        Send C{node}'s process a signal it lives on (C{HUP}).
        """
        self.processes[node].signalProcess(signal_name)

    def stop_all(self):
        return gatherResults(
            [self.stop(node) for node in list(self.services)]
            + [self.kill(node, "TERM") for node in list(self.processes)])
