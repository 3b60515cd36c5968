"""The store as Hive-partitioned Parquet: what `ctxaudit export` writes and what the Spark audit
reads back (docs/scale.md). One folder per shard, then per hour of span start time:

    DIR/spans/shard=NAME/date=YYYY-MM-DD/hour=HH/part-*.parquet   every column of `spans`
    DIR/links/shard=NAME/date=YYYY-MM-DD/hour=HH/part-*.parquet   `span_links`, by their span's hour
    DIR/_shards/NAME.json                                         the shard's manifest

Ids are lowercase hex text (Parquet has no 128-bit or unsigned 64-bit integer every reader
takes), times are signed 64-bit nanoseconds, JSON columns are text. The manifest lists every
exported hour with its files and row counts, so a reader tells an hour without spans from one
never exported, and a file that is missing or cut short from a whole one.

Exporting hours again replaces them: files go to a temporary folder first, then each hour's
folder is swapped in, then the manifest is replaced (os.replace).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StoreError, translate
from .migrations import MIGRATIONS, SPANS_FULL, ensure_spans_full

FORMAT = "ctxaudit-parquet"
FORMAT_VERSION = 1
# the store migration whose `spans`/`span_links` this format carries; a store whose spans
# schema changes appends a migration, and this format's version moves with it
SPANS_MIGRATION = "0001_spans"
HOUR_NS = 3_600_000_000_000

_HEX_ID = "lpad(lower(hex({c})), {n}, '0')"


def _hex(column: str, digits: int) -> str:
    return _HEX_ID.format(c=column, n=digits)


# every column of `spans`, as written (name -> SQL over the store's table)
SPAN_COLUMNS: dict[str, str] = {
    "trace_id": _hex("trace_id", 32),
    "span_id": _hex("span_id", 16),
    "parent_span_id": _hex("parent_span_id", 16),
    "trace_state": "trace_state",
    "flags": "flags",
    "name": "name",
    "kind": "kind",
    "start_ns": "start_ns::BIGINT",
    "end_ns": "end_ns::BIGINT",
    "status_code": "status_code",
    "status_message": "status_message",
    "dropped_attributes_count": "dropped_attributes_count",
    "event_count": "event_count",
    "dropped_events_count": "dropped_events_count",
    "link_count": "link_count",
    "dropped_links_count": "dropped_links_count",
    "otlp_rest": "otlp_rest",
    "service_name": "service_name",
    "resource_attributes": "resource_attributes::VARCHAR",
    "resource_dropped_attributes_count": "resource_dropped_attributes_count",
    "resource_schema_url": "resource_schema_url",
    "scope_name": "scope_name",
    "scope_version": "scope_version",
    "scope_attributes": "scope_attributes::VARCHAR",
    "scope_schema_url": "scope_schema_url",
    "parent_is_remote": "parent_is_remote",
    "sampling_threshold": "sampling_threshold::BIGINT",
    "sampling_rv": "sampling_rv::BIGINT",
    "sampling_tracestate_invalid": "sampling_tracestate_invalid",
    "protocol": "protocol",
    "server_address": "server_address",
    "server_port": "server_port",
    "peer_service": "peer_service",
    "url_full": "url_full",
    "url_path": "url_path",
    "http_route": "http_route",
    "http_method": "http_method",
    "http_status_code": "http_status_code",
    "messaging_system": "messaging_system",
    "messaging_destination": "messaging_destination",
    "messaging_message_id": "messaging_message_id",
    "messaging_partition": "messaging_partition",
    "messaging_offset": "messaging_offset",
    "rpc_system": "rpc_system",
    "rpc_service": "rpc_service",
    "rpc_method": "rpc_method",
    "db_system": "db_system",
    "ingested_at": "ingested_at",
}
LINK_COLUMNS: dict[str, str] = {
    "trace_id": _hex("l.trace_id", 32),
    "span_id": _hex("l.span_id", 16),
    "link_trace_id": _hex("l.link_trace_id", 32),
    "link_span_id": _hex("l.link_span_id", 16),
    "trace_state": "l.trace_state",
    "flags": "l.flags",
    "attributes": "l.attributes::VARCHAR",
    "dropped_attributes_count": "l.dropped_attributes_count",
    "ingested_at": "l.ingested_at",
    "span_start_ns": "s.start_ns::BIGINT",  # the carrying span's start: which slices need the link
}
_PARTITION = (
    "strftime(make_timestamp((start_ns // 1000)::BIGINT), '%Y-%m-%d') AS date, "
    "strftime(make_timestamp((start_ns // 1000)::BIGINT), '%H') AS hour"
)

# what the export writes, per kind: every column as written, then the date and hour partitions
_SELECT_SPANS = (  # spans_full: with their resource and scope columns (migration 0005)
    "SELECT {columns}, {partition} FROM " + SPANS_FULL + " WHERE start_ns >= $lo AND start_ns < $hi"
)
# a link belongs to the hour its span starts in; a span delivered twice starts at the same time
_SELECT_LINKS = """
SELECT {columns}, {partition} FROM span_links l
JOIN (SELECT DISTINCT trace_id, span_id, start_ns FROM spans
      WHERE start_ns >= $lo AND start_ns < $hi AND link_count > 0) s USING (trace_id, span_id)
