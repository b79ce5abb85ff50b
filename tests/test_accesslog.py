"""
The access log (C{access_log}): one JSON line per client connection as it
ends, over real sockets, with how each kind of connection ends; nothing
secret in it; reopened after a rotation on reload and SIGUSR1; through the
node's log with C{"-"}; nothing at all when off.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import threading

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.wire import Echo
from twisted.trial.unittest import TestCase

from sslshare import accesslog, sessionid
from sslshare.accesslog import AccessLogFile
from sslshare.recovery import LOOKUP_SOURCES
from tests.support.clients import client_context
from tests.support.cluster import LocalCluster
from tests.support.waiting import until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def _access_log_cluster(testcase, nodes=("node1",), where="access.log",
                        node_options="", **options):
    """
    A L{LocalCluster} whose nodes each log to C{<node>-access.log} in its
    directory (or to C{where} as written).
    """
    name = "{node}-" + where if where not in ("-", "off") else where
    options_line = f'access_log = "{name}"\n{node_options}'
    cluster = LocalCluster(testcase, nodes=nodes, node_options="{options}",
                           **options)
    for node in nodes:
        cluster.edit(node, "{options}",
                     options_line.replace("{node}", node))
    return cluster


def _path(cluster, node="node1"):
    return os.path.join(cluster.directory, f"{node}-access.log")


def _entries(path, end=None):
    """
    The entries of the file at C{path}; with C{end}, those that ended so.
    """
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        entries = [json.loads(line) for line in f]
    return [entry for entry in entries if end in (None, entry["end"])]


@inlineCallbacks
def _wait_entries(path, count, end=None):
    """
    The entries of the file at C{path} (those that ended as C{end}) once
    it has C{count} (the flush timer writes them within a second).
    """
    yield until(lambda: len(_entries(path, end)) >= count, 10.0,
                message=f"{path} did not get {count} entries")
    entries = _entries(path, end)
    assert len(entries) == count, entries
    return entries


def _talk_then_close(port, ca_cert):
    """
    A client that sends C{hello}, reads its echo and closes first.
    """
    context = client_context(ca_cert, "TLSv1.3")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as client:
            client.sendall(b"hello")
            echo = b""
            while len(echo) < 5:
                echo += client.recv(5 - len(echo))
            return echo


def _silent_after_handshake(port, ca_cert):
    context = ssl.create_default_context(cafile=ca_cert)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as client:
            return client.recv(1024)


def _send_raw(port, data):
    """
    Send C{data} over TCP and read until the node closes.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(data)
        answer = b""
        try:
            while chunk := raw.recv(1024):
                answer += chunk
        except ConnectionResetError:
            pass
        return answer


