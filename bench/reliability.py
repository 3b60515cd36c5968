"""Is a confidence a promise? Simulate a family of scenarios whose parameters are drawn at random
per run, audit each with no confidence threshold, and score every named parent per protocol in
confidence bins: of the links given confidence c, about c must be right.

    python -m bench.reliability [--runs 24] [--seed 1] [--in-flight N] [--json reliability.json]
    python -m bench.reliability --handoff-check [--no-wait]   # in-process breaks, 50 in flight

Each run draws: the entry rate (20-1,000 requests/s); per hop the calls in flight (1-1,000,
bounded by the rate times 2 s), so the callee's duration; the network legs' median and jitter;
each service's clock skew; the drop probability per hop; the sampling probabilities (gateway
25-100%, callees' own roots 50-100%); Kafka's lag; the thread pool's hand-off delay and jitter.
Hops: HTTP with a URL path, HTTP without one (the client records no url.full), gRPC, a custom
RPC (timing alone), Kafka (partition + offset on both sides), and an in-process thread-pool
break after a fixed step. The target: every bin with at least 100 links has an observed
precision of at least its lower edge - 0.02; links at or above the default --min-confidence
are at least 98% right.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from collections import defaultdict

import duckdb

from audit.cli import DbSink
from audit.engine import AuditConfig, AuditWindow, run_audit
from audit.scenarios.model import Scenario
from audit.scenarios.simulate import Simulator

BINS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0001)
# the callee of each hop names the protocol scored
HOPS = {
    "web": "http (path)",
    "api": "http (no path)",
    "grpcsvc": "grpc",
    "rpcsvc": "rpc (keyless)",
    "consumer": "kafka",
}
BREAK = "in-process"


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _latency(rng: random.Random, median: float, jitter: tuple[float, float] = (1.5, 30.0)) -> dict:
    return {"median": median, "p99": median * _log_uniform(rng, *jitter)}


def random_scenario(rng: random.Random, name: str, in_flight: float | None = None) -> tuple[Scenario, dict]:
    """One draw of the family, and the parameters drawn (for the report). `in_flight`: every
    hop has that many calls in flight (the entry rate drawn high enough for it)."""
    rate = _log_uniform(rng, max(20, (in_flight or 0) / 2), 1000)
    duration = min(max(2500 / rate, 3.0), 60.0)
    skew_ms = rng.choice([0.0, 2.0, 20.0])
    params: dict = {"rate_per_s": round(rate, 1), "duration_s": round(duration, 1), "skew_ms": skew_ms}

    def callee(in_flight: float, ops: dict) -> dict:
        return {
            "sampler": {"type": "parent_based", "probability": rng.choice([0.5, 1.0])},
            "clock_skew_ms": rng.gauss(0.0, skew_ms),
            "operations": ops,
        }

    def hop_duration(label: str) -> dict:
        drawn = min(_log_uniform(rng, 1, 1000), rate * 2.0)
        median = max((in_flight or drawn) / rate * 1000.0, 0.05)  # ms
        params[f"in_flight {label}"] = round(in_flight or drawn, 1)
        return _latency(rng, median, (1.5, 10.0))

    def drop(cause: str) -> dict:
        return {"probability": rng.choice([0.3, 0.6, 1.0]), "cause": cause}

    def net() -> dict:
        return _latency(rng, _log_uniform(rng, 0.1, 5.0))

    handoff = _latency(rng, _log_uniform(rng, 0.02, 2.0), (1.2, 10.0))
    params["handoff_ms"] = {k: round(v, 3) for k, v in handoff.items()}
    waits = rng.random() < 0.5
    params["handler_waits"] = waits
    services = {
        "gateway": {
            "sampler": {"type": "parent_based", "probability": rng.choice([0.25, 0.5, 1.0])},
            "operations": {
                "GET /page": {
                    "duration_ms": {"median": 0.5, "p99": 5},
                    "calls": [
                        {
                            "to": "web",
                            "protocol": "http",
                            "operation": "GET /web/{id}",
                            "latency_ms": net(),
                            "drop": drop("proxy_strips_traceparent"),
                        },
                        {
                            "to": "api",
                            "protocol": "http",
                            "operation": "GET /api/items",
                            "record_url": False,
                            "latency_ms": net(),
                            "drop": drop("client_does_not_inject"),
                        },
                        {
                            "to": "grpcsvc",
                            "protocol": "grpc",
                            "operation": "shop.Grpc/Call",
                            "latency_ms": net(),
                            "drop": drop("grpc_client_not_instrumented"),
                        },
                        {
                            "to": "rpcsvc",
                            "protocol": "rpc",
                            "operation": "shop.Custom/Call",
                            "latency_ms": net(),
                            "drop": drop("custom_rpc_no_context"),
                        },
                        {
                            "to": "consumer",
                            "protocol": "kafka",
                            "operation": "events",
                            "kafka_lag_ms": _latency(rng, _log_uniform(rng, 1.0, 200.0)),
                            "drop": drop("producer_does_not_inject"),
                        },
                        {"to": "worker", "protocol": "http", "operation": "POST /work", "latency_ms": net()},
                    ],
                }
            },
        },
        "web": callee(0, {"GET /web/{id}": {"duration_ms": hop_duration("http (path)")}}),
        "api": callee(0, {"GET /api/items": {"duration_ms": hop_duration("http (no path)")}}),
        "grpcsvc": callee(0, {"shop.Grpc/Call": {"duration_ms": hop_duration("grpc")}}),
        "rpcsvc": callee(0, {"shop.Custom/Call": {"duration_ms": hop_duration("rpc (keyless)")}}),
        "consumer": callee(0, {"events": {"duration_ms": {"median": 1, "p99": 10}}}),
        "worker": callee(
            0,
            {
                "POST /work": {
                    "duration_ms": hop_duration(BREAK),
                    "calls": [
                        {"to": "users-db", "protocol": "db", "operation": "SELECT", "latency_ms": net()},
                        {
                            "to": "mail.example",
                            "protocol": "external",
                            "operation": "/send",
                            "latency_ms": net(),
                            "drop": {
                                "probability": 1.0,
                                "cause": "thread_pool_no_context",
                                "where": "thread_pool",
                                "handoff_ms": handoff,
                                "handler_waits": waits,
                            },
                        },
                        {"to": "users-db", "protocol": "db", "operation": "UPDATE", "latency_ms": net()},
                    ],
                }
            },
        ),
    }
    doc = {
        "name": name,
        "duration_s": duration,
        "services": services,
        "entrypoints": [{"service": "gateway", "operation": "GET /page", "rate_per_s": rate}],
    }
    return Scenario.model_validate(doc), params


def handoff_scenario(in_flight: float = 50.0, handoff_ms: float = 1.0, waits: bool = True) -> Scenario:
    """Issue 14's case: a thread pool losing context `handoff_ms` after the handler's previous
    step, `in_flight` requests in the handler, every request sampled."""
    rate = 500.0
    median = in_flight / rate * 1000.0  # ms: the handler spends it in two halves around its calls
    doc = {
        "name": "handoff",
        "duration_s": 6,
        "services": {
            "worker": {
                "operations": {
                    "POST /work": {
                        "duration_ms": {"median": median, "p99": median * 3},
                        "calls": [
                            {"to": "users-db", "protocol": "db", "operation": "SELECT"},
                            {
                                "to": "mail.example",
                                "protocol": "external",
                                "operation": "/send",
                                "drop": {
                                    "probability": 1.0,
                                    "cause": "thread_pool_no_context",
                                    "where": "thread_pool",
                                    "handoff_ms": {"median": handoff_ms, "p99": handoff_ms * 2},
                                    "handler_waits": waits,
                                },
                            },
                            {"to": "users-db", "protocol": "db", "operation": "UPDATE"},
                        ],
                    }
                }
            }
        },
        "entrypoints": [{"service": "worker", "operation": "POST /work", "rate_per_s": rate}],
    }
    return Scenario.model_validate(doc)


def simulate(path: str, scenario: Scenario, seed: int) -> dict:
    """Store the scenario's spans; return the truth of the spans that lost their context."""
    sink = DbSink(path)
    truth: dict = {}
    exported: set = set()
    for request, records in Simulator(scenario, seed=seed).run():
        sink.send(request.SerializeToString())
        for r in records:
            if r.exported:
                exported.add((r.trace_id, r.span_id))
            if r.cause is not None and r.parent_span_id is None:
                callee = r.hop.split("->")[1] if r.kind in ("SERVER", "CONSUMER") else None
                label = HOPS.get(callee, callee) if callee else BREAK
                truth[(r.trace_id, r.span_id)] = (label, (r.true_parent_trace_id, r.true_parent_span_id))
    sink.close()
    # a break's truth parent is the handler's span; every other truth parent is the exit
    return {k: (label, parent, parent in exported) for k, (label, parent) in truth.items()}


