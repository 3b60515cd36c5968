"""Self-supervised calibration of the stitching confidence on the audited data itself.

Propagated calls have a known parent. A bounded sample of them per edge is cut on purpose: the
server (consumer) span becomes a decoy orphan and its client (producer) span a decoy unpaired
exit, amid the real orphans and unpaired exits of the same time range. The same candidate
generation, scoring, assignment and confidence run on real and decoy orphans together; the
share of decoy links that name their own exit, against their raw confidence, is fitted with
isotonic regression (per protocol, per edge where it has enough links), taken at a Wilson lower
bound, and applied to the real links' confidences. It only ever lowers a confidence: where the
raw confidence keeps its promise, the mapping leaves it alone.

Only what the decoys can change is done again: the real orphans that share a key with a decoy's
exit are matched again (the others keep the main pass's candidates), and the assignment is
solved over the connected groups of orphans and exits that hold a decoy orphan, the only ones
whose links are scored.

A share of the decoys lose their exit (as if the caller had not been sampled): that share is
the callee's orphans in excess of the unpaired exits that resolve to it, the orphans that
cannot have a stored parent. A link named for such a decoy is wrong, as it is for a real one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb
import numpy as np
from scipy.optimize import isotonic_regression
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from .learn import Learned
from .stitch import (
    _BUCKET_NS,
    _BYTES_PER_ROW,
    _EXACT_ONLY,
    CANDIDATES_PER_ORPHAN,
    EXIT_KEYS,
    ORPHAN_KEYS,
    _memory_limit_bytes,
    match_stages,
    stitch,
)
from .tables import temp_table

DECOYS_PER_EDGE = 300  # at most, per (caller, callee, protocol): bounds the added time and memory
MIN_EDGE_LINKS = 100  # decoy links an edge needs for a curve of its own; else its protocol's
MIN_PROTOCOL_LINKS = 200  # decoy links a protocol needs for a curve; else confidences stay raw
MIN_BLOCK = 50  # decoy links per step of a curve, at least
_Z = 1.0  # the Wilson bound's z (one-sided about 84%)
_SWAPPED = ("cand_orphans", "cand_exits", "cand_pairs", "cand_counts", "exact_only", "stitch_orphans")
_WORK_TABLES = (
    "cal_decoys",
    "cal_decoy_orphans",
    "cal_decoy_exits",
    "cal_audited",
    "cal_rematch",
    "cal_pairs",
    "cal_subset",
    "cal_decoy_links",
)

# Sampled propagated calls: per edge, up to `cap` (the callee's real orphans, at least 50, at most
# DECOYS_PER_EDGE), chosen by a hash of the exit's ids (not its row number) so runs are reproducible
# whatever the order the spans were stored in. `orphaned`: the callee's
# orphans in excess of its unpaired exits, the share of decoys whose exit is withheld.
_DECOYS = """
CREATE OR REPLACE TEMP TABLE cal_decoys AS
WITH orphans AS (SELECT service, count(*) AS n FROM cand_orphans GROUP BY 1),
exits AS (  -- an exit with a row per candidate callee counts by its share
  SELECT target, sum(coalesce(share, 1.0)) AS n FROM cand_exits WHERE instrumented AND in_window
  GROUP BY 1),
calls AS (
  SELECT h.exit_rid, h.entry_rid, h.caller, h.callee, x.protocol, x.trace_id, x.span_id,
         row_number() OVER (PARTITION BY h.caller, h.callee, x.protocol
                            ORDER BY hash(x.trace_id, x.span_id, $seed), x.trace_id, x.span_id) AS k,
         greatest(0.0, 1.0 - coalesce(e.n, 0) / o.n) AS orphaned, o.n AS orphans
  FROM hops h JOIN xt x ON x.rid = h.exit_rid AND x.target = h.callee AND x.instrumented
  JOIN orphans o ON o.service = h.callee LEFT JOIN exits e ON e.target = h.callee
  WHERE NOT h.via_link AND x.continued_to_target AND x.protocol <> 'db' AND x.in_window)
SELECT exit_rid, entry_rid, caller, callee, protocol,
       (hash(span_id, trace_id, $seed) % 1000000) / 1e6 < least(orphaned, 0.9) AS withheld
