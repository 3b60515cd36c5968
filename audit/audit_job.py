"""An audit run against a store file: choose the window, run the engine, save the run.
The composition the `audit` command (and, later, serve's periodic audit) calls."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa

from .contract.document import Edge
from .engine import AuditResult, choose_window, run_audit
from .settings import AUDIT_MEMORY_LIMIT, AuditSettings
from .store.audit_runs import last_window_end, load_run, save_run
from .store.errors import StoreError, translate
from .store.writer import SpanStore


def audit_store(
    db: str,
    settings: AuditSettings,
    *,
    since_ns: int | None = None,
    until_ns: int | None = None,
    resume: bool = True,
    save: bool = True,
    memory_limit: str = AUDIT_MEMORY_LIMIT,
    progress: Callable[[str], None] = lambda step: None,
) -> AuditResult | None:
    """Audit the next window of `db` (None: nothing new); save the run unless `save` is False.
    `memory_limit` bounds DuckDB's memory; beyond it, its temp tables spill to disk."""
    if not Path(db).exists():
        raise StoreError(
            f"{db} does not exist: run `ctxaudit serve --db {db}` (or `ctxaudit simulate --db`) first"
        )
    if save:
        store = SpanStore(db, memory_limit=memory_limit)
        con, close = store.connection, store.close
    else:
        con = _read_only(db, memory_limit)
        close = con.close
    try:
        return audit_connection(
            con,
            db,
            settings,
            since_ns=since_ns,
            until_ns=until_ns,
            resume=resume,
            save=save,
            progress=progress,
        )
    finally:
        close()


def audit_connection(
    con: duckdb.DuckDBPyConnection,
    db: str,
    settings: AuditSettings,
    *,
    since_ns: int | None = None,
    until_ns: int | None = None,
    resume: bool = True,
    save: bool = True,
    progress: Callable[[str], None] = lambda step: None,
) -> AuditResult | None:
    """Audit the next window over an open connection (`db` names it in errors): the command's
    own, or a cursor of a running server's (its periodic audit). Temp tables stay on `con`."""
    try:
        first, last = con.execute("SELECT min(start_ns), max(start_ns) FROM spans").fetchone()
        last_end = last_window_end(con) if resume else None
        window = choose_window(
            first_start_ns=first,
            last_start_ns=last,
            last_run_end_ns=last_end,
            now_ns=time.time_ns(),
            since_ns=since_ns,
            until_ns=until_ns,
            settle_s=settings.settle_s,
            context_s=settings.context_s,
        )
        if window is None:
            return None
        result = run_audit(con, window, settings.config, progress)
    except duckdb.Error as e:
        raise translate(e, db, writing=False) from None
    if save:
        progress("saving the run")
        save_result(con, db, result, settings)
    return result


def save_result(con: duckdb.DuckDBPyConnection, db: str, result: AuditResult, settings: AuditSettings) -> int:
    """Save `result` as a run in the store `con` is connected to (`db` names it in errors) and
    set its run_id: the file audit's runs, the server's, and a Spark audit's (`--save-db`)."""
    edges = pa.Table.from_pylist([e.to_dict() for e in result.edges]) if result.edges else _no_edges()
    result.run_id = save_run(
        con,
        db,
        window_start_ns=result.window_start_ns,
        window_end_ns=result.window_end_ns,
        spans=result.spans,
        traces=result.traces,
        seconds=result.seconds,
        entrypoints=result.entrypoints,
        roots=result.roots,
        settings=settings.to_dict(),
        findings=result.findings,
        edges=edges,
        sampling=result.sampling,
    )
    return result.run_id


def saved_result(db: str, run_id: int | None = None) -> AuditResult | None:
    """A run saved in the file `db` (the last by default) as the AuditResult it was saved from,
    whichever audit saved it (the file's, the server's, Spark's); None when there is no such run.
    What a run does not keep comes back empty: the operations where stitching ran out of memory."""
    if not Path(db).exists():
        raise StoreError(f"{db} does not exist")
    con = _read_only(db, AUDIT_MEMORY_LIMIT)
    try:
        run = load_run(con, db, run_id)
    finally:
        con.close()
    if run is None:
        return None
    edges = sorted(
        (Edge(**e) for e in run["edges"]), key=lambda e: (e.caller, e.callee, e.protocol, e.system or "")
    )
    return AuditResult(
        int(run["window_start_ns"]),
        int(run["window_end_ns"]),
        run["spans"],
        run["traces"],
        run["findings"],
        edges,
        list(run["entrypoints"]),
        run["roots"],
        run["sampling"],
        run["seconds"],
        run_id=run["run_id"],
    )


def _read_only(db: str, memory_limit: str) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(db, read_only=True, config={"memory_limit": memory_limit})
    except duckdb.Error as e:
        raise translate(e, db, writing=False) from None


def _no_edges() -> pa.Table:
    return pa.table(
        {
            "caller": pa.array([], pa.string()),
            "callee": pa.array([], pa.string()),
            "protocol": pa.array([], pa.string()),
            "system": pa.array([], pa.string()),
            "callee_instrumented": pa.array([], pa.bool_()),
            "calls": pa.array([], pa.int64()),
            "propagated": pa.array([], pa.int64()),
            "stitched": pa.array([], pa.int64()),
            "cause": pa.array([], pa.string()),
        }
    )


