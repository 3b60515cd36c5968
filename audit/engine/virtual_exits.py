"""Calls whose caller has no CLIENT span: OpenTracing-era and hand-instrumented services inject
the context from their SERVER or INTERNAL span, so the callee's SERVER span is that span's
direct child. Such a hop leaves no unpaired exit behind when it loses the context; the
evidence is the callee's own history and the call pattern learned from the calls that did
propagate.

- `vhops`: the propagated ones (a SERVER/CONSUMER span whose parent is a non-CLIENT span in
  another service). They join `hops` once timing is learned, so every later count sees them.
- `mixed_ops`: callee operations (service, span name) that usually arrive with a remote parent
  but are sometimes roots: their roots are orphans, not entry points.
- `call_patterns`: which caller operation calls such an operation, at what offset from the
  caller span's start and how far before its end, and how many times per caller span.
- virtual exits: caller spans of a pattern with fewer children of the callee operation than
  the pattern says. They join the stitcher's `cand_exits`/`cand_pairs` like unpaired exits,
  scored by the pattern's timing (`CallPatternModel`), and assigned by the same solver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa

from .config import AuditWindow
from .learn import Learned
from .stitch import RANK_SERVICE
from .tables import temp_table
from .timing import StudentT

_MIN_PAIRS = 20  # propagated calls a pattern needs before its timing is trusted
# An operation is a callee losing context when the lower 95% Wilson bound of its share of
# arrivals with a remote parent is at least one half: it *usually* arrives as a call, with
# enough calls to say so. A real entry point that other services also call now and then is a
# root most of the time and stays an entry point.
_MIN_REMOTE_SHARE = 0.5
_Z = 1.96
_NULL_Z = 2.5  # a candidate this far out on both gaps is as likely as "no parent here"
_BUCKET_NS = 100_000_000
_MAX_PER_ORPHAN = 16  # the candidates nearest the pattern's usual offset; the rest cannot win
_PAD_NS = 1_000_000

# Propagated calls without a client span. SERVER spans that `hops` already paired are left out
# first: in a fully instrumented fleet nothing is left to join, so this costs next to nothing.
_VHOPS = """
CREATE OR REPLACE TEMP TABLE vhops AS
WITH c AS (
  SELECT * FROM w WHERE kind IN ('SERVER', 'CONSUMER') AND parent_span_id IS NOT NULL
    AND rid NOT IN (SELECT entry_rid FROM hops WHERE NOT via_link))
SELECT p.rid AS exit_rid, c.rid AS entry_rid, p.service AS caller, p.name AS caller_name, c.service AS callee,
       c.name AS callee_name, c.protocol, c.start_ns::BIGINT - p.start_ns::BIGINT AS d_start,
       p.end_ns::BIGINT - c.end_ns::BIGINT AS d_end, c.start_ns::BIGINT - p.end_ns::BIGINT AS lag,
       p.th AS exit_th, c.th AS entry_th, p.trace_id AS exit_trace_id, c.trace_id AS entry_trace_id,
       c.start_ns AS entry_start_ns, c.start_ns >= $wlo AND c.start_ns < $whi AS in_window
FROM c JOIN w p ON p.trace_id = c.trace_id AND p.span_id = c.parent_span_id
WHERE p.kind NOT IN ('CLIENT', 'PRODUCER') AND p.service <> c.service
"""
_TO_HOPS = """
INSERT INTO hops BY NAME
SELECT exit_rid, entry_rid, caller, callee, protocol, d_start, d_end, lag, exit_th, entry_th,
       false AS via_link, entry_trace_id, entry_start_ns, callee_name AS entry_name
FROM vhops
"""
# per callee operation with calls from a caller without a client span: its arrivals with a
# remote parent (with or without a client span) and its roots, in the finding window
_ARRIVALS = """
WITH ops AS (SELECT DISTINCT callee AS service, callee_name AS name FROM vhops),
arrivals AS (
  SELECT c.service, c.name, count(*) AS remote FROM w c JOIN hops h ON h.entry_rid = c.rid
  JOIN ops USING (service, name)
  WHERE c.start_ns >= $wlo AND c.start_ns < $whi AND NOT h.via_link GROUP BY ALL),
r AS (SELECT service, name, count(*) AS roots FROM roots JOIN ops USING (service, name)
      WHERE kind IN ('SERVER', 'CONSUMER') AND NOT linked GROUP BY ALL)
