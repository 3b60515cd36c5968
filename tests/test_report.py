"""`ctxaudit report`: reports built from scenario data, the HTML shown in real Chromium, the
comparison across two days with a hop fixed, one broken and one worse, the gate's exit codes,
and the same report through a running server."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from audit.report.compare import compare
from audit.report.gate import GateError, Threshold
from audit.report.sources import report_window
from audit.scenarios.model import BUNDLED
from audit.server.process import start_server, stop_server
from audit.store.errors import StoreError
from tests.audit_helpers import simulated_store

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts" / "report"


def _ctxaudit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "audit", *args], capture_output=True, text=True, timeout=180)


def _day2_scenario(tmp_path: Path) -> str:
    """The shop a day later: the proxy in front of recommendations fixed, a new one in front of
    cart stripping most traceparents, and the custom RPC to payments dropping far more often."""
    doc = yaml.safe_load((BUNDLED / "shop-small.yaml").read_text())
    calls = doc["services"]["gateway"]["operations"]["GET /cart"]["calls"]
    calls[0]["drop"] = {"probability": 0.6, "cause": "proxy_strips_traceparent"}  # cart
    del calls[1]["drop"]  # recommendations
    doc["services"]["checkout"]["operations"]["shop.Checkout/PlaceOrder"]["calls"][0]["drop"][
        "probability"
    ] = 0.95
    path = tmp_path / "shop-day2.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    day1, _ = simulated_store(tmp, "shop-small")
    day2, _ = simulated_store(tmp, _day2_scenario(tmp))
    return day1, day2, tmp


@pytest.fixture(scope="module")
def two_reports(days):
    day1, day2, tmp = days
    out = tmp / "reports"
    first = _ctxaudit("report", "--db", day1, "--out", str(out))
    assert first.returncode == 0, first.stderr
    first_json = json.loads((out / "report.json").read_text())
    (tmp / "first-report.json").write_text((out / "report.json").read_text())
    second = _ctxaudit("report", "--db", day2, "--out", str(out))
    assert second.returncode == 0, second.stderr
    return first_json, json.loads((out / "report.json").read_text()), out, second.stdout


def _hop(items: list[dict]) -> set[tuple[str, str]]:
    return {(h["caller"], h["callee"]) for h in items}


@pytest.mark.slow
def test_a_report_states_the_broken_hops_with_cause_and_fix(two_reports):
    first, _, _, _ = two_reports
    broken = {(h["caller"], h["callee"]): h for h in first["hops"] if h["broken"]}
    assert set(broken) == {
        ("gateway", "recommendations"),
        ("checkout", "payments"),
        ("checkout", "notifications"),
        ("checkout", "email-api.example:443"),
    }
    assert broken[("gateway", "recommendations")]["cause"] == "proxy_strips_traceparent"
    assert all(h["fix"] and h["explanation"] for h in broken.values())
    assert first["comparison"] is None and first["history"] == []
    assert first["audit"]["run"]["spans"] == 774 and first["audit"]["sampling"]["overall"]
    f = first["figures"]
    assert (
        0 < f["context_health"] < 1
        and f["broken_hops"] == 4
        and f["findings"] == sum(first["audit"]["run"]["counts"].values())
    )


@pytest.mark.slow
def test_the_comparison_finds_the_fixed_the_new_and_the_worse_hop(two_reports):
    _, second, out, stdout = two_reports
    c = second["comparison"]
    assert _hop(c["new_broken"]) == {("gateway", "cart")}
    assert _hop(c["fixed"]) == {("gateway", "recommendations")}
    assert _hop(c["worse"]) == {("checkout", "payments")} and c["worse"][0]["z"] < -1.96
    worse = c["worse"][0]
    assert worse["after"]["propagation_rate"] < worse["before"]["propagation_rate"]
    assert c["counts"] == {
        "new_broken_hops": 1,
        "fixed_hops": 1,
        "worse_hops": 1,
        "better_hops": 0,
        "unseen_hops": 0,
    }
    assert c["figures"]["broken_hops"] == {"before": 4, "after": 4}
    assert "1 newly broken, 1 fixed, 1 worse, 0 better" in stdout
    assert len(second["history"]) == 1 and len((out / "history.jsonl").read_text().splitlines()) == 2
    md = (out / "report.md").read_text()
    assert "**Newly broken**: gateway → cart (http)" in md and "**Fixed**: gateway → recommendations" in md


def test_a_small_change_on_few_calls_is_not_called_worse():
    def snap(calls: int, propagated: int) -> dict:
        return {
            "generated_at": "t",
            "window_start": 0,
            "window_end": 1,
            "figures": {},
            "hops": [
                {
                    "caller": "a",
                    "callee": "b",
                    "protocol": "http",
                    "calls": calls,
                    "propagated": propagated,
                    "propagation_rate": propagated / calls,
                    "broken": propagated < calls,
                }
            ],
        }

    assert compare(snap(10, 8), snap(10, 6))["worse"] == []  # 80% -> 60% on 10 calls: noise
    assert len(compare(snap(1000, 800), snap(1000, 600))["worse"]) == 1
    assert len(compare(snap(1000, 600), snap(1000, 800))["better"]) == 1
    assert compare(None, snap(10, 8)) is None


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is installed by `make test` (apt-get)")
def test_the_html_is_self_contained_and_displays(two_reports):
    playwright = pytest.importorskip("playwright.sync_api")
    _, _, out, _ = two_reports
    html = (out / "report.html").read_text()
    assert not re.search(
        r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html
    )  # nothing fetched from elsewhere
    assert "<script" not in html and "<link" not in html and "@import" not in html
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"])
        context = browser.new_context(offline=True, viewport={"width": 1200, "height": 900})
        page = context.new_page()
        page.goto((out / "report.html").as_uri())
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        text = page.inner_text("body")
        graph = page.locator("#graph + figure svg")
        assert graph.count() == 1 and "recommendations" in graph.inner_html()  # drawn by Graphviz
        assert graph.bounding_box()["width"] > 300
        charts = page.locator("#trends + figure svg")
        assert charts.count() == 1 and charts.bounding_box()["height"] > 100
        browser.close()
    for expected in (
        "What changed since the previous report",
        "Newly broken",
        "gateway → cart",
        "Fixed",
        "gateway → recommendations",
        "Worse",
        "proxy_strips_traceparent",
        "Fix: Forward the W3C headers",
        "Sampling distortion",
        "fragmentation_factor",
        "context health",
    ):
        assert expected in text, expected
    assert (ARTIFACTS / "report.png").stat().st_size > 50_000


@pytest.mark.slow
def test_gate_exit_codes(two_reports, days, tmp_path):  # two_reports: day 1's report.json
    _, day2, tmp = days

    def gate(*exprs: str, previous: bool = True) -> subprocess.CompletedProcess:
        """Day 2's report against day 1's (--previous), or with no report before it."""
        args = ["report", "--db", day2, "--out", str(tmp_path / "gate")]
        args += (
            ["--previous", str(tmp / "first-report.json")]
            if previous
            else ["--history", str(tmp_path / "new.jsonl")]
        )
        return _ctxaudit(*args, *[a for e in exprs for a in ("--fail-on", e)])

    ok = gate("propagation_rate[gateway->recommendations]<0.99", "orphan_rate>0.99", "worse_hops>1")
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert ok.stdout.count("gate: PASS") == 3
    failed = gate("new_broken_hops>0", "propagation_rate[checkout->payments]<99%", "context_health>=0")
    assert failed.returncode == 3
    assert "FAIL           new_broken_hops>0: the value is 1" in failed.stdout
    assert "FAIL           propagation_rate[checkout->payments]<99%: the value is" in failed.stdout
    unknown_hop = gate("propagation_rate[nobody->nowhere]<1")
    assert unknown_hop.returncode == 4 and "no call from nobody to nowhere" in unknown_hop.stdout
    no_previous = gate("new_broken_hops>0", previous=False)
    assert no_previous.returncode == 4 and "no previous report" in no_previous.stdout
    assert gate("new_broken_hops>0", "propagation_rate[nobody->nowhere]<1").returncode == 3  # a failure wins
    for bad, message in (
        ("orphan_rate>>1", "is not a threshold"),
        ("orphans>1", "unknown figure"),
        ("propagation_rate>1", "unknown figure"),
        ("volume_ratio[a]>1", "per service"),
    ):
        r = gate(bad)
        assert r.returncode == 2 and message in r.stderr, (bad, r.stderr)
    missing = _ctxaudit("report", "--db", str(tmp_path / "none.duckdb"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    bad_since = _ctxaudit("report", "--db", day2, "--out", str(tmp_path / "x"), "--since", "yesterday")
    assert bad_since.returncode == 2 and "duration" in bad_since.stderr
    bad_previous = tmp_path / "prev.json"
    bad_previous.write_text("{}")
    r = _ctxaudit("report", "--db", day2, "--out", str(tmp_path / "x"), "--previous", str(bad_previous))
    assert r.returncode == 1 and "not a report.json" in r.stderr


def test_threshold_grammar():
    t = Threshold.parse(" propagation_rate[ orders -> inventory ] < 99.5% ")
    assert (t.name, t.hop, t.op, t.limit) == ("propagation_rate", ("orders", "inventory"), "<", 0.995)
    t = Threshold.parse("root_inflation[email-api.example:443]>=0.1")
    assert t.service == "email-api.example:443" and t.op == ">=" and t.limit == 0.1
    assert Threshold.parse("new_broken_hops!=0").op == "!="
    assert Threshold.parse("orphan_rate>1e-2").limit == 0.01
    for bad in ("", "orphan_rate", "orphan_rate>", "orphan_rate = 1", "propagation_rate[a->]<1", "x>1"):
        with pytest.raises(GateError):
            Threshold.parse(bad)


def test_the_window_reaches_back_from_the_newest_settled_span():
    s = 1_000_000_000
    spans = {"first_start_ns": 100 * s, "last_start_ns": 200_000 * s}
    w = report_window(spans, since_s=3600, settle_s=60, now_ns=10**6 * s)  # old data: its last hour
    assert (w.start_ns, w.end_ns) == (200_000 * s + 1 - 3600 * s, 200_000 * s + 1)
    w = report_window(spans, since_s=3600, settle_s=60, now_ns=200_030 * s)  # live: up to now minus settle
    assert w.end_ns == 199_970 * s and w.start_ns == 196_370 * s
    assert report_window(spans, since_s=10**9, settle_s=0, now_ns=10**6 * s).start_ns == 100 * s
    with pytest.raises(StoreError, match="no spans"):
        report_window({"first_start_ns": None, "last_start_ns": None}, 3600, 60)


@pytest.mark.slow
def test_a_report_through_the_server_equals_the_files(days, tmp_path):
    day1, _, _ = days
    proc, _, _ = start_server(day1, "--audit-every", "0")
    try:
        served = _ctxaudit("report", "--server", proc.api_url, "--out", str(tmp_path / "served"))
        assert served.returncode == 0, served.stderr
    finally:
        assert stop_server(proc) == 0
    local = _ctxaudit("report", "--db", day1, "--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("served", "local"))
    for key in ("figures", "hops", "services", "window"):
        assert a[key] == b[key], key
    assert a["source"] == proc.api_url and b["source"] == day1
