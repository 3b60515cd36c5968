"""Turn the passes' tables into one `findings` table: decide which roots are entry points,
name each finding's hop, protocol and likely cause, and attach its probable parent.

Python decides per group (an operation, an edge); DuckDB applies the decisions to every row,
so a window with millions of findings never becomes millions of Python objects."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from .breaks import break_operations, stitch_breaks
from .calibrate import calibrate, calibrated
from .config import AuditConfig, AuditWindow
from .learn import Learned
from .stitch import build_candidates, stitch
from .tables import temp_table
from .targets import collapse_spread_exits
from .virtual_exits import add_virtual_candidates, virtual_callers

_ORPHAN_OPS = """
SELECT o.service, o.name, count(*), count(c.oid) FROM cand_orphans o
LEFT JOIN cand_counts c USING (oid) GROUP BY ALL
"""
# every audited orphan with its probable parent (if named) and the exit it was matched to
_ORPHAN_ROWS = """
CREATE OR REPLACE TEMP TABLE orphan_rows AS
WITH base AS (
  SELECT o.oid, o.rid, o.trace_id, o.span_id, o.service, o.name, o.kind, o.start_ns,
    o.protocol AS own_protocol,
         substr(o.k_dest, 6) AS destination, coalesce(n.candidates, 0) AS candidates,
         e.service AS parent_service, e.trace_id AS parent_trace_id, e.span_id AS parent_span_id,
         e.protocol AS parent_protocol, e.instrumented AS parent_instrumented, p.confidence
  FROM cand_orphans o
  JOIN audited_orphans a USING (oid)
  LEFT JOIN cand_counts n USING (oid)  -- candidates that fitted, before the cap on those kept
  LEFT JOIN (SELECT * FROM stitched WHERE confidence >= $min_confidence) p USING (oid)
  LEFT JOIN cand_exits e ON e.eid = p.eid),