SELECT service, name, coalesce(remote, 0), coalesce(roots, 0) FROM ops
LEFT JOIN arrivals USING (service, name) LEFT JOIN r USING (service, name)
"""
# per (caller operation, callee operation), from the propagated calls of mixed operations
_PATTERNS = """
WITH v AS (SELECT v.* FROM vhops v JOIN mixed_ops m ON m.service = v.callee AND m.name = v.callee_name
           WHERE v.protocol <> 'messaging'),
per_span AS (SELECT caller, caller_name, callee, callee_name, exit_rid, count(*) AS n FROM v GROUP BY ALL),
mult AS (SELECT caller, caller_name, callee, callee_name, mode(n) AS m FROM per_span GROUP BY ALL)
SELECT caller, caller_name, callee, callee_name, mode(protocol) AS protocol, count(*) AS n,
       any_value(m.m) AS m,
       quantile_cont(d_start, 0.005) AS s_lo, median(d_start) AS s_mid, quantile_cont(d_start, 0.995) AS s_hi,
       quantile_cont(d_end, 0.005) AS e_lo
FROM v JOIN mult m USING (caller, caller_name, callee, callee_name)
GROUP BY caller, caller_name, callee, callee_name HAVING count(*) >= $min_pairs
"""
# Caller spans of a pattern with fewer children of the callee operation than it usually makes:
# one virtual exit per missing call, with the window its callee's orphan must start in.
_VIRTUAL_EXITS = """
CREATE OR REPLACE TEMP TABLE virtual_exits AS
WITH kids AS (SELECT exit_rid, callee, callee_name, count(*) AS n FROM vhops GROUP BY ALL)
SELECT s.rid, s.trace_id, s.span_id, s.service, s.start_ns, s.end_ns, s.th, p.callee AS target,
       p.callee_name, p.protocol, s.start_ns::BIGINT + p.win_lo AS win_lo,
       s.start_ns::BIGINT + p.win_hi AS win_hi,
       s.end_ns::BIGINT - p.end_min AS end_max, s.start_ns::BIGINT + p.s_mid::BIGINT AS usual,
       s.start_ns >= $wlo AND s.start_ns < $whi AS in_window,
       unnest(range(p.m - coalesce(k.n, 0))) AS slot
FROM w s JOIN call_patterns p ON s.service = p.caller AND s.name = p.caller_name
LEFT JOIN kids k ON k.exit_rid = s.rid AND k.callee = p.callee AND k.callee_name = p.callee_name
WHERE coalesce(k.n, 0) < p.m
"""
_NUMBERED = """
CREATE OR REPLACE TEMP TABLE virtual_exits AS
SELECT $base + row_number() OVER (ORDER BY rid, target, callee_name, slot) - 1 AS eid, * FROM virtual_exits
"""
_TO_CAND_EXITS = """
INSERT INTO cand_exits BY NAME
SELECT eid, rid, trace_id, span_id, service, protocol, start_ns, end_ns, th, target, true AS instrumented,
       in_window, win_lo, win_hi
