"""Issue 11: bounded under attack.  No unauthenticated byte costs a worker memory,
floods of connections and forged requests cost it bounded threads, descriptors and
log lines, and no peer can stall the manager or reach its terminal.

Each attack runs against a real worker process (memory and threads read from
/proc) or, for the manager's side, a fake worker: a thread in this test that
answers on a free loopback port the way a broken or hostile host would.  Each test
prints the figures it measured (python3 -m unittest tests.test_attacks -v).
"""
import contextlib
import errno
import logging
import os
import re
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import time
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import support  # noqa: E402

sys.path.insert(0, support.ROOT)
import oden  # noqa: E402  (the repository's oden.py: its Codec signs our requests)
import test_security  # noqa: E402

SQUARES = test_security.SQUARES
QUICK = ("--timeout", "10", "--interval-polling", "0.2")


def figure(text, *args):
    print("\n  figure: " + text % args, file=sys.stderr, flush=True)


class Probe:
    """Unpickling this creates `path`: proof that someone unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def head(path, headers, method=b"POST", host=b"127.0.0.1"):
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: " + host]
    lines += [k + b": " + v for k, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def signed(codec, path, message, boot, extra=()):
    """(head, body) of a correctly signed request: the head alone proves the key."""
    body, headers, _ = codec.seal_request(path, message, boot)
    return head(path.encode(), [(b"Content-Length", str(len(body)).encode()),
                                (oden.AUTH_HEADER.encode(), headers[oden.AUTH_HEADER].encode())]
                + list(extra)), body


def exchange(port, data, timeout=10, shut=True):
    """Send raw bytes, then read the whole answer (until the worker closes)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout)
    answer = b""
    with sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            if shut:
                sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
    return answer


def status_of(answer):
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    return int(match.group(1)) if match else None


def body_of(answer):
    return answer.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in answer else b""


def hello(codec, port):
    body, headers, ticket = codec.seal_request("/hello", {}, None)
    auth = headers[oden.AUTH_HEADER].encode()
    answer = exchange(port, head(b"/hello", [(b"Content-Length", str(len(body)).encode()),
                                             (oden.AUTH_HEADER.encode(), auth)]) + body)
    assert status_of(answer) == 200, answer[:300]
    auth = re.search(rb"X-Oden-Auth: ([^\r]+)", answer).group(1).decode()
    return codec.open_reply(ticket, 200, auth, body_of(answer))


