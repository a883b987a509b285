"""The in-process layer, the manager's ledger: TaskBoard (the queue, copies, attempts,
deaths, the end of a run) and Fleet (which hosts are up or refuse)."""
import sys
import time
import unittest

import support

sys.path.insert(0, support.ROOT)
import oden  # noqa: E402


def board_of(count, max_attempts=5, max_deaths=3):
    return oden.TaskBoard(range(count), max_attempts, max_deaths)


class TakeTest(unittest.TestCase):
    def test_take_hands_out_the_queue_in_order_and_counts_copies(self):
        board = board_of(5)
        self.assertEqual(board.take(2), [0, 1])
        self.assertEqual(board.take(2), [2, 3])
        self.assertEqual(board.take(9), [4])
        self.assertEqual(board.take(1), [])
        self.assertEqual(dict(board.copies), {0: 1, 1: 1, 2: 1, 3: 1, 4: 1})
        self.assertEqual(sorted(board.sent_at), [0, 1, 2, 3, 4])

    def test_take_skips_finished_tasks_and_gives_nothing_once_stopping(self):
        board = board_of(5)
        board.finish([1])
        self.assertEqual(board.take(2), [0, 2])
        self.assertEqual(board.copies[1], 0)
        board.stop()
        self.assertEqual(board.take(5), [])
        self.assertEqual(list(board.pending), [3, 4])

    def test_the_run_is_finished_once_every_task_is(self):
        board = board_of(2)
        board.take(2)
        board.finish([0])
        board.finish([0])                            # a duplicate changes nothing
        self.assertFalse(board.finished)
        self.assertEqual(board.counts(), (1, 1, 1))
        board.finish([1])
        self.assertTrue(board.finished)


class GiveBackTest(unittest.TestCase):
    def test_a_lost_task_goes_first_in_the_queue_until_its_attempts_run_out(self):
        board = board_of(6, max_attempts=2)
        board.take(4)
        self.assertEqual(board.give_back([2, 0], "connection reset"), [])
        self.assertEqual(list(board.pending), [2, 0, 4, 5])     # first, in the order given
        self.assertEqual((board.attempts[0], board.deaths[0]), (1, 0))
        self.assertEqual(board.take(1), [2])
        self.assertEqual(board.give_back([2], "timed out"),
                         [(2, "gave up after 2 attempts: timed out")])
        self.assertEqual(list(board.pending), [0, 4, 5])        # a failed task is not queued

    def test_deaths_fail_a_task_before_its_attempts_do(self):
        board = board_of(2, max_attempts=9, max_deaths=2)
        board.take(2)
        self.assertEqual(board.give_back([0, 1], "gone", died=True), [])
        self.assertEqual(dict(board.deaths), {0: 1, 1: 1})
        board.take(2)
        self.assertEqual(board.give_back([0], "gone", died=True),
                         [(0, "worker died 2 times while running this task")])
        self.assertEqual(board.give_back([1], "gone"), [])       # not a death: an attempt
        self.assertEqual((board.attempts[1], board.deaths[1]), (2, 1))
        board = board_of(1, max_attempts=1, max_deaths=1)
        board.take(1)
        self.assertEqual(board.give_back([0], "gone", died=True),
                         [(0, "worker died 1 times while running this task")])

    def test_a_task_finished_or_running_elsewhere_is_not_queued_again(self):
        board = board_of(3)
        board.take(3)
        board.finish([0])
        board.sent_at[1] -= 10
        self.assertEqual(board.take_straggler(5), 1)             # a second copy of 1
        self.assertEqual(board.give_back([0, 1], "lost"), [])
        self.assertEqual(list(board.pending), [])                # 0 is done, 1 runs elsewhere
        self.assertEqual(board.attempts[0], 0)                   # a finished task: no attempt
        self.assertEqual(board.attempts[1], 1)
        self.assertEqual(board.copies[1], 1)

    def test_put_back_requeues_only_tasks_no_host_holds(self):
        board = board_of(3)
        board.take(3)
        board.sent_at[2] -= 10
        self.assertEqual(board.take_straggler(5), 2)
        board.put_back([1, 2])
        self.assertEqual(list(board.pending), [1])               # 2's first copy still runs
        self.assertEqual(sum(board.attempts.values()), 0)
        self.assertEqual(board.copies[2], 1)

    def test_count_deaths_spares_finished_tasks_and_judges_the_rest_when_free(self):
        board = board_of(3, max_deaths=1)
        board.take(3)
        board.give_back([0, 1, 2], "line broke")                  # attempts; now known dead:
        board.finish([2])
        self.assertEqual(board.take(1), [0])                      # 0 runs elsewhere
        self.assertEqual(board.count_deaths([0, 1, 2]),
                         [(1, "worker died 1 times while running this task")])
        self.assertEqual(dict(board.deaths), {0: 1, 1: 1})

    def test_release_and_counts(self):
        board = board_of(4)
        self.assertEqual(board.counts(), (0, 0, 4))
        board.take(3)
        self.assertEqual(board.counts(), (0, 3, 4))
        board.finish([0])
        board.release([0, 1])
        self.assertEqual(board.counts(), (1, 1, 3))              # 1 answered without a result
        self.assertEqual((board.copies[0], board.copies[1], board.copies[2]), (0, 0, 1))
        self.assertEqual(sorted(board.ages([0, 1, 2, 3])), [1, 2])   # unfinished and sent


