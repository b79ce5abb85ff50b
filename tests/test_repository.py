"""
The central session repository (L{sslshare.repository}) against real
storage: an SQLite file in a temporary directory, and a C{redis-server} and
a PostgreSQL cluster started by the tests
(L{tests.support.databases.shared_server} shares one of each per test
process; the tests that stop a server start one of their own).  A test
whose driver or server is not installed is skipped, and says which and how
to install it (L{tests.support.databases.skip_without}).

L{RepositoryBehaviour} holds what every backend must do; one subclass per
backend says how to make a repository and how to reach under it to its
storage (to write the malformed rows that a repository must survive).
"""

from __future__ import annotations

import os
import random
import sqlite3
import time

import attrs
from twisted.internet import reactor
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from sslshare.config import RepositoryConfig
from sslshare.dev.throwaway import PostgresServer
from sslshare.repository import (
    InOrder,
    ISessionRepository,
    RepositoryError,
    Taken,
    from_config,
)
from sslshare.state import (
    MAX_SEALED_LENGTH,
    SEALED_CHECKPOINT_LENGTH,
    StateKeys,
)
from tests.support.databases import (
    shared_redis_group,
    shared_server,
    skip_without,
    throwaway_server,
)
from tests.support.files import file_mode, umask_for_test
from tests.support.pki import pki
from tests.support.sessions import session_id_of, session_state
from tests.support.waiting import until

# Long enough to take a blob before it expires, short enough to wait out.
SHORT_LIFETIME = 0.15
# An operation on a repository whose server is gone must fail within this
# many seconds (the driver timeouts are 2 s); it fails in milliseconds.
FAILS_WITHIN = 5.0


def blob(size=200):
    return os.urandom(size)


def later(seconds):
    return deferLater(reactor, seconds, lambda: None)


