"""
A node's life while it runs: a reload applies a new configuration whole or
not at all, without touching open connections or stored sessions; a
stopping node drains its connections and hands its sessions over, so that
they resume elsewhere; the state key rotates without losing a session.

Nodes run in this process (L{LocalCluster.start}), where tests call
L{NodeService.reload} and C{stopService} themselves, and as C{twistd}
processes, which get SIGHUP and SIGTERM as an operator would send them.
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import sys
import threading
import time

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sslshare.config import NodeConfig
from sslshare.dev.throwaway import free_port
from sslshare.node import fired_within
from sslshare.service import (
    EXPIRY_INTERVAL,
    FIXED_AT_RUNTIME,
    RELOADABLE,
    _RepositoryService,
)
from sslshare.state import StateKeys
from tests.support.clients import client_context
from tests.support.cluster import LocalCluster
from tests.support.files import write_private
from tests.support.memory import MemoryRepository
from tests.support.processes import accepted_on, open_descriptors
from tests.support.servers import TrickleFactory
from tests.support.waiting import until

SQLITE = 'topology = "repository"\nkind = "sqlite"\npath = "{directory}/s.sqlite3"\n'



def holders(cluster, session_id):
    """
    The nodes started in this process that keep C{session_id}.
    """
    return sorted(name for name, node in cluster.nodes.items()
                  if node.store.get(session_id) is not None)


class _LogCapture:
    def capture_log(self):
        self.logged = []

        def observe(event):
            self.logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def lines_with(self, text):
        return [line for line in self.logged if text in line]


class BackendFailureTests(_LogCapture, TestCase):
    """
    A backend that refuses connections costs each client its connection,
    closed at once, and the node nothing that lasts.
    """

    def setUp(self):
        self.capture_log()

    @inlineCallbacks
    def test_backend_down_closes_every_client_and_frees_its_connection(self):
        cluster = LocalCluster(self, nodes=("node1",))
        backend = cluster.backend_listener.getHost().port
        yield cluster.backend_listener.stopListening()
        node = cluster.start("node1")
        port = cluster.ports["node1"]
        descriptors = open_descriptors()
        for _ in range(10):
            result = yield cluster.client_round("node1", "TLSv1.3")
            self.assertEqual(result.echo, b"")
        yield until(lambda: accepted_on(port) == 0, timeout=5)
        self.assertEqual(open_descriptors(), descriptors)
        self.assertEqual(node.stats()["backend_failures"], 10)
        warned = self.lines_with("unreachable, closing client 127.0.0.1:")
        self.assertEqual(len(warned), 1)
        self.assertIn(f"backend tcp:host=127.0.0.1:port={backend} ", warned[0])

    @inlineCallbacks
    def test_backend_down_cuts_off_a_client_that_keeps_its_socket_open(self):
        cluster = LocalCluster(self, nodes=("node1",))
        yield cluster.backend_listener.stopListening()
        cluster.start("node1")
        port = cluster.ports["node1"]
        released = threading.Event()
        self.addCleanup(released.set)

        def silent_client():
            context = client_context(cluster.ca_cert)
            with socket.create_connection(("127.0.0.1", port)) as raw:
                with context.wrap_socket(raw, server_hostname="localhost"):
                    # Never answers the close_notify, never closes.
                    released.wait(10)

        holding = deferToThread(silent_client)
        yield until(lambda: accepted_on(port) == 1, timeout=5)
        yield until(lambda: accepted_on(port) == 0, timeout=5)
        released.set()
        yield holding


def _twistd(*arguments):
    return getProcessOutputAndValue(
        sys.executable,
        ["-c", "from twisted.scripts.twistd import run; run()", *arguments],
        env=os.environ)


class BusyListenerTests(TestCase):
    """
    A listener that cannot listen stops the node at start with one line
    naming the file, the key, the endpoint and the reason.
    """

    def _busy(self, port):
        holder = socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        self.addCleanup(holder.close)

    @inlineCallbacks
    def _refused_at_start(self, key, port_of):
        cluster = LocalCluster(self, nodes=("node1", "node2"), metrics=True)
        port = port_of(cluster)
        self._busy(port)
        path = cluster.paths["node1"]
        output, error, code = yield _twistd(
            "-n", "--pidfile=", "--logfile", os.path.join(cluster.directory, "n.log"),
            "sslshare", "--config", path)
        self.assertNotEqual(code, 0)
        self.assertEqual(
            error.decode().strip(),
            f"sslshare: {path}: {key}: 127.0.0.1:{port}: address already in use")

    def test_busy_client_port_stops_the_node(self):
        return self._refused_at_start("node.listen",
                                      lambda cluster: cluster.ports["node1"])

    def test_busy_cluster_port_stops_the_node(self):
        return self._refused_at_start("cluster.listen",
                                      lambda cluster: cluster.amp_ports["node1"])

    def test_busy_metrics_port_stops_the_node(self):
        return self._refused_at_start(
            "node.metrics_listen", lambda cluster: cluster.metrics_ports["node1"])

    @inlineCallbacks
    def test_busy_port_stops_a_daemon_with_its_reason(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"))
        port = cluster.ports["node1"]
        self._busy(port)
        pidfile = os.path.join(cluster.directory, "n.pid")
        log = os.path.join(cluster.directory, "n.log")
        output, error, code = yield _twistd(
            "--pidfile", pidfile, "--logfile", log,
            "sslshare", "--config", cluster.paths["node1"])
        self.assertNotEqual(code, 0)
        self.assertIn("ListenError: ", error.decode())
        with open(log) as f:
            self.assertIn(f"node.listen: 127.0.0.1:{port}: address already in use",
                          f.read())
        self.assertFalse(os.path.exists(pidfile))

    def test_busy_port_fails_an_in_process_start(self):
        from sslshare.service import ListenError

        cluster = LocalCluster(self, nodes=("node1",))
        self._busy(cluster.ports["node1"])
        self.assertRaises(ListenError, cluster.start, "node1")


class ReloadTests(_LogCapture, TestCase):
    """
    L{NodeService.reload} on nodes in this process.
    """

    def setUp(self):
        self.capture_log()

    @inlineCallbacks
    def test_new_certificate_serves_new_connections_while_an_open_one_streams(self):
        backend = TrickleFactory(chunks=10, interval=0.1)
        cluster = LocalCluster(self, nodes=("node1",), backend=backend)
        cluster.start("node1")
        streaming = cluster.client_round("node1", "TLSv1.3")
        yield backend.transfers.get()
        chain, key = cluster.server_certificate("renewed",
                                                ("localhost", "renewed.test"))
        cluster.edit("node1", "pki/localhost-chain.pem", chain)
        cluster.edit("node1", "pki/localhost-key.pem", key)
        self.assertTrue(cluster.services["node1"].reload())
        fresh = yield cluster.client_round("node1", "TLSv1.2")
        self.assertIn("renewed.test", fresh.peer_names)
        old = yield streaming
        self.assertEqual(old.echo, b"hello" * 10)
        self.assertNotIn("renewed.test", old.peer_names)
        self.assertEqual(cluster.nodes["node1"].stats()["reloads"], 1)

    @inlineCallbacks
    def _resumes_after_reload(self, version):
        cluster = LocalCluster(self, nodes=("node1", "node2"))
        yield cluster.start_all()
        first = yield cluster.client_round("node1", version)
        chain, key = cluster.server_certificate("renewed")
        for node in ("node1", "node2"):
            cluster.edit(node, "pki/localhost-chain.pem", chain)
            cluster.edit(node, "pki/localhost-key.pem", key)
            self.assertTrue(cluster.services[node].reload())
        again = yield cluster.client_round("node1", version, first.session)
        self.assertTrue(again.reused, "not resumed on the node that made it")
        elsewhere = yield cluster.client_round("node2", version, again.session)
        self.assertTrue(elsewhere.reused, "not resumed on its peer")

    def test_stored_tls12_session_resumes_after_reload(self):
        return self._resumes_after_reload("TLSv1.2")

    def test_stored_tls13_session_resumes_after_reload(self):
        return self._resumes_after_reload("TLSv1.3")

    @inlineCallbacks
    def test_removed_peer_loses_its_link_and_added_peer_gets_one(self):
        cluster = LocalCluster(self)
        yield cluster.start_all()
        node1, node3 = cluster.nodes["node1"], cluster.nodes["node3"]
        link2 = node1.peer_links.link("node2")
        cluster.edit("node1", cluster.peer_line("node3") + "\n", "")
        self.assertTrue(cluster.services["node1"].reload())
        self.assertIsNone(node1.peer_links.link("node3"))
        # The link that stayed was never dropped.
        self.assertIs(node1.peer_links.link("node2"), link2)
        self.assertTrue(link2.connected)
        self.assertEqual(link2.counters["connects"], 1)
        # node1 no longer knows node3's sessions, nor keeps its backups.
        made_on_node3 = yield cluster.client_round("node3", "TLSv1.2")
        yield until(lambda: node3.counters["backup_failures"] == 1)
        unknown = yield cluster.client_round(
            "node1", "TLSv1.2", made_on_node3.session)
        self.assertFalse(unknown.reused)

        made_on_node3 = yield cluster.client_round("node3", "TLSv1.2")
        cluster.edit("node1", "[cluster.peers]\n",
                     "[cluster.peers]\n" + cluster.peer_line("node3") + "\n")
        self.assertTrue(cluster.services["node1"].reload())
        yield until(lambda: node1.peer_links.link("node3").connected)
        # node1 asks node3 over the new link, not its own backup copy.
        node1.store.discard(made_on_node3.session.id)
        known = yield cluster.client_round(
            "node1", "TLSv1.2", made_on_node3.session)
        self.assertTrue(known.reused)
        self.assertEqual(node1.counters["resumed_peer"], 1)
        self.assertEqual(node1.counters["reloads"], 2)

    @inlineCallbacks
    def test_peer_with_a_new_endpoint_gets_a_new_link(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"))
        yield cluster.start_all()
        node1 = cluster.nodes["node1"]
        before = node1.peer_links.link("node2")
        cluster.edit("node1", cluster.peer_line("node2"),
                     f'node2 = "tcp:host=127.0.0.1:port={free_port()}"')
        self.assertTrue(cluster.services["node1"].reload())
        moved = node1.peer_links.link("node2")
        self.assertIsNot(moved, before)
        self.assertFalse(before.running)
        self.assertFalse(moved.connected)
        with open(cluster.paths["node1"]) as f:
            cluster.edit("node1", re.search(r'node2 = ".*"', f.read()).group(),
                         cluster.peer_line("node2"))
        self.assertTrue(cluster.services["node1"].reload())
        yield until(lambda: node1.peer_links.link("node2").connected)

    @inlineCallbacks
    def _invalid_reload_keeps_everything(self, break_it, error):
        """
        The file also drops node3 from the peers: nothing of it may apply.
        """
        cluster = LocalCluster(self, nodes=("node1", "node2", "node3"))
        yield cluster.start_all()
        first = yield cluster.client_round("node1", "TLSv1.2")
        cluster.edit("node1", cluster.peer_line("node3") + "\n", "")
        break_it(cluster)
        self.assertFalse(cluster.services["node1"].reload())
        node1 = cluster.nodes["node1"]
        self.assertEqual(node1.counters["reload_failures"], 1)
        self.assertEqual(node1.counters["reloads"], 0)
        failures = self.lines_with("reload failed")
        self.assertEqual(len(failures), 1, self.logged)
        self.assertNotIn("\n", failures[0])
        self.assertRegex(failures[0], error)
        self.assertTrue(node1.peer_links.link("node3").connected)
        again = yield cluster.client_round("node1", "TLSv1.2", first.session)
        self.assertTrue(again.reused)
        elsewhere = yield cluster.client_round(
            "node3", "TLSv1.2", again.session)
        self.assertTrue(elsewhere.reused)

    def test_bad_toml_keeps_the_running_configuration(self):
        return self._invalid_reload_keeps_everything(
            lambda cluster: cluster.edit("node1", "[cluster]", "[cluster"),
            r"node1\.toml: not valid TOML: ")

    def test_missing_certificate_keeps_the_running_configuration(self):
        return self._invalid_reload_keeps_everything(
            lambda cluster: cluster.edit("node1", "pki/localhost-chain.pem",
                                         "pki/absent.pem"),
            r"node1\.toml: tls\.service\[0\]\.certificate: cannot read "
            r"'pki/absent\.pem'")

    def test_key_of_another_certificate_keeps_the_running_configuration(self):
        return self._invalid_reload_keeps_everything(
            lambda cluster: cluster.edit("node1", "pki/localhost-key.pem",
                                         "pki/node2-key.pem"),
            r"node1\.toml: tls\.service\[0\]\.key: does not match "
            r"tls\.service\[0\]\.certificate")

    def test_bad_state_key_file_keeps_the_running_configuration(self):
        def break_it(cluster):
            write_private(os.path.join(cluster.directory, "pki", "bad.key"),
                          b"not a key\n")
            cluster.edit("node1", "pki/state.key", "pki/bad.key")

        return self._invalid_reload_keeps_everything(
            break_it, r"bad\.key: line 1: a key must be 64 hex characters")

    @inlineCallbacks
    def test_setting_fixed_at_runtime_warns_and_keeps_its_value(self):
        cluster = LocalCluster(self, nodes=("node1",))
        cluster.start("node1")
        port = cluster.ports["node1"]
        cluster.edit("node1", f"listen = \"tcp:{port}:", "listen = \"tcp:1:")
        cluster.edit("node1", "lookup_budget_ms = 300", "lookup_budget_ms = 200")
        self.assertTrue(cluster.services["node1"].reload())
        warnings = self.lines_with("cannot change while the node runs")
        self.assertEqual(len(warnings), 1, self.logged)
        self.assertIn("node1.toml: node.listen: ", warnings[0])
        service = cluster.services["node1"]
        self.assertEqual(service.config.listen[0].split(":")[1], str(port))
        # The rest applies.
        self.assertEqual(cluster.nodes["node1"].recovery.settings.budget, 0.2)
        result = yield cluster.client_round("node1", "TLSv1.3")
        self.assertEqual(result.echo, b"hello")

    def test_each_part_runs_on_the_reloaded_settings(self):
        cluster = LocalCluster(self, nodes=("node1",))
        cluster.start("node1")
        cluster.edit("node1", "lookup_budget_ms = 300",
                     "lookup_budget_ms = 250\nsession_lifetime_s = 600\n"
                     "max_concurrent_lookups = 7\nmax_lookups_per_client = 3\n"
                     "handshake_timeout_s = 4\ncheckpoint = \"off\"")
        self.assertTrue(cluster.services["node1"].reload())
        service, node = cluster.services["node1"], cluster.nodes["node1"]
        self.assertEqual(
            (node.recovery.settings.budget, node.recovery.settings.max_lookups,
             node.recovery.settings.max_lookups_per_client),
            (0.25, 7, 3))
        self.assertEqual(
            (node.settings.session_lifetime, node.settings.checkpoint.mode),
            (600, "off"))
        self.assertEqual(service._proxy.settings.handshake_timeout, 4)


class SettingsAtReloadTests(SynchronousTestCase):
    """
    Every setting of the file is either put in force by a reload or fixed
    while the node runs: none is silently left as it was.
    """

    def test_every_setting_is_reloadable_or_fixed_at_runtime(self):
        fixed = set(FIXED_AT_RUNTIME.values())
        self.assertEqual(fixed & RELOADABLE, set())
        listed = fixed | RELOADABLE

        def settings(cls, prefix):
            for field in attrs.fields(attrs.resolve_types(cls)):
                path = prefix + field.name
                if any(other.startswith(path + ".") for other in listed):
                    yield from settings(field.type, path + ".")
                else:
                    yield path

        # The path is no setting: it names the file a reload reads again;
        # nor is the worker's index, which the service sets.
        self.assertEqual(set(settings(NodeConfig, "")) - {"path", "worker"},
                         listed)


class HandoverTests(_LogCapture, TestCase):
    """
    A node stopping in this process drains its connections and moves its
    sessions to where the others look for them.  Each test first drops the
    copy the cluster already keeps, so that only the handover can save
    the session.
    """

    def setUp(self):
        self.capture_log()

    @inlineCallbacks
    def _handed_to_backup_node(self, version):
        cluster = LocalCluster(self)
        yield cluster.start_all()
        first = yield cluster.client_round("node1", version)
        node1, node2 = cluster.nodes["node1"], cluster.nodes["node2"]
        (session_id,) = [state.session_id for state in node1.store.sessions()]
        # node2 is the backup node of node1's sessions in a ring of three.
        yield until(lambda: node2.store.get(session_id) is not None)
        node2.store.discard(session_id)
        yield cluster.stop("node1")
        self.assertEqual(holders(cluster, session_id), ["node2"])
        self.assertIsNone(node1.store.get(session_id))
        self.assertEqual(node1.counters["sessions_handed_over"], 1)
        self.assertEqual(self.lines_with("handed over"),
                         ["handed over 1 session to node2, 0 failed"])
        # node3 asks node1, which is gone, then its backup node.
        resumed = yield cluster.client_round("node3", version, first.session)
        self.assertTrue(resumed.reused)
        self.assertEqual(cluster.nodes["node3"].recovery.counters["backups_asked"], 1)

    def test_tls12_session_goes_to_the_backup_node_and_resumes_on_node3(self):
        return self._handed_to_backup_node("TLSv1.2")

    def test_tls13_session_goes_to_the_backup_node_and_resumes_on_node3(self):
        return self._handed_to_backup_node("TLSv1.3")

    @inlineCallbacks
    def test_session_taken_from_its_maker_resumes_through_the_makers_redirect(self):
        """
        node3 made the session and gave it to node1; its tombstone sends
        node2 to node1, which is gone, so node2 asks node1's backup node
        for the session, node4 (the ring of four, from node3, skipping the
        holder).
        """
        cluster = LocalCluster(self, nodes=("node1", "node2", "node3", "node4"))
        yield cluster.start_all()
        made = yield cluster.client_round("node3", "TLSv1.2")
        taken = yield cluster.client_round("node1", "TLSv1.2", made.session)
        self.assertTrue(taken.reused)
        session_id = made.session.id
        node4 = cluster.nodes["node4"]
        yield until(lambda: node4.store.get(session_id) is not None
                    and node4.store.get(session_id).holder == "node1")
        node4.store.discard(session_id)
        yield cluster.stop("node1")
        self.assertEqual(holders(cluster, session_id), ["node4"])
        resumed = yield cluster.client_round("node2", "TLSv1.2", made.session)
        self.assertTrue(resumed.reused)
        counters = cluster.nodes["node2"].recovery.counters
        self.assertEqual((counters["redirects_followed"],
                          counters["backups_asked"]), (1, 1))

    @inlineCallbacks
    def test_session_goes_to_the_repository(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"),
                               repository=SQLITE)
        yield cluster.start_all()
        first = yield cluster.client_round("node1", "TLSv1.2")
        repository = cluster.nodes["node1"].repository
        yield until(lambda: repository.counters["puts"] >= 1)
        yield repository.purge(first.session.id)
        yield cluster.stop("node1")
        self.assertEqual(self.lines_with("handed over"),
                         ["handed over 1 session to the repository, 0 failed"])
        resumed = yield cluster.client_round("node2", "TLSv1.2", first.session)
        self.assertTrue(resumed.reused)
        self.assertEqual(cluster.nodes["node2"].counters["resumed_repository"], 1)

    @inlineCallbacks
    def test_open_connection_finishes_before_the_node_stops(self):
        backend = TrickleFactory(chunks=10, interval=0.1)
        cluster = LocalCluster(self, nodes=("node1",), backend=backend)
        cluster.start("node1")
        streaming = cluster.client_round("node1", "TLSv1.2")
        yield backend.transfers.get()
        stopping = cluster.stop("node1")
        self.assertFalse(stopping.called)
        result = yield streaming
        self.assertEqual(result.echo, b"hello" * 10)
        yield stopping

    @inlineCallbacks
    def test_connection_open_at_the_deadline_is_closed(self):
        backend = TrickleFactory(chunks=1000, interval=0.1)
        cluster = LocalCluster(self, nodes=("node1", "node2"), backend=backend,
                               node_options="drain_timeout_s = 0.5")
        yield cluster.start_all()
        streaming = cluster.client_round("node1", "TLSv1.2")
        yield backend.transfers.get()
        started = time.monotonic()
        yield cluster.stop("node1")
        # 0.5 s at most; far more only if it hung.
        self.assertLess(time.monotonic() - started, 5.0)
        # Cut off: the client read less than the backend would have sent.
        try:
            result = yield streaming
        except OSError:
            pass
        else:
            self.assertLess(len(result.echo), len(b"hello") * 1000)
        self.assertEqual(len(self.lines_with(
            "closing 1 client connections still open")), 1)
        # The cut connection's session still went over.
        self.assertEqual(self.lines_with("handed over"),
                         ["handed over 1 session to node2, 0 failed"])


class RotationTests(_LogCapture, TestCase):
    """
    The state key rotation of README.rst, on two nodes sharing through a
    repository, which keeps sessions sealed: a new key is added second,
    then put first, then the old one removed, with a reload on every node
    after each step.
    """

    @inlineCallbacks
    def _cluster(self):
        """
        Two started nodes, their one state key and a new one.
        """
        cluster = LocalCluster(self, nodes=("node1", "node2"), repository=SQLITE)
        yield cluster.start_all()
        with open(os.path.join(cluster.directory, "pki", "state.key")) as f:
            old = bytes.fromhex(f.read().strip())
        return cluster, old, StateKeys.generate()

    def _write_keys(self, cluster, *keys):
        with open(os.path.join(cluster.directory, "pki", "state.key"), "w") as f:
            f.write("".join(key.hex() + "\n" for key in keys))
        for node in ("node1", "node2"):
            self.assertTrue(cluster.services[node].reload())

    @inlineCallbacks
    def _sealed_on_node1(self, cluster):
        repository = cluster.nodes["node1"].repository
        puts = repository.counters["puts"]
        made = yield cluster.client_round("node1", "TLSv1.2")
        yield until(lambda: repository.counters["puts"] > puts)
        return made

    @inlineCallbacks
    def test_sessions_sealed_before_and_after_rotation_resume(self):
        cluster, old, new = yield self._cluster()
        before = yield self._sealed_on_node1(cluster)
        self._write_keys(cluster, old, new)
        during = yield self._sealed_on_node1(cluster)
        self._write_keys(cluster, new, old)
        after = yield self._sealed_on_node1(cluster)
        for made in (before, during, after):
            resumed = yield cluster.client_round(
                "node2", "TLSv1.2", made.session)
            self.assertTrue(resumed.reused)
        self.assertEqual(cluster.nodes["node2"].recovery.counters["unsealable"], 0)

    @inlineCallbacks
    def test_blob_sealed_with_a_removed_key_is_refused_cleanly(self):
        cluster, old, new = yield self._cluster()
        made = yield self._sealed_on_node1(cluster)
        self._write_keys(cluster, old, new)
        self._write_keys(cluster, new, old)
        self._write_keys(cluster, new)
        resumed = yield cluster.client_round("node2", "TLSv1.2", made.session)
        self.assertFalse(resumed.reused)
        self.assertEqual(resumed.echo, b"hello")
        node2 = cluster.nodes["node2"]
        self.assertEqual(node2.recovery.counters["unsealable"], 1)
        self.assertEqual(node2.counters["full"], 1)

    @inlineCallbacks
    def test_a_peer_without_the_key_is_refused_naming_it_and_both_keys(self):
        # A key changed by a reload, past the check at link setup: node1
        # keeps the session rather than give node2 what it cannot open.
        self.capture_log()
        cluster = LocalCluster(self, nodes=("node1", "node2"))
        yield cluster.start_all()
        made = yield cluster.client_round("node1", "TLSv1.2")
        write_private(os.path.join(cluster.directory, "pki", "other.key"),
                      StateKeys.generate().hex().encode() + b"\n")
        cluster.edit("node2", 'state_key = "pki/state.key"',
                     'state_key = "pki/other.key"')
        self.assertTrue(cluster.services["node2"].reload())
        resumed = yield cluster.client_round("node2", "TLSv1.2", made.session)
        self.assertFalse(resumed.reused)
        [line] = self.lines_with("that node2 asked for: none of its state keys")
        keys = cluster.nodes["node1"].keys.key_ids + cluster.nodes["node2"].keys.key_ids
        for key_id in keys:
            self.assertIn(key_id.hex(), line)
        home = yield cluster.client_round("node1", "TLSv1.2", made.session)
        self.assertTrue(home.reused)

    @inlineCallbacks
    def test_key_new_prints_a_line_the_key_file_takes(self):
        output, error, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", "from sslshare.cli import main; main()", "key", "new"],
            env=os.environ)
        self.assertEqual(code, 0, error.decode())
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(output)
        self.assertRegex(output.decode(), r"^[0-9a-f]{64}\n$")
        self.assertEqual(len(StateKeys.from_file(path).key_ids), 1)


class SignalTests(TestCase):
    """
    C{twistd sslshare} nodes, signalled as an operator does.
    """

    @inlineCallbacks
    def test_sighup_reloads_and_a_bad_file_keeps_the_node_serving(self):
        cluster = LocalCluster(self, nodes=("node1",))
        yield cluster.spawn("node1")
        chain, key = cluster.server_certificate("renewed",
                                                ("localhost", "renewed.test"))
        cluster.edit("node1", "pki/localhost-chain.pem", chain)
        cluster.edit("node1", "pki/localhost-key.pem", key)
        cluster.signal("node1", "HUP")
        yield until(lambda: "reloaded" in cluster.log("node1"))
        fresh = yield cluster.client_round("node1", "TLSv1.3")
        self.assertIn("renewed.test", fresh.peer_names)
        cluster.edit("node1", "[cluster]", "[cluster")
        cluster.signal("node1", "HUP")
        yield until(lambda: "reload failed" in cluster.log("node1"))
        self.assertRegex(cluster.log("node1"),
                         r"reload failed, the running configuration stays: "
                         r".*node1\.toml: not valid TOML: ")
        still = yield cluster.client_round("node1", "TLSv1.3", fresh.session)
        self.assertTrue(still.reused)
        self.assertIn("renewed.test", still.peer_names)

    @inlineCallbacks
    def test_sigterm_drains_then_sessions_resume_on_the_other_nodes(self):
        """
        node1 makes its sessions while its peers are down, so that no
        backup copy exists: only the handover can save them.
        """
        backend = TrickleFactory(chunks=10, interval=0.1)
        cluster = LocalCluster(self, backend=backend,
                               node_options="drain_timeout_s = 8")
        yield cluster.spawn("node1")
        tls12 = yield cluster.client_round("node1", "TLSv1.2")
        yield backend.transfers.get()
        tls13 = yield cluster.client_round("node1", "TLSv1.3")
        yield backend.transfers.get()
        cluster.start("node2")
        cluster.start("node3")
        yield cluster.wait_linked_to("node1")
        streaming = cluster.client_round("node1", "TLSv1.2")
        yield backend.transfers.get()
        started = time.monotonic()
        ended = cluster.kill("node1", "TERM")
        result = yield streaming
        self.assertEqual(result.echo, b"hello" * 10)
        yield ended
        # 8 s at most; far more only if it hung.
        self.assertLess(time.monotonic() - started, 30.0)
        log = cluster.log("node1")
        self.assertRegex(log, r"handed over 3 sessions to node2, 0 failed")
        self.assertNotIn("still open at the drain deadline", log)
        on_node2 = yield cluster.client_round(
            "node2", "TLSv1.2", tls12.session)
        self.assertTrue(on_node2.reused)
        on_node3 = yield cluster.client_round(
            "node3", "TLSv1.3", tls13.session)
        self.assertTrue(on_node3.reused)
        self.assertEqual(cluster.nodes["node3"].recovery.counters["backups_asked"], 1)

    @inlineCallbacks
    def test_sigterm_with_a_repository_hands_sessions_to_it(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"), repository=SQLITE)
        yield cluster.spawn("node1")
        made = yield cluster.client_round("node1", "TLSv1.3")
        path = os.path.join(cluster.directory, "s.sqlite3")

        def stored():
            with sqlite3.connect(path) as db:
                return db.execute("SELECT count(*) FROM sslshare_sessions"
                                  ).fetchone()[0]

        yield until(lambda: stored() == 1)
        with sqlite3.connect(path) as db:
            db.execute("DELETE FROM sslshare_sessions")
        yield cluster.kill("node1", "TERM")
        self.assertEqual(stored(), 1)
        self.assertTrue(re.search(
            r"handed over 1 session to the repository, 0 failed",
            cluster.log("node1")))
        cluster.start("node2")
        resumed = yield cluster.client_round("node2", "TLSv1.3", made.session)
        self.assertTrue(resumed.reused)
        self.assertEqual(cluster.nodes["node2"].counters["resumed_repository"], 1)


class FiredWithinTests(SynchronousTestCase):
    """
    L{fired_within}: how long a stopping node waits, whatever it waits for.
    """

    def test_true_when_it_fires_in_time(self):
        clock, waiting = Clock(), Deferred()
        first = fired_within(waiting, 5, clock)
        clock.advance(1)
        waiting.errback(RuntimeError("a failed wait still ends it"))
        self.assertIs(self.successResultOf(first), True)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_false_at_the_deadline_without_cancelling(self):
        clock, waiting = Clock(), Deferred()
        first = fired_within(waiting, 5, clock)
        clock.advance(4.9)
        self.assertNoResult(first)
        clock.advance(0.1)
        self.assertIs(self.successResultOf(first), False)
        # Left alone: what never fires cannot hold the stop up.
        self.assertNoResult(waiting)


class _SlowToConnect(MemoryRepository):
    """
    A repository whose C{start} fires only when the test says so.
    """

    def __init__(self, clock):
        super().__init__(clock)
        self.connected = Deferred()

    def start(self):
        return self.connected


class RepositoryServiceTests(SynchronousTestCase):
    """
    The repository's service removes expired sessions while the node runs,
    and only then.
    """

    def setUp(self):
        self.clock = Clock()
        self.repository = _SlowToConnect(self.clock)
        self.service = _RepositoryService(self.repository, self.clock)

    def test_expires_sessions_every_interval_once_connected(self):
        self.service.startService()
        self.repository.put(b"s" * 32, b"sealed", expires=1.0)
        self.repository.connected.callback(None)
        self.clock.advance(EXPIRY_INTERVAL)
        self.assertEqual(self.repository.rows, {})
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(),
                         2 * EXPIRY_INTERVAL)

    def test_repository_connecting_after_the_stop_starts_no_expiry(self):
        self.service.startService()
        self.service.stopService()
        self.repository.connected.callback(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
