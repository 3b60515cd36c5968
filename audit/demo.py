"""`ctxaudit demo`: a real `ctxaudit serve`, fed by the real OpenTelemetry SDK.

Two services export through the standard OTLP exporters, one over gRPC and one over
HTTP. `frontend` calls `checkout` twice: once propagating the W3C context, once
without it, so the second `checkout` span is an orphan root: the problem ctxaudit
exists to find. (The full fleet with Kafka, gRPC and custom RPC grows from here.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind

_READY = re.compile(r"OTLP/gRPC [^:]+:(\d+), OTLP/HTTP (http://\S+/v1/traces)")


def start_server(db: str, *extra: str) -> tuple[subprocess.Popen, int, str]:
    """Start `ctxaudit serve` on free loopback ports; return (process, grpc port, http url)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "audit", "serve", "--db", db, "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0",
         "--log-interval", "0", *extra],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()
    m = _READY.search(line)
    if not m:
        proc.kill()
        raise RuntimeError(f"ctxaudit serve did not start (it printed {line!r}); see the errors above")
    return proc, int(m.group(1)), m.group(2)


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def _provider(service: str, exporter) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def send_demo_traffic(grpc_port: int, http_url: str, requests: int = 20) -> int:
    """Simulate `frontend -> checkout` calls; every other call drops the context. Returns spans sent."""
    frontend = _provider("frontend", GrpcExporter(endpoint=f"127.0.0.1:{grpc_port}", insecure=True))
    checkout = _provider("checkout", HttpExporter(endpoint=http_url))
    ft, ct = frontend.get_tracer("demo.frontend"), checkout.get_tracer("demo.checkout")
    for i in range(requests):
        with ft.start_as_current_span("GET /cart", kind=SpanKind.SERVER, attributes={"http.request.method": "GET",
                                      "http.route": "/cart", "url.path": "/cart"}):  # fmt: skip
            with ft.start_as_current_span("POST", kind=SpanKind.CLIENT, attributes={
                    "http.request.method": "POST", "server.address": "checkout", "server.port": 8080,
                    "url.full": "http://checkout:8080/checkout"}):  # fmt: skip
                headers: dict[str, str] = {}
                if i % 2 == 0:  # the other half goes through a "proxy" that strips traceparent
                    inject(headers)
                with ct.start_as_current_span("POST /checkout", context=extract(headers), kind=SpanKind.SERVER,
                                              attributes={"http.request.method": "POST", "http.route": "/checkout",
                                                          "server.address": "checkout", "server.port": 8080}):  # fmt: skip
                    time.sleep(0.001)
    frontend.shutdown()
    checkout.shutdown()
    return requests * 3


def run_demo(db: str) -> None:
    path = Path(db)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, Path(f"{db}.wal")):
        if stale.exists():
            os.remove(stale)
    print(f"starting ctxaudit serve on {db} ...", flush=True)
    proc, grpc_port, http_url = start_server(db)
    try:
        sent = send_demo_traffic(grpc_port, http_url)
        print(f"sent {sent} spans through the OpenTelemetry SDK (frontend over gRPC, checkout over HTTP)")
    finally:
        code = stop_server(proc)
    if code != 0:
        raise RuntimeError(f"ctxaudit serve exited with {code}")
    print()