def _when(ns: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ns / 1e9, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def summary_lines(result: AuditResult, *, top: int = 10) -> list[str]:
    """A readable summary: the window, counts, broken edges, and the commonest findings."""
    c = result.counts()
    saved = f"run {result.run_id}" if result.run_id is not None else "not saved"
    lines = [
        f"audit {saved}: {_when(result.window_start_ns)} .. {_when(result.window_end_ns)}, "
        f"{result.spans:,} spans in {result.traces:,} traces, {result.seconds:.1f} s",
        f"findings: {c['orphan_root']:,} orphan roots "
        f"({result.stitched():,} findings with a probable parent), "
        f"{c['in_process_break']:,} in-process breaks, {c['dangling_parent']:,} dangling parents, "
        f"{c['unpaired_exit']:,} unpaired exits",
        f"entry points: {', '.join(result.entrypoints) or 'none found'}",
    ]
    broken = [e for e in result.edges if e.broken]
    lines.append(f"broken edges: {len(broken)} of {len(result.edges)}")
    for e in sorted(broken, key=lambda e: e.propagation_rate or 0.0):
        system = f"/{e.system}" if e.system else ""
        lines.append(
            f"  {e.caller} -> {e.callee} ({e.protocol}{system}): "
            f"{e.propagated:,}/{e.calls:,} stored calls propagated "
            f"({e.propagation_rate:.1%}), {e.stitched:,} stitched"
            + (f"; likely cause: {e.cause}" if e.cause else "")
        )
    for d in result.degraded:
        lines.append(
            f"degraded: stitching ran out of memory on {d['callee']}:{d['operation']}: "
            f"{d['orphans']:,} orphans "
            "left without a parent there (raise --memory-limit to name them)"
        )
    lines += _sampling_lines(result.sampling)
    groups: dict[tuple, int] = {}
    for kind, caller, callee, cause in zip(
        *(result.findings.column(k).to_pylist() for k in ("kind", "caller", "callee", "cause"))
    ):
        groups[(kind, caller, callee, cause)] = groups.get((kind, caller, callee, cause), 0) + 1
    if groups:
        lines.append("commonest findings (kind, hop, cause):")
        for (kind, caller, callee, cause), n in sorted(groups.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {n:>9,}  {kind:<17} {caller or '?'} -> {callee or '?'}  {cause}")
    return lines


def _pct(e: dict) -> str:
    return f"{e['value']:.1%} ({e['ci_low']:.1%}-{e['ci_high']:.1%})"


def _sampling_lines(sampling: dict) -> list[str]:
    """What lost context does to sampling: overall, per distorted edge, per distorted service."""
    lines = []
    o = sampling.get("overall")
    if o and o["fragmentation_factor"]["value"] is not None:
        f, parts = o["fragmentation_factor"], []
        parts.append(f"{f['value']:.3f} fragments per request ({f['ci_low']:.3f}-{f['ci_high']:.3f})")
        if o["trace_completeness"]["value"] is not None:
            parts.append(f"{_pct(o['trace_completeness'])} of stored requests whole in one trace")
        if o["hidden_error_share"]["value"] is not None:
            parts.append(f"{_pct(o['hidden_error_share'])} of errors hidden in fragments")
        if o["latency_undercount"]["value"]:
            parts.append(
                f"fragmented requests last {o['latency_undercount']['value']:.1%} longer than their "
                f"entry trace shows (median, {o['latency_undercount']['median_ms']:.1f} ms)"
            )
        lines.append("sampling distortion (95% intervals): " + "; ".join(parts))
        if o["known_threshold_share"] is not None and o["known_threshold_share"] < 1:
            assumed = o["assumed_sampling_probability"]
            lines.append(
                f"  {1 - o['known_threshold_share']:.1%} of spans carry no ot=th: "
                + (
                    f"assumed sampled at p = {assumed}"
                    if assumed
                    else "left out of weighted figures (--assume-probability to weigh them)"
                )
            )
    distorted = [
        e
        for e in sampling.get("edges", [])
        if (e["propagation_rate"]["value"] is not None and e["propagation_rate"]["value"] < 1)
        or (e["conditional_capture_rate"]["value"] is not None and e["conditional_capture_rate"]["value"] < 1)
    ]
    if distorted:
        lines.append("edges whose callee side is not always stored with the caller's:")
        for e in distorted:
            parts = []
            for key, label in (
                ("propagation_rate", "propagates"),
                ("conditional_capture_rate", "callee stored"),
                ("upstream_missing_share", "orphans without a stored upstream"),
            ):
                if e[key]["value"] is not None:
                    parts.append(f"{label} {_pct(e[key])}")
            v = e["volume_ratio"]
            if v["value"] is not None and v["ci_low"] is not None:
                parts.append(f"volume ratio {v['value']:.3f} ({v['ci_low']:.3f}-{v['ci_high']:.3f})")
            lines.append(f"  {e['caller']} -> {e['callee']} ({e['protocol']}): " + "; ".join(parts))
    services = [
        s
        for s in sampling.get("services", [])
        if s["parent_based"] is False or (s["root_inflation"]["value"] or 0) > 0
    ]
    if services:
        lines.append("services whose roots are inflated or that ignore their callers' decision:")
        for s in services:
            inflation, dangling = s["root_inflation"], s["dangling_parent_rate"]
            parts = []
            if inflation["value"]:
                parts.append(f"{_pct(inflation)} of {inflation['n']:,} roots are orphans")
            if s["parent_based"] is False:
                rate = f"{dangling['value']:.1%}" if dangling["value"] is not None else "n/a"
                parts.append(f"not parent-based: {rate} of spans with a parent have none stored")
            lines.append(f"  {s['service']}: " + "; ".join(parts))
    return lines
