"""The ingest conversion: whole spans kept losslessly, audit keys derived, bad ids refused."""

import json

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from audit.store.rest import COLUMN_ATTRIBUTES, max_string_bytes, restore
from collector_ext.columns import to_span_batch
from collector_ext.decode import PROTOBUF, decode_request
from tests.otlp_builders import kv, request, span

T1, S1, S2 = bytes.fromhex("0af7651916cd43dd8448eb211c80319c"), bytes.fromhex("b7ad6b7169203331"), b"\x11" * 8


def convert(req):
    return to_span_batch(decode_request(req.SerializeToString(), PROTOBUF))


def one_row(attrs=None, **fields):
    batch = convert(request([span(T1, S1, attrs=attrs, **fields)]))
    assert batch.accepted == 1
    return batch.spans.to_pylist()[0]


ALL_TYPES = {
    "s": "text",
    "i": -(2**63),
    "d": 0.25,
    "b": False,
    "raw": b"\x00\xff",
    "arr": ["a", 1, 2.5, True],
    "kv": {"nested": {"deep": [1, 2]}},
    "empty": [],
}


KINDS = ["UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"]


def rebuild(row: dict, links: list[dict]) -> Span:
    """Columns + otlp_rest + span_links -> the OTLP span: the store must lose nothing."""
    s = Span.FromString(restore(row["otlp_rest"], row["attributes_in_columns"], row))
    s.trace_id = (row["trace_id_hi"] << 64 | row["trace_id_lo"]).to_bytes(16, "big")
    s.span_id = row["span_id"].to_bytes(8, "big")
    if row["parent_span_id"] is not None:
        s.parent_span_id = row["parent_span_id"].to_bytes(8, "big")
    s.trace_state, s.flags, s.name = row["trace_state"] or "", row["flags"], row["name"]
    s.kind = KINDS.index(row["kind"])
    s.start_time_unix_nano, s.end_time_unix_nano = row["start_ns"], row["end_ns"]
    s.status.code = ["UNSET", "OK", "ERROR"].index(row["status_code"])
    s.status.message = row["status_message"] or ""
    s.dropped_attributes_count = row["dropped_attributes_count"]
    s.dropped_events_count = row["dropped_events_count"]
    s.dropped_links_count = row["dropped_links_count"]
    for link in links:
        li = s.links.add(
            trace_id=(link["link_trace_id_hi"] << 64 | link["link_trace_id_lo"]).to_bytes(16, "big"),
            span_id=link["link_span_id"].to_bytes(8, "big"),
            trace_state=link["trace_state"] or "",
            flags=link["flags"],
            dropped_attributes_count=link["dropped_attributes_count"],
        )
        for k, v in json.loads(link["attributes"] or "{}").items():
            li.attributes.append(kv(k, v))
    return s


def test_the_stored_span_is_the_sent_span():
    sent = span(
        T1,
        S1,
        S2,
        name="GET /x",
        kind=3,
        start=5,
        end=9,
        attrs=ALL_TYPES,
        trace_state="ot=th:8",
        flags=0x301,
        dropped_attributes_count=2,
        dropped_events_count=3,
        dropped_links_count=4,
    )
    sent.status.code, sent.status.message = 2, "boom"
    ev = sent.events.add(time_unix_nano=7, name="exception", dropped_attributes_count=1)
    ev.attributes.append(kv("exception.type", "ValueError"))
    link = sent.links.add(trace_id=b"\x05" * 16, span_id=b"\x06" * 8, trace_state="k=v", flags=1)
    link.attributes.append(kv("why", "batch"))
    batch = convert(request([sent]))
    stored = rebuild(batch.spans.to_pylist()[0], batch.links.to_pylist())
    # attributes are a map on the way in, so compare them as a mapping, the rest as messages
    assert {a.key: a.value for a in stored.attributes} == {a.key: a.value for a in sent.attributes}
    del stored.attributes[:], sent.attributes[:]
    assert stored == sent


def test_otlp_rest_holds_no_field_that_a_column_holds():
    sent = span(T1, S1, S2, name="n", attrs={"a": 1}, trace_state="x=y", flags=0x301)
    sent.links.add(trace_id=b"\x05" * 16, span_id=b"\x06" * 8)
    rest = Span.FromString(convert(request([sent])).spans.to_pylist()[0]["otlp_rest"])
    assert [f.name for f, _ in rest.ListFields()] == ["attributes"]


# every attribute a column may hold, with a value the column gives back exactly
IN_COLUMNS = {
    key: (1 << 30) + i if kind == "int" else f"v{i}" for i, (key, _, kind) in enumerate(COLUMN_ATTRIBUTES)
}


