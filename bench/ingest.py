"""Ingest benchmark: a real `ctxaudit serve` process under load from pre-encoded OTLP requests.

    python -m bench.ingest [--seconds 20] [--runs 3] [--streams 8] [--transport grpc|http|both]

Each run starts a fresh server on a new DuckDB file, sends realistic 1000-span requests
(bench/payloads.py) over several concurrent streams for a fixed time, then stops the server
with SIGTERM and counts what was stored. It reports spans/s stored, server CPU (the server and
its decode workers), peak RSS, bytes per span on disk, and checks stored == acknowledged.
The baseline, measured in the same run, is the same server with `--decoders 0` (decode in the
server process: the straightforward single-process receiver). Figures: docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass

import grpc
import psutil

from audit.server.process import start_server, stop_server
from audit.store.reader import LocalReader

from .payloads import encoded_requests

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


@dataclass
class RunResult:
    label: str
    transport: str
    seconds: float
    acked_spans: int
    stored_spans: int
    refused: int
    cpu_seconds: float
    peak_rss_mib: float
    peak_total_pss_mib: float
    bytes_per_span: float

    @property
    def spans_per_s(self) -> float:
        return self.acked_spans / self.seconds

    @property
    def cpu_us_per_span(self) -> float:
        """Server CPU (with its decode workers) per span: steadier than spans/s on a shared machine."""
        return self.cpu_seconds / max(self.acked_spans, 1) * 1e6


class Load:
    """Concurrent senders cycling through pre-encoded requests until the deadline."""

    def __init__(self, transport: str, target: str, bodies: list[bytes], spans_per_body: int, streams: int):
        self.transport, self.target, self.bodies, self.per = transport, target, bodies, spans_per_body
        self.acked = 0
        self.refused = 0
        self.lock = threading.Lock()
        self.streams = streams

    def run(self, seconds: float) -> float:
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self._send, args=(i, deadline)) for i in range(self.streams)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - start

    def _send(self, i: int, deadline: float) -> None:
        k = i
        if self.transport == "grpc":
            channel = grpc.insecure_channel(self.target, options=[("grpc.max_send_message_length", 64 << 20)])
            export = channel.unary_unary(EXPORT)
        while time.monotonic() < deadline:
            body = self.bodies[k % len(self.bodies)]
            k += self.streams
            try:
                if self.transport == "grpc":
                    export(body, timeout=60)
                else:
                    req = urllib.request.Request(
                        self.target, data=body, headers={"Content-Type": "application/x-protobuf"}
                    )
                    urllib.request.urlopen(req, timeout=60).read()
            except (grpc.RpcError, OSError):
                with self.lock:
                    self.refused += 1
                time.sleep(0.05)  # retryable refusal: back off a little, as exporters do
                continue
            with self.lock:
                self.acked += self.per
        if self.transport == "grpc":
            channel.close()


class Sampler:
    """Samples the server's RSS, and the PSS of the server with its decode workers, while it
    runs; and the CPU time the server and its workers spend between enter and exit."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.procs = [self.proc, *self.proc.children(recursive=True)]
        self.peak_rss = self.peak_total = 0
        self.cpu = 0.0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _cpu(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.procs)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                rss = self.proc.memory_info().rss
                # PSS shares each shared page among the processes mapping it, so the sum does
                # not count the libraries the server and its workers share several times
                pss = sum(p.memory_full_info().pss for p in self.procs)
            except psutil.Error:
                continue
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_total = max(self.peak_total, pss)

    def __enter__(self):
        self._cpu_start = self._cpu()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.cpu = self._cpu() - self._cpu_start
        self._stop.set()
        self.thread.join()


