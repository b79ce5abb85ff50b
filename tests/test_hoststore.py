"""
L{sslshare.hoststore}: the table of sealed sessions the worker processes
of one host share, within one process (time driven by a
L{twisted.internet.task.Clock}) and between real processes mapping the same
memfd: a session is taken once however many race for it, and a process
killed while it holds a bucket's lock leaves the bucket usable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from sslshare import hoststore
from sslshare.hoststore import HostStore, HostStoreError, Shape
from sslshare.repository import RepositoryError, Taken
from sslshare.repository.table import TableRepository
from sslshare.state import SEALED_CHECKPOINT_LENGTH
from tests.support.sessions import session_id_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEALED = b"\x01" * 272
LATER = 100.0


def digest(seq: int) -> bytes:
    return bytes((seq,)) * SEALED_CHECKPOINT_LENGTH


class HostStoreTestCase(TestCase):
    shape = Shape(buckets=4)

    def setUp(self):
        self.clock = Clock()
        self.table = self.open()

    def open(self, shape: Shape | None = None) -> HostStore:
        table = HostStore(hoststore.create_table(shape or self.shape),
                          self.clock)
        self.addCleanup(table.close)
        return table


class TakeTests(HostStoreTestCase):
    """
    Putting and taking sessions: a take moves the blob out.
    """

    def test_take_returns_the_blob_put(self):
        session_id = session_id_of()
        self.assertTrue(self.table.put(session_id, SEALED, LATER))
        entry = self.table.take(session_id)
        self.assertEqual((entry.sealed, entry.expires, entry.seq,
                          entry.digest), (SEALED, LATER, 0, b""))
        self.assertEqual(self.table.counters["hits"], 1)

    def test_a_taken_session_is_gone(self):
        session_id = session_id_of()
        self.table.put(session_id, SEALED, LATER)
        self.table.take(session_id)
        self.assertIsNone(self.table.take(session_id))
        self.assertEqual(self.table.counters["misses"], 1)

    def test_unknown_session_is_a_miss(self):
        self.assertIsNone(self.table.take(session_id_of()))

    def test_expired_session_is_not_taken(self):
        session_id = session_id_of()
        self.table.put(session_id, SEALED, LATER)
        self.clock.advance(LATER)
        self.assertIsNone(self.table.take(session_id))
        self.assertEqual(self.table.counters["expired"], 1)

    def test_expired_session_is_not_put(self):
        self.clock.advance(LATER)
        self.assertFalse(self.table.put(session_id_of(), SEALED, LATER))
        self.assertEqual(self.table.counters["expired"], 1)

    def test_blob_larger_than_a_slot_is_not_put(self):
        session_id = session_id_of()
        too_large = b"\x01" * (self.table.shape.max_blob + 1)
        self.assertFalse(self.table.put(session_id, too_large, LATER))
        self.assertIsNone(self.table.take(session_id))
        self.assertEqual(self.table.counters["too_large"], 1)

    def test_largest_blob_round_trips(self):
        session_id = session_id_of()
        largest = os.urandom(self.table.shape.max_blob)
        self.table.put(session_id, largest, LATER)
        self.assertEqual(self.table.take(session_id).sealed, largest)

    def test_put_replaces_the_blob(self):
        session_id = session_id_of()
        self.table.put(session_id, b"\x01" * 300, LATER)
        self.table.put(session_id, b"\x02" * 200, LATER + 1)
        entry = self.table.take(session_id)
        self.assertEqual((entry.sealed, entry.expires),
                         (b"\x02" * 200, LATER + 1))
        self.assertIsNone(self.table.take(session_id))

    def test_purge_removes_the_session(self):
        session_id = session_id_of()
        self.table.put(session_id, SEALED, LATER)
        self.assertTrue(self.table.purge(session_id))
        self.assertFalse(self.table.purge(session_id))
        self.assertIsNone(self.table.take(session_id))

    def test_not_a_session_id_is_refused(self):
        for bad in (b"", b"\x01" * 31, bytes(32)):
            self.assertRaises(ValueError, self.table.take, bad)


class CheckpointTests(HostStoreTestCase):
    """
    The checkpoint kept beside a blob only goes forward.
    """

    def test_checkpoint_is_taken_with_the_blob(self):
        session_id = session_id_of()
        self.table.put(session_id, SEALED, LATER)
        self.assertTrue(self.table.checkpoint(session_id, 3, digest(3)))
        entry = self.table.take(session_id)
        self.assertEqual((entry.seq, entry.digest), (3, digest(3)))

    def test_older_checkpoint_is_refused(self):
        session_id = session_id_of()
        self.table.put(session_id, SEALED, LATER)
        self.table.checkpoint(session_id, 5, digest(5))
        self.assertFalse(self.table.checkpoint(session_id, 4, digest(4)))
        self.assertEqual(self.table.take(session_id).seq, 5)
        self.assertEqual(self.table.counters["stale_checkpoints"], 1)

    def test_put_keeps_the_checkpoint(self):
        session_id = session_id_of()
        self.table.put(session_id, SEALED, LATER)
        self.table.checkpoint(session_id, 7, digest(7))
        self.table.put(session_id, b"\x02" * 100, LATER)
        entry = self.table.take(session_id)
        self.assertEqual((entry.sealed, entry.seq, entry.digest),
                         (b"\x02" * 100, 7, digest(7)))

    def test_checkpoint_of_absent_session_is_not_recorded(self):
        self.assertFalse(self.table.checkpoint(session_id_of(), 1, digest(1)))

    def test_checkpoint_before_the_first_record_has_no_digest(self):
        session_id = session_id_of()
        self.table.put(session_id, SEALED, LATER)
        self.assertTrue(self.table.checkpoint(session_id, 2, b""))
        entry = self.table.take(session_id)
        self.assertEqual((entry.seq, entry.digest), (2, b""))

    def test_malformed_checkpoint_is_refused(self):
        session_id = session_id_of()
        self.table.put(session_id, SEALED, LATER)
        self.assertRaises(ValueError, self.table.checkpoint, session_id, -1,
                          digest(1))
        self.assertRaises(ValueError, self.table.checkpoint, session_id, 1,
                          b"short")


class ReadAndExpireTests(HostStoreTestCase):
    """
    The checkpoint of a live blob read without taking it, and the expired
    slots freed.
    """

    def test_checkpoint_of_a_live_blob_leaves_it(self):
        session_id = session_id_of()
        self.table.put(session_id, SEALED, LATER)
        self.assertEqual(self.table.checkpoint_of(session_id), (0, b""))
        self.table.checkpoint(session_id, 4, digest(4))
        self.assertEqual(self.table.checkpoint_of(session_id), (4, digest(4)))
        self.assertEqual(self.table.take(session_id).sealed, SEALED)

    def test_checkpoint_of_an_expired_or_absent_blob_is_none(self):
        session_id = session_id_of()
        self.table.put(session_id, SEALED, LATER)
        self.clock.advance(LATER)
        self.assertIsNone(self.table.checkpoint_of(session_id))
        self.assertIsNone(self.table.checkpoint_of(session_id_of()))

    def test_expire_frees_the_expired_slots_only(self):
        old, young = session_id_of(), session_id_of()
        self.table.put(old, SEALED, 10.0)
        self.table.put(young, SEALED, LATER)
        self.clock.advance(10.0)
        self.assertEqual(self.table.expire(), 1)
        self.assertEqual(self.table.expire(), 0)
        self.assertIsNone(self.table.take(old))
        self.assertEqual(self.table.counters["misses"], 1)
        self.assertEqual(self.table.take(young).sealed, SEALED)


class TableRepositoryTests(HostStoreTestCase):
    """
    L{TableRepository}: the table as a worker's repository, every answer
    already there.
    """

    def setUp(self):
        super().setUp()
        self.repository = TableRepository(self.table)

    def test_put_then_take_with_the_checkpoint(self):
        session_id = session_id_of()
        self.successResultOf(self.repository.put(session_id, SEALED, LATER))
        self.assertTrue(self.successResultOf(
            self.repository.checkpoint(session_id, 3, digest(3))))
        self.assertEqual(self.successResultOf(
            self.repository.checkpoint_of(session_id)), (3, digest(3)))
        self.assertEqual(self.successResultOf(self.repository.take(session_id)),
                         Taken(SEALED, 3, digest(3), LATER))
        self.assertIsNone(self.successResultOf(
            self.repository.take(session_id)))
        self.assertEqual(self.repository.counters["hits"], 1)

    def test_put_the_table_cannot_keep_fails(self):
        failure = self.failureResultOf(self.repository.put(
            session_id_of(), b"\x01" * (self.table.shape.max_blob + 1), LATER),
            RepositoryError)
        self.assertIn("host table: put: not stored", failure.getErrorMessage())

    def test_purge_and_expire(self):
        purged, expired = session_id_of(), session_id_of()
        self.repository.put(purged, SEALED, LATER)
        self.repository.put(expired, SEALED, 10.0)
        self.assertTrue(self.successResultOf(self.repository.purge(purged)))
        self.assertFalse(self.successResultOf(self.repository.purge(purged)))
        self.clock.advance(10.0)
        self.assertEqual(self.successResultOf(self.repository.expire()), 1)


class RoomTests(HostStoreTestCase):
    """
    A full bucket makes room by the session that expires first; a slot
    someone wrote garbage into reads as absent.
    """

    shape = Shape(buckets=1, slots=2)

    def test_full_bucket_evicts_the_session_that_expires_first(self):
        first, second, third = (session_id_of() for _ in range(3))
        self.table.put(first, SEALED, LATER + 5)
        self.table.put(second, SEALED, LATER)
        self.table.put(third, SEALED, LATER + 9)
        self.assertIsNone(self.table.take(second))
        self.assertIsNotNone(self.table.take(first))
        self.assertIsNotNone(self.table.take(third))
        self.assertEqual(self.table.counters["evicted"], 1)

    def test_expired_slot_is_reused_before_eviction(self):
        old, first, second = (session_id_of() for _ in range(3))
        self.table.put(old, SEALED, 10)
        self.table.put(first, SEALED, LATER)
        self.clock.advance(20)
        self.table.put(second, SEALED, LATER)
        self.assertIsNotNone(self.table.take(first))
        self.assertIsNotNone(self.table.take(second))
        self.assertEqual(self.table.counters["evicted"], 0)

    def test_slot_out_of_bounds_reads_as_absent_and_is_freed(self):
        session_id = session_id_of()
        self.table.put(session_id, SEALED, LATER)
        # The blob length of the first slot, past what a slot holds.
        os.pwrite(self.table.fileno(), (2 ** 31).to_bytes(4, "little"),
                  hoststore.HEADER_SIZE + 40)
        self.assertIsNone(self.table.take(session_id))
        self.assertEqual(self.table.counters["bad_slots"], 1)
        self.assertTrue(self.table.put(session_id, SEALED, LATER))
        self.assertEqual(self.table.take(session_id).sealed, SEALED)


    def test_digest_length_out_of_bounds_reads_as_absent(self):
        session_id = session_id_of()
        self.table.put(session_id, SEALED, LATER)
        # The sealed digest length of the first slot: neither 0 nor 48.
        os.pwrite(self.table.fileno(), bytes((7,)), hoststore.HEADER_SIZE + 47)
        self.assertIsNone(self.table.take(session_id))
        self.assertEqual(self.table.counters["bad_slots"], 1)


class TableTests(TestCase):
    """
    Making a table and recognising one.
    """

    def test_shape_for_bytes_fits(self):
        shape = Shape.for_bytes(1 << 20)
        self.assertLessEqual(shape.size, 1 << 20)
        self.assertGreater(shape.size + shape.bucket_bytes, 1 << 20)

    def test_unusable_shapes_are_refused(self):
        for shape in (Shape(0), Shape(1, 0), Shape(1, 8, 100), Shape(1, 8, 1028)):
            error = self.assertRaises(HostStoreError, hoststore.create_table,
                                      shape)
            self.assertIn("unusable shape", str(error))

    def test_file_that_is_no_table_is_refused(self):
        fd = os.memfd_create("not-a-table")
        os.ftruncate(fd, Shape(1).size)
        error = self.assertRaises(HostStoreError, HostStore, fd, Clock())
        os.close(fd)
        self.assertIn("not a host store table", str(error))

    def test_table_of_the_wrong_size_is_refused(self):
        fd = hoststore.create_table(Shape(2))
        os.ftruncate(fd, Shape(1).size)
        error = self.assertRaises(HostStoreError, HostStore, fd, Clock())
        os.close(fd)
        self.assertIn("expected", str(error))


# A worker's part, run in a child process: open the table it inherited,
# read the ids given on stdin's first line, say it is ready, and once told
# to go take every one; print the ones it got.
_TAKER = textwrap.dedent("""
    import sys
    from twisted.internet import reactor
    from sslshare.hoststore import HostStore
    table = HostStore(int(sys.argv[1]), reactor)
    ids = [bytes.fromhex(word) for word in sys.stdin.readline().split()]
    print("ready", flush=True)
    sys.stdin.readline()
    got = [i.hex() for i in ids if table.take(i) is not None]
    print(" ".join(got))
