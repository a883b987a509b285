"""The in-process layer, what people type and read: hosts files, run names, command-line
errors, and text from other machines made safe to show."""
import contextlib
import io
import os
import shutil
import sys
import tempfile
import unittest

import support

sys.path.insert(0, support.ROOT)
import oden  # noqa: E402


class HostsTest(unittest.TestCase):
    def test_comments_ports_and_ipv6_in_brackets(self):
        text = ("# the lab\n\n  alpha  \nbeta:9000   # fast one\n[::1]:81\n[fe80::2]\n"
                "10.0.0.7:65535\nhost_1.lab-x\n")
        hosts = oden.parse_hosts(text, "hosts.txt")
        self.assertEqual([(h.number, h.address, h.port) for h in hosts],
                         [(1, "alpha", 8080), (2, "beta", 9000), (3, "::1", 81),
                          (4, "fe80::2", 8080), (5, "10.0.0.7", 65535),
                          (6, "host_1.lab-x", 8080)])
        self.assertEqual([h.label for h in hosts[2:4]], ["[::1]:81", "[fe80::2]:8080"])
        self.assertEqual(hosts[2].uri, "http://[::1]:81")
        self.assertEqual(oden.Host(1, "a", 5, "https").uri, "https://a:5")

    def test_a_bad_line_is_named_with_its_number(self):
        for line in ("a b", "host:0", "host:65536", "host:123456", "::1", "[::1", "[host]:80",
                     "host:", "http://host", "hóst"):
            with self.subTest(line=line):
                with self.assertRaises(oden.OdenError) as bad:
                    oden.parse_hosts("# first\ngood\n%s  # note\n" % line, "lab.txt")
                self.assertEqual(str(bad.exception),
                                 "lab.txt line 3: %r is not 'host', 'host:port' or '[ipv6]:port' "
                                 "(port 1-65535)" % (line + "  # note"))

    def test_a_host_with_its_default_port_spelled_out_is_the_same_host(self):
        with self.assertLogs("oden", "WARNING") as logs:
            hosts = oden.parse_hosts("a\nb\nA:8080\n[::1]\n[::1]:8080", "f")
        self.assertEqual([h.label for h in hosts], ["a:8080", "b:8080", "[::1]:8080"])
        self.assertEqual([h.number for h in hosts], [1, 2, 3])
        self.assertEqual(logs.output, [
            "WARNING:oden:f line 3: A:8080 is listed already on line 1: using it once",
            "WARNING:oden:f line 5: [::1]:8080 is listed already on line 4: using it once"])

    def test_read_hosts_from_the_setting_or_a_file(self):
        folder = tempfile.mkdtemp(prefix="oden-unit-")
        self.addCleanup(shutil.rmtree, folder, True)
        self.assertEqual([h.label for h in oden.read_hosts(["a", "b:1"], None)], ["a:8080", "b:1"])
        self.assertEqual([h.label for h in oden.read_hosts("c\n", None)], ["c:8080"])
        with self.assertRaises(oden.OdenError) as bad:
            oden.read_hosts(["a", "b c"], None)
        self.assertIn("the 'hosts' setting line 2", str(bad.exception))
        path = os.path.join(folder, "hosts.txt")
        with open(path, "w") as f:
            f.write("d:2\n")
        self.assertEqual([h.label for h in oden.read_hosts(["a"], path)], ["d:2"])  # file wins
        for content, text in [(b"# nobody\n\n", "no hosts in %s" % path),
                              (b"\xff\xfe\x00", "hosts file %s is not text" % path)]:
            with open(path, "wb") as f:
                f.write(content)
            with self.assertRaises(oden.OdenError) as bad:
                oden.read_hosts(None, path)
            self.assertIn(text, str(bad.exception))
        missing = os.path.join(folder, "none.txt")
        with self.assertRaises(oden.OdenError) as bad:
            oden.read_hosts(None, missing)
        self.assertIn("cannot read hosts file %s (No such file or directory)" % missing,
                      str(bad.exception))


