"""The audit engine: from stored spans to findings, stitched parents and service edges.

`run_audit(con, window, config)` reads one settled time window. Heavy work (filters, joins,
candidate generation) runs as SQL in DuckDB; Python only learns small models from aggregates
and solves the small assignment problems of stitching.
"""

from ..contract.document import AuditResult, Edge
from .config import AuditConfig, AuditWindow
from .run import run_audit
from .window import choose_window

__all__ = ["AuditConfig", "AuditResult", "AuditWindow", "Edge", "choose_window", "run_audit"]
