"""
A node's configuration: one TOML file, parsed once into frozen values.

L{load} reads the file with C{tomllib} and returns a L{NodeConfig}; code past
this module sees attrs values only, never a dict from TOML.  Everything a user
can get wrong is checked here, before a socket is opened, and reported as a
L{ConfigError} whose message is one line naming the file, the dotted key and
the reason::

    demo/conf/node1.toml: cluster.peers.node4: endpoint 'tcp:host=x' is invalid: ...

Elements of arrays are named by their index from 0 (C{node.listen[1]},
C{tls.service[0].certificate}).  What is checked:

    - TOML syntax (the reason carries tomllib's line and column), UTF-8;
    - unknown keys, which are nearly always typos (the message suggests the
      nearest known key), missing required keys, and the TOML type of every
      value (an integer is not a boolean, C{1.2} is not C{"1.2"});
    - ranges (C{lookup_budget_ms} 1..10000, C{max_concurrent_lookups} and
      C{max_lookups_per_client} 1..1000000, C{session_lifetime_s}
      60..86400, C{store_max_bytes} at least 64 KiB, ...);
    - file paths: relative ones are taken from the directory of the
      configuration file and stored absolute; certificates, keys, the CA and
      the state key file must exist and be readable regular files.  Their
      contents are not parsed here: the TLS layer and L{sslshare.state} do
      that and name the file when it is wrong.  Private keys, the state key
      and the repository's password file must be private to their owner:
      one that group or other may open is refused, or, with
      C{node.loose_key_permissions = "warn"}, accepted with a warning;
    - endpoint strings, by building them with Twisted's C{serverFromString}
      or C{clientFromString} (nothing listens or connects);
    - the cluster: node ids, peers that are not this node, and
      authorizations that name only known nodes and known commands.

This module never opens a socket, creates a directory (C{state_dir} is made
by the service) or reads a certificate, and holds no defaults anywhere but
here.
"""

from __future__ import annotations

import datetime
import difflib
import math
import os
import re
import shlex
import stat
import tomllib
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    clientFromString,
    serverFromString,
)
from twisted.logger import Logger

from sslshare import cluster, identity, proxyheader, tls
from sslshare.cluster import PeerSource
from sslshare.digest import MODES, CheckpointPolicy
from sslshare.addresses import AddressError, host_port
from sslshare.redis_targets import (
    MAX_WAIT_REPLICAS,
    SENTINEL_PORT,
    cluster_seeds,
    is_cluster_url,
    url_scheme_problem,
)

# The AMP commands a peer may be allowed to send: the channel's own list.
COMMANDS = tuple(sorted(cluster.COMMANDS))

TLS_VERSIONS = ("1.2", "1.3")
REPOSITORY_KINDS = ("sqlite", "postgres", "redis")
ANY_MEMBER = "*"
"""In a C{[cluster.authorize]} list: every node the channel admits (the
peers listed, or with C{peers_from} any node of the cluster)."""
DEFAULT_PEERS_REFRESH = (5.0, 300.0)
MAX_CONNECTIONS = 1_000_000
MAX_WORKERS = 1024
WORKERS_AUTO = "auto"
# As nginx stream's proxy_timeout.
DEFAULT_IDLE_TIMEOUT = 600.0
# What a redis repository takes: one server or a cluster by its URL, or
# the master that sentinels name.
_REDIS_KEYS = ("url", "cluster", "sentinels", "service", "wait_replicas",
               "password_file", "tls")
REPOSITORY_TOPOLOGIES = ("repository", "both")
LOG_FORMATS = ("text", "json")
# The access_log values that name no file.
ACCESS_LOG_TO_NODE_LOG = "-"
ACCESS_LOG_OFF = "off"
LOOSE_KEY_PERMISSIONS = ("refuse", "warn")
DEFAULT_LOOSE_KEY_PERMISSIONS = "refuse"
# The mode bits that let anyone but the owner at a secret file.
_NOT_OWNER = 0o077

DEFAULT_LOOKUP_BUDGET_MS = 50
DEFAULT_SESSION_LIFETIME_S = 3600
DEFAULT_STORE_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_HANDSHAKE_TIMEOUT_S = 10
DEFAULT_MAX_CONCURRENT_LOOKUPS = 1000
DEFAULT_MAX_LOOKUPS_PER_CLIENT = 100
MAX_LOOKUP_BOUND = 1000000
DEFAULT_DRAIN_TIMEOUT_S = 10
MAX_DRAIN_TIMEOUT_S = 600
MIN_STORE_MAX_BYTES = 64 * 1024

# The keys each table accepts.  sslshare/examples/example.toml documents each
# (a test holds it to that).  [cluster.peers] is not here: its keys are node
# ids.
TABLE_KEYS: Mapping[str, frozenset[str]] = {
    "": frozenset({"node", "tls", "cluster", "repository"}),
    "node": frozenset({
        "id", "cluster", "listen", "backend", "state_dir", "lookup_budget_ms",
        "session_lifetime_s", "store_max_bytes", "handshake_timeout_s",
        "metrics_listen", "log_format", "checkpoint", "checkpoint_period_ms",
        "checkpoint_bound", "checkpoint_max_pause", "max_concurrent_lookups",
        "max_lookups_per_client", "drain_timeout_s",
        "loose_key_permissions", "backend_proxy_protocol", "max_connections",
        "idle_timeout_s", "access_log", "workers"}),
    "tls": frozenset({"min_version", "max_version", "alpn", "alpn_mismatch",
                      "tls12_ciphers", "service"}),
    "tls.service": frozenset({"name", "certificate", "key", "server_names"}),
    "cluster": frozenset({
        "listen", "ca", "certificate", "key", "state_key", "peers",
        "peers_from", "dns_servers", "peers_refresh_min_s",
        "peers_refresh_max_s", "authorize"}),
    "cluster.authorize": frozenset(COMMANDS),
    "repository": frozenset({
        "kind", "topology", "path", "dsn", "password_file", "tls",
        *_REDIS_KEYS}),
}

