"""Findings of a run, filtered by kind, service, hop, protocol and cause; open one's trace."""

import pandas as pd
import streamlit as st

from audit.store.reader import FINDING_KINDS
from ui import data

st.title("Findings")
run = data.audit_run()
if run is None:
    data.no_run_yet()
services = sorted({e["caller"] for e in run["edges"]} | {e["callee"] for e in run["edges"]})
causes = sorted({e["cause"] for e in run["edges"] if e["cause"]})
cols = st.columns(6)
pick = lambda col, label, options: col.selectbox(label, ["(any)"] + list(options))  # noqa: E731
filters = {
    "kind": pick(cols[0], "kind", FINDING_KINDS), "service": pick(cols[1], "service", services),
    "caller": pick(cols[2], "caller", services), "callee": pick(cols[3], "callee", services),
    "protocol": pick(cols[4], "protocol", ["http", "grpc", "rpc", "messaging", "db", "unknown"]),
    "cause": pick(cols[5], "cause", causes),
}  # fmt: skip
filters = {k: v for k, v in filters.items() if v != "(any)"}
size = 100
page_no = st.number_input("page", min_value=1, value=1, step=1)
page = data.findings(run["run_id"], limit=size, offset=(page_no - 1) * size, **filters)
st.caption(f"{page['total']:,} findings in run {run['run_id']}")
rows = page["findings"]
st.dataframe(pd.DataFrame([{
    "kind": f["kind"], "service": f["service"], "hop": f"{f['caller'] or '?'} → {f['callee'] or '?'}",
    "protocol": f["protocol"], "cause": f["cause"], "fix": f["fix"], "trace": f["trace_id"],
    "parent confidence": (f["probable_parent"] or {}).get("confidence"),
} for f in rows]), hide_index=True, width="stretch")  # fmt: skip
if rows:
    chosen = st.selectbox("open the trace of", [f"{f['trace_id']} ({f['kind']}, {f['service']})" for f in rows])
    if st.button("Open trace"):
        st.session_state["trace_id"] = chosen.split(" ")[0]
        st.switch_page("pages/trace.py")
