"""Ingest benchmark: a real `ctxaudit serve` process under load from pre-encoded OTLP requests.

    python -m bench.ingest [--seconds 20] [--runs 3] [--streams 8] [--transport grpc|http|both]

Each run starts a fresh server on a new DuckDB file, sends realistic 1000-span requests
(bench/payloads.py) over several concurrent streams for a fixed time, then stops the server
with SIGTERM and counts what was stored. It reports spans/s stored, server CPU (the server and
its decode workers), peak RSS, bytes per span on disk, acknowledgement latency, how far readers
lag behind the acknowledgements (the staging log's lag, sampled from /v1/ingest), and checks
stored == acknowledged. `--compare "ARGS"` adds a third server, e.g. `--staging-mib 0`
(acknowledge after the DuckDB commit, as before the staging log), interleaved with the others.
The baseline, measured in the same run, is the same server with `--decoders 0` (decode in the
server process: the straightforward single-process receiver). `--baseline-rev REV` adds the
server of another commit, run from a `git worktree` of it under /work/data (by default the
commit before the staging log, issue 19's pre-change build); `--baseline-rev none` leaves it
out. Per process, CPU is split into the server, its decode workers and the load generator;
the commit size is the spans per DuckDB transaction during the load. Figures:
docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass

import grpc
import psutil

from audit.read.remote import RemoteReader
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
    ack_ms: list[float]
    lag_s: list[float]  # the staging log's lag, sampled: how far behind the acks readers are
    loaded_spans: int  # in the store when the load ended
    stop_s: float  # SIGTERM to exit: the staging log's backlog is loaded meanwhile
    cpu_server_s: float = 0.0  # the server process alone
    cpu_client_s: float = 0.0  # the load generator (this process)
    commit_spans: float | None = None  # spans per DuckDB transaction during the load

    def us_per_span(self, seconds: float) -> float:
        return seconds / max(self.acked_spans, 1) * 1e6

    @property
    def loaded_per_s(self) -> float:
        return self.loaded_spans / self.seconds

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
        self.ack_ms: list[float] = []
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
            sent = time.monotonic()
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
                self.ack_ms.append((time.monotonic() - sent) * 1e3)
        if self.transport == "grpc":
            channel.close()


class Sampler:
    """Samples the server's RSS, and the PSS of the server with its decode workers, while it
    runs; and the CPU time the server and its workers spend between enter and exit."""

    def __init__(self, pid: int, api_url: str | None = None):
        self.api = RemoteReader(api_url) if api_url else None
        self.lag_s: list[float] = []
        self.proc = psutil.Process(pid)
        self.procs = [self.proc, *self.proc.children(recursive=True)]
        self.peak_rss = self.peak_total = 0
        self.cpu = 0.0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _cpu(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.procs)

    def _ingest(self) -> dict:
        return self.api.ingest() if self.api else {}

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
            if self.api:
                self.lag_s.append(self.api.ingest().get("staging_lag_s", 0.0))

    def __enter__(self):
        self._cpu_start = self._cpu()
        self._server_start = sum(self.proc.cpu_times()[:2])
        self._client_start = time.process_time()
        self._ingest_start = self._ingest()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.cpu = self._cpu() - self._cpu_start
        self.cpu_server = sum(self.proc.cpu_times()[:2]) - self._server_start
        self.cpu_client = time.process_time() - self._client_start
        end = self._ingest()
        commits = end.get("commits", 0) - self._ingest_start.get("commits", 0)
        spans = end.get("committed_spans", 0) - self._ingest_start.get("committed_spans", 0)
        self.commit_spans = spans / commits if "commits" in end and commits else None
        self._stop.set()
        self.thread.join()
        # spans in the store when the load ends: the rate the store kept up with (the rest is
        # in the staging log, loaded while the server stops)
        self.loaded = self.api.ingest()["committed_spans"] if self.api else None


def one_run(
    label: str,
    transport: str,
    bodies: list[bytes],
    per: int,
    seconds: float,
    streams: int,
    server_args: list[str],
    checkout: str | None = None,
) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="ctxaudit-bench-") as tmp:
        db = os.path.join(tmp, "bench.duckdb")
        # NAME=VALUE words are the server's environment (e.g. CTXAUDIT_DECODER=python), the rest options
        env = dict(w.split("=", 1) for w in server_args if "=" in w and w.split("=", 1)[0].isupper())
        server_args = [w for w in server_args if w.split("=", 1)[0] not in env]
        env = {**os.environ, **env}
        where = {}
        if checkout:  # another commit's server: its own code, this venv's packages
            env["PYTHONPATH"] = checkout
            where["cwd"] = checkout
        proc, grpc_port, http_url = start_server(db, *server_args, env=env, **where)
        target = f"127.0.0.1:{grpc_port}" if transport == "grpc" else http_url
        load = Load(transport, target, bodies, per, streams)
        with Sampler(proc.pid, proc.api_url) as sampler:
            elapsed = load.run(seconds)
        stopping = time.monotonic()
        code = stop_server(proc, timeout=300)
        stop_s = time.monotonic() - stopping
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
            load.ack_ms,
            sampler.lag_s,
            sampler.loaded if sampler.loaded is not None else stored,
            stop_s,
            sampler.cpu_server,
            sampler.cpu_client,
            sampler.commit_spans,
        )


def baseline_checkout(rev: str) -> tuple[str, str]:
    """A git worktree of `rev` under /work/data (made once, reused): (its path, short commit).
    `rev` 'pre-staging' is the commit before the one that added audit/store/staging.py."""
    git = ["git", "-C", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    if rev == "pre-staging":
        added = subprocess.run(
            [*git, "log", "--diff-filter=A", "--format=%H", "--", "audit/store/staging.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[-1]
        rev = f"{added}^"
    short = subprocess.run(
        [*git, "rev-parse", "--short", rev], capture_output=True, text=True, check=True
    ).stdout.strip()
    path = os.path.join(os.environ.get("BENCH_WORKTREES", "/work/data/worktrees"), f"ctxaudit-{short}")
    if not os.path.isdir(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        subprocess.run([*git, "worktree", "add", "--detach", path, short], check=True, capture_output=True)
    return path, short


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--transport", choices=["grpc", "http", "both"], default="both")
    ap.add_argument("--requests", type=int, default=32, help="distinct pre-encoded requests to cycle through")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument(
        "--compare",
        default="",
        help="`ctxaudit serve` options (and NAME=VALUE environment) of a third server, "
        "e.g. '--staging-mib 0' "
        "or 'CTXAUDIT_DECODER=python'",
    )
    ap.add_argument(
        "--server-args", default="", help="extra `ctxaudit serve` options for the measured server"
    )
    ap.add_argument(
        "--baseline-rev",
        default="pre-staging",
        help="a commit whose server is measured too, from a git worktree (default: the commit "
        "before the staging log, the pre-change build of issue 19); 'none' to leave it out",
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
    if args.compare:
        configs.append((f"compare: {args.compare}", args.compare.split()))
    checkouts: dict[str, str] = {}
    if args.baseline_rev != "none":
        path, short = baseline_checkout(args.baseline_rev)
        label = f"pre-change build {short}"
        configs.append((label, []))
        checkouts[label] = path
        print(f"{label}: {path}", flush=True)
    transports = ["grpc", "http"] if args.transport == "both" else [args.transport]
    results: dict[tuple[str, str], list[RunResult]] = {}
    for run in range(args.runs):
        for transport in transports:
            for label, server_args in configs:  # interleaved, so noise hits both alike
                r = one_run(
                    label,
                    transport,
                    bodies,
                    per,
                    args.seconds,
                    args.streams,
                    server_args,
                    checkouts.get(label),
                )
                results.setdefault((label, transport), []).append(r)
                lost = r.acked_spans - r.stored_spans
                print(
                    f"run {run + 1} {transport:<4} {label:<26} {r.spans_per_s:>9,.0f} spans/s  "
                    f"cpu {r.cpu_seconds / r.seconds:4.2f} cores = {r.cpu_us_per_span:4.1f} us/span  "
                    f"rss {r.peak_rss_mib:5.0f} MiB "
                    f"(pss with workers {r.peak_total_pss_mib:5.0f})  "
                    f"{r.bytes_per_span:5.0f} B/span on disk  "
                    f"refused {r.refused}  ack p50/p99 {_pct(r.ack_ms, 50):.0f}/{_pct(r.ack_ms, 99):.0f} ms  "
                    f"reader lag p50/max {_pct(r.lag_s, 50):.2f}/{max(r.lag_s, default=0):.2f} s  "
                    f"loaded {r.loaded_per_s:,.0f}/s, stop {r.stop_s:.1f} s  "
                    f"cpu us/span server {r.us_per_span(r.cpu_server_s):.1f} workers "
                    f"{r.us_per_span(r.cpu_seconds - r.cpu_server_s):.1f} client "
                    f"{r.us_per_span(r.cpu_client_s):.1f}  commit {_size(r.commit_spans)} spans  "
                    f"{'OK stored == acked' if lost <= 0 else f'LOST {lost}'}",
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
                f"{statistics.median(r.cpu_us_per_span for r in rs):4.1f} us CPU/span  "
                f"peak rss {statistics.median(r.peak_rss_mib for r in rs):5.0f} MiB  "
                f"stored==acked in {sum(r.stored_spans >= r.acked_spans for r in rs)}/{len(rs)} runs  "
                f"ack p50/p99 {statistics.median(_pct(r.ack_ms, 50) for r in rs):.0f}/"
                f"{statistics.median(_pct(r.ack_ms, 99) for r in rs):.0f} ms  reader lag p50/max "
                f"{statistics.median(_pct(r.lag_s, 50) for r in rs):.2f}/"
                f"{max(max(r.lag_s, default=0) for r in rs):.2f} s  "
                f"loaded by the end {statistics.median(r.loaded_per_s for r in rs):,.0f}/s  "
                f"stop {statistics.median(r.stop_s for r in rs):.1f} s  "
                f"CPU us/span server {statistics.median(r.us_per_span(r.cpu_server_s) for r in rs):.1f} "
                f"workers {statistics.median(r.us_per_span(r.cpu_seconds - r.cpu_server_s) for r in rs):.1f} "
                f"client {statistics.median(r.us_per_span(r.cpu_client_s) for r in rs):.1f}  "
                f"commit {_size(_median_or_none([r.commit_spans for r in rs]))} spans  "
                f"peak pss with workers {statistics.median(r.peak_total_pss_mib for r in rs):5.0f} MiB"
            )
        if not args.no_baseline:
            default = statistics.median(r.spans_per_s for r in results[(configs[0][0], transport)])
            baseline = statistics.median(r.spans_per_s for r in results[(configs[1][0], transport)])
            print(f"  {transport:<4} ratio default / baseline: {default / baseline:.2f}x")
        default_rs = results[(configs[0][0], transport)]
        for label, _ in configs[1:]:
            if label.startswith("baseline"):
                continue
            rs = results[(label, transport)]
            print(
                f"  {transport:<4} ratio default / {label}: acked "
                f"{_ratio(default_rs, rs, 'spans_per_s'):.2f}x, "
                f"loaded {_ratio(default_rs, rs, 'loaded_per_s'):.2f}x"
                "; per run (interleaved): "
                + ", ".join(f"{a.spans_per_s / b.spans_per_s:.2f}x" for a, b in zip(default_rs, rs))
            )
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def _ratio(a: list[RunResult], b: list[RunResult], what: str) -> float:
    return statistics.median(getattr(r, what) for r in a) / statistics.median(getattr(r, what) for r in b)


def _size(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


if __name__ == "__main__":
    main()