def one_run(
    label: str,
    transport: str,
    bodies: list[bytes],
    per: int,
    seconds: float,
    streams: int,
    server_args: list[str],
) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="ctxaudit-bench-") as tmp:
        db = os.path.join(tmp, "bench.duckdb")
        proc, grpc_port, http_url = start_server(db, *server_args)
        target = f"127.0.0.1:{grpc_port}" if transport == "grpc" else http_url
        load = Load(transport, target, bodies, per, streams)
        with Sampler(proc.pid) as sampler:
            elapsed = load.run(seconds)
        code = stop_server(proc, timeout=120)
        if code != 0:
            raise SystemExit(f"server exited with {code}")
        reader = LocalReader(db)
        stored = reader.stats().spans
        reader.close()
        size = os.path.getsize(db) + (os.path.getsize(db + ".wal") if os.path.exists(db + ".wal") else 0)
        return RunResult(
            label,
            transport,
            elapsed,
            load.acked,
            stored,
            load.refused,
            sampler.cpu,
            sampler.peak_rss / 2**20,
            sampler.peak_total / 2**20,
            size / max(stored, 1),
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--transport", choices=["grpc", "http", "both"], default="both")
    ap.add_argument("--requests", type=int, default=32, help="distinct pre-encoded requests to cycle through")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument(
        "--server-args", default="", help="extra `ctxaudit serve` options for the measured server"
    )
    args = ap.parse_args()

    per = 1000
    print(f"encoding {args.requests} requests of {per} spans ...", flush=True)
    bodies = encoded_requests(args.requests, per)
    print(
        f"{sum(map(len, bodies)) / len(bodies) / per:.0f} bytes/span on the wire; "
        f"{os.cpu_count()} cores; {args.runs} runs of {args.seconds:.0f}s, {args.streams} streams",
        flush=True,
    )

    extra = args.server_args.split()
    configs = [(f"ctxaudit serve {args.server_args}".strip() if extra else "ctxaudit serve (default)", extra)]
    if not args.no_baseline:
        configs.append(("baseline: --decoders 0", ["--decoders", "0"]))
    transports = ["grpc", "http"] if args.transport == "both" else [args.transport]
    results: dict[tuple[str, str], list[RunResult]] = {}
    for run in range(args.runs):
        for transport in transports:
            for label, server_args in configs:  # interleaved, so noise hits both alike
                r = one_run(label, transport, bodies, per, args.seconds, args.streams, server_args)
                results.setdefault((label, transport), []).append(r)
                lost = r.acked_spans - r.stored_spans
                print(
                    f"run {run + 1} {transport:<4} {label:<26} {r.spans_per_s:>9,.0f} spans/s  "
                    f"cpu {r.cpu_seconds / r.seconds:4.2f} cores = {r.cpu_us_per_span:4.1f} us/span  rss {r.peak_rss_mib:5.0f} MiB "
                    f"(pss with workers {r.peak_total_pss_mib:5.0f})  {r.bytes_per_span:5.0f} B/span on disk  "
                    f"refused {r.refused}  {'OK stored == acked' if lost <= 0 else f'LOST {lost}'}",
                    flush=True,
                )

    print("\nmedians")
    for transport in transports:
        base = None
        for label, _ in configs:
            rs = results[(label, transport)]
            med = statistics.median(r.spans_per_s for r in rs)
            base = base or (med if label.startswith("baseline") else None)
            print(
                f"  {transport:<4} {label:<26} {med:>9,.0f} spans/s  "
                f"{statistics.median(r.cpu_us_per_span for r in rs):4.1f} us CPU/span  peak rss {statistics.median(r.peak_rss_mib for r in rs):5.0f} MiB  "
                f"stored==acked in {sum(r.stored_spans >= r.acked_spans for r in rs)}/{len(rs)} runs"
            )
        if not args.no_baseline:
            default = statistics.median(r.spans_per_s for r in results[(configs[0][0], transport)])
            baseline = statistics.median(r.spans_per_s for r in results[(configs[1][0], transport)])
            print(f"  {transport:<4} ratio default / baseline: {default / baseline:.2f}x")


if __name__ == "__main__":
    main()
