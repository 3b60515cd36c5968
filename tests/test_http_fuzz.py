"""The OTLP/HTTP handler under arbitrary requests (Hypothesis): any method, path, headers and
body get an answer below 500, the one the OTLP/HTTP spec asks for, and the server keeps storing
good requests. Longer by hand: `python -m bench.fuzz_otlp` (atheris, libFuzzer) on the decoders."""

import gzip
import http.client
import importlib.util
import os
import random
import subprocess
import sys
from urllib.parse import urlparse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector_ext.decode import BadRequest, TooLarge
from collector_ext.ingest import decode_batch
from tests.otlp_builders import request, spans

pytestmark = pytest.mark.slow  # a `ctxaudit serve` process; atheris

PB, JS = "application/x-protobuf", "application/json"
GOOD = request(spans(3, random.Random(3))).SerializeToString()
MAX_BODY = 1 << 20  # the server's --max-body-mib 1


def expected_status(method: str, path: str, headers: dict, body: bytes) -> int | None:
    """The answer the OTLP/HTTP spec asks for; None where any 4xx will do (no such resource or
    method). A media type may carry parameters and is case-insensitive (RFC 9110 8.3.1), so is a
    content coding; an unsupported one is a 415; a body that does not decode is a 400, and an
    empty export request is a valid one."""
    if method != "POST" or path.split("?")[0] != "/v1/traces":
        return None
    media_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media_type not in (PB, JS):
        return 415
    coding = headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("gzip", "identity", ""):
        return 415  # "gzip, gzip" included: stacked codings are not supported
    try:
        decode_batch(body, media_type, coding == "gzip", MAX_BODY)
    except TooLarge:
        return 413
    except BadRequest:
        return 400
    return 200


def _send(url: str, method: str, path: str, headers: dict, body: bytes) -> int:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


bodies = st.one_of(
    st.binary(max_size=4096),
    st.just(GOOD),
    st.binary(max_size=64).map(lambda b: GOOD[: len(GOOD) // 2] + b),  # truncated, then noise
    st.binary(max_size=2048).map(gzip.compress),
    st.text(max_size=512).map(str.encode),
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "Content-Type": st.sampled_from(
            [
                PB,
                JS,
                "text/plain",
                "application/x-protobuf; charset=utf-8",
                "",
                "*/*",
                "application/json; x=" + "y" * 200,
            ]
        ),
        "Content-Encoding": st.sampled_from(["gzip", "identity", "br", "GZIP", "gzip, gzip", ""]),
        "Authorization": st.text(max_size=40, alphabet=st.characters(min_codepoint=32, max_codepoint=126)),
    },
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from audit.server.process import start_server, stop_server

    proc, _, http_url = start_server(
        str(tmp_path_factory.mktemp("fuzz") / "f.duckdb"), "--audit-every", "0", "--max-body-mib", "1"
    )
    yield http_url
    assert stop_server(proc) == 0  # it survived


@settings(max_examples=250, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE"]),
    path=st.sampled_from(["/v1/traces", "/v1/traces/", "/v1/logs", "/", "/v1/traces?x=1", "//v1/traces"]),
    headers=headers,
    body=bodies,
)
def test_any_request_gets_an_answer_below_500(server, method, path, headers, body):
    status = _send(server, method, path, headers, body)
    expected = expected_status(method, path, headers, body)
    if expected is None:
        assert 400 <= status < 500, (method, path, headers, body[:80])
    else:
        assert status == expected, (method, path, headers, body[:80])


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Content-Type": "application/x-protobuf; charset=utf-8"}, b"", 200),  # an empty request is valid
        ({"Content-Type": "Application/X-Protobuf"}, GOOD, 200),
        ({"Content-Type": JS, "Content-Encoding": "GZIP"}, gzip.compress(b"{}"), 200),
        ({"Content-Type": f"{JS}; charset=utf-8"}, b"{not json", 400),
        ({"Content-Type": PB, "Content-Encoding": "gzip"}, GOOD, 400),  # not gzip at all
        ({"Content-Type": PB, "Content-Encoding": "gzip, gzip"}, GOOD, 415),
        ({"Content-Type": "text/plain"}, GOOD, 415),
        ({}, GOOD, 415),
    ],
)
def test_the_answers_the_spec_asks_for(server, headers, body, status):
    assert expected_status("POST", "/v1/traces", headers, body) == status  # the oracle above
    assert _send(server, "POST", "/v1/traces", headers, body) == status


def test_good_requests_still_stored_after_the_fuzzing(server):
    assert _send(server, "POST", "/v1/traces", {"Content-Type": PB}, GOOD) == 200


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_atheris_on_the_decoders_for_a_bounded_time(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.fuzz_otlp",
            "-runs=4000",
            "-max_total_time=60",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done" in r.stderr or "DONE" in r.stderr
