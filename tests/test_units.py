"""The in-process layer: the manager's bookkeeping, names and text, without sockets or
processes (milliseconds each).  The scenario tests beside it run the same code for real."""
import argparse
import io
import logging
import os
import pickle
import shutil
import sys
import tempfile
import unittest

import support

sys.path.insert(0, support.ROOT)
import oden  # noqa: E402


def run_context(folder, **knobs):
    """The context of a manager run writing into `folder`, with the command line's defaults."""
    settings = dict(name="t", folder=folder, timeout=5, keepalive=True, max_reply=oden.MAX_REPLY,
                    interval_polling=1, task_timeout=None, chunksize=0, speculate=False,
                    max_push=oden.MAX_PUSH, pack=False, max_attempts=5, max_deaths=3,
                    give_up_after=300)
    settings.update(knobs)
    return oden.RunContext.of(argparse.Namespace(**settings), stamp="20261130-000000", fresh=True,
                              resume_hint="oden.py resume", key=None, tls=None, manifest={})


class StubRun(oden.Run):
    """A real Run of `tasks` on one host, writing into a temporary folder; `accepted` holds the
    file records it wrote, by index."""

    def __init__(self, test, tasks, max_attempts=5, max_deaths=3):
        folder = tempfile.mkdtemp()
        test.addCleanup(shutil.rmtree, folder)
        quiet = logging.NullHandler()    # what the run logs is checked with assertLogs, not shown
        oden.log.addHandler(quiet)
        test.addCleanup(oden.log.removeHandler, quiet)
        host = oden.Host(1, "127.0.0.1", 8080)
        super().__init__(None, run_context(folder, max_attempts=max_attempts,
                                           max_deaths=max_deaths),
                         oden.Tasks(list(tasks)), range(len(tasks)), [host])

    @property
    def accepted(self):
        folder = self.context.folder
        paths = oden.result_paths(folder, "t") + oden.result_paths(folder, "t", errors=True)
        return sorted((record for _, record in oden.read_records(paths)),
                      key=lambda record: record["index"])


def StubRunner(run, max_body=oden.MAX_BODY):
    """The HostRunner of the run's one host, as if connected to a worker with one slot."""
    runner = oden.HostRunner(run, run.hosts[0])
    runner.slots, runner.max_body = 1, max_body
    return runner


class BatchAnswerTest(unittest.TestCase):
    def test_a_record_lands_only_on_a_task_its_batch_held(self):
        run = StubRun(self, list("abcd"))
        runner = StubRunner(run)
        taken = run.board.take(4)
        runner.in_flight = {7: taken[:2], 8: taken[2:]}
        foreign = [{"index": 0, "ok": True}, {"index": 2, "ok": True}]    # 2 is batch 8's task
        with self.assertLogs("oden", "WARNING") as logs:
            kept = runner._answered(7, foreign)
        self.assertIn("answered batch 7 with 2 reports for 2 tasks: 1 dropped, 1 run again", logs.output[0])
        self.assertEqual([r["index"] for r in kept], [0])
        self.assertEqual(list(run.board.pending), [1])                    # 1 had no record: again
        self.assertEqual(run.board.attempts[1], 1)
        self.assertEqual(runner.in_flight, {8: [2, 3]})

    def test_an_index_that_is_no_int_lands_nowhere_and_its_task_runs_again(self):
        run = StubRun(self, list("ab"))
        runner = StubRunner(run)
        runner.in_flight = {7: run.board.take(2)}
        with self.assertLogs("oden", "WARNING"):
            kept = runner._answered(7, [{"index": 1.0, "ok": True}, {"index": True, "ok": True}])
        self.assertEqual(kept, [])
        self.assertEqual(list(run.board.pending), [0, 1])

    def test_tasks_held_when_the_run_stops_go_back_without_an_attempt(self):
        run = StubRun(self, list("abc"), max_attempts=1)
        runner = StubRunner(run)
        runner.in_flight = {1: run.board.take(2)}
        runner.collect_last()
        self.assertEqual((runner.in_flight, run.accepted), ({}, []))      # no error files
        self.assertEqual(sorted(run.board.pending), [0, 1, 2])
        self.assertEqual(sum(run.board.attempts.values()), 0)

    def test_a_late_batch_given_back_earlier_keeps_its_records_in_range(self):
        run = StubRun(self, list("ab"))
        kept = StubRunner(run)._answered(99, [{"index": 1}, {"index": 5}, {"index": -1}, {}])
        self.assertEqual(kept, [{"index": 1}])


