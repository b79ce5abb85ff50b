"""
The running digest across a real cluster: the checkpoint the cluster holds
after two connections of one session, on two nodes, is the chain a test
recomputes from the records it sent and received, and its seq is their
number; and with the session's holder killed, the session resumes on a
third node from its backup copy, its chain continuing.

Checkpoint targets that fail: a backup node that is down never stops a
client's traffic, and the session's copy moves to the next live node of
the ring; a peer that takes questions and never answers pauses a
connection no longer than C{checkpoint_max_pause}, and the calls to it
other than FetchSession fail after the call timeout.  These tests print
one line of figures each ("checkpoint target ...").
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from sslshare import node as node_module
from sslshare.cluster import ClusterTLS, Peers, PeerUnavailable
from sslshare.dev.throwaway import RedisServer, ServerUnavailable
from sslshare.state import StateKeys
from tests.support.clients import client_context
from tests.support.cluster import LocalCluster
from tests.support.servers import StallingHandler
from tests.support.sessions import session_id_of
from tests.support.waiting import until


class _Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


def _conversation(port, ca_cert, messages, session=None, before=None):
    """
    Send each message as one TLS record and wait for its echo before the
    next, so that the records alternate: client, server, client, ...
    Blocking.

    @param before: message index -> a function run in the reactor's thread
        (and waited for, if it returns a Deferred) before that message.
    @return: the client's session and the records, as (direction, bytes).
    """
    context = client_context(ca_cert, "TLSv1.2")
    records = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname="localhost",
                                 session=session) as client:
            for index, message in enumerate(messages):
                if before and index in before:
                    blockingCallFromThread(reactor, before[index])
                client.sendall(message)
                echo = b""
                while len(echo) < len(message):
                    echo += client.recv(65536)
                records += [(0, message), (1, echo)]
            return client.session, client.session_reused, records


def _chain(start, records):
    """
    The digest chain as sslshare/digest.py's docstring defines it, written
    out again here: h_n = SHA-256(h_n-1 || direction || seq || length ||
    plaintext).
    """
    seq, digest = start
    for direction, plaintext in records:
        seq += 1
        digest = hashlib.sha256(
            digest + struct.pack("!BQI", direction, seq, len(plaintext))
            + plaintext).digest()
    return seq, digest


def _h0(session_id, exporter):
    return hashlib.sha256(b"sslshare digest v1\0" + session_id
                          + exporter).digest()


class _ExporterRecording:
    """
    Tests that read the exporter values the nodes compute.
    """

    def setUp(self):
        # The exporter value is a secret of the connection; the test reads
        # the one the node computes to know where the chain starts.
        self.exporters = {}
        original = node_module.exporter

        def recording(connection, session_id):
            value = original(connection, session_id)
            self.exporters[session_id] = value
            return value

        self.patch(node_module, "exporter", recording)


class DigestAcrossNodesTests(_ExporterRecording, TestCase):

    @inlineCallbacks
    def test_checkpoint_after_two_nodes_is_the_recomputed_chain(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"), backend=_Echo)
        yield cluster.start_all()
        first = [b"first %d " % n * 20 for n in range(5)]
        second = [b"second %d " % n * 40 for n in range(7)]
        session, reused, records1 = yield deferToThread(
            _conversation, cluster.ports["node1"], cluster.ca_cert, first)
        self.assertFalse(reused)
        session_id = session.id
        _, reused, records2 = yield deferToThread(
            _conversation, cluster.ports["node2"], cluster.ca_cert, second,
            session)
        self.assertTrue(reused)
        # The last checkpoints travel after the last echo.
        yield deferLater(reactor, 0.3, lambda: None)
        expected = _chain((0, _h0(session_id, self.exporters[session_id])),
                          records1 + records2)
        self.assertEqual(expected[0], 2 * (len(first) + len(second)))
        holder = cluster.nodes["node2"].store.get(session_id)
        self.assertEqual((holder.seq, holder.digest), expected)
        # Outside the serving node: node1 is node2's backup for it.
        backup = cluster.nodes["node1"].store.get(session_id)
        self.assertEqual(backup.holder, "node2")
        self.assertEqual((backup.seq, backup.digest), expected)

    @inlineCallbacks
    def test_holder_killed_session_resumes_on_third_node_from_backup(self):
        """
        node1 runs as a twistd process and is killed (SIGKILL) right after
        the last echo; node2, its backup for the session, gives it to node3,
        and the chain goes on from the checkpoint node2 holds.
        """
        cluster = LocalCluster(self, backend=_Echo)
        yield cluster.spawn("node1")
        cluster.start("node2")
        cluster.start("node3")
        yield cluster.wait_linked_to("node1")
        messages = [b"record %d " % n * 30 for n in range(6)]
        session, _, records1 = yield deferToThread(
            _conversation, cluster.ports["node1"], cluster.ca_cert, messages)
        yield cluster.kill("node1")
        backup = cluster.nodes["node2"].store.get(session.id)
        self.assertEqual(backup.holder, "node1")
        # Killed right after its last record: the backup's checkpoint lags
        # at most by the checkpoints still in flight (one per direction).
        self.assertGreaterEqual(backup.seq, len(records1) - 2)
        self.assertLessEqual(backup.seq, len(records1))
        anchor = (backup.seq, backup.digest)
        more = [b"more %d " % n * 25 for n in range(4)]
        _, reused, records2 = yield deferToThread(
            _conversation, cluster.ports["node3"], cluster.ca_cert, more,
            session)
        self.assertTrue(reused)
        self.assertEqual(cluster.nodes["node3"].counters["resumed_peer"], 1)
        yield deferLater(reactor, 0.3, lambda: None)
        held = cluster.nodes["node3"].store.get(session.id)
        # The chain continues from the backup's checkpoint, not from zero.
        self.assertEqual((held.seq, held.digest), _chain(anchor, records2))


    @inlineCallbacks
    def test_holder_killed_chain_continues_from_the_repository(self):
        """
        With a repository, node1 is killed after the last echo: node2
        takes the session from the repository, and the chain goes on from
        the checkpoint kept beside the blob there, which is newer than the
        one sealed in the blob when the session was made.
        """
        cluster = LocalCluster(
            self, nodes=("node1", "node2"), backend=_Echo,
            repository='kind = "sqlite"\npath = "{directory}/s.sqlite3"\n')
        yield cluster.spawn("node1")
        cluster.start("node2")
        yield cluster.wait_linked_to("node1")
        messages = [b"record %d " % n * 30 for n in range(6)]
        session, _, records1 = yield deferToThread(
            _conversation, cluster.ports["node1"], cluster.ca_cert, messages)
        repository = cluster.nodes["node2"].repository
        # Killed once the repository holds a checkpoint of the last records
        # (the last one or two may still be on their way).
        yield until(lambda: repository.checkpoint_of(session.id).addCallback(
            lambda checkpoint: (checkpoint or (0, b""))[0]
            >= len(records1) - 2), interval=0.05)
        yield cluster.kill("node1")
        seq, sealed = yield repository.checkpoint_of(session.id)
        anchor = (seq, cluster.nodes["node2"].keys.open_checkpoint(
            session.id, seq, sealed))
        more = [b"more %d " % n * 25 for n in range(4)]
        _, reused, records2 = yield deferToThread(
            _conversation, cluster.ports["node2"], cluster.ca_cert, more,
            session)
        self.assertTrue(reused)
        self.assertEqual(
            cluster.nodes["node2"].counters["resumed_repository"], 1)
        yield deferLater(reactor, 0.3, lambda: None)
        held = cluster.nodes["node2"].store.get(session.id)
        self.assertEqual((held.seq, held.digest), _chain(anchor, records2))


def _transcript(path, records):
    with open(path, "w") as f:
        for direction, plaintext in records:
            f.write(json.dumps({"direction": ("c2s", "s2c")[direction],
                                "record": plaintext.hex()}) + "\n")


class DigestVerifyCommandTests(_ExporterRecording, TestCase):
    """
    C{sslshare digest verify}: an operator's audit of a session from its
    transcript.
    """

    def _verify(self, *arguments):
        return getProcessOutputAndValue(
            sys.executable,
            ["-c", "from sslshare.cli import main; main()", "digest", "verify",
             *arguments], env=os.environ)

    @inlineCallbacks
    def _session_through_sqlite(self):
        cluster = LocalCluster(
            self, nodes=("node1",), backend=_Echo,
            repository='kind = "sqlite"\npath = "{directory}/s.sqlite3"\n')
        yield cluster.start_all()
        session, _, records = yield deferToThread(
            _conversation, cluster.ports["node1"], cluster.ca_cert,
            [b"audit me %d" % n for n in range(4)])
        node1 = cluster.nodes["node1"]
        def last_stored():
            last = (len(records), node1.keys.seal_checkpoint(
                session.id, len(records), node1.store.get(session.id).digest))
            return node1.repository.checkpoint_of(session.id).addCallback(
                lambda checkpoint: checkpoint == last)

        # The last checkpoint travels after the last echo.
        yield until(last_stored, interval=0.05)
        transcript = self.mktemp()
        _transcript(transcript, records)
        return cluster, session.id, transcript, records

    @inlineCallbacks
    def test_transcript_matches_the_checkpoint_in_the_repository(self):
        cluster, session_id, transcript, records = (
            yield self._session_through_sqlite())
        output, error, code = yield self._verify(
            transcript, "--session-id", session_id.hex(),
            "--exporter", self.exporters[session_id].hex(),
            "--config", cluster.paths["node1"])
        self.assertEqual(code, 0, error.decode())
        self.assertIn(f"match: the transcript gives the stored checkpoint, "
                      f"seq {len(records)}", output.decode())

    @inlineCallbacks
    def test_altered_transcript_is_a_mismatch(self):
        cluster, session_id, transcript, records = (
            yield self._session_through_sqlite())
        seq, digest = _chain((0, _h0(session_id, self.exporters[session_id])),
                             records)
        records[2] = (records[2][0], b"something else")
        _transcript(transcript, records)
        output, error, code = yield self._verify(
            transcript, "--session-id", session_id.hex(),
            "--exporter", self.exporters[session_id].hex(),
            "--checkpoint", f"{seq}:{digest.hex()}")
        self.assertEqual(code, 1, error.decode())
        self.assertIn("MISMATCH", output.decode())

    @inlineCallbacks
    def test_bad_transcript_line_is_named(self):
        transcript = self.mktemp()
        with open(transcript, "w") as f:
            f.write('{"direction": "c2s", "record": "zz"}\n')
        output, error, code = yield self._verify(
            transcript, "--from-seq", "1", "--from-digest", "00" * 32,
            "--checkpoint", "2:" + "00" * 32)
        self.assertEqual(code, 2)
        self.assertIn("line 1", error.decode())
        self.assertEqual(len(error.decode().strip().splitlines()), 1)


# Past the default checkpoint_bound of 64 records, many times over.
MESSAGES = [b"long-lived %d " % n * 8 for n in range(100)]


def _holds(node, session_id, seq):
    copy = node.store.get(session_id)
    return copy is not None and copy.seq == seq


@inlineCallbacks
def _served(testcase, cluster, what, before=None):
    """
    L{MESSAGES} exchanged with node1 of C{cluster}: every record is
    served, and a line of figures says how long it took and what became
    of the checkpoints.

    @return: the client's session and the records.
    """
    started = time.monotonic()
    session, _, records = yield deferToThread(
        _conversation, cluster.ports["node1"], cluster.ca_cert, MESSAGES,
        before=before)
    seconds = time.monotonic() - started
    testcase.assertEqual(len(records), 2 * len(MESSAGES))
    counters = cluster.nodes["node1"].checkpoint_counters
    print(f"\ncheckpoint target {what}: {len(records)} records served in "
          f"{seconds:.2f} s, checkpoints {counters['written']} written, "
          f"{counters['failed']} failed, {counters['pauses']} pauses, "
          f"{counters['pauses_cut']} cut at checkpoint_max_pause",
          flush=True)
    return session, records


class UnavailableTargetTests(TestCase):
    """
    A backup node that is down (connection refused, link not up) fails its
    checkpoints at once: they are counted and skipped, and the connection
    never waits for them.
    """

    @inlineCallbacks
    def test_backup_node_down_long_connection_is_served(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"), backend=_Echo)
        node1 = cluster.start("node1")
        _, records = yield _served(self, cluster, "down (node2 of 2)")
        counters = node1.checkpoint_counters
        self.assertEqual(counters["pauses"], 0)
        self.assertEqual(counters["written"], 0)
        self.assertGreaterEqual(counters["failed"], len(records) - 1)

    @inlineCallbacks
    def test_backup_node_that_comes_back_gets_a_copy_at_once(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"), backend=_Echo)
        node1 = cluster.start("node1")

        def start_node2():
            cluster.start("node2")
            return cluster.wait_linked()

        session, records = yield _served(
            self, cluster, "down, then back (node2 of 2)",
            before={50: start_node2})
        yield until(lambda: _holds(cluster.nodes["node2"], session.id,
                                   len(records)))
        self.assertEqual(cluster.nodes["node2"].store.get(session.id).holder,
                         "node1")
        self.assertEqual(node1.counters["backups_moved"], 1)
        self.assertEqual(node1.checkpoint_counters["pauses"], 0)

    @inlineCallbacks
    def test_repository_down_long_connection_is_served(self):
        try:
            server = RedisServer()
        except ServerUnavailable as e:
            raise SkipTest(str(e))
        self.addCleanup(server.remove)
        server.start()
        cluster = LocalCluster(
            self, nodes=("node1",), backend=_Echo,
            repository=f'kind = "redis"\nurl = "{server.url}"\n')
        node1 = cluster.start("node1")
        server.stop()
        # The port stays this test's, bound and not listening (connections
        # to it are refused at once): a server another test starts on a
        # port just freed would not be "down".
        refusing = socket.socket()
        self.addCleanup(refusing.close)
        # The closed server's connections may linger in TIME_WAIT.
        refusing.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        refusing.bind(("127.0.0.1", server.port))
        _, records = yield _served(self, cluster, "down (the repository)")
        counters = node1.checkpoint_counters
        self.assertEqual(counters["pauses"], 0)
        self.assertGreater(counters["failed"], 0)

    @inlineCallbacks
    def test_checkpoints_of_a_new_session_go_to_the_next_live_node(self):
        cluster = LocalCluster(self, backend=_Echo)
        node1 = cluster.start("node1")
        node3 = cluster.start("node3")
        yield node1.peer_links.link("node3").when_connected()
        session, _, records = yield deferToThread(
            _conversation, cluster.ports["node1"], cluster.ca_cert,
            MESSAGES[:10])
        yield until(lambda: _holds(node3, session.id, len(records)))
        held = node1.store.get(session.id)
        copy = node3.store.get(session.id)
        self.assertEqual(copy.holder, "node1")
        self.assertEqual((copy.seq, copy.digest), (held.seq, held.digest))
        self.assertEqual(node1.checkpoint_counters["failed"], 0)

    @inlineCallbacks
    def test_backup_node_stopped_mid_connection_copy_moves_on(self):
        """
        node2, the session's backup node, stops while the connection runs:
        the checkpoints go on to node3, which gets a copy of the session
        first, and the client never waits.
        """
        cluster = LocalCluster(self, backend=_Echo)
        yield cluster.start_all()
        node1, node3 = cluster.nodes["node1"], cluster.nodes["node3"]

        copies_before = []

        def stop_node2():
            copies_before.append(len(node3.store))
            stopped = cluster.stop("node2")
            return stopped.addCallback(lambda _: until(
                lambda: not node1.peer_links.link("node2").connected))

        session, records = yield _served(
            self, cluster, "stopped mid-connection (node2 of 3)",
            before={10: stop_node2})
        self.assertEqual(copies_before, [0])
        yield until(lambda: _holds(node3, session.id, len(records)))
        held = node1.store.get(session.id)
        copy = node3.store.get(session.id)
        self.assertEqual(copy.holder, "node1")
        self.assertEqual(copy.digest, held.digest)
        self.assertEqual(node1.counters["backups_moved"], 1)
        self.assertEqual(node1.checkpoint_counters["pauses"], 0)


class BackupAtALaterNodeTests(TestCase):
    """
    With node1 down, the copy of a session of node2 held by node3 goes to
    node2, the next live node of node3's ring for it; once the session
    moves on, that copy goes too.
    """

    @inlineCallbacks
    def test_copy_at_a_later_node_of_the_ring_goes_when_the_session_moves(self):
        cluster = LocalCluster(self)
        node2, node3 = cluster.start("node2"), cluster.start("node3")
        yield cluster.wait_linked(down=("node1",))
        made = yield cluster.client_round("node2", "TLSv1.2")
        session_id = made.session.id
        yield until(lambda: node3.store.get(session_id) is not None)
        moved = yield cluster.client_round("node3", "TLSv1.2", made.session)
        self.assertTrue(moved.reused)
        yield cluster.settled()
        self.assertEqual(node2.store.get(session_id).holder, "node3")
        node1 = cluster.start("node1")
        yield cluster.wait_linked()
        again = yield cluster.client_round("node1", "TLSv1.2", made.session)
        self.assertTrue(again.reused)
        self.assertEqual(node1.store.get(session_id).holder, "node1")
        yield cluster.settled()
        self.assertIsNone(node2.store.get(session_id))
        self.assertEqual(node3.store.get(session_id).holder, "node1")


class StalledTargetTests(TestCase):
    """
    node2 links up and then answers nothing: a backup node whose process
    hangs.
    """

    @inlineCallbacks
    def _stalled_cluster(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"), backend=_Echo)
        self.stalled = StallingHandler(everything=True)
        cluster.impersonate("node2", self.stalled)
        node1 = cluster.start("node1")
        yield node1.peer_links.link("node2").when_connected()
        return cluster, node1

    @inlineCallbacks
    def test_pause_for_a_stalled_backup_ends_at_the_bound(self):
        cluster, node1 = yield self._stalled_cluster()
        yield _served(self, cluster, "stalled (node2 of 2)")
        counters = node1.checkpoint_counters
        self.assertGreaterEqual(counters["pauses"], 1)
        self.assertEqual(counters["pauses_cut"], counters["pauses"])
        self.assertFalse(any(pipeline.paused
                             for pipeline in node1._pipelines))

    @inlineCallbacks
    def test_calls_to_a_stalled_peer_time_out(self):
        """
        Backup, Checkpoint and Purge to a peer that never answers fail
        with L{PeerUnavailable} once the call timeout has passed.  They go
        in one Deliver, whose first item the peer's handler holds.
        """
        cluster = LocalCluster(self, nodes=("node1", "node2"))
        stalled = StallingHandler(everything=True)
        cluster.impersonate("node2", stalled)
        files = cluster.pki.node("node1")
        keys = StateKeys.from_file(os.path.join(cluster.directory, "pki",
                                                "state.key"))
        peers = Peers(
            [("node2", f"tcp:host=127.0.0.1:port={cluster.amp_ports['node2']}")],
            ClusterTLS(cluster.ca_cert, files.certificate, files.key, "test",
                       "node1"),
            reactor=reactor, call_timeout=0.5, keys=lambda: keys)
        peers.startService()
        self.addCleanup(peers.stopService)
        link = peers.link("node2")
        yield link.when_connected()
        session_id = session_id_of()
        calls = [peers.backup_session("node2", session_id, b"sealed"),
                 peers.checkpoint_session("node2", session_id, 1, b"d" * 32),
                 peers.purge_session("node2", session_id)]
        outcomes = []
        for call in calls:
            call.addErrback(lambda reason: outcomes.append(reason))
        yield until(lambda: len(outcomes) == len(calls), timeout=5)
        for reason in outcomes:
            self.assertTrue(reason.check(PeerUnavailable))
            self.assertIn("no answer", reason.getErrorMessage())
        self.assertEqual(len(stalled.unanswered), 1)
        self.assertEqual(link.counters["call_timeouts"], 1)
        self.assertTrue(link.connected)
