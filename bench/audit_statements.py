"""CPU and wall seconds per SQL statement of one audit: which statements the time goes to.

    python -m bench.audit_statements --db /work/data/scale.duckdb [--fraction 0.2] [--code DIR] [--top 40]

The audit runs in a fresh process as bench/audit_steps.py runs it (read-only, `--memory-limit`),
on a connection wrapped so that every `execute` and `sql` call is timed: wall seconds and the
process's CPU seconds (user + system, steadier than wall time on a shared machine), summed per
statement text and the engine line that ran it. A relation from `sql` is timed where it is
built, not where it is fetched (the findings fetch and the stitcher's pair stream show as
near zero); the Python between statements is not counted. `--code DIR` audits with another
checkout's `audit/`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.audit_steps import add_audit_args

_CHILD = r"""
import json, os, sys, time, traceback
import duckdb, psutil
from audit.engine import AuditWindow, run_audit

db, fraction, memory, context = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
proc = psutil.Process()


def cpu():
    c = proc.cpu_times()
    return c.user + c.system


totals = {}


class Timed:
    def __init__(self, con):
        self._con = con

    def __getattr__(self, name):
        return getattr(self._con, name)

    def _run(self, method, query, *args, **kwargs):
        t, c = time.perf_counter(), cpu()
        out = getattr(self._con, method)(query, *args, **kwargs)
        frame = traceback.extract_stack(limit=3)[0]
        key = (f"{os.path.basename(frame.filename)}:{frame.lineno}", " ".join(str(query).split())[:90])
        row = totals.setdefault(key, [0.0, 0.0, 0])
        row[0] += time.perf_counter() - t
        row[1] += cpu() - c
        row[2] += 1
        return out

    def execute(self, query, *args, **kwargs):
        return self._run("execute", query, *args, **kwargs)

    def sql(self, query, *args, **kwargs):
        return self._run("sql", query, *args, **kwargs)


con = duckdb.connect(db, read_only=True, config={"memory_limit": memory})
first, last = con.execute("SELECT min(start_ns), max(start_ns) FROM spans").fetchone()
end = first + int((last + 1 - first) * fraction)
t, c = time.perf_counter(), cpu()
result = run_audit(Timed(con), AuditWindow(first, end, context))
print(json.dumps({"seconds": time.perf_counter() - t, "cpu_seconds": cpu() - c,
                  "findings": result.findings.num_rows,
                  "statements": [[*k, *v] for k, v in totals.items()]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_audit_args(ap)
    ap.add_argument("--top", type=int, default=40, help="statements listed, by CPU seconds")
    args = ap.parse_args()
    root = os.path.abspath(args.code or os.path.join(os.path.dirname(__file__), ".."))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [args.db, str(args.fraction), args.memory_limit, str(args.context * 10**9)]
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, env=env, cwd=root
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-4000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    timed_cpu = sum(s[3] for s in r["statements"])
    print(
        f"{r['findings']:,} findings, {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s CPU, of which"
        f" {timed_cpu:.1f} s in statements; load average {os.getloadavg()[0]:.1f})"
    )
    print(f"{'wall s':>7} {'CPU s':>7} {'calls':>5}  {'where':<24} statement")
    for where, text, wall, used, calls in sorted(r["statements"], key=lambda s: -s[3])[: args.top]:
        print(f"{wall:>7.2f} {used:>7.2f} {calls:>5}  {where:<24} {text}")


if __name__ == "__main__":
    main()
