"""
What the SQL backends (L{sslshare.repository.sqlite} and
L{sslshare.repository.postgres}) share: one table, C{sslshare_sessions},
with the same columns in each one's own types,

    session_id   -- 32 bytes, the primary key
    sealed       -- the sealed state
    expires      -- unix time
    seq, digest  -- the checkpoint: 0 and empty before the first

and the same statements on it, in each driver's parameter style.

Every operation is one statement, and so atomic by itself: a take is
C{DELETE ... RETURNING} (of concurrent deletes of one row, one gets the
row and the others nothing), a checkpoint an C{UPDATE} whose C{WHERE}
compares the stored seq, and a put an upsert that keeps the checkpoint of
the blob it replaces.  A backend says how to connect and how to make the
table, and may run a statement or a take its own way (L{_execute},
L{_take_rows}).

This module never reads a blob beyond checking its length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import attrs

from sslshare.repository._base import (
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
# What a take reads, in this order.
_TAKEN_COLUMNS = "session_id, sealed, expires, seq, digest"


class Cursor(Protocol):
    """
    What the backends read from a statement's cursor.
    """

    @property
    def rowcount(self) -> int: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """
    What the backends need of a driver's connection.
    """

    def execute(self, query: str, params: Sequence[object], /) -> Cursor: ...

    def close(self) -> None: ...


@attrs.frozen
class Statements:
    """
    The statements on L{TABLE} in one driver's parameter style.
    """

    put: str
    take: str
    select_taken: str
    checkpoint: str
    checkpoint_of: str
    delete: str
    expire: str

    @classmethod
    def with_marker(cls, marker: str) -> Statements:
        """
        The statements with C{marker} for each parameter (C{?} for
        sqlite3, C{%s} for psycopg).
        """
        def sql(text: str) -> str:
            return text.format(table=TABLE, p=marker)

        return cls(
            put=sql("INSERT INTO {table} (session_id, sealed, expires) "
                    "VALUES ({p}, {p}, {p}) ON CONFLICT (session_id) DO "
                    "UPDATE SET sealed = EXCLUDED.sealed, "
                    "expires = EXCLUDED.expires"),
            take=sql("DELETE FROM {table} WHERE session_id = {p} "
                     "RETURNING " + _TAKEN_COLUMNS),
            select_taken=sql("SELECT " + _TAKEN_COLUMNS + " FROM {table} "
                             "WHERE session_id = {p}"),
            checkpoint=sql("UPDATE {table} SET seq = {p}, digest = {p} "
                           "WHERE session_id = {p} AND seq < {p} "
                           "AND expires > {p}"),
            checkpoint_of=sql("SELECT seq, digest, expires FROM {table} "
                              "WHERE session_id = {p}"),
            delete=sql("DELETE FROM {table} WHERE session_id = {p}"),
            expire=sql("DELETE FROM {table} WHERE expires <= {p}"))


def _expiry_problem(expires: object) -> str | None:
    if isinstance(expires, bool) or not isinstance(expires, (int, float)):
        return f"the expiry time is a {type(expires).__name__}"
    return None


C = TypeVar("C", bound=Connection)


class SQLRepository(ThreadedRepository[C]):
    """
    The operations of a repository on L{TABLE}; a backend gives its
    L{statements} and its connections, of type C{C}.
    """

    statements: Statements

    def _execute(self, connection: C, statement: str,
                 parameters: Sequence[object]) -> Cursor:
        """
        Run one statement (in a worker thread).
        """
        return connection.execute(statement, parameters)

    def _do_ping(self, connection: C) -> None:
        self._execute(connection, "SELECT 1", ()).fetchall()

    def _take_rows(self, connection: C,
                   session_id: bytes) -> list[Any]:
        """
        Delete the row of C{session_id} and return it, in one atomic step:
        the rows of L{Statements.take}.
        """
        # fetchall: the deletion completes only once the statement has run
        # to its end.
        return self._execute(connection, self.statements.take,
                             (session_id,)).fetchall()

    def _do_put(self, connection: C, session_id: bytes,
                sealed: bytes, expires: float, now: float) -> None:
        self._execute(connection, self.statements.put,
                      (session_id, sealed, expires))

    def _do_take(self, connection: C, session_id: bytes,
                 now: float) -> Outcome:
        rows = self._take_rows(connection, session_id)
        if not rows:
            return MISS
        found, sealed, expires, seq, digest = rows[0]
        sealed = as_bytes(sealed)
        # An expired row is deleted all the same: nobody may have it.
        problem = (id_problem(as_bytes(found), session_id)
                   or sealed_problem(sealed) or _expiry_problem(expires))
        if problem is not None:
            return Outcome("bad", problem)
        if expires <= now:
            return EXPIRED
        return taken_outcome(sealed, seq, as_bytes(digest), expires)

    def _do_checkpoint(self, connection: C, session_id: bytes,
                       seq: int, digest: bytes, now: float) -> bool:
        # One statement: the comparison and the update are one step
        # against concurrent checkpoints.
        cursor = self._execute(connection, self.statements.checkpoint,
                               (seq, digest, session_id, seq, now))
        return cursor.rowcount == 1

    def _do_checkpoint_of(self, connection: C, session_id: bytes,
                          now: float) -> Outcome:
        rows = self._execute(connection, self.statements.checkpoint_of,
                             (session_id,)).fetchall()
        if not rows:
            return MISS
        seq, digest, expires = rows[0]
        digest = as_bytes(digest)
        problem = (stored_checkpoint_problem(seq, digest)
                   or _expiry_problem(expires))
        if problem is not None:
            self._execute(connection, self.statements.delete, (session_id,))
            return Outcome("bad", problem)
        if expires <= now:
            return MISS
        return Outcome("hit", (seq, digest))

    def _do_purge(self, connection: C, session_id: bytes) -> bool:
        cursor = self._execute(connection, self.statements.delete,
                               (session_id,))
        return cursor.rowcount > 0

    def _do_expire(self, connection: C, now: float) -> int:
        cursor = self._execute(connection, self.statements.expire, (now,))
        return cursor.rowcount
