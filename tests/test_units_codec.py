"""The in-process layer, the wire: Codec (signing, replays, stale and foreign requests,
nothing unpickled before its signature checks), encode/decode frames, and Tasks."""
import pickle
import sys
import time
import unittest
from unittest import mock

import support

sys.path.insert(0, support.ROOT)
import oden  # noqa: E402

KEY = b"k" * 32
UNPICKLED = []


def note_unpickled(what):
    UNPICKLED.append(what)
    return what


class Bomb:
    """Records being unpickled: proof that a body was (or was not) opened."""

    def __reduce__(self):
        return note_unpickled, ("bomb",)


class Pair:
    """A manager's codec and a worker's, and a worker boot id."""

    def __init__(self, manager_key=KEY, worker_key=KEY):
        self.manager, self.worker = oden.Codec(manager_key), oden.Codec(worker_key)
        self.boot = "b00t"

    def seal(self, message, path="/submit", boot="b00t"):
        body, headers, ticket = self.manager.seal_request(path, message, boot)
        return body, headers.get(oden.AUTH_HEADER), ticket

    def open(self, body, header, path="/submit"):
        body = body if isinstance(body, bytes) else b"".join(body)
        return self.worker.open_request(path, header, body, self.boot)


class CodecTest(unittest.TestCase):
    def setUp(self):
        UNPICKLED.clear()
        self.pair = Pair()

    def refused(self, status, text, body, header, path="/submit"):
        with self.assertRaises(oden.AuthError) as refused:
            self.pair.open(body, header, path)
        self.assertEqual(refused.exception.status, status)
        self.assertIn(text, str(refused.exception))

    def test_a_request_and_its_reply_round_trip(self):
        body, header, ticket = self.pair.seal({"run": "r", "batches": []})
        self.assertTrue(header.startswith("v2 %s 1 " % self.pair.manager.session))
        message, worker_ticket = self.pair.open(body, header)
        self.assertEqual(message, {"run": "r", "batches": []})
        reply, headers = self.pair.worker.seal_reply(worker_ticket, 200, {"done": [1]})
        opened = self.pair.manager.open_reply(ticket, 200, headers[oden.AUTH_HEADER], reply)
        self.assertEqual(opened, {"done": [1]})

    def test_a_replayed_or_older_request_is_refused(self):
        first = self.pair.seal({"n": 1})
        second = self.pair.seal({"n": 2})
        self.assertEqual(self.pair.open(*first[:2])[0], {"n": 1})
        self.refused(403, "replayed request", *first[:2])
        self.assertEqual(self.pair.open(*second[:2])[0], {"n": 2})
        third, fourth = self.pair.seal({"n": 3}), self.pair.seal({"n": 4})
        self.assertEqual(self.pair.open(*fourth[:2])[0], {"n": 4})
        self.refused(403, "replayed request", *third[:2])        # counters only go up

    def test_a_request_for_an_earlier_boot_is_refused_except_hello(self):
        body, header, _ = self.pair.seal({"n": 1}, boot="earlier")
        self.refused(409, "meant for an earlier run of this worker", body, header)
        body, header, _ = self.pair.seal({"hello": 1}, path="/hello", boot=None)
        self.assertEqual(self.pair.open(body, header, "/hello")[0], {"hello": 1})

    def test_a_request_signed_for_another_path_or_size_is_refused(self):
        body, header, _ = self.pair.seal({"n": 1}, path="/poll")
        self.refused(403, "bad signature: wrong key", body, header, path="/submit")
        body, header, _ = self.pair.seal({"n": 1})
        self.refused(403, "bad signature: wrong key", body + b".", header)

    def test_a_stale_request_is_refused_naming_the_clocks(self):
        for shift, side in ((-1000, "ahead of"), (1000, "behind")):
            with mock.patch.object(oden.time, "time", return_value=time.time() + shift):
                body, header, _ = self.pair.seal({"n": 1})
            with self.assertRaises(oden.AuthError) as refused:
                self.pair.open(body, header)
            self.assertEqual(refused.exception.status, 403)
            self.assertRegex(str(refused.exception), "^stale request: the worker's clock is "
                             "(999|1000|1001) s %s the manager's" % side)
        with mock.patch.object(oden.time, "time", return_value=time.time() - 200):
            body, header, _ = self.pair.seal({"n": 2})
        self.assertEqual(self.pair.open(body, header)[0], {"n": 2})     # within MAX_CLOCK_SKEW

    def test_the_wrong_key_is_refused_before_the_body_is_unpickled(self):
        self.pair = Pair(worker_key=b"x" * 32)
        body, header, _ = self.pair.seal({"n": Bomb()})
        self.refused(403, "bad signature: wrong key or altered message", body, header)
        self.assertEqual(UNPICKLED, [])
        self.assertEqual(oden.decode(body), {"n": "bomb"})       # the body would have fired
        self.assertEqual(UNPICKLED, ["bomb"])

    def test_a_tampered_body_is_never_unpickled(self):
        body, header, _ = self.pair.seal({"n": Bomb(), "text": "hello"})
        tampered = body.replace(b"hello", b"jello")
        self.assertEqual(len(tampered), len(body))
        self.refused(403, "the body is not the one signed", tampered, header)
        self.assertEqual(UNPICKLED, [])
        self.assertEqual(oden.decode(tampered)["text"], "jello")
        self.assertEqual(UNPICKLED, ["bomb"])

    def test_an_unsigned_or_old_request_is_refused_and_never_unpickled(self):
        body = oden.dumps(Bomb())
        for header, text in [(None, "missing or malformed X-Oden-Auth header"),
                             (oden.UNSIGNED, "missing or malformed X-Oden-Auth header"),
                             ("v2 a b c d e f", "missing or malformed X-Oden-Auth header"),
                             ("v1 s 1 2 - d m", "the manager runs an older oden.py")]:
            with self.subTest(header=header):
                self.refused(401, text, body, header)
        self.assertEqual(UNPICKLED, [])
        oden.decode(body)                                       # the body would have fired
        self.assertEqual(UNPICKLED, ["bomb"])

    def test_the_head_is_checked_before_the_body_is_read(self):
        body, header, _ = self.pair.seal({"n": Bomb()})
        ticket = self.pair.worker.check_head("/submit", header, len(body), "b00t")  # no body
        self.assertEqual(ticket[:2], (self.pair.manager.session, "1"))
        with self.assertRaises(oden.AuthError) as wrong:
            self.pair.worker.open_body(ticket, oden.dumps({"n": Bomb()}) + b"")
        self.assertEqual(wrong.exception.status, 403)
        self.assertEqual(UNPICKLED, [])
        with self.assertRaises(oden.AuthError):             # one head serves one body only
            self.pair.worker.check_head("/submit", header, len(body), "b00t")
        self.assertEqual(self.pair.worker.open_body(ticket, body), {"n": "bomb"})

    def test_a_reply_must_be_signed_for_its_own_request(self):
        first, second = self.pair.seal({"n": 1}), self.pair.seal({"n": 2})
        _, ticket_one = self.pair.open(*first[:2])
        reply, headers = self.pair.worker.seal_reply(ticket_one, 200, {"done": []})
        sign = headers[oden.AUTH_HEADER]
        manager = self.pair.manager
        self.assertEqual(manager.open_reply(first[2], 200, sign, reply), {"done": []})
        for ticket, status, header, text in [
                (second[2], 200, sign, "not signed with our key"),       # another request's
                (first[2], 500, sign, "not signed with our key"),        # another status
                (first[2], 200, oden.UNSIGNED, "answers without a key"),
                (first[2], 200, None, "answers without a key")]:
            with self.assertRaises(oden.AuthError) as refused:
                manager.open_reply(ticket, status, header, reply)
            self.assertIn(text, str(refused.exception))

    def test_without_a_key_messages_go_unsigned_but_need_the_header(self):
        codec = oden.Codec(None)
        body, headers, ticket = codec.seal_request("/poll", {"n": 1}, None)
        self.assertEqual((headers, ticket), ({oden.AUTH_HEADER: oden.UNSIGNED}, None))
        self.assertEqual(codec.open_request("/poll", oden.UNSIGNED, body, "x"), ({"n": 1}, None))
        with self.assertRaises(oden.AuthError) as refused:
            codec.check_head("/poll", None, len(body), "x")
        self.assertEqual(refused.exception.status, 401)
        self.assertEqual(codec.seal_reply(None, 200, 5),
                         (oden.encode(5), {oden.AUTH_HEADER: "none"}))

    def test_a_request_in_frames_is_signed_over_all_its_parts(self):
        big = b"t" * oden.OUT_OF_BAND
        message = {"batches": [(1, [(0, pickle.PickleBuffer(big))], None)]}
        for tamper in (True, False):
            body, headers, _ = self.pair.manager.seal_request("/submit", message, "b00t")
            self.assertIsInstance(body, list)
            self.assertEqual(headers["Content-Length"], str(sum(len(part) for part in body)))
            if tamper:
                body[2] = b"T" + bytes(body[2])[1:]              # the task's own frame
                self.refused(403, "the body is not the one signed", body, headers[oden.AUTH_HEADER])
        opened, _ = self.pair.open(body, headers[oden.AUTH_HEADER])
        [(batch, [(index, task)], limit)] = opened["batches"]
        self.assertEqual((batch, index, limit, bytes(task)), (1, 0, None, big))


