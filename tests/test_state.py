"""
L{sslshare.state}: the strict codec of a session state, its sealing under
the cluster state keys, and the key file.  Properties are checked with
Hypothesis over any valid state and any bytes.
"""

from __future__ import annotations

import os
import struct

import attrs
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from sslshare import sessionid, state
from sslshare.state import (
    SealError,
    SessionState,
    StateFormatError,
    StateKeyError,
    StateKeys,
)
from tests.support.sessions import session_ids, session_state, session_states

# No example database in the trial directory, and no deadline nor check
# of how fast examples are made: the machine is shared (trial -j, other
# runs), and a slow example is not a failure.
properties = settings(database=None, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])



def _field_offsets(encoded: bytes) -> dict[str, int]:
    """
    Where each field of an encoding starts, read from its length fields.
    """
    offsets = {"format": 0, "session id": 1, "context length": 33}
    offsets["holder length"] = 34 + encoded[33]
    holder_length = struct.unpack("!H", encoded[offsets["holder length"]:][:2])[0]
    offsets["times"] = offsets["holder length"] + 2 + holder_length
    offsets["moves"] = offsets["times"] + 24
    offsets["digest length"] = offsets["moves"] + 4
    offsets["der length"] = offsets["digest length"] + 1 \
        + encoded[offsets["digest length"]]
    return offsets