""")

# A worker that takes its bucket's lock, says so, and waits to be killed.
_HOLDER = textwrap.dedent("""
    import sys, time
    from twisted.internet import reactor
    from sslshare.hoststore import HostStore
    table = HostStore(int(sys.argv[1]), reactor)
    table._lock(table._bucket(bytes.fromhex(sys.argv[2])))
    print("locked", flush=True)
    time.sleep(60)
""")


def child(script: str, fd: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, str(fd), *args], cwd=ROOT,
        pass_fds=(fd,), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


class ProcessTests(TestCase):
    """
    Worker processes sharing one table.
    """

    def setUp(self):
        self.table = HostStore(hoststore.create_table(Shape(buckets=4096)),
                               Clock())
        self.addCleanup(self.table.close)

    def test_racing_processes_take_each_session_once(self):
        """
        Three processes take the same 2000 sessions in the same order,
        started together: every session goes to exactly one of them.
        """
        ids = [session_id_of() for _ in range(2000)]
        for session_id in ids:
            self.assertTrue(self.table.put(session_id, SEALED, 2 ** 40))
        self.assertEqual(self.table.counters["evicted"], 0)
        line = " ".join(i.hex() for i in ids) + "\n"
        takers = [child(_TAKER, self.table.fileno()) for _ in range(3)]
        for taker in takers:
            taker.stdin.write(line)
            taker.stdin.flush()
        for taker in takers:
            self.assertEqual(taker.stdout.readline(), "ready\n")
        for taker in takers:
            taker.stdin.close()
        got = [taker.stdout.read().split() for taker in takers]
        for taker in takers:
            self.assertEqual(taker.wait(), 0, taker.stderr.read())
        every = [session for part in got for session in part]
        self.assertEqual(sorted(every), sorted(i.hex() for i in ids))

    def test_killed_lock_holder_leaves_the_bucket_usable(self):
        """
        While another process holds a bucket's lock, a take there gives up
        (busy) rather than wait; once that process is killed, the bucket
        serves again.
        """
        session_id = session_id_of()
        self.table.put(session_id, SEALED, 2 ** 40)
        holder = child(_HOLDER, self.table.fileno(), session_id.hex())
        self.addCleanup(holder.wait)
        self.addCleanup(holder.stdout.close)
        self.addCleanup(holder.stderr.close)
        self.addCleanup(holder.stdin.close)
        self.assertEqual(holder.stdout.readline(), "locked\n")
        self.assertIsNone(self.table.take(session_id))
        self.assertEqual(self.table.counters["busy"], 1)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        self.assertEqual(self.table.take(session_id).sealed, SEALED)
