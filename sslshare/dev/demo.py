"""
C{sslshare demo}: a 3-node cluster on 127.0.0.1 resuming sessions across
nodes, with stock clients.

What it does, in order: make the demo PKI if it is missing; start a small
HTTP backend in this process; write the demo's node files (the examples
installed with sslshare, L{sslshare.examples}) into C{<directory>/conf},
unless C{--conf} names others; start the nodes of C{node1.toml} to
C{node3.toml} as three real C{twistd sslshare} processes; let clients
(Python's C{ssl}, half TLS 1.2 and half TLS 1.3) connect round-robin
across the nodes, each offering the session of its previous connection;
ask each node for its counters over the cluster channel, and read the
handshake counters of its metrics page (C{metrics_listen}) too; print them;
stop the nodes.  Every connection after a client's first is resumable, and is
resumed only if the node it reaches recovers the session from the node that
made it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import sys
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web import resource, server
from twisted.web.client import Agent, readBody

from sslshare import config, examples, metrics
from sslshare.dev import pki, throwaway
from sslshare.service import configured_listeners, listen_problem
from sslshare.tools import CommandError, ask_stats, client_endpoint_for, run_in_reactor

NODES = ("node1", "node2", "node3")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
OUTCOMES = metrics.HANDSHAKE_OUTCOMES


class _Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"hello from the sslshare demo backend\n"


class _NodeProcess(ProcessProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.ended: Deferred[None] = Deferred()
        self.output: list[bytes] = []

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


@attrs.frozen
class Visit:
    node: str
    version: str
    resumed: bool
    ok: bool


def _twistd() -> list[str]:
    beside = shutil.which("twistd", path=os.path.dirname(sys.executable))
    if beside:
        return [beside]
    return [sys.executable, "-c",
            "from twisted.scripts.twistd import run; run()"]


def _listen_port(node_config: config.NodeConfig) -> int:
    return int(client_endpoint_for(node_config.listen[0]).rsplit("=", 1)[1])


def metrics_url(node_config: config.NodeConfig,
                page: str = metrics.METRICS_PAGE) -> str | None:
    """
    The URL of a page of the node's metrics listener (the Prometheus page
    by default), if it serves them.
    """
    if node_config.metrics_listen is None:
        return None
    fields = dict(part.split("=", 1) for part in client_endpoint_for(
        node_config.metrics_listen).split(":")[1:])
    return f"http://{fields['host']}:{fields['port']}/{page}"


def _curl_lines(node_config: config.NodeConfig) -> list[str]:
    """
    The commands that ask a running node for its metrics and readiness.
    """
    return [f"curl {url}" for page in (metrics.METRICS_PAGE,
                                       metrics.READINESS_PAGE)
            if (url := metrics_url(node_config, page)) is not None]


def _lines_in(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


async def _scraped_handshakes(reactor: Any, url: str) -> dict[str, int]:
    """
    The handshakes by outcome that the metrics page at C{url} shows.
    """
    from prometheus_client.parser import text_string_to_metric_families

    response = await Agent(reactor).request(b"GET", url.encode("ascii"))
    page = (await readBody(response)).decode("utf-8")
    return {sample.labels["outcome"]: int(sample.value)
            for family in text_string_to_metric_families(page)
            for sample in family.samples
            if sample.name == "sslshare_handshakes_total"}


def _backend_listen(node_config: config.NodeConfig) -> str:
    fields = dict(part.split("=", 1) for part in
                  node_config.backend.split(":")[1:] if "=" in part)
    return f"tcp:{fields['port']}:interface={fields.get('host', '127.0.0.1')}"


@attrs.frozen
class Fetched:
    """
    One HTTP/1.0 GET over TLS, as its client saw it.
    """

    version: str
    reused: bool
    answer: bytes
    session: ssl.SSLSession | None


def get_over_tls(context: ssl.SSLContext, port: int,
                 session: ssl.SSLSession | None, timeout: float = 10) -> Fetched:
    """
    Connect to C{port} of 127.0.0.1 offering C{session}, send one GET and
    read the answer until the server closes.  The session is read after
    the answer: a TLS 1.3 ticket comes after the handshake.  Blocking.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname="localhost",
                                 session=session) as tls:
            tls.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
            return Fetched(tls.version() or "", bool(tls.session_reused),
                           answer, tls.session)