class PeerTextTest(unittest.TestCase):
    def test_one_safe_line(self):
        for given, shown in [("plain", "plain"),
                             ("  two\nlines\r\n", "two\\nlines"),
                             ("\x1b[2Jwiped", "\\x1b[2Jwiped"),
                             ("rtl \u202e txt", "rtl \\u202e txt"),
                             (b"bytes \xff\xfe ok", "bytes \\xff\\xfe ok"),
                             (bytearray(b"caf\xc3\xa9"), "caf\u00e9"),
                             (404, "404")]:
            with self.subTest(given=given):
                self.assertEqual(oden.peer_text(given), shown)

    def test_cut_to_the_limit_escapes_counted(self):
        self.assertEqual(oden.peer_text("x" * 10, 10), "x" * 10)
        self.assertEqual(oden.peer_text("x" * 11, 10), "x" * 10 + "...")
        self.assertEqual(oden.peer_text("abcdefgh\x1b", 10), "abcdefgh...")   # \x1b: 4 more
        self.assertEqual(oden.peer_text("abcdef\x1b", 10), "abcdef\\x1b")
        self.assertEqual(oden.peer_text("\n" * 100, 6), "")                    # stripped
        self.assertEqual(oden.peer_text("a" + "\x00" * 1000, 9), "a\\x00\\x00...")
        self.assertLess(len(oden.peer_text(b"\xff" * 10 ** 6)), 210)

    def test_printable_keeps_lines_and_tabs(self):
        self.assertEqual(oden.printable("a\tb\nc\rd\x08"), "a\tb\nc\\rd\\x08")
        text = "ordinary traceback\n\tline 2 \u00e9\u4e2d"
        self.assertEqual(oden.printable(text), text)

    def test_one_line_of_an_exception(self):
        class Mute(Exception):
            def __str__(self):
                raise RuntimeError("no")
        self.assertEqual(oden.one_line(ValueError("bad\nsecond line")), "ValueError: bad")
        self.assertEqual(oden.one_line(KeyError()), "KeyError")
        self.assertEqual(oden.one_line(OSError("  \n  ")), "OSError")
        self.assertEqual(oden.one_line(Mute()), "Mute: <str() failed: RuntimeError>")


class NameTest(unittest.TestCase):
    def test_names_that_can_start_file_names(self):
        for good in ("sim", "exp-7_b.v2", "x" * 100, "café"):
            self.assertEqual(oden.checked_name(good), good)
        for bad in ("", ".hidden", "a/b", "a\\b", "a\0b", "x" * 101, "tab\there", None, 7):
            with self.subTest(name=bad):
                with self.assertRaises(oden.OdenError) as refused:
                    oden.checked_name(bad)
                self.assertIn("cannot start file names", str(refused.exception))
        with self.assertRaises(oden.OdenError) as refused:
            oden.checked_name("\x1b[31m")
        self.assertIn("the run's name '\\x1b[31m' cannot", str(refused.exception))
        self.assertNotIn("\x1b", str(refused.exception))                # escaped, not a colour


class ParserTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.parser = oden.build_parser(oden.Job())

    def error(self, argv):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), self.assertRaises(SystemExit) as exit:
            self.parser.parse_args(argv)
        self.assertEqual(exit.exception.code, 2)
        lines = stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("oden: error: "), lines[0])
        return lines[0]

    def test_bad_values_are_one_line_naming_the_rule(self):
        for argv, text in [
                (["manager", "--chunksize", "0"], "must be 1 or more, not 0"),
                (["manager", "--chunksize", "two"], "'two' is not a whole number"),
                (["local", "--timeout", "-1"], "must be more than 0, not -1"),
                (["worker", "--port", "70000"], "port must be 0-65535, not 70000"),
                (["results", "--run", "yesterday"], "must be a run's stamp such as"),
                (["results", "--all", "--run", "20240101-120000"], "not allowed with argument"),
                (["manager", "--dashboard", "host:99999"], "is not HOST:PORT"),
                (["nothing"], "invalid choice: 'nothing'"),
                ([], "the following arguments are required: COMMAND")]:
            with self.subTest(argv=argv):
                line = self.error(argv)
                self.assertIn(text, line)
                self.assertTrue(line.endswith("--help')"), line)

    def test_good_values_are_parsed(self):
        settings = self.parser.parse_args(["local", "--workers", "2", "--timeout", "1.5",
                                           "--dashboard", "9000", "--name", "exp"])
        self.assertEqual((settings.workers, settings.timeout, settings.dashboard, settings.name),
                         (2, 1.5, ("127.0.0.1", 9000), "exp"))
        self.assertEqual(self.parser.parse_args(["manager", "--no-dashboard"]).dashboard, None)
        for text, address in [("[::1]:7", ("::1", 7)), ("lab", ("lab", 0)),
                              (":81", ("127.0.0.1", 81)), ("0.0.0.0:0", ("0.0.0.0", 0))]:
            self.assertEqual(oden.dashboard_address(text), address)


if __name__ == "__main__":
    unittest.main()
