"""Decoding: OTLP/JSON written from the spec, protobuf, gzip and its limits."""

import gzip
import json

import pytest

from collector_ext.decode import JSON, PROTOBUF, BadRequest, TooLarge, decode_request, gunzip
from tests.otlp_builders import request, span

# The example payload of the OTLP spec (examples/trace.json), trimmed: hex ids, integer enums,
# lowerCamelCase names, 64-bit integers as strings.
SPEC_EXAMPLE = {
    "resourceSpans": [
        {
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "my.service"}}]},
            "scopeSpans": [
                {
                    "scope": {
                        "name": "my.library",
                        "version": "1.0.0",
                        "attributes": [
                            {"key": "my.scope.attribute", "value": {"stringValue": "some scope attribute"}}
                        ],
                    },
                    "spans": [
                        {
                            "traceId": "5B8EFFF798038103D269B633813FC60C",
                            "spanId": "EEE19B7EC3C1B174",
                            "parentSpanId": "EEE19B7EC3C1B173",
                            "name": "I'm a server span",
                            "startTimeUnixNano": "1544712660000000000",
                            "endTimeUnixNano": "1544712661000000000",
                            "kind": 2,
                            "attributes": [
                                {"key": "my.span.attr", "value": {"stringValue": "some value"}},
                                {"key": "count", "value": {"intValue": "42"}},
                            ],
                            "status": {"code": 2, "message": "boom"},
                            "flags": 769,
                            "traceState": "ot=th:8",
                            "links": [
                                {"traceId": "0102030405060708090a0b0c0d0e0f10", "spanId": "0102030405060708"}
                            ],
                        }
                    ],
                }
            ],
        }
    ]
}


def test_otlp_json_spec_example_decodes_with_hex_ids_and_integer_enums():
    traces = decode_request(json.dumps(SPEC_EXAMPLE).encode(), JSON)
    s = traces.resource_spans[0].scope_spans[0].spans[0]
    assert s.trace_id == bytes.fromhex("5B8EFFF798038103D269B633813FC60C")
    assert s.span_id == bytes.fromhex("EEE19B7EC3C1B174")
    assert s.parent_span_id == bytes.fromhex("EEE19B7EC3C1B173")
    assert s.kind == 2 and s.status.code == 2 and s.flags == 769
    assert s.start_time_unix_nano == 1544712660000000000
    assert s.attributes["count"].int_value == 42
    assert s.links[0].span_id == bytes.fromhex("0102030405060708")
    assert traces.resource_spans[0].scope_spans[0].scope.version == "1.0.0"


def test_snake_case_field_names_are_accepted_too():
    doc = {"resource_spans": [{"scope_spans": [{"spans": [{"trace_id": "01" * 16, "span_id": "02" * 8}]}]}]}
    s = decode_request(json.dumps(doc).encode(), JSON).resource_spans[0].scope_spans[0].spans[0]
    assert s.span_id == bytes.fromhex("02" * 8)


def test_protobuf_and_json_decode_to_the_same_spans():
    req = request([span(b"\x01" * 16, b"\x02" * 8, attrs={"a": 1, "b": [1.5, "x"], "c": {"d": True}})])
    from google.protobuf import json_format

    doc = json_format.MessageToDict(req)
    for s in doc["resourceSpans"][0]["scopeSpans"][0]["spans"]:
        s["traceId"], s["spanId"] = "01" * 16, "02" * 8  # OTLP/JSON ids are hex
    assert decode_request(json.dumps(doc).encode(), JSON) == decode_request(req.SerializeToString(), PROTOBUF)


# an attribute value nested 150 kvlists deep: beyond protobuf's recursion limit
DEEP_KVLIST = (
    '{"resourceSpans": [{"scopeSpans": [{"spans": [{"attributes": [{"key": "k", "value": '
    + '{"kvlistValue": {"values": [{"key": "a", "value": ' * 150
    + "{}"
    + "}]}}" * 150
    + "}]}]}]}]}"
).encode()


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        json.dumps({"resourceSpans": "nope"}).encode(),
        json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz" * 16}]}]}]}).encode(),
        json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": 7}]}]}]}).encode(),
        json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{"kind": [2]}]}]}]}).encode(),
        json.dumps(
            {"resourceSpans": [{"scopeSpans": [{"spans": [{"startTimeUnixNano": "soon"}]}]}]}
        ).encode(),
        b"\xff\xfe",
        b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than any parser's stack
        DEEP_KVLIST,
    ],
)
def test_malformed_json_is_a_bad_request(body):
    with pytest.raises(BadRequest):
        decode_request(body, JSON)


def test_malformed_protobuf_is_a_bad_request():
    with pytest.raises(BadRequest):
        decode_request(b"\x0a\xff\xff\xff\xff\x0f", PROTOBUF)


def test_gzip_round_trip_and_limits():
    body = b"x" * 1000
    assert gunzip(gzip.compress(body), 1000) == body
    with pytest.raises(TooLarge):
        gunzip(gzip.compress(body), 999)
    with pytest.raises(BadRequest):
        gunzip(b"not gzip at all", 1000)
    with pytest.raises(BadRequest):
        gunzip(gzip.compress(body)[:-12], 1000)


def test_gzip_bomb_stops_at_the_limit_without_inflating_it():
    bomb = gzip.compress(bytes(200 << 20))  # 200 MiB of zeros in about 200 KiB
    assert len(bomb) < 1 << 20
    with pytest.raises(TooLarge):
        gunzip(bomb, 16 << 20)
