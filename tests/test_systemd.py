"""
systemd: the readiness notifications (L{sslshare.systemd}), received on a
datagram socket standing in for systemd's, from a real C{twistd} node; a
node started with a listening socket handed down as systemd's socket
activation does; and the unit file shipped in C{sslshare/examples/}.
"""

from __future__ import annotations

import configparser
import os
import shutil
import socket
import tempfile

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sslshare import systemd
from tests.support.cluster import LocalCluster
from tests.support.waiting import until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _listening_datagrams(testcase, name="notify"):
    """
    A datagram socket at a fresh path, as systemd's C{NOTIFY_SOCKET}; the
    socket and its path.
    """
    # Short: an AF_UNIX path has 107 bytes at most, and trial's temporary
    # directories are deep.
    directory = tempfile.mkdtemp(prefix="sslshare-notify-")
    testcase.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    path = os.path.join(directory, name)
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.setblocking(False)
    testcase.addCleanup(receiver.close)
    return receiver, path


def _received(receiver):
    messages = []
    while True:
        try:
            messages.append(receiver.recv(4096).decode("utf-8"))
        except BlockingIOError:
            return messages


class NotifyTests(SynchronousTestCase):

    def test_a_datagram_to_the_socket_named(self):
        receiver, path = _listening_datagrams(self)
        self.assertTrue(systemd.notify("READY=1", {"NOTIFY_SOCKET": path}))
        self.assertEqual(_received(receiver), ["READY=1"])

    def test_the_abstract_namespace(self):
        name = f"sslshare-test-{os.getpid()}-{id(self)}"
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind("\0" + name)
        receiver.setblocking(False)
        self.addCleanup(receiver.close)
        self.assertTrue(systemd.notify("STOPPING=1",
                                       {"NOTIFY_SOCKET": "@" + name}))
        self.assertEqual(_received(receiver), ["STOPPING=1"])

    def test_nothing_without_a_socket(self):
        self.assertFalse(systemd.notify("READY=1", {}))

    def test_a_socket_nobody_reads_is_logged_not_raised(self):
        missing = os.path.join(os.path.abspath(self.mktemp()), "gone")
        self.assertFalse(systemd.notify("READY=1",
                                        {"NOTIFY_SOCKET": missing}))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_reloading_carries_the_monotonic_clock(self):
        state = systemd.reloading("reloading x.toml").splitlines()
        self.assertEqual(state[0], "RELOADING=1")
        self.assertTrue(state[1].startswith("MONOTONIC_USEC="))
        self.assertTrue(state[1].split("=")[1].isdigit())
        self.assertEqual(state[2], "STATUS=reloading x.toml")


class NodeNotificationsTests(TestCase):

    @inlineCallbacks
    def test_ready_reloading_ready_stopping_in_order(self):
        receiver, path = _listening_datagrams(self)
        seen = []
        cluster = LocalCluster(self, nodes=("node1",))
        yield cluster.spawn("node1", environment={"NOTIFY_SOCKET": path})
        yield until(lambda: _seen(receiver, seen, 1), timeout=20)
        cluster.signal("node1", "HUP")
        yield until(lambda: _seen(receiver, seen, 3), timeout=20)
        yield cluster.kill("node1", "TERM")
        _seen(receiver, seen, 4)
        states = [message.splitlines()[0] for message in seen]
        self.assertEqual(states, ["READY=1", "RELOADING=1", "READY=1",
                                  "STOPPING=1"])
        self.assertIn(f"STATUS=serving {cluster.paths['node1']}",
                      seen[0].splitlines())

    @inlineCallbacks
    def test_a_socket_handed_down_as_systemd_does(self):
        """
        C{listen = "systemd:domain=INET:index=0"}: the node serves on the
        socket it inherited as file descriptor 3 (C{LISTEN_FDS=1},
        C{LISTEN_FDNAMES}, C{LISTEN_PID} its own pid, as systemd sets
        them), so a restart that keeps the socket refuses no client.
        """
        cluster = LocalCluster(self, nodes=("node1",),
                               listen="systemd:domain=INET:index=0")
        inherited = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(inherited.close)
        inherited.bind(("127.0.0.1", cluster.ports["node1"]))
        inherited.listen(16)
        # The pid is only known in the child: a shell sets it, then execs.
        yield cluster.spawn(
            "node1", environment={"LISTEN_FDS": "1",
                                  "LISTEN_FDNAMES": "sslshare.socket"},
            child_fds={0: "w", 1: "r", 2: "r", 3: inherited.fileno()},
            wrapper=("/bin/sh", "-c", 'LISTEN_PID=$$ exec "$0" "$@"'))
        first = yield cluster.client_round("node1", "TLSv1.3")
        again = yield cluster.client_round("node1", "TLSv1.3", first.session)
        self.assertEqual((first.echo, again.reused), (b"hello", True))
        yield cluster.kill("node1", "TERM")
        # The socket outlives the node: a client waits in its backlog.
        waiting = yield deferToThread(socket.create_connection,
                                      ("127.0.0.1", cluster.ports["node1"]))
        waiting.close()


def _seen(receiver, seen, count):
    seen.extend(_received(receiver))
    return len(seen) >= count


class UnitFileTests(SynchronousTestCase):
    """
    C{sslshare/examples/sslshare@.service}, as systemd reads it: notify type, reload by
    SIGHUP, and the node's own config file per instance.
    """

    def setUp(self):
        self.unit = configparser.ConfigParser(interpolation=None,
                                              strict=False)
        self.unit.optionxform = str
        self.unit.read(os.path.join(ROOT, "sslshare", "examples", "sslshare@.service"))

    def test_it_is_a_notify_service_reloaded_by_sighup(self):
        service = self.unit["Service"]
        self.assertEqual(service["Type"], "notify")
        self.assertEqual(service["ExecReload"], "/bin/kill -HUP $MAINPID")
        self.assertIn("twistd -n", service["ExecStart"])
        self.assertIn("--config /etc/sslshare/%i.toml", service["ExecStart"])

    def test_it_is_hardened(self):
        service = self.unit["Service"]
        for option in ("NoNewPrivileges", "ProtectSystem", "ProtectHome",
                       "PrivateTmp", "PrivateDevices",
                       "RestrictAddressFamilies", "CapabilityBoundingSet"):
            self.assertIn(option, service)
        self.assertNotEqual(service.get("User", "root"), "root")
