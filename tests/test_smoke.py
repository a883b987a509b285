"""A first end-to-end check: three workers, the library way, all results on disk."""
import support


class SmokeTest(support.OdenTestCase):
    def test_library_job_on_three_workers(self):
        project = self.project(library_code="""
            def make_tasks():
                return list(range(30))

            def calc(x):
                return x * x
        """)
        workers = project.start_workers(3, "--slots", "1")
        project.write_hosts(workers)
        completed = project.run("manager", "--timeout", "10")
        self.assertRan(completed)
        records = project.records()
        self.assertEqual(sorted(r["index"] for r in records), list(range(30)))
        self.assertTrue(all(r["result"] == r["task"] ** 2 for r in records))
