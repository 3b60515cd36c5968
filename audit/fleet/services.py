"""The fleet's services. Each runs in its own process with its own `service.name`.

frontend  GET /checkout: calls cart (instrumented requests: propagates), recommendations
          through a proxy that strips traceparent, pricing through a hand-made client that
          does not inject, payments over a custom JSON/TCP RPC (one call site injects, one
          forgets), a database, an external host, and a thread pool that loses the context.
          It also calls inventory over gRPC (official client and server instrumentation).
cart, recommendations, pricing: WSGI services behind the official WSGI middleware.
inventory a gRPC service.
proxy     forwards to recommendations without traceparent/tracestate (uninstrumented).
payments  the custom RPC server: extracts context from the envelope when there is one.
billing-cron  a scheduled job: a root span every second that calls payments.

Every caller also sends the out-of-band truth header (the client span's context, the cause
it will lose, the hop); the callee records it only in the truth file, never in a span.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from .telemetry import TRUTH_HEADER, context_id, setup

RPC_SYSTEM = "tcp-jsonrpc"
INVENTORY_METHOD = "shop.Inventory/Reserve"
SAMPLERS = {  # service -> (sampler, probability)
    "frontend": ("parent_based", 0.5),
    "cart": ("independent", 0.75),  # a plain ratio sampler that ignores the parent: dangling parents
    "recommendations": ("parent_based", 0.25),
}


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def _truth_header(span, cause: str | None, hop: str) -> str:
    return json.dumps({"parent": context_id(span), "cause": cause, "hop": hop})


def _note_incoming(truth, span, header: str | None, propagated: bool, protocol: str) -> None:
    """On the callee: if the context did not arrive, record the real parent and the cause."""
    if header is None or propagated:
        return
    info = json.loads(header)
    truth.note(span, true_parent=info["parent"], cause=info["cause"], hop=info["hop"], protocol=protocol)


def _wsgi_service(name: str, truth, body: bytes = b"ok"):
    def app(environ, start_response):
        _note_incoming(truth, trace.get_current_span(), environ.get("HTTP_X_CTXAUDIT_TRUTH"),
                       "HTTP_TRACEPARENT" in environ, "http")  # fmt: skip
        time.sleep(0.002)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]

    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(app)


def _serve_wsgi(app, port: int) -> WSGIServer:
    server = make_server("127.0.0.1", port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# -- custom RPC ---------------------------------------------------------------------------------


def rpc_call(port: int, method: str, *, inject: bool, hop: str, cause: str | None = None) -> dict:
    """A hand-written RPC client: a CLIENT span, and traceparent in the envelope only if `inject`."""
    tracer = trace.get_tracer("fleet.rpc")
    service, _, name = method.partition("/")
    with tracer.start_as_current_span(method, kind=SpanKind.CLIENT, attributes={
            "rpc.system": RPC_SYSTEM, "rpc.service": service, "rpc.method": name,
            "server.address": "127.0.0.1", "server.port": port}) as span:  # fmt: skip
        envelope = {"method": method, "truth": _truth_header(span, None if inject else cause, hop)}
        if inject:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            envelope["context"] = carrier
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(json.dumps(envelope).encode() + b"\n")
            return json.loads(sock.makefile().readline())


class _RpcHandler(socketserver.StreamRequestHandler):
    truth = None

    def handle(self):
        envelope = json.loads(self.rfile.readline())
        carrier = envelope.get("context")
        ctx = propagate.extract(carrier) if carrier else None
        service, _, name = envelope["method"].partition("/")
        tracer = trace.get_tracer("fleet.rpc")
        with tracer.start_as_current_span(envelope["method"], context=ctx, kind=SpanKind.SERVER, attributes={
                "rpc.system": RPC_SYSTEM, "rpc.service": service, "rpc.method": name,
                "server.address": "127.0.0.1", "server.port": self.server.server_address[1]}) as span:  # fmt: skip
            _note_incoming(self.truth, span, envelope.get("truth"), carrier is not None, "rpc")
            time.sleep(0.002)
        self.wfile.write(b'{"ok": true}\n')


class _ThreadingTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


# -- the frontend ---------------------------------------------------------------------------------


def _frontend_app(ports: dict[str, int], truth):
    import requests

    tracer = trace.get_tracer("fleet.frontend")
    pool = ThreadPoolExecutor(max_workers=2)
    session = requests.Session()
    channel = grpc.insecure_channel(f"127.0.0.1:{ports['inventory']}")  # instrumented: see run_service
    inventory = channel.unary_unary(f"/{INVENTORY_METHOD}")

    def flush_cache(true_parent: str) -> None:
        # runs on a pool thread: the caller's context did not come along, so this exit is a root
        with tracer.start_as_current_span("SET", kind=SpanKind.CLIENT, attributes={
                "db.system.name": "redis", "db.operation.name": "SET", "server.address": "redis",
                "server.port": 6379}) as span:  # fmt: skip
            truth.note(span, true_parent=true_parent, cause="thread_pool_no_context", hop="frontend->redis",
                       protocol="db")  # fmt: skip
            time.sleep(0.001)

    def app(environ, start_response):
        server_span = trace.get_current_span()
        # 1. instrumented requests: propagates (the truth header is added by the request hook)
        session.get(f"http://127.0.0.1:{ports['cart']}/cart/42", timeout=10)
        # 2. gRPC, instrumented client and server: propagates
        inventory(b"sku-42", timeout=10)
        # 3. through a proxy that strips traceparent: the callee starts a new trace
        session.get(f"http://127.0.0.1:{ports['proxy']}/recs/7", timeout=10, headers={
            "x-ctxaudit-cause": "proxy_strips_traceparent", "x-ctxaudit-hop": "frontend->recommendations"})  # fmt: skip
        # 4. a hand-made client that makes a CLIENT span but never injects
        with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT, attributes={
                "http.request.method": "GET", "server.address": "127.0.0.1", "server.port": ports["pricing"],
                "url.full": f"http://127.0.0.1:{ports['pricing']}/price/7"}) as span:  # fmt: skip
            req = urllib.request.Request(f"http://127.0.0.1:{ports['pricing']}/price/7", headers={
                TRUTH_HEADER: _truth_header(span, "client_does_not_inject", "frontend->pricing")})  # fmt: skip
            urllib.request.urlopen(req, timeout=10).read()
        # 5. custom RPC: one call site injects, the other forgets
        rpc_call(ports["payments"], "payments.Charges/Authorize", inject=True, hop="frontend->payments")
        rpc_call(ports["payments"], "payments.Charges/Capture", inject=False, hop="frontend->payments",
                 cause="custom_rpc_no_context")  # fmt: skip
        # 6. a database and an external host: exits with no child span by nature
        with tracer.start_as_current_span("INSERT orders", kind=SpanKind.CLIENT, attributes={
                "db.system.name": "postgresql", "db.operation.name": "INSERT", "server.address": "postgres",
                "server.port": 5432}):  # fmt: skip
            time.sleep(0.001)
        with tracer.start_as_current_span("POST", kind=SpanKind.CLIENT, attributes={
                "http.request.method": "POST", "server.address": "api.partner.example", "server.port": 443,
                "url.full": "https://api.partner.example/v1/notify"}):  # fmt: skip
            time.sleep(0.001)
        # 7. work handed to a thread pool without the context
        pool.submit(flush_cache, context_id(server_span)).result()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"checked out"]

    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(app)


def _proxy_app(upstream: int):
    """A reverse proxy with a header allowlist that leaves out traceparent and tracestate."""

    def app(environ, start_response):
        headers = {TRUTH_HEADER: environ["HTTP_X_CTXAUDIT_TRUTH"]} if "HTTP_X_CTXAUDIT_TRUTH" in environ else {}
        req = urllib.request.Request(f"http://127.0.0.1:{upstream}{environ['PATH_INFO']}", headers=headers)
        body = urllib.request.urlopen(req, timeout=10).read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]

    return app


# -- process entry point ------------------------------------------------------------------------------


def run_service(role: str, ports: dict[str, int], otlp_endpoint: str, truth_dir: str, ready, stop) -> None:
    """The body of one fleet process: set up telemetry, serve, report ready, wait for stop, flush."""
    if role == "proxy":  # not a traced service
        server = _serve_wsgi(_proxy_app(ports["recommendations"]), ports["proxy"])
        ready.put(role)
        stop.wait()
        server.shutdown()
        return
    kind, probability = SAMPLERS.get(role, ("parent_based", 1.0))
    provider, truth = setup(role, otlp_endpoint, f"{truth_dir}/{role}.jsonl", kind, probability)
    servers = []
    if role == "frontend":
        from opentelemetry.instrumentation.grpc import GrpcInstrumentorClient
        from opentelemetry.instrumentation.requests import RequestsInstrumentor

        GrpcInstrumentorClient().instrument(tracer_provider=provider)
        def add_truth(span, request):  # the client span's own context, out of band
            cause = request.headers.pop("x-ctxaudit-cause", None)
            hop = request.headers.pop("x-ctxaudit-hop", "")
            request.headers[TRUTH_HEADER] = _truth_header(span, cause, hop)

        RequestsInstrumentor().instrument(tracer_provider=provider, request_hook=add_truth)
        servers.append(_serve_wsgi(_frontend_app(ports, truth), ports["frontend"]))
    elif role in ("cart", "recommendations", "pricing"):
        servers.append(_serve_wsgi(_wsgi_service(role, truth), ports[role]))
    elif role == "inventory":
        from opentelemetry.instrumentation.grpc import GrpcInstrumentorServer

        GrpcInstrumentorServer().instrument(tracer_provider=provider)
        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        service, _, method = INVENTORY_METHOD.partition("/")
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            service, {method: grpc.unary_unary_rpc_method_handler(lambda request, context: b"reserved")}),))  # fmt: skip
        server.add_insecure_port(f"127.0.0.1:{ports['inventory']}")
        server.start()
        servers.append(_GrpcStopper(server))
    elif role == "payments":
        _RpcHandler.truth = truth
        rpc = _ThreadingTCPServer(("127.0.0.1", ports["payments"]), _RpcHandler)
        threading.Thread(target=rpc.serve_forever, daemon=True).start()
        servers.append(rpc)
    elif role == "billing-cron":
        threading.Thread(target=_cron, args=(ports, stop), daemon=True).start()
    ready.put(role)
    stop.wait()
    for server in servers:
        server.shutdown()
    provider.shutdown()  # exports what is buffered, closes the truth file


class _GrpcStopper:
    def __init__(self, server):
        self.server = server

    def shutdown(self) -> None:
        self.server.stop(5).wait()


def _cron(ports: dict[str, int], stop) -> None:
    tracer = trace.get_tracer("fleet.cron")
    while not stop.wait(1.0):
        with tracer.start_as_current_span("rollup", kind=SpanKind.INTERNAL):
            rpc_call(ports["payments"], "payments.Ledger/Rollup", inject=True, hop="billing-cron->payments")
