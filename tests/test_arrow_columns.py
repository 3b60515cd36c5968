"""The vectorised decoder (collector_ext/arrow_columns.py) against the Python one (columns.py):
the same requests, both paths, every column compared. Also what it hands over to columns.py,
and the worker's hand-off of batches as Arrow IPC."""

from __future__ import annotations

import itertools
import json
import random
import subprocess

import pytest
from google.protobuf import descriptor_pool, message_factory
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from audit.scenarios.model import load_scenario
from audit.scenarios.simulate import Simulator
from audit.store.rest import max_string_bytes, restore
from bench.payloads import build_request
from collector_ext import arrow_columns, decoder, worker
from collector_ext.decode import JSON, PROTOBUF
from tests.otlp_builders import kv, request, span, spans
from tests.test_columns import ALL_TYPES, S1, S2, T1

pytestmark = pytest.mark.skipif(not arrow_columns.available(), reason="ptars is not installed")


@pytest.fixture(autouse=True)
def any_size(monkeypatch):
    """Small requests take the Python path in production (cheaper); here both paths see all."""
    monkeypatch.setattr(arrow_columns, "MIN_SPANS", 0)


LiteSpan = message_factory.GetMessageClass(
    descriptor_pool.Default().FindMessageTypeByName("ctxaudit.otlp_lite.trace.v1.Span")
)


def both(body: bytes, content_type: str = PROTOBUF) -> str:
    """Convert with both paths, assert the batches are the same; return the path auto took."""
    python = decoder.to_span_batch(body, content_type, "python")
    before = dict(decoder.counts)
    auto = decoder.to_span_batch(body, content_type, "auto")
    took = "arrow" if decoder.counts["arrow"] > before["arrow"] else "fallback"
    assert (auto.rejected, auto.rejection_reasons, auto.end_before_start) == (
        python.rejected,
        python.rejection_reasons,
        python.end_before_start,
    )
    assert auto.spans.column_names == python.spans.column_names
    for name in python.spans.column_names:
        a, p = auto.spans.column(name), python.spans.column(name)
        if name == "otlp_rest":  # attribute order differs (map view): compare what they hold
            assert [LiteSpan.FromString(x) for x in a.to_pylist()] == [
                LiteSpan.FromString(x) for x in p.to_pylist()
            ]
            for x, y in zip(a.to_pylist(), p.to_pylist()):
                sx, sy = Span.FromString(x), Span.FromString(y)
                assert {kv.key: kv.value for kv in sx.attributes} == {
                    kv.key: kv.value for kv in sy.attributes
                }
                assert list(sx.events) == list(sy.events)
            continue
        assert a.type == p.type, name
        assert a.equals(p), (name, a.to_pylist()[:3], p.to_pylist()[:3])
    assert auto.links.equals(python.links)
    return took


def test_realistic_requests_take_the_vectorised_path_and_match():
    rng = random.Random(7)
    for spans_per_request in (1, 10, 1000):
        body = build_request(rng, spans_per_request).SerializeToString()
        assert both(body) == "arrow"


def test_simulator_requests_match():
    sim = Simulator(load_scenario("shop-small"), seed=1)
    paths = [both(req.SerializeToString()) for req, _ in itertools.islice(sim.run(), 25)]
    assert paths and set(paths) == {"arrow"}  # links, messaging, rpc, db spans: vectorised too


def test_builder_requests_match():
    rng = random.Random(3)
    assert both(request(spans(50, rng)).SerializeToString()) == "arrow"
    assert both(request([]).SerializeToString()) == "arrow"
    assert both(b"") == "arrow"


