"""
The metrics page of real nodes, scraped with curl while real clients make
full and resumed handshakes, against the numbers C{sslshare stats} reads
over the cluster channel: the two views agree, and move by what happened.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sslshare import config, tools
from sslshare.cluster import ClusterTLS, PeerLink, PeerUnavailable
from sslshare.dev import pki
from sslshare.dev.throwaway import free_port
from sslshare.recovery import LOOKUP_SOURCES
from sslshare.state import StateKeys
from sslshare.tls import SESSION_REFUSALS
from tests.support.clients import connect_without_certificate
from tests.support.cluster import LocalCluster
from tests.support.databases import throwaway_server
from tests.support.metrics import probe, scrape_metrics
from tests.support.servers import haproxy
from tests.support.waiting import until


def _handshakes(samples, outcome):
    return samples["sslshare_handshakes_total"][frozenset({("outcome", outcome)})]


def _lookups(samples, source, suffix="count"):
    return samples[f"sslshare_lookup_duration_seconds_{suffix}"][
        frozenset({("source", source)})]


def _scrape(cluster, node):
    return Deferred.fromCoroutine(scrape_metrics(cluster.metrics_ports[node]))


def _stats(cluster, node):
    """
    C{node}'s counters as C{sslshare stats} asks for them.
    """
    return Deferred.fromCoroutine(tools.ask_stats(
        reactor, config.load(cluster.paths[node], reactor), node))


class MetricsPageTests(TestCase):

    def _assert_same_as_stats(self, samples, stats):
        for outcome in ("full", "resumed_local", "resumed_peer",
                        "resumed_repository", "failed"):
            self.assertEqual(_handshakes(samples, outcome),
                             stats.get(outcome, 0), outcome)
        for source in LOOKUP_SOURCES:
            self.assertEqual(_lookups(samples, source),
                             stats[f"lookup.{source}.count"], source)
            self.assertAlmostEqual(_lookups(samples, source, "sum"),
                                   stats[f"lookup.{source}.seconds"])
        self.assertEqual(samples["sslshare_store_sessions"][frozenset()],
                         stats["store.sessions"])
        self.assertEqual(samples["sslshare_store_bytes"][frozenset()],
                         stats["store.bytes"])
        for event in ("written", "rejected", "coalesced", "failed", "pauses"):
            self.assertEqual(
                samples["sslshare_checkpoints_total"][
                    frozenset({("event", event)})],
                stats.get(f"checkpoint.{event}", 0), event)
        for reason in SESSION_REFUSALS:
            self.assertEqual(
                samples["sslshare_sessions_refused_total"][
                    frozenset({("reason", reason)})],
                stats.get(f"engine.{reason}", 0), reason)
        for labels, value in samples["sslshare_peer_connected"].items():
            (peer,) = dict(labels).values()
            self.assertEqual(value, stats[f"peers.{peer}.connected"])

    @inlineCallbacks
    def test_full_local_and_peer_resumptions_counted_as_stats_count_them(self):
        # Three nodes: node2 keeps the backup copies of node1's sessions,
        # so node3 has to fetch them from node1.
        cluster = LocalCluster(self, metrics=True)
        yield cluster.start_all()
        before = yield _scrape(cluster, "node1")
        self.assertEqual(_handshakes(before, "full"), 0)
        self.assertEqual(_lookups(before, "local"), 0)

        tls12 = yield cluster.client_round("node1", "TLSv1.2")
        again = yield cluster.client_round("node1", "TLSv1.2", tls12.session)
        self.assertTrue(again.reused)
        moved = yield cluster.client_round("node3", "TLSv1.2", tls12.session)
        self.assertTrue(moved.reused)
        tls13 = yield cluster.client_round("node1", "TLSv1.3")
        resumed = yield cluster.client_round("node3", "TLSv1.3", tls13.session)
        self.assertTrue(resumed.reused)
        # A TLS 1.3 ticket is used once: offered again, node3 finds it
        # nowhere, and the client gets a full handshake.
        replayed = yield cluster.client_round(
            "node3", "TLSv1.3", tls13.session)
        self.assertFalse(replayed.reused)
        yield cluster.settled()

        node1 = yield _scrape(cluster, "node1")
        self.assertEqual(_handshakes(node1, "full"), 2)
        self.assertEqual(_handshakes(node1, "resumed_local"), 1)
        self.assertEqual(_handshakes(node1, "resumed_peer"), 0)
        self.assertEqual(_lookups(node1, "local"), 1)
        node3 = yield _scrape(cluster, "node3")
        self.assertEqual(_handshakes(node3, "resumed_peer"), 2)
        self.assertEqual(_handshakes(node3, "full"), 1)
        self.assertEqual(_lookups(node3, "peer"), 2)
        self.assertEqual(_lookups(node3, "miss"), 1)
        self.assertEqual(_lookups(node3, "local"), 0)
        self.assertGreater(_lookups(node3, "peer", "sum"), 0)
        self.assertEqual(node3["sslshare_peer_connected"],
                         {frozenset({("peer", "node1")}): 1,
                          frozenset({("peer", "node2")}): 1})
        self.assertGreater(node3["sslshare_store_sessions"][frozenset()], 0)
        self.assertGreater(node3["sslshare_store_bytes"][frozenset()], 0)

        for node, samples in (("node1", node1), ("node3", node3)):
            stats = yield _stats(cluster, node)
            self._assert_same_as_stats(samples, stats)

    @inlineCallbacks
    def test_backup_copy_of_a_live_holder_is_a_peer_lookup(self):
        # Two nodes: each keeps the backup copies of the other's sessions,
        # and a holder that runs gives the session itself.
        cluster = LocalCluster(self, nodes=("node1", "node2"), metrics=True)
        yield cluster.start_all()
        first = yield cluster.client_round("node1", "TLSv1.2")
        yield cluster.settled()
        resumed = yield cluster.client_round("node2", "TLSv1.2", first.session)
        self.assertTrue(resumed.reused)
        samples = yield _scrape(cluster, "node2")
        self.assertEqual(_lookups(samples, "local"), 0)
        self.assertEqual(_lookups(samples, "peer"), 1)
        self.assertEqual(_handshakes(samples, "resumed_peer"), 1)

    @inlineCallbacks
    def test_backup_copy_of_a_holder_gone_is_a_local_lookup(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"), metrics=True)
        yield cluster.start_all()
        first = yield cluster.client_round("node1", "TLSv1.2")
        yield cluster.settled()
        yield cluster.stop("node1")
        resumed = yield cluster.client_round("node2", "TLSv1.2", first.session)
        self.assertTrue(resumed.reused)
        samples = yield _scrape(cluster, "node2")
        self.assertEqual(_lookups(samples, "local"), 1)
        self.assertEqual(_lookups(samples, "peer"), 0)
        self.assertEqual(_handshakes(samples, "resumed_peer"), 1)

    @inlineCallbacks
    def test_latency_buckets_are_cumulative_up_to_the_count(self):
        cluster = LocalCluster(self, metrics=True)
        yield cluster.start_all()
        first = yield cluster.client_round("node1", "TLSv1.2")
        yield cluster.client_round("node3", "TLSv1.2", first.session)
        samples = yield _scrape(cluster, "node3")
        buckets = sorted(
            (float(dict(labels)["le"]), value)
            for labels, value in samples[
                "sslshare_lookup_duration_seconds_bucket"].items()
            if dict(labels)["source"] == "peer")
        counts = [value for _, value in buckets]
        self.assertEqual(counts, sorted(counts))
        self.assertEqual(buckets[-1], (float("inf"), 1))
        # The lookup ends within its budget (300 ms), far from 10 s.
        self.assertEqual(dict(buckets)[10.0], 1)

    @inlineCallbacks
    def test_session_from_the_owners_backup_node_is_counted_as_backup(self):
        cluster = LocalCluster(self, metrics=True)
        resumed = yield cluster.resume_from_the_backup_node()
        self.assertTrue(resumed.reused)
        samples = yield _scrape(cluster, "node3")
        self.assertEqual(_lookups(samples, "backup"), 1)
        self.assertEqual(_lookups(samples, "peer"), 0)
        self.assertEqual(_handshakes(samples, "resumed_peer"), 1)
        self.assertEqual(samples["sslshare_peer_connected"][
            frozenset({("peer", "node1")})], 0)
        self.assertEqual(samples["sslshare_peer_connected"][
            frozenset({("peer", "node2")})], 1)

    @inlineCallbacks
    def test_connection_without_a_node_certificate_is_a_refused_connection(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"), metrics=True)
        yield cluster.start_all()
        yield deferToThread(connect_without_certificate,
                            cluster.amp_ports["node1"], cluster.ca_cert)
        yield until(lambda: cluster.nodes["node1"].peer_server
                     .counters["refused_connections"] == 1)
        samples = yield _scrape(cluster, "node1")
        self.assertEqual(
            samples["sslshare_peer_refused_connections_total"][frozenset()], 1)
        self.assertEqual(
            samples["sslshare_peer_refused_commands_total"][frozenset()], 0)
        stats = yield _stats(cluster, "node1")
        self.assertEqual(stats["cluster.refused_connections"], 1)

    @inlineCallbacks
    def test_refusals_of_cluster_nodes_show_in_stats_and_metrics(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"), metrics=True)
        yield cluster.start_all()
        warnings = []

        def observe(event):
            if event.get("log_level") == LogLevel.warn:
                warnings.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        node3 = pki.add_node(cluster.pki.directory, "test", "node3")
        node2 = cluster.pki.node("node2")
        keys = StateKeys.from_file(os.path.join(cluster.pki.directory,
                                                "state.key"))
        endpoint = f"tcp:host=127.0.0.1:port={cluster.amp_ports['node1']}"
        attempts = [
            # A node of the cluster that is no peer of node1.
            ("node3", node3, endpoint, keys),
            # A second node2, on another host.
            ("node2", node2, f"{endpoint}:bindAddress=127.0.0.2", keys),
            # node2 with another state key.
            ("node2", node2, endpoint, StateKeys([StateKeys.generate()])),
        ]
        for node_id, files, at, state_keys in attempts:
            link = PeerLink("node1", at, ClusterTLS(
                cluster.ca_cert, files.certificate, files.key, "test", node_id),
                keys=lambda state_keys=state_keys: state_keys)
            link.startService()
            yield self.assertFailure(
                link.when_connected(fail_after_failures=1), PeerUnavailable)
            # One attempt each: no retry to count.
            yield link.stopService()
        counters = cluster.nodes["node1"].peer_server.counters
        names = ("refused_nodes", "duplicate_nodes", "key_mismatches")
        yield until(lambda: all(counters[name] for name in names))
        stats = yield _stats(cluster, "node1")
        samples = yield _scrape(cluster, "node1")
        for counter, metric in [
                ("refused_nodes", "sslshare_peer_refused_nodes_total"),
                ("duplicate_nodes", "sslshare_peer_duplicate_nodes_total"),
                ("key_mismatches", "sslshare_peer_key_mismatches_total")]:
            self.assertEqual(stats[f"cluster.{counter}"], 1, counter)
            self.assertEqual(samples[metric][frozenset()], 1, metric)
        # The lines an operator reads, for the records (docs/hardening.md).
        print("".join(f"\n  {line}" for line in warnings
                      if "refused" in line), flush=True)

    @inlineCallbacks
    def test_nodes_in_one_process_keep_their_numbers_apart(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"), metrics=True)
        yield cluster.start_all()
        yield cluster.client_round("node1", "TLSv1.3")
        node1 = yield _scrape(cluster, "node1")
        node2 = yield _scrape(cluster, "node2")
        self.assertEqual(_handshakes(node1, "full"), 1)
        self.assertEqual(_handshakes(node2, "full"), 0)

    @inlineCallbacks
    def test_metrics_stop_with_the_node(self):
        cluster = LocalCluster(self, nodes=("node1",), metrics=True)
        cluster.start("node1")
        yield _scrape(cluster, "node1")
        yield cluster.stop("node1")
        with socket.socket() as probe:
            self.assertNotEqual(probe.connect_ex(
                ("127.0.0.1", cluster.metrics_ports["node1"])), 0)


HAPROXY_HEALTH_CHECKS = """\
global
    maxconn 64
    stats socket {stats} level admin
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend tls
    bind 127.0.0.1:{port}
    default_backend sslshare
