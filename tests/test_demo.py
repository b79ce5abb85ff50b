"""
C{sslshare demo} end to end, as C{make demo} runs it: the node files
installed with sslshare (L{sslshare.examples}), a PKI made on first use,
three C{twistd} nodes.  The
files' fixed ports (8441-8443, 7441-7443, 9441-9443, 8080) are replaced by
free ones in the test's copy, so that a test never meets a port in use, and
its lookup budget is one a busy machine keeps to.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys

from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from sslshare.dev.throwaway import free_port
from tests.support.databases import skip_without

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "sslshare", "examples")
DEMO_PORTS = (8441, 8442, 8443, 7441, 7442, 7443, 9441, 9442, 9443, 8080)


# The shipped files keep the default budget (50 ms), made for an idle
# machine; on a busy one (trial -j) a lookup can wait that long for the CPU
# alone and turn into a full handshake.  The copies wait this long instead.
LOOKUP_BUDGET_MS = 2000


def _conf_with_free_ports(root: str) -> dict[int, int]:
    """
    Copy the shipped files to C{root}/demo/ports (beside the demo's
    C{conf}, so that their relative paths name the demo's PKI and state)
    with every demo port replaced by a free one, and the node files with a
    lookup budget of L{LOOKUP_BUDGET_MS}; return the replacements.
    """
    ports = {port: free_port() for port in DEMO_PORTS}
    target = _ports_conf(root)
    shutil.copytree(CONF, target, ignore=shutil.ignore_patterns(
        "__init__.py", "__pycache__"))
    for name in os.listdir(target):
        path = os.path.join(target, name)
        with open(path) as f:
            text = f.read()
        for old, new in ports.items():
            text = re.sub(rf"\b{old}\b", str(new), text)
        if name.startswith("node"):
            assert "[node]\n" in text, f"no [node] table in {name}"
            text = text.replace(
                "[node]\n", f"[node]\nlookup_budget_ms = {LOOKUP_BUDGET_MS}\n", 1)
        with open(path, "w") as f:
            f.write(text)
    return ports


def _ports_conf(root):
    return os.path.join(root, "demo", "ports")


def _run_demo(root, *options, json_output=True):
    return getProcessOutputAndValue(
        sys.executable,
        ["-c", "from sslshare.cli import main; main()", "demo",
         *(["--json"] if json_output else []),
         "--clients", "4", "--rounds", "10",
         "--directory", os.path.join(root, "demo"),
         "--conf", _ports_conf(root), *options],
        env=os.environ, path=root)


class DemoTests(TestCase):
    timeout = 180

    @inlineCallbacks
    def _demo(self, *options):
        root = os.path.abspath(self.mktemp())
        _conf_with_free_ports(root)
        output, error, code = yield _run_demo(root, *options)
        self.assertEqual(code, 0, error.decode())
        counts = json.loads(output)
        self.assertEqual(counts["connections"], 40)
        self.assertEqual(counts["failed"], 0)
        # The nodes' metrics pages, scraped before the nodes stopped, show
        # what their stats show.
        self.assertEqual(counts["from_metrics"],
                         {outcome: counts[outcome] for outcome in (
                             "full", "resumed_local", "resumed_peer",
                             "resumed_repository", "failed")})
        # Each node's access log has a line per connection it served (and
        # one for the demo's check that it listens, with no handshake).
        self.assertEqual(sorted(counts["access_logs"]),
                         ["node1", "node2", "node3"])
        served = []
        for node, log in counts["access_logs"].items():
            self.assertEqual(log["path"],
                             os.path.join(root, "demo", f"{node}-access.log"))
            with open(log["path"]) as f:
                entries = [json.loads(line) for line in f]
            self.assertEqual(len(entries), log["lines"])
            served += [entry for entry in entries if entry["tls_version"]]
        self.assertEqual(len(served), 40)
        resumed = [entry["resumed"] for entry in served]
        self.assertEqual(resumed.count("full"), counts["full"])
        self.assertEqual(resumed.count("peer") + resumed.count("backup"),
                         counts["resumed_peer"])
        return counts

    @inlineCallbacks
    def test_demo_json_reports_every_resumable_connection_resumed(self):
        counts = yield self._demo()
        self.assertEqual(counts["full"], 4)
        # Every connection after a client's first lands on another node.  A
        # node may still hold its own copy for the moment its purge takes
        # to arrive: the rare resumption of that copy counts as local.
        self.assertEqual(counts["resumed_peer"] + counts["resumed_local"], 36)
        self.assertGreaterEqual(counts["resumed_peer"], 34)
        self.assertEqual(counts["resumed_repository"], 0)
        self.assertGreaterEqual(counts["from_metrics"]["resumed_peer"], 34)

    @inlineCallbacks
    def test_demo_through_sqlite_resumes_from_the_repository(self):
        counts = yield self._demo("--repository", "sqlite")
        self.assertEqual(counts["resumed_peer"], 0)
        # A new session is written to the repository asynchronously: a
        # client that comes back faster than the write may miss it.
        self.assertGreaterEqual(counts["resumed_repository"], 35)
        self.assertEqual(counts["full"] + counts["resumed_repository"], 40)

    @inlineCallbacks
    def test_demo_through_redis_resumes_from_the_repository(self):
        skip_without("redis")
        counts = yield self._demo("--repository", "redis")
        self.assertGreaterEqual(counts["resumed_repository"], 35)
        self.assertEqual(counts["full"] + counts["resumed_repository"], 40)

    @inlineCallbacks
    def test_demo_with_a_port_in_use_names_it_and_fails(self):
        root = os.path.abspath(self.mktemp())
        port = _conf_with_free_ports(root)[8442]
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", port))
            holder.listen()
            output, error, code = yield _run_demo(root)
        self.assertNotEqual(code, 0)
        node2 = os.path.join(_ports_conf(root), "node2.toml")
        self.assertIn(f"{node2}: node.listen: 127.0.0.1:{port}: "
                      f"address already in use", error.decode())
        self.assertEqual(output, b"")

    @inlineCallbacks
    def test_demo_table_says_where_to_curl_metrics_and_readiness(self):
        root = os.path.abspath(self.mktemp())
        ports = _conf_with_free_ports(root)
        output, error, code = yield _run_demo(root, json_output=False)
        self.assertEqual(code, 0, error.decode())
        lines = output.decode().splitlines()
        for number, node in enumerate(("node1", "node2", "node3"), 1):
            base = f"http://127.0.0.1:{ports[9440 + number]}"
            for page in ("metrics", "readyz"):
                self.assertIn(f"{node}, while the demo runs: curl "
                              f"{base}/{page}", lines)
        self.assertIn("40 connections by 4 clients", output.decode())

    @inlineCallbacks
    def test_the_demo_does_not_import_the_command(self):
        # The command imports the demo when it runs it; the other way
        # round would be a cycle.
        output, error, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", "import sys, sslshare.dev.demo; "
                   "print('sslshare.cli' in sys.modules)"],
            env=os.environ)
        self.assertEqual((code, output.strip()), (0, b"False"), error.decode())
