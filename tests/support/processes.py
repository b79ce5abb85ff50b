"""
Processes as the kernel sees them: a child's end, and what this process
holds (resident memory, open descriptors, TCP connections), read from
C{/proc}.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol


class NodeProcess(ProcessProtocol):
    """
    A child process a test started: C{ended} fires once it has ended.
    """

    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: object) -> None:
        self.ended.callback(None)


def resident_bytes(pid: int | str = "self") -> int:
    """
    The resident set size (C{VmRSS}) of process C{pid} (this one by
    default), in bytes.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_descriptors() -> int:
    """
    How many file descriptors this process has open.
    """
    return len(os.listdir("/proc/self/fd"))


def _my_tcp_sockets() -> Iterator[tuple[str, str, str]]:
    """
    This process's IPv4 TCP sockets, as C{(local, remote, state)} in the
    kernel's hex notation (C{0100007F:1F90}; state C{01} established,
    C{08} close-wait, C{0A} listening).
    """
    mine = set()
    for descriptor in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{descriptor}")
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[len("socket:["):-1])
    with open("/proc/self/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[9] in mine:
                yield fields[1], fields[2], fields[3]


def _loopback(port: int) -> str:
    return f"0100007F:{port:04X}"


def connections_to(port: int) -> int:
    """
    How many TCP connections this process has open to C{port} of
    127.0.0.1.
    """
    return sum(1 for _, remote, state in _my_tcp_sockets()
               if remote == _loopback(port) and state == "01")


def accepted_on(port: int) -> int:
    """
    How many connections this process holds that it accepted on C{port} of
    127.0.0.1, in any state but listening (close-wait included).
    """
    return sum(1 for local, _, state in _my_tcp_sockets()
               if local == _loopback(port) and state != "0A")
