"""
How far the peer mesh goes on this machine: C{--nodes} sslshare nodes
(default 12), each a C{twistd} process and a peer of every other, behind
one HAProxy in C{mode tcp} with C{balance roundrobin}; client processes
connect through HAProxy again and again, each connection offering the
session of the previous one, so that nearly every resumption lands on
another node than the one that made the session.

Reported, per TLS version: the fraction of resumable connections resumed
(goal >= 99.9%), server CPU per connection (every node), the cluster
commands the nodes received per connection, by command (and the items of
their Deliver commands); and once: the links each node has up (a full
mesh: nodes - 1), each node's resident memory (MiB, from
C{/proc/<pid>/status}), and that of a lone node with no peers started
beside them, whose difference bounds what the links cost.

    .venv/bin/python benchmarks/scale.py [--nodes 12] [--clients 4]
        [--connections 250] [--json]

The figures of C{docs/scale.md} come from this command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))))

from benchmarks import deploy
from benchmarks.checkpoint import BenchmarkError
from benchmarks.load import Load, run_clients

VERSIONS = ("tls1.2", "tls1.3")
RESUMPTION_GOAL = 0.999


def resident_mib(pid: int) -> float:
    """
    The resident set size of process C{pid}, in MiB.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise BenchmarkError(f"no VmRSS for process {pid}")


def run(directory: str, nodes: int, clients: int, connections: int,
        progress: Any) -> dict[str, Any]:
    """
    Start the nodes, HAProxy and a lone node; measure each TLS version.
    """
    from sslshare.dev.pki import init_pki

    names = tuple(f"node{index}" for index in range(1, nodes + 1))
    init_pki(os.path.join(directory, "pki"), cluster=deploy.CLUSTER,
             nodes=[*names, "alone"])
    ca_certificate = os.path.join(directory, "pki", "ca.pem")
    processes = deploy.Processes()
    try:
        backend = deploy.start_backend(processes, directory)
        progress(f"starting {nodes} nodes, each a peer of every other")
        started = deploy.start_sslshare(processes, directory, "scale",
                                        backend, names, peers=True)
        alone = deploy.start_sslshare(processes, directory, "scale-lone",
                                      backend, ("alone",), peers=False)[0]
        balancer = deploy.start_haproxy(processes, directory, "scale",
                                        [node.port for node in started])
        versions: dict[str, Any] = {}
        for version in VERSIONS:
            before = deploy.handshake_counters(started)
            cpu = [deploy.tree_cpu_seconds(n.process.pid) for n in started]
            total = run_clients(Load(ports=(balancer,), version=version,
                                     connections=connections),
                                ca_certificate, clients)
            server_cpu = sum(deploy.tree_cpu_seconds(n.process.pid) - c
                             for n, c in zip(started, cpu))
            after = deploy.handshake_counters(started)
            changed = {key: after[key] - before.get(key, 0) for key in after
                       if after[key] - before.get(key, 0)}
            served = sum(changed.get(key, 0)
                         for key in deploy.HANDSHAKE_COUNTERS)
            if not served:
                raise BenchmarkError(f"no connection was served: {total}")
            versions[version] = {
                "resumed_fraction": (total["resumed"] / total["resumable"]
                                     if total["resumable"] else None),
                "resumed": total["resumed"],
                "resumable": total["resumable"],
                "errors": total["errors"],
                "server_cpu_us_per_connection": 1e6 * server_cpu / served,
                "server_counts": {key: changed.get(key, 0)
                                  for key in deploy.HANDSHAKE_COUNTERS},
                "messages_per_connection": {
                    key.split(":", 1)[1]: value / served
                    for key, value in sorted(changed.items())
                    if key.startswith("commands:")},
                "items_per_connection": {
                    key.split(":", 1)[1]: value / served
                    for key, value in sorted(changed.items())
                    if key.startswith("items:")},
            }
            progress(f"  {version}: resumed {total['resumed']} of "
                     f"{total['resumable']}, {total['errors']} errors")
        links = []
        for node in started:
            stats = deploy.node_stats(node)
            if stats is None:
                raise BenchmarkError(f"sslshare stats of {node.config} failed")
            links.append(stats.get("peers.connected", 0))
        memory = [resident_mib(node.process.pid) for node in started]
        return {
            "nodes": nodes,
            "clients": clients,
            "connections_per_client": connections,
            "goal": RESUMPTION_GOAL,
            "versions": versions,
            "links_per_node": links,
            "resident_mib_per_node": memory,
            "resident_mib_lone_node": resident_mib(alone.process.pid),
        }
    finally:
        processes.stop_all()


def print_table(result: dict[str, Any]) -> None:
    memory = result["resident_mib_per_node"]
    print(f"{result['nodes']} nodes behind HAProxy round robin, "
          f"{result['clients']} clients x {result['connections_per_client']} "
          f"connections per TLS version")
    print(f"links up per node: min {min(result['links_per_node'])}, "
          f"max {max(result['links_per_node'])} (full mesh: "
          f"{result['nodes'] - 1})")
    print(f"resident MiB per node: min {min(memory):.1f}, max "
          f"{max(memory):.1f}; a lone node: "
          f"{result['resident_mib_lone_node']:.1f}")
    for version, figures in result["versions"].items():
        fraction = figures["resumed_fraction"]
        shown = "-" if fraction is None else f"{100 * fraction:.2f}%"
        messages = ", ".join(f"{name} {value:.2f}" for name, value
                             in figures["messages_per_connection"].items())
        items = ", ".join(f"{name} {value:.2f}" for name, value
                          in figures["items_per_connection"].items())
        print(f"{version}: resumed {shown} ({figures['resumed']}/"
              f"{figures['resumable']}, {figures['errors']} errors), server "
              f"{figures['server_cpu_us_per_connection']:.0f} µs/connection; "
              f"commands per connection: {messages or 'none'}; "
              f"Deliver items: {items or 'none'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Resumption, links, memory and messages of an N-node "
                    "peer mesh behind HAProxy round robin.")
    parser.add_argument("--nodes", type=int, default=12)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--connections", type=int, default=250,
                        help="connections per client process and TLS "
                             "version")
    parser.add_argument("--json", action="store_true",
                        help="print the result as JSON")
    options = parser.parse_args(argv)
    if options.nodes < 2:
        parser.error("--nodes must be at least 2")
    deploy.stop_on_sigterm()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sslshare-scale-") as directory:
        result = run(directory, options.nodes, options.clients,
                     options.connections,
                     lambda line: print(line, file=sys.stderr, flush=True))
    result["seconds"] = round(time.monotonic() - began, 1)
    if options.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print_table(result)


if __name__ == "__main__":
    main()