def test_otlp_rest_leaves_out_the_attributes_a_column_holds_and_they_come_back():
    # one key per column is read (the current one wins over a legacy one): send each column's
    # keys in turn, so that every entry of COLUMN_ATTRIBUTES is the one read once
    columns = {}
    for key, column, _ in COLUMN_ATTRIBUTES:
        columns.setdefault(column, []).append(key)
    for turn in range(max(len(keys) for keys in columns.values())):
        attrs = {
            "other": "kept",
            **{keys[turn]: IN_COLUMNS[keys[turn]] for keys in columns.values() if turn < len(keys)},
        }
        sent = span(T1, S1, attrs=attrs)
        row = convert(request([sent])).spans.to_pylist()[0]
        rest = Span.FromString(row["otlp_rest"])
        assert [a.key for a in rest.attributes] == ["other"]
        expect = sum(1 << i for i, (key, _, _) in enumerate(COLUMN_ATTRIBUTES) if key in attrs)
        assert row["attributes_in_columns"] == expect
        stored = Span.FromString(restore(row["otlp_rest"], row["attributes_in_columns"], row))
        assert {a.key: a.value for a in stored.attributes} == {a.key: a.value for a in sent.attributes}


@pytest.mark.parametrize(
    "attrs",
    [
        {"http.target": "/a?q=1"},  # the column drops the query
        {"server.port": "8080"},  # a string where the column is an int
        {"http.route": 5},  # an int where the column is a string
        {"url.path": ""},  # empty
        {"server.port": 0},
        {"server.port": -1},
        {"messaging.kafka.offset": 2**40},  # not an entry, and beyond the view's ints
        {"url.full": "https://x/" + "a" * max_string_bytes("url.full")},  # too long for one-byte lengths
        {"server.address": "a", "net.peer.name": "b"},  # the legacy key is not the one read
    ],
)
def test_attributes_a_column_does_not_give_back_exactly_stay_in_otlp_rest(attrs):
    sent = span(T1, S1, attrs=attrs)
    row = convert(request([sent])).spans.to_pylist()[0]
    rest = Span.FromString(row["otlp_rest"])
    kept = {a.key for a in rest.attributes}
    if "net.peer.name" in attrs:
        assert kept == {"net.peer.name"} and row["attributes_in_columns"] == 1 << 7
    else:
        assert kept == set(attrs) and row["attributes_in_columns"] is None
    stored = Span.FromString(restore(row["otlp_rest"], row["attributes_in_columns"], row))
    assert {a.key: a.value for a in stored.attributes} == {a.key: a.value for a in sent.attributes}


def test_scalar_columns():
    s = span(
        T1,
        S1,
        S2,
        name="GET /x",
        kind=5,
        start=5,
        end=9,
        trace_state="ot=th:c;rv:0123456789abcd",
        flags=0x301,
    )
    s.status.code = 2
    row = convert(request([s], service="orders")).spans.to_pylist()[0]
    assert row["trace_id_hi"] << 64 | row["trace_id_lo"] == int.from_bytes(T1, "big")
    assert row["span_id"] == int.from_bytes(S1, "big")
    assert row["parent_span_id"] == int.from_bytes(S2, "big")
    assert (row["kind"], row["status_code"], row["name"], row["start_ns"], row["end_ns"]) == (
        "CONSUMER",
        "ERROR",
        "GET /x",
        5,
        9,
    )
    assert row["service_name"] == "orders"
    assert row["sampling_threshold"] == 3 * 2**54 and row["sampling_rv"] == 0x0123456789ABCD
    assert row["sampling_tracestate_invalid"] is False


@pytest.mark.parametrize(
    "flags, remote", [(0, None), (0x1, None), (0x100, False), (0x101, False), (0x300, True), (0x301, True)]
)
def test_parent_is_remote_from_the_span_flags(flags, remote):
    assert one_row(flags=flags)["parent_is_remote"] is remote


def test_root_span_and_all_zero_parent_have_no_parent():
    batch = convert(request([span(T1, S1), span(T1, S2, bytes(8))]))
    assert [r["parent_span_id"] for r in batch.spans.to_pylist()] == [None, None]


@pytest.mark.parametrize(
    "attrs, protocol",
    [
        ({"http.request.method": "GET"}, "http"),
        ({"http.method": "GET"}, "http"),
        ({"url.full": "http://a/b"}, "http"),
        ({"rpc.system": "grpc", "rpc.service": "S"}, "grpc"),
        ({"rpc.system": "jsonrpc-tcp"}, "rpc"),
        ({"messaging.system": "kafka", "rpc.system": "grpc"}, "messaging"),
        ({"db.system": "postgresql", "server.address": "db"}, "db"),
        ({"db.system.name": "redis"}, "db"),
        ({"app.thing": 1}, "none"),
        ({}, "none"),
    ],
)
def test_protocol_class(attrs, protocol):
    assert one_row(attrs)["protocol"] == protocol