CHECKPOINT_MODES = MODES
DEFAULT_CHECKPOINT_BOUND = CheckpointPolicy().bound
DEFAULT_CHECKPOINT_MAX_PAUSE = CheckpointPolicy().max_pause
# A pause is a wait a client sees; past a few seconds it is a hang.
MAX_CHECKPOINT_PAUSE = 10.0

_SERVER_NAME = re.compile(r"(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*")

# sslshare wraps these endpoints in its own TLS: an ssl:/tls: endpoint there
# would put TLS inside TLS.
_TLS_ENDPOINT_TYPES = frozenset({"ssl", "tls"})


class ConfigError(Exception):
    """
    A configuration file cannot be used.  C{str()} is one line,
    C{"<file>: <dotted.key>: <reason>"}, or C{"<file>: <reason>"} when the
    whole file is at fault (it cannot be read, or is not TOML).

    @ivar path: the configuration file, as given to L{load}.
    @ivar key: the dotted key at fault, or C{""}.
    @ivar reason: what is wrong.
    """

    def __init__(self, path: str, key: str, reason: str) -> None:
        # One line, whatever a library put in its message.
        reason = re.sub(r"\s*[\r\n]+\s*", " ", reason).strip()
        super().__init__(path, key, reason)
        self.path = path
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        if self.key:
            return f"{self.path}: {self.key}: {self.reason}"
        return f"{self.path}: {self.reason}"


@attrs.frozen
class ServiceConfig:
    """
    One virtual service of the client-facing TLS server.

    @ivar name: unique among the node's services; with the cluster name it
        makes the session id context, so it must be the same on every node.
    @ivar certificate: absolute path of the PEM chain, leaf first.
    @ivar key: absolute path of the PEM private key.
    @ivar server_names: lower-case SNI names (C{"*.example.com"} matches one
        label); the first service is also the default.
    """

    name: str
    certificate: str
    key: str
    server_names: tuple[str, ...] = ()


@attrs.frozen
class TLSConfig:
    """
    The client-facing TLS server: its services and protocol settings.
    """

    services: tuple[ServiceConfig, ...]
    min_version: str = "1.2"
    max_version: str = "1.3"
    alpn: tuple[bytes, ...] = ()
    alpn_mismatch: str = tls.DEFAULT_ALPN_MISMATCH
    tls12_ciphers: str = tls.DEFAULT_TLS12_CIPHERS


@attrs.frozen
class ClusterConfig:
    """
    The node-to-node channel: this node's identity, its peers, and who may
    send which command.

    @ivar listen: server endpoint string for peers' AMP connections, or
        C{None} when no peer may connect to this node.
    @ivar ca: absolute path of the cluster CA certificate.
    @ivar certificate: absolute path of this node's certificate (and chain).
    @ivar key: absolute path of this node's private key.
    @ivar state_key: absolute path of the cluster state key file.
    @ivar peers: (node id, client endpoint string) pairs, sorted by id;
        none with C{peers_from}.
    @ivar authorize: (command, node ids allowed to send it) for every
        command of L{COMMANDS}, sorted by command; L{ANY_MEMBER} among
        them lets every node the channel admits send it.
    @ivar peers_from: where DNS names the peers, instead of C{peers}.
    @ivar dns_servers: (host, port) of the DNS servers to ask; none: the
        system's (C{/etc/resolv.conf}).
    @ivar peers_refresh: seconds between lookups of C{peers_from}, at
        least and at most, whatever the records' TTL says.
    """

    listen: str | None
    ca: str
    certificate: str
    key: str
    state_key: str
    peers: tuple[tuple[str, str], ...]
    authorize: tuple[tuple[str, frozenset[str]], ...]
    peers_from: PeerSource | None = None
    dns_servers: tuple[tuple[str, int], ...] = ()
    peers_refresh: tuple[float, float] = DEFAULT_PEERS_REFRESH

    def peer_endpoint(self, node_id: str) -> str:
        """
        The client endpoint string of peer C{node_id}.

        @raise KeyError: C{node_id} is not a peer.
        """
        for peer, endpoint in self.peers:
            if peer == node_id:
                return endpoint
        raise KeyError(node_id)

    def allowed(self, command: str, node_id: str) -> bool:
        """
        Whether C{node_id} may send C{command}; C{False} for an unknown
        command.
        """
        for name, nodes in self.authorize:
            if name == command:
                return node_id in nodes or ANY_MEMBER in nodes
        return False


def _redact_password(url: str | None) -> str:
    # A DSN or URL may carry a password; reprs end up in logs.
    if url is None:
        return "None"
    try:
        parts = urlsplit(url)
        if parts.password is not None:
            netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
            url = urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "'<unparsed>'"
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", url)


