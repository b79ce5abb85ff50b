"""
Nodes sharing sessions through the central repository, on each backend
against the real thing: a session outlives the node that made it, a
tampered blob gives a full handshake, and a repository that dies turns
lookups into full handshakes within the budget until it comes back.
"""

from __future__ import annotations

import os
import sqlite3
import time

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from sslshare.state import MAX_SEQ, SEALED_CHECKPOINT_LENGTH
from tests.support.cluster import LocalCluster
from tests.support.clients import python_client_round
from tests.support.databases import (
    shared_redis_group,
    shared_server,
    throwaway_redis_group,
    throwaway_server,
)
from tests.support.files import file_mode, umask_for_test
from tests.support.waiting import until


class _RepositoryTopology:
    """
    The tests every backend passes; subclasses say how to reach their
    server and how to tamper with a stored blob.
    """

    topology = "repository"

    def section(self):
        raise NotImplementedError

    def tamper(self, cluster, session_id):
        raise NotImplementedError

    def _cluster(self, budget_ms=300):
        return LocalCluster(
            self, nodes=("node1", "node2"), budget_ms=budget_ms,
            repository=f'topology = "{self.topology}"\n' + self.section())

    @inlineCallbacks
    def _made_on_node1(self, cluster, version):
        yield cluster.start_all()
        first = yield cluster.client_round("node1", version)
        node1 = cluster.nodes["node1"]
        for state in node1.store.sessions():
            yield self._stored(node1, state.session_id)
        return first

    def _stored(self, node, session_id):
        """
        Wait until the repository holds C{session_id}'s row: a put is
        counted when it is asked for.
        """
        return until(lambda: node.repository.checkpoint_of(
            session_id).addCallback(lambda checkpoint: checkpoint is not None))

    @inlineCallbacks
    def _resumes_with_node1_stopped(self, version):
        cluster = self._cluster()
        first = yield self._made_on_node1(cluster, version)
        yield cluster.stop("node1")
        second = yield cluster.client_round("node2", version, first.session)
        self.assertTrue(second.reused)
        self.assertEqual(cluster.nodes["node2"].counters["resumed_repository"], 1)

    def test_tls12_session_resumes_on_node2_with_node1_stopped(self):
        return self._resumes_with_node1_stopped("TLSv1.2")

    def test_tls13_session_resumes_on_node2_with_node1_stopped(self):
        return self._resumes_with_node1_stopped("TLSv1.3")

    @inlineCallbacks
    def test_session_taken_from_the_repository_is_held_by_one_node(self):
        cluster = self._cluster()
        first = yield self._made_on_node1(cluster, "TLSv1.2")
        node1, node2 = cluster.nodes["node1"], cluster.nodes["node2"]
        second = yield cluster.client_round("node2", "TLSv1.2", first.session)
        self.assertTrue(second.reused)
        session_id = first.session.id
        # node2 told node1, the previous holder, to drop its copy.
        yield until(lambda: node1.store.get(session_id) is None)
        self.assertEqual(node2.store.get(session_id).holder, "node2")

    @inlineCallbacks
    def test_purge_waits_for_a_link_that_is_down(self):
        """
        node2 takes the session from the repository while its link to
        node1, the previous holder, is down (as right after node1
        restarted): the purge reaches node1 once the link is back, so the
        session is not held twice.  Found by tests/test_soak.py.
        """
        cluster = self._cluster()
        first = yield self._made_on_node1(cluster, "TLSv1.2")
        node1, node2 = cluster.nodes["node1"], cluster.nodes["node2"]
        link = node2.peer_links.link("node1")
        link._protocol.transport.abortConnection()
        yield until(lambda: not link.connected)
        second = yield cluster.client_round("node2", "TLSv1.2", first.session)
        self.assertTrue(second.reused)
        yield until(lambda: node1.store.get(first.session.id) is None)
        self.assertTrue(link.connected)
        self.assertEqual(node2.recovery.counters["peer_purge_failures"], 0)

    @inlineCallbacks
    def test_tls12_copy_another_node_took_is_not_served_again(self):
        """
        node2 takes the session from the repository and dies before it can
        tell node1 (the take is made here directly): node1's copy is stale,
        and node1, which takes from the repository before resuming a
        session, gives a full handshake instead of serving it a second
        time.  Found by tests/test_soak.py.
        """
        cluster = self._cluster()
        first = yield self._made_on_node1(cluster, "TLSv1.2")
        node1 = cluster.nodes["node1"]
        taken = yield cluster.nodes["node2"].repository.take(first.session.id)
        self.assertIsNotNone(taken)
        second = yield cluster.client_round("node1", "TLSv1.2", first.session)
        self.assertFalse(second.reused)
        self.assertEqual(node1.recovery.counters["stale_copies"], 1)
        self.assertIsNone(node1.store.get(first.session.id))

    @inlineCallbacks
    def test_tls12_stale_copy_gives_way_to_the_one_in_the_repository(self):
        """
        node2 took the session and stored it again under its name, and the
        purge of node1's copy was lost: node1 takes node2's copy from the
        repository, sees node2's name in it, and resumes that copy, not its
        own; it holds the session now, and node2, whose copy is stale in
        turn, takes node1's from the repository when the client comes back.
        """
        cluster = self._cluster()
        first = yield self._made_on_node1(cluster, "TLSv1.2")
        node1, node2 = cluster.nodes["node1"], cluster.nodes["node2"]
        session_id = first.session.id
        stale = node1.store.get(session_id)
        moved = yield cluster.client_round("node2", "TLSv1.2", first.session)
        self.assertTrue(moved.reused)
        yield until(lambda: node1.store.get(session_id) is None)
        yield self._stored(node2, session_id)
        node1.store.put(stale)
        again = yield cluster.client_round("node1", "TLSv1.2", first.session)
        self.assertTrue(again.reused)
        self.assertEqual(node1.recovery.counters["stale_copies"], 1)
        self.assertEqual(node1.counters["resumed_repository"], 1)
        self.assertEqual(node1.store.get(session_id).holder, "node1")
        yield self._stored(node1, session_id)
        back = yield cluster.client_round("node2", "TLSv1.2", first.session)
        self.assertTrue(back.reused)
        self.assertEqual(node2.counters["resumed_repository"], 2)

    @inlineCallbacks
    def test_tls12_session_follows_the_client_between_unlinked_nodes(self):
        """
        Nodes that share only the repository (no peers): a TLS 1.2 session
        keeps its id, so each node that resumed it keeps a copy no purge
        reaches; the session resumes at every connection, whichever node
        it goes to.  (A node gave a full handshake when its stale copy
        named it and the repository's another node.)
        """
        cluster = LocalCluster(
            self, nodes=("node1", "node2"), peers=False,
            repository=f'topology = "{self.topology}"\n' + self.section())
        yield cluster.start_all()
        session = (yield cluster.client_round("node1", "TLSv1.2")).session
        for node in ("node2", "node1", "node2", "node1"):
            yield self._stored(cluster.nodes["node1"], session.id)
            result = yield cluster.client_round(node, "TLSv1.2", session)
            self.assertTrue(result.reused, node)
        self.assertEqual(
            [cluster.nodes[node].counters["resumed_repository"]
             for node in ("node1", "node2")], [2, 2])

    @inlineCallbacks
    def test_tls12_session_resumed_at_home_stays_in_the_repository(self):
        """
        Resuming a TLS 1.2 session on the node that holds it takes it from
        the repository and puts it back, as many times as the client comes
        back: it stays where the other nodes find it.
        """
        cluster = self._cluster()
        first = yield self._made_on_node1(cluster, "TLSv1.2")
        node1 = cluster.nodes["node1"]
        for _ in range(3):
            again = yield cluster.client_round(
                "node1", "TLSv1.2", first.session)
            self.assertTrue(again.reused)
        self.assertEqual(node1.counters["resumed_local"], 3)
        # After the last put: the repository runs them in order.
        self.assertIsNotNone(
            (yield node1.repository.checkpoint_of(first.session.id)))
        self.assertEqual(node1.repository.counters["puts"], 4)

    @inlineCallbacks
    def test_tampered_blob_gives_full_handshake(self):
        cluster = self._cluster()
        # TLS 1.2: the client's session id is the server's (a TLS 1.3
        # client names its ticket by a hash of it).
        first = yield self._made_on_node1(cluster, "TLSv1.2")
        yield cluster.stop("node1")
        yield deferToThread(self.tamper, cluster, first.session.id)
        second = yield cluster.client_round("node2", "TLSv1.2", first.session)
        self.assertFalse(second.reused)
        self.assertEqual(second.echo, b"hello")
        self.assertEqual(cluster.nodes["node2"].recovery.counters["unsealable"], 1)

    @inlineCallbacks
    def test_used_tls13_ticket_put_back_is_not_resumed_again(self):
        """
        Whoever can write the repository keeps a ticket's row and, once
        node2 has used the ticket, puts the row back: neither node that
        saw the ticket move resumes it a second time.
        """
        # A budget a loaded machine keeps: a lookup that runs out of it is
        # a full handshake too, which would hide a replay.
        cluster = self._cluster(budget_ms=3000)
        first = yield self._made_on_node1(cluster, "TLSv1.3")
        node1, node2 = cluster.nodes["node1"], cluster.nodes["node2"]
        (ticket,) = [state.session_id for state in node1.store.sessions()]
        yield self._stored(node2, ticket)
        kept = yield node2.repository.take(ticket)
        yield node2.repository.put(ticket, kept.sealed, kept.expires)
        used = yield cluster.client_round("node2", "TLSv1.3", first.session)
        self.assertTrue(used.reused)
        yield until(lambda: node1.store.get(ticket) is None)
        for node in ("node1", "node2"):
            yield node2.repository.put(ticket, kept.sealed, kept.expires)
            replayed = yield cluster.client_round(node, "TLSv1.3",
                                                  first.session)
            self.assertFalse(replayed.reused, f"replayed on {node}")
            self.assertEqual(
                cluster.nodes[node].recovery.counters["replays_refused"], 1)

    @inlineCallbacks
    def test_forged_checkpoint_beside_the_blob_is_not_taken(self):
        """
        A checkpoint written into the repository without the state key (a
        seq at the bound would stop the chain's checkpoints) is ignored by
        the node that takes the session; the client is served.
        """
        cluster = self._cluster(budget_ms=3000)
        first = yield self._made_on_node1(cluster, "TLSv1.2")
        node2 = cluster.nodes["node2"]
        yield self._stored(node2, first.session.id)
        forged = yield node2.repository.checkpoint(
            first.session.id, MAX_SEQ, os.urandom(SEALED_CHECKPOINT_LENGTH))
        self.assertTrue(forged)
        yield cluster.stop("node1")
        second = yield cluster.client_round("node2", "TLSv1.2", first.session)
        self.assertEqual((second.reused, second.echo), (True, b"hello"))
        self.assertLess(node2.store.get(first.session.id).seq, MAX_SEQ)
        self.assertEqual(node2.recovery.counters["bad_checkpoints"], 1)


