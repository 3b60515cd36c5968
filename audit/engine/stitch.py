"""Stitching: each orphan root's probable parent, an unpaired exit in another trace.

Candidates come from DuckDB: exits and orphans share a key (the callee service the exit's
address resolves to, the URL path, the RPC method, the destination, or an exact message key)
and a time bucket, then the orphan must start where the exit allows (inside the call, or
after the produce within the lag). Only the strongest kind of shared key is kept per orphan.
Python scores the survivors with the edge's learned gap model and solves a one-to-one
minimum-cost assignment in which every orphan may also stay unassigned (its parent was
never stored); the confidence is that choice's share of the orphan's probability mass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import duckdb
import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from .learn import Learned

_BUCKET_NS = 100_000_000
_P56 = float(1 << 56)
RANK_SERVICE, RANK_KEY, RANK_PATH, RANK_EXACT = 1, 2, 3, 4

_CANDIDATE_EXITS = """
CREATE OR REPLACE TEMP TABLE cand_exits AS
SELECT row_number() OVER (ORDER BY rid, target) - 1 AS eid, rid, trace_id, span_id, service, protocol,
       start_ns, end_ns, th, target, instrumented, in_window,
       CASE WHEN instrumented THEN 'svc:' || target END AS k_svc,
       CASE WHEN protocol IN ('http', 'none') AND url_path IS NOT NULL THEN 'path:' || url_path END AS k_path,
       CASE WHEN rpc_service IS NOT NULL THEN 'rpc:' || rpc_service || '/' || coalesce(rpc_method, '') END AS k_rpc,
       CASE WHEN messaging_destination IS NOT NULL THEN 'dest:' || messaging_destination END AS k_dest,
       CASE WHEN messaging_partition IS NOT NULL AND messaging_offset IS NOT NULL
              THEN 'kafka:' || coalesce(messaging_destination, '') || '/' || messaging_partition || '/' || messaging_offset
            WHEN messaging_message_id IS NOT NULL THEN 'msg:' || messaging_message_id END AS k_exact,
       start_ns::BIGINT - $tol AS win_lo,
       end_ns::BIGINT + CASE WHEN protocol = 'messaging' THEN $max_lag ELSE $tol END AS win_hi
FROM xt
WHERE NOT continued_to_target AND protocol <> 'db'
"""
_CANDIDATE_ORPHANS = """
CREATE OR REPLACE TEMP TABLE cand_orphans AS
SELECT row_number() OVER (ORDER BY rid) - 1 AS oid, rid, trace_id, span_id, service, name, kind, protocol,
       start_ns, end_ns, th,
       'svc:' || service AS k_svc,
       CASE WHEN url_path IS NOT NULL THEN 'path:' || url_path END AS k_path,
       CASE WHEN rpc_service IS NOT NULL THEN 'rpc:' || rpc_service || '/' || coalesce(rpc_method, '') END AS k_rpc,
       CASE WHEN messaging_destination IS NOT NULL THEN 'dest:' || messaging_destination END AS k_dest,
       CASE WHEN messaging_partition IS NOT NULL AND messaging_offset IS NOT NULL
              THEN 'kafka:' || coalesce(messaging_destination, '') || '/' || messaging_partition || '/' || messaging_offset
            WHEN messaging_message_id IS NOT NULL THEN 'msg:' || messaging_message_id END AS k_exact
