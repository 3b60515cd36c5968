"""`ctxaudit import`: Jaeger JSON, Zipkin v2 and OTLP/JSON captures into a real DuckDB file
through the receivers' own decoding; detection, duplicates, malformed files, gzip."""

from __future__ import annotations

import gzip
import json

import duckdb
import pytest
from click.testing import CliRunner
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from audit.capture.detect import detect
from audit.capture.source import FORMATS, BadCapture
from audit.cli import import_captures, main

T0 = 1_700_000_000_000_000  # µs
TRACE = "5b8efff798038103d269b633813fc60c"
OTHER_TRACE = "00000000000000000000000000000abc"


def run(*args: str):
    return CliRunner().invoke(main, ["import", *args])


def rows(db: str, sql: str) -> list[tuple]:
    con = duckdb.connect(db, read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def spans_by_name(db: str) -> dict[str, dict]:
    con = duckdb.connect(db, read_only=True)
    try:
        cur = con.execute(
            "SELECT name, service_name, kind, status_code, status_message, trace_id, span_id, parent_span_id,"
            " start_ns, end_ns, server_address, server_port, peer_service, url_path, http_route,"
            " event_count, link_count, otlp_rest, resource_attributes FROM spans_full"
        )
        cols = [d[0] for d in cur.description]
        out = {}
        for r in cur.fetchall():
            row = dict(zip(cols, r, strict=True))
            rest = Span.FromString(row.pop("otlp_rest"))
            row["attributes"] = {kv.key: kv.value for kv in rest.attributes}
            row["events"] = [e.name for e in rest.events]
            row["resource_attributes"] = json.loads(row["resource_attributes"])
            out[row["name"]] = row
        return out
    finally:
        con.close()


def tag(key, value, typ="string"):
    return {"key": key, "type": typ, "value": value}


def jaeger_trace(trace_id: str = TRACE, *, first_span: int = 1, start: int = T0) -> dict:
    """frontend GET /cart (server) -> frontend HTTP GET (client, peer.*) -> cart /cart/{id} (server,
    http.route) -> cart redis (no span.kind); plus a queue consumer that FOLLOWS_FROM the client."""
    sid = [f"{first_span + i:x}" for i in range(5)]  # short ids, as older Jaeger versions write them
    return {
        "traceID": trace_id,
        "spans": [
            {
                "traceID": trace_id,
                "spanID": sid[0],
                "operationName": "GET /cart",
                "references": [],
                "startTime": start,
                "duration": 10_000,
                "tags": [tag("span.kind", "server"), tag("http.status_code", 200, "int64")],
                "logs": [],
                "processID": "p1",
                "flags": 1,
            },
            {
                "traceID": trace_id,
                "spanID": sid[1],
                "operationName": "HTTP GET",
                "references": [{"refType": "CHILD_OF", "traceID": trace_id, "spanID": sid[0]}],
                "startTime": start + 1000,
                "duration": 8000,
                "tags": [
                    tag("span.kind", "client"),
                    tag("peer.hostname", "cart"),
                    tag("peer.port", 8080, "int64"),
                    tag("error", True, "bool"),
                    tag("retry.ratio", 0.5, "float64"),
                ],
                "logs": [
                    {"timestamp": start + 1500, "fields": [tag("event", "retry"), tag("attempt", 2, "int64")]}
                ],
                "processID": "p1",
            },
            {
                "traceID": trace_id,
                "spanID": sid[2],
                "operationName": "/cart/{id}",
                "references": [
                    {"refType": "CHILD_OF", "traceID": trace_id, "spanID": sid[1]},
                    {"refType": "CHILD_OF", "traceID": OTHER_TRACE, "spanID": "77"},
                ],
                "startTime": start + 2000,
                "duration": 5000,
                "tags": [
                    tag("span.kind", "server"),
                    tag("http.route", "/cart/{id}"),
                    tag("otel.status_code", "OK"),
                ],
                "logs": [],
                "processID": "p2",
            },
            {
                "traceID": trace_id,
                "spanID": sid[3],
                "operationName": "redis GET",
                "references": [{"refType": "CHILD_OF", "traceID": trace_id, "spanID": sid[2]}],
                "startTime": start + 3000,
                "duration": 500,
                "tags": [tag("db.system", "redis")],
                "logs": [],
                "processID": "p2",
            },
            {
                "traceID": trace_id,
                "spanID": sid[4],
                "operationName": "process order",
                "references": [{"refType": "FOLLOWS_FROM", "traceID": trace_id, "spanID": sid[1]}],
                "startTime": start + 9000,
                "duration": 500,
                "tags": [tag("span.kind", "consumer")],
                "logs": [],
                "processID": "p2",
            },
        ],
        "processes": {
            "p1": {"serviceName": "frontend", "tags": [tag("hostname", "fe-1")]},
            "p2": {"serviceName": "cart", "tags": [tag("ip", "10.0.0.2")]},
        },
        "warnings": None,
    }


def jaeger_doc(*traces: dict) -> dict:
    return {"data": list(traces), "total": 0, "limit": 0, "offset": 0, "errors": None}


def write(path, doc) -> str:
    path.write_text(json.dumps(doc, indent=1))
    return str(path)


# --- Jaeger -------------------------------------------------------------------------------------


def test_jaeger_round_trip(tmp_path):
    db = str(tmp_path / "s.duckdb")
    capture = write(tmp_path / "jaeger.json", jaeger_doc(jaeger_trace()))
    result = run("--db", db, capture)
    assert result.exit_code == 0, result.output
    assert "5 spans stored, 0 skipped" in result.output and "jaeger 1" in result.output

    s = spans_by_name(db)
    assert len(s) == 5
    root, client, server, redis, consumer = (
        s[n] for n in ("GET /cart", "HTTP GET", "/cart/{id}", "redis GET", "process order")
    )
    assert {r["trace_id"] for r in s.values()} == {int(TRACE, 16)}
    assert (root["span_id"], root["parent_span_id"]) == (1, None)
    assert client["parent_span_id"] == 1 and server["parent_span_id"] == 2 and redis["parent_span_id"] == 3
    assert [r["kind"] for r in (root, client, server, redis, consumer)] == [
        "SERVER",
        "CLIENT",
        "SERVER",
        "UNSPECIFIED",  # no span.kind tag: not guessed
        "CONSUMER",
    ]
    assert (root["start_ns"], root["end_ns"]) == (T0 * 1000, (T0 + 10_000) * 1000)
    assert (root["service_name"], server["service_name"]) == ("frontend", "cart")
    assert root["resource_attributes"] == {"service.name": "frontend", "hostname": "fe-1"}
    # the client's peer.* say where the call went
    assert (client["server_address"], client["server_port"]) == ("cart", 8080)
    assert server["http_route"] == "/cart/{id}"
    assert (client["status_code"], server["status_code"], root["status_code"]) == ("ERROR", "OK", "UNSET")
    assert "span.kind" not in client["attributes"] and "error" not in client["attributes"]
    assert client["attributes"]["retry.ratio"].double_value == 0.5
    assert root["attributes"]["http.status_code"].int_value == 200
    assert client["events"] == ["retry"]
    # a CHILD_OF another trace, and a FOLLOWS_FROM, are links
    links = rows(
        db,
        "SELECT span_id, link_trace_id, link_span_id, attributes FROM span_links ORDER BY span_id",
    )
    assert [(r[0], r[1], r[2]) for r in links] == [(3, int(OTHER_TRACE, 16), 0x77), (5, int(TRACE, 16), 2)]
    assert [json.loads(r[3])["opentracing.ref_type"] for r in links] == ["child_of", "follows_from"]
    assert (consumer["parent_span_id"], consumer["link_count"]) == (None, 1)


def test_jaeger_64_bit_trace_ids_are_left_padded(tmp_path):
    db = str(tmp_path / "s.duckdb")
    trace = jaeger_trace("00000000000000a1")
    trace["spans"][0]["traceID"] = "a1"  # older Jaeger versions drop leading zeros
    capture = write(tmp_path / "jaeger.json", jaeger_doc(trace))
    assert run("--db", db, capture).exit_code == 0
    assert rows(db, "SELECT DISTINCT trace_id FROM spans") == [(0xA1,)]
    assert rows(db, "SELECT count(*) FROM spans WHERE parent_span_id IS NOT NULL") == [(3,)]


def test_times_with_a_fraction_of_a_microsecond(tmp_path):
    db = str(tmp_path / "s.duckdb")
    trace = jaeger_trace()
    trace["spans"][0].update(startTime=T0 + 0.25, duration=10.5)
    assert run("--db", db, write(tmp_path / "j.json", jaeger_doc(trace))).exit_code == 0
    root = spans_by_name(db)["GET /cart"]
    assert (root["start_ns"], root["end_ns"] - root["start_ns"]) == (T0 * 1000 + 250, 10_500)


def test_a_single_trace_an_empty_answer_and_a_bare_list_of_traces(tmp_path):
    db = str(tmp_path / "s.duckdb")
    one = write(tmp_path / "one.json", jaeger_trace())
    empty = write(tmp_path / "empty.json", {"data": None, "total": 0, "errors": None})
    bare_list = write(tmp_path / "list.json", [jaeger_trace("f" * 32)])
    result = run("--db", db, one, empty, bare_list)
    assert result.exit_code == 0, result.output
    assert "10 spans stored" in result.output and "from 3 file(s) (jaeger 3)" in result.output


# --- Zipkin -------------------------------------------------------------------------------------


def zipkin_spans(trace_id: str = TRACE) -> list[dict]:
    fe = {"serviceName": "frontend", "ipv4": "10.0.0.1"}
    cart = {"serviceName": "cart", "ipv4": "10.0.0.2", "port": 8080}
    return [
        {
            "traceId": trace_id,
            "id": "0000000000000001",
            "name": "get /cart",
            "kind": "SERVER",
            "timestamp": T0,
            "duration": 10_000,
            "localEndpoint": fe,
            "tags": {"http.path": "/cart", "http.method": "GET"},
        },
        {
            "traceId": trace_id,
            "parentId": "0000000000000001",
            "id": "0000000000000002",
            "name": "get",
            "kind": "CLIENT",
            "timestamp": T0 + 1000,
            "duration": 8000,
            "localEndpoint": fe,
            "remoteEndpoint": cart,
            "tags": {"error": "connection reset"},
            "annotations": [{"timestamp": T0 + 1100, "value": "ws"}],
        },
        {  # the server side of the same (shared) span id
            "traceId": trace_id,
            "parentId": "0000000000000001",
            "id": "0000000000000002",
            "name": "get /cart/{id}",
            "kind": "SERVER",
            "shared": True,
            "timestamp": T0 + 2000,
            "duration": 5000,
            "localEndpoint": cart,
            "remoteEndpoint": {"ipv4": "10.0.0.1", "port": 51234},
            "tags": {"http.route": "/cart/{id}"},
        },
        {  # the cart server's own child: its parent is the shared id
            "traceId": trace_id,
            "parentId": "0000000000000002",
            "id": "0000000000000003",
            "name": "redis get",
            "timestamp": T0 + 3000,
            "duration": 500,
            "localEndpoint": cart,
        },
        {
            "traceId": trace_id,
            "parentId": "0000000000000001",
            "id": "0000000000000004",
            "name": "send",
            "kind": "PRODUCER",
            "timestamp": T0 + 9000,
            "duration": 100,
            "localEndpoint": fe,
            "remoteEndpoint": {"serviceName": "kafka"},
        },
    ]


@pytest.mark.parametrize("nested", [False, True], ids=["list of spans", "list of traces"])
def test_zipkin_round_trip(tmp_path, nested):
    db = str(tmp_path / "s.duckdb")
    spans = zipkin_spans()
    capture = write(tmp_path / "zipkin.json", [spans[:2], spans[2:]] if nested else spans)
    result = run("--db", db, capture)
    assert result.exit_code == 0, result.output
    assert "5 spans stored" in result.output and "zipkin 1" in result.output

    s = spans_by_name(db)
    root, client, server, redis, send = (
        s[n] for n in ("get /cart", "get", "get /cart/{id}", "redis get", "send")
    )
    assert [r["kind"] for r in (root, client, server, redis, send)] == [
        "SERVER",
        "CLIENT",
        "SERVER",
        "UNSPECIFIED",
        "PRODUCER",
    ]
    # both sides of the shared span are stored: the server under the client, the child under the server
    assert client["span_id"] == 2 and server["span_id"] not in (1, 2, 3, 4)
    assert server["parent_span_id"] == 2 and redis["parent_span_id"] == server["span_id"]
    assert (client["server_address"], client["server_port"], client["peer_service"]) == (
        "10.0.0.2",
        8080,
        "cart",
    )
    assert (server["server_address"], server["server_port"], server["peer_service"]) == (
        "10.0.0.2",
        8080,
        None,
    )
    assert server["attributes"]["client.address"].string_value == "10.0.0.1"
    assert send["peer_service"] == "kafka"
    assert root["url_path"] == "/cart" and server["http_route"] == "/cart/{id}"
    assert (client["status_code"], client["status_message"]) == ("ERROR", "connection reset")
    assert client["events"] == ["ws"]
    assert (server["service_name"], root["service_name"]) == ("cart", "frontend")


# --- OTLP/JSON ----------------------------------------------------------------------------------


def otlp_line(trace_id: str, span_ids: list[str], service: str = "checkout") -> str:
    spans = [
        {
            "traceId": trace_id,
            "spanId": sid,
            "parentSpanId": span_ids[0] if i else "",
            "name": f"op{i}",
            "kind": 2 if i == 0 else "SPAN_KIND_CLIENT",
            "startTimeUnixNano": str(T0 * 1000 + i),
            "endTimeUnixNano": str(T0 * 1000 + 1000),
            "attributes": [{"key": "http.route", "value": {"stringValue": "/checkout"}}],
            "links": [{"traceId": OTHER_TRACE, "spanId": "0000000000000077"}] if i == 1 else [],
        }
        for i, sid in enumerate(span_ids)
    ]
    return json.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
                    "scopeSpans": [{"scope": {"name": "test"}, "spans": spans}],
                }
            ]
        }
    )


