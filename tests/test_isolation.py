"""Every failure on the right task, and nothing a task does reaches the next
(issue 10, sections 1 to 3, the worker's side).

A task killed inside a batch or over its time limit is the only task blamed;
any BaseException, closed or replaced streams, a deleted working directory
and a multiprocessing.Pool inside calc leave the slot serving; a killed worker
takes its slot processes (and theirs) with it; two managers share one worker
and each gets only its own results; a manager that is gone stops holding slots.
Real workers and managers on loopback ports, as in the rest of the suite.
"""
import collections
import json
import os
import pickle
import signal
import sys
import threading
import time
import unittest
import unittest.mock
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # also as tests.test_isolation
import support  # noqa: E402

sys.path.insert(0, support.ROOT)
import oden  # noqa: E402  (the in-process client and WorkerState)

FAST = support.fast(2, "--yes")
HAS_PROC = os.path.isdir("/proc/self")


def outcomes(test, project):
    """(done, errors): index -> record, asserting that no task has two result files."""
    found = []
    for suffix in (".done.pickle", ".error.pickle"):
        records = collections.defaultdict(list)
        for path in project.files(project.name + "*" + suffix):
            with open(path, "rb") as f:
                record = pickle.load(f)
            records[record["index"]].append(record)
        twice = {i: len(r) for i, r in records.items() if len(r) > 1}
        test.assertEqual(twice, {}, "two files for a task")
        found.append({i: r[0] for i, r in records.items()})
    return found


def status(worker):
    with urllib.request.urlopen(worker.url + "/status.json", timeout=10) as response:
        return json.loads(response.read().decode())


def gone(pid):
    stat = support.process_stat(pid)
    return stat is None or stat[0] == "Z"


Manager = support.Manager


class BlameTest(support.OdenTestCase):
    """A crash or a time-out inside a batch is recorded against the task that was running."""

    def test_task_killed_inside_a_batch_is_the_only_error_and_the_rest_run_again(self):
        project = self.project(library_code="""
            import os, signal
            def make_tasks():
                return ["a", "b", "c", "killed"]
            def calc(x):
                if x == "killed":
                    os.kill(os.getpid(), signal.SIGKILL)      # what the OOM killer does
                return x.upper()
        """)
        project.write_hosts([project.start_worker("--slots", "1")])
        completed = project.run("manager", "--chunksize", "4", *FAST, timeout=60)
        self.assertRan(completed, 1)
        done, errors = outcomes(self, project)
        self.assertEqual(sorted(errors), [3], [e["exception"] for e in errors.values()])
        self.assertIn("exit code -9", errors[3]["error"])
        self.assertEqual({i: r["result"] for i, r in done.items()}, {0: "A", 1: "B", 2: "C"})

    def test_killer_among_hundreds_of_automatic_batches_is_the_only_crash(self):
        project = self.project(library_code="""
            import os, signal, time
            def make_tasks():
                return list(range(400))
            def calc(x):
                time.sleep(0.001)
                if x == 250:
                    os.kill(os.getpid(), signal.SIGKILL)
                return x * 3
        """)
        project.write_hosts([project.start_worker("--slots", "2")])
        completed = project.run("manager", *FAST, timeout=120)
        self.assertRan(completed, 1)
        done, errors = outcomes(self, project)
        self.assertEqual(sorted(errors), [250], [e["exception"] for e in errors.values()])
        self.assertEqual(sorted(done), [i for i in range(400) if i != 250])
        self.assertTrue(all(r["result"] == 3 * i for i, r in done.items()))

    def test_time_out_blames_the_task_running_when_the_limit_is_reached(self):
        """Tasks just under the limit, then one that hangs, in one batch: only the hung
        task is over the limit (the blame is read when the time-out is decided)."""
        project = self.project(library_code="""
            import time
            def make_tasks():
                return list(range(4))
            def calc(x):
                time.sleep(1000 if x == 3 else 0.8)
                return x
        """)
        project.write_hosts([project.start_worker("--slots", "1")])
        completed = project.run("manager", "--chunksize", "4", "--task-timeout", "1", *FAST,
                                timeout=60)
        self.assertRan(completed, 1)
        done, errors = outcomes(self, project)
        self.assertEqual(sorted(errors), [3], [e["exception"] for e in errors.values()])
        self.assertRegex(errors[3]["error"], r"^timed out after 1(\.0)? s")
        self.assertEqual(sorted(done), [0, 1, 2])


