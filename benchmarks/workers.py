"""
A node of two worker processes against a node of one: C{twistd sslshare}
with C{workers = 2} and with C{workers = 1}, both running, alone (no
peers), behind one address each, with the same clients
(L{benchmarks.load}: client processes, each connecting again and again).

For each node and TLS version, in rounds that alternate the two nodes:

    - C{full}: no session offered;
    - C{resumed}: each client offers the session of its previous
      connection.  With one worker every resumption is on the worker that
      holds the session; with two, the kernel sends each connection to
      either worker (C{SO_REUSEPORT}), so about half are resumed on the
      other worker, taken from the host's table, and the rest on the same
      worker (also through the table).  The node's access log says which
      (C{resumed}: C{"repository"}, across workers; C{"local"}, the same).

Each kind reports handshakes per second over the window and the server's
CPU per handshake: the CPU seconds of the node's whole process tree (the
supervisor and its workers) over the window, divided by the connections
the clients finished in it.  The resumed handshakes of two workers are a
mix; the CPU of one resumed across workers is estimated from it as if a
resumption on the same worker cost what one of the lone worker does:
C{(mix - (1 - across) x same) / across}.  That charges to the resumptions
across workers everything a node of two workers costs more per handshake
than a node of one; the excess of a full handshake
(C{full_cpu_workers2_vs_workers1}) shows how much of it has nothing to do
with where a session is: an upper bound, not the cost of the table.  This
script measures; it never asserts a number.

    .venv/bin/python benchmarks/workers.py [--seconds 3] [--rounds 2]
        [--clients 2] [--versions tls1.2,tls1.3]
        [--checkpoint every-record|interval|off] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import deploy  # noqa: E402
from benchmarks.checkpoint import (  # noqa: E402
    BenchmarkError,
    progress,
    twistd_command,
)
from benchmarks.load import Load, run_clients  # noqa: E402
from benchmarks.rates import LAUNCH_SECONDS  # noqa: E402

WORKERS = (1, 2)
KINDS = ("full", "resumed")


def start_node(processes: deploy.Processes, directory: str, workers: int,
               backend_port: int, checkpoint: str) -> tuple[int, Any, str]:
    """
    A node of C{workers} worker processes, checkpointing as C{checkpoint}
    says: its port, its process and its access log's path.
    """
    from tests.support.cluster import NODE_CONFIG

    port, amp_port = deploy.free_port(), deploy.free_port()
    access_log = os.path.join(directory, f"workers{workers}-access.log")
    configuration = NODE_CONFIG.format(
        node="node1", cluster=deploy.CLUSTER, client_port=port,
        backend_port=backend_port, state_dir=f"state/workers{workers}",
        node_options=f'workers = {workers}\naccess_log = "{access_log}"\n'
                     f'checkpoint = "{checkpoint}"',
        amp_port=amp_port, peers="")
    cluster_listen = f'listen = "tcp:{amp_port}:interface=127.0.0.1"\n'
    if cluster_listen not in configuration:
        raise BenchmarkError("NODE_CONFIG no longer has the cluster listen "
                             "line this removes")
    path = os.path.join(directory, f"workers{workers}.toml")
    with open(path, "w") as f:
        f.write(configuration.replace(cluster_listen, ""))
    log = os.path.join(directory, f"workers{workers}.log")
    process = processes.start(f"workers={workers}", twistd_command(log, path),
                              log + ".stderr")
    processes.wait_for_port(process, port)
    return port, process, access_log


def resumed_sources(access_log: str, skip: int) -> tuple[Counter[str], int]:
    """
    The C{resumed} values of the access log's lines past the first
    C{skip}, and the number of lines now.
    """
    with open(access_log) as f:
        lines = f.readlines()
    # null: a connection without a handshake (the probe of the port).
    return (Counter(str(json.loads(line)["resumed"]) for line in lines[skip:]),
            len(lines))


def measure(seconds: float, rounds: int, clients: int,
            versions: tuple[str, ...], checkpoint: str) -> dict[str, Any]:
    from sslshare.dev.pki import init_pki

    directory = tempfile.mkdtemp(prefix="sslshare-workers-")
    processes = deploy.Processes()
    try:
        pki = init_pki(os.path.join(directory, "pki"), deploy.CLUSTER,
                       ("node1",))
        backend_port = deploy.start_backend(processes, directory)
        nodes = {workers: start_node(processes, directory, workers,
                                     backend_port, checkpoint)
                 for workers in WORKERS}
        # Both workers of the node of two take their sockets.
        time.sleep(2)
        lines = dict.fromkeys(WORKERS, 0)
        totals: dict[str, dict[str, float]] = {}
        sources: dict[str, Counter[str]] = {}
        for round_number in range(rounds):
            for version in versions:
                for kind in KINDS:
                    order = WORKERS if round_number % 2 == 0 else WORKERS[::-1]
                    for workers in order:
                        port, process, access_log = nodes[workers]
                        load = Load(ports=(port,), version=version,
                                    offer=kind == "resumed", seconds=seconds)
                        before = deploy.tree_cpu_seconds(process.pid)
                        counts = run_clients(
                            load, pki.ca_certificate, clients,
                            start=time.time() + LAUNCH_SECONDS)
                        if not counts.get("connections"):
                            raise BenchmarkError(f"no connection completed: "
                                                 f"{counts}")
                        cpu = deploy.tree_cpu_seconds(process.pid) - before
                        # The access log is written once a second.
                        time.sleep(1.2)
                        found, lines[workers] = resumed_sources(
                            access_log, lines[workers])
                        name = f"workers{workers}_{version}_{kind}"
                        total = totals.setdefault(name, Counter())
                        total.update(connections=counts.get("connections", 0),
                                     resumable=counts.get("resumable", 0),
                                     resumed=counts.get("resumed", 0),
                                     errors=counts.get("errors", 0),
                                     cpu_s=cpu, seconds=seconds)
                        sources.setdefault(name, Counter()).update(found)
                        progress(f"round {round_number + 1} {name}: "
                                 f"{counts.get('connections', 0)} connections")
    finally:
        processes.stop_all()
        shutil.rmtree(directory, ignore_errors=True)
    return summary(totals, sources, versions)


def summary(totals: dict[str, dict[str, float]],
            sources: dict[str, Counter[str]],
            versions: tuple[str, ...]) -> dict[str, Any]:
    kinds: dict[str, Any] = {}
    for name, total in totals.items():
        connections = total["connections"]
        kinds[name] = {
            "handshakes_per_s": round(total["connections"] / total["seconds"],
                                      1),
            "cpu_us_per_handshake": round(total["cpu_s"] / connections * 1e6),
            "resumed_share": (round(total["resumed"] / total["resumable"], 5)
                              if total["resumable"] else None),
            "errors": int(total["errors"]),
            "resumed_from": dict(sources[name]),
        }
    ratios: dict[str, Any] = {}
    for version in versions:
        one = kinds[f"workers1_{version}_resumed"]
        two = kinds[f"workers2_{version}_resumed"]
        from_table = two["resumed_from"].get("repository", 0)
        resumed = from_table + two["resumed_from"].get("local", 0)
        across = from_table / resumed if resumed else 0.0
        same = one["cpu_us_per_handshake"]
        estimate = ((two["cpu_us_per_handshake"] - (1 - across) * same)
                    / across if across else None)
        full_one = kinds[f"workers1_{version}_full"]
        full_two = kinds[f"workers2_{version}_full"]
        ratios[version] = {
            "across_workers_share": round(across, 3),
            "full_cpu_workers2_vs_workers1": round(
                full_two["cpu_us_per_handshake"]
                / full_one["cpu_us_per_handshake"], 3),
            "resumed_cpu_workers2_vs_workers1": round(
                two["cpu_us_per_handshake"] / same, 3),
            "across_workers_cpu_us_estimate": (None if estimate is None
                                               else round(estimate)),
            "across_vs_same_estimate": (None if estimate is None
                                        else round(estimate / same, 3)),
            "full_rate_workers2_vs_workers1": round(
                full_two["handshakes_per_s"]
                / (full_one["handshakes_per_s"] or 1), 3),
            "resumed_rate_workers2_vs_workers1": round(
                two["handshakes_per_s"] / (one["handshakes_per_s"] or 1), 3),
        }
    return {"kinds": kinds, "ratios": ratios}


def print_table(result: dict[str, Any]) -> None:
    print(f"{'kind':34} {'handshakes/s':>12} {'CPU us/hs':>10} "
          f"{'resumed':>8}  resumed from")
    for name, kind in result["kinds"].items():
        share = kind["resumed_share"]
        print(f"{name:34} {kind['handshakes_per_s']:>12} "
              f"{kind['cpu_us_per_handshake']:>10} "
              f"{'' if share is None else f'{share:.2%}':>8}  "
              f"{kind['resumed_from']}")
    for version, ratio in result["ratios"].items():
        print(f"{version}: {ratio}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="window of each kind in each round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2,
                        help="client processes at once")
    parser.add_argument("--versions", default="tls1.2,tls1.3")
    parser.add_argument("--checkpoint", default="every-record",
                        help="the nodes' checkpoint mode: every-record "
                        "(the default of a node), interval or off")
    parser.add_argument("--json", action="store_true",
                        help="print the result as one JSON object")
    options = parser.parse_args(argv)
    deploy.stop_on_sigterm()
    result = measure(options.seconds, options.rounds, options.clients,
                     tuple(options.versions.split(",")), options.checkpoint)
    if options.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    try:
        main()
    except BenchmarkError as e:
        sys.exit(f"workers benchmark: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; every process this run started was stopped")