def test_every_field_and_attribute_type_matches():
    sent = span(
        T1,
        S1,
        S2,
        name="GET /x",
        kind=3,
        start=5,
        end=9,
        attrs=ALL_TYPES,
        trace_state="ot=th:8",
        flags=0x301,
        dropped_attributes_count=2,
        dropped_events_count=3,
        dropped_links_count=4,
    )
    sent.status.code, sent.status.message = 2, "boom"
    ev = sent.events.add(time_unix_nano=7, name="exception", dropped_attributes_count=1)
    ev.attributes.append(kv("exception.type", "ValueError"))
    link = sent.links.add(trace_id=b"\x05" * 16, span_id=b"\x06" * 8, trace_state="k=v", flags=1)
    link.attributes.append(kv("why", "batch"))
    req = request([sent, span(T1, b"\x09" * 8, kind=7), span(T1, b"\x0a" * 8, kind=-1)])
    rs = req.resource_spans[0]
    rs.schema_url = "https://opentelemetry.io/schemas/1.26.0"
    rs.resource.attributes.append(kv("host.name", "h1"))
    rs.resource.dropped_attributes_count = 5
    scope = rs.scope_spans[0].scope
    scope.name, scope.version = "lib", "2.0"
    scope.attributes.append(kv("s", [1, "x"]))
    rs.scope_spans[0].schema_url = "https://s"
    other = req.resource_spans.add()  # no resource at all, two scopes, one of them empty
    other.scope_spans.add()
    other.scope_spans.add().spans.append(span(T1, b"\x0b" * 8, start=10, end=5))
    assert both(req.SerializeToString()) == "arrow"
    assert both(json_body(req), JSON) == "arrow"


def json_body(req) -> bytes:
    from google.protobuf import json_format

    doc = json_format.MessageToDict(req)
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for s in ss.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in s:
                        s[key] = __import__("base64").b64decode(s[key]).hex()
                for link in s.get("links", []):
                    for key in ("traceId", "spanId"):
                        link[key] = __import__("base64").b64decode(link[key]).hex()
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "trace_state",
    [
        "ot=th:c",
        "ot=th:8;rv:0123456789abcd",
        "a=b,ot=th:0",
        "ot=th:zz",
        "ot=rv:short;th:8",
        "ot=th:123456789abcdef",
        "ot=th",
        "vendor=x",
        " ot=th:4 , b=c",
    ],
)
def test_tracestate_sampling_fields_match(trace_state):
    req = request(
        [span(T1, S1, trace_state=trace_state), span(T1, S2), span(T1, b"\x05" * 8, trace_state="ot=th:c")]
    )
    assert both(req.SerializeToString()) == "arrow"


AUDIT_KEYS = sorted({k for _, _, keys in arrow_columns.DERIVED for k in keys})
VALUES = [
    "text",
    "",
    "/a/b?q=1",
    "/c?",
    "8080",
    " 81 ",
    0,
    443,
    -7,
    2**31,
    -(2**31),
    2**40,
    True,
    False,
    0.5,
    float("nan"),
    b"\x00\xff",
    b"123",
    ["a", 1],
    {"k": "v"},
    [],
]


def test_audit_attributes_of_every_type_match():
    """Random audit keys with values of every type, current and legacy keys together."""
    rng = random.Random(11)
    paths = []
    for r in range(60):
        sent = []
        for i in range(20):
            keys = rng.sample(AUDIT_KEYS, rng.randrange(0, 6))
            # odd requests: only what the vectorised path converts itself (or skips, as Python does)
            attrs = {k: rng.choice(VALUES if r % 2 == 0 else vectorised_values(k)) for k in keys}
            sent.append(span(T1, (i + 1).to_bytes(8, "big"), attrs=attrs))
        # a value-less attribute (no AnyValue at all), and an empty AnyValue
        s = span(T1, b"\x55" * 8)
        s.attributes.add(key="server.address")
        s.attributes.add(key="net.peer.name").value.SetInParent()
        s.attributes.append(kv("net.host.name", "fallback"))
        sent.append(s)
        paths.append(both(request(sent).SerializeToString()))
    assert "arrow" in paths and "fallback" in paths


INT_KEYS = {
    k
    for _, conv, keys in arrow_columns.DERIVED
    for k in keys
    if conv in (arrow_columns._as_int, arrow_columns._as_int32)
}


def vectorised_values(key: str) -> list:
    if key in INT_KEYS:  # ints are converted; bools, doubles, lists and maps are skipped
        return [0, 443, -7, 2**31, -(2**31), 2**40, True, 0.5, float("nan"), ["a"], {"k": 1}, []]
    return ["text", "", "/a/b?q=1", "/c?", "a?b?c", 0, -7, 2**40, True, False]


