"""The same store audited single-process and on Spark (local mode, 1 and 2 cores): time, peak
memory, and the ratio to the single-process audit measured in the same run (docs/scale.md).

    python -m bench.spark_scale [--db /work/data/scale.duckdb] [--spans 10000000] [--runs 3]
                                [--slices 4] [--cores 1,2]

The store is bench/audit_scale.py's (built once if missing). `--spans` below the store's size
audits its first that many spans (copied once into a store of their own). The Parquet export
is timed too (`--reuse-export` keeps an export already there). Each audit runs in a fresh
process; every 0.2 s the bench samples its process tree: peak memory is the largest sum of
resident memory over the tree, and per role (the `ctxaudit` process, i.e. Spark's Python driver;
the JVM, which in local mode is the driver's JVM and the executor at once; Spark's Python
workers, where the tasks run the engine); CPU is the sum over the tree's processes of the user
and system time last seen (a process that lived less than 0.2 s is missed). The load average
(1 min) is read before and after each run: the machine is shared, so compare ratios and CPU
times measured in the same run.
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


ROLES = ("driver", "jvm", "workers")


def _role(proc: psutil.Process, top: int) -> str:
    if proc.pid == top:
        return "driver"
    return "jvm" if "java" in proc.name() else "workers"


def measured(argv: list[str], name: str = "") -> dict:
    """Run `argv`: its wall time, its process tree's CPU time and peak RSS (all, and per role),
    and the load average before and after."""
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parent, peak = psutil.Process(proc.pid), 0
    peaks, cpu = dict.fromkeys(ROLES, 0), {}
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
        except psutil.Error:
            tree = []
        rss, by_role = 0, dict.fromkeys(ROLES, 0)
        for p in tree:
            try:
                with p.oneshot():
                    m, c, role = p.memory_info().rss, p.cpu_times(), _role(p, proc.pid)
            except psutil.Error:
                continue
            rss += m
            by_role[role] += m
            cpu[p.pid] = c.user + c.system  # not children_*: a waited child is counted as itself
        peak = max(peak, rss)
        peaks = {r: max(peaks[r], by_role[r]) for r in ROLES}
        time.sleep(0.2)
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{argv} failed:\n{proc.stderr.read()[-3000:]}")
    out = {
        "seconds": seconds,
        "cpu_s": sum(cpu.values()),
        "peak_mib": peak / 2**20,
        **{f"peak_{r}_mib": peaks[r] / 2**20 for r in ROLES},
        "load": [load_before, os.getloadavg()[0]],
    }
    print(f"{name}: {json.dumps(out)}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default="/work/data/scale.duckdb")
    ap.add_argument("--spans", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slices", type=int, default=4, help="time slices (Spark tasks) the window is cut into")
    ap.add_argument("--cores", default="1,2")
    ap.add_argument("--parquet", default="", help="export folder [default: beside the store]")
    ap.add_argument("--reuse-export", action="store_true", help="keep the export if its manifest is there")
    args = ap.parse_args()
    if not os.path.exists(args.db):
        build(args.db, args.spans)
    db = _subset(args.db, args.spans)
    con = duckdb.connect(db, read_only=True)
    spans, lo, hi = con.execute("SELECT count(*), min(start_ns), max(start_ns) + 1 FROM spans").fetchone()
    con.close()
    parquet = args.parquet or f"{db}.parquet"
    ctxaudit = os.path.join(os.path.dirname(sys.executable), "ctxaudit")
    rows = {}
    if not (args.reuse_export and os.path.exists(os.path.join(parquet, "_shards", "bench.json"))):
        export = [ctxaudit, "export", "--db", db, "--parquet", parquet, "--shard", "bench"]
        rows["export"] = [measured(export, "export")]
    slice_s = (hi - lo) / 1e9 / args.slices + 0.001
    common = ["--all", "--settle", "0", "--json"]
    for _ in range(args.runs):
        rows.setdefault("single process", []).append(
            measured([ctxaudit, "audit", "--db", db, "--no-save", *common], "single process")
        )
        for cores in args.cores.split(","):
            spark = [ctxaudit, "audit", "--spark", f"local[{cores}]", "--parquet", parquet, "--all", "--json"]
            name = f"spark local[{cores}], 1 slice"
            rows.setdefault(name, []).append(measured(spark, name))
            if args.slices > 1:
                name = f"spark local[{cores}], {args.slices} slices"
                rows.setdefault(name, []).append(measured(spark + ["--slice", f"{slice_s:.3f}"], name))

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    single, single_cpu = med(rows["single process"], "seconds"), med(rows["single process"], "cpu_s")
    print(f"{spans:,} spans, {(hi - lo) / 1e9:.0f} s of traffic, {args.runs} run(s), medians")
    print(
        f"{'what':<32} {'seconds':>8} {'x single':>8} {'CPU s':>8} {'x single':>8} {'CPU µs/span':>11} "
        f"{'peak MiB':>8} {'driver':>7} {'JVM':>7} {'workers':>7} {'load':>9}"
    )
    out = {}
    for name, runs in rows.items():
        s, c, m = med(runs, "seconds"), med(runs, "cpu_s"), med(runs, "peak_mib")
        roles = [med(runs, f"peak_{r}_mib") for r in ROLES]
        load = f"{runs[0]['load'][0]:.1f}-{runs[0]['load'][1]:.1f}"
        print(
            f"{name:<32} {s:>8.1f} {s / single:>8.2f} {c:>8.1f} {c / single_cpu:>8.2f} "
            f"{c / spans * 1e6:>11.2f} {m:>8.0f} {roles[0]:>7.0f} {roles[1]:>7.0f} {roles[2]:>7.0f} {load:>9}"
        )
        out[name] = {"seconds": s, "ratio": s / single, "cpu_s": c, "cpu_ratio": c / single_cpu, "runs": runs}
    print(json.dumps({"spans": spans, "results": out}))


if __name__ == "__main__":
    main()
