"""Building OTLP export requests from other formats: ids, attribute values, and one request
per batch with spans grouped by resource and instrumentation scope.

Helpers raise `ValueError` with a message that says what is wrong; each converter adds the
position (which trace, which span) and turns it into `BadCapture`."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans

KIND = {"internal": 1, "server": 2, "client": 3, "producer": 4, "consumer": 5}  # OTLP Span.SpanKind
STATUS = {"unset": 0, "ok": 1, "error": 2}  # OTLP Status.StatusCode
ERROR = 2


def hex_id(value, digits: int, what: str) -> bytes:
    """A hex trace id (digits=32) or span id (16), left-padded: Jaeger writes 64-bit trace ids
    with 16 digits, and older versions drop leading zeros."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a hex string, not {type(value).__name__} {value!r:.40}")
    if not 0 < len(value) <= digits:
        raise ValueError(f"{what} {value!r:.50} is not an id of 1 to {digits} hex digits")
    try:
        raw = bytes.fromhex(value.rjust(digits, "0"))
    except ValueError:
        raise ValueError(f"{what} {value!r:.50} is not hex") from None
    if not any(raw):
        raise ValueError(f"{what} is all zeros (an invalid id)")
    return raw


def as_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise ValueError(f"{what} must be an integer, not {type(value).__name__} {value!r:.40}")


def micros(value, what: str) -> int:
    """A time or duration in microseconds -> nanoseconds (never negative). A fraction of a
    microsecond (a capture converted from another format) is kept to the nanosecond."""
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        whole = int(value)  # apart: value * 1000 would lose nanoseconds past 2**53
        ns = whole * 1000 + round((value - whole) * 1000)
    else:
        ns = as_int(value, what) * 1000
    if ns < 0:
        raise ValueError(f"{what} is negative ({value})")
    return ns


def set_value(av, value, what: str) -> None:
    """A JSON value into an OTLP AnyValue, by its JSON type."""
    if isinstance(value, str):
        av.string_value = value
    elif isinstance(value, bool):
        av.bool_value = value
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            av.string_value = str(value)
        else:
            av.int_value = value
    elif isinstance(value, float):
        av.double_value = value
    elif isinstance(value, list):
        arr = av.array_value
        for i, v in enumerate(value):
            set_value(arr.values.add(), v, f"{what}[{i}]")
    elif isinstance(value, dict):
        kvl = av.kvlist_value
        for k, v in value.items():
            kv = kvl.values.add(key=k)
            set_value(kv.value, v, f"{what}.{k}")
    elif value is not None:
        raise ValueError(f"{what} has an unsupported value {value!r:.40}")


def set_typed(av, typ, value, what: str) -> None:
    """A Jaeger tag value, by its declared type (string, bool, int64, float64, binary)."""
    if typ == "string" or typ is None or typ == "":
        if isinstance(value, str):
            av.string_value = value
        else:
            set_value(av, value, what)
    elif typ == "int64":
        av.int_value = as_int(value, what)
    elif typ == "bool":
        if isinstance(value, bool):
            av.bool_value = value
        elif value in ("true", "false"):
            av.bool_value = value == "true"
        else:
            raise ValueError(f"{what} must be a bool, not {value!r:.40}")
    elif typ == "float64":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            av.double_value = float(value)
        else:
            try:
                av.double_value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{what} must be a number, not {value!r:.40}") from None
    elif typ == "binary":
        try:
            av.bytes_value = base64.b64decode(value, validate=True)
        except (binascii.Error, TypeError, ValueError):
            set_value(av, value, what)  # not base64 after all: keep what was there
    else:
        raise ValueError(f"{what} has an unknown type {typ!r:.40}")


class RequestBuilder:
    """One `ExportTraceServiceRequest`; spans of the same resource and scope share a ScopeSpans."""

    def __init__(self, attributes: SpanAttributes | None = None):
        self.request = ExportTraceServiceRequest()
        self.attributes = attributes or SpanAttributes()  # shared between a file's requests
        self.spans = 0
        self._scopes: dict[tuple, ScopeSpans] = {}
        self._resources: dict[object, object] = {}

    def scope_spans(self, resource_key, fill_resource: Callable, scope: tuple[str, str] = ("", "")):
        """The ScopeSpans for (resource, scope); `fill_resource(resource)` runs on a new resource."""
        ss = self._scopes.get((resource_key, scope))
        if ss is None:
            rs = self._resources.get(resource_key)
            if rs is None:
                rs = self._resources[resource_key] = self.request.resource_spans.add()
                fill_resource(rs.resource)
            ss = self._scopes[(resource_key, scope)] = rs.scope_spans.add()
            if scope[0] or scope[1]:
                ss.scope.name, ss.scope.version = scope
        return ss

    def body(self) -> bytes:
        return self.request.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class SpanAttributes:
    """Jaeger tags as the bytes of `Span.attributes` entries, cached by (key, type, value).

    Captures repeat most tags (`component`, `http.method`, `span.kind`, the sampler's...), and
    building a KeyValue through the protobuf API costs more than the rest of a span; a cached
    entry costs a dict lookup. The span takes them all in one `MergeFromString`."""

    _FIELD = b"\x4a"  # Span.attributes: field 9, length-delimited

    def __init__(self, limit: int = 100_000):
        self.limit = limit
        self._cache: dict[tuple, bytes] = {}

    def entry(self, key, typ, value) -> bytes:
        ck = (key, typ, type(value), value)
        try:
            got = self._cache.get(ck)
        except TypeError:  # a list or an object as the value: not hashable, not cached
            return self._encode(key, typ, value)
        if got is None:
            got = self._encode(key, typ, value)
            if len(self._cache) >= self.limit:
                self._cache.clear()  # unique values (ids, URLs) would otherwise grow it without bound
            self._cache[ck] = got
        return got

    def _encode(self, key, typ, value) -> bytes:
        if not isinstance(key, str):
            raise ValueError(f"a tag's key must be a string, not {key!r:.40}")
        kv = KeyValue(key=key)
        set_typed(kv.value, typ, value, f"tag {key!r:.40}")
        raw = kv.SerializeToString()
        return self._FIELD + _varint(len(raw)) + raw