class RepositoryBehaviour:
    """
    Tests every backend passes.  A subclass provides L{make} (a repository
    not yet started), L{raw_put} and L{raw_exists} (direct access to the
    storage, blocking), L{clear}, and C{expires_by_itself} (whether the
    storage drops expired rows without C{expire()}).
    """

    expires_by_itself = False

    def make(self, **options):
        raise NotImplementedError

    def raw_put(self, session_id, sealed, expires, seq=0, digest=b""):
        raise NotImplementedError

    def raw_exists(self, session_id):
        raise NotImplementedError

    def clear(self):
        raise NotImplementedError

    @inlineCallbacks
    def setUp(self):
        self.clear()
        self.repository = yield self.started(self.make())

    @inlineCallbacks
    def started(self, repository):
        yield repository.start()
        self.addCleanup(repository.close)
        return repository

    def expires(self, lifetime=60.0):
        return reactor.seconds() + lifetime

    def test_provides_the_interface(self):
        self.assertTrue(verifyObject(ISessionRepository, self.repository))

    @inlineCallbacks
    def test_ping_answers_and_changes_nothing(self):
        before = dict(self.repository.counters)
        yield self.repository.ping()
        self.assertEqual(dict(self.repository.counters), before)

    @inlineCallbacks
    def test_taken_blob_opens_to_the_state_put(self):
        keys = StateKeys([StateKeys.generate()])
        state = session_state()
        yield self.repository.put(state.session_id, keys.seal(state),
                                  self.expires())
        taken = yield self.repository.take(state.session_id)
        self.assertEqual(
            keys.open(taken.sealed, state.session_id, state.id_context), state)

    @inlineCallbacks
    def test_blob_is_taken_once(self):
        session_id, sealed = session_id_of(), blob()
        yield self.repository.put(session_id, sealed, self.expires())
        self.assertEqual((yield self.repository.take(session_id)),
                         Taken(sealed))
        self.assertIsNone((yield self.repository.take(session_id)))
        self.assertFalse(self.raw_exists(session_id))

    @inlineCallbacks
    def test_take_of_unknown_session_is_none(self):
        self.assertIsNone((yield self.repository.take(session_id_of())))

    @inlineCallbacks
    def test_largest_blob_round_trips(self):
        session_id, sealed = session_id_of(), blob(MAX_SEALED_LENGTH)
        yield self.repository.put(session_id, sealed, self.expires())
        self.assertEqual((yield self.repository.take(session_id)),
                         Taken(sealed))

    @inlineCallbacks
    def test_put_replaces_the_blob_and_keeps_the_checkpoint(self):
        session_id = session_id_of()
        digest = os.urandom(SEALED_CHECKPOINT_LENGTH)
        yield self.repository.put(session_id, blob(), self.expires())
        yield self.repository.checkpoint(session_id, 7, digest)
        newer = blob()
        yield self.repository.put(session_id, newer, self.expires())
        self.assertEqual((yield self.repository.checkpoint_of(session_id)),
                         (7, digest))
        self.assertEqual((yield self.repository.take(session_id)),
                         Taken(newer, 7, digest))

    @inlineCallbacks
    def test_take_gets_the_newest_checkpoint_beside_the_blob(self):
        session_id, sealed = session_id_of(), blob()
        digest = os.urandom(SEALED_CHECKPOINT_LENGTH)
        yield self.repository.put(session_id, sealed, self.expires())
        yield self.repository.checkpoint(session_id, 5, digest)
        self.assertEqual((yield self.repository.take(session_id)),
                         Taken(sealed, 5, digest))

    @inlineCallbacks
    def test_take_right_after_a_put_finds_the_blob(self):
        # Worker threads run operations at once: those of one session must
        # still run in the order a node asked for them.
        repository = yield self.started(self.make(threads=4))
        for _ in range(20):
            session_id, sealed = session_id_of(), blob()
            putting = repository.put(session_id, sealed, self.expires())
            checkpointing = repository.checkpoint(session_id, 1, b"")
            taken = yield repository.take(session_id)
            self.assertEqual(taken, Taken(sealed, 1, b""))
            yield gatherResults([putting, checkpointing])

    @inlineCallbacks
    def test_of_fifty_concurrent_takes_exactly_one_gets_the_blob(self):
        # Two repositories on one storage, like two nodes, each with its
        # own worker threads and connections, race for each session.
        other = yield self.started(self.make(threads=4))
        racers = [self.repository, other]
        for _ in range(3):
            session_id, sealed = session_id_of(), blob()
            yield self.repository.put(session_id, sealed, self.expires())
            results = yield gatherResults(
                [racers[i % 2].take(session_id) for i in range(50)])
            winners = [r for r in results if r is not None]
            self.assertEqual(winners, [Taken(sealed)])

    @inlineCallbacks
    def test_expired_blob_is_never_served(self):
        session_id = session_id_of()
        yield self.repository.put(session_id, blob(),
                                  self.expires(SHORT_LIFETIME))
        yield later(SHORT_LIFETIME + 0.05)
        self.assertIsNone((yield self.repository.take(session_id)))
        self.assertEqual(self.repository.counters["hits"], 0)

    @inlineCallbacks
    def test_blob_put_already_expired_is_never_served(self):
        session_id = session_id_of()
        yield self.repository.put(session_id, blob(), self.expires(-1))
        self.assertIsNone((yield self.repository.take(session_id)))

    @inlineCallbacks
    def test_expire_removes_expired_blobs_only(self):
        old, live = session_id_of(), session_id_of()
        yield self.repository.put(old, blob(), self.expires(SHORT_LIFETIME))
        yield self.repository.put(live, blob(), self.expires())
        yield later(SHORT_LIFETIME + 0.05)
        removed = yield self.repository.expire()
        self.assertEqual(removed, 0 if self.expires_by_itself else 1)
        self.assertFalse(self.raw_exists(old))
        self.assertTrue(self.raw_exists(live))
        self.assertIsNotNone((yield self.repository.take(live)))

    @inlineCallbacks
    def test_checkpoint_of_a_fresh_blob_is_zero(self):
        session_id = session_id_of()
        yield self.repository.put(session_id, blob(), self.expires())
        self.assertEqual((yield self.repository.checkpoint_of(session_id)),
                         (0, b""))

    @inlineCallbacks
    def test_only_a_higher_checkpoint_wins(self):
        session_id = session_id_of()
        d5, d3, other5, d6 = (os.urandom(SEALED_CHECKPOINT_LENGTH) for _ in range(4))
        yield self.repository.put(session_id, blob(), self.expires())
        self.assertTrue((yield self.repository.checkpoint(session_id, 5, d5)))
        self.assertFalse((yield self.repository.checkpoint(session_id, 3, d3)))
        self.assertFalse(
            (yield self.repository.checkpoint(session_id, 5, other5)))
        self.assertEqual((yield self.repository.checkpoint_of(session_id)),
                         (5, d5))
        self.assertTrue((yield self.repository.checkpoint(session_id, 6, d6)))
        self.assertEqual((yield self.repository.checkpoint_of(session_id)),
                         (6, d6))
        self.assertEqual(self.repository.counters["checkpoints"], 2)
        self.assertEqual(self.repository.counters["stale_checkpoints"], 2)

    @inlineCallbacks
    def test_concurrent_checkpoints_end_at_the_highest(self):
        session_id = session_id_of()
        yield self.repository.put(session_id, blob(), self.expires())
        digests = {seq: os.urandom(SEALED_CHECKPOINT_LENGTH) for seq in range(1, 41)}
        order = list(digests)
        random.shuffle(order)
        yield gatherResults([self.repository.checkpoint(session_id, seq,
                                                        digests[seq])
                             for seq in order])
        self.assertEqual((yield self.repository.checkpoint_of(session_id)),
                         (40, digests[40]))

    @inlineCallbacks
    def test_largest_seq_is_compared_exactly(self):
        session_id, top = session_id_of(), 2 ** 63 - 1
        yield self.repository.put(session_id, blob(), self.expires())
        self.assertTrue(
            (yield self.repository.checkpoint(session_id, top - 1, b"")))
        self.assertTrue((yield self.repository.checkpoint(session_id, top, b"")))
        self.assertFalse(
            (yield self.repository.checkpoint(session_id, top - 1, b"")))
        self.assertEqual((yield self.repository.checkpoint_of(session_id)),
                         (top, b""))

    @inlineCallbacks
    def test_checkpoint_without_a_blob_is_refused(self):
        session_id = session_id_of()
        self.assertFalse(
            (yield self.repository.checkpoint(session_id, 1, os.urandom(SEALED_CHECKPOINT_LENGTH))))
        self.assertIsNone((yield self.repository.checkpoint_of(session_id)))

    @inlineCallbacks
    def test_checkpoint_of_an_expired_blob_is_refused(self):
        session_id = session_id_of()
        yield self.repository.put(session_id, blob(),
                                  self.expires(SHORT_LIFETIME))
        yield later(SHORT_LIFETIME + 0.05)
        self.assertFalse((yield self.repository.checkpoint(session_id, 1, b"")))
        self.assertIsNone((yield self.repository.checkpoint_of(session_id)))

    @inlineCallbacks
    def test_purge_removes_the_blob_once(self):
        session_id = session_id_of()
        yield self.repository.put(session_id, blob(), self.expires())
        self.assertTrue((yield self.repository.purge(session_id)))
        self.assertFalse((yield self.repository.purge(session_id)))
        self.assertIsNone((yield self.repository.take(session_id)))
        self.assertEqual(self.repository.counters["purges"], 1)

    @inlineCallbacks
    def test_oversized_blob_in_storage_is_discarded_and_counted(self):
        session_id = session_id_of()
        self.raw_put(session_id, blob(MAX_SEALED_LENGTH + 1), self.expires())
        self.assertIsNone((yield self.repository.take(session_id)))
        self.assertEqual(self.repository.counters["bad_rows"], 1)
        self.assertFalse(self.raw_exists(session_id))

    @inlineCallbacks
    def test_empty_blob_in_storage_is_discarded_and_counted(self):
        session_id = session_id_of()
        self.raw_put(session_id, b"", self.expires())
        self.assertIsNone((yield self.repository.take(session_id)))
        self.assertEqual(self.repository.counters["bad_rows"], 1)

    @inlineCallbacks
    def test_bad_digest_in_storage_is_discarded_by_a_take(self):
        session_id = session_id_of()
        self.raw_put(session_id, blob(), self.expires(), seq=3,
                     digest=b"short")
        self.assertIsNone((yield self.repository.take(session_id)))
        self.assertEqual(self.repository.counters["bad_rows"], 1)
        self.assertFalse(self.raw_exists(session_id))

    @inlineCallbacks
    def test_bad_digest_in_storage_is_discarded_and_counted(self):
        session_id = session_id_of()
        self.raw_put(session_id, blob(), self.expires(), seq=3,
                     digest=b"short")
        self.assertIsNone((yield self.repository.checkpoint_of(session_id)))
        self.assertEqual(self.repository.counters["bad_rows"], 1)
        self.assertFalse(self.raw_exists(session_id))

    @inlineCallbacks
    def test_counters_count_takes_hits_and_misses(self):
        session_id = session_id_of()
        yield self.repository.put(session_id, blob(), self.expires())
        yield self.repository.take(session_id)
        yield self.repository.take(session_id)
        counters = self.repository.counters
        self.assertEqual((counters["puts"], counters["takes"], counters["hits"],
                          counters["misses"], counters["errors"]),
                         (1, 2, 1, 1, 0))

    def test_session_id_of_another_length_is_refused(self):
        failure = self.failureResultOf(self.repository.take(b"x" * 31))
        failure.trap(ValueError)
        self.assertIn("32 bytes, not 31", failure.getErrorMessage())

    def test_blob_over_the_bound_is_refused(self):
        failure = self.failureResultOf(self.repository.put(
            session_id_of(), blob(MAX_SEALED_LENGTH + 1), self.expires()))
        failure.trap(ValueError)

    def test_digest_of_another_length_is_refused(self):
        failure = self.failureResultOf(
            self.repository.checkpoint(session_id_of(), 1, b"x" * 31))
        failure.trap(ValueError)

    def test_negative_seq_is_refused(self):
        failure = self.failureResultOf(
            self.repository.checkpoint(session_id_of(), -1, b""))
        failure.trap(ValueError)


