"""
Handshakes per second over real sockets, server side, for measurements 2
and 3 of C{benchmarks/run.py}: an sslshare node's full handshakes and its
resumptions from each place it recovers sessions from, and one nginx
worker's full and resumed handshakes with the same certificate and client.

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
    - C{nginx_full}, C{nginx_resumed}: one nginx worker with its own
      session cache (tickets off), fresh and offering connections.

In a cluster a node also sends each new session's backup copy and its
checkpoints to its backup node; the server CPU of a cluster kind is that
of all its nodes, so that C{local} and C{peer} pay for the same cluster
work and differ by the fetch alone.  C{alone_*} against C{nginx_*} is one
process against one worker.

The sslshare nodes proxy to one nginx worker answering plain HTTP, nginx
answers C{200 ok} itself; the clients send the same GET to both.  A kind's
rate is the connections completed in the window over its length; its
I{server CPU per handshake} is the CPU seconds of every node of the
deployment (or of nginx's master and worker) over the connections, which
does not depend on how much CPU the clients took from the two cores; its
I{capacity} is the inverse, handshakes per server CPU second.  The nodes'
own counters (C{resumed_local}, C{resumed_peer}, C{resumed_repository})
say where each resumption really came from.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any, Callable

import attrs

from benchmarks import deploy
from benchmarks.checkpoint import BenchmarkError
from benchmarks.load import Load, run_clients

CLUSTER_KINDS = ("full", "local", "peer", "sqlite", "redis", "postgres")
NGINX_KINDS = ("alone_full", "alone_resumed", "nginx_full", "nginx_resumed")
PEER_NODES = ("node1", "node2", "node3")
# Each node's backup node is the next in this sorted ring
# (sslshare.recovery.BackupRing): clients walk it the other way.
PEER_ORDER = ("node1", "node3", "node2")
REPOSITORY_NODES = ("node1", "node2")
# Seconds between launching the clients and their common start: enough for
# their interpreters to start on a loaded machine.
LAUNCH_SECONDS = 1.5


@attrs.frozen
class Settings:
    clients: int
    seconds: float
    versions: tuple[str, ...]


QUICK = Settings(clients=6, seconds=2.0, versions=("tls1.3",))
FULL = Settings(clients=6, seconds=8.0, versions=("tls1.2", "tls1.3"))


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
    nodes' handshake counters, over one window.
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
        "server_counts": {key: after[key] - before[key] for key in after
                          if after[key] - before[key]},
    }


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


def run(directory: str, settings: Settings,
        progress: Callable[[str], None]) -> dict[str, Any]:
    """
    Every kind for every TLS version of C{settings}: per version, per kind,
    the figures of L{measure}; and per version the ratios that judge the
    cluster (peer/local capacity, sslshare/nginx rates).
    """
    ca_certificate = os.path.join(directory, "pki", "ca.pem")
    results: dict[str, dict[str, Any]] = {v: {} for v in settings.versions}
    processes = deploy.Processes()
    try:
        backend_port, backend = deploy.start_nginx(
            processes, directory, "nginx-backend", tls=False)

        def each_version(kind: str, deployment: Deployment, offer: bool,
                         with_backend: bool = True) -> None:
            for version in settings.versions:
                load = Load(ports=deployment.ports, version=version,
                            offer=offer, seconds=settings.seconds)
                figures = measure(deployment, load, ca_certificate, settings,
                                  backend if with_backend else None)
                results[version][kind] = figures
                progress(f"  {kind} {version}: "
                         f"{figures['handshakes_per_s']:.0f}/s, server "
                         f"{figures['server_cpu_us_per_handshake']:.0f} "
                         f"µs/handshake, busy {figures['server_busy']:.2f}, "
                         f"resumed {figures['resumed_fraction']:.3f}")

        cluster = {node.name: node for node in deploy.start_sslshare(
            processes, directory, "rate-cluster", backend_port, PEER_NODES,
            peers=True)}
        everyone = (tuple(node.process for node in cluster.values()),
                    tuple(cluster.values()))
        first = (cluster[PEER_ORDER[0]].port,)
        each_version("full", Deployment(first, *everyone), offer=False)
        each_version("local", Deployment(first, *everyone), offer=True)
        each_version("peer", Deployment(
            tuple(cluster[name].port for name in PEER_ORDER), *everyone),
            offer=True)

        for kind in ("sqlite", "redis", "postgres"):
            servers: list[Any] = []
            try:
                repository = _repository_settings(kind, directory, servers)
                nodes = deploy.start_sslshare(
                    processes, directory, f"rate-{kind}", backend_port,
                    REPOSITORY_NODES, peers=False, repository=repository)
                each_version(kind, Deployment(
                    tuple(node.port for node in nodes),
                    tuple(node.process for node in nodes), tuple(nodes)),
                    offer=True)
            finally:
                for server in servers:
                    server.stop()
                    server.remove()

        alone = deploy.start_sslshare(processes, directory, "rate-alone",
                                      backend_port, ("node1",), peers=False)
        one = Deployment((alone[0].port,), (alone[0].process,), tuple(alone))
        each_version("alone_full", one, offer=False)
        each_version("alone_resumed", one, offer=True)

        nginx_port, nginx = deploy.start_nginx(processes, directory, "nginx-tls")
        nginx_deployment = Deployment((nginx_port,), (nginx,))
        each_version("nginx_full", nginx_deployment, offer=False,
                     with_backend=False)
        each_version("nginx_resumed", nginx_deployment, offer=True,
                     with_backend=False)
    finally:
        processes.stop_all()
    return {"kinds": results, "ratios": ratios(results),
            "settings": attrs.asdict(settings)}


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """
    Per TLS version: peer/local capacity (the goal: >= 0.9) and
    rate, each resumption source's capacity against local, and
    sslshare/nginx for full and resumed handshakes, by rate and by server
    CPU.
    """
    found: dict[str, dict[str, float]] = {}
    for version, kinds in results.items():
        local = kinds["local"]["handshakes_per_server_cpu_s"]
        mine = found[version] = {
            f"{kind}_vs_local_capacity":
                kinds[kind]["handshakes_per_server_cpu_s"] / local
            for kind in ("peer", "sqlite", "redis", "postgres")}
        mine["peer_vs_local_rate"] = (kinds["peer"]["handshakes_per_s"]
                                      / kinds["local"]["handshakes_per_s"])
        for name in ("full", "resumed"):
            sslshare_kind, nginx_kind = f"alone_{name}", f"nginx_{name}"
            mine[f"{name}_rate_vs_nginx"] = (
                kinds[sslshare_kind]["handshakes_per_s"]
                / kinds[nginx_kind]["handshakes_per_s"])
            mine[f"{name}_capacity_vs_nginx"] = (
                kinds[sslshare_kind]["handshakes_per_server_cpu_s"]
                / kinds[nginx_kind]["handshakes_per_server_cpu_s"])
    return found
