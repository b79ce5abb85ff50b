"""
The node-to-node channel: AMP over mutual TLS, with node identity from
certificates and authorization per command.

Every node listens for its peers (L{PeerServerFactory}, wrapped in Twisted's
L{TLSMemoryBIOFactory} with L{ClusterTLS.server_options}) and keeps one
reconnecting client per peer (L{PeerLink}, gathered in L{Peers}).  Four AMP
commands cross the channel: L{FetchSession} (move a sealed session to the
asker), L{Backup}, L{Checkpoint}, L{Purge} and L{Stats}, and L{KeyCheck}
sets a link up.  What a node does with them is not this module's
business: the server calls an L{ICommandHandler}.

Identity.  Both ends present a certificate from the cluster CA whose SAN
URI is C{sslshare://<cluster>/<node id>} (L{sslshare.identity.node_uri}).
OpenSSL verifies the chain (trust root: the CA file only; extended key
usage: clientAuth for the side that dials, serverAuth for the side that
answers); a per-connection verify callback then reads the URI of the leaf:
the client accepts only the one peer it dialled; the server accepts its
configured peers and itself (C{sslshare stats} asks with the node's own
certificate), counting any other node of the cluster (a decommissioned
one, say) in C{refused_nodes}, and refuses a second connection for a node
id that is connected from another host already (two nodes given the same
id), counted in C{duplicate_nodes}.  Anything else fails the handshake with
an alert to the peer, and the callback keeps a L{PeerIdentityError} saying
why for the protocol on top, which logs the refusal with its reason.  A
peer's node id is only ever read from its verified certificate, never from
anything it sends.

Link setup.  Right after the handshake, a link sends L{KeyCheck}: the id of
the state key it seals with, and a proof that it holds that key
(L{sslshare.state.StateKeys.prove}) over both node ids and a value both
ends derive from this TLS connection, so that the proof is worth nothing
on another connection.  The server checks that it holds that key (it can
open what the peer seals) and the proof, and answers the same for its own
key; the link checks the answer likewise, and is up only then.  A node
with another state key is refused with a line naming the peer and both key
ids, counted in C{key_mismatches}, instead of failing every session it
gets.  During a key rotation this asks for the order the rotation needs
anyway: every node holds a new key before any node seals with it.  The
check guards against mistakes, not attackers: a peer's certificate is what
authenticates it.

Why not C{service_identity.URI_ID}: service_identity matches a URI-ID on
scheme and host only (RFC 6125 6.5.2).  C{URI_ID("sslshare://demo/node1")}
raises C{ValueError("Invalid DNS-ID")}, and its C{URIPattern} keeps
C{"//demo/node1"}, lowercased, as a DNS pattern.  The node id lives in the
path, so this module reads the SAN URIs with C{cryptography} (which is what
service_identity's own C{extract_patterns} does) and compares exact strings;
chain verification stays with OpenSSL.

Authorization.  The server's responders ask C{allowed(command, node id)}
before anything else; a refusal answers C{NOT_AUTHORIZED}, is logged with
the peer and the command, counted in C{counters["refused_commands"]}, and
the handler is never called.  Arguments are checked next (session ids are
sslshare ids of 32 bytes, digests 0 or 32 bytes, sealed blobs at most
L{MAX_SEALED} bytes), and so is what AMP parses them from (a missing
argument, an integer that is not one): C{BAD_REQUEST}, counted in
C{bad_requests}.  An unknown command gets AMP's C{UNHANDLED}, counted in
C{unknown_commands}.  A box AMP itself cannot take (a key over 255 bytes,
an answer to a question this side never asked, a command that asks for no
answer) ends the connection, counted in C{protocol_errors}.  The server
also checks what its handler answers, and L{fetch_from} checks what
a peer answers: garbage becomes L{PeerProtocolError}.

Connections that fail the handshake (no certificate, another CA, another
cluster, a timeout) get no data; they are logged and counted in
C{counters["refused_connections"]} (timeouts in C{handshake_timeouts}).

Bounds.  AMP keeps a box until its end and takes any number of keys, so a
box of more than L{MAX_BOX_KEYS} keys or L{MAX_BOX_BYTES} bytes ends the
connection as it arrives (a protocol error), on both ends.  The server
stops reading from a peer (and parsing what it has read) while the answers
it wrote are not taken: the connection is its transport's producer, paused
while the transport's write buffer is over its bound (Twisted's 64 KiB),
counted in C{reading_paused}.  Whatever a remote can repeat is logged at a
bounded rate, one L{RateLimitedWarning} per kind, and counted in full.

Availability.  L{PeerLink.call} never waits for a connection: the recovery
chain has a budget of tens of milliseconds, so a peer that is not connected
right now fails the call at once with L{PeerUnavailable}; the link keeps
reconnecting in the background (Twisted's L{ClientService}, exponential
backoff that also grows while handshakes keep failing).  Nor does a call
wait for ever for an answer: a command other than L{FetchSession} (whose
asker bounds it with its own budget) that the peer has not answered within
the link's call timeout fails with L{PeerUnavailable} too, counted in
C{counters["call_timeouts"]}.

Reload.  L{Peers.reconfigure} starts and stops links to match a new peer
list, leaving the others up; L{ClusterTLS.adopt} gives the connections made
from then on, in both directions, a new certificate and key.

This module never speaks TLS to clients, never reads configuration files
other than the PEM files it is given, and never sees a session in clear: it
carries sealed blobs.
"""

from __future__ import annotations

import json
import math
import random
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService, Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.error import ConnectingCancelledError, ConnectionClosed
from twisted.internet.interfaces import (
    IAddress,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from sslshare import identity, sessionid
from sslshare.errors import FileError
from sslshare.logs import RateLimitedWarning
from sslshare.state import (
    KEY_ID_LENGTH,
    MAX_ID_CONTEXT_LENGTH,
    MAX_KEYS,
    PROOF_LENGTH,
    PROTOCOLS,
    StateKeys,
    checkpoint_problem,
)
from sslshare.state import MAX_SEALED_LENGTH as MAX_SEALED

MAX_BOX_KEYS = 16
"""The most keys a box on the channel may have; a command uses 5 at most."""

MAX_BOX_BYTES = 128 * 1024
"""
The most bytes a box may take on the wire: room for one value of AMP's
largest (64 KiB), so that an oversized argument is a bad request, not a
dropped connection.
"""

FETCH_STATUSES = ("found", "redirect", "missing", "refused")
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# Seconds a peer has to answer a Backup, Checkpoint, Purge or Stats: a
# connected peer answers in milliseconds, a stopped or hung one never.
DEFAULT_CALL_TIMEOUT = 5.0
# Failed connection attempts a purge waits through for a peer that is
# down before it gives up (see Peers.purge_session).
PURGE_CONNECT_ATTEMPTS = 3

_log = Logger()


# Errors.

class NotAuthorized(Exception):
    """
    The peer may not run this command (AMP error C{NOT_AUTHORIZED}).
    """


class BadRequest(Exception):
    """
    A command's arguments are out of bounds (AMP error C{BAD_REQUEST}).
    """


class PeerUnavailable(Exception):
    """
    A peer cannot be asked right now: not connected, or the connection
    ended while the question was out.

    @ivar peer: the peer's node id.
    @ivar reason: why, in words.
    """

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"peer {peer}: {reason}")
        self.peer = peer
        self.reason = reason


class PeerProtocolError(Exception):
    """
    A peer answered something that breaks the protocol (a status that does
    not exist, a missing or oversized field).
    """


class PeerIdentityError(Exception):
    """
    A certificate does not name an acceptable node, or does not chain to the
    cluster CA.  The message names the certificate and the reason.
    """


class NodeRefused(PeerIdentityError):
    """
    A certificate names a node of the cluster that may not connect now.

    @ivar counter: the counter of the server it is counted in.
    """

    def __init__(self, counter: str, reason: str) -> None:
        super().__init__(reason)
        self.counter = counter


class KeyMismatch(Exception):
    """
    The two ends of a link cannot open what the other seals (AMP error
    C{KEY_MISMATCH}): another state key, or no proof of holding it.
    """


class ClusterTLSError(FileError):
    """
    A node's own CA, certificate or key file is unusable.
    """


# The commands.  Every one answers the same two errors; anything else a
# responder raises reaches the asker as AMP's UNKNOWN error and is logged
# on the answering side.

