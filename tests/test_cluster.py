"""
The node-to-node channel (L{sslshare.cluster}) over real sockets on
127.0.0.1: certificates from L{pki.init_pki}, nodes that fetch from each
other, and everyone who must be refused: another CA, another cluster, no
certificate, a command the peer may not run, a peer that answers garbage.
"""

from __future__ import annotations

import functools
import os
import socket
import ssl
from collections import Counter

from twisted.internet import reactor
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    gatherResults,
    inlineCallbacks,
)
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from sslshare import cluster
from sslshare.cluster import (
    BATCH_WINDOW,
    MAX_ITEMS,
    MAX_ITEMS_BYTES,
    Backup,
    BadRequest,
    Checkpoint,
    ClusterTLS,
    ClusterTLSError,
    Deliver,
    FetchAnswer,
    FetchSession,
    HandlerFault,
    NotAuthorized,
    Outbox,
    PeerLink,
    PeerProtocolError,
    Peers,
    PeerUnavailable,
    Purge,
    fetch_from,
    stats_from,
)
from sslshare.cluster._commands import pack_item, unpack_items
from sslshare.dev import pki
from sslshare.dev.throwaway import free_port
from sslshare.state import MAX_SEALED_LENGTH, StateKeys
from tests.support.clients import held_amp_client
from tests.support.servers import RoguePeerProtocol
from tests.support.sessions import session_id_of
from tests.support.waiting import until

NODES = ("node1", "node2", "node3")
# Reconnect fast: the tests restart servers and wait for the links.
FAST_RETRY = lambda attempt: 0.02  # noqa: E731


# Session ids of this module's cluster, "demo".
_session_id = functools.partial(session_id_of, cluster="demo")


def _allow_all(command, node_id):
    return True


@implementer(cluster.ICommandHandler)
class RecordingHandler:
    """
    A node's side of the commands, in memory: every call is recorded with
    the requester the channel named.
    """

    def __init__(self):
        self.calls = []
        self.sealed = {}
        self.holders = {}
        self.pending = None

    def fetch_session(self, session_id, requester, terms=None):
        self.calls.append(("fetch_session", session_id, requester))
        if self.pending is not None:
            return self.pending
        if session_id in self.sealed:
            return FetchAnswer("found", self.sealed.pop(session_id))
        if session_id in self.holders:
            return FetchAnswer("redirect", holder=self.holders[session_id])
        return FetchAnswer("missing")

    def checkpoint(self, session_id, seq, digest, requester):
        self.calls.append(("checkpoint", session_id, seq, digest, requester))
        return True

    def purge(self, session_id, requester, successor=None):
        self.calls.append(("purge", session_id, requester)
                          + (() if successor is None else (successor,)))
        return False

    def backup(self, session_id, sealed, requester):
        self.calls.append(("backup", session_id, sealed, requester))
        if sealed == b"explode":
            raise RuntimeError("the handler failed")
        return True

    def stats(self):
        return {"sessions": 3, "ratio": 0.5}


class Node:
    """
    One node's AMP listener on 127.0.0.1, built the way the service builds
    it: a server endpoint string, and the factory wrapped in TLS.
    """

    def __init__(self, testcase, tls, handler, allowed=_allow_all,
                 keys=None, **options):
        self.testcase = testcase
        self.tls = tls
        self.handler = handler
        options.setdefault("peers", NODES)
        keys = keys or testcase.keys
        self.factory = cluster.PeerServerFactory(handler, tls.cluster, tls.node_id,
                                                 allowed, keys=lambda: keys,
                                                 **options)
        self.port = None
        self.listening = None
        testcase.addCleanup(self.stop)

    @inlineCallbacks
    def start(self, factory=None):
        self.wrapper = TLSMemoryBIOFactory(
            self.tls.server_options(self.factory.admit), False,
            factory or self.factory)
        port = self.port or 0
        self.listening = yield serverFromString(
            reactor, f"tcp:{port}:interface=127.0.0.1").listen(self.wrapper)
        self.port = self.listening.getHost().port

    @property
    def endpoint(self):
        return f"tcp:host=127.0.0.1:port={self.port}"

    @inlineCallbacks
    def stop(self):
        if self.listening is not None:
            listening, self.listening = self.listening, None
            yield listening.stopListening()
            for protocol in list(self.wrapper.protocols):
                protocol.abortConnection()
            yield until(lambda: not self.wrapper.protocols)


class ClusterTestCase(TestCase):
    """
    A PKI for cluster C{demo} (nodes 1-3) per test, and helpers to run
    nodes and links on it.
    """

    def setUp(self):
        self.pki = pki.init_pki(self.mktemp(), "demo", NODES)
        self.keys = StateKeys([StateKeys.generate()])
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def cluster_tls(self, node_id, files=None, ca=None, cluster_name="demo"):
        files = files or self.pki.node(node_id)
        return ClusterTLS(ca or self.pki.ca_certificate, files.certificate,
                          files.key, cluster_name, node_id)

    @inlineCallbacks
    def node(self, node_id="node1", handler=None, **options):
        node = Node(self, self.cluster_tls(node_id), handler or RecordingHandler(),
                    **options)
        yield node.start()
        return node

    def link(self, from_node, to_node, endpoint, tls=None, keys=None):
        keys = keys or self.keys
        link = PeerLink(to_node, endpoint, tls or self.cluster_tls(from_node),
                        keys=lambda: keys, retry_policy=FAST_RETRY)
        link.startService()
        self.addCleanup(link.stopService)
        return link

    @inlineCallbacks
    def connected_link(self, from_node, to_node, endpoint, keys=None):
        link = self.link(from_node, to_node, endpoint, keys=keys)
        yield link.when_connected(fail_after_failures=3)
        return link

    def logged(self, text):
        """
        The log events whose format contains C{text}.
        """
        return [event for event in self.events
                if text in (event.get("log_format") or "")]


