"""Overview: context health now and over time, the worst hops, and (on a live server) how
ingestion is going, with an audit on demand."""

import altair as alt
import pandas as pd
import streamlit as st

from audit.contract.figures import context_health
from ui import data

st.title("Context health")
counts = data.store_counts()
cols = st.columns(4)
cols[0].metric("spans stored", f"{counts['spans']:,}")
cols[1].metric(
    "traces", f"≈{counts['traces_approx']:,}", help="Approximate (HyperLogLog): exact in `ctxaudit stats`."
)
cols[2].metric("services", counts["services"])

if data.live():
    st.subheader("Ingest")
    h = data.ingest()
    c = st.columns(5)
    c[0].metric("spans/s (last minute)", f"{h['spans_per_s']:,.0f}")
    c[1].metric(
        "rejected spans", f"{h['rejected_spans']:,}", help="Spans refused for good: invalid ids or fields."
    )
    c[2].metric(
        "refused requests",
        f"{h['refused_requests']:,}",
        help="Requests turned away while busy; exporters retry them.",
    )
    c[3].metric(
        "invalid requests", f"{h['invalid_requests']:,}", help="Malformed OTLP, wrong content type, too big."
    )
    c[4].metric(
        "write queue",
        f"{h['queued_spans']:,} spans",
        help=f"Waiting to be committed; requests are refused beyond {h['queue_capacity_spans']:,}.",
    )
    with st.form("audit_now"):
        settle = st.number_input(
            "settle (s)",
            min_value=0.0,
            value=60.0,
            step=10.0,
            help="Audit spans older than this only: later spans of their traces may still arrive.",
        )
        if st.form_submit_button("Audit now", help="The server audits what is new since its last run."):
            with st.spinner("the server is auditing..."):
                answer = data.audit_now(settle)
            st.session_state["audit_summary"] = answer["summary"] or [
                "Nothing new to audit: no spans since the last run older than the settle time."
            ]
    if "audit_summary" in st.session_state:
        st.code("\n".join(st.session_state["audit_summary"]), language=None)

run = data.audit_run()
if run is None:
    data.no_run_yet()
health = context_health(run["edges"])
cols[3].metric(
    "context health",
    "n/a" if health is None else f"{health:.1%}",
    help="Share of the stored calls between instrumented services whose context reached the callee "
    f"(run {run['run_id']}).",
)

sampling = run.get("sampling") or {}
overall = sampling.get("overall") or {}
if overall.get("fragmentation_factor", {}).get("value") is not None:
    c = st.columns(3)
    f = overall["fragmentation_factor"]
    c[0].metric(
        "fragments per request", f"{f['value']:.3f}", help=f"95% CI {f['ci_low']:.3f}-{f['ci_high']:.3f}"
    )
    t = overall["trace_completeness"]
    if t["value"] is not None:
        c[1].metric("stored requests whole", f"{t['value']:.1%}")
    h = overall["hidden_error_share"]
    if h["value"] is not None:
        c[2].metric("errors hidden in fragments", f"{h['value']:.1%}")

st.subheader("Over time")
runs = pd.DataFrame(data.audit_runs())
if len(runs):
    runs["window end"] = pd.to_datetime(runs["window_end_ns"], unit="ns", utc=True)
    rates = runs.melt(id_vars="window end", value_vars=["orphan_rate", "context_health"], var_name="figure")
    rates["figure"] = rates["figure"].map(
        {"orphan_rate": "orphan roots / roots", "context_health": "context health"}
    )
    left, right = st.columns(2)
    left.altair_chart(
        alt.Chart(rates)
        .mark_line(point=True)
        .encode(
            x="window end:T",
            y=alt.Y("value:Q", title="share", axis=alt.Axis(format="%")),
            color="figure:N",
            tooltip=["window end:T", "figure:N", alt.Tooltip("value:Q", format=".1%")],
        ),
        width="stretch",
    )
    right.altair_chart(
        alt.Chart(runs)
        .mark_bar()
        .encode(
            x="window end:T",
            y=alt.Y("broken_edges:Q", title="broken hops"),
            tooltip=["run_id", "broken_edges"],
        ),
        width="stretch",
    )

st.subheader("Worst hops")
broken = sorted((e for e in run["edges"] if e["broken"]), key=lambda e: -e["dropped"])
if broken:
    st.caption("Ranked by impact: the stored calls whose context was lost on the hop.")
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "hop": f"{e['caller']} → {e['callee']}",
                    "protocol": e["protocol"],
                    "dropped": e["dropped"],
                    "calls": e["calls"],
                    "propagation": e["propagation_rate"],
                    "stitched": e["stitched"],
                    "likely cause": e["cause"],
                }
                for e in broken
            ]
        ),
        hide_index=True,
        width="stretch",
        column_config={
            "propagation": st.column_config.ProgressColumn(format="%.2f", min_value=0, max_value=1)
        },
    )
else:
    st.success("No hop loses context in the last run.")