class CodecTests(TestCase):
    """
    The binary encoding of a L{SessionState}.
    """

    def test_encoding_follows_documented_layout(self):
        s = session_state(holder="nöde", created=1.5, expires=2.5, seq=7,
                          digest=b"\xdd" * 32, der=b"\xee" * 135, moves=9)
        encoded = s.encode()
        self.assertEqual(encoded[0], 2)
        self.assertEqual(encoded[1:33], s.session_id)
        self.assertEqual(encoded[33], 32)
        self.assertEqual(encoded[34:66], s.id_context)
        self.assertEqual(encoded[66:68], b"\x00\x05")
        self.assertEqual(encoded[68:73], "nöde".encode())
        self.assertEqual(struct.unpack("!ddQI", encoded[73:101]),
                         (1.5, 2.5, 7, 9))
        self.assertEqual(encoded[101], 32)
        self.assertEqual(encoded[102:134], b"\xdd" * 32)
        self.assertEqual(encoded[134:136], b"\x00\x87")
        self.assertEqual(encoded[136:], b"\xee" * 135)

    def test_decode_of_encode_is_the_same_state(self):
        s = session_state(seq=3, digest=os.urandom(32))
        self.assertEqual(SessionState.decode(s.encode()), s)

    def test_decode_accepts_a_memoryview(self):
        s = session_state()
        self.assertEqual(SessionState.decode(memoryview(s.encode())), s)

    def _assert_refused(self, data, *words):
        e = self.assertRaises(StateFormatError, SessionState.decode, data)
        for word in words:
            self.assertIn(word, str(e))

    def test_empty_bytes_are_refused(self):
        self._assert_refused(b"", "truncated", "format")

    def test_unknown_format_is_refused(self):
        self._assert_refused(b"\x01" + session_state().encode()[1:],
                             "unknown state format 1")

    def test_every_truncation_is_refused(self):
        encoded = session_state(digest=b"\x01" * 32).encode()
        for length in range(len(encoded)):
            self.assertRaises(StateFormatError, SessionState.decode,
                              encoded[:length])

    def test_truncated_der_names_the_field(self):
        self._assert_refused(session_state().encode()[:-1],
                             "truncated at DER", "135 bytes needed, 134 left")

    def test_trailing_bytes_are_refused(self):
        self._assert_refused(session_state().encode() + b"\0",
                             "1 bytes after the end")

    def test_foreign_session_id_is_refused(self):
        encoded = bytearray(session_state().encode())
        encoded[1] = 0x7f
        self._assert_refused(bytes(encoded), "not an sslshare session id")

    def test_empty_context_is_refused(self):
        encoded = bytearray(session_state().encode())
        encoded[33] = 0
        self._assert_refused(bytes(encoded),
                             "session id context length must be 1 to 32, not 0")

    def test_context_over_32_bytes_is_refused(self):
        encoded = bytearray(session_state().encode())
        encoded[33] = 33
        self._assert_refused(bytes(encoded), "not 33")

    def test_holder_not_utf8_is_refused(self):
        encoded = bytearray(session_state(holder="abc").encode())
        at = _field_offsets(encoded)["holder length"] + 2
        encoded[at] = 0xff
        self._assert_refused(bytes(encoded), "holder is not UTF-8")

    def test_holder_with_control_character_is_refused(self):
        encoded = bytearray(session_state(holder="abc").encode())
        at = _field_offsets(encoded)["holder length"] + 2
        encoded[at] = ord("\n")
        self._assert_refused(bytes(encoded), "unprintable")

    def test_holder_over_256_bytes_is_refused(self):
        encoded = bytearray(session_state().encode())
        at = _field_offsets(encoded)["holder length"]
        encoded[at:at + 2] = struct.pack("!H", 257)
        self._assert_refused(bytes(encoded), "holder length must be 1 to 256")

    def test_nan_time_is_refused(self):
        encoded = bytearray(session_state().encode())
        at = _field_offsets(encoded)["times"]
        encoded[at:at + 8] = struct.pack("!d", float("nan"))
        self._assert_refused(bytes(encoded), "finite")

    def test_expiry_before_creation_is_refused(self):
        encoded = bytearray(session_state(created=5, expires=5).encode())
        at = _field_offsets(encoded)["times"] + 8
        encoded[at:at + 8] = struct.pack("!d", 4.0)
        self._assert_refused(bytes(encoded), "expires is before created")

    def test_digest_length_other_than_0_or_32_is_refused(self):
        encoded = bytearray(session_state().encode())
        encoded[_field_offsets(encoded)["digest length"]] = 16
        self._assert_refused(bytes(encoded), "digest length must be 0 or 32")

    def test_der_over_limit_is_refused(self):
        encoded = bytearray(session_state().encode())
        at = _field_offsets(encoded)["der length"]
        encoded[at:at + 2] = struct.pack("!H", state.MAX_DER_LENGTH + 1)
        self._assert_refused(bytes(encoded), "DER length must be 1 to")

    def test_refusal_never_quotes_the_der(self):
        der = b"SECRET" * 10
        encoded = session_state(der=der).encode()
        e = self.assertRaises(StateFormatError, SessionState.decode,
                              encoded + b"x")
        self.assertNotIn("SECRET", str(e))

    @properties
    @given(session_states)
    def test_any_valid_state_round_trips(self, s):
        encoded = s.encode()
        self.assertLessEqual(len(encoded), state.MAX_ENCODED_LENGTH)
        self.assertEqual(SessionState.decode(encoded), s)

    @properties
    @given(st.binary(max_size=400))
    def test_arbitrary_bytes_decode_to_a_state_or_raise_format_error(self, data):
        try:
            decoded = SessionState.decode(data)
        except StateFormatError:
            return
        # The encoding is canonical: what decodes re-encodes to the same bytes.
        self.assertEqual(decoded.encode(), data)

    @properties
    @given(session_states, st.data())
    def test_mutated_encodings_decode_to_a_state_or_raise_format_error(
            self, s, data):
        encoded = bytearray(s.encode())
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(encoded) - 1))
            encoded[at] = data.draw(st.integers(0, 255))
        encoded = encoded[:data.draw(st.integers(0, len(encoded)))] \
            + data.draw(st.binary(max_size=4))
        try:
            decoded = SessionState.decode(bytes(encoded))
        except StateFormatError:
            return
        self.assertEqual(decoded.encode(), bytes(encoded))


