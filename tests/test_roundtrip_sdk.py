"""Round trip through the real OpenTelemetry SDK and OTLP exporters, over real gRPC and HTTP."""

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

pytestmark = pytest.mark.slow  # real SDK exporters into receivers on loopback: seconds each

REMOTE_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
REMOTE_SPAN = 0xB7AD6B7169203331


def emit(exporter, service: str) -> tuple[int, int, int]:
    """Emit a remote-parented SERVER span with every field set; return (trace, span, link span)."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service, "deployment.environment": "test"})
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("roundtrip.lib", "3.1.4")
    parent = SpanContext(
        REMOTE_TRACE,
        REMOTE_SPAN,
        is_remote=True,
        trace_flags=TraceFlags(1),
        trace_state=TraceState([("ot", "th:c"), ("vendor", "x")]),
    )
    linked = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(1))
    with tracer.start_as_current_span(
        "POST /orders",
        context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
        kind=SpanKind.SERVER,
        links=[Link(linked, {"link.reason": "batch"})],
        attributes={
            "http.request.method": "POST",
            "http.route": "/orders",
            "server.address": "orders",
            "server.port": 8443,
            "ratio": 0.5,
            "retry": True,
            "tags": ["a", "b"],
            "codes": [1, 2, 3],
            "weights": [0.1, 0.2],
            "flags": [True, False],
        },
    ) as s:
        s.add_event("cache.miss", {"key": "k1", "size": 3})
        s.set_status(Status(StatusCode.ERROR, "out of stock"))
        ctx = s.get_span_context()
    provider.shutdown()
    return ctx.trace_id, ctx.span_id, linked.span_id


@pytest.mark.parametrize(
    "transport",
    ["grpc", "grpc+gzip", "http", "http+gzip"],
)
def test_every_field_survives(make_server, transport):
    server = make_server(decoders=1)  # the real decode worker process
    if transport.startswith("grpc"):
        from grpc import Compression as GrpcCompression

        exporter = GrpcExporter(
            endpoint=server.grpc_target,
            insecure=True,
            compression=GrpcCompression.Gzip if "gzip" in transport else None,
        )
    else:
        exporter = HttpExporter(
            endpoint=server.http_url,
            compression=Compression.Gzip if "gzip" in transport else Compression.NoCompression,
        )
    trace_id, span_id, link_span = emit(exporter, f"svc-{transport}")

    reader = server.reader()
    [row] = reader.trace(trace_id)
    assert row["span_id"] == span_id
    assert row["parent_span_id"] == REMOTE_SPAN
    assert row["parent_is_remote"] is True and row["flags"] & 0x300 == 0x300
    assert row["kind"] == "SERVER" and row["name"] == "POST /orders"
    assert row["status_code"] == "ERROR" and row["status_message"] == "out of stock"
    assert row["trace_state"] == "ot=th:c,vendor=x"
    assert row["sampling_threshold"] == 3 * 2**54
    assert row["end_ns"] >= row["start_ns"] > 0
    assert row["service_name"] == f"svc-{transport}"
    assert row["resource_attributes"]["deployment.environment"] == "test"
    assert row["resource_attributes"]["telemetry.sdk.language"] == "python"
    assert (row["scope_name"], row["scope_version"]) == ("roundtrip.lib", "3.1.4")
    assert row["attributes"] == {
        "http.request.method": "POST",
        "http.route": "/orders",
        "server.address": "orders",
        "server.port": 8443,
        "ratio": 0.5,
        "retry": True,
        "tags": ["a", "b"],
        "codes": [1, 2, 3],
        "weights": [0.1, 0.2],
        "flags": [True, False],
    }
    assert [(e["name"], e["attributes"]) for e in row["events"]] == [("cache.miss", {"key": "k1", "size": 3})]
    assert (row["protocol"], row["http_route"], row["server_address"], row["server_port"]) == (
        "http",
        "/orders",
        "orders",
        8443,
    )
    [link] = reader.links(trace_id, span_id)
    assert link["link_trace_id"] == 0x1234 and link["link_span_id"] == link_span
    assert link["attributes"] == {"link.reason": "batch"}
    reader.close()
