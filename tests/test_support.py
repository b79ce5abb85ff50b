"""
The test PKI: its files load into Python's C{ssl} and a stock client that
trusts the CA accepts each server identity under its names.  Free ports,
the skip of the tests that need a Redis or PostgreSQL driver, L{until}, and
which modules C{make test-quick} runs.
"""

import os
import socket
import ssl
import sys

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from sslshare.dev.throwaway import free_port
from tests.support.clients import client_context
from tests.support.databases import SERVER_DRIVERS
from tests.support.pki import make_pki, pki
from tests.support.suite import SLOW, quick, slow
from tests.support.waiting import until


def _handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext,
               server_hostname: str) -> None:
    """
    Run a TLS handshake between two contexts through memory buffers; raise
    C{ssl.SSLError} if either side refuses the other.
    """
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(client_in, client_out,
                                     server_hostname=server_hostname)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    pending = {client, server}
    # A TLS 1.3 handshake is done in two round trips; a few more rounds only
    # make a broken handshake fail on the assertion rather than hang.  A side
    # that is done answers do_handshake at once.
    for _ in range(5):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                continue
            pending.discard(side)
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if not pending:
            return
    raise AssertionError(f"handshake with {server_hostname} did not finish")


class MakePKITests(TestCase):

    def test_writes_every_file(self):
        directory = self.mktemp()
        files = make_pki(directory)
        for path in attrs.astuple(files):
            self.assertEqual(os.path.dirname(path), directory)
            self.assertGreater(os.path.getsize(path), 0)

    def test_chains_load_with_their_keys(self):
        files = pki()
        for chain, key in [(files.rsa_chain, files.rsa_key),
                           (files.ec_chain, files.ec_key),
                           (files.other_chain, files.other_key)]:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(chain, key)

    def _handshake_as(self, chain, key, server_hostname):
        files = pki()
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(chain, key)
        _handshake(server_context, client_context(files.ca_cert, strict=True),
                   server_hostname)

    def test_client_accepts_rsa_certificate_for_localhost(self):
        files = pki()
        self._handshake_as(files.rsa_chain, files.rsa_key, "localhost")

    def test_client_accepts_ec_certificate_for_loopback_address(self):
        files = pki()
        self._handshake_as(files.ec_chain, files.ec_key, "127.0.0.1")

    def test_client_accepts_other_certificate_for_its_name(self):
        files = pki()
        self._handshake_as(files.other_chain, files.other_key, "other.test")

    def test_client_refuses_localhost_certificate_for_other_name(self):
        files = pki()
        self.assertRaises(ssl.SSLCertVerificationError, self._handshake_as,
                          files.ec_chain, files.ec_key, "other.test")

    def test_one_pki_per_process(self):
        self.assertIs(pki(), pki())


class _PortsOfAChild(ProcessProtocol):
    """
    A child that prints one line of ports, then waits until its standard
    input is closed.
    """

    def __init__(self):
        self.ports = Deferred()
        self.ended = Deferred()
        self._output = b""

    def outReceived(self, data):
        self._output += data
        if b"\n" in self._output and not self.ports.called:
            self.ports.callback({int(port) for port in self._output.split()})

    def processEnded(self, reason):
        self.ended.callback(None)


class FreePortTests(TestCase):
    """
    L{free_port}: ports a test can name in a configuration and listen on
    later, which no client connection of the meantime can have taken.
    """

    def test_ports_are_outside_the_ephemeral_range_and_never_repeat(self):
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(field) for field in f.read().split())
        if low - 10000 < 4096 and 65535 - high < 4096:
            raise SkipTest(f"the ephemeral range {low}-{high} leaves no room")
        ports = [free_port() for _ in range(200)]
        self.assertEqual(len(set(ports)), len(ports))
        self.assertEqual([port for port in ports if low <= port <= high], [])

    def test_port_can_be_listened_on(self):
        port = free_port()
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", port))
            listener.listen()

    @inlineCallbacks
    def test_ports_given_to_a_live_process_are_not_given_here(self):
        # A few hundred ports each of a range of about 20000 would share
        # some if each process drew its own.
        child = ("import sys\n"
                 "from sslshare.dev.throwaway import free_port\n"
                 "print(' '.join(str(free_port()) for _ in range(300)),"
                 " flush=True)\n"
                 "sys.stdin.read()\n")
        child_process = _PortsOfAChild()
        process = reactor.spawnProcess(child_process, sys.executable,
                                       [sys.executable, "-c", child],
                                       env=os.environ)
        theirs = yield child_process.ports
        ours = {free_port() for _ in range(1000)}
        process.closeStdin()
        yield child_process.ended
        self.assertEqual(len(theirs), 300)
        self.assertEqual(ours & theirs, set())