FROM calls WHERE k <= least($cap, greatest(50, orphans))
"""
# The decoys' orphans, with ids after the real orphans' ($first on): the real ones are not copied
_DECOY_ORPHANS = f"""
CREATE OR REPLACE TEMP TABLE cal_decoy_orphans AS
SELECT $first + row_number() OVER (ORDER BY r.start_ns, r.rid) - 1 AS oid,
       NULL::BIGINT AS real_oid, d.exit_rid AS true_exit,
       r.rid, r.trace_id, r.span_id, r.service, r.name, r.kind, r.protocol, r.start_ns, r.end_ns, r.th,
       r.k_svc, r.k_path, r.k_rpc, r.k_dest, r.k_exact
FROM cal_decoys d JOIN (
  SELECT *,
{ORPHAN_KEYS}  FROM (
    SELECT rowid AS rid, trace_id, span_id, service_name AS service, kind, name, protocol, start_ns, end_ns,
           sampling_threshold AS th, rpc_service, rpc_method, messaging_destination, messaging_message_id,
           messaging_partition, messaging_offset, coalesce(url_path, url_path(url_full)) AS url_path
    FROM spans WHERE rowid IN (SELECT entry_rid FROM cal_decoys))) r ON r.rid = d.entry_rid
"""
# Real orphans (cal_real_cand_orphans) and decoys in one table: `oid` the real one or the decoy's
# id, `real_oid` null for decoys. The assignment's ids are numbered afresh (_run).
_BOTH_ORPHANS = """
SELECT oid AS real_oid, NULL::BIGINT AS true_exit, * FROM cal_real_cand_orphans WHERE oid IN ({ids})
UNION ALL BY NAME
SELECT * FROM cal_decoy_orphans WHERE oid IN ({ids})
"""


@dataclass
class Calibration:
    """Monotone maps from raw confidence to a lower bound of observed precision: per edge
    (caller, callee, protocol) and per protocol. `links`: decoy links per protocol, for the run."""

    edges: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    protocols: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    links: dict[str, int] = field(default_factory=dict)
    right: dict[str, int] = field(default_factory=dict)

    def apply(self, confidence: np.ndarray, caller, callee, protocol) -> np.ndarray:
        """The calibrated confidences (never above the raw ones)."""
        edges = list(zip(caller, callee, protocol))
        distinct = list(dict.fromkeys(edges))
        number = {e: i for i, e in enumerate(distinct)}
        return self.apply_edges(confidence, np.array([number[e] for e in edges], dtype=np.int64), distinct)

    def apply_edges(self, confidence: np.ndarray, edge: np.ndarray, edges: list[tuple]) -> np.ndarray:
        """`apply` with each link's edge given as an index into `edges` (caller, callee, protocol):
        the links of one edge are mapped at once (millions of links at 10M spans)."""
        out = np.asarray(confidence, dtype=float).copy()
        order = np.argsort(edge, kind="stable")
        bounds = np.searchsorted(edge[order], np.arange(len(edges) + 1))
        for i, (caller, callee, protocol) in enumerate(edges):
            curve = self.edges.get((caller, callee, protocol)) or self.protocols.get(protocol)
            if curve is not None:
                at = order[bounds[i] : bounds[i + 1]]
                out[at] = np.minimum(out[at], _evaluate_all(curve, out[at]))
        return out


# Each link's edge (by the link's position in the arrays given)
_LINK_EDGES = """
CREATE OR REPLACE TEMP TABLE cal_link_edges AS
SELECT l.i, e.service AS caller, o.service AS callee, e.protocol FROM cal_links l
JOIN cand_orphans o USING (oid) JOIN cand_exits e USING (eid)
"""


def calibrated(con: duckdb.DuckDBPyConnection, cal: Calibration, oid, eid, confidence) -> np.ndarray:
    """The links' (cand_orphans oid, cand_exits eid) confidences through `cal`."""
    if not len(oid) or not (cal.edges or cal.protocols):
        return np.asarray(confidence, dtype=float)
    temp_table(con, "cal_links", {"i": np.arange(len(oid)), "oid": oid, "eid": eid})
    try:
        con.execute(_LINK_EDGES)
        order = "ORDER BY caller, callee, protocol"
        edges = con.execute(
            f"SELECT DISTINCT caller, callee, protocol FROM cal_link_edges {order}"
        ).fetchall()
        number = con.execute(
            f"SELECT i, dense_rank() OVER ({order}) - 1 AS n FROM cal_link_edges"
        ).fetchnumpy()
    finally:
        for name in ("cal_links", "cal_link_edges"):
            con.execute(f"DROP TABLE IF EXISTS {name}")
    edge = np.full(len(oid), -1, dtype=np.int64)  # a link without its rows keeps its confidence
    edge[number["i"].astype(np.int64)] = number["n"]
    return cal.apply_edges(confidence, edge, edges)