def only_strings_and_ints():
    rng = random.Random(5)
    sent = []
    for i in range(200):
        values = ["a", "", "/p?q", 0, 1, -1, 2**31 - 1, 2**31, 2**63 - 1, True, False]
        attrs = {k: rng.choice(values) for k in rng.sample(AUDIT_KEYS, rng.randrange(0, 8))}
        if any(isinstance(v, str) for k, v in attrs.items() if k.endswith(("port", "status_code", "offset"))):
            attrs = {}  # a string port is converted by int() in Python: a fallback, tested elsewhere
        sent.append(span(T1, (i + 1).to_bytes(8, "big"), attrs=attrs))
    return request(sent)


def test_strings_ints_and_bools_on_audit_keys_stay_vectorised():
    assert both(only_strings_and_ints().SerializeToString()) == "arrow"


def test_invalid_ids_are_left_to_the_python_path():
    bad_link = span(T1, b"\x07" * 8)
    bad_link.links.add(trace_id=b"\x01" * 3, span_id=b"\x02" * 8)
    cases = [
        [span(T1, S1), span(b"\x01" * 15, S2)],
        [span(bytes(16), S2)],
        [span(T1, b"\x01" * 9)],
        [span(T1, bytes(8))],
        [span(T1, b"\x03" * 8, b"\x04" * 4)],
        [bad_link, span(T1, b"\x08" * 8)],
    ]
    for sent in cases:
        body = request(sent).SerializeToString()
        with pytest.raises(arrow_columns.Unsupported):
            arrow_columns.to_span_batch(body)
        assert both(body) == "fallback"


def _field(number: int, payload: bytes) -> bytes:
    key, length = number << 3 | 2, len(payload)
    return _varint(key) + _varint(length) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def raw_request(*span_bytes: bytes) -> bytes:
    """ExportTraceServiceRequest bytes around spans given as bytes (encodings a builder won't make)."""
    scope_spans = b"".join(_field(2, s) for s in span_bytes)
    return _field(1, _field(2, scope_spans))


@pytest.mark.parametrize(
    "extra",
    [
        b"\xa0\x06\x01",  # an unknown field (100, varint): kept in otlp_rest by the Python path
        b"\x30\x00",  # kind = 0 sent explicitly
        b"\x2a\x01x",  # name sent twice: the last wins
        b"\x30\x82\x00",  # kind = 2 as an overlong varint
    ],
)
def test_spans_that_are_not_canonically_encoded_are_left_to_the_python_path(extra):
    good = span(T1, S2, attrs={"http.route": "/r"}).SerializeToString()
    body = raw_request(good, span(T1, S1, name="n", attrs={"a": 1}).SerializeToString() + extra)
    with pytest.raises(arrow_columns.Unsupported):
        arrow_columns.to_span_batch(body)
    assert both(body) == "fallback"
    assert both(raw_request(good)) == "arrow"


def test_attributes_left_out_of_otlp_rest_match():
    """What a column gives back exactly is left out of otlp_rest the same way by both paths; an
    audit attribute encoded with something more (an unknown field in its value), or too long for
    the view's one-byte lengths, stays in it."""
    odd_value = _field(1, b"http.route") + _field(2, _field(1, b"/r") + b"\xa0\x06\x01")
    long_url = "https://x/" + "a" * max_string_bytes("url.full")
    attrs = {"url.full": long_url, "server.address": "a", "server.port": 8080, "http.target": "/t?q"}
    body = raw_request(
        span(T1, S1, attrs=attrs).SerializeToString() + _field(9, odd_value),
        span(
            T1, S2, attrs={"http.route": "/r", "url.path": "/p", "http.status_code": 500}
        ).SerializeToString(),
    )
    assert both(body) == "arrow"
    rows = arrow_columns.to_span_batch(body).spans.to_pylist()
    kept = [{a.key for a in Span.FromString(r["otlp_rest"]).attributes} for r in rows]
    assert kept == [{"url.full", "http.route", "http.target"}, set()]
    restored = Span.FromString(restore(rows[0]["otlp_rest"], rows[0]["attributes_in_columns"], rows[0]))
    assert {a.key for a in restored.attributes} == set(attrs) | {"http.route"}


