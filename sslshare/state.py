"""
The state of one TLS session as the cluster carries it, and its sealing.

L{SessionState} is what moves between nodes and rests in a repository: the
session id and its context, the DER bytes of the OpenSSL session (a secret:
it holds the master key), the node that holds it now, its lifetime, and the
checkpoint of its record digest, and how many times it has moved.  Its
binary encoding is strict and
versioned; decoding checks every length and field, so bytes from a peer or
from storage either become a valid state or raise L{StateFormatError}:

    offset  size  field
    0       1     format, always 2
    1       32    session id (L{sslshare.sessionid} layout)
    33      1     n: length of the session id context, 1..32
    34      n     session id context
            2     m: length of the holder's node id in UTF-8, 1..256
            m     holder: 1..64 printable characters
            8     created, unix time, IEEE 754 binary64
            8     expires, the same; not before created
            8     seq, unsigned, at most MAX_SEQ
            4     moves, unsigned
            1     d: digest length, 0 or 32
            d     digest
            2     k: DER length, 1..MAX_DER_LENGTH
            k     DER
    (nothing after)

All integers are big-endian.  L{StateKeys} seals a state for the wire and
for storage with AES-GCM under the cluster state key:

    offset  size  field
    0       1     format, always 1
    1       4     key id: the first 4 bytes of SHA-256 of the key
    5       12    nonce, random
    17      ...   ciphertext of the encoding, then the 16-byte tag

The additional data binds a blob to its session id and context, so a blob
filed under another session never opens.  The move count tells a replayed
older blob from the session's present one: a node that saw the session
leave at some count refuses every copy at or below it.  The first key seals
and every key opens, which lets a cluster rotate keys.  L{StateKeys.prove}
lets two nodes show each other which key they seal with, and that they hold
it, without revealing it: an HMAC-SHA256 under a key derived from it.
Random 96-bit nonces are safe for
about 2**32 seals under one key (NIST SP 800-38D): rotate before that.

A checkpoint kept beside a blob (a repository's seq and digest columns) is
authenticated apart, since it changes without the blob: the digest, then a
16-byte tag, the first bytes of HMAC-SHA256 under a key derived from the
state key over the session id, the seq and the digest.

This module does no I/O beyond reading a key file, and never puts a DER or
a key into a message, a log or a C{repr}.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import struct
from collections.abc import Sequence

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sslshare import sessionid
from sslshare.errors import FileError

STATE_FORMAT = 2
SEAL_FORMAT = 1
MAX_ID_CONTEXT_LENGTH = sessionid.ID_CONTEXT_LENGTH
MAX_HOLDER_CHARACTERS = 64
# Four bytes of UTF-8 at most per character.
MAX_HOLDER_BYTES = 4 * MAX_HOLDER_CHARACTERS
DIGEST_LENGTH = 32
# An OpenSSL session is about 135 bytes, a few KiB with a client
# certificate; the bound keeps a sealed state under MAX_SEALED_LENGTH.
MAX_DER_LENGTH = 12 * 1024
MAX_ENCODED_LENGTH = (1 + sessionid.SESSION_ID_LENGTH + 1 + MAX_ID_CONTEXT_LENGTH
                      + 2 + MAX_HOLDER_BYTES + 8 + 8 + 8 + 4 + 1 + DIGEST_LENGTH
                      + 2 + MAX_DER_LENGTH)
KEY_LENGTH = 32
KEY_ID_LENGTH = 4
NONCE_LENGTH = 12
TAG_LENGTH = 16
_SEAL_HEADER_LENGTH = 1 + KEY_ID_LENGTH + NONCE_LENGTH
PROOF_LENGTH = 32
# Derives the key of the proofs from a state key: the state key itself
# only ever keys AES-GCM.
_PROOF_KEY_LABEL = b"sslshare key proof v1"
# The cluster channel refuses sealed blobs above this size.
MAX_SEALED_LENGTH = 16 * 1024
_AAD_PREFIX = b"sslshare state v1\0"
# The most records a digest chain covers, one bound for the whole cluster:
# a seq travels through PostgreSQL's bigint and Redis' integers, both signed
# 64-bit.  A chain at the bound takes no more steps.
MAX_SEQ = 2 ** 63 - 1
MAX_MOVES = 2 ** 32 - 1
_TIMES_SEQ_AND_MOVES = struct.Struct("!ddQI")
_KEY_LINE = re.compile(r"[0-9a-fA-F]{64}")
# The TLS versions a session may have, as the engine names them, by the
# ssl_version an OpenSSL session's DER begins with.
_DER_PROTOCOLS = {b"\x03\x03": "TLSv1.2", b"\x03\x04": "TLSv1.3"}
PROTOCOLS = tuple(_DER_PROTOCOLS.values())
CHECKPOINT_TAG_LENGTH = 16
SEALED_CHECKPOINT_LENGTH = DIGEST_LENGTH + CHECKPOINT_TAG_LENGTH
_CHECKPOINT_KEY_LABEL = b"sslshare checkpoint key v1"
_CHECKPOINT_PREFIX = b"sslshare checkpoint v1\0"
# Keys a node opens with at once: a rotation needs two or three.
MAX_KEYS = 8


class StateFormatError(ValueError):
    """
    Bytes are not an encoded L{SessionState}; the message says which field
    is wrong and how.
    """


class SealError(ValueError):
    """
    A sealed blob cannot be opened: too short or too long, an unknown format
    or key, failed authentication, or a state for another session.
    """


class StateKeyError(FileError):
    """
    A state key file is unusable.
    """


def _unix_time(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a time must be a number, not {type(value).__name__}")
    return float(value)


def _problem(state: SessionState) -> str | None:
    """
    What makes C{state} invalid, or C{None}.  Messages name the field and
    lengths, never the bytes of a secret.
    """
    for name in ("session_id", "id_context", "der"):
        value = getattr(state, name)
        if type(value) is not bytes:
            return f"{name} must be bytes, not {type(value).__name__}"
    if not sessionid.is_session_id(state.session_id):
        return (f"session id is not an sslshare session id "
                f"({len(state.session_id)} bytes)")
    if not 0 < len(state.id_context) <= MAX_ID_CONTEXT_LENGTH:
        return (f"session id context must be 1 to {MAX_ID_CONTEXT_LENGTH} "
                f"bytes, not {len(state.id_context)}")
    if not 0 < len(state.der) <= MAX_DER_LENGTH:
        return f"DER must be 1 to {MAX_DER_LENGTH} bytes, not {len(state.der)}"
    if type(state.holder) is not str:
        return f"holder must be a str, not {type(state.holder).__name__}"
    if not 0 < len(state.holder) <= MAX_HOLDER_CHARACTERS:
        return (f"holder must be 1 to {MAX_HOLDER_CHARACTERS} characters, "
                f"not {len(state.holder)}")
    # Holders reach logs: no control characters, no lone surrogates.
    if not state.holder.isprintable():
        return "holder has unprintable characters"
    if not (math.isfinite(state.created) and math.isfinite(state.expires)):
        return "created and expires must be finite"
    if state.expires < state.created:
        return "expires is before created"
    if type(state.moves) is not int or not 0 <= state.moves <= MAX_MOVES:
        return f"moves must be an int from 0 to {MAX_MOVES}"
    return checkpoint_problem(state.seq, state.digest)


def checkpoint_problem(seq: object, digest: object,
                       digest_length: int = DIGEST_LENGTH) -> str | None:
    """
    What makes C{seq} and C{digest} invalid as the checkpoint of a state,
    or C{None}; a sealed checkpoint (L{StateKeys.seal_checkpoint}) has a
    C{digest_length} of L{SEALED_CHECKPOINT_LENGTH}.
    """
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        return f"seq must be an int from 0 to {MAX_SEQ}"
    if type(digest) is not bytes:
        return f"digest must be bytes, not {type(digest).__name__}"
    if len(digest) not in (0, digest_length):
        return (f"digest must be empty or {digest_length} bytes, "
                f"not {len(digest)}")
    return None


@attrs.frozen
class SessionState:
    """
    One TLS session as the cluster carries it.  Every instance is valid
    (the constructor raises C{ValueError} or C{TypeError} otherwise), so
    every instance encodes.

    @ivar session_id: the 32-byte sslshare session id.
    @ivar id_context: the session id context of its service, 1..32 bytes.
    @ivar der: the OpenSSL session; a secret, kept out of C{repr} and
        compared in constant time.
    @ivar holder: the node id of the node that holds it now (not always
        the owner the session id names: see docs/architecture.md).
    @ivar created: unix time.
    @ivar expires: unix time, not before C{created}.
    @ivar seq: the number of records the digest covers.
    @ivar digest: C{b""} or the 32-byte running digest.
    @ivar moves: how many times the session went to another holder.
    """

    session_id: bytes
    id_context: bytes
    der: bytes = attrs.field(
        repr=False, eq=attrs.cmp_using(eq=hmac.compare_digest), hash=False)
    holder: str
    created: float = attrs.field(converter=_unix_time)
    expires: float = attrs.field(converter=_unix_time)
    seq: int = 0
    # Not a secret, but it confirms a guess of the records: not in a repr.
    digest: bytes = attrs.field(default=b"", repr=False)
    moves: int = 0

    def __attrs_post_init__(self) -> None:
        problem = _problem(self)
        if problem is not None:
            raise ValueError(problem)

    def encode(self) -> bytes:
        """
        The binary encoding (see the module docstring).
        """
        holder = self.holder.encode("utf-8")
        return b"".join((
            bytes((STATE_FORMAT,)), self.session_id,
            bytes((len(self.id_context),)), self.id_context,
            struct.pack("!H", len(holder)), holder,
            _TIMES_SEQ_AND_MOVES.pack(self.created, self.expires, self.seq,
                                      self.moves),
            bytes((len(self.digest),)), self.digest,
            struct.pack("!H", len(self.der)), self.der,
        ))

    @classmethod
    def decode(cls, data: bytes) -> SessionState:
        """
        The state C{data} encodes.

        @raise StateFormatError: C{data} is not exactly one valid encoding.
        """
        reader = _Reader(data)
        version = reader.byte("format")
        if version != STATE_FORMAT:
            raise StateFormatError(f"unknown state format {version}")
        session_id = reader.take(sessionid.SESSION_ID_LENGTH, "session id")
        id_context = reader.take(
            reader.length(1, "session id context", 1, MAX_ID_CONTEXT_LENGTH),
            "session id context")
        holder_bytes = reader.take(
            reader.length(2, "holder", 1, MAX_HOLDER_BYTES), "holder")
        created, expires, seq, moves = _TIMES_SEQ_AND_MOVES.unpack(
            reader.take(_TIMES_SEQ_AND_MOVES.size, "times, seq and moves"))
        digest_length = reader.byte("digest length")
        if digest_length not in (0, DIGEST_LENGTH):
            raise StateFormatError(
                f"digest length must be 0 or {DIGEST_LENGTH}, not {digest_length}")
        digest = reader.take(digest_length, "digest")
        der = reader.take(reader.length(2, "DER", 1, MAX_DER_LENGTH), "DER")
        if reader.remaining:
            raise StateFormatError(
                f"{reader.remaining} bytes after the end of the state")
        try:
            holder = holder_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise StateFormatError("holder is not UTF-8") from None
        try:
            return cls(session_id=session_id, id_context=id_context, der=der,
                       holder=holder, created=created, expires=expires,
                       seq=seq, digest=digest, moves=moves)
        except ValueError as e:
            raise StateFormatError(str(e)) from None

    def with_holder(self, holder: str) -> SessionState:
        """
        This state, held by C{holder}: one move more when that is another
        holder.
        """
        if holder == self.holder:
            return self
        # Four billion moves within one lifetime: not reached in practice,
        # and a count that stops there still refuses every older copy.
        return attrs.evolve(self, holder=holder,
                            moves=min(self.moves + 1, MAX_MOVES))

    def with_checkpoint(self, seq: int, digest: bytes) -> SessionState:
        """
        This state with the checkpoint C{(seq, digest)} when that covers
        more records than its own, else this state: checkpoints only go
        forward.

        @raise ValueError: C{(seq, digest)} is not a checkpoint a chain can
            continue from (a digest of 32 bytes after at least one record).
        """
        if type(seq) is not int:
            raise ValueError(f"seq must be an int, not {type(seq).__name__}")
        if seq <= self.seq:
            return self
        if type(digest) is not bytes or len(digest) != DIGEST_LENGTH:
            raise ValueError(f"a checkpoint after {seq} records must have a "
                             f"{DIGEST_LENGTH}-byte digest")
        return attrs.evolve(self, seq=seq, digest=digest)

    def unresumable(self, protocol: str, id_context: bytes) -> str | None:
        """
        Why a handshake of TLS version C{protocol} in session id context
        C{id_context} cannot resume this session, or C{None}: what a node
        checks before the session moves or is used up.  A DER whose
        version does not read (see L{der_protocol}) is left to the engine.
        """
        if self.id_context != id_context:
            return "it is another service's"
        own = der_protocol(self.der)
        if own not in (None, protocol):
            return f"it is a {own} session, the client asked for {protocol}"
        return None

    def expired(self, now: float) -> bool:
        """
        Whether the session is past its lifetime at unix time C{now}.
        """
        return now >= self.expires


def der_protocol(der: bytes) -> str | None:
    """
    The TLS version of the OpenSSL session C{der}, C{"TLSv1.2"} or
    C{"TLSv1.3"}, read from the head of its encoding (a SEQUENCE, then
    INTEGER 1, then INTEGER ssl_version), or C{None} when it does not begin
    that way: the giver of a session checks it against the handshake that
    asks, before the session moves, with no TLS library.
    """
    if len(der) < 2 or der[0] != 0x30:
        return None
    # The SEQUENCE's length: short form, or long form in one or two bytes.
    at = 2 if der[1] < 0x80 else 2 + (der[1] - 0x80)
    if at > 4 or der[at:at + 5] != b"\x02\x01\x01\x02\x02":
        return None
    return _DER_PROTOCOLS.get(der[at + 5:at + 7])


class _Reader:
    """
    Reads fields off an encoding, checking each length before it slices.
    """

    def __init__(self, data: bytes) -> None:
        # memoryview first: bytes(5) would be five zero bytes.
        self._data = bytes(memoryview(data))
        self._offset = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def take(self, size: int, what: str) -> bytes:
        if size > self.remaining:
            raise StateFormatError(
                f"truncated at {what}: {size} bytes needed, "
                f"{self.remaining} left")
        start = self._offset
        self._offset += size
        return self._data[start:self._offset]

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def length(self, size: int, what: str, least: int, most: int) -> int:
        value = int.from_bytes(self.take(size, f"{what} length"), "big")
        if not least <= value <= most:
            raise StateFormatError(
                f"{what} length must be {least} to {most}, not {value}")
        return value


def key_id(key: bytes) -> bytes:
    """
    The id a sealed blob names its key by: the first 4 bytes of SHA-256 of
    the key.  Not a secret.
    """
    return hashlib.sha256(key).digest()[:KEY_ID_LENGTH]


def _aad(session_id: bytes, id_context: bytes) -> bytes:
    return _AAD_PREFIX + session_id + id_context


def _checkpoint_tag(key: bytes, session_id: bytes, seq: int,
                    digest: bytes) -> bytes:
    message = _CHECKPOINT_PREFIX + session_id + seq.to_bytes(8, "big") + digest
    return hmac.digest(key, message, "sha256")[:CHECKPOINT_TAG_LENGTH]


class StateKeys:
    """
    Cluster state keys: the first seals, all open (so that a cluster can rotate them).
    """

    def __init__(self, keys: Sequence[bytes]) -> None:
        """
        @param keys: 32-byte AES-256 keys, the sealing key first.
        @raise ValueError: no keys, a key of another length, or two keys
            with the same key id.
        """
        if not keys:
            raise ValueError("no state keys")
        if len(keys) > MAX_KEYS:
            raise ValueError(f"{len(keys)} state keys (at most {MAX_KEYS})")
        self._ciphers: dict[bytes, AESGCM] = {}
        # Keys of their own for what is not sealed, derived from each.
        self._proof_keys: dict[bytes, bytes] = {}
        self._checkpoint_keys: dict[bytes, bytes] = {}
        ids = []
        for index, key in enumerate(keys):
            if type(key) is not bytes or len(key) != KEY_LENGTH:
                raise ValueError(f"state key {index + 1} is not {KEY_LENGTH} bytes")
            identifier = key_id(key)
            if identifier in self._ciphers:
                raise ValueError(
                    f"state key {index + 1} has the key id of an earlier key "
                    f"({identifier.hex()})")
            self._ciphers[identifier] = AESGCM(key)
            self._proof_keys[identifier] = hmac.digest(
                key, _PROOF_KEY_LABEL, "sha256")
            self._checkpoint_keys[identifier] = hmac.digest(
                key, _CHECKPOINT_KEY_LABEL, "sha256")
            ids.append(identifier)
        self.key_ids: tuple[bytes, ...] = tuple(ids)

    def __repr__(self) -> str:
        return f"<StateKeys ids={','.join(i.hex() for i in self.key_ids)}>"

    @classmethod
    def from_file(cls, path: str) -> StateKeys:
        """
        Keys from a text file: one key per line as 64 hex characters; blank
        lines and lines starting with C{#} are ignored; the first key seals.

        @raise StateKeyError: the file cannot be read or holds no valid keys.
        """
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise StateKeyError(path, e.strerror or str(e)) from None
        except UnicodeDecodeError:
            raise StateKeyError(path, "not a text file") from None
        keys = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            # The line itself is (nearly) a key: describe it, never quote it.
            if not _KEY_LINE.fullmatch(line):
                raise StateKeyError(
                    path, f"line {number}: a key must be 64 hex characters, "
                    f"found {len(line)} characters"
                    + ("" if len(line) != 64 else " that are not all hex"))
            keys.append(bytes.fromhex(line))
        if not keys:
            raise StateKeyError(path, "no keys")
        try:
            return cls(keys)
        except ValueError as e:
            raise StateKeyError(path, str(e)) from None

    @staticmethod
    def generate() -> bytes:
        """
        A new random state key.
        """
        return os.urandom(KEY_LENGTH)

    def holds(self, key_id: bytes) -> bool:
        """
        Whether one of these keys has the id C{key_id}.
        """
        return key_id in self._ciphers

    def prove(self, message: bytes) -> tuple[bytes, bytes]:
        """
        The sealing key's id, and the proof that whoever made it holds that
        key, for C{message} (which binds the proof to its occasion).
        """
        identifier = self.key_ids[0]
        return identifier, hmac.digest(self._proof_keys[identifier], message,
                                       "sha256")

    def proven(self, key_id: bytes, message: bytes, proof: bytes) -> bool:
        """
        Whether C{proof} is what L{prove} makes for C{message} with the key
        C{key_id}; C{False} for a key not among these.
        """
        proof_key = self._proof_keys.get(key_id)
        if proof_key is None:
            return False
        return hmac.compare_digest(
            hmac.digest(proof_key, message, "sha256"), proof)

    def sealing_key_for(self, key_ids: Sequence[bytes]) -> bytes | None:
        """
        The id of the key to seal a state with for a node that holds the
        keys C{key_ids}: this node's sealing key when that node has it
        (either side may be a step ahead in a key rotation), else the first
        key of both; C{None} when they share none.
        """
        for identifier in self.key_ids:
            if identifier in key_ids:
                return identifier
        return None

    def seal(self, state: SessionState, key_id: bytes | None = None) -> bytes:
        """
        C{state}, encrypted and authenticated under the sealing key, or
        under the key named C{key_id}, one of L{key_ids}.
        """
        identifier = self.key_ids[0] if key_id is None else key_id
        nonce = os.urandom(NONCE_LENGTH)
        ciphertext = self._ciphers[identifier].encrypt(
            nonce, state.encode(), _aad(state.session_id, state.id_context))
        return bytes((SEAL_FORMAT,)) + identifier + nonce + ciphertext

    def seal_checkpoint(self, session_id: bytes, seq: int,
                        digest: bytes) -> bytes:
        """
        The checkpoint C{(seq, digest)} of C{session_id} as it is kept
        beside a sealed blob: the digest and its tag under the sealing key
        (C{b""} before the first record).
        """
        if not digest:
            return b""
        return digest + _checkpoint_tag(self._checkpoint_keys[self.key_ids[0]],
                                        session_id, seq, digest)

    def open_checkpoint(self, session_id: bytes, seq: int,
                        sealed: bytes) -> bytes:
        """
        The digest of a checkpoint made by L{seal_checkpoint}.

        @raise SealError: it is not one, for this session and seq, under
            any of the keys.
        """
        if not sealed and not seq:
            return b""
        if len(sealed) != SEALED_CHECKPOINT_LENGTH:
            raise SealError(
                f"checkpoint of session {sessionid.describe(session_id)}: "
                f"{len(sealed)} bytes, not {SEALED_CHECKPOINT_LENGTH}")
        digest, tag = sealed[:DIGEST_LENGTH], sealed[DIGEST_LENGTH:]
        for key in self._checkpoint_keys.values():
            if hmac.compare_digest(
                    tag, _checkpoint_tag(key, session_id, seq, digest)):
                return digest
        raise SealError(
            f"checkpoint {seq} of session {sessionid.describe(session_id)}: "
            f"authentication failed (forged, or another session's or seq's)")

    def open(self, blob: bytes, session_id: bytes,
             id_context: bytes) -> SessionState:
        """
        The state sealed in C{blob}, which must be that of C{session_id} in
        C{id_context}.

        @raise SealError: C{blob} does not open to that session's state.
        """
        def fail(reason: str) -> SealError:
            return SealError(
                f"sealed state of session {sessionid.describe(session_id)}: "
                f"{reason}")

        if len(blob) < _SEAL_HEADER_LENGTH + TAG_LENGTH:
            raise fail(f"too short ({len(blob)} bytes)")
        if len(blob) > MAX_SEALED_LENGTH:
            raise fail(f"too long ({len(blob)} bytes)")
        blob = bytes(memoryview(blob))
        if blob[0] != SEAL_FORMAT:
            raise fail(f"unknown seal format {blob[0]}")
        identifier = blob[1:1 + KEY_ID_LENGTH]
        cipher = self._ciphers.get(identifier)
        if cipher is None:
            raise fail(f"unknown key id {identifier.hex()}")
        nonce = blob[1 + KEY_ID_LENGTH:_SEAL_HEADER_LENGTH]
        try:
            plaintext = cipher.decrypt(
                nonce, blob[_SEAL_HEADER_LENGTH:], _aad(session_id, id_context))
        except InvalidTag:
            raise fail("authentication failed (tampered, or sealed for "
                       "another session or context)") from None
        try:
            state = SessionState.decode(plaintext)
        except StateFormatError as e:
            raise fail(f"bad state inside: {e}") from None
        # The additional data already binds both; a node that sealed under
        # the wrong ones would still be caught here.
        if not (hmac.compare_digest(state.session_id, session_id)
                and hmac.compare_digest(state.id_context, id_context)):
            raise fail("it holds another session's state")
        return state
