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
  SELECT e.*, t.target, t.instrumented, t.how,
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
    con.execute("DROP TABLE exits")  # xt holds it all now; at 10M spans, memory is the limit


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