class SQLiteTopologyTests(_RepositoryTopology, TestCase):
    def section(self):
        return 'kind = "sqlite"\npath = "{directory}/sessions.sqlite3"\n'

    @inlineCallbacks
    def test_state_dirs_and_database_files_are_private_after_start(self):
        umask_for_test(self, 0)
        cluster = self._cluster()
        yield self._made_on_node1(cluster, "TLSv1.2")
        database = os.path.join(cluster.directory, "sessions.sqlite3")
        self.assertEqual(
            {path: file_mode(path) for path in (
                os.path.join(cluster.directory, "state", "node1"),
                os.path.join(cluster.directory, "state", "node2"),
                database, database + "-wal", database + "-shm")},
            {os.path.join(cluster.directory, "state", "node1"): 0o700,
             os.path.join(cluster.directory, "state", "node2"): 0o700,
             database: 0o600, database + "-wal": 0o600,
             database + "-shm": 0o600})

    def tamper(self, cluster, session_id):
        with sqlite3.connect(f"{cluster.directory}/sessions.sqlite3") as db:
            (sealed,) = db.execute("SELECT sealed FROM sslshare_sessions "
                                   "WHERE session_id = ?",
                                   (session_id,)).fetchone()
            db.execute("UPDATE sslshare_sessions SET sealed = ? "
                       "WHERE session_id = ?",
                       (bytes(sealed[:-1]) + bytes([sealed[-1] ^ 1]),
                        session_id))


