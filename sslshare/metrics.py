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
from collections.abc import Callable, Iterator
from typing import Any

import attrs
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

# The prefix of a stat (Node.stats: "recovery.misses") -> the prefix of its
# metric's name, and whose counter it is (for the metric's help).
_GROUPS = {
    "": ("", "the node's"),
    "engine": ("engine_", "the TLS engine's"),
    "recovery": ("recovery_", "the recovery chain's"),
    "store": ("store_", "the node's memory store's"),
    "repository": ("repository_", "the central repository's"),
    "cluster": ("peer_", "the peer channel's (connections and commands from "
                "peers)"),
    "discovery": ("peer_dns_", "the peers' lookups in DNS (cluster.peers_from)"),
}
_GAUGES = ("store.sessions", "store.bytes", "connections_open",
           "peers.connected")
# What an operator reads on the page for the stats whose metric says more
# than the counter's name.
_HELP = {
    "store.sessions": "Sessions in this node's memory store.",
    "store.bytes": "Bytes used by this node's memory store.",
    "connections_open": "Client connections open now.",
    "peers.connected": "Peers whose link is up.",
    "received_bytes": "Plaintext bytes from clients to their backend.",
    "sent_bytes": "Plaintext bytes from the backend to clients.",
    "backend_failures": "Client connections closed because their backend "
                        "connection failed.",
    "reloads": "Configuration reloads (SIGHUP) that took effect.",
    "reload_failures": "Configuration reloads refused: the node runs on "
                       "with the configuration it had.",
    "connections_refused": "Client connections closed as they arrived: "
                           "max_connections were open.",
    "idle_timeouts": "Client connections closed after idle_timeout_s "
                     "without a byte either way.",
    "recovery.lookups_shed": "Lookups not made: max_concurrent_lookups "
                             "were out (a full handshake each).",
    "recovery.unsealable": "Sessions found that did not unseal with the "
                           "cluster's state keys (a full handshake each).",
    "cluster.refused_connections": "Connections to the peer channel refused "
                                   "at TLS (no or a foreign certificate).",
    "cluster.refused_nodes": "Connections to the peer channel refused at "
                             "TLS: the certificate names a node of the "
                             "cluster that is not a peer.",
    "cluster.duplicate_nodes": "Connections to the peer channel refused at "
                               "TLS: the node id is connected from another "
                               "host already.",
    "cluster.key_mismatches": "Peer links refused at setup: the peer seals "
                              "with a state key this node does not hold.",
    "cluster.refused_commands": "Peer commands refused: the peer is not "
                                "authorized to send them.",
    "cluster.bad_requests": "Peer commands with invalid arguments.",
    "discovery.lookups": "Lookups of the peers in DNS (cluster.peers_from).",
    "discovery.lookup_failures": "Lookups of the peers in DNS that failed "
                                 "(the peers stayed as they were).",
    "discovery.identify_failures": "Addresses DNS named whose server "
                                   "presented no certificate of a node of "
                                   "the cluster.",
}


@attrs.frozen
class _Labelled:
    """
    The stats C{<prefix><value><suffix>} as one family, labelled
    C{label=<value>}.
    """

    prefix: str
    suffix: str
    name: str
    kind: str
    label: str
    documentation: str

    def value_of(self, stat: str) -> str | None:
        if stat.startswith(self.prefix) and stat.endswith(self.suffix):
            value = stat[len(self.prefix):len(stat) - len(self.suffix)]
            # peers.<id>.connected, never peers.connected.
            if value and "." not in value:
                return value
        return None


_LABELLED = (
    _Labelled("engine.failed:", "", "sslshare_handshake_failures", "counter",
              "reason", "Client TLS handshakes that ended in an error, by "
              "OpenSSL's reason."),
    _Labelled("checkpoint.", "", "sslshare_checkpoints", "counter", "event",
              "Record digest checkpoints: written, rejected by the store, "
              "coalesced, failed, pauses of connections while the store "
              "lagged, and those pauses cut at checkpoint_max_pause."),
    _Labelled("peers.", ".connected", "sslshare_peer_connected", "gauge",
              "peer", "Whether the link to each peer is up (1) or not (0)."),
    _Labelled("peers.", ".call_timeouts", "sslshare_peer_call_timeouts",
              "counter", "peer", "Calls to each peer it did not answer in "
              "time."),
    _Labelled("cluster.commands:", "", "sslshare_peer_commands", "counter",
              "command", "Commands peers sent this node, by command."),
    _Labelled("cluster.items:", "", "sslshare_peer_items", "counter",
              "command", "Items of the batches peers delivered, by the "
              "command each names."),
)
_HANDSHAKES = ("sslshare_handshakes", "Client TLS handshakes by outcome: "
               "full, resumed with the session from this node, a peer or "
               "the repository, or failed (errors and timeouts).")
