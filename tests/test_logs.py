"""
The node's log as JSON lines (C{log_format = "json"}): what C{twistd}
writes, with named fields, and never a secret in it — no master key, no
session DER, no sealed blob, no state key, in hex or raw.
"""

from __future__ import annotations

import io
import json
import os
import sys

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from sslshare import sessionid, tls
from sslshare.logs import json_lines_observer
from tests.support.clients import connect_without_certificate
from tests.support.cluster import LocalCluster
from tests.support.waiting import until

# A run of this many bytes of a key is a leak, whatever surrounds it.
WINDOW = 12


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        yield from _strings_of(value)


def _strings_of(values):
    for value in values:
        yield from _strings(value)


def _state_keys(cluster):
    with open(os.path.join(cluster.directory, "pki", "state.key")) as f:
        return [bytes.fromhex(line.strip()) for line in f
                if line.strip() and not line.startswith("#")]


def _session_secrets(state):
    """
    What must never be logged of one session: its DER and master key.
    """
    return [state.der, tls.session_fields(state.der).master_key]


class JSONLogTests(TestCase):

    def _events(self, text):
        lines = text.splitlines()
        self.assertTrue(lines)
        events = [json.loads(line) for line in lines]
        for event in events:
            self.assertEqual(
                [key for key in ("time", "level", "namespace", "message")
                 if not isinstance(event.get(key), str)], [], event)
            self.assertRegex(event["time"],
                             r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
            self.assertIn(event["level"],
                          ("debug", "info", "warn", "error", "critical"))
            self.assertEqual([key for key in event
                              if key.startswith("log_")], [], event)
        return events

    def _assert_no_secret(self, text, whole, keys):
        """
        No secret of C{whole} appears in C{text}'s events, and no
        L{WINDOW}-byte run of any of C{keys}: in hex (either case) or raw
        (JSON keeps bytes as the characters of their values).
        """
        events = self._events(text)
        strings = list(_strings_of(events))
        lowered = [string.lower() for string in strings]
        needles = list(whole)
        for key in keys:
            needles += [key[start:start + WINDOW]
                        for start in range(len(key) - WINDOW + 1)]
        for needle in needles:
            shown = needle.hex()
            raw = needle.decode("latin-1")
            for string, lower in zip(strings, lowered):
                self.assertNotIn(shown, lower)
                self.assertNotIn(raw, string)

    @inlineCallbacks
    def test_json_log_of_handshakes_and_resumptions_holds_no_secret(self):
        out = io.StringIO()
        observer = json_lines_observer(out)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        cluster = LocalCluster(self)
        yield cluster.start_all()
        sealed = []
        for node in cluster.nodes.values():
            # Every state a node seals (new sessions for their backup node,
            # sessions given to a peer), as it leaves the node.
            seal = node.keys.seal
            node.keys.seal = lambda state, key_id=None, seal=seal: (
                sealed.append((state, seal(state, key_id))) or sealed[-1][1])
        for version in ("TLSv1.2", "TLSv1.3"):
            result = yield cluster.client_round("node1", version)
            for node in ("node1", "node3", "node2", "node3"):
                result = yield cluster.client_round(
                    node, version, result.session)
                self.assertTrue(result.reused)
        yield deferToThread(connect_without_certificate,
                            cluster.amp_ports["node1"], cluster.ca_cert)
        yield cluster.settled()
        yield cluster.stop("node2")
        yield until(lambda: not cluster.nodes["node1"].peer_links
                     .link("node2").connected)

        # Ten sessions made (two full handshakes, eight resumptions that
        # keep or issue one), each sealed at least for its backup node.
        self.assertGreaterEqual(len(sealed), 10)
        whole = [blob for _, blob in sealed]
        keys = _state_keys(cluster)
        for state, _ in sealed:
            der, master_key = _session_secrets(state)
            whole.append(der)
            keys.append(master_key)
        text = out.getvalue()
        self._assert_no_secret(text, whole, keys)

        events = self._events(text)
        for event in events:
            if "session" in event:
                self.assertEqual(len(event["session"]),
                                 len(sessionid.describe(bytes(32))))
        refused = [event for event in events
                   if event["message"].startswith("refused connection")]
        self.assertEqual(len(refused), 1)
        self.assertRegex(refused[0]["address"], r"^127\.0\.0\.1:\d+$")

    @inlineCallbacks
    def test_twistd_node_writes_json_lines_without_secrets(self):
        cluster = LocalCluster(self, nodes=("node1", "node2"),
                               node_options='log_format = "json"')
        yield cluster.spawn("node1")
        cluster.start("node2")
        yield cluster.wait_linked_to("node1")
        first = yield cluster.client_round("node1", "TLSv1.2")
        # node1 has given node2 the session's backup copy; take it back
        # there so that node1 also logs the session it gives away.
        yield until(lambda: len(cluster.nodes["node2"].store) == 1)
        again = yield cluster.client_round("node2", "TLSv1.2", first.session)
        self.assertTrue(again.reused)
        state = cluster.nodes["node2"].store.get(first.session.id)
        yield cluster.kill("node1", "TERM")

        with open(os.path.join(cluster.directory, "node1.log"),
                  encoding="utf-8") as f:
            text = f.read()
        self._assert_no_secret(text, [state.der],
                               [_session_secrets(state)[1],
                                *_state_keys(cluster)])
        events = self._events(text)
        connected = [event for event in events
                     if event["message"].startswith("peer node2 connected "
                                                    "from ")]
        self.assertEqual([(event["peer"], event["namespace"])
                          for event in connected],
                         [("node2", "sslshare.cluster._server")])
        self.assertTrue(any(event["namespace"].startswith("sslshare.")
                            for event in events))

    @inlineCallbacks
    def test_json_log_to_syslog_is_refused_in_one_line(self):
        cluster = LocalCluster(self, nodes=("node1",),
                               node_options='log_format = "json"')
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "--syslog", "sslshare", "--config",
             cluster.paths["node1"]], env=os.environ)
        self.assertNotEqual(code, 0)
        self.assertEqual(err.decode().strip().splitlines(), [
            f"sslshare: {cluster.paths['node1']}: node.log_format: \"json\" "
            f"is written to a file or stdout, not to syslog: drop --syslog"])


