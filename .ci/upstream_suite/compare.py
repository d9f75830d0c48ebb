"""Per-test comparison of results_A.txt and results_B.txt (pytest -rfEs logs produced by run_A.sh / run_B.sh).

A test's status: FAILED/ERROR if the short summary lists it (FAILED, ERROR or SUBFAILED[...]), else its verbose line
status (PASSED/SKIPPED). Test ids are normalised (instructblip_ours -> instructblip)."""

import re
import sys
from collections import Counter

LINE = re.compile(r"^[.sFEx]*\S*?(tests/\S+::\S+) \[(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\]")
SUMMARY = re.compile(r"^(FAILED|ERROR|SUBFAILED\[[^\]]*\]) (tests/\S+::\S+)")


def norm(test_id):
    return test_id.replace("instructblip_ours/", "instructblip/")


def parse(path):
    status = {}
    sub = {}
    for line in open(path, encoding="utf-8", errors="replace"):
        m = LINE.match(line)
        if m:
            status.setdefault(norm(m.group(1)), m.group(2))
        m = SUMMARY.match(line)
        if m:
            tid = norm(m.group(2))
            kind = "ERROR" if m.group(1) == "ERROR" else "FAILED"
            status[tid] = kind
            if m.group(1).startswith("SUBFAILED"):
                sub.setdefault(tid, []).append(m.group(1))
    return status, sub


a, sub_a = parse(sys.argv[1] if len(sys.argv) > 1 else "results_A.txt")
b, sub_b = parse(sys.argv[2] if len(sys.argv) > 2 else "results_B.txt")
print("A per-test:", dict(Counter(a.values())), " B per-test:", dict(Counter(b.values())))
print("\nPASSED in A, not PASSED in B:")
for t in sorted(a):
    if a[t] == "PASSED" and b.get(t) != "PASSED":
        print(f"  {b.get(t, 'MISSING'):8} {t} {sub_b.get(t, '')}")
print("\nNot PASSED in A, PASSED in B:")
for t in sorted(b):
    if b[t] == "PASSED" and a.get(t) != "PASSED":
        print(f"  {a.get(t, 'MISSING'):8} {t}")
print("\nFAILED/ERROR in both:")
for t in sorted(a):
    if a[t] in ("FAILED", "ERROR") and b.get(t) in ("FAILED", "ERROR"):
        print(f"  {t} A:{sub_a.get(t, '')} B:{sub_b.get(t, '')}")
print("\nSKIPPED in A but status differs in B:")
for t in sorted(a):
    if a[t] == "SKIPPED" and b.get(t) != "SKIPPED":
        print(f"  {b.get(t, 'MISSING'):8} {t}")
