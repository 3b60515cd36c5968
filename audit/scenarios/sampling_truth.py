"""The true values of the sampling figures (docs/sampling.md), from a simulation's ground truth:
every generated span, exported or not. Used by bench/sampling_accuracy.py and the tests."""

from __future__ import annotations

import statistics
from collections import defaultdict

_PROTOCOL = {"kafka": "messaging"}


def truth_figures(truth: list[dict]) -> dict[tuple, float]:
    """{(figure, key): true value} from every generated span."""
    by_id = {t["span_id"]: t for t in truth}
    edges: dict[tuple, list[int]] = defaultdict(
        lambda: [0] * 6
    )  # calls, kept, exit stored, both, orphans, no up
    for t in truth:
        parent = by_id.get(t["true_parent_span_id"])
        if (
            t["kind"] not in ("SERVER", "CONSUMER")
            or parent is None
            or parent["kind"] not in ("CLIENT", "PRODUCER")
        ):
            continue
        e = edges[(parent["service"], t["service"], _PROTOCOL.get(t["protocol"], t["protocol"]))]
        e[0] += 1
        e[1] += t["parent_span_id"] is not None or t["linked"]
        if parent["exported"]:
            e[2] += 1
            e[3] += t["exported"]
        if t["parent_span_id"] is None and not t["linked"] and t["exported"]:
            e[4] += 1
            e[5] += not parent["exported"]
    out: dict[tuple, float] = {}
    for key, (calls, kept, exit_stored, both, orphans, no_up) in edges.items():
        out[("propagation_rate", key)] = kept / calls
        if exit_stored:
            out[("conditional_capture_rate", key)] = both / exit_stored
        if orphans:
            out[("upstream_missing_share", key)] = no_up / orphans
        out[("volume_ratio", key)] = 1.0  # one exit and one entry per call: the true totals agree

    requests: dict[int, list[dict]] = defaultdict(list)
    for t in truth:
        requests[t["request_id"]].append(t)
    root_cause = {t["trace_id"]: t["cause"] is not None for t in truth if t["parent_span_id"] is None}
    fragments = complete = stored_entries = 0
    undercounts = []
    for spans in requests.values():
        fragments += 1 + sum(t["cause"] is not None for t in spans)
        entry = next(t for t in spans if t["true_parent_span_id"] is None)
        if not entry["exported"]:
            continue
        stored_entries += 1
        complete += all(t["exported"] and t["cause"] is None for t in spans)
        trace_end = max(t["end_ns"] for t in spans if t["exported"] and t["trace_id"] == entry["trace_id"])
        fragment_ends = [t["end_ns"] for t in spans if t["exported"] and root_cause.get(t["trace_id"])]
        if fragment_ends:
            real_end = max(trace_end, *fragment_ends)
            undercounts.append((real_end - trace_end) / (real_end - entry["start_ns"]))
    errors = [t for t in truth if t["error"]]
    out[("fragmentation_factor", ())] = fragments / len(requests)
    out[("trace_completeness", ())] = complete / stored_entries
    if errors:
        out[("hidden_error_share", ())] = sum(bool(root_cause.get(t["trace_id"])) for t in errors) / len(
            errors
        )
    if undercounts:
        out[("latency_undercount", ())] = statistics.median(undercounts)
    services: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t in truth:
        services[t["service"]][0] += 1
        services[t["service"]][1] += t["exported"]
    for name, (spans, exported) in services.items():
        out[("sampling_probability", (name,))] = exported / spans
    return out
