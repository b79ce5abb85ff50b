"""
L{sslshare.store.SessionStore}: LRU and TTL over a bounded number of bytes,
tombstones, and the counters, with time driven by a
L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

import os
import tracemalloc

from hypothesis import assume, given
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from sslshare.state import MAX_SEQ
from sslshare.store import ENTRY_OVERHEAD, TOMBSTONE_OVERHEAD, SessionStore
from tests.support.sessions import session_state, session_states
from tests.test_state import properties

DER_LENGTH = 135
ENTRY_COST = DER_LENGTH + ENTRY_OVERHEAD


class StoreTestCase(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.store = SessionStore(10 * ENTRY_COST, self.clock)

    def state(self, **fields):
        return session_state(der=b"\x01" * DER_LENGTH, **fields)


class PutGetTakeTests(StoreTestCase):
    """
    Holding, reading and taking sessions.
    """

    def test_get_returns_the_state_put(self):
        s = self.state()
        self.store.put(s)
        self.assertEqual(self.store.get(s.session_id), s)

    def test_get_leaves_the_session_in_place(self):
        s = self.state()
        self.store.put(s)
        self.store.get(s.session_id)
        self.assertEqual(len(self.store), 1)
        self.assertEqual(self.store.get(s.session_id), s)

    def test_take_returns_the_session_once(self):
        s = self.state()
        self.store.put(s)
        self.assertEqual(self.store.take(s.session_id), s)
        self.assertIsNone(self.store.take(s.session_id))
        self.assertEqual(len(self.store), 0)

    def test_unknown_session_is_none(self):
        self.assertIsNone(self.store.get(self.state().session_id))
        self.assertIsNone(self.store.take(self.state().session_id))

    def test_put_replaces_the_state_under_the_same_id(self):
        s = self.state()
        self.store.put(s)
        newer = s.with_holder("node2")
        self.store.put(newer)
        self.assertEqual(self.store.get(s.session_id), newer)
        self.assertEqual(len(self.store), 1)
        self.assertEqual(self.store.bytes_used, ENTRY_COST)

    @properties
    @given(session_states)
    def test_any_state_comes_back_whole(self, s):
        store = SessionStore(1 << 20, Clock())
        assume(not s.expired(0))
        store.put(s)
        self.assertEqual(store.get(s.session_id), s)
        self.assertEqual(store.sessions(), [s])
        self.assertEqual(store.take(s.session_id), s)

    def test_sessions_of_other_holders_and_contexts_keep_theirs(self):
        mine = self.state(seq=2, digest=b"\x02" * 32)
        backup = self.state(holder="nœud-2", id_context=b"\x07" * 5)
        other = self.state(holder="nœud-2")
        for s in (mine, backup, other):
            self.store.put(s)
        self.assertEqual(self.store.sessions(), [mine, backup, other])

    def test_holder_and_context_are_forgotten_with_their_last_session(self):
        kept, moved = self.state(), self.state(holder="node2")
        self.store.put(kept)
        self.store.put(moved)
        self.store.put(moved.with_holder("node3"))
        self.store.take(kept.session_id)
        self.store.tombstone(moved.session_id, "node3", 50)
        self.assertEqual(len(self.store._contexts), 0)
        again = self.state(holder="node2")
        self.store.put(again)
        self.assertEqual(self.store.get(again.session_id), again)
        self.assertEqual(len(self.store._contexts), 1)

    def test_counters_count_stored_and_taken(self):
        s = self.state()
        self.store.put(s)
        self.store.put(self.state())
        self.store.take(s.session_id)
        self.assertEqual(self.store.counters["stored"], 2)
        self.assertEqual(self.store.counters["taken"], 1)


class ExpiryTests(StoreTestCase):
    """
    Sessions and tombstones expire by the clock.
    """

    def test_session_is_there_until_it_expires(self):
        s = self.state(expires=100)
        self.store.put(s)
        self.clock.advance(99.9)
        self.assertEqual(self.store.get(s.session_id), s)

    def test_get_of_expired_session_is_none_and_drops_it(self):
        s = self.state(expires=100)
        self.store.put(s)
        self.clock.advance(100)
        self.assertIsNone(self.store.get(s.session_id))
        self.assertEqual(len(self.store), 0)
        self.assertEqual(self.store.bytes_used, 0)
        self.assertEqual(self.store.counters["expired"], 1)

    def test_take_of_expired_session_is_none(self):
        s = self.state(expires=100)
        self.store.put(s)
        self.clock.advance(100)
        self.assertIsNone(self.store.take(s.session_id))
        self.assertEqual(self.store.counters["taken"], 0)

    def test_put_of_expired_state_keeps_nothing(self):
        self.clock.advance(200)
        self.store.put(self.state(expires=100))
        self.assertEqual(len(self.store), 0)
        self.assertEqual(self.store.counters["expired"], 1)

    def test_expire_drops_expired_sessions_and_tombstones_only(self):
        soon, later = self.state(expires=10), self.state(expires=100)
        self.store.put(soon)
        self.store.put(later)
        gone, kept = self.state().session_id, self.state().session_id
        self.store.tombstone(gone, "node2", 10)
        self.store.tombstone(kept, "node3", 100)
        self.clock.advance(10)
        self.assertEqual(self.store.expire(), 2)
        self.assertEqual(self.store.get(later.session_id), later)
        self.assertEqual(self.store.holder(kept), "node3")
        self.assertIsNone(self.store.holder(gone))
        self.assertEqual(self.store.bytes_used, ENTRY_COST + TOMBSTONE_OVERHEAD)
        self.assertEqual(self.store.counters["expired"], 1)

    def test_expire_of_nothing_expired_is_zero(self):
        self.store.put(self.state())
        self.assertEqual(self.store.expire(), 0)


class BoundTests(StoreTestCase):
    """
    The store holds at most C{max_bytes}, and evicts the least recently
    used entries first.
    """

    def setUp(self):
        super().setUp()
        self.store = SessionStore(2 * ENTRY_COST, self.clock)

    def test_a_session_costs_its_der_plus_the_overhead(self):
        store = SessionStore(10_000, self.clock)
        store.put(session_state(der=b"\x01" * 1000))
        self.assertEqual(store.bytes_used, 1000 + ENTRY_OVERHEAD)

    def test_taking_frees_the_bytes(self):
        s = self.state()
        self.store.put(s)
        self.store.take(s.session_id)
        self.assertEqual(self.store.bytes_used, 0)

    def test_least_recently_put_is_evicted_first(self):
        first, second, third = self.state(), self.state(), self.state()
        for s in (first, second, third):
            self.store.put(s)
        self.assertIsNone(self.store.get(first.session_id))
        self.assertEqual(self.store.get(second.session_id), second)
        self.assertEqual(self.store.get(third.session_id), third)
        self.assertEqual(self.store.bytes_used, 2 * ENTRY_COST)
        self.assertEqual(self.store.counters["evicted"], 1)

    def test_get_makes_a_session_recently_used(self):
        first, second, third = self.state(), self.state(), self.state()
        self.store.put(first)
        self.store.put(second)
        self.store.get(first.session_id)
        self.store.put(third)
        self.assertEqual(self.store.get(first.session_id), first)
        self.assertIsNone(self.store.get(second.session_id))

    def test_checkpoint_makes_a_session_recently_used(self):
        first, second, third = self.state(), self.state(), self.state()
        self.store.put(first)
        self.store.put(second)
        self.store.update_checkpoint(first.session_id, 1, b"\x01" * 32)
        self.store.put(third)
        self.assertIsNotNone(self.store.get(first.session_id))
        self.assertIsNone(self.store.get(second.session_id))

    def test_tombstones_take_room_and_are_evicted_too(self):
        marked = self.state().session_id
        self.store.tombstone(marked, "node2", 100)
        self.store.put(self.state())
        self.assertEqual(self.store.bytes_used, ENTRY_COST + TOMBSTONE_OVERHEAD)
        self.store.put(self.state())
        self.assertIsNone(self.store.holder(marked))
        self.assertEqual(len(self.store), 2)
        self.assertEqual(self.store.bytes_used, 2 * ENTRY_COST)

    def test_state_larger_than_the_store_is_not_kept(self):
        s = self.state()
        self.store.put(s)
        self.store.put(session_state(der=b"\x01" * (2 * ENTRY_COST)))
        self.assertEqual(self.store.get(s.session_id), s)
        self.assertEqual(len(self.store), 1)
        self.assertEqual(self.store.counters["evicted"], 1)

    def test_many_puts_stay_within_the_bound(self):
        for _ in range(50):
            self.store.put(self.state())
        self.assertEqual(len(self.store), 2)
        self.assertLessEqual(self.store.bytes_used, self.store.max_bytes)
        self.assertEqual(self.store.counters["evicted"], 48)

    def test_eviction_forgets_holders_and_contexts(self):
        for holder in ("node1", "node2", "node3", "node4"):
            self.store.put(self.state(holder=holder))
        self.assertEqual(len(self.store._contexts), 2)

    def test_zero_bytes_is_refused(self):
        self.assertRaises(ValueError, SessionStore, 0, self.clock)


class CheckpointTests(StoreTestCase):
    """
    L{SessionStore.update_checkpoint}: only a higher seq wins.
    """

    def setUp(self):
        super().setUp()
        self.s = self.state()
        self.store.put(self.s)

    def test_higher_seq_is_recorded(self):
        self.assertTrue(self.store.update_checkpoint(
            self.s.session_id, 3, b"\x03" * 32))
        held = self.store.get(self.s.session_id)
        self.assertEqual((held.seq, held.digest), (3, b"\x03" * 32))

    def test_lower_seq_is_refused(self):
        self.store.update_checkpoint(self.s.session_id, 3, b"\x03" * 32)
        self.assertFalse(self.store.update_checkpoint(
            self.s.session_id, 2, b"\x02" * 32))
        self.assertEqual(self.store.get(self.s.session_id).seq, 3)

    def test_equal_seq_is_refused(self):
        self.store.update_checkpoint(self.s.session_id, 3, b"\x03" * 32)
        self.assertFalse(self.store.update_checkpoint(
            self.s.session_id, 3, b"\x04" * 32))
        self.assertEqual(self.store.get(self.s.session_id).digest, b"\x03" * 32)

    def test_checkpoint_of_unknown_session_is_refused(self):
        self.assertFalse(self.store.update_checkpoint(
            self.state().session_id, 1, b"\x01" * 32))

    def test_checkpoint_of_expired_session_is_refused(self):
        self.clock.advance(100)
        self.assertFalse(self.store.update_checkpoint(
            self.s.session_id, 1, b"\x01" * 32))

    def test_first_checkpoint_keeps_the_rest_of_the_state(self):
        self.store.update_checkpoint(self.s.session_id, 1, b"\x01" * 32)
        held = self.store.get(self.s.session_id)
        self.assertEqual(held, session_state(
            session_id=self.s.session_id, der=self.s.der, seq=1,
            digest=b"\x01" * 32))

    def test_later_checkpoints_replace_the_digest(self):
        for seq in (1, 5, 9):
            self.store.update_checkpoint(self.s.session_id, seq,
                                         bytes([seq]) * 32)
        held = self.store.get(self.s.session_id)
        self.assertEqual((held.seq, held.digest, held.der),
                         (9, b"\x09" * 32, self.s.der))

    def test_seq_that_is_not_an_int_raises(self):
        self.assertRaises(ValueError, self.store.update_checkpoint,
                          self.s.session_id, 1.5, b"\x01" * 32)
        self.assertEqual(self.store.get(self.s.session_id), self.s)

    def test_seq_past_the_bound_raises(self):
        self.assertRaises(ValueError, self.store.update_checkpoint,
                          self.s.session_id, MAX_SEQ + 1, b"\x01" * 32)

    def test_digest_that_is_not_bytes_raises(self):
        e = self.assertRaises(ValueError, self.store.update_checkpoint,
                              self.s.session_id, 1, bytearray(32))
        self.assertIn("digest must be bytes, not bytearray", str(e))

    def test_digest_of_wrong_length_raises(self):
        self.assertRaises(ValueError, self.store.update_checkpoint,
                          self.s.session_id, 1, b"\x01" * 16)
        self.assertEqual(self.store.get(self.s.session_id), self.s)

    def test_checkpoint_keeps_the_byte_count(self):
        self.store.update_checkpoint(self.s.session_id, 1, b"\x01" * 32)
        self.assertEqual(self.store.bytes_used, ENTRY_COST)


class DiscardTests(StoreTestCase):
    """
    L{SessionStore.discard}: purging a session.
    """

    def test_discard_removes_the_session(self):
        s = self.state()
        self.store.put(s)
        self.assertTrue(self.store.discard(s.session_id))
        self.assertIsNone(self.store.get(s.session_id))
        self.assertEqual(self.store.bytes_used, 0)
        self.assertEqual(self.store.counters["discarded"], 1)

    def test_discard_of_unknown_session_is_false(self):
        self.assertFalse(self.store.discard(self.state().session_id))

    def test_discard_of_expired_session_is_false(self):
        s = self.state(expires=100)
        self.store.put(s)
        self.clock.advance(100)
        self.assertFalse(self.store.discard(s.session_id))
        self.assertEqual(len(self.store), 0)

    def test_discard_leaves_a_tombstone(self):
        session_id = self.state().session_id
        self.store.tombstone(session_id, "node2", 100)
        self.assertFalse(self.store.discard(session_id))
        self.assertEqual(self.store.holder(session_id), "node2")


class TombstoneTests(StoreTestCase):
    """
    Tombstones say which node took a session, until they expire.
    """

    def test_copy_at_is_what_was_noted_until_the_session_is_put_again(self):
        s = self.state()
        self.store.put(s)
        self.assertIsNone(self.store.copy_at(s.session_id))
        self.store.note_copy(s.session_id, "node2")
        self.store.update_checkpoint(s.session_id, 3, b"d" * 32)
        self.assertEqual(self.store.copy_at(s.session_id), "node2")
        self.assertEqual(self.store.get(s.session_id),
                         s.with_checkpoint(3, b"d" * 32))
        self.store.note_copy(s.session_id, None)
        self.assertIsNone(self.store.copy_at(s.session_id))
        self.store.note_copy(s.session_id, "node3")
        self.store.put(s)
        self.assertIsNone(self.store.copy_at(s.session_id))
        self.store.take(s.session_id)
        self.assertEqual(len(self.store._contexts), 0)

    def test_tombstone_moves_on_the_word_of_the_holder_it_names(self):
        session_id = self.state().session_id
        self.store.tombstone(session_id, "node2", 100, moves=3)
        self.assertFalse(self.store.move_tombstone(session_id, "node4", "node5"))
        self.assertTrue(self.store.move_tombstone(session_id, "node2", "node3"))
        self.assertEqual((self.store.holder(session_id),
                          self.store.moves_seen(session_id)), ("node3", 3))
        self.clock.advance(100)
        self.assertFalse(self.store.move_tombstone(session_id, "node3", "node1"))
        self.assertIsNone(self.store.holder(session_id))

    def test_no_tombstone_is_made_by_a_move(self):
        s = self.state()
        self.store.put(s)
        self.assertFalse(self.store.move_tombstone(s.session_id, s.holder,
                                                   "node3"))
        self.assertEqual(self.store.get(s.session_id), s)

    def test_tombstone_names_the_holder(self):
        s = self.state()
        self.store.put(s)
        self.store.take(s.session_id)
        self.store.tombstone(s.session_id, "node2", 50)
        self.assertEqual(self.store.holder(s.session_id), "node2")
        self.assertEqual(self.store.counters["tombstones"], 1)

    def test_no_tombstone_no_holder(self):
        self.assertIsNone(self.store.holder(self.state().session_id))

    def test_held_session_has_no_holder(self):
        s = self.state()
        self.store.put(s)
        self.assertIsNone(self.store.holder(s.session_id))

    def test_holder_of_any_name_comes_back(self):
        session_id = self.state().session_id
        self.store.tombstone(session_id, "nœud-2 \U0001f600", 50)
        self.assertEqual(self.store.holder(session_id), "nœud-2 \U0001f600")

    def test_tombstone_expires_at_its_time(self):
        session_id = self.state().session_id
        self.store.tombstone(session_id, "node2", 50)
        self.clock.advance(49.9)
        self.assertEqual(self.store.holder(session_id), "node2")
        self.clock.advance(0.1)
        self.assertIsNone(self.store.holder(session_id))
        self.assertEqual(self.store.bytes_used, 0)

    def test_tombstone_is_not_a_session(self):
        session_id = self.state().session_id
        self.store.tombstone(session_id, "node2", 50)
        self.assertEqual(len(self.store), 0)
        self.assertIsNone(self.store.get(session_id))
        self.assertIsNone(self.store.take(session_id))
        self.assertEqual(self.store.bytes_used, TOMBSTONE_OVERHEAD)

    def test_tombstone_replaces_a_held_session(self):
        s = self.state()
        self.store.put(s)
        self.store.tombstone(s.session_id, "node2", 50)
        self.assertIsNone(self.store.get(s.session_id))
        self.assertEqual(len(self.store), 0)
        self.assertEqual(self.store.bytes_used, TOMBSTONE_OVERHEAD)

    def test_session_put_back_replaces_its_tombstone(self):
        s = self.state()
        self.store.tombstone(s.session_id, "node2", 50)
        self.store.put(s)
        self.assertIsNone(self.store.holder(s.session_id))
        self.assertEqual(self.store.get(s.session_id), s)
        self.assertEqual(self.store.bytes_used, ENTRY_COST)


class AccountingTests(TestCase):
    """
    L{ENTRY_OVERHEAD} and L{TOMBSTONE_OVERHEAD} are near what CPython
    really allocates for an entry (C{tracemalloc}), so that C{max_bytes}
    bounds the store's memory.
    """

    count = 20_000

    def traced_bytes_per_entry(self, add):
        store = SessionStore(1 << 40, Clock())
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(self.count):
            add(store)
        return (tracemalloc.get_traced_memory()[0] - before) / self.count

    def assertNear(self, estimate, measured):
        self.assertTrue(0.8 * measured <= estimate <= 1.2 * measured,
                        f"estimate {estimate}, measured {measured:.0f}")

    def test_session_overhead_is_near_the_real_cost(self):
        measured = self.traced_bytes_per_entry(lambda store: store.put(
            session_state(der=os.urandom(145), seq=1, digest=os.urandom(32))))
        self.assertNear(ENTRY_OVERHEAD, measured - 145)

    def test_tombstone_overhead_is_near_the_real_cost(self):
        measured = self.traced_bytes_per_entry(lambda store: store.tombstone(
            session_state().session_id, "node2", 100.0))
        self.assertNear(TOMBSTONE_OVERHEAD, measured)
