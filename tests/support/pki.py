"""
Certificates: one test CA and the server identities it signs, written as PEM
files that both our engine and stock clients (Python C{ssl}, C{openssl
s_client}) load.  Generating an RSA-2048 key takes a noticeable part of a
second, so tests that only need I{a} PKI share one per process through
L{pki}; a test that changes the files makes its own with L{make_pki}.
"""

from __future__ import annotations

import atexit
import functools
import ipaddress
import os
import shutil
import tempfile

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.python.filepath import FilePath

from sslshare.dev import pki as pki_files
from tests.support.files import write_private


@attrs.frozen
class PKI:
    """
    Paths of the PEM files written by L{make_pki}.  Each chain file holds the
    server certificate, then the CA certificate; each key file holds the
    unencrypted PKCS#8 key of its chain's server certificate.

    @ivar ca_cert: the CA certificate, for clients to verify against.
    @ivar rsa_chain: C{localhost} and C{127.0.0.1}, RSA-2048 key.
    @ivar ec_chain: C{localhost} and C{127.0.0.1}, P-256 key.
    @ivar other_chain: C{other.test} only, P-256 key: a second virtual service.
    """

    ca_cert: str
    rsa_chain: str
    rsa_key: str
    ec_chain: str
    ec_key: str
    other_chain: str
    other_key: str

    def chain(self, kind: str) -> str:
        """
        The C{localhost} chain whose key is of C{kind}, C{"rsa"} or C{"ec"}.
        """
        return {"rsa": self.rsa_chain, "ec": self.ec_chain}[kind]

    def key(self, kind: str) -> str:
        """
        The key of L{chain}C{(kind)}.
        """
        return {"rsa": self.rsa_key, "ec": self.ec_key}[kind]


def pem(certificate: x509.Certificate) -> bytes:
    """
    C{certificate} in PEM.
    """
    return certificate.public_bytes(serialization.Encoding.PEM)


def write_identity(directory: str, name: str,
                   certificate: x509.Certificate,
                   key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
                   ca_pem: bytes) -> tuple[str, str]:
    """
    Write a server identity into C{directory}: C{<name>-chain.pem}, the
    certificate then the CA's, and C{<name>-key.pem}, its unencrypted
    PKCS#8 key, private.

    @return: the paths of the two files.
    """
    chain = os.path.join(directory, f"{name}-chain.pem")
    with open(chain, "wb") as f:
        f.write(pem(certificate) + ca_pem)
    key_path = write_private(
        os.path.join(directory, f"{name}-key.pem"), key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    return chain, key_path


def make_pki(directory: FilePath | str) -> PKI:
    """
    Generate a CA and three server identities signed by it, and write them to
    C{directory} (created if missing, as for a path from C{TestCase.mktemp}).
    """
    if isinstance(directory, FilePath):
        directory = directory.path
    os.makedirs(directory, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = pki_files.ca_certificate("test", ca_key)
    localhost = [x509.DNSName("localhost"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    paths = {"ca_cert": os.path.join(directory, "ca.pem")}
    with open(paths["ca_cert"], "wb") as f:
        f.write(pem(ca))
    for prefix, names, key in [
        ("rsa", localhost,
         rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ec", localhost, ec.generate_private_key(ec.SECP256R1())),
        ("other", [x509.DNSName("other.test")],
         ec.generate_private_key(ec.SECP256R1())),
    ]:
        certificate = pki_files.issue_certificate(
            ca, ca_key, key, str(names[0].value), names,
            [ExtendedKeyUsageOID.SERVER_AUTH])
        paths[f"{prefix}_chain"], paths[f"{prefix}_key"] = write_identity(
            directory, prefix, certificate, key, pem(ca))
    return PKI(**paths)


@functools.cache
def pki() -> PKI:
    """
    The PKI shared by every test of this process, made on first use in a
    temporary directory that is removed when the process exits.  Tests must
    not change its files.
    """
    directory = tempfile.mkdtemp(prefix="sslshare-pki-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return make_pki(directory)
