"""Turn a decoded OTLP export request into the store's Arrow columns.

This is the ingest hot path: every span passes through `to_span_batch` once. Per-span
Python work is kept to field reads and one tuple: attributes and events are kept as
serialized protobuf (lossless, every value type), and only the keys the audit needs are
looked up, in C, through the map view of `otlp_lite`.
Values repeated per resource or scope are stored once as dictionary arrays; ids
are converted in bulk with numpy.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pyarrow as pa

from audit.store.batch import LINK_SCHEMA, SPAN_SCHEMA, SpanBatch, resource_id, scope_id
from audit.store.otlp_values import any_value, attributes, to_json
from audit.store.rest import BIT_OF, COLUMN_ATTRIBUTES, INT_MAX, max_string_bytes, varint_size

from .tracestate import parse_ot_sampling

_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)
_KINDS = ("UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")
_STATUS = ("UNSET", "OK", "ERROR")
_FLAG_HAS_IS_REMOTE = 0x100
_FLAG_IS_REMOTE = 0x200


# Converters take the OTLP AnyValue itself: reading the expected field first is one C call,
# and the generic path handles attributes sent with another type (e.g. a port as a string).


def _as_int(value) -> int | None:
    i = value.int_value
    if i:
        return i
    v = any_value(value)
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, str):
        try:
            v = int(v)
        except ValueError:
            return None
    if isinstance(v, int) and -(2**63) <= v < 2**63:
        return v
    return None


def _as_int32(value) -> int | None:
    i = _as_int(value)
    return i if i is not None and -(2**31) <= i < 2**31 else None


def _as_str(value) -> str | None:
    s = value.string_value
    if s:
        return s
    v = any_value(value)
    if v is None or isinstance(v, str):
        return v
    return to_json(v) if isinstance(v, (list, dict)) else str(v)


def _as_path(value) -> str | None:
    # legacy http.target carries the query string; url.path does not
    s = _as_str(value)
    return s.partition("?")[0] if s is not None else None


# Audit columns derived at ingest: (column, converter, semconv keys: current first, then legacy).
DERIVED = (
    ("server_address", _as_str, ("server.address", "net.peer.name", "net.host.name", "http.host")),
    ("server_port", _as_int32, ("server.port", "net.peer.port", "net.host.port")),
    ("peer_service", _as_str, ("peer.service",)),
    ("url_full", _as_str, ("url.full", "http.url")),
    ("url_path", _as_path, ("url.path", "http.target")),
    ("http_route", _as_str, ("http.route",)),
    ("http_method", _as_str, ("http.request.method", "http.method")),
    ("http_status_code", _as_int32, ("http.response.status_code", "http.status_code")),
    ("messaging_system", _as_str, ("messaging.system",)),
    ("messaging_destination", _as_str, ("messaging.destination.name", "messaging.destination")),
    ("messaging_message_id", _as_str, ("messaging.message.id", "messaging.message_id")),
    (
        "messaging_partition",
        _as_str,
        (
            "messaging.destination.partition.id",
            "messaging.kafka.destination.partition",
            "messaging.kafka.partition",
        ),
    ),
    ("messaging_offset", _as_int, ("messaging.kafka.offset", "messaging.kafka.message.offset")),
    ("rpc_system", _as_str, ("rpc.system",)),
    ("rpc_service", _as_str, ("rpc.service",)),
    ("rpc_method", _as_str, ("rpc.method",)),
    ("db_system", _as_str, ("db.system.name", "db.system")),
)
_NO_DERIVED = (None,) * len(DERIVED)
_COLUMN = {name: i for i, (name, _, _) in enumerate(DERIVED)}
_HTTP_KEYS = frozenset(("http.request.method", "http.method", "url.full", "http.url", "http.route"))
_KEYS = frozenset(k for _, _, keys in DERIVED for k in keys)


def protocol_of(derived: tuple, keys: frozenset) -> str:
    """Protocol class of a span: messaging > grpc/rpc > db > http > none."""
    if derived[_COLUMN["messaging_system"]] is not None:
        return "messaging"
    rpc_system = derived[_COLUMN["rpc_system"]]
    if rpc_system is not None:
        return "grpc" if rpc_system == "grpc" else "rpc"
    if derived[_COLUMN["db_system"]] is not None:
        return "db"
    return "http" if keys & _HTTP_KEYS else "none"


@lru_cache(maxsize=1024)  # spans of one instrumentation share a few key sets: plan each once
def _plan(keys: frozenset) -> tuple:
    """For the audit keys present: per column, its converter and the present keys by precedence."""
    return tuple(
        (col, conv, tuple(k for k in candidates if k in keys))
        for col, (_, conv, candidates) in enumerate(DERIVED)
        if not keys.isdisjoint(candidates)
    )


def _derive(attrs) -> tuple[tuple, str, int]:
    """The DERIVED columns, the protocol class and `attributes_in_columns` of one span, from its
    attribute map; the attributes a column holds exactly are deleted from the map (rest.py)."""
    keys = _KEYS.intersection(attrs)  # a set intersection in C finds the few keys present
    if not keys:
        return _NO_DERIVED, "none", 0
    out = list(_NO_DERIVED)
    moved = 0
    for col, conv, present in _plan(keys):
        for k in present:
            value = attrs[k]
            v = conv(value)
            if v is not None:  # else fall back to the next (legacy) key
                out[col] = v
                bit = BIT_OF.get(k)
                if bit is not None and _in_column(value, v, k):
                    moved |= 1 << bit
                break
    derived = tuple(out)
    protocol = protocol_of(derived, keys)
    if moved:
        for bit, (k, _, _) in enumerate(COLUMN_ATTRIBUTES):
            if moved >> bit & 1:
                del attrs[k]
    return derived, protocol, moved


def _in_column(value, v, key: str) -> bool:
    """Does the column value `v` give this AnyValue back exactly (same type, same value,
    canonically encoded)? Then otlp_rest leaves the attribute out (audit/store/rest.py)."""
    which = value.WhichOneof("value")
    if which == "string_value":
        s = value.string_value
        n = len(s.encode())
        return v == s and 0 < n <= max_string_bytes(key) and value.ByteSize() == 2 + n
    if which == "int_value":
        i = value.int_value
        return v == i and 0 < i < INT_MAX and value.ByteSize() == 1 + varint_size(i)
    return False


# Span fields held in columns (links: in span_links). Stripping them before serializing
# leaves `otlp_rest`: attributes, events and unknown fields. The random ids alone would be
# a tenth of the blob and do not compress; the whole strip makes commits ~20% cheaper.
_IN_COLUMNS = (
    "trace_id",
    "span_id",
    "parent_span_id",
    "trace_state",
    "flags",
    "name",
    "kind",
    "start_time_unix_nano",
    "end_time_unix_nano",
    "status",
    "dropped_attributes_count",
    "dropped_events_count",
    "links",
    "dropped_links_count",
)


def _rest(span) -> bytes:
    clear = span.ClearField
    for name in _IN_COLUMNS:
        clear(name)
    return span.SerializeToString()


# Per-span scalar columns, in the order `to_span_batch` builds each row tuple.
_ROW = (
    "trace_state",
    "flags",
    "name",
    "kind",
    "start_ns",
    "end_ns",
    "status_code",
    "status_message",
    "dropped_attributes_count",
    "event_count",
    "dropped_events_count",
    "link_count",
    "dropped_links_count",
    "parent_is_remote",
    "sampling_threshold",
    "sampling_rv",
    "sampling_tracestate_invalid",
    "protocol",
    "otlp_rest",
    "attributes_in_columns",
)
_GROUP = (
    "service_name",
    "resource_attributes",
    "resource_dropped_attributes_count",
    "resource_schema_url",
    "scope_name",
    "scope_version",
    "scope_attributes",
    "scope_schema_url",
    "resource_id",
    "scope_id",
)


def to_span_batch(traces) -> SpanBatch:
    """Convert every valid span of an `otlp_lite.TracesData`; invalid ids are counted and refused."""
    groups: list[tuple] = []
    group_of: list[int] = []
    trace_ids: list[bytes] = []
    span_ids: list[bytes] = []
    parent_ids: list[bytes] = []
    has_parent: list[bool] = []
    rows: list[tuple] = []
    derived: list[tuple] = []
    links: list[tuple] = []
    reasons: dict[str, int] = {}
    end_before_start = 0

    for resource_spans in traces.resource_spans:
        resource = resource_spans.resource
        res_attrs = attributes(resource.attributes)
        service = res_attrs.get("service.name")
        service = service if isinstance(service, str) and service else "unknown_service"
        res_json = to_json(res_attrs)
        res_url = resource_spans.schema_url or None
        res_id = resource_id(res_json, resource.dropped_attributes_count, res_url)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope
            g = len(groups)
            scope_fields = (
                scope.name or None,
                scope.version or None,
                to_json(attributes(scope.attributes)),
                scope_spans.schema_url or None,
            )
            groups.append(
                (service, res_json, resource.dropped_attributes_count, res_url, *scope_fields)
                + (res_id, scope_id(*scope_fields))
            )
            for span in scope_spans.spans:
                tid = span.trace_id
                sid = span.span_id
                pid = span.parent_span_id
                why = None
                if len(tid) != 16 or tid == _ZERO_TRACE:
                    why = "trace_id must be 16 bytes, not all zero"
                elif len(sid) != 8 or sid == _ZERO_SPAN:
                    why = "span_id must be 8 bytes, not all zero"
                elif pid and len(pid) != 8:
                    why = "parent_span_id must be empty or 8 bytes"
                span_links = span.links
                if why is None and span_links:
                    for link in span_links:
                        if len(link.trace_id) != 16 or len(link.span_id) != 8:
                            why = "link ids must be 16 and 8 bytes"
                            break
                if why is not None:
                    reasons[why] = reasons.get(why, 0) + 1
                    continue

                group_of.append(g)
                trace_ids.append(tid)
                span_ids.append(sid)
                if pid and pid != _ZERO_SPAN:
                    parent_ids.append(pid)
                    has_parent.append(True)
                else:  # an all-zero parent id is no parent (W3C: invalid parent-id)
                    parent_ids.append(_ZERO_SPAN)
                    has_parent.append(False)

                trace_state = span.trace_state
                if trace_state:
                    th, rv, ts_bad = parse_ot_sampling(trace_state)
                else:
                    trace_state = th = rv = None
                    ts_bad = False
                flags = span.flags
                kind = span.kind
                start = span.start_time_unix_nano
                end = span.end_time_unix_nano
                if end < start:
                    end_before_start += 1
                status = span.status
                code = status.code
                d, protocol, moved = _derive(span.attributes)  # before _rest: it deletes what columns hold
                derived.append(d)
                n_links = len(span_links)
                if n_links:
                    for link in span_links:
                        links.append(
                            (
                                tid,
                                sid,
                                link.trace_id,
                                link.span_id,
                                link.trace_state or None,
                                link.flags,
                                to_json(attributes(link.attributes)),
                                link.dropped_attributes_count,
                            )
                        )
                rows.append(
                    (
                        trace_state,
                        flags,
                        span.name,
                        _KINDS[kind] if 0 <= kind < 6 else "UNSPECIFIED",
                        start,
                        end,
                        _STATUS[code] if 0 <= code < 3 else "UNSET",
                        status.message or None,
                        span.dropped_attributes_count,
                        len(span.events),
                        span.dropped_events_count,
                        n_links,
                        span.dropped_links_count,
                        bool(flags & _FLAG_IS_REMOTE) if flags & _FLAG_HAS_IS_REMOTE else None,
                        th,
                        rv,
                        ts_bad,
                        protocol,
                        _rest(span),  # after the fields read before it: it clears them
                        moved or None,
                    )
                )

    return SpanBatch(
        spans=_span_table(groups, group_of, trace_ids, span_ids, parent_ids, has_parent, rows, derived),
        links=_link_table(links),
        rejected=sum(reasons.values()),
        rejection_reasons=reasons,
        end_before_start=end_before_start,
    )


def _ids(raw: list[bytes] | tuple[bytes, ...], width: int) -> list[np.ndarray]:
    """Big-endian id bytes -> native uint64 words, one contiguous array per word (hi first)."""
    words = np.frombuffer(b"".join(raw), dtype=">u8").astype(np.uint64).reshape(-1, width // 8)
    return [np.ascontiguousarray(words[:, i]) for i in range(width // 8)]


def _column(name: str, values) -> pa.Array:
    return pa.array(values, SPAN_SCHEMA.field(name).type)


def _span_table(groups, group_of, trace_ids, span_ids, parent_ids, has_parent, rows, derived) -> pa.Table:
    if not rows:
        return SPAN_SCHEMA.empty_table()
    arrays: dict[str, pa.Array] = {}
    arrays["trace_id_hi"], arrays["trace_id_lo"] = map(pa.array, _ids(trace_ids, 16))
    [span_id] = _ids(span_ids, 8)
    [parent_id] = _ids(parent_ids, 8)
    arrays["span_id"] = pa.array(span_id)
    arrays["parent_span_id"] = pa.array(parent_id, mask=~np.asarray(has_parent, dtype=bool))
    index = pa.array(np.asarray(group_of, dtype=np.int32))
    for name, values in zip(_GROUP, zip(*groups)):
        type_ = SPAN_SCHEMA.field(name).type
        if pa.types.is_string(type_):  # repeated per scope: dictionary-encode, DuckDB reads it as is
            arrays[name] = pa.DictionaryArray.from_arrays(index, pa.array(values, type_))
        else:
            arrays[name] = pa.array(values, type_).take(index)
    for name, values in zip(_ROW, zip(*rows)):
        arrays[name] = _column(name, values)
    for (name, _, _), values in zip(DERIVED, zip(*derived)):
        arrays[name] = _column(name, values)
    columns = [arrays[f.name] for f in SPAN_SCHEMA]
    return pa.Table.from_arrays(columns, names=SPAN_SCHEMA.names)


def _link_table(links: list[tuple]) -> pa.Table:
    if not links:
        return LINK_SCHEMA.empty_table()
    tid, sid, ltid, lsid, trace_state, flags, attrs, dropped = zip(*links)
    (t_hi, t_lo), (lt_hi, lt_lo), [s], [ls] = _ids(tid, 16), _ids(ltid, 16), _ids(sid, 8), _ids(lsid, 8)
    data = {
        "trace_id_hi": t_hi,
        "trace_id_lo": t_lo,
        "span_id": s,
        "link_trace_id_hi": lt_hi,
        "link_trace_id_lo": lt_lo,
        "link_span_id": ls,
        "trace_state": trace_state,
        "flags": flags,
        "attributes": attrs,
        "dropped_attributes_count": dropped,
    }
    return pa.Table.from_pydict(data, schema=LINK_SCHEMA)
