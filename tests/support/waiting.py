"""
Waiting on the reactor: for a condition to come true, for a port to listen.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater


def until(predicate: Callable[[], Any], timeout: float = 10.0, *,
          interval: float = 0.02, clock: IReactorTime = reactor,
          message: str = "the condition did not come true in time",
          ) -> Deferred[None]:
    """
    Fires once C{predicate()} holds, asked every C{interval} seconds on
    C{clock}; fails with C{message} after C{timeout} seconds.  The predicate
    may answer with a Deferred, for a condition that takes a round trip to
    ask (what a repository holds).
    """
    async def poll() -> None:
        deadline = clock.seconds() + timeout
        while not await maybeDeferred(predicate):
            if clock.seconds() > deadline:
                raise AssertionError(message)
            await deferLater(clock, interval, lambda: None)

    return Deferred.fromCoroutine(poll())


async def wait_for_port(port: int, ended: Deferred[None] | None = None,
                        timeout: float = 20.0) -> None:
    """
    Wait until something listens on C{port} of 127.0.0.1.

    @param ended: a Deferred that fires if the process meant to listen
        ends first.
    """
    deadline = reactor.seconds() + timeout
    while reactor.seconds() < deadline:
        if ended is not None and ended.called:
            raise AssertionError(f"the process for port {port} ended")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            await deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"nothing listened on port {port} in {timeout} s")
