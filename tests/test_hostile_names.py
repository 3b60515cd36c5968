"""Span data is shown as text. Services, operations (span names), peers (attribute values),
attribute names and status messages that carry Markdown images and links to a local beacon,
raw HTML and script, `javascript:` links, Streamlit directives, LaTeX, DOT injection, very long
names and bidi or zero-width characters are ingested over real OTLP into a running
`ctxaudit serve`; every page of the explorer and the HTML report are opened in Chromium. No
request reaches the beacon, and each name reads on the page as it was typed."""

import html
import http.server
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from markdown_it import MarkdownIt

from audit.report.render import md_text
from audit.scenarios.model import BUNDLED
from audit.server.process import start_server, stop_server
from tests.browser_helpers import NEEDS_CHROMIUM, explorer_on, shot
from tests.otlp_builders import request, span
from tests.serve_helpers import wait_loaded

pytest.importorskip("playwright.sync_api")
JOINER = "\u2060"  # what ui.text.md and the Markdown report put inside URLs and the like: invisible


class Beacon:
    """A loopback HTTP server that records every request: nothing on the pages may reach it."""

    def __init__(self):
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self):
                hits.append(f"{self.command} {self.path}")
                self.send_response(204)
                self.end_headers()

            do_GET = do_POST = do_HEAD = do_OPTIONS = _record

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def hostile_names(b: str) -> dict[str, str]:
    """shop-small's names -> what a hostile (or careless) sender calls them."""
    return {
        "recommendations": f"recs ![beacon]({b}/md-image.png) [link]({b}/md-link) <{b}/autolink>",
        "payments": f'pay <img src="{b}/html-img.png"> <script>fetch("{b}/script")</script> '
        "[js](javascript:alert(1)) *em* __strong__ `code` ~~del~~",
        "notifications": ":red[notify] :material/home: :material_home: :streamlit: :smile: $x^2$ "
        "&amp; &lt;b&gt; &#x41; # | > \\",
        "cart": '"];x [label=<<b>dot</b>> URL="javascript:alert(1)" image="/etc/passwd"]; y [label="\\N\\G',
        "checkout": "rtl \u202eevil\u202c zero\u200bwidth \u2066iso\u2069 a -> b <- c -- d >= e "
        + "long" * 60,
        "api.ml-vendor.example": f"{b}/bare-url.png mail@example.com www.example.com",
        "GET /recs/{user}": f"GET ![op]({b}/op.png) <b>bold</b> :blue[op]",
    }


