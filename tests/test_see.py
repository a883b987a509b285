"""Seeing a run (issue 13): the manager's live page and its report, what `status` says about a
host, the progress line on narrow terminals, results that pick the right run, and result
classes of the user's script loaded anywhere.

A user's session each: real workers on loopback, the manager run as a user runs it, its page
fetched while tasks are held back by a file the test creates, its files read at the end.
"""
import csv
import html.parser
import http.server
import importlib.util
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest
import urllib.error
import urllib.request

import support

FAST = support.FAST

# Tasks are "secret-N": neither a task nor a result may ever appear on the page.  The last two
# tasks wait for the file "release" (nothing queues behind them); task x fails when x % 7 == 3.
HELD_JOB = """
import os, time

def make_tasks():
    return ["secret-%d" % x for x in range(int(os.environ.get("TASKS", "16")))]

def calc(task):
    x = int(task.split("-")[1])
    deadline = time.monotonic() + 120
    while x in (14, 15) and not os.path.exists("release") and time.monotonic() < deadline:
        time.sleep(0.05)
    if x % 7 == 3:
        raise ValueError("seven-three %d" % (x % 2))
    return "result-of-" + task
"""
HELD, FAILING = {14, 15}, {3, 10}
TASKS = 16


class PageChecker(html.parser.HTMLParser):
    """Text, references to anything else, and tags that do not balance, of an HTML page."""
    VOID = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self, page):
        super().__init__()
        self.stack, self.unbalanced, self.links, self.text, self.refresh = [], [], [], [], False
        self.metas = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links.extend(value for key, value in attrs.items() if key in ("src", "href") and value)
        if tag == "meta":
            self.metas.append(attrs)
            self.refresh = self.refresh or (attrs.get("http-equiv") or "").lower() == "refresh"
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.unbalanced.append(tag)

    def handle_data(self, data):
        self.text.append(data)

    @property
    def words(self):
        return " ".join(" ".join(self.text).split())


