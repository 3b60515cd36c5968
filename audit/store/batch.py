"""The write side's contract: the Arrow columns a span batch must carry.

Producers (the OTLP receivers) build tables with exactly these schemas (string
columns may be dictionary-encoded); the writer appends them in bulk. Ids travel as
big-endian 64-bit halves because Arrow has no 128-bit unsigned integer; the writer
joins them into `UHUGEINT` inside DuckDB.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

_u64 = pa.uint64()
_u32 = pa.uint32()
_str = pa.string()

SPAN_SCHEMA = pa.schema(
    [
        ("trace_id_hi", _u64),
        ("trace_id_lo", _u64),
        ("span_id", _u64),
        ("parent_span_id", _u64),
        ("trace_state", _str),
        ("flags", _u32),
        ("name", _str),
        ("kind", _str),
        ("start_ns", _u64),
        ("end_ns", _u64),
        ("status_code", _str),
        ("status_message", _str),
        ("dropped_attributes_count", _u32),
        ("event_count", _u32),
        ("dropped_events_count", _u32),
        ("link_count", _u32),
        ("dropped_links_count", _u32),
        ("otlp_rest", pa.binary()),
        ("service_name", _str),
        ("resource_attributes", _str),
        ("resource_dropped_attributes_count", _u32),
        ("resource_schema_url", _str),
        ("scope_name", _str),
        ("scope_version", _str),
        ("scope_attributes", _str),
        ("scope_schema_url", _str),
        ("parent_is_remote", pa.bool_()),
        ("sampling_threshold", _u64),
        ("sampling_rv", _u64),
        ("sampling_tracestate_invalid", pa.bool_()),
        ("protocol", _str),
        ("server_address", _str),
        ("server_port", pa.int32()),
        ("peer_service", _str),
        ("url_full", _str),
        ("url_path", _str),
        ("http_route", _str),
        ("http_method", _str),
        ("http_status_code", pa.int32()),
        ("messaging_system", _str),
        ("messaging_destination", _str),
        ("messaging_message_id", _str),
        ("messaging_partition", _str),
        ("messaging_offset", pa.int64()),
        ("rpc_system", _str),
        ("rpc_service", _str),
        ("rpc_method", _str),
        ("db_system", _str),
    ]
)

LINK_SCHEMA = pa.schema(
    [
        ("trace_id_hi", _u64),
        ("trace_id_lo", _u64),
        ("span_id", _u64),
        ("link_trace_id_hi", _u64),
        ("link_trace_id_lo", _u64),
        ("link_span_id", _u64),
        ("trace_state", _str),
        ("flags", _u32),
        ("attributes", _str),
        ("dropped_attributes_count", _u32),
    ]
)


@dataclass
class SpanBatch:
    """Spans from one export request, ready to append, with what was refused."""

    spans: pa.Table
    links: pa.Table
    rejected: int = 0
    rejection_reasons: dict[str, int] = field(default_factory=dict)
    end_before_start: int = 0
    # the Arrow IPC streams (spans, links) the tables were read from, when they came as such
    # (from a decode worker): the staging log writes them as they are instead of encoding again
    ipc: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def accepted(self) -> int:
        return self.spans.num_rows

    def rejection_message(self) -> str:
        return "; ".join(f"{n} span(s): {why}" for why, n in sorted(self.rejection_reasons.items()))
