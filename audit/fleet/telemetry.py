"""Per-service OpenTelemetry setup for the fleet: OTLP export to `ctxaudit serve`, samplers
that write `ot=th`, and the out-of-band truth recorder."""

from __future__ import annotations

import json
import threading

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import TraceState

_P56 = 1 << 56
TRUTH_HEADER = "x-ctxaudit-truth"  # out of band: never a span attribute, never a propagator field


class ThresholdSampler(Sampler):
    """Consistent probability sampling per the OpenTelemetry spec: keep a trace when the
    randomness in its id (the low 56 bits) reaches the threshold, and say so in tracestate
    as `ot=th:…`. Alone it ignores the parent; wrap it in ParentBased for the usual setup."""

    def __init__(self, probability: float):
        self.threshold = round((1.0 - probability) * _P56)
        self.th = f"{self.threshold:014x}".rstrip("0") or "0"

    def should_sample(
        self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        state = parent.trace_state if parent.is_valid else TraceState()
        state = state.update("ot", f"th:{self.th}") if "ot" in state else state.add("ot", f"th:{self.th}")
        sampled = (trace_id & (_P56 - 1)) >= self.threshold
        # unsampled spans are still recorded (never exported), so the truth sees every span
        return SamplingResult(
            Decision.RECORD_AND_SAMPLE if sampled else Decision.RECORD_ONLY, attributes, state
        )

    def get_description(self) -> str:
        return f"ThresholdSampler{{th:{self.th}}}"


class _RecordOnly(Sampler):
    """Where ParentBased would drop a span (its parent was not sampled): record it for the truth
    recorder, still unsampled, so the exporter never sends it."""

    def should_sample(
        self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        return SamplingResult(Decision.RECORD_ONLY, attributes, parent.trace_state)

    def get_description(self) -> str:
        return "RecordOnly"


def sampler_for(kind: str, probability: float) -> Sampler:
    root = ThresholdSampler(probability)
    if kind == "independent":
        return root
    return ParentBased(root, remote_parent_not_sampled=_RecordOnly(), local_parent_not_sampled=_RecordOnly())


class TruthRecorder(SpanProcessor):
    """Writes a ground-truth record for every span of this service when it ends (the samplers
    record unsampled spans too, so `exported: false` records exist as in the simulator).
    Code that knows a span's real parent out of band calls `note` while the span is open."""

    def __init__(self, path: str, service: str):
        self.service = service
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in shutdown)
        self._notes: dict[int, dict] = {}
        self._held: dict[int, ReadableSpan] = {}
        self._lock = threading.Lock()

    def note(
        self,
        span,
        *,
        true_parent: str | None,
        cause: str | None,
        hop: str | None,
        protocol: str | None,
        linked: bool = False,
        span_id: int | None = None,
    ) -> None:
        """`true_parent` is "traceid-spanid" in hex; `span_id` names a span other than `span`,
        which may already have ended (the official Kafka consumer ends its root at once)."""
        sid = span_id if span_id is not None else span.get_span_context().span_id
        note = {
            "true_parent": true_parent,
            "cause": cause,
            "hop": hop,
            "protocol": protocol,
            "linked": linked,
        }
        with self._lock:
            record = self._held.pop(sid, None)
            if record is None:
                self._notes[sid] = note
                return
        self._write(self._record(record, note))

    def on_end(self, span: ReadableSpan) -> None:
        note = self._notes.pop(span.get_span_context().span_id, None)
        if note is None and span.parent is None and span.kind is trace.SpanKind.CONSUMER:
            with self._lock:  # a consumer root: its note may still come; written at shutdown if not
                self._held[span.get_span_context().span_id] = span
            return
        self._write(self._record(span, note or {}))

    def _record(self, span: ReadableSpan, note: dict) -> dict:
        ctx = span.get_span_context()
        parent = span.parent
        true_parent = note.get("true_parent") or (
            f"{parent.trace_id:032x}-{parent.span_id:016x}" if parent is not None else None
        )
        tp_trace, _, tp_span = true_parent.partition("-") if true_parent else (None, None, None)
        return {
            "trace_id": f"{ctx.trace_id:032x}",
            "span_id": f"{ctx.span_id:016x}",
            "service": self.service,
            "kind": span.kind.name,
            "name": span.name,
            "request_id": None,
            "exported": ctx.trace_flags.sampled,
            "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
            "true_parent_trace_id": tp_trace or None,
            "true_parent_span_id": tp_span or None,
            "cause": note.get("cause"),
            "hop": note.get("hop"),
            "protocol": note.get("protocol"),
            "linked": note.get("linked", False),
        }

    def _write(self, record: dict) -> None:
        with self._lock:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def shutdown(self) -> None:
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for span in held:
            self._write(self._record(span, {}))
        with self._lock:
            self._file.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._lock:
            self._file.flush()
        return True


def setup(
    service: str, otlp_endpoint: str, truth_path: str, sampler: str = "parent_based", probability: float = 1.0
) -> tuple[TracerProvider, TruthRecorder]:
    provider = TracerProvider(
        resource=Resource.create({"service.name": service, "host.name": f"{service}-0"}),
        sampler=sampler_for(sampler, probability),
    )
    truth = TruthRecorder(truth_path, service)
    provider.add_span_processor(truth)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    return provider, truth


def context_id(span) -> str:
    """A span's context as "traceid-spanid": the value of the out-of-band truth header."""
    c = span.get_span_context()
    return f"{c.trace_id:032x}-{c.span_id:016x}"
