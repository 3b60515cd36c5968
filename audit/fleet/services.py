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
fulfilment, notifications, auditor: Kafka consumers (see KAFKA_CONSUMERS).

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
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
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


def _wsgi_service(truth):
    def app(environ, start_response):
        _note_incoming(
            truth,
            trace.get_current_span(),
            environ.get("HTTP_X_CTXAUDIT_TRUTH"),
            "HTTP_TRACEPARENT" in environ,
            "http",
        )
        time.sleep(0.002)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return OpenTelemetryMiddleware(app)


def _serve_wsgi(app, port: int) -> WSGIServer:
    server = make_server(
        "127.0.0.1", port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# -- custom RPC ---------------------------------------------------------------------------------


def rpc_call(port: int, method: str, *, inject: bool, hop: str, cause: str | None = None) -> dict:
    """A hand-written RPC client: a CLIENT span, and traceparent in the envelope only if `inject`."""
    tracer = trace.get_tracer("fleet.rpc")
    service, _, name = method.partition("/")
    with tracer.start_as_current_span(
        method,
        kind=SpanKind.CLIENT,
        attributes={
            "rpc.system": RPC_SYSTEM,
            "rpc.service": service,
            "rpc.method": name,
            "server.address": "127.0.0.1",
            "server.port": port,
        },
    ) as span:
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
        with tracer.start_as_current_span(
            envelope["method"],
            context=ctx,
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": RPC_SYSTEM,
                "rpc.service": service,
                "rpc.method": name,
                "server.address": "127.0.0.1",
                "server.port": self.server.server_address[1],
            },
        ) as span:
            _note_incoming(self.truth, span, envelope.get("truth"), carrier is not None, "rpc")
            time.sleep(0.002)
        self.wfile.write(b'{"ok": true}\n')


class _ThreadingTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


# -- the frontend ---------------------------------------------------------------------------------


def _frontend_app(ports: dict[str, int], truth, provider, bootstrap: str):
    import requests
    from confluent_kafka import Producer
    from opentelemetry.instrumentation.confluent_kafka import ConfluentKafkaInstrumentor

    kafka = ConfluentKafkaInstrumentor().instrument_producer(
        Producer({"bootstrap.servers": bootstrap}), provider
    )
    plain_kafka = Producer({"bootstrap.servers": bootstrap})

    tracer = trace.get_tracer("fleet.frontend")
    pool = ThreadPoolExecutor(max_workers=2)
    session = requests.Session()
    channel = grpc.insecure_channel(f"127.0.0.1:{ports['inventory']}")  # instrumented: see run_service
    inventory = channel.unary_unary(f"/{INVENTORY_METHOD}")

    def flush_cache(true_parent: str) -> None:
        # runs on a pool thread: the caller's context did not come along, so this exit is a root
        with tracer.start_as_current_span(
            "SET",
            kind=SpanKind.CLIENT,
            attributes={
                "db.system.name": "redis",
                "db.operation.name": "SET",
                "server.address": "redis",
                "server.port": 6379,
            },
        ) as span:
            truth.note(
                span,
                true_parent=true_parent,
                cause="thread_pool_no_context",
                hop="frontend->redis",
                protocol="db",
            )
            time.sleep(0.001)

    def app(environ, start_response):
        server_span = trace.get_current_span()
        # 1. instrumented requests: propagates (the truth header is added by the request hook)
        session.get(f"http://127.0.0.1:{ports['cart']}/cart/42", timeout=10)
        # 2. gRPC, instrumented client and server: propagates
        inventory(b"sku-42", timeout=10)
        # 3. through a proxy that strips traceparent: the callee starts a new trace
        session.get(
            f"http://127.0.0.1:{ports['proxy']}/recs/7",
            timeout=10,
            headers={
                "x-ctxaudit-cause": "proxy_strips_traceparent",
                "x-ctxaudit-hop": "frontend->recommendations",
            },
        )
        # 4. a hand-made client that makes a CLIENT span but never injects
        with tracer.start_as_current_span(
            "GET",
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": "GET",
                "server.address": "127.0.0.1",
                "server.port": ports["pricing"],
                "url.full": f"http://127.0.0.1:{ports['pricing']}/price/7",
            },
        ) as span:
            req = urllib.request.Request(
                f"http://127.0.0.1:{ports['pricing']}/price/7",
                headers={TRUTH_HEADER: _truth_header(span, "client_does_not_inject", "frontend->pricing")},
            )
            urllib.request.urlopen(req, timeout=10).read()
        # 5. custom RPC: one call site injects, the other forgets
        rpc_call(ports["payments"], "payments.Charges/Authorize", inject=True, hop="frontend->payments")
        rpc_call(
            ports["payments"],
            "payments.Charges/Capture",
            inject=False,
            hop="frontend->payments",
            cause="custom_rpc_no_context",
        )
        # 6. a database and an external host: exits with no child span by nature
        with tracer.start_as_current_span(
            "INSERT orders",
            kind=SpanKind.CLIENT,
            attributes={
                "db.system.name": "postgresql",
                "db.operation.name": "INSERT",
                "server.address": "postgres",
                "server.port": 5432,
            },
        ):
            time.sleep(0.001)
        with tracer.start_as_current_span(
            "POST",
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": "POST",
                "server.address": "api.partner.example",
                "server.port": 443,
                "url.full": "https://api.partner.example/v1/notify",
            },
        ):
            time.sleep(0.001)
        # 7. work handed to a thread pool without the context
        pool.submit(flush_cache, context_id(server_span)).result()
        # 8. Kafka: an instrumented producer (injects headers) for `orders` and `audit-log`,
        #    and a hand-made one for `order-events` that makes a PRODUCER span but never injects
        kafka.produce("orders", b"order")
        kafka.produce("audit-log", b"audit")
        with tracer.start_as_current_span(
            "order-events send",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": "order-events",
                "messaging.operation.type": "send",
            },
        ) as span:
            plain_kafka.produce(
                "order-events",
                b"event",
                headers=[
                    (TRUTH_HEADER, _truth_header(span, "producer_does_not_inject", "frontend->notifications"))
                ],
            )
        kafka.flush(10)
        plain_kafka.flush(10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"checked out"]

    return OpenTelemetryMiddleware(app)


