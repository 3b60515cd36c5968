"""The Parquet export from the file (`ctxaudit export --db`) against the same export through a
running server's read API (`ctxaudit export --server`: GET /v1/export, Arrow IPC), on the same
store in the same run: time, peak memory of the exporting process, and the ratio (docs/scale.md).

    python -m bench.parquet_export [--db /work/data/scale.duckdb.first1000000.duckdb] [--runs 3]

The store is copied first (serve opens it read-write and applies its migrations); the copy and
the export folders stay under /work/data. Runs alternate between the two ways, so a busy
machine slows both alike; each reports its median.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

import duckdb

from audit.server.process import start_server, stop_server
from bench.spark_scale import measured
from tests.serve_helpers import wait_loaded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default="/work/data/scale.duckdb.first1000000.duckdb")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default="/work/data/parquet-export-bench")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    db = str(work / "store.duckdb")
    shutil.copyfile(args.db, db)
    (spans,) = duckdb.connect(db, read_only=True).execute("SELECT count(*) FROM spans").fetchone()
    ctxaudit = [sys.executable, "-m", "audit", "export"]
    times: dict[str, list[dict]] = {"db": [], "server": []}
    for run in range(args.runs):
        times["db"].append(measured([*ctxaudit, "--db", db, "--parquet", str(work / "db"), "--shard", "a"]))
        proc, _, _ = start_server(db, "--audit-every", "0")
        try:
            wait_loaded(proc.api_url)
            times["server"].append(
                measured(
                    [*ctxaudit, "--server", proc.api_url, "--parquet", str(work / "srv"), "--shard", "a"]
                )
            )
        finally:
            stop_server(proc)
        print(f"run {run + 1}: db {times['db'][-1]}, server {times['server'][-1]}", file=sys.stderr)
    base = statistics.median(t["seconds"] for t in times["db"])
    print(f"{spans:,} spans, {args.runs} runs each, medians:")
    for way, label in (("db", "export --db"), ("server", "export --server (read API, Arrow IPC)")):
        s = statistics.median(t["seconds"] for t in times[way])
        mib = statistics.median(t["peak_mib"] for t in times[way])
        print(f"  {label:<40} {s:7.1f} s  {spans / s / 1e3:6.0f}k spans/s  {mib:6.0f} MiB  x{s / base:.2f}")


if __name__ == "__main__":
    main()