class SessionStateTests(TestCase):
    """
    Construction, secrecy and the helpers of L{SessionState}.
    """

    def test_repr_never_shows_the_der(self):
        s = session_state(der=b"SECRET-DER")
        self.assertNotIn("SECRET", repr(s))
        self.assertNotIn(repr(b"SECRET-DER"), repr(s))

    def test_states_with_different_der_differ(self):
        s = session_state()
        self.assertNotEqual(s, attrs.evolve(s, der=s.der + b"x"))

    def test_equal_states_hash_alike(self):
        s = session_state()
        self.assertEqual(hash(s), hash(SessionState.decode(s.encode())))

    def test_integer_times_become_floats(self):
        s = session_state(created=1, expires=2)
        self.assertIs(type(s.created), float)
        self.assertIs(type(s.expires), float)

    def test_short_session_id_is_refused(self):
        e = self.assertRaises(ValueError, session_state, session_id=b"\x01" * 31)
        self.assertIn("31 bytes", str(e))

    def test_der_that_is_not_bytes_is_refused(self):
        e = self.assertRaises(ValueError, session_state, der=bytearray(b"x"))
        self.assertIn("der must be bytes, not bytearray", str(e))

    def test_holder_over_64_characters_is_refused(self):
        e = self.assertRaises(ValueError, session_state, holder="n" * 65)
        self.assertIn("1 to 64 characters", str(e))

    def test_negative_seq_is_refused(self):
        self.assertRaises(ValueError, session_state, seq=-1)

    def test_boolean_time_is_refused(self):
        self.assertRaises(TypeError, session_state, created=True)

    def test_with_holder_changes_the_holder_and_counts_the_move(self):
        s = session_state(seq=4, digest=b"\x02" * 32, moves=2)
        moved = s.with_holder("node2")
        self.assertEqual((moved.holder, moved.moves), ("node2", 3))
        self.assertEqual(attrs.evolve(moved, holder="node1", moves=2), s)

    def test_with_holder_of_the_same_holder_is_no_move(self):
        s = session_state(moves=2)
        self.assertIs(s.with_holder(s.holder), s)

    def test_moves_past_32_bits_are_refused(self):
        self.assertRaises(ValueError, session_state, moves=2 ** 32)

    def test_with_holder_refuses_an_invalid_holder(self):
        self.assertRaises(ValueError, session_state().with_holder, "")

    def test_with_checkpoint_takes_a_newer_one(self):
        s = session_state(seq=4, digest=b"\x02" * 32)
        newer = s.with_checkpoint(6, b"\x03" * 32)
        self.assertEqual((newer.seq, newer.digest), (6, b"\x03" * 32))
        self.assertEqual(attrs.evolve(newer, seq=4, digest=b"\x02" * 32), s)

    def test_with_checkpoint_keeps_its_own_over_an_older_one(self):
        s = session_state(seq=4, digest=b"\x02" * 32)
        self.assertIs(s.with_checkpoint(4, b"\x03" * 32), s)
        self.assertIs(s.with_checkpoint(0, b""), s)

    def test_with_checkpoint_refuses_one_without_a_digest(self):
        s = session_state()
        self.assertRaises(ValueError, s.with_checkpoint, 3, b"")
        self.assertRaises(ValueError, s.with_checkpoint, 3, b"\x02" * 31)
        self.assertRaises(ValueError, s.with_checkpoint, 3.0, b"\x02" * 32)

    def test_not_expired_before_expires(self):
        self.assertFalse(session_state(expires=100).expired(99.999))

    def test_expired_at_expires(self):
        self.assertTrue(session_state(expires=100).expired(100))


