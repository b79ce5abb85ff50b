"""
systemd's readiness protocol (sd_notify(3)), spoken directly: each state
change is one datagram to the AF_UNIX socket named by C{$NOTIFY_SOCKET}
(a path, or with a leading C{@} a name in the abstract namespace).  No
library: the protocol is that datagram.  Without C{$NOTIFY_SOCKET} (not
started by systemd with C{Type=notify}) nothing is sent.

A node says C{READY=1} once every listener is bound and its peer links
are dialling, C{RELOADING=1} (with C{MONOTONIC_USEC}, as C{Type=notify-reload}
requires) then C{READY=1} around a reload, and C{STOPPING=1} when it
begins to stop; each with a C{STATUS=} line for C{systemctl status}.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from twisted.application.service import Service
from twisted.logger import Logger

_log = Logger()

NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """
    Send C{state} (C{KEY=value} lines) to systemd; whether it was sent.  A
    socket that cannot be written to is logged, never raised: the node
    runs whether or not its service manager hears it.
    """
    address = environ.get(NOTIFY_SOCKET)
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(state.encode("utf-8"), address)
    except OSError as e:
        _log.warn("cannot notify systemd at {address}: {why}",
                  address=environ[NOTIFY_SOCKET], why=e.strerror or str(e))
        return False
    return True


def reloading(status: str) -> str:
    """
    The state a service sends when a reload begins.
    """
    return (f"RELOADING=1\nMONOTONIC_USEC="
            f"{time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}\n"
            f"STATUS={status}")


class ReadinessNotice(Service):
    """
    Tells systemd the node is ready when it starts (put it after every
    other service, so that it starts last) and that it is stopping when
    it stops (so, first).
    """

    def __init__(self, description: str,
                 environ: Mapping[str, str] = os.environ) -> None:
        self._description = description
        self._environ = environ

    def startService(self) -> None:
        super().startService()
        notify(f"READY=1\nSTATUS=serving {self._description}", self._environ)

    def stopService(self) -> None:
        super().stopService()
        notify(f"STOPPING=1\nSTATUS=stopping {self._description}",
               self._environ)
