"""
The load generator of C{benchmarks/run.py}: client processes of Python's
C{ssl} (blocking sockets, C{TCP_NODELAY}), each making connections one
after another, one HTTP/1.0 GET per connection read to EOF (in TLS 1.3 the
session ticket comes after the handshake, with the response).

A client offers the session of its previous connection on the next one
(C{offer}), or never (full handshakes only); its i-th connection goes to
the i-th of its ports, round robin.  It stops after a number of
connections, or at a deadline: then all clients start together at one
wall-clock instant and count only the connections that end before the
deadline, so that the servers' CPU can be read over the same window.  Each
prints one JSON line of counts and its own CPU seconds.

Run as C{python benchmarks/load.py PORTS CA VERSION CONNECTIONS START
DEADLINE OFFER}; L{run_clients} does that for a benchmark.
"""

from __future__ import annotations

import json
import os
import resource
import ssl
import subprocess
import sys
import time
from typing import Any

import attrs

from sslshare.dev.demo import get_over_tls

VERSIONS = {"tls1.2": ssl.TLSVersion.TLSv1_2, "tls1.3": ssl.TLSVersion.TLSv1_3}
_VERSION_NAMES = {"tls1.2": "TLSv1.2", "tls1.3": "TLSv1.3"}


@attrs.frozen
class Load:
    """
    What each client process does: its C{ports}, round robin; the TLS
    C{version}; whether it C{offer}s its previous session; and when it
    stops: after C{connections}, or, when C{seconds} is set, C{seconds}
    after a common start.
    """

    ports: tuple[int, ...]
    version: str
    offer: bool = True
    connections: int = 0
    seconds: float = 0.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_client(load: Load, ca_certificate: str, start: float) -> dict[str, Any]:
    """
    Make the connections of C{load} and return their counts.
    """
    context = ssl.create_default_context(cafile=ca_certificate)
    context.minimum_version = context.maximum_version = VERSIONS[load.version]
    session = None
    counts: dict[str, Any] = {
        "connections": 0, "resumable": 0, "resumed": 0, "errors": 0,
        "wrong_version": 0, "bad_response": 0}
    deadline = start + load.seconds if load.seconds else None
    while time.time() < start:
        time.sleep(min(0.01, max(0.0, start - time.time())))
    cpu_at_start = _cpu_seconds()
    attempt = 0
    while (counts["connections"] < load.connections if deadline is None
           else time.time() < deadline):
        port = load.ports[attempt % len(load.ports)]
        attempt += 1
        offered = session if load.offer else None
        try:
            fetched = get_over_tls(context, port, offered, timeout=30)
            if deadline is not None and time.time() > deadline:
                break
            counts["connections"] += 1
            if offered is not None:
                counts["resumable"] += 1
                counts["resumed"] += fetched.reused
            if fetched.version != _VERSION_NAMES[load.version]:
                counts["wrong_version"] += 1
            if not fetched.answer.startswith(b"HTTP/1."):
                counts["bad_response"] += 1
            session = fetched.session
        except (OSError, ssl.SSLError) as e:
            # A failed connection offers nothing next time: the next one
            # starts afresh and is not counted as resumable.
            counts["errors"] += 1
            reason = f"{type(e).__name__}: {e}"[:120]
            reasons = counts.setdefault("error_reasons", {})
            reasons[reason] = reasons.get(reason, 0) + 1
            session = None
    counts["cpu_s"] = _cpu_seconds() - cpu_at_start
    return counts


def run_clients(load: Load, ca_certificate: str, clients: int,
                start: float | None = None) -> dict[str, Any]:
    """
    C{clients} client processes of C{load} at once, starting together at
    wall-clock C{start} (now when C{None}); their counts summed.
    """
    from benchmarks.checkpoint import BenchmarkError, environment

    start = time.time() if start is None else start
    arguments = [",".join(map(str, load.ports)), ca_certificate, load.version,
                 str(load.connections), str(load.seconds), str(start),
                 "offer" if load.offer else "fresh"]
    started = [subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)] + arguments,
        env=environment(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        for _ in range(clients)]
    total: dict[str, Any] = {}
    try:
        for process in started:
            output, _ = process.communicate(timeout=900)
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


USAGE = ("usage: python benchmarks/load.py PORTS CA_CERTIFICATE VERSION "
         "CONNECTIONS SECONDS START offer|fresh\n(one client process of "
         "run_clients, which starts it; prints its counts as JSON)")


def main(argv: list[str]) -> None:
    if len(argv) != 7:
        raise SystemExit(USAGE)
    ports, ca_certificate, version, connections, seconds, start, offer = argv
    load = Load(ports=tuple(int(port) for port in ports.split(",")),
                version=version, offer=offer == "offer",
                connections=int(connections), seconds=float(seconds))
    print(json.dumps(run_client(load, ca_certificate, float(start))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
