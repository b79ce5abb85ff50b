"""
The TLS engine over real sockets on 127.0.0.1: two independent server
contexts that share nothing but a dict of DER bytes, stock clients (Python
C{ssl}, C{openssl s_client}), and hand-made ClientHellos for bad input.
"""

from __future__ import annotations

import gc
import os
import re
import ssl
import subprocess
import sys
import weakref

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from sslshare import sessionid, tls
from tests.support.clients import python_client_round, s_client_round
from tests.support.cluster import NetworkLookup
from tests.support.pki import pki
from tests.support.servers import SharingPair, TLSServer
from tests.support.wire import client_hello, psk_extension, read_records


class CrossContextResumptionTests(TestCase):
    """
    A session made by one context resumes on another that shares only the
    dict of DER bytes; the answer to the lookup arrives after a reactor
    delay, so the handshake really pauses.
    """

    def setUp(self):
        self.pki = pki()

    @inlineCallbacks
    def _python_client_resumes(self, version, key):
        pair = SharingPair(self, self.pki.chain(key), self.pki.key(key))
        first = yield deferToThread(
            python_client_round, pair.first.port, self.pki.ca_cert, version)
        self.assertFalse(first.reused)
        self.assertEqual(first.version, version)
        second = yield deferToThread(
            python_client_round, pair.second.port, self.pki.ca_cert, version,
            first.session)
        self.assertTrue(second.reused)
        self.assertEqual(second.echo, b"hello")
        self.assertEqual(pair.first.context.counters["full"], 1)
        self.assertEqual(pair.second.context.counters["resumed"], 1)
        self.assertEqual(pair.second.context.counters["lookups"], 1)

    def test_python_client_tls12_rsa_resumes_on_second_context(self):
        return self._python_client_resumes("TLSv1.2", "rsa")

    def test_python_client_tls12_p256_resumes_on_second_context(self):
        return self._python_client_resumes("TLSv1.2", "ec")

    def test_python_client_tls13_rsa_resumes_on_second_context(self):
        return self._python_client_resumes("TLSv1.3", "rsa")

    def test_python_client_tls13_p256_resumes_on_second_context(self):
        return self._python_client_resumes("TLSv1.3", "ec")

    @inlineCallbacks
    def _s_client_resumes(self, version, key):
        pair = SharingPair(self, self.pki.chain(key), self.pki.key(key))
        session_file = self.mktemp()
        first = yield s_client_round(pair.first.port, self.pki.ca_cert,
                                     version, session_out=session_file)
        self.assertIn("New, " + version, first)
        second = yield s_client_round(pair.second.port, self.pki.ca_cert,
                                      version, session_in=session_file)
        self.assertIn("Reused, " + version, second)
        self.assertEqual(pair.second.context.counters["resumed"], 1)

    def test_s_client_tls12_rsa_resumes_on_second_context(self):
        return self._s_client_resumes("TLSv1.2", "rsa")

    def test_s_client_tls12_p256_resumes_on_second_context(self):
        return self._s_client_resumes("TLSv1.2", "ec")

    def test_s_client_tls13_rsa_resumes_on_second_context(self):
        return self._s_client_resumes("TLSv1.3", "rsa")

    def test_s_client_tls13_p256_resumes_on_second_context(self):
        return self._s_client_resumes("TLSv1.3", "ec")

    @inlineCallbacks
    def test_answer_after_network_round_trip_resumes(self):
        """
        The lookup answer comes back over a TCP connection to another
        server on 127.0.0.1.
        """
        pair = SharingPair(self, self.pki.ec_chain, self.pki.ec_key)
        pair.second.lookup = NetworkLookup(self, pair.sessions).lookup
        first = yield deferToThread(
            python_client_round, pair.first.port, self.pki.ca_cert, "TLSv1.3")
        second = yield deferToThread(
            python_client_round, pair.second.port, self.pki.ca_cert,
            "TLSv1.3", first.session)
        self.assertTrue(second.reused)

    @inlineCallbacks
    def test_tls13_hello_retry_request_still_resumes(self):
        """
        A server that wants another key share makes the client send a second
        ClientHello; the answer given for the first one serves both.
        """
        pair = SharingPair(self, self.pki.ec_chain, self.pki.ec_key,
                           groups="P-256")
        first = yield deferToThread(
            python_client_round, pair.first.port, self.pki.ca_cert, "TLSv1.3")
        second = yield deferToThread(
            python_client_round, pair.second.port, self.pki.ca_cert,
            "TLSv1.3", first.session)
        self.assertTrue(second.reused)
        self.assertEqual(pair.second.context.counters["lookups"], 1)

    @inlineCallbacks
    def test_resumed_tls13_handshake_issues_a_new_session(self):
        pair = SharingPair(self, self.pki.ec_chain, self.pki.ec_key)
        first = yield deferToThread(
            python_client_round, pair.first.port, self.pki.ca_cert, "TLSv1.3")
        made_first = set(pair.sessions)
        yield deferToThread(python_client_round, pair.second.port,
                            self.pki.ca_cert, "TLSv1.3", first.session)
        made_second = set(pair.sessions) - made_first
        self.assertEqual(len(made_second), 1)
        (new_id,) = made_second
        self.assertEqual(sessionid.owner_of(new_id), pair.second.owner_tag)


