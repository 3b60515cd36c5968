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

import math
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, min_weight_full_bipartite_matching

from .estimate import stored_probability
from .learn import Learned
from .tables import temp_table

_BUCKET_NS = 100_000_000
RANK_SERVICE, RANK_KEY, RANK_PATH, RANK_EXACT = 1, 2, 3, 4

# An exit's keys and time window, the columns of cand_exits after k_svc (also calibrate.py's decoys)
EXIT_KEYS = """
       CASE WHEN protocol IN ('http', 'none') AND url_path IS NOT NULL THEN 'path:' || url_path END AS k_path,
       CASE WHEN rpc_service IS NOT NULL
         THEN 'rpc:' || rpc_service || '/' || coalesce(rpc_method, '') END AS k_rpc,
       CASE WHEN messaging_destination IS NOT NULL THEN 'dest:' || messaging_destination END AS k_dest,
       CASE WHEN messaging_partition IS NOT NULL AND messaging_offset IS NOT NULL
              THEN 'kafka:' || coalesce(messaging_destination, '') || '/' || messaging_partition
                   || '/' || messaging_offset
            WHEN messaging_message_id IS NOT NULL THEN 'msg:' || messaging_message_id END AS k_exact,
       start_ns::BIGINT - $tol AS win_lo,
       end_ns::BIGINT + CASE WHEN protocol = 'messaging' THEN $max_lag ELSE $tol END AS win_hi
"""
_CANDIDATE_EXITS = f"""
CREATE OR REPLACE TEMP TABLE cand_exits AS
SELECT row_number() OVER (ORDER BY rid, target) - 1 AS eid, rid, trace_id, span_id, service, protocol,
       start_ns, end_ns, th, target, instrumented, in_window,
       share, CASE WHEN share IS NOT NULL THEN name END AS op,  -- an exit with a row per candidate callee
       CASE WHEN instrumented THEN 'svc:' || target END AS k_svc,
{EXIT_KEYS}FROM xt
WHERE NOT continued_to_target AND protocol <> 'db'
"""
# An orphan's keys, the last columns of cand_orphans (also calibrate.py's decoys)
ORPHAN_KEYS = """
       'svc:' || service AS k_svc,
       CASE WHEN url_path IS NOT NULL THEN 'path:' || url_path END AS k_path,
       CASE WHEN rpc_service IS NOT NULL
         THEN 'rpc:' || rpc_service || '/' || coalesce(rpc_method, '') END AS k_rpc,
       CASE WHEN messaging_destination IS NOT NULL THEN 'dest:' || messaging_destination END AS k_dest,
       CASE WHEN messaging_partition IS NOT NULL AND messaging_offset IS NOT NULL
              THEN 'kafka:' || coalesce(messaging_destination, '') || '/' || messaging_partition
                   || '/' || messaging_offset
            WHEN messaging_message_id IS NOT NULL THEN 'msg:' || messaging_message_id END AS k_exact
"""
_CANDIDATE_ORPHANS = f"""
CREATE OR REPLACE TEMP TABLE cand_orphans AS  -- oids in time order: the assignment windows on them
SELECT row_number() OVER (ORDER BY start_ns, rid) - 1 AS oid, rid, trace_id, span_id, service, name, kind,
       protocol,
       start_ns, end_ns, th,
{ORPHAN_KEYS}FROM roots WHERE kind IN ('SERVER', 'CONSUMER') AND NOT linked
"""