class ConnectionLinesTests(TestCase):
    """
    Each connection gives exactly one line, whose fields say what
    happened to it.
    """

    def assertEntry(self, entry, **expected):
        self.assertEqual(list(entry), list(accesslog.FIELDS))
        self.assertRegex(entry["time"], TIME)
        self.assertGreaterEqual(entry["duration_ms"], 0)
        self.assertEqual({key: entry[key] for key in expected}, expected)

    @inlineCallbacks
    def test_full_local_and_peer_resumptions(self):
        cluster = _access_log_cluster(self, nodes=("node1", "node2"))
        yield cluster.start_all()
        for version in ("TLSv1.2", "TLSv1.3"):
            first = yield cluster.client_round("node1", version)
            local = yield cluster.client_round("node1", version,
                                               first.session)
            peer = yield cluster.client_round("node2", version,
                                              local.session)
            self.assertTrue(local.reused and peer.reused)
        at_node1 = yield _wait_entries(_path(cluster, "node1"), 4)
        (at_node2_12, at_node2_13) = yield _wait_entries(
            _path(cluster, "node2"), 2)
        node1_part = (bytes((sessionid.FORMAT,))
                      + sessionid.owner_tag("test", "node1")).hex()
        common = dict(client_address="127.0.0.1", server_name="localhost",
                      service="web", alpn=None, session=node1_part,
                      bytes_in=5, bytes_out=5, end="backend_close",
                      reason=None)
        for entry, version, resumed in zip(
                at_node1 + [at_node2_12, at_node2_13],
                ("TLSv1.2", "TLSv1.2", "TLSv1.3", "TLSv1.3", "TLSv1.2",
                 "TLSv1.3"),
                ("full", "local", "full", "local", "peer", "peer")):
            self.assertEntry(entry, tls_version=version, resumed=resumed,
                             **common)
            self.assertIsInstance(entry["client_port"], int)
            self.assertTrue(entry["cipher"])
            if resumed == "full":
                self.assertIsNone(entry["lookup_ms"])
            else:
                self.assertGreaterEqual(entry["lookup_ms"], 0)

    @inlineCallbacks
    def test_resumed_from_the_owners_backup_node(self):
        cluster = _access_log_cluster(self, nodes=("node1", "node2", "node3"))
        resumed = yield cluster.resume_from_the_backup_node()
        self.assertTrue(resumed.reused)
        (entry,) = yield _wait_entries(_path(cluster, "node3"), 1)
        self.assertEntry(entry, resumed="backup", tls_version="TLSv1.2",
                         server_name="localhost")
        self.assertGreaterEqual(entry["lookup_ms"], 0)

    @inlineCallbacks
    def test_resumed_from_the_repository(self):
        cluster = _access_log_cluster(
            self, nodes=("node1", "node2"), peers=False,
            repository='topology = "repository"\nkind = "sqlite"\n'
                       'path = "{directory}/sessions.sqlite3"\n')
        yield cluster.start_all()
        first = yield cluster.client_round("node1", "TLSv1.2")
        node1 = cluster.nodes["node1"]
        yield until(lambda: node1.repository.checkpoint_of(
            first.session.id).addCallback(lambda found: found is not None))
        resumed = yield cluster.client_round("node2", "TLSv1.2", first.session)
        self.assertTrue(resumed.reused)
        (entry,) = yield _wait_entries(_path(cluster, "node2"), 1)
        self.assertEntry(entry, resumed="repository", tls_version="TLSv1.2")

    @inlineCallbacks
    def test_no_whole_session_id_and_no_secret(self):
        cluster = _access_log_cluster(self)
        node = cluster.start("node1")
        first = yield cluster.client_round("node1", "TLSv1.2")
        again = yield cluster.client_round("node1", "TLSv1.2", first.session)
        self.assertTrue(again.reused)
        state = node.store.get(first.session.id)
        yield _wait_entries(_path(cluster), 2)
        with open(_path(cluster), encoding="utf-8") as f:
            text = f.read().lower()
        from sslshare import tls

        random_part = first.session.id[1 + sessionid.OWNER_TAG_LENGTH:]
        for secret in (first.session.id, random_part, state.der,
                       tls.session_fields(state.der).master_key):
            self.assertNotIn(secret.hex(), text)

    @inlineCallbacks
    def test_client_close(self):
        cluster = _access_log_cluster(self, backend=Echo)
        yield cluster.start_all()
        echo = yield deferToThread(_talk_then_close, cluster.ports["node1"],
                                   cluster.ca_cert)
        self.assertEqual(echo, b"hello")
        (entry,) = yield _wait_entries(_path(cluster), 1)
        self.assertEntry(entry, end="client_close", reason=None, bytes_in=5,
                         bytes_out=5, resumed="full")

    @inlineCallbacks
    def test_backend_unreachable(self):
        cluster = _access_log_cluster(self)
        yield cluster.backend_listener.stopListening()
        cluster.start("node1")
        result = yield cluster.client_round("node1", "TLSv1.3")
        self.assertEqual(result.echo, b"")
        (entry,) = yield _wait_entries(_path(cluster), 1)
        self.assertEntry(entry, end="backend_unreachable",
                         tls_version="TLSv1.3", bytes_out=0)
        self.assertIn("refused", entry["reason"].lower())

    @inlineCallbacks
    def test_handshake_failure_with_its_reason(self):
        cluster = _access_log_cluster(self)
        cluster.start("node1")
        yield deferToThread(_send_raw, cluster.ports["node1"],
                            b"GET / HTTP/1.0\r\n\r\n")
        (entry,) = yield _wait_entries(_path(cluster), 1)
        self.assertEntry(entry, end="handshake_failure", tls_version=None,
                         resumed=None, session=None, bytes_in=0,
                         client_address="127.0.0.1")
        self.assertIn("http request", entry["reason"])

    @inlineCallbacks
    def test_handshake_timeout(self):
        cluster = _access_log_cluster(self,
                                      node_options="handshake_timeout_s = 0.2")
        cluster.start("node1")
        yield deferToThread(_send_raw, cluster.ports["node1"], b"")
        (entry,) = yield _wait_entries(_path(cluster), 1)
        self.assertEntry(entry, end="handshake_timeout", reason=None,
                         tls_version=None)

    @inlineCallbacks
    def test_idle_timeout(self):
        cluster = _access_log_cluster(self, node_options="idle_timeout_s = 0.2",
                                      backend=Echo)
        cluster.start("node1")
        closed = yield deferToThread(_silent_after_handshake,
                                     cluster.ports["node1"], cluster.ca_cert)
        self.assertEqual(closed, b"")
        (entry,) = yield _wait_entries(_path(cluster), 1)
        self.assertEntry(entry, end="idle_timeout", reason=None, bytes_in=0,
                         bytes_out=0, tls_version="TLSv1.3")

    @inlineCallbacks
    def test_still_open_when_the_drain_ends(self):
        cluster = _access_log_cluster(self, node_options="drain_timeout_s = 0.3",
                                      backend=Echo)
        cluster.start("node1")
        silent = deferToThread(_silent_after_handshake,
                               cluster.ports["node1"], cluster.ca_cert)
        yield until(lambda: cluster.services["node1"].open_connections == 1
                    and all(protocol.wrappedProtocol._linked for protocol
                            in cluster.services["node1"]._clients.protocols))
        yield cluster.stop("node1")
        try:
            yield silent
        except OSError:
            # Cut off without a close_notify.
            pass
        (entry,) = _entries(_path(cluster))
        self.assertEntry(entry, end="drain_timeout", tls_version="TLSv1.3")

    @inlineCallbacks
    def test_the_address_a_proxy_protocol_header_gave(self):
        from tests.test_proxy_protocol import (
            CLIENT,
            HAPROXY_LISTEN,
            _handshake_behind_a_header,
            _v1,
        )

        cluster = _access_log_cluster(self, listen=HAPROXY_LISTEN)
        cluster.start("node1")
        port = cluster.ports["node1"]
        hold = threading.Event()
        hold.set()
        version = yield deferToThread(_handshake_behind_a_header, port,
                                      cluster.ca_cert, _v1(port), hold)
        self.assertEqual(version, "TLSv1.3")
        (entry,) = yield _wait_entries(_path(cluster), 1)
        self.assertEntry(entry, client_address=CLIENT, client_port=40001)

    @inlineCallbacks
    def test_a_stopping_node_writes_what_waits(self):
        cluster = _access_log_cluster(self)
        cluster.start("node1")
        yield cluster.client_round("node1", "TLSv1.3")
        yield until(lambda: not cluster.services["node1"].open_connections)
        yield cluster.stop("node1")
        self.assertEqual(len(_entries(_path(cluster))), 1)


