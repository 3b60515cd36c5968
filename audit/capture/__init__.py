"""Trace captures users already have (Jaeger JSON, Zipkin v2 JSON, OTLP/JSON lines) as OTLP
export requests, so that `ctxaudit import` stores them through the receivers' own path.

Pure conversion: a readable binary stream in, `Payload`s out. Nothing here opens the store.
"""

from __future__ import annotations

from .source import FORMATS, BadCapture, Payload, open_capture

__all__ = ["FORMATS", "BadCapture", "Payload", "open_capture"]