class StragglerTest(unittest.TestCase):
    def setUp(self):
        self.board = board_of(3)

    def age(self, index, seconds):
        self.board.sent_at[index] = time.monotonic() - seconds

    def test_only_at_the_end_of_the_queue(self):
        self.board.take(2)
        self.age(0, 10)
        self.assertIsNone(self.board.take_straggler(1))           # 2 still in the queue
        self.board.take(1)
        self.assertEqual(self.board.take_straggler(1), 0)

    def test_the_oldest_running_task_over_the_age_and_never_twice(self):
        self.board.take(3)
        self.age(0, 3)
        self.age(1, 9)
        self.age(2, 0.5)
        self.assertEqual(self.board.take_straggler(1), 1)
        self.assertEqual(self.board.copies[1], 2)
        self.assertEqual(self.board.take_straggler(1), 0)
        self.assertIsNone(self.board.take_straggler(1))           # 2 is too young, 0, 1 copied
        self.board.finish([2])
        self.assertIsNone(self.board.take_straggler(0))

    def test_tasks_waiting_in_a_workers_queue_block_it_and_a_stop_too(self):
        self.board.take(3)
        self.age(0, 10)
        self.board.note_waiting(4, [2])
        self.assertIsNone(self.board.take_straggler(1))
        self.board.note_waiting(4, [])
        self.board.stop()
        self.assertIsNone(self.board.take_straggler(1))
        self.assertEqual(self.board.copies[0], 1)

    def test_hungry_counts_idle_slots_while_inside_even_on_an_error(self):
        board = self.board
        with board.hungry(3):
            with board.hungry(2):
                self.assertEqual(board.hunger, 5)
            self.assertEqual(board.hunger, 3)
        with self.assertRaises(KeyError):
            with board.hungry(4):
                raise KeyError
        self.assertEqual(board.hunger, 0)


class WakeTest(unittest.TestCase):
    """A thread waiting on the board wakes on news: a stop, tasks back, the run's end."""

    def waiting_board(self, wait):
        board = board_of(2)
        board.changed = support.NotingCondition()
        board.take(2)
        thread, _ = support.in_thread(wait, board)
        self.assertTrue(board.changed.waiting.wait(5))
        return board, thread

    def assertWakes(self, thread):
        started = time.monotonic()
        thread.join(5)
        self.assertFalse(thread.is_alive())
        self.assertLess(time.monotonic() - started, 1)

    def test_stop_wakes_a_waiter_and_a_sleeper(self):
        for wait in (lambda board: board.wait(30), lambda board: board.sleep(30)):
            board, thread = self.waiting_board(wait)
            board.stop()
            self.assertWakes(thread)

    def test_tasks_given_back_wake_a_waiter(self):
        board, thread = self.waiting_board(lambda board: board.wait(30))
        board.give_back([1], "lost")
        self.assertWakes(thread)

    def test_only_the_last_finish_wakes_a_sleeper(self):
        board, thread = self.waiting_board(lambda board: board.sleep(30))
        board.finish([0])
        self.assertTrue(thread.is_alive())
        board.finish([1])
        self.assertWakes(thread)

    def test_waits_return_at_once_once_stopped_or_finished(self):
        board = board_of(1)
        board.stop()
        started = time.monotonic()
        board.wait(30)
        board.sleep(30)
        board = board_of(0)
        board.wait(30)
        board.sleep(30)
        self.assertLess(time.monotonic() - started, 1)


class FleetTest(unittest.TestCase):
    def setUp(self):
        self.hosts = oden.parse_hosts("a\nb:81", "test")
        self.fleet = oden.Fleet(self.hosts)

    def test_down_for_counts_from_the_last_host_going_down(self):
        a, b = self.hosts
        self.assertGreater(self.fleet.down_for(), 0)              # none up yet since the start
        self.fleet.mark(a, True)
        self.fleet.mark(b, True)
        self.assertEqual(self.fleet.down_for(), 0)
        self.fleet.mark(a, False)
        self.assertEqual(self.fleet.down_for(), 0)                # b is still up
        self.fleet.mark(b, False)
        since = self.fleet.all_down_since
        self.assertIsNotNone(since)
        self.fleet.mark(a, False)                                 # down again: the clock runs on
        self.assertEqual(self.fleet.all_down_since, since)
        self.assertGreaterEqual(self.fleet.down_for(), 0)
        self.assertLess(self.fleet.down_for(), 5)

    def test_a_host_back_up_no_longer_refuses_and_snapshot_is_a_copy(self):
        a, b = self.hosts
        self.fleet.refuse(a, "wrong key")
        self.fleet.mark(b, True)
        up, refused = self.fleet.snapshot()
        self.assertEqual((up, refused), ({2}, {1: "wrong key"}))
        up.add(1)
        refused.clear()
        self.assertEqual(self.fleet.snapshot(), ({2}, {1: "wrong key"}))
        self.fleet.refuse(b, "older oden.py")
        self.assertEqual(self.fleet.every_host_refuses(),
                         {"wrong key": ["a:8080"], "older oden.py": ["b:81"]})
        self.assertEqual(self.fleet.snapshot(), (set(), {1: "wrong key", 2: "older oden.py"}))
        self.fleet.mark(a, True)
        self.assertEqual(self.fleet.snapshot(), ({1}, {2: "older oden.py"}))
        self.assertIsNone(self.fleet.every_host_refuses())


if __name__ == "__main__":
    unittest.main()