class Crowd:
    """`count` connections to a worker that send a request line a byte at a time, one byte
    each per `every` s, and reconnect when the worker closes them: an attacker holding as
    many connections as it can.  Runs in a thread until stop(); every loop is bounded."""

    LINE = b"POST /submit HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 4000

    def __init__(self, port, count, every=1.0, drip=True, reconnect=True):
        self.port, self.count, self.every = port, count, every
        self.drip, self.reconnect = drip, reconnect
        self.socks = [None] * count
        self.sent = [0] * count
        self.connects = self.cut = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._round(first=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(30)
        for sock in self.socks:
            if sock is not None:
                sock.close()

    def _run(self):
        for _ in range(600):
            if self.stopping.wait(self.every):
                return
            self._round()

    def _round(self, first=False):
        for number in range(self.count):
            sock = self.socks[number]
            if sock is None:
                if not (first or self.reconnect):
                    continue
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", self.port))
                self.socks[number], self.sent[number] = sock, 0
                self.connects += 1
            elif self.drip:
                try:
                    byte = self.LINE[self.sent[number] % len(self.LINE):][:1]
                    self.sent[number] += sock.send(byte)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as e:
                    if e.errno == errno.ENOTCONN:        # still connecting
                        continue
                    sock.close()
                    self.socks[number] = None
                    self.cut += 1


class WorkerMemoryTest(support.OdenTestCase):
    MAX_BODY = 16 * 2 ** 20
    CONNECTIONS = 8

    def settled_rss(self, worker, seconds=1.5):
        """The worker's largest RSS over `seconds` (MiB)."""
        peak, deadline = 0.0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            peak = max(peak, support.rss_mib(worker.process.pid))
            time.sleep(0.05)
        return peak

    def send_bodies(self, port, heads, body, answer_first=False):
        """Send each head and all of `body` but its last byte, on a connection each, at once
        (with answer_first, wait up to 3 s for an answer to the head before the body);
        return the answers that came (None: none within 3 s)."""
        answers = [None] * len(heads)

        def send(number):
            sock = socket.create_connection(("127.0.0.1", port), 10)
            self.addCleanup(sock.close)
            sock.settimeout(3)
            with contextlib.suppress(OSError):
                sock.sendall(heads[number])
                if answer_first:
                    answers[number] = sock.recv(4096)
            with contextlib.suppress(OSError):
                sock.sendall(body[:-1])
                if not answer_first:
                    answers[number] = sock.recv(4096)

        threads = [threading.Thread(target=send, args=(n,)) for n in range(len(heads))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return answers

    def test_bodies_of_requests_that_prove_no_key_are_never_read(self):
        project = self.project(library_code=SQUARES)
        worker = project.start_worker("--slots", "1", "--threads", "--max-body", str(self.MAX_BODY))
        idle = self.settled_rss(worker, 0.5)
        forged = "v2 s 1 %d - %s %s" % (time.time(), "0" * 64, "0" * 64)
        heads = [head(b"/submit", [(b"Content-Length", str(self.MAX_BODY).encode()),
                                   (oden.AUTH_HEADER.encode(), forged.encode())])]
        heads *= self.CONNECTIONS
        answers = self.send_bodies(worker.port, heads, b"\0" * self.MAX_BODY, answer_first=True)
        attacked = self.settled_rss(worker)
        figure("%d unsigned requests declaring %d MiB each: worker RSS %.0f MiB idle, %.0f MiB "
               "under attack", self.CONNECTIONS, self.MAX_BODY >> 20, idle, attacked)
        self.assertLess(attacked - idle, 24, "the worker read bodies of requests proving no key")
        self.assertEqual([status_of(a or b"") for a in answers], [403] * self.CONNECTIONS, answers)

    def test_signed_bodies_share_a_reading_room_of_two_max_bodies(self):
        project = self.project(library_code=SQUARES)
        worker = project.start_worker("--slots", "1", "--threads", "--max-body", str(self.MAX_BODY))
        key = project.env["ODEN_KEY"].encode()
        boot = hello(oden.Codec(key), worker.port)["boot"]
        message = {"run": "r", "batches": [], "pad": b"x" * (self.MAX_BODY - 1000)}
        requests = [signed(oden.Codec(key), "/submit", message, boot)
                    for _ in range(self.CONNECTIONS)]
        heads, body = [h for h, _ in requests], requests[0][1]
        idle = self.settled_rss(worker, 0.5)
        self.send_bodies(worker.port, heads, body)
        attacked = self.settled_rss(worker)
        figure("%d signed requests of %d MiB, each stalled before its last byte: worker RSS %.0f "
               "MiB idle, %.0f MiB while they wait", self.CONNECTIONS, len(body) >> 20, idle,
               attacked)
        self.assertLess(attacked - idle, 2 * len(body) / 2 ** 20 + 16,
                        "more than 2 x --max-body being read")
        self.assertIn("boot", hello(oden.Codec(key), worker.port))


class ConnectionFloodTest(support.OdenTestCase):
    def test_a_manager_gets_through_300_dripping_connections_at_a_low_open_file_limit(self):
        project = self.project(library_code=SQUARES)
        worker = support.start_worker_with_open_files(project, 128, "--slots", "1")
        match = re.search(r"room for (\d+) connections", worker.output())
        limit = int(match.group(1)) if match else None
        pid = worker.process.pid
        project.write_hosts([worker])
        with Crowd(worker.port, 300) as crowd:
            threads = support.thread_count(pid)
            cpu = support.cpu_seconds(pid)
            window = time.monotonic()
            while time.monotonic() - window < 3:
                threads = max(threads, support.thread_count(pid))
                time.sleep(0.1)
            busy = (support.cpu_seconds(pid) - cpu) / (time.monotonic() - window)
            started = time.monotonic()
            completed = project.run("manager", "--give-up-after", "30", *QUICK, timeout=120)
            took = time.monotonic() - started
            figure("300 connections dripping a request line (%d connects, %d cut), ulimit -n 128: "
                   "worker serves %s at once, %d threads at most, %.0f %% CPU; a manager's job "
                   "took %.1f s (exit %d)", crowd.connects, crowd.cut, limit, threads, 100 * busy,
                   took, completed.returncode)
        self.assertIsNotNone(limit, worker.output())
        self.assertRan(completed)
        self.assertEqual(sorted(r["result"] for r in project.records()), [x * x for x in range(6)])
        self.assertLess(threads, limit + 20)
        self.assertLess(busy, 0.6, "the worker's accept loop spins")
        self.assertIsNone(worker.process.poll())
        self.assertNotIn("Traceback", worker.output())

    def test_threads_and_memory_stay_bounded_under_400_idle_connections(self):
        project = self.project(library_code=SQUARES)
        worker = project.start_worker("--slots", "1", "--threads")
        pid = worker.process.pid
        idle_threads, idle_rss = support.thread_count(pid), support.rss_mib(pid)
        for _ in range(400):                     # one by one: a burst overflows the listen backlog
            self.addCleanup(socket.create_connection(("127.0.0.1", worker.port), 10).close)
        peak, rss, deadline = 0, 0, time.monotonic() + 1.5
        while time.monotonic() < deadline:
            peak = max(peak, support.thread_count(pid))
            rss = max(rss, support.rss_mib(pid))
            time.sleep(0.1)
        status = exchange(worker.port, b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        figure("400 idle connections: worker threads %d idle, %d at most; RSS %.0f MiB idle, "
               "%.0f MiB at most", idle_threads, peak, idle_rss, rss)
        # Bounded, not 400: at most MAX_CONNECTIONS handlers, plus those of evicted idle
        # connections still on their way out (a few dozen at most on a loaded machine).
        self.assertLess(peak, oden.MAX_CONNECTIONS + idle_threads + 48)
        self.assertLess(rss - idle_rss, 64)
        self.assertEqual(status_of(status), 200, status)

    def test_idle_connections_are_closed_first_for_room(self):
        project = self.project(library_code=SQUARES)
        worker = project.start_worker("--slots", "1", "--threads", "--max-connections", "4")
        threads = support.thread_count(worker.process.pid)
        slow = self.connect(worker)                      # the oldest: a request head in progress
        slow.sendall(b"POST /submit HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        idle = [self.connect(worker) for _ in range(3)]
        self.wait_for(lambda: support.thread_count(worker.process.pid) >= threads + 4,
                      "4 handler threads")
        for _ in range(4):                               # each new one closes the longest idle one
            idle.append(self.connect(worker))
            self.wait_for(lambda: not self.is_open(idle[0]), "the longest idle connection closed")
            self.assertTrue(all(self.is_open(sock) for sock in idle[1:]))
            idle.pop(0)
        self.assertTrue(self.is_open(slow), "a request in progress was closed before the idle ones")
        status = exchange(worker.port, b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertEqual(status_of(status), 200, status)

    def connect(self, worker):
        sock = socket.create_connection(("127.0.0.1", worker.port), 10)
        self.addCleanup(sock.close)
        return sock

    def wait_for(self, condition, what, seconds=5):
        deadline = time.monotonic() + seconds
        while not condition():
            self.assertLess(time.monotonic(), deadline, "waited %d s for %s" % (seconds, what))
            time.sleep(0.05)

    def is_open(self, sock):
        sock.settimeout(0.05)
        try:
            return sock.recv(1) != b""
        except socket.timeout:
            return True
        except OSError:
            return False

    def test_a_request_dripped_a_byte_at_a_time_is_cut_by_its_deadline(self):
        project = self.project(library_code=SQUARES)
        worker = project.start_worker("--slots", "1", "--threads", "--request-timeout", "2")
        sock = socket.create_connection(("127.0.0.1", worker.port), 10)
        self.addCleanup(sock.close)
        started = time.monotonic()
        cut = None
        for byte in Crowd.LINE[:200]:           # a byte every 0.2 s: each read quick, the whole not
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                cut = time.monotonic() - started
                break
            sock.settimeout(0.2)
            try:
                if sock.recv(1) == b"":
                    cut = time.monotonic() - started
                    break
            except socket.timeout:
                pass
            except OSError:
                cut = time.monotonic() - started
                break
        figure("a request line dripped at 5 bytes/s: cut after %s s (--request-timeout 2)",
               cut and round(cut, 1))
        self.assertIsNotNone(cut, "a dripping client held its connection for 40 s")
        self.assertLess(cut, 4)


class AcceptFailureTest(unittest.TestCase):
    """A fast layer: a WorkerServer in this process whose accept() fails for want of descriptors."""

    def test_a_failing_accept_backs_off_instead_of_spinning(self):
        server = oden.WorkerServer(("127.0.0.1", 0), None, oden.Codec(b"k" * 32), None, 1000)
        self.addCleanup(server.server_close)
        pending = socket.create_connection(server.server_address, 10)    # the listener: readable
        self.addCleanup(pending.close)
        calls = []

        def accept(_):
            calls.append(time.monotonic())
            raise OSError(errno.EMFILE, "Too many open files")

        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        with mock.patch.object(socketserver.TCPServer, "get_request", accept), \
                self.assertLogs("oden", logging.WARNING) as logged:
            thread.start()
            time.sleep(1.5)            # the time the accept loop runs: nothing to wait for instead
            server.shutdown()
            thread.join(10)
        figure("accept failing with EMFILE for 1.5 s: %d calls", len(calls))
        self.assertLess(len(calls), 20, "the accept loop spins")
        self.assertEqual(len(logged.records), 1, [r.getMessage() for r in logged.records])
        self.assertIn("cannot accept connections (Too many open files)",
                      logged.records[0].getMessage())


class RefusalLogTest(support.OdenTestCase):
    def test_a_flood_of_forged_requests_is_one_log_line_a_minute(self):
        project = self.project(library_code=SQUARES)
        worker = project.start_worker("--slots", "1", "--threads")
        codec = oden.Codec(b"not the worker's key, but long enough")
        forged = [head(b"/hello", [(b"Content-Length", b"5")]) + b"hello",
                  head(b"/submit", [(b"Content-Length", b"99999999999")]),
                  b"".join(signed(codec, "/poll", {}, "x"))]
        sent = []
        deadline = time.monotonic() + 3

        def client():
            while time.monotonic() < deadline:
                exchange(worker.port, forged[len(sent) % len(forged)])
                sent.append(1)

        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(30)
        lines = [line for line in worker.output().splitlines() if "refused" in line]
        figure("%d forged requests from 4 clients in 3 s: %d log lines", len(sent), len(lines))
        self.assertGreater(len(sent), 100)
        self.assertEqual(len(lines), 1, lines[:5])

    def test_the_refusals_of_a_minute_are_counted_in_one_line(self):
        refusals = oden.Refusals(every=60)
        now = [1000.0]
        with mock.patch.object(oden.time, "monotonic", lambda: now[0]), \
                self.assertLogs("oden", logging.WARNING) as logged:
            for second in range(60):
                now[0] = 1000.0 + second
                refusals.note("10.0.0.9", "refused /submit from 10.0.0.9: bad signature %d"
                              % second)
                refusals.note("10.0.0.7", "refused /hello from 10.0.0.7: stale request")
                refusals.flush(now[0])
            now[0] = 1061.0
            refusals.flush(now[0])
            now[0] = 1122.0
            refusals.flush(now[0])           # a quiet minute: nothing to say, addresses forgotten
            refusals.note("10.0.0.9", "refused /poll from 10.0.0.9: replayed request")
        self.assertEqual([record.getMessage() for record in logged.records], [
            "refused /submit from 10.0.0.9: bad signature 0",
            "refused /hello from 10.0.0.7: stale request",
            "59 more refusals (10.0.0.9) in the last 61 s, the latest: "
            "refused /submit from 10.0.0.9: bad signature 59",
            "59 more refusals (10.0.0.7) in the last 61 s, the latest: "
            "refused /hello from 10.0.0.7: stale request",
            "refused /poll from 10.0.0.9: replayed request"])


class BrowserTest(support.OdenTestCase):
    def test_a_browser_post_is_refused_even_when_signed(self):
        project = self.project(library_code=SQUARES)
        worker = project.start_worker("--slots", "1", "--threads")
        key = project.env["ODEN_KEY"].encode()
        marker = project.path("PROBE")
        for extra in ([(b"Origin", b"https://evil.example")], [(b"Sec-Fetch-Site", b"cross-site")]):
            request = signed(oden.Codec(key), "/hello", Probe(marker), None, extra)
            answer = exchange(worker.port, b"".join(request))
            self.assertEqual(status_of(answer), 403, answer)
            self.assertIn(b"browser", body_of(answer))
        self.assertFalse(os.path.exists(marker))

    def test_a_worker_without_key_starts_only_with_insecure_and_never_for_a_browser(self):
        project = self.project(library_code=SQUARES, key=False)
        refused = project.run("worker", "--bind", "127.0.0.1", "--port", "0", "--slots", "1",
                              "--threads", timeout=30)
        self.assertRan(refused, 2)
        self.assertIn("init", refused.output)
        self.assertIn("--insecure", refused.output)

        worker = project.start_worker("--slots", "1", "--threads", "--insecure")
        marker = project.path("PROBE")
        probe = oden.dumps(Probe(marker))
        length = (b"Content-Length", str(len(probe)).encode())
        page = [(b"Content-Type", b"text/plain"), (b"Origin", b"http://evil.example"), length]
        oden_like = [(oden.AUTH_HEADER.encode(), b"none"), length]
        for headers, host, status in ((page, b"127.0.0.1", 403),        # a cross-site form, fetch
                                      (page[:1] + [length], b"127.0.0.1", 401),   # no oden header
                                      (oden_like, b"evil.example:80", 403)):      # DNS rebinding
            answer = exchange(worker.port, head(b"/hello", headers, host=host) + probe)
            self.assertEqual(status_of(answer), status, (headers, answer))
        self.assertFalse(os.path.exists(marker), "a browser's request ran")
        answer = exchange(worker.port, head(b"/hello", oden_like) + probe)
        self.assertEqual(status_of(answer), 200, answer)
        self.assertTrue(os.path.exists(marker), "positive control: --insecure serves a manager")


class RequestHeadTest(support.OdenTestCase):
    def setUp(self):
        self.job = self.project(library_code=SQUARES)
        self.worker = self.job.start_worker("--slots", "1", "--threads")
        self.key = self.job.env["ODEN_KEY"].encode()

    def test_a_content_length_of_5000_digits_gets_one_line(self):
        answer = exchange(self.worker.port, head(b"/submit", [(b"Content-Length", b"9" * 5000)]))
        self.assertEqual(status_of(answer), 413, answer[:300])
        self.assertEqual(body_of(answer).count(b"\n"), 1, answer[:300])
        self.assertLess(len(body_of(answer)), 200)
        self.assertIn(b"5000-digit", body_of(answer))
        self.assertNotIn("Traceback", self.worker.output())

    def test_a_head_that_proves_no_key_is_answered_before_its_body_comes(self):
        other = oden.Codec(b"not the worker's key, but long enough")
        for data in (head(b"/submit", [(b"Content-Length", b"1000")]),
                     signed(other, "/submit", {"run": "r"}, "x")[0]):
            answer = exchange(self.worker.port, data, timeout=5, shut=False)   # no body follows
            self.assertIn(status_of(answer), (401, 403), answer)

    def test_a_body_other_than_the_signed_one_is_refused(self):
        marker = self.job.path("PROBE")
        boot = hello(oden.Codec(self.key), self.worker.port)["boot"]
        probe = oden.dumps(Probe(marker))
        message = {"run": "r", "ack": [], "wait": 0, "pad": "x" * len(probe)}
        signed_head, benign = signed(oden.Codec(self.key), "/poll", message, boot)
        probe += b"." * (len(benign) - len(probe))           # unpickling stops at the STOP opcode
        self.assertEqual(len(benign), len(probe))
        answer = exchange(self.worker.port, signed_head + probe)
        self.assertEqual(status_of(answer), 403, answer)
        self.assertIn(b"not the one signed", body_of(answer))
        self.assertFalse(os.path.exists(marker))

    def test_a_request_head_over_16_kib_is_refused(self):
        padding = [(b"X-Pad-%d" % number, b"p" * 1000) for number in range(20)]
        data = head(b"/submit", padding + [(b"Content-Length", b"5")]) + b"hello"
        answer = exchange(self.worker.port, data)
        self.assertEqual(status_of(answer), 431, answer[:300])
        self.assertEqual(body_of(answer).count(b"\n"), 1)

    def test_a_stale_request_says_how_far_apart_the_clocks_are(self):
        boot = hello(oden.Codec(self.key), self.worker.port)["boot"]
        with mock.patch.object(oden.time, "time", return_value=time.time() - 412):
            message = {"run": "r", "ack": [], "wait": 0}
            data = b"".join(signed(oden.Codec(self.key), "/poll", message, boot))
        answer = exchange(self.worker.port, data)
        self.assertEqual(status_of(answer), 403, answer)
        self.assertRegex(body_of(answer).decode(),
                         r"the worker's clock is 41[123] s ahead of the manager's")


class KeyWarningTest(support.OdenTestCase):
    def test_a_key_file_others_can_read_is_named_with_chmod(self):
        project = self.project(library_code=SQUARES, key=False)
        self.assertRan(project.run("init"))
        os.chmod(project.path("oden.key"), 0o644)
        worker = project.start_worker("--slots", "1", "--threads")
        self.assertIn("chmod 600", worker.output())
        os.chmod(project.path("oden.key"), stat.S_IRUSR | stat.S_IWUSR)
        self.assertNotIn("chmod", project.start_worker("--slots", "1", "--threads").output())

    def test_a_key_of_sixteen_equal_characters_is_named_with_init(self):
        project = self.project(library_code=SQUARES)
        project.env["ODEN_KEY"] = "a" * 16
        worker = project.start_worker("--slots", "1", "--threads")
        self.assertRegex(worker.output(), r"easy to guess.*oden.py init")


class FakeWorker:
    """A thread on a free loopback port that reads each request and hands it to
    answer(sock, request); stands in for a broken or hostile host in hosts.txt."""

    def __init__(self, test, answer):
        self.answer = answer
        self.requests = []
        self.sent = 0                            # bytes of answers sent, all connections
        self.stopping = threading.Event()
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.address = "127.0.0.1:%d" % self.port
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()
        test.addCleanup(self.close)

    def close(self):
        self.stopping.set()
        for thread in list(self.threads):
            thread.join(10)
        self.server.close()

    def _accept(self):
        while not self.stopping.is_set():
            try:
                sock, _ = self.server.accept()
            except OSError:
                continue
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, sock):
        with sock:
            sock.settimeout(0.2)
            data = b""
            while b"\r\n\r\n" not in data and not self.stopping.is_set() and len(data) < 2 ** 20:
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                data += chunk
            self.requests.append(data)
            with contextlib.suppress(OSError):
                self.answer(self, sock, data)

    def send(self, sock, data):
        sock.settimeout(5)
        sock.sendall(data)
        self.sent += len(data)

    # -- answers -----------------------------------------------------------
    @staticmethod
    def drip(fake, sock, request):
        """An answer that never ends: a byte a second (each read is quick, the whole never)."""
        answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n"
        for byte in answer + b"{" * 1000:
            if fake.stopping.wait(1.0):
                return
            fake.send(sock, bytes([byte]))

    @staticmethod
    def huge(length):
        def answer(fake, sock, request):
            fake.send(sock, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length)
            zeros = b"\0" * 2 ** 16
            while fake.sent < 256 * 2 ** 20 and not fake.stopping.is_set():
                fake.send(sock, zeros)
        return answer

    @staticmethod
    def text(status, body):
        def answer(fake, sock, request):
            fake.send(sock, b"HTTP/1.1 %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                      % (status, len(body)) + body)
        return answer


ESCAPES = b"\x1b[2J\x1b]0;pwned\x07\x1b[31mred " + b"A" * 200000 + b" \xff\xfe\r\nsecond line\n"


class ManagerDeadlineTest(support.OdenTestCase):
    GIVE_UP = ("--give-up-after", "2", "--timeout", "3", "--interval-polling", "0.2")

    def test_status_ends_within_its_timeout_against_a_dripping_host(self):
        project = self.project(library_code=SQUARES)
        fake = FakeWorker(self, FakeWorker.drip)
        project.write_hosts([fake.address])
        started = time.monotonic()
        try:
            completed = project.run("status", "--timeout", "3", timeout=30)
        except subprocess.TimeoutExpired:
            self.fail("status --timeout 3 still ran after 30 s")
        took = time.monotonic() - started
        figure("status --timeout 3 against a host dripping its answer: %.1f s", took)
        self.assertRan(completed, 1)
        self.assertLess(took, 6)
        self.assertIn("too slowly", completed.output)

    def test_a_client_call_ends_by_its_deadline(self):
        fake = FakeWorker(self, FakeWorker.drip)
        client = oden.HostClient(oden.Host(1, "127.0.0.1", fake.port), oden.Codec(b"k" * 32), 2)
        self.addCleanup(client.close)
        started = time.monotonic()
        with self.assertRaisesRegex(oden.HostError, "within 2 s"):
            client.call("/hello", {})
        self.assertLess(time.monotonic() - started, 3)

    def test_the_run_ends_when_its_tasks_are_done_despite_a_dripping_host(self):
        project = self.project(library_code=SQUARES)
        worker = project.start_worker("--slots", "1", "--threads")
        fake = FakeWorker(self, FakeWorker.drip)
        project.write_hosts([worker, fake.address])
        started = time.monotonic()
        try:
            completed = project.run("manager", "--timeout", "3", "--interval-polling", "0.2",
                                    "--give-up-after", "5", timeout=60)
        except subprocess.TimeoutExpired:
            self.fail("the manager still ran 60 s after it started, its tasks done in a second")
        took = time.monotonic() - started
        figure("a manager with a real host and a host dripping its answers: ended after %.1f s",
               took)
        self.assertRan(completed)
        self.assertEqual(len(project.records()), 6)
        self.assertLess(took, 20)

    def test_an_answer_of_6_gib_or_10_to_the_12_bytes_costs_nothing(self):
        for length in (6 * 2 ** 30, 10 ** 12):
            project = self.project(library_code=SQUARES)
            fake = FakeWorker(self, FakeWorker.huge(length))
            project.write_hosts([fake.address])
            completed = project.run("manager", *self.GIVE_UP, timeout=60)
            figure("a host answering with Content-Length %d: the manager took %d bytes of it",
                   length, fake.sent)
            self.assertRan(completed, 2)          # not an oden worker: a refusal, no waiting it out
            self.assertIn("its answer of %d bytes is over the limit" % length, completed.output)
            self.assertNotIn("Traceback", completed.output)
            self.assertLess(fake.sent, 64 * 2 ** 20)

    def test_an_answer_over_max_reply_from_a_real_worker_names_the_flag(self):
        project = self.project(library_code="""
            def make_tasks():
                return [1]

            def calc(x):
                return "r" * 100000
        """)
        worker = project.start_worker("--slots", "1", "--threads")
        project.write_hosts([worker])
        completed = project.run("manager", "--max-reply", "50000", "--max-attempts", "1", *QUICK,
                                timeout=60)
        self.assertRan(completed, 1)
        self.assertIn("over the limit of 50000: pass a larger --max-reply", completed.output)
        self.assertRan(project.run("resume", "--max-reply", "200000", *QUICK, timeout=60))
        self.assertEqual(project.records()[0]["result"], "r" * 100000)

    def test_a_redirect_is_never_followed(self):
        project = self.project(library_code=SQUARES)
        elsewhere = FakeWorker(self, FakeWorker.text(b"404 Not Found", b"nothing\n"))
        location = b"http://%s/steal" % elsewhere.address.encode()
        fake = FakeWorker(self, FakeWorker.text(b"302 Found", b"moved\n"))
        fake.answer = FakeWorker.text(b"302 Found\r\nLocation: " + location, b"moved\n")
        project.write_hosts([fake.address])
        for keepalive in ((), ("--no-keepalive",)):
            completed = project.run("manager", "--yes", *keepalive, *self.GIVE_UP, timeout=60)
            self.assertRan(completed, 3)
            self.assertIn("HTTP 302: moved", completed.output)
        self.assertTrue(fake.requests)
        self.assertEqual(elsewhere.requests, [], "the manager followed a redirect, and signed it")

    def test_text_from_a_peer_is_escaped_and_cut_to_one_line(self):
        project = self.project(library_code=SQUARES)
        fake = FakeWorker(self, FakeWorker.text(b"500 \x1b[31mOops", ESCAPES))
        project.write_hosts([fake.address])
        completed = project.run("manager", *self.GIVE_UP, timeout=60)
        self.assertRan(completed, 3)
        logs = project.files("t_*.log")
        with open(logs[0], encoding="utf-8") as f:
            logged = f.read()
        for text in (completed.output, logged):
            self.assertFalse("\x1b" in text, "a raw escape reached the output")
            self.assertIn("\\x1b[2J\\x1b]0;pwned\\x07", text)
            self.assertLess(max(len(line) for line in text.splitlines()), 500)
            self.assertFalse("second line" in text, "a peer's text reached the output as lines")

    def test_status_shows_not_an_oden_worker_for_malformed_answers(self):
        project = self.project(library_code=SQUARES)
        good = (b'{"state": "\\u001b[2Jidle", "slots": 2, "slots_busy": 0, "done": 1, "failed": 0, '
                b'"load": "high"}')
        fakes = [FakeWorker(self, FakeWorker.text(b"200 OK", body))
                 for body in (b"{}", b"[" * 100000 + b"]" * 100000, b"\xff\xfe", good)]
        project.write_hosts([fake.address for fake in fakes])
        completed = project.run("status", "--timeout", "3", timeout=30)
        self.assertRan(completed, 1)
        self.assertFalse("Traceback" in completed.output, completed.output[-300:])
        self.assertFalse("\x1b" in completed.output, "a raw escape reached the output")
        lines = {fake.address: line for fake in fakes for line in completed.output.splitlines()
                 if line.startswith(fake.address)}
        for fake in fakes[:3]:
            self.assertIn("not an oden worker", lines[fake.address])
        self.assertRegex(lines[fakes[3].address], r"yes +\\x1b\[2Jidle +0/2 +1 +0 +-")


class PeerTextTest(unittest.TestCase):
    def test_peer_text_rows(self):
        rows = [("plain text", "plain text"),
                ("  two\nlines \n", "two\\nlines"),
                ("\x1b[31mred\x07", "\\x1b[31mred\\x07"),
                ("\u202eevil", "\\u202eevil"),
                (b"caf\xc3\xa9 \xff", "caf\xe9 \\xff"),
                ("x" * 300, "x" * 200 + "..."),
                (b"A" * 10 ** 6, "A" * 200 + "...")]
        for given, shown in rows:
            self.assertEqual(oden.peer_text(given), shown, given[:40])
        self.assertEqual(oden.peer_text("\x1b" * 50, limit=20), "\\x1b" * 5 + "...")


if __name__ == "__main__":
    unittest.main()