class RotationTests(TestCase):
    """
    After logrotate renamed the file, a reload or SIGUSR1 makes the node
    write to a new file at the configured path.
    """

    @inlineCallbacks
    def test_reload_reopens_the_file(self):
        cluster = _access_log_cluster(self)
        cluster.start("node1")
        path = _path(cluster)
        yield cluster.client_round("node1", "TLSv1.3")
        yield _wait_entries(path, 1)
        os.rename(path, path + ".1")
        self.assertTrue(cluster.services["node1"].reload())
        yield cluster.client_round("node1", "TLSv1.3")
        yield _wait_entries(path, 1)
        self.assertEqual(len(_entries(path + ".1")), 1)

    @inlineCallbacks
    def test_sigusr1_reopens_the_file(self):
        cluster = _access_log_cluster(self)
        yield cluster.spawn("node1")
        path = _path(cluster)
        # The spawn's wait for the port was a connection too: one with no
        # handshake.
        yield cluster.client_round("node1", "TLSv1.3")
        yield _wait_entries(path, 1, "backend_close")
        os.rename(path, path + ".1")
        cluster.signal("node1", signal.SIGUSR1)
        yield until(lambda: os.path.exists(path))
        yield cluster.client_round("node1", "TLSv1.3")
        yield _wait_entries(path, 1)
        yield cluster.kill("node1", "TERM")
        self.assertEqual(len(_entries(path + ".1", "backend_close")), 1)
        self.assertNotIn("Traceback", cluster.log("node1"))