class LinkedTestCase(ClusterTestCase):
    """
    node2's link to node1 is up (C{link2}) when each test starts.
    """

    @inlineCallbacks
    def setUp(self):
        super().setUp()
        self.server = yield self.node("node1")
        self.link2 = yield self.connected_link("node2", "node1",
                                               self.server.endpoint)


class FetchTests(LinkedTestCase):
    """
    A node fetches sessions from its peer through a L{PeerLink}.
    """

    @inlineCallbacks
    def test_node_fetches_a_sealed_session_from_its_peer(self):
        session_id = _session_id()
        self.server.handler.sealed[session_id] = b"sealed state"
        answer = yield fetch_from(self.link2, session_id)
        self.assertEqual(answer, FetchAnswer("found", b"sealed state"))

    @inlineCallbacks
    def test_requester_is_the_node_its_certificate_names(self):
        link3 = yield self.connected_link("node3", "node1", self.server.endpoint)
        session_id = _session_id()
        yield fetch_from(self.link2, session_id)
        yield fetch_from(link3, session_id)
        self.assertEqual([call[2] for call in self.server.handler.calls],
                         ["node2", "node3"])

    @inlineCallbacks
    def test_redirect_names_the_holder(self):
        session_id = _session_id()
        self.server.handler.holders[session_id] = "node3"
        answer = yield fetch_from(self.link2, session_id)
        self.assertEqual(answer, FetchAnswer("redirect", holder="node3"))

    @inlineCallbacks
    def test_unknown_session_is_missing(self):
        answer = yield fetch_from(self.link2, _session_id())
        self.assertEqual(answer, FetchAnswer("missing"))

    @inlineCallbacks
    def test_checkpoint_reaches_the_handler(self):
        session_id = _session_id()
        response = yield self.link2.call(Checkpoint, session_id=session_id,
                                         seq=7, digest=b"d" * 32)
        self.assertEqual(response, {"accepted": True})
        self.assertEqual(self.server.handler.calls,
                         [("checkpoint", session_id, 7, b"d" * 32, "node2")])

    @inlineCallbacks
    def test_purge_answers_what_the_handler_says(self):
        response = yield self.link2.call(Purge, session_id=_session_id())
        self.assertEqual(response, {"removed": False})

    @inlineCallbacks
    def test_purge_names_the_holder_to_the_handler(self):
        session_id = _session_id()
        yield self.link2.call(Purge, session_id=session_id, holder="node3")
        yield self.link2.outbox.add(Purge, session_id=session_id,
                                    holder="node3")
        self.assertEqual(self.server.handler.calls,
                         [("purge", session_id, "node2", "node3")] * 2)

    @inlineCallbacks
    def test_purge_naming_no_node_is_a_bad_request(self):
        yield self.assertFailure(
            self.link2.call(Purge, session_id=_session_id(), holder="Node 3"),
            BadRequest)
        self.assertEqual(self.server.handler.calls, [])

    @inlineCallbacks
    def test_stats_carry_the_handler_counters_and_the_channel_counters(self):
        counters = yield stats_from(self.link2)
        self.assertEqual(counters["sessions"], 3)
        self.assertEqual(counters["ratio"], 0.5)
        self.assertEqual(counters["cluster.connections"], 1)
        self.assertEqual(counters["cluster.commands:Stats"], 1)

    @inlineCallbacks
    def test_cancelled_fetch_fails_with_cancelled_error(self):
        self.server.handler.pending = Deferred()
        fetching = fetch_from(self.link2, _session_id())
        yield until(lambda: self.server.handler.calls)
        fetching.cancel()
        yield self.assertFailure(fetching, CancelledError)
        # The late answer is dropped and the link stays usable.
        self.server.handler.pending.callback(FetchAnswer("missing"))
        self.server.handler.pending = None
        answer = yield fetch_from(self.link2, _session_id())
        self.assertEqual(answer.status, "missing")

    @inlineCallbacks
    def test_peers_fetch_session_goes_through_the_named_link(self):
        peers = Peers([("node1", self.server.endpoint),
                       ("node3", "tcp:host=127.0.0.1:port=1")],
                      self.cluster_tls("node2"), keys=lambda: self.keys,
                      retry_policy=FAST_RETRY)
        peers.startService()
        self.addCleanup(peers.stopService)
        yield peers.link("node1").when_connected(fail_after_failures=3)
        answer = yield peers.fetch_session("node1", _session_id())
        self.assertEqual(answer.status, "missing")
        self.assertEqual(peers.connected_count(), 1)

    def test_peers_fetch_from_a_node_that_is_not_a_peer_fails_at_once(self):
        peers = Peers([], self.cluster_tls("node2"), keys=lambda: self.keys)
        failure = self.failureResultOf(peers.fetch_session("node7", _session_id()))
        failure.trap(PeerUnavailable)


