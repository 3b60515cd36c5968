"""The OTLP/HTTP handler under arbitrary requests (Hypothesis): any method, path, headers and
body get an answer below 500, a bad one a 4xx, and the server keeps storing good requests.
Longer by hand: `python -m bench.fuzz_otlp` (atheris, libFuzzer) on the decoders."""

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

from tests.otlp_builders import request, spans

PB, JS = "application/x-protobuf", "application/json"
GOOD = request(spans(3, random.Random(3))).SerializeToString()


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


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE"]),
    path=st.sampled_from(["/v1/traces", "/v1/traces/", "/v1/logs", "/", "/v1/traces?x=1", "//v1/traces"]),
    headers=headers,
    body=bodies,
)
def test_any_request_gets_an_answer_below_500(server, method, path, headers, body):
    status = _send(server, method, path, headers, body)
    assert status < 500, (method, path, headers, body[:80])
    valid = method == "POST" and path.split("?")[0] == "/v1/traces" and headers.get("Content-Type") == PB
    if not valid:
        assert 400 <= status < 500


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
