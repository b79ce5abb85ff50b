"""
The C{twistd sslshare} service: one node assembled from its configuration.

L{makeService} builds a L{MultiService} whose children start and stop on
their own: a listener per client endpoint, the AMP listener for peers, the
peer links, the repository when one is configured, and the expiry timers.  Everything here is wiring; what
the parts do lives in their modules.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from sslshare import cluster, config, sessionid, tls
from sslshare.errors import FileError
from sslshare.logs import RateLimitedWarning
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
        channel)
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
    )
    node = Node(node_config.node_id, store, keys, recovery, reactor,
                node_config.session_lifetime, repository, peers, backup_ring,
                node_config.checkpoint)
    context = tls.ServerContext(
        services, sessionid.owner_tag(node_config.cluster_name, node_config.node_id),
        on_new_session=node.new_session,
        alpn=node_config.tls.alpn,
        tls12_ciphers=node_config.tls.tls12_ciphers,
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
    return service