RAISERS = """
    import asyncio, sys

    class BadText(Exception):
        def __str__(self):
            raise RuntimeError("no text for you")

    def make_tasks():
        return ["first", "KeyboardInterrupt", "CancelledError", "GeneratorExit", "SystemExit",
                "BadText", "last"]

    def calc(x):
        print("running", x)
        if x == "KeyboardInterrupt":
            raise KeyboardInterrupt
        if x == "CancelledError":
            raise asyncio.CancelledError("cancelled inside calc")
        if x == "GeneratorExit":
            raise GeneratorExit
        if x == "SystemExit":
            sys.exit(3)
        if x == "BadText":
            raise BadText()
        return x
"""

STREAMS = """
    import os, sys, tempfile

    def make_tasks():
        return ["close stdout", "after 1", "close stderr", "after 2", "replace stdout", "after 3",
                "replace stderr", "after 4", "chdir away", "after 5"]

    def calc(x):
        print("out of", x)
        print("err of", x, file=sys.stderr)
        if x == "close stdout":
            sys.stdout.close()
        elif x == "close stderr":
            sys.stderr.close()
        elif x == "replace stdout":
            sys.stdout = open(os.devnull, "w")
        elif x == "replace stderr":
            sys.stderr = open(os.devnull, "w")
        elif x == "chdir away":
            folder = tempfile.mkdtemp()
            os.chdir(folder)
            os.rmdir(folder)
            return "moved"
        return os.getcwd()
"""


class IsolationTest(support.OdenTestCase):
    """What one task does to its process (or thread) never reaches the next task."""

    def check_base_exceptions(self, *worker_args):
        project = self.project(library_code=RAISERS)
        project.write_hosts([project.start_worker("--slots", "1", *worker_args)])
        completed = project.run("manager", "--chunksize", "2", *FAST, timeout=60)
        self.assertRan(completed, 1)
        done, errors = outcomes(self, project)
        self.assertEqual({i: r["result"] for i, r in done.items()}, {0: "first", 6: "last"})
        self.assertEqual(sorted(errors), [1, 2, 3, 4, 5])
        expected = {1: "KeyboardInterrupt", 2: "CancelledError: cancelled inside calc",
                    3: "GeneratorExit", 4: "SystemExit: 3", 5: "BadText"}
        for index, line in expected.items():
            record = errors[index]
            self.assertTrue(record["exception"].startswith(line), record["exception"])
            self.assertIn("Traceback", record["error"])
            self.assertIn(line.split(":")[0], record["error"])
            self.assertIn("running %s" % record["task"], record["output"])
        self.assertNotIn("WorkerCrash", completed.output)

    def test_any_base_exception_is_that_tasks_error_in_process_slots(self):
        self.check_base_exceptions()

    def test_any_base_exception_is_that_tasks_error_in_threads(self):
        self.check_base_exceptions("--threads")

    def check_streams_and_folder(self, *worker_args):
        project = self.project(library_code=STREAMS)
        worker = project.start_worker("--slots", "1", *worker_args)
        project.write_hosts([worker])
        completed = project.run("manager", "--chunksize", "3", *FAST, timeout=60)
        self.assertRan(completed, 0)
        done, errors = outcomes(self, project)
        self.assertEqual(errors, {})
        self.assertEqual(sorted(done), list(range(10)))
        home = os.path.realpath(project.folder)
        for record in done.values():
            if record["task"].startswith("after"):
                self.assertEqual(os.path.realpath(record["result"]), home)
                self.assertIn("out of %s" % record["task"], record["output"])
                self.assertIn("err of %s" % record["task"], record["output"])
        console = worker.output()
        self.assertIn("out of after 5", console)
        self.assertIn("err of after 5", console)

    def test_closed_or_replaced_streams_and_a_deleted_folder_do_not_reach_the_next_task(self):
        self.check_streams_and_folder()

    def test_closed_or_replaced_streams_and_a_deleted_folder_in_threads(self):
        self.check_streams_and_folder("--threads")

    def test_calc_may_use_a_process_pool_in_process_slots(self):
        project = self.project(library_code="""
            import concurrent.futures, multiprocessing, os
            def make_tasks():
                return ["pool", "executor", "group"]
            def calc(x):
                if x == "pool":
                    with multiprocessing.Pool(2) as pool:
                        return sum(pool.map(abs, [-1, -2, -3]))
                if x == "executor":
                    with concurrent.futures.ProcessPoolExecutor(2) as executor:
                        return sum(executor.map(abs, [-1, -2, -3]))
                return os.getpgid(0) == os.getpid()      # a slot's process leads its own group
        """)
        worker = project.start_worker("--slots", "2")
        project.write_hosts([worker])
        completed = project.run("manager", "--chunksize", "1", *FAST, timeout=60)
        self.assertRan(completed, 0)
        done, _ = outcomes(self, project)
        self.assertEqual({i: r["result"] for i, r in done.items()}, {0: 6, 1: 6, 2: True})
        worker.process.terminate()
        self.assertEqual(worker.process.wait(15), 0)

    @unittest.skipUnless(HAS_PROC and hasattr(os, "killpg"), "needs /proc and process groups")
    def test_time_out_kills_the_slot_process_group_with_what_calc_started(self):
        project = self.project(library_code="""
            import subprocess, sys, time
            def make_tasks():
                return ["hang", "after"]
            def calc(x):
                if x == "hang":
                    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
                    with open("grandchild.pid", "w") as f:
                        f.write(str(child.pid))
                    time.sleep(60)
                return "fine"
        """)
        project.write_hosts([project.start_worker("--slots", "1")])
        completed = project.run("manager", "--chunksize", "1", "--task-timeout", "1", *FAST,
                                timeout=60)
        self.assertRan(completed, 1)
        done, errors = outcomes(self, project)
        self.assertEqual((sorted(done), sorted(errors)), ([1], [0]))
        with open(project.path("grandchild.pid")) as f:
            pid = int(f.read())
        self.addCleanup(lambda: gone(pid) or os.kill(pid, signal.SIGKILL))
        self.assertTrue(support.wait_for(lambda: gone(pid), 5),
                        "what the timed-out task started runs on")