class SessionTests(TestCase):
    """
    What the engine hands out and reads back.
    """

    def setUp(self):
        self.pki = pki()

    @inlineCallbacks
    def _made_session(self, version):
        pair = SharingPair(self, self.pki.rsa_chain, self.pki.rsa_key)
        yield deferToThread(python_client_round, pair.first.port,
                            self.pki.ca_cert, version)
        (session_id, der), = pair.sessions.items()
        return pair, session_id, der

    @inlineCallbacks
    def test_tls12_session_id_names_its_node(self):
        pair, session_id, _ = yield self._made_session("TLSv1.2")
        self.assertEqual(len(session_id), 32)
        self.assertEqual(sessionid.owner_of(session_id), pair.first.owner_tag)

    @inlineCallbacks
    def test_tls13_ticket_identity_names_its_node(self):
        pair, session_id, _ = yield self._made_session("TLSv1.3")
        self.assertEqual(len(session_id), 32)
        self.assertEqual(sessionid.owner_of(session_id), pair.first.owner_tag)

    @inlineCallbacks
    def test_session_fields_are_readable(self):
        pair, session_id, der = yield self._made_session("TLSv1.2")
        fields = tls.session_fields(der)
        self.assertEqual(fields.session_id, session_id)
        self.assertEqual(fields.protocol_version, tls.TLS_1_2)
        self.assertEqual(fields.cipher, "ECDHE-RSA-AES128-GCM-SHA256")
        self.assertEqual(len(fields.master_key), 48)
        self.assertEqual(fields.id_context, pair.first.context.services[0].id_context)

    @inlineCallbacks
    def test_session_key_never_in_repr(self):
        _, _, der = yield self._made_session("TLSv1.3")
        fields = tls.session_fields(der)
        self.assertNotIn(fields.master_key.hex(), repr(fields))
        self.assertNotIn(repr(fields.master_key), repr(fields))

    def test_garbage_is_not_a_session(self):
        self.assertRaises(ValueError, tls.session_fields, b"\x30\x03abc")


