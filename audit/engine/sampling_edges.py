"""Sampling figures per edge (caller -> callee service, protocol): how often the hop carries
the context, how often the callee's side is stored when the caller's is, how many of the
callee's orphans lost their upstream, and whether both sides' adjusted counts agree.
Formulas: docs/sampling.md. Reads the run's temp tables: edge_calls, hops, w, roots,
dangling, orphan_rows."""

from __future__ import annotations

import duckdb

from .estimate import STATS, kept_shares, proportion_from, ratio_sums, stat, with_stats

# Where the callee's orphans came from. A stitched orphan comes from its parent's service.
# One without a parent (usually: its caller's exit was not sampled) is shared among the callers
# that dropped context to its service, in proportion to their dropped calls that were not
# stored, sum(w - 1) over their stored unpaired exits; without thresholds, its usual caller.
_ORPHAN_SOURCES = """
CREATE OR REPLACE TEMP TABLE orphan_sources AS
WITH unseen AS (
  SELECT caller, callee, protocol, sum(adjusted_count(th, $assumed) - 1) AS unseen
  FROM edge_calls WHERE instrumented AND NOT propagated GROUP BY ALL),
shares AS (
  SELECT caller, callee, protocol, unseen / sum(unseen) OVER (PARTITION BY callee, protocol) AS share
  FROM unseen WHERE unseen > 0)
SELECT o.rid, o.caller, o.service AS callee, o.protocol, o.parent_trace_id AS cluster, 1.0 AS share
FROM orphan_rows o WHERE o.confidence IS NOT NULL
UNION ALL
SELECT o.rid, coalesce(s.caller, o.caller), o.service, o.protocol, o.trace_id, coalesce(s.share, 1.0)
FROM orphan_rows o LEFT JOIN shares s ON s.callee = o.service AND s.protocol = o.protocol
WHERE o.confidence IS NULL AND coalesce(s.caller, o.caller) IS NOT NULL
"""
# The callee's entries from each caller: propagated ones (a parent in the caller, a link to it,
# or a parent that was not stored: attributed to the operation's usual caller), and orphans.
# An entry's adjusted count is its own: the callee's sampler decided it, or inherited it.
_ENTRIES = """
CREATE OR REPLACE TEMP TABLE edge_entries AS
SELECT caller, callee, protocol, entry_trace_id AS cluster, entry_trace_id AS trace, entry_th AS th,
       adjusted_count(entry_th, $assumed) AS w, 1.0 AS share, true AS propagated
FROM hops WHERE entry_start_ns >= $wlo AND entry_start_ns < $whi
UNION ALL
SELECT u.caller, d.service, u.protocol, d.trace_id, d.trace_id, d.th, adjusted_count(d.th, $assumed), 1.0,
  true
FROM dangling d JOIN (
  SELECT callee AS service, entry_name AS name, mode(caller) AS caller, mode(protocol) AS protocol
  FROM hops WHERE NOT via_link AND callee IN (SELECT service FROM dangling) GROUP BY ALL)
  u USING (service, name)
WHERE d.kind IN ('SERVER', 'CONSUMER')
UNION ALL
SELECT o.caller, o.callee, o.protocol, coalesce(o.cluster, r.trace_id), r.trace_id, r.th,
       adjusted_count(r.th, $assumed), o.share, false
FROM orphan_sources o JOIN roots r USING (rid)
"""
_KEYS = ("caller", "callee", "protocol")

# The variance that sharing out unstitched orphans adds to a caller's weighted orphan count:
# O^2 * V(s_A), s_A = U_A / U with U_A = sum(w - 1) over the caller's unpaired exits (V(U_A) =
# sum(w * (w - 1)), over sampling) and O the callee's weighted unstitched orphans.
_ALLOCATION = """
WITH x AS (
  SELECT caller, callee, protocol, sum(adjusted_count(th, $assumed) - 1) AS u,
         sum(adjusted_count(th, $assumed) * (adjusted_count(th, $assumed) - 1)) AS v
  FROM edge_calls WHERE instrumented AND NOT propagated GROUP BY ALL),
t AS (SELECT callee, protocol, sum(u) AS u, sum(v) AS v FROM x WHERE u > 0 GROUP BY ALL),
o AS (SELECT o.service AS callee, o.protocol, sum(adjusted_count(r.th, $assumed)) AS o
      FROM orphan_rows o JOIN roots r USING (rid) WHERE o.confidence IS NULL GROUP BY ALL)
SELECT x.caller, x.callee, x.protocol,
       o.o * o.o * ((t.u - x.u) ^ 2 * x.v + x.u ^ 2 * (t.v - x.v)) / t.u ^ 4
FROM x JOIN t USING (callee, protocol) JOIN o USING (callee, protocol) WHERE x.u > 0
"""

