"""
Bytes per stored session in a node's store, measurement 5 of
C{benchmarks/run.py}: a fresh process fills one L{SessionStore} with N
sessions and reports how much its resident set grew, over N.

Each session is what a node holds after a handshake and its first
checkpoint: a L{SessionState} with its own 32-byte id, the service's id
context, a DER of the length a real full handshake of the engine produces
for that TLS version (P-256 certificate; the DER of the real session with
its last 32 bytes made unique, so that no two sessions share a bytes
object), the node's id as owner, and a 32-byte digest.  The resident set
(C{VmRSS}) counts what the allocator really took, fragmentation included,
not only the objects' sizes.

Usage: C{python benchmarks/memory.py [COUNT ...]} (default 100000 1000000)
prints one JSON object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS = (100_000, 1_000_000)
GOAL = 500
VERSION = "1.3"


def real_der(version: str) -> bytes:
    """
    The DER of a session from one full handshake of the engine.
    """
    from benchmarks.engine import EngineServer, Kind, client_context, handshake, new_client

    with tempfile.TemporaryDirectory(prefix="sslshare-bench-") as directory:
        kind = Kind(version, "p256", directory)
        handshake(new_client(client_context(version), None),
                  EngineServer(kind.issuer, kind.listener))
        return next(iter(kind.sessions.values()))


def fill(count: int, template: bytes) -> dict[str, Any]:
    """
    Fill a store with C{count} sessions; the resident set's growth.
    """
    from twisted.internet.task import Clock

    from sslshare import sessionid
    from sslshare.state import SessionState
    from sslshare.store import SessionStore
    from tests.support.processes import resident_bytes

    store = SessionStore(max_bytes=1 << 40, clock=Clock())
    id_context = sessionid.service_id_context("bench", "web")
    tag = sessionid.owner_tag("bench", "node1")
    head = template[:-32]
    before = resident_bytes()
    for _ in range(count):
        store.put(SessionState(
            session_id=sessionid.new_session_id(tag), id_context=id_context,
            der=head + os.urandom(32), holder="node1", created=1.0,
            expires=1e10, seq=1, digest=os.urandom(32)))
    grown = resident_bytes() - before
    return {"sessions": len(store), "rss_growth_bytes": grown,
            "bytes_per_session": grown / count, "der_bytes": len(template),
            "store_estimate_per_session": store.bytes_used / count}


def measure(counts: tuple[int, ...] = COUNTS) -> dict[str, Any]:
    """
    One fresh process per count: C{bytes_per_session} per count, and how
    each was made.
    """
    from benchmarks.checkpoint import environment

    template = real_der(VERSION)
    found: dict[str, Any] = {}
    for count in counts:
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "_fill", str(count),
             template.hex()],
            cwd=ROOT, env=environment(), capture_output=True, text=True,
            timeout=1200)
        if done.returncode != 0:
            from benchmarks.checkpoint import BenchmarkError

            raise BenchmarkError(f"filling a store with {count} sessions "
                                 f"failed: {done.stderr[-1000:]}")
        found[str(count)] = json.loads(done.stdout)
    return {"bytes_per_session": {count: figures["bytes_per_session"]
                                  for count, figures in found.items()},
            "detail": found, "goal": GOAL, "tls": VERSION}


def main(argv: list[str]) -> None:
    if argv[:1] == ["_fill"]:
        print(json.dumps(fill(int(argv[1]), bytes.fromhex(argv[2]))))
        return
    import argparse

    parser = argparse.ArgumentParser(
        description="Bytes per stored session in a node's store, as one "
                    "JSON object.")
    parser.add_argument("counts", nargs="*", type=int, metavar="COUNT",
                        help="sessions to store, one measurement each "
                             "(default: 100000 1000000)")
    counts = tuple(parser.parse_args(argv).counts) or COUNTS
    print(json.dumps(measure(counts), indent=2))


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main(sys.argv[1:])