def test_otlp_json_lines_round_trip(tmp_path):
    db = str(tmp_path / "s.duckdb")
    path = tmp_path / "traces.jsonl"
    path.write_text(
        otlp_line(TRACE, ["00000000000000a1", "00000000000000a2"])
        + "\n\n"
        + otlp_line(OTHER_TRACE, ["00000000000000b1"], service="email")
        + "\n"
    )
    result = run("--db", db, str(path))
    assert result.exit_code == 0, result.output
    assert "3 spans stored" in result.output and "otlp-json 1" in result.output
    s = spans_by_name(db)
    assert s["op1"]["parent_span_id"] == 0xA1 and s["op1"]["kind"] == "CLIENT"
    assert s["op0"]["kind"] == "SERVER" and s["op0"]["http_route"] == "/checkout"
    assert rows(db, "SELECT link_trace_id, link_span_id FROM span_links") == [(int(OTHER_TRACE, 16), 0x77)]
    assert rows(db, "SELECT service_name, count(*) FROM spans GROUP BY ALL ORDER BY ALL") == [
        ("checkout", 2),
        ("email", 1),
    ]


# --- detection, gzip, several files ---------------------------------------------------------------


def all_formats(tmp_path) -> dict[str, str]:
    otlp = tmp_path / "c.jsonl"
    otlp.write_text(otlp_line(OTHER_TRACE, ["00000000000000b1"]) + "\n")
    return {
        "jaeger": write(tmp_path / "a.json", jaeger_doc(jaeger_trace())),
        "zipkin": write(tmp_path / "b.json", zipkin_spans("1" * 32)),
        "otlp-json": str(otlp),
    }


