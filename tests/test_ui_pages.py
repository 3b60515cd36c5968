"""Every page of the explorer, run by Streamlit's AppTest against a real store with a saved
audit run (the shop scenario): no exception, and what an SRE should see on it."""

import subprocess
import sys
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from tests.audit_helpers import audited_store, simulated_store

PAGES = Path(__file__).parent.parent / "ui" / "pages"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return audited_store(tmp_path_factory.mktemp("ui"))


@pytest.fixture
def page(store, monkeypatch):
    monkeypatch.setenv("CTXAUDIT_DB", store)
    monkeypatch.delenv("CTXAUDIT_SERVER", raising=False)
    st.cache_resource.clear()
    st.cache_data.clear()

    def run(name: str, **state) -> AppTest:
        at = AppTest.from_file(str(PAGES / name), default_timeout=60)
        for k, v in state.items():
            at.session_state[k] = v
        at.run()
        assert not at.exception, [e.message for e in at.exception]
        return at

    return run


def test_overview_shows_health_trend_and_worst_hops(page):
    at = page("overview.py")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["spans stored"] == "774" and metrics["context health"].endswith("%")
    assert "fragments per request" in metrics
    assert [s.value for s in at.subheader] == ["Over time", "Worst hops"]  # no "Ingest": a file, not a server
    assert not at.button  # audits on demand are the server's
    assert len(at.get("vega_lite_chart")) == 2  # the orphan rate / context health and broken hops trends
    hops = at.dataframe[0].value
    assert "gateway → recommendations" in set(hops["hop"])
    assert hops["dropped"].is_monotonic_decreasing


def test_service_graph_lists_a_broken_edges_findings(page):
    at = page("service_graph.py")
    assert at.radio[0].value == "repaired"
    edge = next(o for o in at.selectbox[0].options if o.startswith("gateway → recommendations"))
    at.selectbox[0].select(edge).run()
    assert not at.exception
    findings = at.dataframe[0].value
    assert len(findings) > 0 and set(findings["cause"]) <= {
        "proxy_strips_traceparent",
        "context_not_propagated",
    }
    assert at.button[0].label == "All findings on this edge"
    at.radio[0].set_value("observed").run()
    assert not at.exception


def test_findings_come_prefiltered_from_an_edge_and_filter_by_time(page):
    hop = {"caller": "gateway", "callee": "recommendations", "protocol": "http", "run_id": 1}
    at = page("findings.py", findings_filters=hop)
    assert [at.selectbox[i].value for i in (3, 4, 5)] == ["gateway", "recommendations", "http"]
    rows = at.dataframe[0].value
    assert len(rows) > 0 and set(rows["hop"]) == {"gateway → recommendations"}
    on_edge = int(at.caption[0].value.split()[0].replace(",", ""))
    everything = page("findings.py")
    total = int(everything.caption[0].value.split()[0].replace(",", ""))
    start, end = everything.slider[0].value
    everything.slider[0].set_range(start, start + (end - start) / 2).run()
    first_half = int(everything.caption[0].value.split()[0].replace(",", ""))
    everything.slider[0].set_range(start + (end - start) / 2, end).run()
    second_half = int(everything.caption[0].value.split()[0].replace(",", ""))
    assert on_edge < total and 0 < first_half < total and 0 < second_half < total
    assert first_half + second_half == total


def test_findings_filter_and_open_a_trace(page):
    at = page("findings.py")
    total = int(at.caption[0].value.split()[0].replace(",", ""))
    assert at.selectbox[0].label == "audit run" and at.selectbox[0].value == 1
    at.selectbox[1].select("orphan_root").run()
    orphans = int(at.caption[0].value.split()[0].replace(",", ""))
    assert 0 < orphans < total
    assert set(at.dataframe[0].value["kind"]) == {"orphan_root"}


