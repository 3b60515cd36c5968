"""The audit on Apache Spark, over the Parquet of every shard (`ctxaudit audit --spark`,
docs/scale.md). One implementation of the audit's rules: each Spark task loads one time slice
(its window plus the context margin either side, from every shard: orphans and their parents
are in different traces, so usually in different shards) into an in-memory DuckDB store with
the store's own schema, and runs the engine on it, exactly as the single-process audit runs it
on a window of the file. Each task writes its slice's findings (Parquet) and figures (JSON)
into the run's temporary folder and hands Spark back only their paths and row counts: a slice's
findings (hundreds of MB at 10M spans) never pass through the driver's JVM. The driver reads
the files with pyarrow, concatenates the slices' findings, adds up their edges and removes the
folder, also when the audit fails.

A window that fits one slice (the default slice is a day) gives the single-process audit's
answers for that window; a longer window gives, slice by slice, what the single-process audit
gives window by window (as `serve`'s periodic audits do).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .contract.document import AuditResult, Edge
from .engine import AuditWindow, run_audit
from .engine.sampling_merge import merge_sampling, strip
from .settings import AUDIT_MEMORY_LIMIT, AuditSettings
from .store.errors import StoreError
from .store.parquet import (
    HOUR_NS,
    LINK_COLUMNS,
    SPAN_COLUMNS,
    ExportError,
    check_export,
    hour_key,
    memory_store,
    read_manifest,
    shards,
    window_of,
)

_S = 1_000_000_000
DEFAULT_SLICE_S = 86_400.0
# what a task hands back through Spark: where its slice's files are, and how many findings they hold
_RESULT_SCHEMA = "slice long, findings long, path string"
TEMP_FOLDER = "_audit-tmp"  # the default home of runs' temporary folders, inside the export folder


def slices(window: AuditWindow, slice_ns: int) -> list[AuditWindow]:
    """The window cut into slices of `slice_ns`, each with the window's context margin."""
    out, start = [], window.start_ns
    while start < window.end_ns:
        end = min(start + slice_ns, window.end_ns)
        out.append(AuditWindow(start, end, window.context_ns))
        start = end
    return out


def audit_slice(spans: pa.Table, links: pa.Table, window: AuditWindow, settings: AuditSettings, memory_limit):
    """One slice, in a Spark task (or anywhere): the engine over an in-memory store of these rows."""
    con = memory_store(
        spans.select(list(SPAN_COLUMNS)), links.select([c for c in LINK_COLUMNS]), memory_limit
    )
    try:
        return run_audit(con, window, settings.config)
    finally:
        con.close()


def write_slice(folder: str, index: int, result: AuditResult) -> dict:
    """A slice's findings (Parquet) and other figures (JSON) as files in the run's folder; the
    row Spark carries back names them. Each file is written under a name of its own, then
    renamed: a retried or speculative attempt of the task replaces it whole."""
    meta = {
        "spans": result.spans,
        "traces": result.traces,
        "edges": [e.__dict__ for e in result.edges],
        "entrypoints": result.entrypoints,
        "roots": result.roots,
        "sampling": result.sampling,
        "sampling_stats": result.sampling_stats,
        "seconds": result.seconds,
        "degraded": result.degraded,
        "window": [result.window_start_ns, result.window_end_ns],
    }
    path = os.path.join(folder, f"slice-{index:06d}")
    attempt = f".{uuid.uuid4().hex}.tmp"
    pq.write_table(result.findings, path + ".parquet" + attempt)
    os.replace(path + ".parquet" + attempt, path + ".parquet")
    with open(path + ".json" + attempt, "w") as f:
        json.dump(meta, f)
    os.replace(path + ".json" + attempt, path + ".json")
    return {"slice": index, "findings": result.findings.num_rows, "path": path}


def read_slice(row) -> tuple[pa.Table, dict]:
    """What a task wrote, as the driver reads it; an error names the file (a folder the driver
    does not share with the executors leaves none where the driver looks)."""
    path = row["path"]
    try:
        findings = pq.read_table(path + ".parquet")
        with open(path + ".json") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(
            f"{path}.parquet: a Spark task's findings cannot be read ({str(e)[:300]}); the temporary "
            "folder must be one the driver and every executor share (--spark-temp, docs/scale.md)"
        ) from None
    if findings.num_rows != row["findings"]:
        raise ExportError(f"{path}.parquet: {findings.num_rows} findings, the task wrote {row['findings']}")
    return findings, meta


def _task(windows: list[AuditWindow], settings: AuditSettings, memory_limit: str, folder: str):
    """The function Spark runs per slice (cogrouped spans and links, as Arrow tables)."""

    def run(spans: pa.Table, links: pa.Table) -> pa.Table:
        index = (spans if spans.num_rows else links).column("slice")[0].as_py()
        result = audit_slice(spans, links, windows[index], settings, memory_limit)
        return pa.Table.from_pylist([write_slice(folder, index, result)])

    return run