@attrs.frozen
class RepositoryConfig:
    """
    The central session repository.

    @ivar kind: C{"sqlite"}, C{"postgres"} or C{"redis"}.
    @ivar topology: C{"both"}: recover from the owner peer, then from the
        repository; C{"repository"}: from the repository only.
    @ivar path: absolute path of the SQLite file (sqlite only).
    @ivar dsn: the libpq connection string (postgres only).
    @ivar url: C{redis://}, C{rediss://}, C{unix://}, C{redis+cluster://}
        or C{rediss+cluster://} URL (redis only; see
        L{sslshare.redis_targets}).
    @ivar password_file: absolute path of a file holding the password
        (postgres and redis).
    @ivar tls: connect to the server over TLS (postgres and redis).
    @ivar cluster: C{url} is a seed of a Redis Cluster (redis only).
    @ivar sentinels: (host, port) of each Redis Sentinel, instead of
        C{url}; C{service} names the master they watch (redis only).
    @ivar wait_replicas: replicas each Redis write waits for; C{None}: one
        with sentinels, none otherwise (redis only).
    """

    kind: str
    topology: str = "both"
    path: str | None = None
    dsn: str | None = attrs.field(default=None, repr=_redact_password)
    url: str | None = attrs.field(default=None, repr=_redact_password)
    password_file: str | None = None
    tls: bool = False
    cluster: bool = False
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    wait_replicas: int | None = None


@attrs.frozen(kw_only=True)
class NodeConfig:
    """
    Everything one node runs with.

    @ivar path: absolute path of the configuration file.
    @ivar node_id: this node's id, as in its certificate's URI.
    @ivar cluster_name: the cluster's name, as in the certificates' URIs.
    @ivar listen: server endpoint strings for TLS clients (at least one).
    @ivar backend: client endpoint string of the plaintext backend.
    @ivar backend_proxy_protocol: the PROXY protocol header (C{"v1"} or
        C{"v2"}) written to the backend before the plaintext, or C{None}.
    @ivar max_connections: client connections open at once at most, or
        C{None}.
    @ivar idle_timeout: seconds a connection may be silent both ways after
        its handshake before it is closed.
    @ivar state_dir: absolute path of the node's own directory; the service
        creates it.
    @ivar lookup_budget: seconds a paused handshake may wait for a session.
    @ivar max_concurrent_lookups: lookups this node may have out at once
        (at its peers or the repository); past it a handshake is full.
    @ivar max_lookups_per_client: the same bound for one client address.
    @ivar session_lifetime: seconds a TLS session stays resumable.
    @ivar store_max_bytes: bound of the in-memory session store.
    @ivar handshake_timeout: seconds a client has to finish its handshake.
    @ivar drain_timeout: seconds a stopping node gives its open client
        connections and the handover of its sessions.
    @ivar metrics_listen: server endpoint string for metrics, or C{None}.
    @ivar log_format: how C{twistd} writes the node's log: C{"text"}
        lines, or C{"json"}, one JSON object per line.
    @ivar access_log: where each client connection is logged as it ends
        (L{sslshare.accesslog}): the absolute path of a file,
        L{ACCESS_LOG_TO_NODE_LOG} for the node's own log, or C{None} (off).
    @ivar loose_key_permissions: what becomes of a secret file (a private
        key, the state key, the repository's password file) that group or
        other may open: C{"refuse"}d, or accepted with a C{"warn"}ing.
    @ivar checkpoint: when the running digest of each connection's records
        is checkpointed outside the node (C{every-record}, C{interval}
        with its period, or C{off}), how many unacknowledged records
        pause a connection, and for how long at most.
    @ivar workers: how many worker processes serve the node's addresses
        (C{"auto"} in the file: the CPUs this process may run on).
    @ivar worker: which of them this process is (set by the service that
        runs it, never by the file), or C{None}.
    """

    path: str
    node_id: str
    cluster_name: str
    listen: tuple[str, ...]
    backend: str
    state_dir: str
    backend_proxy_protocol: str | None = None
    max_connections: int | None = None
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    lookup_budget: float = DEFAULT_LOOKUP_BUDGET_MS / 1000
    max_concurrent_lookups: int = DEFAULT_MAX_CONCURRENT_LOOKUPS
    max_lookups_per_client: int = DEFAULT_MAX_LOOKUPS_PER_CLIENT
    session_lifetime: int = DEFAULT_SESSION_LIFETIME_S
    store_max_bytes: int = DEFAULT_STORE_MAX_BYTES
    handshake_timeout: float = float(DEFAULT_HANDSHAKE_TIMEOUT_S)
    drain_timeout: float = float(DEFAULT_DRAIN_TIMEOUT_S)
    checkpoint: CheckpointPolicy = CheckpointPolicy()
    tls: TLSConfig
    cluster: ClusterConfig
    repository: RepositoryConfig | None = None
    metrics_listen: str | None = None
    log_format: str = "text"
    access_log: str | None = None
    loose_key_permissions: str = DEFAULT_LOOSE_KEY_PERMISSIONS
    workers: int = 1
    worker: int | None = None

    @property
    def member_id(self) -> str:
        """
        The name this process's sessions give as their holder and owner:
        the node id, or for one of its workers the node id, a dot and the
        worker's index.
        """
        if self.worker is None:
            return self.node_id
        return f"{self.node_id}.{self.worker}"

    @property
    def topology(self) -> str:
        """
        Where sessions are recovered from: C{"peers"} without a repository,
        else the repository's topology.
        """
        return "peers" if self.repository is None else self.repository.topology


def tcp_address(reactor: Any, endpoint: str) -> tuple[str, int, int] | None:
    """
    The host, port and backlog a C{tcp:} or C{tcp6:} server endpoint
    string listens on, or C{None} for any other kind of endpoint.
    """
    parsed = serverFromString(reactor, endpoint)
    if not isinstance(parsed, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        return None
    # Twisted keeps them private; they are what the string said.
    default = "::" if isinstance(parsed, TCP6ServerEndpoint) else "0.0.0.0"
    return parsed._interface or default, parsed._port, parsed._backlog


def load(path: str, reactor: Any = None) -> NodeConfig:
    """
    Read and check the configuration file at C{path}.

    @param reactor: the reactor endpoint strings are built with; the global
        one when C{None}.
    @raise ConfigError: the file is missing, unreadable, not TOML, or any
        value in it is wrong.
    """
    if reactor is None:
        # Imported here: importing the global reactor installs it, which a
        # caller that passes its own reactor does not want.
        from twisted.internet import reactor
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(path, "", f"not UTF-8 text: {e.reason} (at line "
                                    f"{line}, column {column})") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"not valid TOML: {e}") from None
    return _Reader(path, reactor).node(document)


