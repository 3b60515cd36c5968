"""Self-supervised calibration of the stitching confidence on the audited data itself.

Propagated calls have a known parent. A bounded sample of them per edge is cut on purpose: the
server (consumer) span becomes a decoy orphan and its client (producer) span a decoy unpaired
exit, amid the real orphans and unpaired exits of the same time range. The same candidate
generation, scoring, assignment and confidence run on real and decoy orphans together; the
share of decoy links that name their own exit, against their raw confidence, is fitted with
isotonic regression (per protocol, per edge where it has enough links), taken at a Wilson lower
bound, and applied to the real links' confidences. It only ever lowers a confidence: where the
raw confidence keeps its promise, the mapping leaves it alone.

A share of the decoys lose their exit (as if the caller had not been sampled): that share is
the callee's orphans in excess of the unpaired exits that resolve to it, the orphans that
cannot have a stored parent. A link named for such a decoy is wrong, as it is for a real one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb
import numpy as np
from scipy.optimize import isotonic_regression

from .learn import Learned
from .stitch import (
    _BUCKET_NS,
    _BYTES_PER_ROW,
    _EXACT_ONLY,
    CANDIDATES_PER_ORPHAN,
    EXIT_KEYS,
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
_AUG_ORPHANS = """
CREATE OR REPLACE TEMP TABLE cand_orphans AS
SELECT row_number() OVER (ORDER BY start_ns, rid, real_oid NULLS LAST) - 1 AS oid, * FROM (
  SELECT oid AS real_oid, NULL::BIGINT AS true_exit, * EXCLUDE (oid) FROM cal_real_cand_orphans
  UNION ALL BY NAME
  SELECT NULL AS real_oid, d.exit_rid AS true_exit, r.rid, r.trace_id, r.span_id, r.service, r.name, r.kind,
         r.protocol, r.start_ns, r.end_ns, r.th,
         'svc:' || r.service AS k_svc,
         CASE WHEN r.url_path IS NOT NULL THEN 'path:' || r.url_path END AS k_path,
         CASE WHEN r.rpc_service IS NOT NULL THEN 'rpc:' || r.rpc_service || '/' || coalesce(r.rpc_method, '')
         END AS k_rpc,
         CASE WHEN r.messaging_destination IS NOT NULL THEN 'dest:' || r.messaging_destination END AS k_dest,
         CASE WHEN r.messaging_partition IS NOT NULL AND r.messaging_offset IS NOT NULL
                THEN 'kafka:' || coalesce(r.messaging_destination, '') || '/' || r.messaging_partition
                     || '/' || r.messaging_offset
              WHEN r.messaging_message_id IS NOT NULL THEN 'msg:' || r.messaging_message_id END AS k_exact
  FROM cal_decoys d JOIN (
    SELECT rowid AS rid, trace_id, span_id, service_name AS service, kind, name, protocol, start_ns, end_ns,
           sampling_threshold AS th, rpc_service, rpc_method, messaging_destination, messaging_message_id,
           messaging_partition, messaging_offset, coalesce(url_path, url_path(url_full)) AS url_path
    FROM spans WHERE rowid IN (SELECT entry_rid FROM cal_decoys)) r ON r.rid = d.entry_rid)
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
        out = np.asarray(confidence, dtype=float).copy()
        for i in range(len(out)):
            curve = self.edges.get((caller[i], callee[i], protocol[i])) or self.protocols.get(protocol[i])
            if curve is not None:
                out[i] = min(out[i], _evaluate(curve, out[i]))
        return out


def calibrated(con: duckdb.DuckDBPyConnection, cal: Calibration, oid, eid, confidence) -> np.ndarray:
    """The links' (cand_orphans oid, cand_exits eid) confidences through `cal`."""
    if not len(oid) or not (cal.edges or cal.protocols):
        return np.asarray(confidence, dtype=float)
    temp_table(con, "cal_links", {"i": np.arange(len(oid)), "oid": oid, "eid": eid})
    rows = con.execute(
        "SELECT e.service AS caller, o.service AS callee, e.protocol FROM cal_links l"
        " JOIN cand_orphans o USING (oid) JOIN cand_exits e USING (eid) ORDER BY l.i"
    ).fetchnumpy()
    con.execute("DROP TABLE cal_links")
    return cal.apply(confidence, rows["caller"], rows["callee"], rows["protocol"])


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


def _evaluate(curve: tuple[np.ndarray, np.ndarray], value: float) -> float:
    """The step of the block that holds `value` (a value above every block takes the last)."""
    tops, bounds = curve
    i = min(int(np.searchsorted(tops, value, side="left")), len(tops) - 1)
    return float(bounds[i])


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
        for name in _SWAPPED:
            con.execute(f"DROP TABLE IF EXISTS {name}")
            if _exists(con, f"cal_real_{name}"):
                con.execute(f"ALTER TABLE cal_real_{name} RENAME TO {name}")
        for name in ("cal_decoys", "cal_decoy_links"):
            con.execute(f"DROP TABLE IF EXISTS {name}")


def _exists(con, name: str) -> bool:
    q = "SELECT count(*) FROM duckdb_tables() WHERE table_name = $n AND temporary"
    return con.execute(q, {"n": name}).fetchall()[0][0] > 0