_PROPAGATION = (
    "SELECT caller, callee, protocol, cluster, w * share AS w, propagated AS a, 1 AS b FROM edge_entries"
)
_EXITS = """
SELECT caller, callee, protocol, count(*), count(*) FILTER (WHERE propagated) FROM edge_calls
WHERE instrumented GROUP BY ALL
"""
# edges whose callee never samples more strictly than its caller (entry threshold at most the
# exit's, on every propagated call): under consistent sampling it then keeps every propagated
# call its caller kept, so every exit it did not continue lost its context
_FOLLOWS = """
SELECT caller, callee, protocol,
       count(*) FILTER (WHERE entry_th IS NULL OR exit_th IS NULL OR entry_th > exit_th) AS stricter
FROM hops WHERE NOT via_link GROUP BY ALL
"""
# how often the callee keeps the root of an orphan from this caller, and how often the caller
# keeps an exit whose context the callee did not get (over the caller's unpaired exits)
_ORPHANS_KEPT = """
SELECT caller, callee, protocol, cluster, w, share AS s FROM edge_entries WHERE NOT propagated
"""
_UNPAIRED_KEPT = """
SELECT caller, callee, protocol, trace_id AS cluster, adjusted_count(th, $assumed) AS w, 1.0 AS s
FROM edge_calls WHERE instrumented AND NOT propagated
"""
# adjusted counts of the caller's exits (a) against those of the callee's entries (b); the
# variance is over sampling alone, so spans cluster by their own trace (their randomness)
_VOLUME = """
SELECT caller, callee, protocol, trace_id AS cluster, adjusted_count(th, $assumed) AS w, 1 AS a, 0 AS b
FROM edge_calls WHERE instrumented
UNION ALL
SELECT caller, callee, protocol, trace, w * share, 0, 1 FROM edge_entries
"""
_UNKNOWN = """
SELECT caller, callee, protocol, count(*), count(*) FILTER (WHERE th IS NULL) FROM (
  SELECT caller, callee, protocol, th FROM edge_calls WHERE instrumented
  UNION ALL SELECT caller, callee, protocol, th FROM edge_entries) GROUP BY ALL
"""


def _protocol(raw: str | None) -> str:
    return raw if raw in ("http", "grpc", "rpc", "messaging", "db") else "unknown"


