"""
A node's numbers for Prometheus: C{GET /metrics} on the C{metrics_listen}
endpoint, in Prometheus' text format.

Nothing is counted twice.  L{NodeCollector} reads L{Node.stats} (the numbers
C{sslshare stats} shows) and the recovery chain's latency histogram at
scrape time, so the page and the command always agree.  Each node has a
registry of its own: several nodes may run in one process (the tests do),
and prometheus_client's global registry would mix them.

The page is rendered in the reactor thread, where the counters change:
prometheus_client's own C{MetricsResource} renders in a thread pool, which
would read them while they change.

This module never changes a counter and holds no session data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from sslshare import __version__
from sslshare.node import Node
from sslshare.recovery import LOOKUP_SOURCES
from sslshare.tls import SESSION_REFUSALS

# Handshake outcomes, as Node.stats() names them.
# The pages of the metrics listener: the Prometheus page, the liveness
# and the readiness probes.
METRICS_PAGE, LIVENESS_PAGE, READINESS_PAGE = "metrics", "healthz", "readyz"

HANDSHAKE_OUTCOMES = ("full", "resumed_local", "resumed_peer",
                      "resumed_repository", "failed")
# The checkpoint pipelines' counters (sslshare.digest.CheckpointPipeline).
CHECKPOINT_EVENTS = ("written", "rejected", "coalesced", "failed", "pauses",
                     "pauses_cut")


# (metric, documentation, the stat it reads) of each gauge and counter
# without labels.
_GAUGES = (
    ("sslshare_store_sessions", "Sessions in this node's memory store.",
     "store.sessions"),
    ("sslshare_store_bytes", "Bytes used by this node's memory store.",
     "store.bytes"),
)
_COUNTERS = (
    ("sslshare_backend_failures", "Client connections closed because "
     "their backend connection failed.", "backend_failures"),
    ("sslshare_peer_refused_connections", "Connections to the peer channel "
     "refused at TLS (no or a foreign certificate).",
     "cluster.refused_connections"),
    ("sslshare_peer_refused_nodes", "Connections to the peer channel "
     "refused at TLS: the certificate names a node of the cluster that is "
     "not a peer.", "cluster.refused_nodes"),
    ("sslshare_peer_duplicate_nodes", "Connections to the peer channel "
     "refused at TLS: the node id is connected from another host already.",
     "cluster.duplicate_nodes"),
    ("sslshare_peer_key_mismatches", "Peer links refused at setup: the peer "
     "seals with a state key this node does not hold.",
     "cluster.key_mismatches"),
    ("sslshare_peer_refused_commands", "Peer commands refused: the peer is "
     "not authorized to send them.", "cluster.refused_commands"),
    ("sslshare_peer_bad_requests", "Peer commands with invalid arguments.",
     "cluster.bad_requests"),
    ("sslshare_peer_dns_lookups", "Lookups of the peers in DNS "
     "(cluster.peers_from).", "discovery.lookups"),
    ("sslshare_peer_dns_lookup_failures", "Lookups of the peers in DNS that "
     "failed (the peers stayed as they were).", "discovery.lookup_failures"),
    ("sslshare_peer_dns_identify_failures", "Addresses DNS named whose "
     "server presented no certificate of a node of the cluster.",
     "discovery.identify_failures"),
)


def _counted_by(name: str, documentation: str, label: str,
                values: Iterable[str], stats: Mapping[str, int | float],
                stat: str) -> CounterMetricFamily:
    """
    A counter with one sample per value of C{label}, read from the stat
    C{stat.format(value)} (0 when the node has not counted it yet).
    """
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value in values:
        family.add_metric([value], stats.get(stat.format(value), 0))
    return family


class NodeCollector:
    """
    A prometheus_client collector of one node's numbers, read at each
    scrape.
    """

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        stats = self.node.stats()
        yield InfoMetricFamily("sslshare_build", "The sslshare release this "
                               "node runs.", value={"version": __version__})
        yield _counted_by(
            "sslshare_handshakes", "Client TLS handshakes by outcome: full, "
            "resumed with the session from this node, a peer or the "
            "repository, or failed (errors and timeouts).",
            "outcome", HANDSHAKE_OUTCOMES, stats, "{}")

        latency = HistogramMetricFamily(
            "sslshare_lookup_duration_seconds", "Time to look up the session "
            "a client offered, by where the lookup ended: this node's store "
            "(with the backup copies it keeps), the owner peer, the owner's "
            "backup node, the repository, or miss (nothing found, or the "
            "budget ran out).", labels=["source"])
        histogram = self.node.recovery.latency
        for source in LOOKUP_SOURCES:
            latency.add_metric(
                [source],
                [("+Inf" if math.isinf(bound) else repr(bound), count)
                 for bound, count in histogram.cumulative(source)],
                stats[f"lookup.{source}.seconds"])
        yield latency

        peers = GaugeMetricFamily(
            "sslshare_peer_connected", "Whether the link to each peer is up "
            "(1) or not (0).", labels=["peer"])
        prefix, suffix = "peers.", ".connected"
        for name, value in sorted(stats.items()):
            if name.startswith(prefix) and name.endswith(suffix) \
                    and name != "peers.connected":
                peers.add_metric([name[len(prefix):-len(suffix)]], value)
        yield peers

        yield _counted_by(
            "sslshare_checkpoints", "Record digest checkpoints: written, "
            "rejected by the store, coalesced, failed, pauses of "
            "connections while the store lagged, and those pauses cut at "
            "checkpoint_max_pause.", "event", CHECKPOINT_EVENTS, stats,
            "checkpoint.{}")

        for name, documentation, stat in _GAUGES:
            yield GaugeMetricFamily(name, documentation, value=stats[stat])
        yield _counted_by(
            "sslshare_sessions_refused", "Sessions found for a client that "
            "could not resume here, by reason (the session does not parse, "
            "is another one, belongs to another service or version, has "
            "expired, or its cipher is not allowed); each one is a full "
            "handshake.", "reason", SESSION_REFUSALS, stats, "engine.{}")
        for name, documentation, stat in _COUNTERS:
            yield CounterMetricFamily(name, documentation,
                                      value=stats.get(stat, 0))


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


class MetricsSite(Site):
    """
    The metrics page's web site (its class name is what the log shows when
    it starts listening).
    """

    def log(self, request: Any) -> None:
        """
        No access log: a scrape every few seconds would fill the node's log.
        """


class _Alive(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"


class _Ready(Resource):
    """
    200 when C{readiness} fires with C{None}, else 503 and the reason.
    """

    isLeaf = True

    def __init__(self, readiness: Callable[[], Deferred[str | None]]) -> None:
        super().__init__()
        self._readiness = readiness

    def render_GET(self, request: Request) -> int:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        gone: list[bool] = []
        request.notifyFinish().addBoth(lambda _: gone.append(True))

        def answer(reason: str | None) -> None:
            if gone:
                return
            if reason is not None:
                request.setResponseCode(503)
            request.write(b"ready\n" if reason is None
                          else f"not ready: {reason}\n".encode("utf-8"))
            request.finish()

        self._readiness().addCallback(answer)
        return NOT_DONE_YET


def metrics_site(node: Node, readiness: Callable[[], Deferred[str | None]]
                 ) -> MetricsSite:
    """
    The web site serving C{/metrics} for C{node}, C{/healthz} (200 while
    the process runs) and C{/readyz} (200 while C{readiness} says the
    node serves, 503 and why otherwise), for load balancers and
    Kubernetes probes.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    # CPU seconds, resident memory, open file descriptors, start time.
    ProcessCollector(registry=registry)
    root = Resource()
    root.putChild(METRICS_PAGE.encode("ascii"), _MetricsPage(registry))
    root.putChild(LIVENESS_PAGE.encode("ascii"), _Alive())
    root.putChild(READINESS_PAGE.encode("ascii"), _Ready(readiness))
    return MetricsSite(root)