class TailTest(unittest.TestCase):
    """Batches waiting on a worker move to idle hosts; only running tasks are charged."""

    def test_batches_still_waiting_on_a_dead_worker_go_back_free(self):
        run = StubRun(self, list("abcd"), max_deaths=1)
        runner = StubRunner(run)
        taken = run.board.take(4)
        runner.in_flight = {1: taken[:1], 2: taken[1:3], 3: taken[3:]}
        runner._note_waiting([2, 3])
        self.assertEqual(run.board.waiting, {1: [1, 2, 3]})
        charged = runner._give_back([1, 2, 3], "gone", died=True)
        self.assertEqual(charged, [0])
        self.assertEqual([r["index"] for r in run.accepted], [0])          # its one death
        self.assertEqual(sorted(run.board.pending), [1, 2, 3])
        self.assertEqual(sum(run.board.attempts[i] for i in (1, 2, 3)), 0)

    def test_a_worker_gives_back_waiting_batches_only_while_a_host_idles(self):
        run = StubRun(self, list("abcd"))
        runner = StubRunner(run)
        runner.in_flight = {1: run.board.take(1), 2: run.board.take(3)}
        runner._note_waiting([2])
        self.assertNotIn("give_back", self.request(runner))
        with run.board.hungry(1):
            self.assertEqual(self.request(runner)["give_back"], 1)
            runner._moved([2])
            self.assertEqual(list(run.board.pending), [1, 2, 3])
            self.assertEqual(runner.in_flight, {1: [0]})
            self.assertEqual(run.board.take(3), [1, 2, 3])                 # for the idle host
        self.assertEqual(sum(run.board.attempts.values()), 0)

    def test_one_idle_slot_anywhere_asks_for_a_batch_waiting_elsewhere(self):
        run = StubRun(self, list("abcde"))
        busy, other = StubRunner(run), oden.HostRunner(run, oden.Host(2, "127.0.0.1", 8081))
        other.slots, busy.slots = 2, 1
        other.in_flight = {1: run.board.take(1)}               # one of its two slots runs
        busy.in_flight = {2: run.board.take(1), 3: run.board.take(1)}
        busy._note_waiting([3])                                  # one runs, one waits
        self.assertEqual((other.idle_slots(), busy.idle_slots()), (1, 0))
        with run.board.hungry(other.idle_slots()):
            self.assertNotIn("give_back", self.request(busy))   # the queue will fill that slot
            run.board.take(2)
            self.assertEqual(self.request(busy)["give_back"], 1)
        self.assertNotIn("give_back", self.request(busy))

    def test_an_idle_slot_is_asked_for_once_across_hosts(self):
        run = StubRun(self, list("abcdef"))
        runners = [oden.HostRunner(run, oden.Host(n, "127.0.0.1", 8080 + n)) for n in (1, 2, 3)]
        for runner in runners:
            runner.in_flight = {1: run.board.take(1), 2: run.board.take(1)}
            runner._note_waiting([2])
        with run.board.hungry(1):
            asked = [self.request(runner).get("give_back", 0) for runner in runners]
            self.assertEqual(asked, [1, 0, 0])
            run.board.asked_back(1)                  # its answer is in (nothing came back)
            self.assertEqual(self.request(runners[1]).get("give_back"), 1)

    def request(self, runner):
        runner.acks = []
        return runner.request([], wait=0)

    def test_speculation_copies_only_a_running_task_at_the_end_once(self):
        board = oden.TaskBoard(range(3), 5, 3)
        board.take(3)
        board.note_waiting(1, [2])
        self.assertIsNone(board.take_straggler(0))                        # 2 still waits: not the end
        board.note_waiting(1, [])
        board.sent_at[1] -= 10
        self.assertEqual(board.take_straggler(5), 1)                       # the one running over 5 s
        self.assertIsNone(board.take_straggler(5))                         # never a second copy
        self.assertEqual(board.take_straggler(0), 0)


