"""Fix, then resume: the code of a run travels with it.

Each "machine" is a project folder of its own with a worker started there; the PC's folder
holds the fixed code.  The manager finds what differs, pushes it, the worker restarts in place
on its port, and the run goes on with the new code.
"""
import os
import sys
import time

import support

sys.path.insert(0, support.ROOT)
import oden  # noqa: E402

FAST = support.fast(5, "--give-up-after", "30")
Manager, results = support.Manager, support.results

JOB = """
import helper
def make_tasks():
    return [1, 2, 3, 4]
def calc(x):
    if x == 3 and helper.BROKEN:
        raise ValueError("three is broken")
    return helper.f(x)
"""
OLD_HELPER = "BROKEN = True\n\ndef f(x):\n    return x + 1000\n"
NEW_HELPER = "BROKEN = False\n\ndef f(x):\n    return x * 10\n"

# Each task of the other run says it runs ("holding") and waits (60 s at most) until the test
# creates "release" in the worker's folder: that run is busy there as long as the test needs.
HOLD = """\
    open("holding", "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists("release") and time.monotonic() < deadline:
        time.sleep(0.02)
"""


def read(path):
    with open(path) as f:
        return f.read()


class PushTest(support.OdenTestCase):
    def machines(self, count, helper=OLD_HELPER, code=JOB, *worker_args):
        """The PC's project and `count` machines: folders with a copy of it and a worker each."""
        pc = self.project(library_code=code)
        with open(pc.path("helper.py"), "w") as f:
            f.write(helper)
        workers = []
        for _ in range(count):
            machine = support.Project(self, library_code=code)
            machine.env["ODEN_KEY"] = pc.env["ODEN_KEY"]
            with open(machine.path("helper.py"), "w") as f:
                f.write(helper)
            workers.append((machine, machine.start_worker("--slots", "1", *worker_args)))
        pc.write_hosts([w for _, w in workers])
        return pc, workers

    def test_fix_then_resume_on_three_machines_pushes_the_fix(self):
        pc, workers = self.machines(3)
        first = pc.run("manager", *FAST)
        self.assertRan(first, 1)
        self.assertIn("ValueError: three is broken", first.output)
        with open(pc.path("helper.py"), "w") as f:
            f.write(NEW_HELPER)                       # the fix, on the PC only
        resumed = pc.run("resume", *FAST)
        self.assertRan(resumed)
        self.assertIn("1 files differ: helper.py", resumed.output)
        self.assertEqual([r["result"] for r in results(pc)[2]], [30])        # task 3, fixed
        for machine, worker in workers:
            self.assertEqual(read(machine.path("helper.py")), NEW_HELPER)
            self.assertEqual(read(machine.path(".oden-previous", "helper.py")), OLD_HELPER)
            self.assertIn("push: wrote helper.py", worker.output())
            self.assertEqual(worker.output().count("listening on"), 2)      # restarted in place
            self.assertIsNone(worker.process.poll())

    def test_a_stale_module_is_caught_and_the_results_are_the_new_codes(self):
        pc, [(machine, worker)] = self.machines(1, code=JOB.replace("x == 3 and ", "False and "))
        with open(pc.path("helper.py"), "w") as f:
            f.write(OLD_HELPER.replace("x + 1000", "x * 10"))
        completed = pc.run("manager", *FAST)
        self.assertRan(completed)
        self.assertEqual(sorted(r["result"] for [r] in results(pc).values()), [10, 20, 30, 40])

    def test_a_data_file_named_in_files_reaches_the_workers(self):
        code = """
            files = ["data/*.txt"]
            def make_tasks():
                return ["a.txt"]
            def calc(name):
                with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", name)) as f:
                    return f.read()
        """
        pc, [(machine, worker)] = self.machines(1, code=code)
        for project, text in ((pc, "new data"), (machine, "old data")):
            os.makedirs(project.path("data"), exist_ok=True)
            with open(project.path("data", "a.txt"), "w") as f:
                f.write(text)
        with open(pc.script) as f:
            script = f.read()
        with open(pc.script, "w") as f:        # `files` goes to oden.main like every setting
            f.write(script.replace("calc=calc,", "calc=calc, files=files,"))
        completed = pc.run("manager", *FAST)
        self.assertRan(completed)
        self.assertEqual(read(machine.path("data", "a.txt")), "new data")
        self.assertEqual([r["result"] for [r] in results(pc).values()], ["new data"])

    def test_a_worker_with_no_push_refuses_and_nothing_is_written(self):
        pc, [(machine, worker)] = self.machines(1, OLD_HELPER, JOB, "--no-push")
        with open(pc.path("helper.py"), "w") as f:
            f.write(NEW_HELPER)
        completed = pc.run("manager", *FAST)
        self.assertRan(completed, 2)
        self.assertIn("worker 1 runs other code (1 files differ: helper.py) and refuses pushes (it was "
                      "started with --no-push): copy the project there yourself", completed.output)
        self.assertEqual(read(machine.path("helper.py")), OLD_HELPER)
        self.assertFalse(os.path.exists(machine.path(".oden-previous")))

    def test_another_projects_worker_is_never_pushed_to(self):
        pc = self.project(library_code=JOB)
        with open(pc.path("helper.py"), "w") as f:
            f.write(NEW_HELPER)
        theirs = support.Project(self, library_code=JOB, name="theirs")        # same key, other job
        theirs.env["ODEN_KEY"] = pc.env["ODEN_KEY"]
        with open(theirs.path("helper.py"), "w") as f:
            f.write(OLD_HELPER)
        worker = theirs.start_worker("--slots", "1")
        pc.write_hosts([worker])
        completed = pc.run("manager", *FAST)
        self.assertRan(completed, 2)
        self.assertIn("worker 1 runs another project's job ('theirs', not 't')", completed.output)
        self.assertEqual(read(theirs.path("helper.py")), OLD_HELPER)
        self.assertFalse(os.path.exists(theirs.path(".oden-previous")))

    def test_a_push_with_a_path_out_of_the_folder_is_refused(self):
        pc, [(machine, worker)] = self.machines(1)
        outside = os.path.join(os.path.dirname(machine.folder), "oden-outside-%d.txt" % os.getpid())
        self.addCleanup(lambda: os.path.exists(outside) and os.remove(outside))
        os.symlink(os.path.dirname(machine.folder), machine.path("link"))
        client = oden.HostClient(oden.Host(1, "127.0.0.1", worker.port),
                                 oden.Codec(pc.env["ODEN_KEY"].encode()), 10)
        self.addCleanup(client.close)
        client.connect({})
        for path in ("../" + os.path.basename(outside), outside, "link/" + os.path.basename(outside),
                     "a/../../x", ""):
            with self.subTest(path=path):
                answer = client.call("/push", {"run": "r", "files": {path: b"owned"}})
                self.assertFalse(answer["ok"])
                self.assertIn("project folder", answer["why"])
        self.assertFalse(os.path.exists(outside))
        self.assertEqual(worker.output().count("listening on"), 1)

    def test_a_worker_busy_with_another_run_is_not_restarted_under_it(self):
        held = JOB.replace("    return helper.f(x)", HOLD + "    return helper.f(x)")
        pc, [(machine, worker)] = self.machines(1, code="import os, time\n" + held)
        other = Manager(machine, "manager", "--yes", "--name", "other", *FAST)   # runs the old code
        machine.write_hosts([worker])
        self.assertTrue(support.wait_for(lambda: os.path.exists(machine.path("holding")), 30),
                        other.output())
        with open(pc.path("helper.py"), "w") as f:
            f.write(NEW_HELPER)
        started = time.monotonic()
        pushed = pc.run("push", "--timeout", "5")
        self.assertRan(pushed, 1)
        self.assertIn("it runs another run's tasks", pushed.output)
        self.assertEqual(read(machine.path("helper.py")), OLD_HELPER)
        open(machine.path("release"), "w").close()                # the other run may end now
        code, output = other.finish(self)
        self.assertEqual(code, 1, output[-3000:])                 # task 3 fails with the old code
        self.assertEqual(worker.output().count("listening on"), 1)
        pushed = pc.run("push", "--timeout", "5")
        self.assertRan(pushed)
        self.assertIn("pushed 1 files", pushed.output)
        self.assertEqual(read(machine.path("helper.py")), NEW_HELPER)
        self.assertLess(time.monotonic() - started, 60)
        again = pc.run("push", "--timeout", "5")
        self.assertIn("up to date", again.output)


class CodeUnitTest(support.OdenTestCase):
    def test_project_path_rows(self):
        folder = self.project().folder
        for relative in ("a.py", "pkg/mod.py", "data/x.txt"):
            self.assertEqual(oden.project_path(folder, relative), os.path.join(folder, *relative.split("/")))
        for relative in ("", "/etc/passwd", "../x", "a/../../x", "a\\..\\..\\x", "a\0b", None):
            with self.assertRaises(ValueError):
                oden.project_path(folder, relative)

    def test_modules_the_script_imports_at_any_depth(self):
        folder = self.project().folder
        os.makedirs(os.path.join(folder, "pkg"))
        files = {"main.py": "import os\nimport helper\ndef f():\n    from pkg import deep\n",
                 "helper.py": "import json\n", "pkg/__init__.py": "", "pkg/deep.py": "from . import x\nimport leaf\n",
                 "leaf.py": "", "unused.py": ""}
        for name, text in files.items():
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
        found = {os.path.relpath(p, folder) for p in oden.project_modules(os.path.join(folder, "main.py"), folder)}
        self.assertEqual(found, {"main.py", "helper.py", os.path.join("pkg", "__init__.py"),
                                 os.path.join("pkg", "deep.py"), "leaf.py"})
