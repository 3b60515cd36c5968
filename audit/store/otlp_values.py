"""OTLP attribute values as plain Python/JSON values, for ingest and for readers."""

from __future__ import annotations

import base64
import json
import math

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
