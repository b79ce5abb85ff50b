"""
The benchmark run of issue 8: starts everything it measures itself, on
127.0.0.1, with bounded request counts, and writes C{benchmarks/results.json}.

Usage, from the root of a checkout (also C{make bench})::

    .venv/bin/python benchmarks/run.py [--quick] [--keep]

C{--quick} takes well under three minutes; C{--keep} leaves the temporary
directory (configurations, PKI, logs) in place.

Measured so far (one function per measurement, so that the others of
issue 8 -- handshake rates, against nginx, the checkpoint ratio, memory --
can be added beside it, calling C{benchmarks/engine.py},
C{repository.py} and C{checkpoint.py} rather than copying them):

    1. B{Cross-node resumption}, L{cross_node_resumption}.  Three servers
       behind one HAProxy (C{mode tcp}, C{balance roundrobin}), each
       client connecting through HAProxy again and again, offering the
       session of its previous connection: the fraction of those offers
       that resume, for TLS 1.2 and TLS 1.3 separately, for three
       deployments of the three servers:

         - C{sslshare}: three C{twistd -n sslshare} nodes of one cluster,
           each with the other two as peers;
         - C{sharing_off}: the same nodes, same PKI, with no
           C{[cluster.peers]}: each resumes only the sessions it made
           (expect about 1/3);
         - C{nginx}: three nginx instances, each with its own
           C{ssl_session_cache} and C{ssl_session_tickets off} (so that
           only the server-side cache can resume, as with sslshare; with
           tickets on, each instance would have its own ticket key and the
           result would be the same) (expect about 1/3).

       The sslshare nodes proxy to one backend, Python's C{http.server};
       nginx answers C{return 200} itself.  The clients are separate
       processes (this file, role C{_client}): Python's C{ssl}, blocking
       sockets, C{TCP_NODELAY}, one HTTP/1.0 GET per connection read to
       EOF (in TLS 1.3 the session ticket comes after the handshake, with
       the response), and the session of each connection offered on the
       next.  A connection is counted as I{resumable} when it offers a
       session, which is every connection but a client's first, and
       I{resumed} when C{SSLSocket.session_reused}.  The clients run
       concurrently, so HAProxy's rotation spreads each client's
       connections over the three servers.  What is measured is a
       fraction, not a rate: the clients' speed changes the order in which
       connections reach the servers, not whether a session can be found.

This script measures; it never asserts a number.  HAProxy and nginx are
installed with apt-get when missing (as root, or with sudo).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.checkpoint import (  # noqa: E402
    BenchmarkError,
    environment,
    log_tail,
    wait_for_port,
)

RESULTS_JSON = os.path.join(ROOT, "benchmarks", "results.json")

NODES = ("node1", "node2", "node3")
CLUSTER = "bench"
VERSIONS = {"tls1.2": ssl.TLSVersion.TLSv1_2, "tls1.3": ssl.TLSVersion.TLSv1_3}
MODES = ("sslshare", "sharing_off", "nginx")
GOAL = 0.999

# Per mode and TLS version: client processes x connections each.  The
# default gives about 4000 resumable connections per cell, so that one
# failure shows against the goal of 99.9%.
QUICK = {"clients": 4, "connections": 30}
FULL = {"clients": 4, "connections": 1000}

# Debian package providing each command.
PACKAGES = {"haproxy": "haproxy", "nginx": "nginx-light"}


# The client (role _client).

def run_client(port: int, ca_certificate: str, version: str,
               connections: int) -> None:
    """
    Make C{connections} sequential connections to C{port}, each offering
    the previous one's session, and print one JSON line of counts.
    """
    context = ssl.create_default_context(cafile=ca_certificate)
    context.minimum_version = context.maximum_version = VERSIONS[version]
    session = None
    counts = {"connections": 0, "resumable": 0, "resumed": 0,
              "errors": 0, "wrong_version": 0, "bad_response": 0}
    for _ in range(connections):
        try:
            with socket.create_connection(("127.0.0.1", port),
                                          timeout=30) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with context.wrap_socket(raw, server_hostname="localhost",
                                         session=session) as tls:
                    tls.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
                    response = b""
                    while chunk := tls.recv(65536):
                        response += chunk
                    counts["connections"] += 1
                    if session is not None:
                        counts["resumable"] += 1
                        counts["resumed"] += tls.session_reused
                    if tls.version() != {"tls1.2": "TLSv1.2",
                                         "tls1.3": "TLSv1.3"}[version]:
                        counts["wrong_version"] += 1
                    if not response.startswith(b"HTTP/1."):
                        counts["bad_response"] += 1
                    # Read after the response: a TLS 1.3 ticket arrives
                    # after the handshake.
                    session = tls.session
        except (OSError, ssl.SSLError) as e:
            # A failed connection offers nothing next time: the next one
            # starts afresh and is not counted as resumable.
            counts["errors"] += 1
            reason = f"{type(e).__name__}: {e}"[:120]
            counts.setdefault("error_reasons", {}).setdefault(reason, 0)
            counts["error_reasons"][reason] += 1
            session = None
    print(json.dumps(counts), flush=True)


# Processes.

class Processes:
    """
    Every long-running process this script starts, so that all of them end
    when it does, on success, error or Ctrl-C.
    """

    def __init__(self) -> None:
        self._running: list[tuple[str, subprocess.Popen, str]] = []

    def start(self, name: str, command: list[str], log: str,
              cwd: str = ROOT) -> subprocess.Popen:
        with open(log, "ab") as output:
            process = subprocess.Popen(
                command, cwd=cwd, env=environment(), stdin=subprocess.DEVNULL,
                stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True)
        self._running.append((name, process, log))
        return process

    def wait_for_port(self, process: subprocess.Popen, port: int,
                      timeout: float = 30.0) -> None:
        name, log = next((n, lg) for n, p, lg in self._running if p is process)
        wait_for_port(name, port, process, log, timeout)

    def exited(self) -> str | None:
        """
        The name of the first process that has ended, or C{None}.
        """
        return next((name for name, process, _ in self._running
                     if process.poll() is not None), None)

    def stop_all(self) -> None:
        for _, process, _ in self._running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process, _ in self._running:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._running.clear()


_handed_out: set[int] = set()


def _free_port() -> int:
    """
    A free port of 127.0.0.1 not handed out before in this run: each
    L{free_port} closes its socket, so two calls can name the same port,
    and a node whose client port is another's cluster port would make the
    balancer send a third of the connections to the wrong listener.
    """
    from sslshare.throwaway import free_port

    while (port := free_port()) in _handed_out:
        pass
    _handed_out.add(port)
    return port


def ensure_command(command: str) -> str:
    """
    The path of C{command}, installing its Debian package with apt-get
    when it is missing.
    """
    found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
    if found:
        return found
    package = PACKAGES[command]
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print(f"installing {package} (for {command}) with apt-get", file=sys.stderr)
    environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for step in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", package]):
        done = subprocess.run(sudo + step, env=environment,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchmarkError(f"{' '.join(step)} failed: {done.stderr[-2000:]}")
    found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
    if not found:
        raise BenchmarkError(f"{command} is missing after installing {package}")
    return found


# The three deployments behind HAProxy.

def start_backend(processes: Processes, directory: str) -> int:
    """
    Python's C{http.server} on a free port, serving a one-file directory;
    the sslshare nodes' backend.
    """
    root = os.path.join(directory, "www")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "index.html"), "w") as f:
        f.write("ok\n")
    port = _free_port()
    process = processes.start(
        "backend", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                    "--directory", root, str(port)],
        os.path.join(directory, "backend.log"))
    processes.wait_for_port(process, port)
    return port


def start_sslshare(processes: Processes, directory: str, backend_port: int,
                   sharing: bool, nodes: tuple[str, ...] = NODES,
                   tables: str = "") -> list[int]:
    """
    C{twistd -n sslshare} nodes from TOML files written into C{directory}
    (whose C{pki/} holds the PKI), each with the others as peers when
    C{sharing}, with none otherwise; their client ports.

    @param tables: more TOML tables for each node's file (C{[tls]}, ...).
    """
    from tests.support import NODE_CONFIG

    mode = "sslshare" if sharing else "sharing_off"
    client_ports = {node: _free_port() for node in nodes}
    amp_ports = {node: _free_port() for node in nodes}
    started = {}
    for node in nodes:
        peers = "\n".join(
            f'{peer} = "tcp:host=127.0.0.1:port={amp_ports[peer]}"'
            for peer in nodes if peer != node and sharing)
        path = os.path.join(directory, f"{mode}-{node}.toml")
        with open(path, "w") as f:
            f.write(NODE_CONFIG.format(
                node=node, cluster=CLUSTER, client_port=client_ports[node],
                backend_port=backend_port, state_dir=f"state/{mode}/{node}",
                node_options="", amp_port=amp_ports[node], peers=peers)
                + tables)
        log = os.path.join(directory, f"{mode}-{node}.log")
        started[node] = processes.start(
            f"{mode} {node}",
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "--logfile", log, "sslshare", "--config", path],
            log + ".stderr")
    for node in nodes:
        processes.wait_for_port(started[node], client_ports[node])
    if sharing:
        _wait_linked(directory, mode, nodes)
    return [client_ports[node] for node in nodes]


def node_stats(directory: str, mode: str, node: str) -> dict[str, Any] | None:
    """
    A node's counters from C{sslshare stats --json}, or C{None} when it
    does not answer.
    """
    done = subprocess.run(
        [sys.executable, "-c", "from sslshare.cli import main; main()",
         "stats", "--config", os.path.join(directory, f"{mode}-{node}.toml"),
         "--json"],
        cwd=ROOT, env=environment(), capture_output=True, text=True,
        timeout=30)
    return json.loads(done.stdout) if done.returncode == 0 else None


def handshake_counters(directory: str, mode: str) -> dict[str, int]:
    """
    The handshake outcomes (C{full}, C{resumed_local}, C{resumed_peer},
    ...) summed over the three nodes: the servers' side of the clients'
    counts.
    """
    total: dict[str, int] = {}
    for node in NODES:
        stats = node_stats(directory, mode, node)
        if stats is None:
            raise BenchmarkError(f"sslshare stats of {mode} {node} failed")
        # The node's own counters, not the engine's (engine.full etc.
        # count the same handshakes again).
        for key in ("full", "resumed_local", "resumed_peer",
                    "resumed_repository", "handshake_timeouts", "failed"):
            total[key] = total.get(key, 0) + stats.get(key, 0)
    return total


def _wait_linked(directory: str, mode: str, nodes: tuple[str, ...],
                 timeout: float = 30.0) -> None:
    """
    Wait until each node has all the others connected as peers, so that the
    first connections do not race the peer links.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((node_stats(directory, mode, node) or {}).get("peers.connected")
               == len(nodes) - 1 for node in nodes):
            return
        time.sleep(0.3)
    raise BenchmarkError(f"the {mode} nodes did not all link up in {timeout} s: "
                         f"{log_tail(os.path.join(directory, f'{mode}-node1.log'))}")


