"""What an audit run reads (its window) and how it judges (its settings)."""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class AuditConfig:
    # services ("svc") or operations ("svc:span name") whose roots are real entry points
    entrypoints: frozenset[str] = field(default_factory=frozenset)
    # a probable parent below this confidence is withheld (the matcher abstains)
    min_confidence: float = 0.6
    # clock skew allowed on an edge whose skew could not be learned from propagated calls
    default_skew_ms: float = 50.0
    # longest producer-to-consumer lag a stitching candidate may have (caps the learned lags' reach)
    default_max_lag_s: float = 60.0
    # a service whose roots have stitching candidates less often than this is an entry point
    entry_candidate_share: float = 0.05
    # the sampling probability of spans without `ot=th`; None: their adjusted count is unknown,
    # and the sampling figures leave them out (reporting how many there are)
    assume_sampling_probability: float | None = None

    def is_configured_entry(self, service: str, operation: str) -> bool:
        return service in self.entrypoints or f"{service}:{operation}" in self.entrypoints
