"""
Requests that are not theirs to make, against a real cluster over real
sockets: a ClientHello offering a session it cannot resume (another TLS
version, another service), a node whose state keys differ, and peers that
checkpoint or purge sessions they do not hold.  None of them may move,
use up or rewrite the session: the client that owns it resumes afterwards.
"""

from __future__ import annotations

import os

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from sslshare.cluster import BadRequest
from sslshare.state import MAX_SEQ, StateKeys
from tests.support.cluster import LocalCluster
from tests.support.files import write_private
from tests.support.wire import client_hello, psk_extension, read_records

SQLITE = 'kind = "sqlite"\npath = "{directory}/s.sqlite3"\n'

API_SERVICE = """
[[tls.service]]
name = "api"
server_names = ["api.localhost"]
certificate = "{chain}"
key = "{key}"
"""


def _offer(cluster, node, hello):
    """
    Send C{node} a hand-made ClientHello and read what it answers.
    """
    return deferToThread(read_records, cluster.ports[node], hello)


def _as_tls13_psk(session_id):
    return client_hello(tls13=True, psk=psk_extension([session_id]))


class MismatchedHelloTests(TestCase):
    """
    A TLS 1.2 session id is on the wire for anyone to copy; offered as a
    TLS 1.3 PSK identity, or under another service's name, it must leave
    the session where it is.
    """

    @inlineCallbacks
    def _cluster(self, **options):
        cluster = LocalCluster(self, **options)
        chain, key = cluster.server_certificate("api", ("api.localhost",))
        for node in cluster.paths:
            with open(cluster.paths[node], "a") as f:
                f.write(API_SERVICE.format(chain=chain, key=key))
        yield cluster.start_all()
        return cluster

    @inlineCallbacks
    def _offered_then_resumed(self, offer_at, hello, resume_at, **options):
        """
        node1 makes a TLS 1.2 session; C{hello(session_id)} is offered to
        C{offer_at}; then the session's own client resumes at C{resume_at}.
        """
        cluster = yield self._cluster(**options)
        first = yield cluster.client_round("node1", "TLSv1.2")
        yield cluster.settled()
        yield _offer(cluster, offer_at, hello(first.session.id))
        yield cluster.settled()
        again = yield cluster.client_round(resume_at, "TLSv1.2", first.session)
        self.assertTrue(again.reused)
        return cluster

    @inlineCallbacks
    def test_tls12_id_as_tls13_psk_at_a_peer_moves_nothing(self):
        cluster = yield self._offered_then_resumed("node3", _as_tls13_psk,
                                                   "node3")
        self.assertEqual(cluster.nodes["node1"].counters["fetches_refused"], 1)

    @inlineCallbacks
    def test_tls12_id_as_tls13_psk_at_its_backup_node_moves_nothing(self):
        cluster = yield self._offered_then_resumed("node2", _as_tls13_psk,
                                                   "node2")
        self.assertEqual(
            cluster.nodes["node2"].recovery.counters["unresumable"], 1)

    @inlineCallbacks
    def test_tls12_id_as_tls13_psk_at_its_own_node_uses_nothing_up(self):
        cluster = yield self._offered_then_resumed("node1", _as_tls13_psk,
                                                   "node2")
        self.assertEqual(
            cluster.nodes["node1"].recovery.counters["unresumable"], 1)

    @inlineCallbacks
    def test_id_under_another_service_at_a_peer_moves_nothing(self):
        cluster = yield self._offered_then_resumed(
            "node3", lambda session_id: client_hello(
                tls13=False, session_id=session_id,
                server_name="api.localhost"), "node3")
        self.assertEqual(cluster.nodes["node1"].counters["fetches_refused"], 1)

    @inlineCallbacks
    def test_tls12_id_as_tls13_psk_with_a_repository_goes_back(self):
        cluster = yield self._offered_then_resumed(
            "node2", _as_tls13_psk, "node2", nodes=("node1", "node2"),
            repository=SQLITE)
        self.assertEqual(
            cluster.nodes["node2"].recovery.counters["given_back"], 1)


