"""How fast `ctxaudit import` loads a Jaeger JSON capture (and a Zipkin v2 one, and OTLP/JSON
lines), into a new store and again into the same store (every span a duplicate).

The capture is synthetic but shaped like a Jaeger UI download of a microservice app: traces of
`--trace-spans` spans over 8 services, about 10 tags a span (kind, HTTP or RPC attributes,
peer.*), a log on one span in ten. Run by hand:

    .venv/bin/python bench/import_capture.py --spans 200000 --runs 3

Prints the median spans/s of each run of the real CLI (a subprocess, as a user runs it), and
the CPU each of the two processes spends per span (what the rate is on an idle machine)."""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVICES = ["frontend", "cart", "checkout", "payment", "shipping", "email", "currency", "catalog"]


def jaeger_capture(spans: int, trace_spans: int, seed: int, t0: int = 1_700_000_000_000_000) -> dict:
    rng = random.Random(seed)
    traces = []
    for t in range(spans // trace_spans):
        tid = f"{rng.getrandbits(128):032x}"
        procs = {
            f"p{i + 1}": {
                "serviceName": s,
                "tags": [
                    {"key": "hostname", "type": "string", "value": f"{s}-0"},
                    {"key": "ip", "type": "string", "value": f"10.0.0.{i}"},
                ],
            }
            for i, s in enumerate(SERVICES)
        }
        out, ids = [], []
        start = t0 + t * 3000
        for i in range(trace_spans):
            sid = f"{rng.getrandbits(64):016x}"
            p = rng.randrange(len(SERVICES))
            kind = "server" if i % 2 == 0 else "client"
            tags = [
                {"key": "span.kind", "type": "string", "value": kind},
                {"key": "component", "type": "string", "value": "net/http"},
                {"key": "http.method", "type": "string", "value": "GET"},
                {"key": "http.url", "type": "string", "value": f"http://{SERVICES[p]}:8080/api/item/{i}"},
                {"key": "http.status_code", "type": "int64", "value": 200},
                {"key": "peer.hostname", "type": "string", "value": SERVICES[(p + 1) % 8]},
                {"key": "peer.port", "type": "int64", "value": 8080},
                {"key": "internal.span.format", "type": "string", "value": "proto"},
                {"key": "sampler.type", "type": "string", "value": "const"},
                {"key": "sampler.param", "type": "bool", "value": True},
            ]
            refs = [{"refType": "CHILD_OF", "traceID": tid, "spanID": ids[(i - 1) // 2]}] if ids else []
            logs = (
                [
                    {
                        "timestamp": start + i * 10 + 5,
                        "fields": [{"key": "event", "type": "string", "value": "x"}],
                    }
                ]
                if i % 10 == 9
                else []
            )
            out.append(
                {
                    "traceID": tid,
                    "spanID": sid,
                    "flags": 1,
                    "operationName": f"GET /api/item/{i % 7}",
                    "references": refs,
                    "startTime": start + i * 10,
                    "duration": 1000 - i,
                    "tags": tags,
                    "logs": logs,
                    "processID": f"p{p + 1}",
                    "warnings": None,
                }
            )
            ids.append(sid)
        traces.append({"traceID": tid, "spans": out, "processes": procs, "warnings": None})
    return {"data": traces, "total": 0, "limit": 0, "offset": 0, "errors": None}


def run_import(db: Path, files: list[Path], fmt: str | None = None) -> float:
    cmd = [sys.executable, "-m", "audit.cli", "import", "--db", str(db)] + (["--format", fmt] if fmt else [])
    t = time.perf_counter()
    subprocess.run(
        cmd + [str(f) for f in files], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - t


def _decode(body: bytes, content_type: str):
    from collector_ext.ingest import decode_batch

    return decode_batch(body, content_type, False, len(body))


def cpu_split(db: Path, capture: Path) -> str:
    """One import in this process, converting in the worker: CPU seconds of each process, and the
    rate the busier one allows when both cores are free (the machine is shared: wall time is not)."""
    import resource

    from audit.import_job import Importer
    from audit.store.writer import SpanStore, SpanWriter

    def cpu(who) -> float:
        r = resource.getrusage(who)
        return r.ru_utime + r.ru_stime

    writer = SpanWriter(SpanStore(str(db)))
    importer = Importer(writer, _decode, worker_from_bytes=0)
    main0, worker0, t = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    try:
        n = importer.run([str(capture)]).stored
    finally:
        writer.close()
    wall = time.perf_counter() - t
    main_s, worker_s = cpu(resource.RUSAGE_SELF) - main0, cpu(resource.RUSAGE_CHILDREN) - worker0
    return (
        f"CPU per span: importing process {main_s / n * 1e6:.0f} us (decode, duplicate check, commit), "
        f"conversion worker {worker_s / n * 1e6:.0f} us (JSON parse, OTLP build); with both cores free "
        f"the busier allows {n / max(main_s, worker_s):,.0f} spans/s (this run: {n / wall:,.0f} spans/s wall)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spans", type=int, default=200_000)
    ap.add_argument("--trace-spans", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gzip", action="store_true", help="also time the same capture gzipped")
    ap.add_argument(
        "--store-spans",
        type=int,
        default=0,
        help="first fill each store with this many other spans (the hour before): the duplicate check's cost",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prefill = Path(tmp) / "prefill.json"
        if args.store_spans:
            t0 = 1_700_000_000_000_000 - 3_600_000_000
            prefill.write_text(json.dumps(jaeger_capture(args.store_spans, args.trace_spans, seed=2, t0=t0)))
        capture = Path(tmp) / "capture.json"
        doc = jaeger_capture(args.spans, args.trace_spans, seed=1)
        capture.write_text(json.dumps(doc))
        n = len(doc["data"]) * args.trace_spans
        cases = [("jaeger", capture)]
        if args.gzip:
            gz = Path(tmp) / "capture.json.gz"
            gz.write_bytes(gzip.compress(capture.read_bytes(), 6))
            cases.append(("jaeger gzip", gz))
        print(f"jaeger, CPU split: {cpu_split(Path(tmp) / 'cpu.duckdb', capture)}", flush=True)
        for label, path in cases:
            fresh, again = [], []
            for r in range(args.runs):
                db = Path(tmp) / f"{label.replace(' ', '-')}-{r}.duckdb"
                if args.store_spans:
                    run_import(db, [prefill])
                fresh.append(n / run_import(db, [path]))
                again.append(n / run_import(db, [path]))
            print(
                f"{label}: {n:,} spans, {path.stat().st_size / 1e6:.0f} MB; into a new store: median "
                f"{statistics.median(fresh):,.0f} spans/s; again (all duplicates): "
                f"{statistics.median(again):,.0f} spans/s  (runs: {[round(x) for x in fresh]})"
            )


if __name__ == "__main__":
    main()
