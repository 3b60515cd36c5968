"""Nothing a client sends to the read API takes the server down (issue: hostile input): bad
bodies and parameters are 4xx with a message, answers are strict JSON, audit requests are
bounded (one waits, the rest get 429; a client that hung up is not audited for), and an audit
that outgrows the memory ceiling is stopped while ingestion goes on."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from audit.server.audits import AuditBusy, ClientGone, ServerAudits
from audit.server.read_api import ReadApi
from audit.settings import AuditRequest, AuditSettings
from audit.store.reader import StoreReader
from audit.store.writer import SpanStore
from tests.audit_helpers import simulated_store


def _strict(text: str):
    def refuse(name):
        raise AssertionError(f"{name} in an answer: not JSON")

    return json.loads(text, parse_constant=refuse)


def _call(url: str, body: bytes | None = None) -> tuple[int, object]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, _strict(r.read().decode())
    except urllib.error.HTTPError as e:
        return e.code, _strict(e.read().decode())


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A real store and the read API over it, in this process, with the server's audits."""
    db, _ = simulated_store(tmp_path_factory.mktemp("hostile"))
    store = SpanStore(db)
    audits = ServerAudits(store, AuditSettings(settle_s=0))
    api = ReadApi(
        StoreReader(store, db),
        "127.0.0.1",
        0,
        auditor=audits,
        ingest_health=lambda: {"audits": audits.status()},
    )
    url = api.start()
    yield url, store, audits
    api.stop()
    store.close()


NESTED = b'{"settings":' + b"[" * 100_000


@pytest.mark.parametrize(
    "body, says",
    [
        (NESTED, "not JSON"),
        (b'{"settings": {"settle_s": NaN}}', "NaN is not JSON"),
        (b'{"settings": {"context_s": Infinity}}', "Infinity is not JSON"),
        (b'{"settings": {"settle_s": 1e308}}', "settle_s must be between"),
        (b'{"settings": {"settle_s": 1' + b"0" * 400 + b"}}", "settle_s must be"),
        (b'{"settings": {"default_skew_ms": -1e9}}', "default_skew_ms must be between"),
        (b'{"settings": {"default_skew_ms": 1e12}}', "default_skew_ms must be between"),
        (b'{"settings": {"assume_sampling_probability": true}}', "not true or false"),
        (b'{"since_ns": -1e30}', "since_ns"),
        (b'{"until_ns": 1e30}', "until_ns"),
        (b'{"since_ns": 18446744073709551616}', "since_ns must be between"),
        (b'{"settings": {"entrypoints": [[]]}}', "entrypoints"),
    ],
)
def test_bad_audit_bodies_are_400_with_a_message(api, body, says):
    url, _, _ = api
    status, answer = _call(f"{url}/v1/audit", body)
    assert status == 400 and says in answer["error"], answer


@pytest.mark.parametrize(
    "path, says",
    [
        ("/v1/audit_run?run_id=" + str(2**128), "run_id"),
        ("/v1/findings?since_ns=-1", "since_ns"),
        ("/v1/findings?until_ns=" + "9" * 400, "until_ns"),
        ("/v1/findings?limit=1e3", "limit"),
        ("/v1/findings?protocol=" + "x" * 600, "protocol"),
        ("/v1/trace?trace_id=" + "g" * 32, "hex digits"),
    ],
)
def test_bad_parameters_are_400_with_a_message(api, path, says):
    url, _, _ = api
    status, answer = _call(url + path)
    assert status == 400 and says in answer["error"], answer


