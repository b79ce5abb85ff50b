"""
The recovery chain (L{sslshare.recovery.Recovery}) on its own, in memory and
on a L{Clock}: its budget, its joined lookups, the redirects it follows, its
bounds, and what a cancelled lookup leaves behind; and the placement it asks
where the copies are.  The nodes are real, the wire and the repository are
the in-memory doubles of L{tests.support.memory}.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sslshare.recovery import MAX_REDIRECTS
from sslshare.repository import Taken
from sslshare.tls import LookupRequest
from tests.support.memory import (
    BUDGET,
    CONTEXT,
    MemoryCluster,
    MemoryRepository,
)


class MemoryRepositoryTests(SynchronousTestCase):
    """
    The repository double keeps the rules of a repository.
    """

    def test_take_gives_a_blob_once(self):
        repository = MemoryRepository(Clock())
        repository.put(b"s", b"blob", 10)
        self.assertEqual(self.successResultOf(repository.take(b"s")),
                         Taken(b"blob"))
        self.assertIsNone(self.successResultOf(repository.take(b"s")))

    def test_expired_blob_is_not_taken(self):
        clock = Clock()
        repository = MemoryRepository(clock)
        repository.put(b"s", b"blob", 10)
        clock.advance(10)
        self.assertIsNone(self.successResultOf(repository.take(b"s")))


class ChainTests(SynchronousTestCase):
    """
    Where a lookup finds a session, and what moves.
    """

    def test_own_session_is_found_in_the_store_without_asking_anyone(self):
        cluster = MemoryCluster()
        session_id = cluster.new_session("node1")
        sent = list(cluster.network.sent)
        found = self.successResultOf(cluster.lookup("node1", session_id))
        self.assertEqual((found.source, found.giver), ("local", None))
        self.assertEqual(cluster.network.sent, sent)

    def test_session_of_a_peer_moves_to_the_node_that_asks(self):
        cluster = MemoryCluster()
        session_id = cluster.new_session("node1")
        found = self.successResultOf(cluster.lookup("node2", session_id))
        self.assertEqual((found.source, found.giver, found.found_at),
                         ("peer", "node1", "peer"))
        self.assertEqual(cluster["node1"].store.holder(session_id), "node2")
        self.assertEqual(set(cluster.holders(session_id).values()), {"node2"})
        self.assertEqual(cluster["node2"].recovery.counters["recovered_peer"], 1)

    def test_unknown_service_asks_nobody(self):
        cluster = MemoryCluster()
        session_id = cluster.new_session("node1")
        sent = list(cluster.network.sent)
        lookup = cluster["node2"].recovery.recover(
            LookupRequest(session_id, "TLSv1.2", "another"))
        self.assertIsNone(self.successResultOf(lookup))
        self.assertEqual(cluster.network.sent, sent)

    def test_owner_that_is_down_is_replaced_by_its_backup_node(self):
        cluster = MemoryCluster()
        session_id = cluster.new_session("node1")
        backup = cluster.backup_of(session_id, "node1")
        asker = ({"node2", "node3"} - {backup}).pop()
        cluster.network.down.add("node1")
        found = self.successResultOf(cluster.lookup(asker, session_id))
        self.assertEqual((found.giver, found.found_at), (backup, "backup"))
        self.assertEqual(cluster[asker].recovery.counters["backups_asked"], 1)

    def test_backup_copy_here_is_withheld_while_its_holder_is_alive(self):
        cluster = MemoryCluster()
        session_id = cluster.new_session("node1")
        backup = cluster.backup_of(session_id, "node1")
        cluster.network.unreachable.add("node1")
        self.assertIsNone(self.successResultOf(cluster.lookup(backup, session_id)))
        self.assertEqual(
            cluster[backup].recovery.counters["copies_withheld"], 1)
        self.assertEqual(cluster.holders(session_id),
                         {"node1": "node1", backup: "node1"})

    def test_backup_copy_here_serves_once_its_holder_is_down(self):
        cluster = MemoryCluster()
        session_id = cluster.new_session("node1")
        backup = cluster.backup_of(session_id, "node1")
        cluster.network.down.add("node1")
        found = self.successResultOf(cluster.lookup(backup, session_id))
        self.assertEqual((found.source, found.found_at), ("peer", "local"))
        self.assertEqual(cluster[backup].store.get(session_id).holder, backup)

    def test_session_of_another_version_moves_nothing(self):
        cluster = MemoryCluster()
        session_id = cluster.new_session("node1", "TLSv1.2")
        before = cluster.holders(session_id)
        self.assertIsNone(self.successResultOf(cluster.lookup("node2", session_id,
                                                "TLSv1.3")))
        self.assertEqual(cluster.holders(session_id), before)

    def test_used_tls13_ticket_is_gone_everywhere(self):
        cluster = MemoryCluster()
        session_id = cluster.new_session("node1", "TLSv1.3")
        found = self.successResultOf(cluster.lookup("node2", session_id, "TLSv1.3"))
        self.assertEqual(found.giver, "node1")
        self.assertEqual(cluster.holders(session_id), {})
        self.assertIsNone(self.successResultOf(cluster.lookup("node3", session_id,
                                                "TLSv1.3")))

    def _purges(self, cluster):
        return [(sender, to) for command, sender, to in cluster.network.sent
                if command == "purge"]

    def test_used_tls13_ticket_is_purged_where_its_copy_went_only(self):
        cluster = MemoryCluster(("node1", "node2", "node3", "node4"))
        session_id = cluster.new_session("node1", "TLSv1.3")
        self.assertEqual(cluster.backup_of(session_id, "node1"), "node2")
        self.successResultOf(cluster.lookup("node1", session_id, "TLSv1.3"))
        self.assertEqual(self._purges(cluster), [("node1", "node2")])
        self.assertEqual(cluster.holders(session_id), {})

    def test_copy_written_past_a_node_that_was_down_is_purged_there(self):
        cluster = MemoryCluster()
        cluster.network.down.add("node2")
        session_id = cluster.new_session("node1", "TLSv1.3")
        cluster.network.down.clear()
        self.assertEqual(cluster.backup_of(session_id, "node1"), "node3")
        self.successResultOf(cluster.lookup("node1", session_id, "TLSv1.3"))
        self.assertEqual(self._purges(cluster), [("node1", "node3")])
        self.assertEqual(cluster.holders(session_id), {})

    def test_giver_purges_the_copy_it_wrote_and_tells_the_owner(self):
        # node4's backup node is node2, where node1's copy is: it stays
        # there, replaced by node4's; node3 never had one.
        cluster = MemoryCluster(("node1", "node2", "node3", "node4"))
        session_id = cluster.new_session("node1")
        self.successResultOf(cluster.lookup("node4", session_id))
        self.assertEqual(self._purges(cluster), [])
        self.assertEqual(set(cluster.holders(session_id).values()), {"node4"})
        self.successResultOf(cluster.lookup("node3", session_id))
        self.assertEqual(self._purges(cluster), [("node4", "node1")])
        self.assertEqual(cluster["node1"].store.holder(session_id), "node3")


class RedirectTests(SynchronousTestCase):
    """
    A session that moved on is followed to its holder, a bounded number of
    times, never back to a node asked already.
    """

    def test_redirect_is_followed_to_the_holder(self):
        # node4 keeps no copy: node2's backup for node1's sessions is node3.
        cluster = MemoryCluster(("node1", "node2", "node3", "node4"))
        session_id = cluster.new_session("node1")
        self.successResultOf(cluster.lookup("node2", session_id))
        found = self.successResultOf(cluster.lookup("node4", session_id))
        self.assertEqual(found.giver, "node2")
        self.assertEqual(
            cluster["node4"].recovery.counters["redirects_followed"], 1)

    def test_owner_asked_after_two_moves_sends_nobody_to_where_it_was(self):
        """
        node3's session goes to node2, then to node1 (node2 gives it and
        tells node3, whose tombstone named node2, where it went): node3,
        asked for it again, fetches it from node1 at once.
        """
        cluster = MemoryCluster()
        session_id = cluster.new_session("node3")
        for node_id in ("node2", "node1", "node3"):
            found = self.successResultOf(cluster.lookup(node_id, session_id))
            self.assertEqual(found.source, "peer")
        fetches = [(sender, to) for command, sender, to in cluster.network.sent
                   if command == "fetch"]
        self.assertEqual(fetches, [("node2", "node3"), ("node1", "node2"),
                                   ("node3", "node1")])
        self.assertEqual(cluster["node3"].counters["tombstones_moved"], 1)
        self.assertEqual(set(cluster.holders(session_id).values()), {"node3"})

    def test_redirect_back_to_a_node_asked_already_is_not_followed(self):
        cluster = MemoryCluster()
        session_id = cluster.new_session("node1")
        cluster["node1"].store.tombstone(session_id, "node2", 2000)
        cluster["node2"].store.tombstone(session_id, "node1", 2000)
        self.assertIsNone(self.successResultOf(cluster.lookup("node3", session_id)))
        fetches = [to for command, _, to in cluster.network.sent
                   if command == "fetch"]
        self.assertEqual(fetches, ["node1", "node2"])

    def test_redirects_followed_are_bounded(self):
        nodes = tuple(f"node{number}" for number in range(1, 8))
        cluster = MemoryCluster(nodes)
        session_id = cluster.new_session("node1")
        for here, there in zip(nodes[:-2], nodes[1:-1]):
            cluster[here].store.tombstone(session_id, there, 2000)
        self.assertIsNone(self.successResultOf(cluster.lookup("node7", session_id)))
        fetches = [to for command, _, to in cluster.network.sent
                   if command == "fetch"]
        self.assertEqual(fetches, list(nodes[:1 + MAX_REDIRECTS]))
        self.assertEqual(cluster["node7"].recovery.counters["redirects_followed"],
                         MAX_REDIRECTS)


class BudgetTests(SynchronousTestCase):
    """
    A lookup answers within its budget, whatever its sources do.
    """

    def test_stalled_owner_is_a_miss_at_the_budget_and_its_call_is_cancelled(self):
        cluster = MemoryCluster()
        session_id = cluster.new_session("node1")
        cluster.network.stalled.add("node1")
        lookup = cluster.lookup("node2", session_id)
        cluster.clock.advance(BUDGET * 0.99)
        self.assertNoResult(lookup)
        cluster.clock.advance(BUDGET * 0.02)
        self.assertIsNone(self.successResultOf(lookup))
        recovery = cluster["node2"].recovery
        self.assertEqual(recovery.counters["timeouts"], 1)
        self.assertEqual(recovery.latency.count("miss"), 1)
        self.assertEqual(cluster.network.cancelled,
                         [("fetch", "node2", "node1")])

    def test_answer_within_the_budget_is_timed_where_it_ended(self):
        cluster = MemoryCluster()
        session_id = cluster.new_session("node1")
        cluster.network.latency = 0.1
        lookup = cluster.lookup("node2", session_id)
        cluster.clock.advance(0.1)
        self.assertEqual(self.successResultOf(lookup).giver, "node1")
        latency = cluster["node2"].recovery.latency
        self.assertEqual(latency.count("peer"), 1)
        self.assertAlmostEqual(latency.sum("peer"), 0.1)


class JoinTests(SynchronousTestCase):
    """
    Concurrent lookups of one session on one node run one chain.
    """

    def test_concurrent_lookups_share_one_question(self):
        cluster = MemoryCluster()
        session_id = cluster.new_session("node1")
        cluster.network.latency = 0.05
        first = cluster.lookup("node2", session_id)
        second = cluster.lookup("node2", session_id, client="192.0.2.2")
        cluster.clock.advance(0.05)
        self.assertIs(self.successResultOf(first),
                      self.successResultOf(second))
        fetches = [call for call in cluster.network.sent if call[0] == "fetch"]
        self.assertEqual(fetches, [("fetch", "node2", "node1")])
        self.assertEqual(cluster["node2"].recovery.counters["joined"], 1)

    def test_waiter_that_gives_up_leaves_the_others_their_answer(self):
        cluster = MemoryCluster()
        session_id = cluster.new_session("node1")
        cluster.network.latency = 0.05
        first = cluster.lookup("node2", session_id)
        second = cluster.lookup("node2", session_id)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        cluster.clock.advance(0.05)
        self.assertEqual(self.successResultOf(second).giver, "node1")
        self.assertEqual(cluster.network.cancelled, [])

    def test_lookup_after_the_chain_ended_runs_a_new_one(self):
        cluster = MemoryCluster()
        session_id = cluster.new_session("node1")
        backup = cluster.backup_of(session_id, "node1")
        asker = ({"node2", "node3"} - {backup}).pop()
        cluster.network.down.update({"node1", backup})
        self.assertIsNone(self.successResultOf(cluster.lookup(asker, session_id)))
        cluster.network.down.clear()
        self.assertEqual(self.successResultOf(cluster.lookup(asker, session_id)).giver,
                         "node1")
        self.assertEqual(cluster[asker].recovery.counters["joined"], 0)


class BoundTests(SynchronousTestCase):
    """
    Lookups past the store are bounded, in all and per client address.
    """

    def test_lookup_past_the_bound_asks_nobody(self):
        cluster = MemoryCluster(max_lookups=1)
        asked, shed = cluster.new_session("node1"), cluster.new_session("node1")
        cluster.network.latency = 0.05
        first = cluster.lookup("node2", asked)
        self.assertIsNone(self.successResultOf(cluster.lookup("node2", shed,
                                                client="192.0.2.9")))
        recovery = cluster["node2"].recovery
        self.assertEqual(recovery.counters["lookups_shed"], 1)
        self.assertNotIn(shed, [call for call in cluster.network.sent])
        cluster.clock.advance(0.05)
        self.assertEqual(self.successResultOf(first).giver, "node1")
        again = cluster.lookup("node2", shed)
        cluster.clock.advance(0.05)
        self.assertEqual(self.successResultOf(again).giver, "node1")

    def test_one_client_gets_at_most_its_share(self):
        cluster = MemoryCluster(max_lookups_per_client=1)
        sessions = [cluster.new_session("node1") for _ in range(3)]
        cluster.network.latency = 0.05
        first = cluster.lookup("node2", sessions[0], client="192.0.2.1")
        self.assertIsNone(self.successResultOf(cluster.lookup("node2", sessions[1],
                                                client="192.0.2.1")))
        other = cluster.lookup("node2", sessions[2], client="192.0.2.2")
        cluster.clock.advance(0.05)
        self.assertEqual(self.successResultOf(first).giver, "node1")
        self.assertEqual(self.successResultOf(other).giver, "node1")
        self.assertEqual(
            cluster["node2"].recovery.counters["lookups_shed_per_client"], 1)

    def test_timed_out_chain_counts_until_it_ends(self):
        cluster = MemoryCluster(max_lookups=1)
        stalled, later = cluster.new_session("node1"), cluster.new_session("node1")
        cluster.network.stalled.add("node1")
        first = cluster.lookup("node2", stalled)
        self.assertIsNone(self.successResultOf(cluster.lookup("node2", later)))
        cluster.clock.advance(BUDGET)
        self.assertIsNone(self.successResultOf(first))
        cluster.network.stalled.clear()
        self.assertEqual(self.successResultOf(cluster.lookup("node2", later)).giver, "node1")

    def test_own_sessions_are_never_shed(self):
        cluster = MemoryCluster(max_lookups=1)
        cluster.network.stalled.add("node1")
        cluster.lookup("node2", cluster.new_session("node1"))
        own = cluster.new_session("node2")
        self.assertEqual(self.successResultOf(cluster.lookup("node2", own)).source, "local")


class RepositoryTests(SynchronousTestCase):
    """
    With a repository, the repository keeps the copies instead of backup
    nodes.
    """

    def test_new_session_is_written_to_the_repository_not_to_a_node(self):
        cluster = MemoryCluster(repository=True)
        session_id = cluster.new_session("node1")
        self.assertIn(session_id, cluster.repository.rows)
        self.assertEqual(cluster.holders(session_id), {"node1": "node1"})
        self.assertNotIn("backup", [call[0] for call in cluster.network.sent])

    def test_session_of_an_owner_that_is_down_comes_from_the_repository(self):
        cluster = MemoryCluster(repository=True)
        session_id = cluster.new_session("node1")
        cluster.network.down.add("node1")
        found = self.successResultOf(cluster.lookup("node2", session_id))
        self.assertEqual((found.source, found.giver), ("repository", None))
        fetches = [call for call in cluster.network.sent if call[0] == "fetch"]
        self.assertEqual(fetches, [("fetch", "node2", "node1")])
        # TLS 1.2: back in the repository under its new holder.
        sealed = cluster.repository.rows[session_id].sealed
        self.assertEqual(
            cluster.keys.open(sealed, session_id, CONTEXT).holder, "node2")

    def test_repository_that_fails_is_a_miss_counted(self):
        cluster = MemoryCluster(repository=True)
        session_id = cluster.new_session("node1")
        cluster.network.down.add("node1")
        cluster.repository.down = True
        self.assertIsNone(self.successResultOf(cluster.lookup("node2", session_id)))
        self.assertEqual(
            cluster["node2"].recovery.counters["repository_errors"], 1)

    def test_own_session_serves_only_once_taken_from_the_repository(self):
        cluster = MemoryCluster(repository=True)
        session_id = cluster.new_session("node1", "TLSv1.3")
        cluster.repository.purge(session_id)
        self.assertIsNone(self.successResultOf(cluster.lookup("node1", session_id,
                                                "TLSv1.3")))
        self.assertEqual(cluster["node1"].recovery.counters["stale_copies"], 1)

    def test_nodes_sharing_only_the_repository_tell_no_peer(self):
        """
        Nodes with a repository and no peers configured: the one that takes
        another's session from the repository has no link to tell its
        former holder, and need not, since that node takes from the
        repository before it serves its copy again, and finds the newer
        copy there.  Nothing is counted as a failed purge.
        """
        cluster = MemoryCluster(repository=True, linked=False)
        session_id = cluster.new_session("node1")
        found = self.successResultOf(cluster.lookup("node2", session_id))
        self.assertEqual(found.source, "repository")
        self.assertNotIn("purge", [call[0] for call in cluster.network.sent])
        self.assertEqual(
            cluster["node2"].recovery.counters["peer_purge_failures"], 0)
        back = self.successResultOf(cluster.lookup("node1", session_id))
        self.assertEqual(back.source, "repository")
        self.assertEqual(cluster["node1"].store.get(session_id).holder,
                         "node1")
        self.assertEqual(cluster["node1"].recovery.counters["stale_copies"], 1)


class PlacementTests(SynchronousTestCase):
    """
    Which node the chain asks for a copy, and which nodes a move tells to
    drop theirs (L{Placement}).
    """

    def test_backup_node_is_the_next_live_one_in_the_ring(self):
        cluster = MemoryCluster(("node1", "node2", "node3", "node4"))
        session_id = cluster.new_session("node1")
        placement = cluster["node4"].placement
        self.assertEqual(placement.backup_node(session_id, "node1"), "node2")
        cluster.network.down.add("node2")
        self.assertEqual(placement.backup_node(session_id, "node1"), "node3")
        cluster.network.down.update({"node2", "node3"})
        self.assertIsNone(placement.backup_node(session_id, "node1"))

    def test_backup_node_is_the_first_when_none_runs(self):
        cluster = MemoryCluster()
        session_id = cluster.new_session("node1")
        placement = cluster["node3"].placement
        cluster.network.down.update({"node1", "node2"})
        self.assertEqual(placement.backup_node(session_id, "node3"), "node2")

    def test_no_backup_node_and_no_copies_with_a_repository(self):
        cluster = MemoryCluster(repository=True)
        session_id = cluster.new_session("node1")
        placement = cluster["node3"].placement
        self.assertIsNone(placement.backup_node(session_id, "node1"))
        self.assertEqual(placement.backup_nodes(session_id, "node1"), set())

    def test_copies_may_be_at_every_node_but_the_holder_and_this_one(self):
        cluster = MemoryCluster(("node1", "node2", "node3", "node4"))
        session_id = cluster.new_session("node1")
        self.assertEqual(
            cluster["node4"].placement.backup_nodes(session_id, "node2"),
            {"node1", "node3"})
