"""Audit accuracy against ground truth: detection, stitching and edges, per protocol and per
concurrency level, on simulator scenarios (and on a demo-fleet store, if given).

    python -m bench.accuracy [--scenario shop-busy] [--scales 0.05,0.25,1] [--seed 1]
                             [--fleet-db demo-data/ctxaudit-demo.duckdb
                              --fleet-truth demo-data/ground-truth.jsonl]
                             [--json accuracy.json]

Each scale multiplies the scenario's entry rates, so the number of calls in flight on each
broken edge grows with it; the in-flight figure printed is measured from the stored spans.
Published anchors: TraceWeaver (SIGCOMM 2024) ~90% from timing alone; DeepTrace (SIGCOMM 2025) >95%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import duckdb

from audit.cli import DbSink
from audit.engine import AuditWindow, run_audit
from audit.scenarios.model import load_scenario
from audit.scenarios.output import read_truth
from audit.scenarios.score import exit_peers, score
from audit.scenarios.simulate import Simulator

# calls in flight on each edge with orphans: for each stored exit, the stored exits of the same
# caller and target overlapping its start, scaled up by the caller's sampling probability
_IN_FLIGHT = """
WITH e AS (SELECT trace_id, service_name AS caller,
                  coalesce(server_address, messaging_destination) AS target, start_ns, end_ns,
                  (72057594037927936 - coalesce(sampling_threshold, 0)) / 72057594037927936 AS p
           FROM spans WHERE kind IN ('CLIENT', 'PRODUCER') AND protocol <> 'db'),
     s AS (SELECT * FROM e USING SAMPLE 2000 ROWS)
SELECT s.caller, s.target, avg(n / s.p) FROM (
  SELECT s.caller, s.target, s.p, (SELECT count(*) FROM e WHERE e.caller = s.caller AND e.target = s.target
                                    AND e.start_ns <= s.start_ns AND e.end_ns >= s.start_ns) AS n
  FROM s) s GROUP BY ALL ORDER BY 3 DESC
"""


def simulate_into(path: str, scenario, seed: int) -> list[dict]:
    sink = DbSink(path)
    truth = []
    for request, records in Simulator(scenario, seed=seed).run():
        sink.send(request.SerializeToString())
        truth.extend(r.to_dict() for r in records)
    sink.close()
    return truth


def audit_and_score(path: str, truth: list[dict]) -> tuple[dict, dict, list]:
    con = duckdb.connect(path)
    lo, hi = con.execute("SELECT min(start_ns), max(start_ns) + 1 FROM spans").fetchone()
    result = run_audit(con, AuditWindow(lo, hi)).to_dict()
    peers = exit_peers(con)
    in_flight = con.execute(_IN_FLIGHT).fetchall()
    con.close()
    return result, score(truth, result, peers).summary(), in_flight


def _fmt(x) -> str:
    return "  n/a " if x is None else f"{x:6.4f}"


def report(label: str, result: dict, summary: dict, in_flight: list) -> None:
    run = result["run"]
    print(f"\n== {label}: {run['spans']:,} spans, {run['traces']:,} traces, audit {run['seconds']:.1f} s")
    busiest = ", ".join(f"{c}->{t} {n:.0f}" for c, t, n in in_flight[:6])
    print(f"   calls in flight (busiest edges): {busiest}")
    for kind, d in summary["detection"].items():
        print(
            f"   detect {kind:<17} precision {_fmt(d['precision'])} recall {_fmt(d['recall'])} (n={d['n']})"
        )
    for group, s in sorted(summary["stitching"].items()):
        print(
            f"   stitch {group:<17} precision {_fmt(s['precision'])} recall {_fmt(s['recall'])} "
            f"(n={s['orphans_parent_stored']})  abstention {_fmt(s['abstention'])} "
            f"(n={s['orphans_parent_not_stored']})"
        )
    print(f"   cause codes right: {_fmt(summary['cause_accuracy'])}")
    worst = max(
        (abs(e["true_rate"] - e["found_rate"]) for e in summary["edges"] if e["found_rate"] is not None),
        default=0.0,
    )
    missed = [
        f"{e['caller']}->{e['callee']}" for e in summary["edges"] if e["broken"] and not e["found_broken"]
    ]
    false = [
        f"{e['caller']}->{e['callee']}" for e in summary["edges"] if e["found_broken"] and not e["broken"]
    ]
    print(
        f"   edges: {sum(e['broken'] for e in summary['edges'])} broken in truth; missed {missed or 'none'}; "
        f"false {false or 'none'}; worst propagation-rate error {worst:.4f}"
    )
    for e in summary["edges"]:
        if e["broken"] or e["found_broken"]:
            print(
                f"     {e['caller']:>14} -> {e['callee']:<24} truth {e['true_rate']:.4f} "
                f"found {_fmt(e['found_rate'])}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="shop-busy")
    ap.add_argument("--scales", default="0.05,0.25,1", help="entry-rate multipliers, comma-separated")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fleet-db", help="a store written by `ctxaudit demo`")
    ap.add_argument("--fleet-truth", help="the fleet's ground truth")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()
    base = load_scenario(args.scenario)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (float(s) for s in args.scales.split(",")):
            scenario = base.model_copy(
                update={
                    "entrypoints": [
                        e.model_copy(update={"rate_per_s": e.rate_per_s * scale}) if e.rate_per_s else e
                        for e in base.entrypoints
                    ]
                }
            )
            path = os.path.join(tmp, f"scale-{scale}.duckdb")
            t = time.perf_counter()
            truth = simulate_into(path, scenario, args.seed)
            print(f"simulated {args.scenario} x{scale} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            result, summary, in_flight = audit_and_score(path, truth)
            report(f"{args.scenario} x{scale}", result, summary, in_flight)
            out[f"{args.scenario}x{scale}"] = summary | {"in_flight": in_flight}
    if args.fleet_db:
        result, summary, in_flight = audit_and_score(args.fleet_db, list(read_truth(args.fleet_truth)))
        report("demo fleet", result, summary, in_flight)
        out["fleet"] = summary
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
