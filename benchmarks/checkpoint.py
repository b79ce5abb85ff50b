"""
What checkpointing every record costs a node: bulk proxy throughput (MB/s
through a node to a local backend) and the node's CPU time per MB, with
C{checkpoint = "every-record"} against C{checkpoint = "off"}, for small
(1 KiB) and full (16 KiB) TLS records, measured in one run.

Usage, from the root of a checkout::

    .venv/bin/python benchmarks/checkpoint.py [--quick] [--json]
        [--breakdown] [--profile DIR] [--keep]

The default run takes two to three minutes, C{--quick} under a minute;
C{--json} prints one JSON object instead of the table.  C{--profile DIR}
runs each cluster's node1 under twistd's cProfile and leaves
C{<mode>.pstats} in DIR (profiling slows the nodes:
its figures are not comparable with an unprofiled run).  C{--breakdown}
adds a third cluster, C{checkpoint = "interval"} (the node steps the
running digest for every record and enqueues each checkpoint, but writes
one a second), to the same rounds: its cost over C{off} is the digest's,
and C{every-record}'s over it is the writes' (about a third longer run).
C{--keep} leaves
the temporary directory (configurations, PKI, node logs) in place.

What runs
=========

Every part is its own process on 127.0.0.1, as in a deployment:

    - two clusters of two nodes each, real C{twistd -n sslshare} processes
      from TOML files this script writes in a temporary directory (its own
      small template: C{tests.support.cluster.LocalCluster}'s has no
      checkpoint key), sharing one PKI made by L{sslshare.dev.pki.init_pki}.
      Cluster C{every-record} checkpoints every record, cluster C{off} none;
      everything else is the same.  With two nodes, each session's backup
      node is the other one, so node1's checkpoints leave the process: an
      item of an AMP C{Deliver} command over mutual TLS to node2 (which
      keeps it in its store; the items node1 has for node2 within one
      window share a command), one in flight per connection, newer ones
      coalesced meanwhile, as L{sslshare.digest.CheckpointPipeline} does;
    - the backend both clusters proxy to: a B{sink} (this file, role
      C{_sink}; stdlib C{socketserver}, a thread per connection) that
      reads a 16-byte header naming a byte count, answers C{R}, discards
      that many bytes, and answers C{D} and the count it got;
    - the client (this file, role C{_client}): Python's C{ssl} over a
      blocking socket, driven by this script through its stdin.  For each
      transfer it connects to node1 of one cluster, completes the
      handshake (whatever the node and Python agree on: TLS 1.3 here),
      sends the header and waits for C{R} (so that the node has connected
      to the backend), tells this script it is ready, and on C{go} sends
      the bytes with one C{sendall} of exactly 1 KiB or 16 KiB each: one
      TLS record each (OpenSSL writes a record of at most 16 KiB per
      C{SSL_write}).  The records go one way, client to backend: the node
      decrypts each, its record observer steps the running digest and
      hands the checkpoint to the pipeline, and the plaintext goes on to
      the sink.

What is timed
=============

    - B{MB/s}: bytes (MB = 10^6 bytes) / wall time on the client from
      just before its first data C{send} to its receipt of the sink's
      C{D}, which the sink sends once it has every byte.  The handshake,
      the header and the backend connection are outside it.
    - B{node CPU s/MB}: utime + stime of node1's process (from
      C{/proc/<pid>/stat}, in clock ticks of 10 ms) read by this script
      just before C{go} and just after the client's result, divided by the
      MB.  The same for node2 (the backup node, receiving the
      checkpoints) is reported beside it.  On a shared 2-core machine CPU
      per MB is steadier than MB/s: the client, the sink and node2 compete
      with node1 for the cores.
    - B{others CPU s/MB}: the same for the client and the sink processes
      together, and B{machine busy}: the share of all cores' time that
      was not idle over the transfer (C{/proc/stat}), which says whether
      the machine as a whole, rather than node1 alone, bounds the
      throughput.

How the numbers come out
========================

Calibration first, which also warms the nodes up: one transfer per record
size on each cluster, from which the byte count of that size's transfers is
chosen so that one takes about a second (two in the default run) on the
slower cluster.  Then N rounds; in each round, for each record size, one
transfer through each cluster, each cluster going first in turn from round
to round and size to size, so that drifts in the machine's load hit all
alike.  Each transfer is a new connection (and a new session).  Per record
size:

    - MB/s and CPU s/MB of a mode: median over rounds;
    - throughput ratio = median over rounds of (MB/s every-record / MB/s
      off), both from the same round; the goal is >= 0.9 for 16 KiB
      records;
    - CPU ratio = median over rounds of (CPU s/MB every-record / CPU s/MB
      off): what checkpointing adds to the node's work per byte; its
      inverse is the throughput ratio a CPU-bound node would see.

After the rounds, C{sslshare stats --json} asks each node for its counters:
node1's C{checkpoint.written}, C{coalesced}, C{failed}, C{rejected} and
C{pauses} on the C{every-record} cluster show the checkpoints really went
to node2 (C{cluster.commands:Checkpoint} on node2), and the same counters
stay at zero on the C{off} cluster.  Beside them, the records the client
and the sink sent through node1 (data, header and the sink's two answers
of every transfer): every one of them is checkpointed, either written or
coalesced into a newer write, so C{written + coalesced} should match that
count, give or take the last write of a connection still on its way when
the counters are read.  This script times; it never asserts a timing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import select
import shlex
import shutil
import signal
import socket
import socketserver
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES = {"1KiB": 1024, "16KiB": 16384}
MODES = ("every-record", "off")
# --breakdown: the running digest of every record, one write a second.
BREAKDOWN_MODE = "interval"
NODES = ("node1", "node2")
CLUSTER = "bench"
GOAL = 0.9
MB = 1e6

# The sink's protocol: the client's header is MAGIC, the byte count (u64)
# and 4 bytes of padding; the sink answers READY, then DONE and the count
# it received (u64).
MAGIC = b"CKPT"
HEADER = struct.Struct("!4sQ4x")
READY = b"R"
DONE = struct.Struct("!cQ")

# First guess of a transfer's size per record size, for calibration.
CALIBRATION_BYTES = {1024: 4 * 2 ** 20, 16384: 16 * 2 ** 20}
MAX_TRANSFER = 2 ** 30

COUNTER_NAMES = ("checkpoint.written", "checkpoint.coalesced",
                 "checkpoint.failed", "checkpoint.rejected",
                 "checkpoint.pauses")


def twistd_command(log: str, config: str,
                   profile: str | None = None) -> list[str]:
    """
    The command that runs the node configured in C{config} in the
    foreground, logging to C{log}; with C{profile}, under twistd's cProfile,
    whose statistics it writes to that file when it stops (profiling slows
    the node: its figures are not comparable with an unprofiled run).
    """
    command = [sys.executable, "-c",
               "from twisted.scripts.twistd import run; run()",
               "-n", "--pidfile=", "--logfile", log]
    if profile is not None:
        command += ["--profile", profile, "--profiler", "cprofile",
                    "--savestats"]
    return command + ["sslshare", "--config", config]


class BenchmarkError(Exception):
    """
    A part of the benchmark did not start or misbehaved; the message says
    which and why.
    """


# The sink (role _sink): the backend.

def _read_exactly(connection: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = connection.recv(count - len(data))
        if not chunk:
            raise EOFError(f"the peer closed after {len(data)} of {count} bytes")
        data += chunk
    return data


class _SinkHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        connection = self.request
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            magic, total = HEADER.unpack(_read_exactly(connection, HEADER.size))
        except (EOFError, OSError, struct.error):
            return
        if magic != MAGIC:
            return
        connection.sendall(READY)
        buffer = bytearray(2 ** 20)
        received = 0
        while received < total:
            count = connection.recv_into(buffer)
            if not count:
                break
            received += count
        connection.sendall(DONE.pack(b"D", received))
        # Wait for the client to close.
        while connection.recv_into(buffer):
            pass


class _SinkServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def run_sink() -> None:
    """
    Serve the sink on a free port of 127.0.0.1, printing the port on the
    first line of stdout, until killed.
    """
    with _SinkServer(("127.0.0.1", 0), _SinkHandler) as server:
        print(server.server_address[1], flush=True)
        server.serve_forever()


# The client (role _client): one JSON command a line on stdin, one JSON
# answer a line on stdout.

def _answer(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def run_client(ca_certificate: str) -> None:
    """
    For each C{{"port", "size", "total"}} line: connect, handshake, send
    the header, wait for the sink; answer C{ready}; on the line C{go} send
    C{total} bytes in records of C{size} and answer with the wall time to
    the sink's C{D}; on the line C{close} close the connection.
    """
    context = ssl.create_default_context(cafile=ca_certificate)
    payloads: dict[int, bytes] = {}
    for line in sys.stdin:
        command = json.loads(line)
        size, total = command["size"], command["total"]
        if total % size:
            _answer(error=f"total {total} is not a multiple of {size}")
            continue
        payload = payloads.setdefault(size, os.urandom(size))
        raw = socket.create_connection(("127.0.0.1", command["port"]), timeout=60)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname="localhost") as client:
            client.sendall(HEADER.pack(MAGIC, total))
            if _read_exactly(client, 1) != READY:
                _answer(error="the sink did not answer the header")
                continue
            _answer(ready=True, version=client.version(),
                    cipher=client.cipher()[0])
            if sys.stdin.readline().strip() != "go":
                return
            send = client.sendall
            records = total // size
            started = time.perf_counter()
            for _ in range(records):
                send(payload)
            marker, received = DONE.unpack(_read_exactly(client, DONE.size))
            seconds = time.perf_counter() - started
            _answer(seconds=seconds, received=received, records=records)
            if sys.stdin.readline().strip() != "close":
                return


# The driver.

def cpu_seconds(pids: int | tuple[int, ...]) -> float:
    """
    utime + stime of process C{pids} (or their sum), all their threads, in
    seconds.
    """
    ticks = 0
    for pid in (pids,) if isinstance(pids, int) else pids:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces: fields count from after ")".
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_and_total() -> tuple[float, float]:
    """
    Non-idle and total clock ticks of all cores since boot (C{/proc/stat}).
    """
    with open("/proc/stat") as f:
        ticks = [int(n) for n in f.readline().split()[1:]]
    # idle and iowait are the 4th and 5th.
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def _free_port() -> int:
    from sslshare.dev.throwaway import free_port

    return free_port()


def wait_for_port(name: str, port: int, process: subprocess.Popen, log: str,
                  timeout: float = 30.0) -> None:
    """
    Wait until C{process} (called C{name} in errors) listens on C{port}.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(f"{name} ended with status "
                                 f"{process.returncode}: {log_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise BenchmarkError(f"{name} did not listen on port {port} in "
                         f"{timeout} s: {log_tail(log)}")


