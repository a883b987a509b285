#!/usr/bin/env python3
"""oden: spread independent tasks over many machines with one file.

Copy this file into a project, fill in the user section below, copy the
project to the remote machines and run ``python3 oden.py worker`` there, then
``python3 oden.py manager`` on your PC.  ``python3 oden.py local`` runs the
same job on loopback workers; ``python3 oden.py --help`` lists every command.

How the parts fit::

    manager (your PC)                             worker (each remote machine)
    make_tasks() -> TaskBoard (shared queue)       ThreadingHTTPServer :8080
      one thread per host (HostRunner):              POST /submit  queue batches, then
        keeps slots + prefetch batches in flight ->  POST /poll    long poll: answers
        long-polls for whichever results are ready <-              as soon as a batch ends
      ResultStore: claims each outcome, writes one   slot 1..N: calc(task) in a child
        atomic .pickle; progress, log file, resume     process (or a thread: --threads)
      Dashboard: live page on 127.0.0.1 (GET / ,     GET / , /status , /status.json
        /status.json); frozen as the run's report

* RunContext  : what a manager run fixed at its start (name, stamp, key, settings); frozen.
* TaskBoard   : which tasks wait, which are in flight where, which are finished.
* HostRunner  : one per host; connects, submits and polls in one request, requeues on failure.
* HostClient  : a HostRunner's line to its worker: sends a request, receives its answer.
* ResultStore : claims each task's first outcome, writes its file, counts it (its Tally).
* WorkerState : the worker's queue of batches, its slots and the finished results.
* Codec       : the one place every message is pickled, signed, checked and unpickled.
* Dashboard   : the manager's read-only live page of the run; frozen, it is the run's report.

The life of a task.  A task keeps one identity through all its shapes: its index, its
position in the list make_tasks() returned.

 1. make_tasks() returns the list; for `resume`, ContentIndex drops the indices that have a
    saved success (matched by ==).  Tasks keeps the manager's one copy of each (a small one
    pickled, a big one as itself) and the TaskBoard queues the indices to run (`pending`).
 2. A HostRunner takes a chunk of indices as a batch (batch id -> [indices], `in_flight`),
    as many as its worker's slots and prefetch want and its --max-body allows.
 3. Its request carries [(batch id, [(index, pickled task)], time limit)]; Codec signs it
    (encode() puts big tasks in frames of their own) and the worker's /submit queues the
    batch in the RunState of that manager run.
 4. A slot takes the batch; its child process (slot_process_main) runs calc on each task and
    sends back one report per task: {"index", "ok", "result" (pickled) or "error" and
    "exception", "started", "ended", "output"}.
 5. The finished batch waits in its RunState until a long poll (/poll, or /submit with a
    wait) returns it; the runner's next request acks it and the worker forgets it.
 6. The runner checks the reports against the batch (_answered); while it waits for its next
    answer, the ResultStore claims each index (the first outcome wins, a duplicate is
    dropped), the board marks it finished, and the store writes its file record, the dict of
    README.md "Result files", as {name}{host}_{stamp}_{index}.done.pickle or .error.pickle
    (fsynced, renamed into place).  A report travels; a file record is what lands on disk.
 7. Whatever fails in between sends the index back to the board: free when it only waited in
    a worker's queue, else as an attempt, and as a death when its worker died while it ran;
    past --max-attempts or --max-deaths it is written as an error record.  The run ends when
    every index has a file (or on a stop, with the command that finishes it).

Locks.  The manager: TaskBoard.changed guards the board (queue, copies, attempts, hunger,
batch ids); ResultStore.lock its claims and failure, ResultStore.changed its writer's queue;
Tally.lock the counts; Fleet.lock which hosts are up or refuse; each HostRunner and HostClient
belongs to its host's thread alone; a RunContext is frozen.  The worker: WorkerState.lock
guards its runs, their batches and the counts; a slot's thread owns its Slot.  Codec._lock
guards a session's counter and the replay guard.  Each class says where it reads without a
lock, and why.

SECURITY: a worker runs the code it is sent, and both ends unpickle what they
receive.  Every POST is signed with HMAC-SHA256 under a shared key
(``oden.key`` next to this file, or $ODEN_KEY): a worker checks the signed head
before it reads the body, and nothing is unpickled before its signature checks
out.  Without a key a worker starts only with ``--insecure``, and no worker
serves a POST from a web browser.  Connections, threads, bodies read at once,
request times and refusal log lines are bounded on the worker, and each
request's time and answer size on the manager: see README.md "Security".
The key does not encrypt: use ``--certfile`` and
``--cafile`` (TLS) when tasks or results are confidential.  The status pages
(GET) need no key and show counts and ages only, never tasks or results; the
manager's live page, on loopback unless --dashboard says otherwise, adds tracebacks.
"""
import argparse
import ast
import atexit
import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import errno
import glob
import hashlib
import hmac
import html
import http.client
import http.server
import importlib.util
import ipaddress
import json
import logging
import math
import multiprocessing
import os
import pickle
import platform
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import traceback

try:
    import resource                 # Unix: the open-file limit
except ImportError:
    resource = None

try:                                    # the run lock: flock on POSIX, msvcrt on Windows
    import fcntl
except ImportError:
    fcntl = None
    import msvcrt

# ------ User write below ------
hosts = None          # one a line: "host", "host:port" or "[ipv6]:port"; None reads hosts.txt
name = "sort"         # the run's name: every result file starts with it
interval_polling = 1  # seconds one poll may wait on a worker before the host is asked again
timeout = 10          # seconds for every HTTP request (connecting, sending, receiving)
task_timeout = None   # seconds one task may run before it is an error; None: no limit
chunksize = None      # tasks per batch sent to a slot; None: automatic (batches of about 0.05 s)
files = []            # glob patterns (in this folder) of files calc reads: pushed with the code


def make_tasks():
    """The sort-timing experiment: three sorts on random and on already sorted lists."""
    return [(algorithm, n, order)
            for algorithm in ("builtin", "merge", "quick")
            for n in (100, 1000, 5000)
            for order in ("random", "sorted")]


def calc(task):
    """Sort one list; return the seconds it took."""
    algorithm, n, order = task
    data = list(range(n)) if order == "sorted" else random.Random(n).sample(range(n), n)
    sort = {"builtin": sorted, "merge": merge_sort, "quick": quick_sort}[algorithm]
    start = time.perf_counter()
    result = sort(data)
    elapsed = time.perf_counter() - start
    assert result == sorted(data), "%s sort returned an unsorted list" % algorithm
    return elapsed