NGINX_CONFIG = """\
{user}
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {certificate};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:S{index}:1m;
        ssl_session_timeout 10m;
        ssl_session_tickets off;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def start_nginx(processes: Processes, directory: str) -> list[int]:
    """
    Three nginx instances, each with its own session cache, serving the
    cluster's localhost certificate; their ports.
    """
    nginx = ensure_command("nginx")
    pki = os.path.join(directory, "pki")
    ports = []
    for index in range(1, len(NODES) + 1):
        prefix = os.path.join(directory, f"nginx{index}")
        os.makedirs(prefix, exist_ok=True)
        port = _free_port()
        configuration = os.path.join(prefix, "nginx.conf")
        with open(configuration, "w") as f:
            f.write(NGINX_CONFIG.format(
                # As root, nginx's workers would run as nobody, who cannot
                # read the temporary directory (mode 0700).
                user="user root;" if os.geteuid() == 0 else "",
                prefix=prefix, port=port, index=index,
                certificate=os.path.join(pki, "localhost-chain.pem"),
                key=os.path.join(pki, "localhost-key.pem")))
        process = processes.start(
            f"nginx{index}", [nginx, "-p", prefix, "-c", configuration],
            os.path.join(prefix, "stderr.log"))
        processes.wait_for_port(process, port)
        ports.append(port)
    return ports


HAPROXY_CONFIG = """\
global
    maxconn 1024
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen balancer
    bind 127.0.0.1:{port}
    balance roundrobin
{servers}
"""


def start_haproxy(processes: Processes, directory: str, name: str,
                  ports: list[int]) -> int:
    """
    HAProxy, C{mode tcp}, round robin over C{ports}; its port.
    """
    haproxy = ensure_command("haproxy")
    port = _free_port()
    configuration = os.path.join(directory, f"haproxy-{name}.cfg")
    with open(configuration, "w") as f:
        f.write(HAPROXY_CONFIG.format(port=port, servers="\n".join(
            f"    server s{i} 127.0.0.1:{server}" for i, server in
            enumerate(ports, 1))))
    process = processes.start(
        f"haproxy ({name})", [haproxy, "-f", configuration, "-db"],
        os.path.join(directory, f"haproxy-{name}.log"))
    processes.wait_for_port(process, port)
    return port


def run_clients(port: int, ca_certificate: str, version: str, clients: int,
                connections: int) -> dict[str, Any]:
    """
    C{clients} client processes at once through C{port}; their counts
    summed.
    """
    started = [subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "_client", str(port),
         ca_certificate, version, str(connections)],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        for _ in range(clients)]
    total: dict[str, Any] = {}
    try:
        for process in started:
            output, _ = process.communicate(timeout=600)
            if process.returncode != 0:
                raise BenchmarkError(f"a client ended with status "
                                     f"{process.returncode}")
            for key, value in json.loads(output).items():
                if key == "error_reasons":
                    reasons = total.setdefault(key, {})
                    for reason, count in value.items():
                        reasons[reason] = reasons.get(reason, 0) + count
                else:
                    total[key] = total.get(key, 0) + value
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
    return total


# Measurement 1.

def cross_node_resumption(directory: str, settings: dict[str, int]
                          ) -> dict[str, Any]:
    """
    Measurement 1 (see the module docstring): per mode and TLS version, the
    fraction of resumable connections resumed, and the raw counts.
    """
    ca_certificate = os.path.join(directory, "pki", "ca.pem")
    starters: dict[str, Callable[[Processes, str], list[int]]] = {
        "sslshare": lambda processes, d: start_sslshare(
            processes, d, start_backend(processes, d), sharing=True),
        "sharing_off": lambda processes, d: start_sslshare(
            processes, d, start_backend(processes, d), sharing=False),
        "nginx": start_nginx,
    }
    fractions: dict[str, dict[str, float | None]] = {}
    counts: dict[str, dict[str, dict[str, Any]]] = {}
    for mode in MODES:
        processes = Processes()
        try:
            servers = starters[mode](processes, directory)
            balancer = start_haproxy(processes, directory, mode, servers)
            fractions[mode], counts[mode] = {}, {}
            for version in VERSIONS:
                before = (handshake_counters(directory, mode)
                          if mode != "nginx" else {})
                total = run_clients(balancer, ca_certificate, version,
                                    settings["clients"], settings["connections"])
                if mode != "nginx":
                    # Per version: the nodes' counters are cumulative.
                    after = handshake_counters(directory, mode)
                    total["server"] = {key: after[key] - before.get(key, 0)
                                       for key in after}
                counts[mode][version] = total
                fractions[mode][version] = (
                    total["resumed"] / total["resumable"]
                    if total["resumable"] else None)
                print(f"  {mode} {version}: {total}", file=sys.stderr)
        finally:
            processes.stop_all()
    return {"fractions": fractions, "counts": counts, "goal": GOAL,
            "settings": dict(settings)}


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
    return facts


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def report(command: str, facts: dict[str, Any], measured: dict[str, Any],
           seconds: float) -> str:
    """
    The Markdown that RESULTS.md would hold for this run.
    """
    resumption = measured["cross_node_resumption"]
    settings = resumption["settings"]
    lines = [
        "## Cross-node resumption (3 servers behind HAProxy round robin)",
        "",
        f"{settings['clients']} concurrent clients x {settings['connections']} "
        f"sequential connections each, per mode and TLS version; a connection "
        f"is resumable when it offers the previous connection's session. "
        f"Goal for sslshare: >= {100 * GOAL:.1f}%.",
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
    lines += ["", "Command:", "", f"    {command}", "",
              f"Run took {seconds:.0f} s. Machine:", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_client"]:
        port, ca_certificate, version, connections = argv[1:5]
        run_client(int(port), ca_certificate, version, int(connections))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer connections: under three minutes")
    parser.add_argument("--keep", action="store_true",
                        help="leave the temporary directory in place")
    options = parser.parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable, ROOT),
                          "benchmarks/run.py"] + argv)

    # SIGTERM ends the run like Ctrl-C: through the finally clauses that
    # stop every process started.
    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)

    from sslshare.pki import init_pki

    started = time.monotonic()
    directory = tempfile.mkdtemp(prefix="sslshare-bench-")
    try:
        init_pki(os.path.join(directory, "pki"), CLUSTER, NODES)
        ensure_command("haproxy")
        ensure_command("nginx")
        facts = machine()
        measured = {"cross_node_resumption": cross_node_resumption(
            directory, QUICK if options.quick else FULL)}
    finally:
        if options.keep:
            print(f"kept {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    seconds = time.monotonic() - started
    results = {
        "command": command,
        "machine": facts,
        "seconds": round(seconds, 1),
        "cross_node_resumption": measured["cross_node_resumption"]["fractions"],
        "cross_node_resumption_detail": measured["cross_node_resumption"],
    }
    with open(RESULTS_JSON, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(report(command, facts, measured, seconds))
    print(f"\nwrote {os.path.relpath(RESULTS_JSON, ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; every process this run started was stopped")
