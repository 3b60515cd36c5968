"""The read API's /metrics: the text parses with prometheus_client's own parser and says what
the saved run says (edge by edge, findings per kind and cause), a scrape during an audit
answers from the last complete run, edge series are capped and what is left out counted, the
token guards it unless --metrics-public; and a real Prometheus (Debian's) scrapes a running
`ctxaudit serve` with the bearer token, evaluates the shipped alert rules, and gives the edge
ratios back through its query API equal to the audit document's."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from audit.net.access import Access, TokenAuth
from audit.read.remote import RemoteReader
from audit.server.audits import ServerAudits
from audit.server.metrics import ServerMetrics, run_families
from audit.server.process import start_server, stop_server
from audit.server.read_api import ReadApi
from audit.settings import AuditRequest, AuditSettings
from audit.store.reader import StoreReader
from audit.store.writer import SpanStore, SpanWriter
from collector_ext.decode import PROTOBUF
from collector_ext.ingest import Ingestor, UnsupportedMediaType
from collector_ext.ingest_health import IngestHealth
from tests.audit_helpers import simulated_store
from tests.otlp_builders import request, span

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "ctxaudit-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "ctxaudit-rules.test.yml"
TOKEN = "metrics-test-token-0123456789"


def _get(url: str, token: str | None = None) -> tuple[int, str, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def _samples(text: str) -> dict[str, list]:
    """name -> samples, through prometheus_client's parser (it raises on malformed text)."""
    out = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name].append(s)
    return out