class DeliverTests(ClusterTestCase):
    """
    What a node has for a peer goes in one L{Deliver}, whose items run in
    order, each as its own command would, and answer one by one.
    """

    @inlineCallbacks
    def setUp(self):
        super().setUp()

        def allowed(command, node_id):
            return not (command == "Purge" and node_id == "node3")

        self.server = yield self.node("node1", allowed=allowed)
        self.link2 = yield self.connected_link("node2", "node1",
                                               self.server.endpoint)

    @inlineCallbacks
    def test_items_of_one_turn_go_in_one_command_and_run_in_order(self):
        first, second = _session_id(), _session_id()
        answers = yield gatherResults([
            self.link2.outbox.add(Backup, session_id=first, sealed=b"copy"),
            self.link2.outbox.add(Checkpoint, session_id=first, seq=3,
                                  digest=b"d" * 32),
            self.link2.outbox.add(Purge, session_id=second)])
        self.assertEqual(answers, [True, True, False])
        self.assertEqual(self.server.handler.calls, [
            ("backup", first, b"copy", "node2"),
            ("checkpoint", first, 3, b"d" * 32, "node2"),
            ("purge", second, "node2")])
        counters = self.server.factory.counters
        self.assertEqual((counters["commands:Deliver"], counters["items:Backup"],
                          counters["items:Checkpoint"], counters["items:Purge"]),
                         (1, 1, 1, 1))

    @inlineCallbacks
    def test_peers_backup_checkpoint_and_purge_are_delivered(self):
        peers = Peers([("node1", self.server.endpoint)],
                      self.cluster_tls("node2"), keys=lambda: self.keys,
                      retry_policy=FAST_RETRY)
        peers.startService()
        self.addCleanup(peers.stopService)
        yield peers.link("node1").when_connected(fail_after_failures=3)
        session_id = _session_id("node2")
        answers = yield gatherResults([
            peers.backup_session("node1", session_id, b"copy"),
            peers.checkpoint_session("node1", session_id, 1, b""),
            peers.purge_session("node1", session_id)])
        self.assertEqual(answers, [True, True, False])
        self.assertEqual(self.server.factory.counters["commands:Deliver"], 1)

    @inlineCallbacks
    def test_refused_item_fails_and_the_others_run(self):
        link3 = yield self.connected_link("node3", "node1", self.server.endpoint)
        session_id = _session_id()
        purging = link3.outbox.add(Purge, session_id=session_id)
        keeping = link3.outbox.add(Backup, session_id=session_id, sealed=b"c")
        again = link3.outbox.add(Purge, session_id=session_id)
        yield self.assertFailure(purging, NotAuthorized)
        self.assertTrue((yield keeping))
        yield self.assertFailure(again, NotAuthorized)
        self.assertEqual(self.server.handler.calls,
                         [("backup", session_id, b"c", "node3")])
        # Refused once per command, however many items name it.
        self.assertEqual(self.server.factory.counters["refused_commands"], 1)
        [event] = self.logged("not authorized")
        self.assertEqual((event["peer"], event["command"]), ("node3", "Purge"))

    @inlineCallbacks
    def test_handler_failure_fails_its_item_alone(self):
        session_id = _session_id()
        failing = self.link2.outbox.add(Backup, session_id=session_id,
                                        sealed=b"explode")
        after = self.link2.outbox.add(Purge, session_id=session_id)
        yield self.assertFailure(failing, amp.UnknownRemoteError)
        self.assertFalse((yield after))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_arguments_out_of_bounds_fail_before_anything_is_sent(self):
        failure = self.failureResultOf(self.link2.outbox.add(
            Checkpoint, session_id=_session_id(), seq=1, digest=b"d" * 16))
        failure.trap(BadRequest)
        self.failureResultOf(self.link2.outbox.add(
            Purge, session_id=b"short")).trap(BadRequest)

    @inlineCallbacks
    def test_items_before_a_fetch_reach_the_peer_before_it(self):
        session_id = _session_id()
        purging = self.link2.outbox.add(Purge, session_id=session_id)
        yield fetch_from(self.link2, session_id)
        yield purging
        self.assertEqual([call[0] for call in self.server.handler.calls],
                         ["purge", "fetch_session"])


class _AnsweringLink:
    """
    What an L{Outbox} uses of its L{PeerLink}: every L{Deliver} it sends
    waits in C{sent} for the test to answer.
    """

    peer_node_id = "node1"
    node_id = "node2"

    def __init__(self):
        self.connected = True
        self.counters = Counter()
        self.sent = []

    def call(self, command, **arguments):
        waiting = Deferred()
        self.sent.append((command, arguments["items"], waiting))
        return waiting

    def answer(self, index, outcomes):
        self.sent[index][2].callback({"outcomes": outcomes})


class OutboxTests(SynchronousTestCase):
    """
    An L{Outbox} on a L{Clock}: when its items leave, and how many go at
    once.
    """

    def setUp(self):
        self.clock = Clock()
        self.link = _AnsweringLink()
        self.outbox = Outbox(self.link, self.clock)
        self.session_id = _session_id()

    def add(self):
        return self.outbox.add(Purge, session_id=self.session_id)

    def test_items_leave_at_the_end_of_the_turn_in_one_command(self):
        answers = [self.add(), self.add()]
        self.assertEqual(self.link.sent, [])
        self.clock.advance(0)
        [(command, items, _)] = self.link.sent
        self.assertIs(command, Deliver)
        self.assertEqual(len(unpack_items(items)), 2)
        self.link.answer(0, b"\x01\x00")
        self.assertEqual([self.successResultOf(a) for a in answers],
                         [True, False])

    def test_while_a_command_is_unanswered_items_wait_for_its_answer(self):
        self.add()
        self.clock.advance(0)
        later = self.add()
        self.clock.advance(BATCH_WINDOW / 2)
        self.assertEqual(len(self.link.sent), 1)
        self.link.answer(0, b"\x01")
        self.clock.advance(0)
        self.assertEqual(len(self.link.sent), 2)
        self.link.answer(1, b"\x00")
        self.assertFalse(self.successResultOf(later))

    def test_no_item_waits_longer_than_the_window(self):
        self.add()
        self.clock.advance(0)
        self.add()
        self.clock.advance(BATCH_WINDOW)
        self.assertEqual(len(self.link.sent), 2)

    def test_a_full_command_leaves_at_once(self):
        for _ in range(MAX_ITEMS + 1):
            self.add()
        self.assertEqual(len(self.link.sent), 1)
        self.assertEqual(len(unpack_items(self.link.sent[0][1])), MAX_ITEMS)

    def test_a_wrong_number_of_outcomes_fails_every_item(self):
        answers = [self.add(), self.add()]
        self.clock.advance(0)
        self.link.answer(0, b"\x01")
        for answer in answers:
            self.failureResultOf(answer).trap(PeerProtocolError)

    def test_an_unknown_outcome_fails_its_item(self):
        answers = [self.add(), self.add()]
        self.clock.advance(0)
        self.link.answer(0, b"?\x01")
        self.failureResultOf(answers[0]).trap(PeerProtocolError)
        self.assertTrue(self.successResultOf(answers[1]))

    def test_a_link_that_is_down_fails_at_once(self):
        self.link.connected = False
        self.failureResultOf(self.add()).trap(PeerUnavailable)
        self.assertEqual(self.link.counters["unavailable"], 1)

    def test_a_failed_command_fails_every_item(self):
        answers = [self.add(), self.add()]
        self.clock.advance(0)
        self.link.sent[0][2].errback(PeerUnavailable("node1", "lost"))
        for answer in answers:
            self.failureResultOf(answer).trap(PeerUnavailable)


