"""Findings of a run, filtered by kind, service, hop, protocol, cause and time; open one's trace."""

from datetime import UTC, datetime

import pandas as pd
import streamlit as st

from audit.contract.document import FINDING_KINDS
from ui import data

PROTOCOLS = ["http", "grpc", "rpc", "messaging", "db", "unknown"]
ANY = "(any)"


def _time(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).replace(microsecond=0)


st.title("Findings")
runs = data.audit_runs()
if not runs:
    data.no_run_yet()
given = st.session_state.pop("findings_filters", {})  # from the service graph's "All findings on this edge"
run_ids = [r["run_id"] for r in runs]
chosen = st.selectbox(
    "audit run",
    run_ids,
    index=run_ids.index(given["run_id"]) if given.get("run_id") in run_ids else 0,
    format_func=lambda i: next(
        f"run {i}: window ending {_time(r['window_end_ns']):%Y-%m-%d %H:%M:%S} UTC"
        for r in runs
        if r["run_id"] == i
    ),
)
run = data.audit_run(chosen)
services = sorted({e["caller"] for e in run["edges"]} | {e["callee"] for e in run["edges"]})
causes = sorted({e["cause"] for e in run["edges"] if e["cause"]})
cols = st.columns(6)


def pick(col, label: str, options: list[str]) -> str:
    options = [ANY] + options
    return col.selectbox(
        label, options, index=options.index(given[label]) if given.get(label) in options else 0
    )


filters = {
    "kind": pick(cols[0], "kind", list(FINDING_KINDS)),
    "service": pick(cols[1], "service", services),
    "caller": pick(cols[2], "caller", services),
    "callee": pick(cols[3], "callee", services),
    "protocol": pick(cols[4], "protocol", PROTOCOLS),
    "cause": pick(cols[5], "cause", causes),
}
filters = {k: v for k, v in filters.items() if v != ANY}
start, end = _time(run["window_start_ns"]), _time(run["window_end_ns"])
if end > start:
    since, until = st.slider(
        "span start (UTC)", min_value=start, max_value=end, value=(start, end), format="MM-DD HH:mm:ss"
    )
    # the ends are whole seconds: an end left where it was does not bound the findings
    if since != start:
        filters["since_ns"] = int(since.timestamp()) * 10**9
    if until != end:
        filters["until_ns"] = int(until.timestamp()) * 10**9
size = 100
page_no = st.number_input("page", min_value=1, value=1, step=1)
page = data.findings(run["run_id"], limit=size, offset=(page_no - 1) * size, **filters)
st.caption(f"{page['total']:,} findings in run {run['run_id']}")
rows = page["findings"]
st.dataframe(
    pd.DataFrame(
        [
            {
                "kind": f["kind"],
                "service": f["service"],
                "hop": f"{f['caller'] or '?'} → {f['callee'] or '?'}",
                "protocol": f["protocol"],
                "cause": f["cause"],
                "fix": f["fix"],
                "trace": f["trace_id"],
                "parent confidence": (f["probable_parent"] or {}).get("confidence"),
            }
            for f in rows
        ]
    ),
    hide_index=True,
    width="stretch",
)
if rows:
    chosen = st.selectbox(
        "open the trace of", [f"{f['trace_id']} ({f['kind']}, {f['service']})" for f in rows]
    )
    if st.button("Open trace"):
        st.session_state["trace_id"], st.session_state["trace_run_id"] = chosen.split(" ")[0], run["run_id"]
        st.switch_page("pages/trace.py")
