"""The ctxaudit explorer: `ctxaudit ui (--server URL | --db PATH)` runs this with Streamlit."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

PAGES = Path(__file__).parent / "pages"

st.set_page_config(page_title="ctxaudit", page_icon="🧵", layout="wide")
st.navigation(
    [
        st.Page(PAGES / "overview.py", title="Overview", default=True),
        st.Page(PAGES / "service_graph.py", title="Service graph"),
        st.Page(PAGES / "findings.py", title="Findings"),
        st.Page(PAGES / "trace.py", title="Trace view"),
        st.Page(PAGES / "sampling.py", title="Sampling"),
    ]
).run()
