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

This module never reads a blob beyond checking its length.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from typing import Any

from sslshare.repository import (
    EXPIRED,
    MISS,
    Outcome,
    ThreadedRepository,
    as_bytes,
    id_problem,
    sealed_problem,
    stored_checkpoint_problem,
    taken_outcome,
)

TABLE = "sslshare_sessions"
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


def _row_problem(session_id: bytes, row: tuple[Any, ...]) -> str | None:
    found, sealed, expires = row
    problem = id_problem(as_bytes(found), session_id) or sealed_problem(
        as_bytes(sealed))
    if problem is None and (isinstance(expires, bool)
                            or not isinstance(expires, (int, float))):
        problem = f"the expiry time is a {type(expires).__name__}"
    return problem


class SQLiteRepository(ThreadedRepository):
    """
    Sessions in the SQLite file at C{path} (made if missing; its directory
    must exist).

    @param threads: worker threads, each with its own connection.
    @param timeout: seconds a statement waits for a lock on the file.
    @ivar returning: whether takes use C{DELETE ... RETURNING} (else a
        C{BEGIN IMMEDIATE} transaction).
    """

    kind = "sqlite"

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

    def _is_broken(self, connection: Any, error: BaseException) -> bool:
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

    def _do_put(self, connection: sqlite3.Connection, session_id: bytes,
                sealed: bytes, expires: float, now: float) -> None:
        # The upsert keeps the checkpoint of a blob it replaces.
        connection.execute(
            f"INSERT INTO {TABLE} (session_id, sealed, expires) "
            f"VALUES (?, ?, ?) ON CONFLICT (session_id) DO UPDATE SET "
            f"sealed = excluded.sealed, expires = excluded.expires",
            (session_id, sealed, expires))

    def _do_take(self, connection: sqlite3.Connection, session_id: bytes,
                 now: float) -> Outcome:
        if self.returning:
            # fetchall: the deletion completes only once the statement has
            # run to its end.
            rows = connection.execute(
                f"DELETE FROM {TABLE} WHERE session_id = ? "
                f"RETURNING session_id, sealed, expires, seq, digest",
                (session_id,)).fetchall()
        else:
            rows = self._take_in_transaction(connection, session_id)
        if not rows:
            return MISS
        # An expired row is deleted all the same: nobody may have it.
        problem = _row_problem(session_id, rows[0][:3])
        if problem is not None:
            return Outcome("bad", problem)
        _, sealed, expires, seq, digest = rows[0]
        if expires <= now:
            return EXPIRED
        return taken_outcome(as_bytes(sealed), seq, as_bytes(digest), expires)

    @staticmethod
    def _take_in_transaction(connection: sqlite3.Connection,
                             session_id: bytes) -> list[Any]:
        # IMMEDIATE takes the write lock before the read: no other writer
        # can read the row between our read and our delete.
        connection.execute("BEGIN IMMEDIATE")
        try:
            rows = connection.execute(
                f"SELECT session_id, sealed, expires, seq, digest "
                f"FROM {TABLE} WHERE session_id = ?", (session_id,)).fetchall()
            if rows:
                connection.execute(
                    f"DELETE FROM {TABLE} WHERE session_id = ?", (session_id,))
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return rows

    def _do_checkpoint(self, connection: sqlite3.Connection,
                       session_id: bytes, seq: int, digest: bytes,
                       now: float) -> bool:
        # One statement: the comparison and the update are one step.
        cursor = connection.execute(
            f"UPDATE {TABLE} SET seq = ?, digest = ? "
            f"WHERE session_id = ? AND seq < ? AND expires > ?",
            (seq, digest, session_id, seq, now))
        return cursor.rowcount == 1

    def _do_checkpoint_of(self, connection: sqlite3.Connection,
                          session_id: bytes, now: float) -> Outcome:
        rows = connection.execute(
            f"SELECT seq, digest, expires FROM {TABLE} WHERE session_id = ?",
            (session_id,)).fetchall()
        if not rows:
            return MISS
        seq, digest, expires = rows[0]
        digest = as_bytes(digest)
        problem = stored_checkpoint_problem(seq, digest)
        if problem is None and (isinstance(expires, bool)
                                or not isinstance(expires, (int, float))):
            problem = f"the expiry time is a {type(expires).__name__}"
        if problem is not None:
            connection.execute(f"DELETE FROM {TABLE} WHERE session_id = ?",
                               (session_id,))
            return Outcome("bad", problem)
        if expires <= now:
            return MISS
        return Outcome("hit", (seq, digest))

    def _do_purge(self, connection: sqlite3.Connection,
                  session_id: bytes) -> bool:
        cursor = connection.execute(
            f"DELETE FROM {TABLE} WHERE session_id = ?", (session_id,))
        return cursor.rowcount > 0

    def _do_expire(self, connection: sqlite3.Connection, now: float) -> int:
        cursor = connection.execute(
            f"DELETE FROM {TABLE} WHERE expires <= ?", (now,))
        return cursor.rowcount
