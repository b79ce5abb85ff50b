"""
Helpers shared by the tests.

Certificates: one test CA and the server identities it signs, written as PEM
files that both our engine and stock clients (Python C{ssl}, C{openssl
s_client}) load.  Generating an RSA-2048 key takes a noticeable part of a
second, so tests that only need I{a} PKI share one per process through
L{pki}; a test that changes the files makes its own with L{make_pki}.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import struct
import sys
import tempfile
import threading
import weakref

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols import amp
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest
from zope.interface import implementer

from sslshare.dev import pki as pki_files
from sslshare import sessionid, state, tls
from sslshare.cluster import ClusterTLS, ICommandHandler, PeerServerFactory
from sslshare.protocol import SessionResumingTLSFactory
from sslshare.state import SessionState, StateKeys
from sslshare.dev.throwaway import (
    PostgresServer,
    RedisServer,
    ServerUnavailable,
    free_port,
    postgres_binaries,
    redis_server_binary,
)


@attrs.frozen
class PKI:
    """
    Paths of the PEM files written by L{make_pki}.  Each chain file holds the
    server certificate, then the CA certificate; each key file holds the
    unencrypted PKCS#8 key of its chain's server certificate.

    @ivar ca_cert: the CA certificate, for clients to verify against.
    @ivar rsa_chain: C{localhost} and C{127.0.0.1}, RSA-2048 key.
    @ivar ec_chain: C{localhost} and C{127.0.0.1}, P-256 key.
    @ivar other_chain: C{other.test} only, P-256 key: a second virtual service.
    """

    ca_cert: str
    rsa_chain: str
    rsa_key: str
    ec_chain: str
    ec_key: str
    other_chain: str
    other_key: str

    def chain(self, kind: str) -> str:
        """
        The C{localhost} chain whose key is of C{kind}, C{"rsa"} or C{"ec"}.
        """
        return {"rsa": self.rsa_chain, "ec": self.ec_chain}[kind]

    def key(self, kind: str) -> str:
        """
        The key of L{chain}C{(kind)}.
        """
        return {"rsa": self.rsa_key, "ec": self.ec_key}[kind]


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def write_private(path: str, data: bytes = b"") -> str:
    """
    Write C{data} to a new file at C{path}, mode 0600 from the start, as a
    node's configuration requires of its keys and password files.
    """
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
              "wb") as f:
        f.write(data)
    return path


def _write(directory: str, filename: str, data: bytes,
           private: bool = False) -> str:
    path = os.path.join(directory, filename)
    if private:
        return write_private(path, data)
    with open(path, "wb") as f:
        f.write(data)
    return path


def make_pki(directory: FilePath | str) -> PKI:
    """
    Generate a CA and three server identities signed by it, and write them to
    C{directory} (created if missing, as for a path from C{TestCase.mktemp}).
    """
    if isinstance(directory, FilePath):
        directory = directory.path
    os.makedirs(directory, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = pki_files.ca_certificate("test", ca_key)
    localhost = [x509.DNSName("localhost"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    paths = {"ca_cert": _write(directory, "ca.pem", _pem(ca))}
    for prefix, names, key in [
        ("rsa", localhost, rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ec", localhost, ec.generate_private_key(ec.SECP256R1())),
        ("other", [x509.DNSName("other.test")], ec.generate_private_key(ec.SECP256R1())),
    ]:
        certificate = pki_files.issue_certificate(
            ca, ca_key, key, str(names[0].value), names,
            [ExtendedKeyUsageOID.SERVER_AUTH])
        paths[f"{prefix}_chain"] = _write(
            directory, f"{prefix}-chain.pem", _pem(certificate) + _pem(ca))
        paths[f"{prefix}_key"] = _write(
            directory, f"{prefix}-key.pem", key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()), private=True)
    return PKI(**paths)


@functools.cache
def pki() -> PKI:
    """
    The PKI shared by every test of this process, made on first use in a
    temporary directory that is removed when the process exits.  Tests must
    not change its files.
    """
    directory = tempfile.mkdtemp(prefix="sslshare-pki-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return make_pki(directory)


LOOKUP_DELAY = 0.02


class OneShotEcho(Protocol):
    """
    Sends back the first bytes it gets, then closes: a client that waits for
    the answer has read everything the server sent before it (TLS 1.3
    tickets included).
    """

    def dataReceived(self, data):
        self.transport.write(data)
        self.transport.loseConnection()


@attrs.frozen
class Found:
    der: bytes = attrs.field(repr=False)
    source: str = "test"


def found_in(sessions, session_id, take=dict.get):
    """
    What a lookup in the dict C{sessions} finds, as the TLS protocol
    expects it.
    """
    der = take(sessions, session_id, None)
    return None if der is None else Found(der)


class TLSServer:
    """
    One engine context listening on 127.0.0.1, answering lookups from
    C{sessions} after a reactor delay (replace C{lookup} to change that).
    """

    def __init__(self, testcase, chain=None, key=None, *, owner, sessions,
                 services=None, service_name="web", **context_options):
        if services is None:
            services = [tls.VirtualService(
                service_name, chain, key,
                sessionid.service_id_context("test", service_name),
                ("localhost",))]
        self.sessions = sessions
        self.owner_tag = sessionid.owner_tag("test", owner)
        self.context = tls.ServerContext(
            services, self.owner_tag, on_new_session=self._made,
            **context_options)
        self.lookup = self._delayed_lookup
        factory = SessionResumingTLSFactory(
            self.context, lambda request: self.lookup(request),
            Factory.forProtocol(OneShotEcho))
        self.protocols = _tracked(factory)
        self.listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port
        testcase.addCleanup(self.stop)

    def _made(self, connection, session_id, der):
        self.sessions[session_id] = der

    def _delayed_lookup(self, request):
        return deferLater(reactor, LOOKUP_DELAY, found_in, self.sessions,
                          request.session_id)

    def stop(self):
        _abort_all(self.protocols)
        return self.listening.stopListening()


def _tracked(factory):
    """
    Make C{factory} remember the protocols it builds.

    @return: the set it adds them to; weak, so that a long test does not
        keep every connection alive.
    """
    protocols = weakref.WeakSet()
    original = factory.buildProtocol

    def build(address):
        protocol = original(address)
        protocols.add(protocol)
        return protocol

    factory.buildProtocol = build
    return protocols


def _abort_all(protocols):
    for protocol in list(protocols):
        if protocol.transport is not None:
            protocol.transport.abortConnection()


class SharingPair:
    """
    Two independent contexts of nodes node1 and node2 sharing one dict of
    DER bytes, made with the same context C{options} but for
    C{second_options}, which node2's context has instead.
    """

    def __init__(self, testcase, chain, key, second_service="web",
                 second_options=None, **options):
        self.sessions = {}
        self.first = TLSServer(testcase, chain, key, owner="node1",
                               sessions=self.sessions, **options)
        self.second = TLSServer(testcase, chain, key, owner="node2",
                                sessions=self.sessions,
                                service_name=second_service,
                                **{**options, **(second_options or {})})


@attrs.frozen
class ClientResult:
    version: str
    reused: bool
    echo: bytes
    session: ssl.SSLSession | None
    peer_names: list[str]
    alpn: str | None


_client_contexts_lock = threading.Lock()


def _client_context(ca_cert, version, verify, alpn):
    # Python's ssl resumes a session only with the context that made it, so
    # the rounds of one test share contexts, even rounds that start at once
    # in several threads.
    with _client_contexts_lock:
        return _new_client_context(ca_cert, version, verify, alpn)


@functools.cache
def _new_client_context(ca_cert, version, verify, alpn):
    context = ssl.create_default_context(cafile=ca_cert)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = getattr(
        ssl.TLSVersion, version.replace(".", "_"))
    if alpn:
        context.set_alpn_protocols(alpn)
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
    context = _client_context(ca_cert, version, verify, tuple(alpn or ()))
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
                names = [value for kind, value in
                         certificate.get("subjectAltName", ()) if kind == "DNS"]
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
            lambda protocol: protocol.sendLine(request.session_id.hex().encode()))
        return connected.addCallback(lambda _: asker.answer)


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


def session_state(**fields):
    """
    A valid L{sslshare.state.SessionState} of a fresh session of node1,
    created at time 0 and expiring at 100, with C{fields} overriding any
    field.
    """
    values = dict(
        session_id=sessionid.new_session_id(sessionid.owner_tag("test", "node1")),
        id_context=sessionid.service_id_context("test", "web"),
        der=os.urandom(135),
        holder="node1",
        created=0.0,
        expires=100.0,
    )
    values.update(fields)
    return SessionState(**values)


# Hypothesis strategies: any sslshare session id, any valid state.
session_ids = st.binary(min_size=31, max_size=31).map(lambda b: b"\x01" + b)
_times = st.floats(allow_nan=False, allow_infinity=False)
session_states = st.builds(
    lambda session_id, id_context, der, holder, created_expires, seq, digest,
    moves:
        SessionState(session_id=session_id, id_context=id_context, der=der,
                     holder=holder, created=min(created_expires),
                     expires=max(created_expires), seq=seq, digest=digest,
                     moves=moves),
    session_id=session_ids,
    id_context=st.binary(min_size=1, max_size=state.MAX_ID_CONTEXT_LENGTH),
    der=st.binary(min_size=1, max_size=state.MAX_DER_LENGTH),
    holder=st.text(st.characters(exclude_categories=("C", "Zl", "Zp")),
                  min_size=1, max_size=state.MAX_HOLDER_CHARACTERS)
    .filter(str.isprintable),
    created_expires=st.tuples(_times, _times),
    seq=st.integers(0, state.MAX_SEQ),
    digest=st.one_of(st.just(b""), st.binary(min_size=32, max_size=32)),
    moves=st.integers(0, state.MAX_MOVES),
)


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


class RoguePeerProtocol(PeerServerFactory.protocol):
    """
    A peer with a valid certificate and the cluster's state key that
    answers the commands named in C{rogue} from responders of its own,
    fields the real server would never send included, and the rest (the
    key check) through the server's checked ones.
    """

    rogue: frozenset[bytes] = frozenset()

    def __init__(self):
        super().__init__()
        self._checked = self.locator
        self.locator = self

    def locateResponder(self, name):
        if name in self.rogue:
            return amp.AMP.locateResponder(self, name)
        return self._checked.locateResponder(name)


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
                 metrics=False, node_options=""):
        """
        @param backend: the backend's protocol class, or its factory.
        @param repository: the body of a C{[repository]} section, or
            C{None}; C{{directory}} in it names the cluster's directory.
        @param metrics: serve each node's metrics on a free port of its
            own (C{metrics_ports}).
        @param node_options: more lines of each node's C{[node]} table.
        """
        self._testcase = testcase
        self.directory = os.path.abspath(testcase.mktemp())
        os.makedirs(self.directory)
        self.pki = pki_files.init_pki(os.path.join(self.directory, "pki"), "test",
                                nodes)
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
            peers = "\n".join(
                f'{peer} = "tcp:host=127.0.0.1:port={amp_ports[peer]}"'
                for peer in nodes if peer != node)
            options = f"lookup_budget_ms = {budget_ms}\n{node_options}"
            if metrics:
                options += (f'\nmetrics_listen = '
                            f'"tcp:{self.metrics_ports[node]}:'
                            f'interface=127.0.0.1"')
            path = os.path.join(self.directory, f"{node}.toml")
            with open(path, "w") as f:
                f.write(NODE_CONFIG.format(
                    node=node, cluster="test", client_port=self.ports[node],
                    backend_port=backend.getHost().port,
                    state_dir=f"state/{node}",
                    node_options=options,
                    amp_port=amp_ports[node], peers=peers))
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
        from sslshare import config
        from sslshare.service import build_node

        service, self.nodes[node] = build_node(
            config.load(self.paths[node], reactor), reactor)
        service.startService()
        self.services[node] = service
        return self.nodes[node]

    def start_all(self):
        for node in self.paths:
            self.start(node)
        return self.wait_linked()

    async def _wait_linked(self, timeout, down):
        deadline = reactor.seconds() + timeout
        while reactor.seconds() < deadline:
            if all(node.peer_links.connected_count()
                   == len(self.paths) - 1 - len(down)
                   for name, node in self.nodes.items()
                   if name in self.services):
                return
            await deferLater(reactor, 0.05, lambda: None)
        raise AssertionError("the nodes did not link up in time")

    def wait_linked(self, timeout=10.0, down=()):
        """
        Wait until every node started in this process has its links up to
        all the others but those named in C{down}, which do not run.
        """
        return Deferred.fromCoroutine(self._wait_linked(timeout, set(down)))

    def client_round(self, node, version, session=None, **options):
        """
        L{python_client_round} with C{node} of this cluster, in a thread:
        fires with its L{ClientResult}.
        """
        return deferToThread(python_client_round, self.ports[node],
                             self.ca_cert, version, session, **options)

    def settled(self):
        """
        Fires once every command the in-process nodes have sent their peers
        so far has been handled: a C{Stats} round trip on every link that
        is up, since AMP answers a connection's commands in order.
        """
        from twisted.internet.defer import gatherResults

        from sslshare.cluster import stats_from

        return gatherResults([stats_from(link)
                              for node in self.nodes.values()
                              for link in node.peer_links.links
                              if link.connected])

    def wait_linked_to(self, peer, timeout=10.0):
        """
        Wait until every node started in this process has its link to
        C{peer} up, and C{peer} its link to it (C{peer} may be a C{twistd}
        process).
        """
        async def linked():
            deadline = reactor.seconds() + timeout
            while not all(node.peer_links.link(peer).connected
                          and peer in node.peer_server.connected_peers()
                          for node in self.nodes.values()):
                if reactor.seconds() > deadline:
                    raise AssertionError(f"no link to {peer} in time")
                await deferLater(reactor, 0.05, lambda: None)

        return Deferred.fromCoroutine(linked())

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
        chain = f"pki/{name}-chain.pem"
        key_path = f"pki/{name}-key.pem"
        _write(self.directory, chain, _pem(certificate) + ca_pem)
        _write(self.directory, key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), private=True)
        return chain, key_path

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

    def spawn(self, node):
        """
        Run C{node} as a C{twistd -n sslshare} process; fires once it
        listens for clients.
        """
        process = _NodeProcess()
        command = [sys.executable, "-c",
                   "from twisted.scripts.twistd import run; run()",
                   "-n", "--pidfile=", "--logfile",
                   os.path.join(self.directory, f"{node}.log"),
                   "sslshare", "--config", self.paths[node]]
        self.processes[node] = reactor.spawnProcess(
            process, command[0], command, env=os.environ)
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
        from twisted.internet.defer import gatherResults

        return gatherResults(
            [self.stop(node) for node in list(self.services)]
            + [self.kill(node, "TERM") for node in list(self.processes)])


def connect_without_certificate(port, ca_cert):
    """
    Open TLS to C{port} of 127.0.0.1 with no client certificate (a node's
    peer channel refuses it).  Blocking: run it in a thread.
    """
    context = ssl.create_default_context(cafile=ca_cert)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass


async def scrape_metrics(port):
    """
    C{curl} the metrics page on C{port} of 127.0.0.1, and parse it with
    prometheus_client's parser.

    @return: sample name -> {frozenset of label items: value}.
    """
    from prometheus_client.parser import text_string_to_metric_families
    from twisted.internet.utils import getProcessOutputAndValue

    output, error, code = await getProcessOutputAndValue(
        "curl", ["--silent", "--show-error", "--fail", "--max-time", "10",
                 f"http://127.0.0.1:{port}/metrics"], env=os.environ)
    if code != 0:
        raise AssertionError(f"curl failed ({code}): {error.decode()}")
    samples = {}
    for family in text_string_to_metric_families(output.decode("utf-8")):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[
                frozenset(sample.labels.items())] = sample.value
    return samples


class Trickle(Protocol):
    """
    Answers the first bytes it gets with C{factory.chunks} copies of them,
    one every C{factory.interval} seconds, then closes: a transfer that
    takes a while.
    """

    def dataReceived(self, data):
        if getattr(self, "_sending", None) is not None:
            return
        self.factory.transfers.put(self)
        self._sending = LoopingCall(self._send, data, iter(range(self.factory.chunks)))
        self._sending.start(self.factory.interval, now=False)

    def _send(self, data, remaining):
        if next(remaining, None) is None:
            self._sending.stop()
            self.transport.loseConnection()
        else:
            self.transport.write(data)

    def connectionLost(self, reason):
        sending = getattr(self, "_sending", None)
        if sending is not None and sending.running:
            sending.stop()


class TrickleFactory(Factory):
    """
    A backend of L{Trickle}s; C{transfers.get()} fires when the next one
    starts.
    """

    protocol = Trickle

    def __init__(self, chunks=10, interval=0.1):
        self.chunks = chunks
        self.interval = interval
        self.transfers = DeferredQueue()


class _NodeProcess(ProcessProtocol):
    def __init__(self):
        self.ended = Deferred()

    def processEnded(self, reason):
        self.ended.callback(None)


def until(predicate, timeout=10.0):
    """
    Fires once C{predicate()} holds, asked every 20 ms on the reactor;
    fails after C{timeout} seconds.
    """
    async def poll():
        deadline = reactor.seconds() + timeout
        while not predicate():
            if reactor.seconds() > deadline:
                raise AssertionError("the condition did not come true in time")
            await deferLater(reactor, 0.02, lambda: None)

    return Deferred.fromCoroutine(poll())


async def wait_for_port(port, ended=None, timeout=20.0):
    """
    Wait until something listens on C{port} of 127.0.0.1.

    @param ended: a Deferred that fires if the process meant to listen
        ends first.
    """
    deadline = reactor.seconds() + timeout
    while reactor.seconds() < deadline:
        if ended is not None and ended.called:
            raise AssertionError(f"the process for port {port} ended")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            await deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"nothing listened on port {port} in {timeout} s")



# The Python driver a node reaches each kind of server with.
SERVER_DRIVERS = {"redis": "redis", "postgres": "psycopg"}

_shared_servers = {}


def skip_without(kind, server=True):
    """
    Skip the running test unless the driver of C{kind} (C{"redis"} or
    C{"postgres"}) can be imported and, with C{server}, the server's
    programs are installed: the L{SkipTest} says which is missing and how
    to install it.  Every test that needs either asks here (through
    L{shared_server} or L{throwaway_server} when it needs a server running).
    """
    try:
        importlib.import_module(SERVER_DRIVERS[kind])
    except ImportError as e:
        raise SkipTest(f"the {kind} driver is not installed (pip install "
                       f"'sslshare[{kind}]'): {e}") from None
    if not server:
        return
    try:
        if kind == "redis":
            redis_server_binary()
        else:
            postgres_binaries()
    except ServerUnavailable as e:
        raise SkipTest(str(e)) from None


def _made_or_skipped(kind, **options):
    skip_without(kind)
    try:
        return (RedisServer(**options) if kind == "redis"
                else PostgresServer(**options))
    except ServerUnavailable as e:
        # Found, but cannot run here (root without a user to run as).
        raise SkipTest(str(e)) from None


def shared_server(kind):
    """
    The server of C{kind} (C{"redis"} or C{"postgres"}, PostgreSQL with
    TLS) that every test of this process may use, started on first use and
    removed when the process exits.  Tests keep to their own keys and rows,
    and never stop it (a test that stops its server has its own, from
    L{throwaway_server}).

    @raise SkipTest: as L{skip_without} says.
    """
    if kind not in _shared_servers:
        options = {"tls": pki()} if kind == "postgres" else {}
        server = _made_or_skipped(kind, **options)
        atexit.register(server.remove)
        _shared_servers[kind] = server.start()
    return _shared_servers[kind]


def throwaway_server(testcase, kind, **options):
    """
    A server of C{kind} of C{testcase}'s own, made with C{options} (those of
    L{RedisServer} or L{PostgresServer}) but not started, and removed when
    the test ends.

    @raise SkipTest: as L{skip_without} says.
    """
    server = _made_or_skipped(kind, **options)
    testcase.addCleanup(server.remove)
    return server


def umask_for_test(testcase, mask):
    """
    Set the process's umask to C{mask} until C{testcase} ends: files made
    meanwhile get exactly the mode their maker asks for, unless the maker
    sets it itself.
    """
    testcase.addCleanup(os.umask, os.umask(mask))


def file_mode(path) -> int:
    """
    The permission bits of C{path}.
    """
    return stat.S_IMODE(os.stat(path).st_mode)


def resident_bytes(pid: int | str = "self") -> int:
    """
    The resident set size (C{VmRSS}) of process C{pid} (this one by
    default), in bytes.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_descriptors() -> int:
    """
    How many file descriptors this process has open.
    """
    return len(os.listdir("/proc/self/fd"))


