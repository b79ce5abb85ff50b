"""
The servers a benchmark run stands up on 127.0.0.1, as separate processes:
sslshare nodes (C{twistd -n sslshare}), nginx, HAProxy and a plain HTTP
backend, each on free ports, with its configuration and log in the run's
temporary directory.  L{Processes} ends every one of them when the run
ends, on success, error or Ctrl-C.

HAProxy and nginx are installed with apt-get when missing (as root, or with
sudo).  This module starts and stops servers; it measures nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import attrs

from benchmarks.checkpoint import (
    ROOT,
    BenchmarkError,
    cpu_seconds,
    environment,
    log_tail,
    twistd_command,
    wait_for_port,
)

CLUSTER = "bench"
# The certificate chain and key NODE_CONFIG serves, relative to its file.
DEFAULT_SERVER = ("pki/localhost-chain.pem", "pki/localhost-key.pem")

# Debian package providing each command.
PACKAGES = {"haproxy": "haproxy", "nginx": "nginx"}


class Processes:
    """
    Every long-running process a run starts, so that all of them end when
    it does.
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


def stop_on_sigterm() -> None:
    """
    Make SIGTERM end a run like Ctrl-C: through the C{finally} clauses
    that stop every process it started.
    """
    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)


def tree_cpu_seconds(pid: int) -> float:
    """
    The CPU seconds of process C{pid} and of its living descendants (an
    nginx master and its worker).
    """
    total = cpu_seconds(pid)
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = [int(child) for child in f.read().split()]
        except OSError:
            continue
        for child in children:
            try:
                total += tree_cpu_seconds(child)
            except OSError:
                pass
    return total


_handed_out: set[int] = set()


def free_port() -> int:
    """
    A free port of 127.0.0.1 not handed out before in this run: each
    L{sslshare.dev.throwaway.free_port} closes its socket, so two calls can
    name the same port, and a node whose client port is another's cluster
    port would make a balancer send connections to the wrong listener.
    """
    from sslshare.dev.throwaway import free_port as any_free_port

    while (port := any_free_port()) in _handed_out:
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
    install_package(PACKAGES[command])
    found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
    if not found:
        raise BenchmarkError(f"{command} is missing after installing "
                             f"{PACKAGES[command]}")
    return found


def install_package(package: str) -> None:
    """
    Install the Debian package C{package} with apt-get.
    """
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print(f"installing {package} with apt-get", file=sys.stderr)
    apt_environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for step in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", package]):
        done = subprocess.run(sudo + step, env=apt_environment,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchmarkError(f"{' '.join(step)} failed: {done.stderr[-2000:]}")


def start_backend(processes: Processes, directory: str) -> int:
    """
    Python's C{http.server} on a free port, serving a one-file directory;
    its port.
    """
    root = os.path.join(directory, "www")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "index.html"), "w") as f:
        f.write("ok\n")
    port = free_port()
    process = processes.start(
        "backend", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                    "--directory", root, str(port)],
        os.path.join(directory, "backend.log"))
    processes.wait_for_port(process, port)
    return port


@attrs.frozen
class Node:
    """
    One running C{twistd -n sslshare} node.
    """

    name: str
    port: int
    config: str
    process: subprocess.Popen


CHANNELS = ("tcp", "unix")
"""What the cluster channel of L{start_sslshare}'s nodes may run on."""


