"""
Property tests for what the engine parses from the network before OpenSSL
does: session ids, and the server_name, supported_versions and
pre_shared_key extensions of a ClientHello; and the sealed state blobs a
peer or the repository hands back.  Any bytes end in a value or in the
parser's own error, never in anything else.  (The state codec's own
properties are in test_state.)
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sslshare import sessionid, tls
from sslshare.state import SealError, StateKeys
from tests.support.sessions import session_state, session_states
from tests.support.wire import psk_extension
from tests.test_state import properties


class SessionIdTests(SynchronousTestCase):
    @given(st.binary(max_size=64))
    def test_owner_of_any_bytes_is_a_tag_or_value_error(self, candidate):
        try:
            tag = sessionid.owner_of(candidate)
        except ValueError:
            self.assertFalse(sessionid.is_session_id(candidate))
        else:
            self.assertTrue(sessionid.is_session_id(candidate))
            self.assertEqual(len(tag), sessionid.OWNER_TAG_LENGTH)

    @given(st.binary(min_size=8, max_size=8))
    def test_new_id_names_its_owner(self, tag):
        session_id = sessionid.new_session_id(tag)
        self.assertEqual(len(session_id), sessionid.SESSION_ID_LENGTH)
        self.assertEqual(sessionid.owner_of(session_id), tag)

    @given(st.binary().filter(lambda tag: len(tag) != 8))
    def test_tag_of_wrong_length_is_refused(self, tag):
        self.assertRaises(ValueError, sessionid.new_session_id, tag)


class ExtensionParserTests(SynchronousTestCase):
    @given(st.binary(max_size=300))
    def test_psk_of_any_bytes_is_identities_or_malformed(self, body):
        try:
            identities = tls._psk_identities(body)
        except tls.MalformedExtension:
            return
        self.assertTrue(identities)
        self.assertTrue(all(identities))

    @given(st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=5))
    def test_psk_identities_round_trip(self, identities):
        self.assertEqual(tls._psk_identities(psk_extension(identities)),
                         identities)

    @given(st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=5),
           st.integers(min_value=1, max_value=40))
    def test_psk_cut_anywhere_is_malformed(self, identities, cut):
        body = psk_extension(identities)
        self.assertRaises(tls.MalformedExtension, tls._psk_identities,
                          body[:max(0, len(body) - cut)])

    @given(st.binary(max_size=300))
    def test_server_name_of_any_bytes_is_a_name_none_or_malformed(self, body):
        try:
            name = tls._server_name(body)
        except tls.MalformedExtension:
            return
        self.assertTrue(name is None or name == name.lower())

    @given(st.from_regex(r"[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){0,3}",
                         fullmatch=True))
    def test_server_name_round_trip(self, name):
        entry = b"\0" + struct.pack("!H", len(name)) + name.encode()
        body = struct.pack("!H", len(entry)) + entry
        self.assertEqual(tls._server_name(body), name)

    @given(st.binary(max_size=40))
    def test_supported_versions_of_any_bytes_is_a_list_or_malformed(self, body):
        try:
            versions = tls._supported_versions(body)
        except tls.MalformedExtension:
            return
        self.assertEqual(len(versions) * 2 + 1, len(body))

_first_key, _second_key = StateKeys.generate(), StateKeys.generate()
_keys = StateKeys([_first_key, _second_key])
_context = sessionid.service_id_context("test", "web")


class SessionIdLayoutTests(SynchronousTestCase):
    @properties
    @given(st.binary(max_size=64))
    def test_describe_any_bytes_is_a_short_text(self, candidate):
        described = sessionid.describe(candidate)
        self.assertLessEqual(len(described), 13)
        self.assertTrue(candidate.hex().startswith(described.rstrip("…")))

    @properties
    @given(st.text(max_size=80), st.text(max_size=80))
    def test_any_service_gets_a_context_of_32_bytes(self, cluster, service):
        self.assertEqual(len(sessionid.service_id_context(cluster, service)),
                         sessionid.ID_CONTEXT_LENGTH)


class SealedBlobTests(SynchronousTestCase):
    """
    What a peer or the repository may hand back as a sealed state: any
    bytes open to the state of that session or fail with L{SealError}.
    """

    @properties
    @given(st.binary(max_size=600), st.binary(min_size=32, max_size=32))
    def test_any_bytes_open_to_a_state_or_seal_error(self, blob, session_id):
        try:
            opened = _keys.open(blob, session_id, _context)
        except SealError:
            return
        self.assertEqual(opened.session_id, session_id)

    @properties
    @given(session_states)
    def test_any_state_opens_as_sealed_under_any_key_of_the_file(self, state):
        blob = _keys.seal(state)
        rotated = StateKeys([_second_key, _first_key])
        for keys in (_keys, rotated):
            self.assertEqual(
                keys.open(blob, state.session_id, state.id_context), state)

    @properties
    @given(st.binary(min_size=1, max_size=200))
    def test_another_key_never_opens_it(self, der):
        state = session_state(der=der)
        stranger = StateKeys([StateKeys.generate()])
        self.assertRaises(SealError, stranger.open, _keys.seal(state),
                          state.session_id, state.id_context)