def edge_sampling(
    con: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int, assumed: float | None, every: int = 1
) -> list[dict]:
    """One object per edge between services, ordered by caller, callee and protocol. `every`:
    variances from one cluster in `every` (estimate.ratio_sums)."""
    params = {"assumed": assumed}
    con.execute(_ORPHAN_SOURCES, params)
    con.execute(_ENTRIES, {"wlo": start_ns, "whi": end_ns, "assumed": assumed})
    allocation = {tuple(r[:3]): r[3] or 0.0 for r in con.execute(_ALLOCATION, params).fetchall()}
    propagation = {
        k: _plus_allocation(v, allocation.get(k))
        for k, v in ratio_sums(con, _PROPAGATION, _KEYS, variance_every=every).items()
    }
    volume = {
        k: _plus_allocation(v, allocation.get(k))
        for k, v in ratio_sums(
            con, _VOLUME, _KEYS, params, finite_population=True, variance_every=every
        ).items()
    }
    orphans_kept = kept_shares(con, _ORPHANS_KEPT, _KEYS, variance_every=every)
    unpaired_kept = kept_shares(con, _UNPAIRED_KEPT, _KEYS, params, variance_every=every)
    exits = {tuple(r[:3]): r[3:] for r in con.execute(_EXITS).fetchall()}
    # per edge with propagated calls: how many had the callee sample more strictly than its caller
    stricter = {tuple(r[:3]): r[3] for r in con.execute(_FOLLOWS).fetchall()}
    unknown = {tuple(r[:3]): r[3:] for r in con.execute(_UNKNOWN).fetchall()}
    out = []
    for key in sorted(unknown, key=lambda k: tuple(x or "" for x in k)):
        spans, without_th = unknown[key]
        n, num, den, var, _ = volume.get(key, _NONE)
        prop = propagation.get(key, _NONE)
        out.append(
            {
                "caller": key[0],
                "callee": key[1],
                "protocol": _protocol(key[2]),
                "propagation_rate": stat("proportion", *prop),
                "conditional_capture_rate": with_stats(
                    "capture",
                    _capture(exits.get(key, (0, 0)), prop, orphans_kept.get(key), stricter.get(key)),
                    exits.get(key, (0, 0)),
                    prop,
                    orphans_kept.get(key),
                    stricter.get(key),
                ),
                "upstream_missing_share": with_stats(
                    "upstream_missing",
                    _upstream_missing(orphans_kept.get(key), unpaired_kept.get(key)),
                    orphans_kept.get(key),
                    unpaired_kept.get(key),
                ),
                "volume_ratio": stat("ratio", n, num, den, var),
                "caller_exits_adjusted": round(num, 1),
                "callee_entries_adjusted": round(den, 1),
                "unknown_adjusted_count_share": round(without_th / spans, 6) if spans else None,
                STATS: ["edge_counts", [spans, without_th]],
            }
        )
    return out


_NONE = (0, 0.0, 0.0, 0.0, 0.0)


def _plus_allocation(sums: tuple, allocation_variance: float | None) -> tuple:
    """Add to V(R) what the orphans shared out to this caller add: R = num / den, and the
    shared orphans sit in den, so dR = -R / den * dO."""
    n, num, den, var, kish = sums
    if allocation_variance and den:
        var += (num / den / den) ** 2 * allocation_variance
    return n, num, den, var, kish


def _capture(
    exits: tuple[int, int], propagation: tuple, orphans_kept: tuple | None, stricter: int | None
) -> dict:
    """P(callee side stored | caller's exit stored) = (c + d * p_B) / n over the caller's n stored
    exits: c continued; d lost their context, and the callee kept the new root of such a call
    with probability p_B (from the thresholds of the orphans it kept: the new root has fresh
    randomness). d = n - c when the callee keeps whatever its caller kept (nothing propagated
    is then missing: `stricter`, the propagated calls where it sampled more strictly, is 0);
    otherwise d = n * (1 - pi), pi the propagation rate: dropping context does not depend on
    the caller's sampling decision. `stricter` is None when no call propagated."""
    follows = stricter == 0
    n, continued = exits
    if n == 0:
        return proportion_from(0.0, 0.0, 0)
    _, num, den, var_pi, _ = propagation
    m, total, var_b = orphans_kept or (0, 0.0, 0.0)
    p_b = m / total if total else 0.0
    if follows:
        dropped = (n - continued) / n
        variance = dropped * p_b * (1 - p_b) / n + dropped * dropped * var_b
    else:
        dropped = 1 - (num / den if den else 1.0)
        seen = continued / n
        variance = seen * (1 - seen) / n + p_b * p_b * var_pi + dropped * dropped * var_b
    return proportion_from(continued / n + dropped * p_b, variance, n)


def _upstream_missing(orphans_kept: tuple | None, unpaired_kept: tuple | None) -> dict:
    """1 - p_A: an orphan's upstream exit was stored exactly when the caller's sampler kept it,
    which it does with the rate it kept its unpaired exits at (stored over adjusted count)."""
    if not orphans_kept or not unpaired_kept or not unpaired_kept[1]:
        return proportion_from(0.0, 0.0, 0)
    orphans = orphans_kept[0]
    kept, total, variance = unpaired_kept
    p_a = kept / total
    return proportion_from(1 - p_a, variance + p_a * (1 - p_a) / max(orphans, 1.0), round(orphans))
