"""Where the pages get their data: one reader per session (a running server's read API, or a
store file opened read-only), and cached query results. The reader is chosen by `ctxaudit ui`
through the environment: CTXAUDIT_SERVER (a URL) or CTXAUDIT_DB (a path)."""

from __future__ import annotations

import os
from collections import deque
from contextlib import contextmanager

import streamlit as st

from audit.contract.reader import Reader
from audit.read import open_reader
from audit.store.errors import StoreError
from ui.text import md

TTL_S = 30  # a live server keeps ingesting: cached answers age out


@st.cache_resource
def reader() -> Reader:
    server, db = os.environ.get("CTXAUDIT_SERVER"), os.environ.get("CTXAUDIT_DB")
    return open_reader(server=server) if server else open_reader(db=db or "ctxaudit.duckdb")


def source() -> str:
    return os.environ.get("CTXAUDIT_SERVER") or os.environ.get("CTXAUDIT_DB") or "ctxaudit.duckdb"


@contextmanager
def _shown():
    """A store that cannot answer is said on the page, which stops there."""
    try:
        yield
    except StoreError as e:
        st.error(md(e))
        st.stop()


@st.cache_data(ttl=TTL_S, show_spinner=False)
def store_counts() -> dict:
    with _shown():
        return reader().store_counts()


@st.cache_data(ttl=TTL_S, show_spinner=False)
def audit_run(run_id: int | None = None) -> dict | None:
    with _shown():
        return reader().audit_run(run_id)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def audit_runs(limit: int = 200) -> list[dict]:
    with _shown():
        return reader().audit_runs(limit)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def findings(run_id: int | None, **filters) -> dict:
    with _shown():
        return reader().findings(run_id, **filters)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def trace(trace_id: int) -> list[dict]:
    with _shown():
        return reader().trace(trace_id)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def fragmented_requests(run_id: int | None = None, limit: int = 20) -> list[dict]:
    with _shown():
        return reader().fragmented_requests(run_id, limit)


MAX_FRAGMENTS = 40  # a request split wider than this is shown in part, and says so


@st.cache_data(ttl=TTL_S, show_spinner=False)
def whole_request(run_id: int, trace_id: int) -> dict:
    with _shown():
        return assemble_request(reader(), run_id, trace_id)


def assemble_request(r: Reader, run_id: int, trace_id: int, max_fragments: int = MAX_FRAGMENTS) -> dict:
    """The logical request `trace_id` is a fragment of: every trace reached from it up and down
    the run's stitched hops (a fragment's orphan to its probable parent's trace, and the traces
    whose orphans name a parent in it), at any depth. `traces` in the order reached, `hops` the
    stitched findings joining them, `findings` every finding on the fragments."""
    traces, seen, queue = [trace_id], {trace_id}, deque([trace_id])
    hops: dict[tuple[str, str], dict] = {}
    found: list[dict] = []
    truncated = False
    while queue:
        t = queue.popleft()
        own = r.findings(run_id, trace_id=t, limit=10_000)["findings"]
        below = r.findings(run_id, parent_trace_id=t, limit=10_000)["findings"]
        found += own
        for f in own + below:
            parent = f["probable_parent"]
            if not parent or parent["trace_id"] == f["trace_id"]:
                continue
            hops[(f["trace_id"], f["span_id"])] = f
            for linked in (int(parent["trace_id"], 16), int(f["trace_id"], 16)):
                if linked in seen:
                    continue
                if len(seen) >= max_fragments:
                    truncated = True
                    continue
                seen.add(linked)
                traces.append(linked)
                queue.append(linked)
    return {"traces": traces, "hops": list(hops.values()), "findings": found, "truncated": truncated}


def live() -> bool:
    """A running server: it reports ingestion and runs audits on request."""
    return reader().live


@st.cache_data(ttl=5, show_spinner=False)
def ingest() -> dict:
    with _shown():
        return reader().ingest()


def audit_now(settle_s: float) -> dict:
    """Have the server audit what is new (and settled); the answer's `summary` says what it found."""
    with _shown():
        answer = reader().audit({"settings": {"settle_s": settle_s}})
    st.cache_data.clear()  # every cached answer predates the new run
    return answer


def no_run_yet() -> None:
    how = "press **Audit now**" if live() else "run `ctxaudit audit --db ...`"
    st.info(f"No audit run in {md(source())} yet: {how}, then reload.")
    st.stop()