_ERRORS: dict[type[Exception], bytes] = {
    NotAuthorized: b"NOT_AUTHORIZED",
    BadRequest: b"BAD_REQUEST",
}


class FetchSession(amp.Command):
    """
    Give me the session C{session_id} (and forget it): C{found} with the
    sealed state, C{redirect} to the C{holder} that took it, C{missing}, or
    C{refused} when the session cannot resume the handshake that asks: of
    another C{protocol} or C{id_context}, or sealable under none of the
    asker's C{key_ids} (4 bytes each).  Those three come together
    (L{FetchTerms}), or not at all: nothing is checked then.
    """

    arguments = [
        (b"session_id", amp.String()),
        (b"protocol", amp.Unicode(optional=True)),
        (b"id_context", amp.String(optional=True)),
        (b"key_ids", amp.String(optional=True)),
    ]
    response = [
        (b"status", amp.Unicode()),
        (b"sealed", amp.String(optional=True)),
        (b"holder", amp.Unicode(optional=True)),
    ]
    errors = _ERRORS


class Checkpoint(amp.Command):
    """
    The record digest of C{session_id} after C{seq} records.
    """

    arguments = [
        (b"session_id", amp.String()),
        (b"seq", amp.Integer()),
        (b"digest", amp.String()),
    ]
    response = [(b"accepted", amp.Boolean())]
    errors = _ERRORS


class Backup(amp.Command):
    """
    Keep this sealed copy of C{session_id}: the sender holds the session,
    and the receiver is its backup node, asked when the holder is gone.
    """

    arguments = [(b"session_id", amp.String()), (b"sealed", amp.String())]
    response = [(b"kept", amp.Boolean())]
    errors = _ERRORS


class Purge(amp.Command):
    """
    Forget the session C{session_id}.
    """

    arguments = [(b"session_id", amp.String())]
    response = [(b"removed", amp.Boolean())]
    errors = _ERRORS


class Stats(amp.Command):
    """
    The node's counters, as a JSON object of name -> number.
    """

    arguments: list = []
    response = [(b"counters", amp.Unicode())]
    errors = _ERRORS


class KeyCheck(amp.Command):
    """
    I seal with the state key C{key_id}, and C{proof} shows that I hold it
    (see the module's "Link setup"); the answer is the same from the
    server.  Any peer that may connect may send it.
    """

    arguments = [(b"key_id", amp.String()), (b"proof", amp.String())]
    response = [(b"key_id", amp.String()), (b"proof", amp.String())]
    errors = {**_ERRORS, KeyMismatch: b"KEY_MISMATCH"}


COMMANDS: dict[str, type[amp.Command]] = {
    command.__name__: command
    for command in (FetchSession, Backup, Checkpoint, Purge, Stats)
}
"""The channel's commands by name: the names authorization uses."""

_COMMAND_NAMES = frozenset(command.commandName for command in COMMANDS.values()
                           ) | {KeyCheck.commandName}

# The exporter label (RFC 5705) of the value a key check is bound to.
_KEY_CHECK_LABEL = b"EXPORTER-sslshare-key-check"


def _key_check_message(connection: SSL.Connection, role: bytes, cluster: str,
                       client: str, server: str) -> bytes:
    """
    What a L{KeyCheck} proof of C{role} (C{b"client"} or C{b"server"})
    covers on C{connection}.  The role keeps a server from handing the
    client's own proof back; node ids never hold a NUL.
    """
    binding = connection.export_keying_material(_KEY_CHECK_LABEL, 32)
    return b"\0".join((b"sslshare key check v1", role, cluster.encode(),
                       client.encode(), server.encode(), binding))


def _key_ids(keys: StateKeys) -> str:
    return ", ".join(key_id.hex() for key_id in keys.key_ids)


def _key_problem(keys: StateKeys, peer: str, node_id: str, key_id: bytes,
                 message: bytes, proof: bytes) -> str | None:
    """
    Why C{peer}'s key check fails at C{node_id}, or C{None}.
    """
    if len(key_id) != KEY_ID_LENGTH or len(proof) != PROOF_LENGTH:
        return (f"{peer} sent a key check of a {len(key_id)}-byte key id and "
                f"a {len(proof)}-byte proof ({KEY_ID_LENGTH} and "
                f"{PROOF_LENGTH} expected)")
    if not keys.holds(key_id):
        return (f"{peer} seals with state key id {key_id.hex()}, which "
                f"{node_id} does not hold (it holds {_key_ids(keys)})")
    if not keys.proven(key_id, message, proof):
        return (f"{peer} names state key id {key_id.hex()} but does not "
                f"prove that it holds it")
    return None


@attrs.frozen
class FetchTerms:
    """
    What the handshake that asks for a session can resume: the session's
    TLS version (one of L{sslshare.state.PROTOCOLS}) and session id
    context, and the ids of the state keys the asker opens with.
    """

    protocol: str
    id_context: bytes
    key_ids: tuple[bytes, ...]

    def arguments(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "id_context": self.id_context,
                "key_ids": b"".join(self.key_ids)}


def _fetch_terms(protocol: str | None, id_context: bytes | None,
                 key_ids: bytes | None) -> FetchTerms | None:
    """
    The terms of a FetchSession's arguments, C{None} when it has none.

    @raise BadRequest: some but not all, or one out of its bounds.
    """
    given = [protocol is not None, id_context is not None, key_ids is not None]
    if not any(given):
        return None
    if not all(given):
        raise BadRequest("protocol, id_context and key_ids come together")
    if protocol not in PROTOCOLS:
        raise BadRequest(f"protocol {protocol[:16]!r} is not one of "
                         f"{', '.join(PROTOCOLS)}")
    if not 0 < len(id_context) <= MAX_ID_CONTEXT_LENGTH:
        raise BadRequest(f"id_context of {len(id_context)} bytes "
                         f"(1..{MAX_ID_CONTEXT_LENGTH} expected)")
    if (len(key_ids) % KEY_ID_LENGTH
            or not 0 < len(key_ids) <= MAX_KEYS * KEY_ID_LENGTH):
        raise BadRequest(f"key_ids of {len(key_ids)} bytes (1 to {MAX_KEYS} "
                         f"ids of {KEY_ID_LENGTH} expected)")
    return FetchTerms(protocol, id_context, tuple(
        key_ids[at:at + KEY_ID_LENGTH]
        for at in range(0, len(key_ids), KEY_ID_LENGTH)))


@attrs.frozen
class FetchAnswer:
    """
    What a node answers to L{FetchSession}.

    @ivar status: one of L{FETCH_STATUSES}.
    @ivar sealed: with C{found} only: the sealed state (L{sslshare.state}),
        at most L{MAX_SEALED} bytes.
    @ivar holder: with C{redirect} only: the node id that holds it now.
    """

    status: str
    sealed: bytes | None = attrs.field(default=None, repr=False)
    holder: str | None = None


class ICommandHandler(Interface):
    """
    What the node behind the channel does with its peers' commands.  The
    C{requester} is the node id from the peer's verified certificate, and
    it was allowed to run the command.  Each method may return its value or
    a L{Deferred} that fires with it.
    """

    def fetch_session(session_id: bytes, requester: str,
                      terms: FetchTerms | None) -> FetchAnswer | Deferred[FetchAnswer]:
        """
        Take the session away from this node for C{requester}, if it can
        resume under C{terms} (C{None}: the requester set none).
        """

    def checkpoint(session_id: bytes, seq: int, digest: bytes,
                   requester: str) -> bool | Deferred[bool]:
        """
        Record a digest checkpoint; whether it was newer than the last one.
        """

    def purge(session_id: bytes, requester: str) -> bool | Deferred[bool]:
        """
        Forget a session; whether there was one.
        """

    def backup(session_id: bytes, sealed: bytes,
               requester: str) -> bool | Deferred[bool]:
        """
        Keep a sealed copy of a session C{requester} holds; whether it was
        kept.
        """

    def stats() -> dict[str, int | float]:
        """
        The node's counters.
        """


# Checks shared by both ends.

