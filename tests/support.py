"""Shared test helpers: a project folder with a copy of oden.py, real worker
processes on free loopback ports, and the manager run as a user would run it.

Every process started here is registered with the test case and reaped in
cleanup; every wait is bounded.
"""
import collections
import contextlib
import glob
import os
import pickle
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import unittest
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ODEN = os.path.join(ROOT, "oden.py")
BEGIN, END = "# ------ User write below ------", "# ------ User write above ------"
LIBRARY_HEADER = """\
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oden
"""
LIBRARY_FOOTER = """
if __name__ == "__main__":
    sys.exit(oden.main(make_tasks=make_tasks, calc=calc, name=NAME))
"""


def fast(timeout=5, *more):
    """Manager options for short test runs: poll every 0.2 s; a host that does not answer
    within `timeout` s is down."""
    return ("--interval-polling", "0.2", "--timeout", str(timeout)) + more


FAST = fast()

# The user section of oden.py that tests start from (Project(user_code=user_section(...))):
# the settings and hooks, then the test's own code (make_tasks and calc at least).
SETTINGS = """
import sys
hosts = None
name = "t"
interval_polling = 0.2
timeout = 5
task_timeout = None
chunksize = None


def handle_finish_machine(uri, name):
    pass


def handle_finish_tasks():
    pass


def show_status():
    return %r

"""


def user_section(code, status="core test job"):
    """SETTINGS (show_status() returns `status`) followed by `code`, dedented."""
    return SETTINGS % (status,) + textwrap.dedent(code)


def get(where, path="", timeout=10):
    """GET on a fresh connection: (HTTP status, body text). `where` is a URL, or the port of
    a loopback server and then `path` follows it."""
    url = where + path if isinstance(where, str) else "http://127.0.0.1:%d%s" % (where, path)
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read().decode("utf-8", "replace")


def get_typed(url, timeout=10):
    """GET on a fresh connection: (Content-Type, body text)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.headers.get("Content-Type"), response.read().decode("utf-8")


class Worker:
    """A `worker` process on a free loopback port; its output goes to a file."""

    def __init__(self, process, port, output_path):
        self.process, self.port, self.output_path = process, port, output_path

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def kill(self):
        """SIGKILL, as a crash or a pulled plug would."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)

    def output(self):
        with open(self.output_path, encoding="utf-8", errors="replace") as f:
            return f.read()