def _run(con, learned: Learned, audited: np.ndarray, tol: float, max_lag: float) -> Calibration:
    con.execute(_AUG_ORPHANS)
    # the real unpaired exits (their ids kept), and the decoys' own exits unless withheld
    con.execute("CREATE OR REPLACE TEMP TABLE cand_exits AS SELECT * FROM cal_real_cand_exits")
    first_decoy_exit = con.execute("SELECT coalesce(max(eid) + 1, 0) FROM cand_exits").fetchone()[0]
    con.execute(_DECOY_EXITS, {"tol": int(tol), "max_lag": int(max_lag)})
    con.execute(_EXACT_ONLY)
    con.execute("CREATE OR REPLACE TEMP TABLE cand_pairs (oid BIGINT, eid BIGINT, rank INTEGER)")
    con.execute(
        "CREATE OR REPLACE TEMP TABLE cand_counts"
        " (oid BIGINT, rank INTEGER, candidates BIGINT, kept INTEGER, degraded BOOLEAN)"
    )
    _reuse_candidates(con, first_decoy_exit)
    temp_table(con, "cal_audited", {"real_oid": np.asarray(audited, dtype=np.int64)})
    ids = con.execute(
        "SELECT oid FROM cand_orphans WHERE true_exit IS NOT NULL"
        " OR real_oid IN (SELECT real_oid FROM cal_audited) ORDER BY oid"
    ).fetchnumpy()["oid"]
    got = stitch(con, learned, ids.astype(np.int64))
    temp_table(con, "cal_decoy_links", got.table())
    rows = con.execute(_DECOY_LINKS).fetchnumpy()
    con.execute("DROP TABLE IF EXISTS cal_audited")
    return _fit(rows)


# Real orphans whose candidates the decoys cannot change: none of the decoys' exits shares a key
# with them (at a time inside the exit's window, where a stage needs one), and their exact-key
# status is what it was. They keep the main pass's candidates (`oid` here, `real_oid` there).
_KEPT = """
CREATE OR REPLACE TEMP TABLE cal_kept AS
WITH x AS (SELECT * FROM cand_exits WHERE eid >= $first),
touched AS (
  SELECT o.oid FROM cand_orphans o JOIN x ON o.k_exact = x.k_exact
  UNION ALL
  SELECT o.oid FROM cand_orphans o JOIN x ON o.k_path = x.k_path
    AND o.start_ns::BIGINT BETWEEN x.win_lo AND x.win_hi
  UNION ALL
  SELECT o.oid FROM cand_orphans o JOIN x ON o.k_rpc = x.k_rpc
    AND o.start_ns::BIGINT BETWEEN x.win_lo AND x.win_hi
  UNION ALL
  SELECT o.oid FROM cand_orphans o JOIN x ON o.k_dest = x.k_dest
    AND o.start_ns::BIGINT BETWEEN x.win_lo AND x.win_hi
  UNION ALL
  SELECT o.oid FROM cand_orphans o JOIN x ON o.k_svc = x.k_svc
    AND o.start_ns::BIGINT BETWEEN x.win_lo AND x.win_hi)
SELECT oid, real_oid FROM cand_orphans
WHERE real_oid IS NOT NULL AND oid NOT IN (SELECT oid FROM touched)
  AND (oid IN (SELECT oid FROM exact_only)) = (real_oid IN (SELECT oid FROM cal_real_exact_only))
"""


def _reuse_candidates(con, first_decoy_exit: int) -> None:
    """cand_pairs and cand_counts for the decoys and the real orphans: those the decoys cannot
    touch (_KEPT) copied from the main pass, the others matched again. The same tables as
    matching every orphan again, which took most of the calibration's time at 10M spans."""
    con.execute(_KEPT, {"first": int(first_decoy_exit)})
    con.execute(
        "INSERT INTO cand_counts SELECT k.oid, c.rank, c.candidates, c.kept, c.degraded"
        " FROM cal_real_cand_counts c JOIN cal_kept k ON k.real_oid = c.oid"
    )
    con.execute(
        "INSERT INTO cand_pairs SELECT k.oid, p.eid, p.rank FROM cal_real_cand_pairs p"
        " JOIN cal_kept k ON k.real_oid = p.oid"
    )
    con.execute("ALTER TABLE cand_orphans RENAME TO cal_all_orphans")
    try:
        con.execute(
            "CREATE TEMP TABLE cand_orphans AS SELECT * FROM cal_all_orphans"
            " WHERE oid NOT IN (SELECT oid FROM cal_kept)"
        )
        match_stages(con, CANDIDATES_PER_ORPHAN, _one_slice(con))
    finally:
        con.execute("DROP TABLE IF EXISTS cand_orphans")
        con.execute("ALTER TABLE cal_all_orphans RENAME TO cand_orphans")
        con.execute("DROP TABLE IF EXISTS cal_kept")


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


# The decoys' exits as unpaired exits: the same columns as cand_exits (stitch.py), from xt. A
# decoy exit whose operation reaches several callees gets a row per candidate callee, as a real
# unpaired one does (targets.py, "spread").
_DECOY_EXITS = f"""
INSERT INTO cand_exits BY NAME
SELECT (SELECT coalesce(max(eid) + 1, 0) FROM cand_exits) + row_number() OVER (ORDER BY rid, target) - 1
         AS eid,
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
