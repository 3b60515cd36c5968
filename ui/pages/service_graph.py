"""The service graph, as a trace backend shows it and as it really is; a broken edge, drawn
bold, with its findings, and the way to all of them on the Findings page."""

import pandas as pd
import streamlit as st

from graph.service_graph import build_graphs, to_dot
from ui import data
from ui.text import md

st.title("Service graph")
run = data.audit_run()
if run is None:
    data.no_run_yet()
view = st.radio(
    "view",
    ["repaired", "observed"],
    horizontal=True,
    help="repaired: every real call, with drops and stitches; observed: what a trace backend shows.",
)
broken = sorted((e for e in run["edges"] if e["broken"]), key=lambda e: -e["dropped"])
edge = None
if broken:
    labels = {
        f"{e['caller']} → {e['callee']} ({e['protocol']}, {e['propagation_rate']:.0%} propagated, "
        f"{e['dropped']:,} dropped)": e
        for e in broken
    }
    edge = labels[st.selectbox("broken edge (worst first)", list(labels))]
observed, repaired = build_graphs(run["edges"], run["roots"])
highlight = (edge["caller"], edge["callee"]) if edge else None
st.graphviz_chart(to_dot(repaired if view == "repaired" else observed, highlight), width="stretch")
st.caption(
    "Red: edges that lose context, with the share of stored calls that kept it. Bold: the chosen edge."
)
if edge is None:
    st.success("No edge loses context in this run.")
    st.stop()

hop = {"caller": edge["caller"], "callee": edge["callee"], "protocol": edge["protocol"]}
page = data.findings(run["run_id"], limit=20, **hop)
st.subheader(f"{md(edge['caller'])} → {md(edge['callee'])}")
st.caption(f"{page['total']:,} findings on this edge; likely cause: {md(edge['cause'])}")
st.dataframe(
    pd.DataFrame(
        [
            {
                "kind": f["kind"],
                "service": f["service"],
                "span": f["span_name"],
                "trace": f["trace_id"],
                "cause": f["cause"],
                "parent confidence": (f["probable_parent"] or {}).get("confidence"),
                "fix": f["fix"],
            }
            for f in page["findings"]
        ]
    ),
    hide_index=True,
    width="stretch",
)
if st.button("All findings on this edge"):
    st.session_state["findings_filters"] = hop | {"run_id": run["run_id"]}
    st.switch_page("pages/findings.py")