def _client(ca: str, version: str, ports: Sequence[tuple[str, int]],
            rounds: int, first: int) -> list[Visit]:
    """
    One client: C{rounds} connections round-robin over C{ports}, each
    offering the session of the one before.  Blocking: runs in a thread.
    """
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = context.maximum_version = getattr(
        ssl.TLSVersion, version.replace(".", "_"))
    session = None
    visits = []
    for index in range(rounds):
        node, port = ports[(first + index) % len(ports)]
        try:
            fetched = get_over_tls(context, port, session)
        except (OSError, ssl.SSLError):
            visits.append(Visit(node, version, False, False))
            continue
        visits.append(Visit(node, version, fetched.reused,
                            fetched.answer.startswith(b"HTTP/1.")))
        session = fetched.session
    return visits


async def _wait_listening(reactor: Any, port: int,
                          process: _NodeProcess) -> None:
    deadline = reactor.seconds() + START_TIMEOUT
    while reactor.seconds() < deadline:
        if process.ended.called:
            raise CommandError(
                f"{process.name} stopped at start:\n"
                + b"".join(process.output).decode("utf-8", "replace"))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            await deferLater(reactor, 0.2, lambda: None)
    raise CommandError(f"{process.name} did not listen on port {port} "
                           f"within {START_TIMEOUT:.0f} s")


async def _wait_linked(reactor: Any, asking: config.NodeConfig) -> None:
    """
    Wait until every node has its links to both peers up: until then a
    node cannot ask the others, and the demo would show full handshakes
    that say nothing about sharing.
    """
    deadline = reactor.seconds() + START_TIMEOUT
    waiting = list(NODES)
    while waiting and reactor.seconds() < deadline:
        try:
            counters = await ask_stats(reactor, asking, waiting[0])
        except Exception:
            counters = {}
        if counters.get("peers.connected") == len(NODES) - 1:
            waiting.pop(0)
        else:
            await deferLater(reactor, 0.2, lambda: None)
    if waiting:
        raise CommandError(f"{waiting[0]} did not link to its peers "
                               f"within {START_TIMEOUT:.0f} s")


async def _stop(reactor: Any, processes: list[tuple[Any, _NodeProcess]]) -> None:
    for transport, process in processes:
        if not process.ended.called:
            transport.signalProcess(signal.SIGTERM)
    stopping = DeferredList([process.ended for _, process in processes])
    stopping.addTimeout(STOP_TIMEOUT, reactor)
    try:
        await stopping
    except Exception:
        for transport, process in processes:
            if not process.ended.called:
                transport.signalProcess(signal.SIGKILL)


def _repository_section(kind: str, directory: str,
                        servers: list[Any]) -> str:
    """
    The C{[repository]} section of the demo's nodes for C{kind}, starting
    the server it needs (appended to C{servers}, to be removed at the end).
    """
    if kind == "sqlite":
        path = os.path.join(os.path.abspath(directory), "sessions.sqlite3")
        return f'kind = "sqlite"\npath = "{path}"\n'
    server = (throwaway.RedisServer() if kind == "redis"
              else throwaway.PostgresServer())
    servers.append(server)
    server.start()
    if isinstance(server, throwaway.RedisServer):
        return f'kind = "redis"\nurl = "{server.url}"\n'
    return f'kind = "postgres"\ndsn = "{server.dsn()}"\n'


