#!/usr/bin/env python3
"""Benchmark oden against multiprocessing.Pool on this machine (stdlib only, loopback only).

    python3 bench/run.py                 # every case, about 2 minutes on 2 cores
    python3 bench/run.py --quick         # smaller counts, about 30 s
    python3 bench/run.py --cases 0,2     # some cases only
    python3 bench/run.py --json out.json # where the figures go (default bench/results.json)
    python3 bench/run.py --poll-dashboard   # a client reads the manager's live page every second

Workers and managers are real processes started from bench/job.py (the library
way), talking over loopback with a key; see bench/README.md for each case.
"""
import argparse
import contextlib
import datetime
import glob
import json
import multiprocessing
import os
import pickle
import platform
import re
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
JOB = os.path.join(HERE, "job.py")
sys.dont_write_bytecode = True          # no __pycache__ left in the project by the imports below
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
import oden  # noqa: E402
import job as bench_job  # noqa: E402

NAME = "bench"
CORES = os.cpu_count() or 1
POLL_DASHBOARD = False                  # --poll-dashboard: fetch / and /status.json every second during runs
TARGETS = {
    "0": "<= 1 ms median",
    "1u": ">= 3,000 tasks/s",
    "1b": ">= 50,000 tasks/s",
    "2": ">= 95 % efficiency",
    "3": "within 5 % of Pool",
}


# ---------------------------------------------------------------- processes

class Workers:
    """Real `job.py worker` processes on free loopback ports, started all at once."""

    def __init__(self, env, count, slots, threads=False, log_path=os.devnull, wait=120):
        self.processes, self.ports = [], []
        command = [sys.executable, JOB, "worker", "--bind", "127.0.0.1", "--port", "0", "--slots", str(slots)]
        if threads:
            command.append("--threads")
        self.log = open(log_path, "ab")
        started = time.monotonic()
        try:
            for _ in range(count):
                self.processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=self.log,
                                                       stdin=subprocess.DEVNULL, start_new_session=True))
            deadline = started + wait
            for process in self.processes:
                self.ports.append(read_port(process, deadline))
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def hosts_file(self, folder, count=None):
        """A hosts file listing every worker, or the first `count`."""
        path = os.path.join(folder, "hosts.txt")
        with open(path, "w") as f:
            f.write("".join("127.0.0.1:%d\n" % port for port in self.ports[:count]))
        return path

    def stop(self):
        """Stop every worker; `peak_rss_mb` then holds each one's peak RSS (os.wait4)."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        self.peak_rss_mb = []
        for process in self.processes:
            with contextlib.suppress(RuntimeError):
                self.peak_rss_mb.append(wait_with_usage(process, 15)[1].ru_maxrss / 1024.0)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(15)
            process.stdout.close()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def read_port(process, deadline):
    """The port from a worker's first line, waiting no later than `deadline`."""
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or process.poll() is not None:
            raise RuntimeError("a worker did not start (exit code %s): %r" % (process.poll(), line))
        if select.select([process.stdout], [], [], left)[0]:
            chunk = os.read(process.stdout.fileno(), 1)
            if not chunk:
                raise RuntimeError("a worker closed its output before listening: %r" % line)
            line += chunk
    match = re.search(rb"listening on https?://\S*:(\d+)", line)
    if not match:
        raise RuntimeError("unexpected first line from a worker: %r" % line)
    return int(match.group(1))