def links(path: str, truth: dict) -> list[tuple[str, float, bool]]:
    """(protocol, confidence, right) for every parent named with no threshold; and the orphans."""
    con = duckdb.connect(path)
    lo, hi = con.execute("SELECT min(start_ns), max(start_ns) + 1 FROM spans").fetchone()
    doc = run_audit(con, AuditWindow(lo, hi), AuditConfig(min_confidence=0.0)).to_dict()
    con.close()
    out = []
    for f in doc["findings"]:
        if f["kind"] not in ("orphan_root", "in_process_break"):
            continue
        t = truth.get((f["trace_id"], f["span_id"]))
        p = f["probable_parent"]
        if t is None:
            continue
        label, parent, stored = t
        if p is None:
            out.append((label, -1.0, False, stored))
        else:
            out.append((label, p["confidence"], (p["trace_id"], p["span_id"]) == parent, stored))
    return out


def table(rows: list, min_confidence: float) -> dict:
    by = defaultdict(lambda: [[0, 0] for _ in BINS[:-1]])
    overall = defaultdict(lambda: [0, 0, 0])  # named at the default, right, parent stored
    for label, c, right, stored in rows:
        for group in (label, "all"):
            if c >= 0:
                k = next(i for i in range(len(BINS) - 1) if BINS[i] <= c < BINS[i + 1])
                by[group][k][0] += 1
                by[group][k][1] += right
            o = overall[group]
            if c >= min_confidence:
                o[0] += 1
                o[1] += right
            o[2] += stored
    return {"bins": dict(by), "at_default": dict(overall)}


