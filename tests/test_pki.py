"""
The development PKI (L{sslshare.dev.pki}): what L{pki.init_pki} writes, that
OpenSSL and a stock client accept it, and that it never overwrites a file
unless forced.
"""

from __future__ import annotations

import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import crypto
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from sslshare.dev import pki
from sslshare.state import StateKeys
from tests.support.clients import python_client_round
from tests.support.servers import TLSServer


def _certificates(path):
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificates(f.read())


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _extension(certificate, kind):
    return certificate.extensions.get_extension_for_class(kind).value


class InitPKITests(TestCase):
    """
    A PKI for cluster C{demo} with nodes C{node1} and C{node2}.
    """

    def setUp(self):
        self.files = pki.init_pki(self.mktemp(), "demo", ["node1", "node2"])

    def test_writes_every_file_into_the_directory(self):
        names = sorted(os.listdir(self.files.directory))
        self.assertEqual(names, sorted([
            "ca.pem", "ca-key.pem", "node1.pem", "node1-key.pem", "node2.pem",
            "node2-key.pem", "localhost-chain.pem", "localhost-key.pem",
            "state.key"]))

    def test_returns_absolute_paths(self):
        self.assertTrue(os.path.isabs(self.files.ca_certificate))
        self.assertEqual(self.files.node("node2").certificate,
                         os.path.join(self.files.directory, "node2.pem"))

    def test_private_keys_and_state_key_are_mode_0600(self):
        for path in [self.files.ca_key, self.files.server_key,
                     self.files.state_key,
                     *(node.key for node in self.files.nodes)]:
            self.assertEqual(_mode(path), 0o600, path)

    def test_node_certificate_names_its_node_uri(self):
        leaf = _certificates(self.files.node("node2").certificate)[0]
        uris = _extension(leaf, x509.SubjectAlternativeName).get_values_for_type(
            x509.UniformResourceIdentifier)
        self.assertEqual(uris, ["sslshare://demo/node2"])

    def test_node_certificate_is_for_client_and_server_auth(self):
        leaf = _certificates(self.files.node("node1").certificate)[0]
        usages = set(_extension(leaf, x509.ExtendedKeyUsage))
        self.assertEqual(usages, {ExtendedKeyUsageOID.CLIENT_AUTH,
                                  ExtendedKeyUsageOID.SERVER_AUTH})

    def test_node_certificate_file_is_followed_by_the_ca(self):
        chain = _certificates(self.files.node("node1").certificate)
        ca = _certificates(self.files.ca_certificate)
        self.assertEqual(len(chain), 2)
        self.assertEqual(chain[1], ca[0])

    def test_node_certificate_verifies_against_the_ca_with_openssl(self):
        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(
            _certificates(self.files.ca_certificate)[0]))
        leaf = _certificates(self.files.node("node1").certificate)[0]
        # Raises if it does not verify.
        crypto.X509StoreContext(
            store, crypto.X509.from_cryptography(leaf)).verify_certificate()

    def test_keys_are_p256(self):
        from cryptography.hazmat.primitives.serialization import (
            load_pem_private_key,
        )
        for path in [self.files.ca_key, self.files.server_key,
                     self.files.node("node1").key]:
            with open(path, "rb") as f:
                key = load_pem_private_key(f.read(), None)
            self.assertIsInstance(key, ec.EllipticCurvePrivateKey)
            self.assertEqual(key.curve.name, "secp256r1")

    def test_server_certificate_names_localhost_and_loopback_address(self):
        leaf = _certificates(self.files.server_chain)[0]
        names = _extension(leaf, x509.SubjectAlternativeName)
        self.assertEqual(names.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual([str(a) for a in names.get_values_for_type(x509.IPAddress)],
                         ["127.0.0.1"])

    def test_state_key_is_one_line_that_state_keys_load(self):
        with open(self.files.state_key) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertEqual(len(lines[0]), 64)
        StateKeys.from_file(self.files.state_key)

    @inlineCallbacks
    def test_python_client_accepts_server_chain_for_localhost(self):
        server = TLSServer(self, self.files.server_chain, self.files.server_key,
                           owner="node1", sessions={})
        result = yield deferToThread(python_client_round, server.port,
                                     self.files.ca_certificate, "TLSv1.3")
        self.assertEqual(result.echo, b"hello")


class InitPKIArgumentTests(TestCase):
    """
    What L{pki.init_pki} refuses, and what it writes for other names.
    """

    def test_existing_file_is_not_overwritten(self):
        directory = self.mktemp()
        files = pki.init_pki(directory, "demo", ["node1"])
        with open(files.ca_certificate, "rb") as f:
            before = f.read()
        error = self.assertRaises(pki.PKIError, pki.init_pki, directory,
                                  "demo", ["node1"])
        self.assertEqual(error.path, files.ca_certificate)
        self.assertIn("ca.pem", str(error))
        with open(files.ca_certificate, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_refusal_names_the_first_existing_file(self):
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "node2-key.pem"), "w") as f:
            f.write("mine")
        error = self.assertRaises(pki.PKIError, pki.init_pki, directory,
                                  "demo", ["node1", "node2"])
        self.assertEqual(os.path.basename(error.path), "node2-key.pem")
        # Nothing was written before the refusal.
        self.assertEqual(os.listdir(directory), ["node2-key.pem"])

    def test_force_replaces_every_file(self):
        directory = self.mktemp()
        first = pki.init_pki(directory, "demo", ["node1"])
        before = {}
        for name in os.listdir(directory):
            with open(os.path.join(directory, name), "rb") as f:
                before[name] = f.read()
        pki.init_pki(directory, "demo", ["node1"], force=True)
        self.assertEqual(sorted(os.listdir(directory)), sorted(before))
        for name, content in before.items():
            with open(os.path.join(directory, name), "rb") as f:
                self.assertNotEqual(f.read(), content, name)
        self.assertEqual(first.directory, directory if os.path.isabs(directory)
                         else os.path.abspath(directory))

    def test_force_makes_a_lax_key_file_private_again(self):
        directory = self.mktemp()
        files = pki.init_pki(directory, "demo", ["node1"])
        os.chmod(files.node("node1").key, 0o644)
        pki.init_pki(directory, "demo", ["node1"], force=True)
        self.assertEqual(_mode(files.node("node1").key), 0o600)

    def test_new_directory_is_private(self):
        files = pki.init_pki(self.mktemp(), "demo", ["node1"])
        self.assertEqual(_mode(files.directory), 0o700)

    def test_node_id_with_a_slash_is_refused(self):
        self.assertRaises(ValueError, pki.init_pki, self.mktemp(), "demo",
                          ["../node1"])

    def test_empty_cluster_name_is_refused(self):
        self.assertRaises(ValueError, pki.init_pki, self.mktemp(), "", ["node1"])

    def test_node_listed_twice_is_refused(self):
        self.assertRaises(ValueError, pki.init_pki, self.mktemp(), "demo",
                          ["node1", "node1"])

    def test_node_id_that_collides_with_a_pki_file_is_refused(self):
        for node_id in ["ca", "localhost"]:
            error = self.assertRaises(ValueError, pki.init_pki, self.mktemp(),
                                      "demo", [node_id])
            self.assertIn("overwrite", str(error))

    def test_server_names_other_than_localhost_get_no_loopback_address(self):
        files = pki.init_pki(self.mktemp(), "demo", ["node1"],
                             server_names=["www.example.test", "*.example.test"])
        names = _extension(_certificates(files.server_chain)[0],
                           x509.SubjectAlternativeName)
        self.assertEqual(names.get_values_for_type(x509.DNSName),
                         ["www.example.test", "*.example.test"])
        self.assertEqual(names.get_values_for_type(x509.IPAddress), [])

    def test_server_name_that_is_not_a_dns_name_is_refused(self):
        self.assertRaises(ValueError, pki.init_pki, self.mktemp(), "demo",
                          ["node1"], server_names=["no spaces"])


