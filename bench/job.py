"""The benchmark's job file: the library way, so workers and manager run the same code.

The case comes from the environment, which run.py sets for workers and manager alike:
    ODEN_BENCH_CASE   trivial (calc returns its input), sleep (ODEN_BENCH_SLEEP seconds),
                      cpu (ODEN_BENCH_LOOPS turns of a pure-Python loop) or big (tasks of
                      ODEN_BENCH_SIZE bytes, results of ODEN_BENCH_RESULT bytes)
    ODEN_BENCH_N      how many tasks make_tasks returns
    ODEN_BENCH_PAYLOAD  (manager only) bytes of result each task asks for: tasks become
                      ("payload", i, size) and calc returns (i, size zero bytes)
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import oden  # noqa: E402

CASE = os.environ.get("ODEN_BENCH_CASE", "trivial")
N = int(os.environ.get("ODEN_BENCH_N", "1000"))
SLEEP = float(os.environ.get("ODEN_BENCH_SLEEP", "0.02"))
LOOPS = int(os.environ.get("ODEN_BENCH_LOOPS", "100000"))
PAYLOAD = int(os.environ.get("ODEN_BENCH_PAYLOAD", "0"))
SIZE = int(os.environ.get("ODEN_BENCH_SIZE", "0"))
RESULT = int(os.environ.get("ODEN_BENCH_RESULT", "0"))


def make_tasks():
    if CASE == "big":
        return [bytes([i]) * SIZE for i in range(N)]
    if PAYLOAD:
        return [("payload", i, PAYLOAD) for i in range(N)]
    return list(range(N))


def spin(loops):
    """Pure-Python CPU work (no sleeping, no C calls that drop the GIL)."""
    total = 0
    for i in range(loops):
        total += i * i % 7
    return total


def calc(task):
    if isinstance(task, tuple) and task[0] == "payload":
        return task[1], bytes(task[2])
    if CASE == "big":
        return bytes(RESULT)
    if CASE == "sleep":
        time.sleep(SLEEP)
    elif CASE == "cpu":
        spin(LOOPS)
    return task


if __name__ == "__main__":
    sys.exit(oden.main(make_tasks=make_tasks, calc=calc, name="bench"))
