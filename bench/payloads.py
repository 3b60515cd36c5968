"""Realistic, pre-encoded OTLP export requests for load tests.

The OpenTelemetry Python SDK exports at most ~13k spans/s per process, so load
generators send requests built once here: ~1000 spans each across a few services,
about ten attributes per span, some `ot=th` tracestate, some span links.
"""

from __future__ import annotations

import random

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from audit.store.otlp_values import to_key_value

SERVICES = ("frontend", "checkout", "orders", "inventory", "payments")


def build_request(rng: random.Random, spans: int = 1000, per_trace: int = 10) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    by_service = {}
    for service in SERVICES:
        rs = request.resource_spans.add()
        rs.resource.attributes.extend(
            [
                to_key_value("service.name", service),
                to_key_value("service.version", "1.4.2"),
                to_key_value("host.name", f"{service}-7f9c"),
                to_key_value("telemetry.sdk.language", "python"),
            ]
        )
        ss = rs.scope_spans.add()
        ss.scope.name = "opentelemetry.instrumentation.requests"
        ss.scope.version = "0.66b2"
        by_service[service] = ss
    t0 = 1_764_000_000_000_000_000
    made = 0
    while made < spans:
        trace_id = rng.randbytes(16)
        parent = b""
        for depth in range(min(per_trace, spans - made)):
            service = SERVICES[depth % len(SERVICES)]
            span = by_service[service].spans.add()
            span.trace_id = trace_id
            span.span_id = rng.randbytes(8)
            span.parent_span_id = parent
            span.name = f"GET /api/v1/{service}/{{id}}"
            span.kind = Span.SPAN_KIND_SERVER if depth % 2 == 0 else Span.SPAN_KIND_CLIENT
            span.start_time_unix_nano = t0 + made * 1_000_000
            span.end_time_unix_nano = span.start_time_unix_nano + rng.randrange(100_000, 50_000_000)
            span.flags = 0x301 if parent else 0x101
            if rng.random() < 0.3:
                span.trace_state = "ot=th:c"
            span.attributes.extend(
                [
                    to_key_value("http.request.method", "GET"),
                    to_key_value("http.route", f"/api/v1/{service}/{{id}}"),
                    to_key_value("url.path", f"/api/v1/{service}/{rng.randrange(10**6)}"),
                    to_key_value("server.address", f"{service}.svc.cluster.local"),
                    to_key_value("server.port", 8080),
                    to_key_value("http.response.status_code", 200),
                    to_key_value("network.protocol.version", "1.1"),
                    to_key_value("user_agent.original", "python-requests/2.32.3"),
                    to_key_value("app.cache_hit", rng.random() < 0.5),
                    to_key_value("app.items", rng.randrange(100)),
                    to_key_value("app.ratio", rng.random()),
                ]
            )
            if rng.random() < 0.05:
                link = span.links.add()
                link.trace_id = rng.randbytes(16)
                link.span_id = rng.randbytes(8)
            parent = span.span_id
            made += 1
    return request


def encoded_requests(count: int, spans: int = 1000, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [build_request(rng, spans).SerializeToString() for _ in range(count)]
