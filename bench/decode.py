"""Decode cost per span: the vectorised path (collector_ext/arrow_columns.py) against the Python
one (columns.py) on bench/payloads.py's requests, and the hand-off from decode workers.

    python -m bench.decode [--requests 20] [--spans 1000] [--runs 7]
    python -m bench.decode --handoff [--workers 2]
    python -m bench.decode --sizes

The first form converts the same requests with both paths in one process, alternating, and
prints the median CPU µs per span of each (and wall µs, which the machine's load inflates)
and their ratio. `--handoff` runs the requests through a pool of spawned workers as `serve`
does and compares pickling the SpanBatch with Arrow IPC through /dev/shm, each with and
without gc.freeze in the workers: CPU µs per span in the server process and in the workers.
`--sizes` prints both paths' CPU per request from 10 to 3000 spans (where MIN_SPANS comes from).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from bench.payloads import encoded_requests
from collector_ext import arrow_columns, decoder, worker
from collector_ext.decode import PROTOBUF


def standalone(requests: list[bytes], runs: int) -> None:
    spans = sum(decoder.to_span_batch(r, PROTOBUF, "python").accepted for r in requests)
    for r in requests[:2]:
        decoder.to_span_batch(r, PROTOBUF, "auto")
    cpu: dict[str, list[float]] = {"python": [], "auto": []}
    wall: dict[str, list[float]] = {"python": [], "auto": []}
    for _ in range(runs):
        for mode in cpu:
            t, c = time.perf_counter(), time.process_time()
            for r in requests:
                decoder.to_span_batch(r, PROTOBUF, mode)
            cpu[mode].append((time.process_time() - c) / spans * 1e6)
            wall[mode].append((time.perf_counter() - t) / spans * 1e6)
    ratios = [a / p for a, p in zip(cpu["auto"], cpu["python"])]
    print(f"{len(requests)} requests, {spans} spans, {runs} runs; load average {os.getloadavg()[0]:.1f}")
    for mode, label in (("python", "python (columns.py)"), ("auto", "vectorised (arrow_columns.py)")):
        print(
            f"  {label:31s} CPU {statistics.median(cpu[mode]):5.2f} µs/span "
            f"(min {min(cpu[mode]):5.2f})  wall {statistics.median(wall[mode]):5.2f}"
        )
    print(f"  ratio vectorised/python (CPU, per run): median {statistics.median(ratios):.2f}")
    print(f"  requests by path: {decoder.counts}")


def sizes(runs: int) -> None:
    """Where the vectorised path starts to pay: CPU per request and per span by request size."""
    print(f"load average {os.getloadavg()[0]:.1f}; both paths forced (MIN_SPANS = 0)")
    arrow_columns.MIN_SPANS = 0
    for n in (10, 100, 300, 1000, 3000):
        requests = encoded_requests(max(3, 5000 // n), n)
        cpu: dict[str, list[float]] = {"python": [], "auto": []}
        for _ in range(runs):
            for mode in cpu:
                c = time.process_time()
                for r in requests:
                    decoder.to_span_batch(r, PROTOBUF, mode)
                cpu[mode].append((time.process_time() - c) / len(requests) * 1e3)
        p, a = statistics.median(cpu["python"]), statistics.median(cpu["auto"])
        print(
            f"  {n:5d} spans/request: python {p:6.2f} ms ({p / n * 1e3:6.2f} µs/span)  "
            f"vectorised {a:6.2f} ms ({a / n * 1e3:6.2f} µs/span)  ratio {a / p:.2f}"
        )


def _pickled(body: bytes, mode: str):
    return decoder.to_span_batch(body, PROTOBUF, mode)


def _shipped(body: bytes, mode: str):
    return worker.ship(decoder.to_span_batch(body, PROTOBUF, mode))


def _warm(_: int) -> int:
    return os.getpid()


def handoff(requests: list[bytes], runs: int, workers: int) -> None:
    import psutil

    spans = sum(decoder.to_span_batch(r, PROTOBUF, "python").accepted for r in requests)
    print(f"{len(requests)} requests, {spans} spans, {workers} workers, {runs} runs")
    for freeze in (False, True):
        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker.freeze_imports if freeze else None,
        )
        list(pool.map(_warm, range(workers * 4)))
        kids = [psutil.Process(p) for p in pool._processes]  # every worker, busy or not
        for fn in (_pickled, _shipped):
            for r in requests[:workers]:
                pool.submit(fn, r, "auto").result()
        results: dict[str, list[tuple[float, float, float]]] = {}
        for _ in range(runs):
            for mode in ("python", "auto"):
                for name, fn, receive in (("pickle", _pickled, None), ("ipc+shm", _shipped, worker.receive)):
                    k0 = sum(sum(k.cpu_times()[:2]) for k in kids)
                    t, c = time.perf_counter(), time.process_time()
                    futures = [pool.submit(fn, r, mode) for r in requests]
                    for f in futures:
                        batch = f.result()
                        if receive is not None:
                            batch = receive(batch)
                    main = (time.process_time() - c) / spans * 1e6
                    kids_cpu = (sum(sum(k.cpu_times()[:2]) for k in kids) - k0) / spans * 1e6
                    wall = (time.perf_counter() - t) / spans * 1e6
                    results.setdefault(f"{mode:6s} {name:7s}", []).append((main, kids_cpu, wall))
        pool.shutdown()
        print(f" gc.freeze in workers: {freeze}; load average {os.getloadavg()[0]:.1f}")
        for key, rows in results.items():
            main, kids_cpu, wall = (statistics.median(r[i] for r in rows) for i in range(3))
            print(
                f"  {key}  server CPU {main:5.2f}  workers CPU {kids_cpu:5.2f}  total {main + kids_cpu:5.2f}"
                f"  wall {wall:5.2f} µs/span"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--spans", type=int, default=1000, help="spans per request")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--handoff", action="store_true", help="measure the worker hand-off instead")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sizes", action="store_true", help="cost by request size (10 to 3000 spans)")
    args = parser.parse_args()
    if args.sizes:
        return sizes(args.runs)
    requests = encoded_requests(args.requests, args.spans)
    if args.handoff:
        handoff(requests, args.runs, args.workers)
    else:
        standalone(requests, args.runs)


if __name__ == "__main__":
    main()
