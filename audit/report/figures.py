"""The figures a report states, from an audit's result document (docs/audit-json.md, findings
not needed): the headline figures, every hop with its cause and fix, and the services. The
same figures are the report's history, what the next report compares with, and what the CI
gate's thresholds name."""

from __future__ import annotations

from ..contract.causes import CAUSES
from ..contract.figures import context_health, orphan_rate

# headline figures: name -> what it is (the report and the gate's grammar list them)
HEADLINE = {
    "context_health": "stored calls between instrumented services whose context reached the callee, "
    "as a share",
    "orphan_rate": "orphan roots / all roots (entry roots and orphan roots)",
    "broken_hops": "hops (caller, callee, protocol) with at least one call that lost its context",
    "findings": "findings of every kind",
    "orphan_roots": "orphan roots",
    "in_process_breaks": "in-process breaks",
    "dangling_parents": "spans whose parent was never stored",
    "unpaired_exits": "calls out whose callee side was never stored",
    "stitched": "findings linked to a probable parent",
    "spans": "spans audited",
    "traces": "traces audited",
    "fragmentation_factor": "trace fragments per request (sampling.md)",
    "trace_completeness": "stored requests whole in one trace, as a share (sampling.md)",
    "hidden_error_share": "errors in fragments, as a share of all errors (sampling.md)",
    "latency_undercount": "how much longer fragmented requests last than their entry trace shows (median)",
}
_KINDS = {
    "orphan_roots": "orphan_root",
    "in_process_breaks": "in_process_break",
    "dangling_parents": "dangling_parent",
    "unpaired_exits": "unpaired_exit",
}
_SAMPLING_OVERALL = ("fragmentation_factor", "trace_completeness", "hidden_error_share", "latency_undercount")
# per-hop figures from the sampling pass (value, with a 95% interval)
HOP_SAMPLING = ("conditional_capture_rate", "upstream_missing_share", "volume_ratio")


def headline(doc: dict) -> dict[str, float | int | None]:
    run, edges = doc["run"], doc["edges"]
    overall = (doc.get("sampling") or {}).get("overall") or {}
    figures = {
        "context_health": context_health(edges),
        "orphan_rate": orphan_rate(run["roots"]),
        "broken_hops": sum(1 for e in edges if e["broken"]),
        "findings": sum(run["counts"].values()),
        **{name: run["counts"].get(kind, 0) for name, kind in _KINDS.items()},
        "stitched": run["stitched"],
        "spans": run["spans"],
        "traces": run["traces"],
    }
    for name in _SAMPLING_OVERALL:
        figures[name] = (overall.get(name) or {}).get("value")
    return figures


def hops(doc: dict) -> list[dict]:
    """Every hop, the broken ones first and worst (most calls dropped) first, with the cause's
    explanation and fix and the hop's sampling figures."""
    sampled = {
        (s["caller"], s["callee"], s["protocol"]): s for s in (doc.get("sampling") or {}).get("edges", [])
    }
    out = []
    for e in doc["edges"]:
        cause = CAUSES.get(e["cause"]) if e.get("cause") else None
        hop = {
            k: e[k]
            for k in (
                "caller",
                "callee",
                "protocol",
                "system",
                "callee_instrumented",
                "calls",
                "propagated",
                "stitched",
                "dropped",
                "propagation_rate",
                "broken",
                "cause",
            )
        }
        hop["explanation"], hop["fix"] = (cause.explanation, cause.fix) if cause else (None, None)
        s = sampled.get((e["caller"], e["callee"], e["protocol"]), {})
        for name in HOP_SAMPLING:
            hop[name] = s.get(name)  # {"value", "ci_low", "ci_high", ...} or None
        out.append(hop)
    return sorted(
        out, key=lambda h: (not h["broken"], -h["dropped"], h["caller"], h["callee"], h["protocol"])
    )


def services(doc: dict) -> list[dict]:
    """Per service: its roots, its orphan rate, and its sampling figures."""
    sampled = {s["service"]: s for s in (doc.get("sampling") or {}).get("services", [])}
    out = []
    for name, r in sorted(doc["run"]["roots"].items()):
        orphans, entries = r.get("orphan", 0), r.get("entry", 0)
        s = sampled.get(name, {})
        out.append(
            {
                "service": name,
                "entry_roots": entries,
                "orphan_roots": orphans,
                "orphan_rate": orphan_rate(r),
                "root_inflation": (s.get("root_inflation") or {}).get("value"),
                "parent_based": s.get("parent_based"),
            }
        )
    return out
