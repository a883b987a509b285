"""Pleasant to use: progress line, summary table, status pages, results loader,
library mode, what calc prints, and the command line's help and errors.

Each class starts its workers once (setUpClass) and runs short jobs against
them; every process is reaped by Project, every wait is bounded.
"""
import concurrent.futures
import csv
import html.parser
import importlib.util
import io
import json
import os
import pickle
import re
import subprocess
import sys
import time
import unittest

import support

QUICK = support.FAST
class_project = support.class_project


def user_section(calc, count, status="status of <demo> & co"):
    """The user section of a job of `count` tasks (make_tasks) with `calc`."""
    return support.user_section("def make_tasks():\n    return list(range(%d))\n\n\n%s\n"
                                % (count, calc), status)


def run_on_terminal(project, *args, timeout=120):
    """Run a command on a pseudo-terminal wide enough for the progress line in full."""
    return support.run_on_terminal(project, *args, columns=200, timeout=timeout)


def summary_rows(output):
    """{first cell: [other cells]} of the summary table the manager prints at the end."""
    table = output[output.index("summary:"):].replace("\r\n", "\n").split("\n")[1:]
    rows = {}
    for line in table:
        cells = line.split()
        if not cells or re.match(r"\d\d:\d\d:\d\d$", cells[0]):
            break
        rows[cells[0]] = cells[1:]
    return rows


