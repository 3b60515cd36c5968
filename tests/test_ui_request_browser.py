"""The whole request in real Chromium: `ctxaudit serve` ingests a chain that loses its context
twice in a row (gateway -> orders -> inventory, chain-two-hops), the server audits it, and
`ctxaudit ui --server` shows it. A person opens the trace view with no trace id, picks the most
fragmented request, sees its three fragments and both stitched hops, then opens the middle
fragment and gets the same whole request. No deploy button or developer menu is offered.
Screenshots go to test-artifacts/ui/."""

import subprocess
import sys

import pytest

from audit.read.remote import RemoteReader
from audit.server.process import start_server, stop_server
from tests.browser_helpers import NEEDS_CHROMIUM, explorer_on, shot
from tests.serve_helpers import wait_loaded

pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow, NEEDS_CHROMIUM]  # serve, `ctxaudit ui` and real Chromium


@pytest.fixture(scope="module")
def explorer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("request")
    server, port, _ = start_server(str(tmp / "chain.duckdb"), "--audit-every", "0")
    try:
        r = subprocess.run(
            [sys.executable, "-m", "audit", "simulate", "--scenario", "chain-two-hops", "--otlp"]
            + [f"grpc://127.0.0.1:{port}", "--truth", str(tmp / "truth.jsonl")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        remote = RemoteReader(server.api_url)
        wait_loaded(remote)  # acknowledged, then loaded from the staging log
        assert remote.audit({"settings": {"settle_s": 0}, "all": True})["run"]
        top = remote.fragmented_requests(limit=1)[0]
        assert top["fragments"] == 3
        with explorer_on(server.api_url) as url:
            yield url, remote, top
    finally:
        assert stop_server(server) == 0


def _table_texts(page, index: int) -> list[list[str]]:
    rows = page.locator("[data-testid='stTable'] table").nth(index).locator("tbody tr")
    return [[c.strip() for c in rows.nth(i).locator("td").all_inner_texts()] for i in range(rows.count())]


def test_follow_a_request_split_into_three_fragments(explorer, browser):
    url, remote, top = explorer
    # the chain as the store has it: the top trace, its orphan, and that one's orphan
    (first,) = remote.findings(parent_trace_id=int(top["trace_id"], 16), kind="orphan_root")["findings"]
    (second,) = remote.findings(parent_trace_id=int(first["trace_id"], 16), kind="orphan_root")["findings"]
    expected = {top["trace_id"], first["trace_id"], second["trace_id"]}

    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(url)
    page.get_by_role("heading", name="Context health").wait_for(timeout=60_000)
    # people reading findings get no deploy button and no developer menu (client.toolbarMode)
    assert page.get_by_role("button", name="Deploy").count() == 0
    page.locator("[data-testid='stMainMenu']").click()
    page.get_by_text("Print").wait_for(timeout=10_000)  # the viewer's items stay
    assert page.get_by_text("Clear cache").count() == 0 and page.get_by_text("Developer options").count() == 0
    page.keyboard.press("Escape")

    page.get_by_role("link", name="Trace view").click()
    page.get_by_role("heading", name="Most fragmented requests").wait_for(timeout=30_000)
    shot(page, "ui", "requests")
    page.get_by_role("button", name=f"Open {top['trace_id']}").click()

    def whole_request_shown(name: str) -> None:
        page.get_by_text("split into 3 traces").wait_for(timeout=30_000)
        page.locator("[data-testid='stTable']").nth(1).wait_for(timeout=30_000)
        fragments, hops = _table_texts(page, 0), _table_texts(page, 1)
        assert {row[1] for row in fragments} == expected
        assert {row[3] for row in hops} == {first["cause"], second["cause"]}
        assert {row[6] for row in hops} == {f"{f['trace_id']} {f['span_id']}" for f in (first, second)}
        # the waterfall: one chart, a legend entry per fragment
        chart = page.locator("[data-testid='stVegaLiteChart']").first
        chart.wait_for(timeout=30_000)
        shot(page, "ui", name)

    whole_request_shown("request-from-top")
    # in a new session, the middle fragment alone leads up to its parent and down to its orphan
    page.close()
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(url)
    page.get_by_role("link", name="Trace view").click()
    page.get_by_role("heading", name="Most fragmented requests").wait_for(timeout=30_000)
    box = page.get_by_label("trace id (32 hex digits)")
    box.fill(first["trace_id"])
    box.press("Enter")
    whole_request_shown("request-from-middle")
    page.close()