def start_sslshare(processes: Processes, directory: str, deployment: str,
                   backend_port: int, nodes: tuple[str, ...], peers: bool,
                   repository: str = "", node_options: str = "",
                   tables: str = "",
                   server: tuple[str, str] | None = None,
                   profile: str | None = None,
                   channel: str = "tcp") -> list[Node]:
    """
    C{twistd -n sslshare} nodes from TOML files written into C{directory}
    (whose C{pki/} holds the PKI, from L{sslshare.dev.pki.init_pki}), named
    C{deployment}-C{node}: each with all the others as peers when C{peers},
    with none otherwise; C{repository} is the body of a C{[repository]}
    table, or empty for none; C{node_options} are more lines of the
    C{[node]} table, C{tables} more TOML tables (C{[tls]}, ...); C{server}
    the certificate chain and key the nodes serve, when not the PKI's
    localhost pair; C{profile} a directory where each node leaves its
    cProfile statistics, C{<deployment>-<node>.pstats}, when it stops;
    C{channel} what the cluster channel runs on: C{"tcp"} on 127.0.0.1,
    or C{"unix"} sockets in C{directory} (as the nodes of one host could).
    """
    from tests.support.cluster import NODE_CONFIG

    client_ports = {node: free_port() for node in nodes}
    amp_ports = {node: free_port() for node in nodes}
    started = []
    if channel not in CHANNELS:
        raise BenchmarkError(f"channel {channel!r} is not one of {CHANNELS}")
    sockets = {node: os.path.join(directory, f"{deployment}-{node}.amp")
               for node in nodes}
    for node in nodes:
        peer_lines = "\n".join(
            f'{peer} = "tcp:host=127.0.0.1:port={amp_ports[peer]}"'
            if channel == "tcp" else f'{peer} = "unix:path={sockets[peer]}"'
            for peer in nodes if peer != node and peers)
        path = os.path.join(directory, f"{deployment}-{node}.toml")
        configuration = NODE_CONFIG.format(
            node=node, cluster=CLUSTER, client_port=client_ports[node],
            backend_port=backend_port,
            state_dir=f"state/{deployment}/{node}",
            node_options=node_options, amp_port=amp_ports[node],
            peers=peer_lines)
        if channel == "unix":
            tcp_listen = f'listen = "tcp:{amp_ports[node]}:interface=127.0.0.1"'
            if tcp_listen not in configuration:
                raise BenchmarkError("NODE_CONFIG no longer has the cluster "
                                     "listen line this replaces")
            configuration = configuration.replace(
                tcp_listen, f'listen = "unix:{sockets[node]}"')
        with open(path, "w") as f:
            f.write(_serving(configuration, server) + tables)
            if repository:
                f.write(f"\n[repository]\n{repository}\n")
        log = os.path.join(directory, f"{deployment}-{node}.log")
        statistics = (None if profile is None else
                      os.path.join(profile, f"{deployment}-{node}.pstats"))
        process = processes.start(f"{deployment} {node}",
                                  twistd_command(log, path, statistics),
                                  log + ".stderr")
        started.append(Node(node, client_ports[node], path, process))
    for node in started:
        processes.wait_for_port(node.process, node.port)
    if peers and len(nodes) > 1:
        _wait_linked(started)
    return started


def _serving(configuration: str, server: tuple[str, str] | None) -> str:
    """
    C{configuration} (a formatted C{NODE_CONFIG}) serving the chain and key
    C{server} instead of the PKI's localhost pair.
    """
    if server is None:
        return configuration
    for default, path in zip(DEFAULT_SERVER, server):
        if f'"{default}"' not in configuration:
            raise BenchmarkError(f"NODE_CONFIG no longer names {default}")
        configuration = configuration.replace(f'"{default}"', f'"{path}"')
    return configuration