def test_format_is_detected_per_file(tmp_path):
    files = all_formats(tmp_path)
    db = str(tmp_path / "s.duckdb")
    result = run("--db", db, *files.values())
    assert result.exit_code == 0, result.output
    assert "11 spans stored" in result.output
    assert "(jaeger 1, otlp-json 1, zipkin 1)" in result.output
    for fmt, path in files.items():
        with open(path, "rb") as f:
            assert detect(f.read()) == fmt


def test_the_cli_offers_every_format():
    choice = next(p for p in import_captures.params if p.name == "fmt").type
    assert tuple(choice.choices) == FORMATS


def test_a_given_format_that_does_not_fit_fails(tmp_path):
    files = all_formats(tmp_path)
    result = run("--db", str(tmp_path / "s.duckdb"), "--format", "zipkin", files["jaeger"])
    assert result.exit_code == 1
    assert files["jaeger"] in result.output and "not Zipkin v2 JSON" in result.output


def test_unknown_content_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"hello": 1}')
    result = run("--db", str(tmp_path / "s.duckdb"), str(path))
    assert result.exit_code == 1 and str(path) in result.output and "cannot tell the format" in result.output


def test_gzip(tmp_path):
    files = all_formats(tmp_path)
    zipped = []
    for path in files.values():
        gz = path + ".gz"
        with open(path, "rb") as f, gzip.open(gz, "wb") as out:
            out.write(f.read())
        zipped.append(gz)
    db = str(tmp_path / "s.duckdb")
    result = run("--db", db, *zipped)
    assert result.exit_code == 0, result.output
    assert "11 spans stored" in result.output and "(jaeger 1, otlp-json 1, zipkin 1)" in result.output
    # the same spans as the plain files: nothing new
    again = run("--db", db, *files.values())
    assert "0 spans stored, 11 skipped as already stored" in again.output


