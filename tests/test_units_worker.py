"""The in-process layer, the worker without HTTP: WorkerState's runs, queue, long polls and
give-backs driven through ThreadSlots by hand, and the bounds that protect it (Refusals,
BodyRoom, Connections on socket pairs, HeadReader)."""
import io
import socket
import sys
import threading
import time
import unittest

import support

sys.path.insert(0, support.ROOT)
import oden  # noqa: E402

RELEASE = threading.Event()


def calc(task):
    if task == "boom":
        raise ValueError("boom")
    if task == "block":
        RELEASE.wait(10)
    return task * 2


def items(*tasks, start=0):
    return [(start + i, oden.dumps(task)) for i, task in enumerate(tasks)]


def results(records):
    return [(r["index"], oden.pickle.loads(r["result"]) if r["ok"] else r["exception"])
            for r in records]


class WorkerStateTest(unittest.TestCase):
    def setUp(self):
        self.state = oden.WorkerState(calc, 1, True, "unit")
        self.slot = oden.ThreadSlot(calc)

    def run_next(self, slot=None):
        """What a slot's thread does once: take the next batch, run it, report it."""
        slot = slot or self.slot
        self.state._feed(slot, wait=False)
        if slot.batch is None:
            return None
        batch, records = slot.collect(self.state._mark_started)
        self.state._finish(batch, records)
        return batch

    def submit(self, run, *batches, **extra):
        message = dict(extra, run=run, batches=[(batch_id, its, None) for batch_id, its in batches])
        return self.state.submit(message)

    def test_a_batch_runs_and_is_answered_until_acked(self):
        reply = self.submit("r", (1, items(3, "boom", "ab")))
        self.assertEqual((reply["accepted"], reply["busy"]), ([1], []))
        self.assertEqual(reply["boot"], self.state.boot)
        self.assertEqual(self.run_next().id, 1)
        answer = self.state.poll({"run": "r", "wait": 0})
        [(batch_id, records)] = answer["done"]
        self.assertEqual(batch_id, 1)
        self.assertEqual(results(records), [(0, 6), (1, "ValueError: boom"), (2, "abab")])
        self.assertEqual((self.state.done, self.state.failed), (2, 1))
        self.assertEqual(self.state.poll({"run": "r", "wait": 0})["done"], answer["done"])
        self.assertEqual(self.state.poll({"run": "r", "ack": [1], "wait": 0})["done"], [])
        self.assertIsNone(self.run_next())

    def test_capacity_answers_busy_and_a_known_batch_is_queued_once(self):
        self.state.capacity = 3
        reply = self.submit("r", (1, items(1)), (1, items(1)), (2, items(2)))
        self.assertEqual((reply["accepted"], reply["busy"]), ([1, 1, 2], []))
        reply = self.submit("other", (1, items(5)), (2, items(6)))
        self.assertEqual((reply["accepted"], reply["busy"]), ([1], [2]))   # every run counts
        self.run_next()
        reply = self.submit("r", (1, items(1)), (3, items(3)))              # 1 is unacked
        self.assertEqual((reply["accepted"], reply["busy"]), ([1], [3]))
        reply = self.submit("r", (3, items(3)), ack=[1])                     # an ack makes room
        self.assertEqual((reply["accepted"], reply["busy"]), ([3], []))
        self.assertEqual([b.id for b in self.state.runs["r"].queued], [2, 3])

    def test_a_submit_with_a_wait_answers_like_a_poll(self):
        self.submit("r", (1, items(1)))
        self.run_next()
        reply = self.submit("r", (2, items(2)), (3, items(3)), wait=0)
        self.assertEqual(reply["accepted"], [2, 3])
        self.assertEqual([batch_id for batch_id, _ in reply["done"]], [1])
        self.assertEqual((reply["active"], reply["queued"], reply["returned"]),
                         ([2, 3], [2, 3], []))

    def test_give_back_returns_the_last_queued_batches_at_once(self):
        self.submit("r", *[(n, items(n)) for n in (1, 2, 3, 4)])
        self.state._feed(self.slot, wait=False)                              # 1 runs
        started = time.monotonic()
        answer = self.state.poll({"run": "r", "give_back": 2, "wait": 30})
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual((answer["returned"], answer["queued"], answer["active"]),
                         ([4, 3], [2], [2, 1]))
        answer = self.state.poll({"run": "r", "give_back": 5, "wait": 0})
        self.assertEqual((answer["returned"], answer["active"]), ([2], [1]))  # not the running one
        answer = self.state.poll({"run": "r", "give_back": 0, "wait": 0})
        self.assertEqual(answer["returned"], [])

    def test_runs_see_only_their_own_batches_and_share_the_slots_fairly(self):
        self.submit("A", (1, items(1)), (2, items(2)))
        self.submit("B", (1, items(10, start=5)))
        other = oden.ThreadSlot(calc)
        self.state._feed(self.slot, wait=False)
        self.state._feed(other, wait=False)
        self.assertEqual([(s.batch.run_id, s.batch.id) for s in (self.slot, other)],
                         [("A", 1), ("B", 1)])                          # B runs none: it is next
        for slot in (self.slot, other):
            self.state._finish(*slot.collect(self.state._mark_started))
        a, b = (self.state.poll({"run": run, "wait": 0}) for run in ("A", "B"))
        self.assertEqual([results(records) for _, records in a["done"]], [[(0, 2)]])
        self.assertEqual([results(records) for _, records in b["done"]], [[(5, 20)]])
        self.assertEqual((a["active"], b["active"]), ([2], []))
        self.assertTrue(self.state.others_at_work("B"))
        self.assertFalse(self.state.others_at_work("A"))

    def test_a_quiet_run_is_fed_after_the_others(self):
        self.submit("B", (1, items(2)), (2, items(3)))
        self.submit("A", (1, items(1)))
        self.state._feed(oden.ThreadSlot(calc), wait=False)             # B has one running now
        self.assertEqual(len(self.state.runs["B"].running), 1)
        self.state.runs["A"].heard -= oden.RUN_QUIET + 1                # A's manager went silent
        self.state._feed(self.slot, wait=False)
        self.assertEqual((self.slot.batch.run_id, self.slot.batch.id), ("B", 2))

    def test_bye_drops_a_run_and_its_running_batch_reports_nothing(self):
        self.submit("r", (1, items(1)), (2, items(2)))
        self.state._feed(self.slot, wait=False)
        batch = self.slot.batch
        answer = self.state.poll({"run": "r", "bye": True})
        self.assertEqual(answer["done"], [])
        self.assertNotIn("r", self.state.runs)
        self.assertTrue(batch.cancelled)
        self.state._finish(*self.slot.collect(self.state._mark_started))
        self.assertEqual((self.state.done, self.state.failed), (0, 0))
        answer = self.state.poll({"run": "r", "wait": 0})               # as a new run: empty
        self.assertEqual((answer["done"], answer["active"]), ([], []))

    def test_a_long_poll_wakes_when_its_batch_ends_or_its_run_is_dropped(self):
        for end in ("finish", "bye"):
            with self.subTest(end=end):
                self.state.results = support.NotingCondition(self.state.lock)
                self.submit("r", (1, items(4)))
                thread, box = support.in_thread(self.state.poll, {"run": "r", "wait": 30})
                self.assertTrue(self.state.results.waiting.wait(5))
                with self.state.lock:
                    self.assertEqual(self.state.runs["r"].polls, 1)
                if end == "finish":
                    self.run_next()
                else:
                    self.state.poll({"run": "r", "bye": True})
                thread.join(5)
                self.assertFalse(thread.is_alive())
                done = box[0]["done"]
                expected = [[(0, 8)]] if end == "finish" else []
                self.assertEqual([results(r) for _, r in done], expected)
                self.state.poll({"run": "r", "bye": True})

    def test_status_counts_and_ages_without_tasks(self):
        self.submit("r", (1, items("boom")), (2, items(2)), (3, items(3)))
        self.run_next()
        self.state._feed(self.slot, wait=False)
        self.state._mark_started(self.slot.batch)
        self.state.idle = 0
        status = self.state.status()
        self.assertEqual({key: status[key] for key in ("state", "slots", "slots_busy",
                                                       "queued_batches", "done", "failed", "runs",
                                                       "mode", "name")},
                         {"state": "busy", "slots": 1, "slots_busy": 1, "queued_batches": 1,
                          "done": 0, "failed": 1, "runs": 1, "mode": "threads", "name": "unit"})
        [age] = status["running_task_ages"]
        self.assertLess(age, 5)
        self.assertNotIn("boom", repr(status))