class ItemTests(SynchronousTestCase):
    """
    L{pack_item} and L{unpack_items}: what one end packs the other reads
    back, checked as the commands' own arguments are.
    """

    def test_every_kind_reads_back_as_packed(self):
        session_id = _session_id()
        items = [(Backup, {"session_id": session_id, "sealed": b"s" * 300}),
                 (Checkpoint, {"session_id": session_id, "seq": 2 ** 40,
                               "digest": b"d" * 32}),
                 (Checkpoint, {"session_id": session_id, "seq": 0,
                               "digest": b""}),
                 (Purge, {"session_id": session_id, "holder": None}),
                 (Purge, {"session_id": session_id, "holder": "node-3"})]
        packed = b"".join(pack_item(command, arguments)
                          for command, arguments in items)
        self.assertEqual(unpack_items(packed), items)

    def test_a_bad_item_names_its_place_and_command(self):
        packed = (pack_item(Purge, {"session_id": _session_id()})
                  + b"C\x20" + _session_id() + bytes(8) + b"\x05ddddd")
        with self.assertRaises(BadRequest) as raised:
            unpack_items(packed)
        self.assertIn("item 2 (Checkpoint)", str(raised.exception))

    def test_a_holder_that_is_no_node_id_is_refused(self):
        for holder in (b"N\xffde", b"-node", b"n" * 65):
            packed = (b"P\x20" + _session_id() + bytes((len(holder),))
                      + holder)
            with self.assertRaises(BadRequest) as raised:
                unpack_items(packed)
            self.assertIn("item 1 (Purge): holder", str(raised.exception))

    def test_the_largest_items_fit_one_command(self):
        item = pack_item(Backup, {"session_id": _session_id(),
                                  "sealed": b"s" * MAX_SEALED_LENGTH})
        self.assertLessEqual(len(item) * 3, MAX_ITEMS_BYTES)


class BadRequestTests(LinkedTestCase):
    """
    Arguments out of bounds are refused before the handler sees them.
    """

    @inlineCallbacks
    def test_session_id_of_31_bytes_is_a_bad_request(self):
        yield self.assertFailure(
            self.link2.call(FetchSession, session_id=_session_id()[:31]), BadRequest)
        self.assertEqual(self.server.handler.calls, [])
        self.assertEqual(self.server.factory.counters["bad_requests"], 1)

    @inlineCallbacks
    def test_digest_of_16_bytes_is_a_bad_request(self):
        yield self.assertFailure(
            self.link2.call(Checkpoint, session_id=_session_id(), seq=1,
                            digest=b"d" * 16),
            BadRequest)
        self.assertEqual(self.server.handler.calls, [])

    @inlineCallbacks
    def test_negative_seq_is_a_bad_request(self):
        yield self.assertFailure(
            self.link2.call(Checkpoint, session_id=_session_id(), seq=-1,
                            digest=b""),
            BadRequest)
        self.assertEqual(self.server.handler.calls, [])

    def test_fetch_from_refuses_a_bad_session_id_without_asking(self):
        self.failureResultOf(fetch_from(self.link2, b"short"), BadRequest)


class HandlerFaultTests(ClusterTestCase):
    """
    What this node's own handler answers is checked before it goes out: an
    answer the channel cannot carry is a L{HandlerFault}, logged at the
    answering node, and never reaches the asker as if it were an answer.
    """

    @inlineCallbacks
    def _asked(self, handler, ask):
        server = yield self.node("node1", handler=handler)
        link = yield self.connected_link("node2", "node1", server.endpoint)
        yield self.assertFailure(ask(link), amp.UnknownRemoteError)
        self.assertEqual(len(self.flushLoggedErrors(HandlerFault)), 1)

    def test_a_found_answer_without_a_sealed_state_is_the_handlers_fault(self):
        handler = RecordingHandler()
        handler.pending = FetchAnswer("found")
        return self._asked(handler, lambda link: fetch_from(link, _session_id()))

    def test_an_answer_of_another_type_is_the_handlers_fault(self):
        handler = RecordingHandler()
        handler.pending = {"status": "found"}
        return self._asked(handler, lambda link: fetch_from(link, _session_id()))

    def test_counters_that_are_not_numbers_are_the_handlers_fault(self):
        handler = RecordingHandler()
        handler.stats = lambda: {"sessions": "many"}
        return self._asked(handler, stats_from)