POOL_AND_SLEEP = """
    import multiprocessing, subprocess, time
    def make_tasks():
        return [0, 1]
    def calc(x):
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        with multiprocessing.Pool(1) as pool:       # grandchildren of the worker
            pool.map(abs, [x])
            with open("started-%d" % x, "w"):
                pass
            time.sleep(60)
        return x
"""


@unittest.skipUnless(HAS_PROC, "finds processes in /proc")
class WorkerDeathTest(support.OdenTestCase):
    """A worker that ends (killed or stopped) takes its slot processes and theirs along."""

    def check_session_ends(self, end_worker):
        project = self.project(library_code=POOL_AND_SLEEP)
        worker = project.start_worker("--slots", "2")
        session = worker.process.pid
        self.addCleanup(support.kill_session, session)
        project.write_hosts([worker])
        Manager(project, "manager", "--chunksize", "1", *FAST)
        started = lambda: all(os.path.exists(project.path("started-%d" % x)) for x in (0, 1))
        self.assertTrue(support.wait_for(started, 60), "the tasks did not start")
        before = support.session_processes(session)
        self.assertGreaterEqual(len(before), 7, "worker, 2 slots, 2 pool processes, 2 sleepers")
        end_worker(worker)
        left = lambda: support.session_processes(session)
        self.assertTrue(support.wait_for(lambda: not left(), 2, 0.02),
                        "left running: %s" % [support.process_stat(p) for p in left()])

    def test_kill_9_of_the_worker_ends_its_slot_processes_within_2_s(self):
        self.check_session_ends(lambda worker: os.kill(worker.process.pid, signal.SIGKILL))

    def test_stopping_the_worker_ends_its_slot_processes(self):
        def stop(worker):
            worker.process.terminate()
            worker.process.wait(10)
        self.check_session_ends(stop)


