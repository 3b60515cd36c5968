"""Which window an audit run reads. By default it starts where the last run ended, so a
re-audit reads only what is new, and it ends `settle` seconds before now, because spans
arrive late; it never ends after the newest span."""

from __future__ import annotations

from .config import AuditWindow

_S = 1_000_000_000


def choose_window(
    *,
    first_start_ns: int | None,
    last_start_ns: int | None,
    last_run_end_ns: int | None,
    now_ns: int,
    since_ns: int | None = None,
    until_ns: int | None = None,
    settle_s: float,
    context_s: float,
) -> AuditWindow | None:
    """None when there is nothing (new) to audit."""
    if first_start_ns is None or last_start_ns is None:
        return None
    start = (
        since_ns
        if since_ns is not None
        else (last_run_end_ns if last_run_end_ns is not None else first_start_ns)
    )
    end = until_ns if until_ns is not None else min(now_ns - int(settle_s * _S), last_start_ns + 1)
    if end <= start:
        return None
    return AuditWindow(start, end, int(context_s * _S))