class TasksTest(unittest.TestCase):
    def test_big_tasks_are_held_once_as_themselves_and_sent_in_frames(self):
        big, small = b"x" * oden.OUT_OF_BAND, ("small", 1)
        given = [small, big]
        tasks = oden.Tasks(given)
        self.assertEqual(given, [None, None])                             # the list let go
        self.assertIs(tasks.task(1), big)
        self.assertEqual(tasks.task(0), small)
        self.assertEqual(tasks.size(1), len(oden.dumps(big)))
        body = oden.encode({"batches": [(1, [(i, tasks.wire(i)) for i in (0, 1)], None)]})
        self.assertIsInstance(body, list)
        self.assertTrue(all(len(part) < 200 for part in body[:2]))        # the task is no copy
        message = oden.decode(b"".join(body))
        [(_, items, _)] = message["batches"]
        self.assertEqual(pickle.loads(items[0][1]), small)
        self.assertEqual(pickle.loads(items[1][1]), big)
        self.assertEqual(oden.decode(oden.encode({"plain": 1})), {"plain": 1})
        for bad in (oden.FRAMES + b"5 9\n" + b"x" * 3, oden.FRAMES + b"\n"):
            with self.assertRaises(ValueError):
                oden.decode(bad)

    def test_a_task_that_cannot_be_pickled_is_named(self):
        with self.assertRaises(oden.OdenError) as error:
            oden.Tasks([1, lambda: 2])
        self.assertIn("task 1 cannot be pickled", str(error.exception))


class RequestSizeTest(unittest.TestCase):
    def test_a_task_over_the_limit_is_its_error_and_the_rest_wait_for_the_next_request(self):
        tasks = ["x" * 300, "y" * 10, "z" * 600000, "w" * 10]
        run = StubRun(self, tasks)
        runner = StubRunner(run, max_body=oden.REQUEST_ENVELOPE + 1000)
        sizes = [run.tasks.size(i) + oden.ITEM_ENVELOPE for i in range(len(tasks))]
        kept, room = runner._fit(run.board.take(4), 700)
        self.assertEqual((kept, room), ([0, 1, 3], 700 - sizes[0] - sizes[1] - sizes[3]))
        [error] = run.accepted
        self.assertEqual(error["index"], 2)
        self.assertIn("--max-body", error["exception"])
        self.assertEqual(list(run.board.pending), [])
        run = StubRun(self, tasks)
        kept, room = StubRunner(run)._fit(run.board.take(4), sizes[0] + 5)
        self.assertEqual((kept, room), ([0], 0))
        self.assertEqual(list(run.board.pending), [1, 2, 3])
        self.assertEqual(sum(run.board.attempts.values()), 0)


class DeathTest(unittest.TestCase):
    def test_only_counted_deaths_fail_a_task_and_not_while_it_runs_elsewhere(self):
        board = oden.TaskBoard(range(2), max_attempts=9, max_deaths=2)
        board.take(2)
        self.assertEqual(board.give_back([0, 1], "line broke"), [])         # attempts, no deaths
        self.assertEqual(list(board.pending), [0, 1])
        self.assertEqual(board.count_deaths([0, 1]), [])
        self.assertEqual(board.take(1), [0])                                 # 0 runs elsewhere
        self.assertEqual(board.count_deaths([0, 1]), [(1, "worker died 2 times while running this task")])
        self.assertEqual(board.give_back([0], "gone", died=True),
                         [(0, "worker died 3 times while running this task")])

    def test_put_back_counts_no_attempt_and_keeps_the_order(self):
        board = oden.TaskBoard(range(4), 5, 3)
        board.put_back(board.take(3))
        self.assertEqual(list(board.pending), [0, 1, 2, 3])
        self.assertEqual(sum(board.attempts.values()), 0)