class _ServerTopology(_RepositoryTopology):
    """
    Backends behind a server, which can also die and come back.
    """

    def server(self):
        return shared_server(self.kind)

    @inlineCallbacks
    def test_repository_killed_gives_full_handshakes_then_sharing_returns(self):
        server = throwaway_server(self, self.kind).start()
        self._own = server
        cluster = self._cluster(budget_ms=200)
        first = yield self._made_on_node1(cluster, "TLSv1.2")
        yield cluster.stop("node1")
        server.stop()
        started = time.monotonic()
        second = yield cluster.client_round("node2", "TLSv1.2", first.session)
        self.assertFalse(second.reused)
        self.assertLess(time.monotonic() - started, 2.0)
        server.start()
        # A session made now is shared again, without restarting a node.
        cluster.start("node1")
        third = yield cluster.client_round("node1", "TLSv1.3")
        yield deferLater(reactor, 0.3, lambda: None)
        yield cluster.stop("node1")
        fourth = yield cluster.client_round("node2", "TLSv1.3", third.session)
        self.assertTrue(fourth.reused)


class RedisTopologyTests(_ServerTopology, TestCase):
    kind = "redis"

    def section(self):
        server = getattr(self, "_own", None) or self.server()
        return f'kind = "redis"\nurl = "{server.url}"\n'

    def tamper(self, cluster, session_id):
        import redis

        from sslshare.repository.redis import key as session_key

        server = getattr(self, "_own", None) or self.server()
        client = redis.Redis.from_url(server.url)
        key = session_key(session_id)
        sealed = client.hget(key, "sealed")
        client.hset(key, "sealed", sealed[:-1] + bytes([sealed[-1] ^ 1]))


