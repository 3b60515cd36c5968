"""`otlp_rest` without the attributes that a column holds exactly (issue 19, slimmer rows).

The loader's DuckDB insert costs by the byte, and the audit keys (`http.route`, `url.path`,
`server.address`, ...) were stored twice: in their columns and in `otlp_rest`. The decoders now
leave an attribute out of `otlp_rest` when its column gives it back exactly (the key is the one
the column was read from, the value has the column's type and is equal, and the attribute is
encoded canonically), and set its bit in `attributes_in_columns`. This module says which
attributes may be left out, and puts them back: in Python (`restore`), and in SQL for the view
`spans_full` (`restore_sql`, migration 0006), so every reader of `spans_full.otlp_rest` (the trace
view, the Parquet export) sees the span as before. The attributes put back come after the others:
attribute order is not kept (it was not before either).
"""

from __future__ import annotations

from google.protobuf.internal.encoder import _VarintBytes
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

STRING, INT = "string", "int"

# (attribute key, column, value type). Bit i of `attributes_in_columns` is entry i, and stored
# files carry those bits: append only, never reorder. The view spans_full rebuilds the first
# VIEW_ATTRIBUTES entries (migration 0006): an entry appended later needs a migration that
# redefines the view, and VIEW_ATTRIBUTES must stay what that view was made with.
COLUMN_ATTRIBUTES: tuple[tuple[str, str, str], ...] = (
    ("http.request.method", "http_method", STRING),
    ("http.method", "http_method", STRING),
    ("http.route", "http_route", STRING),
    ("url.path", "url_path", STRING),
    ("http.target", "url_path", STRING),  # only when it has no query (the column drops it)
    ("url.full", "url_full", STRING),
    ("http.url", "url_full", STRING),
    ("server.address", "server_address", STRING),
    ("net.peer.name", "server_address", STRING),
    ("server.port", "server_port", INT),
    ("net.peer.port", "server_port", INT),
    ("http.response.status_code", "http_status_code", INT),
    ("http.status_code", "http_status_code", INT),
    ("peer.service", "peer_service", STRING),
    ("messaging.system", "messaging_system", STRING),
    ("messaging.destination.name", "messaging_destination", STRING),
    ("messaging.message.id", "messaging_message_id", STRING),
    ("rpc.system", "rpc_system", STRING),
    ("rpc.service", "rpc_service", STRING),
    ("rpc.method", "rpc_method", STRING),
    ("db.system.name", "db_system", STRING),
    ("db.system", "db_system", STRING),
)
VIEW_ATTRIBUTES = 22
BIT_OF = {key: i for i, (key, _, _) in enumerate(COLUMN_ATTRIBUTES)}
INT_MAX = 2**31  # ints left out: 0 < value < INT_MAX (int32 columns; the view's varints)


def max_string_bytes(key: str) -> int:
    """The longest string value (UTF-8 bytes) left out for `key`: every length in the attribute's
    encoding then fits one varint byte, which keeps the view's SQL simple and cheap."""
    return 121 - len(key.encode())


def string_kv_size(key_len, value_len):
    """Bytes of a canonical KeyValue with a string value, when every length is under 128."""
    return key_len + 6 + value_len


def varint_size(v: int) -> int:
    return len(_VarintBytes(v))


def _element(key: str, value, kind: str) -> bytes:
    """A Span `attributes` field (number 9) holding KeyValue(key, value)."""
    any_value = AnyValue(string_value=value) if kind == STRING else AnyValue(int_value=value)
    kv = KeyValue(key=key, value=any_value).SerializeToString()
    return b"\x4a" + _VarintBytes(len(kv)) + kv


def restore(rest: bytes, moved: int | None, columns) -> bytes:
    """The `otlp_rest` as it was before its attributes in columns were left out: `moved` is the
    span's `attributes_in_columns`, `columns` maps column names to the span's values."""
    if not moved:
        return rest
    out = [rest]
    for bit, (key, column, kind) in enumerate(COLUMN_ATTRIBUTES):
        if moved >> bit & 1:
            out.append(_element(key, columns[column], kind))
    return b"".join(out)


def _string_sql(key: str, column: str) -> str:
    # every length fits one varint byte (max_string_bytes), so the element is text: the tags and
    # lengths as chr(), the key and the value as they are
    n = f"strlen({column})::INTEGER"
    k = len(key.encode())
    return (
        f"encode(concat(chr(74), chr({k + 6} + {n}), chr(10), chr({k}), '{key}', chr(18), "
        f"chr(2 + {n}), chr(10), chr({n}), {column}))"
    )


def _int_sql(key: str, column: str) -> str:
    kb = key.encode()

    def head(size: int) -> str:  # the element up to the value's varint of `size` bytes
        return (bytes([0x4A, len(kb) + 5 + size, 0x0A, len(kb)]) + kb + bytes([0x12, 1 + size, 0x18])).hex()

    v = f"{column}::BIGINT"
    # a varint of up to 5 bytes as one integer whose big-endian hex digits are its bytes
    groups = [f"(({v} >> {7 * i}) & 127)" for i in range(5)]
    cases = [f"WHEN {v} < 128 THEN '{head(1)}' || lpad(hex({v}), 2, '0')"]
    for size in range(2, 6):
        parts = [f"(({groups[i]} | 128) << {8 * (size - 1 - i)})" for i in range(size - 1)]
        parts.append(f"({v} >> {7 * (size - 1)})")
        value = f"'{head(size)}' || hex({' | '.join(parts)})"
        cases.append(f"WHEN {v} < {1 << (7 * size)} THEN {value}" if size < 5 else f"ELSE {value}")
    return f"unhex(CASE {' '.join(cases)} END)"


def restore_sql(rest: str, moved: str, column=lambda name: name, count: int = VIEW_ATTRIBUTES) -> str:
    """SQL for `restore`: `rest` and `moved` are the two columns' expressions, `column(name)` a
    column's; the first `count` entries of COLUMN_ATTRIBUTES are rebuilt."""
    parts = []
    for bit, (key, name, kind) in enumerate(COLUMN_ATTRIBUTES[:count]):
        element = (_string_sql if kind == STRING else _int_sql)(key, column(name))
        parts.append(f"CASE WHEN {moved} & {1 << bit} <> 0 THEN {element} ELSE ''::BLOB END")
    return f"CASE WHEN coalesce({moved}, 0) = 0 THEN {rest} ELSE {rest} || {' || '.join(parts)} END"
