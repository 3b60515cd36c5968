"""Span kinds where the instrumentation recorded none (UNSPECIFIED: OpenTracing-era tracers,
Jaeger and Zipkin captures without `span.kind`), inferred from where each span's parent is.

A span whose parent is in another service is the server side of that call (CONSUMER when its
attributes are messaging ones); one whose parent is in its own service is INTERNAL. A root, or
a span whose parent never arrived, takes what its operation (service, span name) usually is; a
root of an operation never seen with a parent receives a request (SERVER): most roots are
entry points. The caller's side of such calls is found by `virtual_exits`, not here: in these
captures it is the caller's SERVER or INTERNAL span, which cannot also be its CLIENT span.
"""

from __future__ import annotations

import duckdb

_EVIDENCE = """
CREATE OR REPLACE TEMP TABLE kind_evidence AS
SELECT c.rid, c.service, c.name, c.protocol, c.parent_span_id IS NULL AS is_root,
       CASE WHEN p.service IS NULL THEN NULL WHEN p.service <> c.service THEN 'remote' ELSE 'local' END
         AS side
FROM w c LEFT JOIN w p ON p.trace_id = c.trace_id AND p.span_id = c.parent_span_id
WHERE c.kind = 'UNSPECIFIED'
"""
_INFERRED = """
CREATE OR REPLACE TEMP TABLE inferred_kinds AS
WITH ops AS (
  SELECT service, name, count(*) FILTER (WHERE side = 'remote') AS remote,
         count(*) FILTER (WHERE side = 'local') AS local
  FROM kind_evidence GROUP BY ALL),
sided AS (
  SELECT e.rid, e.protocol, coalesce(e.side, CASE
    WHEN o.remote > o.local THEN 'remote'
    WHEN o.local > o.remote THEN 'local'
    WHEN e.is_root THEN 'remote' END) AS side
  FROM kind_evidence e JOIN ops o USING (service, name))
SELECT rid, CASE WHEN side = 'remote' AND protocol = 'messaging' THEN 'CONSUMER'
                 WHEN side = 'remote' THEN 'SERVER' ELSE 'INTERNAL' END AS kind
FROM sided WHERE side IS NOT NULL
"""


def infer_kinds(con: duckdb.DuckDBPyConnection) -> int:
    """Give the window's (`w`) spans without a kind the one their parent implies; return how
    many were given one. Costs one scan of `w` when every span has a kind."""
    if not con.execute("SELECT count(*) FROM w WHERE kind = 'UNSPECIFIED'").fetchone()[0]:
        return 0
    con.execute(_EVIDENCE)
    con.execute(_INFERRED)
    con.execute("UPDATE w SET kind = i.kind FROM inferred_kinds i WHERE w.rid = i.rid")
    inferred = con.execute("SELECT count(*) FROM inferred_kinds").fetchone()[0]
    con.execute("DROP TABLE kind_evidence; DROP TABLE inferred_kinds")
    return inferred


def apply_inferred_kinds(con: duckdb.DuckDBPyConnection, table: str) -> None:
    """Copy the kinds inferred in `w` to a table of the scan that read `spans` itself (roots)."""
    con.execute(
        f"UPDATE {table} SET kind = w.kind FROM w WHERE w.rid = {table}.rid "
        f"AND {table}.kind = 'UNSPECIFIED' AND w.kind <> 'UNSPECIFIED'"
    )