def _my_tcp_sockets():
    """
    This process's IPv4 TCP sockets, as C{(local, remote, state)} in the
    kernel's hex notation (C{0100007F:1F90}; state C{01} established,
    C{08} close-wait, C{0A} listening).
    """
    mine = set()
    for descriptor in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{descriptor}")
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[len("socket:["):-1])
    with open("/proc/self/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[9] in mine:
                yield fields[1], fields[2], fields[3]


def _loopback(port: int) -> str:
    return f"0100007F:{port:04X}"


def connections_to(port: int) -> int:
    """
    How many TCP connections this process has open to C{port} of
    127.0.0.1.
    """
    return sum(1 for _, remote, state in _my_tcp_sockets()
               if remote == _loopback(port) and state == "01")


def accepted_on(port: int) -> int:
    """
    How many connections this process holds that it accepted on C{port} of
    127.0.0.1, in any state but listening (close-wait included).
    """
    return sum(1 for local, _, state in _my_tcp_sockets()
               if local == _loopback(port) and state != "0A")


@implementer(ICommandHandler)
class StallingHandler:
    """
    A peer that takes every FetchSession and never answers it (C{fetches}
    keeps their Deferreds); with C{everything}, a peer that answers no
    command but Stats (C{unanswered} keeps the others'), as one whose
    process hangs once its links are up.
    """

    def __init__(self, everything=False):
        self.everything = everything
        self.fetches = []
        self.unanswered = []

    def _answer(self, value):
        if not self.everything:
            return value
        waiting = Deferred()
        self.unanswered.append(waiting)
        return waiting

    def fetch_session(self, session_id, requester, terms=None):
        waiting = Deferred()
        self.fetches.append(waiting)
        return waiting

    def checkpoint(self, session_id, seq, digest, requester):
        return self._answer(True)

    def purge(self, session_id, requester):
        return self._answer(False)

    def backup(self, session_id, sealed, requester):
        return self._answer(False)

    def stats(self):
        # The Stats responder answers at once, whatever its handler is.
        return {}


class SilentListener:
    """
    Listens on C{port} of 127.0.0.1, accepts every connection and never
    says a word: a peer whose network stalls.  L{stop} also drops the
    connections it accepted, which stopping to listen alone would keep.
    """

    def __init__(self, port):
        factory = Factory.forProtocol(Protocol)
        self.accepted = _tracked(factory)
        self.listening = reactor.listenTCP(port, factory, interface="127.0.0.1")

    def stop(self):
        _abort_all(self.accepted)
        return self.listening.stopListening()


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
    endpoint = wrapClientTLS(tls, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    return connectProtocol(endpoint, _HeldAmpClient(data))


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
