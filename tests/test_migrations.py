"""Slimmer rows (issue 19, item 3): a span's resource and scope stored once, by content id.

A store written before migration `0005_span_resources` (every span carrying its resource and
scope columns) stays readable read-only as it is, and opening it read-write migrates it: the
same rows through `spans_full`, ids equal to those the decoders compute, so spans sent after the
upgrade from the same processes add no resource or scope row."""

from __future__ import annotations

import json
import random

import duckdb
import pyarrow as pa
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span

from audit.store.batch import RESOURCE_COLUMNS, SCOPE_COLUMNS, SpanBatch, resource_id, scope_id
from audit.store.migrations import MIGRATIONS, ensure_spans_full
from audit.store.otlp_values import any_value
from audit.store.parquet import export_select
from audit.store.reader import LocalReader
from audit.store.rest import max_string_bytes, restore
from audit.store.staging import encode_frame, read_segment
from audit.store.writer import SpanStore, _insert_sql
from bench.payloads import build_request
from collector_ext.decode import PROTOBUF
from collector_ext.ingest import decode_batch
from tests.otlp_builders import kv, request, span, spans
from tests.test_columns import S1, T1, convert

_GROUP_IDS = ("resource_id", "scope_id")


def _decoded(body: bytes) -> SpanBatch:
    return decode_batch(body, PROTOBUF, False, 1 << 30)


def _requests(n: int = 2, spans_per: int = 500) -> list[bytes]:
    """bench/payloads.py's requests (5 services), and one with odd resources and scopes: a
    schema URL, dropped attributes, scope attributes, a scope without name, no service.name."""
    rng = random.Random(7)
    bodies = [build_request(rng, spans_per).SerializeToString() for _ in range(n)]
    odd = request(spans(3, rng), "odd")
    rs = odd.resource_spans[0]
    rs.schema_url = "https://opentelemetry.io/schemas/1.26.0"
    rs.resource.dropped_attributes_count = 2
    rs.scope_spans[0].scope.name = "lib"
    rs.scope_spans[0].scope.version = "2.0"
    rs.scope_spans[0].scope.attributes.append(kv("lib.flavour", "plain"))
    rs.scope_spans[0].schema_url = "https://opentelemetry.io/schemas/1.27.0"
    bare = ResourceSpans()
    bare.scope_spans.add().spans.extend(spans(2, rng))
    odd.resource_spans.append(bare)
    return [*bodies, odd.SerializeToString()]


def _whole_rest(spans: pa.Table) -> pa.Table:
    """`spans` as a build before 0006_otlp_rest_slim made them: every attribute in otlp_rest."""
    rest = [restore(r["otlp_rest"], r["attributes_in_columns"], r) for r in spans.to_pylist()]
    at = spans.column_names.index("otlp_rest")
    spans = spans.set_column(at, "otlp_rest", pa.array(rest, pa.binary()))
    return spans.drop_columns(["attributes_in_columns"])


def _old_store(path: str, batches: list[SpanBatch], before: str = "0005_span_resources") -> None:
    """A store as the build before migration `before` wrote it: its migrations, its columns."""
    con = duckdb.connect(path)
    con.execute("CREATE TABLE _migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)")
    for m in MIGRATIONS[: [m.name for m in MIGRATIONS].index(before)]:
        con.execute(m.sql)
        con.execute("INSERT INTO _migrations VALUES (?, current_timestamp)", [m.name])
    for b in batches:
        table = _whole_rest(b.spans)
        if before == "0005_span_resources":
            table = table.drop_columns(list(_GROUP_IDS))
            con.register("batch_spans", table)
            con.execute(_insert_sql("spans", table.schema))
        else:
            con.register("batch_spans", table)
            con.execute(_insert_sql("spans", table.schema, RESOURCE_COLUMNS + SCOPE_COLUMNS))
    con.close()


def _full_rows(path: str) -> list[dict]:
    reader = LocalReader(path)
    try:
        return reader._dicts(
            f"SELECT * EXCLUDE (ingested_at) FROM {reader._spans_full} ORDER BY trace_id, span_id", []
        )
    finally:
        reader.close()


def _exported(db: str) -> list[tuple]:
    """What the Parquet export (`export --db`, read-only) writes of the resource and scope."""
    con = duckdb.connect(db, read_only=True)
    try:
        ensure_spans_full(con)
        rows = con.execute(export_select("spans"), {"lo": 0, "hi": 2**63 - 1}).fetchall()
        names = [d[0] for d in con.description]
    finally:
        con.close()
    return [
        tuple(dict(zip(names, r))[c] for c in ("span_id", *RESOURCE_COLUMNS, *SCOPE_COLUMNS)) for r in rows
    ]


def _exported_before(before: pa.Table) -> list[tuple]:
    return [
        (f"{r['span_id']:016x}", *(r[c] for c in RESOURCE_COLUMNS + SCOPE_COLUMNS))
        for r in before.to_pylist()
    ]


@pytest.fixture
def batches() -> list[SpanBatch]:
    return [_decoded(b) for b in _requests()]