class FramesTest(unittest.TestCase):
    def test_small_messages_stay_one_pickle_and_big_buffers_travel_as_frames(self):
        small = oden.encode({"a": 1})
        self.assertIsInstance(small, bytes)
        self.assertEqual(oden.body_size(small), len(small))
        buffers = [b"a" * 100000, b"b" * 70000]
        parts = oden.encode({"tasks": [pickle.PickleBuffer(b) for b in buffers]})
        self.assertEqual(len(parts), 4)
        self.assertEqual(parts[0].split(b"\n")[0], oden.FRAMES + b"%d 100000 70000" % len(parts[1]))
        self.assertEqual([bytes(p) for p in parts[2:]], buffers)
        self.assertEqual(oden.body_size(parts), sum(len(p) for p in parts))
        decoded = oden.decode(b"".join(parts))["tasks"]
        self.assertEqual([bytes(v) for v in decoded], buffers)
        self.assertTrue(all(isinstance(v, memoryview) and v.readonly for v in decoded))

    def test_frames_that_do_not_add_up_are_refused(self):
        parts = oden.encode({"t": pickle.PickleBuffer(b"z" * 1000)})
        body = b"".join(parts)
        for bad in (body[:-1], body + b"z", oden.FRAMES + b"x\n", oden.FRAMES + b"1 2"):
            with self.subTest(bad=bad[:30]):
                with self.assertRaises(ValueError):
                    oden.decode(bad)