def test_a_truncated_gzip_file_is_an_error_naming_it(tmp_path):
    gz = tmp_path / "a.json.gz"
    gz.write_bytes(gzip.compress(json.dumps(jaeger_doc(jaeger_trace())).encode())[:-30])
    result = run("--db", str(tmp_path / "s.duckdb"), str(gz))
    assert result.exit_code == 1 and f"{gz}: " in result.output and "gzip" in result.output


# --- duplicates ---------------------------------------------------------------------------------


def test_importing_again_stores_nothing_new(tmp_path):
    db = str(tmp_path / "s.duckdb")
    first = write(tmp_path / "a.json", jaeger_doc(jaeger_trace()))
    assert run("--db", db, first).exit_code == 0
    before = rows(db, "SELECT count(*), (SELECT count(*) FROM span_links) FROM spans")
    again = run("--db", db, first)
    assert again.exit_code == 0 and "0 spans stored, 5 skipped as already stored" in again.output
    assert rows(db, "SELECT count(*), (SELECT count(*) FROM span_links) FROM spans") == before == [(5, 2)]

    # a later download overlaps the first: only the new trace is stored
    new_trace = "0" * 31 + "f"
    overlapping = write(
        tmp_path / "b.json", jaeger_doc(jaeger_trace(), jaeger_trace(new_trace, start=T0 + 60_000_000))
    )
    result = run("--db", db, overlapping)
    assert "5 spans stored, 5 skipped as already stored" in result.output
    assert rows(db, "SELECT count(DISTINCT trace_id), count(*) FROM spans") == [(2, 10)]
    assert rows(db, "SELECT count(*) FROM span_links") == [(4,)]