class AuthorizationTests(ClusterTestCase):
    """
    An authenticated node that asks for a command it may not run.
    """

    @inlineCallbacks
    def setUp(self):
        super().setUp()

        def allowed(command, node_id):
            return not (command == "Purge" and node_id == "node2")

        self.server = yield self.node("node1", allowed=allowed)
        self.link2 = yield self.connected_link("node2", "node1", self.server.endpoint)

    @inlineCallbacks
    def test_command_not_allowed_is_refused_and_counted(self):
        yield self.assertFailure(self.link2.call(Purge, session_id=_session_id()),
                                 NotAuthorized)
        self.assertEqual(self.server.factory.counters["refused_commands"], 1)

    @inlineCallbacks
    def test_handler_is_not_called_for_a_refused_command(self):
        yield self.assertFailure(self.link2.call(Purge, session_id=_session_id()),
                                 NotAuthorized)
        self.assertEqual(self.server.handler.calls, [])

    @inlineCallbacks
    def test_refusal_is_logged_with_peer_and_command(self):
        yield self.assertFailure(self.link2.call(Purge, session_id=_session_id()),
                                 NotAuthorized)
        [event] = self.logged("not authorized")
        self.assertEqual((event["peer"], event["command"]), ("node2", "Purge"))

    @inlineCallbacks
    def test_allowed_command_still_runs(self):
        yield self.assertFailure(self.link2.call(Purge, session_id=_session_id()),
                                 NotAuthorized)
        answer = yield fetch_from(self.link2, _session_id())
        self.assertEqual(answer.status, "missing")

    @inlineCallbacks
    def test_another_node_may_run_the_command(self):
        link3 = yield self.connected_link("node3", "node1", self.server.endpoint)
        response = yield link3.call(Purge, session_id=_session_id())
        self.assertEqual(response, {"removed": False})


def _refused(result):
    """
    Whether a L{_stock_client_attempt} met the server's refusal: a TLS
    alert, not an answer nor a connection that merely ended.
    """
    return isinstance(result, ssl.SSLError) and "ALERT" in str(result.reason)


