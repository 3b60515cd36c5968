"""The sampling distortion of the last run, per edge and per service, with 95% intervals."""

import altair as alt
import pandas as pd
import streamlit as st

from ui import data

st.title("Sampling distortion")
run = data.audit_run()
if run is None:
    data.no_run_yet()
sampling = run.get("sampling")
if not sampling:
    st.info("This run was saved before the sampling figures existed: audit again.")
    st.stop()
st.caption("Formulas and what to do about each figure: docs/sampling.md.")
overall = sampling["overall"]
cols = st.columns(4)
for col, key, fmt in zip(
    cols,
    ("fragmentation_factor", "trace_completeness", "hidden_error_share", "latency_undercount"),
    ("{:.3f}", "{:.1%}", "{:.1%}", "{:.1%}"),
):
    e = overall[key]
    col.metric(
        key.replace("_", " "),
        "n/a" if e["value"] is None else fmt.format(e["value"]),
        help=None if e["value"] is None else f"95% CI {e['ci_low']}-{e['ci_high']}, n = {e['n']:,}",
    )

figures = ("propagation_rate", "conditional_capture_rate", "upstream_missing_share")
edges = pd.DataFrame(
    [
        {
            "edge": f"{e['caller']} → {e['callee']} ({e['protocol']})",
            "figure": f,
            "value": e[f]["value"],
            "low": e[f]["ci_low"],
            "high": e[f]["ci_high"],
            "n": e[f]["n"],
        }
        for e in sampling["edges"]
        for f in figures
        if e[f]["value"] is not None
    ]
)
st.subheader("Per edge")
if not edges.empty:
    base = alt.Chart(edges).encode(y=alt.Y("edge:N", title=None), color="figure:N", yOffset="figure:N")
    st.altair_chart(
        base.mark_point(filled=True).encode(x=alt.X("value:Q", scale=alt.Scale(domain=[0, 1])))
        + base.mark_rule().encode(x="low:Q", x2="high:Q"),
        width="stretch",
    )
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "edge": f"{e['caller']} → {e['callee']} ({e['protocol']})",
                    **{f: e[f]["value"] for f in figures},
                    "volume ratio": e["volume_ratio"]["value"],
                    "unknown th share": e["unknown_adjusted_count_share"],
                }
                for e in sampling["edges"]
            ]
        ),
        hide_index=True,
        width="stretch",
    )
st.subheader("Per service")
st.dataframe(
    pd.DataFrame(
        [
            {
                "service": s["service"],
                "spans": s["spans"],
                "root inflation": s["root_inflation"]["value"],
                "dangling parents": s["dangling_parent_rate"]["value"],
                "sampling probability": s["sampling_probability"]["value"],
                "known th": s["known_threshold_share"]["value"],
                "parent based": s["parent_based"],
            }
            for s in sampling["services"]
        ]
    ),
    hide_index=True,
    width="stretch",
)