class ServerOutageBehaviour:
    """
    Tests for a backend with a server: a server that dies fails calls at
    once, and a server that comes back is used again by the same
    repository.  A subclass provides L{own_server} (a started server of the
    test's own) and L{make_for} (a repository of that server).
    """

    def own_server(self):
        raise NotImplementedError

    def make_for(self, server):
        raise NotImplementedError

    @inlineCallbacks
    def test_operations_fail_quickly_while_the_server_is_down(self):
        server = self.own_server()
        repository = yield self.started(self.make_for(server))
        yield repository.put(session_id_of(), blob(), self.expires())
        server.stop()
        for call in [lambda: repository.take(session_id_of()),
                     lambda: repository.put(session_id_of(), blob(),
                                            self.expires()),
                     lambda: repository.checkpoint(session_id_of(), 1, b"")]:
            began = time.monotonic()
            attempt = call()
            attempt.addTimeout(FAILS_WITHIN, reactor)
            yield self.assertFailure(attempt, RepositoryError)
            self.assertLess(time.monotonic() - began, FAILS_WITHIN)
        self.assertEqual(repository.counters["errors"], 3)

    @inlineCallbacks
    def test_repository_works_again_once_the_server_is_back(self):
        server = self.own_server()
        repository = yield self.started(self.make_for(server))
        # Connections from every worker thread, all broken by the restart.
        yield gatherResults([repository.take(session_id_of())
                             for _ in range(8)])
        server.stop()
        yield self.assertFailure(repository.take(session_id_of()),
                                 RepositoryError)
        server.start()
        session_id, sealed = session_id_of(), blob()
        yield repository.put(session_id, sealed, self.expires())
        self.assertEqual((yield repository.take(session_id)),
                         Taken(sealed))
        results = yield gatherResults(
            [repository.take(session_id_of()) for _ in range(8)])
        self.assertEqual(results, [None] * 8)

    @inlineCallbacks
    def test_ping_fails_while_the_server_is_down(self):
        server = self.own_server()
        repository = yield self.started(self.make_for(server))
        yield repository.ping()
        server.stop()
        yield self.assertFailure(repository.ping(), RepositoryError)

    @inlineCallbacks
    def test_start_with_the_server_down_succeeds_and_calls_fail(self):
        # A node may start while its repository is down; it must run.
        server = self.own_server()
        server.stop()
        repository = yield self.started(self.make_for(server))
        yield self.assertFailure(repository.take(session_id_of()),
                                 RepositoryError)


