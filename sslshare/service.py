"""
The C{twistd sslshare} service: one node assembled from its configuration.

L{makeService} builds a L{NodeService} whose children start and stop on
their own: a listener per client endpoint, the AMP listener for peers, the
peer links, the repository when one is configured, the metrics listener
when C{metrics_listen} is set, and the expiry timers.  The node service
itself reloads its configuration (on SIGHUP under C{twistd}) and stops
gracefully (SIGTERM): no new clients, open connections drained, sessions
handed over.  Everything here is wiring; what the parts do lives in their
modules.

The log.  C{twistd} picks its log observer after C{makeService}: it makes
the application, adds our service to it, then uses the application's
L{ILogObserver} component if it has one, else its own text observer on
C{--logfile} (C{twisted.application.app.AppLogger.start}).  With
C{log_format = "json"} the service sets that component when it is added to
the application: a JSON-lines observer on the file twistd would have used.
C{twistd --logger} still overrides both.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any

import attrs
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

from sslshare import cluster, config, metrics, sessionid, systemd, tls
from sslshare.accesslog import AccessLogFile, AccessLogToNodeLog, IAccessLog
from sslshare.errors import CertificateKeyMismatch, FileError
from sslshare.logs import RateLimitedWarning, json_lines_observer
from sslshare.node import Node, NodeSettings, fired_within
from sslshare.placement import BackupRing, Layout, Placement
from sslshare.protocol import (
    BackendProxyFactory,
    ProxySettings,
    SessionResumingTLSFactory,
    SessionResumingTLSProtocol,
)
from sslshare.recovery import LookupSettings, Recovery
from sslshare.hoststore import HostStore, HostStoreError, Shape, create_table
from sslshare.repository import ISessionRepository, RepositoryError, from_config
from sslshare.repository.table import TableRepository
from sslshare.state import StateKeys
from sslshare.store import SessionStore
from sslshare.supervisor import (
    WORKER_VARIABLE,
    Inherited,
    WorkerSupervisor,
    reuseport_sockets,
)

EXPIRY_INTERVAL = 30.0
# The descriptor number of the host's table in a worker process.
TABLE_VARIABLE = "SSLSHARE_TABLE_FD"
# What a stopping worker gets beyond its drain timeout before it is killed.
WORKER_STOP_MARGIN = 10.0
STATE_DIR_MODE = 0o700

# The share of the drain timeout kept for the handover of sessions: open
# connections get the rest.
HANDOVER_SHARE = 0.25


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = ("Run one sslshare node: a TLS server that shares its "
                "sessions with the other nodes of its cluster (with "
                "workers above 1 in [node], a supervisor and that many "
                "worker processes sharing one table of sessions).  Everything "
                "the node needs is in the TOML file (`sslshare config example` "
                "prints one with every key explained).")
    optParameters = [
        ["config", "c", None, "The node's TOML configuration file."],
    ]

    def postOptions(self) -> None:
        if self["config"] is None:
            raise usage.UsageError("--config FILE is required")


def build_node(node_config: config.NodeConfig, reactor: Any,
               table: HostStore | None = None) -> tuple[NodeService, Node]:
    """
    The node's service and its L{Node}, from a loaded configuration.

    @param table: the host's table of sessions, when the node is one of
        the host's worker processes (L{as_worker}): its repository.

    @raise tls.TLSConfigurationError: a certificate or key is unusable.
    @raise FileError: the state key file, a node certificate or key, or
        the state directory is unusable.
    @raise RepositoryError: the repository's driver or password file is
        missing.
    """
    cluster_config = node_config.cluster
    keys = StateKeys.from_file(cluster_config.state_key)
    try:
        # Private to the node.  A directory that exists keeps the mode its
        # operator gave it: state_dir may name one that is not the node's
        # alone, and the files the node makes in it are private anyway.
        os.makedirs(node_config.state_dir, mode=STATE_DIR_MODE, exist_ok=True)
    except OSError as e:
        raise FileError(node_config.state_dir,
                        f"cannot make the node's state directory: "
                        f"{e.strerror}") from None
    store = SessionStore(node_config.store_max_bytes, reactor)
    services = _virtual_services(node_config)
    channel = _channel(node_config)
    peers = cluster.Peers(
        cluster_config.peers, channel, keys=lambda: placement.keys,
        reactor=reactor,
        # A peer that never answers holds no more questions than the
        # node may have lookups out.
        max_unanswered_fetches=node_config.max_concurrent_lookups)
    repository: ISessionRepository | None = None
    if table is not None:
        repository = TableRepository(table)
    elif node_config.repository is not None:
        repository = from_config(node_config.repository, reactor,
                                 node_config.state_dir)
    placement = Placement(node_config.member_id,
                          _layout(node_config, keys, cluster_config.peers),
                          peers, repository)
    recovery = Recovery(
        store, placement, _lookup_settings(node_config, services), reactor,
        # The repository topology asks the repository only; so do the
        # workers of a host, which have no peers.
        ask_peers=node_config.topology != "repository" and table is None)
    node = Node(store, placement, recovery, reactor,
                _node_settings(node_config))
    node.context = _server_context(node_config, services, node.new_session)
    access_log = _access_log(node_config, reactor)
    proxy = BackendProxyFactory(node.handshake_done, reactor,
                                _proxy_settings(node_config, reactor),
                                node.backend_failed, node.counters, access_log)
    clients = SessionResumingTLSFactory(
        node.context, node.lookup, proxy, node.counters,
        node_config.max_connections, reactor)
    node.open_connections = lambda: len(clients.protocols)
    amp = None
    if cluster_config.listen is not None:
        amp = placement.peer_server = cluster.PeerServerFactory(
            node, node_config.cluster_name, node_config.node_id,
            cluster_config.allowed, peers=_peer_ids(node_config),
            keys=lambda: placement.keys)
    top = NodeService(node_config, node, clients, proxy, channel, peers, amp,
                      reactor)
    top.access_log = access_log
    if isinstance(access_log, AccessLogFile):
        # The first child stops last: after the connections it logs.
        access_log.setServiceParent(top)
    for key, endpoint in configured_listeners(node_config):
        if key.startswith("node.listen"):
            top.add_client_listener(
                Listener(reactor, node_config.path, key, endpoint, clients))
        elif amp is not None and key == "cluster.listen":
            Listener(reactor, node_config.path, key, endpoint,
                     TLSMemoryBIOFactory(channel.server_options(amp.admit),
                                         False, amp),
                     ).setServiceParent(top)
        else:
            Listener(reactor, node_config.path, key, endpoint,
                     metrics.metrics_site(node, top.readiness)
                     ).setServiceParent(top)
    peers.setServiceParent(top)
    if cluster_config.peers_from is not None:
        top.discovery = _discovery(cluster_config, node_config.node_id,
                                   channel, peers, top.adopt_peers, reactor)
        top.discovery.setServiceParent(top)
        node.discovery_counters = top.discovery.counters
    TimerService(EXPIRY_INTERVAL, store.expire).setServiceParent(top)
    if repository is not None:
        _RepositoryService(repository, reactor).setServiceParent(top)
    return top, node


def _access_log(node_config: config.NodeConfig,
                reactor: IReactorTime) -> IAccessLog | None:
    """
    Where the node logs its connections, if it does.

    @raise FileError: the access log file cannot be opened.
    """
    if node_config.access_log is None:
        return None
    if node_config.access_log == config.ACCESS_LOG_TO_NODE_LOG:
        return AccessLogToNodeLog()
    return AccessLogFile(node_config.access_log, reactor)


def configured_listeners(node_config: config.NodeConfig
                         ) -> list[tuple[str, str]]:
    """
    What the node listens on, as (key in the file, endpoint) pairs: the
    client listeners (C{node.listen}, or C{node.listen[N]} when there are
    several), C{cluster.listen} and C{node.metrics_listen} when set.
    """
    clients = node_config.listen
    listeners = [("node.listen" if len(clients) == 1 else f"node.listen[{index}]",
                  endpoint) for index, endpoint in enumerate(clients)]
    if node_config.cluster.listen is not None:
        listeners.append(("cluster.listen", node_config.cluster.listen))
    if node_config.metrics_listen is not None:
        listeners.append(("node.metrics_listen", node_config.metrics_listen))
    return listeners


class ListenError(Exception):
    """
    A listener of the configuration cannot listen: the message is one line
    naming the file, the key, the endpoint and the reason.
    """


def listen_problem(path: str, key: str, endpoint: str,
                   error: BaseException) -> str:
    """
    The line that says why C{endpoint}, the value of C{key} in the file
    C{path}, cannot listen: C{a.toml: node.listen: 127.0.0.1:8441: address
    already in use}.
    """
    if isinstance(error, CannotListenError):
        where = f"{error.interface or '0.0.0.0'}:{error.port}"
        cause = error.socketError
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
    else:
        where, reason = endpoint, str(error)
    return f"{path}: {key}: {where}: {reason[:1].lower()}{reason[1:]}"


class Listener(StreamServerEndpointService):
    """
    A listener of the configuration, named by its key: an endpoint that
    cannot listen stops the node's start with a L{ListenError}, rather than
    a logged traceback and a node running without it.
    """

    _raiseSynchronously = True

    def __init__(self, reactor: Any, path: str, key: str, endpoint: str,
                 factory: Any) -> None:
        super().__init__(serverFromString(reactor, endpoint), factory)
        self.path = path
        self.key = key
        self.endpoint_description = endpoint

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            raise ListenError(listen_problem(
                self.path, self.key, self.endpoint_description, e)) from None


def _layout(node_config: config.NodeConfig, keys: StateKeys,
            peers: Iterable[tuple[str, str]]) -> Layout:
    """
    The state keys, and the ring of this node and its C{peers} by owner
    tag.
    """
    node_ids = [node_config.member_id, *(node_id for node_id, _ in peers)]
    return Layout(keys, BackupRing(
        {sessionid.owner_tag(node_config.cluster_name, node_id): node_id
         for node_id in node_ids}))


def _lookup_settings(node_config: config.NodeConfig,
                     services: list[tls.VirtualService]) -> LookupSettings:
    return LookupSettings(
        id_contexts={service.name: service.id_context for service in services},
        budget=node_config.lookup_budget,
        max_lookups=node_config.max_concurrent_lookups,
        max_lookups_per_client=node_config.max_lookups_per_client)


def _node_settings(node_config: config.NodeConfig) -> NodeSettings:
    return NodeSettings(node_config.session_lifetime, node_config.checkpoint)


def _proxy_settings(node_config: config.NodeConfig,
                    reactor: Any) -> ProxySettings:
    return ProxySettings(clientFromString(reactor, node_config.backend),
                         node_config.backend, node_config.handshake_timeout,
                         node_config.idle_timeout,
                         node_config.backend_proxy_protocol)


def _virtual_services(node_config: config.NodeConfig) -> list[tls.VirtualService]:
    return [
        tls.VirtualService(
            service.name, service.certificate, service.key,
            sessionid.service_id_context(node_config.cluster_name, service.name),
            service.server_names)
        for service in node_config.tls.services
    ]


def _peer_ids(node_config: config.NodeConfig) -> frozenset[str] | None:
    """
    The nodes the peer server admits besides this one: the peers listed,
    or with peers found in DNS, C{None}: any node of the cluster.
    """
    if node_config.cluster.peers_from is not None:
        return None
    return frozenset(node_id for node_id, _ in node_config.cluster.peers)


def _discovery(cluster_config: config.ClusterConfig, node_id: str,
               channel: cluster.ClusterTLS, peers: cluster.Peers,
               apply: Callable[[Sequence[tuple[str, str]]], None],
               reactor: Any) -> cluster.PeerDiscovery:
    """
    The service that keeps C{peers} what C{cluster_config.peers_from}
    names, asking C{cluster_config.dns_servers}, or when none the system's
    resolver (C{/etc/resolv.conf}, read again as it changes, and
    C{/etc/hosts}).
    """
    from twisted.names import client
    from twisted.names.common import ResolverBase

    assert cluster_config.peers_from is not None
    resolver: ResolverBase
    if cluster_config.dns_servers:
        resolver = client.Resolver(
            servers=list(cluster_config.dns_servers), reactor=reactor)
    else:
        resolver = client.createResolver()

    def linked(peer: str) -> bool:
        link = peers.link(peer)
        return link is not None and link.connected

    return cluster.PeerDiscovery(
        cluster_config.peers_from, resolver, node_id,
        lambda host, port: cluster.identify(channel, reactor, reactor, host,
                                            port),
        apply, linked, reactor, refresh=cluster_config.peers_refresh)


def _channel(node_config: config.NodeConfig) -> cluster.ClusterTLS:
    cluster_config = node_config.cluster
    return cluster.ClusterTLS(cluster_config.ca, cluster_config.certificate,
                              cluster_config.key, node_config.cluster_name,
                              node_config.node_id)


def _server_context(node_config: config.NodeConfig,
                    services: list[tls.VirtualService],
                    on_new_session: Callable[[tls.Connection, bytes, bytes],
                                             None]) -> tls.ServerContext:
    """
    The client-facing engine, telling C{on_new_session} (the node's) of
    each session it makes.  Its session id contexts come from the cluster
    and service names only, so a context built again (a reload) resumes
    every session the previous one made.
    """
    return tls.ServerContext(
        services, sessionid.owner_tag(node_config.cluster_name,
                                      node_config.member_id),
        on_new_session=on_new_session,
        alpn=node_config.tls.alpn,
        alpn_mismatch=node_config.tls.alpn_mismatch,
        tls12_ciphers=node_config.tls.tls12_ciphers,
        minimum_version=node_config.tls.min_version,
        maximum_version=node_config.tls.max_version,
        session_lifetime=node_config.session_lifetime,
    )


# What a reload cannot change: dotted key -> NodeConfig attribute.  Each
# needs a socket, a file or an identity the running node is built on.
FIXED_AT_RUNTIME = {
    "node.id": "node_id",
    "node.cluster": "cluster_name",
    "node.listen": "listen",
    "node.state_dir": "state_dir",
    "node.store_max_bytes": "store_max_bytes",
    "node.metrics_listen": "metrics_listen",
    "node.log_format": "log_format",
    "node.access_log": "access_log",
    "node.workers": "workers",
    "cluster.listen": "cluster.listen",
    "cluster.peers_from": "cluster.peers_from",
    "cluster.dns_servers": "cluster.dns_servers",
    "cluster.peers_refresh_min_s": "cluster.peers_refresh",
    "repository": "repository",
}


# What a reload puts in force, as NodeConfig attributes: the rest of the
# file, each in the frozen settings of the part that runs on it (the
# channel, the peer links and the peer server, the client-facing context,
# the placement's layout, the recovery chain's, the node's and the proxy's
# settings, the drain of a stop).
RELOADABLE = frozenset({
    "backend",
    "backend_proxy_protocol",
    "max_connections",
    "idle_timeout",
    "lookup_budget",
    "max_concurrent_lookups",
    "max_lookups_per_client",
    "session_lifetime",
    "handshake_timeout",
    "drain_timeout",
    "checkpoint",
    "loose_key_permissions",
    "tls",
    "cluster.ca",
    "cluster.certificate",
    "cluster.key",
    "cluster.state_key",
    "cluster.peers",
    "cluster.authorize",
})


def _attribute(node_config: config.NodeConfig, path: str) -> Any:
    value: Any = node_config
    for name in path.split("."):
        value = getattr(value, name)
    return value


def _keep_fixed(running: config.NodeConfig, loaded: config.NodeConfig,
                ) -> tuple[config.NodeConfig, list[str]]:
    """
    C{loaded} with every setting of L{FIXED_AT_RUNTIME} as C{running} has
    it, and the dotted keys that C{loaded} changed.
    """
    changed = [key for key, path in FIXED_AT_RUNTIME.items()
               if _attribute(running, path) != _attribute(loaded, path)]
    top = {path: getattr(running, path)
           for path in FIXED_AT_RUNTIME.values() if "." not in path}
    kept_cluster = attrs.evolve(loaded.cluster, listen=running.cluster.listen)
    if {"cluster.peers_from", "cluster.dns_servers",
            "cluster.peers_refresh_min_s"} & set(changed):
        # Found in DNS or listed: the peers stay found as they were.
        kept_cluster = attrs.evolve(
            kept_cluster, peers=running.cluster.peers,
            peers_from=running.cluster.peers_from,
            dns_servers=running.cluster.dns_servers,
            peers_refresh=running.cluster.peers_refresh)
    kept = attrs.evolve(loaded, cluster=kept_cluster, **top)
    return kept, changed


class NodeService(MultiService):
    """
    A running node: its listeners, peer links, repository and timers as
    child services, and the two things an operator does to it while it
    runs.

    L{reload} reads the configuration file again and applies it whole, or
    not at all.  C{stopService} stops gracefully: it stops accepting
    clients, lets the open connections finish within the drain timeout,
    hands the node's sessions over so that they resume elsewhere, and only
    then stops the rest.

    @ivar config: the configuration in force.
    """

    _log = Logger()

    def __init__(self, node_config: config.NodeConfig, node: Node,
                 clients: SessionResumingTLSFactory,
                 proxy: BackendProxyFactory, channel: cluster.ClusterTLS,
                 peers: cluster.Peers,
                 peer_server: cluster.PeerServerFactory | None,
                 reactor: Any) -> None:
        super().__init__()
        self.config = node_config
        self.node = node
        self._clients = clients
        self._proxy = proxy
        self._channel = channel
        self._peers = peers
        self._peer_server = peer_server
        self._reactor = reactor
        self._client_listeners: list[IService] = []
        self.discovery: cluster.PeerDiscovery | None = None
        self.access_log: IAccessLog | None = None
        # What the node makes of the file it reads: a worker's own version.
        self.adapt: Callable[[config.NodeConfig], config.NodeConfig] = (
            lambda loaded: loaded)

    @property
    def open_connections(self) -> int:
        """
        The client connections this node has open now.
        """
        return self.node.open_connections()

    def adopt_peers(self, peers: Sequence[tuple[str, str]]) -> None:
        """
        Make C{peers} (node id, client endpoint string) the node's peers:
        links start and stop to match, and the ring of backup nodes is
        theirs and this node's (what L{cluster.PeerDiscovery} found).
        """
        added, removed = self._peers.reconfigure(peers)
        placement = self.node.placement
        placement.layout = _layout(self.config, placement.keys, peers)
        self._log.info("peers from {source}: {peers}; links started: "
                       "{added}, stopped: {removed}",
                       source=str(self.config.cluster.peers_from),
                       peers=", ".join(node_id for node_id, _ in peers)
                       or "none", added=", ".join(added) or "none",
                       removed=", ".join(removed) or "none")

    def readiness(self) -> Deferred[str | None]:
        """
        Whether the node serves clients: C{None} when it does, else why
        not (stopping, a client listener not listening, or with the
        repository topology a repository that does not answer).
        """
        if not self.running:
            return succeed("the node is stopping")
        for listener in self._client_listeners:
            if not listener.running:
                return succeed(f"{listener.name or 'a client listener'} is "
                               f"not listening")
        repository = self.node.placement.repository
        if self.config.topology != "repository" or repository is None:
            return succeed(None)
        return repository.ping().addCallbacks(
            lambda _: None,
            lambda reason: f"the repository does not answer: "
                           f"{reason.getErrorMessage()}")

    def add_client_listener(self, listener: IService) -> None:
        """
        Add a listener for TLS clients: the one kind of child a stopping
        node stops first.
        """
        listener.setServiceParent(self)
        self._client_listeners.append(listener)

    def reopen_logs(self) -> None:
        """
        Open the access log file again, as logrotate expects after it
        renamed it (SIGUSR1, and every reload).
        """
        if self.access_log is not None:
            self.access_log.reopen()

    # Reload.

    def reload(self) -> bool:
        """
        Read the configuration file again and apply it: certificates and
        keys (client-facing and the cluster's, for connections made from
        now on), peers, authorizations, the state keys and the other
        settings that can change while the node runs; the access log is
        reopened, whatever the file says.  Established
        connections go on untouched, and stored sessions stay resumable.
        A setting of L{FIXED_AT_RUNTIME} that changed keeps its running
        value, with a warning.  A file that does not load, or names a file
        that is unusable, changes nothing: the error is logged in one line.

        @return: whether the new configuration is in force.
        """
        counters = self.node.counters
        if not self.running:
            self._log.warn("not reloading {path}: the node is stopping",
                           path=self.config.path)
            return False
        self.reopen_logs()
        try:
            loaded = self.adapt(config.load(self.config.path, self._reactor))
            new, changed = _keep_fixed(self.config, loaded)
            keys, services, context, channel = _readied(
                new, self.node.new_session)
        except (config.ConfigError, tls.TLSConfigurationError,
                FileError) as e:
            counters["reload_failures"] += 1
            self._log.error("sslshare: reload failed, the running "
                            "configuration stays: {error}", error=str(e))
            return False
        added, removed = self._apply(new, keys, services, context, channel)
        counters["reloads"] += 1
        for key in changed:
            self._log.warn(
                "{path}: {key}: cannot change while the node runs; it keeps "
                "{value!r} until it is restarted", path=new.path, key=key,
                value=_attribute(new, FIXED_AT_RUNTIME[key]))
        self._log.info("reloaded {path}: peers {peers}; links started: "
                       "{added}, stopped: {removed}", path=new.path,
                       peers=", ".join(sorted(
                           link.peer_node_id for link in self._peers))
                       or "none",
                       added=", ".join(added) or "none",
                       removed=", ".join(removed) or "none")
        return True

    def _apply(self, new: config.NodeConfig, keys: StateKeys,
               services: list[tls.VirtualService],
               context: tls.ServerContext, channel: cluster.ClusterTLS,
               ) -> tuple[list[str], list[str]]:
        """
        Put a checked configuration in force: nothing here fails on what
        the file says (L{config.load} has checked the peers already).
        Each part's settings are replaced whole, so that no part runs on a
        mix of the old and the new.
        """
        node = self.node
        peers = (new.cluster.peers if self.discovery is None
                 else self.discovery.peers)
        added, removed = self._peers.reconfigure(peers)
        self._channel.adopt(channel)
        if self._peer_server is not None:
            # A node no longer listed connects no more; a connection it
            # has open runs none of its commands now.
            self._peer_server.allowed = new.cluster.allowed
            self._peer_server.peers = _peer_ids(new)
        # One count across reloads: open connections keep counting on the
        # old context.
        context.counters = self._clients.context.counters
        self._clients.context = node.context = context
        self._clients.max_connections = new.max_connections
        node.placement.layout = _layout(new, keys, peers)
        node.recovery.settings = _lookup_settings(new, services)
        node.settings = _node_settings(new)
        self._proxy.settings = _proxy_settings(new, self._reactor)
        self.config = new
        return added, removed

    # Graceful stop.

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)
        clock = self._reactor
        timeout = self.config.drain_timeout
        deadline = clock.seconds() + timeout
        await DeferredList([maybeDeferred(listener.stopService)
                            for listener in self._client_listeners])
        self._log.info("stopping: accepting no more clients, {count} "
                       "connections open", count=len(self._clients.protocols))
        await self._drain(deadline - timeout * HANDOVER_SHARE)
        moved = await self.node.hand_over(max(0.0, deadline - clock.seconds()))
        self._log.info("{summary}", summary=handover_summary(moved))
        await DeferredList([maybeDeferred(service.stopService)
                            for service in reversed(list(self))
                            if service.running])
        self.node.stop()

    async def _drain(self, until: float) -> None:
        """
        Wait until the open client connections are done, or C{until}, then
        close what is still open.
        """
        closed = self._clients.all_closed()
        if not await fired_within(closed, until - self._reactor.seconds(),
                                  self._reactor):
            still_open = list(self._clients.protocols)
            self._log.warn("closing {count} client connections still open "
                           "at the drain deadline", count=len(still_open))
            for protocol in still_open:
                assert isinstance(protocol, SessionResumingTLSProtocol)
                protocol.cut_off("drain_timeout")


def handover_summary(moved: Mapping[str, int]) -> str:
    """
    One line for the log, as C{"handed over 3 sessions to node2, 1 to
    node3, 0 failed"}.
    """
    parts = [f"{count} to "
             + ("the repository" if place == "repository" else place)
             for place, count in sorted(moved.items()) if place != "failed"]
    number, _, where = (parts[0] if parts else "0").partition(" ")
    head = f"handed over {number} session{'' if number == '1' else 's'}"
    if where:
        head += f" {where}"
    return ", ".join([head, *parts[1:], f"{moved.get('failed', 0)} failed"])


class _RepositoryService(Service):
    """
    Connects the repository when the node starts, removes its expired
    sessions every L{EXPIRY_INTERVAL} once it is connected, and closes it
    when the node stops.  A repository that is down is never fatal: the
    backends retry on every call, and the node keeps serving.
    """

    _log = Logger()

    def __init__(self, repository: ISessionRepository,
                 clock: IReactorTime) -> None:
        self.repository = repository
        self._expiry = LoopingCall(self._expire)
        self._expiry.clock = clock
        self._warnings = RateLimitedWarning(clock, EXPIRY_INTERVAL * 10)

    def startService(self) -> Deferred[None]:
        super().startService()

        def started(_: None) -> None:
            # A repository that connects after the node began to stop must
            # not leave an expiry loop running on a stopped service.
            if self.running:
                self._expiry.start(EXPIRY_INTERVAL, now=False)

        return self.repository.start().addCallback(started)

    def _expire(self) -> Deferred[int | None]:
        def failed(reason: Failure) -> None:
            self._warnings.warn("could not remove expired sessions from the "
                                "repository: {why}",
                                why=reason.getErrorMessage())

        return self.repository.expire().addErrback(failed)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._expiry.running:
            self._expiry.stop()
        return self.repository.close()


class _LoggingTo(MultiService):
    """
    Runs its child, and gives the twistd application it is added to the
    log observer C{observer} (see the module's docstring).
    """

    def __init__(self, observer: ILogObserver, service: IService) -> None:
        super().__init__()
        self.observer = observer
        service.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def _twistd_log_file(node_config: config.NodeConfig,
                     twistd_options: Any) -> IO[str]:
    """
    Where twistd would write its own log for C{twistd_options} (as
    C{twisted.scripts._twistd_unix.UnixAppLogger} chooses it): stdout for
    C{--logfile -}, or with C{--nodaemon} and no C{--logfile}; else the
    C{--logfile}, by default C{twistd.log}.
    """
    if twistd_options is None:
        return sys.stdout
    where = f"sslshare: {node_config.path}: node.log_format: \"json\""
    if twistd_options.get("syslog"):
        raise SystemExit(f"{where} is written to a file or stdout, not to "
                         f"syslog: drop --syslog")
    path = twistd_options.get("logfile")
    daemon = not twistd_options.get("nodaemon")
    if path == "-" or (not path and not daemon):
        if daemon:
            raise SystemExit(f"{where}: a daemon cannot log to stdout")
        return sys.stdout
    return LogFile.fromFullPath(path or "twistd.log")


def _readied(node_config: config.NodeConfig,
             on_new_session: Callable[[tls.Connection, bytes, bytes], None],
             ) -> tuple[StateKeys, list[tls.VirtualService], tls.ServerContext,
                        cluster.ClusterTLS]:
    """
    What a configuration puts in force that reads files: the state keys,
    the virtual services, the client-facing context and the cluster's
    channel; what a reload applies, and what C{check} reads.

    @raise config.ConfigError: a file the configuration names is unusable:
        the configuration file, the key that names it and why.
    @raise tls.TLSConfigurationError: the TLS settings are unusable.
    """
    try:
        keys = StateKeys.from_file(node_config.cluster.state_key)
        services = _virtual_services(node_config)
        context = _server_context(node_config, services, on_new_session)
        return keys, services, context, _channel(node_config)
    except FileError as e:
        raise _named(node_config, e) from None


def _named(node_config: config.NodeConfig, error: FileError) -> config.ConfigError:
    """
    C{error}, about a file C{node_config} names, as the error of the key
    that names it: C{a.toml: tls.service[0].key: does not match
    tls.service[0].certificate}.
    """
    cluster_config = node_config.cluster
    keys = {cluster_config.ca: "cluster.ca",
            cluster_config.certificate: "cluster.certificate",
            cluster_config.key: "cluster.key",
            cluster_config.state_key: "cluster.state_key"}
    for index, service in enumerate(node_config.tls.services):
        keys[service.certificate] = f"tls.service[{index}].certificate"
        keys[service.key] = f"tls.service[{index}].key"
    key = keys.get(error.path)
    if key is None:
        return config.ConfigError(node_config.path, "", str(error))
    if isinstance(error, CertificateKeyMismatch):
        return config.ConfigError(
            node_config.path, key,
            f"does not match {keys.get(error.certificate, error.certificate)}")
    return config.ConfigError(node_config.path, key,
                              f"{error.path}: {error.reason}")


def check(path: str, reactor: Any) -> config.NodeConfig:
    """
    Everything a node's start would read of the file at C{path}, without
    starting one: the file itself, the state key file, every certificate
    and key (client-facing and the cluster's), the repository's driver and
    password file.  Nothing is written, no socket is opened.

    @raise config.ConfigError: the file, with the key and the reason.
    @raise tls.TLSConfigurationError: a certificate or key is unusable.
    @raise FileError: another file is unusable.
    @raise RepositoryError: the repository's driver or password file.
    """
    node_config = config.load(path, reactor)

    def made_by_a_check(connection: tls.Connection, session_id: bytes,
                        der: bytes) -> None:
        raise AssertionError("a checked context made a session")

    _readied(node_config, made_by_a_check)
    if node_config.repository is not None:
        from_config(node_config.repository, reactor, node_config.state_dir)
    return node_config


def as_worker(node_config: config.NodeConfig,
              index: int) -> config.NodeConfig:
    """
    What worker C{index} of a node of several workers runs with: a name of
    its own (L{config.NodeConfig.member_id}), so that the sessions it makes
    name it as their holder and owner; and, for each C{node.listen},
    the socket the supervisor handed down, in the same order (Twisted's
    C{systemd:} endpoint reads it).
    """
    listen = []
    for number, endpoint in enumerate(node_config.listen):
        address = config.tcp_address(None, endpoint)
        assert address is not None, "config.load accepts TCP only"
        domain = "INET6" if ":" in address[0] else "INET"
        listen.append(f"systemd:domain={domain}:index={number}")
    return attrs.evolve(node_config, worker=index, listen=tuple(listen))


def _worker_table(reactor: Any) -> HostStore:
    """
    The host's table, whose descriptor the supervisor handed this worker.

    @raise HostStoreError: there is none.
    """
    number = os.environ.get(TABLE_VARIABLE, "")
    if not number.isdigit():
        raise HostStoreError(f"host store: {TABLE_VARIABLE} is "
                             f"{number!r}: this worker was not started by "
                             f"an sslshare supervisor")
    return HostStore(int(number), reactor)


class Workers(MultiService):
    """
    The process C{twistd sslshare} runs for a node of several workers: it
    owns the host's listening sockets and session table and keeps the
    worker processes running (L{WorkerSupervisor}), each a C{twistd
    sslshare} of the same file told its index.  A signal it gets for the
    node (SIGHUP, SIGUSR1) goes on to every worker; its stop stops them
    all, each gracefully.
    """

    def __init__(self, node_config: config.NodeConfig, reactor: Any) -> None:
        super().__init__()
        self.config = node_config
        count = node_config.workers
        # Each socket stays open here: a connection that arrives while its
        # worker starts again waits in the socket's backlog.
        self.sockets = []
        for key, endpoint in configured_listeners(node_config):
            address = config.tcp_address(reactor, endpoint)
            if not key.startswith("node.listen") or address is None:
                continue
            host, port, backlog = address
            try:
                self.sockets.append(reuseport_sockets(host, port, count,
                                                      backlog))
            except OSError as e:
                raise ListenError(listen_problem(
                    node_config.path, key, endpoint,
                    CannotListenError(host, port, e))) from None
        self.table = create_table(Shape.for_bytes(
            2 * node_config.store_max_bytes))
        environment = {name: value for name, value in os.environ.items()
                       # systemd hears from this process, not the workers.
                       if name != systemd.NOTIFY_SOCKET}
        environment[TABLE_VARIABLE] = str(3 + len(self.sockets))
        self.supervisor = WorkerSupervisor(
            reactor, reactor, _worker_command(node_config),
            count, self._inherited, environment,
            stop_timeout=node_config.drain_timeout + WORKER_STOP_MARGIN)
        self.supervisor.setServiceParent(self)

    def _inherited(self, index: int) -> list[Inherited]:
        return [*(Inherited(sockets[index].fileno(), f"listen{number}")
                  for number, sockets in enumerate(self.sockets)),
                Inherited(self.table, "table", listening=False)]

    def signal(self, name: str) -> None:
        self.supervisor.signal(name)


def _worker_command(node_config: config.NodeConfig) -> list[str]:
    """
    The command of a worker: C{twistd} in the foreground, without a pid
    file (the supervisor has the node's), logging to its standard output,
    which the supervisor logs (L{WorkerSupervisor}), running the node's
    file.
    """
    return [sys.executable, "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "--logfile=-",
            "sslshare", "--config", node_config.path]


def makeService(options: Options) -> IService:
    """
    The service C{twistd sslshare} runs: the node, or with C{workers}
    above 1 the supervisor of its workers (L{Workers}), or one of those
    workers when the supervisor started this process.  A configuration the
    node cannot use ends the command with one line naming the file, key
    and reason.
    """
    from twisted.internet import reactor

    service: NodeService | Workers
    try:
        node_config = config.load(options["config"], reactor)
        worker = os.environ.get(WORKER_VARIABLE)
        if node_config.workers == 1:
            service, _ = build_node(node_config, reactor)
        elif worker is None:
            service = Workers(node_config, reactor)
        else:
            index = int(worker)
            service, _ = build_node(as_worker(node_config, index), reactor,
                                    _worker_table(reactor))
            service.adapt = lambda loaded: as_worker(loaded, index)
    except (config.ConfigError, tls.TLSConfigurationError, FileError,
            RepositoryError, HostStoreError, ListenError) as e:
        raise SystemExit(f"sslshare: {e}") from None
    if isinstance(service, Workers):
        workers = service
        _OnSignal(signal.SIGHUP, lambda: workers.signal("HUP"),
                  reactor).setServiceParent(service)
        _OnSignal(signal.SIGUSR1, lambda: workers.signal("USR1"),
                  reactor).setServiceParent(service)
    else:
        node = service
        _OnSignal(signal.SIGHUP, lambda: _reload(node),
                  reactor).setServiceParent(service)
        _OnSignal(signal.SIGUSR1, node.reopen_logs,
                  reactor).setServiceParent(service)
    # Last: it says READY once everything else has started.
    systemd.ReadinessNotice(node_config.path).setServiceParent(service)
    # options.parent: twistd's own options, when twistd runs us.
    twistd_options = options.parent
    daemon = twistd_options is not None and not twistd_options.get("nodaemon")
    top: IService = _OneLineStartErrors(service, daemon)
    if node_config.log_format == "json":
        log_file = _twistd_log_file(node_config, twistd_options)
        top = _LoggingTo(json_lines_observer(log_file), top)
    return top


class _OneLineStartErrors(MultiService):
    """
    Runs its child, and makes a listener that cannot listen end C{twistd}
    with the one line of its L{ListenError} and a non-zero status.  The
    log has the line; with C{--nodaemon} it also goes to the standard error
    twistd started with (twistd sends C{sys.stderr} to the log by then),
    without a traceback.  A daemon's parent process prints what twistd
    passes it of an exception: the start of the line.
    """

    _log = Logger()

    def __init__(self, service: IService, daemon: bool) -> None:
        super().__init__()
        self._daemon = daemon
        service.setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ListenError as e:
            self._log.error("sslshare: {why}", why=str(e))
            if self._daemon:
                raise
            print(f"sslshare: {e}", file=sys.__stderr__, flush=True)
            raise SystemExit(1) from None


def _reload(node: NodeService) -> None:
    """
    Reload C{node}, telling systemd (SIGHUP).
    """
    path = node.config.path
    systemd.notify(systemd.reloading(f"reloading {path}"))
    applied = node.reload()
    systemd.notify(f"READY=1\nSTATUS=serving {path}" + (
        "" if applied else " (the reload failed: see the log)"))


class _OnSignal(Service):
    """
    Does C{action} on the signal C{number} (SIGHUP: reload, SIGUSR1:
    reopen the access log).  Only C{twistd} installs these
    (L{makeService}): nodes that tests run in their own process act when
    the test says so.
    """

    def __init__(self, number: signal.Signals, action: Callable[[], object],
                 reactor: Any) -> None:
        self._number = number
        self._action = action
        self._reactor = reactor
        self._previous: Any = signal.SIG_DFL

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(self._number, self._received)

    def _received(self, number: int, frame: Any) -> None:
        # A signal handler runs between any two bytecodes of the reactor's
        # thread: the action waits for the reactor's next turn.
        self._reactor.callFromThread(self._action)

    def stopService(self) -> None:
        super().stopService()
        signal.signal(self._number, self._previous)
