"""How many stitching candidates an orphan must keep: where its true parent ranks among all of
them by the assignment's own cost, and what capping at K does to precision and recall.

    python -m bench.stitch_topk [--scenario keyless-rpc] [--scales 0.05,0.2,1] [--seconds 20]
                                [--ks 2,4,8,16,32,64] [--seed 1]

For each scale (a multiple of the scenario's entry rates, so of the calls in flight) it
simulates `--seconds` of traffic into a temporary store, builds the candidates uncapped and
ranks each orphan's true parent among them by cost (the timing model's negative
log-likelihood minus path odds, as `stitch` scores them), then audits the store once per K
and scores the parents named on orphans against the truth.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import duckdb
import numpy as np

from audit.cli import DbSink
from audit.engine import AuditConfig, AuditWindow, run_audit, stitch
from audit.engine.learn import learn
from audit.engine.scan import scan
from audit.engine.targets import resolve_exits
from audit.scenarios.model import load_scenario
from audit.scenarios.simulate import Simulator
from bench.accuracy import _IN_FLIGHT

_UNCAPPED = 999_999  # the most min_by keeps


def simulate(path: str, name: str, scale: float, seconds: float, seed: int) -> dict[int, int]:
    """Spans into `path`; the truth: orphan span id -> its true parent's span id."""
    base = load_scenario(name)
    entries = [
        e.model_copy(update={"rate_per_s": e.rate_per_s * scale}) if e.rate_per_s else e
        for e in base.entrypoints
    ]
    scenario = base.model_copy(update={"duration_s": seconds, "entrypoints": entries})
    sink, truth = DbSink(path), {}
    for request, records in Simulator(scenario, seed=seed).run():
        sink.send(request.SerializeToString())
        for r in records:
            if r.cause and r.exported and r.kind in ("SERVER", "CONSUMER") and not r.linked:
                truth[int(r.span_id, 16)] = int(r.true_parent_span_id, 16)
    sink.close()
    return truth


def ranks(path: str, truth: dict[int, int]) -> tuple[np.ndarray, float]:
    """Per orphan with a truth record: its true parent's rank (1 = cheapest) among its uncapped
    candidates, or 0 when the parent is not a candidate at all; and candidates per orphan."""
    con = duckdb.connect(path)
    con.execute("SET enable_progress_bar = false")
    lo, hi = con.execute("SELECT min(start_ns), max(start_ns) + 1 FROM spans").fetchone()
    window, config = AuditWindow(lo, hi), AuditConfig()
    scan(con, window, lambda step: None)
    learned = learn(con, window, config)
    resolve_exits(con, learned)
    stitch.build_candidates(
        con, learned, config.default_skew_ms * 1e6, config.default_max_lag_s * 1e9, per_orphan=_UNCAPPED
    )
    edges = stitch.pair_edges(con)
    cols = con.execute(
        stitch._PAIR_ROWS.replace(
            "SELECT p.oid,", "SELECT o.span_id AS o_span, e.span_id AS e_span, p.oid,", 1
        )
    ).fetchnumpy()
    con.close()
    cost, _ = stitch._costs(cols, learned, edges)
    cost = cost - cols["path_odds"]
    oid = cols["oid"].astype(np.int64)
    order = np.lexsort((cost, oid))
    first = np.r_[True, oid[order][1:] != oid[order][:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - start + 1
    o_span, e_span = cols["o_span"].astype(np.uint64), cols["e_span"].astype(np.uint64)
    true_rank = {}
    for o, e, r in zip(o_span.tolist(), e_span.tolist(), rank.tolist()):
        if truth.get(o) == e:
            true_rank[o] = r
    per_orphan = len(oid) / max(len(np.unique(oid)), 1)
    return np.array([true_rank.get(o, 0) for o in truth]), per_orphan


def audit_with(path: str, truth: dict[int, int], k: int) -> tuple[int, int, float]:
    """(named, right, seconds) over the orphans with a truth record, candidates capped at k."""
    stitch.CANDIDATES_PER_ORPHAN = k
    con = duckdb.connect(path)
    lo, hi = con.execute("SELECT min(start_ns), max(start_ns) + 1 FROM spans").fetchone()
    t = time.perf_counter()
    result = run_audit(con, AuditWindow(lo, hi))
    seconds = time.perf_counter() - t
    con.close()
    f = result.findings
    named = right = 0
    for kind, span, parent in zip(*(f.column(c).to_pylist() for c in ("kind", "span_id", "parent_span_id"))):
        if kind == "orphan_root" and span in truth and parent is not None:
            named += 1
            right += truth[span] == parent
    return named, right, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="keyless-rpc")
    ap.add_argument("--scales", default="0.05,0.2,1")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--ks", default="2,4,8,16,32,64")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    default_k = stitch.CANDIDATES_PER_ORPHAN
    for scale in (float(s) for s in args.scales.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "s.duckdb")
            truth = simulate(path, args.scenario, scale, args.seconds, args.seed)
            con = duckdb.connect(path)
            busiest = con.execute(_IN_FLIGHT).fetchall()[:3]
            con.close()
            r, per_orphan = ranks(path, truth)
            flight = ", ".join(f"{c}->{t} {n:.0f}" for c, t, n in busiest)
            print(f"\n== {args.scenario} x{scale:g}: {len(truth):,} orphans; in flight: {flight}")
            print(
                f"   candidates per orphan (uncapped) {per_orphan:.1f}; true parent not a candidate: "
                f"{np.mean(r == 0):.4f}"
            )
            print("   true parent ranked beyond K: " + ", ".join(f"K={k} {np.mean(r > k):.4f}" for k in ks))
            for k in ks + [_UNCAPPED]:
                named, right, seconds = audit_with(path, truth, k)
                print(
                    f"   K={k if k != _UNCAPPED else 'all':>5}: named {named:,}, right {right:,}, "
                    f"precision {right / max(named, 1):.4f}, recall {right / max(len(truth), 1):.4f}, "
                    f"audit {seconds:.1f} s"
                )
    stitch.CANDIDATES_PER_ORPHAN = default_k


if __name__ == "__main__":
    main()
