"""--pack: the successes of a batch share one file, and everything that reads results still works."""
import glob
import os
import pickle
import sys

import support

sys.path.insert(0, support.ROOT)
import oden  # noqa: E402

JOB = """
    def make_tasks():
        return [{"n": n, "tags": {"a", "b", str(n % 3)}} for n in range(300)]

    def calc(task):
        if task["n"] == 7:
            raise ValueError("seven is unlucky")
        return task["n"] * 2
"""
FAST = support.FAST


class PackTest(support.OdenTestCase):
    def test_packed_results_load_resume_and_list(self):
        project = self.project(library_code=JOB)
        workers = project.start_workers(2, "--slots", "1")
        project.write_hosts(workers)
        first = project.run("manager", "--pack", "--chunksize", "25", *FAST)
        self.assertRan(first, 1)

        packs = project.files("t*.pack.pickle")
        self.assertTrue(2 <= len(packs) <= 20, packs)        # batches of 25: far fewer files than tasks
        self.assertEqual(project.files("t*.done.pickle"), [])
        self.assertEqual(len(project.files("t*.error.pickle")), 1)
        seen = []
        for path in packs:                                    # plain pickle: a list of the usual dicts
            with open(path, "rb") as f:
                records = pickle.load(f)
            self.assertIsInstance(records, list)
            for record in records:
                self.assertEqual(record["result"], record["task"]["n"] * 2)
                self.assertEqual(record["name"], "t")
                seen.append(record["index"])
            self.assertTrue(os.path.basename(path).endswith("_%d.pack.pickle" % records[0]["index"]), path)
        self.assertEqual(sorted(seen), [n for n in range(300) if n != 7])
        self.assertEqual(glob.glob(project.path("*.tmp*")), [])

        loaded = dict((task["n"], result) for task, result in oden.load_results("t", folder=project.folder))
        self.assertEqual(loaded, dict((n, n * 2) for n in range(300) if n != 7))

        # Losing one pack loses exactly its tasks: resume runs those and the failed one, nothing else.
        with open(packs[0], "rb") as f:
            lost = sorted(record["index"] for record in pickle.load(f))
        os.remove(packs[0])
        resumed = project.run("resume", "--pack", "--chunksize", "25", *FAST)
        self.assertRan(resumed, 1)                            # task 7 still raises
        self.assertIn("%d to run" % (len(lost) + 1), resumed.output)
        indices = sorted(r["index"] for _, r in oden.read_records(oden.result_paths(project.folder, "t")))
        self.assertEqual(indices, [n for n in range(300) if n != 7])

        listed = project.run("results", "--json")
        self.assertRan(listed)
        self.assertEqual(listed.output.count('"status": "done"'), 299)