def import_oden(path):
    spec = importlib.util.spec_from_file_location("oden_under_test_%d" % id(path), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ progress and summary

SLOW_CALC = """
def calc(x):
    time.sleep(0.1)
    if x == 20:
        raise ValueError("twenty is refused")
    return x * 10
"""


class ProgressTest(support.OdenTestCase):
    @classmethod
    def setUpClass(cls):
        cls.project = class_project(cls, user_code=user_section(SLOW_CALC, 24))
        cls.workers = cls.project.start_workers(2, "--slots", "2")
        cls.project.write_hosts(cls.workers)

    def test_terminal_gets_one_redrawn_progress_line_and_a_summary_per_host(self):
        started = time.monotonic()
        code, output = run_on_terminal(self.project, "manager", "--name", "tty", *QUICK)
        seconds = time.monotonic() - started
        self.assertEqual(code, 1, output[-3000:])
        redraws = re.findall(r"\r(?!\n)([^\r\n]*)", output)
        progress = [line for line in redraws if "finished" in line]
        self.assertTrue(progress, "no \\r-redrawn progress line in:\n%r" % output[-3000:])
        self.assertLess(len(progress), seconds / 0.2 + 5, "redrawn more often than every 0.2 s")
        pattern = (r"\d+/24 finished \(\d+ done, \d+ failed\), \d+ in flight \| [\d.]+ tasks/s \| "
                   r"\d+:\d\d:\d\d elapsed \| ETA (\?|\d+:\d\d:\d\d) \| hosts \d up \d down")
        self.assertTrue(any(re.search(pattern, line) for line in progress), progress[-3:])
        self.assertTrue(any("hosts 2 up 0 down" in line for line in progress), progress[-3:])
        print("\nprogress line seen: %s" % progress[len(progress) // 2].rstrip(), file=sys.stderr)
        # a log line that arrives while the progress line is shown starts on a line of its own
        error_at = output.index("ERROR task 20 failed")
        self.assertIn(output[error_at - 10], "\r\n", "log line glued to the progress line: %r"
                      % output[error_at - 120:error_at + 20])
        rows = summary_rows(output)
        for worker in self.workers:
            self.assertIn(worker.address, rows, output[-2000:])
        self.assertEqual(sum(int(rows[w.address][0]) for w in self.workers), 23)
        self.assertEqual(rows["total"][:2], ["23", "1"])
        for worker in self.workers:
            self.assertRegex(rows[worker.address][2], r"^\d+\.\d{3}$")     # mean task seconds, about 0.1
        table = output[output.index("summary:"):].replace("\r\n", "\n").split("\n")[:len(rows) + 1]
        print("summary table seen:\n" + "\n".join(table), file=sys.stderr)

    def test_not_a_terminal_gets_plain_lines_and_verbose_logs_every_task(self):
        completed = self.project.run("manager", "--name", "plain", "-v", *QUICK)
        self.assertRan(completed, 1)
        self.assertNotIn("\r", completed.output)
        done_lines = re.findall(r"tasks \[([\d, ]+)\] done on 127\.0\.0\.1:\d+", completed.output)
        logged = sorted(int(i) for indices in done_lines for i in indices.split(","))
        self.assertEqual(logged, [i for i in range(24) if i != 20])
        self.assertIn("summary:", completed.output)
        self.assertEqual(summary_rows(completed.output)["total"][:2], ["23", "1"])

    def test_not_a_terminal_logs_progress_every_period(self):
        project = support.Project(self, library_code="""
            import time
            oden.PROGRESS_LOG_EVERY = 0.2          # 10 s by default: too long for a test

            def make_tasks():
                return list(range(10))

            def calc(x):
                time.sleep(0.1)
                return x
        """)
        project.write_hosts([project.start_worker("--slots", "1")])
        completed = project.run("manager", *QUICK)
        self.assertRan(completed)
        self.assertNotIn("\r", completed.output)
        self.assertRegex(completed.output, r"\d\d:\d\d:\d\d INFO progress: \d+/10 finished .* tasks/s .* ETA ")

    def test_quiet_prints_only_warnings_and_errors(self):
        completed = self.project.run("manager", "--name", "quiet", "-q", *QUICK)
        self.assertRan(completed, 1)
        log_lines = [line for line in completed.output.splitlines() if re.match(r"\d\d:\d\d:\d\d ", line)]
        self.assertTrue(log_lines)
        for line in log_lines:
            self.assertRegex(line, r"^\d\d:\d\d:\d\d (WARNING|ERROR) ")
        self.assertIn("ERROR task 20 failed", completed.output)
        self.assertNotIn("tasks/s", completed.output)
        self.assertNotIn("\r", completed.output)
        self.assertEqual(len(self.project.files("quiet*.done.pickle")), 23)


# ------------------------------------------------------------------ status pages and the status command

WAITING_CALC = """
def calc(x):
    deadline = time.monotonic() + 60
    while not os.path.exists("release") and time.monotonic() < deadline:
        time.sleep(0.05)
    return x
"""


class PageChecker(html.parser.HTMLParser):
    """Collects text, the links to other resources, and tags that do not balance."""
    VOID = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.unbalanced, self.links, self.text, self.refresh = [], [], [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links.extend(value for key, value in attrs.items() if key in ("src", "href") and value)
        if tag == "meta" and (attrs.get("http-equiv") or "").lower() == "refresh":
            self.refresh = True
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.unbalanced.append(tag)

    def handle_data(self, data):
        self.text.append(data)


get = support.get_typed


class StatusTest(support.OdenTestCase):
    @classmethod
    def setUpClass(cls):
        cls.project = class_project(cls, user_code=user_section(WAITING_CALC, 3))
        cls.worker = cls.project.start_worker("--slots", "2")

    def json_status(self):
        return json.loads(get(self.worker.url + "/status.json")[1])

    def test_status_routes_while_tasks_run(self):
        self.project.write_hosts([self.worker])
        manager = self.project.popen("manager", "--name", "busy", "--chunksize", "1", *QUICK)
        deadline = time.monotonic() + 60
        while self.json_status()["slots_busy"] < 2 and time.monotonic() < deadline:
            self.assertIsNone(manager.poll(), "the manager ended early")
            time.sleep(0.1)
        state = self.json_status()
        for field in ("state", "slots", "slots_busy", "slots_free", "running_task_ages", "done", "failed",
                      "uptime", "version", "python", "name"):
            self.assertIn(field, state)
        self.assertEqual((state["state"], state["slots"], state["slots_busy"], state["slots_free"]),
                         ("busy", 2, 2, 0))
        self.assertEqual(len(state["running_task_ages"]), 2)
        self.assertTrue(all(age >= 0 for age in state["running_task_ages"]))
        self.assertEqual(state["python"], "%d.%d.%d" % sys.version_info[:3])

        content_type, page = get(self.worker.url + "/")
        self.assertTrue(content_type.startswith("text/html"))
        checker = PageChecker()
        checker.feed(page)
        checker.close()
        self.assertEqual((checker.stack, checker.unbalanced), ([], []), page)
        self.assertEqual(checker.links, [], "the page must not load anything else")
        self.assertNotRegex(page, r"(?i)(src|href)\s*=|https?://")
        self.assertTrue(checker.refresh, "no meta refresh")
        text = " ".join(checker.text)
        self.assertIn("status of <demo> & co", text)              # show_status(), escaped in the HTML
        self.assertIn("&lt;demo&gt; &amp; co", page)
        self.assertEqual(len(re.findall(r"running for \d+\.\d s", text)), 2)
        for word in ("uptime", "version", state["version"], "python", state["python"], "slots_free", "done",
                     "failed"):
            self.assertIn(word, text)

        content_type, line = get(self.worker.url + "/status")
        self.assertTrue(content_type.startswith("text/plain"))
        self.assertEqual(len(line.strip().splitlines()), 1, line)
        self.assertIn("2 of 2 slots busy", line)

        with open(self.project.path("release"), "w"):
            pass
        self.assertEqual(manager.wait(60), 0)
        self.assertEqual(self.json_status()["done"] - state["done"], 3)
        os.remove(self.project.path("release"))

    def test_status_command_shows_every_host_and_why_one_is_down(self):
        refused = "127.0.0.1:%d" % support.free_port()
        self.project.write_hosts([self.worker, refused])
        completed = self.project.run("status", "--timeout", "5")
        self.assertRan(completed, 1)
        lines = completed.output.splitlines()
        self.assertRegex(lines[0], r"^host +reachable +state +slots busy")
        up = [line for line in lines if line.startswith(self.worker.address)]
        down = [line for line in lines if line.startswith(refused)]
        self.assertEqual(len(up), 1, completed.output)
        self.assertEqual(len(down), 1, completed.output)
        self.assertRegex(up[0], r"^\S+ +yes +(idle|busy) +\d/2 +\d+ +\d+ +(\d+\.\d\d|-)")
        self.assertRegex(down[0], r"^\S+ +no\b.*connection refused")
        self.assertNotIn("Traceback", completed.output)


# ------------------------------------------------------------------ results: loader and command

FAILING_CALC = """
def calc(x):
    print("calc got", x)
    if x % 5 == 1:
        raise ValueError("one mod five")
    if x == 7:
        raise KeyError("seven")
    return {"square": x * x}
"""
RESULT_TASKS = 12
FAILED = {1: "ValueError: one mod five", 6: "ValueError: one mod five", 11: "ValueError: one mod five",
          7: "KeyError: 'seven'"}


class ResultsTest(support.OdenTestCase):
    """One `local` run of a job (the user-section way) with failures, plus junk files beside its results."""

    @classmethod
    def setUpClass(cls):
        cls.project = class_project(cls, user_code=user_section(FAILING_CALC, RESULT_TASKS))
        completed = cls.project.run("local", "--workers", "1", "--slots", "2", *QUICK)
        assert completed.returncode == 1, completed.output
        cls.run_output = completed.output
        with open(cls.project.path("t1_20200101-000000_3.done.pickle.tmp1a2b3c4d"), "wb") as f:
            f.write(pickle.dumps({"task": 3})[:5])                     # an interrupted write
        with open(cls.project.path("t1_20200101-000000_4.done.pickle"), "wb") as f:
            f.write(b"\x80\x04garbage, not a pickle")                 # a damaged result file

    def expected_results(self):
        return {x: {"square": x * x} for x in range(RESULT_TASKS) if x not in FAILED}

    def test_load_results_round_trip_with_errors_skipping_bad_files(self):
        oden = import_oden(self.project.path("oden.py"))
        with self.assertLogs("oden", "WARNING") as logged:
            pairs = list(oden.load_results("t", folder=self.project.folder))
        self.assertEqual(len(logged.output), 1, logged.output)
        self.assertIn("t1_20200101-000000_4.done.pickle", logged.output[0])
        self.assertEqual(len(pairs), len(self.expected_results()))
        self.assertEqual(dict(pairs), self.expected_results())
        with self.assertLogs("oden", "WARNING"):
            both = list(oden.load_results("t", folder=self.project.folder, errors=True))
        errors = [(task, record) for task, record in both[len(pairs):]]
        self.assertEqual(both[:len(pairs)], pairs)
        self.assertEqual({task: record["exception"] for task, record in errors}, FAILED)
        for task, record in errors:
            self.assertEqual(record["task"], task)
            self.assertIn("Traceback", record["error"])
            self.assertIn("calc got %d" % task, record["output"])
        self.assertEqual(list(oden.load_results("other", folder=self.project.folder)), [])

    def results(self, *args):
        completed = self.project.run("results", *args)
        self.assertRan(completed)
        self.assertNotRegex(completed.output, r"(?m)^Traceback")     # (--summary shows calc's, indented)
        return completed

    def test_results_command_plain_json_and_csv(self):
        plain = self.results()
        self.assertIn("skipped unreadable", plain.output)
        self.assertIn("t1_20200101-000000_4.done.pickle", plain.output)
        self.assertNotIn(".tmp1a2b3c4d", plain.output)
        for task, result in self.expected_results().items():
            self.assertIn("%r -> %r" % (task, result), plain.output)
        self.assertNotIn("ERROR", plain.output)
        self.assertIn("1 -> ERROR ValueError: one mod five", self.results("--errors").output)

        completed = subprocess.run([sys.executable, self.project.script, "results", "--json", "--errors"],
                                   cwd=self.project.folder, env=self.project.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(completed.returncode, 0, completed.stderr)
        records = json.loads(completed.stdout.decode())
        self.assertEqual({r["task"]: r["result"] for r in records if r["status"] == "done"},
                         self.expected_results())
        self.assertEqual({r["task"]: r["exception"] for r in records if r["status"] == "error"}, FAILED)
        self.assertTrue(all(r["host"].startswith("127.0.0.1:") for r in records))

        completed = subprocess.run([sys.executable, self.project.script, "results", "--csv"],
                                   cwd=self.project.folder, env=self.project.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, timeout=60)
        rows = list(csv.DictReader(io.StringIO(completed.stdout.decode())))
        self.assertEqual({int(row["task"]): row["result"] for row in rows},
                         {task: repr(result) for task, result in self.expected_results().items()})
        self.assertTrue(all(row["status"] == "done" for row in rows))

    def test_results_summary_groups_failures_with_one_traceback_each(self):
        output = self.results("--summary").output
        self.assertIn("run 't': %d done, %d errors" % (RESULT_TASKS - len(FAILED), len(FAILED)), output)
        self.assertRegex(output, r"3 x ValueError: one mod five\n  e\.g\. task (1|6|11)")
        self.assertRegex(output, r"1 x KeyError: 'seven'\n  e\.g\. task 7")
        self.assertEqual(output.count("Traceback (most recent call last)"), 2)

    def test_results_command_says_when_there_is_nothing(self):
        completed = self.project.run("results", "--name", "nothing")
        self.assertEqual(completed.returncode, 0)
        self.assertIn("no result files of run 'nothing'", completed.output)

    def test_a_failure_log_line_shows_what_calc_printed(self):
        self.assertRegex(self.run_output, r"ERROR task 7 failed on 127\.0\.0\.1:\d+: KeyError: 'seven'\n"
                                          r"Traceback[^\0]*--- what it printed ---\ncalc got 7\n")


# ------------------------------------------------------------------ what calc prints

PRINTING_CALC = """
def calc(x):
    for line in range(8):
        print("task%d line%d" % (x, line))
        sys.stderr.write("task%d err%d\\n" % (x, line))
        time.sleep(0.02)
    if x == 3:
        raise RuntimeError("three fails after printing")
    return x
"""


class OutputTest(support.OdenTestCase):
    def check_outputs(self, *worker_args):
        project = self.project(user_code=user_section(PRINTING_CALC, 6))
        project.env.pop("PYTHONUNBUFFERED", None)          # as on a user's machine: stdout to a file is buffered
        worker = project.start_worker("--slots", "2", *worker_args)
        project.write_hosts([worker])
        completed = project.run("manager", "--chunksize", "1", *QUICK)
        self.assertRan(completed, 1)
        records = project.records() + project.records(".error.pickle")
        self.assertEqual(sorted(r["task"] for r in records), list(range(6)))
        for record in records:
            x = record["task"]
            expected = "".join("task%d line%d\n" % (x, i) for i in range(8))
            printed = record["output"]
            self.assertEqual(set(re.findall(r"task(\d+)", printed)), {str(x)}, printed)
            self.assertEqual("".join(l + "\n" for l in printed.splitlines() if "line" in l), expected)
            self.assertEqual(printed.count("err"), 8)
        self.assertRegex(completed.output, r"RuntimeError: three fails after printing\n--- what it printed ---\n"
                                           r"task3 line0\n")
        self.assertIn("task5 line7", worker.output())                 # still reaches the worker's console
        return records

    def test_process_mode_keeps_each_tasks_output(self):
        self.check_outputs()

    def test_thread_mode_keeps_concurrent_outputs_apart(self):
        records = self.check_outputs("--threads")
        spans = sorted((r["started"], r["ended"]) for r in records)
        overlapping = any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))
        self.assertTrue(overlapping, "no two tasks ran at once, so this test proved nothing: %s" % spans)


# ------------------------------------------------------------------ library mode

LIBRARY_JOB = """
import time

def make_tasks():
    return ["a", "bb", "ccc", "dddd", "eeeee"]

def calc(word):
    return len(word)
"""


class LibraryTest(support.OdenTestCase):
    def test_every_mode_works_from_a_job_script(self):
        project = self.project(library_code=LIBRARY_JOB, name="lib")
        expected = {"a": 1, "bb": 2, "ccc": 3, "dddd": 4, "eeeee": 5}

        tested = project.run("test")
        self.assertRan(tested)
        self.assertIn("task 2 'ccc': 3", tested.output)
        self.assertIn("5 tasks: 5 ok, 0 failed", tested.output)

        worker = project.start_worker("--slots", "2")
        project.write_hosts([worker])
        self.assertRan(project.run("manager", *QUICK))
        self.assertEqual({r["task"]: r["result"] for r in project.records()}, expected)

        removed = [p for p in project.files("lib*.done.pickle") if p.endswith(("_1.done.pickle", "_3.done.pickle"))]
        self.assertEqual(len(removed), 2)
        for path in removed:
            os.remove(path)
        resumed = project.run("resume", *QUICK)
        self.assertRan(resumed)
        self.assertIn("3 of 5 tasks have a saved success; 2 to run", resumed.output)
        self.assertEqual({r["task"]: r["result"] for r in project.records()}, expected)

        self.assertRan(project.run("local", "--workers", "1", "--slots", "1", "--name", "lib_local", *QUICK))
        self.assertEqual(len(project.files("lib_local1_*.done.pickle")), 5)

        shown = project.run("results", "--json")
        self.assertRan(shown)
        self.assertEqual({r["task"]: r["result"] for r in json.loads(shown.output)}, expected)

        status = project.run("status")
        self.assertRan(status)
        self.assertIn(worker.address, status.output)

    def run_script(self, source):
        """Run `source` as a script beside a project's oden.py with the `test` command; return its output."""
        project = self.project(library_code=LIBRARY_JOB)
        with open(project.path("script.py"), "w") as f:
            f.write("import sys, oden\nsys.exit(%s)\n" % source)
        completed = subprocess.run([sys.executable, "script.py", "test"], cwd=project.folder, env=project.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        output = completed.stdout.decode()
        self.assertEqual(completed.returncode, 2, output)
        return output

    def test_unknown_keyword_is_named(self):
        output = self.run_script("oden.main(make_task=list, calc=len)")
        self.assertIn("oden: error: oden.main() got unknown settings make_task;", output)
        self.assertIn("make_tasks", output)
        self.assertNotIn("Traceback", output)

    def test_a_library_job_must_bring_its_own_functions(self):
        """The sort example's make_tasks and calc are never mixed into a library job."""
        output = self.run_script("oden.main(calc=len)")
        self.assertIn("oden.main() needs make_tasks", output)
        self.assertNotIn("Traceback", output)


# ------------------------------------------------------------------ command line

MODES = ("worker", "manager", "resume", "local", "test", "status", "results", "init")


class CommandLineTest(support.OdenTestCase):
    @classmethod
    def setUpClass(cls):
        cls.project = class_project(cls)
        with open(cls.project.path("garbage.txt"), "wb") as f:
            f.write(bytes(range(256)) * 4)
        with open(cls.project.path("long.txt"), "w", encoding="utf-8") as f:
            f.write("\u00e9\u00df" * 5000 + "\n")                        # text, but not host names

    def run_all(self, argvs):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda argv: self.project.run(*argv, timeout=60), argvs))

    def test_every_mode_has_help_and_there_is_a_version(self):
        for mode, completed in zip(MODES, self.run_all([(mode, "--help") for mode in MODES])):
            self.assertRan(completed)
            self.assertIn("usage: oden.py %s" % mode, completed.output)
        for completed in self.run_all([("--help",), ("--version",)]):
            self.assertRan(completed)
        self.assertEqual(completed.output.strip(), "oden 1.0.0")

    def test_bad_input_is_one_clear_line_and_exit_code_2(self):
        cases = [
            (("manager", "--timeout", "abc"), "'abc' is not a number"),
            (("worker", "--port", "70000"), "port must be 0-65535"),
            (("worker", "--slots", "0"), "must be 1 or more"),
            (("local", "--workers", "many"), "'many' is not a whole number"),
            (("manager", "--hosts", "missing.txt"), "cannot read hosts file missing.txt"),
            (("status", "--hosts", "garbage.txt"), "garbage.txt is not text"),
            (("manager", "--hosts", "garbage.txt"), "garbage.txt is not text"),
            (("manager", "--hosts", "long.txt"), "long.txt line 1: "),
            (("frobnicate",), "invalid choice: 'frobnicate'"),
            ((), "COMMAND"),
            (("results", "--json", "--csv"), "not allowed with"),
            (("manager", "--folder", "no/such/folder", "--yes"), "no/such/folder"),
            (("results", "--folder", "no/such/folder"), "no/such/folder"),
            (("worker", "--certfile", "missing.pem"), "missing.pem"),
            (("manager", "--cafile", "missing.pem", "--hosts", "hosts.txt"), "missing.pem"),
        ]
        with open(self.project.path("hosts.txt"), "w") as f:
            f.write("127.0.0.1:%d\n" % support.free_port())
        for (argv, expected), completed in zip(cases, self.run_all([argv for argv, _ in cases])):
            with self.subTest(argv=argv):
                self.assertEqual(completed.returncode, 2, completed.output)
                self.assertNotIn("Traceback", completed.output)
                lines = [line for line in completed.output.splitlines() if line.strip()]
                self.assertEqual(len(lines), 1, completed.output)
                self.assertTrue(lines[0].startswith("oden: error: "), lines[0])
                self.assertIn(expected, lines[0])
                self.assertLess(len(lines[0]), 400)


if __name__ == "__main__":
    unittest.main()
