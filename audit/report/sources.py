"""Where a report's audit comes from: a store file (opened read-only), a running server's read
API (`--server`: the server audits the file it holds), or, for serve's own nightly report, the
server's audits directly. Each audits the window ending at the newest settled span and
reaching back `since_s`, without saving a run (the report is not one of the audit runs), and
gives the result document without findings, with its text summary."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from ..audit_job import audit_store, summary_lines
from ..engine import AuditResult
from ..read import open_reader
from ..settings import AUDIT_MEMORY_LIMIT, AuditSettings
from ..store.errors import StoreError

_S = 1_000_000_000


@dataclass(frozen=True)
class Window:
    start_ns: int
    end_ns: int


def report_window(time_range: dict, since_s: float, settle_s: float, now_ns: int | None = None) -> Window:
    """`since_s` back from the newest settled span (so a store of past spans reports on its last
    day, and a live one on the last day until now); StoreError on an empty store."""
    if time_range["last_start_ns"] is None:
        raise StoreError("the store holds no spans yet: nothing to report")
    now_ns = time.time_ns() if now_ns is None else now_ns
    end = min(now_ns - int(settle_s * _S), time_range["last_start_ns"] + 1)
    return Window(max(end - int(since_s * _S), time_range["first_start_ns"]), end)


def document(result: AuditResult) -> dict:
    return json.loads(
        "".join(result.document_chunks(findings=False, extra={"summary": summary_lines(result)}))
    )


def _require(doc: dict | None, window: Window) -> dict:
    if doc is None or doc.get("run") is None:
        raise StoreError(
            f"no spans start between {_when(window.start_ns)} and {_when(window.end_ns)} (the report's "
            "window, after the settle time): nothing to report"
        )
    return doc


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).isoformat(timespec="seconds")


def from_file(
    db: str,
    settings: AuditSettings,
    since_s: float,
    memory_limit: str = AUDIT_MEMORY_LIMIT,
    progress: Callable[[str], None] = lambda step: None,
) -> dict:
    reader = open_reader(db=db)
    try:
        window = report_window(reader.time_range(), since_s, settings.settle_s)
    finally:
        reader.close()
    result = audit_store(
        db,
        settings,
        since_ns=window.start_ns,
        until_ns=window.end_ns,
        resume=False,
        save=False,
        memory_limit=memory_limit,
        progress=progress,
    )
    return _require(document(result) if result else None, window)


def from_run(db: str, run_id: int) -> dict:
    """A run saved in the file `db` (by `audit --db`, the server, or `audit --spark --save-db`),
    not a new audit."""
    from ..audit_job import saved_result

    result = saved_result(db, run_id)
    if result is None:
        raise StoreError(f"no audit run {run_id} in {db}")
    return document(result)


def from_server(url: str, settings: AuditSettings, since_s: float) -> dict:
    from ..read.remote import RemoteReader

    remote = RemoteReader(url)
    window = report_window(remote.time_range(), since_s, settings.settle_s)
    doc = remote.audit(
        {
            "settings": settings.to_dict(),
            "since_ns": window.start_ns,
            "until_ns": window.end_ns,
            "save": False,
        }
    )
    return _require(doc, window)


def in_server(
    time_range: Callable[[], dict],
    audit: Callable[..., AuditResult | None],
    settings: AuditSettings,
    since_s: float,
) -> dict:
    """For serve's own report: `time_range` and `audit(settings, since_ns=, until_ns=, resume=, save=)`
    are the server's (its reader, and its one-at-a-time audits)."""
    window = report_window(time_range(), since_s, settings.settle_s)
    result = audit(settings, since_ns=window.start_ns, until_ns=window.end_ns, resume=False, save=False)
    return _require(document(result) if result else None, window)
