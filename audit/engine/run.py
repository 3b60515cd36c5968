"""One audit run over a window: scan, learn, resolve, find, stitch, count edges."""

from __future__ import annotations

import time
from collections.abc import Callable

import duckdb

from .config import AuditConfig, AuditWindow
from .edges import build_edges
from .findings import FINDINGS_SELECT, FindingBuilder
from .learn import learn
from .result import AuditResult
from .scan import scan
from .targets import resolve_exits


def run_audit(con: duckdb.DuckDBPyConnection, window: AuditWindow, config: AuditConfig | None = None,
              progress: Callable[[str], None] = lambda step: None) -> AuditResult:  # fmt: skip
    """Audit the spans of `window` in the store `con` is connected to. Leaves temp tables behind
    (on `con`) that the persisting step and tests may read."""
    config = config or AuditConfig()
    con.execute("SET enable_progress_bar = false")  # progress is reported through `progress`
    started = time.monotonic()
    spans, traces = scan(con, window, progress)
    progress("learning addresses and timing from propagated calls")
    learned = learn(con, window, config)
    resolve_exits(con, learned)
    builder = FindingBuilder(con, learned, config, progress)
    builder.build()
    progress("counting edges")
    edges = build_edges(con)
    findings = con.execute(FINDINGS_SELECT + " ORDER BY f.start_ns, f.kind, f.span_id").to_arrow_table()
    return AuditResult(window.start_ns, window.end_ns, spans, traces, findings, edges,
                       sorted(set(builder.entrypoints)), time.monotonic() - started)  # fmt: skip