-- an orphan without a named parent takes its operation's usual caller and protocol: from the
-- parents named for it, else from the candidates considered (e.g. a topic's producers)
usual AS (
  SELECT service, name, mode(parent_service) AS caller, mode(parent_protocol) AS protocol,
         avg(CASE WHEN parent_instrumented THEN 0.0 ELSE 1.0 END) AS via_unknown_address
  FROM base WHERE parent_service IS NOT NULL GROUP BY ALL),
considered AS (
  SELECT o.service, o.name, mode(e.service) AS caller, mode(e.protocol) AS protocol
  FROM cand_pairs p JOIN cand_orphans o USING (oid) JOIN cand_exits e USING (eid) GROUP BY ALL)
SELECT b.*, coalesce(b.parent_service, u.caller, c.caller) AS caller,
       CASE WHEN b.own_protocol = 'none' THEN coalesce(b.parent_protocol, u.protocol, c.protocol, 'none')
            ELSE b.own_protocol END AS protocol,
       coalesce(u.via_unknown_address, 0.0) > 0.5 AS via_unknown_address
FROM base b LEFT JOIN usual u USING (service, name) LEFT JOIN considered c USING (service, name)
"""
_ORPHAN_GROUPS = """
SELECT DISTINCT service, name, protocol, caller, destination, via_unknown_address FROM orphan_rows
"""
_CONTINUING_CONSUMERS = """
SELECT DISTINCT c.destination, h.callee FROM hops h JOIN w c ON c.rid = h.entry_rid
WHERE h.protocol = 'messaging'
"""
_NOT_PARENT_BASED = """
SELECT callee FROM hops WHERE NOT via_link GROUP BY callee
HAVING avg(CASE WHEN entry_th IS DISTINCT FROM exit_th THEN 1.0 ELSE 0.0 END) > 0.5
"""

# One row per finding. Ids stay numeric (formatting hex for millions of rows costs seconds);
# `candidates` and `detail` are the evidence, rendered as text only when a finding is shown.
_FINDINGS = """
CREATE OR REPLACE TEMP TABLE findings AS
SELECT 'orphan_root' AS kind, o.trace_id, o.span_id, o.service, o.name AS span_name, o.kind AS span_kind,
       o.start_ns, o.protocol, coalesce(s.messaging_system, s.rpc_system) AS system, o.caller,
       o.service AS callee, g.cause, o.candidates, mx.detail,
       CASE WHEN o.confidence IS NOT NULL THEN o.parent_trace_id END AS parent_trace_id,
       CASE WHEN o.confidence IS NOT NULL THEN o.parent_span_id END AS parent_span_id,
       CASE WHEN o.confidence IS NOT NULL THEN o.parent_service END AS parent_service,
       o.confidence
FROM orphan_rows o
JOIN orphan_causes g ON g.service = o.service AND g.name = o.name AND g.protocol = o.protocol
  AND g.caller IS NOT DISTINCT FROM o.caller AND g.destination IS NOT DISTINCT FROM o.destination
  AND g.via_unknown_address = o.via_unknown_address
JOIN roots s ON s.rid = o.rid
LEFT JOIN mixed_ops mx ON mx.service = o.service AND mx.name = o.name
UNION ALL
SELECT 'in_process_break', r.trace_id, r.span_id, r.service, r.name, r.kind, r.start_ns, r.protocol,
       coalesce(r.messaging_system, r.rpc_system, r.db_system), r.service, coalesce(x.target, r.service),
       'thread_pool_no_context', coalesce(b.candidates, 0), NULL,
       CASE WHEN b.confidence >= $min_confidence THEN p.trace_id END,
       CASE WHEN b.confidence >= $min_confidence THEN p.span_id END,
       CASE WHEN b.confidence >= $min_confidence THEN p.service END,
       CASE WHEN b.confidence >= $min_confidence THEN b.confidence END
FROM roots r
JOIN break_ops USING (service, name)
LEFT JOIN (SELECT DISTINCT ON (rid) rid, target FROM xt  -- the break roots' exits only, not all of xt
           WHERE rid IN (SELECT rid FROM roots JOIN break_ops USING (service, name))) x ON x.rid = r.rid
LEFT JOIN break_parents b ON b.rid = r.rid
LEFT JOIN w p ON p.rid = b.parent_rid
WHERE r.kind NOT IN ('SERVER', 'CONSUMER')
UNION ALL
SELECT 'dangling_parent', trace_id, span_id, service, name, kind, start_ns, protocol, NULL, NULL, service,
       CASE WHEN service IN (SELECT callee FROM not_parent_based) THEN 'sampler_not_parent_based'
            ELSE 'parent_span_missing' END,
       0, lpad(lower(hex(parent_span_id)), 16, '0'), NULL, NULL, NULL, NULL
FROM dangling
UNION ALL
SELECT 'unpaired_exit', trace_id, span_id, service, name, kind, start_ns, protocol,
       coalesce(rpc_system, messaging_system), service, target, 'context_not_propagated', 0, how,
       NULL, NULL, NULL, NULL
FROM xt WHERE in_window AND instrumented AND NOT continued_to_target AND NOT pending
"""
# The result's columns: 128-bit ids as two 64-bit halves (Arrow has no unsigned 128-bit type).
FINDINGS_SELECT = """
SELECT kind, (trace_id >> 64)::UBIGINT AS trace_hi, (trace_id & 18446744073709551615)::UBIGINT AS trace_lo,
       span_id, service, span_name, span_kind, start_ns,
       CASE WHEN protocol IN ('http', 'grpc', 'rpc', 'messaging', 'db') THEN protocol ELSE 'unknown' END
         AS protocol,
       system, caller, callee, cause, candidates, detail,
       (parent_trace_id >> 64)::UBIGINT AS parent_trace_hi,
       (parent_trace_id & 18446744073709551615)::UBIGINT AS parent_trace_lo,
       parent_span_id, parent_service, confidence
FROM findings
"""


def _operations_table(con: duckdb.DuckDBPyConnection, name: str, operations: list[tuple[str, str]]) -> None:
    temp_table(
        con,
        name,
        {
            "service": pa.array([s for s, _ in operations], pa.string()),
            "name": pa.array([n for _, n in operations], pa.string()),
        },
    )


class FindingBuilder:
    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        window: AuditWindow,
        learned: Learned,
        config: AuditConfig,
        progress,
    ):
        self.con, self.window, self.learned, self.config, self.progress = (
            con,
            window,
            learned,
            config,
            progress,
        )
        self.entrypoints: list[str] = []

    def build(self) -> None:
        """Create the temp table `findings` (and `stitched`, `orphan_rows`, `break_parents`)."""
        con, config = self.con, self.config
        self.progress("finding stitching candidates")
        build_candidates(con, self.learned, config.default_skew_ms * 1e6, config.default_max_lag_s * 1e9)
        add_virtual_candidates(con, self.learned)  # caller spans that are not CLIENT spans (virtual_exits.py)
        audited = self._audited_orphans()
        self.progress(f"stitching {len(audited):,} orphan roots")
        got = stitch(con, self.learned, audited)
        if config.calibrate:  # the confidences, checked against propagated calls cut on purpose
            self.progress("calibrating the confidence on propagated calls")
            skew, lag = config.default_skew_ms * 1e6, config.default_max_lag_s * 1e9
            cal = calibrate(con, self.learned, audited, skew, lag)
            got.confidence = calibrated(con, cal, got.oid, got.eid, got.confidence)
        temp_table(con, "stitched", got.table())
        con.execute(_ORPHAN_ROWS, {"min_confidence": config.min_confidence})
        collapse_spread_exits(con)  # an exit with a row per candidate callee keeps one (targets.py)
        self._orphan_causes()
        self.progress("looking for in-process breaks")
        self._breaks()
        con.execute(f"CREATE OR REPLACE TEMP TABLE not_parent_based AS {_NOT_PARENT_BASED}")
        con.execute(_FINDINGS, {"min_confidence": config.min_confidence})

    def _audited_orphans(self) -> np.ndarray:
        """Orphan candidates minus the roots of entry-point operations: configured, or learned
        (nobody propagates into the operation and its roots rarely have a candidate parent)."""
        con, learned, config = self.con, self.learned, self.config
        entry_ops = []
        for service, name, roots, with_candidates in con.execute(_ORPHAN_OPS).fetchall():
            learned_entry = (
                service,
                name,
            ) not in learned.propagated_callee_ops and with_candidates < config.entry_candidate_share * roots
            if config.is_configured_entry(service, name) or learned_entry:
                entry_ops.append((service, name))
                self.entrypoints.append(f"{service}:{name}")
        _operations_table(con, "entry_ops", entry_ops)
        con.execute(
            "CREATE OR REPLACE TEMP TABLE audited_orphans AS SELECT oid FROM cand_orphans o WHERE NOT EXISTS "
            "(SELECT 1 FROM entry_ops e WHERE e.service = o.service AND e.name = o.name)"
        )
        return con.execute("SELECT oid FROM audited_orphans").fetchnumpy()["oid"].astype(np.int64)

    def _orphan_causes(self) -> None:
        """One cause per (operation, protocol, caller, destination): the evidence is per edge."""
        con = self.con
        continuing: dict[str, set[str]] = {}
        for destination, callee in con.execute(_CONTINUING_CONSUMERS).fetchall():
            continuing.setdefault(destination, set()).add(callee)
        propagating = set(
            con.execute("SELECT DISTINCT caller, callee FROM hops WHERE NOT via_link").fetchall()
        )
        rows = con.execute(_ORPHAN_GROUPS).fetchall()
        no_client_span = virtual_callers(con)
        causes = []
        for service, _, protocol, caller, destination, via_unknown_address in rows:
            if (caller, service) in no_client_span:
                cause = "caller_no_client_span"
            elif protocol == "messaging":
                others = continuing.get(destination or "", set()) - {service}
                cause = "consumer_does_not_extract" if others else "producer_does_not_inject"
            elif protocol == "grpc":
                cause = "grpc_client_not_instrumented"
            elif protocol == "rpc":
                cause = "custom_rpc_no_context"
            elif caller is None:
                cause = "unknown"
            elif via_unknown_address or (caller, service) in propagating:
                # the exit went to an address that is not the callee's, or the same caller
                # sometimes gets through: something in between drops the header
                cause = "proxy_strips_traceparent"
            else:
                cause = "client_does_not_inject"
            causes.append(cause)
        names = ("service", "name", "protocol", "caller", "destination", "via_unknown_address")
        data = {n: [r[i] for r in rows] for i, n in enumerate(names)}
        data["via_unknown_address"] = pa.array(data["via_unknown_address"], pa.bool_())
        for n in names[:-1]:
            data[n] = pa.array(data[n], pa.string())
        temp_table(con, "orphan_causes", data | {"cause": pa.array(causes, pa.string())})

    def _breaks(self) -> None:
        con = self.con
        found, jobs = break_operations(con, self.window.start_ns, self.window.end_ns)
        break_ops = [(s, n) for s, n in found if not self.config.is_configured_entry(s, n)]
        self.entrypoints += [f"{s}:{n}" for s, n in jobs + [op for op in found if op not in break_ops]]
        _operations_table(con, "break_ops", break_ops)
        temp_table(con, "break_parents", stitch_breaks(con))
