"""
The channel's mutual TLS: a node's identity read from its verified
certificate, the verify callback, and one node's TLS material
(L{ClusterTLS}).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IAddress,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from sslshare import identity
from sslshare.cluster._errors import (
    ClusterKeyMismatch,
    ClusterTLSError,
    PeerIdentityError,
)
from sslshare.errors import read_bytes

_log = Logger()


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
# asks (L{refusal_of}).  Weak: an entry lives no longer than its connection.
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

    def serverConnectionForTLS(self, tls_protocol: TLSMemoryBIOProtocol,
                               ) -> SSL.Connection:
        connection = SSL.Connection(self._tls._context, None)
        # The transport is not there yet: the peer's address is read when
        # its certificate is.
        connection.set_verify(_VERIFY_MODE, _verifier(
            lambda leaf: self._admit(node_identity(leaf, self._cluster),
                                     tls_protocol.getPeer())))
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class _ClientCreator:
    def __init__(self, tls: ClusterTLS, peer: str | None) -> None:
        self._tls = tls
        self._cluster = tls.cluster
        self._peer = peer

    def _check(self, leaf: x509.Certificate) -> None:
        found = node_identity(leaf, self._cluster)
        if self._peer is not None and found != self._peer:
            raise PeerIdentityError(
                f"certificate {_subject(leaf)} names "
                f"{identity.node_uri(self._cluster, found)}, not "
                f"{identity.node_uri(self._cluster, self._peer)}")

    def clientConnectionForTLS(self, tls_protocol: TLSMemoryBIOProtocol,
                               ) -> SSL.Connection:
        connection = SSL.Connection(self._tls._context, None)
        connection.set_verify(_VERIFY_MODE, _verifier(self._check))
        return connection


def _load_certificates(path: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(read_bytes(path, ClusterTLSError))
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
            key = serialization.load_pem_private_key(read_bytes(key_path, ClusterTLSError), None)
        except (ValueError, TypeError) as e:
            raise ClusterTLSError(
                key_path, f"not an unencrypted PEM private key ({e})") from None
        leaf = chain[0]
        if key.public_key() != leaf.public_key():
            raise ClusterKeyMismatch(key_path, certificate_path)
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
        # own X509 there), though Twisted's annotations still name pyOpenSSL's
        # types; Twisted's trust root still wants its Certificate.
        options = CertificateOptions(
            privateKey=key,  # type: ignore[arg-type]
            certificate=leaf,  # type: ignore[arg-type]
            extraCertChain=chain[1:],  # type: ignore[arg-type]
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

    def client_options(self, peer_node_id: str | None
                       ) -> IOpenSSLClientConnectionCreator:
        """
        What a connection to C{peer_node_id} takes: it presents this node's
        certificate and accepts only a server certificate from the cluster
        CA naming C{sslshare://<cluster>/<peer_node_id>}; with C{None},
        naming any node of the cluster (to learn which one answers at an
        address, L{sslshare.cluster._discovery.identify}).
        """
        if peer_node_id is not None:
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


def verify_refusal(transport: TLSMemoryBIOProtocol) -> PeerIdentityError | None:
    """
    Why our verify callback refused the connection of C{transport} (a TLS
    protocol), if it did.
    """
    return _verify_refusals.pop(transport.getHandle(), None)


def refusal_of(reason: Failure,
               transport: TLSMemoryBIOProtocol) -> str | None:
    """
    Why the connection of C{transport} (a TLS protocol) ended, if TLS
    refused it: our verify callback's reason, or the alert the peer sent.
    """
    problem = verify_refusal(transport)
    if problem is not None:
        return str(problem)
    return tls_failure(reason)


def tls_failure(reason: Failure) -> str | None:
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