class NameRuleTests(TestCase):
    def test_a_node_id_the_config_refuses_gets_no_certificate(self):
        self.assertRaises(ValueError, pki.init_pki, self.mktemp(), "demo",
                          ["Node1"])

    def test_a_cluster_name_the_config_refuses_gets_no_ca(self):
        directory = self.mktemp()
        self.assertRaises(ValueError, pki.init_pki, directory, "Demo",
                          ["node1"])
        self.assertFalse(os.path.exists(directory))


class AddNodeTests(TestCase):
    def setUp(self):
        self.files = pki.init_pki(self.mktemp(), "demo", ["node1"])

    def test_issues_node_certificate_from_the_existing_ca(self):
        node = pki.add_node(self.files.directory, "demo", "node4")
        chain = _certificates(node.certificate)
        ca = _certificates(self.files.ca_certificate)[0]
        self.assertEqual(chain[0].issuer, ca.subject)
        self.assertEqual(chain[1], ca)

    def test_may_name_another_cluster(self):
        node = pki.add_node(self.files.directory, "other", "node9")
        uris = _extension(_certificates(node.certificate)[0],
                          x509.SubjectAlternativeName).get_values_for_type(
            x509.UniformResourceIdentifier)
        self.assertEqual(uris, ["sslshare://other/node9"])

    def test_existing_node_is_not_overwritten(self):
        error = self.assertRaises(pki.PKIError, pki.add_node,
                                  self.files.directory, "demo", "node1")
        self.assertEqual(error.path, self.files.node("node1").certificate)

    def test_the_cluster_is_read_from_the_ca(self):
        node = pki.add_node(self.files.directory, None, "node4")
        uris = _extension(_certificates(node.certificate)[0],
                          x509.SubjectAlternativeName).get_values_for_type(
            x509.UniformResourceIdentifier)
        self.assertEqual(uris, ["sslshare://demo/node4"])

    def test_a_node_named_as_the_server_certificate_is_refused(self):
        for node_id in ("localhost", "localhost-chain", "ca"):
            error = self.assertRaises(ValueError, pki.add_node,
                                      self.files.directory, None, node_id,
                                      force=True)
            self.assertIn("overwrite", str(error))

    def test_missing_ca_is_an_error_naming_it(self):
        error = self.assertRaises(pki.PKIError, pki.add_node, self.mktemp(),
                                  "demo", "node1")
        self.assertTrue(error.path.endswith("ca.pem"))