def merge_sort(xs):
    """Merge sort, returning a new sorted list."""
    if len(xs) <= 1:
        return xs
    left, right = merge_sort(xs[:len(xs) // 2]), merge_sort(xs[len(xs) // 2:])
    merged = []
    while left and right:
        merged.append((left if left[-1] > right[-1] else right).pop())
    return (left or right) + merged[::-1]


def quick_sort(xs):
    """Quicksort on the first element: slow, and too deep, on sorted input."""
    if len(xs) <= 1:
        return xs
    pivot = xs[0]  # the deliberate bug: on sorted input this recurses len(xs) deep
    return (quick_sort([x for x in xs if x < pivot]) + [x for x in xs if x == pivot]
            + quick_sort([x for x in xs if x > pivot]))


def handle_finish_machine(uri, name):
    """Called on the manager when host `uri` runs out of tasks."""
    logging.getLogger("oden").info("%s has no more tasks for run %r", uri, name)


def handle_finish_tasks():
    """Called once on the manager when every task has a result or an error."""
    logging.getLogger("oden").info("all tasks are processed")


def show_status():
    """The text at the top of the worker's status page, http://host:8080/."""
    return "oden example: timing three sorts (%s)" % platform.node()
# ------ User write above ------


# ====================================================================
# Defaults: each lives here and nowhere else
# ====================================================================

VERSION = "1.0.0"
DEFAULT_PORT = 8080
DEFAULT_BIND = "0.0.0.0"
HOSTS_FILE = "hosts.txt"            # next to the main script
KEY_FILE = "oden.key"               # next to the main script; travels with the project
KEY_ENV = "ODEN_KEY"                # overrides the key file
START_METHOD_ENV = "ODEN_START_METHOD"   # a worker's slot processes start so (spawn, forkserver)
PICKLE_PROTOCOL = 4                 # readable by every Python from 3.8 on
MAX_CLOCK_SKEW = 300                # seconds a signed request stays valid: the clock drift allowed
MAX_BODY = 256 * 2 ** 20            # bytes; a larger request is refused before it is read
REQUEST_BYTES = 32 * 2 ** 20        # bytes of tasks past which a request takes no further batch
PREFETCH_BYTES = 16 * 2 ** 20       # batches beyond a host's slots only while they are smaller
REQUEST_ENVELOPE = 4096             # bytes of a submit beyond its tasks (run id, acks, framing)...
ITEM_ENVELOPE = 32                  # ... and per task in it (its index, tuple framing)
REQUEST_READ_TIMEOUT = 30           # s for a whole request head, an idle kept-alive client,
                                    # a body or reply beyond size / SLOWEST_RATE (--request-timeout)
SLOWEST_RATE = 100000               # bytes/s: the slowest a signed body or a reply may travel
MAX_HEAD = 16 * 2 ** 10             # bytes of request line and headers read before the key checks
MAX_CONNECTIONS = 256               # a worker's connections at once; fewer at a low `ulimit -n`
SPARE_FDS = 32                      # descriptors kept free beyond those: slot restarts, logs
SMALL_BODY = 2 ** 20                # bodies over this size share 2 x --max-body of reading room
REFUSAL_LOG_EVERY = 60              # s: refusals logged this often per source address, with a count
ACCEPT_BACKOFF = (0.005, 0.5)       # s a worker waits after accept fails (no descriptors), doubling
MAX_REPLY = 2 ** 30                 # bytes: a larger answer is refused unread (--max-reply)
SMALL_REPLY = 2 ** 20               # bytes: most a /hello answer, error text, /status.json holds
WATCH_EVERY = 0.1                   # s between checks for manager requests past their deadline
MAX_POLL_WAIT = 60                  # seconds a worker holds one long poll at most
PREFETCH = 2                        # batches per host beyond its slots, at least (and one per slot)
PREFETCH_SHORT = 6                  # ... when batches take under SHORT_BATCH s: fewer round trips,
SHORT_BATCH = 0.01                  #     at the price of a less even end of the run
LONG_BATCH = 1.0                    # batches longer than this: one beyond the slots is enough
WRITER_BACKLOG = 1000               # results waiting for the writer before host threads wait for it
WORKER_BACKLOG = 16                 # batches a worker holds beyond 2 x slots (queued, run, unacked)
BATCH_SECONDS = 0.05                # automatic chunksize aims at batches this long
MAX_CHUNK = 2000                    # automatic chunksize never exceeds this many tasks
MAX_ATTEMPTS = 5                    # connection failures and time-outs before a task is an error
MAX_DEATHS = 3                      # worker deaths a task may see before it is an error (poison)
GIVE_UP_AFTER = 300                 # seconds every host may be down before the manager stops
BACKOFF = (0.5, 30)                 # first and longest wait between reconnects to a down host
SLOT_BACKOFF = (0.1, 5)             # first and longest wait of a slot whose process fails to start
OUTPUT_TAIL = 4000                  # characters of what calc printed kept per task
RUN_LEASE = 180                     # seconds a silent manager run keeps its batches on a worker
RUN_QUIET = 10                      # seconds of silence after which a run's batches queue last
LEASE_ENV = "ODEN_RUN_LEASE"        # overrides RUN_LEASE (tests use a short lease)
PROGRESS_TTY_EVERY = 0.2            # seconds between redraws of the progress line on a terminal
PROGRESS_LOG_EVERY = 10             # seconds between progress log lines when stderr is no terminal
RATE_WINDOW = 30                    # seconds of the recent past the rate (and ETA) is measured over
TIMELINE_POINTS = 600               # samples of finished-over-time kept: the whole run, thinned
DASHBOARD_BIND = "127.0.0.1"        # the manager's live page: loopback unless --dashboard says
DASHBOARD_REFRESH = 2               # seconds between updates of the live page in a browser
PAGE_ROWS = 20                      # rows of a list on the live page and the report (not hosts)
FAILURE_GROUPS = 200                # exception lines told apart; beyond, new ones group by type
RESULT_CUT = 200                    # characters of a task or result `results` lists (--full: all)

log = logging.getLogger("oden")


class OdenError(Exception):
    """A problem the user can fix; main() prints it as one line, without a traceback."""


TERMINATED = 128 + signal.SIGTERM       # the exit code after SIGTERM, as shells report it


class Terminated(KeyboardInterrupt):
    """SIGTERM on the manager: handled like Ctrl-C (stop, save, summary), exit 143."""
    exit_code = TERMINATED


def raise_terminated(signum, frame):
    """The SIGTERM handler of a manager: stop as Ctrl-C does (see Terminated)."""
    raise Terminated()


# ====================================================================
# Wire format: every message is pickled, signed and checked in Codec
# ====================================================================
#
# A POST body is pickle.dumps(message).  The request header
#     X-Oden-Auth: v2 <session> <counter> <unix time> <worker boot> <body sha256> <hmac>
# signs method, path, those fields and the Content-Length, so a worker checks
# the head before it reads a byte of the body; the body must then hash to the
# signed SHA-256.  The worker accepts a counter only if it is larger than the
# last one of that session (so nothing can be replayed, and a signed head buys
# one body read at most) and only for its own boot id (so nothing sent to an
# earlier run of the worker is accepted after a restart).  The reply's
#     X-Oden-Auth: v1 <hmac>
# signs the session, counter, status and body, binding it to its request.
# Without a key (--insecure) both ends send "X-Oden-Auth: none".

AUTH_HEADER = "X-Oden-Auth"
UNSIGNED = "none"
AUTH_VERSION = "v2"


class AuthError(Exception):
    """A message failed authentication; .status is the HTTP status to answer with."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


def dumps(obj):
    """Pickle `obj` as every message and file of oden is pickled (PICKLE_PROTOCOL)."""
    return pickle.dumps(obj, PICKLE_PROTOCOL)


def _mac(key, *parts):
    return hmac.new(key, b"\n".join(parts), hashlib.sha256).hexdigest()


def _digest(body):
    """SHA-256 hex (bytes) of a body: bytes, or the list of parts encode() makes."""
    digest = hashlib.sha256()
    for part in (body,) if isinstance(body, (bytes, bytearray, memoryview)) else body:
        digest.update(part)
    return digest.hexdigest().encode()


FRAMES = b"oden-frames "            # a body in frames starts so (a plain pickle starts with \x80)
OUT_OF_BAND = 64 * 2 ** 10          # bytes: a task's pickle this large is a frame of its own


def encode(message):
    """A message as a POST body: a plain pickle (bytes), or, when the message holds
    pickle.PickleBuffer objects (a submit's big tasks), a list of parts: the line
    "oden-frames <size> <size>...\n", a protocol-5 pickle and those buffers as they are,
    so that a big task is never copied into a body (the manager holds it once)."""
    buffers = []
    main = pickle.dumps(message, 5, buffer_callback=buffers.append)
    if not buffers:
        return main
    views = [buffer.raw() for buffer in buffers]
    sizes = " ".join(str(len(part)) for part in [main] + views)
    return [FRAMES + sizes.encode() + b"\n", main] + views


def decode(body):
    """The message of a body that encode() made; its big tasks come as read-only memoryviews
    into the body.  Raises ValueError (bad frames) or what unpickling raises."""
    if not body.startswith(FRAMES):
        return pickle.loads(body)
    end = body.index(b"\n", 0, 64 * 1024)
    sizes = [int(size) for size in body[len(FRAMES):end].split()]
    if not sizes or end + 1 + sum(sizes) != len(body):
        raise ValueError("frames of %s bytes do not add up to a body of %d"
                         % (sum(sizes), len(body)))
    view, start, parts = memoryview(body), end + 1, []
    for size in sizes:
        parts.append(view[start:start + size])
        start += size
    return pickle.loads(parts[0], buffers=parts[1:])


def body_size(body):
    """The bytes of a body as encode() makes it: bytes, or a list of parts."""
    return len(body) if isinstance(body, (bytes, bytearray)) else sum(len(part) for part in body)


class Codec:
    """Seals and opens every POST body.  The manager has one per host (each a
    session with its own counter); a worker has one for all its clients."""

    def __init__(self, key):
        self.key = key
        self.session = secrets.token_hex(8)
        self._counter = 0
        self._lock = threading.Lock()  # guards _counter (any thread that sends) and _seen
        self._seen = {}            # session -> (last counter, last time seen): the replay guard

    # -- manager side --------------------------------------------------
    def seal_request(self, path, message, boot):
        """Return (body, headers, ticket): the body as encode() makes it; the ticket opens the
        matching reply."""
        body = encode(message)
        with self._lock:
            self._counter += 1
            counter = str(self._counter)
        size = body_size(body)
        # http.client counts the length of bytes, not of a list of parts: say it for those
        length = {} if isinstance(body, bytes) else {"Content-Length": str(size)}
        if self.key is None:
            return body, dict(length, **{AUTH_HEADER: UNSIGNED}), None
        fields = [self.session, counter, str(int(time.time())), boot or "-", _digest(body).decode()]
        signed = [field.encode() for field in fields]
        mac = _mac(self.key, b"POST", path.encode(), *signed, str(size).encode())
        header = " ".join([AUTH_VERSION] + fields + [mac])
        return body, dict(length, **{AUTH_HEADER: header}), (self.session, counter)

    def open_reply(self, ticket, status, header, body):
        """Check a reply's signature against the request's `ticket`, then unpickle it;
        AuthError when it is not signed with our key."""
        if self.key is not None:
            if header is None or header == UNSIGNED:
                raise AuthError(0, "it answers without a key: put the same oden.key next to its "
                                   "oden.py (or set $%s) and restart it" % KEY_ENV)
            expected = "v1 " + _mac(self.key, b"reply", ticket[0].encode(), ticket[1].encode(),
                                    str(status).encode(), _digest(body))
            if not hmac.compare_digest(header.encode(), expected.encode()):
                raise AuthError(0, "its reply is not signed with our key: copy oden.key from "
                                   "this PC to it")
        return decode(body)

    # -- worker side ---------------------------------------------------
    def check_head(self, path, header, length, boot):
        """Authenticate a request by its head, before its body is read: return the
        ticket that open_body() and seal_reply() take, or raise AuthError."""
        if self.key is None:
            if not header:       # a custom header: no browser sends one cross-site without asking
                raise AuthError(401, "missing %s header: not a request from an oden manager"
                                % AUTH_HEADER)
            return None
        parts = (header or "").split(" ")
        if parts[0] == "v1":
            raise AuthError(401, "the manager runs an older oden.py: copy the project to both")
        if len(parts) != 7 or parts[0] != AUTH_VERSION or not parts[2].isdigit():
            raise AuthError(401, "missing or malformed %s header: the sender has no key"
                            % AUTH_HEADER)
        _, session, counter, stamp, their_boot, digest, mac = parts
        expected = _mac(self.key, b"POST", path.encode(), *(f.encode() for f in parts[1:6]),
                        str(length).encode())
        if not hmac.compare_digest(mac.encode(), expected.encode()):
            raise AuthError(403, "bad signature: wrong key or altered message")
        skew = time.time() - int(stamp) if stamp.isdigit() else float("inf")
        if abs(skew) > MAX_CLOCK_SKEW:
            raise AuthError(403, "stale request: the worker's clock is %.0f s %s the manager's "
                                 "(at most %d s allowed): set both clocks right, e.g. with NTP"
                            % (abs(skew), "ahead of" if skew > 0 else "behind", MAX_CLOCK_SKEW))
        # A /hello names no boot id, so one captured on the wire is accepted by any worker with
        # this key for MAX_CLOCK_SKEW s.  That is harmless: /hello changes nothing and tells only
        # what any manager with the key may know (version, code digest, slots, boot id), and the
        # boot id opens nothing without the key.  Every other route is bound to one worker run.
        if path != "/hello" and their_boot != boot:
            raise AuthError(409, "request was meant for an earlier run of this worker")
        self._check_fresh(session, int(counter))    # before the body is read: one per signed head
        return session, counter, digest

    def open_body(self, ticket, body):
        """Check that the body is the one the head signed, then unpickle it."""
        if self.key is not None and not hmac.compare_digest(_digest(body), ticket[2].encode()):
            raise AuthError(403, "bad signature: the body is not the one signed (altered message)")
        return decode(body)

    def open_request(self, path, header, body, boot):
        """check_head() and open_body() at once: return (message, reply ticket)."""
        ticket = self.check_head(path, header, len(body), boot)
        return self.open_body(ticket, body), ticket

    def _check_fresh(self, session, counter):
        now = time.monotonic()
        with self._lock:
            last, _ = self._seen.get(session, (0, now))
            if counter <= last:
                raise AuthError(403, "replayed request")
            self._seen[session] = (counter, now)
            if len(self._seen) > 1000:          # forget the sessions too old to send again
                self._seen = {session: seen for session, seen in self._seen.items()
                              if now - seen[1] < 3 * MAX_CLOCK_SKEW}

    def seal_reply(self, ticket, status, message):
        """Return (body, headers) of a reply, signed for the request of `ticket`."""
        body = encode(message)
        if self.key is None or ticket is None:
            return body, {AUTH_HEADER: UNSIGNED}
        session, counter = ticket[0].encode(), ticket[1].encode()
        mac = _mac(self.key, b"reply", session, counter, str(status).encode(), _digest(body))
        return body, {AUTH_HEADER: "v1 " + mac}


def key_path(key_file=None):
    """Where the key file is: --key-file, else oden.key beside the main script."""
    return key_file or os.path.join(script_folder(), KEY_FILE)


def load_key(key_file=None):
    """The shared key from $ODEN_KEY or the key file, or None when there is none."""
    if os.environ.get(KEY_ENV):
        if len(os.environ[KEY_ENV].strip()) < 16:
            raise OdenError("$%s is shorter than 16 characters: use a long random key, e.g. the "
                            "contents of a file made by 'python3 oden.py init'" % KEY_ENV)
        key = os.environ[KEY_ENV].strip().encode()
        warn_weak_key(key, "$%s" % KEY_ENV, "and set $%s to what its file holds" % KEY_ENV)
        return key
    path = key_path(key_file)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        key = f.read().strip()
        mode = os.fstat(f.fileno()).st_mode
    if len(key) < 16:
        raise OdenError("key file %s is shorter than 16 characters: delete it and run "
                        "'python3 oden.py init'" % path)
    if os.name == "posix" and mode & 0o077:
        log.warning("key file %s can be read by other users (mode %04o): whoever reads it can run "
                    "code on every worker; run 'chmod 600 %s'", path, mode & 0o777, path)
    warn_weak_key(key, "key file %s" % path, "after deleting %s" % path)
    return key


def warn_weak_key(key, where, how):
    """A key of few distinct characters (e.g. 16 times the same) is guessable: say so."""
    if len(set(key)) < 6:
        log.warning("%s holds a key of only %d different characters, easy to guess: make a random "
                    "one with 'python3 oden.py init' %s", where, len(set(key)), how)


def create_key(key_file=None):
    """Write a new random key file readable by its owner only; never replaces one."""
    path = key_path(key_file)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path


# ====================================================================
# The code of a run: the same on both ends, pushed where it differs
# ====================================================================
#
# The code of a run is oden.py, the main script, every module under the project folder that
# the main script imports (at any depth: found by reading their import statements, plus any
# such module already imported) and the files matched by the user section's `files`.  Its
# manifest {path relative to the project folder: sha256 hex} travels in the manager's /hello;
# the worker hashes the same paths on its disk and answers with those that differ (`stale`).
# The manager then sends them in a /push (signed like every message: whoever holds the key can
# run code on the workers anyway, since tasks are pickles); the worker checks every path,
# writes the files atomically, keeps what they replaced in PREVIOUS_FOLDER (one generation)
# and restarts itself in place: same command line, same port, new code.

PREVIOUS_FOLDER = ".oden-previous"   # in the worker's project folder: the files a push replaced
MAX_PUSH = 50 * 2 ** 20             # bytes; a larger push is refused (--max-push)


def project_modules(script, folder):
    """Paths of the modules under `folder` that `script` imports, at any depth: read from their
    import statements (also those inside functions), so nothing has to be imported here."""
    found, todo = set(), [os.path.abspath(script)]
    while todo:
        path = todo.pop()
        if path in found:
            continue
        found.add(path)
        if path == os.path.abspath(__file__):
            continue                     # oden.py imports the standard library alone: not read
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), path)
        except (OSError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module] + ["%s.%s" % (node.module, a.name) for a in node.names]
            else:
                continue
            todo += [p for name in names if name for p in module_files(name, folder)]
    return found


def module_files(dotted, folder):
    """The files under `folder` that importing `dotted` runs (packages' __init__.py too)."""
    files, base = [], folder
    for part in dotted.split("."):
        package, module = os.path.join(base, part, "__init__.py"), os.path.join(base, part + ".py")
        if os.path.isfile(package):
            files.append(package)
            base = os.path.join(base, part)
        elif os.path.isfile(module):
            files.append(module)
            break
        else:
            break
    return files


def code_manifest(patterns=()):
    """{relative path: sha256 hex} of the code of this run (see above), for the manager."""
    folder = script_folder()
    paths = project_modules(os.path.join(folder, os.path.basename(sys.argv[0])), folder) \
        if os.path.isfile(sys.argv[0]) else set()
    paths.add(os.path.abspath(__file__))
    paths.update(os.path.abspath(m.__file__) for m in list(sys.modules.values())
                 if isinstance(getattr(m, "__file__", None), str) and m.__file__.endswith(".py"))
    for pattern in patterns:
        paths.update(p for p in glob.glob(os.path.join(folder, pattern), recursive=True)
                     if os.path.isfile(p))
    inside = (os.path.relpath(p, folder) for p in paths if os.path.isfile(p))
    return {rel.replace(os.sep, "/"): file_digest(os.path.join(folder, rel)) for rel in inside
            if not rel.startswith(os.pardir) and PREVIOUS_FOLDER not in rel.split(os.sep)}


def file_digest(path):
    """sha256 hex of a file's bytes, or "" when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(2 ** 20), b""):
                digest.update(block)
    except OSError:
        return ""
    return digest.hexdigest()


def manifest_digest(manifest):
    """16 hex digits naming a manifest: what `status` and the logs show as "code"."""
    return hashlib.sha256(json.dumps(sorted(manifest.items())).encode()).hexdigest()[:16]


def project_path(folder, relative):
    """The absolute path of `relative` in `folder`; ValueError when it is absolute, climbs out
    with "..", or leads out through a link."""
    if not isinstance(relative, str) or not relative or "\0" in relative or \
            os.path.isabs(relative) or ".." in relative.replace("\\", "/").split("/"):
        raise ValueError("path %r is not inside the project folder"
                         % printable(str(relative))[:200])
    path = os.path.join(folder, *relative.split("/"))
    real_folder = os.path.realpath(folder)
    if os.path.commonpath([real_folder, os.path.realpath(path)]) != real_folder:
        raise ValueError("path %r leads out of the project folder" % printable(relative)[:200])
    return path


def stale_paths(manifest, folder):
    """The paths of `manifest` whose file in `folder` differs (or is missing, or is no path of
    the folder: those fail the push's check with a message)."""
    stale = []
    for relative, digest in manifest.items():
        try:
            path = project_path(folder, relative)
        except ValueError:
            stale.append(relative)
            continue
        if file_digest(path) != digest:
            stale.append(relative)
    return sorted(stale)


def apply_push(folder, files):
    """Write {relative path: bytes} into `folder`: every file first to a temporary name, then
    each replaced file is moved to PREVIOUS_FOLDER and the new one renamed into place.  Raises
    ValueError for a bad path and OSError when a file cannot be written; then nothing changed
    (a failure in the final renames, after every file was written, is reported the same way
    and the replaced files are in PREVIOUS_FOLDER)."""
    targets = {relative: project_path(folder, relative) for relative in files}
    temporaries = {}
    try:
        for relative, data in files.items():
            os.makedirs(os.path.dirname(targets[relative]), exist_ok=True)
            temporaries[relative] = "%s%s%s" % (targets[relative], TEMP_MARK, secrets.token_hex(4))
            with open(temporaries[relative], "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for temp in temporaries.values():
            with contextlib.suppress(OSError):
                os.remove(temp)
        raise
    for relative, temp in sorted(temporaries.items()):
        target = targets[relative]
        if os.path.exists(target):
            backup = os.path.join(folder, PREVIOUS_FOLDER, *relative.split("/"))
            os.makedirs(os.path.dirname(backup), exist_ok=True)
            shutil.copy2(target, backup)
        os.replace(temp, target)
        log.info("push: wrote %s (%d bytes)", relative, len(files[relative]))


def script_folder():
    """Where the project lives: the folder of the script that was run (oden.py or the user's)."""
    main = sys.argv[0] if os.path.isfile(sys.argv[0]) else __file__
    return os.path.dirname(os.path.abspath(main))


# ====================================================================
# Worker: slots run calc, WorkerState holds batches, HTTP serves it
# ====================================================================

class TaskOutput:
    """Stands in for sys.stdout and sys.stderr on a worker.

    What calc prints still reaches the worker's console, and the tail of it
    is kept per task (per thread) to travel back with the result.  Closing it
    only flushes: a calc that closes sys.stdout must not close the console.
    """
    local = threading.local()
    home = None          # the slot's (stdout, stderr, working folder): see install(), restore()

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        kept = getattr(TaskOutput.local, "kept", None)
        if kept is not None:
            kept.append(text)
            if len(kept) > 64:
                kept[:] = ["".join(kept)[-OUTPUT_TAIL:]]
        if self.stream:
            with contextlib.suppress(ValueError, OSError):   # a lost console loses text, not tasks
                return self.stream.write(text)
        return len(text)

    def flush(self):
        if self.stream:
            with contextlib.suppress(ValueError, OSError):
                self.stream.flush()

    def close(self):
        self.flush()

    def __getattr__(self, attribute):
        return getattr(self.stream, attribute)

    @staticmethod
    def install():
        """In a slot: put TaskOutput in front of stdout and stderr, and remember
        them and the working folder as the slot's own (see restore)."""
        if not isinstance(sys.stdout, TaskOutput):
            sys.stdout, sys.stderr = TaskOutput(sys.stdout), TaskOutput(sys.stderr)
        TaskOutput.home = (sys.stdout, sys.stderr, os.getcwd())

    @staticmethod
    def restore():
        """Undo what the last task did to its process: the slot's own streams and working
        directory again.  With --threads they belong to the whole worker, so a calc that
        changes them still affects the tasks running beside it until the next task starts."""
        if TaskOutput.home is None:
            return                       # `test` runs calc without a slot
        stdout, stderr, folder = TaskOutput.home
        sys.stdout, sys.stderr = stdout, stderr
        try:
            moved = os.getcwd() != folder
        except OSError:                  # calc deleted the folder it went into
            moved = True
        if moved:
            with contextlib.suppress(OSError):
                os.chdir(folder)

    @staticmethod
    @contextlib.contextmanager
    def capture():
        """Keep what the running task prints (this thread's) in the list it yields."""
        TaskOutput.local.kept = kept = []
        try:
            yield kept
        finally:
            TaskOutput.local.kept = None
            for stream in (sys.stdout, sys.stderr):  # its process may be killed: buffer nothing
                with contextlib.suppress(Exception):
                    stream.flush()


def error_report(index, error, exception, started=None, output=""):
    """The report of a task that failed: `error` its traceback, `exception` one line."""
    return {"index": index, "ok": False, "error": error, "exception": exception,
            "started": started, "ended": time.time(), "output": output}


def run_task(calc, index, task_bytes):
    """Run one task; always return a report, never raise (a crash is the slot's business).
    Any BaseException from calc (SystemExit, KeyboardInterrupt, asyncio.CancelledError...)
    is that task's error, except a Ctrl-C meant for `test`, which runs calc here."""
    started = time.time()
    TaskOutput.restore()
    with TaskOutput.capture() as kept:
        try:
            value = calc(pickle.loads(task_bytes))
        except BaseException as e:
            if is_user_interrupt(e):
                raise
            return error_report(index, traceback_text(), one_line(e), started,
                                "".join(kept)[-OUTPUT_TAIL:])
        try:
            result = dumps(value)
        except Exception as e:             # some Pythons say only "AttributeError: Can't get ..."
            why = ("PicklingError: calc returned a %s that cannot be pickled (%s): return plain "
                   "data" % (type(value).__name__, one_line(e)))
            return error_report(index, traceback.format_exc(), why, started,
                                "".join(kept)[-OUTPUT_TAIL:])
    return {"index": index, "ok": True, "result": result, "started": started,
            "ended": time.time(), "output": "".join(kept)[-OUTPUT_TAIL:]}


def is_user_interrupt(error):
    """A Ctrl-C for this process: a KeyboardInterrupt in the main thread while Python handles
    SIGINT.  Slot processes ignore SIGINT and slot threads never get it: there it is calc's."""
    return (isinstance(error, KeyboardInterrupt)
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)


def traceback_text():
    """The traceback of the exception being handled; never raises."""
    try:
        return traceback.format_exc()
    except BaseException as e:
        return "(its traceback could not be formatted: %s)\n" % one_line(e)


def one_line(exception):
    """'Name: first line of its text'; never raises, even when str() of the exception does."""
    try:
        text = str(exception).strip().splitlines()
    except BaseException as e:
        text = ["<str() failed: %s>" % type(e).__name__]
    return type(exception).__name__ + (": " + text[0] if text else "")


def printable(text):
    """Text from a peer (a traceback, what calc printed) made safe to show on a terminal and in
    a log, its lines kept: every character that is not printable (terminal escapes and other
    controls, bidi overrides, lone surrogates from bytes that were not UTF-8), except newline
    and tab, becomes its escape, such as \\x1b.  peer_text() makes one short line of it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else ascii(c)[1:-1] for c in text)


def peer_text(text, limit=200):
    """Text from another machine (str or bytes), safe to print or log: one line, with line
    breaks, terminal escapes and other control or invisible characters shown as escapes
    (\\n, \\x1b, \\u202e), undecodable bytes as \\xff, cut to `limit` characters."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text[:4 * limit + 4]).decode("utf-8", "backslashreplace")
    text = str(text)[:4 * limit + 4].strip()      # an escape is at most 10 characters for 1
    if text.isprintable():
        return text if len(text) <= limit else text[:limit] + "..."
    shown, size = [], 0
    for character in text:
        piece = character if character.isprintable() else ascii(character)[1:-1]
        if size + len(piece) > limit:
            return "".join(shown) + "..."
        shown.append(piece)
        size += len(piece)
    return "".join(shown)


def slot_process_main(conn, calc, position, lifeline):
    """Body of a slot's child process: run each batch it is sent and send back its reports
    in one message; `position` tells the parent which task of the batch runs now.

    The child leads a process group of its own (POSIX), so that stopping the slot also
    kills what calc started (a multiprocessing.Pool, a subprocess), and it ends with its
    group as soon as the worker's end of `lifeline` closes: when the worker stops the
    slot, and when the worker dies, even by SIGKILL, in the middle of a task.
    """
    if hasattr(os, "setpgid"):
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
    threading.Thread(target=slot_lifeline, args=(lifeline,), name="lifeline", daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C on the worker's console is the parent's
    TaskOutput.install()
    try:
        conn.send("ready")
        while True:
            items = [(index, conn.recv_bytes() if task is None else task)      # see send_batch
                     for index, task in conn.recv()]
            reports = []
            for number, (index, task_bytes) in enumerate(items):
                position.value = number
                reports.append(run_task(calc, index, task_bytes))
            conn.send(reports)
    except (EOFError, OSError):
        pass                                           # the worker is gone: so are we


def slot_lifeline(lifeline):
    """In a slot's child: wait until the worker's end of the lifeline closes (only the worker
    holds it and never writes), then end this process and its group at once."""
    with contextlib.suppress(BaseException):
        lifeline.recv_bytes()
    if hasattr(os, "killpg") and os.getpgid(0) == os.getpid():
        with contextlib.suppress(OSError):
            os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(1)


def kill_slot_process(process):
    """SIGKILL a slot's child and, on POSIX, its process group (what calc started).
    Called before the child is joined: while it is unreaped no other group has its id."""
    if hasattr(os, "killpg") and process.pid:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        process.kill()


def send_batch(conn, items):
    """Send [(index, task pickle)] to a slot's child in one message, but a big task (a
    memoryview into the request that brought it) after it, as raw bytes: never copied into
    the message.  slot_process_main() reads them back in order."""
    conn.send([(index, None if isinstance(task, memoryview) else task) for index, task in items])
    for _, task in items:
        if isinstance(task, memoryview):
            conn.send_bytes(task)


class Slot:
    """A slot runs one batch at a time in a slot thread of WorkerState.

    Methods for the slot's thread: start() then ready() once; send(batch) to start a
    batch, collect() to wait for its reports; abandon() after an unexpected error.
    stop() may come from any thread (shutdown).  A batch whose run is gone is marked
    `cancelled`: collect() then ends it early and reports nothing more of it.
    """
    batch = None                         # the batch it holds, from send() to the end of collect()
    reports = ()                         # the reports of that batch so far

    def abandon(self):
        """After an unexpected error: forget the batch it held; return it and its reports so far."""
        batch, self.batch = self.batch, None
        return batch, list(self.reports)


class ProcessSlot(Slot):
    """Runs tasks in a child process: CPU-bound calc runs in parallel, a crash
    costs one task, and a task over its time limit can really be stopped.

    A batch goes to the child in one message and its reports come back in one,
    so tiny tasks do not pay a pipe round trip each.  While a batch runs, the
    parent wakes every CHECK_EVERY s (WAKE_EVERY s without a time limit) to read
    the shared `position` (for the status page and the time limit).  When the
    child dies, `position` still names the task it was running; when a task
    overruns, the position read at the moment of the decision is the culprit.
    That task alone gets an error report; the batch's other unreported tasks run
    again in a new child.

    The child is not daemonic, so calc may start processes of its own; stop()
    kills it (and its process group), and start_slots() makes sure the worker
    never waits for one at exit.
    """

    # forkserver: children fork from a clean single-threaded server, so they hold
    # no copy of the worker's sockets, locks or other slots' lifelines.
    # $ODEN_START_METHOD=spawn runs Windows' only way on any machine (the tests use it).
    context = multiprocessing.get_context(os.environ.get(START_METHOD_ENV) or (
        "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"))
    CHECK_EVERY = 0.1
    WAKE_EVERY = 1.0                     # also how soon a cancelled batch is noticed

    def __init__(self, calc):
        self.calc = calc
        self.process = self.conn = self.position = self.lifeline = None
        # `lock` serialises start() and stop(): stop() comes from the slot's thread and from
        # shutdown (WorkerState.stop_slots); every other method is the slot thread's alone.
        # `closed` is set under it and read without it by collect(): it only ever turns True,
        # and a late read costs one wake-up.
        self.lock = threading.Lock()
        self.closed = False
        self.todo = []                   # tasks of the batch not answered yet
        self.reports = []                # the batch's reports so far

    def start(self):
        """Start the child; ready() waits until it can take work."""
        with self.lock:
            if self.closed:
                return
            conn, child = self.context.Pipe()
            reader, writer = self.context.Pipe(duplex=False)   # lifeline: the worker alone writes
            position = self.context.RawValue("l", 0)
            process = self.context.Process(target=slot_process_main,
                                           args=(child, self.calc, position, reader))
            try:
                process.start()
            except BaseException:
                conn.close()
                writer.close()
                raise
            finally:
                child.close()
                reader.close()
            self.conn, self.lifeline, self.position, self.process = conn, writer, position, process

    def ready(self, seconds=60):
        """Wait for the child's first word, so no batch waits on a process still booting."""
        conn = self.conn
        if conn is None:                 # closed for good before a child ever started
            return
        with contextlib.suppress(EOFError, OSError):     # a child that died, a pipe stop() closed
            if conn.poll(seconds):
                conn.recv()

    def stop(self, final=False):
        """Kill the child and its group (it restarts on the next batch), or for good (final)."""
        with self.lock:
            self.closed = self.closed or final
            if self.process is not None:
                kill_slot_process(self.process)
                self.process.join(5)
                self.conn.close()
                self.lifeline.close()
                self.process = None

    def send(self, batch):
        """Start running a batch; collect() waits for its reports."""
        self.batch, self.todo, self.reports = batch, list(batch.items), []
        self._send_todo()

    def _send_todo(self):
        if self.process is None or not self.process.is_alive():
            self.stop()
            self.start()
            self.ready()
        if self.conn is None:            # closed for good before a child ever started: collect()
            return                       # sees `closed` and ends at once
        with contextlib.suppress(OSError):     # a dead child, or a closed pipe: collect() finds it
            self.position.value = 0
            send_batch(self.conn, self.todo)

    def collect(self, mark_started):
        """Wait for the batch's reports: (batch, reports).  A crash or a time-out gives
        the task running at that moment an error report, and the batch's other
        unreported tasks run again.  A cancelled batch ends at once, its child killed."""
        batch, limit = self.batch, self.batch.limit
        shown, since = 0, time.monotonic()          # _send_todo() has just set position 0
        mark_started(batch)
        while self.todo and not self.closed and not batch.cancelled:    # closed: shutdown
            try:
                if self.conn.poll(self.CHECK_EVERY if limit else self.WAKE_EVERY):
                    self.reports += self.conn.recv()
                    self.todo = []
                    break
            except (EOFError, OSError):             # the child died, or stop() closed the pipe
                if self.closed or batch.cancelled:
                    continue
                code = self._exit_code()                # the child is dead: its position is final
                self._fail(self._position(),
                           "its process died (exit code %s) while running this task" % code,
                           "WorkerCrash: process died with exit code %s" % code)
                shown, since = 0, time.monotonic()
                mark_started(batch)
                continue
            position = self._position()                 # read after the wait: not a stale value
            if position != shown:
                shown, since = position, time.monotonic()
                mark_started(batch)
            elif limit and time.monotonic() - since >= limit:
                self._fail(position, "timed out after %s s (its process was killed)" % limit,
                           "TimeoutError: timed out after %s s" % limit)
                shown, since = 0, time.monotonic()
                mark_started(batch)
        if batch.cancelled and self.todo:
            self.stop()                                 # it may be mid-batch: a new child runs on
        reports, self.batch, self.reports = self.reports, None, []
        return batch, reports

    def _position(self):
        position = self.position
        return min(position.value if position is not None else 0, len(self.todo) - 1)

    def _exit_code(self):
        process = self.process
        if process is not None:
            process.join(5)
        return process.exitcode if process is not None else None

    def _fail(self, position, error, exception):
        """Record the task at `position` as failed and run the rest again in a new child."""
        self.stop()
        self.reports.append(error_report(self.todo[position][0], error, exception))
        self.todo = self.todo[:position] + self.todo[position + 1:]
        if self.todo:
            self._send_todo()

    def abandon(self):
        self.stop()
        return super().abandon()


class ThreadSlot(Slot):
    """Runs tasks in the worker's own process (--threads): for calc that cannot
    run in a child process.  A task over its time limit is recorded as an
    error, but its thread cannot be stopped and runs on until calc returns;
    so does the running task of a cancelled batch (its report is dropped)."""

    def __init__(self, calc):
        self.calc = calc

    def start(self):
        TaskOutput.install()

    def ready(self):
        pass

    def stop(self, final=False):
        pass

    def send(self, batch):
        self.batch, self.reports = batch, []

    def collect(self, mark_started):
        batch = self.batch
        for index, task_bytes in batch.items:
            if batch.cancelled:
                break
            self.reports.append(self._run(batch, index, task_bytes, mark_started))
        reports, self.batch, self.reports = self.reports, None, []
        return batch, reports

    def _run(self, batch, index, task_bytes, mark_started):
        mark_started(batch)
        if batch.limit is None:
            return run_task(self.calc, index, task_bytes)
        box = []
        work = lambda: box.append(run_task(self.calc, index, task_bytes))
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        thread.join(batch.limit)
        if box:
            return box[0]
        return error_report(index, "timed out after %s s (its thread could not be stopped and "
                                   "runs on)" % batch.limit,
                            "TimeoutError: timed out after %s s" % batch.limit)


class Batch:
    """Tasks submitted together; they run one after another in one slot."""

    def __init__(self, batch_id, run_id, items, limit):
        self.id, self.run_id, self.items, self.limit = batch_id, run_id, items, limit
        self.reports = []
        self.since = None            # when its current task started (for the status page)
        self.cancelled = False       # its run is gone: stop it, report nothing


class RunState:
    """One manager run's share of a worker.  Batch ids are the run's own (every run
    counts from 1), so a batch is known by (run id, batch id)."""

    def __init__(self, run_id):
        self.id = run_id
        self.queued = collections.deque()
        self.running = {}            # batch id -> Batch
        self.unacked = {}            # batch id -> Batch: ended, until the manager acks it
        self.heard = time.monotonic()    # its last request: the lease runs from here
        self.polls = 0               # its long polls waiting now (a run waiting is not silent)
        self.fed = 0                 # when a slot last took one of its batches (WorkerState.feeds)

    def knows(self, batch_id):
        """Whether this run's batch `batch_id` is here: queued, running or unacked."""
        return (batch_id in self.running or batch_id in self.unacked
                or any(b.id == batch_id for b in self.queued))

    def held(self):
        """Batches of this run the worker holds: queued, running and unacked."""
        return len(self.queued) + len(self.running) + len(self.unacked)

    def quiet(self, now):
        """Silent for a while: a live manager polls every few seconds while it holds work here."""
        return not self.polls and now - self.heard > RUN_QUIET


class WorkerState:
    """The worker's memory: per manager run, its batches queued, running and
    finished-but-unacked.

    Several runs share the worker (people sharing lab machines): each request
    names its run, and is answered with that run's batches only.  A free slot
    takes the next batch of the run with the fewest batches running (on a tie,
    the one fed longest ago); a run silent for RUN_QUIET s (its manager killed,
    say) comes after the others.  Capacity (busy answers) counts every run's
    batches.  A run that says goodbye ({"bye": True} on /poll), or is not heard
    from for `lease` seconds (RUN_LEASE), is dropped: its queued and unacked
    batches go, its running ones are cancelled (a process slot kills its child;
    a thread runs on, its report dropped).

    Locks.  `lock` guards `runs` and everything in them (each RunState and its
    batches), the counts (`done`, `failed`, `idle`, `feeds`) and `stopping`; `work`
    (on it) wakes slots, `results` wakes long polls.  `slot_objects` and `code` are
    set before the server takes its first request and only read after.  Three
    fields of a Batch are read or written without the lock, on purpose:

    * `since`: written by its slot's thread alone as each task starts, so that a
      slot does not wait for the lock per task; one attribute store is never torn.
      status() reads it under the lock, once per batch, and sees None (not started,
      or finished: _finish() sets that under the lock) or one whole time.
    * `cancelled`: set under the lock (_drop), read by the slot's thread while it
      runs the batch; a late read costs one wake-up (ProcessSlot.WAKE_EVERY).
    * `items`: set when the batch is made and read by the one slot thread that
      holds it, which drops them in _finish().
    """

    def __init__(self, calc, slots, threads, job_name, max_body=MAX_BODY):
        self.calc, self.slots, self.threads = calc, slots, threads
        self.job_name, self.max_body = job_name, max_body
        self.capacity = 2 * slots + WORKER_BACKLOG
        self.lease = run_lease()
        self.boot = secrets.token_hex(6)
        self.code = None             # manifest_digest() of this worker's code, set by run_worker
        self.started = time.time()
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        self.results = threading.Condition(self.lock)
        self.runs = {}               # run id -> RunState
        self.feeds = 0               # batches handed to slots so far
        self.done = self.failed = 0
        self.slot_objects = []
        self.idle = 0                # slots waiting for a batch
        self.stopping = False        # set on shutdown: batches cut off then are never reported

    def start_slots(self):
        """Start the slots (process slots' children boot side by side), then a thread per
        slot and the thread that watches the runs' leases."""
        kind = ThreadSlot if self.threads else ProcessSlot
        self.slot_objects = [kind(self.calc) for _ in range(self.slots)]
        atexit.register(self.stop_slots)     # slot processes are not daemonic: never wait on one
        for slot in self.slot_objects:
            slot.start()
        for slot in self.slot_objects:       # in parallel: all were started before the first wait
            slot.ready()
        for number, slot in enumerate(self.slot_objects, 1):
            threading.Thread(target=self._slot_loop, args=(slot,), name="slot-%d" % number,
                             daemon=True).start()
        threading.Thread(target=self._watch_leases, name="leases", daemon=True).start()

    def stop_slots(self):
        """Kill the slots.  What they were running is not reported as crashed: the manager
        sees the host go away and runs those tasks elsewhere."""
        with self.lock:
            self.stopping = True
        for slot in self.slot_objects:
            slot.stop(final=True)

    # -- the slots' threads ------------------------------------------------
    def _slot_loop(self, slot):
        """Body of a slot's thread: take a batch, collect its reports, report them.  No
        exception ends it: a failure of the slot itself (calc's exceptions are reports
        already; a process that cannot start, at a full descriptor table, say) becomes error
        reports for the batch it held, and the loop goes on after a backoff that doubles
        while failures repeat (SLOT_BACKOFF)."""
        backoff = SLOT_BACKOFF[0]
        while True:
            try:
                if slot.batch is None:
                    self._feed(slot, wait=True)
                batch, reports = slot.collect(self._mark_started)
                backoff = SLOT_BACKOFF[0]
            except BaseException:
                self._slot_failed(slot)
                time.sleep(backoff)      # a failure that repeats must not spin
                backoff = min(2 * backoff, SLOT_BACKOFF[1])
                continue
            try:
                self._feed(slot, wait=False)     # the next batch first: it runs during the report
            except BaseException:
                self._slot_failed(slot)
            try:
                self._finish(batch, reports)
            except BaseException:
                log.exception("could not report a batch; its run gets its tasks back as lost")

    def _slot_failed(self, slot):
        """After an unexpected error in a slot's thread: log it with its traceback, and give
        each task of the batch the slot held without a report an error report."""
        error, exception = traceback_text(), one_line(sys.exc_info()[1])
        log.error("a slot failed; the tasks it held are recorded as errors\n%s", error.rstrip())
        try:
            batch, reports = slot.abandon()
            if batch is not None:
                answered = {report["index"] for report in reports}
                why = "the worker's slot failed:\n" + error
                self._finish(batch, reports + [error_report(index, why, exception)
                                               for index, _ in batch.items
                                               if index not in answered])
        except BaseException:
            log.exception("a slot failed twice")

    def _feed(self, slot, wait):
        """Give the slot its next batch: waiting for one if `wait`, else only if the queue
        holds more batches than the idle slots will take."""
        with self.lock:
            if wait:
                self.idle += 1
                while not any(run.queued for run in self.runs.values()):
                    self.work.wait()
                self.idle -= 1
            elif sum(len(run.queued) for run in self.runs.values()) <= self.idle:
                return
            now = time.monotonic()
            run = min((run for run in self.runs.values() if run.queued),
                      key=lambda r: (r.quiet(now), len(r.running), r.fed))
            batch = run.queued.popleft()
            run.running[batch.id] = batch
            self.feeds += 1
            run.fed = self.feeds
            slot.batch = batch           # the slot holds it now: a failure in send() is reported
        slot.send(batch)

    def _finish(self, batch, reports):
        failed = []
        with self.lock:
            run = self.runs.get(batch.run_id)
            if run is not None and run.running.get(batch.id) is batch:
                del run.running[batch.id]
            batch.since, batch.items = None, ()      # its tasks (maybe a big request) can go
            if run is None or batch.cancelled or self.stopping:
                return                   # run gone, or cut off by shutdown: never reported
            batch.reports = reports
            for report in reports:
                if report["ok"]:
                    self.done += 1
                else:
                    self.failed += 1
                    failed.append(report)
            run.unacked[batch.id] = batch
            self.results.notify_all()
        for report in failed:
            log.info("task %s failed: %s", report["index"], report["exception"])

    def _mark_started(self, batch):
        batch.since = time.time()        # without the lock: see the class's docstring

    # -- runs --------------------------------------------------------------
    def _heard(self, run_id):
        """Called with the lock held: the run's state, new if it is new; its lease starts over."""
        run = self.runs.get(run_id)
        if run is None:
            run = self.runs[run_id] = RunState(run_id)
            log.info("manager run %s joins (%d runs)", run_id, len(self.runs))
        run.heard = time.monotonic()
        return run

    def _drop(self, run, why):
        """Called with the lock held: forget a run; its running batches are cancelled."""
        if self.runs.get(run.id) is not run:
            return
        del self.runs[run.id]
        if run.queued or run.running:    # else it only leaves its last answer's ack unsent
            log.info("manager run %s %s: dropping %d queued and %d running batches",
                     run.id, why, len(run.queued), len(run.running))
        for batch in run.running.values():
            batch.cancelled = True
        run.queued.clear()
        run.running.clear()
        run.unacked.clear()
        self.results.notify_all()        # its long polls answer now (with nothing)

    def _watch_leases(self):
        """Drop the runs not heard from for `lease` seconds (a manager killed or cut off)."""
        every = min(max(self.lease / 4, 0.05), 10)
        while True:
            time.sleep(every)
            now = time.monotonic()
            with self.lock:
                if self.stopping:
                    return
                for run in list(self.runs.values()):
                    if not run.polls and now - run.heard > self.lease:
                        self._drop(run, "was not heard from for %g s" % self.lease)

    @staticmethod
    def _ack(run, acked):
        for batch_id in acked:
            run.unacked.pop(batch_id, None)

    # -- requests (WorkerHandler's threads) --------------------------------
    def submit(self, message):
        """Queue the batches that fit; the rest come back as busy.  With a `wait`, then
        answer like poll() too: the manager's one request per round trip."""
        accepted, busy = [], []
        with self.lock:
            run = self._heard(message["run"])
            self._ack(run, message.get("ack", ()))
            held = sum(r.held() for r in self.runs.values())
            for batch_id, items, limit in message["batches"]:
                if run.knows(batch_id):
                    accepted.append(batch_id)
                elif held < self.capacity:
                    run.queued.append(Batch(batch_id, run.id, items, limit))
                    accepted.append(batch_id)
                    held += 1
                else:
                    busy.append(batch_id)
            self.work.notify(len(accepted))
        reply = {"accepted": accepted, "busy": busy, "boot": self.boot}
        if "wait" in message:
            reply.update(self.poll(message))
        return reply

    def poll(self, message):
        """Long poll: answer as soon as a batch of this run is finished, or after `wait` seconds.
        {"bye": True} instead ends the run here: it is dropped at once.  {"give_back": n}
        takes up to n of its batches that no slot has started off the queue (the last queued
        first) and answers at once: the manager moves them to a host that idles."""
        with self.lock:
            if message.get("bye"):
                run = self.runs.get(message["run"])
                if run is not None:
                    self._drop(run, "said goodbye")
                return {"done": [], "active": [], "boot": self.boot}
            deadline = time.monotonic() + min(float(message.get("wait", 0)), MAX_POLL_WAIT)
            run = self._heard(message["run"])
            self._ack(run, message.get("ack", ()))
            returned = [run.queued.pop().id for _ in range(min(int(message.get("give_back", 0)),
                                                               len(run.queued)))]
            if returned:
                deadline = 0
            run.polls += 1
            try:
                while (not run.unacked and time.monotonic() < deadline
                       and self.runs.get(run.id) is run):
                    self.results.wait(deadline - time.monotonic())
            finally:
                run.polls -= 1
                run.heard = time.monotonic()
            return {"done": [(b.id, b.reports) for b in run.unacked.values()],
                    "active": [b.id for b in run.queued] + list(run.running),
                    "queued": [b.id for b in run.queued], "returned": returned,
                    "boot": self.boot}

    def hello(self):
        """What /hello tells of this worker (CodeKeeper adds the code's part)."""
        return {"version": VERSION, "code": self.code, "slots": self.slots, "boot": self.boot,
                "python": platform.python_version(), "name": self.job_name,
                "max_body": self.max_body}

    def others_at_work(self, run_id):
        """True while batches of a run other than `run_id` are queued or running here."""
        with self.lock:
            return any(run.id != run_id and (run.queued or run.running)
                       for run in self.runs.values())

    def status(self):
        """What the status routes show: counts and ages, never tasks or results."""
        now = time.time()
        with self.lock:
            started = [b.since for run in self.runs.values() for b in run.running.values()]
            running = sorted(now - since for since in started if since is not None)
            busy = self.slots - self.idle
            state = {"state": "busy" if busy else "idle", "slots": self.slots,
                     "slots_busy": busy, "slots_free": self.idle,
                     "queued_batches": sum(len(run.queued) for run in self.runs.values()),
                     "running_task_ages": [round(age, 1) for age in running],
                     "done": self.done, "failed": self.failed, "runs": len(self.runs),
                     "code": self.code}
        load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
        state.update({"name": self.job_name, "mode": "threads" if self.threads else "processes",
                      "uptime": round(now - self.started, 1), "version": VERSION,
                      "python": platform.python_version(), "host": platform.node(),
                      "load": load})
        return state


def run_lease():
    """Seconds a silent run keeps its batches: RUN_LEASE, or $ODEN_RUN_LEASE (for tests)."""
    text = os.environ.get(LEASE_ENV, "")
    try:
        return float(text) if text else RUN_LEASE
    except ValueError:
        raise OdenError("$%s is %r, not a number of seconds: unset it (default %d)"
                        % (LEASE_ENV, text, RUN_LEASE))


def status_text(state):
    """GET /status: one line for curl, with units."""
    ages = state["running_task_ages"]
    return ("oden %s worker %s: %s, %d of %d slots busy, %d queued batches, %d done, %d failed, "
            "%d manager run%s, %sup %s\n" % (
                state["version"], state["name"], state["state"], state["slots_busy"],
                state["slots"], state["queued_batches"], state["done"], state["failed"],
                state["runs"], "" if state["runs"] == 1 else "s",
                "oldest task running %s, " % format_duration(max(ages)) if ages else "",
                format_duration(state["uptime"])))


# What the worker's page calls each key of its state: (label, how the value reads).  The key
# itself is shown beside it, as /status.json names it; a key not listed here is shown as it is.
STATUS_LABELS = collections.OrderedDict([
    ("state", ("state", str)),
    ("slots_busy", ("slots busy", str)),
    ("slots_free", ("slots free", str)),
    ("slots", ("slots in all", str)),
    ("queued_batches", ("batches waiting for a slot", str)),
    ("run_done", ("tasks done in the current run", str)),
    ("run_failed", ("tasks failed in the current run", str)),
    ("done", ("tasks done since the worker started", str)),
    ("failed", ("tasks failed since the worker started", str)),
    ("name", ("job", str)),
    ("mode", ("calc runs in", lambda mode: "child processes" if mode == "processes" else mode)),
    ("uptime", ("up for", lambda seconds: format_duration(seconds))),
    ("load", ("load average over 1, 5, 15 min", lambda load: ", ".join("%.2f" % x for x in load))),
    ("host", ("machine", str)),
    ("python", ("Python", str)),
    ("version", ("oden", str)),
])


def status_html(state, user_text, address=None):
    """GET /: the worker's page: `user_text` (show_status()), then every key of `state` with its
    label and unit, then the age of each running task.  `address`: the worker's host:port."""
    rows = []
    for key in list(STATUS_LABELS) + [k for k in state if k not in STATUS_LABELS]:
        if key not in state or key == "running_task_ages":
            continue
        label, show = STATUS_LABELS.get(key, (key, str))
        value = state[key]
        shown = "-" if value is None else show(value)
        rows.append("<tr><th>%s</th><td>%s</td><td class=\"key\">%s</td></tr>"
                    % (html.escape(label), html.escape(shown), html.escape(key)))
    ages = "".join("<li>running for %.1f s (%s)</li>" % (age, format_duration(age))
                   for age in sorted(state["running_task_ages"], reverse=True)) or "<li>none</li>"
    where = html.escape(address or state.get("host", ""))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta http-equiv=\"refresh\" content=\"5\"><title>oden worker %s: %s</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:1em;max-width:48em}"
            "th{text-align:left;padding-right:1em;font-weight:normal}"
            "td{font-weight:bold;padding-right:1em}"
            "td.key{font:12px monospace;color:#666}pre{white-space:pre-wrap}</style>"
            "</head><body><h1>oden worker %s: %s</h1><pre>%s</pre><table>%s</table>"
            "<h2>Tasks running</h2><ul>%s</ul>"
            "<p>The same as JSON: /status.json; one line: /status (updated every 5 s)</p>"
            "</body></html>\n" % (where, html.escape(state["state"]), where,
                                   html.escape(state["state"]), html.escape(user_text),
                                   "".join(rows), ages))


class Refusals:
    """Logs refused requests and connections at most once per REFUSAL_LOG_EVERY s per
    source: the first at once, in full; then, while refusals go on, one line a period
    with their count and the latest.  A flood of forged requests costs a few log lines.

    note() is called by handler threads and the accept thread, flush() by the accept
    thread (WorkerServer.service_actions); one lock guards `sources`.
    """
    MAX_SOURCES = 4096               # the oldest source is forgotten beyond this many

    def __init__(self, every=REFUSAL_LOG_EVERY):
        self.every = every
        self.lock = threading.Lock()
        self.sources = collections.OrderedDict()    # source -> [period start, count, latest line]

    def note(self, source, line):
        """A refusal from `source`: logged at once when it is the first of its
        period, else counted for flush()."""
        with self.lock:
            entry = self.sources.get(source)
            if entry is not None:
                entry[1] += 1
                entry[2] = line
                return
            self.sources[source] = [time.monotonic(), 0, None]
            if len(self.sources) > self.MAX_SOURCES:
                self.sources.popitem(last=False)
        log.warning("%s", line)

    def flush(self, now):
        """Log the counts of periods that are over; forget sources that were quiet."""
        lines = []
        with self.lock:
            for source, entry in list(self.sources.items()):
                if now - entry[0] < self.every:
                    continue
                if entry[1]:
                    lines.append("%d more refusals (%s) in the last %d s, the latest: %s"
                                 % (entry[1], source, now - entry[0], entry[2]))
                    entry[:] = [now, 0, None]
                else:
                    del self.sources[source]
        for line in lines:
            log.warning("%s", line)


class BodyRoom:
    """Bytes of large request bodies being read at once: at most `total`.  A body
    over SMALL_BODY waits for room (until its deadline); smaller ones need none."""

    def __init__(self, total):
        self.total, self.used = total, 0
        self.changed = threading.Condition()    # guards `used`; handler threads take and give

    def take(self, size, seconds):
        """True once `size` bytes are reserved; False if there was no room within `seconds`."""
        if size <= SMALL_BODY:
            return True
        deadline = time.monotonic() + seconds
        with self.changed:
            while self.used + size > self.total:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
            self.used += size
            return True

    def give(self, size):
        """Free what take() reserved, and wake the bodies waiting for room."""
        if size > SMALL_BODY:
            with self.changed:
                self.used -= size
                self.changed.notify_all()


class Connection:
    """A worker's open connection: its phase and until when it may stay in it."""
    __slots__ = ("sock", "address", "phase", "since", "deadline", "cut")

    def __init__(self, sock, address, phase, deadline):
        self.sock, self.address, self.phase, self.deadline = sock, address, phase, deadline
        self.since = time.monotonic()
        self.cut = False             # shut down by Connections; its thread is about to end


class Connections:
    """The worker's open connections, at most `limit`, each with a deadline.

    A per-read socket time-out alone lets a client that drips one byte at a time hold
    a thread for ever, and enough of them use up every descriptor.  So each connection
    is in a phase with a deadline for the whole of it:

      IDLE     waiting for a request line (a kept-alive connection between requests,
               or a client that drips its request line): request_timeout
      HEAD     request line read, headers being read, nothing proven: the same deadline
      WORKING  a signed request being served (a long poll), or a GET: none
      BODY     reading a body whose head proved the key: request_timeout + size / SLOWEST_RATE
      REPLY    writing a reply: request_timeout + size / SLOWEST_RATE

    The accept thread admits connections: when `limit` are open, it closes the longest
    IDLE one, else the oldest HEAD, so a manager can always connect; with neither, the
    new connection is closed.  It also cuts connections past their deadline (reap).
    Cutting is shutting the socket down: its handler thread sees the stream end,
    answers nothing and ends.  Handler threads move their own connection between
    phases.  `lock` guards `open` and each Connection's phase, since, deadline and
    `cut` (its sock and address never change); `limit` is the accept thread's alone
    (admit, out_of_descriptors), which reads and lowers it under the lock all the same.
    """
    IDLE, HEAD, WORKING, BODY, REPLY = "idle", "head", "working", "body", "reply"

    def __init__(self, limit, request_timeout, refusals):
        self.limit, self.request_timeout, self.refusals = limit, request_timeout, refusals
        self.lock = threading.Lock()
        self.open = {}                   # socket -> Connection, until its handler thread ends

    def admit(self, sock, address):
        """Register a new connection, closing another for room; False: no room, close it."""
        with self.lock:
            live = sum(1 for c in self.open.values() if not c.cut)
            if live >= self.limit:
                victim = self._victim()
                if victim is None or len(self.open) >= self.limit + SPARE_FDS // 2:
                    refused = True
                else:
                    self._cut(victim)
                    refused = False
                    kind = "an idle" if victim.phase == self.IDLE else "a slow"
                    self.refusals.note(victim.address, "closed %s connection from %s to make room: "
                                       "%d are open, the limit (--max-connections)"
                                       % (kind, victim.address, live))
                if refused:
                    self.refusals.note(address, "refused a connection from %s: all %d connections "
                                       "are busy with requests (--max-connections)"
                                       % (address, live))
                    return False
            deadline = time.monotonic() + self.request_timeout
            self.open[sock] = Connection(sock, address, self.IDLE, deadline)
            return True

    def move(self, sock, phase, deadline=None):
        """A handler thread's connection enters `phase`, to end by `deadline` (monotonic)."""
        with self.lock:
            connection = self.open.get(sock)
            if connection is not None:
                if phase != connection.phase:    # idle since accepted, or since its last answer
                    connection.since = time.monotonic()
                connection.phase, connection.deadline = phase, deadline

    def forget(self, sock):
        """The handler thread of `sock` ends: its connection is no longer open."""
        with self.lock:
            self.open.pop(sock, None)

    def reap(self, now):
        """Cut the connections past their deadline."""
        with self.lock:
            late = [(c, c.phase) for c in self.open.values()
                    if not c.cut and c.deadline is not None and c.deadline < now]
            for connection, _ in late:
                self._cut(connection)
        for connection, phase in late:
            if phase == self.IDLE:
                log.debug("closed an idle connection from %s", connection.address)
            else:
                what = {self.HEAD: "its request head", self.BODY: "its request body",
                        self.REPLY: "reading its answer"}[phase]
                self.refusals.note(connection.address, "cut a connection from %s: %s took too long "
                                   "(--request-timeout)" % (connection.address, what))

    def out_of_descriptors(self, error):
        """accept() failed for want of descriptors: admit fewer from now on, and close one."""
        with self.lock:
            live = sum(1 for c in self.open.values() if not c.cut)
            if live > 16:                # else something other than connections holds them
                self.limit = min(self.limit, live - 8)
            victim = self._victim()
            if victim is not None:
                self._cut(victim)
        self.refusals.note("accept", "cannot accept connections (%s) with %d open: serving at most "
                           "%d from now on; raise the open-file limit (ulimit -n) for more"
                           % (error.strerror or error, live, self.limit))

    def _victim(self):
        """Called with the lock held: the longest idle connection, else the oldest unproven head."""
        best = None
        for connection in self.open.values():
            if not connection.cut and connection.phase in (self.IDLE, self.HEAD):
                rank = (connection.phase != self.IDLE, connection.since)
                if best is None or rank < best[0]:
                    best = rank, connection
        return best and best[1]

    @staticmethod
    def _cut(connection):
        connection.cut = True
        with contextlib.suppress(OSError):
            socket.socket.shutdown(connection.sock, socket.SHUT_RDWR)    # not SSLSocket's


class HeadReader:
    """A handler's rfile.  readline() (the request line and headers) stops after MAX_HEAD
    bytes a request, so a request that has proven nothing costs little memory; read() (a
    body, read once its head has proven the key) is not limited."""

    def __init__(self, stream):
        self.stream, self.left = stream, MAX_HEAD

    def readline(self, size=-1):
        if self.left <= 0:
            raise http.client.LineTooLong("request head over %d bytes" % MAX_HEAD)
        line = self.stream.readline(self.left if size is None or size < 0 else min(size, self.left))
        self.left -= len(line)
        return line

    def read(self, size=-1):
        return self.stream.read(size)

    def __getattr__(self, attribute):
        return getattr(self.stream, attribute)


def message_problem(path, message):
    """Why `message` is not a request the route `path` can serve, in one line, or None.  The
    routes read only what passes here, so an exception in one is a bug of the worker (a 500),
    never the sender's (a 400).  Keys a route does not read are let through."""
    if path == "/hello":
        return None                      # any: without a dict "manifest" it asks for none
    if not isinstance(message, dict):
        return "a %s message is a dict, not %s" % (path, type(message).__name__)
    if path == "/push":
        files = message.get("files") or {}
        if not (isinstance(files, dict) and all(isinstance(name, str) and is_bytes(data)
                                                for name, data in files.items())):
            return "its 'files' is not {path: bytes}"
        return None
    if not isinstance(message.get("run"), str):
        return "it names no run (a string under 'run')"
    if not (isinstance(message.get("ack", ()), (list, tuple))
            and all(is_hashable(batch_id) for batch_id in message.get("ack", ()))):
        return "its 'ack' is not a list of batch ids"
    if not is_number(message.get("wait", 0)) or not is_number(message.get("give_back", 0)):
        return "its 'wait' or 'give_back' is not a number"
    if path == "/submit":
        batches = message.get("batches")
        if not (isinstance(batches, (list, tuple)) and all(map(is_batch, batches))):
            return "its 'batches' is not a list of (batch id, [(index, task pickle)], time limit)"
    return None


def is_batch(batch):
    """A submitted batch as WorkerState.submit takes it: (id, [(index, pickle)], limit).
    Its items are checked in a plain loop: a few microseconds per thousand tasks."""
    if not (isinstance(batch, (list, tuple)) and len(batch) == 3):
        return False
    batch_id, items, limit = batch
    if not (is_hashable(batch_id) and (limit is None or is_number(limit))
            and isinstance(items, (list, tuple))):
        return False
    try:
        for index, task in items:        # unpacked as the slots unpack them
            if not isinstance(index, int) or not isinstance(task, BYTES):
                return False
    except (TypeError, ValueError):      # an item that is not a pair
        return False
    return True


BYTES = (bytes, bytearray, memoryview)   # what a task pickle may come as: a view into a body


def is_bytes(value):
    """Whether `value` is bytes as a task pickle may come: bytes, or a view into a body."""
    return isinstance(value, BYTES)


def is_number(value):
    """Whether `value` is an int or a float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_hashable(value):
    """Whether `value` can be a dict key (a batch id)."""
    try:
        hash(value)
        return True
    except TypeError:
        return False


class WorkerHandler(http.server.BaseHTTPRequestHandler):
    """HTTP front of a worker.  GET routes show status to anyone; POST routes
    need a signed head, checked before the body is read, and hand the body to
    WorkerState.  Errors are one line; refusals are logged through Refusals."""

    protocol_version = "HTTP/1.1"           # keep-alive: the manager reuses its connection
    server_version = "oden/" + VERSION
    timeout = REQUEST_READ_TIMEOUT           # a slow or truncated body times out here
    disable_nagle_algorithm = True           # a reply in two writes: no 40 ms wait for an ACK
    wbufsize = -1                            # headers and body leave in one write, once a request
    error_message_format = "%(message)s\n"   # http.server's own refusals: one line too
    error_content_type = "text/plain; charset=utf-8"
    post_routes = {"/hello": lambda server, m: dict(server.state.hello(), **server.keeper.hello(m)),
                   "/submit": lambda server, m: server.state.submit(m),
                   "/poll": lambda server, m: server.state.poll(m),
                   "/push": lambda server, m: server.keeper.push(m, server.state)}

    def setup(self):
        super().setup()
        self.rfile = HeadReader(self.rfile)
        self.deadline = None

    def do_GET(self):
        """The status routes: / (a page), /status (a line), /status.json; for anyone."""
        self.server.connections.move(self.request, Connections.WORKING)
        state = self.server.state
        path = self.path.split("?")[0]
        if path == "/":
            address = "%s:%d" % (platform.node(), self.server.server_address[1])
            self._send(200, status_html(state.status(), self._user_status(), address).encode(),
                       "text/html; charset=utf-8")
        elif path == "/status":
            self._send(200, status_text(state.status()).encode(), "text/plain; charset=utf-8")
        elif path == "/status.json":
            self._send(200, json.dumps(state.status()).encode(), "application/json")
        else:
            self._fail(404, "no such page: try / or /status")

    def do_POST(self):
        """A signed request: check the head, read the body within its deadline,
        check the message, run its route, answer signed.  Every failure is one line."""
        route = self.post_routes.get(self.path)
        if route is None:
            return self._fail(404, "no such route %r" % self.path[:80])
        self.server.connections.move(self.request, Connections.WORKING)
        refusal = self._browser_refusal()
        if refusal:
            return self._refuse(403, refusal)
        length = self._content_length()
        if length is None:
            return
        codec, state, room = self.server.codec, self.server.state, self.server.room
        try:
            ticket = codec.check_head(self.path, self.headers.get(AUTH_HEADER), length, state.boot)
        except AuthError as e:
            return self._refuse(e.status, str(e))
        if not room.take(length, self.server.request_timeout):
            return self._fail(503, "busy reading other large requests: try again")
        try:
            body = self._read_body(length)
            if body is None:
                return
            message = codec.open_body(ticket, body)
        except AuthError as e:
            return self._refuse(e.status, str(e))
        except Exception as e:           # bad frames, a pickle that does not load
            return self._malformed(one_line(e))
        finally:
            body = None                  # gone before the route runs: its room is free again
            room.give(length)
        problem = message_problem(self.path, message)
        if problem:
            return self._malformed(problem)
        try:
            body, headers = codec.seal_reply(ticket, 200, route(self.server, message))
        except Exception as e:           # the message was fine: this is the worker's own bug
            log.exception("the worker failed on %s from %s (a bug: please report it)",
                          self.path, self.client_address[0])
            return self._fail(500, "the worker failed on %s: %s (its log has the traceback)"
                              % (self.path, one_line(e)))
        self._send(200, body, "application/octet-stream", headers)
        if self.server.keeper.restarting:        # a push was taken: restart once it is answered
            self.wfile.flush()
            threading.Thread(target=self.server.shutdown).start()

    def _browser_refusal(self):
        """Why this POST may come from a web page, or None.  A page the user opens can make
        the browser POST to any address it can reach, loopback included; browsers add an
        Origin (and Sec-Fetch-*) header to such requests, oden managers never do.  A page
        served from a name that the attacker points at this machine (DNS rebinding) is
        caught by its Host header, which a worker without a key checks too."""
        for name in self.headers.keys():
            name = name.lower()
            if name == "origin" or name.startswith("sec-fetch-"):
                return ("a web browser's request (Origin: %s): only an oden manager may POST"
                        % peer_text(self.headers.get("Origin"), 80))
        host = self.headers.get("Host")
        if self.server.codec.key is None and not self.server.is_own_host(host):
            return ("Host %s is not this worker's address: put its IP address or host name in "
                    "hosts.txt" % peer_text(host, 80))
        return None

    def _content_length(self):
        """The POST's Content-Length, or None once it is refused (411, 413)."""
        length = self.headers.get("Content-Length", "")
        if not (length.isascii() and length.isdigit()):   # isdigit() alone passes "²": int() fails
            self._refuse(411, "a POST needs a Content-Length")
            return None
        if len(length) > 15 or int(length) > self.server.max_body:
            shown = length if len(length) <= 15 else "a %d-digit number of" % len(length)
            self._refuse(413, "body of %s bytes is over the limit of %d (--max-body)"
                         % (shown, self.server.max_body))
            return None
        return int(length)

    def _read_body(self, length):
        """Read a body whose head proved the key, by its deadline; None if it did not all arrive."""
        deadline = time.monotonic() + self.server.request_timeout + length / SLOWEST_RATE
        self.server.connections.move(self.request, Connections.BODY, deadline)
        body = self.rfile.read(length)
        self.server.connections.move(self.request, Connections.WORKING)
        if len(body) != length:
            self.close_connection = True
            return None
        return body

    def _user_status(self):
        try:
            return str(self.server.show_status())
        except Exception as e:
            return "show_status() raised %s" % one_line(e)

    def _send(self, code, body, content_type, headers=None):
        deadline = time.monotonic() + self.server.request_timeout + len(body) / SLOWEST_RATE
        self.server.connections.move(self.request, Connections.REPLY, deadline)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _malformed(self, why):
        """A signed request whose message the worker cannot serve: 400, logged with its cause."""
        log.warning("bad %s from %s: %s", self.path, self.client_address[0], peer_text(why))
        self._fail(400, "malformed message: %s" % why)

    def _fail(self, code, reason):
        self.close_connection = True
        self._send(code, (reason + "\n").encode(), "text/plain; charset=utf-8",
                   {"Connection": "close"})

    def _refuse(self, code, reason):
        """_fail() for a request that proves no key: logged through the server's Refusals."""
        address = self.client_address[0]
        self.server.refusals.note(address, "refused %s from %s: %s" % (self.path, address, reason))
        self._fail(code, reason)

    def __getattr__(self, attribute):
        if attribute.startswith("do_"):          # PUT, DELETE, ...: 405, not http.server's 501
            why = "method %s is not allowed: use GET or POST" % attribute[3:]
            return lambda: self._fail(405, why)
        raise AttributeError(attribute)

    def handle_one_request(self):
        """One request; its head (and the wait for it) must end by one deadline."""
        self.deadline = time.monotonic() + self.server.request_timeout
        self.server.connections.move(self.request, Connections.IDLE, self.deadline)
        self.rfile.left = MAX_HEAD
        try:
            super().handle_one_request()
        except OSError as e:                     # time-outs, resets, TLS errors, a connection cut
            log.debug("connection from %s dropped: %s", self.client_address[0], one_line(e))
            self.close_connection = True

    def parse_request(self):
        """Called by http.server once the request line is in: the headers come next."""
        self.server.connections.move(self.request, Connections.HEAD, self.deadline)
        return super().parse_request()

    def log_message(self, fmt, *args):
        if log.isEnabledFor(logging.DEBUG):      # called for every request: format only if shown
            log.debug("%s %s", self.client_address[0], peer_text(fmt % args, 300))


class CodeKeeper:
    """The worker's side of "the code of a run": tells the manager which of its files differ
    here, takes a push of them and asks run_worker() to restart in place."""

    def __init__(self, folder, script, pushable, max_push):
        self.folder, self.script = folder, script
        self.pushable = pushable         # None, or why this worker takes no pushes
        self.max_push = max_push
        # Set once by push(), read without a lock: by the handler thread that ran push() (its
        # own write), and by run_worker after serve_forever() returned, which the shutdown
        # that this handler starts orders after it.
        self.restarting = False

    def hello(self, message):
        """What /hello adds: the manager's files that differ here, our script, push or not."""
        manifest = message.get("manifest") if isinstance(message, dict) else None
        if not isinstance(manifest, dict):
            manifest = {}
        return {"stale": stale_paths(manifest, self.folder), "script": self.script,
                "refuses_push": self.pushable}

    def push(self, message, state):
        """Write the pushed files and restart, or say in one line why not."""
        if self.pushable:
            return {"ok": False, "why": self.pushable}
        if state.others_at_work(message.get("run")):
            return {"ok": False, "retry": True,
                    "why": "it runs another run's tasks: it takes the new code when they are done"}
        files = message.get("files") or {}
        size = sum(len(data) for data in files.values())
        if size > self.max_push:
            return {"ok": False, "why": "a push of %d bytes is over its --max-push of %d bytes"
                    % (size, self.max_push)}
        try:
            apply_push(self.folder, files)
        except (ValueError, OSError) as e:     # a path out of the folder, a file not written
            log.warning("push refused: %s", one_line(e))
            return {"ok": False, "why": "push refused, its code is unchanged: %s" % one_line(e)}
        log.info("push: %d files, %d bytes; restarting with the new code", len(files), size)
        self.restarting = True
        return {"ok": True}


class ThreadingServer(http.server.ThreadingHTTPServer):
    """A ThreadingHTTPServer on IPv4 or IPv6 as its address says, bound without the reverse
    DNS lookup HTTPServer.server_bind does (socket.getfqdn of the address: about 1 ms on
    loopback here, seconds where DNS is slow) for a name nothing of ours reads."""

    def __init__(self, address, handler):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class WorkerServer(ThreadingServer):
    """The worker's HTTP server: a thread per connection, at most max_connections of
    them (see Connections), and one accept thread (serve_forever) that also reaps."""
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, state, codec, show_status, max_body, tls=None,
                 max_connections=MAX_CONNECTIONS, request_timeout=REQUEST_READ_TIMEOUT,
                 keeper=None):
        super().__init__(address, WorkerHandler)
        self.state, self.codec, self.keeper = state, codec, keeper
        self.show_status, self.max_body, self.tls = show_status, max_body, tls
        self.request_timeout = request_timeout
        self.refusals = Refusals()
        self.connections = Connections(max_connections, request_timeout, self.refusals)
        self.room = BodyRoom(2 * max_body)
        names = {"localhost", socket.gethostname().lower(), platform.node().lower(),
                 address[0].lower()}
        self.names = names | {name.split(".")[0] for name in names}     # for is_own_host
        self.backoff = ACCEPT_BACKOFF[0]
        self.next_check = 0.0

    def get_request(self):
        try:
            sock, address = super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.connections.out_of_descriptors(e)
                time.sleep(self.backoff)         # the listening socket stays readable: no busy loop
                self.backoff = min(2 * self.backoff, ACCEPT_BACKOFF[1])
            raise
        self.backoff = ACCEPT_BACKOFF[0]
        if self.tls is not None:                 # the handshake runs later, in the handler's thread
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        if not self.connections.admit(sock, address[0]):
            sock.close()
            raise OSError("no room for another connection")      # serve_forever drops it quietly
        return sock, address

    def shutdown_request(self, request):
        self.connections.forget(request)
        super().shutdown_request(request)

    def service_actions(self):
        """Run by serve_forever after every request and every poll_interval: cut connections
        past their deadline, log the counts of refusals whose period is over."""
        now = time.monotonic()
        if now >= self.next_check:
            self.next_check = now + 0.5
            self.connections.reap(now)
            self.refusals.flush(now)

    def handle_error(self, request, client_address):
        """An unexpected error in a handler: one line, the traceback only with -v."""
        log.warning("error serving %s: %s", client_address[0], one_line(sys.exc_info()[1]))
        log.debug("the traceback", exc_info=True)

    def is_own_host(self, header):
        """Whether a Host header names this worker: an IP address, or a name of this machine."""
        host = (header or "").strip().lower()
        if not host:
            return True                          # HTTP/1.0 clients send none; browsers always do
        name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name.rstrip(".") in self.names


def connection_limit(wanted, slots):
    """`wanted`, or fewer when the open-file limit leaves too few descriptors for them
    beside those open now, SPARE_FDS and two per slot (a slot restarting opens a pipe)."""
    if resource is None:
        return wanted
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return wanted
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 16 + 4 * slots
    return max(4, min(wanted, soft - in_use - SPARE_FDS - 2 * slots))


def run_worker(job, args):
    """The `worker` command: serve this machine's slots until Ctrl-C or SIGTERM."""
    key = load_key(args.key_file)
    if key is None and not args.insecure:
        raise OdenError("no key: refusing to start without one (any web page could run code "
                        "here). Run 'python3 oden.py init' on your PC and copy %s here (or set "
                        "$%s), or pass --insecure on a network you trust" % (KEY_FILE, KEY_ENV))
    if key is None:
        log.warning("no key (%s or $%s): anyone who can reach this port can run code here",
                    KEY_FILE, KEY_ENV)
    tls = None
    if args.certfile:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            tls.load_cert_chain(args.certfile, args.keyfile)
        except (OSError, ssl.SSLError) as e:
            raise OdenError("cannot load the certificate %s (%s): check --certfile and --keyfile"
                            % (args.certfile, getattr(e, "strerror", None) or e))
    state = WorkerState(job.calc, args.slots, args.threads, job.name, args.max_body)
    state.code = manifest_digest(code_manifest(job.files))
    keeper = CodeKeeper(script_folder(), os.path.basename(sys.argv[0]),
                        "it was started with --no-push" if args.no_push else
                        "it has no key: pushes need one" if key is None else None, args.max_push)
    state.start_slots()
    limit = connection_limit(args.max_connections, 0 if args.threads else args.slots)
    if limit < args.max_connections:
        log.warning("the open-file limit (ulimit -n) leaves room for %d connections at once: "
                    "raise it (e.g. 'ulimit -n 4096') before starting the worker for more", limit)
    try:
        server = WorkerServer((args.bind, args.port), state, Codec(key), job.show_status,
                              args.max_body, tls, limit, args.request_timeout, keeper)
    except OSError as e:
        state.stop_slots()
        raise OdenError("cannot listen on %s:%s (%s): pick another --port or stop what uses it"
                        % (args.bind, args.port, e.strerror or e))
    host, port = server.server_address[:2]
    shown = "[%s]" % host if ":" in host else host
    mode = "threads" if args.threads else "processes"
    print("oden worker listening on %s://%s:%d (%d slots, %s, code %s)"
          % ("https" if tls else "http", shown, port, state.slots, mode, state.code), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        state.stop_slots()
    if keeper.restarting:
        restart_in_place(port)
    return 0


def restart_in_place(port):
    """Run this worker's command line again in this process (os.execv), on the port it has
    now (also when it was started with --port 0), so the pushed code is the code that runs."""
    argv = [word for word in sys.argv if not word.startswith("--port=")]
    if "--port" in argv[:-1]:
        argv[argv.index("--port") + 1] = str(port)
    else:
        argv += ["--port", str(port)]
    print("oden worker restarting with the pushed code", flush=True)
    logging.shutdown()
    os.execv(sys.executable, [sys.executable] + argv)


# ====================================================================
# Manager: hosts, the shared TaskBoard, one HostRunner thread per host
# ====================================================================

class Host:
    """One line of hosts.txt."""

    def __init__(self, number, address, port, scheme="http"):
        self.number, self.address, self.port, self.scheme = number, address, port, scheme
        self.label = "%s:%d" % ("[%s]" % address if ":" in address else address, port)

    @property
    def uri(self):
        return "%s://%s" % (self.scheme, self.label)


HOST_LINE = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9_.-]+))"
                       r"(?::(?P<port>\d{1,5}))?$")          # host, host:port, [ipv6]:port


def parse_hosts(text, source, scheme="http"):
    """Hosts from text with one per line, spoken to with `scheme` (http, or https with
    --cafile); `source` names the file in errors.  A host listed twice is used once, with a
    warning naming both lines."""
    found, lines = [], {}                # lines: host label -> the line it was first on
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = HOST_LINE.match(line)
        port = int(match.group("port") or DEFAULT_PORT) if match else 0
        if not match or not 0 < port < 65536:
            raise OdenError("%s line %d: %r is not 'host', 'host:port' or '[ipv6]:port' "
                            "(port 1-65535)" % (source, number, raw.strip()[:80]))
        host = Host(len(found) + 1, match.group("v6") or match.group("name"), port, scheme)
        twin = lines.get(host.label.lower())
        if twin is not None:             # two threads on one worker would take its work
            log.warning("%s line %d: %s is listed already on line %d: using it once",
                        source, number, host.label, twin)
            continue
        lines[host.label.lower()] = number
        found.append(host)
    return found


def read_hosts(setting, hosts_file, scheme="http"):
    """The hosts to use: the user section's `hosts` text or list, else the hosts file; see
    parse_hosts()."""
    if hosts_file is None and setting is not None:
        text = setting if isinstance(setting, str) else "\n".join(setting)
        return parse_hosts(text, "the 'hosts' setting", scheme)
    path = hosts_file or os.path.join(script_folder(), HOSTS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise OdenError("cannot read hosts file %s (%s): create it with one 'host:port' a line, "
                        "or try 'python3 oden.py local'" % (path, e.strerror or e))
    except UnicodeDecodeError:
        raise OdenError("hosts file %s is not text: write one 'host:port' a line" % path)
    found = parse_hosts(text, path, scheme)
    if not found:
        raise OdenError("no hosts in %s: add one 'host:port' a line, or try 'python3 oden.py "
                        "local'" % path)
    return found


class HostError(Exception):
    """A request to a host failed; the text says why and what to do.

    `kind` says what the failure means for the tasks the host held, because
    only a worker's death may count against a task (--max-deaths):
      GONE       the connection was refused or closed without an answer: the worker
                 may have died; the next connect() tells (same boot id: it did not);
      TIMEOUT    no answer within --timeout: a slow link or a busy machine, an attempt;
      RESTARTED  the worker answers with a new boot id: what it held died with it;
      REFUSED    a refusal that lasts until the user acts (wrong key, other code, not an
                 oden worker, an HTTP 4xx): the host gets no work, and when every host
                 refuses, the run stops at once (exit 2).
    """

    def __init__(self, reason, kind):
        super().__init__(reason)
        self.kind = kind


GONE, TIMEOUT, RESTARTED, REFUSED = "gone", "timeout", "restarted", "refused"
OURS = "ours"                            # a bug in the manager: never the worker's fault


class HostClient:
    """The manager's line to one worker: a kept-alive HTTP connection (or a new one for each
    request with keepalive=False), every body sealed and opened by the Codec.

    send() sends a request and receive() reads its answer, so the caller can do other work
    (write the last results) while the worker works; call() does both.  connect() keeps the
    worker's boot id, which every later request carries so that none reaches a restarted
    worker; forget() drops it with the line.  Failures raise HostError (see its kinds).
    Used by one thread at a time.
    """

    def __init__(self, host, codec, request_timeout, tls=None, keepalive=True, max_reply=MAX_REPLY):
        self.host, self.codec, self.timeout, self.tls = host, codec, request_timeout, tls
        self.keepalive, self.max_reply = keepalive, max_reply
        self.boot = None                 # the worker's boot id, from connect()
        self.connection = None           # the http.client connection, opened when needed
        self.sending = None              # (path, message, seconds) of the request in flight
        self.request = None              # its PendingRequest, until its answer is read
        self.ticket = None               # what opens its answer (Codec.seal_request)
        self.retried = False             # it was sent again on a new line already

    def connect(self, manifest):
        """Say hello with our code's manifest: return the worker's answer and keep its boot id."""
        hello = self.call("/hello", {"manifest": manifest})
        self.boot = hello["boot"]
        return hello

    def forget(self):
        """Close the line and forget the worker's boot id: the next request is a connect()."""
        self.close()
        self.boot = None

    def call(self, path, message, extra_wait=0):
        """Send a message and return the worker's answer."""
        self.send(path, message, extra_wait)
        return self.receive()

    def send(self, path, message, extra_wait=0):
        """Send a message; receive() reads the answer, which the worker may hold back for
        `extra_wait` s beyond the request timeout (a long poll)."""
        self.sending = (path, message, self.timeout + extra_wait)
        self.retried = not (self.keepalive and self.connection is not None)   # a new line
        self._step(self._post)

    def receive(self):
        """The answer to what send() sent, checked and unpickled."""
        status, header, reply = self._step(self._answer)
        if status != 200:
            raise self._refusal(status, reply)
        try:
            answer = self.codec.open_reply(self.ticket, status, header, reply)
        except AuthError as e:
            raise HostError(str(e), REFUSED)
        except Exception as e:
            answer = e
        if not isinstance(answer, dict):     # every answer of a worker is a dict
            why = " (%s)" % one_line(answer) if isinstance(answer, Exception) else ""
            raise HostError("its answer is not an oden message%s: is that port really an oden "
                            "worker?" % why, REFUSED)
        return answer

    def _step(self, step):
        """step(), its failures raised as HostError with the line closed.  A kept-alive line
        the worker closed while it idled fails the first request on it: that request goes
        again, once, on a new line."""
        try:
            return step()
        except IDLE_CLOSED as e:
            self.close()
            if self.retried:
                raise HostError(explain_network_error(e, self.sending[2]), GONE) from None
            self.retried = True
        except BaseException as e:
            self.close()
            raise self._failure(e)
        if step == self._answer:
            self._step(self._post)
        return self._step(step)

    def _failure(self, error):
        """What a failed step means: a HostError, or the error itself (a deadline's HostError,
        or a bug)."""
        seconds = self.sending[2]
        if isinstance(error, socket.timeout):
            return HostError(explain_network_error(error, seconds), TIMEOUT)
        if isinstance(error, (OSError, http.client.HTTPException)):
            return HostError(explain_network_error(error, seconds), GONE)
        return error

    def _post(self):
        """Seal and send the request in `sending`.  All of it, with its answer, ends within its
        seconds plus len(body) / SLOWEST_RATE for the upload, whatever the worker does: see
        PendingRequest.  Redirects are never followed."""
        path, message, seconds = self.sending
        body, headers, self.ticket = self.codec.seal_request(path, message, self.boot)
        headers = dict(headers, **{"Content-Type": "application/octet-stream"})
        if not self.keepalive:
            headers["Connection"] = "close"
        if self.connection is None:
            self.connection = (http.client.HTTPSConnection(self.host.address, self.host.port,
                                                           context=self.tls)
                               if self.tls else
                               http.client.HTTPConnection(self.host.address, self.host.port))
        self.request = PendingRequest(self.connection, "POST", path, body, headers,
                                      seconds + body_size(body) / SLOWEST_RATE)

    def _answer(self):
        """The answer's (status, auth header, body).  An answer over max_reply bytes
        (SMALL_REPLY for /hello) raises HostError unread, and an error answer's text comes
        back escaped and cut to one line (peer_text)."""
        limit, hint = ((SMALL_REPLY, "that port is not an oden worker")
                       if self.sending[0] == "/hello" else
                       (self.max_reply, "pass a larger --max-reply if results are that large"))
        response, data = self.request.answer(limit, hint)
        self.request = None
        if response.will_close or not self.keepalive or not response.isclosed():
            self.close()
        if response.status != 200:
            data = peer_text(data).encode()
        return response.status, response.getheader(AUTH_HEADER), data

    def _refusal(self, status, reply):
        """The HostError for a reply other than 200: what the worker said, and what it means."""
        lines = reply.decode("utf-8", "replace").strip().splitlines()
        said = "HTTP %d: %s" % (status, lines[0] if lines else "no reason given")   # peer_text'ed
        if status == 409:
            return HostError(said, RESTARTED)
        if status == 401 and self.codec.key is None:
            return HostError(said + " (it has a key and we send none: run without --insecure, "
                             "with the worker's oden.key next to this script)", REFUSED)
        if status in (401, 403) and "signature" in said:
            return HostError(said + " (is the worker's oden.key the same as ours?)", REFUSED)
        return HostError(said, REFUSED if 400 <= status < 500 else GONE)

    def close(self):
        """Close the line; a request in flight is abandoned."""
        if self.request is not None:
            self.request.abandon()
            self.request = None
        if self.connection is not None:
            self.connection.close()
            self.connection = None


IDLE_CLOSED = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class PendingRequest:
    """One request on an http.client connection, sent, its answer to be read by answer().

    All of it, connecting, sending and receiving, ends within `seconds`, however slowly the
    peer answers (the Watchdog cuts it off; else HostError TIMEOUT); the time between the
    sending and answer() is the caller's and does not count.  A 200 answer over `limit`
    bytes raises HostError without being read (`hint` says what to do); an error answer's
    body is cut to SMALL_REPLY.  Other failures raise what http.client raises.
    """

    def __init__(self, connection, method, path, body, headers, seconds):
        self.connection, self.seconds = connection, seconds
        connection.timeout = seconds     # connecting, and each read or write on its own
        if connection.sock is not None:
            connection.sock.settimeout(seconds)
        self.watch = WATCHDOG.arm(connection, seconds)
        self._within(connection.request, method, path, body, headers)
        WATCHDOG.pause(self.watch)

    def answer(self, limit, hint):
        """(response, body of the answer)."""
        WATCHDOG.resume(self.watch)
        response = self._within(self.connection.getresponse)
        data = self._within(read_answer, response, limit, hint)
        if WATCHDOG.disarm(self.watch):
            self.connection.close()      # cut as the answer came: keep it, not the connection
        return response, data

    def abandon(self):
        """Its answer will not be read: stop watching it."""
        WATCHDOG.disarm(self.watch)

    def _within(self, step, *args):
        try:
            return step(*args)
        except (OSError, http.client.HTTPException):
            if WATCHDOG.disarm(self.watch):
                raise HostError("no whole answer within %g s (--timeout): it answers too slowly, "
                                "or that port is not an oden worker" % round(self.seconds, 1),
                                TIMEOUT) from None
            raise
        except BaseException:
            WATCHDOG.disarm(self.watch)
            raise


def http_request(connection, method, path, body, headers, seconds, limit, hint):
    """One request and its answer: (response, body of the answer); see PendingRequest."""
    return PendingRequest(connection, method, path, body, headers, seconds).answer(limit, hint)


def read_answer(response, limit, hint):
    """The body of an answer, refused unread when a 200 answer is over `limit` bytes."""
    if response.status != 200:
        return response.read(SMALL_REPLY)            # its text is shown cut to one line anyway
    if response.length is not None:
        if response.length > limit:
            raise HostError("its answer of %d bytes is over the limit of %d: %s"
                            % (response.length, limit, hint), REFUSED)
        return response.read()
    chunks, size = [], 0                             # no length given: read until it ends
    while size <= limit:
        chunk = response.read(min(2 ** 20, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
    raise HostError("its answer is over the limit of %d bytes: %s" % (limit, hint), REFUSED)


class Watchdog:
    """Cuts off requests that run past their deadline.

    A socket time-out bounds each read on its own, not a whole request: a peer
    that drips one byte a second would hold a request, its host thread and the
    end of the run for ever.  So each request is armed with its deadline, and a
    thread that wakes every WATCH_EVERY s shuts down the socket of one past it;
    the request then fails at once.  The lock is held during a shutdown too, so
    a request disarmed in time is never touched.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.armed = {}              # token -> [deadline (None: paused), connection, cut, s left]
        self.tokens = 0
        self.thread = None

    def arm(self, connection, seconds):
        """Watch an http.client connection for `seconds`; returns the token for the other calls."""
        with self.lock:
            self.tokens += 1
            self.armed[self.tokens] = [time.monotonic() + seconds, connection, False, None]
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
                self.thread.start()
            return self.tokens

    def pause(self, token):
        with self.lock:
            entry = self.armed[token]
            if entry[0] is not None:
                entry[0], entry[3] = None, entry[0] - time.monotonic()

    def resume(self, token):
        with self.lock:
            entry = self.armed[token]
            if entry[0] is None:
                entry[0] = time.monotonic() + entry[3]

    def disarm(self, token):
        """Stop watching; True if the deadline had passed and the connection was cut."""
        with self.lock:
            return self.armed.pop(token, (None, None, False))[2]    # once only: then no-op

    def _run(self):
        while True:
            time.sleep(WATCH_EVERY)              # not woken per request: that costs a thread switch
            now = time.monotonic()
            with self.lock:
                for entry in self.armed.values():
                    if entry[0] is not None and entry[0] < now and not entry[2]:
                        entry[2] = True
                        sock = entry[1].sock
                        if sock is not None:
                            with contextlib.suppress(OSError):
                                socket.socket.shutdown(sock, socket.SHUT_RDWR)


WATCHDOG = Watchdog()


def explain_network_error(error, seconds):
    if isinstance(error, socket.gaierror):
        return "host name not found (%s): check its spelling in the hosts file" % error.strerror
    if isinstance(error, ConnectionRefusedError):
        return "connection refused: is 'python3 oden.py worker' running there, on that port?"
    if isinstance(error, socket.timeout):
        return ("no answer within %g s (--timeout): the machine may be down, a firewall may drop "
                "the port, or the link is too slow for this much data: raise --timeout" % seconds)
    if isinstance(error, ssl.SSLError):
        return ("TLS failed (%s): check --cafile and the worker's --certfile"
                % getattr(error, "reason", error))
    if isinstance(error, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                          http.client.BadStatusLine)):
        return ("connection closed without an answer: the worker died, that port is not an oden "
                "worker, or the worker serves TLS (then pass --cafile)")
    return peer_text(one_line(error))          # e.g. http.client's errors quote what the peer sent


class TaskBoard:
    """The manager's shared queue and ledger of every task of the run, by index.

    All fields are guarded by `changed`'s lock; every change that gives a
    waiting thread something to do (tasks back in the queue, the run's end,
    a stop) notifies it, so waiting threads wake on news instead of polling.
    Read without the lock, and only there: `finished` and `stopping` by the
    loops of the host threads and drive() (one read of a reference each; a
    stale answer costs one more turn of the loop, which reads it again), and
    `total` (never changes).
    """

    def __init__(self, indices, max_attempts, max_deaths):
        self.changed = threading.Condition()
        self.pending = collections.deque(indices)
        self.unfinished = set(indices)
        self.total = len(self.unfinished)
        self.copies = collections.Counter()      # index -> hosts holding it now
        self.sent_at = {}                        # index -> when the newest copy was sent
        self.attempts = collections.Counter()
        self.deaths = collections.Counter()
        self.max_attempts, self.max_deaths = max_attempts, max_deaths
        self.stopping = False
        self.total_slots = 0                     # slots of the hosts that are up (batch sizes)
        self.hunger = 0                          # slots of idle hosts waiting for work now
        self.waiting = {}                        # host number -> indices queued on it, not started
        self.batches = 0                         # batch ids handed out
        self.asked = 0                           # batches asked back, answers not yet in

    @property
    def finished(self):
        return not self.unfinished

    def add_slots(self, count):
        with self.changed:
            self.total_slots += count

    def take(self, count):
        """Up to `count` tasks to send now (none once stopping)."""
        taken = []
        with self.changed:
            while self.pending and len(taken) < count and not self.stopping:
                index = self.pending.popleft()
                if index in self.unfinished:
                    self._hand_out(index)
                    taken.append(index)
        return taken

    def _hand_out(self, index):
        """A copy of the task goes to a host now."""
        self.copies[index] += 1
        self.sent_at[index] = time.monotonic()

    def take_straggler(self, min_age):
        """A task to run a backup copy of (--speculate), or None: only at the end (nothing in
        the queue, nothing waiting on any worker), only one that runs (not one waiting in a
        worker's queue), has run over `min_age` s and has no backup copy yet."""
        now = time.monotonic()
        with self.changed:
            if self.pending or self.stopping or any(self.waiting.values()):
                return None
            single = [i for i in self.unfinished
                      if self.copies[i] == 1 and now - self.sent_at[i] > min_age]
            if not single:
                return None
            index = min(single, key=self.sent_at.__getitem__)
            self._hand_out(index)
            return index

    @contextlib.contextmanager
    def hungry(self, slots):
        """While a host with `slots` idle waits for work: hosts with batches waiting on their
        worker give them back to the queue meanwhile (see HostRunner.request)."""
        with self.changed:
            self.hunger += slots
        try:
            yield
        finally:
            with self.changed:
                self.hunger -= slots

    def outlook(self):
        """(tasks in the queue, slots of the hosts that are up, slots idle for want of work that
        the queue will not fill): what a HostRunner sizes its batches and prefetch by."""
        with self.changed:
            queued = len(self.pending)
            return queued, self.total_slots, max(0, self.hunger - queued)

    def ask_back(self, waiting):
        """How many of the `waiting` batches (queued on a host's worker, not started) to ask
        it to give back now: one for each slot idle elsewhere that neither the queue nor the
        asks of other hosts will fill.  Reserved until asked_back()."""
        with self.changed:
            wanted = min(waiting, max(0, self.hunger - len(self.pending) - self.asked))
            self.asked += wanted
            return wanted

    def asked_back(self, count):
        """The answer to an ask of `count` batches is in: what came back is in the queue."""
        if count:
            with self.changed:
                self.asked -= count

    def note_waiting(self, host_number, indices):
        """The tasks waiting (queued, not started) on a host's worker, as of its last answer."""
        with self.changed:
            self.waiting[host_number] = indices

    def give_back(self, indices, reason, died=False):
        """Tasks a host lost (`died`: the host died while they were on it).
        Requeue them; return [(index, why)] for those past their limits."""
        failed, again = [], []
        with self.changed:
            for index in indices:
                self.copies[index] -= 1
                if index not in self.unfinished:
                    continue
                self.attempts[index] += 1
                if died:
                    self.deaths[index] += 1
                if self.deaths[index] >= self.max_deaths:
                    failed.append((index, self._death_toll(index)))
                elif self.attempts[index] >= self.max_attempts:
                    failed.append((index, "gave up after %d attempts: %s"
                                   % (self.attempts[index], reason)))
                elif self.copies[index] == 0:
                    again.append(index)
            self.pending.extendleft(reversed(again))     # first in the queue, in their order
            self.changed.notify_all()
        return failed

    def put_back(self, indices):
        """Tasks taken but not sent after all (they did not fit the request): to the front of
        the queue, no attempt counted."""
        with self.changed:
            for index in reversed(indices):
                self.copies[index] -= 1
                if index in self.unfinished and self.copies[index] == 0:
                    self.pending.appendleft(index)
            self.changed.notify_all()

    def count_deaths(self, indices):
        """The worker that held `indices` (given back already) is known dead now: count a
        death for each; return [(index, why)] for those now past --max-deaths and not running
        anywhere (one running elsewhere is judged when that copy ends)."""
        failed = []
        with self.changed:
            for index in indices:
                if index in self.unfinished:
                    self.deaths[index] += 1
                    if self.deaths[index] >= self.max_deaths and self.copies[index] == 0:
                        failed.append((index, self._death_toll(index)))
        return failed

    def _death_toll(self, index):
        return "worker died %d times while running this task" % self.deaths[index]

    def release(self, indices):
        """A host's copies are answered (finished or not)."""
        with self.changed:
            for index in indices:
                self.copies[index] -= 1

    def finish(self, indices):
        """Tasks whose outcomes are claimed (ResultStore.claim) are finished."""
        with self.changed:
            self.unfinished.difference_update(indices)
            if not self.unfinished:      # a task's end gives no waiter work: waking every idle
                self.changed.notify_all()    # host per result would cost O(hosts) CPU per task

    def new_batch_id(self):
        """A batch id no other batch of this run has (a worker keeps each run's apart)."""
        with self.changed:
            self.batches += 1
            return self.batches

    def wait(self, seconds):
        """Wait for any news (or `seconds`), unless the run has ended or stopped already."""
        with self.changed:
            if self.unfinished and not self.stopping:
                self.changed.wait(seconds)

    def sleep(self, seconds):
        """Wait `seconds`, or less if the run ends or stops."""
        deadline = time.monotonic() + seconds
        with self.changed:
            while not self.stopping and self.unfinished and time.monotonic() < deadline:
                self.changed.wait(deadline - time.monotonic())

    def stop(self):
        with self.changed:
            self.stopping = True
            self.changed.notify_all()

    def counts(self):
        with self.changed:
            in_flight = sum(1 for i in self.unfinished if self.copies[i] > 0)
            return self.total - len(self.unfinished), in_flight, len(self.unfinished)

    def ages(self, indices):
        """{index: seconds since its newest copy was sent} for those of `indices` still
        unfinished (the dashboard's oldest and slowest tasks; O(len(indices)))."""
        with self.changed:
            now = time.monotonic()
            return {i: now - self.sent_at[i] for i in indices
                    if i in self.unfinished and i in self.sent_at}


class Fleet:
    """Which hosts are up or refuse us; lets the main thread notice when all have been down
    too long, or when every host refuses work for a reason only the user can fix."""

    def __init__(self, hosts):
        self.lock = threading.Lock()
        self.hosts = hosts
        self.up = set()
        self.refused = {}                # host number -> why it refuses us
        self.all_down_since = time.monotonic()

    def mark(self, host, is_up):
        with self.lock:
            (self.up.add if is_up else self.up.discard)(host.number)
            if is_up:
                self.refused.pop(host.number, None)
            if self.up:
                self.all_down_since = None
            elif self.all_down_since is None:
                self.all_down_since = time.monotonic()

    def refuse(self, host, reason):
        self.mark(host, False)
        with self.lock:
            self.refused[host.number] = reason

    def down_for(self):
        with self.lock:
            return 0 if self.all_down_since is None else time.monotonic() - self.all_down_since

    def snapshot(self):
        """(host numbers that are up, {host number: why it refuses us}), copies."""
        with self.lock:
            return set(self.up), dict(self.refused)

    def every_host_refuses(self):
        """{reason: [host labels]} when every host refuses us, else None."""
        with self.lock:
            if len(self.refused) < len(self.hosts):
                return None
            causes = collections.OrderedDict()
            for host in self.hosts:
                causes.setdefault(self.refused[host.number], []).append(host.label)
            return causes


RESTART_WAIT = 60                    # seconds a pushed worker may take to restart and answer again


def push_code(client, host, manifest, hello, run_id, max_push, name):
    """Bring a worker whose `hello` lists stale files to our code: push them, wait for it to
    restart in place and return its new hello.  HostError(REFUSED) with the reason and the fix
    when it cannot be done (another project's worker, no key, --no-push, another script, too
    large, a failed write);
    HostError(TIMEOUT) when it is busy with another run's tasks (asked again later)."""
    stale, ours = hello["stale"], os.path.basename(sys.argv[0])
    named = ", ".join(stale[:5]) + (", ..." if len(stale) > 5 else "")
    what = "worker %d runs other code (%d files differ: %s)" % (host.number, len(stale),
                                                                 printable(named))
    if hello.get("name") != name:        # its files are another project's: never overwrite them
        raise HostError("worker %d runs another project's job (%s, not %r): start this project's "
                        "worker there, on another --port" % (host.number, peer_text(
                            repr(hello.get("name")), 80), name), REFUSED)
    if client.codec.key is None:
        raise HostError(what + ": copy the project there yourself (pushes need a key: run "
                        "without --insecure)", REFUSED)
    if hello.get("refuses_push"):
        raise HostError("%s and refuses pushes (%s): copy the project there yourself"
                        % (what, printable(str(hello["refuses_push"]))), REFUSED)
    if hello.get("script") != ours:
        raise HostError("%s: it was started as %r, not %r: start it as 'python3 %s worker'"
                        % (what, printable(str(hello.get("script"))), ours, ours), REFUSED)
    files = {}
    for relative in stale:
        if relative not in manifest:
            raise HostError("worker %d asks for %r, which is no file of this run" % (
                host.number, printable(str(relative))), REFUSED)
        with open(os.path.join(script_folder(), *relative.split("/")), "rb") as f:
            files[relative] = f.read()
    size = sum(len(data) for data in files.values())
    if size > max_push:
        raise HostError("%s: a push of %d bytes is over --max-push (%d): copy the project there "
                        "yourself, or raise --max-push" % (what, size, max_push), REFUSED)
    log.info("%s: %s; pushing them (%d bytes)", host.label, what, size)
    try:
        answer = client.call("/push", {"run": run_id, "files": files})
    except HostError as e:
        if e.kind != GONE:
            raise
        answer = {"ok": True}            # the restart can beat its answer: the new hello tells
    if not answer.get("ok"):
        why = printable(str(answer.get("why")))
        raise HostError("push to worker %d failed: %s" % (host.number, why),
                        TIMEOUT if answer.get("retry") else REFUSED)
    fresh = wait_for_restart(client, hello["boot"], manifest)
    if fresh.get("stale"):
        still = printable(", ".join(fresh["stale"][:5]))
        raise HostError("worker %d still runs other code after a push (%s): copy the project "
                        "there yourself" % (host.number, still), REFUSED)
    log.info("%s: runs our code now (pushed %d files, %d bytes)", host.label, len(files), size)
    return fresh


def wait_for_restart(client, old_boot, manifest):
    """The first hello of the worker after its restart (a boot id other than `old_boot`)."""
    deadline = time.monotonic() + RESTART_WAIT
    while True:
        try:
            hello = client.connect(manifest)
            if hello.get("boot") != old_boot:
                return hello
        except HostError as e:
            if e.kind not in (GONE, TIMEOUT) or time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise HostError("the worker did not restart within %d s after a push" % RESTART_WAIT,
                            TIMEOUT)
        time.sleep(0.1)


class HostRunner:
    """Feeds one host for the whole run: connect, keep its slots busy, poll,
    and give tasks back to the board when the host fails.

    drive() calls it (in the host's thread) and snapshot() (from the page's thread).
    Each turn of its loop is one round: take batches from the board (take_batches),
    send them or a poll with the acks (exchange), save the previous answer's outcomes
    while the worker works (save_arrived -> settle), receive the answer, then check
    it against what was sent (_answered) and release or requeue what it says.

    Only a worker's death counts against the tasks it held (--max-deaths): when
    the line to a host breaks (GONE) it is asked at once whether it lives
    (verdict()): if so, with the same boot id, it keeps its tasks; if it is dead,
    they go back to the queue with a death each.  When nobody can tell (no
    answer, TIMEOUT) they go back as an attempt and stay `suspects` until the
    next connect() tells whether the worker died or lived.
    """

    def __init__(self, run, host):
        self.host = host
        self.context, self.board, self.fleet = run.context, run.board, run.fleet
        self.tasks, self.store, self.call_user = run.tasks, run.store, run.call_user
        self.mean_task_bytes = run.mean_task_bytes
        context = run.context
        self.client = HostClient(host, Codec(context.key), context.timeout, context.tls,
                                 context.keepalive, context.max_reply)
        self.in_flight = {}              # batch id -> [task indices]
        self.waiting = []                # ids of the batches in flight that no slot has started
        self.arrived = []                # reports of the last answer, saved during the next request
        self.acks = []                   # ids of the batches received, acked in the next request
        self.slots = 0                   # the worker's slots, from its hello
        self.max_body = MAX_BODY         # the worker's --max-body, from its hello
        self.up = False                  # connected, its slots counted on the board
        self.last_boot = None            # boot id of the worker we last talked to
        self.suspects = []               # tasks it held when the line broke (connect() tells
                                         # whether the worker died with them)
        self.mean_task = None            # seconds, running average from the worker's reports
        self.finished_told = False       # handle_finish_machine was called since connect()
        self.down_reason = None          # why it is down, as last logged (logged once)

    def snapshot(self):
        """What the dashboard shows of this host: {"slots", "tasks" (indices in flight),
        "down_reason"}.  Called from another thread without a lock: only this host's thread
        writes these fields, each read is of one object, and dict.copy() of in_flight is one
        atomic step (under the GIL, or the dict's own lock in a free-threaded Python)."""
        in_flight = self.in_flight.copy()
        return {"slots": self.slots, "down_reason": self.down_reason,
                "tasks": [i for indices in in_flight.values() for i in indices]}

    # -- the loop --------------------------------------------------------
    def __call__(self):
        board, context = self.board, self.context
        backoff = BACKOFF[0]
        while not board.finished and not board.stopping and not self.store.failure:
            try:
                if not self.up:
                    self.connect()
                    backoff = BACKOFF[0]
                batches = self.take_batches()
                wait = min(context.interval_polling, context.timeout / 2)
                if batches:
                    self.exchange(batches, wait)
                elif self.in_flight:
                    with board.hungry(self.idle_slots()):
                        self.exchange([], wait)
                else:
                    self.save_arrived()
                    self.idle()
            except HostError as e:
                died = self.verdict() if e.kind == GONE and self.in_flight else None
                if died is False:
                    log.info("%s: the line broke (%s); the worker lives and keeps its tasks",
                             self.host.label, e)
                    continue
                self.lost(e, died)
                board.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF[1])
            except Exception:
                log.exception("%s: unexpected error in the manager (a bug: please report it with "
                              "this traceback); its tasks go back to the queue", self.host.label)
                self.lost(HostError("unexpected error in the manager", OURS), died=False)
                board.sleep(backoff)
        self.collect_last()
        if board.finished and self.up:
            self.tell_finished()         # the host that ran the last tasks never went idle
        self.client.close()

    def connect(self):
        try:
            hello = self.client.connect(self.context.manifest)
        except HostError as e:
            if e.kind == GONE:
                self._judge_suspects(died=True)          # it stopped answering while it held them
            raise
        self._judge_suspects(died=hello["boot"] != self.last_boot)
        if hello.get("stale"):
            hello = push_code(self.client, self.host, self.context.manifest, hello, self.context.id,
                              self.context.max_push, self.context.name)
        self.last_boot, self.up = hello["boot"], True
        self.slots, self.max_body = int(hello["slots"]), int(hello.get("max_body", MAX_BODY))
        self.board.add_slots(self.slots)
        self.fleet.mark(self.host, True)
        self.finished_told = False
        log.info("%s is up: %d slots, Python %s", self.host.label, self.slots,
                 printable(str(hello.get("python"))))
        self.down_reason = None

    def take_batches(self):
        """New batches from the board, so that the host holds slots + prefetch() of them,
        in one request no larger than the worker's --max-body and, past its first batch, than
        REQUEST_BYTES (a request is a copy of its tasks in the manager's memory)."""
        batches, room = [], self.max_body - REQUEST_ENVELOPE
        queued, all_slots, unmet = self.board.outlook()
        tail = queued < all_slots        # the end of the run: what is left goes to free slots
        held = self.slots if unmet or tail else self.slots + self.prefetch()
        while len(self.in_flight) + len(batches) < held:      # no prefetch while hosts idle
            indices = self.board.take(self.chunk())
            if not indices and self.context.speculate and not self.in_flight and not batches:
                straggler = self.board.take_straggler(2 * (self.mean_task or 0))
                indices = [straggler] if straggler is not None else []
                if indices:
                    log.info("%s runs a backup copy of straggler task %d", self.host.label,
                             straggler)
            if not indices:
                break
            indices, room = self._fit(indices, room)
            if indices:
                batches.append((self.board.new_batch_id(), indices))
            if room <= 0 or self.max_body - REQUEST_ENVELOPE - room >= REQUEST_BYTES:
                break
        for batch_id, indices in batches:
            self.in_flight[batch_id] = indices
            log.debug("%s gets tasks %s", self.host.label, indices)
        return batches

    def _fit(self, indices, room):
        """The leading tasks of `indices` whose pickles fit in `room` bytes, and the room left
        (0 once one did not fit: it goes back to the queue for the next request).  A task
        larger than the worker's whole limit can never go there: it is that task's error."""
        kept = []
        for position, index in enumerate(indices):
            size = self.tasks.size(index) + ITEM_ENVELOPE
            if size > self.max_body - REQUEST_ENVELOPE:
                self.board.release([index])
                self.settle([error_report(
                    index, "task %d is %d bytes pickled, over the --max-body of %d bytes of "
                    "worker %d" % (index, size, self.max_body, self.host.number),
                    "TaskTooLarge: %d bytes, over the worker's --max-body of %d: start the worker "
                    "with a larger --max-body" % (size, self.max_body))])
            elif size <= room:
                kept.append(index)
                room -= size
            else:
                self.board.put_back(indices[position:])
                return kept, 0
        return kept, room

    def prefetch(self):
        """Batches a host holds beyond its slots: one per slot, so a slot that ends finds
        its next batch there even when all end together; more while batches are very short,
        one when they are long (at the end of a run a held batch waits while others idle),
        none when they are big (PREFETCH_BYTES: a held batch costs the worker its memory)."""
        if self.mean_task_bytes * self.chunk() > PREFETCH_BYTES:
            return 0
        batch = None if self.mean_task is None else self.mean_task * self.chunk()
        if batch is not None and batch < SHORT_BATCH:
            return max(self.slots, PREFETCH_SHORT)
        if batch is not None and batch > LONG_BATCH:
            return 1
        return max(self.slots, PREFETCH)

    def chunk(self):
        """Tasks per batch: the user's chunksize, or enough for BATCH_SECONDS, capped so that
        every slot gets work (half the queue's share of a slot: one task each at the end)."""
        if self.context.chunksize:
            return self.context.chunksize
        if self.mean_task is None:
            return 1
        queued, all_slots, _ = self.board.outlook()
        fair = max(1, queued // max(1, 2 * all_slots))
        return max(1, min(MAX_CHUNK, int(BATCH_SECONDS / max(self.mean_task, 1e-6)), fair))

    def idle_slots(self):
        """Slots of the worker with nothing to run, as of its last answer: none while a batch
        waits there, else its slots less the batches that run (batches just sent count as
        running)."""
        if self.waiting:
            return 0
        return max(0, self.slots - len(self.in_flight))

    def exchange(self, batches, wait, bye=False):
        """One request: submit the new batches (if any) and wait up to `wait` s for finished
        ones; with `bye`, the worker then forgets this run and stops what it still runs of it."""
        message = self.request(batches, wait, bye)
        try:
            self.client.send("/submit" if batches else "/poll", message, extra_wait=wait)
            self.save_arrived()          # the last answer's outcomes are saved while it works
            reply = self.client.receive()
            for batch_id in reply.get("busy", ()):
                self.board.put_back(self.in_flight.pop(batch_id))
            self._moved(reply.get("returned", ()))
        finally:
            self.board.asked_back(message.get("give_back", 0))
        arrived = []
        for batch_id, reports in reply["done"]:
            self.acks.append(batch_id)
            arrived += self._answered(batch_id, reports)
        for report in arrived:
            self._learn(report)
        self.arrived += arrived
        active = set(reply["active"])
        lost = [b for b in self.in_flight if b not in active]
        if lost and not bye:
            self._give_back(lost, "the worker lost them (did it restart?)")
        self._note_waiting(reply.get("queued", ()))
        self._check_boot(reply["boot"])

    def request(self, batches, wait, bye=False):
        """The message of one exchange: acks, new batches, or a goodbye; and while slots idle
        elsewhere with nothing in the queue for them, a request to give back that many batches
        still waiting here (none when submitting: the worker would give back the ones just
        sent)."""
        message = {"run": self.context.id, "ack": self._take_acks(), "wait": wait}
        if bye:
            message["bye"] = True
        elif not batches and self.waiting:
            asked = self.board.ask_back(len(self.waiting))
            if asked:
                message["give_back"] = asked
        if batches:
            limit, tasks = self.context.task_timeout, self.tasks
            message["batches"] = [(b, [(i, tasks.wire(i)) for i in indices], limit)
                                  for b, indices in batches]
        return message

    def _moved(self, batch_ids):
        """Batches the worker gave back before a slot started them: to the queue, for a host
        that idles (no attempt counted: nothing failed)."""
        indices = [i for b in batch_ids if b in self.in_flight for i in self.in_flight.pop(b)]
        if indices:
            self.board.put_back(indices)
            log.info("%s: %d waiting tasks move to idle hosts", self.host.label, len(indices))

    def _note_waiting(self, batch_ids):
        self.waiting = [b for b in batch_ids if b in self.in_flight]
        self.board.note_waiting(self.host.number,
                                    [i for b in self.waiting for i in self.in_flight[b]])

    def _answered(self, batch_id, reports):
        """The reports of a finished batch that belong to it.  A report of a task the batch
        did not hold is dropped, and a task it held without a report goes back to the queue:
        whatever a worker answers, no result lands on another task and none is lost.  (A batch
        given back earlier may still come in: its reports are kept, a duplicate is dropped
        when claimed.)"""
        reports = [r for r in reports if type(r.get("index")) is int]   # not 1.0, not True
        indices = self.in_flight.pop(batch_id, None)
        if indices is None:
            return [r for r in reports if 0 <= r["index"] < len(self.tasks)]
        held = set(indices)
        kept = [r for r in reports if r["index"] in held]
        unanswered = held - {r["index"] for r in kept}
        if len(kept) != len(reports) or unanswered:
            log.warning("%s answered batch %d with %d reports for %d tasks: %d dropped, %d run "
                        "again", self.host.label, batch_id, len(reports), len(indices),
                        len(reports) - len(kept), len(unanswered))
        self.board.release([i for i in indices if i not in unanswered])
        if unanswered:
            self._fail_tasks(self.board.give_back(sorted(unanswered), "the worker lost its result"))
        return kept

    def save_arrived(self):
        arrived, self.arrived = self.arrived, []
        if arrived:
            self.settle(arrived)

    def settle(self, reports):
        """Claim the outcomes in `reports` (each task's first outcome wins), mark them finished on
        the board and save them as file records."""
        claimed = self.store.claim(self.host, reports)
        self.board.finish([report["index"] for report in claimed])
        self.store.save(self.host, claimed)

    def idle(self):
        """Nothing in flight and nothing to take: tell the user once, then wait for news."""
        queued, _, _ = self.board.outlook()
        if not queued:
            self.tell_finished()
        with self.board.hungry(self.slots):
            self.board.wait(self.context.interval_polling)

    def tell_finished(self):
        """handle_finish_machine, once per connection to the host."""
        if not self.finished_told:
            self.finished_told = True
            self.call_user("handle_finish_machine", self.host.uri, self.context.name)

    def collect_last(self):
        """At the run's end or stop: pick up results already waiting and say goodbye (the
        worker stops what it still runs for us), then give back the rest."""
        if self.up:
            with contextlib.suppress(HostError):
                self.exchange([], wait=0, bye=True)
        self.save_arrived()
        if self.in_flight:               # a stop is no task's fault: no attempt counted
            self.board.put_back([i for indices in self.in_flight.values() for i in indices])
            self.in_flight.clear()

    # -- helpers ----------------------------------------------------------
    def _take_acks(self):
        acks, self.acks = self.acks, []
        return acks

    def _learn(self, report):
        if report.get("started") and report["ok"]:
            seconds = report["ended"] - report["started"]
            mean = self.mean_task
            self.mean_task = seconds if mean is None else 0.8 * mean + 0.2 * seconds

    def _check_boot(self, boot):
        if boot != self.client.boot:
            raise HostError("the worker restarted", RESTARTED)

    def _give_back(self, batch_ids, reason, died=False):
        """Requeue the tasks of `batch_ids`.  Those of batches still waiting on the worker at
        its last answer had no part in what went wrong: they go back free.  The others (that
        ran, or whose request failed) count an attempt, and a death if `died`; returned."""
        waiting = set(self.waiting)
        free = [i for b in batch_ids if b in waiting for i in self.in_flight[b]]
        charged = [i for b in batch_ids if b not in waiting for i in self.in_flight[b]]
        for batch_id in batch_ids:
            del self.in_flight[batch_id]
        self.board.put_back(free)
        self._fail_tasks(self.board.give_back(charged, reason, died))
        if free or charged:
            log.info("%s: %d tasks go back to the queue (%s)", self.host.label,
                     len(free) + len(charged), reason)
        return charged

    def verdict(self):
        """Right after the line broke while the worker held tasks: did it die?  True: it
        refuses connections or answers with a new boot id; False: it lives with the same boot
        (its tasks are still there); None: no answer, nobody knows yet (see `suspects`)."""
        try:
            hello = self.client.call("/hello", {})
        except HostError as e:
            return True if e.kind == GONE else None
        return hello.get("boot") != self.client.boot

    def _judge_suspects(self, died):
        """The verdict on the tasks the worker held when the line broke."""
        suspects, self.suspects = self.suspects, []
        if died and suspects:
            log.info("%s: the worker died with %d tasks", self.host.label, len(suspects))
            self._fail_tasks(self.board.count_deaths(suspects))

    def _fail_tasks(self, failed):
        for index, why in failed:
            self.settle([error_report(index, why, "TaskLost: " + why)])

    def lost(self, error, died):
        """A request failed: requeue the host's tasks and mark it down (or refusing) until it
        answers again.  `died`: the verdict() on the worker, if any; without one, a broken
        line waits for the next connect() to tell (see the class docstring)."""
        if self.up:
            self.board.add_slots(-self.slots)
        self.up = False
        self.client.forget()
        self.save_arrived()
        reason = str(error)
        died = error.kind == RESTARTED or died
        indices = self._give_back(list(self.in_flight), reason, died)
        self._note_waiting(())
        if died is None and error.kind in (GONE, TIMEOUT):
            self.suspects += indices
        if error.kind == REFUSED:
            self.fleet.refuse(self.host, reason)
        else:
            self.fleet.mark(self.host, False)
        if reason != self.down_reason:
            log.warning("%s is %s: %s (retrying in the background)", self.host.label,
                        "refusing work" if error.kind == REFUSED else "down", reason)
            self.down_reason = reason


# ====================================================================
# Result files and resume
# ====================================================================
#
# {name}{host number}_{timestamp}_{task index}.done.pickle   a success: one pickled dict
# {name}{host number}_{timestamp}_{task index}.error.pickle  an error: one pickled dict
# {name}{host number}_{timestamp}_{task index}.pack.pickle   with --pack: the successes of one
#                                                            poll reply (a list), named by its
#                                                            first task
# {name}_{timestamp}.log                                     the manager's log of that run
# {name}_{timestamp}.html                                    its report (see "Seeing a run")
# .{name}.lock                                               held by the manager running `name`
# The timestamp is YYYYmmdd-HHMMSS, the run's start, with "-2", "-3"... when an earlier run
# of that name started in the same second.  A name may be a prefix of another ("sim" and
# "sim2": "sim21_..." is either), so a run's files are told by the name in their records.
# See README.md "Result files" for the dict.

DONE_SUFFIX = ".done.pickle"
ERROR_SUFFIX = ".error.pickle"
PACK_SUFFIX = ".pack.pickle"
TEMP_MARK = ".tmp"
STAMP = r"\d{8}-\d{6}(?:-\d+)?"


def result_file_name(name, host_number, stamp, index, suffix):
    """The file of one outcome (or, with PACK_SUFFIX, of a pack): see above."""
    return "%s%d_%s_%d%s" % (name, host_number, stamp, index, suffix)


def log_file_name(name, stamp):
    """The manager's log of run `name` started at `stamp`."""
    return "%s_%s.log" % (name, stamp)


def report_file_name(name, stamp):
    """The run's report: its live page, frozen at the end."""
    return "%s_%s.html" % (name, stamp)


def workers_log_name(name, stamp):
    """What the loopback workers of `local` print."""
    return "%s_%s.workers.log" % (name, stamp)


def lock_file_name(name):
    """The file RunLock locks for run `name`."""
    return ".%s.lock" % name


def timestamp():
    """Now as a run's stamp: YYYYmmdd-HHMMSS (claim_stamp makes it unique)."""
    return time.strftime("%Y%m%d-%H%M%S")


def claim_stamp(folder, name):
    """A stamp no earlier run of `name` in `folder` used, claimed at once by creating the run's
    log file: a run started in the same second as the previous one gets "-2" and so on,
    instead of waiting for the next second or overwriting its files."""
    base = timestamp()
    for number in range(1, 10000):
        stamp = base if number == 1 else "%s-%d" % (base, number)
        if glob.glob(os.path.join(glob.escape(folder), "%s*_%s_*" % (glob.escape(name), stamp))):
            continue                     # result files of a run whose log is gone
        try:
            with open(os.path.join(folder, log_file_name(name, stamp)), "x"):
                return stamp
        except FileExistsError:
            continue
    raise OdenError("no free stamp for run %r in %s: clean up its log files" % (name, folder))


def write_atomically(path, fill):
    """fill(file) writes a temporary file in the same folder; then flush, fsync, rename: a
    crash leaves the old state or the new.  Raises OSError (disk, permissions) or what fill
    raises; either way no file is left."""
    temp = "%s%s%s" % (path, TEMP_MARK, secrets.token_hex(4))
    try:
        with open(temp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise


def name_pattern(name, suffix):
    """The file names of run `name` with `suffix`; a longer name ending in digits matches too."""
    return re.compile(re.escape(name) + r"(\d+)_" + STAMP + r"_\d+" + re.escape(suffix) + "$")


def result_paths(folder, name, errors=False):
    """Files that may hold results of run `name`, oldest first: the successes (single and
    packed), or with errors=True the errors.  Some may be of a longer name ("sim2" for
    "sim"): run_records() reads the name in each record and keeps only this run's."""
    found = []
    for suffix in (ERROR_SUFFIX,) if errors else (DONE_SUFFIX, PACK_SUFFIX):
        pattern = name_pattern(name, suffix)
        candidates = os.path.join(glob.escape(folder), glob.escape(name) + "*" + suffix)
        found += [p for p in glob.glob(candidates) if pattern.match(os.path.basename(p))]
    return sorted(found, key=os.path.getmtime)


def read_records(paths, on_bad=None):
    """Yield (path, record) for each record in readable result files (a pack holds
    several); report the files that cannot be read to on_bad(path, why): `why` is a
    ClassNotFound when the file is fine but a class of the run's script is missing."""
    for path in paths:
        try:
            loaded = load_result_file(path)
            pack = path.endswith(PACK_SUFFIX) and isinstance(loaded, list)
            records = loaded if pack else [loaded]
            if not all(isinstance(record, dict) and "task" in record for record in records):
                raise ValueError("not an oden result record")
        except ClassNotFound as e:           # passed on as it is: skipped_text() tells it apart
            if on_bad:
                on_bad(path, e)
            continue
        except Exception as e:
            if on_bad:
                on_bad(path, one_line(e))
            continue
        for record in records:
            yield path, record


def run_records(folder, name, errors=False, on_bad=None):
    """Yield (path, record) for the records of run `name` only (see result_paths).  Each
    record's "run" is its stamp (files written before records carried it: from the file name)."""
    stamp = re.compile(re.escape(name) + r"\d+_(" + STAMP + ")_")
    for path, record in read_records(result_paths(folder, name, errors), on_bad):
        if record.get("name") == name:
            if "run" not in record:
                record["run"] = stamp.match(os.path.basename(path)).group(1)
            yield path, record


def skipped_text(path, why):
    """What to tell the user about a result file read_records() skipped."""
    if isinstance(why, ClassNotFound):
        return "skipped result file %s: %s" % (path, why)
    return "skipped unreadable result file %s (%s)" % (path, why)


def log_skipped(path, why):
    """An on_bad for read_records() and its callers: a warning in the log per skipped file."""
    log.warning("%s", skipped_text(path, why))


# ------ Classes of the user's script in result files -------------------------------------
#
# A task or result may be an instance of a class defined in the run's script: pickle names it
# "__main__.Point" (or "__mp_main__.Point" from a worker's slot process).  Where that script
# is the main module (`python3 myjob.py results`) plain pickle finds it; anywhere else (an
# analysis script, a notebook) load_result_file() imports the run's script from the project
# folder, once per process, and looks the class up there.

MAIN_MODULES = ("__main__", "__mp_main__")
script_modules = {}                      # real path of a run's script -> its module, imported once


class ClassNotFound(Exception):
    """A result file is fine, but a class of the run's script it holds cannot be found."""


class MissingMainClass(Exception):
    """Raised inside unpickling: a class of the main script is in none of the modules tried."""


class ResultUnpickler(pickle.Unpickler):
    """pickle.Unpickler that looks up classes of a main script ("__main__.Point") in this
    process's main module, then in `modules` (the run's script, imported)."""

    def __init__(self, file, modules=()):
        super().__init__(file)
        self.modules = [sys.modules.get("__main__")] + list(modules)

    def find_class(self, module, name):
        if module not in MAIN_MODULES:
            return super().find_class(module, name)
        for candidate in self.modules:
            found = candidate
            for part in name.split("."):
                found = getattr(found, part, None)
            if found is not None:
                return found
        raise MissingMainClass(name)


class StubUnpickler(pickle.Unpickler):
    """Reads a record whose classes cannot be found, only to learn its "script": every class of
    a main script (or that fails to import) becomes a stand-in that accepts anything."""

    class Stub:
        def __new__(cls, *args, **kwargs):
            return object.__new__(cls)

        def __init__(self, *args, **kwargs):
            pass

        def __setstate__(self, state):
            pass

    def find_class(self, module, name):
        if module not in MAIN_MODULES:
            with contextlib.suppress(Exception):
                return super().find_class(module, name)
        return type(name.split(".")[-1], (self.Stub,), {})


def load_result_file(path):
    """Unpickle a result file; a class of the run's main script is found wherever this runs
    (see above).  Raises ClassNotFound when the run's script is not where the files are,
    beside oden.py or beside the main script, or does not define the class."""
    with open(path, "rb") as f:
        try:
            return ResultUnpickler(f, script_modules.values()).load()
        except MissingMainClass as e:
            missing = str(e)
        f.seek(0)
        loaded = StubUnpickler(f).load()
        record = loaded[0] if isinstance(loaded, list) and loaded else loaded
        script = record.get("script") if isinstance(record, dict) else None
        module = import_script(os.path.dirname(os.path.abspath(path)), script, record)
        f.seek(0)
        try:
            return ResultUnpickler(f, [module] if module else []).load()
        except MissingMainClass:
            where = script_folders(os.path.dirname(os.path.abspath(path)))
            raise ClassNotFound(
                "it holds an instance of class %s from the run's script %s, which %s: run this in "
                "the project's folder, or import that class before loading" % (
                    missing, script or "(not recorded)",
                    "does not define it" if module else "is not in %s" % ", ".join(where)))


def script_folders(results_folder):
    """Where a run's script may be: beside its results, beside oden.py, beside the main script."""
    folders = [results_folder, os.path.dirname(os.path.abspath(__file__)), script_folder()]
    return [folder for position, folder in enumerate(folders) if folder not in folders[:position]]


def import_script(results_folder, script, record):
    """The module of a run's script (imported once per process, without running its main
    part), or None when it is nowhere to be found.  Records written before they named their
    script: the script named like the run, else oden.py."""
    names = [script] if script else [str(record.get("name")) + ".py", "oden.py"]
    for folder in script_folders(results_folder):
        for script_name in names:
            path = os.path.join(folder, os.path.basename(script_name))
            if os.path.isfile(path):
                return script_module(path)
    return None


def script_module(path):
    """The module of the script at `path`: one already imported (oden itself, or the user's
    `import myjob`), else imported now under its own name when that is free."""
    path = os.path.realpath(path)
    if path not in script_modules:
        found = next((m for m in list(sys.modules.values()) if getattr(m, "__file__", None)
                      and os.path.realpath(m.__file__) == path), None)
        if found is None:
            module_name = os.path.splitext(os.path.basename(path))[0]
            if module_name in sys.modules or not module_name.isidentifier():
                module_name = "oden_script_%s" % hashlib.sha256(path.encode()).hexdigest()[:8]
            spec = importlib.util.spec_from_file_location(module_name, path)
            found = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = found      # dataclasses and pickle look classes up there
            try:
                spec.loader.exec_module(found)
            except (Exception, SystemExit) as e:
                del sys.modules[module_name]
                raise ClassNotFound("importing the run's script %s to find its classes raised %s"
                                    % (path, one_line(e)))
        script_modules[path] = found
    return script_modules[path]


def remove_temporaries(folder, name):
    """Remove the temporary files that a killed manager of run `name` left: not those a running
    manager of a longer name ("sim2" for "sim") may be writing now."""
    stale = []
    temporaries = os.path.join(glob.escape(folder), glob.escape(name) + "*" + TEMP_MARK + "*")
    for path in glob.glob(temporaries):
        base = os.path.basename(path).split(TEMP_MARK)[0]
        match = next(filter(None, (name_pattern(name, suffix).match(base)
                                   for suffix in (DONE_SUFFIX, ERROR_SUFFIX, PACK_SUFFIX))), None)
        if match is None:
            continue
        digits = match.group(1)
        longer = [name + digits[:end] for end in range(1, len(digits))]
        if not any(RunLock(folder, other).held_elsewhere() for other in longer):
            stale.append(path)
    for path in stale:
        os.remove(path)
    return len(stale)


class RunLock:
    """One manager at a time per run name and folder: two would write the same run's files and
    race on resume.  The lock is the operating system's (flock; msvcrt on Windows) on the file
    `.{name}.lock`, so it ends with its process, even one killed with SIGKILL; the file names
    the holder for the message."""

    def __init__(self, folder, name):
        self.folder, self.name = folder, name
        self.path = os.path.join(folder, lock_file_name(name))
        self.file = None

    def acquire(self):
        """Take the lock, or raise OdenError naming the manager that holds it."""
        self.file = open(self.path, "a+")
        if not self._try():
            self.file.seek(0)
            holder = self.file.read(200).strip() or "another process"
            self.release()
            raise OdenError("a manager of run %r is running in %s already (%s): wait for it to "
                            "end, use another --name or --folder, or pass --concurrent to run both"
                            % (self.name, os.path.abspath(self.folder), printable(holder)))
        self.file.truncate(0)
        self.file.write("pid %d on %s since %s"
                        % (os.getpid(), platform.node(), time.strftime("%X")))
        self.file.flush()

    def held_elsewhere(self):
        """True while another process holds the lock of this name."""
        if not os.path.exists(self.path):
            return False
        self.file = open(self.path, "a+")
        try:
            return not self._try()
        finally:
            self.release()

    def _try(self):
        try:
            if fcntl is not None:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                self.file.seek(0)
                msvcrt.locking(self.file.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def release(self):
        """Let the lock go (closing the file releases it); harmless when not held."""
        if self.file is not None:
            self.file.close()            # closing the file releases the lock
            self.file = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc_info):
        self.release()


class ContentIndex:
    """A multiset of tasks matched by content (same_task), not by pickle bytes.

    Tasks are bucketed by a hash of a frozen copy (dicts and sets become
    frozensets, so insertion order and string-hash seeds do not matter);
    tasks that cannot be frozen share one bucket.  Within a bucket same_task decides.
    """

    def __init__(self, tasks):
        self.buckets = collections.defaultdict(list)
        for task in tasks:
            self.buckets[content_key(task)].append(task)

    def take(self, task):
        """Remove one task equal to `task`; True if there was one."""
        bucket = self.buckets.get(content_key(task), [])
        for position, candidate in enumerate(bucket):
            if same_task(candidate, task):
                del bucket[position]
                return True
        return False


def freeze(value):
    """A hashable copy of `value` that is equal where the tasks are equal: dicts and sets as
    frozensets, lists and tuples as tuples tagged with their type, a NaN as ("nan",) (a NaN
    equals nothing, itself included: a task holding one would never match its saved result).
    TypeError when a part cannot be hashed."""
    if isinstance(value, dict):
        return ("dict", frozenset((freeze(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return ("set", frozenset(freeze(v) for v in value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(freeze(v) for v in value))
    if isinstance(value, float) and value != value:
        return ("nan",)
    hash(value)
    return value


def content_key(task):
    """The ContentIndex bucket of a task: a hash of its frozen copy, or one shared bucket."""
    try:
        return hash(freeze(task))
    except Exception:
        return "unhashable"


def same_task(a, b):
    """Whether two tasks are the same by content: their frozen copies are equal (so a NaN
    matches a NaN), or for tasks that cannot be frozen, == says so, or (when == raises) their
    pickles are equal."""
    try:
        return freeze(a) == freeze(b)
    except Exception:
        pass
    try:
        return bool(a == b)
    except Exception:
        return dumps(a) == dumps(b)


def tasks_to_run(tasks, folder, name, on_bad=None):
    """Indices of `tasks` without a saved success of run `name` (matched as a multiset) in its
    current stretch (see current_records): what `resume` runs."""
    successes = current_records([record for _, record in run_records(folder, name, on_bad=on_bad)])
    done = ContentIndex(record["task"] for record in successes)
    return [index for index, task in enumerate(tasks) if not done.take(task)]


def current_records(records):
    """The records of the newest run of a name that started over (`manager`, or `local`
    without --resume: their records say "fresh") and of the resumes after it.  A new run
    starts over: `resume` finishes it and `results` shows it, whatever older runs found.
    Records of oden 1.0 (no "fresh") count as one stretch, as they did then."""
    starts = [stamp_order(record["run"]) for record in records if record.get("fresh")]
    if not starts:
        return records
    first = max(starts)
    return [record for record in records if stamp_order(record["run"]) >= first]


def stamp_order(stamp):
    """A run's place in time from its stamp: "20240101-120000-2" comes after "...-120000"
    and before "...-120000-10"."""
    match = re.match(r"(\d{8}-\d{6})(?:-(\d+))?$", stamp or "")
    return (match.group(1), int(match.group(2) or 1)) if match else ("", 0)


def outcome_order(record):
    """Sort key of a task's outcomes, oldest first: by run, then by when it ended."""
    return stamp_order(record.get("run")), record.get("ended") or 0


def latest_outcomes(records):
    """The records that still stand: for each task (its index, and a task equal to it) the
    outcome of the newest run, so a later success supersedes an earlier error and a re-run
    supersedes what the run before found.  (A task of another make_tasks() that took the
    same index is a task of its own.)"""
    by_index = collections.defaultdict(list)
    for record in records:
        by_index[record["index"]].append(record)
    latest = []
    for outcomes in by_index.values():
        kept = []
        for record in sorted(outcomes, key=outcome_order, reverse=True):
            if not any(same_task(record["task"], newer["task"]) for newer in kept):
                kept.append(record)
        latest += kept
    return latest


def all_records(folder, name, on_bad=None):
    """Every record of run `name`, successes and errors, of every run (see run_records)."""
    return [record for errors in (False, True)
            for _, record in run_records(folder, name, errors, on_bad)]


def choose_records(records, run=None):
    """`records` in task order: by default the latest outcome of each task (latest_outcomes);
    run="all": every one, oldest run first; run=STAMP: those of that run only."""
    if run is None:
        records = latest_outcomes(current_records(records))
    elif run != "all":
        records = [record for record in records if record["run"] == run]
    return sorted(records, key=lambda record: (record["index"], outcome_order(record)))


def load_results(name=None, folder=".", errors=False, run=None):
    """Yield (task, result) for the successes of run `name`, in task order; with errors=True
    then (task, record) for the errors, where record["error"] is the traceback.  By default
    only the latest outcome of each task counts: an error that a later run fixed is not
    yielded, nor an old result of a task run again; run="all" yields every outcome of every
    run, run="20240101-120000" those of one run (the stamp in its file names).  Classes of the
    run's script are found wherever this runs (see load_result_file)."""
    name = name or globals()["name"]
    records = choose_records(all_records(folder, name, log_skipped), run)
    for record in records:
        if "result" in record:
            yield record["task"], record["result"]
    if errors:
        for record in records:
            if "result" not in record:
                yield record["task"], record


# ====================================================================
# A manager run: tasks, board, threads, files, progress and summary
# ====================================================================

@dataclasses.dataclass(frozen=True)
class RunContext:
    """What a manager run fixed at its start, read by all its parts (frozen: read without a
    lock).  Made by RunContext.of() from the command line's settings."""
    id: str                  # random, per manager run: a worker keeps each run's batches apart
    name: str                # the run's name, in every file name and file record
    folder: str              # where the result files go
    stamp: str               # from claim_stamp(): in every file name of this run
    fresh: bool              # a new run starts over; a resume goes on with the newest one
    script: str              # the user's script's file name, in every file record
    resume_hint: str         # the shell command that finishes this run
    key: object              # bytes, or None with --insecure (each HostClient has its Codec)
    tls: object              # ssl.SSLContext for https workers (--cafile), or None
    manifest: dict           # {relative path: sha256} of our code: see "The code of a run"
    timeout: float           # the knobs below are the settings of the same names
    keepalive: bool
    max_reply: int
    interval_polling: float
    task_timeout: object     # seconds, or None
    chunksize: int
    speculate: bool
    max_push: int
    pack: bool
    max_attempts: int
    max_deaths: int
    give_up_after: float

    KNOBS = ("name", "folder", "timeout", "keepalive", "max_reply", "interval_polling",
             "task_timeout", "chunksize", "speculate", "max_push", "pack", "max_attempts",
             "max_deaths", "give_up_after")

    @classmethod
    def of(cls, settings, **fixed):
        """The context of a run with these settings; `fixed` gives the fields that are not
        settings (stamp, fresh, resume_hint, key, tls, manifest)."""
        script = os.path.basename(sys.argv[0]) if os.path.isfile(sys.argv[0]) else "oden.py"
        return cls(id=secrets.token_hex(6), script=script,
                   **{knob: getattr(settings, knob) for knob in cls.KNOBS}, **fixed)


class Tally:
    """The counts of the outcomes written so far, for the progress line, the live page, the
    summary and the exit code.  One lock guards every field; readers get copies."""

    def __init__(self):
        self.lock = threading.Lock()
        self.done = self.failed = self.duplicates = 0
        self.per_host = collections.defaultdict(lambda: [0, 0, 0.0])   # label -> done, failed, s
        self.failures = collections.OrderedDict()    # exception -> [count, a traceback, indices]
        self.task_times = TaskTimes()                # how long calc took: a histogram

    def add(self, label, record):
        """Count a file record written for host `label`."""
        ok = "result" in record
        with self.lock:
            counts = self.per_host[label]
            counts[0 if ok else 1] += 1
            if record["started"]:
                counts[2] += record["ended"] - record["started"]
                self.task_times.add(record["ended"] - record["started"])
            if ok:
                self.done += 1
                return
            self.failed += 1
            line = record["exception"]
            if line not in self.failures and len(self.failures) >= FAILURE_GROUPS:
                line = line.split(":")[0] + ": (and other messages)"     # memory stays bounded
            group = self.failures.setdefault(line, [0, record["error"], []])
            group[0] += 1
            group[2].append(record["index"])

    def add_duplicate(self):
        with self.lock:
            self.duplicates += 1

    def counts(self):
        """(done, failed): outcomes whose files are written."""
        with self.lock:
            return self.done, self.failed

    def host_counts(self):
        """{host label: (done, failed, seconds calc took in all)}."""
        with self.lock:
            return {label: tuple(counts) for label, counts in self.per_host.items()}

    def failure_groups(self, shown=PAGE_ROWS):
        """[(exception line, count, its first traceback, its first `shown` tasks)], most first."""
        with self.lock:
            groups = [(line, count, error, indices[:shown])
                      for line, (count, error, indices) in self.failures.items()]
        return sorted(groups, key=lambda group: -group[1])

    def task_time_bins(self):
        """See TaskTimes.bins()."""
        with self.lock:
            return self.task_times.bins()


class ResultStore:
    """Turns the workers' reports into file records on disk: each task's outcome claimed once,
    written once, counted in its Tally.

    claim() keeps the first outcome of a task and drops a later one (a duplicate); save()
    writes the claimed ones, in the calling host thread, or with --pack through the store's
    writer thread, which puts whatever waits for one host into one file (one fsync for many
    results: group commit).  A result file that cannot be written sets `failure` (why, and
    what to do) and the run stops; those tasks have no file and resume runs them again, as it
    does a claimed task whose file the manager died before writing.  The store never touches
    the board.
    """

    def __init__(self, context, tasks):
        self.context, self.tasks = context, tasks
        self.tally = Tally()
        self.lock = threading.Lock()     # guards `claimed` and `failure`
        self.claimed = bytearray(len(tasks))     # index -> 1 once its outcome is claimed
        self.failure = None              # why a file could not be written (read unlocked: it
                                         # only goes from None to a reason)
        self.changed = threading.Condition()     # guards the writer's queue below
        self.queued = collections.OrderedDict()  # host -> [file records], in arrival order
        self.queued_count = 0
        self.closing = False
        self.writer = threading.Thread(target=self._write_queued, name="writer", daemon=True)

    def claim(self, host, reports):
        """The reports whose task had no outcome yet, now claimed; a duplicate is dropped."""
        claimed, duplicates = [], []
        with self.lock:
            for report in reports:
                index = report["index"]
                (duplicates if self.claimed[index] else claimed).append(report)
                self.claimed[index] = 1
        for report in duplicates:
            self.tally.add_duplicate()
            log.info("duplicate result for task %d from %s: kept the first", report["index"],
                     host.label)
        return claimed

    def save(self, host, reports):
        """Write the file records of claimed reports: here, or with --pack queued for the writer
        (which blocks while WRITER_BACKLOG wait already, so memory stays flat when the disk is
        slower than the workers)."""
        if not reports:
            return
        records = [self.file_record(host, report) for report in reports]
        if not self.context.pack:
            self._write_all(host, records)
            return
        with self.changed:
            while self.queued_count >= WRITER_BACKLOG and not self.closing:
                self.changed.wait()
            self.queued.setdefault(host, []).extend(records)
            self.queued_count += len(records)
            self.changed.notify_all()

    def start(self):
        self.writer.start()

    def close(self):
        """Write what is queued, then end the writer."""
        with self.changed:
            self.closing = True
            self.changed.notify_all()
        if self.writer.is_alive():
            self.writer.join()

    def _write_queued(self):
        while True:
            with self.changed:
                while not self.queued and not self.closing:
                    self.changed.wait()
                if not self.queued:
                    return
                drained, self.queued, self.queued_count = self.queued, collections.OrderedDict(), 0
                self.changed.notify_all()
            for host, records in drained.items():
                try:
                    self._write_all(host, records)
                except Exception:            # a bug: its tasks have no file, the run says so
                    log.exception("the result writer failed on %d results", len(records))

    def file_record(self, host, report):
        """The dict a result file holds (see README.md "Result files") for a worker's report."""
        index, context = report["index"], self.context
        record = {"name": context.name, "index": index, "task": self.tasks.task(index),
                  "host": host.label, "started": report.get("started"),
                  "ended": report.get("ended"), "output": report.get("output", ""),
                  "run": context.stamp, "script": context.script, "fresh": context.fresh}
        if not report["ok"]:
            record.update(error=report["error"], exception=report["exception"])
            return record
        try:
            record["result"] = pickle.loads(report["result"])
        except Exception as e:
            record = self._as_error(record, "the result cannot be unpickled", e)
        return record

    def _write_all(self, host, records):
        """Write the files of `records`, count them, log the errors.  A record that cannot be
        pickled becomes that task's error record; a file that cannot be written (disk full,
        permissions) sets `failure`."""
        try:
            written = self._write_files(host, records)
        except OSError as e:
            with self.lock:
                self.failure = ("cannot write a result file in %s (%s): free some disk space or "
                                "fix the folder's permissions"
                                % (os.path.abspath(self.context.folder), e.strerror or e))
            return
        done = [record["index"] for record in written if "result" in record]
        if done:
            log.debug("tasks %s done on %s", done, host.label)
        for record in written:
            self.tally.add(host.label, record)
            if "error" in record:
                output = record["output"]
                log.error("task %d failed on %s: %s\n%s%s", record["index"], host.label,
                          printable(record["exception"]), printable(record["error"].rstrip()),
                          ("\n--- what it printed ---\n" + printable(output.rstrip()))
                          if output else "")

    def _write_files(self, host, records):
        """Write `records` (the successes as one pack with --pack); return what the files hold."""
        done = [record for record in records if "result" in record]
        if self.context.pack and done:
            try:
                self._write(host, done[0]["index"], PACK_SUFFIX, done)
                return done + [self._write_one(host, r) for r in records if "result" not in r]
            except OSError:
                raise
            except Exception:                # a result that cannot be pickled: one by one
                pass
        return [self._write_one(host, record) for record in records]

    def _write_one(self, host, record):
        try:
            self._write(host, record["index"],
                        DONE_SUFFIX if "result" in record else ERROR_SUFFIX, record)
        except OSError:
            raise
        except Exception as e:               # its result cannot be pickled here
            record = self._as_error(record, "the result arrived but cannot be saved", e)
            self._write(host, record["index"], ERROR_SUFFIX, record)
        return record

    @staticmethod
    def _as_error(record, what, exception):
        """The error record of a task whose outcome could not be used: `what`, and why."""
        record = {k: v for k, v in record.items() if k != "result"}
        record.update(error="%s on the manager:\n%s" % (what, traceback.format_exc()),
                      exception="%s: %s" % (what, one_line(exception)))
        return record

    def _write(self, host, index, suffix, record):
        context = self.context
        name = result_file_name(context.name, host.number, context.stamp, index, suffix)
        write_atomically(os.path.join(context.folder, name),     # pickled straight to disk:
                         lambda f: pickle.dump(record, f, PICKLE_PROTOCOL))   # no copy in memory


class Run:
    """The parts of one manager run, made at its start: its context, the tasks, the board, the
    fleet, the result store and (set by drive()) a HostRunner per host."""

    def __init__(self, job, context, tasks, indices, hosts):
        self.job, self.context, self.tasks, self.hosts = job, context, tasks, hosts
        self.mean_task_bytes = tasks.mean_size(indices)     # of the tasks this run runs
        self.board = TaskBoard(indices, context.max_attempts, context.max_deaths)
        self.fleet = Fleet(hosts)
        self.store = ResultStore(context, tasks)
        self.tally = self.store.tally
        self.started = time.monotonic()
        self.timeline = Timeline(self.started)
        self.runners = []                # each host's HostRunner, set by drive() (for the page)

    def call_user(self, function_name, *args):
        """Call a user hook; its exception is logged, never fatal to the run."""
        try:
            getattr(self.job, function_name)(*args)
        except Exception:
            log.exception("%s raised (the run goes on)", function_name)


def pickle_task(index, task):
    """The task's pickle; OdenError naming the task when it cannot travel."""
    try:
        return dumps(task)
    except Exception as e:
        raise OdenError("task %d cannot be pickled (%s): tasks must be plain data such as "
                        "numbers, strings, tuples, lists and dicts, not lambdas or open files"
                        % (index, one_line(e)))


def pickle_tasks(tasks):
    """Every task pickled, before anything is sent: the first that cannot travel is named."""
    return [pickle_task(index, task) for index, task in enumerate(tasks)]


class Tasks:
    """The manager's one copy of each task of a run, by index: a small task as its pickle
    (smaller than most objects, and ready to send), a task whose pickle has OUT_OF_BAND bytes
    or more as the object itself, pickled again when it is sent, straight into the request's
    frames (see encode()).  So a big task is held once, not as object and pickle.  Made from
    the list make_tasks() returned, which it empties as it goes; OdenError names a task that
    cannot be pickled."""

    def __init__(self, tasks):
        self.entries = []                # index -> pickle (bytes), or the task itself when big
        self.big = {}                    # index -> size of its pickle, for the big ones
        for index, task in enumerate(tasks):
            data = pickle_task(index, task)
            if len(data) < OUT_OF_BAND:
                self.entries.append(data)
            else:
                self.entries.append(task)
                self.big[index] = len(data)
            tasks[index] = data = None   # the caller's list lets go of it: one copy

    def __len__(self):
        return len(self.entries)

    def size(self, index):
        """Bytes the task's pickle takes."""
        return self.big.get(index) or len(self.entries[index])

    def mean_size(self, indices):
        """Mean bytes of the pickles of the tasks `indices` (0 for none)."""
        indices = list(indices)
        return sum(self.size(index) for index in indices) / max(1, len(indices))

    def wire(self, index):
        """The task as it goes into a submit: its pickle, or a PickleBuffer of it (a frame)."""
        if index in self.big:
            return pickle.PickleBuffer(dumps(self.entries[index]))
        return self.entries[index]

    def task(self, index):
        """The task itself (for its result file)."""
        return self.entries[index] if index in self.big else pickle.loads(self.entries[index])


class Progress:
    """The live line on a terminal, or a log line every PROGRESS_LOG_EVERY s elsewhere.

    On a terminal the console log writes through this object: a log line first
    wipes the progress line, so the two never share a line; the next tick redraws it.
    The line fits the terminal's width (read at every redraw): a narrow one gets shorter
    fields, so it never wraps.  The rate is the run's Timeline's: from the first result on.
    """

    def __init__(self, run, stream, quiet):
        self.run, self.stream, self.quiet = run, stream, quiet
        self.tty = stream.isatty()
        self.last_log = time.monotonic()     # the drive loop's alone (tick)
        self.width = 0                       # columns of the progress line shown now
        # `lock` guards `width` and the stream: write() comes from every thread that logs,
        # tick() and close() from the drive loop.
        self.lock = threading.Lock()
        # on a terminal, the console's log handlers write through this object (write below)
        self.console = [h for h in log.handlers
                        if self.tty and getattr(h, "stream", None) is stream]
        for handler in self.console:
            handler.setStream(self)

    def write(self, text):
        with self.lock:
            self._wipe()
            self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def _wipe(self):
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.width = 0

    def line(self, width=None):
        """The progress text, with fields as short as `width` columns need (None: in full)."""
        run = self.run
        done, failed = run.tally.counts()
        _, in_flight, _ = run.board.counts()
        finished, total = done + failed, run.board.total
        rate = run.timeline.rate(finished)
        eta = format_seconds((total - finished) / rate) if rate else "?"
        shown_rate = format_rate(rate)
        up = len(run.fleet.snapshot()[0])
        elapsed = format_seconds(time.monotonic() - run.started)
        variants = (
            "%d/%d finished (%d done, %d failed), %d in flight | %s tasks/s | %s elapsed | "
            "ETA %s | hosts %d up %d down" % (finished, total, done, failed, in_flight, shown_rate,
                                              elapsed, eta, up, len(run.hosts) - up),
            "%d/%d (%d failed), %d running | %s/s | ETA %s | %d/%d hosts up"
            % (finished, total, failed, in_flight, shown_rate, eta, up, len(run.hosts)),
            "%d/%d, %d failed | %s/s | ETA %s" % (finished, total, failed, shown_rate, eta),
            "%d/%d ETA %s" % (finished, total, eta))
        fitting = (text for text in variants if width is None or len(text) <= width)
        return next(fitting, variants[-1][:width])

    def columns(self):
        """The terminal's width; when it does not say: $COLUMNS, else 80 (as shutil tells)."""
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            width = 0
        return width or shutil.get_terminal_size().columns

    def tick(self):
        """Called by the drive loop every period: redraw the line, or log it when due."""
        if self.quiet:
            return
        if self.tty:
            width = max(1, self.columns() - 1)         # the last column wraps on some terminals
            text = self.line(width)
            with self.lock:
                self.stream.write("\r" + text + " " * max(0, min(self.width, width) - len(text)))
                self.stream.flush()
                self.width = len(text)
        elif time.monotonic() - self.last_log >= PROGRESS_LOG_EVERY:
            self.last_log = time.monotonic()
            log.info("progress: %s", self.line())

    def close(self):
        """At the run's end: wipe the line and give the console its stream back."""
        with self.lock:
            self._wipe()
            self.stream.flush()
        for handler in self.console:
            handler.setStream(self.stream)


def format_rate(rate):
    """Tasks per second as the progress line and the dashboard show it; '?' before it is known."""
    if rate is None:
        return "?"
    return "%.0f" % rate if rate >= 100 else "%.1f" % rate if rate >= 1 else "%.3f" % rate


def format_seconds(seconds):
    """Seconds as the progress line shows them: H:MM:SS."""
    seconds = int(seconds)
    return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)


def format_duration(seconds):
    """A span of time for people, in two units at most: '420 ms', '12 s', '3 min 05 s',
    '2 h 07 min', '3 d 04 h'."""
    if seconds < 10:
        return "%.3g ms" % (seconds * 1000) if seconds < 1 else "%.1f s" % seconds
    whole = int(seconds)
    units = (("d", 86400, "h", 3600), ("h", 3600, "min", 60), ("min", 60, "s", 1))
    for unit, size, small, small_size in units:
        if whole >= size:
            return "%d %s %02d %s" % (whole // size, unit, whole % size // small_size, small)
    return "%d s" % whole


def format_table(rows, numbers_from=None):
    """Rows of text cells as columns two spaces apart, for a terminal or a log: each column
    left-aligned, but right-aligned from column `numbers_from` on (figures)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = len(widths) if numbers_from is None else numbers_from
    return "\n".join("  ".join(cell.ljust(width) if i < right else cell.rjust(width)
                              for i, (cell, width) in enumerate(zip(row, widths))).rstrip()
                     for row in rows)


def summary_table(run):
    """The run's summary for the log: per host and in all, done, failed and mean task time."""
    per_host, (done, failed) = run.tally.host_counts(), run.tally.counts()

    def row(label, done, failed, seconds):
        mean = "%.3f" % (seconds / (done + failed)) if done + failed else "-"
        return label, str(done), str(failed), mean

    rows = [("host", "done", "failed", "mean task s")]
    rows += [row(host.label, *per_host.get(host.label, (0, 0, 0.0))) for host in run.hosts]
    rows.append(row("total", done, failed, sum(seconds for _, _, seconds in per_host.values())))
    return format_table(rows, numbers_from=1)


FILE_ONLY = {"file_only": True}         # extra= of a log record for the log file, not the console
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class EscapingFormatter(logging.Formatter):
    """Formats a record as text its stream can always take: what the stream's encoding cannot
    hold (e.g. bytes of a task's output that were not UTF-8) becomes a backslash escape, so
    no record is ever dropped by an encoding error."""

    def __init__(self, fmt, datefmt, encoding):
        super().__init__(fmt, datefmt)
        self.encoding = encoding or "utf-8"

    def format(self, record):
        text = super().format(record)
        return text.encode(self.encoding, "backslashreplace").decode(self.encoding, "replace")


def setup_logging(verbose=0, quiet=False, log_path=None):
    """Console on stderr and an optional log file, both without DEBUG lines (a line per batch,
    too dear for 100,000 tasks) unless --verbose; --quiet leaves warnings only on the console.
    Records with extra=FILE_ONLY (a user's traceback behind a one-line error) skip the console."""
    root = logging.getLogger("oden")
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = []
    root.setLevel(logging.DEBUG if verbose else logging.INFO)    # a record per task: only with -v
    root.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.DEBUG)
    console.setFormatter(EscapingFormatter(LOG_FORMAT, "%H:%M:%S",
                                           getattr(sys.stderr, "encoding", None)))
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    root.addHandler(console)
    if log_path:
        handler = logging.FileHandler(log_path, encoding="utf-8")
        handler.setFormatter(EscapingFormatter(LOG_FORMAT, None, "utf-8"))
        root.addHandler(handler)


def run_manager(job, settings, hosts, resume, argv, stamp=None):
    """A whole manager (or resume) run on `hosts`; returns the exit code.  `argv` is the command
    line (for the resume hint); `stamp` is given by `local`, which asked confirm_new_run() and
    claimed the stamp before it started its workers."""
    folder, name = settings.folder, settings.name
    hint = resume_command(argv)
    if stamp is None:
        if not resume:
            confirm_new_run(folder, name, settings.yes, hint)
        stamp = claim_stamp(folder, name)
    log_path = os.path.join(folder, log_file_name(name, stamp))
    setup_logging(settings.verbose, settings.quiet, log_path)
    tasks = user_tasks(job, log_path)
    key = None if settings.insecure else load_or_create_key(settings.key_file)
    if resume:
        removed = remove_temporaries(folder, name)
        if removed:
            log.info("removed %d temporary files left by an interrupted run", removed)
        indices = tasks_to_run(tasks, folder, name, on_bad=lambda path, why: log.warning(
            "%s: its task will run again", skipped_text(path, why)))
        log.info("resume: %d of %d tasks have a saved success; %d to run",
                 len(tasks) - len(indices), len(tasks), len(indices))
    else:
        indices = list(range(len(tasks)))
    context = RunContext.of(settings, stamp=stamp, fresh=not resume, resume_hint=hint, key=key,
                            tls=client_tls(settings.cafile), manifest=code_manifest(job.files))
    run = Run(job, context, Tasks(tasks), indices, hosts)
    log.info("run %r: %d tasks on %d hosts; log in %s", name, len(indices), len(hosts), log_path)
    return drive(run, getattr(settings, "dashboard", None), settings.quiet)


def user_tasks(job, log_path=None):
    """make_tasks() as a list.  When it raises: OdenError naming it, its traceback in the log
    file (or, with no log file, on stderr: the user's traceback, not oden's)."""
    try:
        return list(job.make_tasks())
    except Exception as e:
        if log_path:
            log.error("make_tasks() raised:\n%s", traceback.format_exc(), extra=FILE_ONLY)
        else:
            traceback.print_exc()
        where = " (its traceback is in %s)" % log_path if log_path else ""
        raise OdenError("make_tasks() raised %s: fix make_tasks%s"
                        % (printable(one_line(e)), where))


def drive(run, dashboard_address=None, quiet=False):
    """Start the host threads, show progress, stop on completion, Ctrl-C or SIGTERM, a dead
    fleet, a fleet that refuses us, or a result file that cannot be written; return the exit
    code.  `dashboard_address`: (host, port) of the live page, or None; `quiet`: no progress
    line."""
    board, store = run.board, run.store
    dashboard = Dashboard(run, dashboard_address) if dashboard_address else None
    progress = Progress(run, sys.stderr, quiet)
    interrupted = gave_up = None
    refusals = None
    store.start()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(run.hosts)),
                                                 thread_name_prefix="host")
    run.runners = [HostRunner(run, host) for host in run.hosts]
    futures = [pool.submit(runner) for runner in run.runners]
    try:
        while not board.finished and not board.stopping:
            # sleep(), not wait(): one redraw a period, not one a result
            board.sleep(PROGRESS_TTY_EVERY if progress.tty else 1.0)
            run.timeline.sample(*run.tally.counts())
            progress.tick()
            refusals = run.fleet.every_host_refuses()
            gave_up = run.fleet.down_for() > run.context.give_up_after
            if refusals or gave_up or store.failure or all(f.done() for f in futures):
                break
    except KeyboardInterrupt as e:           # Ctrl-C, or SIGTERM as Terminated
        interrupted = getattr(e, "exit_code", 130)
        signal.signal(signal.SIGINT, lambda *_: os._exit(interrupted))    # a second one: at once
        signal.signal(signal.SIGTERM, lambda *_: os._exit(interrupted))
        progress.close()
        log.warning("%s: stopping; results that have arrived are saved (Ctrl-C again to quit now)",
                    "terminated" if interrupted == TERMINATED else "interrupted")
    board.stop()
    concurrent.futures.wait(futures)
    pool.shutdown()
    store.close()
    progress.close()
    for future in futures:
        if future.exception():
            log.error("a host thread failed: %s", one_line(future.exception()))
    try:
        return conclude(run, interrupted, gave_up, refusals)
    finally:
        if dashboard:
            dashboard.close()


def conclude(run, interrupted, gave_up, refusals):
    """The summary, the last word and the exit code.  Never 0 while a task has no file."""
    context = run.context
    _, _, unfinished = run.board.counts()
    done, failed = run.tally.counts()
    missing = run.board.total - done - failed
    log.info("summary:\n%s", summary_table(run))
    log.info("%d done, %d failed, %d not run, %d duplicates dropped, %s elapsed", done, failed,
             missing, run.tally.duplicates, format_seconds(time.monotonic() - run.started))
    write_report(run)
    finish = "run '%s' to finish them" % context.resume_hint
    if run.store.failure:
        log.error("stopped: %s; then %s", run.store.failure, finish)
        return 2
    if refusals:
        for reason, labels in refusals.items():
            log.error("%s refuse%s work: %s", ", ".join(labels), "s" if len(labels) == 1 else "",
                      reason)
        log.error("stopped: no host will take work (see above); fix that, then %s", finish)
        return 2
    if gave_up:
        log.error("every host has been down for over %d s: stopping with %d tasks left; %s",
                  context.give_up_after, missing, finish)
        return 3
    if interrupted:
        log.warning("%d tasks left; %s", missing, finish)
        return interrupted
    if missing or unfinished:
        log.error("%d tasks have no result file (see the errors above); %s",
                  max(missing, unfinished), finish)
        return 1
    run.call_user("handle_finish_tasks")
    if failed:
        log.warning("%d tasks failed: see their .error.pickle files, fix calc and run '%s' to run "
                    "them again (the fix is pushed to the workers)", failed, context.resume_hint)
        return 1
    return 0


def resume_command(argv):
    """The shell command that finishes the run `argv` started: the same script and every flag
    that was given (hosts, folder, name, key file...), quoted, with 'resume' for 'manager'."""
    script = sys.argv[0] if os.path.isfile(sys.argv[0]) else "oden.py"
    words = [word for word in argv if word != "--yes"]
    position = next((i for i, word in enumerate(words) if not word.startswith("-")), None)
    if position is not None:                 # the command: the first word, as argparse reads it
        if words[position] == "manager":
            words[position] = "resume"
        elif words[position] == "local" and "--resume" not in words:
            words.insert(position + 1, "--resume")
    python = os.path.basename(sys.executable or "") or "python3"       # python3.8, say, if so run
    return " ".join(shlex.quote(word) for word in [python, script] + words)


def load_or_create_key(key_file):
    key = load_key(key_file)
    if key is None:
        path = create_key(key_file)
        log.warning("created the key file %s: copy it with the project to every worker and "
                    "restart them", path)
        key = load_key(key_file)
    return key


def confirm_new_run(folder, name, yes, resume_hint):
    """Ask before a new run where results of its name exist (they stay; resume may be meant)."""
    if yes or next(iter(run_records(folder, name)), None) is None and \
            next(iter(run_records(folder, name, errors=True)), None) is None:
        return
    question = ("result files of run %r exist in %s. Start a new run anyway (their files "
                "stay)? [y/N] " % (name, os.path.abspath(folder)))
    if not sys.stdin.isatty():
        raise OdenError("result files of run %r exist in %s: pass --yes to start a new run "
                        "anyway, or run '%s' to run only what is missing"
                        % (name, os.path.abspath(folder), resume_hint))
    if input(question).strip().lower() not in ("y", "yes"):
        raise OdenError("not started: run '%s' to run only what is missing" % resume_hint)


# ====================================================================
# Seeing a run: its live page (Dashboard) and its report
# ====================================================================
#
# The manager serves one page while it runs (http://127.0.0.1:<free port>/ unless
# --dashboard says where, none with --no-dashboard) and writes the same page, frozen, as
# {name}_{stamp}.html at the end.  Both come from run_state(): counts, ages and tracebacks
# read through each object's locked accessor when a page is asked for, never a task or a
# result.  The run's hot path pays O(1) per task for it: the ResultStore's Tally counts each
# outcome into TaskTimes and its failure groups; the drive loop samples the Timeline once a
# period.

class Timeline:
    """Tasks finished over time, for the rate, the ETA and the plot: at most TIMELINE_POINTS
    samples (seconds since the start, done, failed) spanning the whole run; when full, every
    other one goes and samples come half as often.  `first` is (seconds, finished) of the
    first sample with outcomes: the rate is measured from there, not from the start."""
    SETTLE = 0.25                        # seconds after the first result before a rate is told

    def __init__(self, started):
        self.lock = threading.Lock()     # guards every, samples and first
        self.started = started           # time.monotonic() of the run's start
        self.every = 1.0                 # seconds between samples
        self.samples = [(0.0, 0, 0)]     # (seconds since the start, done, failed)
        self.first = None                # (seconds, finished) at the first outcomes

    def sample(self, done, failed):
        """Called by the drive loop every period; keeps one sample per `every` s, and the first
        with outcomes as `first`."""
        at = time.monotonic() - self.started
        with self.lock:
            if self.first is None and done + failed:
                self.first = (at, done + failed)
            if at - self.samples[-1][0] < self.every:
                return
            self.samples.append((at, done, failed))
            if len(self.samples) > TIMELINE_POINTS:
                self.samples, self.every = self.samples[::2], self.every * 2

    def points(self):
        """A copy of the samples: [(seconds since the start, done, failed)]."""
        with self.lock:
            return list(self.samples)

    def rate(self, finished):
        """Tasks per second over the last RATE_WINDOW s, from the first result on; None until
        SETTLE s have passed since the first result."""
        at = time.monotonic() - self.started
        with self.lock:
            if self.first is None:
                return None
            since, count = self.first
            for sampled, done, failed in reversed(self.samples):
                if sampled <= at - RATE_WINDOW:
                    if sampled > since:
                        since, count = sampled, done + failed
                    break
        return (finished - count) / (at - since) if at - since >= self.SETTLE else None


class TaskTimes:
    """How long calc took per task, as counts in bins a tenth of a decade wide (1 ms, 1.26 ms,
    1.58 ms, ...): a histogram of any number of tasks in constant memory, for a few tenths of a
    microsecond per task.  Not locked: its Tally adds and reads under its own lock."""
    PER_DECADE = 10
    OFFSET = 60                          # bin 0 is 1 microsecond, which shorter tasks count as

    def __init__(self):
        self.counts = {}                 # bin b -> tasks of [10**(b/10 - 6), 10**((b+1)/10 - 6)) s
        self.total, self.longest = 0.0, 0.0

    def add(self, seconds):
        """Count one task that took `seconds` in calc."""
        bin_ = int(math.log10(seconds) * self.PER_DECADE + self.OFFSET) if seconds > 1e-6 else 0
        self.counts[bin_] = self.counts.get(bin_, 0) + 1
        self.total += seconds
        if seconds > self.longest:
            self.longest = seconds

    def bins(self):
        """{"count", "mean", "max" (seconds), "bins": [[from s, to s, tasks], ...]} over the bins
        from the shortest task to the longest, empty ones included."""
        count = sum(self.counts.values())
        if not count:
            return {"count": 0, "mean": None, "max": None, "bins": []}
        edge = lambda b: 10 ** ((b - self.OFFSET) / self.PER_DECADE)
        return {"count": count, "mean": self.total / count, "max": self.longest,
                "bins": [[edge(b), edge(b + 1), self.counts.get(b, 0)]
                         for b in range(min(self.counts), max(self.counts) + 1)]}


def run_state(run):
    """What the live page, /status.json and the report show (see README.md "The live page");
    O(hosts + tasks in flight), not O(tasks).  Counts come from locked accessors, each a copy.
    Read without a lock: what never changes (the board's total, the hosts, the stamp, the
    start), the list of runners (set once by drive()), each runner's snapshot() (see there),
    and the board's `finished` and `stopping`, which only ever turn True: a late read shows
    "running" for one refresh more."""
    done, failed = run.tally.counts()
    _, in_flight, _ = run.board.counts()
    total, finished = run.board.total, done + failed
    rate = run.timeline.rate(finished)
    up, refused = run.fleet.snapshot()
    per_host = run.tally.host_counts()
    views = {runner.host.number: runner.snapshot() for runner in run.runners}
    ages = run.board.ages([index for view in views.values() for index in view["tasks"]])
    hosts, running = [], []
    for host in run.hosts:
        view = views.get(host.number, {"slots": 0, "tasks": [], "down_reason": None})
        host_done, host_failed, seconds = per_host.get(host.label, (0, 0, 0.0))
        mine = [(ages[index], index, host.label) for index in view["tasks"] if index in ages]
        running += mine
        if host.number in up:
            state, why = "up", None
        elif host.number in refused:
            state, why = "refusing", refused[host.number]
        else:
            state, why = "down", view["down_reason"] or "not connected yet"
        outcomes = host_done + host_failed
        hosts.append({"host": host.label, "url": host.uri + "/", "state": state, "why": why,
                      "slots": view["slots"], "in_flight": len(mine), "done": host_done,
                      "failed": host_failed,
                      "mean_task_seconds": seconds / outcomes if outcomes else None,
                      "oldest_running_seconds": max(mine)[0] if mine else None})
    times = run.tally.task_time_bins()
    state = "finished" if run.board.finished else "stopped" if run.board.stopping else "running"
    elapsed = time.monotonic() - run.started
    if state != "running":               # the report: the mean rate of the whole run
        rate = finished / elapsed if elapsed > 0 else None
    return {
        "name": run.context.name, "run": run.context.stamp, "state": state,
        "elapsed_seconds": elapsed,
        "total": total, "done": done, "failed": failed, "in_flight": in_flight,
        "left": max(0, total - finished - in_flight),
        "rate_per_second": rate,
        "eta_seconds": (total - finished) / rate if rate and state == "running" else None,
        "hosts": hosts,
        "failures": [{"exception": line, "count": count, "tasks": indices, "traceback": error}
                     for line, count, error, indices in run.tally.failure_groups()[:PAGE_ROWS]],
        "slowest": [{"task": index, "host": label, "seconds": age}
                    for age, index, label in sorted(running, reverse=True)[:PAGE_ROWS]],
        "timeline": [list(point) for point in run.timeline.points()],
        "task_seconds": times}


# ------ The page: complete HTML from the server, inline SVG, no JavaScript needed ----------

PAGE_STYLE = """
:root{--done:#2e7d32;--failed:#c62828;--flight:#1565c0;--left:#d0d7de;--fg:#1f2328;
--muted:#59636e;--line:#d8dee4;--card:#fff;--bg:#f3f5f7}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
main{max-width:1120px;margin:0 auto;padding:16px}
h1{font-size:1.35rem;margin:0}h2{font-size:1.05rem;margin:0 0 8px}
.muted,small{color:var(--muted)}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:14px 16px;margin:12px 0}
.bar{display:flex;height:20px;border-radius:4px;overflow:hidden;background:var(--left);
margin:10px 0}
.bar span{height:100%}
.stats{display:grid;grid-template-columns:repeat(auto-fit,minmax(96px,1fr));gap:8px}
.stats div{border-left:4px solid var(--line);padding-left:8px}
.stats b{display:block;font-size:1.35rem;font-variant-numeric:tabular-nums}
.done{border-color:var(--done)!important}.failed{border-color:var(--failed)!important}
.flight{border-color:var(--flight)!important}.left{border-color:var(--left)!important}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(330px,1fr));gap:0 12px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:5px 8px;border-bottom:1px solid var(--line);text-align:right;vertical-align:top}
th{font-weight:600;color:var(--muted);white-space:nowrap}
th:first-child,td:first-child,th.text,td.text{text-align:left}
td.why{text-align:left;color:var(--muted);font-size:.85rem;max-width:26em}
.up{color:var(--done)}.down,.refusing{color:var(--failed)}
tr.total td{font-weight:600;border-bottom:0}
details{border-top:1px solid var(--line);padding:6px 0}
summary{cursor:pointer}summary b{color:var(--failed)}
pre{margin:6px 0 0;padding:8px;background:var(--bg);border-radius:4px;overflow-x:auto;
font-size:12px;line-height:1.35}
svg{display:block;width:100%;height:auto}svg text{font-size:14px;fill:var(--muted)}
h1 small,.nowrap{white-space:nowrap}
footer{font-size:.85rem;color:var(--muted);margin:16px 0}
@media (max-width:640px){
main{padding:8px}.card{padding:10px 12px}svg text{font-size:19px}
table.rows thead{display:none}
table.rows tr{display:grid;grid-template-columns:1fr 1fr;column-gap:20px;
border-bottom:1px solid var(--line);padding:6px 0}
table.rows td{display:flex;justify-content:space-between;gap:8px;border:0;padding:1px 0;
text-align:right}
table.rows td::before{content:attr(data-label);color:var(--muted);text-align:left}
table.rows td:first-child,table.rows td.why{grid-column:1/-1}
table.rows td.why{max-width:none}table.rows td.why:empty{display:none}
}
"""

# On the live page only: fetch the page again every DASHBOARD_REFRESH s and swap it in, keeping
# the tracebacks the reader opened; without JavaScript a meta refresh does it (less smoothly).
PAGE_SCRIPT = """
(function(){var busy=false,shown=document.getElementById("live");
setInterval(function(){if(busy)return;busy=true;
fetch(location.pathname,{cache:"no-store"}).then(function(r){return r.text()}).then(function(t){
var open={};document.querySelectorAll("details[open]").forEach(function(d){open[d.id]=1});
var page=new DOMParser().parseFromString(t,"text/html");
document.querySelector("main").replaceWith(page.querySelector("main"));document.title=page.title;
document.querySelectorAll("details").forEach(function(d){if(open[d.id])d.open=true});
shown=document.getElementById("live")}).catch(function(){
if(shown)shown.textContent="not updated since "+new Date().toLocaleTimeString()+
": the run has ended"})
.then(function(){busy=false})},%d)})();
"""


def esc(value):
    """Text for HTML: escaped, with a peer's control characters made visible (see printable)."""
    return html.escape(printable(str(value)))


def render_page(state, live):
    """The dashboard's page (`live`) or the report: one complete HTML document that loads
    nothing else.  The report adds a histogram of task times and does not link to the hosts."""
    finished = state["done"] + state["failed"]
    percent = 100.0 * finished / state["total"] if state["total"] else 100.0
    title = "%s %.0f%% - oden %s" % (state["state"], percent, state["name"])
    if live:
        head = ("<noscript><meta http-equiv=\"refresh\" content=\"%d\"></noscript>"
                "<script>%s</script>" % (max(5, DASHBOARD_REFRESH),
                                         PAGE_SCRIPT % (DASHBOARD_REFRESH * 1000)))
        when = "<span id=\"live\">live: updated every %d s</span>" % DASHBOARD_REFRESH
    else:
        offline = dict(state, hosts=[{k: v for k, v in h.items() if k != "url"}
                                     for h in state["hosts"]])
        head = "<script type=\"application/json\" id=\"oden-status\">%s</script>" % json.dumps(
            offline, default=str).replace("<", "\\u003c")     # for scripts; names no other host
        when = ("report written <span class=\"nowrap\">%s</span>"
                % esc(time.strftime("%Y-%m-%d %H:%M:%S")))
    beside = (html_slowest(state["slowest"], state["in_flight"]) if live else
              card("How long tasks took", svg_histogram(state["task_seconds"])))
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        "<title>%s</title><style>%s</style>%s</head><body><main>" % (esc(title), PAGE_STYLE, head),
        "<header><h1>oden: %s <small>run %s</small></h1>"
        "<div class=\"muted\">%s, %s elapsed; %s</div></header>"
        % (esc(state["name"]), esc(state["run"]), esc(state["state"]),
           format_duration(state["elapsed_seconds"]), when),
        html_progress(state, percent),
        "<div class=\"grid\">%s%s</div>"
        % (card("Tasks finished over time", svg_timeline(state)), beside),
        html_hosts(state["hosts"], live), html_failures(state["failures"], state["failed"]),
        "<footer>oden %s. %sCounts, ages and tracebacks only: never a task or a result.</footer>"
        % (VERSION, "Read-only; the same for scripts: /status.json. " if live else ""),
        "</main></body></html>\n"])


def card(heading, body):
    """One box of the page: a heading over `body` (HTML)."""
    return "<section class=\"card\"><h2>%s</h2>%s</section>" % (heading, body)


def html_progress(state, percent):
    """The bar (done, failed, in flight, left) and the figures under it."""
    total = max(1, state["total"])
    parts = [("done", state["done"]), ("failed", state["failed"]),
             ("in flight", state["in_flight"]), ("left", state["left"])]
    bar = "".join("<span style=\"width:%.3f%%;background:var(--%s)\" title=\"%s: %d\"></span>"
                  % (100.0 * count / total, css.split()[-1], css, count)
                  for css, count in parts[:3] if count)
    tiles = [(css.split()[-1], css, "{:,}".format(count)) for css, count in parts]
    if state["state"] == "running":
        tiles += [("", "tasks/s", format_rate(state["rate_per_second"])),
                  ("", "ETA", optional_duration(state["eta_seconds"]).replace("-", "?"))]
    else:
        tiles += [("", "mean tasks/s", format_rate(state["rate_per_second"])),
                  ("", "elapsed", format_duration(state["elapsed_seconds"]))]
    finished = "{:,}".format(state["done"] + state["failed"])
    return card("%s of %s tasks finished (%.1f%%)"
                % (finished, "{:,}".format(state["total"]), percent),
                "<div class=\"bar\">%s</div><div class=\"stats\">%s</div>"
                % (bar, "".join("<div class=\"%s\"><b>%s</b>%s</div>" % (css, value, label)
                                for css, label, value in tiles)))


HOST_COLUMNS = (("host", "text"), ("state", "text"), ("slots", ""), ("in flight", ""), ("done", ""),
                ("failed", ""), ("mean task", ""), ("oldest running", ""), ("why", "why"))


def html_hosts(hosts, live):
    """The table of hosts, with a total row; live, each host links to its worker's own page."""
    rows = []
    for h in hosts:
        label = esc(h["host"])
        if live:
            label = "<a href=\"%s\">%s</a>" % (esc(h["url"]), label)
        rows.append([label, "<span class=\"%s\">%s</span>" % (h["state"], h["state"]),
                     str(h["slots"]), str(h["in_flight"]), "{:,}".format(h["done"]),
                     "{:,}".format(h["failed"]), optional_duration(h["mean_task_seconds"]),
                     optional_duration(h["oldest_running_seconds"]), esc(h["why"] or "")])
    done, failed = sum(h["done"] for h in hosts), sum(h["failed"] for h in hosts)
    means = [(h["mean_task_seconds"], h["done"] + h["failed"])
             for h in hosts if h["mean_task_seconds"] is not None]
    mean = sum(m * n for m, n in means) / sum(n for _, n in means) if means else None
    oldest = [h["oldest_running_seconds"] for h in hosts if h["oldest_running_seconds"] is not None]
    up = sum(1 for h in hosts if h["state"] == "up")
    total = ["total", "%d of %d up" % (up, len(hosts)), str(sum(h["slots"] for h in hosts)),
             str(sum(h["in_flight"] for h in hosts)), "{:,}".format(done), "{:,}".format(failed),
             optional_duration(mean), optional_duration(max(oldest) if oldest else None), ""]
    return card("Hosts", html_table(HOST_COLUMNS, rows, total))


def html_table(columns, rows, total=None):
    """A table whose rows turn into label-value pairs on a phone (data-label, see PAGE_STYLE).
    `columns`: (label, kind): "text" left-aligned, "" a number, "why" a note without a heading;
    `rows`: lists of cells as HTML; `total`: a last row in bold."""
    def row(cells, css):
        return "<tr%s>%s</tr>" % (css, "".join(
            "<td data-label=\"%s\" class=\"%s\">%s</td>" % (label, kind, cell)
            for cell, (label, kind) in zip(cells, columns)))
    head = "".join("<th class=\"%s\">%s</th>" % (kind, "" if kind == "why" else label)
                   for label, kind in columns)
    last = row(total, " class=\"total\"") if total else ""
    return ("<table class=\"rows\"><thead><tr>%s</tr></thead><tbody>%s%s</tbody></table>"
            % (head, "".join(row(cells, "") for cells in rows), last))


def optional_duration(seconds):
    """format_duration(), or "-" for None (not known, nothing running)."""
    return "-" if seconds is None else format_duration(seconds)


def html_failures(failures, failed):
    """Failures grouped by exception: the count, the tasks (indices) and one traceback each."""
    if not failures:
        return card("Failures", "<p class=\"muted\">None.</p>")
    groups = []
    for group in failures:
        shown = ", ".join(str(index) for index in group["tasks"])
        more = group["count"] - len(group["tasks"])
        anchor = hashlib.sha256(group["exception"].encode("utf-8", "replace")).hexdigest()[:10]
        groups.append("<details id=\"f%s\"><summary><b>%d &times;</b> %s<br><small>task%s %s%s"
                      "</small></summary><pre>%s</pre></details>"
                      % (anchor, group["count"], esc(group["exception"]),
                         "s" if group["count"] > 1 else "", shown,
                         " and %d more" % more if more > 0 else "",
                         esc(group["traceback"].rstrip())))
    return card("Failures: %s <small>grouped by exception; open one for its traceback</small>"
                % "{:,}".format(failed), "".join(groups))


def html_slowest(slowest, in_flight):
    """The tasks in flight longest (since they were sent), with their host."""
    if not slowest:
        return card("Running longest", "<p class=\"muted\">Nothing in flight.</p>")
    rows = [[str(s["task"]), esc(s["host"]), format_duration(s["seconds"])] for s in slowest]
    return card("Running longest <small>%d of %s tasks in flight</small>"
                % (len(slowest), "{:,}".format(in_flight)),
                html_table((("task", "text"), ("host", "text"), ("in flight for", "")), rows))


# ------ Plots: inline SVG drawn on a 480 x 200 canvas that scales with the page -------------

PLOT_WIDTH, PLOT_HEIGHT, PLOT_LEFT, PLOT_BOTTOM = 480, 200, 52, 24


def plot_frame(x_labels, y_labels, description):
    """The SVG opening, axes and labels; x_labels/y_labels: [(position 0-1, text)]."""
    right, top = PLOT_WIDTH - 10, 10
    bottom = PLOT_HEIGHT - PLOT_BOTTOM
    parts = ["<svg viewBox=\"0 0 %d %d\" role=\"img\" aria-label=\"%s\"><title>%s</title>"
             % (PLOT_WIDTH, PLOT_HEIGHT, esc(description), esc(description))]
    for position, text in y_labels:
        y = bottom - (bottom - top) * position
        parts.append("<line x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#d8dee4\"/>"
                     "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%s</text>"
                     % (PLOT_LEFT, right, y, y, PLOT_LEFT - 6, y + 4, esc(text)))
    for position, text in x_labels:
        x = PLOT_LEFT + (right - PLOT_LEFT) * position
        anchor = "start" if position == 0 else "end" if position == 1 else "middle"
        parts.append("<text x=\"%.1f\" y=\"%d\" text-anchor=\"%s\">%s</text>"
                     % (x, PLOT_HEIGHT - 6, anchor, esc(text)))
    return parts


def format_count(count):
    """A count short enough for a plot's axis: 950, 12k, 1.2M."""
    for size, unit in ((1e6, "M"), (1e3, "k")):
        if count >= 10 * size:
            return "%.0f%s" % (count / size, unit)
        if count >= size:
            return "%.1f%s" % (count / size, unit)
    return "%g" % round(count, 1)


def svg_timeline(state):
    """Tasks finished (done and failed) against the time since the start, up to now."""
    points = state["timeline"] + [[state["elapsed_seconds"], state["done"], state["failed"]]]
    span, most = max(points[-1][0], 1.0), max(state["total"], 1)
    right, top, bottom = PLOT_WIDTH - 10, 10, PLOT_HEIGHT - PLOT_BOTTOM
    x = lambda t: PLOT_LEFT + (right - PLOT_LEFT) * t / span
    y = lambda n: bottom - (bottom - top) * n / most
    finished = " ".join("%.1f,%.1f" % (x(t), y(d + f)) for t, d, f in points)
    failed = " ".join("%.1f,%.1f" % (x(t), y(f)) for t, d, f in points)
    parts = plot_frame([(0, "0"), (0.5, format_duration(span / 2)), (1, format_duration(span))],
                       [(0, "0"), (0.5, format_count(most / 2)), (1, format_count(most))],
                       "tasks finished over time: %d of %d after %s"
                       % (points[-1][1] + points[-1][2], state["total"], format_duration(span)))
    parts.append("<polygon points=\"%.1f,%.1f %s %.1f,%.1f\" fill=\"#2e7d32\" "
                 "fill-opacity=\".15\"/>" % (x(0), y(0), finished, x(points[-1][0]), y(0)))
    line = "<polyline points=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"%s\"/>"
    parts.append(line % (finished, "#2e7d32", 2))
    if state["failed"]:
        parts.append(line % (failed, "#c62828", 1.5))
    parts.append("</svg><small>green: finished (done and failed)%s</small>"
                 % ("; red: failed" if state["failed"] else ""))
    return "".join(parts)


def svg_histogram(times):
    """Tasks per bin of time calc took (log scale), as bars; at most 40 bars."""
    bins = times["bins"]
    if not bins:
        return "<p class=\"muted\">No task times.</p>"
    merge = -(-len(bins) // 40)
    bins = [[group[0][0], group[-1][1], sum(b[2] for b in group)]
            for group in (bins[i:i + merge] for i in range(0, len(bins), merge))]
    most = max(b[2] for b in bins)
    right, top, bottom = PLOT_WIDTH - 10, 10, PLOT_HEIGHT - PLOT_BOTTOM
    width = (right - PLOT_LEFT) / len(bins)
    low, high = math.log10(bins[0][0]), math.log10(bins[-1][1])
    decades = range(math.ceil(low), math.floor(high) + 1)
    if len(decades) > 1:
        x_labels = [((decade - low) / (high - low), format_duration(10 ** decade))
                    for decade in decades]
    else:
        x_labels = [(0, format_duration(bins[0][0])), (1, format_duration(bins[-1][1]))]
    parts = plot_frame(x_labels, [(0, "0"), (1, format_count(most))],
                       "how long tasks took: %d tasks, mean %s, longest %s"
                       % (times["count"], format_duration(times["mean"]),
                          format_duration(times["max"])))
    for position, (low, high, count) in enumerate(bins):
        height = (bottom - top) * count / most
        parts.append("<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"#1565c0\">"
                     "<title>%s to %s: %d</title></rect>"
                     % (PLOT_LEFT + position * width + 1, bottom - height, max(width - 2, 1),
                        height, format_duration(low), format_duration(high), count))
    parts.append("</svg><small>%s tasks; mean %s, longest %s (time in calc on the worker, "
                 "log scale)</small>" % ("{:,}".format(times["count"]),
                                         format_duration(times["mean"]),
                                         format_duration(times["max"])))
    return "".join(parts)


# ------ The server and the report ---------------------------------------------------------

TEXT = "text/plain; charset=utf-8"


class DashboardHandler(http.server.BaseHTTPRequestHandler):
    """GET / (the page) and GET /status.json; nothing else, nothing that changes the run.
    On loopback it answers only requests addressed to loopback (no DNS rebinding)."""

    server_version = "oden/" + VERSION
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        """The live page (/) or its figures (/status.json)."""
        server = self.server
        path = self.path.split("?")[0]
        if server.loopback_only and not is_loopback_name(self.headers.get("Host", "")):
            return self._send(403, TEXT, b"this page answers only to loopback names\n")
        if path not in ("/", "/status.json"):
            return self._send(404, TEXT, b"no such page: try / or /status.json\n")
        try:
            state = run_state(server.run)
            if path == "/":
                page = render_page(state, live=True)
                return self._send(200, "text/html; charset=utf-8", page.encode())
            return self._send(200, "application/json", json.dumps(state, default=str).encode())
        except Exception:
            log.exception("the dashboard failed on %s (a bug: please report it)", path)
            return self._send(500, TEXT, b"the dashboard failed: see the manager's log\n")

    def _send(self, code, content_type, body):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        log.debug("dashboard: %s %s", self.client_address[0], fmt % args)


def is_loopback(address):
    """True for "localhost" and a loopback IP address (127.x.x.x, ::1)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def is_loopback_name(host_header):
    """True for a Host header naming loopback: localhost, 127.x.x.x or [::1], with a port or not."""
    name = re.sub(r":\d*$", "", host_header.strip()).strip("[]").lower()
    return is_loopback(name)


class DashboardServer(ThreadingServer):
    """The live page's server: a thread per request; `run` and `loopback_only` are set by
    Dashboard before it serves."""
    daemon_threads = True

    def __init__(self, address):
        super().__init__(address, DashboardHandler)


class Dashboard:
    """The manager's live page: a small HTTP server in a thread of its own, from the run's
    start to its end.  `address`: (host, port), port 0 for a free one."""

    def __init__(self, run, address):
        host, port = address
        try:
            self.server = DashboardServer((host, port))
        except OSError as e:
            raise OdenError("cannot serve the dashboard on %s:%d (%s): pick another --dashboard "
                            "HOST:PORT, or pass --no-dashboard" % (host, port, e.strerror or e))
        self.server.run, self.server.loopback_only = run, is_loopback(host)
        shown = (platform.node() if host in ("0.0.0.0", "::")
                 else "[%s]" % host if ":" in host else host)
        self.url = "http://%s:%d/" % (shown, self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="dashboard",
                                       kwargs={"poll_interval": 0.1}, daemon=True)  # close(): 0.1 s
        self.thread.start()
        log.info("dashboard: %s (the run's live page; JSON at status.json)", self.url)
        if not self.server.loopback_only:
            log.warning("the dashboard listens on %s: whoever reaches that port sees the run's "
                        "counts and tracebacks (read-only)", host)

    def close(self):
        """Stop serving the page and wait for its thread."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def write_report(run):
    """The run's page, frozen, as {name}_{stamp}.html beside its log; logs where it is."""
    context = run.context
    path = os.path.join(context.folder, report_file_name(context.name, context.stamp))
    try:
        page = render_page(run_state(run), live=False).encode("utf-8")
        write_atomically(path, lambda f: f.write(page))
    except OSError as e:
        log.warning("cannot write the report %s (%s)", path, e.strerror or e)
        return None
    log.info("report: %s", path)
    return path


# ====================================================================
# Other commands: local, test, status, results, init
# ====================================================================

def run_local(job, settings, argv):
    """Start loopback workers, run the manager against them, stop them."""
    env = dict(os.environ)
    env.setdefault(KEY_ENV, secrets.token_urlsafe(32))
    os.environ[KEY_ENV] = env[KEY_ENV]
    cores = os.cpu_count() or 1
    slots = settings.slots or max(1, cores // settings.workers)
    if not settings.resume:
        confirm_new_run(settings.folder, settings.name, settings.yes, resume_command(argv))
    stamp = claim_stamp(settings.folder, settings.name)
    worker_log = open(os.path.join(settings.folder, workers_log_name(settings.name, stamp)), "ab")
    workers = []
    try:
        script = os.path.abspath(sys.argv[0])
        for _ in range(settings.workers):
            workers.append(start_worker_process(script, env, slots, worker_log, settings.threads))
        hosts = [Host(number, "127.0.0.1", port) for number, (_, port) in enumerate(workers, 1)]
        return run_manager(job, settings, hosts, settings.resume, argv, stamp)
    finally:
        for process, _ in workers:
            stop_process(process)
        worker_log.close()


def start_worker_process(script, env, slots, log_file, threads=False):
    """Start `python3 script worker` on a free loopback port; return (process, port)."""
    command = [sys.executable, script, "worker", "--bind", "127.0.0.1", "--port", "0",
               "--slots", str(slots)]
    process = subprocess.Popen(command + (["--threads"] if threads else []), env=env,
                               stdout=subprocess.PIPE, stderr=log_file)
    port = read_port_within(process, 30, log_file)
    if port is None:
        stop_process(process)
        raise OdenError("a local worker did not start: see %s" % log_file.name)
    return process, port


def read_port_within(process, seconds, sink):
    """The port from a worker's first line; its later output is copied on to `sink`."""
    first = threading.Event()
    lines = []

    def copy():
        with process.stdout, contextlib.suppress(ValueError, OSError):     # sink may close first
            for line in process.stdout:
                if not first.is_set():
                    lines.append(line.decode("utf-8", "replace"))
                    first.set()
                sink.write(line)
                sink.flush()
        first.set()

    threading.Thread(target=copy, daemon=True).start()
    first.wait(seconds)
    match = re.search(r"listening on https?://\S*:(\d+)", lines[0] if lines else "")
    return int(match.group(1)) if match else None


def stop_process(process):
    """Stop a child process: SIGTERM, then SIGKILL after 10 s; reaped either way."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_test(job):
    """Run calc on every task here, one after another, and report each."""
    tasks = user_tasks(job)
    pickle_tasks(tasks)                  # a task that cannot travel to a worker fails here too
    failed = 0
    for index, task in enumerate(tasks):
        record = run_task(job.calc, index, dumps(task))
        if record["ok"]:
            print("task %d %r: %r" % (index, task, pickle.loads(record["result"])))
        else:
            failed += 1
            print("task %d %r FAILED:\n%s" % (index, task, record["error"]))
    print("%d tasks: %d ok, %d failed" % (len(tasks), len(tasks) - failed, failed))
    return 1 if failed else 0


def client_tls(cafile):
    """The TLS context that trusts `cafile` for talking to workers, or None (plain http)."""
    if not cafile:
        return None
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as e:
        raise OdenError("cannot load --cafile %s (%s): give the CA or certificate (PEM) the "
                        "workers use" % (cafile, getattr(e, "strerror", None) or e))


def fetch_status(host, request_timeout, tls=None):
    """One host's /status.json, or {"error": reason}, within request_timeout whatever it does."""
    connection = (http.client.HTTPSConnection(host.address, host.port, context=tls) if tls
                  else http.client.HTTPConnection(host.address, host.port))
    try:
        response, data = http_request(connection, "GET", "/status.json", None,
                                      {"Connection": "close"}, request_timeout, SMALL_REPLY,
                                      "not an oden worker")
    except HostError as e:
        return {"error": str(e)}
    except (OSError, http.client.HTTPException) as e:
        return {"error": explain_network_error(e, request_timeout)}
    finally:
        connection.close()
    if response.status != 200:
        return {"error": "not an oden worker (HTTP %d for /status.json)" % response.status,
                "answers": True}
    state = checked_status(data)
    if "error" in state:
        state["answers"] = True          # something answers there, but no oden worker
    return state


STATUS_FIELDS = ("state", str), ("slots", int), ("slots_busy", int), ("done", int), ("failed", int)


def checked_status(data):
    """A /status.json answer as a dict fit to show, or {"error": reason} when it is no worker's."""
    try:
        state = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):             # RecursionError: deeply nested JSON
        return {"error": "not an oden worker: its /status.json is not JSON"}
    if not isinstance(state, dict):
        return {"error": "not an oden worker: its /status.json is not an object"}
    wrong = [field for field, kind in STATUS_FIELDS
             if not isinstance(state.get(field), kind) or isinstance(state.get(field), bool)]
    if wrong:
        return {"error": "not an oden worker: its /status.json lacks a valid %s" % ", ".join(wrong)}
    load = state.get("load")
    if not (isinstance(load, list) and load and all(isinstance(x, (int, float)) for x in load)):
        state["load"] = None
    state["state"] = peer_text(state["state"], 20)
    return state


def why_unusable(host, key, settings, tls, manifest):
    """Why a worker that answers /status.json would not take this project's work, or None:
    a signed /hello with our key, checked as the manager checks it (HostRunner.connect)."""
    client = HostClient(host, Codec(key), settings.timeout, tls, keepalive=False)
    try:
        hello = client.connect(manifest)
    except HostError as e:
        reason = str(e)
        if key is None and "HTTP 401" in reason:
            return ("it has a key and we have none: put its oden.key next to %s (or set $%s)"
                    % (os.path.basename(sys.argv[0]) or "oden.py", KEY_ENV))
        if "without a key" in reason:
            return "no key there: copy oden.key from this PC next to its oden.py and restart it"
        if "signature" in reason or "not signed with our key" in reason:
            return "wrong key: copy oden.key from this PC to it and restart it"
        if "not an oden message" in reason:
            return "not an oden worker (its /hello answer is not an oden message)"
        return reason
    finally:
        client.close()
    if hello.get("stale"):
        if hello.get("name") != settings.name:
            return ("another project's job (%s): start this project's worker there, on another "
                    "--port" % printable(repr(hello.get("name")))[:80])
        differ = "different code (%d files differ: %s)" % (
            len(hello["stale"]), peer_text(", ".join(map(str, hello["stale"][:5])), 80))
        if hello.get("refuses_push"):
            return differ + " and it takes no pushes: copy the project there yourself"
        return differ + ": run 'python3 %s push'" % (os.path.basename(sys.argv[0]) or "oden.py")
    return None


def on_every_host(function, hosts):
    """[function(host) for host in hosts], called for the hosts at once (64 at a time at most):
    a command waits for its slowest host, not for the sum of them."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(64, len(hosts))) as pool:
        return list(pool.map(function, hosts))


def run_status(job, settings, hosts):
    """The `status` command: every host's state, and whether it would take our work and why not."""
    tls = client_tls(settings.cafile)
    key, manifest = load_key(settings.key_file), code_manifest(job.files)

    def probe(host):
        state = fetch_status(host, settings.timeout, tls)
        return state, state.get("error") or why_unusable(host, key, settings, tls, manifest)

    probes = on_every_host(probe, hosts)
    rows = [("host", "reachable", "state", "slots busy", "done", "failed", "load", "oldest task",
             "usable")]
    for host, (state, problem) in zip(hosts, probes):
        usable = "no: " + problem if problem else "yes"
        if "error" in state:
            reachable = "yes" if state.get("answers") else "no"
            rows.append((host.label, reachable, "", "", "", "", "", "", usable))
            continue
        load, ages = state.get("load"), state.get("running_task_ages") or []
        rows.append((host.label, "yes", state["state"],
                     "%d/%d" % (state["slots_busy"], state["slots"]), str(state["done"]),
                     str(state["failed"]), "%.2f" % load[0] if load else "-",
                     format_duration(max(ages)) if ages else "-", usable))
    print(format_table(rows))
    return 0 if not any(problem for _, problem in probes) else 1


def run_push(job, settings, hosts):
    """Bring every host's code to ours without running a task: one line a host."""
    key = load_key(settings.key_file)
    if key is None:
        raise OdenError("no key: pushes need one. Run 'python3 oden.py init' and copy the project "
                        "with %s to the workers once" % KEY_FILE)
    manifest, tls = code_manifest(job.files), client_tls(settings.cafile)
    log.info("code %s: %d files", manifest_digest(manifest), len(manifest))

    def push_one(host):
        client = HostClient(host, Codec(key), settings.timeout, tls)
        try:
            hello = client.connect(manifest)
            if not hello.get("stale"):
                return "up to date"
            push_id = "push-" + secrets.token_hex(4)
            push_code(client, host, manifest, hello, push_id, settings.max_push, settings.name)
            return "pushed %d files" % len(hello["stale"])
        except HostError as e:
            return "FAILED: %s" % e
        finally:
            client.close()

    outcomes = on_every_host(push_one, hosts)
    print(format_table([("host", "code")] + [(h.label, o) for h, o in zip(hosts, outcomes)]))
    return 1 if any(o.startswith("FAILED") for o in outcomes) else 0


def run_results(settings):
    """The `results` command: list, count or export the outcomes of run `name` (by default the
    latest of each task; --all every one, --run STAMP one run's), in task order."""
    name, folder = settings.name, settings.folder
    run = "all" if settings.all else settings.run
    tell = lambda path, why: print(skipped_text(path, why), file=sys.stderr)
    everything = all_records(folder, name, tell)
    records = choose_records(everything, run)
    standing = {id(record) for record in latest_outcomes(everything)}
    if not records:
        print("no result files of run %r%s in %s: check --name and --folder%s"
              % (name, " with stamp %s" % run if run not in (None, "all") else "",
                 os.path.abspath(folder), "; its runs: " + ", ".join(run_stamps(everything))
                 if everything else ""), file=sys.stderr)
    with contextlib.suppress(AttributeError, ValueError):    # any text, whatever the locale
        sys.stdout.reconfigure(encoding="utf-8" if settings.format else None,
                               errors="backslashreplace")
    if settings.summary:
        print(results_summary(name, records, everything, standing, run))
        return 0
    if not settings.errors:
        records = [record for record in records if "result" in record]
    if settings.format == "json":
        json.dump([plain_record(r, id(r) not in standing) for r in records], sys.stdout, indent=1,
                  default=repr, ensure_ascii=False)
        print()
    elif settings.format == "csv":
        writer = csv.writer(sys.stdout)
        columns = ["index", "status", "task", "result", "exception", "host", "seconds", "run",
                   "superseded"]
        writer.writerow(columns)
        for r in records:
            plain = plain_record(r, id(r) not in standing)
            writer.writerow([text_cell(plain[column]) for column in columns])
    else:
        for r in records:
            outcome = (cut(repr(r["result"]), settings.full) if "result" in r
                       else "ERROR " + r.get("exception", ""))
            marks = "  (superseded by a later run)" if id(r) not in standing else ""
            print("%s%s -> %s%s" % (r["run"] + "  " if run == "all" else "",
                                    cut(repr(r["task"]), settings.full), outcome, marks))
    return 0


def cut(text, full=False):
    """`text`, or its first RESULT_CUT characters and how many more there are."""
    if full or len(text) <= RESULT_CUT:
        return text
    return "%s... (%d more characters; --full shows all)" % (text[:RESULT_CUT],
                                                              len(text) - RESULT_CUT)


def plain_record(record, superseded=False):
    """A record as `results --json` and `--csv` show it: no traceback, no output."""
    return {"index": record["index"], "status": "done" if "result" in record else "error",
            "task": record["task"], "result": record.get("result"),
            "exception": record.get("exception"), "host": record["host"],
            "seconds": task_seconds(record), "run": record["run"], "superseded": superseded}


def text_cell(value):
    """A CSV cell: text as it is, numbers in digits, nothing for None, anything else as its repr."""
    if value is None:
        return ""
    if isinstance(value, (str, int, float)):
        return str(value)
    return repr(value)


def task_seconds(record):
    """How long calc took for a record (rounded to microseconds), or None."""
    if record.get("started") and record.get("ended"):
        return round(record["ended"] - record["started"], 6)
    return None


def run_stamps(records):
    """The stamps of the runs `records` come from, oldest first."""
    return sorted({record["run"] for record in records}, key=stamp_order)


def results_summary(name, records, everything, standing, run):
    """The counts of `records`, failures grouped by exception with one traceback and their tasks
    each, and every run of `name` with its counts (of `everything`; `standing`: ids of the
    records that are their task's latest outcome)."""
    errors = [record for record in records if "result" not in record]
    what = {None: "the latest outcome of each task", "all": "every outcome of every run"}.get(
        run, "run %s" % run)
    lines = ["run %r: %d done, %d errors (%s)" % (name, len(records) - len(errors), len(errors),
                                                   what)]
    for stamp in run_stamps(everything):
        mine = [record for record in everything if record["run"] == stamp]
        failed = sum(1 for record in mine if "result" not in record)
        superseded = sum(1 for record in mine if id(record) not in standing)
        lines.append("  run %s: %d done, %d errors%s" % (stamp, len(mine) - failed, failed,
                                                        ", %d superseded by later runs" % superseded
                                                        if superseded else ""))
    groups = collections.OrderedDict()
    for record in errors:
        groups.setdefault(record.get("exception", "?"), []).append(record)
    for exception, group in sorted(groups.items(), key=lambda item: -len(item[1])):
        indices = [record["index"] for record in group]
        lines.append("\n%d x %s\n  e.g. task %s:\n%s\n  tasks %s%s"
                     % (len(group), exception, cut(repr(group[0]["task"])),
                        "    " + group[0]["error"].rstrip().replace("\n", "\n    "),
                        ", ".join(str(i) for i in indices[:PAGE_ROWS]),
                        " and %d more" % (len(indices) - PAGE_ROWS)
                        if len(indices) > PAGE_ROWS else ""))
    return "\n".join(lines)


def run_init(key_file):
    """The `init` command: create the key file, unless there is one already."""
    path = key_path(key_file)
    if os.path.exists(path):
        print("%s exists already: nothing to do (delete it first to make a new key)" % path)
        return 0
    create_key(key_file)
    print("created %s (readable by you only): copy it with the project to every worker" % path)
    return 0


# ====================================================================
# Command line and library entry point
# ====================================================================

OPTIONAL_SETTINGS = {               # what a user section that leaves a setting out gets
    "hosts": None, "task_timeout": None, "chunksize": None, "files": (),
    "handle_finish_machine": lambda uri, name: None, "handle_finish_tasks": lambda: None,
    "show_status": lambda: "oden worker"}
USER_SETTINGS = ("hosts", "name", "interval_polling", "timeout", "task_timeout", "chunksize",
                 "files", "make_tasks", "calc", "handle_finish_machine", "handle_finish_tasks",
                 "show_status")


class Job:
    """The user's settings and functions.

    Run as oden.py: the user section.  Called as oden.main(**settings) from a
    script of the user's: those settings; the sort example's own make_tasks,
    calc, name and show_status are never mixed in (the name defaults to the
    script's name), the other settings default to the user section's values.
    """

    def __init__(self, **overrides):
        unknown = set(overrides) - set(USER_SETTINGS)
        if unknown:
            raise OdenError("oden.main() got unknown settings %s; known: %s"
                            % (", ".join(sorted(unknown)), ", ".join(USER_SETTINGS)))
        defaults = dict((setting, globals().get(setting, OPTIONAL_SETTINGS.get(setting)))
                        for setting in USER_SETTINGS)
        if overrides:
            missing = [f for f in ("make_tasks", "calc") if f not in overrides]
            if missing:
                raise OdenError("oden.main() needs %s: pass your own functions, e.g. oden.main("
                                "make_tasks=make_tasks, calc=calc)" % " and ".join(missing))
            script = os.path.splitext(os.path.basename(sys.argv[0]))[0] or "oden"
            defaults.update(name=script, show_status=lambda: "oden worker for run %r" % self.name)
        for setting in USER_SETTINGS:
            setattr(self, setting, overrides.get(setting, defaults[setting]))


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line, like every other oden error (exit code 2)."""

    def error(self, message):
        self.exit(2, "oden: error: %s (see '%s --help')\n" % (message, self.prog))


def build_parser(job):
    """The command line's parser; the user section's settings are its defaults."""
    parser = Parser(
        prog=os.path.basename(sys.argv[0]) if sys.argv[0] else "oden.py",
        description="oden: spread independent tasks over many machines. "
                    "Try 'local' first; 'COMMAND --help' tells more.")
    parser.add_argument("--version", action="version", version="oden " + VERSION)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    def command(name_, help_):
        return commands.add_parser(name_, help=help_, description=help_)

    def key_file(p):
        p.add_argument("--key-file", help="the key file (default: %s next to the script; $%s "
                                          "wins)" % (KEY_FILE, KEY_ENV))

    def manager_options(p):
        p.add_argument("--hosts", dest="hosts_file", metavar="FILE",
                       help="hosts file (default: the 'hosts' setting, else hosts.txt next to the "
                            "script)")
        p.add_argument("--timeout", type=positive_float, default=job.timeout,
                       help="seconds for every HTTP request (default %(default)s)")
        p.add_argument("--interval-polling", type=positive_float, default=job.interval_polling,
                       help="longest wait of one poll, seconds (default %(default)s)")
        p.add_argument("--task-timeout", type=positive_float, default=job.task_timeout,
                       help="seconds a task may run before it is an error (default: %(default)s)")
        p.add_argument("--chunksize", type=positive_int, default=job.chunksize,
                       help="tasks per batch (default: automatic)")
        p.add_argument("--max-attempts", type=positive_int, default=MAX_ATTEMPTS,
                       help="connection failures a task survives (default %(default)s)")
        p.add_argument("--max-deaths", type=positive_int, default=MAX_DEATHS,
                       help="worker deaths a task may witness before it is an error (default "
                            "%(default)s)")
        p.add_argument("--give-up-after", type=positive_float, default=GIVE_UP_AFTER,
                       help="stop when every host has been down this many seconds (default "
                            "%(default)s)")
        p.add_argument("--pack", action="store_true",
                       help="write the successes that arrive together into one .pack.pickle file "
                            "(a list of records): for very many small tasks")
        p.add_argument("--speculate", action="store_true",
                       help="run a backup copy of the slowest task on idle hosts at the end")
        p.add_argument("--no-keepalive", dest="keepalive", action="store_false",
                       help="a new connection for every request")
        p.add_argument("--max-reply", type=positive_int, default=MAX_REPLY,
                       help="largest answer from a worker in bytes; raise it for huge results "
                            "(default %(default)s)")
        p.add_argument("--cafile",
                       help="talk TLS (https) to the workers, trusting this CA or certificate")
        p.add_argument("--insecure", action="store_true",
                       help="no key: send and accept unsigned messages")
        p.add_argument("--max-push", type=positive_int, default=MAX_PUSH,
                       help="largest push of code to a worker in bytes (default %(default)s)")
        p.add_argument("--yes", action="store_true",
                       help="start even when result files of this name exist")
        p.add_argument("--concurrent", action="store_true",
                       help="run even while another manager of this name runs in this folder "
                            "(both write files of the run)")
        p.add_argument("--dashboard", type=dashboard_address, default=(DASHBOARD_BIND, 0),
                       metavar="HOST:PORT", help="where the run's live page listens (default: %s, "
                       "a free port)" % DASHBOARD_BIND)
        p.add_argument("--no-dashboard", dest="dashboard", action="store_const", const=None,
                       help="no live page (the report is written all the same)")
        p.add_argument("-q", "--quiet", action="store_true",
                       help="only warnings and errors, no progress line")
        p.add_argument("-v", "--verbose", action="count", default=0, help="log every task")

    def common(p):
        p.add_argument("--name", default=job.name,
                       help="the run's name, prefix of its files (default %(default)s)")
        p.add_argument("--folder", default=".",
                       help="where result files and logs go (default: current folder)")
        key_file(p)

    p = command("worker", "serve tasks on this machine (run it on every remote)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                   help="port to listen on (default %(default)s; 0 picks a free one)")
    p.add_argument("--bind", default=DEFAULT_BIND,
                   help="address to listen on (default %(default)s)")
    p.add_argument("--slots", type=positive_int, default=os.cpu_count() or 1,
                   help="tasks at once (default: the number of cores, %(default)s)")
    p.add_argument("--threads", action="store_true",
                   help="run calc in threads of this process instead of child processes")
    p.add_argument("--max-body", type=positive_int, default=MAX_BODY,
                   help="largest request in bytes (default %(default)s)")
    p.add_argument("--no-push", action="store_true",
                   help="never take code pushed by a manager: copy the project here yourself")
    p.add_argument("--max-push", type=positive_int, default=MAX_PUSH,
                   help="largest push of code in bytes (default %(default)s)")
    p.add_argument("--max-connections", type=positive_int, default=MAX_CONNECTIONS,
                   help="connections served at once; idle ones close first (default %(default)s, "
                        "fewer at a low open-file limit)")
    p.add_argument("--request-timeout", type=positive_float, default=REQUEST_READ_TIMEOUT,
                   help="seconds a client has for a whole request head, and beyond size / %d "
                        "bytes/s for a body or a reply (default %%(default)s)" % SLOWEST_RATE)
    p.add_argument("--certfile", help="serve TLS with this certificate (PEM)")
    p.add_argument("--keyfile", help="the certificate's private key (PEM), if not in --certfile")
    p.add_argument("--insecure", action="store_true",
                   help="serve without a key: anyone who reaches the port can run code "
                        "(trusted networks only)")
    p.add_argument("--name", default=job.name, help=argparse.SUPPRESS)
    key_file(p)
    p.add_argument("-v", "--verbose", action="count", default=0, help="log every request")
    for mode, text in (("manager", "run every task on the hosts in hosts.txt"),
                       ("resume", "run only the tasks without a saved success")):
        p = command(mode, text)
        manager_options(p)
        common(p)
    p = command("local", "run the job on loopback workers on this machine (try this first)")
    p.add_argument("--workers", type=positive_int, default=3,
                   help="worker processes (default %(default)s)")
    p.add_argument("--slots", type=positive_int, help="slots per worker (default: cores / workers)")
    p.add_argument("--threads", action="store_true", help="workers run calc in threads")
    p.add_argument("--resume", action="store_true",
                   help="run only the tasks without a saved success")
    manager_options(p)
    common(p)
    command("test", "run calc on every task here, in this process, and print each outcome")
    p = command("status", "show the state of every host, and why one would not take this "
                          "project's work")
    p.add_argument("--hosts", dest="hosts_file", metavar="FILE", help="hosts file")
    key_file(p)
    p.add_argument("--timeout", type=positive_float, default=job.timeout,
                   help="seconds per host (default %(default)s)")
    p.add_argument("--cafile", help="use https, trusting this CA or certificate")
    p = command("push", "bring every host's code to this project's, without running anything")
    p.add_argument("--hosts", dest="hosts_file", metavar="FILE", help="hosts file")
    p.add_argument("--timeout", type=positive_float, default=job.timeout,
                   help="seconds per request (default %(default)s)")
    p.add_argument("--cafile", help="use https, trusting this CA or certificate")
    key_file(p)
    p.add_argument("--max-push", type=positive_int, default=MAX_PUSH,
                   help="largest push in bytes (default %(default)s)")
    p = command("results", "print the saved results of a run: the latest outcome of each task, in "
                           "task order")
    p.add_argument("--errors", action="store_true", help="include errors")
    p.add_argument("--summary", action="store_true", help="counts, failures grouped by exception, "
                   "and the runs")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true",
                       help="every outcome of every run, not only the latest")
    which.add_argument("--run", type=run_stamp, metavar="STAMP",
                       help="the outcomes of one run (the stamp in its files: 20240101-120000)")
    p.add_argument("--full", action="store_true", help="show long tasks and results in full")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--json", dest="format", action="store_const", const="json",
                       help="JSON list of records")
    group.add_argument("--csv", dest="format", action="store_const", const="csv", help="CSV table")
    common(p)
    p = command("init", "create the key file that workers and manager share")
    p.add_argument("--key-file", help="where (default: %s next to the script)" % KEY_FILE)
    return parser


def argument_type(convert, allowed, kind, bounds):
    """An argparse type: `convert` the text, then check it is `allowed`; its errors say `kind`
    (not convertible) or `bounds` (not allowed)."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not %s" % (text, kind))
        if not allowed(value):
            raise argparse.ArgumentTypeError("%s, not %s" % (bounds, text))
        return value
    return parse


def dashboard_address(text):
    """--dashboard: 'HOST:PORT', 'HOST' (a free port), ':PORT' or 'PORT' (loopback), '[IPv6]:N'."""
    if text.isdigit() or text.startswith(":"):
        text = DASHBOARD_BIND + ":" + text.lstrip(":")
    match = HOST_LINE.match(text)
    port = int(match.group("port") or 0) if match else -1
    if not 0 <= port < 65536:
        raise argparse.ArgumentTypeError("%r is not HOST:PORT (port 0-65535; 0 or none: a free one)"
                                         % text)
    return match.group("v6") or match.group("name"), port


run_stamp = argument_type(str, lambda v: re.match(STAMP + "$", v), "a stamp",
                          "must be a run's stamp such as 20240101-120000 (in its file names)")
positive_int = argument_type(int, lambda v: v >= 1, "a whole number", "must be 1 or more")
positive_float = argument_type(float, lambda v: v > 0, "a number", "must be more than 0")
port_number = argument_type(int, lambda v: 0 <= v < 65536, "a port number", "port must be 0-65535")


def dispatch(job, settings, argv):
    """Run the command that `settings` names; return its exit code."""
    folder = getattr(settings, "folder", None)
    if folder is not None and not os.path.isdir(folder):
        raise OdenError("folder %s does not exist: create it, or pass another --folder" % folder)
    if settings.command == "worker":
        setup_logging(settings.verbose)
        return run_worker(job, settings)
    if settings.command == "init":
        return run_init(settings.key_file)
    if settings.command == "test":
        return run_test(job)
    if settings.command == "results":
        return run_results(settings)
    setup_logging(getattr(settings, "verbose", 0), getattr(settings, "quiet", False))
    hosts = None
    if settings.command != "local":
        scheme = "https" if getattr(settings, "cafile", None) else "http"
        hosts = read_hosts(job.hosts, settings.hosts_file, scheme)
    if settings.command == "status":
        return run_status(job, settings, hosts)
    if settings.command == "push":
        return run_push(job, settings, hosts)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)
    with contextlib.ExitStack() as stack:
        if not settings.concurrent:
            stack.enter_context(RunLock(settings.folder, settings.name))
        if settings.command == "local":
            return run_local(job, settings, argv)
        return run_manager(job, settings, hosts, settings.command == "resume", argv)


def main(argv=None, **user_settings):
    """Run a command; return its exit code (see README.md "Exit codes").

    From a script of your own: sys.exit(oden.main(make_tasks=..., calc=..., name=...)).
    With argv=None main() reads the command line: it is the program, so a non-zero outcome
    ends the process with that code (SystemExit), also in a script that calls oden.main()
    without sys.exit.  With an explicit argv it only returns the code."""
    code = run_command(sys.argv[1:] if argv is None else list(argv), user_settings)
    if argv is None and code:
        raise SystemExit(code)
    return code


def checked_name(name):
    """A run's name is the start of its file names: OdenError unless it is one."""
    if (not isinstance(name, str) or not name or name.startswith(".") or len(name) > 100
            or any(c in name for c in "/\\\0") or not name.isprintable()):
        raise OdenError("the run's name %s cannot start file names: use letters, digits, '-', "
                        "'_' or '.', not starting with '.' (--name or the 'name' setting)"
                        % peer_text(repr(name), 60))
    return name


def run_command(argv, user_settings):
    """main() without the exit: parse `argv`, run it, turn OdenError and Ctrl-C
    into a message and an exit code."""
    try:
        job = Job(**user_settings)
        settings = build_parser(job).parse_args(argv)
        settings.name = checked_name(getattr(settings, "name", job.name))
        return dispatch(job, settings, argv)
    except OdenError as e:
        print("oden: error: %s" % e, file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        how = "terminated" if isinstance(e, Terminated) else "interrupted"
        print("oden: %s" % how, file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except BrokenPipeError:                  # output piped into `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
