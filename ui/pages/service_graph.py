"""The service graph, as a trace backend shows it and as it really is; a broken edge's findings."""

import pandas as pd
import streamlit as st

from graph.service_graph import build_graphs, to_dot
from ui import data

st.title("Service graph")
run = data.audit_run()
if run is None:
    data.no_run_yet()
view = st.radio("view", ["repaired", "observed"], horizontal=True,
                help="repaired: every real call, with drops and stitches; observed: what a trace backend shows.")  # fmt: skip
observed, repaired = build_graphs(run["edges"], run["roots"])
st.graphviz_chart(to_dot(repaired if view == "repaired" else observed), width="stretch")

broken = [e for e in run["edges"] if e["broken"]]
if not broken:
    st.success("No edge loses context in this run.")
    st.stop()
labels = {f"{e['caller']} → {e['callee']} ({e['protocol']}, {e['propagation_rate']:.0%} propagated)": e for e in broken}
edge = labels[st.selectbox("broken edge", list(labels))]
page = data.findings(run["run_id"], caller=edge["caller"], callee=edge["callee"], protocol=edge["protocol"], limit=200)
st.caption(f"{page['total']:,} findings on this edge; likely cause: {edge['cause']}")
st.dataframe(pd.DataFrame([{
    "kind": f["kind"], "service": f["service"], "span": f["span_name"], "trace": f["trace_id"], "cause": f["cause"],
    "parent confidence": (f["probable_parent"] or {}).get("confidence"), "fix": f["fix"],
} for f in page["findings"]]), hide_index=True, width="stretch")  # fmt: skip
