"""Sampling figures: per service (how it samples, what lost context does to its roots), per
edge (sampling_edges.py) and overall (sampling_overall.py). Every estimate comes with its
sample size and a 95% interval (estimate.py). Definitions and formulas: docs/sampling.md."""

from __future__ import annotations

from collections.abc import Callable

import duckdb

from .estimate import ADJUSTED_COUNT_MACRO, STATS, kept_shares, stat
from .sampling_edges import edge_sampling
from .sampling_overall import overall_sampling

_PER_SERVICE = """
WITH s AS (
  SELECT service, count(*) AS spans, count(*) FILTER (WHERE parent_span_id IS NULL) AS roots,
         count(*) FILTER (WHERE parent_span_id IS NOT NULL) AS with_parent,
         count(th) AS known_th, count(*) FILTER (WHERE th_invalid) AS invalid_th
  FROM w WHERE start_ns >= $wlo AND start_ns < $whi GROUP BY service),
f AS (
  SELECT service, count(*) FILTER (WHERE kind = 'orphan_root') AS orphans,
         count(*) FILTER (WHERE kind = 'dangling_parent') AS dangling
  FROM findings GROUP BY service),
h AS (  -- calls into the service that propagated: did it follow its caller's decision?
  SELECT callee AS service, count(*) AS entries,
         count(*) FILTER (WHERE entry_th IS DISTINCT FROM exit_th) AS threshold_differs
  FROM hops WHERE NOT via_link GROUP BY callee)
SELECT s.service, s.spans, s.roots, s.with_parent, s.known_th, s.invalid_th,
       coalesce(f.orphans, 0), coalesce(f.dangling, 0), coalesce(h.entries, 0),
       coalesce(h.threshold_differs, 0)
FROM s LEFT JOIN f USING (service) LEFT JOIN h USING (service) ORDER BY s.service
"""


def sampling_figures(
    con: duckdb.DuckDBPyConnection,
    start_ns: int,
    end_ns: int,
    assumed: float | None,
    progress: Callable[[str], None] = lambda step: None,
) -> dict:
    """The result document's `sampling` object. `assumed`: the sampling probability of spans
    without `ot=th` (None: their adjusted count is unknown and they are left out of weighted figures)."""
    con.execute(ADJUSTED_COUNT_MACRO)
    (spans,) = con.execute(
        "SELECT count(*) FROM w WHERE start_ns >= $wlo AND start_ns < $whi", {"wlo": start_ns, "whi": end_ns}
    ).fetchone()
    # Above a million spans, variances are summed over a hash sample of about a million spans'
    # clusters and scaled up: as exact in expectation, and seconds cheaper at 10 million spans.
    every = min(16, max(1, spans // 1_000_000))
    progress("estimating the sampling distortion: services")
    services = service_sampling(con, start_ns, end_ns, every)
    progress("estimating the sampling distortion: edges")
    edges = edge_sampling(con, start_ns, end_ns, assumed, every)
    progress("estimating the sampling distortion: overall")
    return {
        "services": services,
        "edges": edges,
        "overall": overall_sampling(con, start_ns, end_ns, assumed, every),
    }


# the share of a service's spans that were kept: stored spans over their adjusted counts
_KEPT = """
SELECT service, trace_id AS cluster, adjusted_count(th, NULL) AS w, 1.0 AS s
FROM w WHERE start_ns >= $wlo AND start_ns < $whi
"""


def service_sampling(
    con: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int, every: int = 1
) -> list[dict]:
    """One object per service, from the run's temp tables (w, findings, hops)."""
    kept = kept_shares(con, _KEPT, ("service",), {"wlo": start_ns, "whi": end_ns}, variance_every=every)
    out = []
    for (
        service,
        spans,
        roots,
        with_parent,
        known_th,
        invalid_th,
        orphans,
        dangling,
        entries,
        differs,
    ) in con.execute(_PER_SERVICE, {"wlo": start_ns, "whi": end_ns}).fetchall():
        threshold_differs = stat("wilson", differs, entries)
        # a ParentBased sampler keeps a propagated span exactly when its caller did, with the
        # caller's threshold, and never exports a span whose parent was not sampled
        parent_based = None if entries == 0 and dangling == 0 else (dangling == 0 and differs == 0)
        out.append(
            {
                "service": service,
                "spans": spans,
                "roots": roots,
                "orphan_roots": orphans,
                "root_inflation": stat("wilson", orphans, roots),
                "dangling_parent_rate": stat("wilson", dangling, with_parent),
                "known_threshold_share": stat("wilson", known_th, spans),
                "invalid_tracestate_spans": invalid_th,
                "sampling_probability": stat("share_ratio", *kept.get((service,), (0, 0.0, 0.0)), known_th),
                "threshold_differs_from_caller": threshold_differs,
                "parent_based": parent_based,
                STATS: ["service_counts", [entries, dangling, differs]],
            }
        )
    return out
