"""
Warnings that an outage would repeat thousands of times: at most one per
interval, with the count of those left out.

A repository or peer that goes away fails every session at once; the
operator needs to know that it happens and how often, not one line per
session.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class RateLimitedWarning:
    """
    Log a warning at most once per C{interval} seconds.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, interval: float = 10.0,
                 log: Logger | None = None) -> None:
        self._clock = clock
        self._interval = interval
        if log is not None:
            self._log = log
        self._quiet_until = -math.inf
        self._suppressed = 0

    def warn(self, format: str, **fields: Any) -> None:
        """
        Log C{format} (a L{twisted.logger} format) with C{fields}, unless a
        warning went out less than the interval ago.
        """
        now = self._clock.seconds()
        if now < self._quiet_until:
            self._suppressed += 1
            return
        self._log.warn(
            format + " ({suppressed} more not logged since the last warning)",
            suppressed=self._suppressed, **fields)
        self._suppressed = 0
        self._quiet_until = now + self._interval
