"""
Cluster nodes, in this process and as C{twistd sslshare} processes, over
real sockets: sessions move from node to node, a node that is gone costs
at most the lookup budget, and a bad configuration stops C{twistd} with one
line.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sslshare.cluster import Stats
from sslshare.hooks import LookupRequest
from sslshare.tls import session_fields
from tests.support.clients import client_context, s_client_round
from tests.support.cluster import LocalCluster
from tests.support.metrics import scrape_metrics
from tests.support.servers import RoguePeerProtocol, SilentListener
from tests.support.waiting import until


class MovingSessionTests(TestCase):
    """
    A session made on node1 resumes on node2, then on node3, and is held by
    exactly one node at a time.
    """

    @inlineCallbacks
    def _resumes_around_the_cluster(self, version):
        cluster = LocalCluster(self)
        yield cluster.start_all()
        first = yield cluster.client_round("node1", version)
        self.assertFalse(first.reused)
        session = first.session
        for node in ("node2", "node3"):
            result = yield cluster.client_round(node, version, session)
            self.assertTrue(result.reused, f"not resumed on {node}")
            self.assertEqual(result.echo, b"hello")
            self.assertEqual(cluster.nodes[node].counters["resumed_peer"], 1)
            session = result.session
        return cluster

    def test_tls12_session_from_node1_resumes_on_node2_then_node3(self):
        return self._resumes_around_the_cluster("TLSv1.2")

    def test_tls13_session_from_node1_resumes_on_node2_then_node3(self):
        return self._resumes_around_the_cluster("TLSv1.3")

    @inlineCallbacks
    def test_node1_no_longer_holds_a_session_node2_took(self):
        cluster = LocalCluster(self)
        yield cluster.start_all()
        first = yield cluster.client_round("node1", "TLSv1.2")
        node1, node2 = cluster.nodes["node1"], cluster.nodes["node2"]
        session_id = first.session.id
        self.assertEqual(node1.store.get(session_id).holder, "node1")
        yield cluster.client_round("node2", "TLSv1.2", first.session)
        self.assertIsNone(node1.store.get(session_id))
        self.assertEqual(node1.store.holder(session_id), "node2")
        self.assertEqual(node2.store.get(session_id).holder, "node2")

    @inlineCallbacks
    def _tls13_ticket_of_node1(self):
        """
        A cluster of three, and a TLS 1.3 ticket node1 made, once node2
        keeps its backup copy.
        """
        cluster = LocalCluster(self)
        yield cluster.start_all()
        first = yield cluster.client_round("node1", "TLSv1.3")
        yield cluster.settled()
        return cluster, first

    @inlineCallbacks
    def test_tls13_ticket_used_on_its_node_is_not_resumed_from_its_backup(self):
        """
        A TLS 1.3 ticket is single use: once node1 resumed it from its own
        store, the backup copy node2 kept of it is gone too, so the same
        ticket offered again (to node2, its backup node) gets a full
        handshake.
        """
        cluster, first = yield self._tls13_ticket_of_node1()
        node2 = cluster.nodes["node2"]
        self.assertEqual(len(node2.store), 1)
        again = yield cluster.client_round("node1", "TLSv1.3", first.session)
        self.assertTrue(again.reused)
        yield cluster.settled()
        # The backup of the new ticket node1 issued, and nothing else.
        self.assertEqual(len(node2.store), 1)
        replayed = yield cluster.client_round(
            "node2", "TLSv1.3", first.session)
        self.assertFalse(replayed.reused)
        self.assertEqual(node2.counters["resumed_peer"], 0)

    @inlineCallbacks
    def test_backup_copy_of_a_live_holder_it_cannot_reach_is_not_served(self):
        """
        node2 keeps the backup copy of node1's ticket, but its own link to
        node1 is down (as right after node1 restarted, while the link waits
        in its backoff) while node1 is connected to it: node1 still holds
        the ticket, so node2 gives a full handshake rather than a second
        copy, and node1 resumes the ticket once.  Found by
        tests/test_soak.py (docs/soak.md).
        """
        cluster, first = yield self._tls13_ticket_of_node1()
        node2 = cluster.nodes["node2"]
        yield node2.peer_links.link("node1").stopService()
        on_backup = yield cluster.client_round(
            "node2", "TLSv1.3", first.session)
        self.assertFalse(on_backup.reused)
        self.assertEqual(node2.recovery.counters["copies_withheld"], 1)
        on_holder = yield cluster.client_round(
            "node1", "TLSv1.3", first.session)
        self.assertTrue(on_holder.reused)

    @inlineCallbacks
    def _backup_copy_behind(self, nodes, path):
        """
        A TLS 1.2 session made on node1 and resumed on each node of
        C{path} in turn (node2, its backup node, keeps its copy
        throughout), then offered on node2 with node2's copy naming node3,
        the first holder after node1, as if the copies that followed were
        still on their way.
        """
        cluster = LocalCluster(self, nodes=nodes)
        yield cluster.start_all()
        result = yield cluster.client_round("node1", "TLSv1.2")
        for node in path:
            result = yield cluster.client_round(
                node, "TLSv1.2", result.session)
            self.assertTrue(result.reused)
        yield cluster.settled()
        node2 = cluster.nodes["node2"]
        session_id = result.session.id
        node2.store.put(node2.store.get(session_id).with_holder("node3"))
        on_node2 = yield cluster.client_round(
            "node2", "TLSv1.2", result.session)
        self.assertTrue(on_node2.reused)
        self.assertIsNone(cluster.nodes[path[-1]].store.get(session_id))
        return node2.recovery.counters["redirects_followed"]

    @inlineCallbacks
    def test_backup_copy_naming_a_former_holder_follows_its_redirect(self):
        """
        node2's copy still names node3, which has given the session to
        node1 since: node3 sends node2 on to node1, and the session
        resumes, fetched from node1.
        """
        followed = yield self._backup_copy_behind(
            ("node1", "node2", "node3"), ("node3", "node1"))
        self.assertEqual(followed, 1)

    @inlineCallbacks
    def test_backup_copy_two_holders_behind_follows_both_redirects(self):
        """
        The session moved twice since node3 had it (node3 gave it to node4,
        node4 to node1): node2 follows node3's redirect and node4's, and
        the session resumes, fetched from node1.  Seen in the benchmark's
        round robin (benchmarks/RESULTS.md).
        """
        followed = yield self._backup_copy_behind(
            ("node1", "node2", "node3", "node4"), ("node3", "node4", "node1"))
        self.assertEqual(followed, 2)

    @inlineCallbacks
    def test_backup_node_sends_a_fetch_to_the_live_holder(self):
        """
        node3 cannot reach node1, holder of the ticket, and asks node2, its
        backup node: node1 is alive, so node2 keeps its copy and names
        node1 instead of serving the ticket a second time.
        """
        cluster, first = yield self._tls13_ticket_of_node1()
        node3 = cluster.nodes["node3"]
        yield node3.peer_links.link("node1").stopService()
        on_node3 = yield cluster.client_round(
            "node3", "TLSv1.3", first.session)
        self.assertFalse(on_node3.reused)
        self.assertGreaterEqual(
            cluster.nodes["node2"].counters["copies_withheld"], 1)
        on_holder = yield cluster.client_round(
            "node1", "TLSv1.3", first.session)
        self.assertTrue(on_holder.reused)

    @inlineCallbacks
    def test_session_given_away_comes_back_through_its_maker(self):
        """
        The session goes round the cluster and back to node1, which made it
        and gave it away: nodes follow tombstones and redirects to whoever
        holds it.
        """
        cluster = LocalCluster(self)
        yield cluster.start_all()
        result = yield cluster.client_round("node1", "TLSv1.2")
        for node in ("node2", "node3", "node1", "node2"):
            result = yield cluster.client_round(
                node, "TLSv1.2", result.session)
            self.assertTrue(result.reused, f"not resumed on {node}")
        # The purges and backups it sent settle within a moment.
        yield deferLater(reactor, 0.2, lambda: None)
        session_id = result.session.id
        holders = [name for name, node in cluster.nodes.items()
                   if (state := node.store.get(session_id)) is not None
                   and state.holder == name]
        self.assertEqual(holders, ["node2"])

    @inlineCallbacks
    def test_s_client_session_moves_across_nodes(self):
        for version in ("TLSv1.2", "TLSv1.3"):
            cluster = LocalCluster(self)
            yield cluster.start_all()
            session_file = self.mktemp()
            first = yield s_client_round(
                cluster.ports["node1"], cluster.ca_cert,
                                         version, session_out=session_file)
            self.assertIn("New, " + version, first)
            for node in ("node2", "node3"):
                out = self.mktemp()
                result = yield s_client_round(
                    cluster.ports[node], cluster.ca_cert, version,
                    session_in=session_file, session_out=out)
                self.assertIn("Reused, " + version, result)
                # A resumed TLS 1.2 session keeps its id: s_client writes
                # no new file for it.
                if os.path.exists(out):
                    session_file = out
            yield cluster.stop_all()


# What a node's service picks for a TLS 1.2 client with the test PKI's P-256
# certificate, first of the default list; and a list without it.
_FIRST_TLS12_CIPHER = "ECDHE-ECDSA-AES128-GCM-SHA256"
_WITHOUT_IT = ('[tls]\ntls12_ciphers = "ECDHE-ECDSA-AES256-GCM-SHA384"\n\n'
               '[[tls.service]]')


class ForbiddenCipherTests(TestCase):
    """
    A node resumes no session whose cipher its configuration does not allow
    now, wherever the session comes from: a full handshake, counted.
    """

    @inlineCallbacks
    def _made_on_node1(self, cluster):
        made = yield cluster.client_round("node1", "TLSv1.2")
        kept = cluster.nodes["node1"].store.get(made.session.id)
        self.assertEqual(session_fields(kept.der).cipher, _FIRST_TLS12_CIPHER)
        return made

    @inlineCallbacks
    def test_stored_sessions_of_a_cipher_a_reload_took_out_are_not_resumed(self):
        """
        Prints its figures: sessions offered after the reload, how many
        resumed, and the counter and metric of the refusals.
        """
        cluster = LocalCluster(self, nodes=("node1",), metrics=True)
        cluster.start("node1")
        made = []
        for _ in range(10):
            made.append((yield self._made_on_node1(cluster)))
        cluster.edit("node1", "[[tls.service]]", _WITHOUT_IT)
        self.assertTrue(cluster.services["node1"].reload())
        again = []
        for result in made:
            again.append((yield cluster.client_round(
                "node1", "TLSv1.2", result.session)))
        self.assertEqual([(r.reused, r.echo) for r in again],
                         [(False, b"hello")] * len(made))
        refused = cluster.nodes["node1"].stats()["engine.cipher_not_allowed"]
        self.assertEqual(refused, len(made))
        samples = yield Deferred.fromCoroutine(
            scrape_metrics(cluster.metrics_ports["node1"]))
        metric = samples["sslshare_sessions_refused_total"][
            frozenset({("reason", "cipher_not_allowed")})]
        self.assertEqual(metric, len(made))
        # The session made in its place, with a cipher allowed, resumes.
        third = yield cluster.client_round("node1", "TLSv1.2", again[0].session)
        self.assertTrue(third.reused)
        print(f"\ncipher taken out by a reload: {len(made)} stored sessions "
              f"offered, {sum(r.reused for r in again)} resumed; "
              f"engine.cipher_not_allowed {refused}, "
              f'sslshare_sessions_refused_total{{reason="cipher_not_allowed"}}'
              f" {metric:g}")

    @inlineCallbacks
    def test_session_from_a_peer_of_a_cipher_this_node_forbids_is_not_resumed(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"))
        cluster.edit("node2", "[[tls.service]]", _WITHOUT_IT)
        yield cluster.start_all()
        made = yield self._made_on_node1(cluster)
        elsewhere = yield cluster.client_round("node2", "TLSv1.2", made.session)
        self.assertFalse(elsewhere.reused)
        self.assertEqual(elsewhere.echo, b"hello")
        self.assertEqual(
            cluster.nodes["node2"].stats()["engine.cipher_not_allowed"], 1)


class ALPNTests(TestCase):
    """
    A node's C{[tls]} ALPN settings reach its engine, and a reload changes
    them.
    """

    @inlineCallbacks
    def test_client_without_a_protocol_of_the_node_gets_alert_unless_ignored(self):
        cluster = LocalCluster(self, nodes=("node1",))
        cluster.edit("node1", "[[tls.service]]",
                     '[tls]\nalpn = ["h2"]\n\n[[tls.service]]')
        cluster.start("node1")
        error = yield self.assertFailure(
            cluster.client_round("node1", "TLSv1.3", alpn=["spdy/1"]),
            ssl.SSLError)
        self.assertIn("alert no application protocol", str(error))
        stats = cluster.nodes["node1"].stats()
        self.assertEqual(stats["engine.failed:no application protocol"], 1)
        self.assertEqual(stats["failed"], 1)
        cluster.edit("node1", 'alpn = ["h2"]\n',
                     'alpn = ["h2"]\nalpn_mismatch = "ignore"\n')
        self.assertTrue(cluster.services["node1"].reload())
        served = yield cluster.client_round("node1", "TLSv1.3", alpn=["spdy/1"])
        self.assertEqual((served.alpn, served.echo), (None, b"hello"))


class FailingPeerTests(TestCase):
    """
    A peer that is killed, or stalls, turns its sessions into full
    handshakes within the lookup budget; nothing hangs.  node1 runs as a
    C{twistd} process, so that killing it is what an operator would see.
    """

    @inlineCallbacks
    def _session_of_node1_then_kill_it(self, version):
        cluster = LocalCluster(self, nodes=("node1", "node2"), budget_ms=100)
        yield cluster.spawn("node1")
        cluster.start("node2")
        yield cluster.wait_linked()
        first = yield cluster.client_round("node1", version)
        yield cluster.kill("node1")
        return cluster, first

    @inlineCallbacks
    def _full_within_budget(self, cluster, first, version):
        started = time.monotonic()
        second = yield cluster.client_round("node2", version, first.session)
        elapsed = time.monotonic() - started
        self.assertFalse(second.reused)
        self.assertEqual(second.echo, b"hello")
        # The budget is 100 ms; the rest is one full handshake and the echo.
        self.assertLess(elapsed, 1.0)
        self.assertEqual(cluster.nodes["node2"].counters["full"], 1)

    @inlineCallbacks
    def test_session_of_a_killed_node_gives_full_handshake(self):
        cluster, first = yield self._session_of_node1_then_kill_it("TLSv1.3")
        yield self._full_within_budget(cluster, first, "TLSv1.3")

    @inlineCallbacks
    def test_stalled_peer_costs_at_most_the_budget(self):
        """
        node1's cluster port is taken over by a server that accepts and
        never answers.
        """
        cluster, first = yield self._session_of_node1_then_kill_it("TLSv1.2")
        silent = SilentListener(cluster.amp_ports["node1"])
        self.addCleanup(silent.stop)
        # Let node2's link reconnect to the silent server.
        yield deferLater(reactor, 1.5, lambda: None)
        yield self._full_within_budget(cluster, first, "TLSv1.2")


class TwistdTests(TestCase):
    """
    The node as operators run it: C{twistd -n sslshare --config FILE}.
    """

    def _twistd(self, *arguments):
        return [sys.executable, "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", *arguments]

    @inlineCallbacks
    def test_bad_configuration_is_one_line_and_nonzero_exit(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[node]\nid = "node1"\n')
        command = self._twistd("sslshare", "--config", path)
        out, err, code = yield getProcessOutputAndValue(
            command[0], command[1:], env=os.environ)
        self.assertNotEqual(code, 0)
        lines = err.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, err.decode())
        self.assertIn(path, lines[0])
        self.assertNotIn("Traceback", err.decode())

    @inlineCallbacks
    def test_session_from_twistd_node1_resumes_on_twistd_node2(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"))
        for node in ("node1", "node2"):
            yield cluster.spawn(node)
        # The nodes link up on their own, with backoff.
        yield deferLater(reactor, 1.0, lambda: None)
        for version in ("TLSv1.2", "TLSv1.3"):
            first = yield cluster.client_round("node1", version)
            second = yield cluster.client_round(
                "node2", version, first.session)
            self.assertTrue(second.reused, version)


class _GarbledStatsProtocol(RoguePeerProtocol):
    """
    A node that answers Stats with a counter that is no number.
    """

    rogue = frozenset({Stats.commandName})

    @Stats.responder
    def _stats(self):
        return {"counters": json.dumps({"full": "many"})}


class OperatorToolTests(TestCase):
    """
    C{sslshare stats} and C{sslshare pki init}, as an operator types them.
    """

    def _sslshare(self, *arguments):
        return getProcessOutputAndValue(
            sys.executable,
            ["-c", "from sslshare.cli import main; main()", *arguments],
            env=os.environ)

    @inlineCallbacks
    def test_stats_prints_a_nodes_counters_over_the_cluster_channel(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"))
        yield cluster.start_all()
        yield cluster.client_round("node1", "TLSv1.3")
        output, error, code = yield self._sslshare(
            "stats", "--config", cluster.paths["node2"], "--node", "node1",
            "--json")
        self.assertEqual(code, 0, error.decode())
        counters = json.loads(output)
        self.assertEqual(counters["full"], 1)
        self.assertEqual(counters["peers.connected"], 1)

    @inlineCallbacks
    def test_stats_as_text_names_the_node_that_answered(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"))
        yield cluster.start_all()
        output, error, code = yield self._sslshare(
            "stats", "--config", cluster.paths["node2"], "--node", "node1")
        self.assertEqual(code, 0, error.decode())
        lines = output.decode().splitlines()
        self.assertEqual(lines[0], "node node1")
        self.assertIn("full", [line.split()[0] for line in lines[1:]])

    @inlineCallbacks
    def test_config_check_reads_every_file_without_starting_a_node(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"))
        state_dir = os.path.join(cluster.directory, "state", "node1")
        output, error, code = yield self._sslshare(
            "config", "check", cluster.paths["node1"])
        self.assertEqual((code, output.decode()),
                         (0, f"{cluster.paths['node1']}: node node1 of "
                             f"cluster test: ok\n"), error.decode())
        # Nothing written: the state directory is the node's to make.
        self.assertFalse(os.path.exists(state_dir))

    @inlineCallbacks
    def test_config_check_names_the_file_that_is_wrong_in_one_line(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"))
        state_key = os.path.join(cluster.directory, "pki", "state.key")
        with open(state_key, "w") as f:
            f.write("not a key\n")
        output, error, code = yield self._sslshare(
            "config", "check", cluster.paths["node1"])
        lines = error.decode().strip().splitlines()
        self.assertEqual((code, output, len(lines)), (2, b"", 1), lines)
        self.assertIn(state_key, lines[0])

    @inlineCallbacks
    def test_config_check_names_the_key_of_a_mismatched_key_file(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"))
        path = cluster.paths["node1"]
        for old, new, message in (
                ("pki/localhost-key.pem", "pki/node2-key.pem",
                 "tls.service[0].key: does not match "
                 "tls.service[0].certificate"),
                ("pki/node1-key.pem", "pki/node2-key.pem",
                 "cluster.key: does not match cluster.certificate")):
            cluster.edit("node1", old, new)
            output, error, code = yield self._sslshare("config", "check", path)
            self.assertEqual((code, output, error.decode()),
                             (2, b"", f"sslshare: {path}: {message}\n"))
            cluster.edit("node1", new, old)

    @inlineCallbacks
    def test_config_check_names_the_key_of_an_unusable_certificate(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"))
        path = cluster.paths["node1"]
        state_key = os.path.join(cluster.directory, "pki", "state.key")
        cluster.edit("node1", "pki/localhost-chain.pem", "pki/state.key")
        output, error, code = yield self._sslshare("config", "check", path)
        self.assertEqual((code, output), (2, b""))
        self.assertTrue(error.decode().startswith(
            f"sslshare: {path}: tls.service[0].certificate: {state_key}: "),
            error)
        self.assertEqual(error.count(b"\n"), 1, error)

    @inlineCallbacks
    def test_version(self):
        from sslshare import __version__

        output, error, code = yield self._sslshare("--version")
        self.assertEqual((code, output.decode()),
                         (0, f"sslshare {__version__}\n"))

    @inlineCallbacks
    def test_stats_of_a_node_that_is_down_is_one_line(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"))
        output, error, code = yield self._sslshare(
            "stats", "--config", cluster.paths["node1"])
        self.assertEqual(code, 2)
        self.assertEqual(len(error.decode().strip().splitlines()), 1, error)
        self.assertIn("node1", error.decode())

    @inlineCallbacks
    def test_stats_refuses_an_answer_that_is_not_counters(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"))
        cluster.impersonate("node1", None, _GarbledStatsProtocol)
        output, error, code = yield self._sslshare(
            "stats", "--config", cluster.paths["node2"], "--node", "node1",
            "--json")
        self.assertEqual((code, output), (2, b""))
        self.assertEqual(len(error.decode().strip().splitlines()), 1, error)
        self.assertIn("counter 'full' is 'many', not a number", error.decode())

    @inlineCallbacks
    def test_pki_init_refuses_to_overwrite(self):
        directory = self.mktemp()
        arguments = ("pki", "init", directory, "--cluster", "c",
                     "--nodes", "a,b")
        _, error, code = yield self._sslshare(*arguments)
        self.assertEqual(code, 0, error.decode())
        self.assertTrue(os.path.exists(os.path.join(directory, "a.pem")))
        _, error, code = yield self._sslshare(*arguments)
        self.assertEqual(code, 2)
        self.assertIn("exists", error.decode())


class JoinedLookupTests(TestCase):
    """
    Concurrent lookups of one session on one node share one recovery.
    """

    @inlineCallbacks
    def test_two_lookups_of_one_session_ask_the_owner_once(self):
        # node2 keeps node1's backup copies: node3 has to ask.
        cluster = LocalCluster(self)
        yield cluster.start_all()
        first = yield cluster.client_round("node1", "TLSv1.2")
        request = LookupRequest(first.session.id, "TLSv1.2", "web")
        node3 = cluster.nodes["node3"]
        answers = yield gatherResults(
            [node3.recovery.recover(request), node3.recovery.recover(request)])
        self.assertEqual([answer.source for answer in answers], ["peer", "peer"])
        self.assertEqual(answers[0].state, answers[1].state)
        self.assertEqual(node3.recovery.counters["joined"], 1)
        self.assertEqual(cluster.nodes["node1"].counters["sessions_given"], 1)


class _Sink(Protocol):
    """
    Reads an 8-byte length and that many bytes, answers their SHA-256, and
    closes.
    """

    def connectionMade(self):
        self.received = b""

    def dataReceived(self, data):
        self.received += data
        if len(self.received) >= 8:
            length = int.from_bytes(self.received[:8], "big")
            if len(self.received) - 8 >= length:
                self.transport.write(
                    hashlib.sha256(self.received[8:8 + length]).digest())
                self.transport.loseConnection()


class _Source(Protocol):
    """
    Sends BULK bytes as soon as a client connects, then closes.
    """

    def connectionMade(self):
        self.transport.write(BULK)
        self.transport.loseConnection()


BULK = os.urandom(4 * 1024 * 1024)


def _bulk_client(port, ca_cert, payload):
    context = client_context(ca_cert)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as client:
            if payload:
                client.sendall(len(payload).to_bytes(8, "big") + payload)
            received = b""
            while chunk := client.recv(65536):
                received += chunk
            return received


class ProxyTests(TestCase):
    """
    Plaintext goes through the node intact both ways, and the backend
    closing its side ends the client's connection after its last byte.
    """

    @inlineCallbacks
    def test_four_megabytes_from_client_reach_the_backend_intact(self):
        cluster = LocalCluster(self, nodes=("node1",), backend=_Sink)
        cluster.start("node1")
        answer = yield deferToThread(_bulk_client, cluster.ports["node1"],
                                     cluster.ca_cert, BULK)
        self.assertEqual(answer, hashlib.sha256(BULK).digest())

    @inlineCallbacks
    def test_four_megabytes_from_backend_reach_the_client_intact(self):
        cluster = LocalCluster(self, nodes=("node1",), backend=_Source)
        cluster.start("node1")
        received = yield deferToThread(_bulk_client, cluster.ports["node1"],
                                       cluster.ca_cert, b"")
        self.assertEqual(len(received), len(BULK))
        self.assertEqual(received, BULK)


class OwnEndpointTests(SynchronousTestCase):
    """
    L{sslshare.tools.client_endpoint_for}: how C{sslshare stats} reaches a
    node's own cluster listener.
    """

    def test_tcp_and_unix_listeners(self):
        from sslshare.tools import client_endpoint_for

        self.assertEqual(
            [client_endpoint_for(listen) for listen in (
                "tcp:7441", "tcp:port=7441:interface=10.0.0.1",
                "tcp:7441:interface=0.0.0.0", "unix:/run/s/amp.sock",
                "unix:address=/run/s/amp.sock:mode=600")],
            ["tcp:host=127.0.0.1:port=7441", "tcp:host=10.0.0.1:port=7441",
             "tcp:host=127.0.0.1:port=7441", "unix:path=/run/s/amp.sock",
             "unix:path=/run/s/amp.sock"])

    def test_other_kinds_are_refused(self):
        from sslshare.tools import CommandError, client_endpoint_for

        self.assertRaises(CommandError, client_endpoint_for, "ssl:7441")
        self.assertRaises(CommandError, client_endpoint_for, "unix:mode=600")


class ConnectionLimitTests(TestCase):
    """
    C{max_connections} and C{idle_timeout_s}, over real sockets.
    """

    @inlineCallbacks
    def test_a_client_past_max_connections_is_closed_and_counted(self):
        import socket
        import ssl

        cluster = LocalCluster(self, nodes=("node1",),
                               node_options="max_connections = 1")
        yield cluster.start_all()
        held = yield deferToThread(socket.create_connection,
                                   ("127.0.0.1", cluster.ports["node1"]))
        self.addCleanup(held.close)
        factory = cluster.services["node1"]._clients
        yield until(lambda: len(factory.protocols) == 1)
        refused = cluster.client_round("node1", "TLSv1.3")
        yield self.assertFailure(refused, ssl.SSLError, ConnectionError,
                                 OSError)
        self.assertEqual(cluster.nodes["node1"].counters[
            "connections_refused"], 1)
        held.close()
        yield until(lambda: not factory.protocols)
        served = yield cluster.client_round("node1", "TLSv1.3")
        self.assertEqual(served.echo, b"hello")

    @inlineCallbacks
    def test_a_silent_connection_is_closed_after_the_idle_timeout(self):
        import socket
        import ssl
        import time

        cluster = LocalCluster(self, nodes=("node1",),
                               node_options="idle_timeout_s = 0.3")
        yield cluster.start_all()

        def silent_client():
            context = ssl.create_default_context(cafile=cluster.ca_cert)
            raw = socket.create_connection(
                ("127.0.0.1", cluster.ports["node1"]), timeout=10)
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                began = time.monotonic()
                # The handshake is done; say nothing and wait for the close.
                closed = tls.recv(1024)
                return closed, time.monotonic() - began

        closed, waited = yield deferToThread(silent_client)
        self.assertEqual(closed, b"")
        self.assertGreater(waited, 0.25)
        self.assertLess(waited, 5)
        self.assertEqual(cluster.nodes["node1"].counters["idle_timeouts"], 1)
