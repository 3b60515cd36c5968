"""Which format a capture is in, from its first bytes: a JSON list is Zipkin v2 (unless it holds
Jaeger traces); an object
whose first key is `resourceSpans` starts OTLP/JSON lines; `data` (or a single trace's
`traceID`, `spans`, `processes`) is Jaeger's query API answer."""

from __future__ import annotations

import re

from .source import BadCapture

_FIRST_KEY = re.compile(rb'\{\s*"([^"\\]{0,64})"')
_OTLP_KEYS = {b"resourceSpans", b"resource_spans"}
_JAEGER_KEYS = {b"data", b"traceID", b"spans", b"processes", b"total", b"limit", b"offset", b"errors"}


def detect(head: bytes) -> str:
    """`jaeger`, `zipkin` or `otlp-json`, from up to the first 64 KiB (decompressed)."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text:
        raise BadCapture("", "the file is empty")
    if text[:1] == b"[":  # Zipkin's spans; or Jaeger traces in a bare list (they have operationName)
        return "jaeger" if b'"operationName"' in text and b'"traceId"' not in text else "zipkin"
    if text[:1] == b"{":
        m = _FIRST_KEY.match(text)
        key = m.group(1) if m else b""
        if key in _OTLP_KEYS:
            return "otlp-json"
        if key in _JAEGER_KEYS:
            return "jaeger"
        if b'"resourceSpans"' in text or b'"resource_spans"' in text:
            return "otlp-json"
        if b'"operationName"' in text or b'"processes"' in text:
            return "jaeger"
    raise BadCapture(
        "start",
        "cannot tell the format (not Jaeger JSON, Zipkin v2 JSON or OTLP/JSON lines); "
        "pass --format if it is one of them",
    )
