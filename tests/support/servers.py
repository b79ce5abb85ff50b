"""
Servers and peers on 127.0.0.1 for a test to talk to: engine contexts that
share sessions, backends (an echo, a slow one), and peers that misbehave
(one that never answers, one that never speaks, one that answers what the
real one never would).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import weakref

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.protocols import amp
from zope.interface import implementer

from sslshare import sessionid, tls
from sslshare.cluster import ICommandHandler, PeerServerFactory
from sslshare.protocol import SessionResumingTLSFactory
from tests.support.sessions import found_in

# A TLSServer answers lookups this late, so that each handshake waits on its
# lookup as it does on one over the network.
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
        self._sending = LoopingCall(self._send, data,
                                    iter(range(self.factory.chunks)))
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

    def purge(self, session_id, requester, successor=None):
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
        self.listening = reactor.listenTCP(port, factory,
                                           interface="127.0.0.1")

    def stop(self):
        _abort_all(self.accepted)
        return self.listening.stopListening()


def haproxy(testcase, configuration):
    """
    HAProxy running C{configuration} (the text of its file) in the
    foreground; stopped when the test ends.  Skips the test when HAProxy
    is not installed.
    """
    from twisted.trial.unittest import SkipTest

    binary = shutil.which("haproxy") or shutil.which("/usr/sbin/haproxy")
    if binary is None:
        raise SkipTest("haproxy is not installed (Debian: apt-get install "
                       "haproxy; make test installs it)")
    directory = testcase.mktemp()
    os.makedirs(directory)
    path = os.path.join(directory, "haproxy.cfg")
    with open(path, "w") as f:
        f.write(configuration)
    process = subprocess.Popen([binary, "-f", path, "-db"],
                               stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    testcase.addCleanup(process.wait, 10)
    testcase.addCleanup(process.terminate)
    return process
