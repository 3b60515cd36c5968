"""Audit a store whose one broken hop carries no request key, at high concurrency: memory, time
and stitching accuracy on that hop.

    python -m bench.audit_keyless [--db /work/data/keyless-5m.duckdb] [--spans 5000000]
                                  [--rate 2500] [--memory-limit 2GB] [--runs 3]
                                  [--code DIR]  # audit with another checkout's engine (a baseline)

The store is the `keyless-rpc` scenario (front -> ledger over a custom RPC with no request key,
30% of calls lose context, ledger takes ~400 ms on average), extended in time to `--spans`
exported spans at `--rate` requests/s: about `rate * 0.42` calls in flight on the hop (1,000 at
the default). It is built once, by one process per core, and reused; the truth of every orphan
(its real parent) is kept beside it in `<db>.truth.parquet`. Each audit runs in a fresh
process with the given DuckDB memory limit (the CLI's default is 2GB), so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

import duckdb

_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[4]) if sys.argv[4] else None
import duckdb
from audit.engine import AuditWindow, run_audit, stitch
db, truth, memory = sys.argv[1], sys.argv[2], sys.argv[3]
for name, value in json.loads(sys.argv[5]).items():  # e.g. {"CANDIDATES_PER_ORPHAN": 64}
    setattr(stitch, name, value)
con = duckdb.connect(db, read_only=True, config={"memory_limit": memory})
lo, hi = con.execute("SELECT min(start_ns), max(start_ns) + 1 FROM spans").fetchone()
t = time.perf_counter()
out = {}
try:
    result = run_audit(con, AuditWindow(lo, hi))
    out["ok"] = True
except duckdb.OutOfMemoryException as e:
    out["ok"], out["error"] = False, str(e).splitlines()[0][:200]
out["seconds"] = time.perf_counter() - t
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if out["ok"]:
    con.register("found", result.findings)
    out["spans"] = result.spans
    out.update(dict(zip(("orphans", "named", "correct"), con.execute(
        "SELECT count(*), count(f.parent_span_id), count(*) FILTER (WHERE f.parent_span_id = t.parent)"
        " FROM read_parquet(?) t LEFT JOIN found f ON f.kind = 'orphan_root' AND f.span_id = t.span_id",
        [truth]).fetchone())))
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE temporary").fetchall()}
    if "cand_counts" in tables:
        out["max_candidates"], out["degraded"] = con.execute(
            "SELECT max(candidates), count(*) FILTER (WHERE degraded) FROM cand_counts").fetchone()
print(json.dumps(out))
"""


def _generate(args: tuple) -> str:
    part, parts, spans, rate, path = args
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audit.cli import DbSink
    from audit.scenarios.model import load_scenario
    from audit.scenarios.simulate import Simulator

    base = load_scenario("keyless-rpc")
    seconds = spans / parts / (3 * rate)  # three exported spans per request
    entry = base.entrypoints[0].model_copy(update={"rate_per_s": rate})
    scenario = base.model_copy(
        update={
            "start_unix_s": base.start_unix_s + part * seconds,
            "duration_s": seconds,
            "entrypoints": [entry],
        }
    )
    sink = DbSink(path)
    span_id, parent = [], []
    for request, records in Simulator(scenario, seed=200 + part).run():
        sink.send(request.SerializeToString())
        for r in records:
            if r.cause and r.exported:
                span_id.append(int(r.span_id, 16))
                parent.append(int(r.true_parent_span_id, 16))
    sink.close()
    table = pa.table({"span_id": pa.array(span_id, pa.uint64()), "parent": pa.array(parent, pa.uint64())})
    pq.write_table(table, f"{path}.truth.parquet")
    return path


def build(db: str, spans: int, rate: float) -> None:
    os.makedirs(os.path.dirname(db) or ".", exist_ok=True)
    parts = os.cpu_count() or 2
    paths = [f"{db}.part{i}" for i in range(parts)]
    t = time.perf_counter()
    print(f"building {db}: {spans:,} spans at {rate:g} requests/s in {parts} processes", file=sys.stderr)
    with multiprocessing.get_context("spawn").Pool(parts) as pool:
        pool.map(_generate, [(i, parts, spans, rate, p) for i, p in enumerate(paths)])
    from audit.store.writer import SpanStore

    SpanStore(db).close()  # the schema
    con = duckdb.connect(db)
    con.execute("SET enable_progress_bar = false")
    for i, p in enumerate(paths):
        con.execute(f"ATTACH '{p}' AS part{i} (READ_ONLY)")
        con.execute(f"INSERT INTO spans SELECT * FROM part{i}.spans ORDER BY start_ns")
        con.execute(f"INSERT INTO span_links SELECT * FROM part{i}.span_links")
        for table in ("span_resources", "span_scopes"):  # each part stored its processes' once
            con.execute(f"INSERT OR IGNORE INTO {table} SELECT * FROM part{i}.{table}")
        con.execute(f"DETACH part{i}")
        os.remove(p)
    truths = ", ".join(f"'{p}.truth.parquet'" for p in paths)
    con.execute(f"COPY (SELECT * FROM read_parquet([{truths}])) TO '{db}.truth.parquet'")
    for p in paths:
        os.remove(f"{p}.truth.parquet")
    con.execute("CHECKPOINT")
    con.close()
    print(f"built in {time.perf_counter() - t:.0f} s", file=sys.stderr)


def audit_once(db: str, memory: str, code: str = "", overrides: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, db, f"{db}.truth.parquet", memory, code, json.dumps(overrides or {})],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        return {"ok": False, "error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default="/work/data/keyless-5m.duckdb")
    ap.add_argument("--spans", type=int, default=5_000_000)
    ap.add_argument("--rate", type=float, default=2500.0, help="requests/s (calls in flight ~ rate x 0.42)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory-limit", default="2GB")
    ap.add_argument("--code", default="", help="a directory holding another version of `audit/` to run")
    ap.add_argument(
        "--set", default="{}", help='JSON: audit.engine.stitch settings, e.g. {"_WINDOW_ROWS": 1e9}'
    )
    args = ap.parse_args()
    if not os.path.exists(args.db):
        build(args.db, args.spans, args.rate)
    runs = [audit_once(args.db, args.memory_limit, args.code, json.loads(args.set)) for _ in range(args.runs)]
    for r in runs:
        print(json.dumps(r))
    done = [r for r in runs if r.get("ok")]
    if done:
        r = done[0]
        print(
            f"median {statistics.median(x['seconds'] for x in done):.1f} s, "
            f"peak RSS {max(x['peak_rss_mib'] for x in done):,.0f} MiB, {r['spans']:,} spans; "
            f"orphans {r['orphans']:,}: named {r['named']:,}, right {r['correct']:,} "
            f"(precision {r['correct'] / max(r['named'], 1):.4f}, "
            f"recall {r['correct'] / max(r['orphans'], 1):.4f}), "
            f"degraded {r.get('degraded')}"
        )


if __name__ == "__main__":
    main()
