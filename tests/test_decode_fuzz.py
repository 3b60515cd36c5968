"""Whatever the bytes, decoding either yields a batch or a BadRequest: never another exception."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit.store.batch import SPAN_SCHEMA
from collector_ext.decode import JSON, PROTOBUF, BadRequest
from collector_ext.ingest import decode_batch
from tests.otlp_builders import request, span

_rng = random.Random(7)
VALID = request(
    [
        span(_rng.randbytes(16), _rng.randbytes(8), attrs={"server.address": "a", "n": [1, {"k": b"x"}]})
        for _ in range(3)
    ]
).SerializeToString()


def decodes_or_refuses(body: bytes, content_type: str, gzipped: bool = False) -> None:
    try:
        batch = decode_batch(body, content_type, gzipped, 1 << 20)
    except BadRequest:
        return
    assert batch.spans.schema.names == SPAN_SCHEMA.names  # a batch the writer can append


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048), st.sampled_from([PROTOBUF, JSON]), st.booleans())
def test_random_bytes(body, content_type, gzipped):
    decodes_or_refuses(body, content_type, gzipped)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_valid_requests(flips):
    body = bytearray(VALID)
    for i, b in flips:
        body[i] = b
    decodes_or_refuses(bytes(body), PROTOBUF)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=30,
)


@pytest.mark.slow
@settings(max_examples=300)
@given(json_values)
def test_arbitrary_json_shapes(value):
    import json

    for doc in (value, {"resourceSpans": value}, {"resourceSpans": [{"scopeSpans": [{"spans": [value]}]}]}):
        try:
            body = json.dumps(doc).encode()
        except ValueError:
            continue
        decodes_or_refuses(body, JSON)