def fetch(url, host=None, method="GET"):
    """(status, content type, body text) of one request; `host` overrides the Host header."""
    request = urllib.request.Request(url, method=method, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("Content-Type"), response.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode("utf-8", "replace")


def files_by_host(project, suffix):
    """{host number: files of that host} for the project's run files with `suffix`."""
    found = {}
    for path in project.files(project.name + "*" + suffix):
        number = int(re.match(re.escape(project.name) + r"(\d+)_", os.path.basename(path)).group(1))
        found[number] = found.get(number, 0) + 1
    return found


def report_state(path):
    """The run's figures embedded in a report, and the report's text."""
    with open(path, encoding="utf-8") as f:
        page = f.read()
    match = re.search(r'<script type="application/json" id="oden-status">(.*?)</script>', page, re.S)
    return json.loads(match.group(1)), page


class HeldRun:
    """A manager run of HELD_JOB in the background; tasks 14 and 15 run until release()."""

    def __init__(self, test, *args, workers=2, slots=2):
        self.project = support.Project(test, library_code=HELD_JOB)
        self.workers = self.project.start_workers(workers, "--slots", str(slots), "--threads")
        self.project.write_hosts(self.workers)
        self.output = self.project.path("manager.out")
        with open(self.output, "wb") as out:
            self.manager = self.project.popen("manager", "--chunksize", "1", *(FAST + args), stdout=out,
                                              stderr=subprocess.STDOUT)

    def url(self):
        return support.wait_for_text(self.output, r"dashboard: (http://127\.0\.0\.1:\d+/)",
                                     process=self.manager).group(1)

    def state(self, url):
        status, content_type, body = fetch(url + "status.json")
        assert status == 200 and content_type == "application/json", (status, body)
        return json.loads(body)

    def wait_held(self, url):
        """The page's figures once every task but the held ones has finished."""
        state = support.wait_for(lambda: (lambda s: s if s["done"] + s["failed"] == TASKS - len(HELD)
                                          and s["in_flight"] == len(HELD) else None)(self.state(url)))
        assert state, "the held state was never reached: %s" % self.state(url)
        return state

    def release(self):
        with open(self.project.path("release"), "w"):
            pass
        code = self.manager.wait(120)
        with open(self.output, encoding="utf-8", errors="replace") as f:
            return code, f.read()


# ------------------------------------------------------------------ 1, 2: the live page and the report

class LivePageTest(support.OdenTestCase):
    def test_page_and_json_during_a_run_then_a_report_that_equals_the_files(self):
        held = HeldRun(self)
        project = held.project
        url = held.url()
        state = held.wait_held(url)

        # The figures are the run's: those of the files on disk, with the held tasks in flight.
        self.assertEqual((state["total"], state["in_flight"], state["left"], state["state"]),
                         (TASKS, 2, 0, "running"))
        self.assertEqual(state["done"], len(project.files("t*.done.pickle")))
        self.assertEqual(state["failed"], len(project.files("t*.error.pickle")))
        self.assertEqual(state["failed"], len(FAILING))
        self.assertEqual([h["host"] for h in state["hosts"]], [w.address for w in held.workers])
        for number, host in enumerate(state["hosts"], 1):
            self.assertEqual((host["state"], host["slots"]), ("up", 2))
            self.assertEqual(host["done"], files_by_host(project, ".done.pickle").get(number, 0))
        self.assertEqual(sum(h["in_flight"] for h in state["hosts"]), 2)
        self.assertEqual(sorted((f["exception"], f["count"], f["tasks"]) for f in state["failures"]),
                         [("ValueError: seven-three 0", 1, [10]), ("ValueError: seven-three 1", 1, [3])])
        self.assertTrue(all("Traceback" in f["traceback"] for f in state["failures"]))
        self.assertEqual(sorted(s["task"] for s in state["slowest"]), sorted(HELD))
        self.assertTrue(all(s["seconds"] > 0 and s["host"] in [w.address for w in held.workers]
                            for s in state["slowest"]))
        held_hosts = [h for h in state["hosts"] if h["in_flight"]]
        self.assertTrue(all(h["oldest_running_seconds"] > 0 for h in held_hosts), held_hosts)
        self.assertTrue(state["rate_per_second"] is None or state["rate_per_second"] > 0)  # None in its first second
        self.assertGreaterEqual(len(state["timeline"]), 1)

        status, content_type, page = fetch(url)
        self.assertEqual((status, content_type), (200, "text/html; charset=utf-8"))
        checker = PageChecker(page)
        self.assertEqual((checker.stack, checker.unbalanced), ([], []))
        self.assertIn({"name": "viewport", "content": "width=device-width, initial-scale=1"}, checker.metas)
        self.assertTrue(checker.refresh, "no meta refresh for browsers without JavaScript")
        self.assertEqual(sorted(checker.links), sorted(w.url + "/" for w in held.workers))   # each worker's page
        self.assertIn("<svg", page)
        words = checker.words
        for text in ("%d of %d tasks finished" % (TASKS - 2, TASKS), "ValueError: seven-three 1", "Running longest",
                     "in flight", "tasks/s", "ETA", "Hosts", "Failures: 2"):
            self.assertIn(text, words)
        for worker in held.workers:
            self.assertIn(worker.address, words)
        self.assertNotIn("secret-", page + json.dumps(state))                # never a task ...
        self.assertNotIn("result-of", page + json.dumps(state))              # ... nor a result

        # Read-only, and only for loopback names (a web page elsewhere cannot read it by DNS rebinding).
        self.assertEqual(fetch(url + "nothing")[0], 404)
        self.assertEqual(fetch(url, method="POST")[0], 501)
        self.assertEqual(fetch(url, host="evil.example:80")[0], 403)
        self.assertEqual(fetch(url, host="localhost")[0], 200)

        code, output = held.release()
        self.assertEqual(code, 1, output[-3000:])
        stamp = re.search(r"_(\d{8}-\d{6}(?:-\d+)?)\.log", " ".join(os.listdir(project.folder))).group(1)
        report = project.path("t_%s.html" % stamp)
        self.assertIn("report: ./t_%s.html" % stamp, output.splitlines()[-2] + output.splitlines()[-3])
        with open(project.path("t_%s.log" % stamp)) as f:
            self.assertIn("dashboard: %s" % url, f.read())
        with self.assertRaises(OSError):                                      # the page ends with the run
            urllib.request.urlopen(url, timeout=5)

        final, page = report_state(report)
        self.assertEqual((final["state"], final["total"], final["in_flight"], final["left"]),
                         ("finished", TASKS, 0, 0))
        self.assertEqual(final["done"], len(project.files("t*.done.pickle")))
        self.assertEqual(final["failed"], len(project.files("t*.error.pickle")))
        self.assertEqual((final["done"], final["failed"]), (TASKS - len(FAILING), len(FAILING)))
        for number, host in enumerate(final["hosts"], 1):
            self.assertEqual(host["done"], files_by_host(project, ".done.pickle").get(number, 0))
            self.assertEqual(host["failed"], files_by_host(project, ".error.pickle").get(number, 0))
        self.assertEqual(sorted((f["exception"], f["tasks"]) for f in final["failures"]),
                         [("ValueError: seven-three 0", [10]), ("ValueError: seven-three 1", [3])])
        self.assertEqual(final["task_seconds"]["count"], TASKS)
        checker = PageChecker(page)
        self.assertEqual((checker.stack, checker.unbalanced, checker.links), ([], [], []))
        self.assertNotRegex(page, r"(?i)https?://|\bsrc\s*=|\bhref\s*=|@import|url\(")   # opens offline
        self.assertFalse(checker.refresh)
        self.assertNotIn("secret-", page)
        words = checker.words
        for text in ("%d of %d tasks finished" % (TASKS, TASKS), "How long tasks took", "Hosts", "total",
                     "ValueError: seven-three 0", "ValueError: seven-three 1", "mean tasks/s"):
            self.assertIn(text, words)
        for worker in held.workers:
            self.assertIn(worker.address, words)
        self.assertEqual(page.count("<svg"), 2)                               # over time, and the histogram
        print("\nlive page figures: %s" % {k: state[k] for k in ("done", "failed", "in_flight", "left")},
              file=sys.stderr)

    def test_where_the_page_listens_and_switching_it_off(self):
        project = self.project(library_code="""
            def make_tasks():
                return list(range(3))
            def calc(x):
                return x
        """)
        project.write_hosts([project.start_worker("--slots", "1", "--threads")])
        port = support.free_port()
        chosen = project.run("manager", "--dashboard", "127.0.0.1:%d" % port, *FAST)
        self.assertRan(chosen)
        self.assertIn("dashboard: http://127.0.0.1:%d/" % port, chosen.output)
        off = project.run("manager", "--yes", "--no-dashboard", *FAST)
        self.assertRan(off)
        self.assertNotIn("dashboard", off.output)
        self.assertEqual(len(project.files("t_*.html")), 2)                   # a report all the same
        busy, close = support.silent_server()                                  # a port in use
        self.addCleanup(close)
        taken = project.run("manager", "--yes", "--dashboard", "127.0.0.1:%d" % busy, *FAST)
        self.assertRan(taken, 2)
        self.assertRegex(taken.output.strip().splitlines()[-1], r"^oden: error: cannot serve the dashboard on 127\.0\.0\.1:%d "
                                               r"\(.*\): pick another --dashboard HOST:PORT, or pass "
                                               r"--no-dashboard$" % busy)
        bad = project.run("manager", "--dashboard", "nowhere:port")
        self.assertRan(bad, 2)
        self.assertIn("is not HOST:PORT", bad.output)


# ------------------------------------------------------------------ a real browser

def find_browser():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@unittest.skipUnless(find_browser(), "no headless Chromium or Chrome here (.ci/run installs the 'chromium' "
                                     "package when it runs as root): no screenshots")
class BrowserTest(support.OdenTestCase):
    """Screenshots of the live page during a run and of the report, at a desktop's and a phone's
    size.  They go to $ODEN_SCREENSHOTS when set (to look at them), else to the test's folder."""
    SIZES = ((1280, 800), (390, 844))

    def screenshot(self, url, name, width, height, folder):
        path = os.path.join(folder, "%s-%dx%d.png" % (name, width, height))
        profile = tempfile.mkdtemp(prefix="oden-browser-")
        self.addCleanup(shutil.rmtree, profile, True)
        command = [find_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   "--no-first-run", "--user-data-dir=" + profile, "--window-size=%d,%d" % (width, height),
                   "--screenshot=" + path, url]
        completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
                                   start_new_session=True)
        self.assertTrue(os.path.exists(path), completed.stdout.decode("utf-8", "replace")[-2000:])
        self.assertEqual(png_size(path), (width, height))
        self.assertGreater(os.path.getsize(path), 10000, "an empty page?")
        if os.environ.get("ODEN_SCREENSHOTS"):     # else the folder goes with the test
            print("screenshot: %s" % path, file=sys.stderr)
        return path

    def test_screenshots_of_the_live_page_and_of_the_report(self):
        held = HeldRun(self, workers=3)
        folder = os.environ.get("ODEN_SCREENSHOTS") or held.project.path("screenshots")
        os.makedirs(folder, exist_ok=True)
        url = held.url()
        held.wait_held(url)
        for width, height in self.SIZES:
            self.screenshot(url, "live", width, height, folder)
        code, output = held.release()
        self.assertEqual(code, 1, output[-3000:])
        [report] = held.project.files("t_*.html")
        for width, height in self.SIZES:
            self.screenshot("file://" + report, "report", width, height, folder)


