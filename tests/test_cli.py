"""
The C{sslshare} command: every command, action and argument says what it
is for in C{--help}; C{pki init} and C{pki add-node} as an operator runs
them.
"""

from __future__ import annotations

import argparse
import os
import sys

from cryptography import x509
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sslshare import cli


def _without_help(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """
    The commands and arguments under C{parser} (named C{path}) that have
    no help text.
    """
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            described = {choice.dest for choice in action._choices_actions
                         if choice.help}
            for name, subparser in action.choices.items():
                if name not in described:
                    missing.append(f"{path} {name}")
                missing += _without_help(subparser, f"{path} {name}")
        elif not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


class HelpTests(SynchronousTestCase):

    def test_every_command_and_argument_has_help(self):
        self.assertEqual(_without_help(cli._parser(), "sslshare"), [])

    def test_a_missing_help_is_found(self):
        parser = argparse.ArgumentParser(prog="x")
        commands = parser.add_subparsers()
        command = commands.add_parser("quiet")
        command.add_argument("thing")
        self.assertEqual(_without_help(parser, "x"),
                         ["x quiet", "x quiet thing"])


def _sslshare(*arguments):
    return getProcessOutputAndValue(
        sys.executable, ["-m", "sslshare", *arguments], env=os.environ)


class PKICommandTests(TestCase):
    """
    C{sslshare pki init} and C{pki add-node}, run as an operator runs them.
    """

    @inlineCallbacks
    def test_add_node_signs_with_the_clusters_ca(self):
        directory = os.path.abspath(self.mktemp())
        out, err, code = yield _sslshare("pki", "init", directory,
                                         "--cluster", "prod", "--nodes", "a,b")
        self.assertEqual(code, 0, err)
        out, err, code = yield _sslshare("pki", "add-node", directory, "c")
        self.assertEqual((code, err), (0, b""))
        certificate = os.path.join(directory, "c.pem")
        self.assertEqual(out.decode(), f"wrote node c: {certificate}, "
                         f"{os.path.join(directory, 'c-key.pem')}\n")
        verified, err, code = yield getProcessOutputAndValue(
            "openssl", ["verify", "-CAfile", os.path.join(directory, "ca.pem"),
                        certificate], env=os.environ)
        self.assertEqual(code, 0, verified + err)
        with open(certificate, "rb") as f:
            leaf = x509.load_pem_x509_certificate(f.read())
        self.assertEqual(
            leaf.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier), ["sslshare://prod/c"])

    @inlineCallbacks
    def test_add_node_refuses_an_existing_node_in_one_line(self):
        directory = os.path.abspath(self.mktemp())
        yield _sslshare("pki", "init", directory, "--cluster", "prod",
                        "--nodes", "a")
        out, err, code = yield _sslshare("pki", "add-node", directory, "a")
        self.assertEqual((code, out), (2, b""))
        self.assertEqual(err.decode(), f"sslshare: {directory}/a.pem: exists; "
                         "not overwritten (use force to replace it)\n")

    @inlineCallbacks
    def test_add_node_without_a_ca_says_so_in_one_line(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        out, err, code = yield _sslshare("pki", "add-node", directory, "a")
        self.assertEqual((code, out), (2, b""))
        self.assertTrue(err.decode().startswith(
            f"sslshare: {directory}/ca.pem: "), err)
        self.assertEqual(err.count(b"\n"), 1, err)

    @inlineCallbacks
    def test_server_certificate_files_are_named_after_the_server_name(self):
        directory = os.path.abspath(self.mktemp())
        out, err, code = yield _sslshare(
            "pki", "init", directory, "--cluster", "prod", "--nodes", "a",
            "--server-name", "www.example.com")
        self.assertEqual(code, 0, err)
        self.assertIn("www.example.com-chain.pem", os.listdir(directory))
        self.assertIn("www.example.com-key.pem", os.listdir(directory))
        self.assertNotIn("localhost-chain.pem", os.listdir(directory))
        self.assertIn(os.path.join(directory, "www.example.com-chain.pem"),
                      out.decode())