def hostile_scenario(path: Path, names: dict[str, str]) -> None:
    """shop-small with every string that is one of `names` (service, operation, peer) renamed."""

    def rename(x):
        if isinstance(x, dict):
            return {rename(k): rename(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rename(v) for v in x]
        return names.get(x, x) if isinstance(x, str) else x

    scenario = rename(yaml.safe_load((BUNDLED / "shop-small.yaml").read_text()))
    scenario["name"] = "shop-hostile"
    path.write_text(yaml.safe_dump(scenario, allow_unicode=True))


def hostile_attributes_request(b: str, service: str):
    """One erroring span whose attribute names and status message are hostile (OTLP/HTTP)."""
    s = span(
        bytes(range(1, 17)),
        bytes(range(1, 9)),
        name=f"status ![s]({b}/span-name.png)",
        kind=2,
        start=10**18,  # long before the simulated traffic: the report's window ends at its newest span
        end=10**18 + 10**9,
        attrs={f"![a]({b}/attr.png)": "<img src=x>", "<script>x</script>": f"[v]({b}/attr-value)"},
    )
    s.status.code = 2
    s.status.message = f'<img src="{b}/status.png"> ![m]({b}/status-md.png) :red[status]'
    return request([s], service=service)


def _ctxaudit(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "audit", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _read_as_typed(text: str) -> str:
    return text.replace(JOINER, "")


@pytest.fixture(scope="module")
def beacon():
    b = Beacon()
    yield b
    b.close()


@pytest.fixture(scope="module")
def names(beacon):
    return hostile_names(beacon.url)


@pytest.fixture(scope="module")
def live(tmp_path_factory, beacon, names):
    """A server holding the hostile spans, audited; its read API's URL and the report's directory."""
    tmp = tmp_path_factory.mktemp("hostile")
    hostile_scenario(tmp / "hostile.yaml", names)
    server, port, http_url = start_server(str(tmp / "live.duckdb"), "--audit-every", "0")
    try:
        _ctxaudit(
            "simulate",
            "--scenario",
            str(tmp / "hostile.yaml"),
            "--seed",
            "3",
            "--otlp",
            f"grpc://127.0.0.1:{port}",
            "--truth",
            str(tmp / "truth.jsonl"),
        )
        body = hostile_attributes_request(beacon.url, names["payments"]).SerializeToString()
        answer = urllib.request.urlopen(
            urllib.request.Request(
                http_url, data=body, headers={"content-type": "application/x-protobuf"}, method="POST"
            ),
            timeout=30,
        )
        assert answer.status == 200
        wait_loaded(server.api_url)  # acknowledged spans reach DuckDB a moment later (staging log)
        _ctxaudit("audit", "--server", server.api_url, "--settle", "0")
        _ctxaudit("report", "--server", server.api_url, "--settle", "0", "--out", str(tmp / "report"))
        yield server.api_url, tmp / "report"
    finally:
        assert stop_server(server) == 0


@pytest.fixture(scope="module")
def explorer(live):
    api_url, _ = live
    with explorer_on(api_url) as url:
        yield url


def _shot(page, name: str) -> None:
    shot(page, "hostile", name)


def _page_text(page) -> str:
    return _read_as_typed(page.inner_text("body"))


def _no_active_content(page, beacon_url: str) -> None:
    """No element that loads or links anything from span data: no image, script, frame or
    link to the beacon or to javascript:, nothing KaTeX typeset."""
    for selector, attr in (
        ("img", "src"),
        ("script", "src"),
        ("iframe", "src"),
        ("a", "href"),
        ("image", "href"),
    ):
        for value in page.locator(selector).evaluate_all(
            f"els => els.map(e => e.getAttribute('{attr}') || e.getAttribute('xlink:{attr}') || '')"
        ):
            assert beacon_url not in value and not value.lower().startswith("javascript:"), (selector, value)
    assert page.locator(".katex").count() == 0


def _choose(page, label: str, option_text: str) -> None:
    """Pick the option of a selectbox (its options are plain text) that contains `option_text`."""
    box = page.get_by_label(label)
    box.click()
    page.get_by_role("option").filter(has_text=option_text).first.click()
    page.wait_for_timeout(500)


def _wait_for_text(locator, expected: str, timeout_s: float = 30) -> None:
    """Until the element's text, as it reads, starts with `expected` (the page reruns after a choice)."""
    deadline = time.monotonic() + timeout_s
    while True:
        locator.wait_for(timeout=timeout_s * 1000)
        shown = _read_as_typed(locator.inner_text())
        if shown.startswith(expected):
            return
        assert time.monotonic() < deadline, f"{shown!r} does not read {expected!r}"
        time.sleep(0.3)


def _hover_for_tooltip(page, chart, wanted: str) -> str:
    """Move the mouse over the chart until Vega's tooltip shows `wanted`; the tooltip's text."""
    chart.scroll_into_view_if_needed()
    box = chart.bounding_box()
    tip = page.locator("#vg-tooltip-element")
    for y in range(int(box["y"]) + 5, int(box["y"] + box["height"]), 6):
        for x in (box["x"] + box["width"] * f for f in (0.5, 0.7, 0.9, 0.3)):
            page.mouse.move(x, y)
            if tip.count() and wanted in (text := tip.inner_text()):
                assert tip.locator("img, a, script").count() == 0
                return text
    raise AssertionError(f"no tooltip showed {wanted!r}")


@pytest.mark.slow
@NEEDS_CHROMIUM
def test_every_page_and_the_report_show_hostile_names_as_typed(explorer, live, browser, beacon, names):
    _, report_dir = live
    page = browser.new_page(viewport={"width": 1600, "height": 1200})
    page.goto(explorer)
    page.get_by_role("heading", name="Context health").wait_for(timeout=60_000)
    page.get_by_text("Worst hops").wait_for(timeout=60_000)
    grid = page.locator("[data-testid='stDataFrame']").first
    grid.get_by_text(names["recommendations"], exact=False).first.wait_for(state="attached", timeout=30_000)
    _no_active_content(page, beacon.url)
    _shot(page, "overview")

    page.get_by_role("link", name="Service graph").click()
    page.get_by_role("heading", name="Service graph").wait_for(timeout=30_000)
    svg = page.locator("[data-testid='stGraphVizChart'] svg").first
    svg.wait_for(timeout=30_000)
    graph_text = svg.text_content()
    for service in (
        "recommendations",
        "payments",
        "notifications",
        "cart",
        "checkout",
        "api.ml-vendor.example",
    ):
        assert names[service] in graph_text, service  # one node each, its label as typed
    # every node of the graph is one of the scenario's services or peers: the DOT names made no node
    nodes = svg.locator("g.node").count()
    assert nodes == len(yaml.safe_load((BUNDLED / "shop-small.yaml").read_text())["services"]) + 6
    for caller, callee in (
        ("gateway", names["recommendations"]),
        (names["checkout"], names["payments"]),
        (names["checkout"], names["notifications"]),
    ):
        _choose(page, "broken edge (worst first)", callee[:40])
        _wait_for_text(page.get_by_role("heading", level=3).first, f"{caller} → {callee}")
        _no_active_content(page, beacon.url)
    _shot(page, "service-graph")
    _choose(page, "broken edge (worst first)", names["recommendations"][:40])
    _wait_for_text(page.get_by_role("heading", level=3).first, f"gateway → {names['recommendations']}")
    page.get_by_role("button", name="All findings on this edge").click()

    page.get_by_role("heading", name="Findings").wait_for(timeout=30_000)
    page.get_by_text(re.compile(r"^[\d,]+ findings in run")).wait_for(timeout=30_000)
    assert page.get_by_label("callee").input_value() == names["recommendations"]  # the edge's filter
    grid = page.locator("[data-testid='stDataFrame']").first
    grid.get_by_text(names["recommendations"], exact=True).first.wait_for(state="attached", timeout=30_000)
    _no_active_content(page, beacon.url)
    _shot(page, "findings")
    page.get_by_role("button", name="Open trace").click()

    page.get_by_role("heading", name="Trace view").wait_for(timeout=30_000)
    alert = page.get_by_text("Fix:").first
    alert.wait_for(timeout=30_000)
    page.locator("canvas, svg").first.wait_for(timeout=30_000)
    text = _page_text(page)
    assert f"at {names['recommendations']} (gateway → {names['recommendations']}, http)" in text
    tooltip = _hover_for_tooltip(
        page, page.locator("[data-testid='stVegaLiteChart']").first, names["GET /recs/{user}"]
    )
    assert f"{names['recommendations']}: {names['GET /recs/{user}']}" in tooltip  # the span's label, as text
    _no_active_content(page, beacon.url)
    _shot(page, "trace")

    page.get_by_role("link", name="Sampling").click()
    page.get_by_role("heading", name="Sampling distortion").wait_for(timeout=30_000)
    page.get_by_text("Per service").wait_for(timeout=30_000)
    page.get_by_text(names["recommendations"], exact=False).first.wait_for(state="attached", timeout=30_000)
    _no_active_content(page, beacon.url)
    _shot(page, "sampling")

    page.goto((report_dir / "report.html").as_uri())
    page.get_by_role("heading", name="Worst hops").wait_for(timeout=30_000)
    text = page.inner_text("body")
    for service in ("recommendations", "payments", "notifications", "checkout"):
        assert names[service] in text, service  # the tables and the graph's labels
    assert page.locator("script").count() == 0  # the report has no script of its own
    _no_active_content(page, beacon.url)
    _shot(page, "report")
    page.wait_for_timeout(1000)  # anything a page had started to load has arrived by now
    page.close()
    assert beacon.hits == []


@pytest.mark.slow
def test_the_markdown_report_shows_hostile_names_as_typed(live, names):
    """report.md, rendered by a CommonMark renderer with GFM tables: no image, link, HTML or
    emphasis comes out of the names, and each reads as typed."""
    _, report_dir = live
    rendered = (
        MarkdownIt("commonmark")
        .enable(["table", "strikethrough"])
        .render((report_dir / "report.md").read_text())
    )
    assert "<img" not in rendered and "<a " not in rendered and "<script" not in rendered
    text = _read_as_typed(html.unescape(re.sub(r"<[^>]+>", "", rendered)))
    for service in ("recommendations", "payments", "notifications", "checkout"):
        assert names[service] in text, service
    assert json.loads((report_dir / "report.json").read_text())["hops"]  # the report has hops to show


HOSTILE_TEXT = [
    "recs ![beacon](http://127.0.0.1:9/b.png)",
    "[link](javascript:alert(1)) <http://127.0.0.1:9/auto> <img src=x> &amp; &#x41;",
    "*em* _em_ **strong** `code` ~~del~~ $x$ a | b \\ back\\slash",
    "http://127.0.0.1:9/bare www.example.com mail@example.com",
    "line\nbreak # not a heading",
]


@pytest.mark.parametrize("name", HOSTILE_TEXT)
def test_md_text_reads_as_typed_in_a_table_cell_and_a_list_item(name):
    doc = (
        f"| hop | protocol |\n|---|---|\n| {md_text(name)} → b | http |\n\n- Newly broken: {md_text(name)}\n"
    )
    rendered = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(doc)
    for tag in ("<img", "<a ", "<em", "<strong", "<code", "<s>", "<del", "<h1"):
        assert tag not in rendered, tag
    assert rendered.count("<td>") == 2  # the name stayed in its cell
    text = _read_as_typed(html.unescape(re.sub(r"<[^>]+>", "", rendered)))
    typed = name.replace("\n", " ")
    assert f"{typed} → b" in text and f"Newly broken: {typed}" in text
    assert "://" not in md_text(name).replace("\\", "")  # GFM's bare-URL links need the joiner-free form
