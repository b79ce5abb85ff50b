"""
How the node logs.

Every event is a C{twisted.logger} event: a format string and named fields
(C{session} is always L{sslshare.sessionid.describe}'s short prefix, never
a secret), so that a JSON log keeps each field by name.

L{RateLimitedWarning}: warnings that an outage would repeat thousands of
times, at most one per interval, with the count of those left out.  A
repository or peer that goes away fails every session at once; the operator
needs to know that it happens and how often, not one line per session.

L{json_lines_observer}: the observer of the C{log_format = "json"} option.
"""

from __future__ import annotations

import math
from typing import IO, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    LogEvent,
    eventAsJSON,
    formatEvent,
)


def json_lines_observer(out: IO[Any]) -> ILogObserver:
    """
    An observer writing each event to C{out} as one line of JSON:
    L{twisted.logger.eventAsJSON} (every field by name, C{log_format},
    C{log_level}, C{log_time}, ...), with the formatted text in
    C{log_text}.  Unlike L{twisted.logger.jsonFileLogObserver}, no record
    separator starts the line, so that line-oriented tools read it.
    """
    return FileLogObserver(out, _json_line)


def _json_line(event: LogEvent) -> str:
    return eventAsJSON(dict(event, log_text=formatEvent(event))) + "\n"


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
