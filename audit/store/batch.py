"""The write side's contract: the Arrow columns a span batch must carry.

Producers (the OTLP receivers) build tables with exactly these schemas (string
columns may be dictionary-encoded); the writer appends them in bulk. Ids travel as
big-endian 64-bit halves because Arrow has no 128-bit unsigned integer; the writer
joins them into `UHUGEINT` inside DuckDB.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache

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
        # which attributes otlp_rest leaves out because a column holds them (audit/store/rest.py)
        ("attributes_in_columns", _u32),
        ("service_name", _str),
        ("resource_attributes", _str),
        ("resource_dropped_attributes_count", _u32),
        ("resource_schema_url", _str),
        ("scope_name", _str),
        ("scope_version", _str),
        ("scope_attributes", _str),
        ("scope_schema_url", _str),
        # ids of the resource and the scope (resource_id, scope_id below): the store keeps the
        # seven columns above once per id, in span_resources and span_scopes
        ("resource_id", _u64),
        ("scope_id", _u64),
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

RESOURCE_COLUMNS = ("resource_attributes", "resource_dropped_attributes_count", "resource_schema_url")
SCOPE_COLUMNS = ("scope_name", "scope_version", "scope_attributes", "scope_schema_url")


def _content_id(*parts) -> int:
    # the same as DuckDB's md5_number_upper(concat(parts joined by chr(31))): migration
    # 0005_span_resources gives the rows already stored their ids with it
    key = "\x1f".join("" if p is None else str(p) for p in parts)
    return int.from_bytes(hashlib.md5(key.encode()).digest()[:8], "little")


@lru_cache(maxsize=4096)  # a fleet sends the same few resources and scopes again and again
def resource_id(attributes_json: str | None, dropped_attributes_count: int, schema_url: str | None) -> int:
    """The id of a resource (its JSON attributes, dropped count and ResourceSpans schema URL)."""
    return _content_id(attributes_json, dropped_attributes_count, schema_url)


@lru_cache(maxsize=4096)
def scope_id(
    name: str | None, version: str | None, attributes_json: str | None, schema_url: str | None
) -> int:
    """The id of an instrumentation scope (with its ScopeSpans schema URL)."""
    return _content_id(name, version, attributes_json, schema_url)


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


def with_group_ids(spans: pa.Table) -> pa.Table:
    """`spans` with `resource_id` and `scope_id`: a batch staged by a build before them (a
    staging log segment written before an upgrade) gets them computed here; and with
    `attributes_in_columns` (NULL: its otlp_rest is whole) if staged before that."""
    if "attributes_in_columns" not in spans.column_names:
        at = spans.column_names.index("otlp_rest") + 1
        spans = spans.add_column(at, "attributes_in_columns", pa.nulls(spans.num_rows, _u32))
    if "resource_id" in spans.column_names:
        return spans
    rows = spans.select(RESOURCE_COLUMNS + SCOPE_COLUMNS).to_pylist()
    resources = [resource_id(*(r[c] for c in RESOURCE_COLUMNS)) for r in rows]
    scopes = [scope_id(*(r[c] for c in SCOPE_COLUMNS)) for r in rows]
    spans = spans.append_column("resource_id", pa.array(resources, _u64))
    spans = spans.append_column("scope_id", pa.array(scopes, _u64))
    return spans.select(SPAN_SCHEMA.names)
