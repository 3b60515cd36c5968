"""OTLP attribute values to plain Python/JSON values (for ingest and readers), and back (for
the simulator, benchmarks and tests)."""

from __future__ import annotations

import base64
import json
import math

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def any_value(value):
    """An OTLP AnyValue as a plain JSON-able Python value (bytes as base64, as OTLP/JSON does)."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    if which == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    return getattr(value, which)


def attributes(kvs) -> dict:
    """Repeated OTLP KeyValue -> dict."""
    return {kv.key: any_value(kv.value) for kv in kvs}


def to_json(value: dict | list) -> str | None:
    """Compact JSON, or None when empty; NaN and infinities become strings (JSON has none)."""
    if not value:
        return None
    try:
        return _json(value)
    except ValueError:
        return _json(_finite(value))


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def to_any_value(value) -> AnyValue:
    """A Python value as an OTLP AnyValue: str, bool, int, float, bytes, list or dict."""
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, list):
        v = AnyValue()
        v.array_value.values.extend(to_any_value(x) for x in value)
        return v
    if isinstance(value, dict):
        v = AnyValue()
        v.kvlist_value.values.extend(to_key_value(k, x) for k, x in value.items())
        return v
    return AnyValue(string_value=str(value))


def to_key_value(key: str, value) -> KeyValue:
    return KeyValue(key=key, value=to_any_value(value))
