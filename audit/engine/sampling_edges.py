"""Sampling figures per edge (caller -> callee service, protocol): how often the hop carries
the context, how often the callee's side is stored when the caller's is, how many of the
callee's orphans lost their upstream, and whether both sides' adjusted counts agree.
Formulas: docs/sampling.md. Reads the run's temp tables: edge_calls, hops, w, roots,
orphan_rows, stitched, cand_exits."""

from __future__ import annotations

import duckdb

from .estimate import proportion, ratio, ratio_sums

# The callee's entries from each caller: propagated ones (a parent in the caller, or a link to
# it; or a parent that was not stored), and orphans attributed to the caller (stitched, or by
# their operation's usual caller).
# An entry's adjusted count is its own: the callee's sampler decided it, or inherited it.
_ENTRIES = """
CREATE OR REPLACE TEMP TABLE edge_entries AS
SELECT h.caller, h.callee, h.protocol, c.trace_id AS cluster, c.th, adjusted_count(c.th, $assumed) AS w,
       true AS propagated
FROM hops h JOIN w c ON c.rid = h.entry_rid
WHERE c.start_ns >= $wlo AND c.start_ns < $whi
UNION ALL
SELECT o.caller, o.service, o.protocol, coalesce(o.parent_trace_id, o.trace_id), r.th,
       adjusted_count(r.th, $assumed), false
FROM orphan_rows o JOIN roots r USING (rid)
WHERE o.caller IS NOT NULL
UNION ALL  -- entries whose parent was not stored (a sampler that ignored it): from the usual caller
SELECT u.caller, d.service, u.protocol, d.trace_id, d.th, adjusted_count(d.th, $assumed), true
FROM dangling d JOIN (
  SELECT c.service, c.name, mode(h.caller) AS caller, mode(h.protocol) AS protocol
  FROM hops h JOIN w c ON c.rid = h.entry_rid WHERE NOT h.via_link GROUP BY ALL) u USING (service, name)
WHERE d.kind IN ('SERVER', 'CONSUMER')
"""
_KEYS = ("caller", "callee", "protocol")

_PROPAGATION = "SELECT caller, callee, protocol, cluster, w, propagated AS a, 1 AS b FROM edge_entries"
# per stored exit: did the callee's side of the call get stored too (continued, or stitched)?
_CAPTURE = """
SELECT c.caller, c.callee, c.protocol, c.trace_id AS cluster, 1 AS w, c.propagated OR s.rid IS NOT NULL AS a, 1 AS b
FROM edge_calls c
LEFT JOIN (SELECT DISTINCT e.rid, e.target FROM stitched s JOIN cand_exits e USING (eid)
           WHERE s.confidence >= $min_confidence) s ON s.rid = c.rid AND s.target = c.target
WHERE c.instrumented
"""
_UPSTREAM_MISSING = """
SELECT caller, service AS callee, protocol, trace_id AS cluster, 1 AS w, confidence IS NULL AS a, 1 AS b
FROM orphan_rows WHERE caller IS NOT NULL
"""
# adjusted counts of the caller's exits (a) against those of the callee's entries (b)
_VOLUME = """
SELECT caller, callee, protocol, trace_id AS cluster, adjusted_count(th, $assumed) AS w, 1 AS a, 0 AS b
FROM edge_calls WHERE instrumented
UNION ALL
SELECT caller, callee, protocol, cluster, w, 0, 1 FROM edge_entries
"""
_UNKNOWN = """
SELECT caller, callee, protocol, count(*), count(*) FILTER (WHERE th IS NULL) FROM (
  SELECT caller, callee, protocol, th FROM edge_calls WHERE instrumented
  UNION ALL SELECT caller, callee, protocol, th FROM edge_entries) GROUP BY ALL
"""


def _protocol(raw: str | None) -> str:
    return raw if raw in ("http", "grpc", "rpc", "messaging", "db") else "unknown"


def edge_sampling(con: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int, assumed: float | None,
                  min_confidence: float) -> list[dict]:  # fmt: skip
    """One object per edge between services, ordered by caller, callee and protocol."""
    con.execute(_ENTRIES, {"wlo": start_ns, "whi": end_ns, "assumed": assumed})
    params = {"assumed": assumed}
    propagation = ratio_sums(con, _PROPAGATION, _KEYS)
    capture = ratio_sums(con, _CAPTURE, _KEYS, {"min_confidence": min_confidence})
    upstream = ratio_sums(con, _UPSTREAM_MISSING, _KEYS)
    volume = ratio_sums(con, _VOLUME, _KEYS, params, finite_population=True)
    unknown = {tuple(r[:3]): r[3:] for r in con.execute(_UNKNOWN).fetchall()}
    none = (0, 0.0, 0.0, 0.0, 0.0)
    out = []
    for key in sorted(unknown, key=lambda k: tuple(x or "" for x in k)):
        caller, callee, protocol = key
        spans, without_th = unknown[key]
        n, num, den, var, _ = volume.get(key, none)
        out.append({
            "caller": caller, "callee": callee, "protocol": _protocol(protocol),
            "propagation_rate": proportion(*propagation.get(key, none)),
            "conditional_capture_rate": proportion(*capture.get(key, none)),
            "upstream_missing_share": proportion(*upstream.get(key, none)),
            "volume_ratio": ratio(n, num, den, var),
            "caller_exits_adjusted": round(num, 1), "callee_entries_adjusted": round(den, 1),
            "unknown_adjusted_count_share": round(without_th / spans, 6) if spans else None,
        })  # fmt: skip
    return out
