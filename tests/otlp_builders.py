"""Small builders for OTLP protobuf requests in tests."""

from __future__ import annotations

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from audit.store.otlp_values import to_key_value

kv = to_key_value


def request(spans: list[Span], service: str = "svc") -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(kv("service.name", service))
    rs.scope_spans.add().spans.extend(spans)
    return req


def span(
    trace_id: bytes,
    span_id: bytes,
    parent: bytes = b"",
    *,
    name: str = "op",
    kind: int = 2,
    start: int = 1_000,
    end: int = 2_000,
    attrs: dict | None = None,
    **fields,
) -> Span:
    s = Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        name=name,
        kind=kind,
        start_time_unix_nano=start,
        end_time_unix_nano=end,
        **fields,
    )
    for k, v in (attrs or {}).items():
        s.attributes.append(kv(k, v))
    return s


def spans(n: int, rng, trace_id: bytes | None = None) -> list[Span]:
    tid = trace_id or rng.randbytes(16)
    return [span(tid, rng.randbytes(8), name=f"op{i}") for i in range(n)]