@pytest.mark.parametrize(
    "attrs, expected",
    [
        ({"server.address": "a", "net.peer.name": "legacy"}, {"server_address": "a"}),
        ({"net.peer.name": "legacy", "net.peer.port": 81}, {"server_address": "legacy", "server_port": 81}),
        ({"server.port": "8080"}, {"server_port": 8080}),
        ({"server.port": 2**40}, {"server_port": None}),
        ({"http.target": "/a/b?q=1"}, {"url_path": "/a/b"}),
        ({"url.path": "/c", "http.target": "/d"}, {"url_path": "/c"}),
        ({"http.url": "http://h/p"}, {"url_full": "http://h/p"}),
        ({"http.method": "PUT", "http.status_code": 503}, {"http_method": "PUT", "http_status_code": 503}),
        (
            {"http.request.method": "GET", "http.response.status_code": 200},
            {"http_method": "GET", "http_status_code": 200},
        ),
        (
            {"http.route": "/users/{id}", "peer.service": "users"},
            {"http_route": "/users/{id}", "peer_service": "users"},
        ),
        (
            {
                "messaging.system": "kafka",
                "messaging.destination.name": "orders",
                "messaging.message.id": "m1",
                "messaging.destination.partition.id": "3",
                "messaging.kafka.offset": 42,
            },
            {
                "messaging_system": "kafka",
                "messaging_destination": "orders",
                "messaging_message_id": "m1",
                "messaging_partition": "3",
                "messaging_offset": 42,
            },
        ),
        (
            {
                "messaging.kafka.partition": 3,
                "messaging.kafka.message.offset": 7,
                "messaging.destination": "t",
            },
            {"messaging_partition": "3", "messaging_offset": 7, "messaging_destination": "t"},
        ),
        (
            {"rpc.system": "grpc", "rpc.service": "inv.Inventory", "rpc.method": "Reserve"},
            {"rpc_system": "grpc", "rpc_service": "inv.Inventory", "rpc_method": "Reserve"},
        ),
        ({"db.system": "postgresql"}, {"db_system": "postgresql"}),
        ({"db.system.name": "redis", "db.system": "old"}, {"db_system": "redis"}),
    ],
)
def test_audit_keys_from_current_and_legacy_semantic_conventions(attrs, expected):
    row = one_row(attrs)
    assert {k: row[k] for k in expected} == expected


def test_invalid_ids_are_refused_and_counted_valid_spans_kept():
    bad_link = span(T1, b"\x07" * 8)
    bad_link.links.add(trace_id=b"\x01" * 3, span_id=b"\x02" * 8)
    batch = convert(
        request(
            [
                span(T1, S1),
                span(b"\x01" * 15, S2),
                span(bytes(16), S2),
                span(T1, b"\x01" * 9),
                span(T1, bytes(8)),
                span(T1, b"\x03" * 8, b"\x04" * 4),
                bad_link,
                span(T1, b"\x08" * 8),
            ]
        )
    )
    assert batch.accepted == 2 and batch.rejected == 6
    assert batch.rejection_reasons == {
        "trace_id must be 16 bytes, not all zero": 2,
        "span_id must be 8 bytes, not all zero": 2,
        "parent_span_id must be empty or 8 bytes": 1,
        "link ids must be 16 and 8 bytes": 1,
    }
    assert "2 span(s): trace_id must be 16 bytes" in batch.rejection_message()


def test_end_before_start_is_kept_and_counted():
    batch = convert(request([span(T1, S1, start=10, end=5), span(T1, S2, start=1, end=2)]))
    assert batch.accepted == 2 and batch.end_before_start == 1


def test_links_table_and_resource_columns():
    s = span(T1, S1)
    s.links.add(trace_id=b"\x05" * 16, span_id=b"\x06" * 8, trace_state="a=b", flags=0x301).attributes.append(
        kv("n", 1)
    )
    req = request([s])
    rs = req.resource_spans[0]
    rs.schema_url = "https://opentelemetry.io/schemas/1.26.0"
    rs.resource.attributes.append(kv("host.name", "h1"))
    rs.scope_spans[0].scope.name, rs.scope_spans[0].scope.version = "lib", "2.0"
    batch = convert(req)
    link = batch.links.to_pylist()[0]
    assert link["link_trace_id_hi"] == int.from_bytes(b"\x05" * 8, "big")
    assert link["link_span_id"] == int.from_bytes(b"\x06" * 8, "big")
    assert (link["trace_state"], link["flags"], link["attributes"]) == ("a=b", 0x301, '{"n":1}')
    row = batch.spans.to_pylist()[0]
    assert row["link_count"] == 1
    assert row["resource_attributes"] == '{"service.name":"svc","host.name":"h1"}'
    assert (row["scope_name"], row["scope_version"]) == ("lib", "2.0")
    assert row["resource_schema_url"] == "https://opentelemetry.io/schemas/1.26.0"


def test_missing_service_name_is_unknown_service():
    req = request([span(T1, S1)])
    del req.resource_spans[0].resource.attributes[:]
    assert convert(req).spans.to_pylist()[0]["service_name"] == "unknown_service"


def test_empty_request_is_an_empty_batch():
    batch = convert(request([]))
    assert batch.accepted == 0 and batch.rejected == 0