def run_folder(root: Path, temp: str | None) -> Path:
    """This run's own folder for the tasks' files: under `temp`, else under the export folder
    (which every executor already reads); created, and checked writable, before Spark starts."""
    base = Path(temp) if temp else root / TEMP_FOLDER
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    folder = base / f"run-{stamp}-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True)
        (folder / ".writable").write_bytes(b"")
        (folder / ".writable").unlink()
    except OSError as e:
        raise ExportError(
            f"{base}: the Spark tasks' temporary folder is not writable ({e.strerror or e}); "
            "give --spark-temp a folder the driver and every executor can write"
        ) from None
    return folder


def _remove_run_folder(folder: Path, temp: str | None) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if not temp:  # the default home goes too once no other run uses it
        try:
            folder.parent.rmdir()
        except OSError:
            pass


def merge(
    parts: list[tuple[AuditWindow, pa.Table, dict]], window: AuditWindow, seconds: float
) -> AuditResult:
    """The slices' results as one: findings concatenated (each slice's are spans starting in
    it), edges and roots added up, entry points united. Sampling figures are the slice's when
    there is one; with several, each is computed again from the slices' pooled sufficient
    statistics (audit/engine/sampling_merge.py)."""
    parts = sorted(parts, key=lambda p: p[0].start_ns)
    findings = pa.concat_tables([p[1] for p in parts])
    if findings.num_rows:
        findings = findings.sort_by(
            [("start_ns", "ascending"), ("kind", "ascending"), ("span_id", "ascending")]
        )
    edges: dict[tuple, dict] = {}
    roots: dict[str, dict[str, int]] = {}
    for _, _, meta in parts:
        for e in meta["edges"]:
            key = (e["caller"], e["callee"], e["protocol"], e["system"], e["callee_instrumented"])
            acc = edges.setdefault(key, {**e, "calls": 0, "propagated": 0, "stitched": 0, "_dropped": -1})
            for k in ("calls", "propagated", "stitched"):
                acc[k] += e[k]
            if e["calls"] - e["propagated"] > acc["_dropped"]:  # the cause seen where most calls dropped
                acc["cause"], acc["_dropped"] = e["cause"], e["calls"] - e["propagated"]
        for service, counts in meta["roots"].items():
            into = roots.setdefault(service, dict.fromkeys(counts, 0))
            for k, v in counts.items():
                into[k] = into.get(k, 0) + v
    audited = [meta for _, _, meta in parts if meta["spans"]]
    if len(audited) == 1:
        sampling, sampling_stats = audited[0]["sampling"], audited[0]["sampling_stats"]
    else:
        sampling_stats = merge_sampling([meta["sampling_stats"] for meta in audited])
        sampling = strip(sampling_stats)
    degraded: dict[tuple, int] = {}
    for _, _, meta in parts:
        for d in meta["degraded"]:
            degraded[(d["callee"], d["operation"])] = (
                degraded.get((d["callee"], d["operation"]), 0) + d["orphans"]
            )
    edge_list = [Edge(**{k: v for k, v in e.items() if k != "_dropped"}) for e in edges.values()]
    return AuditResult(
        window.start_ns,
        window.end_ns,
        sum(m["spans"] for _, _, m in parts),
        sum(m["traces"] for _, _, m in parts),
        findings,
        sorted(edge_list, key=lambda e: (e.caller, e.callee, e.protocol, e.system or "")),
        sorted({ep for _, _, m in parts for ep in m["entrypoints"]}),
        dict(sorted(roots.items())),
        sampling,
        seconds,
        degraded=[{"callee": c, "operation": o, "orphans": n} for (c, o), n in sorted(degraded.items())],
        sampling_stats=sampling_stats,
    )


def choose_spark_window(
    root: Path, settings: AuditSettings, since_ns: int | None, until_ns: int | None
) -> AuditWindow | None:
    """The window to audit: --since/--until, else everything every shard exported."""
    manifests = {name: read_manifest(root, name) for name in shards(root)}
    extent = window_of(manifests)
    if extent is None:
        return None
    start = since_ns if since_ns is not None else extent[0]
    end = until_ns if until_ns is not None else extent[1]
    if end <= start:
        return None
    return AuditWindow(start, end, int(settings.context_s * _S))