# The TOML names of Python's values, for "expected X, got Y".
def _toml_type(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"),
                       (float, "a float"), (str, "a string"),
                       (list, "an array"), (dict, "a table"),
                       (datetime.datetime, "a date-time"),
                       (datetime.date, "a date"), (datetime.time, "a time")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


class _Table:
    """
    One TOML table being read: checks its keys against those it accepts,
    and the type of each value it hands out.
    """

    def __init__(self, reader: _Reader, key: str, data: dict[str, Any],
                 known: Iterable[str], noun: str = "key") -> None:
        self.reader = reader
        self.key = key
        self.data = data
        known = sorted(known)
        # Before anything is read: a typo'd key is the likely cause of a
        # "missing key" error that would otherwise come first.
        for name in data:
            if name not in known:
                reason = f"unknown {noun}"
                # A stricter cutoff than difflib's 0.6, which offers
                # "cluster" for "colour".
                close = difflib.get_close_matches(name, known, n=1,
                                                  cutoff=0.7)
                if close:
                    reason += f" (did you mean {close[0]!r}?)"
                elif noun != "key":
                    reason += f" (known: {', '.join(known)})"
                raise reader.error(_join(key, name), reason)

    def child(self, name: str) -> str:
        return _join(self.key, name)

    def value(self, name: str, check: Callable[[str, Any], Any],
              default: Any = None, required: bool = False) -> Any:
        if name not in self.data:
            if required:
                raise self.reader.error(self.child(name), "missing required key")
            return default
        return check(self.child(name), self.data[name])

    def table(self, name: str, known: Iterable[str], required: bool = False,
              noun: str = "key") -> _Table | None:
        data = self.value(name, self.reader.table_value, required=required)
        if data is None:
            return None
        return _Table(self.reader, self.child(name), data, known, noun)


class _Reader:
    """
    The checks of one configuration file: each method takes the dotted key
    and the TOML value, and returns the checked value or raises
    L{ConfigError}.
    """

    _log = Logger()

    def __init__(self, path: str, reactor: Any) -> None:
        self.path = path
        self.directory = os.path.dirname(os.path.abspath(path))
        self.reactor = reactor
        # Read from [node] before the tables that name secret files.
        self.loose_key_permissions = DEFAULT_LOOSE_KEY_PERMISSIONS

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.path, key, reason)

    def expect(self, key: str, value: Any, kinds: tuple[type, ...],
               expected: str) -> None:
        # bool is an int in Python, never in TOML.
        if isinstance(value, bool) and bool not in kinds \
                or not isinstance(value, kinds):
            hint = ""
            if expected.startswith("a string") and isinstance(value, float):
                hint = f" (write it in quotes: \"{value}\")"
            raise self.error(key, f"expected {expected}, got "
                                  f"{_toml_type(value)} {_shown(value)}{hint}")

    # Scalars.

    def table_value(self, key: str, value: Any) -> dict[str, Any]:
        self.expect(key, value, (dict,), "a table")
        return value

    def string(self, key: str, value: Any) -> str:
        self.expect(key, value, (str,), "a string")
        if not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def boolean(self, key: str, value: Any) -> bool:
        self.expect(key, value, (bool,), "a boolean (true or false)")
        return value

    def integer(self, low: int, high: int | None) -> Callable[[str, Any], int]:
        def check(key: str, value: Any) -> int:
            self.expect(key, value, (int,), "an integer")
            if value < low or (high is not None and value > high):
                bounds = (f"from {low} to {high}" if high is not None
                          else f"at least {low}")
                raise self.error(key, f"{value} is out of range: must be "
                                      f"{bounds}")
            return value
        return check

    def seconds(self, low: float, high: float) -> Callable[[str, Any], float]:
        def check(key: str, value: Any) -> float:
            self.expect(key, value, (int, float), "a number")
            if not (math.isfinite(value) and low < value <= high):
                raise self.error(key, f"{value} is out of range: must be "
                                      f"above {low} and at most {high}")
            return float(value)
        return check

    def choice(self, choices: tuple[str, ...]) -> Callable[[str, Any], str]:
        def check(key: str, value: Any) -> str:
            self.expect(key, value, (str,), "a string")
            if value not in choices:
                raise self.error(key, f"{value!r} is not one of "
                                      + ", ".join(map(repr, choices)))
            return value
        return check

    def name(self, key: str, value: Any) -> str:
        self.string(key, value)
        if not identity.is_name(value):
            raise self.error(key, f"{value!r} is not a valid name: use "
                                  f"{identity.NAME_RULE}")
        return value

    def strings(self, key: str, value: Any) -> list[tuple[str, str]]:
        """
        An array of strings, as (element key, string) pairs.
        """
        self.expect(key, value, (list,), "an array of strings")
        return [(f"{key}[{i}]", self.string(f"{key}[{i}]", item))
                for i, item in enumerate(value)]

    # Files.

    def file_path(self, key: str, value: Any) -> str:
        """
        An absolute path, not necessarily existing.
        """
        self.string(key, value)
        return os.path.normpath(os.path.join(self.directory, value))

    def _regular_file(self, key: str, value: Any) -> tuple[str, str, int]:
        """
        The absolute path of a readable regular file, how to show it, and
        its mode.
        """
        path = self.file_path(key, value)
        shown = repr(value) if path == value else f"{value!r} ({path})"
        try:
            # O_NONBLOCK: a FIFO put there by mistake must not hang load().
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise self.error(key, f"cannot read {shown}: {e.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
        finally:
            os.close(fd)
        if not stat.S_ISREG(mode):
            what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise self.error(key, f"cannot read {shown}: {what}")
        return path, shown, mode

    def readable_file(self, key: str, value: Any) -> str:
        return self._regular_file(key, value)[0]

    def secret_file(self, key: str, value: Any) -> str:
        """
        A readable regular file that only its owner may open: a private
        key, the state key or a password.  A group-readable key (Debian's
        ssl-cert group) passes with a warning under
        C{node.loose_key_permissions = "warn"}.
        """
        path, shown, mode = self._regular_file(key, value)
        if not mode & _NOT_OWNER:
            return path
        if mode & 0o044:
            why = "readable by group/other"
        elif mode & 0o022:
            why = "writable by group/other"
        else:
            why = "open to group/other"
        problem = (f"{shown} is mode {stat.S_IMODE(mode):04o} ({why}): "
                   f"chmod 600 {shlex.quote(path)}")
        if self.loose_key_permissions != "warn":
            raise self.error(key, problem)
        self._log.warn("{problem}", problem=str(self.error(
            key, f"{problem}; accepted, as node.loose_key_permissions is "
                 f"\"warn\"")))
        return path

    def access_log(self, key: str, value: Any) -> str | None:
        """
        C{None} for C{"off"}, C{"-"} as it is, else the absolute path of
        a file the node can append to: one that exists and is a regular
        file, or one it can make in a directory that exists.  Nothing is
        made here (C{sslshare config check} writes nothing).
        """
        self.string(key, value)
        if value == ACCESS_LOG_OFF:
            return None
        if value == ACCESS_LOG_TO_NODE_LOG:
            return value
        path = self.file_path(key, value)
        shown = repr(value) if path == value else f"{value!r} ({path})"
        if os.path.exists(path):
            mode = os.stat(path).st_mode
            if stat.S_ISDIR(mode):
                raise self.error(key, f"cannot write {shown}: a directory")
            # A FIFO would hang the node's start until a reader came.
            if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
                raise self.error(key, f"cannot write {shown}: not a regular "
                                      f"file")
            if not os.access(path, os.W_OK):
                raise self.error(key, f"cannot write {shown}: permission "
                                      f"denied")
            return path
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            raise self.error(key, f"cannot write {shown}: no directory "
                                  f"{directory}")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise self.error(key, f"cannot write {shown}: cannot make files "
                                  f"in {directory}")
        return path

    # Endpoints.

    def _endpoint(self, key: str, value: Any, build: Callable[[Any, str], Any],
                  side: str, plain: bool, lowest_port: int) -> str:
        self.string(key, value)
        kind = value.split(":", 1)[0].strip().lower()
        if plain and kind in _TLS_ENDPOINT_TYPES:
            raise self.error(key, f"endpoint {value!r} is invalid: sslshare "
                                  f"adds TLS itself here, use a plain {side} "
                                  f"endpoint such as tcp:")
        try:
            endpoint = build(self.reactor, value)
        except KeyError as e:
            raise self.error(key, f"endpoint {value!r} is invalid: missing "
                                  f"{e.args[0]!r}") from None
        except Exception as e:
            # Anything that fails while Twisted parses the user's string
            # (ValueError, TypeError, IndexError from a plugin's parser,
            # OSError from an ssl: endpoint's missing certificate) is a fault
            # of that string.
            raise self.error(key, f"endpoint {value!r} is invalid: "
                                  f"{e or type(e).__name__}") from None
        # Twisted does not range-check TCP ports; its endpoints keep the
        # port in _port.  Without that attribute the check is skipped.
        port = getattr(endpoint, "_port", None)
        if isinstance(port, int) and not lowest_port <= port <= 65535:
            raise self.error(key, f"endpoint {value!r} is invalid: port "
                                  f"{port} is not in {lowest_port}..65535")
        return value

    def server_endpoint(self, plain: bool = True) -> Callable[[str, Any], str]:
        return lambda key, value: self._endpoint(
            key, value, serverFromString, "server", plain, 0)

    def client_endpoint(self, plain: bool = True) -> Callable[[str, Any], str]:
        return lambda key, value: self._endpoint(
            key, value, clientFromString, "client", plain, 1)

    # Tables.

    def node(self, document: dict[str, Any]) -> NodeConfig:
        top = _Table(self, "", document, TABLE_KEYS[""])
        node = top.table("node", TABLE_KEYS["node"], required=True)
        assert node is not None
        node_id = node.value("id", self.name, required=True)
        cluster_name = node.value("cluster", self.name, required=True)
        listen = node.value("listen", self.listen, required=True)
        backend = node.value("backend", self.client_endpoint(plain=False),
                             required=True)
        state_dir = node.value(
            "state_dir", self.file_path,
            default=os.path.join(self.directory, "state", node_id))
        budget_ms = node.value("lookup_budget_ms", self.integer(1, 10000),
                               default=DEFAULT_LOOKUP_BUDGET_MS)
        max_lookups = node.value(
            "max_concurrent_lookups", self.integer(1, MAX_LOOKUP_BOUND),
            default=DEFAULT_MAX_CONCURRENT_LOOKUPS)
        max_client_lookups = node.value(
            "max_lookups_per_client", self.integer(1, MAX_LOOKUP_BOUND),
            default=DEFAULT_MAX_LOOKUPS_PER_CLIENT)
        lifetime = node.value("session_lifetime_s", self.integer(60, 86400),
                              default=DEFAULT_SESSION_LIFETIME_S)
        store_max_bytes = node.value(
            "store_max_bytes", self.integer(MIN_STORE_MAX_BYTES, None),
            default=DEFAULT_STORE_MAX_BYTES)
        handshake_timeout = node.value(
            "handshake_timeout_s", self.seconds(0, 300),
            default=float(DEFAULT_HANDSHAKE_TIMEOUT_S))
        drain_timeout = node.value(
            "drain_timeout_s", self.seconds(0, MAX_DRAIN_TIMEOUT_S),
            default=float(DEFAULT_DRAIN_TIMEOUT_S))
        metrics_listen = node.value("metrics_listen",
                                    self.server_endpoint(plain=False))
        log_format = node.value("log_format", self.choice(LOG_FORMATS),
                                default="text")
        access_log = node.value("access_log", self.access_log)
        self.loose_key_permissions = node.value(
            "loose_key_permissions", self.choice(LOOSE_KEY_PERMISSIONS),
            default=DEFAULT_LOOSE_KEY_PERMISSIONS)
        checkpoint = CheckpointPolicy(
            mode=node.value("checkpoint", self.choice(CHECKPOINT_MODES),
                            default="every-record"),
            period=node.value("checkpoint_period_ms", self.integer(1, 3600000),
                              default=1000) / 1000,
            bound=node.value("checkpoint_bound", self.integer(1, 1000000),
                             default=DEFAULT_CHECKPOINT_BOUND),
            max_pause=node.value("checkpoint_max_pause",
                                 self.seconds(0, MAX_CHECKPOINT_PAUSE),
                                 default=DEFAULT_CHECKPOINT_MAX_PAUSE),
        )
        tls_table = top.table("tls", TABLE_KEYS["tls"], required=True)
        assert tls_table is not None
        cluster_table = top.table("cluster", TABLE_KEYS["cluster"],
                                  required=True)
        assert cluster_table is not None
        repository_table = top.table("repository", TABLE_KEYS["repository"])
        workers = node.value("workers", self.workers, default=1)
        if workers > 1:
            self.workers_allowed(node, listen, metrics_listen, cluster_table,
                                 repository_table)
        return NodeConfig(
            path=os.path.abspath(self.path),
            node_id=node_id,
            cluster_name=cluster_name,
            listen=listen,
            backend=backend,
            backend_proxy_protocol=node.value(
                "backend_proxy_protocol", self.choice(proxyheader.VERSIONS)),
            max_connections=node.value("max_connections",
                                       self.integer(1, MAX_CONNECTIONS)),
            idle_timeout=node.value("idle_timeout_s", self.seconds(0, 86400),
                                    default=DEFAULT_IDLE_TIMEOUT),
            state_dir=state_dir,
            lookup_budget=budget_ms / 1000,
            max_concurrent_lookups=max_lookups,
            max_lookups_per_client=max_client_lookups,
            session_lifetime=lifetime,
            store_max_bytes=store_max_bytes,
            handshake_timeout=handshake_timeout,
            drain_timeout=drain_timeout,
            metrics_listen=metrics_listen,
            log_format=log_format,
            access_log=access_log,
            loose_key_permissions=self.loose_key_permissions,
            workers=workers,
            checkpoint=checkpoint,
            tls=self.tls(tls_table),
            cluster=self.cluster(cluster_table, node_id),
            repository=(None if repository_table is None
                        else self.repository(repository_table)),
        )

    def workers(self, key: str, value: Any) -> int:
        if value == WORKERS_AUTO:
            return len(os.sched_getaffinity(0))
        if isinstance(value, str):
            raise self.error(key, f"{value!r} is neither {WORKERS_AUTO!r} "
                                  f"nor a number")
        return self.integer(1, MAX_WORKERS)(key, value)

    def workers_allowed(self, node: _Table, listen: tuple[str, ...],
                        metrics_listen: str | None, cluster_table: _Table,
                        repository_table: _Table | None) -> None:
        """
        Refuse what a node of several worker processes does not do: its
        workers share their sessions through the host's table, and serve
        TCP addresses only; it has no repository, no peers and no metrics
        page.
        """
        why = ("with workers above 1, the workers share their sessions "
               "through the host's table only")
        key = node.child("workers")
        if repository_table is not None:
            raise self.error(key, f"{why}: remove [repository] or set "
                                  f"workers = 1")
        for other in ("listen", "peers", "peers_from"):
            if cluster_table.data.get(other):
                raise self.error(key, f"{why}: remove cluster.{other} or set "
                                      f"workers = 1")
        if metrics_listen is not None:
            raise self.error(key, "with workers above 1 there is no metrics "
                                  "page: remove node.metrics_listen or set "
                                  "workers = 1")
        longest = identity.MAX_NAME_LENGTH - len(f".{MAX_WORKERS}")
        if len(node.data["id"]) > longest:
            raise self.error(key, f"with workers above 1, node.id is at most "
                                  f"{longest} characters: each worker's id "
                                  f"is the node's, a dot and its index")
        for endpoint in listen:
            if tcp_address(self.reactor, endpoint) is None:
                raise self.error(key, f"with workers above 1, every "
                                      f"node.listen is a tcp: or tcp6: "
                                      f"endpoint, not {endpoint!r}")

    def listen(self, key: str, value: Any) -> tuple[str, ...]:
        check = self.server_endpoint()
        if isinstance(value, str):
            return (check(key, value),)
        self.expect(key, value, (str, list),
                    "a string or an array of strings")
        if not value:
            raise self.error(key, "needs at least one endpoint")
        return tuple(check(item_key, item)
                     for item_key, item in self.strings(key, value))

    def tls(self, table: _Table) -> TLSConfig:
        min_version = table.value("min_version", self.tls_version, default="1.2")
        max_version = table.value("max_version", self.tls_version, default="1.3")
        if TLS_VERSIONS.index(min_version) > TLS_VERSIONS.index(max_version):
            raise self.error(table.child("min_version"),
                             f"{min_version!r} is above tls.max_version "
                             f"{max_version!r}")
        alpn = table.value("alpn", self.alpn, default=())
        alpn_mismatch = table.value(
            "alpn_mismatch", self.choice(tls.ALPN_MISMATCH_ACTIONS),
            default=tls.DEFAULT_ALPN_MISMATCH)
        tls12_ciphers = table.value("tls12_ciphers", self.tls12_ciphers,
                                    default=tls.DEFAULT_TLS12_CIPHERS)
        services = table.value("service", self.services, required=True)
        return TLSConfig(services=services, min_version=min_version,
                         max_version=max_version, alpn=alpn,
                         alpn_mismatch=alpn_mismatch,
                         tls12_ciphers=tls12_ciphers)

    def tls_version(self, key: str, value: Any) -> str:
        self.expect(key, value, (str,), "a string")
        if value not in TLS_VERSIONS:
            raise self.error(key, f"TLS version {value!r} is not supported: "
                                  f"use \"1.2\" or \"1.3\"")
        return value

    def alpn(self, key: str, value: Any) -> tuple[bytes, ...]:
        protocols: list[bytes] = []
        for item_key, item in self.strings(key, value):
            encoded = item.encode("utf-8")
            if len(encoded) > 255:
                raise self.error(item_key, "an ALPN protocol name is at most "
                                           "255 bytes")
            if encoded in protocols:
                raise self.error(item_key, f"{item!r} is listed twice")
            protocols.append(encoded)
        return tuple(protocols)

    def tls12_ciphers(self, key: str, value: Any) -> str:
        self.expect(key, value, (str,), "a string")
        if not value.isascii():
            raise self.error(key, "an OpenSSL cipher list is ASCII")
        try:
            tls.check_tls12_ciphers(value)
        except tls.TLSConfigurationError as e:
            raise self.error(key, str(e)) from None
        return value

    def services(self, key: str, value: Any) -> tuple[ServiceConfig, ...]:
        if isinstance(value, dict):
            raise self.error(key, "expected an array of tables: write "
                                  "[[tls.service]], with two brackets")
        self.expect(key, value, (list,), "an array of tables ([[tls.service]])")
        if not value:
            raise self.error(key, "needs at least one service")
        services: list[ServiceConfig] = []
        names: dict[str, str] = {}
        server_names: dict[str, str] = {}
        for i, item in enumerate(value):
            item_key = f"{key}[{i}]"
            table = _Table(self, item_key, self.table_value(item_key, item),
                           TABLE_KEYS["tls.service"])
            name = table.value("name", self.name, required=True)
            if name in names:
                raise self.error(table.child("name"),
                                 f"service {name!r} is already defined by "
                                 f"{names[name]}")
            names[name] = item_key
            certificate = table.value("certificate", self.readable_file,
                                      required=True)
            private_key = table.value("key", self.secret_file, required=True)
            listed = []
            for name_key, server_name in table.value(
                    "server_names", self.strings, default=[]):
                server_name = server_name.lower()
                if not _SERVER_NAME.fullmatch(server_name):
                    raise self.error(name_key, f"{server_name!r} is not a "
                                               f"host name or *.wildcard")
                if server_name in server_names:
                    raise self.error(name_key, f"{server_name!r} is already a "
                                               f"name of "
                                               f"{server_names[server_name]}")
                server_names[server_name] = f"service {name!r}"
                listed.append(server_name)
            services.append(ServiceConfig(name=name, certificate=certificate,
                                          key=private_key,
                                          server_names=tuple(listed)))
        return tuple(services)

    def cluster(self, table: _Table, node_id: str) -> ClusterConfig:
        listen = table.value("listen", self.server_endpoint())
        ca = table.value("ca", self.readable_file, required=True)
        certificate = table.value("certificate", self.readable_file,
                                  required=True)
        private_key = table.value("key", self.secret_file, required=True)
        state_key = table.value("state_key", self.secret_file, required=True)
        peers: list[tuple[str, str]] = []
        peers_table = table.value("peers", self.table_value, default={})
        peers_key = table.child("peers")
        endpoint = self.client_endpoint()
        for peer, description in peers_table.items():
            peer_key = _join(peers_key, peer)
            if not identity.is_name(peer):
                raise self.error(peer_key, f"{peer!r} is not a valid node id: "
                                           f"use {identity.NAME_RULE}")
            if peer == node_id:
                raise self.error(peer_key, f"{peer!r} is this node "
                                           f"(node.id): a node is not its "
                                           f"own peer")
            peers.append((peer, endpoint(peer_key, description)))
        peers.sort()
        peers_from = table.value("peers_from", self.peer_source)
        if peers_from is not None and peers:
            raise self.error(table.child("peers_from"),
                             "give either cluster.peers or "
                             "cluster.peers_from, not both")
        discovery: dict[str, Any] = {}
        if peers_from is not None:
            discovery = dict(
                peers_from=peers_from,
                dns_servers=tuple(
                    self.address(item_key, item, 53) for item_key, item
                    in table.value("dns_servers", self.strings, default=[])),
                peers_refresh=self.refresh_bounds(table))
        else:
            for name in ("dns_servers", "peers_refresh_min_s",
                         "peers_refresh_max_s"):
                if name in table.data:
                    raise self.error(table.child(name),
                                     "used with cluster.peers_from only")
        peer_ids = frozenset(peer for peer, _ in peers)
        # Peers found in DNS cannot be named in advance: any member.
        members = (frozenset({ANY_MEMBER}) if peers_from is not None
                   else peer_ids)
        # The `sslshare stats` command connects with the node's own
        # certificate, so Stats is open to the node itself by default.
        authorize = {command: members for command in COMMANDS}
        authorize["Stats"] = members | {node_id}
        authorize_table = table.table("authorize", COMMANDS, noun="command")
        if authorize_table is not None:
            known = peer_ids | {node_id, ANY_MEMBER}
            for command in COMMANDS:
                nodes = authorize_table.value(command, self.strings)
                if nodes is None:
                    continue
                for item_key, named in nodes:
                    if peers_from is not None and named != ANY_MEMBER:
                        self.name(item_key, named)
                    elif named not in known:
                        raise self.error(
                            item_key, f"{named!r} is neither a peer "
                                      f"(cluster.peers), this node "
                                      f"({node_id!r}), nor "
                                      f"{ANY_MEMBER!r} (any peer)")
                authorize[command] = frozenset(named for _, named in nodes)
        return ClusterConfig(
            listen=listen, ca=ca, certificate=certificate, key=private_key,
            state_key=state_key, peers=tuple(peers),
            authorize=tuple(sorted(authorize.items())), **discovery)

    def peer_source(self, key: str, value: Any) -> PeerSource:
        """
        C{dns-srv:NAME} or C{dns:NAME:PORT}.
        """
        self.string(key, value)
        try:
            return cluster.peer_source(value)
        except AddressError as e:
            raise self.error(key, str(e)) from None

    def refresh_bounds(self, table: _Table) -> tuple[float, float]:
        low = table.value("peers_refresh_min_s", self.seconds(0, 3600),
                          default=DEFAULT_PEERS_REFRESH[0])
        high = table.value("peers_refresh_max_s", self.seconds(0, 86400),
                           default=DEFAULT_PEERS_REFRESH[1])
        if high < low:
            raise self.error(table.child("peers_refresh_max_s"),
                             f"{high} is below peers_refresh_min_s ({low})")
        return low, high

    def repository(self, table: _Table) -> RepositoryConfig:
        kind = table.value("kind", self.choice(REPOSITORY_KINDS), required=True)
        topology = table.value("topology", self.choice(REPOSITORY_TOPOLOGIES),
                               default="both")
        # Which keys each kind takes; the others are mistakes, not options.
        takes = {
            "sqlite": ("path",),
            "postgres": ("dsn", "password_file", "tls"),
            "redis": _REDIS_KEYS,
        }[kind]
        for name in ("path", "dsn", "password_file", "tls", *_REDIS_KEYS):
            if name in table.data and name not in takes:
                raise self.error(table.child(name),
                                 f"not used by kind {kind!r} (it takes "
                                 f"{', '.join(takes)})")
        path = dsn = None
        redis: dict[str, Any] = {}
        if kind == "sqlite":
            path = table.value("path", self.file_path, required=True)
        elif kind == "postgres":
            dsn = table.value("dsn", self.string, required=True)
        else:
            redis = self.redis_target(table)
        return RepositoryConfig(
            kind=kind, topology=topology, path=path, dsn=dsn,
            password_file=table.value("password_file", self.secret_file),
            tls=table.value("tls", self.boolean, default=False), **redis)

    def redis_target(self, table: _Table) -> dict[str, Any]:
        """
        Where a Redis repository is: C{url} (with C{cluster}), or
        C{sentinels} and C{service}; and C{wait_replicas}.
        """
        if ("url" in table.data) == ("sentinels" in table.data):
            raise self.error(table.key, "give either url (a server or a "
                                        "cluster) or sentinels, not both "
                                        "or neither")
        found: dict[str, Any] = {"wait_replicas": table.value(
            "wait_replicas", self.integer(0, MAX_WAIT_REPLICAS))}
        if "sentinels" in table.data:
            if "cluster" in table.data:
                raise self.error(table.child("cluster"),
                                 "not used with sentinels")
            found["sentinels"] = tuple(
                self.address(item_key, item, SENTINEL_PORT) for item_key, item
                in table.value("sentinels", self.strings))
            if not found["sentinels"]:
                raise self.error(table.child("sentinels"), "names no sentinel")
            found["service"] = table.value("service", self.string,
                                           required=True)
            return found
        if "service" in table.data:
            raise self.error(table.child("service"), "used with sentinels "
                                                     "only")
        url = found["url"] = table.value("url", self.redis_url, required=True)
        cluster = table.value("cluster", self.boolean, default=False)
        if is_cluster_url(url):
            if "cluster" in table.data and not cluster:
                raise self.error(table.child("cluster"),
                                 "false, but the url names a cluster")
            cluster = False
        elif cluster and url.startswith("unix:"):
            raise self.error(table.child("cluster"),
                             "a cluster is not reached by a unix socket")
        found["cluster"] = cluster
        return found

    def address(self, key: str, value: str, default_port: int
                ) -> tuple[str, int]:
        """
        C{host:port} (an IPv6 address in brackets), the port
        C{default_port} when none is given.
        """
        try:
            return host_port(value, default_port)
        except AddressError as e:
            raise self.error(key, str(e)) from None

    def redis_url(self, key: str, value: Any) -> str:
        self.string(key, value)
        problem = url_scheme_problem(value)
        if problem is None:
            try:
                if is_cluster_url(value):
                    cluster_seeds(value)
                else:
                    urlsplit(value).port
            except ValueError as e:
                # RedisTargetError is one.
                problem = str(e)
        if problem is not None:
            raise self.error(key, f"{_redact_password(value)}: {problem}")
        return value