class ThreadSlotTest(unittest.TestCase):
    def test_a_task_over_its_limit_is_an_error_and_the_batch_goes_on(self):
        batch = oden.Batch(1, "r", items("block", 2), 0.01)
        slot = oden.ThreadSlot(calc)
        slot.send(batch)
        started = []
        RELEASE.clear()
        self.addCleanup(RELEASE.set)
        collected, records = slot.collect(started.append)
        self.assertIs(collected, batch)
        self.assertEqual(results(records), [(0, "TimeoutError: timed out after 0.01 s"), (1, 4)])
        self.assertEqual(started, [batch, batch])
        self.assertIsNone(slot.batch)

    def test_a_cancelled_batch_stops_after_the_running_task(self):
        batch = oden.Batch(1, "r", items(1, 2, 3), None)
        slot = oden.ThreadSlot(lambda task: setattr(batch, "cancelled", task == 2) or task)
        slot.send(batch)
        _, records = slot.collect(lambda b: None)
        self.assertEqual(results(records), [(0, 1), (1, 2)])


class RefusalsTest(unittest.TestCase):
    def test_the_first_refusal_is_logged_then_a_count_a_period(self):
        refusals = oden.Refusals(every=60)
        with self.assertLogs("oden", "WARNING") as logs:
            refusals.note("10.0.0.9", "bad signature from 10.0.0.9")
            refusals.note("10.0.0.9", "bad signature again")
            refusals.note("10.0.0.9", "replayed request")
            refusals.note("10.0.0.8", "bad signature from 10.0.0.8")
            start = refusals.sources["10.0.0.9"][0]
            refusals.flush(start + 30)                               # the period is not over
            refusals.flush(start + 61)
        self.assertEqual(logs.output, [
            "WARNING:oden:bad signature from 10.0.0.9",
            "WARNING:oden:bad signature from 10.0.0.8",
            "WARNING:oden:2 more refusals (10.0.0.9) in the last 61 s, the latest: "
            "replayed request"])
        self.assertEqual(list(refusals.sources), ["10.0.0.9"])      # 10.0.0.8 was quiet
        refusals.flush(start + 200)
        self.assertEqual(list(refusals.sources), [])

    def test_the_oldest_source_is_forgotten_beyond_the_limit(self):
        refusals = oden.Refusals()
        refusals.MAX_SOURCES = 2
        with self.assertLogs("oden", "WARNING") as logs:
            for source in ("a", "b", "c", "a"):
                refusals.note(source, "from " + source)
        self.assertEqual(list(refusals.sources), ["c", "a"])
        self.assertEqual(len(logs.output), 4)                       # a is new again