def spark_session(master: str, conf: dict[str, str] | None = None):
    """A Spark session on `master` (local[N], spark://, yarn, k8s://)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise StoreError(
            "--spark needs pyspark: pip install 'ctxaudit[spark]' (and Java 17: openjdk-17-jre-headless)"
        ) from None
    # local mode runs its Python workers with this interpreter (where ctxaudit is installed)
    if master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.master(master).appName("ctxaudit audit")
    for k, v in {
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.session.timeZone": "UTC",
        **(conf or {}),
    }.items():
        builder = builder.config(k, v)
    return builder.getOrCreate()


def spark_audit(
    master: str,
    parquet: str,
    settings: AuditSettings,
    *,
    since_ns: int | None = None,
    until_ns: int | None = None,
    slice_s: float = DEFAULT_SLICE_S,
    memory_limit: str = AUDIT_MEMORY_LIMIT,
    temp: str | None = None,
    progress: Callable[[str], None] = lambda step: None,
    session=None,
) -> AuditResult | None:
    """Audit the export under `parquet` on Spark; None when it holds no spans in the window.
    Raises ExportError (naming the path) when a shard's export does not cover the window whole,
    or when the tasks' temporary folder (`temp`, else `_audit-tmp` in the export folder: a path
    the driver and every executor share) is not writable."""
    started = time.monotonic()
    local = "://" not in parquet or parquet.startswith("file://")
    root = Path(parquet.removeprefix("file://"))
    if not local:
        raise ExportError(f"{parquet}: only a local or mounted folder is read so far (docs/scale.md)")
    window = choose_spark_window(root, settings, since_ns, until_ns)
    if window is None:
        return None
    progress("checking every shard's manifest and files")
    check_export(
        root, window.start_ns, window.end_ns, read_from_ns=window.read_from_ns, read_to_ns=window.read_to_ns
    )
    windows = slices(window, max(int(slice_s * _S), 1))
    folder = run_folder(root, temp)
    try:
        return _on_spark(
            master, parquet, root, window, windows, settings, memory_limit, folder, progress, session, started
        )
    finally:
        _remove_run_folder(folder, temp)


def _on_spark(
    master, parquet, root, window, windows, settings, memory_limit, folder, progress, session, started
):
    """The Spark job proper: each slice's task writes its files under `folder`; the driver reads
    them (read_slice) and merges the slices."""
    progress(f"{len(windows)} slice(s) on Spark, their findings written under {folder}")
    spark = session or spark_session(master)
    # hour=00 stays the text the manifest names (inferred, it would be the number 0)
    spark.conf.set("spark.sql.sources.partitionColumnTypeInference.enabled", "false")
    from pyspark.sql import functions as F

    def with_slices(df, time_column: str):
        lo, hi = window.read_from_ns, window.read_to_ns
        hours = [hour_key(h) for h in range(lo // HOUR_NS, hi // HOUR_NS + 1)]
        df = df.where(F.concat("date", F.lit("T"), "hour").isin(hours)).where(
            F.col(time_column).between(lo, hi)
        )
        first, width, ctx = window.start_ns, windows[0].end_ns - windows[0].start_ns, window.context_ns
        t = F.col(time_column)
        k_lo = F.greatest(F.lit(0), F.floor((t - first - ctx) / width) - 1)
        k_hi = F.least(F.lit(len(windows) - 1), F.floor((t - first + ctx) / width) + 1)
        df = df.withColumn("slice", F.explode(F.sequence(k_lo.cast("int"), k_hi.cast("int"))))
        starts = F.lit(first) + F.col("slice").cast("long") * width
        ends = F.least(starts + width, F.lit(window.end_ns))
        return df.where((t >= F.greatest(starts - ctx, F.lit(0))) & (t <= ends + ctx))

    try:
        spans = spark.read.option("basePath", str(root / "spans")).parquet(str(root / "spans"))
        links = spark.read.option("basePath", str(root / "links")).parquet(str(root / "links"))
        spans = with_slices(spans, "start_ns").select("slice", *SPAN_COLUMNS)
        links = with_slices(links, "span_start_ns").select("slice", *LINK_COLUMNS)
        run = _task(windows, settings, memory_limit, str(folder))
        rows = (
            spans.groupBy("slice").cogroup(links.groupBy("slice")).applyInArrow(run, _RESULT_SCHEMA).collect()
        )
    except Exception as e:  # Spark's errors name the file that failed; say which export it was
        if type(e).__module__.startswith(("pyspark", "py4j")):
            raise ExportError(f"{parquet}: the Spark audit failed: {str(e).splitlines()[0][:2000]}") from None
        raise
    if not rows:
        return None
    progress(f"reading {sum(r['findings'] for r in rows):,} findings of {len(rows)} slice(s)")
    parts = []
    for row in rows:
        findings, meta = read_slice(row)
        parts.append((windows[row["slice"]], findings, meta))
    audited = {w.start_ns for w, _, _ in parts}
    # a slice without spans has no task; that is an empty slice, never a lost one (checked above)
    for w in windows:
        if w.start_ns not in audited:
            parts.append((w, _empty_findings(parts), _empty_meta()))
    if not any(m["spans"] for _, _, m in parts):
        return None
    return merge(parts, window, time.monotonic() - started)


def _empty_findings(parts) -> pa.Table:
    return parts[0][1].schema.empty_table() if parts else pa.table({"start_ns": pa.array([], pa.uint64())})


def _empty_meta() -> dict:
    return {
        "spans": 0,
        "traces": 0,
        "edges": [],
        "entrypoints": [],
        "roots": {},
        "sampling": {"services": [], "edges": []},
        "seconds": 0.0,
        "degraded": [],
    }
