"""The queries behind each explorer page, timed on a large store, uncached (as on a page's
first view or after the 30 s cache expires), through a reader on the file and through a
running server's read API.

    python -m bench.ui_queries [--db bench-data/scale.duckdb] [--runs 5]

The store is the one bench/audit_scale.py builds (10 million spans). A saved audit run is
needed; if there is none, one is made first (about a minute at 10M spans).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from audit.audit_job import audit_store
from audit.read.remote import RemoteReader
from audit.server.process import start_server, stop_server
from audit.settings import AuditSettings
from audit.store.reader import LocalReader
from graph.service_graph import build_graphs, to_dot


def pages(reader) -> dict[str, callable]:
    """Each page's reader calls, as the page makes them (ui/pages/)."""

    def overview():
        reader.store_counts()
        if reader.live:
            reader.ingest()
        reader.audit_run()
        reader.audit_runs(200)

    def service_graph():
        run = reader.audit_run()
        to_dot(build_graphs(run["edges"], run["roots"])[0])
        edge = next(e for e in run["edges"] if e["broken"])
        reader.findings(
            run["run_id"], caller=edge["caller"], callee=edge["callee"], protocol=edge["protocol"], limit=20
        )

    def findings():
        reader.audit_runs(200)
        run = reader.audit_run()
        reader.findings(run["run_id"], limit=100)
        reader.findings(run["run_id"], kind="orphan_root", limit=100, offset=1000)
        middle = (run["window_start_ns"] + run["window_end_ns"]) // 2  # the time filter
        reader.findings(run["run_id"], since_ns=middle, until_ns=run["window_end_ns"], limit=100)

    def trace():
        reader.audit_run()
        finding = next(
            f for f in reader.findings(kind="orphan_root", limit=200)["findings"] if f["probable_parent"]
        )
        trace_id = int(finding["trace_id"], 16)
        reader.trace(trace_id)
        reader.findings(None, trace_id=trace_id, limit=50)
        reader.trace(int(finding["probable_parent"]["trace_id"], 16))

    def sampling():
        reader.audit_run()

    return {
        "Overview": overview,
        "Service graph": service_graph,
        "Findings": findings,
        "Trace view": trace,
        "Sampling": sampling,
    }


def measure(reader, runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for name, page in pages(reader).items():
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            page()
            times.append(time.perf_counter() - t)
        out[name] = times
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default="bench-data/scale.duckdb")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    reader = LocalReader(args.db)
    has_run = reader.audit_run() is not None
    stats = reader.stats()
    reader.close()
    if not has_run:
        print("no audit run in the store: auditing it once (saved)", file=sys.stderr)
        audit_store(
            args.db,
            AuditSettings.load(None, settle_s=0),
            resume=False,
            progress=lambda step: print(f"  {step}", file=sys.stderr),
        )
    print(f"store: {stats.spans:,} spans, {stats.traces:,} traces")
    reader = LocalReader(args.db)
    local = measure(reader, args.runs)
    reader.close()
    server, _, _ = start_server(args.db)
    try:
        remote = measure(RemoteReader(server.api_url), args.runs)
    finally:
        stop_server(server)
    print(f"{'page':<14} {'file: median s':>15} {'max s':>7} {'server API: median s':>21} {'max s':>7}")
    for name in local:
        print(
            f"{name:<14} {statistics.median(local[name]):>15.3f} {max(local[name]):>7.3f} "
            f"{statistics.median(remote[name]):>21.3f} {max(remote[name]):>7.3f}"
        )


if __name__ == "__main__":
    main()
