"""Peak RSS and time per step of one audit: where the memory of a large audit goes.

    python -m bench.audit_steps --db /work/data/scale.duckdb [--fraction 0.2] [--code DIR] [--out PREFIX]

The audit runs in a fresh process on a read-only connection with the memory limit, as
bench/audit_scale.py runs it. A thread samples the process's RSS every 10 ms; each step (the
engine's progress steps, and the engine functions listed in _STEPS, wrapped where the code has
them) reports the RSS when it started and the peak while it ran, and its wall and CPU seconds
(the process's user + system time: steadier than wall time on a shared machine). `--code DIR` audits with
another checkout's `audit/` (a baseline, e.g. a `git worktree` of an older commit); `--out`
writes the findings as Parquet (PREFIX.findings.parquet) and the edges and sampling figures
as JSON (PREFIX.edges.json) to compare two runs' results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import importlib, json, sys, threading, time
import duckdb, psutil
from audit.engine import AuditWindow, run_audit

db, start, end, context, memory, out = sys.argv[1:7]
steps = json.loads(sys.argv[7])
proc = psutil.Process()
def cpu():
    c = proc.cpu_times()
    return c.user + c.system


log = []
current = {"name": "start", "t": time.perf_counter(), "cpu": cpu(), "rss": proc.memory_info().rss, "peak": 0}
lock = threading.Lock()


def mark(name):
    now, rss, used = time.perf_counter(), proc.memory_info().rss, cpu()
    with lock:
        current["peak"] = max(current["peak"], rss)
        log.append({"step": current["name"], "seconds": now - current["t"],
                    "cpu_seconds": used - current["cpu"], "rss_start_mib": current["rss"] / 2**20,
                    "peak_mib": current["peak"] / 2**20})
        current.update(name=name, t=now, cpu=used, rss=rss, peak=rss)


def sample():
    while True:
        rss = proc.memory_info().rss
        with lock:
            current["peak"] = max(current["peak"], rss)
        time.sleep(0.01)


def wrap(module, attr):
    mod = importlib.import_module(module)
    fn = getattr(mod, attr, None)
    if fn is None:
        return
    def inner(*a, **k):
        mark(attr)
        return fn(*a, **k)
    setattr(mod, attr, inner)


for module, attr in steps:
    wrap(module, attr)
threading.Thread(target=sample, daemon=True).start()
con = duckdb.connect(db, read_only=True, config={"memory_limit": memory})
t, cpu0 = time.perf_counter(), cpu()
result = run_audit(con, AuditWindow(int(start), int(end), int(context)), progress=mark)
mark("end")
seconds = time.perf_counter() - t
if out != "-":
    import pyarrow.parquet as pq
    pq.write_table(result.findings, out + ".findings.parquet")
    with open(out + ".edges.json", "w") as f:
        json.dump({"edges": [e.to_dict() for e in result.edges], "sampling": result.sampling}, f,
                  sort_keys=True)
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu() - cpu0, "spans": result.spans,
                  "findings": result.findings.num_rows, "peak_rss_mib": max(s["peak_mib"] for s in log),
                  "steps": log[1:]}))
"""

# engine functions that mark a step when called (module, attribute); those a checkout lacks are skipped
_STEPS = [
    ("audit.engine.run", "learn"),
    ("audit.engine.run", "learn_call_patterns"),
    ("audit.engine.run", "resolve_exits"),
    ("audit.engine.run", "learn_unseen_offsets"),
    ("audit.engine.run", "build_edges"),
    ("audit.engine.run", "sampling_figures"),
    ("audit.engine.findings", "build_candidates"),
    ("audit.engine.findings", "add_virtual_candidates"),
    ("audit.engine.findings", "stitch"),
    ("audit.engine.findings", "break_operations"),
    ("audit.engine.findings", "stitch_breaks"),
]


def run(db: str, fraction: float, memory: str, code: str | None, out: str | None, context_s: int) -> dict:
    import duckdb

    con = duckdb.connect(db, read_only=True)
    first, last = con.execute("SELECT min(start_ns), max(start_ns) FROM spans").fetchone()
    con.close()
    end = first + int((last + 1 - first) * fraction)
    env = dict(os.environ)
    root = os.path.abspath(code or os.path.join(os.path.dirname(__file__), ".."))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    args = [db, str(first), str(end), str(context_s * 10**9), memory, out or "-", json.dumps(_STEPS)]
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, env=env, cwd=root
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_audit_args(ap: argparse.ArgumentParser) -> None:
    """The options of one audit in a fresh process (shared with bench/audit_statements.py)."""
    ap.add_argument("--db", required=True)
    ap.add_argument(
        "--fraction", type=float, default=1.0, help="window from the first span, share of the store"
    )
    ap.add_argument("--memory-limit", default="2GB")
    ap.add_argument("--context", type=int, default=120, help="seconds (the CLI's default)")
    ap.add_argument("--code", help="a checkout whose audit/ to run (default: this one)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_audit_args(ap)
    ap.add_argument("--out", help="write PREFIX.findings.parquet and PREFIX.edges.json")
    args = ap.parse_args()
    r = run(args.db, args.fraction, args.memory_limit, args.code, args.out, args.context)
    load = os.getloadavg()
    print(
        f"{r['spans']:,} spans, {r['findings']:,} findings, {r['seconds']:.1f} s "
        f"({r.get('cpu_seconds', 0):.1f} s CPU), peak RSS {r['peak_rss_mib']:,.0f} MiB"
        f" (load average {load[0]:.1f})"
    )
    print(f"{'step':<58} {'s':>7} {'CPU s':>7} {'RSS at start':>13} {'peak MiB':>9}")
    for s in r["steps"]:
        print(
            f"{s['step'][:58]:<58} {s['seconds']:>7.1f} {s.get('cpu_seconds', 0):>7.1f}"
            f" {s['rss_start_mib']:>13,.0f} {s['peak_mib']:>9,.0f}"
        )


if __name__ == "__main__":
    main()
