"""
The TOML configuration: what a valid file becomes, and the one-line error
each kind of mistake gets.

Certificate and key files are empty placeholders here: L{sslshare.config}
checks only that they exist and can be read, and the TLS layer parses them
later.  The demo configurations (node1..3.toml, example.toml in
sslshare/examples) are
loaded against a real demo PKI, made by L{sslshare.dev.pki.init_pki} as
C{sslshare pki init} makes it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import attrs
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SkipTest, TestCase

from sslshare import cluster, config
from sslshare.config import ConfigError
from sslshare.dev import pki
from sslshare.tls import DEFAULT_TLS12_CIPHERS
from tests.support.files import write_private

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "sslshare", "examples")

NODE = """\
[node]
id = "node1"
cluster = "demo"
listen = "tcp:8441:interface=127.0.0.1"
backend = "tcp:host=127.0.0.1:port=8080"
"""

TLS = """\
[[tls.service]]
name = "web"
certificate = "pki/web.pem"
key = "pki/web-key.pem"
"""

CLUSTER = """\
[cluster]
listen = "tcp:7441:interface=127.0.0.1"
ca = "pki/ca.pem"
certificate = "pki/node1.pem"
key = "pki/node1-key.pem"
state_key = "pki/state.key"

[cluster.peers]
node3 = "tcp:host=127.0.0.1:port=7443"
node2 = "tcp:host=127.0.0.1:port=7442"
"""

DISCOVERED = CLUSTER.split("[cluster.peers]")[0] + (
    'peers_from = "dns-srv:_sslshare._tcp.x.example"\n')

# Secret files are private to their owner, as the configuration requires.
PLACEHOLDERS = ("web.pem", "other.pem", "ca.pem", "node1.pem")
SECRET_PLACEHOLDERS = ("web-key.pem", "other-key.pem", "node1-key.pem",
                       "state.key", "password")

DEMO_NODES = ("node1", "node2", "node3")
DEMO_PKI_FILES = ("ca.pem", "ca-key.pem", "localhost-chain.pem",
                  "localhost-key.pem", "state.key") + tuple(
    name for node in DEMO_NODES for name in (f"{node}.pem", f"{node}-key.pem"))


def edited(text: str, old: str, new: str) -> str:
    """
    C{text} with C{old} replaced by C{new}; C{old} must be there, so that a
    test never checks an edit that did not happen.
    """
    assert old in text, f"{old!r} not in the template"
    return text.replace(old, new)


class _ConfigTestCase(TestCase):
    """
    A directory with placeholder PKI files under C{pki/}, and helpers to
    write a configuration file next to them and load it.
    """

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.directory, "pki"))
        for name in PLACEHOLDERS:
            open(os.path.join(self.directory, "pki", name), "w").close()
        for name in SECRET_PLACEHOLDERS:
            write_private(os.path.join(self.directory, "pki", name))
        self.path = os.path.join(self.directory, "node.toml")

    def write(self, node=NODE, tls=TLS, cluster=CLUSTER, extra=""):
        with open(self.path, "w", encoding="utf-8") as f:
            f.write("\n".join((node, tls, cluster, extra)))
        return self.path

    def load(self, **sections):
        return config.load(self.write(**sections))

    def error(self, **sections):
        """
        The L{ConfigError} loading these sections raises; its message must
        be one line.
        """
        error = self.assertRaises(ConfigError, self.load, **sections)
        self.assertNotIn("\n", str(error))
        return error

    def assertError(self, error, key, reason):
        self.assertEqual((error.path, error.key, error.reason),
                         (self.path, key, reason))
        self.assertEqual(str(error), f"{self.path}: {key}: {reason}")

    def pki_path(self, name):
        return os.path.join(self.directory, "pki", name)


class ValidConfigTests(_ConfigTestCase):
    """
    What a valid file becomes.
    """

    def test_minimal_config_gets_the_documented_defaults(self):
        node = self.load()
        self.assertEqual(
            (node.node_id, node.cluster_name, node.lookup_budget,
             node.session_lifetime, node.store_max_bytes,
             node.handshake_timeout, node.drain_timeout, node.metrics_listen,
             node.repository, node.topology, node.max_concurrent_lookups,
             node.max_lookups_per_client),
            ("node1", "demo", 0.050, 3600, 64 * 1024 * 1024, 10.0, 10.0, None,
             None, "peers", 1000, 100))
        self.assertEqual((node.tls.min_version, node.tls.max_version,
                          node.tls.alpn), ("1.2", "1.3", ()))

    def test_state_dir_defaults_to_state_slash_node_id_beside_the_file(self):
        node = self.load()
        self.assertEqual(node.state_dir,
                         os.path.join(self.directory, "state", "node1"))

    def test_state_dir_is_not_created_by_load(self):
        node = self.load(node=NODE + 'state_dir = "run/node1"\n')
        self.assertEqual(node.state_dir,
                         os.path.join(self.directory, "run", "node1"))
        self.assertFalse(os.path.exists(node.state_dir))

    def test_relative_paths_are_taken_from_the_file_directory(self):
        # A relative config path, from another working directory.
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(os.path.join(self.directory, "pki"))
        self.write()
        node = config.load(os.path.join("..", "node.toml"))
        self.assertEqual(node.path, self.path)
        self.assertEqual(
            (node.tls.services[0].certificate, node.tls.services[0].key,
             node.cluster.ca, node.cluster.certificate, node.cluster.key,
             node.cluster.state_key),
            tuple(map(self.pki_path, ("web.pem", "web-key.pem", "ca.pem",
                                      "node1.pem", "node1-key.pem",
                                      "state.key"))))

    def test_absolute_paths_are_kept(self):
        node = self.load(tls=edited(TLS, '"pki/web.pem"',
                                    f'"{self.pki_path("other.pem")}"'))
        self.assertEqual(node.tls.services[0].certificate,
                         self.pki_path("other.pem"))

    def test_listen_takes_one_string(self):
        self.assertEqual(self.load().listen, ("tcp:8441:interface=127.0.0.1",))

    def test_listen_takes_an_array(self):
        node = self.load(node=edited(
            NODE, 'listen = "tcp:8441:interface=127.0.0.1"',
            'listen = ["tcp:8441:interface=127.0.0.1", "unix:/tmp/x.sock"]'))
        self.assertEqual(node.listen,
                         ("tcp:8441:interface=127.0.0.1", "unix:/tmp/x.sock"))

    def test_every_optional_node_key_is_read(self):
        node = self.load(node=NODE + """
