"""One audit run over a window: scan, learn, resolve, find, stitch, count edges."""

from __future__ import annotations

import time
from collections.abc import Callable

import duckdb

from ..contract.document import AuditResult
from .config import AuditConfig, AuditWindow
from .edges import build_edges
from .findings import FINDINGS_SELECT, FindingBuilder
from .learn import learn
from .sampling import sampling_figures
from .sampling_merge import strip
from .scan import scan
from .skew import learn_unseen_offsets
from .stitch import degraded_hops
from .targets import resolve_exits
from .virtual_exits import learn_call_patterns


def run_audit(
    con: duckdb.DuckDBPyConnection,
    window: AuditWindow,
    config: AuditConfig | None = None,
    progress: Callable[[str], None] = lambda step: None,
) -> AuditResult:
    """Audit the spans of `window` in the store `con` is connected to. Leaves temp tables behind
    (on `con`: w, hops, roots, findings, orphan_rows, edge_calls, ...) that tests may read."""
    config = config or AuditConfig()
    con.execute("SET enable_progress_bar = false")  # progress is reported through `progress`
    started = time.monotonic()
    spans, traces = scan(con, window, progress)
    progress("learning addresses and timing from propagated calls")
    learned = learn(con, window, config)
    learn_call_patterns(con, window, learned)  # callers without client spans (virtual_exits.py)
    resolve_exits(con, learned)
    learn_unseen_offsets(con, learned, config.default_skew_ms * 1e6)  # edges that never propagate (skew.py)
    builder = FindingBuilder(con, window, learned, config, progress)
    builder.build()
    progress("counting edges")
    edges = build_edges(con)
    roots = {
        service: {"entry": entry, "orphan": orphan, "orphan_unattributed": unattributed}
        for service, entry, orphan, unattributed in con.execute(_ROOTS_PER_SERVICE).fetchall()
    }
    degraded = degraded_hops(con)
    # what stitching and edges needed: at 10M spans these spill past the memory limit and
    # would slow every later query that touches spilled pages
    for name in (
        "xt",
        "cand_exits",
        "cand_orphans",
        "cand_pairs",
        "audited_orphans",
        "stitch_orphans",
        "exact_only",
        "stitched",
        "break_pairs",
        "break_parents",
        "vhops",
    ):
        con.execute(f"DROP TABLE IF EXISTS {name}")
    # and the columns of the tables it keeps that it does not read (dropping a column frees it
    # without a copy): about a fifth of what is left (w keeps name and kind for tests)
    for table, columns in _UNREAD_BY_SAMPLING.items():
        for column in columns:
            con.execute(f"ALTER TABLE {table} DROP COLUMN IF EXISTS {column}")
    sampling_stats = sampling_figures(
        con, window.start_ns, window.end_ns, config.assume_sampling_probability, progress
    )
    # fetched last: at 10M spans the findings are 600 MB of Arrow, held during the sampling
    # pass they added to its peak
    findings = con.sql(FINDINGS_SELECT + " ORDER BY start_ns, kind, span_id").to_arrow_table()
    return AuditResult(
        window.start_ns,
        window.end_ns,
        spans,
        traces,
        findings,
        edges,
        sorted(set(builder.entrypoints)),
        roots,
        strip(sampling_stats),
        time.monotonic() - started,
        degraded=degraded,
        sampling_stats=sampling_stats,
    )


# Columns the sampling pass (sampling*.py) and the findings fetch do not read.
_UNREAD_BY_SAMPLING = {
    "w": ("span_id", "protocol", "rid", "destination"),
    "roots": (
        "name",
        "protocol",
        "start_ns",
        "end_ns",
        "rpc_system",
        "rpc_service",
        "rpc_method",
        "messaging_system",
        "messaging_destination",
        "messaging_message_id",
        "messaging_partition",
        "messaging_offset",
        "url_path",
        "db_system",
    ),
    "hops": ("exit_rid", "entry_rid", "d_start", "d_end", "lag"),
    "orphan_rows": (
        "oid",
        "span_id",
        "name",
        "kind",
        "start_ns",
        "own_protocol",
        "destination",
        "candidates",
        "parent_service",
        "parent_span_id",
        "parent_protocol",
        "parent_instrumented",
        "via_unknown_address",
    ),
    "edge_calls": ("rid", "target", "system"),
}

# roots per service: at entry points (operations, and jobs that start outside any request),
# and orphans (with no caller found, they stay attached to "(entry)" in the repaired graph)
_ROOTS_PER_SERVICE = """
WITH entry AS (
  SELECT service, count(*) AS n FROM cand_orphans JOIN entry_ops USING (service, name) GROUP BY 1
  UNION ALL
  SELECT service, count(*) FROM roots r WHERE kind NOT IN ('SERVER', 'CONSUMER')
    AND NOT EXISTS (SELECT 1 FROM break_ops b WHERE b.service = r.service AND b.name = r.name) GROUP BY 1),
orphan AS (SELECT service, count(*) AS n, count(*) FILTER (WHERE caller IS NULL) AS unattributed
           FROM orphan_rows GROUP BY 1)
SELECT service, coalesce(sum(e.n), 0)::BIGINT, coalesce(any_value(o.n), 0)::BIGINT,
       coalesce(any_value(o.unattributed), 0)::BIGINT
FROM entry e FULL JOIN orphan o USING (service) GROUP BY service ORDER BY service
"""
