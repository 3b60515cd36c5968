"""The first pass over a window, all in DuckDB: one row per span, the calls that carried
their context (hops), the exits nobody continued, the roots, and the spans whose parent
never arrived. Each becomes a temp table the later passes read; nothing large comes to Python.

Spans arrive at least once, so the window is deduplicated on (trace_id, span_id) first.
"""

from __future__ import annotations

import duckdb

from .config import AuditWindow
from .kinds import apply_inferred_kinds, infer_kinds

# Where a span says it connects to. Older instrumentation names only the URL (`http.url`), and
# `http.host` carries a port: both reduce to a host and a port so the two sides compare.
_ADDRESS_MACROS = r"""
CREATE OR REPLACE TEMP MACRO url_path(url) AS
  nullif(regexp_extract(url, '^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*([^?#]*)', 1), '');
CREATE OR REPLACE TEMP MACRO url_host(url) AS
  nullif(regexp_extract(url, '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?(\[[^\]]*\]|[^:/?#]*)', 1), '');
CREATE OR REPLACE TEMP MACRO host_port(address) AS address LIKE '%:%' AND address NOT LIKE '%:%:%';
CREATE OR REPLACE TEMP MACRO peer_host(address, url) AS CASE
  WHEN address IS NULL THEN url_host(url)
  WHEN host_port(address) THEN split_part(address, ':', 1)
  ELSE address END;
CREATE OR REPLACE TEMP MACRO peer_port(port, address, url) AS CASE
  WHEN port IS NOT NULL THEN port
  WHEN address IS NOT NULL
    THEN CASE WHEN host_port(address) THEN try_cast(split_part(address, ':', 2) AS INTEGER) END
  WHEN url IS NULL THEN NULL
  ELSE coalesce(
    try_cast(nullif(regexp_extract(url, '^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*:([0-9]+)', 1), '') AS INTEGER),
    CASE WHEN url ILIKE 'https://%' THEN 443 WHEN url ILIKE 'http://%' THEN 80 END) END;
"""

# The window's spans, slim: attributes stay in `spans` and are joined by rowid when needed.
_WINDOW = """
CREATE OR REPLACE TEMP TABLE w AS
SELECT trace_id, span_id, parent_span_id, start_ns, end_ns, service_name AS service, kind, name,
       protocol, link_count, sampling_threshold AS th, sampling_tracestate_invalid AS th_invalid,
         rowid AS rid,
       status_code = 'ERROR' AS error,
         CASE WHEN kind = 'CONSUMER' THEN messaging_destination END AS destination
FROM spans
WHERE start_ns BETWEEN $lo AND $hi
"""

# Spans delivered more than once (a retried export): every copy but the first is dropped. The
# window is read plainly and only duplicate groups are looked for: DISTINCT ON over the whole
# window costs four times as much, to remove what is usually nothing.
_DUPLICATES = """
CREATE OR REPLACE TEMP TABLE dropped AS
SELECT w.rid FROM w JOIN (
  SELECT trace_id, span_id, min(rid) AS keep FROM w GROUP BY trace_id, span_id HAVING count(*) > 1) d
  ON w.trace_id = d.trace_id AND w.span_id = d.span_id AND w.rid <> d.keep
"""

# Propagated calls: a SERVER/CONSUMER span whose parent is a CLIENT/PRODUCER span in the same
# trace, and consumers that link to their producer (the messaging conventions' way).
_HOPS = """
CREATE OR REPLACE TEMP TABLE hops AS
SELECT p.rid AS exit_rid, c.rid AS entry_rid, p.service AS caller, c.service AS callee, p.protocol,
       c.start_ns::BIGINT - p.start_ns::BIGINT AS d_start, p.end_ns::BIGINT - c.end_ns::BIGINT AS d_end,
       c.start_ns::BIGINT - p.end_ns::BIGINT AS lag, p.th AS exit_th, c.th AS entry_th, false AS via_link,
       c.trace_id AS entry_trace_id, c.start_ns AS entry_start_ns, c.name AS entry_name
FROM w c JOIN w p ON p.trace_id = c.trace_id AND p.span_id = c.parent_span_id
WHERE p.kind IN ('CLIENT', 'PRODUCER') AND c.kind IN ('SERVER', 'CONSUMER')
UNION ALL
SELECT p.rid, c.rid, p.service, c.service, p.protocol,
       c.start_ns::BIGINT - p.start_ns::BIGINT, p.end_ns::BIGINT - c.end_ns::BIGINT,
       c.start_ns::BIGINT - p.end_ns::BIGINT, p.th, c.th, true, c.trace_id, c.start_ns, c.name
FROM w c
JOIN span_links l ON l.trace_id = c.trace_id AND l.span_id = c.span_id
JOIN w p ON p.trace_id = l.link_trace_id AND p.span_id = l.link_span_id
WHERE p.kind = 'PRODUCER' AND c.kind = 'CONSUMER'
"""

