"""
One client of the soak (tests/test_soak.py), run as a process of its own so
that the memory of the test process, which runs the nodes, is measured
without the clients':

    python soak_client.py INDEX CA_FILE TIMEOUT HANG_BOUND NODE=PORT ...

It connects in a loop until its standard input closes, each connection to
another node than the last, offering the session of its previous
connection of that version, TLS 1.2 and 1.3 in turn.  Every third TLS 1.3
ticket it offers is offered again at once to the other nodes, and every
seventh connection replays a ticket it used earlier.  A client offers only
the sessions it got, so it can tell on its own whether a ticket was
resumed twice.

It keeps counts, not records (the test process's memory is measured, and
holds the clients' reports), and prints them as one JSON object when it
stops: C{connections}; C{outcomes} (C{resumed}, C{full}, or what went
wrong: count); C{slowest} (seconds); C{hung}, the connections that took
longer than HANG_BOUND seconds, each as [started (C{time.monotonic()},
which every process of the machine shares), elapsed, node, version, kind
(C{loop}, C{again}, C{replay}), outcome]; C{offered} and C{resumed}, of its
loop's connections; C{tickets}, the TLS 1.3 tickets it offered;
C{served_twice}, for each ticket resumed more than once, its offers as
[started, node, kind, outcome]; C{tls12_sessions}, the hex ids of the TLS
1.2 sessions it was given.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.clients import python_client_round

VERSIONS = ("TLSv1.2", "TLSv1.3")


class Tally:
    """
    What one client saw (the fields of the summary it prints).
    """

    def __init__(self, hang_bound: float) -> None:
        self.hang_bound = hang_bound
        self.outcomes: Counter[str] = Counter()
        self.slowest = 0.0
        self.hung: list[list] = []
        self.offered = self.resumed = 0
        self.resumptions: Counter[bytes] = Counter()
        self.offers: dict[bytes, list[list]] = {}
        self.tls12_sessions: set[str] = set()

    def add(self, started: float, elapsed: float, node: str, version: str,
            kind: str, offered, made, outcome: str) -> None:
        self.outcomes[outcome] += 1
        self.slowest = max(self.slowest, elapsed)
        if elapsed > self.hang_bound:
            self.hung.append([started, elapsed, node, version, kind, outcome])
        if kind == "loop" and offered is not None:
            self.offered += 1
            self.resumed += outcome == "resumed"
        if version == "TLSv1.3" and offered is not None:
            self.resumptions[offered.id] += outcome == "resumed"
            self.offers.setdefault(offered.id, []).append(
                [started, node, kind, outcome])
        if version == "TLSv1.2" and made is not None:
            self.tls12_sessions.add(made.id.hex())

    def summary(self) -> dict:
        return {
            "connections": sum(self.outcomes.values()),
            "outcomes": dict(self.outcomes), "slowest": self.slowest,
            "hung": self.hung, "offered": self.offered,
            "resumed": self.resumed, "tickets": len(self.resumptions),
            "served_twice": [self.offers[ticket] for ticket, count
                             in self.resumptions.items() if count > 1],
            "tls12_sessions": sorted(self.tls12_sessions)}


class Client:
    def __init__(self, index: int, ca_file: str, timeout: float,
                 ports: dict[str, int], tally: Tally,
                 stopped: threading.Event) -> None:
        self.index = index
        self.ca_file = ca_file
        self.timeout = timeout
        self.ports = ports
        self.tally = tally
        self.stopped = stopped

    def run(self) -> None:
        rng = random.Random(self.index)
        nodes = sorted(self.ports)
        previous = {}
        spent = []
        step = 0
        while not self.stopped.is_set():
            version = VERSIONS[step % 2]
            node = nodes[(self.index + step // 2) % len(nodes)]
            offered = previous.get(version)
            result = self.connect(node, version, offered, "loop")
            previous[version] = result and result.session
            if version == "TLSv1.3" and offered is not None:
                spent.append(offered)
                if (step // 2) % 3 == 0:
                    for other in nodes:
                        if other != node:
                            self.connect(other, version, offered, "again")
            if spent and step % 7 == 0:
                self.connect(rng.choice(nodes), "TLSv1.3", rng.choice(spent),
                             "replay")
            del spent[:-50]
            step += 1

    def connect(self, node, version, session, kind):
        started = time.monotonic()
        try:
            result = python_client_round(
                self.ports[node], self.ca_file, version, session,
                timeout=self.timeout)
        except OSError as e:
            result, outcome = None, type(e).__name__
        else:
            outcome = "resumed" if result.reused else "full"
            if not result.echo:
                # A node killed or stalled past the client's patience.
                outcome = "closed before its echo"
            elif result.echo != b"hello":
                outcome = "wrong echo"
        self.tally.add(started, time.monotonic() - started, node, version,
                       kind, session, result and result.session, outcome)
        return result


def main(index: str, ca_file: str, timeout: str, hang_bound: str,
         *ports: str) -> None:
    stopped = threading.Event()

    def until_stdin_closes() -> None:
        sys.stdin.buffer.read()
        stopped.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    tally = Tally(float(hang_bound))
    Client(int(index), ca_file, float(timeout),
           {name: int(port) for name, port in
            (pair.split("=", 1) for pair in ports)}, tally, stopped).run()
    print(json.dumps(tally.summary()), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
