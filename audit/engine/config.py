"""What an audit run reads (its window) and how it judges (its settings, `AuditConfig`, declared
with every other setting in audit/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import AuditConfig

_S = 1_000_000_000


@dataclass(frozen=True)
class AuditWindow:
    """Findings are spans that start in [start_ns, end_ns). Spans up to `context_ns` either side
    are read too, to find parents, children and stitching candidates across the boundary."""

    start_ns: int
    end_ns: int
    context_ns: int = 120 * _S

    @property
    def read_from_ns(self) -> int:
        return max(0, self.start_ns - self.context_ns)

    @property
    def read_to_ns(self) -> int:
        return self.end_ns + self.context_ns


__all__ = ["AuditConfig", "AuditWindow"]