def test_an_overlong_request_line_is_refused(api):
    url, _, _ = api
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{url}/v1/findings?protocol=" + "x" * 20_000, timeout=30)
    assert 400 <= e.value.code < 500


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    hs.recursive(
        hs.none() | hs.booleans() | hs.floats() | hs.integers() | hs.text(max_size=20),
        lambda inner: hs.lists(inner, max_size=4) | hs.dictionaries(hs.text(max_size=12), inner, max_size=4),
        max_leaves=12,
    ),
    hs.sampled_from(["settings", "since_ns", "until_ns", "all", "save", "x"]),
)
def test_no_audit_body_gets_a_5xx(api, value, key):
    """Whatever JSON arrives under a request's keys: refused with 400, or audited (nothing new
    here: every run is saved=false, so the store is unchanged); never a server error."""
    url, _, _ = api
    body = {key: value, "save": False} if key != "save" else {key: value}
    text = json.dumps(body, allow_nan=True).encode()
    status, answer = _call(f"{url}/v1/audit", text)
    assert status in (200, 400), answer


def test_answers_are_strict_json_even_over_stored_nan(api):
    url, store, _ = api
    con = store.cursor()  # a run saved before settings were checked: NaN in its JSON text
    run_id = 1_000_000
    con.execute(
        "INSERT INTO audit_runs (run_id, finished_at, window_start_ns, window_end_ns, spans, traces, "
        "seconds, entrypoints, roots, settings) "
        "VALUES (?, current_timestamp, 1, 2, 0, 0, 'NaN'::DOUBLE, [], '{}', ?)",
        [run_id, '{"settle_s": NaN, "context_s": Infinity}'],
    )
    con.close()
    status, run = _call(f"{url}/v1/audit_run?run_id={run_id}")
    assert status == 200 and run["settings"]["settle_s"] is None and run["seconds"] is None


def test_one_audit_request_waits_and_the_next_is_refused(api):
    url, _, audits = api
    answers = []
    with audits._one_at_a_time:  # an audit is running (the test plays it)
        with audits._admission:
            audits._busy += 1
        try:
            waiting = threading.Thread(
                target=lambda: answers.append(_call(f"{url}/v1/audit", b'{"save": false}')), daemon=True
            )
            waiting.start()
            for _ in range(400):  # until the request waits its turn
                if audits.status()["busy"] == 2:
                    break
                threading.Event().wait(0.05)
            status, answer = _call(f"{url}/v1/audit", b'{"save": false}')
            assert status == 429 and "try again" in answer["error"]
        finally:
            with audits._admission:
                audits._busy -= 1
    waiting.join(120)
    assert answers and answers[0][0] == 200  # the one that waited ran once the first was done


def test_a_request_whose_client_left_is_not_run(api):
    _, _, audits = api
    before = audits.status()
    with pytest.raises(ClientGone):
        audits.run_request(AuditRequest(save=False), still_wanted=lambda: False)
    after = audits.status()
    assert after["dropped_client_gone"] == before["dropped_client_gone"] + 1
    assert after["succeeded"] == before["succeeded"]


def test_requests_beyond_one_waiting_are_busy_without_http(api):
    _, _, audits = api
    with audits._admission:
        audits._busy = 2
    try:
        with pytest.raises(AuditBusy):
            audits.run_request(AuditRequest(save=False))
    finally:
        with audits._admission:
            audits._busy = 0


def test_an_audit_past_the_memory_ceiling_is_stopped_and_writes_go_on(tmp_path):
    db, _ = simulated_store(tmp_path)
    store = SpanStore(db)
    audits = ServerAudits(store, AuditSettings(settle_s=0), max_rss_bytes=1 << 20)  # below any process
    api = ReadApi(StoreReader(store, db), "127.0.0.1", 0, auditor=audits, ingest_health=audits.status)
    url = api.start()
    try:
        status, answer = _call(f"{url}/v1/audit", b'{"all": true}')
        assert status == 503 and "audit was stopped" in answer["error"]
        status, health = _call(f"{url}/v1/ingest")
        assert health["failed"] == 1 and "--audit-max-rss-mib" in health["last_failure"]
        con = store.cursor()  # the store still takes writes and answers
        con.execute("CREATE TEMP TABLE probe AS SELECT 1 AS x")
        assert con.execute("SELECT count(*) FROM spans").fetchone()[0] > 0
        con.close()
        status, runs = _call(f"{url}/v1/audit_runs")
        assert status == 200 and runs == []  # the stopped audit saved nothing
    finally:
        api.stop()
        store.close()
