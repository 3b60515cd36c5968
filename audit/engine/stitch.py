"""Stitching: each orphan root's probable parent, an unpaired exit in another trace.

Candidates come from DuckDB: exits and orphans share a key (an exact message key, the URL
path, the RPC method or destination, or the callee the exit's address resolves to) and a time
bucket, and the orphan starts where the exit allows (inside the call, or after the produce
within the lag). Keys are tried strongest first; an orphan keeps only its strongest kind.
Python scores the survivors with the edge's timing model and solves a one-to-one
minimum-cost assignment in which every orphan may also stay without a parent (it was never
stored); the confidence is the chosen pair's marginal probability over all assignments
(`_marginals`), so every competitor counts, not only the nearest.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, min_weight_full_bipartite_matching

from .estimate import stored_probability
from .learn import Learned
from .tables import temp_table

_BUCKET_NS = 100_000_000
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


# Candidates are matched one key strength at a time, strongest first; an orphan that found a
# fitting candidate at one strength is not matched at weaker ones. Each stage joins on (key,
# time bucket) with the time fit inline, then drops pairs whose other keys disagree. The
# steps are separate statements on purpose: with the OR conditions of the filter in the same
# statement as the joins, DuckDB's planner makes them a join condition and runs 500x slower.
_STAGES = (  # (rank, the key columns both sides have)
    (RANK_EXACT, ("k_exact",)),
    (RANK_PATH, ("k_path",)),
    (RANK_KEY, ("k_rpc", "k_dest")),
    (RANK_SERVICE, ("k_svc",)),
)
# An orphan with an exact message key (partition + offset, or message id) on a destination whose
# producers record it too is decided by that key alone: no match means its producer was not stored.
_EXACT_ONLY = """
CREATE OR REPLACE TEMP TABLE exact_only AS
SELECT oid FROM cand_orphans WHERE k_exact IS NOT NULL
  AND k_dest IN (SELECT DISTINCT k_dest FROM cand_exits WHERE k_exact IS NOT NULL)