# Candidates are matched one key strength at a time, strongest first; an orphan that found a
# fitting candidate at one strength is not matched at weaker ones. Each stage joins on (key,
# time bucket) with the time window inline, scores every pair that fits with its edge's timing
# model, and keeps each orphan's best `CANDIDATES_PER_ORPHAN` in a top-K aggregate: the pairs
# themselves are never materialized, so memory holds K per orphan, not the calls in flight
# squared (a keyless hop with 1,000 calls in flight has ~1,000 fitting exits per orphan). The
# checks that other keys agree sit inside the score (a CASE), not in a WHERE: as join
# conditions, DuckDB's planner would run them 500x slower.
_STAGES = (  # (rank, the key columns both sides have)
    (RANK_EXACT, ("k_exact",)),
    (RANK_PATH, ("k_path",)),
    (RANK_KEY, ("k_rpc", "k_dest")),
    (RANK_SERVICE, ("k_svc",)),
)
# The best K candidates of each orphan by timing fit are kept. K = 16 is justified in
# docs/audit.md ("Bounded candidates"): on the simulator at up to 1,000 calls in flight the true
# parent ranks beyond 16 only where the assignment could not name it anyway.
CANDIDATES_PER_ORPHAN = 16
# Orphans are matched a time slice at a time, each slice holding about this share of the memory
# limit's worth of candidate rows (orphans plus exit-buckets); a slice that still runs out of
# memory is halved, and a single bucket that does is given up: its orphans abstain (degraded).
# Rows are counted at 256 bytes: slices 8x the size of 1 KiB rows added 15 MiB of RSS (shop-large); each
# slice's statement also costs ~15 ms of CPU whatever its size, so slices are not made smaller.
_BYTES_PER_ROW = 256
# An orphan with an exact message key (partition + offset, or message id) on a destination whose
# producers record it too is decided by that key alone: no match means its producer was not stored.
_EXACT_ONLY = """
CREATE OR REPLACE TEMP TABLE exact_only AS
SELECT oid FROM cand_orphans WHERE k_exact IS NOT NULL
  AND k_dest IN (SELECT DISTINCT k_dest FROM cand_exits WHERE k_exact IS NOT NULL)
"""
_O_COLS = (
    "oid, start_ns::BIGINT AS o_start, end_ns::BIGINT AS o_end, service AS o_service, kind,"
    " protocol AS o_protocol, k_path AS o_path, k_rpc AS o_rpc, k_dest AS o_dest"
)
_E_COLS = (
    "eid, win_lo, win_hi, start_ns::BIGINT AS e_start, end_ns::BIGINT AS e_end, service AS e_service,"
    " protocol AS e_protocol, instrumented, target, k_path AS e_path, k_rpc AS e_rpc, k_dest AS e_dest,"
    " share AS e_share"
)
# Per edge (caller, callee, the exit's protocol), the parameters of the timing model the
# assignment scores it with (audit/engine/timing.py): c0 holds the constant terms, weight the
# discount of a borrowed model. The fit below is that model's negative log-likelihood.
_MODELS_COMBOS = """
SELECT DISTINCT service, protocol, target FROM cand_exits WHERE instrumented
UNION
SELECT e.service, e.protocol, o.service FROM (SELECT DISTINCT service, protocol FROM cand_exits
  WHERE NOT instrumented) e CROSS JOIN (SELECT DISTINCT service FROM cand_orphans) o
"""
_FIT = """
CASE WHEN (NOT instrumented OR target = o_service)
      -- a key both sides record must agree (a path may lose a prefix at a gateway)
      AND (o_path IS NULL OR e_path IS NULL OR o_path = e_path
           OR ends_with(o_path, substr(e_path, 6)) OR ends_with(e_path, substr(o_path, 6)))
      AND (o_rpc IS NULL OR e_rpc IS NULL OR o_rpc = e_rpc)
      AND (o_dest IS NULL OR e_dest IS NULL OR o_dest = e_dest)
      AND (e_protocol = o_protocol OR e_protocol = 'none' OR o_protocol = 'none')
      AND ((kind = 'CONSUMER') = (e_protocol = 'messaging'))
 THEN m.weight * CASE
   WHEN m.lag THEN m.c0 + ln(greatest(o_start - e_end, 1000)) -- a message's lag, log-normal
        + 0.5 * pow((ln(greatest(o_start - e_end, 1000)) - m.mu) / m.sigma, 2)
        + CASE WHEN o_start < e_end THEN 50.0 * pow((o_start - e_end) / m.reach, 2) ELSE 0.0 END
   ELSE m.c0 + ln(greatest(o_start - e_start + e_end - o_end, 1000)) -- overhead d1 + d2, log-normal
        + 0.5 * pow((ln(greatest(o_start - e_start + e_end - o_end, 1000)) - m.mu) / m.sigma, 2)
        -- offset d1 - d2, Student-t with 3 degrees of freedom
        + 2.0 * ln(1.0 + pow((o_start - e_start - e_end + o_end - m.loc) / m.scale, 2) / 3.0)
   END
END"""


