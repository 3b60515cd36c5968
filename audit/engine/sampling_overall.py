"""Overall sampling figures: what lost context does to traces as a whole. How many fragments a
logical request falls into, how many stored requests are whole, how many errors hide in
fragments, and how much shorter fragmented requests look than they were.
Formulas: docs/sampling.md. Reads the run's temp tables: roots, findings, w."""

from __future__ import annotations

import duckdb

from .estimate import STATS, median, ratio_sums, stat, with_stats

# roots that begin a fragment: orphans and in-process breaks (with the trace they were stitched to)
_FRAGMENTS = """
CREATE OR REPLACE TEMP TABLE fragments AS
SELECT trace_id, span_id, parent_trace_id FROM findings WHERE kind IN ('orphan_root', 'in_process_break');
CREATE OR REPLACE TEMP TABLE root_kinds AS
SELECT r.trace_id, r.th, r.linked, f.span_id IS NOT NULL AS fragment, f.parent_trace_id
FROM roots r LEFT JOIN fragments f ON f.trace_id = r.trace_id AND f.span_id = r.span_id
"""
# Every root that is not a linked consumer is a fragment or a logical request's entry (a
# request, a job). Fragments cluster with the trace they were stitched to.
_ROOT_UNITS = """
SELECT coalesce(parent_trace_id, trace_id) AS cluster, adjusted_count(th, $assumed) AS w, 1 AS a,
  NOT fragment AS b
FROM root_kinds WHERE NOT linked
"""
# A stored entry trace is whole when nothing is missing from it: no exit the callee did not
# continue, no span whose parent is missing, no fragment stitched back to it.
_COMPLETE = """
WITH incomplete AS (
  SELECT trace_id FROM findings WHERE kind IN ('unpaired_exit', 'dangling_parent')
  UNION SELECT parent_trace_id FROM fragments WHERE parent_trace_id IS NOT NULL)
SELECT r.trace_id AS cluster, 1 AS w, i.trace_id IS NULL AS a, 1 AS b
FROM root_kinds r LEFT JOIN incomplete i ON i.trace_id = r.trace_id
WHERE NOT r.linked AND NOT r.fragment
"""
# An error span counts when its trace's root is stored too, in the window (else nothing tells
# a fragment from an entry trace). Under consistent sampling both are kept with probability
# min(p_span, p_root): its adjusted count is the larger of the two.
_HIDDEN_ERRORS = """
SELECT e.trace_id AS cluster, greatest(adjusted_count(e.th, $assumed), adjusted_count(r.th, $assumed)) AS w,
       r.fragment AS a, 1 AS b
FROM w e JOIN root_kinds r ON r.trace_id = e.trace_id
WHERE e.error AND e.start_ns >= $wlo AND e.start_ns < $whi
"""
# Each stitched fragment's request: the entry trace at the top of its chain of stitched parents
# (a fragment of a fragment belongs to the same request). Chains are short: a few rounds.
_TOPS = """
CREATE OR REPLACE TEMP TABLE fragment_tops AS
SELECT DISTINCT trace_id, parent_trace_id AS top FROM fragments WHERE parent_trace_id IS NOT NULL
"""
_CLIMB = """
UPDATE fragment_tops t SET top = p.top FROM fragment_tops p WHERE p.trace_id = t.top AND p.top <> t.trace_id
"""
_CLIMBING = "SELECT count(*) FROM fragment_tops t JOIN fragment_tops p ON p.trace_id = t.top"
# Per request whose top is an entry trace: how much later its last fragment ended than the
# entry trace did, relative to the request's real duration.
_UNDERCOUNT = """
WITH involved AS (SELECT trace_id FROM fragment_tops UNION SELECT top FROM fragment_tops),
extent AS (SELECT trace_id, min(start_ns)::BIGINT AS s, max(end_ns)::BIGINT AS e FROM w
           WHERE trace_id IN (SELECT trace_id FROM involved) GROUP BY trace_id),
requests AS (
  SELECT t.top, max(f.e) AS fragments_end FROM fragment_tops t JOIN extent f ON f.trace_id = t.trace_id
  WHERE t.top NOT IN (SELECT trace_id FROM fragments) GROUP BY t.top)
SELECT greatest(0, r.fragments_end - x.e) / 1e6 AS ms,
       CASE WHEN greatest(r.fragments_end, x.e) > x.s
            THEN greatest(0, r.fragments_end - x.e)
                 / (greatest(r.fragments_end, x.e) - x.s)::DOUBLE
            ELSE 0.0 END
         AS relative
FROM requests r JOIN extent x ON x.trace_id = r.top
"""
_KNOWN = """
SELECT count(*), count(th) FROM w WHERE start_ns >= $wlo AND start_ns < $whi
"""


def overall_sampling(
    con: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int, assumed: float | None, every: int = 1
) -> dict:
    con.execute(_FRAGMENTS)
    window = {"wlo": start_ns, "whi": end_ns}
    none = (0, 0.0, 0.0, 0.0, 0.0)
    n, num, den, var, _ = ratio_sums(con, _ROOT_UNITS, (), {"assumed": assumed}, variance_every=every).get(
        (), none
    )
    spans, known = con.execute(_KNOWN, window).fetchone()
    return {
        "fragmentation_factor": stat("ratio", n, num, den, var),
        "trace_completeness": stat(
            "proportion", *ratio_sums(con, _COMPLETE, (), variance_every=every).get((), none)
        ),
        "hidden_error_share": stat(
            "proportion",
            *ratio_sums(con, _HIDDEN_ERRORS, (), {"assumed": assumed, **window}, variance_every=every).get(
                (), none
            ),
        ),
        "latency_undercount": _latency_undercount(con),
        "spans": spans,
        "known_threshold_share": round(known / spans, 6) if spans else None,
        "assumed_sampling_probability": assumed,
        STATS: ["overall_counts", [spans, known]],
    }


def _latency_undercount(con: duckdb.DuckDBPyConnection) -> dict:
    """Per stored request with stitched fragments: how much later its last fragment ended than
    its entry trace did, relative to the whole request's duration. The median (and the median
    in ms): robust to the few fragments stitched to the wrong request."""
    con.execute(_TOPS)
    for _ in range(16):  # a chain longer than this is a stitching cycle; leave it
        if not con.execute(_CLIMBING).fetchone()[0]:
            break
        con.execute(_CLIMB)
    got = con.execute(_UNDERCOUNT).fetchnumpy()
    relative, ms = got["relative"].tolist(), got["ms"].tolist()
    return with_stats("latency_undercount", latency_figure(relative, ms), relative, ms)


def latency_figure(relative: list[float], ms: list[float]) -> dict:
    figure = median(relative)
    figure["median_ms"] = median(ms)["value"]
    return figure