# Every exit (CLIENT/PRODUCER span) read, with its target attributes and whether its own trace
# continued it (a child) or a consumer linked to it. Those before the finding window are
# stitching candidates for orphans at its start; only those inside it are counted.
_EXITS = """
CREATE OR REPLACE TEMP TABLE exits AS
SELECT e.*,
       EXISTS (SELECT 1 FROM w c WHERE c.trace_id = e.trace_id AND c.parent_span_id = e.span_id)
         OR e.rid IN (SELECT exit_rid FROM hops WHERE via_link) AS continued
FROM (
  SELECT rowid AS rid, trace_id, span_id, parent_span_id IS NULL AS is_root, service_name AS service, kind,
    name,
         protocol, start_ns, end_ns, sampling_threshold AS th,
         peer_host(server_address, url_full) AS server_address,
         peer_port(server_port, server_address, url_full) AS server_port,
         peer_service, rpc_system, rpc_service, rpc_method, messaging_system, messaging_destination,
         messaging_message_id, messaging_partition, messaging_offset, db_system,
         url_path(url_full) AS url_path,
         start_ns >= $wlo AS in_window
  FROM spans WHERE start_ns >= $lo AND start_ns < $whi AND kind IN ('CLIENT', 'PRODUCER')
    AND rowid NOT IN (SELECT rid FROM dropped)) e
"""

# Roots in the finding window. `linked`: the root, or a direct child of it, links to another
# span (the official Kafka consumer instrumentation puts the link on `process`, under `recv`).
# Only the attributes later passes read: at 10M spans the temp tables spill past the memory
# limit, and every column kept is written out and read back.
_ROOTS = """
CREATE OR REPLACE TEMP TABLE roots AS
SELECT r.* EXCLUDE (link_count),
       r.link_count > 0 OR EXISTS (
         SELECT 1 FROM w c WHERE c.trace_id = r.trace_id AND c.parent_span_id = r.span_id AND c.link_count > 0
       ) AS linked
FROM (
  SELECT rowid AS rid, trace_id, span_id, service_name AS service, kind, name, protocol, start_ns, end_ns,
         sampling_threshold AS th, link_count, rpc_system, rpc_service, rpc_method,
         messaging_system, messaging_destination, messaging_message_id, messaging_partition, messaging_offset,
         coalesce(url_path, url_path(url_full)) AS url_path, db_system
  FROM spans WHERE parent_span_id IS NULL AND start_ns >= $wlo AND start_ns < $whi
    AND rowid NOT IN (SELECT rid FROM dropped)) r
"""

# Spans whose parent is named but is not in the window (read with its context margin).
_DANGLING = """
CREATE OR REPLACE TEMP TABLE dangling AS
SELECT c.rid, c.trace_id, c.span_id, c.parent_span_id, c.service, c.kind, c.name, c.protocol, c.start_ns, c.th
FROM w c
WHERE c.parent_span_id IS NOT NULL AND c.start_ns >= $wlo AND c.start_ns < $whi
  AND NOT EXISTS (SELECT 1 FROM w p WHERE p.trace_id = c.trace_id AND p.span_id = c.parent_span_id)
"""


def scan(con: duckdb.DuckDBPyConnection, window: AuditWindow, progress=lambda step: None) -> tuple[int, int]:
    """Build the temp tables w, hops, exits, roots, dangling; return (spans, traces) in the window."""
    params = {"lo": window.read_from_ns, "hi": window.read_to_ns}
    inner = {"wlo": window.start_ns, "whi": window.end_ns}
    progress("reading the window")
    con.execute(_ADDRESS_MACROS)
    con.execute(_WINDOW, params)
    con.execute(_DUPLICATES)
    if con.execute("SELECT count(*) FROM dropped").fetchone()[0]:
        con.execute("DELETE FROM w WHERE rid IN (SELECT rid FROM dropped)")
    inferred = infer_kinds(con)  # spans without a kind: from where their parent is (kinds.py)
    progress("joining parents and children")
    con.execute(_HOPS)
    con.execute(_EXITS, {"lo": window.read_from_ns, **inner})
    con.execute(_ROOTS, inner)
    if inferred:
        apply_inferred_kinds(con, "roots")
    con.execute(_DANGLING, inner)
    con.execute("ALTER TABLE w DROP COLUMN link_count")  # read only above; frees it without a copy
    spans, traces = con.execute(
        "SELECT count(*), count(DISTINCT trace_id) FROM w WHERE start_ns >= $wlo AND start_ns < $whi", inner
    ).fetchone()
    return spans, traces
