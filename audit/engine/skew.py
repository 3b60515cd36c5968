"""Timing of edges that never propagate, learned from their unpaired calls.

A hop whose context is always lost (a custom RPC, a client that never injects) has no
propagated call to fit its timing model from (learn.py), so it borrows the callee's, the
protocol's or everything's, with an offset of 0 +- the default skew. That borrowed offset is
wrong by twice the callee's clock skew: with 20 ms of skew and a call every 7 ms, the nearest
exit in raw time is the wrong one, and the right one may not be among an orphan's best
candidates at all.

The offset (d1 - d2 = twice the skew plus the legs' asymmetry) is still in the data: an
orphan and its own exit have nearly the same offset call after call, while an orphan and an
unrelated exit have any offset. So the offsets of all (orphan, exit) pairs that could nest, on
that edge, pile up at the true offset over a smooth background. What an unrelated pair looks
like is measured, not assumed: the same orphans moved by about a second either way meet only
unrelated exits (as breaks.py does for hand-offs). The peak is the offset with the largest
excess of real pairs over that background, in the bandwidth that makes it most significant;
an edge whose excess is not clearly above the background's noise keeps its borrowed model.
The overhead (d1 + d2) of the pairs in the peak gives the edge's overhead model.
"""

from __future__ import annotations

import duckdb
import numpy as np

from .learn import Learned
from .timing import LogNormal, StudentT, SyncModel

_SAMPLE_ORPHANS = 800  # per edge: enough for a peak, bounded work at any concurrency
_SHIFTS_NS = (-2_300_000_000, -1_100_000_000, 900_000_000, 1_900_000_000)  # the background's moves
_BANDWIDTHS_NS = (100_000, 300_000, 1_000_000, 3_000_000, 10_000_000)
_MIN_Z = 6.0  # the peak's excess, in standard deviations of the background's count
_MIN_SHARE = 0.05  # ... and at least this share of the sampled orphans (a caller sampled at 25%: about 0.14)
_MIN_EXCESS = 20
# overhead caps under which the peak is looked for (0.25 ms to 0.5 s, and the borrowed reach)
_OVERHEAD_CAPS_NS = tuple(250_000 * 2**i for i in range(12))

# Edges (caller, callee, protocol) of synchronous calls with unpaired exits and orphan roots.
_EDGES = """
SELECT x.service, x.target, x.protocol, count(*) FROM xt x
WHERE x.instrumented AND NOT x.continued_to_target AND x.protocol IN ('http', 'grpc', 'rpc', 'none')
  AND x.target IN (SELECT service FROM roots WHERE kind = 'SERVER' AND NOT linked)
GROUP BY ALL
"""
# Per shift (0: the real pairs), the offset and overhead of every orphan-exit pair on the edge
# whose times could nest within `reach` (the borrowed model's plausibility), for a sample of
# the edge's orphans (every k-th by start time).
_PAIRS = """
WITH o AS (
  SELECT start_ns::BIGINT AS os, end_ns::BIGINT AS oe FROM (
    SELECT start_ns, end_ns, row_number() OVER (ORDER BY start_ns) AS i FROM roots
    WHERE service = $callee AND kind = 'SERVER' AND NOT linked) WHERE i % $every = 0),
e AS (
  SELECT start_ns::BIGINT AS es, end_ns::BIGINT AS ee FROM xt
  WHERE service = $caller AND target = $callee AND protocol = $protocol AND instrumented
    AND NOT continued_to_target),
s AS (SELECT unnest($shifts::BIGINT[]) AS shift)
SELECT s.shift, (o.os + s.shift - e.es) - (e.ee - o.oe - s.shift) AS offset,
       (e.ee - e.es) - (o.oe - o.os) AS overhead
FROM o CROSS JOIN s JOIN e ON o.os + s.shift BETWEEN e.es - $reach AND e.ee + $reach
  AND (e.ee - e.es) - (o.oe - o.os) BETWEEN 0 AND $max_overhead
"""


def learn_unseen_offsets(con: duckdb.DuckDBPyConnection, learned: Learned, default_skew_ns: float) -> None:
    """Give every synchronous edge that has orphans but no model of its own (no propagated
    calls) a model inferred from its unpaired calls, where the data show one clearly."""
    for caller, callee, protocol, _ in con.execute(_EDGES).fetchall():
        if (caller, callee, protocol) in learned.sync_models:
            continue
        borrowed = learned.sync_model(caller, callee, protocol)
        model = infer_edge(con, caller, callee, protocol, borrowed, default_skew_ns)
        if model is not None:
            learned.sync_models[(caller, callee, protocol)] = model