# ------------------------------------------------------------------ 3: status, and the worker's own page

WAITING_JOB = """
import os, time

def make_tasks():
    return [1]

def calc(x):
    deadline = time.monotonic() + 120
    while not os.path.exists("release") and time.monotonic() < deadline:
        time.sleep(0.05)
    return x
"""


class NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_error(404)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def not_a_worker(test):
    """An HTTP server on loopback that is not an oden worker (404 for everything): its address."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join(10)

    test.addCleanup(stop)
    return "127.0.0.1:%d" % server.server_address[1]


class StatusTest(support.OdenTestCase):
    def test_status_says_why_a_host_would_not_take_our_work_and_how_old_its_task_is(self):
        project = self.project(library_code=WAITING_JOB)
        ours = project.start_worker("--slots", "2", "--threads")
        keyless = self.project(library_code=WAITING_JOB, key=False).start_worker("--threads", "--insecure")
        wrong = self.project(library_code=WAITING_JOB).start_worker("--threads")          # its own key
        other = self.project(library_code=WAITING_JOB, name="other")                       # another job ...
        other.env["ODEN_KEY"] = project.env["ODEN_KEY"]                                    # ... with our key
        other = other.start_worker("--threads")
        changed = self.project(library_code=WAITING_JOB + "\n# changed\n")               # same name, other code
        changed.env["ODEN_KEY"] = project.env["ODEN_KEY"]
        changed = changed.start_worker("--threads", "--no-push")          # the manager would push
        stranger, nobody = not_a_worker(self), "127.0.0.1:%d" % support.free_port()
        project.write_hosts([ours, keyless, wrong, other, changed, stranger, nobody])

        manager = project.popen("manager", *FAST)          # one task, held: "busy 1/2" with an age
        self.addCleanup(lambda: open(project.path("release"), "w").close())
        self.assertTrue(support.wait_for(lambda: max(json.loads(fetch(ours.url + "/status.json")[2])
                                                     ["running_task_ages"] or [0]) >= 0.2))
        completed = project.run("status", "--timeout", "5")
        self.assertRan(completed, 1)
        rows = {line.split()[0]: line for line in completed.output.splitlines()[1:]}
        self.assertRegex(completed.output.splitlines()[0],
                         r"^host +reachable +state +slots busy +done +failed +load +oldest task +usable$")
        self.assertRegex(rows[ours.address], r"^\S+ +yes +busy +1/2 +\d+ +\d+ +(\d+\.\d\d|-) +"
                                             r"(\d+ ms|\d+\.\d s|\d+ s) +yes$")
        age = re.search(r" (\d+(?:\.\d)?) (ms|s) +yes$", rows[ours.address])
        self.assertGreaterEqual(float(age.group(1)) / (1000 if age.group(2) == "ms" else 1), 0.2)
        expected = {keyless.address: "no: no key there: copy oden.key from this PC",
                    wrong.address: "no: wrong key: copy oden.key from this PC to it",
                    other.address: "no: another project's job ('other')",
                    changed.address: "no: different code",
                    stranger: "no: not an oden worker (HTTP 404",
                    nobody: "no: connection refused"}
        for address, text in expected.items():
            self.assertIn(text, rows[address])
            self.assertRegex(rows[address], r"^\S+ +%s\b" % ("no" if address == nobody else "yes"))
        self.assertNotIn("Traceback", completed.output)
        print("\n" + completed.output, file=sys.stderr)

        # The key we lack: a project without a key asking a worker that has one.
        keyless_project = self.project(library_code=WAITING_JOB, key=False)
        keyless_project.write_hosts([ours])
        lacking = keyless_project.run("status")
        self.assertRan(lacking, 1)
        self.assertIn("no: it has a key and we have none: put its oden.key next to job.py", lacking.output)

        # The worker's own page: its host:port in the title, labels with units, the keys for scripts.
        status, _, page = fetch(ours.url + "/")
        self.assertEqual(status, 200)
        title = re.search(r"<title>(.*?)</title>", page).group(1)
        self.assertRegex(title, r"^oden worker \S+:%d: busy$" % ours.port)
        checker = PageChecker(page)
        words = checker.words
        for label in ("slots busy 1 slots_busy", "slots in all 2 slots", "batches waiting for a slot",
                      "calc runs in threads", "up for", "load average over 1, 5, 15 min", "running for"):
            self.assertIn(label, words)
        self.assertRegex(words, r"up for (\d+(\.\d+)? (ms|s)|\d+ min \d\d s) uptime")
        line = fetch(ours.url + "/status")[2]
        self.assertRegex(line, r", oldest task running [\d.]+ (ms|s), up [\d.]+ (ms|s|min)")
        with open(project.path("release"), "w"):
            pass
        self.assertEqual(manager.wait(60), 0)


# ------------------------------------------------------------------ 4: the progress line

PROGRESS_JOB = """
import os, time
oden.PROGRESS_LOG_EVERY = 1.5        # 10 s by default: too long for a test

