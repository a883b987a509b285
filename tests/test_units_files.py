"""The in-process layer, result files: names and stamps, atomic writes, which saved records
are a run's, which outcome stands, and which tasks `resume` runs (matched by ==)."""
import os
import pickle
import re
import shutil
import sys
import tempfile
import unittest
from unittest import mock

import support

sys.path.insert(0, support.ROOT)
import oden  # noqa: E402


class Touchy:
    """A task whose == raises (as a numpy array's does in `if`): compared by its pickle."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        raise ValueError("the truth value is ambiguous")

    __hash__ = None


class Folder(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="oden-unit-")
        self.addCleanup(shutil.rmtree, self.folder, True)

    def save(self, name, records, host=1, stamp="20261129-230000", index=None, suffix=None):
        """Write records as oden would: one record a file, or a list as a pack."""
        packed = isinstance(records, list)
        record = records[0] if packed else records
        suffix = suffix or (oden.PACK_SUFFIX if packed else
                            oden.DONE_SUFFIX if "result" in record else oden.ERROR_SUFFIX)
        index = record["index"] if index is None else index
        path = os.path.join(self.folder, oden.result_file_name(name, host, stamp, index, suffix))
        with open(path, "wb") as f:
            pickle.dump(records, f)
        return path


def record(task, index=None, ok=True, run="20261129-230000", name="sim", ended=0, fresh=None):
    made = {"name": name, "task": task, "index": task if index is None else index, "run": run,
            "ended": ended}
    made.update({"result": task} if ok else {"error": "trace", "exception": "E: no"})
    if fresh is not None:
        made["fresh"] = fresh
    return made


class MatchingTest(unittest.TestCase):
    def test_freeze_ignores_order_of_dicts_and_sets_but_not_of_sequences(self):
        self.assertEqual(oden.content_key({"a": 1, "b": [1, {2}]}),
                         oden.content_key({"b": [1, {2}], "a": 1}))
        self.assertEqual(oden.freeze({3, 1}), oden.freeze(frozenset([1, 3])))
        self.assertNotEqual(oden.freeze([1, 2]), oden.freeze((1, 2)))
        self.assertNotEqual(oden.freeze([1, 2]), oden.freeze([2, 1]))
        self.assertNotEqual(oden.freeze({"a": 1}), oden.freeze({("a", 1)}))
        self.assertEqual(oden.content_key(bytearray(b"x")), "unhashable")
        self.assertEqual(oden.content_key({"k": [bytearray(b"x")]}), "unhashable")
        self.assertEqual(oden.content_key(("a", 1)), hash(("tuple", ("a", 1))))

    def test_the_index_is_a_multiset(self):
        index = oden.ContentIndex([1, 1, (2, "a"), {"k": [1]}])
        self.assertTrue(index.take(1))
        self.assertTrue(index.take(1.0))                  # == decides, as the docs say
        self.assertFalse(index.take(1))
        self.assertTrue(index.take({"k": [1]}))
        self.assertFalse(index.take({"k": [1]}))
        self.assertFalse(index.take((2, "b")))
        self.assertTrue(index.take((2, "a")))

    def test_unhashable_and_touchy_tasks_match_too(self):
        index = oden.ContentIndex([bytearray(b"ab"), Touchy(1), Touchy(2)])
        self.assertTrue(index.take(bytearray(b"ab")))
        self.assertFalse(index.take(bytearray(b"ab")))
        self.assertTrue(index.take(Touchy(2)))            # by its pickle
        self.assertFalse(index.take(Touchy(3)))
        self.assertTrue(index.take(Touchy(1)))
        self.assertFalse(oden.same_task(Touchy(1), Touchy(2)))
        self.assertTrue(oden.same_task(Touchy(1), Touchy(1)))

    def test_a_task_holding_nan_is_found_after_its_file_is_read(self):
        # NaN != NaN, and since Python 3.10 hash(nan) is per object: without freeze() making
        # a NaN ("nan",), a task such as (0.5, nan) read back from its file never matched the
        # one make_tasks() returns, and every `resume` ran it again.
        task = (0.5, float("nan"))
        index = oden.ContentIndex([pickle.loads(pickle.dumps(task)), {"x": [float("nan")]}])
        self.assertTrue(index.take(task))
        self.assertFalse(index.take(task))
        self.assertTrue(index.take({"x": [float("nan")]}))
        self.assertFalse(oden.same_task((0.5, float("nan")), (0.5, 1.0)))


class TasksToRunTest(Folder):
    def test_resume_runs_what_has_no_saved_success_counting_duplicates(self):
        self.save("sim", record(5, index=0))
        self.save("sim", record(5, index=2))
        self.save("sim", [record(7, index=3), record((1, 2), index=4)])
        self.save("sim", record(8, index=5, ok=False))
        tasks = [5, 5, 5, 7, (1, 2), 8, [1, 2]]
        self.assertEqual(oden.tasks_to_run(tasks, self.folder, "sim"), [2, 5, 6])

    def test_unreadable_files_are_reported_and_skipped(self):
        self.save("sim", record(1, index=0))
        with open(os.path.join(self.folder, "sim1_20261129-230000_1.done.pickle"), "wb") as f:
            f.write(b"not a pickle")
        with open(os.path.join(self.folder, "sim1_20261129-230000_2.done.pickle"), "wb") as f:
            pickle.dump({"no": "task"}, f)
        bad = []
        todo = oden.tasks_to_run([1, 2, 3], self.folder, "sim", lambda p, why: bad.append(
            (os.path.basename(p), why)))
        self.assertEqual(todo, [1, 2])
        self.assertEqual(sorted(bad)[1], ("sim1_20261129-230000_2.done.pickle",
                                          "ValueError: not an oden result record"))
        self.assertEqual(sorted(bad)[0][0], "sim1_20261129-230000_1.done.pickle")
        self.assertEqual(len(bad), 2)

    def test_a_record_without_its_run_takes_the_stamp_of_its_file(self):
        old = record(3)
        del old["run"]
        self.save("sim", old, host=12, stamp="20240101-120000-3")
        self.save("sim2", record(4, name="sim2"))                  # a longer name: not ours
        [(path, found)] = list(oden.run_records(self.folder, "sim"))
        self.assertEqual(found["run"], "20240101-120000-3")
        self.assertEqual(os.path.basename(path), "sim12_20240101-120000-3_3.done.pickle")
        self.assertEqual([r["task"] for _, r in oden.run_records(self.folder, "sim2")], [4])
        self.assertEqual(list(oden.run_records(self.folder, "si")), [])

    def test_errors_are_read_apart_from_successes(self):
        self.save("sim", record(1))
        self.save("sim", record(2, ok=False))
        self.assertEqual([r["task"] for _, r in oden.run_records(self.folder, "sim")], [1])
        self.assertEqual([r["task"] for _, r in oden.run_records(self.folder, "sim", True)], [2])
        self.assertEqual(sorted(r["task"] for r in oden.all_records(self.folder, "sim")), [1, 2])


class OutcomesTest(unittest.TestCase):
    A, B, B2 = "20261129-230000", "20261129-230100", "20261129-230100-2"

    def test_the_newest_run_of_a_task_stands(self):
        records = [record(0, ok=False, run=self.A), record(0, run=self.B),       # fixed later
                   record(1, run=self.A), record(1, ok=False, run=self.B2),      # broke later
                   record(2, run=self.A, ended=5), record(2, ok=False, run=self.A, ended=9)]
        latest = oden.latest_outcomes(records)
        self.assertEqual(sorted((r["index"], r["run"], "result" in r) for r in latest),
                         [(0, self.B, True), (1, self.B2, False), (2, self.A, False)])

    def test_another_task_at_the_same_index_is_a_task_of_its_own(self):
        records = [record("x", index=0, run=self.A), record("y", index=0, run=self.B)]
        self.assertEqual(len(oden.latest_outcomes(records)), 2)

    def test_choose_records_by_default_all_or_one_run(self):
        records = [record(1, run=self.B), record(0, ok=False, run=self.B),
                   record(0, run=self.A), record(1, run=self.A, fresh=True)]
        shown = [(r["index"], r["run"]) for r in oden.choose_records(records)]
        self.assertEqual(shown, [(0, self.B), (1, self.B)])
        shown = [(r["index"], r["run"]) for r in oden.choose_records(records, "all")]
        self.assertEqual(shown, [(0, self.A), (0, self.B), (1, self.A), (1, self.B)])
        shown = [(r["index"], r["run"]) for r in oden.choose_records(records, self.A)]
        self.assertEqual(shown, [(0, self.A), (1, self.A)])
        self.assertEqual(oden.choose_records(records, "20000101-000000"), [])

    def test_stamps_order_by_time_then_by_their_number(self):
        stamps = ["20261129-230000-10", "20261129-230000", "20261129-225959",
                  "20261129-230000-2", "garbage"]
        self.assertEqual(sorted(stamps, key=oden.stamp_order),
                         ["garbage", "20261129-225959", "20261129-230000",
                          "20261129-230000-2", "20261129-230000-10"])
        self.assertEqual(oden.stamp_order(None), ("", 0))


class NamesTest(Folder):
    def test_result_file_names_and_the_stamp_pattern(self):
        name = oden.result_file_name("sim", 3, "20261129-230000-2", 17, oden.DONE_SUFFIX)
        self.assertEqual(name, "sim3_20261129-230000-2_17.done.pickle")
        self.assertTrue(oden.name_pattern("sim", oden.DONE_SUFFIX).match(name))
        self.assertFalse(oden.name_pattern("sim", oden.ERROR_SUFFIX).match(name))
        self.assertFalse(oden.name_pattern("si", oden.DONE_SUFFIX).match(name))
        self.assertFalse(oden.name_pattern("sim", oden.DONE_SUFFIX).match(name + ".tmp1a2b"))
        stamp = re.compile(oden.STAMP + "$")
        for text, matches in [("20261129-230000", True), ("20261129-230000-12", True),
                              ("2026112-230000", False), ("20261129-23000", False),
                              ("20261129-230000-", False), ("20261129_230000", False)]:
            self.assertEqual(bool(stamp.match(text)), matches, text)

    def test_a_stamp_in_use_by_files_or_a_log_is_not_claimed(self):
        self.save("t", record(0, name="t"), stamp="20261129-230000")
        open(os.path.join(self.folder, "t_20261129-230000-2.log"), "w").close()
        self.save("t2", record(0, name="t2"), stamp="20261129-230000-3")  # a longer name's: too
        with mock.patch.object(oden, "timestamp", return_value="20261129-230000"):
            self.assertEqual(oden.claim_stamp(self.folder, "t"), "20261129-230000-4")
            self.assertEqual(oden.claim_stamp(self.folder, "t"), "20261129-230000-5")
            self.assertEqual(oden.claim_stamp(self.folder, "u"), "20261129-230000")
        self.assertTrue(os.path.exists(os.path.join(self.folder, "t_20261129-230000-4.log")))

    def test_write_atomically_leaves_the_new_file_or_the_old_and_no_temporary(self):
        path = os.path.join(self.folder, "r.done.pickle")
        oden.write_atomically(path, lambda f: f.write(b"first"))
        self.assertEqual(os.listdir(self.folder), ["r.done.pickle"])

        def broken(f):
            f.write(b"half")
            raise RuntimeError("disk on fire")
        with self.assertRaises(RuntimeError):
            oden.write_atomically(path, broken)
        with self.assertRaises(RuntimeError):
            oden.write_atomically(path + "2", broken)
        self.assertEqual(os.listdir(self.folder), ["r.done.pickle"])
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"first")
        with self.assertRaises(OSError):
            oden.write_atomically(os.path.join(self.folder, "no", "such"), lambda f: None)


if __name__ == "__main__":
    unittest.main()
