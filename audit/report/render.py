"""report.html and report.md from a report (build.py). The HTML is one self-contained file:
styles inline, the service graph drawn by Graphviz and the charts by Vega-Lite (Altair and
vl-convert), all as inline SVG, so it opens offline and in mail, with no script."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from pathlib import Path

import altair as alt
import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from graph.service_graph import build_graphs, to_dot

from .figures import HEADLINE
from .gate import COMPARISON

log = logging.getLogger(__name__)

_TEMPLATES = Path(__file__).parent / "templates"
_TIME_AXIS = alt.Axis(format="%m-%d %H:%M", labelAngle=-30)


def _env() -> Environment:
    env = Environment(
        loader=FileSystemLoader(_TEMPLATES),
        # the HTML template is report.html.j2: by extension alone it would not be escaped
        autoescape=select_autoescape(["html", "html.j2"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters |= {"pct": _pct, "num": _num, "when": _when, "ratio": _ratio, "md": md_text}
    return env


# Span data in the Markdown report. Names sit inside lines (table cells, list items), so only
# what acts there is escaped: emphasis, code, links and images, raw HTML and entities, table
# cells, strikethrough, math. Bare URLs and e-mail addresses, which GFM links after parsing,
# get an invisible word joiner that keeps them as text.
_MD_ESCAPED = str.maketrans({c: "\\" + c for c in "\\`*_[]<>|~&$"})
_MD_AUTOLINK = re.compile(r"(?i:(?<=https:)|(?<=http:))(?=//)|(?i:(?<=www))(?=\.)|(?<=@)(?=[-\w])")
_MD_LINE_BREAKS = str.maketrans({"\r": " ", "\n": " ", "\u2028": " ", "\u2029": " "})


def md_text(value: object) -> str:
    """`value` (a name from span data, or any text) as Markdown that reads as the text does,
    on one line."""
    text = _MD_AUTOLINK.sub("\u2060", str(value).translate(_MD_LINE_BREAKS))
    return text.translate(_MD_ESCAPED)


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}%}"


def _num(x: float | int | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:,}" if isinstance(x, int) else f"{x:,.3f}"


def _ratio(figure: dict | None) -> str:
    """A sampling figure with its interval: 0.93 (0.90-0.95)."""
    if not figure or figure.get("value") is None:
        return "n/a"
    if figure.get("ci_low") is None:
        return f"{figure['value']:.3f}"
    return f"{figure['value']:.3f} ({figure['ci_low']:.3f}-{figure['ci_high']:.3f})"


def _when(ns_or_iso: int | str) -> str:
    if isinstance(ns_or_iso, str):
        return ns_or_iso.replace("T", " ").replace("Z", " UTC")
    return datetime.fromtimestamp(ns_or_iso / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def graph_svg(report: dict) -> str | None:
    """The repaired service graph, broken hops in red; None (and a log line) without Graphviz."""
    import graphviz

    audit = report["audit"]
    repaired = build_graphs(audit["edges"], audit["run"]["roots"])[1]
    try:
        svg = graphviz.Source(to_dot(repaired)).pipe(format="svg").decode()
    except graphviz.ExecutableNotFound:
        log.warning(
            "Graphviz's dot is not installed (apt-get install graphviz): the report has no graph image"
        )
        return None
    return svg[svg.index("<svg") :]  # inline: no XML prolog or doctype


def _svg(chart: alt.TopLevelMixin) -> str:
    import vl_convert

    return vl_convert.vegalite_to_svg(chart.to_dict())


def trend_svg(report: dict) -> str:
    points = report["history"] + [{"window_end": report["window"]["end"], "figures": report["figures"]}]
    frame = pd.DataFrame(
        [
            {
                "window end": pd.to_datetime(p["window_end"], unit="ns", utc=True),
                "context health": p["figures"]["context_health"],
                "orphan roots / roots": p["figures"]["orphan_rate"],
                "broken hops": p["figures"]["broken_hops"],
            }
            for p in points
        ]
    )
    shares = frame.melt(
        id_vars="window end", value_vars=["context health", "orphan roots / roots"], var_name="figure"
    )
    left = (
        alt.Chart(shares, width=380, height=180, title="Context health and orphan rate")
        .mark_line(point=True)
        .encode(
            x=alt.X("window end:T", title=None, axis=_TIME_AXIS),
            y=alt.Y("value:Q", title=None, axis=alt.Axis(format="%")),
            color=alt.Color("figure:N", legend=alt.Legend(orient="bottom", title=None)),
        )
    )
    right = (
        alt.Chart(frame, width=300, height=180, title="Broken hops")
        .mark_bar(color="#c0392b")
        .encode(
            x=alt.X("window end:T", title=None, axis=_TIME_AXIS),
            y=alt.Y("broken hops:Q", title=None, axis=alt.Axis(tickMinStep=1)),
        )
    )
    return _svg(alt.hconcat(left, right))


def distorted_edges(report: dict) -> list[dict]:
    """The sampled hops whose callee side is not always stored with the caller's."""
    return [
        e
        for e in (report["audit"].get("sampling") or {}).get("edges", [])
        if any(
            (e[k]["value"] is not None and e[k]["value"] < 1)
            for k in ("propagation_rate", "conditional_capture_rate")
        )
    ]


def sampling_svg(report: dict) -> str | None:
    """Per hop whose callee side is not always stored: the propagation and capture rates with
    their 95% intervals."""
    rows = []
    for e in distorted_edges(report):
        for key, label in (
            ("propagation_rate", "propagation rate"),
            ("conditional_capture_rate", "callee stored"),
        ):
            f = e[key]
            if f["value"] is not None and f["ci_low"] is not None:
                rows.append(
                    {
                        "hop": f"{e['caller']} → {e['callee']} ({e['protocol']})",
                        "figure": label,
                        "value": f["value"],
                        "low": f["ci_low"],
                        "high": f["ci_high"],
                    }
                )
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    base = alt.Chart(frame).encode(
        y=alt.Y("hop:N", title=None, sort=None),
        yOffset="figure:N",
        color=alt.Color("figure:N", legend=alt.Legend(orient="bottom", title=None)),
    )
    bars = base.mark_rule(strokeWidth=2).encode(
        x=alt.X("low:Q", title="95% interval", axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])),
        x2="high:Q",
    )
    dots = base.mark_point(filled=True, size=50).encode(x="value:Q")
    return _svg((bars + dots).properties(width=520, height=alt.Step(14), title="Sampling: per hop"))


def _context(report: dict) -> dict:
    broken = [h for h in report["hops"] if h["broken"]]
    sampling = report["audit"].get("sampling") or {}
    return {
        "r": report,
        "broken": broken,
        "headline": HEADLINE,
        "comparison_names": COMPARISON,
        "overall": sampling.get("overall") or {},
        "sampling_edges": distorted_edges(report),
        "sampling_services": sampling.get("services", []),
    }


def render_html(report: dict) -> str:
    ctx = _context(report) | {
        "graph": graph_svg(report),
        "trend": trend_svg(report),
        "sampling_chart": sampling_svg(report),
    }
    return _env().get_template("report.html.j2").render(**ctx)


def render_markdown(report: dict) -> str:
    return _env().get_template("report.md.j2").render(**_context(report))