class FleetTest(unittest.TestCase):
    def test_the_run_stops_only_when_every_host_refuses(self):
        hosts = oden.parse_hosts("a\nb:81\nc", "test")
        fleet = oden.Fleet(hosts)
        fleet.refuse(hosts[0], "wrong key")
        fleet.refuse(hosts[1], "wrong key")
        self.assertIsNone(fleet.every_host_refuses())
        fleet.refuse(hosts[2], "other code")
        self.assertEqual(fleet.every_host_refuses(), {"wrong key": ["a:8080", "b:81"],
                                                      "other code": ["c:8080"]})
        fleet.mark(hosts[2], True)
        self.assertIsNone(fleet.every_host_refuses())


class HostsTest(unittest.TestCase):
    def test_a_host_listed_twice_is_used_once_with_a_warning(self):
        with self.assertLogs("oden", "WARNING") as logs:
            hosts = oden.parse_hosts("a:1\nb\nA:1  # again\n[::1]:5\n[::1]:5", "hosts.txt")
        self.assertEqual([(h.number, h.label) for h in hosts], [(1, "a:1"), (2, "b:8080"), (3, "[::1]:5")])
        self.assertEqual(len(logs.output), 2)
        self.assertIn("hosts.txt line 3: A:1 is listed already on line 1: using it once", logs.output[0])


class ResumeHintTest(unittest.TestCase):
    def hint(self, argv):
        folder = tempfile.mkdtemp(prefix="oden-unit-")
        self.addCleanup(shutil.rmtree, folder, True)
        saved = sys.argv[0]
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(folder)                     # the hint names the script as it was typed
        open("my job.py", "w").close()
        sys.argv[0] = "my job.py"
        try:
            return oden.resume_command(argv)
        finally:
            sys.argv[0] = saved

    def test_rows(self):
        for argv, expected in [
                (["manager"], "python3 'my job.py' resume"),
                (["manager", "--hosts", "a b.txt", "--yes", "--name", "exp7", "--folder", "out"],
                 "python3 'my job.py' resume --hosts 'a b.txt' --name exp7 --folder out"),
                (["resume", "--name", "manager"], "python3 'my job.py' resume --name manager"),
                (["local", "--workers", "2"], "python3 'my job.py' local --resume --workers 2"),
                (["local", "--resume"], "python3 'my job.py' local --resume")]:
            with self.subTest(argv=argv):
                python = os.path.basename(sys.executable)           # python3, or python3.8...
                self.assertEqual(self.hint(argv), expected.replace("python3", python, 1))