def report(t: dict, min_confidence: float) -> bool:
    ok = True
    print(
        f"\n{'protocol':<16} "
        + " ".join(f"{BINS[i]:.2f}-{min(BINS[i + 1], 1):.2f}".rjust(17) for i in range(1, len(BINS) - 1))
    )
    for group, bins in sorted(t["bins"].items()):
        cells = []
        for i in range(1, len(BINS) - 1):
            n, right = bins[i]
            if n == 0:
                cells.append("-".rjust(17))
                continue
            prec = right / n
            bad = n >= 100 and prec < BINS[i] - 0.02
            ok &= not bad
            cells.append(f"{prec:.3f} ({n}){'!' if bad else ''}".rjust(17))
        print(f"{group:<16} " + " ".join(cells))
    print(f"\nat --min-confidence {min_confidence}: precision / recall (of orphans whose parent is stored)")
    for group, (named, right, stored) in sorted(t["at_default"].items()):
        prec = right / named if named else float("nan")
        rec = right / stored if stored else float("nan")
        if group == "all":
            ok &= named == 0 or prec >= 0.98
        print(f"  {group:<16} {prec:.4f} ({right}/{named})  recall {rec:.4f} ({stored} stored)")
    return ok


FLIGHT_BANDS = (0, 30, 100, 300, 1001)


def by_concurrency(rows: list, min_confidence: float) -> dict:
    """{protocol: {band: [named, right, stored]}} at the default, by the hop's calls in flight."""
    out: dict = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))
    for label, c, right, stored, flight in rows:
        if flight is None:
            continue
        k = next(i for i in range(len(FLIGHT_BANDS) - 1) if flight < FLIGHT_BANDS[i + 1])
        cell = out[label][f"{FLIGHT_BANDS[k]}-{FLIGHT_BANDS[k + 1] - (k == len(FLIGHT_BANDS) - 2)}"]
        cell[0] += c >= min_confidence
        cell[1] += right and c >= min_confidence
        cell[2] += stored
    return {label: dict(bands) for label, bands in out.items()}


def report_concurrency(t: dict) -> None:
    print("\nby calls in flight on the hop: precision / recall (links named at the default)")
    for label, bands in sorted(t.items()):
        cells = []
        for band, (named, right, stored) in sorted(bands.items(), key=lambda kv: int(kv[0].split("-")[0])):
            prec = f"{right / named:.3f}" if named else "-"
            rec = f"{right / stored:.3f}" if stored else "-"
            cells.append(f"{band}: {prec} / {rec} ({stored})")
        print(f"  {label:<16} " + "   ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=24)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--min-confidence", type=float, default=AuditConfig().min_confidence)
    ap.add_argument("--handoff-check", action="store_true", help="only the in-process case of issue 14")
    ap.add_argument(
        "--no-wait", action="store_true", help="with --handoff-check: the handler goes on at once"
    )
    ap.add_argument("--json", help="write the runs' parameters and the table here")
    ap.add_argument("--in-flight", type=float, help="every hop with this many calls in flight (1-1,000)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    rows, runs, flights = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(1 if args.handoff_check else args.runs):
            if args.handoff_check:
                scenario = handoff_scenario(waits=not args.no_wait)
                params = {"in_flight": 50, "handoff_ms": 1.0, "handler_waits": not args.no_wait}
            else:
                scenario, params = random_scenario(rng, f"reliability-{run}", args.in_flight)
            path = os.path.join(tmp, f"run-{run}.duckdb")
            t = time.perf_counter()
            truth = simulate(path, scenario, args.seed * 1000 + run)
            got = links(path, truth)
            rows += got
            flights += [(*g, params.get(f"in_flight {g[0]}")) for g in got]
            named = sum(c >= args.min_confidence for _, c, _, _ in got)
            right = sum(r for _, c, r, _ in got if c >= args.min_confidence)
            print(
                f"run {run}: {params}  {len(truth)} lost, {named} named, {right} right "
                f"({time.perf_counter() - t:.0f} s)",
                file=sys.stderr,
            )
            runs.append(params | {"lost": len(truth), "named": named, "right": right})
            os.remove(path)
    t = table(rows, args.min_confidence)
    ok = report(t, args.min_confidence)
    report_concurrency(by_concurrency(flights, args.min_confidence))
    print("\ntarget met" if ok else "\ntarget NOT met")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"runs": runs, "table": t, "concurrency": by_concurrency(flights, args.min_confidence)},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
