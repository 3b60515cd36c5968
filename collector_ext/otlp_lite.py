"""A wire-compatible view of the OTLP trace protos, tuned for ingest.

`Span.attributes` is declared `repeated KeyValue` in OTLP; a protobuf
`map<string, AnyValue>` has exactly the same wire encoding (map entries are
messages with key = 1, value = 2). Parsing into this view lets the ingest path look
up the few attributes it needs in C instead of iterating every KeyValue in Python,
about three times faster on realistic spans (bench/ingest.py, docs/performance.md).
The messages are built at import from the official descriptors, so they follow
whatever `opentelemetry-proto` version is installed.

Caveat of a map: a duplicated attribute key keeps its last value (OTLP already
requires keys to be unique) and serialization does not keep attribute order.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from opentelemetry.proto.trace.v1 import trace_pb2

_OFFICIAL = ".opentelemetry.proto.trace.v1."
_PACKAGE = "ctxaudit.otlp_lite.trace.v1"


def _build_file() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto()
    trace_pb2.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = "ctxaudit/otlp_lite/trace.proto"
    fdp.package = _PACKAGE
    for message in fdp.message_type:
        for f in message.field:
            if f.type_name.startswith(_OFFICIAL):
                f.type_name = f".{_PACKAGE}." + f.type_name[len(_OFFICIAL) :]
    span = next(m for m in fdp.message_type if m.name == "Span")
    entry = span.nested_type.add(name="AttributesEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=1, type=9)  # optional string
    entry.field.add(
        name="value",
        number=2,
        label=1,
        type=11,  # optional message
        type_name=".opentelemetry.proto.common.v1.AnyValue",
    )
    attributes = next(f for f in span.field if f.name == "attributes")
    attributes.type_name = f".{_PACKAGE}.Span.AttributesEntry"
    return fdp


def _load():
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName("ctxaudit/otlp_lite/trace.proto")
    except KeyError:
        pool.Add(_build_file())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.TracesData"))


# `TracesData.resource_spans` is field 1, like `ExportTraceServiceRequest.resource_spans`,
# so an export request's bytes parse as TracesData.
TracesData = _load()
