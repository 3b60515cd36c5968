"""The likely causes of a lost context, each with what it means and what a service owner can do.
Codes are stable (they appear in the JSON document); wording may improve."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cause:
    code: str
    explanation: str
    fix: str


_CAUSES = (
    Cause(
        "proxy_strips_traceparent",
        "The callee starts a new trace although the caller's client propagates: its calls go to an address "
        "that is not the callee's, or some of them get through. Something in between (a proxy, gateway or "
        "sidecar) does not forward traceparent.",
        "Forward the W3C headers at the proxy or gateway: add traceparent and tracestate to its header "
        "allowlist (nginx: proxy_pass_request_headers on / proxy_set_header; "
        "Envoy: keep the tracing headers).",
    ),
    Cause(
        "client_does_not_inject",
        "The caller's client span reaches the callee directly, but the callee starts a new trace: the client "
        "does not inject traceparent (a hand-made or uninstrumented HTTP client).",
        "Instrument the HTTP client (e.g. opentelemetry-instrumentation-requests/httpx) or call "
        "propagate.inject(headers) before sending.",
    ),
    Cause(
        "grpc_client_not_instrumented",
        "A gRPC call arrives without context: the client channel has no OpenTelemetry interceptor.",
        "Add the client interceptor (opentelemetry-instrumentation-grpc GrpcInstrumentorClient, or "
        "otelgrpc.NewClientHandler in Go).",
    ),
    Cause(
        "custom_rpc_no_context",
        "A custom RPC protocol carries no trace context at this call site, so the server starts a new trace.",
        "Put traceparent/tracestate into the RPC envelope with the global TextMapPropagator on the client "
        "(propagate.inject) and extract it on the server.",
    ),
    Cause(
        "producer_does_not_inject",
        "Consumers of this destination start new traces with no link: the producer does not inject "
        "traceparent into the message headers (or no consumer extracts it).",
        "Instrument the producer (e.g. opentelemetry-instrumentation-confluent-kafka) or inject the context "
        "into the message headers; consumers should continue the trace or add a span link.",
    ),
    Cause(
        "consumer_does_not_extract",
        "Other consumers of this destination continue the producer's trace, this one does not: it does not "
        "extract the context from the message headers.",
        "Extract the context from the message headers (propagate.extract) and start the consumer span "
        "with it, or add a span link to it per the messaging conventions.",
    ),
    Cause(
        "thread_pool_no_context",
        "A span with no parent starts while its service is handling a request: work handed to a thread pool, "
        "executor or async task ran without the caller's context.",
        "Carry the context into the task: contextvars.copy_context().run, the executor wrapper of your "
        "language (Java: Context.taskWrapping; Go: pass ctx), or instrument the executor.",
    ),
    Cause(
        "sampler_not_parent_based",
        "The span names a parent that never arrived, and its sampling threshold differs from its callers': "
        "the service samples on its own instead of following the parent's decision.",
        "Use a ParentBased sampler (OTEL_TRACES_SAMPLER=parentbased_traceidratio), so a service keeps "
        "exactly the traces its callers keep.",
    ),
    Cause(
        "parent_span_missing",
        "The span names a parent that never arrived within the settle window: the upstream dropped spans "
        "(exporter queue overflow, a crash), exports to another backend, or samples on its own.",
        "Check the upstream's exporter for dropped spans and its sampler; raise --settle if its spans "
        "arrive late.",
    ),
    Cause(
        "context_not_propagated",
        "The call reached an instrumented service but no span there continues this trace: the context was "
        "lost on the way (see the callee's orphan roots), or the callee did not sample it.",
        "See the orphan roots on this edge for the cause; if there are none, check the callee's sampler.",
    ),
    Cause(
        "caller_no_client_span",
        "The caller has no client span: its server or internal span is the direct parent of the callee's "
        "(OpenTracing-era or hand-made instrumentation). The callee's operation usually arrives with that "
        "parent but sometimes starts a new trace: some of the caller's calls do not inject the context.",
        "Inject the context at every call site of this call (tracer.inject / propagate.inject into the "
        "request's headers or envelope); better, instrument the client library so each call has a CLIENT "
        "span that injects.",
    ),
    Cause(
        "unknown",
        "A root span in the middle of a call chain whose upstream could not be identified.",
        "Check whether this service is an entry point (then list it with --entrypoints); otherwise find "
        "which caller reaches it without propagating context.",
    ),
)
CAUSES = {c.code: c for c in _CAUSES}