class RefusedSessionTests(TestCase):
    """
    A supplied answer that cannot be used gives a full handshake, counted.
    """

    def setUp(self):
        self.pki = pki()

    @inlineCallbacks
    def _full_handshake_with_answer(self, corrupt, counter, version="TLSv1.2"):
        pair = SharingPair(self, self.pki.ec_chain, self.pki.ec_key)
        first = yield deferToThread(
            python_client_round, pair.first.port, self.pki.ca_cert, version)
        for session_id in list(pair.sessions):
            pair.sessions[session_id] = corrupt(pair, session_id)
        second = yield deferToThread(
            python_client_round, pair.second.port, self.pki.ca_cert, version,
            first.session)
        self.assertFalse(second.reused)
        self.assertEqual(second.echo, b"hello")
        self.assertEqual(pair.second.context.counters[counter], 1)
        self.assertEqual(pair.second.context.counters["full"], 1)

    def test_unparsable_der_gives_full_handshake(self):
        return self._full_handshake_with_answer(
            lambda pair, key: os.urandom(100), "bad_der")

    def test_truncated_der_gives_full_handshake(self):
        return self._full_handshake_with_answer(
            lambda pair, key: pair.sessions[key][:-5], "bad_der")

    def test_no_answer_gives_full_handshake(self):
        return self._full_handshake_with_answer(
            lambda pair, key: None, "lookup_misses", "TLSv1.3")

    @inlineCallbacks
    def test_session_of_another_id_gives_full_handshake(self):
        pair = SharingPair(self, self.pki.ec_chain, self.pki.ec_key)
        mine = yield deferToThread(
            python_client_round, pair.first.port, self.pki.ca_cert, "TLSv1.2")
        (my_id,) = pair.sessions
        yield deferToThread(
            python_client_round, pair.first.port, self.pki.ca_cert, "TLSv1.2")
        (other_id,) = set(pair.sessions) - {my_id}
        pair.sessions[my_id] = pair.sessions[other_id]
        second = yield deferToThread(
            python_client_round, pair.second.port, self.pki.ca_cert,
            "TLSv1.2", mine.session)
        self.assertFalse(second.reused)
        self.assertEqual(pair.second.context.counters["wrong_session"], 1)

    @inlineCallbacks
    def test_other_session_id_context_gives_full_handshake(self):
        pair = SharingPair(self, self.pki.ec_chain, self.pki.ec_key,
                           second_service="another-service")
        first = yield deferToThread(
            python_client_round, pair.first.port, self.pki.ca_cert, "TLSv1.3")
        second = yield deferToThread(
            python_client_round, pair.second.port, self.pki.ca_cert,
            "TLSv1.3", first.session)
        self.assertFalse(second.reused)
        self.assertEqual(pair.second.context.counters["context_mismatch"], 1)

    @inlineCallbacks
    def test_failed_lookup_gives_full_handshake(self):
        pair = SharingPair(self, self.pki.ec_chain, self.pki.ec_key)

        def failing(request):
            return deferLater(reactor, 0.01, lambda: 1 / 0)

        pair.second.lookup = failing
        first = yield deferToThread(
            python_client_round, pair.first.port, self.pki.ca_cert, "TLSv1.2")
        second = yield deferToThread(
            python_client_round, pair.second.port, self.pki.ca_cert,
            "TLSv1.2", first.session)
        self.assertFalse(second.reused)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class ForbiddenCipherTests(TestCase):
    """
    A session whose cipher the resuming context does not allow (a reload
    took it out, or another node never had it) gives a full handshake,
    counted, whatever the client offers.
    """

    def setUp(self):
        self.pki = pki()

    @inlineCallbacks
    def _cipher_taken_out(self, version, cipher, **second_options):
        pair = SharingPair(self, self.pki.ec_chain, self.pki.ec_key,
                           second_options=second_options)
        made = yield deferToThread(
            python_client_round, pair.first.port, self.pki.ca_cert, version)
        (der,) = pair.sessions.values()
        self.assertEqual(tls.session_fields(der).cipher, cipher)
        again = yield deferToThread(
            python_client_round, pair.second.port, self.pki.ca_cert, version,
            made.session)
        self.assertFalse(again.reused)
        self.assertEqual(again.echo, b"hello")
        counters = pair.second.context.counters
        self.assertEqual(counters["cipher_not_allowed"], 1)
        self.assertEqual(counters["full"], 1)

    def test_tls12_session_of_a_cipher_taken_out_gives_full_handshake(self):
        return self._cipher_taken_out(
            "TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256",
            tls12_ciphers="ECDHE-ECDSA-AES256-GCM-SHA384")

    def test_tls13_session_of_a_suite_taken_out_gives_full_handshake(self):
        """
        The suite left has the session's hash, with which OpenSSL alone
        would resume it.
        """
        return self._cipher_taken_out(
            "TLSv1.3", "TLS_AES_128_GCM_SHA256",
            tls13_suites="TLS_CHACHA20_POLY1305_SHA256")


