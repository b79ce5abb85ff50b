"""
The C{twistd sslshare} service: one node assembled from its configuration.

L{makeService} builds a L{MultiService} whose children start and stop on
their own: a listener per client endpoint, the AMP listener for peers, the
peer links, the repository when one is configured, the metrics listener
when C{metrics_listen} is set, and the expiry timers.  Everything here is
wiring; what the parts do lives in their modules.

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
import sys
from typing import IO, Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.logfile import LogFile

from sslshare import cluster, config, metrics, sessionid, tls
from sslshare.errors import FileError
from sslshare.logs import RateLimitedWarning, json_lines_observer
from sslshare.node import Node
from sslshare.protocol import BackendProxyFactory, SessionResumingTLSFactory
from sslshare.recovery import BackupRing, Recovery
from sslshare.repository import ISessionRepository, RepositoryError, from_config
from sslshare.state import StateKeys
from sslshare.store import SessionStore

EXPIRY_INTERVAL = 30.0


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = ("Run one sslshare node: a TLS server that shares its "
                "sessions with the other nodes of its cluster.  Everything "
                "the node needs is in the TOML file (see conf/example.toml).")
    optParameters = [
        ["config", "c", None, "The node's TOML configuration file."],
    ]

    def postOptions(self) -> None:
        if self["config"] is None:
            raise usage.UsageError("--config FILE is required")


def build_node(node_config: config.NodeConfig, reactor: Any) -> tuple[MultiService, Node]:
    """
    The node's service and its L{Node}, from a loaded configuration.

    @raise tls.TLSConfigurationError: a certificate or key is unusable.
    @raise FileError: the state key file, a node certificate or key, or
        the state directory is unusable.
    @raise RepositoryError: the repository's driver or password file is
        missing.
    """
    cluster_config = node_config.cluster
    keys = StateKeys.from_file(cluster_config.state_key)
    try:
        os.makedirs(node_config.state_dir, exist_ok=True)
    except OSError as e:
        raise FileError(node_config.state_dir,
                        f"cannot make the node's state directory: "
                        f"{e.strerror}") from None
    store = SessionStore(node_config.store_max_bytes, reactor)
    peer_ids = [node_id for node_id, _ in cluster_config.peers]
    owners = {sessionid.owner_tag(node_config.cluster_name, node_id): node_id
              for node_id in [node_config.node_id, *peer_ids]}
    services = [
        tls.VirtualService(
            service.name, service.certificate, service.key,
            sessionid.service_id_context(node_config.cluster_name, service.name),
            service.server_names)
        for service in node_config.tls.services
    ]
    channel = cluster.ClusterTLS(cluster_config.ca, cluster_config.certificate,
                                 cluster_config.key, node_config.cluster_name,
                                 node_config.node_id)
    peers = cluster.Peers(
        [(node_id, clientFromString(reactor, endpoint))
         for node_id, endpoint in cluster_config.peers],
        channel,
        # A peer that never answers holds no more questions than the
        # node may have lookups out.
        max_unanswered_fetches=node_config.max_concurrent_lookups)
    backup_ring = BackupRing(owners)
    repository = None
    if node_config.repository is not None:
        repository = from_config(node_config.repository, reactor,
                                 node_config.state_dir)
    recovery = Recovery(
        node_config.node_id, store, keys, owners,
        {service.name: service.id_context for service in services},
        node_config.lookup_budget, reactor,
        # The repository topology asks the repository only.
        fetch_from_peer=(None if node_config.topology == "repository"
                         else peers.fetch_session),
        repository=repository,
        purge_on_peer=peers.purge_session,
        backup_on_peer=peers.backup_session,
        backup_of=backup_ring,
        max_lookups=node_config.max_concurrent_lookups,
        max_lookups_per_client=node_config.max_lookups_per_client,
    )
    node = Node(node_config.node_id, store, keys, recovery, reactor,
                node_config.session_lifetime, repository, peers, backup_ring,
                node_config.checkpoint)
    context = tls.ServerContext(
        services, sessionid.owner_tag(node_config.cluster_name, node_config.node_id),
        on_new_session=node.new_session,
        alpn=node_config.tls.alpn,
        minimum_version=node_config.tls.min_version,
        maximum_version=node_config.tls.max_version,
        session_lifetime=node_config.session_lifetime,
    )
    node.context = context

    top = MultiService()
    proxy = BackendProxyFactory(clientFromString(reactor, node_config.backend),
                                node.handshake_done, reactor,
                                node_config.handshake_timeout)
    clients = SessionResumingTLSFactory(context, node.lookup, proxy)
    for endpoint in node_config.listen:
        StreamServerEndpointService(serverFromString(reactor, endpoint),
                                    clients).setServiceParent(top)
    if cluster_config.listen is not None:
        amp = cluster.PeerServerFactory(node, node_config.cluster_name,
                                        node_config.node_id,
                                        cluster_config.allowed)
        StreamServerEndpointService(
            serverFromString(reactor, cluster_config.listen),
            TLSMemoryBIOFactory(channel.server_options(), False, amp),
        ).setServiceParent(top)
        node.peer_server = amp
    if node_config.metrics_listen is not None:
        metrics.metrics_service(
            node, serverFromString(reactor, node_config.metrics_listen),
        ).setServiceParent(top)
    peers.setServiceParent(top)
    TimerService(EXPIRY_INTERVAL, store.expire).setServiceParent(top)
    if repository is not None:
        _RepositoryService(repository, reactor).setServiceParent(top)
    _NodeService(node).setServiceParent(top)
    return top, node


class _NodeService(Service):
    """
    Stops the node's checkpoint pipelines when the node stops.
    """

    def __init__(self, node: Node) -> None:
        self.node = node

    def stopService(self) -> None:
        super().stopService()
        self.node.stop()


class _RepositoryService(Service):
    """
    Connects the repository when the node starts, removes its expired
    sessions every L{EXPIRY_INTERVAL} once it is connected, and closes it
    when the node stops.  A repository that is down is never fatal: the
    backends retry on every call, and the node keeps serving.
    """

    _log = Logger()

    def __init__(self, repository: ISessionRepository, clock: Any) -> None:
        self.repository = repository
        self._expiry = LoopingCall(self._expire)
        self._expiry.clock = clock
        self._warnings = RateLimitedWarning(clock, EXPIRY_INTERVAL * 10)

    def startService(self) -> Deferred[None]:
        super().startService()
        starting = self.repository.start()
        starting.addCallback(
            lambda _: self._expiry.start(EXPIRY_INTERVAL, now=False) and None)
        return starting

    def _expire(self) -> Deferred[None]:
        def failed(reason: Any) -> None:
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


def makeService(options: Options) -> IService:
    """
    The service C{twistd sslshare} runs.  A configuration the node cannot
    use ends the command with one line naming the file, key and reason.
    """
    from twisted.internet import reactor

    try:
        node_config = config.load(options["config"], reactor)
        service, _ = build_node(node_config, reactor)
    except (config.ConfigError, tls.TLSConfigurationError, FileError,
            RepositoryError) as e:
        raise SystemExit(f"sslshare: {e}") from None
    if node_config.log_format == "json":
        # options.parent: twistd's own options, when twistd runs us.
        log_file = _twistd_log_file(node_config, options.parent)
        return _LoggingTo(json_lines_observer(log_file), service)
    return service
