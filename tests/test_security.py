"""The authenticated protocol: no unauthenticated byte is ever unpickled.

Requests are built with oden's own Codec (imported from the repository) and
sent raw, so they can be tampered with and replayed byte for byte.  Each
refused request carries a PROBE: a pickle that creates a marker file when it
is unpickled.  The marker must never appear, while a correctly signed probe
(the positive control) does create it.
"""
import collections
import http.client
import json
import os
import pickle
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request
from unittest import mock

import support

sys.path.insert(0, support.ROOT)
import oden  # noqa: E402  (the repository's oden.py: its Codec signs our requests)

SQUARES = """
    def make_tasks():
        return list(range(6))

    def calc(x):
        return x * x
"""
REFUSED = (401, 403, 409, 413)


class Probe:
    """Unpickling this creates `path`: proof that someone unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def probe_bytes(path):
    return pickle.dumps(Probe(path), oden.PICKLE_PROTOCOL)


def post(port, path, body, headers, method="POST"):
    """One request on a fresh connection: (status, reply auth header, body bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        return response.status, response.getheader(oden.AUTH_HEADER), response.read()
    finally:
        connection.close()


def get(port, path):
    return support.get(port, path, timeout=20)


def status_json(worker):
    return json.loads(get(worker.port, "/status.json")[1])


def raw_exchange(port, data, timeout=20):
    """Send raw bytes, close our sending side, return everything the worker answers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout)
    answer = b""
    try:
        with sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass                             # the worker refused early and closed: read what it said
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return answer


def status_of(answer):
    parts = answer.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


def raw_request(method, path, headers, body=b"", version=b"HTTP/1.1"):
    lines = [method + b" " + path + b" " + version] + [k + b": " + v for k, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def signed_raw(codec, path, message, boot):
    body, headers, _ = codec.seal_request(path, message, boot)
    return raw_request(b"POST", path.encode(), [(b"Host", b"127.0.0.1"), (b"Content-Length", str(len(body)).encode()),
                                                (oden.AUTH_HEADER.encode(), headers[oden.AUTH_HEADER].encode())], body)


def hello(codec, port):
    body, headers, ticket = codec.seal_request("/hello", {}, None)
    status, header, data = post(port, "/hello", body, headers)
    assert status == 200, (status, data)
    return codec.open_reply(ticket, status, header, data)


def with_env(project, changes, start):
    """Run start() with project.env changed (None removes a variable), then restore it."""
    saved = dict(project.env)
    for name, value in changes.items():
        if value is None:
            project.env.pop(name, None)
        else:
            project.env[name] = value
    try:
        return start()
    finally:
        project.env.clear()
        project.env.update(saved)


class RefusedRequestsTest(support.OdenTestCase):
    def setUp(self):
        self.job = self.project(library_code=SQUARES)
        self.key = self.job.env["ODEN_KEY"].encode()
        self.marker = self.job.path("PROBE-UNPICKLED")

    def assertRefused(self, worker, reply, statuses, reason_part):
        status, _, data = reply
        text = data.decode("utf-8", "replace")
        self.assertIn(status, statuses, text)
        self.assertTrue(text.endswith("\n") and text.count("\n") == 1 and len(text) > 5, "not one line: %r" % text)
        self.assertIn(reason_part, text)
        # the first refusal from an address is logged in full, the next ones of the same minute are
        # counted in one later line (test_attacks.RefusalLogTest)
        self.assertRegex(worker.output(), r"refused /\w+ from 127\.0\.0\.1: ",
                         "the worker did not log the refusal")
        self.assertFalse(os.path.exists(self.marker), "a refused request was unpickled (%d %s)" % (status, text))

    def test_every_unauthenticated_request_is_refused_before_unpickling(self):
        worker = self.job.start_worker("--slots", "1", "--threads", "--max-body", "4096")
        port = worker.port
        codec = oden.Codec(self.key)
        boot = hello(codec, port)["boot"]
        probe = probe_bytes(self.marker)

        # unsigned, and marked as unsigned
        self.assertRefused(worker, post(port, "/submit", probe, {}), (401,), "header")
        self.assertRefused(worker, post(port, "/submit", probe, {oden.AUTH_HEADER: oden.UNSIGNED}), (401,), "header")
        # signed with another key
        other = oden.Codec(b"another key of 32 characters....")
        body, headers, _ = other.seal_request("/submit", Probe(self.marker), boot)
        self.assertRefused(worker, post(port, "/submit", body, headers), (403,), "bad signature")
        # tampered: a benign signed message whose body is swapped for the probe, or extended by it
        body, headers, _ = codec.seal_request("/submit", {"run": "r", "batches": []}, boot)
        self.assertRefused(worker, post(port, "/submit", probe, headers), (403,), "bad signature")
        self.assertRefused(worker, post(port, "/submit", body + probe, headers), (403,), "bad signature")
        # a probe signed for /hello, sent to /submit: the path is signed too
        body, headers, _ = codec.seal_request("/hello", Probe(self.marker), boot)
        self.assertRefused(worker, post(port, "/submit", body, headers), (403,), "bad signature")
        # stale and future timestamps
        for shift in (-oden.MAX_CLOCK_SKEW - 60, oden.MAX_CLOCK_SKEW + 60):
            with mock.patch.object(oden.time, "time", return_value=time.time() + shift):
                body, headers, _ = codec.seal_request("/submit", Probe(self.marker), boot)
            self.assertRefused(worker, post(port, "/submit", body, headers), (403,), "stale")
        # meant for an earlier run (another boot id) of the worker
        body, headers, _ = codec.seal_request("/submit", Probe(self.marker), "0123456789ab")
        self.assertRefused(worker, post(port, "/submit", body, headers), (409,), "earlier run")
        # replayed: the exact same signed request twice, and an older counter after a newer one
        body, headers, _ = codec.seal_request("/poll", {"run": "r", "ack": [], "wait": 0}, boot)
        self.assertEqual(post(port, "/poll", body, headers)[0], 200)
        self.assertRefused(worker, post(port, "/poll", body, headers), (403,), "replayed")
        old_body, old_headers, _ = codec.seal_request("/submit", Probe(self.marker), boot)
        hello(codec, port)
        self.assertRefused(worker, post(port, "/submit", old_body, old_headers), (403,), "replayed")
        # oversized: refused by its Content-Length even when correctly signed
        body, headers, _ = codec.seal_request("/submit", [Probe(self.marker), "x" * 5000], boot)
        self.assertRefused(worker, post(port, "/submit", body, headers), (413,), "--max-body")

        # the worker keeps serving, and a correctly signed probe IS unpickled: the probe works
        self.assertEqual(hello(codec, port)["boot"], boot)
        self.assertFalse(os.path.exists(self.marker))
        body, headers, _ = codec.seal_request("/hello", Probe(self.marker), None)
        self.assertEqual(post(port, "/hello", body, headers)[0], 200)
        self.assertTrue(os.path.exists(self.marker), "positive control: a signed probe should be unpickled")
        self.assertEqual(worker.process.poll(), None)

    def test_request_for_one_worker_run_is_refused_by_another(self):
        """What a restarted worker (new boot id, empty replay table) sees of old traffic: 409."""
        first, second = self.job.start_workers(2, "--slots", "1", "--threads")
        codec = oden.Codec(self.key)
        boot = hello(codec, first.port)["boot"]
        body, headers, _ = codec.seal_request("/submit", {"run": "r", "batches": []}, boot)
        self.assertEqual(post(first.port, "/submit", body, headers)[0], 200)
        self.assertRefused(second, post(second.port, "/submit", body, headers), (409,), "earlier run")
        body, headers, _ = codec.seal_request("/submit", Probe(self.marker), boot)
        self.assertRefused(second, post(second.port, "/submit", body, headers), (409,), "earlier run")

    def test_worker_without_key_unpickles_anything_from_loopback(self):
        """The documented hole, as a control: no key (--insecure), no protection."""
        project = support.Project(self, library_code=SQUARES, key=False)
        worker = project.start_worker("--slots", "1", "--threads", "--insecure")
        self.assertIn("no key", worker.output())
        marker = project.path("UNSIGNED-PROBE")
        self.assertEqual(post(worker.port, "/hello", probe_bytes(marker), {oden.AUTH_HEADER: oden.UNSIGNED})[0], 200)
        self.assertTrue(os.path.exists(marker))


class FuzzTest(support.OdenTestCase):
    REQUESTS = 10000
    TIME_LIMIT = 60
    CLIENTS = 4
    REQUEST_TIMEOUT = 3         # --request-timeout: the stalled clients are cut after it

    def test_ten_thousand_bad_requests_then_a_real_job(self):
        project = self.project(library_code=SQUARES)
        worker = project.start_worker("--slots", "1", "--max-body", "65536",
                                      "--request-timeout", str(self.REQUEST_TIMEOUT))
        port = worker.port
        marker = project.path("PROBE-UNPICKLED")
        probe = probe_bytes(marker)
        codec = oden.Codec(project.env["ODEN_KEY"].encode())
        boot = hello(codec, port)["boot"]
        used = signed_raw(codec, "/poll", {"run": "fuzz", "ack": [], "wait": 0}, boot)
        self.assertEqual(status_of(raw_exchange(port, used)), 200)
        templates = [signed_raw(codec, "/hello", {}, None),
                     signed_raw(codec, "/poll", {"run": "fuzz", "ack": [], "wait": 0}, boot),
                     signed_raw(codec, "/submit", {"run": "fuzz", "batches": []}, boot)]
        slow = self.open_slow_clients(port, codec, boot)

        seed = random.randrange(2 ** 32)
        fuzzer = Fuzzer(random.Random(seed), probe, templates, used)
        results, errors = [], []
        lock = threading.Lock()
        deadline = time.monotonic() + self.TIME_LIMIT
        started = time.monotonic()

        def client():
            try:
                while time.monotonic() < deadline:
                    with lock:
                        if len(results) >= self.REQUESTS:
                            return
                        number = len(results)
                        results.append(None)
                        kind, data = fuzzer.next()
                    if number % 1000 == 999:
                        kind, data = "status", b"GET /status.json HTTP/1.1\r\nHost: x\r\n\r\n"
                    results[number] = (kind, data[:7], status_of(raw_exchange(port, data)))
            except Exception as e:          # noqa: BLE001  (reported below with the seed)
                errors.append(repr(e))

        threads = [threading.Thread(target=client) for _ in range(self.CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.TIME_LIMIT + 60)
        elapsed = time.monotonic() - started
        context = "seed %d, %d requests in %.1f s" % (seed, len(results), elapsed)
        counts = collections.Counter(r[2] for r in results)
        print("\nfuzz: %s; answers %s" % (context, sorted(counts.items(), key=str)), file=sys.stderr)
        self.assertEqual(errors, [], context)
        if elapsed < self.TIME_LIMIT:
            self.assertGreaterEqual(len(results), self.REQUESTS, context)
        self.assertGreaterEqual(len(results), 1000, context)
        accepted = [r for r in results if r[2] == 200 and not r[1].startswith(b"GET ")]
        self.assertEqual(accepted, [], "fuzzed requests were accepted: " + context)
        self.assertEqual({r[2] for r in results if r[0] == "status"}, {200}, "status stopped answering: " + context)
        self.assertFalse([r for r in results if r[2] is not None and r[2] >= 500 and r[2] != 505], context)
        self.assertFalse(os.path.exists(marker), "a fuzzed request was unpickled: " + context)
        self.assertIsNone(worker.process.poll(), context)
        log = worker.output()
        self.assertNotIn("Traceback", log, context + ":\n" + log[log.find("Traceback") - 300:][:2000])

        project.write_hosts([worker])
        completed = project.run("manager", "--timeout", "10", "--interval-polling", "0.2")
        self.assertRan(completed)
        self.assertEqual(sorted((r["task"], r["result"]) for r in project.records()), [(x, x * x) for x in range(6)])
        self.check_slow_clients_time_out(slow)
        self.assertFalse(os.path.exists(marker), context)

    def open_slow_clients(self, port, codec, boot):
        """Clients that stall: half a body, half the headers, nothing at all."""
        whole = signed_raw(codec, "/submit", {"run": "fuzz", "batches": []}, boot)
        head, body = whole.split(b"\r\n\r\n", 1)
        slow = []
        for data in (head + b"\r\n\r\n" + body[:len(body) // 2], head[:len(head) // 2], b""):
            sock = socket.create_connection(("127.0.0.1", port), 10)
            self.addCleanup(sock.close)
            sock.sendall(data)
            slow.append((sock, time.monotonic()))
        return slow

    def check_slow_clients_time_out(self, slow):
        for sock, opened in slow:
            with sock:
                # cut by --request-timeout, well before the 30 s a handler's socket waits at most
                sock.settimeout(max(1.0, opened + self.REQUEST_TIMEOUT + 20 - time.monotonic()))
                try:
                    answer = sock.recv(65536)
                except ConnectionResetError:
                    answer = b""
                except socket.timeout:
                    self.fail("a stalled client was not cut after --request-timeout %d"
                              % self.REQUEST_TIMEOUT)
                self.assertNotEqual(status_of(answer), 200)
                self.assertGreater(time.monotonic() - opened, self.REQUEST_TIMEOUT - 0.5)


class Fuzzer:
    """Random and mutated requests; none of them is a valid signed request."""

    METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"post", b"P\x00ST",
               b"GET POST", b"\xff\xfe", b"X" * 300]
    PATHS = [b"/", b"/status", b"/status.json", b"/hello", b"/submit", b"/poll", b"/hello?x=1", b"//hello",
             b"/../../etc/passwd", b"*", b"http://127.0.0.1/hello", b"/%00", b"/" + b"a" * 5000, b"", b"/\xff"]
    LENGTHS = [b"\xb2", b"-1", b"1e3", b"0x10", b" 12", b"12 ", b"+5", b"", b"9" * 40, b"4294967296", b"65537",
               b"0", b"1,1", b"\xd9\xa3", b"3.5"]

    def __init__(self, rng, probe, templates, used):
        self.rng, self.probe, self.templates, self.used = rng, probe, templates, used
        self.kinds = [self.random_bytes, self.truncated, self.garbage_headers, self.random_method_and_path,
                      self.huge_length, self.mutated_signed, self.probe_in_signed, self.replayed]

    def next(self):
        kind = self.rng.choice(self.kinds)
        return kind.__name__, kind()

    def random_bytes(self):
        return bytes(self.rng.getrandbits(8) for _ in range(self.rng.randrange(1, 600)))

    def truncated(self):
        whole = self.rng.choice(self.templates)
        return whole[:self.rng.randrange(1, len(whole))]

    def garbage_headers(self):
        rng = self.rng
        headers = [(b"Content-Length", rng.choice(self.LENGTHS))]
        for _ in range(rng.randrange(0, 6)):
            headers.append(rng.choice([
                (b"X-Oden-Auth", b"v1 " + b" ".join(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 20)))
                                                   for _ in range(rng.randrange(0, 8)))),
                (b"X-Oden-Auth", b"v1 s 1 1 - " + b"0" * 64),
                (b"Transfer-Encoding", b"chunked"),
                (b"Expect", b"100-continue"),
                (b"No-Colon-Here", b""),
                (b"X-" + b"h" * rng.randrange(1, 70000), b"v"),
                (bytes(rng.getrandbits(8) for _ in range(8)), bytes(rng.getrandbits(8) for _ in range(8))),
                (b" folded", b"line")]))
        if rng.random() < 0.05:
            headers += [(b"X-Many", b"1")] * 120
        return raw_request(b"POST", rng.choice(self.PATHS[3:6]), headers, self.probe)

    def random_method_and_path(self):
        rng = self.rng
        body = self.probe if rng.random() < 0.5 else b""
        headers = [(b"Host", b"x")] + ([(b"Content-Length", str(len(body)).encode())] if body else [])
        version = rng.choice([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b"HTTP/1.1.1", b"FOO"])
        return raw_request(rng.choice(self.METHODS), rng.choice(self.PATHS), headers, body, version)

    def huge_length(self):
        length = str(self.rng.choice([65537, 2 ** 31, 2 ** 64, 10 ** 30])).encode()
        return raw_request(b"POST", self.rng.choice(self.PATHS[3:6]), [(b"Content-Length", length)], self.probe)

    def mutated_signed(self):
        """A valid signed request with one byte of its signed part (request line, auth header, body) changed."""
        rng = self.rng
        whole = rng.choice(self.templates)
        head, body = whole.split(b"\r\n\r\n", 1)
        auth = head.index(b"X-Oden-Auth: ") + len(b"X-Oden-Auth: ")
        signed = [i for i in range(len(head)) if i >= auth or i < head.index(b" HTTP/")]
        data = bytearray(whole)
        if rng.random() < 0.5 or not body:
            position = rng.choice(signed)
        else:
            position = len(head) + 4 + rng.randrange(len(body))
        new = (data[position] + rng.randrange(1, 256)) % 256
        while position < len(head) and bytes([new]).decode("latin-1").isspace():
            # http.server splits the request line with str.split(): "POST\x1e/hello" still means
            # "POST /hello", an unchanged (so validly signed) request. Mutate to a non-space.
            new = (new + 1) % 256
        data[position] = new
        return bytes(data)

    def probe_in_signed(self):
        """A valid signed head with the probe as (or appended to, or spliced into) its body."""
        rng = self.rng
        head, body = rng.choice(self.templates).split(b"\r\n\r\n", 1)
        cut = rng.randrange(len(body) + 1)
        new = rng.choice([self.probe, body + self.probe, body[:cut] + self.probe + body[cut:]])
        head = head.replace(b"Content-Length: %d" % len(body), b"Content-Length: %d" % len(new))
        return head + b"\r\n\r\n" + new

    def replayed(self):
        return self.used


class HttpSurfaceTest(support.OdenTestCase):
    def test_methods_paths_lengths_and_a_stalled_client(self):
        project = self.project(library_code=SQUARES)
        worker = project.start_worker("--slots", "1", "--threads")
        port = worker.port
        codec = oden.Codec(project.env["ODEN_KEY"].encode())
        for method, path in (("PUT", "/hello"), ("DELETE", "/status"), ("PATCH", "/submit")):
            status, _, data = post(port, path, b"x", {}, method=method)
            self.assertEqual((status, data.count(b"\n")), (405, 1), data)
        for method, path in (("GET", "/nope"), ("POST", "/nope"), ("POST", "/hello/")):
            body, headers, _ = codec.seal_request(path, {}, None)
            status, _, data = post(port, path, body, headers, method=method)
            self.assertEqual((status, data.count(b"\n")), (404, 1), data)
        answer = raw_exchange(port, b"POST /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(status_of(answer), 411, answer)
        answer = raw_exchange(port, b"\x16\x03\x01garbage\r\n\r\n")  # http.server answers it HTTP/0.9 style
        self.assertTrue(answer.startswith(b"Bad request") and answer.count(b"\n") == 1, answer)

        whole = signed_raw(codec, "/submit", {"run": "r", "batches": []}, hello(codec, port)["boot"])
        head, body = whole.split(b"\r\n\r\n", 1)
        stalled = socket.create_connection(("127.0.0.1", port), 10)
        self.addCleanup(stalled.close)
        stalled.sendall(head + b"\r\n\r\n" + body[:len(body) // 2])
        for _ in range(3):                       # others are served while it stalls
            self.assertEqual(get(port, "/status")[0], 200)
            self.assertIn("boot", hello(codec, port))
        project.write_hosts([worker])
        self.assertRan(project.run("manager", "--timeout", "10", "--interval-polling", "0.2"))
        self.assertEqual(len(project.records()), 6)
        stalled.settimeout(0.5)
        with self.assertRaises(socket.timeout):  # still waiting for the rest of its body, unanswered
            stalled.recv(1)
        self.assertEqual(oden.WorkerHandler.timeout, oden.REQUEST_READ_TIMEOUT)

    def test_status_pages_need_no_key_and_show_no_task_content(self):
        project = self.project(library_code="""
            import time

            def make_tasks():
                return ["zebra-task-5e1f"]

            def calc(task):
                print("zebra-printed-77c2")
                time.sleep(2)
                return "zebra-result-a9d0"
        """)
        worker = project.start_worker("--slots", "1")
        project.write_hosts([worker])
        manager = project.popen("manager", "--timeout", "10", "--interval-polling", "0.2")
        pages = []
        deadline = time.monotonic() + 120
        while manager.poll() is None and time.monotonic() < deadline:
            for path in ("/", "/status", "/status.json"):
                status, text = get(worker.port, path)
                self.assertEqual(status, 200)
                pages.append(text)
            time.sleep(0.1)
        output = manager.communicate(timeout=60)[0].decode()
        self.assertEqual(manager.returncode, 0, output)
        for path in ("/", "/status", "/status.json"):
            pages.append(get(worker.port, path)[1])
        self.assertEqual(project.records()[0]["result"], "zebra-result-a9d0")
        self.assertEqual(project.records()[0]["output"].strip(), "zebra-printed-77c2")
        self.assertTrue(any('"state": "busy"' in page for page in pages), "never saw the task running")
        self.assertEqual(json.loads(pages[-1])["done"], 1)
        for page in pages:
            self.assertNotIn("zebra", page)
            self.assertNotIn(project.env["ODEN_KEY"], page)


class KeyTest(support.OdenTestCase):
    GIVE_UP = ("--give-up-after", "2", "--timeout", "3", "--interval-polling", "0.2")

    def assertNothingRan(self, project, worker):
        self.assertEqual(project.files("*.pickle"), [])
        state = status_json(worker)
        self.assertEqual((state["done"], state["failed"]), (0, 0))

    def test_key_mismatch_is_named_and_nothing_runs(self):
        project = self.project(library_code=SQUARES)
        worker = with_env(project, {"ODEN_KEY": "a-different-key-for-the-worker"},
                          lambda: project.start_worker("--slots", "1", "--threads"))
        project.write_hosts([worker])
        completed = project.run("manager", *self.GIVE_UP)
        self.assertRan(completed, 2)          # a refusal only the user can fix: no waiting it out
        self.assertIn("oden.key", completed.output)
        self.assertIn("bad signature", completed.output)
        self.assertIn("refused /hello from 127.0.0.1: bad signature", worker.output())
        self.assertNothingRan(project, worker)

    def test_manager_refuses_a_worker_without_key(self):
        project = self.project(library_code=SQUARES)
        worker = with_env(project, {"ODEN_KEY": None},
                          lambda: project.start_worker("--slots", "1", "--threads", "--insecure"))
        self.assertIn("no key", worker.output())      # with --insecure it starts, with a warning
        project.write_hosts([worker])
        completed = project.run("manager", *self.GIVE_UP)
        self.assertRan(completed, 2)
        self.assertIn("answers without a key", completed.output)
        self.assertNothingRan(project, worker)

    def test_worker_without_key_refuses_a_non_loopback_address(self):
        project = self.project(library_code=SQUARES, key=False)
        completed = project.run("worker", "--bind", "0.0.0.0", "--port", "0", "--slots", "1", "--threads",
                                timeout=30)
        self.assertRan(completed, 2)
        self.assertNotIn("listening", completed.output)
        line = completed.output.strip()
        self.assertEqual(line.count("\n"), 0, line)
        self.assertTrue(line.startswith("oden: error: "), line)
        for needed in ("init", "oden.key", "--insecure"):
            self.assertIn(needed, line)

    def test_init_creates_a_private_key_once(self):
        project = self.project(library_code=SQUARES, key=False)
        path = project.path("oden.key")
        self.assertRan(project.run("init"))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(path) as f:
            key = f.read()
        self.assertGreaterEqual(len(key.strip()), 32)
        again = project.run("init")
        self.assertRan(again)
        self.assertIn("exists", again.output)
        with open(path) as f:
            self.assertEqual(f.read(), key)

    def test_first_manager_run_creates_the_key_and_says_to_copy_it(self):
        project = self.project(library_code=SQUARES, key=False)
        project.write_hosts(["127.0.0.1:%d" % support.free_port()])
        completed = project.run("manager", "--give-up-after", "1", "--timeout", "2")
        self.assertRan(completed, 3)
        self.assertIn("created the key file", completed.output)
        self.assertIn("copy it", completed.output)
        self.assertEqual(os.stat(project.path("oden.key")).st_mode & 0o777, 0o600)
        worker = project.start_worker("--slots", "1", "--threads")     # finds the new oden.key next to it
        self.assertNotIn("no key", worker.output())
        project.write_hosts([worker])
        self.assertRan(project.run("manager", "--timeout", "10", "--interval-polling", "0.2"))
        self.assertEqual(len(project.records()), 6)


class SameCodeTest(support.OdenTestCase):
    def test_worker_with_other_code_gets_no_tasks(self):
        project = self.project(library_code=SQUARES)
        other = support.Project(self, library_code=SQUARES)
        with open(other.path("oden.py"), "a") as f:
            f.write("\n# an edited comment: otherwise the same file\n")
        stale = with_env(other, {"ODEN_KEY": project.env["ODEN_KEY"]},
                         lambda: other.start_worker("--slots", "1", "--threads", "--no-push"))
        current = project.start_worker("--slots", "1", "--threads")
        project.write_hosts([stale, current])
        completed = project.run("manager", "--timeout", "10", "--interval-polling", "0.2")
        self.assertRan(completed)
        self.assertIn("worker 1 runs other code (1 files differ: oden.py) and refuses pushes (it was "
                      "started with --no-push): copy the project there yourself", completed.output)
        self.assertEqual({r["host"] for r in project.records()}, {current.address})
        self.assertEqual(len(project.records()), 6)
        self.assertEqual(status_json(stale)["done"], 0)


OPENSSL_CONFIG = """
[req]
distinguished_name = dn
x509_extensions = ext
prompt = no
[dn]
CN = 127.0.0.1
[ext]
subjectAltName = IP:127.0.0.1
basicConstraints = critical,CA:TRUE
"""


class TlsTest(support.OdenTestCase):
    def setUp(self):
        if shutil.which("openssl") is None:
            self.skipTest("openssl is not installed: cannot make a test certificate")
        folder = tempfile.mkdtemp(prefix="oden-tls-")
        self.addCleanup(shutil.rmtree, folder, True)
        config = os.path.join(folder, "openssl.cnf")
        with open(config, "w") as f:
            f.write(OPENSSL_CONFIG)
        self.cert, self.key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                               "-keyout", self.key, "-out", self.cert, "-config", config],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        if made.returncode != 0:
            self.skipTest("openssl could not make a test certificate: %s" % made.stdout.decode()[-300:])

    def test_job_over_tls_and_plain_manager_gets_a_clear_error(self):
        project = self.project(library_code=SQUARES)
        worker = project.start_worker("--slots", "1", "--threads", "--certfile", self.cert, "--keyfile", self.key)
        self.assertIn("listening on https://", worker.output())
        project.write_hosts([worker])
        self.assertRan(project.run("manager", "--cafile", self.cert, "--timeout", "10", "--interval-polling", "0.2"))
        self.assertEqual(sorted(r["result"] for r in project.records()), [x * x for x in range(6)])
        context = ssl.create_default_context(cafile=self.cert)
        with urllib.request.urlopen("https://127.0.0.1:%d/status.json" % worker.port, timeout=20,
                                    context=context) as response:
            self.assertEqual(json.loads(response.read().decode())["done"], 6)

        plain = project.run("manager", "--yes", "--name", "plain", "--give-up-after", "2", "--timeout", "3",
                            timeout=90)
        self.assertRan(plain, 3)
        self.assertIn("TLS", plain.output)
        self.assertEqual(project.files("plain*.pickle"), [])


if __name__ == "__main__":
    unittest.main()