class SQLiteRepositoryTests(RepositoryBehaviour, TestCase):
    """
    The embedded backend, on a file in the test's temporary directory.
    """

    def make(self, **options):
        from sslshare.repository.sqlite import SQLiteRepository

        return SQLiteRepository(self.path, reactor, **options)

    def clear(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.path = os.path.join(directory, "sessions.sqlite3")

    def _raw(self):
        connection = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(connection.close)
        return connection

    def raw_put(self, session_id, sealed, expires, seq=0, digest=b""):
        self._raw().execute(
            "INSERT INTO sslshare_sessions VALUES (?, ?, ?, ?, ?)",
            (session_id, sealed, expires, seq, digest))

    def raw_exists(self, session_id):
        return bool(self._raw().execute(
            "SELECT 1 FROM sslshare_sessions WHERE session_id = ?",
            (session_id,)).fetchall())

    def test_file_is_in_wal_mode(self):
        mode = self._raw().execute("PRAGMA journal_mode").fetchone()[0]
        self.assertEqual(mode, "wal")

    @inlineCallbacks
    def test_take_in_a_transaction_is_atomic_too(self):
        # The path for SQLite before 3.35, which has no DELETE ... RETURNING.
        racers = []
        for _ in range(2):
            racer = self.make(threads=4)
            racer.returning = False
            racers.append((yield self.started(racer)))
        session_id, sealed = session_id_of(), blob()
        yield racers[0].put(session_id, sealed, self.expires())
        results = yield gatherResults(
            [racers[i % 2].take(session_id) for i in range(50)])
        self.assertEqual([r for r in results if r is not None],
                         [Taken(sealed)])

    @inlineCallbacks
    def test_text_where_a_blob_belongs_is_discarded_and_counted(self):
        session_id = session_id_of()
        self.raw_put(session_id, "not bytes", self.expires())
        self.assertIsNone((yield self.repository.take(session_id)))
        self.assertEqual(self.repository.counters["bad_rows"], 1)

    @inlineCallbacks
    def test_file_that_cannot_be_made_fails_start_naming_it(self):
        from sslshare.repository.sqlite import SQLiteRepository

        path = os.path.join(self.path + ".missing", "sessions.sqlite3")
        repository = SQLiteRepository(path, reactor)
        failure = yield self.assertFailure(repository.start(), RepositoryError)
        self.assertIn(path, str(failure))
        # A failed start leaves nothing running; close is harmless.
        yield repository.close()

    @inlineCallbacks
    def test_file_and_its_companions_are_mode_0600_whatever_the_umask(self):
        from sslshare.repository.sqlite import SQLiteRepository

        umask_for_test(self, 0)
        path = os.path.join(os.path.dirname(self.path), "new.sqlite3")
        repository = yield self.started(SQLiteRepository(path, reactor))
        yield repository.put(session_id_of(), blob(), self.expires())
        # In WAL mode the -wal and -shm files stay while connections are
        # open.
        self.assertEqual(
            [file_mode(path + suffix) for suffix in ("", "-wal", "-shm")],
            [0o600] * 3)

    @inlineCallbacks
    def test_files_an_earlier_run_left_readable_are_made_0600(self):
        from sslshare.repository.sqlite import SQLiteRepository

        yield self.repository.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            with open(self.path + suffix, "ab"):
                pass
            os.chmod(self.path + suffix, 0o644)
        yield self.started(SQLiteRepository(self.path, reactor))
        self.assertEqual(
            [file_mode(self.path + suffix)
             for suffix in ("", "-wal", "-shm", "-journal")],
            [0o600] * 4)

    @inlineCallbacks
    def test_config_without_a_path_uses_the_state_directory(self):
        state_dir = os.path.dirname(self.path)
        repository = from_config(RepositoryConfig(kind="sqlite"), reactor,
                                 state_dir)
        yield self.started(repository)
        self.assertEqual(repository.path,
                         os.path.join(state_dir, "sessions.sqlite3"))
        self.assertTrue(os.path.exists(repository.path))


class RedisRepositoryTests(RepositoryBehaviour, ServerOutageBehaviour,
                           TestCase):
    """
    The Redis backend, on a C{redis-server} shared by the module.
    """

    expires_by_itself = True

    def make(self, **options):
        from sslshare.repository.redis import RedisRepository

        return RedisRepository(self.server.url, reactor, **options)

    def clear(self):
        self.server = shared_server("redis")
        import redis

        self.client = redis.Redis.from_url(self.server.url)
        self.addCleanup(self.client.close)
        self.client.flushdb()

    def raw_put(self, session_id, sealed, expires, seq=0, digest=b""):
        from sslshare.repository.redis import key

        self.client.hset(key(session_id), mapping={
            "sealed": sealed, "seq": b"%020d" % seq, "digest": digest})
        self.client.pexpire(key(session_id),
                            int((expires - reactor.seconds()) * 1000))

    def raw_exists(self, session_id):
        from sslshare.repository.redis import key

        return self.client.exists(key(session_id)) == 1

    def own_server(self):
        return throwaway_server(self, "redis").start()

    def make_for(self, server, **options):
        from sslshare.repository.redis import RedisRepository

        return RedisRepository(server.url, reactor, **options)

    @inlineCallbacks
    def test_key_of_another_type_is_discarded_and_counted(self):
        from sslshare.repository.redis import key

        session_id = session_id_of()
        self.client.set(key(session_id), b"a string, not a hash")
        self.assertIsNone((yield self.repository.take(session_id)))
        self.assertEqual(self.repository.counters["bad_rows"], 1)
        self.assertFalse(self.raw_exists(session_id))

    @inlineCallbacks
    def test_key_lives_as_long_as_the_session(self):
        from sslshare.repository.redis import key

        session_id = session_id_of()
        yield self.repository.put(session_id, blob(), self.expires(30))
        self.assertApproximates(self.client.pttl(key(session_id)), 30000, 1000)

    @inlineCallbacks
    def test_password_from_the_password_file_is_used(self):
        server = throwaway_server(self, "redis", password="s3cret pass").start()
        password_file = self.mktemp()
        with open(password_file, "w") as f:
            f.write("s3cret pass\n")
        repository = yield self.started(from_config(
            RepositoryConfig(kind="redis", url=server.url,
                             password_file=password_file), reactor, "."))
        session_id, sealed = session_id_of(), blob()
        yield repository.put(session_id, sealed, self.expires())
        self.assertEqual((yield repository.take(session_id)),
                         Taken(sealed))

    @inlineCallbacks
    def test_missing_password_fails_calls_naming_the_server(self):
        server = throwaway_server(self, "redis", password="s3cret pass").start()
        repository = yield self.started(self.make_for(server))
        failure = yield self.assertFailure(repository.take(session_id_of()),
                                           RepositoryError)
        self.assertIn(f"redis redis://127.0.0.1:{server.port}/0: take:",
                      str(failure))

    @inlineCallbacks
    def test_tls_connects_to_a_tls_server(self):
        server = throwaway_server(self, "redis", tls=pki()).start()
        # A redis:// URL with tls set becomes rediss://; the test CA is
        # named in the URL, as a deployment with a private CA would.
        url = (f"redis://127.0.0.1:{server.port}/0"
               f"?ssl_ca_certs={pki().ca_cert}")
        repository = yield self.started(from_config(
            RepositoryConfig(kind="redis", url=url, tls=True), reactor, "."))
        session_id, sealed = session_id_of(), blob()
        yield repository.put(session_id, sealed, self.expires())
        self.assertEqual((yield repository.take(session_id)),
                         Taken(sealed))

    @inlineCallbacks
    def test_tls_server_refuses_a_plain_connection(self):
        server = throwaway_server(self, "redis", tls=pki()).start()
        repository = yield self.started(self.make_for(_PlainURL(server.port)))
        yield self.assertFailure(repository.take(session_id_of()),
                                 RepositoryError)


class RedisClusterRepositoryTests(RepositoryBehaviour, TestCase):
    """
    The Redis backend on a Redis Cluster of three masters shared by the
    module, named by its seeds.
    """

    expires_by_itself = True

    def make(self, **options):
        from sslshare.repository.redis import RedisRepository

        return RedisRepository(self.group.url, reactor, **options)

    def clear(self):
        from redis.cluster import ClusterNode, RedisCluster

        self.group = shared_redis_group("cluster")
        self.client = RedisCluster(startup_nodes=[
            ClusterNode("127.0.0.1", server.port)
            for server in self.group.servers])
        self.addCleanup(self.client.close)
        self.client.flushall()

    raw_put = RedisRepositoryTests.raw_put
    raw_exists = RedisRepositoryTests.raw_exists

    @inlineCallbacks
    def test_sessions_spread_over_every_master(self):
        import redis

        for _ in range(30):
            yield self.repository.put(session_id_of(), blob(), self.expires())
        sizes = []
        for server in self.group.servers:
            with redis.Redis(port=server.port) as master:
                sizes.append(master.dbsize())
        self.assertEqual(sum(sizes), 30)
        self.assertNotIn(0, sizes)

    @inlineCallbacks
    def test_one_seed_with_cluster_finds_every_master(self):
        from sslshare.repository.redis import RedisRepository

        seed = self.group.servers[0].port
        repository = yield self.started(RedisRepository(
            f"redis://127.0.0.1:{seed}", reactor, cluster=True))
        self.assertEqual(repository.describe(),
                         f"redis cluster 127.0.0.1:{seed}")
        session_ids = [session_id_of() for _ in range(20)]
        for session_id in session_ids:
            yield repository.put(session_id, blob(), self.expires())
        taken = yield gatherResults([repository.take(session_id)
                                     for session_id in session_ids])
        self.assertNotIn(None, taken)


class RedisSentinelRepositoryTests(RepositoryBehaviour, TestCase):
    """
    The Redis backend on a master and a replica watched by three sentinels,
    shared by the module, named by the sentinels (the shared deployment
    never fails over; a test that kills its master has its own).
    """

    expires_by_itself = True

    def make(self, **options):
        from sslshare.repository.redis import RedisRepository

        sentinels = [("127.0.0.1", port) for port in self.group.sentinel_ports]
        return RedisRepository(None, reactor, sentinels=sentinels,
                               service=self.group.service, **options)

    def clear(self):
        import redis

        self.group = shared_redis_group("sentinel")
        self.client = redis.Redis(port=self.group.master.port)
        self.addCleanup(self.client.close)
        self.client.flushdb()

    raw_put = RedisRepositoryTests.raw_put
    raw_exists = RedisRepositoryTests.raw_exists

    @inlineCallbacks
    def test_each_write_is_on_the_replica_when_it_counts(self):
        import redis

        from sslshare.repository.redis import key

        self.assertEqual(self.repository.wait_replicas, 1)
        session_id = session_id_of()
        yield self.repository.put(session_id, blob(), self.expires())
        with redis.Redis(port=self.group.replicas[0].port) as replica:
            self.assertEqual(replica.exists(key(session_id)), 1)
            yield self.repository.take(session_id)
            self.assertEqual(replica.exists(key(session_id)), 0)


class RedisReplicationTests(TestCase):
    """
    C{wait_replicas} with a master and a replica of the test's own.
    """

    @inlineCallbacks
    def test_a_take_no_replica_acknowledged_is_not_used(self):
        """
        A take whose delete no replica acknowledged in time fails, and its
        blob is not handed out: a replica promoted now would still hold
        it.  The master deleted it all the same: it is not served later.
        """
        import signal

        from sslshare.repository.redis import RedisRepository

        master = throwaway_server(self, "redis").start()
        replica = throwaway_server(
            self, "redis",
            arguments=["--replicaof", "127.0.0.1", str(master.port)]).start()
        repository = RedisRepository(master.url, reactor, wait_replicas=1,
                                     timeout=0.5)
        yield repository.start()
        self.addCleanup(repository.close)
        session_id = session_id_of()
        # The first put that succeeds: the replica is in sync.
        yield until(lambda: repository.put(
            session_id, blob(), reactor.seconds() + 60).addCallbacks(
                lambda _: True, lambda _: False))
        replica.process.send_signal(signal.SIGSTOP)
        self.addCleanup(replica.process.send_signal, signal.SIGCONT)
        failure = yield self.assertFailure(repository.take(session_id),
                                           RepositoryError)
        self.assertIn("0 of 1 replicas acknowledged", str(failure))
        yield self.assertFailure(
            repository.put(session_id_of(), blob(), reactor.seconds() + 60),
            RepositoryError)
        replica.process.send_signal(signal.SIGCONT)
        self.assertIsNone((yield repository.take(session_id)))


@attrs.frozen
class _PlainURL:
    port: int

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"


class PostgresRepositoryTests(RepositoryBehaviour, ServerOutageBehaviour,
                              TestCase):
    """
    The PostgreSQL backend, on a cluster shared by the module.
    """

    def make(self, **options):
        from sslshare.repository.postgres import PostgresRepository

        return PostgresRepository(self.server.dsn(), reactor, **options)

    def clear(self):
        self.server = shared_server("postgres")
        self.server.execute("DROP TABLE IF EXISTS sslshare_sessions")

    def raw_put(self, session_id, sealed, expires, seq=0, digest=b""):
        self.server.execute(
            "INSERT INTO sslshare_sessions VALUES (%s, %s, %s, %s, %s)",
            session_id, sealed, expires, seq, digest)

    def raw_exists(self, session_id):
        return bool(self.server.execute(
            "SELECT 1 FROM sslshare_sessions WHERE session_id = %s",
            session_id))

    def own_server(self):
        return throwaway_server(self, "postgres", tls=pki()).start()

    def make_for(self, server, **options):
        from sslshare.repository.postgres import PostgresRepository

        return PostgresRepository(server.dsn(), reactor, **options)

    @inlineCallbacks
    def test_table_dropped_under_a_running_repository_is_made_again(self):
        session_id, sealed = session_id_of(), blob()
        self.server.execute("DROP TABLE sslshare_sessions")
        yield self.repository.put(session_id, sealed, self.expires())
        self.assertEqual((yield self.repository.take(session_id)),
                         Taken(sealed))

    @inlineCallbacks
    def test_repositories_starting_together_make_the_table_once(self):
        self.server.execute("DROP TABLE sslshare_sessions")
        yield gatherResults([self.started(self.make()) for _ in range(4)])
        self.assertEqual(self.server.execute(
            "SELECT count(*) FROM pg_tables "
            "WHERE schemaname = 'public' AND tablename = 'sslshare_sessions'"),
            [(1,)])

    @inlineCallbacks
    def test_password_from_the_password_file_is_used(self):
        password_file = self.mktemp()
        with open(password_file, "w") as f:
            f.write(PostgresServer.PASSWORD + "\n")
        repository = yield self.started(from_config(
            RepositoryConfig(kind="postgres",
                             dsn=self.server.dsn("sslshare_password"),
                             password_file=password_file), reactor, "."))
        session_id, sealed = session_id_of(), blob()
        yield repository.put(session_id, sealed, self.expires())
        self.assertEqual((yield repository.take(session_id)),
                         Taken(sealed))

    @inlineCallbacks
    def test_wrong_password_fails_calls_naming_the_server(self):
        repository = yield self.started(self.make_for(
            _Role(self.server, "sslshare_password"), password="wrong"))
        failure = yield self.assertFailure(repository.take(session_id_of()),
                                           RepositoryError)
        self.assertIn(f"postgres 127.0.0.1:{self.server.port}/postgres: take: "
                      f"cannot connect", str(failure))
        self.assertNotIn("wrong", str(failure))

    @inlineCallbacks
    def test_tls_reaches_a_role_that_only_tls_may_use(self):
        # sslmode=disable in the string is raised to require by tls.
        dsn = self.server.dsn("sslshare_tls") + " sslmode=disable"
        repository = yield self.started(from_config(
            RepositoryConfig(kind="postgres", dsn=dsn, tls=True), reactor,
            "."))
        session_id, sealed = session_id_of(), blob()
        yield repository.put(session_id, sealed, self.expires())
        self.assertEqual((yield repository.take(session_id)),
                         Taken(sealed))

    @inlineCallbacks
    def test_without_tls_a_tls_only_role_is_refused(self):
        dsn = self.server.dsn("sslshare_tls") + " sslmode=disable"
        repository = yield self.started(from_config(
            RepositoryConfig(kind="postgres", dsn=dsn), reactor, "."))
        yield self.assertFailure(repository.take(session_id_of()),
                                 RepositoryError)


@attrs.frozen
class _Role:
    server: PostgresServer
    user: str

    def dsn(self):
        return self.server.dsn(self.user)


class FromConfigTests(TestCase):
    """
    L{from_config} builds the configured backend, and refuses what cannot
    work with a message that names it (and never quotes a password).
    """

    def test_each_kind_gives_its_backend(self):
        skip_without("postgres", server=False)
        skip_without("redis", server=False)
        from sslshare.repository.postgres import PostgresRepository
        from sslshare.repository.redis import RedisRepository
        from sslshare.repository.sqlite import SQLiteRepository

        for config, kind in [
            (RepositoryConfig(kind="sqlite", path="/x.sqlite3"),
             SQLiteRepository),
            (RepositoryConfig(kind="postgres", dsn="host=db"),
             PostgresRepository),
            (RepositoryConfig(kind="redis", url="redis://db"),
             RedisRepository),
        ]:
            self.assertIsInstance(from_config(config, reactor, "."), kind)

    def test_dsn_that_is_not_one_is_refused_without_quoting_it(self):
        skip_without("postgres", server=False)
        config = RepositoryConfig(kind="postgres",
                                  dsn="host=db password='s3cret")
        error = self.assertRaises(RepositoryError, from_config, config,
                                  reactor, ".")
        self.assertIn("not a libpq connection string", str(error))
        self.assertNotIn("s3cret", str(error))

    def test_tls_with_a_unix_socket_is_refused(self):
        skip_without("redis", server=False)
        config = RepositoryConfig(kind="redis", url="unix:///run/redis.sock",
                                  tls=True)
        error = self.assertRaises(RepositoryError, from_config, config,
                                  reactor, ".")
        self.assertIn("unix socket", str(error))

    def test_unreadable_password_file_is_named(self):
        path = os.path.abspath(self.mktemp())
        config = RepositoryConfig(kind="redis", url="redis://db",
                                  password_file=path)
        error = self.assertRaises(RepositoryError, from_config, config,
                                  reactor, ".")
        self.assertIn(path, str(error))

    def test_description_never_holds_the_password(self):
        skip_without("postgres", server=False)
        skip_without("redis", server=False)
        repository = from_config(
            RepositoryConfig(kind="redis", url="redis://:s3cret@db:6380/2"),
            reactor, ".")
        self.assertEqual(repr(repository),
                         "<RedisRepository redis redis://db:6380/2>")
        repository = from_config(
            RepositoryConfig(kind="postgres",
                             dsn="postgresql://app:s3cret@db/sessions"),
            reactor, ".")
        self.assertEqual(repository.describe(), "postgres db:5432/sessions")


class InOrderTests(TestCase):
    """
    L{InOrder}: one key's operations one after another, in call order.
    """

    def setUp(self):
        self.lines = InOrder()
        self.started = []
        self.pending = {}

    def operation(self, name):
        def run():
            self.started.append(name)
            self.pending[name] = Deferred()
            return self.pending[name]
        return run

    def test_one_keys_operations_wait_for_each_other(self):
        first = self.lines.run(b"k", self.operation("first"))
        second = self.lines.run(b"k", self.operation("second"))
        self.assertEqual(self.started, ["first"])
        self.pending["first"].callback(1)
        self.assertEqual(self.successResultOf(first), 1)
        self.assertEqual(self.started, ["first", "second"])
        self.pending["second"].errback(ValueError("no"))
        self.failureResultOf(second, ValueError)
        self.assertEqual(len(self.lines), 0)

    def test_other_keys_do_not_wait(self):
        self.lines.run(b"k", self.operation("k"))
        self.lines.run(b"other", self.operation("other"))
        self.assertEqual(self.started, ["k", "other"])

    def test_cancelled_while_waiting_never_runs(self):
        self.lines.run(b"k", self.operation("first"))
        waiting = self.lines.run(b"k", self.operation("cancelled"))
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.pending["first"].callback(None)
        self.assertEqual(self.started, ["first"])
        self.assertEqual(len(self.lines), 0)

    def test_cancelled_while_running_holds_the_line_until_it_ends(self):
        running = self.lines.run(b"k", self.operation("first"))
        self.lines.run(b"k", self.operation("second"))
        running.cancel()
        self.failureResultOf(running, CancelledError)
        self.assertEqual(self.started, ["first"])
        self.pending["first"].callback("late answer, dropped")
        self.assertEqual(self.started, ["first", "second"])

    def test_next_operation_that_ends_at_once_leaves_no_line(self):
        first = self.lines.run(b"k", self.operation("first"))
        second = self.lines.run(b"k", lambda: succeed("at once"))
        self.pending["first"].callback(1)
        self.assertEqual(
            (self.successResultOf(first), self.successResultOf(second)),
            (1, "at once"))
        self.assertEqual(len(self.lines), 0)


class RedisTargetsTests(SynchronousTestCase):
    """
    L{sslshare.addresses} and L{sslshare.redis_targets}: addresses and
    cluster URLs.
    """

    def test_host_port_forms(self):
        from sslshare.addresses import host_port

        self.assertEqual(
            [host_port(text, 26379) for text in
             ("s1", "s1:5000", "[::1]", "[::1]:5000", "10.0.0.1:1")],
            [("s1", 26379), ("s1", 5000), ("::1", 26379), ("::1", 5000),
             ("10.0.0.1", 1)])

    def test_bad_addresses(self):
        from sslshare.addresses import AddressError, host_port

        for text in (":5000", "s1:0", "s1:x", "[::1", "[::1]5000", ""):
            self.assertRaises(AddressError, host_port, text, 6379)

    def test_cluster_seeds_and_credentials(self):
        from sslshare.redis_targets import (
            ClusterSeeds,
            cluster_seeds,
        )

        self.assertEqual(
            cluster_seeds("rediss+cluster://app:s%40cret@a:7000,b,[::1]:7002/"),
            ClusterSeeds((("a", 7000), ("b", 6379), ("::1", 7002)), True,
                         "app", "s@cret"))
        self.assertNotIn("cret", repr(cluster_seeds(
            "redis+cluster://app:s3cret@a:7000")))