"""
_COPY = """
COPY ({select}) TO '{target}' (FORMAT parquet, PARTITION_BY (date, hour), FILENAME_PATTERN 'part-{{uuid}}',
  COMPRESSION zstd, ROW_GROUP_SIZE 122880, KV_METADATA {{format: '{fmt}'}})
"""
# each hour's spans, counted in the files just written (the same for either source)
_HOURS = """
SELECT start_ns // {h} AS hour, count(*), min(start_ns), max(start_ns)
FROM read_parquet('{files}', hive_partitioning = false) GROUP BY 1
"""
KINDS = ("spans", "links")


def export_select(kind: str) -> str:
    """The query (parameters $lo, $hi: span start times) whose rows the export writes for
    `kind` ('spans' or 'links'): the format's columns, then `date` and `hour`."""
    sql, columns = {"spans": (_SELECT_SPANS, SPAN_COLUMNS), "links": (_SELECT_LINKS, LINK_COLUMNS)}[kind]
    select = ", ".join(f"{expr} AS {name}" for name, expr in columns.items())
    return sql.format(columns=select, partition=_PARTITION)


def _copy(con: duckdb.DuckDBPyConnection, select: str, params: dict, target: Path) -> None:
    quoted = target.as_posix().replace("'", "''")
    con.execute(_COPY.format(select=select, target=quoted, fmt=_format_tag()), params)


class StoreSource:
    """Spans to export from a store connection: a file opened read-only, or a cursor of the
    running server's store (`serve --export-parquet`)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: str):
        self.con, self.path = con, path

    def extent(self) -> tuple[int | None, int | None]:
        first, last = self.con.execute("SELECT min(start_ns), max(start_ns) FROM spans").fetchone()
        return first, last

    def write(self, kind: str, lo: int, hi: int, target: Path) -> None:
        _copy(self.con, export_select(kind), {"lo": lo, "hi": hi}, target)

    def batches(self, kind: str, lo: int, hi: int, rows: int = 65_536) -> pa.RecordBatchReader:
        """The rows `write` would write, as Arrow batches (the read API streams them)."""
        return self.con.sql(export_select(kind), params={"lo": lo, "hi": hi}).to_arrow_reader(rows)


class StreamSource:
    """Spans to export that arrive as Arrow batches of `export_select`'s rows (`export --server`:
    through the read API), written with the same COPY as a store's, so the files are the same."""

    def __init__(self, path: str, extent, batches):
        self.path, self._extent, self._batches = path, extent, batches

    def extent(self) -> tuple[int | None, int | None]:
        return self._extent()

    def write(self, kind: str, lo: int, hi: int, target: Path) -> None:
        con = duckdb.connect()
        try:
            with self._batches(kind, lo, hi) as stream:
                con.register("exported", stream)
                _copy(con, "SELECT * FROM exported", {}, target)
        finally:
            con.close()


def hour_key(hour_index: int) -> str:
    """'YYYY-MM-DDTHH' of an hour counted from the epoch."""
    return time.strftime("%Y-%m-%dT%H", time.gmtime(hour_index * 3600))