def make_tasks():
    return list(range(int(os.environ.get("TASKS", "60"))))

def calc(x):
    time.sleep(0.1)
    return x
"""


class ProgressLineTest(support.OdenTestCase):
    @classmethod
    def setUpClass(cls):
        cls.project = support.class_project(cls, library_code=PROGRESS_JOB)
        cls.project.write_hosts(cls.project.start_workers(2, "--slots", "2", "--threads"))

    def redraws(self, columns):
        code, output = support.run_on_terminal(self.project, "manager", "--yes", *FAST, columns=columns)
        self.assertEqual(code, 0, output[-3000:])
        lines = [line for line in re.findall(r"\r(?!\n)([^\r\n]*)", output) if "/60" in line]
        self.assertTrue(lines, output[-3000:])
        return lines

    def test_the_line_fits_the_terminal(self):
        for columns in (200, 80, 40, 20):
            with self.subTest(columns=columns):
                lines = self.redraws(columns)
                self.assertLessEqual(max(len(line) for line in lines), columns - 1, lines[-3:])
                if columns == 200:
                    self.assertTrue(any(" finished (" in line and "hosts 2 up 0 down" in line for line in lines))
                if columns == 80:
                    self.assertTrue(any(re.search(r"ETA (\d+:\d\d:\d\d|\?)", line) for line in lines), lines)
                    self.assertTrue(any(re.search(r"[\d.]+/s", line) for line in lines), lines)
                print("%d columns: %r" % (columns, lines[len(lines) // 2].rstrip()), file=sys.stderr)

    def test_the_first_progress_log_line_has_a_rate(self):
        self.project.env["TASKS"] = "120"                   # 3 s on 4 slots: a log line at 1.5 s
        self.addCleanup(self.project.env.pop, "TASKS")
        completed = self.project.run("manager", "--yes", *FAST)
        self.assertRan(completed)
        first = re.search(r"INFO progress: (.*)", completed.output)
        self.assertTrue(first, completed.output[-3000:])
        rate = re.search(r"\| ([\d.]+) tasks/s \|.* ETA (\d+:\d\d:\d\d)", first.group(1))
        self.assertTrue(rate, first.group(0))
        self.assertGreater(float(rate.group(1)), 5, first.group(0))         # 4 slots x 10 tasks/s


# ------------------------------------------------------------------ 5: results pick the run

PI_JOB = """
import os