def _edge_key(labels: dict) -> tuple:
    return labels["caller"], labels["callee"], labels["protocol"]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A simulated store served in this process by the read API with the server's audits, a
    real ingestor (decoding inline) and the metrics collector over all three."""
    db, _ = simulated_store(tmp_path_factory.mktemp("metrics"))
    store = SpanStore(db)
    writer = SpanWriter(store, max_queued_spans=10_000)
    ingestor = Ingestor(writer, decoders=0)
    audits = ServerAudits(store, AuditSettings(settle_s=0))
    reader = StoreReader(store, db)
    metrics = ServerMetrics(
        reader,
        ingest_health=IngestHealth(ingestor, writer).snapshot,
        audit_status=audits.status,
        audit_every_s=300,
    )
    api = ReadApi(reader, "127.0.0.1", 0, auditor=audits, metrics=metrics)
    url = api.start()
    yield url, ingestor, audits, reader
    api.stop()
    writer.close()


def test_metrics_text_parses_and_says_what_the_saved_run_says(api):
    url, ingestor, audits, reader = api
    status, content_type, text = _get(f"{url}/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    before = _samples(text)
    assert "ctxaudit_edge_propagation_ratio" not in before  # no run saved yet: no run series
    assert before["ctxaudit_audit_successes_total"][0].value == 0

    result, _ = audits.run_request(AuditRequest.parse({"all": True, "settings": {"settle_s": 0}}))
    ingestor.export(request([span(b"\x01" * 16, b"\x02" * 8)], "metrics-test").SerializeToString(), PROTOBUF)
    with pytest.raises(UnsupportedMediaType):
        ingestor.export(b"{}", "text/html")
    m = _samples(_get(f"{url}/metrics")[2])

    assert m["ctxaudit_audit_run_id"][0].value == result.run_id
    doc = json.loads("".join(result.document_chunks(findings=True)))
    edges = {(e["caller"], e["callee"], e["protocol"]): e for e in doc["edges"]}
    ratios = {_edge_key(s.labels): s.value for s in m["ctxaudit_edge_propagation_ratio"]}
    assert ratios and ratios.keys() == {k for k, e in edges.items() if e["calls"]}
    for key, value in ratios.items():
        assert value == pytest.approx(edges[key]["propagation_rate"], abs=1e-4)
    for name, field in (
        ("ctxaudit_edge_calls", "calls"),
        ("ctxaudit_edge_propagated_calls", "propagated"),
        ("ctxaudit_edge_dropped_calls", "dropped"),
        ("ctxaudit_edge_stitched_calls", "stitched"),
    ):
        assert {_edge_key(s.labels): s.value for s in m[name]} == {k: e[field] for k, e in edges.items()}
    assert any(e["dropped"] for e in edges.values())  # the scenario does break hops

    by_kind_cause = defaultdict(int)
    for f in doc["findings"]:
        by_kind_cause[f["kind"], f["cause"]] += 1
    assert {(s.labels["kind"], s.labels["cause"]): s.value for s in m["ctxaudit_findings"]} == by_kind_cause

    overall = doc["sampling"]["overall"]
    assert m["ctxaudit_fragmentation_factor"][0].value == pytest.approx(
        overall["fragmentation_factor"]["value"]
    )
    assert m["ctxaudit_audit_run_spans"][0].value == doc["run"]["spans"]
    assert m["ctxaudit_audit_run_duration_seconds"][0].value == pytest.approx(doc["run"]["seconds"], abs=1e-3)
    assert m["ctxaudit_edges_omitted"][0].value == 0

    assert m["ctxaudit_audit_successes_total"][0].value == 1
    assert (
        m["ctxaudit_audit_last_success_timestamp_seconds"][0].value
        > before["ctxaudit_start_time_seconds"][0].value
    )
    assert m["ctxaudit_ingest_spans_committed_total"][0].value >= 1
    assert m["ctxaudit_ingest_spans_received_total"][0].value == 1
    refused = {s.labels["reason"]: s.value for s in m["ctxaudit_ingest_requests_refused_total"]}
    assert refused == {"invalid": 1, "unavailable": 0, "unauthenticated": 0}
    for name in m:  # never a label per trace or span
        for s in m[name]:
            assert not {"trace_id", "span_id"} & s.labels.keys()


def test_a_scrape_while_an_audit_runs_answers_from_the_last_complete_run(api):
    url, _, audits, reader = api
    last = reader.audit_run()
    scraped = []

    class Pausing:  # scrapes /metrics between the audit's steps, saving included
        @contextmanager
        def watching(self, con):
            yield lambda step: scraped.append((step, _samples(_get(f"{url}/metrics")[2])))

    audits.guard = Pausing()
    try:
        result = audits.audit(AuditSettings(settle_s=0), resume=False)
    finally:
        audits.guard = None
    assert result.run_id == last["run_id"] + 1 and len(scraped) >= 5
    assert any(step == "saving the run" for step, _ in scraped)
    for _, m in scraped:
        assert m["ctxaudit_audit_run_id"][0].value == last["run_id"]
        assert m["ctxaudit_audit_running"][0].value == 1
        assert {_edge_key(s.labels): s.value for s in m["ctxaudit_edge_calls"]} == {
            (e["caller"], e["callee"], e["protocol"]): e["calls"] for e in last["edges"]
        }
    assert _samples(_get(f"{url}/metrics")[2])["ctxaudit_audit_run_id"][0].value == result.run_id


def test_edge_series_are_capped_broken_and_busiest_first(api):
    _, _, _, reader = api
    run = reader.audit_run()
    edges = run["edges"]
    broken = [e for e in edges if e["calls"] > e["propagated"]]
    assert 0 < len(broken) < len(edges)
    families = {
        f.name: f for f in run_families(run, reader.finding_counts(run["run_id"]), max_edges=len(broken))
    }
    kept = {_edge_key(s.labels) for s in families["ctxaudit_edge_calls"].samples}
    assert kept == {(e["caller"], e["callee"], e["protocol"]) for e in broken}
    assert families["ctxaudit_edges_omitted"].samples[0].value == len(edges) - len(broken)
    assert families["ctxaudit_audit_run_edges"].samples[0].value == len(edges)
    none = {f.name: f for f in run_families(run, [], max_edges=0)}
    assert not none["ctxaudit_edge_calls"].samples and none["ctxaudit_edges_omitted"].samples[0].value == len(
        edges
    )


def test_the_token_guards_metrics_unless_they_are_public(tmp_path):
    db, _ = simulated_store(tmp_path)
    store = SpanStore(db)
    reader = StoreReader(store, db)
    access = Access(TokenAuth(TOKEN.encode()), None)
    guarded = ReadApi(reader, "127.0.0.1", 0, access=access)
    public = ReadApi(reader, "127.0.0.1", 0, access=access, metrics_public=True)
    try:
        url, open_url = guarded.start(), public.start()
        assert _get(f"{url}/metrics")[0] == 401
        assert _get(f"{url}/metrics", "wrong-token-0123456789")[0] == 401
        assert _get(f"{url}/metrics", TOKEN)[0] == 200
        assert _get(f"{open_url}/metrics")[0] == 200
        assert _get(f"{open_url}/v1/stats")[0] == 401  # only /metrics is public
        assert _get(f"{open_url}/metrics/")[0] == 401
    finally:
        guarded.stop()
        public.stop()
        store.close()


# --- the alert rules, with promtool ---------------------------------------------------------

PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool: Debian's prometheus (make test installs it)"
)


@needs_promtool
def test_the_rules_are_valid_and_their_unit_tests_pass():
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
    tested = subprocess.run(
        [PROMTOOL, "test", "rules", RULE_TESTS.name], capture_output=True, text=True, cwd=RULE_TESTS.parent
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


# --- a real Prometheus ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, predicate, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def _prom_query(base: str, query: str) -> list[dict]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, timeout=10) as r:
        answer = json.load(r)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _ready(proc: subprocess.Popen, base: str) -> bool:
    assert proc.poll() is None, "Prometheus exited; see prometheus.log in the test's temp dir"
    try:
        return _get(f"{base}/-/ready")[0] == 200
    except urllib.error.URLError:  # not listening yet
        return False


@contextmanager
def _prometheus(tmp_path: Path, target: str, token_file: Path):
    port = _free_port()
    shutil.copy(RULES, tmp_path / RULES.name)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{RULES.name}]\n"
        "scrape_configs:\n"
        "  - job_name: ctxaudit\n"
        "    authorization: {type: Bearer, credentials_file: " + str(token_file) + "}\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait("Prometheus to be ready", lambda: _ready(proc, base))
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus (make test installs it)")
def test_a_real_prometheus_scrapes_the_edge_ratios_of_the_audit_document(tmp_path):
    db, _ = simulated_store(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server, _, _ = start_server(db, "--audit-every", "0", "--token-file", str(token_file))
    try:
        body = json.dumps({"all": True, "settings": {"settle_s": 0}}).encode()
        audit_request = urllib.request.Request(
            f"{server.api_url}/v1/audit",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        )
        with urllib.request.urlopen(audit_request, timeout=120) as r:
            doc = json.load(r)
        expected = {(e["caller"], e["callee"], e["protocol"]): e for e in doc["edges"] if e["calls"]}
        assert doc["run"]["id"] == 1 and any(e["dropped"] for e in expected.values())
        target = urllib.parse.urlsplit(server.api_url).netloc
        with _prometheus(tmp_path, target, token_file) as prom:
            up = _wait("a scrape", lambda: _prom_query(prom, 'up{job="ctxaudit"} == 1'))
            assert up[0]["metric"]["instance"] == target
            got = _wait(
                "the edge ratios",
                lambda: _prom_query(prom, "ctxaudit_edge_propagation_ratio{job='ctxaudit'}"),
            )
            ratios = {_edge_key(r["metric"]): float(r["value"][1]) for r in got}
            assert ratios.keys() == expected.keys()
            for key, value in ratios.items():
                e = expected[key]
                assert value == pytest.approx(e["propagated"] / e["calls"], rel=1e-12)
            run_id = _prom_query(prom, "ctxaudit_audit_run_id")
            assert float(run_id[0]["value"][1]) == doc["run"]["id"]
            # the shipped rules load in a real Prometheus and the broken hops show up in them
            low = _wait(
                "the low-propagation alert",
                lambda: [
                    a
                    for a in _prom_query(prom, 'ALERTS{alertname="CtxauditHopPropagationLow"}')
                    if a["metric"]["alertstate"] in ("pending", "firing")
                ],
            )
            alerted = {_edge_key(a["metric"]) for a in low}
            assert alerted and alerted <= {k for k, e in expected.items() if e["dropped"]}
        assert RemoteReader(server.api_url, token=TOKEN).audit_run()["run_id"] == 1
    finally:
        assert stop_server(server) == 0


def test_concurrent_scrapes_build_a_new_runs_families_once(api):
    url, _, audits, reader = api
    calls = []
    original = reader.finding_counts

    def counting(run_id=None):
        calls.append(run_id)
        return original(run_id)

    reader.finding_counts = counting
    try:
        audits.audit(AuditSettings(settle_s=0), resume=False)
        threads = [threading.Thread(target=_get, args=(f"{url}/metrics",)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(calls) == 1
    finally:
        del reader.finding_counts


def test_hostile_names_in_labels_round_trip_through_the_exposition():
    """Service names are untrusted span data: quotes, backslashes, newlines, braces and
    non-ASCII come back from the parser exactly as stored, one series each."""
    names = ['a"b', "c\\d", "e\nf", "g}h{i=", "ü-服务", "# HELP x y"]
    run = {
        "run_id": 7,
        "window_end_ns": 2_000_000_000,
        "seconds": 0.5,
        "spans": 10,
        "traces": 3,
        "roots": {},
        "edges": [
            {
                "caller": n,
                "callee": names[-1 - i],
                "protocol": "http",
                "calls": 4,
                "propagated": i % 3,
                "stitched": 0,
                "callee_instrumented": True,
            }
            for i, n in enumerate(names)
        ],
    }

    class OneRun:
        def audit_run(self):
            return run

        def finding_counts(self, run_id):
            return [{"kind": "orphan_root", "cause": "unknown", "findings": 2}]

    m = _samples(ServerMetrics(OneRun()).render().decode())
    got = {_edge_key(s.labels): s.value for s in m["ctxaudit_edge_propagation_ratio"]}
    assert got == {(e["caller"], e["callee"], "http"): e["propagated"] / 4 for e in run["edges"]}
