"""Where the pages get their data: one reader per session (a running server's read API, or a
store file opened read-only), and cached query results. The reader is chosen by `ctxaudit ui`
through the environment: CTXAUDIT_SERVER (a URL) or CTXAUDIT_DB (a path)."""

from __future__ import annotations

import os
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