def _fetch_answer_problem(status: Any, sealed: Any, holder: Any) -> str | None:
    if status not in FETCH_STATUSES:
        return f"status {status!r} is not one of {', '.join(FETCH_STATUSES)}"
    if status == "found":
        if not isinstance(sealed, bytes) or not 0 < len(sealed) <= MAX_SEALED:
            size = len(sealed) if isinstance(sealed, bytes) else "no"
            return f"found with {size} sealed bytes (1..{MAX_SEALED} expected)"
    elif sealed is not None:
        return f"{status} with a sealed state"
    if status == "redirect":
        if not identity.is_name(holder):
            return f"redirect to {holder!r}, which is not a node id"
    elif holder is not None:
        return f"{status} with a holder"
    return None


def _counters_problem(counters: Any) -> str | None:
    if not isinstance(counters, dict):
        return "counters are not an object"
    for name, value in counters.items():
        if not isinstance(name, str) or isinstance(value, bool) \
                or not isinstance(value, int | float) \
                or (isinstance(value, float) and not math.isfinite(value)):
            return f"counter {name!r} is {value!r}, not a number"
    return None


def _check_session_id(session_id: bytes) -> None:
    if not sessionid.is_session_id(session_id):
        raise BadRequest(f"session id of {len(session_id)} bytes is not an "
                         f"sslshare session id")


# Identity.

def _subject(certificate: x509.Certificate) -> str:
    # Anyone may send a certificate: an unparsable subject is a finding,
    # not a crash.
    try:
        return certificate.subject.rfc4514_string() or "(empty subject)"
    except ValueError:
        return "(unreadable subject)"


def certificate_uris(certificate: x509.Certificate) -> list[str]:
    """
    The URIs in the subject alternative names of C{certificate}.

    @raise PeerIdentityError: the extensions do not parse.
    """
    try:
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except ValueError as e:
        raise PeerIdentityError(
            f"certificate {_subject(certificate)} has unreadable extensions "
            f"({e})") from None
    return names.get_values_for_type(x509.UniformResourceIdentifier)


def node_identity(certificate: x509.Certificate, cluster: str) -> str:
    """
    The node id of C{cluster} that C{certificate} names in its one SAN URI
    C{sslshare://<cluster>/<node id>}.  The certificate must have been
    verified against the cluster CA already: this reads, it does not trust.

    @raise PeerIdentityError: it names no node of C{cluster}, or several,
        or an invalid node id.
    """
    identity.validate_name("cluster name", cluster)
    uris = certificate_uris(certificate)
    ours = []
    for uri in uris:
        try:
            node_id = identity.node_of(uri, cluster)
        except ValueError:
            raise PeerIdentityError(
                f"certificate {_subject(certificate)} names {uri}, whose node "
                f"id is not valid") from None
        if node_id is not None:
            ours.append(node_id)
    if len(ours) != 1:
        named = ", ".join(uris) or "no URI"
        count = "no node" if not ours else "several nodes"
        raise PeerIdentityError(
            f"certificate {_subject(certificate)} names {count} of cluster "
            f"{cluster} ({named})")
    return ours[0]


# OpenSSL's X509_V_ERR_* numbers for the refusals an operator will meet; the
# rest are logged by number.
_NOT_OUR_CA = "not issued by the cluster CA"
_VERIFY_ERRORS = {
    2: f"{_NOT_OUR_CA} (issuer certificate not found)",
    9: "not yet valid",
    10: "expired",
    18: f"{_NOT_OUR_CA} (self-signed)",
    19: f"{_NOT_OUR_CA} (self-signed certificate in the chain)",
    20: f"{_NOT_OUR_CA} (unable to get the local issuer)",
    21: f"{_NOT_OUR_CA} (unable to verify the first certificate)",
    26: "not meant for this purpose (extended key usage)",
}

_VERIFY_MODE = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT


# Why the verify callback refused a connection, until the protocol on top
# asks (L{_refusal}).  Weak: an entry lives no longer than its connection.
_verify_refusals: weakref.WeakKeyDictionary[SSL.Connection, PeerIdentityError] = \
    weakref.WeakKeyDictionary()


def _verifier(check: Callable[[x509.Certificate], object]):
    """
    An OpenSSL verify callback: OpenSSL's chain verdict first, then
    C{check} on the leaf.  A refusal is remembered for the connection and
    fails the handshake the ordinary way, so that OpenSSL sends the peer an
    alert saying why (aborting the connection instead would leave the peer
    guessing, which matters with TLS 1.3, where a client learns of its
    refusal only after its side of the handshake is done).
    """

    def verify(connection: SSL.Connection, certificate: crypto.X509,
               error: int, depth: int, ok: int) -> bool:
        try:
            if ok and depth > 0:
                return True
            try:
                leaf = certificate.to_cryptography()
            except ValueError as e:
                raise PeerIdentityError(
                    f"certificate at depth {depth} does not parse ({e})") from None
            if ok:
                check(leaf)
                return True
            where = "" if depth == 0 else f" (depth {depth} of the chain)"
            problem = PeerIdentityError(
                f"certificate {_subject(leaf)}{where} refused: "
                f"{_VERIFY_ERRORS.get(error, f'X509 verify error {error}')}")
        except PeerIdentityError as e:
            problem = e
        except Exception:
            # An exception must never escape into OpenSSL: it would be
            # lost and the handshake would go on.
            _log.failure("while verifying a peer certificate")
            problem = PeerIdentityError("certificate check failed")
        _verify_refusals[connection] = problem
        return False

    return verify


# The creators read their ClusterTLS's context at each connection, so that
# one adopted by a reload serves every connection made after it.

@implementer(IOpenSSLServerConnectionCreator)
class _ServerCreator:
    def __init__(self, tls: ClusterTLS,
                 admit: Callable[[str, IAddress], None]) -> None:
        self._tls = tls
        self._cluster = tls.cluster
        self._admit = admit

    def serverConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._tls._context, None)
        # The transport is not there yet: the peer's address is read when
        # its certificate is.
        connection.set_verify(_VERIFY_MODE, _verifier(
            lambda leaf: self._admit(node_identity(leaf, self._cluster),
                                     tls_protocol.getPeer())))
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class _ClientCreator:
    def __init__(self, tls: ClusterTLS, peer: str) -> None:
        self._tls = tls
        self._cluster = tls.cluster
        self._peer = peer

    def _check(self, leaf: x509.Certificate) -> None:
        found = node_identity(leaf, self._cluster)
        if found != self._peer:
            raise PeerIdentityError(
                f"certificate {_subject(leaf)} names "
                f"{identity.node_uri(self._cluster, found)}, not "
                f"{identity.node_uri(self._cluster, self._peer)}")

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._tls._context, None)
        connection.set_verify(_VERIFY_MODE, _verifier(self._check))
        return connection


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ClusterTLSError(path, f"cannot read ({e.strerror})") from None


