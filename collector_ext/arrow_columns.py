"""The vectorised twin of columns.py: export request bytes -> the store's Arrow columns.

`ptars` (Rust) parses the protobuf wire format straight into Arrow arrays; the audit columns,
ids, tracestate fields and `otlp_rest` are then built from whole arrays (numpy and
pyarrow.compute), never per span in Python. Python runs per resource, per scope, per distinct
tracestate and per span link only.

The output equals `columns.to_span_batch` column by column (tests/test_arrow_columns.py),
with one deliberate difference: `otlp_rest` keeps the attributes in the order they were sent
(the Python path's map view serializes them in hash order); both parse to the same span.
Whatever this path does not convert exactly the same way raises `Unsupported`, and the caller
converts that request in Python: invalid ids (the Python path counts and explains them),
duplicate attribute keys, an audit attribute of an unusual type (a double as a port, a
string as a status code, ...), unknown fields or a non-canonical encoding in a span (seen
as a span whose byte count differs from the sum of its fields).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from audit.store.batch import LINK_SCHEMA, SPAN_SCHEMA, SpanBatch, resource_id, scope_id
from audit.store.otlp_values import attributes, to_json
from audit.store.rest import COLUMN_ATTRIBUTES, INT_MAX, STRING, max_string_bytes, string_kv_size

from .columns import _GROUP, _HTTP_KEYS, _KINDS, _STATUS, DERIVED, _as_int, _as_int32, _as_path, _as_str
from .tracestate import parse_ot_sampling

try:
    import ptars
except ImportError:  # optional: without it every request takes the Python path
    ptars = None


# Below this many spans a request costs less in Python: this path's cost per request (some
# hundred array operations, ~1-3 ms) outweighs its saving per span (bench/decode.py --sizes).
MIN_SPANS = 400


class Unsupported(Exception):
    """This request has something the vectorised path does not convert; use columns.py."""


_PACKAGE = "ctxaudit.otlp_wire.trace.v1"
_OFFICIAL = ".opentelemetry.proto.trace.v1."
_BYTES = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
# Fields read as their raw bytes: nested messages this path only slices, counts or hands to upb.
_RAW = {
    "ResourceSpans": ("resource",),
    "ScopeSpans": ("scope", "spans"),
    "Span": ("attributes", "events", "links"),
}


def _wire_file() -> descriptor_pb2.FileDescriptorProto:
    """The OTLP trace protos with some message fields declared `bytes` (the same wire type)."""
    fdp = descriptor_pb2.FileDescriptorProto()
    trace_pb2.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = "ctxaudit/otlp_wire/trace.proto"
    fdp.package = _PACKAGE
    for message in fdp.message_type:
        raw = _RAW.get(message.name, ())
        for f in message.field:
            if f.name in raw:
                f.type = _BYTES
                f.ClearField("type_name")
            elif f.type_name.startswith(_OFFICIAL):
                f.type_name = f".{_PACKAGE}." + f.type_name[len(_OFFICIAL) :]
    # what a span keeps beyond its columns: attributes and events, re-encoded from their raw bytes
    rest = fdp.message_type.add(name="Rest")
    for name, number in (("attributes", 9), ("events", 11)):
        rest.field.add(name=name, number=number, label=3, type=_BYTES)  # repeated bytes
    return fdp


@lru_cache(maxsize=1)
def _handlers():
    pool = descriptor_pool.DescriptorPool()
    for dependency in trace_pb2.DESCRIPTOR.dependencies:
        pool.AddSerializedFile(dependency.serialized_pb)
    file = pool.Add(_wire_file())
    handlers = ptars.HandlerPool([file, common_pb2.DESCRIPTOR])

    def handler(name: str):
        return handlers.get_for_message(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))

    # keep the message classes alive with the pool
    message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.TracesData"))
    return (
        handler("TracesData"),
        handler("Span"),
        handler("Rest"),
        handlers.get_for_message(common_pb2.KeyValue.DESCRIPTOR),
    )


def available() -> bool:
    """Is the converter installed (and are its handlers buildable here)?"""
    if ptars is None:
        return False
    try:
        _handlers()
    except Exception:  # a ptars that cannot read these descriptors: the Python path serves
        return False
    return True


def to_span_batch(wire: bytes) -> SpanBatch:
    """Convert a valid export request (protobuf bytes already parsed once by upb: it decides what
    is malformed) into a SpanBatch; raise `Unsupported` for what columns.py must convert."""
    request_h, span_h, rest_h, kv_h = _handlers()
    try:
        request = request_h.list_to_record_batch([wire])
    except ValueError as e:
        raise Unsupported(f"ptars: {e}") from None
    resource_spans = request.column(0).flatten()  # one request: its list is the whole column
    scope_spans = resource_spans.field("scope_spans")
    groups = _groups(resource_spans, scope_spans)
    span_list = scope_spans.flatten().field("spans")
    raw_spans = span_list.flatten()
    n = len(raw_spans)
    if n == 0:
        return SpanBatch(spans=SPAN_SCHEMA.empty_table(), links=LINK_SCHEMA.empty_table())
    group_of = pc.list_parent_indices(span_list)
    try:
        spans = span_h.array_to_record_batch(raw_spans)
    except ValueError as e:
        raise Unsupported(f"ptars: {e}") from None

    arrays: dict[str, pa.Array] = {}
    trace_hi, trace_lo = _fixed_ids(spans.column("trace_id"), 16)
    [span_id] = _fixed_ids(spans.column("span_id"), 8)
    parent, has_parent = _parent_ids(spans.column("parent_span_id"))
    links = _link_table(spans.column("links"), trace_hi, trace_lo, span_id)
    arrays["trace_id_hi"], arrays["trace_id_lo"] = pa.array(trace_hi), pa.array(trace_lo)
    arrays["span_id"] = pa.array(span_id)
    arrays["parent_span_id"] = pa.array(parent, mask=~has_parent)

    index = pa.array(np.asarray(group_of, dtype=np.int32))
    for name, values in zip(_GROUP, zip(*groups)):
        type_ = SPAN_SCHEMA.field(name).type
        if pa.types.is_string(type_):  # as columns.py: one dictionary entry per scope
            arrays[name] = pa.DictionaryArray.from_arrays(index, pa.array(values, type_))
        else:
            arrays[name] = pa.array(values, type_).take(index)

    arrays.update(_tracestate(spans.column("trace_state")))
    flags = spans.column("flags")
    flags_np = np.asarray(flags)
    arrays["flags"] = flags
    has_remote = (flags_np & 0x100) != 0
    arrays["parent_is_remote"] = pa.array((flags_np & 0x200) != 0, mask=~has_remote)
    arrays["name"] = spans.column("name")
    arrays["kind"] = _names(spans.column("kind"), _KINDS)
    start, end = spans.column("start_time_unix_nano"), spans.column("end_time_unix_nano")
    arrays["start_ns"], arrays["end_ns"] = start, end
    message, code = spans.column("status").flatten()  # flatten: an absent status is null
    code = pc.fill_null(code, 0)
    message = pc.fill_null(message, "")
    arrays["status_code"] = _names(code, _STATUS)
    arrays["status_message"] = pc.if_else(pc.equal(message, ""), pa.scalar(None, pa.string()), message)
    for name in ("dropped_attributes_count", "dropped_events_count", "dropped_links_count"):
        arrays[name] = spans.column(name)
    arrays["event_count"] = _lengths(spans.column("events"), pa.uint32())
    arrays["link_count"] = _lengths(spans.column("links"), pa.uint32())

    attrs = spans.column("attributes")
    derived, protocol, kept, moved, moved_bytes = _derive(attrs, kv_h, n)
    arrays.update(derived)
    arrays["protocol"] = protocol
    rest = rest_h.record_batch_to_array(
        pa.RecordBatch.from_arrays([kept, spans.column("events")], names=["attributes", "events"])
    )
    _check_sizes(raw_spans, spans, rest, moved_bytes)
    arrays["otlp_rest"] = rest
    arrays["attributes_in_columns"] = moved

    end_before_start = int(np.count_nonzero(np.asarray(end) < np.asarray(start)))
    columns = [arrays[f.name] for f in SPAN_SCHEMA]
    table = pa.Table.from_arrays(columns, names=SPAN_SCHEMA.names)
    return SpanBatch(spans=table, links=links, end_before_start=end_before_start)


@lru_cache(maxsize=512)  # a fleet sends the same few resources and scopes again and again
def _resource(raw: bytes) -> tuple[str, str | None, int]:
    resource = Resource.FromString(raw)
    res_attrs = attributes(resource.attributes)
    service = res_attrs.get("service.name")
    service = service if isinstance(service, str) and service else "unknown_service"
    return service, to_json(res_attrs), resource.dropped_attributes_count


@lru_cache(maxsize=512)
def _scope(raw: bytes) -> tuple[str | None, str | None, str | None]:
    scope = InstrumentationScope.FromString(raw)
    return scope.name or None, scope.version or None, to_json(attributes(scope.attributes))


def _groups(resource_spans: pa.StructArray, scope_spans: pa.ListArray) -> list[tuple]:
    """One row per scope, as columns.py builds them (`_GROUP` order)."""
    resources = resource_spans.field("resource").to_pylist()
    rs_urls = resource_spans.field("schema_url").to_pylist()
    scopes = scope_spans.flatten()
    resource_of = pc.list_parent_indices(scope_spans).to_pylist()
    groups = []
    for r, scope_raw, ss_url in zip(
        resource_of, scopes.field("scope").to_pylist(), scopes.field("schema_url").to_pylist()
    ):
        service, res_json, dropped = _resource(resources[r])
        scope_fields = (*_scope(scope_raw), ss_url or None)
        res_url = rs_urls[r] or None
        groups.append(
            (service, res_json, dropped, res_url, *scope_fields)
            + (resource_id(res_json, dropped, res_url), scope_id(*scope_fields))
        )
    return groups


def _offsets(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A binary array's per-value start offsets and lengths."""
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
    return offsets[:-1], np.diff(offsets)


