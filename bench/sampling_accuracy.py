"""Sampling figures against ground truth: for each scenario and seed, simulate, audit, and
compare every per-edge and overall figure (and each service's sampling probability) with the
truth computed from every generated span, exported or not.

    python -m bench.sampling_accuracy [--seeds 20] [--jobs 2] [--scenario FILE ...]
                                      [--markdown table.md] [--json rows.json]

Criteria (issue 5): proportions within 0.03 absolute where n >= 5000, ratios within 5%
relative; the 95% intervals cover the truth in at least 90% of seeds. Truth is this run's
realized value (e.g. the share of all calls on the edge, sampled or not, that kept context).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from multiprocessing import Pool
from pathlib import Path

import duckdb

from audit.engine import AuditWindow, run_audit
from audit.scenarios.model import load_scenario
from audit.scenarios.sampling_truth import truth_figures
from bench.accuracy import simulate_into

SCENARIOS = sorted(str(p) for p in (Path(__file__).parent / "scenarios").glob("sampling-*.yaml"))
PROPORTIONS = {
    "propagation_rate",
    "conditional_capture_rate",
    "upstream_missing_share",
    "trace_completeness",
    "hidden_error_share",
    "latency_undercount",
}
EDGE_FIGURES = ("propagation_rate", "conditional_capture_rate", "upstream_missing_share", "volume_ratio")
OVERALL_FIGURES = ("fragmentation_factor", "trace_completeness", "hidden_error_share", "latency_undercount")


def estimated_figures(sampling: dict) -> dict[tuple, dict]:
    out = {}
    for e in sampling["edges"]:
        for figure in EDGE_FIGURES:
            out[(figure, (e["caller"], e["callee"], e["protocol"]))] = e[figure]
    for figure in OVERALL_FIGURES:
        out[(figure, ())] = sampling["overall"][figure]
    for s in sampling["services"]:
        out[("sampling_probability", (s["service"],))] = s["sampling_probability"]
    return out


def run_one(task: tuple[str, int]) -> list[dict]:
    scenario_path, seed = task
    scenario = load_scenario(scenario_path)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store.duckdb")
        truth = simulate_into(path, scenario, seed)
        con = duckdb.connect(path)
        lo, hi = con.execute("SELECT min(start_ns), max(start_ns) + 1 FROM spans").fetchone()
        started = time.monotonic()
        result = run_audit(con, AuditWindow(lo, hi))
        seconds = time.monotonic() - started
        con.close()
    true, estimated = truth_figures(truth), estimated_figures(result.sampling)
    rows = []
    for (figure, key), value in sorted(true.items()):
        est = estimated.get((figure, key))
        if est is None or est.get("value") is None:
            continue
        rows.append(
            {
                "scenario": scenario.name,
                "seed": seed,
                "figure": figure,
                "key": " -> ".join(key[:2]) + (f" ({key[2]})" if len(key) > 2 else ""),
                "truth": value,
                "estimate": est["value"],
                "ci_low": est.get("ci_low"),
                "ci_high": est.get("ci_high"),
                "n": est.get("n"),
                "spans": result.spans,
                "audit_s": seconds,
            }
        )
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["scenario"], r["figure"], r["key"])].append(r)
    out = []
    for (scenario, figure, key), rs in sorted(groups.items()):
        proportion = figure in PROPORTIONS
        errors = [
            abs(r["estimate"] - r["truth"]) if proportion else abs(r["estimate"] / r["truth"] - 1) for r in rs
        ]
        with_ci = [r for r in rs if r["ci_low"] is not None]
        covered = sum(r["ci_low"] - 1e-9 <= r["truth"] <= r["ci_high"] + 1e-9 for r in with_ci)
        n = statistics.median(r["n"] or 0 for r in rs)
        checked = (not proportion) or n >= 5000
        limit = 0.03 if proportion else 0.05
        out.append(
            {
                "scenario": scenario,
                "figure": figure,
                "key": key,
                "seeds": len(rs),
                "truth": statistics.fmean(r["truth"] for r in rs),
                "estimate": statistics.fmean(r["estimate"] for r in rs),
                "max_error": max(errors),
                "error_kind": "abs" if proportion else "rel",
                "median_n": n,
                "coverage": covered / len(with_ci) if with_ci else None,
                "accuracy_ok": (max(errors) <= limit) if checked else None,
                "coverage_ok": (covered / len(with_ci) >= 0.9) if with_ci else None,
            }
        )
    return out


def markdown(summary: list[dict]) -> str:
    lines = [
        "| scenario | figure | edge or service | truth (mean) | estimate (mean) | max error | median n | "
        "95% CI coverage |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        error = f"{s['max_error']:.3f}" if s["error_kind"] == "abs" else f"{s['max_error']:.1%} rel"
        if s["accuracy_ok"] is False:
            error += " ✗"
        coverage = (
            "—" if s["coverage"] is None else f"{s['coverage']:.0%}" + (" ✗" if not s["coverage_ok"] else "")
        )
        lines.append(
            f"| {s['scenario'].removeprefix('sampling-')} | `{s['figure']}` | {s['key'] or '(all)'} | "
            f"{s['truth']:.4f} | {s['estimate']:.4f} | {error} | {s['median_n']:,.0f} | {coverage} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenario", action="append", help="scenario file (default: bench/scenarios/sampling-*.yaml)"
    )
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--markdown", help="write the summary table here")
    parser.add_argument("--json", help="write every row (scenario, seed, figure) here")
    args = parser.parse_args()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    tasks = [(s, seed) for s in (args.scenario or SCENARIOS) for seed in seeds]
    rows: list[dict] = []
    started = time.monotonic()
    with Pool(args.jobs) as pool:
        for i, result in enumerate(pool.imap_unordered(run_one, tasks), 1):
            rows.extend(result)
            print(
                f"{i}/{len(tasks)} runs done ({time.monotonic() - started:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    summary = summarize(rows)
    table = markdown(summary)
    print(table)
    failed = [s for s in summary if s["accuracy_ok"] is False or s["coverage_ok"] is False]
    with_ci = [r for r in rows if r["ci_low"] is not None]
    covered = sum(r["ci_low"] - 1e-9 <= r["truth"] <= r["ci_high"] + 1e-9 for r in with_ci)
    print(
        f"\n{len(summary)} figures; {len(failed)} outside the criteria; the 95% intervals cover the truth in "
        f"{covered:,} of {len(with_ci):,} runs ({covered / len(with_ci):.1%})",
        file=sys.stderr,
    )
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