class RunFilesTest(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="oden-unit-")
        self.addCleanup(shutil.rmtree, self.folder, True)

    def write(self, file_name, records):
        with open(os.path.join(self.folder, file_name), "wb") as f:
            pickle.dump(records, f)

    def test_records_of_a_longer_name_are_not_this_runs(self):
        self.write("sim21_20261129-230000_0.done.pickle", {"name": "sim2", "task": 0, "result": 0})
        self.write("sim1_20261129-230000-2_0.done.pickle", {"name": "sim", "task": 5, "result": 5})
        self.write("sim3_20261129-230001_0.pack.pickle", [{"name": "sim", "task": 6, "result": 6}])
        self.write("simple1_20261129-230000_0.done.pickle", {"name": "simple", "task": 7, "result": 7})
        self.assertEqual(sorted(r["task"] for _, r in oden.run_records(self.folder, "sim")), [5, 6])
        self.assertEqual([r["task"] for _, r in oden.run_records(self.folder, "sim2")], [0])
        self.assertEqual(oden.tasks_to_run([0, 5, 6], self.folder, "sim"), [0])

    def test_a_new_run_starts_over_and_its_resumes_go_on_with_it(self):
        def record(stamp, task, ok, fresh=None):
            record = {"name": "r", "task": task, "index": task, "run": stamp}
            record.update({"result": task} if ok else {"error": "e", "exception": "E"})
            if fresh is not None:
                record["fresh"] = fresh
            return record
        old = [record("20261129-230000", 0, True), record("20261129-230000", 1, True)]  # oden 1.0
        self.assertEqual(oden.current_records(old), old)
        first = [record("20261129-230100", t, True, True) for t in (0, 1, 2)]
        again = [record("20261129-230200", 0, True, True), record("20261129-230200", 1, False, True)]
        fixed = [record("20261129-230200-2", 1, True, False)]
        self.assertEqual(oden.current_records(old + first + again), again)   # 2 never ran again
        self.assertEqual(oden.current_records(old + first + again + fixed), again + fixed)
        for r in old + first + again + fixed:
            self.write("r1_%s_%d.%s.pickle" % (r["run"], r["task"], "done" if "result" in r else "error"), r)
        self.assertEqual(oden.tasks_to_run([0, 1, 2], self.folder, "r"), [2])

    def test_stamps_are_claimed_without_waiting(self):
        stamps = [oden.claim_stamp(self.folder, "t") for _ in range(3)]
        self.assertEqual(len(set(stamps)), 3)
        self.assertTrue(stamps[1].startswith(stamps[0]) or stamps[1] != stamps[0])
        self.assertEqual(len(os.listdir(self.folder)), 3)

    def test_a_second_lock_of_a_name_is_refused_and_names_the_holder(self):
        with oden.RunLock(self.folder, "t"):
            with self.assertRaises(oden.OdenError) as refused:
                oden.RunLock(self.folder, "t").acquire()
            self.assertIn("pid %d" % os.getpid(), str(refused.exception))
            self.assertTrue(oden.RunLock(self.folder, "t").held_elsewhere())
            with oden.RunLock(self.folder, "t2"):
                pass
        self.assertFalse(oden.RunLock(self.folder, "t").held_elsewhere())

    def test_temporaries_of_a_running_longer_name_stay(self):
        for name in ("sim21_20261129-230000_0.done.pickle.tmpab12",
                     "sim1_20261129-230000_1.error.pickle.tmpcd34"):
            open(os.path.join(self.folder, name), "w").close()
        with oden.RunLock(self.folder, "sim2"):
            self.assertEqual(oden.remove_temporaries(self.folder, "sim"), 1)
        self.assertEqual(oden.remove_temporaries(self.folder, "sim"), 1)
        self.assertEqual(os.listdir(self.folder), [".sim2.lock"])


class TextTest(unittest.TestCase):
    def test_printable_rows(self):
        for text, shown in [("plain\nlines\tand tabs é", "plain\nlines\tand tabs é"),
                            ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
                            ("bell\x07 nul\x00 c1\x9b del\x7f", "bell\\x07 nul\\x00 c1\\x9b del\\x7f"),
                            ("not utf-8: \udcff", "not utf-8: \\udcff")]:
            self.assertEqual(oden.printable(text), shown)

    def test_a_record_no_encoding_can_hold_is_written_escaped(self):
        stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
        handler = logging.StreamHandler(stream)
        handler.setFormatter(oden.EscapingFormatter("%(message)s", None, "ascii"))
        logger = logging.getLogger("oden.unit")
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        logger.error("caf\u00e9 \udcff")
        stream.flush()
        self.assertEqual(stream.buffer.getvalue(), b"caf\\xe9 \\udcff\n")


def report(index, result=None, ok=True, **fields):
    """A worker's report of one task, as the manager receives it."""
    if ok:
        return dict({"index": index, "ok": True, "result": pickle.dumps(result),
                     "started": 1.0, "ended": 1.5}, **fields)
    return dict({"index": index, "ok": False, "error": "Traceback ...\nValueError: bad\n",
                 "exception": "ValueError: bad", "started": 1.0, "ended": 1.25}, **fields)


