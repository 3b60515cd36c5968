"""The same store audited single-process and on Spark (local mode, 1 and 2 cores): time, peak
memory, and the ratio to the single-process audit measured in the same run (docs/scale.md).

    python -m bench.spark_scale [--db /work/data/scale.duckdb] [--spans 10000000] [--runs 3]
                                [--slices 4] [--cores 1,2]

The store is bench/audit_scale.py's (built once if missing). `--spans` below the store's size
audits its first that many spans (copied once into a store of their own). The Parquet export
is timed too. Each audit runs in a fresh process; peak memory is the largest sum of resident
memory over the process and its children (Spark's JVM and Python workers), sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import duckdb
import psutil

from bench.audit_scale import build


def _subset(db: str, spans: int) -> str:
    con = duckdb.connect(db, read_only=True)
    total = con.execute("SELECT count(*) FROM spans").fetchone()[0]
    if spans >= total:
        return db
    path = f"{db}.first{spans}.duckdb"
    if os.path.exists(path):
        return path
    (cut,) = con.execute(
        f"SELECT max(start_ns) FROM (SELECT start_ns FROM spans ORDER BY start_ns LIMIT {spans})"
    ).fetchone()
    con.close()
    from audit.store.writer import SpanStore

    SpanStore(path).close()
    out = duckdb.connect(path)
    SpanStore(db).close()  # a source written before migration 0005_span_resources is migrated
    out.execute(f"ATTACH '{db}' AS src (READ_ONLY)")
    out.execute("INSERT INTO span_resources SELECT * FROM src.span_resources")
    out.execute("INSERT INTO span_scopes SELECT * FROM src.span_scopes")
    out.execute(f"INSERT INTO spans SELECT * FROM src.spans WHERE start_ns <= {cut} ORDER BY start_ns")
    out.execute(
        "INSERT INTO span_links SELECT * FROM src.span_links l WHERE EXISTS "
        "(SELECT 1 FROM spans s WHERE s.trace_id = l.trace_id AND s.span_id = l.span_id)"
    )
    out.close()
    return path


def measured(argv: list[str]) -> dict:
    """Run `argv`; its wall time and the peak RSS of its process tree."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = parent.memory_info().rss + sum(c.memory_info().rss for c in parent.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{argv} failed:\n{proc.stderr.read()[-3000:]}")
    return {"seconds": seconds, "peak_mib": peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default="/work/data/scale.duckdb")
    ap.add_argument("--spans", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slices", type=int, default=4, help="time slices (Spark tasks) the window is cut into")
    ap.add_argument("--cores", default="1,2")
    ap.add_argument("--parquet", default="", help="export folder [default: beside the store]")
    args = ap.parse_args()
    if not os.path.exists(args.db):
        build(args.db, args.spans)
    db = _subset(args.db, args.spans)
    con = duckdb.connect(db, read_only=True)
    spans, lo, hi = con.execute("SELECT count(*), min(start_ns), max(start_ns) + 1 FROM spans").fetchone()
    con.close()
    parquet = args.parquet or f"{db}.parquet"
    ctxaudit = os.path.join(os.path.dirname(sys.executable), "ctxaudit")
    export = measured([ctxaudit, "export", "--db", db, "--parquet", parquet, "--shard", "bench"])
    rows = {"export": [export]}
    slice_s = (hi - lo) / 1e9 / args.slices + 0.001
    common = ["--all", "--settle", "0", "--json"]
    for _ in range(args.runs):
        rows.setdefault("single process", []).append(
            measured([ctxaudit, "audit", "--db", db, "--no-save", *common])
        )
        for cores in args.cores.split(","):
            spark = [ctxaudit, "audit", "--spark", f"local[{cores}]", "--parquet", parquet, "--all", "--json"]
            rows.setdefault(f"spark local[{cores}], 1 slice", []).append(measured(spark))
            rows.setdefault(f"spark local[{cores}], {args.slices} slices", []).append(
                measured(spark + ["--slice", f"{slice_s:.3f}"])
            )
    single = statistics.median(r["seconds"] for r in rows["single process"])
    print(f"{spans:,} spans, {(hi - lo) / 1e9:.0f} s of traffic, {args.runs} run(s), medians")
    print(f"{'what':<32} {'seconds':>9} {'peak MiB':>9} {'x single':>9} {'µs/span':>8}")
    out = {}
    for name, runs in rows.items():
        s = statistics.median(r["seconds"] for r in runs)
        m = statistics.median(r["peak_mib"] for r in runs)
        print(f"{name:<32} {s:>9.1f} {m:>9.0f} {s / single:>9.2f} {s / spans * 1e6:>8.2f}")
        out[name] = {"seconds": s, "peak_mib": m, "ratio": s / single}
    print(json.dumps({"spans": spans, "results": out}))


if __name__ == "__main__":
    main()
