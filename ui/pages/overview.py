"""Overview: context health now and over time, and the worst hops."""

import altair as alt
import pandas as pd
import streamlit as st

from ui import data

st.title("Context health")
counts = data.store_counts()
run = data.audit_run()
cols = st.columns(4)
cols[0].metric("spans stored", f"{counts['spans']:,}")
cols[1].metric("traces", f"≈{counts['traces_approx']:,}", help="Approximate (HyperLogLog): exact in `ctxaudit stats`.")
cols[2].metric("services", counts["services"])
if run is None:
    data.no_run_yet()
instrumented = [e for e in run["edges"] if e["callee_instrumented"]]
calls = sum(e["calls"] for e in instrumented)
health = sum(e["propagated"] for e in instrumented) / calls if calls else None
cols[3].metric("context health", "n/a" if health is None else f"{health:.1%}",
               help="Share of the stored calls between services whose context reached the callee (last run).")

sampling = run.get("sampling") or {}
overall = sampling.get("overall") or {}
if overall.get("fragmentation_factor", {}).get("value") is not None:
    c = st.columns(3)
    f = overall["fragmentation_factor"]
    c[0].metric("fragments per request", f"{f['value']:.3f}", help=f"95% CI {f['ci_low']:.3f}-{f['ci_high']:.3f}")
    t = overall["trace_completeness"]
    if t["value"] is not None:
        c[1].metric("stored requests whole", f"{t['value']:.1%}")
    h = overall["hidden_error_share"]
    if h["value"] is not None:
        c[2].metric("errors hidden in fragments", f"{h['value']:.1%}")

st.subheader("Findings per audit run")
runs = data.audit_runs()
trend = pd.DataFrame([{"window end": pd.to_datetime(r["window_end_ns"], unit="ns", utc=True), "kind": k, "findings": n}
                      for r in runs for k, n in r["counts"].items()])  # fmt: skip
if not trend.empty:
    st.altair_chart(alt.Chart(trend).mark_line(point=True).encode(x="window end:T", y="findings:Q", color="kind:N"),
                    width="stretch")  # fmt: skip

st.subheader("Worst hops")
broken = sorted((e for e in run["edges"] if e["broken"]), key=lambda e: -e["dropped"])
if broken:
    st.dataframe(pd.DataFrame([{
        "hop": f"{e['caller']} → {e['callee']}", "protocol": e["protocol"], "dropped": e["dropped"],
        "calls": e["calls"], "propagation": e["propagation_rate"], "stitched": e["stitched"], "likely cause": e["cause"],
    } for e in broken]), hide_index=True, width="stretch",
        column_config={"propagation": st.column_config.ProgressColumn(format="%.2f", min_value=0, max_value=1)})  # fmt: skip
else:
    st.success("No hop loses context in the last run.")