def _stage_sql(rank: int, columns: tuple[str, ...], per_orphan: int) -> tuple[str, str]:
    """The stage's statement (cand_top: per orphan, its best candidates and how many fit) and
    the query of the orphans it is about (to give them up if it cannot run). Non-exact stages
    read the stage tables (`_stage_tables`) for a slice of orphan start times, $lo <= start < $hi."""
    if rank == RANK_EXACT:  # no time bucket: the key decides
        waiting = "oid NOT IN (SELECT oid FROM cand_counts)"
        okeys = " UNION ALL ".join(
            f"SELECT {c} AS key, {_O_COLS} FROM cand_orphans WHERE {c} IS NOT NULL AND {waiting}"
            for c in columns
        )
        ekeys = " UNION ALL ".join(
            f"SELECT {c} AS key, {_E_COLS} FROM cand_exits WHERE {c} IS NOT NULL" for c in columns
        )
        pairs = f"SELECT * FROM ({okeys}) ok JOIN ({ekeys}) ek USING (key)"
        orphans = f"SELECT DISTINCT oid FROM ({okeys}) WHERE key IN (SELECT key FROM ({ekeys}))"
    else:
        # the slice's exits: short ones by the range of their window's start (zone maps skip the
        # rest of the table, which is sorted on it), and the few long ones
        exits = f"""SELECT * FROM stage_exits
          WHERE win_lo >= $lo - {_LONG_NS} AND win_lo < $hi AND win_hi >= $lo
          UNION ALL SELECT * FROM stage_long_exits WHERE win_lo < $hi AND win_hi >= $lo"""
        pairs = f"""
        WITH ok AS (SELECT *, o_start // $b AS bucket FROM stage_orphans
                    WHERE o_start >= $lo AND o_start < $hi),
             ek AS (SELECT *, unnest(range(greatest(win_lo, $lo) // $b,
                                           least(win_hi, $hi - 1) // $b + 1)) AS bucket
                    FROM ({exits}) WHERE key IN (SELECT key FROM ok))
        SELECT * EXCLUDE (bucket) FROM ok JOIN ek USING (key, bucket)
        WHERE o_start BETWEEN win_lo AND win_hi"""
        orphans = (
            "SELECT DISTINCT oid FROM stage_orphans WHERE o_start >= $lo AND o_start < $hi"
            f" AND key IN (SELECT key FROM ({exits}))"
        )
    # a pair matched through two keys of a stage (rpc and destination) is listed once
    top = f"""
    CREATE OR REPLACE TEMP TABLE cand_top AS
    SELECT oid, list_distinct(min_by(eid, fit, {int(per_orphan)})) AS top, count(fit) AS n FROM (
      SELECT oid, eid, {_FIT} - ln(coalesce(e_share, 1.0)) AS fit FROM ({pairs}) p
      LEFT JOIN cand_models m
        ON m.caller = p.e_service AND m.callee = p.o_service AND m.protocol = p.e_protocol)
    GROUP BY oid"""
    # given up: the orphans that share a key with exits in flight during the slice
    return top, orphans


# An exit whose window (its call, plus the skew tolerance or a message's lag) is longer than this
# is kept apart from the others, which a slice then finds by their window's start alone.
_LONG_NS = 10_000_000_000


def _stage_tables(con: duckdb.DuckDBPyConnection, columns: tuple[str, ...]) -> None:
    """stage_orphans (sorted by start) and stage_exits, stage_long_exits (sorted by window start):
    one row per key of the stage, orphans not matched at a stronger stage. Built once per stage,
    so that each time slice reads only its own rows, not both tables and cand_counts again."""
    waiting = "oid NOT IN (SELECT oid FROM cand_counts) AND oid NOT IN (SELECT oid FROM exact_only)"
    okeys = " UNION ALL ".join(
        f"SELECT {c} AS key, {_O_COLS} FROM cand_orphans WHERE {c} IS NOT NULL AND {waiting}" for c in columns
    )
    ekeys = " UNION ALL ".join(
        f"SELECT {c} AS key, {_E_COLS} FROM cand_exits WHERE {c} IS NOT NULL" for c in columns
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE stage_orphans AS SELECT * FROM ({okeys}) ORDER BY o_start")
    ekeys = f"SELECT * FROM ({ekeys}) WHERE key IN (SELECT key FROM stage_orphans)"
    for table, test in (("stage_exits", "<="), ("stage_long_exits", ">")):
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT * FROM ({ekeys})"
            f" WHERE win_hi - win_lo {test} {_LONG_NS} ORDER BY win_lo"
        )


def match_stages(con: duckdb.DuckDBPyConnection, per_orphan: int, slices: list | None = None) -> None:
    """Fill cand_pairs and cand_counts (created empty) from cand_orphans, cand_exits and
    exact_only: every stage, strongest first, the non-exact ones a time slice at a time
    (`slices`, [lo, hi) on bucket boundaries; by default sized by `_slices`)."""
    slices = _slices(con) if slices is None else slices
    for rank, columns in _STAGES:
        top, orphans = _stage_sql(rank, columns, per_orphan)
        if rank == RANK_EXACT:
            _run_stage(con, rank, top, orphans, None)
            continue
        _stage_tables(con, columns)
        for span in slices:
            _run_stage(con, rank, top, orphans, span)
    for table in ("cand_top", "stage_orphans", "stage_exits", "stage_long_exits"):
        con.execute(f"DROP TABLE IF EXISTS {table}")


