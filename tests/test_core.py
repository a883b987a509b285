"""The core workflow, end to end, as a user lives it: start workers, run the
manager, look at the result files, fix what failed and resume."""
import glob
import http.client
import json
import os
import pickle
import re
import sys
import time

import support

sys.path.insert(0, support.ROOT)
import oden  # noqa: E402  (the in-process client and parse_hosts)

FAST = support.FAST
user_code = support.user_section


def basenames(paths):
    return {os.path.basename(p) for p in paths}


def index_of(path):
    return int(re.search(r"_(\d+)\.(done|error)\.pickle$", path).group(1))


get = support.get


class CoreWorkflowTest(support.OdenTestCase):
    def project_with(self, code, **kwargs):
        return self.project(user_code=user_code(code), **kwargs)

    def one_log(self, project):
        logs = [p for p in project.files("t_*.log") if re.match(r"t_\d{8}-\d{6}\.log$", os.path.basename(p))]
        self.assertEqual(len(logs), 1, project.files("*"))
        with open(logs[0], encoding="utf-8") as f:
            return f.read()

    # 1 ------------------------------------------------------------------
    def test_forty_tasks_on_three_workers_one_file_each_and_a_log(self):
        project = self.project_with("""
            def make_tasks():
                return list(range(40))

            def calc(x):
                print("calc got", x)
                return x * x + 1
        """)
        workers = project.start_workers(3, "--slots", "1")
        project.write_hosts(workers)
        completed = project.run("manager", "-v", *FAST)
        self.assertRan(completed)

        done = project.files("t*.done.pickle")
        self.assertEqual(sorted(index_of(p) for p in done), list(range(40)))
        self.assertEqual(project.files("t*.error.pickle"), [])
        self.assertEqual(glob.glob(project.path("*.tmp*")), [], "temporary files left behind")
        labels = {w.address for w in workers}
        for path in done:
            with open(path, "rb") as f:
                record = pickle.load(f)
            self.assertEqual(set(record), {"name", "index", "task", "host", "started", "ended", "output", "result",
                                           "run", "script", "fresh"})
            self.assertEqual(record["name"], "t")
            self.assertEqual(record["task"], record["index"])
            self.assertEqual(record["result"], record["task"] ** 2 + 1)
            self.assertIn(record["host"], labels)
            self.assertLessEqual(record["started"], record["ended"])
            self.assertIn("calc got %d" % record["task"], record["output"])
            host_number = [n for n, w in enumerate(workers, 1) if w.address == record["host"]][0]
            self.assertTrue(os.path.basename(path).startswith("t%d_" % host_number), path)

        text = self.one_log(project)
        per_host = {}
        done_lines = re.findall(r"tasks \[([\d, ]+)\] done on (\S+)", text)
        logged = {(int(i), host) for indices, host in done_lines for i in indices.split(",")}
        for record in project.records():
            self.assertIn((record["index"], record["host"]), logged)
            per_host[record["host"]] = per_host.get(record["host"], 0) + 1
        self.assertIn("summary:", text)
        self.assertIn("40 done, 0 failed", text)
        for label, count in per_host.items():
            self.assertRegex(text, r"\n%s +%d +0 " % (re.escape(label), count))

    # 2 ------------------------------------------------------------------
    def test_more_tasks_than_slots_all_get_done(self):
        project = self.project_with("""
            def make_tasks():
                return ["task-%02d" % i for i in range(25)]

            def calc(text):
                return text.upper()
        """)
        workers = project.start_workers(2, "--slots", "1")
        project.write_hosts(workers)
        self.assertRan(project.run("manager", *FAST, "--chunksize", "1"))
        records = project.records()
        self.assertEqual(sorted(r["index"] for r in records), list(range(25)))
        self.assertEqual({r["task"]: r["result"] for r in records},
                         {"task-%02d" % i: "TASK-%02d" % i for i in range(25)})

    # 3 ------------------------------------------------------------------
    def test_a_failing_task_shows_its_remote_traceback_and_the_run_goes_on(self):
        project = self.project_with("""
            def make_tasks():
                return list(range(12))

            def calc(x):
                if x == 3:
                    print("about to fail")
                    raise ValueError("bad task number %d" % x)
                return -x
        """)
        project.write_hosts(project.start_workers(2, "--slots", "1"))
        completed = project.run("manager", *FAST)
        self.assertRan(completed, 1)
        self.assertIn("Traceback (most recent call last)", completed.output)
        self.assertIn("ValueError: bad task number 3", completed.output)
        self.assertIn("about to fail", completed.output)

        errors = project.records(".error.pickle")
        self.assertEqual(len(errors), 1)
        error = errors[0]
        self.assertEqual((error["index"], error["task"]), (3, 3))
        self.assertEqual(error["exception"], "ValueError: bad task number 3")
        self.assertIn("Traceback", error["error"])
        self.assertIn('raise ValueError("bad task number %d" % x)', error["error"])
        self.assertNotIn("result", error)
        self.assertEqual(sorted(r["index"] for r in project.records()), [i for i in range(12) if i != 3])

    # 4 ------------------------------------------------------------------
    def test_resume_runs_only_the_failed_tasks_after_a_fix(self):
        project = self.project_with("""
            def make_tasks():
                return list(range(20))

            def calc(x):
                if x % 5 == 0:
                    raise RuntimeError("the bug hits %d" % x)
                return x + 1000
        """)
        workers = project.start_workers(2, "--slots", "1")
        project.write_hosts(workers)
        self.assertRan(project.run("manager", *FAST), 1)
        self.assertEqual(sorted(r["index"] for r in project.records(".error.pickle")), [0, 5, 10, 15])
        before = basenames(project.files("t*.pickle"))

        project.set_user_section(user_code("""
            def make_tasks():
                return list(range(20))

            def calc(x):
                return x + 1000
        """))
        for worker in workers:
            worker.stop()
        project.write_hosts(project.start_workers(2, "--slots", "1"))
        completed = project.run("resume", *FAST)
        self.assertRan(completed)
        self.assertIn("16 of 20 tasks have a saved success; 4 to run", completed.output)
        new = sorted(basenames(project.files("t*.pickle")) - before)
        self.assertEqual(len(new), 4, new)
        self.assertTrue(all(name.endswith(".done.pickle") for name in new), new)
        self.assertEqual(sorted(index_of(name) for name in new), [0, 5, 10, 15])
        records = project.records()
        self.assertEqual(sorted(r["index"] for r in records), list(range(20)))
        self.assertTrue(all(r["result"] == r["task"] + 1000 for r in records))

        after = basenames(project.files("t*.pickle"))
        completed = project.run("resume", *FAST)
        self.assertRan(completed)
        self.assertIn("20 of 20 tasks have a saved success; 0 to run", completed.output)
        self.assertEqual(basenames(project.files("t*.pickle")), after)

    # 5 ------------------------------------------------------------------
    def test_resume_matches_tasks_by_content_as_a_multiset(self):
        project = self.project_with("""
            FAIL = {3}

            def make_tasks():
                tasks = [{"n": n, "tags": {"x%d" % n, "common", "tag-%d" % (n * 7)}} for n in range(8)]
                tasks.append({"n": 1, "tags": {"x1", "common", "tag-7"}})
                return tasks

            def calc(task):
                if task["n"] in FAIL:
                    raise ValueError("not yet")
                return task["n"] * 100 + len(task["tags"])
        """)
        project.env["PYTHONHASHSEED"] = "1"
        workers = project.start_workers(2, "--slots", "1")
        project.write_hosts(workers)
        self.assertRan(project.run("manager", *FAST), 1)
        self.assertEqual(len(project.records()), 8)
        before = basenames(project.files("t*.pickle"))

        # Fixed calc; the same tasks built the other way round (key order, set
        # order, list order, hash seed), n=5 now twice, and a new task n=8.
        project.set_user_section(user_code("""
            FAIL = set()

            def make_tasks():
                tasks = []
                for n in [8, 7, 6, 5, 5, 4, 3, 2, 1, 1, 0]:
                    tags = set()
                    for tag in ["tag-%d" % (n * 7), "common", "x%d" % n]:
                        tags.add(tag)
                    task = {}
                    task["tags"] = tags
                    task["n"] = n
                    tasks.append(task)
                return tasks

            def calc(task):
                if task["n"] in FAIL:
                    raise ValueError("not yet")
                return task["n"] * 100 + len(task["tags"])
        """))
        project.env["PYTHONHASHSEED"] = "2"
        for worker in workers:
            worker.stop()
        project.write_hosts(project.start_workers(2, "--slots", "1"))
        completed = project.run("resume", *FAST)
        self.assertRan(completed)
        self.assertIn("8 of 11 tasks have a saved success; 3 to run", completed.output)

        new = sorted(basenames(project.files("t*.pickle")) - before)
        self.assertEqual(len(new), 3, new)
        new_records = []
        for name in new:
            with open(project.path(name), "rb") as f:
                new_records.append(pickle.load(f))
        self.assertEqual(sorted(r["task"]["n"] for r in new_records), [3, 5, 8])
        self.assertTrue(all(r["result"] == r["task"]["n"] * 100 + 3 for r in new_records))
        n_done = sorted(r["task"]["n"] for r in project.records())
        self.assertEqual(n_done, [0, 1, 1, 2, 3, 4, 5, 5, 6, 7, 8])

    # 6 ------------------------------------------------------------------
    def test_user_section_hooks_are_called(self):
        project = self.project_with("""
            import os
            HERE = os.path.dirname(os.path.abspath(__file__))

            def make_tasks():
                return list(range(8))

            def calc(x):
                if x == 0:
                    time.sleep(1.5)      # keeps one host busy while the other runs out
                return x

            def handle_finish_machine(uri, name):
                with open(os.path.join(HERE, "machines.txt"), "a") as f:
                    f.write("%s %s\\n" % (uri, name))

            def handle_finish_tasks():
                with open(os.path.join(HERE, "finished.txt"), "a") as f:
                    f.write("all done\\n")
        """)
        workers = project.start_workers(2, "--slots", "1")
        project.write_hosts(workers)
        self.assertRan(project.run("manager", "--chunksize", "1"))
        self.assertEqual(len(project.records()), 8)
        with open(project.path("finished.txt")) as f:
            self.assertEqual(f.read(), "all done\n")
        with open(project.path("machines.txt")) as f:
            calls = sorted(f.read().splitlines())
        # One host runs out while the other runs the slow task; the other is
        # told when the run ends: each exactly once.
        self.assertEqual(calls, sorted("%s t" % w.url for w in workers))

        # A lone host runs the last task itself and never idles: still told once.
        for path in ("machines.txt", "finished.txt"):
            os.remove(project.path(path))
        project.write_hosts(workers[:1])
        self.assertRan(project.run("manager", "--yes"))
        with open(project.path("machines.txt")) as f:
            self.assertEqual(f.read().splitlines(), ["%s t" % workers[0].url])
        with open(project.path("finished.txt")) as f:
            self.assertEqual(f.read(), "all done\n")

    # 7 ------------------------------------------------------------------
    def test_status_pages_answer_while_a_task_runs(self):
        project = self.project_with("""
            def make_tasks():
                return [2.0]

            def calc(seconds):
                time.sleep(seconds)
                return "slept"

            def show_status():
                return "status text from the user section"
        """)
        worker = project.start_worker("--slots", "1")
        project.write_hosts([worker])
        manager = project.popen("manager", *FAST)
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and manager.poll() is None:
            status, text = get(worker.url + "/status")
            self.assertEqual(status, 200)
            seen.append(text)
            if ": busy," in text:
                break
            time.sleep(0.05)
        self.assertTrue(any("busy, 1 of 1 slots busy" in text for text in seen), seen[-3:])
        status, page = get(worker.url + "/")
        self.assertEqual(status, 200)
        self.assertIn("status text from the user section", page)
        state = json.loads(get(worker.url + "/status.json")[1])
        self.assertEqual(state["state"], "busy")
        self.assertEqual(len(state["running_task_ages"]), 1)

        output = manager.communicate(timeout=60)[0].decode()
        self.assertEqual(manager.returncode, 0, output)
        self.assertEqual([r["result"] for r in project.records()], ["slept"])
        self.assertIn("idle, 0 of 1 slots busy, 0 queued batches, 1 done, 0 failed", get(worker.url + "/status")[1])

    # 8 ------------------------------------------------------------------
    def test_parse_hosts_accepts_names_ports_ipv6_comments_and_blank_lines(self):
        hosts = oden.parse_hosts("# the lab\n\nalpha\nbeta.example:8081\n  [::1]:9000   # loopback v6\n"
                                 "10.0.0.5:1\n\n", "hosts.txt")
        self.assertEqual([h.label for h in hosts], ["alpha:8080", "beta.example:8081", "[::1]:9000", "10.0.0.5:1"])
        self.assertEqual([h.number for h in hosts], [1, 2, 3, 4])
        self.assertEqual((hosts[2].address, hosts[2].port, hosts[2].uri), ("::1", 9000, "http://[::1]:9000"))

    def test_bad_hosts_file_is_one_clear_line_and_exit_2(self):
        project = self.project_with("""
            def make_tasks():
                return [1]

            def calc(x):
                return x
        """)
        path = project.path("hosts.txt")
        cases = [("alpha\nbad host name\n", 2), ("# c\n\nalpha:99999\n", 3), ("alpha:0\n", 1),
                 ("[::1\n", 1), ("http://alpha:80\n", 1), ("alpha:80:81\n", 1)]
        for text, line in cases:
            with self.subTest(text=text):
                with open(path, "w") as f:
                    f.write(text)
                completed = project.run("manager", *FAST)
                self.assertRan(completed, 2)
                self.assertEqual(len(completed.output.strip().splitlines()), 1, completed.output)
                self.assertTrue(completed.output.startswith("oden: error: "), completed.output)
                self.assertIn("%s line %d" % (path, line), completed.output)
                self.assertNotIn("Traceback", completed.output)

        os.remove(path)
        completed = project.run("manager", *FAST)
        self.assertRan(completed, 2)
        self.assertEqual(len(completed.output.strip().splitlines()), 1, completed.output)
        self.assertIn("cannot read hosts file %s" % path, completed.output)

        with open(path, "w") as f:
            f.write("# nothing here yet\n\n")
        completed = project.run("manager", *FAST)
        self.assertRan(completed, 2)
        self.assertEqual(len(completed.output.strip().splitlines()), 1, completed.output)
        self.assertIn("no hosts in %s" % path, completed.output)
        self.assertNotIn("Traceback", completed.output)
        self.assertEqual(project.files("t*.pickle"), [])

    # 9 ------------------------------------------------------------------
    def test_a_host_that_was_never_started_is_named_and_the_run_completes(self):
        project = self.project_with("""
            def make_tasks():
                return list(range(10))

            def calc(x):
                return 2 * x
        """)
        worker = project.start_worker("--slots", "1")
        dead = "127.0.0.1:%d" % support.free_port()
        project.write_hosts([dead, worker])
        completed = project.run("manager", *FAST)
        self.assertRan(completed)
        self.assertRegex(completed.output, re.escape(dead) + r" is down: connection refused")
        self.assertIn(dead, self.one_log(project))
        records = project.records()
        self.assertEqual(sorted(r["index"] for r in records), list(range(10)))
        self.assertEqual({r["host"] for r in records}, {worker.address})
        self.assertEqual({os.path.basename(p)[:3] for p in project.files("t*.pickle")}, {"t2_"})

    def test_only_dead_hosts_give_up_with_exit_3_and_name_resume(self):
        project = self.project_with("""
            def make_tasks():
                return list(range(3))

            def calc(x):
                return x
        """)
        project.write_hosts(["127.0.0.1:%d" % support.free_port()])
        completed = project.run("manager", *FAST, "--give-up-after", "2", timeout=60)
        self.assertRan(completed, 3)
        self.assertIn("connection refused", completed.output)
        self.assertIn("oden.py resume", completed.output)
        self.assertIn("3 tasks left", completed.output)
        self.assertEqual(project.files("t*.pickle"), [])

    # 10 -----------------------------------------------------------------
    def test_an_unpicklable_task_stops_the_manager_before_it_starts(self):
        project = self.project_with("""
            def make_tasks():
                return [1, 2, (3, lambda: 3), 4]

            def calc(x):
                return x
        """)
        worker = project.start_worker("--slots", "1", "--threads")
        project.write_hosts([worker])
        completed = project.run("manager", *FAST)
        self.assertRan(completed, 2)
        self.assertIn("task 2 cannot be pickled", completed.output)
        self.assertEqual(len(completed.output.strip().splitlines()), 1, completed.output)
        self.assertEqual(project.files("t*.pickle"), [])
        self.assertIn("0 done, 0 failed", get(worker.url + "/status")[1])

    def test_an_unpicklable_result_is_that_tasks_error_and_the_worker_serves_on(self):
        project = self.project_with("""
            def make_tasks():
                return list(range(6))

            def calc(x):
                if x == 1:
                    return lambda: x
                if x == 2:
                    return open(os.devnull)
                return x * 3
        """)
        worker = project.start_worker("--slots", "1")
        project.write_hosts([worker])
        completed = project.run("manager", *FAST, "--chunksize", "1")
        self.assertRan(completed, 1)
        errors = {r["index"]: r for r in project.records(".error.pickle")}
        self.assertEqual(sorted(errors), [1, 2])
        self.assertIn("PicklingError: calc returned a function that cannot be pickled", errors[1]["exception"])
        self.assertIn("PicklingError: calc returned a TextIOWrapper that cannot be pickled", errors[2]["exception"])
        for record in errors.values():
            self.assertIn("Traceback", record["error"])
        self.assertEqual({r["index"]: r["result"] for r in project.records()}, {0: 0, 3: 9, 4: 12, 5: 15})
        self.assertIsNone(worker.process.poll(), "the worker died")
        self.assertIn("4 done, 2 failed", get(worker.url + "/status")[1])

        completed = project.run("resume", *FAST)        # it still runs tasks
        self.assertRan(completed, 1)
        self.assertIn("2 to run", completed.output)
        self.assertIn("4 done, 4 failed", get(worker.url + "/status")[1])

    # 11 -----------------------------------------------------------------
    def test_existing_results_need_yes_or_resume(self):
        project = self.project_with("""
            def make_tasks():
                return list(range(5))

            def calc(x):
                return x
        """)
        project.write_hosts([project.start_worker("--slots", "1", "--threads")])
        self.assertRan(project.run("manager", *FAST))
        first = basenames(project.files("t*.pickle"))
        self.assertEqual(len(first), 5)

        completed = project.run("manager", *FAST)
        self.assertRan(completed, 2)
        self.assertIn("--yes", completed.output)
        self.assertIn("resume", completed.output)
        self.assertNotIn("Traceback", completed.output)
        self.assertEqual(basenames(project.files("t*.pickle")), first)

        self.assertRan(project.run("manager", *FAST, "--yes"))
        files = basenames(project.files("t*.pickle"))
        self.assertTrue(first <= files, "the earlier run's files must stay")
        self.assertEqual(len(files), 10)

    # 12 -----------------------------------------------------------------
    def test_test_mode_runs_calc_here_and_reports_each_task(self):
        project = self.project_with("""
            def make_tasks():
                return [1, 2, 0]

            def calc(x):
                return 10 // x
        """)
        completed = project.run("test")
        self.assertRan(completed, 1)
        self.assertIn("task 0 1: 10", completed.output)
        self.assertIn("task 1 2: 5", completed.output)
        self.assertIn("task 2 0 FAILED", completed.output)
        self.assertIn("ZeroDivisionError", completed.output)
        self.assertIn("3 tasks: 2 ok, 1 failed", completed.output)
        self.assertEqual(project.files("t*.pickle"), [])

    def test_local_runs_the_shipped_example_then_resume_after_the_fix(self):
        project = self.project(name="sort")
        completed = project.run("local", "--workers", "2", *FAST)
        self.assertRan(completed, 1)
        self.assertEqual(len(project.files("sort*.done.pickle")), 16)
        errors = project.records(".error.pickle")
        self.assertEqual(sorted(r["task"] for r in errors), [("quick", 1000, "sorted"), ("quick", 5000, "sorted")])
        self.assertTrue(all("RecursionError" in r["exception"] for r in errors), [r["exception"] for r in errors])

        with open(project.script) as f:
            text = f.read()
        fixed, count = re.subn(r"(?m)^( *)pivot = xs\[0\].*$", r"\1pivot = xs[len(xs) // 2]", text)
        self.assertEqual(count, 1)
        with open(project.script, "w") as f:
            f.write(fixed)
        completed = project.run("local", "--workers", "2", "--resume", *FAST)
        self.assertRan(completed)
        records = project.records()
        self.assertEqual(len(records), 18)
        self.assertEqual(len({r["task"] for r in records}), 18)
        self.assertTrue(all(isinstance(r["result"], float) for r in records))

    # 13 -----------------------------------------------------------------
    def test_status_command_shows_live_and_dead_hosts(self):
        project = self.project_with("""
            def make_tasks():
                return [1]

            def calc(x):
                return x
        """)
        worker = project.start_worker("--slots", "2", "--threads")
        dead = "127.0.0.1:%d" % support.free_port()
        project.write_hosts([worker, dead])
        completed = project.run("status", "--timeout", "5")
        self.assertRan(completed, 1)
        lines = completed.output.splitlines()
        live_line = [line for line in lines if line.startswith(worker.address)]
        dead_line = [line for line in lines if line.startswith(dead)]
        self.assertEqual(len(live_line), 1, completed.output)
        self.assertEqual(len(dead_line), 1, completed.output)
        self.assertRegex(live_line[0], r"yes +idle +0/2")
        self.assertRegex(dead_line[0], r"^%s +no +no: connection refused" % re.escape(dead))

    # 14 -----------------------------------------------------------------
    def test_a_full_worker_answers_submit_with_a_busy_list(self):
        project = self.project_with("""
            def make_tasks():
                return [1]

            def calc(x):
                time.sleep(0.05)
                return x * 2
        """)
        worker = project.start_worker("--slots", "1")
        codec = oden.Codec(project.env["ODEN_KEY"].encode())
        client = oden.HostClient(oden.Host(1, "127.0.0.1", worker.port), codec, 10)
        self.addCleanup(client.close)
        hello = client.call("/hello", {})
        self.assertEqual(hello["slots"], 1)
        client.boot = hello["boot"]
        capacity = 2 * 1 + oden.WORKER_BACKLOG

        batches = [(batch, [(batch, oden.dumps(batch))], None) for batch in range(capacity + 5)]
        body, headers, ticket = codec.seal_request("/submit", {"run": "r1", "ack": [], "batches": batches},
                                                   client.boot)
        connection = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=10)
        self.addCleanup(connection.close)
        connection.request("POST", "/submit", body, headers)
        response = connection.getresponse()
        data = response.read()
        self.assertEqual(response.status, 200, data[:200])
        reply = codec.open_reply(ticket, response.status, response.getheader(oden.AUTH_HEADER), data)
        self.assertEqual(reply["accepted"], list(range(capacity)))
        self.assertEqual(reply["busy"], list(range(capacity, capacity + 5)))

        # Once results are collected and acknowledged, the busy batches fit.
        results = {}
        deadline = time.monotonic() + 60
        acks = []
        while len(results) < capacity and time.monotonic() < deadline:
            reply = client.call("/poll", {"run": "r1", "ack": acks, "wait": 2}, extra_wait=2)
            acks = [batch for batch, _ in reply["done"]]
            for batch, records in reply["done"]:
                results[batch] = pickle.loads(records[0]["result"])
        self.assertEqual(results, {batch: batch * 2 for batch in range(capacity)})
        reply = client.call("/submit", {"run": "r1", "ack": acks, "batches": batches[capacity:]})
        self.assertEqual((reply["accepted"], reply["busy"]), (list(range(capacity, capacity + 5)), []))