def _flip_last_byte(client, session_id):
    from sslshare.repository.redis import key as session_key

    key = session_key(session_id)
    sealed = client.hget(key, "sealed")
    client.hset(key, "sealed", sealed[:-1] + bytes([sealed[-1] ^ 1]))


class RedisClusterTopologyTests(_RepositoryTopology, TestCase):
    """
    Nodes sharing a Redis Cluster of three masters, named by its seeds.
    """

    def section(self):
        return f'kind = "redis"\nurl = "{shared_redis_group("cluster").url}"\n'

    def tamper(self, cluster, session_id):
        from redis.cluster import ClusterNode, RedisCluster

        client = RedisCluster(startup_nodes=[
            ClusterNode("127.0.0.1", server.port)
            for server in shared_redis_group("cluster").servers])
        self.addCleanup(client.close)
        _flip_last_byte(client, session_id)


def _sentinel_section(group):
    return ('kind = "redis"\nsentinels = ['
            + ", ".join(f'"{address}"' for address in group.sentinels)
            + f']\nservice = "{group.service}"\n')


class RedisSentinelTopologyTests(_RepositoryTopology, TestCase):
    """
    Nodes sharing a Redis master and replica through three sentinels;
    and the master killed under load.
    """

    def section(self):
        return _sentinel_section(shared_redis_group("sentinel"))

    def tamper(self, cluster, session_id):
        import redis

        client = redis.Redis(port=shared_redis_group("sentinel").master.port)
        self.addCleanup(client.close)
        _flip_last_byte(client, session_id)

    @inlineCallbacks
    def test_master_killed_under_load_fails_over_and_serves_no_ticket_twice(
            self):
        """
        Clients go back and forth between two nodes that share only the
        repository, each TLS 1.3 connection offering its previous ticket,
        and offering each used ticket once more at the other node, where
        it must not resume.  The master is killed: the sentinels promote
        the replica; from then until the old master is back (restarted, as
        a service manager would, and made a replica of the new one by the
        sentinels) no write is acknowledged by a replica, so lookups end
        within the budget as full handshakes, and no client waits longer or
        fails.  Then sessions are shared again, and no ticket resumed
        twice, before, during or after (each take waited for a replica).
        """
        group = throwaway_redis_group(self, "sentinel", down_after=0.5)
        budget_ms = 200
        cluster = LocalCluster(self, nodes=("node1", "node2"), peers=False,
                               budget_ms=budget_ms,
                               repository='topology = "repository"\n'
                                          + _sentinel_section(group))
        yield cluster.start_all()
        old_master = group.master.port
        rounds = []
        running = [True]

        def client(nodes):
            session = None
            while running[0]:
                for node, other in (nodes, nodes[::-1]):
                    began = time.monotonic()
                    result = python_client_round(cluster.ports[node],
                                                 cluster.ca_cert, "TLSv1.3",
                                                 session)
                    replay = None
                    if result.reused:
                        replay = python_client_round(
                            cluster.ports[other], cluster.ca_cert, "TLSv1.3",
                            session).reused
                    rounds.append((began, time.monotonic() - began,
                                   session is not None, result.reused,
                                   replay))
                    session = result.session

        clients = [deferToThread(client, ("node1", "node2")) for _ in range(3)]
        try:
            yield deferLater(reactor, 2, group.master.stop)
            killed = time.monotonic()
            yield until(lambda: group.master_port() != old_master,
                        timeout=20)
            yield deferToThread(group.restart_old_master)
            yield until(lambda: group.replicas_of_master() == 1, timeout=20)
            replicated = time.monotonic()
            yield deferLater(reactor, 3, lambda: None)
        finally:
            running[0] = False
            yield gatherResults(clients)
        before = [r for r in rounds if r[0] < killed - 0.2 and r[2]]
        after = [r for r in rounds if r[0] > replicated + 1 and r[2]]
        self.assertTrue(before and after, (len(before), len(after)))
        # Shared before and after: offers resumed (a ticket may be offered
        # at the other node before its put is done).
        for window in (before, after):
            resumed = sum(r[3] for r in window)
            self.assertGreaterEqual(resumed / len(window), 0.9,
                                    (resumed, len(window)))
        # No client waited past the budget (plus the handshakes' own time).
        self.assertLess(max(r[1] for r in rounds), budget_ms / 1000 + 1.5)
        # No used ticket resumed a second time.
        self.assertEqual([r for r in rounds if r[4]], [])


class PostgresTopologyTests(_ServerTopology, TestCase):
    kind = "postgres"

    def section(self):
        server = getattr(self, "_own", None) or self.server()
        return f'kind = "postgres"\ndsn = "{server.dsn()}"\n'

    def tamper(self, cluster, session_id):
        server = getattr(self, "_own", None) or self.server()
        server.execute(
            "UPDATE sslshare_sessions SET sealed = overlay(sealed placing "
            "'\\x00'::bytea from 40 for 1) WHERE session_id = %s",
            session_id)
