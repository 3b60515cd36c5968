"""Service edges: per caller, callee and protocol, how many calls the caller's exits made and
how many of them the callee continued. For a peer without spans (a database, an external
host) a call counts as propagated when its exit span continues the caller's trace. A peer
address that stitching showed to be a service (a proxy in front of it) is merged into it."""

from __future__ import annotations

import duckdb

from ..contract.document import Edge
from .virtual_exits import add_virtual_calls

# One row per exit in the window and callee it reached (or should have): the edges below count
# them, and the sampling figures (sampling_edges.py) weigh them.
_EDGE_CALLS = """
CREATE OR REPLACE TEMP TABLE edge_calls AS
WITH remapped AS (  -- (caller, unknown peer) -> the service its orphans belong to
  SELECT e.service AS caller, e.target, mode(o.service) AS service FROM orphan_rows o
  JOIN stitched s USING (oid) JOIN cand_exits e ON e.eid = s.eid
  WHERE o.confidence IS NOT NULL AND NOT e.instrumented GROUP BY ALL)
SELECT x.rid, x.trace_id, x.th, x.target, x.service AS caller, coalesce(r.service, x.target) AS callee,
  x.protocol,
       coalesce(x.rpc_system, x.messaging_system, x.db_system) AS system,
       x.instrumented OR r.service IS NOT NULL AS instrumented,
       CASE WHEN x.instrumented THEN x.continued_to_target
            WHEN r.service IS NOT NULL THEN x.continued  -- a proxy in front of a service
            ELSE NOT x.is_root END AS propagated
FROM xt x LEFT JOIN remapped r ON r.caller = x.service AND r.target = x.target
WHERE x.in_window AND NOT x.pending
"""
_EDGES = """
WITH calls AS (
  SELECT caller, callee, protocol, any_value(system) AS system, bool_or(instrumented) AS instrumented,
         count(*) AS calls, count(*) FILTER (WHERE propagated) AS propagated
  FROM edge_calls GROUP BY ALL),
stitched AS (
  SELECT caller, service AS callee, protocol, count(*) AS stitched FROM orphan_rows
  WHERE confidence IS NOT NULL GROUP BY ALL),
causes AS (
  SELECT caller, callee, protocol, mode(cause) AS cause FROM findings
  WHERE kind IN ('orphan_root', 'in_process_break') AND caller IS NOT NULL GROUP BY ALL)
SELECT c.caller, c.callee,
       CASE WHEN c.protocol IN ('http', 'grpc', 'rpc', 'messaging', 'db') THEN c.protocol ELSE 'unknown' END,
       any_value(c.system), bool_or(c.instrumented), sum(c.calls)::BIGINT, sum(c.propagated)::BIGINT,
       coalesce(any_value(s.stitched), 0)::BIGINT, any_value(k.cause)
FROM calls c
LEFT JOIN stitched s ON s.caller = c.caller AND s.callee = c.callee AND s.protocol = c.protocol
LEFT JOIN causes k ON k.caller = c.caller AND k.callee = c.callee AND k.protocol = c.protocol
GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""


def build_edges(con: duckdb.DuckDBPyConnection) -> list[Edge]:
    """Create the temp table `edge_calls`; return the edges it adds up to."""
    con.execute(_EDGE_CALLS)
    add_virtual_calls(con)  # calls from caller spans that are not CLIENT spans
    edges = []
    for caller, callee, protocol, system, instrumented, calls, propagated, stitched, cause in con.execute(
        _EDGES
    ).fetchall():
        edges.append(
            Edge(
                caller,
                callee,
                protocol,
                system,
                bool(instrumented),
                calls,
                propagated,
                stitched,
                cause if propagated < calls else None,
            )
        )
    return edges
