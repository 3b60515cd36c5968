"""The whole request: the trace asked for and every fragment joined to it by stitched hops, up
and down at any depth, as one waterfall (a colour per fragment, each stitched hop drawn with its
confidence and cause). Without a trace id: the run's most fragmented requests."""

import altair as alt
import pandas as pd
import streamlit as st

from ui import data
from ui.text import md

st.title("Trace view")
run = data.audit_run(st.session_state.get("trace_run_id"))  # the run it was opened from, else the last
given = st.text_input("trace id (32 hex digits)", value=st.session_state.get("trace_id", "")).strip()
if not given:
    if run is None:
        data.no_run_yet()
    requests = data.fragmented_requests(run["run_id"], 10)
    if not requests:
        st.info("No request of the last audit run is split by a stitched hop. Paste a trace id to see one.")
        st.stop()
    st.subheader("Most fragmented requests")
    st.caption(
        f"Audit run {run['run_id']}: logical requests split into the most traces, newest first among "
        "equals. Open one, or paste any trace id above."
    )
    for r in requests:
        left, right = st.columns([3, 2])
        left.button(
            f"Open {r['trace_id']}",
            key=f"open-{r['trace_id']}",
            on_click=lambda t=r["trace_id"]: st.session_state.update(trace_id=t),
        )
        right.text(
            f"{r['fragments']} fragments, {r['hops']} stitched hops, "
            f"lowest confidence {r['min_confidence']:.2f}"
        )
    st.stop()
try:
    trace_id = int(given, 16)
    if len(given) != 32:
        raise ValueError
except ValueError:
    st.error(f"{md(repr(given))} is not a trace id: 32 hex digits.")
    st.stop()
if not data.trace(trace_id):
    st.warning("No span of this trace is stored.")
    st.stop()

request = data.whole_request(run["run_id"], trace_id) if run else {"traces": [trace_id], "hops": []}
fragments = [(t, data.trace(t)) for t in request["traces"]]
fragments = sorted((f for f in fragments if f[1]), key=lambda f: min(s["start_ns"] for s in f[1]))
label = {}  # trace id -> its fragment's legend entry, in start order
for i, (t, spans) in enumerate(fragments, 1):
    root = min(spans, key=lambda s: (s["parent_span_id"] is not None, s["start_ns"]))
    label[t] = f"{i}: {root['service_name']} ({t:032x}"[:24] + "…)"
hops = request["hops"]
if len(fragments) > 1:
    lowest = min(h["probable_parent"]["confidence"] for h in hops)
    st.info(
        f"This request is split into {len(fragments)} traces (fragments), joined by {len(hops)} "
        f"stitched hops: each orphan root's probable parent is a span in another trace (lowest "
        f"confidence {lowest:.2f}). The context broke on those hops."
    )
else:
    st.info("No stitched hop joins this trace to another: it is the whole request as far as the audit knows.")
if request.get("truncated"):
    st.warning(f"The request reaches more than {data.MAX_FRAGMENTS} traces: the first ones are shown.")

# the waterfall in tree order: each span under its parent, each stitched orphan under its probable parent
spans = {(t, s["span_id"]): dict(s, fragment=label[t]) for t, ss in fragments for s in ss}
children: dict[tuple, list] = {}
for (t, sid), s in spans.items():
    if s["parent_span_id"] is not None and (t, s["parent_span_id"]) in spans:
        children.setdefault((t, s["parent_span_id"]), []).append((t, sid))
stitched_to = {}
for h in hops:
    orphan = (int(h["trace_id"], 16), int(h["span_id"], 16))
    parent = (int(h["probable_parent"]["trace_id"], 16), int(h["probable_parent"]["span_id"], 16))
    if orphan in spans and parent in spans:
        children.setdefault(parent, []).append(orphan)
        stitched_to[orphan] = parent
placed = {c for cs in children.values() for c in cs}
order: list[tuple[tuple, int]] = []
stack = [(k, 0) for k in sorted(set(spans) - placed, key=lambda k: spans[k]["start_ns"], reverse=True)]
while stack:
    key, depth = stack.pop()
    if any(key == k for k, _ in order):
        continue  # a cycle of wrong links: each span once
    order.append((key, depth))
    stack += [
        (c, depth + 1)
        for c in sorted(children.get(key, []), key=lambda c: spans[c]["start_ns"], reverse=True)
    ]
