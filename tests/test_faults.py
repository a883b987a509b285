"""Nothing lost: dead workers, killed managers, hung tasks.

Every test injects a real fault (SIGKILL, SIGSTOP, SIGINT, os._exit, a port
that never answers, garbage bytes) into real worker and manager processes and
then checks the result files: every task has exactly one result, nothing is
run twice that must not be, and the manager says what happened.
"""
import collections
import os
import pickle
import random
import re
import signal
import socket
import sys
import textwrap
import threading
import time
import unittest

import support

FAST = support.fast(2)


GATE = """
import os, time

def wait_for_gate():
    \"\"\"Hold the task until the test opens the gate (at most 30 s), so work is left for a late host.\"\"\"
    for _ in range(600):
        if os.path.exists("gate-open"):
            return
        time.sleep(0.05)
"""


def open_gate(project):
    with open(project.path("gate-open"), "w"):
        pass


def freeze(pid):
    """SIGSTOP `pid` and wait (bounded) until it really is stopped: kill() returns before that."""
    os.kill(pid, signal.SIGSTOP)

    def stopped():
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    if not os.path.exists("/proc/%d/stat" % pid):      # no /proc: give the signal time to land
        time.sleep(0.5)
        return True
    return wait_for(stopped, 10, 0.01)


wait_for = support.wait_for


Manager, results = support.Manager, support.results


def count_done(project):
    return len(project.files(project.name + "*.done.pickle"))


def temporaries(project):
    return project.files(project.name + "*.pickle.tmp*")


def runs_of(project, task):
    """How many times calc started on `task` (calc appends a line to ran.log each time)."""
    try:
        with open(project.path("ran.log")) as f:
            return f.read().split().count(str(task))
    except FileNotFoundError:
        return 0


def duplicates_dropped(output):
    match = re.search(r"(\d+) duplicates dropped", output)
    return int(match.group(1)) if match else None


