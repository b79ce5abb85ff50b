"""
What the operator's tools share: the C{sslshare} command (L{sslshare.cli})
and the development tools of L{sslshare.dev}, which the command runs but
which must not import it.

A node's counters are asked the way its peers ask them, through a
L{cluster.PeerLink} and L{cluster.stats_from}: with the node's own
certificate and state key, and with the answer checked.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

from sslshare import cluster, config
from sslshare.state import StateKeys

T = TypeVar("T")


class CommandError(Exception):
    """
    A mistake the user can fix; the message says what and where.
    """


async def ask_stats(reactor: Any, node_config: config.NodeConfig,
                    target: str) -> dict[str, int | float]:
    """
    The counters of node C{target}, asked with the certificate and state
    key of the node of C{node_config}.

    @raise CommandError: C{target} cannot be reached from C{node_config}.
    @raise cluster.PeerUnavailable: the link to C{target} could not be set
        up, or it did not answer.
    @raise cluster.PeerProtocolError: its answer is not counters.
    """
    endpoint = node_endpoint(node_config, target)
    keys = StateKeys.from_file(node_config.cluster.state_key)
    channel = cluster.ClusterTLS(
        node_config.cluster.ca, node_config.cluster.certificate,
        node_config.cluster.key, node_config.cluster_name,
        node_config.node_id)
    link = cluster.PeerLink(target, endpoint, channel, keys=lambda: keys,
                            reactor=reactor)
    link.startService()
    try:
        await link.when_connected(fail_after_failures=1)
        return await cluster.stats_from(link)
    finally:
        await link.stopService()


def node_endpoint(node_config: config.NodeConfig, target: str) -> str:
    """
    The client endpoint of node C{target}'s cluster channel, as the node of
    C{node_config} reaches it: a peer's from the configuration, the node's
    own from its C{cluster.listen}.

    @raise CommandError: C{target} is neither, or the node does not listen
        for peers.
    """
    if target != node_config.node_id:
        try:
            return node_config.cluster.peer_endpoint(target)
        except KeyError:
            raise CommandError(
                f"{node_config.path}: cluster.peers: no peer {target!r}") from None
    listen = node_config.cluster.listen
    if listen is None:
        raise CommandError(f"{node_config.path}: cluster.listen: the node "
                           "does not listen for peers, so it has no stats to ask")
    return client_endpoint_for(listen)


def client_endpoint_for(listen: str) -> str:
    """
    The client endpoint that reaches a C{tcp:} or C{unix:} server endpoint
    on this host.
    """
    kind, _, rest = listen.partition(":")
    if kind == "unix":
        for index, part in enumerate(rest.split(":")):
            key, equals, value = part.partition("=")
            if (not equals and index == 0) or key == "address":
                return f"unix:path={value if equals else key}"
        raise CommandError(f"listen endpoint {listen!r} names no socket")
    if kind != "tcp":
        raise CommandError(f"cannot reach listen endpoint {listen!r} from "
                           "here: only tcp: and unix: endpoints are "
                           "supported")
    port, interface = None, "127.0.0.1"
    for index, part in enumerate(rest.split(":")):
        key, equals, value = part.partition("=")
        if not equals and index == 0:
            port = key
        elif key == "port":
            port = value
        elif key == "interface" and value not in ("", "0.0.0.0", "::"):
            interface = value
    if port is None:
        raise CommandError(f"listen endpoint {listen!r} names no port")
    return f"tcp:host={interface}:port={port}"


def run_in_reactor(work: Callable[[Any], Coroutine[Deferred[Any], Any, T]]) -> T:
    """
    Run the coroutine function C{work(reactor)} to its end in the global
    reactor, and return its result or raise its exception.  Unlike
    C{task.react}, this returns to the caller.
    """
    from twisted.internet import reactor

    outcome: list[T | Failure] = []

    def start() -> None:
        finished: Deferred[T] = ensureDeferred(work(reactor))
        finished.addBoth(outcome.append)
        finished.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    (result,) = outcome
    if isinstance(result, Failure):
        result.raiseException()
    return result