def test_a_trace_twice_in_one_import_is_stored_once(tmp_path):
    db = str(tmp_path / "s.duckdb")
    doc = write(tmp_path / "a.json", jaeger_doc(jaeger_trace(), jaeger_trace()))
    result = run("--db", db, doc, doc)
    assert result.exit_code == 0, result.output
    assert "5 spans stored, 15 skipped" in result.output
    assert rows(db, "SELECT count(*), (SELECT count(*) FROM span_links) FROM spans") == [(5, 2)]


def test_shared_zipkin_spans_are_duplicates_the_second_time(tmp_path):
    db = str(tmp_path / "s.duckdb")
    capture = write(tmp_path / "z.json", zipkin_spans())
    run("--db", db, capture)
    again = run("--db", db, capture)
    assert "0 spans stored, 5 skipped" in again.output


# --- malformed files ----------------------------------------------------------------------------


def many_traces(n: int, offset: int = 0) -> list[dict]:
    return [jaeger_trace(f"{i + 1 + offset:032x}", start=T0 + i * 100_000) for i in range(n)]


def test_truncated_json_names_file_and_line_and_keeps_what_came_before(tmp_path):
    db = str(tmp_path / "s.duckdb")
    good = write(tmp_path / "good.json", jaeger_doc(*many_traces(2)))
    text = json.dumps(jaeger_doc(*many_traces(3, offset=10)), indent=1)
    bad = tmp_path / "bad.json"
    bad.write_text(text[: len(text) * 5 // 6])  # cut inside the third trace
    result = run("--db", db, good, str(bad))
    assert result.exit_code == 1
    assert f"{bad}: line " in result.output and "not valid JSON" in result.output
    # the good file, and the whole traces before the cut, are stored
    assert "20 spans stored" in result.output
    assert rows(db, "SELECT count(DISTINCT trace_id), count(*) FROM spans") == [(4, 20)]


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda s: s.update(startTime="yesterday"), "startTime must be an integer"),
        (lambda s: s.update(spanID="xyz"), "spanID 'xyz' is not hex"),
        (lambda s: s.update(spanID="0"), "spanID is all zeros"),
        (lambda s: s.update(spanID=17), "spanID must be a hex string"),
        (lambda s: s.update(tags=[tag("n", "many", "int64")]), "must be an integer"),
        (lambda s: s.update(processID="p9"), "processID 'p9' is not in the trace's processes"),
        (lambda s: s.pop("startTime"), "startTime is missing"),
    ],
    ids=["time as text", "id not hex", "zero id", "id as number", "tag type", "process", "no start"],
)
def test_a_bad_span_names_trace_and_span_and_keeps_the_traces_before(tmp_path, breakage, message):
    db = str(tmp_path / "s.duckdb")
    traces = many_traces(3)
    breakage(traces[2]["spans"][3])
    bad = write(tmp_path / "bad.json", jaeger_doc(*traces))
    result = run("--db", db, bad)
    assert result.exit_code == 1, result.output
    assert f"{bad}: data[2] (trace {traces[2]['traceID']}) spans[3]: " in result.output
    assert message in result.output
    assert rows(db, "SELECT count(DISTINCT trace_id), count(*) FROM spans") == [(2, 10)]

    # fixed and imported again: the two traces are skipped, the third stored
    fixed = write(tmp_path / "bad.json", jaeger_doc(*many_traces(3)))
    again = run("--db", db, fixed)
    assert again.exit_code == 0 and "5 spans stored, 10 skipped" in again.output