SHARED = """
    import time
    RUN = sys.argv[sys.argv.index("--name") + 1] if "--name" in sys.argv else NAME
    def make_tasks():
        return [(RUN, i) for i in range(8)]
    def calc(task):
        time.sleep(0.3)
        return task
"""


class SharedWorkerTest(support.OdenTestCase):
    """Two manager runs on one worker: both finish, each with only its own results."""

    def test_two_managers_share_one_worker_and_each_gets_its_own_results(self):
        project = self.project(library_code=SHARED)
        worker = project.start_worker("--slots", "2")
        project.write_hosts([worker])
        alice = Manager(project, "manager", "--name", "alice", "--chunksize", "1", *FAST)
        self.assertTrue(support.wait_for(lambda: status(worker)["slots_busy"] > 0, 30))
        bob = Manager(project, "manager", "--name", "bob", "--chunksize", "1", *FAST)
        self.assertEqual(alice.finish(self, 60)[0], 0, alice.output()[-3000:])
        self.assertEqual(bob.finish(self, 60)[0], 0, bob.output()[-3000:])
        for run in ("alice", "bob"):
            records = []
            for path in project.files(run + "1_*.done.pickle"):
                with open(path, "rb") as f:
                    records.append(pickle.load(f))
            self.assertEqual(sorted(r["task"] for r in records), [(run, i) for i in range(8)])
            self.assertEqual([r for r in records if r["result"] != r["task"]], [])

    def test_a_killed_manager_stops_holding_slots_after_its_lease(self):
        project = self.project(library_code="""
            import os, time
            RUN = sys.argv[sys.argv.index("--name") + 1] if "--name" in sys.argv else NAME
            def make_tasks():
                return [(RUN, i) for i in range(4 if RUN == "bob" else 2)]
            def calc(task):
                if task[0] == "alice":
                    with open("alice-%d.pid" % os.getpid(), "w"):
                        pass
                    time.sleep(60)
                return task
        """)
        project.env["ODEN_RUN_LEASE"] = "1"
        worker = project.start_worker("--slots", "2")
        project.write_hosts([worker])
        alice = Manager(project, "manager", "--name", "alice", "--chunksize", "1", *FAST)
        self.assertTrue(support.wait_for(lambda: status(worker)["slots_busy"] == 2, 30))
        self.assertEqual(status(worker)["runs"], 1)
        os.killpg(alice.process.pid, signal.SIGKILL)
        alice.process.wait(10)
        bob = Manager(project, "manager", "--name", "bob", "--chunksize", "1", *FAST)
        self.assertEqual(bob.finish(self, 20)[0], 0, bob.output()[-3000:])
        self.assertEqual(len(project.files("bob1_*.done.pickle")), 4)
        if HAS_PROC:
            pids = [int(p.rsplit("-", 1)[1].split(".")[0]) for p in project.files("alice-*.pid")]
            self.assertTrue(pids)
            self.assertTrue(support.wait_for(lambda: all(gone(p) for p in pids), 5),
                            "alice's tasks still run")