# A test of each kind that needs a driver: the repository's own, a cluster's
# through the repository, and the demo's.
NEEDS_A_DRIVER = (
    "tests.test_repository.RedisRepositoryTests.test_key_lives_as_long_as_the_session",
    "tests.test_repository.PostgresRepositoryTests.test_repositories_starting_together_make_the_table_once",
    "tests.test_repository_node.RedisTopologyTests.test_tampered_blob_gives_full_handshake",
    "tests.test_repository_node.PostgresTopologyTests.test_repository_killed_gives_full_handshakes_then_sharing_returns",
    "tests.test_demo.DemoTests.test_demo_through_redis_resumes_from_the_repository",
)


class SkipWithoutTests(TestCase):
    """
    L{skip_without}: a test that needs a driver that is not
    installed is skipped with the reason, never an error.
    """

    @inlineCallbacks
    def test_tests_skip_naming_the_driver_that_cannot_be_imported(self):
        # A directory first on the path whose redis and psycopg packages
        # fail to import, as when they are not installed.
        hidden = os.path.abspath(self.mktemp())
        for driver in SERVER_DRIVERS.values():
            os.makedirs(os.path.join(hidden, driver))
            reason = f"no module {driver}"
            with open(os.path.join(hidden, driver, "__init__.py"), "w") as f:
                f.write(f"raise ImportError({reason!r})\n")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join((hidden, root)))
        output, error, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "twisted.trial", "--temp-directory",
             os.path.abspath(self.mktemp()), *NEEDS_A_DRIVER],
            env=env, path=root)
        output = output.decode()
        self.assertEqual(code, 0, output + error.decode())
        self.assertIn(f"PASSED (skips={len(NEEDS_A_DRIVER)})", output)
        for kind, driver in SERVER_DRIVERS.items():
            self.assertIn(f"the {kind} driver is not installed (pip install "
                          f"'sslshare[{kind}]'): no module {driver}", output)


class UntilTests(TestCase):
    """
    L{until} fires once its predicate holds, and fails once its timeout has
    passed.
    """

    def test_fires_once_the_predicate_holds(self):
        clock = Clock()
        holds = []
        waiting = until(lambda: holds, clock=clock)
        clock.advance(0.02)
        self.assertNoResult(waiting)
        holds.append(True)
        clock.advance(0.02)
        self.assertIsNone(self.successResultOf(waiting))

    def test_fires_at_once_if_the_predicate_holds(self):
        self.assertIsNone(self.successResultOf(
            until(lambda: True, clock=Clock())))

    def test_asks_every_interval(self):
        clock = Clock()
        asked = []
        waiting = until(lambda: asked.append(clock.seconds()), clock=clock,
                        interval=0.5)
        clock.pump([0.5] * 3)
        self.assertEqual(asked, [0.0, 0.5, 1.0, 1.5])
        self.assertNoResult(waiting)
        waiting.cancel()
        self.failureResultOf(waiting)

    def test_predicate_may_answer_with_a_deferred(self):
        clock = Clock()
        answers = iter([False, True])
        waiting = until(lambda: succeed(next(answers)), clock=clock)
        self.assertNoResult(waiting)
        clock.advance(0.02)
        self.assertIsNone(self.successResultOf(waiting))

    def test_fails_after_its_timeout(self):
        clock = Clock()
        waiting = until(lambda: False, timeout=1.0, clock=clock,
                        message="never")
        clock.advance(0.9)
        self.assertNoResult(waiting)
        clock.advance(0.2)
        failure = self.failureResultOf(waiting, AssertionError)
        self.assertEqual(str(failure.value), "never")


class SuiteSelectionTests(TestCase):
    """
    C{make test-quick} runs the quick modules, C{make test} all of them:
    every test module is either quick or slow.
    """

    def _test_modules(self):
        directory = os.path.dirname(os.path.abspath(__file__))
        return {f"tests.{name[:-3]}" for name in os.listdir(directory)
                if name.startswith("test_") and name.endswith(".py")}

    def test_every_module_is_quick_or_slow_and_not_both(self):
        self.assertEqual(set(quick()) | set(slow()), self._test_modules())
        self.assertEqual(set(quick()) & set(slow()), set())
        self.assertIn(__name__, quick())

    def test_slow_modules_exist(self):
        self.assertLessEqual(SLOW, self._test_modules())
        self.assertEqual(set(slow()), SLOW)