def fit_curve(raw: np.ndarray, right: np.ndarray, z: float = _Z) -> tuple[np.ndarray, np.ndarray]:
    """A monotone (non-decreasing) map from raw confidence to observed precision, each isotonic
    block taken at its Wilson lower bound: (block upper raw confidence, bound), as steps."""
    order = np.argsort(raw, kind="stable")
    x, y = np.asarray(raw, float)[order], np.asarray(right, float)[order]
    fit = isotonic_regression(y)
    # adjacent blocks merged until each holds MIN_BLOCK links: a bound on a few links says nothing
    cuts, held = [0], 0
    for a, b in zip(fit.blocks[:-1], fit.blocks[1:]):
        held += b - a
        if held >= MIN_BLOCK and len(x) - b >= MIN_BLOCK:
            cuts.append(int(b))
            held = 0
    cuts.append(len(x))
    starts, ends = np.array(cuts[:-1]), np.array(cuts[1:])
    n = (ends - starts).astype(float)
    p = np.add.reduceat(y, starts) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lower = isotonic_regression(centre - half, weights=n).x  # the bounds stay monotone
    return x[ends - 1], np.clip(lower, 0.0, 1.0)


def _evaluate_all(curve: tuple[np.ndarray, np.ndarray], values: np.ndarray) -> np.ndarray:
    """The step of the block that holds each value (a value above every block takes the last)."""
    tops, bounds = curve
    return bounds[np.minimum(np.searchsorted(tops, values, side="left"), len(tops) - 1)]


def calibrate(
    con: duckdb.DuckDBPyConnection,
    learned: Learned,
    audited: np.ndarray,
    default_skew_ns: float,
    max_lag_ns: float,
    seed: int = 1,
) -> Calibration:
    """Run the decoy stitching next to the real orphans `audited` and fit the maps. Leaves the
    candidate tables as they were."""
    con.execute(_DECOYS, {"seed": seed, "cap": DECOYS_PER_EDGE})
    if not con.execute("SELECT count(*) FROM cal_decoys").fetchall()[0][0]:
        return Calibration()
    for name in _SWAPPED:
        con.execute(f"DROP TABLE IF EXISTS cal_real_{name}")
        if _exists(con, name):
            con.execute(f"ALTER TABLE {name} RENAME TO cal_real_{name}")
    try:
        tol, max_lag = learned.sync_reach_ns(default_skew_ns), min(learned.lag_reach_ns(), max_lag_ns)
        return _run(con, learned, audited, tol, max_lag)
    finally:
        con.execute("DROP VIEW IF EXISTS cand_exits")
        for name in _SWAPPED:
            con.execute(f"DROP TABLE IF EXISTS {name}")
            if _exists(con, f"cal_real_{name}"):
                con.execute(f"ALTER TABLE cal_real_{name} RENAME TO {name}")
        for name in _WORK_TABLES:
            con.execute(f"DROP TABLE IF EXISTS {name}")


def _exists(con, name: str) -> bool:
    q = "SELECT count(*) FROM duckdb_tables() WHERE table_name = $n AND temporary"
    return con.execute(q, {"n": name}).fetchall()[0][0] > 0


def _run(con, learned: Learned, audited: np.ndarray, tol: float, max_lag: float) -> Calibration:
    # the real unpaired exits (their ids kept), and the decoys' own exits unless withheld: a view,
    # not a copy of the real ones
    first_exit = con.execute("SELECT coalesce(max(eid) + 1, 0) FROM cal_real_cand_exits").fetchone()[0]
    con.execute("CREATE OR REPLACE TEMP TABLE cal_decoy_exits AS FROM cal_real_cand_exits LIMIT 0")
    con.execute(_DECOY_EXITS, {"first": int(first_exit), "tol": int(tol), "max_lag": int(max_lag)})
    con.execute("CREATE TEMP VIEW cand_exits AS FROM cal_real_cand_exits UNION ALL FROM cal_decoy_exits")
    first_orphan = con.execute("SELECT coalesce(max(oid) + 1, 0) FROM cal_real_cand_orphans").fetchone()[0]
    con.execute(_DECOY_ORPHANS, {"first": int(first_orphan)})
    temp_table(con, "cal_audited", {"real_oid": np.asarray(audited, dtype=np.int64)})
    _match_touched(con)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE cal_pairs AS SELECT oid, eid, rank FROM cand_pairs UNION ALL"
        " SELECT oid, eid, rank FROM cal_real_cand_pairs WHERE oid IN (SELECT real_oid FROM cal_audited)"
        " AND oid NOT IN (SELECT oid FROM cal_rematch)"
    )
    temp_table(con, "cal_subset", {"work": _decoy_groups(con, first_orphan)})
    # the assignment over the decoys' groups only, its orphans numbered in time order as the
    # main pass numbers them (the assignment windows on that order)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE cand_orphans AS"
        " SELECT row_number() OVER (ORDER BY start_ns, rid, real_oid NULLS LAST) - 1 AS oid,"
        " oid AS work, * EXCLUDE (oid) FROM (" + _BOTH_ORPHANS.format(ids="SELECT work FROM cal_subset") + ")"
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE cand_pairs AS"
        " SELECT o.oid, p.eid, p.rank FROM cal_pairs p JOIN cand_orphans o ON o.work = p.oid"
    )
    ids = con.execute("SELECT oid FROM cand_orphans ORDER BY oid").fetchnumpy()["oid"]
    got = stitch(con, learned, ids.astype(np.int64))
    temp_table(con, "cal_decoy_links", got.table())
    return _fit(con.execute(_DECOY_LINKS).fetchnumpy())


