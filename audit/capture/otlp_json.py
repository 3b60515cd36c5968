"""OTLP/JSON lines, as the Collector's file exporter writes them: one `ExportTraceServiceRequest`
per line. Each line is passed on as it is, to be decoded by the receivers' own OTLP/JSON decoder
(hex ids, enums as integers or names), exactly as a request to `POST /v1/traces` would be. The
file is read a line at a time, so its size does not matter."""

from __future__ import annotations

from collections.abc import Iterator

from .source import JSON, Payload


def payloads(stream, batch_spans: int) -> Iterator[Payload]:
    for n, line in enumerate(stream.lines(), start=1):
        if line.strip():
            yield Payload(line, JSON, f"line {n}")