def test_the_python_ids_are_the_migrations_sql(batches):
    con = duckdb.connect()
    for b in batches:
        for row in b.spans.select([*RESOURCE_COLUMNS, *SCOPE_COLUMNS, *_GROUP_IDS]).to_pylist():
            r = [row[c] for c in RESOURCE_COLUMNS]
            s = [row[c] for c in SCOPE_COLUMNS]
            assert row["resource_id"] == resource_id(*r)
            assert row["scope_id"] == scope_id(*s)
            # the expressions of migration 0005_span_resources
            (rid, sid) = con.execute(
                "SELECT md5_number_upper(concat(coalesce($1::JSON::VARCHAR, ''), chr(31), $2::VARCHAR, "
                "chr(31), coalesce($3, ''))), md5_number_upper(concat(coalesce($4, ''), chr(31), "
                "coalesce($5, ''), chr(31), coalesce($6::JSON::VARCHAR, ''), chr(31), coalesce($7, '')))",
                [*r, *s],
            ).fetchone()
            assert (rid, sid) == (row["resource_id"], row["scope_id"])


def test_a_store_stores_each_resource_and_scope_once(tmp_path, batches):
    db = str(tmp_path / "s.duckdb")
    store = SpanStore(db)
    store.append(batches[:1])
    store.append(batches)  # the same processes again, and new ones
    con = store.cursor()
    distinct = {
        tuple(r.values()) for b in batches for r in b.spans.select(list(RESOURCE_COLUMNS)).to_pylist()
    }
    assert con.execute("SELECT count(*) FROM span_resources").fetchone()[0] == len(distinct) == 7
    assert con.execute("SELECT count(*) FROM span_scopes").fetchone()[0] == 3
    stored = con.execute("SELECT count(*) FROM spans").fetchone()[0]
    assert stored == batches[0].accepted + sum(b.accepted for b in batches)
    store.close()
    rows = _full_rows(db)
    assert len(rows) == stored  # the view's joins neither drop nor repeat a span
    odd = [r for r in rows if r["service_name"] == "odd"]
    assert {
        (r["resource_dropped_attributes_count"], r["scope_name"], r["scope_attributes"]["lib.flavour"])
        for r in odd
    } == {(2, "lib", "plain")}
    bare = [r for r in rows if r["service_name"] == "unknown_service"]
    assert len(bare) == 2 and {(r["resource_attributes"], r["scope_name"]) for r in bare} == {(None, None)}


def test_a_store_of_the_previous_schema_is_read_then_migrated(tmp_path, batches):
    db = str(tmp_path / "old.duckdb")
    _old_store(db, batches)
    con = duckdb.connect(db, read_only=True)
    before = con.sql("SELECT * EXCLUDE (ingested_at) FROM spans ORDER BY trace_id, span_id").to_arrow_table()
    con.close()

    # read-only, as `stats`, the explorer and `export --db` open it while no server holds it
    rows = _full_rows(db)
    assert len(rows) == before.num_rows and rows[0]["resource_attributes"]["service.name"]
    reader = LocalReader(db)
    tid = rows[0]["trace_id"]
    assert {s["span_id"] for s in reader.trace(tid)} == {r["span_id"] for r in rows if r["trace_id"] == tid}
    assert reader.stats().spans == before.num_rows
    reader.close()
    assert sorted(_exported(db), key=repr) == sorted(_exported_before(before), key=repr)

    store = SpanStore(db)  # the writer migrates it
    con = store.cursor()
    names = [r[0] for r in con.execute("SELECT name FROM _migrations").fetchall()]
    assert "0005_span_resources" in names
    columns = {r[0] for r in con.execute("DESCRIBE spans").fetchall()}
    assert columns.isdisjoint(RESOURCE_COLUMNS + SCOPE_COLUMNS) and set(_GROUP_IDS) <= columns
    after = con.sql(
        "SELECT * EXCLUDE (ingested_at) FROM spans_full ORDER BY trace_id, span_id"
    ).to_arrow_table()
    assert after.select(before.column_names).to_pylist() == before.to_pylist()
    # the ids the migration gave are those the decoders give: the same resources add no row
    stored_ids = con.execute(
        "SELECT list(DISTINCT resource_id), list(DISTINCT scope_id) FROM spans"
    ).fetchone()
    sent = pa.concat_tables([b.spans for b in batches])
    assert set(stored_ids[0]) == set(sent.column("resource_id").to_pylist())
    assert set(stored_ids[1]) == set(sent.column("scope_id").to_pylist())
    resources = con.execute("SELECT count(*) FROM span_resources").fetchone()[0]
    store.append(batches)
    assert con.execute("SELECT count(*) FROM span_resources").fetchone()[0] == resources
    store.close()
    assert sorted(_exported(db), key=repr) == sorted(2 * _exported_before(before), key=repr)