# `path_odds`: how much a shared URL path says. Among the caller's exits with paths, the share
# with this path is the chance that an unrelated exit matches it; a path with an id in it is
# near proof, a fixed path ("/health") is none.
# `prior`: for an exit whose operation reaches several callees (targets.py, "spread"), the share
# of the operation's propagated calls that reached the orphan's own operation (or, one it never
# reached, half a call's worth); 1 for any other exit. `slot`: the exit, once for all its rows.
_PAIR_ROWS = """
WITH path_share AS (
  SELECT k_path, service, count(*) AS n, sum(count(*)) OVER (PARTITION BY service) AS total
  FROM cand_exits WHERE k_path IS NOT NULL GROUP BY k_path, service)
SELECT p.oid, p.eid, p.rank, o.start_ns::BIGINT AS o_start, o.end_ns::BIGINT AS o_end,
       e.start_ns::BIGINT AS e_start, e.end_ns::BIGINT AS e_end, coalesce(e.th, 0)::DOUBLE AS e_th, g.edge,
       CASE WHEN p.rank = 3 THEN ln(ps.total / ps.n) ELSE 0.0 END AS path_odds,
       coalesce(q.prior, c.unseen, 1.0) AS prior, CASE WHEN e.share IS NOT NULL THEN e.rid END AS slot
FROM cand_pairs p JOIN cand_orphans o USING (oid) JOIN cand_exits e USING (eid)
JOIN pair_edges g ON g.caller = e.service AND g.callee = o.service
  AND g.protocol IS NOT DISTINCT FROM e.protocol
LEFT JOIN path_share ps ON p.rank = 3 AND ps.k_path = e.k_path AND ps.service = e.service
LEFT JOIN op_callees c ON e.op IS NOT NULL AND c.service = e.service AND c.name = e.op
  AND c.protocol = e.protocol AND c.target = e.target
LEFT JOIN op_priors q ON e.op IS NOT NULL AND q.service = e.service AND q.name = e.op
  AND q.protocol = e.protocol AND q.target = e.target AND q.callee_name = o.name
"""
# The edges (caller, callee, the exit's protocol) the pairs are on, numbered in that order: the
# pairs carry the number, not the three names (millions of pairs at 10M spans, and three Python
# strings each were gigabytes).
_PAIR_EDGES = """
CREATE OR REPLACE TEMP TABLE pair_edges AS
SELECT row_number() OVER (ORDER BY caller, callee, protocol) AS edge, * FROM (
  SELECT DISTINCT e.service AS caller, o.service AS callee, e.protocol
  FROM cand_pairs p JOIN cand_orphans o USING (oid) JOIN cand_exits e USING (eid))
"""


def pair_edges(con: duckdb.DuckDBPyConnection) -> dict[int, tuple[str, str, str]]:
    """Build pair_edges (for _PAIR_ROWS) from cand_pairs; edge number -> (caller, callee, protocol)."""
    con.execute(_PAIR_EDGES)
    return {
        edge: (caller, callee, protocol)
        for edge, caller, callee, protocol in con.execute(
            "SELECT edge, caller, callee, protocol FROM pair_edges"
        ).fetchall()
    }


@dataclass
class Stitched:
    """The assignment: orphan ids, the exit id each was given, and the confidence of that."""

    oid: np.ndarray
    eid: np.ndarray
    confidence: np.ndarray

    def table(self) -> dict:
        return {"oid": self.oid, "eid": self.eid, "confidence": self.confidence}


def build_candidates(
    con: duckdb.DuckDBPyConnection,
    learned: Learned,
    default_skew_ns: float,
    max_lag_ns: float,
    per_orphan: int | None = None,
) -> None:
    """cand_exits, cand_orphans, and cand_pairs: each orphan's best `per_orphan` candidate exits
    (default CANDIDATES_PER_ORPHAN) at the strongest key it shares with any; cand_counts: how
    many fitted before the cap, and which orphans were given up (degraded) for lack of memory."""
    # a lag model pooled and widened from other topics can reach minutes: cap it at the setting
    tol, max_lag = learned.sync_reach_ns(default_skew_ns), min(learned.lag_reach_ns(), max_lag_ns)
    con.execute(_CANDIDATE_EXITS, {"tol": int(tol), "max_lag": int(max_lag)})
    con.execute(_CANDIDATE_ORPHANS)
    con.execute(_EXACT_ONLY)
    _models_table(con, learned)
    con.execute("CREATE OR REPLACE TEMP TABLE cand_pairs (oid BIGINT, eid BIGINT, rank INTEGER)")
    # per orphan matched (or given up) at some strength: how many candidates fitted there before
    # the cap, how many were kept; `degraded` when the stage ran out of memory on its slice and
    # the orphan abstains. It outlives cand_pairs: a run leaves it for tests and benchmarks.
    con.execute(
        "CREATE OR REPLACE TEMP TABLE cand_counts"
        " (oid BIGINT, rank INTEGER, candidates BIGINT, kept INTEGER, degraded BOOLEAN)"
    )
    match_stages(con, per_orphan or CANDIDATES_PER_ORPHAN)