def test_trace_view_joins_the_stitched_parent(page, store):
    from audit.store.reader import LocalReader

    reader = LocalReader(store)
    try:
        stitched = next(
            f for f in reader.findings(kind="orphan_root", limit=500)["findings"] if f["probable_parent"]
        )
    finally:
        reader.close()
    at = page("trace.py", trace_id=stitched["trace_id"])
    assert any("probable parent" in i.value for i in at.info)
    hops = at.table[1].value  # the stitched hops joining the fragments, with cause and fix
    assert f"{stitched['trace_id']} {stitched['span_id']}" in set(hops["orphan trace, span"])
    bad = page("trace.py", trace_id="xyz")
    assert "not a trace id" in bad.error[0].value


def test_sampling_page_shows_figures_with_intervals(page):
    at = page("sampling.py")
    labels = [m.label for m in at.metric]
    assert labels == [
        "fragmentation factor",
        "trace completeness",
        "hidden error share",
        "latency undercount",
    ]
    edges = at.dataframe[0].value
    assert "propagation_rate" in edges.columns and len(edges) >= 5
    services = at.dataframe[1].value
    assert "fulfilment" in set(services["service"])


def test_pages_say_what_to_do_without_a_run(tmp_path, monkeypatch):
    db, _ = simulated_store(tmp_path)  # spans, but no audit run
    monkeypatch.setenv("CTXAUDIT_DB", db)
    st.cache_resource.clear()
    st.cache_data.clear()
    for name in ("overview.py", "service_graph.py", "findings.py", "sampling.py"):
        at = AppTest.from_file(str(PAGES / name), default_timeout=60)
        at.run()
        assert not at.exception
        assert "ctxaudit audit" in at.info[0].value, name


@pytest.mark.slow  # `ctxaudit ui` processes
def test_ctxaudit_ui_serves_the_explorer(store):
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "audit", "ui", "--db", store, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    assert r.read() == b"ok"
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (
                    proc.stderr.read() if proc.poll() else ""
                )
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow  # `ctxaudit ui` processes
def test_ctxaudit_ui_refuses_a_store_it_cannot_read(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "audit", "ui", "--db", str(tmp_path / "nope.duckdb")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "does not exist" in r.stderr


@pytest.fixture(scope="module")
def chain_store(tmp_path_factory):
    """Every request split into three traces by two broken hops in a row (the chain scenario)."""
    return audited_store(tmp_path_factory.mktemp("chain"), "chain-two-hops")


def test_trace_view_reassembles_the_whole_request_from_any_fragment(chain_store, monkeypatch):
    from audit.store.reader import LocalReader

    monkeypatch.setenv("CTXAUDIT_DB", chain_store)
    st.cache_data.clear()
    st.cache_resource.clear()
    reader = LocalReader(chain_store)
    try:
        top = reader.fragmented_requests(limit=1)[0]
        assert top["fragments"] == 3 and top["hops"] == 2
        # the chain from the top: its orphan one level down, and that one's orphan below it
        (first,) = reader.findings(parent_trace_id=int(top["trace_id"], 16), kind="orphan_root")["findings"]
        (second,) = reader.findings(parent_trace_id=int(first["trace_id"], 16), kind="orphan_root")[
            "findings"
        ]
    finally:
        reader.close()
    expected = {top["trace_id"], first["trace_id"], second["trace_id"]}
    for opened in expected:  # the top, the middle and the last fragment: the same whole request
        at = AppTest.from_file(str(PAGES / "trace.py"), default_timeout=60)
        at.session_state["trace_id"] = opened
        at.run()
        assert not at.exception, [e.message for e in at.exception]
        assert "split into 3 traces" in at.info[0].value
        fragments, hops = (t.value for t in at.table)
        assert set(fragments["trace id"]) == expected
        assert set(hops["cause"]) == {first["cause"].replace("_", "\\_"), second["cause"].replace("_", "\\_")}
        assert set(hops["orphan trace, span"]) == {f"{f['trace_id']} {f['span_id']}" for f in (first, second)}
    # opened without a trace id: the most fragmented requests, and a button opens one
    at = AppTest.from_file(str(PAGES / "trace.py"), default_timeout=60).run()
    assert at.subheader[0].value == "Most fragmented requests"
    at.button(key=f"open-{top['trace_id']}").click().run()
    assert at.session_state["trace_id"] == top["trace_id"] and "split into 3 traces" in at.info[0].value