def write_rsa_server(directory: str) -> tuple[str, str]:
    """
    An RSA-2048 certificate for localhost from the CA in C{directory}/pki,
    written beside the PKI's own (P-256) pair; its chain and key.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from sslshare.dev.pki import issue_certificate

    pki = os.path.join(directory, "pki")
    with open(os.path.join(pki, "ca.pem"), "rb") as f:
        ca_pem = f.read()
    with open(os.path.join(pki, "ca-key.pem"), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    certificate = issue_certificate(
        x509.load_pem_x509_certificate(ca_pem), ca_key, key, "localhost",
        [x509.DNSName("localhost")], [ExtendedKeyUsageOID.SERVER_AUTH])
    chain = os.path.join(pki, "localhost-rsa-chain.pem")
    key_path = os.path.join(pki, "localhost-rsa-key.pem")
    with open(chain, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM) + ca_pem)
    with open(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
              "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return chain, key_path


def node_stats(node: Node) -> dict[str, Any] | None:
    """
    A node's counters from C{sslshare stats --json}, or C{None} when it
    does not answer.
    """
    done = subprocess.run(
        [sys.executable, "-c", "from sslshare.cli import main; main()",
         "stats", "--config", node.config, "--json"],
        cwd=ROOT, env=environment(), capture_output=True, text=True,
        timeout=30)
    return json.loads(done.stdout) if done.returncode == 0 else None


HANDSHAKE_COUNTERS = ("full", "resumed_local", "resumed_peer",
                      "resumed_repository", "handshake_timeouts", "failed")
# What a node counts of the commands its peers sent it: the cluster's
# messages, each counted once, where it arrived.
COMMAND_COUNTER = "cluster.commands:"
ITEM_COUNTER = "cluster.items:"
# sslshare stats' lookup.<source>.count and lookup.<source>.seconds.
LOOKUP_COUNTER = "lookup."


def handshake_counters(nodes: list[Node]) -> dict[str, float]:
    """
    The handshake outcomes (L{HANDSHAKE_COUNTERS}) summed over C{nodes}:
    the servers' side of the clients' counts; as C{commands:Name}, the
    cluster commands the nodes received (as C{items:Name}, the items of
    the Deliver commands among them); and as C{lookup:<source>.count} and
    C{lookup:<source>.seconds}, their session lookups by where each ended
    and the seconds those took.
    """
    total = dict.fromkeys(HANDSHAKE_COUNTERS, 0)
    for node in nodes:
        stats = node_stats(node)
        if stats is None:
            raise BenchmarkError(f"sslshare stats of {node.config} failed")
        # The node's own counters, not the engine's (engine.full etc.
        # count the same handshakes again).
        for key in HANDSHAKE_COUNTERS:
            total[key] += stats.get(key, 0)
        for key, value in stats.items():
            for counter, label in ((COMMAND_COUNTER, "commands:"),
                                   (ITEM_COUNTER, "items:"),
                                   (LOOKUP_COUNTER, "lookup:")):
                if key.startswith(counter):
                    name = label + key[len(counter):]
                    total[name] = total.get(name, 0) + value
    return total


def _wait_linked(nodes: list[Node], timeout: float = 30.0) -> None:
    """
    Wait until each node has all its peers connected, so that the first
    connections do not race the peer links.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((node_stats(node) or {}).get("peers.connected")
               == len(nodes) - 1 for node in nodes):
            return
        time.sleep(0.3)
    raise BenchmarkError(f"the nodes did not all link up in {timeout} s: "
                         f"{log_tail(nodes[0].config[:-len('.toml')] + '.log')}")


NGINX_CONFIG = """\
{user}
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port}{tls};
        server_name localhost;
{tls_settings}        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""

NGINX_TLS_SETTINGS = """\
        ssl_certificate {certificate};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:{name}:1m;
        ssl_session_timeout 10m;
        ssl_session_tickets off;
"""


def start_nginx(processes: Processes, directory: str, name: str,
                tls: bool = True) -> tuple[int, subprocess.Popen]:
    """
    One nginx, one worker, answering C{200 ok} itself: over TLS with the
    PKI's localhost certificate and its own session cache (tickets off, so
    that only the server-side cache resumes, as with sslshare), or over
    plain HTTP; its port and process.
    """
    nginx = ensure_command("nginx")
    pki = os.path.join(directory, "pki")
    prefix = os.path.join(directory, name)
    os.makedirs(prefix, exist_ok=True)
    port = free_port()
    configuration = os.path.join(prefix, "nginx.conf")
    with open(configuration, "w") as f:
        f.write(NGINX_CONFIG.format(
            # As root, nginx's workers would run as nobody, who cannot read
            # the temporary directory (mode 0700).
            user="user root;" if os.geteuid() == 0 else "",
            prefix=prefix, port=port, tls=" ssl" if tls else "",
            tls_settings=NGINX_TLS_SETTINGS.format(
                name=name, certificate=os.path.join(pki, "localhost-chain.pem"),
                key=os.path.join(pki, "localhost-key.pem")) if tls else ""))
    process = processes.start(
        name, [nginx, "-p", prefix, "-c", configuration],
        os.path.join(prefix, "stderr.log"))
    processes.wait_for_port(process, port)
    return port, process


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
    port = free_port()
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


HAPROXY_TLS_CONFIG = """\
global
    maxconn 1024
    nbthread 1
    tune.ssl.default-dh-param 2048
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen tls
    bind 127.0.0.1:{port} ssl crt {pem} ssl-min-ver TLSv1.2 no-tls-tickets
    server backend 127.0.0.1:{backend_port}
