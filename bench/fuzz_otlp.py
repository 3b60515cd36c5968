"""Coverage-guided fuzzing of the OTLP decoders with atheris (libFuzzer), by hand:

    python -m bench.fuzz_otlp -max_total_time=3600 [corpus_dir]

Each input's first byte picks the content type (protobuf or JSON) and whether it is gzipped;
the rest is the body. Decoding must give a batch the writer can append, or a BadRequest
(which the receivers answer with 400 / INVALID_ARGUMENT); anything else is a crash, and
libFuzzer saves the input. The test suite runs it for a bounded time (tests/test_http_fuzz.py).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from collector_ext.decode import JSON, PROTOBUF, BadRequest
    from collector_ext.ingest import decode_batch

from audit.store.batch import SPAN_SCHEMA  # noqa: E402


def one_input(data: bytes) -> None:
    if not data:
        return
    content_type = JSON if data[0] & 1 else PROTOBUF
    try:
        batch = decode_batch(data[1:], content_type, bool(data[0] & 2), 1 << 20)
    except BadRequest:
        return
    assert batch.spans.schema.names == SPAN_SCHEMA.names


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