class ResultStoreTest(unittest.TestCase):
    """Claiming, writing and counting outcomes: one file record per task, whatever arrives."""

    def store(self, tasks, **knobs):
        run = StubRun(self, tasks)
        store = oden.ResultStore(run_context(run.context.folder, **knobs), run.tasks)
        self.addCleanup(store.close)
        return run, store

    def test_the_first_outcome_of_a_task_wins_and_a_duplicate_is_counted(self):
        run, store = self.store(list("abc"))
        host = run.hosts[0]
        first = [report(0, "A"), report(1, "B")]
        self.assertEqual(store.claim(host, first), first)
        with self.assertLogs("oden", "INFO") as logs:
            again = store.claim(host, [report(1, "B2"), report(2, "C"), report(2, "C2")])
        self.assertEqual([(r["index"], pickle.loads(r["result"])) for r in again], [(2, "C")])
        self.assertEqual(store.tally.duplicates, 2)
        self.assertIn("duplicate result for task 1 from 127.0.0.1:8080: kept the first",
                      logs.output[0])

    def test_each_outcome_is_written_as_its_file_record_and_counted(self):
        run, store = self.store([("x", 1), ("y", 2), ("z", 3)])
        host = run.hosts[0]
        broken = dict(report(2), result=b"not a pickle")
        with self.assertLogs("oden", "ERROR"):
            store.save(host, store.claim(host, [report(0, 10, output="hi"), report(1, ok=False),
                                                broken]))
        [zero, one, two] = run.accepted
        self.assertEqual((zero["task"], zero["result"], zero["output"]), (("x", 1), 10, "hi"))
        self.assertEqual((zero["name"], zero["run"], zero["fresh"], zero["host"]),
                         ("t", "20261130-000000", True, "127.0.0.1:8080"))
        self.assertEqual((one["task"], one["exception"]), (("y", 2), "ValueError: bad"))
        self.assertNotIn("result", one)
        self.assertIn("the result cannot be unpickled", two["exception"])
        self.assertEqual(store.tally.counts(), (1, 2))
        self.assertEqual(store.tally.host_counts(), {"127.0.0.1:8080": (1, 2, 1.25)})
        self.assertEqual(sorted(g[0] for g in store.tally.failure_groups()),
                         sorted(["ValueError: bad", two["exception"]]))

    def test_a_file_that_cannot_be_written_stops_the_run_and_leaves_the_task_unwritten(self):
        run, store = self.store(list("ab"))
        shutil.rmtree(run.context.folder)
        host = run.hosts[0]
        store.save(host, store.claim(host, [report(0, "A")]))
        self.assertIn("cannot write a result file in", store.failure)
        self.assertIn("free some disk space or fix the folder's permissions", store.failure)
        self.assertEqual(store.tally.counts(), (0, 0))
        os.mkdir(run.context.folder)

    def test_with_pack_the_writer_puts_what_waits_for_a_host_in_one_file(self):
        run, store = self.store(list("abcd"), pack=True)
        host = run.hosts[0]
        store.save(host, store.claim(host, [report(0, "A"), report(1, "B")]))
        store.save(host, store.claim(host, [report(2, ok=False), report(3, "D")]))
        self.assertEqual(os.listdir(run.context.folder), [])     # queued: the writer is not started
        store.start()
        store.close()
        names = sorted(os.listdir(run.context.folder))
        self.assertEqual([n.rsplit("_", 1)[1] for n in names],
                         ["0.pack.pickle", "2.error.pickle"])
        self.assertEqual([r["index"] for r in run.accepted], [0, 1, 2, 3])

    def test_the_writer_holds_back_host_threads_when_the_disk_falls_behind(self):
        run, store = self.store(list("abc"), pack=True)
        store.changed = support.NotingCondition()
        host = run.hosts[0]
        backlog, oden.WRITER_BACKLOG = oden.WRITER_BACKLOG, 2
        self.addCleanup(setattr, oden, "WRITER_BACKLOG", backlog)
        store.save(host, store.claim(host, [report(0, "A"), report(1, "B")]))
        thread, _ = support.in_thread(store.save, host, store.claim(host, [report(2, "C")]))
        self.assertTrue(store.changed.waiting.wait(10))          # the third waits for room
        self.assertTrue(thread.is_alive())
        self.assertEqual(store.queued_count, 2)
        store.start()                                            # the writer drains: room again
        thread.join(10)
        self.assertFalse(thread.is_alive())
        store.close()
        self.assertEqual([r["index"] for r in run.accepted], [0, 1, 2])


if __name__ == "__main__":
    unittest.main()