def progress(message: str) -> None:
    """
    One line of a benchmark's progress, on standard error.
    """
    print(message, file=sys.stderr, flush=True)


def log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(no log: {e.strerror})"


class Cluster:
    """
    Two C{twistd sslshare} nodes with one checkpoint mode, from TOML files
    written into C{directory}.
    """

    def __init__(self, directory: str, mode: str, backend_port: int) -> None:
        from tests.support.cluster import NODE_CONFIG

        self.directory = directory
        self.mode = mode
        self.client_ports = {node: _free_port() for node in NODES}
        amp_ports = {node: _free_port() for node in NODES}
        self.paths: dict[str, str] = {}
        self.logs: dict[str, str] = {}
        self.processes: dict[str, subprocess.Popen] = {}
        for node in NODES:
            peers = "\n".join(
                f'{peer} = "tcp:host=127.0.0.1:port={amp_ports[peer]}"'
                for peer in NODES if peer != node)
            path = os.path.join(directory, f"{mode}-{node}.toml")
            with open(path, "w") as f:
                f.write(NODE_CONFIG.format(
                    node=node, cluster=CLUSTER,
                    client_port=self.client_ports[node],
                    backend_port=backend_port,
                    state_dir=f"state/{mode}/{node}",
                    node_options=f'checkpoint = "{mode}"',
                    amp_port=amp_ports[node], peers=peers))
            self.paths[node] = path
            self.logs[node] = os.path.join(directory, f"{mode}-{node}.log")

    def start(self, profile: str | None = None) -> None:
        for node in NODES:
            command = twistd_command(
                self.logs[node], self.paths[node],
                profile if node == "node1" else None)
            with open(self.logs[node] + ".stderr", "w") as errors:
                self.processes[node] = subprocess.Popen(
                    command, cwd=ROOT, env=environment(),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=errors)

    def wait_ready(self) -> None:
        for node in NODES:
            wait_for_port(f"{self.mode} {node}", self.client_ports[node],
                          self.processes[node],
                           self.logs[node])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(self.stats(node).get("peers.connected") == 1
                   for node in NODES):
                return
            time.sleep(0.2)
        raise BenchmarkError(f"the {self.mode} cluster's nodes did not link "
                             f"up in 30 s: {log_tail(self.logs['node1'])}")

    def pid(self, node: str) -> int:
        return self.processes[node].pid

    def stats(self, node: str) -> dict[str, Any]:
        """
        The node's counters, from C{sslshare stats --config FILE --json}.
        """
        done = subprocess.run(
            [sys.executable, "-c", "from sslshare.cli import main; main()",
             "stats", "--config", self.paths[node], "--json"],
            cwd=ROOT, env=environment(), capture_output=True, text=True,
            timeout=30)
        if done.returncode != 0:
            raise BenchmarkError(f"sslshare stats of {self.mode} {node} "
                                 f"failed: {done.stderr.strip()}")
        return json.loads(done.stdout)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p])
    return environment