def test_a_staging_segment_of_the_previous_build_loads(tmp_path, batches):
    """A segment staged before an upgrade holds batches without the id columns, and with every
    attribute in otlp_rest (no attributes_in_columns)."""
    old = [SpanBatch(_whole_rest(b.spans).drop_columns(list(_GROUP_IDS)), b.links) for b in batches]
    segment = tmp_path / "1.seg"
    with open(segment, "wb") as f:
        for b in old:
            for buf in encode_frame(b):
                f.write(buf)
    got, n, _, _ = read_segment(str(segment))
    assert n == sum(b.accepted for b in batches)
    db = str(tmp_path / "s.duckdb")
    store = SpanStore(db)
    store.append(got)
    store.close()
    assert _rest_rows(db) == sorted((r["span_id"], r["otlp_rest"]) for b in old for r in b.spans.to_pylist())
    rows = _full_rows(db)
    want = sorted(
        (r["service_name"], r["resource_attributes"], r["scope_name"])
        for b in batches
        for r in b.spans.select(["service_name", "resource_attributes", "scope_name"]).to_pylist()
    )
    assert (
        sorted(
            (
                r["service_name"],
                r["resource_attributes"] and json.dumps(r["resource_attributes"], separators=(",", ":")),
                r["scope_name"],
            )
            for r in rows
        )
        == want
    )


def _rest_rows(db: str) -> list[tuple]:
    """Each span's id and whole otlp_rest as the readers get it (spans_full, the Parquet export)."""
    con = duckdb.connect(db, read_only=True)
    try:
        ensure_spans_full(con)
        view = con.execute("SELECT span_id, otlp_rest FROM spans_full").fetchall()
        rows = con.execute(export_select("spans"), {"lo": 0, "hi": 2**63 - 1}).fetchall()
        names = [d[0] for d in con.description]
    finally:
        con.close()
    exported = [(int(r["span_id"], 16), r["otlp_rest"]) for r in (dict(zip(names, r)) for r in rows)]
    assert sorted(exported) == sorted(view)
    return sorted(view)


def test_otlp_rest_of_a_store_before_0006_and_after_reads_the_same(tmp_path, batches):
    """Spans stored whole before 0006_otlp_rest_slim and slim after it: spans_full, the Parquet
    export and the trace view give every span's attributes as they were sent."""
    sent = sorted((r["span_id"], r["otlp_rest"]) for b in batches for r in _whole_rest(b.spans).to_pylist())
    assert any(b.spans.column("attributes_in_columns").null_count < b.accepted for b in batches)
    db = str(tmp_path / "old.duckdb")
    _old_store(db, batches, before="0006_otlp_rest_slim")
    assert _rest_rows(db) == sent  # read-only, not migrated yet

    store = SpanStore(db)  # migrates, then stores slim rows beside the whole ones
    store.append(batches)
    con = store.cursor()
    (slim, whole) = con.execute(
        "SELECT count(*) FILTER (WHERE attributes_in_columns IS NOT NULL), "
        "count(*) FILTER (WHERE attributes_in_columns IS NULL) FROM spans"
    ).fetchone()
    assert slim > 0 and whole >= len(sent)
    store.close()
    assert _rest_rows(db) == sorted(sent + sent)

    reader = LocalReader(db)
    try:
        tid = reader._dicts("SELECT trace_id FROM spans WHERE attributes_in_columns IS NOT NULL LIMIT 1", [])
        trace = reader.trace(tid[0]["trace_id"])
    finally:
        reader.close()
    by_id = dict(sent)
    assert len(trace) == 2 * len({s["span_id"] for s in trace})  # stored whole once, slim once
    for s in trace:
        want = Span.FromString(by_id[s["span_id"]])
        assert s["attributes"] == {kv.key: any_value(kv.value) for kv in want.attributes}


def test_spans_full_puts_back_every_kind_of_value_a_column_gives_back(tmp_path):
    """The view's SQL encodes what audit/store/rest.py's Python does: multi-byte UTF-8, a NUL, a
    quote, ints of one to three varint bytes, and the longest string left out."""
    attrs = {
        "http.route": "a\x00b'c",
        "url.path": "/é€😀",
        "server.address": "s" * max_string_bytes("server.address"),
        "server.port": 127,
        "http.response.status_code": 128,
        "rpc.system": "grpc",
        "rpc.service": "svc",
        "messaging.system": "kafka",
        "db.system.name": "postgresql",
        "peer.service": "p",
        "url.full": "https://h/p",
        "other": 16384,
    }
    sent = span(T1, S1, attrs=attrs)
    batch = convert(request([sent]))
    row = batch.spans.to_pylist()[0]
    assert bin(row["attributes_in_columns"]).count("1") == len(attrs) - 1
    db = str(tmp_path / "s.duckdb")
    store = SpanStore(db)
    store.append([batch])
    store.close()
    [(_, rest)] = _rest_rows(db)
    assert rest == restore(row["otlp_rest"], row["attributes_in_columns"], row)
    assert {a.key: a.value for a in Span.FromString(rest).attributes} == {
        a.key: a.value for a in sent.attributes
    }
