"""Bytes on the wire -> an OTLP `ExportTraceServiceRequest`, and responses back.

Pure functions, shared by both transports. OTLP/JSON differs from protobuf's
canonical JSON mapping in one way that matters: trace and span ids are hex, not
base64 (OTLP spec, "JSON Protobuf Encoding"). Enums as integers and lowerCamelCase
names are what the canonical mapping already accepts.
"""

from __future__ import annotations

import base64
import json
import zlib

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from .otlp_lite import TracesData

PROTOBUF = "application/x-protobuf"
JSON = "application/json"


class BadRequest(ValueError):
    """The payload can never be accepted: the client must not retry it."""


class TooLarge(BadRequest):
    """The payload is over the configured maximum (before or after decompression)."""


def gunzip(body: bytes, max_bytes: int) -> bytes:
    """Decompress gzip, refusing output over `max_bytes` (guards against gzip bombs)."""
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, max_bytes + 1)
    except zlib.error as e:
        raise BadRequest(f"body is not valid gzip: {e}") from None
    if len(out) > max_bytes or d.unconsumed_tail:
        raise TooLarge(f"decompressed body exceeds the maximum of {max_bytes} bytes")
    if not d.eof:
        raise BadRequest("body is not valid gzip: truncated stream")
    return out


def decode_request(body: bytes, content_type: str):
    """Decode an export request into the ingest view (`otlp_lite.TracesData`)."""
    body = to_protobuf(body, content_type)
    traces = TracesData()
    try:
        traces.ParseFromString(body)
    except DecodeError as e:
        raise BadRequest(f"malformed OTLP protobuf: {e}") from None
    return traces


def to_protobuf(body: bytes, content_type: str) -> bytes:
    """The request as protobuf bytes (OTLP/JSON converted; not yet checked for well-formedness)."""
    if content_type == JSON:
        return _decode_json(body).SerializeToString()
    if content_type != PROTOBUF:
        raise ValueError(f"unsupported content type {content_type!r}")
    return body


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's parser would take NaN and Infinity


def _decode_json(body: bytes) -> ExportTraceServiceRequest:
    try:
        doc = json.loads(body, parse_constant=_not_json)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"malformed JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest("malformed OTLP/JSON: the top level must be an object")
    try:
        _hex_ids_to_base64(doc)
        return json_format.ParseDict(doc, ExportTraceServiceRequest(), ignore_unknown_fields=True)
    except (
        json_format.ParseError,
        AttributeError,
        TypeError,
        ValueError,
        RecursionError,
        OverflowError,
    ) as e:
        raise BadRequest(f"malformed OTLP/JSON: {e}") from None


_ID_KEYS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _hex_ids_to_base64(doc: dict) -> None:
    """Rewrite OTLP/JSON hex ids in place so the canonical JSON parser reads them as bytes."""
    for rs in _objects(doc, "resourceSpans", "resource_spans"):
        for ss in _objects(rs, "scopeSpans", "scope_spans"):
            for span in _objects(ss, "spans"):
                _convert_ids(span)
                for link in _objects(span, "links"):
                    _convert_ids(link)


def _objects(parent: dict, *keys: str) -> list[dict]:
    for key in keys:
        items = parent.get(key)
        if items is not None:
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise BadRequest(f"malformed OTLP/JSON: {key!r} must be a list of objects")
            return items
    return []


def _convert_ids(obj: dict) -> None:
    for key in _ID_KEYS:
        value = obj.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise BadRequest(f"malformed OTLP/JSON: {key} must be a hex string")
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise BadRequest(f"malformed OTLP/JSON: {key} {value[:40]!r} is not hex") from None
        obj[key] = base64.b64encode(raw).decode("ascii")


def encode_response(response: Message, content_type: str) -> bytes:
    """A response or a `google.rpc.Status`, in the request's encoding."""
    if content_type == JSON:
        return json_format.MessageToJson(response, indent=None).encode()
    return response.SerializeToString()


def response_for(rejected: int, message: str) -> ExportTraceServiceResponse:
    response = ExportTraceServiceResponse()
    if rejected or message:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = message
    return response
