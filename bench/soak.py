"""Soak: a real `ctxaudit serve` ingesting at half its measured capacity for a long time while
its own audits run, showing that memory and latency stay flat and that nothing is lost.

    python -m bench.soak [--minutes 30] [--rate SPANS_PER_S] [--audit-every 300]

Without --rate it first measures capacity (bench/ingest.py's load for 20 s on a fresh server)
and soaks at half of it. The load sends 1000-span requests over gRPC from a pool built once,
each sent with fresh trace ids and timestamps of now, so the server's audits (every
--audit-every seconds, each over the newest settled window) always have new traffic. Every
10 s it records the server's RSS (and PSS with its decode workers), the spans acknowledged,
the export latency (p50, p99) and the write queue, in a JSON Lines file; at the end it
compares the first and last fifths, and checks that every acknowledged span is stored.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time

import grpc
import psutil
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from audit.read.remote import RemoteReader
from audit.server.process import start_server, stop_server
from audit.store.reader import LocalReader

from .ingest import EXPORT, one_run
from .payloads import build_request, encoded_requests

PER = 1000


class FreshLoad:
    """Rate-limited senders: each request is a pooled one with new trace ids and timestamps."""

    def __init__(self, target: str, rate: float, streams: int = 4, pool: int = 16):
        import random

        rng = random.Random(5)
        self.pool = [build_request(rng, PER) for _ in range(pool)]
        self.target, self.rate, self.streams = target, rate, streams
        self.acked = self.refused = 0
        self.latencies: list[float] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, args=(i,), daemon=True) for i in range(streams)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def take_latencies(self) -> list[float]:
        with self.lock:
            out, self.latencies = self.latencies, []
        return out

    def _fresh(self, template: ExportTraceServiceRequest) -> bytes:
        now = time.time_ns()
        ids = os.urandom(16 * PER)
        trace_of: dict[bytes, bytes] = {}
        request = ExportTraceServiceRequest()
        request.CopyFrom(template)
        first = min(
            s.start_time_unix_nano for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans
        )
        k = 0
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    new = trace_of.get(span.trace_id)
                    if new is None:
                        new = trace_of[span.trace_id] = ids[16 * k : 16 * k + 16]
                        k += 1
                    shift = now - first
                    span.trace_id = new
                    span.start_time_unix_nano += shift
                    span.end_time_unix_nano += shift
        return request.SerializeToString()

    def _send(self, i: int) -> None:
        channel = grpc.insecure_channel(self.target, options=[("grpc.max_send_message_length", 64 << 20)])
        export = channel.unary_unary(EXPORT)
        interval = PER * self.streams / self.rate  # each stream's share of the rate
        next_at = time.monotonic() + i * interval / self.streams
        k = i
        while not self._stop.is_set():
            body = self._fresh(self.pool[k % len(self.pool)])
            k += self.streams
            delay = next_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            next_at = max(next_at + interval, time.monotonic() - interval)  # no catching up in bursts
            while not self._stop.is_set():
                t = time.monotonic()
                try:
                    export(body, timeout=60)
                except grpc.RpcError:
                    with self.lock:
                        self.refused += 1
                    time.sleep(0.2)  # retryable: the same body again, as an exporter would
                    continue
                with self.lock:
                    self.acked += PER
                    self.latencies.append(time.monotonic() - t)
                break
        channel.close()


def measure_capacity() -> float:
    bodies = encoded_requests(16, PER)
    r = one_run("capacity", "grpc", bodies, PER, 20, 8, [])
    return r.spans_per_s


def _memory(proc: psutil.Process) -> tuple[float, float]:
    procs = [proc, *proc.children(recursive=True)]
    rss = proc.memory_info().rss
    pss = 0
    for p in procs:
        try:
            pss += p.memory_full_info().pss
        except psutil.Error:
            pass
    return rss / 2**20, pss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--rate", type=float, help="spans/s [default: half the capacity measured first]")
    ap.add_argument("--audit-every", type=float, default=300)
    ap.add_argument(
        "--memory-limit", default="2GB", help="the server's DuckDB memory limit (its audits share it)"
    )
    ap.add_argument("--out", default="bench-data/soak.jsonl", help="one JSON line per 10 s sample")
    ap.add_argument("--db", help="the store [default: a temporary file, removed after]")
    args = ap.parse_args()

    if args.rate is None:
        print("measuring capacity: 20 s of full load on a fresh server ...", flush=True)
        capacity = measure_capacity()
        args.rate = capacity / 2
        print(f"capacity {capacity:,.0f} spans/s: soaking at {args.rate:,.0f}", flush=True)
    tmp = None if args.db else tempfile.TemporaryDirectory(prefix="ctxaudit-soak-")
    db = args.db or os.path.join(tmp.name, "soak.duckdb")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    proc, grpc_port, _ = start_server(
        db,
        "--audit-every",
        str(args.audit_every),
        "--audit-settle",
        "30",
        "--memory-limit",
        args.memory_limit,
    )
    server = psutil.Process(proc.pid)
    remote = RemoteReader(proc.api_url)
    load = FreshLoad(f"127.0.0.1:{grpc_port}", args.rate)
    samples = []
    started = time.monotonic()
    load.start()
    try:
        with open(args.out, "w") as out:
            last_acked, last_t = 0, started
            while time.monotonic() - started < args.minutes * 60:
                time.sleep(10)
                now = time.monotonic()
                lat = sorted(load.take_latencies())
                rss, pss = _memory(server)
                health = remote.ingest()
                runs = remote.audit_runs(1000)
                sample = {
                    "t_s": round(now - started),
                    "acked": load.acked,
                    "rate": round((load.acked - last_acked) / (now - last_t)),
                    "p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None,
                    "p99_ms": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1) if lat else None,
                    "rss_mib": round(rss),
                    "pss_mib": round(pss),
                    "queued": health["queued_spans"],
                    "refused": load.refused,
                    "audit_runs": len(runs),
                    "audit_s": round(runs[0]["seconds"], 1) if runs else None,
                }
                last_acked, last_t = load.acked, now
                samples.append(sample)
                out.write(json.dumps(sample) + "\n")
                out.flush()
                print(json.dumps(sample), flush=True)
    finally:
        load.stop()
        code = stop_server(proc, timeout=300)
    reader = LocalReader(db)
    stored = reader.stats().spans
    runs = reader.audit_runs(1000)
    reader.close()
    fifth = max(1, len(samples) // 5)
    first, last = samples[:fifth], samples[-fifth:]

    def med(rows, key):
        values = [r[key] for r in rows if r[key] is not None]
        return statistics.median(values) if values else float("nan")

    print(f"\n{args.minutes:g} min at {args.rate:,.0f} spans/s target; server exit {code}")
    print(
        f"acknowledged {load.acked:,} spans, stored {stored:,}: "
        f"{'nothing lost' if stored >= load.acked else 'LOST ' + str(load.acked - stored)}"
    )
    print(
        f"audit runs: {len(runs)}; their durations (s): "
        f"{[round(r['seconds'], 1) for r in sorted(runs, key=lambda r: r['run_id'])]}"
    )
    for key in ("rate", "rss_mib", "pss_mib", "p50_ms", "p99_ms", "queued"):
        print(
            f"{key:>8}: first fifth median {med(first, key):>10,.1f}   "
            f"last fifth median {med(last, key):>10,.1f}   "
            f"max {max((r[key] for r in samples if r[key] is not None), default=float('nan')):>10,.1f}"
        )
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