def make_tasks():
    return list(range(40))

def calc(x):
    if x % 10 == 3 and not os.path.exists("fixed"):    # the file the user's fix stands for
        raise ValueError("three is not fixed yet")
    if x == 39:
        return "h\\u00e9llo " + "x" * 5000
    return x * x
"""


def results_in(project, *args, env=None):
    completed = subprocess.run([sys.executable, project.script, "results"] + list(args), cwd=project.folder,
                               env=dict(project.env, **(env or {})), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=60)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout, completed.stderr.decode("utf-8", "replace")


class ResultsTest(support.OdenTestCase):
    def setUp(self):
        self.project = self.project(library_code=PI_JOB, name="pi")
        self.project.write_hosts(self.project.start_workers(2, "--slots", "2", "--threads"))

    def oden_module(self):
        spec = importlib.util.spec_from_file_location("oden_see_%s" % os.path.basename(self.project.folder),
                                                      self.project.path("oden.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def fix(self):
        with open(self.project.path("fixed"), "w"):
            pass

    def reverse_mtimes(self):
        """Directory (mtime) order is the reverse of task order: output in task order proves sorting."""
        paths = sorted(self.project.files("pi*.pickle"),
                       key=lambda p: int(re.search(r"_(\d+)\.\w+\.pickle$", p).group(1)))
        for position, path in enumerate(paths):
            os.utime(path, (2000000000 - position, 2000000000 - position))

    def test_three_runs_count_once_and_one_run_can_be_picked(self):
        self.fix()
        self.assertRan(self.project.run("manager", *FAST))
        for _ in range(2):
            self.assertRan(self.project.run("manager", "--yes", *FAST))
        self.reverse_mtimes()
        stamps = sorted({re.search(r"_(\d{8}-\d{6}(?:-\d+)?)_", p).group(1) for p in self.project.files("pi*.pickle")})
        self.assertEqual(len(stamps), 3)

        summary = results_in(self.project, "--summary")[0].decode()
        self.assertIn("run 'pi': 40 done, 0 errors (the latest outcome of each task)", summary)
        self.assertEqual(re.findall(r"\n  run (\S+): 40 done, 0 errors", summary), stamps)
        listing = results_in(self.project)[0].decode().splitlines()
        self.assertEqual(len(listing), 40)
        self.assertEqual([int(line.split(" -> ")[0]) for line in listing], list(range(40)))   # task order
        self.assertTrue(all("superseded" not in line for line in listing))
        oden = self.oden_module()
        loaded = list(oden.load_results("pi", folder=self.project.folder))
        self.assertEqual([task for task, _ in loaded], list(range(40)))
        self.assertEqual({r["run"] for r in oden.all_records(self.project.folder, "pi")}, set(stamps))
        newest = list(oden.load_results("pi", folder=self.project.folder, run=stamps[-1], errors=True))
        self.assertEqual(len(newest), 40)                               # no errors in the newest run
        self.assertEqual(len(list(oden.load_results("pi", folder=self.project.folder, run=stamps[0]))), 40)
        self.assertEqual(len(list(oden.load_results("pi", folder=self.project.folder, run="all"))), 120)

        every = results_in(self.project, "--all")[0].decode().splitlines()
        self.assertEqual(len(every), 120)
        self.assertEqual(sum("superseded by a later run" in line for line in every), 80)
        one = results_in(self.project, "--run", stamps[1])[0].decode().splitlines()
        self.assertEqual(len(one), 40)
        self.assertTrue(all(line.endswith("(superseded by a later run)") for line in one))
        none, said = results_in(self.project, "--run", "20000101-000000")
        self.assertEqual(none, b"")
        self.assertIn("no result files of run 'pi' with stamp 20000101-000000", said)
        self.assertIn(stamps[0], said)

    def test_fix_and_resume_leaves_no_standing_error(self):
        self.assertRan(self.project.run("manager", *FAST), 1)
        self.fix()
        self.assertRan(self.project.run("resume", *FAST))
        self.reverse_mtimes()
        summary = results_in(self.project, "--summary")[0].decode()
        self.assertIn("run 'pi': 40 done, 0 errors", summary)
        self.assertNotIn("Traceback", summary)
        self.assertRegex(summary, r"run \S+: 36 done, 4 errors, 4 superseded by later runs\n  run \S+: 4 done, "
                                  r"0 errors")
        self.assertNotIn("ERROR", results_in(self.project, "--errors")[0].decode())
        every = results_in(self.project, "--all", "--errors")[0].decode().splitlines()
        errors = [line for line in every if "ERROR" in line]
        self.assertEqual(len(errors), 4)
        self.assertTrue(all(line.endswith("ERROR ValueError: three is not fixed yet  (superseded by a later run)")
                            for line in errors), errors)
        oden = self.oden_module()
        pairs = list(oden.load_results("pi", folder=self.project.folder, errors=True))
        self.assertEqual([task for task, _ in pairs], list(range(40)))
        self.assertEqual(len(list(oden.load_results("pi", folder=self.project.folder, errors=True, run="all"))), 44)

    def test_long_values_are_cut_and_exports_are_plain_text(self):
        self.assertRan(self.project.run("manager", *FAST), 1)
        listing = results_in(self.project)[0].decode("utf-8")
        [long_line] = [line for line in listing.splitlines() if line.startswith("39 -> ")]
        self.assertLess(len(long_line), 400)
        self.assertIn("more characters; --full shows all", long_line)
        full = results_in(self.project, "--full")[0].decode("utf-8")
        self.assertIn("x" * 5000, full)

        exported, _ = results_in(self.project, "--csv", "--errors", env={"PYTHONIOENCODING": "ascii"})
        rows = list(csv.DictReader(io.StringIO(exported.decode("utf-8"))))
        self.assertEqual([int(row["index"]) for row in rows], list(range(40)))
        self.assertEqual(rows[4]["result"], "16")
        self.assertEqual(rows[39]["result"], "h\u00e9llo " + "x" * 5000)           # text as it is, not a repr
        self.assertEqual((rows[3]["status"], rows[3]["result"], rows[3]["exception"]),
                         ("error", "", "ValueError: three is not fixed yet"))
        self.assertEqual(rows[4]["exception"], "")
        self.assertRegex(rows[4]["run"], r"^\d{8}-\d{6}$")

        exported, _ = results_in(self.project, "--json", env={"PYTHONIOENCODING": "ascii"})
        self.assertIn("h\u00e9llo".encode("utf-8"), exported)                      # UTF-8, not \\u00e9
        records = json.loads(exported.decode("utf-8"))
        self.assertEqual(len(records), 36)
        self.assertEqual(records[-1]["result"], "h\u00e9llo " + "x" * 5000)

    def test_files_written_before_records_named_their_run(self):
        self.assertRan(self.project.run("manager", *FAST), 1)
        [path] = [p for p in self.project.files("pi*_5.done.pickle")]
        with open(path, "rb") as f:
            record = pickle.load(f)
        self.assertRegex(record["run"], r"^\d{8}-\d{6}$")
        self.assertEqual(record["script"], "job.py")
        old = dict(record, result="old")
        del old["run"], old["script"]
        with open(self.project.path("pi1_20200101-000000_5.done.pickle"), "wb") as f:
            pickle.dump(old, f)
        every = results_in(self.project, "--all")[0].decode().splitlines()
        self.assertIn("20200101-000000  5 -> 'old'  (superseded by a later run)", every)
        self.assertIn("5 -> 25", results_in(self.project)[0].decode().splitlines())


# ------------------------------------------------------------------ 6: classes of the user's script

POINT_JOB = """
import dataclasses