def _node_files(directory: str, source: str | None,
                repository: str | None) -> str:
    """
    The directory of the demo's node files: C{source} as it is, or
    C{<directory>/conf} written from the installed examples (their relative
    paths name C{<directory>/pki} and C{<directory>/state}), or from
    C{source}, with C{repository} as their C{[repository]} section.
    """
    if source is not None and repository is None:
        return source
    target = os.path.join(directory, "conf")
    os.makedirs(target, exist_ok=True)
    for node in NODES:
        if source is None:
            text = examples.text(f"{node}.toml")
        else:
            with open(os.path.join(source, f"{node}.toml"),
                      encoding="utf-8") as f:
                text = f.read()
        if repository is not None:
            text += '\n[repository]\ntopology = "repository"\n' + repository
        with open(os.path.join(target, f"{node}.toml"), "w",
                  encoding="utf-8") as f:
            f.write(text)
    return target


async def demo(reactor: Any, arguments: Any) -> dict[str, Any]:
    configs = {}
    pki_directory = os.path.join(arguments.directory, "pki")
    if not os.path.exists(os.path.join(pki_directory, "ca.pem")):
        pki.init_pki(pki_directory, "demo", NODES)
    os.makedirs(arguments.directory, exist_ok=True)
    servers: list[Any] = []
    try:
        conf = _node_files(
            arguments.directory, arguments.conf,
            None if arguments.repository is None else
            _repository_section(arguments.repository, arguments.directory,
                                servers))
        for node in NODES:
            configs[node] = config.load(
                os.path.join(conf, f"{node}.toml"), reactor)
        return await _run_cluster(reactor, arguments, configs)
    finally:
        for repository_server in servers:
            repository_server.remove()


async def _listen(reactor: Any, path: str, key: str, endpoint: str,
                  factory: Any) -> Any:
    try:
        return await serverFromString(reactor, endpoint).listen(factory)
    except CannotListenError as e:
        raise CommandError(listen_problem(path, key, endpoint, e)) from None


async def _check_free(reactor: Any,
                      configs: dict[str, config.NodeConfig]) -> None:
    """
    Fail, naming the file, key and port, when a port of a node is taken:
    a client could reach whatever holds it instead of the node.
    """
    for node_config in configs.values():
        for key, endpoint in configured_listeners(node_config):
            port = await _listen(reactor, node_config.path, key, endpoint,
                                 Factory())
            await port.stopListening()


async def _run_cluster(reactor: Any, arguments: Any,
                       configs: dict[str, config.NodeConfig]) -> dict[str, Any]:
    await _check_free(reactor, configs)
    backend = await _listen(reactor, configs["node1"].path, "node.backend",
                            _backend_listen(configs["node1"]),
                            server.Site(_Hello()))
    processes = []
    # The files are appended to, run after run: this run's lines follow
    # these.
    logged_before = {node: _lines_in(path) for node in NODES
                     if (path := configs[node].access_log) is not None
                     and path != config.ACCESS_LOG_TO_NODE_LOG}
    try:
        for node in NODES:
            process = _NodeProcess(node)
            transport = reactor.spawnProcess(
                process, _twistd()[0],
                [*_twistd(), "-n", "--pidfile=", "--logfile",
                 os.path.join(arguments.directory, f"{node}.log"),
                 "sslshare", "--config", configs[node].path],
                env=os.environ)
            processes.append((transport, process))
        ports = [(node, _listen_port(configs[node])) for node in NODES]
        for (node, port), (_, process) in zip(ports, processes):
            await _wait_listening(reactor, port, process)
        await _wait_linked(reactor, configs["node1"])
        urls = {node: url for node in NODES
                if (url := metrics_url(configs[node])) is not None}
        if not arguments.json:
            for node in NODES:
                for line in _curl_lines(configs[node]):
                    print(f"{node}, while the demo runs: {line}", flush=True)
        ca = configs["node1"].cluster.ca
        clients = [
            deferToThread(_client, ca, "TLSv1.2" if index % 2 == 0 else "TLSv1.3",
                          ports, arguments.rounds, index)
            for index in range(arguments.clients)
        ]
        visits = [visit for result in await DeferredList(
            clients, fireOnOneErrback=True, consumeErrors=True)
            for visit in result[1]]
        counters = {}
        for node in NODES:
            counters[node] = await ask_stats(reactor, configs["node1"], node)
        scraped = {node: await _scraped_handshakes(reactor, url)
                   for node, url in urls.items()}
    finally:
        await _stop(reactor, processes)
        await backend.stopListening()
    report = _report(visits, counters, scraped, arguments.clients)
    report["configs"] = configs
    report["access_logs"] = {
        node: {"path": configs[node].access_log,
               "lines": _lines_in(str(configs[node].access_log)) - before}
        for node, before in logged_before.items()}
    return report


