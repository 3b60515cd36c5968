"""Sampling figures per service (issue 5, first part): how the services sample, and what lost
context does to their roots. Each proportion comes with its sample size and a 95% Wilson
interval. Definitions and formulas: docs/sampling.md."""

from __future__ import annotations

import math

import duckdb

_Z95 = 1.959964

_PER_SERVICE = """
WITH s AS (
  SELECT service, count(*) AS spans, count(*) FILTER (WHERE parent_span_id IS NULL) AS roots,
         count(*) FILTER (WHERE parent_span_id IS NOT NULL) AS with_parent,
         count(th) AS known_th, count(*) FILTER (WHERE th_invalid) AS invalid_th,
         avg((72057594037927936 - th) / 72057594037927936.0) AS mean_probability
  FROM w WHERE start_ns >= $wlo AND start_ns < $whi GROUP BY service),
f AS (
  SELECT service, count(*) FILTER (WHERE kind = 'orphan_root') AS orphans,
         count(*) FILTER (WHERE kind = 'dangling_parent') AS dangling
  FROM findings GROUP BY service),
h AS (  -- calls into the service that propagated: did it follow its caller's decision?
  SELECT callee AS service, count(*) AS entries,
         count(*) FILTER (WHERE entry_th IS DISTINCT FROM exit_th) AS threshold_differs
  FROM hops WHERE NOT via_link GROUP BY callee)
SELECT s.service, s.spans, s.roots, s.with_parent, s.known_th, s.invalid_th, s.mean_probability,
       coalesce(f.orphans, 0), coalesce(f.dangling, 0), coalesce(h.entries, 0), coalesce(h.threshold_differs, 0)
FROM s LEFT JOIN f USING (service) LEFT JOIN h USING (service) ORDER BY s.service
"""


def wilson(hits: int, n: int) -> dict:
    """A proportion with its 95% Wilson score interval; value and bounds are None when n = 0."""
    if n == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    p = hits / n
    denominator = 1 + _Z95**2 / n
    centre = (p + _Z95**2 / (2 * n)) / denominator
    half = _Z95 * math.sqrt(p * (1 - p) / n + _Z95**2 / (4 * n * n)) / denominator
    return {"value": round(p, 6), "ci_low": round(max(0.0, centre - half), 6),
            "ci_high": round(min(1.0, centre + half), 6), "n": n}  # fmt: skip


def service_sampling(con: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int) -> list[dict]:
    """One object per service, from the run's temp tables (w, findings, hops)."""
    out = []
    for (service, spans, roots, with_parent, known_th, invalid_th, mean_p, orphans, dangling, entries,
         differs) in con.execute(_PER_SERVICE, {"wlo": start_ns, "whi": end_ns}).fetchall():  # fmt: skip
        threshold_differs = wilson(differs, entries)
        # a ParentBased sampler keeps a propagated span exactly when its caller did, with the
        # caller's threshold, and never exports a span whose parent was not sampled
        parent_based = None if entries == 0 and dangling == 0 else (dangling == 0 and differs == 0)
        out.append({
            "service": service, "spans": spans, "roots": roots, "orphan_roots": orphans,
            "root_inflation": wilson(orphans, roots),
            "dangling_parent_rate": wilson(dangling, with_parent),
            "known_threshold_share": wilson(known_th, spans),
            "invalid_tracestate_spans": invalid_th,
            "mean_sampling_probability": None if mean_p is None else round(mean_p, 6),
            "threshold_differs_from_caller": threshold_differs,
            "parent_based": parent_based,
        })  # fmt: skip
    return out