FROM virtual_exits
"""
# Orphans of the callee operation that start in a virtual exit's window and end before it does
# (give or take the learned gap), the nearest to the pattern's usual offset first. Joined on a
# time bucket so that a busy operation does not pair every orphan with every caller span.
_VIRTUAL_PAIRS = """
CREATE OR REPLACE TEMP TABLE virtual_pairs AS
WITH v AS (
  SELECT eid, target, callee_name, trace_id, win_lo, win_hi, end_max, usual,
         unnest(range(win_lo // $b, win_hi // $b + 1)) AS bucket
  FROM virtual_exits),
o AS (SELECT oid, trace_id, service, name, start_ns::BIGINT AS start_ns, end_ns::BIGINT AS end_ns,
             start_ns // $b AS bucket FROM cand_orphans c
      WHERE EXISTS (SELECT 1 FROM call_patterns p WHERE p.callee = c.service AND p.callee_name = c.name)),
pairs AS (
  SELECT DISTINCT o.oid, v.eid, abs(o.start_ns - v.usual) AS off
  FROM o JOIN v ON o.service = v.target AND o.name = v.callee_name AND o.bucket = v.bucket
  WHERE o.start_ns BETWEEN v.win_lo AND v.win_hi AND o.end_ns <= v.end_max AND o.trace_id <> v.trace_id)
SELECT oid, eid, n FROM (
  SELECT *, row_number() OVER (PARTITION BY oid ORDER BY off, eid) AS k, count(*) OVER (PARTITION BY oid) AS n
  FROM pairs) WHERE k <= $k
"""
_REAL_EXITS_WIN = """
DELETE FROM virtual_exits v WHERE EXISTS (
  SELECT 1 FROM cand_exits e WHERE e.service = v.service AND e.target = v.target AND e.protocol = v.protocol)
"""
_EDGE_GAPS = """
SELECT d_start, d_end FROM vhops v JOIN mixed_ops m ON m.service = v.callee AND m.name = v.callee_name
WHERE caller = ? AND callee = ? AND protocol = ? LIMIT 20000
"""
# how many candidates fitted per orphan (before the cap), where stitch.py keeps that count
_COUNTS = """
UPDATE cand_counts SET candidates = coalesce(candidates, 0) + v.n
FROM (SELECT oid, any_value(n) AS n FROM virtual_pairs GROUP BY oid) v WHERE cand_counts.oid = v.oid;
INSERT INTO cand_counts BY NAME
SELECT oid, $rank AS rank, any_value(n) AS candidates, false AS degraded FROM virtual_pairs
WHERE oid NOT IN (SELECT oid FROM cand_counts) GROUP BY oid;
"""
# The calls of these hops for the edges: the propagated ones, and the orphans of mixed
# operations charged to a caller without a client span (their parent, or their usual caller).
_TO_EDGE_CALLS = """
INSERT INTO edge_calls BY NAME
SELECT exit_rid AS rid, exit_trace_id AS trace_id, exit_th AS th, callee AS target, caller, callee, protocol,
       true AS instrumented, true AS propagated
FROM vhops WHERE in_window
UNION ALL
SELECT o.rid, coalesce(o.parent_trace_id, o.trace_id), p.th, o.service, o.caller, o.service, o.protocol,
       true, false
FROM orphan_rows o JOIN mixed_ops m USING (service, name)
LEFT JOIN w p ON o.confidence IS NOT NULL AND p.trace_id = o.parent_trace_id AND p.span_id = o.parent_span_id
WHERE EXISTS (SELECT 1 FROM call_patterns c WHERE c.caller = o.caller AND c.callee = o.service)
"""


@dataclass(frozen=True)
class CallPatternModel:
    """Where in its caller's span a call starts and ends: the gap from the caller span's start
    to the call's start, and from the call's end to the caller span's end (both Student-t,
    fitted robustly). Quacks like a `SyncModel` for the stitcher's costs."""

    start: StudentT  # callee start - caller span start
    end: StudentT  # caller span end - callee end
    pairs: int
    source: str = "edge"

    def nll(self, d1, d2):
        return self.start.nll(d1) + self.end.nll(d2)

    def null(self) -> float:
        return float(
            self.start.nll(self.start.loc + _NULL_Z * self.start.scale)
            + self.end.nll(self.end.loc + _NULL_Z * self.end.scale)
        )

    def reach_ns(self) -> float:
        # virtual exits come with their own windows: the generic candidates' must not widen
        return 0.0

    @classmethod
    def fit(cls, d1: np.ndarray, d2: np.ndarray) -> CallPatternModel:
        return cls(StudentT.fit(d1, 50_000.0), StudentT.fit(d2, 50_000.0), len(d1))


_MIXED_COLUMNS = (
    ("service", pa.string()),
    ("name", pa.string()),
    ("remote", pa.int64()),
    ("roots", pa.int64()),
    ("detail", pa.string()),
)
_PATTERN_COLUMNS = (
    ("caller", pa.string()),
    ("caller_name", pa.string()),
    ("callee", pa.string()),
    ("callee_name", pa.string()),
    ("protocol", pa.string()),
    ("n", pa.int64()),
    ("m", pa.int64()),
    ("win_lo", pa.int64()),
    ("win_hi", pa.int64()),
    ("end_min", pa.int64()),
    ("s_mid", pa.float64()),
)


def _rows_table(con: duckdb.DuckDBPyConnection, name: str, columns: tuple, rows: list[tuple]) -> None:
    data = {c: pa.array([r[i] for r in rows], t) for i, (c, t) in enumerate(columns)}
    temp_table(con, name, data)


def wilson_lower(k: int, n: int, z: float = _Z) -> float:
    """The lower bound of a binomial proportion's Wilson score interval."""
    if n == 0:
        return 0.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def learn_call_patterns(con: duckdb.DuckDBPyConnection, window: AuditWindow, learned: Learned) -> int:
    """Build vhops, mixed_ops, call_patterns and virtual_exits; add the mixed operations to the
    operations that are called (not entry points) and the patterns' timing to `learned`.
    Run after `learn` (the client spans' timing stays their own). Returns the patterns' count."""
    inner = {"wlo": window.start_ns, "whi": window.end_ns}
    con.execute(_VHOPS, inner)
    con.execute(_TO_HOPS)
    mixed = []
    for service, name, remote, roots in con.execute(_ARRIVALS, inner).fetchall():
        if roots and wilson_lower(remote, remote + roots) >= _MIN_REMOTE_SHARE:
            share = roots / (remote + roots)
            detail = f"mixed evidence: a root in {share:.1%} of {remote + roots:,} arrivals"
            mixed.append((service, name, remote, roots, detail))
    _rows_table(con, "mixed_ops", _MIXED_COLUMNS, mixed)
    learned.propagated_callee_ops |= {(s, n) for s, n, *_ in mixed}
    patterns = con.execute(_PATTERNS, {"min_pairs": _MIN_PAIRS}).fetchall()
    rows = []
    for caller, caller_name, callee, callee_name, protocol, n, m, s_lo, s_mid, s_hi, e_lo in patterns:
        key = (caller, callee, protocol)
        if key in learned.sync_models:
            continue  # the same edge also has client spans: their model scores its exits
        pad = _PAD_NS + 0.25 * (s_hi - s_lo)
        rows.append(
            (caller, caller_name, callee, callee_name, protocol, n, m)
            + (int(s_lo - pad), int(s_hi + pad), int(e_lo - pad), float(s_mid))
        )
    _rows_table(con, "call_patterns", _PATTERN_COLUMNS, rows)
    con.execute(_VIRTUAL_EXITS, inner)
    return len(rows)


def add_virtual_candidates(con: duckdb.DuckDBPyConnection, learned: Learned) -> int:
    """Add the virtual exits to `cand_exits` and their fitting orphans to `cand_pairs`, and the
    patterns' timing to `learned` (after `stitch.build_candidates`: the generic candidates'
    windows and models are the client spans' own); return how many pairs were added."""
    # an edge whose caller also has unpaired CLIENT spans to the callee: those are its exits
    con.execute(_REAL_EXITS_WIN)
    edges = con.execute("SELECT DISTINCT service, target, protocol FROM virtual_exits").fetchall()
    for caller, callee, protocol in edges:
        if (caller, callee, protocol) in learned.sync_models:
            continue
        d = con.execute(_EDGE_GAPS, [caller, callee, protocol]).fetchnumpy()
        learned.sync_models[(caller, callee, protocol)] = CallPatternModel.fit(
            d["d_start"].astype(float), d["d_end"].astype(float)
        )
    if not con.execute("SELECT count(*) FROM virtual_exits").fetchone()[0]:
        return 0
    base = con.execute("SELECT coalesce(max(eid) + 1, 0) FROM cand_exits").fetchone()[0]
    before = con.execute("SELECT count(*) FROM cand_pairs").fetchone()[0]
    con.execute(_NUMBERED, {"base": base})
    con.execute(_TO_CAND_EXITS)
    con.execute(_VIRTUAL_PAIRS, {"b": _BUCKET_NS, "k": _MAX_PER_ORPHAN})
    con.execute(
        "INSERT INTO cand_pairs BY NAME SELECT oid, eid, $rank AS rank FROM virtual_pairs",
        {"rank": RANK_SERVICE},
    )
    has_counts = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'cand_counts' AND temporary"
    ).fetchone()[0]
    if has_counts:
        con.execute(_COUNTS, {"rank": RANK_SERVICE})
    con.execute("DROP TABLE virtual_exits; DROP TABLE virtual_pairs")
    return con.execute("SELECT count(*) FROM cand_pairs").fetchone()[0] - before


def virtual_callers(con: duckdb.DuckDBPyConnection) -> set[tuple[str, str]]:
    """(caller, callee) service pairs whose calls come from a caller span that is not a CLIENT."""
    return set(con.execute("SELECT DISTINCT caller, callee FROM call_patterns").fetchall())


def add_virtual_calls(con: duckdb.DuckDBPyConnection) -> None:
    """Add these hops' calls to `edge_calls` (after edges.py made it from the exits)."""
    con.execute(_TO_EDGE_CALLS)