def _stock_client_attempt(port, ca, certificate=None, key=None):
    """
    A handshake with Python's C{ssl}, verifying the server's chain only,
    then a whole AMP box asking for L{cluster.Stats}, which the server
    answers to any peer it accepts, and one read.  Returns the bytes read
    or the exception met.  Blocking.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    context.check_hostname = False
    if certificate:
        context.load_cert_chain(certificate, key)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with context.wrap_socket(raw) as client:
                # With TLS 1.3 the server judges our certificate after our
                # side of the handshake is done: its verdict comes here.
                client.sendall(amp.AmpBox(_command=b"Stats",
                                          _ask=b"1").serialize())
                return client.recv(1024)
    except (ssl.SSLError, OSError) as e:
        return e


class RefusedConnectionTests(ClusterTestCase):
    """
    Who may not connect at all.
    """

    @inlineCallbacks
    def setUp(self):
        super().setUp()
        self.server = yield self.node("node1")

    def _intruder_files(self, node_id="node2"):
        other = pki.init_pki(self.mktemp(), "demo", [node_id])
        # The intruder trusts our CA, so that it accepts our server and our
        # server alone decides.
        bundle = os.path.join(other.directory, "both-cas.pem")
        with open(bundle, "wb") as out:
            for path in (self.pki.ca_certificate, other.ca_certificate):
                with open(path, "rb") as f:
                    out.write(f.read())
        return other, bundle

    @inlineCallbacks
    def test_node_with_certificate_from_another_ca_is_refused(self):
        other, bundle = self._intruder_files()
        intruder = self.cluster_tls("node2", files=other.node("node2"), ca=bundle)
        self.link("node2", "node1", self.server.endpoint, tls=intruder)
        counters = self.server.factory.counters
        yield until(lambda: counters["refused_connections"] >= 1)
        self.assertEqual(counters["connections"], 0)
        self.assertEqual(self.server.handler.calls, [])

    @inlineCallbacks
    def test_refusal_by_the_server_is_a_failed_attempt_for_the_link(self):
        # TLS 1.3: the refusal arrives as an alert after the client's side
        # of the handshake; the link must not take it for a working peer.
        other, bundle = self._intruder_files()
        intruder = self.cluster_tls("node2", files=other.node("node2"), ca=bundle)
        link = self.link("node2", "node1", self.server.endpoint, tls=intruder)
        yield until(lambda: link.counters["failed_attempts"] >= 2)
        self.assertFalse(link.connected)

    @inlineCallbacks
    def test_stock_client_attempt_of_a_peer_is_answered(self):
        # What makes the refusals below mean something: the same attempt
        # with a peer's certificate gets an answer.
        node2 = self.pki.node("node2")
        result = yield deferToThread(
            _stock_client_attempt, self.server.port, self.pki.ca_certificate,
            node2.certificate, node2.key)
        self.assertIsInstance(result, bytes)
        self.assertIn(b"_answer", result)

    @inlineCallbacks
    def test_refused_connection_is_logged_with_the_reason(self):
        other, bundle = self._intruder_files()
        result = yield deferToThread(
            _stock_client_attempt, self.server.port, bundle,
            other.node("node2").certificate, other.node("node2").key)
        self.assertTrue(_refused(result), f"the server answered an intruder: "
                                          f"{result!r}")
        [event] = self.logged("refused connection")
        self.assertIn("not issued by the cluster CA", event["reason"])

    @inlineCallbacks
    def test_client_without_certificate_is_refused(self):
        result = yield deferToThread(_stock_client_attempt, self.server.port,
                                     self.pki.ca_certificate)
        self.assertTrue(_refused(result), f"the server answered a client "
                                          f"without a certificate: {result!r}")
        self.assertEqual(self.server.factory.counters["refused_connections"], 1)

    @inlineCallbacks
    def test_node_of_another_cluster_is_refused(self):
        # Same CA, but the certificate names a node of cluster "other".
        node9 = pki.add_node(self.pki.directory, "other", "node9")
        result = yield deferToThread(_stock_client_attempt, self.server.port,
                                     self.pki.ca_certificate, node9.certificate,
                                     node9.key)
        self.assertTrue(_refused(result), f"the server answered another "
                                          f"cluster's node: {result!r}")
        self.assertEqual(self.server.factory.counters["refused_connections"], 1)
        [event] = self.logged("refused connection")
        self.assertIn("sslshare://other/node9", event["reason"])

    @inlineCallbacks
    def test_client_certificate_without_node_uri_is_refused(self):
        # The client-facing server certificate is from the same CA, but it
        # names no node (and is not meant for client authentication).
        result = yield deferToThread(_stock_client_attempt, self.server.port,
                                     self.pki.ca_certificate, self.pki.server_chain,
                                     self.pki.server_key)
        self.assertTrue(_refused(result), repr(result))
        self.assertEqual(self.server.factory.counters["refused_connections"], 1)

    @inlineCallbacks
    def test_connection_without_handshake_is_dropped(self):
        node = yield self.node("node1", handshake_timeout=0.05)
        raw = socket.create_connection(("127.0.0.1", node.port))
        self.addCleanup(raw.close)
        yield until(lambda: node.factory.counters["handshake_timeouts"] == 1)
        yield until(lambda: not node.wrapper.protocols)

    @inlineCallbacks
    def test_link_refuses_a_server_that_names_another_node(self):
        link = self.link("node2", "node3", self.server.endpoint)
        failure = yield self.assertFailure(
            link.when_connected(fail_after_failures=1), PeerUnavailable)
        self.assertIn("names sslshare://demo/node1, not sslshare://demo/node3",
                      str(failure))
        self.assertFalse(link.connected)


class AdmissionTests(ClusterTestCase):
    """
    Which nodes of the cluster may connect: its peers and itself, one host
    per node id.
    """

    @inlineCallbacks
    def test_node_of_the_cluster_that_is_no_peer_is_refused_at_handshake(self):
        server = yield self.node("node1", peers=["node2"])
        link = self.link("node3", "node1", server.endpoint)
        failure = yield self.assertFailure(
            link.when_connected(fail_after_failures=1), PeerUnavailable)
        self.assertFalse(link.connected)
        self.assertIn("alert", str(failure))
        counters = server.factory.counters
        yield until(lambda: counters["refused_nodes"] == 1)
        self.assertEqual((counters["connections"], counters["refused_connections"]),
                         (0, 0))
        [event] = self.logged("refused connection")
        self.assertEqual(event["reason"],
                         "node node3 is not a peer of node1 (cluster.peers)")

    @inlineCallbacks
    def test_node_may_ask_itself(self):
        # What `sslshare stats` does, with the node's own certificate.
        server = yield self.node("node1", peers=["node2"])
        link = yield self.connected_link("node1", "node1", server.endpoint)
        counters = yield stats_from(link)
        self.assertEqual(counters["cluster.connections"], 1)

    @inlineCallbacks
    def test_second_connection_for_a_node_id_from_another_host_is_refused(self):
        server = yield self.node("node1")
        first = yield self.connected_link("node2", "node1", server.endpoint)
        impostor = self.link("node2", "node1",
                             f"{server.endpoint}:bindAddress=127.0.0.2")
        yield self.assertFailure(
            impostor.when_connected(fail_after_failures=1), PeerUnavailable)
        counters = server.factory.counters
        yield until(lambda: counters["duplicate_nodes"] == 1)
        [event] = self.logged("refused connection")
        self.assertRegex(event["reason"],
                         r"^node node2 is connected from 127\.0\.0\.1:\d+ "
                         r"already, and 127\.0\.0\.2:\d+ claims its id too")
        self.assertEqual(event["address"].split(":")[0], "127.0.0.2")
        # The first one goes on.
        counters = yield stats_from(first)
        self.assertEqual(counters["cluster.connections"], 1)
        self.assertEqual(server.factory.connected_peers(), {"node2"})

    @inlineCallbacks
    def test_second_connection_for_a_node_id_from_the_same_host_is_let_in(self):
        # A node's own `sslshare stats` next to its link, or a node that
        # restarted before its old connection was seen to end.
        server = yield self.node("node1")
        yield self.connected_link("node2", "node1", server.endpoint)
        yield self.connected_link("node2", "node1", server.endpoint)
        self.assertEqual(server.factory.counters["connections"], 2)
        self.assertEqual(server.factory.counters["duplicate_nodes"], 0)


class BoxBoundTests(ClusterTestCase):
    """
    AMP keeps a box until its end; the channel bounds it as it arrives.
    """

    @inlineCallbacks
    def setUp(self):
        super().setUp()
        self.server = yield self.node("node1")

    @inlineCallbacks
    def _send(self, box):
        client = yield held_amp_client(
            self.server.port, self.cluster_tls("node2").client_options("node1"),
            box.serialize())
        client.read()
        yield client.closed
        return client

    @inlineCallbacks
    def test_box_of_more_keys_than_the_bound_ends_the_connection(self):
        box = amp.AmpBox(_command=b"Stats", _ask=b"1")
        box.update({b"k%d" % i: b"" for i in range(cluster.MAX_BOX_KEYS - 1)})
        client = yield self._send(box)
        self.assertEqual(client.boxes, 0)
        self.assertEqual(self.server.factory.counters["protocol_errors"], 1)
        [event] = self.logged("dropped")
        self.assertIn(f"more than {cluster.MAX_BOX_KEYS} keys", event["what"])

    @inlineCallbacks
    def test_box_of_more_bytes_than_the_bound_ends_the_connection(self):
        box = amp.AmpBox(_command=b"Stats", _ask=b"1")
        value = b"v" * 60000
        box.update({b"k%d" % i: value
                    for i in range(cluster.MAX_BOX_BYTES // len(value) + 1)})
        client = yield self._send(box)
        self.assertEqual(client.boxes, 0)
        self.assertEqual(self.server.factory.counters["protocol_errors"], 1)

    @inlineCallbacks
    def test_box_at_the_bounds_is_answered(self):
        box = amp.AmpBox(_command=b"Stats", _ask=b"1")
        box.update({b"k%d" % i: b"" for i in range(cluster.MAX_BOX_KEYS - 3)})
        box[b"junk"] = b"j" * 65535
        client = yield held_amp_client(
            self.server.port, self.cluster_tls("node2").client_options("node1"),
            box.serialize())
        client.read()
        yield until(lambda: client.boxes == 1)
        client.transport.loseConnection()
        self.assertEqual(self.server.factory.counters["protocol_errors"], 0)


class RefusalLogTests(ClusterTestCase):
    """
    What a remote can repeat at will is counted in full and logged at a
    bounded rate.
    """

    @inlineCallbacks
    def test_refused_commands_are_logged_at_a_bounded_rate(self):
        server = yield self.node(
            "node1", allowed=lambda command, node_id: command == "Stats")
        count = 500
        client = yield held_amp_client(
            server.port, self.cluster_tls("node2").client_options("node1"),
            b"".join(amp.AmpBox(_command=b"Purge", _ask=b"%d" % i,
                                session_id=_session_id()).serialize()
                     for i in range(count)))
        client.read()
        yield until(lambda: client.boxes == count)
        client.transport.loseConnection()
        self.assertEqual(server.factory.counters["refused_commands"], count)
        [event] = self.logged("refused {command}")
        self.assertEqual(event["command"], "Purge")

    @inlineCallbacks
    def test_one_kind_of_refusal_hides_no_other(self):
        server = yield self.node(
            "node1", allowed=lambda command, node_id: command == "Stats")
        client = yield held_amp_client(
            server.port, self.cluster_tls("node2").client_options("node1"),
            b"".join(amp.AmpBox(_command=command, _ask=b"%d" % i,
                                session_id=_session_id()).serialize()
                     for i, command in enumerate([b"Purge"] * 50
                                                 + [b"Explode"] * 50)))
        client.read()
        yield until(lambda: client.boxes == 100)
        client.transport.loseConnection()
        self.assertEqual((len(self.logged("refused {command}")),
                          len(self.logged("unknown command"))), (1, 1))


class KeyCheckTests(ClusterTestCase):
    """
    A link is up only once both ends showed that each can open what the
    other seals.
    """

    def _keys(self, *keys):
        return StateKeys(list(keys))

    @inlineCallbacks
    def test_node_with_another_state_key_is_refused_at_link_setup(self):
        theirs = self._keys(StateKeys.generate())
        server = yield self.node("node1")
        link = self.link("node2", "node1", server.endpoint, keys=theirs)
        failure = yield self.assertFailure(
            link.when_connected(fail_after_failures=1), PeerUnavailable)
        self.assertFalse(link.connected)
        ours, other = self.keys.key_ids[0].hex(), theirs.key_ids[0].hex()
        expected = (f"node2 seals with state key id {other}, which node1 does "
                    f"not hold (it holds {ours})")
        self.assertIn(f"node1 refused the key check of node2 ({expected})",
                      str(failure))
        self.assertEqual(server.factory.counters["key_mismatches"], 1)
        self.assertEqual(link.counters["key_mismatches"], 1)
        [event] = self.logged("refused the link")
        self.assertEqual((event["peer"], event["reason"]), ("node2", expected))
        [event] = self.logged("cannot connect to peer")
        self.assertEqual(event["peer"], "node1")
        self.assertIn(expected, event["reason"])

    @inlineCallbacks
    def test_server_ends_the_connection_of_a_failed_key_check(self):
        server = yield self.node("node1")
        client = yield held_amp_client(
            server.port, self.cluster_tls("node2").client_options("node1"),
            amp.AmpBox(_command=b"KeyCheck", _ask=b"1",
                       key_id=self.keys.key_ids[0],
                       proof=bytes(32)).serialize())
        client.read()
        yield client.closed
        self.assertEqual(client.boxes, 1)
        self.assertEqual(server.factory.counters["key_mismatches"], 1)
        [event] = self.logged("refused the link")
        self.assertEqual(event["reason"],
                         f"node2 names state key id {self.keys.key_ids[0].hex()} "
                         f"but does not prove that it holds it")

    @inlineCallbacks
    def test_link_refuses_a_peer_whose_sealing_key_it_does_not_hold(self):
        # node1 seals with a new key it has not given node2 yet: node1 can
        # open node2's sessions, node2 cannot open node1's.
        old, new = StateKeys.generate(), StateKeys.generate()
        ours, old_only = self._keys(new, old), self._keys(old)
        server = yield self.node("node1", keys=ours)
        link = self.link("node2", "node1", server.endpoint, keys=old_only)
        failure = yield self.assertFailure(
            link.when_connected(fail_after_failures=1), PeerUnavailable)
        self.assertIn(f"node1 seals with state key id {ours.key_ids[0].hex()}, "
                      f"which node2 does not hold (it holds "
                      f"{old_only.key_ids[0].hex()})", str(failure))
        self.assertEqual(server.factory.counters["key_mismatches"], 0)
        self.assertEqual(link.counters["key_mismatches"], 1)

    @inlineCallbacks
    def test_nodes_in_the_middle_of_a_rotation_link_up(self):
        new, old = StateKeys.generate(), StateKeys.generate()
        server = yield self.node("node1", keys=self._keys(new, old))
        link = yield self.connected_link("node2", "node1", server.endpoint,
                                         keys=self._keys(old, new))
        self.assertTrue(link.connected)
        self.assertEqual(server.factory.counters["key_mismatches"], 0)


class LinkTests(ClusterTestCase):
    """
    Availability of a L{PeerLink}: at once or not at all, and back after
    the peer restarts.
    """

    def test_call_on_a_link_that_never_connected_fails_at_once(self):
        link = self.link("node2", "node1",
                         f"tcp:host=127.0.0.1:port={free_port()}")
        failure = self.failureResultOf(fetch_from(link, _session_id()))
        failure.trap(PeerUnavailable)
        self.assertEqual(link.counters["unavailable"], 1)

    @inlineCallbacks
    def test_call_after_the_peer_went_away_fails_at_once(self):
        server = yield self.node("node1")
        link = yield self.connected_link("node2", "node1", server.endpoint)
        yield server.stop()
        yield until(lambda: not link.connected)
        self.failureResultOf(fetch_from(link, _session_id()), PeerUnavailable)

    @inlineCallbacks
    def test_stopping_the_listener_closes_the_peers_connections(self):
        server = yield self.node("node1")
        link = yield self.connected_link("node2", "node1", server.endpoint)
        yield server.listening.stopListening()
        yield until(lambda: not link.connected)

    @inlineCallbacks
    def test_link_reconnects_after_the_server_restarts(self):
        server = yield self.node("node1")
        link = yield self.connected_link("node2", "node1", server.endpoint)
        yield server.stop()
        yield until(lambda: not link.connected)
        yield server.start()
        yield link.when_connected()
        answer = yield fetch_from(link, _session_id())
        self.assertEqual(answer.status, "missing")
        self.assertEqual(link.counters["connects"], 2)

    @inlineCallbacks
    def test_question_out_when_connection_ends_fails_with_peer_unavailable(self):
        handler = RecordingHandler()
        handler.pending = Deferred()
        server = yield self.node("node1", handler=handler)
        link = yield self.connected_link("node2", "node1", server.endpoint)
        fetching = fetch_from(link, _session_id())
        yield until(lambda: handler.calls)
        yield server.stop()
        yield self.assertFailure(fetching, PeerUnavailable)

    def test_peers_refuse_to_link_a_node_to_itself(self):
        self.assertRaises(ValueError, Peers, [("node2", "tcp:host=127.0.0.1:port=1")],
                          self.cluster_tls("node2"), keys=lambda: self.keys)


class _RogueFetch(amp.Command):
    """
    FetchSession as a broken peer answers it: any field, of any bytes.
    """

    commandName = b"FetchSession"
    arguments = [(b"session_id", amp.String())]
    response = [
        (b"status", amp.String(optional=True)),
        (b"sealed", amp.String(optional=True)),
        (b"holder", amp.String(optional=True)),
    ]


class _RogueProtocol(RoguePeerProtocol):
    """
    A peer that answers FetchSession with its factory's C{answer}.
    """

    rogue = frozenset({_RogueFetch.commandName})

    @_RogueFetch.responder
    def fetch(self, session_id):
        return self.factory.answer


class GarbageAnswerTests(ClusterTestCase):
    """
    L{fetch_from} turns an answer that breaks the protocol into
    L{PeerProtocolError}: the peer here is authentic but broken.
    """

    @inlineCallbacks
    def _fetch(self, answer):
        rogue = Node(self, self.cluster_tls("node1"), None)
        rogue.factory.protocol = _RogueProtocol
        rogue.factory.answer = answer
        yield rogue.start()
        link = yield self.connected_link("node2", "node1", rogue.endpoint)
        yield self.assertFailure(fetch_from(link, _session_id()), PeerProtocolError)

    def test_unknown_status(self):
        return self._fetch({"status": b"stolen"})

    def test_no_status(self):
        return self._fetch({})

    def test_status_that_is_not_utf8(self):
        return self._fetch({"status": b"\xff"})

    def test_found_without_sealed_state(self):
        return self._fetch({"status": b"found"})

    def test_found_with_sealed_state_over_16_kib(self):
        return self._fetch({"status": b"found",
                            "sealed": b"s" * (cluster.MAX_SEALED + 1)})

    def test_redirect_without_holder(self):
        return self._fetch({"status": b"redirect"})

    def test_redirect_to_a_name_that_is_no_node_id(self):
        return self._fetch({"status": b"redirect", "holder": b"../etc"})

    def test_missing_with_sealed_state(self):
        return self._fetch({"status": b"missing", "sealed": b"s"})


class ClusterTLSLoadTests(ClusterTestCase):
    """
    A node's own TLS material is checked when it is loaded.
    """

    def test_certificate_of_another_node_is_refused(self):
        files = self.pki.node("node1")
        error = self.assertRaises(ClusterTLSError, ClusterTLS,
                                  self.pki.ca_certificate, files.certificate,
                                  files.key, "demo", "node2")
        self.assertEqual(error.path, files.certificate)
        self.assertIn("sslshare://demo/node2", str(error))

    def test_key_of_another_certificate_is_refused(self):
        error = self.assertRaises(ClusterTLSError, ClusterTLS,
                                  self.pki.ca_certificate,
                                  self.pki.node("node1").certificate,
                                  self.pki.node("node2").key, "demo", "node1")
        self.assertEqual(error.path, self.pki.node("node2").key)

    def test_certificate_from_another_ca_is_refused(self):
        other = pki.init_pki(self.mktemp(), "demo", ["node1"])
        error = self.assertRaises(ClusterTLSError, ClusterTLS,
                                  self.pki.ca_certificate,
                                  other.node("node1").certificate,
                                  other.node("node1").key, "demo", "node1")
        self.assertEqual(error.path, other.node("node1").certificate)

    def test_missing_file_is_named(self):
        missing = os.path.join(self.pki.directory, "nope.pem")
        error = self.assertRaises(ClusterTLSError, ClusterTLS, missing,
                                  self.pki.node("node1").certificate,
                                  self.pki.node("node1").key, "demo", "node1")
        self.assertEqual(error.path, missing)
