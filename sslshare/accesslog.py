"""
The access log (C{access_log}): one JSON object per client connection,
written when the connection ends, with the fields of L{FIELDS}, as HAProxy
and nginx log one line per connection.

A node writes it to a file of its own (L{AccessLogFile}) or through its own
log (L{AccessLogToNodeLog}, C{access_log = "-"}); with the access log off
there is no access log object at all, and a connection builds no entry.

The file is on the path of every connection, so entries wait in memory and
go out in one write per L{FLUSH_INTERVAL} (or once L{BUFFER_BYTES} are
waiting), and when the node stops.  L{AccessLogFile.reopen} (SIGUSR1 and
every reload) closes the file and opens its path again, as logrotate's
C{postrotate} expects: lines go to the new file from then on.

Nothing here knows of TLS or sessions: an entry is made of plain values
(L{sslshare.protocol.BackendProxy} gathers them).  No entry holds a secret
or a whole session id: C{session} is the owner part of the id only
(L{owner_part}).
"""

from __future__ import annotations

import json
import os
from typing import Union

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Interface, implementer

from sslshare import sessionid
from sslshare.errors import FileError

Value = Union[str, int, float, None]
Entry = dict[str, Value]

# Every field of an entry, in the order a line has them.
FIELDS = (
    "time",            # when the connection ended, ISO 8601, UTC
    "client_address",  # the client's IP address (a PROXY header's, if any)
    "client_port",     # its port
    "server_name",     # the SNI the client sent, or null
    "service",         # the virtual service ([[tls.service]] name)
    "tls_version",     # "TLSv1.2", "TLSv1.3"; null: no handshake
    "cipher",          # the cipher suite's OpenSSL name, or null
    "alpn",            # the ALPN protocol agreed, or null
    "resumed",         # "full", or where the session came from: one of
                       # recovery.LOOKUP_SOURCES but "miss"
    "lookup_ms",       # how long the handshake waited for it, or null
    "session",         # the owner part of the session id, in hex, or null
    "bytes_in",        # plaintext bytes from the client to the backend
    "bytes_out",       # plaintext bytes from the backend to the client
    "duration_ms",     # from the client's connection to its close
    "end",             # how it ended (ENDS)
    "reason",          # why, for handshake_failure and backend_unreachable
)

ENDS = (
    "client_close",         # the client closed (or went away) first
    "backend_close",        # the backend closed first
    "backend_unreachable",  # no backend connection could be made
    "handshake_failure",    # the TLS handshake failed (reason says why)
    "handshake_timeout",    # the handshake took longer than allowed
    "idle_timeout",         # silent both ways past idle_timeout_s
    "drain_timeout",        # still open when a stopping node's drain ended
)

# An entry in the node's log: the event's own time is the entry's (and
# "time" is a key of Twisted's legacy log events); the text is each field
# as name=value.
_NODE_LOG_FIELDS = tuple(name for name in FIELDS if name != "time")
TEXT_FORMAT = "access " + " ".join(f"{name}={{{name}}}"
                                   for name in _NODE_LOG_FIELDS)

FLUSH_INTERVAL = 1.0
BUFFER_BYTES = 64 * 1024
FILE_MODE = 0o600


def owner_part(session_id: bytes) -> str | None:
    """
    What an access log says of a session id: its format byte and owner
    tag in hex (the node that made it), never its random part; C{None}
    for an id that is not an sslshare one.
    """
    if not sessionid.is_session_id(session_id):
        return None
    return session_id[:1 + sessionid.OWNER_TAG_LENGTH].hex()


class IAccessLog(Interface):
    """
    Where a node's access log entries go.
    """

    def write(entry: Entry) -> None:
        """
        Log one connection: C{entry} has every name of L{FIELDS}.
        """

    def reopen() -> None:
        """
        Close what is written to and open it again (after a rotation).
        """


@implementer(IAccessLog)
class AccessLogToNodeLog:
    """
    Entries as events of the node's own log (C{access_log = "-"}), at
    info level in the namespace C{sslshare.access}: the fields by name
    (for C{log_format = "json"}), the text L{TEXT_FORMAT}; the event's
    time is the entry's.
    """

    def __init__(self) -> None:
        # An instance's own: a Logger on the class would take the class's
        # name as its namespace.
        self._log = Logger(namespace="sslshare.access")

    def write(self, entry: Entry) -> None:
        self._log.info(TEXT_FORMAT,
                       **{name: entry[name] for name in _NODE_LOG_FIELDS})

    def reopen(self) -> None:
        """
        Nothing to reopen: the node's log is twistd's.
        """


@implementer(IAccessLog)
class AccessLogFile(Service):
    """
    Entries as JSON lines appended to the file at C{path}, buffered: one
    write per L{FLUSH_INTERVAL} or L{BUFFER_BYTES}, and at stop.

    @raise FileError: the file cannot be opened for appending.
    """

    _log = Logger()

    def __init__(self, path: str, clock: IReactorTime) -> None:
        self.path = path
        self._waiting: list[bytes] = []
        self._waiting_bytes = 0
        # Opened now, so that a node that cannot write its access log does
        # not start.
        self._fd: int | None = self._open()
        self._flushing = LoopingCall(self.flush)
        self._flushing.clock = clock

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                           | os.O_CLOEXEC, FILE_MODE)
        except OSError as e:
            raise FileError(self.path, f"cannot open the access log: "
                                       f"{e.strerror}") from None

    def write(self, entry: Entry) -> None:
        line = json.dumps(entry, ensure_ascii=False).encode("utf-8") + b"\n"
        self._waiting.append(line)
        self._waiting_bytes += len(line)
        # A connection that ends while the node stops, after this service,
        # is written at once.
        if self._waiting_bytes >= BUFFER_BYTES or not self.running:
            self.flush()

    def flush(self) -> None:
        """
        Write the entries waiting, in one write.
        """
        if not self._waiting:
            return
        data = b"".join(self._waiting)
        self._waiting = []
        self._waiting_bytes = 0
        try:
            fd = self._fd if self._fd is not None else self._open()
            try:
                # A regular file takes a whole write, short of a full disk.
                os.write(fd, data)
            finally:
                if fd != self._fd:
                    os.close(fd)
        except (OSError, FileError) as e:
            self._log.error("access log {path}: {count} lines lost: {why}",
                            path=self.path, count=data.count(b"\n"),
                            why=getattr(e, "strerror", None) or str(e))

    def reopen(self) -> None:
        """
        Write what waits to the file open now, then open C{path} again: the
        file logrotate renamed keeps its lines, the new one gets the next.
        A path that cannot be opened keeps the old file, with an error.
        """
        self.flush()
        if self._fd is None:
            return
        try:
            fd = self._open()
        except FileError as e:
            self._log.error("{error}; writing on to the file open",
                            error=str(e))
            return
        os.close(self._fd)
        self._fd = fd

    def startService(self) -> None:
        super().startService()
        if self._fd is None:
            self._fd = self._open()
        self._flushing.start(FLUSH_INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()
        self._flushing.stop()
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