class WireTest(support.OdenTestCase):
    """The worker's side of sharing, message by message, through the real protocol."""

    def client(self, *worker_args):
        self.project_ = project = self.project(library_code="""
            import time
            def make_tasks():
                return []
            def calc(x):
                time.sleep(x[1])
                return x
        """)
        self.worker = worker = project.start_worker(*worker_args)
        codec = oden.Codec(project.env["ODEN_KEY"].encode())
        client = oden.HostClient(oden.Host(1, "127.0.0.1", worker.port), codec, 10)
        self.addCleanup(client.close)
        hello = client.call("/hello", {})
        client.boot = hello["boot"]
        return client, hello

    def collect(self, client, run, count, seconds=30):
        """batch id -> [result] of `count` batches of `run`, acking as they come."""
        found, acks = {}, []
        deadline = time.monotonic() + seconds
        while len(found) < count and time.monotonic() < deadline:
            reply = client.call("/poll", {"run": run, "ack": acks, "wait": 1}, extra_wait=1)
            acks = [batch for batch, _ in reply["done"]]
            for batch, records in reply["done"]:
                found[batch] = [pickle.loads(r["result"]) for r in records]
        client.call("/poll", {"run": run, "ack": acks})
        return found

    def test_hello_names_the_body_limit(self):
        client, hello = self.client("--slots", "1", "--max-body", "5000000")
        self.assertEqual(hello["max_body"], 5000000)

    def test_runs_with_the_same_batch_ids_each_get_their_own_batches(self):
        client, _ = self.client("--slots", "2")
        for run in ("r1", "r2"):
            batches = [(b, [(b, oden.dumps((run, 0.05)))], None) for b in (1, 2, 3)]
            reply = client.call("/submit", {"run": run, "ack": [], "batches": batches})
            self.assertEqual(reply["accepted"], [1, 2, 3])
        reply = client.call("/poll", {"run": "r1", "ack": []})
        self.assertLessEqual(set(reply["active"]), {1, 2, 3})
        for run in ("r1", "r2"):
            self.assertEqual(self.collect(client, run, 3), {b: [(run, 0.05)] for b in (1, 2, 3)})
        reply = client.call("/poll", {"run": "r1", "ack": []})
        self.assertEqual((reply["done"], reply["active"]), ([], []))

    def check_goodbye(self, *worker_args):
        client, _ = self.client("--slots", "2", *worker_args)
        long = [(b, [(b, oden.dumps(("r1", 30)))], None) for b in (1, 2, 3)]
        client.call("/submit", {"run": "r1", "ack": [], "batches": long})
        self.assertTrue(support.wait_for(lambda: status(self.worker)["slots_busy"] == 2, 30))
        client.call("/poll", {"run": "r1", "bye": True})
        short = [(1, [(1, oden.dumps(("r2", 0)))], None), (2, [(2, oden.dumps(("r2", 0)))], None)]
        client.call("/submit", {"run": "r2", "ack": [], "batches": short})
        return client

    def test_goodbye_stops_the_runs_batches_and_frees_its_slots(self):
        client = self.check_goodbye()
        self.assertTrue(support.wait_for(lambda: status(self.worker)["slots_busy"] == 0, 5))
        self.assertEqual(self.collect(client, "r2", 2, 10), {1: [("r2", 0)], 2: [("r2", 0)]})
        self.assertEqual(status(self.worker)["runs"], 1)

    def test_goodbye_in_threads_drops_what_the_run_left(self):
        """A thread cannot be stopped: the slots stay busy, but nothing of r1 is queued
        or ever answered, and r2 gets only its own results."""
        client = self.check_goodbye("--threads")
        self.assertEqual(client.call("/poll", {"run": "r1", "ack": []})["active"], [])
        self.assertEqual(status(self.worker)["queued_batches"], 2)

    def test_two_runs_share_the_worker_capacity(self):
        client, _ = self.client("--slots", "1")
        capacity = 2 * 1 + oden.WORKER_BACKLOG
        batches = [(b, [(b, oden.dumps(("r", 5)))], None) for b in range(capacity)]
        reply = client.call("/submit", {"run": "r1", "ack": [], "batches": batches[:capacity - 2]})
        self.assertEqual(len(reply["accepted"]), capacity - 2)
        reply = client.call("/submit", {"run": "r2", "ack": [], "batches": batches[:4]})
        self.assertEqual((reply["accepted"], reply["busy"]), ([0, 1], [2, 3]))


