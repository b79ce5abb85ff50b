"""
Hostile input against running nodes, over real sockets: malformed and
oversized ClientHellos, session ids and PSK identities of every length,
floods of lookups for sessions that do not exist, slow clients, and peers
that send the cluster channel garbage.  Every case must end cleanly (an
alert, a closed connection, or a handshake that goes on) and the node must
go on serving an ordinary client afterwards.

Each test prints one line of figures ("hostile ...: N cases, ...") for the
project's records.
"""

from __future__ import annotations

import os
import struct
from collections import Counter

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from sslshare import config
from sslshare.tools import ask_stats
from tests.support.clients import held_amp_client, python_client_round
from tests.support.cluster import LocalCluster
from tests.support.pki import pki
from tests.support.processes import resident_bytes
from tests.support.servers import StallingHandler
from tests.support.sessions import session_id_of
from tests.support.waiting import until
from tests.support.wire import client_hello, exchange, fragment, psk_extension

HANDSHAKE_TIMEOUT = 1.0
# Far above anything a case should take: only a hang reaches it.
DEADLINE = HANDSHAKE_TIMEOUT + 15.0
CLEAN = frozenset({"alert", "closed", "handshake"})


def report(what, outcomes, controls):
    """
    Print the figures of one batch of hostile cases.
    """
    tally = ", ".join(f"{count} {outcome}" for outcome, count
                      in sorted(Counter(outcomes).items()))
    print(f"\nhostile {what}: {len(outcomes)} cases ({tally}), "
          f"{outcomes.count('hung')} hung, node served {controls} control "
          f"clients", flush=True)


def in_batches(cases, run, size=100):
    """
    C{run(case)} for every case, C{size} at a time; fires with the
    outcomes in order.
    """
    async def batches():
        outcomes = []
        for start in range(0, len(cases), size):
            outcomes += await gatherResults(
                [run(case) for case in cases[start:start + size]])
        return outcomes

    return Deferred.fromCoroutine(batches())


def ended_lookups(counters):
    """
    The lookups past the store that found nothing: a miss, or a timeout
    when the budget ran out first (as it may on a loaded machine).
    """
    return counters["misses"] + counters["timeouts"]


class _HostileClusterTestCase(TestCase):
    """
    node1 and node2 in this process, with a short handshake timeout; an
    ordinary client must get a full handshake from node1 and resume it on
    node2 after each batch of hostile cases.
    """

    node_options = f"handshake_timeout_s = {HANDSHAKE_TIMEOUT}\n"

    @inlineCallbacks
    def setUp(self):
        self.cluster = LocalCluster(self, nodes=("node1", "node2"),
                                    node_options=self.node_options)
        yield self.cluster.start_all()
        self.controls = 0

    @inlineCallbacks
    def assert_still_serving(self, version="TLSv1.2"):
        """
        An ordinary client gets a session from node1 and resumes it on
        node2.
        """
        first = yield self.cluster.client_round("node1", version)
        second = yield self.cluster.client_round(
            "node2", version, first.session)
        self.assertEqual((first.echo, second.echo), (b"hello", b"hello"))
        self.assertTrue(second.reused, "the control client did not resume")
        self.controls += 2

    def send(self, chunks, node="node2", **options):
        options.setdefault("deadline", DEADLINE)
        return exchange(self.cluster.ports[node], chunks, **options)

    def assertOutcomes(self, cases, outcomes):
        """
        Every case ended as it should: C{cases} are (name, bytes, expected
        outcomes) triples.
        """
        wrong = [(name, outcome) for (name, _, expected), outcome
                 in zip(cases, outcomes) if outcome not in expected]
        self.assertEqual(wrong, [])


