"""A fragment as a waterfall, with the fragment its root was stitched to joined in: where the
context broke, and how confident the link is."""

import altair as alt
import pandas as pd
import streamlit as st

from ui import data
from ui.text import md

st.title("Trace view")
given = st.text_input("trace id (32 hex digits)", value=st.session_state.get("trace_id", ""))
if not given:
    st.info("Open a trace from the Findings page, or paste a trace id.")
    st.stop()
try:
    trace_id = int(given, 16)
    if len(given) != 32:
        raise ValueError
except ValueError:
    st.error(f"{md(repr(given))} is not a trace id: 32 hex digits.")
    st.stop()
spans = data.trace(trace_id)
if not spans:
    st.warning("No span of this trace is stored.")
    st.stop()
run = data.audit_run(st.session_state.get("trace_run_id"))  # the run it was opened from, else the last
found = data.findings(run["run_id"], trace_id=trace_id, limit=50)["findings"] if run else []
parent = next((f["probable_parent"] for f in found if f["probable_parent"]), None)
rows = [dict(s, fragment="this trace") for s in spans]
if parent:
    rows += [dict(s, fragment="stitched parent trace") for s in data.trace(int(parent["trace_id"], 16))]
    st.info(
        f"Its root's probable parent is span {parent['span_id']} in {md(parent['service'])}, trace "
        f"{parent['trace_id']}, with confidence {parent['confidence']:.2f}: the context broke on that hop."
    )
for f in found:
    st.warning(
        f"**{f['kind']}** at {md(f['service'])} ({md(f['caller'] or '?')} → {md(f['callee'] or '?')}, "
        f"{md(f['protocol'])}): {md(f['explanation'])} Fix: {md(f['fix'])}"
    )
start = min(r["start_ns"] for r in rows)
frame = pd.DataFrame(
    [
        {
            "span": f"{r['service_name']}: {r['name']}",
            "fragment": r["fragment"],
            "kind": r["kind"],
            "start ms": (r["start_ns"] - start) / 1e6,
            "end ms": (max(r["end_ns"], r["start_ns"]) - start) / 1e6,
            "span id": f"{r['span_id']:016x}",
            "status": r["status_code"],
        }
        for r in sorted(rows, key=lambda r: r["start_ns"])
    ]
)
st.altair_chart(
    alt.Chart(frame)
    .mark_bar()
    .encode(
        x="start ms:Q",
        x2="end ms:Q",
        y=alt.Y("span:N", sort=None, title=None),
        color="fragment:N",
        tooltip=["span", "kind", "span id", "status", "start ms", "end ms"],
    )
    .properties(height=max(120, 22 * len(frame))),
    width="stretch",
)
