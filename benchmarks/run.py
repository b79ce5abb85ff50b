"""
The benchmark run: what sslshare exists for, measured as ratios
in one run and set beside what an operator would otherwise deploy.  It
starts everything it measures itself, on 127.0.0.1, with bounded request
counts and durations, and writes C{benchmarks/RESULTS.md} and
C{benchmarks/results.json}.

Usage, from the root of a checkout (C{make bench} runs C{--quick})::

    .venv/bin/python benchmarks/run.py [--quick] [--keep]

C{--quick} takes about five minutes, the full run under twenty; C{--keep}
leaves the temporary directory (configurations, PKI, logs) in place.

The measurements, each made by the module named (whose docstring says how):

    1. B{Cross-node resumption} (L{cross_node_resumption}, this file).
       Three servers behind one HAProxy (C{mode tcp}, C{balance
       roundrobin}), client processes (L{benchmarks.load}) each connecting
       through it again and again, offering the session of its previous
       connection: the fraction of those offers that resume, TLS 1.2 and
       1.3, for three sslshare nodes of one cluster, the same nodes with no
       peers (sharing off, expect about 1/3), and three nginx instances
       each with its own C{ssl_session_cache} (expect about 1/3).
    2. B{Handshake rate}, server side (L{benchmarks.rates}): full,
       resumed from the local store, from a peer, from each repository
       backend, over real sockets with client processes; and the lookup
       latency, p50 and p99, per source (C{benchmarks/repository.py},
       which times each lookup inside one process).
    3. B{Against HAProxy and nginx stream} (L{benchmarks.rates}): a lone
       sslshare node, one HAProxy thread (C{ssl crt}), one nginx
       C{stream} worker and stock Twisted's TLS with its port forwarder
       (L{benchmarks.twisted_tls}: the floor under any server on Twisted's
       TLS transport), and the same proxy with OpenSSL reading and writing
       the client's socket itself (L{benchmarks.owned_tls}: the floor if
       the TLS record path left Python) terminating TLS for the same
       backend, same
       certificate, same clients: server CPU per full and resumed
       connection, and the lone node over each; what the cluster adds per
       connection and what a peer fetch adds; the cluster commands (and
       the items they carry) each kind's nodes received per connection.
    4. B{Checkpoint cost} (C{benchmarks/checkpoint.py}): bulk throughput
       with checkpoints every record against off.
    5. B{Memory} (L{benchmarks.memory}): bytes per stored session at 100k
       and 1M sessions.
    6. B{Worker processes} (C{benchmarks/workers.py}): a node of two
       workers against a node of one, handshakes per second and server CPU
       per handshake, full and resumed (on the same worker or across
       workers, through the host's table).

The full run also measures the TLS engine against plain OpenSSL
(C{benchmarks/engine.py}).  The load generator's CPU is reported
beside each rate.  This script measures; it never asserts a number, and
RESULTS.md holds no number this run did not produce.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import deploy, memory, rates  # noqa: E402
from benchmarks.checkpoint import (  # noqa: E402
    BenchmarkError,
    environment,
    progress,
)
from benchmarks.load import VERSIONS, Load, run_clients  # noqa: E402

RESULTS_JSON = os.path.join(ROOT, "benchmarks", "results.json")
RESULTS_MD = os.path.join(ROOT, "benchmarks", "RESULTS.md")

NODES = ("node1", "node2", "node3")
MODES = ("sslshare", "sharing_off", "nginx")
RESUMPTION_GOAL = 0.999
PEER_GOAL = 0.9
# Server CPU per peer resumption over per full handshake in the same
# cluster: P-256, and RSA-2048, where a full handshake costs more.
PEER_VS_FULL_GOAL = 0.8
RSA_PEER_VS_FULL_GOAL = 0.5
# µs per connection: a 3-node local resumption over a lone node's, and a
# peer resumption over a local one.
CLUSTER_OVERHEAD_GOAL_US = 150
FETCH_GOAL_US = 300
# A lone node's server CPU per connection over HAProxy's.
VS_HAPROXY_GOALS = {"full": 1.6, "resumed": 2.0}
# Node CPU per MB, checkpoint every record over off, at 16 KiB records.
CHECKPOINT_CPU_GOAL = 1.3
PEER_LOOKUP_P99_GOAL_MS = 1.0
RSA_SUFFIX = "-rsa2048"
# A server this busy (CPU seconds per second) is taken as saturated.
SATURATED = 0.8

# Measurement 1, per mode and TLS version: client processes x connections
# each.  The full run gives about 4000 resumable connections per cell, so
# that one failure shows against the goal of 99.9%.
QUICK = {"clients": 4, "connections": 30}
FULL = {"clients": 4, "connections": 1000}


# Measurement 1.

def cross_node_resumption(directory: str, settings: dict[str, int]
                          ) -> dict[str, Any]:
    """
    Measurement 1 (see the module docstring): per mode and TLS version, the
    fraction of resumable connections resumed, and the raw counts.
    """
    ca_certificate = os.path.join(directory, "pki", "ca.pem")

    def sslshare(processes: deploy.Processes, peers: bool) -> list[deploy.Node]:
        mode = "sslshare" if peers else "sharing_off"
        return deploy.start_sslshare(
            processes, directory, mode,
            deploy.start_backend(processes, directory), NODES, peers=peers)

    def nginx(processes: deploy.Processes) -> list[int]:
        return [deploy.start_nginx(processes, directory, f"nginx{index}")[0]
                for index in range(1, len(NODES) + 1)]

    fractions: dict[str, dict[str, float | None]] = {}
    counts: dict[str, dict[str, dict[str, Any]]] = {}
    for mode in MODES:
        processes = deploy.Processes()
        try:
            nodes = [] if mode == "nginx" else sslshare(
                processes, peers=mode == "sslshare")
            ports = nginx(processes) if mode == "nginx" else [
                node.port for node in nodes]
            balancer = deploy.start_haproxy(processes, directory, mode, ports)
            fractions[mode], counts[mode] = {}, {}
            for version in VERSIONS:
                before = deploy.handshake_counters(nodes)
                total = run_clients(
                    Load(ports=(balancer,), version=version,
                         connections=settings["connections"]),
                    ca_certificate, settings["clients"])
                if nodes:
                    # Per version: the nodes' counters are cumulative.
                    after = deploy.handshake_counters(nodes)
                    total["server"] = {key: after[key] - before.get(key, 0)
                                       for key in after}
                counts[mode][version] = total
                fractions[mode][version] = (
                    total["resumed"] / total["resumable"]
                    if total["resumable"] else None)
                progress(f"  {mode} {version}: resumed {total['resumed']} of "
                         f"{total['resumable']} resumable, "
                         f"{total['errors']} errors")
        finally:
            processes.stop_all()
    return {"fractions": fractions, "counts": counts, "goal": RESUMPTION_GOAL,
            "settings": dict(settings)}


# Measurements made by the other scripts, as their --json output.

def script_json(script: str, arguments: list[str]) -> dict[str, Any]:
    """
    Run C{benchmarks/script} with C{--json}, its progress going to this
    run's standard error; its result.
    """
    command = [sys.executable, os.path.join(ROOT, "benchmarks", script),
               *arguments, "--json"]
    done = subprocess.run(command, cwd=ROOT, env=environment(),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise BenchmarkError(f"{shlex.join(command)} ended with status "
                             f"{done.returncode}")
    result = json.loads(done.stdout)
    result["command"] = shlex.join([os.path.relpath(sys.executable, ROOT),
                                    f"benchmarks/{script}", *arguments])
    return result


def table_of(print_table: Callable[[dict], None], result: dict) -> str:
    """
    What a script's own C{print_table} prints for C{result}.
    """
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        print_table(result)
    return output.getvalue().rstrip()


# Output.

def machine() -> dict[str, Any]:
    from benchmarks.engine import machine as engine_machine

    facts = engine_machine()
    facts["os"] = platform.platform()
    # engine.py's client is pyOpenSSL; this run's clients are Python's ssl.
    facts.pop("client_openssl", None)
    facts["load_generator_ssl"] = ssl.OPENSSL_VERSION
    for command, arguments in (("haproxy", ["-v"]), ("nginx", ["-v"])):
        path = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
        if path:
            done = subprocess.run([path] + arguments, capture_output=True,
                                  text=True)
            facts[command] = (done.stdout or done.stderr).splitlines()[0].strip()
    facts["commit"] = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT,
        capture_output=True, text=True).stdout.strip() or "unknown"
    return facts


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _unsaturated(kinds: dict[str, Any]) -> str:
    """
    A warning when nginx was not kept busy: its rates then measure the
    clients, and only the CPU per handshake compares the servers.
    """
    busy = max((kinds[kind]["server_busy"] for kind in rates.REFERENCE_KINDS
                if kind.startswith("nginx") and kind in kinds), default=None)
    if busy is None:
        return ""
    if busy >= SATURATED:
        return ""
    return (f"; nginx busy at most {busy:.2f} of a core: the rates are "
            f"client-bound here, compare per server CPU second.")


def _met(met: bool) -> str:
    return "**met**" if met else "**not met**"


def results_json(command: str, facts: dict[str, Any], measured: dict[str, Any],
                 seconds: float) -> dict[str, Any]:
    """
    C{results.json}: the headline keys first, then the detail they come
    from.
    """
    handshake_rates = measured["rates"]["kinds"]
    results = {
        "command": command,
        "machine": facts,
        "seconds": round(seconds, 1),
        "cross_node_resumption": measured["cross_node_resumption"]["fractions"],
        "handshakes_per_s": {
            version: {kind: figures["handshakes_per_s"]
                      for kind, figures in kinds.items()}
            for version, kinds in handshake_rates.items()},
        "lookup_ms": measured["lookups"]["lookup_ms"],
        "peer_vs_local": {
            version: {key: value for key, value in ratios.items()
                      if key.startswith("peer_vs_local")}
            for version, ratios in measured["rates"]["ratios"].items()},
        **by_certificate(measured["rates"]["ratios"]),
        "vs_haproxy": vs_reference(measured["rates"]["ratios"], "haproxy"),
        "vs_nginx": vs_reference(measured["rates"]["ratios"], "nginx"),
        "vs_twisted": vs_reference(measured["rates"]["ratios"], "twisted"),
        "twisted_vs_haproxy": vs_reference(measured["rates"]["ratios"],
                                           "haproxy", server="twisted"),
        "vs_owned": vs_reference(measured["rates"]["ratios"], "owned"),
        "owned_vs_haproxy": vs_reference(measured["rates"]["ratios"],
                                         "haproxy", server="owned"),
        "checkpoint_ratio": measured["checkpoint"]["checkpoint_ratio"],
        "checkpoint_cpu_ratio": checkpoint_cpu_ratio(measured["checkpoint"]),
        "messages_per_connection": {
            version: {kind: figures["messages_per_connection"]
                      for kind, figures in kinds.items()
                      if figures["messages_per_connection"]}
            for version, kinds in handshake_rates.items()},
        "items_per_connection": {
            version: {kind: figures["items_per_connection"]
                      for kind, figures in kinds.items()
                      if figures["items_per_connection"]}
            for version, kinds in handshake_rates.items()},
        "bytes_per_session": measured["memory"]["bytes_per_session"],
        "workers": measured["workers"]["ratios"],
        "detail": measured,
    }
    return results


def by_certificate(ratios: dict[str, dict[str, Any]]
                   ) -> dict[str, dict[str, float]]:
    """
    C{peer_vs_full}, C{cluster_overhead_us} and C{fetch_us}, each keyed by
    TLS version, and by version with L{RSA_SUFFIX} for the RSA-2048
    cluster's: the figures the goals name.
    """
    found: dict[str, dict[str, float]] = {
        "peer_vs_full": {}, "cluster_overhead_us": {}, "fetch_us": {}}
    for version, mine in ratios.items():
        for prefix, key in (("", version), ("rsa_", version + RSA_SUFFIX)):
            for name, ratio in (("peer_vs_full", f"{prefix}peer_vs_full"),
                                ("cluster_overhead_us",
                                 f"{prefix}cluster_overhead_us"),
                                ("fetch_us", f"{prefix}fetch_us")):
                if ratio in mine:
                    found[name][key] = mine[ratio]
    return found


def vs_reference(ratios: dict[str, dict[str, Any]], reference: str,
                 server: str = "alone") -> dict[str, dict[str, float]]:
    """
    Per TLS version, C{server}'s (the lone node's, or another reference
    kind's) server CPU per connection over C{reference}'s, C{full} and
    C{resumed}.
    """
    return {version: {name: mine[f"{server}_{name}_vs_{reference}_{name}"]
                      for name in ("full", "resumed")
                      if f"{server}_{name}_vs_{reference}_{name}" in mine}
            for version, mine in ratios.items()}


def checkpoint_cpu_ratio(checkpoint: dict[str, Any]) -> dict[str, float]:
    """
    Node CPU per MB, checkpoint every record over off, at 1 KiB and
    16 KiB records.
    """
    return {size.removesuffix("iB").lower(): ratio
            for size, ratio in checkpoint["cpu_ratio"].items()}


def report(command: str, facts: dict[str, Any], measured: dict[str, Any],
           seconds: float) -> str:
    """
    RESULTS.md for this run.
    """
    today = datetime.date.today().isoformat()
    lines = [
        "# Benchmark results",
        "",
        f"Written by `{command}` on {today} in {seconds:.0f} s; every number "
        f"below comes from that one run on this machine (2 cores, shared "
        f"and noisy): compare within the run, not across runs. How each is "
        f"measured: the docstring of `benchmarks/run.py` and of the module it "
        f"names.",
        "",
    ]
    lines += headline(measured)
    lines += ["", "Machine:", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    lines += ["", *resumption_section(measured["cross_node_resumption"])]
    lines += ["", *rates_section(measured["rates"], measured["lookups"])]
    checkpoint = measured["checkpoint"]
    from benchmarks import checkpoint as checkpoint_script

    lines += ["", "## 4. Checkpoint cost", "",
              f"`{checkpoint['command']}`:", "", "```",
              table_of(checkpoint_script.print_table, checkpoint), "```"]
    lines += ["", *memory_section(measured["memory"])]
    from benchmarks import workers

    lines += ["", "## 6. Worker processes", "",
              f"`{measured['workers']['command']}`:", "", "```",
              table_of(workers.print_table, measured["workers"]), "```"]
    if "engine" in measured:
        from benchmarks import engine

        lines += ["", "## TLS engine against plain OpenSSL", "",
                  f"`{measured['engine']['command']}`:", "", "```",
                  table_of(engine.print_table, measured["engine"]), "```"]
    return "\n".join(lines) + "\n"


def headline(measured: dict[str, Any]) -> list[str]:
    """
    The table README.rst shows: one line per question, its goal, and
    whether this run met it.
    """
    resumption = measured["cross_node_resumption"]["fractions"]
    kinds = measured["rates"]["kinds"]
    ratios = measured["rates"]["ratios"]
    version = "tls1.3" if "tls1.3" in kinds else next(iter(kinds))
    lookups = measured["lookups"]["lookup_ms"]
    checkpoint = measured["checkpoint"]["checkpoint_ratio"]
    cpu_ratio = checkpoint_cpu_ratio(measured["checkpoint"])
    certificate = by_certificate(ratios)
    haproxy = vs_reference(ratios, "haproxy")
    twisted = vs_reference(ratios, "haproxy", server="twisted")
    over_twisted = vs_reference(ratios, "twisted")
    owned = vs_reference(ratios, "haproxy", server="owned")
    over_owned = vs_reference(ratios, "owned")
    per_session = measured["memory"]["bytes_per_session"]
    worst_share = min(value for value in resumption["sslshare"].values()
                      if value is not None)
    peer = min(r["peer_vs_local_capacity"] for r in ratios.values())
    largest = max(per_session, key=int)
    rows = [
        ("Cross-node resumption behind round robin, sslshare (TLS 1.2 / 1.3)",
         " / ".join(_percent(resumption["sslshare"][v]) for v in VERSIONS),
         f">= {100 * RESUMPTION_GOAL:.1f}%: {_met(worst_share >= RESUMPTION_GOAL)}"),
        ("... same nodes, sharing off / 3 nginx with own caches",
         " / ".join(_percent(resumption[mode]["tls1.3"])
                    for mode in ("sharing_off", "nginx")) + " (TLS 1.3)",
         "expected about 33%"),
        ("Peer-resumed / local-resumed, handshakes per server CPU second "
         "(per second)",
         ", ".join(f"{v}: {r['peer_vs_local_capacity']:.2f} "
                   f"({r['peer_vs_local_rate']:.2f})"
                   for v, r in ratios.items()),
         f">= {PEER_GOAL}: {_met(peer >= PEER_GOAL)}"),
        (f"Handshakes/s into a 3-node cluster ({version}): full / resumed "
         f"local / peer; 2 nodes sharing sqlite / redis / postgres",
         " / ".join(f"{kinds[version][kind]['handshakes_per_s']:.0f}"
                    for kind in rates.CLUSTER_KINDS), ""),
        ("Server CPU per peer resumption / per full handshake, same "
         "cluster (P-256; RSA-2048)",
         _figures(certificate["peer_vs_full"], "{:.2f}"),
         f"<= {PEER_VS_FULL_GOAL} (RSA <= {RSA_PEER_VS_FULL_GOAL}): "
         + _met(all(value <= (RSA_PEER_VS_FULL_GOAL if key.endswith(RSA_SUFFIX)
                              else PEER_VS_FULL_GOAL)
                    for key, value in certificate["peer_vs_full"].items()))),
        ("Cluster overhead per connection, 3-node local resumption minus a "
         "lone node's (µs)",
         _figures(certificate["cluster_overhead_us"], "{:.0f}"),
         f"<= {CLUSTER_OVERHEAD_GOAL_US}: " + _met(all(
             value <= CLUSTER_OVERHEAD_GOAL_US
             for value in certificate["cluster_overhead_us"].values()))),
        ("Peer fetch per connection, peer minus local resumption (µs)",
         _figures(certificate["fetch_us"], "{:.0f}"),
         f"<= {FETCH_GOAL_US}: " + _met(all(
             value <= FETCH_GOAL_US
             for value in certificate["fetch_us"].values()))),
        ("Lone node / HAProxy (one thread), server CPU per connection: "
         "full / resumed",
         ", ".join(f"{v}: {r['full']:.2f} / {r['resumed']:.2f}"
                   for v, r in haproxy.items()),
         f"<= {VS_HAPROXY_GOALS['full']} / {VS_HAPROXY_GOALS['resumed']}: "
         + _met(all(r[name] <= goal for r in haproxy.values()
                    for name, goal in VS_HAPROXY_GOALS.items()))),
        ("Lone node / nginx stream (one worker), server CPU per connection: "
         "full / resumed",
         ", ".join(f"{v}: {r['full']:.2f} / {r['resumed']:.2f}"
                   for v, r in vs_reference(ratios, "nginx").items()),
         "stated, no goal" + _unsaturated(kinds[version])),
        ("Stock Twisted TLS proxy / HAProxy, server CPU per connection: "
         "full / resumed (lone node / stock Twisted)",
         ", ".join(f"{v}: {r['full']:.2f} / {r['resumed']:.2f} ("
                   f"{over_twisted[v]['full']:.2f} / "
                   f"{over_twisted[v]['resumed']:.2f})"
                   for v, r in twisted.items()),
         "the floor under a server on Twisted's TLS transport: no goal"),
        ("Twisted with OpenSSL owning the client socket / HAProxy, server "
         "CPU per connection: full / resumed (lone node / that proxy)",
         ", ".join(f"{v}: {r['full']:.2f} / {r['resumed']:.2f} ("
                   f"{over_owned[v]['full']:.2f} / "
                   f"{over_owned[v]['resumed']:.2f})"
                   for v, r in owned.items()),
         "the floor if the TLS record path left Python: no goal"),
        ("Lookup p50 / p99 ms: local, peer, sqlite, redis, postgres",
         ", ".join(f"{lookups[source]['p50']:.2f}/{lookups[source]['p99']:.2f}"
                   for source in lookups),
         f"peer p99 < {PEER_LOOKUP_P99_GOAL_MS}: "
         + _met(lookups["peer"]["p99"] < PEER_LOOKUP_P99_GOAL_MS)),
        ("Node CPU per MB, checkpoint every record / off (16 KiB / 1 KiB "
         "records)",
         f"{cpu_ratio['16k']:.2f} / {cpu_ratio['1k']:.2f}",
         f"<= {CHECKPOINT_CPU_GOAL} at 16 KiB: "
         + _met(cpu_ratio["16k"] <= CHECKPOINT_CPU_GOAL)),
        ("Bulk throughput, checkpoint every record / off (16 KiB / 1 KiB "
         "records)",
         f"{checkpoint['16KiB']:.2f} / {checkpoint['1KiB']:.2f}",
         "reported, no goal"),
        (f"Bytes per stored session at {int(largest):,} sessions",
         f"{per_session[largest]:.0f}",
         f"< {memory.GOAL}: {_met(per_session[largest] < memory.GOAL)}"),
    ]
    lines = ["| measured | this run | goal |", "|---|---|---|"]
    lines += [f"| {what} | {value} | {goal} |" for what, value, goal in rows]
    return lines


def _figures(values: dict[str, float], form: str) -> str:
    return ", ".join(f"{key}: {form.format(value)}"
                     for key, value in values.items())


def resumption_section(resumption: dict[str, Any]) -> list[str]:
    settings = resumption["settings"]
    lines = [
        "## 1. Cross-node resumption (3 servers behind HAProxy round robin)",
        "",
        f"{settings['clients']} concurrent client processes x "
        f"{settings['connections']} sequential connections each, per mode and "
        f"TLS version; a connection is resumable when it offers the previous "
        f"connection's session.",
        "",
        "| mode | TLS 1.2 resumed | TLS 1.3 resumed |",
        "|---|---|---|",
    ]
    for mode in MODES:
        cells = []
        for version in VERSIONS:
            c = resumption["counts"][mode][version]
            cells.append(f"{_percent(resumption['fractions'][mode][version])} "
                         f"({c['resumed']}/{c['resumable']}"
                         + (f", {c['errors']} errors" if c["errors"] else "")
                         + ")")
        lines.append(f"| {mode} | {cells[0]} | {cells[1]} |")
    lines += ["", "The sslshare nodes' own counts of the same handshakes "
              "(summed over the three nodes):", ""]
    for mode in MODES:
        for version in VERSIONS:
            server = resumption["counts"][mode][version].get("server")
            if server is not None:
                lines.append(f"- {mode} {version}: " + ", ".join(
                    f"{key} {value}" for key, value in sorted(server.items())))
    lines += ["", "Client CPU seconds per mode and version: " + ", ".join(
        f"{mode} {version} {resumption['counts'][mode][version]['cpu_s']:.1f}"
        for mode in MODES for version in VERSIONS) + "."]
    return lines


def rates_section(measured: dict[str, Any], lookups: dict[str, Any]) -> list[str]:
    settings = measured["settings"]
    lines = [
        "## 2 and 3. Handshake rates, server side, against HAProxy and nginx",
        "",
        f"{settings['clients']} client processes for {settings['seconds']:g} s "
        f"per kind and TLS version, in {settings['rounds']} rounds that each "
        f"measure every kind once (every deployment runs throughout); each "
        f"kind's figures are those of its median round by server µs, which "
        f"the ratios use. *server µs* is the CPU time of every "
        f"server process of the kind per handshake (independent of the share "
        f"of the 2 cores the clients took); *capacity* its inverse; *busy* "
        f"the server CPU seconds per second (1.0 = one core saturated); "
        f"*clients* the load generator's CPU seconds per second. The sslshare "
        f"nodes, HAProxy and nginx stream proxy to one nginx worker answering "
        f"plain HTTP, whose CPU is not counted. *served as* is what the nodes "
        f"counted; *messages* the cluster commands they received per "
        f"connection (*items* what those carried).",
        "",
    ]
    for version, kinds in measured["kinds"].items():
        lines += [f"### {version}", "",
                  "| kind | handshakes/s | resumed | server µs | capacity/s "
                  "| busy | clients | errors | served as |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for kind, f in kinds.items():
            served = ", ".join(f"{key} {value}" for key, value
                               in sorted(f["server_counts"].items()))
            lines.append(
                f"| {kind} | {f['handshakes_per_s']:.0f} | "
                f"{_percent(f['resumed_fraction'])} | "
                f"{f['server_cpu_us_per_handshake']:.0f} | "
                f"{f['handshakes_per_server_cpu_s']:.0f} | "
                f"{f['server_busy']:.2f} | {f['client_busy']:.2f} | "
                f"{f['errors']} | {served or '-'} |")
        lines += ["", "| kind | messages per connection | items per "
                  "connection |", "|---|---|---|"]
        for kind, f in kinds.items():
            if f["messages_per_connection"]:
                lines.append(
                    f"| {kind} | "
                    + _figures(f["messages_per_connection"], "{:.2f}")
                    + " | " + (_figures(f["items_per_connection"], "{:.2f}")
                               or "-") + " |")
        ratios = measured["ratios"][version]
        lines += ["", "Ratios: " + ", ".join(
            f"{key} {value:.2f}" for key, value in ratios.items()) + "."
            + _unsaturated(kinds).replace(";", " Note:", 1), ""]
    lines += [f"Goal: peer-resumed >= {PEER_GOAL} x local (capacity): " + ", ".join(
        f"{version} {_met(r['peer_vs_local_capacity'] >= PEER_GOAL)} "
        f"({r['peer_vs_local_capacity']:.2f})"
        for version, r in measured["ratios"].items()) + ".", ""]
    from benchmarks import repository

    lines += ["### Lookup latency by source", "",
              f"`{lookups['command']}` (every lookup timed inside one process, "
              f"one handshake at a time):", "", "```",
              table_of(repository.print_table, lookups), "```"]
    return lines


def memory_section(measured: dict[str, Any]) -> list[str]:
    lines = ["## 5. Memory per stored session", "",
             f"TLS {measured['tls']} sessions (P-256), each with a 32-byte "
             f"digest, in one store; resident set growth over the count. Goal "
             f"< {measured['goal']} bytes.", "",
             "| sessions | bytes per session | DER bytes | store's own estimate |",
             "|---|---|---|---|"]
    for count, figures in measured["detail"].items():
        lines.append(f"| {int(count):,} | {figures['bytes_per_session']:.0f} | "
                     f"{figures['der_bytes']} | "
                     f"{figures['store_estimate_per_session']:.0f} |")
    return lines


def measure_all(directory: str, quick: bool) -> dict[str, Any]:
    """
    Every measurement, in order, with progress on standard error.
    """
    measured: dict[str, Any] = {}
    progress("1. cross-node resumption")
    measured["cross_node_resumption"] = cross_node_resumption(
        directory, QUICK if quick else FULL)
    progress("2, 3. handshake rates, sslshare and nginx")
    measured["rates"] = rates.run(directory, rates.QUICK if quick else rates.FULL,
                                  progress)
    progress("2. lookup latency by source (benchmarks/repository.py)")
    measured["lookups"] = script_json("repository.py",
                                      ["--quick"] if quick else [])
    progress("4. checkpoint cost (benchmarks/checkpoint.py)")
    measured["checkpoint"] = script_json("checkpoint.py",
                                         ["--quick"] if quick else [])
    progress("5. memory per stored session")
    measured["memory"] = memory.measure()
    progress("6. worker processes (benchmarks/workers.py)")
    measured["workers"] = script_json(
        "workers.py", ["--rounds", "1" if quick else "2"])
    if not quick:
        progress("TLS engine against plain OpenSSL (benchmarks/engine.py)")
        measured["engine"] = script_json("engine.py", [])
    return measured


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer connections and shorter windows: under "
                        "six minutes, without the engine benchmark")
    parser.add_argument("--keep", action="store_true",
                        help="leave the temporary directory in place")
    options = parser.parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable, ROOT),
                          "benchmarks/run.py"] + argv)

    deploy.stop_on_sigterm()

    from sslshare.dev.pki import init_pki

    started = time.monotonic()
    directory = tempfile.mkdtemp(prefix="sslshare-bench-")
    try:
        init_pki(os.path.join(directory, "pki"), deploy.CLUSTER, NODES)
        deploy.ensure_command("haproxy")
        deploy.ensure_command("nginx")
        facts = machine()
        measured = measure_all(directory, options.quick)
    finally:
        if options.keep:
            progress(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    seconds = time.monotonic() - started
    with open(RESULTS_JSON, "w") as f:
        json.dump(results_json(command, facts, measured, seconds), f, indent=2)
        f.write("\n")
    text = report(command, facts, measured, seconds)
    with open(RESULTS_MD, "w") as f:
        f.write(text)
    print("\n".join(headline(measured)))
    progress(f"\nwrote {os.path.relpath(RESULTS_MD, ROOT)} and "
             f"{os.path.relpath(RESULTS_JSON, ROOT)} in {seconds:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except BenchmarkError as e:
        sys.exit(f"benchmark run: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; every process this run started was stopped")
