"""
L{sslshare.digest}: the running digest's encoding (a known-answer vector
computed here with hashlib, independently of the module), resuming the
chain, the checkpoint pipeline against a real L{SessionStore} behind a slow
link driven by a L{Clock} (coalescing, order, back-pressure, failures,
flush, the three modes), and transcript verification.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from sslshare import digest, sessionid, tls
from sslshare.digest import (
    CLIENT_TO_SERVER,
    MAX_SEQ,
    SERVER_TO_CLIENT,
    ChainExhausted,
    CheckpointPipeline,
    CheckpointPolicy,
    FailureLog,
    RunningDigest,
    TranscriptError,
    verify_transcript,
)
from sslshare.store import SessionStore
from tests.support.pki import pki
from tests.support.sessions import session_state

properties = settings(database=None, deadline=None, max_examples=60)

SESSION_ID = bytes([1]) + bytes(range(2, 33))
EXPORTER = bytes(range(0xA0, 0xC0))
RECORDS = [
    (CLIENT_TO_SERVER, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
    (SERVER_TO_CLIENT, b"HTTP/1.1 204 No Content\r\n\r\n"),
    (SERVER_TO_CLIENT, b"x" * 16384),
]
# The same chain, computed once outside the module (python3 + hashlib),
# pinned so that a change of the encoding cannot go unnoticed.
H0 = "82a8cf62cda0ea668668e8a7e6358a5615553cb2032c0a4edb38eabd095ee789"
H3 = "c11e1a485bcea531c99a3497d8ea83ccba811090c57fdae8395e99284b04f7ad"


def independent_chain(session_id, exporter, records):
    """
    The encoding of the module docstring, written out with hashlib.
    """
    h = hashlib.sha256(b"sslshare digest v1\x00" + session_id + exporter).digest()
    for n, (direction, plaintext) in enumerate(records, 1):
        h = hashlib.sha256(
            h + bytes([direction]) + n.to_bytes(8, "big")
            + len(plaintext).to_bytes(4, "big") + plaintext).digest()
    return h


class EncodingTests(TestCase):
    """
    The chain's encoding and its two ways to begin.
    """

    def test_start_is_the_hash_of_label_session_id_and_exporter(self):
        chain = RunningDigest.start(SESSION_ID, EXPORTER)
        self.assertEqual((chain.seq, chain.digest.hex()), (0, H0))
        self.assertEqual(chain.digest, independent_chain(SESSION_ID, EXPORTER, []))

    def test_known_answer_vector(self):
        chain = RunningDigest.start(SESSION_ID, EXPORTER)
        for direction, plaintext in RECORDS:
            seq, value = chain.update(direction, plaintext)
        self.assertEqual((seq, value.hex()), (3, H3))
        self.assertEqual(value, independent_chain(SESSION_ID, EXPORTER, RECORDS))

    def test_update_returns_seq_and_digest_of_each_record(self):
        chain = RunningDigest.start(SESSION_ID, EXPORTER)
        steps = [chain.update(d, p) for d, p in RECORDS]
        self.assertEqual([s for s, _ in steps], [1, 2, 3])
        self.assertEqual(steps[1][1],
                         independent_chain(SESSION_ID, EXPORTER, RECORDS[:2]))
        self.assertEqual((chain.seq, chain.digest), steps[-1])

    def test_direction_is_part_of_the_digest(self):
        one = RunningDigest.start(SESSION_ID, EXPORTER)
        other = RunningDigest.start(SESSION_ID, EXPORTER)
        self.assertNotEqual(one.update(CLIENT_TO_SERVER, b"a"),
                            other.update(SERVER_TO_CLIENT, b"a"))

    def test_record_boundaries_are_part_of_the_digest(self):
        one = RunningDigest.start(SESSION_ID, EXPORTER)
        one.update(CLIENT_TO_SERVER, b"ab")
        other = RunningDigest.start(SESSION_ID, EXPORTER)
        other.update(CLIENT_TO_SERVER, b"a")
        other.update(CLIENT_TO_SERVER, b"b")
        self.assertNotEqual(one.digest, other.digest)

    def test_update_takes_bytearray_and_memoryview(self):
        values = set()
        for plaintext in (b"abc", bytearray(b"abc"), memoryview(b"xabc")[1:]):
            chain = RunningDigest.start(SESSION_ID, EXPORTER)
            values.add(chain.update(CLIENT_TO_SERVER, plaintext))
        self.assertEqual(len(values), 1)

    def test_resumed_chain_continues_the_one_before(self):
        whole = RunningDigest.start(SESSION_ID, EXPORTER)
        for direction, plaintext in RECORDS:
            whole.update(direction, plaintext)
        first = RunningDigest.start(SESSION_ID, EXPORTER)
        checkpoint = first.update(*RECORDS[0])
        later = RunningDigest.resume(*checkpoint)
        for direction, plaintext in RECORDS[1:]:
            later.update(direction, plaintext)
        self.assertEqual((later.seq, later.digest), (whole.seq, whole.digest))

    def test_update_rejects_a_bad_direction(self):
        chain = RunningDigest.start(SESSION_ID, EXPORTER)
        self.assertRaises(ValueError, chain.update, 2, b"a")
        self.assertEqual(chain.seq, 0)

    def test_update_rejects_empty_and_oversized_records(self):
        chain = RunningDigest.start(SESSION_ID, EXPORTER)
        self.assertRaises(ValueError, chain.update, CLIENT_TO_SERVER, b"")
        self.assertRaises(ValueError, chain.update, CLIENT_TO_SERVER,
                          b"a" * (digest.MAX_RECORD_LENGTH + 1))
        self.assertEqual((chain.seq, chain.digest.hex()), (0, H0))

    def test_start_checks_lengths(self):
        self.assertRaises(ValueError, RunningDigest.start, SESSION_ID[:31], EXPORTER)
        self.assertRaises(ValueError, RunningDigest.start, SESSION_ID, EXPORTER + b"x")

    def test_resume_checks_seq_and_digest(self):
        self.assertRaises(ValueError, RunningDigest.resume, 0, bytes(32))
        self.assertRaises(ValueError, RunningDigest.resume, MAX_SEQ + 1, bytes(32))
        self.assertRaises(ValueError, RunningDigest.resume, 1, b"")

    def test_a_chain_at_the_bound_takes_no_step(self):
        chain = RunningDigest.resume(MAX_SEQ, bytes(32))
        self.assertRaises(ChainExhausted, chain.update, CLIENT_TO_SERVER, b"x")
        self.assertEqual((chain.seq, chain.digest), (MAX_SEQ, bytes(32)))

    def test_repr_shows_no_digest(self):
        chain = RunningDigest.start(SESSION_ID, EXPORTER)
        self.assertNotIn(chain.digest.hex()[:8], repr(chain))



class SlowStore:
    """
    A real L{SessionStore} behind a link that answers C{delay} seconds
    later by the clock, as a peer or a repository does.  The next
    C{failing} writes fail instead; a write cancelled (a timeout) never
    reaches the store.

    @ivar applied: the seqs in the order the store received them.
    """

    def __init__(self, clock, delay=1.0):
        self.clock = clock
        self.delay = delay
        self.store = SessionStore(1 << 20, clock)
        self.state = session_state(expires=1e9)
        self.store.put(self.state)
        self.session_id = self.state.session_id
        self.failing = 0
        self.calls = 0
        self.applied = []

    def write(self, session_id, seq, digest):
        self.calls += 1
        if self.failing:
            self.failing -= 1
            call = self.clock.callLater(self.delay, lambda: d.errback(
                ConnectionLost("store unreachable")))
        else:
            call = self.clock.callLater(self.delay, lambda: d.callback(
                self._apply(session_id, seq, digest)))
        d = Deferred(lambda _: call.cancel())
        return d

    def _apply(self, session_id, seq, digest):
        self.applied.append(seq)
        return self.store.update_checkpoint(session_id, seq, digest)

    def held(self):
        state = self.store.get(self.session_id)
        return state.seq, state.digest


def elapse(clock, seconds, step=0.125):
    """
    Let C{seconds} pass in small steps: L{Clock.advance} moves the time
    first and runs what is due after, so a call scheduled from a call it
    runs counts from the end of the whole advance.
    """
    for _ in range(round(seconds / step)):
        clock.advance(step)


def checkpoints(count, first=1):
    chain = RunningDigest.start(SESSION_ID, EXPORTER)
    chain.seq = first - 1
    return [chain.update(CLIENT_TO_SERVER, b"r%d" % n) for n in range(count)]


class PipelineTestCase(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.slow = SlowStore(self.clock)
        self.connection = StringTransport()
        self.events = []
        self.log = FailureLog(self.clock, log=Logger(observer=self.events.append))

    def elapse(self, seconds):
        elapse(self.clock, seconds)

    def pipeline(self, **policy):
        self.checkpointer = CheckpointPipeline(
            self.slow.session_id, self.slow.write, self.clock,
            CheckpointPolicy(**policy),
            pause=self.connection.pauseProducing,
            resume=self.connection.resumeProducing,
            failure_log=self.log)
        return self.checkpointer


class EveryRecordTests(PipelineTestCase):
    """
    The default mode: write as fast as the store answers.
    """

    def test_first_checkpoint_is_written_at_once(self):
        pipeline = self.pipeline()
        pipeline.enqueue(*checkpoints(1)[0])
        self.assertEqual(self.slow.calls, 1)
        self.elapse(1)
        self.assertEqual(self.slow.held(), checkpoints(1)[0])
        self.assertEqual(pipeline.last_acknowledged, checkpoints(1)[0])
        self.assertEqual(pipeline.counters["written"], 1)

    def test_slow_store_gets_only_the_newest_waiting_checkpoint(self):
        pipeline = self.pipeline()
        steps = checkpoints(10)
        for step in steps:
            pipeline.enqueue(*step)
        self.assertEqual(self.slow.calls, 1)
        self.elapse(1)
        self.assertEqual(self.slow.calls, 2)
        self.elapse(1)
        self.assertEqual(self.slow.applied, [1, 10])
        self.assertEqual(self.slow.held(), steps[-1])
        self.assertEqual(pipeline.counters,
                         Counter(written=2, coalesced=8))

    def test_one_write_in_flight_at_a_time(self):
        pipeline = self.pipeline()
        for step in checkpoints(5):
            pipeline.enqueue(*step)
            self.elapse(0.25)
        # Seq 1 went out at 0, seq 4 when it was answered, at 1.0.
        self.assertEqual(self.slow.calls, 2)
        self.elapse(5)
        self.assertEqual(self.slow.applied, [1, 4, 5])

    @properties
    @given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 20)),
                    min_size=1, max_size=40),
           st.integers(1, 16))
    def test_never_reorders(self, schedule, eighths):
        """
        Any interleaving of records and store answers: the store receives
        increasing seqs and, after a flush, holds the newest.
        """
        delay = eighths / 8
        clock = Clock()
        slow = SlowStore(clock, delay)
        pipeline = CheckpointPipeline(slow.session_id, slow.write, clock)
        chain = RunningDigest.start(SESSION_ID, EXPORTER)
        for records, wait in schedule:
            for _ in range(records):
                pipeline.enqueue(*chain.update(SERVER_TO_CLIENT, b"z"))
            elapse(clock, wait / 8)
        done = pipeline.flush()
        elapse(clock, delay * 3)
        self.assertEqual(slow.applied, sorted(set(slow.applied)))
        if chain.seq:
            self.assertTrue(self.successResultOf(done))
            self.assertEqual(slow.held(), (chain.seq, chain.digest))
            self.assertEqual(pipeline.counters["written"]
                             + pipeline.counters["coalesced"], chain.seq)

    def test_seq_must_grow(self):
        pipeline = self.pipeline()
        steps = checkpoints(2)
        pipeline.enqueue(*steps[1])
        self.assertRaises(ValueError, pipeline.enqueue, *steps[0])
        self.assertRaises(ValueError, pipeline.enqueue, *steps[1])

    def test_resumed_session_starts_from_its_checkpoint(self):
        start = checkpoints(1, first=7)[0]
        pipeline = CheckpointPipeline(self.slow.session_id, self.slow.write,
                                      self.clock, start=start)
        self.assertEqual(pipeline.last_acknowledged, start)
        self.assertRaises(ValueError, pipeline.enqueue, *start)
        pipeline.enqueue(*checkpoints(1, first=8)[0])
        self.elapse(1)
        self.assertEqual(self.slow.applied, [8])

    def test_store_that_answers_at_once(self):
        counters = Counter()
        store = SessionStore(1 << 20, self.clock)
        state = session_state(expires=1e9)
        store.put(state)
        pipeline = CheckpointPipeline(state.session_id, store.update_checkpoint,
                                      self.clock, counters=counters)
        for step in checkpoints(3):
            pipeline.enqueue(*step)
        self.assertEqual(counters, Counter(written=3))
        self.assertEqual(store.get(state.session_id).seq, 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pipelines_share_a_counter(self):
        shared = Counter()
        for _ in range(2):
            pipeline = CheckpointPipeline(self.slow.session_id, self.slow.write,
                                          self.clock, counters=shared)
            pipeline.enqueue(*checkpoints(1)[0])
            self.elapse(1)
        self.assertEqual(shared["written"], 1)
        self.assertEqual(shared["rejected"], 1)


class BackPressureTests(PipelineTestCase):
    """
    A slow store pauses the connection only past the bound.
    """

    def test_under_the_bound_the_connection_keeps_going(self):
        pipeline = self.pipeline(bound=4)
        for step in checkpoints(4):
            pipeline.enqueue(*step)
        self.assertEqual(pipeline.backlog, 4)
        self.assertFalse(pipeline.paused)
        self.assertEqual(self.connection.producerState, "producing")

    def test_past_the_bound_the_connection_pauses(self):
        pipeline = self.pipeline(bound=4)
        for step in checkpoints(5):
            pipeline.enqueue(*step)
        self.assertTrue(pipeline.paused)
        self.assertEqual(self.connection.producerState, "paused")
        self.assertEqual(pipeline.counters["pauses"], 1)

    def test_connection_resumes_under_half_the_bound(self):
        pipeline = self.pipeline(bound=4, max_pause=10)
        for step in checkpoints(5):
            pipeline.enqueue(*step)
        self.elapse(1)
        # Seq 1 answered: 4 records still owed, not under 2.
        self.assertEqual(pipeline.backlog, 4)
        self.assertEqual(self.connection.producerState, "paused")
        self.elapse(1)
        self.assertEqual(pipeline.backlog, 0)
        self.assertFalse(pipeline.paused)
        self.assertEqual(self.connection.producerState, "producing")
        self.assertEqual(pipeline.counters["pauses"], 1)

    def test_failed_writes_never_pause_the_connection(self):
        """
        A store that is down fails every write: the records it stood for
        are skipped, the connection goes on, and the newest is retried.
        """
        pipeline = self.pipeline(bound=2, retry_initial=0.5, retry_max=0.5)
        self.slow.delay = 0.125
        self.slow.failing = 100
        for step in checkpoints(50):
            pipeline.enqueue(*step)
            self.elapse(0.125)
        self.assertEqual(pipeline.counters["pauses"], 0)
        self.assertEqual(self.connection.producerState, "producing")
        self.assertEqual(pipeline.counters["failed"], 50)
        self.slow.failing = 0
        self.elapse(2)
        self.assertEqual(self.slow.applied, [50])

    def test_a_store_that_fails_slowly_pauses_only_before_its_first_answer(self):
        """
        Before a store has answered at all, a backlog past the bound pauses
        the connection; its first failure ends the pause, and it never
        pauses again, however long each failure takes.
        """
        pipeline = self.pipeline(bound=2, retry_initial=0.5, retry_max=0.5)
        self.slow.delay = 0.125
        self.slow.failing = 100
        for step in checkpoints(60):
            pipeline.enqueue(*step)
            self.clock.advance(0.03125)
        self.assertEqual(pipeline.counters["pauses"], 1)
        self.assertEqual(pipeline.counters["pauses_cut"], 0)
        self.assertGreater(pipeline.counters["failed"], 1)
        self.assertEqual(self.connection.producerState, "producing")

    def unanswered(self):
        """
        A pipeline to a store that takes longer to answer than the test
        lasts.
        """
        self.slow.delay = 60
        return self.pipeline(bound=4, max_pause=0.25, timeout=100)

    def test_pause_ends_at_max_pause(self):
        pipeline = self.unanswered()
        for step in checkpoints(5):
            pipeline.enqueue(*step)
        self.assertEqual(self.connection.producerState, "paused")
        self.elapse(0.25)
        self.assertEqual(self.connection.producerState, "producing")
        self.assertEqual(pipeline.counters["pauses_cut"], 1)
        self.assertIn("did not answer in 0.25 s", self.events[0]["log_format"]
                      .format(**self.events[0]))

    def test_store_that_never_answers_pauses_only_once(self):
        pipeline = self.unanswered()
        for step in checkpoints(200):
            pipeline.enqueue(*step)
            self.elapse(0.125)
        self.assertEqual(pipeline.counters["pauses"], 1)
        self.assertEqual(self.connection.producerState, "producing")

    def test_store_that_answers_again_may_pause_again(self):
        """
        Once the store answers, it is slow, not stalled: back-pressure
        applies again, each pause at most max_pause long.
        """
        pipeline = self.pipeline(bound=4, max_pause=0.25, timeout=100)
        self.slow.delay = 2
        steps = checkpoints(20)
        for step in steps[:5]:
            pipeline.enqueue(*step)
        self.elapse(2)
        self.assertEqual(self.slow.applied, [1])
        self.assertEqual(pipeline.counters["pauses_cut"], 1)
        for step in steps[5:]:
            pipeline.enqueue(*step)
        self.assertEqual(pipeline.counters["pauses"], 2)
        self.assertEqual(self.connection.producerState, "paused")
        self.elapse(0.25)
        self.assertEqual(self.connection.producerState, "producing")


class FailureTests(PipelineTestCase):
    """
    A failed write is counted, logged at a limited rate, and retried.
    """

    def test_failure_is_counted_and_the_next_checkpoint_goes_out(self):
        pipeline = self.pipeline()
        self.slow.failing = 1
        steps = checkpoints(2)
        pipeline.enqueue(*steps[0])
        pipeline.enqueue(*steps[1])
        self.elapse(1)
        self.assertEqual(pipeline.counters["failed"], 1)
        self.elapse(1)
        self.assertEqual(self.slow.applied, [2])
        self.assertEqual(pipeline.last_acknowledged, steps[1])

    def test_failed_newest_checkpoint_is_retried_with_growing_delay(self):
        pipeline = self.pipeline(retry_initial=0.5, retry_max=1.5)
        self.slow.failing = 3
        pipeline.enqueue(*checkpoints(1)[0])
        sent_at = []
        for _ in range(30):
            calls = self.slow.calls
            self.elapse(0.25)
            if self.slow.calls != calls:
                sent_at.append(self.clock.seconds())
        # Fails at 1, retried 0.5 later; fails at 2.5, retried 1.0 later;
        # fails at 4.5, retried 1.5 later (the cap); accepted at 7.
        self.assertEqual(sent_at, [1.5, 3.5, 6.0])
        self.assertEqual(self.slow.applied, [1])
        self.assertEqual(pipeline.counters, Counter(failed=3, written=1))

    def test_new_checkpoint_retries_at_once(self):
        pipeline = self.pipeline(retry_initial=10)
        self.slow.failing = 1
        pipeline.enqueue(*checkpoints(1)[0])
        self.elapse(1)
        pipeline.enqueue(*checkpoints(1, first=2)[0])
        self.assertEqual(self.slow.calls, 2)
        self.elapse(1)
        self.assertEqual(self.slow.applied, [2])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_store_that_does_not_answer_times_out(self):
        self.slow.delay = 60
        pipeline = self.pipeline(timeout=2)
        pipeline.enqueue(*checkpoints(1)[0])
        self.elapse(2)
        self.assertEqual(pipeline.counters["failed"], 1)
        self.assertEqual(self.slow.applied, [])

    def test_failures_are_logged_at_a_limited_rate(self):
        self.slow.delay = 0.125
        pipeline = self.pipeline(retry_initial=0.125, retry_max=0.125)
        self.slow.failing = 100
        pipeline.enqueue(*checkpoints(1)[0])
        # A failure every 0.25 s from 0.125 on; one warning per 10 s.
        self.elapse(6)
        self.assertEqual(pipeline.counters["failed"], 24)
        self.assertEqual(len(self.events), 1)
        self.elapse(4.5)
        self.assertEqual(len(self.events), 2)
        self.assertEqual(self.events[1]["suppressed"], 39)
        self.assertIn("store unreachable", self.events[1]["why"])
        self.assertNotIn(checkpoints(1)[0][1].hex(), repr(self.events))

    def test_refused_checkpoint_is_counted_as_rejected(self):
        pipeline = self.pipeline()
        self.slow.store.discard(self.slow.session_id)
        pipeline.enqueue(*checkpoints(1)[0])
        self.elapse(1)
        self.assertEqual(pipeline.counters, Counter(rejected=1))
        self.assertEqual(pipeline.last_acknowledged, (0, b""))


class FlushTests(PipelineTestCase):
    """
    Waiting for the newest checkpoint, for a clean close.
    """

    def test_flush_fires_when_the_newest_is_acknowledged(self):
        pipeline = self.pipeline()
        steps = checkpoints(3)
        for step in steps:
            pipeline.enqueue(*step)
        done = pipeline.flush()
        self.elapse(1)
        self.assertNoResult(done)
        self.elapse(1)
        self.assertTrue(self.successResultOf(done))
        self.assertEqual(self.slow.held(), steps[-1])

    def test_flush_hands_the_waiting_checkpoint_to_keep_at_once(self):
        kept = []
        pipeline = CheckpointPipeline(
            self.slow.session_id, self.slow.write, self.clock,
            keep=lambda *checkpoint: kept.append(checkpoint))
        steps = checkpoints(3)
        pipeline.enqueue(*steps[0])
        pipeline.flush()
        # Nothing waits behind the write in flight: the store's answer is
        # the one to wait for.
        self.assertEqual(kept, [])
        for step in steps[1:]:
            pipeline.enqueue(*step)
        pipeline.flush()
        self.assertEqual(kept, [(self.slow.session_id, *steps[-1])])
        self.assertEqual(self.slow.held(), (0, b""))

    def test_flush_with_nothing_owed_fires_at_once(self):
        pipeline = self.pipeline()
        self.assertTrue(self.successResultOf(pipeline.flush()))
        pipeline.enqueue(*checkpoints(1)[0])
        self.elapse(1)
        self.assertTrue(self.successResultOf(pipeline.flush()))

    def test_flush_waits_through_failures(self):
        pipeline = self.pipeline(retry_initial=0.5)
        self.slow.failing = 1
        pipeline.enqueue(*checkpoints(1)[0])
        done = pipeline.flush()
        self.elapse(1)
        self.assertNoResult(done)
        self.elapse(1.5)
        self.assertTrue(self.successResultOf(done))

    def test_flush_answers_false_when_the_store_refuses(self):
        pipeline = self.pipeline()
        self.slow.store.discard(self.slow.session_id)
        pipeline.enqueue(*checkpoints(1)[0])
        done = pipeline.flush()
        self.elapse(1)
        self.assertFalse(self.successResultOf(done))
        self.assertFalse(self.successResultOf(pipeline.flush()))

    def test_stop_answers_waiting_flushes_false_and_cancels_timers(self):
        pipeline = self.pipeline(mode="interval", period=5)
        pipeline.enqueue(*checkpoints(1)[0])
        self.slow.failing = 1
        done = pipeline.flush()
        self.elapse(1)
        pipeline.stop()
        self.assertFalse(self.successResultOf(done))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertRaises(RuntimeError, pipeline.enqueue,
                          *checkpoints(1, first=2)[0])

    def test_cancelled_flush_stops_waiting_only(self):
        pipeline = self.pipeline()
        pipeline.enqueue(*checkpoints(1)[0])
        done = pipeline.flush()
        done.cancel()
        self.failureResultOf(done, CancelledError)
        self.elapse(1)
        self.assertEqual(self.slow.applied, [1])


class IntervalTests(PipelineTestCase):
    """
    Interval mode: the newest checkpoint once per period.
    """

    def test_newest_checkpoint_goes_out_once_per_period(self):
        pipeline = self.pipeline(mode="interval", period=2)
        steps = checkpoints(5)
        for step in steps:
            pipeline.enqueue(*step)
            self.elapse(0.25)
        self.assertEqual(self.slow.calls, 0)
        self.elapse(0.75)
        self.assertEqual(self.slow.calls, 1)
        self.elapse(1)
        self.assertEqual(self.slow.applied, [5])
        self.assertEqual(pipeline.counters, Counter(written=1, coalesced=4))

    def test_idle_session_keeps_no_timer(self):
        pipeline = self.pipeline(mode="interval", period=2)
        pipeline.enqueue(*checkpoints(1)[0])
        self.elapse(3)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        pipeline.enqueue(*checkpoints(1, first=2)[0])
        self.elapse(2)
        self.elapse(1)
        self.assertEqual(self.slow.applied, [1, 2])

    def test_records_during_a_write_wait_for_the_next_period(self):
        pipeline = self.pipeline(mode="interval", period=2)
        pipeline.enqueue(*checkpoints(1)[0])
        self.elapse(2)
        pipeline.enqueue(*checkpoints(1, first=2)[0])
        self.elapse(1)
        self.assertEqual(self.slow.calls, 1)
        self.elapse(1)
        self.assertEqual(self.slow.calls, 2)

    def test_flush_writes_without_waiting_for_the_period(self):
        pipeline = self.pipeline(mode="interval", period=60)
        pipeline.enqueue(*checkpoints(1)[0])
        done = pipeline.flush()
        self.assertEqual(self.slow.calls, 1)
        self.elapse(1)
        self.assertTrue(self.successResultOf(done))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_store_that_keeps_up_with_the_period_never_pauses(self):
        pipeline = self.pipeline(mode="interval", period=2, bound=4)
        seqs = iter(checkpoints(300))
        for _ in range(3):
            for _ in range(100):
                pipeline.enqueue(*next(seqs))
            # A tick sends the newest; the store answers a second later.
            self.elapse(2)
            self.assertFalse(pipeline.paused)
        self.assertEqual(pipeline.counters["pauses"], 0)

    def test_store_slower_than_the_period_pauses(self):
        self.slow.delay = 5
        pipeline = self.pipeline(mode="interval", period=2, bound=4)
        seqs = iter(checkpoints(200))
        for _ in range(100):
            pipeline.enqueue(*next(seqs))
        self.elapse(2)
        self.assertFalse(pipeline.paused)
        for _ in range(100):
            pipeline.enqueue(*next(seqs))
        # The next tick finds the last tick's records still unanswered.
        self.elapse(2)
        self.assertTrue(pipeline.paused)
        self.elapse(5)
        self.assertFalse(pipeline.paused)


class OffTests(PipelineTestCase):
    """
    Off: nothing is written, nothing is owed.
    """

    def test_off_writes_nothing(self):
        pipeline = self.pipeline(mode="off")
        for step in checkpoints(100):
            pipeline.enqueue(*step)
        self.elapse(10)
        self.assertEqual(self.slow.calls, 0)
        self.assertFalse(pipeline.paused)
        self.assertTrue(self.successResultOf(pipeline.flush()))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PolicyTests(TestCase):
    def test_defaults(self):
        policy = CheckpointPolicy()
        self.assertEqual((policy.mode, policy.bound), ("every-record", 64))

    def test_unknown_mode(self):
        e = self.assertRaises(ValueError, CheckpointPolicy, mode="sometimes")
        self.assertIn("every-record, interval, off", str(e))

    def test_bad_numbers(self):
        for fields in ({"period": 0}, {"period": float("inf")}, {"bound": 0},
                       {"bound": 1.5}, {"timeout": -1}, {"period": True}):
            self.assertRaises(ValueError, CheckpointPolicy, **fields)


def record_types(data):
    """
    The content types of the TLS records in C{data}, which holds whole
    records.
    """
    types = []
    while data:
        types.append(data[0])
        data = data[5 + int.from_bytes(data[3:5], "big"):]
    return types


class Handshaken:
    """
    The sslshare engine (server) and a pyOpenSSL client, after a full
    handshake over memory BIOs, with the session id the server issued.
    """

    def __init__(self, version):
        made = []
        service = tls.VirtualService(
            "web", pki().ec_chain, pki().ec_key,
            sessionid.service_id_context("test", "web"), ("localhost",))
        context = tls.ServerContext(
            [service], sessionid.owner_tag("test", "node1"),
            on_new_session=lambda c, session_id, der: made.append(session_id),
            minimum_version=version, maximum_version=version)
        self.server = context.serverConnectionForTLS(None)
        client_context = SSL.Context(SSL.TLS_METHOD)
        wire = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}[version]
        client_context.set_min_proto_version(wire)
        client_context.set_max_proto_version(wire)
        self.client = SSL.Connection(client_context)
        self.client.set_connect_state()
        self.client.set_tlsext_host_name(b"localhost")
        done = set()
        for _ in range(10):
            for name, end in (("client", self.client), ("server", self.server)):
                try:
                    end.do_handshake()
                    done.add(name)
                except SSL.WantReadError:
                    pass
            self.to_server()
            self.to_client()
            if done == {"client", "server"}:
                break
        # TLS 1.3: the ticket came after the handshake.
        try:
            self.client.recv(1)
        except SSL.WantReadError:
            pass
        self.session_id = made[-1]

    def to_server(self):
        """
        Move what the client wrote to the server; return it.
        """
        data = self._drain(self.client)
        if data:
            self.server.bio_write(data)
        return data

    def to_client(self):
        data = self._drain(self.server)
        if data:
            self.client.bio_write(data)
        return data

    @staticmethod
    def _drain(end):
        chunks = []
        while True:
            try:
                chunks.append(end.bio_read(1 << 16))
            except SSL.WantReadError:
                return b"".join(chunks)


class EngineTests(TestCase):
    """
    What the wiring relies on, checked on the real engine (client: pyOpenSSL
    over memory BIOs): one C{send} is one record, one C{recv} yields at most
    one record, and the client computes the same exporter, so it can
    recompute the digest of its own transcript.
    """

    def test_client_and_server_agree_on_the_exporter(self):
        for version in ("1.2", "1.3"):
            pair = Handshaken(version)
            value = digest.exporter(pair.server, pair.session_id)
            self.assertEqual(len(value), 32)
            self.assertEqual(value, pair.client.export_keying_material(
                b"EXPORTER-sslshare-digest", 32, pair.session_id))
            self.assertNotEqual(value, pair.client.export_keying_material(
                b"EXPORTER-sslshare-digest", 32, bytes(32)))

    def test_one_send_is_one_record(self):
        pair = Handshaken("1.3")
        data = os.urandom(40000)
        sent = 0
        while sent < len(data):
            # As Twisted's TLS protocol writes: 16 KiB at most per send.
            count = pair.server.send(data[sent:sent + 2 ** 14])
            self.assertEqual(record_types(pair.to_client()), [23])
            sent += count
        self.assertEqual(sent, len(data))

    def test_one_recv_yields_at_most_one_record(self):
        pair = Handshaken("1.2")
        for size in (100, 16384, 7):
            pair.client.send(b"c" * size)
        pair.to_server()
        self.assertEqual([len(pair.server.recv(2 ** 15)) for _ in range(3)],
                         [100, 16384, 7])

    def test_client_transcript_verifies_to_the_server_digest(self):
        for version in ("1.2", "1.3"):
            pair = Handshaken(version)
            server = RunningDigest.start(
                pair.session_id, digest.exporter(pair.server, pair.session_id))
            recorded = []
            for direction, plaintext in RECORDS:
                if direction == CLIENT_TO_SERVER:
                    pair.client.send(plaintext)
                    pair.to_server()
                    received = pair.server.recv(2 ** 15)
                    server.update(CLIENT_TO_SERVER, received)
                else:
                    count = pair.server.send(plaintext)
                    server.update(SERVER_TO_CLIENT, plaintext[:count])
                    pair.to_client()
                    received = pair.client.recv(2 ** 15)
                recorded.append((direction, received))
            self.assertEqual(
                verify_transcript(
                    transcript(recorded), session_id=pair.session_id,
                    exporter=pair.client.export_keying_material(
                        b"EXPORTER-sslshare-digest", 32, pair.session_id)),
                (server.seq, server.digest))


def transcript(records):
    names = {CLIENT_TO_SERVER: "c2s", SERVER_TO_CLIENT: "s2c"}
    return [json.dumps({"direction": names[d], "record": p.hex()}) + "\n"
            for d, p in records]


class TranscriptTests(TestCase):
    """
    C{sslshare digest verify}'s recomputation.
    """

    def test_round_trip_from_the_start(self):
        self.assertEqual(
            verify_transcript(transcript(RECORDS), session_id=SESSION_ID,
                              exporter=EXPORTER),
            (3, bytes.fromhex(H3)))

    def test_round_trip_from_a_checkpoint(self):
        chain = RunningDigest.start(SESSION_ID, EXPORTER)
        start = chain.update(*RECORDS[0])
        seq, value = verify_transcript(transcript(RECORDS[1:]),
                                       start_seq=start[0], start_digest=start[1])
        self.assertEqual((seq, value.hex()), (3, H3))

    def test_random_records_round_trip(self):
        records = [(n % 2, os.urandom(1 + n * 97)) for n in range(40)]
        chain = RunningDigest.start(SESSION_ID, EXPORTER)
        for record in records:
            chain.update(*record)
        self.assertEqual(verify_transcript(transcript(records),
                                           session_id=SESSION_ID, exporter=EXPORTER),
                         (chain.seq, chain.digest))

    def test_until_seq_stops_at_an_older_checkpoint(self):
        seq, value = verify_transcript(transcript(RECORDS), session_id=SESSION_ID,
                                       exporter=EXPORTER, until_seq=2)
        self.assertEqual((seq, value),
                         (2, independent_chain(SESSION_ID, EXPORTER, RECORDS[:2])))

    def test_transcript_that_ends_before_until_seq(self):
        e = self.assertRaises(TranscriptError, verify_transcript,
                              transcript(RECORDS), session_id=SESSION_ID,
                              exporter=EXPORTER, until_seq=5)
        self.assertEqual(str(e), "the transcript ends at seq 3, before seq 5")

    def test_blank_lines_are_skipped(self):
        lines = transcript(RECORDS)
        lines.insert(1, "\n")
        lines.append("   \n")
        self.assertEqual(verify_transcript(lines, session_id=SESSION_ID,
                                           exporter=EXPORTER)[0], 3)

    def test_one_way_to_begin(self):
        for arguments in ({}, {"session_id": SESSION_ID},
                          {"start_seq": 1},
                          {"session_id": SESSION_ID, "exporter": EXPORTER,
                           "start_seq": 1, "start_digest": bytes(32)}):
            self.assertRaises(ValueError, verify_transcript, [], **arguments)

    def bad_line(self, line, number=2):
        lines = transcript(RECORDS[:1]) + [line] + transcript(RECORDS[1:])
        e = self.assertRaises(TranscriptError, verify_transcript, lines,
                              session_id=SESSION_ID, exporter=EXPORTER)
        self.assertEqual(e.line, number)
        self.assertTrue(str(e).startswith(f"line {number}: "), str(e))
        return e.reason

    def test_line_that_is_not_json(self):
        self.assertIn("not JSON", self.bad_line('{"direction": "c2s",\n'))

    def test_line_that_is_not_an_object(self):
        self.assertEqual(self.bad_line('["c2s", "00"]\n'), "not a JSON object")

    def test_line_missing_a_key(self):
        self.assertEqual(self.bad_line('{"direction": "c2s"}\n'), "missing record")

    def test_line_with_an_unknown_key(self):
        self.assertEqual(
            self.bad_line('{"direction": "c2s", "record": "00", "time": 1}\n'),
            "unknown key 'time'")

    def test_line_with_a_bad_direction(self):
        self.assertEqual(self.bad_line('{"direction": "up", "record": "00"}\n'),
                         "direction must be \"c2s\" or \"s2c\", not 'up'")
        self.bad_line('{"direction": 0, "record": "00"}\n')

    def test_line_with_a_record_that_is_not_hex(self):
        for record in ('"0g"', '"abc"', '"ab cd"', "12"):
            self.bad_line('{"direction": "s2c", "record": %s}\n' % record)

    def test_line_with_an_empty_or_oversized_record(self):
        self.assertEqual(
            self.bad_line('{"direction": "s2c", "record": ""}\n'),
            "record must be 1 to 16384 bytes, not 0")
        self.assertEqual(
            self.bad_line(transcript([(1, b"a" * 16385)])[0]),
            "record must be 1 to 16384 bytes, not 16385")

    def test_error_names_the_line_number_after_blank_lines(self):
        lines = ["\n", "\n", "nonsense\n"]
        e = self.assertRaises(TranscriptError, verify_transcript, lines,
                              session_id=SESSION_ID, exporter=EXPORTER)
        self.assertEqual(e.line, 3)
