"""`ctxaudit export --otlp` and `serve --export-otlp`: each stitched hop of a run arrives, through
the OTel SDK's OTLP exporter, as one span in its probable parent's trace of another backend (a
second `ctxaudit serve`, or a bare OTLP/HTTP endpoint decoding the request as a Collector would),
under the parent span, linking to the orphan, with the cause, confidence and fix; exporting again
sends nothing; a target that is down is retried, reported, and blocks nothing."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from audit.cli import main
from audit.otlp_export import ExportRecord, hop_span_id
from audit.read.remote import RemoteReader
from audit.server.process import start_server, stop_server
from audit.store.reader import LocalReader
from tests.audit_helpers import audited_store
from tests.serve_helpers import wait_loaded


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A simulated store with one saved run, and that run's stitched findings (the document's)."""
    db = audited_store(tmp_path_factory.mktemp("source"))
    reader = LocalReader(db)
    run_id = reader.audit_run()["run_id"]
    found = []
    for kind in ("orphan_root", "in_process_break"):
        page = reader.findings(run_id, kind=kind, limit=10_000)
        found += [f for f in page["findings"] if f["probable_parent"]]
    ends = {}
    for f in found:
        span = next(s for s in reader.trace(int(f["trace_id"], 16)) if s["span_id"] == int(f["span_id"], 16))
        ends[f["span_id"]] = span["end_ns"]
    reader.close()
    assert len(found) >= 10  # the scenario stitches hops of both kinds
    assert {f["kind"] for f in found} == {"orphan_root", "in_process_break"}
    return db, run_id, found, ends


def _export(*args: str):
    return CliRunner().invoke(main, ["export", *args])


