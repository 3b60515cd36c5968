"""Bad input gets the exact code the OTLP spec and the Collector give, and loses nothing accepted."""

import gzip
import json
import urllib.error
import urllib.request
import zlib

import grpc
import pytest
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from tests.grpc_raw import grpc_call
from tests.otlp_builders import request, span, spans

PB, JS = "application/x-protobuf", "application/json"
MAX = 64 << 10  # a small limit so the size cases stay cheap


def post(url, body: bytes, content_type: str | None = PB, encoding: str | None = None, method="POST"):
    headers = {}
    if content_type:
        headers["Content-Type"] = content_type
    if encoding:
        headers["Content-Encoding"] = encoding
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def good(rng, n=3) -> bytes:
    return request(spans(n, rng)).SerializeToString()


def big_valid_request(rng, size: int) -> bytes:
    s = span(rng.randbytes(16), rng.randbytes(8), attrs={"blob": "x" * size})
    return request([s]).SerializeToString()


@pytest.fixture
def server(make_server):
    return make_server(max_body_bytes=MAX)


HTTP_CASES = [
    # (case, body factory, content type, content encoding, expected status)
    ("unsupported content type", lambda rng: good(rng), "text/plain", None, 415),
    ("no content type", lambda rng: good(rng), None, None, 415),
    ("unsupported encoding", lambda rng: good(rng), PB, "br", 415),
    ("malformed protobuf", lambda rng: b"\x0a\xff\xff\xff\xff\x0f", PB, None, 400),
    ("malformed json", lambda rng: b"{nope", JS, None, 400),
    (
        "json with non-hex id",
        lambda rng: json.dumps(
            {"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "xyz"}]}]}]}
        ).encode(),
        JS,
        None,
        400,
    ),
    ("bad gzip", lambda rng: b"definitely not gzip", PB, "gzip", 400),
    ("body over the limit", lambda rng: big_valid_request(rng, MAX), PB, None, 413),
    ("gzip bomb", lambda rng: gzip.compress(big_valid_request(rng, 4 * MAX)), PB, "gzip", 413),
]


@pytest.mark.parametrize(
    "case, body, content_type, encoding, status", HTTP_CASES, ids=[c[0] for c in HTTP_CASES]
)
def test_http_bad_input(server, rng, case, body, content_type, encoding, status):
    accepted = post(server.http_url, good(rng))
    assert accepted[0] == 200
    code, headers, payload = post(server.http_url, body(rng), content_type, encoding)
    assert code == status
    if status != 415 or content_type in (PB, JS):
        answer_type = content_type if content_type in (PB, JS) else PB
        assert headers["Content-Type"].startswith(answer_type)
        message = json.loads(payload)["message"] if answer_type == JS else Status.FromString(payload).message
        assert message  # the error says what was wrong
    # the server still serves, and what it acknowledged before is stored
    assert post(server.http_url, good(rng))[0] == 200
    assert server.reader().stats().spans == 6


def test_http_wrong_path_and_method(server, rng):
    base = server.http_url.rsplit("/v1/traces", 1)[0]
    assert post(base + "/v1/metrics", good(rng))[0] == 404
    assert post(server.http_url, None, method="GET")[0] == 405


def test_http_partial_success_in_both_encodings(server, rng):
    tid = rng.randbytes(16)
    req = request([span(tid, rng.randbytes(8)), span(tid, bytes(8)), span(b"\x01", rng.randbytes(8))])
    code, headers, payload = post(server.http_url, req.SerializeToString())
    assert code == 200
    resp = ExportTraceServiceResponse.FromString(payload)
    assert resp.partial_success.rejected_spans == 2
    assert "span_id must be 8 bytes" in resp.partial_success.error_message

    doc = {
        "resourceSpans": [
            {
                "scopeSpans": [
                    {
                        "spans": [
                            {"traceId": tid.hex(), "spanId": "00" * 8},
                            {"traceId": tid.hex(), "spanId": "0a" * 8},
                        ]
                    }
                ]
            }
        ]
    }
    code, headers, payload = post(server.http_url, json.dumps(doc).encode(), JS)
    assert code == 200 and headers["Content-Type"].startswith(JS)
    assert json.loads(payload) == {
        "partialSuccess": {
            "rejectedSpans": "1",
            "errorMessage": "1 span(s): span_id must be 8 bytes, not all zero",
        }
    }
    assert server.reader().stats().spans == 2


def test_http_full_success_has_an_empty_response(server, rng):
    code, headers, payload = post(server.http_url, good(rng))
    assert code == 200 and ExportTraceServiceResponse.FromString(payload) == ExportTraceServiceResponse()
    code, headers, payload = post(server.http_url, b"{}", JS)
    assert code == 200 and json.loads(payload) == {}


def grpc_export(target: str, body: bytes, compression=None):
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        return ExportTraceServiceResponse.FromString(call(body, timeout=30, compression=compression))


@pytest.mark.parametrize(
    "case, body, code",
    [
        ("malformed protobuf", lambda rng: b"\x0a\xff\xff\xff\xff\x0f", grpc.StatusCode.INVALID_ARGUMENT),
        ("over the limit", lambda rng: big_valid_request(rng, MAX), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_grpc_bad_input(server, rng, case, body, code):
    grpc_export(server.grpc_target, good(rng))
    with pytest.raises(grpc.RpcError) as err:
        grpc_export(server.grpc_target, body(rng))
    assert err.value.code() == code
    assert err.value.details()
    grpc_export(server.grpc_target, good(rng))
    assert server.reader().stats().spans == 6


def test_grpc_gzip_bomb_is_refused(server, rng):
    with pytest.raises(grpc.RpcError) as err:
        grpc_export(server.grpc_target, big_valid_request(rng, 64 * MAX), compression=grpc.Compression.Gzip)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_grpc_partial_success(server, rng):
    tid = rng.randbytes(16)
    req = request([span(tid, rng.randbytes(8)), span(bytes(16), rng.randbytes(8))])
    resp = grpc_export(server.grpc_target, req.SerializeToString(), compression=grpc.Compression.Gzip)
    assert resp.partial_success.rejected_spans == 1
    assert "trace_id" in resp.partial_success.error_message
    assert server.reader().stats().spans == 1


def test_unknown_grpc_method_is_unimplemented(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        call = channel.unary_unary("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export")
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_grpc_bad_gzip_is_invalid_argument(server, rng):
    """A message flagged gzip that is not gzip: INVALID_ARGUMENT from the decode worker, as over
    HTTP (gRPC's core, which would say INTERNAL, leaves decompression to the receiver)."""
    answer = grpc_call(server.grpc_target, b"\x1f\x8bdefinitely not gzip", compressed=True, encoding="gzip")
    assert answer["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert "gzip" in answer["grpc-message"]
    answer = grpc_call(server.grpc_target, b"not even the magic", compressed=True, encoding="gzip")
    assert answer["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])  # read as protobuf
    answer = grpc_call(server.grpc_target, gzip.compress(good(rng))[:-9], compressed=True, encoding="gzip")
    assert answer["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])  # truncated
    ok = grpc_call(server.grpc_target, gzip.compress(good(rng)), compressed=True, encoding="gzip")
    assert ok["grpc-status"] == "0"
    assert server.reader().stats().spans == 3


def test_grpc_other_encodings_and_content_types(server, rng):
    deflate = grpc_call(server.grpc_target, zlib.compress(good(rng)), compressed=True, encoding="deflate")
    assert deflate["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])
    assert "grpc-accept-encoding" not in deflate or "deflate" not in deflate["grpc-accept-encoding"]
    # the content-type is not checked (grpcio's core accepts any): the message is protobuf or nothing
    body = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "x"}]}]}]}).encode()
    as_json = grpc_call(server.grpc_target, body, content_type="application/grpc+json")
    assert as_json["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    for content_type in (None, "application/json", "application/grpc+proto"):
        assert grpc_call(server.grpc_target, good(rng), content_type=content_type)["grpc-status"] == "0"
    assert server.reader().stats().spans == 9
