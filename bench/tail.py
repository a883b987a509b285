"""Where case 2's time goes: `python3 bench/tail.py [--runs 5] [--turns 1] [--code DIR ...]`.

Case 2 of run.py (400 sleeps of 20 ms on 4 workers x 4 slots), run --runs times for each
code tree given (default: this one), the trees taking turns so that other load hits them
alike.  Each run's folder is kept until its figures are read (run.py deletes its 400 files
between runs, which loads the disk the next run fsyncs on).  From the result files: the
efficiency as run.py counts it, the span from the first task's start to the last one's end,
how long a slot waited between two of its tasks (median and sum per slot), and how long
slots idled at the end while others still ran.  Loopback only, standard library only.
"""
import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def slot_chains(starts_ends):
    """Tasks of one host, (start, end) each, as chains that one slot could have run: each task
    follows the chain that ended last before it started (0.3 ms of clock slack)."""
    chains = []
    for start, end in sorted(starts_ends):
        ready = [chain for chain in chains if chain[-1][1] <= start + 0.0003]
        if ready:
            max(ready, key=lambda chain: chain[-1][1]).append((start, end))
        else:
            chains.append([(start, end)])
    return chains


def figures(bench, folder):
    """The figures of one run from its log and result files."""
    import oden
    by_host = collections.defaultdict(list)
    for _, record in oden.read_records(oden.result_paths(folder, bench.NAME)):
        by_host[record["host"]].append((record["started"], record["ended"]))
    chains = [chain for tasks in by_host.values() for chain in slot_chains(tasks)]
    gaps = [b[0] - a[1] for chain in chains for a, b in zip(chain, chain[1:])]
    ends = [chain[-1][1] for chain in chains]
    first = min(chain[0][0] for chain in chains)
    return {"efficiency": 0.5 / bench.run_seconds_from_log(folder),
            "span_ms": 1000 * (max(ends) - first),
            "gap_median_ms": 1000 * statistics.median(gaps),
            "gaps_per_slot_ms": 1000 * sum(gaps) / len(chains),
            "tail_idle_ms": 1000 * statistics.mean(max(ends) - end for end in ends),
            "slots": len(chains)}


def measure(code, runs):
    """`runs` manager runs of case 2 with the code tree `code` (its bench/ and oden.py)."""
    sys.path[:0] = [os.path.join(code, "bench"), code]
    for module in ("run", "oden", "job"):
        sys.modules.pop(module, None)
    import run as bench
    try:
        env = bench.bench_env("sleep", 400, ODEN_BENCH_SLEEP=0.02)
        root = tempfile.mkdtemp(prefix="oden-tail-")
        found = []
        with bench.Workers(env, 4, 4, log_path=os.path.join(root, "workers.log")) as workers:
            bench.warm_up(env, workers, root, 16)
            for _ in range(runs):
                folder = tempfile.mkdtemp(dir=root)
                command = [sys.executable, bench.JOB, "manager", "--hosts",
                           workers.hosts_file(folder), "--folder", folder, "--yes", "-q",
                           "--name", bench.NAME]
                subprocess.run(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=120, check=True)
                found.append(figures(bench, folder))
        shutil.rmtree(root, True)
        return found
    finally:
        del sys.path[:2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per turn (default 5)")
    parser.add_argument("--turns", type=int, default=1, help="turns of every tree (default 1)")
    parser.add_argument("--code", nargs="*", default=[os.path.dirname(HERE)],
                        help="code trees to compare (folders holding oden.py and bench/)")
    args = parser.parse_args()
    if args.runs < 1 or args.turns < 1 or not args.code:
        parser.error("--runs and --turns take 1 or more, --code at least one folder")
    for code in args.code:
        if not all(os.path.isfile(os.path.join(code, name)) for name in
                   ("oden.py", os.path.join("bench", "run.py"), os.path.join("bench", "job.py"))):
            parser.error("%s holds no oden.py with bench/run.py and bench/job.py: give a code "
                         "tree (e.g. one unpacked with git archive)" % code)
    for _ in range(args.turns):
        for code in args.code:
            for run in measure(os.path.abspath(code), args.runs):
                print("%s  efficiency %.1f %%  span %.1f ms  gap median %.2f ms  gaps/slot "
                      "%.1f ms  tail idle %.1f ms  (%d slots)"
                      % (code, 100 * run["efficiency"], run["span_ms"], run["gap_median_ms"],
                         run["gaps_per_slot_ms"], run["tail_idle_ms"], run["slots"]))


if __name__ == "__main__":
    main()