def _wait_spans(remote: RemoteReader, n: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while (spans := remote.stats().spans) < n:
        assert time.monotonic() < deadline, f"{spans} of {n} spans arrived"
        time.sleep(0.1)
    return spans


def _check_hop(remote: RemoteReader, finding: dict, run_id: int, end_ns: int) -> None:
    parent = finding["probable_parent"]
    span_id = hop_span_id(finding["trace_id"], finding["span_id"], parent["span_id"])
    spans = [s for s in remote.trace(int(parent["trace_id"], 16)) if s["span_id"] == span_id]
    assert len(spans) == 1, finding
    s = spans[0]
    assert s["parent_span_id"] == int(parent["span_id"], 16)
    assert s["service_name"] == "ctxaudit" and s["kind"] == "INTERNAL"
    assert (s["start_ns"], s["end_ns"]) == (finding["start_time_unix_nano"], end_ns)
    a = s["attributes"]
    assert a["ctxaudit.cause"] == finding["cause"] and a["ctxaudit.fix"] == finding["fix"]
    assert a["ctxaudit.confidence"] == pytest.approx(parent["confidence"])
    assert a["ctxaudit.kind"] == finding["kind"] and a["ctxaudit.run_id"] == run_id
    assert (a["ctxaudit.orphan.trace_id"], a["ctxaudit.orphan.span_id"]) == (
        finding["trace_id"],
        finding["span_id"],
    )
    (link,) = remote.links(int(parent["trace_id"], 16), span_id)
    assert (link["link_trace_id"], link["link_span_id"]) == (
        int(finding["trace_id"], 16),
        int(finding["span_id"], 16),
    )


@pytest.mark.slow  # a second `ctxaudit serve`
def test_export_to_a_second_serve_then_again_sends_nothing(source, tmp_path):
    db, run_id, found, ends = source
    target, port, _ = start_server(str(tmp_path / "backend.duckdb"), "--audit-every", "0")
    try:
        remote = RemoteReader(target.api_url)
        result = _export("--db", db, "--otlp", f"grpc://127.0.0.1:{port}")
        assert result.exit_code == 0, result.output
        assert f"{len(found):,} stitched hop(s); sent {len(found):,} span(s)" in result.output
        assert _wait_spans(remote, len(found)) == len(found)
        for f in found:
            _check_hop(remote, f, run_id, ends[f["span_id"]])
        # the same run again: nothing is sent (the state file), so the backend holds each hop once
        again = _export("--db", db, "--otlp", f"grpc://127.0.0.1:{port}/")
        assert again.exit_code == 0, again.output
        assert f"sent 0 span(s) to grpc://127.0.0.1:{port}/, {len(found):,} sent before" in again.output
        wait_loaded(remote)  # anything acknowledged has reached DuckDB: the count below is final
        assert remote.stats().spans == len(found)
        # a confidence floor exports fewer: those already sent are not sent again either
        floor = sorted(f["probable_parent"]["confidence"] for f in found)[len(found) // 2]
        fewer = _export("--db", db, "--otlp", f"grpc://127.0.0.1:{port}", "--min-confidence", str(floor))
        kept = sum(f["probable_parent"]["confidence"] >= floor for f in found)
        assert f"{kept:,} stitched hop(s); sent 0 span(s)" in fewer.output
    finally:
        assert stop_server(target) == 0


class _Collector(http.server.ThreadingHTTPServer):
    """A bare OTLP/HTTP endpoint: refuses the first `refuse` requests with 503 (retryable),
    then decodes each body as ExportTraceServiceRequest, as a Collector's receiver does."""

    def __init__(self, refuse: int = 0):
        self.requests: list[ExportTraceServiceRequest] = []
        self.refused, self.refuse = 0, refuse
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if collector.refused < collector.refuse:
                    collector.refused += 1
                    self.send_response(503)
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                assert self.path == "/v1/traces"
                assert self.headers["Content-Type"] == "application/x-protobuf"
                collector.requests.append(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()
                self.wfile.write(b"")

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def test_otlp_http_request_as_a_collector_decodes_it_after_a_refusal(source, tmp_path):
    db, run_id, found, ends = source
    collector = _Collector(refuse=1)
    try:
        result = _export("--db", db, "--otlp", collector.url, "--state", str(tmp_path / "state"))
    finally:
        collector.shutdown()
    assert result.exit_code == 0, result.output
    assert collector.refused == 1  # the exporter retried the refused request
    spans = {}
    for request in collector.requests:
        for rs in request.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            assert resource["service.name"] == "ctxaudit"
            for ss in rs.scope_spans:
                assert ss.scope.name == "ctxaudit.otlp_export"
                spans.update({s.span_id.hex(): s for s in ss.spans})
    assert len(spans) == len(found)
    for f in found:
        parent = f["probable_parent"]
        s = spans[f"{hop_span_id(f['trace_id'], f['span_id'], parent['span_id']):016x}"]
        assert (s.trace_id.hex(), s.parent_span_id.hex()) == (parent["trace_id"], parent["span_id"])
        (link,) = s.links
        assert (link.trace_id.hex(), link.span_id.hex()) == (f["trace_id"], f["span_id"])
        attrs = {a.key: a.value for a in s.attributes}
        assert attrs["ctxaudit.cause"].string_value == f["cause"]
        assert attrs["ctxaudit.confidence"].double_value == pytest.approx(parent["confidence"])
        assert attrs["ctxaudit.run_id"].int_value == run_id
        assert (s.start_time_unix_nano, s.end_time_unix_nano) == (
            f["start_time_unix_nano"],
            ends[f["span_id"]],
        )


def test_an_unreachable_target_is_reported_and_nothing_is_recorded(source, tmp_path):
    db, _, found, _ = source
    state = str(tmp_path / "state")
    closed = _Collector()
    dead = closed.url
    closed.shutdown()
    closed.server_close()  # nothing listens there now
    result = _export("--db", db, "--otlp", dead, "--state", state, "--otlp-timeout", "2")
    assert result.exit_code == 1
    assert f"the OTLP target {dead} did not take" in result.output
    assert ExportRecord(state).count(dead) == 0
    bad = _export("--db", db, "--otlp", "ftp://example", "--state", state)
    assert bad.exit_code == 2 and "not an OTLP URL" in bad.output
    both = _export("--db", db, "--otlp", dead, "--parquet", str(tmp_path / "pq"))
    assert both.exit_code == 2 and "exactly one of --parquet DIR and --otlp URL" in both.output


def _simulate(tmp_path, port: int) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "audit", "simulate", "--scenario", "shop-small", "--otlp"]
        + [f"grpc://127.0.0.1:{port}", "--truth", str(tmp_path / "t.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.slow  # two `ctxaudit serve` processes
def test_serve_exports_each_scheduled_audit_and_a_dead_target_blocks_nothing(tmp_path):
    backend, backend_port, _ = start_server(str(tmp_path / "backend.duckdb"), "--audit-every", "0")
    dead = _Collector()
    dead_url = dead.url
    dead.shutdown()
    dead.server_close()
    served = []
    try:
        for name, target in (("live", f"grpc://127.0.0.1:{backend_port}"), ("dead", dead_url)):
            proc, port, _ = start_server(
                str(tmp_path / f"{name}.duckdb"),
                *("--audit-every", "1", "--audit-settle", "0", "--export-otlp", target),
            )
            served.append(proc)
            _simulate(tmp_path, port)
        live, down = (RemoteReader(p.api_url) for p in served)
        deadline = time.monotonic() + 120
        while True:  # each server audits what it received; the live one's hops reach the backend
            status = [r.ingest().get("otlp_export", {}) for r in (live, down)]
            if status[0].get("last_run") and status[1].get("failures"):
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        # every run up to the last exported, whole: its stitched hops, each sent once
        stitched = sum(
            1
            for run in live.audit_runs()
            if run["run_id"] <= status[0]["last_run"]
            for kind in ("orphan_root", "in_process_break")
            for f in live.findings(run["run_id"], kind=kind, limit=10_000)["findings"]
            if f["probable_parent"]
        )
        assert stitched > 0 and status[0]["spans_sent"] == stitched
        assert _wait_spans(RemoteReader(backend.api_url), status[0]["spans_sent"]) == status[0]["spans_sent"]
        # the dead target: reported, while that server still ingested everything and audited it
        assert dead_url in status[1]["target"] and "did not take" in status[1]["last_error"]
        assert down.stats().spans == live.stats().spans and down.audit_runs()
    finally:
        for proc in served:
            assert stop_server(proc) == 0
        assert stop_server(backend) == 0
