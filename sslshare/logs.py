"""
How the node logs.

Every event is a C{twisted.logger} event: a format string and named fields
(C{session} is always L{sslshare.sessionid.describe}'s short prefix, never
a secret), so that a JSON log keeps each field by name.

L{RateLimitedWarning}: warnings that an outage would repeat thousands of
times, at most one per interval, with the count of those left out.  A
repository or peer that goes away fails every session at once; the operator
needs to know that it happens and how often, not one line per session.

L{json_lines_observer}: the observer of the C{log_format = "json"} option:
one flat JSON object per event, as log shippers read them.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
from typing import IO, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    LogEvent,
    formatEvent,
)


def json_lines_observer(out: IO[Any]) -> ILogObserver:
    """
    An observer writing each event to C{out} as one line of JSON, one flat
    object: C{time} (ISO 8601, UTC), C{level} (C{debug} ... C{critical}),
    C{namespace} (the module or class that logged it), C{message} (the
    formatted text), and the event's own fields by name, each a JSON
    value (anything else as its C{str}).  A logged failure adds C{error}
    (its message) and C{traceback}.  Twisted's own keys (C{log_*}) are
    left out.
    """
    return FileLogObserver(out, _json_line)


def iso_time(seconds: float) -> str:
    """
    C{seconds} since the epoch in ISO 8601, UTC, to the microsecond:
    C{2026-12-07T23:10:00.123456Z}.
    """
    return datetime.datetime.fromtimestamp(
        seconds, datetime.timezone.utc).isoformat(
            timespec="microseconds").replace("+00:00", "Z")


def _json_line(event: LogEvent) -> str:
    line: dict[str, Any] = {
        "time": iso_time(event.get("log_time") or 0),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        line["error"] = failure.getErrorMessage()
        line["traceback"] = failure.getTraceback()
    for name, value in event.items():
        if name.startswith("log_") or name in line:
            continue
        line[name] = _json_value(value)
    return json.dumps(line, ensure_ascii=False) + "\n"


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    return str(value)


class RateLimitedWarning:
    """
    Log a warning at most once per C{interval} seconds.
    """

    def __init__(self, clock: IReactorTime, interval: float = 10.0,
                 log: Logger | None = None) -> None:
        """
        @param log: where the warnings go; by default a logger of the
            module that made this, so that they keep its namespace.
        """
        self._clock = clock
        self._interval = interval
        self._log = log if log is not None else Logger(
            namespace=sys._getframe(1).f_globals.get("__name__", "sslshare"))
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