class SealingTests(TestCase):
    """
    L{StateKeys.seal} and L{StateKeys.open}.
    """

    def setUp(self):
        self.key = StateKeys.generate()
        self.keys = StateKeys([self.key])
        self.state = session_state()

    def _open(self, blob, keys=None, session_id=None, id_context=None):
        return (keys or self.keys).open(
            blob, session_id or self.state.session_id,
            id_context or self.state.id_context)

    def test_generated_keys_are_32_random_bytes(self):
        self.assertEqual(len(self.key), 32)
        self.assertNotEqual(self.key, StateKeys.generate())

    def test_sealed_state_opens_to_the_same_state(self):
        self.assertEqual(self._open(self.keys.seal(self.state)), self.state)

    def test_blob_layout_is_format_key_id_nonce_ciphertext(self):
        blob = self.keys.seal(self.state)
        self.assertEqual(blob[0], 1)
        self.assertEqual(blob[1:5], state.key_id(self.key))
        self.assertEqual(len(blob), 1 + 4 + 12 + len(self.state.encode()) + 16)

    def test_key_id_is_sha256_prefix(self):
        import hashlib
        self.assertEqual(state.key_id(self.key),
                         hashlib.sha256(self.key).digest()[:4])

    def test_each_seal_uses_a_fresh_nonce(self):
        first, second = self.keys.seal(self.state), self.keys.seal(self.state)
        self.assertNotEqual(first[5:17], second[5:17])

    def test_blob_does_not_contain_the_der(self):
        s = session_state(der=b"SECRET-DER" * 10)
        self.assertNotIn(b"SECRET-DER", self.keys.seal(s))

    def test_largest_state_fits_the_channel_bound(self):
        s = session_state(holder="\U0001f600" * 64, digest=b"\x01" * 32,
                          der=b"\x02" * state.MAX_DER_LENGTH,
                          id_context=b"\x03" * 32)
        blob = self.keys.seal(s)
        self.assertEqual(len(s.encode()), state.MAX_ENCODED_LENGTH)
        self.assertLessEqual(len(blob), state.MAX_SEALED_LENGTH)
        self.assertEqual(self.keys.open(blob, s.session_id, s.id_context), s)

    def _assert_seal_error(self, words, blob, **kwargs):
        e = self.assertRaises(SealError, self._open, blob, **kwargs)
        self.assertIn(sessionid.describe(self.state.session_id), str(e))
        self.assertIn(words, str(e))

    def test_open_with_another_session_id_fails(self):
        other = session_state().session_id
        e = self.assertRaises(SealError, self._open, self.keys.seal(self.state),
                              session_id=other)
        self.assertIn("authentication failed", str(e))
        self.assertIn(sessionid.describe(other), str(e))

    def test_open_with_another_context_fails(self):
        self._assert_seal_error("authentication failed",
                                self.keys.seal(self.state),
                                id_context=b"\x09" * 32)

    def test_open_with_another_key_fails(self):
        other = StateKeys([StateKeys.generate()])
        self._assert_seal_error("unknown key id", self.keys.seal(self.state),
                                keys=other)

    def test_short_blob_fails(self):
        self._assert_seal_error("too short (32 bytes)", b"\x01" * 32)

    def test_long_blob_fails(self):
        self._assert_seal_error(
            "too long", b"\x01" * (state.MAX_SEALED_LENGTH + 1))

    def test_unknown_format_fails(self):
        blob = self.keys.seal(self.state)
        self._assert_seal_error("unknown seal format 2", b"\x02" + blob[1:])

    def test_authenticated_garbage_fails(self):
        nonce = os.urandom(12)
        aad = (b"sslshare state v1\0" + self.state.session_id
               + self.state.id_context)
        blob = (b"\x01" + state.key_id(self.key) + nonce
                + AESGCM(self.key).encrypt(nonce, b"not a state", aad))
        self._assert_seal_error("bad state inside", blob)

    def test_state_of_another_session_under_this_sessions_aad_fails(self):
        # Only a node holding the key could make this blob: the check after
        # authentication catches a node that sealed under the wrong data.
        other = session_state()
        nonce = os.urandom(12)
        aad = (b"sslshare state v1\0" + self.state.session_id
               + self.state.id_context)
        blob = (b"\x01" + state.key_id(self.key) + nonce
                + AESGCM(self.key).encrypt(nonce, other.encode(), aad))
        self._assert_seal_error("another session's state", blob)

    def test_rotated_keys_seal_with_the_first_and_open_with_any(self):
        new = StateKeys.generate()
        rotated = StateKeys([new, self.key])
        old_blob = self.keys.seal(self.state)
        new_blob = rotated.seal(self.state)
        self.assertEqual(new_blob[1:5], state.key_id(new))
        self.assertEqual(self._open(old_blob, keys=rotated), self.state)
        self.assertEqual(self._open(new_blob, keys=rotated), self.state)
        self.assertEqual(rotated.key_ids,
                         (state.key_id(new), state.key_id(self.key)))

    def test_repr_shows_key_ids_not_keys(self):
        text = repr(self.keys)
        self.assertIn(state.key_id(self.key).hex(), text)
        self.assertNotIn(self.key.hex(), text)

    def test_no_keys_are_refused(self):
        self.assertRaises(ValueError, StateKeys, [])

    def test_short_key_is_refused(self):
        e = self.assertRaises(ValueError, StateKeys, [self.key, b"k" * 16])
        self.assertIn("state key 2 is not 32 bytes", str(e))

    def test_same_key_twice_is_refused(self):
        e = self.assertRaises(ValueError, StateKeys, [self.key, self.key])
        self.assertIn("key id of an earlier key", str(e))

    @properties
    @given(session_states, st.data())
    def test_any_tampered_blob_fails_to_open(self, s, data):
        blob = bytearray(self.keys.seal(s))
        how = data.draw(st.sampled_from(
            ["flip", "truncate", "extend", "session id", "context"]))
        session_id, id_context = s.session_id, s.id_context
        if how == "flip":
            at = data.draw(st.integers(0, len(blob) - 1))
            blob[at] ^= data.draw(st.integers(1, 255))
        elif how == "truncate":
            blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
        elif how == "extend":
            blob += data.draw(st.binary(min_size=1, max_size=32))
        elif how == "session id":
            session_id = data.draw(session_ids.filter(lambda i: i != s.session_id))
        else:
            id_context = data.draw(st.binary(min_size=1, max_size=32)
                                   .filter(lambda c: c != s.id_context))
        self.assertRaises(SealError, self.keys.open, bytes(blob), session_id,
                          id_context)


