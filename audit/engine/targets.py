"""Resolve every exit to its callee with what `learn` found, in one small table that DuckDB
joins back to the exits (`xt`: one row per exit and callee; a message has one per consumer group)."""

from __future__ import annotations

import duckdb
import pyarrow as pa

from .learn import Learned
from .tables import temp_table

_KEYS = (
    "protocol",
    "server_address",
    "server_port",
    "peer_service",
    "rpc_service",
    "messaging_destination",
    "db_system",
)

# `pending`: a message not consumed yet: sent less than a typical lag before its consumer
# group's newest span. Neither dropped nor counted. (A synchronous call needs no such care: its
# server span ended before the client span did, so both were exported by the time either is
# read, give or take the exporters' batching, which the settle delay covers.)
_EXIT_TARGETS = f"""
CREATE OR REPLACE TEMP TABLE xt AS
SELECT x.*, x.protocol = 'messaging' AND x.instrumented AND NOT x.continued_to_target
            AND x.end_ns::BIGINT + $typical_lag > coalesce(n.newest, 0) AS pending
FROM (
  SELECT e.*, t.target, t.instrumented, t.how, NULL::DOUBLE AS share,
         CASE WHEN NOT t.instrumented THEN e.continued
              WHEN e.protocol = 'messaging' THEN EXISTS (
                SELECT 1 FROM hops h WHERE h.exit_rid = e.rid AND h.callee = t.target)
              ELSE e.continued END AS continued_to_target
  FROM exits e JOIN exit_target_map t
    ON {" AND ".join(f"e.{k} IS NOT DISTINCT FROM t.{k}" for k in _KEYS)}) x
LEFT JOIN (SELECT service, max(start_ns)::BIGINT AS newest FROM w GROUP BY service) n ON n.service = x.target
"""


def resolve_exits(con: duckdb.DuckDBPyConnection, learned: Learned) -> None:
    keys = con.execute(f"SELECT DISTINCT {', '.join(_KEYS)} FROM exits").fetchall()
    rows = []
    for key in keys:
        protocol, address, port, peer, rpc_service, destination, db_system = key
        for t in learned.resolve(protocol, address, port, peer, rpc_service, destination, db_system):
            rows.append((*key, t.name, t.instrumented, t.how))
    columns = list(zip(*rows)) if rows else [[] for _ in range(len(_KEYS) + 3)]
    table = pa.table(
        {
            **{
                k: pa.array(columns[i], type=pa.int32() if k == "server_port" else pa.string())
                for i, k in enumerate(_KEYS)
            },
            "target": pa.array(columns[len(_KEYS)], type=pa.string()),
            "instrumented": pa.array(columns[len(_KEYS) + 1], type=pa.bool_()),
            "how": pa.array(columns[len(_KEYS) + 2], type=pa.string()),
        }
    )
    temp_table(con, "exit_target_map", table)
    con.execute(_EXIT_TARGETS, {"typical_lag": int(learned.default_lag.lag.quantile(0.0))})
    _resolve_by_operation(con, learned)
    _spread_by_operation(con, learned)
    con.execute("DROP TABLE exits")  # xt holds it all now; at 10M spans, memory is the limit
    # the address keys did their work above; dropping a column frees it without a copy
    for column in ("server_address", "server_port", "peer_service"):
        con.execute(f"ALTER TABLE xt DROP COLUMN {column}")


# The weakest resolution: an exit that names no target at all (no address, URL, peer.service,
# and no rpc.service a known service serves) takes the callee its operation's propagated calls
# land in (learn.py, `operation_targets`). Synchronous calls only: their `continued_to_target`
# is `continued` whatever the target, so only the target columns change.
_BY_OPERATION = """
UPDATE xt SET target = m.target, instrumented = true, how = m.how
FROM exit_operation_map m
WHERE xt.service = m.service AND xt.name = m.name AND xt.protocol = m.protocol
  AND NOT xt.instrumented AND xt.server_address IS NULL AND xt.peer_service IS NULL
  AND xt.protocol NOT IN ('messaging', 'db') AND xt.db_system IS NULL
"""


def _resolve_by_operation(con: duckdb.DuckDBPyConnection, learned: Learned) -> None:
    ops = [
        (*op, callee, f"operation (learned from {n} propagated calls)")
        for op, (callee, n) in learned.operation_targets.items()
    ]
    if not ops:
        return
    names = ("service", "name", "protocol", "target", "how")
    temp_table(
        con,
        "exit_operation_map",
        {k: pa.array([r[i] for r in ops], pa.string()) for i, k in enumerate(names)},
    )
    con.execute(_BY_OPERATION)