backend sslshare
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 200ms fall 1 rise 1
    server node1 127.0.0.1:{node_port} check port {metrics_port}
"""


def _haproxy_status(stats, server):
    """
    The status (C{UP}, C{DOWN}, ...) HAProxy's stats socket C{stats} gives
    C{server} of the backend, or C{None} while it does not answer.
    """
    try:
        with socket.socket(socket.AF_UNIX) as control:
            control.settimeout(5)
            control.connect(stats)
            control.sendall(b"show stat\n")
            answer = b""
            while chunk := control.recv(65536):
                answer += chunk
    except OSError:
        return None
    lines = answer.decode().splitlines()
    if not lines or not lines[0].startswith("# "):
        return None
    columns = lines[0][2:].split(",")
    for line in lines[1:]:
        row = dict(zip(columns, line.split(",")))
        if row.get("pxname") == "sslshare" and row.get("svname") == server:
            return row["status"].split()[0]
    return None


class ProbeTests(TestCase):
    """
    C{/healthz} and C{/readyz} on the metrics listener, fetched with
    C{curl} as a load balancer's or Kubernetes' probe would.
    """

    @inlineCallbacks
    def test_alive_and_ready_while_serving(self):
        cluster = LocalCluster(self, nodes=("node1",), metrics=True)
        yield cluster.start_all()
        port = cluster.metrics_ports["node1"]
        self.assertEqual((yield Deferred.fromCoroutine(probe(port, "/healthz"))),
                         (200, "ok\n"))
        self.assertEqual((yield Deferred.fromCoroutine(probe(port, "/readyz"))),
                         (200, "ready\n"))

    @inlineCallbacks
    def _node_of_a_redis_repository(self):
        """
        A started node of the repository topology with a Redis server of
        its own: fires with both.
        """
        server = throwaway_server(self, "redis").start()
        cluster = LocalCluster(
            self, nodes=("node1",), metrics=True,
            repository=f'topology = "repository"\nkind = "redis"\n'
                       f'url = "{server.url}"\n')
        yield cluster.start_all()
        return server, cluster

    @inlineCallbacks
    def test_not_ready_while_the_repository_does_not_answer(self):
        server, cluster = yield self._node_of_a_redis_repository()
        port = cluster.metrics_ports["node1"]
        self.assertEqual(
            (yield Deferred.fromCoroutine(probe(port, "/readyz")))[0], 200)
        server.stop()
        status, body = yield Deferred.fromCoroutine(probe(port, "/readyz"))
        self.assertEqual(status, 503)
        self.assertTrue(body.startswith(
            "not ready: the repository does not answer: redis "), body)
        self.assertEqual(
            (yield Deferred.fromCoroutine(probe(port, "/healthz")))[0], 200)
        server.start()
        yield until(lambda: Deferred.fromCoroutine(probe(port, "/readyz"))
                    .addCallback(lambda answer: answer[0] == 200))

    @inlineCallbacks
    def test_haproxy_takes_a_node_out_while_it_is_not_ready(self):
        # README's load balancer: HAProxy in TCP mode, checking /readyz
        # on the metrics port of each node.
        server, cluster = yield self._node_of_a_redis_repository()
        # Short: a unix socket's path is at most 107 bytes.
        directory = tempfile.mkdtemp(prefix="haproxy-")
        self.addCleanup(shutil.rmtree, directory)
        stats = os.path.join(directory, "stats")
        haproxy(self, HAPROXY_HEALTH_CHECKS.format(
            stats=stats, port=free_port(), node_port=cluster.ports["node1"],
            metrics_port=cluster.metrics_ports["node1"]))

        def status_becomes(status):
            return until(lambda: deferToThread(_haproxy_status, stats, "node1")
                         .addCallback(lambda now: now == status),
                         message=f"HAProxy never saw node1 {status}")

        yield status_becomes("UP")
        server.stop()
        yield status_becomes("DOWN")
        server.start()
        yield status_becomes("UP")

    @inlineCallbacks
    def test_not_ready_once_stopping(self):
        cluster = LocalCluster(self, nodes=("node1",), metrics=True)
        yield cluster.start_all()
        service = cluster.services["node1"]
        self.assertIsNone((yield service.readiness()))
        stopping = service.stopService()
        self.assertEqual((yield service.readiness()), "the node is stopping")
        yield stopping


class BuildAndProcessTests(TestCase):

    @inlineCallbacks
    def test_the_release_and_the_process_are_on_the_page(self):
        from sslshare import __version__

        cluster = LocalCluster(self, nodes=("node1",), metrics=True)
        yield cluster.start_all()
        samples = yield Deferred.fromCoroutine(
            scrape_metrics(cluster.metrics_ports["node1"]))
        self.assertEqual(samples["sslshare_build_info"],
                         {frozenset({("version", __version__)}): 1.0})
        for name in ("process_cpu_seconds_total",
                     "process_resident_memory_bytes", "process_open_fds"):
            self.assertGreater(samples[name][frozenset()], 0, name)


class EveryCounterTests(SynchronousTestCase):
    """
    The counters the node, its engine, recovery chain, store, checkpoint
    pipelines, peer channel and DNS discovery keep are listed (their
    C{COUNTERS}), so that the stats and the metrics page show each from the
    start, zero included.
    """

    def test_every_counter_the_code_counts_is_listed(self):
        import re

        from sslshare import digest, node, recovery, store, tls
        from sslshare.cluster import _discovery, _server

        # Counters named as a literal; the labelled ones (failed:<reason>)
        # are built with an f-string.
        for module, counting in (
                (node, r'self\.counters\["(\w+)"\]'),
                (recovery, r'self\.counters\["(\w+)"\]'),
                (store, r'self\.counters\["(\w+)"\]'),
                (digest, r'self\.counters\["(\w+)"\]'),
                (_discovery, r'self\.counters\["(\w+)"\]'),
                (tls, r'counters\[\s*"(\w+)"\]'),
                (_server, r'counters\[\s*"(\w+)"\]')):
            with open(module.__file__) as f:
                counted = set(re.findall(counting, f.read()))
            self.assertTrue(counted, module.__name__)
            self.assertEqual(sorted(counted - set(module.COUNTERS)), [],
                             module.__name__)

    def test_a_fresh_node_shows_every_counter_at_zero(self):
        from sslshare import digest, node, recovery, store
        from tests.support.memory import MemoryCluster

        stats = MemoryCluster()["node1"].stats()
        for module, prefix in ((node, ""), (recovery, "recovery."),
                               (store, "store."), (digest, "checkpoint.")):
            for name in module.COUNTERS:
                self.assertEqual(stats.get(prefix + name), 0,
                                 prefix + name)


class StatsOnThePageTests(TestCase):
    """
    The metrics page of a real node carries every number C{sslshare stats}
    shows, each once and with the same value, and nothing else of
    sslshare's but the build.
    """

    def _assert_page_is_stats(self, samples, stats):
        from sslshare.metrics import sample_of

        expected = {}
        for stat, value in stats.items():
            sample = sample_of(stat)
            expected.setdefault(sample.name, {})[
                frozenset(sample.labels)] = value
        shown = {name: values for name, values in samples.items()
                 if name.startswith("sslshare_")
                 and name != "sslshare_build_info"
                 and not name.endswith("_bucket")}
        self.assertEqual(sorted(set(shown) - set(expected)), [],
                         "on the page, not in the stats")
        self.assertEqual(sorted(set(expected) - set(shown)), [],
                         "in the stats, not on the page")
        for name, values in expected.items():
            self.assertEqual(shown[name], values, name)

    @inlineCallbacks
    def test_every_stat_is_on_the_page_and_nothing_else(self):
        cluster = LocalCluster(
            self, nodes=("node1", "node2"), metrics=True,
            repository='kind = "sqlite"\npath = "{directory}/s.sqlite3"\n')
        yield cluster.start_all()
        first = yield cluster.client_round("node1", "TLSv1.2")
        resumed = yield cluster.client_round("node2", "TLSv1.2", first.session)
        self.assertTrue(resumed.reused)
        yield cluster.settled()
        for node in ("node1", "node2"):
            stats = yield _stats(cluster, node)
            for name in ("reloads", "reload_failures", "recovery.lookups_shed",
                         "recovery.unsealable", "backend_failures",
                         "cluster.refused_nodes", "engine.lookups",
                         "engine.malformed_psk", "cluster.commands:Stats",
                         "checkpoint.pauses_cut", "repository.puts",
                         "connections_open", "received_bytes", "sent_bytes"):
                self.assertIn(name, stats, node)
            self.assertGreater(stats["received_bytes"], 0, node)
            self.assertGreater(stats["sent_bytes"], 0, node)
            samples = yield _scrape(cluster, node)
            self._assert_page_is_stats(samples, stats)
        self.assertEqual(samples["sslshare_reloads_total"][frozenset()], 0)
        self.assertEqual(samples["sslshare_handshakes_total"][
            frozenset({("outcome", "resumed_peer")})], 1)

    @inlineCallbacks
    def test_open_client_connections(self):
        cluster = LocalCluster(self, nodes=("node1",), metrics=True)
        yield cluster.start_all()
        samples = yield _scrape(cluster, "node1")
        self.assertEqual(samples["sslshare_connections_open"][frozenset()], 0)
        held = socket.create_connection(("127.0.0.1", cluster.ports["node1"]))
        self.addCleanup(held.close)
        yield until(lambda: cluster.services["node1"].open_connections == 1)
        samples = yield _scrape(cluster, "node1")
        self.assertEqual(samples["sslshare_connections_open"][frozenset()], 1)
