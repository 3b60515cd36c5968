"""Overall sampling figures: what lost context does to traces as a whole. How many fragments a
logical request falls into, how many stored requests are whole, how many errors hide in
fragments, and how much shorter fragmented requests look than they were.
Formulas: docs/sampling.md. Reads the run's temp tables: roots, findings, w."""

from __future__ import annotations

import duckdb

from .estimate import median, proportion, ratio, ratio_sums

# roots that begin a fragment: orphans and in-process breaks (with the trace they were stitched to)
_FRAGMENTS = """
CREATE OR REPLACE TEMP TABLE fragments AS
SELECT trace_id, span_id, parent_trace_id FROM findings WHERE kind IN ('orphan_root', 'in_process_break')
"""
# Every root that is not a linked consumer is a fragment or a logical request's entry (a
# request, a job). Fragments cluster with the trace they were stitched to.
_ROOT_UNITS = """
SELECT coalesce(f.parent_trace_id, r.trace_id) AS cluster, adjusted_count(r.th, $assumed) AS w, 1 AS a,
       f.span_id IS NULL AS b
FROM roots r LEFT JOIN fragments f ON f.trace_id = r.trace_id AND f.span_id = r.span_id
WHERE NOT r.linked
"""
# A stored entry trace is whole when nothing is missing from it: no exit the callee did not
# continue, no span whose parent is missing, no fragment stitched back to it.
_COMPLETE = """
WITH incomplete AS (
  SELECT trace_id FROM findings WHERE kind IN ('unpaired_exit', 'dangling_parent')
  UNION SELECT parent_trace_id FROM fragments WHERE parent_trace_id IS NOT NULL)
SELECT r.trace_id AS cluster, 1 AS w, r.trace_id NOT IN (SELECT trace_id FROM incomplete) AS a, 1 AS b
FROM roots r
WHERE NOT r.linked AND NOT EXISTS (SELECT 1 FROM fragments f WHERE f.trace_id = r.trace_id AND f.span_id = r.span_id)
"""
# An error span counts when its trace's root is stored too (else nothing tells a fragment from
# an entry trace). Under consistent sampling both are kept with probability min(p_span, p_root):
# its adjusted count is the larger of the two.
_HIDDEN_ERRORS = """
SELECT e.trace_id AS cluster, greatest(adjusted_count(e.th, $assumed), adjusted_count(r.th, $assumed)) AS w,
       f.span_id IS NOT NULL AS a, 1 AS b
FROM w e
JOIN w r ON r.trace_id = e.trace_id AND r.parent_span_id IS NULL
LEFT JOIN fragments f ON f.trace_id = r.trace_id AND f.span_id = r.span_id
WHERE e.error AND e.start_ns >= $wlo AND e.start_ns < $whi
"""
# Extents of the traces that fragments were stitched to, and of the fragments themselves.
_EXTENTS = """
WITH involved AS (SELECT trace_id FROM fragments UNION SELECT parent_trace_id FROM fragments
                  WHERE parent_trace_id IS NOT NULL)
SELECT (trace_id >> 64)::UBIGINT, (trace_id & 18446744073709551615)::UBIGINT, min(start_ns), max(end_ns)
FROM w WHERE trace_id IN (SELECT trace_id FROM involved) GROUP BY trace_id
"""
_STITCHED = """
SELECT (trace_id >> 64)::UBIGINT, (trace_id & 18446744073709551615)::UBIGINT,
       (parent_trace_id >> 64)::UBIGINT, (parent_trace_id & 18446744073709551615)::UBIGINT
FROM fragments
"""
_KNOWN = """
SELECT count(*), count(th) FROM w WHERE start_ns >= $wlo AND start_ns < $whi
"""


def overall_sampling(con: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int, assumed: float | None) -> dict:
    con.execute(_FRAGMENTS)
    window = {"wlo": start_ns, "whi": end_ns}
    n, num, den, var, _ = ratio_sums(con, _ROOT_UNITS, (), {"assumed": assumed}).get((), (0, 0.0, 0.0, 0.0, 0.0))
    spans, known = con.execute(_KNOWN, window).fetchone()
    return {
        "fragmentation_factor": ratio(n, num, den, var),
        "trace_completeness": _proportion(con, _COMPLETE, {}),
        "hidden_error_share": _proportion(con, _HIDDEN_ERRORS, {"assumed": assumed, **window}),
        "latency_undercount": _latency_undercount(con),
        "spans": spans,
        "known_threshold_share": round(known / spans, 6) if spans else None,
        "assumed_sampling_probability": assumed,
    }


def _proportion(con, units_sql: str, params: dict) -> dict:
    return proportion(*ratio_sums(con, units_sql, (), params).get((), (0, 0.0, 0.0, 0.0, 0.0)))


def _latency_undercount(con: duckdb.DuckDBPyConnection) -> dict:
    """Per stored request with stitched fragments: how much later its last fragment ended than
    its entry trace did, relative to the whole request's duration. The median (and the median
    in ms): robust to the few fragments stitched to the wrong request."""
    extent = {(hi, lo): (start, end) for hi, lo, start, end in con.execute(_EXTENTS).fetchall()}
    parent = {(hi, lo): None if phi is None else (phi, plo)
              for hi, lo, phi, plo in con.execute(_STITCHED).fetchall()}  # fmt: skip
    ends: dict[tuple, int] = {}
    for fragment, up in parent.items():
        t, seen = up, set()
        while t in parent and t not in seen:  # a fragment of a fragment belongs to the same request
            seen.add(t)
            t = parent[t]
        if t is not None and t in extent and fragment in extent:  # t: the request's entry trace
            ends[t] = max(ends.get(t, extent[t][1]), extent[fragment][1])
    relative, absolute = [], []
    for t, real_end in ends.items():
        start, trace_end = extent[t]
        under = max(0, real_end - trace_end)
        relative.append(under / (real_end - start) if real_end > start else 0.0)
        absolute.append(under / 1e6)
    figure = median(relative)
    figure["median_ms"] = median(absolute)["value"]
    return figure