class TasksTest(unittest.TestCase):
    def test_a_task_whose_pickle_reaches_out_of_band_is_kept_as_itself(self):
        edge = next(n for n in range(oden.OUT_OF_BAND - 64, oden.OUT_OF_BAND)
                    if len(oden.dumps(b"a" * n)) == oden.OUT_OF_BAND)
        under, at = b"u" * (edge - 1), b"a" * edge
        self.assertEqual(len(oden.dumps(at)), oden.OUT_OF_BAND)
        tasks = oden.Tasks([under, at, 7])
        self.assertEqual(len(tasks), 3)
        self.assertEqual(tasks.big, {1: oden.OUT_OF_BAND})
        self.assertEqual(tasks.wire(0), oden.dumps(under))
        self.assertIsInstance(tasks.wire(1), pickle.PickleBuffer)
        self.assertEqual(bytes(tasks.wire(1).raw()), oden.dumps(at))
        self.assertEqual([tasks.size(i) for i in range(3)],
                         [oden.OUT_OF_BAND - 1, oden.OUT_OF_BAND, len(oden.dumps(7))])
        self.assertEqual([tasks.task(i) for i in range(3)], [under, at, 7])
        self.assertIs(tasks.task(1), tasks.task(1))             # held once, not unpickled

    def test_pickle_tasks_names_the_first_task_that_cannot_travel(self):
        self.assertEqual(oden.pickle_task(3, (1, "a")), pickle.dumps((1, "a"), 4))
        with self.assertRaises(oden.OdenError) as error:
            oden.pickle_tasks([1, 2, {"f": lambda: 0}, lambda: 1])
        self.assertIn("task 2 cannot be pickled", str(error.exception))
        self.assertIn("not lambdas or open files", str(error.exception))


if __name__ == "__main__":
    unittest.main()