def run_manager(env, hosts_path, folder, extra=(), timeout=600, mode="manager"):
    """Run `job.py manager` (or `resume`) to the end; return wall seconds, in-run seconds (from its
    log), peak RSS, files."""
    command = [sys.executable, JOB, mode, "--hosts", hosts_path, "--folder", folder, "--yes", "-q",
               "--name", NAME] + list(extra)
    poller = DashboardPoller() if POLL_DASHBOARD else None
    if poller:
        command += ["--dashboard", "127.0.0.1:%d" % poller.port]
    stderr_path = os.path.join(folder, "manager.stderr")
    with open(stderr_path, "wb") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=stderr, stderr=stderr, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        if poller:
            poller.start()
        try:
            status, usage = wait_with_usage(process, timeout)
        finally:
            if poller:
                poller.stop()
        wall = time.perf_counter() - started
    if status != 0:
        with open(stderr_path, errors="replace") as f:
            raise RuntimeError("manager exited with %s: %s" % (status, f.read()[-2000:]))
    run_s = run_seconds_from_log(folder)
    if run_s is None:
        raise RuntimeError("no start and end lines in the manager's log in %s" % folder)
    figures = {"wall_s": wall, "run_s": max(run_s, 0.001), "peak_rss_mb": usage.ru_maxrss / 1024.0,
               "cpu_s": usage.ru_utime + usage.ru_stime}
    if poller:
        figures["dashboard_pages"] = poller.pages
    return figures


class DashboardPoller(threading.Thread):
    """A reader of the manager's live page: GET / and /status.json once a second until stop()."""

    def __init__(self):
        super().__init__(daemon=True)
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.stopped = threading.Event()
        self.pages = 0

    def run(self):
        while not self.stopped.wait(1.0):
            for path in ("/", "/status.json"):
                try:
                    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (self.port, path), timeout=5) as r:
                        r.read()
                    self.pages += 1
                except OSError:
                    pass                  # not listening yet, or the run has ended

    def stop(self):
        self.stopped.set()
        self.join(10)


def wait_with_usage(process, timeout):
    """Reap `process` with os.wait4, which gives the resource usage of that one child (ru_maxrss in KiB)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(process.pid, 0)
            process.returncode = -9
            raise RuntimeError("manager did not finish within %d s" % timeout)
        time.sleep(0.005)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
    process.returncode = code
    return code, usage


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def run_seconds_from_log(folder):
    """From the manager's 'run ...: N tasks' line to its 'N done, ...' line: the run without process startup."""
    logs = sorted(p for p in os.listdir(folder) if p.startswith(NAME + "_") and p.endswith(".log"))
    if not logs:
        raise RuntimeError("no manager log in %s" % folder)
    logs = logs[-1:]                     # the newest run's (stamps sort by time)
    first = last = None
    with open(os.path.join(folder, logs[0]), errors="replace") as f:
        for line in f:
            match = LOG_TIME.match(line)
            if not match:
                continue
            if first is None and " INFO run %r:" % NAME in line:
                first = match.group(1)
            elif " done, " in line and " elapsed" in line:
                last = match.group(1)
    if first is None or last is None:
        return None
    parse = lambda text: datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")
    return (parse(last) - parse(first)).total_seconds()


def count_results(folder, expected):
    """Read every result back with oden's own reader (single and packed files): each task exactly once,
    each result right, no error files.  Returns the number of results and of files holding them."""
    seen, paths, bad = set(), set(), []
    for path, record in oden.read_records(oden.result_paths(folder, NAME), lambda p, why: bad.append(why)):
        task, result = record["task"], record["result"]
        if result != task and not (isinstance(task, tuple) and result == (task[1], bytes(task[2]))):
            raise RuntimeError("wrong result in %s" % path)
        if record["index"] in seen:
            raise RuntimeError("task %d saved twice" % record["index"])
        seen.add(record["index"])
        paths.add(path)
    errors = oden.result_paths(folder, NAME, errors=True)
    if seen != set(range(expected)) or errors or bad:
        raise RuntimeError("%d of %d results on disk, %d error files, unreadable: %s"
                           % (len(seen), expected, len(errors), bad[:3]))
    return len(seen), len(paths)


def bench_env(case, n, **extra):
    env = dict(os.environ, ODEN_KEY=KEY, ODEN_BENCH_CASE=case, ODEN_BENCH_N=str(n), PYTHONDONTWRITEBYTECODE="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


KEY = secrets.token_urlsafe(32)


class Scratch:
    """A fresh folder for one manager run, on the same disk as /tmp; removed afterwards."""

    def __init__(self, root):
        self.path = tempfile.mkdtemp(prefix="run-", dir=root)

    def __enter__(self):
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, True)