def degraded_hops(con: duckdb.DuckDBPyConnection) -> list[dict]:
    """The operations whose orphans were given up for lack of memory (they abstain), after
    build_candidates: [{"callee", "operation", "orphans"}]."""
    rows = con.execute(
        "SELECT o.service, o.name, count(*) FROM cand_counts c JOIN cand_orphans o USING (oid)"
        " WHERE c.degraded GROUP BY ALL ORDER BY 3 DESC, 1, 2"
    ).fetchall()
    return [{"callee": s, "operation": n, "orphans": c} for s, n, c in rows]


def _run_stage(con, rank: int, top: str, orphans: str, span: tuple[int, int] | None) -> None:
    """One stage over one slice of orphan start times (None: all); halves a slice that runs
    out of memory, and gives up a single bucket that still does: its orphans abstain."""
    params = None if span is None else {"b": _BUCKET_NS, "lo": span[0], "hi": span[1]}
    try:
        con.execute(top, params)
    except duckdb.OutOfMemoryException:
        if span is not None and span[1] - span[0] > _BUCKET_NS:
            mid = span[0] + (span[1] - span[0]) // (2 * _BUCKET_NS) * _BUCKET_NS or span[0] + _BUCKET_NS
            _run_stage(con, rank, top, orphans, (span[0], mid))
            _run_stage(con, rank, top, orphans, (mid, span[1]))
            return
        q = f"INSERT INTO cand_counts SELECT oid, {rank}, NULL, 0, true FROM ({orphans})"
        con.execute(q, None if span is None else {"lo": span[0], "hi": span[1]})
        return
    con.execute(f"INSERT INTO cand_pairs SELECT oid, unnest(top), {rank} FROM cand_top WHERE n > 0")
    con.execute(f"INSERT INTO cand_counts SELECT oid, {rank}, n, len(top), false FROM cand_top WHERE n > 0")


def _memory_limit_bytes(con: duckdb.DuckDBPyConnection) -> int:
    text = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]  # e.g. "1.8 GiB"
    number, _, unit = text.strip().partition(" ")
    scale = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    scale |= {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "bytes": 1}
    return int(float(number) * scale.get(unit, 1 << 30))


_SLICE_ROWS = """
SELECT b, sum(n)::BIGINT FROM (
  SELECT start_ns::BIGINT // $b AS b, count(*) AS n FROM cand_orphans GROUP BY 1
  UNION ALL
  SELECT win_lo // $b, sum(win_hi // $b - win_lo // $b + 1) FROM cand_exits GROUP BY 1)
GROUP BY b ORDER BY b
"""