class SlotLoopTest(unittest.TestCase):
    """In-process: no failure ends a slot's thread."""

    def setUp(self):
        streams = sys.stdout, sys.stderr
        self.addCleanup(setattr, sys, "stdout", streams[0])
        self.addCleanup(setattr, sys, "stderr", streams[1])

    def test_one_line_never_raises(self):
        class BadText(Exception):
            def __str__(self):
                raise RuntimeError("no text")

        class NotText(Exception):
            def __str__(self):
                return 42
        self.assertTrue(oden.one_line(BadText()).startswith("BadText"))
        self.assertTrue(oden.one_line(NotText()).startswith("NotText"))
        self.assertEqual(oden.one_line(ValueError("a\nb")), "ValueError: a")

    def order_of_runs(self, silent):
        """The order one slot runs batches a1..a3 and b1, b2 in, b submitted while a1 runs."""
        order, gate = [], threading.Event()

        def calc(task):
            if task == ("a", 1):
                gate.wait(10)
            order.append(task)
        state = oden.WorkerState(calc, 1, True, "t")
        self.addCleanup(state.stop_slots)
        state.start_slots()
        for run, ids in (("a", (1, 2, 3)), ("b", (1, 2))):
            batches = [(b, [(b, oden.dumps((run, b)))], None) for b in ids]
            state.submit({"run": run, "batches": batches})
            self.assertTrue(support.wait_for(lambda: state.status()["slots_busy"] == 1, 10))
            if silent:
                with state.lock:
                    state.runs["a"].heard -= 2 * oden.RUN_QUIET
        gate.set()
        self.assertTrue(support.wait_for(lambda: len(order) == 5, 10))
        return ["%s%d" % task for task in order]

    def test_runs_take_turns_and_a_silent_run_comes_last(self):
        self.assertEqual(self.order_of_runs(silent=False), ["a1", "b1", "a2", "b2", "a3"])
        self.assertEqual(self.order_of_runs(silent=True), ["a1", "b1", "b2", "a2", "a3"])

    def test_a_failing_slot_records_its_batch_as_errors_and_serves_on(self):
        state = oden.WorkerState(lambda x: 2 * x, 1, True, "t")
        original, calls = oden.ThreadSlot.send, []

        def send(slot, batch):
            calls.append(batch.id)
            if len(calls) == 1:
                raise RuntimeError("a bug in the slot")
            return original(slot, batch)
        self.addCleanup(state.stop_slots)
        patch = unittest.mock.patch.object(oden.ThreadSlot, "send", send)
        with patch, self.assertLogs("oden", "ERROR") as logs:
            state.start_slots()
            batches = [(b, [(b, oden.dumps(b))], None) for b in (1, 2)]
            state.submit({"run": "r", "ack": [], "batches": batches})
            found, deadline = {}, time.monotonic() + 10
            while len(found) < 2 and time.monotonic() < deadline:
                reply = state.poll({"run": "r", "ack": list(found), "wait": 1})
                found.update(reply["done"])
        self.assertEqual(sorted(found), [1, 2])
        [failed], [fine] = found[1], found[2]
        self.assertEqual((failed["ok"], failed["exception"]),
                         (False, "RuntimeError: a bug in the slot"))
        self.assertIn("Traceback", failed["error"])
        self.assertEqual(pickle.loads(fine["result"]), 4)
        self.assertIn("a bug in the slot", "\n".join(logs.output))

    def test_a_slot_whose_process_cannot_start_backs_off_and_reports_the_reason(self):
        state = oden.WorkerState(lambda x: 2 * x, 1, True, "t")
        original, calls = oden.ThreadSlot.send, []

        def send(slot, batch):
            calls.append(time.monotonic())
            if len(calls) <= 3:
                raise OSError(24, "Too many open files")
            return original(slot, batch)
        self.addCleanup(state.stop_slots)
        with unittest.mock.patch.object(oden.ThreadSlot, "send", send), self.assertLogs("oden", "ERROR"):
            state.start_slots()
            batches = [(b, [(b, oden.dumps(b))], None) for b in (1, 2, 3, 4)]
            state.submit({"run": "r", "ack": [], "batches": batches})
            found, deadline = {}, time.monotonic() + 20
            while len(found) < 4 and time.monotonic() < deadline:
                found.update(state.poll({"run": "r", "ack": list(found), "wait": 1})["done"])
        self.assertEqual([found[b][0]["exception"] for b in (1, 2, 3)],
                         ["OSError: [Errno 24] Too many open files"] * 3)
        self.assertEqual(pickle.loads(found[4][0]["result"]), 8)
        gaps = [b - a for a, b in zip(calls, calls[1:])]
        self.assertGreaterEqual(gaps[0], 0.1)
        self.assertGreaterEqual(gaps[1], 0.2)                 # doubling while it fails
        self.assertGreaterEqual(gaps[2], 0.4)


if __name__ == "__main__":
    unittest.main()