def _report(visits: list[Visit], counters: dict[str, dict[str, Any]],
            scraped: dict[str, dict[str, int]],
            clients: int) -> dict[str, Any]:
    per_node = {node: {outcome: int(counters[node].get(outcome, 0))
                       for outcome in OUTCOMES} for node in NODES}
    totals = {outcome: sum(row[outcome] for row in per_node.values())
              for outcome in OUTCOMES}
    # The same outcomes as the metrics pages show them: what a Prometheus
    # server scraping the nodes would have seen.
    from_metrics = {outcome: sum(row.get(outcome, 0)
                                 for row in scraped.values())
                    for outcome in OUTCOMES}
    resumable = len(visits) - clients
    resumed = sum(visit.resumed for visit in visits)
    return {
        "connections": len(visits),
        **totals,
        "client_failures": sum(not visit.ok for visit in visits),
        "resumable": resumable,
        "resumed": resumed,
        "per_node": per_node,
        "metrics_pages": len(scraped),
        "from_metrics": from_metrics,
    }


def run(arguments: Any) -> None:
    report = run_in_reactor(lambda reactor: demo(reactor, arguments))
    if arguments.json:
        print(json.dumps({key: report[key] for key in (
            "connections", "full", "resumed_local", "resumed_peer",
            "resumed_repository", "failed", "from_metrics", "access_logs")}))
        return
    print(f"{'node':<8}" + "".join(f"{name:>20}" for name in OUTCOMES))
    for node, row in report["per_node"].items():
        print(f"{node:<8}" + "".join(f"{row[name]:>20}" for name in OUTCOMES))
    print(f"{'total':<8}" + "".join(f"{report[name]:>20}" for name in OUTCOMES))
    share = report["resumed"] / report["resumable"] if report["resumable"] else 0
    print(f"\n{report['connections']} connections by {arguments.clients} "
          f"clients; {report['resumed']} of {report['resumable']} resumable "
          f"connections resumed ({share:.1%}), "
          f"{report['client_failures']} failed on the client side")
    if report["metrics_pages"]:
        counted = report["from_metrics"]
        resumed = sum(count for name, count in counted.items()
                      if name.startswith("resumed"))
        print(f"per the nodes' metrics pages: {counted['full']} full, "
              f"{resumed} resumed, {counted['failed']} failed handshakes")
    if report["access_logs"]:
        print("\nthe access logs, one JSON line per connection "
              "(README.rst, \"Access log\"):")
        for node, log in report["access_logs"].items():
            print(f"  {node}: {os.path.relpath(log['path'])} "
                  f"({log['lines']} lines this run)")
    probes = {node: _curl_lines(node_config)
              for node, node_config in report["configs"].items()}
    if any(probes.values()):
        print("\nthe nodes have stopped; to run one and ask it:")
        for node, lines in probes.items():
            if lines:
                print(f"  {shlex.join(_twistd())} -n sslshare --config "
                      f"{os.path.relpath(report['configs'][node].path)}")
                for line in lines:
                    print(f"    {line}")