class Client:
    """
    The client process, and one transfer at a time through it.
    """

    def __init__(self, ca_certificate: str, sink_pid: int) -> None:
        self.sink_pid = sink_pid
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "_client",
             ca_certificate],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, bufsize=1)
        self.negotiated: set[str] = set()
        self.records: dict[str, int] = {}

    def _say(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def _hear(self, timeout: float = 300) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise BenchmarkError("the client process ended or went quiet")
        answer = json.loads(line)
        if "error" in answer:
            raise BenchmarkError(f"client: {answer['error']}")
        return answer

    def transfer(self, cluster: Cluster, size: int, total: int) -> dict[str, float]:
        """
        One connection through C{cluster}'s node1: C{total} bytes in
        records of C{size}; the wall time and both nodes' CPU time.
        """
        # The data, the header, and the sink's two answers.
        self.records[cluster.mode] = (self.records.get(cluster.mode, 0)
                                      + total // size + 3)
        self._say(json.dumps({"port": cluster.client_ports["node1"],
                              "size": size, "total": total}))
        hello = self._hear(60)
        self.negotiated.add(f"{hello['version']} {hello['cipher']}")
        pids = {node: cluster.pid(node) for node in NODES}
        pids["others"] = (self.process.pid, self.sink_pid)
        before = {node: cpu_seconds(pid) for node, pid in pids.items()}
        busy_before, ticks_before = machine_busy_and_total()
        self._say("go")
        result = self._hear()
        busy_after, ticks_after = machine_busy_and_total()
        after = {node: cpu_seconds(pid) for node, pid in pids.items()}
        self._say("close")
        if result["received"] != total:
            raise BenchmarkError(f"the sink got {result['received']} of "
                                 f"{total} bytes through the {cluster.mode} "
                                 f"cluster")
        megabytes = total / MB
        return {
            "mb_per_s": megabytes / result["seconds"],
            "cpu_s_per_mb": (after["node1"] - before["node1"]) / megabytes,
            "peer_cpu_s_per_mb": (after["node2"] - before["node2"]) / megabytes,
            "others_cpu_s_per_mb": (after["others"] - before["others"]) / megabytes,
            "machine_busy": ((busy_after - busy_before)
                             / max(1, ticks_after - ticks_before)),
            "seconds": result["seconds"],
            "records": result["records"],
        }

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


def machine() -> dict[str, Any]:
    from benchmarks.engine import machine as engine_machine
    from twisted import version as twisted_version

    facts = engine_machine()
    # The node's OpenSSL serves; the client here is Python's ssl.
    facts["node_openssl"] = facts.pop("server_openssl")
    facts["client_openssl"] = ssl.OPENSSL_VERSION
    facts["twisted"] = twisted_version.short()
    facts["kernel"] = platform.release()
    return facts


def run(quick: bool, profile: str | None, keep: bool, breakdown: bool,
        progress: Any) -> dict[str, Any]:
    from sslshare.dev.pki import init_pki

    modes = MODES + ((BREAKDOWN_MODE,) if breakdown else ())
    rounds, phase_seconds = (8, 1.5) if quick else (16, 3.0)
    started = time.monotonic()
    facts = machine()
    facts["date"] = datetime.date.today().isoformat()
    directory = tempfile.mkdtemp(prefix="sslshare-checkpoint-")
    sink = clusters = client = None
    try:
        files = init_pki(os.path.join(directory, "pki"), CLUSTER, NODES)
        sink = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "_sink"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None
        backend_port = int(sink.stdout.readline())
        clusters = {mode: Cluster(directory, mode, backend_port)
                    for mode in modes}
        for mode, cluster in clusters.items():
            cluster.start(None if profile is None
                          else os.path.join(profile, f"{mode}.pstats"))
        for cluster in clusters.values():
            cluster.wait_ready()
        client = Client(files.ca_certificate, sink.pid)
        progress(f"nodes up after {time.monotonic() - started:.1f} s")

        # Calibration (and warm-up): one transfer per size and cluster.
        totals = {}
        for name, size in SIZES.items():
            guess = CALIBRATION_BYTES[size]
            rates = [client.transfer(clusters[mode], size, guess)["mb_per_s"]
                     for mode in modes]
            total = int(min(rates) * MB * phase_seconds) // size * size
            totals[name] = max(size * 64, min(total, MAX_TRANSFER))
            progress(f"calibrated {name}: {totals[name] / MB:.1f} MB per "
                     f"transfer ({', '.join(f'{r:.0f}' for r in rates)} MB/s)")

        samples: dict[str, dict[str, list[dict[str, float]]]] = {
            name: {mode: [] for mode in modes} for name in SIZES}
        for number in range(rounds):
            for index, (name, size) in enumerate(SIZES.items()):
                # Each mode goes first in turn.
                first = (number + index) % len(modes)
                for mode in modes[first:] + modes[:first]:
                    samples[name][mode].append(
                        client.transfer(clusters[mode], size, totals[name]))
            progress(f"round {number + 1}/{rounds} done")
        negotiated = sorted(client.negotiated)
        records = dict(client.records)
        client.close()
        client = None

        counters = {mode: {node: cluster.stats(node) for node in NODES}
                    for mode, cluster in clusters.items()}
    finally:
        if client is not None:
            client.close()
        if clusters is not None:
            for cluster in clusters.values():
                cluster.stop()
        if sink is not None:
            sink.kill()
            sink.wait()
        if keep:
            progress(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)

    facts["load_average_1m_at_end"] = os.getloadavg()[0]
    return summarize(samples, totals, counters, records, rounds, facts,
                     negotiated, time.monotonic() - started)


def _ratios(cells: dict[str, list[dict[str, float]]], mode: str) -> dict[str, Any]:
    """
    C{mode} against C{off}, transfer by transfer of the same round.
    """
    rates = [this["mb_per_s"] / off["mb_per_s"]
             for this, off in zip(cells[mode], cells["off"])]
    costs = [this["cpu_s_per_mb"] / off["cpu_s_per_mb"]
             for this, off in zip(cells[mode], cells["off"])
             if off["cpu_s_per_mb"] > 0]
    return {
        "throughput": statistics.median(rates),
        "throughput_quartiles": _quartiles(rates),
        "cpu": statistics.median(costs) if costs else float("nan"),
        "cpu_quartiles": _quartiles(costs) if costs else [float("nan")] * 2,
    }


def summarize(samples: dict[str, dict[str, list[dict[str, float]]]],
              totals: dict[str, int], counters: dict[str, dict[str, Any]],
              records: dict[str, int], rounds: int, facts: dict[str, Any],
              negotiated: list[str], seconds: float) -> dict[str, Any]:
    modes = list(next(iter(samples.values())))
    mb_per_s: dict[str, dict[str, float]] = {}
    cpu: dict[str, dict[str, float]] = {}
    peer_cpu: dict[str, dict[str, float]] = {}
    others_cpu: dict[str, dict[str, float]] = {}
    busy: dict[str, dict[str, float]] = {}
    ratios: dict[str, dict[str, Any]] = {}
    for name in SIZES:
        cells = samples[name]
        mb_per_s[name] = {mode: statistics.median(s["mb_per_s"] for s in cells[mode])
                          for mode in modes}
        cpu[name] = {mode: statistics.median(s["cpu_s_per_mb"] for s in cells[mode])
                     for mode in modes}
        peer_cpu[name] = {mode: statistics.median(s["peer_cpu_s_per_mb"]
                                                  for s in cells[mode])
                          for mode in modes}
        others_cpu[name] = {mode: statistics.median(s["others_cpu_s_per_mb"]
                                                    for s in cells[mode])
                            for mode in modes}
        busy[name] = {mode: statistics.median(s["machine_busy"]
                                              for s in cells[mode])
                      for mode in modes}
        ratios[name] = {mode: _ratios(cells, mode)
                        for mode in modes if mode != "off"}
    kept = {}
    for mode, nodes in counters.items():
        kept[mode] = {
            "node1": {name: nodes["node1"].get(name, 0) for name in COUNTER_NAMES},
            "node2": {"cluster.commands:Checkpoint":
                      nodes["node2"].get("cluster.commands:Checkpoint", 0),
                      "backups_kept": nodes["node2"].get("backups_kept", 0)},
        }
        kept[mode]["node1"]["full_handshakes"] = nodes["node1"].get("full", 0)
        kept[mode]["node1"]["records_sent_through"] = records.get(mode, 0)
    throughput_ratio = {name: ratios[name]["every-record"]["throughput"]
                        for name in SIZES}
    return {
        "checkpoint_ratio": throughput_ratio,
        "cpu_ratio": {name: ratios[name]["every-record"]["cpu"]
                      for name in SIZES},
        "ratios": ratios,
        "mb_per_s": mb_per_s,
        "cpu_s_per_mb": cpu,
        "peer_cpu_s_per_mb": peer_cpu,
        "others_cpu_s_per_mb": others_cpu,
        "machine_busy": busy,
        "goal": {"16KiB_throughput_ratio_at_least": GOAL,
                 "met": throughput_ratio["16KiB"] >= GOAL},
        "counters": kept,
        "transfer_mb": {name: totals[name] / MB for name in SIZES},
        "rounds": rounds,
        "negotiated": negotiated,
        "machine": facts,
        "seconds": round(seconds, 1),
        "command": " ".join([".venv/bin/python", "benchmarks/checkpoint.py",
                             *map(shlex.quote, sys.argv[1:])]),
        "method": METHOD,
    }


METHOD = (
    "Two 2-node clusters of twistd sslshare processes on 127.0.0.1, one with "
    "checkpoint = \"every-record\" (checkpoints go from node1 to node2 over "
    "AMP mTLS), one with \"off\"; a sink backend process (discards, answers "
    "when it has every byte); a Python ssl client process sending N bytes "
    "with one sendall of exactly 1 KiB or 16 KiB each (one TLS record each), "
    "client to backend through node1, one new connection per transfer. "
    "MB/s = bytes (1e6) / client wall time from the first data send to the "
    "sink's acknowledgement of the last byte; CPU s/MB = node1's "
    "utime+stime (/proc/<pid>/stat) over the transfer / MB (the same for "
    "node2, and for the client and sink together); machine busy = the "
    "non-idle share of all cores over the transfer (/proc/stat). Rounds "
    "alternate which mode goes first; figures are medians over rounds, "
    "ratios are every-record/off within a round, median over rounds. "
    "With --breakdown, a third cluster with checkpoint = \"interval\" "
    "(digest of every record, one write a second) runs in the same rounds.")


def print_table(result: dict[str, Any]) -> None:
    print("bulk proxy throughput through node1 to a local sink, "
          "checkpoint every-record vs off")
    print(f"{'record':>6}  {'mode':<12}  {'MB/s':>7}  {'node1 CPU s/MB':>14}  "
          f"{'node2 CPU s/MB':>14}  {'others CPU s/MB':>15}  "
          f"{'machine busy':>12}")
    for name in SIZES:
        for mode in result["mb_per_s"][name]:
            print(f"{name:>6}  {mode:<12}  {result['mb_per_s'][name][mode]:7.1f}  "
                  f"{result['cpu_s_per_mb'][name][mode]:14.5f}  "
                  f"{result['peer_cpu_s_per_mb'][name][mode]:14.5f}  "
                  f"{result['others_cpu_s_per_mb'][name][mode]:15.5f}  "
                  f"{result['machine_busy'][name][mode]:12.0%}")
    print("others: the client and the sink processes; machine busy: the "
          "non-idle share of all cores over the transfer")
    print()
    print("mode / off, median over rounds [quartiles]")
    print(f"{'record':>6}  {'mode':<12}  {'throughput':>10}  {'quartiles':<16}  "
          f"{'node1 CPU/MB':>12}  {'quartiles':<16}")
    for name in SIZES:
        for mode, ratio in result["ratios"][name].items():
            tq, cq = ratio["throughput_quartiles"], ratio["cpu_quartiles"]
            print(f"{name:>6}  {mode:<12}  {ratio['throughput']:10.3f}  "
                  f"[{tq[0]:.3f}, {tq[1]:.3f}]    {ratio['cpu']:12.3f}  "
                  f"[{cq[0]:.3f}, {cq[1]:.3f}]")
    print()
    print("counters after the run (sslshare stats --json), calibration "
          "included; records_sent_through: records the client and the sink "
          "sent through node1,\nboth directions, which every-record should "
          "about match with checkpoint.written + coalesced")
    for mode, nodes in result["counters"].items():
        for node, values in nodes.items():
            shown = "  ".join(f"{k}={v}" for k, v in values.items())
            print(f"  {mode:<12} {node}: {shown}")
    print()
    goal = result["goal"]
    print(f"goal: 16 KiB throughput ratio >= {GOAL}: "
          f"{'met' if goal['met'] else 'NOT met'} "
          f"({result['checkpoint_ratio']['16KiB']:.3f}); "
          f"1 KiB ratio {result['checkpoint_ratio']['1KiB']:.3f}")
    print()
    facts = result["machine"]
    print("transfer per connection: "
          + ", ".join(f"{n} {mb:.1f} MB" for n, mb in result["transfer_mb"].items())
          + f"; {result['rounds']} rounds; negotiated "
          + "; ".join(result["negotiated"]))
    print(f"machine: {facts['cpu']}, {facts['cores']} cores, kernel "
          f"{facts['kernel']}, Python {facts['python']}, Twisted "
          f"{facts['twisted']}, node {facts['node_openssl']}, client "
          f"{facts['client_openssl']}; load average "
          f"{facts['load_average_1m_at_start']:.2f} -> "
          f"{facts['load_average_1m_at_end']:.2f}; {facts['date']}")
    print(f"run time {result['seconds']:.0f} s; command: {result['command']}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_sink"]:
        return run_sink()
    if argv[:1] == ["_client"]:
        return run_client(argv[1])
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer, shorter rounds (under a minute)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the table")
    parser.add_argument("--profile", metavar="DIR",
                        help="run each cluster's node1 under cProfile, "
                        "writing DIR/<mode>.pstats")
    parser.add_argument("--breakdown", action="store_true",
                        help="add a cluster with checkpoint = \"interval\" "
                        "(the digest of every record, one write a second) "
                        "to split the cost between digest and writes")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (configs, logs)")
    arguments = parser.parse_args(argv)
    if arguments.profile is not None:
        arguments.profile = os.path.abspath(arguments.profile)
        os.makedirs(arguments.profile, exist_ok=True)
    sys.path.insert(0, ROOT)
    try:
        result = run(arguments.quick, arguments.profile, arguments.keep,
                     arguments.breakdown, progress)
    except BenchmarkError as e:
        raise SystemExit(f"checkpoint benchmark: {e}") from None
    if arguments.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
