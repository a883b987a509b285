"""Read the log of tests/run.py -v (or of unittest -v: its last summary is in the same form);
print "passed failed" (a crashed run counts as one failure)."""
import re
import sys

text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
code = int(sys.argv[2])
ran = re.findall(r"^Ran (\d+) tests? in", text, re.M)
if not ran:
    print(0, 1)
    sys.exit()
total = int(ran[-1])
tail = text[text.rfind("Ran "):]
counts = {k: int(v) for k, v in re.findall(r"(failures|errors|skipped|unexpected successes)=(\d+)", tail)}
failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpected successes", 0)
if code != 0 and failed == 0:
    failed = 1
print(total - failed - counts.get("skipped", 0), failed)