class KeyFileTests(TestCase):
    """
    L{StateKeys.from_file}: what a key file may hold, and errors that name
    the file and the reason without quoting a key.
    """

    def _write(self, text, mode="w"):
        path = self.mktemp()
        with open(path, mode) as f:
            f.write(text)
        return path

    def test_keys_are_read_in_order_skipping_blank_lines_and_comments(self):
        first, second = StateKeys.generate(), StateKeys.generate()
        path = self._write(f"# state keys\n\n  {first.hex().upper()}  \n"
                           f"   # old key, kept to open\n{second.hex()}\r\n")
        keys = StateKeys.from_file(path)
        self.assertEqual(keys.key_ids, (state.key_id(first), state.key_id(second)))

    def test_the_first_key_of_the_file_seals(self):
        first = StateKeys.generate()
        path = self._write(f"{first.hex()}\n{StateKeys.generate().hex()}\n")
        blob = StateKeys.from_file(path).seal(session_state())
        self.assertEqual(blob[1:5], state.key_id(first))

    def _assert_key_error(self, path, reason):
        e = self.assertRaises(StateKeyError, StateKeys.from_file, path)
        self.assertEqual(e.path, path)
        self.assertIn(reason, e.reason)
        self.assertEqual(str(e), f"{path}: {e.reason}")
        return e

    def test_missing_file_is_named(self):
        self._assert_key_error(self.mktemp(), "No such file or directory")

    def test_binary_file_is_refused(self):
        self._assert_key_error(self._write(b"\xff\xfe\x00", "wb"),
                               "not a text file")

    def test_file_without_keys_is_refused(self):
        self._assert_key_error(self._write("# nothing yet\n\n"), "no keys")

    def test_bad_hex_names_the_line_and_never_quotes_it(self):
        bad = "z" + StateKeys.generate().hex()[1:]
        e = self._assert_key_error(
            self._write(f"# key\n{bad}\n"),
            "line 2: a key must be 64 hex characters, found 64 characters "
            "that are not all hex")
        self.assertNotIn(bad[1:], str(e))

    def test_key_of_wrong_length_names_the_line(self):
        self._assert_key_error(self._write(StateKeys.generate().hex()[:62]),
                               "line 1: a key must be 64 hex characters, "
                               "found 62 characters")

    def test_key_with_inner_spaces_is_refused(self):
        key = StateKeys.generate().hex()
        self._assert_key_error(self._write(key[:32] + " " + key[32:]),
                               "found 65 characters")

    def test_same_key_twice_is_refused(self):
        key = StateKeys.generate().hex()
        self._assert_key_error(self._write(f"{key}\n{key}\n"),
                               "state key 2 has the key id of an earlier key")


# The head of an OpenSSL session's DER: SEQUENCE (long form, two length
# bytes), INTEGER 1, INTEGER ssl_version, OCTET STRING cipher.
_TLS12_DER = bytes.fromhex("3082044d020101020203030402c030") + b"\0" * 16


class ResumabilityTests(TestCase):
    """
    What a node checks before a session moves or is used up.
    """

    def test_der_protocol_reads_the_version_of_a_session(self):
        self.assertEqual(state.der_protocol(_TLS12_DER), "TLSv1.2")
        tls13 = _TLS12_DER[:9] + b"\x03\x04" + _TLS12_DER[11:]
        self.assertEqual(state.der_protocol(tls13), "TLSv1.3")

    def test_der_protocol_of_what_is_no_session_is_none(self):
        for der in (b"", b"\x30", b"\x31" + _TLS12_DER[1:],
                    _TLS12_DER[:4] + b"\x02\x01\x02" + _TLS12_DER[7:],
                    _TLS12_DER[:9] + b"\x03\x01" + _TLS12_DER[11:]):
            self.assertIsNone(state.der_protocol(der), der[:12].hex())

    def test_unresumable_names_the_mismatch(self):
        s = session_state(der=_TLS12_DER)
        self.assertIsNone(s.unresumable("TLSv1.2", s.id_context))
        self.assertIn("TLSv1.2 session", s.unresumable("TLSv1.3", s.id_context))
        self.assertIn("another service", s.unresumable("TLSv1.2", b"other"))