class Project:
    """A temporary project folder, as a user would have after copying oden.py.

    script: the file commands run ("oden.py" with its user section replaced,
    or "job.py" that imports oden, the library way).
    """

    def __init__(self, test, user_code=None, library_code=None, name="t", key=True):
        self.test = test
        self.folder = tempfile.mkdtemp(prefix="oden-test-")
        test.addCleanup(shutil.rmtree, self.folder, True)
        self.name = name
        shutil.copy(ODEN, os.path.join(self.folder, "oden.py"))
        self.env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        self.env.pop("ODEN_KEY", None)
        if key:
            self.env["ODEN_KEY"] = secrets.token_urlsafe(24)
        self.processes = []
        test.addCleanup(self.reap)
        if library_code is not None:
            self.script = os.path.join(self.folder, "job.py")
            with open(self.script, "w") as f:
                f.write(LIBRARY_HEADER + "NAME = %r\n" % name + textwrap.dedent(library_code)
                        + LIBRARY_FOOTER)
            self.precompile()
        else:
            self.script = os.path.join(self.folder, "oden.py")
            if user_code is not None:
                self.set_user_section(user_code)

    def precompile(self):
        """Compile the project's oden.py once for every process that imports it (a worker, its
        forkserver, a manager: 40 ms of CPU each otherwise), to __pycache__ as Python would.
        The bytecode is checked against a hash of the source at every import, never against
        a time stamp, so a file rewritten within a second is never run stale."""
        import py_compile
        source = os.path.join(self.folder, "oden.py")
        try:
            py_compile.compile(source, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
        except (py_compile.PyCompileError, OSError):
            pass                                  # the processes compile it themselves

    def set_user_section(self, code):
        """Replace the user section of the project's oden.py with `code` (dedented)."""
        path = os.path.join(self.folder, "oden.py")
        with open(path) as f:
            text = f.read()
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        with open(path, "w") as f:
            f.write(text[:start] + "\n" + textwrap.dedent(code) + "\n" + text[end:])

    def path(self, *parts):
        return os.path.join(self.folder, *parts)

    def write_hosts(self, workers_or_lines):
        lines = [w.address if isinstance(w, Worker) else w for w in workers_or_lines]
        with open(self.path("hosts.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def start_worker(self, *args, port=0, wait=60):
        """Start `python3 script worker` on loopback; return a Worker once it listens."""
        output_path = self.path("worker-%d-%s.out" % (len(self.processes), secrets.token_hex(2)))
        out = open(output_path, "wb")
        command = [sys.executable, self.script, "worker", "--bind", "127.0.0.1",
                   "--port", str(port)] + list(args)
        process = subprocess.Popen(command, cwd=self.folder, env=self.env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.processes.append(process)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with open(output_path, encoding="utf-8", errors="replace") as f:
                match = re.search(r"listening on https?://\S*:(\d+)", f.read())
            if match:
                return Worker(process, int(match.group(1)), output_path)
            if process.poll() is not None:
                break
            time.sleep(0.05)
        with open(output_path, encoding="utf-8", errors="replace") as f:
            raise AssertionError("worker did not start: %s" % f.read())

    def start_workers(self, count, *args):
        return [self.start_worker(*args) for _ in range(count)]

    def popen(self, *args, **kwargs):
        """Start a command of the project's script without waiting (e.g. a manager to kill)."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.STDOUT)
        process = subprocess.Popen([sys.executable, self.script] + list(args),
                                   cwd=self.folder, env=self.env,
                                   stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
        self.processes.append(process)
        return process

    def run(self, *args, timeout=180, input=None):
        """Run a command of the project's script to the end; return CompletedProcess with
        .output text."""
        process = subprocess.run([sys.executable, self.script] + list(args),
                                 cwd=self.folder, env=self.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                                 input=input,
                                 stdin=None if input is not None else subprocess.DEVNULL)
        process.output = process.stdout.decode("utf-8", "replace")
        return process

    def files(self, pattern):
        return sorted(glob.glob(self.path(pattern)))

    def records(self, suffix=".done.pickle"):
        """Every result record with that suffix, as dicts."""
        found = []
        for path in self.files(self.name + "*" + suffix):
            with open(path, "rb") as f:
                found.append(pickle.load(f))
        return found

    def reap(self):
        """Stop everything this project started: SIGTERM first (a worker then removes its
        forkserver's temporary folder), SIGKILL for what is still there after 5 s."""
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for process in self.processes:
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except OSError:
                    process.kill()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                pass
            for stream in (process.stdout, process.stderr):
                if stream:
                    stream.close()


def silent_server():
    """A loopback socket that accepts connections and never answers: (port, close function)."""
    import socket
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()

    def close():
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        server.close()

    return server.getsockname()[1], close


def ephemeral_ports():
    """The range the kernel picks ports from for port 0 and for outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 65535


def free_port():
    """A loopback port nothing listens on now, for a worker that starts later (or never).

    Chosen at random below the kernel's ephemeral range and checked bindable: a port the
    kernel handed out (bind to port 0) could be handed out again, to another test's worker
    or to an outgoing connection, in the seconds before this test binds it."""
    import random
    import socket
    low, _ = ephemeral_ports()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below %d" % low)


class Manager:
    """A manager (or resume) process whose output goes to a file, to watch while it runs."""

    def __init__(self, project, *args):
        self.path = project.path("manager-%s.out" % secrets.token_hex(3))
        with open(self.path, "wb") as out:
            self.process = project.popen(*args, stdout=out)

    def output(self):
        with open(self.path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def running(self):
        return self.process.poll() is None

    def finish(self, test, seconds=120):
        """Wait for the exit; return (exit code, output)."""
        try:
            code = self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            test.fail("manager still runs after %d s:\n%s" % (seconds, self.output()[-4000:]))
        return code, self.output()


def results(project, suffix=".done.pickle"):
    """index -> [record, ...] over every result file with that suffix (each must load)."""
    found = collections.defaultdict(list)
    for path in project.files(project.name + "*" + suffix):
        with open(path, "rb") as f:
            record = pickle.load(f)
        found[record["index"]].append(dict(record, path=path))
    return found


def class_project(cls, **kwargs):
    """A Project that lives as long as the test class (reaped by its class cleanup)."""
    return Project(types.SimpleNamespace(addCleanup=cls.addClassCleanup), **kwargs)


class OdenTestCase(unittest.TestCase):
    maxDiff = None

    def project(self, **kwargs):
        return Project(self, **kwargs)

    def assertRan(self, completed, code=0):
        self.assertEqual(completed.returncode, code, completed.output[-4000:])


class Proxy:
    """A loopback TCP proxy in front of a worker: it forwards both ways, at most `rate` bytes
    a second towards the worker if given (a slow link), and cut() closes every connection
    it carries now (a broken line; the worker itself lives on)."""

    def __init__(self, port, rate=None):
        import socket
        self.target, self.rate = port, rate
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.connections = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    def _accept(self):
        import socket
        while not self.stop.is_set():
            try:
                client = self.server.accept()[0]
            except OSError:
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += [client, upstream]
            for source, sink, rate in ((client, upstream, self.rate), (upstream, client, None)):
                threading.Thread(target=self._pump, args=(source, sink, rate), daemon=True).start()

    def _pump(self, source, sink, rate):
        chunk = 4096 if rate is None else max(1, rate // 10)
        source.settimeout(None)
        try:
            while not self.stop.is_set():
                data = source.recv(chunk)
                if not data:
                    break
                sink.sendall(data)
                if rate is not None:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(2)

    def cut(self):
        with self.lock:
            connections, self.connections = self.connections, []
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(2)
            sock.close()
        return len(connections) // 2

    def close(self):
        self.stop.set()
        self.cut()
        self.server.close()
        self.thread.join(5)


def wait_for(predicate, seconds=60, interval=0.05):
    """Poll `predicate` until true or `seconds` pass; return its last value."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def process_stat(pid):
    """(state, parent, process group, session) of a process from /proc, or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3])


def session_processes(session):
    """Pids of the live (not zombie) processes of a session (a worker started by
    Project.start_worker leads its own): the worker, its slot processes, theirs."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = process_stat(int(entry))
            if stat is not None and stat[3] == session and stat[0] != "Z":
                found.append(int(entry))
    return found


def kill_session(session):
    """SIGKILL every process left in a session (cleanup after a test that killed its leader)."""
    for pid in session_processes(session):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
# ---------------------------------------------------------- /proc figures and resource limits

def proc_status_field(pid, field):
    """A field of /proc/PID/status as an int (VmRSS and VmHWM in kB, Threads a count)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_mib(pid):
    return proc_status_field(pid, "VmRSS") / 1024


def thread_count(pid):
    return proc_status_field(pid, "Threads")


def cpu_seconds(pid):
    """User plus system CPU time of a process so far, from /proc/PID/stat."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_worker_with_open_files(project, limit, *args):
    """project.start_worker(*args) with its open-file limit (ulimit -n) lowered to `limit`:
    the worker inherits the soft limit this process has while it starts it."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        return project.start_worker(*args)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def set_terminal_size(fd, rows, columns):
    """Give the pseudo-terminal `fd` a size (TIOCSWINSZ), as a terminal window would."""
    import fcntl
    import struct
    import termios
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def run_on_terminal(project, *args, columns=None, timeout=120):
    """Run a command of the project's script with stdout and stderr on a pseudo-terminal
    `columns` wide (None: the 0 x 0 a new one has); return (exit code, output text)."""
    import pty
    import select
    master, slave = pty.openpty()
    try:
        if columns is not None:
            set_terminal_size(slave, 24, columns)
        process = subprocess.Popen([sys.executable, project.script] + list(args),
                                   cwd=project.folder, env=project.env, stdin=subprocess.DEVNULL,
                                   stdout=slave, stderr=slave, start_new_session=True)
    finally:
        os.close(slave)
    project.processes.append(process)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:              # EIO: the last writer closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif process.poll() is not None:
                break
    finally:
        os.close(master)
    return process.wait(30), b"".join(chunks).decode("utf-8", "replace")


def wait_for_text(path, pattern, seconds=60, process=None):
    """Wait until the file at `path` holds a match of the regex `pattern`; return the match.
    Fails at once if `process` ends first."""
    deadline = time.monotonic() + seconds
    while True:
        with open(path, encoding="utf-8", errors="replace") as f:
            match = re.search(pattern, f.read())
        if match:
            return match
        if time.monotonic() > deadline or (process is not None and process.poll() is not None):
            with open(path, encoding="utf-8", errors="replace") as f:
                raise AssertionError("no %r in %s:\n%s" % (pattern, path, f.read()[-3000:]))
        time.sleep(0.05)


class NotingCondition(threading.Condition):
    """A Condition whose `waiting` Event is set when a thread starts to wait on it.  A test
    that sees the event and then takes the lock knows the waiter is inside wait() (it has
    let go of the lock), so it can wake it and check that it wakes, without any sleep."""

    def __init__(self, lock=None):
        super().__init__(lock)
        self.waiting = threading.Event()

    def wait(self, timeout=None):
        self.waiting.set()
        return super().wait(timeout)


def in_thread(target, *args):
    """Start target(*args) in a daemon thread; return (thread, box): box gets its result."""
    box = []
    thread = threading.Thread(target=lambda: box.append(target(*args)), daemon=True)
    thread.start()
    return thread, box