def _hour_dir(kind: str, shard: str, key: str) -> str:
    date, hour = key.split("T")
    return f"{kind}/shard={shard}/date={date}/hour={hour}"


def manifest_path(root: Path, shard: str) -> Path:
    return root / "_shards" / f"{shard}.json"


def check_shard_name(shard: str) -> None:
    if not shard or "/" in shard or shard.startswith((".", "_")) or "=" in shard:
        raise StoreError(
            f"shard name {shard!r}: use letters, digits, '-' or '_' (no '/', '=' or leading '.')"
        )


def export_store(
    db: str,
    out: str,
    *,
    shard: str,
    since_ns: int | None = None,
    until_ns: int | None = None,
    progress=lambda step: None,
) -> dict:
    """Export the spans of the file `db` starting in [since, until) (rounded out to whole hours;
    default: all) and their links under `out`; replace the hours exported before. Returns the
    shard's manifest."""
    check_shard_name(shard)
    if not Path(db).exists():
        raise StoreError(f"{db} does not exist")
    try:
        con = duckdb.connect(db, read_only=True)
        ensure_spans_full(con)
    except duckdb.Error as e:
        raise translate(e, db, writing=False) from None
    try:
        return export_spans(
            StoreSource(con, db), out, shard=shard, since_ns=since_ns, until_ns=until_ns, progress=progress
        )
    finally:
        con.close()