FROM roots WHERE kind IN ('SERVER', 'CONSUMER') AND NOT linked
"""


def _keys(table: str, ident: str, extra: str) -> str:
    parts = [("k_svc", RANK_SERVICE), ("k_rpc", RANK_KEY), ("k_dest", RANK_KEY), ("k_path", RANK_PATH)]
    return " UNION ALL ".join(
        f"SELECT {ident}, {col} AS key, {rank} AS rank, {extra} FROM {table} WHERE {col} IS NOT NULL"
        for col, rank in parts
    )


# An orphan with an exact message key (partition + offset, or message id) on a destination whose
# producers record it too is decided by that key alone: no match means its producer was not stored.
_PAIRS = f"""
CREATE OR REPLACE TEMP TABLE cand_pairs AS
WITH exact_dest AS (SELECT DISTINCT k_dest FROM cand_exits WHERE k_exact IS NOT NULL),
     ok AS (SELECT * FROM ({_keys("cand_orphans", "oid", "start_ns // $b AS bucket, k_exact, k_dest AS dest")})
            WHERE k_exact IS NULL OR dest NOT IN (SELECT k_dest FROM exact_dest WHERE k_dest IS NOT NULL)),
     ek AS (SELECT eid, key, rank, unnest(range(win_lo // $b, win_hi // $b + 1)) AS bucket
            FROM ({_keys("cand_exits", "eid", "win_lo, win_hi")})
            WHERE key IN (SELECT key FROM ok)),
     matched AS (
       SELECT ok.oid, ek.eid, max(ek.rank) AS rank FROM ok JOIN ek ON ok.key = ek.key AND ok.bucket = ek.bucket
       GROUP BY ALL
       UNION ALL
       SELECT o.oid, e.eid, {RANK_EXACT} FROM cand_orphans o JOIN cand_exits e ON o.k_exact = e.k_exact),
     fit AS (
       SELECT m.oid, m.eid, max(m.rank) AS rank FROM matched m
       JOIN cand_orphans o USING (oid) JOIN cand_exits e USING (eid)
       WHERE (NOT e.instrumented OR e.target = o.service)
         -- a key both sides record must agree (a path may lose a prefix at a gateway)
         AND (o.k_path IS NULL OR e.k_path IS NULL OR o.k_path = e.k_path
              OR ends_with(o.k_path, substr(e.k_path, 6)) OR ends_with(e.k_path, substr(o.k_path, 6)))
         AND (o.k_rpc IS NULL OR e.k_rpc IS NULL OR o.k_rpc = e.k_rpc)
         AND (o.k_dest IS NULL OR e.k_dest IS NULL OR o.k_dest = e.k_dest)
         AND (e.protocol = o.protocol OR e.protocol = 'none' OR o.protocol = 'none')
         AND ((o.kind = 'CONSUMER') = (e.protocol = 'messaging'))
         AND (m.rank = {RANK_EXACT} OR o.start_ns::BIGINT BETWEEN e.win_lo AND e.win_hi)
       GROUP BY ALL)
SELECT * FROM fit QUALIFY rank = max(rank) OVER (PARTITION BY oid)
"""
_PAIR_ROWS = """
SELECT p.oid, p.eid, p.rank, o.start_ns::BIGINT AS o_start, o.end_ns::BIGINT AS o_end,
       e.start_ns::BIGINT AS e_start, e.end_ns::BIGINT AS e_end, e.service AS caller, o.service AS callee,
       e.protocol, coalesce(e.th, 0)::DOUBLE AS e_th
FROM cand_pairs p JOIN cand_orphans o USING (oid) JOIN cand_exits e USING (eid)
"""


@dataclass
class Stitched:
    """The assignment: orphan ids, the exit id each was given, and the confidence of that."""

    oid: np.ndarray
    eid: np.ndarray
    confidence: np.ndarray

    def table(self) -> dict:
        return {"oid": self.oid, "eid": self.eid, "confidence": self.confidence}


def build_candidates(con: duckdb.DuckDBPyConnection, learned: Learned, default_skew_ns: float) -> None:
    tol = max([default_skew_ns] + [abs(m.skew_ns) + m.spread_ns for m in learned.sync_models.values()])
    max_lag = max([learned.default_lag.spread_ns] + [m.spread_ns for m in learned.lag_models.values()])
    con.execute(_CANDIDATE_EXITS, {"tol": int(tol), "max_lag": int(max_lag)})
    con.execute(_CANDIDATE_ORPHANS)
    con.execute(_PAIRS, {"b": _BUCKET_NS})


def stitch(con: duckdb.DuckDBPyConnection, learned: Learned, orphan_ids: np.ndarray) -> Stitched:
    """Assign parents to the given orphans (ids in cand_orphans; entry-point roots left out)."""
    con.register("stitch_orphans", {"oid": orphan_ids})
    cols = con.execute(_PAIR_ROWS + " WHERE p.oid IN (SELECT oid FROM stitch_orphans)").fetchnumpy()
    con.unregister("stitch_orphans")
    n = len(cols["oid"])
    if n == 0:
        return Stitched(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    oid, eid, rank = cols["oid"].astype(np.int64), cols["eid"].astype(np.int64), cols["rank"]
    cost, null = _costs(cols, learned)
    cost = np.where(rank == RANK_EXACT, np.minimum(cost, 0.0) - 20.0, cost)
    # the orphan's parent exit was sampled with the caller's probability; otherwise it is not here
    p_stored = np.clip((_P56 - cols["e_th"]) / _P56, 1e-6, 1.0)
    return _assign(oid, eid, cost, null, p_stored)


def _costs(cols: dict, learned: Learned) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: the negative log-likelihood of its timing under its edge's model, and what a
    candidate at the edge of plausibility would cost on that edge (the "no parent" price)."""
    n = len(cols["oid"])
    cost, null = np.empty(n), np.empty(n)
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(cols["caller"], cols["callee"], cols["protocol"])):
        groups.setdefault(key, []).append(i)
    for (caller, callee, protocol), idx in groups.items():
        i = np.asarray(idx)
        if protocol == "messaging":
            m = learned.lag_model(caller, callee)
            cost[i] = m.nll((cols["o_start"][i] - cols["e_end"][i]).astype(float))
            null[i] = float(m.nll(math.exp(m.mu + 2.5 * m.sigma)))
        else:
            m = learned.sync_model(caller, callee, protocol)
            d1 = (cols["o_start"][i] - cols["e_start"][i]) - m.skew_ns
            d2 = (cols["e_end"][i] - cols["o_end"][i]) + m.skew_ns
            cost[i] = m.nll(d1.astype(float)) + m.nll(d2.astype(float))
            null[i] = 2.0 * float(m.nll(math.exp(m.mu + 2.5 * m.sigma)))
    return cost, null


def _assign(oid, eid, cost, null, p_stored) -> Stitched:
    orphans, row = np.unique(oid, return_inverse=True)
    exits, col = np.unique(eid, return_inverse=True)
    n_o, n_e = len(orphans), len(exits)
    # each orphan's own "no parent here" column, priced by the plausibility edge and the odds
    # that its parent was not sampled
    null_row = np.zeros(n_o)
    null_row[row] = null
    p_row = np.zeros(n_o)
    np.maximum.at(p_row, row, p_stored)
    null_cost = null_row - np.log((1.0 - p_row) / p_row + 1e-9).clip(min=0.0)
    shift = min(cost.min(), null_cost.min()) - 1.0  # the matcher wants positive weights
    rows = np.concatenate([row, np.arange(n_o)])
    cols = np.concatenate([col, n_e + np.arange(n_o)])
    weights = np.concatenate([cost, null_cost]) - shift
    graph = csr_matrix((weights, (rows, cols)), shape=(n_o, n_e + n_o))
    matched_rows, matched_cols = min_weight_full_bipartite_matching(graph)
    match = np.empty(n_o, dtype=np.int64)
    match[matched_rows] = matched_cols

    # confidence: the chosen exit's share of the orphan's probability mass, leaving out exits
    # that another orphan fits better and was given
    chosen = match[row] == col  # the pairs the assignment picked
    owner = np.full(n_e, -1)
    owner[col[chosen]] = row[chosen]
    owner_cost = np.full(n_e, np.inf)
    owner_cost[col[chosen]] = cost[chosen]
    taken = (owner[col] >= 0) & (owner[col] != row) & (owner_cost[col] < cost)
    base = np.full(n_o, np.inf)
    np.minimum.at(base, row, cost)
    base = np.minimum(base, null_cost)
    mass = np.exp(-(null_cost - base))
    np.add.at(mass, row[~taken], np.exp(-(cost[~taken] - base[row[~taken]])))
    confidence = np.exp(-(cost[chosen] - base[row[chosen]])) / mass[row[chosen]]
    return Stitched(orphans[row[chosen]], exits[col[chosen]], np.minimum(confidence, 1.0))
