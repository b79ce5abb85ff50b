"""
A development PKI for one sslshare cluster: what C{sslshare pki init} writes.

One call of L{init_pki} makes a cluster CA and everything a demo cluster
needs, as PEM files in one directory:

    ca.pem, ca-key.pem          the cluster CA (P-256, 10 years)
    <node>.pem, <node>-key.pem  one per node: the node certificate, then the
                                CA; its identity is the SAN URI
                                C{sslshare://<cluster>/<node id>}
                                (L{sslshare.identity}), its extended key usage
                                both clientAuth and serverAuth, since a
                                node dials its peers and answers them
    <name>-chain.pem,           the certificate clients see, for the server
    <name>-key.pem              names given (DNS names, and IP 127.0.0.1
                                when C{localhost} is one of them), then the
                                CA; the files are named after the first
                                name (L{server_files}): localhost-chain.pem
                                by default
    state.key                   the cluster state key: one line of 64 hex
                                digits (L{sslshare.state.StateKeys})

Private keys and the state key are written mode 0600; nothing is ever
overwritten unless asked to, and then each file is replaced whole (a new
file renamed over the old one), never left half-written.  L{add_node} issues
one more node certificate from an existing CA.

Cluster names and node ids follow the one rule of L{sslshare.identity}, the
rule the config applies: a certificate this module writes names a node a
config can name.

This module is for development and demos: a production cluster brings its
own CA.  It never reads a key it did not write and never talks to a network.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import tempfile
from collections.abc import Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sslshare.errors import FileError, read_bytes
from sslshare.identity import node_uri, validate_name
from sslshare.state import StateKeys

# Back-dated against clock skew between the nodes of a cluster.
_NOT_BEFORE = datetime.timedelta(hours=1)
_CA_LIFETIME = datetime.timedelta(days=3650)
_LEAF_LIFETIME = datetime.timedelta(days=730)
_DNS_NAME = re.compile(
    r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

CA_CERTIFICATE = "ca.pem"
CA_KEY = "ca-key.pem"
STATE_KEY = "state.key"
# What ca_certificate names a CA; add_node reads the cluster back from it.
_CA_NAME = "sslshare cluster {cluster} CA {tag}"
_CA_NAME_PATTERN = re.compile(r"sslshare cluster (\S+) CA [0-9a-f]{6}")


class PKIError(FileError):
    """
    A PKI file cannot be written or read.
    """


@attrs.frozen
class NodeFiles:
    """
    One node's identity.

    @ivar node_id: the node id its certificate names.
    @ivar certificate: the node certificate, then the CA certificate.
    @ivar key: its private key (PKCS#8 PEM, unencrypted, mode 0600).
    """

    node_id: str
    certificate: str
    key: str


@attrs.frozen
class PKIFiles:
    """
    The absolute paths L{init_pki} wrote.
    """

    directory: str
    cluster: str
    ca_certificate: str
    ca_key: str
    nodes: tuple[NodeFiles, ...]
    server_chain: str
    server_key: str
    state_key: str

    def node(self, node_id: str) -> NodeFiles:
        """
        The files of C{node_id}.

        @raise KeyError: no such node in this PKI.
        """
        for files in self.nodes:
            if files.node_id == node_id:
                return files
        raise KeyError(node_id)


def init_pki(directory: str, cluster: str, nodes: Sequence[str],
             server_names: Sequence[str] = ("localhost",), *,
             force: bool = False) -> PKIFiles:
    """
    Write a new cluster CA, a certificate for each of C{nodes}, a server
    certificate for C{server_names} and a state key into C{directory}
    (created, mode 0700, if missing).

    @param force: replace files that exist; without it an existing file is
        an error and nothing is written.
    @raise ValueError: a name is invalid, a node is listed twice, or a node
        id would collide with another file of the PKI.
    @raise PKIError: a file exists (and not C{force}) or cannot be written.
    """
    validate_name("cluster name", cluster)
    nodes = list(nodes)
    if not nodes:
        raise ValueError("a cluster needs at least one node")
    for node_id in nodes:
        validate_name("node id", node_id)
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"node ids listed twice: {sorted(_duplicates(nodes))}")
    san = _server_names(server_names)
    server_chain, server_key_file = server_files(server_names[0])

    names = [CA_CERTIFICATE, CA_KEY, server_chain, server_key_file, STATE_KEY]
    for node_id in nodes:
        names += _node_file_names(node_id)
    collisions = _duplicates(names)
    if collisions:
        raise ValueError(
            f"node ids would overwrite other files of the PKI: {sorted(collisions)}")

    directory = os.path.abspath(directory)
    _make_directory(directory)
    paths = {name: os.path.join(directory, name) for name in names}
    if not force:
        _refuse_existing(paths.values())

    ca_key = _new_key()
    ca = ca_certificate(cluster, ca_key)
    ca_pem = _certificate_pem(ca)
    _write(paths[CA_CERTIFICATE], ca_pem, 0o644, force)
    _write(paths[CA_KEY], _key_pem(ca_key), 0o600, force)

    node_files = []
    for node_id in nodes:
        node_files.append(_issue_node(directory, cluster, node_id, ca, ca_key,
                                      ca_pem, force))

    server_key = _new_key()
    server = issue_certificate(ca, ca_key, server_key, server_names[0], san,
                   [ExtendedKeyUsageOID.SERVER_AUTH])
    _write(paths[server_chain], _certificate_pem(server) + ca_pem, 0o644, force)
    _write(paths[server_key_file], _key_pem(server_key), 0o600, force)

    _write(paths[STATE_KEY], (StateKeys.generate().hex() + "\n").encode("ascii"),
           0o600, force)
    return PKIFiles(
        directory=directory, cluster=cluster,
        ca_certificate=paths[CA_CERTIFICATE], ca_key=paths[CA_KEY],
        nodes=tuple(node_files),
        server_chain=paths[server_chain], server_key=paths[server_key_file],
        state_key=paths[STATE_KEY])


def server_files(name: str) -> tuple[str, str]:
    """
    The names of the files of the server certificate for C{name} (its
    chain, its key): C{<name>-chain.pem} and C{<name>-key.pem}, a wildcard
    C{*} written as C{wildcard}.
    """
    stem = name.replace("*", "wildcard")
    return f"{stem}-chain.pem", f"{stem}-key.pem"


def add_node(directory: str, cluster: str | None, node_id: str, *,
             force: bool = False) -> NodeFiles:
    """
    Issue a certificate for C{node_id} of C{cluster} from the CA that
    L{init_pki} wrote into C{directory}, and write it as
    C{<node>.pem}/C{<node>-key.pem} there.

    The CA does not restrict which cluster it signs for: a CA shared by two
    clusters is allowed, and the nodes tell the clusters apart by the URI.

    @param cluster: the cluster's name; C{None}: the one the CA was made
        for by L{init_pki}.
    @raise ValueError: a name is invalid or collides with a PKI file.
    @raise PKIError: the CA files are unusable, or a node file exists (and
        not C{force}).
    """
    validate_name("node id", node_id)
    names = _node_file_names(node_id)
    directory = os.path.abspath(directory)
    # A server certificate's files are <name>-chain.pem and <name>-key.pem:
    # a node of that name, or of a name ending -chain, would overwrite one.
    if (set(names) & {CA_CERTIFICATE, CA_KEY, STATE_KEY}
            or node_id.endswith("-chain")
            or os.path.exists(os.path.join(directory,
                                           f"{node_id}-chain.pem"))):
        raise ValueError(f"node id {node_id!r} would overwrite a file of the PKI")
    ca_path = os.path.join(directory, CA_CERTIFICATE)
    ca_key_path = os.path.join(directory, CA_KEY)
    ca_pem = read_bytes(ca_path, PKIError)
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as e:
        raise PKIError(ca_path, f"not a PEM certificate ({e})") from None
    try:
        ca_key = serialization.load_pem_private_key(read_bytes(ca_key_path, PKIError), None)
    except (ValueError, TypeError) as e:
        raise PKIError(ca_key_path, f"not an unencrypted PEM private key ({e})") from None
    if ca_key.public_key() != ca.public_key():
        raise PKIError(ca_key_path, f"is not the key of {ca_path}")
    if cluster is None:
        cluster = _cluster_of(ca, ca_path)
    validate_name("cluster name", cluster)
    if not force:
        _refuse_existing(os.path.join(directory, name) for name in names)
    return _issue_node(directory, cluster, node_id, ca, ca_key,
                       _certificate_pem(ca), force)


def _cluster_of(ca: x509.Certificate, ca_path: str) -> str:
    common_names = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    found = (None if len(common_names) != 1 else
             _CA_NAME_PATTERN.fullmatch(str(common_names[0].value)))
    if found is None:
        raise PKIError(ca_path, "names no sslshare cluster (not made by "
                                "sslshare pki init): give the cluster's name")
    return found.group(1)


def _node_file_names(node_id: str) -> list[str]:
    return [f"{node_id}.pem", f"{node_id}-key.pem"]


def _duplicates(items: Sequence[str]) -> set[str]:
    seen: set[str] = set()
    repeated: set[str] = set()
    for item in items:
        if item in seen:
            repeated.add(item)
        seen.add(item)
    return repeated


def _server_names(server_names: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(server_names, str) or not server_names:
        raise ValueError("server names must be a non-empty list of names")
    general: list[x509.GeneralName] = []
    for name in server_names:
        if not isinstance(name, str):
            raise ValueError(f"server name {name!r} is not a string")
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        if _DNS_NAME.fullmatch(name) is None or len(name) > 253:
            raise ValueError(f"server name {name!r} is not a DNS name or IP address")
        general.append(x509.DNSName(name))
    if "localhost" in server_names:
        # Clients that dial 127.0.0.1 by address check it against an IP SAN.
        loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
        if loopback not in general:
            general.append(loopback)
    return general


def _make_directory(directory: str) -> None:
    try:
        # 0700: the directory holds the CA's private key.
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise PKIError(directory, f"cannot create directory ({e.strerror})") from None
    if not os.path.isdir(directory):
        raise PKIError(directory, "not a directory")


def _refuse_existing(paths) -> None:
    for path in paths:
        if os.path.lexists(path):
            raise PKIError(path, "exists; not overwritten (use force to replace it)")


def _write(path: str, data: bytes, mode: int, replace: bool) -> None:
    """
    Write C{data} to a new file at C{path}; with C{replace}, a file that
    exists is replaced whole by a rename, so that a reader never sees half a
    key and the new mode applies even if the old file was laxer.
    """
    try:
        if not replace:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(descriptor, "wb") as f:
                f.write(data)
            return
        descriptor, temporary = tempfile.mkstemp(
            dir=os.path.dirname(path), prefix=".sslshare-")
        try:
            with os.fdopen(descriptor, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except FileExistsError:
        raise PKIError(path, "exists; not overwritten (use force to replace it)") from None
    except OSError as e:
        raise PKIError(path, f"cannot write ({e.strerror})") from None


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key,
             lifetime: datetime.timedelta) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _NOT_BEFORE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                       critical=False)
    )


def _key_usage(*, digital_signature: bool = False,
               key_encipherment: bool = False, key_cert_sign: bool = False,
               crl_sign: bool = False) -> x509.KeyUsage:
    """
    The key usage extension granting what is given, and nothing else.
    """
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False,
        key_encipherment=key_encipherment, data_encipherment=False,
        key_agreement=False, key_cert_sign=key_cert_sign, crl_sign=crl_sign,
        encipher_only=False, decipher_only=False)


def ca_certificate(cluster: str, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """
    A self-signed CA certificate for C{cluster}, signed by C{key}.
    """
    # A random tag tells two CAs of the same cluster name apart in logs.
    name = _CA_NAME.format(cluster=cluster, tag=secrets.token_hex(3))
    return (
        _builder(name, _name(name), key.public_key(), _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True),
                       critical=True)
        .sign(key, hashes.SHA256())
    )


def issue_certificate(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                      key: Any, common_name: str,
                      names: list[x509.GeneralName],
                      usages: list) -> x509.Certificate:
    """
    A certificate for C{key} (EC or RSA) signed by C{ca}, naming C{names}
    (subject alternative names) for the extended key C{usages}.
    """
    # An EC key signs (ECDHE) and never enciphers; an RSA key may be asked
    # to by a TLS 1.2 RSA key exchange.
    enciphers = isinstance(key, rsa.RSAPrivateKey)
    return (
        _builder(common_name, ca.subject, key.public_key(), _LEAF_LIFETIME)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True,
                                  key_encipherment=enciphers), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        # Strict verifiers (RFC 5280, Python 3.13's default) require it.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _issue_node(directory: str, cluster: str, node_id: str,
                ca: x509.Certificate, ca_key, ca_pem: bytes,
                force: bool) -> NodeFiles:
    key = _new_key()
    certificate = issue_certificate(
        ca, ca_key, key, node_id,
        [x509.UniformResourceIdentifier(node_uri(cluster, node_id))],
        [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH])
    certificate_path, key_path = (
        os.path.join(directory, name) for name in _node_file_names(node_id))
    _write(certificate_path, _certificate_pem(certificate) + ca_pem, 0o644, force)
    _write(key_path, _key_pem(key), 0o600, force)
    return NodeFiles(node_id, certificate_path, key_path)