def export_spans(
    source,
    out: str,
    *,
    shard: str,
    since_ns: int | None = None,
    until_ns: int | None = None,
    progress=lambda step: None,
) -> dict:
    """`export_store` from any source (StoreSource, StreamSource): the spans starting in
    [since, until), rounded out to whole hours, replace those hours under `out`."""
    check_shard_name(shard)
    db = source.path
    root = Path(out)
    staging = root / f".export-{uuid.uuid4().hex}"
    try:
        first, last = source.extent()
        if first is None:
            raise StoreError(f"{db} holds no spans: nothing to export")
        lo = (since_ns if since_ns is not None else first) // HOUR_NS * HOUR_NS
        hi = until_ns if until_ns is not None else last + 1
        hi = -(-hi // HOUR_NS) * HOUR_NS
        if hi <= lo:
            raise StoreError("--until is not after --since: nothing to export")
        progress(f"writing the spans of {(hi - lo) // HOUR_NS} hour(s)")
        staging.mkdir(parents=True)
        for kind in KINDS:
            source.write(kind, lo, hi, staging / kind)
        hours = _hours_written(staging / "spans")
    except duckdb.Error as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise translate(e, db, writing=False) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress("swapping the new hours in")
    manifest = read_manifest(root, shard, missing_ok=True) or _new_manifest(shard)
    exported_at = time.time_ns()
    for index in range(lo // HOUR_NS, hi // HOUR_NS):
        key = hour_key(index)
        entry = hours.get(key, {"spans": 0, "first_start_ns": None, "last_start_ns": None})
        for kind in ("spans", "links"):
            rel = _hour_dir(kind, shard, key)
            new, old = staging / kind / rel.split("/", 2)[2], root / rel
            files = sorted(p.name for p in new.glob("*.parquet")) if new.exists() else []
            entry[f"{kind}_files"] = {f: pq.ParquetFile(new / f).metadata.num_rows for f in files}
            trash = staging / "old" / rel
            if old.exists():
                trash.parent.mkdir(parents=True, exist_ok=True)
                os.replace(old, trash)
            if files:
                old.parent.mkdir(parents=True, exist_ok=True)
                os.replace(new, old)
        entry["exported_at_ns"] = exported_at
        manifest["hours"][key] = entry
    manifest["hours"] = dict(sorted(manifest["hours"].items()))
    manifest["store"] = str(db)
    manifest["last_export"] = {
        "at_ns": exported_at,
        "from_ns": lo,
        "until_ns": hi,
        "hours": (hi - lo) // HOUR_NS,
        "spans": sum(h["spans"] for h in hours.values()),
    }
    _write_manifest(root, shard, manifest)
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _hours_written(spans: Path) -> dict[str, dict]:
    """Per hour: the spans written under `spans` (a staging folder), their first and last start."""
    if not any(spans.rglob("*.parquet")):
        return {}
    files = (spans / "**" / "*.parquet").as_posix().replace("'", "''")
    con = duckdb.connect()
    try:
        rows = con.execute(_HOURS.format(h=HOUR_NS, files=files)).fetchall()
    finally:
        con.close()
    return {hour_key(h): {"spans": n, "first_start_ns": a, "last_start_ns": b} for h, n, a, b in rows}


def _format_tag() -> str:
    return f"{FORMAT}/{FORMAT_VERSION}"


def _new_manifest(shard: str) -> dict:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "store_schema": SPANS_MIGRATION,
        "shard": shard,
        "span_columns": list(SPAN_COLUMNS),
        "link_columns": list(LINK_COLUMNS),
        "hours": {},
    }


def _write_manifest(root: Path, shard: str, manifest: dict) -> None:
    path = manifest_path(root, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)


class ExportError(StoreError):
    """An export folder the audit cannot read as a whole: named by path."""


def read_manifest(root: Path, shard: str, *, missing_ok: bool = False) -> dict | None:
    path = manifest_path(root, shard)
    if not path.exists():
        if missing_ok:
            return None
        raise ExportError(f"{path}: no manifest for shard {shard!r} (not written by `ctxaudit export`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: not a ctxaudit export manifest")
    if manifest.get("version") != FORMAT_VERSION or manifest.get("store_schema") != SPANS_MIGRATION:
        raise ExportError(
            f"{path}: shard {shard!r} was exported in format version {manifest.get('version')} "
            f"(store schema {manifest.get('store_schema')}); this ctxaudit reads version {FORMAT_VERSION} "
            f"({SPANS_MIGRATION}): export that shard again with this version"
        )
    if manifest.get("span_columns") != list(SPAN_COLUMNS) or manifest.get("link_columns") != list(
        LINK_COLUMNS
    ):
        raise ExportError(f"{path}: the shard's columns differ from this version's: export it again")
    return manifest


def shards(root: Path) -> list[str]:
    """The shards exported under `root`, by their manifests; an error naming the path if none."""
    folder = root / "_shards"
    names = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    if not names:
        spans = root / "spans"
        what = (
            "Parquet without ctxaudit manifests"
            if spans.exists() or any(root.glob("*.parquet"))
            else "nothing"
        )
        raise ExportError(f"{root}: {what}; expected {folder}/NAME.json written by `ctxaudit export`")
    return names


def check_export(
    root: Path,
    start_ns: int,
    end_ns: int,
    *,
    check_files: bool = True,
    read_from_ns: int | None = None,
    read_to_ns: int | None = None,
) -> dict[str, dict]:
    """Every shard's manifest, once it is shown that each shard exported every hour of
    [start_ns, end_ns) and that each hour's files are there, whole, written by this format
    (its tag, columns and types), and alone in their folder (a file the manifest does not list
    would be read too). Hours of [read_from_ns, read_to_ns] outside the window (the context
    margin) are checked the same way if exported; one never exported holds no files."""
    manifests = {name: read_manifest(root, name) for name in shards(root)}
    lo = min(start_ns, read_from_ns if read_from_ns is not None else start_ns)
    hi = max(end_ns, read_to_ns + 1 if read_to_ns is not None else end_ns)
    schemas: dict[str, tuple[Path, pa.Schema]] = {}
    for name, manifest in manifests.items():
        for index in range(lo // HOUR_NS, -(-hi // HOUR_NS)):
            key = hour_key(index)
            entry = manifest["hours"].get(key)
            in_window = start_ns // HOUR_NS <= index < -(-end_ns // HOUR_NS)
            if entry is None and in_window:
                raise ExportError(
                    f"{root / _hour_dir('spans', name, key)}: shard {name!r} never exported hour {key} "
                    f"(export it, or audit a window its manifest {manifest_path(root, name)} covers)"
                )
            if not check_files:
                continue
            for kind, columns in (("spans", SPAN_COLUMNS), ("links", LINK_COLUMNS)):
                listed = entry[f"{kind}_files"] if entry else {}
                folder = root / _hour_dir(kind, name, key)
                for path in sorted(folder.glob("*")) if folder.is_dir() else []:
                    if path.name not in listed:
                        raise ExportError(
                            f"{path}: in an exported hour's folder but not in the manifest "
                            f"{manifest_path(root, name)} (written by something else, or left by an "
                            "interrupted writer): remove it, or export the hour again"
                        )
                for file, rows in listed.items():
                    schema = _check_file(folder / file, rows, columns)
                    first = schemas.setdefault(kind, (folder / file, schema))
                    if not schema.equals(first[1]):
                        raise ExportError(
                            f"{folder / file}: column types differ from those of {first[0]} "
                            f"({_type_difference(schema, first[1])}): export that shard again with "
                            "this version"
                        )
    return manifests


def _type_difference(a: pa.Schema, b: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type} vs {g.type}" for f, g in zip(a, b) if not f.type.equals(g.type))


def _check_file(path: Path, rows: int, columns: dict) -> pa.Schema:
    if not path.exists():
        raise ExportError(f"{path}: listed in the shard's manifest but missing (a partial partition)")
    try:
        parquet = pq.ParquetFile(path)
        meta, schema = parquet.metadata, parquet.schema_arrow.remove_metadata()
    except (OSError, pa.ArrowException) as e:
        raise ExportError(f"{path}: not readable as Parquet ({e})") from None
    tag = (meta.metadata or {}).get(b"format", b"").decode(errors="replace")
    if tag != _format_tag():
        raise ExportError(
            f"{path}: not written by `ctxaudit export` (format tag {tag or 'none'!r}, "
            f"expected {_format_tag()!r})"
        )
    if meta.num_rows != rows:
        raise ExportError(f"{path}: {meta.num_rows} rows, its manifest says {rows} (a partial partition)")
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    if names != list(columns):
        raise ExportError(f"{path}: columns {names} are not those of {FORMAT} version {FORMAT_VERSION}")
    return schema


def window_of(manifests: dict[str, dict]) -> tuple[int, int] | None:
    """[first span start, last span start + 1) over every shard's exported hours."""
    firsts = [h["first_start_ns"] for m in manifests.values() for h in m["hours"].values() if h["spans"]]
    lasts = [h["last_start_ns"] for m in manifests.values() for h in m["hours"].values() if h["spans"]]
    return (min(firsts), max(lasts) + 1) if firsts else None


# Back into a store's own tables (the migration's DDL, so the engine sees the same types)
_LOAD_SPANS = "INSERT INTO spans SELECT {columns} FROM arrow_spans ORDER BY start_ns, trace_id, span_id"
_LOAD_LINKS = "INSERT INTO span_links SELECT {columns} FROM arrow_links ORDER BY trace_id, span_id"


def _unhex(column: str, kind: str) -> str:
    return f"('0x' || {column})::{kind}"


def _span_select() -> str:
    ids = {"trace_id": "UHUGEINT", "span_id": "UBIGINT", "parent_span_id": "UBIGINT"}
    return ", ".join(_unhex(c, ids[c]) if c in ids else c for c in SPAN_COLUMNS)


def _link_select() -> str:
    ids = {
        "trace_id": "UHUGEINT",
        "span_id": "UBIGINT",
        "link_trace_id": "UHUGEINT",
        "link_span_id": "UBIGINT",
    }
    return ", ".join(_unhex(c, ids[c]) if c in ids else c for c in LINK_COLUMNS if c != "span_start_ns")


def memory_store(
    spans: pa.Table, links: pa.Table, memory_limit: str | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory store holding these exported rows in the store's own `spans` and
    `span_links` tables (in start-time order), ready for the audit engine."""
    con = duckdb.connect(config={"memory_limit": memory_limit} if memory_limit else {})
    con.execute(next(m.sql for m in MIGRATIONS if m.name == SPANS_MIGRATION))
    con.register("arrow_spans", spans)
    con.register("arrow_links", links)
    con.execute(_LOAD_SPANS.format(columns=_span_select()))
    con.execute(_LOAD_LINKS.format(columns=_link_select()))
    con.unregister("arrow_spans")
    con.unregister("arrow_links")
    return con