def _load_certificates(path: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(_read(path))
    except ValueError as e:
        raise ClusterTLSError(path, f"not PEM certificates ({e})") from None
    return certificates


class ClusterTLS:
    """
    One node's TLS material for the cluster channel, loaded and checked
    once: the CA file (one or more certificates: the trust roots), the
    node's certificate file (its certificate first, then any chain) and key.

    @ivar cluster: the cluster name.
    @ivar node_id: this node's id, as its certificate names it.
    """

    def __init__(self, ca_path: str, certificate_path: str, key_path: str,
                 cluster: str, node_id: str) -> None:
        """
        @raise ClusterTLSError: a file is unreadable or unusable: the key
            does not match the certificate, the certificate does not name
            C{sslshare://<cluster>/<node_id>}, or it does not chain to the
            CA (or has expired).
        @raise ValueError: C{cluster} or C{node_id} is not a valid name.
        """
        expected = identity.node_uri(cluster, node_id)
        self.cluster = cluster
        self.node_id = node_id
        authorities = _load_certificates(ca_path)
        chain = _load_certificates(certificate_path)
        try:
            key = serialization.load_pem_private_key(_read(key_path), None)
        except (ValueError, TypeError) as e:
            raise ClusterTLSError(
                key_path, f"not an unencrypted PEM private key ({e})") from None
        leaf = chain[0]
        if key.public_key() != leaf.public_key():
            raise ClusterTLSError(key_path, f"is not the key of {certificate_path}")
        try:
            found = node_identity(leaf, cluster)
        except PeerIdentityError as e:
            raise ClusterTLSError(certificate_path, f"{e}; expected {expected}") from None
        if found != node_id:
            raise ClusterTLSError(
                certificate_path,
                f"names {identity.node_uri(cluster, found)}, not {expected}")

        roots = [crypto.X509.from_cryptography(c) for c in authorities]
        extra = [crypto.X509.from_cryptography(c) for c in chain[1:]]
        own = crypto.X509.from_cryptography(leaf)
        # The same check the peers' OpenSSL will make, made now, so that a
        # certificate from the wrong CA is a startup error, not a mystery.
        store = crypto.X509Store()
        for root in roots:
            store.add_cert(root)
        try:
            crypto.X509StoreContext(store, own, extra).verify_certificate()
        except crypto.X509StoreContextError as e:
            raise ClusterTLSError(
                certificate_path, f"does not verify against {ca_path} ({e})") from None

        # cryptography objects where pyOpenSSL takes them (it deprecates its
        # own X509 there); Twisted's trust root still wants its Certificate.
        options = CertificateOptions(
            privateKey=key,
            certificate=leaf,
            extraCertChain=chain[1:],
            trustRoot=trustRootFromCertificates([Certificate(r) for r in roots]),
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )
        # One context serves both roles; per-connection verify callbacks
        # make the difference.
        self._context = options.getContext()

    def __repr__(self) -> str:
        return f"<ClusterTLS {identity.node_uri(self.cluster, self.node_id)}>"

    def server_options(self, admit: Callable[[str, IAddress], None],
                       ) -> IOpenSSLServerConnectionCreator:
        """
        What the AMP listener's L{TLSMemoryBIOFactory} takes: it demands a
        client certificate from the cluster CA naming a node of this
        cluster, and C{admit(node id, peer address)} has the last word
        (L{PeerServerFactory.admit}): it raises L{PeerIdentityError} to
        refuse.
        """
        return _ServerCreator(self, admit)

    def client_options(self, peer_node_id: str) -> IOpenSSLClientConnectionCreator:
        """
        What a connection to C{peer_node_id} takes: it presents this node's
        certificate and accepts only a server certificate from the cluster
        CA naming C{sslshare://<cluster>/<peer_node_id>}.
        """
        identity.validate_name("node id", peer_node_id)
        return _ClientCreator(self, peer_node_id)

    def adopt(self, other: ClusterTLS) -> None:
        """
        Use the CA, certificate and key of C{other} (loaded and checked
        already) from now on: every connection made after this, in either
        direction, through options this object gave out; connections that
        are up keep theirs.  This is how a reload renews the node's
        certificate without dropping its links.

        @raise ValueError: C{other} is for another cluster or node.
        """
        if (other.cluster, other.node_id) != (self.cluster, self.node_id):
            raise ValueError(f"{other!r} cannot replace {self!r}")
        self._context = other._context


# Both ends.

class _HandshakeDeadline:
    """
    Aborts a connection whose TLS handshake is not done in time: a peer
    that connects and says nothing must not hold a connection forever.
    """

    _deadline: Any = None

    def _start_deadline(self, clock: IReactorTime, timeout: float) -> None:
        self._deadline = clock.callLater(timeout, self._deadline_passed)

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        self._handshake_timed_out()
        self.transport.abortConnection()

    def _handshake_timed_out(self) -> None:
        raise NotImplementedError


def _verify_refusal(transport: Any) -> PeerIdentityError | None:
    """
    Why our verify callback refused the connection of C{transport} (a TLS
    protocol), if it did.
    """
    return _verify_refusals.pop(transport.getHandle(), None)


def _refusal(reason: Failure, transport: Any) -> str | None:
    """
    Why the connection of C{transport} (a TLS protocol) ended, if TLS
    refused it: our verify callback's reason, or the alert the peer sent.
    """
    problem = _verify_refusal(transport)
    if problem is not None:
        return str(problem)
    return _tls_failure(reason)


class _BoundedBoxes:
    """
    An AMP protocol whose boxes are bounded (L{MAX_BOX_KEYS},
    L{MAX_BOX_BYTES}) as they arrive: AMP itself keeps a box until its end,
    however long that takes.  The class on top says what a box too large
    means (L{_box_too_large}) and calls L{_drop} when it ends the
    connection.
    """

    state: str
    transport: Any
    _box_keys = 0
    _box_bytes = 0
    _dropped = False

    def stringReceived(self, string: bytes) -> None:
        if self._dropped:
            # The rest of what was read with a box that ended the
            # connection: nothing of it is acted on.
            return
        if self.state == "init":
            self._box_keys = self._box_bytes = 0
        # 2: the length before each key and value.
        self._box_bytes += 2 + len(string)
        if self.state != "value" and string:
            self._box_keys += 1
        if self._box_keys > MAX_BOX_KEYS or self._box_bytes > MAX_BOX_BYTES:
            self._box_too_large(
                f"a box of more than {MAX_BOX_KEYS} keys or {MAX_BOX_BYTES} "
                f"bytes ({self._box_keys} keys and {self._box_bytes} bytes "
                f"so far)")
            return
        super().stringReceived(string)  # type: ignore[misc]

    def _box_too_large(self, what: str) -> None:
        raise NotImplementedError

    def _drop(self) -> None:
        self._dropped = True
        self.transport.abortConnection()


def _tls_failure(reason: Failure) -> str | None:
    """
    C{reason} in words, if it is a TLS failure.
    """
    if reason.check(PeerIdentityError):
        return str(reason.value)
    if reason.check(SSL.Error):
        # pyOpenSSL's message is a list of (library, function, reason).
        try:
            why = "; ".join(entry[2] for entry in reason.value.args[0])
        except (IndexError, TypeError):
            why = reason.getErrorMessage()
        return f"TLS handshake failed ({why or 'connection closed'})"
    return None


# The server.

def _shown_address(address: Any) -> str:
    # A log field: a string survives a JSON log, an IAddress does not.
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@implementer(IHandshakeListener)
class _PeerServerProtocol(_BoundedBoxes, amp.AMP, _HandshakeDeadline):
    factory: PeerServerFactory

    peer_node_id: str | None = None
    _refused = False
    # A failed key check: the connection ends once its answer is out.
    _link_refused = False

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer()
        self.host = getattr(peer, "host", None)
        self._address = _shown_address(peer)
        self.factory._protocols.add(self)
        self._start_deadline(self.factory.clock, self.factory.handshake_timeout)

    def handshakeCompleted(self) -> None:
        self._stop_deadline()
        # The verify callback has checked this already; reading it again
        # from the verified certificate is what sets the identity.
        certificate = self.transport.getPeerCertificate()
        try:
            if certificate is None:
                raise PeerIdentityError("no certificate")
            node_id = node_identity(certificate.to_cryptography(),
                                    self.factory.cluster)
        except PeerIdentityError as e:
            self._refuse(str(e))
            self.transport.abortConnection()
            return
        self.peer_node_id = node_id
        self.factory.counters["connections"] += 1
        _log.info("peer {peer} connected from {address}", peer=node_id,
                  address=self._address)
        # Answers the peer does not take stop this side reading its
        # questions (see pauseProducing).
        self.transport.registerProducer(self, True)

    def pauseProducing(self) -> None:
        """
        The transport's write buffer is over its bound: the peer asks
        faster than it reads the answers.  Reading stops, and so does
        parsing what was read already, until the buffer drains.
        """
        self.factory.counters["reading_paused"] += 1
        super().pauseProducing()

    def _handshake_timed_out(self) -> None:
        self._refused = True
        self.factory.counters["handshake_timeouts"] += 1
        self.factory.warn("handshake_timeouts",
                          "dropped connection from {address}: no TLS "
                          "handshake in {timeout} s", address=self._address,
                          timeout=self.factory.handshake_timeout)

    def _refuse(self, reason: str, counter: str = "refused_connections") -> None:
        self._refused = True
        self.factory.counters[counter] += 1
        self.factory.warn(counter, "refused connection from {address}: {reason}",
                          address=self._address, reason=reason)

    def connectionLost(self, reason: Failure) -> None:
        self._stop_deadline()
        self.factory._protocols.discard(self)
        if self.peer_node_id is None and not self._refused:
            problem = _verify_refusal(self.transport)
            why = _tls_failure(reason) if problem is None else str(problem)
            if why is not None:
                self._refuse(why, problem.counter if isinstance(
                    problem, NodeRefused) else "refused_connections")
        super().connectionLost(reason)

    def locateResponder(self, name: bytes) -> Any:
        # Only the channel's commands: not AMP's built-in StartTLS, which
        # would try to start TLS inside TLS.
        if name not in _COMMAND_NAMES:
            self.factory.counters["unknown_commands"] += 1
            self.factory.warn("unknown_commands",
                              "unknown command {command!r} from {peer} at "
                              "{address}", command=name[:64],
                              peer=self.peer_node_id or "(unknown)",
                              address=self._address)
            return None
        responder = super().locateResponder(name)

        def parsed(box: amp.AmpBox) -> Any:
            # AMP parses the arguments before the responder runs; what it
            # cannot parse (a missing argument, an integer that is not one)
            # is the asker's fault, not ours: BAD_REQUEST, and the
            # connection stays up.
            try:
                return responder(box)
            except (KeyError, ValueError, TypeError) as e:
                command: type[amp.Command]
                if name == KeyCheck.commandName:
                    # Open to every peer the handshake admitted.
                    command = KeyCheck
                else:
                    command = COMMANDS[name.decode("ascii")]
                    try:
                        self._authorize(command)
                    except NotAuthorized as refusal:
                        raise amp.RemoteAmpError(b"NOT_AUTHORIZED",
                                                 str(refusal)) from None
                raise amp.RemoteAmpError(
                    b"BAD_REQUEST", str(self._bad_request(
                        command, f"unreadable arguments "
                                 f"({type(e).__name__}: {e})"[:200]))) from None

        return parsed

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        # This side never asks, so no answer is due to it (AMP would raise
        # out of dataReceived on an answer to no question, or a box that is
        # neither); and our peers ask every question with _ask (AMP would
        # log the failure of one without as an unhandled error).
        if (amp.COMMAND not in box or amp.ASK not in box
                or amp.ANSWER in box or amp.ERROR in box):
            self._protocol_error(f"a box that is not a question (keys "
                                 f"{sorted(box)[:8]!r})")
            return
        super().ampBoxReceived(box)
        if self._link_refused:
            # The answer of the failed key check is written already.
            self._dropped = True
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def lengthLimitExceeded(self, length: int) -> None:
        self._protocol_error(f"a key of {length} bytes (AMP allows 255)")

    def _box_too_large(self, what: str) -> None:
        self._protocol_error(what)

    def _protocol_error(self, what: str) -> None:
        """
        The peer broke AMP itself: count it, say so, and drop it.
        """
        self.factory.counters["protocol_errors"] += 1
        self.factory.warn("protocol_errors",
                          "dropped {peer} at {address}: it sent {what}",
                          peer=self.peer_node_id or "(unknown)",
                          address=self._address, what=what)
        self._drop()

    def _authorize(self, command: type[amp.Command]) -> str:
        """
        The requester's node id, if it may run C{command}; the first thing
        every responder does.
        """
        name = command.__name__
        peer = self.peer_node_id
        if peer is None or not self.factory.allowed(name, peer):
            self.factory.counters["refused_commands"] += 1
            self.factory.warn("refused_commands",
                              "refused {command} from {peer} at {address}: "
                              "not authorized", command=name,
                              peer=peer or "(unknown)", address=self._address)
            raise NotAuthorized(f"{peer or 'an unidentified peer'} may not "
                                f"call {name} on {self.factory.node_id}")
        self.factory.counters[f"commands:{name}"] += 1
        return peer

    def _bad_request(self, command: type[amp.Command], reason: str) -> BadRequest:
        self.factory.counters["bad_requests"] += 1
        self.factory.warn("bad_requests", "bad {command} from {peer}: {reason}",
                          command=command.__name__, peer=self.peer_node_id,
                          reason=reason)
        return BadRequest(reason)

    def _session_id(self, command: type[amp.Command], session_id: bytes) -> None:
        try:
            _check_session_id(session_id)
        except BadRequest as e:
            raise self._bad_request(command, str(e)) from None

    @KeyCheck.responder
    def _key_check(self, key_id: bytes, proof: bytes) -> dict[str, Any]:
        peer = self.peer_node_id
        # TLS delivers no box before the handshake, which set it.
        assert peer is not None
        node_id = self.factory.node_id
        keys = self.factory.keys()
        connection = self.transport.getHandle()
        problem = _key_problem(
            keys, peer, node_id, key_id,
            _key_check_message(connection, b"client", self.factory.cluster,
                               peer, node_id), proof)
        if problem is not None:
            self._link_refused = True
            self.factory.counters["key_mismatches"] += 1
            self.factory.warn("key_mismatches",
                              "refused the link of peer {peer} at {address}: "
                              "{reason}", peer=peer, address=self._address,
                              reason=problem)
            raise KeyMismatch(problem)
        own_key_id, own_proof = keys.prove(_key_check_message(
            connection, b"server", self.factory.cluster, peer, node_id))
        return {"key_id": own_key_id, "proof": own_proof}

    @FetchSession.responder
    async def _fetch_session(self, session_id: bytes,
                             protocol: str | None = None,
                             id_context: bytes | None = None,
                             key_ids: bytes | None = None) -> dict[str, Any]:
        requester = self._authorize(FetchSession)
        self._session_id(FetchSession, session_id)
        try:
            terms = _fetch_terms(protocol, id_context, key_ids)
        except BadRequest as e:
            raise self._bad_request(FetchSession, str(e)) from None
        answer = await maybeDeferred(self.factory.handler.fetch_session,
                                     session_id, requester, terms)
        if not isinstance(answer, FetchAnswer):
            raise TypeError(f"fetch_session answered {type(answer).__name__}")
        problem = _fetch_answer_problem(answer.status, answer.sealed, answer.holder)
        if problem is not None:
            # Our own handler's fault: logged here as AMP's unknown error.
            raise ValueError(f"fetch_session answered {problem}")
        response: dict[str, Any] = {"status": answer.status}
        if answer.sealed is not None:
            response["sealed"] = answer.sealed
        if answer.holder is not None:
            response["holder"] = answer.holder
        return response

    @Checkpoint.responder
    async def _checkpoint(self, session_id: bytes, seq: int,
                          digest: bytes) -> dict[str, Any]:
        requester = self._authorize(Checkpoint)
        self._session_id(Checkpoint, session_id)
        problem = checkpoint_problem(seq, digest)
        if problem is not None:
            raise self._bad_request(Checkpoint, problem)
        accepted = await maybeDeferred(self.factory.handler.checkpoint,
                                       session_id, seq, digest, requester)
        return {"accepted": bool(accepted)}

    @Backup.responder
    async def _backup(self, session_id: bytes, sealed: bytes) -> dict[str, Any]:
        requester = self._authorize(Backup)
        self._session_id(Backup, session_id)
        if not 0 < len(sealed) <= MAX_SEALED:
            raise self._bad_request(
                Backup, f"sealed state of {len(sealed)} bytes "
                f"(1..{MAX_SEALED} expected)")
        kept = await maybeDeferred(self.factory.handler.backup,
                                   session_id, sealed, requester)
        return {"kept": bool(kept)}

    @Purge.responder
    async def _purge(self, session_id: bytes) -> dict[str, Any]:
        requester = self._authorize(Purge)
        self._session_id(Purge, session_id)
        removed = await maybeDeferred(self.factory.handler.purge,
                                      session_id, requester)
        return {"removed": bool(removed)}

    @Stats.responder
    def _stats(self) -> dict[str, Any]:
        self._authorize(Stats)
        counters = dict(self.factory.handler.stats())
        counters.update(self.factory.stats())
        problem = _counters_problem(counters)
        if problem is not None:
            raise ValueError(f"stats answered {problem}")
        return {"counters": json.dumps(counters, sort_keys=True, allow_nan=False)}


class PeerServerFactory(Factory):
    """
    The AMP side of the channel that answers peers.  Listen with it wrapped
    in TLS::

        TLSMemoryBIOFactory(cluster_tls.server_options(factory.admit),
                            False, factory)

    @ivar counters: C{connections} (identified peers), C{refused_connections},
        C{refused_nodes} (nodes of the cluster that are not peers),
        C{duplicate_nodes} (a node id connected from another host
        already), C{handshake_timeouts}, C{key_mismatches},
        C{refused_commands}, C{bad_requests}, C{unknown_commands},
        C{protocol_errors} (boxes AMP cannot take, which end the
        connection), C{reading_paused} (times reading stopped while a
        peer's answers waited), and C{commands:<name>} for each command
        let through.
    @ivar peers: the node ids of the peers, which may connect (and this
        node, which may ask for its own L{Stats}).

    Stopping the last listener that uses the factory also closes the
    connections it accepted: a node that stops listening answers no one.
    """

    protocol = _PeerServerProtocol

    def __init__(self, handler: ICommandHandler, cluster: str, node_id: str,
                 allowed: Callable[[str, str], bool], *,
                 peers: Iterable[str], keys: Callable[[], StateKeys],
                 clock: IReactorTime | None = None,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT) -> None:
        """
        @param handler: what runs the commands.
        @param cluster: the cluster name: only its nodes are accepted.
        @param node_id: this node's id (for the log and error messages).
        @param allowed: C{(command name, requester node id) -> bool}, asked
            before every command (names are the keys of L{COMMANDS}).
        @param peers: the node ids that may connect, besides this node.
        @param keys: the node's state keys now, for L{KeyCheck}.
        @param handshake_timeout: seconds a connection may take to finish
            its TLS handshake.
        """
        identity.validate_name("cluster name", cluster)
        identity.validate_name("node id", node_id)
        if clock is None:
            from twisted.internet import reactor as clock
        self.handler = handler
        self.cluster = cluster
        self.node_id = node_id
        self.allowed = allowed
        self.peers = frozenset(peers)
        self.keys = keys
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.counters: Counter[str] = Counter()
        self._protocols: set[_PeerServerProtocol] = set()
        self._warnings: dict[str, RateLimitedWarning] = {}

    def warn(self, kind: str, format: str, **fields: Any) -> None:
        """
        Log a warning a remote can repeat at will at a bounded rate, apart
        for each C{kind} (a counter name), so that a flood of one kind
        hides no other.
        """
        if kind not in self._warnings:
            self._warnings[kind] = RateLimitedWarning(self.clock, log=_log)
        self._warnings[kind].warn(format, **fields)

    def admit(self, node_id: str, address: IAddress) -> None:
        """
        Refuse node C{node_id}, connecting from C{address} with a verified
        certificate, unless it is a peer (or this node) and is not
        connected from another host already.

        @raise NodeRefused: it may not, and why.
        """
        if node_id != self.node_id and node_id not in self.peers:
            raise NodeRefused(
                "refused_nodes", f"node {node_id} is not a peer of "
                                 f"{self.node_id} (cluster.peers)")
        host = getattr(address, "host", None)
        for protocol in self._protocols:
            if protocol.peer_node_id == node_id and protocol.host != host:
                raise NodeRefused(
                    "duplicate_nodes",
                    f"node {node_id} is connected from {protocol._address} "
                    f"already, and {_shown_address(address)} claims its id "
                    f"too: two nodes have the same id")

    def stats(self) -> dict[str, int]:
        """
        The channel's counters, named C{cluster.<counter>}.
        """
        return {f"cluster.{name}": count
                for name, count in self.counters.items()}

    def connected_peers(self) -> set[str]:
        """
        The node ids of the peers connected to this node right now.
        """
        return {protocol.peer_node_id for protocol in self._protocols
                if getattr(protocol, "peer_node_id", None) is not None}

    def stopFactory(self) -> None:
        # Aborted, not closed: a TLS close waits for the peer's close_notify,
        # and a stalled peer would keep the connection open.
        for protocol in list(self._protocols):
            protocol.transport.abortConnection()


# The client.

@implementer(IHandshakeListener)
class _PeerClientProtocol(_BoundedBoxes, amp.AMP, _HandshakeDeadline):
    def __init__(self, link: PeerLink) -> None:
        super().__init__()
        self._link = link
        # Whether the link is set up: TLS, then the key check.
        self.handshake_done = False
        # Whether the peer has answered anything on this connection: proof
        # that it accepted our certificate (see PeerLink._lost).
        self.answered = False
        # Why this side ended the connection, if it did.
        self._refusal: str | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_deadline(self._link.clock, self._link.handshake_timeout)

    def handshakeCompleted(self) -> None:
        # The handshake deadline runs on until the key check is done.
        link = self._link
        connection = self.transport.getHandle()
        keys = link.keys()

        def message(role: bytes) -> bytes:
            return _key_check_message(connection, role, link.cluster,
                                      link.node_id, link.peer_node_id)

        def checked(answer: dict[str, Any]) -> None:
            problem = _key_problem(keys, link.peer_node_id, link.node_id,
                                   answer["key_id"], message(b"server"),
                                   answer["proof"])
            if problem is not None:
                self._refuse(problem)
                return
            self._stop_deadline()
            self.handshake_done = True
            link._ready(self)

        def failed(reason: Failure) -> None:
            if reason.check(ConnectionClosed, SSL.Error):
                # connectionLost says why.
                return
            self._refuse(f"{link.peer_node_id} refused the key check of "
                         f"{link.node_id} ({reason.getErrorMessage()})")

        key_id, proof = keys.prove(message(b"client"))
        self.callRemote(KeyCheck, key_id=key_id, proof=proof).addCallbacks(
            checked, failed)

    def _refuse(self, reason: str) -> None:
        self._link.counters["key_mismatches"] += 1
        self._refusal = reason
        self.transport.abortConnection()

    def _handshake_timed_out(self) -> None:
        _log.warn("peer {peer}: no TLS handshake and key check in "
                  "{timeout} s", peer=self._link.peer_node_id,
                  timeout=self._link.handshake_timeout)

    def _box_too_large(self, what: str) -> None:
        self._link.counters["protocol_errors"] += 1
        _log.warn("dropped the connection to peer {peer}: it sent {what}",
                  peer=self._link.peer_node_id, what=what)
        self._drop()

    def connectionLost(self, reason: Failure) -> None:
        self._stop_deadline()
        refusal = _refusal(reason, self.transport) or self._refusal
        super().connectionLost(reason)
        self._link._lost(self, reason, refusal)

    def locateResponder(self, name: bytes) -> Any:
        # Peers ask us through our own server, never through this link.
        return None


class _LinkFactory(Factory):
    def __init__(self, link: PeerLink) -> None:
        self._link = link

    def buildProtocol(self, addr: Any) -> _PeerClientProtocol:
        return _PeerClientProtocol(self._link)


@implementer(IStreamClientEndpoint)
class _ObservedEndpoint:
    """
    An endpoint that tells its link about failed connection attempts, which
    L{ClientService} otherwise keeps to itself.
    """

    def __init__(self, wrapped: IStreamClientEndpoint,
                 failed: Callable[[Failure], None]) -> None:
        self._wrapped = wrapped
        self._failed = failed

    def connect(self, factory: Any) -> Deferred:
        def observe(reason: Failure) -> Failure:
            # A cancelled attempt is the link stopping, not the peer failing.
            if not reason.check(CancelledError, ConnectingCancelledError):
                self._failed(reason)
            return reason

        return self._wrapped.connect(factory).addErrback(observe)


def default_retry_policy() -> Callable[[int], float]:
    """
    Reconnection delays: 0.2 s doubling up to 30 s, plus up to 0.2 s of
    jitter so that a restarted node is not hit by all its peers at once.
    """
    return backoffPolicy(initialDelay=0.2, maxDelay=30.0, factor=2.0,
                         jitter=lambda: random.random() * 0.2)


class PeerLink(Service):
    """
    The connection to one peer, kept up in the background.

    @ivar peer_node_id: the peer; also this service's name.
    @ivar endpoint: the endpoint string or endpoint the link was made with.
    @ivar counters: C{connects}, C{disconnects}, C{failed_attempts},
        C{key_mismatches} (connections ended by the key check),
        C{protocol_errors} (connections ended by a box too large),
        C{unavailable} (calls refused because not connected),
        C{unanswered_bound} (fetches refused because too many wait),
        C{call_timeouts} (calls the peer did not answer in time).
    """

    def __init__(self, peer_node_id: str,
                 endpoint: str | IStreamClientEndpoint, tls: ClusterTLS, *,
                 keys: Callable[[], StateKeys],
                 reactor: Any = None,
                 retry_policy: Callable[[int], float] | None = None,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 max_unanswered_fetches: int | None = None,
                 call_timeout: float = DEFAULT_CALL_TIMEOUT) -> None:
        """
        @param endpoint: a client endpoint string (C{"tcp:host=...:port=..."})
            or endpoint for the peer's AMP listener; TLS is added here.
        @param keys: the node's state keys now, for L{KeyCheck}.
        @param retry_policy: seconds to wait before attempt N (1, 2, ...),
            as for L{ClientService}; the attempt number also counts the
            connections in a row that the peer refused at TLS.  Default:
            L{default_retry_policy}.
        @param max_unanswered_fetches: how many L{FetchSession} questions
            may wait for the peer's answer at once; past it L{call} fails
            at once.  A question whose asker gave up still counts until
            the peer answers or the connection ends: a peer that takes
            questions and never answers must not pile them up without
            bound.  C{None}: no bound.
        @param call_timeout: seconds the peer has to answer a command other
            than L{FetchSession}.
        """
        if reactor is None:
            from twisted.internet import reactor
        self.call_timeout = call_timeout
        self.max_unanswered_fetches = max_unanswered_fetches
        self._unanswered_fetches = 0
        self.peer_node_id = identity.validate_name("node id", peer_node_id)
        self.name = peer_node_id
        self.cluster = tls.cluster
        self.node_id = tls.node_id
        self.keys = keys
        # As given: what a reconfiguration compares.
        self.endpoint = endpoint
        self.clock = reactor
        self.handshake_timeout = handshake_timeout
        self.counters: Counter[str] = Counter()
        if isinstance(endpoint, str):
            endpoint = clientFromString(reactor, endpoint)
        self._endpoint = _ObservedEndpoint(
            wrapClientTLS(tls.client_options(peer_node_id), endpoint),
            lambda reason: self._attempt_failed(reason.getErrorMessage()))
        policy = retry_policy or default_retry_policy()
        self._protocol: _PeerClientProtocol | None = None
        # Connections in a row that the peer refused (see _lost).
        # ClientService restarts its own count at every TCP connection, so
        # without this a peer that refuses our certificate would be retried
        # at the shortest delay forever.
        self._refusals = 0
        self._waiters: list[list[Any]] = []
        self._client = ClientService(
            self._endpoint, _LinkFactory(self),
            retryPolicy=lambda attempt: policy(attempt + self._refusals),
            clock=reactor)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "not connected"
        return f"<PeerLink {self.peer_node_id} {state}>"

    @property
    def connected(self) -> bool:
        """
        Whether the peer can be asked right now: TLS is up, the peer's
        certificate names the expected node, and the key check passed.
        """
        return self._protocol is not None

    def startService(self) -> None:
        super().startService()
        self._client.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        stopped = self._client.stopService()
        self._fail_waiters(lambda remaining: True, "link stopped")
        return stopped

    def call(self, command: type[amp.Command], **arguments: Any) -> Deferred[dict[str, Any]]:
        """
        Send C{command} to the peer.  Fails at once with L{PeerUnavailable}
        when not connected; fails with it too if the connection ends before
        the answer, or, for commands other than L{FetchSession}, if no
        answer comes within the call timeout.  Cancelling the Deferred
        abandons the answer.
        """
        protocol = self._protocol
        if protocol is None:
            self.counters["unavailable"] += 1
            return fail(PeerUnavailable(self.peer_node_id, "not connected"))

        def answered(response: dict[str, Any]) -> dict[str, Any]:
            protocol.answered = True
            return response

        def lost(reason: Failure) -> Failure:
            if reason.check(CancelledError):
                return reason
            if reason.check(ConnectionClosed, SSL.Error, PeerIdentityError):
                why = _tls_failure(reason) or reason.getErrorMessage()
                raise PeerUnavailable(
                    self.peer_node_id, f"connection lost before the answer ({why})")
            # An error answer (NOT_AUTHORIZED...) is an answer too.
            protocol.answered = True
            return reason

        if command is not FetchSession:
            def timed_out(result: Any, timeout: float) -> Failure:
                self.counters["call_timeouts"] += 1
                return Failure(PeerUnavailable(
                    self.peer_node_id,
                    f"no answer to {command.__name__} in {timeout} s"))

            return protocol.callRemote(command, **arguments).addCallbacks(
                answered, lost).addTimeout(self.call_timeout, self.clock,
                                           onTimeoutCancel=timed_out)
        if (self.max_unanswered_fetches is not None
                and self._unanswered_fetches >= self.max_unanswered_fetches):
            self.counters["unanswered_bound"] += 1
            return fail(PeerUnavailable(
                self.peer_node_id, f"{self._unanswered_fetches} questions "
                                   f"are still unanswered"))
        self._unanswered_fetches += 1
        # AMP's own Deferred fires when the peer answers or the connection
        # ends, whatever the asker does; the asker gets another one, which
        # it may cancel.
        asker: Deferred[dict[str, Any]] = Deferred()

        def settled(result: dict[str, Any] | Failure) -> None:
            self._unanswered_fetches -= 1
            if asker.called:
                return
            if isinstance(result, Failure):
                asker.errback(result)
            else:
                asker.callback(result)

        protocol.callRemote(command, **arguments).addCallbacks(
            answered, lost).addBoth(settled)
        return asker

    def when_connected(self, fail_after_failures: int | None = None) -> Deferred[None]:
        """
        Fires when the link is connected (at once if it is).

        @param fail_after_failures: fail with L{PeerUnavailable} after this
            many failed connection attempts (TCP or TLS); C{None}: wait.
        """
        if self._protocol is not None:
            return succeed(None)
        waiter: list[Any] = []
        waiting: Deferred[None] = Deferred(lambda d: self._waiters.remove(waiter))
        waiter.extend([waiting, fail_after_failures])
        self._waiters.append(waiter)
        return waiting

    def _ready(self, protocol: _PeerClientProtocol) -> None:
        self._protocol = protocol
        self.counters["connects"] += 1
        _log.info("connected to peer {peer}", peer=self.peer_node_id)
        waiters, self._waiters = self._waiters, []
        for waiting, _ in waiters:
            waiting.callback(None)

    def _lost(self, protocol: _PeerClientProtocol, reason: Failure,
              refusal: str | None) -> None:
        """
        The connection of C{protocol} ended, C{refusal} says why if TLS or
        the key check refused it.  It counts as a failed attempt when it
        ended before the link was set up (handshake and key check), and
        also when a TLS alert ended it before the peer
        answered anything: with TLS 1.3 the server judges our certificate
        after our side of the handshake is done, so its refusal arrives as
        an alert on a connection that looked up.
        """
        if protocol is self._protocol:
            self._protocol = None
        if not self.running:
            # Our own stopService closed it: nothing to report.
            return
        was_ready = protocol.handshake_done
        if not was_ready or (refusal is not None and not protocol.answered):
            self._refusals += 1
            if was_ready:
                self.counters["disconnects"] += 1
            self._attempt_failed(refusal or reason.getErrorMessage())
            return
        self._refusals = 0
        self.counters["disconnects"] += 1
        _log.info("lost peer {peer}: {reason}", peer=self.peer_node_id,
                  reason=reason.getErrorMessage())

    def _attempt_failed(self, why: str) -> None:
        self.counters["failed_attempts"] += 1
        _log.warn("cannot connect to peer {peer}: {reason}",
                  peer=self.peer_node_id, reason=why)
        self._fail_waiters(lambda remaining: remaining is not None and remaining <= 1,
                           why)
        for waiter in self._waiters:
            if waiter[1] is not None:
                waiter[1] -= 1

    def _fail_waiters(self, done: Callable[[int | None], bool], reason: str) -> None:
        failing = [waiter for waiter in self._waiters if done(waiter[1])]
        self._waiters = [waiter for waiter in self._waiters if not done(waiter[1])]
        for waiting, _ in failing:
            waiting.errback(PeerUnavailable(self.peer_node_id, reason))


class Peers(MultiService):
    """
    A L{PeerLink} for every peer of this node.
    """

    def __init__(self, peers: Iterable[tuple[str, str | IStreamClientEndpoint]],
                 tls: ClusterTLS, *, keys: Callable[[], StateKeys],
                 reactor: Any = None,
                 retry_policy: Callable[[int], float] | None = None,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 max_unanswered_fetches: int | None = None,
                 call_timeout: float = DEFAULT_CALL_TIMEOUT) -> None:
        """
        @param peers: (node id, client endpoint string or endpoint) pairs.
        @param keys: the node's state keys now (see L{PeerLink}).
        @param max_unanswered_fetches: the bound of each link (see
            L{PeerLink}).
        @param call_timeout: the call timeout of each link (see
            L{PeerLink}).
        @raise ValueError: a peer is listed twice, or is this node itself.
        """
        super().__init__()
        self._tls = tls
        self._link_options = {"keys": keys, "reactor": reactor,
                              "retry_policy": retry_policy,
                              "handshake_timeout": handshake_timeout,
                              "max_unanswered_fetches": max_unanswered_fetches,
                              "call_timeout": call_timeout}
        for link in self._new_links(peers):
            link.setServiceParent(self)

    def _new_links(self, peers: Iterable[tuple[str, str | IStreamClientEndpoint]],
                   ) -> list[PeerLink]:
        links: list[PeerLink] = []
        for node_id, endpoint in peers:
            if node_id == self._tls.node_id:
                raise ValueError(f"node {node_id} cannot be its own peer")
            if node_id in (link.peer_node_id for link in links):
                raise ValueError(f"peer {node_id} listed twice")
            links.append(PeerLink(node_id, endpoint, self._tls,
                                  **self._link_options))
        return links

    def reconfigure(self, peers: Iterable[tuple[str, str | IStreamClientEndpoint]],
                    ) -> tuple[list[str], list[str]]:
        """
        Make the peers those of C{peers}: links to new peers start, links
        to peers no longer listed (or listed with another endpoint) stop
        and close their connection; the others stay up, untouched.

        @return: the node ids whose link started, and those whose link
            stopped (a changed endpoint is in both).
        @raise ValueError: as the constructor; nothing has changed then.
        """
        wanted = {link.peer_node_id: link for link in self._new_links(peers)}
        removed = [link for link in self.services
                   if wanted.get(link.peer_node_id) is None
                   or wanted[link.peer_node_id].endpoint != link.endpoint]
        added = [link for node_id, link in wanted.items()
                 if node_id not in self.namedServices
                 or self.namedServices[node_id] in removed]
        for link in removed:
            link.disownServiceParent()
        for link in added:
            link.setServiceParent(self)
        return ([link.peer_node_id for link in added],
                [link.peer_node_id for link in removed])

    def link(self, node_id: str) -> PeerLink | None:
        """
        The link to C{node_id}, or C{None} if it is not a peer.
        """
        return self.namedServices.get(node_id)

    @property
    def links(self) -> tuple[PeerLink, ...]:
        return tuple(self.services)

    def connected_count(self) -> int:
        """
        How many peers are connected now.
        """
        return sum(1 for link in self.services if link.connected)

    def fetch_session(self, node_id: str, session_id: bytes,
                      terms: FetchTerms | None = None) -> Deferred[FetchAnswer]:
        """
        L{fetch_from} the link to C{node_id}; L{PeerUnavailable} if there
        is none.
        """
        return self._call(node_id, lambda link, sid: fetch_from(
            link, sid, terms), session_id)

    def backup_session(self, node_id: str, session_id: bytes,
                       sealed: bytes) -> Deferred[bool]:
        """
        Give C{node_id} a sealed copy of C{session_id} to keep; fires with
        whether it kept it.
        """
        return self._call(node_id, lambda link, sid: _boolean(
            link, Backup, "kept", session_id=sid, sealed=sealed), session_id)

    def checkpoint_session(self, node_id: str, session_id: bytes, seq: int,
                           digest: bytes) -> Deferred[bool]:
        """
        Send C{node_id} the digest checkpoint of C{session_id}; fires with
        whether it was newer than the one it had.
        """
        return self._call(node_id, lambda link, sid: _boolean(
            link, Checkpoint, "accepted", session_id=sid, seq=seq,
            digest=digest), session_id)

    def purge_session(self, node_id: str, session_id: bytes) -> Deferred[bool]:
        """
        Tell C{node_id} to drop C{session_id}; fires with whether it held
        it.  A purge is what keeps a session in one place, so a peer whose
        link is down now (as right after it restarted) gets it once the
        link is back; L{PeerUnavailable} if it is not a peer, or if the link
        fails L{PURGE_CONNECT_ATTEMPTS} more times (a peer that stays down
        lost what it held).
        """
        link = self.link(node_id)
        if link is None:
            return fail(PeerUnavailable(node_id, "not a peer of this node"))
        return link.when_connected(PURGE_CONNECT_ATTEMPTS).addCallback(
            lambda _: purge_on(link, session_id))

    def _call(self, node_id: str, operation: Callable[[PeerLink, bytes], Deferred[Any]],
              session_id: bytes) -> Deferred[Any]:
        link = self.link(node_id)
        if link is None:
            return fail(PeerUnavailable(node_id, "not a peer of this node"))
        return operation(link, session_id)


# What the recovery chain and the CLI call.

def purge_on(link: PeerLink, session_id: bytes) -> Deferred[bool]:
    """
    Ask the peer behind C{link} to drop C{session_id}; fires with whether
    it held it.
    """
    return _boolean(link, Purge, "removed", session_id=session_id)


def _boolean(link: PeerLink, command: type[amp.Command], answer: str,
             **arguments: Any) -> Deferred[bool]:
    try:
        _check_session_id(arguments["session_id"])
    except BadRequest as e:
        return fail(e)

    def checked(response: dict[str, Any]) -> bool:
        value = response.get(answer)
        if not isinstance(value, bool):
            raise PeerProtocolError(
                f"peer {link.peer_node_id} answered {command.__name__} "
                f"with {answer}={value!r}")
        return value

    return link.call(command, **arguments).addCallback(checked)


def fetch_from(link: PeerLink, session_id: bytes,
               terms: FetchTerms | None = None) -> Deferred[FetchAnswer]:
    """
    Ask C{link}'s peer for C{session_id}, if it can resume under C{terms}.

    @return: fires with the peer's L{FetchAnswer}, checked; fails with
        L{PeerUnavailable}, L{NotAuthorized}, L{BadRequest}, or
        L{PeerProtocolError} when the answer breaks the protocol.
    """
    try:
        _check_session_id(session_id)
    except BadRequest as e:
        return fail(e)

    def garbled(reason: Failure) -> Failure:
        # AMP could not even parse the answer: a required field is absent
        # (KeyError) or a text field is not UTF-8 (UnicodeDecodeError).
        if reason.check(KeyError, ValueError):
            raise PeerProtocolError(
                f"peer {link.peer_node_id} answered FetchSession "
                f"{sessionid.describe(session_id)} with an unreadable box "
                f"({reason.getErrorMessage()})")
        return reason

    def checked(response: dict[str, Any]) -> FetchAnswer:
        status = response.get("status")
        sealed = response.get("sealed")
        holder = response.get("holder")
        problem = _fetch_answer_problem(status, sealed, holder)
        if problem is not None:
            raise PeerProtocolError(
                f"peer {link.peer_node_id} answered FetchSession "
                f"{sessionid.describe(session_id)} with {problem}")
        return FetchAnswer(status, sealed, holder)

    arguments = {} if terms is None else terms.arguments()
    return link.call(FetchSession, session_id=session_id,
                     **arguments).addCallbacks(checked, garbled)


def stats_from(link: PeerLink) -> Deferred[dict[str, int | float]]:
    """
    The counters of C{link}'s peer, checked (a JSON object of numbers).
    """
    def garbled(reason: Failure) -> Failure:
        if reason.check(KeyError, ValueError):
            raise PeerProtocolError(
                f"peer {link.peer_node_id} answered Stats with an unreadable "
                f"box ({reason.getErrorMessage()})")
        return reason

    def checked(response: dict[str, Any]) -> dict[str, int | float]:
        try:
            counters = json.loads(response["counters"])
        except ValueError as e:
            raise PeerProtocolError(
                f"peer {link.peer_node_id} answered Stats with bad JSON ({e})") from None
        problem = _counters_problem(counters)
        if problem is not None:
            raise PeerProtocolError(
                f"peer {link.peer_node_id} answered Stats: {problem}")
        return counters

    return link.call(Stats).addCallbacks(checked, garbled)