_REFUSALS = ("sslshare_sessions_refused", "Sessions found for a client that "
             "could not resume here, by reason (the session does not parse, "
             "is another one, belongs to another service or version, has "
             "expired, or its cipher is not allowed); each one is a full "
             "handshake.")
_LATENCY = ("sslshare_lookup_duration_seconds", "Time to look up the session "
            "a client offered, by where the lookup ended: this node's store "
            "(with the backup copies it keeps), the owner peer, the owner's "
            "backup node, the repository, or miss (nothing found, or the "
            "budget ran out).")


@attrs.frozen
class Sample:
    """
    Where one stat of L{Node.stats} is on the metrics page.

    @ivar family: the metric family's name (a counter's without C{_total}).
    @ivar kind: C{counter}, C{gauge} or C{histogram}.
    @ivar name: the sample's name.
    @ivar labels: the sample's labels.
    @ivar documentation: the family's help.
    """

    family: str
    kind: str
    name: str
    labels: tuple[tuple[str, str], ...]
    documentation: str


def _sample(family: str, kind: str, documentation: str,
            labels: tuple[tuple[str, str], ...] = ()) -> Sample:
    suffix = "_total" if kind == "counter" else ""
    return Sample(family, kind, family + suffix, labels, documentation)


def sample_of(stat: str) -> Sample:
    """
    The sample that shows C{stat} (a key of L{Node.stats}) on the metrics
    page.

    Every stat has one: the handshakes by outcome, the lookups' histogram
    and the families of L{_LABELLED} by rule, the rest one counter (or a
    gauge of L{_GAUGES}) each, named after the stat: C{recovery.misses} is
    C{sslshare_recovery_misses_total}.
    """
    if stat in HANDSHAKE_OUTCOMES:
        return _sample(_HANDSHAKES[0], "counter", _HANDSHAKES[1],
                       (("outcome", stat),))
    group, _, name = stat.rpartition(".")
    if group == "engine" and name in SESSION_REFUSALS:
        return _sample(_REFUSALS[0], "counter", _REFUSALS[1],
                       (("reason", name),))
    if group.startswith("lookup.") and name in ("count", "seconds"):
        return Sample(_LATENCY[0], "histogram",
                      _LATENCY[0] + ("_count" if name == "count" else "_sum"),
                      (("source", group[len("lookup."):]),), _LATENCY[1])
    for rule in _LABELLED:
        value = rule.value_of(stat)
        if value is not None:
            return _sample(rule.name, rule.kind, rule.documentation,
                           ((rule.label, value),))
    prefix, whose = _GROUPS.get(group, (group.replace(".", "_") + "_",
                                        "sslshare's"))
    return _sample(f"sslshare_{prefix}{name}",
                   "gauge" if stat in _GAUGES else "counter",
                   _HELP.get(stat, f"The count of {name} among {whose} "
                                   f"counters (sslshare stats: {stat})."))


class NodeCollector:
    """
    A prometheus_client collector of one node's numbers, read at each
    scrape: every stat of L{Node.stats}, each as L{sample_of} says.
    """

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        stats = self.node.stats()
        yield InfoMetricFamily("sslshare_build", "The sslshare release this "
                               "node runs.", value={"version": __version__})
        families: dict[str, Metric] = {}
        for stat, value in sorted(stats.items()):
            sample = sample_of(stat)
            if sample.kind == "histogram":
                continue
            if sample.family not in families:
                make = (CounterMetricFamily if sample.kind == "counter"
                        else GaugeMetricFamily)
                families[sample.family] = make(
                    sample.family, sample.documentation,
                    labels=[label for label, _ in sample.labels])
            families[sample.family].add_sample(
                sample.name, dict(sample.labels), value)
        yield from families.values()

        latency = HistogramMetricFamily(_LATENCY[0], _LATENCY[1],
                                        labels=["source"])
        histogram = self.node.recovery.latency
        for source in LOOKUP_SOURCES:
            latency.add_metric(
                [source],
                [("+Inf" if math.isinf(bound) else repr(bound), count)
                 for bound, count in histogram.cumulative(source)],
                stats[f"lookup.{source}.seconds"])
        yield latency


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
