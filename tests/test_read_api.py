"""The read API of a live `ctxaudit serve`: the same answers as the file read directly, named
queries only, never a write, bad parameters refused, and the CLI reading through it."""

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

from audit.read.remote import RemoteReader
from audit.server.process import start_server, stop_server
from audit.store.errors import StoreError
from audit.store.reader import LocalReader
from tests.audit_helpers import audited_store
from tests.serve_helpers import wait_loaded
from tests.test_roundtrip_sdk import emit

pytestmark = pytest.mark.slow  # every test talks to a `ctxaudit serve` process


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _ctxaudit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "audit", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A running server on a seeded store."""
    db = audited_store(tmp_path_factory.mktemp("api"))
    proc, _, _ = start_server(db)
    yield db, proc.api_url
    assert stop_server(proc) == 0


def test_remote_answers_while_the_server_holds_the_file(live):
    db, url = live
    remote = RemoteReader(url)
    stats = remote.stats()
    assert stats.spans > 700 and stats.services > 5
    run = remote.audit_run()
    assert run["run_id"] == 1 and run["edges"] and run["sampling"]["edges"]
    assert remote.audit_run(99) is None
    with pytest.raises(StoreError, match="locked"):  # no other process may open the file meanwhile
        LocalReader(db)


def test_remote_and_local_readers_agree(tmp_path):
    """What the API answers while serving equals what the file says once the server stopped,
    including spans the real SDK sent a moment before."""
    db = audited_store(tmp_path)
    proc, port, _ = start_server(db)
    try:
        trace_id, span_id, _ = emit(GrpcExporter(endpoint=f"127.0.0.1:{port}", insecure=True), "api-test")
        remote = RemoteReader(proc.api_url)
        wait_loaded(remote)  # acknowledged, then loaded from the staging log
        answers = (
            remote.stats(),
            remote.store_counts(),
            remote.protocol_summary(),
            remote.audit_run(),
            remote.trace(trace_id),
            remote.links(trace_id, span_id),
            remote.audit_runs(),
            remote.findings(kind="orphan_root", callee="recommendations", limit=5),
        )
    finally:
        assert stop_server(proc) == 0
    assert answers[4][0]["name"] == "POST /orders" and answers[5][0]["attributes"] == {"link.reason": "batch"}
    assert (
        answers[1]["spans"] == answers[0].spans
        and abs(answers[1]["traces_approx"] - answers[0].traces) < 0.1 * answers[0].traces
    )
    local = LocalReader(db)
    try:
        assert answers == (
            local.stats(),
            local.store_counts(),
            local.protocol_summary(),
            local.audit_run(),
            local.trace(trace_id),
            local.links(trace_id, span_id),
            local.audit_runs(),
            local.findings(kind="orphan_root", callee="recommendations", limit=5),
        )
    finally:
        local.close()


@pytest.mark.parametrize(
    "path, status, message",
    [
        ("/v1/select%20*%20from%20spans", 404, "unknown query"),
        ("/v1/trace", 400, "missing parameter 'trace_id'"),
        ("/v1/trace?trace_id=xyz", 400, "hex digits"),
        ("/v1/trace?trace_id=" + "0" * 31, 400, "32 hex digits"),
        ("/v1/links?trace_id=" + "0" * 32 + "&span_id=1", 400, "16 hex digits"),
        ("/v1/audit_run?run_id=-1", 400, "run ids start at 1"),
        ("/v1/audit_run?run_id=1&sql=drop", 400, "unknown parameter"),
        ("/v2/stats", 404, "unknown API version"),
        ("/v1/findings?kind=everything", 400, "must be one of"),
        ("/v1/findings?limit=0", 400, "between 1 and 10000"),
        ("/v1/findings?offset=x", 400, "offset"),
        ("/", 404, "/v1/queries"),
    ],
)
def test_bad_requests_get_clear_errors(live, path, status, message):
    _, url = live
    got_status, body = _get(url + path)
    assert got_status == status and message in body["error"]


def test_findings_filter_and_page(live):
    _, url = live
    remote = RemoteReader(url)
    counts = remote.audit_runs()[0]["counts"]
    everything = remote.findings(limit=10_000)
    assert everything["total"] == sum(counts.values()) == len(everything["findings"])
    orphans = remote.findings(kind="orphan_root", callee="recommendations", limit=7)
    assert 7 == len(orphans["findings"]) < orphans["total"] <= counts["orphan_root"]
    assert {(f["kind"], f["callee"]) for f in orphans["findings"]} == {("orphan_root", "recommendations")}
    assert all(f["fix"] and f["explanation"] for f in orphans["findings"])
    page2 = remote.findings(kind="orphan_root", callee="recommendations", limit=7, offset=7)
    assert not {f["span_id"] for f in page2["findings"]} & {f["span_id"] for f in orphans["findings"]}
    assert remote.findings(service="no such service")["total"] == 0


def test_the_api_never_writes(live):
    db, url = live
    before = RemoteReader(url).stats().spans
    for method in ("POST", "PUT", "DELETE"):
        request = urllib.request.Request(f"{url}/v1/stats", method=method, data=b"{}")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 405 and e.value.headers["Allow"] == "GET"
    assert RemoteReader(url).stats().spans == before


def test_cli_reads_through_the_server(live, tmp_path):
    db, url = live
    r = _ctxaudit("graph", "--server", url, "--format", "dot")
    assert r.returncode == 0 and "digraph" in r.stdout
    both = _ctxaudit("stats", "--server", url, "--db", db)
    assert both.returncode == 2 and "not both" in both.stderr
    down = _ctxaudit("stats", "--server", "http://127.0.0.1:9")
    assert down.returncode == 1 and "cannot reach" in down.stderr and "Traceback" not in down.stderr
    locked = _ctxaudit("stats", "--db", db)
    assert locked.returncode == 1 and "--server" in locked.stderr


def test_run_trends_agree_with_the_run(live):
    _, url = live
    remote = RemoteReader(url)
    trend, run = remote.audit_runs()[0], remote.audit_run()
    broken = [e for e in run["edges"] if e["broken"]]
    instrumented = [e for e in run["edges"] if e["callee_instrumented"]]
    assert trend["broken_edges"] == len(broken) > 0
    health = sum(e["propagated"] for e in instrumented) / sum(e["calls"] for e in instrumented)
    assert abs(trend["context_health"] - health) < 1e-9
    orphans = sum(r["orphan"] for r in run["roots"].values())
    assert (
        abs(trend["orphan_rate"] - orphans / (orphans + sum(r["entry"] for r in run["roots"].values())))
        < 1e-9
    )
    assert trend["counts"]["orphan_root"] == remote.findings(kind="orphan_root")["total"]


def test_findings_filter_by_start_time(live):
    _, url = live
    remote = RemoteReader(url)
    everything = remote.findings(limit=10_000)["findings"]
    starts = sorted(f["start_time_unix_nano"] for f in everything)
    middle = starts[len(starts) // 2]
    early, late = (
        remote.findings(until_ns=middle, limit=10_000),
        remote.findings(since_ns=middle, limit=10_000),
    )
    assert early["total"] + late["total"] == len(everything) and early["total"] > 0 and late["total"] > 0
    assert all(f["start_time_unix_nano"] < middle for f in early["findings"]) and all(
        f["start_time_unix_nano"] >= middle for f in late["findings"]
    )
