"""Generate OTLP traffic from a scenario, with the ground truth of every span.

Requests arrive at the entry points (Poisson or on a schedule); each one walks the topology,
making the spans a real fleet would: SERVER/CLIENT pairs for HTTP, gRPC and custom RPC,
PRODUCER/CONSUMER for Kafka (after a lag), CLIENT spans to databases and external hosts.
Where a call loses its context the callee starts a new trace, as it would in production,
and the truth records the real parent and the cause. Samplers decide from the trace id's
randomness with `ot=th` thresholds, as the OpenTelemetry probability-sampling spec says;
only sampled spans are exported, but every span gets a truth record.

Deterministic by seed; memory is bounded by one request tree plus one export request.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from ..store.otlp_values import to_key_value
from .model import Call, Latency, Scenario

_MS = 1_000_000
_P56 = 1 << 56
SERVER, CLIENT, PRODUCER, CONSUMER, INTERNAL = (
    Span.SPAN_KIND_SERVER,
    Span.SPAN_KIND_CLIENT,
    Span.SPAN_KIND_PRODUCER,
    Span.SPAN_KIND_CONSUMER,
    Span.SPAN_KIND_INTERNAL,
)


def threshold(probability: float) -> int:
    """The 56-bit rejection threshold T of a sampling probability: p = (2^56 - T) / 2^56."""
    return round((1.0 - probability) * _P56)


def th_value(t: int) -> str:
    """T as the tracestate `th` value: 14 hex digits with trailing zeros dropped ("0" for T = 0)."""
    return f"{t:014x}".rstrip("0") or "0"


@dataclass
class TruthRecord:
    """What really happened to one span (the format the demo fleet writes too: docs/scenarios.md)."""

    trace_id: str
    span_id: str
    service: str
    kind: str
    name: str
    request_id: int  # the logical request (entry-point arrival) the span belongs to
    exported: bool  # False: its sampler dropped it, so the store never sees it
    parent_span_id: str | None  # the parent as exported (None for a root)
    true_parent_trace_id: str | None  # the causal parent, even across a lost context
    true_parent_span_id: str | None
    cause: str | None  # set on the span that lost its parent's context
    hop: str | None  # "caller->callee" for such a span
    protocol: str | None
    linked: bool = False  # a consumer that started a new trace with a link to its producer
    error: bool = False  # exported with status ERROR (or would have been)
    start_ns: int = 0  # true times, before any clock skew
    end_ns: int = 0

    def to_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class _Ctx:
    """A span context as it travels: what the callee sees if propagation works."""

    trace_id: bytes
    span_id: bytes
    sampled: bool
    th: int


@dataclass
class _Span:
    service: str
    name: str
    kind: int
    trace_id: bytes
    span_id: bytes
    parent: _Ctx | None
    parent_remote: bool
    start_ns: int
    end_ns: int = 0
    sampled: bool = True
    th: int = 0
    attrs: dict = field(default_factory=dict)
    error: bool = False
    links: list[_Ctx] = field(default_factory=list)
    true_parent: _Span | None = None
    cause: str | None = None
    hop: str | None = None
    protocol: str | None = None
    linked: bool = False

    def ctx(self) -> _Ctx:
        return _Ctx(self.trace_id, self.span_id, self.sampled, self.th)


_KINDS = {
    SERVER: "SERVER",
    CLIENT: "CLIENT",
    PRODUCER: "PRODUCER",
    CONSUMER: "CONSUMER",
    INTERNAL: "INTERNAL",
}


class Simulator:
    def __init__(self, scenario: Scenario, seed: int = 1, spans_per_request: int = 1000):
        self.scenario = scenario
        self.rng = random.Random(seed)
        self.spans_per_request = spans_per_request
        self.offsets: dict[tuple[str, str], int] = {}  # Kafka (topic, partition) -> next offset
        self.batches: dict[tuple[str, str], list] = {}  # Kafka (consumer, topic) -> messages waiting
        self.exported = 0
        self.generated = 0

    # -- randomness ---------------------------------------------------------------------------

    def _ms(self, latency: Latency) -> float:
        return self.rng.lognormvariate(latency.mu, latency.sigma)

    def _trace_id(self) -> bytes:
        return self.rng.randbytes(16)

    def _decide(self, service: str, trace_id: bytes, parent: _Ctx | None) -> tuple[bool, int]:
        """The sampling decision of a new span in `service`: (sampled, threshold)."""
        sampler = self.scenario.services[service].sampler
        if sampler.type == "always_on":
            return True, 0
        if sampler.type == "parent_based" and parent is not None:
            return parent.sampled, parent.th
        t = threshold(sampler.probability)
        rv = int.from_bytes(trace_id[9:], "big")  # the W3C random part: the last 7 bytes
        return rv >= t, t

    # -- the request tree -----------------------------------------------------------------------

    def _new_span(
        self,
        service,
        name,
        kind,
        start_ns,
        parent: _Ctx | None,
        *,
        remote: bool,
        trace_id: bytes | None = None,
    ) -> _Span:
        tid = parent.trace_id if parent is not None else (trace_id or self._trace_id())
        sampled, th = self._decide(service, tid, parent)
        return _Span(
            service, name, kind, tid, self.rng.randbytes(8), parent, remote, start_ns, sampled=sampled, th=th
        )

    def _handle(
        self,
        service: str,
        operation: str,
        kind: int,
        start_ns: int,
        parent: _Ctx | None,
        out: list[_Span],
        *,
        remote: bool = True,
        path: str | None = None,
    ) -> _Span:
        """The callee side: a span for `operation` in `service` and all the calls it makes."""
        op = self.scenario.services[service].operations[operation]
        span = self._new_span(service, operation, kind, start_ns, parent, remote=remote)
        out.append(span)
        self._server_attrs(span, service, operation, path)
        t = start_ns + int(self._ms(op.duration_ms) * _MS / 2)
        for call in op.calls:
            for _ in range(call.count):
                if call.probability < 1 and self.rng.random() >= call.probability:
                    continue
                t = self._call(span, call, t, out)
        span.end_ns = max(t, start_ns) + int(self._ms(op.duration_ms) * _MS / 2)
        span.error = self.rng.random() < op.error_rate
        return span

    def _call(self, caller: _Span, call: Call, t: int, out: list[_Span]) -> int:
        """Make one call from `caller` at time `t`; return when the caller may go on."""
        dropped = call.drop is not None and self.rng.random() < call.drop.probability
        hop = f"{caller.service}->{call.to}"
        exit_kind = PRODUCER if call.protocol == "kafka" else CLIENT
        handed_at = None  # a handler that does not wait for its pool goes on from here
        if dropped and call.drop.where == "thread_pool":
            # the work ran on a pool thread without the caller's context: the exit is a root,
            # started after the pool's hand-off delay
            handed_at = None if call.drop.handler_waits else t
            t += int(self._ms(call.drop.handoff_ms) * _MS)
            client = self._new_span(caller.service, "", exit_kind, t, None, remote=False)
            client.true_parent, client.cause, client.hop, client.protocol = (
                caller,
                call.drop.cause,
                hop,
                call.protocol,
            )
            dropped = False  # the wire itself propagates the (new) context
        else:
            client = self._new_span(caller.service, "", exit_kind, t, caller.ctx(), remote=False)
        out.append(client)
        self._client_attrs(client, call)
        net = self._ms(call.latency_ms) * _MS

        if call.protocol in ("db", "external"):
            client.end_ns = t + int(net)
            return client.end_ns if handed_at is None else handed_at

        wire = None if dropped else client.ctx()
        if call.protocol == "kafka":
            client.end_ns = t + int(net / 4)
            consume_at = client.end_ns + int(self._ms(call.kafka_lag_ms) * _MS)
            if call.kafka_batch > 1:
                self._batch_consume(call, client, dropped, consume_at, hop, out)
                return client.end_ns
            if call.kafka_link and not dropped:
                server = self._handle(call.to, call.operation, CONSUMER, consume_at, None, out, remote=False)
                server.links.append(client.ctx())
                server.linked = True
            else:
                server = self._handle(call.to, call.operation, CONSUMER, consume_at, wire, out)
            self._consumer_attrs(server, client)
        else:
            # request and response legs are drawn apart: real networks are not symmetric, and a
            # matcher must not be able to lean on equal gaps on both sides of the server span
            back = self._ms(call.latency_ms) * _MS
            url = client.attrs.get("url.full")  # the server sees the path the client asked for
            path = "/" + url.split("/", 3)[3] if url else None
            server = self._handle(call.to, call.operation, SERVER, t + int(net / 2), wire, out, path=path)
            if "rpc.system" in client.attrs:
                server.attrs["rpc.system"] = client.attrs["rpc.system"]
            client.end_ns = server.end_ns + int(back / 2)
            if server.error and call.protocol == "http":
                client.attrs["http.response.status_code"] = server.attrs["http.response.status_code"] = 500
                client.error = True
        server.true_parent = client
        server.protocol = "kafka" if call.protocol == "kafka" else call.protocol
        if dropped or server.linked:
            server.cause = call.drop.cause if dropped else None
            server.hop = hop
        return client.end_ns

    def _batch_consume(
        self, call: Call, producer: _Span, dropped: bool, consume_at: int, hop: str, out: list[_Span]
    ) -> None:
        """Messages wait until `kafka_batch` of them are there; then one consumer span, a new trace,
        links to every producer that injected. Its truth parent is the message that completed it."""
        pending = self.batches.setdefault((call.to, call.operation), [])
        pending.append((producer, dropped, consume_at))
        if len(pending) < call.kafka_batch:
            return
        del self.batches[(call.to, call.operation)]
        consumer = self._handle(
            call.to, call.operation, CONSUMER, max(c for _, _, c in pending), None, out, remote=False
        )
        consumer.links.extend(p.ctx() for p, was_dropped, _ in pending if not was_dropped)
        consumer.true_parent, consumer.hop, consumer.protocol = producer, hop, "kafka"
        consumer.linked = bool(consumer.links)
        consumer.cause = None if consumer.linked else (call.drop.cause if call.drop else None)
        consumer.attrs.update(
            {
                "messaging.system": "kafka",
                "messaging.destination.name": call.operation,
                "messaging.operation.type": "process",
                "messaging.batch.message_count": len(pending),
            }
        )
        consumer.name = f"process {call.operation}"

    # -- attributes, per the semantic conventions --------------------------------------------------

    def _host(self, service: str) -> str:
        return f"{service}.svc.cluster.local"

    def _server_attrs(self, span: _Span, service: str, operation: str, path: str | None = None) -> None:
        port = self.scenario.services[service].port
        method, _, route = operation.partition(" ")
        if route.startswith("/"):  # an HTTP operation: "GET /cart/{id}"
            span.attrs.update(
                {
                    "http.request.method": method,
                    "http.route": route,
                    "url.path": path or self._path(route),
                    "url.scheme": "http",
                    "server.address": self._host(service),
                    "server.port": port,
                    "http.response.status_code": 200,
                }
            )
        elif "/" in operation:  # an RPC operation: "shop.Cart/GetCart"
            rpc_service, _, rpc_method = operation.partition("/")
            span.attrs.update(
                {
                    "rpc.service": rpc_service,
                    "rpc.method": rpc_method,
                    "server.address": self._host(service),
                    "server.port": port,
                }
            )

    def _path(self, route: str) -> str:
        return "/".join(
            str(self.rng.randrange(1, 10**6)) if p.startswith("{") else p for p in route.split("/")
        )

    def _client_attrs(self, client: _Span, call: Call) -> None:
        a = client.attrs
        if call.protocol == "http":
            method, _, route = call.operation.partition(" ")
            port = self.scenario.services[call.to].port
            a.update(
                {
                    "http.request.method": method,
                    "server.address": self._host(call.to),
                    "server.port": port,
                    "url.full": f"http://{self._host(call.to)}:{port}{self._path(route)}",
                    "http.response.status_code": 200,
                }
            )
            if not call.record_url:
                del a["url.full"]
            client.name = method
        elif call.protocol in ("grpc", "rpc"):
            rpc_service, _, rpc_method = call.operation.partition("/")
            a.update(
                {
                    "rpc.system": "grpc" if call.protocol == "grpc" else call.rpc_system,
                    "rpc.service": rpc_service,
                    "rpc.method": rpc_method,
                    "server.address": self._host(call.to),
                    "server.port": self.scenario.services[call.to].port,
                }
            )
            client.name = call.operation
        elif call.protocol == "kafka":
            partition = str(self.rng.randrange(6))
            offset = self.offsets.get((call.operation, partition), 0)
            self.offsets[(call.operation, partition)] = offset + 1
            a.update(
                {
                    "messaging.system": "kafka",
                    "messaging.destination.name": call.operation,
                    "messaging.operation.type": "send",
                    "messaging.destination.partition.id": partition,
                    "messaging.kafka.offset": offset,
                    "server.address": "kafka.svc.cluster.local",
                }
            )
            client.name = f"send {call.operation}"
        elif call.protocol == "db":
            a.update(
                {
                    "db.system.name": call.db_system,
                    "db.operation.name": call.operation or "SELECT",
                    "server.address": call.to,
                    "server.port": 5432,
                }
            )
            client.name = f"{call.operation or 'SELECT'} {call.to}"
        else:  # external
            a.update(
                {
                    "http.request.method": "POST",
                    "server.address": call.to,
                    "server.port": 443,
                    "url.full": f"https://{call.to}/{call.operation.lstrip('/')}",
                }
            )
            client.name = "POST"

    def _consumer_attrs(self, consumer: _Span, producer: _Span) -> None:
        p = producer.attrs
        consumer.attrs.update(
            {
                "messaging.system": "kafka",
                "messaging.destination.name": p["messaging.destination.name"],
                "messaging.operation.type": "process",
                "messaging.destination.partition.id": p["messaging.destination.partition.id"],
                "messaging.kafka.offset": p["messaging.kafka.offset"],
            }
        )
        consumer.name = f"process {p['messaging.destination.name']}"

    # -- arrivals and output --------------------------------------------------------------------

    def _arrivals(self) -> Iterator[tuple[int, int]]:
        """(time in ns since start, entrypoint index), in time order."""
        end = self.scenario.duration_s * 1e9
        heap = []
        for i, e in enumerate(self.scenario.entrypoints):
            first = self.rng.expovariate(e.rate_per_s) * 1e9 if e.rate_per_s else 0.0
            heapq.heappush(heap, (first, i))
        while heap:
            t, i = heapq.heappop(heap)
            if t > end:
                return
            yield int(t), i
            e = self.scenario.entrypoints[i]
            step = self.rng.expovariate(e.rate_per_s) * 1e9 if e.rate_per_s else e.every_s * 1e9
            heapq.heappush(heap, (t + step, i))

    def run(
        self, max_spans: int | None = None
    ) -> Iterator[tuple[ExportTraceServiceRequest, list[TruthRecord]]]:
        """Yield export requests of about `spans_per_request` spans, each with the truth of every
        span generated since the previous one (exported or not)."""
        start_ns = int(self.scenario.start_unix_s * 1e9)
        batch = _Batch(self.scenario)
        truth: list[TruthRecord] = []
        for request_id, (t, i) in enumerate(self._arrivals()):
            e = self.scenario.entrypoints[i]
            kind = SERVER if e.rate_per_s else INTERNAL
            spans: list[_Span] = []
            self._handle(e.service, e.operation, kind, start_ns + t, None, spans, remote=False)
            for s in spans:
                self.generated += 1
                truth.append(self._truth(s, request_id))
                if s.sampled:
                    batch.add(s)
                    self.exported += 1
            if batch.size >= self.spans_per_request:
                yield batch.request, truth
                batch, truth = _Batch(self.scenario), []
            if max_spans is not None and self.exported >= max_spans:
                break
        if truth:
            yield batch.request, truth

    def _truth(self, s: _Span, request_id: int) -> TruthRecord:
        tp = s.true_parent
        return TruthRecord(
            trace_id=s.trace_id.hex(),
            span_id=s.span_id.hex(),
            service=s.service,
            kind=_KINDS[s.kind],
            name=s.name,
            request_id=request_id,
            exported=s.sampled,
            parent_span_id=s.parent.span_id.hex() if s.parent else None,
            true_parent_trace_id=tp.trace_id.hex() if tp else (s.parent.trace_id.hex() if s.parent else None),
            true_parent_span_id=tp.span_id.hex() if tp else (s.parent.span_id.hex() if s.parent else None),
            cause=s.cause,
            hop=s.hop,
            protocol=s.protocol,
            linked=s.linked,
            error=s.error,
            start_ns=s.start_ns,
            end_ns=max(s.end_ns, s.start_ns),
        )


class _Batch:
    """One export request being filled: a ResourceSpans per service, in first-seen order."""

    def __init__(self, scenario: Scenario):
        self.scenario = scenario
        self.request = ExportTraceServiceRequest()
        self.scopes: dict[str, object] = {}
        self.size = 0

    def add(self, s: _Span) -> None:
        scope = self.scopes.get(s.service)
        if scope is None:
            rs = self.request.resource_spans.add()
            rs.resource.attributes.extend(
                [
                    to_key_value("service.name", s.service),
                    to_key_value("host.name", f"{s.service}-0"),
                    to_key_value("telemetry.sdk.name", "ctxaudit-simulator"),
                ]
            )
            scope = rs.scope_spans.add()
            scope.scope.name = "ctxaudit.simulator"
            self.scopes[s.service] = scope
        service = self.scenario.services[s.service]
        skew = int(service.clock_skew_ms * _MS)
        span = scope.spans.add(
            trace_id=s.trace_id,
            span_id=s.span_id,
            name=s.name,
            kind=s.kind,
            start_time_unix_nano=s.start_ns + skew,
            end_time_unix_nano=max(s.end_ns, s.start_ns) + skew,
            trace_state=f"ot=th:{th_value(s.th)}" if service.sampler.writes_threshold else "",
            flags=0x101 | (0x200 if s.parent is not None and s.parent_remote else 0),
        )
        if s.parent is not None:
            span.parent_span_id = s.parent.span_id
        span.attributes.extend(to_key_value(k, v) for k, v in s.attrs.items())
        if s.error:
            span.status.code = Status.STATUS_CODE_ERROR
        for link in s.links:
            span.links.add(
                trace_id=link.trace_id, span_id=link.span_id, flags=0x101 if link.sampled else 0x100
            )
        self.size += 1
