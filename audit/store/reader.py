"""The read side of the store: the named queries of audit/contract/reader.py over a DuckDB
connection. `StoreReader` answers them on a connection it is given (the server's read API
serves one); `LocalReader` opens a DB file that no server holds, read-only. A running server's
store is read through audit/read/remote.py instead. Commands and pages see only the protocol.
"""

from __future__ import annotations

import json
from datetime import datetime

import duckdb
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from ..contract.document import FINDING_KINDS, finding_dict
from ..contract.figures import orphan_rate, propagation_rate
from ..contract.reader import ServiceCount, StoreStats
from .errors import StoreError, translate
from .migrations import SPANS_FULL, ensure_spans_full
from .otlp_values import attributes, to_json


def otlp_attributes(blob: bytes) -> str | None:
    """Span attributes from the stored `otlp_rest` bytes, as JSON."""
    return to_json(attributes(Span.FromString(blob).attributes))


def otlp_events(blob: bytes) -> str | None:
    """Span events from the stored `otlp_rest` bytes, as a JSON list."""
    events = Span.FromString(blob).events
    return to_json(
        [
            {
                "time_unix_nano": e.time_unix_nano,
                "name": e.name,
                "attributes": attributes(e.attributes),
                "dropped_attributes_count": e.dropped_attributes_count,
            }
            for e in events
        ]
    )


_JSON_COLUMNS = frozenset({"attributes", "events", "resource_attributes", "scope_attributes"})

_STATS = """
SELECT count(*), count(DISTINCT trace_id), count(DISTINCT service_name),
       min(start_ns), max(end_ns), count(*) FILTER (WHERE end_ns < start_ns)
FROM spans
"""
_BY_SERVICE = """
SELECT service_name, count(*), count(DISTINCT trace_id) FROM spans GROUP BY 1 ORDER BY 2 DESC, 1
"""


# the newest runs with their trends: findings per kind, broken edges, and the share of stored
# calls between instrumented services whose context arrived ("context health")
_RUNS = f"""
WITH r AS (SELECT run_id, finished_at, window_start_ns, window_end_ns, spans, traces, seconds, roots
           FROM audit_runs ORDER BY run_id DESC LIMIT ?),
f AS (SELECT run_id, {", ".join(f"count(*) FILTER (WHERE kind = '{k}') AS {k}" for k in FINDING_KINDS)}
      FROM audit_findings WHERE run_id IN (SELECT run_id FROM r) GROUP BY run_id),
e AS (SELECT run_id, count(*) FILTER (WHERE calls > propagated) AS broken_edges,
             coalesce(sum(propagated) FILTER (WHERE callee_instrumented), 0) AS instrumented_propagated,
             coalesce(sum(calls) FILTER (WHERE callee_instrumented), 0) AS instrumented_calls
      FROM audit_edges WHERE run_id IN (SELECT run_id FROM r) GROUP BY run_id)
SELECT r.*, {", ".join(f"coalesce(f.{k}, 0) AS {k}" for k in FINDING_KINDS)},
       coalesce(e.broken_edges, 0) AS broken_edges, coalesce(e.instrumented_propagated, 0)::BIGINT
         AS instrumented_propagated, coalesce(e.instrumented_calls, 0)::BIGINT AS instrumented_calls
FROM r LEFT JOIN f USING (run_id) LEFT JOIN e USING (run_id) ORDER BY run_id DESC
"""
# the saved findings in the engine's row shape (128-bit ids as halves), for finding_dict
_FINDING_ROWS = """
SELECT kind, (trace_id >> 64)::UBIGINT AS trace_hi, (trace_id & 18446744073709551615)::UBIGINT AS trace_lo,
       span_id, service, span_name, span_kind, start_ns, protocol, system, caller, callee, cause, candidates,
       detail, (parent_trace_id >> 64)::UBIGINT AS parent_trace_hi,
       (parent_trace_id & 18446744073709551615)::UBIGINT AS parent_trace_lo, parent_span_id, parent_service,
       confidence
FROM audit_findings
"""


MAX_HOPS_DOWN = 32  # a request deeper than this (or a cycle of wrong links) is cut there
# stitched hops as trace -> trace edges; the tops are parent traces that no hop leads to; each
# top's request is every trace reached down from it (UNION: a trace reached twice counts once)
_FRAGMENTED_REQUESTS = """
WITH RECURSIVE
run AS (SELECT coalesce(?, (SELECT max(run_id) FROM audit_runs)) AS id),
hops AS (SELECT trace_id AS child, parent_trace_id AS parent, confidence, start_ns FROM audit_findings
         WHERE run_id = (SELECT id FROM run) AND parent_span_id IS NOT NULL AND parent_trace_id <> trace_id),
tops AS (SELECT DISTINCT parent AS top FROM hops WHERE parent NOT IN (SELECT child FROM hops)),
walk(top, trace_id, depth) AS (
    SELECT top, top, 0 FROM tops
    UNION
    SELECT w.top, h.child, w.depth + 1 FROM walk w JOIN hops h ON h.parent = w.trace_id WHERE w.depth < ?
),
reached AS (SELECT DISTINCT top, trace_id FROM walk)
SELECT r.top::VARCHAR AS trace_id, count(DISTINCT r.trace_id) AS fragments, count(h.child) AS hops,
       round(min(h.confidence), 4) AS min_confidence, max(h.start_ns) AS last_hop_start_ns
FROM reached r LEFT JOIN hops h ON h.child = r.trace_id
GROUP BY r.top ORDER BY fragments DESC, last_hop_start_ns DESC, trace_id LIMIT ?
"""


