"""The explorer end to end in real Chromium: `ctxaudit serve` ingesting, `ctxaudit ui --server`
reading through its API, and a person's path through the pages: every page opens, and an edge
leads to its findings and a finding to its trace. Screenshots go to test-artifacts/ui/."""

import re
import subprocess
import sys

import pytest

from audit.server.process import start_server, stop_server
from tests.browser_helpers import NEEDS_CHROMIUM, explorer_on, shot
from tests.serve_helpers import wait_loaded

pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow, NEEDS_CHROMIUM]  # `ctxaudit ui` in real Chromium


def _ctxaudit(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "audit", *args], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def explorer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    # an empty store: the spans arrive over OTLP, and the audit is asked for in the browser
    server, port, _ = start_server(str(tmp / "live.duckdb"), "--audit-every", "0")
    try:
        _ctxaudit(
            "simulate",
            "--scenario",
            "shop-small",
            "--seed",
            "2",
            "--otlp",
            f"grpc://127.0.0.1:{port}",
            "--truth",
            str(tmp / "t2.jsonl"),
        )
        wait_loaded(server.api_url)  # acknowledged spans reach DuckDB a moment later (staging log)
        with explorer_on(server.api_url) as url:
            yield url
    finally:
        assert stop_server(server) == 0


def _shot(page, name: str) -> None:
    shot(page, "ui", name)


def _open(page, link: str, heading: str) -> None:
    page.get_by_role("link", name=link).click()
    page.get_by_role("heading", name=heading).wait_for(timeout=30_000)


def test_audit_now_then_every_page_and_the_path_from_an_edge_to_a_trace(explorer, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(explorer)
    page.get_by_role("heading", name="Context health").wait_for(timeout=60_000)
    page.get_by_text("spans/s (last minute)").wait_for(timeout=30_000)  # the live server's ingest figures
    page.get_by_text("No audit run").wait_for(timeout=30_000)
    _shot(page, "overview-before-audit")
    page.get_by_role("button", name="Audit now").click()
    page.get_by_text("audit run 1:").wait_for(timeout=120_000)  # the server's summary of its run
    page.get_by_text("Worst hops").wait_for(timeout=30_000)
    page.get_by_text("gateway → recommendations").first.wait_for(
        state="attached", timeout=30_000
    )  # a grid cell
    _shot(page, "overview")

    _open(page, "Service graph", "Service graph")
    graph = page.locator("[data-testid='stGraphVizChart'] svg").first  # rendered by Graphviz in the page
    graph.wait_for(timeout=30_000)
    assert "recommendations" in graph.inner_html() and "gateway" in graph.inner_html()
    caption = page.get_by_text(re.compile(r"^[\d,]+ findings on this edge"))
    caption.wait_for(timeout=30_000)
    on_edge = caption.inner_text().split()[0]  # the chosen (worst) edge's findings
    _shot(page, "service-graph")
    page.get_by_role("button", name="All findings on this edge").click()

    page.get_by_role("heading", name="Findings").wait_for(timeout=30_000)
    page.get_by_text(f"{on_edge} findings in run 1").wait_for(timeout=30_000)  # the edge's filters came along
    _shot(page, "findings")
    page.get_by_role("button", name="Open trace").click()
    page.get_by_role("heading", name="Trace view").wait_for(timeout=30_000)
    page.get_by_text("Fix:").first.wait_for(timeout=30_000)  # the finding on this trace, with its fix
    page.locator("canvas, svg").first.wait_for(timeout=30_000)  # the waterfall
    _shot(page, "trace")

    _open(page, "Sampling", "Sampling distortion")
    page.get_by_text("Per edge").wait_for(timeout=30_000)
    page.get_by_text("fragmentation factor").first.wait_for(timeout=30_000)
    _shot(page, "sampling")
    page.close()