lookup_budget_ms = 120
session_lifetime_s = 600
store_max_bytes = 65536
handshake_timeout_s = 2.5
drain_timeout_s = 30
metrics_listen = "tcp:9441:interface=127.0.0.1"
max_concurrent_lookups = 20
max_lookups_per_client = 5
log_format = "json"
loose_key_permissions = "warn"
""")
        self.assertEqual(
            (node.lookup_budget, node.session_lifetime, node.store_max_bytes,
             node.handshake_timeout, node.drain_timeout, node.metrics_listen,
             node.max_concurrent_lookups, node.max_lookups_per_client,
             node.log_format, node.loose_key_permissions),
            (0.120, 600, 65536, 2.5, 30.0, "tcp:9441:interface=127.0.0.1", 20,
             5, "json", "warn"))

    def test_checkpoint_max_pause_defaults_to_a_quarter_second(self):
        self.assertEqual(self.load().checkpoint.max_pause, 0.25)
        node = self.load(node=NODE + "checkpoint_max_pause = 1.5\n")
        self.assertEqual(node.checkpoint.max_pause, 1.5)

    def test_tls_settings_are_read_and_alpn_becomes_bytes(self):
        node = self.load(tls='[tls]\nmin_version = "1.3"\nmax_version = "1.3"\n'
                             'alpn = ["h2", "http/1.1"]\n' + TLS)
        self.assertEqual((node.tls.min_version, node.tls.max_version,
                          node.tls.alpn), ("1.3", "1.3", (b"h2", b"http/1.1")))

    def test_alpn_mismatch_defaults_to_the_alert_and_can_be_ignored(self):
        self.assertEqual(self.load(tls=TLS).tls.alpn_mismatch, "alert")
        node = self.load(tls='[tls]\nalpn_mismatch = "ignore"\n' + TLS)
        self.assertEqual(node.tls.alpn_mismatch, "ignore")

    def test_tls12_ciphers_default_to_the_engine_default_and_can_be_set(self):
        self.assertEqual(self.load(tls=TLS).tls.tls12_ciphers,
                         DEFAULT_TLS12_CIPHERS)
        node = self.load(tls='[tls]\ntls12_ciphers = "ECDHE-RSA-AES128-SHA"\n'
                             + TLS)
        self.assertEqual(node.tls.tls12_ciphers, "ECDHE-RSA-AES128-SHA")

    def test_services_keep_their_order_and_server_names_lower_cased(self):
        node = self.load(tls=TLS + 'server_names = ["LocalHost"]\n' + """
[[tls.service]]
name = "other"
certificate = "pki/other.pem"
key = "pki/other-key.pem"
server_names = ["other.test", "*.other.test"]
""")
        self.assertEqual(
            [(s.name, s.server_names) for s in node.tls.services],
            [("web", ("localhost",)),
             ("other", ("other.test", "*.other.test"))])

    def test_peers_are_sorted_by_node_id(self):
        self.assertEqual(self.load().cluster.peers,
                         (("node2", "tcp:host=127.0.0.1:port=7442"),
                          ("node3", "tcp:host=127.0.0.1:port=7443")))

    def test_peer_endpoint_names_a_peers_endpoint(self):
        self.assertEqual(self.load().cluster.peer_endpoint("node3"),
                         "tcp:host=127.0.0.1:port=7443")

    def test_peer_endpoint_of_a_stranger_raises_key_error(self):
        self.assertRaises(KeyError, self.load().cluster.peer_endpoint, "node9")

    def test_cluster_listen_is_optional(self):
        node = self.load(cluster=edited(
            CLUSTER, 'listen = "tcp:7441:interface=127.0.0.1"\n', ""))
        self.assertIsNone(node.cluster.listen)

    def test_peers_are_optional(self):
        node = self.load(cluster=CLUSTER.split("[cluster.peers]")[0])
        self.assertEqual(node.cluster.peers, ())

    def test_default_authorization_allows_every_peer_every_command(self):
        cluster = self.load().cluster
        self.assertEqual(
            [(command, cluster.allowed(command, "node2"),
              cluster.allowed(command, "node3")) for command in config.COMMANDS],
            [(command, True, True) for command in config.COMMANDS])

    def test_default_authorization_lets_the_node_itself_ask_only_stats(self):
        cluster = self.load().cluster
        self.assertEqual(
            {command: cluster.allowed(command, "node1")
             for command in config.COMMANDS},
            {"Backup": False, "Checkpoint": False, "FetchSession": False,
             "Purge": False, "Stats": True})

    def test_authorize_replaces_the_default_of_the_commands_it_names(self):
        cluster = self.load(cluster=CLUSTER + """
[cluster.authorize]
Purge = []
FetchSession = ["node2"]
""").cluster
        self.assertEqual(
            dict(cluster.authorize),
            {"Backup": frozenset({"node2", "node3"}),
             "Checkpoint": frozenset({"node2", "node3"}),
             "FetchSession": frozenset({"node2"}),
             "Purge": frozenset(),
             "Stats": frozenset({"node1", "node2", "node3"})})

    def test_allowed_is_false_for_an_unknown_command(self):
        self.assertFalse(self.load().cluster.allowed("Shutdown", "node2"))

    def test_allowed_is_false_for_a_stranger(self):
        self.assertFalse(self.load().cluster.allowed("FetchSession", "node9"))

    def test_sqlite_repository_path_is_absolute_and_need_not_exist(self):
        node = self.load(extra='[repository]\nkind = "sqlite"\n'
                               'path = "state/sessions.sqlite3"\n')
        self.assertEqual(
            node.repository,
            config.RepositoryConfig(
                kind="sqlite", topology="both",
                path=os.path.join(self.directory, "state", "sessions.sqlite3")))
        self.assertEqual(node.topology, "both")

    def test_postgres_repository_with_topology_password_file_and_tls(self):
        node = self.load(extra="""