class ClientHelloTests(_HostileClusterTestCase):
    """
    ClientHellos that are cut short, too large, split oddly, or not
    ClientHellos at all.
    """

    def _malformed_cases(self):
        hello12 = client_hello(False)
        hello13 = client_hello(True)
        huge_length = hello12[:6] + b"\xff\xff\xff" + hello12[9:]
        cases = []
        for cut in (1, 3, 5, 6, 9, 40, len(hello12) // 2, len(hello12) - 1):
            # The server waits for the rest, until the handshake timeout.
            cases.append((f"truncated at {cut}", hello12[:cut], {"closed"}))
        for size in (1, 2, 7, 100, 16384):
            cases.append((f"TLS 1.2 in records of {size}",
                          fragment(hello12, size), {"handshake"}))
            cases.append((f"TLS 1.3 in records of {size}",
                          fragment(hello13, size), {"handshake"}))
        cases += [
            ("record of 16 KiB + 1 of garbage",
             b"\x16\x03\x01" + struct.pack("!H", 16385) + os.urandom(16385),
             {"alert"}),
            ("record claiming 64 KiB", b"\x16\x03\x01\xff\xff" + b"\x01" * 1000,
             {"alert"}),
            ("hello claiming 16 MiB", huge_length, {"alert"}),
            ("hello claiming 16 MiB, sent in full",
             fragment(b"\x16\x03\x01\x00\x00\x01\xff\xff\xff"
                      + b"\0" * 200000, 16384), {"alert"}),
            ("hello claiming fewer bytes than it has",
             hello12[:6] + b"\x00\x00\x10" + hello12[9:], {"alert"}),
            ("zero-length record", b"\x16\x03\x01\x00\x00",
             {"alert", "closed"}),
            ("application data first", b"\x17\x03\x03\x00\x05hello", {"alert"}),
            ("change cipher spec first", b"\x14\x03\x03\x00\x01\x01", {"alert"}),
            ("alert first", b"\x15\x03\x03\x00\x02\x02\x28",
             {"alert", "closed"}),
            ("SSL 2 hello", b"\x80\x2e\x01\x00\x02" + os.urandom(44), CLEAN),
            ("HTTP request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
             {"alert", "closed"}),
            ("hello for SSL 3", client_hello(False, legacy_version=0x0300),
             {"alert"}),
            ("two hellos in a row", hello12 + hello12, CLEAN),
            ("nothing", b"", {"closed"}),
        ]
        # ClientHellos over 16 KiB: a padding extension of 40 KiB.
        cases.append(("hello of 40 KiB across records", fragment(
            _with_extension(hello12, 21, b"\0" * 40000), 16384), CLEAN))
        for seed in range(60):
            junk = os.urandom(1 + seed * 37)
            cases.append((f"{len(junk)} random bytes", junk, CLEAN))
            cases.append((f"record header and {len(junk)} random bytes",
                          b"\x16\x03\x01" + struct.pack("!H", len(junk)) + junk,
                          CLEAN))
        return cases

    @inlineCallbacks
    def test_malformed_client_hellos_end_cleanly(self):
        cases = self._malformed_cases()
        outcomes = yield in_batches(
            cases, lambda case: self.send([case[1]] if case[1] else []))
        self.assertOutcomes(cases, outcomes)
        yield self.assert_still_serving()
        yield self.assert_still_serving("TLSv1.3")
        report("ClientHellos", outcomes, self.controls)

    @inlineCallbacks
    def test_tls12_session_ids_of_every_length(self):
        """
        Lengths up to 32 are what TLS allows, and become full handshakes;
        longer ones break the protocol and are refused.
        """
        cases = []
        for length in range(256):
            expected = {"handshake"} if length <= 32 else {"alert"}
            cases.append((f"random id of {length}", os.urandom(length),
                          expected))
            if length != 32:
                cases.append((f"id of {length} in our format",
                              session_id_of("node1")[:length].ljust(length, b"\1"),
                              expected))
        cases += [
            ("unknown node", session_id_of("node9"), {"handshake"}),
            ("another cluster", session_id_of("node1", "other"), {"handshake"}),
            ("node2 itself, unknown id", session_id_of("node2"), {"handshake"}),
            ("node1, which does not have it", session_id_of("node1"),
             {"handshake"}),
        ]
        outcomes = yield in_batches(cases, lambda case: self.send(
            [client_hello(False, session_id=case[1])]))
        self.assertOutcomes(cases, outcomes)
        node1, node2 = self.cluster.nodes["node1"], self.cluster.nodes["node2"]
        # The four ids of our format were looked up, and each lookup ended
        # as a miss, or as a timeout when the machine is busy; only node1's
        # was asked of anyone, at most once.
        self.assertEqual(ended_lookups(node2.recovery.counters), 4)
        self.assertLessEqual(
            node1.peer_server.counters["commands:FetchSession"], 1)
        yield self.assert_still_serving()
        report("TLS 1.2 session ids", outcomes, self.controls)

    @inlineCallbacks
    def test_tls13_psk_identities_of_every_length(self):
        lengths = [*range(32), *range(33, 256), 1000, 16000, 30000, 65000]
        cases = []
        for length in lengths:
            # An empty identity breaks the protocol; the others are
            # identities of tickets nobody issued.
            expected = {"alert"} if length == 0 else {"handshake"}
            cases.append((f"identity of {length}", [os.urandom(length)],
                          expected))
        cases += [
            ("unknown node", [session_id_of("node9")], {"handshake"}),
            ("node2 itself, unknown id", [session_id_of("node2")],
             {"handshake"}),
            ("node1, which does not have it", [session_id_of("node1")],
             {"handshake"}),
            ("foreign, then node1's", [os.urandom(20), session_id_of("node1")],
             {"handshake"}),
            ("twenty of node1's", [session_id_of("node1") for _ in range(20)],
             {"handshake"}),
        ]

        def hello(identities):
            record = client_hello(True, psk=psk_extension(identities))
            return fragment(record, 16384)

        outcomes = yield in_batches(
            cases, lambda case: self.send([hello(case[1])]))
        self.assertOutcomes(cases, outcomes)
        yield self.assert_still_serving("TLSv1.3")
        report("TLS 1.3 PSK identities", outcomes, self.controls)


class LookupFloodTests(_HostileClusterTestCase):
    """
    A flood of ClientHellos for sessions nobody holds, 200 at a time from
    one address.  The nodes keep their default handshake timeout: the
    flood, the nodes and its clients share this process, and on a busy
    machine (trial -j) a short timeout would cut hellos that are only
    waiting for the CPU.
    """

    node_options = ""

    @inlineCallbacks
    def test_thousands_of_unknown_ids_are_no_amplifier(self):
        """
        Each ClientHello naming node1 costs node1 at most one FetchSession,
        and every one of them gets its full handshake.  They all come from
        one address, 200 at a time: past max_lookups_per_client (100 by
        default) node2 does not even ask.
        """
        count = 2000
        cases = [(f"unknown id {i}", session_id_of("node1"), {"handshake"})
                 for i in range(count)]
        outcomes = yield in_batches(cases, lambda case: self.send(
            [client_hello(False, session_id=case[1])]), size=200)
        self.assertOutcomes(cases, outcomes)
        node1, node2 = self.cluster.nodes["node1"], self.cluster.nodes["node2"]
        asked = node1.peer_server.counters["commands:FetchSession"]
        lookups = node2.recovery.counters
        # Every hello was either shed or looked up, and a lookup asked
        # node1 at most once, whether it ended as a miss or, on a busy
        # machine, timed out first.
        self.assertEqual(ended_lookups(lookups)
                         + lookups["lookups_shed_per_client"], count)
        self.assertLessEqual(asked, ended_lookups(lookups))
        yield self.assert_still_serving()
        report(f"unknown ids ({asked} FetchSession for {count} hellos)",
               outcomes, self.controls)


def _with_extension(record, kind, body):
    """
    The ClientHello record C{record} with one more extension, lengths
    fixed; the record may then be over 16 KiB (L{fragment} it).
    """
    hello = record[5:]
    extensions_at = _extensions_offset(hello)
    extension = struct.pack("!HH", kind, len(body)) + body
    old_length = struct.unpack("!H", hello[extensions_at:extensions_at + 2])[0]
    rest = hello[extensions_at + 2:]
    message = (hello[4:extensions_at] + struct.pack("!H", old_length + len(extension))
               + rest + extension)
    handshake = b"\x01" + struct.pack("!I", len(message))[1:] + message
    return record[:3] + struct.pack("!I", len(handshake))[2:] + handshake


def _extensions_offset(hello):
    # type(1) length(3) version(2) random(32), then session id, suites,
    # compression methods.
    at = 4 + 2 + 32
    at += 1 + hello[at]
    at += 2 + struct.unpack("!H", hello[at:at + 2])[0]
    at += 1 + hello[at]
    return at


class LookupBoundTests(TestCase):
    """
    node1 is a peer that connects and takes questions but never answers:
    node2 asks it at most max_concurrent_lookups FetchSession questions
    at once, and no more than max_lookups_per_client for one client
    address; every other handshake naming node1 is full at once.
    """

    budget_ms = 2000

    @inlineCallbacks
    def _start(self, total, per_client, more_options=""):
        self.cluster = LocalCluster(
            self, nodes=("node1", "node2"), budget_ms=self.budget_ms,
            node_options=f"max_concurrent_lookups = {total}\n"
                         f"max_lookups_per_client = {per_client}\n"
                         + more_options)
        self.stalled = StallingHandler()
        self.cluster.impersonate("node1", self.stalled)
        self.node2 = self.cluster.start("node2")
        yield self.node2.peer_links.link("node1").when_connected()
        self.outcomes = []

    def _hellos(self, count, source="127.0.0.1"):
        """
        C{count} ClientHellos offering sessions of node1, from C{source}.
        """
        attempts = [exchange(self.cluster.ports["node2"],
                             [client_hello(False, session_id=session_id_of("node1"))],
                             source=source, deadline=DEADLINE)
                    for _ in range(count)]
        for attempt in attempts:
            attempt.addCallback(self.outcomes.append)
        return gatherResults(attempts)

    @inlineCallbacks
    def _served_meanwhile(self):
        """
        An ordinary client gets a full handshake, then resumes it from
        node2's own store: local hits are never shed.
        """
        port, ca = self.cluster.ports["node2"], self.cluster.ca_cert
        first = yield deferToThread(python_client_round, port, ca, "TLSv1.2")
        second = yield deferToThread(python_client_round, port, ca, "TLSv1.2",
                                     first.session)
        self.assertTrue(second.reused)
        return 2

    @inlineCallbacks
    def test_node_asks_a_stalled_peer_at_most_its_bound(self):
        yield self._start(total=4, per_client=100)
        counters = self.node2.recovery.counters
        first = self._hellos(20)
        # The 16 past the bound are full handshakes at once, while the 4
        # admitted still wait for node1.
        yield until(lambda: len(self.outcomes) == 16)
        self.assertEqual(len(self.stalled.fetches), 4)
        self.assertEqual((counters["lookups_shed"], counters["timeouts"]),
                         (16, 0))
        controls = yield self._served_meanwhile()
        yield first
        self.assertEqual(counters["timeouts"], 4)
        # node2 gave up on its 4 questions, but node1 has not answered
        # them: it is asked nothing more, and its sessions are full
        # handshakes at once.
        yield self._hellos(10)
        self.assertEqual(len(self.stalled.fetches), 4)
        self.assertEqual(counters["peer_errors"], 10)
        link = self.node2.peer_links.link("node1")
        self.assertEqual(link.counters["unanswered_bound"], 10)
        self.assertEqual(set(self.outcomes), {"handshake"})
        report("lookups at a stalled peer (at most 4 questions out)",
               self.outcomes, controls)

    @inlineCallbacks
    def test_lookup_of_a_client_cut_at_the_timeout_ends_within_the_budget(self):
        """
        A client that times out while its lookup waits does not take the
        lookup with it: the chain (whose question is out at node1) counts
        until the budget ends it, then the bound has room again.
        """
        yield self._start(total=2, per_client=2,
                          more_options="handshake_timeout_s = 0.3\n")
        counters = self.node2.recovery.counters
        yield self._hellos(2)
        self.assertEqual(self.node2.counters["handshake_timeouts"], 2)
        self.assertEqual(counters["timeouts"], 0)
        yield self._hellos(2)
        self.assertEqual(counters["lookups_shed"], 2)
        yield until(lambda: counters["timeouts"] == 2)
        yield self._hellos(2)
        self.assertEqual(counters["lookups_shed"], 2)
        # node1 still holds the first two questions: the link asked no more.
        self.assertEqual(len(self.stalled.fetches), 2)
        self.assertEqual(self.node2.counters["handshake_timeouts"], 2)
        self.assertEqual(sorted(set(self.outcomes)), ["closed", "handshake"])
        controls = yield self._served_meanwhile()
        report("lookups of clients cut at the timeout", self.outcomes,
               controls)

    @inlineCallbacks
    def test_one_client_address_gets_at_most_its_share(self):
        yield self._start(total=50, per_client=3)
        counters = self.node2.recovery.counters
        one = self._hellos(10, source="127.0.0.1")
        yield until(lambda: len(self.outcomes) == 7)
        self.assertEqual(len(self.stalled.fetches), 3)
        self.assertEqual(counters["lookups_shed_per_client"], 7)
        # Another address still gets its lookups.
        other = self._hellos(3, source="127.0.0.2")
        yield until(lambda: len(self.stalled.fetches) == 6)
        controls = yield self._served_meanwhile()
        yield gatherResults([one, other])
        self.assertEqual(counters["lookups_shed_per_client"], 7)
        self.assertEqual(counters["lookups_shed"], 0)
        self.assertEqual(set(self.outcomes), {"handshake"})
        report("lookups of one client address (at most 3 out)",
               self.outcomes, controls)


class SlowClientTests(_HostileClusterTestCase):
    """
    Clients that connect and say nothing, or send their ClientHello a byte
    at a time, are cut at the handshake timeout while others are served.
    """

    @inlineCallbacks
    def test_slow_and_silent_clients_are_cut_at_the_handshake_timeout(self):
        hello = client_hello(False, session_id=session_id_of("node1"))
        byte_by_byte = [hello[i:i + 1] for i in range(len(hello))]
        attempts = (
            [self.send([]) for _ in range(20)]
            # Seconds to send in full: far past the timeout.
            + [self.send(byte_by_byte, delay=0.05) for _ in range(20)]
            + [self.send([hello[:len(hello) // 2]]) for _ in range(10)]
            + [self.send([hello[:5]]) for _ in range(10)])
        yield self.assert_still_serving()
        yield self.assert_still_serving("TLSv1.3")
        outcomes = yield gatherResults(attempts)
        self.assertEqual(set(outcomes), {"closed"})
        node2 = self.cluster.nodes["node2"]
        self.assertEqual(node2.counters["handshake_timeouts"], len(attempts))
        yield self.assert_still_serving()
        report("slow and silent clients", outcomes, self.controls)


def amp_box(*pairs):
    """
    An AMP box of (key, value) byte strings, encoded by hand so that it
    may break AMP's own limits.
    """
    return b"".join(struct.pack("!H", len(key)) + key
                    + struct.pack("!H", len(value)) + value
                    for key, value in pairs) + b"\0\0"


def amp_command(command, ask=b"1", **arguments):
    pairs = [(b"_command", command)]
    if ask is not None:
        pairs.append((b"_ask", ask))
    pairs += [(key.encode(), value) for key, value in arguments.items()]
    return amp_box(*pairs)


def amp_outcome(received, closed):
    """
    What an AMP server answered: C{"answer"}, C{"error <code>"} for the
    first box it sent back, C{"closed"} if it closed without one; C{None}
    while it is too early to say.
    """
    box, at = {}, 0
    while at + 2 <= len(received):
        length = struct.unpack("!H", received[at:at + 2])[0]
        if length == 0:
            if b"_error_code" in box:
                return "error " + box[b"_error_code"].decode()
            return "answer" if b"_answer" in box else "other"
        key = received[at + 2:at + 2 + length]
        at += 2 + length
        if at + 2 > len(received):
            break
        size = struct.unpack("!H", received[at:at + 2])[0]
        if at + 2 + size > len(received):
            break
        box[key] = received[at + 2:at + 2 + size]
        at += 2 + size
    return "closed" if closed else None


def _client_tls(chain=None, key=None):
    """
    Client TLS options presenting the certificate in C{chain} (none if
    C{None}); the server is not verified: the attacker does not care.
    """
    if chain is None:
        return CertificateOptions()
    with open(chain, "rb") as f:
        certificate = x509.load_pem_x509_certificates(f.read())[0]
    with open(key, "rb") as f:
        private_key = serialization.load_pem_private_key(f.read(), None)
    return CertificateOptions(privateKey=private_key, certificate=certificate)


class ClusterChannelTests(_HostileClusterTestCase):
    """
    Boxes a peer with a valid certificate should never send, and
    connections from those without one, at node1's cluster port; node1
    keeps working with node2 all along.
    """

    def _amp(self, data, tls):
        return exchange(self.cluster.amp_ports["node1"], [data], tls=tls,
                        judge=amp_outcome, deadline=DEADLINE)

    def _peer_cases(self):
        own = session_id_of("node1")
        bad = "error BAD_REQUEST"
        cases = [
            ("key of 256 bytes", amp_box((b"k" * 256, b"v")), {"closed"}),
            ("key length 0xffff", b"\xff\xff" + os.urandom(200), {"closed"}),
            ("key length 256, then garbage", b"\x01\x00" + os.urandom(300),
             {"closed"}),
            ("answer to no question", amp_box((b"_answer", b"1")), {"closed"}),
            ("error to no question",
             amp_box((b"_error", b"1"), (b"_error_code", b"X"),
                     (b"_error_description", b"x")), {"closed"}),
            ("empty box", b"\0\0", {"closed"}),
            ("command and answer at once",
             amp_box((b"_command", b"Stats"), (b"_ask", b"1"),
                     (b"_answer", b"2")), {"closed"}),
            ("unknown command", amp_command(b"Explode"), {"error UNHANDLED"}),
            ("StartTLS", amp_command(b"StartTLS"), {"error UNHANDLED"}),
            ("command name of 255 bytes", amp_command(b"X" * 255),
             {"error UNHANDLED"}),
            ("FetchSession of 64 KiB", amp_command(
                b"FetchSession", session_id=b"\1" * 65535), {bad}),
            ("FetchSession without id", amp_command(b"FetchSession"), {bad}),
            ("FetchSession in format 2",
             amp_command(b"FetchSession", session_id=b"\2" + own[1:]), {bad}),
            ("FetchSession of an id nobody has",
             amp_command(b"FetchSession", session_id=own), {"answer"}),
            ("Checkpoint with a digest of 16",
             amp_command(b"Checkpoint", session_id=own, seq=b"1",
                         digest=b"d" * 16), {bad}),
            ("Checkpoint without digest",
             amp_command(b"Checkpoint", session_id=own, seq=b"1"), {bad}),
            ("Backup of an empty blob",
             amp_command(b"Backup", session_id=own, sealed=b""), {bad}),
            ("Backup over 16 KiB",
             amp_command(b"Backup", session_id=own, sealed=b"s" * 16385), {bad}),
            ("Backup of a blob that does not open",
             amp_command(b"Backup", session_id=own, sealed=os.urandom(200)),
             {"answer"}),
            ("Backup of a short id",
             amp_command(b"Backup", session_id=own[:31], sealed=b"s" * 100),
             {bad}),
            ("Purge of a long id", amp_command(b"Purge", session_id=own + b"x"),
             {bad}),
            ("Deliver of no items", amp_command(b"Deliver", items=b""), {bad}),
            ("Deliver without items", amp_command(b"Deliver"), {bad}),
            ("Deliver of an item of unknown kind",
             amp_command(b"Deliver", items=b"X\x20" + own), {bad}),
            ("Deliver of a Purge whose id runs past the end",
             amp_command(b"Deliver", items=b"P\x20" + own[:20]), {bad}),
            ("Deliver of a Purge of a short id",
             amp_command(b"Deliver", items=b"P\x1f" + own[:31]), {bad}),
            ("Deliver of a Backup longer than its items",
             amp_command(b"Deliver", items=b"B\x20" + own + b"\x01\x00s"),
             {bad}),
            ("Deliver of a Backup over 16 KiB",
             amp_command(b"Deliver", items=b"B\x20" + own + b"\x40\x01"
                         + b"s" * 16385), {bad}),
            ("Deliver of a Checkpoint with a digest of 16",
             amp_command(b"Deliver", items=b"C\x20" + own + bytes(7)
                         + b"\x01\x10" + b"d" * 16), {bad}),
            ("Deliver of a Checkpoint of seq 2**64-1",
             amp_command(b"Deliver", items=b"C\x20" + own + b"\xff" * 8
                         + b"\x00"), {bad}),
            ("Deliver of a good Purge, then a truncated one",
             amp_command(b"Deliver", items=b"P\x20" + own + b"P\x20"),
             {bad}),
            ("Deliver of 257 Purges",
             amp_command(b"Deliver", items=(b"P\x20" + own + b"\x00") * 257),
             {bad}),
            ("Deliver of a Purge of an id nobody has",
             amp_command(b"Deliver", items=b"P\x20" + own + b"\x00"),
             {"answer"}),
            ("Stats with an argument it does not take",
             amp_command(b"Stats", junk=b"x" * 1000), {"answer"}),
            ("command without _ask, then Stats",
             amp_command(b"FetchSession", ask=None, session_id=b"")
             + amp_command(b"Stats"), {"closed"}),
            ("200 bad FetchSession in a row",
             b"".join(amp_command(b"FetchSession", ask=str(i).encode(),
                                  session_id=b"x") for i in range(200)), {bad}),
        ]
        for length in (0, 1, 16, 31, 33, 64, 255, 1000):
            cases.append((f"FetchSession id of {length}", amp_command(
                b"FetchSession", session_id=os.urandom(length)), {bad}))
        for seq in (b"-1", str(2 ** 64).encode(), b"abc", b"", b"9" * 5000,
                    b"1e3", b"\xff"):
            cases.append((f"Checkpoint seq {seq[:10]!r}", amp_command(
                b"Checkpoint", session_id=own, seq=seq, digest=b""), {bad}))
        return cases

    @inlineCallbacks
    def test_peer_with_a_valid_certificate_sending_garbage(self):
        node2 = self.cluster.pki.node("node2")
        tls = _client_tls(node2.certificate, node2.key)
        cases = self._peer_cases()
        outcomes = yield in_batches(cases, lambda case: self._amp(case[1], tls))
        self.assertOutcomes(cases, outcomes)
        counters = self.cluster.nodes["node1"].peer_server.counters
        self.assertEqual(counters["protocol_errors"], outcomes.count("closed"))
        self.assertEqual(counters["unknown_commands"],
                         outcomes.count("error UNHANDLED"))
        # The 200 boxes in a row are 200 bad requests, not one.
        self.assertEqual(counters["bad_requests"],
                         outcomes.count("error BAD_REQUEST") + 199)
        yield self.assert_still_serving()
        yield self.assert_still_serving("TLSv1.3")
        report("cluster boxes from a peer", outcomes, self.controls)

    @inlineCallbacks
    def test_connections_without_a_valid_certificate(self):
        box = amp_command(b"Stats")
        cases = [
            ("plain garbage", None, os.urandom(500)),
            ("plain AMP box", None, box),
            ("TLS without certificate", _client_tls(), box),
            ("TLS with another CA's certificate",
             _client_tls(pki().ec_chain, pki().ec_key), box),
            ("TLS with the client-facing certificate",
             _client_tls(self.cluster.pki.server_chain,
                         self.cluster.pki.server_key), box),
        ]
        cases = [(name, (tls, data), {"closed"}) for name, tls, data in cases
                 for _ in range(5)]
        outcomes = yield in_batches(
            cases, lambda case: self._amp(case[1][1], case[1][0]))
        self.assertOutcomes(cases, outcomes)
        counters = self.cluster.nodes["node1"].peer_server.counters
        self.assertEqual(counters["refused_connections"], len(cases))
        self.assertEqual(counters["commands:Stats"], 0)
        yield self.assert_still_serving()
        report("cluster connections without a valid certificate", outcomes,
               self.controls)

    @inlineCallbacks
    def test_refusal_comes_before_unreadable_arguments(self):
        """
        node1's own certificate may ask node1 for Stats only: garbled
        arguments of another command are refused as not authorized, not
        read.
        """
        node1 = self.cluster.pki.node("node1")
        tls = _client_tls(node1.certificate, node1.key)
        own = session_id_of("node1")
        cases = [
            ("Checkpoint seq 'abc'", amp_command(
                b"Checkpoint", session_id=own, seq=b"abc", digest=b""),
             {"error NOT_AUTHORIZED"}),
            ("FetchSession without id", amp_command(b"FetchSession"),
             {"error NOT_AUTHORIZED"}),
            ("Stats", amp_command(b"Stats"), {"answer"}),
        ]
        outcomes = yield in_batches(cases, lambda case: self._amp(case[1], tls))
        self.assertOutcomes(cases, outcomes)
        counters = self.cluster.nodes["node1"].peer_server.counters
        self.assertEqual((counters["refused_commands"], counters["bad_requests"]),
                         (2, 0))


MiB = 1024 * 1024
# Growth of the node's resident memory that only an unbounded buffer
# reaches: a bounded channel stays far below it.
RUNAWAY_GROWTH = 32 * MiB


class ChannelBoundTests(TestCase):
    """
    node1 runs as a C{twistd} process of its own, so that its resident
    memory and its log are its own; a client with node2's certificate
    never ends a box, or asks and never reads the answers, or asks for
    what it may not have.
    """

    timeout = 300

    @inlineCallbacks
    def setUp(self):
        self.cluster = LocalCluster(self, nodes=("node1", "node2"))
        yield self.cluster.spawn("node1")
        self.pid = self.cluster.processes["node1"].pid
        node2 = self.cluster.pki.node("node2")
        self.tls = _client_tls(node2.certificate, node2.key)
        # A first round trip, so that the baseline includes what any
        # connection costs.
        warm = yield self._connect(amp_command(b"Stats"))
        warm.read()
        yield until(lambda: warm.boxes == 1)
        warm.transport.loseConnection()
        yield warm.closed
        self.before = resident_bytes(self.pid)

    def _connect(self, data, tls=None):
        return held_amp_client(self.cluster.amp_ports["node1"],
                               tls or self.tls, data)

    def _growth(self):
        return resident_bytes(self.pid) - self.before

    def _stats(self):
        return Deferred.fromCoroutine(ask_stats(
            reactor, config.load(self.cluster.paths["node2"], reactor), "node1"))

    def _report(self, what, figures):
        print(f"\nhostile channel memory, {what}: node1 RSS "
              f"{self.before / MiB:.1f} -> {resident_bytes(self.pid) / MiB:.1f} "
              f"MiB, {figures}", flush=True)

    @inlineCallbacks
    def test_a_box_that_never_ends_is_cut_at_its_bound(self):
        value = b"v" * 60000
        data = amp_box((b"_command", b"Stats"), (b"_ask", b"1"),
                       *[(b"k%d" % i, value) for i in range(1100)])[:-2]
        client = yield self._connect(data)
        yield until(lambda: client.closed.called
                    or self._growth() > RUNAWAY_GROWTH, timeout=60)
        growth = self._growth()
        self._report(f"a box of {len(data) // MiB} MiB that never ends",
                     f"connection {'closed' if client.closed.called else 'open'}")
        self.assertTrue(client.closed.called, "node1 kept the box growing")
        self.assertLess(growth, RUNAWAY_GROWTH)
        stats = yield self._stats()
        self.assertEqual(stats["cluster.protocol_errors"], 1)

    @inlineCallbacks
    def test_reading_pauses_while_answers_wait_for_the_peer(self):
        count = 100000
        client = yield self._connect(b"".join(
            amp_command(b"Stats", ask=b"%d" % i) for i in range(count)))
        paused = []

        async def paused_or_runaway():
            while self._growth() <= RUNAWAY_GROWTH:
                stats = await self._stats()
                if stats.get("cluster.reading_paused", 0) >= 1:
                    paused.append(stats)
                    return
                if stats["cluster.commands:Stats"] > count:
                    return
                await deferLater(reactor, 0.2, lambda: None)

        yield Deferred.fromCoroutine(paused_or_runaway())
        growth = self._growth()
        answered = paused[0]["cluster.commands:Stats"] if paused else count
        self._report(f"{count} Stats asked, answers not read",
                     f"{answered} answered before reading paused")
        self.assertTrue(paused, "node1 read on while its answers piled up")
        self.assertLess(growth, RUNAWAY_GROWTH)
        # Nothing is lost: once the peer reads, every question is answered.
        client.read()
        yield until(lambda: client.boxes == count, timeout=120)
        # The TLS close waits for the node's close_notify: the test ends
        # once the connection has.
        client.transport.loseConnection()
        yield client.closed

    @inlineCallbacks
    def test_refused_commands_are_logged_at_a_bounded_rate(self):
        # node1's own certificate may ask node1 for Stats only.
        node1 = self.cluster.pki.node("node1")
        count = 20000
        started = reactor.seconds()
        client = yield self._connect(b"".join(
            amp_command(b"Purge", ask=b"%d" % i, session_id=session_id_of("node1"))
            for i in range(count)), _client_tls(node1.certificate, node1.key))
        client.read()
        yield until(lambda: client.boxes == count, timeout=120)
        # The TLS close waits for the node's close_notify: the test ends
        # once the connection has.
        client.transport.loseConnection()
        yield client.closed
        stats = yield self._stats()
        lines = self.cluster.log("node1").count("refused Purge")
        print(f"\nhostile channel log, {count} refused commands "
              f"({count * len(amp_command(b'Purge', session_id=bytes(32))) // 1024} "
              f"KiB): {lines} log lines", flush=True)
        self.assertEqual(stats["cluster.refused_commands"], count)
        # At most one line per 10 s of the run.
        self.assertLessEqual(lines, 1 + (reactor.seconds() - started) // 10)
