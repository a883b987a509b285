#!/usr/bin/env python3
"""How long a fix takes to reach the workers: the time from `resume` to the first task running
after a push, on N loopback workers, each in a project folder of its own (a "machine").

    python3 bench/push.py                # 10 workers, 5 runs
    python3 bench/push.py --workers 3 --runs 2

Each run: the workers start with the old helper.py; the PC's folder gets a fixed one; the
manager starts, finds helper.py stale on every worker, pushes it, the workers restart in place,
and the tasks run.  Reported: seconds from starting the manager to the first task's start (from
the result records' `started`), and the bytes pushed to each worker.  Loopback only.
"""
import argparse
import glob
import os
import pickle
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = """import sys
import oden
import helper

def make_tasks():
    return list(range(40))

def calc(x):
    return helper.f(x)

if __name__ == "__main__":
    sys.exit(oden.main(make_tasks=make_tasks, calc=calc, name="push"))
"""
OLD, NEW = "def f(x):\n    return x + 1000\n", "def f(x):\n    return x * 10\n"


def project(folder, helper):
    os.makedirs(folder)
    shutil.copy(os.path.join(ROOT, "oden.py"), folder)
    for name, text in (("job.py", JOB), ("helper.py", helper)):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


def start_worker(folder, env):
    process = subprocess.Popen([sys.executable, "job.py", "worker", "--bind", "127.0.0.1", "--port", "0",
                                "--slots", "1", "--threads"], cwd=folder, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = process.stdout.readline().decode()
    return process, int(re.search(r":(\d+) \(", line).group(1))


def one_run(root, workers, env):
    pc = os.path.join(root, "pc")
    project(pc, NEW)
    processes, ports = [], []
    try:
        for number in range(workers):
            folder = os.path.join(root, "machine%d" % number)
            project(folder, OLD)
            process, port = start_worker(folder, env)
            processes.append(process)
            ports.append(port)
        with open(os.path.join(pc, "hosts.txt"), "w") as f:
            f.write("".join("127.0.0.1:%d\n" % port for port in ports))
        started = time.time()
        done = subprocess.run([sys.executable, "job.py", "manager", "--timeout", "10",
                               "--interval-polling", "0.2"], cwd=pc, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        output = done.stdout.decode()
        if done.returncode != 0:
            raise SystemExit("the manager failed:\n" + output[-3000:])
        records = []
        for path in glob.glob(os.path.join(pc, "push*.done.pickle")):
            with open(path, "rb") as f:
                records.append(pickle.load(f))
        assert sorted(r["result"] for r in records) == [x * 10 for x in range(40)], "old code ran"
        pushed = [int(n) for n in re.findall(r"pushing them \((\d+) bytes\)", output)]
        return min(r["started"] for r in records) - started, pushed
    finally:
        for process in processes:
            process.kill()
            process.wait()
            process.stdout.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    env = dict(os.environ, ODEN_KEY=secrets.token_urlsafe(32), PYTHONDONTWRITEBYTECODE="1")
    seconds, sizes = [], []
    for run in range(args.runs):
        root = tempfile.mkdtemp(prefix="oden-push-bench-")
        try:
            first, pushed = one_run(root, args.workers, env)
        finally:
            shutil.rmtree(root, True)
        seconds.append(first)
        sizes += pushed
        print("run %d: first task %.3f s after the manager started; %d pushes of %s bytes"
              % (run + 1, first, len(pushed), sorted(set(pushed))), flush=True)
    print("%d workers: manager start to first task after a push: median %.3f s (%.3f-%.3f) over %d "
          "runs; a push of helper.py: %d bytes" % (args.workers, statistics.median(seconds), min(seconds),
                                                   max(seconds), args.runs, max(sizes)))


if __name__ == "__main__":
    main()
