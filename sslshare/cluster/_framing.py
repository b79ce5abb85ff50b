"""
What both ends of the channel do to a connection before and around AMP:
a deadline for the TLS handshake, and boxes bounded as they arrive.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from sslshare.cluster._commands import MAX_BOX_BYTES, MAX_BOX_KEYS

DEFAULT_HANDSHAKE_TIMEOUT = 10.0


class HandshakeDeadline:
    """
    Aborts a connection whose TLS handshake is not done in time: a peer
    that connects and says nothing must not hold a connection forever.
    """

    _deadline: IDelayedCall | None = None
    # As AMP types it: these classes mix into AMP protocols.
    transport: Any

    def _start_deadline(self, clock: IReactorTime, timeout: float) -> None:
        self._deadline = clock.callLater(timeout, self._deadline_passed)

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        self._handshake_timed_out()
        self.transport.abortConnection()

    def _handshake_timed_out(self) -> None:
        raise NotImplementedError


class BoundedBoxes:
    """
    An AMP protocol whose boxes are bounded (L{MAX_BOX_KEYS},
    L{MAX_BOX_BYTES}) as they arrive: AMP itself keeps a box until its end,
    however long that takes.  The class on top says what a box too large
    means (L{_box_too_large}) and calls L{_drop} when it ends the
    connection.
    """

    state: str
    # As AMP types it: these classes mix into AMP protocols.
    transport: Any
    _box_keys = 0
    _box_bytes = 0
    _dropped = False

    def stringReceived(self, string: bytes) -> None:
        if self._dropped:
            # The rest of what was read with a box that ended the
            # connection: nothing of it is acted on.
            return
        if self.state == "init":
            self._box_keys = self._box_bytes = 0
        # 2: the length before each key and value.
        self._box_bytes += 2 + len(string)
        if self.state != "value" and string:
            self._box_keys += 1
        if self._box_keys > MAX_BOX_KEYS or self._box_bytes > MAX_BOX_BYTES:
            self._box_too_large(
                f"a box of more than {MAX_BOX_KEYS} keys or {MAX_BOX_BYTES} "
                f"bytes ({self._box_keys} keys and {self._box_bytes} bytes "
                f"so far)")
            return
        super().stringReceived(string)  # type: ignore[misc]

    def _box_too_large(self, what: str) -> None:
        raise NotImplementedError

    def _drop(self) -> None:
        self._dropped = True
        self.transport.abortConnection()