def test_wrong_types_at_the_top_of_jaeger_json(tmp_path):
    path = write(tmp_path / "bad.json", {"data": {"traceID": "1"}})
    result = run("--db", str(tmp_path / "s.duckdb"), "--format", "jaeger", path)
    assert result.exit_code == 1 and f"{path}: data: must be a list of traces" in result.output


def test_a_bad_zipkin_span_names_its_index(tmp_path):
    db = str(tmp_path / "s.duckdb")
    spans = zipkin_spans() + zipkin_spans("2" * 32)
    spans[7]["parentId"] = "not-an-id"
    bad = write(tmp_path / "z.json", spans)
    result = run("--db", db, bad)
    assert result.exit_code == 1
    assert f"{bad}: [7]: parentId 'not-an-id' is not hex" in result.output
    assert rows(db, "SELECT count(*) FROM spans") == [(5,)]  # the first trace


def test_a_bad_otlp_json_line_names_the_line(tmp_path):
    db = str(tmp_path / "s.duckdb")
    path = tmp_path / "t.jsonl"
    path.write_text(
        otlp_line(TRACE, ["00000000000000a1"])
        + "\n"
        + otlp_line(OTHER_TRACE, ["00000000000000b1"])
        + "\n"
        + otlp_line("abc", ["zz"])  # ids not hex
        + "\n"
    )
    result = run("--db", db, str(path))
    assert result.exit_code == 1
    assert f"{path}: line 3: malformed OTLP/JSON" in result.output
    assert rows(db, "SELECT count(*) FROM spans") == [(2,)]

    path.write_text(
        otlp_line(TRACE, ["00000000000000a1"]) + "\n" + '{"resourceSpans": [{"scopeSpans": 3}]}\n'
    )
    result = run("--db", db, str(path))
    assert result.exit_code == 1 and f"{path}: line 2: " in result.output


def test_an_otlp_json_span_with_a_short_trace_id_is_refused_with_its_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(otlp_line("abcd", ["00000000000000a1"]) + "\n")
    result = run("--db", str(tmp_path / "s.duckdb"), str(path))
    assert result.exit_code == 1 and f"{path}: line 1: spans refused" in result.output