# The audited real orphans whose candidates the decoys can change: a decoy's exit shares a key
# with them (at a time inside the exit's window, where a stage needs one), or their exact-key
# status changes (exact_only, with the decoys' exits). Every other one keeps the main pass's
# candidates: the same as matching every orphan again, which took most of the calibration's time
# at 10M spans.
_NEAR = "o.bucket = x.bucket AND o.start BETWEEN x.win_lo AND x.win_hi"  # in the exit's window
_TOUCHED = f"""
CREATE OR REPLACE TEMP TABLE cal_rematch AS
WITH o AS (  -- joined on the key and the 100 ms bucket of the start, then the window
  SELECT oid, start_ns::BIGINT AS start, start_ns::BIGINT // $b AS bucket,
         k_svc, k_path, k_rpc, k_dest, k_exact
  FROM cal_real_cand_orphans WHERE oid IN (SELECT real_oid FROM cal_audited)),
x AS (SELECT *, unnest(range(win_lo // $b, win_hi // $b + 1)) AS bucket FROM cal_decoy_exits),
dests AS (SELECT DISTINCT k_dest FROM cand_exits WHERE k_exact IS NOT NULL)
SELECT o.oid FROM o JOIN (SELECT DISTINCT k_exact FROM cal_decoy_exits) x ON o.k_exact = x.k_exact
UNION
SELECT o.oid FROM o JOIN x ON o.k_path = x.k_path AND {_NEAR}
UNION
SELECT o.oid FROM o JOIN x ON o.k_rpc = x.k_rpc AND {_NEAR}
UNION
SELECT o.oid FROM o JOIN x ON o.k_dest = x.k_dest AND {_NEAR}
UNION
SELECT o.oid FROM o JOIN x ON o.k_svc = x.k_svc AND {_NEAR}
UNION
SELECT oid FROM o WHERE k_exact IS NOT NULL
  AND coalesce(k_dest IN (FROM dests), false) <> (oid IN (SELECT oid FROM cal_real_exact_only))
UNION
SELECT oid FROM cal_decoy_orphans
"""


def _match_touched(con) -> None:
    """cal_rematch (the decoys and the real orphans they touch), and their candidates in
    cand_pairs, matched again next to the decoys' exits."""
    con.execute(_TOUCHED, {"b": _BUCKET_NS})
    ids = "SELECT oid FROM cal_rematch"
    con.execute(f"CREATE OR REPLACE TEMP TABLE cand_orphans AS {_BOTH_ORPHANS.format(ids=ids)}")
    con.execute(_EXACT_ONLY)
    con.execute("CREATE OR REPLACE TEMP TABLE cand_pairs (oid BIGINT, eid BIGINT, rank INTEGER)")
    con.execute(
        "CREATE OR REPLACE TEMP TABLE cand_counts"
        " (oid BIGINT, rank INTEGER, candidates BIGINT, kept INTEGER, degraded BOOLEAN)"
    )
    match_stages(con, CANDIDATES_PER_ORPHAN, _one_slice(con))