def _register_functions(con: duckdb.DuckDBPyConnection) -> None:
    # "special": a span without attributes (or events) gives NULL, which DuckDB's default refuses
    con.create_function("otlp_attributes", otlp_attributes, ["BLOB"], "JSON", null_handling="special")
    con.create_function("otlp_events", otlp_events, ["BLOB"], "JSON", null_handling="special")


class StoreReader:
    """Named queries over an open connection; each call runs on a cursor of its own, so calls
    from several threads do not share one (the read API serves them concurrently)."""

    live = False  # a file: no ingestion to report, no audits to request (RemoteReader's are)

    def __init__(self, con, path: str):
        """`con`: a DuckDB connection, or a SpanStore (a server's: it may reopen its connection,
        so each query takes a fresh cursor from it)."""
        self.path = path
        self._con = con
        self._spans_full = SPANS_FULL  # spans with their resource and scope columns
        if hasattr(con, "on_open"):
            con.on_open(_register_functions)
        else:
            _register_functions(con)
            try:
                self._spans_full = ensure_spans_full(con)  # `spans` if migration 0005 has not run
            except duckdb.Error as e:
                raise translate(e, path, writing=False) from None

    def _query(self, sql: str, params: list | None = None) -> list[tuple]:
        try:
            return self._con.cursor().execute(sql, params or []).fetchall()
        except duckdb.Error as e:
            if "Table with name spans does not exist" in str(e):
                raise StoreError(
                    f"{self.path} is a DuckDB file but not a ctxaudit store (no spans table)"
                ) from None
            raise translate(e, self.path, writing=False) from None

    def stats(self) -> StoreStats:
        spans, traces, services, first, last, bad_times = self._query(_STATS)[0]
        (links,) = self._query("SELECT count(*) FROM span_links")[0]
        by_service = [ServiceCount(*row) for row in self._query(_BY_SERVICE)]
        return StoreStats(spans, traces, services, links, first, last, bad_times, by_service)

    def store_counts(self) -> dict:
        """Spans, traces (approximate: HyperLogLog, a tenth of the cost of the exact count on
        millions of spans) and services: the overview's headline."""
        spans, traces, services = self._query(
            "SELECT count(*), approx_count_distinct(trace_id), count(DISTINCT service_name) FROM spans"
        )[0]
        return {"spans": spans, "traces_approx": traces, "services": services}

    def time_range(self) -> dict:
        """The first and the newest span start (None, None on an empty store): where a window
        measured back from the newest data ends (the report's --since)."""
        first, last = self._query("SELECT min(start_ns), max(start_ns) FROM spans")[0]
        return {"first_start_ns": first, "last_start_ns": last}

    def _dicts(self, sql: str, params: list) -> list[dict]:
        cur = self._con.cursor()
        try:
            rel = cur.execute(sql, params)
            names = [d[0] for d in rel.description]
            rows = [dict(zip(names, r)) for r in rel.fetchall()]
        except duckdb.Error as e:
            raise translate(e, self.path, writing=False) from None
        for r in rows:
            for k in _JSON_COLUMNS.intersection(r):
                if r[k] is not None:
                    r[k] = json.loads(r[k])
            for k, v in r.items():
                if isinstance(v, datetime):  # as the read API sends it: ISO 8601 text
                    r[k] = v.isoformat()
        return rows

    def trace(self, trace_id: int) -> list[dict]:
        """Every span of one trace, attributes and events decoded, in start order."""
        return self._dicts(
            "SELECT * EXCLUDE (otlp_rest), otlp_attributes(otlp_rest) AS attributes, "
            f"otlp_events(otlp_rest) AS events FROM {self._spans_full} WHERE trace_id = ?::UHUGEINT "
            "ORDER BY start_ns",
            [str(trace_id)],
        )

    def links(self, trace_id: int, span_id: int) -> list[dict]:
        return self._dicts(
            "SELECT * FROM span_links WHERE trace_id = ?::UHUGEINT AND span_id = ?::UBIGINT",
            [str(trace_id), str(span_id)],
        )

    def protocol_summary(self) -> list[dict]:
        """Spans and root spans per service, protocol and kind."""
        return self._dicts(
            "SELECT service_name AS service, protocol, kind, count(*) AS spans, "
            "count(*) FILTER (WHERE parent_span_id IS NULL) AS roots "
            "FROM spans GROUP BY ALL ORDER BY service, protocol, kind",
            [],
        )

    def audit_run(self, run_id: int | None = None) -> dict | None:
        """An audit run (the last one by default) with its edges; None if there is none."""
        if not self._has_runs():
            return None
        where, params = (
            ("run_id = ?", [run_id])
            if run_id is not None
            else ("run_id = (SELECT max(run_id) FROM audit_runs)", [])
        )
        runs = self._dicts(f"SELECT * FROM audit_runs WHERE {where}", params)
        if not runs:
            return None
        run = runs[0]
        run["roots"] = json.loads(run["roots"])
        run["settings"] = json.loads(run["settings"])
        run["sampling"] = json.loads(run["sampling"]) if run.get("sampling") else None
        run["edges"] = self._dicts(
            "SELECT * EXCLUDE (run_id) FROM audit_edges WHERE run_id = ? ORDER BY ALL", [run["run_id"]]
        )
        for e in run["edges"]:  # as the result document's edges have them
            e["dropped"] = e["calls"] - e["propagated"]
            rate = propagation_rate(e["propagated"], e["calls"])
            e["propagation_rate"] = None if rate is None else round(rate, 4)
            e["broken"] = e["dropped"] > 0
        return run

    def _has_runs(self) -> bool:
        return bool(self._query("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'audit_runs'")[0][0])

    def audit_runs(self, limit: int = 100) -> list[dict]:
        """The newest audit runs first, for trends: finding counts per kind, broken edges, context
        health (propagated / calls between instrumented services) and the orphan rate (orphan
        roots / all roots)."""
        if not self._has_runs():
            return []
        runs = self._dicts(_RUNS, [limit])
        for run in runs:
            run["counts"] = {kind: run.pop(kind) for kind in FINDING_KINDS}
            run["orphan_rate"] = orphan_rate(json.loads(run.pop("roots")))
            run["context_health"] = propagation_rate(
                run.pop("instrumented_propagated"), run.pop("instrumented_calls")
            )
        return runs

    def finding_counts(self, run_id: int | None = None) -> list[dict]:
        """A run's findings (the last run by default) counted per kind and cause: a few dozen
        rows whatever the run's size (the metrics' and the trends' breakdown)."""
        if not self._has_runs():
            return []
        return self._dicts(
            "SELECT kind, cause, count(*) AS findings FROM audit_findings "
            "WHERE run_id = coalesce(?, (SELECT max(run_id) FROM audit_runs)) GROUP BY ALL ORDER BY ALL",
            [run_id],
        )

    def findings(
        self,
        run_id: int | None = None,
        *,
        kind: str | None = None,
        service: str | None = None,
        caller: str | None = None,
        callee: str | None = None,
        protocol: str | None = None,
        cause: str | None = None,
        trace_id: int | None = None,
        parent_trace_id: int | None = None,
        since_ns: int | None = None,
        until_ns: int | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> dict:
        """One page of a run's findings (the last run by default), filtered on any of the given
        fields and on the span's start (in [since_ns, until_ns)), in start order, as the result
        document renders them; `total` counts them all."""
        if not self._has_runs():
            return {"run_id": None, "total": 0, "findings": []}
        if run_id is None:
            run_id = self._query("SELECT max(run_id) FROM audit_runs")[0][0]
        filters = {
            "kind": kind,
            "service": service,
            "caller": caller,
            "callee": callee,
            "protocol": protocol,
            "cause": cause,
        }
        where = " AND ".join(["run_id = ?"] + [f"{k} = ?" for k, v in filters.items() if v is not None])
        params = [run_id] + [v for v in filters.values() if v is not None]
        for column, value in (("trace_id", trace_id), ("parent_trace_id", parent_trace_id)):
            if value is not None:
                where += f" AND {column} = ?::UHUGEINT"
                params.append(str(value))
        for bound, op in ((since_ns, ">="), (until_ns, "<")):
            if bound is not None:
                where += f" AND start_ns {op} ?"
                params.append(bound)
        (total,) = self._query(f"SELECT count(*) FROM audit_findings WHERE {where}", params)[0]
        rows = self._dicts(
            f"{_FINDING_ROWS} WHERE {where} ORDER BY start_ns, kind, span_id LIMIT ? OFFSET ?",
            params + [limit, offset],
        )
        return {"run_id": run_id, "total": total, "findings": [finding_dict(r) for r in rows]}

    def fragmented_requests(self, run_id: int | None = None, limit: int = 20) -> list[dict]:
        """The run's (the last by default) logical requests split into the most traces, newest
        first among equals: each one's top trace, fragments, stitched hops, lowest confidence
        and newest hop start (the trace view's list when no trace is given)."""
        if not self._has_runs():
            return []
        rows = self._dicts(_FRAGMENTED_REQUESTS, [run_id, MAX_HOPS_DOWN, limit])
        for r in rows:
            r["trace_id"] = f"{int(r['trace_id']):032x}"
        return rows

    def close(self) -> None:
        pass  # the connection belongs to whoever opened it


class LocalReader(StoreReader):
    """Reads a DB file that no server holds. DuckDB opens it read-only."""

    def __init__(self, path: str):
        try:
            con = duckdb.connect(path, read_only=True)
        except duckdb.Error as e:
            raise translate(e, path, writing=False) from None
        super().__init__(con, path)

    def close(self) -> None:
        self._con.close()