def infer_edge(
    con: duckdb.DuckDBPyConnection,
    caller: str,
    callee: str,
    protocol: str,
    borrowed: SyncModel,
    default_skew_ns: float,
) -> SyncModel | None:
    orphans = con.execute(
        "SELECT count(*) FROM roots WHERE service = ? AND kind = 'SERVER' AND NOT linked", [callee]
    ).fetchone()[0]
    if orphans < _MIN_EXCESS:
        return None
    every = max(1, orphans // _SAMPLE_ORPHANS)
    reach = max(default_skew_ns, borrowed.reach_ns())
    params = {
        "caller": caller,
        "callee": callee,
        "protocol": protocol,
        "every": every,
        "reach": int(reach),
        "max_overhead": int(borrowed.overhead.quantile(3.0)),
        "shifts": [0, *_SHIFTS_NS],
    }
    rows = con.execute(_PAIRS, params).fetchnumpy()
    shift, offset, overhead = rows["shift"], rows["offset"].astype(float), rows["overhead"].astype(float)
    sampled = orphans // every
    # The peak is looked for in two dimensions: under a ladder of overhead caps, the one where
    # the offsets' excess is most significant. Unrelated pairs spread over every overhead up to
    # the borrowed model's reach (a triangle: |offset| <= overhead), true pairs sit at the
    # hop's few milliseconds; over all overheads at once, a slow hop with jittery legs at 200
    # calls in flight drowns its peak (an overhead fitted at 63 ms where true pairs have 6 ms).
    best = None
    for cap in sorted(
        {c for c in _OVERHEAD_CAPS_NS if c < params["max_overhead"]} | {params["max_overhead"]}
    ):
        sel = overhead <= cap
        real, background = np.sort(offset[sel & (shift == 0)]), np.sort(offset[sel & (shift != 0)])
        peak = _peak(real, background, len(_SHIFTS_NS), sampled)
        if peak is not None and (best is None or peak[0] > best[0][0]):
            best = (peak, cap)
    if best is None:
        return None
    (_, loc, scale, excess), cap = best
    near = np.abs(offset - loc) <= 2.0 * scale
    overhead_model = _excess_lognormal(
        overhead[near & (shift == 0)], overhead[near & (shift != 0)], len(_SHIFTS_NS), 4.0 * cap
    )
    return SyncModel(overhead_model, StudentT(loc, max(scale, 50_000.0)), int(excess * every), "inferred")


def _excess_lognormal(real: np.ndarray, background: np.ndarray, n_shifts: int, cap: float) -> LogNormal:
    """The log-normal of the overheads that real pairs have in excess of the background's
    (per bin of log overhead, up to `cap`): the true pairs' overhead, without the unrelated
    pairs that share their offsets."""
    edges = np.arange(np.log(1_000.0), np.log(max(cap, 2_000.0)) + 0.2, 0.2)
    n_real = np.histogram(np.log(np.maximum(real, 1_000.0)), edges)[0]
    n_bg = np.histogram(np.log(np.maximum(background, 1_000.0)), edges)[0] / n_shifts
    weight = np.maximum(n_real - n_bg, 0.0)
    if weight.sum() < 1.0:
        return LogNormal.fit(np.maximum(real, 1_000.0))
    mids = (edges[:-1] + edges[1:]) / 2
    mu = _weighted_median(mids, weight)
    mad = _weighted_median(np.abs(mids - mu), weight)
    return LogNormal(mu, max(1.4826 * mad, 0.5))


def _weighted_median(x: np.ndarray, w: np.ndarray) -> float:
    order = np.argsort(x)
    cum = np.cumsum(w[order])
    return float(x[order][np.searchsorted(cum, cum[-1] / 2)])


def find_peak(
    real: np.ndarray, background: np.ndarray, n_shifts: int, sampled: int
) -> tuple[float, float, float] | None:
    """(location, scale, excess pairs) of the offset with the most significant excess of
    `real` over `background` / n_shifts (both sorted), or None when none is clear."""
    peak = _peak(real, background, n_shifts, sampled)
    return None if peak is None else peak[1:]


def _peak(
    real: np.ndarray, background: np.ndarray, n_shifts: int, sampled: int
) -> tuple[float, float, float, float] | None:
    """find_peak's answer with its significance first: (z, location, scale, excess)."""
    if len(real) == 0:
        return None
    best = None
    for h in _BANDWIDTHS_NS:
        n_real = np.searchsorted(real, real + h, "right") - np.searchsorted(real, real - h, "left")
        n_bg = (
            np.searchsorted(background, real + h, "right") - np.searchsorted(background, real - h, "left")
        ) / n_shifts
        excess = n_real - n_bg
        z = excess / np.sqrt(n_bg + 1.0)
        i = int(np.argmax(z))
        if best is None or z[i] > best[0]:
            best = (float(z[i]), float(real[i]), h, float(excess[i]))
    z, center, h, excess = best
    if z < _MIN_Z or excess < max(_MIN_EXCESS, _MIN_SHARE * sampled):
        return None
    loc = float(np.median(real[np.abs(real - center) <= h]))
    # the peak's spread: the real pairs' second moment around it, less the background's (about
    # flat across a few bandwidths: n * width^2 / 3)
    width = 3.0 * h
    near = real[np.abs(real - loc) <= width]
    n_bg = (np.searchsorted(background, loc + width) - np.searchsorted(background, loc - width)) / n_shifts
    spread = (np.sum((near - loc) ** 2) - n_bg * width * width / 3.0) / max(len(near) - n_bg, 1.0)
    return z, loc, float(np.sqrt(max(spread, (h / 4.0) ** 2))), excess