def _decoy_groups(con, first_decoy: int) -> np.ndarray:
    """The orphans (ids of cal_pairs) in the connected groups of orphans and exits that hold a
    decoy orphan. Only decoy links are scored, and the assignment and its marginals are solved
    per group: the others need not be solved again (all but a few per cent of a large window's).
    An exit with a row per candidate callee is one column of the assignment (stitch.py): its
    rows are one node here too."""
    pairs = con.execute("SELECT oid, eid FROM cal_pairs").fetchnumpy()
    oid, eid = pairs["oid"].astype(np.int64), pairs["eid"].astype(np.int64)
    if not len(oid):
        return oid
    spread = con.execute("SELECT eid, rid FROM cand_exits WHERE share IS NOT NULL").fetchnumpy()
    n_e = int(eid.max()) + 1
    column = np.arange(n_e)
    rows = spread["eid"].astype(np.int64)
    inside = rows < n_e
    _, slot = np.unique(spread["rid"][inside], return_inverse=True)
    column[rows[inside]] = n_e + slot
    n_o, n_c = int(oid.max()) + 1, n_e + (int(slot.max()) + 1 if len(slot) else 0)
    col = column[eid]
    del column, eid, pairs
    graph = csr_matrix((np.ones(len(oid), np.int8), (oid, n_o + col)), shape=(n_o + n_c, n_o + n_c))
    _, label = connected_components(graph, directed=False)
    del graph, col
    held = np.zeros(label.max() + 1, dtype=bool)
    held[label[oid[oid >= first_decoy]]] = True
    orphans = np.unique(oid)
    return orphans[held[label[orphans]]]


def _one_slice(con) -> list[tuple[int, int]] | None:
    """The orphans matched again are few (the decoys and their neighbours): one time slice for all
    when they fit the memory a slice is sized for. The join then holds them, not the exits, which
    only stream past; a slice that still runs out of memory is halved as any other."""
    n, lo, hi = con.execute(
        "SELECT count(*), min(start_ns)::BIGINT, max(start_ns)::BIGINT FROM cand_orphans"
    ).fetchone()
    if not n or n > _memory_limit_bytes(con) // 4 // _BYTES_PER_ROW:
        return None
    return [(lo // _BUCKET_NS * _BUCKET_NS, (hi // _BUCKET_NS + 1) * _BUCKET_NS)]


# The decoys' exits as unpaired exits, ids from $first on: the same columns as cand_exits
# (stitch.py), from xt. A
# decoy exit whose operation reaches several callees gets a row per candidate callee, as a real
# unpaired one does (targets.py, "spread").
_DECOY_EXITS = f"""
INSERT INTO cal_decoy_exits BY NAME
SELECT $first + row_number() OVER (ORDER BY rid, target) - 1 AS eid,
       rid, trace_id, span_id, service, protocol, start_ns, end_ns, th, target, instrumented, in_window,
       share, CASE WHEN share IS NOT NULL THEN name END AS op,
       'svc:' || target AS k_svc,
{EXIT_KEYS}FROM (
  SELECT x.* REPLACE (coalesce(c.target, x.target) AS target, c.share AS share) FROM xt x
  LEFT JOIN op_callees c ON x.share IS NOT NULL AND c.service = x.service AND c.name = x.name
    AND c.protocol = x.protocol
  WHERE x.rid IN (SELECT exit_rid FROM cal_decoys)) xt
WHERE EXISTS (
  SELECT 1 FROM cal_decoys d WHERE d.exit_rid = xt.rid AND NOT d.withheld
    AND (d.callee = xt.target OR xt.share IS NOT NULL))
"""
# Each decoy orphan: its edge (from its own exit), and the link named for it, if any.
_DECOY_LINKS = """
SELECT d.caller, d.callee, d.protocol, l.confidence, e.rid = d.exit_rid AS is_right
FROM cand_orphans o JOIN cal_decoys d ON d.entry_rid = o.rid
JOIN cal_decoy_links l ON l.oid = o.oid JOIN cand_exits e ON e.eid = l.eid
WHERE o.true_exit IS NOT NULL
"""


def _fit(rows: dict) -> Calibration:
    cal = Calibration()
    if not len(rows["confidence"]):
        return cal
    conf, right = rows["confidence"].astype(float), rows["is_right"].astype(bool)
    protocol = np.asarray(rows["protocol"], dtype=object)
    edge = np.array([f"{a}\x00{b}\x00{c}" for a, b, c in zip(rows["caller"], rows["callee"], protocol)])
    for p in np.unique(protocol):
        m = protocol == p
        cal.links[p], cal.right[p] = int(m.sum()), int(right[m].sum())
        if m.sum() >= MIN_PROTOCOL_LINKS:  # fewer: too few to say more than the raw confidence
            cal.protocols[p] = fit_curve(conf[m], right[m])
    for e in np.unique(edge):
        m = edge == e
        if m.sum() >= MIN_EDGE_LINKS:
            caller, callee, p = e.split("\x00")
            cal.edges[(caller, callee, p)] = fit_curve(conf[m], right[m])
    return cal
