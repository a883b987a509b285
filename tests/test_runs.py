"""A run's own files, blame on the right cause, and exit codes that mean what they say.

Each test is a user's session with real workers on loopback: a run never reads another run's
files, a failure is recorded only against the task (or worker death) that caused it, and the
manager's exit code and last words tell the truth.
"""
import glob
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import time

import support

FAST = support.fast(3)
Manager, results = support.Manager, support.results

ECHO = """
import time
def make_tasks():
    return list(range(int(os.environ.get("TASKS", "3"))))
def calc(x):
    time.sleep(float(os.environ.get("SLEEP", "0")))
    return x
"""


def load(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def summary_counts(output):
    match = re.search(r"(\d+) done, (\d+) failed, (\d+) not run", output)
    return tuple(int(n) for n in match.groups()) if match else None


def error_records(project):
    return [r for [r] in results(project, ".error.pickle").values()]


class IdentityTest(support.OdenTestCase):
    """A run reads and writes only its own files."""

    def test_a_name_that_is_a_prefix_of_another_reads_only_its_own_files(self):
        project = self.project(library_code=ECHO, name="sim2")
        worker = project.start_worker("--slots", "2", "--threads")
        project.write_hosts([worker])
        self.assertRan(project.run("manager", "--name", "sim2", *FAST))
        self.assertEqual(len(project.files("sim21_*.done.pickle")), 3)    # "sim" + host 21?
        listed = project.run("results", "--name", "sim")
        self.assertRan(listed)
        self.assertIn("no result files of run 'sim'", listed.output)
        self.assertNotIn("->", listed.output)
        resumed = project.run("resume", "--name", "sim", *FAST)
        self.assertRan(resumed)
        self.assertIn("0 of 3 tasks have a saved success; 3 to run", resumed.output)
        mine = [load(p) for p in project.files("sim1_*.done.pickle")]
        self.assertEqual(sorted(r["result"] for r in mine), [0, 1, 2])
        self.assertEqual({r["name"] for r in mine}, {"sim"})
        again = project.run("resume", "--name", "sim2", *FAST)
        self.assertIn("3 of 3 tasks have a saved success; 0 to run", again.output)

    def test_the_same_host_twice_is_used_once_with_a_warning(self):
        project = self.project(library_code=ECHO)
        project.env["TASKS"] = "12"
        worker = project.start_worker("--slots", "2", "--threads")
        project.write_hosts([worker, worker])
        completed = project.run("manager", *FAST)
        self.assertRan(completed)
        self.assertIn("line 2: %s is listed already on line 1: using it once" % worker.address,
                      completed.output)
        self.assertNotIn("lost them", completed.output)
        table = completed.output.split("summary:")[1]
        self.assertEqual(table.count(worker.address), 1, table)
        self.assertEqual(len(results(project)), 12)

    def test_back_to_back_runs_get_their_own_stamp_at_once(self):
        project = self.project(library_code=ECHO)
        worker = project.start_worker("--slots", "2", "--threads")
        project.write_hosts([worker])
        for _ in range(3):
            self.assertRan(project.run("manager", "--yes", *FAST))
        stamps = {re.search(r"_(\d{8}-\d{6}(?:-\d+)?)_", os.path.basename(p)).group(1)
                  for p in project.files("t1_*.done.pickle")}
        self.assertEqual(len(stamps), 3, stamps)
        self.assertEqual(len(project.files("t_*.log")), 3)
        self.assertEqual(len(project.files("t*.done.pickle")), 9)

    def test_one_manager_per_run_name_and_folder(self):
        project = self.project(library_code=ECHO)
        project.env.update(TASKS="4", SLEEP="0.5")
        worker = project.start_worker("--slots", "1", "--threads")
        project.write_hosts([worker])
        first = Manager(project, "manager", *FAST)
        self.assertTrue(support.wait_for(lambda: "is up" in first.output(), 30), first.output())
        second = project.run("resume", *FAST)
        self.assertRan(second, 2)
        self.assertIn("a manager of run 't' is running in", second.output)
        self.assertIn("--concurrent", second.output)
        self.assertEqual(second.output.strip().count("\n"), 0, second.output)
        code, output = first.finish(self)
        self.assertEqual(code, 0, output[-3000:])
        self.assertEqual(len(results(project)), 4)
        self.assertRan(project.run("resume", *FAST))      # the lock went with the first manager

    def test_the_resume_hint_repeats_what_identifies_the_run_and_finishes_it(self):
        project = self.project(library_code=ECHO)
        project.env.update(TASKS="10", SLEEP="0.3")
        worker = project.start_worker("--slots", "1", "--threads")
        os.mkdir(project.path("out dir"))
        with open(project.path("my hosts.txt"), "w") as f:
            f.write(worker.address + "\n")
        for stop, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
            with self.subTest(signal=stop):
                manager = Manager(project, "manager", "--hosts", "my hosts.txt", "--folder", "out dir",
                                  "--name", "exp7", "--yes", *FAST)
                before = len(glob.glob(project.path("out dir", "exp71_*.done.pickle")))
                self.assertTrue(support.wait_for(lambda: len(glob.glob(
                    project.path("out dir", "exp71_*.done.pickle"))) > before, 30), manager.output())
                manager.process.send_signal(stop)
                exit_code, output = manager.finish(self, 30)
                self.assertEqual(exit_code, code, output[-3000:])
                self.assertIn("summary:", output)
                hint = re.search(r"run '(.*)' to finish them", output).group(1)
                self.assertIn("--hosts 'my hosts.txt' --folder 'out dir' --name exp7", hint)
                self.assertIn(" resume ", hint)
                self.assertNotIn("--yes", hint)
        words = shlex.split(hint)
        self.assertEqual(words[:2], [os.path.basename(sys.executable), project.script])
        finished = subprocess.run([sys.executable] + words[1:], cwd=project.folder, env=project.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        self.assertEqual(finished.returncode, 0, finished.stdout.decode()[-3000:])
        done = glob.glob(project.path("out dir", "exp7*.done.pickle"))
        records = [load(p) for p in done]
        self.assertEqual(sorted({r["task"] for r in records}), list(range(10)))
        self.assertEqual(project.files("exp7*"), [])       # nothing in the current folder


class BlameTest(support.OdenTestCase):
    """A failure is recorded against its cause only; only a worker's death is a death."""

    def test_a_task_over_the_workers_max_body_is_its_own_error_and_the_rest_run(self):
        project = self.project(library_code="""
            def make_tasks():
                return ["x" * 2000000] + ["small %d" % i for i in range(5)]
            def calc(task):
                return len(task)
        """)
        worker = project.start_worker("--slots", "2", "--threads", "--max-body", "1000000")
        project.write_hosts([worker])
        completed = project.run("manager", *FAST)
        self.assertRan(completed, 1)
        done = results(project)
        self.assertEqual(sorted(done), [1, 2, 3, 4, 5])
        [error] = error_records(project)
        self.assertEqual(error["index"], 0)
        self.assertIn("--max-body", error["exception"])
        self.assertIn("1000000", error["exception"])
        self.assertNotIn("died", completed.output)
        self.assertEqual(summary_counts(completed.output), (5, 1, 0))

    def test_a_broken_line_to_a_living_worker_is_not_a_death(self):
        project = self.project(library_code="""
            import time
            def make_tasks():
                return list(range(2))
            def calc(x):
                time.sleep(1.5)
                return x
        """)
        worker = project.start_worker("--slots", "2", "--threads")
        proxy = support.Proxy(worker.port)
        self.addCleanup(proxy.close)
        project.write_hosts([proxy.address])
        manager = Manager(project, "manager", "--max-deaths", "1", "--no-keepalive", *FAST)
        self.assertTrue(support.wait_for(lambda: "is up" in manager.output(), 30), manager.output())
        busy = lambda: "2 of 2 slots busy" in support.get(worker.url + "/status")[1]
        self.assertTrue(support.wait_for(busy, 30), manager.output())   # the tasks run there now
        self.assertGreaterEqual(proxy.cut(), 1)
        code, output = manager.finish(self)
        self.assertEqual(code, 0, output[-3000:])
        self.assertIn("the worker lives and keeps its tasks", output)
        self.assertNotIn("TaskLost", output)
        self.assertEqual(sorted(results(project)), [0, 1])

    def test_a_time_out_is_an_attempt_that_names_timeout_not_a_death(self):
        project = self.project(library_code="""
            def make_tasks():
                return ["x" * 100000]
            def calc(task):
                return len(task)
        """)
        worker = project.start_worker("--slots", "1", "--threads")
        proxy = support.Proxy(worker.port, rate=5000)       # 20 s for the task: over any deadline
        self.addCleanup(proxy.close)
        project.write_hosts([proxy.address])
        completed = project.run("manager", "--timeout", "1", "--interval-polling", "0.2",
                                "--max-attempts", "2", "--max-deaths", "1")
        self.assertRan(completed, 1)
        [error] = error_records(project)
        self.assertIn("gave up after 2 attempts", error["exception"])
        self.assertIn("--timeout", error["exception"])
        self.assertNotIn("died", completed.output)

    def test_every_host_refusing_stops_at_once_with_a_line_per_cause(self):
        project = self.project(library_code=ECHO)
        keyless = project.start_worker("--slots", "1", "--threads")
        project.write_hosts([keyless])
        started = time.monotonic()
        completed = project.run("manager", "--insecure", *FAST)
        self.assertRan(completed, 2)
        self.assertLess(time.monotonic() - started, 20)
        self.assertIn("refuses work: HTTP 401", completed.output)
        self.assertIn("without --insecure", completed.output)
        self.assertIn("stopped: no host will take work", completed.output)
        self.assertNotIn("Traceback", completed.output)
        self.assertEqual(project.files("*.pickle"), [])


class SavedOrSaidTest(support.OdenTestCase):
    """Every outcome that arrives is a file, or the run says it is not and exits non-zero."""

    def test_a_result_that_cannot_be_saved_is_that_tasks_error(self):
        project = self.project(library_code="""
            class Awkward:
                def __reduce__(self):
                    if os.environ.get("ROLE") == "manager":
                        raise ValueError("cannot be pickled here")
                    return (Awkward, ())
            def make_tasks():
                return [0, 1, 2]
            def calc(x):
                return Awkward() if x == 1 else x
        """)
        worker = project.start_worker("--slots", "1", "--threads")
        project.write_hosts([worker])
        project.env["ROLE"] = "manager"
        for pack in ((), ("--pack",)):
            with self.subTest(pack=pack):
                completed = project.run("manager", "--yes", *(FAST + pack))
                self.assertRan(completed, 1)
                self.assertIn("the result arrived but cannot be saved: ValueError: cannot be pickled "
                              "here", completed.output)
                self.assertEqual(summary_counts(completed.output), (2, 1, 0))
        errors = [load(p) for p in project.files("t*.error.pickle")]
        self.assertEqual([e["index"] for e in errors], [1, 1])

    def test_output_that_no_encoding_can_hold_reaches_log_and_console_escaped(self):
        project = self.project(library_code="""
            def make_tasks():
                return [0, 1]
            def calc(x):
                print("bad bytes \\udcff and \\x1b[31mred")
                if x:
                    raise ValueError("\\x1b]0;owned\\x07 \\udcfe")
                return x
        """)
        worker = project.start_worker("--slots", "1", "--threads")
        project.write_hosts([worker])
        completed = project.run("manager", *FAST)
        self.assertRan(completed, 1)
        [log] = project.files("t_*.log")
        with open(log, encoding="utf-8") as f:
            text = f.read()
        for seen in (completed.output, text):
            self.assertIn(r"ValueError: \x1b]0;owned\x07 \udcfe", seen)
            self.assertIn(r"bad bytes \udcff and \x1b[31mred", seen)
            self.assertNotIn("\x1b", seen)
            self.assertNotIn("Logging error", seen)


class ExitCodeTest(support.OdenTestCase):
    """Exit codes mean what the README says, however the script calls oden.main()."""

    OLD_EXAMPLE = """
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oden

def make_tasks():
    if os.environ.get("BROKEN"):
        raise KeyError("no such table")
    return [1, 0]

def calc(x):
    return 1 / x

if __name__ == "__main__":
    oden.main(make_tasks=make_tasks, calc=calc, name="old")
"""

    def test_a_script_without_sys_exit_still_exits_with_the_right_code(self):
        project = self.project(library_code="")
        project.script = project.path("old.py")
        with open(project.script, "w") as f:
            f.write(self.OLD_EXAMPLE)
        self.assertRan(project.run("test"), 1)
        worker = project.start_worker("--slots", "1", "--threads")
        project.write_hosts([worker])
        self.assertRan(project.run("manager", *FAST), 1)
        self.assertRan(project.run("manager", "--hosts", "missing.txt", *FAST), 2)
        self.assertRan(project.run("results", "--name", "old"), 0)

    def test_make_tasks_raising_is_one_line_with_the_traceback_in_the_log(self):
        project = self.project(library_code="")
        project.script = project.path("old.py")
        with open(project.script, "w") as f:
            f.write(self.OLD_EXAMPLE)
        project.env["BROKEN"] = "1"
        project.write_hosts(["127.0.0.1:%d" % support.free_port()])
        completed = project.run("manager", *FAST)
        self.assertRan(completed, 2)
        lines = completed.output.strip().splitlines()
        self.assertEqual(len(lines), 1, completed.output)
        self.assertIn("make_tasks() raised KeyError: 'no such table'", lines[0])
        [log] = project.files("old_*.log")
        with open(log) as f:
            self.assertIn("Traceback", f.read())
        tested = project.run("test")
        self.assertRan(tested, 2)
        self.assertIn("oden: error: make_tasks() raised KeyError", tested.output)

    def test_test_mode_with_a_task_that_cannot_be_pickled_is_one_line_and_exit_2(self):
        project = self.project(library_code="""
            def make_tasks():
                return [1, lambda: 2]
            def calc(x):
                return x
        """)
        completed = project.run("test")
        self.assertRan(completed, 2)
        self.assertEqual(completed.output.strip().count("\n"), 0, completed.output)
        self.assertIn("task 1 cannot be pickled", completed.output)


class TailTest(support.OdenTestCase):
    """No task waits behind a busy or hung one while another host idles."""

    def test_tasks_queued_behind_a_hung_task_move_to_idle_hosts(self):
        project = self.project(library_code="""
            import time
            def make_tasks():
                return list(range(6))
            def calc(x):
                while x == 3:
                    time.sleep(0.1)          # hangs for good; no task_timeout
                time.sleep(0.2)
                return x
        """)
        workers = project.start_workers(3, "--slots", "1")
        project.write_hosts(workers)
        manager = Manager(project, "manager", *FAST)
        self.assertTrue(support.wait_for(lambda: len(results(project)) == 5, 30), manager.output())
        manager.process.send_signal(signal.SIGINT)
        code, output = manager.finish(self, 30)
        self.assertEqual(code, 130, output[-3000:])
        self.assertEqual(sorted(results(project)), [0, 1, 2, 4, 5])
        self.assertTrue(all(len(r) == 1 for r in results(project).values()))
        self.assertEqual(summary_counts(output), (5, 0, 1))


class SpawnTest(support.OdenTestCase):
    """Windows starts processes only by spawn: the workflow, a crash and a time-out with
    the slots started that way (ODEN_START_METHOD), on any machine."""

    def test_core_workflow_a_crash_and_a_time_out_under_spawn(self):
        project = self.project(library_code="""
            import time
            def make_tasks():
                return list(range(6))
            def calc(x):
                if x == 2:
                    os._exit(7)
                if x == 4:
                    time.sleep(30)
                return x * 10 if x else os.getppid()     # spawned by the worker, not a forkserver
        """)
        project.env["ODEN_START_METHOD"] = "spawn"
        worker = project.start_worker("--slots", "2")
        project.write_hosts([worker])
        completed = project.run("manager", "--task-timeout", "2", "--chunksize", "3", *FAST)
        self.assertRan(completed, 1)
        self.assertEqual({i: r[0]["result"] for i, r in results(project).items()},
                         {0: worker.process.pid, 1: 10, 3: 30, 5: 50})
        errors = {r["index"]: r["exception"] for r in error_records(project)}
        self.assertEqual(sorted(errors), [2, 4])
        self.assertIn("exit code 7", errors[2])
        self.assertIn("timed out after 2", errors[4])


class StartOverTest(support.OdenTestCase):
    def test_resume_after_a_new_run_finishes_that_run_not_an_older_one(self):
        project = self.project(library_code="""
            def make_tasks():
                return list(range(4))
            def calc(x):
                if os.path.exists("broken-%d" % x):     # the worker's folder: the test's switch
                    raise ValueError("task %d is broken now" % x)
                return x
        """)
        worker = project.start_worker("--slots", "1", "--threads")
        project.write_hosts([worker])
        self.assertRan(project.run("manager", *FAST))                   # every task fine
        open(project.path("broken-2"), "w").close()
        new = project.run("manager", "--yes", *FAST)                     # a new run: task 2 fails
        self.assertRan(new, 1)
        resumed = project.run("resume", *FAST)                           # still broken: runs it again
        self.assertRan(resumed, 1)
        self.assertIn("3 of 4 tasks have a saved success; 1 to run", resumed.output)
        os.remove(project.path("broken-2"))
        fixed = project.run("resume", *FAST)
        self.assertRan(fixed)
        summary = project.run("results", "--summary")
        self.assertIn("4 done, 0 errors", summary.output)