class QuietConnectionsTests(TestCase):
    """
    A node logs nothing for a connection that goes well, full, resumed
    locally or from a peer, at any level: twistd's log observer writes
    every event it is given, debug included, and a busy node's log would
    otherwise cost it a share of its CPU and its operator the lines that
    matter.
    """

    @inlineCallbacks
    def test_connections_log_nothing(self):
        cluster = LocalCluster(self)
        yield cluster.start_all()
        yield cluster.settled()
        logged = []

        def observe(event):
            logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        for version in ("TLSv1.2", "TLSv1.3"):
            result = yield cluster.client_round("node1", version)
            for node in ("node1", "node3", "node2"):
                result = yield cluster.client_round(
                    node, version, result.session)
                self.assertTrue(result.reused)
        yield cluster.settled()
        self.assertEqual(logged, [])


class FlatEventTests(TestCase):
    """
    One event as L{json_lines_observer} writes it.
    """

    def _line(self, log):
        out = io.StringIO()
        observer = json_lines_observer(out)
        globalLogPublisher.addObserver(observer)
        try:
            log()
        finally:
            globalLogPublisher.removeObserver(observer)
        (line,) = out.getvalue().splitlines()
        return json.loads(line)

    def test_fields_by_name_and_others_as_text(self):
        from twisted.logger import Logger

        event = self._line(lambda: Logger(namespace="sslshare.x").info(
            "peer {peer} answered {count} of {items}", peer="node2",
            count=3, items=[1, 2], handle=object()))
        self.assertEqual(
            {key: event[key] for key in ("level", "namespace", "message",
                                         "peer", "count", "items")},
            {"level": "info", "namespace": "sslshare.x",
             "message": "peer node2 answered 3 of [1, 2]", "peer": "node2",
             "count": 3, "items": [1, 2]})
        self.assertTrue(event["handle"].startswith("<object object at"))

    def test_a_failure_gives_its_error_and_traceback(self):
        from twisted.logger import Logger

        def failing():
            try:
                raise ValueError("bad thing")
            except ValueError:
                Logger(namespace="sslshare.x").failure("it failed")

        event = self._line(failing)
        self.assertEqual((event["level"], event["error"]),
                         ("critical", "bad thing"))
        self.assertIn("ValueError: bad thing", event["traceback"])
        self.flushLoggedErrors(ValueError)

    def test_rate_limited_warnings_keep_the_namespace_that_warned(self):
        from twisted.internet.task import Clock

        from sslshare.logs import RateLimitedWarning

        warnings = RateLimitedWarning(Clock())
        event = self._line(lambda: warnings.warn("peer {peer} is down",
                                                 peer="node2"))
        self.assertEqual((event["namespace"], event["level"]),
                         (__name__, "warn"))