"""


def _stage_sql(rank: int, columns: tuple[str, ...]) -> tuple[str, str, str]:
    okeys = " UNION ALL ".join(
        f"SELECT oid, {c} AS key, start_ns::BIGINT AS start_ns FROM cand_orphans WHERE {c} IS NOT NULL"
        for c in columns
    )
    ekeys = " UNION ALL ".join(
        f"SELECT eid, {c} AS key, win_lo, win_hi FROM cand_exits WHERE {c} IS NOT NULL" for c in columns
    )
    if rank == RANK_EXACT:  # no time bucket: the key decides
        matched = f"""
        CREATE OR REPLACE TEMP TABLE cand_matched AS
        SELECT DISTINCT o.oid, e.eid FROM ({okeys}) o JOIN ({ekeys}) e ON o.key = e.key"""
    else:
        matched = f"""
        CREATE OR REPLACE TEMP TABLE cand_matched AS
        WITH ok AS (SELECT *, start_ns // $b AS bucket FROM ({okeys})
                    WHERE oid NOT IN (SELECT oid FROM cand_pairs) AND oid NOT IN (SELECT oid FROM exact_only)),
             ek AS (SELECT eid, key, win_lo, win_hi, unnest(range(win_lo // $b, win_hi // $b + 1)) AS bucket
                    FROM ({ekeys}) WHERE key IN (SELECT key FROM ok))
        SELECT DISTINCT ok.oid, ek.eid FROM ok JOIN ek ON ok.key = ek.key AND ok.bucket = ek.bucket
        WHERE ok.start_ns BETWEEN ek.win_lo AND ek.win_hi"""
    joined = """
    CREATE OR REPLACE TEMP TABLE cand_joined AS
    SELECT m.oid, m.eid, o.k_path AS o_path, e.k_path AS e_path, o.k_rpc AS o_rpc, e.k_rpc AS e_rpc,
           o.k_dest AS o_dest, e.k_dest AS e_dest, e.instrumented, e.target, o.service,
           e.protocol AS e_protocol, o.protocol AS o_protocol, o.kind
    FROM cand_matched m JOIN cand_orphans o ON o.oid = m.oid JOIN cand_exits e ON e.eid = m.eid"""
    fit = f"""
    INSERT INTO cand_pairs
    SELECT oid, eid, {rank} FROM cand_joined
    WHERE (NOT instrumented OR target = service)
      -- a key both sides record must agree (a path may lose a prefix at a gateway)
      AND (o_path IS NULL OR e_path IS NULL OR o_path = e_path
           OR ends_with(o_path, substr(e_path, 6)) OR ends_with(e_path, substr(o_path, 6)))
      AND (o_rpc IS NULL OR e_rpc IS NULL OR o_rpc = e_rpc)
      AND (o_dest IS NULL OR e_dest IS NULL OR o_dest = e_dest)
      AND (e_protocol = o_protocol OR e_protocol = 'none' OR o_protocol = 'none')
      AND ((kind = 'CONSUMER') = (e_protocol = 'messaging'))"""
    return matched, joined, fit


# `path_odds`: how much a shared URL path says. Among the caller's exits with paths, the share
# with this path is the chance that an unrelated exit matches it; a path with an id in it is
# near proof, a fixed path ("/health") is none.
_PAIR_ROWS = """
WITH path_share AS (
  SELECT k_path, service, count(*) AS n, sum(count(*)) OVER (PARTITION BY service) AS total
  FROM cand_exits WHERE k_path IS NOT NULL GROUP BY k_path, service)
SELECT p.oid, p.eid, p.rank, o.start_ns::BIGINT AS o_start, o.end_ns::BIGINT AS o_end,
       e.start_ns::BIGINT AS e_start, e.end_ns::BIGINT AS e_end, e.service AS caller, o.service AS callee,
       e.protocol, coalesce(e.th, 0)::DOUBLE AS e_th,
       dense_rank() OVER (ORDER BY e.service, o.service, e.protocol) AS edge,
       CASE WHEN p.rank = 3 THEN ln(ps.total / ps.n) ELSE 0.0 END AS path_odds
FROM cand_pairs p JOIN cand_orphans o USING (oid) JOIN cand_exits e USING (eid)
LEFT JOIN path_share ps ON p.rank = 3 AND ps.k_path = e.k_path AND ps.service = e.service
"""


@dataclass
class Stitched:
    """The assignment: orphan ids, the exit id each was given, and the confidence of that."""

    oid: np.ndarray
    eid: np.ndarray
    confidence: np.ndarray

    def table(self) -> dict:
        return {"oid": self.oid, "eid": self.eid, "confidence": self.confidence}


def build_candidates(
    con: duckdb.DuckDBPyConnection, learned: Learned, default_skew_ns: float, max_lag_ns: float
) -> None:
    # a lag model pooled and widened from other topics can reach minutes: cap it at the setting
    tol, max_lag = learned.sync_reach_ns(default_skew_ns), min(learned.lag_reach_ns(), max_lag_ns)
    con.execute(_CANDIDATE_EXITS, {"tol": int(tol), "max_lag": int(max_lag)})
    con.execute(_CANDIDATE_ORPHANS)
    con.execute(_EXACT_ONLY)
    con.execute("CREATE OR REPLACE TEMP TABLE cand_pairs (oid BIGINT, eid BIGINT, rank INTEGER)")
    for rank, columns in _STAGES:
        matched, joined, fit = _stage_sql(rank, columns)
        con.execute(matched, {"b": _BUCKET_NS} if rank != RANK_EXACT else None)
        con.execute(joined)
        con.execute(fit)
    con.execute("DROP TABLE cand_matched; DROP TABLE cand_joined")


def stitch(con: duckdb.DuckDBPyConnection, learned: Learned, orphan_ids: np.ndarray) -> Stitched:
    """Assign parents to the given orphans (ids in cand_orphans; entry-point roots left out)."""
    temp_table(con, "stitch_orphans", {"oid": orphan_ids})
    cols = con.execute(_PAIR_ROWS + " WHERE p.oid IN (SELECT oid FROM stitch_orphans)").fetchnumpy()
    n = len(cols["oid"])
    if n == 0:
        return Stitched(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    oid, eid, rank = cols["oid"].astype(np.int64), cols["eid"].astype(np.int64), cols["rank"]
    cost, null = _costs(cols, learned)
    cost = np.where(rank == RANK_EXACT, np.minimum(cost, 0.0) - 20.0, cost - cols["path_odds"])
    # the orphan's parent exit was sampled with the caller's probability; otherwise it is not here
    p_stored = stored_probability(cols["e_th"])
    return _assign(oid, eid, cost, null, p_stored)


_BORROWED = 0.5  # likelihoods from a model borrowed from other edges count for half: they only hint


def _costs(cols: dict, learned: Learned) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: the negative log-likelihood of its timing under its edge's model, and what a
    candidate at the edge of plausibility would cost on that edge (the "no parent" price)."""
    cost, null = np.empty(len(cols["oid"])), np.empty(len(cols["oid"]))
    groups, first = np.unique(cols["edge"], return_index=True)
    order = np.argsort(cols["edge"], kind="stable")
    bounds = np.searchsorted(cols["edge"][order], groups)
    for _g, f, a, b in zip(groups, first, bounds, np.r_[bounds[1:], len(order)]):
        i = order[a:b]
        caller, callee, protocol = cols["caller"][f], cols["callee"][f], cols["protocol"][f]
        if protocol == "messaging":
            m = learned.lag_model(caller, callee)
            cost[i] = m.nll(cols["o_start"][i] - cols["e_end"][i])
        else:
            m = learned.sync_model(caller, callee, protocol)
            cost[i] = m.nll(cols["o_start"][i] - cols["e_start"][i], cols["e_end"][i] - cols["o_end"][i])
        null[i] = m.null()
        if m.source != "edge":
            cost[i] *= _BORROWED
            null[i] *= _BORROWED
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
    match = _solve(row, col, cost, null_cost, n_o, n_e)

    chosen = match[row] == col  # the pairs the assignment picked
    confidence = _marginals(row, col, cost, null_cost, n_o, n_e)
    return Stitched(orphans[row[chosen]], exits[col[chosen]], confidence[chosen])


_SINKHORN_ROUNDS = 200


def _marginals(row, col, cost, null_cost, n_o: int, n_e: int) -> np.ndarray:
    """Per pair, the probability that the orphan's parent is that exit, under the Gibbs
    distribution of the assignment's own costs (a match costs its cost, an orphan without a
    parent its null cost, an exit without an orphan nothing): every orphan is matched once
    (to an exit or to no parent), every exit at most once. The marginals are approximated by
    Sinkhorn balancing of exp(-cost), which weighs every competitor of a pair, also those
    several moves away in the assignment, and the density of unrelated concurrent exits.
    Where orphans share candidates, Sinkhorn's marginals err on the low side (on one pair
    against "neither", it gives the square root of the odds): the confidence is conservative."""
    shift = np.full(n_o, np.inf)  # per orphan, its cheapest option: scaling a row changes nothing
    np.minimum.at(shift, row, cost)
    shift = np.minimum(shift, null_cost)
    k = np.exp(-np.clip(cost - shift[row], 0.0, 700.0))
    k_null = np.exp(-np.clip(null_cost - shift, 0.0, 700.0))
    r, c = np.ones(n_o), np.ones(n_e)
    for _ in range(_SINKHORN_ROUNDS):
        r = 1.0 / (np.bincount(row, k * c[col], minlength=n_o) + k_null)
        c_new = 1.0 / (np.bincount(col, k * r[row], minlength=n_e) + 1.0)
        if np.allclose(c_new, c, rtol=1e-4, atol=0.0):
            c = c_new
            break
        c = c_new
    r = 1.0 / (np.bincount(row, k * c[col], minlength=n_o) + k_null)
    marginal = r[row] * k * c[col]
    # an orphan whose candidates nobody else has: its marginal is exact, a plain share of its
    # own options (Sinkhorn balancing understates a clear winner: sqrt of its odds on one pair)
    alone = np.ones(n_o, bool)
    np.logical_and.at(alone, row, np.bincount(col, minlength=n_e)[col] == 1)
    exact = k / (np.bincount(row, k, minlength=n_o) + k_null)[row]
    return np.where(alone[row], exact, marginal)


_DENSE_LIMIT = 1500  # orphans in one ambiguous group solved densely; beyond, the sparse solver


def _solve(row, col, cost, null_cost, n_o: int, n_e: int) -> np.ndarray:
    """The minimum-cost assignment: per orphan, the exit it takes, or n_e + itself for none.

    Solved per connected group of orphans and exits that share candidates: most orphans have
    their candidates to themselves, and one global sparse problem is 50x slower than many
    small dense ones."""
    graph = csr_matrix((np.ones(len(row)), (row, n_o + col)), shape=(n_o + n_e, n_o + n_e))
    _, label = connected_components(graph, directed=False)
    group = label[row]  # per pair
    match = n_e + np.arange(n_o)  # "no parent" unless a cheaper exit is taken
    # orphans alone in their group: the cheapest of their own options
    orphans_in_group = np.bincount(label[:n_o], minlength=label.max() + 1)
    alone = orphans_in_group[group] == 1
    best = np.full(n_o, np.inf)
    np.minimum.at(best, row[alone], cost[alone])
    pick = alone & (cost == best[row]) & (cost < null_cost[row])
    match[row[pick]] = col[pick]
    # the shared groups: one small dense assignment each, with local indices computed for all
    # groups at once (per-group numpy calls would cost more than the solving)
    shared = np.nonzero(~alone)[0]
    if len(shared):
        _solve_groups(group[shared], row[shared], col[shared], cost[shared], null_cost, n_o, n_e, match)
    return match


def _local_index(group: np.ndarray, ident: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For pairs sorted by group: each pair's index of `ident` within its group (0, 1, ...), and
    the distinct ids of each group in that order (flattened, group by group)."""
    order = np.lexsort((ident, group))
    key = group[order].astype(np.int64) * n + ident[order]
    first = np.r_[True, key[1:] != key[:-1]]
    rank = np.cumsum(first) - 1  # global index of the distinct (group, id)
    group_start = np.r_[True, group[order][1:] != group[order][:-1]]
    base = np.maximum.accumulate(np.where(group_start, rank, 0))
    local = np.empty(len(ident), dtype=np.int64)
    local[order] = rank - base
    return local, ident[order][first]


def _solve_groups(group, row, col, cost, null_cost, n_o: int, n_e: int, match: np.ndarray) -> None:
    r_local, rows_flat = _local_index(group, row, n_o)
    c_local, cols_flat = _local_index(group, col, n_e)
    order = np.argsort(group, kind="stable")
    bounds = np.r_[0, np.nonzero(np.diff(group[order]))[0] + 1, len(order)]
    row_at = col_at = 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        idx = order[a:b]
        r, c = r_local[idx], c_local[idx]
        k, m = int(r.max()) + 1, int(c.max()) + 1
        rows, cols = rows_flat[row_at : row_at + k], cols_flat[col_at : col_at + m]
        row_at, col_at = row_at + k, col_at + m
        if k > _DENSE_LIMIT:
            shift = (
                min(cost[idx].min(), null_cost[rows].min()) - 1.0
            )  # the sparse solver wants positive weights
            weights = np.concatenate([cost[idx], null_cost[rows]]) - shift
            g = csr_matrix((weights, (np.r_[r, np.arange(k)], np.r_[c, m + np.arange(k)])), shape=(k, m + k))
            got_rows, got_cols = min_weight_full_bipartite_matching(g)
        else:
            dense = np.full((k, m + k), 1e12)
            dense[r, c] = cost[idx]
            dense[np.arange(k), m + np.arange(k)] = null_cost[rows]
            got_rows, got_cols = linear_sum_assignment(dense)
        took = got_cols < m
        match[rows[got_rows[took]]] = cols[got_cols[took]]