class BadInputTests(TestCase):
    """
    Hand-made ClientHellos end in a full handshake or a clean alert, counted,
    and the server goes on serving.
    """

    def setUp(self):
        self.pki = pki()
        self.server = TLSServer(self, self.pki.ec_chain, self.pki.ec_key,
                                owner="node1", sessions={})

    @inlineCallbacks
    def _answer_to(self, hello):
        records = yield deferToThread(read_records, self.server.port, hello)
        # Whatever happened, the next client is served.
        after = yield deferToThread(python_client_round, self.server.port,
                                    self.pki.ca_cert, "TLSv1.3")
        self.assertEqual(after.echo, b"hello")
        return records

    def assertAlert(self, records, description):
        self.assertTrue(records, "the server sent nothing")
        content_type, body = records[-1]
        self.assertEqual(content_type, 21)
        self.assertEqual(body[1], description)

    def assertServerHello(self, records):
        self.assertTrue(records, "the server sent nothing")
        content_type, body = records[0]
        self.assertEqual((content_type, body[0]), (22, 2))
        return body

    @inlineCallbacks
    def test_garbage_handshake_record_gets_alert(self):
        records = yield self._answer_to(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\xff")
        self.assertAlert(records, 50)  # decode_error
        self.assertTrue(any(name.startswith("failed:")
                            for name in self.server.context.counters))

    @inlineCallbacks
    def test_random_bytes_get_alert_or_close(self):
        records = yield self._answer_to(os.urandom(300))
        if records:
            self.assertEqual(records[-1][0], 21)

    @inlineCallbacks
    def test_truncated_psk_extension_gives_full_handshake(self):
        """
        A PSK extension cut short is not looked up; OpenSSL, which finds no
        session for it, ignores it.
        """
        good = psk_extension([sessionid.new_session_id(self.server.owner_tag)])
        records = yield self._answer_to(client_hello(tls13=True, psk=good[:-9]))
        self.assertServerHello(records)
        self.assertEqual(self.server.context.counters["malformed_psk"], 1)
        self.assertEqual(self.server.context.counters["lookups"], 0)

    @inlineCallbacks
    def test_garbage_psk_extension_gets_alert(self):
        records = yield self._answer_to(
            client_hello(tls13=True, psk=os.urandom(40)))
        self.assertAlert(records, 50)
        self.assertEqual(self.server.context.counters["malformed_psk"], 1)

    @inlineCallbacks
    def test_psk_identity_of_wrong_length_gives_full_handshake(self):
        for length in (0, 1, 16, 31, 33, 255):
            self.server.context.counters.clear()
            records = yield self._answer_to(client_hello(
                tls13=True, psk=psk_extension([b"\x01" * length])))
            self.assertEqual(self.server.context.counters["lookups"], 0)
            if length == 0:
                # An empty identity is a decoding error in its own right.
                self.assertAlert(records, 50)
                self.assertEqual(self.server.context.counters["malformed_psk"], 1)
                continue
            self.assertServerHello(records)
            self.assertEqual(self.server.context.counters["foreign_session_id"], 1)

    @inlineCallbacks
    def test_unknown_psk_identity_gives_full_handshake(self):
        unknown = sessionid.new_session_id(sessionid.owner_tag("c", "elsewhere"))
        records = yield self._answer_to(client_hello(
            tls13=True, psk=psk_extension([unknown])))
        self.assertServerHello(records)
        self.assertEqual(self.server.context.counters["lookups"], 1)
        self.assertEqual(self.server.context.counters["lookup_misses"], 1)

    @inlineCallbacks
    def test_tls12_session_id_of_wrong_length_gives_full_handshake(self):
        for length in (1, 16, 31):
            self.server.context.counters.clear()
            records = yield self._answer_to(
                client_hello(tls13=False, session_id=b"\x01" * length))
            body = self.assertServerHello(records)
            self.assertEqual(self.server.context.counters["foreign_session_id"], 1)
            new_id = _server_hello_session_id(body)
            self.assertEqual(sessionid.owner_of(new_id), self.server.owner_tag)

    @inlineCallbacks
    def test_tls12_session_id_longer_than_32_bytes_gets_alert(self):
        records = yield self._answer_to(
            client_hello(tls13=False, session_id=b"\x01" * 33))
        self.assertAlert(records, 50)

    @inlineCallbacks
    def test_tls10_client_gets_protocol_version_alert(self):
        records = yield self._answer_to(client_hello(tls13=False, legacy_version=0x0301))
        self.assertAlert(records, 70)  # protocol_version
        self.assertEqual(
            self.server.context.counters["failed:unsupported protocol"], 1)

    @inlineCallbacks
    def test_flood_while_paused_is_cut_off(self):
        """
        A client that keeps sending while its handshake waits for a
        session is dropped once it has sent more than a ClientHello's worth,
        without waiting for the lookup.
        """
        self.server.lookup = lambda request: Deferred()
        known = sessionid.new_session_id(self.server.owner_tag)
        hello = client_hello(tls13=True, psk=psk_extension([known]))
        records = yield self._answer_to(hello + b"\x17\x03\x03" * 40000)
        self.assertEqual(
            self.server.context.counters["failed:too much input while paused"], 1)
        # No ServerHello: the handshake never went on.
        self.assertNotIn(22, [kind for kind, _ in records])

    @inlineCallbacks
    def test_client_gone_while_paused_leaks_nothing(self):
        """
        The client offers a session and hangs up while the lookup is in
        flight: the lookup is cancelled, and the connection is freed.
        """
        looked_up = Deferred()
        connections = []
        original = tls.ServerContext.serverConnectionForTLS

        def tracked(context, protocol):
            connection = original(context, protocol)
            connections.append(weakref.ref(connection))
            return connection

        self.patch(tls.ServerContext, "serverConnectionForTLS", tracked)
        self.server = TLSServer(self, self.pki.ec_chain, self.pki.ec_key,
                                owner="node1", sessions={})
        self.server.lookup = lambda request: looked_up
        known = sessionid.new_session_id(self.server.owner_tag)
        yield deferToThread(read_records, self.server.port,
                            client_hello(tls13=True, psk=psk_extension([known])),
                            0.2)
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(looked_up.called, "the pending lookup was not cancelled")
        gc.collect()
        self.assertEqual([ref() for ref in connections], [None])


class ContextConfigurationTests(TestCase):
    """
    A context that cannot be built says which file or setting, and why.
    """

    def setUp(self):
        self.pki = pki()

    def _error(self, chain, key, **kwargs):
        service = tls.VirtualService("web", chain, key, b"ctx")
        error = self.assertRaises(tls.TLSConfigurationError, tls.ServerContext,
                                  [service], b"12345678", **kwargs)
        return str(error)

    def test_missing_certificate_file_is_named(self):
        message = self._error("/nonexistent/chain.pem", self.pki.ec_key)
        self.assertIn("/nonexistent/chain.pem", message)
        self.assertIn("no such file", message)

    def test_garbage_certificate_file_is_named(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate\n")
        message = self._error(path, self.pki.ec_key)
        self.assertIn(path, message)

    def test_garbage_key_file_is_named(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        message = self._error(self.pki.ec_chain, path)
        self.assertIn(path, message)

    def test_key_of_another_certificate_is_refused(self):
        message = self._error(self.pki.ec_chain, self.pki.rsa_key)
        self.assertIn(self.pki.rsa_key, message)
        self.assertIn("does not match", message)

    def test_tls_10_cannot_be_enabled(self):
        message = self._error(self.pki.ec_chain, self.pki.ec_key,
                              minimum_version="1.0")
        self.assertIn("'1.0' is not supported", message)

    def test_server_name_of_two_services_is_refused(self):
        services = [
            tls.VirtualService("a", self.pki.ec_chain, self.pki.ec_key, b"a",
                               ("localhost",)),
            tls.VirtualService("b", self.pki.ec_chain, self.pki.ec_key, b"b",
                               ("LOCALHOST",)),
        ]
        error = self.assertRaises(tls.TLSConfigurationError, tls.ServerContext,
                                  services, b"12345678")
        self.assertIn("'localhost' belongs to two services", str(error))


class ServerNameAndALPNTests(TestCase):
    """
    SNI picks the certificate and the session id context; ALPN follows the
    server's preference, and a client that offers none of the server's
    protocols gets the no_application_protocol alert (RFC 7301, 3.2), on a
    full and on a resumed handshake, unless the server is told to ignore it.
    """

    def setUp(self):
        self.pki = pki()

    def _server(self, **kwargs):
        services = [
            tls.VirtualService(
                "web", self.pki.ec_chain, self.pki.ec_key,
                sessionid.service_id_context("c", "web"), ("localhost",)),
            tls.VirtualService(
                "other", self.pki.other_chain, self.pki.other_key,
                sessionid.service_id_context("c", "other"), ("other.test",)),
        ]
        return TLSServer(self, services=services, owner="node1",
                         sessions={}, **kwargs)

    @inlineCallbacks
    def test_server_name_selects_certificate(self):
        server = self._server()
        result = yield deferToThread(
            python_client_round, server.port, self.pki.ca_cert, "TLSv1.3",
            server_hostname="other.test")
        self.assertEqual(result.peer_names, ["other.test"])
        result = yield deferToThread(
            python_client_round, server.port, self.pki.ca_cert, "TLSv1.3")
        self.assertIn("localhost", result.peer_names)

    @inlineCallbacks
    def test_session_does_not_cross_services(self):
        server = self._server()
        first = yield deferToThread(
            python_client_round, server.port, self.pki.ca_cert, "TLSv1.2",
            verify=False)
        # The same client offers the localhost session to other.test.
        second = yield deferToThread(
            python_client_round, server.port, self.pki.ca_cert, "TLSv1.2",
            first.session, server_hostname="other.test", verify=False)
        self.assertFalse(second.reused)
        self.assertEqual(server.context.counters["context_mismatch"], 1)

    @inlineCallbacks
    def test_alpn_follows_server_preference(self):
        server = self._server(alpn=(b"h2", b"http/1.1"))
        result = yield deferToThread(
            python_client_round, server.port, self.pki.ca_cert, "TLSv1.3",
            alpn=["http/1.1", "h2"])
        self.assertEqual(result.alpn, "h2")

    @inlineCallbacks
    def _ends_in_alert(self, offered, counters):
        """
        The client of C{offered} got the no_application_protocol alert, and
        the server, whose counters are C{counters}, finished no handshake.
        """
        error = yield self.assertFailure(offered, ssl.SSLError)
        self.assertIn("alert no application protocol", str(error))
        self.assertEqual(counters["failed:no application protocol"], 1)
        self.assertEqual(counters["full"] + counters["resumed"], 0)

    def _no_overlap_is_refused(self, version):
        server = self._server(alpn=(b"h2", b"http/1.1"))
        return self._ends_in_alert(deferToThread(
            python_client_round, server.port, self.pki.ca_cert, version,
            alpn=["spdy/1"]), server.context.counters)

    def test_tls12_alpn_without_overlap_gets_alert(self):
        return self._no_overlap_is_refused("TLSv1.2")

    def test_tls13_alpn_without_overlap_gets_alert(self):
        return self._no_overlap_is_refused("TLSv1.3")

    @inlineCallbacks
    def test_s_client_alpn_without_overlap_gets_alert_full_and_resumed(self):
        """
        Prints its figures: the alert each handshake ended with, and the
        server's counts.
        """
        pair = self._h2_then_http11()
        session_file = self.mktemp()
        made = yield s_client_round(pair.first.port, self.pki.ca_cert,
                                    "TLSv1.3", session_out=session_file,
                                    alpn=["h2"])
        self.assertIn("ALPN protocol: h2", made)
        full = yield s_client_round(pair.second.port, self.pki.ca_cert,
                                    "TLSv1.3", alpn=["h2"])
        resumed = yield s_client_round(pair.second.port, self.pki.ca_cert,
                                       "TLSv1.3", session_in=session_file,
                                       alpn=["h2"])
        alerts = [re.search(r"SSL alert number (\d+)", output)
                  for output in (full, resumed)]
        self.assertEqual([alert and alert.group(1) for alert in alerts],
                         ["120", "120"])
        counters = pair.second.context.counters
        self.assertEqual(counters["lookups"], 1)
        self.assertEqual(counters["failed:no application protocol"], 2)
        self.assertEqual(counters["full"] + counters["resumed"], 0)
        print("\nALPN without overlap (s_client -alpn h2, server http/1.1): "
              f"full handshake: alert {alerts[0].group(1)}, resumed "
              f"handshake: alert {alerts[1].group(1)}; server counted "
              f"lookups {counters['lookups']}, failed:no application "
              f"protocol {counters['failed:no application protocol']}, "
              f"completed {counters['full'] + counters['resumed']}")

    def _h2_then_http11(self, **second_options):
        """
        A session made where the client's protocol (h2) is spoken can be
        offered where it is not.
        """
        return SharingPair(self, self.pki.ec_chain, self.pki.ec_key,
                           alpn=(b"h2",), second_options={
                               "alpn": (b"http/1.1",), **second_options})

    @inlineCallbacks
    def _resumed_without_overlap(self, version, **second_options):
        pair = self._h2_then_http11(**second_options)
        made = yield deferToThread(python_client_round, pair.first.port,
                                   self.pki.ca_cert, version, alpn=["h2"])
        self.assertEqual(made.alpn, "h2")
        offered = deferToThread(python_client_round, pair.second.port,
                                self.pki.ca_cert, version, made.session,
                                alpn=["h2"])
        return pair.second, offered

    @inlineCallbacks
    def _resumed_no_overlap_is_refused(self, version):
        second, offered = yield self._resumed_without_overlap(version)
        yield self._ends_in_alert(offered, second.context.counters)
        self.assertEqual(second.context.counters["lookups"], 1)

    def test_tls12_resumed_alpn_without_overlap_gets_alert(self):
        return self._resumed_no_overlap_is_refused("TLSv1.2")

    def test_tls13_resumed_alpn_without_overlap_gets_alert(self):
        return self._resumed_no_overlap_is_refused("TLSv1.3")

    @inlineCallbacks
    def test_alpn_mismatch_ignored_when_configured_so(self):
        second, offered = yield self._resumed_without_overlap(
            "TLSv1.3", alpn_mismatch="ignore")
        result = yield offered
        self.assertTrue(result.reused)
        self.assertIsNone(result.alpn)
        self.assertEqual(result.echo, b"hello")

    def test_unknown_alpn_mismatch_action_is_refused(self):
        service = tls.VirtualService("web", self.pki.ec_chain,
                                     self.pki.ec_key, b"ctx")
        error = self.assertRaises(tls.TLSConfigurationError, tls.ServerContext,
                                  [service], b"12345678", alpn=(b"h2",),
                                  alpn_mismatch="drop")
        self.assertIn("'drop' is not one of 'alert', 'ignore'", str(error))


def _server_hello_session_id(body: bytes) -> bytes:
    # handshake header (4) + legacy_version (2) + random (32), then the id.
    length = body[38]
    return body[39:39 + length]


_FREE_UNDER_THE_FFI_LOCK = """
from sslshare import _openssl

class Owner:
    pass

owner = Owner()
connection = _openssl.NativeConnection(_openssl.NativeContext(), owner)
# What a garbage collection in the middle of ffi.new's parsing of a type
# does: the connection's finalizer runs while the FFI's lock is held.
with _openssl.ffi._lock:
    del connection
print("freed")
"""


class FinalizerTests(TestCase):
    """
    Found hung in the demo: a node's reactor blocked for good in a
    connection's finalizer.
    """

    @inlineCallbacks
    def test_connection_freed_while_the_ffi_is_parsing_a_type(self):
        # In a process of its own: the failure is a deadlock.
        result = yield deferToThread(
            subprocess.run, [sys.executable, "-c", _FREE_UNDER_THE_FFI_LOCK],
            capture_output=True, timeout=60)
        self.assertEqual((result.returncode, result.stdout), (0, b"freed\n"),
                         result.stderr.decode())
