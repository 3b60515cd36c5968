"""Retention at scale: a server ingests at a steady rate while its retention deletes millions of
old spans; export latency while deleting, against the same server's once it is done.

    python -m bench.retention [--db bench-data/scale.duckdb] [--rate 15000] [--after 60]

It works on a copy of the store (bench/audit_scale.py builds the 10M-span one), with
--retain-days set so that every span of the copy is past it, and a load of fresh spans
(bench/soak.py's) that stay. It reports how long the deletion took, the latency percentiles
during it and during --after seconds after it, and checks that every acknowledged span is stored.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import duckdb

from audit.read.remote import RemoteReader
from audit.server.process import start_server, stop_server
from audit.store.reader import LocalReader

from .soak import FreshLoad


def _percentiles(latencies: list[float]) -> str:
    if not latencies:
        return "no requests"
    q = statistics.quantiles(latencies, n=100)
    return f"p50 {1000 * q[49]:.0f} ms, p99 {1000 * q[98]:.0f} ms over {len(latencies)} requests"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default="bench-data/scale.duckdb")
    ap.add_argument("--rate", type=float, default=15_000)
    ap.add_argument("--after", type=float, default=60, help="seconds measured after the deletion ends")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="ctxaudit-retention-") as tmp:
        db = os.path.join(tmp, "copy.duckdb")
        shutil.copy(args.db, db)
        con = duckdb.connect(db, read_only=True)
        old_spans, newest = con.execute("SELECT count(*), max(start_ns) FROM spans").fetchone()
        con.close()
        days = (time.time_ns() - newest) / 86_400e9 - 1e-4  # every span of the copy is older
        print(
            f"{old_spans:,} old spans to delete (--retain-days {days:.4f}); load {args.rate:,.0f} spans/s",
            flush=True,
        )
        proc, grpc_port, _ = start_server(
            db, "--retain-days", f"{days:.6f}", "--audit-every", "0", "--memory-limit", "2GB"
        )
        remote = RemoteReader(proc.api_url)
        load = FreshLoad(f"127.0.0.1:{grpc_port}", args.rate)
        started = time.monotonic()
        load.start()
        while (remote.time_range()["first_start_ns"] or 0) <= newest:
            time.sleep(0.5)
        deleting = time.monotonic() - started
        during = load.take_latencies()
        time.sleep(args.after)
        after = load.take_latencies()
        load.stop()
        assert stop_server(proc, timeout=300) == 0
        reader = LocalReader(db)
        stored = reader.stats().spans
        reader.close()
        print(f"deleted {old_spans:,} spans in {deleting:.1f} s while ingesting")
        print(f"latency while deleting: {_percentiles(during)}")
        print(f"latency after:          {_percentiles(after)}")
        print(
            f"acknowledged {load.acked:,}, stored {stored:,}: "
            f"{'nothing lost' if stored == load.acked else 'MISMATCH'}"
        )


if __name__ == "__main__":
    main()