class FaultTest(support.OdenTestCase):

    def assertEveryTaskOnce(self, project, count, expected):
        """Exactly one .done.pickle per task index 0..count-1, each with result expected(task)."""
        found = results(project)
        self.assertEqual(sorted(found), list(range(count)), "missing: %s" % sorted(set(range(count)) - set(found)))
        extra = {i: len(r) for i, r in found.items() if len(r) != 1}
        self.assertEqual(extra, {}, "tasks with more than one result file")
        wrong = [r for [r] in found.values() if r["result"] != expected(r["task"])]
        self.assertEqual(wrong, [])
        self.assertEqual(temporaries(project), [])
        return found

    # -- dead and restarted workers -------------------------------------------------

    def test_killed_worker_tasks_run_elsewhere_and_it_rejoins_on_the_same_port(self):
        project = self.project(library_code=GATE + textwrap.dedent("""
            def make_tasks():
                return list(range(30))
            def calc(x):
                if x >= 10:
                    wait_for_gate()
                time.sleep(0.1)
                return 3 * x
        """))
        victim, other = project.start_workers(2, "--slots", "1")
        project.write_hosts([victim, other])
        manager = Manager(project, "manager", *FAST)
        self.assertTrue(wait_for(lambda: count_done(project) >= 4), manager.output())
        victim.kill()
        self.assertTrue(wait_for(lambda: "%s is down" % victim.address in manager.output(), 30), manager.output())
        restarted_at = time.time()
        project.start_worker("--slots", "1", port=victim.port)
        rejoined = wait_for(lambda: manager.output().count("%s is up" % victim.address) == 2, 60)
        open_gate(project)
        self.assertTrue(rejoined, manager.output())
        code, output = manager.finish(self)
        self.assertEqual(code, 0, output[-4000:])
        found = self.assertEveryTaskOnce(project, 30, lambda x: 3 * x)
        self.assertRegex(output, re.escape(victim.address) + r": \d+ tasks go back to the queue")
        self.assertIn("retrying in the background", output)
        after = [r for [r] in found.values() if r["host"] == victim.address and r["started"] > restarted_at]
        self.assertTrue(after, "the restarted worker ran nothing:\n" + output[-4000:])

    def test_worker_stopped_by_sigterm_gives_its_running_tasks_back_not_errors(self):
        """Stopping a worker (SIGTERM, as a service manager does, or Ctrl-C on its console)
        is the host going away, not calc failing: what it was running runs elsewhere."""
        project = self.project(library_code="""
            import time
            def make_tasks():
                return list(range(16))
            def calc(x):
                time.sleep(0.3)
                return x + 2
        """)
        stopped, other = project.start_workers(2, "--slots", "2")
        project.write_hosts([stopped, other])
        manager = Manager(project, "manager", *FAST)
        self.assertTrue(wait_for(lambda: count_done(project) >= 2), manager.output())
        stopped.stop()
        self.assertEqual(stopped.process.returncode, 0, stopped.output())
        code, output = manager.finish(self)
        self.assertEqual(code, 0, output[-4000:])
        self.assertEqual(results(project, ".error.pickle"), {})
        self.assertEveryTaskOnce(project, 16, lambda x: x + 2)

    def test_worker_restarted_behind_the_managers_back_gets_its_tasks_again(self):
        """The manager is frozen while its only worker is killed and restarted on the same
        port, so it next meets a worker that never heard of its batches (new boot id)."""
        project = self.project(library_code="""
            import time
            def make_tasks():
                return list(range(16))
            def calc(x):
                time.sleep(0.25)
                return -x
        """)
        worker = project.start_worker("--slots", "2")
        project.write_hosts([worker])
        # --timeout 10: the restart of the worker under a loaded machine must not look like a
        # silent worker when the manager wakes up (the cause asserted below would differ)
        manager = Manager(project, "manager", "--interval-polling", "0.2", "--timeout", "10")
        self.assertTrue(wait_for(lambda: count_done(project) >= 2), manager.output())
        self.assertTrue(freeze(manager.process.pid), "the manager did not stop")
        try:
            before = count_done(project)
            worker.kill()
            project.start_worker("--slots", "2", port=worker.port)
        finally:
            os.kill(manager.process.pid, signal.SIGCONT)
        code, output = manager.finish(self)
        self.assertEqual(code, 0, output[-4000:])
        self.assertLess(before, 16)
        self.assertEveryTaskOnce(project, 16, lambda x: -x)
        self.assertRegex(output, re.escape(worker.address) + r" is down: (HTTP 409: request was meant for an "
                         r"earlier run of this worker|the worker restarted|connection closed)")
        self.assertEqual(output.count("%s is up" % worker.address), 2, output[-4000:])

    def test_late_result_of_a_stalled_worker_is_a_dropped_duplicate(self):
        """A worker frozen (SIGSTOP) past the timeout: its tasks run elsewhere; when it
        wakes up it delivers them too, and only the first result is kept."""
        project = self.project(library_code="""
            import time
            def make_tasks():
                return list(range(60))
            def calc(x):
                time.sleep(0.1)
                return x + 1000
        """)
        frozen, other = project.start_workers(2, "--slots", "1")
        project.write_hosts([frozen, other])
        manager = Manager(project, "manager", "--interval-polling", "0.2", "--timeout", "1")
        self.assertTrue(wait_for(lambda: count_done(project) >= 6), manager.output())
        os.kill(frozen.process.pid, signal.SIGSTOP)
        try:
            self.assertTrue(wait_for(lambda: "%s is down" % frozen.address in manager.output(), 30))
            time.sleep(1)
        finally:
            os.kill(frozen.process.pid, signal.SIGCONT)
        code, output = manager.finish(self)
        self.assertEqual(code, 0, output[-4000:])
        self.assertEveryTaskOnce(project, 60, lambda x: x + 1000)
        dropped = duplicates_dropped(output)
        self.assertGreaterEqual(dropped, 1, output[-4000:])
        self.assertEqual(output.count("duplicate result for task"), dropped)

    def test_gives_up_with_exit_3_when_every_host_stays_down(self):
        project = self.project(library_code="""
            import time
            def make_tasks():
                return list(range(30))
            def calc(x):
                time.sleep(0.2)
                return x
        """)
        workers = project.start_workers(2, "--slots", "1")
        project.write_hosts(workers)
        manager = Manager(project, "manager", "--give-up-after", "2", *FAST)
        self.assertTrue(wait_for(lambda: count_done(project) >= 2), manager.output())
        for worker in workers:
            worker.kill()
        code, output = manager.finish(self, 60)
        self.assertEqual(code, 3, output[-4000:])
        left = 30 - count_done(project)
        self.assertGreater(left, 0)
        self.assertRegex(output, r"every host has been down for over 2 s: stopping with %d tasks left; "
                                 r"run 'python3[.0-9]* \S*job.py resume --give-up-after 2 [^']*' to finish them"
                         % left)

    def test_hosts_down_at_start_join_when_started_later(self):
        project = self.project(library_code=GATE + textwrap.dedent("""
            def make_tasks():
                return list(range(30))
            def calc(x):
                if x >= 6:
                    wait_for_gate()
                time.sleep(0.1)
                return x * x
        """))
        early = project.start_worker("--slots", "1")
        late_port = support.free_port()
        late_address = "127.0.0.1:%d" % late_port
        project.write_hosts([early, late_address])
        manager = Manager(project, "manager", *FAST)
        self.assertTrue(wait_for(lambda: count_done(project) >= 3), manager.output())
        self.assertIn("%s is down: connection refused" % late_address, manager.output())
        project.start_worker("--slots", "1", port=late_port)
        joined = wait_for(lambda: "%s is up" % late_address in manager.output(), 60)
        open_gate(project)
        self.assertTrue(joined, manager.output())
        code, output = manager.finish(self)
        self.assertEqual(code, 0, output[-4000:])
        found = self.assertEveryTaskOnce(project, 30, lambda x: x * x)
        self.assertTrue(any(r["host"] == late_address for [r] in found.values()), output[-4000:])

    def test_worker_that_never_answers_does_not_hang_the_run(self):
        project = self.project(library_code="""
            def make_tasks():
                return list(range(12))
            def calc(x):
                return x - 1
        """)
        port, close = support.silent_server()
        self.addCleanup(close)
        worker = project.start_worker("--slots", "2")
        project.write_hosts(["127.0.0.1:%d" % port, worker])
        started = time.monotonic()
        completed = project.run("manager", "--interval-polling", "0.2", "--timeout", "1.5", timeout=90)
        self.assertRan(completed)
        self.assertLess(time.monotonic() - started, 60)
        self.assertEveryTaskOnce(project, 12, lambda x: x - 1)
        self.assertRegex(completed.output, r"127.0.0.1:%d is down: no (whole )?answer within" % port)

    def test_down_host_is_retried_with_backoff_and_logged_once(self):
        """A port that hangs up on every connection: over a 4 s run, retries 0.5, 1, 2 s apart
        mean about 4 attempts (a fixed 0.5 s retry would make 8, none at all hundreds)."""
        project = self.project(library_code="""
            import time
            def make_tasks():
                return [4]
            def calc(x):
                time.sleep(x)
                return x
        """)
        port, attempts, close = hang_up_server()
        self.addCleanup(close)
        worker = project.start_worker("--slots", "1")
        project.write_hosts(["127.0.0.1:%d" % port, worker])
        completed = project.run("manager", *FAST)
        self.assertRan(completed)
        self.assertEveryTaskOnce(project, 1, lambda x: x)
        self.assertTrue(2 <= len(attempts) <= 6, "%d connection attempts in a 4 s run" % len(attempts))
        self.assertEqual(completed.output.count("127.0.0.1:%d is down: connection closed without an answer" % port),
                         1, completed.output)

    # -- what calc does to its slot ------------------------------------------------

    def test_calc_exception_and_crashed_slot_process_are_errors_run_once(self):
        """Default process mode: os._exit in calc kills only the slot's child; the error names
        the exit code, the slot comes back; an exception is an error. Neither is retried."""
        project = self.project(library_code="""
            import os
            def make_tasks():
                return list(range(8))
            def calc(x):
                with open("ran.log", "a") as f:
                    f.write("%d\\n" % x)
                if x == 2:
                    os._exit(7)
                if x == 5:
                    raise ValueError("five is bad")
                return 2 * x
        """)
        worker = project.start_worker("--slots", "1")
        project.write_hosts([worker])
        completed = project.run("manager", *FAST)
        self.assertRan(completed, 1)
        done, errors = results(project), results(project, ".error.pickle")
        self.assertEqual(sorted(done), [0, 1, 3, 4, 6, 7])
        self.assertTrue(all(r["result"] == 2 * r["task"] for [r] in done.values()))
        self.assertEqual(sorted(errors), [2, 5])
        [crash], [raised] = errors[2], errors[5]
        self.assertIn("exit code 7", crash["error"])
        self.assertEqual(raised["exception"], "ValueError: five is bad")
        self.assertIn("ValueError: five is bad", raised["error"])
        self.assertEqual([runs_of(project, x) for x in range(8)], [1] * 8)
        self.assertNotIn("is down", completed.output)

    def _poison_project(self):
        """Threads-mode workers whose whole process dies (os._exit) on task 0."""
        project = self.project(library_code="""
            import os, time
            def make_tasks():
                return list(range(10))
            def calc(x):
                with open("ran.log", "a") as f:
                    f.write("%d\\n" % x)
                if x == 0:
                    time.sleep(0.3)      # lets the results ahead of it in the queue reach the manager
                    os._exit(1)
                time.sleep(0.05)
                return x + 7
        """)
        workers = project.start_workers(4, "--threads", "--slots", "1")
        project.write_hosts(workers)
        return project, workers

    def test_poison_task_is_an_error_after_max_deaths_and_the_rest_finish(self):
        project, workers = self._poison_project()
        completed = project.run("manager", "--chunksize", "1", *FAST, timeout=120)
        self.assertRan(completed, 1)
        [poison] = results(project, ".error.pickle")[0]
        self.assertEqual(poison["error"], "worker died 3 times while running this task")
        self.assertEqual(sorted(results(project, ".error.pickle")), [0])
        self.assertEqual(runs_of(project, 0), 3)
        self.assertEqual(sum(w.process.poll() is not None for w in workers), 3)
        done = results(project)
        self.assertEqual(sorted(done), list(range(1, 10)))
        self.assertTrue(all(len(r) == 1 and r[0]["result"] == i + 7 for i, r in done.items()))

    def test_infrastructure_failures_retry_up_to_max_attempts(self):
        project, workers = self._poison_project()
        completed = project.run("manager", "--chunksize", "1", "--max-attempts", "2", "--max-deaths", "50",
                                *FAST, timeout=120)
        self.assertRan(completed, 1)
        [poison] = results(project, ".error.pickle")[0]
        self.assertRegex(poison["error"], r"^gave up after 2 attempts: ")
        self.assertEqual(runs_of(project, 0), 2)
        self.assertEqual(sorted(results(project)), list(range(1, 10)))

    def test_long_task_is_not_taken_for_a_dead_worker(self):
        project = self.project(library_code="""
            import time
            def make_tasks():
                return ["long", "short"]
            def calc(x):
                time.sleep(3.5 if x == "long" else 0)
                return x.upper()
        """)
        worker = project.start_worker("--slots", "2")
        project.write_hosts([worker])
        completed = project.run("manager", "--interval-polling", "0.2", "--timeout", "1.5")
        self.assertRan(completed)
        self.assertEveryTaskOnce(project, 2, str.upper)
        self.assertNotIn("is down", completed.output)
        self.assertEqual(duplicates_dropped(completed.output), 0)

    def test_task_timeout_kills_the_hung_process_and_the_worker_goes_on(self):
        project = self.project(library_code="""
            import os, time
            def make_tasks():
                return list(range(5))
            def calc(x):
                if x == 1:
                    with open("hung.pid", "w") as f:
                        f.write(str(os.getpid()))
                    time.sleep(1000)
                return x * 10
        """)
        worker = project.start_worker("--slots", "1")
        project.write_hosts([worker])
        completed = project.run("manager", "--task-timeout", "2", *FAST)
        self.assertRan(completed, 1)
        [hung] = results(project, ".error.pickle")[1]
        self.assertRegex(hung["error"], r"^timed out after 2(\.0)? s")
        self.assertEqual(sorted(results(project, ".error.pickle")), [1])
        done = results(project)
        self.assertEqual(sorted(done), [0, 2, 3, 4])
        self.assertEqual({r["host"] for [r] in done.values()}, {worker.address})
        with open(project.path("hung.pid")) as f:
            pid = int(f.read())
        self.assertTrue(wait_for(lambda: not process_exists(pid), 10), "the hung task's process still runs")
        self.assertIsNone(worker.process.poll())

    def test_crash_and_timeout_in_a_busy_slot_blame_only_their_task(self):
        """One slot with batches queued behind it: task 3 kills its process and task 7 hangs;
        only those two are errors, every other task runs exactly once on the same worker."""
        project = self.project(library_code="""
            import os, time
            def make_tasks():
                return list(range(12))
            def calc(x):
                time.sleep(0.05)
                if x == 3:
                    os._exit(9)
                if x == 7:
                    time.sleep(1000)
                return x * 10
        """)
        worker = project.start_worker("--slots", "1")
        project.write_hosts([worker])
        completed = project.run("manager", "--task-timeout", "2", "--chunksize", "1", *FAST)
        self.assertRan(completed, 1)
        errors = results(project, ".error.pickle")
        self.assertEqual(sorted(errors), [3, 7])
        self.assertIn("exit code 9", errors[3][0]["error"])
        self.assertRegex(errors[7][0]["error"], r"^timed out after 2(\.0)? s")
        done = results(project)
        self.assertEqual(sorted(done), [i for i in range(12) if i not in (3, 7)])
        self.assertTrue(all(len(copies) == 1 and copies[0]["result"] == i * 10 for i, copies in done.items()))
        self.assertIsNone(worker.process.poll())

    def test_task_timeout_in_threads_mode_is_an_error_too(self):
        project = self.project(library_code="""
            import time
            def make_tasks():
                return list(range(4))
            def calc(x):
                if x == 0:
                    time.sleep(1000)
                return x * 10
        """)
        worker = project.start_worker("--slots", "1", "--threads")
        project.write_hosts([worker])
        completed = project.run("manager", "--task-timeout", "1.5", *FAST)
        self.assertRan(completed, 1)
        [hung] = results(project, ".error.pickle")[0]
        self.assertRegex(hung["error"], r"^timed out after 1\.5 s \(its thread could not be stopped and runs on\)")
        self.assertEqual(sorted(results(project)), [1, 2, 3])

    # -- the manager interrupted or killed, then resume ---------------------------------

    def test_ctrl_c_saves_what_arrived_and_prints_the_resume_command(self):
        project = self.project(library_code="""
            import time
            def make_tasks():
                return list(range(16))
            def calc(x):
                time.sleep(0.3)
                return x % 7
        """)
        worker = project.start_worker("--slots", "2")
        project.write_hosts([worker])
        manager = Manager(project, "manager", *FAST)
        self.assertTrue(wait_for(lambda: count_done(project) >= 3), manager.output())
        manager.process.send_signal(signal.SIGINT)
        code, output = manager.finish(self, 30)
        self.assertEqual(code, 130, output[-4000:])
        saved = count_done(project)
        match = re.search(r"(\d+) done, 0 failed, (\d+) not run", output)
        self.assertTrue(match, output[-4000:])
        self.assertEqual(int(match.group(1)), saved)
        self.assertEqual(saved + int(match.group(2)), 16)
        self.assertGreater(int(match.group(2)), 0)
        self.assertIn("summary:", output)
        self.assertRegex(output, r"%s tasks left; run 'python3[.0-9]* \S*job.py resume --interval-polling 0.2 "
                                 r"--timeout 2' to finish them" % match.group(2))
        time.sleep(0.5)
        self.assertEqual(count_done(project), saved, "results were written after the manager exited")
        completed = project.run("resume", *FAST)
        self.assertRan(completed)
        self.assertEveryTaskOnce(project, 16, lambda x: x % 7)

    def test_ctrl_c_on_a_terminal_running_local_records_no_false_failures(self):
        """A terminal's Ctrl-C reaches the whole process group: the `local` workers stop too,
        and the tasks they were running must stay unfinished, not become errors."""
        project = self.project(library_code="""
            import time
            def make_tasks():
                return list(range(12))
            def calc(x):
                time.sleep(0.3)
                return x
        """)
        manager = Manager(project, "local", "--workers", "2", "--slots", "1", "--interval-polling", "0.2")
        self.assertTrue(wait_for(lambda: count_done(project) >= 2), manager.output())
        os.killpg(manager.process.pid, signal.SIGINT)
        code, output = manager.finish(self, 30)
        self.assertEqual(code, 130, output[-4000:])
        self.assertEqual(project.files("t*.error.pickle"), [], output[-4000:])
        self.assertRegex(output, r"run 'python3[.0-9]* \S*job.py local --resume [^']*' to finish them")
        self.assertRan(project.run("local", "--resume", "--workers", "2", "--slots", "1", "--interval-polling", "0.2"))
        self.assertEveryTaskOnce(project, 12, lambda x: x)

    def test_killed_manager_then_resume_covers_every_task_exactly_once(self):
        project = self.project(library_code="""
            import time
            def make_tasks():
                return [("job", i) for i in range(60)]
            def calc(task):
                time.sleep(0.04)
                return task[1] ** 2
        """)
        workers = project.start_workers(2, "--slots", "2")
        project.write_hosts(workers)
        manager = Manager(project, "manager", *FAST)
        self.assertTrue(wait_for(lambda: count_done(project) >= 10), manager.output())
        os.killpg(manager.process.pid, signal.SIGKILL)
        manager.process.wait(30)
        first = count_done(project)
        self.assertLess(first, 60, "the run ended before the kill: make its tasks longer")
        results(project)                              # every file the killed manager left loads
        leftover = project.path("t1_20000101-000000_3.done.pickle.tmp1a2b3c4d")
        with open(leftover, "wb") as f:
            f.write(b"half a pick")
        completed = project.run("resume", *FAST)
        self.assertRan(completed)
        removed = re.search(r"removed (\d+) temporary files", completed.output)
        self.assertTrue(removed and int(removed.group(1)) >= 1, completed.output)   # ours, and any the kill left
        self.assertFalse(os.path.exists(leftover))
        self.assertIn("resume: %d of 60 tasks have a saved success; %d to run" % (first, 60 - first),
                      completed.output)
        found = self.assertEveryTaskOnce(project, 60, lambda task: task[1] ** 2)
        self.assertEqual(collections.Counter(r["task"] for [r] in found.values()),
                         collections.Counter(("job", i) for i in range(60)))

    def test_resume_reports_and_reruns_unreadable_result_files(self):
        project = self.project(library_code="""
            def make_tasks():
                return list(range(6))
            def calc(x):
                return x * 11
        """)
        worker = project.start_worker("--slots", "2")
        project.write_hosts([worker])
        self.assertRan(project.run("manager", *FAST))
        paths = {r[0]["index"]: r[0]["path"] for r in results(project).values()}
        with open(paths[1], "rb") as f:
            data = f.read()
        with open(paths[1], "wb") as f:
            f.write(data[:len(data) // 2])                 # truncated
        with open(paths[4], "wb") as f:
            f.write(b"\x80\x04garbage\x00\xff" + os.urandom(64))
        completed = project.run("resume", *FAST)
        self.assertRan(completed)
        for index in (1, 4):
            self.assertRegex(completed.output, "unreadable result file .*%s .*its task will run again"
                             % re.escape(os.path.basename(paths[index])))
        self.assertIn("resume: 4 of 6 tasks have a saved success; 2 to run", completed.output)
        readable = collections.defaultdict(list)
        for path in project.files("t*.done.pickle"):
            try:
                with open(path, "rb") as f:
                    record = pickle.load(f)
            except Exception:
                continue
            readable[record["index"]].append(record["result"])
        self.assertEqual(dict(readable), {i: [i * 11] for i in range(6)})

    def test_result_that_cannot_be_saved_is_not_reported_as_done(self):
        """The manager cannot write one result file (here a directory is in the way; on a real
        machine a full disk): the run must not end with exit 0 and 'all tasks are processed'."""
        project = self.project(library_code=GATE + textwrap.dedent("""
            def make_tasks():
                return list(range(6))
            def calc(x):
                if x == 5:
                    wait_for_gate()
                return x
        """))
        worker = project.start_worker("--slots", "1")
        project.write_hosts([worker])
        manager = Manager(project, "manager", *FAST)
        self.assertTrue(wait_for(lambda: re.search(r"t_(\d{8}-\d{6})\.log", manager.output())), manager.output())
        stamp = re.search(r"t_(\d{8}-\d{6})\.log", manager.output()).group(1)
        os.mkdir(project.path("t1_%s_5.done.pickle" % stamp))
        open_gate(project)
        code, output = manager.finish(self)
        self.assertEqual(code, 2, output[-4000:])
        self.assertNotIn("all tasks are processed", output)
        self.assertIn("cannot write", output)
        self.assertIn("resume", output)
        self.assertEqual(temporaries(project), [])

    # -- speculation ---------------------------------------------------------------

    def test_speculate_runs_a_backup_copy_of_a_straggler(self):
        """Task 0 hangs the first time it runs (60 s) and is quick after that: only a backup
        copy on the idle host lets the run finish early; one result file is kept."""
        project = self.project(library_code="""
            import os, time
            def make_tasks():
                return list(range(8))
            def calc(x):
                if x == 0:
                    try:
                        os.close(os.open("first-copy", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                        time.sleep(60)
                    except FileExistsError:
                        pass
                time.sleep(0.05)
                return x + 0.5
        """)
        workers = project.start_workers(2, "--slots", "1")
        project.write_hosts(workers)
        started = time.monotonic()
        completed = project.run("manager", "--speculate", *FAST, timeout=120)
        self.assertRan(completed)
        self.assertLess(time.monotonic() - started, 50)
        self.assertIn("runs a backup copy of straggler task 0", completed.output)
        self.assertEveryTaskOnce(project, 8, lambda x: x + 0.5)

    # -- everything at once --------------------------------------------------------

    def test_chaos_random_kills_and_restarts_lose_nothing(self):
        seed = int(os.environ.get("ODEN_CHAOS_SEED", "20240611"))
        rng = random.Random(seed)
        count = 300
        project = self.project(library_code="""
            import time
            def make_tasks():
                return list(range(%d))
            def calc(x):
                time.sleep(0.01 + (x * 7919 %% 21) / 1000.0)
                return x * x + 1
        """ % count)
        workers = project.start_workers(4, "--slots", "1")
        project.write_hosts(workers)
        # Every kill charges a death (and an attempt) to every task on that host, so an
        # innocent task could reach the default limits of 3 deaths / 5 attempts and be
        # marked poison: the limits are raised so that only a real loss fails the test.
        manager = Manager(project, "manager", "--max-deaths", "50", "--max-attempts", "50", *FAST)
        figures = collections.Counter()
        problems = []
        restarting = set()
        lock = threading.Lock()

        def restart(slot, port, delay):
            try:
                time.sleep(delay)
                worker = project.start_worker("--slots", "1", port=port)
                with lock:
                    workers[slot] = worker
                    figures["restarts"] += 1
            except Exception as e:
                problems.append(e)
            finally:
                with lock:
                    restarting.discard(slot)

        def chaos():
            helpers = []
            try:
                wait_for(lambda: count_done(project) >= 10 or not manager.running(), 60)
                while figures["kills"] < 6 and manager.running():
                    time.sleep(rng.uniform(0.1, 0.3))
                    with lock:
                        alive = [i for i, w in enumerate(workers) if i not in restarting and w.process.poll() is None]
                    if len(alive) < 2:
                        continue
                    slot = rng.choice(alive)
                    workers[slot].kill()
                    figures["kills"] += 1
                    if rng.random() < 0.75:
                        with lock:
                            restarting.add(slot)
                        helper = threading.Thread(target=restart, args=(slot, workers[slot].port,
                                                                         rng.uniform(0, 0.3)))
                        helper.start()
                        helpers.append(helper)
            except Exception as e:
                problems.append(e)
            for helper in helpers:
                helper.join(90)

        thread = threading.Thread(target=chaos)
        thread.start()
        code, output = manager.finish(self, 150)
        thread.join(120)
        self.assertFalse(thread.is_alive())
        self.assertEqual(problems, [])
        found = results(project)
        lost = sorted(set(range(count)) - set(found))
        print("\nchaos (seed %d): %d tasks, %d kills, %d restarts, %s duplicates dropped, %d tasks lost"
              % (seed, count, figures["kills"], figures["restarts"], duplicates_dropped(output), len(lost)),
              file=sys.stderr)
        self.assertEqual(code, 0, output[-4000:])
        self.assertEqual(lost, [])
        self.assertEqual(results(project, ".error.pickle"), {})
        self.assertEveryTaskOnce(project, count, lambda x: x * x + 1)
        self.assertGreaterEqual(figures["kills"], 3, "the run ended before the chaos got going")
        self.assertEqual(output.count("duplicate result for task"), duplicates_dropped(output))


def hang_up_server():
    """A loopback port that accepts every connection and closes it at once:
    (port, list of accept times, close function)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    attempts = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection = server.accept()[0]
            except OSError:
                continue
            attempts.append(time.monotonic())
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def close():
        stop.set()
        thread.join(5)
        server.close()

    return server.getsockname()[1], attempts, close


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % pid) as f:              # a zombie is as good as gone
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return not os.path.exists("/proc")


if __name__ == "__main__":
    unittest.main()
