"""
A node of several worker processes: C{twistd sslshare} with C{workers = 2}
runs a supervisor and two workers on one address, and a stock Python
client whose connections the kernel spreads over both workers resumes its
session on every one of them, TLS 1.2 and 1.3, through the host's table.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from sslshare import accesslog, sessionid
from tests.support.clients import python_client_round
from tests.support.cluster import LocalCluster
from tests.support.waiting import until

# Connections after the first of each version: with two workers, the
# odds that the kernel sends all of them to one worker are 2**-29.
RESUMPTIONS = 30


def worker_node(testcase: TestCase, workers: int = 2) -> LocalCluster:
    """
    One node of C{workers} worker processes, alone (no peers, no cluster
    listener), logging its connections to C{access.log} in its directory.
    """
    cluster = LocalCluster(testcase, nodes=("node1",), peers=False,
                           node_options=f"workers = {workers}\n"
                                        f'access_log = "access.log"')
    cluster.edit("node1",
                 f'listen = "tcp:{cluster.amp_ports["node1"]}:'
                 f'interface=127.0.0.1"\n', "")
    return cluster


def access_log(cluster: LocalCluster) -> list[dict[str, object]]:
    with open(os.path.join(cluster.directory, "access.log")) as f:
        return [json.loads(line) for line in f]


class WorkerProcessTests(TestCase):
    """
    C{twistd sslshare} with two workers, and Python's C{ssl} as the client.
    """

    @inlineCallbacks
    def test_sessions_resume_on_either_worker_tls12_and_tls13(self):
        cluster = worker_node(self)
        yield cluster.spawn("node1")
        port = cluster.ports["node1"]
        for version in ("TLSv1.2", "TLSv1.3"):
            first = yield deferToThread(python_client_round, port,
                                        cluster.ca_cert, version)
            self.assertFalse(first.reused)
            session = first.session
            for _ in range(RESUMPTIONS):
                result = yield deferToThread(python_client_round, port,
                                             cluster.ca_cert, version,
                                             session)
                self.assertEqual((result.version, result.reused),
                                 (version, True))
                # TLS 1.3: each resumption issues the next ticket.
                session = result.session
        yield cluster.kill("node1", "TERM")
        lines = access_log(cluster)
        tags = {accesslog.owner_part(sessionid.session_id_maker(
            sessionid.owner_tag("test", f"node1.{index}"))())
                for index in range(2)}
        for version in ("TLSv1.2", "TLSv1.3"):
            of_version = [line for line in lines
                          if line["tls_version"] == version]
            self.assertEqual(len(of_version), RESUMPTIONS + 1)
            resumed = [line["resumed"] for line in of_version]
            self.assertEqual(resumed.count("full"), 1)
            # Taken from the table by the other worker, or the same one.
            self.assertGreater(resumed.count("repository"), 0)
            self.assertEqual(set(resumed) - {"full", "local", "repository"},
                             set())
        # TLS 1.3 tickets name the worker that issued them: both did.
        self.assertEqual({line["session"] for line in lines
                          if line["tls_version"] == "TLSv1.3"}, tags)
        log = cluster.log("node1")
        self.assertEqual(log.count("handed over"), 2)

    @inlineCallbacks
    def test_sessions_of_a_killed_worker_resume(self):
        cluster = worker_node(self)
        yield cluster.spawn("node1")
        port = cluster.ports["node1"]
        supervisor = cluster.processes["node1"].pid
        made = {}
        while len(made) < 2:
            result = yield deferToThread(python_client_round, port,
                                         cluster.ca_cert, "TLSv1.2")
            made.setdefault(sessionid.owner_of(result.session.id), []).append(
                result.session)
        killed = workers_of(supervisor)[0]
        os.kill(killed, signal.SIGKILL)
        yield until(lambda: killed not in workers_of(supervisor)
                    and len(workers_of(supervisor)) == 2)
        for sessions in made.values():
            for session in sessions:
                result = yield deferToThread(python_client_round, port,
                                             cluster.ca_cert, "TLSv1.2",
                                             session)
                self.assertTrue(result.reused)
        self.assertRegex(cluster.log("node1"), r"worker [01] ended .*"
                                               r"starting it again")

    @inlineCallbacks
    def test_sighup_reloads_every_worker(self):
        cluster = worker_node(self)
        yield cluster.spawn("node1")
        # The sockets listen before the workers run: wait for both.
        yield until(lambda: cluster.log("node1").count(
            "(TLS) starting on") == 2)
        cluster.signal("node1", "HUP")
        yield until(lambda: cluster.log("node1").count("reloaded ") == 2)
        log = cluster.log("node1")
        self.assertNotIn("cannot change while the node runs", log)
        self.assertNotIn("reload failed", log)
        result = yield deferToThread(python_client_round, cluster.ports["node1"],
                                     cluster.ca_cert, "TLSv1.3")
        self.assertEqual(result.echo, b"hello")


class WorkerStartTests(TestCase):
    """
    What stops a node of several workers at its start says so in one line.
    """

    def test_busy_client_port_stops_the_supervisor(self):
        cluster = worker_node(self)
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", cluster.ports["node1"]))
        holder.listen()
        return self.refused_at_start(cluster)

    @inlineCallbacks
    def test_second_copy_of_a_running_node_is_refused(self):
        cluster = worker_node(self)
        yield cluster.spawn("node1")
        yield self.refused_at_start(cluster)

    @inlineCallbacks
    def refused_at_start(self, cluster):
        port = cluster.ports["node1"]
        path = cluster.paths["node1"]
        output, error, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "--logfile",
             os.path.join(cluster.directory, "n.log"), "sslshare",
             "--config", path], env=os.environ)
        self.assertNotEqual(code, 0)
        self.assertEqual(error.decode().strip(),
                         f"sslshare: {path}: node.listen: 127.0.0.1:{port}: "
                         f"address already in use")


def workers_of(supervisor: int) -> list[int]:
    """
    The pids of the worker processes C{supervisor} runs now.
    """
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as f:
        return [int(pid) for pid in f.read().split()]
