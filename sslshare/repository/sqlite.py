"""
The embedded session repository: one SQLite file, no server.

The default repository of a node (C{<state_dir>/sessions.sqlite3}), and a
shared one for nodes on one machine: several processes may open the same
file.  The table:

    CREATE TABLE sslshare_sessions (
        session_id BLOB PRIMARY KEY,     -- 32 bytes
        sealed     BLOB NOT NULL,        -- the sealed state
        expires    REAL NOT NULL,        -- unix time
        seq        INTEGER NOT NULL DEFAULT 0,     -- checkpoint
        digest     BLOB NOT NULL DEFAULT x''       -- checkpoint
    ) WITHOUT ROWID

Threads and connections: each worker thread of the repository's pool (two
by default) opens its own connection, on first use, so that a read never
waits behind another thread's statement; SQLite serializes the writers of
one file itself.  The file is in WAL mode (readers do not block the writer)
with C{synchronous=NORMAL}: a committed change survives a crash of the
process, and at worst the last ones are lost on a power failure, which for
a cache of resumable sessions only means some full handshakes.  A writer
that finds the file locked by another connection waits up to the
repository's timeout (SQLite's busy timeout), then fails.

Files: the database file and the C{-wal}, C{-shm} and C{-journal} files
beside it are mode 0600.  The node makes the database file before SQLite
opens it, and SQLite gives the files it makes beside it the mode of the
database file, so none of them is ever readable by anyone else, whatever
the umask; a file an earlier run left laxer is made 0600 too.

Atomic take: C{DELETE ... RETURNING} (SQLite 3.35 and later) is one
statement, so one writer deletes the row and gets it, and every other finds
nothing.  With an older SQLite the same is done in a C{BEGIN IMMEDIATE}
transaction, which takes the write lock before it reads.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from typing import Any

from sslshare.repository.sql import TABLE, SQLRepository, Statements

# DELETE ... RETURNING arrived in SQLite 3.35.0.
HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)
FILE_MODE = 0o600
# The files SQLite keeps beside the database, named by suffix.
_COMPANIONS = ("-wal", "-shm", "-journal")

_SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        session_id BLOB PRIMARY KEY,
        sealed BLOB NOT NULL,
        expires REAL NOT NULL,
        seq INTEGER NOT NULL DEFAULT 0,
        digest BLOB NOT NULL DEFAULT x''
    ) WITHOUT ROWID""",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_expires ON {TABLE} (expires)",
)


def _make_private(path: str) -> None:
    """
    Make the database file at C{path} if missing, mode L{FILE_MODE}, and
    give that mode to it and its companions where they have another.

    @raise sqlite3.OperationalError: a file cannot be made or changed.
    """
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         FILE_MODE))
        for name in (path, *(path + suffix for suffix in _COMPANIONS)):
            try:
                mode = stat.S_IMODE(os.stat(name).st_mode)
            except FileNotFoundError:
                continue
            if mode != FILE_MODE:
                os.chmod(name, FILE_MODE)
    except OSError as e:
        raise sqlite3.OperationalError(
            f"cannot make {e.filename} mode {FILE_MODE:04o}: "
            f"{e.strerror}") from None


class SQLiteRepository(SQLRepository[sqlite3.Connection]):
    """
    Sessions in the SQLite file at C{path} (made if missing; its directory
    must exist).

    @param threads: worker threads, each with its own connection.
    @param timeout: seconds a statement waits for a lock on the file.
    @ivar returning: whether takes use C{DELETE ... RETURNING} (else a
        C{BEGIN IMMEDIATE} transaction).
    """

    kind = "sqlite"
    statements = Statements.with_marker("?")

    def __init__(self, path: str, reactor: Any, *, threads: int = 2,
                 timeout: float = 2.0) -> None:
        super().__init__(reactor, threads=threads, timeout=timeout)
        self.path = path
        self.returning = HAS_RETURNING

    def describe(self) -> str:
        return f"sqlite {self.path}"

    def _start_must_succeed(self) -> bool:
        # A file that cannot be opened now will not open later either.
        return True

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    def _is_broken(self, connection: sqlite3.Connection,
                   error: BaseException) -> bool:
        # An SQLite connection survives its errors (a busy file, a full
        # disk); only a closed one must go.
        return isinstance(error, sqlite3.ProgrammingError)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: autocommit; each statement is its own
        # transaction unless a BEGIN says otherwise.  check_same_thread is
        # off only so that close() may close the connections of threads
        # that have ended; each is used by its own thread alone.
        _make_private(self.path)
        connection = sqlite3.connect(self.path, timeout=self.timeout,
                                     isolation_level=None,
                                     check_same_thread=False)
        try:
            connection.execute("PRAGMA journal_mode=WAL").fetchall()
            connection.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error:
            connection.close()
            raise
        return connection

    def _do_start(self, connection: sqlite3.Connection) -> None:
        for statement in _SCHEMA:
            connection.execute(statement)

    def _take_rows(self, connection: sqlite3.Connection,
                   session_id: bytes) -> list[Any]:
        if self.returning:
            return super()._take_rows(connection, session_id)
        # IMMEDIATE takes the write lock before the read: no other writer
        # can read the row between our read and our delete.
        self._execute(connection, "BEGIN IMMEDIATE", ())
        try:
            rows = self._execute(connection, self.statements.select_taken,
                                 (session_id,)).fetchall()
            if rows:
                self._execute(connection, self.statements.delete,
                              (session_id,))
            self._execute(connection, "COMMIT", ())
        except BaseException:
            self._execute(connection, "ROLLBACK", ())
            raise
        return rows
