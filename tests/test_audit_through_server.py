"""Audits requested through a running server (`ctxaudit audit --server`, POST /v1/audit, the
UI's "Audit now"): the server runs them on the store it holds, with the same result as the
file audited directly; bad requests are refused; and it reports how ingestion is going."""

import json
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from audit.read.remote import RemoteReader
from audit.server.process import start_server, stop_server
from tests.audit_helpers import simulated_store
from tests.serve_helpers import wait_loaded
from tests.test_ui_pages import PAGES

pytestmark = pytest.mark.slow  # every test talks to a `ctxaudit serve` process


def _ctxaudit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "audit", *args], capture_output=True, text=True, timeout=180)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@dataclass
class Served:
    db: str
    url: str
    proc: subprocess.Popen
    exported: int
    grpc_port: int
    http_url: str


@pytest.fixture
def served(tmp_path):
    """A server on a simulated store with no audit run yet (and none scheduled)."""
    db, truth = simulated_store(tmp_path)
    proc, grpc_port, http_url = start_server(db, "--audit-every", "0")
    yield Served(db, proc.api_url, proc, sum(t["exported"] for t in truth), grpc_port, http_url)
    if proc.poll() is None:
        assert stop_server(proc) == 0


def test_audit_through_the_server_saves_a_run_and_says_what_it_found(served):
    r = _ctxaudit("audit", "--server", served.url, "--settle", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("audit run 1:") and "gateway -> recommendations (http)" in r.stdout
    assert "sampling distortion" in r.stdout
    remote = RemoteReader(served.url)
    assert (
        remote.audit_run()["run_id"] == 1 and remote.findings()["total"] > 0
    )  # saved, and read back through it
    again = _ctxaudit("audit", "--server", served.url, "--settle", "0")
    assert again.returncode == 0 and "nothing new to audit" in again.stderr
    unsaved = _ctxaudit("audit", "--server", served.url, "--settle", "0", "--all", "--no-save")
    assert unsaved.returncode == 0 and unsaved.stdout.startswith("audit not saved")
    assert len(remote.audit_runs()) == 1


def test_a_served_audit_document_equals_the_files(served):
    r = _ctxaudit("audit", "--server", served.url, "--settle", "0", "--all", "--no-save", "--json")
    assert r.returncode == 0, r.stderr
    remote = json.loads(r.stdout)
    assert remote["summary"][0].startswith("audit not saved")
    assert stop_server(served.proc) == 0
    r = _ctxaudit("audit", "--db", served.db, "--settle", "0", "--all", "--no-save", "--json")
    assert r.returncode == 0, r.stderr
    local = json.loads(r.stdout)
    assert len(remote["findings"]) > 100 and remote["findings"] == local["findings"]
    assert remote["edges"] == local["edges"] and remote["sampling"] == local["sampling"]
    without_time = lambda run: {k: v for k, v in run.items() if k != "seconds"}  # noqa: E731
    assert without_time(remote["run"]) == without_time(local["run"])


@pytest.mark.parametrize(
    "body, message",
    [
        (b"[1, 2]", "must be a JSON object"),
        (b"not json", "not JSON"),
        (b'{"sql": "DROP TABLE spans"}', "unknown key"),
        (b'{"settings": {"min_confidence": 2}}', "between 0 and 1"),
        (b'{"settings": {"min_confidence": "high"}}', "must be a number"),
        (b'{"settings": {"shell": "rm"}}', "unknown setting"),
        (b'{"settings": []}', "settings must be an object"),
        (b'{"since_ns": "yesterday"}', "Unix nanoseconds"),
        (b'{"save": "yes"}', "true or false"),
    ],
)
def test_bad_audit_requests_are_refused_and_nothing_runs(served, body, message):
    status, answer = _post(f"{served.url}/v1/audit", body)
    assert status == 400 and message in answer["error"]
    assert RemoteReader(served.url).audit_runs() == []


def test_audit_request_methods_and_parameters(served):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{served.url}/v1/audit", timeout=10)
    assert e.value.code == 405 and e.value.headers["Allow"] == "POST"
    status, answer = _post(f"{served.url}/v1/audit?findings=maybe", b"{}")
    assert status == 400 and "true or false" in answer["error"]
    status, answer = _post(f"{served.url}/v1/audit?limit=5", b"{}")
    assert status == 400 and "unknown parameter" in answer["error"]
    with urllib.request.urlopen(f"{served.url}/v1/queries", timeout=10) as r:
        listing = json.load(r)
    assert listing["audit"]["method"] == "POST" and "ingest" in listing
    usage = _ctxaudit("audit", "--server", served.url, "--db", served.db)
    assert usage.returncode == 2 and "--db is for a file" in usage.stderr
    usage = _ctxaudit("audit", "--server", served.url, "--memory-limit", "1GB")
    assert usage.returncode == 2 and "--memory-limit" in usage.stderr
    down = _ctxaudit("audit", "--server", "http://127.0.0.1:9")
    assert down.returncode == 1 and "cannot reach" in down.stderr and "Traceback" not in down.stderr


def test_the_server_reports_ingest_health(served, tmp_path):
    with urllib.request.urlopen(f"{served.url}/v1/ingest", timeout=10) as r:
        before = json.load(r)
    assert (
        before["committed_spans"] == 0 and before["queued_spans"] == 0
    )  # the simulated spans were in the file
    assert before["queue_capacity_spans"] > 0 and before["inflight_capacity_bytes"] > 0
    r = _ctxaudit(
        "simulate",
        "--scenario",
        "shop-small",
        "--seed",
        "3",
        "--otlp",
        f"grpc://127.0.0.1:{served.grpc_port}",
        "--truth",
        str(tmp_path / "t3.jsonl"),
    )
    assert r.returncode == 0, r.stderr
    health = wait_loaded(served.url)  # acknowledged, then loaded
    assert health["committed_spans"] == RemoteReader(served.url).stats().spans - served.exported > 0
    assert health["spans_per_s"] > 0 and health["requests"] >= 1 and health["rejected_spans"] == 0
    invalid = urllib.request.Request(
        served.http_url, data=b"\xff\x00", headers={"Content-Type": "application/x-protobuf"}
    )
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(invalid, timeout=10)
    assert RemoteReader(served.url).ingest()["invalid_requests"] == 1


def test_overview_on_a_live_server_shows_ingest_and_audits_on_demand(served, monkeypatch):
    monkeypatch.setenv("CTXAUDIT_SERVER", served.url)
    monkeypatch.delenv("CTXAUDIT_DB", raising=False)
    st.cache_resource.clear()
    st.cache_data.clear()
    at = AppTest.from_file(str(PAGES / "overview.py"), default_timeout=120)
    at.run()
    assert not at.exception
    assert "Audit now" in at.info[0].value  # no run yet: the page says how to get one
    assert {"spans/s (last minute)", "rejected spans", "write queue"} <= {m.label for m in at.metric}
    at.number_input[0].set_value(0.0)
    at.button[0].click().run()
    assert not at.exception
    summary = at.code[0].value
    assert summary.startswith("audit run 1:") and "gateway -> recommendations" in summary
    assert "Worst hops" in [s.value for s in at.subheader]  # the new run is shown at once
