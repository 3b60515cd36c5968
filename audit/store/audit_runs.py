"""Audit runs in the store: save one run's findings and edges in one transaction, and find
where the last run ended (the next run starts there, so re-auditing reads only what is new)."""

from __future__ import annotations

import contextlib
import json

import duckdb
import pyarrow as pa

from .errors import translate

# the findings table's columns, 128-bit ids rebuilt from their two 64-bit halves
_FINDING_COLUMNS = (
    "kind",
    "(trace_hi::UHUGEINT << 64) | trace_lo",
    "span_id",
    "service",
    "span_name",
    "span_kind",
    "start_ns",
    "protocol",
    "system",
    "caller",
    "callee",
    "cause",
    "candidates",
    "detail",
    "(parent_trace_hi::UHUGEINT << 64) | parent_trace_lo",
    "parent_span_id",
    "parent_service",
    "confidence",
)
_EDGE_COLUMNS = (
    "caller",
    "callee",
    "protocol",
    "system",
    "callee_instrumented",
    "calls",
    "propagated",
    "stitched",
    "cause",
)


def save_run(
    con: duckdb.DuckDBPyConnection,
    path: str,
    *,
    window_start_ns: int,
    window_end_ns: int,
    spans: int,
    traces: int,
    seconds: float,
    entrypoints: list[str],
    roots: dict,
    settings: dict,
    findings: pa.Table,
    edges: pa.Table,
    sampling: dict,
) -> int:
    """Store one run; return its id. `findings` and `edges` have the columns above."""
    cols = ", ".join(_FINDING_COLUMNS)
    edge_cols = ", ".join(_EDGE_COLUMNS)
    try:
        con.execute("BEGIN TRANSACTION")
        (run_id,) = con.execute("SELECT nextval('audit_run_ids')").fetchone()
        con.execute(
            "INSERT INTO audit_runs (run_id, finished_at, window_start_ns, window_end_ns, spans, traces, "
            "seconds, entrypoints, roots, settings, sampling) "
            "VALUES (?, current_timestamp, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                run_id,
                window_start_ns,
                window_end_ns,
                spans,
                traces,
                seconds,
                entrypoints,
                json.dumps(roots),
                json.dumps(settings),
                json.dumps(sampling),
            ],
        )
        con.register("run_findings", findings)
        con.execute(f"INSERT INTO audit_findings SELECT $run, {cols} FROM run_findings", {"run": run_id})
        con.register("run_edges", edges)
        con.execute(f"INSERT INTO audit_edges SELECT $run, {edge_cols} FROM run_edges", {"run": run_id})
        con.execute("COMMIT")
    except duckdb.Error as e:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise translate(e, path, writing=True) from None
    finally:
        for name in ("run_findings", "run_edges"):
            with contextlib.suppress(duckdb.Error):
                con.unregister(name)
    return run_id


def last_window_end(con: duckdb.DuckDBPyConnection) -> int | None:
    (end,) = con.execute("SELECT max(window_end_ns) FROM audit_runs").fetchone()
    return None if end is None else int(end)


def load_run(con: duckdb.DuckDBPyConnection, path: str, run_id: int | None = None) -> dict | None:
    """A saved run as save_run took it (the last one by default; None if there is none): the
    run's row, its findings in the engine's row shape (Arrow, in the engine's order) and edges."""
    from .reader import _FINDING_ROWS  # the saved findings in the engine's row shape

    try:
        (has_runs,) = con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'audit_runs'"
        ).fetchone()
        if not has_runs:
            return None
        where = "run_id = ?" if run_id is not None else "run_id = (SELECT max(run_id) FROM audit_runs)"
        rows = con.execute(
            "SELECT run_id, window_start_ns, window_end_ns, spans, traces, seconds, entrypoints, roots, "
            f"settings, sampling FROM audit_runs WHERE {where}",
            [run_id] if run_id is not None else [],
        ).fetchall()
        if not rows:
            return None
        run = dict(
            zip(
                ("run_id", "window_start_ns", "window_end_ns", "spans", "traces", "seconds", "entrypoints")
                + ("roots", "settings", "sampling"),
                rows[0],
            )
        )
        params = {"run": run["run_id"]}
        run["findings"] = con.sql(
            f"{_FINDING_ROWS} WHERE run_id = $run ORDER BY start_ns, kind, span_id", params=params
        ).to_arrow_table()
        names = ", ".join(_EDGE_COLUMNS)
        run["edges"] = [
            dict(zip(_EDGE_COLUMNS, r))
            for r in con.execute(f"SELECT {names} FROM audit_edges WHERE run_id = $run", params).fetchall()
        ]
    except duckdb.Error as e:
        raise translate(e, path, writing=False) from None
    for key in ("roots", "settings", "sampling"):
        run[key] = json.loads(run[key]) if run[key] else {}
    return run