class DestinationTests(TestCase):

    def _observe(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    @inlineCallbacks
    def test_dash_writes_through_the_nodes_log(self):
        cluster = _access_log_cluster(self, where="-")
        cluster.start("node1")
        events = self._observe()
        yield cluster.client_round("node1", "TLSv1.2")
        yield until(lambda: not cluster.services["node1"].open_connections)
        (event,) = [event for event in events
                    if event.get("log_namespace") == "sslshare.access"]
        self.assertEqual(event["log_level"].name, "info")
        self.assertEqual({name: event[name] for name in ("end", "resumed",
                                                         "tls_version")},
                         {"end": "backend_close", "resumed": "full",
                          "tls_version": "TLSv1.2"})
        self.assertTrue(formatEvent(event).startswith(
            "access client_address=127.0.0.1 client_port="))
        self.assertEqual(os.listdir(cluster.directory).count("-"), 0)

    @inlineCallbacks
    def test_off_writes_nothing(self):
        cluster = _access_log_cluster(self, where="off")
        cluster.start("node1")
        self.assertIsNone(cluster.services["node1"].access_log)
        before = sorted(os.listdir(cluster.directory))
        events = self._observe()
        yield cluster.client_round("node1", "TLSv1.2")
        yield until(lambda: not cluster.services["node1"].open_connections)
        self.assertEqual([event for event in events
                          if event.get("log_namespace") == "sslshare.access"],
                         [])
        self.assertEqual(sorted(os.listdir(cluster.directory)), before)


class BufferedFileTests(TestCase):
    """
    The file gets its lines in one write per flush, not one per
    connection.
    """

    def test_lines_wait_for_the_flush(self):
        path = os.path.abspath(self.mktemp())
        clock = Clock()
        log = AccessLogFile(path, clock)
        log.startService()
        self.addCleanup(log.stopService)
        entry = dict.fromkeys(accesslog.FIELDS)
        log.write(entry)
        log.write(entry)
        self.assertEqual(os.path.getsize(path), 0)
        clock.advance(accesslog.FLUSH_INTERVAL)
        self.assertEqual(_entries(path), [entry, entry])
        self.assertEqual(os.stat(path).st_mode & 0o777, accesslog.FILE_MODE)

    def test_a_full_buffer_is_written_at_once(self):
        path = os.path.abspath(self.mktemp())
        log = AccessLogFile(path, Clock())
        log.startService()
        self.addCleanup(log.stopService)
        entry = {**dict.fromkeys(accesslog.FIELDS), "reason": "x" * 1000}
        count = accesslog.BUFFER_BYTES // 1000 + 1
        for _ in range(count):
            log.write(entry)
        self.assertGreater(len(_entries(path)), 0)


class DocumentationTests(TestCase):
    """
    README.rst and sslshare/examples/example.toml name every field, every value of
    C{resumed} and every end; the code ends connections only as C{ENDS}
    lists.
    """

    def test_every_field_and_end_is_documented(self):
        resumed = ("full",) + tuple(source for source in LOOKUP_SOURCES
                                    if source != "miss")
        for name in ("README.rst", "sslshare/examples/example.toml"):
            with open(os.path.join(ROOT, name), encoding="utf-8") as f:
                text = f.read()
            for word in accesslog.FIELDS + accesslog.ENDS + resumed:
                self.assertRegex(text, rf"\b{word}\b" if name.endswith(
                    ".toml") else f"``{word}``", name)

    def test_every_end_the_code_gives_is_listed(self):
        ends = set()
        for name in ("protocol.py", "service.py"):
            with open(os.path.join(ROOT, "sslshare", name),
                      encoding="utf-8") as f:
                ends.update(re.findall(r'(?:ended|cut_off)\(\s*"([a-z_]+)"',
                                       f.read()))
        self.assertEqual(ends, set(accesslog.ENDS))
