"""Request bytes -> `SpanBatch`: the vectorised converter (arrow_columns.py) when it is installed
and takes the request, the Python one (columns.py) otherwise.

upb parses every request first: it alone decides what is malformed, so both paths accept and
refuse the same requests with the same messages. `CTXAUDIT_DECODER=python` turns the
vectorised path off (`auto`, the default, uses it when `ptars` is installed, for requests of
at least `arrow_columns.MIN_SPANS` spans: below that Python is cheaper).
"""

from __future__ import annotations

import logging
import os

from audit.store.batch import SpanBatch

from . import arrow_columns, columns
from .decode import PROTOBUF, decode_request, to_protobuf

DECODER_ENV = "CTXAUDIT_DECODER"
MODES = ("auto", "python")
log = logging.getLogger(__name__)

# Requests converted by each path in this process (the vectorised one hands some over).
counts = {"arrow": 0, "python": 0, "fallback": 0}


def decoder_mode() -> str:
    mode = os.environ.get(DECODER_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{DECODER_ENV} must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def to_span_batch(body: bytes, content_type: str, mode: str | None = None) -> SpanBatch:
    """Decode and convert one export request; `mode` overrides $CTXAUDIT_DECODER."""
    wire = to_protobuf(body, content_type)
    traces = decode_request(wire, PROTOBUF)  # raises BadRequest for what is malformed
    if (
        (mode or decoder_mode()) == "auto"
        and arrow_columns.available()
        and _span_count(traces) >= arrow_columns.MIN_SPANS
    ):
        try:
            batch = arrow_columns.to_span_batch(wire)
        except arrow_columns.Unsupported as why:
            counts["fallback"] += 1
            log.debug("request converted in Python: %s", why)
        else:
            counts["arrow"] += 1
            return batch
    counts["python"] += 1
    return columns.to_span_batch(traces)


def _span_count(traces) -> int:
    return sum(len(ss.spans) for rs in traces.resource_spans for ss in rs.scope_spans)