"""


def start_haproxy_tls(processes: Processes, directory: str, name: str,
                      backend_port: int, certificate: str, key: str
                      ) -> tuple[int, subprocess.Popen]:
    """
    HAProxy, one thread, C{mode tcp}, terminating TLS with C{certificate}
    (a chain) and C{key}, its session cache on and tickets off (so that,
    as with sslshare, the server's cache resumes), passing the plaintext to
    C{backend_port}; its port and process.
    """
    haproxy = ensure_command("haproxy")
    port = free_port()
    prefix = os.path.join(directory, name)
    os.makedirs(prefix, exist_ok=True)
    pem = os.path.join(prefix, "crt.pem")
    with open(pem, "w") as f:
        for path in (certificate, key):
            with open(path) as part:
                f.write(part.read())
    configuration = os.path.join(prefix, "haproxy.cfg")
    with open(configuration, "w") as f:
        f.write(HAPROXY_TLS_CONFIG.format(port=port, pem=pem,
                                          backend_port=backend_port))
    process = processes.start(
        name, [haproxy, "-f", configuration, "-db"],
        os.path.join(prefix, "haproxy.log"))
    processes.wait_for_port(process, port)
    return port, process


def start_python_tls(processes: Processes, directory: str, name: str,
                     backend_port: int, certificate: str, key: str,
                     module: str = "benchmarks.twisted_tls"
                     ) -> tuple[int, subprocess.Popen]:
    """
    A reference proxy written in Python, C{python -m module PORT
    BACKEND_PORT CHAIN KEY}: L{benchmarks.twisted_tls} (stock Twisted's
    TLS and port forwarder) or L{benchmarks.owned_tls} (OpenSSL reading
    and writing the client's socket), terminating TLS with C{certificate}
    (a chain) and C{key}, OpenSSL's session cache on and tickets off,
    passing the plaintext to C{backend_port}; its port and process.
    """
    prefix = os.path.join(directory, name)
    os.makedirs(prefix, exist_ok=True)
    port = free_port()
    process = processes.start(
        name, [sys.executable, "-m", module, str(port), str(backend_port),
               certificate, key],
        os.path.join(prefix, "stderr.log"))
    processes.wait_for_port(process, port)
    return port, process


NGINX_STREAM_CONFIG = """\
{user}
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
load_module {stream_module};
events {{ worker_connections 1024; }}
stream {{
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {certificate};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:{name}:1m;
        ssl_session_timeout 10m;
        ssl_session_tickets off;
        proxy_pass 127.0.0.1:{backend_port};
    }}
}}
"""
# Debian builds nginx's stream module as a module of its own package.
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
NGINX_STREAM_PACKAGE = "libnginx-mod-stream"


def start_nginx_stream(processes: Processes, directory: str, name: str,
                       backend_port: int, certificate: str, key: str
                       ) -> tuple[int, subprocess.Popen]:
    """
    One nginx worker, C{stream} module, terminating TLS with
    C{certificate} and C{key} and its own session cache (tickets off),
    passing the plaintext to C{backend_port}; its port and process.
    """
    nginx = ensure_command("nginx")
    if not os.path.exists(NGINX_STREAM_MODULE):
        install_package(NGINX_STREAM_PACKAGE)
    prefix = os.path.join(directory, name)
    os.makedirs(prefix, exist_ok=True)
    port = free_port()
    configuration = os.path.join(prefix, "nginx.conf")
    with open(configuration, "w") as f:
        f.write(NGINX_STREAM_CONFIG.format(
            user="user root;" if os.geteuid() == 0 else "",
            prefix=prefix, port=port, name=name, certificate=certificate,
            key=key, backend_port=backend_port,
            stream_module=NGINX_STREAM_MODULE))
    process = processes.start(
        name, [nginx, "-p", prefix, "-c", configuration],
        os.path.join(prefix, "stderr.log"))
    processes.wait_for_port(process, port)
    return port, process