class BodyRoomTest(unittest.TestCase):
    def test_small_bodies_need_no_room_and_big_ones_share_it(self):
        big = oden.SMALL_BODY + 1
        room = oden.BodyRoom(2 * big)
        self.assertTrue(all(room.take(oden.SMALL_BODY, 0) for _ in range(100)))
        self.assertEqual(room.used, 0)
        self.assertTrue(room.take(big, 0))
        self.assertTrue(room.take(big, 0))
        self.assertFalse(room.take(big, 0))
        room.give(big)
        self.assertTrue(room.take(big, 0))
        self.assertFalse(room.take(2 * big + 1, 0))
        room.give(oden.SMALL_BODY)
        self.assertEqual(room.used, 2 * big)

    def test_a_waiting_body_gets_the_room_given_back(self):
        big = oden.SMALL_BODY + 1
        room = oden.BodyRoom(big)
        room.changed = support.NotingCondition()
        room.take(big, 0)
        thread, box = support.in_thread(room.take, big, 30)
        self.assertTrue(room.changed.waiting.wait(5))
        room.give(big)
        thread.join(5)
        self.assertEqual(box, [True])
        self.assertEqual(room.used, big)


class ConnectionsTest(unittest.TestCase):
    def setUp(self):
        self.refusals = oden.Refusals()
        self.connections = oden.Connections(2, 30, self.refusals)

    def pair(self):
        ours, theirs = socket.socketpair()
        theirs.settimeout(5)
        for sock in (ours, theirs):
            self.addCleanup(sock.close)
        return ours, theirs

    def test_a_new_connection_closes_the_longest_idle_one_for_room(self):
        (a, peer_a), (b, _), (c, _) = self.pair(), self.pair(), self.pair()
        self.assertTrue(self.connections.admit(a, "10.0.0.1"))
        self.assertTrue(self.connections.admit(b, "10.0.0.2"))
        self.connections.move(b, oden.Connections.HEAD, time.monotonic() + 30)
        with self.assertLogs("oden", "WARNING") as logs:
            self.assertTrue(self.connections.admit(c, "10.0.0.3"))
        self.assertEqual(peer_a.recv(1), b"")                        # a was shut down
        self.assertEqual([self.connections.open[s].cut for s in (a, b, c)], [True, False, False])
        self.assertIn("closed an idle connection from 10.0.0.1 to make room", logs.output[0])

    def test_when_every_connection_works_a_new_one_is_refused(self):
        (a, _), (b, _), (c, _) = self.pair(), self.pair(), self.pair()
        for sock in (a, b):
            self.connections.admit(sock, "m")
            self.connections.move(sock, oden.Connections.WORKING)
        with self.assertLogs("oden", "WARNING") as logs:
            self.assertFalse(self.connections.admit(c, "x"))
        self.assertIn("refused a connection from x: all 2 connections are busy", logs.output[0])
        self.assertNotIn(c, self.connections.open)
        self.connections.forget(a)
        self.assertTrue(self.connections.admit(c, "x"))

    def test_reap_cuts_only_connections_past_their_deadline(self):
        (a, peer_a), (b, _), (c, _) = self.pair(), self.pair(), self.pair()
        self.connections.limit = 3
        now = time.monotonic()
        for sock, phase, deadline in ((a, "body", now - 1), (b, "idle", now - 1),
                                      (c, "working", None)):
            self.connections.admit(sock, "peer")
            self.connections.move(sock, phase, deadline)
        with self.assertLogs("oden", "DEBUG") as logs:
            self.connections.reap(now)
        self.assertEqual([self.connections.open[s].cut for s in (a, b, c)], [True, True, False])
        self.assertEqual(peer_a.recv(1), b"")
        self.assertEqual([line.split(":", 2)[:2] for line in logs.output],
                         [["WARNING", "oden"], ["DEBUG", "oden"]])
        self.assertIn("cut a connection from peer: its request body took too long",
                      logs.output[0])

    def test_move_restarts_the_clock_only_on_a_new_phase(self):
        (a, _), = [self.pair()]
        self.connections.admit(a, "m")
        connection = self.connections.open[a]
        connection.since -= 100
        self.connections.move(a, oden.Connections.IDLE, 5)
        self.assertLess(time.monotonic() - connection.since, 200)
        self.assertGreater(time.monotonic() - connection.since, 99)
        self.connections.move(a, oden.Connections.HEAD, 7)
        self.assertLess(time.monotonic() - connection.since, 5)
        self.assertEqual((connection.phase, connection.deadline), ("head", 7))


class HeadReaderTest(unittest.TestCase):
    def test_the_head_is_bounded_and_the_body_is_not(self):
        body = b"b" * (3 * oden.MAX_HEAD)
        stream = io.BytesIO(b"POST / HTTP/1.1\r\n" + b"X: " + b"h" * oden.MAX_HEAD + b"\r\n" + body)
        reader = oden.HeadReader(stream)
        self.assertEqual(reader.readline(), b"POST / HTTP/1.1\r\n")
        self.assertEqual(reader.readline(5), b"X: hh")
        line = reader.readline()
        self.assertEqual(len(line), oden.MAX_HEAD - len(b"POST / HTTP/1.1\r\n") - 5)
        with self.assertRaises(oden.http.client.LineTooLong):
            reader.readline()
        stream.seek(len(stream.getvalue()) - len(body))
        self.assertEqual(reader.read(), body)
        self.assertEqual(reader.tell(), len(stream.getvalue()))     # the rest passes through


if __name__ == "__main__":
    unittest.main()