start = min(s["start_ns"] for s in spans.values())
rows, names = [], {}
for key, depth in order:
    s = spans[key]
    name = f"{'· ' * depth}{s['service_name']}: {s['name']}"
    names[name] = names.get(name, 0) + 1
    rows.append(
        {
            "row": name if names[name] == 1 else f"{name} ({names[name]})",
            "key": key,
            "fragment": s["fragment"],
            "kind": s["kind"],
            "start ms": (s["start_ns"] - start) / 1e6,
            "end ms": (max(s["end_ns"], s["start_ns"]) - start) / 1e6,
            "span id": f"{s['span_id']:016x}",
            "status": s["status_code"],
        }
    )
frame = pd.DataFrame(rows)
row_of = dict(zip(frame["key"], frame["row"]))
links = pd.DataFrame(
    [
        {
            "from": row_of[parent],
            "to": row_of[orphan],
            "at ms": (spans[orphan]["start_ns"] - start) / 1e6,
            "hop": f"{h['probable_parent']['confidence']:.2f} · {h['cause']}",
            "cause": h["cause"],
            "confidence": h["probable_parent"]["confidence"],
        }
        for h in hops
        if (orphan := (int(h["trace_id"], 16), int(h["span_id"], 16))) in stitched_to
        and (parent := stitched_to[orphan]) in row_of
    ],
    columns=["from", "to", "at ms", "hop", "cause", "confidence"],
)
y = alt.Y("row:N", sort=list(frame["row"]), title=None, axis=alt.Axis(labelLimit=360))
bars = (
    alt.Chart(frame.drop(columns=["key"]))
    .mark_bar(height={"band": 0.5})  # thin bars: the hops' labels fit in the gap above
    .encode(
        x=alt.X("start ms:Q", title="ms since the request's first span"),
        x2="end ms:Q",
        y=y,
        color=alt.Color("fragment:N", legend=alt.Legend(title="fragment (trace)", labelLimit=300)),
        tooltip=["row", "fragment", "kind", "span id", "status", "start ms", "end ms"],
    )
)
layers = [bars]
if not links.empty:
    hop_rule = alt.Chart(links).mark_rule(strokeDash=[4, 3], color="#d62728", strokeWidth=2)
    layers.append(
        hop_rule.encode(
            x="at ms:Q",
            y=alt.Y("from:N", sort=list(frame["row"])),
            y2="to:N",
            tooltip=["hop", "cause", "confidence"],
        )
    )
    layers.append(
        alt.Chart(links)
        .mark_text(align="left", baseline="bottom", dx=4, dy=-8, fontSize=11, color="#d62728")
        .encode(x="at ms:Q", y=alt.Y("to:N", sort=list(frame["row"])), text="hop:N")
    )
st.altair_chart(
    alt.layer(*layers).properties(height=alt.Step(30)),  # a row per span, every label shown
    width="stretch",
)
st.caption(
    "Dashed red lines: stitched hops, from the probable parent span down to the orphan root, "
    "labelled with the link's confidence and the likely cause."
)

if len(fragments) > 1:
    st.subheader("Fragments")
    st.table(
        pd.DataFrame(
            [
                {  # st.table renders Markdown in cells: span text goes through md
                    "fragment": md(label[t]),
                    "trace id": f"{t:032x}",
                    "spans": len(ss),
                    "services": md(", ".join(sorted({s["service_name"] for s in ss}))),
                }
                for t, ss in fragments
            ]
        )
    )
    st.subheader("Stitched hops")
    st.table(
        pd.DataFrame(
            [
                {
                    "hop": f"{md(h['caller'] or '?')} → {md(h['callee'] or h['service'])}",
                    "protocol": md(h["protocol"]),
                    "confidence": f"{h['probable_parent']['confidence']:.2f}",
                    "cause": md(h["cause"]),
                    "fix": md(h["fix"]),
                    "parent trace, span": " ".join(h["probable_parent"][k] for k in ("trace_id", "span_id")),
                    "orphan trace, span": f"{h['trace_id']} {h['span_id']}",
                }
                for h in sorted(hops, key=lambda h: h["start_time_unix_nano"])
            ]
        )
    )
others = [f for f in request.get("findings", []) if not f["probable_parent"]]
if not run:
    others = []
for f in others[:20]:
    st.warning(
        f"**{f['kind']}** at {md(f['service'])} ({md(f['caller'] or '?')} → {md(f['callee'] or '?')}, "
        f"{md(f['protocol'])}): {md(f['explanation'])} Fix: {md(f['fix'])}"
    )