# An exit that names no target, of an operation whose propagated calls spread over several
# callees (learn.py, `operation_callees`; TrainTicket's `HTTP GET`: price, route, station,
# train). If it continued, its callee is its child's. If not, it may have gone to any of them:
# it gets one row per candidate callee, `share` the callee's share of the operation's
# propagated calls (the prior stitching weighs it with), and stitching keeps it to one orphan
# (stitch.py, its `slot`). `collapse_spread_exits` leaves one row per exit after stitching, so
# that the findings and edges count it once. `share` is NULL on every other row of xt.
_SPREAD_EXITS = """
CREATE OR REPLACE TEMP TABLE spread_exits AS
SELECT x.rid, x.continued, x.service, x.name, x.protocol FROM xt x
WHERE NOT x.instrumented AND x.server_address IS NULL AND x.peer_service IS NULL
  AND x.protocol NOT IN ('messaging', 'db') AND x.db_system IS NULL
  AND EXISTS (SELECT 1 FROM op_callees c WHERE c.service = x.service AND c.name = x.name
              AND c.protocol = x.protocol)
"""
_SPREAD_CONTINUED = """
UPDATE xt SET target = c.callee, instrumented = true, share = coalesce(c.share, 0.0), how = c.how
FROM (
  SELECT s.rid, h.callee, o.share, 'operation: its child in ' || h.callee AS how
  FROM spread_exits s
  JOIN (SELECT exit_rid, min(callee) AS callee FROM hops WHERE NOT via_link GROUP BY 1) h
    ON h.exit_rid = s.rid
  LEFT JOIN op_callees o ON o.service = s.service AND o.name = s.name AND o.protocol = s.protocol
    AND o.target = h.callee
  WHERE s.continued) c
WHERE xt.rid = c.rid
"""
_SPREAD_UNPAIRED = """
INSERT INTO xt
SELECT x.* REPLACE (c.target AS target, true AS instrumented, 'operation: one of ' || c.how AS how,
                    c.share AS share)
FROM xt x JOIN op_callees c ON c.service = x.service AND c.name = x.name AND c.protocol = x.protocol
WHERE x.rid IN (SELECT rid FROM spread_exits WHERE NOT continued);
DELETE FROM xt WHERE share IS NULL AND rid IN (SELECT rid FROM spread_exits WHERE NOT continued);
"""


def _spread_by_operation(con: duckdb.DuckDBPyConnection, learned: Learned) -> None:
    # per (operation, callee): its share, and the prior of a callee operation the operation's
    # calls never reached (half a call of that callee's)
    rows = [
        (*op, callee, m.share(callee), m.share(callee) * 0.5 / (m.services[callee] + 1))
        + (f"{len(m.services)} callees of its {m.calls:,} propagated calls",)
        for op, m in learned.operation_callees.items()
        for callee in m.services
    ]
    names = ("service", "name", "protocol", "target", "share", "unseen", "how")
    types = {"share": pa.float64(), "unseen": pa.float64()}
    temp_table(
        con,
        "op_callees",
        {k: pa.array([r[i] for r in rows], types.get(k, pa.string())) for i, k in enumerate(names)},
    )
    # the prior of a pair: the share of the operation's calls that reached the orphan's own
    # operation (callee, span name); stitch.py joins it on the pairs of spread exits
    priors = [
        (*op, callee, callee_name, n / m.calls)
        for op, m in learned.operation_callees.items()
        for (callee, callee_name), n in m.operations.items()
    ]
    names = ("service", "name", "protocol", "target", "callee_name", "prior")
    types = {"prior": pa.float64()}
    temp_table(
        con,
        "op_priors",
        {k: pa.array([r[i] for r in priors], types.get(k, pa.string())) for i, k in enumerate(names)},
    )
    if not rows:
        return
    con.execute(_SPREAD_EXITS)
    con.execute(_SPREAD_CONTINUED)
    con.execute(_SPREAD_UNPAIRED)
    con.execute("DROP TABLE spread_exits")


# One row per spread exit again: the callee its orphan was stitched to, else one drawn by the
# callees' shares with a hash of the exit's ids (each edge gets its share of the unstitched
# exits in expectation, in whole calls, and the same spans always give the same edges).
_COLLAPSE = """
CREATE OR REPLACE TEMP TABLE spread_choice AS
WITH linked AS (
  SELECT e.rid, min(e.target) AS target FROM orphan_rows o JOIN stitched s USING (oid)
  JOIN cand_exits e ON e.eid = s.eid
  WHERE o.confidence IS NOT NULL AND e.share IS NOT NULL GROUP BY 1),
r AS (
  SELECT rid, target, share,
         sum(share) OVER (PARTITION BY rid ORDER BY target ROWS UNBOUNDED PRECEDING)
           / sum(share) OVER (PARTITION BY rid) AS upto,
         (hash(trace_id, span_id) % 1000000) / 1e6 AS u
  FROM xt WHERE share IS NOT NULL AND NOT continued_to_target)
SELECT r.rid, coalesce(any_value(l.target), min_by(r.target, r.upto) FILTER (WHERE r.upto > r.u),
                       max_by(r.target, r.upto)) AS target,
       any_value(l.target) IS NOT NULL AS linked
FROM r LEFT JOIN linked l USING (rid) GROUP BY r.rid;
DELETE FROM xt WHERE share IS NOT NULL AND NOT continued_to_target AND NOT EXISTS (
  SELECT 1 FROM spread_choice c WHERE c.rid = xt.rid AND c.target = xt.target);
UPDATE xt SET how = how || CASE WHEN c.linked THEN '; its orphan was stitched here'
                                ELSE '; counted here by its ' || round(100 * share)::INTEGER || '% share' END
FROM spread_choice c WHERE c.rid = xt.rid AND xt.share IS NOT NULL AND NOT xt.continued_to_target;
DROP TABLE spread_choice;
"""


def collapse_spread_exits(con: duckdb.DuckDBPyConnection) -> None:
    """After stitching (orphan_rows, stitched, cand_exits): one row per exit in xt again."""
    if con.execute("SELECT count(*) FROM op_callees").fetchone()[0]:
        con.execute(_COLLAPSE)
