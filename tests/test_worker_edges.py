"""The worker's error edges, in process: a malformed message is the sender's fault (400), an
exception in a route the worker's own (500, one line, its traceback in the worker's log); a
process slot closed before its child started ends its batch instead of failing on a None,
and an unexpected AttributeError is no longer taken for "connection closed"."""
import http.client
import sys
import threading
import unittest
import unittest.mock

import support

sys.path.insert(0, support.ROOT)
import oden  # noqa: E402

KEY = b"edge-test-key-" + b"x" * 32


def items(*indices):
    return [(index, oden.dumps(index)) for index in indices]


class MessageProblemTest(unittest.TestCase):
    """message_problem(): a table of messages and whether a route can serve them."""

    ROWS = [
        # path, message, served (True) or refused (a word of the reason)
        ("/hello", {}, True),
        ("/hello", {"manifest": "not a dict"}, True),
        ("/hello", ["anything"], True),
        ("/poll", {"run": "r"}, True),
        ("/poll", {"run": "r", "ack": [1, 2], "wait": 0.5, "give_back": 3}, True),
        ("/poll", {"run": "r", "bye": True}, True),
        ("/poll", {"run": "r", "extra": object()}, True),
        ("/submit", {"run": "r", "batches": []}, True),
        ("/submit", {"run": "r", "ack": (), "wait": 1,
                     "batches": [(1, items(0, 1), None), (2, items(2), 2.5)]}, True),
        ("/submit", {"run": "r", "batches": [(1, [(0, memoryview(b"x"))], 3)]}, True),
        ("/push", {"run": "r", "files": {"a.py": b"x = 1\n"}}, True),
        ("/push", {"run": "r"}, True),
        ("/poll", ["r"], "dict"),
        ("/poll", {}, "run"),
        ("/poll", {"run": 7}, "run"),
        ("/poll", {"run": "r", "ack": "12"}, "ack"),
        ("/poll", {"run": "r", "ack": [[1]]}, "ack"),
        ("/poll", {"run": "r", "wait": "5"}, "wait"),
        ("/poll", {"run": "r", "wait": True}, "wait"),
        ("/poll", {"run": "r", "give_back": None}, "give_back"),
        ("/submit", {"run": "r"}, "batches"),
        ("/submit", {"run": "r", "batches": "nonsense"}, "batches"),
        ("/submit", {"run": "r", "batches": [(1, items(0))]}, "batches"),
        ("/submit", {"run": "r", "batches": [([1], items(0), None)]}, "batches"),
        ("/submit", {"run": "r", "batches": [(1, [(0, "text")], None)]}, "batches"),
        ("/submit", {"run": "r", "batches": [(1, [("0", b"x")], None)]}, "batches"),
        ("/submit", {"run": "r", "batches": [(1, [(0, b"x", 1)], None)]}, "batches"),
        ("/submit", {"run": "r", "batches": [(1, items(0), "10")]}, "batches"),
        ("/push", {"files": ["a.py"]}, "files"),
        ("/push", {"files": {"a.py": "text"}}, "files"),
        ("/push", {"files": {1: b"x"}}, "files"),
    ]

    def test_rows(self):
        for path, message, expected in self.ROWS:
            with self.subTest(path=path, message=message):
                problem = oden.message_problem(path, message)
                if expected is True:
                    self.assertIsNone(problem)
                else:
                    self.assertIsInstance(problem, str)
                    self.assertIn(expected, problem)
                    self.assertNotIn("\n", problem)


class WorkerEdgesTest(unittest.TestCase):
    """A real WorkerServer on a loopback port in this process (no slots started: nothing
    here runs a task), fed signed requests."""

    def setUp(self):
        self.state = oden.WorkerState(lambda x: x, 1, True, "edges")
        keeper = oden.CodeKeeper(support.ROOT, "oden.py", "no pushes in this test", 1000)
        self.server = oden.WorkerServer(("127.0.0.1", 0), self.state, oden.Codec(KEY),
                                        lambda: "edges", oden.MAX_BODY, keeper=keeper)
        thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.codec = oden.Codec(KEY)

    def post(self, path, message):
        """(status, reply message or text) of one signed request on a fresh connection."""
        body, headers, ticket = self.codec.seal_request(path, message, self.state.boot)
        connection = http.client.HTTPConnection("127.0.0.1", self.server.server_address[1],
                                                timeout=10)
        try:
            connection.request("POST", path, body, headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        if response.status == 200:
            return 200, self.codec.open_reply(ticket, 200, response.getheader(oden.AUTH_HEADER),
                                              data)
        return response.status, data.decode()

    def test_a_well_formed_message_is_served(self):
        status, reply = self.post("/submit", {"run": "r", "ack": [], "wait": 0,
                                              "batches": [(1, items(0, 1), None)]})
        self.assertEqual(status, 200, reply)
        self.assertEqual(reply["accepted"], [1])

    def test_a_malformed_message_is_a_400_that_names_its_fault(self):
        with self.assertLogs("oden", "WARNING") as logs:
            status, text = self.post("/submit", {"run": "r", "batches": "nonsense"})
        self.assertEqual(status, 400)
        self.assertTrue(text.startswith("malformed message: "), text)
        self.assertIn("'batches'", text)
        self.assertEqual(text.count("\n"), 1)
        self.assertIn("bad /submit", "\n".join(logs.output))
        self.assertEqual(self.state.runs, {}, "a refused message changed the worker's state")

    def test_a_bug_in_the_worker_is_a_500_with_its_traceback_in_the_log(self):
        def broken(message):
            return message["no such key"]            # the worker's bug, not the sender's
        with unittest.mock.patch.object(self.state, "poll", broken), \
                self.assertLogs("oden", "ERROR") as logs:
            status, text = self.post("/poll", {"run": "r", "ack": []})
        self.assertEqual(status, 500)
        self.assertEqual(text, "the worker failed on /poll: KeyError: 'no such key' "
                               "(its log has the traceback)\n")
        log = "\n".join(logs.output)
        self.assertIn("Traceback", log)
        self.assertIn("broken", log)
        # The worker serves on after it.
        self.assertEqual(self.post("/poll", {"run": "r", "ack": []})[0], 200)


class ClosedSlotTest(unittest.TestCase):
    """A ProcessSlot stopped for good before its child ever started (shutdown while it
    booted): no child is started, and its batch ends at once with nothing reported."""

    def test_a_slot_closed_before_it_started_ends_its_batch(self):
        slot = oden.ProcessSlot(abs)
        slot.stop(final=True)
        slot.start()                                  # closed: starts nothing
        self.assertIsNone(slot.process)
        slot.ready()                                  # no child to wait for
        batch = oden.Batch(1, "r", items(0, 1), None)
        slot.send(batch)
        self.assertIsNone(slot.process)
        marked = []
        self.assertEqual(slot.collect(marked.append), (batch, []))

    def test_an_attribute_error_is_not_taken_for_a_closed_connection(self):
        slot = oden.ProcessSlot(abs)
        slot.conn = object()                          # as a typo would: no .poll
        with self.assertRaises(AttributeError):
            slot.ready()


if __name__ == "__main__":
    unittest.main()
