"""
Tests for L{sslshare.identity}: the name rule and the node URI.
"""

from twisted.trial.unittest import TestCase

from sslshare import identity


class NameRuleTests(TestCase):
    def test_lower_case_letters_digits_and_punctuation_are_a_name(self):
        for name in ["node1", "a", "eu-west.2", "n_1", "0" * 64]:
            self.assertTrue(identity.is_name(name), name)

    def test_upper_case_is_not_a_name(self):
        self.assertFalse(identity.is_name("Node1"))

    def test_what_cannot_go_into_a_uri_or_a_file_name_is_not_a_name(self):
        for name in ["", ".node", "-node", "node:1", "node/1", "node 1",
                     "n" * 65, None, b"node1"]:
            self.assertFalse(identity.is_name(name), name)

    def test_the_refusal_says_what_and_the_rule(self):
        error = self.assertRaises(ValueError, identity.validate_name,
                                  "node id", "Node1")
        self.assertEqual(str(error), f"node id 'Node1' is not a valid name: "
                                     f"use {identity.NAME_RULE}")


class NodeURITests(TestCase):
    def test_uri_names_cluster_and_node(self):
        self.assertEqual(identity.node_uri("demo", "node1"),
                         "sslshare://demo/node1")

    def test_node_id_with_a_colon_is_refused(self):
        self.assertRaises(ValueError, identity.node_uri, "demo", "node:1")

    def test_node_id_longer_than_64_characters_is_refused(self):
        self.assertRaises(ValueError, identity.node_uri, "demo", "n" * 65)

    def test_a_uri_reads_back_as_its_node(self):
        uri = identity.node_uri("demo", "node1")
        self.assertEqual(identity.node_of(uri, "demo"), "node1")

    def test_a_uri_of_another_cluster_or_scheme_names_no_node(self):
        self.assertIsNone(identity.node_of("sslshare://other/node1", "demo"))
        self.assertIsNone(identity.node_of("https://demo/node1", "demo"))
        self.assertIsNone(identity.node_of("sslshare://demo.x/node1", "demo"))

    def test_a_uri_of_the_cluster_with_a_bad_node_id_is_refused(self):
        for uri in ["sslshare://demo/Node1", "sslshare://demo/a/b",
                    "sslshare://demo/"]:
            self.assertRaises(ValueError, identity.node_of, uri, "demo")