def test_duplicated_attribute_keys_are_left_to_the_python_path():
    s = span(T1, S1, attrs={"server.address": "a"})
    s.attributes.append(kv("server.address", "b"))  # OTLP forbids it; the map view keeps the last
    body = request([s]).SerializeToString()
    with pytest.raises(arrow_columns.Unsupported):
        arrow_columns.to_span_batch(body)
    assert both(body) == "fallback"


def test_malformed_requests_are_refused_the_same_way():
    from collector_ext.decode import BadRequest

    bad_utf8 = raw_request(span(T1, S1).SerializeToString() + b"\x2a\x02\xff\xfe")
    for body in (b"\x0a\xff\xff\xff\xff\x0f", bad_utf8):
        for mode in ("python", "auto"):
            with pytest.raises(BadRequest):
                decoder.to_span_batch(body, PROTOBUF, mode)


def test_small_requests_take_the_python_path(monkeypatch):
    monkeypatch.setattr(arrow_columns, "MIN_SPANS", 300)
    rng = random.Random(4)
    before = dict(decoder.counts)
    decoder.to_span_batch(build_request(rng, 299).SerializeToString(), PROTOBUF)
    assert decoder.counts["python"] == before["python"] + 1
    decoder.to_span_batch(build_request(rng, 300).SerializeToString(), PROTOBUF)
    assert decoder.counts["arrow"] == before["arrow"] + 1


def test_without_ptars_the_python_path_serves(monkeypatch):
    monkeypatch.setattr(arrow_columns, "ptars", None)
    before = decoder.counts["python"]
    decoder.to_span_batch(request([span(T1, S1)]).SerializeToString(), PROTOBUF)
    assert decoder.counts["python"] == before + 1


def test_the_environment_chooses_the_path(monkeypatch):
    body = request([span(T1, S1)]).SerializeToString()
    monkeypatch.setenv(decoder.DECODER_ENV, "python")
    before = dict(decoder.counts)
    decoder.to_span_batch(body, PROTOBUF)
    assert decoder.counts["python"] == before["python"] + 1 and decoder.counts["arrow"] == before["arrow"]
    monkeypatch.setenv(decoder.DECODER_ENV, "auto")
    decoder.to_span_batch(body, PROTOBUF)
    assert decoder.counts["arrow"] == before["arrow"] + 1
    monkeypatch.setenv(decoder.DECODER_ENV, "fast")
    with pytest.raises(ValueError, match="CTXAUDIT_DECODER"):
        decoder.to_span_batch(body, PROTOBUF)


@pytest.mark.parametrize("through_file", [True, False])
def test_a_shipped_batch_comes_back_whole(tmp_path, through_file):
    rng = random.Random(2)
    batch = decoder.to_span_batch(build_request(rng, 300).SerializeToString(), PROTOBUF)
    assert batch.links.num_rows > 0
    batch.rejected, batch.rejection_reasons, batch.end_before_start = 2, {"why": 2}, 1
    shipped = worker.ship(batch, str(tmp_path) if through_file else None)
    assert (shipped.path is not None) == through_file
    back = worker.receive(shipped)
    assert list(tmp_path.iterdir()) == []  # the server unlinks the file as it maps it
    assert back.spans.equals(batch.spans) and back.links.equals(batch.links)
    assert (back.rejected, back.rejection_reasons, back.end_before_start) == (2, {"why": 2}, 1)


def test_a_batch_without_links_and_an_empty_batch_come_back(tmp_path):
    for body in (request([span(T1, S1)]).SerializeToString(), b""):
        batch = decoder.to_span_batch(body, PROTOBUF)
        back = worker.receive(worker.ship(batch, str(tmp_path)))
        assert back.spans.equals(batch.spans) and back.links.equals(batch.links)


def test_sweep_removes_only_files_whose_worker_or_server_is_gone(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    import os

    me, parent = os.getpid(), os.getppid()
    names = {
        "dead_worker": f"ctxaudit-batch-{me}-{gone.pid}-0",
        "dead_server": f"ctxaudit-batch-{gone.pid}-{me}-0",
        "alive": f"ctxaudit-batch-{parent}-{me}-0",
        "other": "someone-else",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    assert worker.sweep(str(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["alive"], names["other"]])