def warm_up(env, workers, root, slots):
    """One small run first: a worker prints its port before its slot processes have booted (about 0.1-0.3 s
    here), and the measured run should not pay for that."""
    n = 2 * slots
    managed_run(dict(env, ODEN_BENCH_N=str(n)), workers, root, n)


def managed_run(env, workers, root, n, extra=(), endpoints=None):
    with Scratch(root) as folder:
        figures = run_manager(env, workers.hosts_file(folder, endpoints), folder, extra)
        figures["results_on_disk"], figures["result_files"] = count_results(folder, n)
    return figures


# ---------------------------------------------------------------- Pool side

def identity(x):
    return x


def sleep_task(x):
    time.sleep(bench_job.SLEEP)
    return x


def cpu_task(x):
    bench_job.spin(bench_job.LOOPS)
    return x


@contextlib.contextmanager
def closing_pool(processes):
    """A Pool that is closed and joined, not terminated: Pool.terminate can wait forever on a
    process it started while terminating."""
    pool = multiprocessing.Pool(processes)
    try:
        yield pool
    finally:
        pool.close()
        pool.join()


def pool_map(processes, function, n, chunksize=None):
    """Seconds for Pool.map over range(n) once the pool is up, and with its start-up."""
    started = time.perf_counter()
    with closing_pool(processes) as pool:
        pool.map(identity, range(processes))        # every process is up before the clock starts
        begun = time.perf_counter()
        out = pool.map(function, range(n), chunksize)
        ended = time.perf_counter()
    assert out == list(range(n))
    return {"map_s": ended - begun, "with_startup_s": ended - started}


# ---------------------------------------------------------------- cases

def case0(args, root):
    """Round trip of one task on one idle slot: HostClient + Codec against a real worker."""
    env = bench_env("trivial", 1)
    out = {"rounds": args.rounds}
    for mode, threads in (("process_slot", False), ("thread_slot", True)):
        with Workers(env, 1, 1, threads, os.path.join(root, "workers.log")) as workers:
            times = one_task_round_trips(workers.ports[0], args.rounds)
        out[mode + "_median_ms"] = statistics.median(times) * 1e3
        out[mode + "_p90_ms"] = sorted(times)[int(0.9 * len(times))] * 1e3
    with closing_pool(1) as pool:
        pool.apply(identity, (0,))
        times = []
        for i in range(args.rounds):
            started = time.perf_counter()
            assert pool.apply(identity, (i,)) == i
            times.append(time.perf_counter() - started)
    out["pool_apply_median_ms"] = statistics.median(times) * 1e3
    return out


def one_task_round_trips(port, rounds, warmup=20):
    codec = oden.Codec(KEY.encode())
    client = oden.HostClient(oden.Host(1, "127.0.0.1", port), codec, 10)
    client.boot = client.call("/hello", {})["boot"]
    run_id, acks, times = secrets.token_hex(6), [], []
    for i in range(warmup + rounds):
        started = time.perf_counter()
        client.call("/submit", {"run": run_id, "ack": acks, "batches": [(i + 1, [(i, oden.dumps(i))], None)]})
        done = []
        while not done:
            done = client.call("/poll", {"run": run_id, "ack": [], "wait": 5}, extra_wait=5)["done"]
        (batch_id, records), = done
        assert pickle.loads(records[0]["result"]) == i
        acks = [batch_id]
        if i >= warmup:
            times.append(time.perf_counter() - started)
    client.close()
    return times


