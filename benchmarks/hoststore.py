"""
What it costs one worker process to take a session another worker of the
same host made, by the two designs a host's workers could share sessions
with, measured in one run:

    - C{table}: the maker seals each new session and puts it into the
      host's shared table (L{sslshare.hoststore.HostStore}, a memfd both
      processes map); the taker takes it (read and free under the bucket's
      lock) and opens it.  Nobody is asked anything: the maker pays its put
      for every session, the taker its take for every resumption.
    - C{channel}: the maker keeps its sessions in its own
      L{sslshare.store.SessionStore}, as a node does, and gives one away
      on a binary request over a unix socketpair (32-byte id in; a 4-byte
      length and the sealed blob out), the cheapest channel there could be
      between two Twisted processes (no AMP, no TLS); the taker asks,
      waits for the answer and opens it.  Both ends pay per resumption.

and, in a second part, what the table adds to a whole resumption: server
time per TLS handshake (P-256, TLS 1.2 and 1.3) of the engine of
C{benchmarks/engine.py}, full and resumed, with two stores in alternate
rounds: C{same worker}, engine.py's dict of DER bytes (a stand-in cheaper
than a node's store, so the ratio is an upper bound); and C{host table},
every new session built into a L{SessionState}, sealed and put into the
table inside the handshake that made it, every offered one taken, opened
and supplied.  What the table adds per resumption (host table minus same
worker) is the figure to hold against the goal, a resumption across workers
at most 1.2 times one on the same worker: at a node a TLS 1.2 resumption
costs about 1,400 µs of server CPU (Twisted, sockets, the protocol and the
engine; C{benchmarks/RESULTS.md}), so about 280 µs may be added.  The
engine-level ratio is printed too, but its denominator is the engine's
part alone (a tenth of the node's for TLS 1.2), so it overstates the
relative cost many times.

Usage, from the root of a checkout::

    .venv/bin/python benchmarks/hoststore.py [--sessions N] [--rounds R]
        [--batch B] [--json]

Each design runs the same N sessions (default 5000; TLS 1.2-sized DERs of
135 random bytes, as C{tests/support/sessions.py} makes), one at a time,
in two processes: this one (the taker) and a child (the maker), each
reporting its own CPU time (C{time.process_time}) around its part.
Reported per session, in microseconds: the maker's CPU (C{put}, or giving
it away), the taker's CPU, and their sum, the host's CPU per cross-worker
resumption; and the wall time per take as the taker saw it.  Only the
taker's sealed blob is opened; the TLS handshake, the same in both, is not
part of it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time

# Run as a script from a checkout: import the sslshare next to this
# directory, ahead of any installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock  # noqa: E402

from sslshare import hoststore, sessionid  # noqa: E402
from sslshare.state import SessionState, StateKeys  # noqa: E402

_KEY = bytes(range(32))
_CONTEXT = sessionid.service_id_context("bench", "web")
_LENGTH = struct.Struct("!I")


def _states(seed: int, count: int) -> list[SessionState]:
    tag = sessionid.owner_tag("bench", "maker")
    rng = __import__("random").Random(seed)
    now = time.time()
    return [SessionState(
        session_id=bytes((sessionid.FORMAT,)) + tag + rng.randbytes(23),
        id_context=_CONTEXT, der=rng.randbytes(135), holder="maker",
        created=now, expires=now + 3600) for _ in range(count)]


def _table_maker(fd: int, count: int) -> None:
    table = hoststore.HostStore(fd, _wall_clock())
    keys = StateKeys([_KEY])
    states = _states(1, count)
    started = time.process_time()
    for state in states:
        table.put(state.session_id, keys.seal(state), state.expires)
    print(json.dumps({"cpu": time.process_time() - started}), flush=True)


def _channel_maker(fd: int, count: int) -> None:
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    from sslshare.store import SessionStore

    keys = StateKeys([_KEY])
    store = SessionStore(1 << 30, reactor)
    for state in _states(1, count):
        store.put(state)
    started = time.process_time()

    class Giver(Protocol):
        buffer = b""

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            while len(self.buffer) >= sessionid.SESSION_ID_LENGTH:
                wanted = self.buffer[:sessionid.SESSION_ID_LENGTH]
                self.buffer = self.buffer[sessionid.SESSION_ID_LENGTH:]
                state = store.take(wanted)
                sealed = b"" if state is None else keys.seal(state)
                self.transport.write(_LENGTH.pack(len(sealed)) + sealed)

        def connectionLost(self, reason: object) -> None:
            print(json.dumps({"cpu": time.process_time() - started}),
                  flush=True)
            reactor.stop()

    reactor.adoptStreamConnection(fd, socket.AF_UNIX, Factory.forProtocol(Giver))
    os.close(fd)
    reactor.run()


def _wall_clock() -> Clock:
    class Wall(Clock):
        def seconds(self) -> float:
            return time.time()
    return Wall()


def _maker(design: str, fd: int, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--maker", design, "--fd", str(fd),
         "--sessions", str(count)],
        pass_fds=(fd,), stdout=subprocess.PIPE, text=True)


def _table(count: int) -> dict[str, float]:
    fd = hoststore.create_table(hoststore.Shape.for_bytes(count * 16384))
    maker = _maker("table", fd, count)
    maker_cpu = json.loads(maker.stdout.readline())["cpu"]
    maker.wait()
    table = hoststore.HostStore(fd, _wall_clock())
    keys = StateKeys([_KEY])
    states = _states(1, count)
    wall, cpu = time.perf_counter(), time.process_time()
    for state in states:
        entry = table.take(state.session_id)
        assert entry is not None
        keys.open(entry.sealed, state.session_id, _CONTEXT)
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    table.close()
    return _figures(count, maker_cpu, cpu, wall)


def _channel(count: int) -> dict[str, float]:
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    maker = _maker("channel", theirs.fileno(), count)
    theirs.close()
    keys = StateKeys([_KEY])
    states = iter(_states(1, count))

    class Taker(Protocol):
        buffer = b""
        wanted: SessionState

        def connectionMade(self) -> None:
            self.wall, self.cpu = time.perf_counter(), time.process_time()
            self.ask()

        def ask(self) -> None:
            state = next(states, None)
            if state is None:
                self.done()
                return
            self.wanted = state
            self.transport.write(state.session_id)

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            if len(self.buffer) < _LENGTH.size:
                return
            length = _LENGTH.unpack_from(self.buffer)[0]
            if len(self.buffer) < _LENGTH.size + length:
                return
            sealed = self.buffer[_LENGTH.size:_LENGTH.size + length]
            self.buffer = self.buffer[_LENGTH.size + length:]
            keys.open(sealed, self.wanted.session_id, _CONTEXT)
            self.ask()

        def done(self) -> None:
            cpu = time.process_time() - self.cpu
            wall = time.perf_counter() - self.wall
            taken.extend((cpu, wall))
            self.transport.loseConnection()
            reactor.stop()

    taken: list[float] = []
    reactor.adoptStreamConnection(mine.fileno(), socket.AF_UNIX,
                                  Factory.forProtocol(Taker))
    mine.close()
    reactor.run()
    maker_cpu = json.loads(maker.stdout.readline())["cpu"]
    maker.wait()
    return _figures(count, maker_cpu, *taken)


def _figures(count: int, maker_cpu: float, taker_cpu: float,
             wall: float) -> dict[str, float]:
    per = 1e6 / count
    return {"maker_cpu_us": round(maker_cpu * per, 1),
            "taker_cpu_us": round(taker_cpu * per, 1),
            "host_cpu_us": round((maker_cpu + taker_cpu) * per, 1),
            "wall_us": round(wall * per, 1)}


def _handshakes(rounds: int, batch: int) -> dict[str, dict[str, float]]:
    """
    Median over C{rounds} rounds (after a warm-up) of the mean server
    microseconds per handshake, by TLS version, store and handshake type.
    """
    import statistics
    import tempfile

    from zope.interface import implementer

    from benchmarks import engine
    from sslshare import hooks, tls

    keys = StateKeys([_KEY])
    clock = _wall_clock()

    @implementer(tls.ISessionLookupListener)
    class TableLookup:
        def __init__(self, table: hoststore.HostStore,
                     id_context: bytes) -> None:
            self.table = table
            self.id_context = id_context

        def lookup_requested(self, connection: tls.Connection,
                             request: hooks.LookupRequest) -> None:
            entry = self.table.take(request.session_id)
            connection.supply(None if entry is None else keys.open(
                entry.sealed, request.session_id, self.id_context).der)

    class TableKind(engine.Kind):
        def __init__(self, version: str, directory: str) -> None:
            shape = hoststore.Shape.for_bytes(4 * (rounds + 1) * batch * 2048)
            self.table = hoststore.HostStore(hoststore.create_table(shape),
                                             clock)
            self.id_context = sessionid.service_id_context(engine.CLUSTER,
                                                           engine.SERVICE)
            super().__init__(version, "p256", directory)
            self.listener = TableLookup(self.table, self.id_context)

        def _store(self, connection: tls.Connection, session_id: bytes,
                   der: bytes) -> None:
            now = clock.seconds()
            state = SessionState(
                session_id=session_id, id_context=self.id_context, der=der,
                holder="worker0", created=now, expires=now + 3600)
            self.table.put(session_id, keys.seal(state), state.expires)

    samples: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as directory:
        kinds = [(version, store, kind)
                 for version in engine.VERSIONS
                 for store, kind in (
                     ("same_worker", engine.Kind(version, "p256", directory)),
                     ("host_table", TableKind(version, directory)))]
        for round_number in range(rounds + 1):
            for version, store, kind in kinds:
                measured = kind.measure("engine", batch, round_number > 0)
                if round_number:
                    for handshake, ns in measured.items():
                        samples.setdefault((version, store, handshake),
                                           []).append(ns / 1000)
    figures: dict[str, dict[str, float]] = {}
    for (version, store, handshake), values in samples.items():
        figures.setdefault(f"tls{version}", {})[f"{store}_{handshake}_us"] = \
            round(statistics.median(values), 1)
    for row in figures.values():
        for handshake in engine.HANDSHAKES:
            table_us = row[f"host_table_{handshake}_us"]
            same_us = row[f"same_worker_{handshake}_us"]
            row[f"{handshake}_added_us"] = round(table_us - same_us, 1)
            row[f"{handshake}_ratio"] = round(table_us / same_us, 3)
    return figures


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks/hoststore.py",
        description="CPU per session taken across two worker processes: "
                    "a shared table against a socketpair channel.")
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--maker", choices=("table", "channel"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("sessions", "rounds", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.maker == "table":
        _table_maker(args.fd, args.sessions)
        return
    if args.maker == "channel":
        _channel_maker(args.fd, args.sessions)
        return
    results = {"sessions": args.sessions, "table": _table(args.sessions),
               "channel": _channel(args.sessions),
               "handshakes": _handshakes(args.rounds, args.batch)}
    if args.json:
        print(json.dumps(results))
        return
    print(f"{args.sessions} sessions, per session, microseconds")
    print(f"{'design':10} {'maker CPU':>10} {'taker CPU':>10} "
          f"{'host CPU':>10} {'wall/take':>10}")
    for design in ("table", "channel"):
        row = results[design]
        print(f"{design:10} {row['maker_cpu_us']:10.1f} "
              f"{row['taker_cpu_us']:10.1f} {row['host_cpu_us']:10.1f} "
              f"{row['wall_us']:10.1f}")
    print(f"\nserver microseconds per handshake, P-256, median of "
          f"{args.rounds} rounds of {args.batch}")
    print(f"{'version':8} {'store':12} {'full':>8} {'resumed':>8}")
    for version, row in results["handshakes"].items():
        for store in ("same_worker", "host_table"):
            print(f"{version:8} {store:12} {row[store + '_full_us']:8.1f} "
                  f"{row[store + '_resumed_us']:8.1f}")
        print(f"{version:8} {'added':12} {row['full_added_us']:8.1f} "
              f"{row['resumed_added_us']:8.1f}  (budget at a node: about "
              f"280 per resumption)")
        print(f"{version:8} {'ratio':12} {row['full_ratio']:8.3f} "
              f"{row['resumed_ratio']:8.3f}  (engine's part only)")


if __name__ == "__main__":
    main(sys.argv[1:])
