"""Run the test suite in parallel: `python3 tests/run.py [-v] [-j N] [name ...]`.

Most of the suite is waiting on processes and sockets, so the tests run in N subprocesses
at once (`python -m unittest [-v] test ...` each, in this folder). unittest's loader finds
the tests, as `python -m unittest discover -s tests` would; the names on the command line
(module, module.Class, module.Class.test_method, or tests/test_x.py) pick some, as they do
for unittest. A class with setUpClass or tearDownClass runs whole in one subprocess; the
tests of a module's other classes are packed into groups of a few seconds (as measured
times in COST guess). The slowest groups start first. Each group's output is printed whole
when it ends; failures and errors come again at the end, then one summary in unittest's
form ("Ran N tests in X s", "OK" or "FAILED (...)").
Exit code 0 when every test passed, 1 otherwise.

Every group runs with $ODEN_TEST_GROUP set to a token of its own, which every process it
starts inherits: a group that outlives --timeout is killed with all of them, and whatever
a group leaves running when it ends is killed and named.
"""
import argparse
import collections
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN_ENV = "ODEN_TEST_GROUP"
JOBS = min(32, 4 * (os.cpu_count() or 1))     # groups at once: most of a group is waiting
GROUP_SECONDS = 4.5                 # a class without class fixtures is cut into groups this long

# Seconds a test takes alone, measured on a 2-core machine (a guide to the order and the groups,
# not a limit): the longest prefix of the test id that is listed wins; scenario tests
# (support.OdenTestCase) not listed count DEFAULT_SCENARIO, the others DEFAULT_UNIT.
COST = {
    "test_attacks.ConnectionFloodTest": 3.5,
    "test_attacks.ManagerDeadlineTest": 3,
    "test_attacks.RefusalLogTest.test_a_flood": 3.7,
    "test_attacks.WorkerMemoryTest": 4,
    "test_core.CoreWorkflowTest.test_user_section_hooks": 4.3,
    "test_faults.FaultTest": 2.5,
    "test_faults.FaultTest.test_chaos": 4,
    "test_faults.FaultTest.test_ctrl_c": 4,
    "test_faults.FaultTest.test_down_host": 4.9,
    "test_faults.FaultTest.test_late_result": 5.2,
    "test_faults.FaultTest.test_long_task": 4.4,
    "test_isolation.BlameTest.test_time_out_blames": 5,
    "test_isolation.SharedWorkerTest": 3,
    "test_runs.BlameTest.test_a_time_out": 5.5,
    "test_runs.IdentityTest.test_the_resume_hint": 4.7,
    "test_security.FuzzTest": 7.5,
    "test_see.BrowserTest": 6,
    "test_see.ProgressLineTest": 10,
    "test_see.StatusTest": 3.8,
    "test_units": 0.02,
}
DEFAULT_SCENARIO, DEFAULT_UNIT = 1.5, 0.1

SEPARATOR1, SEPARATOR2 = "=" * 70, "-" * 70
TRAILER = re.compile(r"^-{70}\nRan (\d+) tests? in [\d.]+s\n\n(OK|FAILED|NO TESTS RAN)"
                     r"(?: \(([^)\n]*)\))?", re.M)
KINDS = ("failures", "errors", "skipped", "expected failures", "unexpected successes")