def case1(args, root):
    """Trivial tasks on 2 local workers (1 slot each), every result durably on disk."""
    n = args.trivial_tasks
    env = bench_env("trivial", n)
    out = {"tasks": n, "workers": 2, "slots_per_worker": max(1, CORES // 2)}
    with Workers(env, 2, max(1, CORES // 2), log_path=os.path.join(root, "workers.log")) as workers:
        warm_up(env, workers, root, 2 * max(1, CORES // 2))
        for label, extra in (("unbatched", ["--chunksize", "1"]), ("batched", []),
                             ("unbatched_pack", ["--chunksize", "1", "--pack"]), ("batched_pack", ["--pack"])):
            figures = managed_run(env, workers, root, n, extra)
            figures["tasks_per_s"] = n / figures["run_s"]
            figures["tasks_per_s_end_to_end"] = n / figures["wall_s"]
            out[label] = figures
    for label, chunksize in (("pool_chunksize_1", 1), ("pool_auto", None)):
        figures = pool_map(2, identity, n, chunksize)
        figures["tasks_per_s"] = n / figures["map_s"]
        out[label] = figures
    return out


def best(runs, key):
    """The fastest of several runs (the least disturbed by other load), with every run's figure kept."""
    chosen = dict(min(runs, key=lambda r: r[key]))
    chosen["all_" + key] = [round(r[key], 4) for r in runs]
    return chosen


def case2(args, root):
    """400 sleeps of 20 ms on 4 workers x 4 slots: parallel efficiency."""
    n, seconds, slots = args.sleep_tasks, 0.02, 16
    ideal = n * seconds / slots
    env = bench_env("sleep", n, ODEN_BENCH_SLEEP=seconds)
    out = {"tasks": n, "sleep_s": seconds, "slots": slots, "ideal_s": ideal, "repeats": args.repeats}
    with Workers(env, 4, 4, log_path=os.path.join(root, "workers.log")) as workers:
        warm_up(env, workers, root, slots)
        figures = best([managed_run(env, workers, root, n) for _ in range(args.repeats)], "run_s")
    figures["efficiency"] = ideal / figures["run_s"]
    figures["efficiency_end_to_end"] = ideal / figures["wall_s"]
    out["oden"] = figures
    for label, chunksize in (("pool_auto", None), ("pool_chunksize_1", 1)):
        figures = best([pool_map(slots, sleep_task, n, chunksize) for _ in range(args.repeats)], "map_s")
        figures["efficiency"] = ideal / figures["map_s"]
        out[label] = figures
    return out


def case3(args, root):
    """CPU-bound tasks of about 50 ms on 2 workers using every core: speed-up over one process.
    Sequential, oden and Pool runs alternate, and each keeps its best, so that other load on the
    machine disturbs the three alike."""
    loops = calibrate_loops(0.05)
    bench_job.LOOPS = loops
    n, slots = args.cpu_tasks, max(1, CORES // 2)
    env = bench_env("cpu", n, ODEN_BENCH_LOOPS=loops)
    sequential, oden_runs, pool_runs = [], [], []
    with Workers(env, 2, slots, log_path=os.path.join(root, "workers.log")) as workers:
        warm_up(env, workers, root, 2 * slots)
        for _ in range(args.repeats):
            started = time.perf_counter()
            for i in range(n):
                cpu_task(i)
            sequential.append(time.perf_counter() - started)
            oden_runs.append(managed_run(env, workers, root, n))
            pool_runs.append(pool_map(CORES, cpu_task, n))
    seconds = min(sequential)
    out = {"tasks": n, "loops": loops, "sequential_s": seconds, "all_sequential_s": sequential, "task_s": seconds / n,
           "workers": 2, "slots_per_worker": slots, "repeats": args.repeats}
    figures = best(oden_runs, "run_s")
    figures["speedup"] = seconds / figures["run_s"]
    figures["speedup_end_to_end"] = seconds / min(r["wall_s"] for r in oden_runs)
    out["oden"] = figures
    figures = best(pool_runs, "map_s")
    figures["speedup"] = seconds / figures["map_s"]
    figures["speedup_with_startup"] = seconds / min(r["with_startup_s"] for r in pool_runs)
    out["pool"] = figures
    out["oden_vs_pool"] = out["oden"]["speedup"] / figures["speedup"]
    return out


def calibrate_loops(seconds):
    """Turns of job.spin that take `seconds` here: the fastest of several tries, as other load only slows."""
    loops = 20000
    while True:
        took = min(timed(bench_job.spin, loops) for _ in range(5))
        if took > 0.01:
            return int(loops * seconds / took)
        loops *= 4


def timed(function, *args):
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def case4(args, root):
    """Many endpoints (threaded one-slot workers) and many trivial tasks on one manager."""
    endpoints = args.endpoints
    out = {"endpoints": endpoints}
    env = bench_env("trivial", 0)
    with Workers(env, endpoints, 1, threads=True, log_path=os.path.join(root, "workers.log"), wait=300) as workers:
        out["workers_startup_s"] = workers.startup_seconds
        for n in args.scale_tasks:
            figures = managed_run(bench_env("trivial", n), workers, root, n)
            figures["tasks_per_s"] = n / figures["run_s"]
            out["tasks_%d" % n] = figures
        out["flat"] = flat_memory(args, workers, root)
    small, large = ("tasks_%d" % n for n in args.scale_tasks)
    out["rss_growth_mb"] = out[large]["peak_rss_mb"] - out[small]["peak_rss_mb"]
    out["rss_bytes_per_extra_task"] = out["rss_growth_mb"] * 2 ** 20 / (args.scale_tasks[1] - args.scale_tasks[0])
    out["ledger_bytes_per_task"] = ledger_bytes_per_task(lambda n: list(range(n)), *args.scale_tasks)
    return out


FLAT_ENDPOINTS, FLAT_CHUNK, FLAT_PAYLOAD = 20, 50, 4096


def flat_memory(args, workers, root):
    """Does the manager forget finished tasks?  Results of 4 KB each, on few enough endpoints with a fixed
    chunksize that the tasks in flight at once are far fewer than the run's: the peak RSS of a longer run may
    grow by the per-task ledger (a few hundred bytes), not by the 4 KB a kept result would add."""
    out = {"endpoints": min(FLAT_ENDPOINTS, len(workers.ports)), "chunksize": FLAT_CHUNK, "result_bytes": FLAT_PAYLOAD}
    for n in args.flat_tasks:
        env = bench_env("trivial", n, ODEN_BENCH_PAYLOAD=FLAT_PAYLOAD)
        out["tasks_%d" % n] = managed_run(env, workers, root, n, ["--chunksize", str(FLAT_CHUNK)], FLAT_ENDPOINTS)
    small, large = args.flat_tasks
    growth = out["tasks_%d" % large]["peak_rss_mb"] - out["tasks_%d" % small]["peak_rss_mb"]
    out["rss_bytes_per_extra_task"] = growth * 2 ** 20 / (large - small)
    out["ledger_bytes_per_task"] = ledger_bytes_per_task(
        lambda n: [("payload", i, FLAT_PAYLOAD) for i in range(n)], small, large)
    out["is_flat"] = out["rss_bytes_per_extra_task"] < out["ledger_bytes_per_task"] + FLAT_PAYLOAD / 2
    return out


def ledger_bytes_per_task(make_tasks, small, large):
    """What the manager must hold per task whatever happens (the task, its pickle, the board's entries),
    measured with tracemalloc: RSS growth beyond this would be finished tasks kept in memory."""
    import tracemalloc

    def held(n):
        tracemalloc.start()
        tasks = make_tasks(n)
        board = oden.TaskBoard(range(n), oden.MAX_ATTEMPTS, oden.MAX_DEATHS)
        kept = (oden.Tasks(tasks), board, board.take(n))      # Tasks empties the list
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del kept
        return size

    return (held(large) - held(small)) / (large - small)


def case5(args, root):
    """Scale, kept: a million trivial tasks with --pack on 2 loopback workers; then `resume` of
    the finished run (matches every task, runs none) and `results --summary`."""
    n = args.million
    env = bench_env("trivial", n)
    out = {"tasks": n}
    with Workers(env, 2, max(1, CORES // 2), log_path=os.path.join(root, "workers.log")) as workers:
        with Scratch(root) as folder:
            hosts = workers.hosts_file(folder)
            run = run_manager(env, hosts, folder, ["--pack"], timeout=1200)
            run["manager_bytes_per_task"] = run["peak_rss_mb"] * 2 ** 20 / n
            out["run"] = run
            out["resume"] = run_manager(env, hosts, folder, ["--pack"], timeout=1200, mode="resume")
            started = time.perf_counter()
            summary = subprocess.run([sys.executable, JOB, "results", "--summary", "--folder", folder,
                                      "--name", NAME], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, timeout=1200)
            out["results_summary_s"] = time.perf_counter() - started
            if summary.returncode != 0 or ("%d done" % n) not in summary.stdout.decode():
                raise RuntimeError("results --summary: %s" % summary.stdout.decode()[-500:])
    out["ledger_bytes_per_task"] = 54.0        # the task list itself: list(range(n)), see case 4
    return out


def case6(args, root):
    """Back-to-back runs: an empty run (every task already done) right after another, and the
    time from starting the manager to its first task sent, on loopback."""
    env = bench_env("trivial", 20)
    out = {}
    with Workers(env, 1, 1, threads=True, log_path=os.path.join(root, "workers.log")) as workers:
        with Scratch(root) as folder:
            hosts = workers.hosts_file(folder)
            run_manager(env, hosts, folder)
            empties, firsts = [], []
            for _ in range(args.repeats):
                empties.append(run_manager(env, hosts, folder, mode="resume")["wall_s"])
                started = time.time()
                run_manager(env, hosts, folder)
                firsts.append(first_task_started(folder) - started)
    out["empty_run_after_another_s"] = spread(empties)
    out["start_to_first_task_s"] = spread(firsts)
    return out


def first_task_started(folder):
    """When the newest run's first task started (Unix time), from its result records."""
    paths = sorted(glob.glob(os.path.join(folder, NAME + "*.done.pickle")), key=os.path.getmtime)
    stamp = re.search(r"_(\d{8}-\d{6}(?:-\d+)?)_", os.path.basename(paths[-1])).group(1)
    started = []
    for path in paths:
        if "_%s_" % stamp in path:
            with open(path, "rb") as f:
                started.append(pickle.load(f)["started"])
    return min(started)


def case7(args, root):
    """Big payloads: distinct tasks of BIG_TASK bytes with BIG_RESULT-byte results on 2 workers
    of 1 slot: the manager's peak RSS against the tasks' total, and each worker's."""
    n, size = args.big_tasks, BIG_TASK
    env = bench_env("big", n, ODEN_BENCH_SIZE=size, ODEN_BENCH_RESULT=BIG_RESULT)
    out = {"tasks": n, "task_mb": size / 2 ** 20, "result_mb": BIG_RESULT / 2 ** 20}
    with Workers(env, 2, 1, log_path=os.path.join(root, "workers.log")) as workers:
        with Scratch(root) as folder:
            out["run"] = run_manager(env, workers.hosts_file(folder), folder, timeout=600)
    out["tasks_total_mb"] = n * size / 2 ** 20
    out["manager_peak_over_tasks"] = out["run"]["peak_rss_mb"] / out["tasks_total_mb"]
    out["worker_peak_rss_mb"] = workers.peak_rss_mb
    return out


BIG_TASK, BIG_RESULT = 40 * 2 ** 20, 2 ** 20


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


# ---------------------------------------------------------------- report

def verdicts(cases):
    """(case, what, oden figure, Pool figure, target, met) rows."""
    rows = []
    c = cases.get("0")
    if c:
        rows.append(("0 one-task round trip", "median ms (process slot)", "%.2f" % c["process_slot_median_ms"],
                     "%.3f" % c["pool_apply_median_ms"], TARGETS["0"], c["process_slot_median_ms"] <= 1.0))
        rows.append(("", "median ms (--threads slot)", "%.2f" % c["thread_slot_median_ms"], "", "", None))
    c = cases.get("1")
    if c:
        u, b, up, bp = c["unbatched"], c["batched"], c["unbatched_pack"], c["batched_pack"]
        rows.append(("1 %d trivial tasks" % c["tasks"], "tasks/s, chunksize 1", "%.0f" % u["tasks_per_s"],
                     "%.0f" % c["pool_chunksize_1"]["tasks_per_s"], TARGETS["1u"], u["tasks_per_s"] >= 3000))
        rows.append(("  2 workers x 1 slot,", "tasks/s, automatic", "%.0f" % b["tasks_per_s"],
                     "%.0f" % c["pool_auto"]["tasks_per_s"], TARGETS["1b"], b["tasks_per_s"] >= 50000))
        rows.append(("  every result fsynced", "tasks/s, chunksize 1, --pack", "%.0f" % up["tasks_per_s"], "",
                     TARGETS["1u"], up["tasks_per_s"] >= 3000))
        rows.append(("", "tasks/s, automatic, --pack", "%.0f" % bp["tasks_per_s"], "", TARGETS["1b"],
                     bp["tasks_per_s"] >= 50000))
        rows.append(("", "end to end (same four)", " / ".join("%.0f" % r["tasks_per_s_end_to_end"]
                                                           for r in (u, b, up, bp)), "", "", None))
    c = cases.get("2")
    if c:
        o = c["oden"]
        rows.append(("2 %d sleeps of 20 ms" % c["tasks"], "efficiency (ideal %.2f s)" % c["ideal_s"],
                     "%.1f %%" % (100 * o["efficiency"]), "%.1f %% (cs 1: %.1f %%)" % (
                         100 * c["pool_auto"]["efficiency"], 100 * c["pool_chunksize_1"]["efficiency"]),
                     TARGETS["2"], o["efficiency"] >= 0.95))
        rows.append(("  4 workers x 4 slots", "efficiency end to end", "%.1f %%" % (100 * o["efficiency_end_to_end"]),
                     "", "", None))
    c = cases.get("3")
    if c:
        rows.append(("3 %d CPU tasks of %.0f ms" % (c["tasks"], 1e3 * c["task_s"]), "speed-up over 1 process",
                     "%.2f (%.0f %% of Pool)" % (c["oden"]["speedup"], 100 * c["oden_vs_pool"]),
                     "%.2f" % c["pool"]["speedup"], TARGETS["3"], c["oden_vs_pool"] >= 0.95))
        rows.append(("", "speed-up end to end", "%.2f" % c["oden"]["speedup_end_to_end"],
                     "%.2f" % c["pool"]["speedup_with_startup"], "", None))
    c = cases.get("4")
    if c:
        small, large = sorted((k for k in c if k.startswith("tasks_")), key=lambda k: int(k[6:]))
        f = c["flat"]
        rows.append(("4 %d endpoints" % c["endpoints"], "wall s / peak MB, %s tasks" % small[6:],
                     "%.1f / %.0f" % (c[small]["wall_s"], c[small]["peak_rss_mb"]), "", "", None))
        rows.append(("", "wall s / peak MB, %s tasks" % large[6:],
                     "%.1f / %.0f" % (c[large]["wall_s"], c[large]["peak_rss_mb"]), "", "manager < 300 MB",
                     c[large]["peak_rss_mb"] < 300))
        rows.append(("", "RSS bytes per extra task", "%.0f" % c["rss_bytes_per_extra_task"], "",
                     "(ledger %.0f B)" % c["ledger_bytes_per_task"], None))
        rows.append(("", "same, %d B results, %d hosts" % (f["result_bytes"], f["endpoints"]),
                     "%.0f" % f["rss_bytes_per_extra_task"], "",
                     "< ledger %.0f B + %d B / 2" % (f["ledger_bytes_per_task"], f["result_bytes"]), f["is_flat"]))
    c = cases.get("5")
    if c:
        r = c["run"]
        rows.append(("5 %d trivial tasks" % c["tasks"], "run s / manager B per task",
                     "%.1f / %.0f" % (r["run_s"], r["manager_bytes_per_task"]), "",
                     "about 7.5 s / 400 B", None))
        rows.append(("  --pack, 2 workers", "resume s / results --summary s",
                     "%.1f / %.1f" % (c["resume"]["wall_s"], c["results_summary_s"]), "",
                     "about 3.7 / 1.3 s", None))
    c = cases.get("6")
    if c:
        e, f = c["empty_run_after_another_s"], c["start_to_first_task_s"]
        rows.append(("6 back-to-back runs", "empty run after another, s", "%.2f (%.2f-%.2f)" % (
            e["median"], e["min"], e["max"]), "", "< 0.86 s (was)", e["max"] < 0.86))
        rows.append(("", "manager start to first task, s", "%.3f (%.3f-%.3f)" % (
            f["median"], f["min"], f["max"]), "", "<= 0.1 s on loopback", f["median"] <= 0.1))
    c = cases.get("7")
    if c:
        rows.append(("7 %d tasks of %.0f MiB" % (c["tasks"], c["task_mb"]), "manager peak MB / tasks' MB",
                     "%.0f / %.0f = %.2fx" % (c["run"]["peak_rss_mb"], c["tasks_total_mb"],
                                             c["manager_peak_over_tasks"]), "", "<= 1.5x",
                     c["manager_peak_over_tasks"] <= 1.5))
        rows.append(("  %.0f MiB results, 2 workers" % c["result_mb"], "worker peak MB",
                     " / ".join("%.0f" % m for m in c["worker_peak_rss_mb"]), "",
                     "<= 2x what it holds", None))
    return rows


def table(rows):
    header = ("case", "measure", "oden", "multiprocessing.Pool", "target", "met")
    text = [header] + [r[:5] + ({True: "yes", False: "NO", None: ""}[r[5]],) for r in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in text)


def parse_args(argv):
    parser = argparse.ArgumentParser(description="oden against multiprocessing.Pool on this machine")
    parser.add_argument("--quick", action="store_true", help="smaller counts (about 30 s)")
    parser.add_argument("--json", default=os.path.join(HERE, "results.json"), help="where to write the figures")
    parser.add_argument("--cases", default="0,1,2,3,4,5,6,7", help="comma-separated cases to run (default all)")
    parser.add_argument("--poll-dashboard", action="store_true", help="read each manager's live page "
                        "(/ and /status.json) every second while it runs")
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    args.million = 100000 if args.quick else 1000000
    args.big_tasks = 6
    if args.quick:
        args.rounds, args.trivial_tasks, args.sleep_tasks, args.cpu_tasks = 100, 4000, 400, 20
        args.endpoints, args.scale_tasks, args.flat_tasks, args.repeats = 50, (2000, 10000), (2000, 10000), 2
    else:
        args.rounds, args.trivial_tasks, args.sleep_tasks, args.cpu_tasks = 200, 20000, 400, 40
        args.endpoints, args.scale_tasks, args.flat_tasks, args.repeats = 200, (10000, 50000), (10000, 30000), 5
    return args


def main(argv=None):
    args = parse_args(argv)
    global POLL_DASHBOARD
    POLL_DASHBOARD = args.poll_dashboard
    functions = {"0": case0, "1": case1, "2": case2, "3": case3, "4": case4, "5": case5, "6": case6,
                 "7": case7}
    unknown = [c for c in args.cases if c not in functions]
    if unknown:
        sys.exit("unknown cases %s: pick from 0-7" % unknown)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # unwind, so every worker started is stopped
    root = tempfile.mkdtemp(prefix="oden-bench-")
    report = {"machine": {"cores": CORES, "python": platform.python_version(), "platform": platform.platform(),
                          "load_before": os.getloadavg()},
              "quick": args.quick, "poll_dashboard": args.poll_dashboard, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cases": {}}
    started = time.monotonic()
    try:
        for case in args.cases:
            case_started = time.monotonic()
            print("case %s ..." % case, file=sys.stderr, flush=True)
            report["cases"][case] = functions[case](args, root)
            report["cases"][case]["bench_seconds"] = time.monotonic() - case_started
    finally:
        shutil.rmtree(root, True)
    report["machine"]["load_after"] = os.getloadavg()
    report["bench_seconds"] = time.monotonic() - started
    rows = verdicts(report["cases"])
    report["verdicts"] = [dict(zip(("case", "measure", "oden", "pool", "target", "met"), r)) for r in rows]
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(table(rows))
    print("\n%d cores, Python %s, load %.2f before / %.2f after, %.0f s; figures in %s"
          % (CORES, report["machine"]["python"], report["machine"]["load_before"][0],
             report["machine"]["load_after"][0], report["bench_seconds"], args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