@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int

def make_tasks():
    return [Point(x, -x) for x in range(6)]

def calc(point):
    if point.x == 4:
        raise ValueError("no four")
    return Point(point.y, point.x * 10)
"""

ANALYSIS = """
import sys
sys.path.insert(0, sys.argv[1])
import oden
for task, result in oden.load_results("pts", folder=sys.argv[2]):
    print(task, result)
successes = list(oden.load_results("pts", folder=sys.argv[2]))
both = list(oden.load_results("pts", folder=sys.argv[2], errors=True))
print("errors:", [record["task"] for _, record in both[len(successes):]])
"""


class ScriptClassTest(support.OdenTestCase):
    def test_results_of_a_dataclass_load_from_another_script(self):
        project = self.project(library_code=POINT_JOB, name="pts")
        project.write_hosts([project.start_worker("--slots", "2")])         # process slots: __mp_main__
        self.assertRan(project.run("manager", *FAST), 1)
        expected = ["Point(x=%d, y=%d) Point(x=%d, y=%d)" % (x, -x, -x, 10 * x) for x in range(6) if x != 4]

        def analyse(where, *extra_paths):
            script = os.path.join(where, "analysis.py")
            with open(script, "w") as f:
                f.write(ANALYSIS)
            completed = subprocess.run([sys.executable, script, project.folder, project.folder], cwd=where,
                                       env=project.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       timeout=60)
            return completed.returncode, completed.stdout.decode("utf-8", "replace")

        code, output = analyse(project.folder)                                # the README's snippet, beside
        self.assertEqual(code, 0, output)
        self.assertEqual(output.splitlines(), expected + ["errors: [Point(x=4, y=-4)]"])
        elsewhere = tempfile.mkdtemp(prefix="oden-analysis-")
        self.addCleanup(shutil.rmtree, elsewhere, True)
        code, output = analyse(elsewhere)                                      # another folder, folder=
        self.assertEqual(code, 0, output)
        self.assertEqual(output.splitlines()[:len(expected)], expected)
        self.assertNotIn("skipped", output)

        # The script's own classes when it was imported first: isinstance holds.
        check = ("import sys; sys.path.insert(0, %r); import job, oden; "
                 "pairs = list(oden.load_results('pts', folder=%r)); "
                 "print(all(isinstance(r, job.Point) for _, r in pairs), len(pairs))"
                 % (project.folder, project.folder))
        completed = subprocess.run([sys.executable, "-c", check], cwd=elsewhere, env=project.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        self.assertEqual(completed.stdout.decode().split(), ["True", "5"])

        # `results` from the script, and plain pickle where the class is the main module's.
        self.assertIn("Point(x=1, y=-1) -> Point(x=-1, y=10)", project.run("results").output)

        # Without the script anywhere: the file is named as fine, not as unreadable.
        moved = tempfile.mkdtemp(prefix="oden-moved-")
        self.addCleanup(shutil.rmtree, moved, True)
        for path in project.files("pts*.pickle"):
            shutil.copy(path, moved)
        shutil.copy(project.path("oden.py"), moved)
        completed = subprocess.run([sys.executable, "-c", "import oden; print(len(list(oden.load_results('pts'))))"],
                                   cwd=moved, env=project.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   timeout=60)
        output = completed.stdout.decode()
        self.assertIn("skipped result file", output)
        self.assertNotIn("unreadable", output)
        self.assertIn("class Point from the run's script job.py, which is not in", output)
        self.assertEqual(output.strip().splitlines()[-1], "0")


if __name__ == "__main__":
    unittest.main()
