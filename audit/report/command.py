"""`ctxaudit report`: audit the last `since` of a store (a file, or through a running server),
write the report into a folder, compare it with the previous one, and judge the gate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..settings import AuditSettings
from . import sources
from .build import build_report, read_history, read_previous, verdicts, write_report
from .gate import Threshold, exit_code


@dataclass(frozen=True)
class ReportRequest:
    out_dir: Path
    since_s: float
    settings: AuditSettings
    thresholds: list[Threshold]
    history: Path | None = None  # default: out_dir/history.jsonl
    previous: str | None = None  # a report.json; default: the newest in the history


def make_report(
    request: ReportRequest, fetch: Callable[[], dict], source: str
) -> tuple[dict, list[Path], int]:
    """Audit (through `fetch`), build, write; the report, the files written and the gate's exit
    code. Raises StoreError when the audit cannot be had, ValueError for a bad --previous."""
    previous = read_previous(request.previous) if request.previous else None
    history_path = request.history or request.out_dir / "history.jsonl"
    history = read_history(history_path)
    doc = fetch()
    report = build_report(
        doc,
        source=source,
        since_s=request.since_s,
        history=history,
        previous=previous,
        thresholds=request.thresholds,
    )
    written = write_report(report, request.out_dir, history_path)
    return report, written, exit_code(verdicts(report))


def report_from_file(request: ReportRequest, db: str, memory_limit: str, progress: Callable[[str], None]):
    return make_report(
        request, lambda: sources.from_file(db, request.settings, request.since_s, memory_limit, progress), db
    )


def report_from_run(request: ReportRequest, db: str, run_id: int):
    return make_report(request, lambda: sources.from_run(db, run_id), db)


def report_from_server(request: ReportRequest, url: str):
    return make_report(request, lambda: sources.from_server(url, request.settings, request.since_s), url)