def _gather(arr: pa.Array, rows: np.ndarray, width: int) -> np.ndarray:
    """The `width`-byte values of `rows` of a binary array, as native uint64 words (hi first)."""
    starts, _ = _offsets(arr)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)
    cut = data[starts[rows][:, None] + np.arange(width)]
    return cut.view(">u8").astype(np.uint64)


def _fixed_ids(arr: pa.Array, width: int) -> list[np.ndarray]:
    _, lengths = _offsets(arr)
    if np.any(lengths != width):
        raise Unsupported("an id of the wrong length")
    words = _gather(arr, np.arange(len(arr)), width)
    if np.any(np.all(words == 0, axis=1)):
        raise Unsupported("an all-zero id")
    return [np.ascontiguousarray(words[:, i]) for i in range(width // 8)]


def _parent_ids(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    _, lengths = _offsets(arr)
    if np.any((lengths != 0) & (lengths != 8)):
        raise Unsupported("a parent id of the wrong length")
    parent = np.zeros(len(arr), dtype=np.uint64)
    rows = np.flatnonzero(lengths == 8)
    if len(rows):
        parent[rows] = _gather(arr, rows, 8)[:, 0]
    return parent, parent != 0  # an all-zero parent id is no parent (W3C: invalid parent-id)


def _names(codes: pa.Array, names: tuple[str, ...]) -> pa.Array:
    c = np.asarray(codes).astype(np.int64)
    c[(c < 0) | (c >= len(names))] = 0
    return pa.array(np.asarray(names, dtype=object)[c], pa.string())


def _lengths(lists: pa.ListArray, type_: pa.DataType) -> pa.Array:
    return pc.fill_null(pc.list_value_length(lists), 0).cast(type_)


@lru_cache(maxsize=4096)
def _ot_sampling(trace_state: str) -> tuple:
    if not trace_state:
        return None, None, None, False
    return (trace_state, *parse_ot_sampling(trace_state))


def _tracestate(states: pa.Array) -> dict[str, pa.Array]:
    """trace_state and the `ot` sampling fields, parsed once per distinct tracestate."""
    encoded = pc.dictionary_encode(states)
    parsed = [_ot_sampling(s) for s in encoded.dictionary.to_pylist()]
    index = encoded.indices
    ts, th, rv, bad = zip(*parsed)
    return {
        "trace_state": pa.array(ts, pa.string()).take(index),
        "sampling_threshold": pa.array(th, pa.uint64()).take(index),
        "sampling_rv": pa.array(rv, pa.uint64()).take(index),
        "sampling_tracestate_invalid": pa.array(bad, pa.bool_()).take(index),
    }


# The AnyValue oneof, in `_KIND` codes; a KeyValue without a value is 0.
_VALUE_FIELDS = (
    "string_value",
    "bool_value",
    "int_value",
    "double_value",
    "array_value",
    "kvlist_value",
    "bytes_value",
    "string_value_strindex",
)
_STRING, _BOOL, _INT, _DOUBLE = 1, 2, 3, 4
# Per converter: the value kinds it takes (else the key is skipped, as in columns.py) and the
# kinds it converts another way than this module does (the request goes to columns.py).
_STR_TAKES, _STR_OTHER = (_STRING, _INT, _BOOL), (_DOUBLE, 5, 6, 7, 8)
_INT_TAKES, _INT_OTHER = (_INT,), (_STRING, 7, 8)


def _table(kinds: tuple[int, ...]) -> np.ndarray:
    table = np.zeros(len(_VALUE_FIELDS) + 1, dtype=bool)
    table[list(kinds)] = True
    return table


# as lookup tables indexed by kind: cheaper than np.isin for a handful of rows
_CONVERTER_KINDS = {
    _as_str: (_table(_STR_TAKES), _table(_STR_OTHER)),
    _as_path: (_table(_STR_TAKES), _table(_STR_OTHER)),
    _as_int: (_table(_INT_TAKES), _table(_INT_OTHER)),
    _as_int32: (_table(_INT_TAKES), _table(_INT_OTHER)),
}
_AS_TEXT = _table((_INT, _BOOL))
_INT32 = (-(2**31), 2**31)


def _derive(attrs: pa.ListArray, kv_h, n: int) -> tuple:
    """The DERIVED columns and the protocol class, from all spans' attributes at once; then the
    attributes without those a column holds exactly, `attributes_in_columns`, and the bytes
    left out per span (audit/store/rest.py; columns.py does the same per span)."""
    raw = attrs.flatten()
    out: dict[str, pa.Array] = {}
    if len(raw) == 0:
        for name, _, _ in DERIVED:
            out[name] = pa.nulls(n, SPAN_SCHEMA.field(name).type)
        return out, pa.array(["none"] * n, pa.string()), attrs, pa.nulls(n, pa.uint32()), 0
    try:
        kvs = kv_h.array_to_record_batch(raw)
    except ValueError as e:
        raise Unsupported(f"ptars: {e}") from None
    owner = np.asarray(pc.list_parent_indices(attrs))
    keys = pc.dictionary_encode(kvs.column("key"))
    code = np.asarray(keys.indices)
    names = keys.dictionary.to_pylist()
    slot = owner.astype(np.int64) * len(names) + code
    slot.sort()
    if np.any(slot[1:] == slot[:-1]):
        raise Unsupported("a span with a duplicated attribute key")
    code_of = {k: i for i, k in enumerate(names)}

    value = dict(zip(_VALUE_FIELDS, kvs.column("value").flatten()))  # null where no value
    kind = np.zeros(len(raw), dtype=np.int8)
    members = np.zeros(len(raw), dtype=np.int8)
    for k, field in enumerate(_VALUE_FIELDS, start=1):
        if value[field].null_count == len(raw):
            continue
        is_set = np.asarray(value[field].is_valid())
        kind[is_set] = k
        members += is_set
    if np.any(members > 1):  # a oneof sent twice: the last on the wire wins, which Arrow does not say
        raise Unsupported("an attribute value with two oneof members")
    string_value = value["string_value"]
    int_value = value["int_value"]
    as_text = None  # string, int or bool as text, made if a string column needs it

    present, sources = {}, {}
    for name, conv, candidates in DERIVED:
        type_ = SPAN_SCHEMA.field(name).type
        if not any(key in code_of for key in candidates):
            out[name] = pa.nulls(n, type_)
            present[name] = np.zeros(n, dtype=bool)
            continue
        takes, other = _CONVERTER_KINDS[conv]
        source = np.full(n, -1, dtype=np.int64)
        for key in reversed(candidates):  # the current key last: it wins over a legacy one
            c = code_of.get(key)
            if c is None:
                continue
            rows = np.flatnonzero(code == c)
            kinds = kind[rows]
            if other[kinds].any():
                raise Unsupported(f"attribute {key!r} of a type converted in Python")
            ok = takes[kinds]
            if conv is _as_int32:
                v = np.asarray(int_value.take(pa.array(rows)).fill_null(0))
                ok &= (v >= _INT32[0]) & (v < _INT32[1])
            rows = rows[ok]
            source[owner[rows]] = rows
        chosen = source >= 0
        present[name] = chosen
        sources[name] = source
        take = pa.array(source, mask=~chosen)
        if conv is _as_int or conv is _as_int32:
            out[name] = int_value.take(take).cast(type_)
            continue
        if _AS_TEXT[kind[source[chosen]]].any():
            if as_text is None:
                bool_text = pc.if_else(value["bool_value"], "True", "False")
                as_text = pc.coalesce(string_value, int_value.cast(pa.string()), bool_text)
            column = as_text.take(take)
        else:
            column = string_value.take(take)
        if conv is _as_path:  # legacy http.target carries the query string; url.path does not
            column = pc.replace_substring_regex(column, r"(?s)\?.*", "")
        out[name] = column
    protocol = _protocol(out, present, owner, code, code_of, n)
    kept, moved, moved_bytes = _leave_out(attrs, raw, out, sources, owner, kind, value, code, code_of, n)
    return out, protocol, kept, moved, moved_bytes


def _leave_out(attrs, raw, out, sources, owner, kind, value, code, code_of, n) -> tuple:
    """The attributes each column gives back exactly taken out of `attrs` (as columns._in_column
    decides per span): (the attributes kept, attributes_in_columns, bytes taken out per span).
    A column read from an attribute of its own type holds that attribute's value (_derive), so
    what is checked here is its size, the canonical encoding, and for url_path no query cut off."""
    _, kv_size = _offsets(raw)
    str_len = ints = None
    out_kv = np.zeros(len(raw), dtype=bool)
    bits = np.zeros(n, dtype=np.uint32)
    for bit, (key, name, type_) in enumerate(COLUMN_ATTRIBUTES):
        c = code_of.get(key)
        if c is None:
            continue
        source = sources[name]
        spans = np.flatnonzero(source >= 0)
        spans = spans[code[source[spans]] == c]  # the spans whose column was read from `key`
        rows = source[spans]
        k = len(key.encode())
        if type_ == STRING:
            if str_len is None:
                str_len = _offsets(value["string_value"])[1]
            length = str_len[rows]
            ok = (kind[rows] == _STRING) & (length > 0) & (length <= max_string_bytes(key))
            ok &= kv_size[rows] == string_kv_size(k, length)
            if name == "url_path":  # http.target's query is not in the column
                ok &= _offsets(out[name])[1][spans] == length
        else:
            if ints is None:
                ints = np.asarray(value["int_value"].fill_null(0))
            v = ints[rows]
            ok = (kind[rows] == _INT) & (v > 0) & (v < INT_MAX)
            ok &= kv_size[rows] == k + 5 + _varint_size(np.maximum(v, 0))
        out_kv[rows[ok]] = True
        bits[spans[ok]] |= np.uint32(1 << bit)
    if not out_kv.any():
        return attrs, pa.nulls(n, pa.uint32()), 0
    taken = owner[out_kv]
    counts = np.asarray(_lengths(attrs, pa.int32())) - np.bincount(taken, minlength=n).astype(np.int32)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    kept = pa.ListArray.from_arrays(pa.array(offsets), raw.filter(pa.array(~out_kv)))
    moved_bytes = np.bincount(taken, weights=_element(kv_size[out_kv]), minlength=n).astype(np.int64)
    return kept, pa.array(bits, mask=bits == 0), moved_bytes


_PROTOCOLS = np.asarray(["none", "http", "db", "rpc", "grpc", "messaging"], dtype=object)


def _protocol(out, present, owner, code, code_of, n) -> pa.Array:
    """messaging > grpc/rpc > db > http > none (columns.protocol_of, for whole arrays)."""
    http = np.zeros(n, dtype=bool)
    is_http = np.zeros(len(code_of), dtype=bool)
    is_http[[code_of[k] for k in _HTTP_KEYS if k in code_of]] = True
    http[owner[is_http[code]]] = True
    grpc = np.asarray(pc.fill_null(pc.equal(out["rpc_system"], "grpc"), False))
    which = np.select(
        [present["messaging_system"], grpc, present["rpc_system"], present["db_system"], http],
        [5, 4, 3, 2, 1],
        0,
    )
    return pa.array(_PROTOCOLS[which], pa.string())


def _link_table(links: pa.ListArray, trace_hi, trace_lo, span_id) -> pa.Table:
    """span_links rows, parsed by upb: links are few (a few percent of spans carry one)."""
    raw = links.flatten()
    if len(raw) == 0:
        return LINK_SCHEMA.empty_table()
    owner = np.asarray(pc.list_parent_indices(links))
    rows = []
    for blob in raw.to_pylist():
        link = Span.Link.FromString(blob)
        if len(link.trace_id) != 16 or len(link.span_id) != 8:
            raise Unsupported("a link id of the wrong length")
        lt = int.from_bytes(link.trace_id, "big")
        rows.append(
            (
                lt >> 64,
                lt & (2**64 - 1),
                int.from_bytes(link.span_id, "big"),
                link.trace_state or None,
                link.flags,
                to_json(attributes(link.attributes)),
                link.dropped_attributes_count,
            )
        )
    lt_hi, lt_lo, ls, trace_state, flags, attrs, dropped = zip(*rows)
    data = {
        "trace_id_hi": trace_hi[owner],
        "trace_id_lo": trace_lo[owner],
        "span_id": span_id[owner],
        "link_trace_id_hi": np.asarray(lt_hi, dtype=np.uint64),
        "link_trace_id_lo": np.asarray(lt_lo, dtype=np.uint64),
        "link_span_id": np.asarray(ls, dtype=np.uint64),
        "trace_state": trace_state,
        "flags": flags,
        "attributes": attrs,
        "dropped_attributes_count": dropped,
    }
    return pa.Table.from_pydict(data, schema=LINK_SCHEMA)


_VARINT_STEPS = np.asarray([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)


def _varint_size(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x).astype(np.uint64)
    return 1 + np.searchsorted(_VARINT_STEPS, x.ravel(), side="right").reshape(x.shape)


def _element(lengths: np.ndarray) -> np.ndarray:
    """Bytes of a length-delimited field with a one-byte tag."""
    return 1 + _varint_size(lengths) + lengths


def _delimited(lengths: np.ndarray) -> np.ndarray:
    """The same for a singular field: 0 when empty (proto3 does not send it)."""
    return np.where(lengths > 0, _element(lengths), 0)


def _varint_field(values) -> np.ndarray:
    v = np.asarray(values).astype(np.int64).astype(np.uint64)  # negative int32: 10 bytes
    return np.where(v != 0, 1 + _varint_size(v), 0)


def _check_sizes(raw_spans: pa.Array, spans: pa.RecordBatch, rest: pa.Array, moved_bytes=0) -> None:
    """Every byte of every span is in a column or in otlp_rest, or the request goes to columns.py.

    A span's size is the sum of its fields' canonical encodings only when it has no unknown
    field, no field sent twice, no default value sent explicitly and no overlong varint: the
    cases where the columns could lose something the Python path keeps."""
    _, span_len = _offsets(raw_spans)
    size = _offsets(rest)[1].astype(np.int64) + moved_bytes  # attributes left out, in columns
    delimited = ("trace_id", "span_id", "parent_span_id", "name", "trace_state")
    size += _delimited(np.stack([_offsets(spans.column(name))[1] for name in delimited])).sum(axis=0)
    varints = ("kind", "dropped_attributes_count", "dropped_events_count", "dropped_links_count")
    size += _varint_field(np.stack([np.asarray(spans.column(name), dtype=np.int64) for name in varints])).sum(
        axis=0
    )
    fixed = np.stack(
        [np.asarray(spans.column(name)) != 0 for name in ("start_time_unix_nano", "end_time_unix_nano")]
    )
    size += 9 * fixed.sum(axis=0)
    size += np.where(np.asarray(spans.column("flags")) != 0, 6, 0)  # field 16: a 2-byte tag
    links = spans.column("links")
    raw_links = links.flatten()
    if len(raw_links):
        owner = np.asarray(pc.list_parent_indices(links))
        size += np.bincount(owner, weights=_element(_offsets(raw_links)[1]), minlength=len(size)).astype(
            np.int64
        )
    status = spans.column("status")
    message, code = status.flatten()
    inner = _delimited(np.asarray(pc.fill_null(pc.binary_length(message), 0))) + _varint_field(
        pc.fill_null(code, 0)
    )
    size += np.where(np.asarray(status.is_valid()), _element(inner), 0)
    if not np.array_equal(size, span_len):
        raise Unsupported("a span with unknown fields or a non-canonical encoding")