def _slices(con: duckdb.DuckDBPyConnection) -> list[tuple[int, int]]:
    """Time slices of orphan starts, [lo, hi) on bucket boundaries, each with about the rows
    (orphans, and exits once per bucket their window covers) a quarter of the memory limit holds."""
    budget = max(_memory_limit_bytes(con) // 4 // _BYTES_PER_ROW, 10_000)
    rows = con.execute(_SLICE_ROWS, {"b": _BUCKET_NS}).fetchall()
    if not rows:
        return []
    cuts, held = [rows[0][0]], 0
    for bucket, n in rows:
        if held and held + n > budget:
            cuts.append(bucket)
            held = 0
        held += n
    cuts.append(rows[-1][0] + 1)
    return [(a * _BUCKET_NS, b * _BUCKET_NS) for a, b in zip(cuts[:-1], cuts[1:])]


def _models_table(con: duckdb.DuckDBPyConnection, learned: Learned) -> None:
    """cand_models: the timing model of every edge a candidate pair can be on, as columns."""
    rows = []
    for caller, protocol, callee in con.execute(_MODELS_COMBOS).fetchall():
        if protocol == "messaging":
            m = learned.lag_model(caller, callee)
            rows.append((caller, callee, protocol, True, m.lag.mu, m.lag.sigma, 0.0, 1.0, m.reach_ns(), m))
        else:
            m = learned.sync_model(caller, callee, protocol)
            o, t = m.overhead, m.offset
            rows.append((caller, callee, protocol, False, o.mu, o.sigma, t.loc, t.scale, 1.0, m))
    names = ("caller", "callee", "protocol", "lag", "mu", "sigma", "loc", "scale", "reach")
    data = {n: [r[i] for r in rows] for i, n in enumerate(names)}
    # the constant terms of the negative log-likelihood, and the borrowed models' discount
    data["c0"] = [math.log(r[5] * math.sqrt(2 * math.pi)) + (0.0 if r[3] else math.log(r[7])) for r in rows]
    data["weight"] = [1.0 if r[9].source == "edge" else _BORROWED for r in rows]
    types = {"caller": pa.string(), "callee": pa.string(), "protocol": pa.string(), "lag": pa.bool_()}
    temp_table(con, "cand_models", {n: pa.array(v, types.get(n, pa.float64())) for n, v in data.items()})


def stitch(con: duckdb.DuckDBPyConnection, learned: Learned, orphan_ids: np.ndarray) -> Stitched:
    """Assign parents to the given orphans (ids in cand_orphans; entry-point roots left out)."""
    temp_table(con, "stitch_orphans", {"oid": orphan_ids})
    edges = pair_edges(con)
    query = _PAIR_ROWS + " WHERE p.oid IN (SELECT oid FROM stitch_orphans)"
    # streamed: each batch of pairs is costed as it comes and only what the assignment needs is
    # kept (millions of pairs on a keyless hop under load; all their columns were gigabytes)
    kept: dict[str, list] = {name: [] for name in ("oid", "eid", "edge", "cost", "null", "p_stored", "slot")}
    for batch in con.sql(query).to_arrow_reader(_FETCH_ROWS):
        part = _costed(batch, learned, edges)
        for name in kept:
            kept[name].append(part[name])
        del part, batch
    con.execute("DROP TABLE pair_edges")
    if not sum(len(part) for part in kept["oid"]):
        return Stitched(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    cols = {name: np.concatenate(kept.pop(name)) for name in list(kept)}
    # in a fixed order (sorted here: an ORDER BY needs memory a small limit may not have): an
    # orphan with candidates on several edges takes its "no parent" price from the last (_assign)
    order = np.lexsort((cols["eid"], cols["oid"], cols.pop("edge")))
    oid, eid, cost, null = (cols.pop(name)[order] for name in ("oid", "eid", "cost", "null"))
    p_stored, slot = cols.pop("p_stored")[order], cols.pop("slot")[order]
    del order, cols
    # an exit with a row per candidate callee is one column of the assignment (one orphan at most)
    if not (slot >= 0).any():
        pairs = {"oid": oid, "eid": eid, "cost": cost, "null": null, "p_stored": p_stored}
        del slot, oid, eid, cost, null, p_stored
        return _assign_pairs(pairs)
    return _assign_slots(oid, eid, slot, cost, null, p_stored)


_FETCH_ROWS = 1 << 20  # pairs fetched and costed at a time


def _costed(batch: pa.RecordBatch, learned: Learned, edges: dict[int, tuple[str, str, str]]) -> dict:
    """One batch of _PAIR_ROWS: per pair its orphan, exit and edge, its cost and "no parent"
    price, the chance its exit was stored, and its slot (-1: none)."""
    cols = {
        name: batch.column(name).to_numpy(zero_copy_only=False)
        for name in batch.schema.names
        if name != "slot"
    }
    slot = batch.column("slot")
    slot = slot.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    cost, null = _costs(cols, learned, edges)
    cost = np.where(cols["rank"] == RANK_EXACT, np.minimum(cost, 0.0) - 20.0, cost - cols["path_odds"])
    cost -= np.log(cols["prior"])
    # the orphan's parent exit was sampled with the caller's probability; otherwise it is not here
    p_stored = stored_probability(cols["e_th"])
    oid, eid = cols["oid"].astype(np.int64, copy=False), cols["eid"].astype(np.int64, copy=False)
    return {
        "oid": oid,
        "eid": eid,
        "edge": cols["edge"],
        "cost": cost,
        "null": null,
        "p_stored": p_stored,
        "slot": slot,
    }


def _assign_slots(oid, eid, slot, cost, null, p_stored) -> Stitched:
    """_assign with the rows of one exit (slot >= 0: its rid) as one column: an orphan meets each
    exit through at most one of its rows (the row of the orphan's own service)."""
    column = np.where(slot >= 0, eid.max() + 1 + slot, eid)
    got = _assign(oid, column, cost, null, p_stored)
    key = oid * (column.max() + 1) + column
    order = np.argsort(key, kind="stable")
    at = order[np.searchsorted(key[order], got.oid * (column.max() + 1) + got.eid)]
    return Stitched(got.oid, eid[at], got.confidence)


_COST_CHUNK = 1 << 20  # pairs scored at a time
_BORROWED = 0.5  # likelihoods from a model borrowed from other edges count for half: they only hint


def _costs(
    cols: dict, learned: Learned, edges: dict[int, tuple[str, str, str]]
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: the negative log-likelihood of its timing under its edge's model, and what a
    candidate at the edge of plausibility would cost on that edge (the "no parent" price).
    `edges`: the pairs' edge numbers -> (caller, callee, protocol), from `pair_edges`."""
    edge = cols["edge"]
    cost, null = np.empty(len(edge)), np.empty(len(edge))
    groups = np.unique(edge)
    # pairs sorted by edge (as stitch sorts them) are read in place, without an order's copies
    order = None if bool(np.all(edge[1:] >= edge[:-1])) else np.argsort(edge, kind="stable")
    bounds = np.searchsorted(edge if order is None else edge[order], groups)
    for g, a, b in zip(groups, bounds, np.r_[bounds[1:], len(edge)]):
        caller, callee, protocol = edges[int(g)]
        lag = protocol == "messaging"
        m = learned.lag_model(caller, callee) if lag else learned.sync_model(caller, callee, protocol)
        # in chunks: the model's temporaries over millions of pairs at once were gigabytes
        for c in range(a, b, _COST_CHUNK):
            i = slice(c, min(c + _COST_CHUNK, b)) if order is None else order[c : min(c + _COST_CHUNK, b)]
            if lag:
                cost[i] = m.nll(cols["o_start"][i] - cols["e_end"][i])
            else:
                cost[i] = m.nll(cols["o_start"][i] - cols["e_start"][i], cols["e_end"][i] - cols["o_end"][i])
        i = slice(a, b) if order is None else order[a:b]
        null[i] = m.null()
        if m.source != "edge":
            cost[i] *= _BORROWED
            null[i] *= _BORROWED
    return cost, null


def _assign(oid, eid, cost, null, p_stored) -> Stitched:
    return _assign_pairs({"oid": oid, "eid": eid, "cost": cost, "null": null, "p_stored": p_stored})


def _assign_pairs(pairs: dict) -> Stitched:
    """_assign on the pairs' arrays, which it takes out of `pairs` (oid, eid, cost, null,
    p_stored): those only it holds are freed once it has what it needs of them."""
    orphans, row = np.unique(pairs.pop("oid"), return_inverse=True)
    exits, col = np.unique(pairs.pop("eid"), return_inverse=True)
    n_o, n_e = len(orphans), len(exits)
    # each orphan's own "no parent here" column, priced by the plausibility edge and the odds
    # that its parent was not sampled
    null_row = np.zeros(n_o)
    null_row[row] = pairs.pop("null")
    p_row = np.zeros(n_o)
    np.maximum.at(p_row, row, pairs.pop("p_stored"))
    null_cost = null_row - np.log((1.0 - p_row) / p_row + 1e-9).clip(min=0.0)
    cost = pairs.pop("cost")
    match = _solve(row, col, cost, null_cost, n_o, n_e)

    chosen = match[row] == col  # the pairs the assignment picked
    confidence = _marginals(row, col, cost, null_cost, n_o, n_e)
    return Stitched(orphans[row[chosen]], exits[col[chosen]], confidence[chosen])


_BP_ROUNDS = 200


def _marginals(row, col, cost, null_cost, n_o: int, n_e: int) -> np.ndarray:
    """Per pair, the probability that the orphan's parent is that exit, under the Gibbs
    distribution of the assignment's own costs (a match costs its cost, an orphan without a
    parent its null cost, an exit without an orphan nothing): every orphan is matched once
    (to an exit or to no parent), every exit at most once. So every competitor of a pair
    counts, also those several moves away in the assignment, and the density of unrelated
    concurrent exits.

    The marginals come from belief propagation on the matching (sum-product, messages per
    pair, vectorised over all groups at once): an exit tells an orphan how likely it is to be
    free of every other orphan (1 / (1 + the others' odds on it)), an orphan tells an exit its
    odds on it against its other options as those are free. Exact where orphans and exits form
    no cycle (an orphan with its candidates to itself, two orphans sharing one exit, chains);
    on the loops of a busy hop it is the Bethe approximation, close to exact on such
    problems. (Sinkhorn balancing, used before, counts an orphan as its own competitor: on one
    pair against "neither" it gives the square root of the odds, and timing-only hops lost half
    their recall to that.) Messages are damped (geometric mean with the previous round)."""
    shift = np.full(n_o, np.inf)  # per orphan, its cheapest option: scaling a row changes nothing
    np.minimum.at(shift, row, cost)
    shift = np.minimum(shift, null_cost)
    k = np.exp(-np.clip(cost - shift[row], 0.0, 700.0))
    k_null = np.exp(-np.clip(null_cost - shift, 0.0, 700.0))
    free = np.ones(len(row))  # per pair: the exit's message, how likely it is free for the orphan
    kf = np.empty(len(row))
    for _ in range(_BP_ROUNDS):  # in place where it can be: millions of pairs on a keyless hop
        np.multiply(k, free, out=kf)
        others = np.bincount(row, kf, minlength=n_o)[row]
        others -= kf
        others += k_null[row]
        # the orphan's message: its odds on this exit
        odds = np.divide(k, np.maximum(others, 1e-300, out=others), out=others)
        del others
        taken = np.bincount(col, odds, minlength=n_e)[col]
        taken -= odds
        del odds
        np.maximum(taken, 0.0, out=taken)
        taken += 1.0
        new = np.sqrt(np.divide(free, taken, out=taken), out=taken)
        del taken
        # np.allclose(new, free, rtol=1e-6, atol=1e-9) on finite values, with kf as the scratch
        np.abs(np.subtract(new, free, out=kf), out=kf)
        tol = np.abs(free)
        tol *= 1e-6
        tol += 1e-9
        done = bool(np.less_equal(kf, tol).all())
        del tol
        free = new
        del new
        if done:
            break
    np.multiply(k, free, out=kf)
    return kf / (np.bincount(row, kf, minlength=n_o) + k_null)[row]


_DENSE_LIMIT = 1500  # orphans in one ambiguous group solved densely; beyond, the sparse solver


def _solve(row, col, cost, null_cost, n_o: int, n_e: int) -> np.ndarray:
    """The minimum-cost assignment: per orphan, the exit it takes, or n_e + itself for none.

    Solved per connected group of orphans and exits that share candidates: most orphans have
    their candidates to themselves, and one global sparse problem is 50x slower than many
    small dense ones."""
    graph = csr_matrix((np.ones(len(row), np.int8), (row, n_o + col)), shape=(n_o + n_e, n_o + n_e))
    _, label = connected_components(graph, directed=False)
    del graph
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
    if alone.all():
        return match
    if not alone.any():  # no copy of the pairs
        del alone
        if label.max() == 0:  # a keyless hop under load: one group, its local indices the global ones
            del group, label
            got_rows, got_cols = _solve_group(row, col, cost, null_cost, n_o, n_e)
            took = got_cols < n_e
            match[got_rows[took]] = got_cols[took]
        else:
            _solve_groups(group, row, col, cost, null_cost, n_o, n_e, match)
        return match
    shared = np.nonzero(~alone)[0]
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


def _solve_sparse(r, c, cost, null_cost, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """One group's assignment with the sparse solver: rows 0..k-1, exits 0..m-1, then each row's
    own "no parent" column m + row."""
    shift = min(cost.min(), null_cost.min()) - 1.0  # the sparse solver wants positive weights
    weights = np.concatenate([cost, null_cost]) - shift
    g = csr_matrix((weights, (np.r_[r, np.arange(k)], np.r_[c, m + np.arange(k)])), shape=(k, m + k))
    return min_weight_full_bipartite_matching(g)


# A group of more orphans than this is solved in overlapping windows of orphans in time order
# (oids follow start times): the sparse solver's time grows about as the square of the group,
# and a keyless hop with 1,000 calls in flight makes one group of every orphan on it. Each
# window is solved optimally with the exits earlier windows took removed; its first
# _WINDOW_STEP orphans are then kept. An orphan's candidates start at most a few seconds
# before it, so the window's overlap holds every competitor that matters.
_WINDOW_ROWS, _WINDOW_STEP = 4000, 3000


def _solve_windows(r, c, cost, null_cost, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    if not bool(np.all(r[1:] >= r[:-1])):  # pairs come sorted by orphan from stitch: no copies then
        order = np.argsort(r, kind="stable")
        r, c, cost = r[order], c[order], cost[order]
        del order
    starts = np.searchsorted(r, np.arange(k + 1))  # pairs of row i: starts[i]:starts[i + 1]
    taken = np.zeros(m, dtype=bool)
    got = np.full(k, m)  # per row: its exit, or m for none
    for a in range(0, k, _WINDOW_STEP):
        b = min(a + _WINDOW_ROWS, k)
        sl = slice(starts[a], starts[b])
        free = ~taken[c[sl]]
        wr, wc, wcost = r[sl][free] - a, c[sl][free], cost[sl][free]
        cols, wc_local = np.unique(wc, return_inverse=True)
        rows_got, cols_got = _solve_sparse(wr, wc_local, wcost, null_cost[a:b], b - a, len(cols))
        keep = rows_got < (_WINDOW_STEP if b < k else b - a)
        rows_got, cols_got = rows_got[keep], cols_got[keep]
        took = cols_got < len(cols)
        got[a + rows_got[took]] = cols[cols_got[took]]
        taken[cols[cols_got[took]]] = True
    rows = np.arange(k)
    return rows, np.where(got < m, got, m + rows)


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
        got_rows, got_cols = _solve_group(r, c, cost[idx], null_cost[rows], k, m)
        took = got_cols < m
        match[rows[got_rows[took]]] = cols[got_cols[took]]


def _solve_group(r, c, cost, null_cost, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """One group's assignment: rows 0..k-1 (null_cost per row), exits 0..m-1; per row taken,
    its column (m + row for none)."""
    if k > _WINDOW_ROWS:  # a keyless hop under load chains everything into one group
        return _solve_windows(r, c, cost, null_cost, k, m)
    if k > _DENSE_LIMIT:
        return _solve_sparse(r, c, cost, null_cost, k, m)
    dense = np.full((k, m + k), 1e12)
    dense[r, c] = cost
    dense[np.arange(k), m + np.arange(k)] = null_cost
    return linear_sum_assignment(dense)