class KeyRotationTests(TestCase):
    """
    A cluster rotating its state key: node2, reloaded, already seals with
    the new key; node1 has not been given it yet.  Links are checked when
    they come up, so the one between them stays.
    """

    @inlineCallbacks
    def test_a_session_moves_to_a_node_without_the_new_key(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"))
        yield cluster.start_all()
        with open(os.path.join(cluster.directory, "pki", "state.key")) as f:
            old = f.read().strip()
        write_private(os.path.join(cluster.directory, "pki", "state2.key"),
                      f"{StateKeys.generate().hex()}\n{old}\n".encode())
        cluster.edit("node2", 'state_key = "pki/state.key"',
                     'state_key = "pki/state2.key"')
        self.assertTrue(cluster.services["node2"].reload())
        first = yield cluster.client_round("node2", "TLSv1.2")
        yield cluster.settled()
        again = yield cluster.client_round("node1", "TLSv1.2", first.session)
        self.assertTrue(again.reused)
        self.assertEqual(
            cluster.nodes["node1"].recovery.counters["unsealable"], 0)


class ForeignCommandTests(TestCase):
    """
    node1 holds a session and node2 keeps its backup copy; node3, a peer
    allowed every command, holds neither.
    """

    @inlineCallbacks
    def setUp(self):
        self.cluster = LocalCluster(self)
        yield self.cluster.start_all()
        self.first = yield self.cluster.client_round("node1", "TLSv1.2")
        yield self.cluster.settled()
        self.session_id = self.first.session.id
        self.node1, self.node2, self.node3 = (
            self.cluster.nodes[name] for name in ("node1", "node2", "node3"))
        self.assertEqual(self.node2.store.held_by(self.session_id), "node1")

    @inlineCallbacks
    def test_checkpoint_from_a_peer_that_does_not_hold_the_session(self):
        digest = os.urandom(32)
        for target in ("node1", "node2"):
            accepted = yield self.node3.peer_links.checkpoint_session(
                target, self.session_id, 2 ** 62, digest)
            self.assertFalse(accepted)
        self.assertEqual(self.node1.counters["refused_checkpoints"], 1)
        self.assertEqual(self.node2.counters["refused_checkpoints"], 1)
        self.assertNotEqual(self.node1.store.get(self.session_id).seq, 2 ** 62)
        self.assertNotEqual(self.node2.store.get(self.session_id).seq, 2 ** 62)
        accepted = yield self.node1.peer_links.checkpoint_session(
            "node2", self.session_id, 2 ** 62, digest)
        self.assertTrue(accepted)

    @inlineCallbacks
    def test_checkpoint_the_copy_already_covers_is_late_not_refused(self):
        # What a former holder's checkpoint looks like when the new
        # holder's copy overtook it: no more records than the copy's.
        kept = self.node2.store.get(self.session_id)
        self.assertGreater(kept.seq, 0)
        accepted = yield self.node3.peer_links.checkpoint_session(
            "node2", self.session_id, kept.seq, os.urandom(32))
        self.assertFalse(accepted)
        self.assertEqual(self.node2.counters["late_checkpoints"], 1)
        self.assertEqual(self.node2.counters["refused_checkpoints"], 0)
        self.assertEqual(self.node2.store.get(self.session_id).digest,
                         kept.digest)

    @inlineCallbacks
    def test_purge_from_a_peer_that_does_not_hold_the_session(self):
        for target in ("node1", "node2"):
            removed = yield self.node3.peer_links.purge_session(
                target, self.session_id)
            self.assertFalse(removed)
        self.assertEqual(self.node1.counters["refused_purges"], 1)
        self.assertEqual(self.node2.store.held_by(self.session_id), "node1")
        again = yield self.cluster.client_round("node1", "TLSv1.2",
                                                self.first.session)
        self.assertTrue(again.reused)

    @inlineCallbacks
    def test_checkpoint_beyond_the_bound_is_a_bad_request(self):
        checkpointing = self.node1.peer_links.checkpoint_session(
            "node2", self.session_id, MAX_SEQ + 1, os.urandom(32))
        yield self.assertFailure(checkpointing, BadRequest)
        self.assertLess(self.node2.store.get(self.session_id).seq, MAX_SEQ)

    @inlineCallbacks
    def test_a_chain_at_the_bound_stops_and_the_client_is_served(self):
        self.node1.store.update_checkpoint(self.session_id, MAX_SEQ,
                                           os.urandom(32))
        again = yield self.cluster.client_round("node1", "TLSv1.2",
                                                self.first.session)
        self.assertEqual((again.reused, again.echo), (True, b"hello"))
        self.assertEqual(self.node1.counters["chains_exhausted"], 1)
        self.assertEqual(self.flushLoggedErrors(), [])