[repository]
kind = "postgres"
topology = "repository"
dsn = "host=db dbname=sslshare"
password_file = "pki/password"
tls = true
""")
        self.assertEqual(
            node.repository,
            config.RepositoryConfig(
                kind="postgres", topology="repository",
                dsn="host=db dbname=sslshare",
                password_file=self.pki_path("password"), tls=True))
        self.assertEqual(node.topology, "repository")

    def test_redis_repository(self):
        node = self.load(extra='[repository]\nkind = "redis"\n'
                               'url = "rediss://cache:6380/0"\n')
        self.assertEqual(node.repository.url, "rediss://cache:6380/0")
        self.assertEqual((node.repository.cluster, node.repository.sentinels,
                          node.repository.wait_replicas), (False, (), None))

    def test_redis_cluster_by_its_seeds_or_one_seed(self):
        node = self.load(extra='[repository]\nkind = "redis"\n'
                               'url = "redis+cluster://a:7000,[::1]:7001"\n'
                               'wait_replicas = 1\n')
        self.assertEqual((node.repository.url, node.repository.cluster,
                          node.repository.wait_replicas),
                         ("redis+cluster://a:7000,[::1]:7001", False, 1))
        node = self.load(extra='[repository]\nkind = "redis"\n'
                               'url = "redis://a:7000"\ncluster = true\n')
        self.assertTrue(node.repository.cluster)

    def test_redis_sentinels(self):
        node = self.load(extra='[repository]\nkind = "redis"\n'
                               'sentinels = ["s1:5000", "s2", "[::1]:5001"]\n'
                               'service = "mymaster"\n')
        self.assertEqual(
            (node.repository.url, node.repository.sentinels,
             node.repository.service),
            (None, (("s1", 5000), ("s2", 26379), ("::1", 5001)), "mymaster"))

    def test_passwords_in_dsn_or_url_stay_out_of_repr(self):
        postgres = config.RepositoryConfig(
            kind="postgres", dsn="postgresql://u:hunter2@db/x")
        keywords = config.RepositoryConfig(
            kind="postgres", dsn="host=db password=hunter2 dbname=x")
        redis = config.RepositoryConfig(kind="redis",
                                        url="redis://:hunter2@cache/0")
        for value in (postgres, keywords, redis):
            self.assertNotIn("hunter2", repr(value))
            self.assertIn("***", repr(value))

    def test_values_are_frozen(self):
        node = self.load()
        self.assertRaises(attrs.exceptions.FrozenInstanceError,
                          setattr, node, "node_id", "node9")
        self.assertRaises(attrs.exceptions.FrozenInstanceError,
                          setattr, node.cluster, "peers", ())

    def test_no_dict_from_toml_gets_past_load(self):
        def values(thing):
            if attrs.has(type(thing)):
                for field in attrs.fields(type(thing)):
                    yield from values(getattr(thing, field.name))
            elif isinstance(thing, (tuple, frozenset)):
                for item in thing:
                    yield from values(item)
            else:
                yield thing
        node = self.load(tls="[tls]\nalpn = [\"h2\"]\n" + TLS,
                         cluster=CLUSTER + "[cluster.authorize]\nPurge = []\n",
                         extra='[repository]\nkind = "sqlite"\npath = "x"\n')
        self.assertEqual(
            [value for value in values(node) if isinstance(value, (dict, list))],
            [])


class FileErrorTests(_ConfigTestCase):
    """
    The configuration file itself cannot be used: the message names the
    file and has no key.
    """

    def test_missing_file(self):
        path = os.path.join(self.directory, "absent.toml")
        error = self.assertRaises(ConfigError, config.load, path)
        self.assertEqual(str(error),
                         f"{path}: cannot read: No such file or directory")
        self.assertEqual(error.key, "")

    def test_directory_instead_of_a_file(self):
        error = self.assertRaises(ConfigError, config.load, self.directory)
        self.assertEqual(str(error), f"{self.directory}: cannot read: "
                                     f"Is a directory")

    def test_unreadable_file(self):
        path = self.write()
        os.chmod(path, 0)
        if os.geteuid() != 0:
            error = self.assertRaises(ConfigError, config.load, path)
            message = str(error)
        else:
            # Root reads a file of mode 000; a child without the capability
            # to override file permissions does not.
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise SkipTest("running as root and setpriv is missing: "
                               "cannot make a file unreadable")
            child = subprocess.run(
                [setpriv, "--bounding-set=-dac_override,-dac_read_search",
                 sys.executable, "-c",
                 "import sys\n"
                 "from sslshare import config\n"
                 "try: config.load(sys.argv[1])\n"
                 "except config.ConfigError as e: print(e)\n",
                 path], capture_output=True, text=True, timeout=60)
            self.assertEqual(child.stderr, "")
            message = child.stdout.rstrip("\n")
        self.assertEqual(message, f"{path}: cannot read: Permission denied")

    def test_toml_syntax_error_names_the_line(self):
        error = self.error(node=edited(NODE, '"tcp:host=127.0.0.1:port=8080"',
                                       "tcp:host=127.0.0.1:port=8080"))
        self.assertEqual(error.key, "")
        self.assertEqual(str(error), f"{self.path}: not valid TOML: Invalid "
                                     f"value (at line 5, column 11)")

    def test_key_defined_twice_is_a_syntax_error(self):
        error = self.error(node=NODE + 'id = "node2"\n')
        self.assertEqual(error.reason, "not valid TOML: Cannot overwrite a "
                                       "value (at line 6, column 13)")

    def test_text_that_is_not_utf8(self):
        with open(self.path, "wb") as f:
            f.write(b'[node]\nid = "n\xe9ud"\n')
        error = self.assertRaises(ConfigError, config.load, self.path)
        self.assertEqual(str(error), f"{self.path}: not UTF-8 text: invalid "
                                     f"continuation byte (at line 2, column 8)")

    def test_error_message_stays_on_one_line(self):
        error = ConfigError("x.toml", "node.id", "first\nsecond\r\n  third")
        self.assertEqual(str(error), "x.toml: node.id: first second third")


class KeyErrorTests(_ConfigTestCase):
    """
    Keys that are missing, unknown, or of the wrong type.
    """

    def test_missing_required_key(self):
        self.assertError(
            self.error(node=edited(NODE, 'backend = "tcp:host=127.0.0.1:'
                                         'port=8080"\n', "")),
            "node.backend", "missing required key")

    def test_missing_required_table(self):
        self.assertError(self.error(cluster=""), "cluster",
                         "missing required key")

    def test_missing_required_key_in_a_service(self):
        self.assertError(self.error(tls=edited(TLS, 'key = "pki/web-key.pem"\n',
                                               "")),
                         "tls.service[0].key", "missing required key")

    def test_unknown_key_suggests_the_nearest_known_one(self):
        self.assertError(
            self.error(node=edited(NODE, "listen =", "lisen =")),
            "node.lisen", "unknown key (did you mean 'listen'?)")

    def test_unknown_key_without_a_near_one(self):
        self.assertError(self.error(node=NODE + "colour = 3\n"),
                         "node.colour", "unknown key")

    def test_unknown_key_in_a_service(self):
        self.assertError(
            self.error(tls=edited(TLS, "certificate =", "certficate =")),
            "tls.service[0].certficate",
            "unknown key (did you mean 'certificate'?)")

    def test_unknown_table(self):
        self.assertError(self.error(extra="[repositry]\nkind = \"sqlite\"\n"),
                         "repositry", "unknown key (did you mean 'repository'?)")

    def test_string_where_an_integer_is_expected(self):
        self.assertError(self.error(node=NODE + 'lookup_budget_ms = "50"\n'),
                         "node.lookup_budget_ms",
                         "expected an integer, got a string '50'")

    def test_float_where_an_integer_is_expected(self):
        self.assertError(self.error(node=NODE + "session_lifetime_s = 60.5\n"),
                         "node.session_lifetime_s",
                         "expected an integer, got a float 60.5")

    def test_boolean_is_not_an_integer(self):
        self.assertError(self.error(node=NODE + "store_max_bytes = true\n"),
                         "node.store_max_bytes",
                         "expected an integer, got a boolean True")

    def test_integer_where_a_string_is_expected(self):
        self.assertError(self.error(node=edited(NODE, 'id = "node1"', "id = 1")),
                         "node.id", "expected a string, got an integer 1")

    def test_unquoted_tls_version_is_a_float_with_a_hint(self):
        self.assertError(
            self.error(tls="[tls]\nmin_version = 1.2\n" + TLS),
            "tls.min_version",
            'expected a string, got a float 1.2 (write it in quotes: "1.2")')

    def test_table_where_a_string_is_expected(self):
        self.assertError(
            self.error(cluster=edited(CLUSTER, 'node2 = "tcp:host=127.0.0.1:'
                                               'port=7442"',
                                      "node2 = { host = \"x\" }")),
            "cluster.peers.node2", "expected a string, got a table {'host': 'x'}")

    def test_string_where_a_table_is_expected(self):
        # A top-level key must come before the first table.
        self.assertError(self.error(node='repository = "sqlite"\n' + NODE),
            "repository", "expected a table, got a string 'sqlite'")

    def test_string_where_a_boolean_is_expected(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "redis"\n'
                             'url = "redis://x"\ntls = "yes"\n'),
            "repository.tls",
            "expected a boolean (true or false), got a string 'yes'")

    def test_array_element_of_the_wrong_type(self):
        self.assertError(
            self.error(node=edited(NODE, 'listen = "tcp:8441:interface='
                                         '127.0.0.1"',
                                   'listen = ["tcp:8441", 8442]')),
            "node.listen[1]", "expected a string, got an integer 8442")

    def test_empty_string_is_refused(self):
        self.assertError(self.error(node=edited(NODE, 'id = "node1"', 'id = ""')),
                         "node.id", "must not be empty")

    def test_node_id_with_upper_case_is_refused(self):
        self.assertError(
            self.error(node=edited(NODE, 'id = "node1"', 'id = "Node1"')),
            "node.id", "'Node1' is not a valid name: use 1 to 64 characters "
                       "of a-z, 0-9, '.', '_' and '-', starting with a letter "
                       "or a digit")


class RangeErrorTests(_ConfigTestCase):
    """
    Numbers outside the range the node can work with.
    """

    def test_lookup_budget_ms_zero(self):
        self.assertError(self.error(node=NODE + "lookup_budget_ms = 0\n"),
                         "node.lookup_budget_ms",
                         "0 is out of range: must be from 1 to 10000")

    def test_lookup_budget_ms_above_ten_seconds(self):
        self.assertError(self.error(node=NODE + "lookup_budget_ms = 10001\n"),
                         "node.lookup_budget_ms",
                         "10001 is out of range: must be from 1 to 10000")

    def test_checkpoint_max_pause_zero(self):
        self.assertError(self.error(node=NODE + "checkpoint_max_pause = 0\n"),
                         "node.checkpoint_max_pause",
                         "0 is out of range: must be above 0 and at most 10.0")

    def test_max_concurrent_lookups_zero(self):
        self.assertError(self.error(node=NODE + "max_concurrent_lookups = 0\n"),
                         "node.max_concurrent_lookups",
                         "0 is out of range: must be from 1 to 1000000")

    def test_max_concurrent_lookups_above_a_million(self):
        self.assertError(
            self.error(node=NODE + "max_concurrent_lookups = 1000001\n"),
            "node.max_concurrent_lookups",
            "1000001 is out of range: must be from 1 to 1000000")

    def test_max_lookups_per_client_negative(self):
        self.assertError(self.error(node=NODE + "max_lookups_per_client = -1\n"),
                         "node.max_lookups_per_client",
                         "-1 is out of range: must be from 1 to 1000000")

    def test_max_lookups_per_client_above_a_million(self):
        self.assertError(
            self.error(node=NODE + "max_lookups_per_client = 1000001\n"),
            "node.max_lookups_per_client",
            "1000001 is out of range: must be from 1 to 1000000")

    def test_session_lifetime_below_a_minute(self):
        self.assertError(self.error(node=NODE + "session_lifetime_s = 59\n"),
                         "node.session_lifetime_s",
                         "59 is out of range: must be from 60 to 86400")

    def test_store_max_bytes_below_64_kib(self):
        self.assertError(self.error(node=NODE + "store_max_bytes = 65535\n"),
                         "node.store_max_bytes",
                         "65535 is out of range: must be at least 65536")

    def test_handshake_timeout_zero(self):
        self.assertError(self.error(node=NODE + "handshake_timeout_s = 0\n"),
                         "node.handshake_timeout_s",
                         "0 is out of range: must be above 0 and at most 300")

    def test_drain_timeout_zero(self):
        self.assertError(self.error(node=NODE + "drain_timeout_s = 0\n"),
                         "node.drain_timeout_s",
                         "0 is out of range: must be above 0 and at most 600")

    def test_drain_timeout_above_ten_minutes(self):
        self.assertError(self.error(node=NODE + "drain_timeout_s = 601\n"),
                         "node.drain_timeout_s",
                         "601 is out of range: must be above 0 and at most 600")

    def test_drain_timeout_as_a_string(self):
        self.assertError(self.error(node=NODE + 'drain_timeout_s = "10"\n'),
                         "node.drain_timeout_s",
                         "expected a number, got a string '10'")

    def test_handshake_timeout_infinite(self):
        self.assertError(self.error(node=NODE + "handshake_timeout_s = inf\n"),
                         "node.handshake_timeout_s",
                         "inf is out of range: must be above 0 and at most 300")


class FileReferenceErrorTests(_ConfigTestCase):
    """
    Files the configuration names that cannot be read.
    """

    def test_missing_certificate_names_the_key_and_the_path(self):
        self.assertError(
            self.error(tls=edited(TLS, "pki/web.pem", "pki/absent.pem")),
            "tls.service[0].certificate",
            f"cannot read 'pki/absent.pem' ({self.pki_path('absent.pem')}): "
            f"No such file or directory")

    def test_missing_state_key(self):
        os.remove(self.pki_path("state.key"))
        self.assertError(
            self.error(), "cluster.state_key",
            f"cannot read 'pki/state.key' ({self.pki_path('state.key')}): "
            f"No such file or directory")

    def test_directory_instead_of_a_key_file(self):
        self.assertError(
            self.error(cluster=edited(CLUSTER, 'key = "pki/node1-key.pem"',
                                      'key = "pki"')),
            "cluster.key",
            f"cannot read 'pki' ({os.path.join(self.directory, 'pki')}): "
            f"a directory")

    def test_fifo_instead_of_a_file_does_not_hang(self):
        os.remove(self.pki_path("ca.pem"))
        os.mkfifo(self.pki_path("ca.pem"))
        self.assertError(
            self.error(), "cluster.ca",
            f"cannot read 'pki/ca.pem' ({self.pki_path('ca.pem')}): "
            f"not a regular file")

    def test_missing_password_file(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "redis"\nurl = "redis://x"\n'
                             'password_file = "pki/nope"\n'),
            "repository.password_file",
            f"cannot read 'pki/nope' ({self.pki_path('nope')}): "
            f"No such file or directory")


class AccessLogConfigTests(_ConfigTestCase):
    """
    C{access_log}: a file the node can append to, C{"-"}, or C{"off"};
    nothing is made while the file is read.
    """

    def _access_log(self, value):
        return NODE + f'access_log = "{value}"\n'

    def test_off_by_default_and_off(self):
        self.assertIsNone(self.load().access_log)
        self.assertIsNone(self.load(node=self._access_log("off")).access_log)

    def test_dash_is_the_nodes_log(self):
        self.assertEqual(self.load(node=self._access_log("-")).access_log,
                         config.ACCESS_LOG_TO_NODE_LOG)

    def test_a_path_is_taken_from_the_files_directory_and_not_made(self):
        node = self.load(node=self._access_log("access.log"))
        path = os.path.join(self.directory, "access.log")
        self.assertEqual(node.access_log, path)
        self.assertFalse(os.path.exists(path))

    def test_a_directory_that_does_not_exist(self):
        missing = os.path.join(self.directory, "nope")
        self.assertError(
            self.error(node=self._access_log("nope/access.log")),
            "node.access_log",
            f"cannot write 'nope/access.log' ({missing}/access.log): no "
            f"directory {missing}")

    def test_a_directory(self):
        self.assertError(
            self.error(node=self._access_log("pki")), "node.access_log",
            f"cannot write 'pki' ({os.path.join(self.directory, 'pki')}): "
            f"a directory")

    def test_a_fifo_does_not_hang(self):
        os.mkfifo(os.path.join(self.directory, "fifo"))
        self.assertError(
            self.error(node=self._access_log("fifo")), "node.access_log",
            f"cannot write 'fifo' ({os.path.join(self.directory, 'fifo')}): "
            f"not a regular file")

    def test_an_empty_string(self):
        self.assertError(self.error(node=self._access_log("")),
                         "node.access_log", "must not be empty")


PASSWORD_FILE = ('[repository]\nkind = "redis"\nurl = "redis://x"\n'
                 'password_file = "pki/password"\n')

# Each kind of secret file: its key, its placeholder, and the sections
# that name it.
SECRET_FILES = (
    ("tls.service[0].key", "web-key.pem", {}),
    ("cluster.key", "node1-key.pem", {}),
    ("cluster.state_key", "state.key", {}),
    ("repository.password_file", "password", {"extra": PASSWORD_FILE}),
)


class SecretFileModeTests(_ConfigTestCase):
    """
    Private keys, the state key and the password file must be private to
    their owner; node.loose_key_permissions = "warn" accepts them with a
    warning.
    """

    def refusal(self, name, mode):
        path = self.pki_path(name)
        return (f"'pki/{name}' ({path}) is mode {mode:04o} (readable by "
                f"group/other): chmod 600 {path}")

    def test_each_secret_file_readable_by_group_or_other_is_refused(self):
        for mode in (0o644, 0o640, 0o604):
            for key, name, sections in SECRET_FILES:
                os.chmod(self.pki_path(name), mode)
                self.assertError(self.error(**sections), key,
                                 self.refusal(name, mode))
                os.chmod(self.pki_path(name), 0o600)

    def test_secret_file_writable_by_group_is_refused(self):
        os.chmod(self.pki_path("state.key"), 0o620)
        self.assertError(
            self.error(), "cluster.state_key",
            f"'pki/state.key' ({self.pki_path('state.key')}) is mode 0620 "
            f"(writable by group/other): chmod 600 "
            f"{self.pki_path('state.key')}")

    def test_secret_files_of_mode_0600_and_0400_are_accepted(self):
        for mode in (0o600, 0o400):
            for _, name, _ in SECRET_FILES:
                os.chmod(self.pki_path(name), mode)
            node = self.load(extra=PASSWORD_FILE)
            self.assertEqual(node.repository.password_file,
                             self.pki_path("password"))
            self.assertEqual(node.loose_key_permissions, "refuse")

    def test_certificates_and_the_ca_may_be_world_readable(self):
        for name in PLACEHOLDERS:
            os.chmod(self.pki_path(name), 0o644)
        self.load()

    def test_a_chmod_the_message_names_fixes_it(self):
        os.chmod(self.pki_path("node1-key.pem"), 0o644)
        self.error()
        chmod = self.refusal("node1-key.pem", 0o644).rsplit(": ", 1)[1]
        subprocess.run(chmod.split(), check=True)
        self.load()

    def test_loose_key_permissions_warn_accepts_with_one_warning_each(self):
        for _, name, _ in SECRET_FILES:
            os.chmod(self.pki_path(name), 0o640)
        with capturedLogs() as events:
            node = self.load(node=NODE + 'loose_key_permissions = "warn"\n',
                             extra=PASSWORD_FILE)
        self.assertEqual(node.loose_key_permissions, "warn")
        self.assertEqual(
            [formatEvent(event) for event in events],
            [f"{self.path}: {key}: {self.refusal(name, 0o640)}; accepted, as "
             f"node.loose_key_permissions is \"warn\""
             for key, name, _ in SECRET_FILES])
        self.assertEqual({event["log_level"].name for event in events},
                         {"warn"})

    def test_loose_key_permissions_warn_is_silent_for_private_files(self):
        with capturedLogs() as events:
            self.load(node=NODE + 'loose_key_permissions = "warn"\n')
        self.assertEqual(list(events), [])

    def test_loose_key_permissions_takes_refuse_or_warn(self):
        self.assertError(
            self.error(node=NODE + 'loose_key_permissions = "allow"\n'),
            "node.loose_key_permissions",
            "'allow' is not one of 'refuse', 'warn'")


class EndpointErrorTests(_ConfigTestCase):
    """
    Endpoint strings that Twisted cannot build, or that sslshare refuses.
    """

    def test_client_endpoint_without_port(self):
        error = self.error(cluster=CLUSTER + 'node4 = "tcp:host=x"\n')
        self.assertEqual(error.key, "cluster.peers.node4")
        self.assertTrue(
            str(error).startswith(f"{self.path}: cluster.peers.node4: endpoint "
                                  f"'tcp:host=x' is invalid: "), str(error))
        self.assertIn("port", error.reason)

    def test_unknown_endpoint_type(self):
        self.assertError(
            self.error(node=edited(NODE, '"tcp:8441:interface=127.0.0.1"',
                                   '"tpc:8441"')),
            "node.listen",
            "endpoint 'tpc:8441' is invalid: Unknown endpoint type: 'tpc'")

    def test_client_syntax_where_a_server_endpoint_is_expected(self):
        error = self.error(cluster=edited(
            CLUSTER, 'listen = "tcp:7441:interface=127.0.0.1"',
            'listen = "tcp:host=127.0.0.1:port=7441"'))
        self.assertEqual(error.key, "cluster.listen")
        self.assertIn("unexpected keyword argument 'host'", error.reason)

    def test_misspelt_endpoint_parameter(self):
        error = self.error(node=edited(NODE, "interface=", "interfac="))
        self.assertEqual(error.key, "node.listen")
        self.assertIn("unexpected keyword argument 'interfac'", error.reason)

    def test_port_that_is_not_a_number(self):
        error = self.error(node=edited(NODE, "port=8080", "port=http"))
        self.assertEqual(error.key, "node.backend")
        self.assertIn("invalid literal for int()", error.reason)

    def test_port_out_of_range(self):
        self.assertError(
            self.error(node=edited(NODE, "port=8080", "port=80800")),
            "node.backend", "endpoint 'tcp:host=127.0.0.1:port=80800' is "
                            "invalid: port 80800 is not in 1..65535")

    def test_tls_endpoint_refused_where_sslshare_adds_tls(self):
        self.assertError(
            self.error(cluster=edited(CLUSTER, '"tcp:host=127.0.0.1:port=7442"',
                                      '"tls:127.0.0.1:7442"')),
            "cluster.peers.node2",
            "endpoint 'tls:127.0.0.1:7442' is invalid: sslshare adds TLS "
            "itself here, use a plain client endpoint such as tcp:")

    def test_ssl_listen_refused(self):
        self.assertError(
            self.error(node=edited(NODE, '"tcp:8441:interface=127.0.0.1"',
                                   '"ssl:8441"')),
            "node.listen",
            "endpoint 'ssl:8441' is invalid: sslshare adds TLS itself here, "
            "use a plain server endpoint such as tcp:")

    def test_bad_endpoint_in_a_listen_array_names_its_index(self):
        error = self.error(node=edited(
            NODE, 'listen = "tcp:8441:interface=127.0.0.1"',
            'listen = ["tcp:8441", "tcp:nope"]'))
        self.assertEqual(error.key, "node.listen[1]")

    def test_empty_listen_array(self):
        self.assertError(
            self.error(node=edited(NODE, 'listen = "tcp:8441:interface='
                                         '127.0.0.1"', "listen = []")),
            "node.listen", "needs at least one endpoint")

    def test_bad_metrics_endpoint(self):
        error = self.error(node=NODE + 'metrics_listen = "http:9441"\n')
        self.assertEqual(error.key, "node.metrics_listen")
        self.assertNotIn("\n", str(error))

    def test_log_format_is_text_by_default(self):
        self.assertEqual(self.load().log_format, "text")

    def test_backend_proxy_protocol(self):
        self.assertIsNone(self.load().backend_proxy_protocol)
        self.assertEqual(self.load(node=NODE + 'backend_proxy_protocol = '
                                              '"v2"\n').backend_proxy_protocol,
                         "v2")
        self.assertError(
            self.error(node=NODE + 'backend_proxy_protocol = "v3"\n'),
            "node.backend_proxy_protocol", "'v3' is not one of 'v1', 'v2'")

    def test_unknown_log_format(self):
        self.assertError(self.error(node=NODE + 'log_format = "xml"\n'),
                         "node.log_format", "'xml' is not one of 'text', 'json'")

    def test_log_format_is_a_string(self):
        self.assertError(self.error(node=NODE + "log_format = 1\n"),
                         "node.log_format", "expected a string, got an integer 1")


class ClusterErrorTests(_ConfigTestCase):
    """
    Peers and authorizations that do not fit together.
    """

    def test_peer_equal_to_self(self):
        self.assertError(
            self.error(cluster=CLUSTER + 'node1 = "tcp:host=127.0.0.1:'
                                         'port=7441"\n'),
            "cluster.peers.node1",
            "'node1' is this node (node.id): a node is not its own peer")

    def test_peer_id_that_is_not_a_valid_name(self):
        self.assertError(
            self.error(cluster=CLUSTER + '"node 4" = "tcp:host=x:port=1"\n'),
            "cluster.peers.node 4",
            "'node 4' is not a valid node id: use 1 to 64 characters of a-z, "
            "0-9, '.', '_' and '-', starting with a letter or a digit")

    def test_authorize_naming_an_unknown_node(self):
        self.assertError(
            self.error(cluster=CLUSTER + '[cluster.authorize]\n'
                                         'Purge = ["node2", "node4"]\n'),
            "cluster.authorize.Purge[1]",
            "'node4' is neither a peer (cluster.peers), this node ('node1'), "
            "nor '*' (any peer)")

    def test_peers_and_peers_from(self):
        self.assertError(
            self.error(cluster=CLUSTER.replace(
                "[cluster.peers]", 'peers_from = "dns-srv:_s._tcp.x"\n'
                                   '[cluster.peers]')),
            "cluster.peers_from",
            "give either cluster.peers or cluster.peers_from, not both")

    def test_peers_from_that_is_not_one(self):
        self.assertError(
            self.error(cluster=DISCOVERED.replace(
                "dns-srv:_sslshare._tcp.x.example", "dns:x.example")),
            "cluster.peers_from",
            "'dns:x.example': dns takes NAME:PORT, the port of the nodes' "
            "cluster listener")

    def test_dns_servers_without_peers_from(self):
        self.assertError(
            self.error(cluster=CLUSTER.replace(
                "[cluster.peers]", 'dns_servers = ["10.0.0.2"]\n'
                                   '[cluster.peers]')),
            "cluster.dns_servers", "used with cluster.peers_from only")

    def test_refresh_bounds_the_wrong_way_round(self):
        self.assertError(
            self.error(cluster=DISCOVERED + 'peers_refresh_min_s = 30\n'
                                            'peers_refresh_max_s = 10\n'),
            "cluster.peers_refresh_max_s",
            "10.0 is below peers_refresh_min_s (30.0)")

    def test_peers_from_admits_any_member_by_default(self):
        found = self.load(cluster=DISCOVERED + 'dns_servers = ["10.0.0.2", '
                                               '"[::1]:5353"]\n').cluster
        self.assertEqual((found.peers, found.peers_from, found.dns_servers,
                          found.peers_refresh),
                         ((), cluster.PeerSource(
                             "dns-srv", "_sslshare._tcp.x.example"),
                          (("10.0.0.2", 53), ("::1", 5353)), (5.0, 300.0)))
        self.assertTrue(found.allowed("FetchSession", "node9"))
        self.assertTrue(found.allowed("Stats", "node1"))

    def test_peers_from_takes_ids_not_known_yet_and_any_member(self):
        found = self.load(cluster=DISCOVERED + '[cluster.authorize]\n'
                                               'Purge = ["node7"]\n'
                                               'Stats = ["*"]\n').cluster
        self.assertEqual((found.allowed("Purge", "node7"),
                          found.allowed("Purge", "node8"),
                          found.allowed("Stats", "node8")),
                         (True, False, True))

    def test_peers_from_refuses_an_id_that_breaks_the_name_rule(self):
        error = self.error(cluster=DISCOVERED + '[cluster.authorize]\n'
                                                'Purge = ["no de"]\n')
        self.assertEqual(error.key, "cluster.authorize.Purge[0]")

    def test_authorize_naming_an_unknown_command(self):
        self.assertError(
            self.error(cluster=CLUSTER + '[cluster.authorize]\n'
                                         'Shutdown = ["node2"]\n'),
            "cluster.authorize.Shutdown",
            "unknown command (known: Backup, Checkpoint, FetchSession, Purge, "
            "Stats)")

    def test_authorize_command_misspelt(self):
        self.assertError(
            self.error(cluster=CLUSTER + '[cluster.authorize]\n'
                                         'FetchSessions = ["node2"]\n'),
            "cluster.authorize.FetchSessions",
            "unknown command (did you mean 'FetchSession'?)")

    def test_authorize_with_a_string_instead_of_an_array(self):
        self.assertError(
            self.error(cluster=CLUSTER + '[cluster.authorize]\n'
                                         'Stats = "node2"\n'),
            "cluster.authorize.Stats",
            "expected an array of strings, got a string 'node2'")


class TLSErrorTests(_ConfigTestCase):
    """
    TLS settings and services the server could not run with.
    """

    def test_unsupported_tls_version(self):
        self.assertError(self.error(tls='[tls]\nmin_version = "1.1"\n' + TLS),
                         "tls.min_version",
                         "TLS version '1.1' is not supported: use \"1.2\" or "
                         "\"1.3\"")

    def test_min_version_above_max_version(self):
        self.assertError(
            self.error(tls='[tls]\nmin_version = "1.3"\nmax_version = "1.2"\n'
                           + TLS),
            "tls.min_version", "'1.3' is above tls.max_version '1.2'")

    def test_duplicate_service_name(self):
        self.assertError(self.error(tls=TLS + TLS), "tls.service[1].name",
                         "service 'web' is already defined by tls.service[0]")

    def test_server_name_of_two_services(self):
        self.assertError(
            self.error(tls=TLS + 'server_names = ["localhost"]\n'
                       + edited(TLS, '"web"', '"other"')
                       + 'server_names = ["LOCALHOST"]\n'),
            "tls.service[1].server_names[0]",
            "'localhost' is already a name of service 'web'")

    def test_server_name_that_is_not_a_host_name(self):
        self.assertError(
            self.error(tls=TLS + 'server_names = ["local host"]\n'),
            "tls.service[0].server_names[0]",
            "'local host' is not a host name or *.wildcard")

    def test_service_written_with_single_brackets(self):
        self.assertError(
            self.error(tls=edited(TLS, "[[tls.service]]", "[tls.service]")),
            "tls.service", "expected an array of tables: write "
                           "[[tls.service]], with two brackets")

    def test_no_service(self):
        self.assertError(self.error(tls="[tls]\nservice = []\n"),
                         "tls.service", "needs at least one service")

    def test_alpn_listed_twice(self):
        self.assertError(
            self.error(tls='[tls]\nalpn = ["h2", "h2"]\n' + TLS),
            "tls.alpn[1]", "'h2' is listed twice")

    def test_alpn_mismatch_of_another_action(self):
        self.assertError(
            self.error(tls='[tls]\nalpn_mismatch = "drop"\n' + TLS),
            "tls.alpn_mismatch", "'drop' is not one of 'alert', 'ignore'")

    def test_tls12_ciphers_openssl_selects_none_of(self):
        self.assertError(
            self.error(tls='[tls]\ntls12_ciphers = "NO-SUCH-CIPHER"\n' + TLS),
            "tls.tls12_ciphers", "TLS 1.2 ciphers: no cipher match")

    def test_tls12_ciphers_not_a_string(self):
        self.assertError(
            self.error(tls='[tls]\ntls12_ciphers = ["AES128-SHA"]\n' + TLS),
            "tls.tls12_ciphers",
            "expected a string, got an array ['AES128-SHA']")

    def test_tls12_ciphers_not_ascii(self):
        self.assertError(
            self.error(tls='[tls]\ntls12_ciphers = "AES128-SHA:é"\n' + TLS),
            "tls.tls12_ciphers", "an OpenSSL cipher list is ASCII")


class RepositoryErrorTests(_ConfigTestCase):
    """
    A [repository] section the backends could not use.
    """

    def test_unknown_repository_kind(self):
        self.assertError(self.error(extra='[repository]\nkind = "mysql"\n'),
                         "repository.kind",
                         "'mysql' is not one of 'sqlite', 'postgres', 'redis'")

    def test_unknown_topology(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "sqlite"\npath = "x"\n'
                             'topology = "peers"\n'),
            "repository.topology", "'peers' is not one of 'repository', 'both'")

    def test_key_of_another_kind(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "sqlite"\npath = "x"\n'
                             'dsn = "host=db"\n'),
            "repository.dsn", "not used by kind 'sqlite' (it takes path)")

    def test_postgres_without_dsn(self):
        self.assertError(self.error(extra='[repository]\nkind = "postgres"\n'),
                         "repository.dsn", "missing required key")

    def test_redis_url_with_another_scheme(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "redis"\n'
                             'url = "http://u:hunter2@cache/"\n'),
            "repository.url",
            "http://u:***@cache/: not a redis://, rediss://, unix://, "
            "redis+cluster:// or rediss+cluster:// URL")

    def test_redis_url_and_sentinels(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "redis"\n'
                             'url = "redis://x"\nsentinels = ["s:1"]\n'
                             'service = "m"\n'),
            "repository", "give either url (a server or a cluster) or "
                          "sentinels, not both or neither")

    def test_redis_with_neither_url_nor_sentinels(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "redis"\n'),
            "repository", "give either url (a server or a cluster) or "
                          "sentinels, not both or neither")

    def test_sentinels_without_service(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "redis"\n'
                             'sentinels = ["s:1"]\n'),
            "repository.service", "missing required key")

    def test_service_without_sentinels(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "redis"\n'
                             'url = "redis://x"\nservice = "m"\n'),
            "repository.service", "used with sentinels only")

    def test_cluster_with_sentinels(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "redis"\n'
                             'sentinels = ["s:1"]\nservice = "m"\n'
                             'cluster = true\n'),
            "repository.cluster", "not used with sentinels")

    def test_empty_sentinels(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "redis"\n'
                             'sentinels = []\nservice = "m"\n'),
            "repository.sentinels", "names no sentinel")

    def test_sentinel_with_a_bad_port(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "redis"\n'
                             'sentinels = ["s:1", "t:99999"]\n'
                             'service = "m"\n'),
            "repository.sentinels[1]",
            "'t:99999': the port is not from 1 to 65535")

    def test_cluster_url_with_no_seed(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "redis"\n'
                             'url = "redis+cluster://u:pw@/"\n'),
            "repository.url",
            "redis+cluster://u:***@/: the URL names no seed node")

    def test_cluster_url_with_a_database(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "redis"\n'
                             'url = "redis+cluster://a:1,b:2/3"\n'),
            "repository.url",
            "redis+cluster://a:1,b:2/3: a Redis Cluster has database 0 only")

    def test_cluster_false_with_a_cluster_url(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "redis"\n'
                             'url = "redis+cluster://a:1"\ncluster = false\n'),
            "repository.cluster", "false, but the url names a cluster")

    def test_cluster_through_a_unix_socket(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "redis"\n'
                             'url = "unix:///run/redis.sock"\n'
                             'cluster = true\n'),
            "repository.cluster", "a cluster is not reached by a unix socket")

    def test_wait_replicas_out_of_range(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "redis"\n'
                             'url = "redis://x"\nwait_replicas = 17\n'),
            "repository.wait_replicas",
            "17 is out of range: must be from 0 to 16")

    def test_sentinel_keys_with_another_kind(self):
        self.assertError(
            self.error(extra='[repository]\nkind = "sqlite"\npath = "x"\n'
                             'sentinels = ["s:1"]\n'),
            "repository.sentinels", "not used by kind 'sqlite' (it takes "
                                    "path)")


def demo_tree(testcase):
    """
    A copy of the examples in demo/conf/, as C{sslshare demo} writes them,
    beside a demo/pki/ made as C{sslshare pki init demo/pki --cluster demo
    --nodes node1,node2,node3} makes it, in a new directory.  Returns that
    directory.
    """
    root = os.path.abspath(testcase.mktemp())
    shutil.copytree(CONF, os.path.join(root, "demo", "conf"))
    pki.init_pki(os.path.join(root, "demo", "pki"), "demo", DEMO_NODES)
    return root


class ShippedConfigTests(TestCase):
    """
    The examples' node1..3.toml and example.toml load against the demo PKI.
    """

    def setUp(self):
        self.root = demo_tree(self)

    def load(self, name):
        return config.load(os.path.join(self.root, "demo", "conf", name))

    def test_demo_pki_files_exist_under_the_expected_names(self):
        self.assertEqual(
            sorted(set(DEMO_PKI_FILES) - set(os.listdir(
                os.path.join(self.root, "demo", "pki")))), [])

    def test_demo_nodes_load(self):
        pki_dir = os.path.join(self.root, "demo", "pki")
        for number, node_id in enumerate(DEMO_NODES, 1):
            node = self.load(f"{node_id}.toml")
            self.assertEqual(
                (node.node_id, node.cluster_name, node.listen, node.backend,
                 node.cluster.listen, node.cluster.certificate,
                 node.cluster.key, node.cluster.ca, node.cluster.state_key,
                 node.state_dir, node.topology),
                (node_id, "demo", (f"tcp:844{number}:interface=127.0.0.1",),
                 "tcp:host=127.0.0.1:port=8080",
                 f"tcp:744{number}:interface=127.0.0.1",
                 os.path.join(pki_dir, f"{node_id}.pem"),
                 os.path.join(pki_dir, f"{node_id}-key.pem"),
                 os.path.join(pki_dir, "ca.pem"),
                 os.path.join(pki_dir, "state.key"),
                 os.path.join(self.root, "demo", "state", node_id), "peers"))
            self.assertEqual(
                [(s.name, s.certificate, s.key) for s in node.tls.services],
                [("web", os.path.join(pki_dir, "localhost-chain.pem"),
                  os.path.join(pki_dir, "localhost-key.pem"))])

    def test_demo_nodes_peer_with_each_others_cluster_listen_port(self):
        nodes = {node_id: self.load(f"{node_id}.toml") for node_id in DEMO_NODES}
        for node_id, node in nodes.items():
            expected = tuple(
                (peer, "tcp:host=127.0.0.1:port=" +
                 nodes[peer].cluster.listen.split(":")[1])
                for peer in DEMO_NODES if peer != node_id)
            self.assertEqual(node.cluster.peers, expected)

    def test_demo_writes_the_installed_node_files_beside_its_pki(self):
        from sslshare import examples
        from sslshare.dev import demo

        directory = os.path.join(self.root, "elsewhere")
        pki.init_pki(os.path.join(directory, "pki"), "demo", DEMO_NODES)
        conf = demo._node_files(directory, None, None)
        for node_id in DEMO_NODES:
            path = os.path.join(conf, f"{node_id}.toml")
            with open(path, encoding="utf-8") as f:
                self.assertEqual(f.read(), examples.text(f"{node_id}.toml"))
            node = config.load(path)
            self.assertEqual(node.cluster.ca,
                             os.path.join(directory, "pki", "ca.pem"))
            self.assertEqual(node.state_dir,
                             os.path.join(directory, "state", node_id))

    def test_example_loads(self):
        example = self.load("example.toml")
        node1 = self.load("node1.toml")
        self.assertEqual(
            (example.node_id, example.cluster, example.tls.services,
             example.state_dir),
            (node1.node_id, node1.cluster, node1.tls.services,
             node1.state_dir))

    def test_example_documents_every_key(self):
        # Keys written out or commented out ("# key = ...") under their
        # table's header, itself written out or commented out.
        found: dict[str, set[str]] = {"": set()}
        section = ""
        with open(os.path.join(CONF, "example.toml"), encoding="utf-8") as f:
            for line in f:
                header = re.match(r"\s*#?\s*\[\[?([\w.]+)\]\]?\s*$", line)
                if header:
                    section = header.group(1)
                    found.setdefault(section, set())
                    parent, _, child = section.rpartition(".")
                    found.setdefault(parent, set()).add(child)
                    continue
                key = re.match(r"\s*#?\s*(\w+)\s*=", line)
                if key:
                    found[section].add(key.group(1))
        self.assertEqual(
            {table: sorted(keys - found.get(table, set()))
             for table, keys in config.TABLE_KEYS.items()},
            {table: [] for table in config.TABLE_KEYS})


class WorkersConfigTests(_ConfigTestCase):
    """
    C{node.workers}: a number or C{"auto"}, and above 1 only for a node
    that shares sessions among its workers alone.
    """

    ALONE = edited(CLUSTER.split("[cluster.peers]")[0],
                   'listen = "tcp:7441:interface=127.0.0.1"\n', "")

    def test_default_is_one_worker(self):
        self.assertEqual(self.load().workers, 1)

    def test_auto_is_the_usable_cpus(self):
        node = self.load(node=NODE + 'workers = "auto"\n', cluster=self.ALONE)
        self.assertEqual(node.workers, len(os.sched_getaffinity(0)))

    def test_two_workers_of_a_node_alone(self):
        node = self.load(node=NODE + "workers = 2\n", cluster=self.ALONE)
        self.assertEqual((node.workers, node.worker, node.member_id),
                         (2, None, "node1"))

    def test_a_word_other_than_auto(self):
        self.assertError(self.error(node=NODE + 'workers = "all"\n',
                                    cluster=self.ALONE),
                         "node.workers", "'all' is neither 'auto' nor a number")

    def test_zero_workers(self):
        self.assertError(self.error(node=NODE + "workers = 0\n",
                                    cluster=self.ALONE),
                         "node.workers",
                         "0 is out of range: must be from 1 to 1024")

    def test_workers_with_peers(self):
        self.assertError(
            self.error(node=NODE + "workers = 2\n",
                       cluster=CLUSTER.replace('listen = "tcp:7441:interface='
                                               '127.0.0.1"\n', "")),
            "node.workers", "with workers above 1, the workers share their "
            "sessions through the host's table only: remove cluster.peers or "
            "set workers = 1")

    def test_workers_with_a_cluster_listener(self):
        self.assertError(
            self.error(node=NODE + "workers = 2\n",
                       cluster=CLUSTER.split("[cluster.peers]")[0]),
            "node.workers", "with workers above 1, the workers share their "
            "sessions through the host's table only: remove cluster.listen "
            "or set workers = 1")

    def test_workers_with_a_repository(self):
        self.assertError(
            self.error(node=NODE + "workers = 2\n", cluster=self.ALONE,
                       extra='[repository]\nkind = "sqlite"\n'),
            "node.workers", "with workers above 1, the workers share their "
            "sessions through the host's table only: remove [repository] or "
            "set workers = 1")

    def test_workers_with_a_metrics_page(self):
        self.assertError(
            self.error(node=NODE + "workers = 2\nmetrics_listen = "
                       '"tcp:9100:interface=127.0.0.1"\n', cluster=self.ALONE),
            "node.workers", "with workers above 1 there is no metrics page: "
            "remove node.metrics_listen or set workers = 1")

    def test_workers_on_a_unix_socket(self):
        self.assertError(
            self.error(node=edited(NODE, '"tcp:8441:interface=127.0.0.1"',
                                   '"unix:/tmp/n.sock"') + "workers = 2\n",
                       cluster=self.ALONE),
            "node.workers", "with workers above 1, every node.listen is a "
            "tcp: or tcp6: endpoint, not 'unix:/tmp/n.sock'")

    def test_node_id_too_long_for_its_workers_ids(self):
        self.assertError(
            self.error(node=edited(NODE, '"node1"', '"' + "n" * 60 + '"')
                       + "workers = 2\n", cluster=self.ALONE),
            "node.workers", "with workers above 1, node.id is at most 59 "
            "characters: each worker's id is the node's, a dot and its index")