def test_an_empty_file(tmp_path):
    path = tmp_path / "e.json"
    path.write_text("  \n")
    result = run("--db", str(tmp_path / "s.duckdb"), str(path))
    assert result.exit_code == 1 and f"{path}: the file is empty" in result.output


# --- the worker process, progress ---------------------------------------------------------------


def import_with(db: str, files: list[str], **options):
    from audit.import_job import Importer
    from audit.store.writer import SpanStore, SpanWriter
    from collector_ext.ingest import decode_batch

    writer = SpanWriter(SpanStore(db))
    importer = Importer(writer, lambda body, ct: decode_batch(body, ct, False, len(body)), **options)
    try:
        return importer, importer.run(files)
    finally:
        writer.close()


@pytest.mark.slow  # starts the conversion worker process
def test_converting_in_a_worker_process_stores_the_same(tmp_path):
    files = list(all_formats(tmp_path).values())
    contents = []
    for name, worker_from in (("here", 1 << 40), ("worker", 0)):
        db = str(tmp_path / f"{name}.duckdb")
        _, stats = import_with(db, files, worker_from_bytes=worker_from, batch_spans=3)
        assert stats.stored == 11 and stats.files == 3
        contents.append(
            rows(
                db,
                "SELECT trace_id, span_id, parent_span_id, name, kind, start_ns, end_ns, service_name,"
                " server_address, otlp_rest FROM spans ORDER BY ALL",
            )
        )
    assert contents[0] == contents[1]


@pytest.mark.slow  # starts the conversion worker process
def test_a_bad_file_in_the_worker_process_names_file_and_position(tmp_path):
    traces = many_traces(3)
    traces[1]["spans"][0]["spanID"] = "xyz"
    bad = write(tmp_path / "bad.json", jaeger_doc(*traces))
    db = str(tmp_path / "s.duckdb")
    with pytest.raises(BadCapture) as e:
        import_with(db, [bad], worker_from_bytes=0)
    assert str(e.value).startswith(f"{bad}: data[1] (trace ")
    assert rows(db, "SELECT count(*) FROM spans") == [(5,)]


def test_progress_lines(tmp_path):
    capture = write(tmp_path / "a.json", jaeger_doc(*many_traces(6)))
    lines: list[str] = []
    importer, stats = import_with(
        str(tmp_path / "s.duckdb"), [capture], batch_spans=5, progress=lines.append, progress_every_s=0
    )
    assert stats.stored == 30
    assert lines and all("spans stored" in line and "spans/s" in line for line in lines)
    assert "30 spans stored, 0 skipped" in stats.summary()


# --- an imported capture is audited like received spans -------------------------------------------


def test_an_imported_jaeger_capture_with_cut_hops_is_audited(tmp_path):
    """Frontend calls cart over HTTP (client spans with peer.*); 10 of 80 calls lost their context
    (the cart server span is the root of a trace of its own). The audit finds those orphans and
    names the hop, from the imported spans alone."""
    traces, cut = [], set()
    for i in range(80):
        trace = jaeger_trace(f"{i + 1:032x}", start=T0 + i * 200_000)
        if i % 8 == 3:  # the cart side starts a new trace: its spans move there, its parent is gone
            new_id = f"{i + 1:016x}" + "f" * 16
            moved = {"traceID": new_id, "spans": trace["spans"][2:4], "processes": trace["processes"]}
            for span in moved["spans"]:
                span["traceID"] = new_id
                span["references"] = [r for r in span["references"] if r["spanID"] != span["spanID"]]
            moved["spans"][0]["references"] = []
            moved["spans"][1]["references"][0]["traceID"] = new_id
            trace["spans"] = trace["spans"][:2] + trace["spans"][4:]
            traces.append(moved)
            cut.add(int(new_id, 16))
        traces.append(trace)
    db = str(tmp_path / "s.duckdb")
    assert run("--db", db, write(tmp_path / "cut.json", jaeger_doc(*traces))).exit_code == 0
    result = CliRunner().invoke(main, ["audit", "--db", db, "--all", "--settle", "0", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    orphans = [f for f in doc["findings"] if f["kind"] == "orphan_root"]
    assert {int(f["trace_id"], 16) for f in orphans} == cut
    assert {(f["caller"], f["callee"], f["protocol"]) for f in orphans} == {("frontend", "cart", "http")}
