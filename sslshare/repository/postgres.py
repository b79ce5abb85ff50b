"""
The session repository in PostgreSQL, through psycopg 3.

One table, made on first use (C{CREATE ... IF NOT EXISTS}, under an
advisory lock so that nodes starting together do not trip over each other;
made again if it disappears, for example behind a server rebuilt empty):

    CREATE TABLE sslshare_sessions (
        session_id bytea PRIMARY KEY,              -- 32 bytes
        sealed     bytea NOT NULL,                 -- the sealed state
        expires    double precision NOT NULL,      -- unix time
        seq        bigint NOT NULL DEFAULT 0,      -- checkpoint
        digest     bytea NOT NULL DEFAULT ''       -- checkpoint
    )

Atomic take: C{DELETE ... WHERE session_id = $1 RETURNING ...} is one
statement; of concurrent deletes of one row, the first locks it and the
others wait for its commit, then find the row gone.

Connections: psycopg's synchronous driver, one connection per worker thread
of the repository's pool (four by default), in autocommit mode, opened on
first use and opened again after it breaks.  psycopg_pool's
C{ConnectionPool} is not used: it reconnects in background threads with an
exponential backoff, and while its server is down every caller waits for
the pool's full timeout instead of failing at once; after the server
returns, the backoff delays recovery further.  A connection per worker
thread fails as fast as the server refuses, and recovers on the next call.

Options added to the connection string: C{connect_timeout} (unless it sets
one), C{password} from the password file, C{sslmode=require} when C{tls} is
set and the string asks for less (C{verify-ca} and C{verify-full} are kept;
name the CA with C{sslrootcert}), and C{statement_timeout} per session.
A server process that hangs without closing its sockets is not detected by
libpq; the caller's own timeout (the recovery budget) covers that case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import conninfo, errors

from sslshare.repository._base import (
    DEFAULT_THREADS,
    DEFAULT_TIMEOUT,
    RepositoryError,
)
from sslshare.repository.sql import TABLE, Cursor, SQLRepository, Statements

# pg_advisory_xact_lock key: "sslshare" in ASCII, as a bigint.
_SCHEMA_LOCK = int.from_bytes(b"sslshare", "big") & (2 ** 63 - 1)
_SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        session_id bytea PRIMARY KEY,
        sealed bytea NOT NULL,
        expires double precision NOT NULL,
        seq bigint NOT NULL DEFAULT 0,
        digest bytea NOT NULL DEFAULT ''::bytea
    )""",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_expires ON {TABLE} (expires)",
)
_STRONG_SSLMODES = ("require", "verify-ca", "verify-full")


class PostgresRepository(SQLRepository[psycopg.Connection[Any]]):
    """
    Sessions in the PostgreSQL database that C{dsn} (a libpq connection
    string or URI) names.

    @param password: the password, when it is kept outside C{dsn}.
    @param tls: insist on TLS (C{sslmode=require} at least).
    @param threads: worker threads, each with its own connection.
    @param timeout: seconds for connecting (at least 2: libpq's minimum)
        and for each statement.
    @raise RepositoryError: C{dsn} is not a connection string.
    """

    kind = "postgres"
    statements = Statements.with_marker("%s")

    def __init__(self, dsn: str, reactor: Any, *, password: str | None = None,
                 tls: bool = False, threads: int = DEFAULT_THREADS,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(reactor, threads=threads, timeout=timeout)
        try:
            given = conninfo.conninfo_to_dict(dsn)
        except psycopg.Error:
            # libpq's message may quote the string, password and all.
            raise RepositoryError("postgres: the dsn is not a libpq "
                                  "connection string or URI") from None
        extra: dict[str, Any] = {}
        if "connect_timeout" not in given:
            extra["connect_timeout"] = max(2, math.ceil(timeout))
        if "application_name" not in given:
            extra["application_name"] = "sslshare"
        if password is not None:
            extra["password"] = password
        if tls and given.get("sslmode") not in _STRONG_SSLMODES:
            extra["sslmode"] = "require"
        self._conninfo = conninfo.make_conninfo(dsn, **extra)
        self._target = self._name(conninfo.conninfo_to_dict(self._conninfo))
        self._schema_ready = False

    @staticmethod
    def _name(parameters: dict[str, Any]) -> str:
        host = parameters.get("host") or parameters.get("hostaddr") or "local"
        port = parameters.get("port") or "5432"
        database = parameters.get("dbname") or parameters.get("user") or ""
        return f"{host}:{port}/{database}"

    def describe(self) -> str:
        return f"postgres {self._target}"

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        return (psycopg.Error,)

    def _is_broken(self, connection: psycopg.Connection[Any],
                   error: BaseException) -> bool:
        # A statement that failed (a timeout, a constraint) leaves an
        # autocommit connection usable; a lost server does not.
        return connection.closed

    def _connect(self) -> psycopg.Connection[Any]:
        connection = psycopg.connect(self._conninfo, autocommit=True)
        try:
            connection.execute(
                "SELECT set_config('statement_timeout', %s, false)",
                (f"{max(1, round(self.timeout * 1000))}ms",))
        except psycopg.Error:
            connection.close()
            raise
        return connection

    def _create_schema(self, connection: psycopg.Connection[Any]) -> None:
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)",
                               (_SCHEMA_LOCK,))
            for statement in _SCHEMA:
                connection.execute(statement)
        self._schema_ready = True

    def _do_start(self, connection: psycopg.Connection[Any]) -> None:
        self._create_schema(connection)

    def _execute(self, connection: psycopg.Connection[Any], statement: str,
                 parameters: Sequence[object]) -> Cursor:
        # Once the table exists; one that turns out to be gone is made
        # again, and the statement run once more.
        if not self._schema_ready:
            self._create_schema(connection)
        try:
            return connection.execute(statement, parameters)
        except errors.UndefinedTable:
            self._schema_ready = False
            self._create_schema(connection)
            return connection.execute(statement, parameters)
