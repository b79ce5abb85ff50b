"""
Handshakes per second over real sockets, server side, for measurements 2
and 3 of C{benchmarks/run.py}: an sslshare node's full handshakes and its
resumptions from each place it recovers sessions from, and the full and
resumed handshakes of the servers an operator would pick instead (and of
stock Twisted) with the same certificate, client and backend.

Each I{kind} is a deployment and a load of L{benchmarks.load}: client
processes all starting at one instant, each making connections for a
fixed time, and the servers' CPU seconds read before and after:

    - C{full}: a cluster of three nodes, peers of one another; every
      connection to node 1, no session offered;
    - C{local}: the same, each connection offering the previous one's
      session, which node 1 finds in its own store;
    - C{peer}: the same cluster, each connection of a client going to the
      next node in the order opposite to the backup ring, so that the node
      it reaches holds no copy of the offered session (not even a backup)
      and fetches it from the node that holds it, over AMP;
    - C{sqlite}, C{redis}, C{postgres}: two nodes with no peers sharing a
      repository (C{topology = "repository"}), connections alternating
      between them, so that each resumption takes the session from the
      repository;
    - C{alone_full}, C{alone_resumed}: one node with no peers (no backup
      copies, no checkpoints leave it), fresh and offering connections;
    - C{logged_full}, C{logged_resumed}: the same node writing its access
      log to a file (C{access_log}), against C{alone_*} the cost of the
      log; measured only when named (C{--kinds}), not in C{run.py}'s runs;
    - C{haproxy_full}, C{haproxy_resumed}, C{nginx_full},
      C{nginx_resumed}: one HAProxy thread, one nginx C{stream} worker,
      each with its own session cache (tickets off), fresh and offering
      connections;
    - C{twisted_full}, C{twisted_resumed}: stock Twisted's TLS and port
      forwarder in one process (L{benchmarks.twisted_tls}), OpenSSL's
      session cache: what a server on Twisted's TLS transport costs before
      it does anything of its own;
    - C{owned_full}, C{owned_resumed}: the same proxy with OpenSSL
      reading and writing the client's socket itself
      (L{benchmarks.owned_tls}): what a server on Twisted's reactor would
      cost if its TLS record path left Python.

In a cluster a node also sends each new session's backup copy and its
checkpoints to its backup node; the server CPU of a cluster kind is that
of all its nodes, so that C{local} and C{peer} pay for the same cluster
work and differ by the fetch alone.  C{alone_*} against each reference
is one process against one process, thread or worker.

Every server proxies to the same nginx worker answering plain HTTP; the
clients send the same GET to each.  A kind's
rate is the connections completed in the window over its length; its
I{server CPU per handshake} is the CPU seconds of every node of the
deployment (or of the reference's processes) over the connections, which
does not depend on how much CPU the clients took from the two cores; its
I{capacity} is the inverse, handshakes per server CPU second.  The nodes'
own counters (C{resumed_local}, C{resumed_peer}, C{resumed_repository})
say where each resumption really came from, and their lookup counters
the mean time of a lookup by where it ended (C{lookup_ms_mean}), each end
of a peer fetch in its own process.
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
from typing import Any, Callable

import attrs

from benchmarks import deploy
from benchmarks.checkpoint import BenchmarkError
from benchmarks.load import Load, run_clients

PEER_NODES = ("node1", "node2", "node3")
# Each node's backup node is the next in this sorted ring
# (sslshare.placement.BackupRing): clients walk it the other way.
PEER_ORDER = ("node1", "node3", "node2")
REPOSITORY_NODES = ("node1", "node2")
# Seconds between launching the clients and their common start: enough for
# their interpreters to start on a loaded machine.
LAUNCH_SECONDS = 1.5
# The commands a measuring tool sends itself (sslshare stats), not counted
# as the cluster's messages.
TOOL_COMMANDS = ("Stats", "KeyCheck")


@attrs.frozen
class Kind:
    """
    One measured load: the C{deployment} that serves it (see L{DEPLOYMENTS}),
    whether clients C{offer} their previous session, and whether they walk
    the cluster against its backup ring (C{peer_order}) or all go to its
    first server.
    """

    deployment: str
    offer: bool
    peer_order: bool = False


KINDS: dict[str, Kind] = {
    "full": Kind("cluster", offer=False),
    "local": Kind("cluster", offer=True),
    "peer": Kind("cluster", offer=True, peer_order=True),
    "rsa_full": Kind("rsa_cluster", offer=False),
    "rsa_local": Kind("rsa_cluster", offer=True),
    "rsa_peer": Kind("rsa_cluster", offer=True, peer_order=True),
    "sqlite": Kind("sqlite", offer=True),
    "redis": Kind("redis", offer=True),
    "postgres": Kind("postgres", offer=True),
    "alone_full": Kind("alone", offer=False),
    "alone_resumed": Kind("alone", offer=True),
    "logged_full": Kind("logged", offer=False),
    "logged_resumed": Kind("logged", offer=True),
    "haproxy_full": Kind("haproxy", offer=False),
    "haproxy_resumed": Kind("haproxy", offer=True),
    "nginx_full": Kind("nginx", offer=False),
    "nginx_resumed": Kind("nginx", offer=True),
    "twisted_full": Kind("twisted", offer=False),
    "twisted_resumed": Kind("twisted", offer=True),
    "owned_full": Kind("owned", offer=False),
    "owned_resumed": Kind("owned", offer=True),
}
CLUSTER_KINDS = ("full", "local", "peer", "sqlite", "redis", "postgres")
# Measured only when named.
OPTIONAL_KINDS = ("logged_full", "logged_resumed")
REFERENCE_KINDS = ("alone_full", "alone_resumed", "haproxy_full",
                   "haproxy_resumed", "nginx_full", "nginx_resumed",
                   "twisted_full", "twisted_resumed", "owned_full",
                   "owned_resumed")


@attrs.frozen
class Settings:
    """
    What to measure: every kind for every version, C{rounds} times, each
    window C{seconds} long; with C{profile}, a directory where every
    sslshare node leaves its cProfile statistics; what the clusters'
    channel runs on (C{channel}, one of L{deploy.CHANNELS})
    (L{deploy.start_sslshare}).
    """

    clients: int
    seconds: float
    versions: tuple[str, ...]
    kinds: tuple[str, ...] = tuple(kind for kind in KINDS
                                   if kind not in OPTIONAL_KINDS)
    profile: str | None = None
    rounds: int = 1
    channel: str = "tcp"


# Three rounds: the kinds a ratio compares are measured minutes apart
# otherwise, and this machine's load moves by a third in that time.
QUICK = Settings(clients=6, seconds=2.0, versions=("tls1.2", "tls1.3"),
                 rounds=3)
FULL = Settings(clients=6, seconds=3.0, versions=("tls1.2", "tls1.3"),
                rounds=3)


@attrs.frozen
class Deployment:
    """
    Running servers: the ports clients go to, in order; the processes whose
    CPU is the server's; the sslshare nodes, whose counters are read.
    """

    ports: tuple[int, ...]
    servers: tuple[subprocess.Popen, ...]
    nodes: tuple[deploy.Node, ...] = ()


def measure(deployment: Deployment, load: Load, ca_certificate: str,
            settings: Settings, backend: subprocess.Popen | None
            ) -> dict[str, Any]:
    """
    One kind: the clients' counts, the servers' and backend's CPU, and the
    nodes' handshake and command counters, over one window.
    """
    before = deploy.handshake_counters(list(deployment.nodes))
    cpu = [deploy.tree_cpu_seconds(p.pid) for p in deployment.servers]
    backend_cpu = deploy.tree_cpu_seconds(backend.pid) if backend else 0.0
    counts = run_clients(load, ca_certificate, settings.clients,
                         start=time.time() + LAUNCH_SECONDS)
    server_cpu = sum(deploy.tree_cpu_seconds(p.pid) - c
                     for p, c in zip(deployment.servers, cpu))
    after = deploy.handshake_counters(list(deployment.nodes))
    handshakes = counts["connections"]
    if not handshakes:
        raise BenchmarkError(f"no connection completed: {counts}")
    changed = {key: after[key] - before.get(key, 0) for key in after
               if after[key] - before.get(key, 0)}
    # The clients' last connections may end after the window: the nodes
    # count every connection made, the clients only those in the window.
    served = sum(changed.get(key, 0) for key in deploy.HANDSHAKE_COUNTERS)
    return {
        "handshakes_per_s": handshakes / settings.seconds,
        "handshakes": handshakes,
        "resumed_fraction": (counts["resumed"] / counts["resumable"]
                             if counts["resumable"] else 0.0),
        "server_cpu_us_per_handshake": 1e6 * server_cpu / handshakes,
        "handshakes_per_server_cpu_s": handshakes / server_cpu,
        "server_busy": server_cpu / settings.seconds,
        "backend_cpu_s": (deploy.tree_cpu_seconds(backend.pid) - backend_cpu
                          if backend else None),
        "client_cpu_s": counts["cpu_s"],
        "client_busy": counts["cpu_s"] / settings.seconds,
        "errors": counts["errors"],
        "error_reasons": counts.get("error_reasons", {}),
        "server_counts": {key: value for key, value in changed.items()
                          if not key.startswith(("commands:", "items:",
                                                 "lookup:"))},
        "lookup_ms_mean": lookup_means(changed),
        "messages_per_connection": _per_connection(changed, "commands:",
                                                   served),
        "items_per_connection": _per_connection(changed, "items:", served),
    }


def lookup_means(changed: dict[str, float]) -> dict[str, float]:
    """
    The mean milliseconds of the nodes' session lookups in a window, by
    where each ended, from the C{lookup:} counters of
    L{deploy.handshake_counters} that changed in it: as deployed, each
    end in its own process (L{benchmarks.repository} runs both in one).
    """
    means = {}
    for key, count in changed.items():
        if key.startswith("lookup:") and key.endswith(".count"):
            source = key[len("lookup:"):-len(".count")]
            means[source] = 1000 * changed.get(f"lookup:{source}.seconds",
                                               0.0) / count
    return means


def _per_connection(counts: dict[str, float], prefix: str, served: int
                    ) -> dict[str, float]:
    """
    The counters under C{prefix} (the cluster commands the kind's nodes
    received, or the items those carried) per connection served, without
    the ones a measuring tool sends itself.
    """
    return {key[len(prefix):]: value / served
            for key, value in sorted(counts.items())
            if key.startswith(prefix)
            and key[len(prefix):] not in TOOL_COMMANDS and served}


def _repository_settings(kind: str, directory: str,
                         servers: list[Any]) -> str:
    """
    The C{[repository]} table of a repository kind, starting its throwaway
    server (kept in C{servers}, for the caller to remove).
    """
    from sslshare.dev import throwaway

    if kind == "sqlite":
        where = f'path = "{os.path.join(directory, "sessions.sqlite3")}"'
    elif kind == "redis":
        server = throwaway.RedisServer()
        servers.append(server)
        server.start()
        where = f'url = "{server.url}"'
    else:
        server = throwaway.PostgresServer()
        servers.append(server)
        server.start()
        where = f'dsn = "{server.dsn()}"'
    return f'kind = "{kind}"\ntopology = "repository"\n{where}'


@attrs.frozen
class _Started:
    """
    A deployment as it runs: the ports of its servers (a cluster's in the
    order opposite to its backup ring), its server processes and sslshare
    nodes; a cluster's full and local kinds go to its first node alone.
    """

    ports: tuple[int, ...]
    servers: tuple[subprocess.Popen, ...]
    nodes: tuple[deploy.Node, ...] = ()
    cluster: bool = False

    def for_kind(self, kind: Kind) -> Deployment:
        first_only = self.cluster and not kind.peer_order
        return Deployment(self.ports[:1] if first_only else self.ports,
                          self.servers, self.nodes)


def _start(name: str, directory: str, processes: deploy.Processes,
           backend_port: int, servers: list[Any],
           profile: str | None = None, channel: str = "tcp") -> _Started:
    """
    Start the deployment C{name} of L{DEPLOYMENTS}, its sslshare nodes
    profiled into the directory C{profile} if given, a cluster's channel on
    C{channel}.
    """
    pki = os.path.join(directory, "pki")
    if name in ("cluster", "rsa_cluster"):
        server = (deploy.write_rsa_server(directory)
                  if name == "rsa_cluster" else None)
        nodes = {node.name: node for node in deploy.start_sslshare(
            processes, directory, f"rate-{name}", backend_port, PEER_NODES,
            peers=True, server=server, profile=profile, channel=channel)}
        ordered = tuple(nodes[n] for n in PEER_ORDER)
        return _Started(tuple(n.port for n in ordered),
                        tuple(n.process for n in ordered), ordered,
                        cluster=True)
    if name in ("sqlite", "redis", "postgres"):
        repository = _repository_settings(name, directory, servers)
        started = tuple(deploy.start_sslshare(
            processes, directory, f"rate-{name}", backend_port,
            REPOSITORY_NODES, peers=False, repository=repository,
            profile=profile))
        return _Started(tuple(n.port for n in started),
                        tuple(n.process for n in started), started)
    if name in ("alone", "logged"):
        access_log = os.path.join(directory, f"rate-{name}-access.log")
        alone = tuple(deploy.start_sslshare(
            processes, directory, f"rate-{name}", backend_port, ("node1",),
            peers=False, profile=profile,
            node_options=(f'access_log = "{access_log}"'
                          if name == "logged" else "")))
        return _Started((alone[0].port,), (alone[0].process,), alone)
    start_reference = {"haproxy": deploy.start_haproxy_tls,
                       "nginx": deploy.start_nginx_stream,
                       "twisted": deploy.start_python_tls,
                       "owned": functools.partial(
                           deploy.start_python_tls,
                           module="benchmarks.owned_tls")}[name]
    port, process = start_reference(
        processes, directory, f"{name}-tls", backend_port,
        os.path.join(pki, "localhost-chain.pem"),
        os.path.join(pki, "localhost-key.pem"))
    return _Started((port,), (process,))


DEPLOYMENTS = {
    "cluster": "three nodes, peers of one another (P-256 certificate)",
    "rsa_cluster": "the same with an RSA-2048 certificate",
    "sqlite": "two nodes with no peers sharing SQLite",
    "redis": "two nodes with no peers sharing Redis",
    "postgres": "two nodes with no peers sharing PostgreSQL",
    "alone": "one node, no peers, no repository",
    "logged": "the same, writing its access log to a file",
    "haproxy": "HAProxy, one thread, mode tcp, ssl crt (P-256)",
    "nginx": "nginx, one worker, stream ssl (P-256)",
    "twisted": "stock Twisted: listenSSL and portforward, one process (P-256)",
    "owned": "Twisted's reactor, OpenSSL reading and writing the client's "
             "socket, one process (P-256)",
}


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """
    The figures of the round whose server CPU per handshake is the median
    of C{rounds} (the lower middle one of an even number), whole, so that
    they stay one window's, with every round's server CPU per handshake in
    C{rounds_server_cpu_us}.
    """
    ordered = sorted(rounds, key=lambda r: r["server_cpu_us_per_handshake"])
    return {**ordered[(len(ordered) - 1) // 2],
            "rounds_server_cpu_us": [r["server_cpu_us_per_handshake"]
                                     for r in rounds]}


def run(directory: str, settings: Settings,
        progress: Callable[[str], None]) -> dict[str, Any]:
    """
    Every kind of C{settings} for every TLS version of C{settings}, in
    C{settings.rounds} rounds: every deployment is started first and runs
    to the end (idle while another is measured), and each round measures
    every kind once, so that the kinds a ratio compares are measured
    within a round of one another.  Per version, per kind, the figures of
    L{measure} of its median round (L{median_round}); and per version the
    ratios that judge the cluster (L{ratios}).
    """
    ca_certificate = os.path.join(directory, "pki", "ca.pem")
    measured: dict[tuple[str, str], list[dict[str, Any]]] = {}
    processes = deploy.Processes()
    started: dict[str, _Started] = {}
    servers: list[Any] = []
    try:
        backend_port, backend = deploy.start_nginx(
            processes, directory, "nginx-backend", tls=False)
        for kind_name in settings.kinds:
            name = KINDS[kind_name].deployment
            if name not in started:
                started[name] = _start(name, directory, processes,
                                       backend_port, servers, settings.profile,
                                       settings.channel)
        for number in range(1, settings.rounds + 1):
            for kind_name in settings.kinds:
                kind = KINDS[kind_name]
                deployment = started[kind.deployment].for_kind(kind)
                for version in settings.versions:
                    load = Load(ports=deployment.ports, version=version,
                                offer=kind.offer, seconds=settings.seconds)
                    figures = measure(deployment, load, ca_certificate,
                                      settings, backend)
                    measured.setdefault((version, kind_name), []).append(figures)
                    progress(
                        f"  round {number}/{settings.rounds} {kind_name} "
                        f"{version}: {figures['handshakes_per_s']:.0f}/s, "
                        f"server {figures['server_cpu_us_per_handshake']:.0f} "
                        f"µs/handshake, busy {figures['server_busy']:.2f}, "
                        f"resumed {figures['resumed_fraction']:.3f}")
    finally:
        for deployed in started.values():
            for process in deployed.servers:
                process.terminate()
        if settings.profile is not None:
            # A node writes its statistics as it stops.
            for deployed in started.values():
                for process in deployed.servers:
                    process.wait(timeout=60)
        for server in servers:
            server.stop()
            server.remove()
        processes.stop_all()
    results: dict[str, dict[str, Any]] = {v: {} for v in settings.versions}
    for (version, kind_name), rounds in measured.items():
        results[version][kind_name] = median_round(rounds)
    return {"kinds": results, "ratios": ratios(results),
            "settings": attrs.asdict(settings)}


def _ratio(kinds: dict[str, Any], a: str, b: str, figure: str
           ) -> dict[str, float]:
    if a in kinds and b in kinds:
        return {f"{a}_vs_{b}": kinds[a][figure] / kinds[b][figure]}
    return {}


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """
    Per TLS version, of the kinds measured: each resumption source's
    capacity (handshakes per server CPU second) against local; server CPU
    per connection of a peer resumption over a full handshake (C{peer_vs_full},
    also with the RSA certificate); what the cluster adds to a lone node's
    resumption (C{cluster_overhead_us}: local minus alone_resumed) and what
    the fetch adds (C{fetch_us}: peer minus local, also with the RSA
    certificate), in µs per connection;
    and the lone node's server CPU per connection over HAProxy's and
    nginx's, full and resumed, and with its access log over without.
    """
    cpu = "server_cpu_us_per_handshake"
    found: dict[str, dict[str, Any]] = {}
    for version, kinds in results.items():
        mine: dict[str, Any] = {}
        found[version] = mine
        for kind in ("peer", "sqlite", "redis", "postgres"):
            if kind in kinds and "local" in kinds:
                mine[f"{kind}_vs_local_capacity"] = (
                    kinds[kind]["handshakes_per_server_cpu_s"]
                    / kinds["local"]["handshakes_per_server_cpu_s"])
        if "peer" in kinds and "local" in kinds:
            mine["peer_vs_local_rate"] = (kinds["peer"]["handshakes_per_s"]
                                          / kinds["local"]["handshakes_per_s"])
        for prefix in ("", "rsa_"):
            peer = kinds.get(prefix + "peer")
            if peer is not None and prefix + "full" in kinds:
                mine[prefix + "peer_vs_full"] = (peer[cpu]
                                                 / kinds[prefix + "full"][cpu])
            if peer is not None and prefix + "local" in kinds:
                mine[prefix + "fetch_us"] = (peer[cpu]
                                             - kinds[prefix + "local"][cpu])
        if "local" in kinds and "alone_resumed" in kinds:
            mine["cluster_overhead_us"] = (kinds["local"][cpu]
                                           - kinds["alone_resumed"][cpu])
        for name in ("full", "resumed"):
            for reference in ("haproxy", "nginx", "twisted", "owned"):
                mine.update(_ratio(kinds, f"alone_{name}",
                                   f"{reference}_{name}", cpu))
            # The floor of a server built on Twisted's TLS transport, and
            # of one whose record path leaves Python.
            for floor in ("twisted", "owned"):
                mine.update(_ratio(kinds, f"{floor}_{name}",
                                   f"haproxy_{name}", cpu))
            # What the access log costs a connection.
            mine.update(_ratio(kinds, f"logged_{name}", f"alone_{name}", cpu))
    return found


def main(argv: list[str] | None = None) -> None:
    """
    Measure some kinds on their own, for development, from the root of a
    checkout: C{.venv/bin/python -m benchmarks.rates --kinds
    alone_full,haproxy_full}.
    """
    import argparse
    import json
    import shutil
    import sys
    import tempfile

    from benchmarks.checkpoint import progress as print_progress
    from sslshare.dev.pki import init_pki

    parser = argparse.ArgumentParser(
        description="Handshake rates and server CPU per handshake of the "
        "kinds named, over real sockets (see the module docstring).")
    parser.add_argument("--kinds", default=",".join(FULL.kinds),
                        help="comma-separated, of: " + ", ".join(KINDS)
                        + " (by default all but " + ", ".join(OPTIONAL_KINDS)
                        + ")")
    parser.add_argument("--versions", default="tls1.2,tls1.3")
    parser.add_argument("--seconds", type=float, default=FULL.seconds)
    parser.add_argument("--clients", type=int, default=FULL.clients)
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every kind this many times, "
                             "interleaved, and report each kind's median "
                             "round")
    parser.add_argument("--json", action="store_true",
                        help="print the result as JSON on standard output")
    parser.add_argument("--profile", metavar="DIR",
                        help="run every sslshare node under cProfile and "
                             "leave <deployment>-<node>.pstats in DIR "
                             "(profiled figures are not comparable with "
                             "unprofiled ones)")
    parser.add_argument("--channel", choices=deploy.CHANNELS, default="tcp",
                        help="what the clusters' channel runs on: TCP on "
                             "127.0.0.1, or unix sockets (default: tcp)")
    options = parser.parse_args(argv)
    kinds = tuple(options.kinds.split(","))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kinds: {', '.join(unknown)}")
    if options.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {options.rounds}")
    settings = Settings(clients=options.clients, seconds=options.seconds,
                        rounds=options.rounds,
                        versions=tuple(options.versions.split(",")),
                        kinds=kinds, channel=options.channel,
                        profile=(None if options.profile is None
                                 else os.path.abspath(options.profile)))
    if settings.profile is not None:
        os.makedirs(settings.profile, exist_ok=True)
    deploy.stop_on_sigterm()
    directory = tempfile.mkdtemp(prefix="sslshare-rates-")
    try:
        init_pki(os.path.join(directory, "pki"), deploy.CLUSTER, PEER_NODES)
        measured = run(directory, settings, print_progress)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if options.json:
        json.dump(measured, sys.stdout, indent=2)
        print()
    else:
        for version, mine in measured["ratios"].items():
            print(version, ", ".join(f"{key} {value:.2f}"
                                     for key, value in mine.items()))
            for kind, figures in measured["kinds"][version].items():
                print(f"  {kind}: {figures['server_cpu_us_per_handshake']:.0f}"
                      f" µs/connection, messages "
                      f"{figures['messages_per_connection']}")


if __name__ == "__main__":
    main()