def leaves(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from leaves(item)
        else:
            yield item


def module_name(name):
    """unittest's names, plus a path to a test file (tests/test_x.py) as its module."""
    if name.endswith(".py") and os.path.isfile(name):
        relative = os.path.relpath(os.path.abspath(name), HERE)
        return os.path.splitext(relative)[0].replace(os.sep, ".")
    return name


def cost(test):
    test_id = test.id()
    best = ""
    for prefix in COST:
        if (test_id == prefix or test_id.startswith(prefix + ".") or
                test_id.startswith(prefix + "_")) and len(prefix) > len(best):
            best = prefix
    if best:
        return COST[best]
    scenario = getattr(sys.modules.get("support"), "OdenTestCase", None)
    return DEFAULT_SCENARIO if scenario and isinstance(test, scenario) else DEFAULT_UNIT


def has_class_fixtures(cls):
    base = unittest.TestCase
    return (getattr(cls.setUpClass, "__func__", None) is not base.setUpClass.__func__ or
            getattr(cls.tearDownClass, "__func__", None) is not base.tearDownClass.__func__)


class Group:
    """Tests one subprocess runs: their names for the command line and the time they take."""

    def __init__(self, names, tests, seconds):
        self.names, self.tests, self.seconds = names, tests, seconds
        self.output, self.began, self.took, self.cpu, self.note = "", 0.0, 0.0, 0.0, None
        self.ran, self.counts, self.details = 0, collections.Counter(), ""
        self.ok = False

    @property
    def label(self):
        if self.tests == 1:
            return self.names[0]
        classes = unique(name.rsplit(".", 1)[0] for name in self.names)
        more = " and %d more classes" % (len(classes) - 1) if len(classes) > 1 else ""
        return "%s%s (%d tests)" % (classes[0], more, self.tests)


def make_groups(tests):
    """Groups in the order to start them, the slowest first: a class with class fixtures is
    one group; the tests of a module's other classes are packed, in order, into groups of
    about GROUP_SECONDS."""
    groups, by_module = [], collections.OrderedDict()
    for test in tests:
        if type(test).__module__ == "unittest.loader":      # a module that failed to import
            groups.append(Group([test._testMethodName], 1, 0))
        else:
            by_module.setdefault(type(test).__module__, []).append(test)
    for members in by_module.values():
        chunk, seconds = [], 0.0
        for cls in unique(type(t) for t in members):
            own = [t for t in members if type(t) is cls]
            if has_class_fixtures(cls):
                groups.append(Group([t.id() for t in own], len(own), sum(map(cost, own))))
                continue
            for test in own:
                if chunk and seconds + cost(test) > GROUP_SECONDS:
                    groups.append(Group([t.id() for t in chunk], len(chunk), seconds))
                    chunk, seconds = [], 0.0
                chunk.append(test)
                seconds += cost(test)
        if chunk:
            groups.append(Group([t.id() for t in chunk], len(chunk), seconds))
    groups.sort(key=lambda g: -g.seconds)
    return groups


def unique(items):
    return list(collections.OrderedDict.fromkeys(items))


# ------------------------------------------------------------------ processes of a group

def processes_with(token):
    """Pids of the processes whose environment holds TOKEN_ENV=token (Linux /proc; elsewhere
    nothing, and only the group's own process is killed)."""
    needle = ("%s=%s" % (TOKEN_ENV, token)).encode()
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open("/proc/%s/environ" % entry, "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def kill_all(token, process=None):
    """SIGKILL the group's process and everything that inherited its token; their count."""
    pids = set(processes_with(token))
    if process is not None and process.poll() is None:
        pids.add(process.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(pids)


def wait(process, group, timeout):
    """process.wait(timeout), also noting in group.cpu the CPU seconds the process and the
    processes it waited for took (os.wait4 where there is one)."""
    if not hasattr(os, "wait4"):
        return process.wait(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.001
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            group.cpu = usage.ru_utime + usage.ru_stime
            if os.WIFSIGNALED(status):
                process.returncode = -os.WTERMSIG(status)
            else:
                process.returncode = os.WEXITSTATUS(status)
            return process.returncode
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(process.args, timeout)
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


class Runner:
    def __init__(self, groups, jobs, verbose, timeout, stream, scratch):
        self.pending = collections.deque(groups)
        self.scratch = scratch                # the groups' temporary folder: removed at the end
        self.jobs, self.verbose, self.timeout, self.stream = jobs, verbose, timeout, stream
        self.lock = threading.Lock()
        self.running = {}                     # token -> Popen, for an interrupt
        self.finished = []
        self.stopping = False
        self.started = time.monotonic()

    def run(self):
        threads = [threading.Thread(target=self.serve, daemon=True) for _ in range(self.jobs)]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.5)
        except KeyboardInterrupt:
            self.stopping = True
            with self.lock:
                running = dict(self.running)
            for token, process in running.items():
                kill_all(token, process)
            raise

    def serve(self):
        while not self.stopping:
            with self.lock:
                if not self.pending:
                    return
                group = self.pending.popleft()
            self.run_group(group)
            with self.lock:
                self.finished.append(group)
                self.show(group)

    def run_group(self, group):
        token = secrets.token_hex(8)
        command = ([sys.executable, "-m", "unittest"] + (["-v"] if self.verbose else [])
                   + group.names)
        env = dict(os.environ, **{TOKEN_ENV: token, "TMPDIR": self.scratch})
        started = time.monotonic()
        group.began = started - self.started
        with tempfile.TemporaryFile() as out:
            process = subprocess.Popen(command, cwd=HERE, env=env, stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            with self.lock:
                self.running[token] = process
            try:
                code = wait(process, group, self.timeout)
            except subprocess.TimeoutExpired:
                kill_all(token, process)
                code = wait(process, group, None)
                group.note = ("killed after %d s (--timeout) with every process it started"
                              % self.timeout)
            finally:
                with self.lock:
                    self.running.pop(token, None)
            left = kill_all(token)
            if left and group.note is None:
                group.note = "left %d processes running; killed" % left
            group.took = time.monotonic() - started
            out.seek(0)
            group.output = out.read().decode("utf-8", "replace")
        self.parse(group, code)

    @staticmethod
    def parse(group, code):
        trailers = list(TRAILER.finditer(group.output))
        if not trailers:
            group.ran, group.counts["errors"] = group.tests, 1
            group.details = "%s\nERROR: %s\n%s\n%s\n" % (
                SEPARATOR1, group.label, SEPARATOR2,
                group.note or "the subprocess ended (exit %s) without unittest's summary" % code)
            return
        trailer = trailers[-1]
        body = group.output[:trailer.start()]
        group.ran = int(trailer.group(1))
        for part in (trailer.group(3) or "").split(","):
            key, _, value = part.strip().partition("=")
            if key in KINDS and value.isdigit():
                group.counts[key] += int(value)
        first = re.search(r"^={70}\n(ERROR|FAIL|UNEXPECTED SUCCESS): ", body, re.M)
        if first:
            group.details, body = body[first.start():], body[:first.start()]
        group.output = body
        if code != 0 and not (group.counts["failures"] or group.counts["errors"] or
                              group.counts["unexpected successes"]):
            group.counts["errors"] += 1
            group.details += "%s\nERROR: %s\n%s\nexit code %s after: %s\n" % (
                SEPARATOR1, group.label, SEPARATOR2, code, trailer.group(0).splitlines()[-1])
        group.ok = code == 0

    def show(self, group):
        text = group.output.rstrip("\n")
        if self.verbose:
            text += "\n"
        if group.note:
            text += "\n[%s: %s]\n" % (group.label, group.note)
        self.stream.write(text)
        self.stream.flush()


def at_least(low, convert):
    """An argparse type: a number (int or float) of at least `low`."""
    def checked(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a number" % text)
        if value < low:
            raise argparse.ArgumentTypeError("%s is less than %s" % (text, low))
        return value
    return checked


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="tests/run.py", description="Run oden's tests in parallel subprocesses.")
    parser.add_argument("names", nargs="*", help="tests to run as unittest names them "
                        "(test_core, test_core.CoreWorkflowTest, ...); default: every test")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per test")
    parser.add_argument("-j", "--jobs", type=at_least(1, int), default=JOBS,
                        help="subprocesses at once (default: 4 per core, at most 32: %(default)s)")
    parser.add_argument("-k", dest="patterns", action="append",
                        help="only tests whose name matches this pattern (as unittest's -k)")
    parser.add_argument("--timeout", type=at_least(1, float), default=300,
                        help="seconds a group may take before it is killed (default %(default)s)")
    parser.add_argument("--durations", type=at_least(0, int), default=0, metavar="N",
                        help="print the N slowest groups")
    args = parser.parse_args(argv)
    stream = sys.stderr                       # where unittest writes
    # Started in the background by a shell without job control, we inherit SIGINT ignored, and
    # so would the managers that tests stop with SIGINT (Ctrl-C): a handler of ours is reset
    # to the default in every process we start.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    started = time.monotonic()
    sys.path.insert(0, HERE)
    loader = unittest.TestLoader()
    if args.patterns:
        loader.testNamePatterns = ["*%s*" % p if "*" not in p else p for p in args.patterns]
    if args.names:
        suite = loader.loadTestsFromNames([module_name(n) for n in args.names])
    else:
        suite = loader.discover(HERE, top_level_dir=HERE)
    groups = make_groups(list(leaves(suite)))
    jobs = max(1, min(args.jobs, len(groups)))
    if args.verbose:
        stream.write("tests/run.py: %d tests in %d groups, %d at a time\n"
                     % (sum(g.tests for g in groups), len(groups), jobs))
    scratch = tempfile.mkdtemp(prefix="oden-tests-")
    runner = Runner(groups, jobs, args.verbose, args.timeout, stream, scratch)
    try:
        runner.run()
    except KeyboardInterrupt:
        stream.write("\ninterrupted: every group still running was killed with what it started; "
                     "%d of %d groups had finished\n" % (len(runner.finished), len(groups)))
        return 130
    finally:
        shutil.rmtree(scratch, ignore_errors=True)    # what killed tests left in their TMPDIR
    took = time.monotonic() - started

    if not args.verbose:
        stream.write("\n")
    for group in runner.finished:
        if group.details:
            stream.write(group.details.rstrip("\n") + "\n\n")
    if args.durations:
        stream.write("\nSlowest groups\n%s\n" % SEPARATOR2)
        for group in sorted(runner.finished, key=lambda g: -g.took)[:args.durations]:
            stream.write("%7.1fs  %5.1fs CPU  from %5.1fs  (guessed %4.1fs)  %s\n"
                         % (group.took, group.cpu, group.began, group.seconds, group.label))
    total = collections.Counter()
    for group in runner.finished:
        total.update(group.counts)
    ran = sum(g.ran for g in runner.finished)
    stream.write("%s\nRan %d test%s in %.3fs\n\n"
                 % (SEPARATOR2, ran, "" if ran == 1 else "s", took))
    infos = ["%s=%d" % (kind, total[kind]) for kind in KINDS if total[kind]]
    failed = total["failures"] or total["errors"] or total["unexpected successes"]
    ok = not failed and all(g.ok for g in runner.finished)
    if ran == 0 and ok:
        stream.write("NO TESTS RAN\n")
        return 5
    stream.write(("OK" if ok else "FAILED") + (" (%s)" % ", ".join(infos) if infos else "") + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