def _proxy_app(upstream: int):
    """A reverse proxy with a header allowlist that leaves out traceparent and tracestate."""

    def app(environ, start_response):
        headers = (
            {TRUTH_HEADER: environ["HTTP_X_CTXAUDIT_TRUTH"]} if "HTTP_X_CTXAUDIT_TRUTH" in environ else {}
        )
        req = urllib.request.Request(f"http://127.0.0.1:{upstream}{environ['PATH_INFO']}", headers=headers)
        body = urllib.request.urlopen(req, timeout=10).read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]

    return app


# -- process entry point ------------------------------------------------------------------------------


def run_service(
    role: str, ports: dict[str, int], bootstrap: str, otlp_endpoint: str, truth_dir: str, ready, stop
) -> None:
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
        servers.append(_serve_wsgi(_frontend_app(ports, truth, provider, bootstrap), ports["frontend"]))
    elif role in ("cart", "recommendations", "pricing"):
        servers.append(_serve_wsgi(_wsgi_service(truth), ports[role]))
    elif role == "inventory":
        from opentelemetry.instrumentation.grpc import GrpcInstrumentorServer

        GrpcInstrumentorServer().instrument(tracer_provider=provider)
        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        service, _, method = INVENTORY_METHOD.partition("/")
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    service,
                    {method: grpc.unary_unary_rpc_method_handler(lambda request, context: b"reserved")},
                ),
            )
        )
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
    elif role in KAFKA_CONSUMERS:
        consumer = _subscribe(role, bootstrap, provider)
        ready.put(role)
        _consume(role, consumer, truth, stop)
        provider.shutdown()
        return
    ready.put(role)
    stop.wait()
    for server in servers:
        server.shutdown()
    provider.shutdown()  # exports what is buffered, closes the truth file


# -- Kafka consumers -------------------------------------------------------------------------------

TOPIC_CREATED = b"ctxaudit-fleet: topic created"  # the runner's first message on each topic, skipped
KAFKA_CONSUMERS = {  # service -> topic
    "fulfilment": "orders",  # extracts the headers and continues the trace
    "notifications": "order-events",  # the same code, but the producer never injected
    "auditor": "audit-log",  # the official instrumentation: a new trace with a link to the producer
}


def _subscribe(role: str, bootstrap: str, provider):
    """Join the group and read past the runner's topic-creation message before instrumenting,
    so that message leaves no span behind."""
    from confluent_kafka import Consumer

    raw = Consumer({"bootstrap.servers": bootstrap, "group.id": role, "auto.offset.reset": "earliest"})
    raw.subscribe([KAFKA_CONSUMERS[role]])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        msg = raw.poll(0.2)
        if msg is not None and not msg.error() and msg.value() == TOPIC_CREATED:
            break
    if role == "auditor":
        from opentelemetry.instrumentation.confluent_kafka import ConfluentKafkaInstrumentor

        return ConfluentKafkaInstrumentor().instrument_consumer(raw, provider)
    return raw


def _consume(role: str, consumer, truth, stop) -> None:
    idle = 0
    while True:
        msg = consumer.poll(0.2)
        if msg is None or msg.error():
            idle += 1
            if stop.is_set() and idle >= 5:  # drained: nothing for a second after stop
                break
            continue
        idle = 0
        _process(role, msg, truth)
    consumer.close()


def _process(role: str, msg, truth) -> None:
    headers = {k: v.decode() for k, v in (msg.headers() or [])}
    if role == "auditor":  # the instrumented poll() made a `recv` root and a linked `process` span
        current = trace.get_current_span()
        parent = getattr(current, "parent", None)
        if truth is not None and parent is not None and "traceparent" in headers:
            _, tid, sid, _ = headers["traceparent"].split("-")
            truth.note(
                current,
                span_id=parent.span_id,
                true_parent=f"{tid}-{sid}",
                cause=None,
                hop=f"frontend->{role}",
                protocol="kafka",
                linked=True,
            )
        return
    tracer = trace.get_tracer("fleet.kafka")
    ctx = propagate.extract(headers) if "traceparent" in headers else None
    with tracer.start_as_current_span(
        f"{msg.topic()} process",
        context=ctx,
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "kafka",
            "messaging.destination.name": msg.topic(),
            "messaging.operation.type": "process",
            "messaging.destination.partition.id": str(msg.partition()),
            "messaging.kafka.offset": msg.offset(),
        },
    ) as span:
        if truth is not None:
            _note_incoming(truth, span, headers.get(TRUTH_HEADER), ctx is not None, "kafka")


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
