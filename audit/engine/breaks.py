"""In-process breaks: a root CLIENT, PRODUCER or INTERNAL span that starts while its own service
is handling a request in another trace. Its probable parent is one of those requests; the one
with an event (its start, or the end of one of its spans) just before the root started is the
likeliest, since a handler hands work to a pool right after its previous step."""

from __future__ import annotations

import duckdb
import numpy as np

_BUCKET_NS = 1_000_000_000
_P56 = float(1 << 56)
# how soon after a handler's previous step its pool starts the work: learned per run as the
# lower quartile of every break's nearest gap (true hand-offs are the short ones), within these
HANDOFF_NS = (5_000.0, 2_000_000.0)

_ENCLOSING = """
CREATE OR REPLACE TEMP TABLE break_pairs AS
WITH r AS (SELECT rid, trace_id, service, name, start_ns FROM roots WHERE kind NOT IN ('SERVER', 'CONSUMER')),
     s AS (SELECT rid, trace_id, span_id, service, start_ns, end_ns, th,
                  unnest(range((start_ns // $b)::BIGINT, (end_ns // $b)::BIGINT + 1)) AS bucket
           FROM w WHERE kind IN ('SERVER', 'CONSUMER') AND service IN (SELECT service FROM r)
             AND end_ns >= start_ns AND end_ns - start_ns < 3600000000000)
SELECT r.rid AS break_rid, s.rid AS parent_rid, s.trace_id AS parent_trace, s.span_id AS parent_span,
       r.service, r.start_ns, s.end_ns::BIGINT - s.start_ns::BIGINT AS parent_duration,
       coalesce(s.th, 0)::DOUBLE AS parent_th
FROM r JOIN s ON r.service = s.service AND (r.start_ns // $b)::BIGINT = s.bucket
WHERE r.start_ns BETWEEN s.start_ns AND s.end_ns AND r.trace_id <> s.trace_id
"""
_BREAK_OPS = """
SELECT r.service, r.name, mode(r.kind), count(DISTINCT r.rid) AS roots, count(DISTINCT p.break_rid) AS during
FROM roots r LEFT JOIN break_pairs p ON p.break_rid = r.rid
WHERE r.kind NOT IN ('SERVER', 'CONSUMER') GROUP BY r.service, r.name
"""
# the share of the window during which a service has a stored request in flight, from 1000
# evenly spaced instants: what "starts during a request" would be by chance alone
_DUTY = """
WITH pts AS (SELECT $wlo + i * (($whi - $wlo) // 1000) AS t FROM range(1000) r(i)),
     s AS (SELECT service, start_ns, end_ns, unnest(range((start_ns // $b)::BIGINT, (end_ns // $b)::BIGINT + 1)) AS bucket
           FROM w WHERE kind IN ('SERVER', 'CONSUMER') AND end_ns >= start_ns AND end_ns - start_ns < 3600000000000
             AND service IN (SELECT service FROM roots WHERE kind NOT IN ('SERVER', 'CONSUMER')))
SELECT service, count(DISTINCT pts.t) / 1000.0 FROM pts JOIN s ON (pts.t // $b)::BIGINT = s.bucket
WHERE pts.t BETWEEN s.start_ns AND s.end_ns GROUP BY service
"""
_GAPS = """
WITH ev AS (
  SELECT trace_id, service, end_ns::BIGINT AS t FROM w WHERE service IN (SELECT DISTINCT service FROM break_pairs)
  UNION ALL
  SELECT trace_id, service, start_ns::BIGINT FROM w WHERE kind IN ('SERVER', 'CONSUMER')
    AND service IN (SELECT DISTINCT service FROM break_pairs))
SELECT p.break_rid, p.parent_rid, p.start_ns::BIGINT - ev.t AS gap, p.parent_duration, p.parent_th,
       n.events
FROM break_pairs p ASOF JOIN ev ON ev.trace_id = p.parent_trace AND ev.service = p.service
  AND ev.t <= p.start_ns::BIGINT
JOIN (SELECT trace_id, service, count(*) AS events FROM ev GROUP BY ALL) n
  ON n.trace_id = p.parent_trace AND n.service = p.service
"""


def break_operations(con: duckdb.DuckDBPyConnection, start_ns: int, end_ns: int) -> tuple[list, list]:
    """Build break_pairs; split the root operations that are not calls into (breaks, jobs).

    An operation is a break when its roots start during a stored request of their service more
    often than chance (the service's duty cycle) explains: the request handed it work. Where
    requests are always in flight, timing cannot tell, and a root exit (CLIENT, PRODUCER) is
    taken for a break while a root INTERNAL span is taken for a job (cron, poller)."""
    con.execute(_ENCLOSING, {"b": _BUCKET_NS})
    duty = dict(con.execute(_DUTY, {"b": _BUCKET_NS, "wlo": start_ns, "whi": end_ns}).fetchall())
    breaks, jobs = [], []
    for service, name, kind, roots, during in con.execute(_BREAK_OPS).fetchall():
        d = duty.get(service, 0.0)
        excess = during / roots - d
        correlated = during >= 2 and excess >= max(0.1, 3 * (d * (1 - d) / roots) ** 0.5)
        busy_exit = d >= 0.9 and kind in ("CLIENT", "PRODUCER") and during / roots >= 0.9
        (breaks if correlated or busy_exit else jobs).append((service, name))
    return breaks, jobs


def stitch_breaks(con: duckdb.DuckDBPyConnection) -> dict[str, np.ndarray]:
    """Columns rid, parent_rid, confidence, candidates: each break's likeliest request.

    A request's likelihood falls off exponentially with the time since its last event; "none
    of these" (the real parent was not sampled) weighs the odds of that, spread evenly over
    the requests' duration."""
    cols = con.execute(_GAPS).fetchnumpy()
    if len(cols["break_rid"]) == 0:
        return {
            "rid": np.zeros(0, np.int64),
            "parent_rid": np.zeros(0, np.int64),
            "confidence": np.zeros(0),
            "candidates": np.zeros(0, np.int64),
        }
    brk, parent = cols["break_rid"].astype(np.int64), cols["parent_rid"].astype(np.int64)
    gap = np.maximum(cols["gap"].astype(float), 0.0)
    nearest = np.full(int(brk.max()) + 1, np.inf)
    np.minimum.at(nearest, brk, gap)
    scale = float(np.clip(np.percentile(nearest[np.isfinite(nearest)], 25), *HANDOFF_NS))
    p_stored = np.clip((_P56 - cols["parent_th"]) / _P56, 1e-6, 1.0)
    weight = np.exp(-gap / scale) / scale
    # "none of these": the real request was not sampled, and some candidate's event fell near the
    # root's start by chance; each candidate contributes its rate of events
    rate = cols["events"].astype(float) / np.maximum(cols["parent_duration"].astype(float), scale)
    null = (1.0 - p_stored) / p_stored * rate
    order = np.lexsort((-weight, brk))
    brk, parent, weight, null = brk[order], parent[order], weight[order], null[order]
    starts = np.r_[0, np.nonzero(np.diff(brk))[0] + 1]  # each break's candidates, best first
    counts = np.diff(np.r_[starts, len(brk)])
    total = np.add.reduceat(weight, starts) + np.add.reduceat(null, starts)
    confidence = weight[starts] / total
    return {"rid": brk[starts], "parent_rid": parent[starts], "confidence": confidence, "candidates": counts}
